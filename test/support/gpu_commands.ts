// virtio-gpu control commands as a guest driver encodes them (struct layouts of linux/virtio_gpu.h), for
// the device-model tests.

import * as P from "../../devices/virtio/gpu/protocol.ts";

export interface HdrOpts {
  flags?: number;
  fenceId?: bigint;
  ctxId?: number;
  ringIdx?: number;
}

export function cmd(type: number, body: (number | bigint)[] = [], o: HdrOpts = {}, tail?: Uint8Array): Uint8Array {
  // Body items: numbers are le32, bigints le64.
  const bodyLen = body.reduce<number>((n, x) => n + (typeof x === "bigint" ? 8 : 4), 0);
  const b = new Uint8Array(P.HDR_SIZE + bodyLen + (tail?.length ?? 0));
  const v = new DataView(b.buffer);
  v.setUint32(P.HDR_TYPE, type, true);
  v.setUint32(P.HDR_FLAGS, o.flags ?? 0, true);
  v.setBigUint64(P.HDR_FENCE_ID, o.fenceId ?? 0n, true);
  v.setUint32(P.HDR_CTX_ID, o.ctxId ?? 0, true);
  v.setUint8(P.HDR_RING_IDX, o.ringIdx ?? 0);
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

export const create2d = (id: number, format: number, w: number, h: number) =>
  cmd(P.CMD_RESOURCE_CREATE_2D, [id, format, w, h]);
export const attach = (id: number, entries: { addr: number | bigint; len: number }[]) =>
  cmd(P.CMD_RESOURCE_ATTACH_BACKING, [id, entries.length, ...entries.flatMap((e) => [BigInt(e.addr), e.len, 0])]);
export const transfer2d = (id: number, x: number, y: number, w: number, h: number, offset: number | bigint) =>
  cmd(P.CMD_TRANSFER_TO_HOST_2D, [x, y, w, h, BigInt(offset), id, 0]);
export const setScanout = (scanout: number, id: number, x: number, y: number, w: number, h: number) =>
  cmd(P.CMD_SET_SCANOUT, [x, y, w, h, scanout, id]);
export const flush = (id: number, x: number, y: number, w: number, h: number) =>
  cmd(P.CMD_RESOURCE_FLUSH, [x, y, w, h, id, 0]);
export const ctxCreate = (ctx: number, contextInit = 0, o: HdrOpts = {}) =>
  cmd(P.CMD_CTX_CREATE, [0, contextInit], { ...o, ctxId: ctx }, new Uint8Array(P.CTX_DEBUG_NAME_SIZE));
export const submit = (ctx: number, stream: Uint8Array, o: HdrOpts = {}) =>
  cmd(P.CMD_SUBMIT_3D, [stream.length, 0], { ...o, ctxId: ctx }, stream);
export const createBlob = (
  id: number,
  blobMem: number,
  flags: number,
  blobId: bigint,
  size: number,
  entries: { addr: number; len: number }[] = [],
  ctxId = 0,
) =>
  cmd(P.CMD_RESOURCE_CREATE_BLOB, [
    id,
    blobMem,
    flags,
    entries.length,
    blobId,
    BigInt(size),
    ...entries.flatMap((e) => [BigInt(e.addr), e.len, 0]),
  ], { ctxId });
export const mapBlob = (id: number, offset: number | bigint) => cmd(P.CMD_RESOURCE_MAP_BLOB, [id, 0, BigInt(offset)]);
export const unmapBlob = (id: number) => cmd(P.CMD_RESOURCE_UNMAP_BLOB, [id, 0]);
