// Pixel conversion to B8G8R8A8: every virtio-gpu format, into another buffer or in place (the B8G8R8
// formats), at aligned and unaligned offsets; formats without alpha come out opaque.

import assert from "node:assert/strict";
import * as F from "./formats.ts";

/** The B8G8R8A8 bytes of pixel `s` of `src` in `format`, from the format's definition (byte order in memory). */
function expected(format: number, src: Uint8Array, s: number): number[] {
  const p = src.subarray(s, s + 4);
  switch (format) {
    case F.VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM:
      return [p[0], p[1], p[2], p[3]];
    case F.VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM:
      return [p[0], p[1], p[2], 0xff];
    case F.VIRTIO_GPU_FORMAT_R8G8B8A8_UNORM:
      return [p[2], p[1], p[0], p[3]];
    case F.VIRTIO_GPU_FORMAT_X8R8G8B8_UNORM:
      return [p[3], p[2], p[1], 0xff];
    case F.VIRTIO_GPU_FORMAT_A8B8G8R8_UNORM:
      return [p[1], p[2], p[3], p[0]];
  }
  throw new Error(`no expectation for format ${format}`);
}

Deno.test("toBgra: every format, into another buffer and in place, aligned or not", () => {
  const count = 37;
  for (
    const format of [
      F.VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM,
      F.VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM,
      F.VIRTIO_GPU_FORMAT_R8G8B8A8_UNORM,
      F.VIRTIO_GPU_FORMAT_X8R8G8B8_UNORM,
      F.VIRTIO_GPU_FORMAT_A8B8G8R8_UNORM,
    ]
  ) {
    for (const off of [0, 1, 4, 6]) {
      const src = new Uint8Array(off + count * 4 + 3);
      for (let i = 0; i < src.length; i++) src[i] = (i * 29 + 11) & 0xff;
      const dst = new Uint8Array(off + count * 4 + 3).fill(0x5a);
      F.toBgra(format, src, off, dst, off, count);
      for (let i = 0; i < count; i++) {
        assert.deepEqual([...dst.subarray(off + 4 * i, off + 4 * i + 4)], expected(format, src, off + 4 * i));
      }
      assert.equal(dst[off + count * 4], 0x5a, "nothing written past the pixels");
      if (format === F.VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM || format === F.VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM) {
        const inPlace = src.slice();
        F.toBgra(format, inPlace, off, inPlace, off, count);
        assert.deepEqual(inPlace.subarray(off, off + count * 4), dst.subarray(off, off + count * 4), "in place");
        assert.deepEqual(inPlace.subarray(0, off), src.subarray(0, off));
      }
    }
  }
});
