// The PNG writer of screenshots and the web display (png_writer.ts), decoded by an independent PNG reader.

import assert from "node:assert/strict";
import { decodePngRgba } from "./png.ts";
import { encodeRectPng } from "./png_writer.ts";

Deno.test("png writer: the PNG encoding of a rect decodes to the rect's RGBA, opaque", async () => {
  const fbw = 100, fbh = 40;
  const fb = { width: fbw, height: fbh, bgra: new Uint8Array(fbw * fbh * 4) };
  for (let i = 0; i < fb.bgra.length; i++) fb.bgra[i] = (i * 7 + (i >> 9)) & 0xff;
  const r = { x: 13, y: 5, width: 61, height: 30 };
  for (const level of [1, 6]) {
    const file = encodeRectPng(fb, r, level, 20);
    assert.deepEqual([...file.subarray(0, 20)], new Array(20).fill(0), "the reserved header room");
    const img = await decodePngRgba(file.subarray(20));
    assert.equal(img.width, r.width);
    assert.equal(img.height, r.height);
    for (let y = 0; y < r.height; y++) {
      for (let x = 0; x < r.width; x++) {
        const s = ((r.y + y) * fbw + r.x + x) * 4, d = (y * r.width + x) * 4;
        assert.deepEqual(
          [...img.rgba.subarray(d, d + 4)],
          [fb.bgra[s + 2], fb.bgra[s + 1], fb.bgra[s], 0xff],
          `pixel (${x}, ${y})`,
        );
      }
    }
  }
});
