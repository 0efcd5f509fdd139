// The vhost-user back end's answers to requests a front end gets wrong: a malformed or unknown request drops
// that front end with one log line and the back end serves the next one; a request it declines or takes with a
// warning is answered and the connection stays up. The device is virtio-rng (no memory is mapped here).

import assert from "node:assert/strict";
import { VhostUserBackend } from "./backend.ts";
import {
  configPayload,
  readMessage,
  u64Payload,
  VHOST_USER_F_PROTOCOL_FEATURES,
  VhostUserRequest as R,
  vringStatePayload,
} from "./protocol.ts";
import { RngDevice } from "../virtio/rng.ts";
import { ConnectionClosed } from "../../core/unix_socket.ts";
import { u64, until, VhostUserFrontEnd } from "../../test/support/vhost_user_front_end.ts";

/** An rng back end on a fresh socket, its log lines kept. */
async function startBackend() {
  const dir = await Deno.makeTempDir({ prefix: "denovm-vu-req-" });
  const path = `${dir}/rng.sock`;
  const device = new RngDevice();
  const logs: string[] = [];
  const backend = new VhostUserBackend(device, path, { log: (l) => logs.push(l) });
  const served = backend.serve();
  await backend.listening;
  return {
    path,
    device,
    logs,
    backend,
    async close() {
      backend.close();
      await served;
      await Deno.remove(dir, { recursive: true });
    },
  };
}

Deno.test("vhost-user back end: each malformed request drops only its front end, with one line naming it", async () => {
  const b = await startBackend();
  // What the front end sends, and the line the back end logs before hanging up.
  const cases: { what: string; send: (fe: VhostUserFrontEnd) => Promise<void>; line: RegExp }[] = [
    { what: "an unknown request", send: (fe) => fe.send(9999), line: /dropping the front end: unknown request 9999$/ },
    {
      what: "a queue the device does not have",
      send: (fe) => fe.send(R.SET_VRING_BASE, vringStatePayload({ index: 7, num: 0 })),
      line: /queue index 7 \(device has 1 queues\)/,
    },
    {
      what: "a back-end request channel without its descriptor",
      send: (fe) => fe.send(R.SET_BACKEND_REQ_FD),
      line: /SET_BACKEND_REQ_FD with 0 fds/,
    },
    {
      what: "a feature word of 4 bytes",
      send: (fe) => fe.send(R.SET_FEATURES, new Uint8Array(4)),
      line: /SET_FEATURES: payload of 4 bytes, expected 8/,
    },
    {
      what: "a config read whose size disagrees with its payload",
      send: (fe) => fe.send(R.GET_CONFIG, configPayload({ offset: 0, flags: 0, data: new Uint8Array(4) }).slice(0, 14)),
      line: /GET_CONFIG: config size 4 does not match payload of 14 bytes/,
    },
    {
      what: "a kick descriptor missing",
      send: (fe) => fe.send(R.SET_VRING_KICK, u64Payload(0n)),
      line: /SET_VRING_KICK: 0 descriptors with NOFD=false/,
    },
  ];
  try {
    for (const [i, c] of cases.entries()) {
      const fe = VhostUserFrontEnd.connect(b.path);
      await c.send(fe);
      await assert.rejects(readMessage(fe.sock, true), ConnectionClosed, `${c.what}: the back end hangs up`);
      fe.close();
      await until(() => b.logs.length > i, `${c.what}: the log line`);
      assert.match(b.logs[i], c.line, c.what);
    }
    assert.equal(b.logs.length, cases.length, "one line a front end");
    // The next front end is served as if nothing happened.
    const fe = VhostUserFrontEnd.connect(b.path);
    assert.equal(u64(await fe.call(R.GET_QUEUE_NUM)), 1n);
    fe.close();
    assert.equal(b.backend.connections, cases.length + 1);
  } finally {
    await b.close();
  }
});

Deno.test("vhost-user back end: unoffered feature bits are logged and dropped; declined requests fail; RESET_OWNER acks", async () => {
  const b = await startBackend();
  try {
    const fe = VhostUserFrontEnd.connect(b.path);
    const offered = u64(await fe.call(R.GET_FEATURES));
    assert.equal(offered, b.device.features | VHOST_USER_F_PROTOCOL_FEATURES);
    const stray = 1n << 40n;
    assert.equal(await fe.ack(R.SET_FEATURES, u64Payload(offered | stray)), 0n, "the request itself succeeds");
    assert.deepEqual(b.logs, [`front end acked features it was not offered: 0x${stray.toString(16)}`]);

    // Requests this back end declines get a failure status and one line each; the connection stays up.
    assert.equal(await fe.ack(R.SET_LOG_FD), 1n);
    assert.equal(await fe.ack(R.SET_VRING_ENDIAN, vringStatePayload({ index: 0, num: 0 })), 1n);
    assert.deepEqual(b.logs.slice(1), [
      "SET_LOG_FD failed: not supported by this back end",
      "SET_VRING_ENDIAN failed: not supported by this back end",
    ]);

    // RESET_OWNER and RESET_DEVICE forget the negotiated state and succeed.
    assert.equal(await fe.ack(R.RESET_OWNER), 0n);
    assert.equal(await fe.ack(R.RESET_DEVICE), 0n);
    assert.equal(await fe.ack(R.SET_OWNER), 0n);
    // Without NEED_REPLY a request with no reply of its own gets none: the next answer is GET_QUEUE_NUM's.
    await fe.send(R.SET_OWNER);
    assert.equal(u64(await fe.call(R.GET_QUEUE_NUM)), 1n);
    // The rng has no config space: a config read is zeroes.
    const cfg = await fe.call(R.GET_CONFIG, configPayload({ offset: 0, flags: 0, data: Uint8Array.of(7, 7) }));
    assert.deepEqual([...cfg.payload.subarray(12)], [0, 0]);
    assert.equal(b.backend.counters?.activations, 0, "no ring was started");
    assert.equal(b.logs.length, 3);
    fe.close();
    await until(() => b.logs.length === 4, "the disconnect line");
    assert.equal(b.logs[3], "front end disconnected; waiting for the next one");
  } finally {
    await b.close();
  }
});
