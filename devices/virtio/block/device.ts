// virtio-blk (virtio 1.2 spec, section 5.2; Linux include/uapi/linux/virtio_blk.h): the request parsing.
// Requests are served synchronously in queueNotify: each is checked against the disk's capacity and the
// negotiated features, then handed to the disk back end (disk.ts; the raw file of raw.ts by default),
// which moves the data between the image and guest memory.

import {
  type ActivateContext,
  checkSavedIdentity,
  featuresField,
  readConfigSpace,
  serveQueue,
  stateCounters,
  VIRTIO_COMMON_FEATURES,
  VIRTIO_ID_BLOCK,
  type VirtioDevice,
} from "../device.ts";
import { ChainError, type ChainReader, type DescriptorChain, type Virtqueue } from "../queue.ts";
import { RateLimitedLog } from "../../../core/log.ts";
import type { GuestMemory } from "../../../core/memory.ts";
import { SysError } from "../../../ffi/libc.ts";
import { type DeviceState, stateData, StateError, type Stateful, stateRecord } from "../../../core/state.ts";
import { type Disk, DiskError, SECTOR_SIZE } from "./disk.ts";
import { RawDisk } from "./raw.ts";

// ---- Feature bits (virtio_blk.h) ----
export const VIRTIO_BLK_F_SIZE_MAX = 1n << 1n;
export const VIRTIO_BLK_F_SEG_MAX = 1n << 2n;
export const VIRTIO_BLK_F_RO = 1n << 5n;
export const VIRTIO_BLK_F_BLK_SIZE = 1n << 6n;
export const VIRTIO_BLK_F_FLUSH = 1n << 9n;
export const VIRTIO_BLK_F_DISCARD = 1n << 13n;
export const VIRTIO_BLK_F_WRITE_ZEROES = 1n << 14n;

// ---- Request types and status (virtio_blk.h) ----
export const VIRTIO_BLK_T_IN = 0;
export const VIRTIO_BLK_T_OUT = 1;
export const VIRTIO_BLK_T_FLUSH = 4;
export const VIRTIO_BLK_T_GET_ID = 8;
export const VIRTIO_BLK_T_DISCARD = 11;
export const VIRTIO_BLK_T_WRITE_ZEROES = 13;
export const VIRTIO_BLK_S_OK = 0;
export const VIRTIO_BLK_S_IOERR = 1;
export const VIRTIO_BLK_S_UNSUPP = 2;
/** VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP (virtio_blk.h). */
export const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1;
/** VIRTIO_BLK_ID_BYTES (virtio_blk.h): GET_ID answers 20 bytes. */
export const VIRTIO_BLK_ID_BYTES = 20;
export { SECTOR_SIZE };
/** log2(SECTOR_SIZE): a sector number to a byte offset. */
const SECTOR_SHIFT = 9n;

/** struct virtio_blk_outhdr: le32 type, le32 ioprio, le64 sector. */
export const BLK_OUTHDR_SIZE = 16;
/** struct virtio_blk_discard_write_zeroes: le64 sector, le32 num_sectors, le32 flags. */
export const BLK_DISCARD_SEG_SIZE = 16;
const SEG_SECTOR = 0;
const SEG_NUM_SECTORS = 8;
const SEG_FLAGS = 12;

/** struct virtio_blk_config offsets (virtio_blk.h, packed). */
export const BLK_CFG_CAPACITY = 0; // le64
export const BLK_CFG_SIZE_MAX = 8; // le32
export const BLK_CFG_SEG_MAX = 12; // le32
export const BLK_CFG_BLK_SIZE = 20; // le32 (after the 4-byte geometry at 16)
export const BLK_CFG_MAX_DISCARD_SECTORS = 36; // le32
export const BLK_CFG_MAX_DISCARD_SEG = 40; // le32
export const BLK_CFG_DISCARD_SECTOR_ALIGNMENT = 44; // le32
export const BLK_CFG_MAX_WRITE_ZEROES_SECTORS = 48; // le32
export const BLK_CFG_MAX_WRITE_ZEROES_SEG = 52; // le32
export const BLK_CFG_WRITE_ZEROES_MAY_UNMAP = 56; // u8
/** Size of the config up to and including the write-zeroes fields (unused1[3] pads to 60). */
export const BLK_CONFIG_SIZE = 60;

/** One request queue of 256 entries, like crosvm and Firecracker. */
export const BLOCK_QUEUE_SIZE = 256;
/** Segments a request may carry: the queue size less the header and status descriptors (as crosvm). */
const SEG_MAX = BLOCK_QUEUE_SIZE - 2;
/** Sectors one discard / write-zeroes segment may cover: its byte count fits 32 bits (as crosvm). */
const MAX_DISCARD_SECTORS = Math.floor(0xffff_ffff / SECTOR_SIZE);
/** Segments one discard / write-zeroes request may carry (announced in config). */
const MAX_DISCARD_SEG = 32;

export interface BlockOptions {
  /** The image file (a raw image unless `disk` is given). */
  path: string;
  readOnly: boolean;
  /** Offer DISCARD/WRITE_ZEROES and punch holes for them. */
  sparse: boolean;
  /** Logical block size announced to the guest (power of 2, >= 512). */
  blockSize: number;
  /** Serial for GET_ID; the file's name when absent. */
  id?: string;
  /** Open with O_DIRECT (bypass the host page cache). */
  direct: boolean;
  /** Take an flock on the image (exclusive when writable, shared when read-only); default true. */
  lock?: boolean;
  /** An open back end to serve instead of opening `path` as a raw image (`direct` and `lock` are then its own). */
  disk?: Disk;
}

const STAT_NAMES = [
  "reads",
  "writes",
  "bytesRead",
  "bytesWritten",
  "flushes",
  "discards",
  "writeZeroes",
  "getIds",
  "errors",
  "unsupported",
  "malformed",
] as const;
type StatName = typeof STAT_NAMES[number];

/** A request the device answers with a status (not a malformed chain). */
class RequestError extends Error {
  constructor(readonly status: number, msg: string) {
    super(msg);
  }
}

/** The kind and layout version of a virtio-blk device's saved state. */
export const BLOCK_STATE_TYPE = "virtio-blk";
export const BLOCK_STATE_VERSION = 1;

export class BlockDevice implements VirtioDevice, Stateful {
  readonly deviceType = VIRTIO_ID_BLOCK;
  readonly name = "block";
  readonly queueMaxSizes: readonly number[] = [BLOCK_QUEUE_SIZE];
  readonly features: bigint;
  readonly path: string;
  readonly readOnly: boolean;
  readonly sparse: boolean;
  readonly blockSize: number;
  readonly #disk: Disk;
  readonly #id: Uint8Array;
  #mem: GuestMemory | undefined;
  #queue: Virtqueue | undefined;
  #interrupt: ActivateContext["interrupt"] | undefined;
  #acked = 0n;
  readonly #log = new RateLimitedLog("virtio-blk");
  readonly #stats: Record<StatName, number> = Object.fromEntries(STAT_NAMES.map((n) => [n, 0])) as Record<
    StatName,
    number
  >;

  constructor(opts: BlockOptions) {
    const { path, readOnly, sparse, blockSize } = opts;
    if (!Number.isInteger(blockSize) || blockSize < SECTOR_SIZE || (blockSize & (blockSize - 1)) !== 0) {
      throw new Error(`block: block size ${blockSize} is not a power of 2 >= ${SECTOR_SIZE}`);
    }
    this.path = path;
    this.readOnly = readOnly;
    this.sparse = sparse;
    this.blockSize = blockSize;
    this.#disk = opts.disk ?? new RawDisk({ path, readOnly, direct: opts.direct, lock: opts.lock });
    const idText = opts.id ?? path.split("/").pop() ?? "";
    this.#id = new Uint8Array(VIRTIO_BLK_ID_BYTES);
    this.#id.set(new TextEncoder().encode(idText).subarray(0, VIRTIO_BLK_ID_BYTES));
    let f = VIRTIO_COMMON_FEATURES | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH;
    if (readOnly) f |= VIRTIO_BLK_F_RO;
    if (sparse && !readOnly) f |= VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES;
    this.features = f;
  }

  /** Bytes the guest sees (the image's size rounded down to whole sectors). */
  get capacityBytes(): number {
    return this.#disk.capacityBytes;
  }

  /**
   * Grow the disk to `bytes` (crosvm `disk resize`): the image file is extended (sparse) and the
   * guest is told through a config-change interrupt. Shrinking is refused: it would cut off data
   * on the user's image.
   */
  resize(bytes: number): void {
    if (this.readOnly) throw new Error(`disk ${this.path} is read-only`);
    if (!Number.isSafeInteger(bytes) || bytes % SECTOR_SIZE !== 0) {
      throw new Error(`new size ${bytes} is not a whole number of ${SECTOR_SIZE}-byte sectors`);
    }
    if (bytes < this.capacityBytes) {
      throw new Error(`disk ${this.path} is ${this.capacityBytes} bytes; shrinking it would lose data`);
    }
    if (bytes === this.capacityBytes) return;
    this.#disk.resize(bytes);
    this.#interrupt?.signalConfigChange();
  }

  /** Whether the image is really open with O_DIRECT. */
  get direct(): boolean {
    return this.#disk.direct;
  }

  #config(): Uint8Array {
    const b = new Uint8Array(BLK_CONFIG_SIZE);
    const v = new DataView(b.buffer);
    v.setBigUint64(BLK_CFG_CAPACITY, BigInt(this.capacityBytes / SECTOR_SIZE), true);
    v.setUint32(BLK_CFG_SEG_MAX, SEG_MAX, true);
    v.setUint32(BLK_CFG_BLK_SIZE, this.blockSize, true);
    if (this.features & VIRTIO_BLK_F_DISCARD) {
      v.setUint32(BLK_CFG_MAX_DISCARD_SECTORS, MAX_DISCARD_SECTORS, true);
      v.setUint32(BLK_CFG_MAX_DISCARD_SEG, MAX_DISCARD_SEG, true);
      v.setUint32(BLK_CFG_DISCARD_SECTOR_ALIGNMENT, this.blockSize / SECTOR_SIZE, true);
    }
    if (this.features & VIRTIO_BLK_F_WRITE_ZEROES) {
      v.setUint32(BLK_CFG_MAX_WRITE_ZEROES_SECTORS, MAX_DISCARD_SECTORS, true);
      v.setUint32(BLK_CFG_MAX_WRITE_ZEROES_SEG, MAX_DISCARD_SEG, true);
      v.setUint8(BLK_CFG_WRITE_ZEROES_MAY_UNMAP, 1);
    }
    return b;
  }

  readConfig(offset: number, data: Uint8Array): void {
    readConfigSpace(this.#config(), offset, data);
  }

  writeConfig(offset: number, data: Uint8Array): void {
    // Every field we offer is read-only (writeback mode, CONFIG_WCE, is not offered).
    this.#log.log(`driver wrote ${data.length} bytes of read-only config at ${offset}; ignored`);
  }

  activate(ctx: ActivateContext): void {
    this.#mem = ctx.mem;
    this.#queue = ctx.queues[0];
    this.#interrupt = ctx.interrupt;
    this.#acked = ctx.ackedFeatures;
  }

  reset(): void {
    this.#mem = undefined;
    this.#queue = undefined;
    this.#interrupt = undefined;
    this.#acked = 0n;
  }

  close(): void {
    this.reset();
    this.#disk.close();
  }

  stats(): Record<string, number> {
    return { ...this.#stats, ...this.#disk.stats() };
  }

  queueNotify(index: number): void {
    const q = this.#queue;
    if (index !== 0 || !q) return;
    serveQueue(q, 0, this.#interrupt, (chain) => this.#process(chain));
  }

  /** Serve one request; returns the number of bytes written into the chain. */
  #process(chain: DescriptorChain): number {
    const mem = this.#mem!;
    // The status byte is the last writable byte (section 5.2.6).
    if (chain.writableLength < 1 || chain.readableLength < BLK_OUTHDR_SIZE) {
      this.#stats.malformed++;
      this.#log.log(`request at head ${chain.head} has no header or no status byte; dropped`);
      return 0;
    }
    const writer = chain.writer();
    const statusAt = writer.remaining - 1;
    let status = VIRTIO_BLK_S_OK;
    let dataIn = 0;
    try {
      const r = chain.reader();
      const type = r.readU32();
      r.readU32(); // ioprio: ignored
      const sector = r.readU64();
      dataIn = this.#request(mem, type, sector, r, chain, writer, statusAt);
    } catch (e) {
      if (e instanceof RequestError) {
        status = e.status;
        if (status === VIRTIO_BLK_S_UNSUPP) this.#stats.unsupported++;
        else this.#stats.errors++;
        this.#log.log(e.message);
      } else if (e instanceof ChainError || e instanceof DiskError || e instanceof SysError) {
        status = VIRTIO_BLK_S_IOERR;
        this.#stats.errors++;
        this.#log.log(`request at head ${chain.head}: ${e.message}`);
      } else {
        throw e;
      }
      dataIn = 0;
    }
    // Status goes in the last writable byte whatever was written before it.
    const w = chain.writer();
    w.skip(statusAt);
    w.writeU8(status);
    return dataIn + 1;
  }

  /** Serve a parsed request; returns bytes written before the status byte. Throws RequestError. */
  #request(
    mem: GuestMemory,
    type: number,
    sector: bigint,
    r: ChainReader,
    chain: DescriptorChain,
    w: ReturnType<DescriptorChain["writer"]>,
    dataInLen: number,
  ): number {
    switch (type) {
      case VIRTIO_BLK_T_IN: {
        const off = this.#range(sector, dataInLen);
        this.#disk.read(mem, w.segments(dataInLen), off);
        this.#stats.reads++;
        this.#stats.bytesRead += dataInLen;
        return dataInLen;
      }
      case VIRTIO_BLK_T_OUT: {
        if (this.readOnly) throw new RequestError(VIRTIO_BLK_S_IOERR, `write to a read-only disk (head ${chain.head})`);
        const len = r.remaining;
        const off = this.#range(sector, len);
        this.#disk.write(mem, r.segments(len), off);
        this.#stats.writes++;
        this.#stats.bytesWritten += len;
        return 0;
      }
      case VIRTIO_BLK_T_FLUSH: {
        this.#disk.flush();
        this.#stats.flushes++;
        return 0;
      }
      case VIRTIO_BLK_T_GET_ID: {
        if (dataInLen < VIRTIO_BLK_ID_BYTES) {
          throw new RequestError(VIRTIO_BLK_S_IOERR, `GET_ID with ${dataInLen} bytes of buffer`);
        }
        w.write(this.#id);
        this.#stats.getIds++;
        return VIRTIO_BLK_ID_BYTES;
      }
      case VIRTIO_BLK_T_DISCARD:
      case VIRTIO_BLK_T_WRITE_ZEROES: {
        const discard = type === VIRTIO_BLK_T_DISCARD;
        const feature = discard ? VIRTIO_BLK_F_DISCARD : VIRTIO_BLK_F_WRITE_ZEROES;
        if (!(this.#acked & feature)) {
          throw new RequestError(VIRTIO_BLK_S_UNSUPP, `${discard ? "DISCARD" : "WRITE_ZEROES"} not negotiated`);
        }
        if (this.readOnly) throw new RequestError(VIRTIO_BLK_S_IOERR, "discard on a read-only disk");
        const n = r.remaining / BLK_DISCARD_SEG_SIZE;
        if (!Number.isInteger(n) || n < 1 || n > MAX_DISCARD_SEG) {
          throw new RequestError(VIRTIO_BLK_S_UNSUPP, `${r.remaining} bytes of discard segments`);
        }
        for (let i = 0; i < n; i++) {
          const seg = new DataView(r.read(BLK_DISCARD_SEG_SIZE).buffer);
          const s = seg.getBigUint64(SEG_SECTOR, true);
          const num = seg.getUint32(SEG_NUM_SECTORS, true);
          const flags = seg.getUint32(SEG_FLAGS, true);
          const allowed = discard ? 0 : VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
          if (flags & ~allowed) {
            throw new RequestError(VIRTIO_BLK_S_UNSUPP, `discard segment flags 0x${flags.toString(16)}`);
          }
          if (num > MAX_DISCARD_SECTORS) throw new RequestError(VIRTIO_BLK_S_IOERR, `discard of ${num} sectors`);
          const off = this.#range(s, num * SECTOR_SIZE);
          if (discard) this.#disk.discard(off, num * SECTOR_SIZE);
          else this.#disk.writeZeroes(off, num * SECTOR_SIZE, (flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) !== 0);
        }
        if (discard) this.#stats.discards++;
        else this.#stats.writeZeroes++;
        return 0;
      }
      default:
        throw new RequestError(VIRTIO_BLK_S_UNSUPP, `unsupported request type ${type}`);
    }
  }

  /** Byte offset of `sector`, checking that `len` bytes from there fit the disk. */
  #range(sector: bigint, len: number): number {
    if (len % SECTOR_SIZE !== 0) {
      throw new RequestError(VIRTIO_BLK_S_IOERR, `request length ${len} is not a multiple of ${SECTOR_SIZE}`);
    }
    const off = sector << SECTOR_SHIFT;
    if (off + BigInt(len) > BigInt(this.capacityBytes)) {
      throw new RequestError(VIRTIO_BLK_S_IOERR, `sector ${sector} + ${len} bytes is past the end of the disk`);
    }
    return Number(off);
  }

  // ---- Device state (core/state.ts) ----

  /** False while a request is taken from the queue and its status not yet written back. */
  quiescent(): boolean {
    return this.#queue?.quiescent() ?? true;
  }

  /** The configuration space (capacity included), the feature offer and the counters. */
  saveState(): DeviceState {
    return {
      type: BLOCK_STATE_TYPE,
      version: BLOCK_STATE_VERSION,
      data: { features: featuresField(this.features), config: this.#config(), stats: { ...this.#stats } },
    };
  }

  /**
   * Take a saved state into a device not yet activated. The image must be the one saved with: the same
   * capacity, block size and offer, or the guest would see its disk change under it.
   */
  restoreState(state: DeviceState): void {
    const d = stateRecord(stateData(state, BLOCK_STATE_TYPE, BLOCK_STATE_VERSION), "virtio-blk state");
    const what = `virtio-blk ${this.path}`;
    if (this.#queue) throw new StateError(`${what}: restore into a device a driver has activated`);
    checkSavedIdentity(what, d, this.features, this.#config());
    Object.assign(this.#stats, stateCounters(d.stats, STAT_NAMES, what));
  }
}
