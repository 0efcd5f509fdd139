// Copy accounting: how many bytes virtio-gpu copies, where, for which resource and context, and what
// blob mappings saved. Two sources:
// - the virtio commands TRANSFER_TO_HOST_2D/3D and TRANSFER_FROM_HOST_3D (bytes from box x format);
// - the virgl command stream inside SUBMIT_3D, walked without being changed: Mesa's virgl driver encodes
//   its uploads and downloads there (VIRGL_CCMD_RESOURCE_INLINE_WRITE, VIRGL_CCMD_TRANSFER3D,
//   VIRGL_CCMD_COPY_TRANSFER3D; layouts from virglrenderer src/virgl_protocol.h), so a counter that only
//   watched the virtio commands would miss most real copies.
// - the display path (display.ts): scanouts read back into the framebuffer for a consumer (a screenshot,
//   a snapshot, the web display, a vhost-user front end) and the bytes handed to each display client,
//   per scanout; they sit beside the guest's copies (scanoutReadbackBytes, displaySentBytes), outside
//   bytesCopied, which stays the guest's own.
// Counters are plain numbers, cheap when nobody reads them; stats() returns a JSON-able snapshot.

import type { Box } from "./backend.ts";
import { PIPE_BUFFER, virglBytesPerPixel } from "./formats.ts";
import {
  VIRGL_CCMD_COPY_TRANSFER3D,
  VIRGL_CCMD_END_TRANSFERS,
  VIRGL_CCMD_NOP,
  VIRGL_CCMD_PIPE_RESOURCE_CREATE,
  VIRGL_CCMD_RESOURCE_COPY_REGION,
  VIRGL_CCMD_RESOURCE_INLINE_WRITE,
  VIRGL_CCMD_TRANSFER3D,
} from "./virgl_stream.ts";

// ---- virgl stream numbers (virglrenderer src/virgl_protocol.h) ----
/** The enum virgl_context_cmd values the walker looks at (defined with the stream builder). */
export {
  VIRGL_CCMD_COPY_TRANSFER3D,
  VIRGL_CCMD_END_TRANSFERS,
  VIRGL_CCMD_NOP,
  VIRGL_CCMD_PIPE_RESOURCE_CREATE,
  VIRGL_CCMD_RESOURCE_COPY_REGION,
  VIRGL_CCMD_RESOURCE_INLINE_WRITE,
  VIRGL_CCMD_TRANSFER3D,
};
/** Command header: VIRGL_CMD0(cmd, obj, len) = cmd | obj << 8 | len << 16, len in dwords after the header. */
export const VIRGL_CMD_MASK = 0xff;
export const VIRGL_OBJ_SHIFT = 8;
export const VIRGL_LEN_SHIFT = 16;
/** VIRGL_RESOURCE_IW_*: dword indexes (header = 0); TRANSFER3D and COPY_TRANSFER3D share dwords 1..11. */
export const VIRGL_RESOURCE_IW_RES_HANDLE = 1;
export const VIRGL_RESOURCE_IW_LEVEL = 2;
export const VIRGL_RESOURCE_IW_USAGE = 3;
export const VIRGL_RESOURCE_IW_STRIDE = 4;
export const VIRGL_RESOURCE_IW_LAYER_STRIDE = 5;
export const VIRGL_RESOURCE_IW_X = 6;
export const VIRGL_RESOURCE_IW_Y = 7;
export const VIRGL_RESOURCE_IW_Z = 8;
export const VIRGL_RESOURCE_IW_W = 9;
export const VIRGL_RESOURCE_IW_H = 10;
export const VIRGL_RESOURCE_IW_D = 11;
export const VIRGL_RESOURCE_IW_DATA_START = 12;
/** VIRGL_TRANSFER3D_SIZE = 13 dwords: IW 1..11, DATA_OFFSET 12, DIRECTION 13. */
export const VIRGL_TRANSFER3D_SIZE = 13;
export const VIRGL_TRANSFER3D_DATA_OFFSET = 12;
export const VIRGL_TRANSFER3D_DIRECTION = 13;
export const VIRGL_TRANSFER_TO_HOST = 1;
export const VIRGL_TRANSFER_FROM_HOST = 2;
/** VIRGL_COPY_TRANSFER3D_SIZE = 14 dwords: IW 1..11, SRC_RES_HANDLE 12, SRC_RES_OFFSET 13, FLAGS 14. */
export const VIRGL_COPY_TRANSFER3D_SIZE = 14;
export const VIRGL_COPY_TRANSFER3D_SRC_RES_HANDLE = 12;
export const VIRGL_COPY_TRANSFER3D_SRC_RES_OFFSET = 13;
export const VIRGL_COPY_TRANSFER3D_FLAGS = 14;
export const VIRGL_COPY_TRANSFER3D_FLAGS_READ_FROM_HOST = 1 << 1;
/** VIRGL_PIPE_RES_CREATE_*: target 1, format 2, bind 3, width 4, height 5, depth 6, ..., blob_id 11. */
export const VIRGL_PIPE_RES_CREATE_TARGET = 1;
export const VIRGL_PIPE_RES_CREATE_FORMAT = 2;
export const VIRGL_PIPE_RES_CREATE_WIDTH = 4;
export const VIRGL_PIPE_RES_CREATE_HEIGHT = 5;
export const VIRGL_PIPE_RES_CREATE_BLOB_ID = 11;
const DWORD = 4;
/** Counters of destroyed resources / contexts kept for the summary (older ones are dropped). */
export const MAX_DEAD = 4096;

/** The counters kept per resource, per context and in total. */
export interface CopyCounters {
  /** Commands that named this resource / ran in this context. */
  commands: number;
  /** TRANSFER_TO_HOST_2D/3D: guest backing -> host resource. */
  transferToHostBytes: number;
  /** TRANSFER_FROM_HOST_3D: host resource -> guest backing. */
  transferFromHostBytes: number;
  /** VIRGL_CCMD_TRANSFER3D direction 1 inside SUBMIT_3D (guest backing -> resource). */
  streamToHostBytes: number;
  /** VIRGL_CCMD_TRANSFER3D direction 2 inside SUBMIT_3D (resource -> guest backing). */
  streamFromHostBytes: number;
  /** VIRGL_CCMD_COPY_TRANSFER3D from a staging resource into this one. */
  copyTransferToHostBytes: number;
  /** VIRGL_CCMD_COPY_TRANSFER3D with READ_FROM_HOST: this resource into a staging resource. */
  copyTransferFromHostBytes: number;
  /** VIRGL_CCMD_RESOURCE_INLINE_WRITE: data carried in the stream and copied into the resource. */
  inlineWriteBytes: number;
  /** Sum of the seven byte counters above: the copies the guest's commands cause. */
  bytesCopied: number;
  /** The display path: scanout pixels read back into the framebuffer because a consumer looked. */
  scanoutReadbackBytes: number;
  /** The display path: bytes handed to display clients (web pages, a vhost-user front end, screenshots). */
  displaySentBytes: number;
  /** RESOURCE_MAP_BLOB calls that succeeded, and their bytes (page rounded). */
  blobMaps: number;
  blobMappedBytes: number;
  /** Bytes shown from blobs (RESOURCE_FLUSH of a SET_SCANOUT_BLOB scanout) that needed no transfer. */
  copiesAvoidedBytes: number;
  /** Byte counts that used an estimate because the resource's format is unknown here. */
  estimated: number;
}

export type CopyKind =
  | "transferToHostBytes"
  | "transferFromHostBytes"
  | "streamToHostBytes"
  | "streamFromHostBytes"
  | "copyTransferToHostBytes"
  | "copyTransferFromHostBytes"
  | "inlineWriteBytes";

const COPY_KINDS: readonly CopyKind[] = [
  "transferToHostBytes",
  "transferFromHostBytes",
  "streamToHostBytes",
  "streamFromHostBytes",
  "copyTransferToHostBytes",
  "copyTransferFromHostBytes",
  "inlineWriteBytes",
];

export function emptyCounters(): CopyCounters {
  return {
    commands: 0,
    transferToHostBytes: 0,
    transferFromHostBytes: 0,
    streamToHostBytes: 0,
    streamFromHostBytes: 0,
    copyTransferToHostBytes: 0,
    copyTransferFromHostBytes: 0,
    inlineWriteBytes: 0,
    bytesCopied: 0,
    scanoutReadbackBytes: 0,
    displaySentBytes: 0,
    blobMaps: 0,
    blobMappedBytes: 0,
    copiesAvoidedBytes: 0,
    estimated: 0,
  };
}

/** What the accounting knows of a resource's layout (to turn a box into bytes). */
export interface ResourceShape {
  target: number;
  format: number;
}

/**
 * Bytes a transfer of `box` copies: rows of w pixels, h rows, d layers (virtio spec 5.7.6.8,
 * TRANSFER_*_3D; buffers count w bytes). Without a known format: `stride` x h x d when a stride is
 * given, else w x h x d, and `estimated` is true.
 */
export function boxBytes(
  box: Box,
  shape: ResourceShape | undefined,
  stride = 0,
): { bytes: number; estimated: boolean } {
  const w = box.w, h = Math.max(box.h, 1), d = Math.max(box.d, 1);
  if (shape?.target === PIPE_BUFFER) return { bytes: w, estimated: false };
  const bpp = shape ? virglBytesPerPixel(shape.format) : undefined;
  if (bpp !== undefined) return { bytes: w * h * d * bpp, estimated: false };
  return { bytes: (stride > 0 ? stride : w) * h * d, estimated: true };
}

/** One copy found in a virgl stream. */
export interface StreamCopy {
  command: "INLINE_WRITE" | "TRANSFER3D" | "COPY_TRANSFER3D";
  kind: CopyKind;
  resourceId: number;
  bytes: number;
  estimated: boolean;
  /** COPY_TRANSFER3D: the staging resource. */
  srcResourceId?: number;
}

/** A PIPE_RESOURCE_CREATE seen in a stream (lets a later HOST3D blob with that blob_id get a shape). */
export interface StreamResourceCreate {
  blobId: number;
  target: number;
  format: number;
  width: number;
  height: number;
}

export interface StreamWalk {
  commands: number;
  copies: StreamCopy[];
  creates: StreamResourceCreate[];
  /** True when a command's length ran past the end of the stream (walk stopped there). */
  truncated: boolean;
}

/**
 * Walk a virgl command stream (dword headers, little-endian) and list the copies it asks for.
 * Never throws and never modifies `stream`; a trailing partial dword is ignored.
 */
export function walkVirglStream(stream: Uint8Array, shapeOf: (res: number) => ResourceShape | undefined): StreamWalk {
  const v = new DataView(stream.buffer, stream.byteOffset, stream.byteLength);
  const ndw = Math.floor(stream.byteLength / DWORD);
  const out: StreamWalk = { commands: 0, copies: [], creates: [], truncated: false };
  const dw = (i: number) => v.getUint32(i * DWORD, true);
  let i = 0;
  while (i < ndw) {
    const header = dw(i);
    const cmd = header & VIRGL_CMD_MASK;
    const len = header >>> VIRGL_LEN_SHIFT;
    if (i + 1 + len > ndw) {
      out.truncated = true;
      break;
    }
    out.commands++;
    const at = (k: number) => dw(i + k);
    const box = (): Box => ({
      x: at(VIRGL_RESOURCE_IW_X),
      y: at(VIRGL_RESOURCE_IW_Y),
      z: at(VIRGL_RESOURCE_IW_Z),
      w: at(VIRGL_RESOURCE_IW_W),
      h: at(VIRGL_RESOURCE_IW_H),
      d: at(VIRGL_RESOURCE_IW_D),
    });
    if (cmd === VIRGL_CCMD_RESOURCE_INLINE_WRITE && len >= VIRGL_RESOURCE_IW_D) {
      const res = at(VIRGL_RESOURCE_IW_RES_HANDLE);
      const payload = (len - VIRGL_RESOURCE_IW_D) * DWORD;
      const b = boxBytes(box(), shapeOf(res), at(VIRGL_RESOURCE_IW_STRIDE));
      // The data copied is the box, at most what the stream carries (rows may be padded to dwords).
      const bytes = b.estimated ? payload : Math.min(b.bytes, payload);
      out.copies.push({ command: "INLINE_WRITE", kind: "inlineWriteBytes", resourceId: res, bytes, estimated: false });
    } else if (cmd === VIRGL_CCMD_TRANSFER3D && len >= VIRGL_TRANSFER3D_SIZE) {
      const res = at(VIRGL_RESOURCE_IW_RES_HANDLE);
      const dir = at(VIRGL_TRANSFER3D_DIRECTION);
      const b = boxBytes(box(), shapeOf(res), at(VIRGL_RESOURCE_IW_STRIDE));
      if (dir === VIRGL_TRANSFER_TO_HOST || dir === VIRGL_TRANSFER_FROM_HOST) {
        out.copies.push({
          command: "TRANSFER3D",
          kind: dir === VIRGL_TRANSFER_TO_HOST ? "streamToHostBytes" : "streamFromHostBytes",
          resourceId: res,
          bytes: b.bytes,
          estimated: b.estimated,
        });
      }
    } else if (cmd === VIRGL_CCMD_COPY_TRANSFER3D && len >= VIRGL_COPY_TRANSFER3D_SIZE) {
      const res = at(VIRGL_RESOURCE_IW_RES_HANDLE);
      const fromHost = (at(VIRGL_COPY_TRANSFER3D_FLAGS) & VIRGL_COPY_TRANSFER3D_FLAGS_READ_FROM_HOST) !== 0;
      const b = boxBytes(box(), shapeOf(res), at(VIRGL_RESOURCE_IW_STRIDE));
      out.copies.push({
        command: "COPY_TRANSFER3D",
        kind: fromHost ? "copyTransferFromHostBytes" : "copyTransferToHostBytes",
        resourceId: res,
        bytes: b.bytes,
        estimated: b.estimated,
        srcResourceId: at(VIRGL_COPY_TRANSFER3D_SRC_RES_HANDLE),
      });
    } else if (cmd === VIRGL_CCMD_PIPE_RESOURCE_CREATE && len >= VIRGL_PIPE_RES_CREATE_BLOB_ID) {
      out.creates.push({
        blobId: at(VIRGL_PIPE_RES_CREATE_BLOB_ID),
        target: at(VIRGL_PIPE_RES_CREATE_TARGET),
        format: at(VIRGL_PIPE_RES_CREATE_FORMAT),
        width: at(VIRGL_PIPE_RES_CREATE_WIDTH),
        height: at(VIRGL_PIPE_RES_CREATE_HEIGHT),
      });
    }
    i += 1 + len;
  }
  return out;
}

/** Who made the display read a scanout back (display.ts refresh). */
export type DisplayConsumer = "screenshot" | "snapshot" | "web" | "vhostUser" | "lastFrame";
/** Who display bytes were handed to. */
export type DisplayClient = "screenshot" | "web" | "vhostUser";

const CONSUMERS: readonly DisplayConsumer[] = ["screenshot", "snapshot", "web", "vhostUser", "lastFrame"];
const CLIENTS: readonly DisplayClient[] = ["screenshot", "web", "vhostUser"];

/** The display path's counters of one scanout. */
export interface ScanoutCounters {
  /** RESOURCE_FLUSH commands that reached this scanout, and the bytes they damaged (area x 4). */
  flushes: number;
  damagedBytes: number;
  /** Read-backs of damaged rectangles into the framebuffer, and their bytes. */
  readbacks: number;
  readbackBytes: number;
  /**
   * readbackBytes by who asked: a screenshot, a snapshot, a web page, a vhost-user front end, or
   * lastFrame (the scanout was disabled with damage pending: its last frame is kept).
   */
  readbackBy: Record<DisplayConsumer, number>;
  /** Of readbackBytes: read from a SET_SCANOUT_BLOB scanout's blob (its memory, no transfer command). */
  readbackFromBlobBytes: number;
  /** Bytes handed to display clients: web pages' rectangle messages, vhost-user UPDATE pixels, PNGs. */
  sentTo: Record<DisplayClient, number>;
  screenshots: number;
}

export function emptyScanoutCounters(): ScanoutCounters {
  return {
    flushes: 0,
    damagedBytes: 0,
    readbacks: 0,
    readbackBytes: 0,
    readbackBy: Object.fromEntries(CONSUMERS.map((c) => [c, 0])) as Record<DisplayConsumer, number>,
    readbackFromBlobBytes: 0,
    sentTo: Object.fromEntries(CLIENTS.map((c) => [c, 0])) as Record<DisplayClient, number>,
    screenshots: 0,
  };
}

/** One display copy, for the trace. */
export interface DisplayCopyEvent {
  kind: "readback" | "sent";
  scanout: number;
  /** The consumer (read-back) or the client (sent). */
  who: DisplayConsumer | DisplayClient;
  /** The resource read (read-back), or 0. */
  resourceId: number;
  bytes: number;
  /** Microseconds the read-back took (0 for sent bytes). */
  us: number;
}

/** Per command type: how often, how many failed, bytes copied and time spent. */
export interface CommandCounters {
  count: number;
  errors: number;
  bytes: number;
  totalUs: number;
}

/** The JSON-able snapshot returned by GpuDevice.gpuStats(). */
export interface GpuStats {
  backend: string;
  totals: CopyCounters;
  resources: Record<string, CopyCounters & { live: boolean }>;
  contexts: Record<string, CopyCounters & { live: boolean }>;
  commands: Record<string, CommandCounters>;
  /** SUBMIT_3D streams walked and virgl commands seen in them. */
  streams: { submits: number; virglCommands: number; truncated: number; streamBytes: number };
  /** The display path per scanout (only scanouts that were flushed or looked at). */
  scanouts: Record<string, ScanoutCounters>;
  /** Blobs mapped right now and their bytes. */
  mapped: { count: number; bytes: number };
  fences: { created: number; retired: number; pending: number };
}

export class GpuAccounting {
  readonly totals = emptyCounters();
  readonly #resources = new Map<number, CopyCounters & { live: boolean }>();
  readonly #contexts = new Map<number, CopyCounters & { live: boolean }>();
  readonly #commands = new Map<string, CommandCounters>();
  readonly #deadResources: number[] = [];
  readonly #deadContexts: number[] = [];
  readonly #scanouts = new Map<number, ScanoutCounters>();
  /** Sees every display copy (the device's trace). */
  onDisplayCopy: ((e: DisplayCopyEvent) => void) | undefined;
  readonly streams = { submits: 0, virglCommands: 0, truncated: 0, streamBytes: 0 };
  readonly mapped = { count: 0, bytes: 0 };
  readonly fences = { created: 0, retired: 0, pending: 0 };

  constructor(readonly backend: string) {}

  resource(id: number): CopyCounters & { live: boolean } {
    let c = this.#resources.get(id);
    if (!c) this.#resources.set(id, c = { ...emptyCounters(), live: true });
    return c;
  }
  context(id: number): CopyCounters & { live: boolean } {
    let c = this.#contexts.get(id);
    if (!c) this.#contexts.set(id, c = { ...emptyCounters(), live: true });
    return c;
  }

  /** Mark a resource or context gone (its counters stay for the summary, the newest MAX_DEAD of them). */
  resourceGone(id: number): void {
    this.#gone(this.#resources, this.#deadResources, id);
  }
  contextGone(id: number): void {
    this.#gone(this.#contexts, this.#deadContexts, id);
  }

  #gone(m: Map<number, { live: boolean }>, dead: number[], id: number): void {
    const c = m.get(id);
    if (!c) return;
    c.live = false;
    dead.push(id);
    while (dead.length > MAX_DEAD) {
      const old = dead.shift()!;
      if (m.get(old)?.live === false) m.delete(old);
    }
  }
  resourceCreated(id: number): void {
    this.resource(id).live = true;
  }
  contextCreated(id: number): void {
    this.context(id).live = true;
  }

  /** Count one command touching `res` (0 = none) in `ctx` (0 = none). */
  touch(res: number, ctx: number): void {
    this.totals.commands++;
    if (res) this.resource(res).commands++;
    if (ctx) this.context(ctx).commands++;
  }

  /** Count `bytes` copied of `kind` for `res` in `ctx`. */
  copy(kind: CopyKind, bytes: number, res: number, ctx: number, estimated = false): void {
    const targets = [this.totals];
    if (res) targets.push(this.resource(res));
    if (ctx) targets.push(this.context(ctx));
    for (const t of targets) {
      t[kind] += bytes;
      t.bytesCopied += bytes;
      if (estimated) t.estimated++;
    }
  }

  mapBlob(res: number, ctx: number, bytes: number): void {
    for (const t of [this.totals, this.resource(res), ...(ctx ? [this.context(ctx)] : [])]) {
      t.blobMaps++;
      t.blobMappedBytes += bytes;
    }
    this.mapped.count++;
    this.mapped.bytes += bytes;
  }
  unmapBlob(bytes: number): void {
    this.mapped.count--;
    this.mapped.bytes -= bytes;
  }

  avoided(res: number, bytes: number): void {
    this.totals.copiesAvoidedBytes += bytes;
    this.resource(res).copiesAvoidedBytes += bytes;
  }

  /** The counters of scanout `id` (the display checked the id). */
  scanout(id: number): ScanoutCounters {
    let c = this.#scanouts.get(id);
    if (!c) this.#scanouts.set(id, c = emptyScanoutCounters());
    return c;
  }

  /** RESOURCE_FLUSH damaged `bytes` of scanout `id`. */
  scanoutFlush(id: number, bytes: number): void {
    const c = this.scanout(id);
    c.flushes++;
    c.damagedBytes += bytes;
  }

  /** `bytes` of resource `res` read back into scanout `id`'s framebuffer for `consumer`. */
  scanoutReadback(id: number, consumer: DisplayConsumer, res: number, bytes: number, fromBlob: boolean, us = 0): void {
    const c = this.scanout(id);
    c.readbacks++;
    c.readbackBytes += bytes;
    c.readbackBy[consumer] += bytes;
    if (fromBlob) c.readbackFromBlobBytes += bytes;
    this.totals.scanoutReadbackBytes += bytes;
    if (res) this.resource(res).scanoutReadbackBytes += bytes;
    this.onDisplayCopy?.({ kind: "readback", scanout: id, who: consumer, resourceId: res, bytes, us });
  }

  /** `bytes` of scanout `id` handed to a display client. */
  displaySent(id: number, client: DisplayClient, bytes: number): void {
    const c = this.scanout(id);
    c.sentTo[client] += bytes;
    if (client === "screenshot") c.screenshots++;
    this.totals.displaySentBytes += bytes;
    this.onDisplayCopy?.({ kind: "sent", scanout: id, who: client, resourceId: 0, bytes, us: 0 });
  }

  /** Record one command's outcome for the per-type table. */
  command(name: string, ok: boolean, bytes: number, us: number): void {
    let c = this.#commands.get(name);
    if (!c) this.#commands.set(name, c = { count: 0, errors: 0, bytes: 0, totalUs: 0 });
    c.count++;
    if (!ok) c.errors++;
    c.bytes += bytes;
    c.totalUs += us;
  }

  stats(): GpuStats {
    const rec = <T>(m: Map<number, T>) => Object.fromEntries([...m].map(([k, v]) => [String(k), { ...v }]));
    return {
      backend: this.backend,
      totals: { ...this.totals },
      resources: rec(this.#resources),
      contexts: rec(this.#contexts),
      commands: Object.fromEntries([...this.#commands].map(([k, v]) => [k, { ...v }])),
      scanouts: Object.fromEntries(
        [...this.#scanouts].map((
          [k, v],
        ) => [String(k), { ...v, readbackBy: { ...v.readbackBy }, sentTo: { ...v.sentTo } }]),
      ),
      streams: { ...this.streams },
      mapped: { ...this.mapped },
      fences: { ...this.fences },
    };
  }

  /** A few human lines: totals, top resources by bytes copied, commands. */
  summary(): string {
    const t = this.totals;
    const lines = [
      `virtio-gpu (${this.backend}): ${fmtBytes(t.bytesCopied)} copied in ${t.commands} commands; ` +
      `blobs mapped ${t.blobMaps} times (${fmtBytes(t.blobMappedBytes)}), copies avoided ${
        fmtBytes(t.copiesAvoidedBytes)
      }`,
      `  virtio transfers: to host ${fmtBytes(t.transferToHostBytes)}, from host ${fmtBytes(t.transferFromHostBytes)}`,
      `  in SUBMIT_3D (${this.streams.submits} streams, ${this.streams.virglCommands} virgl commands): ` +
      `TRANSFER3D to host ${fmtBytes(t.streamToHostBytes)}, from host ${fmtBytes(t.streamFromHostBytes)}; ` +
      `COPY_TRANSFER3D to host ${fmtBytes(t.copyTransferToHostBytes)}, from host ${
        fmtBytes(t.copyTransferFromHostBytes)
      }; INLINE_WRITE ${fmtBytes(t.inlineWriteBytes)}`,
      `  display: read back ${fmtBytes(t.scanoutReadbackBytes)}, sent to display clients ${
        fmtBytes(t.displaySentBytes)
      }`,
    ];
    for (const [id, c] of [...this.#scanouts].sort((a, b) => a[0] - b[0])) {
      const by = (r: Record<string, number>) =>
        Object.entries(r).filter(([, n]) => n > 0).map(([k, n]) => `${k} ${fmtBytes(n)}`).join(", ") || "none";
      lines.push(
        `  scanout ${id}: ${c.flushes} flushes damaged ${fmtBytes(c.damagedBytes)}; read back ${
          fmtBytes(c.readbackBytes)
        } in ${c.readbacks} (${by(c.readbackBy)}; from blobs ${fmtBytes(c.readbackFromBlobBytes)}); sent ${
          by(c.sentTo)
        }`,
      );
    }
    const top = [...this.#resources].filter(([, c]) => c.bytesCopied > 0).sort((a, b) =>
      b[1].bytesCopied - a[1].bytesCopied
    ).slice(0, 5);
    for (const [id, c] of top) {
      const parts = COPY_KINDS.filter((k) => c[k] > 0).map((k) => `${k.replace(/Bytes$/, "")} ${fmtBytes(c[k])}`);
      lines.push(`  resource ${id}: ${fmtBytes(c.bytesCopied)} (${parts.join(", ")})`);
    }
    return lines.join("\n");
  }
}

export function fmtBytes(n: number): string {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  if (n < 1024 ** 3) return `${(n / 1024 / 1024).toFixed(1)} MiB`;
  return `${(n / 1024 ** 3).toFixed(2)} GiB`;
}
