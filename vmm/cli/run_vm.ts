// `denovm run`: build the VM from a VmConfig, run it, and resolve to crosvm's exit code.

import type { VmConfig } from "../config.ts";
import { buildMachine } from "../builder.ts";
import type { Machine } from "../machine.ts";
import { gpuSummary, startWebDisplay } from "../library/gpu_front.ts";
import { startGdbServer } from "../gdb/server.ts";

/**
 * With DENOVM_TIMINGS set, `run` prints where its start-up time went, on stderr, once the vCPUs run:
 * `denovm: timings: {"runtime_ms":..,"vm_build_ms":..,"vcpu_start_ms":..,"setup_ms":..}`, milliseconds
 * from the runtime's start (Deno's, with every module loaded) to building the VM (memory, kernel,
 * tables, devices) to every vCPU worker in its KVM_RUN loop, with the control socket and web display
 * listening when asked for (setup_ms: the whole).
 */
export const TIMINGS_ENV = "DENOVM_TIMINGS";

export async function runVm(config: VmConfig): Promise<number> {
  const tCreate = performance.now();
  // When stdout's reader goes away (`denovm run ... | head`), the VM is stopped and the run ends quietly
  // with a stopped VM's status, 0: crosvm too treats a failed console write as no failure of the run (it
  // logs it and goes on, devices/src/serial.rs), and a command-line tool whose reader has gone just ends.
  const built: { machine?: Machine } = {};
  const machine = await buildMachine(config, {
    emulatedKernel: "warn",
    onStdoutClosed: () => void built.machine?.stop(),
  });
  built.machine = machine;
  const tBuilt = performance.now();
  const onSignal = () => void machine.stop();
  Deno.addSignalListener("SIGTERM", onSignal);
  Deno.addSignalListener("SIGINT", onSignal);
  try {
    await machine.startControlSocket();
    const url = await startWebDisplay(machine);
    if (url) console.error(`denovm: web display at ${url}`);
    if (config.gdb !== undefined) await startGdbServer(machine, config.gdb);
    await machine.start();
    if (Deno.env.get(TIMINGS_ENV)) {
      const tRunning = performance.now();
      const ms = (v: number) => Math.round(v * 10) / 10;
      const timings = {
        runtime_ms: ms(tCreate),
        vm_build_ms: ms(tBuilt - tCreate),
        vcpu_start_ms: ms(tRunning - tBuilt),
        setup_ms: ms(tRunning),
      };
      console.error(`denovm: timings: ${JSON.stringify(timings)}`);
    }
    const code = await machine.exitCode;
    const summary = gpuSummary(machine);
    if (summary) console.error(summary);
    return code;
  } finally {
    Deno.removeSignalListener("SIGTERM", onSignal);
    Deno.removeSignalListener("SIGINT", onSignal);
    machine.close();
  }
}
