// Kernel loaders and the zero page, with Debian's real kernel.

import assert from "node:assert/strict";
import { OwnedGuestMemory } from "../../../core/memory.ts";
import {
  CMDLINE_MAX_SIZE,
  CMDLINE_START,
  e820Map,
  HIGH_MEMORY_START,
  KERNEL_START,
  MiB,
  MMIO_HOLE_START,
  ramRanges,
  ZERO_PAGE_START,
} from "../layout.ts";
import {
  GuestTooSmallError,
  isLinuxKernel,
  KernelFormatError,
  type KernelInfo,
  loadInitrd,
  loadKernel,
  writeBootParams,
} from "./kernel.ts";
import {
  BOOT_FLAG_MAGIC,
  BP_E820_ENTRIES,
  BP_E820_TABLE,
  BP_EXT_CMD_LINE_PTR,
  BP_EXT_RAMDISK_IMAGE,
  BP_HDR,
  E820_ENTRY_SIZE,
  HDR_BOOT_FLAG,
  HDR_CMD_LINE_PTR,
  HDR_CMDLINE_SIZE,
  HDR_CODE32_START,
  HDR_HEADER,
  HDR_INITRD_ADDR_MAX,
  HDR_PREF_ADDRESS,
  HDR_RAMDISK_IMAGE,
  HDR_RAMDISK_SIZE,
  HDR_RELOCATABLE_KERNEL,
  HDR_SETUP_SECTS,
  HDR_TYPE_OF_LOADER,
  HDR_VERSION,
  HDR_XLOADFLAGS,
  LOADER_TYPE_UNDEFINED,
  SECTOR_SIZE,
  STARTUP_64_OFFSET,
} from "./bootparam.ts";
import { debianKernel } from "../../../test/support/kernel.ts";
import { buildGuest } from "../../../test/guests/build.ts";

const MEM = 256 * MiB;
const PAGE = 0x1000;
/** Small but big enough: Debian's bzImage claims init_size (~64 MiB) from its 16 MiB load address. */
const SMALL = 128 * MiB;

function guest(bytes = MEM): OwnedGuestMemory {
  return OwnedGuestMemory.allocate(ramRanges(bytes));
}

let images: { vmlinuz: Uint8Array; vmlinux: Uint8Array } | undefined;
async function kernels() {
  if (!images) {
    const k = await debianKernel();
    images = { vmlinuz: await Deno.readFile(k.vmlinuz), vmlinux: await Deno.readFile(k.vmlinux) };
  }
  return images;
}

/** Bytes from a small xorshift generator: crypto.getRandomValues caps at 64 KiB per call. */
function pattern(n: number): Uint8Array {
  const out = new Uint8Array(n);
  let x = 0x2545f491;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

function readCString(mem: OwnedGuestMemory, addr: number, max: number): string {
  const bytes = mem.read(addr, max);
  const end = bytes.indexOf(0);
  assert.ok(end >= 0, "command line is NUL-terminated");
  return new TextDecoder().decode(bytes.subarray(0, end));
}

/** Boot a kernel image the way the VMM will and check every zero-page field that matters. */
function bootAndCheck(image: Uint8Array, expectKind: "bzimage" | "elf"): KernelInfo {
  using mem = guest();
  const k = loadKernel(mem, image);
  assert.equal(k.kind, expectKind);
  const initrd = pattern(3 * MiB + 123);
  const placed = loadInitrd(mem, initrd, k, MEM);
  const cmdline = "console=ttyS0 reboot=k panic=1 root=/dev/vda rw";
  const e820 = e820Map(MEM);
  writeBootParams(mem, { kernel: k, cmdline, initrd: placed, e820 });

  // Initrd: page aligned, above the kernel, at or below initrd_addr_max, as high as RAM allows, intact.
  assert.equal(placed.addr % PAGE, 0);
  assert.equal(placed.size, initrd.length);
  assert.ok(placed.addr >= k.loadEnd, `initrd ${placed.addr} above kernel end ${k.loadEnd}`);
  assert.ok(placed.addr + placed.size - 1 <= k.initrdAddrMax);
  assert.ok(placed.addr + placed.size <= MEM);
  assert.ok(MEM - (placed.addr + placed.size) < PAGE, "initrd sits at the top of RAM");
  assert.deepEqual(mem.read(placed.addr, placed.size), initrd);

  const zp = ZERO_PAGE_START;
  assert.equal(mem.getU16(zp + HDR_BOOT_FLAG), BOOT_FLAG_MAGIC);
  assert.equal(new TextDecoder().decode(mem.read(zp + HDR_HEADER, 4)), "HdrS");
  assert.ok(mem.getU16(zp + HDR_VERSION) >= 0x0206);
  assert.equal(mem.getU8(zp + HDR_TYPE_OF_LOADER), LOADER_TYPE_UNDEFINED);
  assert.equal(mem.getU32(zp + HDR_CMD_LINE_PTR), CMDLINE_START);
  assert.equal(mem.getU32(zp + BP_EXT_CMD_LINE_PTR), 0);
  assert.equal(readCString(mem, CMDLINE_START, cmdline.length + 1), cmdline);
  assert.equal(mem.getU32(zp + HDR_RAMDISK_IMAGE), placed.addr);
  assert.equal(mem.getU32(zp + BP_EXT_RAMDISK_IMAGE), 0);
  assert.equal(mem.getU32(zp + HDR_RAMDISK_SIZE), placed.size);
  assert.equal(mem.getU32(zp + HDR_INITRD_ADDR_MAX), k.initrdAddrMax);

  assert.equal(mem.getU8(zp + BP_E820_ENTRIES), e820.length);
  const back = e820.map((_, i) => {
    const at = zp + BP_E820_TABLE + i * E820_ENTRY_SIZE;
    return { addr: mem.getU64Number(at), size: mem.getU64Number(at + 8), type: mem.getU32(at + 16) };
  });
  assert.deepEqual(back, e820);
  return k;
}

Deno.test("bzImage: Debian's vmlinuz loads at KERNEL_START with the 64-bit entry at +0x200", async () => {
  const { vmlinuz } = await kernels();
  const k = bootAndCheck(vmlinuz, "bzimage");
  assert.equal(k.loadStart, KERNEL_START);
  assert.equal(k.entry, KERNEL_START + STARTUP_64_OFFSET);
  assert.ok((k.protocolVersion ?? 0) >= 0x020c, "6.1 speaks boot protocol 2.12+");
  assert.equal(k.initrdAddrMax, 0x7fffffff, "x86_64 kernels report initrd_addr_max 0x7fffffff");

  // The protected-mode code is what sits at the load address, and the header bytes are the file's.
  using mem = guest();
  const k2 = loadKernel(mem, vmlinuz);
  const setupSize = ((vmlinuz[HDR_SETUP_SECTS] || 4) + 1) * SECTOR_SIZE;
  assert.deepEqual(mem.read(k2.loadStart, 4096), vmlinuz.slice(setupSize, setupSize + 4096));
  assert.deepEqual(k2.setupHeader, vmlinuz.slice(HDR_SETUP_SECTS, HDR_SETUP_SECTS + k2.setupHeader!.length));
  writeBootParams(mem, { kernel: k2, cmdline: "", e820: e820Map(MEM) });
  assert.equal(mem.getU32(ZERO_PAGE_START + HDR_CODE32_START), k2.loadStart);
  assert.equal(mem.getU8(CMDLINE_START), 0, "empty command line is one NUL");
  assert.equal(mem.getU32(ZERO_PAGE_START + HDR_RAMDISK_IMAGE), 0, "no initrd, no ramdisk_image");
});

Deno.test("ELF: Debian's vmlinux loads its PT_LOAD segments, entry and PVH note found", async () => {
  const { vmlinux } = await kernels();
  const k = bootAndCheck(vmlinux, "elf");
  const dv = new DataView(vmlinux.buffer);
  const eEntry = Number(dv.getBigUint64(0x18, true));
  assert.equal(k.entry, eEntry);
  assert.equal(k.loadStart, KERNEL_START, "Linux links its first segment at 16 MiB physical");
  assert.ok(k.loadEnd > k.loadStart + 16 * MiB);
  assert.ok(k.pvhEntry !== undefined, "Debian builds with CONFIG_PVH");
  assert.ok(k.pvhEntry >= k.loadStart && k.pvhEntry < k.loadEnd);

  // First PT_LOAD's file bytes are at its p_paddr.
  using mem = guest();
  loadKernel(mem, vmlinux);
  const phoff = Number(dv.getBigUint64(0x20, true));
  const off = Number(dv.getBigUint64(phoff + 0x08, true));
  const paddr = Number(dv.getBigUint64(phoff + 0x18, true));
  assert.deepEqual(mem.read(paddr, 8192), vmlinux.slice(off, off + 8192));
});

Deno.test("bad inputs: random bytes, truncated images, wrong arch, old protocol", async () => {
  const { vmlinuz, vmlinux } = await kernels();
  using mem = guest(SMALL);
  const random = crypto.getRandomValues(new Uint8Array(64 * 1024));
  random[0] = 0; // never "\x7fELF"
  assert.throws(() => loadKernel(mem, random), KernelFormatError);
  assert.throws(() => loadKernel(mem, new Uint8Array(0)), KernelFormatError);
  assert.throws(() => loadKernel(mem, vmlinuz.slice(0, vmlinuz.length >> 1)), (e) => {
    assert.ok(e instanceof KernelFormatError);
    assert.match(e.message, /truncated/);
    return true;
  });
  assert.throws(() => loadKernel(mem, vmlinuz.slice(0, 0x210)), KernelFormatError);
  assert.throws(() => loadKernel(mem, vmlinux.slice(0, 0x100)), KernelFormatError);

  const old = vmlinuz.slice(0, 0x1000);
  new DataView(old.buffer).setUint16(HDR_VERSION, 0x0204, true);
  assert.throws(() => loadKernel(mem, old), /too old/);

  const not64 = vmlinuz.slice();
  new DataView(not64.buffer).setUint16(HDR_XLOADFLAGS, 0, true);
  assert.throws(() => loadKernel(mem, not64), /64-bit/);

  const arm = vmlinux.slice(0, 0x10000);
  new DataView(arm.buffer).setUint16(0x12, 183, true); // EM_AARCH64
  assert.throws(() => loadKernel(mem, arm), /x86_64/);
});

Deno.test("guest too small: kernel and initrd that do not fit raise GuestTooSmallError", async () => {
  const { vmlinuz, vmlinux } = await kernels();
  {
    using tiny = guest(KERNEL_START);
    assert.throws(() => loadKernel(tiny, vmlinuz), GuestTooSmallError);
    assert.throws(() => loadKernel(tiny, vmlinux), GuestTooSmallError);
  }
  {
    using mem = guest(SMALL);
    const k = loadKernel(mem, vmlinuz);
    assert.throws(() => loadInitrd(mem, new Uint8Array(SMALL - k.loadEnd + PAGE), k, SMALL), GuestTooSmallError);
    // An initrd that fits goes right below the end of RAM.
    const placed = loadInitrd(mem, new Uint8Array(PAGE * 3), k, SMALL);
    assert.equal(placed.addr, SMALL - 3 * PAGE);
  }
  {
    // initrd_addr_max caps the placement below the end of RAM.
    using mem = guest(SMALL);
    const k = { ...loadKernel(mem, vmlinuz), initrdAddrMax: 100 * MiB - 1 };
    const placed = loadInitrd(mem, new Uint8Array(5000), k, SMALL);
    assert.equal(placed.addr, 100 * MiB - 2 * PAGE);
    assert.ok(placed.addr >= HIGH_MEMORY_START);
  }
});

Deno.test("command line: too long is refused, the longest allowed fits", async () => {
  const { vmlinuz, vmlinux } = await kernels();
  using mem = guest(SMALL);
  const bz = loadKernel(mem, vmlinuz);
  // Debian's header says cmdline_size 2047; the kernel cannot take more than that.
  const max = new DataView(bz.setupHeader!.buffer, bz.setupHeader!.byteOffset).getUint32(
    HDR_CMDLINE_SIZE - BP_HDR,
    true,
  );
  assert.ok(max < CMDLINE_MAX_SIZE);
  writeBootParams(mem, { kernel: bz, cmdline: "x".repeat(max), e820: e820Map(SMALL) });
  assert.equal(mem.getU8(CMDLINE_START + max), 0);
  assert.throws(
    () => writeBootParams(mem, { kernel: bz, cmdline: "x".repeat(max + 1), e820: e820Map(SMALL) }),
    /command line/,
  );
  const elf = loadKernel(mem, vmlinux);
  writeBootParams(mem, { kernel: elf, cmdline: "y".repeat(CMDLINE_MAX_SIZE - 1), e820: e820Map(SMALL) });
  assert.throws(
    () => writeBootParams(mem, { kernel: elf, cmdline: "y".repeat(CMDLINE_MAX_SIZE), e820: e820Map(SMALL) }),
    /command line/,
  );
});

/** One ELF note (Elf64_Nhdr, then name and descriptor each padded to 4 bytes). */
function elfNote(name: string, type: number, desc: Uint8Array): Uint8Array {
  const nameBytes = new TextEncoder().encode(name + "\0");
  const pad = (n: number) => Math.ceil(n / 4) * 4;
  const note = new Uint8Array(12 + pad(nameBytes.length) + pad(desc.length));
  const ndv = new DataView(note.buffer);
  ndv.setUint32(0, nameBytes.length, true);
  ndv.setUint32(4, desc.length, true);
  ndv.setUint32(8, type, true);
  note.set(nameBytes, 12);
  note.set(desc, 12 + pad(nameBytes.length));
  return note;
}

/** XEN_ELFNOTE_PHYS32_ENTRY and XEN_ELFNOTE_GUEST_OS (Xen include/public/elfnote.h). */
const XEN_ELFNOTE_PHYS32_ENTRY = 18;
const XEN_ELFNOTE_GUEST_OS = 6;
/** LINUX_ELFNOTE_BUILD_SALT (Linux include/linux/build-salt.h). */
const LINUX_ELFNOTE_BUILD_SALT = 0x100;

/**
 * A minimal ELF64 x86_64 image: one PT_LOAD of `code` at `paddr`, and a PT_NOTE with a 4-byte PVH
 * entry (or the notes given).
 */
function tinyElf(
  paddr: number,
  code: Uint8Array,
  pvh: number,
  opts: { memsz?: number; cutTo?: number; notes?: Uint8Array } = {},
) {
  const phoff = 0x40, phnum = 2, noteOff = 0x100, codeOff = 0x200;
  const pvhDesc = new Uint8Array(4);
  new DataView(pvhDesc.buffer).setUint32(0, pvh, true);
  const note = opts.notes ?? elfNote("Xen", XEN_ELFNOTE_PHYS32_ENTRY, pvhDesc);
  const img = new Uint8Array(codeOff + code.length);
  const dv = new DataView(img.buffer);
  img.set([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1]);
  dv.setUint16(0x10, 2, true); // ET_EXEC
  dv.setUint16(0x12, 62, true); // EM_X86_64
  dv.setBigUint64(0x18, BigInt(paddr), true); // e_entry
  dv.setBigUint64(0x20, BigInt(phoff), true);
  dv.setUint16(0x36, 0x38, true);
  dv.setUint16(0x38, phnum, true);
  const ph = (i: number, type: number, off: number, addr: number, filesz: number, memsz: number) => {
    const at = phoff + i * 0x38;
    dv.setUint32(at, type, true);
    dv.setBigUint64(at + 0x08, BigInt(off), true);
    dv.setBigUint64(at + 0x10, BigInt(addr), true);
    dv.setBigUint64(at + 0x18, BigInt(addr), true);
    dv.setBigUint64(at + 0x20, BigInt(filesz), true);
    dv.setBigUint64(at + 0x28, BigInt(memsz), true);
  };
  ph(0, 1, codeOff, paddr, code.length, opts.memsz ?? code.length);
  ph(1, 4, noteOff, 0, note.length, note.length);
  img.set(note, noteOff);
  img.set(code, codeOff);
  return img.slice(0, opts.cutTo ?? img.length);
}

Deno.test("ELF: synthetic image — bss zeroed, 4-byte PVH note, low or truncated segments refused", () => {
  using mem = guest(SMALL);
  const code = pattern(100);
  mem.fill(0x200000, 0x2000, 0xee);
  const k = loadKernel(mem, tinyElf(0x200000, code, 0x200010, { memsz: 0x1000 }));
  assert.equal(k.kind, "elf");
  assert.equal(k.entry, 0x200000);
  assert.equal(k.pvhEntry, 0x200010);
  assert.equal(k.loadEnd, 0x201000);
  assert.deepEqual(mem.read(0x200000, 100), code);
  assert.ok(mem.read(0x200000 + 100, 0x1000 - 100).every((b) => b === 0), "p_memsz beyond p_filesz is zeroed");
  assert.equal(mem.getU8(0x201000), 0xee, "nothing written past p_memsz");

  assert.throws(() => loadKernel(mem, tinyElf(ZERO_PAGE_START, code, 0)), /below 1 MiB/);
  assert.throws(() => loadKernel(mem, tinyElf(0x200000, code, 0, { cutTo: 0x200 + 50 })), KernelFormatError);
  assert.throws(() => loadKernel(mem, tinyElf(SMALL - 10, code, 0)), GuestTooSmallError);
  assert.throws(() => loadKernel(mem, tinyElf(0x200000, code, 0, { memsz: 10 })), /p_filesz > p_memsz/);
});

Deno.test("bzImage: a non-relocatable kernel goes to its pref_address", async () => {
  const { vmlinuz } = await kernels();
  const fixed = vmlinuz.slice();
  const dv = new DataView(fixed.buffer);
  fixed[HDR_RELOCATABLE_KERNEL] = 0;
  dv.setBigUint64(HDR_PREF_ADDRESS, BigInt(KERNEL_START * 2), true);
  using mem = guest();
  const k = loadKernel(mem, fixed);
  assert.equal(k.loadStart, KERNEL_START * 2);
  assert.equal(k.entry, KERNEL_START * 2 + STARTUP_64_OFFSET);
});

Deno.test("bzImage: a pref_address in the 32-bit device hole is the kernel's fault, not the guest's size", async () => {
  const { vmlinuz } = await kernels();
  const fixed = vmlinuz.slice();
  fixed[HDR_RELOCATABLE_KERNEL] = 0;
  new DataView(fixed.buffer).setBigUint64(HDR_PREF_ADDRESS, BigInt(MMIO_HOLE_START), true);
  using mem = guest(8 * 1024 * MiB);
  assert.throws(
    () => loadKernel(mem, fixed),
    (e: unknown) => e instanceof KernelFormatError && /0xc0000000\.\..* lies in the 32-bit device hole/.test(e.message),
  );
});

Deno.test("Linux or not: bzImage and a vmlinux are Linux; a test guest and other ELF files are not", async () => {
  const { vmlinuz, vmlinux } = await kernels();
  assert.equal(isLinuxKernel(vmlinuz), true, "a bzImage");
  assert.equal(isLinuxKernel(vmlinux), true, "Debian's vmlinux (its Linux build-salt note)");
  assert.equal(isLinuxKernel(await Deno.readFile(await buildGuest("boot_info"))), false, "a freestanding test guest");
  const code = pattern(64);
  const text = (s: string) => new TextEncoder().encode(s + "\0");
  assert.equal(isLinuxKernel(tinyElf(0x200000, code, 0x200010)), false, "a PVH note alone says nothing");
  const salt = elfNote("Linux", LINUX_ELFNOTE_BUILD_SALT, text("6.1.0"));
  assert.equal(isLinuxKernel(tinyElf(0x200000, code, 0, { notes: salt })), true, "a note owned by Linux");
  const xenLinux = elfNote("Xen", XEN_ELFNOTE_GUEST_OS, text("linux"));
  assert.equal(isLinuxKernel(tinyElf(0x200000, code, 0, { notes: xenLinux })), true, "Xen's guest-OS note: linux");
  const xenOther = elfNote("Xen", XEN_ELFNOTE_GUEST_OS, text("netbsd"));
  assert.equal(isLinuxKernel(tinyElf(0x200000, code, 0, { notes: xenOther })), false, "Xen's guest-OS note: other");
  // Malformed input is "not Linux", never an exception: the loader reports what is wrong with it.
  assert.equal(isLinuxKernel(pattern(4096)), false);
  assert.equal(isLinuxKernel(vmlinux.slice(0, 0x30)), false, "truncated inside the ELF header");
  assert.equal(isLinuxKernel(vmlinux.slice(0, 0x100)), false, "truncated inside the program headers");
  const lyingNote = elfNote("Linux", LINUX_ELFNOTE_BUILD_SALT, text("6.1.0"));
  new DataView(lyingNote.buffer).setUint32(4, 0xffff_fff0, true); // descsz far past the segment
  assert.equal(isLinuxKernel(tinyElf(0x200000, code, 0, { notes: lyingNote })), false);
});
