// A rig for tests of denovm's vhost-user front end (devices/vhost_user/front_end.ts) without KVM: the guest
// RAM, irqfd and per-queue ioeventfds a VMM gives the virtio-mmio transport, the transport over the device,
// and the test driver on it.

import { VhostUserFrontEndDevice } from "../../devices/vhost_user/front_end.ts";
import { VirtioMmioTransport } from "../../devices/virtio/mmio.ts";
import { VIRTIO_ID_BLOCK } from "../../devices/virtio/device.ts";
import { OwnedGuestMemory } from "../../core/memory.ts";
import { MiB } from "../../core/units.ts";
import { closeFd, eventfd, eventfdWrite } from "../../ffi/libc.ts";
import { VirtioTestDriver } from "./virtio_driver.ts";

/** The rig's guest RAM: [0, RIG_RAM). */
export const RIG_RAM = 16 * MiB;
/** Where the test driver places its rings and buffers. */
const DRIVER_RAM_START = 0x1000;
/** The queue size tests give their rings. */
export const RIG_QUEUE_SIZE = 8;

export interface FrontEndRigOptions {
  /** The queues the transport gets an ioeventfd for (default 1). */
  queues?: number;
  /** Guest RAM from a memfd (the default), or private memory that a back end cannot map. */
  shareable?: boolean;
}

/** A front end named `name` for a virtio-blk back end on `socket`, its log lines pushed to `lines`. */
export function blockFrontEnd(
  name: string,
  socket: string,
  lines: string[],
  opts: { replyTimeoutMs?: number; connectTimeoutMs?: number } = {},
): VhostUserFrontEndDevice {
  return new VhostUserFrontEndDevice({
    name,
    socket,
    deviceType: VIRTIO_ID_BLOCK,
    ...opts,
    log: (l) => lines.push(l),
  });
}

/** `dev` with the guest RAM and eventfds a VMM gives its transport; close() releases all of it. */
export class FrontEndRig {
  readonly mem: OwnedGuestMemory;
  readonly irqFd: number = eventfd();
  readonly notifyFds: number[];

  constructor(readonly dev: VhostUserFrontEndDevice, opts: FrontEndRigOptions = {}) {
    const ram = [{ start: 0, size: RIG_RAM }];
    this.mem = opts.shareable === false ? OwnedGuestMemory.allocate(ram) : OwnedGuestMemory.allocateShared(ram);
    this.notifyFds = Array.from({ length: opts.queues ?? 1 }, () => eventfd());
  }

  /** A transport over the device with the rig's eventfds, `irq` its interrupt line, and the test driver on it. */
  driver(irq: () => void = () => {}): VirtioTestDriver {
    const t = new VirtioMmioTransport(this.dev, this.mem, {
      irq: { trigger: irq },
      notifyFds: this.notifyFds,
      irqFd: this.irqFd,
    });
    return new VirtioTestDriver(t, this.mem, { start: DRIVER_RAM_START, end: RIG_RAM });
  }

  /** A kick of `queue` through its ioeventfd, as KVM gives it. */
  notify(queue = 0): void {
    eventfdWrite(this.notifyFds[queue]);
  }

  /** Close the device (and wait until it is), the eventfds and the RAM. */
  async close(): Promise<void> {
    this.dev.close();
    await this.dev.whenClosed();
    closeFd(this.irqFd);
    this.notifyFds.forEach(closeFd);
    this.mem.close();
  }
}
