// GuestMemory as device code uses it: reads and writes inside regions, every access that leaves a region or
// spans two refused with GuestMemoryError (including zero lengths, non-integers and sums past 2^53), live
// slices, vhost-user address translation; OwnedGuestMemory's host mappings (huge-page alignment, unmapped on
// close). Property tests check random accesses against a plain model of the regions. Guest memory mapped from
// a file (a snapshot's memory): the file's bytes, copy-on-write per mapping, the file never written, bad files
// refused in one line.

import assert from "node:assert/strict";
import fc from "fast-check";
import { HostError } from "./exit.ts";
import { GuestMemory, GuestMemoryError, OwnedGuestMemory, PAGE_SIZE, type RegionDescriptor } from "./memory.ts";
import { GiB, KiB, MiB } from "./units.ts";
import {
  F_GET_SEALS,
  F_SEAL_GROW,
  F_SEAL_SEAL,
  F_SEAL_SHRINK,
  libc,
  MAP_SHARED,
  mmap,
  munmap,
  PROT_READ,
  PROT_WRITE,
} from "../ffi/libc.ts";

/** Two regions with a hole between them, and a third right after the second (adjacent, not one region). */
const LOW = { start: 0, size: 64 * KiB };
const HIGH = { start: 1 * MiB, size: 64 * KiB };
const NEXT = { start: HIGH.start + HIGH.size, size: 16 * KiB };
const RANGES = [LOW, HIGH, NEXT];

function refused(fn: () => unknown, what: string): void {
  assert.throws(fn, GuestMemoryError, what);
}

/** The host mappings of this process that contain [addr, addr+size), from /proc/self/maps. */
function isMapped(addr: bigint, size: number): boolean {
  const end = addr + BigInt(size);
  for (const line of Deno.readTextFileSync("/proc/self/maps").split("\n")) {
    const m = /^([0-9a-f]+)-([0-9a-f]+) /.exec(line);
    if (!m) continue;
    const lo = BigInt("0x" + m[1]), hi = BigInt("0x" + m[2]);
    if (addr >= lo && end <= hi) return true;
  }
  return false;
}

Deno.test("guest memory: typed and byte accesses land in the right region at the right offset", () => {
  using mem = OwnedGuestMemory.allocate(RANGES);
  assert.equal(mem.size, LOW.size + HIGH.size + NEXT.size);
  mem.setU8(0x10, 0xab);
  mem.setU16(0x20, 0xbeef);
  mem.setU32(HIGH.start + 4, 0xdeadbeef);
  mem.setU64(HIGH.start + 8, 0x0102030405060708n);
  mem.setU64(NEXT.start, 42);
  assert.equal(mem.getU8(0x10), 0xab);
  assert.equal(mem.getU16(0x20), 0xbeef);
  assert.deepEqual([...mem.read(0x20, 2)], [0xef, 0xbe], "little-endian");
  assert.equal(mem.getU32(HIGH.start + 4), 0xdeadbeef);
  assert.equal(mem.getU64(HIGH.start + 8), 0x0102030405060708n);
  assert.equal(mem.getU64Number(NEXT.start), 42);
  // The same bytes through the host address a system call would get.
  const host = Deno.UnsafePointerView.getArrayBuffer(Deno.UnsafePointer.create(mem.hostAddress(HIGH.start, 16))!, 16);
  assert.deepEqual([...new Uint8Array(host, 4, 4)], [0xef, 0xbe, 0xad, 0xde]);
  mem.write(LOW.size - 3, Uint8Array.of(1, 2, 3));
  assert.deepEqual([...mem.read(LOW.size - 3, 3)], [1, 2, 3], "the last bytes of a region");
  mem.fill(HIGH.start, 4, 0x5a);
  assert.equal(mem.getU32(HIGH.start), 0x5a5a5a5a);
  assert.equal(mem.getU8(HIGH.start + 4), 0xef, "fill stops at its length");
  // The hole below HIGH reads nothing.
  refused(() => mem.getU8(LOW.size), "first byte after LOW");
  refused(() => mem.getU8(HIGH.start - 1), "last byte of the hole");
});

Deno.test("guest memory: accesses that leave a region, span two regions or wrap are refused", () => {
  using mem = OwnedGuestMemory.allocate(RANGES);
  const end = NEXT.start + NEXT.size;
  refused(() => mem.read(LOW.size - 2, 4), "crosses LOW's end into the hole");
  refused(() => mem.read(HIGH.start - 2, 4), "starts in the hole");
  refused(() => mem.read(NEXT.start - 2, 4), "spans HIGH and NEXT although both exist");
  refused(() => mem.write(NEXT.start - 1, new Uint8Array(2)), "write spanning HIGH and NEXT");
  refused(() => mem.getU64(NEXT.start - 4), "u64 spanning two regions");
  refused(() => mem.getU32(end - 2), "u32 past the end of memory");
  refused(() => mem.getU8(end), "first byte past the end");
  refused(() => mem.setU16(LOW.size - 1, 1), "store across the end");
  refused(() => mem.fill(HIGH.start, HIGH.size + 1), "fill one byte too long");
  refused(() => mem.slice(HIGH.start, HIGH.size + NEXT.size), "a slice over both adjacent regions");
  refused(() => mem.hostAddress(LOW.size - 1, 2), "host address of a range leaving LOW");
  // Lengths and addresses a hostile descriptor can carry.
  refused(() => mem.read(0, Number.MAX_SAFE_INTEGER), "huge length");
  refused(() => mem.read(Number.MAX_SAFE_INTEGER, 1), "address at 2^53 - 1");
  refused(() => mem.read(HIGH.start + 1, Number.MAX_SAFE_INTEGER - HIGH.start), "address + length past 2^53");
  refused(() => mem.read(2 ** 64, 1), "address not a safe integer");
  refused(() => mem.read(-1, 1), "negative address");
  refused(() => mem.read(0, -1), "negative length");
  refused(() => mem.read(1.5, 1), "fractional address");
  refused(() => mem.read(0, 0.5), "fractional length");
  refused(() => mem.read(NaN, 1), "NaN address");
  refused(() => mem.read(0, Infinity), "infinite length");
  assert.equal(mem.isValid(NEXT.start - 1, 2), false);
  assert.equal(mem.isValid(NEXT.start - 1, 1), true);
  assert.equal(mem.isValid(-1, 1), false);
  // A u64 above 2^53 is not an address.
  mem.setU64(0, 1n << 60n);
  refused(() => mem.getU64Number(0), "u64 too large for an address");
  // The error names the access.
  assert.throws(() => mem.read(end, 3), (e: unknown) => {
    assert.ok(e instanceof GuestMemoryError);
    assert.equal(e.addr, end);
    assert.equal(e.length, 3);
    assert.match(e.message, new RegExp(`0x${end.toString(16)} \\+ 3`));
    return true;
  });
});

Deno.test("guest memory: zero-length accesses are valid inside a region and refused outside one", () => {
  using mem = OwnedGuestMemory.allocate(RANGES);
  assert.equal(mem.read(0x100, 0).length, 0);
  assert.equal(mem.slice(HIGH.start + HIGH.size - 1, 0).length, 0);
  mem.write(HIGH.start, new Uint8Array(0));
  mem.fill(NEXT.start, 0, 0xff);
  assert.equal(mem.getU8(NEXT.start), 0, "a zero-length fill writes nothing");
  assert.equal(mem.isValid(HIGH.start, 0), true);
  refused(() => mem.read(LOW.size, 0), "zero length in the hole");
  refused(() => mem.read(NEXT.start + NEXT.size, 0), "zero length past the end of memory");
  refused(() => mem.read(-1, 0), "zero length at a negative address");
});

Deno.test("guest memory: slices are live views of guest bytes, reads are copies", () => {
  using mem = OwnedGuestMemory.allocate(RANGES);
  const view = mem.slice(HIGH.start + 16, 8);
  view.set([9, 8, 7], 0);
  assert.deepEqual([...mem.read(HIGH.start + 16, 3)], [9, 8, 7], "writes through a slice reach the guest");
  mem.setU8(HIGH.start + 19, 0x44);
  assert.equal(view[3], 0x44, "guest writes show in the slice");
  const copy = mem.read(HIGH.start + 16, 8);
  copy[0] = 0;
  assert.equal(mem.getU8(HIGH.start + 16), 9, "a read is a copy");
  assert.equal(view.length, 8);
  assert.equal(view.buffer.byteLength, HIGH.size, "the slice's buffer is its region alone");
});

Deno.test("guest memory: regions are sorted, overlaps refused, descriptors rebuild the same view", () => {
  const backing = new Uint8Array(3 * 4096);
  const base = BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(backing)));
  const a: RegionDescriptor = { guestBase: 0x10000, size: 4096, hostAddr: base };
  const b: RegionDescriptor = { guestBase: 0, size: 4096, hostAddr: base + 4096n };
  const mem = new GuestMemory([a, b]);
  assert.deepEqual(mem.descriptors.map((d) => d.guestBase), [0, 0x10000]);
  mem.setU8(0x10000, 7);
  assert.equal(backing[0], 7);
  mem.setU8(5, 3);
  assert.equal(backing[4096 + 5], 3);
  const again = new GuestMemory(mem.descriptors);
  assert.equal(again.getU8(0x10000), 7, "a second view (as a Worker builds) sees the same bytes");
  assert.throws(
    () => new GuestMemory([a, { guestBase: 0x10000 + 4095, size: 4096, hostAddr: base + 8192n }]),
    /overlapping/,
  );
  assert.throws(() => new GuestMemory([{ guestBase: 0, size: 4096, hostAddr: 0n }]), /null host address/);
});

Deno.test("guest memory: vhost-user addresses translate inside a region only", () => {
  const backing = new Uint8Array(2 * 4096);
  const base = BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(backing)));
  const mem = new GuestMemory([
    { guestBase: 0x100000, size: 4096, hostAddr: base, userAddr: 0x7f0000000000n },
    { guestBase: 0x200000, size: 4096, hostAddr: base + 4096n },
  ]);
  assert.equal(mem.userToGuest(0x7f0000000010n, 16), 0x100010);
  assert.equal(mem.userToGuest(0x7f0000000000n, 4096), 0x100000);
  refused(() => mem.userToGuest(0x7f0000000ff0n, 17), "runs past the region");
  refused(() => mem.userToGuest(0x7effffffffffn, 1), "below the region");
  refused(() => mem.userToGuest(0x200000n, 1), "a region without a user address is not translated");
});

Deno.test("owned guest memory: 2 MiB-aligned host mappings, unmapped on close (twice is harmless)", () => {
  const mem = OwnedGuestMemory.allocate([{ start: 0, size: 2 * MiB }, { start: 4 * MiB, size: 64 * KiB }]);
  const descs = mem.descriptors;
  for (const d of descs) {
    assert.equal(d.hostAddr % BigInt(2 * MiB), 0n, `region at 0x${d.guestBase.toString(16)} is huge-page aligned`);
    assert.ok(isMapped(d.hostAddr, d.size));
  }
  mem.setU32(4 * MiB, 0x12345678);
  assert.equal(mem.getU32(4 * MiB), 0x12345678);
  assert.equal(mem.getU64(8), 0n, "anonymous memory starts zeroed");
  mem.close();
  for (const d of descs) assert.equal(isMapped(d.hostAddr, d.size), false, "unmapped after close");
  mem.close();
});

// ---- Properties: random accesses against a model (a list of [start, end) ranges) ----

const END = NEXT.start + NEXT.size;
/** Addresses near the interesting places (region edges) and anywhere, and lengths around region sizes. */
const addrArb = fc.oneof(
  fc.constantFrom(0, LOW.size, HIGH.start, NEXT.start, END).chain((edge) =>
    fc.integer({ min: -64, max: 64 }).map((d) => edge + d)
  ),
  fc.integer({ min: -1, max: END + 4096 }),
  fc.constantFrom(Number.MAX_SAFE_INTEGER, -Number.MAX_SAFE_INTEGER, 2 ** 53, 0.5),
);
const lengthArb = fc.oneof(
  fc.integer({ min: 0, max: 80 }),
  fc.constantFrom(LOW.size, HIGH.size, HIGH.size + 1, NEXT.size, Number.MAX_SAFE_INTEGER, -1),
);

function modelFits(addr: number, length: number): boolean {
  if (!Number.isSafeInteger(addr) || !Number.isSafeInteger(length) || addr < 0 || length < 0) return false;
  return RANGES.some((r) => addr >= r.start && addr < r.start + r.size && addr + length <= r.start + r.size);
}

Deno.test("guest memory (property): an access succeeds exactly when it lies inside one region", () => {
  using mem = OwnedGuestMemory.allocate(RANGES);
  fc.assert(
    fc.property(addrArb, lengthArb, (addr, length) => {
      const fits = modelFits(addr, length);
      assert.equal(mem.isValid(addr, length), fits);
      if (fits) assert.equal(mem.slice(addr, length).length, length);
      else assert.throws(() => mem.slice(addr, length), GuestMemoryError);
    }),
    { numRuns: 2000 },
  );
});

Deno.test("guest memory (property): written bytes read back, and nothing outside the write changes", () => {
  using mem = OwnedGuestMemory.allocate(RANGES);
  const model = RANGES.map((r) => ({ ...r, bytes: new Uint8Array(r.size) }));
  fc.assert(
    fc.property(
      fc.array(fc.tuple(addrArb, fc.uint8Array({ maxLength: 40 })), { maxLength: 20 }),
      (writes) => {
        for (const [addr, data] of writes) {
          if (modelFits(addr, data.length)) {
            mem.write(addr, data);
            const r = model.find((m) => addr >= m.start && addr < m.start + m.size)!;
            r.bytes.set(data, addr - r.start);
          } else {
            assert.throws(() => mem.write(addr, data), GuestMemoryError);
          }
        }
        for (const r of model) assert.deepEqual(mem.read(r.start, r.size), r.bytes);
      },
    ),
    { numRuns: 200 },
  );
});

/** A field of the mapping that starts at `addr` in /proc/self/smaps, in kB ("Rss", "Anonymous", ...). */
function smapsField(addr: bigint, field: string): number {
  let inside = false;
  for (const line of Deno.readTextFileSync("/proc/self/smaps").split("\n")) {
    const head = /^([0-9a-f]+)-[0-9a-f]+ /.exec(line);
    if (head) {
      inside = BigInt("0x" + head[1]) === addr;
      continue;
    }
    const m = /^(\w+):\s+(\d+) kB/.exec(line);
    if (inside && m && m[1] === field) return Number(m[2]);
  }
  throw new Error(`no mapping at 0x${addr.toString(16)} with ${field}`);
}

/** A file of `size` bytes where every 4-byte word holds its own offset xor `salt`. */
function patternFile(path: string, size: number, salt: number): Uint8Array {
  const words = new Uint32Array(size / 4).map((_, i) => (i * 4) ^ salt);
  const bytes = new Uint8Array(words.buffer);
  Deno.writeFileSync(path, bytes);
  return bytes;
}

Deno.test("file-backed guest memory: each range shows the file's bytes at its offset, 2 MiB-aligned, unmapped on close", () => {
  const dir = Deno.makeTempDirSync();
  try {
    const file = patternFile(`${dir}/mem`, 4 * MiB, 0x5a5a5a5a);
    const ranges = [{ start: 0, size: 1 * MiB }, { start: 16 * MiB, size: 2 * MiB }];
    const offsets = [0, 2 * MiB];
    const mem = OwnedGuestMemory.mapFile(`${dir}/mem`, ranges, offsets);
    assert.deepEqual(mem.read(0, MiB), file.subarray(0, MiB));
    assert.deepEqual(mem.read(16 * MiB, 2 * MiB), file.subarray(2 * MiB, 4 * MiB));
    refused(() => mem.getU8(MiB), "the hole after the first range");
    const descs = mem.descriptors;
    for (const d of descs) {
      assert.equal(d.hostAddr % BigInt(2 * MiB), 0n, "huge-page aligned");
      assert.ok(isMapped(d.hostAddr, d.size));
    }
    mem.close();
    for (const d of descs) assert.equal(isMapped(d.hostAddr, d.size), false, "unmapped after close");
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("file-backed guest memory: two mappings share the file's pages until one writes; the file never changes", () => {
  const dir = Deno.makeTempDirSync();
  try {
    const path = `${dir}/mem`;
    const file = patternFile(path, 2 * MiB, 0x1234);
    const ranges = [{ start: 0, size: 2 * MiB }];
    using a = OwnedGuestMemory.mapFile(path, ranges, [0]);
    using b = OwnedGuestMemory.mapFile(path, ranges, [0]);
    // Reading every page of both: file pages, no private copy in either.
    assert.deepEqual(a.read(0, 2 * MiB), file);
    assert.deepEqual(b.read(0, 2 * MiB), file);
    const [ha, hb] = [a.descriptors[0].hostAddr, b.descriptors[0].hostAddr];
    assert.equal(smapsField(ha, "Anonymous"), 0, "a has no private page after reads");
    assert.equal(smapsField(hb, "Anonymous"), 0, "b has no private page after reads");
    // A write through a: one private page in a, nothing seen by b or in the file.
    a.setU32(PAGE_SIZE + 8, 0xdeadbeef);
    a.fill(MiB, 16, 0xee);
    assert.equal(a.getU32(PAGE_SIZE + 8), 0xdeadbeef);
    assert.equal(b.getU32(PAGE_SIZE + 8), (PAGE_SIZE + 8) ^ 0x1234, "b still sees the file's bytes");
    assert.deepEqual(b.read(MiB, 16), file.subarray(MiB, MiB + 16));
    assert.equal(smapsField(ha, "Anonymous"), 2 * PAGE_SIZE / 1024, "a copied exactly the two pages it wrote");
    assert.equal(smapsField(hb, "Anonymous"), 0);
    a.close();
    b.close();
    assert.deepEqual(Deno.readFileSync(path), file, "the file is unchanged");
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("file-backed guest memory: a short file, a missing one, a directory or a FIFO is refused in one line", async () => {
  const dir = Deno.makeTempDirSync();
  try {
    patternFile(`${dir}/short`, MiB - PAGE_SIZE, 0);
    Deno.mkdirSync(`${dir}/dir`);
    const fifo = new Deno.Command("mkfifo", { args: [`${dir}/fifo`] });
    const haveFifo = (await fifo.output()).success;
    const ranges = [{ start: 0, size: MiB }];
    const cases: [string, RegExp][] = [
      ["short", /"[^"]*short": 1044480 bytes, shorter than the 1048576 it must hold$/],
      ["missing", /"[^"]*missing": No such file or directory/],
      ["dir", /"[^"]*dir": is a directory, not a regular file$/],
      ...(haveFifo ? [["fifo", /"[^"]*fifo": is a FIFO, not a regular file$/] as [string, RegExp]] : []),
    ];
    for (const [name, message] of cases) {
      assert.throws(() => OwnedGuestMemory.mapFile(`${dir}/${name}`, ranges, [0]), (e: Error) => {
        assert.ok(e instanceof HostError, `${name}: a host error (exit 1)`);
        assert.match(e.message, message);
        assert.doesNotMatch(e.message, /\n/, "one line");
        return true;
      });
    }
    // The second range past the end of a file long enough for the first.
    assert.throws(
      () => OwnedGuestMemory.mapFile(`${dir}/short`, [{ start: 0, size: 4096 }, { start: MiB, size: 4096 }], [0, MiB]),
      /shorter than the 1052672 it must hold/,
    );
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("shareable guest memory: one sealed memfd holds every range at 2 MiB offsets; another mapping of it sees the guest's writes", () => {
  const ranges = [{ start: 0, size: 3 * MiB }, { start: 4 * GiB, size: 2 * MiB }];
  const mem = OwnedGuestMemory.allocateShared(ranges);
  try {
    assert.ok(mem.shared);
    const d = mem.descriptors;
    assert.equal(d.length, 2);
    assert.ok(d[0].fd !== undefined && d[0].fd >= 0);
    assert.equal(d[1].fd, d[0].fd, "one file");
    assert.deepEqual(d.map((r) => r.fileOffset), [0, 4 * MiB], "each range at a 2 MiB multiple");
    for (const r of d) assert.equal(r.hostAddr % BigInt(2 * MiB), 0n);
    // Sealed so that whoever gets the fd cannot shrink or grow the file under these mappings.
    const fd = d[0].fd!;
    const seals = libc().fcntl(fd, F_GET_SEALS, 0n);
    assert.equal(seals & (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL), F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
    assert.ok(libc().ftruncate(fd, 0n) < 0, "the file cannot be shrunk");
    // A second mapping of the file (a back end's) sees what the guest writes, and the other way round.
    mem.write(4 * GiB + 100, Uint8Array.of(1, 2, 3));
    const ptr = mmap(2 * MiB, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 4 * MiB);
    try {
      const other = new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(ptr, 2 * MiB));
      assert.deepEqual([...other.subarray(100, 103)], [1, 2, 3]);
      other[7] = 0x5a;
      assert.equal(mem.getU8(4 * GiB + 7), 0x5a);
    } finally {
      munmap(ptr, 2 * MiB);
    }
  } finally {
    mem.close();
  }
  assert.equal(mem.shared, false, "the memfd is closed with the memory");
});

Deno.test("plain guest memory is not shareable: its regions carry no fd", () => {
  const mem = OwnedGuestMemory.allocate([{ start: 0, size: 2 * MiB }]);
  try {
    assert.equal(mem.shared, false);
    assert.equal(mem.descriptors[0].fd, undefined);
  } finally {
    mem.close();
  }
});
