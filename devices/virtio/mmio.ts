// The virtio-mmio transport, version 2 (virtio 1.2 spec, section 4.2; Linux
// include/uapi/linux/virtio_mmio.h): the register model only. The VMM routes MMIO exits
// and ioeventfds here and wires VirtioIrq to an irqfd; nothing here knows about KVM.

import { type ActivateContext, VIRTIO_F_VERSION_1, type VirtioDevice, type VirtioInterrupt } from "./device.ts";
import { VIRTQ_MAX_SIZE, Virtqueue } from "./queue.ts";
import { RateLimitedLog } from "../../core/log.ts";
import { VIRTIO_F_EVENT_IDX } from "./device.ts";
import type { GuestMemory } from "../../core/memory.ts";
import {
  type DeviceState,
  stateArray,
  stateBoolean,
  stateData,
  StateError,
  stateNumber,
  stateRecord,
  stateString,
  type StateValue,
} from "../../core/state.ts";

// ---- Register offsets (virtio_mmio.h, spec 4.2.2 table "MMIO Device Register Layout") ----
export const VIRTIO_MMIO_MAGIC_VALUE = 0x000;
export const VIRTIO_MMIO_VERSION = 0x004;
export const VIRTIO_MMIO_DEVICE_ID = 0x008;
export const VIRTIO_MMIO_VENDOR_ID = 0x00c;
export const VIRTIO_MMIO_DEVICE_FEATURES = 0x010;
export const VIRTIO_MMIO_DEVICE_FEATURES_SEL = 0x014;
export const VIRTIO_MMIO_DRIVER_FEATURES = 0x020;
export const VIRTIO_MMIO_DRIVER_FEATURES_SEL = 0x024;
export const VIRTIO_MMIO_QUEUE_SEL = 0x030;
export const VIRTIO_MMIO_QUEUE_NUM_MAX = 0x034;
export const VIRTIO_MMIO_QUEUE_NUM = 0x038;
export const VIRTIO_MMIO_QUEUE_READY = 0x044;
export const VIRTIO_MMIO_QUEUE_NOTIFY = 0x050;
export const VIRTIO_MMIO_INTERRUPT_STATUS = 0x060;
export const VIRTIO_MMIO_INTERRUPT_ACK = 0x064;
export const VIRTIO_MMIO_STATUS = 0x070;
export const VIRTIO_MMIO_QUEUE_DESC_LOW = 0x080;
export const VIRTIO_MMIO_QUEUE_DESC_HIGH = 0x084;
export const VIRTIO_MMIO_QUEUE_AVAIL_LOW = 0x090;
export const VIRTIO_MMIO_QUEUE_AVAIL_HIGH = 0x094;
export const VIRTIO_MMIO_QUEUE_USED_LOW = 0x0a0;
export const VIRTIO_MMIO_QUEUE_USED_HIGH = 0x0a4;
export const VIRTIO_MMIO_SHM_SEL = 0x0ac;
export const VIRTIO_MMIO_SHM_LEN_LOW = 0x0b0;
export const VIRTIO_MMIO_SHM_LEN_HIGH = 0x0b4;
export const VIRTIO_MMIO_SHM_BASE_LOW = 0x0b8;
export const VIRTIO_MMIO_SHM_BASE_HIGH = 0x0bc;
export const VIRTIO_MMIO_QUEUE_RESET = 0x0c0;
export const VIRTIO_MMIO_CONFIG_GENERATION = 0x0fc;
export const VIRTIO_MMIO_CONFIG = 0x100;

/** "virt" in little endian (spec 4.2.2). */
export const VIRTIO_MMIO_MAGIC = 0x74726976;
/** The modern transport; version 1 is legacy and never offered. */
export const VIRTIO_MMIO_VERSION_2 = 2;
/** Vendor id reported by denovm ("DNVM" in little endian; the spec leaves it free). */
export const VIRTIO_MMIO_VENDOR_DENOVM = 0x4d564e44;
/** InterruptStatus bits (virtio_mmio.h VIRTIO_MMIO_INT_VRING / _CONFIG). */
export const VIRTIO_MMIO_INT_VRING = 1;
export const VIRTIO_MMIO_INT_CONFIG = 2;
/**
 * A flag kept in the InterruptStatus cell of a transport whose device serves its queues out of process
 * (VirtioDevice.servesQueuesOutOfProcess): the back end writes the irqfd without this transport knowing,
 * so every InterruptStatus read reports VIRTIO_MMIO_INT_VRING (Linux's vm_interrupt looks at the rings
 * only when that bit is set). Not a register bit: the guest never sees it and InterruptACK cannot clear it.
 */
const INT_VRING_ALWAYS = 1 << 30;
/** The InterruptStatus bits the guest sees. */
const INT_BITS = VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG;
/** An absent shared-memory region reads as all ones in SHMLen and SHMBase (spec 4.2.2). */
const SHM_ABSENT = 0xffff_ffff;

/** Device status bits (spec 2.1, virtio_config.h VIRTIO_CONFIG_S_*). */
export const VIRTIO_STATUS_ACKNOWLEDGE = 1;
export const VIRTIO_STATUS_DRIVER = 2;
export const VIRTIO_STATUS_DRIVER_OK = 4;
export const VIRTIO_STATUS_FEATURES_OK = 8;
export const VIRTIO_STATUS_DEVICE_NEEDS_RESET = 64;
export const VIRTIO_STATUS_FAILED = 128;

/** VIRTIO_F_RING_RESET (spec 6): lets the driver reset one queue through QueueReset. */
export const VIRTIO_F_RING_RESET = 1n << 40n;

const REG_SIZE = 4;
const U32 = 0x1_0000_0000;

/** How the transport raises its interrupt line (an irqfd in the VMM). */
export interface VirtioIrq {
  trigger(): void;
}

export interface VirtioMmioOptions {
  irq: VirtioIrq;
  /**
   * Where InterruptStatus lives: element `index` of a shared Int32Array, so that a vCPU thread can
   * answer the InterruptStatus read and InterruptACK write of every interrupt itself (see
   * virtioInterruptRegisters) while this transport raises bits with Atomics. Default: a private cell.
   */
  interruptCell?: { cells: Int32Array; index: number };
  /** Guest-physical base of shared-memory region `id`, or undefined when it is not mapped. */
  shmBase?: (id: number) => number | undefined;
  /**
   * The QueueNotify ioeventfd of each queue and the irqfd, handed to a device that serves its queues out
   * of process (ActivateContext.notifyFds, irqFd). The transport does not own them.
   */
  notifyFds?: readonly number[];
  irqFd?: number;
}

interface QueueState {
  num: number;
  ready: boolean;
  desc: number;
  avail: number;
  used: number;
  /** QueueReset reads 1 after a reset until the queue is enabled again. */
  reset: boolean;
}

function freshQueue(max: number): QueueState {
  return { num: max, ready: false, desc: 0, avail: 0, used: 0, reset: false };
}

/** Replace the low or high 32 bits of a 64-bit guest address. */
function setHalf(old: number, v: number, high: boolean): number {
  const lo = old % U32;
  const hi = Math.floor(old / U32);
  return high ? v * U32 + lo : hi * U32 + v;
}

// ---- InterruptStatus and InterruptACK, served by the transport and by the vCPU threads ----
//
// A transport's InterruptStatus is one Int32 cell in shared memory. The transport sets bits with
// Atomics.or before it signals its interrupt; the two accesses of every interrupt (the driver reads
// InterruptStatus, then writes the bits it handled to InterruptACK) are answered by these functions,
// both from the transport's read()/write() and from a vCPU thread that serves them itself.

/** The InterruptStatus read: the cell's bits (VRING always for an out-of-process device, see INT_VRING_ALWAYS). */
function interruptStatusOf(cells: Int32Array, index: number): number {
  const v = Atomics.load(cells, index);
  return (v & INT_BITS) | (v & INT_VRING_ALWAYS ? VIRTIO_MMIO_INT_VRING : 0);
}

/** The InterruptACK write: clear the bits the driver handled. */
function acknowledgeInterrupt(cells: Int32Array, index: number, bits: number): void {
  Atomics.and(cells, index, ~(bits & INT_BITS));
}

/**
 * The InterruptStatus cells of a VM's transports: transport i, whose register window starts at
 * guest-physical bases[i], uses element i of `cells`. The windows lie on a grid of `windowSize` bytes.
 */
export interface VirtioInterruptCells {
  cells: SharedArrayBuffer;
  bases: readonly number[];
  windowSize: number;
}

/**
 * A vCPU thread's answer to the InterruptStatus read and InterruptACK write of every transport in
 * `shared`: returns a function of an MMIO access (guest-physical `addr`, `len` bytes, its data at
 * byte `at` of `data`) that is true when it served the access and false for everything else, or
 * undefined when there are no transports. It runs on every virtio interrupt: the window is found in
 * a table indexed by window number (-1 where no transport is), with no Map and no `%` on an address
 * above 2^31 (a floating-point remainder).
 */
export function virtioInterruptRegisters(
  shared: VirtioInterruptCells,
  data: DataView,
): ((addr: number, len: number, isWrite: boolean, at: number) => boolean) | undefined {
  const { bases, windowSize } = shared;
  if (bases.length === 0) return undefined;
  const cells = new Int32Array(shared.cells);
  const first = Math.min(...bases);
  if (bases.some((b) => (b - first) % windowSize !== 0)) {
    throw new RangeError(`virtio-mmio bases not on a ${windowSize}-byte grid: ${bases}`);
  }
  const slotOf = new Int32Array((Math.max(...bases) - first) / windowSize + 1).fill(-1);
  bases.forEach((b, i) => slotOf[(b - first) / windowSize] = i);
  const span = slotOf.length * windowSize;
  return (addr, len, isWrite, at) => {
    if (len !== REG_SIZE) return false;
    const rel = addr - first;
    if (rel < 0 || rel >= span) return false;
    const window = Math.floor(rel / windowSize);
    const slot = slotOf[window];
    if (slot < 0) return false;
    const offset = rel - window * windowSize;
    if (!isWrite && offset === VIRTIO_MMIO_INTERRUPT_STATUS) {
      data.setUint32(at, interruptStatusOf(cells, slot), true);
      return true;
    }
    if (isWrite && offset === VIRTIO_MMIO_INTERRUPT_ACK) {
      acknowledgeInterrupt(cells, slot, data.getUint32(at, true));
      return true;
    }
    return false;
  };
}

export class VirtioMmioTransport {
  readonly device: VirtioDevice;
  readonly #mem: GuestMemory;
  readonly #irq: VirtioIrq;
  readonly #shmBase: (id: number) => number | undefined;
  readonly #log: RateLimitedLog;
  readonly #notifyFds?: readonly number[];
  readonly #irqFd?: number;
  /** INT_VRING_ALWAYS for a device that serves its queues out of process, else 0. */
  readonly #isrFlags: number;
  #deviceFeaturesSel = 0;
  #driverFeaturesSel = 0;
  #driverFeatures = 0n;
  #acked = 0n;
  #queueSel = 0;
  #queues: QueueState[] = [];
  #status = 0;
  /** InterruptStatus, shared with the vCPU threads (see VirtioMmioOptions.interruptCell). */
  readonly #isr: Int32Array;
  readonly #isrIndex: number;
  #configGeneration = 0;
  #shmSel = 0;
  #active: (Virtqueue | undefined)[] | null = null;
  /** Queues the driver kicked after setting them up but before DRIVER_OK; delivered at activation. */
  readonly #earlyNotifies = new Set<number>();
  /** Exits served, per register name: cheap counters for stats. */
  readonly counters = { reads: 0, writes: 0, notifies: 0, interrupts: 0, guestErrors: 0 };

  constructor(device: VirtioDevice, mem: GuestMemory, opts: VirtioMmioOptions) {
    this.device = device;
    this.#mem = mem;
    this.#irq = opts.irq;
    this.#shmBase = opts.shmBase ?? (() => undefined);
    this.#log = new RateLimitedLog(`virtio-mmio ${device.name}`);
    this.#isr = opts.interruptCell?.cells ?? new Int32Array(new SharedArrayBuffer(4));
    this.#isrIndex = opts.interruptCell?.index ?? 0;
    this.#notifyFds = opts.notifyFds;
    this.#irqFd = opts.irqFd;
    this.#isrFlags = device.servesQueuesOutOfProcess ? INT_VRING_ALWAYS : 0;
    this.#resetState();
  }

  get interruptStatus(): number {
    return interruptStatusOf(this.#isr, this.#isrIndex);
  }
  get status(): number {
    return this.#status;
  }
  /** Features the driver acknowledged (valid from FEATURES_OK). */
  get ackedFeatures(): bigint {
    return this.#acked;
  }
  /** The live queues after DRIVER_OK, else null. */
  get queues(): readonly (Virtqueue | undefined)[] | null {
    return this.#active;
  }

  #guestError(msg: string): void {
    this.counters.guestErrors++;
    this.#log.log(msg);
  }

  #resetState(): void {
    this.#deviceFeaturesSel = 0;
    this.#driverFeaturesSel = 0;
    this.#driverFeatures = 0n;
    this.#acked = 0n;
    this.#queueSel = 0;
    this.#queues = this.device.queueMaxSizes.map((m) => freshQueue(m));
    this.#status = 0;
    Atomics.store(this.#isr, this.#isrIndex, this.#isrFlags);
    this.#shmSel = 0;
    this.#active = null;
    this.#earlyNotifies.clear();
  }

  /** The interrupt handle given to the device at activation. */
  readonly #interrupt: VirtioInterrupt = {
    signalUsedQueue: (_index: number) => this.#raise(VIRTIO_MMIO_INT_VRING),
    signalConfigChange: () => {
      this.#configGeneration = (this.#configGeneration + 1) >>> 0;
      this.#raise(VIRTIO_MMIO_INT_CONFIG);
    },
  };

  #raise(bit: number): void {
    Atomics.or(this.#isr, this.#isrIndex, bit);
    this.counters.interrupts++;
    this.#irq.trigger();
  }

  /** The device (outside the driver's control) changed its config: bump the generation and interrupt. */
  configChanged(): void {
    this.#interrupt.signalConfigChange();
  }

  read(offset: number, data: Uint8Array): void {
    this.counters.reads++;
    if (offset >= VIRTIO_MMIO_CONFIG) {
      this.device.readConfig(offset - VIRTIO_MMIO_CONFIG, data);
      return;
    }
    data.fill(0);
    if (data.length !== REG_SIZE || offset % REG_SIZE !== 0) {
      this.#guestError(`read of ${data.length} bytes at register 0x${offset.toString(16)}; registers are 32-bit`);
      return;
    }
    new DataView(data.buffer, data.byteOffset, REG_SIZE).setUint32(0, this.#readReg(offset) >>> 0, true);
  }

  #readReg(offset: number): number {
    const q = this.#queues[this.#queueSel];
    switch (offset) {
      case VIRTIO_MMIO_MAGIC_VALUE:
        return VIRTIO_MMIO_MAGIC;
      case VIRTIO_MMIO_VERSION:
        return VIRTIO_MMIO_VERSION_2;
      case VIRTIO_MMIO_DEVICE_ID:
        return this.device.deviceType;
      case VIRTIO_MMIO_VENDOR_ID:
        return VIRTIO_MMIO_VENDOR_DENOVM;
      case VIRTIO_MMIO_DEVICE_FEATURES:
        if (this.#deviceFeaturesSel > 1) return 0;
        return Number((this.device.features >> BigInt(32 * this.#deviceFeaturesSel)) & 0xffff_ffffn);
      case VIRTIO_MMIO_QUEUE_NUM_MAX:
        return q ? this.device.queueMaxSizes[this.#queueSel] : 0;
      case VIRTIO_MMIO_QUEUE_READY:
        return q?.ready ? 1 : 0;
      case VIRTIO_MMIO_QUEUE_RESET:
        return q?.reset ? 1 : 0;
      case VIRTIO_MMIO_INTERRUPT_STATUS:
        return interruptStatusOf(this.#isr, this.#isrIndex);
      case VIRTIO_MMIO_STATUS:
        return this.#status;
      case VIRTIO_MMIO_SHM_LEN_LOW:
      case VIRTIO_MMIO_SHM_LEN_HIGH:
      case VIRTIO_MMIO_SHM_BASE_LOW:
      case VIRTIO_MMIO_SHM_BASE_HIGH: {
        const shm = this.#shm();
        if (!shm) return SHM_ABSENT;
        const v = offset === VIRTIO_MMIO_SHM_LEN_LOW || offset === VIRTIO_MMIO_SHM_LEN_HIGH ? shm.size : shm.base;
        const high = offset === VIRTIO_MMIO_SHM_LEN_HIGH || offset === VIRTIO_MMIO_SHM_BASE_HIGH;
        return high ? Math.floor(v / U32) : v % U32;
      }
      case VIRTIO_MMIO_CONFIG_GENERATION:
        return this.#configGeneration;
      default:
        this.#guestError(`read of write-only or unknown register 0x${offset.toString(16)}`);
        return 0;
    }
  }

  /** The selected shared-memory region, when the device has it and the VMM placed it. */
  #shm(): { size: number; base: number } | undefined {
    const r = this.device.sharedMemoryRegions?.().find((r) => r.id === this.#shmSel);
    if (!r) return undefined;
    const base = this.#shmBase(r.id);
    return base === undefined ? undefined : { size: r.size, base };
  }

  write(offset: number, data: Uint8Array): void {
    this.counters.writes++;
    if (offset >= VIRTIO_MMIO_CONFIG) {
      this.device.writeConfig(offset - VIRTIO_MMIO_CONFIG, data);
      return;
    }
    if (data.length !== REG_SIZE || offset % REG_SIZE !== 0) {
      this.#guestError(`write of ${data.length} bytes at register 0x${offset.toString(16)}; registers are 32-bit`);
      return;
    }
    this.#writeReg(offset, new DataView(data.buffer, data.byteOffset, REG_SIZE).getUint32(0, true));
  }

  #writeReg(offset: number, v: number): void {
    const q = this.#queues[this.#queueSel];
    switch (offset) {
      case VIRTIO_MMIO_DEVICE_FEATURES_SEL:
        this.#deviceFeaturesSel = v;
        return;
      case VIRTIO_MMIO_DRIVER_FEATURES_SEL:
        this.#driverFeaturesSel = v;
        return;
      case VIRTIO_MMIO_DRIVER_FEATURES: {
        if (this.#status & VIRTIO_STATUS_FEATURES_OK) {
          this.#guestError("driver features written after FEATURES_OK; ignored");
          return;
        }
        if (this.#driverFeaturesSel > 1) {
          if (v !== 0) this.#guestError(`driver features word ${this.#driverFeaturesSel} = 0x${v.toString(16)}`);
          return;
        }
        const shift = BigInt(32 * this.#driverFeaturesSel);
        this.#driverFeatures = (this.#driverFeatures & ~(0xffff_ffffn << shift)) | (BigInt(v) << shift);
        return;
      }
      case VIRTIO_MMIO_QUEUE_SEL:
        this.#queueSel = v;
        return;
      case VIRTIO_MMIO_QUEUE_NUM:
      case VIRTIO_MMIO_QUEUE_DESC_LOW:
      case VIRTIO_MMIO_QUEUE_DESC_HIGH:
      case VIRTIO_MMIO_QUEUE_AVAIL_LOW:
      case VIRTIO_MMIO_QUEUE_AVAIL_HIGH:
      case VIRTIO_MMIO_QUEUE_USED_LOW:
      case VIRTIO_MMIO_QUEUE_USED_HIGH:
        this.#writeQueueReg(q, offset, v);
        return;
      case VIRTIO_MMIO_QUEUE_READY:
        this.#setQueueReady(q, v);
        return;
      case VIRTIO_MMIO_QUEUE_NOTIFY:
        this.notify(v);
        return;
      case VIRTIO_MMIO_INTERRUPT_ACK:
        acknowledgeInterrupt(this.#isr, this.#isrIndex, v);
        return;
      case VIRTIO_MMIO_STATUS:
        this.#setStatus(v);
        return;
      case VIRTIO_MMIO_SHM_SEL:
        this.#shmSel = v;
        return;
      case VIRTIO_MMIO_QUEUE_RESET:
        this.#queueReset(q, v);
        return;
      default:
        this.#guestError(`write of 0x${v.toString(16)} to read-only or unknown register 0x${offset.toString(16)}`);
    }
  }

  #writeQueueReg(q: QueueState | undefined, offset: number, v: number): void {
    if (!q) {
      this.#guestError(`queue register 0x${offset.toString(16)} written with no queue ${this.#queueSel}`);
      return;
    }
    if (q.ready) {
      this.#guestError(`queue ${this.#queueSel} register 0x${offset.toString(16)} written while the queue is ready`);
      return;
    }
    switch (offset) {
      case VIRTIO_MMIO_QUEUE_NUM:
        q.num = v;
        return;
      case VIRTIO_MMIO_QUEUE_DESC_LOW:
      case VIRTIO_MMIO_QUEUE_DESC_HIGH:
        q.desc = setHalf(q.desc, v, offset === VIRTIO_MMIO_QUEUE_DESC_HIGH);
        return;
      case VIRTIO_MMIO_QUEUE_AVAIL_LOW:
      case VIRTIO_MMIO_QUEUE_AVAIL_HIGH:
        q.avail = setHalf(q.avail, v, offset === VIRTIO_MMIO_QUEUE_AVAIL_HIGH);
        return;
      default:
        q.used = setHalf(q.used, v, offset === VIRTIO_MMIO_QUEUE_USED_HIGH);
    }
  }

  #setQueueReady(q: QueueState | undefined, v: number): void {
    if (!q) {
      this.#guestError(`QueueReady written with no queue ${this.#queueSel}`);
      return;
    }
    if (v === 0) {
      if (q.ready && this.#active) this.#guestError(`queue ${this.#queueSel} disabled while the device runs; ignored`);
      else q.ready = false;
      return;
    }
    const max = this.device.queueMaxSizes[this.#queueSel];
    const addrs = { size: q.num, descTable: q.desc, availRing: q.avail, usedRing: q.used };
    const why = q.num > max || q.num > VIRTQ_MAX_SIZE
      ? `size ${q.num} exceeds QueueNumMax ${max}`
      : Virtqueue.validate(this.#mem, addrs);
    if (why) {
      this.#guestError(`queue ${this.#queueSel} not enabled: ${why}`);
      return;
    }
    q.ready = true;
    q.reset = false;
  }

  #queueReset(q: QueueState | undefined, v: number): void {
    if (v !== 1 || !q) {
      this.#guestError(`QueueReset write of ${v} (queue ${this.#queueSel})`);
      return;
    }
    if (!(this.#acked & VIRTIO_F_RING_RESET)) {
      this.#guestError("QueueReset without VIRTIO_F_RING_RESET negotiated; ignored");
      return;
    }
    Object.assign(q, freshQueue(this.device.queueMaxSizes[this.#queueSel]), { reset: true });
    if (this.#active) this.#active[this.#queueSel] = undefined;
  }

  #setStatus(v: number): void {
    if (v === 0) {
      this.device.reset();
      this.#resetState();
      return;
    }
    const old = this.#status;
    // Only a reset clears driver-set bits; DEVICE_NEEDS_RESET is the device's and stays set.
    if ((old & ~v & ~VIRTIO_STATUS_DEVICE_NEEDS_RESET) !== 0) {
      this.#guestError(`status 0x${v.toString(16)} clears bits of 0x${old.toString(16)}; ignored`);
      return;
    }
    let next = v | (old & VIRTIO_STATUS_DEVICE_NEEDS_RESET);
    const added = v & ~old;
    if (added & VIRTIO_STATUS_FEATURES_OK) {
      const offered = this.device.features;
      const f = this.#driverFeatures;
      if ((f & ~offered) !== 0n || !(f & VIRTIO_F_VERSION_1)) {
        this.#guestError(
          `driver features 0x${f.toString(16)} are not a subset of 0x${offered.toString(16)} with VERSION_1`,
        );
        next &= ~VIRTIO_STATUS_FEATURES_OK;
      } else {
        this.#acked = f;
      }
    }
    if (added & VIRTIO_STATUS_DRIVER_OK) {
      if (!(next & VIRTIO_STATUS_FEATURES_OK)) {
        this.#guestError("DRIVER_OK without FEATURES_OK; ignored");
        next &= ~VIRTIO_STATUS_DRIVER_OK;
      } else {
        this.#status = next;
        this.#activate();
        return;
      }
    }
    this.#status = next;
  }

  #activate(): void {
    const eventIdx = (this.#acked & VIRTIO_F_EVENT_IDX) !== 0n;
    const queues = this.#queues.map((q, i) =>
      q.ready
        ? new Virtqueue(this.#mem, i, { size: q.num, descTable: q.desc, availRing: q.avail, usedRing: q.used }, {
          eventIdx,
        })
        : undefined
    );
    const ctx: ActivateContext = {
      mem: this.#mem,
      queues,
      ackedFeatures: this.#acked,
      interrupt: this.#interrupt,
      notifyFds: this.#notifyFds,
      irqFd: this.#irqFd,
    };
    try {
      this.device.activate(ctx);
      this.#active = queues;
      const early = [...this.#earlyNotifies];
      this.#earlyNotifies.clear();
      for (const i of early) if (queues[i]) this.device.queueNotify(i);
    } catch (e) {
      this.#guestError(`activation failed: ${(e as Error).message}; device needs reset`);
      this.#status |= VIRTIO_STATUS_DEVICE_NEEDS_RESET;
      this.#interrupt.signalConfigChange();
    }
  }

  /** A QueueNotify write (or its ioeventfd): the driver kicked queue `queueIndex`. */
  notify(queueIndex: number): void {
    this.counters.notifies++;
    if (!this.#active) {
      // Linux's virtio_balloon kicks its stats queue in probe, before DRIVER_OK (init_vqs in
      // drivers/virtio/virtio_balloon.c). Keep the kick of a ready queue and deliver it at
      // activation rather than losing the buffer it announced.
      const q = this.#queues[queueIndex];
      if (q?.ready && (this.#status & VIRTIO_STATUS_FEATURES_OK)) this.#earlyNotifies.add(queueIndex);
      else this.#guestError(`notify of queue ${queueIndex} before the queue is ready; ignored`);
      return;
    }
    if (!this.#active[queueIndex]) {
      this.#guestError(`notify of queue ${queueIndex}, which is not enabled`);
      return;
    }
    this.device.queueNotify(queueIndex);
  }

  // ---- Device state (core/state.ts) ----

  /** The register file holds no request in flight: its state is complete at any time (the device reports its own). */
  quiescent(): boolean {
    return true;
  }

  /** The registers the driver set up, the negotiated features, interrupt state and each live ring's state. */
  saveState(): DeviceState {
    const queues: StateValue[] = this.#queues.map((q, i) => ({
      num: q.num,
      ready: q.ready,
      desc: q.desc,
      avail: q.avail,
      used: q.used,
      reset: q.reset,
      ring: ringState(this.#active?.[i]),
    }));
    return {
      type: VIRTIO_MMIO_STATE_TYPE,
      version: VIRTIO_MMIO_STATE_VERSION,
      data: {
        deviceType: this.device.deviceType,
        status: this.#status,
        deviceFeaturesSel: this.#deviceFeaturesSel,
        driverFeaturesSel: this.#driverFeaturesSel,
        driverFeatures: `0x${this.#driverFeatures.toString(16)}`,
        ackedFeatures: `0x${this.#acked.toString(16)}`,
        queueSel: this.#queueSel,
        shmSel: this.#shmSel,
        interruptStatus: this.interruptStatus,
        configGeneration: this.#configGeneration,
        active: this.#active !== null,
        earlyNotifies: [...this.#earlyNotifies],
        queues,
      },
    };
  }

  /**
   * Continue from a saved state, on a transport not yet touched by a driver. The device's own state is
   * restored first; when the saved driver had set DRIVER_OK, the device is then activated with the
   * restored rings (ActivateContext.restored).
   */
  restoreState(state: DeviceState): void {
    const d = stateRecord(stateData(state, VIRTIO_MMIO_STATE_TYPE, VIRTIO_MMIO_STATE_VERSION), "virtio-mmio state");
    const what = `virtio-mmio ${this.device.name}`;
    if (this.#status !== 0 || this.#active) {
      throw new StateError(`${what}: restore into a transport a driver has set up`);
    }
    const deviceType = stateNumber(d.deviceType, `${what} deviceType`);
    if (deviceType !== this.device.deviceType) {
      throw new StateError(`${what}: a state of device type ${deviceType} for device type ${this.device.deviceType}`);
    }
    const u32 = (v: StateValue | undefined, name: string) => {
      const n = stateNumber(v, `${what} ${name}`, 0, U32 - 1);
      if (!Number.isInteger(n)) throw new StateError(`${what} ${name}: ${n} is not an integer`);
      return n;
    };
    const features = (v: StateValue | undefined, name: string) => {
      const text = stateString(v, `${what} ${name}`);
      if (!/^0x[0-9a-f]{1,16}$/.test(text)) {
        throw new StateError(`${what} ${name}: "${text}" is not a 64-bit hex value`);
      }
      return BigInt(text);
    };
    const status = u32(d.status, "status");
    if (status > 0xff) throw new StateError(`${what} status: 0x${status.toString(16)} is wider than a byte`);
    const driverFeatures = features(d.driverFeatures, "driverFeatures");
    const acked = features(d.ackedFeatures, "ackedFeatures");
    const offered = this.device.features;
    if ((acked & ~offered) !== 0n) {
      throw new StateError(
        `${what}: negotiated features 0x${acked.toString(16)} are not all offered (0x${offered.toString(16)})`,
      );
    }
    if ((status & VIRTIO_STATUS_FEATURES_OK) && !(acked & VIRTIO_F_VERSION_1)) {
      throw new StateError(`${what}: FEATURES_OK without VERSION_1 negotiated`);
    }
    const interruptStatus = u32(d.interruptStatus, "interruptStatus");
    if (interruptStatus & ~(VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG)) {
      throw new StateError(`${what} interruptStatus: unknown bits 0x${interruptStatus.toString(16)}`);
    }
    const active = stateBoolean(d.active, `${what} active`);
    if (active && !(status & VIRTIO_STATUS_DRIVER_OK)) throw new StateError(`${what}: active without DRIVER_OK`);
    const savedQueues = stateArray(d.queues, `${what} queues`);
    const maxSizes = this.device.queueMaxSizes;
    if (savedQueues.length !== maxSizes.length) {
      throw new StateError(`${what}: ${savedQueues.length} queues saved, the device has ${maxSizes.length}`);
    }
    const addr = (v: StateValue | undefined, name: string) => {
      const n = stateNumber(v, `${what} ${name}`, 0, U32 * U32);
      if (!Number.isInteger(n)) throw new StateError(`${what} ${name}: ${n} is not an integer`);
      return n;
    };
    const queues: QueueState[] = [];
    const rings: (StateValue | null)[] = [];
    savedQueues.forEach((v, i) => {
      const q = stateRecord(v, `${what} queue ${i}`);
      const qs: QueueState = {
        num: u32(q.num, `queue ${i} num`),
        ready: stateBoolean(q.ready, `${what} queue ${i} ready`),
        desc: addr(q.desc, `queue ${i} desc`),
        avail: addr(q.avail, `queue ${i} avail`),
        used: addr(q.used, `queue ${i} used`),
        reset: stateBoolean(q.reset, `${what} queue ${i} reset`),
      };
      if (qs.ready) {
        const addrs = { size: qs.num, descTable: qs.desc, availRing: qs.avail, usedRing: qs.used };
        const why = qs.num > maxSizes[i]
          ? `size ${qs.num} exceeds QueueNumMax ${maxSizes[i]}`
          : Virtqueue.validate(this.#mem, addrs);
        if (why) throw new StateError(`${what} queue ${i}: ${why}`);
      }
      const ring = q.ring ?? null;
      if (ring !== null && !(active && qs.ready)) {
        throw new StateError(`${what} queue ${i}: a ring state for a queue that is not live`);
      }
      queues.push(qs);
      rings.push(ring);
    });
    const early = stateArray(d.earlyNotifies, `${what} earlyNotifies`).map((v) => {
      const i = u32(v, "earlyNotifies entry");
      if (i >= maxSizes.length || !queues[i].ready) {
        throw new StateError(`${what}: early notify of queue ${i}, not ready`);
      }
      return i;
    });
    const live: (Virtqueue | undefined)[] = [];
    if (active) {
      const eventIdx = (acked & VIRTIO_F_EVENT_IDX) !== 0n;
      queues.forEach((q, i) => {
        const ring = rings[i];
        if (ring === null) {
          live.push(undefined);
          return;
        }
        const r = stateRecord(ring, `${what} queue ${i} ring`);
        const vq = new Virtqueue(
          this.#mem,
          i,
          { size: q.num, descTable: q.desc, availRing: q.avail, usedRing: q.used },
          {
            eventIdx,
          },
        );
        vq.restoreState({
          type: stateString(r.type, `${what} queue ${i} ring type`),
          version: stateNumber(r.version, `${what} queue ${i} ring version`),
          data: r.data ?? null,
        });
        live.push(vq);
      });
    }
    // Every field checked: take them.
    this.#status = status;
    this.#deviceFeaturesSel = u32(d.deviceFeaturesSel, "deviceFeaturesSel");
    this.#driverFeaturesSel = u32(d.driverFeaturesSel, "driverFeaturesSel");
    this.#driverFeatures = driverFeatures;
    this.#acked = acked;
    this.#queueSel = u32(d.queueSel, "queueSel");
    this.#shmSel = u32(d.shmSel, "shmSel");
    this.#configGeneration = u32(d.configGeneration, "configGeneration");
    this.#queues = queues;
    this.#earlyNotifies.clear();
    for (const i of early) this.#earlyNotifies.add(i);
    Atomics.store(this.#isr, this.#isrIndex, interruptStatus | this.#isrFlags);
    if (!active) return;
    try {
      this.device.activate({
        mem: this.#mem,
        queues: live,
        ackedFeatures: acked,
        interrupt: this.#interrupt,
        restored: true,
        notifyFds: this.#notifyFds,
        irqFd: this.#irqFd,
      });
    } catch (e) {
      this.device.reset();
      this.#resetState();
      throw new StateError(`${what}: the device refused the restored queues: ${(e as Error).message}`);
    }
    this.#active = live;
  }
}

/** The kind and layout version of a virtio-mmio transport's saved state. */
export const VIRTIO_MMIO_STATE_TYPE = "virtio-mmio";
export const VIRTIO_MMIO_STATE_VERSION = 1;

/** A live ring's saved state as a field of the transport's record. */
function ringState(q: Virtqueue | undefined): StateValue {
  if (!q) return null;
  const { type, version, data } = q.saveState();
  return { type, version, data };
}
