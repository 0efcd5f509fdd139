// Linux kernel boot: load a bzImage or ELF vmlinux, place an initrd, write the zero page.
// Boot protocol: Linux Documentation/arch/x86/boot.rst; layouts: arch/x86/include/uapi/asm/bootparam.h.

import type { GuestMemory } from "../../../core/memory.ts";
import { CMDLINE_MAX_SIZE, CMDLINE_START, type E820Entry, ZERO_PAGE_START } from "../layout.ts";
import {
  BOOT_FLAG_MAGIC,
  BOOT_PARAMS_SIZE,
  BP_ACPI_RSDP_ADDR,
  BP_E820_ENTRIES,
  BP_E820_TABLE,
  BP_EXT_CMD_LINE_PTR,
  BP_EXT_RAMDISK_IMAGE,
  BP_EXT_RAMDISK_SIZE,
  BP_HDR,
  E820_ENTRY_ADDR,
  E820_ENTRY_SIZE,
  E820_ENTRY_SIZE_FIELD,
  E820_ENTRY_TYPE,
  E820_MAX_ENTRIES_ZEROPAGE,
  HDR_BOOT_FLAG,
  HDR_CMD_LINE_PTR,
  HDR_CMDLINE_SIZE,
  HDR_CODE32_START,
  HDR_HEADER,
  HDR_INITRD_ADDR_MAX,
  HDR_LOADFLAGS,
  HDR_MAGIC,
  HDR_RAMDISK_IMAGE,
  HDR_RAMDISK_SIZE,
  HDR_TYPE_OF_LOADER,
  HDR_VERSION,
  LOADER_TYPE_UNDEFINED,
  LOADFLAG_LOADED_HIGH,
  PROTOCOL_2_06,
  PROTOCOL_2_15,
} from "./bootparam.ts";
import { isBzImage, loadBzImage } from "./bzimage.ts";
import { isElf, isLinuxElf, loadElf } from "./elf.ts";
import { GuestTooSmallError, hex, KernelFormatError } from "./errors.ts";
import type { KernelInfo } from "./types.ts";

export { GuestTooSmallError, KernelFormatError } from "./errors.ts";
export type { KernelInfo } from "./types.ts";

/** The initrd is placed on a page boundary. */
const PAGE_SIZE = 0x1000;
const TWO_32 = 2 ** 32;

/** Load a kernel image (bzImage or ELF64 vmlinux) into guest memory. */
export function loadKernel(mem: GuestMemory, image: Uint8Array): KernelInfo {
  if (isElf(image)) return loadElf(mem, image);
  if (isBzImage(image)) return loadBzImage(mem, image);
  throw new KernelFormatError(`kernel image (${image.length} bytes) is neither a bzImage nor an ELF file`);
}

/**
 * True when the image is a Linux kernel: a bzImage (the "HdrS" setup header is Linux's boot protocol)
 * or an ELF vmlinux with Linux's notes. A freestanding ELF program (denovm's test guests) is not.
 */
export function isLinuxKernel(image: Uint8Array): boolean {
  return isBzImage(image) || isLinuxElf(image);
}

/** Where an initrd can go for `kernel`: guest-physical [start, end), and whether RAM (not the kernel) sets the end. */
export interface InitrdRoom {
  start: number;
  end: number;
  /** The largest initrd that fits. */
  bytes: number;
  /** True when the end is RAM's below 4 GiB (more --mem helps), false when it is the kernel's initrd_addr_max. */
  byRam: boolean;
}

/** The room loadInitrd has: page aligned above the kernel's end, below min(initrdAddrMax + 1, ramBelow4G). */
export function initrdRoom(kernel: KernelInfo, ramBelow4G: number): InitrdRoom {
  const start = Math.ceil(kernel.loadEnd / PAGE_SIZE) * PAGE_SIZE;
  const end = Math.min(kernel.initrdAddrMax + 1, ramBelow4G);
  return { start, end, bytes: Math.max(0, end - start), byRam: ramBelow4G <= kernel.initrdAddrMax + 1 };
}

/**
 * Copy an initrd into guest memory: page aligned, as high as possible below
 * min(initrdAddrMax + 1, ramBelow4G), above the kernel.
 */
export function loadInitrd(
  mem: GuestMemory,
  initrd: Uint8Array,
  kernel: KernelInfo,
  ramBelow4G: number,
): { addr: number; size: number } {
  const size = initrd.length;
  const { start: lowest, end: top } = initrdRoom(kernel, ramBelow4G);
  const addr = Math.floor((top - size) / PAGE_SIZE) * PAGE_SIZE;
  if (size === 0 || addr < lowest || !mem.isValid(addr, size)) {
    if (size === 0) throw new GuestTooSmallError("initrd is empty");
    throw new GuestTooSmallError(
      `initrd of ${size} bytes does not fit between the kernel's end ${hex(lowest)} and ${hex(top)}`,
    );
  }
  mem.write(addr, initrd);
  return { addr, size };
}

export interface BootParamsOptions {
  kernel: KernelInfo;
  cmdline: string;
  initrd?: { addr: number; size: number };
  e820: E820Entry[];
  /** Guest address of the ACPI RSDP, handed over in boot_params.acpi_rsdp_addr (protocol 2.14+). */
  acpiRsdp?: number;
}

/** Write the command line at CMDLINE_START and boot_params at ZERO_PAGE_START. */
export function writeBootParams(mem: GuestMemory, opts: BootParamsOptions): void {
  const { kernel } = opts;
  const cmdline = new TextEncoder().encode(opts.cmdline);
  if (cmdline.includes(0)) throw new RangeError("kernel command line contains a NUL byte");
  const hdrCmdlineMax = kernelCmdlineLimit(kernel);
  const limit = Math.min(CMDLINE_MAX_SIZE - 1, hdrCmdlineMax);
  if (cmdline.length > limit) {
    throw new RangeError(`kernel command line is ${cmdline.length} bytes; at most ${limit} fit`);
  }
  if (opts.e820.length > E820_MAX_ENTRIES_ZEROPAGE) {
    throw new RangeError(`${opts.e820.length} e820 entries; the zero page holds ${E820_MAX_ENTRIES_ZEROPAGE}`);
  }

  mem.fill(CMDLINE_START, cmdline.length + 1);
  mem.write(CMDLINE_START, cmdline);

  const zp = ZERO_PAGE_START;
  mem.fill(zp, BOOT_PARAMS_SIZE);
  if (kernel.setupHeader) {
    mem.write(zp + BP_HDR, kernel.setupHeader);
  } else {
    // A minimal header for an ELF kernel: what Linux's startup_64 and setup_arch look at.
    mem.setU16(zp + HDR_BOOT_FLAG, BOOT_FLAG_MAGIC);
    mem.setU32(zp + HDR_HEADER, HDR_MAGIC);
    mem.setU16(zp + HDR_VERSION, PROTOCOL_2_15);
    mem.setU32(zp + HDR_INITRD_ADDR_MAX, kernel.initrdAddrMax);
    mem.setU32(zp + HDR_CMDLINE_SIZE, CMDLINE_MAX_SIZE - 1);
  }
  mem.setU8(zp + HDR_TYPE_OF_LOADER, LOADER_TYPE_UNDEFINED);
  mem.setU8(zp + HDR_LOADFLAGS, mem.getU8(zp + HDR_LOADFLAGS) | LOADFLAG_LOADED_HIGH);
  if (kernel.kind === "bzimage") mem.setU32(zp + HDR_CODE32_START, kernel.loadStart);
  mem.setU32(zp + HDR_CMD_LINE_PTR, CMDLINE_START % TWO_32);
  mem.setU32(zp + BP_EXT_CMD_LINE_PTR, Math.floor(CMDLINE_START / TWO_32));
  if (opts.initrd) {
    const { addr, size } = opts.initrd;
    mem.setU32(zp + HDR_RAMDISK_IMAGE, addr % TWO_32);
    mem.setU32(zp + BP_EXT_RAMDISK_IMAGE, Math.floor(addr / TWO_32));
    mem.setU32(zp + HDR_RAMDISK_SIZE, size % TWO_32);
    mem.setU32(zp + BP_EXT_RAMDISK_SIZE, Math.floor(size / TWO_32));
  }
  if (opts.acpiRsdp !== undefined) mem.setU64(zp + BP_ACPI_RSDP_ADDR, opts.acpiRsdp);

  mem.setU8(zp + BP_E820_ENTRIES, opts.e820.length);
  opts.e820.forEach((e, i) => {
    const at = zp + BP_E820_TABLE + i * E820_ENTRY_SIZE;
    mem.setU64(at + E820_ENTRY_ADDR, e.addr);
    mem.setU64(at + E820_ENTRY_SIZE_FIELD, e.size);
    mem.setU32(at + E820_ENTRY_TYPE, e.type);
  });
}

/** The longest command line (without NUL) the kernel's header accepts. */
function kernelCmdlineLimit(kernel: KernelInfo): number {
  const hdr = kernel.setupHeader;
  if (!hdr || (kernel.protocolVersion ?? 0) < PROTOCOL_2_06) return Infinity;
  const off = HDR_CMDLINE_SIZE - BP_HDR;
  if (hdr.length < off + 4) return Infinity;
  return new DataView(hdr.buffer, hdr.byteOffset, hdr.byteLength).getUint32(off, true);
}
