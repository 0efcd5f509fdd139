// mmio-exit: the cost of one guest read of a virtio-mmio InterruptStatus register (an MMIO exit the VMM
// serves, as on every virtio interrupt Linux's vm_interrupt() takes), under denovm and under a minimal C
// KVM loop (bench/c/mmio_exit.c) running the same guest (bench/guest/mmio_loop.S).
//
// denovm: a VM with one virtio-mmio device (virtio-rng, the first slot at VIRTIO_MMIO_START; the balloon
// off) whose guest checks MagicValue and Version, reads InterruptStatus LOOPS times, then takes the debug
// exit; the time from Vm.boot to the exit code, minus the same for a guest doing 0 reads, over LOOPS.
// C: timed inside its KVM_RUN loop, which answers the reads from a fixed register file.
//
// The guest and the C program are built before the KVM check, so a host without /dev/kvm still proves
// they compile. Output: {"bench":"mmio-exit","denovm_us":..,"c_us":..,"ratio":..,"loops":N}
// ratio = denovm_us / c_us (goal <= 1.2).

import { join } from "node:path";
import { KERNEL_START } from "../vmm/layout.ts";
import {
  BENCH_DIR,
  benchCacheDir,
  median,
  progress,
  result,
  run,
  skipWithoutKvm,
  writeLayoutHeader,
} from "./_common.ts";

const NAME = "mmio-exit";
const LOOPS = Number(Deno.env.get("BENCH_LOOPS") ?? 100_000);
const REPEATS = 3;

const dir = await writeLayoutHeader(benchCacheDir());

async function buildGuest(loops: number): Promise<string> {
  const out = join(dir, `mmio_loop-${loops}.elf`);
  await run("gcc", [
    ...["-nostdlib", "-static", "-no-pie", "-fno-pic", `-I${dir}`],
    ...["-Wl,--build-id=none", "-Wl,-z,noexecstack", "-Wl,-z,max-page-size=4096"],
    `-Wl,--defsym=KERNEL_START=0x${KERNEL_START.toString(16)}`,
    ...["-T", join(BENCH_DIR, "guest", "exit_loop.ld")],
    `-DLOOPS=${loops}`,
    "-o",
    out,
    join(BENCH_DIR, "guest", "mmio_loop.S"),
  ]);
  return out;
}

async function buildC(): Promise<string> {
  const out = join(dir, "mmio_exit");
  await run("gcc", ["-O2", "-Wall", "-Werror", `-I${dir}`, "-o", out, join(BENCH_DIR, "c", "mmio_exit.c")]);
  return out;
}

progress(NAME, `building the guests and the C loop (LOOPS=${LOOPS})`);
const cBin = await buildC();
const emptyGuest = await buildGuest(0);
const loopGuest = await buildGuest(LOOPS);
progress(NAME, `built ${cBin}, ${emptyGuest}, ${loopGuest}`);
skipWithoutKvm(NAME);

/** Milliseconds from Vm.boot to the VM's end for `kernel` (the guest exits by itself). */
async function denovmRunMs(kernel: string): Promise<number> {
  const { Vm } = await import("../mod.ts");
  const t0 = performance.now();
  const vm = await Vm.boot({ kernel, params: [], memMiB: 64, cpus: 1, debugExit: true, rng: true, balloon: false });
  const code = await vm.exitCode;
  const ms = performance.now() - t0;
  if (code !== 0) throw new Error(`guest ${kernel} ended with exit code ${code}: ${vm.exitReason}`);
  return ms;
}

const cRuns: number[] = [];
for (let i = 0; i < REPEATS; i++) {
  const r = JSON.parse((await run(cBin, [loopGuest])).trim()) as {
    reads: number;
    ns_per_read: number;
    exit_code: number;
  };
  if (r.exit_code !== 0) throw new Error(`C loop: the guest found no virtio-mmio device (exit code ${r.exit_code})`);
  if (r.reads !== LOOPS) throw new Error(`C loop served ${r.reads} InterruptStatus reads, expected ${LOOPS}`);
  cRuns.push(r.ns_per_read);
}
const cNs = median(cRuns);
progress(NAME, `C: ${cNs.toFixed(0)} ns per read`);

await denovmRunMs(emptyGuest); // warm up: module loading, worker start-up
const base: number[] = [];
const full: number[] = [];
for (let i = 0; i < REPEATS; i++) {
  base.push(await denovmRunMs(emptyGuest));
  full.push(await denovmRunMs(loopGuest));
}
const denovmNs = ((median(full) - median(base)) * 1e6) / LOOPS;
progress(NAME, `denovm: ${denovmNs.toFixed(0)} ns per read`);

result(NAME, {
  denovm_us: Number((denovmNs / 1000).toFixed(3)),
  c_us: Number((cNs / 1000).toFixed(3)),
  ratio: Number((denovmNs / cNs).toFixed(3)),
  loops: LOOPS,
});
Deno.exit(0);
