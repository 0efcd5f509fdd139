// The host-visible window: virtio-gpu shared-memory region 1 (VIRTIO_GPU_SHM_ID_HOST_VISIBLE, virtio 1.2
// section 5.7.5). RESOURCE_MAP_BLOB names an offset in it; this module checks the offset (page aligned,
// inside the window, no overlap with a live mapping), asks the backend for the blob's host memory and
// has the VMM's SharedMemoryMapper install that memory at the offset. The device never calls KVM itself.
//
// Offsets and sizes are whole host pages. A failure the guest caused is a ProtocolError with the
// response code to answer; the backend's mapping is undone whenever installing it fails.

import type { SharedMemoryMapper } from "../device.ts";
import type { GpuBackend } from "./backend.ts";
import {
  ProtocolError,
  RESP_ERR_INVALID_PARAMETER,
  RESP_ERR_OUT_OF_MEMORY,
  VIRTIO_GPU_SHM_ID_HOST_VISIBLE,
} from "./protocol.ts";

/** Host page size: mappings start and end on page boundaries. */
export const HOST_PAGE_SIZE = 4096;
/** The window's size when none is configured: crosvm's `pci-bar-size` default, 8 GiB. */
export const DEFAULT_HOST_VISIBLE_WINDOW_SIZE = 8 * 1024 ** 3;

/** Where one blob sits in the window. */
export interface WindowMapping {
  offset: number;
  /** Bytes installed (the backend's mapping size rounded up to whole pages). */
  size: number;
}

/** A blob the backend mapped and the mapper installed; `mapInfo` is what OK_MAP_INFO answers. */
export interface InstalledBlob extends WindowMapping {
  mapInfo: number;
}

export class HostVisibleWindow {
  /** Bytes of the window (what the transport offers as shared-memory region 1). */
  readonly size: number;
  #mapper: SharedMemoryMapper | undefined;
  /** Live mappings by offset. */
  readonly #mappings = new Map<number, { resourceId: number; size: number }>();

  constructor(size: number) {
    if (!Number.isSafeInteger(size) || size <= 0 || size % HOST_PAGE_SIZE !== 0) {
      throw new Error(`gpu: host-visible window of ${size} bytes is not a positive multiple of ${HOST_PAGE_SIZE}`);
    }
    this.size = size;
  }

  /** The VMM's mapper (given by the transport before activation). */
  setMapper(mapper: SharedMemoryMapper): void {
    this.#mapper = mapper;
  }

  /** True when a mapper was given: without one there is nowhere to map blobs. */
  get hasMapper(): boolean {
    return this.#mapper !== undefined;
  }

  /**
   * RESOURCE_MAP_BLOB of `resourceId` (a blob of `blobSize` bytes) at `offset`: checks the offset, has the
   * backend map the blob, installs it through the mapper. Throws ProtocolError, with nothing left mapped.
   */
  map(backend: GpuBackend, resourceId: number, blobSize: number, offset64: bigint): InstalledBlob {
    const mapper = this.#mapper;
    if (!mapper) throw new Error("host-visible window without a mapper");
    if (offset64 >= BigInt(this.size) || offset64 % BigInt(HOST_PAGE_SIZE) !== 0n) {
      throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `map offset 0x${offset64.toString(16)} outside the window`);
    }
    const offset = Number(offset64);
    // Check the window with the blob's own size before asking the backend to map anything.
    const want = roundUp(blobSize, HOST_PAGE_SIZE);
    this.#checkFree(offset, want);
    const m = backend.mapResource(resourceId);
    const size = roundUp(Math.max(m.size, 1), HOST_PAGE_SIZE);
    try {
      if (m.hostAddr % BigInt(HOST_PAGE_SIZE) !== 0n) {
        // A memory slot starts on a host page: a blob that does not cannot be shown to the guest in place.
        throw new Error(`its host memory at 0x${m.hostAddr.toString(16)} does not start on a page`);
      }
      if (size !== want) this.#checkFree(offset, size);
      mapper.addMapping(VIRTIO_GPU_SHM_ID_HOST_VISIBLE, offset, m.hostAddr, size, true);
    } catch (e) {
      backend.unmapResource(resourceId);
      if (e instanceof ProtocolError) throw e;
      throw new ProtocolError(
        RESP_ERR_OUT_OF_MEMORY,
        `mapping resource ${resourceId} (0x${m.hostAddr.toString(16)}, ${m.size} bytes) failed: ${
          e instanceof Error ? e.message : e
        }`,
      );
    }
    this.#mappings.set(offset, { resourceId, size });
    return { offset, size, mapInfo: m.mapInfo };
  }

  /** Removes the mapping at `m.offset` from the window, then has the backend unmap `resourceId`. */
  unmap(backend: GpuBackend, resourceId: number, m: WindowMapping): void {
    try {
      this.#mapper?.removeMapping(VIRTIO_GPU_SHM_ID_HOST_VISIBLE, m.offset);
    } finally {
      this.#mappings.delete(m.offset);
      backend.unmapResource(resourceId);
    }
  }

  /** Forget every mapping (device reset, after each was unmapped or its resource destroyed). */
  clear(): void {
    this.#mappings.clear();
  }

  /** Throws unless [offset, offset+size) is inside the window and overlaps no mapping. */
  #checkFree(offset: number, size: number): void {
    if (offset + size > this.size) {
      throw new ProtocolError(
        RESP_ERR_INVALID_PARAMETER,
        `map at 0x${offset.toString(16)} + ${size} runs past the ${this.size}-byte window`,
      );
    }
    for (const [o, m] of this.#mappings) {
      if (offset < o + m.size && o < offset + size) {
        throw new ProtocolError(
          RESP_ERR_INVALID_PARAMETER,
          `map at 0x${offset.toString(16)} + ${size} overlaps resource ${m.resourceId} at 0x${o.toString(16)}`,
        );
      }
    }
  }
}

function roundUp(n: number, align: number): number {
  return Math.ceil(n / align) * align;
}
