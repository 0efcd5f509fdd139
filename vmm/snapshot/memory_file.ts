// A snapshot's memory file: guest RAM regions laid end to end in guest-address order, raw and sparse. Only
// pages holding a non-zero byte are written; the rest of the file is holes, so a mostly idle guest's memory
// takes little disk and a restore's copy-on-write mapping (core/memory.ts OwnedGuestMemory.mapFile) reads
// zeros from the holes without any disk I/O. It lives here, beside the state file's format, because the
// layout is the snapshot's: device code only ever reads memory, through GuestMemory.

import type { GuestMemory } from "../../core/memory.ts";
import { PAGE_SIZE } from "../../core/memory.ts";
import { check, closeFd, libc, O_CREAT, O_EXCL, O_WRONLY, openFile } from "../../ffi/libc.ts";

/** Where one guest RAM region lies in the memory file. */
export interface MemoryFileRegion {
  /** Guest-physical address of the region's first byte. */
  guestBase: number;
  /** Bytes: a multiple of PAGE_SIZE. */
  size: number;
  /** Offset of the region's first byte in the file: the sum of the earlier regions' sizes. */
  fileOffset: number;
}

/** The memory file's layout for `memory`: its regions in guest-address order, end to end. */
export function memoryFileLayout(memory: GuestMemory): { size: number; regions: MemoryFileRegion[] } {
  const regions: MemoryFileRegion[] = [];
  let offset = 0;
  for (const d of [...memory.descriptors].sort((a, b) => a.guestBase - b.guestBase)) {
    if (d.size % PAGE_SIZE !== 0) {
      throw new Error(`guest memory region at 0x${d.guestBase.toString(16)}: ${d.size} bytes, not whole pages`);
    }
    regions.push({ guestBase: d.guestBase, size: d.size, fileOffset: offset });
    offset += d.size;
  }
  return { size: offset, regions };
}

/** 8-byte words per page: the scan compares a word at a time. */
const WORDS_PER_PAGE = PAGE_SIZE / BigUint64Array.BYTES_PER_ELEMENT;

/**
 * Writes `memory` to a new file at `path` (it must not exist: a file that a running clone maps must never be
 * written in place, since a private mapping still shows the file's later changes in the pages it has not
 * copied). The file is sized to the whole memory first; then each run of pages holding a non-zero byte is
 * written with one pwrite, and the file is fsynced. On failure the file is removed. Returns the file's size and
 * the bytes actually written.
 */
export function writeMemoryFile(memory: GuestMemory, path: string): { size: number; bytesWritten: number } {
  const { size, regions } = memoryFileLayout(memory);
  const fd = openFile(path, O_WRONLY | O_CREAT | O_EXCL, 0o600);
  const lc = libc();
  let bytesWritten = 0;
  try {
    check(`ftruncate ${path}`, lc.ftruncate(fd, BigInt(size)));
    const writeRun = (hostAddr: bigint, fileOffset: number, length: number) => {
      let done = 0;
      while (done < length) {
        const at = Deno.UnsafePointer.create(hostAddr + BigInt(done));
        const n = Number(
          check(`pwrite ${path}`, lc.pwrite_ptr(fd, at, BigInt(length - done), BigInt(fileOffset + done))),
        );
        if (n === 0) throw new Error(`pwrite ${path}: wrote nothing at offset ${fileOffset + done}`);
        done += n;
      }
      bytesWritten += length;
    };
    for (const r of regions) {
      const bytes = memory.slice(r.guestBase, r.size);
      const words = new BigUint64Array(bytes.buffer, bytes.byteOffset, r.size / BigUint64Array.BYTES_PER_ELEMENT);
      const hostAddr = memory.hostAddress(r.guestBase, r.size);
      const pages = r.size / PAGE_SIZE;
      let runStart = -1;
      for (let p = 0; p < pages; p++) {
        const first = p * WORDS_PER_PAGE;
        const end = first + WORDS_PER_PAGE;
        let nonZero = false;
        for (let w = first; w < end; w++) {
          if (words[w] !== 0n) {
            nonZero = true;
            break;
          }
        }
        if (nonZero) {
          if (runStart < 0) runStart = p;
        } else if (runStart >= 0) {
          writeRun(
            hostAddr + BigInt(runStart * PAGE_SIZE),
            r.fileOffset + runStart * PAGE_SIZE,
            (p - runStart) * PAGE_SIZE,
          );
          runStart = -1;
        }
      }
      if (runStart >= 0) {
        writeRun(
          hostAddr + BigInt(runStart * PAGE_SIZE),
          r.fileOffset + runStart * PAGE_SIZE,
          (pages - runStart) * PAGE_SIZE,
        );
      }
    }
    check(`fsync ${path}`, lc.fsync(fd));
  } catch (e) {
    closeFd(fd);
    try {
      Deno.removeSync(path);
    } catch {
      // Already gone: nothing to clean.
    }
    throw e;
  }
  closeFd(fd);
  return { size, bytesWritten };
}
