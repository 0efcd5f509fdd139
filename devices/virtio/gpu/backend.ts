// The interface between the virtio-gpu device model and a renderer. The device (device.ts with executor.ts,
// fences.ts and window.ts) parses and validates guest commands, owns ids, fences, the host-visible window
// and the copy accounting; a backend only holds resource contents and does the copies or rendering. Two
// backends implement it: the pure TypeScript 2D backend (backend_2d.ts) and virglrenderer through FFI
// (backend_virgl.ts).
//
// Rules for implementers:
// - Every call comes from one thread (the device's). Arguments are already validated against what the
//   device knows (ids exist, boxes lie inside 2D resources, backing entries lie inside guest RAM).
// - A failure the guest caused is reported by throwing GpuBackendError with the virtio-gpu response
//   code to send (protocol.ts RESP_ERR_*). Any other exception is a host bug; the device answers
//   ERR_UNSPEC and logs it.
// - Fences: the device calls createFence after a fenced command; the backend calls the retire
//   callback given to setFenceHandler once the work before it is done (synchronously inside
//   createFence is allowed). Retiring fence N of a timeline means every fence <= N there is done.

import type { GuestMemory } from "../../../core/memory.ts";
import type { Create3DFields } from "./protocol.ts";

/** A 3D box (struct virtio_gpu_box in linux/virtio_gpu.h, also struct virgl_box). */
export interface Box {
  x: number;
  y: number;
  z: number;
  w: number;
  h: number;
  d: number;
}

/** A 2D rectangle (struct virtio_gpu_rect). */
export interface Rect {
  x: number;
  y: number;
  width: number;
  height: number;
}

/**
 * One guest backing entry (struct virtio_gpu_mem_entry), checked by the device: `guestAddr`..+`len`
 * lies inside one guest memory region, and `hostAddr` is its host address (GuestMemory.hostAddress)
 * for backends that hand iovecs to C (virglrenderer). Pure TypeScript backends must use `mem`.
 */
export interface BackingEntry {
  guestAddr: number;
  len: number;
  hostAddr: bigint;
}

/** Guest pages backing a resource, in order, with the memory they belong to. */
export interface Backing {
  mem: GuestMemory;
  entries: BackingEntry[];
  /** Sum of entry lengths. */
  size: number;
}

/** What GET_CAPSET_INFO answers for one capset (struct virtio_gpu_resp_capset_info). */
export interface CapsetInfo {
  id: number;
  maxVersion: number;
  maxSize: number;
}

/** RESOURCE_CREATE_2D (struct virtio_gpu_resource_create_2d). */
export interface Create2D {
  resourceId: number;
  /** enum virtio_gpu_formats. */
  format: number;
  width: number;
  height: number;
}

/** RESOURCE_CREATE_3D (struct virtio_gpu_resource_create_3d; virgl_renderer_resource_create_args). */
export type Create3D = { resourceId: number } & Create3DFields;

/** RESOURCE_CREATE_BLOB (struct virtio_gpu_resource_create_blob). */
export interface CreateBlob {
  resourceId: number;
  /** The context the blob is created in (hdr.ctx_id); 0 for GUEST blobs without a context. */
  ctxId: number;
  /** VIRTIO_GPU_BLOB_MEM_* */
  blobMem: number;
  /** VIRTIO_GPU_BLOB_FLAG_* */
  blobFlags: number;
  blobId: bigint;
  size: number;
  /** Guest pages for GUEST and HOST3D_GUEST blobs, else undefined. */
  backing?: Backing;
}

/** TRANSFER_TO_HOST_2D/3D, TRANSFER_FROM_HOST_3D (struct virtio_gpu_transfer_host_3d). */
export interface Transfer {
  resourceId: number;
  ctxId: number;
  box: Box;
  /** Byte offset into the backing where the box starts. */
  offset: number;
  level: number;
  /** Bytes per row in the backing; 0 = tightly packed. */
  stride: number;
  /** Bytes per layer in the backing; 0 = tightly packed. */
  layerStride: number;
}

/** A resource mapped for the guest: host memory the VMM installs into the host-visible window. */
export interface MappedBlob {
  /** Host virtual address of the first byte (page aligned). */
  hostAddr: bigint;
  /** Bytes mapped (the device rounds this up to the host page size). */
  size: number;
  /** VIRTIO_GPU_MAP_CACHE_* answered in OK_MAP_INFO. */
  mapInfo: number;
}

/** The order a fence belongs to: one global timeline, or (context, ring) with INFO_RING_IDX. */
export interface FenceTimeline {
  ctxId: number;
  ringIdx: number;
  /** True when the command carried VIRTIO_GPU_FLAG_INFO_RING_IDX (per-context fence). */
  perContext: boolean;
}

/** Called by a backend when a fence retired (and with it every earlier fence on that timeline). */
export type FenceHandler = (timeline: FenceTimeline, fenceId: bigint) => void;

/** A failure the guest caused; `response` is the VIRTIO_GPU_RESP_ERR_* code to answer. */
export class GpuBackendError extends Error {
  constructor(readonly response: number, msg: string) {
    super(msg);
    this.name = "GpuBackendError";
  }
}

export interface GpuBackend {
  /** "2d", "virglrenderer"... for logs and stats. */
  readonly name: string;
  /** Offers VIRTIO_GPU_F_VIRGL (3D commands, contexts, SUBMIT_3D). */
  readonly supportsVirgl: boolean;
  /** Can create HOST3D blobs and map them (needs the host-visible window). */
  readonly supportsHostBlobs: boolean;

  /** Capsets offered (index order is what GET_CAPSET_INFO's capset_index walks). */
  capsets(): CapsetInfo[];
  /** The capset bytes for (id, version); throws GpuBackendError when unknown. */
  getCapset(id: number, version: number): Uint8Array;

  createResource2D(args: Create2D): void;
  createResource3D(args: Create3D): void;
  createBlob(args: CreateBlob): void;
  /** RESOURCE_UNREF: forget the resource (the device unmaps and detaches first). */
  destroyResource(resourceId: number): void;
  attachBacking(resourceId: number, backing: Backing): void;
  detachBacking(resourceId: number): void;
  /** Copy from the backing into the host resource. */
  transferToHost(args: Transfer): void;
  /** Copy from the host resource into the backing. */
  transferFromHost(args: Transfer): void;

  /** CTX_CREATE; `capsetId` is context_init & 0xff with CONTEXT_INIT, else 0 (virgl). */
  createContext(ctxId: number, capsetId: number, name: string): void;
  destroyContext(ctxId: number): void;
  attachResource(ctxId: number, resourceId: number): void;
  detachResource(ctxId: number, resourceId: number): void;
  /** Run a command stream (unchanged bytes from the guest). */
  submit3D(ctxId: number, commands: Uint8Array): void;

  /** Register the handler for retired fences (called once, before any createFence). */
  setFenceHandler(handler: FenceHandler): void;
  /** Ask for `fenceId` to retire on `timeline` once the work submitted before it is done. */
  createFence(timeline: FenceTimeline, fenceId: bigint): void;
  /** Let the backend retire fences (polled backends); called after each batch of commands. */
  poll?(): void;

  /** Map a blob's host memory; throws GpuBackendError when the resource cannot be mapped. */
  mapResource(resourceId: number): MappedBlob;
  unmapResource(resourceId: number): void;

  /**
   * Pixels of `rect` (level 0, layer 0) of a scanout-able resource as B8G8R8A8 bytes, rows packed
   * (rect.width * 4 bytes each), alpha 0xff for formats without alpha. For a SET_SCANOUT_BLOB
   * scanout the device passes the blob's layout in `layout`.
   */
  readPixels(resourceId: number, rect: Rect, layout?: BlobLayout): Uint8Array;

  /**
   * The host copy of a 2D resource, width * height * 4 bytes in its format, for a saved state. Absent in
   * backends that cannot read their resources back.
   */
  hostContents?(resourceId: number): Uint8Array;
  /** Fill a 2D resource just created with createResource2D from bytes hostContents gave. */
  restoreHostContents?(resourceId: number, contents: Uint8Array): void;

  close(): void;
}

/** How a blob is read as an image (SET_SCANOUT_BLOB: format, size, plane 0 stride and offset). */
export interface BlobLayout {
  format: number;
  width: number;
  height: number;
  stride: number;
  offset: number;
}
