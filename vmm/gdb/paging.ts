// Guest-virtual to guest-physical translation for the debugger: the walk the CPU does through the
// guest's page tables, read through GuestMemory (every table address checked against guest RAM).
// Source: Intel SDM vol. 3A, 4.5 "4-level paging and 5-level paging" (tables 4-14 to 4-20) and 2.5
// "Control registers"; AMD APM vol. 2, 5.3 "Long-mode page translation".

import { type GuestMemory, GuestMemoryError } from "../../core/memory.ts";

/** CR0.PG, bit 31: paging on. */
export const CR0_PG = 1n << 31n;
/** CR4.PAE, bit 5; CR4.LA57, bit 12 (5-level paging). */
export const CR4_PAE = 1n << 5n;
export const CR4_LA57 = 1n << 12n;
/** IA32_EFER.LMA, bit 10: long mode active. */
export const EFER_LMA = 1n << 10n;

/** Page-table entry bits: present (0) and page size (7, in a PDPTE or PDE). */
const PTE_PRESENT = 1n;
const PTE_PAGE_SIZE = 1n << 7n;
/** The physical-address field of an entry: bits 51:12 (MAXPHYADDR at most 52). */
const PTE_ADDRESS_MASK = 0x000f_ffff_ffff_f000n;
/** Each table has 512 eight-byte entries, indexed by nine bits of the address. */
const INDEX_BITS = 9n;
const INDEX_MASK = (1n << INDEX_BITS) - 1n;
const ENTRY_BYTES = 8n;
/** The shift of each level's index: PML4 39, PDPT 30, PD 21, PT 12. */
const LEVEL_SHIFTS = [39n, 30n, 21n, 12n] as const;
/** Levels (PDPT, PD) where PS makes the entry map a 1 GiB or 2 MiB page. */
const LARGE_PAGE_LEVELS = new Set([1, 2]);
/** A 4-level linear address is canonical when bits 63:47 all equal bit 47. */
const CANONICAL_BITS = 48;

/** The registers the walk depends on (from KVM_GET_SREGS). */
export interface PagingState {
  cr0: bigint;
  cr3: bigint;
  cr4: bigint;
  efer: bigint;
}

/** Why an address has no translation. */
export class TranslationError extends Error {}

/**
 * The guest-physical address of guest-virtual `va`, or a TranslationError: not present, not
 * canonical, a table outside guest RAM, or a paging mode this walker does not know (32-bit, 5-level).
 * Without paging the address is the physical one.
 */
export function translate(mem: GuestMemory, state: PagingState, va: bigint): bigint {
  va = BigInt.asUintN(64, va);
  if ((state.cr0 & CR0_PG) === 0n) return va;
  if ((state.efer & EFER_LMA) === 0n) throw new TranslationError("32-bit paging is not supported by the debugger");
  if ((state.cr4 & CR4_LA57) !== 0n) throw new TranslationError("5-level paging is not supported by the debugger");
  if (BigInt.asIntN(CANONICAL_BITS, va) !== BigInt.asIntN(64, va)) {
    throw new TranslationError(`0x${va.toString(16)} is not canonical`);
  }
  let table = state.cr3 & PTE_ADDRESS_MASK;
  for (let level = 0; level < LEVEL_SHIFTS.length; level++) {
    const shift = LEVEL_SHIFTS[level];
    const entryAddr = table + ((va >> shift) & INDEX_MASK) * ENTRY_BYTES;
    let entry: bigint;
    try {
      entry = mem.getU64(Number(entryAddr));
    } catch (e) {
      if (e instanceof GuestMemoryError) {
        throw new TranslationError(`page table entry at 0x${entryAddr.toString(16)} is outside guest memory`);
      }
      throw e;
    }
    if ((entry & PTE_PRESENT) === 0n) throw new TranslationError(`0x${va.toString(16)} is not mapped`);
    const last = level === LEVEL_SHIFTS.length - 1;
    if (last || (LARGE_PAGE_LEVELS.has(level) && (entry & PTE_PAGE_SIZE) !== 0n)) {
      const offsetMask = (1n << shift) - 1n;
      return (entry & PTE_ADDRESS_MASK & ~offsetMask) | (va & offsetMask);
    }
    table = entry & PTE_ADDRESS_MASK;
  }
  throw new TranslationError("unreachable");
}

/** Bytes to the end of va's 4 KiB page: a range is translated one page at a time. */
export function bytesToPageEnd(va: bigint): number {
  const PAGE = 4096n;
  return Number(PAGE - (va % PAGE));
}
