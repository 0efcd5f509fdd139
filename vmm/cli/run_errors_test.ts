// `denovm run` with bad input: one line naming the problem and crosvm's exit code
// (35 for what the user gave, 1 for host faults). The checks on the user's files
// happen before KVM is opened, so these run on any host.

import assert from "node:assert/strict";
import { debianKernel } from "../../test/support/kernel.ts";
import { MAX_VCPUS } from "../arch/cpu.ts";
import { runDenovm, stderrLines } from "../../test/support/cli.ts";

/** `denovm run ARGS...` with its exit code and stderr's lines. */
async function run(args: string[], env: Record<string, string> = {}) {
  const r = await runDenovm(["run", ...args], { env });
  return { code: r.code, lines: stderrLines(r) };
}

function assertOneLine(r: { code: number; lines: string[] }, code: number, re: RegExp) {
  assert.equal(r.code, code, r.lines.join("\n"));
  assert.equal(r.lines.length, 1, `expected one line, got:\n${r.lines.join("\n")}`);
  assert.match(r.lines[0], /^denovm: /);
  assert.match(r.lines[0], re);
}

Deno.test("run: a file that is neither bzImage nor ELF → 35", async () => {
  const f = await Deno.makeTempFile();
  await Deno.writeTextFile(f, "#!/bin/sh\necho not a kernel\n");
  assertOneLine(await run([f]), 35, /neither a bzImage nor an ELF/);
  await Deno.remove(f);
});

Deno.test("run: memory too small for the kernel, or for kernel + initrd → 35", async () => {
  const k = await debianKernel();
  assertOneLine(await run(["-m", "8", k.vmlinux]), 35, /--mem 8 MiB is too small for kernel/);
  const initrd = await Deno.makeTempFile();
  await Deno.writeFile(initrd, new Uint8Array(200 * 1024 * 1024));
  assertOneLine(await run(["-m", "128", "-i", initrd, k.vmlinuz]), 35, /too small for initrd/);
  await Deno.remove(initrd);
});

Deno.test("run: a kernel command line longer than the kernel accepts → 35", async () => {
  const k = await debianKernel();
  assertOneLine(await run(["-p", "x".repeat(5000), k.vmlinuz]), 35, /command line is \d+ bytes/);
});

Deno.test("run: no KVM device, or a file that is not one → 1 with one line", async () => {
  const k = await debianKernel();
  assertOneLine(
    await run([k.vmlinuz], { DENOVM_KVM_DEVICE: "/nonexistent/kvm" }),
    1,
    /\/nonexistent\/kvm does not exist: this host has no KVM/,
  );
  assertOneLine(await run([k.vmlinuz], { DENOVM_KVM_DEVICE: "/dev/null" }), 1, /\/dev\/null is not a KVM device/);
});

Deno.test({
  // The platform's limit, checked with the arguments on any host; a host KVM that allows fewer is
  // test/kvm/fake_kvm_test.ts's case.
  name: "run: more vCPUs than the MP table and ACPI describe → 35, whatever the host's KVM allows",
  fn: async () => {
    const k = await debianKernel();
    assertOneLine(
      await run(["-c", String(MAX_VCPUS + 1), k.vmlinuz]),
      35,
      new RegExp(`--cpus num-cores: ${MAX_VCPUS + 1} is out of range \\(1\\.\\.${MAX_VCPUS}\\)`),
    );
  },
});
