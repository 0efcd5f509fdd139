// virtio-vsock driven through the virtio-mmio registers by the test driver, with real Unix sockets
// on the host side: connections both ways, data both ways, credit flow, shutdown, hostile packets.

import assert from "node:assert/strict";
import fc from "fast-check";
import {
  decodeHeader,
  encodeHeader,
  VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
  VIRTIO_VSOCK_OP_CREDIT_REQUEST,
  VIRTIO_VSOCK_OP_CREDIT_UPDATE,
  VIRTIO_VSOCK_OP_REQUEST,
  VIRTIO_VSOCK_OP_RESPONSE,
  VIRTIO_VSOCK_OP_RST,
  VIRTIO_VSOCK_OP_RW,
  VIRTIO_VSOCK_OP_SHUTDOWN,
  VIRTIO_VSOCK_SHUTDOWN_RCV,
  VIRTIO_VSOCK_SHUTDOWN_SEND,
  VIRTIO_VSOCK_TYPE_STREAM,
  VMADDR_CID_HOST,
  VSOCK_BUF_ALLOC,
  VSOCK_CONFIG_SIZE,
  VSOCK_EVENT_SIZE,
  VSOCK_EVQ,
  VSOCK_HDR_SIZE,
  VSOCK_RXQ,
  VSOCK_TXQ,
  VsockDevice,
  type VsockHeader,
} from "./vsock.ts";
import { VIRTIO_ID_VSOCK } from "./device.ts";
import { VirtioMmioTransport } from "./mmio.ts";
import { VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE } from "./queue.ts";
import { guestLog } from "../../core/log.ts";
import { GuardedGuestMemory, VirtioTestDriver } from "../../test/support/virtio_driver.ts";
import { reattachRig, roundTrip } from "../../test/support/device_rig.ts";
import { type DeviceState, StateError, type StateValue } from "../../core/state.ts";

const MiB = 1024 * 1024;
const GUEST_CID = 42;
/** Linux's rx buffers: a header and VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE (4 KiB) of payload. */
const RX_BUF = VSOCK_HDR_SIZE + 4096;
const RX_BUFS = 32;
const HANG_GUARD_MS = 20_000;
const enc = new TextEncoder();
const dec = new TextDecoder();

async function until(cond: () => boolean, what: string): Promise<void> {
  const start = Date.now();
  while (!cond()) {
    if (Date.now() - start > HANG_GUARD_MS) throw new Error(`gave up waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 1));
  }
}

interface Packet {
  hdr: VsockHeader;
  data: Uint8Array;
}

class Rig {
  readonly dir = Deno.makeTempDirSync({ prefix: "denovm-vsock-" });
  readonly uds = `${this.dir}/v.sock`;
  readonly g = new GuardedGuestMemory([{ start: 0, size: 32 * MiB }]);
  readonly dev: VsockDevice;
  readonly drv: VirtioTestDriver;
  readonly lines: string[] = [];
  readonly #oldSink = guestLog.sink;
  /** Guest-side inbox: every packet the device put in the rx queue. */
  readonly inbox: Packet[] = [];
  readonly #rxBufs = new Map<number, number>();
  /** The guest's receive accounting per connection key "hostPort:guestPort". */
  guestBufAlloc = 64 * 1024;

  constructor(opts: { activate?: boolean } = {}) {
    this.dev = new VsockDevice({ cid: GUEST_CID, udsPath: this.uds });
    const t = new VirtioMmioTransport(this.dev, this.g.mem, { irq: { trigger: () => this.#collect() } });
    this.drv = new VirtioTestDriver(t, this.g.mem, { start: 0x1000, end: 32 * MiB });
    guestLog.sink = (l) => this.lines.push(l);
    if (opts.activate !== false) {
      this.drv.init({ queueSize: 128 });
      this.postRx(RX_BUFS);
    }
  }

  postRx(n: number, size = RX_BUF): void {
    for (let i = 0; i < n; i++) {
      const s = this.drv.queues[VSOCK_RXQ].submit([size]);
      this.#rxBufs.set(s.head, s.buffers[0].addr);
    }
    this.drv.kick(VSOCK_RXQ);
  }

  /** Move used rx buffers into the inbox and give the buffers back (what the guest's rx worker does). */
  #collect(): void {
    const q = this.drv.queues[VSOCK_RXQ];
    if (!q) return;
    const used = q.used();
    for (const u of used) {
      const addr = this.#rxBufs.get(u.id);
      assert.ok(addr !== undefined);
      this.#rxBufs.delete(u.id);
      if (u.len >= VSOCK_HDR_SIZE) {
        const b = this.g.mem.read(addr, u.len);
        const hdr = decodeHeader(b);
        assert.equal(hdr.len, u.len - VSOCK_HDR_SIZE, "header len matches the used length");
        this.inbox.push({ hdr, data: b.subarray(VSOCK_HDR_SIZE) });
      }
    }
    if (used.length) this.postRx(used.length);
  }

  /** Wait for the next packet matching `pred`, removing it from the inbox. */
  async next(pred: (p: Packet) => boolean, what: string): Promise<Packet> {
    let found: Packet | undefined;
    await until(() => {
      this.#collect();
      const i = this.inbox.findIndex(pred);
      if (i >= 0) found = this.inbox.splice(i, 1)[0];
      return found !== undefined;
    }, what);
    return found!;
  }

  /** The guest sends a packet (header fields default to a stream packet from the guest to the host). */
  send(h: Partial<VsockHeader>, data: Uint8Array = new Uint8Array(0)): void {
    const hdr: VsockHeader = {
      srcCid: BigInt(GUEST_CID),
      dstCid: BigInt(VMADDR_CID_HOST),
      srcPort: 0,
      dstPort: 0,
      len: data.length,
      type: VIRTIO_VSOCK_TYPE_STREAM,
      op: VIRTIO_VSOCK_OP_RW,
      flags: 0,
      bufAlloc: this.guestBufAlloc,
      fwdCnt: 0,
      ...h,
    };
    const q = this.drv.queues[VSOCK_TXQ];
    q.submit(data.length ? [encodeHeader(hdr), data] : [encodeHeader(hdr)]);
    this.drv.kick(VSOCK_TXQ);
    q.used();
  }

  close(): void {
    guestLog.sink = this.#oldSink;
    assert.ok(this.g.canaryIntact(), "no access outside guest memory");
    this.dev.close();
    this.g.close();
    Deno.removeSync(this.dir, { recursive: true });
  }
}

async function readLine(c: Deno.Conn): Promise<string> {
  let s = "";
  const b = new Uint8Array(1);
  while (!s.endsWith("\n")) {
    const n = await c.read(b);
    if (n === null) throw new Error(`EOF after "${s}"`);
    s += dec.decode(b);
  }
  return s;
}

async function readN(c: Deno.Conn, n: number): Promise<Uint8Array> {
  const out = new Uint8Array(n);
  let o = 0;
  while (o < n) {
    const k = await c.read(out.subarray(o));
    if (k === null) throw new Error(`EOF after ${o} of ${n} bytes`);
    o += k;
  }
  return out;
}

function pattern(n: number, seed: number): Uint8Array {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = (i * 7 + seed + (i >> 8)) & 0xff;
  return b;
}

/** Host connects with CONNECT; the guest accepts. Returns the host stream and the ports. */
async function hostConnect(r: Rig, guestPort: number): Promise<{ c: Deno.UnixConn; hostPort: number }> {
  const c = await Deno.connect({ transport: "unix", path: r.uds });
  await c.write(enc.encode(`CONNECT ${guestPort}\n`));
  const req = await r.next((p) => p.hdr.op === VIRTIO_VSOCK_OP_REQUEST, "REQUEST");
  assert.equal(req.hdr.dstPort, guestPort);
  assert.equal(req.hdr.srcCid, BigInt(VMADDR_CID_HOST));
  assert.equal(req.hdr.dstCid, BigInt(GUEST_CID));
  assert.equal(req.hdr.bufAlloc, VSOCK_BUF_ALLOC);
  r.send({ op: VIRTIO_VSOCK_OP_RESPONSE, srcPort: guestPort, dstPort: req.hdr.srcPort });
  assert.equal(await readLine(c), `OK ${req.hdr.srcPort}\n`);
  return { c, hostPort: req.hdr.srcPort };
}

Deno.test("vsock: config space carries the guest cid; device id; bad cids refused", () => {
  const r = new Rig();
  try {
    assert.equal(r.drv.readReg(0x008), VIRTIO_ID_VSOCK);
    assert.equal(new DataView(r.drv.readConfig(0, 8).buffer).getBigUint64(0, true), BigInt(GUEST_CID));
    assert.equal(r.dev.queueMaxSizes.length, 3);
    for (const cid of [0, 1, 2, 0xffff_ffff, 1.5]) {
      assert.throws(() => new VsockDevice({ cid, udsPath: `${r.dir}/x` }), /cid/);
    }
  } finally {
    r.close();
  }
});

Deno.test("vsock: host-initiated connection (CONNECT/OK), bytes both ways, guest close", async () => {
  const r = new Rig();
  try {
    const { c, hostPort } = await hostConnect(r, 1234);
    await c.write(enc.encode("hello guest"));
    const rw = await r.next((p) => p.hdr.op === VIRTIO_VSOCK_OP_RW, "RW to the guest");
    assert.equal(dec.decode(rw.data), "hello guest");
    assert.equal(rw.hdr.srcPort, hostPort);
    assert.equal(rw.hdr.dstPort, 1234);
    r.send({ op: VIRTIO_VSOCK_OP_RW, srcPort: 1234, dstPort: hostPort }, enc.encode("hello host"));
    assert.equal(dec.decode(await readN(c, 10)), "hello host");
    // The guest closes: SHUTDOWN with both flags, the device answers RST and the host reads EOF.
    r.send({
      op: VIRTIO_VSOCK_OP_SHUTDOWN,
      srcPort: 1234,
      dstPort: hostPort,
      flags: VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND,
    });
    await r.next((p) => p.hdr.op === VIRTIO_VSOCK_OP_RST && p.hdr.dstPort === 1234, "RST after SHUTDOWN");
    assert.equal(await c.read(new Uint8Array(4)), null);
    c.close();
    assert.equal(r.dev.stats().open, 0);
    // A guest refusing a connection (RST instead of RESPONSE) closes the host stream without OK.
    const c2 = await Deno.connect({ transport: "unix", path: r.uds });
    await c2.write(enc.encode("CONNECT 99\n"));
    const req = await r.next((p) => p.hdr.op === VIRTIO_VSOCK_OP_REQUEST, "REQUEST 2");
    r.send({ op: VIRTIO_VSOCK_OP_RST, srcPort: 99, dstPort: req.hdr.srcPort });
    assert.equal(await c2.read(new Uint8Array(4)), null);
    c2.close();
    // A bad first line is refused.
    const c3 = await Deno.connect({ transport: "unix", path: r.uds });
    await c3.write(enc.encode("HELLO 5\n"));
    assert.equal(await c3.read(new Uint8Array(4)), null);
    c3.close();
  } finally {
    r.close();
  }
});

Deno.test("vsock: guest-initiated connection to ${uds}_PORT, both ways, host close; no listener means RST", async () => {
  const r = new Rig();
  const listener = Deno.listen({ transport: "unix", path: `${r.uds}_5000` });
  try {
    const accepted = listener.accept();
    r.send({ op: VIRTIO_VSOCK_OP_REQUEST, srcPort: 40000, dstPort: 5000 });
    const resp = await r.next((p) => p.hdr.op === VIRTIO_VSOCK_OP_RESPONSE, "RESPONSE");
    assert.equal(resp.hdr.srcPort, 5000);
    assert.equal(resp.hdr.dstPort, 40000);
    const host = await accepted;
    r.send({ op: VIRTIO_VSOCK_OP_RW, srcPort: 40000, dstPort: 5000 }, enc.encode("ping"));
    assert.equal(dec.decode(await readN(host, 4)), "ping");
    await host.write(enc.encode("pong"));
    const rw = await r.next((p) => p.hdr.op === VIRTIO_VSOCK_OP_RW, "pong");
    assert.equal(dec.decode(rw.data), "pong");
    host.close();
    const sd = await r.next((p) => p.hdr.op === VIRTIO_VSOCK_OP_SHUTDOWN, "SHUTDOWN after the host closed");
    assert.equal(sd.hdr.flags, VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND);
    r.send({ op: VIRTIO_VSOCK_OP_RST, srcPort: 40000, dstPort: 5000 });
    await until(() => r.dev.stats().open === 0, "the connection to be forgotten");

    r.send({ op: VIRTIO_VSOCK_OP_REQUEST, srcPort: 40001, dstPort: 5001 });
    const rst = await r.next((p) => p.hdr.op === VIRTIO_VSOCK_OP_RST, "RST for a port nobody listens on");
    assert.equal(rst.hdr.dstPort, 40001);
    assert.equal(rst.hdr.srcPort, 5001);
  } finally {
    listener.close();
    r.close();
  }
});

Deno.test("vsock: host data stops at the guest's buf_alloc and resumes on CREDIT_UPDATE", async () => {
  const r = new Rig();
  r.guestBufAlloc = 1000;
  try {
    const { c, hostPort } = await hostConnect(r, 7);
    const sent = pattern(3000, 1);
    const writing = c.write(sent).then(async (n) => n < sent.length && await c.write(sent.subarray(n)));
    const got: Uint8Array[] = [];
    let total = 0;
    let fwd = 0;
    const take = async (upTo: number) => {
      while (total < upTo) {
        const p = await r.next((p) => p.hdr.op === VIRTIO_VSOCK_OP_RW, `data up to ${upTo}`);
        got.push(p.data);
        total += p.data.length;
        assert.ok(total <= fwd + 1000, `the device sent ${total} bytes with credit for ${fwd + 1000}`);
      }
    };
    await take(1000);
    await writing;
    // The host wrote everything; the device still holds what the guest has no room for.
    for (let i = 0; i < 20; i++) await new Promise((res) => setTimeout(res, 0));
    r.postRx(0);
    assert.equal(r.inbox.filter((p) => p.hdr.op === VIRTIO_VSOCK_OP_RW).length, 0, "nothing beyond the credit");
    assert.equal(r.dev.stats().bytesToGuest, 1000);
    // The guest consumed 1000 bytes: CREDIT_UPDATE lets the next 1000 through, and so on.
    fwd = 1000;
    r.send({ op: VIRTIO_VSOCK_OP_CREDIT_UPDATE, srcPort: 7, dstPort: hostPort, fwdCnt: fwd });
    await take(2000);
    fwd = 2000;
    r.send({ op: VIRTIO_VSOCK_OP_CREDIT_UPDATE, srcPort: 7, dstPort: hostPort, fwdCnt: fwd });
    await take(3000);
    const all = new Uint8Array(3000);
    let o = 0;
    for (const p of got) {
      all.set(p, o);
      o += p.length;
    }
    assert.deepEqual(all, sent);
    // CREDIT_REQUEST is answered with the device's own credit.
    r.send({ op: VIRTIO_VSOCK_OP_CREDIT_REQUEST, srcPort: 7, dstPort: hostPort, fwdCnt: 3000 });
    const cu = await r.next((p) => p.hdr.op === VIRTIO_VSOCK_OP_CREDIT_UPDATE, "CREDIT_UPDATE");
    assert.equal(cu.hdr.bufAlloc, VSOCK_BUF_ALLOC);
    c.close();
  } finally {
    r.close();
  }
});

Deno.test("vsock: guest data is forwarded with CREDIT_UPDATEs; a guest overrunning buf_alloc is reset", async () => {
  const r = new Rig();
  try {
    const { c, hostPort } = await hostConnect(r, 8);
    // 192 KiB in one kick: within buf_alloc; the host receives it all and the guest hears of it.
    const big = pattern(192 * 1024, 3);
    const chunk = 16 * 1024;
    for (let o = 0; o < big.length; o += chunk) {
      r.send({ op: VIRTIO_VSOCK_OP_RW, srcPort: 8, dstPort: hostPort }, big.subarray(o, o + chunk));
    }
    assert.deepEqual(await readN(c, big.length), big);
    const cu = await r.next((p) => p.hdr.op === VIRTIO_VSOCK_OP_CREDIT_UPDATE, "a CREDIT_UPDATE");
    assert.ok(cu.hdr.fwdCnt >= 64 * 1024, `fwd_cnt ${cu.hdr.fwdCnt}`);
    // More than buf_alloc at once, without waiting for credit: RST, and the host stream closes.
    const tooMuch = pattern(VSOCK_BUF_ALLOC + chunk, 4);
    for (let o = 0; o < tooMuch.length; o += chunk) {
      r.send({ op: VIRTIO_VSOCK_OP_RW, srcPort: 8, dstPort: hostPort }, tooMuch.subarray(o, o + chunk));
    }
    await r.next((p) => p.hdr.op === VIRTIO_VSOCK_OP_RST && p.hdr.dstPort === 8, "RST for the overrun");
    assert.ok(r.lines.some((l) => l.includes("beyond buf_alloc")), r.lines.join("\n"));
    const buf = new Uint8Array(64 * 1024);
    while (await c.read(buf).catch(() => null) !== null) { /* drain until EOF */ }
    c.close();
  } finally {
    r.close();
  }
});

Deno.test("vsock: hostile packets get an RST and a log line; the transport reset event", async () => {
  const r = new Rig();
  try {
    const rstTo = async (port: number, what: string) => {
      await r.next((p) => p.hdr.op === VIRTIO_VSOCK_OP_RST && p.hdr.dstPort === port, what);
    };
    r.send({ op: VIRTIO_VSOCK_OP_RW, srcPort: 1, dstPort: 2 }, enc.encode("x"));
    await rstTo(1, "RST for RW on no connection");
    r.send({ op: VIRTIO_VSOCK_OP_REQUEST, srcPort: 3, dstPort: 4, type: 2 });
    await rstTo(3, "RST for seqpacket");
    r.send({ op: VIRTIO_VSOCK_OP_REQUEST, srcPort: 5, dstPort: 6, srcCid: 7n });
    await rstTo(5, "RST for a spoofed source cid");
    r.send({ op: VIRTIO_VSOCK_OP_REQUEST, srcPort: 9, dstPort: 10, dstCid: 5n });
    await rstTo(9, "RST for another cid");
    r.send({ op: VIRTIO_VSOCK_OP_RW, srcPort: 11, dstPort: 12, len: 5000 }, enc.encode("short"));
    await rstTo(11, "RST for a len beyond the chain");
    r.send({ op: 99, srcPort: 13, dstPort: 14 });
    await rstTo(13, "RST for an unknown op without connection");
    const before = r.lines.length;
    r.drv.queues[VSOCK_TXQ].submit([new Uint8Array(10)]);
    r.drv.kick(VSOCK_TXQ);
    assert.equal(r.lines.length, before + 1, "a headerless packet is one log line");
    // An RST for nothing is not answered.
    r.send({ op: VIRTIO_VSOCK_OP_RST, srcPort: 15, dstPort: 16 });
    // Transport reset: one event buffer, filled with the event id.
    const ev = r.drv.queues[VSOCK_EVQ].submit([4]);
    r.drv.kick(VSOCK_EVQ);
    assert.equal(r.dev.transportReset(), true);
    assert.deepEqual(r.drv.queues[VSOCK_EVQ].used(), [{ id: ev.head, len: 4 }]);
    assert.equal(r.g.mem.getU32(ev.buffers[0].addr), VIRTIO_VSOCK_EVENT_TRANSPORT_RESET);
    assert.equal(r.dev.transportReset(), false, "no event buffer left");
    r.postRx(0);
    assert.ok(!r.inbox.some((p) => p.hdr.dstPort === 15), "no reply to an RST");
  } finally {
    r.close();
  }
});

Deno.test("vsock: a host connection before the driver is ready is closed", async () => {
  const r = new Rig({ activate: false });
  try {
    const c = await Deno.connect({ transport: "unix", path: r.uds });
    await c.write(enc.encode("CONNECT 1\n"));
    assert.equal(await c.read(new Uint8Array(4)), null);
    c.close();
  } finally {
    r.close();
  }
});

Deno.test("vsock: property: random descriptor chains never throw or escape guest memory", () => {
  fc.assert(
    fc.property(
      fc.array(
        fc.record({
          q: fc.integer({ min: 0, max: 2 }),
          hdr: fc.uint8Array({ minLength: VSOCK_HDR_SIZE, maxLength: VSOCK_HDR_SIZE }),
          op: fc.integer({ min: 0, max: 8 }),
          descs: fc.array(
            fc.record({
              addr: fc.oneof(fc.integer({ min: 0, max: 32 * MiB + 4096 }), fc.constant(0xffff_ffff_f000)),
              len: fc.integer({ min: 0, max: 9000 }),
              write: fc.boolean(),
              next: fc.integer({ min: 0, max: 127 }),
              chain: fc.boolean(),
            }),
            { maxLength: 3 },
          ),
        }),
        { maxLength: 20 },
      ),
      (ops) => {
        const r = new Rig();
        try {
          for (const op of ops) {
            const dq = r.drv.queues[op.q];
            if (op.descs.length === 0) {
              // A well-formed chain with a random header (the op forced to a real one half the time).
              const h = op.hdr.slice();
              if (op.op < 8) new DataView(h.buffer).setUint16(30, op.op, true);
              dq.submit([h]);
            } else {
              const base = 100;
              op.descs.forEach((d, i) =>
                dq.writeDesc(base + i, {
                  addr: d.addr,
                  len: d.len,
                  flags: (d.write ? VIRTQ_DESC_F_WRITE : 0) | (d.chain ? VIRTQ_DESC_F_NEXT : 0),
                  next: d.next,
                })
              );
              dq.publish(base);
            }
            r.drv.kick(op.q);
          }
        } finally {
          r.close();
        }
      },
    ),
    { numRuns: 60 },
  );
});

// ---- Saved state ----

Deno.test("vsock state: a restored device resets the driver's connections with the transport reset event", async () => {
  const r = new Rig();
  let dev2: VsockDevice | undefined;
  try {
    const { c, hostPort } = await hostConnect(r, 5000);
    const ev = r.drv.queues[VSOCK_EVQ].submit([VSOCK_EVENT_SIZE]);
    r.drv.kick(VSOCK_EVQ);
    assert.ok(r.dev.quiescent());
    const devState = roundTrip(r.dev.saveState());
    const tState = roundTrip(r.drv.transport.saveState());
    const cfg = r.drv.readConfig(0, VSOCK_CONFIG_SIZE);
    r.dev.close(); // the host side goes: its listener and connections
    assert.equal(await c.read(new Uint8Array(1)).catch(() => null), null, "the host connection is closed");
    c.close();
    dev2 = new VsockDevice({ cid: GUEST_CID, udsPath: r.uds });
    const to = reattachRig({ t: r.drv.transport, drv: r.drv, irqs: { n: 0 } }, dev2, r.g.mem);
    dev2.restoreState(devState);
    to.t.restoreState(tState);
    // Activation delivered the reset into the buffer the driver had posted.
    assert.deepEqual(r.drv.queues[VSOCK_EVQ].used(), [{ id: ev.head, len: VSOCK_EVENT_SIZE }]);
    assert.equal(r.g.mem.getU32(ev.buffers[0].addr), VIRTIO_VSOCK_EVENT_TRANSPORT_RESET);
    assert.deepEqual(to.drv.readConfig(0, VSOCK_CONFIG_SIZE), cfg, "the same guest CID");
    // A new host connection reaches the guest through the restored device, on the next host port.
    const c2 = await Deno.connect({ transport: "unix", path: r.uds });
    await c2.write(enc.encode("CONNECT 5001\n"));
    const req = await r.next((p) => p.hdr.op === VIRTIO_VSOCK_OP_REQUEST && p.hdr.dstPort === 5001, "REQUEST");
    assert.equal(req.hdr.srcPort, hostPort + 1);
    assert.equal(req.hdr.dstCid, BigInt(GUEST_CID));
    assert.equal(dev2.stats().hostConnections, 2);
    c2.close();
    assert.throws(() => dev2!.restoreState(devState), StateError, "the device is active");
  } finally {
    dev2?.close();
    r.close();
  }
});

Deno.test("vsock state: with no event buffer posted the reset waits for the driver's next one", () => {
  const r = new Rig();
  let dev2: VsockDevice | undefined;
  try {
    const devState = roundTrip(r.dev.saveState());
    const tState = roundTrip(r.drv.transport.saveState());
    r.dev.close();
    dev2 = new VsockDevice({ cid: GUEST_CID, udsPath: r.uds });
    const to = reattachRig({ t: r.drv.transport, drv: r.drv, irqs: { n: 0 } }, dev2, r.g.mem);
    dev2.restoreState(devState);
    to.t.restoreState(tState);
    const evq = r.drv.queues[VSOCK_EVQ];
    assert.deepEqual(evq.used(), []);
    const ev = evq.submit([VSOCK_EVENT_SIZE]);
    to.drv.kick(VSOCK_EVQ);
    assert.deepEqual(evq.used(), [{ id: ev.head, len: VSOCK_EVENT_SIZE }]);
    evq.submit([VSOCK_EVENT_SIZE]);
    to.drv.kick(VSOCK_EVQ);
    assert.deepEqual(evq.used(), [], "one reset only");
  } finally {
    dev2?.close();
    r.close();
  }
});

Deno.test("vsock state: a clone restored with a new CID shows it in its config and resets the driver", () => {
  // A clone's identity: the driver reads the guest CID again on the transport reset event
  // (Linux net/vmw_vsock/virtio_transport.c, virtio_vsock_update_guest_cid on VIRTIO_VSOCK_EVENT_TRANSPORT_RESET).
  const r = new Rig();
  let dev2: VsockDevice | undefined;
  try {
    const ev = r.drv.queues[VSOCK_EVQ].submit([VSOCK_EVENT_SIZE]);
    r.drv.kick(VSOCK_EVQ);
    const devState = roundTrip(r.dev.saveState());
    const tState = roundTrip(r.drv.transport.saveState());
    r.dev.close();
    dev2 = new VsockDevice({ cid: GUEST_CID + 7, udsPath: r.uds });
    const to = reattachRig({ t: r.drv.transport, drv: r.drv, irqs: { n: 0 } }, dev2, r.g.mem);
    dev2.restoreState(devState);
    to.t.restoreState(tState);
    assert.deepEqual(r.drv.queues[VSOCK_EVQ].used(), [{ id: ev.head, len: VSOCK_EVENT_SIZE }]);
    assert.equal(r.g.mem.getU32(ev.buffers[0].addr), VIRTIO_VSOCK_EVENT_TRANSPORT_RESET);
    const cfg = to.drv.readConfig(0, VSOCK_CONFIG_SIZE);
    assert.equal(new DataView(cfg.buffer, cfg.byteOffset).getBigUint64(0, true), BigInt(GUEST_CID + 7));
  } finally {
    dev2?.close();
    r.close();
  }
});

Deno.test("vsock state: a wrong type, version, reserved CID or malformed field is refused", () => {
  const r = new Rig({ activate: false });
  try {
    const good = r.dev.saveState();
    const data = good.data as Record<string, StateValue>;
    const bad: [string, DeviceState][] = [
      ["type", { ...good, type: "virtio-net" }],
      ["version", { ...good, version: 9 }],
      ["reserved cid", { ...good, data: { ...data, cid: 2 } }],
      ["nextHostPort", { ...good, data: { ...data, nextHostPort: -1 } }],
      ["features", { ...good, data: { ...data, features: 1 } }],
      ["stats", { ...good, data: { ...data, stats: {} } }],
    ];
    for (const [what, st] of bad) assert.throws(() => r.dev.restoreState(st), StateError, what);
    r.dev.restoreState(good);
  } finally {
    r.close();
  }
});

Deno.test("vsock: packets out of place on a live connection reset it (RST to the guest, EOF to the host), one line each", async () => {
  const r = new Rig();
  try {
    const cases: { what: string; send: (hostPort: number, guestPort: number) => void; line: RegExp }[] = [
      {
        what: "a second RESPONSE",
        send: (hp, gp) => r.send({ op: VIRTIO_VSOCK_OP_RESPONSE, srcPort: gp, dstPort: hp }),
        line: /RESPONSE on established connection \d+:\d+; RST/,
      },
      {
        what: "a REQUEST for the connection's own ports",
        send: (hp, gp) => r.send({ op: VIRTIO_VSOCK_OP_REQUEST, srcPort: gp, dstPort: hp }),
        line: /REQUEST for existing connection \d+:\d+; RST/,
      },
      {
        what: "an unknown op",
        send: (hp, gp) => r.send({ op: 99, srcPort: gp, dstPort: hp }),
        line: /unknown op 99 on \d+:\d+; RST/,
      },
      {
        what: "a control packet with a payload",
        send: (hp, gp) => r.send({ op: VIRTIO_VSOCK_OP_CREDIT_REQUEST, srcPort: gp, dstPort: hp }, enc.encode("12345")),
        line: new RegExp(`op ${VIRTIO_VSOCK_OP_CREDIT_REQUEST} with a 5-byte payload; RST`),
      },
    ];
    for (const [i, c] of cases.entries()) {
      const guestPort = 700 + i;
      const { c: host, hostPort } = await hostConnect(r, guestPort);
      const before = r.lines.length;
      c.send(hostPort, guestPort);
      const rst = await r.next((p) => p.hdr.op === VIRTIO_VSOCK_OP_RST && p.hdr.dstPort === guestPort, c.what);
      assert.equal(rst.hdr.srcPort, hostPort, c.what);
      assert.equal(r.lines.length, before + 1, `${c.what}: one line`);
      assert.match(r.lines[before], c.line, c.what);
      assert.equal(await host.read(new Uint8Array(8)), null, `${c.what}: the host socket is closed`);
      host.close();
    }
  } finally {
    r.close();
  }
});

Deno.test("vsock: guest data before its RESPONSE resets the host's connection attempt", async () => {
  const r = new Rig();
  try {
    const c = await Deno.connect({ transport: "unix", path: r.uds });
    await c.write(enc.encode("CONNECT 800\n"));
    const req = await r.next((p) => p.hdr.op === VIRTIO_VSOCK_OP_REQUEST, "REQUEST");
    r.send({ op: VIRTIO_VSOCK_OP_RW, srcPort: 800, dstPort: req.hdr.srcPort }, enc.encode("early"));
    await r.next((p) => p.hdr.op === VIRTIO_VSOCK_OP_RST && p.hdr.dstPort === 800, "RST");
    assert.ok(r.lines.some((l) => /RW on host-connecting connection/.test(l)), r.lines.join("\n"));
    assert.equal(await c.read(new Uint8Array(16)), null, "no OK line: the host socket is closed");
    c.close();
  } finally {
    r.close();
  }
});

Deno.test("vsock: SHUTDOWN(SEND) half-closes: the host reads EOF after the data and can still send", async () => {
  const r = new Rig();
  try {
    const { c, hostPort } = await hostConnect(r, 900);
    r.send({ op: VIRTIO_VSOCK_OP_RW, srcPort: 900, dstPort: hostPort }, enc.encode("last words"));
    r.send({ op: VIRTIO_VSOCK_OP_SHUTDOWN, srcPort: 900, dstPort: hostPort, flags: VIRTIO_VSOCK_SHUTDOWN_SEND });
    assert.equal(dec.decode(await readN(c, 10)), "last words");
    assert.equal(await c.read(new Uint8Array(8)), null, "EOF after the guest's data");
    await c.write(enc.encode("reply"));
    const rw = await r.next((p) => p.hdr.op === VIRTIO_VSOCK_OP_RW && p.hdr.dstPort === 900, "the host's reply");
    assert.equal(dec.decode(rw.data), "reply");
    c.close();
  } finally {
    r.close();
  }
});

Deno.test("vsock: a config write is ignored with one line; the CID reads the same", () => {
  const r = new Rig();
  try {
    const before = r.lines.length;
    r.dev.writeConfig(0, Uint8Array.of(1, 2, 3, 4));
    assert.deepEqual(r.lines.slice(before), ["virtio-vsock: driver wrote 4 bytes of read-only config at 0; ignored"]);
    assert.equal(r.drv.readConfig(0, 8)[0], GUEST_CID);
    // Reads past the config space are zeroes.
    assert.deepEqual([...r.drv.readConfig(VSOCK_CONFIG_SIZE, 4)], [0, 0, 0, 0]);
  } finally {
    r.close();
  }
});
