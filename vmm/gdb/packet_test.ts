import assert from "node:assert/strict";
import {
  encodePacket,
  fromHex,
  type Incoming,
  leHex32,
  leHex64,
  MAX_PACKET_SIZE,
  PacketReader,
  parseHexNumber,
  toHex,
  unescapeBinary,
} from "./packet.ts";

const enc = (s: string) => new TextEncoder().encode(s);
const dec = (b: Uint8Array) => new TextDecoder().decode(b);

function packets(events: Incoming[]): string[] {
  return events.map((e) => e.kind === "packet" ? `$${dec(e.data)}` : e.kind);
}

Deno.test("gdb packet: framing and checksum as in the GDB manual's examples", () => {
  // "$g#67": 'g' is 0x67.
  assert.equal(dec(encodePacket("g")), "$g#67");
  assert.equal(dec(encodePacket("OK")), "$OK#9a");
  assert.equal(dec(encodePacket("")), "$#00");
  const r = new PacketReader();
  assert.deepEqual(packets(r.feed(enc("+$g#67"))), ["ack", "$g"]);
  assert.deepEqual(packets(r.feed(enc("-"))), ["nack"]);
});

Deno.test("gdb packet: a packet split across reads, several in one read, Ctrl-C between them", () => {
  const r = new PacketReader();
  assert.deepEqual(r.feed(enc("$m10")), []);
  assert.deepEqual(r.feed(enc("00,4#")), []);
  const sum = dec(encodePacket("m1000,4")).slice(-2);
  assert.deepEqual(packets(r.feed(enc(sum[0]))), []);
  assert.deepEqual(packets(r.feed(enc(sum[1] + "\x03$?#3f"))), ["$m1000,4", "interrupt", "$?"]);
});

Deno.test("gdb packet: reserved bytes are escaped going out and unescaped in binary data", () => {
  const data = new Uint8Array([0x23, 0x24, 0x7d, 0x2a, 0x41]);
  const framed = encodePacket(data);
  assert.equal(dec(framed.subarray(0, 9)), "$}\x03}\x04}]}\x0a");
  const r = new PacketReader();
  const [p] = r.feed(framed);
  assert.equal(p.kind, "packet");
  assert.deepEqual(unescapeBinary((p as { data: Uint8Array }).data), data);
});

Deno.test("gdb packet: hostile input is a bad packet or noise, never a throw", () => {
  const r = new PacketReader();
  assert.deepEqual(r.feed(enc("$g#00")), [{ kind: "bad", why: "checksum mismatch" }]);
  assert.deepEqual(r.feed(enc("$g#zz")), [{ kind: "bad", why: "checksum is not hexadecimal" }]);
  assert.deepEqual(r.feed(enc("$g#6z")), [{ kind: "bad", why: "checksum is not hexadecimal" }]);
  assert.deepEqual(r.feed(enc("garbage")), []);
  // Longer than the stub's PacketSize: refused, and the reader is in step again for the next packet.
  const long = "a".repeat(MAX_PACKET_SIZE + 10);
  const events = r.feed(encodePacket(long));
  assert.equal(events.length, 1);
  assert.equal(events[0].kind, "bad");
  assert.deepEqual(packets(r.feed(enc("$g#67"))), ["$g"]);
});

Deno.test("gdb packet: hex helpers", () => {
  assert.equal(toHex(new Uint8Array([0, 0xab, 0x10])), "00ab10");
  assert.deepEqual(fromHex("00AB10"), new Uint8Array([0, 0xab, 0x10]));
  assert.equal(fromHex("abc"), undefined);
  assert.equal(fromHex("zz"), undefined);
  assert.equal(parseHexNumber("1000"), 0x1000n);
  assert.equal(parseHexNumber("ffffffffffffffff"), 0xffff_ffff_ffff_ffffn);
  assert.equal(parseHexNumber("1ffffffffffffffff"), undefined); // more than 64 bits
  assert.equal(parseHexNumber(""), undefined);
  assert.equal(parseHexNumber("-1"), undefined);
  assert.equal(leHex64(0x0102030405060708n), "0807060504030201");
  assert.equal(leHex64(-1n), "ffffffffffffffff");
  assert.equal(leHex32(0x202), "02020000");
});
