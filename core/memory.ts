// Guest memory: the one abstraction through which denovm touches guest RAM.
// Every access names a guest-physical address and a length and is checked
// against the regions; nothing else does pointer arithmetic on guest addresses.

import {
  check,
  closeFd,
  cstr,
  F_ADD_SEALS,
  F_SEAL_GROW,
  F_SEAL_SEAL,
  F_SEAL_SHRINK,
  libc,
  MADV_HUGEPAGE,
  MAP_FIXED,
  MAP_NORESERVE,
  MAP_PRIVATE,
  MAP_SHARED,
  MFD_ALLOW_SEALING,
  MFD_CLOEXEC,
  mmap,
  mmapAnonAligned,
  munmap,
  O_NONBLOCK,
  O_RDONLY,
  openFile,
  PROT_READ,
  PROT_WRITE,
  SysError,
} from "../ffi/libc.ts";
import { HostError } from "./exit.ts";
import { fdInfo, fileKind } from "./host_file.ts";
import { MiB } from "./units.ts";

/** x86-64's 2 MiB page: guest RAM's host mapping is aligned to it so KVM can map it with large pages. */
const HUGE_PAGE_SIZE = 2 * MiB;
/** x86-64's base page: mmap(2) takes file offsets in multiples of it. */
export const PAGE_SIZE = 4096;
/** The memfd name of shareable guest RAM (shown in /proc/PID/maps and fd links). */
const SHARED_RAM_NAME = "denovm-guest-ram";

/** An access outside guest RAM, or one that straddles two regions. */
export class GuestMemoryError extends Error {
  constructor(readonly addr: number, readonly length: number) {
    super(`guest memory access out of range: 0x${addr.toString(16)} + ${length}`);
    this.name = "GuestMemoryError";
  }
}

/** How a region can be rebuilt in another thread (Worker): numbers and a host address only. */
export interface RegionDescriptor {
  /** Guest-physical address of the first byte. */
  guestBase: number;
  /** Length in bytes. */
  size: number;
  /** Host virtual address of the first byte. */
  hostAddr: bigint;
  /** For vhost-user: the front end's virtual address of the first byte (vring addresses use it). */
  userAddr?: bigint;
  /** Shareable RAM (OwnedGuestMemory.allocateShared): the file that backs the region, and where in it. */
  fd?: number;
  fileOffset?: number;
}

interface Region extends RegionDescriptor {
  bytes: Uint8Array<ArrayBuffer>;
  view: DataView<ArrayBuffer>;
}

/** Regions of guest memory that are host mappings. */
export class GuestMemory {
  readonly #regions: Region[];

  constructor(descriptors: RegionDescriptor[]) {
    this.#regions = descriptors
      .map((d) => {
        const ptr = Deno.UnsafePointer.create(d.hostAddr);
        if (!ptr) throw new Error("guest memory region with a null host address");
        const ab = Deno.UnsafePointerView.getArrayBuffer(ptr, d.size);
        return { ...d, bytes: new Uint8Array(ab), view: new DataView(ab) };
      })
      .sort((a, b) => a.guestBase - b.guestBase);
    for (let i = 1; i < this.#regions.length; i++) {
      const p = this.#regions[i - 1];
      if (p.guestBase + p.size > this.#regions[i].guestBase) throw new Error("overlapping guest memory regions");
    }
  }

  /** Region descriptors, to rebuild the same view in a Worker. */
  get descriptors(): RegionDescriptor[] {
    return this.#regions.map(({ guestBase, size, hostAddr, userAddr, fd, fileOffset }) => ({
      guestBase,
      size,
      hostAddr,
      userAddr,
      fd,
      fileOffset,
    }));
  }

  /** Total bytes of guest memory. */
  get size(): number {
    return this.#regions.reduce((n, r) => n + r.size, 0);
  }

  #find(addr: number, length: number): [Region, number] {
    if (!Number.isSafeInteger(addr) || !Number.isSafeInteger(length) || addr < 0 || length < 0) {
      throw new GuestMemoryError(addr, length);
    }
    for (const r of this.#regions) {
      if (addr >= r.guestBase && addr < r.guestBase + r.size) {
        const off = addr - r.guestBase;
        if (length > r.size - off) break;
        return [r, off];
      }
    }
    throw new GuestMemoryError(addr, length);
  }

  /** True when [addr, addr+length) lies inside one region. */
  isValid(addr: number, length: number): boolean {
    try {
      this.#find(addr, length);
      return true;
    } catch {
      return false;
    }
  }

  /** A live view of guest bytes (no copy). Writes through it reach the guest. */
  slice(addr: number, length: number): Uint8Array<ArrayBuffer> {
    const [r, off] = this.#find(addr, length);
    return r.bytes.subarray(off, off + length);
  }

  /** A copy of guest bytes. */
  read(addr: number, length: number): Uint8Array<ArrayBuffer> {
    return this.slice(addr, length).slice();
  }

  /** Copy bytes into the guest. */
  write(addr: number, data: Uint8Array): void {
    this.slice(addr, data.length).set(data);
  }

  /** Fill guest bytes with a value. */
  fill(addr: number, length: number, value = 0): void {
    this.slice(addr, length).fill(value);
  }

  /** Host address of guest bytes, for handing to system calls (pread/pwrite into the guest). */
  hostAddress(addr: number, length: number): bigint {
    const [r, off] = this.#find(addr, length);
    return r.hostAddr + BigInt(off);
  }

  /** Translate a vhost-user front end's virtual address to a guest-physical one. */
  userToGuest(userAddr: bigint, length: number): number {
    for (const r of this.#regions) {
      if (r.userAddr === undefined) continue;
      if (userAddr >= r.userAddr && userAddr + BigInt(length) <= r.userAddr + BigInt(r.size)) {
        return r.guestBase + Number(userAddr - r.userAddr);
      }
    }
    throw new GuestMemoryError(Number(userAddr), length);
  }

  getU8(addr: number): number {
    const [r, off] = this.#find(addr, 1);
    return r.view.getUint8(off);
  }
  getU16(addr: number): number {
    const [r, off] = this.#find(addr, 2);
    return r.view.getUint16(off, true);
  }
  getU32(addr: number): number {
    const [r, off] = this.#find(addr, 4);
    return r.view.getUint32(off, true);
  }
  /** A 64-bit value as a bigint (use getU64Number when it is an address or length). */
  getU64(addr: number): bigint {
    const [r, off] = this.#find(addr, 8);
    return r.view.getBigUint64(off, true);
  }
  /** A 64-bit value that must fit a safe integer (guest addresses); larger values throw. */
  getU64Number(addr: number): number {
    const v = this.getU64(addr);
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new GuestMemoryError(Number.MAX_SAFE_INTEGER, 0);
    return Number(v);
  }
  setU8(addr: number, v: number): void {
    const [r, off] = this.#find(addr, 1);
    r.view.setUint8(off, v);
  }
  setU16(addr: number, v: number): void {
    const [r, off] = this.#find(addr, 2);
    r.view.setUint16(off, v, true);
  }
  setU32(addr: number, v: number): void {
    const [r, off] = this.#find(addr, 4);
    r.view.setUint32(off, v, true);
  }
  setU64(addr: number, v: bigint | number): void {
    const [r, off] = this.#find(addr, 8);
    r.view.setBigUint64(off, BigInt(v), true);
  }
}

/** Guest RAM that this process allocated (anonymous mappings), unmapped on close. */
export class OwnedGuestMemory extends GuestMemory {
  readonly #maps: { ptr: Deno.PointerObject; size: number }[];
  /** The memfd of shareable RAM (allocateShared), closed on close(); -1 otherwise. */
  #fd: number;

  private constructor(descs: RegionDescriptor[], maps: { ptr: Deno.PointerObject; size: number }[], fd = -1) {
    super(descs);
    this.#maps = maps;
    this.#fd = fd;
  }

  /**
   * Guest RAM another process can map (a vhost-user back end): one memfd holds every range, each at a
   * file offset that is a multiple of 2 MiB, mapped shared at a 2 MiB-aligned address as allocate() places
   * it. Each region's descriptor carries the fd and its file offset. The file is sealed against shrinking
   * and growing (memfd_create(2) F_SEAL_SHRINK, F_SEAL_GROW, then F_SEAL_SEAL), so no process it is handed
   * to can cut pages from under this one's mappings. Throws HostError when the memfd cannot be made.
   */
  static allocateShared(ranges: { start: number; size: number }[]): OwnedGuestMemory {
    const maps: { ptr: Deno.PointerObject; size: number }[] = [];
    const offsets: number[] = [];
    let total = 0;
    for (const r of ranges) {
      offsets.push(total);
      total += Math.ceil(r.size / HUGE_PAGE_SIZE) * HUGE_PAGE_SIZE;
    }
    let fd = -1;
    try {
      fd = check("memfd_create", libc().memfd_create(cstr(SHARED_RAM_NAME), MFD_CLOEXEC | MFD_ALLOW_SEALING));
      check("ftruncate", libc().ftruncate(fd, BigInt(total)));
      check("fcntl F_ADD_SEALS", libc().fcntl(fd, F_ADD_SEALS, BigInt(F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)));
      const descs: RegionDescriptor[] = [];
      ranges.forEach((r, i) => {
        const ptr = mmapAnonAligned(r.size, HUGE_PAGE_SIZE);
        maps.push({ ptr, size: r.size });
        // The file's pages replace the reservation in place, so the range keeps its alignment.
        mmap(r.size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED | MAP_NORESERVE, fd, offsets[i], ptr);
        libc().madvise(ptr, BigInt(r.size), MADV_HUGEPAGE);
        descs.push({
          guestBase: r.start,
          size: r.size,
          hostAddr: BigInt(Deno.UnsafePointer.value(ptr)),
          fd,
          fileOffset: offsets[i],
        });
      });
      return new OwnedGuestMemory(descs, maps, fd);
    } catch (e) {
      for (const m of maps) munmap(m.ptr, m.size);
      closeFd(fd);
      if (e instanceof SysError) throw new HostError(`shareable guest memory: ${e.message}`);
      throw e;
    }
  }

  /** Whether this RAM can be handed to another process (allocateShared). */
  get shared(): boolean {
    return this.#fd >= 0;
  }

  /** Allocate anonymous memory for each range. */
  static allocate(ranges: { start: number; size: number }[]): OwnedGuestMemory {
    const maps: { ptr: Deno.PointerObject; size: number }[] = [];
    const descs: RegionDescriptor[] = [];
    for (const r of ranges) {
      const ptr = mmapAnonAligned(r.size, HUGE_PAGE_SIZE);
      maps.push({ ptr, size: r.size });
      descs.push({ guestBase: r.start, size: r.size, hostAddr: BigInt(Deno.UnsafePointer.value(ptr)) });
    }
    return new OwnedGuestMemory(descs, maps);
  }

  /**
   * Guest RAM whose contents come from the file at `path`: range i is mapped private (copy-on-write) from
   * the file at `fileOffsets[i]`, at a 2 MiB-aligned host address as allocate() places it. Pages are read
   * from the file when first touched; a write copies the page into this process, so neither the file nor
   * another mapping of it sees it. Throws HostError (one line) when the file cannot be opened, is not a
   * regular file or is shorter than a range needs.
   */
  static mapFile(path: string, ranges: { start: number; size: number }[], fileOffsets: number[]): OwnedGuestMemory {
    if (fileOffsets.length !== ranges.length) {
      throw new Error(`guest memory file: ${ranges.length} ranges, ${fileOffsets.length} file offsets`);
    }
    ranges.forEach((r, i) => {
      const off = fileOffsets[i];
      if (!Number.isSafeInteger(off) || off < 0 || off % PAGE_SIZE !== 0) {
        throw new Error(`guest memory file: offset ${off} of range ${i} is not a multiple of ${PAGE_SIZE}`);
      }
      if (!Number.isSafeInteger(r.size) || r.size <= 0 || r.size % PAGE_SIZE !== 0) {
        throw new Error(`guest memory file: size ${r.size} of range ${i} is not a positive multiple of ${PAGE_SIZE}`);
      }
    });
    let fd: number;
    try {
      // O_NONBLOCK: a FIFO in the file's place cannot hold the open; its kind is refused below.
      fd = openFile(path, O_RDONLY | O_NONBLOCK);
    } catch (e) {
      const reason = e instanceof SysError ? e.message.replace(/^open [^:]*: /, "") : (e as Error).message;
      throw new HostError(`guest memory file "${path}": ${reason}`);
    }
    const maps: { ptr: Deno.PointerObject; size: number }[] = [];
    try {
      const info = fdInfo(fd);
      if (!info.isFile) throw new HostError(`guest memory file "${path}": is ${fileKind(info)}, not a regular file`);
      const needed = ranges.reduce((n, r, i) => Math.max(n, fileOffsets[i] + r.size), 0);
      if (info.size < needed) {
        throw new HostError(`guest memory file "${path}": ${info.size} bytes, shorter than the ${needed} it must hold`);
      }
      const descs: RegionDescriptor[] = [];
      ranges.forEach((r, i) => {
        const ptr = mmapAnonAligned(r.size, HUGE_PAGE_SIZE);
        maps.push({ ptr, size: r.size });
        // The file's pages replace the reservation in place, so the range keeps its alignment.
        mmap(r.size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED | MAP_NORESERVE, fd, fileOffsets[i], ptr);
        descs.push({ guestBase: r.start, size: r.size, hostAddr: BigInt(Deno.UnsafePointer.value(ptr)) });
      });
      return new OwnedGuestMemory(descs, maps);
    } catch (e) {
      for (const m of maps) munmap(m.ptr, m.size);
      if (e instanceof SysError) throw new HostError(`guest memory file "${path}": ${e.message}`);
      throw e;
    } finally {
      closeFd(fd);
    }
  }

  close(): void {
    for (const m of this.#maps.splice(0)) munmap(m.ptr, m.size);
    closeFd(this.#fd);
    this.#fd = -1;
  }

  [Symbol.dispose](): void {
    this.close();
  }
}
