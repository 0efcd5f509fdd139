// Exit round trip: the cost of one guest `out` that exits to the VMM and back, in denovm and in a
// minimal C KVM loop (bench/c/exit_roundtrip.c) running the same guest (bench/guest/exit_loop.S).
//
// denovm: the guest does LOOPS writes, then the debug exit; the time from Vm.boot to the exit
// code, minus the same for a guest doing 0 writes, divided by LOOPS. Two ports: the POST-code port
// (served inside the vCPU worker: the bare round trip) and COM1's scratch register (a real device
// behind the VMM's I/O dispatch). C: timed inside the KVM_RUN loop.
//
// Output: {"bench":"exit-roundtrip","denovm_us":..,"c_us":..,"ratio":..,"loops":N,"c_ns_per_exit":..,
//          "denovm_ns_per_exit":..,"denovm_device_ns_per_exit":..} (ratio: the POST-code port against C)

import { DEBUG_EXIT_PORT, SERIAL_PORTS } from "../vmm/arch/layout.ts";
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

const NAME = "exit-roundtrip";
await skipWithoutKvm(NAME, import.meta.url);

const LOOPS = Number(Deno.env.get("BENCH_LOOPS") ?? 100_000);
const REPEATS = 3;
/** Port 0x80: the ISA POST-code port, which Linux writes for I/O delays; VMMs serve it cheaply. */
const POST_CODE_PORT = 0x80;
/** 8250 UART scratch register: offset 7 from the port base (PC16550D datasheet, register table). */
const UART_SCR_OFFSET = 7;
const COM1_SCRATCH_PORT = SERIAL_PORTS[0].base + UART_SCR_OFFSET;

const dir = await writeLayoutHeader(benchCacheDir());

function buildGuest(loops: number, port: number): Promise<string> {
  return buildLoopGuest(dir, "exit_loop.S", `exit_loop-${loops}-${port.toString(16)}.elf`, {
    LOOPS: loops,
    BENCH_PORT: `0x${port.toString(16)}`,
  });
}

async function denovmNsPerExit(port: number): Promise<number> {
  return denovmNsPerLoop(await buildGuest(0, port), await buildGuest(LOOPS, port), LOOPS, REPEATS);
}

progress(NAME, `building guests and the C loop (LOOPS=${LOOPS}, debug exit port 0x${DEBUG_EXIT_PORT.toString(16)})`);
const cBin = await buildBenchC(dir, "exit_roundtrip");
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
const cNs = median(cRuns);
result(NAME, {
  denovm_us: Number((post / 1000).toFixed(3)),
  c_us: Number((cNs / 1000).toFixed(3)),
  ratio: Number((post / cNs).toFixed(3)),
  loops: LOOPS,
  c_ns_per_exit: Math.round(cNs),
  denovm_ns_per_exit: Math.round(post),
  denovm_device_ns_per_exit: Math.round(device),
});
Deno.exit(0);
