// Exit overhead: what the VMM's own loop adds to each exit, natively, with no KVM at all. The fake
// KVM of the tests (test/support/fake_kvm.c, loaded as denovm's libc and as the C loops'
// LD_PRELOAD) answers every KVM_RUN at once from a script: "exit-loop" makes LOOPS writes to the
// POST-code port, "mmio-loop" LOOPS reads of a virtio-mmio InterruptStatus register; each ends with
// the debug exit. So almost all of what is timed is the VMM's side of an exit: the ioctl call,
// reading struct kvm_run, dispatching, answering, looping. denovm's loop (the vCPU Worker, through
// Deno's FFI) against those of bench/c/exit_roundtrip.c and bench/c/mmio_exit.c, in the same run.
//
// This is the part of the exit-roundtrip and mmio-exit ratios that denovm controls. A real exit adds
// the same kernel and hardware cost to both sides, which this benchmark leaves out on purpose: it runs
// on hosts without usable KVM (and at native speed, unlike the nested KVM host's TCG).
//
// denovm: median time from Vm.boot to the exit code over REPEATS runs with LOOPS exits, minus the
// same with 0 exits, divided by LOOPS. C: timed inside its KVM_RUN loop.
//
// Output: {"bench":"exit-overhead","host":"native, fake KVM","denovm_ns":..,"c_ns":..,"added_ns":..,
//          "ratio":..,"mmio_denovm_ns":..,"mmio_c_ns":..,"mmio_added_ns":..,"mmio_ratio":..,"loops":N}
// (the first four: port writes; mmio_*: InterruptStatus reads)

import type { BootConfig } from "../mod.ts";
import { buildFakeKvm, fakeKvmEnv } from "../test/support/fake_kvm.ts";
import {
  benchCacheDir,
  buildBenchC,
  buildLoopGuest,
  denovmRunMs,
  median,
  progress,
  result,
  run,
  writeLayoutHeader,
} from "./_common.ts";

const NAME = "exit-overhead";
const LOOPS = Number(Deno.env.get("BENCH_LOOPS") ?? 2_000_000);
const REPEATS = 5;
/** Port 0x80, which the guest ELF below names; the fake's script writes it regardless. */
const POST_CODE_PORT = 0x80;

const dir = await writeLayoutHeader(benchCacheDir());
progress(NAME, `building the fake KVM, a guest image and the C loops (LOOPS=${LOOPS})`);
const shim = await buildFakeKvm();
const cPort = await buildBenchC(dir, "exit_roundtrip");
const cMmio = await buildBenchC(dir, "mmio_exit");
// Any loadable kernel will do: the fake runs its script, not the guest's code.
const guest = await buildLoopGuest(dir, "exit_loop.S", "exit_loop-0-80.elf", { LOOPS: 0, BENCH_PORT: POST_CODE_PORT });

/** Nanoseconds per exit of a C loop under the fake, from its JSON line (`count` and `perExit` name its fields). */
async function cNsPerExit(bin: string, script: string, count: string, perExit: string): Promise<number> {
  const runs: number[] = [];
  for (let i = 0; i < REPEATS; i++) {
    const out = await run(bin, [guest], {
      LD_PRELOAD: shim,
      // The C loops open /dev/kvm by that name: the fake takes that path (there may be no such device).
      DENOVM_KVM_DEVICE: "/dev/kvm",
      DENOVM_FAKE_KVM_SCRIPT: script,
      DENOVM_FAKE_KVM_LOOP_COUNT: String(LOOPS),
    });
    const r = JSON.parse(out.trim()) as Record<string, number>;
    if (r[count] !== LOOPS) throw new Error(`${bin} counted ${r[count]} exits, expected ${LOOPS}`);
    runs.push(r[perExit]);
  }
  const ns = median(runs);
  progress(NAME, `C, ${script}: ${ns.toFixed(1)} ns per exit`);
  return ns;
}

const cPortNs = await cNsPerExit(cPort, "exit-loop", "exits", "ns_per_exit");
const cMmioNs = await cNsPerExit(cMmio, "mmio-loop", "reads", "ns_per_read");

// denovm in this process: its libc is the fake from here on (ffi/libc.ts reads DENOVM_LIBC on first use).
const log = await Deno.makeTempFile({ prefix: "denovm-exit-overhead-", suffix: ".log" });
async function denovmNsPerExit(script: string, extra: Omit<BootConfig, "kernel"> = {}): Promise<number> {
  for (const [k, v] of Object.entries(fakeKvmEnv(shim, script, log))) Deno.env.set(k, v);
  const timed = (loops: number) => {
    Deno.env.set("DENOVM_FAKE_KVM_LOOP_COUNT", String(loops));
    return denovmRunMs(guest, extra);
  };
  await timed(0); // warm-up: module loading, the first Worker
  const base: number[] = [];
  const full: number[] = [];
  for (let i = 0; i < REPEATS; i++) {
    base.push(await timed(0));
    full.push(await timed(LOOPS));
  }
  const ns = ((median(full) - median(base)) * 1e6) / LOOPS;
  progress(NAME, `denovm, ${script}: ${ns.toFixed(1)} ns per exit`);
  return ns;
}
const portNs = await denovmNsPerExit("exit-loop");
// As bench/mmio_exit.ts: one virtio-mmio device (rng) in the first slot, whose InterruptStatus is read.
const mmioNs = await denovmNsPerExit("mmio-loop", { rng: true, balloon: false });
await Deno.remove(log);

const f = (x: number, digits = 1) => Number(x.toFixed(digits));
result(NAME, {
  host: "native, fake KVM",
  denovm_ns: f(portNs),
  c_ns: f(cPortNs),
  added_ns: f(portNs - cPortNs),
  ratio: f(portNs / cPortNs, 2),
  mmio_denovm_ns: f(mmioNs),
  mmio_c_ns: f(cMmioNs),
  mmio_added_ns: f(mmioNs - cMmioNs),
  mmio_ratio: f(mmioNs / cMmioNs, 2),
  loops: LOOPS,
});
Deno.exit(0);
