// The vhost-user front end (devices/vhost_user/front_end.ts) against hostile and failing back ends: replies
// of the wrong size, for another request, with an unknown code or an oversized header; a connection dropped
// at connect, at DRIVER_OK or while the device runs; a back end that never answers; a config space of the
// wrong size; an absurd queue count; a failure status. Each is one line (a thrown error at connect, one log
// line afterwards) and a failed device; nothing escapes, and the test process (the VMM) goes on. A `denovm
// run` against such a back end exits with one line.

import assert from "node:assert/strict";
import { VhostUserFrontEndDevice } from "../../devices/vhost_user/front_end.ts";
import { VhostUserProtocolError } from "../../devices/vhost_user/protocol.ts";
import { VIRTIO_MMIO_STATUS, VIRTIO_STATUS_DEVICE_NEEDS_RESET } from "../../devices/virtio/mmio.ts";
import { EXIT_HOST_ERROR } from "../../core/exit.ts";
import type { VirtioTestDriver } from "../support/virtio_driver.ts";
import { HOSTILE_QUEUES, type Hostility, startBackEnd } from "../support/vhost_user_back_end_worker.ts";
import { blockFrontEnd, FrontEndRig, RIG_QUEUE_SIZE } from "../support/front_end_rig.ts";
import { until } from "../support/vhost_user_front_end.ts";
import { withTempDir } from "../support/temp_dir.ts";
import { captureVirtioLog } from "../support/device_rig.ts";
import { assertOneLineRefusal, denovm } from "../support/cli.ts";
import { buildGuest } from "../guests/build.ts";

/** Short: the "silent" back end is waited for this long before it counts as gone. */
const REPLY_TIMEOUT_MS = 300;

function frontEnd(socket: string, lines: string[]): VhostUserFrontEndDevice {
  return blockFrontEnd("hostile", socket, lines, { replyTimeoutMs: REPLY_TIMEOUT_MS });
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
        await dev.whenClosed();
        await backEnd.close();
      }
    });
  });
}

interface HostileRig {
  dev: VhostUserFrontEndDevice;
  /** Its driver, the device negotiated with the back end (connect() done). */
  drv: VirtioTestDriver;
  /** The front end's log lines. */
  lines: string[];
  /** The transport's log lines (the guest's side). */
  guest: { lines: string[] };
}

/**
 * `body` with the hostile back end misbehaving as `hostility`, a front end connected to it, and a driver on a
 * rig around that (not yet initialised), the transport's log captured; all closed after.
 */
async function withHostileRig(hostility: Hostility, body: (h: HostileRig) => void | Promise<void>): Promise<void> {
  await withTempDir("denovm-vu-hostile-", async (dir) => {
    const socket = `${dir}/hostile.sock`;
    const backEnd = await startBackEnd({ kind: "hostile", socket, hostility, configSize: 60 });
    const lines: string[] = [];
    const dev = frontEnd(socket, lines);
    const rig = new FrontEndRig(dev, { queues: Number(HOSTILE_QUEUES) });
    const guest = captureVirtioLog();
    try {
      await dev.connect();
      await body({ dev, drv: rig.driver(), lines, guest });
    } finally {
      guest.restore();
      await rig.close();
      await backEnd.close();
    }
  });
}

/** Each misbehaviour at DRIVER_OK, and the one line the transport logs for it. */
const AT_ACTIVATE: [Hostility, RegExp][] = [
  ["fail-mem-table", /activation failed: hostile: back end failed: SET_MEM_TABLE: the back end failed it \(status 1\)/],
];

for (const [hostility, expected] of AT_ACTIVATE) {
  Deno.test(`hostile back end (${hostility}): DRIVER_OK fails the device in one line; DEVICE_NEEDS_RESET; later accesses are quiet`, async () => {
    await withHostileRig(hostility, ({ dev, drv, lines, guest }) => {
      drv.init({ queueSize: RIG_QUEUE_SIZE });
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
      drv.init({ queueSize: RIG_QUEUE_SIZE });
      assert.ok(drv.readReg(VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_DEVICE_NEEDS_RESET);
      assert.equal(guest.lines.length, 2);
      assert.match(guest.lines[1], /activation failed: hostile: back end failed; device needs reset/);
      assert.deepEqual(lines, []);
      assert.equal(dev.stats().failures, 1);
    });
  });
}

Deno.test("hostile back end (drop-at-activate): it drops every set-up after reconnecting; the device fails after a bounded number of tries, one line each for the loss and the failure", async () => {
  await withHostileRig("drop-at-activate", async ({ dev, drv, lines, guest }) => {
    drv.init({ queueSize: RIG_QUEUE_SIZE });
    await until(() => dev.failed !== undefined, "the device to fail");
    assert.equal(lines.length, 2, lines.join("\n"));
    assert.match(
      lines[0],
      /^hostile: the back end went away \(SET_MEM_TABLE: the back end closed the connection\); reconnecting to /,
    );
    assert.match(lines[1], /^hostile: back end failed: SET_MEM_TABLE: the back end closed the connection$/);
    assert.deepEqual(guest.lines, []);
    // The driver's reset and config accesses send nothing and log nothing.
    drv.writeReg(VIRTIO_MMIO_STATUS, 0);
    dev.writeConfig(0, new Uint8Array(4));
    assert.equal(lines.length, 2);
  });
});

Deno.test("a back end that goes away while its device runs: one line; the driver's reset meanwhile sends nothing", async () => {
  await withTempDir("denovm-vu-hostile-", async (dir) => {
    const disk = `${dir}/disk.img`;
    Deno.writeFileSync(disk, new Uint8Array(1024 * 512));
    const socket = `${dir}/blk.sock`;
    const backEnd = await startBackEnd({ kind: "block", socket, path: disk });
    const lines: string[] = [];
    const dev = frontEnd(socket, lines);
    const rig = new FrontEndRig(dev);
    try {
      await dev.connect();
      const drv = rig.driver();
      drv.init({ queueSize: RIG_QUEUE_SIZE });
      assert.equal(drv.readReg(VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_DEVICE_NEEDS_RESET, 0);
      await backEnd.close();
      await until(() => !dev.connected, "the loss to be seen");
      drv.writeReg(VIRTIO_MMIO_STATUS, 0);
      dev.writeConfig(0, new Uint8Array(4));
      assert.equal(lines.length, 1, lines.join("\n"));
      assert.match(
        lines[0],
        /^hostile: the back end went away \(it closed the connection\); reconnecting to .*blk\.sock$/,
      );
      assert.equal(dev.failed, undefined, "still waiting for it to come back");
    } finally {
      await rig.close();
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
