// A page's WebSocket (websocket.ts, the `ws` package behind node:http's upgrade) against a raw TCP peer: the
// handshake, what a peer may send, the closing handshake, and a peer that never reads.

import assert from "node:assert/strict";
import http from "node:http";
import type { AddressInfo } from "node:net";
import { CLOSE_NORMAL, type PageSocket, PageSocketServer } from "./websocket.ts";

const enc = new TextEncoder(), dec = new TextDecoder();
/** A guard against waiting forever for something that should happen (not a measurement). */
const GUARD_MS = 10_000;
const LOW_WATER = 1024;
/** RFC 6455 section 1.3's worked example. */
const EXAMPLE_KEY = "dGhlIHNhbXBsZSBub25jZQ==";
const EXAMPLE_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function until(what: string, cond: () => boolean): Promise<void> {
  const deadline = Date.now() + GUARD_MS;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`gave up waiting: ${what}`);
    await sleep(10);
  }
}

/** A masked client frame (RFC 6455 section 5.2) with a 7- or 16-bit length. */
function clientFrame(b0: number, payload: Uint8Array, masked = true): Uint8Array {
  const mask = Uint8Array.of(1, 2, 3, 4);
  const len = payload.length < 126 ? [payload.length] : [126, payload.length >> 8, payload.length & 0xff];
  const head = [b0, (masked ? 0x80 : 0) | len[0], ...len.slice(1), ...(masked ? mask : [])];
  const out = new Uint8Array(head.length + payload.length);
  out.set(head);
  for (let i = 0; i < payload.length; i++) out[head.length + i] = masked ? payload[i] ^ mask[i & 3] : payload[i];
  return out;
}

function upgradeRequest(port: number, key: string): Uint8Array {
  return enc.encode(
    `GET /ws HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
      `Sec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n\r\n`,
  );
}

/** A node:http server whose upgrades become PageSockets, recording each one's messages and end. */
async function pageServer(maxMessageBytes: number) {
  const sockets = new PageSocketServer({ maxMessageBytes, lowWaterBytes: LOW_WATER });
  const pages: { ws: PageSocket; messages: string[]; closed: boolean; drains: number }[] = [];
  const server = http.createServer();
  server.on("upgrade", (req, socket, head) => {
    sockets.handleUpgrade(req, socket, head, (ws) => {
      const p = { ws, messages: [] as string[], closed: false, drains: 0 };
      pages.push(p);
      ws.start({ onMessage: (t) => p.messages.push(t), onClose: () => p.closed = true, onDrain: () => p.drains++ });
    });
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const port = (server.address() as AddressInfo).port;
  return {
    port,
    pages,
    close: () => new Promise<void>((r) => server.close(() => r())),
  };
}

/** Connect and send `bytes` (a request head, maybe with frames after it); the response head and what follows. */
async function connect(port: number, bytes: Uint8Array) {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  await conn.write(bytes);
  let got: Uint8Array = new Uint8Array(0);
  const buf = new Uint8Array(4096);
  let end = -1;
  while ((end = dec.decode(got).indexOf("\r\n\r\n")) < 0) {
    const n = await conn.read(buf);
    if (n === null) break;
    got = concat(got, buf.subarray(0, n));
  }
  const head = dec.decode(got).slice(0, Math.max(0, end));
  return { conn, head, rest: got.subarray(end + 4) };
}

function concat(a: Uint8Array, b: Uint8Array): Uint8Array {
  const out = new Uint8Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}

/** Read server frames until a close frame; its code, or null when the connection ended without one. */
async function readCloseCode(conn: Deno.Conn, start: Uint8Array): Promise<number | null> {
  let b = start;
  const buf = new Uint8Array(65536);
  for (;;) {
    while (b.length >= 2) {
      let len = b[1] & 0x7f, p = 2;
      if (len === 126) [len, p] = [(b[2] << 8) | b[3], 4];
      if (len === 127) [len, p] = [Number(new DataView(b.buffer, b.byteOffset + 2, 8).getBigUint64(0)), 10];
      if (b.length < p + len) break;
      if ((b[0] & 0x0f) === 0x8) return (b[p] << 8) | b[p + 1];
      b = b.subarray(p + len);
    }
    const n = await conn.read(buf);
    if (n === null) return null;
    b = concat(b, buf.subarray(0, n));
  }
}

/** Send 1 MiB messages until what waits stays in `ws` (the kernel's buffers are full); the messages sent. */
async function backUp(ws: PageSocket): Promise<Uint8Array[]> {
  const sent: Uint8Array[] = [];
  while (ws.bufferedAmount <= LOW_WATER && sent.length < 256) {
    const m = new Uint8Array(1 << 20);
    sent.push(m);
    ws.send(m);
    await sleep(10);
  }
  assert.ok(ws.bufferedAmount > LOW_WATER, `bufferedAmount ${ws.bufferedAmount}`);
  return sent;
}

/** Read to the end of the connection; false if it is still open after GUARD_MS. */
async function readsToEnd(conn: Deno.Conn): Promise<boolean> {
  const buf = new Uint8Array(1 << 20);
  const deadline = Date.now() + GUARD_MS;
  while (Date.now() < deadline) {
    const n = await Promise.race([conn.read(buf).catch(() => null), sleep(500).then(() => 0)]);
    if (n === null) return true;
  }
  return false;
}

Deno.test("websocket: Sec-WebSocket-Accept is RFC 6455's worked example; a malformed key gets 400", async () => {
  const s = await pageServer(1024);
  try {
    const ok = await connect(s.port, upgradeRequest(s.port, EXAMPLE_KEY));
    assert.match(ok.head, /^HTTP\/1\.1 101 /);
    ok.conn.close();
    assert.ok(ok.head.split("\r\n").includes(`Sec-WebSocket-Accept: ${EXAMPLE_ACCEPT}`), ok.head);
    for (const key of ["not base64!", btoa("short")]) {
      const bad = await connect(s.port, upgradeRequest(s.port, key));
      assert.match(bad.head, /^HTTP\/1\.1 400 /, key);
      assert.ok(await readsToEnd(bad.conn), `the connection with key ${key} is closed`);
      bad.conn.close();
    }
    assert.equal(s.pages.length, 1);
  } finally {
    await until("the page gone", () => s.pages.every((p) => p.closed));
    await s.close();
  }
});

Deno.test("websocket: fragmented text arrives whole; an unmasked frame ends the connection", async () => {
  const s = await pageServer(1024);
  // The first fragment comes in the same write as the request head, the rest later.
  const c = await connect(s.port, concat(upgradeRequest(s.port, EXAMPLE_KEY), clientFrame(0x01, enc.encode("hel"))));
  try {
    assert.match(c.head, /^HTTP\/1\.1 101 /);
    await c.conn.write(clientFrame(0x80, enc.encode("lo")));
    await until("the message", () => s.pages[0]?.messages.length === 1);
    assert.deepEqual(s.pages[0].messages, ["hello"]);
    await c.conn.write(clientFrame(0x81, enc.encode("x"), false));
    await until("the connection ended", () => s.pages[0].closed);
    assert.equal(await readCloseCode(c.conn, c.rest), 1002);
    assert.deepEqual(s.pages[0].messages, ["hello"]);
  } finally {
    c.conn.close();
    await s.close();
  }
});

Deno.test("websocket: a message over the limit closes with 1009; close() ends the connection", async () => {
  const s = await pageServer(100);
  const a = await connect(s.port, upgradeRequest(s.port, EXAMPLE_KEY));
  const b = await connect(s.port, upgradeRequest(s.port, EXAMPLE_KEY));
  try {
    await a.conn.write(clientFrame(0x81, new Uint8Array(200).fill(0x61)));
    assert.equal(await readCloseCode(a.conn, a.rest), 1009);
    await until("the first page ended", () => s.pages[0].closed);
    assert.deepEqual(s.pages[0].messages, []);
    // The peer never answers the close frame: the connection ends all the same.
    s.pages[1].ws.close(CLOSE_NORMAL);
    assert.equal(await readCloseCode(b.conn, b.rest), CLOSE_NORMAL);
    assert.ok(await readsToEnd(b.conn), "the server ended the connection");
    await until("the second page ended", () => s.pages[1].closed);
  } finally {
    a.conn.close();
    b.conn.close();
    await s.close();
  }
});

Deno.test("websocket: a peer that never reads backs the socket up; abort() ends its TCP connection and frees what waited", async () => {
  const s = await pageServer(1024);
  const c = await connect(s.port, upgradeRequest(s.port, EXAMPLE_KEY));
  try {
    const ws = s.pages[0].ws;
    const sent = await backUp(ws);
    await sleep(50);
    assert.ok(ws.backedUpMs() > 0);
    ws.abort();
    await until("the page ended", () => s.pages[0].closed);
    assert.ok(await readsToEnd(c.conn), "the peer saw its connection end");
    // Every message's buffer was given back: written ones and the ones still waiting.
    await until("the messages released", () => sent.every((m) => m.byteLength === 0));
    assert.equal(ws.open, false);
  } finally {
    c.conn.close();
    await s.close();
  }
});

Deno.test("websocket: a backed-up socket that the peer drains again calls onDrain", async () => {
  const s = await pageServer(1024);
  const c = await connect(s.port, upgradeRequest(s.port, EXAMPLE_KEY));
  try {
    const p = s.pages[0];
    await backUp(p.ws);
    // Drains while the kernel still took the first messages do not count.
    const before = p.drains;
    await sleep(100);
    assert.equal(p.drains, before);
    const buf = new Uint8Array(1 << 20);
    const reading = (async () => {
      while (p.drains === before && await c.conn.read(buf) !== null) { /* take everything */ }
    })();
    await until("onDrain", () => p.drains > before);
    assert.ok(p.ws.bufferedAmount <= LOW_WATER);
    assert.equal(p.ws.backedUpMs(), 0);
    p.ws.abort();
    await reading;
  } finally {
    c.conn.close();
    await s.close();
  }
});
