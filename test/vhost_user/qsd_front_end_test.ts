// The vhost-user front end against a back end no one here wrote: qemu-storage-daemon's vhost-user-blk export
// (QEMU's libvhost-user), driven by the test driver through the virtio-mmio transport, no KVM needed. The
// negotiation takes its protocol features (Debian 12's 7.2 offers MQ, REPLY_ACK, BACKEND_REQ and CONFIG; no
// INFLIGHT_SHMFD) and its config space; requests are served through the transport's own eventfds; the daemon
// is killed with SIGKILL, a write is queued while it is gone, and once it is started again on the same socket
// the front end reconnects, hands it the whole set-up (the ring from the used index), and the queued write
// completes without error. Skips without qemu-storage-daemon.

import assert from "node:assert/strict";
import {
  VHOST_USER_PROTOCOL_F_CONFIG,
  VHOST_USER_PROTOCOL_F_MQ,
  VHOST_USER_PROTOCOL_F_REPLY_ACK,
} from "../../devices/vhost_user/protocol.ts";
import {
  SECTOR_SIZE as SECTOR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
} from "../../devices/virtio/block/device.ts";
import { VIRTIO_MMIO_STATUS, VIRTIO_STATUS_DEVICE_NEEDS_RESET } from "../../devices/virtio/mmio.ts";
import { until } from "../support/vhost_user_front_end.ts";
import { withTempDir } from "../support/temp_dir.ts";
import { blockFrontEnd, FrontEndRig, RIG_QUEUE_SIZE as QUEUE_SIZE } from "../support/front_end_rig.ts";
import { blkHeader as header, sectorPattern as pattern } from "../support/blk_request.ts";
import { StorageDaemon, storageDaemonUnavailable } from "../support/storage_daemon.ts";

const skip = storageDaemonUnavailable();
if (skip) console.log(`qsd_front_end_test: skipped: ${skip}`);

const DISK_SECTORS = 2048;
/** Hang guard for the daemon's socket to appear. */
const CONNECT_TIMEOUT_MS = 20_000;

Deno.test({
  name:
    "front end against qemu-storage-daemon: negotiation, requests, SIGKILL and restart with a write queued meanwhile",
  ignore: skip !== undefined,
  async fn() {
    await withTempDir("denovm-vu-qsd-", async (dir) => {
      const disk = `${dir}/disk.img`;
      Deno.writeFileSync(disk, new Uint8Array(DISK_SECTORS * SECTOR));
      const socket = `${dir}/blk.sock`;
      let qsd = StorageDaemon.start(disk, socket);
      const lines: string[] = [];
      const dev = blockFrontEnd("qsd-block", socket, lines, { connectTimeoutMs: CONNECT_TIMEOUT_MS });
      const rig = new FrontEndRig(dev);
      const { mem } = rig;
      try {
        await dev.connect();
        for (const f of [VHOST_USER_PROTOCOL_F_MQ, VHOST_USER_PROTOCOL_F_REPLY_ACK, VHOST_USER_PROTOCOL_F_CONFIG]) {
          assert.ok(dev.protocolFeatures & f, `protocol features 0x${dev.protocolFeatures.toString(16)}`);
        }
        const cap = new Uint8Array(8);
        dev.readConfig(0, cap);
        assert.equal(new DataView(cap.buffer).getBigUint64(0, true), BigInt(DISK_SECTORS), "its config space");

        const drv = rig.driver();
        drv.init({ queueSize: QUEUE_SIZE });
        assert.equal(drv.readReg(VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_DEVICE_NEEDS_RESET, 0);
        const q = drv.queues[0];
        q.submit([header(VIRTIO_BLK_T_OUT, 3), pattern(3), 1]);
        rig.notify();
        await until(() => q.usedIdx() === 1, "the first write");
        q.used();

        await qsd.kill();
        await until(() => !dev.connected, "the loss to be seen");
        const queued = q.submit([header(VIRTIO_BLK_T_OUT, 4), pattern(4), 1]);
        rig.notify();

        qsd = StorageDaemon.start(disk, socket);
        await until(() => q.usedIdx() === 2, "the queued write after the restart");
        q.used();
        assert.equal(mem.read(queued.buffers[2].addr, 1)[0], VIRTIO_BLK_S_OK);
        const read = q.submit([header(VIRTIO_BLK_T_IN, 4), SECTOR, 1]);
        rig.notify();
        await until(() => q.usedIdx() === 3, "a read after the restart");
        assert.deepEqual(mem.read(read.buffers[1].addr, SECTOR), pattern(4));
        const image = Deno.readFileSync(disk);
        assert.deepEqual(image.subarray(3 * SECTOR, 4 * SECTOR), pattern(3));
        assert.deepEqual(image.subarray(4 * SECTOR, 5 * SECTOR), pattern(4));
        assert.equal(dev.stats().reconnects, 1);
        assert.equal(lines.length, 2, lines.join("\n"));
        assert.match(lines[0], /^qsd-block: the back end went away \(it closed the connection\); reconnecting to /);
        assert.equal(lines[1], "qsd-block: reconnected to the back end");
      } finally {
        await rig.close();
        await qsd.kill();
      }
    });
  },
});
