// The raw-file disk back end: the image file is the disk, byte for byte. Data moves with pread/pwrite
// straight between the file and guest memory (no copy through JS). The image is locked against other
// writers, is never truncated, and grows only through resize().

import type { GuestMemory } from "../../../core/memory.ts";
import type { GuestBuffer } from "../queue.ts";
import { type Disk, DiskError, SECTOR_SIZE } from "./disk.ts";
import { fdInfo, openUserFile } from "../../../core/host_file.ts";
import { HostError } from "../../../core/exit.ts";
import {
  check,
  closeFd,
  EAGAIN,
  EINTR,
  EINVAL,
  EOPNOTSUPP,
  errno,
  F_GETFL,
  F_SETFL,
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
  libc,
  LOCK_EX,
  LOCK_NB,
  LOCK_SH,
  O_DIRECT,
  O_RDONLY,
  O_RDWR,
  strerror,
  SysError,
} from "../../../ffi/libc.ts";

/** Zeroes written per pwrite when the filesystem has no fallocate mode for write-zeroes. */
const ZERO_CHUNK = 1 << 20;

export interface RawDiskOptions {
  path: string;
  readOnly: boolean;
  /** Open with O_DIRECT (bypass the host page cache); a filesystem that refuses it gets the page cache. */
  direct: boolean;
  /** Take an flock on the image (exclusive when writable, shared when read-only); default true. */
  lock?: boolean;
}

/**
 * The image's lock could not be taken (another process holds it). crosvm fails the same way
 * (disk/src/sys/linux.rs open_raw_disk_image: flock, Error::LockFileFailure) and exits with its
 * generic error code 1 from `run` and `device block` alike, so this is a HostError.
 */
export class DiskLockedError extends HostError {
  constructor(message: string) {
    super(message);
    this.name = "DiskLockedError";
  }
}

export class RawDisk implements Disk {
  readonly path: string;
  readonly readOnly: boolean;
  #capacityBytes: number;
  #fd: number;
  #direct: boolean;
  #directFallbacks = 0;

  constructor(opts: RawDiskOptions) {
    const { path, readOnly } = opts;
    this.path = path;
    this.readOnly = readOnly;
    const flags = readOnly ? O_RDONLY : O_RDWR;
    this.#direct = opts.direct;
    // A disk is a regular file or a block device; the open cannot block on a FIFO (core/host_file.ts).
    const open = (f: number) => openUserFile(path, f, "disk image", "regular-or-block").fd;
    if (opts.direct) {
      try {
        this.#fd = open(flags | O_DIRECT);
      } catch (e) {
        if (!(e instanceof SysError) || e.errno !== EINVAL) throw e;
        console.warn(`block ${path}: the filesystem refuses O_DIRECT; using the page cache`);
        this.#direct = false;
        this.#fd = open(flags);
      }
    } else {
      this.#fd = open(flags);
    }
    // As crosvm's lock=true: one writer or many readers per image, so two VMs never write one disk.
    if (opts.lock ?? true) {
      if (libc().flock(this.#fd, (readOnly ? LOCK_SH : LOCK_EX) | LOCK_NB) < 0) {
        const e = errno();
        closeFd(this.#fd);
        this.#fd = -1;
        throw new DiskLockedError(
          e === EAGAIN
            ? `disk image ${path} is in use by another process (${
              readOnly ? "a writer" : "a reader or writer"
            } holds its lock)`
            : `cannot lock disk image ${path}: ${strerror(e)}`,
        );
      }
    }
    const size = imageSize(this.#fd);
    this.#capacityBytes = size - (size % SECTOR_SIZE);
  }

  get capacityBytes(): number {
    return this.#capacityBytes;
  }

  get direct(): boolean {
    return this.#direct;
  }

  read(mem: GuestMemory, segs: readonly GuestBuffer[], offset: number): void {
    this.#io(mem, "read", segs, offset);
  }

  write(mem: GuestMemory, segs: readonly GuestBuffer[], offset: number): void {
    this.#io(mem, "write", segs, offset);
  }

  flush(): void {
    if (!this.readOnly) this.#sys("fdatasync", libc().fdatasync(this.#fd));
  }

  discard(offset: number, len: number): void {
    if (len === 0) return;
    const ret = libc().fallocate(this.#fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, BigInt(offset), BigInt(len));
    // Discard is a hint: a filesystem that cannot punch holes keeps the data.
    if (ret < 0 && errno() !== EOPNOTSUPP) throw new SysError("fallocate PUNCH_HOLE", errno());
  }

  writeZeroes(offset: number, len: number, unmap: boolean): void {
    if (len === 0) return;
    const lc = libc();
    const mode = unmap ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE : FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
    if (lc.fallocate(this.#fd, mode, BigInt(offset), BigInt(len)) === 0) return;
    if (errno() !== EOPNOTSUPP) throw new SysError("fallocate", errno());
    // No fallocate mode here: write zeroes.
    const chunk = new Uint8Array(Math.min(len, ZERO_CHUNK));
    for (let done = 0; done < len;) {
      const n = Math.min(chunk.length, len - done);
      const ret = Number(lc.pwrite(this.#fd, chunk, BigInt(n), BigInt(offset + done)));
      if (ret < 0 && errno() === EINTR) continue;
      if (ret <= 0) throw new SysError("pwrite zeroes", errno());
      done += ret;
    }
  }

  /** Extend the file (sparse) to `bytes`. */
  resize(bytes: number): void {
    if (this.readOnly) throw new Error(`disk ${this.path} is read-only`);
    if (!Number.isSafeInteger(bytes) || bytes % SECTOR_SIZE !== 0 || bytes < this.#capacityBytes) {
      throw new RangeError(`disk ${this.path}: cannot resize ${this.#capacityBytes} bytes to ${bytes}`);
    }
    check("ftruncate", libc().ftruncate(this.#fd, BigInt(bytes)));
    this.#capacityBytes = bytes;
  }

  close(): void {
    if (this.#fd >= 0) closeFd(this.#fd);
    this.#fd = -1;
  }

  stats(): Record<string, number> {
    return { directFallbacks: this.#directFallbacks };
  }

  /** pread/pwrite each guest buffer in place, retrying short transfers and EINTR. */
  #io(mem: GuestMemory, op: "read" | "write", segs: readonly GuestBuffer[], offset: number): void {
    let off = offset;
    for (const s of segs) {
      let done = 0;
      while (done < s.len) {
        const ptr = Deno.UnsafePointer.create(mem.hostAddress(s.addr + done, s.len - done));
        const n = s.len - done;
        let ret = Number(
          op === "read"
            ? libc().pread_ptr(this.#fd, ptr, BigInt(n), BigInt(off))
            : libc().pwrite_ptr(this.#fd, ptr, BigInt(n), BigInt(off)),
        );
        if (ret < 0) {
          const e = errno();
          if (e === EINTR) continue;
          if (e === EINVAL && this.#direct) {
            ret = this.#buffered(op, ptr, n, off);
          } else {
            throw new SysError(op === "read" ? "pread" : "pwrite", e);
          }
        }
        if (ret === 0) {
          if (op === "write") throw new DiskError(`pwrite at ${off} wrote nothing`);
          mem.fill(s.addr + done, n); // the image shrank under us: the rest reads as zeroes
          ret = n;
        }
        done += ret;
        off += ret;
      }
    }
  }

  /** One transfer without O_DIRECT, for guest buffers that O_DIRECT's alignment rules refuse. */
  #buffered(op: "read" | "write", ptr: Deno.PointerValue, n: number, off: number): number {
    const lc = libc();
    const fl = this.#sys("fcntl F_GETFL", lc.fcntl(this.#fd, F_GETFL, 0n));
    this.#sys("fcntl F_SETFL", lc.fcntl(this.#fd, F_SETFL, BigInt(fl & ~O_DIRECT)));
    try {
      this.#directFallbacks++;
      for (;;) {
        const ret = Number(
          op === "read"
            ? lc.pread_ptr(this.#fd, ptr, BigInt(n), BigInt(off))
            : lc.pwrite_ptr(this.#fd, ptr, BigInt(n), BigInt(off)),
        );
        if (ret < 0 && errno() === EINTR) continue;
        return this.#sys(op === "read" ? "pread" : "pwrite", ret);
      }
    } finally {
      lc.fcntl(this.#fd, F_SETFL, BigInt(fl));
    }
  }

  #sys(call: string, ret: number | bigint): number {
    if (ret < 0) throw new SysError(call, errno());
    return Number(ret);
  }
}

/** The size of the image open at `fd`: a regular file's from fstat, a block device's from seeking to its end. */
function imageSize(fd: number): number {
  const info = fdInfo(fd);
  if (!info.isBlockDevice) return info.size;
  using dev = Deno.openSync(`/proc/self/fd/${fd}`, { read: true });
  return dev.seekSync(0, Deno.SeekMode.End);
}
