// Start-up: milliseconds from starting the VMM process to the kernel's first line on the serial
// console ("Linux version", printed through earlyprintk), for denovm and for QEMU's microvm machine
// (with KVM), booting the same Debian 6.1 bzImage. Not the first byte: QEMU enters the image's 16-bit
// setup code, which prints "Probing EDD" long before the kernel proper, while denovm enters at the
// 64-bit entry; the kernel's first line is the same point for both. denovm is also timed to the
// first byte of the boot_info test guest, which writes at once: that figure is mostly the VMM's
// own start-up.
//
// Output: {"bench":"startup","denovm_ms":..,"qemu_microvm_ms":..,"ratio":..,"denovm_setup_ms":..,
//          "denovm_setup":{"runtime_ms":..,"vm_build_ms":..,"vcpu_start_ms":..,"setup_ms":..},
//          "denovm_test_guest_ms":..,"repeats":N}
// (medians; ratio = denovm_ms / qemu_microvm_ms; denovm_setup is denovm's own account of its start-up, from
// DENOVM_TIMINGS (vmm/run.ts); a side that fails reports null and an error field).

import { join } from "node:path";
import { buildGuest } from "../test/guests/build.ts";
import { TIMINGS_ENV } from "../vmm/run.ts";
import {
  debianKernelDir,
  killChild,
  kvmPvm,
  median,
  progress,
  REPO_ROOT,
  result,
  skipWithoutKvm,
  spawnTimed,
} from "./_common.ts";

const NAME = "startup";
await skipWithoutKvm(NAME, import.meta.url);

const REPEATS = Number(Deno.env.get("BENCH_REPEATS") ?? 3);
const MEM_MIB = 256;
// earlyprintk: the first lines come out before the console driver starts; noxsave avoids xrstor,
// which kvm_pvm's emulator lacks (shared/reference/kvm-here.md).
const PARAMS = "console=ttyS0 earlyprintk=ttyS0 noxsave";

function denovmArgs(kernel: string, params: string): string[] {
  return ["run", "--allow-all", join(REPO_ROOT, "main.ts"), "run", "--mem", String(MEM_MIB), "-p", params, kernel];
}

function qemuArgs(vmlinuz: string): string[] {
  return [
    ...["-M", "microvm", "-accel", "kvm", "-cpu", "host", "-m", String(MEM_MIB), "-smp", "1"],
    ...["-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot"],
    ...["-kernel", vmlinuz, "-append", PARAMS],
  ];
}

/** The kernel's first line (init/main.c start_kernel prints linux_banner first). */
const KERNEL_FIRST_LINE = /Linux version /;
/** Longest wait for it (TCG in the nested KVM host is slow, but not this slow). */
const MARKER_TIMEOUT_MS = 180_000;

/** Milliseconds to the first stdout byte, or with `marker` to the first output matching it. */
async function startMs(cmd: string, args: string[], marker?: RegExp): Promise<number> {
  const t0 = performance.now();
  const p = spawnTimed(cmd, args);
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    if (!marker) return await p.firstByteMs;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`no ${marker} within ${MARKER_TIMEOUT_MS} ms`)), MARKER_TIMEOUT_MS);
    });
    await Promise.race([p.waitFor(marker), timeout]);
    return performance.now() - t0;
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

const kdir = await debianKernelDir();
if (kvmPvm) progress(NAME, "kvm_pvm host: the kernel's guest code is emulated, expect seconds, not milliseconds");
const vmlinuz = join(kdir, "vmlinuz");
const denovm = await medianOf("denovm", Deno.execPath(), denovmArgs(vmlinuz, PARAMS), KERNEL_FIRST_LINE);
const qemu = await medianOf("qemu microvm", "qemu-system-x86_64", qemuArgs(vmlinuz), KERNEL_FIRST_LINE);
const testGuest = await medianOf(
  "denovm, boot_info guest",
  Deno.execPath(),
  denovmArgs(await buildGuest("boot_info"), ""),
);

/** denovm's own account of its start-up (DENOVM_TIMINGS, vmm/run.ts) with the boot_info guest: medians. */
async function setupTimings(kernel: string): Promise<Record<string, number> | { error: string }> {
  const runs: Record<string, number>[] = [];
  try {
    for (let i = 0; i < REPEATS; i++) {
      const child = new Deno.Command(Deno.execPath(), {
        args: denovmArgs(kernel, ""),
        env: { [TIMINGS_ENV]: "1" },
        stdin: "null",
        stdout: "null",
        stderr: "piped",
      }).spawn();
      let text = "";
      const decoder = new TextDecoder();
      for await (const chunk of child.stderr) {
        text += decoder.decode(chunk, { stream: true });
        if (/denovm: timings: .*\n/.test(text)) break;
      }
      await killChild(child);
      const m = text.match(/denovm: timings: (.*)\n/);
      if (!m) throw new Error(`denovm printed no timings: ${text.trim().split("\n").at(-1)}`);
      runs.push(JSON.parse(m[1]));
    }
  } catch (e) {
    return { error: String(e instanceof Error ? e.message : e) };
  }
  const out = Object.fromEntries(Object.keys(runs[0]).map((k) => [k, median(runs.map((r) => r[k]))]));
  progress(NAME, `denovm's own start-up (boot_info guest): ${JSON.stringify(out)}`);
  return out;
}
const setup = await setupTimings(await buildGuest("boot_info"));

const field = (v: number | { error: string }) => typeof v === "number" ? Math.round(v * 10) / 10 : null;
const errors = Object.fromEntries(
  Object.entries({ denovm, qemu_microvm: qemu, denovm_test_guest: testGuest, denovm_setup: setup })
    .filter(([, v]) => typeof v !== "number" && (v as { error?: string }).error !== undefined)
    .map(([k, v]) => [k, (v as { error: string }).error]),
);
result(NAME, {
  denovm_ms: field(denovm),
  qemu_microvm_ms: field(qemu),
  ratio: typeof denovm === "number" && typeof qemu === "number" ? Math.round((denovm / qemu) * 1000) / 1000 : null,
  denovm_setup_ms: "error" in setup ? null : setup.setup_ms,
  denovm_setup: "error" in setup ? null : setup,
  denovm_test_guest_ms: field(testGuest),
  repeats: REPEATS,
  kvm_pvm: kvmPvm,
  ...(Object.keys(errors).length ? { errors } : {}),
});
Deno.exit(0);
