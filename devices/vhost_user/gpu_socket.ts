// The vhost-user-gpu display socket (QEMU docs/interop/vhost-user-gpu.rst): after
// VHOST_USER_GPU_SET_SOCKET (vhost-user.rst, front-end request 33) hands the back end one end of a
// socket pair, the back end is the client of a tiny display protocol: it tells the front end the
// size of each scanout (SCANOUT) and sends the pixels that changed (UPDATE, x8r8g8b8 rows). The
// front end (QEMU's vhost-user-gpu) shows them on its console: a VNC client, egl-headless, a window.
//
// `VhostUserGpuDevice` is the GpuDevice served by `denovm device gpu`: it takes the socket from the
// vhost-user back end (backend.ts VhostUserRequestHandler) and forwards its headless display's
// updates. Pixels come from the display's framebuffer, brought up to date (the flushed rectangles read
// back from the scanout: virglrenderer's transfer_read_iov, no dmabuf here, so no DMABUF_SCANOUT) just
// before an UPDATE is encoded: a front end that gave no socket costs no read-back at all.
//
// Flow control: updates are coalesced per scanout (the union of the dirty rectangles), read back and
// sent from the framebuffer when the socket can take them, so a slow front end sees fewer, larger
// updates, the scanout is read back at the front end's rate, and the device never waits or queues
// frames without bound. Read-backs and the bytes sent are counted per scanout in the GPU's counters.
//
// At most one update per scanout per refresh period of the display's mode (DISPLAY_REFRESH_HZ): a
// guest that draws faster than its display refreshes has its frames folded, as a monitor would show
// them, and the scanout is read back no faster; the last frame always follows within one period.
//
// Only changed pixels cross: the socket keeps a shadow copy of what the front end shows, and of a
// flushed region sends the tiles that differ from it (tiles.ts, the web display's change detection),
// since a guest usually flushes its whole screen when a part of it moved. The send buffer is raised
// to a whole frame, so a frame's UPDATE messages go out in one write while the front end (QEMU, which
// reads a message whole before it does anything else) is not kept waiting on half of one.

import { closeFd, EAGAIN, EINTR, errno, libc, pollAsync, POLLERR, POLLHUP, POLLOUT, SysError } from "../../ffi/libc.ts";
import { raiseSendBuffer } from "../../ffi/socket.ts";
import { GpuDevice, type GpuDeviceOptions } from "../virtio/gpu/device.ts";
import { DISPLAY_REFRESH_HZ } from "../virtio/gpu/display.ts";
import type { Rect } from "../virtio/gpu/backend.ts";
import { changedRects, clip, coalesce } from "../virtio/gpu/tiles.ts";
import type { VhostUserRequestHandler } from "./backend.ts";
import { ConnectionClosed, setNonBlocking, UnixStream, WaitCancelled, Waker } from "../../core/unix_socket.ts";
import { concatBytes } from "../../core/bytes.ts";

/** Front-end request: the display socket (vhost-user.rst "Front-end message types"). */
export const VHOST_USER_GPU_SET_SOCKET = 33;

/** Requests on the display socket (vhost-user-gpu.rst "Message types", enum VhostUserGpuRequest). */
export const VhostUserGpuRequest = {
  GET_PROTOCOL_FEATURES: 1,
  SET_PROTOCOL_FEATURES: 2,
  GET_DISPLAY_INFO: 3,
  CURSOR_POS: 4,
  CURSOR_POS_HIDE: 5,
  CURSOR_UPDATE: 6,
  SCANOUT: 7,
  UPDATE: 8,
  DMABUF_SCANOUT: 9,
  DMABUF_UPDATE: 10,
  GET_EDID: 11,
  DMABUF_SCANOUT2: 12,
} as const;

/** Header: u32 request, u32 flags, u32 size of the payload that follows (vhost-user-gpu.rst "Header"). */
export const VHOST_USER_GPU_HDR_SIZE = 12;
const HDR_REQUEST = 0;
const HDR_FLAGS = 4;
const HDR_SIZE = 8;
/** Flags bit 2: this message is a reply (vhost-user-gpu.rst "Header"). */
export const VHOST_USER_GPU_MSG_FLAG_REPLY = 0x4;
/** Protocol feature bits (vhost-user-gpu.rst "Protocol features"). */
export const VHOST_USER_GPU_PROTOCOL_F_EDID = 0n;
export const VHOST_USER_GPU_PROTOCOL_F_DMABUF2 = 1n;
/** Protocol features this back end uses: none (EDID comes from the device model, no dmabufs). */
export const GPU_SOCKET_PROTOCOL_FEATURES = 0n;

/** VhostUserGpuScanout: u32 scanout_id, width, height. */
export const GPU_SCANOUT_PAYLOAD_SIZE = 12;
/** VhostUserGpuUpdate: u32 scanout_id, x, y, width, height, then width*height*4 bytes of pixels. */
export const GPU_UPDATE_HEADER_SIZE = 20;
/** Pixels are PIXMAN_x8r8g8b8 in the host's (little-endian) order: bytes B, G, R, X. */
export const GPU_UPDATE_BYTES_PER_PIXEL = 4;
/** Shortest time between two updates of one scanout: one refresh period. */
export const MIN_UPDATE_INTERVAL_MS = 1000 / DISPLAY_REFRESH_HZ;
/** Send buffer beyond a frame's pixels: the UPDATE headers of a frame's rectangles and a SCANOUT or two. */
const SEND_BUFFER_SLACK = 64 * 1024;
/** Largest payload accepted from the front end (a display-info reply is 408 bytes, EDID 1056). */
const MAX_INCOMING_PAYLOAD = 64 * 1024;

/** One display-socket message. */
export function encodeGpuMessage(request: number, flags: number, payload: Uint8Array): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(VHOST_USER_GPU_HDR_SIZE + payload.length);
  const v = new DataView(out.buffer);
  v.setUint32(HDR_REQUEST, request, true);
  v.setUint32(HDR_FLAGS, flags, true);
  v.setUint32(HDR_SIZE, payload.length, true);
  out.set(payload, VHOST_USER_GPU_HDR_SIZE);
  return out;
}

/** SCANOUT: scanout `id` is now width x height (0 x 0 disables it). */
export function encodeScanout(id: number, width: number, height: number): Uint8Array<ArrayBuffer> {
  const p = new Uint8Array(GPU_SCANOUT_PAYLOAD_SIZE);
  const v = new DataView(p.buffer);
  v.setUint32(0, id, true);
  v.setUint32(4, width, true);
  v.setUint32(8, height, true);
  return encodeGpuMessage(VhostUserGpuRequest.SCANOUT, 0, p);
}

/**
 * UPDATE of `rect` on scanout `id`, its pixels copied out of a B8G8R8A8 framebuffer `fbWidth`
 * pixels wide (the same byte order as x8r8g8b8 on a little-endian host).
 */
export function encodeUpdate(id: number, rect: Rect, fb: Uint8Array, fbWidth: number): Uint8Array<ArrayBuffer> {
  const row = rect.width * GPU_UPDATE_BYTES_PER_PIXEL;
  const payload = GPU_UPDATE_HEADER_SIZE + row * rect.height;
  const out = new Uint8Array(VHOST_USER_GPU_HDR_SIZE + payload);
  const v = new DataView(out.buffer);
  v.setUint32(HDR_REQUEST, VhostUserGpuRequest.UPDATE, true);
  v.setUint32(HDR_FLAGS, 0, true);
  v.setUint32(HDR_SIZE, payload, true);
  const p = VHOST_USER_GPU_HDR_SIZE;
  v.setUint32(p, id, true);
  v.setUint32(p + 4, rect.x, true);
  v.setUint32(p + 8, rect.y, true);
  v.setUint32(p + 12, rect.width, true);
  v.setUint32(p + 16, rect.height, true);
  const stride = fbWidth * GPU_UPDATE_BYTES_PER_PIXEL;
  for (let y = 0; y < rect.height; y++) {
    const src = (rect.y + y) * stride + rect.x * GPU_UPDATE_BYTES_PER_PIXEL;
    out.set(fb.subarray(src, src + row), p + GPU_UPDATE_HEADER_SIZE + y * row);
  }
  return out;
}

/** What the display socket sent, for tests and stats. */
export interface GpuSocketCounters {
  scanouts: number;
  updates: number;
  /** Pixel bytes sent in UPDATE messages. */
  updateBytes: number;
  /** Display updates folded into a later UPDATE because the front end was still reading. */
  coalesced: number;
  /** Flushed regions read back and found the same as what the front end shows: nothing sent. */
  unchanged: number;
  /** Protocol features the front end offered (GET_PROTOCOL_FEATURES), or -1 before its reply. */
  frontEndFeatures: number;
}

/** Counters before anything was sent. */
function noSocketCounters(): GpuSocketCounters {
  return { scanouts: 0, updates: 0, updateBytes: 0, coalesced: 0, unchanged: 0, frontEndFeatures: -1 };
}

/** The display the socket sends from (HeadlessDisplay). */
export interface FramebufferSource {
  /** The framebuffer as last read back (its size is current). */
  framebuffer(id: number): { width: number; height: number; bgra: Uint8Array };
  /** The framebuffer with every flushed rectangle read back (for this front end). */
  refresh(id: number, consumer: "vhostUser"): { width: number; height: number; bgra: Uint8Array };
  /** Count bytes sent to this front end. */
  sent(id: number, client: "vhostUser", bytes: number): void;
}

/** The back end's side of one display socket. */
export class GpuDisplaySocket {
  readonly counters: GpuSocketCounters = noSocketCounters();
  readonly #stream: UnixStream;
  readonly #waker = new Waker();
  readonly #fbs: FramebufferSource;
  readonly #log: (line: string) => void;
  /** Messages that go out before any pending update (SCANOUT, protocol). */
  readonly #control: Uint8Array[] = [];
  /** Dirty rectangle per scanout, and the size last announced with SCANOUT. */
  readonly #dirty = new Map<number, Rect>();
  readonly #announced = new Map<number, { width: number; height: number }>();
  /** Per scanout, the pixels the front end shows (one u32 per pixel), once it has a whole frame. */
  readonly #shadows = new Map<number, Uint32Array>();
  /** Scanouts whose whole framebuffer goes out next (a new size, a new front end). */
  readonly #full = new Set<number>();
  /** When each scanout's last update went out (on #now's clock). */
  readonly #lastSent = new Map<number, number>();
  /** Wakes the sender when a scanout held back by MIN_UPDATE_INTERVAL_MS may send again. */
  #timer: ReturnType<typeof setTimeout> | undefined;
  #wake: (() => void) | undefined;
  readonly #fd: number;
  #closed = false;
  #sending = false;
  readonly done: Promise<void>;

  readonly #now: () => number;

  /**
   * Take ownership of `fd` (one end of the front end's socket pair). `now`: the clock that paces updates
   * (milliseconds; tests pass their own).
   */
  constructor(fd: number, fbs: FramebufferSource, log: (line: string) => void, now = () => performance.now()) {
    setNonBlocking(fd);
    this.#fd = fd;
    this.#now = now;
    this.#stream = new UnixStream(fd, this.#waker);
    this.#fbs = fbs;
    this.#log = log;
    // vhost-user-gpu.rst: the back end asks the front end's protocol features first, then sets them.
    this.#control.push(encodeGpuMessage(VhostUserGpuRequest.GET_PROTOCOL_FEATURES, 0, new Uint8Array()));
    const set = new Uint8Array(8);
    new DataView(set.buffer).setBigUint64(0, GPU_SOCKET_PROTOCOL_FEATURES, true);
    this.#control.push(encodeGpuMessage(VhostUserGpuRequest.SET_PROTOCOL_FEATURES, 0, set));
    const run = (p: Promise<void>, what: string) =>
      p.catch((e) => {
        if (e instanceof WaitCancelled || e instanceof ConnectionClosed || this.#closed) return;
        this.#log(`display socket ${what}: ${(e as Error).message}; no more display updates`);
      }).finally(() => this.close());
    this.done = Promise.all([run(this.#sender(), "send"), run(this.#reader(), "receive")]).then(() => {
      this.#stream.close();
      this.#waker.close();
    });
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** Nothing waits to be sent and no write is under way (the front end has every update). */
  get idle(): boolean {
    return this.#control.length === 0 && this.#dirty.size === 0 && !this.#sending;
  }

  /**
   * Scanout `id`'s framebuffer changed in `rect` (framebuffer coordinates); `full`: send all of it, changed
   * or not (what a front end that just connected needs).
   */
  update(id: number, rect: Rect, full = false): void {
    if (this.#closed) return;
    const fb = this.#fbs.framebuffer(id);
    const size = this.#announced.get(id);
    if (!size || size.width !== fb.width || size.height !== fb.height) {
      // A new size: announce it, and the whole framebuffer is new.
      this.#announced.set(id, { width: fb.width, height: fb.height });
      this.#control.push(encodeScanout(id, fb.width, fb.height));
      this.counters.scanouts++;
      full = true;
      this.#dirty.delete(id);
      // A whole frame of UPDATEs fits in the socket: one write, the front end never waits on a half.
      raiseSendBuffer(this.#fd, fb.width * fb.height * GPU_UPDATE_BYTES_PER_PIXEL + SEND_BUFFER_SLACK);
    }
    if (full) {
      rect = { x: 0, y: 0, width: fb.width, height: fb.height };
      this.#full.add(id);
    }
    const old = this.#dirty.get(id);
    if (old) this.counters.coalesced++;
    this.#dirty.set(id, old ? union(old, rect) : rect);
    this.#kick();
  }

  /** Stop sending; the socket is closed once both directions stopped. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    clearTimeout(this.#timer);
    this.#waker.wake();
    this.#kick();
  }

  #kick(): void {
    const w = this.#wake;
    this.#wake = undefined;
    w?.();
  }

  async #sender(): Promise<void> {
    while (!this.#closed) {
      const msg = this.#control.shift() ?? this.#nextUpdate();
      if (!msg) {
        await new Promise<void>((resolve) => {
          this.#wake = resolve;
          const due = this.#nextDue();
          if (due !== undefined) this.#timer = setTimeout(() => this.#kick(), due);
        });
        clearTimeout(this.#timer);
        this.#timer = undefined;
        continue;
      }
      this.#sending = true;
      try {
        await this.#send(msg);
      } finally {
        this.#sending = false;
      }
    }
  }

  /** Write all of `msg` (no copies: write(2) straight from the array), waiting while the socket is full. */
  async #send(msg: Uint8Array): Promise<void> {
    const fd = this.#stream.fd;
    let off = 0;
    while (off < msg.length) {
      if (this.#closed) throw new WaitCancelled();
      const n = Number(libc().write(fd, msg.subarray(off), BigInt(msg.length - off)));
      if (n >= 0) {
        off += n;
        continue;
      }
      const e = errno();
      if (e === EINTR) continue;
      if (e !== EAGAIN) throw new SysError("write", e);
      const rev = await pollAsync([fd, this.#waker.fd], POLLOUT, -1);
      if (this.#waker.woken) throw new WaitCancelled();
      if (rev[0] & (POLLERR | POLLHUP) && !(rev[0] & POLLOUT)) throw new ConnectionClosed();
    }
  }

  /** Milliseconds until a dirty scanout's refresh period is over, or undefined when none is dirty. */
  #nextDue(): number | undefined {
    let due: number | undefined;
    for (const id of this.#dirty.keys()) {
      const wait = Math.max(0, (this.#lastSent.get(id) ?? -Infinity) + MIN_UPDATE_INTERVAL_MS - this.#now());
      due = Math.min(due ?? wait, wait);
    }
    return due;
  }

  /** The UPDATE messages of the next dirty scanout due for an update with changed pixels, as one buffer. */
  #nextUpdate(): Uint8Array | undefined {
    const now = this.#now();
    for (const [id, rect] of this.#dirty) {
      if (now < (this.#lastSent.get(id) ?? -Infinity) + MIN_UPDATE_INTERVAL_MS) continue;
      this.#dirty.delete(id);
      const fb = this.#fbs.refresh(id, "vhostUser");
      const r = clip(rect, fb.width, fb.height);
      if (!r) continue;
      const n = fb.width * fb.height;
      const aligned = fb.bgra.byteOffset % GPU_UPDATE_BYTES_PER_PIXEL === 0;
      let shadow = this.#shadows.get(id);
      let rects: Rect[];
      if (this.#full.has(id) || !aligned || shadow?.length !== n) {
        this.#full.delete(id);
        rects = [r];
        shadow = aligned
          ? new Uint32Array(
            fb.bgra.buffer.slice(fb.bgra.byteOffset, fb.bgra.byteOffset + n * GPU_UPDATE_BYTES_PER_PIXEL),
          )
          : undefined;
        if (shadow) this.#shadows.set(id, shadow);
        else this.#shadows.delete(id);
      } else {
        rects = coalesce(changedRects(fb, shadow, [r]).rects);
      }
      if (rects.length === 0) {
        this.counters.unchanged++;
        continue;
      }
      const msgs = rects.map((c) => encodeUpdate(id, c, fb.bgra, fb.width));
      const out = msgs.length === 1 ? msgs[0] : concatBytes(msgs);
      for (const c of rects) {
        this.counters.updates++;
        this.counters.updateBytes += c.width * c.height * GPU_UPDATE_BYTES_PER_PIXEL;
      }
      this.#fbs.sent(id, "vhostUser", out.length);
      this.#lastSent.set(id, now);
      return out;
    }
    return undefined;
  }

  /** Replies from the front end (GET_PROTOCOL_FEATURES); anything else is logged and skipped. */
  async #reader(): Promise<void> {
    while (!this.#closed) {
      const hdr = await this.#stream.recvExact(VHOST_USER_GPU_HDR_SIZE);
      hdr.fds.forEach(closeFd);
      const v = new DataView(hdr.data.buffer);
      const request = v.getUint32(HDR_REQUEST, true);
      const size = v.getUint32(HDR_SIZE, true);
      if (size > MAX_INCOMING_PAYLOAD) throw new Error(`front end sent a ${size}-byte payload`);
      const body = await this.#stream.recvExact(size);
      body.fds.forEach(closeFd);
      if (request === VhostUserGpuRequest.GET_PROTOCOL_FEATURES && size >= 8) {
        this.counters.frontEndFeatures = Number(new DataView(body.data.buffer).getBigUint64(0, true));
      } else {
        this.#log(`display socket: ignoring message ${request} (${size} bytes) from the front end`);
      }
    }
  }
}

function union(a: Rect, b: Rect): Rect {
  const x0 = Math.min(a.x, b.x), y0 = Math.min(a.y, b.y);
  const x1 = Math.max(a.x + a.width, b.x + b.width), y1 = Math.max(a.y + a.height, b.y + b.height);
  return { x: x0, y: y0, width: x1 - x0, height: y1 - y0 };
}

export interface VhostUserGpuDeviceOptions extends GpuDeviceOptions {
  /** Log lines (default stderr with a "vhost-user gpu:" prefix). */
  log?: (line: string) => void;
  /** The clock that paces display updates, in milliseconds (default performance.now; tests pass their own). */
  now?: () => number;
}

/** The virtio-gpu device model with the vhost-user-gpu display socket. */
export class VhostUserGpuDevice extends GpuDevice implements VhostUserRequestHandler {
  #socket: GpuDisplaySocket | undefined;
  readonly #socketLog: (line: string) => void;
  readonly #now: (() => number) | undefined;
  /** Counters of every display socket so far (the current one's included). */
  readonly socketTotals: GpuSocketCounters = noSocketCounters();
  /** Display sockets the front end gave. */
  socketsReceived = 0;
  #folded: GpuSocketCounters = noSocketCounters();

  constructor(opts: VhostUserGpuDeviceOptions) {
    super(opts);
    this.#socketLog = opts.log ?? ((line) => console.error(`vhost-user gpu: ${line}`));
    this.#now = opts.now;
    this.display.onUpdate((id, rect) => {
      // Flushed, not read yet: the socket reads the pixels back when it sends.
      this.#socket?.update(id, rect);
      this.#refreshTotals();
    });
  }

  /** Bytes of scanouts read back into the framebuffer, for the front end or anyone else who looked. */
  get scanoutReadbackBytes(): number {
    return this.accounting.totals.scanoutReadbackBytes;
  }

  /** The current display socket, if the front end gave one. */
  get displaySocket(): GpuDisplaySocket | undefined {
    return this.#socket;
  }

  vhostUserRequest(request: number, _payload: Uint8Array, fds: number[]): boolean {
    if (request !== VHOST_USER_GPU_SET_SOCKET) return false;
    if (fds.length !== 1) {
      this.#socketLog(`VHOST_USER_GPU_SET_SOCKET with ${fds.length} descriptors; ignored`);
      return true;
    }
    this.#dropSocket();
    this.socketsReceived++;
    const s = new GpuDisplaySocket(fds.shift()!, this.display, this.#socketLog, this.#now);
    this.#socket = s;
    // A front end that (re)connects sees what is on screen now.
    for (let id = 0; id < this.display.count; id++) {
      if (!this.display.source(id)) continue;
      const fb = this.display.framebuffer(id);
      s.update(id, { x: 0, y: 0, width: fb.width, height: fb.height }, true);
    }
    return true;
  }

  vhostUserDisconnected(): void {
    this.#dropSocket();
  }

  override close(): void {
    this.#dropSocket();
    super.close();
  }

  override stats(): Record<string, number> {
    this.#refreshTotals();
    return {
      ...super.stats(),
      displayScanouts: this.socketTotals.scanouts,
      displayUpdates: this.socketTotals.updates,
      displayUpdateBytes: this.socketTotals.updateBytes,
      displayCoalesced: this.socketTotals.coalesced,
      displayUnchanged: this.socketTotals.unchanged,
      scanoutReadbackBytes: this.scanoutReadbackBytes,
    };
  }

  #refreshTotals(): void {
    const c = this.#socket?.counters;
    const f = this.#folded;
    this.socketTotals.scanouts = f.scanouts + (c?.scanouts ?? 0);
    this.socketTotals.updates = f.updates + (c?.updates ?? 0);
    this.socketTotals.updateBytes = f.updateBytes + (c?.updateBytes ?? 0);
    this.socketTotals.coalesced = f.coalesced + (c?.coalesced ?? 0);
    this.socketTotals.unchanged = f.unchanged + (c?.unchanged ?? 0);
    this.socketTotals.frontEndFeatures = c?.frontEndFeatures ?? f.frontEndFeatures;
  }

  #dropSocket(): void {
    const s = this.#socket;
    if (!s) return;
    this.#refreshTotals();
    this.#folded = { ...this.socketTotals };
    this.#socket = undefined;
    s.close();
  }
}
