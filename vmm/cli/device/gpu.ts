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

import { UsageError } from "../keyvalue.ts";
import type { VirtioDevice } from "../../../devices/virtio/device.ts";
import type { GpuBackend } from "../../../devices/virtio/gpu/backend.ts";
import { Backend2D } from "../../../devices/virtio/gpu/backend_2d.ts";
import { VirglBackend } from "../../../devices/virtio/gpu/backend_virgl.ts";
import { VhostUserGpuDevice } from "../../../devices/vhost_user/gpu_socket.ts";
import { type JsonLineServer, serveJsonLines } from "./input.ts";
import { parseOptions, SOCKET_OPTIONS, socketPathOption } from "./common.ts";

/** Context types the virglrenderer backend knows (backend_virgl.ts CONTEXT_TYPE_CAPSETS). */
const CONTEXT_TYPES = ["virgl", "virgl2", "venus"];
/** Largest display side (EDID detailed timings hold 12 bits; display.ts EDID_MAX_ACTIVE). */
const MAX_DISPLAY_SIDE = 4095;

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
  // crosvm GpuMode: "3d" is an alias of virglrenderer.
  const backend = backendText === "3d" ? "virglrenderer" : backendText;
  if (backend !== "virglrenderer" && backend !== "2d") {
    throw new UsageError(`gpu: unknown backend "${backendText}" (known: virglrenderer, 3d, 2d)`);
  }
  const typesText = (values["context-types"] ?? params.context_types ?? "virgl:virgl2") as string;
  const contextTypes = String(typesText).split(":").filter((s) => s !== "");
  for (const t of contextTypes) {
    if (!CONTEXT_TYPES.includes(t)) {
      throw new UsageError(`gpu: unknown context type "${t}" (known: ${CONTEXT_TYPES.join(", ")})`);
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
