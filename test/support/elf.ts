// Crafted ELF64 x86_64 executables for the loader's and the CLI's tests: a header, program headers and
// each segment's bytes, nothing else. Field offsets: System V ABI, "ELF-64 Object File Format" v1.5
// (Elf64_Ehdr, Elf64_Phdr), as in Linux include/uapi/linux/elf.h.

/** sizeof(Elf64_Ehdr) and sizeof(Elf64_Phdr). */
const EHDR_SIZE = 0x40;
const PHDR_SIZE = 0x38;
/** e_ident: 0x7f 'E' 'L' 'F', ELFCLASS64 (2), ELFDATA2LSB (1), EV_CURRENT (1). */
const E_IDENT = [0x7f, 0x45, 0x4c, 0x46, 2, 1, 1];
/** e_type ET_EXEC, e_machine EM_X86_64. */
const ET_EXEC = 2;
const EM_X86_64 = 62;
/** Program header type of a loadable segment. */
export const PT_LOAD = 1;
/** Where the segments' bytes start in the file (after the headers, page aligned). */
const DATA_START = 0x1000;

export interface CraftedSegment {
  /** p_paddr (and p_vaddr). */
  paddr: number;
  /** The segment's file bytes (p_filesz is their length); default 16 bytes of 0xf4 (HLT). */
  bytes?: Uint8Array;
  /** p_memsz; default the length of `bytes`. */
  memsz?: number;
  /** p_type; default PT_LOAD. */
  type?: number;
}

/** An ELF64 x86_64 executable with these segments, entering at `entry` (default the first segment's start). */
export function craftElf(segments: CraftedSegment[], entry = segments[0]?.paddr ?? 0): Uint8Array {
  const HLT = 0xf4;
  const datas = segments.map((s) => s.bytes ?? new Uint8Array(16).fill(HLT));
  const size = DATA_START + datas.reduce((n, d) => n + d.length, 0);
  const img = new Uint8Array(size);
  const dv = new DataView(img.buffer);
  img.set(E_IDENT);
  dv.setUint16(0x10, ET_EXEC, true);
  dv.setUint16(0x12, EM_X86_64, true);
  dv.setUint32(0x14, 1, true); // e_version
  dv.setBigUint64(0x18, BigInt(entry), true);
  dv.setBigUint64(0x20, BigInt(EHDR_SIZE), true); // e_phoff
  dv.setUint16(0x34, EHDR_SIZE, true); // e_ehsize
  dv.setUint16(0x36, PHDR_SIZE, true);
  dv.setUint16(0x38, segments.length, true);
  let offset = DATA_START;
  segments.forEach((s, i) => {
    const at = EHDR_SIZE + i * PHDR_SIZE;
    const data = datas[i];
    dv.setUint32(at, s.type ?? PT_LOAD, true);
    dv.setBigUint64(at + 0x08, BigInt(offset), true); // p_offset
    dv.setBigUint64(at + 0x10, BigInt(s.paddr), true); // p_vaddr
    dv.setBigUint64(at + 0x18, BigInt(s.paddr), true); // p_paddr
    dv.setBigUint64(at + 0x20, BigInt(data.length), true); // p_filesz
    dv.setBigUint64(at + 0x28, BigInt(s.memsz ?? data.length), true); // p_memsz
    img.set(data, offset);
    offset += data.length;
  });
  return img;
}
