// The vhost-user front end against denovm's own back end (backend.ts serving a block device, on a Worker):
// negotiation, the configuration space forwarded, rings set up with the transport's own eventfds, requests
// served through them, reset and activation again, and snapshots refused.

import assert from "node:assert/strict";
import { VhostUserFrontEndDevice } from "./front_end.ts";
import {
  VHOST_USER_F_PROTOCOL_FEATURES,
  VHOST_USER_PROTOCOL_F_CONFIG,
  VHOST_USER_PROTOCOL_F_REPLY_ACK,
} from "./protocol.ts";
import { VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK } from "../virtio/device.ts";
import {
  VIRTIO_MMIO_INT_VRING,
  VIRTIO_MMIO_STATUS,
  VIRTIO_STATUS_DEVICE_NEEDS_RESET,
  VirtioMmioTransport,
} from "../virtio/mmio.ts";
import { OwnedGuestMemory } from "../../core/memory.ts";
import { StateError } from "../../core/state.ts";
import { closeFd, eventfd, eventfdRead, eventfdWrite, POLLIN, pollSync } from "../../ffi/libc.ts";
import { VirtioTestDriver } from "../../test/support/virtio_driver.ts";
import { startBackEnd } from "../../test/support/vhost_user_back_end_worker.ts";
import { until } from "../../test/support/vhost_user_front_end.ts";
import { withTempDir } from "../../test/support/temp_dir.ts";
import { captureVirtioLog } from "../../test/support/device_rig.ts";
import { MiB } from "../../core/units.ts";

/** virtio 1.2 section 5.2.6: request types and the header's size; a sector is 512 bytes. */
const VIRTIO_BLK_T_IN = 0;
const VIRTIO_BLK_T_OUT = 1;
const BLK_OUTHDR_SIZE = 16;
const SECTOR = 512;
const VIRTIO_BLK_S_OK = 0;
const DISK_SECTORS = 2048;
const RAM = 16 * MiB;
const QUEUE_SIZE = 8;

function header(type: number, sector: number): Uint8Array {
  const b = new Uint8Array(BLK_OUTHDR_SIZE);
  const v = new DataView(b.buffer);
  v.setUint32(0, type, true);
  v.setBigUint64(8, BigInt(sector), true);
  return b;
}

function pattern(seed: number): Uint8Array {
  return Uint8Array.from({ length: SECTOR }, (_, i) => (i * 13 + seed) & 0xff);
}

Deno.test("front end: negotiates with denovm's back end, forwards its config, serves requests through the transport's eventfds", async () => {
  await withTempDir("denovm-vu-fe-", async (dir) => {
    const disk = `${dir}/disk.img`;
    const image = new Uint8Array(DISK_SECTORS * SECTOR);
    image.set(pattern(3), 3 * SECTOR);
    Deno.writeFileSync(disk, image);
    const socket = `${dir}/blk.sock`;
    const backEnd = await startBackEnd({ kind: "block", socket, path: disk });
    const lines: string[] = [];
    const dev = new VhostUserFrontEndDevice({
      name: "vu-block",
      socket,
      deviceType: VIRTIO_ID_BLOCK,
      log: (l) => lines.push(l),
    });
    const mem = OwnedGuestMemory.allocateShared([{ start: 0, size: RAM }]);
    const irqFd = eventfd();
    const notifyFds = [eventfd()];
    try {
      await dev.connect();
      assert.ok(dev.features & VIRTIO_F_VERSION_1);
      assert.equal(dev.features & VHOST_USER_F_PROTOCOL_FEATURES, 0n, "the protocol-feature bit is not the guest's");
      assert.ok(dev.protocolFeatures & VHOST_USER_PROTOCOL_F_REPLY_ACK);
      assert.ok(dev.protocolFeatures & VHOST_USER_PROTOCOL_F_CONFIG);
      assert.deepEqual(dev.queueMaxSizes, [32768], "denovm's back end has no MQ: block's one queue");
      // The config space is the back end's: capacity in sectors at offset 0 (virtio_blk_config).
      const cfg = new Uint8Array(8);
      dev.readConfig(0, cfg);
      assert.equal(new DataView(cfg.buffer).getBigUint64(0, true), BigInt(DISK_SECTORS));

      const t = new VirtioMmioTransport(dev, mem, {
        irq: { trigger: () => eventfdWrite(irqFd) },
        notifyFds,
        irqFd,
      });
      const drv = new VirtioTestDriver(t, mem, { start: 0x1000, end: RAM });
      drv.init({ queueSize: QUEUE_SIZE });
      assert.equal(drv.readReg(VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_DEVICE_NEEDS_RESET, 0);
      const q = drv.queues[0];

      // A read of sector 3, kicked through the ioeventfd as KVM would: served by the back end, which
      // interrupts through the irqfd.
      const read = q.submit([header(VIRTIO_BLK_T_IN, 3), SECTOR, 1]);
      eventfdWrite(notifyFds[0]);
      await until(() => q.usedIdx() === 1, "the read's completion");
      await until(() => (pollSync([irqFd], POLLIN, 0)[0] & POLLIN) !== 0, "the irqfd");
      eventfdRead(irqFd);
      assert.deepEqual(mem.read(read.buffers[1].addr, SECTOR), pattern(3));
      assert.equal(mem.read(read.buffers[2].addr, 1)[0], VIRTIO_BLK_S_OK);
      // The transport did not see that interrupt, yet InterruptStatus says "used buffer", and keeps saying it.
      assert.equal(drv.ackInterrupt() & VIRTIO_MMIO_INT_VRING, VIRTIO_MMIO_INT_VRING);
      assert.equal(drv.ackInterrupt() & VIRTIO_MMIO_INT_VRING, VIRTIO_MMIO_INT_VRING);

      // A write of sector 5, kicked through the QueueNotify register (the transport passes it on).
      q.submit([header(VIRTIO_BLK_T_OUT, 5), pattern(5), 1]);
      drv.kick(0);
      await until(() => q.usedIdx() === 2, "the write's completion");
      assert.deepEqual(Deno.readFileSync(disk).subarray(5 * SECTOR, 6 * SECTOR), pattern(5));

      // Reset: the back end stops the ring where it was (two requests taken).
      drv.writeReg(VIRTIO_MMIO_STATUS, 0);
      assert.equal(dev.ringBase(0), 2);
      assert.equal(dev.failed, undefined);

      // The driver starts again on new rings: served as before.
      drv.init({ queueSize: QUEUE_SIZE });
      const q2 = drv.queues[0];
      const again = q2.submit([header(VIRTIO_BLK_T_IN, 5), SECTOR, 1]);
      eventfdWrite(notifyFds[0]);
      await until(() => q2.usedIdx() === 1, "the read after the reset");
      assert.deepEqual(mem.read(again.buffers[1].addr, SECTOR), pattern(5));

      assert.throws(() => dev.saveState(), StateError);
      assert.deepEqual(lines, [], "nothing logged");
      assert.equal(dev.stats().activations, 2);
    } finally {
      dev.close();
      await backEnd.close();
      closeFd(irqFd);
      notifyFds.forEach(closeFd);
      mem.close();
    }
  });
});

Deno.test("front end: RAM not from a memfd is refused at DRIVER_OK with one line, the device fails", async () => {
  await withTempDir("denovm-vu-fe-", async (dir) => {
    const disk = `${dir}/disk.img`;
    Deno.writeFileSync(disk, new Uint8Array(DISK_SECTORS * SECTOR));
    const socket = `${dir}/blk.sock`;
    const backEnd = await startBackEnd({ kind: "block", socket, path: disk });
    const lines: string[] = [];
    const dev = new VhostUserFrontEndDevice({
      name: "vu-block",
      socket,
      deviceType: VIRTIO_ID_BLOCK,
      log: (l) => lines.push(l),
    });
    const mem = OwnedGuestMemory.allocate([{ start: 0, size: RAM }]);
    const irqFd = eventfd();
    const notifyFds = [eventfd()];
    const guestLines = captureVirtioLog();
    try {
      await dev.connect();
      const t = new VirtioMmioTransport(dev, mem, { irq: { trigger: () => {} }, notifyFds, irqFd });
      const drv = new VirtioTestDriver(t, mem, { start: 0x1000, end: RAM });
      drv.init({ queueSize: QUEUE_SIZE });
      assert.ok(drv.readReg(VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_DEVICE_NEEDS_RESET);
      assert.deepEqual(lines, [], "the transport logs the failure");
      assert.equal(guestLines.lines.length, 1);
      assert.match(guestLines.lines[0], /activation failed: vu-block: back end failed: guest RAM is not shareable/);
      assert.ok(dev.failed);
    } finally {
      guestLines.restore();
      dev.close();
      await backEnd.close();
      closeFd(irqFd);
      notifyFds.forEach(closeFd);
      mem.close();
    }
  });
});
