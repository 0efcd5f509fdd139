// The device manager: the port and MMIO buses with everything on them (the legacy devices, the
// virtio-mmio transports and their shared-memory windows), the devices the vCPU Workers serve
// themselves, and the host ends of the consoles.

import { Bus } from "../../core/bus.ts";
import type { GuestMemory } from "../../core/memory.ts";
import type { VirtioDevice } from "../../devices/virtio/device.ts";
import type { ConsolePort } from "../../devices/virtio/console.ts";
import { GUEST_PHYS_LIMIT } from "../arch/layout.ts";
import type { SerialConfig } from "../config.ts";
import type { VmHandle } from "../kvm/vm.ts";
import type { HostIo } from "./host_io.ts";
import { type GuestRequestHandler, LegacyDevices } from "./legacy.ts";
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

  /** Release every device and the host ends of the consoles. */
  close(): void {
    this.legacy.close();
    this.hostIo.close();
    this.#virtio.close();
  }
}
