// The pure TypeScript 2D backend: host copies of 2D resources in the virtio_gpu_formats formats, filled
// by TRANSFER_TO_HOST_2D from the guest backing pages (through GuestMemory), and GUEST blobs that are
// read straight from guest pages for SET_SCANOUT_BLOB. No 3D, no capsets, no host blobs. Fences retire
// at once (every command is finished when it returns).

import {
  type Backing,
  type BlobLayout,
  type CapsetInfo,
  type Create2D,
  type Create3D,
  type CreateBlob,
  type FenceHandler,
  type FenceTimeline,
  type GpuBackend,
  GpuBackendError,
  type MappedBlob,
  type Rect,
  type Transfer,
} from "./backend.ts";
import { isVirtioGpuFormat, toBgra, VIRTIO_GPU_BYTES_PER_PIXEL } from "./formats.ts";
import {
  RESP_ERR_INVALID_PARAMETER,
  RESP_ERR_INVALID_RESOURCE_ID,
  RESP_ERR_OUT_OF_MEMORY,
  RESP_ERR_UNSPEC,
  VIRTIO_GPU_BLOB_MEM_GUEST,
} from "./protocol.ts";

const BPP = VIRTIO_GPU_BYTES_PER_PIXEL;

/** Largest host copy of one 2D resource (16384 x 16384 x 4 = 1 GiB: what crosvm's 2D backend allows). */
export const MAX_2D_RESOURCE_BYTES = 1 << 30;

/**
 * Host memory all 2D resources may hold together (QEMU's virtio-gpu `max_hostmem` default, 256 MiB): without
 * a total, a guest creating resource after resource would grow the VMM without bound.
 */
export const MAX_2D_HOST_BYTES = 256 << 20;

interface Resource2D {
  kind: "2d";
  format: number;
  width: number;
  height: number;
  /** The host copy, width * height * 4 bytes. */
  pixels: Uint8Array;
  backing?: BackingReader;
}

interface GuestBlob {
  kind: "blob";
  size: number;
  backing: BackingReader;
}

/** Reads and writes byte ranges of a resource's backing (guest pages, in order). */
export class BackingReader {
  readonly #starts: number[] = [];
  constructor(readonly backing: Backing) {
    let off = 0;
    for (const e of backing.entries) {
      this.#starts.push(off);
      off += e.len;
    }
  }

  get size(): number {
    return this.backing.size;
  }

  /** Copy `len` bytes at backing offset `off` into dst[dstOff..]. */
  read(off: number, dst: Uint8Array, dstOff: number, len: number): void {
    this.#walk(off, len, (addr, n, done) => dst.set(this.backing.mem.slice(addr, n), dstOff + done));
  }

  /** Copy `len` bytes from src[srcOff..] to backing offset `off`. */
  write(off: number, src: Uint8Array, srcOff: number, len: number): void {
    this.#walk(
      off,
      len,
      (addr, n, done) => this.backing.mem.write(addr, src.subarray(srcOff + done, srcOff + done + n)),
    );
  }

  #walk(off: number, len: number, f: (guestAddr: number, n: number, done: number) => void): void {
    if (off < 0 || len < 0 || off + len > this.size) {
      throw new GpuBackendError(RESP_ERR_INVALID_PARAMETER, `backing range ${off}+${len} beyond ${this.size} bytes`);
    }
    const entries = this.backing.entries;
    // Binary search the entry holding `off`.
    let lo = 0, hi = entries.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (this.#starts[mid] <= off) lo = mid;
      else hi = mid - 1;
    }
    let done = 0;
    for (let i = lo; done < len && i < entries.length; i++) {
      const e = entries[i];
      const inEntry = off + done - this.#starts[i];
      if (inEntry >= e.len) continue;
      const n = Math.min(e.len - inEntry, len - done);
      f(e.guestAddr + inEntry, n, done);
      done += n;
    }
  }
}

export class Backend2D implements GpuBackend {
  readonly name: string = "2d";
  readonly supportsVirgl: boolean = false;
  readonly supportsHostBlobs: boolean = false;
  protected readonly resources = new Map<number, Resource2D | GuestBlob>();
  /** Bytes the 2D resources' host copies hold together. */
  #hostBytes = 0;
  #fenceHandler: FenceHandler | null = null;

  capsets(): CapsetInfo[] {
    return [];
  }
  getCapset(id: number, _version: number): Uint8Array {
    throw new GpuBackendError(RESP_ERR_INVALID_PARAMETER, `2d backend has no capset ${id}`);
  }

  createResource2D(a: Create2D): void {
    if (!isVirtioGpuFormat(a.format)) {
      throw new GpuBackendError(RESP_ERR_INVALID_PARAMETER, `unknown 2D format ${a.format}`);
    }
    const bytes = a.width * a.height * BPP;
    if (a.width === 0 || a.height === 0 || bytes > MAX_2D_RESOURCE_BYTES) {
      throw new GpuBackendError(RESP_ERR_OUT_OF_MEMORY, `2D resource ${a.width}x${a.height} refused`);
    }
    if (this.#hostBytes + bytes > MAX_2D_HOST_BYTES) {
      throw new GpuBackendError(
        RESP_ERR_OUT_OF_MEMORY,
        `2D resource ${a.width}x${a.height} refused: 2D resources hold ${this.#hostBytes} of ${MAX_2D_HOST_BYTES} bytes`,
      );
    }
    this.destroyResource(a.resourceId);
    this.#hostBytes += bytes;
    this.resources.set(a.resourceId, {
      kind: "2d",
      format: a.format,
      width: a.width,
      height: a.height,
      pixels: new Uint8Array(bytes),
    });
  }

  createResource3D(_a: Create3D): void {
    throw new GpuBackendError(RESP_ERR_UNSPEC, "2d backend has no 3D resources");
  }

  createBlob(a: CreateBlob): void {
    if (a.blobMem !== VIRTIO_GPU_BLOB_MEM_GUEST || !a.backing) {
      throw new GpuBackendError(RESP_ERR_INVALID_PARAMETER, `2d backend only has GUEST blobs (blob_mem ${a.blobMem})`);
    }
    this.destroyResource(a.resourceId);
    this.resources.set(a.resourceId, { kind: "blob", size: a.size, backing: new BackingReader(a.backing) });
  }

  destroyResource(id: number): void {
    const r = this.resources.get(id);
    if (r?.kind === "2d") this.#hostBytes -= r.pixels.length;
    this.resources.delete(id);
  }

  /** Bytes the 2D resources' host copies hold together. */
  get hostBytes(): number {
    return this.#hostBytes;
  }

  attachBacking(id: number, backing: Backing): void {
    const r = this.#get(id);
    if (r.kind !== "2d") throw new GpuBackendError(RESP_ERR_INVALID_PARAMETER, `resource ${id} is a blob`);
    r.backing = new BackingReader(backing);
  }

  detachBacking(id: number): void {
    const r = this.#get(id);
    if (r.kind === "2d") r.backing = undefined;
  }

  transferToHost(t: Transfer): void {
    const r = this.#get(t.resourceId);
    if (r.kind !== "2d") return; // A GUEST blob is the guest's memory: nothing to copy.
    if (!r.backing) throw new GpuBackendError(RESP_ERR_UNSPEC, `resource ${t.resourceId} has no backing`);
    const { x, y, w, h } = t.box;
    if (x + w > r.width || y + h > r.height) {
      throw new GpuBackendError(RESP_ERR_INVALID_PARAMETER, `box outside resource ${t.resourceId}`);
    }
    const stride = t.stride || r.width * BPP;
    const row = w * BPP;
    if (x === 0 && w === r.width && stride === row) {
      // Whole rows, packed: one copy per backing entry.
      r.backing.read(t.offset, r.pixels, y * row, h * row);
      return;
    }
    for (let i = 0; i < h; i++) {
      r.backing.read(t.offset + i * stride, r.pixels, ((y + i) * r.width + x) * BPP, row);
    }
  }

  transferFromHost(t: Transfer): void {
    const r = this.#get(t.resourceId);
    if (r.kind !== "2d") return;
    if (!r.backing) throw new GpuBackendError(RESP_ERR_UNSPEC, `resource ${t.resourceId} has no backing`);
    const { x, y, w, h } = t.box;
    if (x + w > r.width || y + h > r.height) {
      throw new GpuBackendError(RESP_ERR_INVALID_PARAMETER, `box outside resource ${t.resourceId}`);
    }
    const stride = t.stride || r.width * BPP;
    for (let i = 0; i < h; i++) {
      r.backing.write(t.offset + i * stride, r.pixels, ((y + i) * r.width + x) * BPP, w * BPP);
    }
  }

  createContext(ctxId: number): void {
    throw new GpuBackendError(RESP_ERR_UNSPEC, `2d backend has no contexts (ctx ${ctxId})`);
  }
  destroyContext(_ctxId: number): void {}
  attachResource(_ctxId: number, _resourceId: number): void {}
  detachResource(_ctxId: number, _resourceId: number): void {}
  submit3D(_ctxId: number, _commands: Uint8Array): void {
    throw new GpuBackendError(RESP_ERR_UNSPEC, "2d backend cannot run 3D commands");
  }

  setFenceHandler(handler: FenceHandler): void {
    this.#fenceHandler = handler;
  }
  createFence(timeline: FenceTimeline, fenceId: bigint): void {
    this.#fenceHandler?.(timeline, fenceId);
  }

  mapResource(id: number): MappedBlob {
    throw new GpuBackendError(RESP_ERR_INVALID_PARAMETER, `2d backend cannot map resource ${id}`);
  }
  unmapResource(id: number): void {
    throw new GpuBackendError(RESP_ERR_INVALID_PARAMETER, `resource ${id} is not mapped`);
  }

  readPixels(id: number, rect: Rect, layout?: BlobLayout): Uint8Array {
    const r = this.#get(id);
    const out = new Uint8Array(rect.width * rect.height * BPP);
    if (r.kind === "2d") {
      if (rect.x + rect.width > r.width || rect.y + rect.height > r.height) {
        throw new GpuBackendError(RESP_ERR_INVALID_PARAMETER, `rect outside resource ${id}`);
      }
      for (let i = 0; i < rect.height; i++) {
        toBgra(r.format, r.pixels, ((rect.y + i) * r.width + rect.x) * BPP, out, i * rect.width * BPP, rect.width);
      }
      return out;
    }
    if (!layout || !isVirtioGpuFormat(layout.format)) {
      throw new GpuBackendError(RESP_ERR_INVALID_PARAMETER, `blob ${id} read without an image layout`);
    }
    const row = new Uint8Array(rect.width * BPP);
    for (let i = 0; i < rect.height; i++) {
      r.backing.read(layout.offset + (rect.y + i) * layout.stride + rect.x * BPP, row, 0, row.length);
      toBgra(layout.format, row, 0, out, i * row.length, rect.width);
    }
    return out;
  }

  hostContents(id: number): Uint8Array {
    const r = this.#get(id);
    if (r.kind !== "2d") throw new GpuBackendError(RESP_ERR_INVALID_PARAMETER, `resource ${id} is a blob`);
    return r.pixels.slice();
  }

  restoreHostContents(id: number, contents: Uint8Array): void {
    const r = this.#get(id);
    if (r.kind !== "2d" || contents.length !== r.pixels.length) {
      throw new GpuBackendError(RESP_ERR_INVALID_PARAMETER, `${contents.length} bytes do not fit resource ${id}`);
    }
    r.pixels.set(contents);
  }

  close(): void {
    this.resources.clear();
    this.#hostBytes = 0;
  }

  #get(id: number): Resource2D | GuestBlob {
    const r = this.resources.get(id);
    if (!r) throw new GpuBackendError(RESP_ERR_INVALID_RESOURCE_ID, `no resource ${id} in the 2d backend`);
    return r;
  }
}
