// The vhost-user front end (devices/vhost_user/front_end.ts) against hostile and failing back ends: replies
// of the wrong size, for another request, with an unknown code or an oversized header; a connection dropped
// at connect, at DRIVER_OK or while the device runs; a back end that never answers; a config space of the
// wrong size; an absurd queue count; a failure status. Each is one line (a thrown error at connect, one log
// line afterwards) and a failed device; nothing escapes, and the test process (the VMM) goes on. A `denovm
// run` against such a back end exits with one line.

import assert from "node:assert/strict";
import { VhostUserFrontEndDevice } from "../../devices/vhost_user/front_end.ts";
import { VhostUserProtocolError } from "../../devices/vhost_user/protocol.ts";
import { VIRTIO_ID_BLOCK } from "../../devices/virtio/device.ts";
import {
  VIRTIO_MMIO_STATUS,
  VIRTIO_STATUS_DEVICE_NEEDS_RESET,
  VirtioMmioTransport,
} from "../../devices/virtio/mmio.ts";
import { OwnedGuestMemory } from "../../core/memory.ts";
import { EXIT_HOST_ERROR } from "../../core/exit.ts";
import { closeFd, eventfd } from "../../ffi/libc.ts";
import { MiB } from "../../core/units.ts";
import { VirtioTestDriver } from "../support/virtio_driver.ts";
import { type Hostility, startBackEnd } from "../support/vhost_user_back_end_worker.ts";
import { withTempDir } from "../support/temp_dir.ts";
import { captureVirtioLog } from "../support/device_rig.ts";
import { assertOneLineRefusal, denovm } from "../support/cli.ts";
import { buildGuest } from "../guests/build.ts";

/** Short: the "silent" back end is waited for this long before it counts as gone. */
const REPLY_TIMEOUT_MS = 300;
const RAM = 16 * MiB;

function frontEnd(socket: string, lines: string[]): VhostUserFrontEndDevice {
  return new VhostUserFrontEndDevice({
    name: "hostile",
    socket,
    deviceType: VIRTIO_ID_BLOCK,
    replyTimeoutMs: REPLY_TIMEOUT_MS,
    log: (l) => lines.push(l),
  });
}

/** Each misbehaviour during connect, and the one line it gives. */
const AT_CONNECT: [Hostility, RegExp][] = [
  ["short-features", /^hostile: GET_FEATURES: a reply of 4 bytes, expected 8$/],
  ["mismatched-reply", /^hostile: GET_PROTOCOL_FEATURES: the back end answered GET_FEATURES$/],
  ["unknown-reply", /^hostile: GET_FEATURES: the back end answered request 999$/],
  ["huge-size", /^hostile: GET_FEATURES: payload of 1073741824 bytes is too large$/],
  ["drop", /^hostile: (SET_OWNER|GET_FEATURES): the back end closed the connection$/],
  ["silent", /^hostile: GET_FEATURES: no reply within 300 ms$/],
  ["config-size", /^hostile: GET_CONFIG: the back end answered 56 bytes at offset 0, asked for 60 at 0$/],
  ["queue-num", /^hostile: GET_QUEUE_NUM: 1099511627776 queues \(1\.\.256 allowed\)$/],
];

for (const [hostility, expected] of AT_CONNECT) {
  Deno.test(`hostile back end (${hostility}): connect fails with one line, nothing logged, the process goes on`, async () => {
    await withTempDir("denovm-vu-hostile-", async (dir) => {
      const socket = `${dir}/hostile.sock`;
      const backEnd = await startBackEnd({ kind: "hostile", socket, hostility, configSize: 60 });
      const lines: string[] = [];
      const dev = frontEnd(socket, lines);
      try {
        await assert.rejects(dev.connect(), (e: Error) => {
          assert.ok(e instanceof VhostUserProtocolError, `${e.name}: ${e.message}`);
          assert.match(e.message, expected);
          assert.ok(!e.message.includes("\n"));
          return true;
        });
        assert.deepEqual(lines, []);
      } finally {
        dev.close();
        await backEnd.close();
      }
    });
  });
}

/** Each misbehaviour at DRIVER_OK, and the one line the transport logs for it. */
const AT_ACTIVATE: [Hostility, RegExp][] = [
  ["fail-mem-table", /activation failed: hostile: back end failed: SET_MEM_TABLE: the back end failed it \(status 1\)/],
  [
    "drop-at-activate",
    /activation failed: hostile: back end failed: SET_MEM_TABLE: the back end closed the connection/,
  ],
];

for (const [hostility, expected] of AT_ACTIVATE) {
  Deno.test(`hostile back end (${hostility}): DRIVER_OK fails the device in one line; DEVICE_NEEDS_RESET; later accesses are quiet`, async () => {
    await withTempDir("denovm-vu-hostile-", async (dir) => {
      const socket = `${dir}/hostile.sock`;
      const backEnd = await startBackEnd({ kind: "hostile", socket, hostility, configSize: 60 });
      const lines: string[] = [];
      const dev = frontEnd(socket, lines);
      const mem = OwnedGuestMemory.allocateShared([{ start: 0, size: RAM }]);
      const irqFd = eventfd();
      const notifyFds = [eventfd(), eventfd()];
      const guest = captureVirtioLog();
      try {
        await dev.connect();
        const t = new VirtioMmioTransport(dev, mem, { irq: { trigger: () => {} }, notifyFds, irqFd });
        const drv = new VirtioTestDriver(t, mem, { start: 0x1000, end: RAM });
        drv.init({ queueSize: 8 });
        const status = drv.readReg(VIRTIO_MMIO_STATUS);
        assert.ok(status & VIRTIO_STATUS_DEVICE_NEEDS_RESET);
        assert.equal(guest.lines.length, 1, guest.lines.join("\n"));
        assert.match(guest.lines[0], expected);
        assert.ok(dev.failed);
        // The driver resets it, reads and writes its config: nothing is sent, nothing logged. Starting it
        // again fails at once, one line for that attempt.
        drv.writeReg(VIRTIO_MMIO_STATUS, 0);
        drv.readConfig(0, 8);
        dev.writeConfig(0, new Uint8Array(4));
        assert.equal(guest.lines.length, 1);
        drv.init({ queueSize: 8 });
        assert.ok(drv.readReg(VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_DEVICE_NEEDS_RESET);
        assert.equal(guest.lines.length, 2);
        assert.match(guest.lines[1], /activation failed: hostile: back end failed; device needs reset/);
        assert.deepEqual(lines, []);
        assert.equal(dev.stats().failures, 1);
      } finally {
        guest.restore();
        dev.close();
        await backEnd.close();
        closeFd(irqFd);
        notifyFds.forEach(closeFd);
        mem.close();
      }
    });
  });
}

Deno.test("a back end that goes away while its device runs: the driver's reset fails the device with one log line", async () => {
  await withTempDir("denovm-vu-hostile-", async (dir) => {
    const disk = `${dir}/disk.img`;
    Deno.writeFileSync(disk, new Uint8Array(1024 * 512));
    const socket = `${dir}/blk.sock`;
    const backEnd = await startBackEnd({ kind: "block", socket, path: disk });
    const lines: string[] = [];
    const dev = frontEnd(socket, lines);
    const mem = OwnedGuestMemory.allocateShared([{ start: 0, size: RAM }]);
    const irqFd = eventfd();
    const notifyFds = [eventfd()];
    try {
      await dev.connect();
      const t = new VirtioMmioTransport(dev, mem, { irq: { trigger: () => {} }, notifyFds, irqFd });
      const drv = new VirtioTestDriver(t, mem, { start: 0x1000, end: RAM });
      drv.init({ queueSize: 8 });
      assert.equal(drv.readReg(VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_DEVICE_NEEDS_RESET, 0);
      await backEnd.close();
      drv.writeReg(VIRTIO_MMIO_STATUS, 0);
      assert.equal(lines.length, 1, lines.join("\n"));
      assert.match(
        lines[0],
        /^hostile: back end failed: (SET_VRING_ENABLE|GET_VRING_BASE): the back end closed the connection$/,
      );
      // Nothing further is logged however the driver goes on.
      drv.writeReg(VIRTIO_MMIO_STATUS, 0);
      dev.writeConfig(0, new Uint8Array(4));
      assert.equal(lines.length, 1);
    } finally {
      dev.close();
      closeFd(irqFd);
      notifyFds.forEach(closeFd);
      mem.close();
    }
  });
});

Deno.test("denovm run against a back end that answers the wrong request: one line, exit 1", async () => {
  const kernel = await buildGuest("virtio");
  await withTempDir("denovm-vu-hostile-", async (dir) => {
    const socket = `${dir}/hostile.sock`;
    const backEnd = await startBackEnd({ kind: "hostile", socket, hostility: "mismatched-reply", configSize: 60 });
    try {
      const r = await denovm("run", "--vhost-user", `type=block,socket=${socket}`, kernel);
      assertOneLineRefusal(
        r,
        EXIT_HOST_ERROR,
        /--vhost-user block,socket=.*: vhost-user-block: GET_PROTOCOL_FEATURES: the back end answered GET_FEATURES/,
        "mismatched reply",
      );
    } finally {
      await backEnd.close();
    }
  });
});
