// denovm as a library: boot a VM from the same config the CLI builds, watch and
// type on its console, pause, resume, stop, and read how it ended.
//
//   await using vm = await Vm.boot({ kernel: "bzImage", params: ["console=ttyS0"] });
//   await vm.console.waitFor(/login:/, { timeout: 60_000 });
//   vm.console.send("root\n");
//   console.log(await vm.stop());

import { defaultVmConfig, type SerialConfig, type VmConfig } from "./vmm/config.ts";
import { ConsoleLog } from "./vmm/console_log.ts";
import { Machine } from "./vmm/machine.ts";

export { ConsoleTimeoutError } from "./vmm/console_log.ts";
export type { VmConfig } from "./vmm/config.ts";
export { defaultVmConfig, kernelCommandLine } from "./vmm/config.ts";
export {
  EXIT_GUEST_PANIC,
  EXIT_HOST_ERROR,
  EXIT_INVALID_ARGS,
  EXIT_SUCCESS,
  EXIT_VM_CRASH,
  EXIT_VM_RESET,
} from "./vmm/cli/exit_codes.ts";
export { ConfigError } from "./vmm/machine.ts";
export { HostError } from "./vmm/vm.ts";

/** What Vm.boot takes: a kernel and any VmConfig fields, plus library-only options. */
export type BootConfig = Partial<VmConfig> & {
  kernel: string;
  /** Serve the test guests' debug exit port (a write of N ends the VM with exit code N). */
  debugExit?: boolean;
  /** Also print the console to this process's stdout. */
  echoConsole?: boolean;
};

/** The library's default console: COM1, captured, not on this process's stdout or stdin. */
function librarySerial(echo: boolean): SerialConfig {
  return { type: echo ? "stdout" : "sink", hardware: "serial", num: 1, console: true, earlycon: false, stdin: false };
}

export class Vm {
  readonly console: ConsoleLog;
  /** crosvm's exit code once the VM has ended (0 power-off/stop, 32 reset, 33 crash, 34 panic). */
  readonly exitCode: Promise<number>;
  readonly #machine: Machine;

  private constructor(machine: Machine, console: ConsoleLog) {
    this.#machine = machine;
    this.console = console;
    this.exitCode = machine.exitCode.then((code) => {
      console.close(`exit code ${code}: ${machine.exitReason}`);
      return code;
    });
  }

  /** Build and start a VM. Rejects with ConfigError (bad config) or HostError (no KVM...). */
  static async boot(config: BootConfig): Promise<Vm> {
    const { debugExit, echoConsole, ...rest } = config;
    const full: VmConfig = {
      ...defaultVmConfig(config.kernel),
      serials: [librarySerial(echoConsole ?? false)],
      ...rest,
    };
    const holder: { machine?: Machine } = {};
    const log = new ConsoleLog((text) => holder.machine?.sendInput(new TextEncoder().encode(text)));
    const machine = await Machine.create(full, { onConsoleOutput: (b) => log.push(b), debugExit, noStdin: true });
    holder.machine = machine;
    const vm = new Vm(machine, log);
    await machine.start();
    return vm;
  }

  /** The kernel command line the guest received. */
  get cmdline(): string {
    return this.#machine.cmdline;
  }

  /** Why the VM ended (empty while it runs). */
  get exitReason(): string {
    return this.#machine.exitReason;
  }

  /** Type text on the console port. */
  send(text: string): void {
    this.console.send(text);
  }

  async pause(): Promise<void> {
    await this.#machine.pause();
  }

  resume(): void {
    this.#machine.resume();
  }

  /** Stop the VM (as crosvm `stop`); resolves to its exit code (0 unless it had already ended otherwise). */
  async stop(): Promise<number> {
    return await this.#machine.stop();
  }

  /** Counters: exits served per vCPU, per-device statistics. */
  stats(): Record<string, number> {
    return this.#machine.stats();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.stop();
  }
}
