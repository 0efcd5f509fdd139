// The VM control socket (`run -s/--socket PATH`): a Unix SOCK_SEQPACKET socket where each packet is one
// JSON request and gets one JSON reply packet; protocol.ts decodes the requests (crosvm's VmRequest JSON),
// runs them against a ControlHandler and encodes the replies.
//
// Robustness: a malformed, unknown or oversized (> MAX_REQUEST_BYTES) packet gets an error reply and the
// connection stays usable; a client that hangs up before its reply only loses the reply. File descriptors
// a client attaches (SCM_RIGHTS) are closed unread: no request here takes one.
//
// The socket file is created with mode 0600 (bound inside a private 0700 directory, chmod'ed, then renamed
// into place, so it is never reachable with wider permissions). It is removed at once when close() starts,
// and also when the process ends without close(): Deno.exit() or the end of the program ("unload"), an
// uncaught exception ("error") or an unhandled rejection ("unhandledrejection"). Only SIGKILL leaves it;
// a socket file left that way (connect → ECONNREFUSED) is replaced by the next run; one that a live
// process answers on is never taken.

import { closeFd, EAGAIN, EINTR, errno, libc, pollAsync, POLLIN, SysError } from "../../ffi/libc.ts";
import { fitsSunPath, SOCK_CLOEXEC, SOCK_NONBLOCK } from "../../ffi/socket.ts";
import {
  freeSocketPath,
  listenSeqpacket,
  SocketPathInUse,
  UnixStream,
  WaitCancelled,
  Waker,
} from "../../core/unix_socket.ts";
import { type ControlHandler, encodeReply, errorText, handlePacket, MAX_REQUEST_BYTES } from "./protocol.ts";

/**
 * Where the control socket of `run -s PATH` goes: PATH itself, or, when PATH is an existing directory,
 * `crosvm-<pid>.sock` inside it (crosvm's name, src/crosvm/cmdline.rs, so tools that look for it find it).
 */
export function controlSocketPath(path: string, pid = Deno.pid): string {
  let isDir = false;
  try {
    isDir = Deno.statSync(path).isDirectory;
  } catch {
    // Not there (the usual case: the socket is created) or not reachable: bind reports it.
  }
  if (!isDir) return path;
  const dir = path.replace(/\/+$/, "");
  return `${dir}/crosvm-${pid}.sock`;
}

/** The process-end events after which the socket file must not be left behind. */
const PROCESS_END_EVENTS = ["unload", "error", "unhandledrejection"] as const;

/** listen(2) backlog of the control socket. */
const LISTEN_BACKLOG = 64;
/** Pause after a failed accept4 (e.g. out of descriptors) before trying again. */
const ACCEPT_RETRY_MS = 100;
/** Permissions of the socket file: owner read/write only. */
const SOCKET_MODE = 0o600;

/** The socket path answers: another VM (or process) owns it (exit 35, as for any socket path in use). */
export class ControlSocketInUse extends SocketPathInUse {
  constructor(path: string) {
    super(path, `control socket ${path} is in use by a running VM`);
    this.name = "ControlSocketInUse";
  }
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
  readonly #onProcessEnd = (e: Event) => {
    // An "error" or "unhandledrejection" that an earlier listener handled does not end the process.
    if (e.type !== "unload" && e.defaultPrevented) return;
    this.#removeFile();
  };

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
    // A stale file (left by a run that crashed) is removed; a live one is never taken.
    freeSocketPath(path, { inUse: (p) => new ControlSocketInUse(p), what: "control socket" });
    this.#listenFd = this.#bindPrivately(path);
    this.#ino = Deno.lstatSync(path).ino;
    for (const ev of PROCESS_END_EVENTS) globalThis.addEventListener(ev, this.#onProcessEnd);
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

  /** Remove the socket file if it is still the one this server bound (never another VM's). */
  #removeFile(): void {
    if (this.#ino === null) return;
    try {
      if (Deno.lstatSync(this.path).ino === this.#ino) Deno.removeSync(this.path);
    } catch {
      // already gone
    }
    this.#ino = null;
    for (const ev of PROCESS_END_EVENTS) globalThis.removeEventListener(ev, this.#onProcessEnd);
  }

  #release(): void {
    this.#removeFile();
    if (this.#listenFd >= 0) {
      closeFd(this.#listenFd);
      this.#listenFd = -1;
    }
  }

  /** Stop serving: no new connections, open ones are closed, the socket file is removed. Idempotent. */
  close(): Promise<void> {
    this.#closing ??= this.#close();
    return this.#closing;
  }

  async #close(): Promise<void> {
    this.#closed = true;
    // The file goes first, synchronously: a process that exits right after close() leaves nothing behind.
    this.#removeFile();
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
