// The headless display: one framebuffer per scanout (B8G8R8A8), updated on RESOURCE_FLUSH with just the
// flushed rectangle read back from the scanout's resource, PNG screenshots, and change hooks for live
// views (the web display, the vhost-user display socket).
//
// A scanout shows the rectangle `rect` of its resource at the framebuffer's (0,0); the framebuffer has
// the rectangle's size (the display mode's size until the first SET_SCANOUT).

import type { BlobLayout, Rect } from "./backend.ts";
import { encodePngRgba } from "./png.ts";

const BPP = 4;

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
export type UpdateHandler = (scanoutId: number, rect: Rect) => void;

interface Scanout {
  source: ScanoutSource | null;
  fb: Framebuffer;
  flushes: number;
}

export class HeadlessDisplay {
  readonly #scanouts: Scanout[];
  readonly #handlers = new Set<UpdateHandler>();

  constructor(modes: readonly DisplayConfig[]) {
    this.#scanouts = modes.map((m) => ({ source: null, fb: blank(m.width, m.height), flushes: 0 }));
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

  /** SET_SCANOUT / SET_SCANOUT_BLOB (source null = disable). The caller validated the id. */
  setScanout(id: number, source: ScanoutSource | null): void {
    const s = this.#scanouts[id];
    s.source = source;
    if (source && (source.rect.width !== s.fb.width || source.rect.height !== s.fb.height)) {
      s.fb = blank(source.rect.width, source.rect.height);
    }
  }

  /**
   * RESOURCE_FLUSH of `flush` (resource coordinates) on scanout `id`: read the part of it that the
   * scanout shows and copy it in. Returns the updated framebuffer rectangle (null when none) and the
   * bytes read back.
   */
  flush(id: number, flush: Rect, read: PixelReader): { rect: Rect | null; bytes: number } {
    const s = this.#scanouts[id];
    const src = s?.source;
    if (!src) return { rect: null, bytes: 0 };
    const r = intersect(flush, src.rect);
    if (!r) return { rect: null, bytes: 0 };
    const px = read(src.resourceId, r, src.layout);
    const fb = s.fb;
    const dx = r.x - src.rect.x, dy = r.y - src.rect.y;
    const row = r.width * BPP;
    for (let y = 0; y < r.height; y++) {
      fb.bgra.set(px.subarray(y * row, (y + 1) * row), ((dy + y) * fb.width + dx) * BPP);
    }
    s.flushes++;
    const out = { x: dx, y: dy, width: r.width, height: r.height };
    for (const h of this.#handlers) {
      try {
        h(id, out);
      } catch (e) {
        console.warn(`virtio-gpu display: update handler failed: ${e}`);
      }
    }
    return { rect: out, bytes: px.length };
  }

  /** Replace scanout `id`'s framebuffer with saved pixels (the caller checked id and sizes). */
  setFramebuffer(id: number, fb: Framebuffer): void {
    this.#scanouts[id].fb = { width: fb.width, height: fb.height, bgra: fb.bgra.slice() };
  }

  /** Be told of every framebuffer update; returns a function that unsubscribes. */
  onUpdate(cb: UpdateHandler): () => void {
    this.#handlers.add(cb);
    return () => this.#handlers.delete(cb);
  }

  /** The live framebuffer of a scanout (do not keep it across SET_SCANOUT: it may be replaced). */
  framebuffer(id = 0): Framebuffer {
    const s = this.#scanouts[id];
    if (!s) throw new RangeError(`no scanout ${id} (have ${this.#scanouts.length})`);
    return s.fb;
  }

  /** The scanout as a PNG (RGB from the framebuffer, alpha forced opaque: a screen has no alpha). */
  screenshot(id = 0): Promise<Uint8Array> {
    const fb = this.framebuffer(id);
    const n = fb.width * fb.height;
    const rgba = new Uint8Array(n * BPP);
    const b = fb.bgra;
    for (let i = 0; i < n * BPP; i += BPP) {
      rgba[i] = b[i + 2];
      rgba[i + 1] = b[i + 1];
      rgba[i + 2] = b[i];
      rgba[i + 3] = 0xff;
    }
    return encodePngRgba(fb.width, fb.height, rgba);
  }
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
const REFRESH_HZ = 60;
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
  const hz = Math.min(REFRESH_HZ, Math.floor((DTD_MAX_CLOCK_10KHZ * 10_000) / total));
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
