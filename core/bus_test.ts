// The I/O and MMIO buses: an access reaches the device whose range holds it, at its offset in that range;
// overlapping ranges are refused; unmapped accesses are counted and read as all-ones. A property test checks
// random layouts and accesses against a linear search.

import assert from "node:assert/strict";
import fc from "fast-check";
import { Bus, type BusDevice } from "./bus.ts";

/** A device that records every access and answers reads with its id and the offset. */
function recorder(id: number) {
  const log: { op: "r" | "w"; offset: number; bytes: number[] }[] = [];
  const device: BusDevice = {
    read(offset, data) {
      log.push({ op: "r", offset, bytes: [] });
      data.fill(0);
      data[0] = id;
      if (data.length > 1) data[1] = offset & 0xff;
    },
    write(offset, data) {
      log.push({ op: "w", offset, bytes: [...data] });
    },
  };
  return { device, log };
}
const nothing: BusDevice = { read: () => {}, write: () => {} };

Deno.test("port bus: routes by range, refuses overlaps, answers all-ones where nothing lives", () => {
  const bus = new Bus("test");
  const seen: [number, number][] = [];
  bus.add(0x3f8, 8, { read: (o, d) => d.fill(o), write: (o, d) => seen.push([o, d[0]]) }, "COM1");
  bus.add(0x70, 2, { read: (_o, d) => d.fill(9), write: () => {} }, "cmos");
  assert.throws(() => bus.add(0x3fc, 8, { read: () => {}, write: () => {} }, "clash"), /overlaps COM1/);
  const b = new Uint8Array(1);
  assert.equal(bus.read(0x3fd, b), true);
  assert.equal(b[0], 5);
  bus.write(0x3f8, Uint8Array.of(0x41));
  assert.deepEqual(seen, [[0, 0x41]]);
  assert.equal(bus.read(0x71, b), true);
  assert.equal(b[0], 9);
  assert.equal(bus.read(0x400, b), false);
  assert.equal(b[0], 0xff);
  assert.equal(bus.unhandled, 1);
});

Deno.test("bus: each access goes to its device with the offset from that device's base, and only to it", () => {
  const bus = new Bus("mmio");
  const a = recorder(1), b = recorder(2), c = recorder(3);
  // Added out of order, and b and c adjacent: the bus keeps them sorted and apart.
  bus.add(0xd000_1000, 0x1000, b.device, "b");
  bus.add(0xd000_0000, 0x1000, a.device, "a");
  bus.add(0xd000_2000, 0x200, c.device, "c");
  assert.deepEqual(bus.list().map((r) => r.name), ["a", "b", "c"]);
  const d = new Uint8Array(4);
  assert.equal(bus.read(0xd000_0ffc, d), true);
  assert.deepEqual([...d], [1, 0xfc, 0, 0]);
  assert.equal(bus.read(0xd000_1000, d), true, "first byte of b");
  assert.deepEqual([...d], [2, 0, 0, 0]);
  assert.equal(bus.write(0xd000_1ff8, Uint8Array.of(1, 2, 3, 4)), true, "last word of b");
  assert.equal(bus.write(0xd000_21ff, Uint8Array.of(9)), true, "last byte of c");
  assert.equal(bus.write(0xd000_2200, Uint8Array.of(9)), false, "one past c");
  assert.deepEqual(a.log, [{ op: "r", offset: 0xffc, bytes: [] }]);
  assert.deepEqual(b.log, [{ op: "r", offset: 0, bytes: [] }, { op: "w", offset: 0xff8, bytes: [1, 2, 3, 4] }]);
  assert.deepEqual(c.log, [{ op: "w", offset: 0x1ff, bytes: [9] }]);
  assert.equal(bus.unhandled, 1);
});

Deno.test("bus: every kind of overlap is refused and leaves the bus unchanged; touching ranges are not overlaps", () => {
  const bus = new Bus("io");
  bus.add(0x100, 0x10, nothing, "dev");
  const clashes: [number, number, string][] = [
    [0x100, 0x10, "same range"],
    [0x0f8, 0x10, "overlaps the start"],
    [0x10f, 0x01, "the last byte"],
    [0x104, 0x04, "inside"],
    [0x000, 0x1000, "around it"],
  ];
  for (const [base, size, what] of clashes) {
    assert.throws(() => bus.add(base, size, nothing, what), new RegExp(`io bus: .* overlaps dev`), what);
  }
  assert.deepEqual(bus.list(), [{ name: "dev", base: 0x100, size: 0x10 }]);
  bus.add(0x0f0, 0x10, nothing, "below");
  bus.add(0x110, 0x10, nothing, "above");
  assert.deepEqual(bus.list().map((r) => r.name), ["below", "dev", "above"]);
});

Deno.test("bus: unmapped reads are all-ones whatever their size, unmapped writes are dropped; both are counted", () => {
  const bus = new Bus("io");
  const dev = recorder(7);
  bus.add(0x60, 1, dev.device, "kbd");
  for (const size of [1, 2, 4, 8]) {
    const d = new Uint8Array(size).fill(0x12);
    assert.equal(bus.read(0x61, d), false);
    assert.ok(d.every((x) => x === 0xff), `${size}-byte read`);
  }
  assert.equal(bus.write(0x5f, Uint8Array.of(1)), false);
  assert.equal(bus.unhandled, 5);
  assert.deepEqual(dev.log, [], "the neighbour saw nothing");
  assert.equal(new Bus("empty").read(0, new Uint8Array(1)), false);
});

Deno.test("bus (property): an access reaches the range that holds its address, at the right offset, or none", () => {
  // Up to 12 random non-overlapping ranges (sizes 1..64, gaps 0..64), then random addresses over them.
  const layoutArb = fc.array(fc.tuple(fc.integer({ min: 0, max: 64 }), fc.integer({ min: 1, max: 64 })), {
    minLength: 1,
    maxLength: 12,
  });
  fc.assert(
    fc.property(layoutArb, fc.array(fc.integer({ min: 0, max: 12 * 130 }), { maxLength: 50 }), (layout, addrs) => {
      const bus = new Bus("prop");
      const ranges: { base: number; size: number; hits: number[] }[] = [];
      let at = 0;
      for (const [gap, size] of layout) {
        ranges.push({ base: at + gap, size, hits: [] });
        at += gap + size;
      }
      // Add in reverse so the bus must sort.
      for (const [i, r] of [...ranges.entries()].reverse()) {
        bus.add(r.base, r.size, { read: (o) => r.hits.push(o), write: () => {} }, `r${i}`);
      }
      let misses = 0;
      for (const addr of addrs) {
        const owner = ranges.find((r) => addr >= r.base && addr < r.base + r.size);
        assert.equal(bus.read(addr, new Uint8Array(1)), owner !== undefined);
        if (owner) assert.equal(owner.hits.at(-1), addr - owner.base);
        else misses++;
      }
      assert.equal(bus.unhandled, misses);
      const expected = ranges.flatMap((r) => addrs.filter((a) => a >= r.base && a < r.base + r.size));
      assert.equal(ranges.reduce((n, r) => n + r.hits.length, 0), expected.length);
    }),
    { numRuns: 300 },
  );
});
