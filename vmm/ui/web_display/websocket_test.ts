// The display's WebSocket server end (websocket.ts): the handshake key, and what a peer may send.

import assert from "node:assert/strict";
import { acceptKey, CLOSE_NORMAL, WsConnection } from "./websocket.ts";

Deno.test("websocket: Sec-WebSocket-Accept is RFC 6455's worked example; malformed keys are refused", async () => {
  // RFC 6455 section 1.3.
  assert.equal(await acceptKey("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
  assert.equal(await acceptKey(null), null);
  assert.equal(await acceptKey("not base64!"), null);
  assert.equal(await acceptKey(btoa("short")), null);
});

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

async function pair(opts: { maxMessageBytes: number }) {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const client = await Deno.connect({ hostname: "127.0.0.1", port: l.addr.port });
  const server = await l.accept();
  l.close();
  const messages: string[] = [];
  let closed = false;
  const ws = new WsConnection(server, {
    maxMessageBytes: opts.maxMessageBytes,
    lowWaterBytes: 1024,
    onMessage: (t) => messages.push(t),
    onClose: () => closed = true,
    onDrain: () => {},
  });
  return { client, ws, messages, isClosed: () => closed };
}

Deno.test("websocket: fragmented text arrives whole; an unmasked frame ends the connection", async () => {
  const { client, ws, messages, isClosed } = await pair({ maxMessageBytes: 1024 });
  const enc = new TextEncoder();
  // The first fragment comes with the request head (leftover), the rest from the socket.
  ws.start(clientFrame(0x01, enc.encode("hel")));
  await client.write(clientFrame(0x80, enc.encode("lo")));
  while (messages.length === 0) await new Promise((r) => setTimeout(r, 10));
  assert.deepEqual(messages, ["hello"]);
  await client.write(clientFrame(0x81, enc.encode("x"), false));
  await ws.closed;
  assert.ok(isClosed());
  client.close();
});

Deno.test("websocket: a message over the limit closes with 1009; close() ends the connection", async () => {
  const a = await pair({ maxMessageBytes: 100 });
  a.ws.start(new Uint8Array(0));
  await a.client.write(clientFrame(0x81, new Uint8Array(200).fill(0x61)));
  const buf = new Uint8Array(64);
  const n = await a.client.read(buf);
  // A close frame (opcode 8) with code 1009.
  assert.equal(buf[0], 0x88);
  assert.equal((buf[2] << 8) | buf[3], 1009);
  assert.ok(n !== null);
  await a.ws.closed;
  assert.deepEqual(a.messages, []);
  a.client.close();

  const b = await pair({ maxMessageBytes: 100 });
  b.ws.start(new Uint8Array(0));
  b.ws.close(CLOSE_NORMAL);
  await b.client.read(buf);
  assert.equal(buf[0], 0x88);
  await b.ws.closed;
  assert.equal(await b.client.read(buf), null);
  b.client.close();
});
