// Comparing what a guest shows with what a test expects: pixel access to a PNG
// or framebuffer, and a tolerant comparison against a reference image.

import { decodePngRgba } from "../../devices/virtio/gpu/png.ts";

/** An RGBA8 image. */
export interface Image {
  width: number;
  height: number;
  rgba: Uint8Array;
}

export function decodePng(png: Uint8Array): Promise<Image> {
  return decodePngRgba(png);
}

/** A region of an image, in pixels. */
export interface Region {
  x: number;
  y: number;
  width: number;
  height: number;
}

export interface CompareOptions {
  /** Largest per-channel difference that still counts as equal (0..255, default 0). */
  channelTolerance?: number;
  /** Fraction of pixels (0..1) that may differ beyond channelTolerance (default 0). */
  maxDifferentFraction?: number;
  /** Only compare this part (default: the whole reference). */
  region?: Region;
}

/** How two images differ: `matches` per the options, and the fraction of differing pixels. */
export function compareImages(
  actual: Image,
  reference: Image,
  opts: CompareOptions = {},
): { matches: boolean; differentFraction: number; reason?: string } {
  const region = opts.region ?? { x: 0, y: 0, width: reference.width, height: reference.height };
  if (actual.width !== reference.width || actual.height !== reference.height) {
    return {
      matches: false,
      differentFraction: 1,
      reason: `size ${actual.width}x${actual.height}, reference ${reference.width}x${reference.height}`,
    };
  }
  const tol = opts.channelTolerance ?? 0;
  let different = 0;
  for (let y = region.y; y < region.y + region.height; y++) {
    for (let x = region.x; x < region.x + region.width; x++) {
      const i = (y * actual.width + x) * 4;
      for (let c = 0; c < 3; c++) {
        if (Math.abs(actual.rgba[i + c] - reference.rgba[i + c]) > tol) {
          different++;
          break;
        }
      }
    }
  }
  const fraction = different / Math.max(1, region.width * region.height);
  const matches = fraction <= (opts.maxDifferentFraction ?? 0);
  return matches
    ? { matches, differentFraction: fraction }
    : { matches, differentFraction: fraction, reason: `${(fraction * 100).toFixed(2)}% of pixels differ` };
}

/** The RGBA of one pixel. */
export function pixel(img: Image, x: number, y: number): [number, number, number, number] {
  const i = (y * img.width + x) * 4;
  return [img.rgba[i], img.rgba[i + 1], img.rgba[i + 2], img.rgba[i + 3]];
}
