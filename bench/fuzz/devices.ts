// The in-process half of the fuzzing campaign: every device model driven as a hostile guest would drive
// it, in this process, without a VM. Virtio devices sit on a virtio-mmio transport (devices/virtio/mmio.ts)
// on an MMIO bus (core/bus.ts) over guest memory (core/memory.ts); the harness plays the driver through
// the registers (feature negotiation, queue set-up, notify) and writes descriptor chains into guest RAM:
// mostly well-formed requests with mutated fields, and chains with bad lengths, loops, indirect tables,
// addresses outside RAM, readable/writable mix-ups, wrong queue sizes, config writes, register noise and
// resets in the middle of a request. Legacy devices get random port accesses on a port bus.
//
// Guest RAM sits inside a bigger host mapping whose pages before and after it hold a canary; RAM itself is
// laid out in zones (rings, readable data, a sentinel that is never granted, writable buffers) so that a
// write outside what the guest granted shows: the canaries, the sentinel and (sampled) the readable data
// are checked after every batch. Counted per device: requests, crashes (an exception out of the transport
// or the device), hangs (a request that is neither completed nor refused within a bound), oob hits and
// RSS growth after a warm-up. A crash or hang is logged with the seed and the request's index and the run
// goes on with a fresh device.
//
// `deno run --allow-all bench/fuzz/devices.ts [--requests N] [--seed S] [--devices a,b]` prints one JSON
// line; bench/fuzz.ts is the campaign's entry point.

import { Bus } from "../../core/bus.ts";
import { GuestMemory } from "../../core/memory.ts";
import { guestLog } from "../../core/log.ts";
import { mmapAnon, munmap } from "../../ffi/libc.ts";
import { configureInterface } from "../../ffi/tun.ts";
import type { VirtioDevice } from "../../devices/virtio/device.ts";
import {
  VIRTIO_MMIO_CONFIG,
  VIRTIO_MMIO_DEVICE_FEATURES,
  VIRTIO_MMIO_DEVICE_FEATURES_SEL,
  VIRTIO_MMIO_DRIVER_FEATURES,
  VIRTIO_MMIO_DRIVER_FEATURES_SEL,
  VIRTIO_MMIO_INTERRUPT_ACK,
  VIRTIO_MMIO_INTERRUPT_STATUS,
  VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
  VIRTIO_MMIO_QUEUE_AVAIL_LOW,
  VIRTIO_MMIO_QUEUE_DESC_HIGH,
  VIRTIO_MMIO_QUEUE_DESC_LOW,
  VIRTIO_MMIO_QUEUE_NOTIFY,
  VIRTIO_MMIO_QUEUE_NUM,
  VIRTIO_MMIO_QUEUE_NUM_MAX,
  VIRTIO_MMIO_QUEUE_READY,
  VIRTIO_MMIO_QUEUE_SEL,
  VIRTIO_MMIO_QUEUE_USED_HIGH,
  VIRTIO_MMIO_QUEUE_USED_LOW,
  VIRTIO_MMIO_STATUS,
  VIRTIO_STATUS_ACKNOWLEDGE,
  VIRTIO_STATUS_DRIVER,
  VIRTIO_STATUS_DRIVER_OK,
  VIRTIO_STATUS_FEATURES_OK,
  VirtioMmioTransport,
} from "../../devices/virtio/mmio.ts";
import {
  VIRTQ_AVAIL_IDX,
  VIRTQ_AVAIL_RING,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
  VIRTQ_DESC_SIZE,
  VIRTQ_USED_IDX,
} from "../../devices/virtio/queue.ts";
import { BLK_OUTHDR_SIZE, BlockDevice, SECTOR_SIZE } from "../../devices/virtio/block/device.ts";
import { NetDevice, VIRTIO_NET_HDR_SIZE } from "../../devices/virtio/net.ts";
import { CONSOLE_CTRL_SIZE, ConsoleDevice } from "../../devices/virtio/console.ts";
import { RngDevice } from "../../devices/virtio/rng.ts";
import { INPUT_DEVICE_KINDS, INPUT_EVENT_SIZE, InputDevice } from "../../devices/virtio/input/device.ts";
import { VSOCK_EVENT_SIZE, VSOCK_HDR_SIZE, VsockDevice } from "../../devices/virtio/vsock.ts";
import { BALLOON_PAGE_SIZE, BALLOON_STAT_SIZE, BalloonDevice } from "../../devices/virtio/balloon.ts";
import { GpuDevice } from "../../devices/virtio/gpu/device.ts";
import { Backend2D } from "../../devices/virtio/gpu/backend_2d.ts";
import * as G from "../../devices/virtio/gpu/protocol.ts";
import { Serial, UART_REGISTER_COUNT } from "../../devices/legacy/serial.ts";
import { I8042 } from "../../devices/legacy/i8042.ts";
import { Cmos, CMOS_PORT_SPAN } from "../../devices/legacy/cmos.ts";
import { AcpiPm } from "../../devices/legacy/acpi_pm.ts";
import { PvPanic } from "../../devices/legacy/pvpanic.ts";
import {
  ACPI_RESET_PORT,
  ACPI_RESET_VALUE,
  ACPI_SLEEP_CONTROL_PORT,
  ACPI_SLEEP_TYPE_S5,
  CMOS_INDEX_PORT,
  I8042_COMMAND_PORT,
  I8042_DATA_PORT,
  PVPANIC_PORT,
  SERIAL_PORTS,
} from "../../vmm/arch/layout.ts";
import { emptyResult, type FuzzOptions, type FuzzResult, hashName, Prng, rssMb } from "./common.ts";

export type { FuzzOptions, FuzzResult } from "./common.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
const PAGE = 4096;
const U32 = 0x1_0000_0000;

// ---- Guest RAM and its zones ----

/** Guest RAM: guest-physical 0 .. RAM_SIZE. */
export const RAM_SIZE = 2 * MiB;
/** Canary pages on each side of RAM in the host mapping. */
export const GUARD_SIZE = 2 * PAGE;
/** The byte the guard pages and the sentinel zone hold. */
export const CANARY = 0xa5;
/** Rings: one slot per queue (a 256-entry queue's three areas take 6.6 KiB). */
export const RINGS_START = 0;
const RING_SLOT = 8 * KiB;
const MAX_QUEUES = 8;
/** What the driver writes for the device to read: headers, payloads, indirect tables. Never granted writable. */
export const READ_START = RINGS_START + RING_SLOT * MAX_QUEUES;
export const READ_SIZE = 256 * KiB;
/** Never named by a writable descriptor, a ring or a balloon page: nothing may change it. */
export const SENTINEL_START = READ_START + READ_SIZE;
export const SENTINEL_SIZE = 64 * KiB;
/** Writable buffers (the last zone: a writable buffer that starts here ends here or past RAM). */
export const WRITE_START = SENTINEL_START + SENTINEL_SIZE;
export const WRITE_SIZE = RAM_SIZE - WRITE_START;
/** Where the virtio-mmio window sits on the fuzzing bus. */
const MMIO_BASE = 0xd000_0000;
const MMIO_WINDOW = 0x1000;

/**
 * Guest RAM inside a host mapping with canary pages before and after it. `all` is the whole mapping
 * (guards included), `ram` the guest's part; the harness checks the guards and the zones after each batch.
 */
export class CanaryMemory {
  readonly mem: GuestMemory;
  readonly all: Uint8Array;
  readonly ram: Uint8Array;
  readonly ramView: DataView;
  readonly #ptr: Deno.PointerObject;
  readonly #size: number;
  readonly #guardBefore: Int32Array;
  readonly #guardAfter: Int32Array;
  /** What the harness last wrote into the readable zone. */
  readonly #readShadow = new Int32Array(READ_SIZE / 4);
  readonly #readLive: Int32Array;
  readonly #sentinel: Int32Array;
  static readonly #WORD = CANARY * 0x01010101 | 0;

  constructor() {
    this.#size = GUARD_SIZE + RAM_SIZE + GUARD_SIZE;
    this.#ptr = mmapAnon(this.#size);
    const ab = Deno.UnsafePointerView.getArrayBuffer(this.#ptr, this.#size);
    this.all = new Uint8Array(ab);
    this.ram = new Uint8Array(ab, GUARD_SIZE, RAM_SIZE);
    this.ramView = new DataView(ab, GUARD_SIZE, RAM_SIZE);
    this.#guardBefore = new Int32Array(ab, 0, GUARD_SIZE / 4);
    this.#guardAfter = new Int32Array(ab, GUARD_SIZE + RAM_SIZE, GUARD_SIZE / 4);
    this.#readLive = new Int32Array(ab, GUARD_SIZE + READ_START, READ_SIZE / 4);
    this.#sentinel = new Int32Array(ab, GUARD_SIZE + SENTINEL_START, SENTINEL_SIZE / 4);
    const base = BigInt(Deno.UnsafePointer.value(this.#ptr));
    this.mem = new GuestMemory([{ guestBase: 0, size: RAM_SIZE, hostAddr: base + BigInt(GUARD_SIZE) }]);
    this.restore();
  }

  /** Offset of guest address 0 in `all`. */
  get ramOffset(): number {
    return GUARD_SIZE;
  }

  /** Guards and sentinel back to the canary, the readable zone back to what the harness wrote. */
  restore(): void {
    this.#guardBefore.fill(CanaryMemory.#WORD);
    this.#guardAfter.fill(CanaryMemory.#WORD);
    this.#sentinel.fill(CanaryMemory.#WORD);
    this.#readLive.set(this.#readShadow);
  }

  /** The harness writes `n` bytes of `src` at `off` into the readable zone (and its shadow). */
  writeReadable(addr: number, src: Uint8Array, from: number, n: number): void {
    this.ram.set(src.subarray(from, from + n), addr);
    new Uint8Array(this.#readShadow.buffer).set(src.subarray(from, from + n), addr - READ_START);
  }
  /** A little-endian u32 into the readable zone (and its shadow). */
  writeReadableU32(addr: number, v: number): void {
    this.ramView.setUint32(addr, v, true);
    this.#readShadow[(addr - READ_START) >> 2] = this.#readLive[(addr - READ_START) >> 2];
  }

  /** The guard pages hold the canary. */
  guardsIntact(): boolean {
    const w = CanaryMemory.#WORD;
    const a = this.#guardBefore, b = this.#guardAfter;
    for (let i = 0; i < a.length; i++) if (a[i] !== w || b[i] !== w) return false;
    return true;
  }

  /** `samples` words of the readable zone and the sentinel, at random, hold what they should; all when `full`. */
  zonesIntact(r: Prng, samples: number, full: boolean): boolean {
    const w = CanaryMemory.#WORD;
    const live = this.#readLive, shadow = this.#readShadow, s = this.#sentinel;
    if (full) {
      for (let i = 0; i < live.length; i++) if (live[i] !== shadow[i]) return false;
      for (let i = 0; i < s.length; i++) if (s[i] !== w) return false;
      return true;
    }
    for (let k = 0; k < samples; k++) {
      const i = r.below(live.length);
      if (live[i] !== shadow[i]) return false;
      if (s[r.below(s.length)] !== w) return false;
    }
    return true;
  }

  close(): void {
    munmap(this.#ptr, this.#size);
  }
}

// ---- Requests as a device model's generator describes them ----

const MAX_SEGS = 64;
/** Largest readable payload one request carries. */
const MAX_READ_BYTES = 96 * KiB;
/** Largest writable buffer. */
const MAX_WRITE_BYTES = 160 * KiB;

/** One request under construction: readable bytes (written into `data`) and writable lengths, in order. */
export class RequestBuilder {
  readonly data = new Uint8Array(MAX_READ_BYTES);
  readonly view = new DataView(this.data.buffer);
  /** Bytes of `data` in use. */
  pos = 0;
  nseg = 0;
  readonly segOff = new Int32Array(MAX_SEGS);
  readonly segLen = new Int32Array(MAX_SEGS);
  readonly segWrite = new Uint8Array(MAX_SEGS);
  /** Random bytes to copy payloads from. */
  readonly #pool: Uint8Array;

  constructor(r: Prng) {
    this.#pool = new Uint8Array(64 * KiB);
    const v = new Uint32Array(this.#pool.buffer);
    for (let i = 0; i < v.length; i++) v[i] = r.u32();
  }

  reset(): void {
    this.pos = 0;
    this.nseg = 0;
  }

  /** A readable segment of `n` bytes, zeroed; returns its offset in `data` for the generator to fill. */
  read(n: number): number {
    n = Math.min(n, MAX_READ_BYTES - this.pos);
    if (this.nseg >= MAX_SEGS) return this.pos;
    const off = this.pos;
    this.data.fill(0, off, off + n);
    this.segOff[this.nseg] = off;
    this.segLen[this.nseg] = n;
    this.segWrite[this.nseg++] = 0;
    this.pos += n;
    return off;
  }

  /** A readable segment of `n` random bytes. */
  readRandom(r: Prng, n: number): void {
    n = Math.min(n, MAX_READ_BYTES - this.pos);
    const off = this.read(n);
    let done = 0;
    while (done < n) {
      const from = r.below(this.#pool.length);
      const take = Math.min(n - done, this.#pool.length - from);
      this.data.set(this.#pool.subarray(from, from + take), off + done);
      done += take;
    }
  }

  /** Readable payload split in 1..3 segments. */
  readPayload(r: Prng, n: number): void {
    const parts = 1 + r.below(3);
    let left = n;
    for (let i = 0; i < parts && left > 0; i++) {
      const take = i === parts - 1 ? left : r.below(left + 1);
      if (take > 0) this.readRandom(r, take);
      left -= take;
    }
  }

  /** A writable segment of `n` bytes. */
  write(n: number): void {
    if (this.nseg >= MAX_SEGS) return;
    this.segOff[this.nseg] = 0;
    this.segLen[this.nseg] = Math.min(n, MAX_WRITE_BYTES);
    this.segWrite[this.nseg++] = 1;
  }

  /** `n` writable bytes in 1..3 segments. */
  writeSplit(r: Prng, n: number): void {
    const parts = 1 + r.below(3);
    let left = n;
    for (let i = 0; i < parts && left > 0; i++) {
      const take = i === parts - 1 ? left : r.below(left + 1);
      if (take > 0) this.write(take);
      left -= take;
    }
  }

  u8(off: number, v: number): void {
    this.data[off] = v;
  }
  u16(off: number, v: number): void {
    this.view.setUint16(off, v, true);
  }
  u32(off: number, v: number): void {
    this.view.setUint32(off, v >>> 0, true);
  }
  /** A 64-bit field from two 32-bit halves. */
  u64(off: number, lo: number, hi: number): void {
    this.view.setUint32(off, lo >>> 0, true);
    this.view.setUint32(off + 4, hi >>> 0, true);
  }
}

/** What a queue holds: requests the device must complete at once, or buffers it may keep (receive queues). */
export type QueueRole = "request" | "posted";

/** A device model as the fuzzer drives it. */
export interface VirtioTarget {
  name: string;
  /** A fresh device over `mem` (a target that plays a broken device may write through `mem.all`). */
  make(mem: CanaryMemory): VirtioDevice | Promise<VirtioDevice>;
  /** Release it (default: its close()). */
  close?(dev: VirtioDevice): void | Promise<void>;
  /** One role per queue. */
  roles: readonly QueueRole[];
  /** Fill `b` with one request (or posted buffer) for queue `q`. */
  request(q: number, b: RequestBuilder, r: Prng): void;
  /** Now and then: something from the host side (input, a key, a resize). */
  host?(dev: VirtioDevice, r: Prng): void;
  /** The device does work on the event loop: give it turns. */
  async?: boolean;
}

// ---- The driver's side of one queue ----

interface DriverQueue {
  size: number;
  desc: number;
  avail: number;
  used: number;
  availIdx: number;
  /** Next descriptor index to use (chains rotate through the table; the guest owns it all). */
  cursor: number;
}

/** Descriptors of one chain before they are laid out. */
class Chain {
  n = 0;
  readonly lo = new Uint32Array(MAX_SEGS + 8);
  readonly hi = new Uint32Array(MAX_SEGS + 8);
  readonly len = new Uint32Array(MAX_SEGS + 8);
  readonly flags = new Uint16Array(MAX_SEGS + 8);
  readonly next = new Int32Array(MAX_SEGS + 8);
  push(addr: number, len: number, flags: number): void {
    if (this.n >= this.lo.length) return;
    this.lo[this.n] = addr % U32;
    this.hi[this.n] = Math.floor(addr / U32);
    this.len[this.n] = len >>> 0;
    this.flags[this.n] = flags;
    this.next[this.n] = -1;
    this.n++;
  }
}

/** Why a request index failed, for the log. */
interface Failure {
  kind: "crash" | "hang" | "oob";
  index: number;
  what: string;
}

const STATUS_DRIVER = VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER;
/** Event-loop turns a request of an asynchronous device gets before it counts as a hang. */
const HANG_TURNS = 50;
/** Synchronous devices still get an event-loop turn this often (timers, logs). */
const SYNC_YIELD_EVERY = 4096;
const ASYNC_YIELD_EVERY = 32;
/** Full zone checks every this many batches; sampled ones in between. */
const FULL_CHECK_EVERY = 64;
const SAMPLES = 8;

/** The harness found a request queue full of requests the device never completed. */
class HeldRequests extends Error {}

/** An exception's message and the first frames of its stack, on one line. */
function briefStack(e: unknown): string {
  if (!(e instanceof Error)) return String(e);
  const frames = (e.stack ?? "").split("\n").slice(1, 4).map((l) => l.trim().replace(/^at /, ""));
  return `${e.name}: ${e.message} (${frames.join(" < ")})`;
}

const turn = () => new Promise<void>((resolve) => setTimeout(resolve, 0));

/** Drives one virtio device model; see the top of the file. */
class VirtioFuzzer {
  readonly #t: VirtioTarget;
  readonly #r: Prng;
  readonly #seed: number;
  readonly #log: (line: string) => void;
  readonly cm = new CanaryMemory();
  readonly #b: RequestBuilder;
  readonly #chain = new Chain();
  readonly #reg = new Uint8Array(4);
  readonly #regView = new DataView(this.#reg.buffer);
  readonly #cfg = new Uint8Array(8);
  #dev: VirtioDevice | undefined;
  #bus = new Bus("mmio");
  #queues: DriverQueue[] = [];
  #readPos = READ_START;
  #writePos = WRITE_START;
  #offered = 0n;
  #index = 0;
  readonly result: FuzzResult = emptyResult();
  readonly failures: Failure[] = [];
  /** Set by the harness's unhandledrejection/error listeners. */
  asyncCrash: string | undefined;

  constructor(t: VirtioTarget, seed: number, log: (line: string) => void) {
    this.#t = t;
    this.#seed = seed;
    this.#r = new Prng(seed ^ hashName(t.name));
    this.#b = new RequestBuilder(this.#r);
    this.#log = log;
  }

  // ---- Registers ----

  #w(off: number, v: number): void {
    this.#regView.setUint32(0, v >>> 0, true);
    this.#bus.write(MMIO_BASE + off, this.#reg);
  }
  #rd(off: number): number {
    this.#bus.read(MMIO_BASE + off, this.#reg);
    return this.#regView.getUint32(0, true);
  }

  async #fresh(): Promise<void> {
    if (this.#dev) await this.#closeDevice();
    const dev = await this.#t.make(this.cm);
    this.#dev = dev;
    const t = new VirtioMmioTransport(dev, this.cm.mem, { irq: { trigger: () => {} } });
    this.#bus = new Bus("mmio");
    this.#bus.add(MMIO_BASE, MMIO_WINDOW, t, `virtio-${dev.name}`);
    this.#offered = dev.features;
    this.cm.restore();
    this.#init();
  }

  async #closeDevice(): Promise<void> {
    const dev = this.#dev!;
    this.#dev = undefined;
    try {
      if (this.#t.close) await this.#t.close(dev);
      else dev.close?.();
    } catch (e) {
      this.#fail("crash", `close: ${(e as Error).message}`);
    }
  }

  /** Reset and bring the device up: features (a random subset now and then), every queue, DRIVER_OK. */
  #init(): void {
    const r = this.#r;
    this.#w(VIRTIO_MMIO_STATUS, 0);
    this.#w(VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE);
    this.#w(VIRTIO_MMIO_STATUS, STATUS_DRIVER);
    let offered = 0n;
    for (const sel of [0, 1]) {
      this.#w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel);
      offered |= BigInt(this.#rd(VIRTIO_MMIO_DEVICE_FEATURES)) << BigInt(32 * sel);
    }
    if (r.oneIn(16)) {
      // Features the device did not offer, or no VERSION_1: FEATURES_OK must not stick.
      this.#writeFeatures(r.oneIn(2) ? offered & ~(1n << 32n) : offered | (1n << BigInt(r.below(64))));
      this.#w(VIRTIO_MMIO_STATUS, STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK);
      this.#w(VIRTIO_MMIO_STATUS, 0);
      this.#w(VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE);
      this.#w(VIRTIO_MMIO_STATUS, STATUS_DRIVER);
    }
    const mask = r.oneIn(4) ? BigInt(r.u32()) | (BigInt(r.u32()) << 32n) | (1n << 32n) : ~0n;
    this.#writeFeatures(offered & mask);
    this.#w(VIRTIO_MMIO_STATUS, STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK);
    this.#queues = [];
    const n = this.#t.roles.length;
    for (let i = 0; i < n; i++) this.#setupQueue(i);
    if (r.oneIn(64)) this.#w(VIRTIO_MMIO_QUEUE_NOTIFY, r.below(n)); // a kick before DRIVER_OK
    this.#w(VIRTIO_MMIO_STATUS, STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK | VIRTIO_STATUS_DRIVER_OK);
  }

  #writeFeatures(f: bigint): void {
    for (const sel of [0, 1]) {
      this.#w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
      this.#w(VIRTIO_MMIO_DRIVER_FEATURES, Number((f >> BigInt(32 * sel)) & 0xffff_ffffn));
    }
  }

  #setupQueue(i: number): void {
    const r = this.#r;
    this.#w(VIRTIO_MMIO_QUEUE_SEL, i);
    const max = this.#rd(VIRTIO_MMIO_QUEUE_NUM_MAX);
    let size = max;
    if (r.oneIn(2)) size = Math.min(max, 2 ** r.below(Math.log2(max) + 1));
    const slot = RINGS_START + RING_SLOT * i;
    const q: DriverQueue = {
      size,
      desc: slot,
      avail: slot + VIRTQ_DESC_SIZE * 256,
      used: slot + VIRTQ_DESC_SIZE * 256 + 1024,
      availIdx: 0,
      cursor: 0,
    };
    this.cm.ram.fill(0, slot, slot + RING_SLOT);
    if (r.oneIn(16)) {
      // A set-up the transport must refuse: a size that is no power of 2 or too big, a misaligned or
      // absent ring. Then the right one.
      const bad = r.below(5);
      this.#w(VIRTIO_MMIO_QUEUE_NUM, bad === 0 ? r.pick([0, 3, max + 1, max * 2, 0xffff_ffff]) : size);
      this.#ringAddrs(
        bad === 1 ? q.desc + 8 : bad === 2 ? RAM_SIZE - 16 : q.desc,
        bad === 3 ? q.avail + 1 : q.avail,
        bad === 4 ? r.pick([RAM_SIZE, U32 * 7 + 4, 0xffff_fffc]) : q.used,
      );
      this.#w(VIRTIO_MMIO_QUEUE_READY, 1);
      if (this.#rd(VIRTIO_MMIO_QUEUE_READY)) this.#w(VIRTIO_MMIO_QUEUE_READY, 0);
    }
    this.#w(VIRTIO_MMIO_QUEUE_NUM, size);
    this.#ringAddrs(q.desc, q.avail, q.used);
    this.#w(VIRTIO_MMIO_QUEUE_READY, 1);
    this.#queues[i] = q;
  }

  #ringAddrs(desc: number, avail: number, used: number): void {
    const regs: [number, number, number][] = [
      [VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH, desc],
      [VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, avail],
      [VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_QUEUE_USED_HIGH, used],
    ];
    for (const [lo, hi, v] of regs) {
      this.#w(lo, v % U32);
      this.#w(hi, Math.floor(v / U32));
    }
  }

  // ---- Chains ----

  /** Put the builder's segments into guest memory as descriptors of `chain`. */
  #segmentsToChain(): void {
    const b = this.#b, c = this.#chain, cm = this.cm;
    c.n = 0;
    for (let s = 0; s < b.nseg; s++) {
      const len = b.segLen[s];
      if (b.segWrite[s]) {
        if (this.#writePos + len > RAM_SIZE) this.#writePos = WRITE_START;
        c.push(this.#writePos, len, VIRTQ_DESC_F_WRITE);
        this.#writePos += (len + 7) & ~7;
      } else {
        const at = this.#readAlloc(len);
        cm.writeReadable(at, b.data, b.segOff[s], len);
        c.push(at, len, 0);
      }
    }
  }

  #readAlloc(len: number): number {
    if (this.#readPos + len > READ_START + READ_SIZE) this.#readPos = READ_START;
    const at = this.#readPos;
    this.#readPos += (len + 15) & ~15;
    return at;
  }

  /** Mutate the chain the way a broken or hostile driver would. */
  #mutateChain(q: DriverQueue): void {
    const c = this.#chain, r = this.#r;
    if (c.n === 0) {
      c.push(this.#readAlloc(0), 0, 0);
      return;
    }
    const k = r.below(c.n);
    switch (r.below(10)) {
      case 0: // a bad length
        c.len[k] = r.pick([0, c.len[k] + 1, Math.max(0, c.len[k] - 1), 0xffff_ffff, r.u32(), 0x8000_0000]);
        break;
      case 1: { // an address outside RAM, or straddling its end
        const len = c.len[k];
        const v = r.pick([RAM_SIZE - Math.max(1, len >> 1), RAM_SIZE, U32, 2 ** 52, -1, -2]);
        if (v < 0) {
          c.lo[k] = r.u32();
          c.hi[k] = 0xffff_ffff;
        } else {
          c.lo[k] = v % U32;
          c.hi[k] = Math.floor(v / U32);
        }
        break;
      }
      case 2: // a loop back into the chain
        c.flags[c.n - 1] |= VIRTQ_DESC_F_NEXT;
        c.next[c.n - 1] = -2 - r.below(c.n); // resolved to a descriptor of the chain at layout
        break;
      case 3: // next beyond the table
        c.flags[k] |= VIRTQ_DESC_F_NEXT;
        c.next[k] = q.size + r.below(0x10000 - q.size);
        break;
      case 4: // readable and writable mixed up
        c.flags[k] ^= VIRTQ_DESC_F_WRITE;
        break;
      case 5: // unknown flag bits, or INDIRECT where it makes no sense
        c.flags[k] |= r.pick([8, 0x10, 0x8000, VIRTQ_DESC_F_INDIRECT]);
        break;
      case 6: { // zero-length descriptors in between
        const at = r.below(c.n + 1);
        for (let i = c.n; i > at; i--) this.#copyDesc(i - 1, i);
        c.n = Math.min(c.n + 1, c.lo.length);
        c.lo[at] = this.#readAlloc(0);
        c.hi[at] = 0;
        c.len[at] = 0;
        c.flags[at] = r.oneIn(2) ? VIRTQ_DESC_F_WRITE : 0;
        c.next[at] = -1;
        break;
      }
      case 7: // a buffer split byte by byte at its start
        if (c.len[k] > 4 && c.n + 3 < c.lo.length) {
          for (let i = c.n - 1; i > k; i--) this.#copyDesc(i, i + 3);
          const base = c.lo[k] + c.hi[k] * U32;
          for (let j = 1; j <= 3; j++) {
            this.#copyDesc(k, k + j);
            c.lo[k + j] = (base + j) % U32;
            c.len[k + j] = j === 3 ? c.len[k] - 3 : 1;
          }
          c.len[k] = 1;
          c.n += 3;
        }
        break;
      case 8: // the chain cut short
        c.n = Math.max(1, k);
        break;
      default: // another descriptor's address (aliasing)
        c.lo[k] = c.lo[r.below(c.n)];
        c.hi[k] = c.hi[r.below(c.n)];
    }
  }

  #copyDesc(from: number, to: number): void {
    const c = this.#chain;
    if (to >= c.lo.length) return;
    c.lo[to] = c.lo[from];
    c.hi[to] = c.hi[from];
    c.len[to] = c.len[from];
    c.flags[to] = c.flags[from];
    c.next[to] = c.next[from];
  }

  /**
   * Write descriptor `i` of the table at `table`. A writable buffer that would start inside RAM but
   * outside the writable zone is moved into it: what lies outside the writable zone was never granted.
   */
  #putDesc(table: number, i: number, lo: number, hi: number, len: number, flags: number, next: number): void {
    if ((flags & VIRTQ_DESC_F_WRITE) && !(flags & VIRTQ_DESC_F_INDIRECT) && hi === 0 && lo < WRITE_START) {
      lo = WRITE_START + (lo % WRITE_SIZE);
    }
    const v = this.cm.ramView, a = table + VIRTQ_DESC_SIZE * i;
    if (table >= READ_START) {
      this.cm.writeReadableU32(a, lo);
      this.cm.writeReadableU32(a + 4, hi);
      this.cm.writeReadableU32(a + 8, len);
      this.cm.writeReadableU32(a + 12, (flags & 0xffff) | ((next & 0xffff) << 16));
      return;
    }
    v.setUint32(a, lo, true);
    v.setUint32(a + 4, hi, true);
    v.setUint32(a + 8, len, true);
    v.setUint16(a + 12, flags, true);
    v.setUint16(a + 14, next, true);
  }

  /** Lay the chain out (direct or in an indirect table) and publish its head; returns false if nothing was published. */
  #publish(q: DriverQueue, mutated: boolean): void {
    const c = this.#chain, r = this.#r;
    const indirect = c.n > q.size || r.oneIn(4);
    let head: number;
    if (indirect) {
      const table = this.#readAlloc(VIRTQ_DESC_SIZE * c.n);
      for (let i = 0; i < c.n; i++) {
        const nx = c.next[i] <= -2 ? (-2 - c.next[i]) % c.n : c.next[i] >= 0 ? c.next[i] : i + 1;
        const more = i + 1 < c.n || c.next[i] !== -1;
        this.#putDesc(table, i, c.lo[i], c.hi[i], c.len[i], c.flags[i] | (more ? VIRTQ_DESC_F_NEXT : 0), nx);
      }
      head = q.cursor;
      q.cursor = (q.cursor + 1) % q.size;
      let tlen = VIRTQ_DESC_SIZE * c.n;
      let tflags = VIRTQ_DESC_F_INDIRECT;
      let tlo = table;
      if (mutated && r.oneIn(4)) {
        switch (r.below(4)) {
          case 0:
            tlen = r.pick([0, tlen + 1, tlen - 8, 0xffff_fff0]);
            break;
          case 1:
            tflags |= VIRTQ_DESC_F_NEXT;
            break;
          case 2:
            tlo = RAM_SIZE - 8;
            break;
          default: // an indirect descriptor inside the table
            this.#putDesc(table, r.below(c.n), table, 0, tlen, VIRTQ_DESC_F_INDIRECT, 0);
        }
      }
      this.#putDesc(q.desc, head, tlo, 0, tlen, tflags, 0);
    } else {
      const idx = (i: number) => (q.cursor + i) % q.size;
      for (let i = 0; i < c.n; i++) {
        const nx = c.next[i] <= -2 ? idx((-2 - c.next[i]) % c.n) : c.next[i] >= 0 ? c.next[i] : idx(i + 1);
        const more = i + 1 < c.n || c.next[i] !== -1;
        this.#putDesc(q.desc, idx(i), c.lo[i], c.hi[i], c.len[i], c.flags[i] | (more ? VIRTQ_DESC_F_NEXT : 0), nx);
      }
      head = q.cursor;
      q.cursor = idx(c.n);
    }
    if (mutated && r.oneIn(16)) head = q.size + r.below(0x10000 - q.size); // a head beyond the table
    const v = this.cm.ramView;
    v.setUint16(q.avail + VIRTQ_AVAIL_RING + 2 * (q.availIdx % q.size), head, true);
    q.availIdx = (q.availIdx + 1) & 0xffff;
    v.setUint16(q.avail + VIRTQ_AVAIL_IDX, q.availIdx, true);
  }

  #usedIdx(q: DriverQueue): number {
    return this.cm.ramView.getUint16(q.used + VIRTQ_USED_IDX, true);
  }

  // ---- One request ----

  /** Build, publish and notify one batch on queue `qi`; returns whether every chain must have completed. */
  #batch(qi: number): boolean {
    const q = this.#queues[qi], r = this.#r, t = this.#t;
    const role = t.roles[qi];
    const outstanding = (q.availIdx - this.#usedIdx(q) + 0x10000) & 0xffff;
    if (outstanding >= q.size) {
      // Earlier requests of a request queue still not completed: the device holds them (a hang).
      if (role === "request") throw new HeldRequests(`queue ${qi}: ${outstanding} chains outstanding`);
      this.#w(VIRTIO_MMIO_QUEUE_NOTIFY, qi);
      return false;
    }
    const n = Math.min(1 + (r.oneIn(4) ? r.below(4) : 0), q.size - outstanding);
    for (let i = 0; i < n; i++) {
      this.#b.reset();
      t.request(qi, this.#b, r);
      this.#segmentsToChain();
      const mutated = r.oneIn(4);
      if (mutated) this.#mutateChain(q);
      this.#publish(q, mutated);
    }
    this.#w(VIRTIO_MMIO_QUEUE_NOTIFY, qi);
    return role === "request";
  }

  /** Anything else a driver can do: config space, register noise, resets mid-request, ring index jumps. */
  #other(): boolean {
    const r = this.#r, cfg = this.#cfg;
    switch (r.below(6)) {
      case 0: { // config space reads and writes, of every width
        const len = r.pick([1, 2, 4, 8]);
        const off = r.oneIn(8) ? r.below(0xf00) : r.below(64);
        const data = cfg.subarray(0, len);
        if (r.oneIn(2)) this.#bus.read(MMIO_BASE + VIRTIO_MMIO_CONFIG + off, data);
        else {
          for (let i = 0; i < len; i++) data[i] = r.below(4) === 0 ? r.u32() & 0xff : r.below(0x20);
          this.#bus.write(MMIO_BASE + VIRTIO_MMIO_CONFIG + off, data);
        }
        return false;
      }
      case 1: { // register noise, then a clean re-initialisation
        for (let i = 0, n = 1 + r.below(4); i < n; i++) {
          const off = r.oneIn(8) ? r.below(0x100) : r.below(0x40) * 4;
          if (r.oneIn(3)) this.#rd(off);
          else if (r.oneIn(8)) this.#bus.write(MMIO_BASE + off, cfg.subarray(0, r.pick([1, 2, 8])));
          else this.#w(off, r.interesting32());
        }
        this.#init();
        return false;
      }
      case 2: { // a reset with requests published (before or after their notify)
        const qi = r.below(this.#queues.length);
        const q = this.#queues[qi];
        if (((q.availIdx - this.#usedIdx(q) + 0x10000) & 0xffff) < q.size) {
          this.#b.reset();
          this.#t.request(qi, this.#b, r);
          this.#segmentsToChain();
          this.#publish(q, false);
          if (r.oneIn(2)) this.#w(VIRTIO_MMIO_QUEUE_NOTIFY, qi);
        }
        this.#init();
        return false;
      }
      case 3: { // the available index far ahead of what was published, or a notify of no queue
        const q = this.#queues[r.below(this.#queues.length)];
        if (r.oneIn(2)) {
          this.#w(VIRTIO_MMIO_QUEUE_NOTIFY, r.pick([this.#queues.length, 0xffff, r.u32()]));
          return false;
        }
        const v = this.cm.ramView;
        v.setUint16(q.avail + VIRTQ_AVAIL_IDX, (q.availIdx + q.size + 1 + r.below(0x8000)) & 0xffff, true);
        this.#w(VIRTIO_MMIO_QUEUE_NOTIFY, this.#queues.indexOf(q));
        this.#init();
        return false;
      }
      case 4: // interrupt status read and acknowledge, as the driver's handler does
        this.#w(VIRTIO_MMIO_INTERRUPT_ACK, this.#rd(VIRTIO_MMIO_INTERRUPT_STATUS));
        return false;
      default:
        if (this.#t.host && this.#dev) this.#t.host(this.#dev, r);
        return false;
    }
  }

  // ---- The run ----

  #fail(kind: Failure["kind"], what: string): void {
    if (kind === "crash") this.result.crashes++;
    else if (kind === "hang") this.result.hangs++;
    else this.result.oob++;
    const f = { kind, index: this.#index, what };
    if (this.failures.length < 100) this.failures.push(f);
    this.#log(`fuzz ${this.#t.name}: ${kind} at seed ${this.#seed} request ${this.#index}: ${what}`);
  }

  async run(requests: number): Promise<FuzzResult> {
    const r = this.#r, t = this.#t;
    const warmup = Math.min(10_000, Math.floor(requests / 10));
    const half = Math.floor(requests / 2);
    let rss0 = rssMb();
    let rssHalf = rss0;
    await this.#fresh();
    const yieldEvery = t.async ? ASYNC_YIELD_EVERY : SYNC_YIELD_EVERY;
    for (this.#index = 0; this.#index < requests; this.#index++) {
      if (this.#index === warmup) rss0 = rssMb();
      if (this.#index === half) rssHalf = rssMb();
      let broken = false;
      try {
        let qi = -1;
        let expect = false;
        if (r.oneIn(16)) expect = this.#other();
        else {
          qi = r.below(this.#queues.length);
          const before = this.#usedIdx(this.#queues[qi]);
          expect = this.#batch(qi);
          if (expect) {
            const q = this.#queues[qi];
            let turns = 0;
            while (this.#usedIdx(q) !== q.availIdx && turns < (t.async ? HANG_TURNS : 0)) {
              await turn();
              turns++;
            }
            if (this.#usedIdx(q) !== q.availIdx) {
              this.#fail(
                "hang",
                `queue ${qi}: used index ${this.#usedIdx(q)} (was ${before}), published ${q.availIdx}`,
              );
              broken = true;
            }
          }
        }
      } catch (e) {
        if (e instanceof HeldRequests) this.#fail("hang", e.message);
        else this.#fail("crash", briefStack(e));
        broken = true;
      }
      if (this.asyncCrash !== undefined) {
        this.#fail("crash", `asynchronous: ${this.asyncCrash}`);
        this.asyncCrash = undefined;
        broken = true;
      }
      const full = this.#index % FULL_CHECK_EVERY === 0;
      if (!this.cm.guardsIntact()) {
        this.#fail("oob", "a canary page beside guest RAM changed");
        this.cm.restore();
      } else if (!this.cm.zonesIntact(r, SAMPLES, full)) {
        this.#fail("oob", "guest memory the device was not granted changed");
        this.cm.restore();
      }
      this.result.requests++;
      if (broken) {
        try {
          await this.#fresh();
        } catch (e) {
          this.#fail("crash", `fresh device: ${(e as Error).message}`);
          break;
        }
      }
      if ((this.#index + 1) % yieldEvery === 0) await turn();
    }
    if (this.#dev) {
      const stats = this.#dev.stats?.();
      if (stats) this.#log(`fuzz ${t.name}: the last device's counters ${JSON.stringify(stats)}`);
      await this.#closeDevice();
    }
    for (let i = 0; i < 4; i++) await turn();
    const rssEnd = rssMb();
    this.result.rss_growth_mb = Math.round((rssEnd - rss0) * 10) / 10;
    this.result.rss_second_half_mb = Math.round((rssEnd - rssHalf) * 10) / 10;
    this.cm.close();
    return this.result;
  }
}

/** Fuzz one virtio target: `requests` batches from `seed`. */
export async function fuzzVirtio(
  target: VirtioTarget,
  requests: number,
  seed: number,
  log: (line: string) => void = () => {},
): Promise<{ result: FuzzResult; failures: Failure[] }> {
  const f = new VirtioFuzzer(target, seed, log);
  const onRejection = (e: PromiseRejectionEvent) => {
    e.preventDefault();
    f.asyncCrash = e.reason instanceof Error ? e.reason.stack ?? e.reason.message : String(e.reason);
  };
  const onError = (e: ErrorEvent) => {
    e.preventDefault();
    f.asyncCrash = e.error instanceof Error ? e.error.stack ?? e.error.message : String(e.message);
  };
  globalThis.addEventListener("unhandledrejection", onRejection);
  globalThis.addEventListener("error", onError);
  const oldSink = guestLog.sink;
  guestLog.sink = () => {};
  try {
    const result = await f.run(requests);
    return { result, failures: f.failures };
  } finally {
    guestLog.sink = oldSink;
    globalThis.removeEventListener("unhandledrejection", onRejection);
    globalThis.removeEventListener("error", onError);
  }
}

// ---- The device models' requests ----

/** A writable length: mostly what the request needs, sometimes less, more or nothing. */
function wlen(r: Prng, want: number): number {
  switch (r.below(8)) {
    case 0:
      return 0;
    case 1:
      return r.below(want + 1);
    case 2:
      return want + r.below(64);
    default:
      return want;
  }
}

function existsDir(path: string): boolean {
  try {
    return Deno.statSync(path).isDirectory;
  } catch {
    return false;
  }
}

const BLOCK_IMAGE_BYTES = 1 * MiB;
const BLOCK_SECTORS = BLOCK_IMAGE_BYTES / SECTOR_SIZE;
const BLOCK_TYPES = [0, 1, 4, 8, 11, 13];

function blockTarget(): VirtioTarget {
  const paths = new Map<VirtioDevice, string>();
  return {
    name: "block",
    roles: ["request"],
    make() {
      // On tmpfs where there is one: FLUSH's fdatasync then costs nothing and the disk sees no traffic.
      const dir = existsDir("/dev/shm") ? "/dev/shm" : undefined;
      const path = Deno.makeTempFileSync({ dir, prefix: "denovm-fuzz-blk-", suffix: ".img" });
      Deno.truncateSync(path, BLOCK_IMAGE_BYTES);
      const dev = new BlockDevice({ path, readOnly: false, sparse: true, blockSize: 512, direct: false, lock: false });
      paths.set(dev, path);
      return dev;
    },
    close(dev) {
      dev.close?.();
      Deno.removeSync(paths.get(dev)!);
      paths.delete(dev);
    },
    request(_q, b, r) {
      const h = b.read(r.oneIn(32) ? r.below(BLK_OUTHDR_SIZE) : BLK_OUTHDR_SIZE);
      const type = r.oneIn(16) ? r.interesting32() : r.pick(BLOCK_TYPES);
      if (b.pos - h >= 16) {
        b.u32(h, type);
        b.u32(h + 4, r.oneIn(8) ? r.u32() : 0);
        const s = r.below(8);
        const sector = s < 5 ? r.below(BLOCK_SECTORS) : s === 5 ? BLOCK_SECTORS - 1 - r.below(4) : BLOCK_SECTORS;
        b.u64(h + 8, s === 7 ? r.u32() : sector, s === 7 ? r.u32() : 0);
      }
      const bytes = r.oneIn(8) ? r.length(64 * KiB) : SECTOR_SIZE * r.length(32);
      if (type === 1) b.readPayload(r, bytes);
      else if (type === 11 || type === 13) {
        const n = r.oneIn(8) ? r.below(40) : 1 + r.below(3);
        for (let i = 0; i < n; i++) {
          const o = b.read(16);
          b.u64(o, r.oneIn(8) ? r.u32() : r.below(BLOCK_SECTORS), r.oneIn(16) ? r.u32() : 0);
          b.u32(o + 8, r.oneIn(8) ? r.interesting32() : r.below(64));
          b.u32(o + 12, r.oneIn(4) ? r.interesting32() : r.below(2));
        }
      } else if (type === 0 || type === 8) b.writeSplit(r, type === 8 ? wlen(r, 20) : bytes);
      b.write(r.oneIn(16) ? r.below(3) : 1);
    },
  };
}

function rngTarget(): VirtioTarget {
  return {
    name: "rng",
    roles: ["request"],
    make: () => new RngDevice(),
    request(_q, b, r) {
      if (r.oneIn(16)) b.readRandom(r, r.length(64));
      b.writeSplit(r, r.length(128 * KiB));
    },
  };
}

function consoleTarget(): VirtioTarget {
  // Port 0 (receiveq 0, transmitq 1), the control queues (2, 3), port 1 "fuzz" (4, 5).
  return {
    name: "console",
    roles: ["posted", "request", "posted", "request", "posted", "request"],
    make: () => new ConsoleDevice({ output: () => {}, ports: ["fuzz"], size: { cols: 80, rows: 25 } }),
    request(q, b, r) {
      if (q === 3) {
        const o = b.read(r.oneIn(16) ? r.length(16) : CONSOLE_CTRL_SIZE);
        if (b.pos - o >= CONSOLE_CTRL_SIZE) {
          b.u32(o, r.oneIn(8) ? r.interesting32() : r.below(3));
          b.u16(o + 4, r.oneIn(8) ? r.u32() & 0xffff : r.below(8));
          b.u16(o + 6, r.oneIn(4) ? r.u32() & 0xffff : r.below(2));
        }
        if (r.oneIn(8)) b.readRandom(r, r.length(64));
      } else if (q % 2 === 1) {
        b.readPayload(r, r.length(8 * KiB));
        if (r.oneIn(16)) b.write(r.length(64));
      } else {
        if (r.oneIn(16)) b.readRandom(r, r.length(64));
        b.writeSplit(r, r.length(4 * KiB));
      }
    },
    host(dev, r) {
      const c = dev as ConsoleDevice;
      if (r.oneIn(8)) c.resize(r.u32() & 0xffff, r.u32() & 0xffff);
      else {
        const bytes = new Uint8Array(r.length(4 * KiB));
        for (let i = 0; i < bytes.length; i++) bytes[i] = r.u32() & 0xff;
        if (r.oneIn(2)) c.sendInput(bytes);
        else c.openPort("fuzz").write(bytes);
      }
    },
  };
}

/** Linux input event types a driver sends on the status queue (input-event-codes.h). */
const EV_LED = 0x11;
const EV_SND = 0x12;
const EV_REP = 0x14;
/** pvpanic is one I/O port (QEMU docs/specs/pvpanic.rst). */
const PVPANIC_PORT_SPAN = 1;

function inputTarget(): VirtioTarget {
  const kinds = INPUT_DEVICE_KINDS;
  let k = 0;
  return {
    name: "input",
    roles: ["posted", "request"],
    make: () => new InputDevice({ kind: kinds[k++ % kinds.length] }),
    request(q, b, r) {
      if (q === 0) {
        if (r.oneIn(16)) b.readRandom(r, r.length(16));
        b.write(wlen(r, INPUT_EVENT_SIZE));
        return;
      }
      const n = r.oneIn(8) ? r.below(8) : 1;
      for (let i = 0; i < n; i++) {
        const o = b.read(r.oneIn(16) ? r.length(12) : INPUT_EVENT_SIZE);
        if (b.pos - o >= INPUT_EVENT_SIZE) {
          b.u16(o, r.oneIn(8) ? r.u32() & 0xffff : r.pick([EV_LED, EV_SND, EV_REP, 0]));
          b.u16(o + 2, r.oneIn(4) ? r.u32() & 0xffff : r.below(16));
          b.u32(o + 4, r.interesting32());
        }
      }
    },
    host(dev, r) {
      const d = dev as InputDevice;
      try {
        if (r.oneIn(2)) d.sendKey(r.below(0x300), r.oneIn(2));
        else d.sendEvents([{ type: r.below(0x20), code: r.u32() & 0xffff, value: r.interesting32() }]);
      } catch (e) {
        // The host API refuses a key the device does not announce: the host's mistake, not the guest's.
        if (!(e instanceof RangeError)) throw e;
      }
    },
  };
}

/** The port a host program listens on (`<uds>_<port>`) for the guest's connections. */
const VSOCK_LISTEN_PORT = 1234;
const VSOCK_GUEST_CID = 3;

function vsockTarget(): VirtioTarget {
  const dir = Deno.makeTempDirSync({ prefix: "denovm-fuzz-vsock-" });
  let n = 0;
  const listeners = new Map<VirtioDevice, { l: Deno.Listener; dir: string }>();
  return {
    name: "vsock",
    roles: ["posted", "request", "posted"],
    async: true,
    make() {
      const uds = `${dir}/v${n++}.sock`;
      const dev = new VsockDevice({ cid: VSOCK_GUEST_CID, udsPath: uds });
      // A host program: reads what the guest sends, answers with a few bytes, closes when the guest does.
      const l = Deno.listen({ transport: "unix", path: `${uds}_${VSOCK_LISTEN_PORT}` });
      (async () => {
        for await (const c of l) {
          (async () => {
            const buf = new Uint8Array(4096);
            try {
              await c.write(new TextEncoder().encode("hello from the host\n"));
              while ((await c.read(buf)) !== null) { /* discard */ }
            } catch { /* the guest reset it */ }
            try {
              c.close();
            } catch { /* closed */ }
          })();
        }
      })().catch(() => {});
      listeners.set(dev, { l, dir: uds });
      return dev;
    },
    close(dev) {
      dev.close?.();
      const h = listeners.get(dev)!;
      listeners.delete(dev);
      h.l.close();
      try {
        Deno.removeSync(`${h.dir}_${VSOCK_LISTEN_PORT}`);
      } catch { /* gone */ }
    },
    request(q, b, r) {
      if (q === 0) {
        b.writeSplit(r, r.oneIn(8) ? r.length(VSOCK_HDR_SIZE + 64) : VSOCK_HDR_SIZE + r.length(8 * KiB));
        return;
      }
      if (q === 2) {
        b.write(wlen(r, VSOCK_EVENT_SIZE));
        return;
      }
      const payload = r.oneIn(2) ? r.length(4 * KiB) : 0;
      const o = b.read(r.oneIn(32) ? r.length(VSOCK_HDR_SIZE) : VSOCK_HDR_SIZE);
      if (b.pos - o >= VSOCK_HDR_SIZE) {
        b.u64(o, r.oneIn(16) ? r.u32() : VSOCK_GUEST_CID, 0);
        b.u64(o + 8, r.oneIn(16) ? r.u32() : 2, 0);
        b.u32(o + 16, r.oneIn(8) ? r.u32() : 5000 + r.below(4)); // src port
        b.u32(o + 20, r.oneIn(4) ? r.below(2000) : VSOCK_LISTEN_PORT); // dst port
        b.u32(o + 24, r.oneIn(8) ? r.interesting32() : payload);
        b.u16(o + 28, r.oneIn(16) ? r.u32() & 0xffff : 1);
        b.u16(o + 30, r.oneIn(16) ? r.u32() & 0xffff : r.below(8));
        b.u32(o + 32, r.oneIn(4) ? r.interesting32() : r.below(4));
        b.u32(o + 36, r.oneIn(4) ? r.interesting32() : 256 * KiB);
        b.u32(o + 40, r.oneIn(4) ? r.interesting32() : 0);
      }
      if (payload) b.readPayload(r, payload);
    },
  };
}

function balloonTarget(): VirtioTarget {
  return {
    name: "balloon",
    roles: ["request", "request", "posted"],
    make: () => new BalloonDevice({ statsQueue: true, deflateOnOom: true }),
    request(q, b, r) {
      if (q === 2) {
        const n = r.length(12);
        for (let i = 0; i < n; i++) {
          const o = b.read(BALLOON_STAT_SIZE);
          b.u16(o, r.oneIn(4) ? r.u32() & 0xffff : r.below(10));
          b.u64(o + 2, r.u32(), r.oneIn(4) ? r.u32() : 0);
        }
        if (r.oneIn(8)) b.readRandom(r, r.below(BALLOON_STAT_SIZE));
        return;
      }
      const n = r.length(64);
      const o = b.read(4 * n + (r.oneIn(16) ? 1 + r.below(3) : 0));
      // Pages of the writable zone (what the guest may give away), or none of the guest's at all.
      const first = WRITE_START / BALLOON_PAGE_SIZE;
      const pages = WRITE_SIZE / BALLOON_PAGE_SIZE;
      for (let i = 0; i < n; i++) {
        const pfn = r.oneIn(8) ? RAM_SIZE / BALLOON_PAGE_SIZE + r.u32() % 0x10_0000 : first + r.below(pages);
        b.u32(o + 4 * i, r.oneIn(32) ? 0xffff_ffff : pfn);
      }
      if (r.oneIn(16)) b.write(r.length(64));
    },
    host(dev, r) {
      (dev as BalloonDevice).setTarget(BALLOON_PAGE_SIZE * r.below(256));
    },
  };
}

const GPU_CMDS = [
  G.CMD_GET_DISPLAY_INFO,
  G.CMD_RESOURCE_CREATE_2D,
  G.CMD_RESOURCE_UNREF,
  G.CMD_SET_SCANOUT,
  G.CMD_RESOURCE_FLUSH,
  G.CMD_TRANSFER_TO_HOST_2D,
  G.CMD_RESOURCE_ATTACH_BACKING,
  G.CMD_RESOURCE_DETACH_BACKING,
  G.CMD_GET_CAPSET_INFO,
  G.CMD_GET_CAPSET,
  G.CMD_GET_EDID,
  G.CMD_RESOURCE_ASSIGN_UUID,
  G.CMD_RESOURCE_CREATE_BLOB,
  G.CMD_SET_SCANOUT_BLOB,
  G.CMD_CTX_CREATE,
  G.CMD_CTX_DESTROY,
  G.CMD_SUBMIT_3D,
  G.CMD_RESOURCE_MAP_BLOB,
  G.CMD_RESOURCE_UNMAP_BLOB,
];
const GPU_FORMATS = [1, 2, 3, 4, 67, 68, 121, 134];

function gpuTarget(): VirtioTarget {
  const id = (r: Prng) => r.oneIn(16) ? r.interesting32() : 1 + r.below(4);
  const dim = (r: Prng) => r.oneIn(16) ? r.interesting32() : r.below(4) === 0 ? r.below(700) : 1 + r.below(64);
  const rect = (r: Prng) => [r.oneIn(2) ? 0 : dim(r), r.oneIn(2) ? 0 : dim(r), dim(r), dim(r)];
  const ramAddr = (r: Prng) => r.oneIn(8) ? r.u32() : READ_START + r.below(RAM_SIZE - READ_START);
  /** The le32 words of a command's body (struct layouts of linux/virtio_gpu.h), with plausible values. */
  const body = (type: number, r: Prng): number[] => {
    switch (type) {
      case G.CMD_RESOURCE_CREATE_2D:
        return [id(r), r.oneIn(8) ? r.interesting32() : r.pick(GPU_FORMATS), dim(r), dim(r)];
      case G.CMD_RESOURCE_UNREF:
      case G.CMD_RESOURCE_DETACH_BACKING:
      case G.CMD_RESOURCE_ASSIGN_UUID:
        return [id(r), 0];
      case G.CMD_SET_SCANOUT:
        return [...rect(r), r.oneIn(8) ? r.interesting32() : 0, r.oneIn(8) ? 0 : id(r)];
      case G.CMD_RESOURCE_FLUSH:
        return [...rect(r), id(r), 0];
      case G.CMD_TRANSFER_TO_HOST_2D:
        return [...rect(r), r.oneIn(4) ? r.interesting32() : 4 * r.below(4096), r.oneIn(16) ? r.u32() : 0, id(r), 0];
      case G.CMD_RESOURCE_ATTACH_BACKING:
      case G.CMD_RESOURCE_CREATE_BLOB: {
        const n = r.oneIn(8) ? r.below(300) : 1 + r.below(3);
        const entries: number[] = [];
        for (let i = 0; i < Math.min(n, 8); i++) {
          entries.push(ramAddr(r), r.oneIn(16) ? r.u32() : 0, r.oneIn(8) ? r.interesting32() : r.length(64 * KiB), 0);
        }
        if (type === G.CMD_RESOURCE_ATTACH_BACKING) return [id(r), r.oneIn(8) ? r.interesting32() : n, ...entries];
        // blob_mem (1 guest, 2 host3d...), blob_flags, nr_entries, blob_id, size
        return [
          id(r),
          r.below(5),
          r.below(8),
          n,
          r.below(4),
          0,
          r.length(128 * KiB),
          r.oneIn(16) ? r.u32() : 0,
          ...entries,
        ];
      }
      case G.CMD_SET_SCANOUT_BLOB:
        return [...rect(r), 0, id(r), dim(r), dim(r), r.pick(GPU_FORMATS), 0, ...rect(r), ...rect(r)];
      case G.CMD_UPDATE_CURSOR:
      case G.CMD_MOVE_CURSOR:
        return [r.oneIn(8) ? r.interesting32() : 0, dim(r), dim(r), 0, r.oneIn(4) ? 0 : id(r), dim(r), dim(r), 0];
      case G.CMD_RESOURCE_MAP_BLOB:
        return [id(r), 0, r.below(1 << 20) * 4096, 0];
      case G.CMD_GET_DISPLAY_INFO:
        return [];
      default:
        return [r.below(4), r.below(4), r.interesting32(), r.interesting32()];
    }
  };
  return {
    name: "gpu",
    roles: ["request", "request"],
    make: () => new GpuDevice({ backend: new Backend2D(), displays: [{ width: 640, height: 480 }] }),
    request(q, b, r) {
      const type = q === 1
        ? (r.oneIn(8) ? r.pick(GPU_CMDS) : r.pick([G.CMD_UPDATE_CURSOR, G.CMD_MOVE_CURSOR]))
        : r.oneIn(16)
        ? r.interesting32()
        : r.pick(GPU_CMDS);
      const words = body(type, r);
      if (r.oneIn(4) && words.length) words[r.below(words.length)] = r.interesting32();
      const full = G.HDR_SIZE + 4 * words.length;
      const o = b.read(r.oneIn(16) ? r.length(full + 8) : full);
      const have = b.pos - o;
      if (have >= G.HDR_SIZE) {
        b.u32(o + G.HDR_TYPE, type);
        b.u32(o + G.HDR_FLAGS, r.oneIn(4) ? r.pick([G.VIRTIO_GPU_FLAG_FENCE, 3, r.u32()]) : 0);
        b.u64(o + G.HDR_FENCE_ID, r.below(1000), r.oneIn(32) ? r.u32() : 0);
        b.u32(o + G.HDR_CTX_ID, r.oneIn(8) ? r.below(4) : 0);
        for (let i = 0; i < words.length && G.HDR_SIZE + 4 * i + 4 <= have; i++) {
          b.u32(o + G.HDR_SIZE + 4 * i, words[i]);
        }
      }
      b.writeSplit(r, wlen(r, r.pick([G.HDR_SIZE, 408, 1024])));
    },
  };
}

/**
 * Ethernet broadcast ARP request (RFC 826) from the guest (02:00:00:00:00:02, 10.0.2.2) for the host's
 * 10.0.2.1: Ethernet header, then htype 1, ptype IPv4, hlen 6, plen 4, op 1, sha, spa, tha, tpa.
 */
const ARP_FRAME = Uint8Array.from([
  ...[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0, 2, 0x08, 0x06],
  ...[0, 1, 0x08, 0x00, 6, 4, 0, 1, 2, 0, 0, 0, 0, 2, 10, 0, 2, 2, 0, 0, 0, 0, 0, 0, 10, 0, 2, 1],
]);

function netTarget(tapName: string): VirtioTarget {
  return {
    name: "net",
    roles: ["posted", "request"],
    async: true,
    make() {
      // The tap lives as long as the device has it open: each fresh device's tap is set up anew.
      const dev = new NetDevice({ tapName, mac: "02:00:00:00:00:02" });
      configureInterface(tapName, { ip: "10.0.2.1", netmask: "255.255.255.0", up: true });
      return dev;
    },
    async close(dev) {
      const d = dev as NetDevice;
      d.close();
      await d.done;
    },
    request(q, b, r) {
      if (q === 0) {
        if (r.oneIn(16)) b.readRandom(r, r.length(32));
        b.writeSplit(r, r.oneIn(4) ? r.length(VIRTIO_NET_HDR_SIZE + 1600) : VIRTIO_NET_HDR_SIZE + 1514);
        return;
      }
      const o = b.read(r.oneIn(32) ? r.length(VIRTIO_NET_HDR_SIZE) : VIRTIO_NET_HDR_SIZE);
      if (b.pos - o >= VIRTIO_NET_HDR_SIZE) {
        b.u8(o, r.oneIn(4) ? r.u32() & 0xff : r.below(2));
        b.u8(o + 1, r.oneIn(4) ? r.u32() & 0xff : r.pick([0, 1, 3, 4, 0x81]));
        for (let i = 2; i < VIRTIO_NET_HDR_SIZE; i += 2) b.u16(o + i, r.oneIn(4) ? r.u32() & 0xffff : r.below(100));
      }
      if (r.oneIn(4)) {
        // A well-formed ARP request for the host's address: the kernel answers, and the answer comes back
        // through the receive queue's (mutated) buffers.
        if (r.oneIn(2)) b.data.fill(0, o, b.pos); // a plain header: no offloads asked for
        const f = b.read(ARP_FRAME.length);
        b.data.set(ARP_FRAME, f);
        return;
      }
      const frame = r.oneIn(16) ? r.length(70 * KiB) : 14 + r.length(1500);
      const f = b.pos;
      b.readPayload(r, frame);
      // Mostly to the host's address on the tap (broadcast ARP, IPv4): the kernel answers some.
      if (frame >= 14 && r.oneIn(2)) {
        b.data.fill(0xff, f, f + 6);
        b.u16(f + 12, r.pick([0x0608, 0x0008, 0xdd86]));
      }
      if (r.oneIn(16)) b.write(r.length(64));
    },
  };
}

// ---- Legacy devices: port accesses ----

interface LegacyTarget {
  name: string;
  base: number;
  make(): { dev: { read(o: number, d: Uint8Array): void; write(o: number, d: Uint8Array): void }; span: number };
  host?(dev: unknown, r: Prng): void;
}

function legacyTargets(): LegacyTarget[] {
  return [
    {
      name: "serial",
      base: SERIAL_PORTS[0].base,
      make: () => ({ dev: new Serial({ interrupt: () => {}, output: () => {} }), span: UART_REGISTER_COUNT }),
      host(dev, r) {
        const bytes = new Uint8Array(r.length(256));
        for (let i = 0; i < bytes.length; i++) bytes[i] = r.u32() & 0xff;
        (dev as Serial).enqueueInput(bytes);
      },
    },
    {
      name: "i8042",
      base: I8042_DATA_PORT,
      make() {
        const dev = new I8042({ dataPort: I8042_DATA_PORT, commandPort: I8042_COMMAND_PORT, onReset: () => {} });
        return { dev, span: dev.portSpan };
      },
    },
    {
      name: "cmos",
      base: CMOS_INDEX_PORT,
      make: () => ({ dev: new Cmos(() => new Date(Date.UTC(2024, 1, 29, 23, 59, 59))), span: CMOS_PORT_SPAN }),
    },
    {
      name: "acpi-pm",
      base: ACPI_SLEEP_CONTROL_PORT,
      make() {
        const dev = new AcpiPm(
          {
            sleepControlPort: ACPI_SLEEP_CONTROL_PORT,
            resetPort: ACPI_RESET_PORT,
            resetValue: ACPI_RESET_VALUE,
            s5SleepType: ACPI_SLEEP_TYPE_S5,
          },
          { powerOff: () => {}, reset: () => {}, log: () => {} },
        );
        return { dev, span: dev.portSpan };
      },
    },
    {
      name: "pvpanic",
      base: PVPANIC_PORT,
      make: () => ({ dev: new PvPanic(() => {}, () => {}), span: PVPANIC_PORT_SPAN }),
    },
  ];
}

/** Random reads and writes of 1, 2 and 4 bytes around the device's ports. */
function fuzzLegacy(t: LegacyTarget, requests: number, seed: number, log: (line: string) => void): FuzzResult {
  const res = emptyResult();
  const r = new Prng(seed ^ hashName(t.name));
  const buf = new Uint8Array(4);
  let { dev, span } = t.make();
  let bus = new Bus("io");
  bus.add(t.base, span, dev, t.name);
  const warmup = Math.min(10_000, Math.floor(requests / 10));
  const half = Math.floor(requests / 2);
  let rss0 = rssMb();
  let rssHalf = rss0;
  for (let i = 0; i < requests; i++) {
    if (i === warmup) rss0 = rssMb();
    if (i === half) rssHalf = rssMb();
    try {
      if (t.host && r.oneIn(64)) t.host(dev, r);
      const size = r.pick([1, 1, 1, 2, 4]);
      const data = buf.subarray(0, size);
      const port = t.base - 1 + r.below(span + 2);
      if (r.oneIn(2)) bus.read(port, data);
      else {
        const v = r.oneIn(2) ? r.interesting32() : r.below(0x100);
        for (let k = 0; k < size; k++) data[k] = (v >>> (8 * k)) & 0xff;
        bus.write(port, data);
      }
    } catch (e) {
      res.crashes++;
      log(`fuzz ${t.name}: crash at seed ${seed} request ${i}: ${briefStack(e)}`);
      ({ dev, span } = t.make());
      bus = new Bus("io");
      bus.add(t.base, span, dev, t.name);
    }
    res.requests++;
  }
  const rssEnd = rssMb();
  res.rss_growth_mb = Math.round((rssEnd - rss0) * 10) / 10;
  res.rss_second_half_mb = Math.round((rssEnd - rssHalf) * 10) / 10;
  return res;
}

// ---- The campaign ----

/** Every device the in-process campaign fuzzes, in order. */
export const DEVICE_NAMES: readonly string[] = [
  "block",
  "net",
  "console",
  "rng",
  "input",
  "vsock",
  "balloon",
  "gpu",
  "serial",
  "i8042",
  "cmos",
  "acpi-pm",
  "pvpanic",
];

const VIRTIO_TARGETS: Record<string, () => VirtioTarget> = {
  block: blockTarget,
  console: consoleTarget,
  rng: rngTarget,
  input: inputTarget,
  vsock: vsockTarget,
  balloon: balloonTarget,
  gpu: gpuTarget,
};

/** Set in the environment of the child that fuzzes net inside its own network namespace. */
const NET_NS_ENV = "DENOVM_FUZZ_NETNS";
const FUZZ_TAP = "dvfuzz0";

/** net needs a tap: it runs in a child process inside a fresh network namespace, so nothing leaves it. */
async function fuzzNet(opts: FuzzOptions, log: (line: string) => void): Promise<FuzzResult | undefined> {
  if (Deno.env.get(NET_NS_ENV)) {
    return (await fuzzVirtio(netTarget(FUZZ_TAP), opts.requestsPerDevice, opts.seed, log)).result;
  }
  const ns = `denovm-fuzz-${Deno.pid}`;
  const add = await new Deno.Command("ip", { args: ["netns", "add", ns], stderr: "piped" }).output().catch(() => null);
  if (!add?.success) {
    log(`fuzz net: skipped, no network namespace (${add ? new TextDecoder().decode(add.stderr).trim() : "no ip"})`);
    return undefined;
  }
  try {
    await new Deno.Command("ip", {
      args: ["netns", "exec", ns, "sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6"],
    }).output();
    const out = await new Deno.Command("ip", {
      args: [
        "netns",
        "exec",
        ns,
        Deno.execPath(),
        "run",
        "--allow-all",
        "--v8-flags=--expose-gc",
        new URL(import.meta.url).pathname,
        "--devices",
        "net",
        "--requests",
        String(opts.requestsPerDevice),
        "--seed",
        String(opts.seed),
      ],
      env: { [NET_NS_ENV]: ns, NO_COLOR: "1" },
      stdout: "piped",
      stderr: "piped",
    }).output();
    for (const l of new TextDecoder().decode(out.stderr).split("\n")) if (l.trim()) log(l);
    const last = new TextDecoder().decode(out.stdout).trim().split("\n").at(-1) ?? "";
    if (!out.success) {
      log(`fuzz net: the child in namespace ${ns} exited ${out.code}`);
      return { ...emptyResult(), crashes: 1 };
    }
    return JSON.parse(last).devices.net as FuzzResult;
  } finally {
    await new Deno.Command("ip", { args: ["netns", "del", ns] }).output();
  }
}

/** Fuzz every device model (or `opts.devices`): one result per device. */
export async function fuzzDevices(opts: FuzzOptions): Promise<Record<string, FuzzResult>> {
  const log = opts.log ?? (() => {});
  const names = opts.devices ?? DEVICE_NAMES;
  const out: Record<string, FuzzResult> = {};
  const legacy = new Map(legacyTargets().map((t) => [t.name, t]));
  for (const name of names) {
    const t0 = performance.now();
    let res: FuzzResult | undefined;
    if (name === "net") res = await fuzzNet(opts, log);
    else if (VIRTIO_TARGETS[name]) {
      res = (await fuzzVirtio(VIRTIO_TARGETS[name](), opts.requestsPerDevice, opts.seed, log)).result;
    } else if (legacy.has(name)) res = fuzzLegacy(legacy.get(name)!, opts.requestsPerDevice, opts.seed, log);
    else throw new Error(`fuzz: no device "${name}" (have: ${DEVICE_NAMES.join(", ")})`);
    if (!res) continue;
    out[name] = res;
    const s = (performance.now() - t0) / 1000;
    log(
      `fuzz ${name}: ${res.requests} requests in ${s.toFixed(1)} s (${Math.round(res.requests / s)}/s), ` +
        `${res.crashes} crashes, ${res.hangs} hangs, ${res.oob} oob, RSS +${res.rss_growth_mb} MiB (+${res.rss_second_half_mb} in the second half)`,
    );
  }
  return out;
}

if (import.meta.main) {
  const arg = (name: string) => {
    const i = Deno.args.indexOf(name);
    return i >= 0 ? Deno.args[i + 1] : undefined;
  };
  const seed = Number(arg("--seed") ?? Date.now() % 0x1_0000_0000);
  const requestsPerDevice = Number(arg("--requests") ?? 1_000_000);
  const devices = arg("--devices")?.split(",");
  console.error(`fuzz: seed ${seed}, ${requestsPerDevice} requests per device`);
  const res = await fuzzDevices({ requestsPerDevice, seed, devices, log: (l) => console.error(l) });
  console.log(JSON.stringify({ bench: "fuzz", seed, devices: res }));
}
