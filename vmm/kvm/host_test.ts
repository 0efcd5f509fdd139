// What runs the guest (host.ts), decided in a fresh process each time: the C library a process uses is
// fixed once loaded, and the fake KVM (test/support/fake_kvm.c) is a C library. The fake reports
// itself as each KVM module in turn, so every kind is checked on any machine.

import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { buildFakeKvm } from "../../test/support/fake_kvm.ts";
import { emulatedGuestCode, emulatedKernelReason, type HostKind, KVM_MODULES, shutdownResetsVcpu } from "./host.ts";

const HOST_TS = fileURLToPath(new URL("./host.ts", import.meta.url));

/** hostKind() and kvmModule() as a process with exactly this environment (and PATH) sees them. */
async function kindIn(env: Record<string, string>): Promise<{ hostKind: string; kvmModule: string }> {
  const code = `const h = await import(${JSON.stringify(HOST_TS)}); ` +
    `console.log(JSON.stringify({ hostKind: h.hostKind(), kvmModule: h.kvmModule() }));`;
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["eval", "--quiet", code],
    env: { PATH: Deno.env.get("PATH") ?? "/usr/bin:/bin", ...env },
    clearEnv: true,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const stderr = new TextDecoder().decode(out.stderr);
  assert.equal(out.code, 0, stderr);
  return JSON.parse(new TextDecoder().decode(out.stdout));
}

Deno.test("host kind: the fake KVM reporting each module is seen as that module", async () => {
  const shim = await buildFakeKvm();
  for (const module of KVM_MODULES) {
    const seen = await kindIn({
      DENOVM_LIBC: shim,
      DENOVM_KVM_DEVICE: "/nonexistent/fake-kvm",
      DENOVM_FAKE_KVM_MODULE: module,
      DENOVM_FAKE_KVM_LOG: "/dev/null",
    });
    assert.deepEqual(seen, { hostKind: module, kvmModule: module });
  }
});

Deno.test("host kind: none where the KVM device is missing or is not a KVM device", async () => {
  for (const device of ["/nonexistent/kvm", "/dev/null"]) {
    const seen = await kindIn({ DENOVM_KVM_DEVICE: device });
    assert.equal(seen.hostKind, "none", device);
  }
});

Deno.test("host kind: what each kind implies", () => {
  const expect: Record<HostKind, [resets: boolean, emulated: boolean, refusesLinux: boolean]> = {
    kvm_pvm: [false, true, true],
    kvm_amd: [true, false, false],
    kvm_intel: [false, false, false],
    none: [false, false, false],
  };
  for (const [kind, [resets, emulated, refusesLinux]] of Object.entries(expect) as [HostKind, boolean[]][]) {
    assert.equal(shutdownResetsVcpu(kind), resets, kind);
    assert.equal(emulatedGuestCode(kind), emulated, kind);
    assert.equal(emulatedKernelReason(kind) !== undefined, refusesLinux, kind);
  }
  const reason = emulatedKernelReason("kvm_pvm")!;
  assert.ok(!reason.includes("\n"), "one line");
  assert.match(reason, /kvm_pvm/);
  assert.match(reason, /scripts\/nested-kvm\.sh/);
});
