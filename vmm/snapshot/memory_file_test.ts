// The snapshot's memory file: regions end to end in guest-address order, only non-zero pages written (the
// rest holes that take no disk blocks), read back identical through a copy-on-write mapping; an existing file
// is never overwritten.

import assert from "node:assert/strict";
import { OwnedGuestMemory, PAGE_SIZE } from "../../core/memory.ts";
import { MiB } from "../../core/units.ts";
import { memoryFileLayout, writeMemoryFile } from "./memory_file.ts";

/** Two regions with a gap between them, as ramRanges gives for memory above the MMIO hole. */
const RANGES = [{ start: 0, size: 4 * MiB }, { start: 16 * MiB, size: 2 * MiB }];

Deno.test("memory file: regions laid end to end; a pattern reads back identical through mapFile; zero pages are not written", () => {
  const dir = Deno.makeTempDirSync();
  try {
    using mem = OwnedGuestMemory.allocate(RANGES);
    // Non-zero pages: the first byte of page 0, the last byte of page 5, pages 6-9 full (one run), the last
    // page of region 0, the first page of region 1 (a run across the region boundary in the file), and a page
    // in the middle of region 1.
    mem.setU8(0, 1);
    mem.setU8(6 * PAGE_SIZE - 1, 0x80);
    mem.fill(6 * PAGE_SIZE, 4 * PAGE_SIZE, 0x33);
    mem.setU32(4 * MiB - 8, 0xfeedface);
    mem.fill(16 * MiB, PAGE_SIZE, 0x44);
    mem.setU8(17 * MiB + 123, 7);
    const nonZeroPages = 1 + 1 + 4 + 1 + 1 + 1;
    const layout = memoryFileLayout(mem);
    assert.deepEqual(layout, {
      size: 6 * MiB,
      regions: [{ guestBase: 0, size: 4 * MiB, fileOffset: 0 }, {
        guestBase: 16 * MiB,
        size: 2 * MiB,
        fileOffset: 4 * MiB,
      }],
    });
    const path = `${dir}/memory`;
    const { size, bytesWritten } = writeMemoryFile(mem, path);
    assert.equal(size, 6 * MiB);
    assert.equal(bytesWritten, nonZeroPages * PAGE_SIZE);
    assert.equal(Deno.statSync(path).size, 6 * MiB);
    assert.equal(Deno.statSync(path).mode! & 0o777, 0o600, "guest memory is readable by its owner only");
    using back = OwnedGuestMemory.mapFile(path, RANGES, layout.regions.map((r) => r.fileOffset));
    for (const r of RANGES) assert.deepEqual(back.read(r.start, r.size), mem.read(r.start, r.size));
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("memory file: a mostly-zero 64 MiB memory takes a few blocks of disk, not 64 MiB", () => {
  const dir = Deno.makeTempDirSync();
  try {
    using mem = OwnedGuestMemory.allocate([{ start: 0, size: 64 * MiB }]);
    for (let i = 0; i < 16; i++) mem.setU32(i * 4 * MiB + 100, 0x1000 + i);
    const path = `${dir}/memory`;
    const { size, bytesWritten } = writeMemoryFile(mem, path);
    assert.equal(size, 64 * MiB);
    assert.equal(bytesWritten, 16 * PAGE_SIZE);
    const st = Deno.statSync(path);
    const BLOCK = 512; // st_blocks counts 512-byte units (stat(2))
    assert.equal(st.size, 64 * MiB);
    assert.ok(st.blocks! * BLOCK <= 1 * MiB, `allocated ${st.blocks! * BLOCK} bytes for 16 non-zero pages`);
    using back = OwnedGuestMemory.mapFile(path, [{ start: 0, size: 64 * MiB }], [0]);
    for (let i = 0; i < 16; i++) assert.equal(back.getU32(i * 4 * MiB + 100), 0x1000 + i);
    assert.equal(back.getU32(4 * MiB + 96), 0);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("memory file: an existing file is never written over", () => {
  const dir = Deno.makeTempDirSync();
  try {
    using mem = OwnedGuestMemory.allocate([{ start: 0, size: MiB }]);
    mem.fill(0, MiB, 9);
    const path = `${dir}/memory`;
    Deno.writeTextFileSync(path, "a clone may map this");
    assert.throws(() => writeMemoryFile(mem, path), /File exists/);
    assert.equal(Deno.readTextFileSync(path), "a clone may map this");
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});
