// The vhost-user message codec: what a front end's malformed header or payload becomes (a VhostUserProtocolError
// naming the request), and that the encoders and parsers agree.

import assert from "node:assert/strict";
import {
  CONFIG_HEADER_SIZE,
  configPayload,
  encodeMessage,
  INFLIGHT_SIZE,
  inflightPayload,
  MEM_REGION_SIZE,
  memTablePayload,
  parseConfig,
  parseHeader,
  parseInflight,
  parseMemTable,
  parseU64,
  parseVringAddr,
  parseVringState,
  readMessage,
  requestName,
  u64Payload,
  VHOST_MEMORY_BASELINE_NREGIONS,
  VHOST_USER_FLAG_REPLY,
  VHOST_USER_HEADER_SIZE,
  VHOST_USER_MAX_CONFIG_SIZE,
  VHOST_USER_MAX_PAYLOAD,
  VHOST_USER_VERSION,
  type VhostUserMessage,
  VhostUserProtocolError,
  VhostUserRequest as R,
  vringAddrPayload,
  vringStatePayload,
} from "./protocol.ts";
import { ConnectionClosed, UnixListener, UnixStream } from "../../core/unix_socket.ts";
import { closeFd, eventfd } from "../../ffi/libc.ts";

function msg(request: number, payload: Uint8Array<ArrayBuffer>): VhostUserMessage {
  return { request, flags: VHOST_USER_VERSION, payload, fds: [] };
}

/** A connected pair of Unix stream sockets in a fresh directory. */
async function socketPair(): Promise<{ client: UnixStream; server: UnixStream; close(): Promise<void> }> {
  const dir = await Deno.makeTempDir({ prefix: "denovm-vu-proto-" });
  const listener = UnixListener.listen(`${dir}/s`);
  const accepted = listener.accept();
  const client = UnixStream.connect(`${dir}/s`);
  const server = await accepted;
  return {
    client,
    server,
    async close() {
      client.close();
      server.close();
      listener.close();
      await Deno.remove(dir, { recursive: true });
    },
  };
}

/** A header with any flags and size field (the payload, if any, follows). */
function header(request: number, flags: number, size: number): Uint8Array {
  const h = encodeMessage(request, flags);
  new DataView(h.buffer).setUint32(8, size, true);
  return h;
}

Deno.test("vhost-user protocol: request names, and an unknown code named by its number", () => {
  assert.equal(requestName(R.SET_MEM_TABLE), "SET_MEM_TABLE");
  assert.equal(requestName(R.GET_STATUS), "GET_STATUS");
  assert.equal(requestName(9999), "request 9999");
});

Deno.test("vhost-user protocol: fixed-size payloads of the wrong size are refused, naming the request", () => {
  assert.equal(parseU64(msg(R.SET_FEATURES, u64Payload(0x1234n) as Uint8Array<ArrayBuffer>)), 0x1234n);
  assert.throws(() => parseU64(msg(R.SET_FEATURES, new Uint8Array(4))), {
    name: "VhostUserProtocolError",
    message: "SET_FEATURES: payload of 4 bytes, expected 8",
  });
  const state = vringStatePayload({ index: 1, num: 256 }) as Uint8Array<ArrayBuffer>;
  assert.deepEqual(parseVringState(msg(R.SET_VRING_NUM, state)), { index: 1, num: 256 });
  assert.throws(() => parseVringState(msg(R.SET_VRING_NUM, new Uint8Array(12))), /SET_VRING_NUM: payload of 12/);
  const addr = { index: 0, flags: 1, desc: 0x1000n, used: 0x3000n, avail: 0x2000n, log: 0n };
  assert.deepEqual(parseVringAddr(msg(R.SET_VRING_ADDR, vringAddrPayload(addr) as Uint8Array<ArrayBuffer>)), addr);
  assert.throws(() => parseVringAddr(msg(R.SET_VRING_ADDR, new Uint8Array(0))), VhostUserProtocolError);
});

Deno.test("vhost-user protocol: SET_MEM_TABLE with no regions, too many, or a short payload is refused", () => {
  const region = { guestPhysAddr: 0x1000n, memorySize: 0x10000n, userspaceAddr: 0x7f00n, mmapOffset: 0n };
  const one = memTablePayload([region]) as Uint8Array<ArrayBuffer>;
  assert.deepEqual(parseMemTable(msg(R.SET_MEM_TABLE, one)), [region]);
  // The whole fixed array with num = 1 is the other accepted form.
  const fixed = new Uint8Array(8 + VHOST_MEMORY_BASELINE_NREGIONS * MEM_REGION_SIZE);
  fixed.set(one);
  assert.deepEqual(parseMemTable(msg(R.SET_MEM_TABLE, fixed)), [region]);

  assert.throws(() => parseMemTable(msg(R.SET_MEM_TABLE, new Uint8Array(4))), {
    message: "SET_MEM_TABLE: payload too short",
  });
  assert.throws(() => parseMemTable(msg(R.SET_MEM_TABLE, memTablePayload([]) as Uint8Array<ArrayBuffer>)), {
    message: `SET_MEM_TABLE: 0 regions (1..${VHOST_MEMORY_BASELINE_NREGIONS} allowed)`,
  });
  const nine = memTablePayload(Array(VHOST_MEMORY_BASELINE_NREGIONS + 1).fill(region)) as Uint8Array<ArrayBuffer>;
  assert.throws(() => parseMemTable(msg(R.SET_MEM_TABLE, nine)), /9 regions/);
  // num says two, the payload holds one.
  const lying = one.slice();
  new DataView(lying.buffer).setUint32(0, 2, true);
  assert.throws(() => parseMemTable(msg(R.SET_MEM_TABLE, lying)), {
    message: `SET_MEM_TABLE: payload of ${one.length} bytes cannot hold 2 regions`,
  });
});

Deno.test("vhost-user protocol: config payloads whose size field disagrees with the payload are refused", () => {
  const good = configPayload({ offset: 4, flags: 0, data: Uint8Array.of(1, 2, 3) }) as Uint8Array<ArrayBuffer>;
  assert.deepEqual(parseConfig(msg(R.SET_CONFIG, good)), {
    offset: 4,
    size: 3,
    flags: 0,
    data: Uint8Array.of(1, 2, 3),
  });
  assert.throws(() => parseConfig(msg(R.GET_CONFIG, new Uint8Array(CONFIG_HEADER_SIZE - 1))), {
    message: "GET_CONFIG: payload too short",
  });
  const short = good.slice(0, good.length - 1);
  assert.throws(() => parseConfig(msg(R.SET_CONFIG, short)), {
    message: `SET_CONFIG: config size 3 does not match payload of ${short.length} bytes`,
  });
  // A size above the limit is refused even when the payload carries that many bytes.
  const big = configPayload({ offset: 0, flags: 0, data: new Uint8Array(VHOST_USER_MAX_CONFIG_SIZE + 1) });
  assert.throws(() => parseConfig(msg(R.GET_CONFIG, big as Uint8Array<ArrayBuffer>)), /config size 257/);
});

Deno.test("vhost-user protocol: readMessage refuses a wrong reply flag or an oversized payload and closes passed fds", async () => {
  const p = await socketPair();
  try {
    // A reply where a request was expected; the descriptor that came with it is closed, not leaked.
    const openFds = () => [...Deno.readDirSync("/proc/self/fd")].length;
    const before = openFds();
    const efd = eventfd();
    await p.client.send(encodeMessage(R.GET_FEATURES, VHOST_USER_VERSION | VHOST_USER_FLAG_REPLY), [efd]);
    closeFd(efd);
    await assert.rejects(readMessage(p.server, false), {
      name: "VhostUserProtocolError",
      message: "GET_FEATURES: unexpected reply flag in 0x5",
    });
    assert.equal(openFds(), before, "the received copy of the eventfd was closed");
    // A request where a reply was expected.
    await p.client.send(encodeMessage(R.GET_FEATURES, VHOST_USER_VERSION));
    await assert.rejects(readMessage(p.server, true), /unexpected reply flag in 0x1/);
    // A size field above the protocol's limit: refused before any payload is read.
    await p.client.send(header(R.SET_CONFIG, VHOST_USER_VERSION, VHOST_USER_MAX_PAYLOAD + 1));
    await assert.rejects(readMessage(p.server), { message: `SET_CONFIG: payload of 4097 bytes is too large` });
    // A good message after them is read whole.
    await p.client.send(encodeMessage(R.SET_FEATURES, VHOST_USER_VERSION, u64Payload(7n)));
    const m = await readMessage(p.server);
    assert.equal(m.request, R.SET_FEATURES);
    assert.equal(parseU64(m), 7n);
    // A header cut short by the peer closing.
    await p.client.send(header(R.SET_FEATURES, VHOST_USER_VERSION, 8).subarray(0, VHOST_USER_HEADER_SIZE - 2));
    p.client.close();
    await assert.rejects(readMessage(p.server), ConnectionClosed);
  } finally {
    await p.close();
  }
});

Deno.test("vhost-user protocol: the inflight description is 24 bytes (QEMU's padded VhostUserInflight) and round-trips", () => {
  const i = { mmapSize: 1n << 33n, mmapOffset: 4096n, numQueues: 3, queueSize: 256 };
  const p = inflightPayload(i);
  assert.equal(p.length, INFLIGHT_SIZE);
  assert.equal(INFLIGHT_SIZE, 24);
  const msg = { request: 31, flags: 0, payload: p.slice(), fds: [] };
  assert.deepEqual(parseInflight(msg), i);
  assert.throws(() => parseInflight({ ...msg, payload: p.slice(0, 20) }), VhostUserProtocolError);
});

Deno.test("vhost-user protocol: parseHeader checks the header's length, version, reply flag and size", () => {
  const ok = encodeMessage(1, 0x1 | VHOST_USER_FLAG_REPLY, new Uint8Array(8)).subarray(0, 12);
  assert.deepEqual(parseHeader(ok, true), { request: 1, flags: 0x5, size: 8 });
  assert.throws(() => parseHeader(ok, false), /unexpected reply flag/);
  assert.throws(() => parseHeader(ok.subarray(0, 11), true), /a header of 11 bytes/);
  const v2 = ok.slice();
  v2[4] = 0x2 | VHOST_USER_FLAG_REPLY;
  assert.throws(() => parseHeader(v2, true), /unsupported version/);
});
