import assert from "node:assert/strict";
import { OwnedGuestMemory } from "../../core/memory.ts";
import { CR0_PG, CR4_LA57, CR4_PAE, EFER_LMA, type PagingState, translate, TranslationError } from "./paging.ts";

const MiB = 1 << 20;
const PRESENT_WRITABLE = 0x3n;
const PAGE_SIZE_BIT = 0x80n;

/** A guest with 4 MiB of RAM and long-mode page tables at 0x1000 (PML4), 0x2000 (PDPT), 0x3000 (PD). */
function guest() {
  const mem = OwnedGuestMemory.allocate([{ start: 0, size: 4 * MiB }]);
  mem.setU64(0x1000, 0x2000n | PRESENT_WRITABLE); // PML4[0] -> PDPT
  mem.setU64(0x2000, 0x3000n | PRESENT_WRITABLE); // PDPT[0] -> PD
  mem.setU64(0x3000, 0x0n | PRESENT_WRITABLE | PAGE_SIZE_BIT); // PD[0]: 2 MiB page at 0
  mem.setU64(0x3008, 0x4000n | PRESENT_WRITABLE); // PD[1] -> PT for 2..4 MiB virtual
  mem.setU64(0x4000 + 5 * 8, 0x30_0000n | PRESENT_WRITABLE); // PT[5]: va 0x205000 -> pa 0x300000
  mem.setU64(0x2008, 0x0n | PRESENT_WRITABLE | PAGE_SIZE_BIT); // PDPT[1]: 1 GiB page at 0
  // PML4[256] (va 0xffff800000000000) -> PDPT at 0x5000 -> PD at 0x6000 -> 2 MiB page at 2 MiB
  mem.setU64(0x1000 + 256 * 8, 0x5000n | PRESENT_WRITABLE);
  mem.setU64(0x5000, 0x6000n | PRESENT_WRITABLE);
  mem.setU64(0x6000, 0x20_0000n | PRESENT_WRITABLE | PAGE_SIZE_BIT);
  // PML4[1] points outside guest RAM.
  mem.setU64(0x1008, 0x1_0000_0000n | PRESENT_WRITABLE);
  const state: PagingState = { cr0: CR0_PG | 1n, cr3: 0x1000n, cr4: CR4_PAE, efer: EFER_LMA };
  return { mem, state };
}

Deno.test("gdb paging: 4 KiB, 2 MiB and 1 GiB pages, and the higher half", () => {
  const { mem, state } = guest();
  try {
    assert.equal(translate(mem, state, 0x1234n), 0x1234n);
    assert.equal(translate(mem, state, 0x1f_ffffn), 0x1f_ffffn);
    assert.equal(translate(mem, state, 0x20_5abcn), 0x30_0abcn);
    assert.equal(translate(mem, state, 0x4000_0123n), 0x123n);
    assert.equal(translate(mem, state, 0xffff_8000_0000_1000n), 0x20_1000n);
    // The offset bits of a 2 MiB page come from the address, not the entry.
    assert.equal(translate(mem, state, 0xffff_8000_001f_fff8n), 0x3f_fff8n);
  } finally {
    mem.close();
  }
});

Deno.test("gdb paging: unmapped, non-canonical, tables outside RAM and unknown modes are errors", () => {
  const { mem, state } = guest();
  try {
    assert.throws(() => translate(mem, state, 0x20_6000n), TranslationError); // PT[6] empty
    assert.throws(() => translate(mem, state, 0x8000_0000n), TranslationError); // PDPT[2] empty
    assert.throws(() => translate(mem, state, 0x0000_8000_0000_0000n), /not canonical/);
    assert.throws(() => translate(mem, state, 0x80_0000_0000n), /outside guest memory/); // via PML4[1]
    assert.throws(() => translate(mem, { ...state, cr3: 0x1_0000_0000n }, 0n), /outside guest memory/);
    assert.throws(() => translate(mem, { ...state, efer: 0n }, 0n), /32-bit paging/);
    assert.throws(() => translate(mem, { ...state, cr4: CR4_PAE | CR4_LA57 }, 0n), /5-level/);
    // Without paging the address is physical.
    assert.equal(translate(mem, { ...state, cr0: 1n }, 0xdead_beefn), 0xdead_beefn);
  } finally {
    mem.close();
  }
});
