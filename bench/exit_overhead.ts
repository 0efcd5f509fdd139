// Exit overhead: what the VMM's own loop adds to each exit, natively, with no KVM at all. The fake
// KVM of the tests (test/support/fake_kvm.c, loaded as denovm's libc and as the C loop's
// LD_PRELOAD) answers every KVM_RUN at once with the "exit-loop" script: LOOPS writes to the
// POST-code port, then the debug exit. So almost all of what is timed is the VMM's side of an
// exit: the ioctl call, reading struct kvm_run, dispatching, looping. denovm's loop (the vCPU
// Worker, through Deno's FFI) against bench/c/exit_roundtrip.c's, in the same run.
//
// This is the part of exit-roundtrip's ratio that denovm controls. A real exit adds the same
// kernel and hardware cost to both sides, which this benchmark leaves out on purpose: it runs on
// hosts without usable KVM (and at native speed, unlike the nested KVM host's TCG).
//
// denovm: median time from Vm.boot to the exit code over REPEATS runs with LOOPS exits, minus the
// same with 0 exits, divided by LOOPS. C: timed inside its KVM_RUN loop.
//
// Output: {"bench":"exit-overhead","host":"native, fake KVM","denovm_ns":..,"c_ns":..,
//          "added_ns":..,"ratio":..,"loops":N}

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
/** The fake's scripted guest for this benchmark (test/support/fake_kvm.c script_exit_loop). */
const SCRIPT = "exit-loop";
/** Port 0x80, which the guest ELF below names; the fake's script writes it regardless. */
const POST_CODE_PORT = 0x80;

const dir = await writeLayoutHeader(benchCacheDir());
progress(NAME, `building the fake KVM, a guest image and the C loop (LOOPS=${LOOPS})`);
const shim = await buildFakeKvm();
const cBin = await buildBenchC(dir, "exit_roundtrip");
// Any loadable kernel will do: the fake runs its script, not the guest's code.
const guest = await buildLoopGuest(dir, "exit_loop.S", "exit_loop-0-80.elf", { LOOPS: 0, BENCH_PORT: POST_CODE_PORT });

const cRuns: number[] = [];
for (let i = 0; i < REPEATS; i++) {
  const out = await run(cBin, [guest], {
    LD_PRELOAD: shim,
    // The C loop opens /dev/kvm by that name: the fake takes that path (there may be no such device).
    DENOVM_KVM_DEVICE: "/dev/kvm",
    DENOVM_FAKE_KVM_SCRIPT: SCRIPT,
    DENOVM_FAKE_KVM_LOOP_COUNT: String(LOOPS),
  });
  const r = JSON.parse(out.trim()) as { exits: number; ns_per_exit: number };
  if (r.exits !== LOOPS) throw new Error(`C loop counted ${r.exits} exits, expected ${LOOPS}`);
  cRuns.push(r.ns_per_exit);
}
const cNs = median(cRuns);
progress(NAME, `C: ${cNs.toFixed(1)} ns per exit`);

// denovm in this process: its libc is the fake from here on (ffi/libc.ts reads DENOVM_LIBC on first use).
const log = await Deno.makeTempFile({ prefix: "denovm-exit-overhead-", suffix: ".log" });
for (const [k, v] of Object.entries(fakeKvmEnv(shim, SCRIPT, log))) Deno.env.set(k, v);
const timed = (loops: number) => {
  Deno.env.set("DENOVM_FAKE_KVM_LOOP_COUNT", String(loops));
  return denovmRunMs(guest);
};
await timed(0); // warm-up: module loading, the first Worker
const base: number[] = [];
const full: number[] = [];
for (let i = 0; i < REPEATS; i++) {
  base.push(await timed(0));
  full.push(await timed(LOOPS));
}
await Deno.remove(log);
const denovmNs = ((median(full) - median(base)) * 1e6) / LOOPS;
progress(NAME, `denovm: ${denovmNs.toFixed(1)} ns per exit`);

result(NAME, {
  host: "native, fake KVM",
  denovm_ns: Number(denovmNs.toFixed(1)),
  c_ns: Number(cNs.toFixed(1)),
  added_ns: Number((denovmNs - cNs).toFixed(1)),
  ratio: Number((denovmNs / cNs).toFixed(2)),
  loops: LOOPS,
});
Deno.exit(0);
