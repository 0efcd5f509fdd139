// Pixels on the wire for the web display: a framebuffer rectangle (B8G8R8A8) becomes one binary rectangle
// message (protocol.ts): the header, then the pixels as raw R8G8B8A8 (alpha forced opaque, a screen has
// none), or, when a sample of the rectangle says it compresses, as a PNG (png.ts) or raw deflate.

import { constants as zlibConstants, deflateRawSync } from "node:zlib";
import type { Rect } from "../../../devices/virtio/gpu/backend.ts";
import type { Framebuffer } from "../../../devices/virtio/gpu/display.ts";
import { encodeRectPng } from "./png.ts";
import {
  encodeRectHeader,
  ENCODING_DEFLATE_RGBA,
  ENCODING_PNG,
  ENCODING_RAW_RGBA,
  RECT_HEADER_SIZE,
  type RectHeader,
} from "./protocol.ts";

/** Bytes per pixel, in the framebuffer and on the wire. */
export const BPP = 4;
/** Rectangles smaller than this (pixels) are always sent raw: deflate's fixed cost would dominate. */
const DEFLATE_MIN_PIXELS = 4096;
/** Compressibility sample: every Nth row; deflate when at least this share of pixels repeat their left neighbour. */
const DEFLATE_SAMPLE_ROW_STEP = 8;
const DEFLATE_MIN_REPEAT_SHARE = 0.5;
/** zlib level 6 (zlib's default): on flat desktop content it handles long runs better than level 1. */
const DEFLATE_LEVEL = 6;

/**
 * How compressible rectangles are sent: "raw" never compresses; "png" as a PNG, which the page decodes
 * natively; "deflate" as raw deflate, which the page inflates with DecompressionStream.
 */
export type Compression = "raw" | "png" | "deflate";

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

/**
 * The rectangle message for `r`: `header` (everything but the encoding) and the pixels, compressed as
 * `compression` says when the rectangle looks compressible. `rawBytes` is what the pixels take raw.
 */
export function encodeRect(
  fb: Framebuffer,
  r: Rect,
  compression: Compression,
  header: Omit<RectHeader, "encoding">,
): { msg: Uint8Array; compressed: boolean; rawBytes: number } {
  const rawBytes = r.width * r.height * BPP;
  let msg: Uint8Array;
  let encoding = ENCODING_RAW_RGBA;
  const compressed = compression !== "raw" && looksCompressible(fb, r);
  if (compressed && compression === "deflate") {
    const rgba = new Uint8Array(rawBytes);
    rectToRgba(fb, r, rgba);
    const z = deflateRawSync(rgba, { level: DEFLATE_LEVEL, strategy: zlibConstants.Z_DEFAULT_STRATEGY });
    msg = new Uint8Array(RECT_HEADER_SIZE + z.byteLength);
    msg.set(z, RECT_HEADER_SIZE);
    encoding = ENCODING_DEFLATE_RGBA;
  } else if (compressed) {
    msg = encodeRectPng(fb, r, DEFLATE_LEVEL, RECT_HEADER_SIZE);
    encoding = ENCODING_PNG;
  } else {
    msg = new Uint8Array(RECT_HEADER_SIZE + rawBytes);
    rectToRgba(fb, r, msg.subarray(RECT_HEADER_SIZE));
  }
  encodeRectHeader({ ...header, encoding }, msg);
  return { msg, compressed, rawBytes };
}
