// The web display: an HTTP page and a WebSocket on loopback that show a VM's scanout live (only the
// changed rectangles are sent), forward keyboard, mouse and touch to virtio-input devices, and stream the
// virtio-gpu copy counters for the page's live plot. Every request needs the per-VM token (query
// parameter `token`, or the cookie the first page load sets); anything else gets 403.

import type { Rect } from "../../../devices/virtio/gpu/backend.ts";
import type { Framebuffer, HeadlessDisplay } from "../../../devices/virtio/gpu/display.ts";
import type { InputEvent } from "../../../devices/virtio/input.ts";
import {
  ABS_MT_POSITION_X,
  ABS_MT_POSITION_Y,
  ABS_MT_SLOT,
  ABS_MT_TRACKING_ID,
  ABS_X,
  ABS_Y,
  BTN_TOUCH,
  EV_ABS,
  EV_KEY,
  EV_REL,
  REL_WHEEL,
  REL_X,
  REL_Y,
} from "../../../devices/virtio/input/codes.ts";
import { RateLimitedLog } from "../../../core/log.ts";
import { constants as zlibConstants, deflateRawSync } from "node:zlib";
import { pageHtml } from "./page.ts";
import { encodeRectPng } from "./png.ts";
import {
  type ClientMessage,
  encodeRectHeader,
  ENCODING_DEFLATE_RGBA,
  ENCODING_PNG,
  ENCODING_RAW_RGBA,
  evdevButton,
  evdevKeyCode,
  parseClientMessage,
  RECT_FLAG_FULL,
  RECT_FLAG_LAST,
  RECT_HEADER_SIZE,
} from "./protocol.ts";

/**
 * What the display needs of an input device: InputDevice (devices/virtio/input.ts) fits. `kind` decides
 * how pointer events are sent: "mouse" relative (REL_X/REL_Y), "single-touch"/"multi-touch" as touch
 * contacts, any other kind (a tablet) as ABS_X/ABS_Y plus BTN_* buttons. Absolute coordinates are
 * scaled from the framebuffer to the device's width x height.
 */
export interface InputSink {
  readonly kind: string;
  readonly width?: number;
  readonly height?: number;
  sendEvents(events: InputEvent[]): boolean;
  touchDown?(slot: number, x: number, y: number): boolean;
  touchMove?(slot: number, x: number, y: number): boolean;
  touchUp?(slot: number): boolean;
}

export interface WebDisplayOptions {
  display: HeadlessDisplay;
  input?: { keyboard?: InputSink; pointer?: InputSink; touch?: InputSink };
  /** The copy counters (GpuDevice.gpuStats()), polled while a page is connected. */
  stats?: () => object;
  /** TCP port; 0 (default) picks a free one. */
  port?: number;
  /** Address to listen on; loopback unless told otherwise. */
  host?: string;
  /** The access token (16..128 of [0-9A-Za-z_-]); default 32 random hex digits. */
  token?: string;
  /** Frame-rate cap per page (default 60). */
  maxFps?: number;
  /** How often stats() is polled and sent (default 500 ms). */
  statsIntervalMs?: number;
  /**
   * "auto" (default): raw to a page on this machine (loopback), where bandwidth is plentiful and the page's
   * PNG decode is the limit (bench/web_fps.ts: 24 fps against 16 for a 1080p desktop); to a page elsewhere,
   * rectangles that sample as compressible go as PNG (decoded natively by the page) and the rest raw;
   * "png": that second choice everywhere; "deflate": compressible ones as deflate-raw (inflated by
   * DecompressionStream, slower in the page); "raw": never compress.
   */
  encoding?: "auto" | "png" | "deflate" | "raw";
}

export interface WebDisplayStats {
  clients: number;
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
  inputMessages: number;
  /** Requests refused for a missing or wrong token or origin. */
  refused: number;
}

const DEFAULT_HOST = "127.0.0.1";
const DEFAULT_MAX_FPS = 60;
const DEFAULT_STATS_INTERVAL_MS = 500;
const TOKEN_BYTES = 16;
const TOKEN_PATTERN = /^[0-9A-Za-z_-]{16,128}$/;
/** Batches sent and not yet acknowledged by the page: bounds what is buffered for a slow page. */
const MAX_IN_FLIGHT = 2;
/** More pending rectangles than this are sent as their bounding box. */
const MAX_RECTS_PER_BATCH = 16;
/** Send the bounding box instead when the rectangles cover at least this share of it. */
const BOUNDING_BOX_SHARE = 0.75;
/** The rectangle header's u16 fields. */
const MAX_DIMENSION = 0xffff;
/** evdev: ABS_MT_TRACKING_ID -1 lifts a contact (Documentation/input/multi-touch-protocol.rst). */
const MT_TRACKING_ID_NONE = -1;
/** Touch slots tracked when the device does not manage them (crosvm's multi-touch has 10). */
const MT_SLOTS = 10;
const BPP = 4;
/** Rectangles smaller than this (pixels) are always sent raw: deflate's fixed cost would dominate. */
const DEFLATE_MIN_PIXELS = 4096;
/** Compressibility sample: every Nth row; deflate when at least this share of pixels repeat their left neighbour. */
const DEFLATE_SAMPLE_ROW_STEP = 8;
const DEFLATE_MIN_REPEAT_SHARE = 0.5;
/**
 * zlib level 6 (the default): on flat desktop content it is both faster than level 1 (3 vs 5 ms for a 1080p
 * frame here: level 1's deflate_fast handles long runs worse) and 5x smaller (44 KB vs 213 KB), and the
 * page inflates the smaller stream about twice as fast.
 */
const DEFLATE_LEVEL = 6;
/**
 * Change detection grid: each page keeps a shadow copy of what it was last sent, and a flushed region is
 * compared with it in tiles of this size; only tiles with a changed pixel are sent. 64x64 (16 KiB) keeps the
 * comparison cheap (a 1080p frame compares in a few ms) while a small change does not drag much along.
 */
export const TILE_SIZE = 64;

const enc = new TextEncoder();

/** Compare a presented token with the secret in time independent of where they differ. */
export function tokenMatches(presented: string | null | undefined, secret: string): boolean {
  const a = enc.encode(presented ?? ""), b = enc.encode(secret);
  let diff = a.length ^ b.length;
  for (let i = 0; i < b.length; i++) diff |= (i < a.length ? a[i] : 0) ^ b[i];
  return diff === 0;
}

export function randomToken(): string {
  const b = crypto.getRandomValues(new Uint8Array(TOKEN_BYTES));
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

function cookieValue(header: string | null, name: string): string | null {
  if (!header) return null;
  for (const part of header.split(";")) {
    const eq = part.indexOf("=");
    if (eq > 0 && part.slice(0, eq).trim() === name) return part.slice(eq + 1).trim();
  }
  return null;
}

/** Copy `r` of a B8G8R8A8 framebuffer into `out` as R8G8B8A8 with opaque alpha (a screen has no alpha). */
export function rectToRgba(fb: Framebuffer, r: Rect, out: Uint8Array): void {
  const src = fb.bgra;
  if (src.byteOffset % BPP === 0 && out.byteOffset % BPP === 0) {
    const s = new Uint32Array(src.buffer, src.byteOffset, fb.width * fb.height);
    const d = new Uint32Array(out.buffer, out.byteOffset, r.width * r.height);
    let o = 0;
    for (let y = 0; y < r.height; y++) {
      let i = (r.y + y) * fb.width + r.x;
      const end = i + r.width;
      // Little-endian: BGRA bytes read as 0xAARRGGBB, RGBA bytes are 0xAABBGGRR.
      for (; i < end; i++) {
        const p = s[i];
        d[o++] = 0xff000000 | (p & 0xff00) | ((p >>> 16) & 0xff) | ((p & 0xff) << 16);
      }
    }
    return;
  }
  let o = 0;
  for (let y = 0; y < r.height; y++) {
    for (let x = 0; x < r.width; x++) {
      const i = ((r.y + y) * fb.width + r.x + x) * BPP;
      out[o++] = src[i + 2];
      out[o++] = src[i + 1];
      out[o++] = src[i];
      out[o++] = 0xff;
    }
  }
}

/** Whether `r` of the framebuffer looks compressible: sampled rows, share of pixels equal to their left one. */
export function looksCompressible(fb: Framebuffer, r: Rect): boolean {
  if (r.width * r.height < DEFLATE_MIN_PIXELS || r.width < 2) return false;
  const b = fb.bgra;
  let same = 0, total = 0;
  for (let y = r.y; y < r.y + r.height; y += DEFLATE_SAMPLE_ROW_STEP) {
    let i = (y * fb.width + r.x) * BPP;
    const end = i + r.width * BPP;
    for (i += BPP; i < end; i += BPP) {
      // B, G, R (alpha is dropped on the way out).
      if (b[i] === b[i - BPP] && b[i + 1] === b[i + 1 - BPP] && b[i + 2] === b[i + 2 - BPP]) same++;
      total++;
    }
  }
  return total > 0 && same >= total * DEFLATE_MIN_REPEAT_SHARE;
}

function clip(r: Rect, w: number, h: number): Rect | null {
  const x0 = Math.max(0, r.x), y0 = Math.max(0, r.y);
  const x1 = Math.min(w, r.x + r.width), y1 = Math.min(h, r.y + r.height);
  return x1 > x0 && y1 > y0 ? { x: x0, y: y0, width: x1 - x0, height: y1 - y0 } : null;
}

/** The rectangles to send for a batch: as given, or their bounding box when that is about as cheap. */
export function coalesce(rects: Rect[]): Rect[] {
  if (rects.length <= 1) return rects;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity, area = 0;
  for (const r of rects) {
    x0 = Math.min(x0, r.x);
    y0 = Math.min(y0, r.y);
    x1 = Math.max(x1, r.x + r.width);
    y1 = Math.max(y1, r.y + r.height);
    area += r.width * r.height;
  }
  const box = { x: x0, y: y0, width: x1 - x0, height: y1 - y0 };
  if (rects.length > MAX_RECTS_PER_BATCH || area >= box.width * box.height * BOUNDING_BOX_SHARE) return [box];
  return rects;
}

/**
 * The parts of `rects` (clipped to the framebuffer) whose pixels differ from `shadow` (the last frame sent, same
 * size, one u32 per pixel), compared in TILE_SIZE tiles; the changed parts are copied into `shadow`, so it
 * again holds what the page will show. Changed pieces are merged into rectangles: runs of neighbouring tiles
 * in a tile row, then runs of rows with the same span. Returns the rectangles and how many tiles were
 * compared / had changed.
 */
export function changedRects(
  fb: Framebuffer,
  shadow: Uint32Array,
  rects: Rect[],
): { rects: Rect[]; tiles: number; changed: number } {
  const cur = new Uint32Array(fb.bgra.buffer, fb.bgra.byteOffset, fb.width * fb.height);
  const out: Rect[] = [];
  let tiles = 0, changed = 0;
  for (const r0 of rects) {
    const r = clip(r0, fb.width, fb.height);
    if (!r) continue;
    const x1 = r.x + r.width, y1 = r.y + r.height;
    /** Rectangles still growing downwards, by "x0,x1" span. */
    let open = new Map<string, Rect>();
    for (let ty = Math.floor(r.y / TILE_SIZE) * TILE_SIZE; ty < y1; ty += TILE_SIZE) {
      const py0 = Math.max(r.y, ty), py1 = Math.min(y1, ty + TILE_SIZE);
      const runs: [number, number][] = [];
      for (let tx = Math.floor(r.x / TILE_SIZE) * TILE_SIZE; tx < x1; tx += TILE_SIZE) {
        const px0 = Math.max(r.x, tx), px1 = Math.min(x1, tx + TILE_SIZE);
        tiles++;
        if (!pieceChanged(cur, shadow, fb.width, px0, px1, py0, py1)) continue;
        changed++;
        const last = runs.at(-1);
        if (last && last[1] === px0) last[1] = px1;
        else runs.push([px0, px1]);
      }
      const next = new Map<string, Rect>();
      for (const [a, b] of runs) {
        // The page will have these pixels: one copy per row of the run.
        for (let y = py0; y < py1; y++) shadow.set(cur.subarray(y * fb.width + a, y * fb.width + b), y * fb.width + a);
        const key = `${a},${b}`;
        const up = open.get(key);
        if (up) {
          up.height = py1 - up.y;
          open.delete(key);
          next.set(key, up);
        } else {
          const nr = { x: a, y: py0, width: b - a, height: py1 - py0 };
          out.push(nr);
          next.set(key, nr);
        }
      }
      open = next;
    }
  }
  return { rects: out, tiles, changed };
}

/** Whether pixels [px0, px1) x [py0, py1) differ between `a` and `b` (rows of `stride` pixels). */
function pieceChanged(
  a: Uint32Array,
  b: Uint32Array,
  stride: number,
  px0: number,
  px1: number,
  py0: number,
  py1: number,
) {
  for (let y = py0; y < py1; y++) {
    const end = y * stride + px1;
    for (let i = y * stride + px0; i < end; i++) if (a[i] !== b[i]) return true;
  }
  return false;
}

/** One connected page. */
class Client {
  dirty: Rect[] = [];
  full = true;
  inFlight = 0;
  seq = 0;
  lastSend = -Infinity;
  timer: ReturnType<typeof setTimeout> | undefined;
  sentWidth = 0;
  sentHeight = 0;
  /** What the page was last sent (sentWidth x sentHeight, one u32 per B8G8R8A8 pixel). */
  shadow: Uint32Array | null = null;
  /** Last mouse position (framebuffer pixels), for relative mice. */
  mouse: { x: number; y: number } | null = null;
  readonly keysDown = new Set<number>();
  readonly buttonsDown = new Set<number>();
  /** PointerEvent.pointerId -> touch slot. */
  readonly touches = new Map<number, number>();
  constructor(readonly ws: WebSocket, readonly scanout: number, readonly loopback: boolean) {}
}

/** Whether a peer address is this machine's loopback (127.0.0.0/8, ::1, ::ffff:127.x.y.z). */
export function isLoopback(hostname: string): boolean {
  const h = hostname.toLowerCase().replace(/^\[|\]$/g, "");
  return h === "::1" || /^(::ffff:)?127\.\d+\.\d+\.\d+$/.test(h);
}

export class WebDisplay {
  readonly token: string;
  readonly #opts: WebDisplayOptions;
  readonly #clients = new Set<Client>();
  readonly #log = new RateLimitedLog("web display");
  readonly #minIntervalMs: number;
  readonly #counters: Omit<WebDisplayStats, "clients"> = {
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
    inputMessages: 0,
    refused: 0,
  };
  #server: Deno.HttpServer<Deno.NetAddr> | undefined;
  #unsubscribe: (() => void) | undefined;
  #statsTimer: ReturnType<typeof setInterval> | undefined;
  #url = "";
  #origin = "";
  #cookieName = "denovm_token";
  /** Our own multi-touch slots (devices without touchDown/touchMove/touchUp): tracking ids, -1 = free. */
  readonly #mtIds = new Array<number>(MT_SLOTS).fill(MT_TRACKING_ID_NONE);
  #mtNextId = 0;

  constructor(opts: WebDisplayOptions) {
    const token = opts.token ?? randomToken();
    if (!TOKEN_PATTERN.test(token)) throw new Error("web display: token must be 16..128 of [0-9A-Za-z_-]");
    this.token = token;
    this.#opts = opts;
    const fps = opts.maxFps ?? DEFAULT_MAX_FPS;
    if (!(fps > 0)) throw new Error(`web display: maxFps ${fps} must be positive`);
    this.#minIntervalMs = 1000 / fps;
  }

  /** The page's address with the token (valid after start()). */
  get url(): string {
    return this.#url;
  }

  stats(): WebDisplayStats {
    return { clients: this.#clients.size, ...this.#counters };
  }

  start(): Promise<{ url: string }> {
    if (this.#server) return Promise.resolve({ url: this.#url });
    const hostname = this.#opts.host ?? DEFAULT_HOST;
    return new Promise((resolve, reject) => {
      try {
        this.#server = Deno.serve({
          hostname,
          port: this.#opts.port ?? 0,
          onListen: (addr) => {
            const host = addr.hostname.includes(":") ? `[${addr.hostname}]` : addr.hostname;
            this.#origin = `http://${host}:${addr.port}`;
            // Cookies are per host, not per port: name it after the port so two VMs' pages don't clash.
            this.#cookieName = `denovm_token_${addr.port}`;
            this.#url = `${this.#origin}/?token=${this.token}`;
            this.#unsubscribe = this.#opts.display.onUpdate((id, rect) => this.#onUpdate(id, rect));
            resolve({ url: this.#url });
          },
          onError: (e) => {
            this.#log.log(`request failed: ${e}`);
            return new Response("internal error", { status: 500 });
          },
        }, (req, info) => this.#handle(req, info.remoteAddr.hostname));
      } catch (e) {
        reject(e);
      }
    });
  }

  async close(): Promise<void> {
    this.#unsubscribe?.();
    this.#unsubscribe = undefined;
    if (this.#statsTimer !== undefined) clearInterval(this.#statsTimer);
    this.#statsTimer = undefined;
    for (const c of [...this.#clients]) {
      this.#drop(c);
      try {
        c.ws.close();
      } catch { /* already closed */ }
    }
    const s = this.#server;
    this.#server = undefined;
    if (s) await s.shutdown();
  }

  // ---- HTTP ----

  #authorized(req: Request, url: URL): "query" | "cookie" | null {
    const q = url.searchParams.get("token");
    if (q !== null) return tokenMatches(q, this.token) ? "query" : null;
    return tokenMatches(cookieValue(req.headers.get("cookie"), this.#cookieName), this.token) ? "cookie" : null;
  }

  #refuse(): Response {
    this.#counters.refused++;
    return new Response("403 forbidden: this display needs its token (?token=...)\n", {
      status: 403,
      headers: { "content-type": "text/plain; charset=utf-8", "cache-control": "no-store" },
    });
  }

  #handle(req: Request, peer: string): Response {
    const url = new URL(req.url);
    const how = this.#authorized(req, url);
    if (!how) return this.#refuse();
    if (url.pathname === "/ws") {
      // A page from another origin could open our socket with the cookie: only our own page may.
      const origin = req.headers.get("origin");
      if (origin !== null && origin !== this.#origin && origin !== `http://${req.headers.get("host")}`) {
        return this.#refuse();
      }
      if (req.headers.get("upgrade")?.toLowerCase() !== "websocket") {
        return new Response("WebSocket expected\n", { status: 426 });
      }
      const scanout = Number(url.searchParams.get("scanout") ?? "0");
      if (!Number.isInteger(scanout) || scanout < 0 || scanout >= this.#opts.display.count) {
        return new Response(`no scanout ${url.searchParams.get("scanout")}\n`, { status: 404 });
      }
      const { socket, response } = Deno.upgradeWebSocket(req);
      this.#accept(socket, scanout, isLoopback(peer));
      return response;
    }
    if (url.pathname !== "/" || (req.method !== "GET" && req.method !== "HEAD")) {
      return new Response("not found\n", { status: 404 });
    }
    const headers = new Headers({
      "content-type": "text/html; charset=utf-8",
      "cache-control": "no-store",
      "referrer-policy": "no-referrer",
      "x-content-type-options": "nosniff",
      "x-frame-options": "DENY",
      // Everything is inline and served from here: no CDN, no other origin.
      "content-security-policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; " +
        "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    });
    if (how === "query") {
      headers.set("set-cookie", `${this.#cookieName}=${this.token}; Path=/; HttpOnly; SameSite=Strict`);
    }
    return new Response(req.method === "HEAD" ? null : pageHtml(), { status: 200, headers });
  }

  // ---- WebSocket ----

  #accept(ws: WebSocket, scanout: number, loopback: boolean): void {
    const c = new Client(ws, scanout, loopback);
    ws.binaryType = "arraybuffer";
    ws.onopen = () => {
      this.#clients.add(c);
      const fb = this.#opts.display.framebuffer(scanout);
      const inp = this.#opts.input ?? {};
      this.#sendText(c, {
        t: "hello",
        scanout,
        scanouts: this.#opts.display.count,
        width: fb.width,
        height: fb.height,
        input: {
          keyboard: inp.keyboard ? inp.keyboard.kind : null,
          pointer: inp.pointer ? inp.pointer.kind : null,
          touch: inp.touch ? inp.touch.kind : null,
        },
        statsIntervalMs: this.#opts.stats ? this.#statsInterval() : null,
      });
      this.#schedule(c);
      if (this.#opts.stats) {
        this.#sendStats([c]);
        this.#statsTimer ??= setInterval(() => this.#sendStats([...this.#clients]), this.#statsInterval());
      }
    };
    ws.onmessage = (ev) => {
      if (typeof ev.data !== "string") return;
      const m = parseClientMessage(ev.data);
      if (!m) {
        this.#log.log(`malformed message from the page ignored`);
        return;
      }
      this.#onMessage(c, m);
    };
    ws.onclose = () => this.#drop(c);
    ws.onerror = () => this.#drop(c);
  }

  #statsInterval(): number {
    return this.#opts.statsIntervalMs ?? DEFAULT_STATS_INTERVAL_MS;
  }

  #drop(c: Client): void {
    if (!this.#clients.delete(c)) return;
    if (c.timer !== undefined) clearTimeout(c.timer);
    c.timer = undefined;
    this.#releaseAll(c);
    if (this.#clients.size === 0 && this.#statsTimer !== undefined) {
      clearInterval(this.#statsTimer);
      this.#statsTimer = undefined;
    }
  }

  #sendText(c: Client, msg: object): void {
    if (c.ws.readyState !== WebSocket.OPEN) return;
    try {
      c.ws.send(JSON.stringify(msg));
    } catch (e) {
      this.#log.log(`send failed: ${e}`);
    }
  }

  #sendStats(clients: Client[]): void {
    const get = this.#opts.stats;
    if (!get || clients.length === 0) return;
    let stats: object;
    try {
      stats = get();
    } catch (e) {
      this.#log.log(`stats() failed: ${e}`);
      return;
    }
    const text = JSON.stringify({ t: "stats", time: performance.now(), stats });
    for (const c of clients) {
      if (c.ws.readyState === WebSocket.OPEN) c.ws.send(text);
    }
  }

  // ---- Frames ----

  #onUpdate(scanout: number, rect: Rect): void {
    for (const c of this.#clients) {
      if (c.scanout !== scanout || c.full) continue;
      c.dirty.push({ ...rect });
      if (c.dirty.length > MAX_RECTS_PER_BATCH) c.dirty = coalesce(c.dirty);
      this.#schedule(c);
    }
  }

  #schedule(c: Client): void {
    if (c.timer !== undefined || c.inFlight >= MAX_IN_FLIGHT) return;
    if (!c.full && c.dirty.length === 0) return;
    const delay = Math.max(0, c.lastSend + this.#minIntervalMs - performance.now());
    c.timer = setTimeout(() => {
      c.timer = undefined;
      this.#sendBatch(c);
    }, delay);
  }

  #sendBatch(c: Client): void {
    if (!this.#clients.has(c) || c.ws.readyState !== WebSocket.OPEN) return;
    let fb: Framebuffer;
    try {
      fb = this.#opts.display.framebuffer(c.scanout);
    } catch (e) {
      this.#log.log(`${e}`);
      return;
    }
    if (fb.width > MAX_DIMENSION || fb.height > MAX_DIMENSION) {
      this.#log.log(`framebuffer ${fb.width}x${fb.height} too large to send`);
      return;
    }
    const t0 = performance.now();
    if (fb.width !== c.sentWidth || fb.height !== c.sentHeight) c.full = true;
    const full = c.full;
    const n = fb.width * fb.height;
    const canDiff = fb.bgra.byteOffset % BPP === 0 && fb.bgra.byteLength >= n * BPP;
    let rects: Rect[];
    if (full || !canDiff || !c.shadow) {
      rects = (full ? [{ x: 0, y: 0, width: fb.width, height: fb.height }] : coalesce(c.dirty))
        .map((r) => clip(r, fb.width, fb.height)).filter((r): r is Rect => r !== null);
      c.shadow = canDiff
        ? new Uint32Array(fb.bgra.buffer.slice(fb.bgra.byteOffset, fb.bgra.byteOffset + n * BPP))
        : null;
    } else {
      // Only what changed since the page's last frame: a guest often flushes far more than it redrew.
      const d = changedRects(fb, c.shadow, coalesce(c.dirty));
      rects = d.rects;
      this.#counters.tilesCompared += d.tiles;
      this.#counters.tilesChanged += d.changed;
    }
    c.dirty = [];
    c.full = false;
    c.sentWidth = fb.width;
    c.sentHeight = fb.height;
    if (rects.length === 0) {
      this.#counters.encodeMs += performance.now() - t0;
      return;
    }
    const seq = c.seq = (c.seq + 1) >>> 0;
    rects.forEach((r, i) => {
      const rawBytes = r.width * r.height * BPP;
      let msg: Uint8Array;
      let encoding = ENCODING_RAW_RGBA;
      const asked = this.#opts.encoding ?? "auto";
      const how = asked === "auto" ? (c.loopback ? "raw" : "png") : asked;
      if (how !== "raw" && looksCompressible(fb, r)) {
        if (how === "deflate") {
          const rgba = new Uint8Array(rawBytes);
          rectToRgba(fb, r, rgba);
          const z = deflateRawSync(rgba, { level: DEFLATE_LEVEL, strategy: zlibConstants.Z_DEFAULT_STRATEGY });
          msg = new Uint8Array(RECT_HEADER_SIZE + z.byteLength);
          msg.set(z, RECT_HEADER_SIZE);
          encoding = ENCODING_DEFLATE_RGBA;
        } else {
          msg = encodeRectPng(fb, r, DEFLATE_LEVEL, RECT_HEADER_SIZE);
          encoding = ENCODING_PNG;
        }
        this.#counters.rectsDeflated++;
        this.#counters.deflatedRawBytes += rawBytes;
      } else {
        msg = new Uint8Array(RECT_HEADER_SIZE + rawBytes);
        rectToRgba(fb, r, msg.subarray(RECT_HEADER_SIZE));
      }
      encodeRectHeader({
        encoding,
        flags: (i === rects.length - 1 ? RECT_FLAG_LAST : 0) | (full ? RECT_FLAG_FULL : 0),
        scanout: c.scanout,
        seq,
        x: r.x,
        y: r.y,
        w: r.width,
        h: r.height,
        fbWidth: fb.width,
        fbHeight: fb.height,
      }, msg);
      c.ws.send(msg);
      this.#counters.rectsSent++;
      this.#counters.bytesSent += msg.byteLength;
    });
    this.#counters.batchesSent++;
    c.inFlight++;
    c.lastSend = performance.now();
    this.#counters.encodeMs += c.lastSend - t0;
  }

  // ---- Input ----

  #onMessage(c: Client, m: ClientMessage): void {
    if (m.t === "ack") {
      if (c.inFlight > 0) c.inFlight--;
      this.#counters.acks++;
      this.#counters.pageDecodeMs += m.decodeMs ?? 0;
      this.#counters.pageDrawMs += m.drawMs ?? 0;
      this.#schedule(c);
      return;
    }
    this.#counters.inputMessages++;
    try {
      switch (m.t) {
        case "key":
          return this.#key(c, m.code, m.down);
        case "pointer":
          return this.#pointer(c, m.kind, m.x, m.y, m.button);
        case "wheel": {
          const p = this.#opts.input?.pointer;
          const clicks = Math.trunc(Math.max(-100, Math.min(100, m.clicks)));
          if (p?.kind === "mouse" && clicks !== 0) p.sendEvents([{ type: EV_REL, code: REL_WHEEL, value: clicks }]);
          return;
        }
        case "touch":
          return this.#touch(c, m.kind, m.id, m.x, m.y);
      }
    } catch (e) {
      this.#log.log(`input event refused: ${e instanceof Error ? e.message : e}`);
    }
  }

  #key(c: Client, code: string, down: boolean): void {
    const kb = this.#opts.input?.keyboard;
    const key = evdevKeyCode(code);
    if (!kb || key === undefined) return;
    if (down) c.keysDown.add(key);
    else if (!c.keysDown.delete(key)) return; // a release of a key this page never pressed
    kb.sendEvents([{ type: EV_KEY, code: key, value: down ? 1 : 0 }]);
  }

  /** Framebuffer pixel -> the device's absolute axis (width x height), clamped. */
  #scale(c: Client, dev: InputSink, x: number, y: number): { x: number; y: number } {
    const fbw = Math.max(1, c.sentWidth), fbh = Math.max(1, c.sentHeight);
    const w = dev.width ?? fbw, h = dev.height ?? fbh;
    const sx = Math.floor((Math.max(0, Math.min(fbw - 1, x)) * w) / fbw);
    const sy = Math.floor((Math.max(0, Math.min(fbh - 1, y)) * h) / fbh);
    return { x: Math.min(w - 1, sx), y: Math.min(h - 1, sy) };
  }

  #pointer(c: Client, kind: "move" | "down" | "up", x: number, y: number, button?: number): void {
    const inp = this.#opts.input ?? {};
    const p = inp.pointer;
    if (!p) {
      // No mouse: the left button drives the touch screen (as crosvm's display window does).
      if (inp.touch && (kind === "move" || (button ?? 0) === 0)) this.#touch(c, kind, -1, x, y);
      return;
    }
    if (p.kind === "single-touch" || p.kind === "multi-touch") {
      if (kind === "move" || (button ?? 0) === 0) this.#touchOn(p, c, kind, -1, x, y);
      return;
    }
    const btn = evdevButton(button);
    if (p.kind === "mouse") {
      const ev: InputEvent[] = [];
      const last = c.mouse;
      c.mouse = { x, y };
      if (last) {
        const dx = Math.round(x - last.x), dy = Math.round(y - last.y);
        if (dx) ev.push({ type: EV_REL, code: REL_X, value: dx });
        if (dy) ev.push({ type: EV_REL, code: REL_Y, value: dy });
        if (dx || dy) p.sendEvents(ev);
      }
      if (kind !== "move" && btn !== undefined) this.#button(c, p, btn, kind === "down", []);
      return;
    }
    // An absolute pointer (tablet): position, then the button.
    const a = this.#scale(c, p, x, y);
    const ev: InputEvent[] = [{ type: EV_ABS, code: ABS_X, value: a.x }, { type: EV_ABS, code: ABS_Y, value: a.y }];
    if (kind === "move" || btn === undefined) p.sendEvents(ev);
    else this.#button(c, p, btn, kind === "down", ev);
  }

  #button(c: Client, p: InputSink, btn: number, down: boolean, before: InputEvent[]): void {
    if (down) c.buttonsDown.add(btn);
    else if (!c.buttonsDown.delete(btn)) {
      if (before.length) p.sendEvents(before);
      return;
    }
    p.sendEvents([...before, { type: EV_KEY, code: btn, value: down ? 1 : 0 }]);
  }

  #touch(c: Client, kind: "move" | "down" | "up", id: number, x: number, y: number): void {
    const inp = this.#opts.input ?? {};
    if (inp.touch) return this.#touchOn(inp.touch, c, kind, id, x, y);
    // No touch screen: the first contact acts as the mouse's left button.
    if (inp.pointer && (c.touches.size === 0 || c.touches.has(id))) {
      if (kind === "down") c.touches.set(id, 0);
      if (kind === "up") c.touches.delete(id);
      this.#pointer(c, kind, x, y, 0);
    }
  }

  /** A contact (pointer id `id`) on a touch device: multi-touch slots, or single-touch BTN_TOUCH. */
  #touchOn(dev: InputSink, c: Client, kind: "move" | "down" | "up", id: number, x: number, y: number): void {
    const a = this.#scale(c, dev, x, y);
    let slot = c.touches.get(id);
    if (dev.kind === "multi-touch") {
      if (kind === "down" && slot === undefined) {
        const used = new Set(c.touches.values());
        slot = [...Array(MT_SLOTS).keys()].find((s) => !used.has(s));
        if (slot === undefined) return; // more fingers than slots
        c.touches.set(id, slot);
        this.#mtDown(dev, slot, a.x, a.y);
      } else if (slot !== undefined && kind === "move") this.#mtMove(dev, slot, a.x, a.y);
      else if (slot !== undefined && kind === "up") {
        c.touches.delete(id);
        this.#mtUp(dev, slot);
      }
      return;
    }
    // Single touch: only the first contact counts.
    const pos: InputEvent[] = [{ type: EV_ABS, code: ABS_X, value: a.x }, { type: EV_ABS, code: ABS_Y, value: a.y }];
    if (kind === "down" && c.touches.size === 0) {
      c.touches.set(id, 0);
      dev.sendEvents([...pos, { type: EV_KEY, code: BTN_TOUCH, value: 1 }]);
    } else if (slot !== undefined && kind === "move") dev.sendEvents(pos);
    else if (slot !== undefined && kind === "up") {
      c.touches.delete(id);
      dev.sendEvents([...pos, { type: EV_KEY, code: BTN_TOUCH, value: 0 }]);
    }
  }

  #mtDown(dev: InputSink, slot: number, x: number, y: number): void {
    if (dev.touchDown) {
      dev.touchDown(slot, x, y);
      return;
    }
    const first = this.#mtIds.every((t) => t === MT_TRACKING_ID_NONE);
    this.#mtIds[slot] = this.#mtNextId;
    this.#mtNextId = (this.#mtNextId + 1) & 0xffff;
    const ev: InputEvent[] = [
      { type: EV_ABS, code: ABS_MT_SLOT, value: slot },
      { type: EV_ABS, code: ABS_MT_TRACKING_ID, value: this.#mtIds[slot] },
      { type: EV_ABS, code: ABS_MT_POSITION_X, value: x },
      { type: EV_ABS, code: ABS_MT_POSITION_Y, value: y },
    ];
    if (first) ev.push({ type: EV_KEY, code: BTN_TOUCH, value: 1 });
    dev.sendEvents([...ev, { type: EV_ABS, code: ABS_X, value: x }, { type: EV_ABS, code: ABS_Y, value: y }]);
  }

  #mtMove(dev: InputSink, slot: number, x: number, y: number): void {
    if (dev.touchMove) {
      dev.touchMove(slot, x, y);
      return;
    }
    dev.sendEvents([
      { type: EV_ABS, code: ABS_MT_SLOT, value: slot },
      { type: EV_ABS, code: ABS_MT_POSITION_X, value: x },
      { type: EV_ABS, code: ABS_MT_POSITION_Y, value: y },
    ]);
  }

  #mtUp(dev: InputSink, slot: number): void {
    if (dev.touchUp) {
      dev.touchUp(slot);
      return;
    }
    this.#mtIds[slot] = MT_TRACKING_ID_NONE;
    const ev: InputEvent[] = [
      { type: EV_ABS, code: ABS_MT_SLOT, value: slot },
      { type: EV_ABS, code: ABS_MT_TRACKING_ID, value: MT_TRACKING_ID_NONE },
    ];
    if (this.#mtIds.every((t) => t === MT_TRACKING_ID_NONE)) ev.push({ type: EV_KEY, code: BTN_TOUCH, value: 0 });
    dev.sendEvents(ev);
  }

  /** A page went away: release what it held down, so the guest does not see a stuck key or button. */
  #releaseAll(c: Client): void {
    const inp = this.#opts.input ?? {};
    try {
      for (const k of c.keysDown) inp.keyboard?.sendEvents([{ type: EV_KEY, code: k, value: 0 }]);
      for (const b of c.buttonsDown) inp.pointer?.sendEvents([{ type: EV_KEY, code: b, value: 0 }]);
      const touchDev = inp.touch ?? (inp.pointer?.kind.endsWith("touch") ? inp.pointer : undefined);
      for (const id of [...c.touches.keys()]) {
        if (touchDev) this.#touchOn(touchDev, c, "up", id, c.mouse?.x ?? 0, c.mouse?.y ?? 0);
      }
    } catch (e) {
      this.#log.log(`releasing input failed: ${e}`);
    }
    c.keysDown.clear();
    c.buttonsDown.clear();
    c.touches.clear();
  }
}
