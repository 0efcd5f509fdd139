// The control socket's protocol (`run -s/--socket PATH`; the socket itself is server.ts): each packet is one
// JSON request and gets one JSON reply packet, speaking the same JSON as crosvm's control socket
// (google/crosvm vm_control/src/lib.rs: enum VmRequest / VmResponse, serde's externally tagged enums:
// a unit variant is a bare string, a variant with data is a one-key object). A crosvm client can
// therefore stop, suspend, resume, power off or balloon a denovm VM.
//
// Requests understood (crosvm's spelling first, then denovm's extensions):
//   "Exit"                                                        → handler.stop()      (reply sent first)
//   "SuspendVcpus" | "SuspendVm"                                  → handler.suspend()
//   "ResumeVcpus" | "ResumeVm"                                    → handler.resume()
//   "Powerbtn"                                                    → handler.powerButton()
//   {"BalloonCommand":{"Adjust":{"num_bytes":N,"wait_for_success":B}}} → handler.balloonAdjust(N)
//   {"BalloonCommand":"Stats"}                                    → handler.balloonStats()
//   {"DiskCommand":{"disk_index":I,"command":{"Resize":{"new_size":N}}}} → handler.diskResize(I, N)
//   {"GpuCommand":"ListDisplays"}                                 → handler.gpuListDisplays()
//   {"Snapshot":{"Take":{"snapshot_path":P,...}}}                 → handler.snapshotTake?.(P)
//   denovm only (not in crosvm; names start with "Denovm" so they can never collide with a crosvm variant):
//   "DenovmGpuStats"                                              → handler.gpuStats()
//   {"DenovmScreenshot":{"path":P}}                               → handler.screenshot(P)  (P absolute)
// Replies, in crosvm's VmResponse shapes:
//   "Ok"; {"BalloonStats":{"stats":{...},"balloon_actual":N}}; {"GpuResponse":{"DisplayList":{"displays":{...}}}};
//   {"ErrString":"..."} for every error (crosvm's VmResponse::ErrString(String), which its client prints);
//   denovm only: {"DenovmGpuStats":{...}}.
// serde also accepts a unit variant written as {"Name":null}; so does this parser.
//
// This module decodes and encodes requests and replies, and maps a decoded request onto the ControlHandler.

/** Largest request packet accepted; a bigger one gets an error reply. */
export const MAX_REQUEST_BYTES = 64 * 1024;

/** balloon_control::BalloonStats field names (crosvm common/balloon_control/src/lib.rs); each u64 or null. */
export const BALLOON_STAT_NAMES = [
  "swap_in",
  "swap_out",
  "major_faults",
  "minor_faults",
  "free_memory",
  "total_memory",
  "available_memory",
  "disk_caches",
  "hugetlb_allocations",
  "hugetlb_failures",
  "shared_memory",
  "unevictable_memory",
] as const;

export type BalloonStatName = typeof BALLOON_STAT_NAMES[number];

/** What handler.balloonStats() returns: crosvm's VmResponse::BalloonStats fields. */
export interface BalloonStatsReply {
  stats: Partial<Record<BalloonStatName, number | null>>;
  /** Bytes currently held by the balloon (the device's `actual` config field in pages × 4096). */
  balloon_actual: number;
}

/** One display in crosvm's DisplayParameters serde shape, e.g. {"mode":{"windowed":[1280,1024]},...}. */
export interface DisplayParametersJson {
  mode: Record<string, unknown>;
  hidden: boolean;
  refresh_rate: number;
  dpi: [number, number];
}

/** What handler.gpuListDisplays() returns: display id → parameters (crosvm GpuControlResult::DisplayList). */
export interface DisplayListReply {
  displays: Record<string, DisplayParametersJson | Record<string, unknown>>;
}

/**
 * What the VM does for each request. A method may throw (e.g. Error("not available: no balloon device"));
 * the message becomes the error reply and the VM keeps running.
 */
export interface ControlHandler {
  stop(): Promise<void>;
  suspend(): Promise<void>;
  resume(): Promise<void>;
  powerButton(): Promise<void>;
  balloonAdjust(bytes: number): Promise<void>;
  balloonStats(): Promise<BalloonStatsReply>;
  diskResize(index: number, bytes: number): Promise<void>;
  gpuListDisplays(): Promise<DisplayListReply>;
  gpuStats(): Promise<object>;
  /** Write a PNG of the current scanout to `path` (an absolute path chosen by the client). */
  screenshot(path: string): Promise<void>;
  /** crosvm `snapshot take PATH`; optional: without it the request gets "not available". */
  snapshotTake?(path: string): Promise<void>;
}

/** A decoded control request. */
export type ControlRequest =
  | { kind: "stop" }
  | { kind: "suspend" }
  | { kind: "resume" }
  | { kind: "powerbtn" }
  | { kind: "balloonAdjust"; bytes: number }
  | { kind: "balloonStats" }
  | { kind: "diskResize"; index: number; bytes: number }
  | { kind: "gpuListDisplays" }
  | { kind: "gpuStats" }
  | { kind: "screenshot"; path: string }
  | { kind: "snapshotTake"; path: string };

/** A request the server cannot act on; its message goes back as {"ErrString": message}. */
export class BadRequest extends Error {
  constructor(message: string) {
    super(message);
    this.name = "BadRequest";
  }
}

/** serde's externally tagged enum value → [variant name, payload]; a bare string is a unit variant. */
function variant(v: unknown, what: string): [string, unknown] {
  if (typeof v === "string") return [v, null];
  if (v !== null && typeof v === "object" && !Array.isArray(v)) {
    const keys = Object.keys(v);
    if (keys.length === 1) return [keys[0], (v as Record<string, unknown>)[keys[0]]];
  }
  throw new BadRequest(`${what}: expected a variant name or a one-key object, got ${short(v)}`);
}

function short(v: unknown): string {
  const s = JSON.stringify(v) ?? String(v);
  return s.length > 80 ? s.slice(0, 77) + "..." : s;
}

function field(obj: unknown, name: string, what: string): unknown {
  if (obj === null || typeof obj !== "object" || Array.isArray(obj)) {
    throw new BadRequest(`${what}: expected an object, got ${short(obj)}`);
  }
  if (!Object.hasOwn(obj, name)) throw new BadRequest(`${what}: missing field "${name}"`);
  return (obj as Record<string, unknown>)[name];
}

/** A JSON u64 that a JS number holds exactly. */
function u64(v: unknown, what: string): number {
  if (typeof v !== "number" || !Number.isSafeInteger(v) || v < 0) {
    throw new BadRequest(`${what}: expected an unsigned integer below 2^53, got ${short(v)}`);
  }
  return v;
}

function pathField(v: unknown, what: string): string {
  if (typeof v !== "string" || v === "" || v.includes("\0")) throw new BadRequest(`${what}: expected a path`);
  return v;
}

function unit(payload: unknown, name: string): void {
  if (payload !== null) throw new BadRequest(`${name} takes no data, got ${short(payload)}`);
}

/** Decode one parsed JSON request; throws BadRequest. */
export function decodeRequest(json: unknown): ControlRequest {
  const [name, payload] = variant(json, "request");
  switch (name) {
    case "Exit":
      unit(payload, name);
      return { kind: "stop" };
    case "SuspendVcpus":
    case "SuspendVm":
      unit(payload, name);
      return { kind: "suspend" };
    case "ResumeVcpus":
    case "ResumeVm":
      unit(payload, name);
      return { kind: "resume" };
    case "Powerbtn":
      unit(payload, name);
      return { kind: "powerbtn" };
    case "BalloonCommand": {
      const [cmd, data] = variant(payload, "BalloonCommand");
      if (cmd === "Adjust") {
        const bytes = u64(field(data, "num_bytes", "BalloonCommand Adjust"), "num_bytes");
        return { kind: "balloonAdjust", bytes };
      }
      if (cmd === "Stats") {
        unit(data, "BalloonCommand Stats");
        return { kind: "balloonStats" };
      }
      throw new BadRequest(`unsupported balloon command "${cmd}"`);
    }
    case "DiskCommand": {
      const index = u64(field(payload, "disk_index", "DiskCommand"), "disk_index");
      const [cmd, data] = variant(field(payload, "command", "DiskCommand"), "DiskCommand command");
      if (cmd !== "Resize") throw new BadRequest(`unsupported disk command "${cmd}"`);
      return { kind: "diskResize", index, bytes: u64(field(data, "new_size", "DiskCommand Resize"), "new_size") };
    }
    case "GpuCommand": {
      const [cmd, data] = variant(payload, "GpuCommand");
      if (cmd !== "ListDisplays") throw new BadRequest(`unsupported gpu command "${cmd}"`);
      unit(data, "GpuCommand ListDisplays");
      return { kind: "gpuListDisplays" };
    }
    case "Snapshot": {
      const [cmd, data] = variant(payload, "Snapshot");
      if (cmd !== "Take") throw new BadRequest(`unsupported snapshot command "${cmd}"`);
      return { kind: "snapshotTake", path: pathField(field(data, "snapshot_path", "Snapshot Take"), "snapshot_path") };
    }
    case "DenovmGpuStats":
      unit(payload, name);
      return { kind: "gpuStats" };
    case "DenovmScreenshot":
      return { kind: "screenshot", path: pathField(field(payload, "path", "DenovmScreenshot"), "path") };
    default:
      throw new BadRequest(`unsupported request "${name}"`);
  }
}

/** Encode a request the way the client sends it (crosvm's JSON where crosvm has the request). */
export function encodeRequest(req: ControlRequest): unknown {
  switch (req.kind) {
    case "stop":
      return "Exit";
    case "suspend":
      return "SuspendVcpus";
    case "resume":
      return "ResumeVcpus";
    case "powerbtn":
      return "Powerbtn";
    case "balloonAdjust":
      return { BalloonCommand: { Adjust: { num_bytes: req.bytes, wait_for_success: false } } };
    case "balloonStats":
      return { BalloonCommand: "Stats" };
    case "diskResize":
      return { DiskCommand: { disk_index: req.index, command: { Resize: { new_size: req.bytes } } } };
    case "gpuListDisplays":
      return { GpuCommand: "ListDisplays" };
    case "gpuStats":
      return "DenovmGpuStats";
    case "screenshot":
      return { DenovmScreenshot: { path: req.path } };
    case "snapshotTake":
      return { Snapshot: { Take: { snapshot_path: req.path, compress_memory: false, encrypt: false } } };
  }
}

/** crosvm VmResponse::Ok. */
export const REPLY_OK = "Ok";

function errReply(message: string): unknown {
  return { ErrString: message };
}

export function errorText(e: unknown): string {
  return e instanceof Error ? (e.message || e.name) : String(e);
}

/** Run one decoded request against the handler; returns the reply value. `after` runs once the reply is sent. */
async function execute(req: ControlRequest, h: ControlHandler): Promise<{ reply: unknown; after?: () => void }> {
  switch (req.kind) {
    case "stop":
      // crosvm answers Ok and then leaves its run loop; stopping may close this very server, so the
      // reply goes out first and stop() runs after it.
      return {
        reply: REPLY_OK,
        after: () => void h.stop().catch((e) => console.error(`denovm: control: stop failed: ${errorText(e)}`)),
      };
    case "suspend":
      await h.suspend();
      return { reply: REPLY_OK };
    case "resume":
      await h.resume();
      return { reply: REPLY_OK };
    case "powerbtn":
      await h.powerButton();
      return { reply: REPLY_OK };
    case "balloonAdjust":
      await h.balloonAdjust(req.bytes);
      return { reply: REPLY_OK };
    case "balloonStats": {
      const r = await h.balloonStats();
      const stats: Record<string, number | null> = {};
      for (const k of BALLOON_STAT_NAMES) stats[k] = r.stats[k] ?? null;
      return { reply: { BalloonStats: { stats, balloon_actual: r.balloon_actual } } };
    }
    case "diskResize":
      await h.diskResize(req.index, req.bytes);
      return { reply: REPLY_OK };
    case "gpuListDisplays": {
      const r = await h.gpuListDisplays();
      return { reply: { GpuResponse: { DisplayList: { displays: r.displays } } } };
    }
    case "gpuStats":
      return { reply: { DenovmGpuStats: await h.gpuStats() } };
    case "screenshot":
      await h.screenshot(req.path);
      return { reply: REPLY_OK };
    case "snapshotTake":
      if (!h.snapshotTake) throw new Error("not available: snapshots are not supported by this VM");
      await h.snapshotTake(req.path);
      return { reply: REPLY_OK };
  }
}

/** Turn one request packet into a reply (never throws). */
export async function handlePacket(
  packet: Uint8Array,
  h: ControlHandler,
): Promise<{ reply: unknown; after?: () => void }> {
  if (packet.length > MAX_REQUEST_BYTES) {
    return { reply: errReply(`request too large (more than ${MAX_REQUEST_BYTES} bytes)`) };
  }
  let json: unknown;
  try {
    json = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(packet));
  } catch (e) {
    return { reply: errReply(`malformed request: ${errorText(e)}`) };
  }
  let req: ControlRequest;
  try {
    req = decodeRequest(json);
  } catch (e) {
    return { reply: errReply(errorText(e)) };
  }
  try {
    return await execute(req, h);
  } catch (e) {
    return { reply: errReply(errorText(e)) };
  }
}

/** A reply as one packet; a handler result JSON cannot hold (a BigInt, a cycle) becomes an error reply. */
export function encodeReply(reply: unknown): Uint8Array {
  let text: string;
  try {
    text = JSON.stringify(reply);
  } catch (e) {
    text = JSON.stringify(errReply(`cannot encode the reply: ${errorText(e)}`));
  }
  return new TextEncoder().encode(text);
}
