// The virtio-mmio slots: where each transport goes (window and GSI), its irqfd, one ioeventfd per
// queue for QueueNotify, the InterruptStatus cells the vCPU Workers share, the devices' shared-memory
// windows, and the loop that turns signalled ioeventfds into transport.notify() calls.

import type { Stateful } from "../../core/state.ts";
import { closeFd, eventfd, eventfdRead, eventfdWrite, pollAsync, POLLIN } from "../../ffi/libc.ts";
import type { Bus } from "../../core/bus.ts";
import { ConfigError } from "../../core/exit.ts";
import type { GuestMemory } from "../../core/memory.ts";
import type { VirtioDevice } from "../../devices/virtio/device.ts";
import { VIRTIO_MMIO_QUEUE_NOTIFY, type VirtioInterruptCells, VirtioMmioTransport } from "../../devices/virtio/mmio.ts";
import { VIRTIO_IRQS, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START } from "../arch/layout.ts";
import type { VmHandle } from "../kvm/vm.ts";
import { type SharedMemoryArea, sharedMemoryMapper } from "./shared_memory.ts";
import type { WorkerDevice } from "../kvm/worker_devices.ts";

/** QueueNotify is a 32-bit register whose value is the queue index: the ioeventfd matches both. */
const QUEUE_NOTIFY_SIZE = 4;
/** How long one wait of the notify loop lasts before it looks whether the VM has closed (ms). */
const NOTIFY_POLL_MS = 200;

/** Where a transport lives: its register window and its GSI. */
export interface VirtioMmioResource {
  base: number;
  size: number;
  irq: number;
}

/** One virtio device on the MMIO bus. */
export interface VirtioSlot {
  device: VirtioDevice;
  transport: VirtioMmioTransport;
  base: number;
  irq: number;
  irqFd: number;
  /** One eventfd per queue, signalled by KVM when the guest writes the queue's index to QueueNotify. */
  notifyFds: number[];
}

/** Windows and GSIs for `count` transports, in order. Throws ConfigError when more are asked for than GSIs exist. */
export function virtioMmioResources(count: number): VirtioMmioResource[] {
  if (count > VIRTIO_IRQS.length) {
    throw new ConfigError(`${count} virtio devices requested; at most ${VIRTIO_IRQS.length} fit`);
  }
  return Array.from({ length: count }, (_, i) => ({
    base: VIRTIO_MMIO_START + i * VIRTIO_MMIO_SIZE,
    size: VIRTIO_MMIO_SIZE,
    irq: VIRTIO_IRQS[i],
  }));
}

export class VirtioMmioDevices {
  readonly slots: VirtioSlot[] = [];
  /** The transports' InterruptStatus cells, shared with the vCPU Workers. */
  #interrupts: VirtioInterruptCells | undefined;
  #closed = false;
  /** Set while the devices sleep: the notify loop waits on it instead of polling. */
  #asleep: { promise: Promise<void>; wake: () => void } | undefined;

  constructor(
    readonly bus: Bus,
    readonly vm: Pick<VmHandle, "registerIrqfd" | "registerIoeventfd" | "addSlot" | "removeSlot">,
    readonly memory: GuestMemory,
    readonly shm: SharedMemoryArea,
    readonly log: (line: string) => void,
  ) {}

  /** Put `devices` on the bus at `resources` (from virtioMmioResources), in order. */
  add(devices: readonly VirtioDevice[], resources: readonly VirtioMmioResource[]): void {
    const cells = new SharedArrayBuffer(Math.max(1, devices.length) * Int32Array.BYTES_PER_ELEMENT);
    this.#interrupts = {
      cells,
      bases: resources.slice(0, devices.length).map((r) => r.base),
      windowSize: VIRTIO_MMIO_SIZE,
    };
    const cellArray = new Int32Array(cells);
    devices.forEach((device, i) => {
      const { base, irq } = resources[i];
      const windows = this.shm.place(device.name, device.sharedMemoryRegions?.() ?? []);
      if (windows.size > 0) device.setSharedMemoryMapper?.(sharedMemoryMapper(device.name, windows, this.vm));
      const irqFd = eventfd();
      // Filled below, before any driver can activate the device.
      const notifyFds: number[] = [];
      const transport = new VirtioMmioTransport(device, this.memory, {
        irq: { trigger: () => eventfdWrite(irqFd) },
        interruptCell: { cells: cellArray, index: i },
        shmBase: (id) => windows.get(id)?.base,
        notifyFds,
        irqFd,
      });
      // Recorded before KVM is asked, so that close() releases the fds whatever fails below.
      this.slots.push({ device, transport, base, irq, irqFd, notifyFds });
      this.vm.registerIrqfd(irqFd, irq);
      device.queueMaxSizes.forEach((_, q) => {
        const fd = eventfd();
        notifyFds.push(fd);
        this.vm.registerIoeventfd(fd, base + VIRTIO_MMIO_QUEUE_NOTIFY, QUEUE_NOTIFY_SIZE, q);
      });
      this.bus.add(base, VIRTIO_MMIO_SIZE, transport, `virtio-${device.name}`);
    });
  }

  /** The InterruptStatus/ACK registers as the vCPU Workers serve them (none without transports). */
  workerDevices(): WorkerDevice[] {
    const cells = this.#interrupts;
    if (!cells || cells.bases.length === 0) return [];
    const first = Math.min(...cells.bases);
    const end = Math.max(...cells.bases) + cells.windowSize;
    return [{ kind: "virtio-mmio-interrupts", space: "mmio", base: first, size: end - first, cells }];
  }

  /** Turn queue-notify eventfds into transport.notify() calls, off the vCPU path, until close(). */
  async serveNotifies(): Promise<void> {
    // A device served out of process has its back end read its ioeventfds (its kick fds) itself.
    const all = this.slots.filter((v) => !v.device.servesQueuesOutOfProcess)
      .flatMap((v) => v.notifyFds.map((fd, q) => ({ fd, q, v })));
    if (all.length === 0) return;
    while (!this.#closed) {
      // Asleep: the eventfds keep counting the guest's notifications; they are served once awake.
      if (this.#asleep) await this.#asleep.promise;
      if (this.#closed) break;
      const revents = await pollAsync(all.map((a) => a.fd), POLLIN, NOTIFY_POLL_MS);
      if (this.#asleep) continue;
      if (this.#closed) break;
      revents.forEach((r, i) => {
        if (!(r & POLLIN)) return;
        const a = all[i];
        eventfdRead(a.fd);
        try {
          a.v.transport.notify(a.q);
        } catch (e) {
          this.log(`virtio-${a.v.device.name}: queue ${a.q}: ${(e as Error).message}`);
        }
      });
    }
  }

  /** Stop serving queue notifications until wake(). */
  sleep(): void {
    if (this.#asleep) return;
    let wake!: () => void;
    const promise = new Promise<void>((r) => wake = r);
    this.#asleep = { promise, wake };
  }

  wake(): void {
    const a = this.#asleep;
    this.#asleep = undefined;
    a?.wake();
  }

  /** The devices (or their transports) that hold a request not yet completed. */
  busy(): string[] {
    // A device that does not implement Stateful holds nothing the host could wait for.
    const idle = (v: VirtioSlot) => ((v.device as Partial<Stateful>).quiescent?.() ?? true) && v.transport.quiescent();
    return this.slots.filter((v) => !idle(v)).map((v) => v.device.name);
  }

  /** Counters of every device, as `<device>.<counter>`. */
  stats(): Record<string, number> {
    const out: Record<string, number> = {};
    for (const v of this.slots) {
      for (const [k, n] of Object.entries(v.device.stats?.() ?? {})) out[`${v.device.name}.${k}`] = n;
    }
    return out;
  }

  /** Close every device and its eventfds; ends the notify loop. */
  close(): void {
    this.#closed = true;
    this.wake();
    for (const v of this.slots) {
      try {
        v.device.close?.();
      } catch (e) {
        this.log(`closing ${v.device.name}: ${(e as Error).message}`);
      }
      closeFd(v.irqFd);
      v.notifyFds.forEach(closeFd);
    }
  }
}
