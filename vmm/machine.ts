// Assembling and running a VM from a VmConfig: guest memory, kernel and initrd,
// boot structures and firmware tables, the KVM VM and its vCPU Workers, legacy
// devices on the port bus and virtio-mmio transports on the MMIO bus.

import { closeFd, eventfd, eventfdRead, eventfdWrite, pollAsync, POLLIN } from "../ffi/libc.ts";
import { Cmos, CMOS_PORT_SPAN } from "../devices/legacy/cmos.ts";
import { I8042, I8042_PORT_SPAN } from "../devices/legacy/i8042.ts";
import { ACPI_PM_PORT_SPAN, AcpiPm } from "../devices/legacy/acpi_pm.ts";
import { PvPanic } from "../devices/legacy/pvpanic.ts";
import { Serial, UART_REGISTER_COUNT } from "../devices/legacy/serial.ts";
import { type SharedMemoryMapper, VIRTIO_ID_GPU, type VirtioDevice } from "../devices/virtio/device.ts";
import { VIRTIO_MMIO_QUEUE_NOTIFY, VirtioMmioTransport } from "../devices/virtio/mmio.ts";
import type { ConsolePort } from "../devices/virtio/console.ts";
import type { GpuDevice } from "../devices/virtio/gpu/device.ts";
import { InputDevice } from "../devices/virtio/input.ts";
import type { WebDisplay } from "./ui/web_display/server.ts";
import { virtioMmioCmdlineArgs, writeAcpiTables } from "./arch/acpi.ts";
import { GuestTooSmallError, KernelFormatError, loadInitrd, loadKernel, writeBootParams } from "./arch/boot/kernel.ts";
import { Bus } from "../core/bus.ts";
import { kernelCommandLine, type VmConfig } from "./config.ts";
import {
  ConfigError,
  EXIT_GUEST_PANIC,
  EXIT_SUCCESS,
  EXIT_VM_CRASH,
  EXIT_VM_RESET,
  exitCodeFor,
} from "../core/exit.ts";
import {
  setBootFpu,
  setBootMsrs,
  setBootRegisters,
  setCpuid,
  setLapicLints,
  vcpuCpuid,
  writeBootTables,
} from "./arch/cpu.ts";
import {
  ACPI_RSDP_START,
  ACPI_SLEEP_CONTROL_PORT,
  CMOS_INDEX_PORT,
  e820Map,
  GiB,
  GUEST_PHYS_LIMIT,
  I8042_DATA_PORT,
  IRQ_ACPI_SCI,
  MiB,
  PVPANIC_PORT,
  ramRanges,
  SERIAL_PORTS,
  sharedMemoryAreaStart,
  VIRTIO_IRQS,
  VIRTIO_MMIO_SIZE,
  VIRTIO_MMIO_START,
} from "./arch/layout.ts";
import { OwnedGuestMemory } from "../core/memory.ts";
import { writeMpTable } from "./arch/mptable.ts";
import { ControlServer } from "./control/server.ts";
import { machineControlHandler } from "./control/handler.ts";
import { HostIo } from "./device_manager/host_io.ts";
import { createVirtioDevices } from "./device_manager/virtio_devices.ts";
import { spawnVcpuWorker, Vcpu, type VcpuEnd } from "./kvm/vcpu.ts";
import {
  CMD_PAUSE,
  CMD_RUN,
  CMD_STOP,
  CTL_COMMAND,
  CTL_PAUSED,
  CTL_SLOTS,
  type VcpuSerial,
  type VirtioInterruptCells,
} from "./kvm/vcpu_channel.ts";
import { Kvm, Vm } from "./kvm/vm.ts";
import { installKickHandler } from "../ffi/libc.ts";

/** What Machine needs of a VM (vmm/kvm/vm.ts Vm): memory slots, interrupt lines, irqfd and ioeventfd. */
export type VmHandle = Pick<
  Vm,
  | "addGuestMemory"
  | "addSlot"
  | "removeSlot"
  | "pulseIrq"
  | "registerIrqfd"
  | "registerIoeventfd"
  | "createVcpu"
  | "close"
>;

export { ConfigError, exitCodeFor };

/** How long stop() waits for vCPU Workers to leave KVM_RUN before terminating them. */
const STOP_GRACE_MS = 2000;
/** Alignment of each device's shared-memory window in guest-physical space. */
const SHM_WINDOW_ALIGN = GiB;
/** How often pause() looks whether every vCPU has parked. */
const PAUSE_POLL_MS = 2;

export interface MachineOptions {
  /** Called with every byte a console serial port transmits (the library's console capture). */
  onConsoleOutput?: (bytes: Uint8Array) => void;
  /** Serve the test guests' debug exit port. */
  debugExit?: boolean;
  /** Do not read the process's stdin even when a serial port asks for it (library use). */
  noStdin?: boolean;
  /**
   * Build on this VM instead of opening /dev/kvm. Such a machine has devices, buses and guest memory
   * but no vCPUs: start() runs only its device side. Tests use it to drive the assembled devices as
   * a guest would.
   */
  vm?: VmHandle;
  /** One-line log messages (defaults to stderr). */
  log?: (line: string) => void;
}

interface VirtioSlot {
  device: VirtioDevice;
  transport: VirtioMmioTransport;
  base: number;
  irq: number;
  irqFd: number;
  notifyFds: number[];
}

async function readUserFile(what: string, path: string): Promise<Uint8Array> {
  try {
    return await Deno.readFile(path);
  } catch (e) {
    throw new ConfigError(`cannot read ${what} ${path}: ${(e as Error).message}`);
  }
}

export class Machine {
  readonly memory: OwnedGuestMemory;
  readonly pio = new Bus("port I/O");
  readonly mmio = new Bus("MMIO");
  readonly serials: Serial[] = [];
  readonly virtio: VirtioSlot[] = [];
  /** vCPU Workers spawned by create(), not yet given their vCPU by start(). */
  #idleWorkers: Worker[] = [];
  /** The UARTs as the vCPU workers serve them (see VcpuSerial), irqfds included. */
  readonly #vcpuSerials: VcpuSerial[] = [];
  /** The transports' shared InterruptStatus cells (see vcpu_channel.ts VirtioInterruptCells). */
  #virtioInterrupts: VirtioInterruptCells | undefined;
  readonly cmdline: string;
  readonly #kvm: Kvm | undefined;
  readonly #vm: VmHandle;
  readonly #vcpuFds: number[] = [];
  readonly #vcpus: Vcpu[] = [];
  readonly #control = new SharedArrayBuffer(CTL_SLOTS * 4);
  readonly #ctl = new Int32Array(this.#control);
  readonly #log: (line: string) => void;
  #exitResolve!: (code: number) => void;
  #exitCode: number | undefined;
  #closed = false;
  #controlServer: ControlServer | undefined;
  #webDisplay: WebDisplay | undefined;
  /** Resolves with crosvm's exit code when the VM ends. */
  readonly exitCode: Promise<number>;
  /** The guest agent's console port (config.agent). */
  agentPort: ConsolePort | undefined;
  /** Why the VM ended, one line (for the library and logs). */
  exitReason = "";

  private constructor(
    readonly config: VmConfig,
    readonly opts: MachineOptions,
    kvm: Kvm | undefined,
    vm: VmHandle,
    memory: OwnedGuestMemory,
    cmdline: string,
    readonly hostIo: HostIo,
  ) {
    this.#kvm = kvm;
    this.#vm = vm;
    this.memory = memory;
    this.cmdline = cmdline;
    this.#log = opts.log ?? ((l) => console.error(`denovm: ${l}`));
    this.exitCode = new Promise((r) => this.#exitResolve = r);
  }

  /** Build a VM ready to start. Throws ConfigError (exit 35) or HostError (exit 1). */
  static async create(config: VmConfig, opts: MachineOptions = {}): Promise<Machine> {
    const memBytes = config.memMiB * MiB;
    if (!Number.isInteger(config.cpus) || config.cpus < 1) throw new ConfigError(`invalid vCPU count ${config.cpus}`);
    const kernelImage = await readUserFile("kernel", config.kernel);
    const initrdImage = config.initrd ? await readUserFile("initrd", config.initrd) : undefined;

    // Everything that only needs the user's files is checked before KVM is opened, so bad input
    // gets exit 35 on any host.
    let kvm: Kvm | undefined;
    let vm: VmHandle | undefined;
    let memory: OwnedGuestMemory | undefined;
    let devices: VirtioDevice[] = [];
    let agentPort: ConsolePort | undefined;
    let machine: Machine | undefined;
    const hostIo = new HostIo(config.serials, { onConsoleOutput: opts.onConsoleOutput, noStdin: opts.noStdin });
    // The boot vCPU's Worker starts loading now, on its own thread, while this one builds the VM; start()
    // hands it its vCPU. The other vCPUs' Workers are created once the boot vCPU runs (see start()).
    const workers = opts.vm ? [] : [spawnVcpuWorker()];
    try {
      memory = OwnedGuestMemory.allocate(ramRanges(memBytes));
      let kernel;
      try {
        kernel = loadKernel(memory, kernelImage);
      } catch (e) {
        if (e instanceof KernelFormatError) throw new ConfigError(`kernel ${config.kernel}: ${e.message}`);
        if (e instanceof GuestTooSmallError) {
          throw new ConfigError(`--mem ${config.memMiB} MiB is too small for kernel ${config.kernel}: ${e.message}`);
        }
        throw e;
      }
      let initrd;
      if (initrdImage) {
        try {
          const below4g = ramRanges(memBytes)[0].size;
          initrd = loadInitrd(memory, initrdImage, kernel, below4g);
        } catch (e) {
          if (e instanceof GuestTooSmallError) {
            throw new ConfigError(`--mem ${config.memMiB} MiB is too small for initrd ${config.initrd}: ${e.message}`);
          }
          throw e;
        }
      }
      const created = await createVirtioDevices(config, {
        serialOutput: (s) => hostIo.output(s),
        defaultVsockPath: `${config.socket ?? `/tmp/denovm-${Deno.pid}`}.vsock`,
      });
      devices = created.devices;
      agentPort = created.agentPort;
      for (const c of created.consoles) await hostIo.attachInput(c.serial, (b) => c.device.sendInput(b));
      const resources = devices.map((_, i) => ({
        base: VIRTIO_MMIO_START + i * VIRTIO_MMIO_SIZE,
        size: VIRTIO_MMIO_SIZE,
        irq: VIRTIO_IRQS[i],
      }));
      if (devices.length > VIRTIO_IRQS.length) {
        throw new ConfigError(`${devices.length} virtio devices requested; at most ${VIRTIO_IRQS.length} fit`);
      }
      const serialPorts = config.serials.filter((s) => s.hardware === "serial").map((s) => SERIAL_PORTS[s.num - 1]);
      const cmdline = kernelCommandLine(config, config.virtioMmioCmdline ? virtioMmioCmdlineArgs(resources) : []);
      try {
        writeBootParams(memory, { kernel, cmdline, initrd, e820: e820Map(memBytes), acpiRsdp: ACPI_RSDP_START });
      } catch (e) {
        if (e instanceof RangeError) throw new ConfigError(e.message);
        throw e;
      }
      writeBootTables(memory);
      writeMpTable(memory, config.cpus);
      // Devices named on the command line are not also listed in the DSDT: Linux would probe them twice.
      const acpiVirtio = config.virtioMmioCmdline ? [] : resources;
      writeAcpiTables(memory, { cpus: config.cpus, virtioMmio: acpiVirtio, serial: serialPorts });

      if (opts.vm) {
        vm = opts.vm;
      } else {
        kvm = new Kvm();
        const max = kvm.maxVcpus;
        if (config.cpus > max) throw new ConfigError(`${config.cpus} vCPUs requested; this host's KVM allows ${max}`);
        vm = new Vm(kvm);
      }
      vm.addGuestMemory(memory);
      machine = new Machine(config, opts, kvm, vm, memory, cmdline, hostIo);
      machine.#idleWorkers = workers;
      machine.agentPort = agentPort;
      await machine.#addLegacyDevices();
      machine.#addVirtioDevices(devices, resources);
      if (kvm) machine.#createVcpus(kvm, kernel.entry);
      return machine;
    } catch (e) {
      if (machine) {
        // close() releases what the machine took over (devices on its bus, irqfds, vCPU fds, the VM, memory).
        const adopted = new Set(machine.virtio.map((v) => v.device));
        for (const d of devices) if (!adopted.has(d)) d.close?.();
        machine.close();
        throw e;
      }
      for (const w of workers) w.terminate();
      for (const d of devices) d.close?.();
      hostIo.close();
      vm?.close();
      memory?.close();
      kvm?.close();
      throw e;
    }
  }

  async #addLegacyDevices(): Promise<void> {
    for (const s of this.config.serials) {
      if (s.hardware !== "serial") continue; // virtio-console ports come with the virtio devices
      const port = SERIAL_PORTS[s.num - 1];
      // The UART's interrupt is an irqfd, so that a vCPU thread serving the guest's accesses raises it
      // as the main thread does.
      const irqFd = eventfd();
      this.#vm.registerIrqfd(irqFd, port.irq);
      const serial = new Serial({ interrupt: () => eventfdWrite(irqFd), output: await this.hostIo.output(s) });
      this.#vcpuSerials.push({ base: port.base, state: serial.state, irqFd });
      this.serials[s.num - 1] = serial;
      this.pio.add(port.base, UART_REGISTER_COUNT, serial, `COM${s.num}`);
      await this.hostIo.attachInput(s, (b) => serial.enqueueInput(b));
    }
    this.pio.add(
      I8042_DATA_PORT,
      I8042_PORT_SPAN,
      new I8042(() => this.#end(EXIT_VM_RESET, "guest reset (i8042)")),
      "i8042",
    );
    this.pio.add(CMOS_INDEX_PORT, CMOS_PORT_SPAN, new Cmos(), "cmos");
    this.pio.add(
      ACPI_SLEEP_CONTROL_PORT,
      ACPI_PM_PORT_SPAN,
      new AcpiPm({
        powerOff: () => this.#end(EXIT_SUCCESS, "guest powered off (ACPI S5)"),
        reset: () => this.#end(EXIT_VM_RESET, "guest reset (ACPI reset register)"),
        log: this.#log,
      }),
      "acpi-pm",
    );
    this.pio.add(
      PVPANIC_PORT,
      1,
      new PvPanic(() => this.#end(EXIT_GUEST_PANIC, "guest panicked (pvpanic)"), this.#log),
      "pvpanic",
    );
  }

  #addVirtioDevices(devices: VirtioDevice[], resources: { base: number; size: number; irq: number }[]): void {
    // Shared-memory regions (the GPU's host-visible window) get guest windows above RAM, one after another.
    let shmNext = sharedMemoryAreaStart(this.config.memMiB * MiB);
    // InterruptStatus of every transport, shared with the vCPU workers, which answer the status read
    // and the ACK write of each interrupt themselves.
    const cells = new SharedArrayBuffer(Math.max(1, devices.length) * Int32Array.BYTES_PER_ELEMENT);
    this.#virtioInterrupts = { cells, bases: resources.slice(0, devices.length).map((r) => r.base) };
    const cellArray = new Int32Array(cells);
    devices.forEach((device, i) => {
      const { base, irq } = resources[i];
      const irqFd = eventfd();
      this.#vm.registerIrqfd(irqFd, irq);
      const windows = new Map<number, { base: number; size: number }>();
      for (const r of device.sharedMemoryRegions?.() ?? []) {
        const start = Math.ceil(shmNext / SHM_WINDOW_ALIGN) * SHM_WINDOW_ALIGN;
        if (start + r.size > GUEST_PHYS_LIMIT) {
          throw new ConfigError(`no guest address room for ${device.name}'s window`);
        }
        windows.set(r.id, { base: start, size: r.size });
        shmNext = start + r.size;
      }
      if (windows.size > 0) device.setSharedMemoryMapper?.(this.#shmMapper(device.name, windows));
      const transport = new VirtioMmioTransport(device, this.memory, {
        irq: { trigger: () => eventfdWrite(irqFd) },
        interruptCell: { cells: cellArray, index: i },
        shmBase: (id) => windows.get(id)?.base,
      });
      const notifyFds = device.queueMaxSizes.map((_, q) => {
        const fd = eventfd();
        this.#vm.registerIoeventfd(fd, base + VIRTIO_MMIO_QUEUE_NOTIFY, 4, q);
        return fd;
      });
      this.mmio.add(base, VIRTIO_MMIO_SIZE, transport, `virtio-${device.name}`);
      this.virtio.push({ device, transport, base, irq, irqFd, notifyFds });
    });
  }

  /** Installs a device's mappings into its windows as KVM memory slots; the device never calls KVM. */
  #shmMapper(name: string, windows: Map<number, { base: number; size: number }>): SharedMemoryMapper {
    const slots = new Map<string, number>();
    return {
      addMapping: (id, offset, hostAddr, length, writable) => {
        const w = windows.get(id);
        if (!w || offset < 0 || length <= 0 || offset + length > w.size) {
          throw new Error(`${name}: mapping ${offset}+${length} is outside shared-memory region ${id}`);
        }
        const key = `${id}:${offset}`;
        if (slots.has(key)) throw new Error(`${name}: region ${id} offset ${offset} is already mapped`);
        slots.set(key, this.#vm.addSlot(w.base + offset, length, hostAddr, !writable));
      },
      removeMapping: (id, offset) => {
        const key = `${id}:${offset}`;
        const slot = slots.get(key);
        if (slot === undefined) throw new Error(`${name}: region ${id} offset ${offset} is not mapped`);
        this.#vm.removeSlot(slot);
        slots.delete(key);
      },
    };
  }

  /** Turn queue-notify eventfds into transport.notify() calls, off the vCPU path. */
  async #serveNotifies(): Promise<void> {
    const all = this.virtio.flatMap((v) => v.notifyFds.map((fd, q) => ({ fd, q, v })));
    if (all.length === 0) return;
    while (!this.#closed) {
      const revents = await pollAsync(all.map((a) => a.fd), POLLIN, 200);
      if (this.#closed) break;
      revents.forEach((r, i) => {
        if (!(r & POLLIN)) return;
        const a = all[i];
        eventfdRead(a.fd);
        try {
          a.v.transport.notify(a.q);
        } catch (e) {
          this.#log(`virtio-${a.v.device.name}: queue ${a.q}: ${(e as Error).message}`);
        }
      });
    }
  }

  #createVcpus(kvm: Kvm, entry: number): void {
    const supported = kvm.supportedCpuid();
    // kvm_pvm's instruction emulator lacks CMPXCHG16B and XSAVE/XRSTOR: do not offer them there.
    const hideCx16 = pvmHost();
    for (let id = 0; id < this.config.cpus; id++) {
      const fd = this.#vm.createVcpu(id);
      this.#vcpuFds.push(fd);
      setCpuid(fd, vcpuCpuid(supported, { apicId: id, cpuCount: this.config.cpus, hideCx16, hideXsave: hideCx16 }));
      const refused = setBootMsrs(fd);
      if (refused.length > 0 && id === 0) {
        this.#log(`KVM refused boot MSRs ${refused.join(", ")}; continuing without them`);
      }
      setBootFpu(fd);
      setLapicLints(fd);
      if (id === 0) setBootRegisters(fd, entry);
    }
  }

  /**
   * Start the vCPUs; resolves when every Worker is in its loop (or the VM has ended meanwhile).
   *
   * The boot vCPU runs first; the others' Workers are created after it runs. Creating a Worker
   * blocks this thread while Deno builds the Worker's runtime (35-65 ms natively), so creating all
   * of them before starting would hold the guest back by that much per vCPU, while the guest needs
   * its other vCPUs only when it starts them with INIT/SIPI. KVM keeps an INIT/SIPI sent to a vCPU
   * that is not in KVM_RUN yet and acts on it when the vCPU enters.
   */
  async start(): Promise<void> {
    if (!this.#kvm) {
      // Built on MachineOptions.vm: the device side runs, there are no vCPUs.
      this.#serveNotifies().catch((e) => this.#log(`virtio notify loop: ${(e as Error).message}`));
      return;
    }
    installKickHandler();
    const runSize = this.#kvm.vcpuMmapSize;
    const workers = this.#idleWorkers.splice(0);
    const startVcpu = (id: number): Promise<unknown> => {
      const v = new Vcpu({
        worker: workers[id],
        id,
        vcpuFd: this.#vcpuFds[id],
        runSize,
        control: this.#control,
        pio: this.pio,
        mmio: this.mmio,
        debugExit: this.opts.debugExit ?? false,
        virtioInterrupts: this.#virtioInterrupts,
        serials: this.#vcpuSerials,
        serialOutput: () => this.#drainSerials(),
      });
      this.#vcpus.push(v);
      v.ended.then((end) => this.#vcpuEnded(id, end));
      // A vCPU that ends before it reports ready (the VM stopped meanwhile) does not hold start() up.
      return Promise.race([v.ready, v.ended]);
    };
    await startVcpu(0);
    this.#serveNotifies().catch((e) => this.#log(`virtio notify loop: ${(e as Error).message}`));
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
    if (stuck.length) { for (const serial of this.serials) serial?.releaseLockOfEndedVcpus(); }
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

  /** Resume after pause (crosvm `resume`). */
  resume(): void {
    if (Atomics.load(this.#ctl, CTL_COMMAND) !== CMD_PAUSE) return;
    Atomics.store(this.#ctl, CTL_COMMAND, CMD_RUN);
    Atomics.notify(this.#ctl, CTL_COMMAND);
  }

  get paused(): boolean {
    return Atomics.load(this.#ctl, CTL_COMMAND) === CMD_PAUSE;
  }

  /** Press the ACPI power button: the GED's interrupt runs _EVT, which notifies \_SB.PWRB (vmm/arch/acpi.ts). */
  powerButton(): void {
    if (this.#exitCode !== undefined) throw new Error("the VM has ended");
    this.#vm.pulseIrq(IRQ_ACPI_SCI);
  }

  /**
   * The GPU device, if the VM has one. Found by its virtio device type: its module is loaded only
   * for VMs with a GPU (vmm/device_manager/virtio_devices.ts), so there is no class to test against here.
   */
  #gpu(): GpuDevice | undefined {
    return this.virtio.find((v) => v.device.deviceType === VIRTIO_ID_GPU)?.device as GpuDevice | undefined;
  }

  /** The GPU's copy counters (issue: devices/virtio/gpu). */
  gpuStats(): object {
    const gpu = this.#gpu();
    if (!gpu) throw new Error("not available: this VM has no GPU (--gpu)");
    return gpu.gpuStats();
  }

  /** The GPU's copy summary (a few lines), or undefined without a GPU. */
  gpuSummary(): string | undefined {
    return this.#gpu()?.summary();
  }

  /** PNG of scanout 0. */
  screenshot(): Promise<Uint8Array> {
    const gpu = this.#gpu();
    if (!gpu) return Promise.reject(new Error("not available: this VM has no display (--gpu)"));
    return gpu.screenshot(0);
  }

  async screenshotTo(path: string): Promise<void> {
    await Deno.writeFile(path, await this.screenshot());
  }

  /**
   * Serve `--gpu displays=[[mode=web,port=N]]` as a web page on 127.0.0.1 (vmm/web_display/); returns
   * its URL, which carries the VM's access token, or undefined when no display asks for it.
   */
  async startWebDisplay(): Promise<string | undefined> {
    const web = this.config.gpu?.displays.find((d) => d.mode === "web");
    if (!web) return undefined;
    const gpu = this.#gpu();
    if (!gpu) return undefined;
    const inputs = this.virtio.map((v) => v.device).filter((d): d is InputDevice => d instanceof InputDevice);
    // Imported here, not with the VMM: most VMs have no web display (and its PNG path loads node:zlib).
    const { WebDisplay } = await import("./ui/web_display/server.ts");
    const server = new WebDisplay({
      display: gpu.display,
      input: {
        keyboard: inputs.find((d) => d.kind === "keyboard"),
        pointer: inputs.find((d) => d.kind === "mouse"),
        touch: inputs.find((d) => d.kind === "multi-touch" || d.kind === "single-touch"),
      },
      stats: () => gpu.gpuStats(),
      port: web.port ?? 0,
    });
    const { url } = await server.start();
    if (this.#closed) {
      // The VM ended while the display started.
      await server.close();
      return undefined;
    }
    this.#webDisplay = server;
    return url;
  }

  /** Serve the control socket (-s/--socket) until the VM ends. */
  async startControlSocket(): Promise<void> {
    if (!this.config.socket) return;
    const server = new ControlServer(this.config.socket, machineControlHandler(this));
    await server.listening;
    this.#controlServer = server;
  }

  /** Send bytes to a serial port's input (COM1 by default). */
  sendInput(bytes: Uint8Array, num = 1): void {
    const s = this.serials[num - 1];
    if (!s) throw new Error(`no serial port COM${num}`);
    s.enqueueInput(bytes);
  }

  /** Exit counters per vCPU (exits served on the main thread). */
  stats(): Record<string, number> {
    const out: Record<string, number> = {};
    this.#vcpus.forEach((v, i) => {
      out[`vcpu${i}.pio_exits`] = v.counters.pio;
      out[`vcpu${i}.mmio_exits`] = v.counters.mmio;
    });
    for (const v of this.virtio) {
      for (const [k, n] of Object.entries(v.device.stats?.() ?? {})) out[`${v.device.name}.${k}`] = n;
    }
    return out;
  }

  /** Take what the vCPUs' UARTs transmitted to the consoles. */
  #drainSerials(): void {
    for (const serial of this.serials) serial?.drainOutput();
  }

  /** Release every host resource. Safe to call twice. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#drainSerials();
    for (const serial of this.serials) serial?.closeHost();
    for (const w of this.#idleWorkers.splice(0)) w.terminate();
    void this.#controlServer?.close();
    void this.#webDisplay?.close();
    this.hostIo.close();
    for (const v of this.virtio) {
      try {
        v.device.close?.();
      } catch (e) {
        this.#log(`closing ${v.device.name}: ${(e as Error).message}`);
      }
      closeFd(v.irqFd);
      v.notifyFds.forEach(closeFd);
    }
    for (const s of this.#vcpuSerials) closeFd(s.irqFd);
    this.#vcpuFds.forEach(closeFd);
    this.#vm.close();
    this.#kvm?.close();
    this.memory.close();
  }
}

/** True on hosts whose KVM is kvm_pvm (software; see kvm-here.md): its emulator lacks CMPXCHG16B. */
export function pvmHost(): boolean {
  try {
    Deno.statSync("/sys/module/kvm_pvm");
    return true;
  } catch {
    return false;
  }
}
