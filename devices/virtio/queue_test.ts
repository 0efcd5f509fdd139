// Split virtqueue: chains, indirect tables, hostile chains, EVENT_IDX, 16-bit wrap-around,
// and property tests with random hostile descriptor tables (fast-check).

import assert from "node:assert/strict";
import fc from "fast-check";
import { ChainError, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, Virtqueue } from "./queue.ts";
import { guestLog } from "../../core/log.ts";
import { VRING_AVAIL_F_NO_INTERRUPT, VRING_USED_F_NO_NOTIFY } from "./queue.ts";
import { RateLimitedLog } from "../../core/log.ts";
import { decodeState, type DeviceState, encodeState, StateError, type StateValue } from "../../core/state.ts";
import { DriverQueue, GuardedGuestMemory, GuestAllocator } from "../../test/support/virtio_driver.ts";

const MiB = 1024 * 1024;
/** Region 0 holds the rings and buffers; region 1 sits after a hole in guest-physical space. */
const REGION0 = { start: 0, size: MiB };
const REGION1 = { start: 4 * MiB, size: MiB };

interface Fixture {
  g: GuardedGuestMemory;
  dq: DriverQueue;
  q: Virtqueue;
  lines: string[];
  [Symbol.dispose](): void;
}

function fixture(size = 16, eventIdx = false): Fixture {
  const g = new GuardedGuestMemory([REGION0, REGION1]);
  const alloc = new GuestAllocator(g.mem, 0x1000, REGION0.size);
  const dq = new DriverQueue(g.mem, 0, size, alloc);
  const q = new Virtqueue(g.mem, 0, dq.addrs, { eventIdx });
  const lines: string[] = [];
  const old = guestLog.sink;
  guestLog.sink = (l) => lines.push(l);
  return {
    g,
    dq,
    q,
    lines,
    [Symbol.dispose]() {
      guestLog.sink = old;
      assert.ok(g.canaryIntact(), "canary around guest memory intact");
      g.close();
    },
  };
}

const bytes = (...v: number[]) => Uint8Array.from(v);

Deno.test("direct chain: readable then writable buffers, used ring entry", () => {
  using f = fixture();
  const hdr = bytes(1, 2, 3, 4, 5, 6, 7, 8);
  const sub = f.dq.submit([hdr, bytes(9, 10), 32, 4]);
  const c = f.q.pop();
  assert.ok(c);
  assert.equal(c.head, sub.head);
  assert.deepEqual(c.readable, [{ addr: sub.buffers[0].addr, len: 8 }, { addr: sub.buffers[1].addr, len: 2 }]);
  assert.equal(c.readableLength, 10);
  assert.equal(c.writableLength, 36);
  assert.deepEqual([...c.reader().read(10)], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
  const w = c.writer();
  w.write(new Uint8Array(34).fill(0x42));
  w.writeU16(0xbeef);
  assert.equal(w.bytesWritten, 36);
  assert.deepEqual([...f.g.mem.read(sub.buffers[3].addr, 4)], [0x42, 0x42, 0xef, 0xbe]);
  f.q.addUsed(c.head, w.bytesWritten);
  assert.equal(f.q.pop(), null);
  assert.deepEqual(f.dq.used(), [{ id: sub.head, len: 36 }]);
  assert.equal(f.lines.length, 0);
});

Deno.test("reader and writer cross descriptor boundaries and refuse to run past the end", () => {
  using f = fixture();
  f.dq.submit([bytes(0x01, 0x02, 0x03), bytes(0x04, 0x05, 0x06, 0x07, 0x08), bytes(0x09), 3, 2]);
  const c = f.q.pop()!;
  const r = c.reader();
  assert.equal(r.readU32(), 0x04030201);
  assert.equal(r.readU32(), 0x08070605);
  assert.equal(r.remaining, 1);
  assert.throws(() => r.readU32(), ChainError);
  assert.equal(r.readU8(), 9);
  const w = c.writer();
  w.writeU32(0xaabbccdd);
  assert.throws(() => w.writeU16(1), ChainError);
  assert.equal(w.bytesWritten, 4);
  const segs = c.writer().segments(5);
  assert.deepEqual(segs.map((s) => s.len), [3, 2]);
});

Deno.test("indirect chain is followed; descriptors inside the table may mix readable and writable", () => {
  using f = fixture();
  const sub = f.dq.submit([bytes(1, 2, 3, 4), bytes(5, 6, 7, 8), 16], { indirect: true });
  const c = f.q.pop()!;
  assert.equal(c.head, sub.head);
  assert.equal(c.readableLength, 8);
  assert.equal(c.writableLength, 16);
  assert.equal(c.reader().readU64(), 0x0807060504030201n);
  f.q.addUsed(c.head, 16);
  assert.deepEqual(f.dq.used(), [{ id: sub.head, len: 16 }]);
});

Deno.test("zero-length descriptors are allowed and count toward the chain limit", () => {
  using f = fixture(4);
  f.dq.submit([bytes(1), new Uint8Array(0), 0, 4]);
  const c = f.q.pop()!;
  assert.equal(c.readableLength, 1);
  assert.equal(c.writableLength, 4);
  assert.equal(f.lines.length, 0);
});

Deno.test("a buffer spanning two adjacent guest regions is split, not refused", () => {
  const g = new GuardedGuestMemory([{ start: 0, size: 64 * 1024 }, { start: 64 * 1024, size: 64 * 1024 }]);
  try {
    const alloc = new GuestAllocator(g.mem, 0x1000, 0x8000);
    const dq = new DriverQueue(g.mem, 0, 4, alloc);
    const q = new Virtqueue(g.mem, 0, dq.addrs, { eventIdx: false });
    const span = 60 * 1024;
    for (let i = 0; i < 8 * 1024; i++) g.mem.setU8(span + i, i & 0xff);
    dq.writeDesc(0, { addr: span, len: 8 * 1024, flags: 0, next: 0 });
    dq.publish(0);
    const c = q.pop()!;
    assert.deepEqual(c.readable, [{ addr: span, len: 4096 }, { addr: 64 * 1024, len: 4096 }]);
    const data = c.reader().read(8 * 1024);
    assert.ok(data.every((b, i) => b === (i & 0xff)));
    assert.ok(g.canaryIntact());
  } finally {
    g.close();
  }
});

const LOG_BURST = new RateLimitedLog("x").burst;

/** Publish a hand-written chain and check it is completed with length 0 and one log line. */
function expectMalformed(f: Fixture, head: number, why: RegExp): void {
  f.dq.publish(head);
  const before = f.lines.length;
  assert.equal(f.q.pop(), null);
  assert.deepEqual(f.dq.used(), [{ id: head, len: 0 }]);
  // One line per malformed chain for the first LOG_BURST of them, then rate limited.
  assert.equal(f.lines.length, before + (f.q.malformed <= LOG_BURST ? 1 : 0), "exactly one log line");
  if (f.q.malformed <= LOG_BURST) assert.match(f.lines.at(-1)!, why);
  else assert.match(f.q.lastError, why);
  assert.equal(f.q.nextAvail, f.dq.availIdx);
}

Deno.test("malformed chains are consumed, logged once and completed with length 0", () => {
  using f = fixture(8);
  const ok = 0x2000;
  const N = VIRTQ_DESC_F_NEXT, W = VIRTQ_DESC_F_WRITE, I = VIRTQ_DESC_F_INDIRECT;
  // A loop: 0 -> 1 -> 0.
  f.dq.writeDesc(0, { addr: ok, len: 8, flags: N, next: 1 });
  f.dq.writeDesc(1, { addr: ok, len: 8, flags: N, next: 0 });
  expectMalformed(f, 0, /more than 8 descriptors/);
  // Outside guest memory: in the hole between the regions, past the end, and beyond 2^53.
  for (const addr of [2 * MiB, 5 * MiB - 4, 0xffff_ffff_ffff_f000n]) {
    f.dq.writeDesc(2, { addr, len: 16, flags: 0, next: 0 });
    expectMalformed(f, 2, /outside guest memory/);
  }
  // Lengths summing beyond 2^32.
  f.dq.writeDesc(3, { addr: ok, len: 8, flags: N, next: 4 });
  f.dq.writeDesc(4, { addr: ok, len: 0xffff_ffff, flags: 0, next: 0 });
  expectMalformed(f, 3, /2\^32/);
  // A readable descriptor after a writable one.
  f.dq.writeDesc(3, { addr: ok, len: 8, flags: N | W, next: 4 });
  f.dq.writeDesc(4, { addr: ok, len: 8, flags: 0, next: 0 });
  expectMalformed(f, 3, /readable descriptor after a writable/);
  // next and head out of the table.
  f.dq.writeDesc(5, { addr: ok, len: 8, flags: N, next: 8 });
  expectMalformed(f, 5, /next 8 >= table size 8/);
  expectMalformed(f, 9, /head 9 >= queue size 8/);
  // Indirect: with NEXT, bad length, outside memory, nested, looping inside the table.
  const table = 0x3000;
  f.dq.writeDesc(6, { addr: table, len: 32, flags: I | N, next: 7 });
  expectMalformed(f, 6, /indirect descriptor with NEXT/);
  f.dq.writeDesc(6, { addr: table, len: 24, flags: I, next: 0 });
  expectMalformed(f, 6, /not a non-zero multiple of 16/);
  f.dq.writeDesc(6, { addr: 0, len: 0, flags: I, next: 0 });
  expectMalformed(f, 6, /not a non-zero multiple of 16/);
  f.dq.writeDesc(6, { addr: 5 * MiB - 16, len: 32, flags: I, next: 0 });
  expectMalformed(f, 6, /indirect table .* outside guest memory/);
  f.dq.writeDesc(0, { addr: table, len: 16, flags: I, next: 0 }, table);
  f.dq.writeDesc(6, { addr: table, len: 16, flags: I, next: 0 });
  expectMalformed(f, 6, /indirect descriptor inside an indirect table/);
  f.dq.writeDesc(0, { addr: ok, len: 8, flags: N, next: 1 }, table);
  f.dq.writeDesc(1, { addr: ok, len: 8, flags: N, next: 0 }, table);
  f.dq.writeDesc(6, { addr: table, len: 32, flags: I, next: 0 });
  expectMalformed(f, 6, /more than 2 descriptors in the indirect table/);
  // An indirect table whose chain runs past its own count.
  f.dq.writeDesc(1, { addr: ok, len: 8, flags: N, next: 2 }, table);
  expectMalformed(f, 6, /next 2 >= table size 2/);
  // And a good chain after all that is still served.
  const sub = f.dq.submit([bytes(7)]);
  assert.equal(f.q.pop()?.head, sub.head);
  assert.equal(f.q.malformed, 15);
});

Deno.test("a driver that publishes more entries than the queue holds gets a log line, not a crash", () => {
  using f = fixture(4);
  f.g.mem.setU16(f.dq.addrs.availRing + 2, 100);
  assert.equal(f.q.pop(), null);
  assert.equal(f.lines.length, 1);
  assert.match(f.lines[0], /100 entries ahead/);
});

Deno.test("an unusable ring configuration is reported and never touched", () => {
  using f = fixture();
  const good = f.dq.addrs;
  const bad = [
    { ...good, size: 3 },
    { ...good, size: 0 },
    { ...good, size: 65536 },
    { ...good, descTable: good.descTable + 8 },
    { ...good, usedRing: good.usedRing + 2 },
    { ...good, availRing: 5 * MiB - 4 },
    { ...good, descTable: 2 * MiB },
  ];
  for (const a of bad) {
    assert.notEqual(Virtqueue.validate(f.g.mem, a), null, JSON.stringify(a));
    const q = new Virtqueue(f.g.mem, 1, a, { eventIdx: true });
    assert.equal(q.pop(), null);
    q.addUsed(0, 0);
    assert.equal(q.needsInterrupt(), false);
    q.setNotification(true);
  }
  assert.equal(Virtqueue.validate(f.g.mem, good), null);
});

Deno.test("without EVENT_IDX: NO_INTERRUPT suppresses interrupts, setNotification toggles NO_NOTIFY", () => {
  using f = fixture();
  assert.equal(f.q.needsInterrupt(), false, "nothing used yet");
  f.dq.submit([bytes(1)]);
  f.q.addUsed(f.q.pop()!.head, 0);
  assert.equal(f.q.needsInterrupt(), true);
  assert.equal(f.q.needsInterrupt(), false, "nothing new since the last call");
  f.dq.setAvailFlags(VRING_AVAIL_F_NO_INTERRUPT);
  f.dq.submit([bytes(1)]);
  f.q.addUsed(f.q.pop()!.head, 0);
  assert.equal(f.q.needsInterrupt(), false);
  f.q.setNotification(false);
  assert.equal(f.dq.usedFlags() & VRING_USED_F_NO_NOTIFY, VRING_USED_F_NO_NOTIFY);
  f.q.setNotification(true);
  assert.equal(f.dq.usedFlags() & VRING_USED_F_NO_NOTIFY, 0);
});

Deno.test("EVENT_IDX: used_event decides interrupts, avail_event follows the device", () => {
  using f = fixture(16, true);
  // The driver wants an interrupt when used idx passes 2 (i.e. after the third completion).
  f.dq.setUsedEvent(2);
  const heads = [0, 1, 2, 3].map(() => f.dq.submit([bytes(1)]).head);
  assert.equal(f.q.pop()!.head, heads[0]);
  assert.equal(f.dq.availEvent(), 1, "avail_event: kick me for entry 1");
  f.q.addUsed(heads[0], 0);
  f.q.addUsed(heads[1], 0);
  assert.equal(f.q.needsInterrupt(), false, "used idx 2 has not passed used_event 2");
  f.q.addUsed(heads[2], 0);
  assert.equal(f.q.needsInterrupt(), true, "used idx 3 passed used_event 2");
  f.q.addUsed(heads[3], 0);
  assert.equal(f.q.needsInterrupt(), false, "used_event 2 was already passed");
  f.dq.setUsedEvent(4);
  f.dq.submit([bytes(1)]);
  f.q.addUsed(f.q.pop()!.head, 0);
  assert.equal(f.q.needsInterrupt(), true);
  // Disabled notifications do not move avail_event; enabling writes the current position.
  f.q.setNotification(false);
  f.q.pop();
  const ev = f.dq.availEvent();
  f.dq.submit([bytes(1)]);
  assert.equal(f.q.pop() !== null, true);
  assert.equal(f.dq.availEvent(), ev);
  f.dq.submit([bytes(1)]);
  assert.equal(f.q.enableNotification(), true, "a chain arrived while notifications were off");
  assert.equal(f.dq.availEvent(), f.q.nextAvail);
});

Deno.test("16-bit indices wrap around (plain and EVENT_IDX)", () => {
  for (const eventIdx of [false, true]) {
    using f = fixture(4, eventIdx);
    f.dq.startAt(0xfffe);
    f.q.nextAvail = 0xfffe;
    f.q.nextUsed = 0xfffe;
    f.dq.setUsedEvent(0xffff);
    let served = 0;
    for (let round = 0; round < 3; round++) {
      const subs = [0, 1, 2].map((i) => f.dq.submit([bytes(i + round)], { indirect: i === 1 }));
      for (const s of subs) {
        const c = f.q.pop()!;
        assert.equal(c.head, s.head);
        assert.equal(c.reader().readU8(), subs.indexOf(s) + round);
        f.q.addUsed(c.head, served++);
      }
      assert.equal(f.q.pop(), null);
      const used = f.dq.used();
      assert.deepEqual(used.map((u) => u.id), subs.map((s) => s.head));
      if (round === 0) assert.equal(f.q.needsInterrupt(), true, "used idx moved past 0xffff");
    }
    assert.equal(f.q.nextAvail, (0xfffe + 9) & 0xffff);
    f.q.nextAvail = 0x1_0007; // a vhost-user front end's base is masked to 16 bits
    assert.equal(f.q.nextAvail, 7);
    assert.equal(f.dq.usedIdx(), (0xfffe + 9) & 0xffff);
  }
});

// ---- Property tests: random hostile descriptor tables ----

const QSIZE = 8;
const TABLE_AT = 0x8000; // where random indirect tables are written
const GOOD = 0x10000; // a valid data area

const addrArb = fc.oneof(
  fc.integer({ min: GOOD, max: GOOD + 0x10000 }).map(BigInt), // valid
  fc.integer({ min: REGION1.start, max: REGION1.start + REGION1.size + 64 }).map(BigInt), // region 1 and its end
  fc.integer({ min: REGION0.size - 64, max: REGION0.size + 64 }).map(BigInt), // straddling region 0's end
  fc.constantFrom(2n * BigInt(MiB), 0n, BigInt(TABLE_AT), 0xffff_ffff_ffff_ffffn, 1n << 53n, (1n << 53n) - 8n),
  fc.bigInt({ min: 0n, max: 0xffff_ffff_ffff_ffffn }),
);
const lenArb = fc.oneof(
  fc.integer({ min: 0, max: 64 }),
  fc.constantFrom(0xffff_ffff, 0x8000_0000, MiB, 16, 32, 128),
  fc.integer({ min: 0, max: 0xffff_ffff }),
);
const descArb = fc.record({
  addr: addrArb,
  len: lenArb,
  flags: fc.integer({ min: 0, max: 7 }),
  next: fc.integer({ min: 0, max: QSIZE + 2 }),
});
const scenarioArb = fc.record({
  table: fc.array(descArb, { minLength: QSIZE, maxLength: QSIZE }),
  indirect: fc.array(descArb, { minLength: 1, maxLength: 6 }),
  heads: fc.array(fc.integer({ min: 0, max: QSIZE + 1 }), { minLength: 1, maxLength: QSIZE }),
  start: fc.integer({ min: 0, max: 0xffff }),
  eventIdx: fc.boolean(),
});

type Scenario = typeof scenarioArb extends fc.Arbitrary<infer T> ? T : never;

function setUp(s: Scenario) {
  const f = fixture(QSIZE, s.eventIdx);
  s.table.forEach((d, i) => f.dq.writeDesc(i, d));
  s.indirect.forEach((d, i) => f.dq.writeDesc(i, d, TABLE_AT));
  f.dq.startAt(s.start);
  f.q.nextAvail = s.start;
  f.q.nextUsed = s.start;
  for (const h of s.heads) f.dq.publish(h);
  return f;
}

Deno.test("property: hostile chains never throw, never leave guest memory, every head is returned in order", () => {
  fc.assert(
    fc.property(scenarioArb, (s) => {
      using f = setUp(s);
      const chains = [];
      for (let c = f.q.pop(); c; c = f.q.pop()) {
        // Reading every readable byte stays inside guest memory (the canary is checked on dispose).
        assert.equal(c.reader().read(Math.min(c.readableLength, 1 << 16)).length, Math.min(c.readableLength, 1 << 16));
        for (const b of [...c.readable, ...c.writable]) assert.ok(f.g.mem.isValid(b.addr, b.len));
        chains.push(c);
        f.q.addUsed(c.head, c.writableLength);
      }
      assert.equal(f.q.nextAvail, f.dq.availIdx, "every published entry consumed");
      const used = f.dq.used();
      assert.deepEqual(used.map((u) => u.id), s.heads, "every head returned, in order");
      assert.equal(chains.length + f.q.malformed, s.heads.length);
      assert.ok(f.lines.length <= f.q.malformed, "at most one line per malformed chain");
      f.q.needsInterrupt();
    }),
    { numRuns: 300 },
  );
});

Deno.test("property: a device writing every writable byte of hostile chains stays inside the guest", () => {
  fc.assert(
    fc.property(scenarioArb, fc.integer({ min: 0, max: 255 }), (s, fill) => {
      using f = setUp(s);
      for (let c = f.q.pop(); c; c = f.q.pop()) {
        const w = c.writer();
        const n = Math.min(c.writableLength, 1 << 16);
        w.write(new Uint8Array(n).fill(fill));
        assert.throws(() => c.writer().skip(c.writableLength + 1), ChainError);
        f.q.addUsed(c.head, w.bytesWritten);
      }
      assert.ok(f.g.canaryIntact());
    }),
    { numRuns: 300 },
  );
});

// ---- Saved state ----

Deno.test("state: a restored queue continues at the saved indices, with EVENT_IDX suppression intact", () => {
  using f = fixture(8, true);
  // Nine chains through an 8-entry ring: the indices are past a wrap of the ring.
  for (let i = 0; i < 9; i++) {
    f.dq.submit([bytes(i), 4]);
    const c = f.q.pop()!;
    f.q.addUsed(c.head, 1);
    f.dq.used();
  }
  f.dq.setUsedEvent(8); // an interrupt once entry 8 is used
  assert.equal(f.q.needsInterrupt(), true);
  f.dq.setUsedEvent(9); // and the next once entry 9 is used
  const pending = f.dq.submit([bytes(42), 4]); // published, not taken yet
  const state = decodeState(encodeState(f.q.saveState()));
  const q2 = new Virtqueue(f.g.mem, 0, f.dq.addrs, { eventIdx: true });
  q2.restoreState(state);
  assert.equal(q2.nextAvail, 9);
  assert.equal(q2.nextUsed, 9);
  assert.ok(q2.quiescent());
  const c = q2.pop()!;
  assert.equal(c.head, pending.head);
  assert.deepEqual([...c.reader().read(1)], [42]);
  assert.equal(f.dq.availEvent(), 10, "avail_event follows the restored index");
  q2.addUsed(c.head, 3);
  assert.deepEqual(f.dq.used(), [{ id: pending.head, len: 3 }]);
  assert.equal(f.dq.usedIdx(), 10);
  assert.equal(q2.needsInterrupt(), true, "entry 9 was used");
  q2.addUsed(0, 0);
  assert.equal(q2.needsInterrupt(), false, "no interrupt asked for entry 10");
});

Deno.test("state: quiescent is false while a chain is taken and not completed; malformed chains complete", () => {
  using f = fixture();
  f.dq.submit([bytes(1), 4]);
  f.dq.submit([bytes(2), 4]);
  const a = f.q.pop()!;
  const b = f.q.pop()!;
  assert.equal(f.q.inFlight, 2);
  assert.equal(f.q.quiescent(), false);
  f.q.addUsed(a.head, 0);
  assert.equal(f.q.quiescent(), false);
  const saved = f.q.saveState();
  f.q.addUsed(b.head, 0);
  assert.ok(f.q.quiescent());
  // A chain whose head is out of range is completed by pop itself.
  f.dq.publish(99);
  assert.equal(f.q.pop(), null);
  assert.equal(f.q.malformed, 1);
  assert.ok(f.q.quiescent());
  // The in-flight count is part of the state: a queue restored mid-request is not quiescent.
  const q2 = new Virtqueue(f.g.mem, 0, f.dq.addrs, { eventIdx: false });
  q2.restoreState(decodeState(encodeState(saved)));
  assert.equal(q2.inFlight, 1);
  q2.addUsed(b.head, 0);
  assert.ok(q2.quiescent());
});

Deno.test("state: a wrong type, version, ring or malformed field is refused with StateError", () => {
  using f = fixture(8);
  const good = f.q.saveState();
  const data = good.data as Record<string, StateValue>;
  const fresh = () => new Virtqueue(f.g.mem, 0, f.dq.addrs, { eventIdx: false });
  const bad: [string, DeviceState][] = [
    ["type", { ...good, type: "virtio-mmio" }],
    ["version", { ...good, version: 2 }],
    ["data", { ...good, data: [1, 2] }],
    ["size", { ...good, data: { ...data, size: 16 } }],
    ["usedRing", { ...good, data: { ...data, usedRing: data.usedRing as number + 4 } }],
    ["eventIdx", { ...good, data: { ...data, eventIdx: true } }],
    ["nextAvail", { ...good, data: { ...data, nextAvail: 0x10000 } }],
    ["nextUsed", { ...good, data: { ...data, nextUsed: 1.5 } }],
    ["notify", { ...good, data: { ...data, notify: 1 } }],
    ["inFlight", { ...good, data: { ...data, inFlight: 9 } }],
    ["missing", { ...good, data: { ...data, signalledUsed: null } }],
  ];
  for (const [what, s] of bad) assert.throws(() => fresh().restoreState(s), StateError, what);
  fresh().restoreState(good);
});
