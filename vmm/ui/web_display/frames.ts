// One page's stream of frames. Flushed regions of its scanout collect as damage; a batch (every changed
// rectangle since the last one) goes out at most once per frame interval, only while fewer than
// MAX_IN_FLIGHT batches wait for the page's ack and only while the page's socket holds at most
// SEND_BUFFER_LOW_BYTES not yet sent. A batch is made from the framebuffer when it goes out (the display
// reads the flushed rectangles back then, so the scanout is read at the page's pace), so a slow page
// gets fewer, larger batches of the newest pixels instead of a growing backlog of old ones: at most one
// batch waits in its socket. The first batch, and the one after a mode change, is the
// whole framebuffer; later ones are what change detection (tiles.ts) finds different from the page's copy.

import type { Rect } from "../../../devices/virtio/gpu/backend.ts";
import type { Framebuffer, HeadlessDisplay } from "../../../devices/virtio/gpu/display.ts";
import type { RateLimitedLog } from "../../../core/log.ts";
import { BPP, type Compression, encodeRect } from "./encode.ts";
import { RECT_FLAG_FULL, RECT_FLAG_LAST } from "./protocol.ts";
import { changedRects, clip, coalesce, MAX_RECTS_PER_BATCH } from "../../../devices/virtio/gpu/tiles.ts";
import { releaseBuffer } from "./websocket.ts";

/** Batches sent and not yet acknowledged by the page. */
const MAX_IN_FLIGHT = 2;
/**
 * Bytes a page's socket may hold unsent for the next batch (or stats message) to be sent to it: above this
 * the page is not keeping up, and what changes waits as damage until the socket drains.
 */
export const SEND_BUFFER_LOW_BYTES = 256 * 1024;
/** The rectangle header's u16 fields. */
const MAX_DIMENSION = 0xffff;

/** The frame counters of WebDisplayStats (server.ts), shared by every page's stream. */
export interface FrameCounters {
  /** Batches (one per tick: every changed rectangle since the last one) and their rectangle messages. */
  batchesSent: number;
  rectsSent: number;
  /** Bytes of binary rectangle messages (header + pixels). */
  bytesSent: number;
  /** Rectangles sent compressed (PNG or deflate-raw), and the raw RGBA bytes they stood for. */
  rectsDeflated: number;
  deflatedRawBytes: number;
  /** Tiles (TILE_SIZE squares, clipped to the flushed region) compared with what the page has, and those changed. */
  tilesCompared: number;
  tilesChanged: number;
  /** Milliseconds the server spent preparing and sending batches (change detection, conversion, deflate). */
  encodeMs: number;
  /** Batches the pages acknowledged as drawn. */
  acks: number;
  /** Milliseconds the pages reported (in their acks) decoding and drawing the batches. */
  pageDecodeMs: number;
  pageDrawMs: number;
}

/** Frame counters, all zero. */
export function zeroFrameCounters(): FrameCounters {
  return {
    batchesSent: 0,
    rectsSent: 0,
    bytesSent: 0,
    rectsDeflated: 0,
    deflatedRawBytes: 0,
    tilesCompared: 0,
    tilesChanged: 0,
    encodeMs: 0,
    acks: 0,
    pageDecodeMs: 0,
    pageDrawMs: 0,
  };
}

/** Where a page's batches go (its WebSocket, websocket.ts). */
export interface FrameSink {
  readonly open: boolean;
  /** Bytes sent and not yet taken by the connection. */
  readonly bufferedAmount: number;
  send(msg: Uint8Array): void;
}

export interface FrameStreamOptions {
  display: HeadlessDisplay;
  scanout: number;
  /** The page's socket: batches are sent while it is open; call schedule() again when it drains. */
  ws: FrameSink;
  compression: Compression;
  /** Shortest time between two batches (1000 / the frame-rate cap). */
  minIntervalMs: number;
  counters: FrameCounters;
  log: RateLimitedLog;
}

export class FrameStream {
  readonly #o: FrameStreamOptions;
  #dirty: Rect[] = [];
  #full = true;
  #inFlight = 0;
  #seq = 0;
  #lastSend = -Infinity;
  #timer: ReturnType<typeof setTimeout> | undefined;
  #stopped = false;
  #sentWidth = 0;
  #sentHeight = 0;
  /** What the page was last sent (sentWidth x sentHeight, one u32 per B8G8R8A8 pixel). */
  #shadow: Uint32Array | null = null;

  constructor(opts: FrameStreamOptions) {
    this.#o = opts;
  }

  /** The size of the framebuffer the page was last sent (its coordinate space). */
  get sentWidth(): number {
    return this.#sentWidth;
  }

  get sentHeight(): number {
    return this.#sentHeight;
  }

  /** The guest flushed `rect`: send it (what of it changed) with the next batch. */
  damage(rect: Rect): void {
    if (this.#full) return;
    this.#dirty.push({ ...rect });
    if (this.#dirty.length > MAX_RECTS_PER_BATCH) this.#dirty = coalesce(this.#dirty);
    this.schedule();
  }

  /** The page drew a batch, taking decodeMs and drawMs (its report). */
  ack(decodeMs: number, drawMs: number): void {
    if (this.#inFlight > 0) this.#inFlight--;
    this.#o.counters.acks++;
    this.#o.counters.pageDecodeMs += decodeMs;
    this.#o.counters.pageDrawMs += drawMs;
    this.schedule();
  }

  /**
   * Send a batch when one is due: something to send, the page not too far behind, its socket drained, the
   * interval passed.
   */
  schedule(): void {
    if (this.#stopped || this.#timer !== undefined || this.#inFlight >= MAX_IN_FLIGHT) return;
    if (this.#o.ws.bufferedAmount > SEND_BUFFER_LOW_BYTES) return;
    if (!this.#full && this.#dirty.length === 0) return;
    const delay = Math.max(0, this.#lastSend + this.#o.minIntervalMs - performance.now());
    this.#timer = setTimeout(() => {
      this.#timer = undefined;
      this.#sendBatch();
    }, delay);
  }

  /** The page went away: nothing more is sent. */
  stop(): void {
    this.#stopped = true;
    if (this.#shadow) releaseBuffer(this.#shadow);
    this.#shadow = null;
    this.#dirty = [];
    if (this.#timer !== undefined) clearTimeout(this.#timer);
    this.#timer = undefined;
  }

  #sendBatch(): void {
    const { display, scanout, ws, counters, log } = this.#o;
    if (this.#stopped || !ws.open || ws.bufferedAmount > SEND_BUFFER_LOW_BYTES) return;
    let fb: Framebuffer;
    try {
      fb = display.refresh(scanout, "web");
    } catch (e) {
      log.log(`${e}`);
      return;
    }
    if (fb.width > MAX_DIMENSION || fb.height > MAX_DIMENSION) {
      log.log(`framebuffer ${fb.width}x${fb.height} too large to send`);
      return;
    }
    const t0 = performance.now();
    if (fb.width !== this.#sentWidth || fb.height !== this.#sentHeight) this.#full = true;
    const full = this.#full;
    const n = fb.width * fb.height;
    const canDiff = fb.bgra.byteOffset % BPP === 0 && fb.bgra.byteLength >= n * BPP;
    let rects: Rect[];
    if (full || !canDiff || !this.#shadow) {
      rects = (full ? [{ x: 0, y: 0, width: fb.width, height: fb.height }] : coalesce(this.#dirty))
        .map((r) => clip(r, fb.width, fb.height)).filter((r): r is Rect => r !== null);
      if (this.#shadow) releaseBuffer(this.#shadow);
      this.#shadow = canDiff
        ? new Uint32Array(fb.bgra.buffer.slice(fb.bgra.byteOffset, fb.bgra.byteOffset + n * BPP))
        : null;
    } else {
      // Only what changed since the page's last frame: a guest often flushes far more than it redrew.
      const d = changedRects(fb, this.#shadow, coalesce(this.#dirty));
      rects = d.rects;
      counters.tilesCompared += d.tiles;
      counters.tilesChanged += d.changed;
    }
    this.#dirty = [];
    this.#full = false;
    this.#sentWidth = fb.width;
    this.#sentHeight = fb.height;
    if (rects.length === 0) {
      counters.encodeMs += performance.now() - t0;
      return;
    }
    const seq = this.#seq = (this.#seq + 1) >>> 0;
    rects.forEach((r, i) => {
      const { msg, compressed, rawBytes } = encodeRect(fb, r, this.#o.compression, {
        flags: (i === rects.length - 1 ? RECT_FLAG_LAST : 0) | (full ? RECT_FLAG_FULL : 0),
        scanout,
        seq,
        x: r.x,
        y: r.y,
        w: r.width,
        h: r.height,
        fbWidth: fb.width,
        fbHeight: fb.height,
      });
      if (compressed) {
        counters.rectsDeflated++;
        counters.deflatedRawBytes += rawBytes;
      }
      ws.send(msg);
      counters.rectsSent++;
      counters.bytesSent += msg.byteLength;
      display.sent(scanout, "web", msg.byteLength);
    });
    counters.batchesSent++;
    this.#inFlight++;
    this.#lastSend = performance.now();
    counters.encodeMs += this.#lastSend - t0;
  }
}
