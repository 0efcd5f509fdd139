// The control socket's protocol (`run -s/--socket PATH`; the socket itself is server.ts): each packet is one
// JSON request and gets one JSON reply packet, speaking the same JSON as crosvm's control socket
// (google/crosvm vm_control/src/lib.rs: enum VmRequest / VmResponse, serde's externally tagged enums:
// a unit variant is a bare string, a variant with data is a one-key object). A crosvm client can
// therefore stop, suspend, resume, power off or balloon a denovm VM.
//
// Requests understood (crosvm's spelling first, then denovm's extensions):
//   "Exit"                                                        → handler.stop()      (reply sent first)
//   "SuspendVcpus" | "SuspendVm"                                  → handler.suspend(false | true)
//   "ResumeVcpus" | "ResumeVm"                                    → handler.resume(false | true)
//   "Powerbtn" | "Sleepbtn"                                       → handler.powerButton() | sleepButton()
//   {"BalloonCommand":{"Adjust":{"num_bytes":N,"wait_for_success":B}}} → handler.balloonAdjust(N, B)
//   {"BalloonCommand":"Stats"}                                    → handler.balloonStats()
//   {"BalloonCommand":"WorkingSet"}                               → handler.balloonWorkingSet()
//   {"DiskCommand":{"disk_index":I,"command":{"Resize":{"new_size":N}}}} → handler.diskResize(I, N)
//   {"GpuCommand":"ListDisplays"}                                 → handler.gpuListDisplays()
//   {"GpuCommand":{"AddDisplays":{"displays":[...]}}}             → handler.gpuAddDisplays(displays)
//   {"GpuCommand":{"RemoveDisplays":{"display_ids":[...]}}}       → handler.gpuRemoveDisplays(ids)
//   {"GpuCommand":{"SetDisplayMouseMode":{"display_id":I,"mouse_mode":M}}} → handler.gpuSetMouseMode(I, M)
//   {"SndCommand":{"MuteAll":B}}                                 → handler.sndMuteAll(B)  (crosvm's snd mute-all)
//   {"Snapshot":{"Take":{"snapshot_path":P,"compress_memory":B,"encrypt":B}}} → handler.snapshot(P, {B, B})
//     (crosvm's SnapshotCommand::Take; all three fields are required, as serde requires them; a relative P is
//     taken from the VM's working directory, as crosvm takes it, though denovm's own client sends it absolute)
//   denovm only (not in crosvm; names start with "Denovm" so they can never collide with a crosvm variant):
//   "DenovmGpuStats"                                              → handler.gpuStats()
//   {"DenovmScreenshot":{"path":P}}                               → handler.screenshot(P)  (P absolute)
// Replies, in crosvm's VmResponse shapes:
//   "Ok"; {"BalloonStats":{"stats":{...},"balloon_actual":N}}; {"GpuResponse":{"DisplayList":{"displays":{...}}}};
//   {"GpuResponse": R} for the other GPU commands, R one of crosvm's GpuControlResult: "DisplaysUpdated",
//   "DisplayMouseModeSet", {"NoSuchDisplay":{"display_id":I}}, {"TooManyDisplays":{"allowed":A,"requested":N}},
//   {"ErrString":"..."};
//   {"ErrString":"..."} for every error (crosvm's VmResponse::ErrString(String), which its client prints; crosvm
//   answers a failed snapshot with {"Err":5}, EIO, and only logs why: denovm sends the reason instead, and
//   crosvm's client, which takes any reply but "Ok" as a failure, fails the same way on either);
//   denovm only: {"DenovmGpuStats":{...}}.
// serde also accepts a unit variant written as {"Name":null}; so does this parser.
//
// This module decodes and encodes requests and replies, and maps a decoded request onto the ControlHandler.

import { DEFAULT_DISPLAY_HEIGHT, DEFAULT_DISPLAY_WIDTH } from "../../devices/virtio/gpu/defaults.ts";

/** crosvm's display defaults beside the size (vm_control/src/gpu.rs DEFAULT_DPI, DEFAULT_REFRESH_RATE). */
export const DEFAULT_DPI = 320;
export const DEFAULT_REFRESH_RATE = 60;

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

/**
 * One display in crosvm's DisplayParameters serde shape (vm_control/src/gpu.rs, fields in kebab-case), e.g.
 * {"mode":{"windowed":[1280,1024]},"hidden":false,"refresh-rate":60,"dpi":[320,320]}.
 */
export interface DisplayParametersJson {
  mode: Record<string, unknown>;
  hidden: boolean;
  "refresh-rate": number;
  dpi: [number, number];
}

/** crosvm's mouse modes on Linux (vm_control/src/sys/linux/gpu.rs UnixMouseMode, snake_case). */
export const GPU_MOUSE_MODES = ["touchscreen"] as const;

/** crosvm's GpuControlResult for the commands that change displays, as serde writes it. */
export type GpuControlReply =
  | "DisplaysUpdated"
  | "DisplayMouseModeSet"
  | { NoSuchDisplay: { display_id: number } }
  | { TooManyDisplays: { allowed: number; requested: number } }
  | { ErrString: string };

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
  /** `full`: crosvm's SuspendVm (vCPUs and devices), else SuspendVcpus. */
  suspend(full: boolean): Promise<void>;
  /** `full`: crosvm's ResumeVm (devices and vCPUs), else ResumeVcpus. */
  resume(full: boolean): Promise<void>;
  powerButton(): Promise<void>;
  sleepButton(): Promise<void>;
  /** `wait`: resolve only once the balloon holds `bytes` (crosvm's wait_for_success). */
  balloonAdjust(bytes: number, wait: boolean): Promise<void>;
  balloonStats(): Promise<BalloonStatsReply>;
  /** crosvm's working-set report; throws when the balloon cannot give one. */
  balloonWorkingSet(): Promise<unknown>;
  diskResize(index: number, bytes: number): Promise<void>;
  gpuListDisplays(): Promise<DisplayListReply>;
  gpuAddDisplays(displays: DisplayParametersJson[]): Promise<GpuControlReply>;
  gpuRemoveDisplays(ids: number[]): Promise<GpuControlReply>;
  gpuSetMouseMode(id: number, mode: string): Promise<GpuControlReply>;
  gpuStats(): Promise<object>;
  /** Write a PNG of the current scanout to `path` (an absolute path chosen by the client). */
  screenshot(path: string): Promise<void>;
  /**
   * crosvm `snapshot take`: write a snapshot of the VM to directory `path` and put the VM back as it was
   * (running, or suspended when it was suspended).
   */
  snapshot(path: string, opts: SnapshotRequestOptions): Promise<void>;
  /** crosvm `snd mute-all`: every sound stream plays and records silence (true) or sound again (false). */
  sndMuteAll(muted: boolean): Promise<void>;
}

/** The switches of crosvm's SnapshotCommand::Take. */
export interface SnapshotRequestOptions {
  /** crosvm's compress_memory. */
  compressMemory: boolean;
  /** crosvm's encrypt. */
  encrypt: boolean;
}

/** A decoded control request. */
export type ControlRequest =
  | { kind: "stop" }
  | { kind: "suspend"; full: boolean }
  | { kind: "resume"; full: boolean }
  | { kind: "powerbtn" }
  | { kind: "sleepbtn" }
  /** `wait` (crosvm's wait_for_success) defaults to false. */
  | { kind: "balloonAdjust"; bytes: number; wait?: boolean }
  | { kind: "balloonStats" }
  | { kind: "balloonWs" }
  | { kind: "diskResize"; index: number; bytes: number }
  | { kind: "gpuListDisplays" }
  | { kind: "gpuAddDisplays"; displays: DisplayParametersJson[] }
  | { kind: "gpuRemoveDisplays"; ids: number[] }
  | { kind: "gpuSetMouseMode"; id: number; mode: string }
  | { kind: "gpuStats" }
  | { kind: "screenshot"; path: string }
  | { kind: "snapshot"; path: string; compressMemory: boolean; encrypt: boolean }
  | { kind: "sndMuteAll"; muted: boolean };

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

/** A JSON u32 (crosvm's display ids). */
function u32(v: unknown, what: string): number {
  const n = u64(v, what);
  if (n > 0xffff_ffff) throw new BadRequest(`${what}: ${n} does not fit in 32 bits`);
  return n;
}

function array(v: unknown, what: string): unknown[] {
  if (!Array.isArray(v)) throw new BadRequest(`${what}: expected an array, got ${short(v)}`);
  return v;
}

/** crosvm's DisplayParameters; its serde defaults fill what is left out (vm_control/src/gpu.rs). */
function displayParameters(v: unknown, what: string): DisplayParametersJson {
  if (v === null || typeof v !== "object" || Array.isArray(v)) throw new BadRequest(`${what}: expected an object`);
  const o = v as Record<string, unknown>;
  for (const k of Object.keys(o)) {
    if (!["mode", "hidden", "refresh-rate", "dpi"].includes(k)) throw new BadRequest(`${what}: unknown field "${k}"`);
  }
  let mode: Record<string, unknown> = { windowed: [DEFAULT_DISPLAY_WIDTH, DEFAULT_DISPLAY_HEIGHT] };
  if (o.mode !== undefined) {
    const [name, dims] = variant(o.mode, `${what} mode`);
    const wh = array(dims, `${what} mode ${name}`);
    if (name !== "windowed" || wh.length !== 2) throw new BadRequest(`${what}: mode must be {"windowed":[W,H]}`);
    mode = { windowed: [u32(wh[0], `${what} width`), u32(wh[1], `${what} height`)] };
  }
  if (o.hidden !== undefined && typeof o.hidden !== "boolean") throw new BadRequest(`${what}: hidden is a bool`);
  const dpi = o.dpi === undefined ? [DEFAULT_DPI, DEFAULT_DPI] : array(o.dpi, `${what} dpi`);
  if (dpi.length !== 2) throw new BadRequest(`${what}: dpi is [X,Y]`);
  return {
    mode,
    hidden: (o.hidden as boolean | undefined) ?? false,
    "refresh-rate": o["refresh-rate"] === undefined
      ? DEFAULT_REFRESH_RATE
      : u32(o["refresh-rate"], `${what} refresh-rate`),
    dpi: [u32(dpi[0], `${what} dpi`), u32(dpi[1], `${what} dpi`)],
  };
}

function pathField(v: unknown, what: string): string {
  if (typeof v !== "string" || v === "" || v.includes("\0")) throw new BadRequest(`${what}: expected a path`);
  return v;
}

function bool(v: unknown, what: string): boolean {
  if (typeof v !== "boolean") throw new BadRequest(`${what}: expected a bool, got ${short(v)}`);
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
      return { kind: "suspend", full: name === "SuspendVm" };
    case "ResumeVcpus":
    case "ResumeVm":
      unit(payload, name);
      return { kind: "resume", full: name === "ResumeVm" };
    case "Powerbtn":
      unit(payload, name);
      return { kind: "powerbtn" };
    case "Sleepbtn":
      unit(payload, name);
      return { kind: "sleepbtn" };
    case "BalloonCommand": {
      const [cmd, data] = variant(payload, "BalloonCommand");
      if (cmd === "Adjust") {
        const bytes = u64(field(data, "num_bytes", "BalloonCommand Adjust"), "num_bytes");
        const wait = (data as Record<string, unknown>).wait_for_success ?? false;
        if (typeof wait !== "boolean") throw new BadRequest(`wait_for_success: expected a bool, got ${short(wait)}`);
        return { kind: "balloonAdjust", bytes, wait };
      }
      if (cmd === "Stats") {
        unit(data, "BalloonCommand Stats");
        return { kind: "balloonStats" };
      }
      if (cmd === "WorkingSet") {
        unit(data, "BalloonCommand WorkingSet");
        return { kind: "balloonWs" };
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
      switch (cmd) {
        case "ListDisplays":
          unit(data, "GpuCommand ListDisplays");
          return { kind: "gpuListDisplays" };
        case "AddDisplays": {
          const list = array(field(data, "displays", "GpuCommand AddDisplays"), "displays");
          return { kind: "gpuAddDisplays", displays: list.map((d, i) => displayParameters(d, `displays[${i}]`)) };
        }
        case "RemoveDisplays": {
          const ids = array(field(data, "display_ids", "GpuCommand RemoveDisplays"), "display_ids");
          return { kind: "gpuRemoveDisplays", ids: ids.map((id) => u32(id, "display_ids")) };
        }
        case "SetDisplayMouseMode": {
          const id = u32(field(data, "display_id", "GpuCommand SetDisplayMouseMode"), "display_id");
          const [mode, extra] = variant(field(data, "mouse_mode", "GpuCommand SetDisplayMouseMode"), "mouse_mode");
          unit(extra, `mouse_mode ${mode}`);
          if (!(GPU_MOUSE_MODES as readonly string[]).includes(mode)) {
            throw new BadRequest(`mouse_mode: "${mode}" is not one of ${GPU_MOUSE_MODES.join(", ")}`);
          }
          return { kind: "gpuSetMouseMode", id, mode };
        }
      }
      throw new BadRequest(`unsupported gpu command "${cmd}"`);
    }
    case "Snapshot": {
      const [cmd, data] = variant(payload, "Snapshot");
      if (cmd !== "Take") throw new BadRequest(`unsupported snapshot command "${cmd}"`);
      const what = "Snapshot Take";
      return {
        kind: "snapshot",
        path: pathField(field(data, "snapshot_path", what), "snapshot_path"),
        compressMemory: bool(field(data, "compress_memory", what), "compress_memory"),
        encrypt: bool(field(data, "encrypt", what), "encrypt"),
      };
    }
    case "SndCommand": {
      // crosvm's SndControlCommand::MuteAll(bool), a newtype variant: {"MuteAll":true}.
      const [cmd, data] = variant(payload, "SndCommand");
      if (cmd !== "MuteAll") throw new BadRequest(`unsupported snd command "${cmd}"`);
      return { kind: "sndMuteAll", muted: bool(data, "MuteAll") };
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
      return req.full ? "SuspendVm" : "SuspendVcpus";
    case "resume":
      return req.full ? "ResumeVm" : "ResumeVcpus";
    case "powerbtn":
      return "Powerbtn";
    case "sleepbtn":
      return "Sleepbtn";
    case "balloonAdjust":
      return { BalloonCommand: { Adjust: { num_bytes: req.bytes, wait_for_success: req.wait ?? false } } };
    case "balloonStats":
      return { BalloonCommand: "Stats" };
    case "balloonWs":
      return { BalloonCommand: "WorkingSet" };
    case "diskResize":
      return { DiskCommand: { disk_index: req.index, command: { Resize: { new_size: req.bytes } } } };
    case "gpuListDisplays":
      return { GpuCommand: "ListDisplays" };
    case "gpuAddDisplays":
      return { GpuCommand: { AddDisplays: { displays: req.displays } } };
    case "gpuRemoveDisplays":
      return { GpuCommand: { RemoveDisplays: { display_ids: req.ids } } };
    case "gpuSetMouseMode":
      return { GpuCommand: { SetDisplayMouseMode: { display_id: req.id, mouse_mode: req.mode } } };
    case "gpuStats":
      return "DenovmGpuStats";
    case "screenshot":
      return { DenovmScreenshot: { path: req.path } };
    case "snapshot":
      // serde writes a struct variant's fields in declaration order (vm_control SnapshotCommand::Take).
      return {
        Snapshot: {
          Take: { snapshot_path: req.path, compress_memory: req.compressMemory, encrypt: req.encrypt },
        },
      };
    case "sndMuteAll":
      return { SndCommand: { MuteAll: req.muted } };
  }
}

/** crosvm VmResponse::Ok. */
export const REPLY_OK = "Ok";

/** crosvm VmResponse::ErrString: an error the client prints. */
export function errReply(message: string): unknown {
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
      await h.suspend(req.full);
      return { reply: REPLY_OK };
    case "resume":
      await h.resume(req.full);
      return { reply: REPLY_OK };
    case "powerbtn":
      await h.powerButton();
      return { reply: REPLY_OK };
    case "sleepbtn":
      await h.sleepButton();
      return { reply: REPLY_OK };
    case "balloonAdjust":
      await h.balloonAdjust(req.bytes, req.wait ?? false);
      return { reply: REPLY_OK };
    case "balloonWs":
      return { reply: { BalloonWS: await h.balloonWorkingSet() } };
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
    case "gpuAddDisplays":
      return { reply: { GpuResponse: await h.gpuAddDisplays(req.displays) } };
    case "gpuRemoveDisplays":
      return { reply: { GpuResponse: await h.gpuRemoveDisplays(req.ids) } };
    case "gpuSetMouseMode":
      return { reply: { GpuResponse: await h.gpuSetMouseMode(req.id, req.mode) } };
    case "gpuStats":
      return { reply: { DenovmGpuStats: await h.gpuStats() } };
    case "screenshot":
      await h.screenshot(req.path);
      return { reply: REPLY_OK };
    case "snapshot":
      await h.snapshot(req.path, { compressMemory: req.compressMemory, encrypt: req.encrypt });
      return { reply: REPLY_OK };
    case "sndMuteAll":
      await h.sndMuteAll(req.muted);
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
