// Start-up: milliseconds from starting the VMM process to the first serial byte of a test guest,
// denovm against QEMU's microvm machine (with KVM) booting the same guest: bench/guest/first_byte.S,
// one ELF that writes a byte to COM1 at once from either entry (denovm's 64-bit entry, QEMU's PVH
// entry). With a guest that does nothing first, what is timed is the VMM's own start-up: process,
// runtime, VM build, firmware (QEMU runs its qboot BIOS and PVH option ROM first), the first vCPU
// instruction. This is the figure with the goal (ratio <= 1.0).
//
// Also timed, both VMMs booting Debian 6.1's bzImage: to the kernel's first line on the serial
// console ("Linux version", printed through earlyprintk). Not the first byte there: QEMU enters the
// image's 16-bit setup code, which prints "Probing EDD" long before the kernel proper, while denovm
// enters at the 64-bit entry; the kernel's first line is the same point for both.
//
// Output: {"bench":"startup","denovm_ms":..,"qemu_microvm_ms":..,"ratio":..,
//          "linux":{"denovm_ms":..,"qemu_microvm_ms":..,"ratio":..},"denovm_setup_ms":..,
//          "denovm_setup":{"runtime_ms":..,"vm_build_ms":..,"vcpu_start_ms":..,"setup_ms":..},"repeats":N}
// (medians; ratio = denovm_ms / qemu_microvm_ms; denovm_setup is denovm's own account of its start-up, from
// DENOVM_TIMINGS (vmm/cli/run_vm.ts); a side that fails reports null and an error field).

import { join } from "node:path";
import { TIMINGS_ENV } from "../vmm/cli/run_vm.ts";
import {
  benchCacheDir,
  buildLoopGuest,
  debianKernelDir,
  denovmCliArgs,
  killChild,
  kvmPvm,
  median,
  progress,
  result,
  skipWithoutKvm,
  spawnTimed,
  type SpawnTimedOptions,
  writeLayoutHeader,
} from "./_common.ts";

const NAME = "startup";
await skipWithoutKvm(NAME, import.meta.url, {
  notOnKvmPvm: "QEMU microvm with KVM prints nothing there (its firmware does not survive kvm_pvm's emulator) " +
    "and the bzImage's decompressor is emulated",
});

const REPEATS = Number(Deno.env.get("BENCH_REPEATS") ?? 3);
const MEM_MIB = 256;
// earlyprintk: the first lines come out before the console driver starts; noxsave avoids xrstor,
// which kvm_pvm's emulator lacks (shared/reference/kvm-here.md).
const LINUX_PARAMS = "console=ttyS0 earlyprintk=ttyS0 noxsave";

function denovmArgs(kernel: string, params: string): string[] {
  return denovmCliArgs(["run", "--mem", String(MEM_MIB), "-p", params, kernel]);
}

function qemuArgs(kernel: string, params: string): string[] {
  return [
    ...["-M", "microvm", "-accel", "kvm", "-cpu", "host", "-m", String(MEM_MIB), "-smp", "1"],
    ...["-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot"],
    ...["-kernel", kernel, "-append", params],
  ];
}

/** The kernel's first line (init/main.c start_kernel prints linux_banner first). */
const KERNEL_FIRST_LINE = /Linux version /;
/** Longest wait for a marker (TCG in the nested KVM host is slow, but not this slow). */
const MARKER_TIMEOUT_MS = 180_000;

/**
 * Milliseconds to the first byte on the watched stream, or with `marker` to the first text matching
 * it; `onText` gets the text at that point.
 */
async function startMs(
  cmd: string,
  args: string[],
  marker?: RegExp,
  opts: SpawnTimedOptions & { onText?: (text: string) => void } = {},
): Promise<number> {
  const t0 = performance.now();
  const p = spawnTimed(cmd, args, opts);
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    if (!marker) return await p.firstByteMs;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`no ${marker} within ${MARKER_TIMEOUT_MS} ms`)), MARKER_TIMEOUT_MS);
    });
    await Promise.race([p.waitFor(marker), timeout]);
    const ms = performance.now() - t0;
    opts.onText?.(p.text());
    return ms;
  } finally {
    clearTimeout(timer);
    await killChild(p.child);
  }
}

async function medianOf(
  label: string,
  cmd: string,
  args: string[],
  marker?: RegExp,
): Promise<number | { error: string }> {
  const times: number[] = [];
  try {
    for (let i = 0; i < REPEATS; i++) times.push(await startMs(cmd, args, marker));
  } catch (e) {
    progress(NAME, `${label}: ${e instanceof Error ? e.message : e}`);
    return { error: String(e instanceof Error ? e.message : e) };
  }
  const m = median(times);
  progress(
    NAME,
    `${label}: ${m.toFixed(1)} ms to ${marker ? `"${marker.source}"` : "the first serial byte"} (${
      times.map((t) => t.toFixed(0)).join(", ")
    })`,
  );
  return m;
}

/** The timings line denovm prints on stderr with DENOVM_TIMINGS (vmm/cli/run_vm.ts). */
const TIMINGS_LINE = /denovm: timings: (.*)\n/;

/** denovm's own account of its start-up with `kernel`: medians of each field. */
async function setupTimings(kernel: string): Promise<Record<string, number> | { error: string }> {
  const runs: Record<string, number>[] = [];
  try {
    for (let i = 0; i < REPEATS; i++) {
      let text = "";
      await startMs(Deno.execPath(), denovmArgs(kernel, ""), TIMINGS_LINE, {
        stream: "stderr",
        env: { [TIMINGS_ENV]: "1" },
        onText: (t) => text = t,
      });
      runs.push(JSON.parse(text.match(TIMINGS_LINE)![1]));
    }
  } catch (e) {
    return { error: String(e instanceof Error ? e.message : e) };
  }
  const out = Object.fromEntries(Object.keys(runs[0]).map((k) => [k, median(runs.map((r) => r[k]))]));
  progress(NAME, `denovm's own start-up (first_byte guest): ${JSON.stringify(out)}`);
  return out;
}

const dir = await writeLayoutHeader(benchCacheDir());
const guest = await buildLoopGuest(dir, "first_byte.S", "first_byte.elf", {}, "first_byte.ld");
const vmlinuz = join(await debianKernelDir(), "vmlinuz");
if (kvmPvm()) progress(NAME, "kvm_pvm host: the kernel's guest code is emulated, expect seconds, not milliseconds");

const denovm = await medianOf("denovm, first_byte guest", Deno.execPath(), denovmArgs(guest, ""));
const qemu = await medianOf("qemu microvm, first_byte guest", "qemu-system-x86_64", qemuArgs(guest, ""));
const denovmLinux = await medianOf(
  "denovm, Linux",
  Deno.execPath(),
  denovmArgs(vmlinuz, LINUX_PARAMS),
  KERNEL_FIRST_LINE,
);
const qemuLinux = await medianOf(
  "qemu microvm, Linux",
  "qemu-system-x86_64",
  qemuArgs(vmlinuz, LINUX_PARAMS),
  KERNEL_FIRST_LINE,
);
const setup = await setupTimings(guest);

type Measured = number | { error: string };
const field = (v: Measured) => typeof v === "number" ? Math.round(v * 10) / 10 : null;
const ratio = (a: Measured, b: Measured) =>
  typeof a === "number" && typeof b === "number" ? Math.round((a / b) * 1000) / 1000 : null;
const errors = Object.fromEntries(
  Object.entries({
    denovm,
    qemu_microvm: qemu,
    denovm_linux: denovmLinux,
    qemu_microvm_linux: qemuLinux,
    denovm_setup: setup,
  })
    .filter(([, v]) => typeof v !== "number" && (v as { error?: string }).error !== undefined)
    .map(([k, v]) => [k, (v as { error: string }).error]),
);
result(NAME, {
  denovm_ms: field(denovm),
  qemu_microvm_ms: field(qemu),
  ratio: ratio(denovm, qemu),
  linux: { denovm_ms: field(denovmLinux), qemu_microvm_ms: field(qemuLinux), ratio: ratio(denovmLinux, qemuLinux) },
  denovm_setup_ms: "error" in setup ? null : setup.setup_ms,
  denovm_setup: "error" in setup ? null : setup,
  repeats: REPEATS,
  kvm_pvm: kvmPvm(),
  ...(Object.keys(errors).length ? { errors } : {}),
});
Deno.exit(0);
