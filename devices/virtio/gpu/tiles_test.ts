// Change detection (tiles.ts): which tiles of a flushed region differ from a display client's shadow copy.

import assert from "node:assert/strict";
import { changedRects, TILE_SIZE } from "./tiles.ts";

Deno.test("display change detection: only changed tiles, merged, and the shadow updated", () => {
  const fbw = 300, fbh = 200;
  const fb = { width: fbw, height: fbh, bgra: new Uint8Array(fbw * fbh * 4) };
  const px = new Uint32Array(fb.bgra.buffer);
  for (let i = 0; i < px.length; i++) px[i] = (i * 2654435761) >>> 0;
  const shadow = new Uint32Array(px);
  const all = { x: 0, y: 0, width: fbw, height: fbh };
  // Nothing changed: nothing to send, every tile (5 x 4, edges clipped) compared.
  assert.deepEqual(changedRects(fb, shadow, [all]), { rects: [], tiles: 20, changed: 0 });
  // One pixel in tile (1, 0), and two in the tiles below each other at column 3 (rows 1 and 2): one rect for
  // the first, one merged rect for the other two.
  px[10 * fbw + 70] ^= 1;
  px[70 * fbw + 200] ^= 1;
  px[150 * fbw + 210] ^= 1;
  const d = changedRects(fb, shadow, [all]);
  assert.equal(d.changed, 3);
  assert.deepEqual(d.rects, [
    { x: TILE_SIZE, y: 0, width: TILE_SIZE, height: TILE_SIZE },
    { x: 3 * TILE_SIZE, y: TILE_SIZE, width: TILE_SIZE, height: 2 * TILE_SIZE },
  ]);
  assert.deepEqual(shadow, px, "the shadow now holds what was sent");
  // The bottom-right tile is clipped to the framebuffer (300 x 200).
  px[199 * fbw + 299] ^= 1;
  assert.deepEqual(changedRects(fb, shadow, [all]).rects, [{
    x: 4 * TILE_SIZE,
    y: 3 * TILE_SIZE,
    width: 44,
    height: 8,
  }]);
  // Tiles in one row merge; the flushed region clips the pieces (a flush of only part of a tile).
  px[100 * fbw + 5] ^= 1;
  px[100 * fbw + 70] ^= 1;
  const part = changedRects(fb, shadow, [{ x: 2, y: 90, width: 140, height: 20 }]);
  assert.deepEqual(part.rects, [{ x: 2, y: 90, width: 2 * TILE_SIZE - 2, height: 20 }]);
  assert.equal(part.tiles, 3);
  // A change outside the flushed region is not looked at (the page is told only of flushed regions).
  px[190 * fbw + 10] ^= 1;
  assert.deepEqual(changedRects(fb, shadow, [{ x: 100, y: 0, width: 50, height: 50 }]).rects, []);
  // A shadow smaller than the frame is refused before any memory is compared.
  assert.throws(() => changedRects(fb, new Uint32Array(fbw), [all]), RangeError);
});
