// The vhost-user front end against a back end no one here wrote: qemu-storage-daemon's vhost-user-blk export
// (QEMU's libvhost-user), driven by the test driver through the virtio-mmio transport, no KVM needed. The
// negotiation takes its protocol features (Debian 12's 7.2 offers MQ, REPLY_ACK, BACKEND_REQ and CONFIG; no
// INFLIGHT_SHMFD) and its config space; requests are served through the transport's own eventfds; the daemon
// is killed with SIGKILL, a write is queued while it is gone, and once it is started again on the same socket
// the front end reconnects, hands it the whole set-up (the ring from the used index), and the queued write
// completes without error. Skips without qemu-storage-daemon.

import assert from "node:assert/strict";
import { VhostUserFrontEndDevice } from "../../devices/vhost_user/front_end.ts";
import {
  VHOST_USER_PROTOCOL_F_CONFIG,
  VHOST_USER_PROTOCOL_F_MQ,
  VHOST_USER_PROTOCOL_F_REPLY_ACK,
} from "../../devices/vhost_user/protocol.ts";
import { VIRTIO_ID_BLOCK } from "../../devices/virtio/device.ts";
import {
  VIRTIO_MMIO_STATUS,
  VIRTIO_STATUS_DEVICE_NEEDS_RESET,
  VirtioMmioTransport,
} from "../../devices/virtio/mmio.ts";
import { OwnedGuestMemory } from "../../core/memory.ts";
import { MiB } from "../../core/units.ts";
import { closeFd, eventfd, eventfdWrite } from "../../ffi/libc.ts";
import { VirtioTestDriver } from "../support/virtio_driver.ts";
import { until } from "../support/vhost_user_front_end.ts";
import { withTempDir } from "../support/temp_dir.ts";

const QSD = "qemu-storage-daemon";
const qsdPath = (() => {
  for (const dir of (Deno.env.get("PATH") ?? "").split(":")) {
    try {
      if (Deno.statSync(`${dir}/${QSD}`).isFile) return `${dir}/${QSD}`;
    } catch {
      // not there
    }
  }
  return undefined;
})();
if (!qsdPath) console.log(`qsd_front_end_test: skipped: no ${QSD} on PATH`);

/** virtio 1.2 section 5.2.6: request types, the header's size, the OK status; sectors are 512 bytes. */
const VIRTIO_BLK_T_IN = 0;
const VIRTIO_BLK_T_OUT = 1;
const BLK_OUTHDR_SIZE = 16;
const VIRTIO_BLK_S_OK = 0;
const SECTOR = 512;
const DISK_SECTORS = 2048;
const RAM = 16 * MiB;
const QUEUE_SIZE = 8;
/** Hang guard for the daemon's socket to appear. */
const CONNECT_TIMEOUT_MS = 20_000;

function header(type: number, sector: number): Uint8Array {
  const b = new Uint8Array(BLK_OUTHDR_SIZE);
  const v = new DataView(b.buffer);
  v.setUint32(0, type, true);
  v.setBigUint64(8, BigInt(sector), true);
  return b;
}

function pattern(seed: number): Uint8Array {
  return Uint8Array.from({ length: SECTOR }, (_, i) => (i * 11 + seed) & 0xff);
}

function startQsd(disk: string, socket: string): Deno.ChildProcess {
  return new Deno.Command(qsdPath!, {
    args: [
      "--blockdev",
      `driver=file,node-name=disk,filename=${disk}`,
      "--export",
      `type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path=${socket},writable=on`,
    ],
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).spawn();
}

Deno.test({
  name:
    "front end against qemu-storage-daemon: negotiation, requests, SIGKILL and restart with a write queued meanwhile",
  ignore: !qsdPath,
  async fn() {
    await withTempDir("denovm-vu-qsd-", async (dir) => {
      const disk = `${dir}/disk.img`;
      Deno.writeFileSync(disk, new Uint8Array(DISK_SECTORS * SECTOR));
      const socket = `${dir}/blk.sock`;
      let qsd = startQsd(disk, socket);
      const lines: string[] = [];
      const dev = new VhostUserFrontEndDevice({
        name: "qsd-block",
        socket,
        deviceType: VIRTIO_ID_BLOCK,
        connectTimeoutMs: CONNECT_TIMEOUT_MS,
        log: (l) => lines.push(l),
      });
      const mem = OwnedGuestMemory.allocateShared([{ start: 0, size: RAM }]);
      const irqFd = eventfd();
      const notifyFds = [eventfd()];
      try {
        await dev.connect();
        for (const f of [VHOST_USER_PROTOCOL_F_MQ, VHOST_USER_PROTOCOL_F_REPLY_ACK, VHOST_USER_PROTOCOL_F_CONFIG]) {
          assert.ok(dev.protocolFeatures & f, `protocol features 0x${dev.protocolFeatures.toString(16)}`);
        }
        const cap = new Uint8Array(8);
        dev.readConfig(0, cap);
        assert.equal(new DataView(cap.buffer).getBigUint64(0, true), BigInt(DISK_SECTORS), "its config space");

        const t = new VirtioMmioTransport(dev, mem, { irq: { trigger: () => {} }, notifyFds, irqFd });
        const drv = new VirtioTestDriver(t, mem, { start: 0x1000, end: RAM });
        drv.init({ queueSize: QUEUE_SIZE });
        assert.equal(drv.readReg(VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_DEVICE_NEEDS_RESET, 0);
        const q = drv.queues[0];
        q.submit([header(VIRTIO_BLK_T_OUT, 3), pattern(3), 1]);
        eventfdWrite(notifyFds[0]);
        await until(() => q.usedIdx() === 1, "the first write");
        q.used();

        qsd.kill("SIGKILL");
        await qsd.status;
        await until(() => !dev.connected, "the loss to be seen");
        const queued = q.submit([header(VIRTIO_BLK_T_OUT, 4), pattern(4), 1]);
        eventfdWrite(notifyFds[0]);

        qsd = startQsd(disk, socket);
        await until(() => q.usedIdx() === 2, "the queued write after the restart");
        q.used();
        assert.equal(mem.read(queued.buffers[2].addr, 1)[0], VIRTIO_BLK_S_OK);
        const read = q.submit([header(VIRTIO_BLK_T_IN, 4), SECTOR, 1]);
        eventfdWrite(notifyFds[0]);
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
        dev.close();
        await dev.whenClosed();
        try {
          qsd.kill("SIGKILL");
        } catch {
          // already gone
        }
        await qsd.status;
        closeFd(irqFd);
        notifyFds.forEach(closeFd);
        mem.close();
      }
    });
  },
});
