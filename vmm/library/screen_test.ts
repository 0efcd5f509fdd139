// The library's screen helper without a VM: PNG decoding, pixel access and image comparison.

import assert from "node:assert/strict";
import { compareImages, decodePng, type Image, pixel } from "./screen.ts";
import { encode } from "fast-png";

function solid(w: number, h: number, rgb: [number, number, number]): Image {
  const rgba = new Uint8Array(w * h * 4);
  for (let i = 0; i < w * h; i++) rgba.set([...rgb, 255], i * 4);
  return { width: w, height: h, rgba };
}

Deno.test("screen: PNG round trip, pixel access, and tolerant comparison", async () => {
  const a = solid(8, 4, [10, 20, 30]);
  a.rgba.set([200, 0, 0, 255], (1 * 8 + 2) * 4);
  const back = await decodePng(encode({ width: a.width, height: a.height, data: a.rgba, channels: 4, depth: 8 }));
  assert.deepEqual(pixel(back, 2, 1), [200, 0, 0, 255]);
  assert.deepEqual(pixel(back, 0, 0), [10, 20, 30, 255]);
  const ref = solid(8, 4, [12, 20, 30]);
  assert.equal(compareImages(back, ref).matches, false);
  assert.equal(compareImages(back, ref, { channelTolerance: 2 }).matches, false, "the red pixel differs");
  const r = compareImages(back, ref, { channelTolerance: 2, maxDifferentFraction: 1 / 32 });
  assert.equal(r.matches, true);
  assert.equal(r.differentFraction, 1 / 32);
  assert.equal(
    compareImages(back, ref, { channelTolerance: 2, region: { x: 4, y: 0, width: 4, height: 4 } }).matches,
    true,
  );
  assert.match(compareImages(back, solid(4, 4, [0, 0, 0])).reason!, /size 8x4, reference 4x4/);
});
