// gpu-copies: a 1920x1080 BGRA frame updated FRAMES times two ways, through denovm's GpuDevice driven by
// the test virtio driver (no VM; test/support/virtio_driver.ts):
//
// - transfer path: a 2D resource (Backend2D) whose guest backing the guest rewrites each frame, then
//   TRANSFER_TO_HOST_2D of the whole frame and RESOURCE_FLUSH of its scanout;
// - blob path: a HOST3D mappable blob created by virglrenderer (VirglBackend), mapped in the host-visible
//   window through a test mapper (standing in for the KVM memory slot), shown with SET_SCANOUT_BLOB; each
//   frame is written through the mapped host pointer (the guest's stores through the window), then
//   RESOURCE_FLUSH. When virglrenderer does not initialise here, a GUEST blob over the guest's pages is
//   used instead (the same zero-copy scanout, without the window).
//
// Bytes copied per frame come from the device's own counters (gpuStats().totals.bytesCopied). The
// transfer path's GB/s is the frame bytes over the time of the TRANSFER_TO_HOST_2D commands (queue and
// decode included), with the backing as one contiguous range (the packed fast path); the same with the
// backing as scattered 4 KiB pages is reported too. Host memcpy GB/s: TypedArray.set of the same frame
// into another buffer, timed right after each transfer in the same loop.
//
// Output: {"bench":"gpu-copies","transfer_bytes_per_frame":..,"blob_bytes_per_frame":0,"transfer_gbps":..,
//          "memcpy_gbps":..,"ratio":..,...}   ratio = transfer_gbps / memcpy_gbps.

import * as P from "../devices/virtio/gpu/protocol.ts";
import { Backend2D } from "../devices/virtio/gpu/backend_2d.ts";
import { VirglBackend } from "../devices/virtio/gpu/backend_virgl.ts";
import { VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM } from "../devices/virtio/gpu/formats.ts";
import { createHostBlob, createVirglContext, GpuRig, MiB } from "./_gpu.ts";
import {
  attach,
  create2d,
  createBlob,
  flush,
  mapBlob,
  setScanout,
  setScanoutBlob,
  transfer2d,
  unmapBlob,
  unref,
} from "../test/support/gpu_commands.ts";
import { progress, result } from "./_common.ts";

const NAME = "gpu-copies";
const W = 1920;
const H = 1080;
/** virtio-gpu formats are all 4 bytes per pixel (linux/virtio_gpu.h, enum virtio_gpu_formats). */
const BPP = 4;
const STRIDE = W * BPP;
const FRAME = STRIDE * H;
const FRAMES = Number(Deno.env.get("BENCH_FRAMES") ?? 120);
const WARMUP = 5;
const PAGE = 4096;
/** Guest layout: rings and commands below ARENA_END, frame backings above it. */
const ARENA_END = 2 * MiB;
const BACKING_A = 4 * MiB;
const BACKING_B = BACKING_A + 16 * MiB;
const GUEST_BYTES = BACKING_B + 16 * MiB;
const B8G8R8A8 = VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM;
const CTX = 1;

/** Two distinct frames, so every update really changes the bytes. */
function frames(): Uint8Array[] {
  return [1, 2].map((seed) => {
    const f = new Uint8Array(FRAME);
    const v = new Uint32Array(f.buffer);
    for (let i = 0; i < v.length; i++) v[i] = Math.imul(i + seed, 0x9e3779b1) >>> 0;
    return f;
  });
}

function gbps(bytes: number, ms: number): number {
  return bytes / (ms / 1000) / 1e9;
}

const round3 = (x: number) => Number(x.toFixed(3));

/**
 * The transfer path on one resource; returns bytes copied per frame, the transfer GB/s and the host memcpy
 * GB/s measured frame by frame in the same loop (TypedArray.set of the same frame right after each transfer,
 * so both see the same host load).
 */
function transferPath(
  rig: GpuRig,
  id: number,
  backing: { addr: number; len: number }[],
  src: Uint8Array[],
): { bytesPerFrame: number; gbps: number; memcpyGbps: number } {
  const memDst = new Uint8Array(FRAME);
  rig.ok(create2d(id, B8G8R8A8, W, H));
  rig.ok(attach(id, backing));
  rig.ok(setScanout(0, id, 0, 0, W, H));
  /** The guest draws: the frame goes into its backing pages, in backing order. */
  const draw = (f: Uint8Array) => {
    let off = 0;
    for (const e of backing) {
      rig.g.mem.write(e.addr, f.subarray(off, off + e.len));
      off += e.len;
    }
  };
  for (let i = 0; i < WARMUP; i++) {
    draw(src[i % 2]);
    rig.ok(transfer2d(id, 0, 0, W, H, 0));
    rig.ok(flush(id, 0, 0, W, H));
    memDst.set(src[i % 2]);
  }
  const before = rig.dev.gpuStats().totals.bytesCopied;
  let ms = 0;
  let memcpyMs = 0;
  for (let i = 0; i < FRAMES; i++) {
    draw(src[i % 2]);
    const t0 = performance.now();
    rig.ok(transfer2d(id, 0, 0, W, H, 0));
    const t1 = performance.now();
    memDst.set(src[i % 2]);
    const t2 = performance.now();
    ms += t1 - t0;
    memcpyMs += t2 - t1;
    rig.ok(flush(id, 0, 0, W, H));
  }
  if (memDst[0] !== src[(FRAMES - 1) % 2][0]) throw new Error("memcpy check failed");
  const copied = rig.dev.gpuStats().totals.bytesCopied - before;
  checkScreen(rig, src[(FRAMES - 1) % 2]);
  rig.ok(unref(id));
  return { bytesPerFrame: copied / FRAMES, gbps: gbps(FRAMES * FRAME, ms), memcpyGbps: gbps(FRAMES * FRAME, memcpyMs) };
}

/** The scanout shows `frame` (a few pixels of the screenshot against the frame's BGRA bytes). */
function checkScreen(rig: GpuRig, frame: Uint8Array): void {
  // Looking is what reads the scanout back (display.ts): the flushed frames are read once, here.
  const shot = rig.dev.display.refresh(0, "screenshot").bgra;
  for (const px of [0, 1, W * H / 2 + 7, W * H - 1]) {
    for (let c = 0; c < 3; c++) {
      if (shot[px * BPP + c] !== frame[px * BPP + c]) throw new Error(`scanout pixel ${px} differs from the frame`);
    }
  }
}

/** The blob path: frames written through the mapped window; returns bytes copied per frame. */
function virglBlobPath(src: Uint8Array[]): { bytesPerFrame: number; path: string } {
  const backend = new VirglBackend();
  const rig = new GpuRig({ backend, guestBytes: 8 * MiB, arenaEnd: 8 * MiB, displays: [{ width: W, height: H }] });
  try {
    createVirglContext(rig, CTX);
    const blobId = 1, id = 10, offset = 0;
    createHostBlob(rig, CTX, id, blobId, FRAME);
    rig.ok(mapBlob(id, offset), P.RESP_OK_MAP_INFO);
    const win = rig.mapper.view(offset).subarray(0, FRAME);
    rig.ok(setScanoutBlob(0, id, W, H, B8G8R8A8, STRIDE));
    const bytesPerFrame = blobFrames(rig, id, (f) => win.set(f), src);
    rig.ok(unmapBlob(id));
    rig.ok(unref(id));
    return { bytesPerFrame, path: "virgl HOST3D blob mapped through a test mapper" };
  } finally {
    rig.close();
  }
}

/** Fallback blob path without virglrenderer: a GUEST blob over the guest's pages on SET_SCANOUT_BLOB. */
function guestBlobPath(src: Uint8Array[]): { bytesPerFrame: number; path: string } {
  const rig = new GpuRig({
    backend: new Backend2D(),
    guestBytes: GUEST_BYTES,
    arenaEnd: ARENA_END,
    displays: [{ width: W, height: H }],
  });
  try {
    const id = 11;
    rig.ok(createBlob(
      id,
      P.VIRTIO_GPU_BLOB_MEM_GUEST,
      P.VIRTIO_GPU_BLOB_FLAG_USE_SHAREABLE,
      0n,
      FRAME,
      [{ addr: BACKING_A, len: FRAME }],
    ));
    rig.ok(setScanoutBlob(0, id, W, H, B8G8R8A8, STRIDE));
    const pages = rig.g.mem.slice(BACKING_A, FRAME);
    const bytesPerFrame = blobFrames(rig, id, (f) => pages.set(f), src);
    rig.ok(unref(id));
    return { bytesPerFrame, path: "GUEST blob (the virglrenderer HOST3D path failed)" };
  } finally {
    rig.close();
  }
}

function blobFrames(rig: GpuRig, id: number, draw: (f: Uint8Array) => void, src: Uint8Array[]): number {
  const before = rig.dev.gpuStats().totals.bytesCopied;
  for (let i = 0; i < FRAMES; i++) {
    draw(src[i % 2]);
    rig.ok(flush(id, 0, 0, W, H));
  }
  checkScreen(rig, src[(FRAMES - 1) % 2]);
  return (rig.dev.gpuStats().totals.bytesCopied - before) / FRAMES;
}

const src = frames();
progress(NAME, `${W}x${H} BGRA (${FRAME} bytes), ${FRAMES} frames per path`);

const rig2d = new GpuRig({
  backend: new Backend2D(),
  guestBytes: GUEST_BYTES,
  arenaEnd: ARENA_END,
  displays: [{ width: W, height: H }],
});
let contiguous, paged;
try {
  contiguous = transferPath(rig2d, 1, [{ addr: BACKING_A, len: FRAME }], src);
  progress(
    NAME,
    `TRANSFER_TO_HOST_2D, contiguous backing: ${contiguous.gbps.toFixed(2)} GB/s; ` +
      `host memcpy ${contiguous.memcpyGbps.toFixed(2)} GB/s`,
  );
  // Scattered pages, in reverse order, as a guest's shmem pages may come.
  const pages = [];
  for (let off = 0; off < FRAME; off += PAGE) pages.push({ addr: 0, len: Math.min(PAGE, FRAME - off) });
  pages.forEach((p, i) => p.addr = BACKING_B + (pages.length - 1 - i) * PAGE);
  paged = transferPath(rig2d, 2, pages, src);
  progress(
    NAME,
    `TRANSFER_TO_HOST_2D, 4 KiB page backing: ${paged.gbps.toFixed(2)} GB/s; ` +
      `host memcpy ${paged.memcpyGbps.toFixed(2)} GB/s`,
  );
} finally {
  rig2d.close();
}

let blob: { bytesPerFrame: number; path: string };
try {
  blob = virglBlobPath(src);
} catch (e) {
  progress(NAME, `virgl HOST3D blob path failed (${(e as Error).message}); using a GUEST blob`);
  blob = guestBlobPath(src);
}
progress(NAME, `blob path (${blob.path}): ${blob.bytesPerFrame} bytes copied per frame`);

result(NAME, {
  transfer_bytes_per_frame: contiguous.bytesPerFrame,
  blob_bytes_per_frame: blob.bytesPerFrame,
  transfer_gbps: round3(contiguous.gbps),
  memcpy_gbps: round3(contiguous.memcpyGbps),
  ratio: round3(contiguous.gbps / contiguous.memcpyGbps),
  transfer_gbps_4k_pages: round3(paged.gbps),
  ratio_4k_pages: round3(paged.gbps / paged.memcpyGbps),
  frames: FRAMES,
  blob_path: blob.path,
});
Deno.exit(0);
