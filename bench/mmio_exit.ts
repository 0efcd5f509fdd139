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

import {
  benchCacheDir,
  buildBenchC,
  buildLoopGuest,
  denovmNsPerLoop,
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

function buildGuest(loops: number): Promise<string> {
  return buildLoopGuest(dir, "mmio_loop.S", `mmio_loop-${loops}.elf`, { LOOPS: loops });
}

progress(NAME, `building the guests and the C loop (LOOPS=${LOOPS})`);
const cBin = await buildBenchC(dir, "mmio_exit");
const emptyGuest = await buildGuest(0);
const loopGuest = await buildGuest(LOOPS);
progress(NAME, `built ${cBin}, ${emptyGuest}, ${loopGuest}`);
await skipWithoutKvm(NAME, import.meta.url);

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

const denovmNs = await denovmNsPerLoop(emptyGuest, loopGuest, LOOPS, REPEATS, { rng: true, balloon: false });
progress(NAME, `denovm: ${denovmNs.toFixed(0)} ns per read`);

result(NAME, {
  denovm_us: Number((denovmNs / 1000).toFixed(3)),
  c_us: Number((cNs / 1000).toFixed(3)),
  ratio: Number((denovmNs / cNs).toFixed(3)),
  loops: LOOPS,
});
Deno.exit(0);
