// Building blocks of the vhost-user fuzzer (vhost_user.ts): a seeded PRNG, guest memory shared through
// memfds with a shadow copy for the out-of-bounds check, and a front-end connection that batches many
// messages per write and reads their replies with a deadline.

import {
  check,
  closeFd,
  cstr,
  libc,
  MAP_SHARED,
  MFD_CLOEXEC,
  mmap,
  munmap,
  pollAsync,
  POLLIN,
  PROT_READ,
  PROT_WRITE,
} from "../../ffi/libc.ts";
import { ConnectionClosed, UnixStream } from "../../core/unix_socket.ts";
import {
  encodeMessage,
  type MemRegion,
  VHOST_USER_FLAG_NEED_REPLY,
  VHOST_USER_HEADER_SIZE,
  VhostUserRequest as R,
} from "../../devices/vhost_user/protocol.ts";

// ---- A seeded PRNG (sfc32: small, fast, good enough for fuzzing; reproducible from one seed) ----

export class Rng {
  #a: number;
  #b: number;
  #c: number;
  #d: number;

  constructor(seed: number) {
    this.#a = 0x9e3779b9;
    this.#b = 0x243f6a88;
    this.#c = 0xb7e15162;
    this.#d = seed >>> 0;
    for (let i = 0; i < 15; i++) this.u32();
  }

  u32(): number {
    const t = (((this.#a + this.#b) | 0) + this.#d) | 0;
    this.#d = (this.#d + 1) | 0;
    this.#a = this.#b ^ (this.#b >>> 9);
    this.#b = (this.#c + (this.#c << 3)) | 0;
    this.#c = (this.#c << 21) | (this.#c >>> 11);
    this.#c = (this.#c + t) | 0;
    return t >>> 0;
  }
  /** An integer in [0, n). */
  int(n: number): number {
    return n <= 1 ? 0 : Math.floor((this.u32() / 0x1_0000_0000) * n);
  }
  /** An integer in [lo, hi]. */
  range(lo: number, hi: number): number {
    return lo + this.int(hi - lo + 1);
  }
  chance(p: number): boolean {
    return this.u32() / 0x1_0000_0000 < p;
  }
  pick<T>(a: readonly T[]): T {
    return a[this.int(a.length)];
  }
  u64(): bigint {
    return (BigInt(this.u32()) << 32n) | BigInt(this.u32());
  }
  /** A value near the edges of a field of `bits` bits, or a random one. */
  edgy(bits: 8 | 16 | 32): number {
    const max = bits === 32 ? 0xffff_ffff : (1 << bits) - 1;
    switch (this.int(6)) {
      case 0:
        return 0;
      case 1:
        return max;
      case 2:
        return max - this.int(4);
      case 3:
        return this.int(16);
      case 4:
        return 1 << this.int(bits);
      default:
        return bits === 32 ? this.u32() : this.int(max + 1);
    }
  }
  /** A seed for an independent stream. */
  fork(): Rng {
    return new Rng(this.u32());
  }
}

/** A stable 32-bit hash of a string (FNV-1a), to give each device type its own stream from one seed. */
export function hashString(s: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 0x01000193);
  return h >>> 0;
}

/** Random bytes without a PRNG call per byte: slices of a pool filled once from the seed. */
export class BytePool {
  readonly #pool: Uint8Array<ArrayBuffer>;
  constructor(readonly rng: Rng, size = 1 << 16) {
    this.#pool = new Uint8Array(size * 2);
    const w = new Uint32Array(this.#pool.buffer);
    for (let i = 0; i < w.length; i++) w[i] = rng.u32();
  }
  /** `n` random bytes (a view into the pool: copy it if it is kept). n <= 64 KiB. */
  bytes(n: number): Uint8Array<ArrayBuffer> {
    const o = this.rng.int(this.#pool.length / 2);
    return this.#pool.subarray(o, o + Math.min(n, this.#pool.length / 2));
  }
}

// ---- Shared guest memory ----

/** The byte every guest byte outside the driver's structures holds, so that any write there shows. */
export const PATTERN = 0xa5;

/** A memfd mapped here whole, with a shadow of what it should hold outside the device's grants. */
export class SharedFile {
  readonly fd: number;
  readonly bytes: Uint8Array<ArrayBuffer>;
  readonly dv: DataView<ArrayBuffer>;
  readonly shadow: Uint8Array<ArrayBuffer>;
  readonly #ptr: Deno.PointerObject;
  readonly #words: Int32Array<ArrayBuffer>;
  readonly #shadowWords: Int32Array<ArrayBuffer>;

  constructor(readonly size: number) {
    this.fd = check("memfd_create", libc().memfd_create(cstr("denovm-fuzz"), MFD_CLOEXEC));
    check("ftruncate", libc().ftruncate(this.fd, BigInt(size)));
    this.#ptr = mmap(size, PROT_READ | PROT_WRITE, MAP_SHARED, this.fd, 0);
    const ab = Deno.UnsafePointerView.getArrayBuffer(this.#ptr, size);
    this.bytes = new Uint8Array(ab);
    this.dv = new DataView(ab);
    this.bytes.fill(PATTERN);
    this.shadow = this.bytes.slice();
    this.#words = new Int32Array(ab, 0, size >>> 2);
    this.#shadowWords = new Int32Array(this.shadow.buffer, 0, size >>> 2);
  }

  /** Take the current contents as the expected ones. */
  snapshot(): void {
    this.shadow.set(this.bytes);
  }

  /** Accept what the device wrote in [off, off+len). */
  accept(off: number, len: number): void {
    this.shadow.set(this.bytes.subarray(off, off + len), off);
  }

  /** Byte ranges that differ from the shadow (at most `max`). */
  diff(max = 4): { off: number; len: number }[] {
    const out: { off: number; len: number }[] = [];
    const a = this.#words;
    const b = this.#shadowWords;
    for (let i = 0; i < a.length; i++) {
      if (a[i] === b[i]) continue;
      let j = i;
      while (j < a.length && a[j] !== b[j]) j++;
      // Narrow the words down to the bytes that differ.
      let first = i * 4;
      let last = j * 4 - 1;
      while (this.bytes[first] === this.shadow[first]) first++;
      while (this.bytes[last] === this.shadow[last]) last--;
      out.push({ off: first, len: last - first + 1 });
      if (out.length >= max) return out;
      i = j;
    }
    for (let k = a.length * 4; k < this.size; k++) {
      if (this.bytes[k] !== this.shadow[k]) {
        out.push({ off: k, len: 1 });
        break;
      }
    }
    return out;
  }

  close(): void {
    munmap(this.#ptr, this.size);
    closeFd(this.fd);
  }
}

/** One region of a memory table: guest range, front-end address, and where its bytes are. */
export interface Region {
  guestBase: number;
  size: number;
  user: bigint;
  file: SharedFile;
  fileOff: number;
}

/** A guest-physical range; `file`/`off` says where its bytes live here. */
export interface Piece {
  file: SharedFile;
  off: number;
  len: number;
}

/** Guest memory as the back end sees it after SET_MEM_TABLE, and as this front end writes it. */
export class Layout {
  readonly regions: Region[];
  readonly files: SharedFile[];

  constructor(regions: Region[], files: SharedFile[]) {
    this.regions = [...regions].sort((a, b) => a.guestBase - b.guestBase);
    this.files = files;
  }

  /** The region holding all of [g, g+len), or undefined. */
  regionOf(g: number, len = 1): Region | undefined {
    for (const r of this.regions) {
      if (g >= r.guestBase && g < r.guestBase + r.size) return len <= r.guestBase + r.size - g ? r : undefined;
    }
    return undefined;
  }

  /** Where guest bytes [g, g+len) are (they must be in one region). */
  at(g: number, len: number): { file: SharedFile; off: number } {
    const r = this.regionOf(g, len);
    if (!r) throw new Error(`fuzzer bug: 0x${g.toString(16)} + ${len} is not in one region`);
    return { file: r.file, off: r.fileOff + (g - r.guestBase) };
  }

  /**
   * The parts of [g, g+len) that lie in guest memory, following adjacent regions as the back end's
   * queue does (devices/virtio/queue.ts #split); `whole` says whether the range is all in memory.
   */
  pieces(g: number, len: number): { pieces: Piece[]; whole: boolean } {
    const pieces: Piece[] = [];
    let a = g;
    let left = len;
    while (left > 0) {
      const r = this.regions.find((r) => a >= r.guestBase && a < r.guestBase + r.size);
      if (!r) return { pieces, whole: false };
      const take = Math.min(left, r.guestBase + r.size - a);
      pieces.push({ file: r.file, off: r.fileOff + (a - r.guestBase), len: take });
      a += take;
      left -= take;
    }
    return { pieces, whole: true };
  }

  /** The front end's address of guest byte g. */
  user(g: number): bigint {
    const r = this.regionOf(g);
    if (!r) throw new Error(`fuzzer bug: 0x${g.toString(16)} is not guest memory`);
    return r.user + BigInt(g - r.guestBase);
  }

  /** The back end's translation of a front-end address (core/memory.ts userToGuest), or undefined. */
  userToGuest(u: bigint, len: number): number | undefined {
    for (const r of this.regions) {
      if (u >= r.user && u + BigInt(len) <= r.user + BigInt(r.size)) return r.guestBase + Number(u - r.user);
    }
    return undefined;
  }

  /** Guest address of a file byte, for reports (first region that maps it). */
  guestOf(file: SharedFile, off: number): number | undefined {
    for (const r of this.regions) {
      if (r.file === file && off >= r.fileOff && off < r.fileOff + r.size) return r.guestBase + off - r.fileOff;
    }
    return undefined;
  }

  table(): { regions: MemRegion[]; fds: number[] } {
    return {
      regions: this.regions.map((r) => ({
        guestPhysAddr: BigInt(r.guestBase),
        memorySize: BigInt(r.size),
        userspaceAddr: r.user,
        mmapOffset: BigInt(r.fileOff),
      })),
      fds: this.regions.map((r) => r.file.fd),
    };
  }

  w8(g: number, v: number): void {
    const { file, off } = this.at(g, 1);
    file.bytes[off] = v;
  }
  w16(g: number, v: number): void {
    const { file, off } = this.at(g, 2);
    file.dv.setUint16(off, v, true);
  }
  w32(g: number, v: number): void {
    const { file, off } = this.at(g, 4);
    file.dv.setUint32(off, v >>> 0, true);
  }
  w64(g: number, v: bigint): void {
    const { file, off } = this.at(g, 8);
    file.dv.setBigUint64(off, BigInt.asUintN(64, v), true);
  }
  r16(g: number): number {
    const { file, off } = this.at(g, 2);
    return file.dv.getUint16(off, true);
  }
  r32(g: number): number {
    const { file, off } = this.at(g, 4);
    return file.dv.getUint32(off, true);
  }
  write(g: number, data: Uint8Array): void {
    if (data.length === 0) return;
    const { file, off } = this.at(g, data.length);
    file.bytes.set(data, off);
  }
  fill(g: number, len: number, v: number): void {
    if (len === 0) return;
    const { file, off } = this.at(g, len);
    file.bytes.fill(v, off, off + len);
  }

  snapshot(): void {
    for (const f of this.files) f.snapshot();
  }

  close(): void {
    for (const f of this.files) f.close();
  }
}

/** A bump allocator over one region's guest range. */
export class Arena {
  #next: number;
  constructor(readonly start: number, readonly end: number) {
    this.#next = start;
  }
  alloc(len: number, align = 1): number | undefined {
    const a = Math.ceil(this.#next / align) * align;
    if (a + len > this.end) return undefined;
    this.#next = a + len;
    return a;
  }
  get free(): number {
    return this.end - this.#next;
  }
  reset(): void {
    this.#next = this.start;
  }
}

// ---- The front end's connection ----

/** Requests the back end always answers (devices/vhost_user/backend.ts REQUESTS_WITH_REPLY). */
export const REQUESTS_WITH_REPLY: ReadonlySet<number> = new Set([
  R.GET_FEATURES,
  R.GET_PROTOCOL_FEATURES,
  R.GET_VRING_BASE,
  R.GET_CONFIG,
  R.GET_QUEUE_NUM,
]);

export interface Reply {
  request: number;
  flags: number;
  payload: Uint8Array<ArrayBuffer>;
}

export type DrainResult =
  | { kind: "ok"; replies: Reply[] }
  | { kind: "closed"; replies: Reply[] }
  | { kind: "timeout"; replies: Reply[] };

/** Messages written with one sendmsg; descriptors travel with the first byte, so each message with fds starts a group. */
interface Group {
  parts: Uint8Array[];
  fds: number[];
}

/** One connection to the back end. Messages are queued, then written a group per sendmsg. */
export class Conn {
  readonly sock: UnixStream;
  #groups: Group[] = [];
  /** Request codes whose replies are still to come, in order. */
  readonly expected: number[] = [];
  /** Messages queued since the last flush (for counting). */
  queued = 0;
  #rx = new Uint8Array(0);
  closed = false;

  constructor(path: string) {
    this.sock = UnixStream.connect(path);
  }

  /** Queue a message; `reply` overrides whether a reply is expected (default: the back end's rule). */
  push(request: number, flags: number, payload: Uint8Array = new Uint8Array(), fds: number[] = [], reply?: boolean) {
    this.pushRaw(encodeMessage(request, flags, payload), fds);
    if (reply ?? (REQUESTS_WITH_REPLY.has(request) || (flags & VHOST_USER_FLAG_NEED_REPLY) !== 0)) {
      this.expected.push(request);
    }
  }

  /** Queue raw bytes (a broken message). */
  pushRaw(bytes: Uint8Array, fds: number[] = []): void {
    const last = this.#groups.at(-1);
    if (fds.length === 0 && last) last.parts.push(bytes);
    else this.#groups.push({ parts: [bytes], fds });
    this.queued++;
  }

  /** Write everything queued; false when the back end has gone (its side closed). */
  async flush(): Promise<boolean> {
    const groups = this.#groups.splice(0);
    this.queued = 0;
    if (this.closed) return false;
    try {
      for (const g of groups) {
        const total = g.parts.reduce((n, p) => n + p.length, 0);
        const buf = new Uint8Array(total);
        let o = 0;
        for (const p of g.parts) {
          buf.set(p, o);
          o += p.length;
        }
        await this.sock.send(buf, g.fds);
      }
      return true;
    } catch {
      this.closed = true;
      return false;
    }
  }

  /** Read the expected replies, until `deadline` (performance.now() ms). */
  async drain(deadline: number): Promise<DrainResult> {
    const replies: Reply[] = [];
    while (this.expected.length > 0) {
      const r = await this.#readOne(deadline);
      if (r === "closed" || r === "timeout") {
        this.expected.length = 0;
        if (r === "closed") this.closed = true;
        return { kind: r, replies };
      }
      this.expected.shift();
      replies.push(r);
    }
    return { kind: "ok", replies };
  }

  async #readOne(deadline: number): Promise<Reply | "closed" | "timeout"> {
    for (;;) {
      if (this.#rx.length >= VHOST_USER_HEADER_SIZE) {
        const dv = new DataView(this.#rx.buffer, this.#rx.byteOffset, this.#rx.byteLength);
        const size = dv.getUint32(8, true);
        if (this.#rx.length >= VHOST_USER_HEADER_SIZE + size) {
          const reply = {
            request: dv.getUint32(0, true),
            flags: dv.getUint32(4, true),
            payload: this.#rx.slice(VHOST_USER_HEADER_SIZE, VHOST_USER_HEADER_SIZE + size),
          };
          this.#rx = this.#rx.slice(VHOST_USER_HEADER_SIZE + size);
          return reply;
        }
      }
      if (this.closed) return "closed";
      let got;
      try {
        got = this.sock.tryRecv(65536);
      } catch (e) {
        if (e instanceof ConnectionClosed || e instanceof Error) {
          this.closed = true;
          return "closed";
        }
        throw e;
      }
      if (got) {
        got.fds.forEach(closeFd);
        const n = new Uint8Array(this.#rx.length + got.data.length);
        n.set(this.#rx);
        n.set(got.data, this.#rx.length);
        this.#rx = n;
        continue;
      }
      const left = Math.ceil(deadline - performance.now());
      if (left <= 0) return "timeout";
      await pollAsync([this.sock.fd], POLLIN, Math.min(left, 1000));
    }
  }

  close(): void {
    this.closed = true;
    this.sock.close();
  }
}
