// Control-socket client: the commands of vmm/cli/control.ts (`denovm stop|suspend|resume|powerbtn|sleepbtn|
// balloon|balloon_stats|balloon_ws|disk resize|gpu ...|screenshot|snapshot take ... SOCKET`). Sends the same JSON as crosvm's
// client (see vmm/control/protocol.ts for the protocol) and prints results the way crosvm's src/main.rs does:
// `balloon_stats` prints the whole reply as pretty JSON, `gpu list-displays` prints {"displays": ...} as
// pretty JSON, the other gpu commands print crosvm's text for their result ("displays updated",
// "display_mouse_mode_set"); commands that only need "Ok" print nothing. Exit 0 on success, 1 on an error
// reply (for gpu: NoSuchDisplay, TooManyDisplays, ErrString, which crosvm prints and exits 0 on) or an
// unreachable socket, with one `denovm: ...` line on stderr.

import { parseSize, parseUint, UsageError } from "../cli/keyvalue.ts";
import { parseControlArgs } from "../cli/control.ts";
import { parseDisplayOption } from "../cli/devices/gpu.ts";
import { connectSeqpacket, readPacket, UnixStream } from "../../core/unix_socket.ts";
import { SysError } from "../../ffi/libc.ts";
import { ECONNRESET } from "../../ffi/socket.ts";
import {
  type ControlRequest,
  DEFAULT_DPI,
  DEFAULT_REFRESH_RATE,
  type DisplayParametersJson,
  encodeRequest,
  GPU_MOUSE_MODES,
  REPLY_OK,
} from "./protocol.ts";
import { EXIT_HOST_ERROR, EXIT_SUCCESS } from "../../core/exit.ts";

/** Largest reply accepted; a reply that fills the buffer is reported as too large. */
export const MAX_REPLY_BYTES = 1 << 20;

/** An error reply from the VM ({"ErrString": ...}, or crosvm's {"Err": errno}). */
export class ControlError extends Error {
  constructor(message: string, readonly reply: unknown) {
    super(message);
    this.name = "ControlError";
  }
}

/** The error text of an error reply, or undefined when `reply` is not one. */
export function errorOfReply(reply: unknown): string | undefined {
  if (reply === null || typeof reply !== "object" || Array.isArray(reply)) return undefined;
  const r = reply as Record<string, unknown>;
  if (typeof r.ErrString === "string") return r.ErrString;
  if (typeof r.Err === "string") return r.Err;
  // crosvm's VmResponse::Err(SysError) carries a bare errno.
  if (typeof r.Err === "number") return `error (errno ${r.Err})`;
  return undefined;
}

/** One connection to a VM's control socket; requests on it are answered in order. */
export class ControlClient {
  readonly #stream: UnixStream;
  readonly #buf = new Uint8Array(MAX_REPLY_BYTES);
  #busy: Promise<unknown> = Promise.resolve();

  private constructor(readonly path: string, fd: number) {
    this.#stream = new UnixStream(fd);
  }

  /** Connect to the control socket at `path`; throws SysError("connect PATH") when no VM listens there. */
  static connect(path: string): ControlClient {
    return new ControlClient(path, connectSeqpacket(path));
  }

  /** Send one JSON request (any JSON value) and wait for the JSON reply. */
  request(json: unknown): Promise<unknown> {
    const run = this.#busy.then(() => this.#roundTrip(json), () => this.#roundTrip(json));
    this.#busy = run.catch(() => {});
    return run;
  }

  /** Send raw bytes as one packet and wait for the reply (tests use it for malformed requests). */
  requestRaw(packet: Uint8Array): Promise<unknown> {
    const run = this.#busy.then(() => this.#roundTripRaw(packet), () => this.#roundTripRaw(packet));
    this.#busy = run.catch(() => {});
    return run;
  }

  #roundTrip(json: unknown): Promise<unknown> {
    return this.#roundTripRaw(new TextEncoder().encode(JSON.stringify(json)));
  }

  async #roundTripRaw(packet: Uint8Array): Promise<unknown> {
    try {
      await this.#stream.send(packet);
    } catch (e) {
      // A server that refused the connection (too many clients) sent why before it closed: that is the reply.
      const n = this.#read();
      if (n === null || n === 0 || n >= this.#buf.length) throw e;
      return this.#parse(n);
    }
    for (;;) {
      const n = this.#read();
      if (n === null) {
        await this.#stream.waitReadable();
        continue;
      }
      if (n === 0) throw new Error(`control socket ${this.path} closed the connection without a reply`);
      if (n >= this.#buf.length) throw new Error(`reply from ${this.path} is too large`);
      return this.#parse(n);
    }
  }

  /**
   * One reply packet into the buffer (readPacket). A server that closed the connection with this client's
   * request unread (it refused the client) makes the first read fail with ECONNRESET; the reply it sent
   * before is read next.
   */
  #read(): number | null {
    try {
      return readPacket(this.#stream.fd, this.#buf);
    } catch (e) {
      if (!(e instanceof SysError && e.errno === ECONNRESET)) throw e;
      return readPacket(this.#stream.fd, this.#buf);
    }
  }

  #parse(n: number): unknown {
    const text = new TextDecoder().decode(this.#buf.subarray(0, n));
    try {
      return JSON.parse(text);
    } catch {
      throw new Error(`malformed reply from ${this.path}: ${text.slice(0, 80)}`);
    }
  }

  close(): void {
    this.#stream.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/**
 * One request on a fresh connection (what each CLI command does). Resolves to the reply; throws
 * SysError when the socket cannot be reached. Error replies are returned, not thrown.
 */
export async function controlRequest(socketPath: string, json: unknown): Promise<unknown> {
  using client = ControlClient.connect(socketPath);
  return await client.request(json);
}

/** Like controlRequest with a decoded request, but throws ControlError on an error reply. */
export async function controlCall(socketPath: string, req: ControlRequest): Promise<unknown> {
  const reply = await controlRequest(socketPath, encodeRequest(req));
  const err = errorOfReply(reply);
  if (err !== undefined) throw new ControlError(err, reply);
  return reply;
}

function absolute(path: string): string {
  return path.startsWith("/") ? path : `${Deno.cwd()}/${path}`;
}

/** `--gpu-display DISPLAY` as crosvm's DisplayParameters (its Linux display mode is windowed[W,H] only). */
function displayParameters(text: string): DisplayParametersJson {
  const { display, dpi } = parseDisplayOption(text, "gpu add-displays --gpu-display");
  if (display.mode !== "windowed") {
    throw new UsageError(`gpu add-displays --gpu-display: mode ${display.mode}: only windowed[W,H] is crosvm's`);
  }
  if (dpi !== undefined && dpi.length !== 2) throw new UsageError("gpu add-displays --gpu-display: dpi takes [X,Y]");
  return {
    mode: { windowed: [display.width, display.height] },
    hidden: display.hidden ?? false,
    "refresh-rate": display.refreshRate ?? DEFAULT_REFRESH_RATE,
    dpi: dpi ? [dpi[0], dpi[1]] : [DEFAULT_DPI, DEFAULT_DPI],
  };
}

function displayIds(values: true | string[] | undefined, where: string): number[] {
  return (Array.isArray(values) ? values : []).map((v) => parseUint(v, where, 0, 0xffff_ffff));
}

/** The request and socket path a control command line means (argv starts with the command word). */
export function requestForArgv(argv: readonly string[]): { request: ControlRequest; socket: string } {
  const p = parseControlArgs(argv);
  if (p.help) throw new UsageError(`${p.cmd}: --help is not a request`);
  const socket = p.args.SOCKET;
  const request = ((): ControlRequest => {
    switch (p.cmd) {
      case "stop":
        return { kind: "stop" };
      case "suspend":
        return { kind: "suspend", full: p.flags.full === true };
      case "resume":
        return { kind: "resume", full: p.flags.full === true };
      case "powerbtn":
        return { kind: "powerbtn" };
      case "sleepbtn":
        return { kind: "sleepbtn" };
      case "balloon":
        return { kind: "balloonAdjust", bytes: parseSize(p.args.SIZE, "balloon SIZE"), wait: p.flags.wait === true };
      case "balloon_stats":
        return { kind: "balloonStats" };
      case "balloon_ws":
        return { kind: "balloonWs" };
      case "disk":
        return {
          kind: "diskResize",
          index: parseUint(p.args.INDEX, "disk INDEX"),
          bytes: parseSize(p.args.SIZE, "disk SIZE"),
        };
      case "gpu":
        switch (p.sub) {
          case "add-displays": {
            const texts = p.flags["gpu-display"];
            return { kind: "gpuAddDisplays", displays: (Array.isArray(texts) ? texts : []).map(displayParameters) };
          }
          case "remove-displays":
            return { kind: "gpuRemoveDisplays", ids: displayIds(p.flags["display-id"], "--display-id") };
          case "set-mouse-mode": {
            const [id] = displayIds(p.flags["display-id"], "--display-id");
            const mode = (p.flags["mouse-mode"] as string[])[0];
            if (!(GPU_MOUSE_MODES as readonly string[]).includes(mode)) {
              throw new UsageError(`gpu set-mouse-mode --mouse-mode: "${mode}" is not ${GPU_MOUSE_MODES.join(" or ")}`);
            }
            return { kind: "gpuSetMouseMode", id, mode };
          }
          case "stats":
            return { kind: "gpuStats" };
          default:
            return { kind: "gpuListDisplays" };
        }
      case "screenshot":
        return { kind: "screenshot", path: absolute(p.args.PATH) };
      case "snd":
        // crosvm's MuteAllCommand takes the bool as argh parses one: "true" or "false" (checked by parseControlArgs).
        return { kind: "sndMuteAll", muted: p.args.MUTED === "true" };
      case "snapshot":
        // crosvm's client sends SNAPSHOT_PATH as given (src/main.rs snapshot_vm), so its VM resolves a relative
        // path against its own working directory; denovm sends it absolute, so it names the directory the user
        // meant wherever the VM was started. (--encrypt was refused by parseControlArgs.)
        return {
          kind: "snapshot",
          path: absolute(p.args.PATH),
          compressMemory: p.flags["compress-memory"] === true,
          encrypt: false,
        };
    }
    throw new Error(`unknown control command "${p.cmd}"`);
  })();
  return { request, socket };
}

/** crosvm's text for a GpuControlResult (vm_control/src/gpu.rs Display), and whether it is a success. */
function gpuResultText(result: unknown): { ok: boolean; text: string } {
  if (result === "DisplaysUpdated") return { ok: true, text: "displays updated" };
  if (result === "DisplayMouseModeSet") return { ok: true, text: "display_mouse_mode_set" };
  if (isVariant(result, "NoSuchDisplay")) {
    return { ok: false, text: `no_such_display ${(result.NoSuchDisplay as { display_id?: unknown }).display_id}` };
  }
  if (isVariant(result, "TooManyDisplays")) {
    const t = result.TooManyDisplays as { allowed?: unknown; requested?: unknown };
    return { ok: false, text: `too_many_displays: allowed ${t.allowed}, requested ${t.requested}` };
  }
  if (isVariant(result, "ErrString")) return { ok: false, text: `err_string ${result.ErrString}` };
  return { ok: false, text: `unexpected response: ${JSON.stringify(result)}` };
}

const encoder = new TextEncoder();

function fail(message: string): number {
  Deno.stderr.writeSync(encoder.encode(`denovm: ${message.replace(/\s*\n\s*/g, "; ")}\n`));
  return EXIT_HOST_ERROR;
}

function printJson(value: unknown): void {
  // serde_json::to_string_pretty: two-space indent, "key": value.
  Deno.stdout.writeSync(encoder.encode(JSON.stringify(value, null, 2) + "\n"));
}

function isVariant(reply: unknown, name: string): reply is Record<string, unknown> {
  return reply !== null && typeof reply === "object" && !Array.isArray(reply) && Object.hasOwn(reply, name);
}

/**
 * Run a control command (argv = ["balloon", "1G", "/run/vm.sock"], ...): send it, print its result,
 * resolve to the exit code (0 success, 1 error reply or unreachable socket). Throws UsageError on a
 * malformed command line (main.ts has already checked it).
 */
export async function sendControlCommand(argv: string[]): Promise<number> {
  const { request, socket } = requestForArgv(argv);
  const { sub } = parseControlArgs(argv);
  const cmd = sub === undefined ? argv[0] : `${argv[0]} ${sub}`;
  let reply: unknown;
  try {
    reply = await controlRequest(socket, encodeRequest(request));
  } catch (e) {
    return fail(`${cmd}: cannot reach the VM at ${socket}: ${e instanceof Error ? e.message : String(e)}`);
  }
  const err = errorOfReply(reply);
  if (err !== undefined) return fail(`${cmd}: ${err}`);
  switch (request.kind) {
    case "balloonStats":
      if (!isVariant(reply, "BalloonStats")) break;
      printJson(reply);
      return EXIT_SUCCESS;
    case "gpuListDisplays": {
      if (!isVariant(reply, "GpuResponse")) break;
      const gpu = reply.GpuResponse;
      if (!isVariant(gpu, "DisplayList")) break;
      const list = gpu.DisplayList as { displays?: unknown };
      printJson({ displays: list.displays ?? {} });
      return EXIT_SUCCESS;
    }
    case "balloonWs":
      if (!isVariant(reply, "BalloonWS")) break;
      printJson(reply);
      return EXIT_SUCCESS;
    case "gpuAddDisplays":
    case "gpuRemoveDisplays":
    case "gpuSetMouseMode": {
      if (!isVariant(reply, "GpuResponse")) break;
      const { ok, text } = gpuResultText(reply.GpuResponse);
      if (!ok) return fail(`${cmd}: ${text}`);
      Deno.stdout.writeSync(encoder.encode(text + "\n"));
      return EXIT_SUCCESS;
    }
    case "gpuStats":
      if (!isVariant(reply, "DenovmGpuStats")) break;
      printJson(reply.DenovmGpuStats);
      return EXIT_SUCCESS;
    default:
      if (reply === REPLY_OK) return EXIT_SUCCESS;
  }
  return fail(`${cmd}: unexpected response: ${JSON.stringify(reply)}`);
}
