// `denovm run`: build the VM from a VmConfig (or restore it from a snapshot), run it, and resolve to crosvm's exit
// code.

import type { VmConfig } from "../config.ts";
import { buildMachine, type MachineOptions, restoreMachine } from "../builder.ts";
import type { Machine } from "../machine.ts";
import type { RestoreRequest, StartSuspended } from "./run.ts";
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

/** How `run` starts the VM beside its configuration (vmm/cli/run.ts RunCommand's fields of the same names). */
export interface RunVmOptions {
  /** `--restore PATH`: restore from the snapshot instead of booting. */
  restore?: RestoreRequest;
  /** `--suspended` / `--suspended-vcpus`. */
  suspended?: StartSuspended;
}

/**
 * Build or restore the VM, run it until it ends, and resolve to its exit code. A restore's errors (a missing or
 * damaged snapshot: exit 1; a configuration that differs from the snapshot's: exit 35) are thrown with their
 * exit codes, as a boot's are, for main.ts to print as one line.
 */
export async function runVm(config: VmConfig, opts: RunVmOptions = {}): Promise<number> {
  const tCreate = performance.now();
  // When stdout's reader goes away (`denovm run ... | head`), the VM is stopped and the run ends quietly
  // with a stopped VM's status, 0: crosvm too treats a failed console write as no failure of the run (it
  // logs it and goes on, devices/src/serial.rs), and a command-line tool whose reader has gone just ends.
  const built: { machine?: Machine } = {};
  const machineOptions: MachineOptions = {
    emulatedKernel: "warn",
    onStdoutClosed: () => void built.machine?.stop(),
  };
  const start = opts.restore ? restore(opts.restore, config, machineOptions) : buildMachine(config, machineOptions);
  const machine = await start;
  built.machine = machine;
  const tBuilt = performance.now();
  const onSignal = () => void machine.stop();
  Deno.addSignalListener("SIGTERM", onSignal);
  Deno.addSignalListener("SIGINT", onSignal);
  try {
    // With --suspended the control socket is served once the VM is suspended, so a client that finds the socket
    // finds the VM suspended, and its resume cannot come before the suspension it is meant to end.
    if (!opts.suspended) await machine.startControlSocket();
    const url = await startWebDisplay(machine);
    if (url) console.error(`denovm: web display at ${url}`);
    // A restored machine's configuration is the snapshot's with the given host-side options.
    if (machine.config.gdb !== undefined) await startGdbServer(machine, machine.config.gdb);
    // crosvm (src/crosvm/sys/linux.rs run_control): --suspended puts the devices to sleep and holds the vCPUs,
    // --suspended-vcpus holds only the vCPUs; a restore leaves the VM in that state once it is restored.
    await machine.start({ paused: opts.suspended !== undefined });
    if (opts.suspended === "vm") await machine.suspendDevices();
    if (opts.suspended && !machine.ended) await machine.startControlSocket();
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

/**
 * `run --restore PATH`: with KERNEL, `config` is the whole configuration, checked against the snapshot's;
 * without, the snapshot's configuration is used with the given host-side options (and the log level) over it.
 */
function restore(req: RestoreRequest, config: VmConfig, opts: MachineOptions): Promise<Machine> {
  if (!req.overrides) return restoreMachine(req.path, { ...opts, config });
  const overrides = { ...req.overrides, ...(config.logLevel !== undefined && { logLevel: config.logLevel }) };
  return restoreMachine(req.path, { ...opts, overrides });
}
