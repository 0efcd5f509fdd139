// Pixel formats: enum virtio_gpu_formats (linux/virtio_gpu.h), whose values are the same numbers as
// virglrenderer's enum virgl_formats (src/virgl_hw.h) for those formats, plus the bytes per pixel of a
// few more virgl formats the accounting needs for TRANSFER_*_3D. Gallium names list channels in memory
// byte order (B8G8R8A8: byte 0 is blue), which is what Linux maps DRM_FORMAT_XRGB8888 to on little-endian.

export const VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM = 1;
export const VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM = 2;
export const VIRTIO_GPU_FORMAT_A8R8G8B8_UNORM = 3;
export const VIRTIO_GPU_FORMAT_X8R8G8B8_UNORM = 4;
export const VIRTIO_GPU_FORMAT_R8G8B8A8_UNORM = 67;
export const VIRTIO_GPU_FORMAT_X8B8G8R8_UNORM = 68;
export const VIRTIO_GPU_FORMAT_A8B8G8R8_UNORM = 121;
export const VIRTIO_GPU_FORMAT_R8G8B8X8_UNORM = 134;

/** Bytes per pixel of every virtio_gpu_formats value. */
export const VIRTIO_GPU_BYTES_PER_PIXEL = 4;

/**
 * For each virtio-gpu format: the memory byte index of blue, green, red and alpha (-1 = no alpha,
 * reads as 0xff).
 */
const CHANNELS: Readonly<Record<number, readonly [number, number, number, number]>> = {
  [VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM]: [0, 1, 2, 3],
  [VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM]: [0, 1, 2, -1],
  [VIRTIO_GPU_FORMAT_A8R8G8B8_UNORM]: [3, 2, 1, 0],
  [VIRTIO_GPU_FORMAT_X8R8G8B8_UNORM]: [3, 2, 1, -1],
  [VIRTIO_GPU_FORMAT_R8G8B8A8_UNORM]: [2, 1, 0, 3],
  [VIRTIO_GPU_FORMAT_X8B8G8R8_UNORM]: [1, 2, 3, -1],
  [VIRTIO_GPU_FORMAT_A8B8G8R8_UNORM]: [1, 2, 3, 0],
  [VIRTIO_GPU_FORMAT_R8G8B8X8_UNORM]: [2, 1, 0, -1],
};

/** True for the formats a 2D resource may have. */
export function isVirtioGpuFormat(format: number): boolean {
  return CHANNELS[format] !== undefined;
}

export function formatName(format: number): string {
  return VIRGL_FORMAT_NAMES[format] ?? `format ${format}`;
}

/**
 * Convert `count` pixels of `format` from src[srcOff..] into B8G8R8A8 at dst[dstOff..].
 * The caller checked the format (isVirtioGpuFormat) and the bounds. In place (the same array and offset)
 * only for B8G8R8A8 and B8G8R8X8.
 */
export function toBgra(
  format: number,
  src: Uint8Array,
  srcOff: number,
  dst: Uint8Array,
  dstOff: number,
  count: number,
) {
  const c = CHANNELS[format];
  const same = src === dst && srcOff === dstOff;
  if (format === VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM) {
    if (!same) dst.set(src.subarray(srcOff, srcOff + 4 * count), dstOff);
    return;
  }
  if (format === VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM) {
    // The same byte order with the X byte made opaque.
    if (!same) dst.set(src.subarray(srcOff, srcOff + 4 * count), dstOff);
    makeOpaque(dst, dstOff, count);
    return;
  }
  const [b, g, r, a] = c;
  for (let i = 0; i < count; i++) {
    const s = srcOff + 4 * i;
    const d = dstOff + 4 * i;
    dst[d] = src[s + b];
    dst[d + 1] = src[s + g];
    dst[d + 2] = src[s + r];
    dst[d + 3] = a < 0 ? 0xff : src[s + a];
  }
}

/** Set the alpha byte (the 4th) of `count` B8G8R8A8 pixels at b[off..] to 0xff. */
function makeOpaque(b: Uint8Array, off: number, count: number): void {
  const at = b.byteOffset + off;
  if (at % 4 === 0) {
    // Four bytes at a time: on a little-endian host (x86_64) the 4th byte is a u32's top byte.
    const u = new Uint32Array(b.buffer, at, count);
    for (let i = 0; i < count; i++) u[i] |= 0xff000000;
    return;
  }
  for (let i = 0; i < count; i++) b[off + 4 * i + 3] = 0xff;
}

// ---- virgl formats for accounting (virglrenderer src/virgl_hw.h enum virgl_formats) ----
export const VIRGL_FORMAT_Z16_UNORM = 16;
export const VIRGL_FORMAT_Z32_UNORM = 17;
export const VIRGL_FORMAT_Z32_FLOAT = 18;
export const VIRGL_FORMAT_Z24_UNORM_S8_UINT = 19;
export const VIRGL_FORMAT_S8_UINT_Z24_UNORM = 20;
export const VIRGL_FORMAT_Z24X8_UNORM = 21;
export const VIRGL_FORMAT_R32_FLOAT = 28;
export const VIRGL_FORMAT_R32G32_FLOAT = 29;
export const VIRGL_FORMAT_R32G32B32_FLOAT = 30;
export const VIRGL_FORMAT_R32G32B32A32_FLOAT = 31;
export const VIRGL_FORMAT_R8_UNORM = 64;
export const VIRGL_FORMAT_R8G8_UNORM = 65;

const VIRGL_BYTES_PER_PIXEL: Readonly<Record<number, number>> = {
  [VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM]: 4,
  [VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM]: 4,
  [VIRTIO_GPU_FORMAT_A8R8G8B8_UNORM]: 4,
  [VIRTIO_GPU_FORMAT_X8R8G8B8_UNORM]: 4,
  [VIRGL_FORMAT_Z16_UNORM]: 2,
  [VIRGL_FORMAT_Z32_UNORM]: 4,
  [VIRGL_FORMAT_Z32_FLOAT]: 4,
  [VIRGL_FORMAT_Z24_UNORM_S8_UINT]: 4,
  [VIRGL_FORMAT_S8_UINT_Z24_UNORM]: 4,
  [VIRGL_FORMAT_Z24X8_UNORM]: 4,
  [VIRGL_FORMAT_R32_FLOAT]: 4,
  [VIRGL_FORMAT_R32G32_FLOAT]: 8,
  [VIRGL_FORMAT_R32G32B32_FLOAT]: 12,
  [VIRGL_FORMAT_R32G32B32A32_FLOAT]: 16,
  [VIRGL_FORMAT_R8_UNORM]: 1,
  [VIRGL_FORMAT_R8G8_UNORM]: 2,
  [VIRTIO_GPU_FORMAT_R8G8B8A8_UNORM]: 4,
  [VIRTIO_GPU_FORMAT_X8B8G8R8_UNORM]: 4,
  [VIRTIO_GPU_FORMAT_A8B8G8R8_UNORM]: 4,
  [VIRTIO_GPU_FORMAT_R8G8B8X8_UNORM]: 4,
};

const VIRGL_FORMAT_NAMES: Readonly<Record<number, string>> = {
  [VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM]: "B8G8R8A8_UNORM",
  [VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM]: "B8G8R8X8_UNORM",
  [VIRTIO_GPU_FORMAT_A8R8G8B8_UNORM]: "A8R8G8B8_UNORM",
  [VIRTIO_GPU_FORMAT_X8R8G8B8_UNORM]: "X8R8G8B8_UNORM",
  [VIRTIO_GPU_FORMAT_R8G8B8A8_UNORM]: "R8G8B8A8_UNORM",
  [VIRTIO_GPU_FORMAT_X8B8G8R8_UNORM]: "X8B8G8R8_UNORM",
  [VIRTIO_GPU_FORMAT_A8B8G8R8_UNORM]: "A8B8G8R8_UNORM",
  [VIRTIO_GPU_FORMAT_R8G8B8X8_UNORM]: "R8G8B8X8_UNORM",
  [VIRGL_FORMAT_R8_UNORM]: "R8_UNORM",
};

/** Bytes per pixel of a virgl format, or undefined when the table does not know it. */
export function virglBytesPerPixel(format: number): number | undefined {
  return VIRGL_BYTES_PER_PIXEL[format];
}

/** PIPE_BUFFER (Mesa p_defines.h enum pipe_texture_target): a buffer resource, x and w in bytes. */
export const PIPE_BUFFER = 0;
/** PIPE_TEXTURE_2D (p_defines.h). */
export const PIPE_TEXTURE_2D = 2;
