// The virtio-gpu state record (core/state.ts): what GpuDevice.saveState writes and restoreState reads,
// as plain data, and the checks that make a record safe to restore. A record is untrusted input: every
// number is range checked, every id a scanout or the cursor names must be a saved resource, every
// rectangle must lie inside what it names, and byte arrays must have exactly the length their sizes say.
//
// What is saved: the configuration it was taken with (scanout sizes, events_read), the 2D resources
// (format, size, the guest addresses and lengths of their backing pages, and their host contents),
// GUEST blobs (their flags, blob id, size and pages: their contents are guest memory), each scanout's
// source and framebuffer, the cursor, and the last fence retired on each timeline. 3D contexts, 3D
// resources, host blobs and blob mappings live in the renderer and are never in a record.

import {
  type DeviceState,
  stateArray,
  stateBoolean,
  stateBytes,
  stateData,
  StateError,
  stateNumber,
  stateRecord,
  stateString,
  type StateValue,
} from "../../../core/state.ts";
import { MAX_2D_RESOURCE_BYTES } from "./backend_2d.ts";
import type { BlobLayout, Rect } from "./backend.ts";
import type { DisplayConfig, Framebuffer, ScanoutSource } from "./display.ts";
import { checkBlobLayout, type Cursor, rectInside } from "./executor.ts";
import { MAX_RINGS, type RetiredFence } from "./fences.ts";
import { isVirtioGpuFormat, VIRTIO_GPU_BYTES_PER_PIXEL } from "./formats.ts";
import { MAX_MEM_ENTRIES, VIRTIO_GPU_BLOB_FLAGS_KNOWN } from "./protocol.ts";

/** The record's kind. */
export const GPU_STATE_TYPE = "virtio-gpu";
/** The layout of the record's data. */
export const GPU_STATE_VERSION = 1;

const BPP = VIRTIO_GPU_BYTES_PER_PIXEL;
const U32_MAX = 0xffff_ffff;
const U64_MAX = (1n << 64n) - 1n;

/** One guest backing entry: guest physical address and length. */
export interface GuestRange {
  guestAddr: number;
  len: number;
}

/** A resource as saved: a 2D resource with its host copy, or a GUEST blob (its bytes are guest memory). */
export type SavedResource =
  | {
    kind: "2d";
    id: number;
    /** enum virtio_gpu_formats. */
    format: number;
    width: number;
    height: number;
    /** Attached backing pages, null when none is attached. */
    backing: GuestRange[] | null;
    /** The host copy: width * height * 4 bytes in `format`. */
    contents: Uint8Array;
  }
  | { kind: "guest-blob"; id: number; blobFlags: number; blobId: bigint; size: number; backing: GuestRange[] };

/** One scanout: what it shows and its framebuffer (what a screenshot reads). */
export interface SavedScanout {
  source: ScanoutSource | null;
  framebuffer: Framebuffer;
}

/** Everything a virtio-gpu record holds, checked. */
export interface GpuSavedState {
  /** The scanout sizes the device was built with. */
  modes: DisplayConfig[];
  /** virtio_gpu_config.events_read. */
  eventsRead: number;
  resources: SavedResource[];
  scanouts: SavedScanout[];
  cursor: Cursor | null;
  fences: RetiredFence[];
}

/** The state as a core/state.ts record. */
export function encodeGpuState(s: GpuSavedState): DeviceState {
  const ranges = (b: GuestRange[]) => b.map((e) => ({ guestAddr: e.guestAddr, len: e.len }));
  const resources = s.resources.map((r): StateValue =>
    r.kind === "2d"
      ? {
        kind: r.kind,
        id: r.id,
        format: r.format,
        width: r.width,
        height: r.height,
        backing: r.backing ? ranges(r.backing) : null,
        contents: r.contents,
      }
      : {
        kind: r.kind,
        id: r.id,
        blobFlags: r.blobFlags,
        blobId: r.blobId.toString(),
        size: r.size,
        backing: ranges(r.backing),
      }
  );
  const scanouts: StateValue[] = s.scanouts.map((sc) => ({
    source: sc.source
      ? {
        resourceId: sc.source.resourceId,
        rect: { ...sc.source.rect },
        layout: sc.source.layout ? { ...sc.source.layout } : null,
      }
      : null,
    framebuffer: { width: sc.framebuffer.width, height: sc.framebuffer.height, bgra: sc.framebuffer.bgra },
  }));
  return {
    type: GPU_STATE_TYPE,
    version: GPU_STATE_VERSION,
    data: {
      config: { scanouts: s.modes.map((m) => ({ width: m.width, height: m.height })), eventsRead: s.eventsRead },
      resources,
      scanouts,
      cursor: s.cursor ? { ...s.cursor } : null,
      fences: s.fences.map((f) => ({
        ctxId: f.timeline.ctxId,
        ringIdx: f.timeline.ringIdx,
        perContext: f.timeline.perContext,
        fenceId: f.fenceId.toString(),
      })),
    },
  };
}

/**
 * Reads and checks a record for a device built with `modes`; throws StateError naming the first field
 * that is wrong.
 */
export function decodeGpuState(state: DeviceState, modes: readonly DisplayConfig[]): GpuSavedState {
  const d = stateRecord(stateData(state, GPU_STATE_TYPE, GPU_STATE_VERSION), "virtio-gpu");
  const config = stateRecord(d.config, "virtio-gpu config");
  const saved = stateArray(config.scanouts, "virtio-gpu config.scanouts").map((v, i) => {
    const m = stateRecord(v, `virtio-gpu config.scanouts[${i}]`);
    return { width: u32(m.width, `scanout ${i} width`), height: u32(m.height, `scanout ${i} height`) };
  });
  const same = saved.length === modes.length &&
    saved.every((m, i) => m.width === modes[i].width && m.height === modes[i].height);
  if (!same) {
    const show = (l: readonly DisplayConfig[]) => l.map((m) => `${m.width}x${m.height}`).join(", ");
    throw new StateError(`virtio-gpu: saved with scanouts ${show(saved)}, this device has ${show(modes)}`);
  }
  const eventsRead = u32(config.eventsRead, "config.eventsRead");

  const resources = stateArray(d.resources, "virtio-gpu resources").map((v, i) => resource(v, `resource [${i}]`));
  const byId = new Map<number, SavedResource>();
  for (const r of resources) {
    if (byId.has(r.id)) throw new StateError(`virtio-gpu: resource ${r.id} saved twice`);
    byId.set(r.id, r);
  }

  const scanoutList = stateArray(d.scanouts, "virtio-gpu scanouts");
  if (scanoutList.length !== modes.length) {
    throw new StateError(`virtio-gpu: ${scanoutList.length} scanouts saved, the device has ${modes.length}`);
  }
  const scanouts = scanoutList.map((v, i) => scanout(v, `scanout ${i}`, byId));

  let cursor: Cursor | null = null;
  if (d.cursor !== null) {
    const c = stateRecord(d.cursor, "virtio-gpu cursor");
    cursor = {
      scanoutId: u32(c.scanoutId, "cursor scanoutId", modes.length - 1),
      x: u32(c.x, "cursor x"),
      y: u32(c.y, "cursor y"),
      resourceId: u32(c.resourceId, "cursor resourceId"),
      hotX: u32(c.hotX, "cursor hotX"),
      hotY: u32(c.hotY, "cursor hotY"),
    };
    if (cursor.resourceId !== 0 && !byId.has(cursor.resourceId)) {
      throw new StateError(`virtio-gpu: the cursor shows resource ${cursor.resourceId}, which was not saved`);
    }
  }

  const keys = new Set<string>();
  const fences = stateArray(d.fences, "virtio-gpu fences").map((v, i): RetiredFence => {
    const f = stateRecord(v, `virtio-gpu fences[${i}]`);
    const perContext = stateBoolean(f.perContext, `fence ${i} perContext`);
    const timeline = {
      ctxId: u32(f.ctxId, `fence ${i} ctxId`),
      ringIdx: u32(f.ringIdx, `fence ${i} ringIdx`, perContext ? MAX_RINGS - 1 : 0),
      perContext,
    };
    const key = perContext ? `${timeline.ctxId}:${timeline.ringIdx}` : "global";
    if (keys.has(key)) throw new StateError(`virtio-gpu: fence timeline ${key} saved twice`);
    keys.add(key);
    return { timeline, fenceId: u64(f.fenceId, `fence ${i} fenceId`) };
  });

  return { modes: saved, eventsRead, resources, scanouts, cursor, fences };
}

function resource(v: StateValue, what: string): SavedResource {
  const r = stateRecord(v, `virtio-gpu ${what}`);
  const kind = stateString(r.kind, `${what} kind`);
  const id = u32(r.id, `${what} id`, U32_MAX, 1);
  if (kind === "2d") {
    const format = u32(r.format, `resource ${id} format`);
    if (!isVirtioGpuFormat(format)) throw new StateError(`virtio-gpu: resource ${id}: unknown format ${format}`);
    const width = u32(r.width, `resource ${id} width`, U32_MAX, 1);
    const height = u32(r.height, `resource ${id} height`, U32_MAX, 1);
    if (width * height * BPP > MAX_2D_RESOURCE_BYTES) {
      throw new StateError(`virtio-gpu: resource ${id} of ${width}x${height} is too large`);
    }
    return {
      kind,
      id,
      format,
      width,
      height,
      backing: r.backing === null ? null : ranges(r.backing, `resource ${id} backing`),
      contents: stateBytes(r.contents, `virtio-gpu resource ${id} contents`, width * height * BPP),
    };
  }
  if (kind === "guest-blob") {
    const blobFlags = u32(r.blobFlags, `resource ${id} blobFlags`);
    if (blobFlags & ~VIRTIO_GPU_BLOB_FLAGS_KNOWN) {
      throw new StateError(`virtio-gpu: resource ${id}: unknown blob flags 0x${blobFlags.toString(16)}`);
    }
    const size = integer(r.size, `resource ${id} size`, 1, Number.MAX_SAFE_INTEGER);
    const backing = ranges(r.backing, `resource ${id} backing`);
    const pages = backing.reduce((n, e) => n + e.len, 0);
    if (pages < size) throw new StateError(`virtio-gpu: blob ${id} of ${size} bytes on ${pages} bytes of pages`);
    return { kind, id, blobFlags, blobId: u64(r.blobId, `resource ${id} blobId`), size, backing };
  }
  throw new StateError(`virtio-gpu: ${what}: unknown kind ${JSON.stringify(kind)}`);
}

function ranges(v: StateValue | undefined, what: string): GuestRange[] {
  const list = stateArray(v, `virtio-gpu ${what}`);
  if (list.length === 0 || list.length > MAX_MEM_ENTRIES) {
    throw new StateError(`virtio-gpu: ${what}: ${list.length} entries (1 to ${MAX_MEM_ENTRIES})`);
  }
  return list.map((e, i) => {
    const r = stateRecord(e, `virtio-gpu ${what}[${i}]`);
    return {
      guestAddr: integer(r.guestAddr, `${what}[${i}] guestAddr`, 0, Number.MAX_SAFE_INTEGER),
      len: u32(r.len, `${what}[${i}] len`, U32_MAX, 1),
    };
  });
}

function scanout(v: StateValue, what: string, resources: Map<number, SavedResource>): SavedScanout {
  const s = stateRecord(v, `virtio-gpu ${what}`);
  const f = stateRecord(s.framebuffer, `virtio-gpu ${what} framebuffer`);
  const width = u32(f.width, `${what} framebuffer width`);
  const height = u32(f.height, `${what} framebuffer height`);
  if (width * height * BPP > MAX_2D_RESOURCE_BYTES) {
    throw new StateError(`virtio-gpu: ${what}: framebuffer of ${width}x${height} is too large`);
  }
  const framebuffer = {
    width,
    height,
    bgra: stateBytes(f.bgra, `virtio-gpu ${what} framebuffer`, width * height * BPP),
  };
  if (s.source === null) return { source: null, framebuffer };
  const src = stateRecord(s.source, `virtio-gpu ${what} source`);
  const resourceId = u32(src.resourceId, `${what} resourceId`);
  const res = resources.get(resourceId);
  if (!res) throw new StateError(`virtio-gpu: ${what} shows resource ${resourceId}, which was not saved`);
  const rect = rectOf(src.rect, `${what} rect`);
  if (rect.width !== width || rect.height !== height) {
    throw new StateError(`virtio-gpu: ${what}: framebuffer ${width}x${height} for a ${rect.width}x${rect.height} rect`);
  }
  if (res.kind === "2d") {
    if (src.layout !== null && src.layout !== undefined) {
      throw new StateError(`virtio-gpu: ${what}: a blob layout on 2D resource ${resourceId}`);
    }
    if (!rectInside(rect, res.width, res.height)) {
      throw new StateError(`virtio-gpu: ${what}: rect outside resource ${resourceId}`);
    }
    return { source: { resourceId, rect }, framebuffer };
  }
  const layout = layoutOf(src.layout, `${what} layout`);
  checkBlobLayout(layout, resourceId, res.size, (_code, msg) => new StateError(`virtio-gpu: ${what}: ${msg}`));
  if (!rectInside(rect, layout.width, layout.height)) {
    throw new StateError(`virtio-gpu: ${what}: rect outside the image of blob ${resourceId}`);
  }
  return { source: { resourceId, rect, layout }, framebuffer };
}

function rectOf(v: StateValue | undefined, what: string): Rect {
  const r = stateRecord(v, `virtio-gpu ${what}`);
  return {
    x: u32(r.x, `${what} x`),
    y: u32(r.y, `${what} y`),
    width: u32(r.width, `${what} width`),
    height: u32(r.height, `${what} height`),
  };
}

function layoutOf(v: StateValue | undefined, what: string): BlobLayout {
  const l = stateRecord(v, `virtio-gpu ${what}`);
  return {
    format: u32(l.format, `${what} format`),
    width: u32(l.width, `${what} width`),
    height: u32(l.height, `${what} height`),
    stride: u32(l.stride, `${what} stride`),
    offset: u32(l.offset, `${what} offset`),
  };
}

/** An integer in [min, max]; StateError otherwise. */
function integer(v: StateValue | undefined, what: string, min: number, max: number): number {
  const n = stateNumber(v, `virtio-gpu ${what}`, min, max);
  if (!Number.isInteger(n)) throw new StateError(`virtio-gpu ${what}: ${n} is not an integer`);
  return n;
}

/** A u32 in [min, max]. */
function u32(v: StateValue | undefined, what: string, max = U32_MAX, min = 0): number {
  return integer(v, what, min, max);
}

/** A u64 written as a decimal string (JSON numbers cannot hold every u64). */
function u64(v: StateValue | undefined, what: string): bigint {
  const s = stateString(v, `virtio-gpu ${what}`);
  if (!/^[0-9]{1,20}$/.test(s) || BigInt(s) > U64_MAX) {
    throw new StateError(`virtio-gpu ${what}: ${JSON.stringify(s)} is not a u64 in decimal`);
  }
  return BigInt(s);
}
