// The default guest for tests that run real Linux under denovm: Debian's 6.1 kernel
// (test/support/kernel.ts) with denovm's default initramfs (scripts/initramfs.sh), and whether this
// host can run it.

import { hostKind } from "../../vmm/kvm/host.ts";

const repo = new URL("../..", import.meta.url).pathname;

/**
 * vCPUs of the Linux guests. In the nested KVM host (scripts/nested-kvm.sh) Linux with two vCPUs
 * broke about one run in three, below denovm: an RCU stall with CPU 0 never answering CPU 1's
 * NMI, a triple fault of vCPU 1, and once the nested host's own kernel hit a stack guard page
 * in KVM_RUN. With one vCPU it has not; SMP bring-up is proven there by the smp test guest.
 */
export const LINUX_CPUS = Deno.env.get("DENOVM_IN_NESTED_HOST") ? 1 : 2;

/** Why this host cannot boot an unmodified Linux kernel under denovm, or undefined. */
export function fullLinuxUnavailable(): string | undefined {
  const kind = hostKind();
  return kind === "none"
    ? "no /dev/kvm"
    : kind === "kvm_pvm"
    ? "kvm_pvm: this host's KVM cannot run an unmodified Linux kernel (no hardware virtualization)"
    : undefined;
}

function exists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    return false;
  }
}

/** Whether `cmd` is on PATH. */
export function which(cmd: string): boolean {
  const path = Deno.env.get("PATH") ?? "/usr/bin:/bin";
  return path.split(":").some((dir) => exists(`${dir}/${cmd}`));
}

let initramfsPending: Promise<string> | undefined;
/** The default initramfs, built by scripts/initramfs.sh (once per test module). */
export function defaultInitramfs(): Promise<string> {
  initramfsPending ??= (async () => {
    const out = await new Deno.Command("bash", {
      args: [`${repo}scripts/initramfs.sh`],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const text = (b: Uint8Array) => new TextDecoder().decode(b).trim();
    if (!out.success) {
      throw new Error(`scripts/initramfs.sh failed: ${text(out.stderr).split("\n").slice(-3).join("; ")}`);
    }
    return text(out.stdout).split("\n").pop()!;
  })();
  return initramfsPending;
}

/** `cmd args`, its stdout; throws with its stderr when it fails. */
export async function run(cmd: string, args: string[], stdin?: Uint8Array): Promise<string> {
  const child = new Deno.Command(cmd, {
    args,
    stdin: stdin ? "piped" : "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  if (stdin) {
    const w = child.stdin.getWriter();
    await w.write(stdin);
    await w.close();
  }
  const out = await child.output();
  const text = new TextDecoder().decode(out.stdout);
  if (!out.success) throw new Error(`${cmd} failed: ${new TextDecoder().decode(out.stderr).trim()}`);
  return text;
}
