// virtio-gpu control commands as a guest driver encodes them (struct layouts of linux/virtio_gpu.h), for
// the device-model tests and the GPU benchmarks.

import * as P from "../../devices/virtio/gpu/protocol.ts";
import { VIRGL_FORMAT_R8_UNORM } from "../../devices/virtio/gpu/formats.ts";
import {
  PIPE_BIND_VERTEX_BUFFER,
  PIPE_BUFFER,
  PIPE_RESOURCE_FLAG_MAP_COHERENT,
  PIPE_RESOURCE_FLAG_MAP_PERSISTENT,
  VirglStream,
} from "../../devices/virtio/gpu/virgl_stream.ts";

/** Header options of a control command (struct virtio_gpu_ctrl_hdr). */
export interface HdrOpts {
  /** Defaults to VIRTIO_GPU_FLAG_FENCE when `fenceId` is given, else 0. */
  flags?: number;
  fenceId?: bigint;
  ctxId?: number;
  ringIdx?: number;
}

/** A zeroed buffer of `size` bytes that starts with the control header of `type`. */
export function header(type: number, size: number, o: HdrOpts = {}): { b: Uint8Array; v: DataView } {
  const b = new Uint8Array(size);
  const v = new DataView(b.buffer);
  v.setUint32(P.HDR_TYPE, type, true);
  v.setUint32(P.HDR_FLAGS, o.flags ?? (o.fenceId !== undefined ? P.VIRTIO_GPU_FLAG_FENCE : 0), true);
  v.setBigUint64(P.HDR_FENCE_ID, o.fenceId ?? 0n, true);
  v.setUint32(P.HDR_CTX_ID, o.ctxId ?? 0, true);
  v.setUint8(P.HDR_RING_IDX, o.ringIdx ?? 0);
  return { b, v };
}

/** A command: the header, then `body` (numbers as le32, bigints as le64), then `tail`. */
export function cmd(type: number, body: (number | bigint)[] = [], o: HdrOpts = {}, tail?: Uint8Array): Uint8Array {
  const bodyLen = body.reduce<number>((n, x) => n + (typeof x === "bigint" ? 8 : 4), 0);
  const { b, v } = header(type, P.HDR_SIZE + bodyLen + (tail?.length ?? 0), o);
  let off = P.HDR_SIZE;
  for (const x of body) {
    if (typeof x === "bigint") {
      v.setBigUint64(off, x, true);
      off += 8;
    } else {
      v.setUint32(off, x >>> 0, true);
      off += 4;
    }
  }
  if (tail) b.set(tail, off);
  return b;
}

/** Backing entries (struct virtio_gpu_mem_entry: addr, length, padding). */
const memEntries = (entries: { addr: number | bigint; len: number }[]) =>
  entries.flatMap((e) => [BigInt(e.addr), e.len, 0]);

export const create2d = (id: number, format: number, w: number, h: number) =>
  cmd(P.CMD_RESOURCE_CREATE_2D, [id, format, w, h]);
export const attach = (id: number, entries: { addr: number | bigint; len: number }[]) =>
  cmd(P.CMD_RESOURCE_ATTACH_BACKING, [id, entries.length, ...memEntries(entries)]);
export const transfer2d = (id: number, x: number, y: number, w: number, h: number, offset: number | bigint) =>
  cmd(P.CMD_TRANSFER_TO_HOST_2D, [x, y, w, h, BigInt(offset), id, 0]);
export const setScanout = (scanout: number, id: number, x: number, y: number, w: number, h: number) =>
  cmd(P.CMD_SET_SCANOUT, [x, y, w, h, scanout, id]);
/** SET_SCANOUT_BLOB of a whole w×h blob: rect, scanout, resource, size, format, padding, strides[4], offsets[4]. */
export const setScanoutBlob = (scanout: number, id: number, w: number, h: number, format: number, stride: number) =>
  cmd(P.CMD_SET_SCANOUT_BLOB, [0, 0, w, h, scanout, id, w, h, format, 0, stride, 0, 0, 0, 0, 0, 0, 0]);
export const flush = (id: number, x: number, y: number, w: number, h: number) =>
  cmd(P.CMD_RESOURCE_FLUSH, [x, y, w, h, id, 0]);
export const unref = (id: number) => cmd(P.CMD_RESOURCE_UNREF, [id, 0]);
/** CTX_CREATE of context `ctx`, with `name` as its debug name. */
export const ctxCreate = (ctx: number, contextInit = 0, o: HdrOpts = {}, name = "") => {
  const nameBytes = new TextEncoder().encode(name);
  const debugName = new Uint8Array(P.CTX_DEBUG_NAME_SIZE);
  debugName.set(nameBytes);
  return cmd(P.CMD_CTX_CREATE, [nameBytes.length, contextInit], { ...o, ctxId: ctx }, debugName);
};
export const ctxAttach = (ctx: number, id: number) => cmd(P.CMD_CTX_ATTACH_RESOURCE, [id, 0], { ctxId: ctx });
export const submit = (ctx: number, stream: Uint8Array, o: HdrOpts = {}) =>
  cmd(P.CMD_SUBMIT_3D, [stream.length, 0], { ...o, ctxId: ctx }, stream);
export const createBlob = (
  id: number,
  blobMem: number,
  flags: number,
  blobId: bigint,
  size: number,
  entries: { addr: number | bigint; len: number }[] = [],
  ctxId = 0,
) =>
  cmd(P.CMD_RESOURCE_CREATE_BLOB, [id, blobMem, flags, entries.length, blobId, BigInt(size), ...memEntries(entries)], {
    ctxId,
  });
/** A HOST3D mappable blob (what Mesa's virgl driver creates after PIPE_RESOURCE_CREATE with `blobId`). */
export const createHostBlob = (ctx: number, id: number, blobId: number | bigint, size: number) =>
  createBlob(id, P.VIRTIO_GPU_BLOB_MEM_HOST3D, P.VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE, BigInt(blobId), size, [], ctx);
export const mapBlob = (id: number, offset: number | bigint, o: HdrOpts = {}) =>
  cmd(P.CMD_RESOURCE_MAP_BLOB, [id, 0, BigInt(offset)], o);
export const unmapBlob = (id: number, o: HdrOpts = {}) => cmd(P.CMD_RESOURCE_UNMAP_BLOB, [id, 0], o);

/**
 * The PIPE_RESOURCE_CREATE of a `size`-byte buffer for blob `blobId` that Mesa's virgl driver submits before
 * RESOURCE_CREATE_BLOB (reference/virglrenderer.md); persistently and coherently mappable by default.
 */
export const hostBufferStream = (
  blobId: number,
  size: number,
  flags = PIPE_RESOURCE_FLAG_MAP_PERSISTENT | PIPE_RESOURCE_FLAG_MAP_COHERENT,
): Uint8Array =>
  new VirglStream().pipeResourceCreate({
    target: PIPE_BUFFER,
    format: VIRGL_FORMAT_R8_UNORM,
    bind: PIPE_BIND_VERTEX_BUFFER,
    width: size,
    flags,
    blobId,
  }).bytes();

/** Guest pixels: a deterministic pattern of `w`×`h` pixels, 4 bytes each, that `seed` varies. */
export function pattern(w: number, h: number, seed: number): Uint8Array {
  const b = new Uint8Array(w * h * 4);
  for (let i = 0; i < b.length; i++) b[i] = (i * 7 + seed * 13 + (i >> 8) * 3) & 0xff;
  return b;
}
