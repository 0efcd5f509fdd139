// The device manager: the port and MMIO buses with everything on them (the legacy devices, the
// virtio-mmio transports and their shared-memory windows), the devices the vCPU Workers serve
// themselves, and the host ends of the consoles.

import { Bus } from "../../core/bus.ts";
import { eventfdWrite } from "../../ffi/libc.ts";
import type { GuestMemory } from "../../core/memory.ts";
import { type DeviceState, StateError, type Stateful } from "../../core/state.ts";
import type { VirtioDevice } from "../../devices/virtio/device.ts";
import type { ConsolePort } from "../../devices/virtio/console.ts";
import { GUEST_PHYS_LIMIT } from "../arch/layout.ts";
import type { SerialConfig } from "../config.ts";
import type { VmHandle } from "../kvm/vm.ts";
import type { HostIo } from "./host_io.ts";
import { type GuestRequestHandler, LegacyDevices, type LegacyDeviceState } from "./legacy.ts";
import { VirtioMmioDevices, type VirtioMmioResource, type VirtioSlot } from "./mmio.ts";
import { SharedMemoryArea } from "./shared_memory.ts";
import type { WorkerDevice } from "../kvm/worker_devices.ts";

export interface DeviceManagerOptions {
  vm: Pick<VmHandle, "registerIrqfd" | "registerIoeventfd" | "addSlot" | "removeSlot">;
  memory: GuestMemory;
  /** The host ends of the consoles (closed with the devices). */
  hostIo: HostIo;
  /** Where the devices' shared-memory windows start (above RAM). */
  sharedMemoryStart: number;
  /** The guest asked to power off, reset or report a panic. */
  onGuestRequest: GuestRequestHandler;
  log: (line: string) => void;
}

/** One virtio slot's saved state: its device's name, its transport's state and its device's. */
export interface VirtioSlotState {
  name: string;
  transport: DeviceState;
  device: DeviceState;
}

/** Every device's state, as a snapshot stores it (SNAPSHOT.md `devices`). */
export interface DevicesState {
  /** The legacy devices by bus name: the UARTs present ("COM1".."COM4"), "i8042", "cmos", "acpi-pm", "pvpanic". */
  legacy: LegacyDeviceState[];
  /** Every virtio slot, in slot order. */
  virtio: VirtioSlotState[];
}

export class DeviceManager {
  readonly pio = new Bus("port I/O");
  readonly mmio = new Bus("MMIO");
  readonly legacy: LegacyDevices;
  readonly #virtio: VirtioMmioDevices;
  readonly hostIo: HostIo;
  readonly #log: (line: string) => void;
  /** The guest agent's console port (config.agent). */
  agentPort: ConsolePort | undefined;

  constructor(opts: DeviceManagerOptions) {
    this.hostIo = opts.hostIo;
    this.#log = opts.log;
    this.legacy = new LegacyDevices(this.pio, opts.vm, opts.hostIo, opts.onGuestRequest, opts.log);
    const shm = new SharedMemoryArea(opts.sharedMemoryStart, GUEST_PHYS_LIMIT);
    this.#virtio = new VirtioMmioDevices(this.mmio, opts.vm, opts.memory, shm, opts.log);
  }

  /** The virtio devices in slot order. */
  get virtio(): readonly VirtioSlot[] {
    return this.#virtio.slots;
  }

  /** Put the UARTs `serials` asks for and the fixed PC devices on the port bus. */
  addLegacy(serials: readonly SerialConfig[]): Promise<void> {
    return this.legacy.add(serials);
  }

  /** Put `devices` on the MMIO bus at `resources` (vmm/device_manager/mmio.ts virtioMmioResources). */
  addVirtio(devices: readonly VirtioDevice[], resources: readonly VirtioMmioResource[]): void {
    this.#virtio.add(devices, resources);
  }

  /** The devices the vCPU Workers serve themselves. */
  workerDevices(): WorkerDevice[] {
    return [...this.legacy.workerDevices(), ...this.#virtio.workerDevices()];
  }

  /** A vCPU Worker's device has something for the main thread: take the UARTs' output. */
  workerWake(): void {
    this.legacy.drainOutput();
  }

  /** Start the device side: queue notifications reach the transports. */
  start(): void {
    this.#virtio.serveNotifies().catch((e) => this.#log(`virtio notify loop: ${(e as Error).message}`));
  }

  /** Hold the guest's queue notifications (crosvm's device sleep): they are served after wake(). */
  sleep(): void {
    this.#virtio.sleep();
  }

  /** Serve the guest's queue notifications again, the held ones first. */
  wake(): void {
    this.#virtio.wake();
  }

  /** The names of the virtio devices (or transports) that are not quiescent (core/state.ts). */
  busy(): string[] {
    return this.#virtio.busy();
  }

  /** Counters of every virtio device, as `<device>.<counter>`. */
  stats(): Record<string, number> {
    return this.#virtio.stats();
  }

  /**
   * Every device's state: the legacy devices by name, then each virtio slot's transport and device in slot
   * order. Call it while the vCPUs are paused and the devices quiescent (busy() is empty). Throws StateError
   * naming a device whose state cannot be saved.
   */
  saveState(): DevicesState {
    const virtio = this.#virtio.slots.map((v): VirtioSlotState => {
      const device = stateful(v.device, v.device.name);
      return { name: v.device.name, transport: v.transport.saveState(), device: device.saveState() };
    });
    return { legacy: this.legacy.saveState(), virtio };
  }

  /**
   * Take a saved state into devices built from the same configuration, before the vCPUs or the notify loop
   * run: the legacy devices matched by name, the virtio slots by order and name. Each slot's device takes its
   * state first, then its transport (whose restore activates the device on the restored queues). Throws
   * StateError naming the first device that is missing, extra or refuses its state.
   */
  restoreState(saved: DevicesState): void {
    const slots = this.#virtio.slots;
    const count = Math.max(slots.length, saved.virtio.length);
    for (let i = 0; i < count; i++) {
      const mine = slots[i]?.device.name, theirs = saved.virtio[i]?.name;
      if (mine === theirs) continue;
      if (theirs === undefined) {
        throw new StateError(`virtio device ${i} (${mine}): this VM has it, the snapshot has no state for it`);
      }
      if (mine === undefined) {
        throw new StateError(`virtio device ${i} (${theirs}): the snapshot has it, this VM does not`);
      }
      throw new StateError(`virtio device ${i}: the snapshot has ${theirs}, this VM has ${mine}`);
    }
    this.legacy.restoreState(saved.legacy);
    slots.forEach((v, i) => {
      const s = saved.virtio[i];
      const device = stateful(v.device, v.device.name);
      try {
        device.restoreState(s.device);
        v.transport.restoreState(s.transport);
      } catch (e) {
        throw new StateError(`virtio device ${i} (${v.device.name}): ${(e as Error).message}`);
      }
      // A guest notification not served when the state was saved (the devices slept) was an eventfd's count,
      // which the snapshot does not hold: each restored queue with chains published gets one, served once the
      // notify loop runs (or by the back end that reads the queue's kick fd).
      v.transport.queues?.forEach((q, qi) => {
        if (q?.hasAvailable() && v.notifyFds[qi] !== undefined) eventfdWrite(v.notifyFds[qi]);
      });
    });
  }

  /** Release every device and the host ends of the consoles. */
  close(): void {
    this.legacy.close();
    this.hostIo.close();
    this.#virtio.close();
  }
}

/** `device` as Stateful; StateError naming it when it has no state to save or restore. */
function stateful(device: VirtioDevice, name: string): Stateful {
  const d = device as VirtioDevice & Partial<Stateful>;
  if (typeof d.saveState !== "function" || typeof d.restoreState !== "function") {
    throw new StateError(`virtio device ${name} cannot be saved or restored`);
  }
  return d as VirtioDevice & Stateful;
}
