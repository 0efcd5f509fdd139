// virtio-balloon, the traditional memory balloon (virtio 1.2 spec, section 5.5; Linux
// include/uapi/linux/virtio_balloon.h and drivers/virtio/virtio_balloon.c).
//
// The host sets a target size (config num_pages, in 4 KiB balloon pages) with setTarget(); the
// driver allocates pages inside the guest and sends their page frame numbers on the inflate queue,
// then writes how many it holds to config `actual`. Inflated pages are really returned to the host:
// each PFN is checked through GuestMemory and its host mapping is dropped with madvise
// (MADV_REMOVE for shared memory such as a vhost-user memfd, MADV_DONTNEED for private memory), so the
// host frees the page and the guest later reads zeros there (or, restored from a snapshot, the snapshot's bytes). Deflated pages need
// nothing: they fault back in on first touch (MUST_TELL_HOST is not offered).
//
// The stats queue (VIRTIO_BALLOON_F_STATS_VQ): the driver posts one buffer of
// struct virtio_balloon_stat records; the device keeps it and returns it when the host asks for
// fresh numbers (requestStats()); the driver refills and posts it again.

import {
  type ActivateContext,
  checkSavedIdentity,
  featuresField,
  readConfigSpace,
  serveQueue,
  stateCounters,
  stateInteger,
  VIRTIO_COMMON_FEATURES,
  VIRTIO_ID_BALLOON,
  type VirtioDevice,
} from "./device.ts";
import { type DescriptorChain, type Virtqueue } from "./queue.ts";
import { RateLimitedLog } from "../../core/log.ts";
import type { GuestMemory } from "../../core/memory.ts";
import {
  type DeviceState,
  stateArray,
  stateBytes,
  stateData,
  StateError,
  type Stateful,
  stateNumber,
  stateRecord,
  stateString,
} from "../../core/state.ts";
import { EACCES, EINVAL, errno, libc, MADV_DONTNEED, MADV_REMOVE, strerror } from "../../ffi/libc.ts";

// ---- Feature bits (virtio_balloon.h) ----
export const VIRTIO_BALLOON_F_MUST_TELL_HOST = 1n << 0n;
export const VIRTIO_BALLOON_F_STATS_VQ = 1n << 1n;
export const VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 1n << 2n;

/** Balloon pages are always 4 KiB: VIRTIO_BALLOON_PFN_SHIFT (virtio_balloon.h). */
export const VIRTIO_BALLOON_PFN_SHIFT = 12;
export const BALLOON_PAGE_SIZE = 1 << VIRTIO_BALLOON_PFN_SHIFT;
/** Each PFN in the inflate/deflate buffers is a le32 (section 5.5.6). */
export const BALLOON_PFN_SIZE = 4;

/** struct virtio_balloon_config: le32 num_pages, le32 actual (then free_page_hint_cmd_id, poison_val). */
export const BALLOON_CFG_NUM_PAGES = 0;
export const BALLOON_CFG_ACTUAL = 4;
export const BALLOON_CFG_FREE_PAGE_HINT_CMD_ID = 8;
export const BALLOON_CFG_POISON_VAL = 12;
export const BALLOON_CONFIG_SIZE = 16;

/** struct virtio_balloon_stat (packed): le16 tag, le64 val. */
export const BALLOON_STAT_SIZE = 10;
export const BALLOON_STAT_TAG = 0;
export const BALLOON_STAT_VAL = 2;
/** Stat tags VIRTIO_BALLOON_S_* (virtio_balloon.h); sizes are in bytes. */
export const VIRTIO_BALLOON_S_SWAP_IN = 0;
export const VIRTIO_BALLOON_S_SWAP_OUT = 1;
export const VIRTIO_BALLOON_S_MAJFLT = 2;
export const VIRTIO_BALLOON_S_MINFLT = 3;
export const VIRTIO_BALLOON_S_MEMFREE = 4;
export const VIRTIO_BALLOON_S_MEMTOT = 5;
export const VIRTIO_BALLOON_S_AVAIL = 6;
export const VIRTIO_BALLOON_S_CACHES = 7;
export const VIRTIO_BALLOON_S_HTLB_PGALLOC = 8;
export const VIRTIO_BALLOON_S_HTLB_PGFAIL = 9;
/** Names for the tags, as VIRTIO_BALLOON_S_NAMES in virtio_balloon.h. */
export const BALLOON_STAT_NAMES: Readonly<Record<number, string>> = {
  [VIRTIO_BALLOON_S_SWAP_IN]: "swap-in",
  [VIRTIO_BALLOON_S_SWAP_OUT]: "swap-out",
  [VIRTIO_BALLOON_S_MAJFLT]: "major-faults",
  [VIRTIO_BALLOON_S_MINFLT]: "minor-faults",
  [VIRTIO_BALLOON_S_MEMFREE]: "free-memory",
  [VIRTIO_BALLOON_S_MEMTOT]: "total-memory",
  [VIRTIO_BALLOON_S_AVAIL]: "available-memory",
  [VIRTIO_BALLOON_S_CACHES]: "disk-caches",
  [VIRTIO_BALLOON_S_HTLB_PGALLOC]: "hugetlb-allocations",
  [VIRTIO_BALLOON_S_HTLB_PGFAIL]: "hugetlb-failures",
};

/** Queues (section 5.5.2): inflateq, deflateq, statsq (only with STATS_VQ). */
export const BALLOON_INFLATE_QUEUE = 0;
export const BALLOON_DEFLATE_QUEUE = 1;
export const BALLOON_STATS_QUEUE = 2;
export const BALLOON_QUEUE_SIZE = 128;
/** Largest guest-memory page number a le32 PFN can name. */
const MAX_PFN = 0xffff_ffff;

export interface BalloonOptions {
  /** Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM (default true). */
  deflateOnOom?: boolean;
  /** Offer VIRTIO_BALLOON_F_STATS_VQ (default true). */
  statsQueue?: boolean;
  /** Initial target in bytes (default 0: no balloon). */
  targetBytes?: number;
}

/** Guest-reported statistics, by VIRTIO_BALLOON_S_* tag; `at` is when they arrived (Date.now()). */
export interface BalloonGuestStats {
  at: number;
  values: Map<number, bigint>;
}

const STAT_NAMES = [
  "inflateRequests",
  "deflateRequests",
  "inflatedPages",
  "deflatedPages",
  "releasedBytes",
  "badPfns",
  "madviseErrors",
  "statsReports",
] as const;
type StatName = typeof STAT_NAMES[number];

/** The kind and layout version of a virtio-balloon device's saved state. */
export const BALLOON_STATE_TYPE = "virtio-balloon";
export const BALLOON_STATE_VERSION = 1;
const U64_MAX = (1n << 64n) - 1n;

export class BalloonDevice implements VirtioDevice, Stateful {
  readonly deviceType = VIRTIO_ID_BALLOON;
  readonly name = "balloon";
  readonly queueMaxSizes: readonly number[];
  readonly features: bigint;
  #numPages = 0;
  #actual = 0;
  #mem: GuestMemory | undefined;
  #queues: (Virtqueue | undefined)[] = [];
  #interrupt: ActivateContext["interrupt"] | undefined;
  /** Head of the stats buffer the driver posted, held until the host wants fresh numbers. */
  #statsHead: number | undefined;
  #guestStats: BalloonGuestStats | undefined;
  readonly #statsWaiters: (() => void)[] = [];
  /** Callers of targetReached() waiting for `actual` to equal the target. */
  #targetWaiters: { resolve: () => void; reject: (e: Error) => void }[] = [];
  /** MADV_REMOVE is refused on private memory (anonymous: EINVAL, file-backed: EACCES): then MADV_DONTNEED is used. */
  #useRemove = true;
  readonly #log = new RateLimitedLog("virtio-balloon");
  readonly #stats: Record<StatName, number> = Object.fromEntries(STAT_NAMES.map((n) => [n, 0])) as Record<
    StatName,
    number
  >;

  constructor(opts: BalloonOptions = {}) {
    let f = VIRTIO_COMMON_FEATURES;
    if (opts.deflateOnOom ?? true) f |= VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
    const stats = opts.statsQueue ?? true;
    if (stats) f |= VIRTIO_BALLOON_F_STATS_VQ;
    this.features = f;
    this.queueMaxSizes = stats ? [BALLOON_QUEUE_SIZE, BALLOON_QUEUE_SIZE, BALLOON_QUEUE_SIZE] : [
      BALLOON_QUEUE_SIZE,
      BALLOON_QUEUE_SIZE,
    ];
    if (opts.targetBytes !== undefined) this.#numPages = pagesFor(opts.targetBytes);
  }

  // ---- Host side ----

  /** Target balloon size in 4 KiB pages (config num_pages). */
  get targetPages(): number {
    return this.#numPages;
  }
  /** Pages the driver says it holds (config actual). */
  get actualPages(): number {
    return this.#actual;
  }

  /** Ask the guest to hold `bytes` of memory in the balloon (rounded down to 4 KiB pages). */
  setTarget(bytes: number): void {
    const pages = pagesFor(bytes);
    if (pages === this.#numPages) return;
    this.#numPages = pages;
    this.#failTargetWaiters("a newer balloon target replaced this one");
    this.#interrupt?.signalConfigChange();
  }

  /**
   * Resolves once the driver reports (config `actual`) that the balloon holds the current target. Rejects when
   * no driver has activated the device (nothing would ever answer), when the target changes first, or when the
   * driver resets. crosvm's `balloon --wait` answers the same way: Ok once the balloon reached its target.
   */
  targetReached(): Promise<void> {
    if (this.#actual === this.#numPages) return Promise.resolve();
    if (!this.#interrupt) return Promise.reject(new Error("the guest's balloon driver is not running"));
    return new Promise((resolve, reject) => this.#targetWaiters.push({ resolve, reject }));
  }

  #failTargetWaiters(reason: string): void {
    for (const w of this.#targetWaiters.splice(0)) w.reject(new Error(reason));
  }

  /** The last statistics the guest reported, or undefined. */
  guestStats(): BalloonGuestStats | undefined {
    return this.#guestStats && { at: this.#guestStats.at, values: new Map(this.#guestStats.values) };
  }

  /**
   * Ask the guest for fresh statistics: returns the held stats buffer to the driver, which answers
   * with a new one. Resolves when it arrives, or false at once when the driver has no buffer posted.
   */
  requestStats(): Promise<boolean> {
    const q = this.#queues[BALLOON_STATS_QUEUE];
    const head = this.#statsHead;
    if (!q || head === undefined) return Promise.resolve(false);
    this.#statsHead = undefined;
    const done = new Promise<boolean>((resolve) => this.#statsWaiters.push(() => resolve(true)));
    q.addUsed(head, 0);
    if (q.needsInterrupt()) this.#interrupt?.signalUsedQueue(BALLOON_STATS_QUEUE);
    return done;
  }

  // ---- VirtioDevice ----

  #config(): Uint8Array {
    const b = new Uint8Array(BALLOON_CONFIG_SIZE);
    const v = new DataView(b.buffer);
    v.setUint32(BALLOON_CFG_NUM_PAGES, this.#numPages, true);
    v.setUint32(BALLOON_CFG_ACTUAL, this.#actual, true);
    return b;
  }

  readConfig(offset: number, data: Uint8Array): void {
    readConfigSpace(this.#config(), offset, data);
  }

  writeConfig(offset: number, data: Uint8Array): void {
    // Only `actual` is written by the driver (section 5.5.4); it writes the whole le32.
    if (offset === BALLOON_CFG_ACTUAL && data.length === BALLOON_PFN_SIZE) {
      this.#actual = new DataView(data.buffer, data.byteOffset, data.byteLength).getUint32(0, true);
      if (this.#actual === this.#numPages) { for (const w of this.#targetWaiters.splice(0)) w.resolve(); }
      return;
    }
    this.#log.log(`driver wrote ${data.length} bytes of config at ${offset}; only actual (le32 at 4) is writable`);
  }

  activate(ctx: ActivateContext): void {
    this.#mem = ctx.mem;
    this.#queues = ctx.queues;
    this.#interrupt = ctx.interrupt;
    for (let i = 0; i < this.queueMaxSizes.length; i++) this.queueNotify(i);
  }

  reset(): void {
    this.#mem = undefined;
    this.#queues = [];
    this.#interrupt = undefined;
    this.#statsHead = undefined;
    // A reset driver forgets its balloon: every page is the guest's again.
    this.#actual = 0;
    this.#failTargetWaiters("the guest's balloon driver reset the device");
  }

  close(): void {
    this.reset();
  }

  /** Counters, the balloon's size and the guest's last statistics (by VIRTIO_BALLOON_S_NAMES name). */
  stats(): Record<string, number> {
    const out: Record<string, number> = { ...this.#stats, targetPages: this.#numPages, actualPages: this.#actual };
    for (const [tag, v] of this.#guestStats?.values ?? []) out[BALLOON_STAT_NAMES[tag] ?? `tag-${tag}`] = Number(v);
    return out;
  }

  queueNotify(index: number): void {
    const q = this.#queues[index];
    if (!q) return;
    if (index === BALLOON_INFLATE_QUEUE || index === BALLOON_DEFLATE_QUEUE) {
      const inflate = index === BALLOON_INFLATE_QUEUE;
      serveQueue(q, index, this.#interrupt, (chain) => {
        this.#pfns(chain, inflate);
        return 0;
      });
    } else if (index === BALLOON_STATS_QUEUE) {
      for (let chain = q.pop(); chain; chain = q.pop()) {
        if (this.#statsHead !== undefined) {
          // The driver keeps one buffer in flight; give an extra one back.
          this.#log.log("a second stats buffer while one is held; returned");
          q.addUsed(this.#statsHead, 0);
        }
        this.#readStats(chain);
        this.#statsHead = chain.head;
      }
      if (q.needsInterrupt()) this.#interrupt?.signalUsedQueue(index);
    }
  }

  /** Handle the PFN array of one inflate or deflate buffer. */
  #pfns(chain: DescriptorChain, inflate: boolean): void {
    const mem = this.#mem!;
    if (inflate) this.#stats.inflateRequests++;
    else this.#stats.deflateRequests++;
    if (chain.readableLength % BALLOON_PFN_SIZE !== 0) {
      this.#log.log(`${inflate ? "inflate" : "deflate"} buffer of ${chain.readableLength} bytes (not whole le32s)`);
    }
    const count = Math.floor(chain.readableLength / BALLOON_PFN_SIZE);
    const bytes = chain.reader().read(count * BALLOON_PFN_SIZE);
    const v = new DataView(bytes.buffer);
    // Coalesce runs of consecutive pages that are consecutive on the host too: one madvise each.
    let runHost = 0n;
    let runLen = 0;
    const flush = () => {
      if (runLen > 0) this.#release(runHost, runLen);
      runLen = 0;
    };
    for (let i = 0; i < count; i++) {
      const pfn = v.getUint32(i * BALLOON_PFN_SIZE, true);
      const addr = pfn * BALLOON_PAGE_SIZE;
      if (!mem.isValid(addr, BALLOON_PAGE_SIZE)) {
        this.#stats.badPfns++;
        this.#log.log(`${inflate ? "inflate" : "deflate"}: pfn 0x${pfn.toString(16)} is outside guest memory; ignored`);
        continue;
      }
      if (!inflate) {
        this.#stats.deflatedPages++;
        continue;
      }
      const host = mem.hostAddress(addr, BALLOON_PAGE_SIZE);
      if (host % BigInt(BALLOON_PAGE_SIZE) !== 0n) {
        this.#stats.badPfns++;
        this.#log.log(`inflate: pfn 0x${pfn.toString(16)} maps to an unaligned host address; kept`);
        continue;
      }
      this.#stats.inflatedPages++;
      if (runLen > 0 && runHost + BigInt(runLen) === host) {
        runLen += BALLOON_PAGE_SIZE;
      } else {
        flush();
        runHost = host;
        runLen = BALLOON_PAGE_SIZE;
      }
    }
    flush();
  }

  /** Give host memory back: MADV_REMOVE frees shared (memfd/shmem) pages, MADV_DONTNEED private ones. */
  #release(host: bigint, len: number): void {
    const ptr = Deno.UnsafePointer.create(host);
    if (this.#useRemove) {
      if (libc().madvise(ptr, BigInt(len), MADV_REMOVE) === 0) {
        this.#stats.releasedBytes += len;
        return;
      }
      const e = errno();
      // EINVAL: private anonymous memory; EACCES: a private file mapping (a VM restored from a snapshot's
      // memory file, whose dropped copies read the file again). Both are released with MADV_DONTNEED.
      if (e !== EINVAL && e !== EACCES) {
        this.#stats.madviseErrors++;
        this.#log.log(`madvise(MADV_REMOVE, ${len} bytes): ${strerror(e)}`);
        return;
      }
      this.#useRemove = false;
    }
    if (libc().madvise(ptr, BigInt(len), MADV_DONTNEED) === 0) {
      this.#stats.releasedBytes += len;
    } else {
      this.#stats.madviseErrors++;
      this.#log.log(`madvise(MADV_DONTNEED, ${len} bytes): ${strerror(errno())}`);
    }
  }

  #readStats(chain: DescriptorChain): void {
    const n = Math.floor(chain.readableLength / BALLOON_STAT_SIZE);
    const bytes = chain.reader().read(n * BALLOON_STAT_SIZE);
    const v = new DataView(bytes.buffer);
    const values = new Map<number, bigint>();
    for (let i = 0; i < n; i++) {
      values.set(
        v.getUint16(i * BALLOON_STAT_SIZE + BALLOON_STAT_TAG, true),
        v.getBigUint64(i * BALLOON_STAT_SIZE + BALLOON_STAT_VAL, true),
      );
    }
    this.#stats.statsReports++;
    this.#guestStats = { at: Date.now(), values };
    for (const w of this.#statsWaiters.splice(0)) w();
  }

  // ---- Device state (core/state.ts) ----

  /**
   * False while an inflate or deflate buffer is taken and not returned. The stats buffer the device holds
   * on purpose does not count: its head is part of the state.
   */
  quiescent(): boolean {
    const held = this.#statsHead === undefined ? 0 : 1;
    return this.#queues.every((q, i) => !q || q.inFlight <= (i === BALLOON_STATS_QUEUE ? held : 0));
  }

  /** Target and actual size, the held stats buffer, the guest's last statistics and the counters. */
  saveState(): DeviceState {
    const g = this.#guestStats;
    return {
      type: BALLOON_STATE_TYPE,
      version: BALLOON_STATE_VERSION,
      data: {
        features: featuresField(this.features),
        config: this.#config(),
        statsHead: this.#statsHead ?? null,
        guestStats: g ? { at: g.at, values: [...g.values].map(([tag, v]) => [tag, v.toString()]) } : null,
        stats: { ...this.#stats },
      },
    };
  }

  restoreState(state: DeviceState): void {
    const d = stateRecord(stateData(state, BALLOON_STATE_TYPE, BALLOON_STATE_VERSION), "virtio-balloon state");
    const what = "virtio-balloon";
    if (this.#queues.length > 0) throw new StateError(`${what}: restore into a device a driver has activated`);
    // num_pages and actual are state; the rest of the configuration space must be this device's.
    const saved = stateBytes(d.config, `${what} config`, BALLOON_CONFIG_SIZE).slice();
    const view = new DataView(saved.buffer);
    const numPages = view.getUint32(BALLOON_CFG_NUM_PAGES, true);
    const actual = view.getUint32(BALLOON_CFG_ACTUAL, true);
    const mine = this.#config();
    const mineView = new DataView(mine.buffer);
    mineView.setUint32(BALLOON_CFG_NUM_PAGES, numPages, true);
    mineView.setUint32(BALLOON_CFG_ACTUAL, actual, true);
    checkSavedIdentity(what, { features: d.features ?? null, config: saved }, this.features, mine);
    const statsHead = d.statsHead === null ? undefined : stateInteger(d.statsHead, `${what} statsHead`, 0, 0xffff);
    if (statsHead !== undefined && !(this.features & VIRTIO_BALLOON_F_STATS_VQ)) {
      throw new StateError(`${what}: a held stats buffer without a stats queue`);
    }
    let guestStats: BalloonGuestStats | undefined;
    if (d.guestStats !== null) {
      const g = stateRecord(d.guestStats, `${what} guestStats`);
      const values = new Map<number, bigint>();
      for (const e of stateArray(g.values, `${what} guestStats values`)) {
        const [tag, v] = stateArray(e, `${what} guestStats entry`);
        const text = stateString(v, `${what} guestStats value`);
        if (!/^\d{1,20}$/.test(text) || BigInt(text) > U64_MAX) {
          throw new StateError(`${what} guestStats value "${text}" is not a u64`);
        }
        values.set(stateInteger(tag, `${what} guestStats tag`, 0, 0xffff), BigInt(text));
      }
      guestStats = { at: stateNumber(g.at, `${what} guestStats at`), values };
    }
    const stats = stateCounters(d.stats, STAT_NAMES, what);
    this.#numPages = numPages;
    this.#actual = actual;
    this.#statsHead = statsHead;
    this.#guestStats = guestStats;
    Object.assign(this.#stats, stats);
  }
}

/** Whole balloon pages in `bytes`, capped to what le32 num_pages holds. */
function pagesFor(bytes: number): number {
  if (!Number.isFinite(bytes) || bytes < 0) throw new RangeError(`balloon: target ${bytes} bytes`);
  return Math.min(Math.floor(bytes / BALLOON_PAGE_SIZE), MAX_PFN);
}
