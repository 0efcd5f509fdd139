// `denovm device input --socket-path PATH --kind KIND [--width W --height H] [--name N]
//  [--event-socket PATH]`: the virtio-input device model (devices/virtio/input.ts) as a vhost-user
// back end. KIND is keyboard, mouse, single-touch or multi-touch (crosvm's --input kinds; the
// crosvm-style `--input multi-touch[width=800,height=600]` spelling is accepted too).
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

import { UsageError } from "../keyvalue.ts";
import type { VirtioDevice } from "../../../devices/virtio/device.ts";
import {
  INPUT_DEVICE_KINDS,
  type InputDevice as InputDeviceT,
  type InputDeviceKind,
} from "../../../devices/virtio/input.ts";
import { InputDevice } from "../../../devices/virtio/input.ts";
import { parseOptions, SOCKET_OPTIONS, socketPathOption } from "./common.ts";

/** A Unix socket server taking JSON lines; each line's handler result is sent back as one JSON line. */
export interface JsonLineServer {
  close(): void;
}

/** Listen on `path` (a stale socket file is replaced) and answer each JSON line with `handle`'s result. */
export function serveJsonLines(path: string, handle: (req: unknown) => unknown | Promise<unknown>): JsonLineServer {
  try {
    if (Deno.lstatSync(path).isSocket) Deno.removeSync(path);
  } catch {
    // absent
  }
  const listener = Deno.listen({ transport: "unix", path });
  const conns = new Set<Deno.Conn>();
  let closed = false;
  const serveConn = async (conn: Deno.Conn) => {
    const enc = new TextEncoder();
    const dec = new TextDecoder();
    let buf = "";
    try {
      for await (const chunk of conn.readable) {
        buf += dec.decode(chunk, { stream: true });
        for (let nl = buf.indexOf("\n"); nl >= 0; nl = buf.indexOf("\n")) {
          const line = buf.slice(0, nl).trim();
          buf = buf.slice(nl + 1);
          if (!line) continue;
          let reply: unknown;
          try {
            reply = await handle(JSON.parse(line));
          } catch (e) {
            reply = { ok: false, error: (e as Error).message };
          }
          await conn.write(enc.encode(JSON.stringify(reply) + "\n"));
        }
      }
    } catch {
      // the client went away
    } finally {
      conns.delete(conn);
      try {
        conn.close();
      } catch {
        // closed already
      }
    }
  };
  (async () => {
    try {
      for await (const conn of listener) {
        conns.add(conn);
        serveConn(conn);
      }
    } catch (e) {
      if (!closed) console.error(`event socket ${path}: ${(e as Error).message}`);
    }
  })();
  return {
    close() {
      if (closed) return;
      closed = true;
      listener.close();
      for (const c of conns) {
        try {
          c.close();
        } catch {
          // closed already
        }
      }
      try {
        Deno.removeSync(path);
      } catch {
        // gone
      }
    },
  };
}

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
  if (!/^\d+$/.test(text) || Number(text) < 1 || Number(text) > 0x7fff_ffff) {
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
  const touch = kind === "single-touch" || kind === "multi-touch";
  if (!touch && (width !== undefined || height !== undefined)) {
    throw new UsageError(`input: width and height apply to touch devices, not ${kind}`);
  }
  const device = new InputDevice({
    kind: kind as InputDeviceKind,
    width: positiveInt(width, "width"),
    height: positiveInt(height, "height"),
    name,
  });
  const eventSocket = v["event-socket"];
  if (eventSocket) {
    const server = serveJsonLines(eventSocket, (req) => handleInputRequest(device, req));
    const close = device.close.bind(device);
    device.close = () => {
      server.close();
      close();
    };
  }
  return { socketPath, device };
}
