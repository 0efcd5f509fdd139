// The virtio-gpu command executor: runs one decoded command (protocol.ts) against the backend and answers
// it. It owns what the guest can name: resources, 3D contexts, the cursor, and through the display the
// scanouts. Every id, size, rectangle, box and backing page is checked here before the backend sees it
// (the backend contract in backend.ts relies on that); a failure is a ProtocolError carrying the response
// code, which the device turns into the answer and one log line. Blob mappings go through the
// host-visible window (window.ts); copies are counted in the accounting (accounting.ts).

import type { GuestMemory } from "../../../core/memory.ts";
import { StateError } from "../../../core/state.ts";
import { boxBytes, type GpuAccounting, type ResourceShape, walkVirglStream } from "./accounting.ts";
import type { Backing, BackingEntry, BlobLayout, Box, GpuBackend, Rect } from "./backend.ts";
import { type DisplayConfig, type HeadlessDisplay, makeEdid } from "./display.ts";
import {
  isVirtioGpuFormat,
  PIPE_BUFFER,
  PIPE_TEXTURE_2D,
  virglBytesPerPixel,
  VIRTIO_GPU_BYTES_PER_PIXEL,
} from "./formats.ts";
import {
  type Command,
  commandName,
  type CtrlHdr,
  type CursorFields,
  type MemEntry,
  ProtocolError,
  RESP_ERR_INVALID_CONTEXT_ID,
  RESP_ERR_INVALID_PARAMETER,
  RESP_ERR_INVALID_RESOURCE_ID,
  RESP_ERR_INVALID_SCANOUT_ID,
  RESP_ERR_UNSPEC,
  RESP_OK_NODATA,
  respCapset,
  respCapsetInfo,
  respDisplayInfo,
  respEdid,
  respMapInfo,
  responseHeader,
  respUuid,
  VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE,
  VIRTIO_GPU_BLOB_MEM_GUEST,
  VIRTIO_GPU_BLOB_MEM_HOST3D,
  VIRTIO_GPU_BLOB_MEM_HOST3D_GUEST,
  VIRTIO_GPU_CAPSET_VIRGL2,
  VIRTIO_GPU_CONTEXT_INIT_CAPSET_ID_MASK,
  VIRTIO_GPU_F_CONTEXT_INIT,
  VIRTIO_GPU_F_RESOURCE_BLOB,
  VIRTIO_GPU_F_VIRGL,
} from "./protocol.ts";
import type { GuestRange, SavedResource, SavedScanout } from "./state.ts";
import type { HostVisibleWindow, WindowMapping } from "./window.ts";

const BPP = VIRTIO_GPU_BYTES_PER_PIXEL;
/** Byte of the 16-byte RESOURCE_ASSIGN_UUID answer where the resource id goes (big-endian u32). */
const UUID_RESOURCE_ID_OFFSET = 12;
/** Bytes of a resource UUID (struct virtio_gpu_resp_resource_uuid). */
const UUID_SIZE = 16;
/** Largest shift of a mip level: sizes are u32. */
const MAX_LEVEL_SHIFT = 31;

/** What saveState answers when the renderer holds state it cannot export. */
export const GPU_3D_NOT_SAVABLE = "virtio-gpu: 3D contexts (virglrenderer) cannot be saved";

/** A response and what to count for it. */
export interface Outcome {
  resp: Uint8Array;
  /** The resource the command was about (0: none), for the per-resource counters. */
  resource: number;
  /** Bytes the command copied. */
  bytes: number;
}

/** The cursor as UPDATE_CURSOR / MOVE_CURSOR last set it. */
export type Cursor = CursorFields;

interface ResourceState {
  id: number;
  kind: "2d" | "3d" | "blob";
  shape?: ResourceShape;
  width: number;
  height: number;
  depth: number;
  arraySize: number;
  backing?: Backing;
  /** Restored backing pages, attached once guest memory is known (activate). */
  pendingBacking?: GuestRange[];
  blobMem?: number;
  blobFlags?: number;
  blobId?: bigint;
  size?: number;
  mapped?: WindowMapping;
  contexts: Set<number>;
}

interface ContextState {
  id: number;
  capsetId: number;
  name: string;
  resources: Set<number>;
  /** PIPE_RESOURCE_CREATE seen in this context's streams, by blob_id (gives HOST3D blobs a shape). */
  streamShapes: Map<number, ResourceShape & { width: number; height: number }>;
}

export interface ExecutorOptions {
  backend: GpuBackend;
  display: HeadlessDisplay;
  accounting: GpuAccounting;
  window: HostVisibleWindow;
  /** One mode per scanout. */
  modes: readonly DisplayConfig[];
  /** Logs one guest error (rate limited by the caller). */
  guestError: (msg: string) => void;
}

export class GpuExecutor {
  readonly #backend: GpuBackend;
  readonly #display: HeadlessDisplay;
  readonly #accounting: GpuAccounting;
  readonly #window: HostVisibleWindow;
  readonly #modes: readonly DisplayConfig[];
  readonly #guestError: (msg: string) => void;
  #mem: GuestMemory | undefined;
  #acked = 0n;
  readonly #resources = new Map<number, ResourceState>();
  readonly #contexts = new Map<number, ContextState>();
  #cursor: Cursor | null = null;

  constructor(opts: ExecutorOptions) {
    this.#backend = opts.backend;
    this.#display = opts.display;
    this.#accounting = opts.accounting;
    this.#window = opts.window;
    this.#modes = opts.modes;
    this.#guestError = opts.guestError;
  }

  /** DRIVER_OK: the guest memory backing pages point into and the negotiated features. */
  activate(mem: GuestMemory, ackedFeatures: bigint): void {
    this.#mem = mem;
    this.#acked = ackedFeatures;
    this.#attachRestoredBackings(false);
  }

  /** Device reset: no guest memory, no features until the next activation. */
  deactivate(): void {
    this.#mem = undefined;
    this.#acked = 0n;
  }

  /** The cursor as the guest last set it, or null. */
  get cursor(): Readonly<Cursor> | null {
    return this.#cursor;
  }

  hasResource(id: number): boolean {
    return this.#resources.has(id);
  }

  hasContext(id: number): boolean {
    return this.#contexts.has(id);
  }

  /** True when no resource or context exists (a device that can take a saved state). */
  get empty(): boolean {
    return this.#resources.size === 0 && this.#contexts.size === 0 && this.#cursor === null;
  }

  /** Run one command; throws ProtocolError or GpuBackendError for the guest's mistakes. */
  execute(cmd: Command): Outcome {
    const h = cmd.hdr;
    const ok = (resource = 0, bytes = 0): Outcome => ({ resp: responseHeader(RESP_OK_NODATA, h), resource, bytes });
    switch (cmd.kind) {
      case "get_display_info":
        return {
          resp: respDisplayInfo(h, this.#modes.map((m) => ({ ...m, enabled: true }))),
          resource: 0,
          bytes: 0,
        };
      case "get_edid": {
        const m = this.#modes[cmd.scanout];
        if (!m) throw new ProtocolError(RESP_ERR_INVALID_SCANOUT_ID, `EDID of scanout ${cmd.scanout}`);
        return { resp: respEdid(h, makeEdid(m.width, m.height)), resource: 0, bytes: 0 };
      }
      case "resource_create_2d": {
        this.#checkNewId(cmd.resourceId);
        if (!isVirtioGpuFormat(cmd.format)) {
          throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `unknown format ${cmd.format}`);
        }
        if (cmd.width === 0 || cmd.height === 0) {
          throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `size ${cmd.width}x${cmd.height}`);
        }
        this.#backend.createResource2D(cmd);
        this.#add2D(cmd.resourceId, cmd.format, cmd.width, cmd.height);
        return ok(cmd.resourceId);
      }
      case "resource_unref": {
        const r = this.#res(cmd.resourceId);
        this.#destroyResource(r);
        return ok(cmd.resourceId);
      }
      case "set_scanout": {
        this.#scanoutId(cmd.scanoutId);
        if (cmd.resourceId === 0) {
          this.#display.setScanout(cmd.scanoutId, null);
          return ok();
        }
        const r = this.#res(cmd.resourceId);
        if (r.kind === "blob") {
          throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `resource ${r.id} is a blob: use SET_SCANOUT_BLOB`);
        }
        this.#rectInside(cmd.rect, r.width, r.height, `scanout rect of resource ${r.id}`);
        this.#display.setScanout(cmd.scanoutId, { resourceId: r.id, rect: cmd.rect });
        return ok(r.id);
      }
      case "set_scanout_blob": {
        this.#scanoutId(cmd.scanoutId);
        if (cmd.resourceId === 0) {
          this.#display.setScanout(cmd.scanoutId, null);
          return ok();
        }
        const r = this.#res(cmd.resourceId);
        if (r.kind !== "blob") throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `resource ${r.id} is not a blob`);
        const layout: BlobLayout = {
          format: cmd.format,
          width: cmd.width,
          height: cmd.height,
          stride: cmd.strides[0],
          offset: cmd.offsets[0],
        };
        checkBlobLayout(layout, r.id, r.size ?? 0, (code, msg) => new ProtocolError(code, msg));
        this.#rectInside(cmd.rect, layout.width, layout.height, `scanout rect of blob ${r.id}`);
        this.#display.setScanout(cmd.scanoutId, { resourceId: r.id, rect: cmd.rect, layout });
        return ok(r.id);
      }
      case "resource_flush": {
        const r = this.#res(cmd.resourceId);
        for (const s of this.#display.scanoutsOf(r.id)) {
          const src = this.#display.source(s)!;
          const lim = src.layout ?? r;
          this.#rectInside(cmd.rect, lim.width, lim.height, `flush rect of resource ${r.id}`);
          // Damage only: the display reads the pixels back when a consumer looks (display.ts).
          const res = this.#display.flush(s, cmd.rect);
          // A blob scanout is shown from the blob's memory: the guest needed no transfer for these bytes.
          if (src.layout) this.#accounting.avoided(r.id, res.bytes);
        }
        return ok(r.id);
      }
      case "transfer_to_host_2d": {
        const r = this.#res(cmd.resourceId);
        this.#notMapped(r);
        if (r.kind === "blob") return ok(r.id); // GUEST blob: the data is already where the host reads it.
        if (r.kind !== "2d") throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `resource ${r.id} is not 2D`);
        this.#rectInside(cmd.rect, r.width, r.height, `transfer rect of resource ${r.id}`);
        const offset = this.#offset(cmd.offset);
        const stride = r.width * BPP;
        const box: Box = { x: cmd.rect.x, y: cmd.rect.y, z: 0, w: cmd.rect.width, h: cmd.rect.height, d: 1 };
        this.#backingCovers(r, offset, stride, 0, box, BPP);
        this.#backend.transferToHost({ resourceId: r.id, ctxId: 0, box, offset, level: 0, stride, layerStride: 0 });
        const bytes = box.w * box.h * BPP;
        this.#accounting.copy("transferToHostBytes", bytes, r.id, 0);
        return ok(r.id, bytes);
      }
      case "attach_backing": {
        const r = this.#res(cmd.resourceId);
        if (r.kind === "blob") throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `resource ${r.id} is a blob`);
        if (r.backing) throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `resource ${r.id} already has backing`);
        const backing = this.#backing(cmd.entries);
        this.#backend.attachBacking(r.id, backing);
        r.backing = backing;
        return ok(r.id);
      }
      case "detach_backing": {
        const r = this.#res(cmd.resourceId);
        if (!r.backing || r.kind === "blob") {
          throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `resource ${r.id} has no backing to detach`);
        }
        this.#backend.detachBacking(r.id);
        r.backing = undefined;
        return ok(r.id);
      }
      case "get_capset_info": {
        const caps = this.#backend.supportsVirgl ? this.#backend.capsets() : [];
        const c = caps[cmd.capsetIndex];
        if (!c) {
          throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `capset index ${cmd.capsetIndex} of ${caps.length}`);
        }
        return { resp: respCapsetInfo(h, c.id, c.maxVersion, c.maxSize), resource: 0, bytes: 0 };
      }
      case "get_capset": {
        const caps = this.#backend.supportsVirgl ? this.#backend.capsets() : [];
        const c = caps.find((c) => c.id === cmd.capsetId);
        if (!c || cmd.capsetVersion > c.maxVersion) {
          throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `capset ${cmd.capsetId} version ${cmd.capsetVersion}`);
        }
        return { resp: respCapset(h, this.#backend.getCapset(c.id, cmd.capsetVersion)), resource: 0, bytes: 0 };
      }
      case "assign_uuid": {
        const r = this.#res(cmd.resourceId);
        const uuid = new Uint8Array(UUID_SIZE);
        new DataView(uuid.buffer).setUint32(UUID_RESOURCE_ID_OFFSET, r.id, false);
        return { resp: respUuid(h, uuid), resource: r.id, bytes: 0 };
      }
      case "resource_create_blob":
        return this.#createBlob(cmd);
      case "resource_map_blob":
        return this.#mapBlob(cmd.hdr, cmd.resourceId, cmd.offset);
      case "resource_unmap_blob": {
        const r = this.#res(cmd.resourceId);
        if (!r.mapped) throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `resource ${r.id} is not mapped`);
        this.#unmap(r);
        return ok(r.id);
      }
      case "update_cursor":
      case "move_cursor": {
        this.#scanoutId(cmd.scanoutId);
        if (cmd.kind === "update_cursor" && cmd.resourceId !== 0) this.#res(cmd.resourceId);
        const prev = this.#cursor;
        this.#cursor = cmd.kind === "update_cursor"
          ? { scanoutId: cmd.scanoutId, x: cmd.x, y: cmd.y, resourceId: cmd.resourceId, hotX: cmd.hotX, hotY: cmd.hotY }
          : { ...(prev ?? { resourceId: 0, hotX: 0, hotY: 0 }), scanoutId: cmd.scanoutId, x: cmd.x, y: cmd.y };
        return ok(cmd.resourceId);
      }
    }
    // 3D commands need VIRGL.
    if (!(this.#acked & VIRTIO_GPU_F_VIRGL) || !this.#backend.supportsVirgl) {
      throw new ProtocolError(RESP_ERR_UNSPEC, `${commandName(h.type)} without VIRTIO_GPU_F_VIRGL`);
    }
    switch (cmd.kind) {
      case "ctx_create": {
        if (h.ctxId === 0 || this.#contexts.has(h.ctxId)) {
          throw new ProtocolError(RESP_ERR_INVALID_CONTEXT_ID, `context id ${h.ctxId} is 0 or in use`);
        }
        const capsetId = this.#acked & VIRTIO_GPU_F_CONTEXT_INIT
          ? cmd.contextInit & VIRTIO_GPU_CONTEXT_INIT_CAPSET_ID_MASK
          : 0;
        if (capsetId !== 0 && !this.#backend.capsets().some((c) => c.id === capsetId)) {
          throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `context ${h.ctxId}: capset ${capsetId} not offered`);
        }
        this.#backend.createContext(h.ctxId, capsetId, cmd.name);
        this.#contexts.set(h.ctxId, {
          id: h.ctxId,
          capsetId,
          name: cmd.name,
          resources: new Set(),
          streamShapes: new Map(),
        });
        this.#accounting.contextCreated(h.ctxId);
        return ok();
      }
      case "ctx_destroy": {
        const c = this.#ctx(h.ctxId);
        this.#destroyContext(c);
        return ok();
      }
      case "ctx_attach_resource": {
        const c = this.#ctx(h.ctxId);
        const r = this.#res(cmd.resourceId);
        this.#backend.attachResource(c.id, r.id);
        c.resources.add(r.id);
        r.contexts.add(c.id);
        return ok(r.id);
      }
      case "ctx_detach_resource": {
        const c = this.#ctx(h.ctxId);
        const r = this.#res(cmd.resourceId);
        if (!c.resources.has(r.id)) {
          throw new ProtocolError(RESP_ERR_INVALID_RESOURCE_ID, `resource ${r.id} is not attached to context ${c.id}`);
        }
        this.#backend.detachResource(c.id, r.id);
        c.resources.delete(r.id);
        r.contexts.delete(c.id);
        return ok(r.id);
      }
      case "resource_create_3d": {
        this.#checkNewId(cmd.resourceId);
        if (cmd.width === 0 || cmd.height === 0 || cmd.depth === 0) {
          throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `size ${cmd.width}x${cmd.height}x${cmd.depth}`);
        }
        this.#backend.createResource3D(cmd);
        this.#addResource({
          id: cmd.resourceId,
          kind: "3d",
          shape: { target: cmd.target, format: cmd.format },
          width: cmd.width,
          height: cmd.height,
          depth: cmd.depth,
          arraySize: Math.max(cmd.arraySize, 1),
          contexts: new Set(),
        });
        return ok(cmd.resourceId);
      }
      case "transfer_to_host_3d":
      case "transfer_from_host_3d": {
        const toHost = cmd.kind === "transfer_to_host_3d";
        const r = this.#res(cmd.resourceId);
        this.#notMapped(r);
        if (h.ctxId !== 0) this.#ctx(h.ctxId);
        const offset = this.#offset(cmd.offset);
        const shift = Math.min(cmd.level, MAX_LEVEL_SHIFT);
        const lw = Math.max(1, r.width >>> shift);
        const lh = r.shape?.target === PIPE_BUFFER ? 1 : Math.max(1, r.height >>> shift);
        const ld = Math.max(r.depth >>> shift, r.arraySize, 1);
        const b = cmd.box;
        if (r.kind !== "blob" && (b.x + b.w > lw || b.y + b.h > lh || b.z + b.d > ld)) {
          throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `box outside resource ${r.id} level ${cmd.level}`);
        }
        const bytes = boxBytes(b, r.shape, cmd.stride);
        const bpp = r.shape?.target === PIPE_BUFFER ? 1 : virglBytesPerPixel(r.shape?.format ?? -1) ?? 1;
        if (r.backing) this.#backingCovers(r, offset, cmd.stride, cmd.layerStride, b, bpp);
        else if (r.kind !== "blob") throw new ProtocolError(RESP_ERR_UNSPEC, `resource ${r.id} has no backing`);
        const t = {
          resourceId: r.id,
          ctxId: h.ctxId,
          box: b,
          offset,
          level: cmd.level,
          stride: cmd.stride,
          layerStride: cmd.layerStride,
        };
        if (toHost) this.#backend.transferToHost(t);
        else this.#backend.transferFromHost(t);
        this.#accounting.copy(
          toHost ? "transferToHostBytes" : "transferFromHostBytes",
          bytes.bytes,
          r.id,
          h.ctxId,
          bytes.estimated,
        );
        return ok(r.id, bytes.bytes);
      }
      case "submit_3d": {
        const c = this.#ctx(h.ctxId);
        let bytes = 0;
        if (c.capsetId <= VIRTIO_GPU_CAPSET_VIRGL2) {
          // virgl / virgl2 streams (capset 0: a context made without CONTEXT_INIT): count the copies they
          // encode (the bytes are not changed).
          const walk = walkVirglStream(cmd.commands, (id) => this.#resources.get(id)?.shape);
          const streams = this.#accounting.streams;
          streams.submits++;
          streams.virglCommands += walk.commands;
          streams.streamBytes += cmd.commands.length;
          if (walk.truncated) streams.truncated++;
          for (const cp of walk.copies) {
            const res = this.#resources.has(cp.resourceId) ? cp.resourceId : 0;
            this.#accounting.copy(cp.kind, cp.bytes, res, c.id, cp.estimated);
            bytes += cp.bytes;
          }
          for (const cr of walk.creates) {
            c.streamShapes.set(cr.blobId, { target: cr.target, format: cr.format, width: cr.width, height: cr.height });
          }
        }
        this.#backend.submit3D(c.id, cmd.commands);
        return ok(0, bytes);
      }
    }
    throw new ProtocolError(RESP_ERR_UNSPEC, `unhandled command ${commandName(h.type)}`);
  }

  #createBlob(cmd: Extract<Command, { kind: "resource_create_blob" }>): Outcome {
    const h = cmd.hdr;
    if (!(this.#acked & VIRTIO_GPU_F_RESOURCE_BLOB)) {
      throw new ProtocolError(RESP_ERR_UNSPEC, "RESOURCE_CREATE_BLOB without VIRTIO_GPU_F_RESOURCE_BLOB");
    }
    this.#checkNewId(cmd.resourceId);
    if (cmd.size === 0n || cmd.size > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `blob size ${cmd.size}`);
    }
    const size = Number(cmd.size);
    let backing: Backing | undefined;
    let shape: (ResourceShape & { width: number; height: number }) | undefined;
    switch (cmd.blobMem) {
      case VIRTIO_GPU_BLOB_MEM_GUEST:
        if (cmd.entries.length === 0) throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, "GUEST blob without pages");
        break;
      case VIRTIO_GPU_BLOB_MEM_HOST3D:
      case VIRTIO_GPU_BLOB_MEM_HOST3D_GUEST: {
        if (!(this.#acked & VIRTIO_GPU_F_VIRGL) || !this.#backend.supportsHostBlobs) {
          throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `blob_mem ${cmd.blobMem}: no host blobs here`);
        }
        const c = this.#ctx(h.ctxId);
        if (cmd.blobMem === VIRTIO_GPU_BLOB_MEM_HOST3D && cmd.entries.length > 0) {
          throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, "HOST3D blob with guest pages");
        }
        if (cmd.blobId <= 0xffff_ffffn) shape = c.streamShapes.get(Number(cmd.blobId));
        break;
      }
      default:
        throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `blob_mem ${cmd.blobMem}`);
    }
    if (cmd.entries.length > 0) {
      backing = this.#backing(cmd.entries);
      if (backing.size < size) {
        throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `blob of ${size} bytes on ${backing.size} bytes of pages`);
      }
    }
    this.#backend.createBlob({
      resourceId: cmd.resourceId,
      ctxId: h.ctxId,
      blobMem: cmd.blobMem,
      blobFlags: cmd.blobFlags,
      blobId: cmd.blobId,
      size,
      backing,
    });
    this.#addResource({
      id: cmd.resourceId,
      kind: "blob",
      shape: shape ? { target: shape.target, format: shape.format } : undefined,
      width: shape?.width ?? size,
      height: shape?.height ?? 1,
      depth: 1,
      arraySize: 1,
      backing,
      blobMem: cmd.blobMem,
      blobFlags: cmd.blobFlags,
      blobId: cmd.blobId,
      size,
      contexts: new Set(),
    });
    if (h.ctxId && this.#contexts.has(h.ctxId) && cmd.blobMem !== VIRTIO_GPU_BLOB_MEM_GUEST) {
      // A host blob is created in its context (virglrenderer attaches it there).
      this.#contexts.get(h.ctxId)!.resources.add(cmd.resourceId);
      this.#resources.get(cmd.resourceId)!.contexts.add(h.ctxId);
    }
    return { resp: responseHeader(RESP_OK_NODATA, h), resource: cmd.resourceId, bytes: 0 };
  }

  #mapBlob(h: CtrlHdr, resourceId: number, offset: bigint): Outcome {
    if (!this.#window.hasMapper || !this.#backend.supportsHostBlobs || !(this.#acked & VIRTIO_GPU_F_RESOURCE_BLOB)) {
      throw new ProtocolError(RESP_ERR_UNSPEC, "RESOURCE_MAP_BLOB without a host-visible window");
    }
    const r = this.#res(resourceId);
    if (r.kind !== "blob" || !((r.blobFlags ?? 0) & VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE)) {
      throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `resource ${r.id} is not a mappable blob`);
    }
    if (r.mapped) throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `resource ${r.id} is already mapped`);
    const m = this.#window.map(this.#backend, r.id, r.size ?? 0, offset);
    r.mapped = { offset: m.offset, size: m.size };
    this.#accounting.mapBlob(r.id, h.ctxId, m.size);
    return { resp: respMapInfo(h, m.mapInfo), resource: r.id, bytes: 0 };
  }

  #unmap(r: ResourceState): void {
    const m = r.mapped;
    if (!m) return;
    try {
      this.#window.unmap(this.#backend, r.id, m);
    } finally {
      r.mapped = undefined;
      this.#accounting.unmapBlob(m.size);
    }
  }

  // ---- Validation helpers ----

  #checkNewId(id: number): void {
    if (id === 0) throw new ProtocolError(RESP_ERR_INVALID_RESOURCE_ID, "resource id 0");
    if (this.#resources.has(id)) throw new ProtocolError(RESP_ERR_INVALID_RESOURCE_ID, `resource ${id} exists`);
  }

  #res(id: number): ResourceState {
    const r = this.#resources.get(id);
    if (!r) throw new ProtocolError(RESP_ERR_INVALID_RESOURCE_ID, `no resource ${id}`);
    return r;
  }

  #ctx(id: number): ContextState {
    const c = this.#contexts.get(id);
    if (!c) throw new ProtocolError(RESP_ERR_INVALID_CONTEXT_ID, `no context ${id}`);
    return c;
  }

  #scanoutId(id: number): void {
    if (id >= this.#modes.length) throw new ProtocolError(RESP_ERR_INVALID_SCANOUT_ID, `no scanout ${id}`);
  }

  #rectInside(r: Rect, width: number, height: number, what: string): void {
    if (!rectInside(r, width, height)) {
      throw new ProtocolError(
        RESP_ERR_INVALID_PARAMETER,
        `${what}: ${r.width}x${r.height}+${r.x}+${r.y} outside ${width}x${height}`,
      );
    }
  }

  #notMapped(r: ResourceState): void {
    if (r.mapped) throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `transfer on mapped blob ${r.id}`);
  }

  #offset(o: bigint): number {
    if (o > BigInt(Number.MAX_SAFE_INTEGER)) throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `offset ${o}`);
    return Number(o);
  }

  /** Throws unless the backing holds every byte a transfer of `box` touches. */
  #backingCovers(r: ResourceState, offset: number, stride: number, layerStride: number, box: Box, bpp: number): void {
    if (box.w === 0 || box.h === 0 || box.d === 0) return;
    const row = box.w * bpp;
    const s = stride || row;
    const ls = layerStride || s * box.h;
    const end = offset + ls * (box.d - 1) + s * (box.h - 1) + row;
    if (!r.backing) throw new ProtocolError(RESP_ERR_UNSPEC, `resource ${r.id} has no backing`);
    if (!Number.isSafeInteger(end) || end > r.backing.size) {
      throw new ProtocolError(
        RESP_ERR_INVALID_PARAMETER,
        `transfer needs backing bytes up to ${end}, resource ${r.id} has ${r.backing.size}`,
      );
    }
  }

  /** Check guest pages (every entry inside guest RAM) and build a Backing. */
  #backing(entries: MemEntry[]): Backing {
    const mem = this.#mem;
    if (!mem) throw new ProtocolError(RESP_ERR_UNSPEC, "device not active");
    if (entries.length === 0) throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, "no memory entries");
    const out: BackingEntry[] = [];
    let size = 0;
    for (const [i, e] of entries.entries()) {
      if (e.length === 0) continue;
      const addr = e.addr > BigInt(Number.MAX_SAFE_INTEGER) ? -1 : Number(e.addr);
      if (addr < 0 || !mem.isValid(addr, e.length)) {
        throw new ProtocolError(
          RESP_ERR_INVALID_PARAMETER,
          `memory entry ${i}: 0x${e.addr.toString(16)} + ${e.length} is outside guest RAM`,
        );
      }
      out.push({ guestAddr: addr, len: e.length, hostAddr: mem.hostAddress(addr, e.length) });
      size += e.length;
    }
    if (size === 0) throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, "memory entries of 0 bytes");
    return { mem, entries: out, size };
  }

  // ---- Lifetime ----

  #addResource(r: ResourceState): void {
    this.#resources.set(r.id, r);
    this.#accounting.resourceCreated(r.id);
  }

  #add2D(id: number, format: number, width: number, height: number): ResourceState {
    const r: ResourceState = {
      id,
      kind: "2d",
      shape: { target: PIPE_TEXTURE_2D, format },
      width,
      height,
      depth: 1,
      arraySize: 1,
      contexts: new Set(),
    };
    this.#addResource(r);
    return r;
  }

  #destroyResource(r: ResourceState): void {
    if (r.mapped) this.#unmap(r);
    for (const s of this.#display.scanoutsOf(r.id)) this.#display.setScanout(s, null);
    if (this.#cursor?.resourceId === r.id) this.#cursor = { ...this.#cursor, resourceId: 0 };
    for (const c of r.contexts) {
      this.#contexts.get(c)?.resources.delete(r.id);
      this.#backend.detachResource(c, r.id);
    }
    if (r.backing && r.kind !== "blob") this.#backend.detachBacking(r.id);
    this.#backend.destroyResource(r.id);
    this.#resources.delete(r.id);
    this.#accounting.resourceGone(r.id);
  }

  #destroyContext(c: ContextState): void {
    for (const id of c.resources) {
      this.#resources.get(id)?.contexts.delete(c.id);
      this.#backend.detachResource(c.id, id);
    }
    this.#backend.destroyContext(c.id);
    this.#contexts.delete(c.id);
    this.#accounting.contextGone(c.id);
  }

  /** Device reset or close: unmap every blob, destroy every context and resource, clear the scanouts. */
  dropAll(): void {
    const safely = (f: () => void) => {
      try {
        f();
      } catch (e) {
        this.#guestError(`reset: ${e instanceof Error ? e.message : e}`);
      }
    };
    for (const r of [...this.#resources.values()]) safely(() => this.#destroyResource(r));
    for (const c of [...this.#contexts.values()]) safely(() => this.#destroyContext(c));
    this.#resources.clear();
    this.#contexts.clear();
    this.#window.clear();
    this.#cursor = null;
    for (let i = 0; i < this.#display.count; i++) this.#display.setScanout(i, null);
  }

  // ---- Saved state ----

  /**
   * The resources, scanouts and cursor as plain data. Throws StateError when the renderer holds state it
   * cannot export: a 3D context, a 3D resource, a host blob or a mapping.
   */
  save(): { resources: SavedResource[]; scanouts: SavedScanout[]; cursor: Cursor | null } {
    if (this.#contexts.size > 0) throw new StateError(GPU_3D_NOT_SAVABLE);
    const resources: SavedResource[] = [];
    for (const r of this.#resources.values()) {
      if (r.kind === "3d" || r.mapped || (r.kind === "blob" && r.blobMem !== VIRTIO_GPU_BLOB_MEM_GUEST)) {
        throw new StateError(GPU_3D_NOT_SAVABLE);
      }
      const backing = r.backing
        ? r.backing.entries.map((e) => ({ guestAddr: e.guestAddr, len: e.len }))
        : r.pendingBacking?.map((e) => ({ ...e })) ?? null;
      if (r.kind === "2d") {
        const contents = this.#backend.hostContents?.(r.id);
        if (!contents) throw new StateError(`virtio-gpu: the ${this.#backend.name} backend cannot save 2D resources`);
        resources.push({
          kind: "2d",
          id: r.id,
          format: r.shape!.format,
          width: r.width,
          height: r.height,
          backing,
          contents,
        });
      } else {
        resources.push({
          kind: "guest-blob",
          id: r.id,
          blobFlags: r.blobFlags ?? 0,
          blobId: r.blobId ?? 0n,
          size: r.size ?? 0,
          backing: backing ?? [],
        });
      }
    }
    const scanouts: SavedScanout[] = [];
    for (let i = 0; i < this.#display.count; i++) {
      const src = this.#display.source(i);
      // A snapshot looks at the screen: the framebuffer saved has every flushed rectangle.
      const fb = this.#display.refresh(i, "snapshot");
      scanouts.push({
        source: src
          ? { resourceId: src.resourceId, rect: { ...src.rect }, ...(src.layout ? { layout: { ...src.layout } } : {}) }
          : null,
        framebuffer: { width: fb.width, height: fb.height, bgra: fb.bgra.slice() },
      });
    }
    return { resources, scanouts, cursor: this.#cursor ? { ...this.#cursor } : null };
  }

  /**
   * Rebuild saved resources, scanouts and cursor (checked by state.ts) in a device that has none. Backing
   * pages are attached now when the device is active, else when it is activated and guest memory is known.
   */
  restore(saved: { resources: SavedResource[]; scanouts: SavedScanout[]; cursor: Cursor | null }): void {
    if (!this.empty) throw new StateError("virtio-gpu: restore into a device that already has resources");
    try {
      for (const s of saved.resources) {
        if (s.kind === "2d") {
          if (!this.#backend.restoreHostContents) {
            throw new StateError(`virtio-gpu: the ${this.#backend.name} backend cannot restore 2D resources`);
          }
          this.#backend.createResource2D({ resourceId: s.id, format: s.format, width: s.width, height: s.height });
          const r = this.#add2D(s.id, s.format, s.width, s.height);
          this.#backend.restoreHostContents(s.id, s.contents);
          if (s.backing) r.pendingBacking = s.backing.map((e) => ({ ...e }));
        } else {
          this.#addResource({
            id: s.id,
            kind: "blob",
            width: s.size,
            height: 1,
            depth: 1,
            arraySize: 1,
            pendingBacking: s.backing.map((e) => ({ ...e })),
            blobMem: VIRTIO_GPU_BLOB_MEM_GUEST,
            blobFlags: s.blobFlags,
            blobId: s.blobId,
            size: s.size,
            contexts: new Set(),
          });
        }
      }
      saved.scanouts.forEach((s, i) => {
        this.#display.setScanout(i, s.source);
        this.#display.setFramebuffer(i, s.framebuffer);
      });
      this.#cursor = saved.cursor ? { ...saved.cursor } : null;
      if (this.#mem) this.#attachRestoredBackings(true);
    } catch (e) {
      this.dropAll();
      if (e instanceof StateError) throw e;
      throw new StateError(`virtio-gpu: restore failed: ${e instanceof Error ? e.message : e}`);
    }
  }

  /**
   * Attach the backing pages of restored resources (GUEST blobs are created in the backend only now: it
   * reads them through guest memory). With `strict` a page outside guest memory is a StateError; without
   * (at activation, when nothing can be refused) it costs its resource the backing (2D) or the resource
   * itself (blob), with one log line.
   */
  #attachRestoredBackings(strict: boolean): void {
    for (const r of [...this.#resources.values()]) {
      const ranges = r.pendingBacking;
      if (!ranges) continue;
      r.pendingBacking = undefined;
      try {
        const backing = this.#backing(ranges.map((e) => ({ addr: BigInt(e.guestAddr), length: e.len })));
        if (r.kind === "2d") {
          this.#backend.attachBacking(r.id, backing);
        } else {
          this.#backend.createBlob({
            resourceId: r.id,
            ctxId: 0,
            blobMem: VIRTIO_GPU_BLOB_MEM_GUEST,
            blobFlags: r.blobFlags ?? 0,
            blobId: r.blobId ?? 0n,
            size: r.size ?? 0,
            backing,
          });
        }
        r.backing = backing;
      } catch (e) {
        const msg = `restored resource ${r.id}: backing not attached: ${e instanceof Error ? e.message : e}`;
        if (strict) throw new StateError(`virtio-gpu: ${msg}`);
        this.#guestError(msg);
        if (r.kind === "blob") this.#destroyResource(r);
      }
    }
  }
}

/** True when `r` lies inside a width x height surface. */
export function rectInside(r: Rect, width: number, height: number): boolean {
  return r.x + r.width <= width && r.y + r.height <= height;
}

/**
 * Checks a SET_SCANOUT_BLOB image layout against a blob of `blobSize` bytes; `fail` makes the error to
 * throw (a ProtocolError for the guest's command, a StateError for a saved record).
 */
export function checkBlobLayout(
  layout: BlobLayout,
  resourceId: number,
  blobSize: number,
  fail: (code: number, msg: string) => Error,
): void {
  if (!isVirtioGpuFormat(layout.format)) throw fail(RESP_ERR_INVALID_PARAMETER, `unknown format ${layout.format}`);
  if (layout.width === 0 || layout.height === 0 || layout.stride < layout.width * BPP) {
    throw fail(RESP_ERR_INVALID_PARAMETER, `blob image ${layout.width}x${layout.height} stride ${layout.stride}`);
  }
  const end = layout.offset + layout.stride * (layout.height - 1) + layout.width * BPP;
  if (end > blobSize) {
    throw fail(RESP_ERR_INVALID_PARAMETER, `blob image ends at ${end}, blob ${resourceId} has ${blobSize} bytes`);
  }
}
