// ELF64 x86_64 kernel (vmlinux) loader: PT_LOAD segments at their physical addresses.
// Field offsets: System V ABI, "ELF-64 Object File Format" v1.5 (Elf64_Ehdr, Elf64_Phdr, Elf64_Nhdr),
// as in Linux include/uapi/linux/elf.h.

import type { GuestMemory } from "../../../core/memory.ts";
import { GUEST_PHYS_LIMIT, HIGH_MEMORY_START, MMIO_HOLE_END, MMIO_HOLE_START } from "../layout.ts";
import { INITRD_ADDR_MAX_2_03 } from "./bootparam.ts";
import { GuestTooSmallError, hex, KernelFormatError } from "./errors.ts";
import type { KernelInfo } from "./types.ts";

// ---- Elf64_Ehdr ----
/** e_ident[0..3] = 0x7f 'E' 'L' 'F'. */
const ELF_MAGIC = [0x7f, 0x45, 0x4c, 0x46];
/** e_ident[EI_CLASS]; ELFCLASS64 = 2. */
const EI_CLASS = 4;
const ELFCLASS64 = 2;
/** e_ident[EI_DATA]; ELFDATA2LSB = 1. */
const EI_DATA = 5;
const ELFDATA2LSB = 1;
/** Elf64_Half e_type; ET_EXEC = 2, ET_DYN = 3. */
const E_TYPE = 0x10;
const ET_EXEC = 2;
const ET_DYN = 3;
/** Elf64_Half e_machine; EM_X86_64 = 62. */
const E_MACHINE = 0x12;
const EM_X86_64 = 62;
/** Elf64_Addr e_entry. */
const E_ENTRY = 0x18;
/** Elf64_Off e_phoff. */
const E_PHOFF = 0x20;
/** Elf64_Half e_phentsize, e_phnum. */
const E_PHENTSIZE = 0x36;
const E_PHNUM = 0x38;
/** sizeof(Elf64_Ehdr). */
const EHDR_SIZE = 0x40;

// ---- Elf64_Phdr ----
const P_TYPE = 0x00;
const P_OFFSET = 0x08;
const P_PADDR = 0x18;
const P_FILESZ = 0x20;
const P_MEMSZ = 0x28;
/** sizeof(Elf64_Phdr). */
const PHDR_SIZE = 0x38;
const PT_LOAD = 1;
const PT_NOTE = 4;

// ---- Elf64_Nhdr (4-byte fields; name and desc each padded to 4 bytes) ----
const NHDR_SIZE = 12;
const NOTE_ALIGN = 4;
/** Xen's PVH entry note: XEN_ELFNOTE_PHYS32_ENTRY (Xen include/public/elfnote.h), owner "Xen". */
const XEN_ELFNOTE_PHYS32_ENTRY = 18;
const XEN_NOTE_NAME = "Xen";

/**
 * Notes only Linux puts in a vmlinux: any note owned by "Linux" (include/linux/elfnote.h users such as
 * LINUX_ELFNOTE_BUILD_SALT), or Xen's guest-OS note naming "linux" (XEN_ELFNOTE_GUEST_OS, Xen
 * include/public/elfnote.h; arch/x86/xen/xen-head.S), which kernels older than the build-salt note carry.
 */
const LINUX_NOTE_NAME = "Linux";
const XEN_ELFNOTE_GUEST_OS = 6;
const XEN_GUEST_OS_LINUX = "linux";

/** True when the image starts with the ELF magic. */
export function isElf(image: Uint8Array): boolean {
  return image.length >= ELF_MAGIC.length && ELF_MAGIC.every((b, i) => image[i] === b);
}

function u64(dv: DataView, off: number, what: string): number {
  const v = dv.getBigUint64(off, true);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new KernelFormatError(`ELF ${what} ${hex(Number(v))} is out of range`);
  return Number(v);
}

function alignUp(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}

/** Load an ELF64 x86_64 kernel's PT_LOAD segments at their p_paddr. */
export function loadElf(mem: GuestMemory, image: Uint8Array): KernelInfo {
  if (!isElf(image)) throw new KernelFormatError("not an ELF file: no \\x7fELF magic");
  if (image.length < EHDR_SIZE) {
    throw new KernelFormatError(`ELF file truncated inside its header (${image.length} bytes)`);
  }
  if (image[EI_CLASS] !== ELFCLASS64) throw new KernelFormatError("ELF kernel is not 64-bit (ELFCLASS64 needed)");
  if (image[EI_DATA] !== ELFDATA2LSB) throw new KernelFormatError("ELF kernel is not little-endian");
  const dv = new DataView(image.buffer, image.byteOffset, image.byteLength);
  const machine = dv.getUint16(E_MACHINE, true);
  if (machine !== EM_X86_64) throw new KernelFormatError(`ELF kernel is for machine ${machine}, not x86_64 (62)`);
  const type = dv.getUint16(E_TYPE, true);
  if (type !== ET_EXEC && type !== ET_DYN) throw new KernelFormatError(`ELF file type ${type} is not an executable`);

  const phoff = u64(dv, E_PHOFF, "e_phoff");
  const phentsize = dv.getUint16(E_PHENTSIZE, true);
  const phnum = dv.getUint16(E_PHNUM, true);
  if (phentsize < PHDR_SIZE) throw new KernelFormatError(`ELF e_phentsize ${phentsize} is smaller than Elf64_Phdr`);
  if (phnum === 0) throw new KernelFormatError("ELF kernel has no program headers");
  if (phoff + phnum * phentsize > image.length) {
    throw new KernelFormatError("ELF file truncated inside its program headers");
  }

  const segments: LoadSegment[] = [];
  let pvhEntry: number | undefined;
  for (let i = 0; i < phnum; i++) {
    const ph = phoff + i * phentsize;
    const ptype = dv.getUint32(ph + P_TYPE, true);
    const offset = u64(dv, ph + P_OFFSET, "p_offset");
    const filesz = u64(dv, ph + P_FILESZ, "p_filesz");
    if (ptype !== PT_LOAD && ptype !== PT_NOTE) continue;
    if (offset + filesz > image.length) {
      throw new KernelFormatError(
        `ELF file truncated: segment ${i} needs bytes up to ${offset + filesz}, file has ${image.length}`,
      );
    }
    if (ptype === PT_NOTE) {
      pvhEntry ??= findPvhEntry(image.subarray(offset, offset + filesz));
      continue;
    }
    const paddr = u64(dv, ph + P_PADDR, "p_paddr");
    const memsz = u64(dv, ph + P_MEMSZ, "p_memsz");
    if (filesz > memsz) throw new KernelFormatError(`ELF segment ${i} has p_filesz > p_memsz`);
    if (memsz === 0) continue;
    segments.push({ index: i, offset, filesz, start: paddr, end: paddr + memsz });
  }
  if (segments.length === 0) throw new KernelFormatError("ELF kernel has no loadable segments");
  checkPlacement(mem, segments);
  // Written only once every segment has its place, so a refused image leaves guest memory as it was.
  for (const s of segments) {
    mem.write(s.start, image.subarray(s.offset, s.offset + s.filesz));
    mem.fill(s.start + s.filesz, s.end - s.start - s.filesz);
  }
  const loadStart = Math.min(...segments.map((s) => s.start));
  const loadEnd = Math.max(...segments.map((s) => s.end));

  const entry = u64(dv, E_ENTRY, "e_entry");
  if (entry < loadStart || entry >= loadEnd) {
    throw new KernelFormatError(
      `ELF entry ${hex(entry)} is outside the loaded segments ${hex(loadStart)}..${hex(loadEnd)}`,
    );
  }
  return { kind: "elf", entry, loadStart, loadEnd, initrdAddrMax: INITRD_ADDR_MAX_2_03, pvhEntry };
}

/** A PT_LOAD segment with memory to occupy: guest-physical [start, end), its bytes at `offset` in the file. */
interface LoadSegment {
  /** Its index among the program headers. */
  index: number;
  offset: number;
  filesz: number;
  start: number;
  end: number;
}

function segmentName(s: LoadSegment): string {
  return `${s.index} (${hex(s.start)}..${hex(s.end)})`;
}

/**
 * Every segment above the boot area, inside the 48-bit guest-physical space, outside the 32-bit device
 * hole and apart from every other segment (the kernel's fault: KernelFormatError), and inside guest RAM
 * (the guest's size: GuestTooSmallError).
 */
function checkPlacement(mem: GuestMemory, segments: readonly LoadSegment[]): void {
  for (const s of segments) {
    if (s.start < HIGH_MEMORY_START) {
      throw new KernelFormatError(`ELF segment ${s.index} at ${hex(s.start)} overlaps the boot area below 1 MiB`);
    }
    if (s.end > GUEST_PHYS_LIMIT) {
      throw new KernelFormatError(
        `ELF segment ${segmentName(s)} lies beyond the 48-bit guest-physical address space`,
      );
    }
    if (s.start < MMIO_HOLE_END && s.end > MMIO_HOLE_START) {
      throw new KernelFormatError(
        `ELF segment ${segmentName(s)} lies in the 32-bit device hole ${hex(MMIO_HOLE_START)}..${hex(MMIO_HOLE_END)}`,
      );
    }
  }
  const byStart = [...segments].sort((a, b) => a.start - b.start || a.index - b.index);
  for (let k = 1; k < byStart.length; k++) {
    const [a, b] = [byStart[k - 1], byStart[k]];
    if (b.start < a.end) {
      const [first, second] = a.index < b.index ? [a, b] : [b, a];
      throw new KernelFormatError(`ELF segments ${segmentName(first)} and ${segmentName(second)} overlap`);
    }
  }
  for (const s of segments) {
    if (!mem.isValid(s.start, s.end - s.start)) {
      throw new GuestTooSmallError(`ELF segment ${segmentName(s)} ends past guest RAM's end ${hex(ramEnd(mem))}`);
    }
  }
}

/** The first guest-physical address past the highest RAM region. */
function ramEnd(mem: GuestMemory): number {
  return Math.max(...mem.descriptors.map((r) => r.guestBase + r.size));
}

/** The XEN_ELFNOTE_PHYS32_ENTRY value in a PT_NOTE segment, if any. */
function findPvhEntry(notes: Uint8Array): number | undefined {
  for (const { name, type, desc } of notesIn(notes)) {
    if (name !== XEN_NOTE_NAME || type !== XEN_ELFNOTE_PHYS32_ENTRY) continue;
    const dv = new DataView(desc.buffer, desc.byteOffset, desc.byteLength);
    // Linux emits it as a 32-bit .long (arch/x86/platform/pvh/head.S), some builds as 64 bits.
    if (desc.length === 4) return dv.getUint32(0, true);
    if (desc.length === 8) return dv.getUint32(0, true) + dv.getUint32(4, true) * 2 ** 32;
    return undefined;
  }
  return undefined;
}

/** Each note (owner, type, descriptor) in a PT_NOTE segment's bytes, up to the first malformed one. */
function* notesIn(notes: Uint8Array): Generator<{ name: string; type: number; desc: Uint8Array }> {
  const dv = new DataView(notes.buffer, notes.byteOffset, notes.byteLength);
  let off = 0;
  while (off + NHDR_SIZE <= notes.length) {
    const namesz = dv.getUint32(off, true);
    const descsz = dv.getUint32(off + 4, true);
    const type = dv.getUint32(off + 8, true);
    const nameOff = off + NHDR_SIZE;
    const descOff = nameOff + alignUp(namesz, NOTE_ALIGN);
    const next = descOff + alignUp(descsz, NOTE_ALIGN);
    if (next > notes.length) return;
    const name = new TextDecoder().decode(notes.subarray(nameOff, nameOff + namesz)).replace(/\0+$/, "");
    yield { name, type, desc: notes.subarray(descOff, descOff + descsz) };
    off = next;
  }
}

/**
 * True when an ELF image is a Linux vmlinux (it carries a note only Linux writes), false for any other
 * ELF file (denovm's freestanding test guests) and for a malformed one: this never throws.
 */
export function isLinuxElf(image: Uint8Array): boolean {
  if (!isElf(image) || image.length < EHDR_SIZE || image[EI_CLASS] !== ELFCLASS64) return false;
  const dv = new DataView(image.buffer, image.byteOffset, image.byteLength);
  const phoff = dv.getBigUint64(E_PHOFF, true);
  const phentsize = dv.getUint16(E_PHENTSIZE, true);
  const phnum = dv.getUint16(E_PHNUM, true);
  if (phentsize < PHDR_SIZE || phoff + BigInt(phnum * phentsize) > BigInt(image.length)) return false;
  for (let i = 0; i < phnum; i++) {
    const ph = Number(phoff) + i * phentsize;
    if (dv.getUint32(ph + P_TYPE, true) !== PT_NOTE) continue;
    const offset = dv.getBigUint64(ph + P_OFFSET, true);
    const filesz = dv.getBigUint64(ph + P_FILESZ, true);
    if (offset + filesz > BigInt(image.length)) continue;
    for (const note of notesIn(image.subarray(Number(offset), Number(offset + filesz)))) {
      if (note.name === LINUX_NOTE_NAME) return true;
      if (note.name === XEN_NOTE_NAME && note.type === XEN_ELFNOTE_GUEST_OS) {
        const os = new TextDecoder().decode(note.desc).replace(/\0+$/, "");
        if (os === XEN_GUEST_OS_LINUX) return true;
      }
    }
  }
  return false;
}
