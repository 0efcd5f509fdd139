// The vhost-user front end against denovm's own back end (backend.ts serving a block device, on a Worker):
// negotiation, the configuration space forwarded, rings set up with the transport's own eventfds, requests
// served through them, reset and activation again, and snapshots refused; a back end that dies and comes
// back (reconnection), and one that keeps an inflight region (INFLIGHT_SHMFD, a recording back end).

import assert from "node:assert/strict";
import { VhostUserFrontEndDevice } from "./front_end.ts";
import {
  VHOST_USER_F_PROTOCOL_FEATURES,
  VHOST_USER_PROTOCOL_F_BACKEND_REQ,
  VHOST_USER_PROTOCOL_F_CONFIG,
  VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD,
  VHOST_USER_PROTOCOL_F_REPLY_ACK,
  VhostUserRequest as R,
} from "./protocol.ts";
import { VIRTQ_USED_IDX } from "../virtio/queue.ts";
import { VIRTIO_F_VERSION_1 } from "../virtio/device.ts";
import { SECTOR_SIZE as SECTOR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT } from "../virtio/block/device.ts";
import {
  VIRTIO_MMIO_CONFIG_GENERATION,
  VIRTIO_MMIO_INT_CONFIG,
  VIRTIO_MMIO_INT_VRING,
  VIRTIO_MMIO_STATUS,
  VIRTIO_STATUS_DEVICE_NEEDS_RESET,
} from "../virtio/mmio.ts";
import { StateError } from "../../core/state.ts";
import { eventfdRead, eventfdWrite, POLLIN, pollSync } from "../../ffi/libc.ts";
import { type BackEndWorker, startBackEnd } from "../../test/support/vhost_user_back_end_worker.ts";
import { until } from "../../test/support/vhost_user_front_end.ts";
import { blockFrontEnd, FrontEndRig, RIG_QUEUE_SIZE as QUEUE_SIZE } from "../../test/support/front_end_rig.ts";
import { blkHeader as header, sectorPattern as pattern } from "../../test/support/blk_request.ts";
import { withTempDir } from "../../test/support/temp_dir.ts";
import { captureVirtioLog } from "../../test/support/device_rig.ts";

const DISK_SECTORS = 2048;

interface BlockRig {
  disk: string;
  socket: string;
  /** Closed after the test: a test that starts another back end puts it here. */
  backEnd: BackEndWorker;
  dev: VhostUserFrontEndDevice;
  rig: FrontEndRig;
  /** The front end's log lines. */
  lines: string[];
}

/**
 * `body` with denovm's block back end serving a disk image (DISK_SECTORS sectors, `opts.image` or zeros) in a
 * temporary directory, a front end "vu-block" for it and a rig around that; all closed after.
 */
async function withBlockRig(
  opts: { image?: Uint8Array; shareable?: boolean },
  body: (r: BlockRig) => Promise<void>,
): Promise<void> {
  await withTempDir("denovm-vu-fe-", async (dir) => {
    const disk = `${dir}/disk.img`;
    Deno.writeFileSync(disk, opts.image ?? new Uint8Array(DISK_SECTORS * SECTOR));
    const socket = `${dir}/blk.sock`;
    const backEnd = await startBackEnd({ kind: "block", socket, path: disk });
    const lines: string[] = [];
    const dev = blockFrontEnd("vu-block", socket, lines);
    const r: BlockRig = { disk, socket, backEnd, dev, rig: new FrontEndRig(dev, { shareable: opts.shareable }), lines };
    try {
      await body(r);
    } finally {
      await r.rig.close();
      await r.backEnd.close();
    }
  });
}

Deno.test("front end: negotiates with denovm's back end, forwards its config, serves requests through the transport's eventfds", async () => {
  const image = new Uint8Array(DISK_SECTORS * SECTOR);
  image.set(pattern(3), 3 * SECTOR);
  await withBlockRig({ image }, async ({ disk, dev, rig, lines }) => {
    const { mem, irqFd } = rig;
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

    const drv = rig.driver(() => eventfdWrite(irqFd));
    drv.init({ queueSize: QUEUE_SIZE });
    assert.equal(drv.readReg(VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_DEVICE_NEEDS_RESET, 0);
    const q = drv.queues[0];

    // A read of sector 3, kicked through the ioeventfd as KVM would: served by the back end, which
    // interrupts through the irqfd.
    const read = q.submit([header(VIRTIO_BLK_T_IN, 3), SECTOR, 1]);
    rig.notify();
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
    rig.notify();
    await until(() => q2.usedIdx() === 1, "the read after the reset");
    assert.deepEqual(mem.read(again.buffers[1].addr, SECTOR), pattern(5));

    assert.throws(() => dev.saveState(), StateError);
    assert.deepEqual(lines, [], "nothing logged");
    assert.equal(dev.stats().activations, 2);
  });
});

Deno.test("front end: RAM not from a memfd is refused at DRIVER_OK with one line, the device fails", async () => {
  await withBlockRig({ shareable: false }, async ({ dev, rig, lines }) => {
    const guestLines = captureVirtioLog();
    try {
      await dev.connect();
      const drv = rig.driver();
      drv.init({ queueSize: QUEUE_SIZE });
      assert.ok(drv.readReg(VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_DEVICE_NEEDS_RESET);
      assert.deepEqual(lines, [], "the transport logs the failure");
      assert.equal(guestLines.lines.length, 1);
      assert.match(guestLines.lines[0], /activation failed: vu-block: back end failed: guest RAM is not shareable/);
      assert.ok(dev.failed);
    } finally {
      guestLines.restore();
    }
  });
});

Deno.test("front end: the back end dies with a request queued and comes back on the same socket; the request completes without error", async () => {
  await withBlockRig({}, async (r) => {
    const { disk, socket, dev, rig, lines } = r;
    const { mem, irqFd } = rig;
    await dev.connect();
    const drv = rig.driver(() => eventfdWrite(irqFd));
    drv.init({ queueSize: QUEUE_SIZE });
    const q = drv.queues[0];
    q.submit([header(VIRTIO_BLK_T_OUT, 6), pattern(6), 1]);
    rig.notify();
    await until(() => q.usedIdx() === 1, "the first write");
    q.used();

    // The back end goes away; the guest queues a write and kicks meanwhile.
    await r.backEnd.close();
    await until(() => !dev.connected, "the loss to be seen");
    const queued = q.submit([header(VIRTIO_BLK_T_OUT, 7), pattern(7), 1]);
    rig.notify();

    // It comes back on the same socket: the front end reconnects and sends the set-up again; the ring
    // goes on from the used index, and the queued write is served.
    r.backEnd = await startBackEnd({ kind: "block", socket, path: disk });
    await until(() => q.usedIdx() === 2, "the queued write after the reconnection");
    q.used();
    assert.equal(mem.read(queued.buffers[2].addr, 1)[0], VIRTIO_BLK_S_OK);
    const image = Deno.readFileSync(disk);
    assert.deepEqual(image.subarray(6 * SECTOR, 7 * SECTOR), pattern(6));
    assert.deepEqual(image.subarray(7 * SECTOR, 8 * SECTOR), pattern(7));
    assert.equal(drv.readReg(VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_DEVICE_NEEDS_RESET, 0);
    assert.equal(dev.stats().reconnects, 1);
    assert.equal(lines.length, 2, lines.join("\n"));
    assert.match(lines[0], /^vu-block: the back end went away \(it closed the connection\); reconnecting to /);
    assert.equal(lines[1], "vu-block: reconnected to the back end");

    // And the device is whole again: a read of what was written.
    const read = q.submit([header(VIRTIO_BLK_T_IN, 7), SECTOR, 1]);
    rig.notify();
    await until(() => q.usedIdx() === 3, "a read after the reconnection");
    assert.deepEqual(mem.read(read.buffers[1].addr, SECTOR), pattern(7));
  });
});

Deno.test("front end: INFLIGHT_SHMFD: the back end's inflight region is handed back after a reconnection, each ring from the used index", async () => {
  await withTempDir("denovm-vu-fe-", async (dir) => {
    const socket = `${dir}/rec.sock`;
    const backEnd = await startBackEnd({ kind: "recording", socket });
    const lines: string[] = [];
    // A device denovm has no model for: the generic front end (virtio-gpio's ID, one queue, no config).
    const dev = new VhostUserFrontEndDevice({ name: "vu-gpio", socket, deviceType: 41, log: (l) => lines.push(l) });
    const rig = new FrontEndRig(dev);
    const { mem } = rig;
    try {
      await dev.connect();
      assert.ok(dev.protocolFeatures & VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD);
      assert.deepEqual(dev.queueMaxSizes, [32768]);
      const drv = rig.driver();
      drv.init({ queueSize: QUEUE_SIZE });
      const first = (r: number) => backEnd.records.filter((x) => x.session === 0 && x.request === r);
      await until(() => first(R.SET_VRING_ENABLE).length === 1, "the first set-up");
      const given = first(R.GET_INFLIGHT_FD)[0].ino;
      assert.equal(first(R.SET_INFLIGHT_FD)[0].ino, given, "the region it gave is set at once");

      // The guest has seen 5 completions when the back end crashes.
      const usedIdxAddr = drv.queues[0].addrs.usedRing + VIRTQ_USED_IDX;
      mem.setU16(usedIdxAddr, 5);
      backEnd.die();
      const second = (r: number) => backEnd.records.filter((x) => x.session === 1 && x.request === r);
      await until(() => second(R.SET_VRING_ENABLE).length === 1, "the set-up after the reconnection");
      assert.deepEqual(second(R.GET_INFLIGHT_FD), [], "no new region");
      assert.deepEqual(second(R.SET_INFLIGHT_FD).map((x) => x.ino), [given], "the same region handed back");
      assert.deepEqual(second(R.SET_VRING_BASE).map((x) => x.num), [5], "the ring goes on from the used index");
      const order = backEnd.records.filter((x) => x.session === 1).map((x) => x.request);
      assert.ok(order.indexOf(R.SET_INFLIGHT_FD) < order.indexOf(R.SET_VRING_KICK), "inflight before the rings");
      await until(() => dev.connected && dev.stats().reconnects === 1, "the reconnection");
      assert.deepEqual(lines.map((l) => l.replace(/ \(.*\);.*/, "")), [
        "vu-gpio: the back end went away",
        "vu-gpio: reconnected to the back end",
      ]);
    } finally {
      await rig.close();
      await backEnd.close();
    }
  });
});

Deno.test("front end: a config change the back end announces (CONFIG_CHANGE_MSG on the back-end channel) reaches the driver", async () => {
  await withBlockRig({}, async ({ backEnd, dev, rig, lines }) => {
    await dev.connect();
    assert.ok(dev.protocolFeatures & VHOST_USER_PROTOCOL_F_BACKEND_REQ);
    const irqs = { n: 0 };
    const drv = rig.driver(() => irqs.n++);
    drv.init({ queueSize: QUEUE_SIZE });
    const generation = drv.readReg(VIRTIO_MMIO_CONFIG_GENERATION);
    backEnd.resize(2 * DISK_SECTORS * SECTOR);
    await until(() => dev.stats().configChanges === 1, "the config change");
    assert.equal(new DataView(drv.readConfig(0, 8).buffer).getBigUint64(0, true), BigInt(2 * DISK_SECTORS));
    assert.equal(irqs.n, 1, "the transport's CONFIG interrupt");
    assert.ok(drv.ackInterrupt() & VIRTIO_MMIO_INT_CONFIG);
    assert.notEqual(drv.readReg(VIRTIO_MMIO_CONFIG_GENERATION), generation);
    assert.deepEqual(lines, []);
  });
});

Deno.test("front end: a config space the VMM provides (as for virtiofsd's tag) is what the driver reads; nothing is asked of the back end", async () => {
  await withTempDir("denovm-vu-fe-", async (dir) => {
    const socket = `${dir}/rec.sock`;
    const backEnd = await startBackEnd({ kind: "recording", socket });
    // virtio-fs's config (virtio 1.2 section 5.11.4): a 36-byte tag, then num_request_queues.
    const config = new Uint8Array(40);
    config.set(new TextEncoder().encode("shared"));
    new DataView(config.buffer).setUint32(36, 1, true);
    const dev = new VhostUserFrontEndDevice({ name: "vu-fs", socket, deviceType: 26, config, log: () => {} });
    try {
      await dev.connect();
      const got = new Uint8Array(40);
      dev.readConfig(0, got);
      assert.deepEqual(got, config);
      dev.writeConfig(0, new Uint8Array(4).fill(0xff));
      dev.readConfig(0, got);
      assert.deepEqual(got, config, "driver writes go nowhere");
      // The negotiation, and nothing about the config space.
      const expected = [R.SET_OWNER, R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.SET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM];
      assert.equal(dev.stats().requests, expected.length);
      await until(() => backEnd.records.length === expected.length, "the back end's records");
      assert.deepEqual(backEnd.records.map((r) => r.request), expected);
    } finally {
      dev.close();
      await dev.whenClosed();
      await backEnd.close();
    }
  });
});
