// Change detection for display clients (a web page, a vhost-user front end): which parts of a flushed
// region differ from what a client was last sent. Each client keeps a shadow copy of its last frame; a
// flushed region is compared with it in TILE_SIZE tiles, and only tiles with a changed pixel are sent,
// merged into rectangles.

import { memcmpAt } from "../../../ffi/libc.ts";
import type { Rect } from "./backend.ts";
import type { Framebuffer } from "./display.ts";

/**
 * The change detection grid: a flushed region is compared with the shadow in tiles of this size. 64x64
 * (16 KiB) keeps the comparison cheap while a small change does not drag much along with it.
 */
export const TILE_SIZE = 64;
/** More pending rectangles than this are sent as their bounding box. */
export const MAX_RECTS_PER_BATCH = 16;
/** Bytes per pixel of a framebuffer (B8G8R8A8) and of a shadow entry (u32). */
const BPP = 4;
/** Send the bounding box instead when the rectangles cover at least this share of it. */
const BOUNDING_BOX_SHARE = 0.75;

/** `r` clipped to a w x h framebuffer, or null when nothing is left. */
export function clip(r: Rect, w: number, h: number): Rect | null {
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
  const cmp = new RowComparer(cur, shadow, fb.width);
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
      // Rows of this band that differ anywhere in the region: a tile can only have changed in those.
      const rows: number[] = [];
      for (let y = py0; y < py1; y++) if (cmp.differs(y, r.x, x1)) rows.push(y);
      const runs: [number, number][] = [];
      for (let tx = Math.floor(r.x / TILE_SIZE) * TILE_SIZE; tx < x1; tx += TILE_SIZE) {
        const px0 = Math.max(r.x, tx), px1 = Math.min(x1, tx + TILE_SIZE);
        tiles++;
        if (!rows.some((y) => cmp.differs(y, px0, px1))) continue;
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

/**
 * Compares pixel spans of two same-sized images with libc's memcmp (many times faster than a JavaScript loop
 * over a frame). The addresses are taken once: nothing may allocate in the arrays' buffers meanwhile, which
 * holds for the synchronous changedRects.
 */
class RowComparer {
  readonly #a: number;
  readonly #b: number;
  readonly #stride: number;

  constructor(a: Uint32Array, b: Uint32Array, stride: number) {
    if (b.length < a.length) throw new RangeError(`shadow of ${b.length} pixels for a frame of ${a.length}`);
    this.#a = addressOf(a);
    this.#b = addressOf(b);
    this.#stride = stride * BPP;
  }

  /** Whether pixels [x0, x1) of row y differ. */
  differs(y: number, x0: number, x1: number): boolean {
    const off = y * this.#stride + x0 * BPP;
    return memcmpAt(this.#a + off, this.#b + off, (x1 - x0) * BPP) !== 0;
  }
}

function addressOf(a: Uint32Array): number {
  return Number(Deno.UnsafePointer.value(Deno.UnsafePointer.of(a)));
}
