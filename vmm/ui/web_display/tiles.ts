// Change detection for the web display: which parts of a flushed region differ from what a page was last
// sent. Each page keeps a shadow copy of its last frame; a flushed region is compared with it in
// TILE_SIZE tiles, and only tiles with a changed pixel are sent, merged into rectangles.

import type { Rect } from "../../../devices/virtio/gpu/backend.ts";
import type { Framebuffer } from "../../../devices/virtio/gpu/display.ts";

/**
 * The change detection grid: a flushed region is compared with the shadow in tiles of this size. 64x64
 * (16 KiB) keeps the comparison cheap while a small change does not drag much along with it.
 */
export const TILE_SIZE = 64;
/** More pending rectangles than this are sent as their bounding box. */
export const MAX_RECTS_PER_BATCH = 16;
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
