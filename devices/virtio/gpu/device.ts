// virtio-gpu (virtio 1.2 spec, section 5.7; Linux include/uapi/linux/virtio_gpu.h), transport-blind.
// The device parses and validates every command, keeps the ids (resources, contexts, scanouts), the
// host-visible window's mappings and the fence timelines, counts every byte copied (accounting.ts),
// traces each command (trace.ts), and hands the work to a GpuBackend (backend.ts). It never calls KVM:
// blob mappings go through the SharedMemoryMapper the transport gives it.
//
// Guest input is hostile: a bad command gets an ERR_* response and one (rate limited) log line, never
// an exception out of queueNotify.

import {
  type ActivateContext,
  type SharedMemoryMapper,
  type SharedMemoryRegion,
  VIRTIO_COMMON_FEATURES,
  VIRTIO_ID_GPU,
  type VirtioDevice,
} from "../device.ts";
import { type DescriptorChain, type Virtqueue } from "../queue.ts";
import { RateLimitedLog } from "../../../core/log.ts";
import type { GuestMemory } from "../../../core/memory.ts";
import {
  type Backing,
  type BackingEntry,
  type BlobLayout,
  type Box,
  type FenceTimeline,
  type GpuBackend,
  GpuBackendError,
  type Rect,
} from "./backend.ts";
import {
  type Command,
  commandName,
  type CtrlHdr,
  GPU_CFG_EVENTS_CLEAR,
  GPU_CFG_EVENTS_READ,
  GPU_CFG_NUM_CAPSETS,
  GPU_CFG_NUM_SCANOUTS,
  GPU_CONFIG_SIZE,
  HDR_SIZE,
  type MemEntry,
  parseCommand,
  ProtocolError,
  readHdr,
  RESP_ERR_INVALID_CONTEXT_ID,
  RESP_ERR_INVALID_PARAMETER,
  RESP_ERR_INVALID_RESOURCE_ID,
  RESP_ERR_INVALID_SCANOUT_ID,
  RESP_ERR_OUT_OF_MEMORY,
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
  VIRTIO_GPU_CONTEXT_INIT_CAPSET_ID_MASK,
  VIRTIO_GPU_F_CONTEXT_INIT,
  VIRTIO_GPU_F_EDID,
  VIRTIO_GPU_F_RESOURCE_BLOB,
  VIRTIO_GPU_F_VIRGL,
  VIRTIO_GPU_FLAG_FENCE,
  VIRTIO_GPU_FLAG_INFO_RING_IDX,
  VIRTIO_GPU_MAX_SCANOUTS,
  VIRTIO_GPU_SHM_ID_HOST_VISIBLE,
} from "./protocol.ts";
import { boxBytes, GpuAccounting, type GpuStats, type ResourceShape, walkVirglStream } from "./accounting.ts";
import { GpuTrace } from "./trace.ts";
import { HeadlessDisplay, makeEdid } from "./display.ts";
import {
  isVirtioGpuFormat,
  PIPE_BUFFER,
  PIPE_TEXTURE_2D,
  virglBytesPerPixel,
  VIRTIO_GPU_BYTES_PER_PIXEL,
} from "./formats.ts";

/** crosvm's default display size (devices/src/virtio/gpu/mod.rs DEFAULT_DISPLAY_WIDTH/HEIGHT). */
export const DEFAULT_DISPLAY_WIDTH = 1280;
export const DEFAULT_DISPLAY_HEIGHT = 1024;
/** Size of the host-visible window (crosvm `pci-bar-size`; 8 GiB by default here). */
export const DEFAULT_PCI_BAR_SIZE = 8 * 1024 ** 3;
/** Control queue and cursor queue sizes (crosvm: 256 and 16). */
export const GPU_QUEUE_SIZES: readonly number[] = [256, 16];
export const CONTROL_QUEUE = 0;
export const CURSOR_QUEUE = 1;
/** Host page size: mappings are whole pages. */
export const HOST_PAGE_SIZE = 4096;
/** Rings per context a fence may name with INFO_RING_IDX (crosvm rutabaga: ring_idx < 64). */
export const MAX_RINGS = 64;
/** Largest command read from a chain (SUBMIT_3D streams are far smaller: Mesa flushes at 256 KiB). */
export const MAX_COMMAND_BYTES = 16 * 1024 * 1024;
const BPP = VIRTIO_GPU_BYTES_PER_PIXEL;

export interface DisplayConfig {
  width: number;
  height: number;
}

export interface GpuDeviceOptions {
  backend: GpuBackend;
  /** One entry per scanout (crosvm `displays=[[mode=windowed[W,H]]]`); default one 1280x1024. */
  displays?: DisplayConfig[];
  /** Bytes of the host-visible window (shared memory region 1). */
  pciBarSize?: number;
  /** Write a Chrome trace-event JSON file of every command. */
  tracePath?: string;
}

interface ResourceState {
  id: number;
  kind: "2d" | "3d" | "blob";
  shape?: ResourceShape;
  width: number;
  height: number;
  depth: number;
  arraySize: number;
  backing?: Backing;
  blobMem?: number;
  blobFlags?: number;
  size?: number;
  mapped?: { offset: number; size: number };
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

interface HeldResponse {
  fenceId: bigint;
  /** The command failed: it needs no fence from the backend, only everything before it. */
  failed: boolean;
  queue: Virtqueue;
  head: number;
  len: number;
}

interface Cursor {
  scanoutId: number;
  x: number;
  y: number;
  resourceId: number;
  hotX: number;
  hotY: number;
}

/** A response and what to count for it. */
interface Outcome {
  resp: Uint8Array;
  resource: number;
  bytes: number;
}

export class GpuDevice implements VirtioDevice {
  readonly deviceType = VIRTIO_ID_GPU;
  readonly name = "gpu";
  readonly queueMaxSizes: readonly number[] = GPU_QUEUE_SIZES;
  readonly features: bigint;
  readonly backend: GpuBackend;
  readonly display: HeadlessDisplay;
  readonly accounting: GpuAccounting;
  readonly pciBarSize: number;
  readonly #modes: DisplayConfig[];
  readonly #log = new RateLimitedLog("virtio-gpu");
  readonly #trace: GpuTrace | null;
  #mem: GuestMemory | undefined;
  #queues: (Virtqueue | undefined)[] = [];
  #interrupt: ActivateContext["interrupt"] | undefined;
  #acked = 0n;
  #eventsRead = 0;
  #mapper: SharedMemoryMapper | undefined;
  readonly #resources = new Map<number, ResourceState>();
  readonly #contexts = new Map<number, ContextState>();
  /** Mapped blobs by window offset. */
  readonly #mappings = new Map<number, { resourceId: number; size: number }>();
  readonly #held = new Map<string, HeldResponse[]>();
  readonly #retired = new Map<string, bigint>();
  #cursor: Cursor | null = null;
  #inNotify = false;
  #pendingSignal = new Set<number>();

  constructor(opts: GpuDeviceOptions) {
    this.backend = opts.backend;
    const modes = opts.displays?.length
      ? opts.displays
      : [{ width: DEFAULT_DISPLAY_WIDTH, height: DEFAULT_DISPLAY_HEIGHT }];
    if (modes.length > VIRTIO_GPU_MAX_SCANOUTS) {
      throw new Error(`gpu: ${modes.length} displays, at most ${VIRTIO_GPU_MAX_SCANOUTS}`);
    }
    for (const m of modes) {
      if (!Number.isInteger(m.width) || !Number.isInteger(m.height) || m.width < 1 || m.height < 1) {
        throw new Error(`gpu: display size ${m.width}x${m.height} is not positive integers`);
      }
    }
    this.#modes = modes.map((m) => ({ ...m }));
    this.pciBarSize = opts.pciBarSize ?? DEFAULT_PCI_BAR_SIZE;
    if (!Number.isSafeInteger(this.pciBarSize) || this.pciBarSize <= 0 || this.pciBarSize % HOST_PAGE_SIZE !== 0) {
      throw new Error(`gpu: pci-bar-size ${this.pciBarSize} is not a positive multiple of ${HOST_PAGE_SIZE}`);
    }
    this.display = new HeadlessDisplay(this.#modes);
    this.accounting = new GpuAccounting(this.backend.name);
    this.#trace = opts.tracePath ? new GpuTrace(opts.tracePath) : null;
    let f = VIRTIO_COMMON_FEATURES | VIRTIO_GPU_F_EDID | VIRTIO_GPU_F_RESOURCE_BLOB;
    if (this.backend.supportsVirgl) f |= VIRTIO_GPU_F_VIRGL | VIRTIO_GPU_F_CONTEXT_INIT;
    this.features = f;
    this.backend.setFenceHandler((t, id) => this.#fenceRetired(t, id));
  }

  // ---- VirtioDevice ----

  readConfig(offset: number, data: Uint8Array): void {
    const b = new Uint8Array(GPU_CONFIG_SIZE);
    const v = new DataView(b.buffer);
    v.setUint32(GPU_CFG_EVENTS_READ, this.#eventsRead, true);
    v.setUint32(GPU_CFG_EVENTS_CLEAR, 0, true);
    v.setUint32(GPU_CFG_NUM_SCANOUTS, this.#modes.length, true);
    v.setUint32(GPU_CFG_NUM_CAPSETS, this.backend.supportsVirgl ? this.backend.capsets().length : 0, true);
    data.fill(0);
    if (offset < 0 || offset >= b.length) return;
    data.set(b.subarray(offset, offset + data.length));
  }

  writeConfig(offset: number, data: Uint8Array): void {
    // Only events_clear is writable (virtio 1.2 section 5.7.4): it clears the bits written.
    if (offset === GPU_CFG_EVENTS_CLEAR && data.length === 4) {
      this.#eventsRead &= ~new DataView(data.buffer, data.byteOffset, 4).getUint32(0, true);
      return;
    }
    this.#guestError(`driver wrote ${data.length} bytes of config at ${offset}; ignored`);
  }

  activate(ctx: ActivateContext): void {
    this.#mem = ctx.mem;
    this.#queues = ctx.queues;
    this.#interrupt = ctx.interrupt;
    this.#acked = ctx.ackedFeatures;
  }

  reset(): void {
    this.#dropAll();
    this.#mem = undefined;
    this.#queues = [];
    this.#interrupt = undefined;
    this.#acked = 0n;
  }

  sharedMemoryRegions(): SharedMemoryRegion[] {
    return this.backend.supportsHostBlobs ? [{ id: VIRTIO_GPU_SHM_ID_HOST_VISIBLE, size: this.pciBarSize }] : [];
  }

  setSharedMemoryMapper(mapper: SharedMemoryMapper): void {
    this.#mapper = mapper;
  }

  close(): void {
    this.#dropAll();
    this.#trace?.close();
    this.backend.close();
  }

  stats(): Record<string, number> {
    const t = this.accounting.totals;
    return {
      commands: t.commands,
      bytesCopied: t.bytesCopied,
      transferToHostBytes: t.transferToHostBytes,
      transferFromHostBytes: t.transferFromHostBytes,
      streamToHostBytes: t.streamToHostBytes,
      streamFromHostBytes: t.streamFromHostBytes,
      copyTransferToHostBytes: t.copyTransferToHostBytes,
      copyTransferFromHostBytes: t.copyTransferFromHostBytes,
      inlineWriteBytes: t.inlineWriteBytes,
      blobMaps: t.blobMaps,
      blobMappedBytes: t.blobMappedBytes,
      copiesAvoidedBytes: t.copiesAvoidedBytes,
      mappedNow: this.accounting.mapped.count,
      guestErrors: this.#log.count,
    };
  }

  // ---- Library API ----

  /** Live counters: totals, per resource, per context, per command type (JSON-able). */
  gpuStats(): GpuStats {
    return this.accounting.stats();
  }

  /** A human summary of the copy counters. */
  summary(): string {
    return this.accounting.summary();
  }

  /** A PNG of scanout `id`. */
  screenshot(id = 0): Promise<Uint8Array> {
    return this.display.screenshot(id);
  }

  /** The cursor as the guest last set it, or null. */
  get cursor(): Readonly<Cursor> | null {
    return this.#cursor;
  }

  /** Sees every guest-error line, before rate limiting (tests, a debug CLI). */
  guestErrorLine: ((line: string) => void) | undefined;

  #guestError(msg: string): void {
    this.guestErrorLine?.(`virtio-gpu: ${msg}`);
    this.#log.log(msg);
  }

  /** Guest errors logged so far (rate-limited log's count). */
  get guestErrors(): number {
    return this.#log.count;
  }

  /** Raise a display-change event (e.g. after a resize): sets events_read and signals config change. */
  displayChanged(): void {
    this.#eventsRead |= 1;
    this.#interrupt?.signalConfigChange();
  }

  // ---- Queues ----

  queueNotify(index: number): void {
    const q = this.#queues[index];
    if (!q || (index !== CONTROL_QUEUE && index !== CURSOR_QUEUE)) return;
    this.#inNotify = true;
    try {
      for (;;) {
        const chain = q.pop();
        if (!chain) break;
        this.#serve(q, index, chain);
      }
      this.backend.poll?.();
    } finally {
      this.#inNotify = false;
    }
    this.#pendingSignal.add(index);
    this.#signal();
  }

  #signal(): void {
    for (const i of this.#pendingSignal) {
      const q = this.#queues[i];
      if (q?.needsInterrupt()) this.#interrupt?.signalUsedQueue(i);
    }
    this.#pendingSignal.clear();
  }

  /** Serve one chain: decode, execute, answer now or hold until its fence retires. */
  #serve(q: Virtqueue, index: number, chain: DescriptorChain): void {
    const t0 = performance.now();
    let hdr: CtrlHdr | undefined;
    let out: Outcome;
    let name = "INVALID";
    let ok = true;
    let errName: string | undefined;
    try {
      if (chain.readableLength > MAX_COMMAND_BYTES) {
        throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `command of ${chain.readableLength} bytes`);
      }
      const bytes = chain.reader().read(chain.readableLength);
      if (bytes.length >= HDR_SIZE) {
        hdr = readHdr(new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength));
        name = commandName(hdr.type);
      }
      const cmd = parseCommand(bytes);
      const cursorCmd = cmd.kind === "update_cursor" || cmd.kind === "move_cursor";
      if (cursorCmd !== (index === CURSOR_QUEUE)) {
        throw new ProtocolError(
          RESP_ERR_UNSPEC,
          `${name} on the ${index === CURSOR_QUEUE ? "cursor" : "control"} queue`,
        );
      }
      this.#checkFence(cmd.hdr);
      out = this.#execute(cmd);
    } catch (e) {
      ok = false;
      const code = e instanceof ProtocolError || e instanceof GpuBackendError ? e.response : RESP_ERR_UNSPEC;
      if (!(e instanceof ProtocolError || e instanceof GpuBackendError)) {
        this.#guestError(`${name}: internal error: ${e instanceof Error ? e.stack ?? e.message : e}`);
      } else {
        this.#guestError(`${name}: ${e.message}`);
      }
      errName = `0x${code.toString(16)}`;
      out = { resp: responseHeader(code, hdr), resource: 0, bytes: 0 };
    }
    const len = this.#writeResponse(chain, out.resp, name);
    const us = (performance.now() - t0) * 1000;
    this.accounting.command(name, ok, out.bytes, us);
    // Per-id counters only for ids that exist: a hostile guest must not grow the tables at will.
    const ctxKnown = hdr && this.#contexts.has(hdr.ctxId) ? hdr.ctxId : 0;
    this.accounting.touch(this.#resources.has(out.resource) ? out.resource : 0, ctxKnown);
    this.#trace?.add({
      name,
      ts: this.#trace.now() - us,
      dur: us,
      resource: out.resource,
      bytes: out.bytes,
      ctx: hdr?.ctxId ?? 0,
      error: errName,
    });
    if (hdr && (hdr.flags & VIRTIO_GPU_FLAG_FENCE)) this.#hold(q, chain.head, len, hdr, !ok);
    else q.addUsed(chain.head, len);
  }

  #writeResponse(chain: DescriptorChain, resp: Uint8Array, name: string): number {
    const w = chain.writer();
    const n = Math.min(resp.length, w.remaining);
    if (n < resp.length && w.remaining > 0) {
      this.#guestError(`${name}: response of ${resp.length} bytes cut to the ${n} writable bytes`);
    }
    try {
      if (n > 0) w.write(resp.subarray(0, n));
    } catch (e) {
      this.#guestError(`${name}: response not written: ${e instanceof Error ? e.message : e}`);
      return 0;
    }
    return n;
  }

  #checkFence(h: CtrlHdr): void {
    if (!(h.flags & VIRTIO_GPU_FLAG_INFO_RING_IDX)) return;
    if (!(this.#acked & VIRTIO_GPU_F_CONTEXT_INIT)) {
      throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, "INFO_RING_IDX without CONTEXT_INIT");
    }
    if (h.ringIdx >= MAX_RINGS) throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `ring_idx ${h.ringIdx}`);
  }

  // ---- Fences ----

  #timeline(h: CtrlHdr): FenceTimeline {
    const perContext = (h.flags & VIRTIO_GPU_FLAG_INFO_RING_IDX) !== 0;
    return { ctxId: h.ctxId, ringIdx: perContext ? h.ringIdx : 0, perContext };
  }

  #key(t: FenceTimeline): string {
    return t.perContext ? `${t.ctxId}:${t.ringIdx}` : "global";
  }

  #hold(q: Virtqueue, head: number, len: number, h: CtrlHdr, failed: boolean): void {
    const t = this.#timeline(h);
    const key = this.#key(t);
    let list = this.#held.get(key);
    if (!list) this.#held.set(key, list = []);
    list.push({ fenceId: h.fenceId, failed, queue: q, head, len });
    this.accounting.fences.pending++;
    if (!failed) {
      this.accounting.fences.created++;
      try {
        this.backend.createFence(t, h.fenceId);
      } catch (e) {
        this.#guestError(
          `fence ${h.fenceId}: backend refused it (${e instanceof Error ? e.message : e}); answered now`,
        );
        list[list.length - 1].failed = true;
      }
    }
    this.#drain(key);
  }

  #fenceRetired(t: FenceTimeline, fenceId: bigint): void {
    const key = this.#key(t);
    const prev = this.#retired.get(key);
    if (prev === undefined || fenceId > prev) this.#retired.set(key, fenceId);
    this.accounting.fences.retired++;
    this.#drain(key);
    if (!this.#inNotify) this.#signal();
  }

  /** Complete held responses in order while the first one's fence has retired (or it failed). */
  #drain(key: string): void {
    const list = this.#held.get(key);
    if (!list) return;
    const retired = this.#retired.get(key);
    while (list.length > 0) {
      const h = list[0];
      if (!h.failed && (retired === undefined || h.fenceId > retired)) break;
      list.shift();
      this.accounting.fences.pending--;
      h.queue.addUsed(h.head, h.len);
      this.#pendingSignal.add(this.#queues.indexOf(h.queue));
    }
    if (list.length === 0) this.#held.delete(key);
  }

  // ---- Commands ----

  #execute(cmd: Command): Outcome {
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
        this.backend.createResource2D(cmd);
        this.#addResource({
          id: cmd.resourceId,
          kind: "2d",
          shape: { target: PIPE_TEXTURE_2D, format: cmd.format },
          width: cmd.width,
          height: cmd.height,
          depth: 1,
          arraySize: 1,
          contexts: new Set(),
        });
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
          this.display.setScanout(cmd.scanoutId, null);
          return ok();
        }
        const r = this.#res(cmd.resourceId);
        if (r.kind === "blob") {
          throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `resource ${r.id} is a blob: use SET_SCANOUT_BLOB`);
        }
        this.#rectInside(cmd.rect, r.width, r.height, `scanout rect of resource ${r.id}`);
        this.display.setScanout(cmd.scanoutId, { resourceId: r.id, rect: cmd.rect });
        return ok(r.id);
      }
      case "set_scanout_blob": {
        this.#scanoutId(cmd.scanoutId);
        if (cmd.resourceId === 0) {
          this.display.setScanout(cmd.scanoutId, null);
          return ok();
        }
        const r = this.#res(cmd.resourceId);
        if (r.kind !== "blob") throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `resource ${r.id} is not a blob`);
        if (!isVirtioGpuFormat(cmd.format)) {
          throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `unknown format ${cmd.format}`);
        }
        const layout: BlobLayout = {
          format: cmd.format,
          width: cmd.width,
          height: cmd.height,
          stride: cmd.strides[0],
          offset: cmd.offsets[0],
        };
        if (layout.width === 0 || layout.height === 0 || layout.stride < layout.width * BPP) {
          throw new ProtocolError(
            RESP_ERR_INVALID_PARAMETER,
            `blob image ${layout.width}x${layout.height} stride ${layout.stride}`,
          );
        }
        const end = layout.offset + layout.stride * (layout.height - 1) + layout.width * BPP;
        if (end > (r.size ?? 0)) {
          throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `blob image ends at ${end}, blob has ${r.size} bytes`);
        }
        this.#rectInside(cmd.rect, layout.width, layout.height, `scanout rect of blob ${r.id}`);
        this.display.setScanout(cmd.scanoutId, { resourceId: r.id, rect: cmd.rect, layout });
        return ok(r.id);
      }
      case "resource_flush": {
        const r = this.#res(cmd.resourceId);
        let bytes = 0;
        for (const s of this.display.scanoutsOf(r.id)) {
          const src = this.display.source(s)!;
          const lim = src.layout ?? r;
          this.#rectInside(cmd.rect, lim.width, lim.height, `flush rect of resource ${r.id}`);
          const res = this.display.flush(s, cmd.rect, (id, rect, layout) => this.backend.readPixels(id, rect, layout));
          if (src.layout) this.accounting.avoided(r.id, res.bytes);
          bytes += res.bytes;
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
        this.backend.transferToHost({ resourceId: r.id, ctxId: 0, box, offset, level: 0, stride, layerStride: 0 });
        const bytes = box.w * box.h * BPP;
        this.accounting.copy("transferToHostBytes", bytes, r.id, 0);
        return ok(r.id, bytes);
      }
      case "attach_backing": {
        const r = this.#res(cmd.resourceId);
        if (r.kind === "blob") throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `resource ${r.id} is a blob`);
        if (r.backing) throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `resource ${r.id} already has backing`);
        const backing = this.#backing(cmd.entries);
        this.backend.attachBacking(r.id, backing);
        r.backing = backing;
        return ok(r.id);
      }
      case "detach_backing": {
        const r = this.#res(cmd.resourceId);
        if (!r.backing || r.kind === "blob") {
          throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `resource ${r.id} has no backing to detach`);
        }
        this.backend.detachBacking(r.id);
        r.backing = undefined;
        return ok(r.id);
      }
      case "get_capset_info": {
        const caps = this.backend.supportsVirgl ? this.backend.capsets() : [];
        const c = caps[cmd.capsetIndex];
        if (!c) {
          throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `capset index ${cmd.capsetIndex} of ${caps.length}`);
        }
        return { resp: respCapsetInfo(h, c.id, c.maxVersion, c.maxSize), resource: 0, bytes: 0 };
      }
      case "get_capset": {
        const caps = this.backend.supportsVirgl ? this.backend.capsets() : [];
        const c = caps.find((c) => c.id === cmd.capsetId);
        if (!c || cmd.capsetVersion > c.maxVersion) {
          throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `capset ${cmd.capsetId} version ${cmd.capsetVersion}`);
        }
        return { resp: respCapset(h, this.backend.getCapset(c.id, cmd.capsetVersion)), resource: 0, bytes: 0 };
      }
      case "assign_uuid": {
        const r = this.#res(cmd.resourceId);
        const uuid = new Uint8Array(16);
        new DataView(uuid.buffer).setUint32(12, r.id, false);
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
    if (!(this.#acked & VIRTIO_GPU_F_VIRGL) || !this.backend.supportsVirgl) {
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
        if (capsetId !== 0 && !this.backend.capsets().some((c) => c.id === capsetId)) {
          throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `context ${h.ctxId}: capset ${capsetId} not offered`);
        }
        this.backend.createContext(h.ctxId, capsetId, cmd.name);
        this.#contexts.set(h.ctxId, {
          id: h.ctxId,
          capsetId,
          name: cmd.name,
          resources: new Set(),
          streamShapes: new Map(),
        });
        this.accounting.contextCreated(h.ctxId);
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
        this.backend.attachResource(c.id, r.id);
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
        this.backend.detachResource(c.id, r.id);
        c.resources.delete(r.id);
        r.contexts.delete(c.id);
        return ok(r.id);
      }
      case "resource_create_3d": {
        this.#checkNewId(cmd.resourceId);
        if (cmd.width === 0 || cmd.height === 0 || cmd.depth === 0) {
          throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `size ${cmd.width}x${cmd.height}x${cmd.depth}`);
        }
        this.backend.createResource3D(cmd);
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
        const lw = Math.max(1, r.width >>> Math.min(cmd.level, 31));
        const lh = r.shape?.target === PIPE_BUFFER ? 1 : Math.max(1, r.height >>> Math.min(cmd.level, 31));
        const ld = Math.max(r.depth >>> Math.min(cmd.level, 31), r.arraySize, 1);
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
        if (toHost) this.backend.transferToHost(t);
        else this.backend.transferFromHost(t);
        this.accounting.copy(
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
        if (c.capsetId === 0 || c.capsetId <= 2) {
          // virgl / virgl2 streams: count the copies they encode (the bytes are not changed).
          const walk = walkVirglStream(cmd.commands, (id) => this.#resources.get(id)?.shape);
          this.accounting.streams.submits++;
          this.accounting.streams.virglCommands += walk.commands;
          this.accounting.streams.streamBytes += cmd.commands.length;
          if (walk.truncated) this.accounting.streams.truncated++;
          for (const cp of walk.copies) {
            const res = this.#resources.has(cp.resourceId) ? cp.resourceId : 0;
            this.accounting.copy(cp.kind, cp.bytes, res, c.id, cp.estimated);
            bytes += cp.bytes;
          }
          for (const cr of walk.creates) {
            c.streamShapes.set(cr.blobId, { target: cr.target, format: cr.format, width: cr.width, height: cr.height });
          }
        }
        this.backend.submit3D(c.id, cmd.commands);
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
        if (!(this.#acked & VIRTIO_GPU_F_VIRGL) || !this.backend.supportsHostBlobs) {
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
    this.backend.createBlob({
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

  #mapBlob(h: CtrlHdr, resourceId: number, offset64: bigint): Outcome {
    const mapper = this.#mapper;
    if (!mapper || !this.backend.supportsHostBlobs || !(this.#acked & VIRTIO_GPU_F_RESOURCE_BLOB)) {
      throw new ProtocolError(RESP_ERR_UNSPEC, "RESOURCE_MAP_BLOB without a host-visible window");
    }
    const r = this.#res(resourceId);
    if (r.kind !== "blob" || !((r.blobFlags ?? 0) & VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE)) {
      throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `resource ${r.id} is not a mappable blob`);
    }
    if (r.mapped) throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `resource ${r.id} is already mapped`);
    if (offset64 >= BigInt(this.pciBarSize) || offset64 % BigInt(HOST_PAGE_SIZE) !== 0n) {
      throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `map offset 0x${offset64.toString(16)} outside the window`);
    }
    const offset = Number(offset64);
    // Check the window with the blob's own size before asking the backend to map anything.
    const want = roundUp(r.size ?? 0, HOST_PAGE_SIZE);
    this.#windowFree(offset, want);
    const m = this.backend.mapResource(r.id);
    const size = roundUp(Math.max(m.size, 1), HOST_PAGE_SIZE);
    try {
      if (size !== want) this.#windowFree(offset, size);
      mapper.addMapping(VIRTIO_GPU_SHM_ID_HOST_VISIBLE, offset, m.hostAddr, size, true);
    } catch (e) {
      this.backend.unmapResource(r.id);
      if (e instanceof ProtocolError) throw e;
      throw new ProtocolError(
        RESP_ERR_OUT_OF_MEMORY,
        `mapping resource ${r.id} failed: ${e instanceof Error ? e.message : e}`,
      );
    }
    r.mapped = { offset, size };
    this.#mappings.set(offset, { resourceId: r.id, size });
    this.accounting.mapBlob(r.id, h.ctxId, size);
    return { resp: respMapInfo(h, m.mapInfo), resource: r.id, bytes: 0 };
  }

  /** Throws unless [offset, offset+size) is inside the window and overlaps no mapping. */
  #windowFree(offset: number, size: number): void {
    if (offset + size > this.pciBarSize) {
      throw new ProtocolError(
        RESP_ERR_INVALID_PARAMETER,
        `map at 0x${offset.toString(16)} + ${size} runs past the ${this.pciBarSize}-byte window`,
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

  #unmap(r: ResourceState): void {
    const m = r.mapped;
    if (!m) return;
    try {
      this.#mapper?.removeMapping(VIRTIO_GPU_SHM_ID_HOST_VISIBLE, m.offset);
    } finally {
      r.mapped = undefined;
      this.#mappings.delete(m.offset);
      this.accounting.unmapBlob(m.size);
      this.backend.unmapResource(r.id);
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
    if (r.x + r.width > width || r.y + r.height > height) {
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
    this.accounting.resourceCreated(r.id);
  }

  #destroyResource(r: ResourceState): void {
    if (r.mapped) this.#unmap(r);
    for (const s of this.display.scanoutsOf(r.id)) this.display.setScanout(s, null);
    if (this.#cursor?.resourceId === r.id) this.#cursor = { ...this.#cursor, resourceId: 0 };
    for (const c of r.contexts) {
      this.#contexts.get(c)?.resources.delete(r.id);
      this.backend.detachResource(c, r.id);
    }
    if (r.backing && r.kind !== "blob") this.backend.detachBacking(r.id);
    this.backend.destroyResource(r.id);
    this.#resources.delete(r.id);
    this.accounting.resourceGone(r.id);
  }

  #destroyContext(c: ContextState): void {
    for (const id of c.resources) {
      this.#resources.get(id)?.contexts.delete(c.id);
      this.backend.detachResource(c.id, id);
    }
    this.backend.destroyContext(c.id);
    this.#contexts.delete(c.id);
    this.accounting.contextGone(c.id);
  }

  /** Device reset or close: unmap every blob, destroy every context and resource, drop held responses. */
  #dropAll(): void {
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
    this.#mappings.clear();
    this.accounting.fences.pending = 0;
    this.#held.clear();
    this.#retired.clear();
    this.#cursor = null;
    this.#eventsRead = 0;
    for (let i = 0; i < this.display.count; i++) this.display.setScanout(i, null);
  }
}

function roundUp(n: number, align: number): number {
  return Math.ceil(n / align) * align;
}
