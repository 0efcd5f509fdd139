// A small builder for virgl command streams (the SUBMIT_3D payload), encoding the layouts Mesa's virgl
// driver sends. Used by the device-model tests and by test guests. Every number comes from virglrenderer's
// src/virgl_protocol.h (0.10.4) and is decoded by src/vrend_decode.c; Gallium numbers (PIPE_*) from Mesa's
// src/gallium/include/pipe/p_defines.h.

import { type Create3DFields, CREATE_3D_DEFAULTS, CREATE_3D_FIELDS } from "./protocol.ts";

// ---- enum virgl_context_cmd (virgl_protocol.h) ----
export const VIRGL_CCMD_NOP = 0;
export const VIRGL_CCMD_CREATE_OBJECT = 1;
export const VIRGL_CCMD_SET_FRAMEBUFFER_STATE = 5;
export const VIRGL_CCMD_CLEAR = 7;
export const VIRGL_CCMD_RESOURCE_INLINE_WRITE = 9;
export const VIRGL_CCMD_RESOURCE_COPY_REGION = 17;
export const VIRGL_CCMD_TRANSFER3D = 43;
export const VIRGL_CCMD_END_TRANSFERS = 44;
export const VIRGL_CCMD_COPY_TRANSFER3D = 45;
export const VIRGL_CCMD_PIPE_RESOURCE_CREATE = 48;

// ---- enum virgl_object_type (virgl_protocol.h) ----
export const VIRGL_OBJECT_SURFACE = 8;

// ---- Payload sizes in dwords, header excluded (virgl_protocol.h) ----
/** VIRGL_OBJ_SURFACE_SIZE: handle, res_handle, format, level (or first element), layers (or last element). */
export const VIRGL_OBJ_SURFACE_SIZE = 5;
/** VIRGL_SET_FRAMEBUFFER_STATE_SIZE(nr_cbufs): nr_cbufs, zsurf handle, then one handle per colour buffer. */
export const virglSetFramebufferStateSize = (nrCbufs: number): number => nrCbufs + 2;
/** VIRGL_MAX_COLOR_BUFS. */
export const VIRGL_MAX_COLOR_BUFS = 8;
/** VIRGL_OBJ_CLEAR_SIZE: buffers, color[4], depth (a double in two dwords), stencil. */
export const VIRGL_OBJ_CLEAR_SIZE = 8;
/** VIRGL_CMD_RESOURCE_COPY_REGION_SIZE. */
export const VIRGL_CMD_RESOURCE_COPY_REGION_SIZE = 13;
/** The eleven VIRGL_RESOURCE_IW_* dwords before VIRGL_RESOURCE_IW_DATA_START (12). */
export const VIRGL_RESOURCE_IW_HEADER_SIZE = 11;
/** VIRGL_TRANSFER3D_SIZE: the IW dwords, data offset, direction. */
export const VIRGL_TRANSFER3D_SIZE = 13;
/** VIRGL_COPY_TRANSFER3D_SIZE: the IW dwords, src resource, src offset, flags. */
export const VIRGL_COPY_TRANSFER3D_SIZE = 14;
/** VIRGL_PIPE_RES_CREATE_SIZE: target .. flags, blob_id. */
export const VIRGL_PIPE_RES_CREATE_SIZE = 11;
/** VIRGL_CMD0_MAX_DWORDS: the largest payload a 16-bit length can describe. */
export const VIRGL_CMD0_MAX_DWORDS = 0xffff;

// ---- Transfer directions and flags (virgl_protocol.h) ----
export const VIRGL_TRANSFER_TO_HOST = 1;
export const VIRGL_TRANSFER_FROM_HOST = 2;
export const VIRGL_COPY_TRANSFER3D_FLAGS_SYNCHRONIZED = 1 << 0;
export const VIRGL_COPY_TRANSFER3D_FLAGS_READ_FROM_HOST = 1 << 1;

// ---- Gallium (p_defines.h) ----
/** enum pipe_texture_target. */
export const PIPE_BUFFER = 0;
export const PIPE_TEXTURE_2D = 2;
/** PIPE_CLEAR_* buffer bits for VIRGL_CCMD_CLEAR. */
export const PIPE_CLEAR_DEPTH = 1 << 0;
export const PIPE_CLEAR_STENCIL = 1 << 1;
export const PIPE_CLEAR_COLOR0 = 1 << 2;
/** PIPE_RESOURCE_FLAG_MAP_PERSISTENT / _MAP_COHERENT: what makes a HOST3D buffer blob mappable. */
export const PIPE_RESOURCE_FLAG_MAP_PERSISTENT = 1 << 1;
export const PIPE_RESOURCE_FLAG_MAP_COHERENT = 1 << 2;
/** PIPE_BIND_* (same bits as virglrenderer.h VIRGL_RES_BIND_*). */
export const PIPE_BIND_RENDER_TARGET = 1 << 1;
export const PIPE_BIND_SAMPLER_VIEW = 1 << 3;
export const PIPE_BIND_VERTEX_BUFFER = 1 << 4;
export const PIPE_BIND_SCANOUT = 1 << 18;

/** VIRGL_CMD0(cmd, obj, len): 8-bit command, 8-bit object type, 16-bit payload length in dwords. */
export function virglCmd0(cmd: number, obj: number, len: number): number {
  if (len > VIRGL_CMD0_MAX_DWORDS) throw new RangeError(`virgl command payload of ${len} dwords`);
  return ((cmd & 0xff) | ((obj & 0xff) << 8) | (len << 16)) >>> 0;
}

/** A decoded command header. */
export interface VirglCommandHeader {
  cmd: number;
  obj: number;
  /** Payload length in dwords (the header dword excluded). */
  len: number;
  /** Byte offset of the header in the stream. */
  offset: number;
}

/**
 * Walk the command headers of a stream without changing it. Stops at the first header whose payload
 * runs past the end (returned with `truncated`), so hostile lengths cannot read out of bounds.
 */
export function walkVirglCommands(stream: Uint8Array): { commands: VirglCommandHeader[]; truncated: boolean } {
  const v = new DataView(stream.buffer, stream.byteOffset, stream.byteLength);
  const commands: VirglCommandHeader[] = [];
  let off = 0;
  while (off + 4 <= stream.byteLength) {
    const h = v.getUint32(off, true);
    const len = h >>> 16;
    if (off + 4 + len * 4 > stream.byteLength) return { commands, truncated: true };
    commands.push({ cmd: h & 0xff, obj: (h >>> 8) & 0xff, len, offset: off });
    off += 4 + len * 4;
  }
  return { commands, truncated: off !== stream.byteLength };
}

/** A box as the IW dwords carry it. */
export interface StreamBox {
  x: number;
  y: number;
  z: number;
  w: number;
  h: number;
  d: number;
}

/** A PIPE_RESOURCE_CREATE: the create-3D fields (those left out take CREATE_3D_DEFAULTS) and a blob id. */
export type PipeResourceCreate =
  & Pick<Create3DFields, "target" | "format" | "bind" | "width">
  & Partial<Create3DFields>
  & {
    /** The blob id RESOURCE_CREATE_BLOB (HOST3D) names afterwards (a u32 in the stream). */
    blobId: number;
  };

/** Builds one SUBMIT_3D payload. Methods chain; `bytes()` gives the little-endian stream. */
export class VirglStream {
  readonly #dw: number[] = [];

  /** Dwords so far. */
  get length(): number {
    return this.#dw.length;
  }

  #cmd(cmd: number, obj: number, payload: number[]): this {
    this.#dw.push(virglCmd0(cmd, obj, payload.length), ...payload.map((x) => x >>> 0));
    return this;
  }

  /** VIRGL_CCMD_PIPE_RESOURCE_CREATE (vrend_decode_pipe_resource_create): a resource for a later HOST3D blob. */
  pipeResourceCreate(a: PipeResourceCreate): this {
    const fields: Create3DFields = { ...CREATE_3D_DEFAULTS, ...a };
    return this.#cmd(VIRGL_CCMD_PIPE_RESOURCE_CREATE, 0, [...CREATE_3D_FIELDS.map((f) => fields[f]), a.blobId]);
  }

  /** VIRGL_CCMD_CREATE_OBJECT of VIRGL_OBJECT_SURFACE on a texture (level, layers first..last). */
  createSurface(handle: number, resHandle: number, format: number, level = 0, firstLayer = 0, lastLayer = 0): this {
    return this.#cmd(VIRGL_CCMD_CREATE_OBJECT, VIRGL_OBJECT_SURFACE, [
      handle,
      resHandle,
      format,
      level,
      (firstLayer & 0xffff) | ((lastLayer & 0xffff) << 16),
    ]);
  }

  /** VIRGL_CCMD_SET_FRAMEBUFFER_STATE: colour surfaces and a depth/stencil surface (0 = none). */
  setFramebufferState(cbufs: number[], zsurf = 0): this {
    if (cbufs.length > VIRGL_MAX_COLOR_BUFS) throw new RangeError(`${cbufs.length} colour buffers`);
    return this.#cmd(VIRGL_CCMD_SET_FRAMEBUFFER_STATE, 0, [cbufs.length, zsurf, ...cbufs]);
  }

  /** VIRGL_CCMD_CLEAR with a float RGBA colour (color.f[4]), depth (double) and stencil. */
  clear(buffers: number, rgba: [number, number, number, number], depth = 0, stencil = 0): this {
    const b = new DataView(new ArrayBuffer(24));
    rgba.forEach((c, i) => b.setFloat32(i * 4, c, true));
    b.setFloat64(16, depth, true);
    const u = (o: number) => b.getUint32(o, true);
    return this.#cmd(VIRGL_CCMD_CLEAR, 0, [buffers, u(0), u(4), u(8), u(12), u(16), u(20), stencil]);
  }

  /** VIRGL_CCMD_RESOURCE_COPY_REGION: copy src box (level srcLevel) to dst at (dx, dy, dz). */
  resourceCopyRegion(
    dst: number,
    dstLevel: number,
    dx: number,
    dy: number,
    dz: number,
    src: number,
    srcLevel: number,
    box: StreamBox,
  ): this {
    return this.#cmd(VIRGL_CCMD_RESOURCE_COPY_REGION, 0, [
      dst,
      dstLevel,
      dx,
      dy,
      dz,
      src,
      srcLevel,
      box.x,
      box.y,
      box.z,
      box.w,
      box.h,
      box.d,
    ]);
  }

  #iw(res: number, level: number, usage: number, stride: number, layerStride: number, box: StreamBox): number[] {
    return [res, level, usage, stride, layerStride, box.x, box.y, box.z, box.w, box.h, box.d];
  }

  /** VIRGL_CCMD_TRANSFER3D between a resource and its attached backing at `dataOffset`. */
  transfer3d(
    res: number,
    box: StreamBox,
    direction: number,
    opts: { level?: number; stride?: number; layerStride?: number; dataOffset?: number; usage?: number } = {},
  ): this {
    return this.#cmd(VIRGL_CCMD_TRANSFER3D, 0, [
      ...this.#iw(res, opts.level ?? 0, opts.usage ?? 0, opts.stride ?? 0, opts.layerStride ?? 0, box),
      opts.dataOffset ?? 0,
      direction,
    ]);
  }

  /** VIRGL_CCMD_COPY_TRANSFER3D from (or, with READ_FROM_HOST, to) a staging resource. */
  copyTransfer3d(
    res: number,
    box: StreamBox,
    srcRes: number,
    srcOffset: number,
    flags: number,
    opts: { level?: number; stride?: number; layerStride?: number } = {},
  ): this {
    return this.#cmd(VIRGL_CCMD_COPY_TRANSFER3D, 0, [
      ...this.#iw(res, opts.level ?? 0, 0, opts.stride ?? 0, opts.layerStride ?? 0, box),
      srcRes,
      srcOffset,
      flags,
    ]);
  }

  /** VIRGL_CCMD_RESOURCE_INLINE_WRITE: `data` (padded to whole dwords) written into the box. */
  inlineWrite(
    res: number,
    box: StreamBox,
    data: Uint8Array,
    opts: { level?: number; stride?: number; layerStride?: number } = {},
  ): this {
    const padded = new Uint8Array(Math.ceil(data.length / 4) * 4);
    padded.set(data);
    const v = new DataView(padded.buffer);
    const words: number[] = [];
    for (let i = 0; i < padded.length; i += 4) words.push(v.getUint32(i, true));
    return this.#cmd(VIRGL_CCMD_RESOURCE_INLINE_WRITE, 0, [
      ...this.#iw(res, opts.level ?? 0, 0, opts.stride ?? 0, opts.layerStride ?? 0, box),
      ...words,
    ]);
  }

  /** Raw dwords (for hostile-input tests). */
  raw(...dwords: number[]): this {
    this.#dw.push(...dwords.map((x) => x >>> 0));
    return this;
  }

  bytes(): Uint8Array<ArrayBuffer> {
    const out = new Uint8Array(this.#dw.length * 4);
    const v = new DataView(out.buffer);
    this.#dw.forEach((d, i) => v.setUint32(i * 4, d, true));
    return out;
  }
}
