// Exit round trip: the cost of one guest `out` that exits to the VMM and back, in denovm and in a
// minimal C KVM loop (bench/c/exit_roundtrip.c) running the same guest (bench/guest/exit_loop.S).
//
// denovm: the guest does LOOPS writes, then the debug exit; the time from Vm.boot to the exit
// code, minus the same for a guest doing 0 writes, divided by LOOPS. Two ports: the POST-code port
// (served inside the vCPU worker: the bare round trip) and COM1's scratch register (a real device
// behind the VMM's I/O dispatch). C: timed inside the KVM_RUN loop.
//
// Output: {"bench":"exit_roundtrip","loops":N,"c_ns_per_exit":..,"denovm_ns_per_exit":..,
//          "denovm_device_ns_per_exit":..}

import { join } from "node:path";
import { DEBUG_EXIT_PORT, KERNEL_START, SERIAL_PORTS } from "../vmm/layout.ts";
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

const NAME = "exit_roundtrip";
skipWithoutKvm(NAME);

const LOOPS = Number(Deno.env.get("BENCH_LOOPS") ?? 100_000);
const REPEATS = 3;
/** Port 0x80: the ISA POST-code port, which Linux writes for I/O delays; VMMs serve it cheaply. */
const POST_CODE_PORT = 0x80;
/** 8250 UART scratch register: offset 7 from the port base (PC16550D datasheet, register table). */
const UART_SCR_OFFSET = 7;
const COM1_SCRATCH_PORT = SERIAL_PORTS[0].base + UART_SCR_OFFSET;

const dir = await writeLayoutHeader(benchCacheDir());

async function buildGuest(loops: number, port: number): Promise<string> {
  const out = join(dir, `exit_loop-${loops}-${port.toString(16)}.elf`);
  await run("gcc", [
    ...["-nostdlib", "-static", "-no-pie", "-fno-pic", `-I${dir}`],
    ...["-Wl,--build-id=none", "-Wl,-z,noexecstack", "-Wl,-z,max-page-size=4096"],
    `-Wl,--defsym=KERNEL_START=0x${KERNEL_START.toString(16)}`,
    ...["-T", join(BENCH_DIR, "guest", "exit_loop.ld")],
    `-DLOOPS=${loops}`,
    `-DBENCH_PORT=0x${port.toString(16)}`,
    "-o",
    out,
    join(BENCH_DIR, "guest", "exit_loop.S"),
  ]);
  return out;
}

async function buildC(): Promise<string> {
  const out = join(dir, "exit_roundtrip");
  await run("gcc", ["-O2", "-Wall", "-Werror", `-I${dir}`, "-o", out, join(BENCH_DIR, "c", "exit_roundtrip.c")]);
  return out;
}

/** Milliseconds from Vm.boot to the VM's end for `kernel` (the guest exits by itself). */
async function denovmRunMs(kernel: string): Promise<number> {
  const { Vm } = await import("../mod.ts");
  const t0 = performance.now();
  const vm = await Vm.boot({ kernel, params: [], memMiB: 64, cpus: 1, debugExit: true });
  const code = await vm.exitCode;
  const ms = performance.now() - t0;
  if (code !== 0) throw new Error(`guest ${kernel} ended with exit code ${code}: ${vm.exitReason}`);
  return ms;
}

async function denovmNsPerExit(port: number): Promise<number> {
  const empty = await buildGuest(0, port);
  const loop = await buildGuest(LOOPS, port);
  await denovmRunMs(empty); // warm up: module loading, worker start-up
  const base: number[] = [];
  const full: number[] = [];
  for (let i = 0; i < REPEATS; i++) {
    base.push(await denovmRunMs(empty));
    full.push(await denovmRunMs(loop));
  }
  return ((median(full) - median(base)) * 1e6) / LOOPS;
}

progress(NAME, `building guests and the C loop (LOOPS=${LOOPS}, debug exit port 0x${DEBUG_EXIT_PORT.toString(16)})`);
const cBin = await buildC();
const cGuest = await buildGuest(LOOPS, POST_CODE_PORT);
const cRuns: number[] = [];
for (let i = 0; i < REPEATS; i++) {
  const r = JSON.parse((await run(cBin, [cGuest])).trim()) as { exits: number; ns_per_exit: number };
  if (r.exits !== LOOPS) throw new Error(`C loop counted ${r.exits} exits, expected ${LOOPS}`);
  cRuns.push(r.ns_per_exit);
}
progress(NAME, `C: ${median(cRuns).toFixed(0)} ns per exit`);
const post = await denovmNsPerExit(POST_CODE_PORT);
progress(NAME, `denovm, POST-code port: ${post.toFixed(0)} ns per exit`);
const device = await denovmNsPerExit(COM1_SCRATCH_PORT);
progress(NAME, `denovm, COM1 scratch register: ${device.toFixed(0)} ns per exit`);
result(NAME, {
  loops: LOOPS,
  c_ns_per_exit: Math.round(median(cRuns)),
  denovm_ns_per_exit: Math.round(post),
  denovm_device_ns_per_exit: Math.round(device),
});
Deno.exit(0);
