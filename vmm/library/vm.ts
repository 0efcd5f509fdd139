// The library's VM: boot one from the same config the CLI builds, watch and type on its console,
// run commands through the guest agent, look at its screen, pause, resume, stop, and read how it
// ended; snapshot it, restore one from a snapshot, and clone fresh VMs from a template (VmTemplate).
// mod.ts is the library's entry and exports it.

import { defaultVmConfig, type GpuConfig, gpuConfig, type SerialConfig, type VmConfig } from "../config.ts";
import { ConsoleLog } from "./console_log.ts";
import type { Machine, SnapshotOptions } from "../machine.ts";
import { buildMachine, type MachineOptions, restoreMachine } from "../builder.ts";
import type { InputDevice } from "../../devices/virtio/input/device.ts";
import { AgentClient, type ExecOptions } from "./agent_client.ts";
import { compareImages, type CompareOptions, decodePng, type Image } from "./screen.ts";
import { gpuStats, inputDevicesOf, screenshot, startWebDisplay } from "./gpu_front.ts";
import { RemoteInput, RemoteInputs } from "./input_remote.ts";

/** Bytes a console port buffers for the guest (ConsoleDevice's default inputLimit): the largest agent request. */
const AGENT_PORT_INPUT_LIMIT = 1024 * 1024;

/** The library's own options, beside a VmConfig: Vm.boot, Vm.restore and VmTemplate take them. */
export interface LibraryOptions {
  /** Serve the test guests' debug exit port (a write of N ends the VM with exit code N). */
  debugExit?: boolean;
  /** Also print the console to this process's stdout. */
  echoConsole?: boolean;
  /** Where step() saves the console log and a screenshot when a step fails (default $DENOVM_ARTIFACTS or ./artifacts). */
  artifactsDir?: string;
  /**
   * Boot a Linux kernel even where this host's KVM emulates guest kernel code (kvm_pvm): minutes to
   * its first lines, and it stops on instructions the emulator lacks. Without it, boot() rejects at
   * once with that reason (HostError); run such a VM in the nested KVM host (scripts/nested-kvm.sh).
   */
  allowEmulatedKernel?: boolean;
}

/** What Vm.boot takes: a kernel and any VmConfig fields, plus library-only options. */
export type BootConfig = Partial<Omit<VmConfig, "gpu">> & {
  /** The GPU; unset keys take crosvm's defaults (vmm/config.ts gpuConfig). */
  gpu?: Partial<GpuConfig>;
  kernel: string;
} & LibraryOptions;

/**
 * The host-side resources a restored VM may use instead of the snapshot's: disk images, taps, serial
 * outputs, the control socket, the vsock socket and CID. Each list replaces the saved one and must
 * describe the same devices (as many disks, read-only where they were, ...); a restore whose devices
 * differ from the snapshot's rejects with ConfigError naming the first difference.
 */
export type RestoreOverrides = Partial<Pick<VmConfig, "blocks" | "nets" | "serials" | "socket" | "vsock">>;

/**
 * What Vm.restore and VmTemplate.clone take. The serial set-up is the library's (COM1, captured, echoed
 * with `echoConsole`) unless `serials` overrides it.
 */
export type RestoreConfig = RestoreOverrides & LibraryOptions & {
  /** Start with every vCPU paused (crosvm `run --restore ... --suspended`): vm.resume() lets it run. */
  paused?: boolean;
};

/** What vm.snapshot takes. */
export type VmSnapshotOptions = Pick<SnapshotOptions, "resume">;

/** An input device the library drives: one of the VM's own (--input) or a vhost-user back end's (input_remote.ts). */
export type VmInputDevice = InputDevice | RemoteInput;

/**
 * Keyboard, pointer and touch input through the VM's virtio-input devices: its own (--input / `inputs`)
 * and those served by `denovm device input --event-socket PATH` behind the vhost-user front end
 * (`vhostUser: [{ type: "input", deviceId: 18, socket, eventSocket: PATH }]`). The calls are the same for
 * both, and so are the events the guest reads. Each returns a promise that settles once the device has
 * the events (at once for the VM's own devices; when the back end has answered for a remote one): await
 * it to learn of a failure, or to be sure the events are queued before the next step.
 */
export class VmInput {
  constructor(
    readonly devices: () => VmInputDevice[],
    /** The sockets of vhost-user input back ends the library cannot inject into (no event socket). */
    readonly undrivable: () => string[] = () => [],
  ) {}

  #find(kind: string[], what: string): VmInputDevice {
    const d = this.devices().find((x) => kind.includes(x.kind));
    if (d) return d;
    const blind = this.undrivable();
    if (blind.length > 0) {
      throw new Error(
        `no ${what} input device in this VM takes events from here: the vhost-user input back end on ` +
          `${blind.join(", ")} has no event socket (denovm device input --event-socket PATH, then eventSocket: PATH)`,
      );
    }
    throw new Error(`no ${what} input device in this VM (add inputs: [{ kind: "${kind[0]}" }])`);
  }

  /** Press and release a key by its evdev code (linux/input-event-codes.h KEY_*). */
  key(code: number): Promise<void> {
    const k = this.#find(["keyboard"], "keyboard");
    return settled(k.sendKey(code, true), k.sendKey(code, false));
  }

  /** Hold (down=true) or release a key. */
  keyState(code: number, down: boolean): Promise<void> {
    return settled(this.#find(["keyboard"], "keyboard").sendKey(code, down));
  }

  /** Type text (US layout; shift handled). */
  type(text: string): Promise<void> {
    return settled(this.#find(["keyboard"], "keyboard").type(text));
  }

  /** Relative pointer motion (mouse). */
  move(dx: number, dy: number): Promise<void> {
    return settled(this.#find(["mouse"], "mouse").move(dx, dy));
  }

  /** A button click (BTN_LEFT by default) on the mouse. */
  click(button?: number): Promise<void> {
    return settled(this.#find(["mouse"], "mouse").click(button));
  }

  /** A tap at (x, y) on the touch screen. */
  tap(x: number, y: number): Promise<void> {
    return settled(this.#find(["multi-touch", "single-touch"], "touch").tap(x, y));
  }

  /** The keyboard LEDs the guest set through the status queue (LED_* code -> value). */
  async leds(): Promise<Map<number, number>> {
    const k = this.#find(["keyboard"], "keyboard");
    return k instanceof RemoteInput ? await k.leds() : new Map(k.leds);
  }
}

/**
 * One promise for the results of an input call: resolved for a device of the VM's own, the back end's
 * answers for a remote one. It is marked handled, so a script that does not await it is not ended by a
 * back end's failure; one that awaits it gets the error.
 */
function settled(...results: (boolean | Promise<boolean>)[]): Promise<void> {
  const p = Promise.all(results).then(() => {});
  p.catch(() => {});
  return p;
}

/** The library's default console: COM1, captured, not on this process's stdout or stdin. */
function librarySerial(echo: boolean): SerialConfig {
  return { type: echo ? "stdout" : "sink", hardware: "serial", num: 1, console: true, earlycon: false, stdin: false };
}

export class Vm {
  readonly console: ConsoleLog;
  /** crosvm's exit code once the VM has ended (0 power-off/stop, 32 reset, 33 crash, 34 panic). */
  readonly exitCode: Promise<number>;
  /** Input devices: keyboard, mouse, touch. */
  readonly input: VmInput;
  /** The GPU's copy counters. */
  readonly gpu: { stats: () => object };
  readonly #machine: Machine;
  #agent: Promise<AgentClient> | undefined;
  /** The web display's URL with its access token (gpu displays with mode "web"). */
  webDisplayUrl: string | undefined;
  readonly #artifactsDir: string;

  private constructor(machine: Machine, console: ConsoleLog, artifactsDir: string, remote: RemoteInputs) {
    this.#machine = machine;
    this.console = console;
    this.#artifactsDir = artifactsDir;
    // The VM's own input devices come first: they have the lower virtio-mmio slots.
    this.input = new VmInput(() => [...inputDevicesOf(machine), ...remote.devices], () => remote.undrivable);
    this.gpu = { stats: () => gpuStats(machine) };
    this.exitCode = machine.exitCode.then(async (code) => {
      console.close(`exit code ${code}: ${machine.exitReason}`);
      await remote.close();
      return code;
    });
  }

  /** Build and start a VM. Rejects with ConfigError (bad config) or HostError (no KVM...). */
  static async boot(config: BootConfig): Promise<Vm> {
    const { debugExit, echoConsole, artifactsDir, gpu, allowEmulatedKernel, ...rest } = config;
    const full: VmConfig = {
      ...defaultVmConfig(config.kernel),
      serials: [librarySerial(echoConsole ?? false)],
      ...rest,
      ...(gpu ? { gpu: gpuConfig(gpu) } : {}),
    };
    return await Vm.#launch((opts) => buildMachine(full, opts), { debugExit, artifactsDir, allowEmulatedKernel });
  }

  /**
   * Restore a VM from the snapshot in directory `path` (written by vm.snapshot or `denovm snapshot take`) and
   * start it where the snapshot left it. Its console log starts empty: it holds what the guest prints from
   * here on. Guest memory is mapped copy-on-write from the snapshot, so VMs restored from one snapshot share
   * its pages. Rejects with HostError (a missing or damaged snapshot, no KVM) or ConfigError (`overrides`
   * that do not fit the snapshot's devices).
   */
  static async restore(path: string, config: RestoreConfig = {}): Promise<Vm> {
    const { debugExit, echoConsole, artifactsDir, allowEmulatedKernel, paused, ...overrides } = config;
    const withSerial: RestoreOverrides = { serials: [librarySerial(echoConsole ?? false)], ...overrides };
    return await Vm.#launch(
      (opts) => restoreMachine(path, { ...opts, overrides: withSerial }),
      { debugExit, artifactsDir, allowEmulatedKernel, paused },
    );
  }

  /** Build a machine with the library's console capture, then serve it and start it. */
  static async #launch(
    build: (opts: MachineOptions) => Promise<Machine>,
    lib: LibraryOptions & { paused?: boolean },
  ): Promise<Vm> {
    const holder: { machine?: Machine } = {};
    const log = new ConsoleLog((text) => holder.machine?.sendInput(new TextEncoder().encode(text)));
    const machine = await build({
      onConsoleOutput: (b) => log.push(b),
      debugExit: lib.debugExit,
      noStdin: true,
      emulatedKernel: lib.allowEmulatedKernel ? "allow" : "refuse",
    });
    holder.machine = machine;
    let remote: RemoteInputs;
    try {
      remote = await RemoteInputs.connect(machine.config);
    } catch (e) {
      machine.close();
      throw e;
    }
    const vm = new Vm(machine, log, lib.artifactsDir ?? Deno.env.get("DENOVM_ARTIFACTS") ?? "artifacts", remote);
    try {
      await machine.startControlSocket();
      vm.webDisplayUrl = await startWebDisplay(machine);
      await machine.start({ paused: lib.paused });
    } catch (e) {
      machine.close();
      throw e;
    }
    return vm;
  }

  /**
   * Write a snapshot of the VM to directory `path` (created if missing; an older snapshot there is replaced
   * only once the new one is complete). The VM is suspended meanwhile and runs on afterwards unless
   * `resume: false`, which leaves it suspended until vm.resume().
   */
  async snapshot(path: string, opts: VmSnapshotOptions = {}): Promise<void> {
    await Deno.mkdir(path, { recursive: true });
    await this.#machine.snapshot(path, { resume: opts.resume });
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

  /** Let the VM run again after pause(), a snapshot with `resume: false`, or a restore with `paused: true`. */
  resume(): void {
    this.#machine.resumeDevices();
  }

  /** Stop the VM (as crosvm `stop`); resolves to its exit code (0 unless it had already ended otherwise). */
  async stop(): Promise<number> {
    return await this.#machine.stop();
  }

  /**
   * Run a command in the guest through the guest agent (agent/README.md) on the virtio-console port
   * org.denovm.agent: boot with `agent: true` and start `denovm-agent` in the guest. Waits for the
   * agent's hello first (up to `readyTimeout`, default 60 s).
   */
  async exec(
    cmd: string | string[],
    opts: ExecOptions & { readyTimeout?: number } = {},
  ): Promise<{ code: number; stdout: string; stderr: string }> {
    const port = this.#machine.devices.agentPort;
    if (!port) throw new Error("vm.exec needs the guest agent's port: boot with { agent: true }");
    this.#agent ??= (async () => {
      const client = new AgentClient(port, { maxWrite: AGENT_PORT_INPUT_LIMIT });
      await client.ready({ timeout: opts.readyTimeout ?? 60_000 });
      return client;
    })();
    const client = await this.#agent.catch((e) => {
      this.#agent = undefined;
      throw new Error(`${(e as Error).message}\n--- last console lines ---\n${this.console.tail()}`);
    });
    // A VM that ends while the command runs fails the call at once, not at its timeout.
    const ended = this.exitCode.then((code): never => {
      throw new Error(`exec ${JSON.stringify(cmd)}: the VM ended first (exit code ${code})`);
    });
    try {
      return await Promise.race([client.exec(cmd, opts), ended]);
    } catch (e) {
      const err = e instanceof Error ? e : new Error(String(e));
      const ended = this.exitReason ? `\nthe VM has ended: ${this.exitReason}` : "";
      err.message = `${err.message}${ended}\n--- last console lines ---\n${this.console.tail()}`;
      throw err;
    }
  }

  /** Press the ACPI power button (the guest sees the event; a Linux guest with acpid or systemd powers off). */
  powerButton(): void {
    this.#machine.powerButton();
  }

  /** PNG of the first display (needs --gpu / `gpu`). */
  screenshot(): Promise<Uint8Array> {
    return screenshot(this.#machine);
  }

  /**
   * Wait until the screen satisfies `check`: a predicate over the decoded screenshot, or a reference
   * PNG compared with tolerances. Rejects naming what it waited for, with the last console lines.
   */
  async waitForScreen(
    check: ((img: Image) => boolean) | { reference: Uint8Array } & CompareOptions,
    opts: { timeout?: number; interval?: number; what?: string } = {},
  ): Promise<Image> {
    const timeout = opts.timeout ?? 30_000;
    const deadline = Date.now() + timeout;
    const reference = typeof check === "function" ? undefined : await decodePng(check.reference);
    let last = "no screenshot taken";
    for (;;) {
      const img = await decodePng(await this.screenshot());
      if (typeof check === "function") {
        if (check(img)) return img;
        last = "the predicate was false";
      } else {
        const r = compareImages(img, reference!, check);
        if (r.matches) return img;
        last = r.reason ?? "different";
      }
      if (Date.now() >= deadline) {
        throw new Error(
          `waiting for the screen${opts.what ? ` to show ${opts.what}` : ""}: timed out after ${timeout} ms ` +
            `(${last})\n--- last console lines ---\n${this.console.tail()}`,
        );
      }
      await new Promise((r) => setTimeout(r, opts.interval ?? 100));
    }
  }

  /**
   * Run one step of a test. When it throws, the console log (and a screenshot when there is a
   * display) are saved under the artifacts folder, and the error says where.
   */
  async step<T>(name: string, fn: () => T | Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (e) {
      const dir = `${this.#artifactsDir}/${name.replace(/[^A-Za-z0-9._-]+/g, "_")}`;
      await Deno.mkdir(dir, { recursive: true });
      await Deno.writeTextFile(`${dir}/console.log`, this.console.text);
      try {
        await Deno.writeFile(`${dir}/screenshot.png`, await this.screenshot());
      } catch {
        // no display
      }
      const err = e instanceof Error ? e : new Error(String(e));
      err.message = `step "${name}" failed (console and screenshot saved in ${dir}): ${err.message}`;
      throw err;
    }
  }

  /** Counters: exits served per vCPU, per-device statistics. */
  stats(): Record<string, number> {
    return this.#machine.stats();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.stop();
  }
}

/** What VmTemplate.boot takes beside the VM's configuration. */
export interface TemplateOptions {
  /** Console output that says the guest is ready to be copied (after boot, or after `prepare`'s setup). */
  until: RegExp | string;
  /** How long to wait for `until`, in ms (the console's default wait when unset). */
  timeout?: number;
  /** Run once `until` has appeared, before the snapshot (log in, start a service, ...). */
  prepare?: (vm: Vm) => void | Promise<void>;
  /**
   * The directory to write the snapshot to, kept by close(). By default a new temporary directory, which
   * close() removes.
   */
  snapshotDir?: string;
}

/**
 * A VM booted once to a point worth starting from, kept as a snapshot, to hand out fresh copies: each clone()
 * is a new Vm restored from that snapshot, where the template VM was when `until` appeared. Clones share the
 * snapshot's memory pages (copy-on-write) and can run at once; give each its own writable disk image, control
 * socket and vsock socket through clone()'s overrides when the template VM has them.
 *
 *   await using template = await VmTemplate.boot({ kernel, initrd, agent: true }, { until: /login:/ });
 *   await using vm = await template.clone();
 */
export class VmTemplate implements AsyncDisposable {
  /** The snapshot's directory. */
  readonly path: string;
  readonly #defaults: LibraryOptions;
  readonly #removeOnClose: boolean;
  #closed = false;

  private constructor(path: string, defaults: LibraryOptions, removeOnClose: boolean) {
    this.path = path;
    this.#defaults = defaults;
    this.#removeOnClose = removeOnClose;
  }

  /**
   * Boot `config`, wait for `opts.until` on its console, run `opts.prepare`, snapshot the VM and stop it. On
   * failure the VM is stopped, a temporary snapshot directory removed, and the error (with the last console
   * lines where it is a console wait) passed on.
   */
  static async boot(config: BootConfig, opts: TemplateOptions): Promise<VmTemplate> {
    const { debugExit, echoConsole, artifactsDir, allowEmulatedKernel } = config;
    const defaults: LibraryOptions = { debugExit, echoConsole, artifactsDir, allowEmulatedKernel };
    const path = opts.snapshotDir ?? await Deno.makeTempDir({ prefix: "denovm-template-" });
    const removeOnClose = opts.snapshotDir === undefined;
    try {
      const vm = await Vm.boot(config);
      try {
        await vm.console.waitFor(opts.until, { timeout: opts.timeout });
        await opts.prepare?.(vm);
        await vm.snapshot(path, { resume: false });
      } finally {
        await vm.stop();
      }
    } catch (e) {
      if (removeOnClose) await Deno.remove(path, { recursive: true }).catch(() => {});
      throw e;
    }
    return new VmTemplate(path, defaults, removeOnClose);
  }

  /**
   * A new VM restored from the template's snapshot, running. `config` overrides host-side resources and the
   * library options, which default to those the template was booted with.
   */
  async clone(config: RestoreConfig = {}): Promise<Vm> {
    if (this.#closed) throw new Error(`the template ${this.path} is closed`);
    return await Vm.restore(this.path, { ...this.#defaults, ...config });
  }

  /**
   * No more clones. Removes the snapshot directory if the template made it; clones still running keep
   * their memory (their mappings hold the file).
   */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#removeOnClose) await Deno.remove(this.path, { recursive: true });
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}
