// virtio-blk on a temporary raw image file, driven through the virtio-mmio registers by the test driver.

import assert from "node:assert/strict";
import fc from "fast-check";
import {
  BLK_CFG_BLK_SIZE,
  BLK_CFG_CAPACITY,
  BLK_CFG_MAX_DISCARD_SEG,
  BLK_CFG_SEG_MAX,
  BLK_CFG_WRITE_ZEROES_MAY_UNMAP,
  BLK_CONFIG_SIZE,
  BLK_DISCARD_SEG_SIZE,
  BLK_OUTHDR_SIZE,
  BlockDevice,
  type BlockOptions,
  SECTOR_SIZE,
  VIRTIO_BLK_F_DISCARD,
  VIRTIO_BLK_F_FLUSH,
  VIRTIO_BLK_F_RO,
  VIRTIO_BLK_F_WRITE_ZEROES,
  VIRTIO_BLK_ID_BYTES,
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_S_UNSUPP,
  VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_T_WRITE_ZEROES,
  VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
} from "./device.ts";
import { VIRTIO_MMIO_INT_VRING, VIRTIO_MMIO_STATUS } from "../mmio.ts";
import { VIRTIO_ID_BLOCK } from "../device.ts";
import { GuardedGuestMemory, type Segment, VirtioTestDriver } from "../../../test/support/virtio_driver.ts";
import {
  assertRefused,
  captureVirtioLog,
  closeDeviceRig,
  mmioRig,
  reattachRig,
  roundTrip,
  withData,
} from "../../../test/support/device_rig.ts";
import type { Disk } from "./disk.ts";
import type { GuestBuffer } from "../queue.ts";
import type { GuestMemory } from "../../../core/memory.ts";
import { StateError, type StateValue } from "../../../core/state.ts";

const MiB = 1024 * 1024;
const IMAGE_SIZE = 4 * MiB;
const STATUS_UNTOUCHED = 0xee; // what the driver fills writable buffers with

function pattern(len: number, seed: number): Uint8Array {
  const b = new Uint8Array(len);
  for (let i = 0; i < len; i++) b[i] = (i * 31 + seed * 7 + (i >> 9)) & 0xff;
  return b;
}

interface Rig {
  path: string;
  dev: BlockDevice;
  drv: VirtioTestDriver;
  g: GuardedGuestMemory;
  irqs: { n: number };
  lines: string[];
  req(type: number, sector: bigint | number, data?: Segment | Segment[], opts?: { indirect?: boolean }): Result;
  [Symbol.dispose](): void;
}
interface Result {
  status: number;
  len: number;
  data: Uint8Array;
}

function outhdr(type: number, sector: bigint | number): Uint8Array {
  const b = new Uint8Array(BLK_OUTHDR_SIZE);
  const v = new DataView(b.buffer);
  v.setUint32(0, type, true); // type
  v.setUint32(4, 0, true); // ioprio
  v.setBigUint64(8, BigInt(sector), true); // sector
  return b;
}

function segs(...s: { sector: bigint | number; num: number; flags: number }[]): Uint8Array {
  const b = new Uint8Array(BLK_DISCARD_SEG_SIZE * s.length);
  const v = new DataView(b.buffer);
  s.forEach((x, i) => {
    v.setBigUint64(i * BLK_DISCARD_SEG_SIZE, BigInt(x.sector), true);
    v.setUint32(i * BLK_DISCARD_SEG_SIZE + 8, x.num, true);
    v.setUint32(i * BLK_DISCARD_SEG_SIZE + 12, x.flags, true);
  });
  return b;
}

function rig(opts: Partial<BlockOptions> & { image?: Uint8Array; sparseFile?: boolean } = {}): Rig {
  const path = Deno.makeTempFileSync({ prefix: "denovm-blk-", suffix: ".img" });
  if (opts.image) Deno.writeFileSync(path, opts.image);
  else Deno.truncateSync(path, IMAGE_SIZE);
  const dev = new BlockDevice({
    path,
    readOnly: opts.readOnly ?? false,
    sparse: opts.sparse ?? true,
    blockSize: opts.blockSize ?? 4096,
    id: opts.id,
    direct: opts.direct ?? false,
  });
  const g = new GuardedGuestMemory([{ start: 0, size: 16 * MiB }]);
  const { drv, irqs } = mmioRig(dev, g.mem, 16 * MiB);
  drv.init();
  const log = captureVirtioLog();
  return {
    path,
    dev,
    drv,
    g,
    irqs,
    lines: log.lines,
    req(type, sector, data, o) {
      const body = data === undefined ? [] : Array.isArray(data) ? data : [data];
      const q = drv.queues[0];
      const sub = q.submit([outhdr(type, sector), ...body, 1], o);
      drv.kick(0);
      const used = q.used();
      assert.equal(used.length, 1);
      assert.equal(used[0].id, sub.head);
      const writable = sub.buffers.filter((b) => b.writable);
      const status = g.mem.getU8(writable.at(-1)!.addr);
      const parts = writable.slice(0, -1).map((b) => g.mem.read(b.addr, b.len));
      const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
      let o2 = 0;
      for (const p of parts) {
        out.set(p, o2);
        o2 += p.length;
      }
      return { status, len: used[0].len, data: out };
    },
    [Symbol.dispose]() {
      closeDeviceRig(log, g, dev);
      Deno.removeSync(path);
    },
  };
}

Deno.test("config space and features", () => {
  using r = rig();
  const cfg = new DataView(r.drv.readConfig(0, 60).buffer);
  assert.equal(cfg.getBigUint64(BLK_CFG_CAPACITY, true), BigInt(IMAGE_SIZE / SECTOR_SIZE));
  assert.equal(cfg.getUint32(BLK_CFG_BLK_SIZE, true), 4096);
  assert.equal(cfg.getUint32(BLK_CFG_SEG_MAX, true), 254);
  assert.equal(cfg.getUint32(BLK_CFG_MAX_DISCARD_SEG, true), 32);
  assert.equal(cfg.getUint8(BLK_CFG_WRITE_ZEROES_MAY_UNMAP), 1);
  // A byte-wide read of the capacity's second byte.
  assert.equal(r.drv.readConfig(BLK_CFG_CAPACITY + 1, 1)[0], (IMAGE_SIZE / SECTOR_SIZE) >> 8);
  assert.equal(r.drv.readReg(0x008), VIRTIO_ID_BLOCK);
  const f = r.drv.deviceFeatures();
  assert.ok(f & VIRTIO_BLK_F_FLUSH);
  assert.ok(f & VIRTIO_BLK_F_DISCARD && f & VIRTIO_BLK_F_WRITE_ZEROES);
  assert.ok(!(f & VIRTIO_BLK_F_RO));
  using ro = rig({ readOnly: true });
  const g = ro.drv.deviceFeatures();
  assert.ok(g & VIRTIO_BLK_F_RO);
  assert.ok(!(g & VIRTIO_BLK_F_DISCARD) && !(g & VIRTIO_BLK_F_WRITE_ZEROES));
});

for (const direct of [false, true]) {
  Deno.test(`write then read back sectors (direct=${direct}), data lands in the file`, () => {
    using r = rig({ direct });
    const a = pattern(3 * SECTOR_SIZE, 1);
    // Written as three descriptors of odd sizes that still sum to whole sectors.
    let w = r.req(VIRTIO_BLK_T_OUT, 8, [a.subarray(0, 100), a.subarray(100, 1000), a.subarray(1000)]);
    assert.equal(w.status, VIRTIO_BLK_S_OK);
    assert.equal(w.len, 1, "only the status byte was written");
    const b = pattern(8 * SECTOR_SIZE, 2);
    w = r.req(VIRTIO_BLK_T_OUT, 100, b, { indirect: true });
    assert.equal(w.status, VIRTIO_BLK_S_OK);
    const rd = r.req(VIRTIO_BLK_T_IN, 8, [SECTOR_SIZE, 2 * SECTOR_SIZE]);
    assert.equal(rd.status, VIRTIO_BLK_S_OK);
    assert.equal(rd.len, 3 * SECTOR_SIZE + 1);
    assert.deepEqual(rd.data, a);
    const rd2 = r.req(VIRTIO_BLK_T_IN, 100, 8 * SECTOR_SIZE, { indirect: true });
    assert.deepEqual(rd2.data, b);
    const file = Deno.readFileSync(r.path);
    assert.equal(file.length, IMAGE_SIZE, "the image keeps its size");
    assert.deepEqual(file.subarray(8 * SECTOR_SIZE, 11 * SECTOR_SIZE), a);
    assert.deepEqual(file.subarray(100 * SECTOR_SIZE, 108 * SECTOR_SIZE), b);
    const s = r.dev.stats();
    assert.equal(s.writes, 2);
    assert.equal(s.reads, 2);
    assert.equal(s.bytesWritten, 11 * SECTOR_SIZE);
    assert.equal(s.bytesRead, 11 * SECTOR_SIZE);
    assert.equal(s.errors, 0);
    if (direct && !r.dev.direct) console.log("the temp directory's filesystem refuses O_DIRECT: page cache used");
    else if (direct) assert.ok(s.directFallbacks > 0, "unaligned guest buffers fell back to the page cache");
  });
}

Deno.test("an interrupt is raised and InterruptStatus acknowledged", () => {
  using r = rig();
  r.irqs.n = 0;
  r.req(VIRTIO_BLK_T_FLUSH, 0);
  assert.equal(r.irqs.n, 1);
  assert.equal(r.drv.ackInterrupt(), VIRTIO_MMIO_INT_VRING);
  assert.equal(r.drv.ackInterrupt(), 0);
});

Deno.test("flush is a real fdatasync and succeeds", () => {
  using r = rig();
  assert.equal(r.req(VIRTIO_BLK_T_OUT, 0, pattern(SECTOR_SIZE, 3)).status, VIRTIO_BLK_S_OK);
  assert.equal(r.req(VIRTIO_BLK_T_FLUSH, 0).status, VIRTIO_BLK_S_OK);
  assert.equal(r.dev.stats().flushes, 1);
});

Deno.test("GET_ID returns the id, or the file's name, in 20 bytes", () => {
  {
    using r = rig({ id: "disk-serial-1" });
    const res = r.req(VIRTIO_BLK_T_GET_ID, 0, VIRTIO_BLK_ID_BYTES);
    assert.equal(res.status, VIRTIO_BLK_S_OK);
    assert.equal(res.len, VIRTIO_BLK_ID_BYTES + 1);
    const expect = new Uint8Array(VIRTIO_BLK_ID_BYTES);
    expect.set(new TextEncoder().encode("disk-serial-1"));
    assert.deepEqual(res.data, expect);
    assert.equal(r.req(VIRTIO_BLK_T_GET_ID, 0, 10).status, VIRTIO_BLK_S_IOERR, "buffer too small");
  }
  using r = rig();
  const name = r.path.split("/").pop()!;
  const res = r.req(VIRTIO_BLK_T_GET_ID, 0, VIRTIO_BLK_ID_BYTES);
  assert.equal(
    new TextDecoder().decode(res.data),
    name.slice(0, VIRTIO_BLK_ID_BYTES).padEnd(VIRTIO_BLK_ID_BYTES, "\0"),
  );
});

Deno.test("discard punches holes (fewer allocated blocks, zeroes read back)", () => {
  using r = rig({ image: pattern(IMAGE_SIZE, 4) });
  const before = Deno.statSync(r.path).blocks!;
  const sectors = MiB / SECTOR_SIZE;
  const res = r.req(VIRTIO_BLK_T_DISCARD, 0, segs({ sector: 0, num: sectors, flags: 0 }));
  assert.equal(res.status, VIRTIO_BLK_S_OK);
  const after = Deno.statSync(r.path).blocks!;
  assert.ok(after <= before - (MiB / 512) * 0.9, `allocated 512-byte blocks ${before} -> ${after}`);
  assert.equal(Deno.statSync(r.path).size, IMAGE_SIZE, "KEEP_SIZE");
  const rd = r.req(VIRTIO_BLK_T_IN, sectors - 1, 2 * SECTOR_SIZE);
  assert.ok(rd.data.subarray(0, SECTOR_SIZE).every((b) => b === 0));
  assert.deepEqual(rd.data.subarray(SECTOR_SIZE), pattern(IMAGE_SIZE, 4).subarray(MiB, MiB + SECTOR_SIZE));
  assert.equal(r.dev.stats().discards, 1);
  // Reserved flags on a discard segment are refused; a range past the end is an I/O error.
  assert.equal(r.req(VIRTIO_BLK_T_DISCARD, 0, segs({ sector: 0, num: 8, flags: 1 })).status, VIRTIO_BLK_S_UNSUPP);
  const end = IMAGE_SIZE / SECTOR_SIZE;
  assert.equal(r.req(VIRTIO_BLK_T_DISCARD, 0, segs({ sector: end - 8, num: 16, flags: 0 })).status, VIRTIO_BLK_S_IOERR);
  assert.equal(r.req(VIRTIO_BLK_T_DISCARD, 0, new Uint8Array(10)).status, VIRTIO_BLK_S_UNSUPP, "not whole segments");
});

Deno.test("write zeroes, with and without UNMAP, reads back zeroes", () => {
  const img = pattern(IMAGE_SIZE, 5);
  using r = rig({ image: img });
  const before = Deno.statSync(r.path).blocks!;
  let res = r.req(VIRTIO_BLK_T_WRITE_ZEROES, 0, segs({ sector: 16, num: 16, flags: 0 }));
  assert.equal(res.status, VIRTIO_BLK_S_OK);
  res = r.req(
    VIRTIO_BLK_T_WRITE_ZEROES,
    0,
    segs({ sector: 2048, num: 2048, flags: VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP }, { sector: 8, num: 1, flags: 0 }),
  );
  assert.equal(res.status, VIRTIO_BLK_S_OK);
  const file = Deno.readFileSync(r.path);
  assert.ok(file.subarray(16 * 512, 32 * 512).every((b) => b === 0));
  assert.ok(file.subarray(8 * 512, 9 * 512).every((b) => b === 0));
  assert.ok(file.subarray(MiB, 2 * MiB).every((b) => b === 0));
  assert.deepEqual(file.subarray(9 * 512, 16 * 512), img.subarray(9 * 512, 16 * 512));
  assert.deepEqual(file.subarray(32 * 512, 40 * 512), img.subarray(32 * 512, 40 * 512));
  assert.ok(Deno.statSync(r.path).blocks! < before, "UNMAP released blocks");
  assert.equal(r.dev.stats().writeZeroes, 2);
});

Deno.test("discard and write zeroes are unsupported when not negotiated (not sparse)", () => {
  using r = rig({ sparse: false });
  assert.equal(r.req(VIRTIO_BLK_T_DISCARD, 0, segs({ sector: 0, num: 8, flags: 0 })).status, VIRTIO_BLK_S_UNSUPP);
  assert.equal(r.req(VIRTIO_BLK_T_WRITE_ZEROES, 0, segs({ sector: 0, num: 8, flags: 0 })).status, VIRTIO_BLK_S_UNSUPP);
});

Deno.test("read-only: writes fail with IOERR and the file is unchanged; reads work", () => {
  const img = pattern(IMAGE_SIZE, 6);
  using r = rig({ readOnly: true, image: img });
  const res = r.req(VIRTIO_BLK_T_OUT, 0, pattern(SECTOR_SIZE, 9));
  assert.equal(res.status, VIRTIO_BLK_S_IOERR);
  assert.equal(r.req(VIRTIO_BLK_T_DISCARD, 0, segs({ sector: 0, num: 8, flags: 0 })).status, VIRTIO_BLK_S_UNSUPP);
  assert.equal(r.req(VIRTIO_BLK_T_FLUSH, 0).status, VIRTIO_BLK_S_OK);
  assert.deepEqual(r.req(VIRTIO_BLK_T_IN, 1, SECTOR_SIZE).data, img.subarray(SECTOR_SIZE, 2 * SECTOR_SIZE));
  assert.deepEqual(Deno.readFileSync(r.path), img);
  assert.equal(r.dev.stats().errors, 1);
});

Deno.test("requests past the end of the disk fail with IOERR and touch nothing", () => {
  using r = rig();
  const end = IMAGE_SIZE / SECTOR_SIZE;
  for (
    const [type, sector, data] of [
      [VIRTIO_BLK_T_IN, end, SECTOR_SIZE],
      [VIRTIO_BLK_T_IN, end - 1, 2 * SECTOR_SIZE],
      [VIRTIO_BLK_T_OUT, end - 1, pattern(2 * SECTOR_SIZE, 1)],
      [VIRTIO_BLK_T_IN, 0xffff_ffff_ffff_ffffn, SECTOR_SIZE],
      [VIRTIO_BLK_T_OUT, 1n << 60n, pattern(SECTOR_SIZE, 1)],
      [VIRTIO_BLK_T_IN, 0, 100], // not whole sectors
    ] as [number, bigint | number, Segment][]
  ) {
    const res = r.req(type, sector, data);
    assert.equal(res.status, VIRTIO_BLK_S_IOERR, `type ${type} sector ${sector}`);
    assert.equal(res.len, 1);
    if (type === VIRTIO_BLK_T_IN) assert.ok(res.data.every((b) => b === STATUS_UNTOUCHED), "no data returned");
  }
  assert.equal(Deno.statSync(r.path).size, IMAGE_SIZE);
  assert.equal(Deno.statSync(r.path).blocks, 0, "nothing was written");
  assert.equal(r.dev.stats().errors, 6);
});

Deno.test("unknown request type is UNSUPP; requests without header or status are dropped with len 0", () => {
  using r = rig();
  assert.equal(r.req(99, 0, 16).status, VIRTIO_BLK_S_UNSUPP);
  assert.equal(r.dev.stats().unsupported, 1);
  const q = r.drv.queues[0];
  // No status byte at all (no writable descriptor).
  const a = q.submit([outhdr(VIRTIO_BLK_T_IN, 0)]);
  // A header shorter than 16 bytes.
  const b = q.submit([new Uint8Array(8), 1]);
  r.drv.kick(0);
  assert.deepEqual(q.used(), [{ id: a.head, len: 0 }, { id: b.head, len: 0 }]);
  assert.equal(r.g.mem.getU8(b.buffers[1].addr), STATUS_UNTOUCHED);
  assert.equal(r.dev.stats().malformed, 2);
  assert.equal(r.lines.length, 3);
});

Deno.test("a reset with a request pending is harmless; the device works after re-initialisation", () => {
  using r = rig();
  const q = r.drv.queues[0];
  q.submit([outhdr(VIRTIO_BLK_T_OUT, 0), pattern(SECTOR_SIZE, 7), 1]);
  r.drv.writeReg(VIRTIO_MMIO_STATUS, 0);
  assert.equal(r.drv.readReg(VIRTIO_MMIO_STATUS), 0);
  r.drv.kick(0); // a late kick after the reset
  assert.equal(q.usedIdx(), 0, "nothing completed");
  assert.equal(Deno.statSync(r.path).blocks, 0, "nothing written");
  r.dev.queueNotify(0); // even a direct call finds no queue
  assert.equal(q.usedIdx(), 0);
  r.drv.init();
  assert.equal(r.req(VIRTIO_BLK_T_OUT, 0, pattern(SECTOR_SIZE, 8)).status, VIRTIO_BLK_S_OK);
  assert.deepEqual(r.req(VIRTIO_BLK_T_IN, 0, SECTOR_SIZE).data, pattern(SECTOR_SIZE, 8));
});

Deno.test("many requests in one kick are all completed, with one interrupt", () => {
  using r = rig();
  const q = r.drv.queues[0];
  r.irqs.n = 0;
  const subs = [];
  for (let i = 0; i < 50; i++) subs.push(q.submit([outhdr(VIRTIO_BLK_T_OUT, i), pattern(SECTOR_SIZE, i), 1]));
  r.drv.kick(0);
  assert.deepEqual(q.used().map((u) => u.id), subs.map((s) => s.head));
  assert.equal(r.irqs.n, 1);
  for (let i = 0; i < 50; i += 7) {
    assert.deepEqual(r.req(VIRTIO_BLK_T_IN, i, SECTOR_SIZE).data, pattern(SECTOR_SIZE, i));
  }
});

Deno.test("the constructor refuses bad options and a missing image", () => {
  assert.throws(() =>
    new BlockDevice({ path: "/nonexistent/x.img", readOnly: true, sparse: false, blockSize: 512, direct: false })
  );
  const path = Deno.makeTempFileSync();
  try {
    assert.throws(() => new BlockDevice({ path, readOnly: false, sparse: false, blockSize: 1000, direct: false }));
  } finally {
    Deno.removeSync(path);
  }
});

Deno.test("property: random requests always complete with a valid status and never grow the image", () => {
  using r = rig({ image: pattern(IMAGE_SIZE, 11) });
  const q = r.drv.queues[0];
  const mark = r.drv.alloc.mark();
  const end = IMAGE_SIZE / SECTOR_SIZE;
  const reqArb = fc.record({
    type: fc.oneof(
      fc.constantFrom(VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID),
      fc.constantFrom(VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES),
      fc.integer({ min: 0, max: 0xffff_ffff }),
    ),
    sector: fc.oneof(fc.integer({ min: 0, max: end + 4 }).map(BigInt), fc.bigInt({ min: 0n, max: (1n << 64n) - 1n })),
    hdrLen: fc.constantFrom(BLK_OUTHDR_SIZE, BLK_OUTHDR_SIZE, 4, 17),
    readable: fc.array(fc.integer({ min: 0, max: 2048 }), { maxLength: 3 }),
    writable: fc.array(fc.integer({ min: 0, max: 2048 }), { maxLength: 3 }),
    discard: fc.array(
      fc.record({
        sector: fc.integer({ min: 0, max: end + 8 }),
        num: fc.oneof(fc.integer({ min: 0, max: 64 }), fc.constant(0xffff_ffff)),
        flags: fc.integer({ min: 0, max: 3 }),
      }),
      { maxLength: 3 },
    ),
    indirect: fc.boolean(),
  });
  fc.assert(
    fc.property(fc.array(reqArb, { minLength: 1, maxLength: 8 }), (reqs) => {
      r.drv.alloc.resetTo(mark);
      const subs = reqs.map((x) => {
        const hdr = outhdr(x.type, x.sector & 0xffff_ffff_ffff_ffffn);
        const body: Segment[] = x.type === VIRTIO_BLK_T_DISCARD || x.type === VIRTIO_BLK_T_WRITE_ZEROES
          ? [segs(...x.discard)]
          : x.readable.map((n) => pattern(n, 3));
        const head = new Uint8Array(x.hdrLen);
        head.set(hdr.subarray(0, x.hdrLen));
        return q.submit([head, ...body, ...x.writable], { indirect: x.indirect });
      });
      r.drv.kick(0);
      const used = q.used();
      assert.deepEqual(used.map((u) => u.id), subs.map((s) => s.head));
      subs.forEach((s, i) => {
        const w = s.buffers.filter((b) => b.writable && b.len > 0);
        if (used[i].len > 0) {
          assert.ok(
            [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP].includes(
              r.g.mem.getU8(w.at(-1)!.addr + w.at(-1)!.len - 1),
            ),
          );
        }
      });
      assert.equal(Deno.statSync(r.path).size, IMAGE_SIZE);
    }),
    { numRuns: 200 },
  );
});

Deno.test("block: resize grows the image and the capacity the guest reads; shrinking is refused", async () => {
  const path = await Deno.makeTempFile();
  const data = new Uint8Array(8192).map((_, i) => i & 0xff);
  await Deno.writeFile(path, data);
  const dev = new BlockDevice({ path, readOnly: false, sparse: true, blockSize: 512, direct: false });
  try {
    const capacity = () => {
      const b = new Uint8Array(8);
      dev.readConfig(0, b);
      return new DataView(b.buffer).getBigUint64(0, true);
    };
    assert.equal(capacity(), 16n);
    dev.resize(65536);
    assert.equal(capacity(), 128n);
    assert.equal((await Deno.stat(path)).size, 65536);
    assert.deepEqual((await Deno.readFile(path)).subarray(0, 8192), data, "the old contents are kept");
    assert.throws(() => dev.resize(4096), /shrinking it would lose data/);
    assert.throws(() => dev.resize(65537), /whole number of 512-byte sectors/);
    assert.equal((await Deno.stat(path)).size, 65536);
  } finally {
    dev.close();
    await Deno.remove(path);
  }
});

Deno.test("block: the device opens its image through the raw back end, locked unless lock is false", () => {
  const path = Deno.makeTempFileSync();
  try {
    Deno.writeFileSync(path, new Uint8Array(4096));
    const opts = { path, readOnly: false, sparse: false, blockSize: 512, direct: false };
    const dev = new BlockDevice(opts);
    assert.throws(() => new BlockDevice(opts), /in use by another process/);
    new BlockDevice({ ...opts, lock: false }).close();
    assert.equal(dev.capacityBytes, 4096);
    dev.close();
    new BlockDevice(opts).close();
  } finally {
    Deno.removeSync(path);
  }
});

// ---- Saved state ----

/** A disk in memory that calls `during` in the middle of every read (a request in flight). */
class MemDisk implements Disk {
  readonly path = "mem.img";
  readonly readOnly = false;
  readonly direct = false;
  readonly bytes = new Uint8Array(MiB);
  during = () => {};
  get capacityBytes(): number {
    return this.bytes.length;
  }
  read(mem: GuestMemory, segs: readonly GuestBuffer[], offset: number): void {
    this.during();
    for (const s of segs) {
      mem.write(s.addr, this.bytes.subarray(offset, offset + s.len));
      offset += s.len;
    }
  }
  write(mem: GuestMemory, segs: readonly GuestBuffer[], offset: number): void {
    for (const s of segs) {
      this.bytes.set(mem.read(s.addr, s.len), offset);
      offset += s.len;
    }
  }
  flush(): void {}
  discard(): void {}
  writeZeroes(offset: number, len: number): void {
    this.bytes.fill(0, offset, offset + len);
  }
  resize(): void {}
  close(): void {}
  stats(): Record<string, number> {
    return {};
  }
}

Deno.test("block state: a fresh device on the same image continues: config, next used index, counters", () => {
  using r = rig({ id: "serial-7" });
  const data = pattern(2 * SECTOR_SIZE, 5);
  assert.equal(r.req(VIRTIO_BLK_T_OUT, 10, data).status, VIRTIO_BLK_S_OK);
  assert.equal(r.req(VIRTIO_BLK_T_FLUSH, 0).status, VIRTIO_BLK_S_OK);
  assert.ok(r.dev.quiescent());
  const cfg = r.drv.readConfig(0, BLK_CONFIG_SIZE);
  const devState = roundTrip(r.dev.saveState());
  const tState = roundTrip(r.drv.transport.saveState());
  r.dev.close(); // its lock goes with it
  const dev2 = new BlockDevice({
    path: r.path,
    readOnly: false,
    sparse: true,
    blockSize: 4096,
    id: "serial-7",
    direct: false,
  });
  try {
    const to = reattachRig({ t: r.drv.transport, drv: r.drv, irqs: r.irqs }, dev2, r.g.mem);
    dev2.restoreState(devState);
    to.t.restoreState(tState);
    assert.deepEqual(to.drv.readConfig(0, BLK_CONFIG_SIZE), cfg);
    const q = to.drv.queues[0];
    q.setUsedEvent(2); // EVENT_IDX: an interrupt once entry 2 is used
    const sub = q.submit([outhdr(VIRTIO_BLK_T_IN, 10), 2 * SECTOR_SIZE, 1]);
    to.drv.kick(0);
    assert.deepEqual(q.used(), [{ id: sub.head, len: 2 * SECTOR_SIZE + 1 }]);
    assert.equal(q.usedIdx(), 3, "the third request on the ring");
    assert.deepEqual(r.g.mem.read(sub.buffers[1].addr, 2 * SECTOR_SIZE), data);
    assert.equal(to.irqs.n, 1);
    const s = dev2.stats();
    assert.equal(s.writes, 1);
    assert.equal(s.flushes, 1);
    assert.equal(s.reads, 1);
    // A device the driver has activated is not a restore target.
    assert.throws(() => dev2.restoreState(devState), StateError);
  } finally {
    dev2.close();
  }
});

Deno.test("block state: quiescent is false while a request is with the back end", () => {
  const disk = new MemDisk();
  const dev = new BlockDevice({ path: disk.path, readOnly: false, sparse: false, blockSize: 512, direct: false, disk });
  const g = new GuardedGuestMemory([{ start: 0, size: 4 * MiB }]);
  try {
    const { drv } = mmioRig(dev, g.mem, 4 * MiB);
    drv.init();
    const seen: boolean[] = [];
    disk.during = () => seen.push(dev.quiescent());
    const q = drv.queues[0];
    q.submit([outhdr(VIRTIO_BLK_T_IN, 0), SECTOR_SIZE, 1]);
    drv.kick(0);
    assert.deepEqual(seen, [false], "in flight during the read");
    assert.equal(q.used().length, 1);
    assert.ok(dev.quiescent(), "quiescent once the status is written");
  } finally {
    dev.close();
    g.close();
  }
});

Deno.test("block state: a wrong type, version, another image size or malformed fields are refused", () => {
  using r = rig();
  const good = r.dev.saveState();
  const data = good.data as Record<string, StateValue>;
  const path = Deno.makeTempFileSync();
  try {
    Deno.truncateSync(path, IMAGE_SIZE);
    const opts = { path, readOnly: false, sparse: true, blockSize: 4096, direct: false };
    assertRefused(() => new BlockDevice(opts), good, [
      ["type virtio-net", { ...good, type: "virtio-net" }],
      ["version 2", { ...good, version: 2 }],
      ["data a string", { ...good, data: "x" }],
      ["config", withData(good, { config: new Uint8Array(BLK_CONFIG_SIZE) })],
      ["features", withData(good, { features: "0x1" })],
      ["stats", withData(good, { stats: { ...(data.stats as Record<string, StateValue>), reads: -1 } })],
      ["no stats", withData(good, { stats: null })],
    ]);
    // Another capacity or block size is another disk.
    Deno.truncateSync(path, 2 * IMAGE_SIZE);
    for (const o of [opts, { ...opts, blockSize: 512 }]) {
      const dev = new BlockDevice(o);
      try {
        assert.throws(() => dev.restoreState(good), StateError);
      } finally {
        dev.close();
      }
    }
    Deno.truncateSync(path, IMAGE_SIZE);
    const dev = new BlockDevice(opts);
    dev.restoreState(good);
    dev.close();
  } finally {
    Deno.removeSync(path);
  }
});
