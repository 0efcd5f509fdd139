// A guest-side virtio driver for tests: allocates rings and buffers in guest memory, negotiates
// through the virtio-mmio registers and submits descriptor chains, so devices can be driven
// without a VM. Also guarded guest memory: guest regions inside one host mapping whose
// surrounding bytes hold a canary, to prove a device never touched memory outside the guest.

import { GuestMemory } from "../../core/memory.ts";
import { mmapAnon, munmap } from "../../ffi/libc.ts";
import {
  availRingBytes,
  descTableBytes,
  type QueueAddresses,
  usedRingBytes,
  VIRTQ_AVAIL_ELEM_SIZE,
  VIRTQ_AVAIL_FLAGS,
  VIRTQ_AVAIL_IDX,
  VIRTQ_AVAIL_RING,
  VIRTQ_DESC_ADDR,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
  VIRTQ_DESC_FLAGS,
  VIRTQ_DESC_LEN,
  VIRTQ_DESC_NEXT,
  VIRTQ_DESC_SIZE,
  VIRTQ_USED_ELEM_LEN,
  VIRTQ_USED_ELEM_SIZE,
  VIRTQ_USED_FLAGS,
  VIRTQ_USED_IDX,
  VIRTQ_USED_RING,
} from "../../devices/virtio/queue.ts";
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
  type VirtioMmioTransport,
} from "../../devices/virtio/mmio.ts";

/** Byte written around the guest regions; any other value there means an access outside the guest. */
export const CANARY = 0xa5;

/** Guest regions carved out of one host mapping, with canary-filled guards before, between and after. */
export class GuardedGuestMemory {
  readonly mem: GuestMemory;
  readonly #ptr: Deno.PointerObject;
  readonly #size: number;
  readonly #guards: { off: number; len: number }[] = [];
  readonly #all: Uint8Array;

  constructor(regions: { start: number; size: number }[], guard = 64 * 1024) {
    this.#size = guard + regions.reduce((n, r) => n + r.size + guard, 0);
    this.#ptr = mmapAnon(this.#size);
    const base = BigInt(Deno.UnsafePointer.value(this.#ptr));
    this.#all = new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(this.#ptr, this.#size));
    let off = 0;
    const descs = [];
    this.#guards.push({ off, len: guard });
    off += guard;
    for (const r of regions) {
      descs.push({ guestBase: r.start, size: r.size, hostAddr: base + BigInt(off) });
      off += r.size;
      this.#guards.push({ off, len: guard });
      off += guard;
    }
    for (const g of this.#guards) this.#all.fill(CANARY, g.off, g.off + g.len);
    this.mem = new GuestMemory(descs);
  }

  /** True when every guard byte still holds the canary. */
  canaryIntact(): boolean {
    return this.#guards.every((g) => this.#all.subarray(g.off, g.off + g.len).every((b) => b === CANARY));
  }

  close(): void {
    munmap(this.#ptr, this.#size);
  }
}

/** A bump allocator over a range of guest memory. */
export class GuestAllocator {
  #next: number;
  constructor(readonly mem: GuestMemory, readonly start: number, readonly end: number) {
    this.#next = start;
  }
  alloc(len: number, align = 16): number {
    const a = Math.ceil(this.#next / align) * align;
    if (a + len > this.end) throw new Error(`test allocator exhausted (${len} bytes)`);
    this.#next = a + len;
    return a;
  }
  mark(): number {
    return this.#next;
  }
  resetTo(mark: number): void {
    this.#next = mark;
  }
}

/** A descriptor as the driver writes it. */
export interface RawDesc {
  addr: number | bigint;
  len: number;
  flags: number;
  next: number;
}

/** One segment of a chain: bytes the device reads, or a number of bytes the device may write. */
export type Segment = Uint8Array | number;

export interface Submitted {
  head: number;
  /** Guest buffers in chain order (readable first). */
  buffers: { addr: number; len: number; writable: boolean }[];
}

/** The driver's view of one split queue (virtio 1.2 section 2.7.13, "Supplying Buffers"). */
export class DriverQueue {
  readonly addrs: QueueAddresses;
  #availIdx = 0;
  #lastUsed = 0;
  #free: number[];
  readonly #chains = new Map<number, number[]>();

  constructor(
    readonly mem: GuestMemory,
    readonly index: number,
    readonly size: number,
    readonly alloc: GuestAllocator,
  ) {
    this.addrs = {
      size,
      descTable: alloc.alloc(descTableBytes(size), 16),
      availRing: alloc.alloc(availRingBytes(size), 2),
      usedRing: alloc.alloc(usedRingBytes(size), 4),
    };
    mem.fill(this.addrs.descTable, descTableBytes(size));
    mem.fill(this.addrs.availRing, availRingBytes(size));
    mem.fill(this.addrs.usedRing, usedRingBytes(size));
    this.#free = Array.from({ length: size }, (_, i) => i);
  }

  get availIdx(): number {
    return this.#availIdx;
  }

  /** Write descriptor `i` of a table (the queue's own by default). */
  writeDesc(i: number, d: RawDesc, table = this.addrs.descTable): void {
    const a = table + VIRTQ_DESC_SIZE * i;
    this.mem.setU64(a + VIRTQ_DESC_ADDR, BigInt(d.addr));
    this.mem.setU32(a + VIRTQ_DESC_LEN, d.len >>> 0);
    this.mem.setU16(a + VIRTQ_DESC_FLAGS, d.flags);
    this.mem.setU16(a + VIRTQ_DESC_NEXT, d.next);
  }

  /** Put `head` in the available ring and bump idx (what virtqueue_add + kick-prepare do). */
  publish(head: number): void {
    this.mem.setU16(
      this.addrs.availRing + VIRTQ_AVAIL_RING + VIRTQ_AVAIL_ELEM_SIZE * (this.#availIdx % this.size),
      head,
    );
    this.#availIdx = (this.#availIdx + 1) & 0xffff;
    this.mem.setU16(this.addrs.availRing + VIRTQ_AVAIL_IDX, this.#availIdx);
  }

  /** Start the free-running indices at `idx` (to test 16-bit wrap-around); call before anything is queued. */
  startAt(idx: number): void {
    this.#availIdx = idx & 0xffff;
    this.#lastUsed = idx & 0xffff;
    this.mem.setU16(this.addrs.availRing + VIRTQ_AVAIL_IDX, this.#availIdx);
    this.mem.setU16(this.addrs.usedRing + VIRTQ_USED_IDX, this.#lastUsed);
  }

  /** Allocate buffers for `segs`, build a direct or indirect chain and publish it. */
  submit(segs: Segment[], opts: { indirect?: boolean } = {}): Submitted {
    const buffers = segs.map((s) => {
      const len = typeof s === "number" ? s : s.length;
      const addr = this.alloc.alloc(Math.max(len, 1), 8);
      if (typeof s === "number") this.mem.fill(addr, len, 0xee);
      else this.mem.write(addr, s);
      return { addr, len, writable: typeof s === "number" };
    });
    let head: number;
    if (opts.indirect) {
      const table = this.alloc.alloc(VIRTQ_DESC_SIZE * buffers.length, 16);
      buffers.forEach((b, i) =>
        this.writeDesc(i, {
          addr: b.addr,
          len: b.len,
          flags: (b.writable ? VIRTQ_DESC_F_WRITE : 0) | (i + 1 < buffers.length ? VIRTQ_DESC_F_NEXT : 0),
          next: i + 1 < buffers.length ? i + 1 : 0,
        }, table)
      );
      head = this.#take(1)[0];
      this.writeDesc(head, {
        addr: table,
        len: VIRTQ_DESC_SIZE * buffers.length,
        flags: VIRTQ_DESC_F_INDIRECT,
        next: 0,
      });
      this.#chains.set(head, [head]);
    } else {
      const ids = this.#take(buffers.length);
      buffers.forEach((b, i) =>
        this.writeDesc(ids[i], {
          addr: b.addr,
          len: b.len,
          flags: (b.writable ? VIRTQ_DESC_F_WRITE : 0) | (i + 1 < ids.length ? VIRTQ_DESC_F_NEXT : 0),
          next: i + 1 < ids.length ? ids[i + 1] : 0,
        })
      );
      head = ids[0];
      this.#chains.set(head, ids);
    }
    this.publish(head);
    return { head, buffers };
  }

  #take(n: number): number[] {
    if (n < 1 || n > this.#free.length) throw new Error(`driver queue ${this.index}: ${n} descriptors wanted`);
    return this.#free.splice(0, n);
  }

  /** Used entries the device added since the last call; their descriptors return to the free list. */
  used(): { id: number; len: number }[] {
    const out = [];
    const idx = this.mem.getU16(this.addrs.usedRing + VIRTQ_USED_IDX);
    while (this.#lastUsed !== idx) {
      const e = this.addrs.usedRing + VIRTQ_USED_RING + VIRTQ_USED_ELEM_SIZE * (this.#lastUsed % this.size);
      const id = this.mem.getU32(e);
      out.push({ id, len: this.mem.getU32(e + VIRTQ_USED_ELEM_LEN) });
      const ids = this.#chains.get(id);
      if (ids) {
        this.#free.push(...ids);
        this.#chains.delete(id);
      }
      this.#lastUsed = (this.#lastUsed + 1) & 0xffff;
    }
    return out;
  }

  usedIdx(): number {
    return this.mem.getU16(this.addrs.usedRing + VIRTQ_USED_IDX);
  }
  usedFlags(): number {
    return this.mem.getU16(this.addrs.usedRing + VIRTQ_USED_FLAGS);
  }
  /** avail_event, written by the device with EVENT_IDX. */
  availEvent(): number {
    return this.mem.getU16(this.addrs.usedRing + VIRTQ_USED_RING + VIRTQ_USED_ELEM_SIZE * this.size);
  }
  setAvailFlags(v: number): void {
    this.mem.setU16(this.addrs.availRing + VIRTQ_AVAIL_FLAGS, v);
  }
  /** used_event, read by the device with EVENT_IDX. */
  setUsedEvent(v: number): void {
    this.mem.setU16(this.addrs.availRing + VIRTQ_AVAIL_RING + VIRTQ_AVAIL_ELEM_SIZE * this.size, v & 0xffff);
  }
}

/** Plays a virtio-mmio guest driver (virtio 1.2 section 3.1 "Device Initialization"). */
export class VirtioTestDriver {
  readonly queues: DriverQueue[] = [];
  readonly alloc: GuestAllocator;

  /** `arena` is where rings and buffers go, or an allocator already in use there. */
  constructor(
    readonly transport: VirtioMmioTransport,
    readonly mem: GuestMemory,
    arena: { start: number; end: number } | GuestAllocator,
  ) {
    this.alloc = arena instanceof GuestAllocator ? arena : new GuestAllocator(mem, arena.start, arena.end);
  }

  /** The same driver (its queues, buffers and allocator) talking to `transport`, e.g. a restored device's. */
  attach(transport: VirtioMmioTransport): VirtioTestDriver {
    const d = new VirtioTestDriver(transport, this.mem, this.alloc);
    this.queues.forEach((q, i) => d.queues[i] = q);
    return d;
  }

  readReg(offset: number): number {
    const b = new Uint8Array(4);
    this.transport.read(offset, b);
    return new DataView(b.buffer).getUint32(0, true);
  }
  writeReg(offset: number, v: number): void {
    const b = new Uint8Array(4);
    new DataView(b.buffer).setUint32(0, v >>> 0, true);
    this.transport.write(offset, b);
  }
  readConfig(offset: number, len: number): Uint8Array {
    const b = new Uint8Array(len);
    this.transport.read(VIRTIO_MMIO_CONFIG + offset, b);
    return b;
  }

  deviceFeatures(): bigint {
    let f = 0n;
    for (const sel of [0, 1]) {
      this.writeReg(VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel);
      f |= BigInt(this.readReg(VIRTIO_MMIO_DEVICE_FEATURES)) << BigInt(32 * sel);
    }
    return f;
  }

  writeDriverFeatures(f: bigint): void {
    for (const sel of [0, 1]) {
      this.writeReg(VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
      this.writeReg(VIRTIO_MMIO_DRIVER_FEATURES, Number((f >> BigInt(32 * sel)) & 0xffff_ffffn));
    }
  }

  /** Reset, ACKNOWLEDGE, DRIVER, write `mask & offered`, FEATURES_OK; returns the acked features. */
  negotiate(mask = ~0n): bigint {
    this.writeReg(VIRTIO_MMIO_STATUS, 0);
    this.writeReg(VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE);
    this.writeReg(VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
    const f = this.deviceFeatures() & mask;
    this.writeDriverFeatures(f);
    this.writeReg(VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK);
    if (!(this.readReg(VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_FEATURES_OK)) throw new Error("device refused features");
    return f;
  }

  /** Allocate queue `index`'s rings and enable it (section 4.2.3.2). */
  setupQueue(index: number, size?: number): DriverQueue {
    this.writeReg(VIRTIO_MMIO_QUEUE_SEL, index);
    const max = this.readReg(VIRTIO_MMIO_QUEUE_NUM_MAX);
    if (max === 0) throw new Error(`no queue ${index}`);
    const n = size ?? max;
    const q = new DriverQueue(this.mem, index, n, this.alloc);
    this.writeReg(VIRTIO_MMIO_QUEUE_NUM, n);
    const a = q.addrs;
    for (
      const [lo, hi, v] of [
        [VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH, a.descTable],
        [VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, a.availRing],
        [VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_QUEUE_USED_HIGH, a.usedRing],
      ]
    ) {
      this.writeReg(lo, v % 0x1_0000_0000);
      this.writeReg(hi, Math.floor(v / 0x1_0000_0000));
    }
    this.writeReg(VIRTIO_MMIO_QUEUE_READY, 1);
    this.queues[index] = q;
    return q;
  }

  driverOk(): void {
    const s = this.readReg(VIRTIO_MMIO_STATUS);
    this.writeReg(VIRTIO_MMIO_STATUS, s | VIRTIO_STATUS_DRIVER_OK);
  }

  /** negotiate + every queue + DRIVER_OK. */
  init(opts: { features?: bigint; queueSize?: number } = {}): bigint {
    const f = this.negotiate(opts.features);
    for (let i = 0; i < this.transport.device.queueMaxSizes.length; i++) this.setupQueue(i, opts.queueSize);
    this.driverOk();
    return f;
  }

  kick(index: number): void {
    this.writeReg(VIRTIO_MMIO_QUEUE_NOTIFY, index);
  }

  /** Read InterruptStatus and acknowledge it, as vm_interrupt() does. */
  ackInterrupt(): number {
    const s = this.readReg(VIRTIO_MMIO_INTERRUPT_STATUS);
    if (s) this.writeReg(VIRTIO_MMIO_INTERRUPT_ACK, s);
    return s;
  }
}
