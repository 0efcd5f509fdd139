// The headless display: one framebuffer per scanout (B8G8R8A8), PNG screenshots, and change hooks for
// live views (the web display, the vhost-user display socket).
//
// Copies only when someone looks: RESOURCE_FLUSH reads nothing. It adds the flushed rectangle to the
// scanout's damage (what the framebuffer does not have yet) and tells the hooks. A consumer that needs
// the pixels (a screenshot, a snapshot, a web page about to send, a vhost-user front end about to send an
// UPDATE) calls refresh(), which reads back the damaged rectangles alone, once, however many frames were
// flushed since the last look; so the read-back rate is the consumer's, and with no consumer a frame
// costs no read-back at all. The framebuffer plus the pending damage is always what the scanout shows.
// The pending damage is a few disjoint rectangles (overlaps merged; beyond MAX_DAMAGE_RECTS their
// bounding box), so it never grows with the frames. A scanout disabled with damage pending (its resource
// about to go) reads that damage back first: the framebuffer keeps the last frame the guest showed.
// Every read-back and every byte handed to a display client is counted per scanout (accounting.ts).
//
// A scanout shows the rectangle `rect` of its resource at the framebuffer's (0,0); the framebuffer has
// the rectangle's size (the display mode's size until the first SET_SCANOUT).

import type { BlobLayout, Rect } from "./backend.ts";
import { type DisplayClient, type DisplayConsumer, GpuAccounting } from "./accounting.ts";

const BPP = 4;
/** Pending damage rectangles per scanout; more are merged into their bounding box. */
export const MAX_DAMAGE_RECTS = 16;
/** zlib's own default level (zlib.h Z_DEFAULT_COMPRESSION resolves to 6) for screenshot files. */
const SCREENSHOT_ZLIB_LEVEL = 6;

/** A scanout's display mode (crosvm `displays=[[mode=windowed[W,H]]]`). */
export interface DisplayConfig {
  width: number;
  height: number;
}

export interface ScanoutSource {
  resourceId: number;
  /** The part of the resource shown. */
  rect: Rect;
  /** SET_SCANOUT_BLOB: how to read the blob as an image. */
  layout?: BlobLayout;
}

export interface Framebuffer {
  width: number;
  height: number;
  /** width * height * 4 bytes, B8G8R8A8. */
  bgra: Uint8Array;
}

/** Reads `rect` of a resource as packed B8G8R8A8 (GpuBackend.readPixels). */
export type PixelReader = (resourceId: number, rect: Rect, layout?: BlobLayout) => Uint8Array;
/** Scanout `scanoutId` changed in `rect` (framebuffer coordinates); refresh() brings the pixels. */
export type UpdateHandler = (scanoutId: number, rect: Rect) => void;

export interface HeadlessDisplayOptions {
  /** How to read a resource's pixels (the backend's readPixels); flush() may pass one instead. */
  read?: PixelReader;
  /** Where the display's copies are counted (default: an accounting of its own). */
  accounting?: GpuAccounting;
  /** One line for a read-back that failed (the caller rate-limits); default console.warn. */
  log?: (line: string) => void;
}

interface Scanout {
  source: ScanoutSource | null;
  fb: Framebuffer;
  /** Framebuffer rectangles flushed and not yet read back (disjoint). */
  damage: Rect[];
  /** The reader the last flush passed, else the display's. */
  read?: PixelReader;
}

export class HeadlessDisplay {
  readonly #scanouts: Scanout[];
  readonly #handlers = new Set<UpdateHandler>();
  readonly #read: PixelReader | undefined;
  readonly #log: (line: string) => void;
  /** The copy counters the display path adds to. */
  readonly accounting: GpuAccounting;

  constructor(modes: readonly DisplayConfig[], opts: HeadlessDisplayOptions = {}) {
    this.#scanouts = modes.map((m) => ({ source: null, fb: blank(m.width, m.height), damage: [] }));
    this.#read = opts.read;
    this.accounting = opts.accounting ?? new GpuAccounting("display");
    this.#log = opts.log ?? ((line) => console.warn(`virtio-gpu display: ${line}`));
  }

  get count(): number {
    return this.#scanouts.length;
  }

  /** What scanout `id` shows, or null when disabled. */
  source(id: number): ScanoutSource | null {
    return this.#scanouts[id]?.source ?? null;
  }

  /** Scanouts that show `resourceId`. */
  scanoutsOf(resourceId: number): number[] {
    const out: number[] = [];
    this.#scanouts.forEach((s, i) => {
      if (s.source?.resourceId === resourceId) out.push(i);
    });
    return out;
  }

  /**
   * SET_SCANOUT / SET_SCANOUT_BLOB (source null = disable). The caller validated the id. Disabling a
   * scanout with damage pending reads it back first (the last frame stays on show); a new size starts
   * from a blank framebuffer.
   */
  setScanout(id: number, source: ScanoutSource | null): void {
    const s = this.#scanouts[id];
    if (!source && s.source && s.damage.length > 0) this.refresh(id, "lastFrame");
    s.source = source;
    if (source && (source.rect.width !== s.fb.width || source.rect.height !== s.fb.height)) {
      s.fb = blank(source.rect.width, source.rect.height);
      s.damage = [];
    }
  }

  /**
   * RESOURCE_FLUSH of `flush` (resource coordinates) on scanout `id`: the part of it that the scanout
   * shows becomes damage (nothing is read here) and the hooks hear of it. Returns that part in
   * framebuffer coordinates (null when none) and its bytes.
   */
  flush(id: number, flush: Rect, read?: PixelReader): { rect: Rect | null; bytes: number } {
    const s = this.#scanouts[id];
    const src = s?.source;
    if (!src) return { rect: null, bytes: 0 };
    const r = intersect(flush, src.rect);
    if (!r) return { rect: null, bytes: 0 };
    if (read) s.read = read;
    const out = { x: r.x - src.rect.x, y: r.y - src.rect.y, width: r.width, height: r.height };
    s.damage = addDamage(s.damage, out);
    const bytes = r.width * r.height * BPP;
    this.accounting.scanoutFlush(id, bytes);
    for (const h of this.#handlers) {
      try {
        h(id, out);
      } catch (e) {
        this.#log(`update handler failed: ${e}`);
      }
    }
    return { rect: out, bytes };
  }

  /**
   * Scanout `id`'s framebuffer, brought up to date for `consumer`: the damaged rectangles are read back
   * (and counted) and the damage cleared. Nothing is read when nothing was flushed since the last look.
   * A read that fails costs its damage and one log line.
   */
  refresh(id: number, consumer: DisplayConsumer): Framebuffer {
    const s = this.#scanout(id);
    const src = s.source;
    if (s.damage.length === 0) return s.fb;
    const damage = s.damage;
    s.damage = [];
    const read = s.read ?? this.#read;
    if (!src || !read) return s.fb;
    const fb = s.fb;
    for (const d of damage) {
      const t0 = performance.now();
      let px: Uint8Array;
      try {
        px = read(
          src.resourceId,
          { x: d.x + src.rect.x, y: d.y + src.rect.y, width: d.width, height: d.height },
          src.layout,
        );
      } catch (e) {
        this.#log(
          `scanout ${id}: reading resource ${src.resourceId} back failed: ${e instanceof Error ? e.message : e}`,
        );
        continue;
      }
      const row = d.width * BPP;
      if (px.length < row * d.height) {
        this.#log(`scanout ${id}: resource ${src.resourceId} read back ${px.length} of ${row * d.height} bytes`);
        continue;
      }
      for (let y = 0; y < d.height; y++) {
        fb.bgra.set(px.subarray(y * row, (y + 1) * row), ((d.y + y) * fb.width + d.x) * BPP);
      }
      const us = (performance.now() - t0) * 1000;
      this.accounting.scanoutReadback(id, consumer, src.resourceId, row * d.height, src.layout !== undefined, us);
    }
    return fb;
  }

  /** Count `bytes` of scanout `id` handed to a display client. */
  sent(id: number, client: DisplayClient, bytes: number): void {
    this.#scanout(id);
    this.accounting.displaySent(id, client, bytes);
  }

  /** The damage of scanout `id` not yet read back (framebuffer coordinates). */
  damage(id: number): Rect[] {
    return this.#scanout(id).damage.map((r) => ({ ...r }));
  }

  /** Replace scanout `id`'s framebuffer with saved pixels (the caller checked id and sizes). */
  setFramebuffer(id: number, fb: Framebuffer): void {
    this.#scanouts[id].fb = { width: fb.width, height: fb.height, bgra: fb.bgra.slice() };
    this.#scanouts[id].damage = [];
  }

  /** Be told of every flushed rectangle; returns a function that unsubscribes. */
  onUpdate(cb: UpdateHandler): () => void {
    this.#handlers.add(cb);
    return () => this.#handlers.delete(cb);
  }

  /**
   * The framebuffer of a scanout as it was last read back (its size is current; pixels flushed since are
   * in damage() until someone calls refresh()). Do not keep it across SET_SCANOUT: it may be replaced.
   */
  framebuffer(id = 0): Framebuffer {
    return this.#scanout(id).fb;
  }

  /** The scanout as a PNG (RGB from the framebuffer, alpha forced opaque: a screen has no alpha). */
  async screenshot(id = 0): Promise<Uint8Array> {
    const fb = this.refresh(id, "screenshot");
    // Loaded on first use: it brings node:zlib (Deno's Node layer), which most VMs never need.
    const { encodeRectPng } = await import("./png_writer.ts");
    const png = encodeRectPng(fb, { x: 0, y: 0, width: fb.width, height: fb.height }, SCREENSHOT_ZLIB_LEVEL);
    this.accounting.displaySent(id, "screenshot", png.length);
    return png;
  }

  #scanout(id: number): Scanout {
    const s = this.#scanouts[id];
    if (!s) throw new RangeError(`no scanout ${id} (have ${this.#scanouts.length})`);
    return s;
  }
}

/**
 * `list` (disjoint rectangles) with `r` added: every rectangle `r` overlaps is merged into it (their
 * bounding box), so the result stays disjoint; beyond MAX_DAMAGE_RECTS it is their bounding box alone.
 */
export function addDamage(list: Rect[], r: Rect): Rect[] {
  let cur = r;
  let rest = list;
  for (let merged = true; merged;) {
    merged = false;
    const keep: Rect[] = [];
    for (const d of rest) {
      if (intersect(d, cur)) {
        cur = union(d, cur);
        merged = true;
      } else {
        keep.push(d);
      }
    }
    rest = keep;
  }
  rest.push(cur);
  return rest.length > MAX_DAMAGE_RECTS ? [rest.reduce(union)] : rest;
}

function union(a: Rect, b: Rect): Rect {
  const x0 = Math.min(a.x, b.x), y0 = Math.min(a.y, b.y);
  const x1 = Math.max(a.x + a.width, b.x + b.width), y1 = Math.max(a.y + a.height, b.y + b.height);
  return { x: x0, y: y0, width: x1 - x0, height: y1 - y0 };
}

function blank(width: number, height: number): Framebuffer {
  return { width, height, bgra: new Uint8Array(width * height * BPP) };
}

/** The overlap of two rectangles, or null. */
export function intersect(a: Rect, b: Rect): Rect | null {
  const x0 = Math.max(a.x, b.x), y0 = Math.max(a.y, b.y);
  const x1 = Math.min(a.x + a.width, b.x + b.width), y1 = Math.min(a.y + a.height, b.y + b.height);
  if (x1 <= x0 || y1 <= y0) return null;
  return { x: x0, y: y0, width: x1 - x0, height: y1 - y0 };
}

// ---- EDID (VESA E-EDID 1.4): a 128-byte base block whose preferred mode is the display's size ----

/** Size of an EDID base block. */
export const EDID_BLOCK_SIZE = 128;
const EDID_HEADER = [0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00];
const EDID_MANUFACTURER_OFF = 8; // 2 bytes, big-endian, three 5-bit letters
const EDID_PRODUCT_OFF = 10; // le16
const EDID_SERIAL_OFF = 12; // le32
const EDID_WEEK_OFF = 16;
const EDID_YEAR_OFF = 17; // year - 1990
const EDID_VERSION_OFF = 18; // 1, then revision 4
const EDID_INPUT_OFF = 20; // bit 7: digital input
const EDID_SIZE_CM_OFF = 21; // horizontal, vertical screen size in cm
const EDID_GAMMA_OFF = 23; // (gamma * 100) - 100
const EDID_FEATURES_OFF = 24;
const EDID_STD_TIMINGS_OFF = 38; // 8 x 2 bytes, 0x01 0x01 = unused
const EDID_DESCRIPTOR_OFF = 54; // four 18-byte descriptors
const EDID_DESCRIPTOR_SIZE = 18;
const EDID_EXTENSIONS_OFF = 126;
const EDID_CHECKSUM_OFF = 127;
const EDID_INPUT_DIGITAL = 0x80;
/** Feature support: bit 2 sRGB default, bit 1 preferred timing is the first descriptor (1.4: native). */
const EDID_FEATURES_SRGB_PREFERRED = 0x06;
/** Display descriptor tags. */
const EDID_TAG_PRODUCT_NAME = 0xfc;
const EDID_TAG_DUMMY = 0x10;
/** Detailed timing: digital separate sync, +hsync, +vsync. */
const DTD_FLAGS_DIGITAL_SEPARATE_POS = 0x1e;
/** Blanking for a reduced-blanking style 60 Hz mode (VESA CVT-RB: 160 pixels, >= 460 us vertical). */
const HBLANK = 160, HFRONT = 48, HSYNC = 32;
const VFRONT = 3, VSYNC = 6, VBLANK_MIN = 23;
/** The refresh rate of every display mode (the EDID's preferred timing): no display shows more frames. */
export const DISPLAY_REFRESH_HZ = 60;
/** Largest pixel clock a detailed timing descriptor holds (le16 in 10 kHz units). */
const DTD_MAX_CLOCK_10KHZ = 0xffff;
/** DTD fields hold 12 bits of active size. */
export const EDID_MAX_ACTIVE = 4095;
/** Assume about 96 dpi for the physical size: 0.264 mm per pixel. */
const MM_PER_PIXEL = 0.264;

/** An EDID base block whose preferred (first detailed) timing is width x height at 60 Hz. */
export function makeEdid(width: number, height: number, name = "denovm"): Uint8Array {
  const e = new Uint8Array(EDID_BLOCK_SIZE);
  const w = Math.min(Math.max(width, 1), EDID_MAX_ACTIVE);
  const h = Math.min(Math.max(height, 1), EDID_MAX_ACTIVE);
  e.set(EDID_HEADER, 0);
  const letters = "DNV";
  const mfg = letters.split("").reduce((n, c) => (n << 5) | (c.charCodeAt(0) - 64), 0);
  e[EDID_MANUFACTURER_OFF] = mfg >> 8;
  e[EDID_MANUFACTURER_OFF + 1] = mfg & 0xff;
  e[EDID_PRODUCT_OFF] = 0x01;
  e[EDID_SERIAL_OFF] = 0x01;
  e[EDID_WEEK_OFF] = 1;
  e[EDID_YEAR_OFF] = 2024 - 1990;
  e[EDID_VERSION_OFF] = 1;
  e[EDID_VERSION_OFF + 1] = 4;
  e[EDID_INPUT_OFF] = EDID_INPUT_DIGITAL;
  const wmm = Math.round(w * MM_PER_PIXEL), hmm = Math.round(h * MM_PER_PIXEL);
  e[EDID_SIZE_CM_OFF] = Math.min(255, Math.round(wmm / 10));
  e[EDID_SIZE_CM_OFF + 1] = Math.min(255, Math.round(hmm / 10));
  e[EDID_GAMMA_OFF] = 120; // gamma 2.2
  e[EDID_FEATURES_OFF] = EDID_FEATURES_SRGB_PREFERRED;
  // Chromaticity (bytes 25..34): the sRGB primaries, as 10-bit fractions.
  e.set([0xee, 0x91, 0xa3, 0x54, 0x4c, 0x99, 0x26, 0x0f, 0x50, 0x54], 25);
  for (let i = 0; i < 8; i++) {
    e[EDID_STD_TIMINGS_OFF + 2 * i] = 0x01;
    e[EDID_STD_TIMINGS_OFF + 2 * i + 1] = 0x01;
  }
  // Descriptor 0: the preferred detailed timing.
  const vblank = Math.max(VBLANK_MIN, Math.ceil(h * 0.03));
  // The pixel clock field is 16 bits of 10 kHz: very large modes get a lower refresh rate.
  const total = (w + HBLANK) * (h + vblank);
  const hz = Math.min(DISPLAY_REFRESH_HZ, Math.floor((DTD_MAX_CLOCK_10KHZ * 10_000) / total));
  const clock10k = Math.min(DTD_MAX_CLOCK_10KHZ, Math.round((total * hz) / 10_000));
  const d = EDID_DESCRIPTOR_OFF;
  e[d] = clock10k & 0xff;
  e[d + 1] = (clock10k >> 8) & 0xff;
  e[d + 2] = w & 0xff;
  e[d + 3] = HBLANK & 0xff;
  e[d + 4] = ((w >> 8) << 4) | (HBLANK >> 8);
  e[d + 5] = h & 0xff;
  e[d + 6] = vblank & 0xff;
  e[d + 7] = ((h >> 8) << 4) | (vblank >> 8);
  e[d + 8] = HFRONT & 0xff;
  e[d + 9] = HSYNC & 0xff;
  e[d + 10] = ((VFRONT & 0xf) << 4) | (VSYNC & 0xf);
  e[d + 11] = ((HFRONT >> 8) << 6) | ((HSYNC >> 8) << 4) | ((VFRONT >> 4) << 2) | (VSYNC >> 4);
  e[d + 12] = wmm & 0xff;
  e[d + 13] = hmm & 0xff;
  e[d + 14] = (((wmm >> 8) & 0xf) << 4) | ((hmm >> 8) & 0xf);
  e[d + 17] = DTD_FLAGS_DIGITAL_SEPARATE_POS;
  // Descriptor 1: product name (13 bytes, newline-terminated, space-padded).
  const n = d + EDID_DESCRIPTOR_SIZE;
  e[n + 3] = EDID_TAG_PRODUCT_NAME;
  const text = (name.slice(0, 12) + "\n").padEnd(13, " ");
  for (let i = 0; i < 13; i++) e[n + 5 + i] = text.charCodeAt(i) & 0x7f;
  // Descriptors 2 and 3: dummy.
  e[n + EDID_DESCRIPTOR_SIZE + 3] = EDID_TAG_DUMMY;
  e[n + 2 * EDID_DESCRIPTOR_SIZE + 3] = EDID_TAG_DUMMY;
  e[EDID_EXTENSIONS_OFF] = 0;
  e[EDID_CHECKSUM_OFF] = (256 - (e.subarray(0, EDID_CHECKSUM_OFF).reduce((s, b) => s + b, 0) & 0xff)) & 0xff;
  return e;
}
