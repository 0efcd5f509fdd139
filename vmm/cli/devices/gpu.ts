// The gpu family: `run --gpu [backend=]BACKEND[,key=value...]` with its displays (crosvm
// src/crosvm/gpu_config.rs, devices/src/virtio/gpu/parameters.rs GpuParameters) and `denovm device gpu`.
// See common.ts for how the family modules are organised.
//
// `denovm device gpu --socket-path PATH [options]`: the virtio-gpu device model
// (devices/virtio/gpu/device.ts) as a vhost-user back end for QEMU's vhost-user-gpu front end, with
// the display socket that carries scanouts and pixels to it (devices/vhost_user/gpu_socket.ts).
//
// Options (crosvm's `device gpu` takes `--params JSON` with GpuParameters keys; the same keys are
// accepted here, plus denovm's plain flags, which win):
//   --backend virglrenderer|3d|2d      rendering backend (default virglrenderer)
//   --context-types virgl:virgl2[:venus]   capsets offered (default virgl:virgl2)
//   --width W --height H               the display mode (default 1280x1024)
//   --trace PATH                       Chrome trace-event JSON of every command
//   --control-socket PATH              JSON lines: {"stats":true} answers the copy counters, the
//                                      device counters and the display socket's counters;
//                                      {"screenshot":"FILE.png"} writes scanout 0 as a PNG;
//                                      {"summary":true} answers the human summary
//   --params JSON                      crosvm GpuParameters subset: {"backend"|"mode": ...,
//                                      "context_types": "virgl:virgl2", "width": W, "height": H}

import {
  asScalarList,
  asUint,
  decodeKeyValues,
  type KvEntry,
  type KvSchema,
  type KvValue,
  parseKeyValues,
  parseOption,
  parseUint,
  UsageError,
} from "../keyvalue.ts";
import {
  DEFAULT_DISPLAY_HEIGHT,
  DEFAULT_DISPLAY_WIDTH,
  DEFAULT_GPU_HOST_VISIBLE_WINDOW_SIZE,
  type GpuBackend as GpuBackendName,
  type GpuConfig,
  gpuConfig,
  type GpuDisplayConfig,
} from "../../config.ts";
import { crosvmOnlyKeys } from "../help.ts";
import { VIRTIO_GPU_MAX_SCANOUTS } from "../../../devices/virtio/gpu/protocol.ts";
import { EDID_MAX_ACTIVE } from "../../../devices/virtio/gpu/display.ts";
import type { VirtioDevice } from "../../../devices/virtio/device.ts";
import type { GpuBackend } from "../../../devices/virtio/gpu/backend.ts";
import { Backend2D } from "../../../devices/virtio/gpu/backend_2d.ts";
import { CONTEXT_TYPE_CAPSETS, VirglBackend } from "../../../devices/virtio/gpu/backend_virgl.ts";
import { VhostUserGpuDevice } from "../../../devices/vhost_user/gpu_socket.ts";
import { type JsonLineServer, parseOptions, serveJsonLines, SOCKET_OPTIONS, socketPathOption } from "./common.ts";

/** Context types the virglrenderer backend knows. */
const VIRGL_CONTEXT_TYPES = Object.keys(CONTEXT_TYPE_CAPSETS);
/** Largest display side (EDID detailed timings hold 12 bits). */
const MAX_DISPLAY_SIDE = EDID_MAX_ACTIVE;

/** A backend name as crosvm takes it, lower-cased; "3d" is an alias of "virglrenderer" (crosvm GpuMode). */
function gpuBackendName(text: string): string {
  const name = text.toLowerCase();
  return name === "3d" ? "virglrenderer" : name;
}

// ---- run ----

/** Capset names the guest can ask for, as crosvm/rutabaga spell them (linux virtio_gpu.h VIRTIO_GPU_CAPSET_*). */
export const GPU_CONTEXT_TYPES: readonly string[] = [
  "virgl",
  "virgl2",
  "gfxstream-vulkan",
  "venus",
  "cross-domain",
  "drm",
  "gfxstream-gles",
  "gfxstream-composer",
  "magma",
];

const GPU_BACKENDS: readonly string[] = ["2d", "2D", "virglrenderer", "3d", "3D", "gfxstream"];

function decodeDisplayMode(v: KvValue, where: string): { mode: string; width?: number; height?: number } {
  // denovm adds mode=web[W,H]: the display served as a web page (vmm/ui/web_display/).
  if (v.kind === "scalar") {
    if (v.text === "windowed" || v.text === "borderless_full_screen" || v.text === "web") return { mode: v.text };
    throw new UsageError(`${where}: "${v.text}" is not windowed[W,H], web[W,H] or borderless_full_screen`);
  }
  if (v.kind === "variant" && (v.name === "windowed" || v.name === "web")) {
    const dims = asScalarList({ kind: "list", items: v.items }, where);
    if (dims.length !== 2) throw new UsageError(`${where}: ${v.name} takes [WIDTH,HEIGHT]`);
    return { mode: v.name, width: parseUint(dims[0], where, 1), height: parseUint(dims[1], where, 1) };
  }
  throw new UsageError(`${where}: expected windowed[W,H], web[W,H] or borderless_full_screen`);
}

const DISPLAY_SCHEMA: KvSchema = {
  option: "--gpu displays",
  positional: "mode",
  keys: {
    mode: { decode: decodeDisplayMode },
    hidden: "bool",
    "refresh-rate": "uint",
    dpi: { decode: (v, where) => asScalarList(v, where).map((s) => parseUint(s, where)) },
    "horizontal-dpi": "uint",
    "vertical-dpi": "uint",
    port: { decode: (v, where) => asUint(v, where, 1, 65535) },
  },
};

function decodeDisplay(items: KvEntry[]): GpuDisplayConfig {
  const d = decodeKeyValues(DISPLAY_SCHEMA, items);
  const mode = (d.mode as ReturnType<typeof decodeDisplayMode> | undefined) ?? { mode: "windowed" };
  const dpi = d.dpi as number[] | undefined;
  if (dpi !== undefined && dpi.length !== 2) throw new UsageError(`--gpu displays dpi: takes [X,Y]`);
  const out: GpuDisplayConfig = {
    mode: mode.mode,
    width: mode.width ?? DEFAULT_DISPLAY_WIDTH,
    height: mode.height ?? DEFAULT_DISPLAY_HEIGHT,
  };
  if (d.port !== undefined) out.port = d.port as number;
  if (d.hidden !== undefined) out.hidden = d.hidden as boolean;
  if (d["refresh-rate"] !== undefined) out.refreshRate = d["refresh-rate"] as number;
  return out;
}

/** crosvm's deprecated `run --gpu-display DISPLAY` (the keys of one `--gpu displays` entry). */
export function parseGpuDisplayOption(text: string): GpuDisplayConfig {
  return decodeDisplay(parseKeyValues(text, "--gpu-display"));
}

function decodeDisplays(v: KvValue, where: string): GpuDisplayConfig[] {
  if (v.kind !== "list") throw new UsageError(`${where}: expected [[DISPLAY],...]`);
  // displays=[[mode=windowed[W,H]],[...]] is crosvm's form; also take a single display without the inner [].
  if (v.items.length > 0 && v.items.every((e) => e.key === undefined && e.value.kind === "list")) {
    return v.items.map((e) => decodeDisplay((e.value as { items: KvEntry[] }).items));
  }
  return v.items.length === 0 ? [] : [decodeDisplay(v.items)];
}

const GPU_SCHEMA: KvSchema = {
  option: "--gpu",
  positional: "backend",
  keys: {
    backend: { enum: GPU_BACKENDS },
    "context-types": "string",
    displays: { decode: decodeDisplays },
    width: "uint",
    height: "uint",
    egl: "bool",
    gles: "bool",
    glx: "bool",
    surfaceless: "bool",
    vulkan: "bool",
    udmabuf: "bool",
    "pci-bar-size": "size",
    "fixed-blob-mapping": "bool",
    trace: "string",
  },
  crosvmOnly: crosvmOnlyKeys("gpu"),
};

/** `run --gpu`. */
export function parseGpuOption(text: string): GpuConfig {
  const o = parseOption(GPU_SCHEMA, text);
  const defaults = gpuConfig();
  const backend = gpuBackendName((o.backend as string | undefined) ?? defaults.backend) as GpuBackendName;
  const contextTypes = o["context-types"] === undefined
    ? []
    : (o["context-types"] as string).split(":").filter((s) => s !== "");
  for (const c of contextTypes) {
    if (!GPU_CONTEXT_TYPES.includes(c)) {
      throw new UsageError(`--gpu context-types: unknown context type "${c}" (known: ${GPU_CONTEXT_TYPES.join(", ")})`);
    }
  }
  const g: GpuConfig = {
    ...(o.trace === undefined ? {} : { tracePath: o.trace as string }),
    backend,
    contextTypes,
    displays: (o.displays as GpuDisplayConfig[] | undefined) ?? [],
    hostVisibleWindowSize: (o["pci-bar-size"] as number | undefined) ?? DEFAULT_GPU_HOST_VISIBLE_WINDOW_SIZE,
    fixedBlobMapping: (o["fixed-blob-mapping"] as boolean | undefined) ?? defaults.fixedBlobMapping,
    egl: (o.egl as boolean | undefined) ?? defaults.egl,
    gles: (o.gles as boolean | undefined) ?? defaults.gles,
    glx: (o.glx as boolean | undefined) ?? defaults.glx,
    surfaceless: (o.surfaceless as boolean | undefined) ?? defaults.surfaceless,
    vulkan: (o.vulkan as boolean | undefined) ?? defaults.vulkan,
    udmabuf: (o.udmabuf as boolean | undefined) ?? defaults.udmabuf,
  };
  // crosvm src/crosvm/gpu_config.rs: width and height (deprecated) make one windowed display, both or neither.
  const width = o.width as number | undefined;
  const height = o.height as number | undefined;
  if ((width === undefined) !== (height === undefined)) {
    throw new UsageError("--gpu: width and height must be given together");
  }
  if (width !== undefined && height !== undefined) {
    if (width === 0 || height === 0) throw new UsageError("--gpu: width and height must be at least 1");
    g.width = width;
    g.height = height;
    g.displays.push({ mode: "windowed", width, height });
  }
  if (g.displays.length === 0) {
    g.displays.push({ mode: "windowed", width: DEFAULT_DISPLAY_WIDTH, height: DEFAULT_DISPLAY_HEIGHT });
  }
  if (g.displays.length > VIRTIO_GPU_MAX_SCANOUTS) {
    throw new UsageError(`--gpu displays: at most ${VIRTIO_GPU_MAX_SCANOUTS} displays`);
  }
  if (!isPowerOfTwo(g.hostVisibleWindowSize)) {
    throw new UsageError(`--gpu pci-bar-size: ${g.hostVisibleWindowSize} is not a power of two`);
  }
  return g;
}

function isPowerOfTwo(n: number): boolean {
  return n > 0 && Number.isInteger(Math.log2(n)) && 2 ** Math.log2(n) === n;
}

// ---- device gpu ----

export interface GpuDeviceArgs {
  socketPath: string;
  backend: "virglrenderer" | "2d";
  contextTypes: string[];
  width?: number;
  height?: number;
  tracePath?: string;
  controlSocket?: string;
}

function positiveInt(v: unknown, what: string): number {
  const n = typeof v === "number" ? v : typeof v === "string" && /^\d+$/.test(v) ? Number(v) : NaN;
  if (!Number.isInteger(n) || n < 1 || n > MAX_DISPLAY_SIDE) {
    throw new UsageError(`gpu: ${what} must be an integer from 1 to ${MAX_DISPLAY_SIDE}, got ${JSON.stringify(v)}`);
  }
  return n;
}

/** Parse the words after `denovm device gpu`; throws UsageError with a one-line reason. */
export function parseGpuArgs(args: string[]): GpuDeviceArgs {
  const values = parseOptions("gpu", args, {
    ...SOCKET_OPTIONS,
    backend: { type: "string" },
    "context-types": { type: "string" },
    width: { type: "string" },
    height: { type: "string" },
    trace: { type: "string" },
    "control-socket": { type: "string" },
    params: { type: "string" },
  });
  const socketPath = socketPathOption("gpu", values);
  let params: Record<string, unknown> = {};
  if (values.params !== undefined) {
    try {
      params = JSON.parse(values.params as string);
    } catch (e) {
      throw new UsageError(`gpu: --params is not JSON: ${(e as Error).message}`);
    }
    if (typeof params !== "object" || params === null || Array.isArray(params)) {
      throw new UsageError("gpu: --params must be a JSON object");
    }
  }
  const backendText = String(values.backend ?? params.backend ?? params.mode ?? "virglrenderer").toLowerCase();
  const backend = gpuBackendName(backendText);
  if (backend !== "virglrenderer" && backend !== "2d") {
    throw new UsageError(`gpu: unknown backend "${backendText}" (known: virglrenderer, 3d, 2d)`);
  }
  const typesText = (values["context-types"] ?? params.context_types ?? "virgl:virgl2") as string;
  const contextTypes = String(typesText).split(":").filter((s) => s !== "");
  for (const t of contextTypes) {
    if (!VIRGL_CONTEXT_TYPES.includes(t)) {
      throw new UsageError(`gpu: unknown context type "${t}" (known: ${VIRGL_CONTEXT_TYPES.join(", ")})`);
    }
  }
  const w = values.width ?? params.width, h = values.height ?? params.height;
  if ((w === undefined) !== (h === undefined)) throw new UsageError("gpu: give width and height together");
  const out: GpuDeviceArgs = { socketPath, backend, contextTypes };
  if (w !== undefined) {
    out.width = positiveInt(w, "width");
    out.height = positiveInt(h, "height");
  }
  if (values.trace !== undefined) out.tracePath = values.trace as string;
  if (values["control-socket"] !== undefined) out.controlSocket = values["control-socket"] as string;
  return out;
}

/** Answer one control-socket request. */
export async function handleGpuControl(dev: VhostUserGpuDevice, req: unknown): Promise<unknown> {
  if (typeof req !== "object" || req === null) throw new Error("expected a JSON object");
  const r = req as Record<string, unknown>;
  if (r.stats) {
    return {
      ok: true,
      gpu: dev.gpuStats(),
      device: dev.stats(),
      display: {
        ...dev.socketTotals,
        sockets: dev.socketsReceived,
        idle: dev.displaySocket?.idle ?? true,
        scanoutReadbackBytes: dev.scanoutReadbackBytes,
      },
      framebuffer: { width: dev.display.framebuffer(0).width, height: dev.display.framebuffer(0).height },
    };
  }
  if (typeof r.screenshot === "string") {
    await Deno.writeFile(r.screenshot, await dev.screenshot(0));
    return { ok: true, path: r.screenshot };
  }
  if (r.summary) return { ok: true, summary: dev.summary() };
  throw new Error('unknown request (known: {"stats":true}, {"screenshot":"FILE.png"}, {"summary":true})');
}

/** A VhostUserGpuDevice that also closes its control socket. */
class ServedGpuDevice extends VhostUserGpuDevice {
  control: JsonLineServer | undefined;
  override close(): void {
    this.control?.close();
    super.close();
  }
}

export function parseDeviceArgs(args: string[]): { socketPath: string; device: VirtioDevice } {
  const a = parseGpuArgs(args);
  const backend: GpuBackend = a.backend === "2d" ? new Backend2D() : new VirglBackend({ contextTypes: a.contextTypes });
  let device: ServedGpuDevice;
  try {
    device = new ServedGpuDevice({
      backend,
      displays: a.width !== undefined ? [{ width: a.width, height: a.height! }] : undefined,
      tracePath: a.tracePath,
    });
  } catch (e) {
    backend.close();
    throw e;
  }
  if (a.controlSocket !== undefined) {
    device.control = serveJsonLines(a.controlSocket, (req) => handleGpuControl(device, req));
  }
  return { socketPath: a.socketPath, device };
}

/**
 * One display as `denovm gpu add-displays --gpu-display DISPLAY` gives it (the same keys as one entry of
 * `--gpu displays=[...]`), with its dpi when given.
 */
export function parseDisplayOption(text: string, where: string): { display: GpuDisplayConfig; dpi?: number[] } {
  const items = parseKeyValues(text, where);
  const dpi = decodeKeyValues(DISPLAY_SCHEMA, items).dpi as number[] | undefined;
  return { display: decodeDisplay(items), dpi };
}
