// A minimal PNG writer for screenshots and the web display's compressible rectangles (ISO/IEC 15948, "PNG
// specification" second edition): 8-bit RGBA, no interlace, filter type 0 on every row, one IDAT chunk,
// compressed by node:zlib (native zlib, not fast-png's JavaScript deflate: a screenshot runs on the main
// thread, beside the device). The pixels go from the B8G8R8A8 framebuffer straight into the filtered
// scanlines without an intermediate RGBA copy. Loads node:zlib: import it when a PNG is first needed.

import { crc32, deflateSync } from "node:zlib";
import type { Rect } from "./backend.ts";
import type { Framebuffer } from "./display.ts";

/** PNG spec 5.2: the 8-byte signature. */
const PNG_SIGNATURE = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];
/** PNG spec 5.3: chunk = length (u32 BE) + type (4 bytes) + data + CRC-32 (u32 BE) of type and data. */
const CHUNK_OVERHEAD = 12;
/** PNG spec 11.2.2: IHDR data is 13 bytes. */
const IHDR_SIZE = 13;
const IHDR_WIDTH = 0; // u32 BE
const IHDR_HEIGHT = 4; // u32 BE
const IHDR_BIT_DEPTH = 8; // u8
const IHDR_COLOUR_TYPE = 9; // u8 (compression, filter method and interlace at 10..12 stay 0)
/** PNG spec 11.2.2 table 11.1: colour type 6 = truecolour with alpha. */
const COLOUR_TYPE_RGBA = 6;
const BIT_DEPTH_8 = 8;
/** PNG spec 9.2: filter type 0 (None), one byte before each scanline. */
const FILTER_NONE = 0;
const BPP = 4;

function writeChunk(out: Uint8Array, at: number, type: string, data: Uint8Array): number {
  const v = new DataView(out.buffer, out.byteOffset + at);
  v.setUint32(0, data.byteLength);
  for (let i = 0; i < 4; i++) out[at + 4 + i] = type.charCodeAt(i);
  out.set(data, at + 8);
  v.setUint32(8 + data.byteLength, crc32(out.subarray(at + 4, at + 8 + data.byteLength)));
  return at + CHUNK_OVERHEAD + data.byteLength;
}

/**
 * Encode `r` of a B8G8R8A8 framebuffer as a PNG of opaque RGBA (alpha forced to 0xff), `reserve` spare bytes
 * in front of the file (for a message header). `level` is the zlib level.
 */
export function encodeRectPng(fb: Framebuffer, r: Rect, level: number, reserve = 0): Uint8Array {
  const row = r.width * BPP;
  const scan = new Uint8Array((row + 1) * r.height);
  // One aligned RGBA row, converted with u32 loads/stores, then copied after its filter byte.
  const tmp = new Uint32Array(r.width);
  const tmp8 = new Uint8Array(tmp.buffer);
  const aligned = fb.bgra.byteOffset % BPP === 0;
  const src = aligned ? new Uint32Array(fb.bgra.buffer, fb.bgra.byteOffset, fb.width * fb.height) : null;
  for (let y = 0; y < r.height; y++) {
    let i = (r.y + y) * fb.width + r.x;
    if (src) {
      // Little-endian: BGRA bytes read as 0xAARRGGBB, RGBA bytes are 0xAABBGGRR.
      for (let x = 0; x < r.width; x++, i++) {
        const p = src[i];
        tmp[x] = 0xff000000 | (p & 0xff00) | ((p >>> 16) & 0xff) | ((p & 0xff) << 16);
      }
    } else {
      const b = fb.bgra;
      for (let x = 0; x < r.width; x++, i++) {
        tmp8[x * BPP] = b[i * BPP + 2];
        tmp8[x * BPP + 1] = b[i * BPP + 1];
        tmp8[x * BPP + 2] = b[i * BPP];
        tmp8[x * BPP + 3] = 0xff;
      }
    }
    const o = y * (row + 1);
    scan[o] = FILTER_NONE;
    scan.set(tmp8, o + 1);
  }
  const idat = deflateSync(scan, { level });
  const ihdr = new Uint8Array(IHDR_SIZE);
  const hv = new DataView(ihdr.buffer);
  hv.setUint32(IHDR_WIDTH, r.width);
  hv.setUint32(IHDR_HEIGHT, r.height);
  ihdr[IHDR_BIT_DEPTH] = BIT_DEPTH_8;
  ihdr[IHDR_COLOUR_TYPE] = COLOUR_TYPE_RGBA;
  const size = PNG_SIGNATURE.length + 3 * CHUNK_OVERHEAD + IHDR_SIZE + idat.byteLength;
  const out = new Uint8Array(reserve + size);
  out.set(PNG_SIGNATURE, reserve);
  let at = writeChunk(out, reserve + PNG_SIGNATURE.length, "IHDR", ihdr);
  at = writeChunk(out, at, "IDAT", idat);
  writeChunk(out, at, "IEND", new Uint8Array(0));
  return out;
}
