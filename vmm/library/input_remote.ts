// Input devices served by another process, driven by the library as it drives its own (vm.ts VmInput): a
// virtio-input device behind the vhost-user front end (`vhostUser: [{ type: "input", deviceId: 18,
// socket, eventSocket }]`) whose back end is `denovm device input --event-socket PATH`
// (vmm/cli/devices/input.ts). The guest sees the back end's device model, the same one `--input` builds
// in process; the library sends it the same calls as JSON lines on its event socket (key, type, move,
// click, tap; stats for the LEDs the guest set), so that a script types into either the same way.
//
// A vhost-user input back end without an event socket (rust-vmm's vhost-device-input reads a host evdev
// node) takes no events from here; asking to type into it is one line saying so.
//
// The event socket is another process's: its replies are checked (one JSON object a line, in request
// order, each line bounded), and a bad reply, a reply that does not come, or the socket closing ends the
// connection: the calls waiting fail with one line, and later ones fail at once.

import { ConfigError, HostError } from "../../core/exit.ts";
import { VIRTIO_ID_INPUT } from "../../devices/virtio/device.ts";
import { INPUT_DEVICE_KINDS, type InputDeviceKind } from "../../devices/virtio/input/device.ts";
import type { VhostUserConfig, VmConfig } from "../config.ts";

/** How long the back end may take to answer one request (ms). */
export const REMOTE_INPUT_REPLY_TIMEOUT_MS = 5_000;
/** The longest reply line accepted (bytes): a stats reply is a few hundred. */
export const REMOTE_INPUT_MAX_LINE = 64 * 1024;

type Reply = Record<string, unknown>;

/** What a remote device says it is (`{"describe":true}`). */
export interface RemoteInputDescription {
  kind: InputDeviceKind;
  name: string;
  width: number;
  height: number;
}

/** One `denovm device input` back end, through its event socket. */
export class RemoteInput {
  readonly #conn: Deno.UnixConn;
  readonly #label: string;
  #description!: RemoteInputDescription;
  #buf = "";
  readonly #waiting: {
    resolve: (r: Reply) => void;
    reject: (e: Error) => void;
    timer: ReturnType<typeof setTimeout>;
  }[] = [];
  #writes: Promise<void> = Promise.resolve();
  /** Why the connection ended, once it has. */
  #ended: string | undefined;
  readonly #reading: Promise<void>;

  readonly #replyTimeoutMs: number;

  private constructor(conn: Deno.UnixConn, label: string, replyTimeoutMs: number) {
    this.#conn = conn;
    this.#label = label;
    this.#replyTimeoutMs = replyTimeoutMs;
    this.#reading = this.#read();
  }

  /**
   * Connect to the event socket and learn the device. Rejects with ConfigError when nothing listens there,
   * HostError when what listens does not describe an input device.
   */
  static async connect(
    eventSocket: string,
    label: string,
    opts: { replyTimeoutMs?: number } = {},
  ): Promise<RemoteInput> {
    let conn: Deno.UnixConn;
    try {
      conn = await Deno.connect({ transport: "unix", path: eventSocket });
    } catch (e) {
      throw new ConfigError(`${label}: cannot connect to the event socket ${eventSocket}: ${(e as Error).message}`);
    }
    const r = new RemoteInput(conn, label, opts.replyTimeoutMs ?? REMOTE_INPUT_REPLY_TIMEOUT_MS);
    try {
      const d = await r.#call({ describe: true });
      const kind = d.kind as InputDeviceKind;
      if (
        d.ok !== true || !INPUT_DEVICE_KINDS.includes(kind) || typeof d.name !== "string" ||
        !Number.isInteger(d.width) || !Number.isInteger(d.height)
      ) {
        throw new Error(`it answered ${JSON.stringify(d).slice(0, 200)}`);
      }
      r.#description = { kind, name: d.name, width: d.width as number, height: d.height as number };
    } catch (e) {
      await r.close();
      throw new HostError(
        `${label}: the event socket ${eventSocket} did not describe an input device: ${(e as Error).message}`,
      );
    }
    return r;
  }

  get kind(): InputDeviceKind {
    return this.#description.kind;
  }

  get description(): RemoteInputDescription {
    return { ...this.#description };
  }

  /** Press (down) or release a key by its evdev code. Resolves to false when the back end's queue was full. */
  sendKey(code: number, down: boolean): Promise<boolean> {
    return this.#inject({ key: code, down });
  }

  type(text: string): Promise<boolean> {
    return this.#inject({ type: text });
  }

  move(dx: number, dy: number): Promise<boolean> {
    return this.#inject({ move: [dx, dy] });
  }

  click(button?: number): Promise<boolean> {
    return this.#inject({ click: button ?? true });
  }

  tap(x: number, y: number): Promise<boolean> {
    return this.#inject({ tap: [x, y] });
  }

  /** The LED states the guest reported on the status queue (code -> value), as the back end holds them. */
  async leds(): Promise<Map<number, number>> {
    const r = await this.#call({ stats: true });
    const leds = r.leds;
    if (r.ok !== true || typeof leds !== "object" || leds === null || Array.isArray(leds)) {
      throw this.#end(`a stats reply without LEDs: ${JSON.stringify(r).slice(0, 200)}`);
    }
    const out = new Map<number, number>();
    for (const [code, value] of Object.entries(leds)) {
      if (!/^\d+$/.test(code) || !Number.isInteger(value)) {
        throw this.#end(`a stats reply with LED ${JSON.stringify(code)}: ${JSON.stringify(value)}`);
      }
      out.set(Number(code), value as number);
    }
    return out;
  }

  /** An injection: true when queued, false when the back end dropped it (its pending queue full, as in process). */
  async #inject(req: Reply): Promise<boolean> {
    const r = await this.#call(req);
    if (r.ok === true) return true;
    if (r.ok === false && typeof r.pending === "number") return false;
    throw new Error(`${this.#label}: ${typeof r.error === "string" ? r.error : JSON.stringify(r).slice(0, 200)}`);
  }

  /** Send one request; its reply is the next line not yet claimed (the back end answers in order). */
  #call(req: Reply): Promise<Reply> {
    if (this.#ended !== undefined) return Promise.reject(new Error(`${this.#label}: ${this.#ended}`));
    const reply = new Promise<Reply>((resolve, reject) => {
      const timer = setTimeout(() => this.#end(`no reply within ${this.#replyTimeoutMs} ms`), this.#replyTimeoutMs);
      this.#waiting.push({ resolve, reject, timer });
    });
    const bytes = new TextEncoder().encode(JSON.stringify(req) + "\n");
    this.#writes = this.#writes.then(async () => {
      if (this.#ended !== undefined) return;
      try {
        for (let off = 0; off < bytes.length;) off += await this.#conn.write(bytes.subarray(off));
      } catch (e) {
        this.#end(`writing to the event socket failed: ${(e as Error).message}`);
      }
    });
    return reply;
  }

  async #read(): Promise<void> {
    const dec = new TextDecoder();
    try {
      for await (const chunk of this.#conn.readable) {
        this.#buf += dec.decode(chunk, { stream: true });
        for (let nl = this.#buf.indexOf("\n"); nl >= 0; nl = this.#buf.indexOf("\n")) {
          const line = this.#buf.slice(0, nl);
          this.#buf = this.#buf.slice(nl + 1);
          const w = this.#waiting.shift();
          if (!w) {
            this.#end("a reply to no request");
            return;
          }
          clearTimeout(w.timer);
          let r: unknown;
          try {
            r = JSON.parse(line);
          } catch {
            r = undefined;
          }
          if (typeof r !== "object" || r === null || Array.isArray(r)) {
            w.reject(this.#end(`a reply that is not a JSON object: ${line.slice(0, 200)}`));
            return;
          }
          w.resolve(r as Reply);
        }
        if (this.#buf.length > REMOTE_INPUT_MAX_LINE) {
          this.#end(`a reply line over ${REMOTE_INPUT_MAX_LINE} bytes`);
          return;
        }
      }
      this.#end("the event socket closed");
    } catch (e) {
      this.#end(`reading the event socket failed: ${(e as Error).message}`);
    }
  }

  /** The connection is over: every waiting call fails with `reason`; returns that error. */
  #end(reason: string): Error {
    this.#ended ??= reason;
    const err = new Error(`${this.#label}: ${this.#ended}`);
    for (const w of this.#waiting.splice(0)) {
      clearTimeout(w.timer);
      w.reject(err);
    }
    try {
      this.#conn.close();
    } catch {
      // closed already
    }
    return err;
  }

  /** Close the connection; calls still waiting fail. */
  async close(): Promise<void> {
    this.#end("closed");
    await this.#reading;
    await this.#writes;
  }
}

/** The vhost-user input devices of a VM, as the library drives them. */
export class RemoteInputs {
  private constructor(
    /** Those with an event socket, connected. */
    readonly devices: RemoteInput[],
    /** The back-end sockets of those without one. */
    readonly undrivable: string[],
  ) {}

  static readonly none = new RemoteInputs([], []);

  /**
   * Connect to the event socket of every vhost-user input device in `config` (in its order). Rejects with
   * ConfigError for an event socket on another device type or one nothing listens on, HostError for one
   * that does not describe an input device; the connections made are closed then.
   */
  static async connect(config: Pick<VmConfig, "vhostUser">): Promise<RemoteInputs> {
    const devices: RemoteInput[] = [];
    const undrivable: string[] = [];
    try {
      for (const v of config.vhostUser ?? []) {
        const label = vhostUserLabel(v);
        if (v.deviceId !== VIRTIO_ID_INPUT) {
          if (v.eventSocket !== undefined) {
            throw new ConfigError(`${label}: eventSocket is for input devices (device ${VIRTIO_ID_INPUT})`);
          }
          continue;
        }
        if (v.eventSocket === undefined) undrivable.push(v.socket);
        else devices.push(await RemoteInput.connect(v.eventSocket, label));
      }
    } catch (e) {
      await Promise.all(devices.map((d) => d.close()));
      throw e;
    }
    return devices.length === 0 && undrivable.length === 0 ? RemoteInputs.none : new RemoteInputs(devices, undrivable);
  }

  async close(): Promise<void> {
    await Promise.all(this.devices.map((d) => d.close()));
  }
}

function vhostUserLabel(v: VhostUserConfig): string {
  return `vhost-user ${v.type} ${v.socket}`;
}
