// The input family: `run --input TYPE[key=value,...]` (crosvm's input kinds, vmm/config.ts INPUT_KINDS)
// and `denovm device input`. See common.ts for how the family modules are organised.
//
// `denovm device input --socket-path PATH --kind KIND [--width W --height H] [--name N]
//  [--config-path FILE] [--event-socket PATH]`: the virtio-input device model (devices/virtio/input/device.ts)
// as a vhost-user back end. KIND is one of crosvm's --input kinds but evdev (custom with --config-path, a
// JSON file in crosvm's format; the crosvm-style `--input multi-touch[width=800,height=600]` spelling is
// accepted too).
//
// Injecting events into a running back end: with `--event-socket PATH` the process listens on a
// Unix stream socket that takes one JSON object per line and answers each with one JSON line,
// {"ok":true,"pending":N} (N = events still waiting for guest buffers) or {"ok":false,"error":"..."}:
//   {"key":30,"down":true}            press (down=false: release) an EV_KEY code
//   {"type":"hello"}                  type text on a US layout (keyboard)
//   {"move":[dx,dy]}  {"wheel":n}     relative motion / wheel (mouse)
//   {"click":272}  {"click":true}     press and release a button (BTN_LEFT when true)
//   {"moveTo":[x,y]}  {"tap":[x,y]}   absolute position / touch and lift (touch kinds)
//   {"touchDown":[slot,x,y]}  {"touchMove":[slot,x,y]}  {"touchUp":slot}   multi-touch slots
//   {"events":[{"type":1,"code":30,"value":1}, ...]}   a raw batch (EV_SYN appended if missing)
//   {"stats":true}                    answers {"ok":true,"stats":{...},"leds":{code:value}}
//   {"describe":true}                 answers {"ok":true,"kind":K,"name":N,"serial":S,"width":W,"height":H}
//                                     (what the library, vmm/library/input_remote.ts, drives it as)

import { decodeKeyValues, parseKeyValues, UsageError } from "../keyvalue.ts";
import { INPUT_KINDS, type InputConfig, type InputKind, TOUCH_INPUT_KINDS } from "../../config.ts";
import type { VirtioDevice } from "../../../devices/virtio/device.ts";
import {
  INPUT_DEVICE_KINDS,
  INPUT_MAX_DIMENSION,
  type InputDevice as InputDeviceT,
  type InputDeviceKind,
} from "../../../devices/virtio/input/device.ts";
import { InputDevice } from "../../../devices/virtio/input/device.ts";
import { type CustomInputConfig, parseCustomInputConfig } from "../../../devices/virtio/input/profiles.ts";
import { closeWithDevice, parseOptions, serveJsonLines, SOCKET_OPTIONS, socketPathOption } from "./common.ts";

// ---- run ----

const TOUCH_SCHEMA_KEYS = { path: "string", width: "uint", height: "uint", name: "string" } as const;
const CUSTOM_SCHEMA_KEYS = { path: "string", "config-path": "string" } as const;

/** `run --input TYPE[key=value,...]`. */
export function parseInputOption(text: string): InputConfig {
  const entries = parseKeyValues(text, "--input");
  if (entries.length !== 1 || entries[0].key !== undefined) {
    throw new UsageError(`--input: expected TYPE or TYPE[key=value,...], got "${text}"`);
  }
  const v = entries[0].value;
  const kindText = v.kind === "scalar" ? v.text : v.kind === "variant" ? v.name : "";
  if (!(INPUT_KINDS as readonly string[]).includes(kindText)) {
    throw new UsageError(`--input: unknown input type "${kindText}" (known: ${INPUT_KINDS.join(", ")})`);
  }
  const kind = kindText as InputKind;
  const input: InputConfig = { kind };
  if (v.kind !== "variant") return requireConfigPath(input);
  const touch = TOUCH_INPUT_KINDS.includes(kind);
  const o = decodeKeyValues({
    option: `--input ${kind}`,
    positional: "path",
    keys: touch ? TOUCH_SCHEMA_KEYS : kind === "custom" ? CUSTOM_SCHEMA_KEYS : { path: "string" },
  }, v.items);
  if (o.path !== undefined) input.path = o.path as string;
  if (o["config-path"] !== undefined) input.configPath = o["config-path"] as string;
  if (o.width !== undefined) input.width = o.width as number;
  if (o.height !== undefined) input.height = o.height as number;
  if (o.name !== undefined) input.name = o.name as string;
  if (input.width === 0 || input.height === 0) throw new UsageError(`--input ${kind}: width and height must be >= 1`);
  return requireConfigPath(input);
}

/** The custom kind is nothing without its file (crosvm requires config-path). */
function requireConfigPath(input: InputConfig): InputConfig {
  if (input.kind === "custom" && input.configPath === undefined) {
    throw new UsageError("--input custom: config-path=FILE is required");
  }
  return input;
}

// ---- device input ----

function nums(v: unknown, n: number, what: string): number[] {
  if (!Array.isArray(v) || v.length !== n || !v.every((x) => typeof x === "number" && Number.isInteger(x))) {
    throw new Error(`"${what}" wants an array of ${n} integers`);
  }
  return v as number[];
}

/** Apply one event-socket request (see the top of this file) to `dev`. */
export function handleInputRequest(dev: InputDeviceT, req: unknown): Record<string, unknown> {
  if (typeof req !== "object" || req === null || Array.isArray(req)) throw new Error("request is not a JSON object");
  const r = req as Record<string, unknown>;
  let ok: boolean;
  if ("stats" in r) {
    return { ok: true, stats: dev.stats(), leds: Object.fromEntries(dev.leds) };
  } else if ("describe" in r) {
    const { kind, deviceName: name, serial, width, height } = dev;
    return { ok: true, kind, name, serial, width, height };
  } else if ("key" in r) {
    if (typeof r.key !== "number" || typeof r.down !== "boolean") {
      throw new Error('"key" wants a number and "down" a boolean');
    }
    ok = dev.sendKey(r.key, r.down);
  } else if ("type" in r) {
    if (typeof r.type !== "string") throw new Error('"type" wants a string');
    ok = dev.type(r.type);
  } else if ("move" in r) {
    const [dx, dy] = nums(r.move, 2, "move");
    ok = dev.move(dx, dy);
  } else if ("wheel" in r) {
    ok = dev.wheel(nums([r.wheel], 1, "wheel")[0]);
  } else if ("click" in r) {
    ok = r.click === true ? dev.click() : dev.click(nums([r.click], 1, "click")[0]);
  } else if ("moveTo" in r) {
    const [x, y] = nums(r.moveTo, 2, "moveTo");
    ok = dev.moveTo(x, y);
  } else if ("tap" in r) {
    const [x, y] = nums(r.tap, 2, "tap");
    ok = dev.tap(x, y);
  } else if ("touchDown" in r) {
    const [s, x, y] = nums(r.touchDown, 3, "touchDown");
    ok = dev.touchDown(s, x, y);
  } else if ("touchMove" in r) {
    const [s, x, y] = nums(r.touchMove, 3, "touchMove");
    ok = dev.touchMove(s, x, y);
  } else if ("touchUp" in r) {
    ok = dev.touchUp(nums([r.touchUp], 1, "touchUp")[0]);
  } else if ("events" in r) {
    if (!Array.isArray(r.events)) throw new Error('"events" wants an array');
    ok = dev.sendEvents(r.events.map((e) => {
      const o = e as Record<string, unknown>;
      const [type, code, value] = nums([o?.type, o?.code, o?.value], 3, "events[]");
      return { type, code, value };
    }));
  } else {
    throw new Error("unknown request");
  }
  return ok
    ? { ok, pending: dev.pendingEvents }
    : { ok, error: "event queue full; dropped", pending: dev.pendingEvents };
}

function positiveInt(text: string | undefined, what: string): number | undefined {
  if (text === undefined) return undefined;
  if (!/^\d+$/.test(text) || Number(text) < 1 || Number(text) > INPUT_MAX_DIMENSION) {
    throw new UsageError(`input: ${what} "${text}" is not a positive integer`);
  }
  return Number(text);
}

/** crosvm's `--input KIND[width=W,height=H,name=N]` spelling. */
function parseInputSpec(spec: string): { kind: string; opts: Record<string, string> } {
  const m = spec.match(/^([a-z-]+)(?:\[(.*)\])?$/);
  if (!m) throw new UsageError(`input: --input "${spec}" is not KIND or KIND[key=value,...]`);
  const opts: Record<string, string> = {};
  for (const item of (m[2] ?? "").split(",").filter(Boolean)) {
    const eq = item.indexOf("=");
    if (eq < 1) throw new UsageError(`input: --input option "${item}" is not key=value`);
    opts[item.slice(0, eq)] = item.slice(eq + 1);
  }
  return { kind: m[1], opts };
}

export function parseDeviceArgs(args: string[]): { socketPath: string; device: VirtioDevice } {
  const v = parseOptions("input", args, {
    ...SOCKET_OPTIONS,
    kind: { type: "string" },
    input: { type: "string" },
    width: { type: "string" },
    height: { type: "string" },
    name: { type: "string" },
    "config-path": { type: "string" },
    "event-socket": { type: "string" },
  }) as Record<string, string | undefined>;
  const socketPath = socketPathOption("input", v);
  if (v.kind && v.input) throw new UsageError("input: give either --kind or --input, not both");
  let kind = v.kind;
  let width = v.width;
  let height = v.height;
  let name = v.name;
  if (v.input) {
    const spec = parseInputSpec(v.input);
    kind = spec.kind;
    for (const k of Object.keys(spec.opts)) {
      if (!["width", "height", "name"].includes(k)) throw new UsageError(`input: unknown --input option "${k}"`);
    }
    width ??= spec.opts.width;
    height ??= spec.opts.height;
    name ??= spec.opts.name;
  }
  if (!kind) throw new UsageError(`input: --kind ${INPUT_DEVICE_KINDS.join("|")} is required`);
  if (!(INPUT_DEVICE_KINDS as string[]).includes(kind)) {
    throw new UsageError(`input: unknown kind "${kind}" (known: ${INPUT_DEVICE_KINDS.join(", ")})`);
  }
  const touch = (TOUCH_INPUT_KINDS as readonly string[]).includes(kind);
  if (!touch && (width !== undefined || height !== undefined)) {
    throw new UsageError(`input: width and height apply to touch devices, not ${kind}`);
  }
  if ((kind === "custom") !== (v["config-path"] !== undefined)) {
    throw new UsageError("input: --config-path FILE goes with --kind custom, and custom needs it");
  }
  let custom: CustomInputConfig | undefined;
  if (v["config-path"] !== undefined) {
    try {
      custom = parseCustomInputConfig(Deno.readTextFileSync(v["config-path"]));
    } catch (e) {
      throw new UsageError(`input: --config-path ${v["config-path"]}: ${(e as Error).message}`);
    }
  }
  const device = new InputDevice({
    kind: kind as InputDeviceKind,
    width: positiveInt(width, "width"),
    height: positiveInt(height, "height"),
    name,
    custom,
  });
  const eventSocket = v["event-socket"];
  if (eventSocket) {
    closeWithDevice(device, serveJsonLines(eventSocket, (req) => handleInputRequest(device, req)));
  }
  return { socketPath, device };
}
