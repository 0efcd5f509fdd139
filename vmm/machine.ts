// A built VM's lifecycle (vmm/builder.ts builds it): start the vCPUs, pause, resume, stop, the
// power button, how and why the VM ended, and the release of everything it holds.

import { closeFd, installKickHandler } from "../ffi/libc.ts";
import {
  EXIT_GUEST_PANIC,
  EXIT_SUCCESS,
  EXIT_VM_CRASH,
  EXIT_VM_RESET,
  ExitCodeError,
  HostError,
} from "../core/exit.ts";
import type { OwnedGuestMemory } from "../core/memory.ts";
import type { DeviceState } from "../core/state.ts";
import { IRQ_ACPI_SCI, IRQ_ACPI_SLEEP_BUTTON, IRQ_ACPI_VMGENID } from "./arch/layout.ts";
import { generationIdHex, newGenerationId, readGenerationId, writeGenerationId } from "./arch/vmgenid.ts";
import type { VmConfig } from "./config.ts";
import { ControlServer, controlSocketPath } from "./control/server.ts";
import { machineControlHandler } from "./control/handler.ts";
import type { GuestRequest } from "./device_manager/legacy.ts";
import type { DeviceManager } from "./device_manager/manager.ts";
import { Vcpu, type VcpuEnd } from "./kvm/vcpu.ts";
import { releaseVcpuWorker } from "./kvm/worker_pool.ts";
import {
  CMD_PAUSE,
  CMD_RUN,
  CMD_STOP,
  CTL_COMMAND,
  CTL_PAUSED,
  CTL_SLOTS,
  type VcpuDebugMessage,
} from "./kvm/vcpu_channel.ts";
import type { Kvm, KvmVm, VmHandle } from "./kvm/vm.ts";
import { saveVcpuState, snapshotMsrs, vcpuStateCaps } from "./kvm/vcpu_state.ts";
import { writeSnapshot } from "./snapshot/format.ts";

/** How long stop() waits for vCPU Workers to leave KVM_RUN before terminating them. */
const STOP_GRACE_MS = 2000;
/** How often pause() looks whether every vCPU has parked, and suspendDevices() whether the devices are idle. */
const PAUSE_POLL_MS = 2;
/** How long suspendDevices() waits for the devices to finish the requests they hold. */
const DEVICE_QUIESCE_TIMEOUT_MS = 5000;

/**
 * What a machine built on a VmHandle without KVM (MachineOptions.vm) saves in each configured vCPU's place: it
 * has no vCPUs, and a snapshot holds one record per vCPU. A restore on KVM refuses it (it wants "kvm-vcpu").
 */
const NO_VCPU_STATE: DeviceState = { type: "no-vcpu", version: 1, data: null };

/** The exit code (crosvm's) and reason of each request the guest makes through a device. */
const GUEST_REQUEST_EXIT: Record<GuestRequest, number> = {
  "power-off": EXIT_SUCCESS,
  "reset": EXIT_VM_RESET,
  "panic": EXIT_GUEST_PANIC,
};

/** What the builder hands a Machine. */
export interface MachineParts {
  config: VmConfig;
  /** Absent for a machine built on a VmHandle without KVM (MachineOptions.vm): no vCPUs. */
  kvm: Kvm | undefined;
  vm: VmHandle;
  memory: OwnedGuestMemory;
  /** The kernel command line the guest received. */
  cmdline: string;
  devices: DeviceManager;
  /** The vCPU fds, in vCPU id order, set up to boot. */
  vcpuFds: number[];
  /** vCPU Workers spawned while the VM was built, not yet given their vCPU. */
  idleWorkers: Worker[];
  /** Serve the test guests' debug exit port. */
  debugExit: boolean;
  log: (line: string) => void;
}

/** How start() starts the vCPUs. */
export interface StartOptions {
  /** Start with every vCPU paused (crosvm `run --restore ... --suspended`): resume() lets them run. */
  paused?: boolean;
}

/** What Machine.snapshot() does around the save. */
export interface SnapshotOptions {
  /**
   * After the snapshot is written, put the VM back as it was found (default true: a running VM runs on, a
   * suspended one stays suspended, vCPUs and devices each); false leaves it suspended (vCPUs and devices).
   */
  resume?: boolean;
  /** crosvm's `--compress-memory`: accepted; the memory file is written sparse either way. */
  compressMemory?: boolean;
}

export class Machine {
  readonly config: VmConfig;
  readonly memory: OwnedGuestMemory;
  readonly devices: DeviceManager;
  readonly cmdline: string;
  readonly #kvm: Kvm | undefined;
  readonly #vm: VmHandle;
  readonly #vcpuFds: number[];
  #idleWorkers: Worker[];
  readonly #debugExit: boolean;
  readonly #vcpus: Vcpu[] = [];
  readonly #control = new SharedArrayBuffer(CTL_SLOTS * 4);
  readonly #ctl = new Int32Array(this.#control);
  readonly #log: (line: string) => void;
  readonly #onClose: (() => void)[] = [];
  #exitResolve!: (code: number) => void;
  #exitCode: number | undefined;
  #closed = false;
  #controlServer: ControlServer | undefined;
  #debugStop: ((vcpu: number, stop: VcpuDebugMessage) => void) | undefined;
  #devicesAsleep = false;
  #snapshotting = false;
  /** resume() / resumeDevices() asked for while a snapshot was being taken: done once it is saved. */
  #resumeAsked = false;
  #wakeAsked = false;
  /** Resolves with crosvm's exit code when the VM ends. */
  readonly exitCode: Promise<number>;
  /** Why the VM ended, one line (for the library and logs). */
  exitReason = "";

  /** Takes over everything in `parts`; the device manager's guest requests end this machine. */
  constructor(parts: MachineParts, bindGuestRequests: (handler: (r: GuestRequest, reason: string) => void) => void) {
    this.config = parts.config;
    this.memory = parts.memory;
    this.devices = parts.devices;
    this.cmdline = parts.cmdline;
    this.#kvm = parts.kvm;
    this.#vm = parts.vm;
    this.#vcpuFds = parts.vcpuFds;
    this.#idleWorkers = parts.idleWorkers;
    this.#debugExit = parts.debugExit;
    this.#log = parts.log;
    this.exitCode = new Promise((r) => this.#exitResolve = r);
    bindGuestRequests((request, reason) => this.#end(GUEST_REQUEST_EXIT[request], reason));
  }

  /**
   * Start the vCPUs; resolves when every Worker is in its loop (or the VM has ended meanwhile).
   *
   * The boot vCPU runs first; the others' Workers are taken from the pool (vmm/kvm/worker_pool.ts) after it
   * runs. Creating a Worker (when the pool has none) blocks this thread while Deno builds the Worker's
   * runtime, so creating all of them before
   * starting would hold the guest back by that much per vCPU, while the guest needs its other vCPUs
   * only when it starts them with INIT/SIPI. KVM keeps an INIT/SIPI sent to a vCPU that is not in
   * KVM_RUN yet and acts on it when the vCPU enters.
   */
  async start(opts: StartOptions = {}): Promise<void> {
    if (opts.paused) Atomics.store(this.#ctl, CTL_COMMAND, CMD_PAUSE);
    if (!this.#kvm) {
      // Built on MachineOptions.vm: the device side runs, there are no vCPUs.
      this.devices.start();
      return;
    }
    installKickHandler();
    const runSize = this.#kvm.vcpuMmapSize;
    const workers = this.#idleWorkers.splice(0);
    const workerDevices = this.devices.workerDevices();
    const startVcpu = (id: number): Promise<unknown> => {
      const v = new Vcpu({
        worker: workers[id],
        id,
        vcpuFd: this.#vcpuFds[id],
        runSize,
        control: this.#control,
        pio: this.devices.pio,
        mmio: this.devices.mmio,
        debugExit: this.#debugExit,
        devices: workerDevices,
        deviceWake: () => this.devices.workerWake(),
        onDebug: (stop) => this.#debugStop?.(id, stop),
      });
      this.#vcpus.push(v);
      v.ended.then((end) => this.#vcpuEnded(id, end));
      // A vCPU that ends before it reports ready (the VM stopped meanwhile) does not hold start() up.
      return Promise.race([v.ready, v.ended]);
    };
    await startVcpu(0);
    this.devices.start();
    // One at a time: the boot vCPU's exits that need this thread wait while a Worker is created.
    // Once the VM has ended (#end sets the exit code before it stops the vCPUs) no more are started.
    for (let id = 1; id < this.#vcpuFds.length; id++) {
      if (this.#exitCode !== undefined || this.#closed) break;
      await startVcpu(id);
    }
  }

  #vcpuEnded(id: number, end: VcpuEnd): void {
    switch (end.kind) {
      case "stopped":
        return; // we asked for it
      case "shutdown":
        return this.#end(EXIT_SUCCESS, `vcpu ${id}: guest shut down`);
      case "reset":
        return this.#end(EXIT_VM_RESET, `vcpu ${id}: guest reset`);
      case "debug-exit":
        return this.#end(end.code, `vcpu ${id}: debug exit ${end.code}`);
      case "crash":
        this.#log(`VM crashed: ${end.detail}`);
        return this.#end(EXIT_VM_CRASH, end.detail.split("\n")[0]);
    }
  }

  /** End the VM with `code` (first reason wins) and tear it down. */
  #end(code: number, reason: string): void {
    if (this.#exitCode !== undefined) return;
    this.#exitCode = code;
    this.exitReason = reason;
    this.#shutdown().finally(() => this.#exitResolve(code));
  }

  async #shutdown(): Promise<void> {
    Atomics.store(this.#ctl, CTL_COMMAND, CMD_STOP);
    Atomics.notify(this.#ctl, CTL_COMMAND);
    for (const v of this.#vcpus) v.kick();
    const all = Promise.all(this.#vcpus.map((v) => v.ended));
    let timer: ReturnType<typeof setTimeout> | undefined;
    await Promise.race([all, new Promise((r) => timer = setTimeout(r, STOP_GRACE_MS))]);
    clearTimeout(timer);
    const stuck = this.#vcpus.filter((v) => !v.isEnded);
    for (const v of stuck) v.terminate();
    if (stuck.length) this.devices.legacy.releaseLocksOfEndedVcpus();
    this.close();
  }

  /** Stop the VM from the host (crosvm `stop`): exit code 0. */
  async stop(): Promise<number> {
    this.#end(EXIT_SUCCESS, "stopped by the host");
    return await this.exitCode;
  }

  /** Pause every vCPU (crosvm `suspend`); resolves when all are parked. */
  async pause(): Promise<void> {
    Atomics.store(this.#ctl, CTL_COMMAND, CMD_PAUSE);
    for (const v of this.#vcpus) v.kick();
    // Polled with timers: Atomics.waitAsync does not keep Deno's event loop alive (see vcpu_channel.ts).
    while (Atomics.load(this.#ctl, CTL_PAUSED) < this.#vcpus.filter((v) => !v.isEnded).length) {
      if (this.#exitCode !== undefined) return;
      await new Promise((r) => setTimeout(r, PAUSE_POLL_MS));
    }
  }

  /**
   * crosvm `suspend --full` (its SuspendVm): pause every vCPU, stop handing the guest's queue notifications to
   * the devices, and wait until every device has finished what it holds (Stateful.quiescent). Rejects,
   * naming the devices, if one is still busy after DEVICE_QUIESCE_TIMEOUT_MS; the VM stays suspended.
   */
  async suspendDevices(): Promise<void> {
    await this.pause();
    this.#devicesAsleep = true;
    this.devices.sleep();
    const deadline = Date.now() + DEVICE_QUIESCE_TIMEOUT_MS;
    for (let busy = this.devices.busy(); busy.length > 0; busy = this.devices.busy()) {
      if (this.#exitCode !== undefined) return;
      if (Date.now() >= deadline) {
        throw new Error(`devices still busy after ${DEVICE_QUIESCE_TIMEOUT_MS} ms: ${busy.join(", ")}`);
      }
      await new Promise((r) => setTimeout(r, PAUSE_POLL_MS));
    }
  }

  /** crosvm `resume --full` (its ResumeVm): the devices take the guest's notifications again, then the vCPUs run. */
  resumeDevices(): void {
    if (this.#snapshotting) {
      this.#wakeAsked = this.#resumeAsked = true;
      return;
    }
    if (this.#devicesAsleep) {
      this.#devicesAsleep = false;
      this.devices.wake();
    }
    this.resume();
  }

  /** True between suspendDevices() and resumeDevices(). */
  get devicesAsleep(): boolean {
    return this.#devicesAsleep;
  }

  /**
   * Write a snapshot of the VM to directory `dir` (vmm/snapshot/): suspend the vCPUs and devices, save the
   * vCPUs, the in-kernel irqchip, PIT and clock, every device, guest memory and the configuration, then resume
   * unless `opts.resume` is false.
   */
  async snapshot(dir: string, opts: SnapshotOptions = {}): Promise<void> {
    if (this.#exitCode !== undefined || this.#closed) throw new Error("the VM has ended");
    if (this.#snapshotting) throw new Error("a snapshot of this VM is already being taken");
    this.#snapshotting = true;
    const wasPaused = this.paused;
    const wasAsleep = this.#devicesAsleep;
    try {
      await this.suspendDevices();
      if (this.#exitCode !== undefined) throw new Error("the VM ended while it was being suspended");
      // Every vCPU is out of KVM_RUN and parked, and no device holds a request: the state is whole.
      const kvm = this.#kvm;
      const msrs = kvm ? snapshotMsrs(kvm) : [];
      const caps = kvm ? vcpuStateCaps(this.#vm as KvmVm) : undefined;
      const vcpus = caps
        ? this.#vcpuFds.map((fd, id) => saveVcpuState(fd, id, msrs, caps))
        : Array.from({ length: this.config.cpus }, () => NO_VCPU_STATE);
      writeSnapshot(dir, {
        config: this.config,
        memory: this.memory,
        vm: this.#vm.saveState(),
        vcpus,
        devices: this.devices.saveState(),
        vmgenid: generationIdHex(readGenerationId(this.memory)),
      });
    } finally {
      this.#snapshotting = false;
      // Back to how the VM was (a VM the user had suspended stays suspended), unless opts.resume is false; a
      // resume asked for meanwhile (control socket, debugger) is done now, not while the state was saved.
      const back = opts.resume !== false;
      const wake = (back && !wasAsleep) || this.#wakeAsked;
      const run = (back && !wasPaused) || this.#resumeAsked;
      this.#wakeAsked = this.#resumeAsked = false;
      if (wake) {
        this.#devicesAsleep = false;
        this.devices.wake();
      }
      if (run) this.resume();
    }
  }

  /** Resume after pause (crosvm `resume`); while a snapshot is being taken, once it is saved. */
  resume(): void {
    if (this.#snapshotting) {
      this.#resumeAsked = true;
      return;
    }
    if (Atomics.load(this.#ctl, CTL_COMMAND) !== CMD_PAUSE) return;
    Atomics.store(this.#ctl, CTL_COMMAND, CMD_RUN);
    Atomics.notify(this.#ctl, CTL_COMMAND);
  }

  get paused(): boolean {
    return Atomics.load(this.#ctl, CTL_COMMAND) === CMD_PAUSE;
  }

  /** How many vCPUs the VM has (started or not). */
  get vcpuCount(): number {
    return this.#vcpuFds.length;
  }

  /**
   * A vCPU's fd, for a debugger's register reads and KVM_SET_GUEST_DEBUG; use it only while the VM is
   * paused (every vCPU out of KVM_RUN) or before start().
   */
  vcpuFd(id: number): number {
    const fd = this.#vcpuFds[id];
    if (fd === undefined) throw new RangeError(`no vCPU ${id}`);
    return fd;
  }

  /**
   * Hear KVM_EXIT_DEBUG stops (a debugger's breakpoint or single step): the stopping vCPU has already
   * paused the VM's command and parked; the handler pauses the others (pause()) and later resume()s.
   */
  onDebugStop(handler: ((vcpu: number, stop: VcpuDebugMessage) => void) | undefined): void {
    this.#debugStop = handler;
  }

  /** Whether the VM has ended (its exit code is set). */
  get ended(): boolean {
    return this.#exitCode !== undefined;
  }

  /** Press the ACPI power button: the GED's interrupt runs _EVT, which notifies \_SB.PWRB (vmm/arch/acpi.ts). */
  powerButton(): void {
    if (this.#exitCode !== undefined) throw new Error("the VM has ended");
    this.#vm.pulseIrq(IRQ_ACPI_SCI);
  }

  /**
   * Press the ACPI sleep button (crosvm `sleepbtn`): the GED's second interrupt runs _EVT, which notifies
   * \_SB.SLPB (vmm/arch/acpi.ts). What the guest does with it is its own policy (Linux: an input key event).
   */
  sleepButton(): void {
    if (this.#exitCode !== undefined) throw new Error("the VM has ended");
    this.#vm.pulseIrq(IRQ_ACPI_SLEEP_BUTTON);
  }

  /**
   * Give the VM a new generation ID (vmm/arch/vmgenid.ts) and tell the guest: the GED's third interrupt runs _EVT,
   * which notifies \_SB.VGEN (vmm/arch/acpi.ts); Linux then reads the ID and reseeds its RNG. A restore calls it
   * after the in-kernel irqchip's and the vCPUs' state are set (setting the IOAPIC or a local APIC afterwards would
   * drop the interrupt); raised while the vCPUs are paused, it waits in the local APIC until they run. Returns the
   * new ID.
   */
  changeGenerationId(): Uint8Array {
    if (this.#exitCode !== undefined) throw new Error("the VM has ended");
    const id = newGenerationId();
    writeGenerationId(this.memory, id);
    this.#vm.pulseIrq(IRQ_ACPI_VMGENID);
    return id;
  }

  /**
   * Serve the control socket (-s/--socket) until the VM ends. A directory given as the socket gets crosvm's
   * name inside it (controlSocketPath). The file is removed however the VM or the process ends, short of
   * SIGKILL (server.ts).
   */
  async startControlSocket(): Promise<void> {
    if (!this.config.socket) return;
    let server: ControlServer;
    try {
      server = new ControlServer(controlSocketPath(this.config.socket), machineControlHandler(this));
      await server.listening;
    } catch (e) {
      // A socket that cannot be created (a missing directory, no permission) is a host fault: exit 1.
      if (e instanceof ExitCodeError) throw e;
      throw new HostError(`--socket ${this.config.socket}: cannot listen: ${(e as Error).message.split("\n")[0]}`);
    }
    this.#controlServer = server;
  }

  /** The control socket's path while it is served. */
  get controlSocket(): string | undefined {
    return this.#controlServer?.path;
  }

  /** Send bytes to a serial port's input (COM1 by default). */
  sendInput(bytes: Uint8Array, num = 1): void {
    this.devices.legacy.sendInput(bytes, num);
  }

  /** Exit counters per vCPU (exits served on the main thread) and the devices' counters. */
  stats(): Record<string, number> {
    const out: Record<string, number> = {};
    this.#vcpus.forEach((v, i) => {
      out[`vcpu${i}.pio_exits`] = v.counters.pio;
      out[`vcpu${i}.mmio_exits`] = v.counters.mmio;
    });
    return { ...out, ...this.devices.stats() };
  }

  /** True once close() has run. */
  get closed(): boolean {
    return this.#closed;
  }

  /** Run `fn` when the machine releases its resources (at once if it already has). */
  onClose(fn: () => void): void {
    if (this.#closed) fn();
    else this.#onClose.push(fn);
  }

  /** Release every host resource. Safe to call twice. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const w of this.#idleWorkers.splice(0)) releaseVcpuWorker(w);
    void this.#controlServer?.close();
    for (const fn of this.#onClose.splice(0)) {
      try {
        fn();
      } catch (e) {
        this.#log(`on close: ${(e as Error).message}`);
      }
    }
    this.devices.close();
    this.#vcpuFds.forEach(closeFd);
    this.#vm.close();
    this.#kvm?.close();
    this.memory.close();
  }
}
