// virtio-console driven through the virtio-mmio registers by the test driver: port 0 both ways,
// bounded input, the MULTIPORT control handshake as Linux's virtio_console.c runs it, named ports,
// hostile chains and control messages.

import assert from "node:assert/strict";
import fc from "fast-check";
import {
  CONSOLE_CFG_COLS,
  CONSOLE_CFG_EMERG_WR,
  CONSOLE_CFG_MAX_NR_PORTS,
  CONSOLE_CFG_ROWS,
  CONSOLE_CONTROL_RXQ,
  CONSOLE_CONTROL_TXQ,
  CONSOLE_CTRL_SIZE,
  ConsoleDevice,
  type ConsoleOptions,
  portRxQueue,
  portTxQueue,
  VIRTIO_CONSOLE_CONSOLE_PORT,
  VIRTIO_CONSOLE_DEVICE_READY,
  VIRTIO_CONSOLE_F_MULTIPORT,
  VIRTIO_CONSOLE_F_SIZE,
  VIRTIO_CONSOLE_PORT_ADD,
  VIRTIO_CONSOLE_PORT_NAME,
  VIRTIO_CONSOLE_PORT_OPEN,
  VIRTIO_CONSOLE_PORT_READY,
} from "./console.ts";
import { VIRTIO_F_EVENT_IDX, VIRTIO_ID_CONSOLE } from "./device.ts";
import { VIRTIO_MMIO_INT_CONFIG } from "./mmio.ts";
import {
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
  VIRTQ_USED_ELEM_ID,
  VIRTQ_USED_ELEM_LEN,
  VIRTQ_USED_ELEM_SIZE,
  VIRTQ_USED_IDX,
  VIRTQ_USED_RING,
  Virtqueue,
} from "./queue.ts";
import type { GuestMemory } from "../../core/memory.ts";
import {
  DriverQueue,
  GuardedGuestMemory,
  GuestAllocator,
  type Segment,
  VirtioTestDriver,
} from "../../test/support/virtio_driver.ts";
import { concatBytes } from "../../core/bytes.ts";
import { captureVirtioLog, closeDeviceRig, DRIVER_ARENA_START, mmioRig } from "../../test/support/device_rig.ts";

const MiB = 1024 * 1024;
const enc = new TextEncoder();
const dec = new TextDecoder();
/** Linux's virtio_console.c gives control receive buffers of a page. */
const CONTROL_BUF = 4096;
/** VIRTIO_CONSOLE_BAD_ID (virtio_console.h): the id DEVICE_READY carries. */
const BAD_ID = 0xffff_ffff;

interface Rig {
  dev: ConsoleDevice;
  drv: VirtioTestDriver;
  g: GuardedGuestMemory;
  out: Uint8Array[];
  irqs: { n: number };
  lines: string[];
  /** Submit writable buffers on a queue, kick it. */
  rx(qi: number, sizes: number[]): { addr: number; len: number; head: number }[];
  /** What the device wrote into receive buffers since the last call, per used entry. */
  received(qi: number, bufs: { addr: number; len: number; head: number }[]): Uint8Array[];
  tx(qi: number, data: Segment[]): void;
  [Symbol.dispose](): void;
}

function rig(opts: Partial<ConsoleOptions> = {}, features?: bigint): Rig {
  const out: Uint8Array[] = [];
  const dev = new ConsoleDevice({ output: (b) => out.push(b.slice()), ...opts });
  const g = new GuardedGuestMemory([{ start: 0, size: 16 * MiB }]);
  const { drv, irqs } = mmioRig(dev, g.mem, 16 * MiB);
  const log = captureVirtioLog();
  drv.init({ features, queueSize: 64 });
  return {
    dev,
    drv,
    g,
    out,
    irqs,
    lines: log.lines,
    rx(qi, sizes) {
      const res = sizes.map((n) => {
        const s = drv.queues[qi].submit([n]);
        return { addr: s.buffers[0].addr, len: n, head: s.head };
      });
      drv.kick(qi);
      return res;
    },
    received(qi, bufs) {
      return drv.queues[qi].used().map((u) => {
        const b = bufs.find((x) => x.head === u.id);
        assert.ok(b, `used id ${u.id} is one of the submitted buffers`);
        assert.ok(u.len <= b.len);
        return g.mem.read(b.addr, u.len);
      });
    },
    tx(qi, data) {
      drv.queues[qi].submit(data);
      drv.kick(qi);
      drv.queues[qi].used();
    },
    [Symbol.dispose]() {
      closeDeviceRig(log, g, dev);
    },
  };
}

const concat = concatBytes;

function ctrl(id: number, event: number, value: number): Uint8Array {
  const b = new Uint8Array(CONSOLE_CTRL_SIZE);
  const v = new DataView(b.buffer);
  v.setUint32(0, id, true);
  v.setUint16(4, event, true);
  v.setUint16(6, value, true);
  return b;
}

function parseCtrl(b: Uint8Array): { id: number; event: number; value: number; extra: string } {
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  return {
    id: v.getUint32(0, true),
    event: v.getUint16(4, true),
    value: v.getUint16(6, true),
    extra: dec.decode(b.subarray(CONSOLE_CTRL_SIZE)),
  };
}

Deno.test("console: config, features, port 0 output and buffered input", () => {
  using r = rig({ size: { cols: 80, rows: 25 }, multiport: false });
  assert.equal(r.drv.readReg(0x008), VIRTIO_ID_CONSOLE);
  const f = r.drv.deviceFeatures();
  assert.ok(f & VIRTIO_CONSOLE_F_SIZE);
  assert.ok(!(f & VIRTIO_CONSOLE_F_MULTIPORT), "multiport: false");
  const cfg = new DataView(r.drv.readConfig(0, 12).buffer);
  assert.equal(cfg.getUint16(CONSOLE_CFG_COLS, true), 80);
  assert.equal(cfg.getUint16(CONSOLE_CFG_ROWS, true), 25);
  assert.equal(cfg.getUint32(CONSOLE_CFG_MAX_NR_PORTS, true), 1);
  assert.equal(r.dev.queueMaxSizes.length, 2);

  // Output: two descriptors in one chain arrive as one write.
  r.tx(1, [enc.encode("hello "), enc.encode("world\n")]);
  assert.equal(dec.decode(concat(r.out)), "hello world\n");

  // Input before the guest has buffers waits; then it fills buffers in order.
  r.dev.sendInput(enc.encode("0123456789"));
  r.dev.sendInput(enc.encode("abc"));
  const irqsBefore = r.irqs.n;
  const bufs = r.rx(0, [4, 4, 100]);
  const got = r.received(0, bufs);
  assert.deepEqual(got.map((b) => dec.decode(b)), ["0123", "4567", "89abc"]);
  assert.ok(r.irqs.n > irqsBefore, "an interrupt for the used receive buffers");
  // With a buffer already waiting, new input is delivered at once.
  const more = r.rx(0, [16]);
  r.dev.sendInput(enc.encode("now"));
  assert.deepEqual(r.received(0, more).map((b) => dec.decode(b)), ["now"]);
  // Emergency write puts one character out on port 0.
  r.out.length = 0;
  r.drv.transport.write(0x100 + CONSOLE_CFG_EMERG_WR, Uint8Array.of(0x21, 0, 0, 0));
  assert.equal(dec.decode(concat(r.out)), "!");
  const s = r.dev.stats();
  assert.equal(s.bytesIn, 16);
  assert.equal(s.bytesOut, 13);
});

Deno.test("console: input beyond the limit is dropped and counted, never unbounded", () => {
  using r = rig({ inputLimit: 8, multiport: false });
  r.dev.sendInput(enc.encode("12345"));
  r.dev.sendInput(enc.encode("67890"));
  assert.equal(r.dev.stats().inputDropped, 2);
  assert.equal(r.lines.length, 1, r.lines.join("\n"));
  const bufs = r.rx(0, [64]);
  assert.equal(dec.decode(concat(r.received(0, bufs))), "12345678");
});

/** Run Linux's multiport start-up: control buffers, DEVICE_READY, PORT_READY for each PORT_ADD. */
function handshake(r: Rig): {
  ports: Map<number, { name?: string; console: boolean; open: boolean }>;
  cbufs: { addr: number; len: number; head: number }[];
} {
  const cbufs = r.rx(CONSOLE_CONTROL_RXQ, Array(16).fill(CONTROL_BUF));
  const ports = new Map<number, { name?: string; console: boolean; open: boolean }>();
  r.tx(CONSOLE_CONTROL_TXQ, [ctrl(BAD_ID, VIRTIO_CONSOLE_DEVICE_READY, 1)]);
  for (let round = 0; round < 4; round++) {
    for (const m of r.received(CONSOLE_CONTROL_RXQ, cbufs).map(parseCtrl)) {
      if (m.event === VIRTIO_CONSOLE_PORT_ADD) {
        ports.set(m.id, { console: false, open: false });
        r.tx(CONSOLE_CONTROL_TXQ, [ctrl(m.id, VIRTIO_CONSOLE_PORT_READY, 1)]);
      } else if (m.event === VIRTIO_CONSOLE_CONSOLE_PORT) {
        ports.get(m.id)!.console = true;
      } else if (m.event === VIRTIO_CONSOLE_PORT_NAME) {
        ports.get(m.id)!.name = m.extra;
      } else if (m.event === VIRTIO_CONSOLE_PORT_OPEN) {
        ports.get(m.id)!.open = m.value === 1;
      }
    }
  }
  return { ports, cbufs };
}

Deno.test("console: by default port 0 alone uses MULTIPORT, and early input waits for the guest's PORT_OPEN", () => {
  using r = rig();
  assert.ok(r.drv.deviceFeatures() & VIRTIO_CONSOLE_F_MULTIPORT);
  assert.equal(r.dev.queueMaxSizes.length, 4);
  r.dev.sendInput(enc.encode("typed early\n"));
  // Linux fills the port's receive queue before it marks the console connected.
  const bufs = r.rx(portRxQueue(0), [64]);
  assert.equal(r.drv.queues[portRxQueue(0)].used().length, 0, "held before PORT_OPEN");
  const { ports } = handshake(r);
  assert.deepEqual([...ports.keys()], [0]);
  assert.equal(ports.get(0)!.console, true);
  r.tx(CONSOLE_CONTROL_TXQ, [ctrl(0, VIRTIO_CONSOLE_PORT_OPEN, 1)]);
  assert.equal(dec.decode(concat(r.received(portRxQueue(0), bufs))), "typed early\n");
  assert.throws(() => r.dev.openPort("x"), /no free port/);
});

Deno.test("console: MULTIPORT handshake, console port 0 and a named port both ways, hot-added port", () => {
  using r = rig({ ports: ["org.denovm.agent"], maxPorts: 4 });
  assert.ok(r.drv.deviceFeatures() & VIRTIO_CONSOLE_F_MULTIPORT);
  assert.equal(r.dev.queueMaxSizes.length, 10, "2 * (maxPorts + 1) queues");
  assert.equal(new DataView(r.drv.readConfig(CONSOLE_CFG_MAX_NR_PORTS, 4).buffer).getUint32(0, true), 4);
  const agent = r.dev.openPort("org.denovm.agent");
  assert.equal(agent.id, 1);
  // Host data before the guest opened the port waits (Linux would discard it).
  agent.write(enc.encode("early "));
  const agentRx = r.rx(portRxQueue(1), [64, 64]);
  assert.equal(r.drv.queues[portRxQueue(1)].used().length, 0, "nothing delivered before PORT_OPEN");

  const { ports, cbufs: early } = handshake(r);
  assert.deepEqual(ports.get(0), { console: true, open: true });
  assert.deepEqual(ports.get(1), { name: "org.denovm.agent", console: false, open: true });
  assert.equal(ports.size, 2);

  // Console port: the guest opens it (init_port_console sends PORT_OPEN 1), then input flows.
  r.tx(CONSOLE_CONTROL_TXQ, [ctrl(0, VIRTIO_CONSOLE_PORT_OPEN, 1)]);
  const conRx = r.rx(portRxQueue(0), [32]);
  r.dev.sendInput(enc.encode("ls\n"));
  assert.equal(dec.decode(concat(r.received(portRxQueue(0), conRx))), "ls\n");
  r.tx(portTxQueue(0), [enc.encode("$ ")]);
  assert.equal(dec.decode(concat(r.out)), "$ ");

  // Named port: opening it releases the early data.
  r.tx(CONSOLE_CONTROL_TXQ, [ctrl(1, VIRTIO_CONSOLE_PORT_OPEN, 1)]);
  agent.write(enc.encode("late"));
  assert.equal(dec.decode(concat(r.received(portRxQueue(1), agentRx))), "early late");
  const fromGuest: string[] = [];
  agent.onData((b) => fromGuest.push(dec.decode(b)));
  r.tx(portTxQueue(1), [enc.encode('{"ping":1}')]);
  assert.deepEqual(fromGuest, ['{"ping":1}']);
  assert.equal(dec.decode(concat(r.out)), "$ ", "port 1 output does not reach the console");

  // Hot add: PORT_ADD goes out at once.
  const cbufs = [...early, ...r.rx(CONSOLE_CONTROL_RXQ, [CONTROL_BUF])];
  const second = r.dev.openPort("second");
  assert.equal(second.id, 2);
  assert.deepEqual(r.received(CONSOLE_CONTROL_RXQ, cbufs).map(parseCtrl), [{
    id: 2,
    event: VIRTIO_CONSOLE_PORT_ADD,
    value: 0,
    extra: "",
  }]);
  assert.equal(r.dev.openPort("org.denovm.agent"), agent, "the same name is the same port");
  r.dev.openPort("third");
  assert.throws(() => r.dev.openPort("fourth"), /no free port/);
});

Deno.test("console: hostile control messages and chains cost a log line, never an exception", () => {
  using r = rig({ ports: ["p"], maxPorts: 3 });
  handshake(r);
  const before = r.lines.length;
  r.tx(CONSOLE_CONTROL_TXQ, [ctrl(99, VIRTIO_CONSOLE_PORT_OPEN, 1)]); // unknown port
  r.tx(CONSOLE_CONTROL_TXQ, [Uint8Array.of(1, 2, 3)]); // short
  r.tx(CONSOLE_CONTROL_TXQ, [ctrl(1, 0x7777, 0)]); // unknown event
  r.tx(CONSOLE_CONTROL_TXQ, [8]); // a writable-only chain: no readable bytes
  r.tx(portTxQueue(2), [enc.encode("x")]); // queue of a port that does not exist (yet)
  assert.equal(r.lines.length - before, 5, r.lines.slice(before).join("\n"));
  // A receive "buffer" that is read-only gets nothing written; the data stays for the next one.
  r.tx(CONSOLE_CONTROL_TXQ, [ctrl(1, VIRTIO_CONSOLE_PORT_OPEN, 1)]);
  r.dev.openPort("p").write(enc.encode("data"));
  const ro = r.drv.queues[portRxQueue(1)].submit([enc.encode("ro")]);
  const ok = r.rx(portRxQueue(1), [16]);
  const got = r.received(portRxQueue(1), [...ok, { addr: ro.buffers[0].addr, len: 0, head: ro.head }]);
  assert.deepEqual(got.map((b) => dec.decode(b)), ["", "data"]);
  // A descriptor pointing outside guest memory: the chain is completed with 0, the device goes on.
  const qc = r.drv.queues[CONSOLE_CONTROL_TXQ];
  qc.writeDesc(60, { addr: 0x7fff_0000_0000, len: 8, flags: 0, next: 0 });
  qc.publish(60);
  r.drv.kick(CONSOLE_CONTROL_TXQ);
  qc.used();
  assert.ok(r.lines.some((l) => l.includes("outside guest memory")), r.lines.join("\n"));
});

Deno.test("console: property: input split at random points arrives whole through random receive buffers", () => {
  fc.assert(
    fc.property(
      fc.array(fc.uint8Array({ minLength: 1, maxLength: 300 }), { minLength: 1, maxLength: 20 }),
      fc.array(fc.integer({ min: 1, max: 200 }), { minLength: 1, maxLength: 30 }),
      (chunks, sizes) => {
        using r = rig({ multiport: false });
        const want = concat(chunks);
        const got: Uint8Array[] = [];
        let ci = 0;
        let si = 0;
        // Interleave host writes and guest buffers until everything is through.
        for (let step = 0; step < 10_000 && concat(got).length < want.length; step++) {
          if (ci < chunks.length && (step % 2 === 0 || si >= sizes.length)) r.dev.sendInput(chunks[ci++]);
          else {
            const bufs = r.rx(0, [sizes[si++ % sizes.length]]);
            got.push(...r.received(0, bufs));
          }
        }
        assert.deepEqual(concat(got), want);
      },
    ),
    { numRuns: 60 },
  );
});

Deno.test("console: property: random descriptor chains on every queue never throw or escape guest memory", () => {
  fc.assert(
    fc.property(
      fc.array(
        fc.record({
          q: fc.integer({ min: 0, max: 5 }),
          descs: fc.array(
            fc.record({
              addr: fc.oneof(fc.integer({ min: 0, max: 16 * MiB + 4096 }), fc.constant(0xffff_ffff_f000)),
              len: fc.integer({ min: 0, max: 9000 }),
              write: fc.boolean(),
              next: fc.integer({ min: 0, max: 70 }),
              chain: fc.boolean(),
            }),
            { minLength: 1, maxLength: 4 },
          ),
          input: fc.uint8Array({ maxLength: 64 }),
        }),
        { maxLength: 25 },
      ),
      (ops) => {
        using r = rig({ ports: ["a"] });
        handshake(r);
        for (const op of ops) {
          const dq = r.drv.queues[op.q];
          const base = 40;
          op.descs.forEach((d, i) =>
            dq.writeDesc(base + i, {
              addr: d.addr,
              len: d.len,
              flags: (d.write ? VIRTQ_DESC_F_WRITE : 0) | (d.chain ? VIRTQ_DESC_F_NEXT : 0),
              next: d.next,
            })
          );
          dq.publish(base);
          r.dev.sendInput(op.input);
          r.drv.kick(op.q);
        }
      },
    ),
    { numRuns: 80 },
  );
});

// ---- EVENT_IDX: the ring protocol as Linux's virtio_ring.c and virtio_console.c run it ----

/** vring_need_event (virtio_ring.h): whether moving from `old` to `next` passes `event`. */
function needEvent(event: number, next: number, old: number): boolean {
  return ((next - event - 1) & 0xffff) < ((next - old) & 0xffff);
}

/**
 * The driver side of one split queue with VIRTIO_F_EVENT_IDX, step by step as Linux's virtio_ring.c:
 * virtqueue_add (publish), virtqueue_kick_prepare (kick only when avail_event was passed),
 * virtqueue_get_buf (writes used_event = last_used_idx after each buffer, callbacks being enabled).
 */
class EventIdxDriverQueue {
  #lastUsed = 0;
  /** avail_idx at the last kick_prepare: the "old" of vring_need_event. */
  #kickedFrom = 0;
  constructor(readonly q: DriverQueue, readonly mem: GuestMemory) {}
  add(head: number, addr: number, len: number, writable: boolean): void {
    this.q.writeDesc(head, { addr, len, flags: writable ? VIRTQ_DESC_F_WRITE : 0, next: 0 });
    this.q.publish(head);
  }
  kickPrepare(): boolean {
    const old = this.#kickedFrom;
    this.#kickedFrom = this.q.availIdx;
    return needEvent(this.q.availEvent(), this.q.availIdx, old);
  }
  getBuf(): { id: number; len: number } | null {
    const u = this.q.addrs.usedRing;
    if (this.mem.getU16(u + VIRTQ_USED_IDX) === this.#lastUsed) return null;
    const e = u + VIRTQ_USED_RING + VIRTQ_USED_ELEM_SIZE * (this.#lastUsed % this.q.size);
    const r = { id: this.mem.getU32(e + VIRTQ_USED_ELEM_ID), len: this.mem.getU32(e + VIRTQ_USED_ELEM_LEN) };
    this.#lastUsed = (this.#lastUsed + 1) & 0xffff;
    this.q.setUsedEvent(this.#lastUsed);
    return r;
  }
}

/** Port 0 (no MULTIPORT: connected from the start) on two queues with EVENT_IDX, interrupts counted per queue. */
function eventIdxRig(queueSize: number) {
  const out: Uint8Array[] = [];
  const dev = new ConsoleDevice({ output: (b) => out.push(b.slice()), multiport: false, inputLimit: 64 * MiB });
  assert.ok(dev.features & VIRTIO_F_EVENT_IDX);
  const g = new GuardedGuestMemory([{ start: 0, size: 16 * MiB }]);
  const alloc = new GuestAllocator(g.mem, DRIVER_ARENA_START, 16 * MiB);
  const dqs = [0, 1].map((i) => new DriverQueue(g.mem, i, queueSize, alloc));
  const irqs = [0, 0];
  const queues = dqs.map((d, i) => new Virtqueue(g.mem, i, d.addrs, { eventIdx: true }));
  const log = captureVirtioLog();
  dev.activate({
    mem: g.mem,
    queues,
    ackedFeatures: dev.features,
    interrupt: { signalUsedQueue: (i) => irqs[i]++, signalConfigChange: () => {} },
  });
  return {
    dev,
    out,
    irqs,
    alloc,
    mem: g.mem,
    rx: new EventIdxDriverQueue(dqs[0], g.mem),
    tx: new EventIdxDriverQueue(dqs[1], g.mem),
    [Symbol.dispose]() {
      assert.deepEqual(log.lines, []);
      closeDeviceRig(log, g, dev);
    },
  };
}

/** A small deterministic PRNG (xorshift32) for long schedules from one fast-check seed. */
function prng(seed: number): (n: number) => number {
  let s = (seed >>> 0) || 1;
  return (n) => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s % n;
  };
}

/**
 * Host input larger than the guest's posted receive buffers: the guest (virtio_console.c's reader) takes
 * used buffers with get_buf, re-posts each one after reading it and kicks only as kick_prepare allows; it
 * sleeps when get_buf finds nothing and wakes only on an interrupt of the receive queue. A stall is the
 * guest asleep with no interrupt coming and the host's bytes not all delivered.
 */
function runRx(seed: number, total: number, opts: { queueSize: number; posted: number; bufSize: number }): void {
  using r = eventIdxRig(opts.queueSize);
  const rand = prng(seed);
  const want = new Uint8Array(total).map((_, i) => (i * 131 + (i >> 8)) & 0xff);
  const got = new Uint8Array(total);
  let sent = 0;
  let received = 0;
  const bufs = Array.from({ length: opts.posted }, () => r.alloc.alloc(opts.bufSize));
  const repost = (head: number) => r.rx.add(head, bufs[head], opts.bufSize, true);
  for (let h = 0; h < opts.posted; h++) repost(h);
  if (r.rx.kickPrepare()) r.dev.queueNotify(0);
  let asleepAt = -1; // receive interrupts seen when the reader went to sleep, or -1 when awake
  while (received < total) {
    if (sent < total && rand(3) === 0) {
      const n = Math.min(total - sent, 1 + rand(opts.bufSize * 4));
      r.dev.sendInput(want.subarray(sent, sent + n));
      sent += n;
    }
    if (asleepAt >= 0) {
      if (r.irqs[0] > asleepAt) asleepAt = -1; // in_intr wakes the reader
      else if (sent === total) {
        assert.fail(
          `stall: reader asleep, no interrupt coming, ${received} of ${total} bytes delivered; ` +
            `${r.dev.stats().bytesIn} bytes moved by the device`,
        );
      }
      continue;
    }
    const reads = 1 + rand(3);
    for (let k = 0; k < reads; k++) {
      const u = r.rx.getBuf();
      if (!u) {
        asleepAt = r.irqs[0];
        break;
      }
      assert.ok(u.id < opts.posted && u.len <= opts.bufSize);
      got.set(r.mem.read(bufs[u.id], u.len), received);
      received += u.len;
      repost(u.id);
      // virtio_console's add_inbuf kicks after each buffer; batching sometimes covers kick_prepare's "old".
      if (rand(2) === 0 && r.rx.kickPrepare()) r.dev.queueNotify(0);
    }
    if (r.rx.kickPrepare()) r.dev.queueNotify(0);
  }
  assert.deepEqual(got, want);
}

/**
 * Guest output through a transmit ring smaller than the data: the writer reclaims used buffers with
 * get_buf, posts one buffer per write and kicks as kick_prepare allows; with no free descriptor it sleeps
 * until an interrupt of the transmit queue.
 */
function runTx(seed: number, total: number, opts: { queueSize: number; bufSize: number }): void {
  using r = eventIdxRig(opts.queueSize);
  const rand = prng(seed);
  const data = new Uint8Array(total).map((_, i) => (i * 7 + (i >> 9)) & 0xff);
  const bufs = Array.from({ length: opts.queueSize }, () => r.alloc.alloc(opts.bufSize));
  const free = Array.from({ length: opts.queueSize }, (_, i) => i);
  let sent = 0;
  let asleepAt = -1;
  while (sent < total) {
    if (asleepAt >= 0) {
      if (r.irqs[1] === asleepAt) {
        assert.fail(
          `stall: writer asleep with ${sent} of ${total} bytes posted; avail ${r.tx.q.availIdx} avail_event ${r.tx.q.availEvent()} used ${r.tx.q.usedIdx()} out ${
            concat(r.out).length
          }`,
        );
      }
      asleepAt = -1;
    }
    const reclaim = () => {
      for (let u = r.tx.getBuf(); u; u = r.tx.getBuf()) free.push(u.id);
    };
    reclaim();
    if (free.length === 0) {
      // A batch ends with a kick; then wait_event re-checks its condition before sleeping.
      if (r.tx.kickPrepare()) r.dev.queueNotify(1);
      reclaim();
      if (free.length === 0) {
        asleepAt = r.irqs[1];
        continue;
      }
    }
    const head = free.shift()!;
    const n = Math.min(total - sent, 1 + rand(opts.bufSize));
    r.mem.write(bufs[head], data.subarray(sent, sent + n));
    r.tx.add(head, bufs[head], n, false);
    sent += n;
    if ((rand(3) !== 0 || sent === total) && r.tx.kickPrepare()) r.dev.queueNotify(1);
  }
  assert.deepEqual(concat(r.out), data);
}

Deno.test("console: EVENT_IDX receive: input beyond the posted buffers, re-posted as Linux does, never stalls", () => {
  fc.assert(
    fc.property(fc.integer(), fc.integer({ min: 1, max: 16 }), (seed, posted) => {
      runRx(seed, 20_000, { queueSize: 16, posted, bufSize: 64 });
    }),
    { numRuns: 60 },
  );
});

Deno.test("console: EVENT_IDX transmit: output beyond the ring, kicks suppressed as Linux does, never stalls", () => {
  fc.assert(
    fc.property(fc.integer(), fc.constantFrom(1, 2, 4, 16), (seed, queueSize) => {
      runTx(seed, 20_000, { queueSize, bufSize: 64 });
    }),
    { numRuns: 60 },
  );
});

Deno.test("console: EVENT_IDX both ways across the 16-bit index wrap", () => {
  // More than 65536 buffers each way: avail_event, used_event and the indices wrap.
  runRx(1, 70_000 * 4, { queueSize: 8, posted: 8, bufSize: 4 });
  runTx(2, 70_000 * 4, { queueSize: 8, bufSize: 4 });
});

/**
 * The guest side of the two-thread test below, run in a Worker: Linux's virtio_ring.c as a driver that
 * reclaims with callbacks disabled (virtio_blk's virtblk_done loop): virtqueue_add + virtqueue_kick_prepare
 * (virtio_mb, then avail_event); virtqueue_disable_cb (used_event = 0), virtqueue_get_buf until empty,
 * virtqueue_enable_cb (used_event = last_used_idx, virtio_mb, re-read the used index); it waits for an
 * interrupt when the ring is full. Atomics on `ctl` play the kick eventfd, the interrupt and the waits; a
 * full barrier is an atomic read-modify-write of a private word.
 */
const EVENT_IDX_GUEST = `
import * as Q from ${JSON.stringify(new URL("./queue.ts", import.meta.url).href)};
self.onmessage = (e) => {
  const { ctlBuf, hostAddr, memSize, ring, bufs, messages, spin } = e.data;
  const ctl = new Int32Array(ctlBuf);
  const [KICKS, IRQS, ASLEEP, ASLEEP_AT, ABORT, DONE] = [0, 1, 2, 3, 4, 5];
  const m = new DataView(Deno.UnsafePointerView.getArrayBuffer(Deno.UnsafePointer.create(hostAddr), memSize));
  const fenceWord = new Int32Array(new SharedArrayBuffer(4));
  const mb = () => Atomics.add(fenceWord, 0, 1);
  const size = ring.size;
  const usedEventAt = ring.availRing + Q.VIRTQ_AVAIL_RING + Q.VIRTQ_AVAIL_ELEM_SIZE * size;
  const availEventAt = ring.usedRing + Q.VIRTQ_USED_RING + Q.VIRTQ_USED_ELEM_SIZE * size;
  const free = Array.from({ length: size }, (_, i) => i);
  let availIdx = 0, kickedFrom = 0, lastUsed = 0;
  const usedIdx = () => m.getUint16(ring.usedRing + Q.VIRTQ_USED_IDX, true);
  const getBuf = () => {
    if (usedIdx() === lastUsed) return false;
    const el = ring.usedRing + Q.VIRTQ_USED_RING + Q.VIRTQ_USED_ELEM_SIZE * (lastUsed % size);
    free.push(m.getUint32(el + Q.VIRTQ_USED_ELEM_ID, true));
    lastUsed = (lastUsed + 1) & 0xffff;
    return true;
  };
  // virtblk_done: do { disable_cb; while (get_buf) ...; } while (!enable_cb);
  const reclaim = () => {
    for (;;) {
      m.setUint16(usedEventAt, 0, true);
      while (getBuf());
      m.setUint16(usedEventAt, lastUsed, true);
      mb();
      if (usedIdx() === lastUsed) return;
    }
  };
  for (let i = 0; i < messages && !Atomics.load(ctl, ABORT);) {
    if (free.length === 0) {
      const seen = Atomics.load(ctl, IRQS);
      reclaim();
      if (free.length > 0) continue;
      // Spin a while first, so both threads often run their halves of the protocol at the same time.
      for (let n = 0; n < spin && Atomics.load(ctl, IRQS) === seen; n++);
      Atomics.store(ctl, ASLEEP_AT, seen);
      Atomics.store(ctl, ASLEEP, 1);
      Atomics.wait(ctl, IRQS, seen);
      Atomics.store(ctl, ASLEEP, 0);
      reclaim();
      continue;
    }
    const head = free.shift();
    const d = ring.descTable + Q.VIRTQ_DESC_SIZE * head;
    m.setUint32(bufs + 4 * head, i, true);
    m.setBigUint64(d + Q.VIRTQ_DESC_ADDR, BigInt(bufs + 4 * head), true);
    m.setUint32(d + Q.VIRTQ_DESC_LEN, 4, true);
    m.setUint16(d + Q.VIRTQ_DESC_FLAGS, 0, true);
    m.setUint16(ring.availRing + Q.VIRTQ_AVAIL_RING + Q.VIRTQ_AVAIL_ELEM_SIZE * (availIdx % size), head, true);
    availIdx = (availIdx + 1) & 0xffff;
    m.setUint16(ring.availRing + Q.VIRTQ_AVAIL_IDX, availIdx, true);
    i++;
    mb();
    const ev = m.getUint16(availEventAt, true);
    if (((availIdx - ev - 1) & 0xffff) < ((availIdx - kickedFrom) & 0xffff)) {
      Atomics.add(ctl, KICKS, 1);
      Atomics.notify(ctl, KICKS);
    }
    kickedFrom = availIdx;
  }
  Atomics.store(ctl, DONE, 1);
  Atomics.add(ctl, KICKS, 1);
  Atomics.notify(ctl, KICKS);
  postMessage("done");
};
`;

Deno.test("console: EVENT_IDX with the driver on another thread: 100000 messages, no kick or interrupt lost", async () => {
  // The device and a Linux-like driver run the ring protocol at the same time. Note: this did not catch
  // the device's missing fences (queue.ts memoryFence) in 2 million messages here; the reordering window
  // is a few nanoseconds. It checks that the protocol holds up under real concurrency.
  const MESSAGES = 100_000;
  const RING = 4;
  const [KICKS, IRQS, ASLEEP, ASLEEP_AT, ABORT, DONE] = [0, 1, 2, 3, 4, 5];
  /** How long the device thread sleeps in Atomics.wait before it looks for a stall (not an assertion). */
  const IDLE_CHECK_MS = 50;
  /** Loads of the counter each side spins for before it sleeps on it. */
  const SPIN = 20_000;
  const g = new GuardedGuestMemory([{ start: 0, size: 1 * MiB }]);
  const alloc = new GuestAllocator(g.mem, DRIVER_ARENA_START, 1 * MiB);
  const rxq = new DriverQueue(g.mem, 0, RING, alloc);
  const txq = new DriverQueue(g.mem, 1, RING, alloc);
  const bufs = alloc.alloc(4 * RING);
  const ctl = new Int32Array(new SharedArrayBuffer(4 * 8));
  let got = 0;
  let bad = "";
  const dev = new ConsoleDevice({
    multiport: false,
    output: (b) => {
      for (let o = 0; o + 4 <= b.length; o += 4) {
        const v = new DataView(b.buffer, b.byteOffset + o, 4).getUint32(0, true);
        if (v !== got && !bad) bad = `message ${v} arrived where ${got} was due`;
        got++;
      }
    },
  });
  const queues = [rxq, txq].map((d, i) => new Virtqueue(g.mem, i, d.addrs, { eventIdx: true }));
  dev.activate({
    mem: g.mem,
    queues,
    ackedFeatures: dev.features,
    interrupt: {
      signalUsedQueue: () => {
        Atomics.add(ctl, IRQS, 1);
        Atomics.notify(ctl, IRQS);
      },
      signalConfigChange: () => {},
    },
  });
  const worker = new Worker(URL.createObjectURL(new Blob([EVENT_IDX_GUEST], { type: "text/javascript" })), {
    type: "module",
  });
  const finished = new Promise<void>((resolve, reject) => {
    worker.onmessage = () => resolve();
    worker.onerror = (e) => {
      e.preventDefault();
      reject(new Error(e.message));
    };
  });
  let stall = "";
  try {
    worker.postMessage({
      ctlBuf: ctl.buffer,
      hostAddr: g.mem.hostAddress(0, 1),
      memSize: 1 * MiB,
      ring: txq.addrs,
      bufs,
      messages: MESSAGES,
      spin: SPIN,
    });
    // The device thread: serve the transmit queue on every kick, as the vhost-user back end does.
    let seenKicks = 0;
    for (;;) {
      const k = Atomics.load(ctl, KICKS);
      if (k !== seenKicks) {
        seenKicks = k;
        dev.queueNotify(1);
        if (Atomics.load(ctl, DONE)) break;
        continue;
      }
      let spun = 0;
      while (spun < SPIN && Atomics.load(ctl, KICKS) === k) spun++;
      if (spun < SPIN || Atomics.wait(ctl, KICKS, k, IDLE_CHECK_MS) !== "timed-out") continue;
      // Stable state check: the driver waits for an interrupt that no one will send and no kick is pending.
      if (
        Atomics.load(ctl, ASLEEP) && Atomics.load(ctl, ASLEEP_AT) === Atomics.load(ctl, IRQS) &&
        Atomics.load(ctl, KICKS) === seenKicks
      ) {
        stall = `stall after ${got} of ${MESSAGES} messages: available ${txq.availIdx}, device took ` +
          `${queues[1].nextAvail}, used ${txq.usedIdx()}, avail_event ${txq.availEvent()}`;
        Atomics.store(ctl, ABORT, 1);
        Atomics.add(ctl, IRQS, 1);
        Atomics.notify(ctl, IRQS);
        break;
      }
    }
    await finished;
  } finally {
    worker.terminate();
    dev.close();
    g.close();
  }
  assert.equal(stall, "");
  assert.equal(bad, "");
  assert.equal(got, MESSAGES);
});

Deno.test("console: bad port layouts are refused at construction; a port too many is refused at open", () => {
  const output = () => {};
  assert.throws(
    () => new ConsoleDevice({ output, ports: ["a", "b"], maxPorts: 2 }),
    /maxPorts 2 must be an integer in 3\.\.32767/,
  );
  assert.throws(() => new ConsoleDevice({ output, maxPorts: 0x8000 }), /maxPorts 32768/);
  assert.throws(() => new ConsoleDevice({ output, maxPorts: 1.5 }), /maxPorts 1.5/);
  assert.throws(() => new ConsoleDevice({ output, ports: ["a"], multiport: false }), /named ports need multiport/);
  assert.throws(() => new ConsoleDevice({ output, ports: [""] }), /port name "" must be 1\.\.\d+ bytes without NUL/);
  assert.throws(() => new ConsoleDevice({ output, ports: ["a\0b"] }), /without NUL/);
  const dev = new ConsoleDevice({ output, ports: ["a"], maxPorts: 2 });
  assert.equal(dev.openPort("a"), dev.openPort("a"), "an open port is found again by name");
  assert.throws(() => dev.openPort("b"), /no free port for "b" \(maxPorts 2\)/);
  dev.close?.();
});

Deno.test("console: resize is a config change without MULTIPORT, nothing without SIZE; config writes are ignored", () => {
  {
    using r = rig({ size: { cols: 80, rows: 25 }, multiport: false });
    r.drv.ackInterrupt();
    const irqs = r.irqs.n;
    r.dev.resize(132, 43);
    assert.equal(r.irqs.n, irqs + 1, "one interrupt");
    assert.equal(r.drv.ackInterrupt() & VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_CONFIG, "a configuration change");
    const cfg = new DataView(r.drv.readConfig(0, 4).buffer);
    assert.deepEqual([cfg.getUint16(CONSOLE_CFG_COLS, true), cfg.getUint16(CONSOLE_CFG_ROWS, true)], [132, 43]);
    // The driver writing the size is ignored with one line.
    r.drv.transport.write(0x100 + CONSOLE_CFG_COLS, Uint8Array.of(1, 0));
    assert.equal(r.lines.length, 1);
    assert.match(r.lines[0], /driver wrote 2 bytes of read-only config at 0; ignored/);
    assert.equal(new DataView(r.drv.readConfig(0, 2).buffer).getUint16(0, true), 132);
  }
  {
    using r = rig({ multiport: false });
    assert.ok(!(r.drv.deviceFeatures() & VIRTIO_CONSOLE_F_SIZE));
    const irqs = r.irqs.n;
    r.dev.resize(100, 30);
    assert.equal(r.irqs.n, irqs, "no SIZE feature: the guest is not told");
    assert.equal(r.drv.ackInterrupt(), 0);
  }
});
