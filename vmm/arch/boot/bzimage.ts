// bzImage loader: Linux x86 boot protocol (Documentation/arch/x86/boot.rst), 64-bit entry.

import type { GuestMemory } from "../../../core/memory.ts";
import { HIGH_MEMORY_START, KERNEL_START, MMIO_HOLE_END, MMIO_HOLE_START } from "../layout.ts";
import {
  BOOT_FLAG_MAGIC,
  BP_HDR_ROOM_END,
  HDR_BOOT_FLAG,
  HDR_HEADER,
  HDR_INIT_SIZE,
  HDR_INITRD_ADDR_MAX,
  HDR_JUMP,
  HDR_KERNEL_ALIGNMENT,
  HDR_MAGIC,
  HDR_PREF_ADDRESS,
  HDR_RELOCATABLE_KERNEL,
  HDR_SETUP_SECTS,
  HDR_SYSSIZE,
  HDR_VERSION,
  HDR_XLOADFLAGS,
  INITRD_ADDR_MAX_DEFAULT,
  PARAGRAPH,
  PROTOCOL_2_03,
  PROTOCOL_2_05,
  PROTOCOL_2_06,
  PROTOCOL_2_10,
  PROTOCOL_2_12,
  SECTOR_SIZE,
  SETUP_SECTS_DEFAULT,
  STARTUP_64_OFFSET,
  XLF_KERNEL_64,
} from "./bootparam.ts";
import { GuestTooSmallError, hex, KernelFormatError } from "./errors.ts";
import type { KernelInfo } from "./types.ts";

/** True when the image carries the "HdrS" setup header magic. */
export function isBzImage(image: Uint8Array): boolean {
  if (image.length < HDR_HEADER + 4) return false;
  return view(image).getUint32(HDR_HEADER, true) === HDR_MAGIC;
}

function view(image: Uint8Array): DataView {
  return new DataView(image.buffer, image.byteOffset, image.byteLength);
}

function versionString(v: number): string {
  return `${v >> 8}.${(v & 0xff).toString().padStart(2, "0")}`;
}

/** Load a bzImage's protected-mode kernel into guest memory. */
export function loadBzImage(mem: GuestMemory, image: Uint8Array): KernelInfo {
  if (!isBzImage(image)) throw new KernelFormatError('not a bzImage: no "HdrS" magic at 0x202');
  const dv = view(image);
  // The header ends at 0x202 + the displacement of the short jump at 0x200 (boot.rst).
  const hdrEnd = Math.min(HDR_HEADER + image[HDR_JUMP + 1], BP_HDR_ROOM_END);
  if (image.length < hdrEnd) {
    throw new KernelFormatError(`bzImage truncated inside its setup header (${image.length} bytes)`);
  }
  const version = dv.getUint16(HDR_VERSION, true);
  if (version < PROTOCOL_2_06) {
    throw new KernelFormatError(`bzImage boot protocol ${versionString(version)} is too old (2.06 or newer needed)`);
  }
  if (dv.getUint16(HDR_BOOT_FLAG, true) !== BOOT_FLAG_MAGIC) {
    throw new KernelFormatError("bzImage setup header has no 0xAA55 boot flag at 0x1fe");
  }
  if (version >= PROTOCOL_2_12 && (dv.getUint16(HDR_XLOADFLAGS, true) & XLF_KERNEL_64) === 0) {
    throw new KernelFormatError("bzImage is not a 64-bit kernel (xloadflags lacks XLF_KERNEL_64)");
  }

  const setupSects = image[HDR_SETUP_SECTS] || SETUP_SECTS_DEFAULT;
  const setupSize = (setupSects + 1) * SECTOR_SIZE;
  const kernelSize = dv.getUint32(HDR_SYSSIZE, true) * PARAGRAPH;
  if (kernelSize === 0) throw new KernelFormatError("bzImage has an empty protected-mode kernel (syssize 0)");
  if (image.length < setupSize + kernelSize) {
    throw new KernelFormatError(
      `bzImage truncated: ${image.length} bytes, its header says ${setupSize + kernelSize}`,
    );
  }

  const relocatable = version >= PROTOCOL_2_05 && image[HDR_RELOCATABLE_KERNEL] !== 0;
  let loadStart: number;
  if (relocatable) {
    const align = dv.getUint32(HDR_KERNEL_ALIGNMENT, true) || 1;
    loadStart = Math.ceil(KERNEL_START / align) * align;
  } else if (version >= PROTOCOL_2_10) {
    const pref = dv.getBigUint64(HDR_PREF_ADDRESS, true);
    if (pref > BigInt(Number.MAX_SAFE_INTEGER)) throw new KernelFormatError(`bzImage pref_address ${pref} is absurd`);
    loadStart = Number(pref);
  } else {
    loadStart = HIGH_MEMORY_START;
  }
  if (loadStart < HIGH_MEMORY_START) {
    throw new KernelFormatError(`bzImage wants to be loaded at ${hex(loadStart)}, below 1 MiB`);
  }
  const initSize = version >= PROTOCOL_2_10 ? dv.getUint32(HDR_INIT_SIZE, true) : 0;
  const loadEnd = loadStart + Math.max(kernelSize, initSize);
  if (loadStart < MMIO_HOLE_END && loadEnd > MMIO_HOLE_START) {
    throw new KernelFormatError(
      `bzImage's kernel at ${hex(loadStart)}..${hex(loadEnd)} lies in the 32-bit device hole ` +
        `${hex(MMIO_HOLE_START)}..${hex(MMIO_HOLE_END)}`,
    );
  }
  if (!mem.isValid(loadStart, loadEnd - loadStart)) {
    throw new GuestTooSmallError(
      `kernel needs guest RAM ${hex(loadStart)}..${hex(loadEnd)} (${loadEnd - loadStart} bytes at load address); ` +
        `guest has ${mem.size} bytes`,
    );
  }
  mem.write(loadStart, image.subarray(setupSize, setupSize + kernelSize));
  mem.fill(loadStart + kernelSize, loadEnd - loadStart - kernelSize);

  return {
    kind: "bzimage",
    entry: loadStart + STARTUP_64_OFFSET,
    loadStart,
    loadEnd,
    setupHeader: image.slice(HDR_SETUP_SECTS, hdrEnd),
    initrdAddrMax: version >= PROTOCOL_2_03 ? dv.getUint32(HDR_INITRD_ADDR_MAX, true) : INITRD_ADDR_MAX_DEFAULT,
    protocolVersion: version,
  };
}
