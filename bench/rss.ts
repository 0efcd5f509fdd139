// Memory: resident set size of the VMM process (guest RAM it touched included) once Debian's 6.1
// kernel with the default initramfs has reached /init (DENOVM-INIT-OK), for denovm and for QEMU's
// microvm machine with KVM, both with the same guest RAM size. On a kvm_pvm host both run in the nested KVM
// host (bench/_common.ts skipWithoutKvm); measured there anyway (DENOVM_NESTED=off), where the kernel does
// not get that far, the sample is taken at the kernel's "Command line:" line instead.
//
// Output: {"bench":"rss","stage":"init"|"command-line","mem_mib":256,"denovm_rss_kib":..,
//          "denovm_hwm_kib":..,"qemu_microvm_rss_kib":..,"qemu_microvm_hwm_kib":..}

import { join } from "node:path";
import {
  debianKernelDir,
  killChild,
  kvmPvm,
  progress,
  REPO_ROOT,
  result,
  run,
  skipWithoutKvm,
  spawnTimed,
} from "./_common.ts";

const NAME = "rss";
await skipWithoutKvm(NAME, import.meta.url, {
  notOnKvmPvm: "QEMU microvm with KVM prints nothing there (its firmware does not survive kvm_pvm's emulator) " +
    "and Linux stops early",
});

const MEM_MIB = 256;
const PVM = kvmPvm();
const STAGE = PVM ? "command-line" : "init";
const MARKER = PVM ? /Command line:/ : /^DENOVM-INIT-OK\r?$/m;
const PARAMS = PVM ? "console=ttyS0 earlyprintk=ttyS0 noxsave" : "console=ttyS0";
/** Give up on a guest that never prints the marker (a guard, not a measurement). */
const GUARD_MS = 300_000;

/** VmRSS and VmHWM of a process, in KiB (proc(5): /proc/<pid>/status). */
async function memoryKiB(pid: number): Promise<{ rss: number; hwm: number }> {
  const status = await Deno.readTextFile(`/proc/${pid}/status`);
  const field = (name: string) => Number(status.match(new RegExp(`^${name}:\\s+(\\d+) kB`, "m"))?.[1] ?? NaN);
  return { rss: field("VmRSS"), hwm: field("VmHWM") };
}

async function sample(label: string, cmd: string, args: string[]): Promise<{ rss: number; hwm: number } | null> {
  const p = spawnTimed(cmd, args);
  let guard: ReturnType<typeof setTimeout> | undefined;
  try {
    const timedOut = new Promise<"timeout">((res) => guard = setTimeout(() => res("timeout"), GUARD_MS));
    const outcome = await Promise.race([p.waitFor(MARKER), timedOut, p.child.status.then(() => "exited" as const)]);
    if (outcome !== undefined) {
      progress(NAME, `${label}: ${outcome} before ${MARKER}`);
      return null;
    }
    const m = await memoryKiB(p.child.pid);
    progress(NAME, `${label}: VmRSS ${m.rss} KiB, VmHWM ${m.hwm} KiB at ${STAGE}`);
    return m;
  } finally {
    clearTimeout(guard);
    await killChild(p.child);
  }
}

const kdir = await debianKernelDir();
const initrd = (await run("bash", [join(REPO_ROOT, "scripts/initramfs.sh")])).trim().split("\n").pop()!;
const denovm = await sample("denovm", Deno.execPath(), [
  ...["run", "--allow-all", join(REPO_ROOT, "main.ts"), "run", "--mem", String(MEM_MIB)],
  ...["--initrd", initrd, "-p", PARAMS, join(kdir, "vmlinux")],
]);
const qemu = await sample("qemu microvm", "qemu-system-x86_64", [
  ...["-M", "microvm", "-accel", "kvm", "-cpu", "host", "-m", String(MEM_MIB), "-smp", "1"],
  ...["-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot"],
  ...["-kernel", join(kdir, "vmlinuz"), "-initrd", initrd, "-append", PARAMS],
]);
result(NAME, {
  stage: STAGE,
  mem_mib: MEM_MIB,
  denovm_rss_kib: denovm?.rss ?? null,
  denovm_hwm_kib: denovm?.hwm ?? null,
  qemu_microvm_rss_kib: qemu?.rss ?? null,
  qemu_microvm_hwm_kib: qemu?.hwm ?? null,
});
Deno.exit(0);
