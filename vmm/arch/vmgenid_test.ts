import assert from "node:assert/strict";
import { GuestMemoryError, OwnedGuestMemory } from "../../core/memory.ts";
import { MiB, ramRanges, VMGENID_PAGE_SIZE, VMGENID_PAGE_START, VMGENID_SIZE } from "./layout.ts";
import { generationIdHex, newGenerationId, parseGenerationId, readGenerationId, writeGenerationId } from "./vmgenid.ts";

Deno.test("newGenerationId: 16 random bytes, a different ID each time", () => {
  const ids = Array.from({ length: 8 }, () => newGenerationId());
  for (const id of ids) assert.equal(id.length, VMGENID_SIZE);
  assert.equal(new Set(ids.map(generationIdHex)).size, ids.length);
  assert.ok(ids.every((id) => id.some((b) => b !== 0)));
});

Deno.test("writeGenerationId: the ID at the page's start, the rest of the page zero; readGenerationId reads it back", () => {
  using mem = OwnedGuestMemory.allocate(ramRanges(16 * MiB));
  mem.fill(VMGENID_PAGE_START - 1, VMGENID_PAGE_SIZE + 2, 0xaa);
  const id = newGenerationId();
  writeGenerationId(mem, id);
  assert.deepEqual(readGenerationId(mem), id);
  assert.deepEqual(mem.read(VMGENID_PAGE_START, VMGENID_SIZE), id);
  assert.ok(mem.read(VMGENID_PAGE_START + VMGENID_SIZE, VMGENID_PAGE_SIZE - VMGENID_SIZE).every((b) => b === 0));
  assert.equal(mem.read(VMGENID_PAGE_START - 1, 1)[0], 0xaa, "the byte below the page is untouched");
  assert.equal(mem.read(VMGENID_PAGE_START + VMGENID_PAGE_SIZE, 1)[0], 0xaa, "the byte above the page is untouched");

  const next = newGenerationId();
  writeGenerationId(mem, next);
  assert.deepEqual(readGenerationId(mem), next);
  // The reader's copy is its own: a later write does not change what was read.
  const held = readGenerationId(mem);
  writeGenerationId(mem, id);
  assert.deepEqual(held, next);
});

Deno.test("writeGenerationId: an ID of the wrong length is a RangeError and memory is unchanged", () => {
  using mem = OwnedGuestMemory.allocate(ramRanges(16 * MiB));
  const id = newGenerationId();
  writeGenerationId(mem, id);
  for (const n of [0, 15, 17, 32]) {
    assert.throws(() => writeGenerationId(mem, new Uint8Array(n).fill(1)), RangeError);
  }
  assert.deepEqual(readGenerationId(mem), id);
});

Deno.test("writeGenerationId: guest memory that does not reach the page is a GuestMemoryError", () => {
  using mem = OwnedGuestMemory.allocate([{ start: 0, size: VMGENID_PAGE_START }]);
  assert.throws(() => writeGenerationId(mem, newGenerationId()), GuestMemoryError);
  assert.throws(() => readGenerationId(mem), GuestMemoryError);
});

Deno.test("generationIdHex and parseGenerationId: 32 hex digits in memory order, both ways", () => {
  const id = Uint8Array.from({ length: VMGENID_SIZE }, (_, i) => i * 17);
  const hex = generationIdHex(id);
  assert.equal(hex, "00112233445566778899aabbccddeeff");
  assert.deepEqual(parseGenerationId(hex), id);
  assert.deepEqual(parseGenerationId(hex.toUpperCase()), id);
  const random = newGenerationId();
  assert.deepEqual(parseGenerationId(generationIdHex(random)), random);
  for (const bad of ["", "00", hex + "0", hex.slice(1), "g" + hex.slice(1), ` ${hex.slice(1)}`, "0x" + hex.slice(2)]) {
    assert.throws(() => parseGenerationId(bad), RangeError, bad);
  }
  assert.throws(() => generationIdHex(new Uint8Array(8)), RangeError);
});
