// A minimal vhost-user front end for tests that play one against a real back end over its socket
// (devices/vhost_user/protocol.ts encodes the messages): negotiation, a memory table from memfds,
// split rings laid out in that memory, kicks and calls. Tests that want to misbehave call send() directly.
// Also a `denovm device <type>` process (main.ts) with its stderr collected and its CPU time readable
// from /proc.

import assert from "node:assert/strict";
import {
  check,
  closeFd,
  cstr,
  eventfd,
  libc,
  MAP_SHARED,
  MFD_ALLOW_SEALING,
  MFD_CLOEXEC,
  mmap,
  munmap,
  PROT_READ,
  PROT_WRITE,
} from "../../ffi/libc.ts";
import { GuestMemory } from "../../core/memory.ts";
import {
  encodeMessage,
  type MemRegion,
  memTablePayload,
  readMessage,
  u64Payload,
  VHOST_USER_F_PROTOCOL_FEATURES,
  VHOST_USER_FLAG_NEED_REPLY,
  VHOST_USER_PROTOCOL_F_REPLY_ACK,
  VHOST_USER_VERSION,
  type VhostUserMessage,
  VhostUserRequest as R,
  vringAddrPayload,
  vringStatePayload,
} from "../../devices/vhost_user/protocol.ts";
import { UnixStream } from "../../core/unix_socket.ts";
import { VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_SIZE } from "../../devices/virtio/queue.ts";

/** The u64 payload of a reply. */
export function u64(msg: VhostUserMessage): bigint {
  return new DataView(msg.payload.buffer, msg.payload.byteOffset).getBigUint64(0, true);
}

/** A front end's connection to a back end. */
export class VhostUserFrontEnd {
  /** Whether REPLY_ACK was negotiated (ack() then gets a status). */
  replyAck = false;

  constructor(readonly sock: UnixStream) {}

  static connect(path: string): VhostUserFrontEnd {
    return new VhostUserFrontEnd(UnixStream.connect(path));
  }

  async send(request: number, payload?: Uint8Array, fds: number[] = [], flags = VHOST_USER_VERSION): Promise<void> {
    await this.sock.send(encodeMessage(request, flags, payload), fds);
  }

  /** A request that has its own reply. */
  async call(request: number, payload?: Uint8Array): Promise<VhostUserMessage> {
    await this.send(request, payload);
    const reply = await readMessage(this.sock, true);
    assert.equal(reply.request, request);
    return reply;
  }

  async callU64(request: number, payload?: Uint8Array): Promise<bigint> {
    return u64(await this.call(request, payload));
  }

  /** A request sent with NEED_REPLY (REPLY_ACK negotiated): the u64 status (0 = success). */
  async ack(request: number, payload?: Uint8Array, fds: number[] = []): Promise<bigint> {
    await this.send(request, payload, fds, VHOST_USER_VERSION | VHOST_USER_FLAG_NEED_REPLY);
    const reply = await readMessage(this.sock, true);
    assert.equal(reply.request, request);
    return u64(reply);
  }

  /** Send a request: acknowledged (asserting success) when REPLY_ACK was negotiated, plain otherwise. */
  async request(request: number, payload?: Uint8Array, fds: number[] = []): Promise<void> {
    if (this.replyAck) assert.equal(await this.ack(request, payload, fds), 0n, `request ${request} failed`);
    else await this.send(request, payload, fds);
  }

  /**
   * SET_OWNER, features (all offered), protocol features (REPLY_ACK only, when `replyAck`).
   * Returns the device's queue count.
   */
  async negotiate(opts: { replyAck: boolean }): Promise<{ features: bigint; queues: number }> {
    await this.send(R.SET_OWNER);
    const features = await this.callU64(R.GET_FEATURES);
    let queues = 0;
    if (opts.replyAck) {
      assert.ok(features & VHOST_USER_F_PROTOCOL_FEATURES);
      const proto = await this.callU64(R.GET_PROTOCOL_FEATURES);
      assert.ok(proto & VHOST_USER_PROTOCOL_F_REPLY_ACK);
      await this.send(R.SET_PROTOCOL_FEATURES, u64Payload(VHOST_USER_PROTOCOL_F_REPLY_ACK));
      this.replyAck = true;
      queues = Number(await this.callU64(R.GET_QUEUE_NUM));
      await this.request(R.SET_FEATURES, u64Payload(features));
    } else {
      await this.send(R.SET_FEATURES, u64Payload(features & ~VHOST_USER_F_PROTOCOL_FEATURES));
    }
    return { features, queues };
  }

  /** Stop ring `index`; returns where it stopped. */
  async getVringBase(index: number): Promise<number> {
    const r = await this.call(R.GET_VRING_BASE, vringStatePayload({ index, num: 0 }));
    return new DataView(r.payload.buffer, r.payload.byteOffset).getUint32(4, true);
  }

  close(): void {
    this.sock.close();
  }
}

/** A memfd mapped here, seen as guest memory at guest-physical 0 and front-end address `userBase`. */
export class SharedMemory {
  readonly fd: number;
  readonly size: number;
  readonly #ptr: Deno.PointerObject;
  readonly mem: GuestMemory;

  constructor(size: number, opts: { sealable?: boolean } = {}) {
    const flags = MFD_CLOEXEC | (opts.sealable ? MFD_ALLOW_SEALING : 0);
    this.fd = check("memfd_create", libc().memfd_create(cstr("denovm-test-front-end"), flags));
    this.size = size;
    check("ftruncate", libc().ftruncate(this.fd, BigInt(size)));
    this.#ptr = mmap(size, PROT_READ | PROT_WRITE, MAP_SHARED, this.fd, 0);
    this.mem = new GuestMemory([{ guestBase: 0, size, hostAddr: BigInt(Deno.UnsafePointer.value(this.#ptr)) }]);
  }

  /** Shrink the file (the front end's own mapping must not touch what is cut off afterwards). */
  truncate(size: number): void {
    check("ftruncate", libc().ftruncate(this.fd, BigInt(size)));
  }

  close(): void {
    munmap(this.#ptr, this.size);
    closeFd(this.fd);
  }
}

/** The front end's virtual address of guest-physical 0 in the tables these helpers send. */
export const USER_BASE = 0x7f00_0000_0000n;

/** One region of guest-physical [0, size) at USER_BASE, mapped from the file at `mmapOffset`. */
export function memTable(size: number, mmapOffset = 0): Uint8Array {
  const region: MemRegion = {
    guestPhysAddr: 0n,
    memorySize: BigInt(size),
    userspaceAddr: USER_BASE,
    mmapOffset: BigInt(mmapOffset),
  };
  return memTablePayload([region]);
}

/** Queue size of the rings the helpers lay out. */
export const QSIZE = 8;
/** Each queue's rings take RING_STRIDE bytes from `ringBase`: descriptors, then avail, then used, a page each. */
export const RING_STRIDE = 0x4000;
const AVAIL_OFFSET = 0x1000;
const USED_OFFSET = 0x2000;
/** Each queue's buffers take BUF_STRIDE bytes from `bufBase`: a readable part, then a writable one. */
export const BUF_STRIDE = 0x2000;
/** The readable descriptor publishChain lays out: BUF_READABLE_LEN bytes. */
export const BUF_READABLE_LEN = 64;
const BUF_WRITABLE_OFFSET = 0x1000;
const BUF_WRITABLE_LEN = 0x1000;

export interface RingLayout {
  ringBase: number;
  bufBase: number;
}

export function ringAddrs(layout: RingLayout, index: number): { desc: number; avail: number; used: number } {
  const desc = layout.ringBase + index * RING_STRIDE;
  return { desc, avail: desc + AVAIL_OFFSET, used: desc + USED_OFFSET };
}

/** Where queue `index`'s writable buffer is (what a device writes, e.g. rng's bytes). */
export function writableBuffer(layout: RingLayout, index: number): { addr: number; len: number } {
  return { addr: layout.bufBase + index * BUF_STRIDE + BUF_WRITABLE_OFFSET, len: BUF_WRITABLE_LEN };
}

/**
 * Set up rings 0..queues-1 (size QSIZE, base 0) at `layout` and start them with fresh kick and call
 * eventfds, which are returned (the caller closes them); with REPLY_ACK they are also enabled unless
 * `opts.enable` is false (the caller then enables each with SET_VRING_ENABLE). Touches no memory.
 */
export async function startRings(
  fe: VhostUserFrontEnd,
  layout: RingLayout,
  queues: number,
  opts: { enable?: boolean } = {},
): Promise<{ kicks: number[]; calls: number[] }> {
  const kicks: number[] = [], calls: number[] = [];
  for (let i = 0; i < queues; i++) {
    const a = ringAddrs(layout, i);
    const user = (gpa: number) => USER_BASE + BigInt(gpa);
    await fe.request(R.SET_VRING_NUM, vringStatePayload({ index: i, num: QSIZE }));
    await fe.request(R.SET_VRING_BASE, vringStatePayload({ index: i, num: 0 }));
    await fe.request(
      R.SET_VRING_ADDR,
      vringAddrPayload({ index: i, flags: 0, desc: user(a.desc), avail: user(a.avail), used: user(a.used), log: 0n }),
    );
    const call = eventfd(), kick = eventfd();
    calls.push(call);
    kicks.push(kick);
    await fe.request(R.SET_VRING_CALL, u64Payload(BigInt(i)), [call]);
    await fe.request(R.SET_VRING_KICK, u64Payload(BigInt(i)), [kick]);
  }
  if (fe.replyAck && opts.enable !== false) {
    for (let i = 0; i < queues; i++) await fe.request(R.SET_VRING_ENABLE, vringStatePayload({ index: i, num: 1 }));
  }
  return { kicks, calls };
}

/**
 * Publish one chain on queue `index`, head 0, avail idx `availIdx`: with `readable`, a readable
 * descriptor (BUF_READABLE_LEN bytes, `readable` at its start) then a writable one (BUF_WRITABLE_LEN
 * bytes); without, the writable one alone.
 */
export function publishChain(
  mem: GuestMemory,
  layout: RingLayout,
  index: number,
  availIdx: number,
  readable?: Uint8Array,
): void {
  const a = ringAddrs(layout, index);
  const buf = layout.bufBase + index * BUF_STRIDE;
  let d = a.desc;
  if (readable) {
    mem.write(buf, readable);
    mem.setU64(d, buf);
    mem.setU32(d + 8, BUF_READABLE_LEN);
    mem.setU16(d + 12, VIRTQ_DESC_F_NEXT);
    mem.setU16(d + 14, 1);
    d += VIRTQ_DESC_SIZE;
  }
  mem.setU64(d, buf + BUF_WRITABLE_OFFSET);
  mem.setU32(d + 8, BUF_WRITABLE_LEN);
  mem.setU16(d + 12, VIRTQ_DESC_F_WRITE);
  mem.setU16(a.avail + 4 + 2 * ((availIdx - 1) % QSIZE), 0);
  mem.setU16(a.avail + 2, availIdx);
}

/**
 * Publish three chains on queue `index` so that any device finds one it reads or writes: head 0 a
 * readable descriptor alone, head 1 a writable one alone, head 2 readable then writable (descriptors
 * 2 and 3). All use the queue's buffers; `readable` is written at the start of the readable one.
 * Avail idx becomes 3.
 */
export function publishEveryShape(mem: GuestMemory, layout: RingLayout, index: number, readable: Uint8Array): void {
  const a = ringAddrs(layout, index);
  const buf = layout.bufBase + index * BUF_STRIDE;
  mem.write(buf, readable);
  const desc = (i: number, addr: number, len: number, flags: number, next = 0) => {
    const d = a.desc + i * VIRTQ_DESC_SIZE;
    mem.setU64(d, addr);
    mem.setU32(d + 8, len);
    mem.setU16(d + 12, flags);
    mem.setU16(d + 14, next);
  };
  desc(0, buf, BUF_READABLE_LEN, 0);
  desc(1, buf + BUF_WRITABLE_OFFSET, BUF_WRITABLE_LEN, VIRTQ_DESC_F_WRITE);
  desc(2, buf, BUF_READABLE_LEN, VIRTQ_DESC_F_NEXT, 3);
  desc(3, buf + BUF_WRITABLE_OFFSET, BUF_WRITABLE_LEN, VIRTQ_DESC_F_WRITE);
  for (let i = 0; i < 3; i++) mem.setU16(a.avail + 4 + 2 * i, i);
  mem.setU16(a.avail + 2, 3);
}

/** Queue `index`'s used idx and its first element's length. */
export function usedState(mem: GuestMemory, layout: RingLayout, index: number): { idx: number; len: number } {
  const a = ringAddrs(layout, index);
  return { idx: mem.getU16(a.used + 2), len: mem.getU32(a.used + 8) };
}

/** A hang guard for waits on the back end (a broken back end fails the test instead of hanging it). */
export const HANG_GUARD_MS = 20_000;

export async function until(cond: () => boolean, what: string): Promise<void> {
  const end = Date.now() + HANG_GUARD_MS;
  while (!cond()) {
    if (Date.now() > end) assert.fail(`gave up waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** proc(5) /proc/<pid>/stat: utime and stime are fields 14 and 15, counted in clock ticks. */
const STAT_UTIME_FIELD = 14;
const STAT_STIME_FIELD = 15;

/** CPU time (user + system, all threads) a process has used, in clock ticks; undefined once it is gone. */
export function cpuTicks(pid: number): number | undefined {
  let stat: string;
  try {
    stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
  } catch {
    return undefined;
  }
  // Field 2 (comm) is in parentheses and may hold spaces: count fields after its closing parenthesis.
  const rest = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  const field = (n: number) => Number(rest[n - 3]);
  return field(STAT_UTIME_FIELD) + field(STAT_STIME_FIELD);
}

/** Clock ticks per second (sysconf(_SC_CLK_TCK)), as `getconf CLK_TCK` reports it. */
export function clockTicksPerSecond(): number {
  const out = new Deno.Command("getconf", { args: ["CLK_TCK"], stdout: "piped" }).outputSync();
  const n = Number(new TextDecoder().decode(out.stdout).trim());
  return Number.isInteger(n) && n > 0 ? n : 100;
}

export { DeviceProcess } from "./device_process.ts";
