// The PNG reader: an RGBA file decodes to its pixels; an RGB file (another tool's screenshot) decodes with
// opaque alpha; a file of another depth or channel count is refused with one line.

import assert from "node:assert/strict";
import { encode } from "fast-png";
import { decodePngRgba } from "./png.ts";

Deno.test("png: RGBA round trip; RGB gains opaque alpha; 16-bit and grey files are refused", async () => {
  const rgba = Uint8Array.from({ length: 3 * 2 * 4 }, (_, i) => (i * 37) & 0xff);
  const fromRgba = await decodePngRgba(encode({ width: 3, height: 2, data: rgba, channels: 4, depth: 8 }));
  assert.deepEqual(fromRgba, { width: 3, height: 2, rgba });

  const rgb = Uint8Array.of(1, 2, 3, 4, 5, 6);
  const fromRgb = await decodePngRgba(encode({ width: 2, height: 1, data: rgb, channels: 3, depth: 8 }));
  assert.deepEqual(fromRgb, { width: 2, height: 1, rgba: Uint8Array.of(1, 2, 3, 0xff, 4, 5, 6, 0xff) });

  const deep = encode({ width: 1, height: 1, data: Uint16Array.of(1, 2, 3, 4), channels: 4, depth: 16 });
  await assert.rejects(decodePngRgba(deep), { message: "PNG depth 16 is not 8" });
  const grey = encode({ width: 2, height: 1, data: Uint8Array.of(9, 9), channels: 1, depth: 8 });
  await assert.rejects(decodePngRgba(grey), { message: "PNG with 1 channels" });
});
