// The VM control socket (`run -s/--socket PATH`): a Unix SOCK_SEQPACKET socket where each packet is one
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
// Robustness: a malformed, unknown or oversized (> MAX_REQUEST_BYTES) packet gets an error reply and the
// connection stays usable; a client that hangs up before its reply only loses the reply. File descriptors
// a client attaches (SCM_RIGHTS) are closed unread: no request here takes one.
//
// The socket file is created with mode 0600 (bound inside a private 0700 directory, chmod'ed, then renamed
// into place, so it is never reachable with wider permissions) and removed by close(). A socket file left by
// a crashed run (connect → ECONNREFUSED) is replaced; one that a live process answers on is never taken.

import { closeFd, EAGAIN, EINTR, errno, libc, pollAsync, POLLIN, SysError } from "../../ffi/libc.ts";
import { ECONNREFUSED, fitsSunPath, SOCK_CLOEXEC, SOCK_NONBLOCK } from "../../ffi/socket.ts";
import { connectSeqpacket, listenSeqpacket, UnixStream, WaitCancelled, Waker } from "../../core/unix_socket.ts";

/** Largest request packet accepted; a bigger one gets an error reply. */
export const MAX_REQUEST_BYTES = 64 * 1024;
/** listen(2) backlog of the control socket. */
const LISTEN_BACKLOG = 64;
/** Pause after a failed accept4 (e.g. out of descriptors) before trying again. */
const ACCEPT_RETRY_MS = 100;
/** Permissions of the socket file: owner read/write only. */
const SOCKET_MODE = 0o600;

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

/** The socket path answers: another VM (or process) owns it. */
export class ControlSocketInUse extends Error {
  constructor(readonly path: string) {
    super(`control socket ${path} is in use by a running VM`);
    this.name = "ControlSocketInUse";
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

function errorText(e: unknown): string {
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

/** Whether something answers on the socket file at `path`: true = live, false = stale (ECONNREFUSED). */
function probeExisting(path: string): boolean {
  let fd: number;
  try {
    // Non-blocking: a live VM whose backlog is full answers EAGAIN instead of making us wait.
    fd = connectSeqpacket(path, { nonBlockingConnect: true });
  } catch (e) {
    if (e instanceof SysError && e.errno === ECONNREFUSED) return false;
    // A socket of another type with a live listener (EPROTOTYPE), no permission (EACCES), ...: not ours to take.
    if (e instanceof SysError) return true;
    throw e;
  }
  closeFd(fd);
  return true;
}

function dirname(path: string): string {
  const i = path.lastIndexOf("/");
  if (i < 0) return ".";
  return i === 0 ? "/" : path.slice(0, i);
}

/** Serves the control socket at `path`, dispatching requests to `handler`. */
export class ControlServer {
  readonly path: string;
  /** Resolves once the socket accepts connections; rejects (ControlSocketInUse, SysError, ...) if it cannot. */
  readonly listening: Promise<void>;
  readonly #handler: ControlHandler;
  readonly #waker = new Waker();
  #listenFd = -1;
  #ino: number | null = null;
  #closed = false;
  #closing: Promise<void> | undefined;
  readonly #loops = new Set<Promise<void>>();
  readonly #conns = new Set<UnixStream>();
  #acceptLoop: Promise<void> | undefined;
  readonly #closedSignal: Promise<void>;
  #signalClosed!: () => void;

  constructor(path: string, handler: ControlHandler) {
    this.path = path;
    this.#handler = handler;
    this.#closedSignal = new Promise((resolve) => this.#signalClosed = resolve);
    // Binding is synchronous; a failure (in use, bad path) becomes the rejection of `listening`.
    this.listening = new Promise((resolve) => {
      this.#start();
      resolve();
    });
    // Callers that never await `listening` must not crash the process with an unhandled rejection.
    this.listening.catch(() => {});
  }

  /** Number of connected clients (for tests and diagnostics). */
  get connections(): number {
    return this.#conns.size;
  }

  #start(): void {
    const path = this.path;
    if (!fitsSunPath(path)) throw new Error(`control socket path is too long for a Unix socket: ${path}`);
    let st: Deno.FileInfo | undefined;
    try {
      st = Deno.lstatSync(path);
    } catch (e) {
      if (!(e instanceof Deno.errors.NotFound)) throw e;
    }
    if (st) {
      if (!st.isSocket) throw new Error(`control socket ${path} exists and is not a socket`);
      if (probeExisting(path)) throw new ControlSocketInUse(path);
      Deno.removeSync(path); // stale: left by a run that crashed
    }
    this.#listenFd = this.#bindPrivately(path);
    this.#ino = Deno.lstatSync(path).ino;
    if (this.#closed) {
      this.#release();
      throw new Error("control server closed before it was listening");
    }
    this.#acceptLoop = this.#acceptConnections();
  }

  /**
   * Bind with mode 0600 and no window where the file has wider permissions: bind inside a fresh 0700
   * directory next to `path`, chmod, rename into place. Falls back to bind + chmod at `path` when the
   * temporary name would not fit sun_path.
   */
  #bindPrivately(path: string): number {
    let dir: string | undefined;
    try {
      dir = Deno.makeTempDirSync({ dir: dirname(path), prefix: ".denovm-ctl-" });
    } catch {
      dir = undefined;
    }
    const tmp = dir !== undefined ? `${dir}/s` : undefined;
    if (dir === undefined || tmp === undefined || !fitsSunPath(tmp)) {
      if (dir !== undefined) Deno.removeSync(dir);
      const fd = listenSeqpacket(path, LISTEN_BACKLOG);
      Deno.chmodSync(path, SOCKET_MODE);
      return fd;
    }
    try {
      const fd = listenSeqpacket(tmp, LISTEN_BACKLOG);
      try {
        Deno.chmodSync(tmp, SOCKET_MODE);
        // link() never replaces: if someone bound `path` since our check, fail instead of stealing it.
        Deno.linkSync(tmp, path);
      } catch (e) {
        closeFd(fd);
        if (e instanceof Deno.errors.AlreadyExists) throw new ControlSocketInUse(path);
        throw e;
      }
      return fd;
    } finally {
      Deno.removeSync(dir, { recursive: true });
    }
  }

  async #acceptConnections(): Promise<void> {
    while (!this.#closed) {
      const fd = libc().accept4(this.#listenFd, null, null, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd >= 0) {
        const conn = new UnixStream(fd, this.#waker);
        this.#conns.add(conn);
        const loop = this.#serve(conn).finally(() => {
          this.#conns.delete(conn);
          conn.close();
          this.#loops.delete(loop);
        });
        this.#loops.add(loop);
        continue;
      }
      const e = errno();
      if (e === EINTR) continue;
      if (e !== EAGAIN) {
        // EMFILE, ENOBUFS, ...: the listener stays readable, so pause instead of spinning on it.
        console.error(`denovm: control socket: ${new SysError("accept4", e).message}`);
        await new Promise((r) => setTimeout(r, ACCEPT_RETRY_MS));
      }
      await pollAsync([this.#listenFd, this.#waker.fd], POLLIN, -1);
    }
  }

  /** One client: packets in, replies out, until it hangs up or the server closes. */
  async #serve(conn: UnixStream): Promise<void> {
    try {
      while (!this.#closed) {
        const packet = conn.tryRecv(MAX_REQUEST_BYTES + 1);
        if (packet === null) {
          await conn.waitReadable();
          continue;
        }
        packet.fds.forEach(closeFd); // no request takes a descriptor
        const work = handlePacket(packet.data, this.#handler);
        const done = await Promise.race([work, this.#closedSignal.then(() => null)]);
        if (done === null) return; // server closed while the handler ran: nobody to answer
        try {
          await conn.send(encodeReply(done.reply));
        } finally {
          // Even if the client left before its reply, a stop it asked for still happens.
          done.after?.();
        }
      }
    } catch (e) {
      if (e instanceof WaitCancelled) return;
      // ConnectionClosed (client hung up), EPIPE/ECONNRESET on send: that client is gone; others carry on.
      const name = e instanceof Error ? e.name : "";
      if (name !== "ConnectionClosed" && !(e instanceof SysError)) {
        console.error(`denovm: control socket: ${errorText(e)}`);
      }
    }
  }

  #release(): void {
    if (this.#listenFd >= 0) {
      closeFd(this.#listenFd);
      this.#listenFd = -1;
      try {
        if (Deno.lstatSync(this.path).ino === this.#ino) Deno.removeSync(this.path);
      } catch {
        // already gone
      }
    }
  }

  /** Stop serving: no new connections, open ones are closed, the socket file is removed. Idempotent. */
  close(): Promise<void> {
    this.#closing ??= this.#close();
    return this.#closing;
  }

  async #close(): Promise<void> {
    this.#closed = true;
    this.#signalClosed();
    this.#waker.wake();
    await this.listening.catch(() => {});
    await this.#acceptLoop;
    await Promise.all([...this.#loops]);
    this.#release();
    this.#waker.close();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}
