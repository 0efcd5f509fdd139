// The ELF loader's placement checks, with crafted images (test/support/elf.ts): every PT_LOAD segment must
// lie in guest RAM, outside the 32-bit device hole, and apart from every other segment. A refused image
// writes nothing into guest memory.

import assert from "node:assert/strict";
import { OwnedGuestMemory } from "../../../core/memory.ts";
import { craftElf } from "../../../test/support/elf.ts";
import { GiB, MiB, MMIO_HOLE_END, MMIO_HOLE_START, ramRanges } from "../layout.ts";
import { loadElf } from "./elf.ts";
import { GuestTooSmallError, KernelFormatError } from "./errors.ts";

/** Guest RAM whose top reaches above the hole (two RAM ranges), as `--mem 8192` gives. */
const MEM_ABOVE_HOLE = 8 * GiB;
const SMALL = 64 * MiB;
const AT = 0x200000;
/** What unwritten guest RAM holds in these tests, to see that a refused image wrote nothing. */
const UNTOUCHED = 0xee;

function guest(bytes: number): OwnedGuestMemory {
  return OwnedGuestMemory.allocate(ramRanges(bytes));
}

function refused(mem: OwnedGuestMemory, image: Uint8Array, kind: new (message: string) => Error, re: RegExp): void {
  mem.fill(AT, 0x1000, UNTOUCHED);
  assert.throws(() => loadElf(mem, image), (e: unknown) => {
    assert.ok(e instanceof kind, `${(e as Error).name}: ${(e as Error).message}`);
    assert.match((e as Error).message, re);
    assert.ok(!(e as Error).message.includes("\n"), "one line");
    return true;
  });
  assert.ok(mem.read(AT, 0x1000).every((b) => b === UNTOUCHED), "a refused image writes nothing");
}

Deno.test("ELF: adjacent segments, one each side of the hole, load", () => {
  using mem = guest(MEM_ABOVE_HOLE);
  const k = loadElf(
    mem,
    craftElf([
      { paddr: AT, memsz: 0x1000 },
      { paddr: AT + 0x1000, memsz: 0x1000 },
      { paddr: MMIO_HOLE_END, memsz: 0x1000 },
    ]),
  );
  assert.equal(k.loadStart, AT);
  assert.equal(k.loadEnd, MMIO_HOLE_END + 0x1000);
});

Deno.test("ELF: a segment in the 32-bit device hole is refused as the kernel's fault, whatever the RAM", () => {
  using mem = guest(MEM_ABOVE_HOLE);
  const inHole = MMIO_HOLE_START + 0x1000;
  refused(
    mem,
    craftElf([{ paddr: AT }, { paddr: inHole, memsz: 0x2000 }]),
    KernelFormatError,
    /^ELF segment 1 \(0xc0001000\.\.0xc0003000\) lies in the 32-bit device hole 0xc0000000\.\.0x100000000$/,
  );
  // One that starts in RAM and runs into the hole.
  refused(
    mem,
    craftElf([{ paddr: AT }, { paddr: MMIO_HOLE_START - 0x1000, memsz: 0x2000 }]),
    KernelFormatError,
    /^ELF segment 1 \(0xbffff000\.\.0xc0001000\) lies in the 32-bit device hole/,
  );
});

Deno.test("ELF: overlapping segments are refused, naming both", () => {
  using mem = guest(SMALL);
  refused(
    mem,
    craftElf([{ paddr: AT, memsz: 0x2000 }, { paddr: AT + 0x1000, memsz: 0x1000 }]),
    KernelFormatError,
    /^ELF segments 0 \(0x200000\.\.0x202000\) and 1 \(0x201000\.\.0x202000\) overlap$/,
  );
  // In any order in the file; the same segment twice.
  refused(
    mem,
    craftElf([{ paddr: AT + 0x3000 }, { paddr: AT }, { paddr: AT + 0x3008 }]),
    KernelFormatError,
    /^ELF segments 0 \(0x203000\.\.0x203010\) and 2 \(0x203008\.\.0x203018\) overlap$/,
  );
  refused(mem, craftElf([{ paddr: AT }, { paddr: AT }]), KernelFormatError, /ELF segments 0 .* and 1 .* overlap/);
});

Deno.test("ELF: a segment past the end of guest RAM needs more memory, and says where RAM ends", () => {
  using mem = guest(SMALL);
  refused(
    mem,
    craftElf([{ paddr: AT }, { paddr: SMALL - 0x1000, memsz: 0x2000 }]),
    GuestTooSmallError,
    /^ELF segment 1 \(0x3fff000\.\.0x4001000\) ends past guest RAM's end 0x4000000$/,
  );
  // Above the hole when RAM stops below it.
  refused(
    mem,
    craftElf([{ paddr: AT }, { paddr: MMIO_HOLE_END }]),
    GuestTooSmallError,
    /^ELF segment 1 \(0x100000000\.\.0x100000010\) ends past guest RAM's end 0x4000000$/,
  );
});

Deno.test("ELF: a segment beyond the guest-physical address space is malformed", () => {
  using mem = guest(SMALL);
  refused(
    mem,
    craftElf([{ paddr: AT }, { paddr: 2 ** 52, memsz: 0x1000 }]),
    KernelFormatError,
    /^ELF segment 1 \(0x10000000000000\.\.0x10000000001000\) lies beyond the 48-bit guest-physical address space$/,
  );
});
