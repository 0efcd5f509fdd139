// The raw-file disk back end on temporary files, without the virtio device in front of it.

import assert from "node:assert/strict";
import { RawDisk } from "./raw.ts";
import { SECTOR_SIZE } from "./disk.ts";
import { GuardedGuestMemory } from "../../../test/support/virtio_driver.ts";
import { SysError } from "../../../ffi/libc.ts";
import { FileKindError } from "../../../core/host_file.ts";

const GUEST_SIZE = 1 << 20;

function pattern(len: number, seed: number): Uint8Array {
  return new Uint8Array(len).map((_, i) => (i * 13 + seed) & 0xff);
}

Deno.test("raw: an image is locked like crosvm's lock=true: one writer, or readers only", async () => {
  const path = await Deno.makeTempFile();
  await Deno.writeFile(path, new Uint8Array(4096));
  const opts = { path, readOnly: false, direct: false };
  const writer = new RawDisk(opts);
  try {
    assert.throws(() => new RawDisk(opts), /in use by another process/);
    assert.throws(() => new RawDisk({ ...opts, readOnly: true }), /in use by another process/);
    const unlocked = new RawDisk({ ...opts, lock: false });
    unlocked.close();
  } finally {
    writer.close();
  }
  const r1 = new RawDisk({ ...opts, readOnly: true });
  const r2 = new RawDisk({ ...opts, readOnly: true });
  assert.throws(() => new RawDisk(opts), /in use by another process/);
  r1.close();
  r2.close();
  new RawDisk(opts).close();
  await Deno.remove(path);
});

Deno.test("raw: the capacity is the file's whole sectors; a missing image is refused", () => {
  const path = Deno.makeTempFileSync();
  try {
    Deno.writeFileSync(path, new Uint8Array(3 * SECTOR_SIZE + 100));
    const d = new RawDisk({ path, readOnly: true, direct: false });
    assert.equal(d.capacityBytes, 3 * SECTOR_SIZE);
    assert.equal(d.path, path);
    d.close();
  } finally {
    Deno.removeSync(path);
  }
  assert.throws(() => new RawDisk({ path: "/nonexistent/x.img", readOnly: true, direct: false }), SysError);
});

for (const direct of [false, true]) {
  Deno.test(`raw: read and write move bytes between the file and scattered guest buffers (direct=${direct})`, () => {
    const path = Deno.makeTempFileSync();
    const g = new GuardedGuestMemory([{ start: 0, size: GUEST_SIZE }]);
    try {
      Deno.truncateSync(path, 64 * SECTOR_SIZE);
      const d = new RawDisk({ path, readOnly: false, direct });
      const data = pattern(2 * SECTOR_SIZE, 7);
      // Two guest buffers of odd sizes (O_DIRECT refuses them: the page cache serves that transfer).
      g.mem.write(0x1000, data.subarray(0, 300));
      g.mem.write(0x8000 + 3, data.subarray(300));
      d.write(g.mem, [{ addr: 0x1000, len: 300 }, { addr: 0x8000 + 3, len: 2 * SECTOR_SIZE - 300 }], 4 * SECTOR_SIZE);
      d.flush();
      assert.deepEqual(Deno.readFileSync(path).subarray(4 * SECTOR_SIZE, 6 * SECTOR_SIZE), data);
      d.read(g.mem, [{ addr: 0x20000, len: 2 * SECTOR_SIZE }], 4 * SECTOR_SIZE);
      assert.deepEqual(g.mem.read(0x20000, 2 * SECTOR_SIZE), data);
      if (direct && d.direct) assert.ok(d.stats().directFallbacks > 0);
      if (!direct) assert.equal(d.stats().directFallbacks, 0);
      d.close();
      assert.ok(g.canaryIntact());
    } finally {
      g.close();
      Deno.removeSync(path);
    }
  });
}

Deno.test("raw: discard and write zeroes read back zeroes and keep the size; resize only grows", () => {
  const path = Deno.makeTempFileSync();
  const size = 64 * 4096;
  try {
    const img = pattern(size, 3);
    Deno.writeFileSync(path, img);
    const d = new RawDisk({ path, readOnly: false, direct: false });
    d.discard(0, 4096);
    d.writeZeroes(8192, 4096, false);
    d.writeZeroes(16384, 4096, true);
    d.discard(4096, 0);
    const file = Deno.readFileSync(path);
    assert.equal(file.length, size);
    for (const at of [0, 8192, 16384]) assert.ok(file.subarray(at, at + 4096).every((b) => b === 0), `at ${at}`);
    assert.deepEqual(file.subarray(4096, 8192), img.subarray(4096, 8192));
    assert.deepEqual(file.subarray(12288, 16384), img.subarray(12288, 16384));
    d.resize(2 * size);
    assert.equal(d.capacityBytes, 2 * size);
    assert.equal(Deno.statSync(path).size, 2 * size);
    assert.throws(() => d.resize(size), RangeError);
    assert.throws(() => d.resize(2 * size + 1), RangeError);
    d.close();
    const ro = new RawDisk({ path, readOnly: true, direct: false });
    assert.throws(() => ro.resize(4 * size), /read-only/);
    ro.flush(); // nothing to make durable
    ro.close();
  } finally {
    Deno.removeSync(path);
  }
});

Deno.test("raw: a write to a read-only image fails with the system error", () => {
  const path = Deno.makeTempFileSync();
  const g = new GuardedGuestMemory([{ start: 0, size: GUEST_SIZE }]);
  try {
    Deno.truncateSync(path, 8 * SECTOR_SIZE);
    const d = new RawDisk({ path, readOnly: true, direct: false });
    assert.throws(() => d.write(g.mem, [{ addr: 0, len: SECTOR_SIZE }], 0), SysError);
    d.close();
  } finally {
    g.close();
    Deno.removeSync(path);
  }
});

Deno.test("raw: a disk is a regular file or a block device; /dev/zero and a directory are refused", () => {
  const dir = Deno.makeTempDirSync();
  try {
    for (const [path, kind] of [["/dev/zero", "a character device"], [dir, "a directory"]]) {
      assert.throws(
        () => new RawDisk({ path, readOnly: true, direct: false }),
        (e: unknown) =>
          e instanceof FileKindError && e.message.includes(`is ${kind}, not a regular file or block device`),
      );
    }
  } finally {
    Deno.removeSync(dir);
  }
});

/** A block device this process may read, with its size from sysfs (/sys/class/block/NAME/size, 512-byte units). */
function readableBlockDevice(): { path: string; bytes: number } | undefined {
  const SYSFS_SECTOR = 512;
  for (const e of Deno.readDirSync("/sys/class/block")) {
    const path = `/dev/${e.name}`;
    try {
      const sectors = Number(Deno.readTextFileSync(`/sys/class/block/${e.name}/size`).trim());
      if (!(sectors > 0) || !Deno.statSync(path).isBlockDevice) continue;
      Deno.openSync(path, { read: true }).close();
      return { path, bytes: sectors * SYSFS_SECTOR };
    } catch {
      // not readable here
    }
  }
  return undefined;
}

const blockDevice = readableBlockDevice();

Deno.test({
  name: "raw: a block device's capacity is its size, not its inode's (0)" +
    (blockDevice ? "" : " (skipped: no block device here that this process may open)"),
  ignore: blockDevice === undefined,
  fn: () => {
    // Read-only and unlocked: nothing is written, and the device's other users are not disturbed.
    const d = new RawDisk({ path: blockDevice!.path, readOnly: true, direct: false, lock: false });
    try {
      assert.equal(d.capacityBytes, blockDevice!.bytes - (blockDevice!.bytes % SECTOR_SIZE));
    } finally {
      d.close();
    }
  },
});
