// PNG decoding (tests and tools read screenshots back) through the maintained fast-png package (pinned in
// deno.json); screenshots and the web display's tiles are written by png_writer.ts. It is imported on first
// use: loading an npm package brings in Deno's Node compatibility layer.

let fastPng: Promise<typeof import("fast-png")> | undefined;
const loadPng = () => fastPng ??= import("fast-png");

/** Decode a PNG into RGBA8 pixels (for tests and tools); throws on a file that is not 8-bit RGB(A). */
export async function decodePngRgba(png: Uint8Array): Promise<{ width: number; height: number; rgba: Uint8Array }> {
  const img = (await loadPng()).decode(png);
  if (img.depth !== 8) throw new Error(`PNG depth ${img.depth} is not 8`);
  const n = img.width * img.height;
  const src = img.data as Uint8Array;
  if (img.channels === 4) return { width: img.width, height: img.height, rgba: new Uint8Array(src) };
  if (img.channels !== 3) throw new Error(`PNG with ${img.channels} channels`);
  const rgba = new Uint8Array(n * 4);
  for (let i = 0; i < n; i++) {
    rgba[4 * i] = src[3 * i];
    rgba[4 * i + 1] = src[3 * i + 1];
    rgba[4 * i + 2] = src[3 * i + 2];
    rgba[4 * i + 3] = 0xff;
  }
  return { width: img.width, height: img.height, rgba };
}
