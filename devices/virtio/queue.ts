// The split virtqueue (virtio 1.2 spec, section 2.7; Linux include/uapi/linux/virtio_ring.h),
// device side. The driver (guest) owns the descriptor table and the available ring; the device
// owns the used ring. Everything read from guest memory is hostile: a malformed chain is
// consumed, logged in one rate-limited line and completed with length 0, never thrown.

import { type GuestMemory, GuestMemoryError } from "../../core/memory.ts";
import { RateLimitedLog } from "../../core/log.ts";
import {
  type DeviceState,
  stateBoolean,
  stateData,
  StateError,
  type Stateful,
  stateNumber,
  stateRecord,
} from "../../core/state.ts";

// ---- Layout numbers (virtio 1.2 section 2.7.5 "The Virtqueue Descriptor Table") ----

/** struct virtq_desc: le64 addr, le32 len, le16 flags, le16 next. */
export const VIRTQ_DESC_SIZE = 16;
export const VIRTQ_DESC_ADDR = 0;
export const VIRTQ_DESC_LEN = 8;
export const VIRTQ_DESC_FLAGS = 12;
export const VIRTQ_DESC_NEXT = 14;
/** Descriptor flags (virtio_ring.h VRING_DESC_F_*). */
export const VIRTQ_DESC_F_NEXT = 1;
export const VIRTQ_DESC_F_WRITE = 2;
export const VIRTQ_DESC_F_INDIRECT = 4;

// ---- The available ring (section 2.7.6): le16 flags, le16 idx, le16 ring[size], le16 used_event ----
export const VIRTQ_AVAIL_FLAGS = 0;
export const VIRTQ_AVAIL_IDX = 2;
export const VIRTQ_AVAIL_RING = 4;
export const VIRTQ_AVAIL_ELEM_SIZE = 2;
/** VRING_AVAIL_F_NO_INTERRUPT (virtio_ring.h): the driver does not want interrupts. */
export const VRING_AVAIL_F_NO_INTERRUPT = 1;

// ---- The used ring (section 2.7.8): le16 flags, le16 idx, {le32 id, le32 len}[size], le16 avail_event ----
export const VIRTQ_USED_FLAGS = 0;
export const VIRTQ_USED_IDX = 2;
export const VIRTQ_USED_RING = 4;
export const VIRTQ_USED_ELEM_SIZE = 8;
export const VIRTQ_USED_ELEM_ID = 0;
export const VIRTQ_USED_ELEM_LEN = 4;
/** VRING_USED_F_NO_NOTIFY (virtio_ring.h): the device does not want kicks. */
export const VRING_USED_F_NO_NOTIFY = 1;

/** Alignment of the three areas (section 2.7, table "Virtqueue Part Alignment"). */
export const VIRTQ_DESC_ALIGN = 16;
export const VIRTQ_AVAIL_ALIGN = 2;
export const VIRTQ_USED_ALIGN = 4;
/** Largest split queue (section 2.7: Queue Size is a power of 2, at most 32768). */
export const VIRTQ_MAX_SIZE = 32768;
/** An indirect table is addressed by le16 `next`, so it holds at most 65536 descriptors. */
const MAX_INDIRECT_DESCS = 65536;
/** The sum of a chain's lengths must fit the le32 used length. */
const MAX_CHAIN_BYTES = 2 ** 32;
const U16 = 0x10000;

/** Bytes of each area for a queue of `size` entries (section 2.7). */
export function descTableBytes(size: number): number {
  return VIRTQ_DESC_SIZE * size;
}
export function availRingBytes(size: number): number {
  return VIRTQ_AVAIL_RING + VIRTQ_AVAIL_ELEM_SIZE * size + 2; // + used_event
}
export function usedRingBytes(size: number): number {
  return VIRTQ_USED_RING + VIRTQ_USED_ELEM_SIZE * size + 2; // + avail_event
}

// ---- Memory ordering ----

/** A word no one else uses: an atomic read-modify-write of it is the fence below. */
const FENCE_WORD = new Int32Array(new SharedArrayBuffer(4));

/**
 * A full memory barrier (Linux smp_mb/virtio_mb): stores before it are visible to the driver before
 * loads after it read guest memory. Plain typed-array accesses carry no ordering, and x86 lets a load
 * pass an earlier store still in the store buffer; an atomic read-modify-write is a locked instruction
 * on x86 (a full fence on every architecture), and V8 keeps plain accesses on their side of it.
 */
export function memoryFence(): void {
  Atomics.add(FENCE_WORD, 0, 1);
}

// ---- Descriptor chains ----

/** A guest buffer: a guest-physical address and a length, inside one guest memory region. */
export interface GuestBuffer {
  addr: number;
  len: number;
}

/** Reading or writing past the end of a chain's buffers. */
export class ChainError extends Error {
  constructor(msg: string) {
    super(msg);
    this.name = "ChainError";
  }
}

/** A cursor over a list of guest buffers. */
class Cursor {
  #i = 0;
  #off = 0;
  #done = 0;
  constructor(protected readonly mem: GuestMemory, protected readonly bufs: GuestBuffer[], readonly total: number) {}

  /** Bytes consumed so far. */
  get position(): number {
    return this.#done;
  }
  get remaining(): number {
    return this.total - this.#done;
  }

  /** Take the next `n` bytes as guest buffers (no copy); throws ChainError when fewer remain. */
  segments(n: number, what = "chain"): GuestBuffer[] {
    if (!Number.isSafeInteger(n) || n < 0 || n > this.remaining) {
      throw new ChainError(`${what}: wanted ${n} bytes, ${this.remaining} left`);
    }
    const out: GuestBuffer[] = [];
    while (n > 0) {
      const b = this.bufs[this.#i];
      const take = Math.min(n, b.len - this.#off);
      if (take > 0) out.push({ addr: b.addr + this.#off, len: take });
      this.#off += take;
      this.#done += take;
      n -= take;
      if (this.#off === b.len) {
        this.#i++;
        this.#off = 0;
      }
    }
    return out;
  }

  /** Skip `n` bytes. */
  skip(n: number): void {
    this.segments(n);
  }
}

/** Reads the device-readable part of a chain as one byte stream. */
export class ChainReader extends Cursor {
  /** Copy the next `n` bytes out of the guest. */
  read(n: number): Uint8Array<ArrayBuffer> {
    const out = new Uint8Array(n);
    let o = 0;
    for (const s of this.segments(n, "read")) {
      out.set(this.mem.slice(s.addr, s.len), o);
      o += s.len;
    }
    return out;
  }
  readU8(): number {
    return this.read(1)[0];
  }
  readU16(): number {
    return new DataView(this.read(2).buffer).getUint16(0, true);
  }
  readU32(): number {
    return new DataView(this.read(4).buffer).getUint32(0, true);
  }
  readU64(): bigint {
    return new DataView(this.read(8).buffer).getBigUint64(0, true);
  }
}

/** Writes into the device-writable part of a chain as one byte stream. */
export class ChainWriter extends Cursor {
  /** Bytes written (or skipped) so far: the length to report in the used ring. */
  get bytesWritten(): number {
    return this.position;
  }
  write(bytes: Uint8Array): void {
    let o = 0;
    for (const s of this.segments(bytes.length, "write")) {
      this.mem.write(s.addr, bytes.subarray(o, o + s.len));
      o += s.len;
    }
  }
  writeU8(v: number): void {
    this.write(Uint8Array.of(v));
  }
  writeU16(v: number): void {
    const b = new Uint8Array(2);
    new DataView(b.buffer).setUint16(0, v, true);
    this.write(b);
  }
  writeU32(v: number): void {
    const b = new Uint8Array(4);
    new DataView(b.buffer).setUint32(0, v, true);
    this.write(b);
  }
  writeU64(v: bigint | number): void {
    const b = new Uint8Array(8);
    new DataView(b.buffer).setBigUint64(0, BigInt(v), true);
    this.write(b);
  }
}

/** A validated chain: every buffer lies inside guest memory, readable ones before writable ones. */
export class DescriptorChain {
  readonly readableLength: number;
  readonly writableLength: number;
  constructor(
    readonly mem: GuestMemory,
    readonly head: number,
    readonly readable: GuestBuffer[],
    readonly writable: GuestBuffer[],
  ) {
    this.readableLength = readable.reduce((n, b) => n + b.len, 0);
    this.writableLength = writable.reduce((n, b) => n + b.len, 0);
  }
  reader(): ChainReader {
    return new ChainReader(this.mem, this.readable, this.readableLength);
  }
  writer(): ChainWriter {
    return new ChainWriter(this.mem, this.writable, this.writableLength);
  }
}

/** Where the three areas of a split queue are in guest-physical memory. */
export interface QueueAddresses {
  size: number;
  descTable: number;
  availRing: number;
  usedRing: number;
}

class MalformedChain extends Error {}

/** The kind and layout version of a virtqueue's saved state. */
export const VIRTQUEUE_STATE_TYPE = "virtqueue";
export const VIRTQUEUE_STATE_VERSION = 1;

/**
 * A split virtqueue, device side. It exists only while the driver has the queue enabled (the transport
 * keeps the ready flag); its state is the ring's place and size plus the device's indices into it.
 */
export class Virtqueue implements Stateful {
  readonly index: number;
  readonly size: number;
  readonly addrs: Readonly<QueueAddresses>;
  readonly eventIdx: boolean;
  /** Why the ring itself is unusable (bad size, alignment or address), or null when it is fine. */
  readonly error: string | null;
  #nextAvail = 0;
  #nextUsed = 0;
  /** Chains completed with length 0 because they were malformed. */
  malformed = 0;
  /** The last guest error, logged or not (for tests and stats). */
  lastError = "";
  readonly #mem: GuestMemory;
  readonly #log: RateLimitedLog;
  /** nextUsed when needsInterrupt last returned (the "old" index of vring_need_event). */
  #signalledUsed = 0;
  #notify = true;
  /** Chains returned by pop() and not yet given back with addUsed(). */
  #inFlight = 0;

  /** Free-running 16-bit index of the next available entry to take (vhost-user GET/SET_VRING_BASE). */
  get nextAvail(): number {
    return this.#nextAvail;
  }
  set nextAvail(v: number) {
    this.#nextAvail = v & 0xffff;
  }
  /** Free-running 16-bit index of the next used entry to fill. Setting it also restarts interrupt suppression. */
  get nextUsed(): number {
    return this.#nextUsed;
  }
  set nextUsed(v: number) {
    this.#nextUsed = v & 0xffff;
    this.#signalledUsed = this.#nextUsed;
  }

  constructor(mem: GuestMemory, index: number, addrs: QueueAddresses, opts: { eventIdx: boolean }) {
    this.#mem = mem;
    this.index = index;
    this.size = addrs.size;
    this.addrs = { ...addrs };
    this.eventIdx = opts.eventIdx;
    this.#log = new RateLimitedLog(`virtqueue ${index}`);
    this.error = Virtqueue.validate(mem, addrs);
    if (this.error) this.#log.log(`unusable ring: ${this.error}`);
  }

  /** Why a queue configuration is unusable, or null (section 2.7: size, alignment, all in guest RAM). */
  static validate(mem: GuestMemory, a: QueueAddresses): string | null {
    const { size } = a;
    if (!Number.isInteger(size) || size < 1 || size > VIRTQ_MAX_SIZE || (size & (size - 1)) !== 0) {
      return `queue size ${size} is not a power of 2 in 1..${VIRTQ_MAX_SIZE}`;
    }
    const areas: [string, number, number, number][] = [
      ["descriptor table", a.descTable, descTableBytes(size), VIRTQ_DESC_ALIGN],
      ["available ring", a.availRing, availRingBytes(size), VIRTQ_AVAIL_ALIGN],
      ["used ring", a.usedRing, usedRingBytes(size), VIRTQ_USED_ALIGN],
    ];
    for (const [name, addr, len, align] of areas) {
      if (!Number.isSafeInteger(addr) || addr % align !== 0) return `${name} at ${hex(addr)} is not ${align}-aligned`;
      if (!mem.isValid(addr, len)) return `${name} at ${hex(addr)} + ${len} is outside guest memory`;
    }
    return null;
  }

  /** The driver's available index (how many chains it has published, mod 2^16). */
  availIdx(): number {
    return this.#mem.getU16(this.addrs.availRing + VIRTQ_AVAIL_IDX);
  }

  /** The used index as stored in guest memory (vhost-user back ends start from it). */
  usedIdx(): number {
    return this.#mem.getU16(this.addrs.usedRing + VIRTQ_USED_IDX);
  }

  /** True when the driver has published chains not taken yet. */
  hasAvailable(): boolean {
    if (this.error) return false;
    try {
      return this.availIdx() !== this.nextAvail;
    } catch {
      return false;
    }
  }

  /** The next available chain, or null when there is none. Malformed chains are completed with 0. */
  pop(): DescriptorChain | null {
    if (this.error) return null;
    const mem = this.#mem;
    for (;;) {
      const avail = this.availIdx();
      if (avail === this.nextAvail) return null;
      const pending = (avail - this.nextAvail + U16) % U16;
      if (pending > this.size) {
        this.#log.log(
          `available index ${avail} is ${pending} entries ahead of ${this.nextAvail} (queue size ${this.size})`,
        );
        return null;
      }
      const head = mem.getU16(
        this.addrs.availRing + VIRTQ_AVAIL_RING + VIRTQ_AVAIL_ELEM_SIZE * (this.nextAvail % this.size),
      );
      this.nextAvail = (this.nextAvail + 1) % U16;
      if (this.eventIdx && this.#notify) this.#writeAvailEvent();
      try {
        const chain = this.#walk(head);
        this.#inFlight++;
        return chain;
      } catch (e) {
        if (!(e instanceof MalformedChain) && !(e instanceof GuestMemoryError)) throw e;
        this.malformed++;
        this.#inFlight++; // the addUsed below completes it
        this.lastError = `malformed chain at head ${head}: ${e.message}; completed with length 0`;
        this.#log.log(this.lastError);
        this.addUsed(head, 0);
      }
    }
  }

  /** Walk and validate the chain that starts at `head`. */
  #walk(head: number): DescriptorChain {
    const mem = this.#mem;
    const readable: GuestBuffer[] = [];
    const writable: GuestBuffer[] = [];
    let total = 0;
    let table = this.addrs.descTable;
    let tableSize = this.size;
    let indirect = false;
    let index = head;
    let count = 0;
    if (head >= this.size) throw new MalformedChain(`head ${head} >= queue size ${this.size}`);
    for (;;) {
      if (++count > tableSize) {
        throw new MalformedChain(
          `more than ${tableSize} descriptors${indirect ? " in the indirect table" : ""} (loop?)`,
        );
      }
      const d = table + VIRTQ_DESC_SIZE * index;
      const addr64 = mem.getU64(d + VIRTQ_DESC_ADDR);
      const len = mem.getU32(d + VIRTQ_DESC_LEN);
      const flags = mem.getU16(d + VIRTQ_DESC_FLAGS);
      const next = mem.getU16(d + VIRTQ_DESC_NEXT);
      if (flags & VIRTQ_DESC_F_INDIRECT) {
        if (indirect) throw new MalformedChain("indirect descriptor inside an indirect table");
        if (flags & VIRTQ_DESC_F_NEXT) throw new MalformedChain("indirect descriptor with NEXT set");
        if (len === 0 || len % VIRTQ_DESC_SIZE !== 0) {
          throw new MalformedChain(`indirect table length ${len} is not a non-zero multiple of ${VIRTQ_DESC_SIZE}`);
        }
        const n = len / VIRTQ_DESC_SIZE;
        if (n > MAX_INDIRECT_DESCS) throw new MalformedChain(`indirect table of ${n} descriptors`);
        if (addr64 > BigInt(Number.MAX_SAFE_INTEGER)) {
          throw new MalformedChain(`indirect table at 0x${addr64.toString(16)}`);
        }
        const addr = Number(addr64);
        if (!mem.isValid(addr, len)) {
          throw new MalformedChain(`indirect table ${hex(addr)} + ${len} is outside guest memory`);
        }
        table = addr;
        tableSize = n;
        indirect = true;
        index = 0;
        count = 0;
        continue;
      }
      total += len;
      if (total > MAX_CHAIN_BYTES) throw new MalformedChain(`chain lengths sum beyond 2^32`);
      if (len > 0) {
        if (addr64 > BigInt(Number.MAX_SAFE_INTEGER)) {
          throw new MalformedChain(`buffer 0x${addr64.toString(16)} + ${len} is outside guest memory`);
        }
        const bufs = this.#split(Number(addr64), len);
        if (flags & VIRTQ_DESC_F_WRITE) writable.push(...bufs);
        else if (writable.length > 0) throw new MalformedChain("readable descriptor after a writable one");
        else readable.push(...bufs);
      } else if (!(flags & VIRTQ_DESC_F_WRITE) && writable.length > 0) {
        throw new MalformedChain("readable descriptor after a writable one");
      }
      if (!(flags & VIRTQ_DESC_F_NEXT)) break;
      if (next >= tableSize) throw new MalformedChain(`next ${next} >= table size ${tableSize}`);
      index = next;
    }
    return new DescriptorChain(mem, head, readable, writable);
  }

  /** A guest range as buffers each inside one memory region (adjacent regions may be crossed). */
  #split(addr: number, len: number): GuestBuffer[] {
    const mem = this.#mem;
    if (mem.isValid(addr, len)) return [{ addr, len }];
    const out: GuestBuffer[] = [];
    const regions = mem.descriptors;
    let a = addr;
    let left = len;
    while (left > 0) {
      const r = regions.find((r) => a >= r.guestBase && a < r.guestBase + r.size);
      if (!r) throw new MalformedChain(`buffer ${hex(addr)} + ${len} is outside guest memory`);
      const take = Math.min(left, r.guestBase + r.size - a);
      out.push({ addr: a, len: take });
      a += take;
      left -= take;
    }
    return out;
  }

  /** Put a completed chain in the used ring and publish it. */
  addUsed(head: number, len: number): void {
    if (this.error) return;
    const mem = this.#mem;
    const elem = this.addrs.usedRing + VIRTQ_USED_RING + VIRTQ_USED_ELEM_SIZE * (this.#nextUsed % this.size);
    mem.setU32(elem + VIRTQ_USED_ELEM_ID, head);
    mem.setU32(elem + VIRTQ_USED_ELEM_LEN, len >>> 0);
    this.#nextUsed = (this.#nextUsed + 1) % U16;
    if (this.#inFlight > 0) this.#inFlight--;
    // x86 keeps stores in order: the element is visible before the index that publishes it.
    mem.setU16(this.addrs.usedRing + VIRTQ_USED_IDX, this.#nextUsed);
  }

  /**
   * Whether the driver wants an interrupt for what was used since the last call:
   * with EVENT_IDX, vring_need_event(used_event, new, old) (virtio_ring.h); else the
   * avail ring's NO_INTERRUPT flag.
   */
  needsInterrupt(): boolean {
    if (this.error) return false;
    const old = this.#signalledUsed;
    const now = this.#nextUsed;
    if (old === now) return false;
    this.#signalledUsed = now;
    // The used index stores must be visible before used_event / the flags are read: the driver
    // writes used_event, fences, then re-reads the used index before it waits (virtqueue_get_buf,
    // virtqueue_enable_cb). Without the fence both sides can read the other's old value: no
    // interrupt is sent and the driver sleeps on buffers it never sees (vhost's vhost_notify fences too).
    memoryFence();
    const mem = this.#mem;
    if (this.eventIdx) {
      const usedEvent = mem.getU16(this.addrs.availRing + VIRTQ_AVAIL_RING + VIRTQ_AVAIL_ELEM_SIZE * this.size);
      return (now - usedEvent - 1 + 2 * U16) % U16 < (now - old + U16) % U16;
    }
    return (mem.getU16(this.addrs.availRing + VIRTQ_AVAIL_FLAGS) & VRING_AVAIL_F_NO_INTERRUPT) === 0;
  }

  /**
   * Ask the driver for kicks (enable) or not. With EVENT_IDX this writes avail_event
   * (the next index the device wants a kick for); otherwise the used ring's NO_NOTIFY flag.
   */
  setNotification(enable: boolean): void {
    this.#notify = enable;
    if (this.error) return;
    if (this.eventIdx) {
      if (enable) this.#writeAvailEvent();
      return;
    }
    const a = this.addrs.usedRing + VIRTQ_USED_FLAGS;
    const flags = this.#mem.getU16(a);
    this.#mem.setU16(a, enable ? flags & ~VRING_USED_F_NO_NOTIFY : flags | VRING_USED_F_NO_NOTIFY);
    // Kicks asked for again: the flag must be visible before the available index is read again.
    if (enable) memoryFence();
  }

  /** Re-enable kicks and report whether chains arrived meanwhile (the usual race-free loop end). */
  enableNotification(): boolean {
    this.setNotification(true);
    return this.hasAvailable();
  }

  /** Chains taken from the ring (pop) and not yet completed (addUsed). */
  get inFlight(): number {
    return this.#inFlight;
  }

  /** True when every chain taken from the ring has been completed. */
  quiescent(): boolean {
    return this.#inFlight === 0;
  }

  /** Where the ring is, the device's indices into it and the interrupt/kick suppression state. */
  saveState(): DeviceState {
    return {
      type: VIRTQUEUE_STATE_TYPE,
      version: VIRTQUEUE_STATE_VERSION,
      data: {
        index: this.index,
        size: this.size,
        descTable: this.addrs.descTable,
        availRing: this.addrs.availRing,
        usedRing: this.addrs.usedRing,
        eventIdx: this.eventIdx,
        nextAvail: this.#nextAvail,
        nextUsed: this.#nextUsed,
        signalledUsed: this.#signalledUsed,
        notify: this.#notify,
        inFlight: this.#inFlight,
        malformed: this.malformed,
      },
    };
  }

  /**
   * Continue from a saved state. The queue must have been built for the same ring (index, size,
   * addresses, EVENT_IDX): the transport rebuilds it from its own saved registers first.
   */
  restoreState(state: DeviceState): void {
    const d = stateRecord(stateData(state, VIRTQUEUE_STATE_TYPE, VIRTQUEUE_STATE_VERSION), "virtqueue state");
    const what = `virtqueue ${this.index}`;
    const same: [string, number | boolean, number | boolean][] = [
      ["index", stateNumber(d.index, `${what} index`), this.index],
      ["size", stateNumber(d.size, `${what} size`), this.size],
      ["descTable", stateNumber(d.descTable, `${what} descTable`), this.addrs.descTable],
      ["availRing", stateNumber(d.availRing, `${what} availRing`), this.addrs.availRing],
      ["usedRing", stateNumber(d.usedRing, `${what} usedRing`), this.addrs.usedRing],
      ["eventIdx", stateBoolean(d.eventIdx, `${what} eventIdx`), this.eventIdx],
    ];
    for (const [name, saved, mine] of same) {
      if (saved !== mine) throw new StateError(`${what}: saved ${name} ${saved} is not this queue's ${mine}`);
    }
    const nextAvail = stateNumber(d.nextAvail, `${what} nextAvail`, 0, 0xffff);
    const nextUsed = stateNumber(d.nextUsed, `${what} nextUsed`, 0, 0xffff);
    const signalledUsed = stateNumber(d.signalledUsed, `${what} signalledUsed`, 0, 0xffff);
    const notify = stateBoolean(d.notify, `${what} notify`);
    const inFlight = stateNumber(d.inFlight, `${what} inFlight`, 0, this.size);
    const malformed = stateNumber(d.malformed, `${what} malformed`, 0);
    for (const [name, v] of [["nextAvail", nextAvail], ["nextUsed", nextUsed], ["signalledUsed", signalledUsed]]) {
      if (!Number.isInteger(v)) throw new StateError(`${what} ${name}: ${v} is not an integer`);
    }
    if (!Number.isInteger(inFlight) || !Number.isSafeInteger(malformed)) {
      throw new StateError(`${what}: inFlight ${inFlight} and malformed ${malformed} must be integers`);
    }
    this.#nextAvail = nextAvail;
    this.#nextUsed = nextUsed;
    this.#signalledUsed = signalledUsed;
    this.#notify = notify;
    this.#inFlight = inFlight;
    this.malformed = malformed;
  }

  /**
   * Ask for a kick once the driver publishes entry nextAvail. The store must be visible before the
   * available index is read again: the driver publishes its index, fences, then reads avail_event
   * (virtqueue_kick_prepare). Without the fence each side can read the other's old value: the driver
   * skips the kick and the device never sees the new chain (vhost's vhost_enable_notify fences too).
   */
  #writeAvailEvent(): void {
    this.#mem.setU16(this.addrs.usedRing + VIRTQ_USED_RING + VIRTQ_USED_ELEM_SIZE * this.size, this.nextAvail);
    memoryFence();
  }
}

function hex(n: number): string {
  return Number.isFinite(n) ? `0x${n.toString(16)}` : String(n);
}
