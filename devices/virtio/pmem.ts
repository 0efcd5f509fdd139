// virtio-pmem, a host file as the guest's persistent memory (virtio 1.2 spec, section 5.19; Linux
// include/uapi/linux/virtio_pmem.h and drivers/nvdimm/virtio_pmem.c, nd_virtio.c). The file is mapped
// MAP_SHARED, so the guest's stores reach the file's page cache, and the VMM installs the mapping as a KVM
// memory slot in a guest-physical window of its own (setMemoryWindow); the configuration space tells the
// driver where the window is. The one request queue carries flush requests: each is answered after an
// fsync of the file, which runs on Deno's blocking threads, so a slow disk holds the request and never a
// vCPU or the event loop. A read-only file is mapped PROT_READ into a read-only slot.
//
// The window's size follows crosvm (src/crosvm/sys/linux/device_helpers.rs create_pmem_device): the file's
// size rounded up to 2 MiB, the padding after the file anonymous memory of the same protection (a mapping
// of the file beyond its end would raise SIGBUS). Its base comes from the VMM's device-window area, whose
// alignment is a multiple of the 128 MiB crosvm asks for (Linux's memory sections, which nd_pmem's
// devm_memremap_pages works in).

import { ConfigError, HostError } from "../../core/exit.ts";
import { checkFileKind, openUserFile } from "../../core/host_file.ts";
import { RateLimitedLog } from "../../core/log.ts";
import { type DeviceState, stateData, StateError, type Stateful, stateRecord } from "../../core/state.ts";
import { MiB } from "../../core/units.ts";
import {
  closeFd,
  MAP_ANONYMOUS,
  MAP_FIXED,
  MAP_NORESERVE,
  MAP_PRIVATE,
  MAP_SHARED,
  mmap,
  munmap,
  O_RDONLY,
  O_RDWR,
  PROT_READ,
  PROT_WRITE,
  SysError,
} from "../../ffi/libc.ts";
import {
  type ActivateContext,
  checkSavedIdentity,
  featuresField,
  type SharedMemoryMapper,
  stateCounters,
  VIRTIO_COMMON_FEATURES,
  VIRTIO_ID_PMEM,
  type VirtioDevice,
  type VirtioInterrupt,
} from "./device.ts";
import type { DescriptorChain, Virtqueue } from "./queue.ts";

/** The request queue's size (crosvm devices/src/virtio/pmem.rs QUEUE_SIZE). */
export const PMEM_QUEUE_SIZE = 256;

/** struct virtio_pmem_config (virtio 1.2 section 5.19.4): le64 start, le64 size. */
export const PMEM_CONFIG_START = 0;
export const PMEM_CONFIG_SIZE = 8;
export const PMEM_CONFIG_BYTES = 16;

/** struct virtio_pmem_req (section 5.19.6): le32 type. */
export const PMEM_REQ_BYTES = 4;
/** struct virtio_pmem_resp (section 5.19.6): le32 ret. */
export const PMEM_RESP_BYTES = 4;
/** The one request type (include/uapi/linux/virtio_pmem.h). */
export const VIRTIO_PMEM_REQ_TYPE_FLUSH = 0;
/** Response codes (virtio 1.2 section 5.19.6; Linux's driver takes any non-zero ret as -EIO). */
export const VIRTIO_PMEM_RESP_TYPE_OK = 0;
export const VIRTIO_PMEM_RESP_TYPE_EIO = 1;

/**
 * The window's size is a multiple of this (crosvm create_pmem_device: "Linux requires pmem region sizes to
 * be 2 MiB aligned").
 */
export const PMEM_SIZE_ALIGN = 2 * MiB;
/** The id of the device's one window in its SharedMemoryMapper. */
export const PMEM_WINDOW_ID = 0;

/** The kind and layout version of a virtio-pmem device's saved state. */
export const PMEM_STATE_TYPE = "virtio-pmem";
export const PMEM_STATE_VERSION = 1;
const STAT_NAMES = ["flushes", "flushErrors", "badRequests"] as const;

export interface PmemOptions {
  path: string;
  readOnly: boolean;
  /**
   * Makes the file's data durable; resolves when it is, rejects when it failed. Default: fsync of the
   * open file on Deno's blocking threads. Tests give their own to watch or hold it.
   */
  sync?: () => Promise<void>;
}

/** The size of the window for a file of `fileSize` bytes: rounded up to PMEM_SIZE_ALIGN. */
export function pmemWindowSize(fileSize: number): number {
  return Math.ceil(fileSize / PMEM_SIZE_ALIGN) * PMEM_SIZE_ALIGN;
}

/** A flush request taken from the queue, answered when an fsync that began after it ends. */
interface PendingFlush {
  head: number;
  chain: DescriptorChain;
}

export class PmemDevice implements VirtioDevice, Stateful {
  readonly deviceType = VIRTIO_ID_PMEM;
  readonly name = "pmem";
  readonly queueMaxSizes: readonly number[] = [PMEM_QUEUE_SIZE];
  readonly features = VIRTIO_COMMON_FEATURES;
  readonly path: string;
  readonly readOnly: boolean;
  /** The file's size in bytes, and the window's (a multiple of PMEM_SIZE_ALIGN). */
  readonly fileSize: number;
  readonly size: number;
  /** The mapping's host address (the file, then the padding). */
  readonly hostAddr: bigint;
  #base = 0;
  #fd: number;
  #syncFile: Deno.FsFile | undefined;
  readonly #sync: () => Promise<void>;
  readonly #mapping: NonNullable<Deno.PointerValue>;
  #mapper: SharedMemoryMapper | undefined;
  #queue: Virtqueue | undefined;
  #interrupt: VirtioInterrupt | undefined;
  /** Bumped by reset: an fsync begun before it completes nothing after it. */
  #generation = 0;
  /** Flushes waiting for the next fsync, and whether one is running. */
  #waiting: PendingFlush[] = [];
  #syncing = false;
  #closed = false;
  readonly #log = new RateLimitedLog("virtio-pmem");
  readonly #stats = { flushes: 0, flushErrors: 0, badRequests: 0 };

  /**
   * Opens and maps `opts.path`. A file that cannot be opened is a HostError (exit 1, as crosvm's "failed
   * to load disk image"); one that is not a regular file, or is empty, a ConfigError (exit 35).
   */
  constructor(opts: PmemOptions) {
    this.path = opts.path;
    this.readOnly = opts.readOnly;
    let opened: { fd: number; info: Deno.FileInfo };
    try {
      opened = openUserFile(opts.path, opts.readOnly ? O_RDONLY : O_RDWR, "pmem file", "regular");
    } catch (e) {
      if (!(e instanceof SysError)) throw e;
      // A directory opened for writing fails before its kind is seen: name its kind (exit 35).
      let info: Deno.FileInfo | undefined;
      try {
        info = Deno.statSync(opts.path);
      } catch {
        // Nothing there (or nothing we may look at): the open's error says it.
      }
      if (info) checkFileKind("pmem file", opts.path, info, "regular");
      throw new HostError(`pmem "${opts.path}": cannot open it: ${e.message}`);
    }
    this.#fd = opened.fd;
    try {
      this.fileSize = opened.info.size;
      if (this.fileSize === 0) throw new ConfigError(`pmem "${opts.path}": the file is empty`);
      if (!Number.isSafeInteger(this.fileSize)) throw new ConfigError(`pmem "${opts.path}": the file is too large`);
      this.size = pmemWindowSize(this.fileSize);
      const prot = opts.readOnly ? PROT_READ : PROT_READ | PROT_WRITE;
      // The whole window as anonymous memory first, then the file over its start: the padding after the
      // file's last page stays anonymous.
      this.#mapping = mmap(this.size, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE);
      try {
        mmap(this.fileSize, prot, MAP_SHARED | MAP_FIXED, this.#fd, 0, this.#mapping);
      } catch (e) {
        munmap(this.#mapping, this.size);
        throw new HostError(`pmem "${opts.path}": cannot map it: ${(e as Error).message}`);
      }
      this.hostAddr = BigInt(Deno.UnsafePointer.value(this.#mapping));
      if (opts.sync) {
        this.#sync = opts.sync;
      } else {
        // The open file itself, through its /proc/self/fd link (the path may name another file by now).
        const file = Deno.openSync(`/proc/self/fd/${this.#fd}`, { read: true, write: !opts.readOnly });
        this.#syncFile = file;
        this.#sync = () => file.sync();
      }
    } catch (e) {
      closeFd(this.#fd);
      throw e;
    }
  }

  /** The guest-physical address of the window (0 until the VMM placed it). */
  get base(): number {
    return this.#base;
  }

  // ---- The window ----

  memoryWindowSize(): number {
    return this.size;
  }

  /** The VMM placed the window at `base`: install the mapping there (one KVM slot, read-only when the file is). */
  setMemoryWindow(base: number, mapper: SharedMemoryMapper): void {
    if (this.#mapper) throw new Error("virtio-pmem: the window is already placed");
    mapper.addMapping(PMEM_WINDOW_ID, 0, this.hostAddr, this.size, !this.readOnly);
    this.#mapper = mapper;
    this.#base = base;
  }

  // ---- Configuration space (section 5.19.4): read-only for the driver ----

  #config(): Uint8Array {
    const cfg = new Uint8Array(PMEM_CONFIG_BYTES);
    const v = new DataView(cfg.buffer);
    v.setBigUint64(PMEM_CONFIG_START, BigInt(this.#base), true);
    v.setBigUint64(PMEM_CONFIG_SIZE, BigInt(this.size), true);
    return cfg;
  }

  readConfig(offset: number, data: Uint8Array): void {
    data.fill(0);
    const cfg = this.#config();
    if (offset < 0 || offset >= cfg.length) return;
    data.set(cfg.subarray(offset, offset + data.length));
  }

  writeConfig(offset: number, data: Uint8Array): void {
    this.#log.log(`driver wrote ${data.length} bytes of config at ${offset}; the configuration is read-only`);
  }

  // ---- Queue ----

  activate(ctx: ActivateContext): void {
    this.#queue = ctx.queues[0];
    this.#interrupt = ctx.interrupt;
    this.queueNotify(0);
  }

  reset(): void {
    this.#generation++;
    this.#queue = undefined;
    this.#interrupt = undefined;
    this.#waiting = [];
  }

  queueNotify(index: number): void {
    const q = this.#queue;
    if (index !== 0 || !q || this.#closed) return;
    let answered = false;
    for (let chain = q.pop(); chain; chain = q.pop()) {
      const status = this.#check(chain);
      if (status === undefined) {
        this.#waiting.push({ head: chain.head, chain });
        continue;
      }
      q.addUsed(chain.head, this.#respond(chain, status));
      answered = true;
    }
    if (answered && q.needsInterrupt()) this.#interrupt?.signalUsedQueue(0);
    this.#startSync();
  }

  /**
   * A request's status when it is answered at once (a bad one, or a flush of a read-only file, which has
   * nothing to write back: OK, as crosvm's msync of its read-only mapping answers), or undefined for a
   * flush to run.
   */
  #check(chain: DescriptorChain): number | undefined {
    if (chain.readableLength < PMEM_REQ_BYTES) {
      return this.#bad(`request of ${chain.readableLength} device-readable bytes, fewer than ${PMEM_REQ_BYTES}`);
    }
    if (chain.writableLength < PMEM_RESP_BYTES) {
      return this.#bad(`request with ${chain.writableLength} device-writable bytes, fewer than ${PMEM_RESP_BYTES}`);
    }
    const type = chain.reader().readU32();
    if (type !== VIRTIO_PMEM_REQ_TYPE_FLUSH) return this.#bad(`unknown request type ${type}`);
    if (this.readOnly) return VIRTIO_PMEM_RESP_TYPE_OK;
    return undefined;
  }

  #bad(why: string): number {
    this.#stats.badRequests++;
    this.#log.log(why);
    return VIRTIO_PMEM_RESP_TYPE_EIO;
  }

  /** Writes `status` into the chain's response; the bytes written (0 when it has no room for one). */
  #respond(chain: DescriptorChain, status: number): number {
    if (chain.writableLength < PMEM_RESP_BYTES) return 0;
    const w = chain.writer();
    w.writeU32(status);
    return w.bytesWritten;
  }

  /** Runs one fsync for every flush waiting now; flushes that come meanwhile wait for the next one. */
  #startSync(): void {
    if (this.#syncing || this.#waiting.length === 0 || this.#closed) return;
    const batch = this.#waiting;
    this.#waiting = [];
    const generation = this.#generation;
    this.#syncing = true;
    this.#sync().then(
      () => VIRTIO_PMEM_RESP_TYPE_OK,
      (e) => {
        this.#stats.flushErrors++;
        this.#log.log(`fsync of ${this.path} failed: ${(e as Error).message}`);
        return VIRTIO_PMEM_RESP_TYPE_EIO;
      },
    ).then((status) => {
      this.#syncing = false;
      const q = this.#queue;
      // A reset (or close) came while the fsync ran: its requests belong to a queue that is gone.
      if (generation !== this.#generation || !q || this.#closed) return;
      for (const f of batch) {
        this.#stats.flushes++;
        q.addUsed(f.head, this.#respond(f.chain, status));
      }
      if (q.needsInterrupt()) this.#interrupt?.signalUsedQueue(0);
      this.#startSync();
    });
  }

  // ---- Host resources ----

  /** Release the mapping's slot, the mapping and the file. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.reset();
    try {
      this.#mapper?.removeMapping(PMEM_WINDOW_ID, 0);
    } catch {
      // The VM (and its slots) may be gone already.
    }
    this.#mapper = undefined;
    munmap(this.#mapping, this.size);
    this.#syncFile?.close();
    closeFd(this.#fd);
    this.#fd = -1;
  }

  stats(): Record<string, number> {
    return { ...this.#stats };
  }

  // ---- Device state (core/state.ts) ----

  /** False while a flush is taken from the queue and not yet answered. */
  quiescent(): boolean {
    return !this.#syncing && this.#waiting.length === 0 && (this.#queue?.quiescent() ?? true);
  }

  /**
   * The feature offer, the configuration space (window base and size: a restore needs the same) and the
   * counters. The file's contents are the file's: they are not state.
   */
  saveState(): DeviceState {
    return {
      type: PMEM_STATE_TYPE,
      version: PMEM_STATE_VERSION,
      data: { features: featuresField(this.features), config: this.#config(), stats: { ...this.#stats } },
    };
  }

  restoreState(state: DeviceState): void {
    const d = stateRecord(stateData(state, PMEM_STATE_TYPE, PMEM_STATE_VERSION), "virtio-pmem state");
    if (this.#queue) throw new StateError("virtio-pmem: restore into a device a driver has activated");
    checkSavedIdentity("virtio-pmem", d, this.features, this.#config());
    Object.assign(this.#stats, stateCounters(d.stats, STAT_NAMES, "virtio-pmem"));
  }
}
