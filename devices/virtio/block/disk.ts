// The disk interface virtio-blk serves requests from: an image format opens its file and moves bytes
// between the image and guest memory; the device (device.ts) parses the virtio requests, checks them
// against the capacity and turns them into these calls. The raw-file back end is raw.ts; another image
// format implements Disk beside it.

import type { GuestMemory } from "../../../core/memory.ts";
import type { GuestBuffer } from "../queue.ts";

/** Capacity and request sectors are always 512 bytes (virtio 1.2 section 5.2.6). */
export const SECTOR_SIZE = 512;

/** A back-end I/O failure: the request completes with VIRTIO_BLK_S_IOERR. */
export class DiskError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "DiskError";
  }
}

/**
 * An open disk image. Offsets and lengths are bytes, already checked by the device to lie inside
 * `capacityBytes` and to be whole sectors. Failures throw DiskError or ffi SysError.
 */
export interface Disk {
  /** Where the image is, for logs and the default GET_ID serial. */
  readonly path: string;
  readonly readOnly: boolean;
  /** Bytes the guest sees: whole 512-byte sectors. */
  readonly capacityBytes: number;
  /** Whether the image is read and written past the host page cache (O_DIRECT). */
  readonly direct: boolean;
  /** Read `offset..` of the image into the guest buffers `segs`, in order. */
  read(mem: GuestMemory, segs: readonly GuestBuffer[], offset: number): void;
  /** Write the guest buffers `segs`, in order, to `offset..` of the image. */
  write(mem: GuestMemory, segs: readonly GuestBuffer[], offset: number): void;
  /** Make every completed write durable. */
  flush(): void;
  /** The guest no longer needs `len` bytes at `offset`: the image may release them (a hint). */
  discard(offset: number, len: number): void;
  /** Make `len` bytes at `offset` read as zeroes; `unmap` lets the image release them. */
  writeZeroes(offset: number, len: number, unmap: boolean): void;
  /** Grow the image to `bytes` (a whole number of sectors, not less than capacityBytes). */
  resize(bytes: number): void;
  /** Release the image (its fd and lock). */
  close(): void;
  /** The back end's own counters (merged into the device's stats). */
  stats(): Record<string, number>;
}
