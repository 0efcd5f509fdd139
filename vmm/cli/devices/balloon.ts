// `denovm device balloon --socket-path PATH [--target BYTES] [--control-socket PATH]
//  [--no-stats] [--no-deflate-on-oom]`: the virtio-balloon device model (devices/virtio/balloon.ts)
// as a vhost-user back end. `run` has a balloon unless `--no-balloon` is given (no keys to parse). See
// common.ts for how the family modules are organised.
//
// Setting the balloon of a running back end: with `--control-socket PATH` the process listens on a
// Unix stream socket that takes one JSON object per line and answers each with one JSON line:
//   {"target":BYTES}   set the target size (num_pages = BYTES / 4096) and tell the front end
//                      (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG); answers {"ok":true,"target_pages":N,"actual_pages":M}
//   {"query":true}     answers {"ok":true,"target_pages":N,"actual_pages":M,"stats":{counters}}
//   {"stats":true}     asks the guest for fresh statistics (returns its stats buffer), waits for them,
//                      answers {"ok":true,"fresh":bool,"guest":{"free-memory":...},"stats":{counters}}
// Errors answer {"ok":false,"error":"..."}.

import { UsageError } from "../keyvalue.ts";
import { BALLOON_STAT_NAMES, BalloonDevice } from "../../../devices/virtio/balloon.ts";
import type { VirtioDevice } from "../../../devices/virtio/device.ts";
import { closeWithDevice, parseOptions, serveJsonLines, SOCKET_OPTIONS, socketPathOption } from "./common.ts";

/** How long {"stats":true} waits for the guest's answer before replying with the old numbers. */
const STATS_WAIT_MS = 5000;

/** Sizes as crosvm's balloon command takes them: bytes, or with a K/M/G suffix (powers of 1024). */
function parseBytes(text: string, what: string): number {
  const m = text.match(/^(\d+)([KMG]?)$/i);
  if (!m) throw new UsageError(`balloon: ${what} "${text}" is not BYTES[K|M|G]`);
  const shift = { "": 0, K: 10, M: 20, G: 30 }[m[2].toUpperCase() as "" | "K" | "M" | "G"];
  const v = Number(m[1]) * 2 ** shift;
  if (!Number.isSafeInteger(v)) throw new UsageError(`balloon: ${what} "${text}" is too large`);
  return v;
}

function sizes(dev: BalloonDevice): Record<string, number | boolean> {
  return { ok: true, target_pages: dev.targetPages, actual_pages: dev.actualPages };
}

/** Apply one control-socket request (see the top of this file). */
export async function handleBalloonRequest(dev: BalloonDevice, req: unknown): Promise<Record<string, unknown>> {
  if (typeof req !== "object" || req === null || Array.isArray(req)) throw new Error("request is not a JSON object");
  const r = req as Record<string, unknown>;
  if ("target" in r) {
    if (typeof r.target !== "number" || !Number.isSafeInteger(r.target) || r.target < 0) {
      throw new Error('"target" wants a byte count');
    }
    dev.setTarget(r.target);
    return sizes(dev);
  }
  if ("query" in r) return { ...sizes(dev), stats: dev.stats() };
  if ("stats" in r) {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<boolean>((resolve) => timer = setTimeout(() => resolve(false), STATS_WAIT_MS));
    const fresh = await Promise.race([dev.requestStats(), timeout]);
    clearTimeout(timer);
    const g = dev.guestStats();
    const guest = Object.fromEntries(
      [...(g?.values ?? [])].map(([tag, v]) => [BALLOON_STAT_NAMES[tag] ?? `tag-${tag}`, Number(v)]),
    );
    return { ...sizes(dev), fresh, guest, stats: dev.stats() };
  }
  throw new Error("unknown request");
}

export function parseDeviceArgs(args: string[]): { socketPath: string; device: VirtioDevice } {
  const v = parseOptions("balloon", args, {
    ...SOCKET_OPTIONS,
    target: { type: "string" },
    "control-socket": { type: "string" },
    "no-stats": { type: "boolean" },
    "no-deflate-on-oom": { type: "boolean" },
  });
  const socketPath = socketPathOption("balloon", v);
  const device = new BalloonDevice({
    statsQueue: !v["no-stats"],
    deflateOnOom: !v["no-deflate-on-oom"],
    targetBytes: typeof v.target === "string" ? parseBytes(v.target, "--target") : undefined,
  });
  const control = v["control-socket"];
  if (typeof control === "string") {
    closeWithDevice(device, serveJsonLines(control, (req) => handleBalloonRequest(device, req)));
  }
  return { socketPath, device };
}
