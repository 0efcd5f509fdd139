// The VM control socket (`run -s/--socket PATH`): a Unix SOCK_SEQPACKET socket where each packet is one
// JSON request and gets one JSON reply packet; protocol.ts decodes the requests (crosvm's VmRequest JSON),
// runs them against a ControlHandler and encodes the replies.
//
// Robustness: a malformed, unknown or oversized (> MAX_REQUEST_BYTES) packet gets an error reply and the
// connection stays usable; a client that hangs up before its reply only loses the reply. File descriptors
// a client attaches (SCM_RIGHTS) are closed unread: no request here takes one.
//
// Waiting: the whole server waits in one poll(2), on a thread of its own (a PollThread, core/poll_thread.ts),
// over the listening socket and every client: for its next request or its hang-up (POLLIN), or for room for
// a reply that did not fit its socket yet (POLLOUT). Requests on one connection are answered in order: one
// read while the one before is handled waits, and its client is left out of the wait until its turn. When a
// finished request changes what a client waits for, the poll is interrupted and started again. So an idle
// client costs a descriptor and no thread, nothing here takes a thread from Deno's bounded pool of blocking
// threads (where the virtio notify loop waits), and a client that never sends (or never reads its replies)
// holds up nobody else. Each turn takes at most one request per client and accepts at most ACCEPTS_PER_TURN
// connections. At most MAX_CONTROL_CLIENTS are connected at once: the next one gets an error reply saying so
// and is closed, and the server goes on serving the others.
//
// The socket file is created with mode 0600 (bound inside a private 0700 directory, chmod'ed, then renamed
// into place, so it is never reachable with wider permissions). It is removed at once when close() starts,
// and also when the process ends without close(): Deno.exit() or the end of the program ("unload"), an
// uncaught exception ("error") or an unhandled rejection ("unhandledrejection"). Only SIGKILL leaves it;
// a socket file left that way (connect → ECONNREFUSED) is replaced by the next run; one that a live
// process answers on is never taken.

import { closeFd, EAGAIN, EINTR, errno, libc, POLLERR, POLLHUP, POLLIN, POLLOUT, SysError } from "../../ffi/libc.ts";
import { fitsSunPath, SOCK_CLOEXEC, SOCK_NONBLOCK } from "../../ffi/socket.ts";
import {
  ConnectionClosed,
  freeSocketPath,
  listenSeqpacket,
  SocketPathInUse,
  UnixStream,
} from "../../core/unix_socket.ts";
import { type PollEntry, PollThread } from "../../core/poll_thread.ts";
import { type ControlHandler, encodeReply, errorText, errReply, handlePacket, MAX_REQUEST_BYTES } from "./protocol.ts";

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
/** Pause after a failed accept4 or poll (e.g. out of descriptors or memory) before trying again. */
const ACCEPT_RETRY_MS = 100;
/** Connections accepted in one turn of the loop: a stream of connects cannot starve the clients' requests. */
const ACCEPTS_PER_TURN = LISTEN_BACKLOG;
/**
 * Clients connected at once. One more is told so (an error reply) and closed. crosvm's clients connect,
 * send one request and leave, so this many are only reached by clients that stay connected and idle.
 */
export const MAX_CONTROL_CLIENTS = 256;
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

/** One connected client. */
interface Client {
  readonly stream: UnixStream;
  /** A request of this client is being handled. */
  busy: boolean;
  /** A request read while the one before was handled: it is started once that one's reply is out. */
  next: Uint8Array | undefined;
  /** A reply that did not fit the client's socket yet; nothing more is read from it until it is sent. */
  reply: Uint8Array | undefined;
  /** The events this client has in the poll in flight (0: not in it). */
  armed: number;
}

/**
 * What the server waits for on a client's socket: room for its reply (POLLOUT), nothing while it has a
 * request queued behind the one being handled (so one client has at most two requests read), else its next
 * request or its hang-up (POLLIN).
 */
function wants(c: Client): number {
  if (c.reply !== undefined) return POLLOUT;
  return c.next !== undefined ? 0 : POLLIN;
}

/** Packets a refused client has queued that are read and dropped before it is closed. */
const REFUSED_PACKETS_DROPPED = 4;

/** The error reply a client beyond MAX_CONTROL_CLIENTS gets before it is closed. */
export const TOO_MANY_CLIENTS = `too many clients on the control socket (at most ${MAX_CONTROL_CLIENTS} at once); ` +
  "try again when one has left";

/**
 * Tell a client beyond the limit why it is closed (best effort: its socket is new, so the reply fits). What
 * it already sent is read and dropped first: closing a socket with unread data would make the client's next
 * read fail with ECONNRESET before it sees the reply.
 */
function refuse(stream: UnixStream): void {
  try {
    stream.trySend(encodeReply(errReply(TOO_MANY_CLIENTS)));
    for (let i = 0; i < REFUSED_PACKETS_DROPPED; i++) {
      const p = stream.tryRecv(MAX_REQUEST_BYTES + 1);
      if (p === null) break;
      p.fds.forEach(closeFd);
    }
  } catch {
    // Gone already, or hung up after its request.
  }
  stream.close();
}

/** Serves the control socket at `path`, dispatching requests to `handler`. */
export class ControlServer {
  readonly path: string;
  /** Resolves once the socket accepts connections; rejects (ControlSocketInUse, SysError, ...) if it cannot. */
  readonly listening: Promise<void>;
  readonly #handler: ControlHandler;
  /** The server's one wait: the listening socket and the clients that can go on (started once bound). */
  #poller: PollThread | undefined;
  #listenFd = -1;
  #ino: number | null = null;
  #closed = false;
  #closing: Promise<void> | undefined;
  readonly #clients = new Set<Client>();
  #loop: Promise<void> | undefined;
  /** Set after a failed accept4 or poll: the listening socket is left out of the wait until the timer fires. */
  #acceptPause: ReturnType<typeof setTimeout> | undefined;
  readonly #onProcessEnd = (e: Event) => {
    // An "error" or "unhandledrejection" that an earlier listener handled does not end the process.
    if (e.type !== "unload" && e.defaultPrevented) return;
    this.#removeFile();
  };

  constructor(path: string, handler: ControlHandler) {
    this.path = path;
    this.#handler = handler;
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
    return this.#clients.size;
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
    this.#poller = new PollThread("denovm-control");
    this.#loop = this.#run(this.#poller);
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

  /** The server's loop: one poll over the listening socket and every client that can go on, until close(). */
  async #run(poller: PollThread): Promise<void> {
    let pollFailing = false;
    try {
      while (!this.#closed) {
        const waiting = [...this.#clients].filter((c) => wants(c) !== 0);
        const entries: PollEntry[] = waiting.map((c) => ({ fd: c.stream.fd, events: wants(c) }));
        for (const c of this.#clients) c.armed = wants(c);
        const accepting = this.#acceptPause === undefined;
        if (accepting) entries.push({ fd: this.#listenFd, events: POLLIN });
        let revents: number[];
        try {
          revents = await poller.poll(entries);
          pollFailing = false;
        } catch (e) {
          if (this.#closed) break;
          // poll(2) failed (no memory): one line, then try again after a pause. A poll thread that could not
          // start ends the serving (one line); close() still cleans up.
          if (!pollFailing) console.error(`denovm: control socket: ${errorText(e)}`);
          pollFailing = true;
          if (poller.failed) break;
          await new Promise((r) => setTimeout(r, ACCEPT_RETRY_MS));
          continue;
        }
        if (this.#closed) break;
        waiting.forEach((c, i) => {
          // A client dropped while the poll was in flight (its reply could not be sent) is gone.
          if (this.#clients.has(c) && revents[i] & (entries[i].events | POLLHUP | POLLERR)) this.#step(c);
        });
        if (accepting && revents[waiting.length] & POLLIN) this.#accept();
      }
    } finally {
      for (const c of this.#clients) c.stream.close();
      this.#clients.clear();
    }
  }

  /** Accept what is pending, up to ACCEPTS_PER_TURN; beyond MAX_CONTROL_CLIENTS a client is refused. */
  #accept(): void {
    for (let i = 0; i < ACCEPTS_PER_TURN; i++) {
      const fd = libc().accept4(this.#listenFd, null, null, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) {
        const e = errno();
        if (e === EINTR) continue;
        if (e === EAGAIN) return;
        // EMFILE, ENOBUFS, ...: the listener stays readable, so pause instead of spinning on it.
        console.error(`denovm: control socket: ${new SysError("accept4", e).message}`);
        this.#pauseAccepting();
        return;
      }
      const stream = new UnixStream(fd);
      if (this.#clients.size >= MAX_CONTROL_CLIENTS) {
        refuse(stream);
        continue;
      }
      this.#clients.add({ stream, busy: false, next: undefined, reply: undefined, armed: 0 });
    }
  }

  #pauseAccepting(): void {
    if (this.#acceptPause !== undefined || this.#closed) return;
    this.#acceptPause = setTimeout(() => {
      this.#acceptPause = undefined;
      this.#poller?.interrupt();
    }, ACCEPT_RETRY_MS);
  }

  /** The client's socket is ready: send its waiting reply, or take its next request. */
  #step(c: Client): void {
    try {
      if (c.reply !== undefined) {
        if (c.stream.trySend(c.reply) === null) return;
        c.reply = undefined;
        this.#startNext(c);
        return;
      }
      const packet = c.stream.tryRecv(MAX_REQUEST_BYTES + 1);
      if (packet === null) return;
      packet.fds.forEach(closeFd); // no request takes a descriptor
      c.next = packet.data;
      this.#startNext(c);
    } catch (e) {
      this.#drop(c, e);
    }
  }

  /** Start the client's queued request, unless one is being handled or a reply waits to go out. */
  #startNext(c: Client): void {
    if (c.busy || c.reply !== undefined || c.next === undefined) return;
    const packet = c.next;
    c.next = undefined;
    c.busy = true;
    void this.#handle(c, packet);
  }

  /** Run one request; its reply goes out at once, or waits for room in the client's socket. Never rejects. */
  async #handle(c: Client, packet: Uint8Array): Promise<void> {
    const done = await handlePacket(packet, this.#handler);
    // The server closed while the handler ran: nobody to answer.
    if (this.#closed) return;
    c.busy = false;
    if (this.#clients.has(c)) {
      try {
        const reply = encodeReply(done.reply);
        if (c.stream.trySend(reply) === null) c.reply = reply;
      } catch (e) {
        this.#drop(c, e);
      }
    }
    // Even if the client left before its reply, or does not read it, a stop it asked for still happens.
    try {
      done.after?.();
    } catch (e) {
      console.error(`denovm: control socket: ${errorText(e)}`);
    }
    if (!this.#clients.has(c)) return;
    this.#startNext(c);
    // The poll in flight waits for something else on this client's socket than it now needs: wait again.
    if (wants(c) !== c.armed) this.#poller?.interrupt();
  }

  /** A client is gone (hung up, EPIPE/ECONNRESET) or broke the protocol: close it; the others carry on. */
  #drop(c: Client, e: unknown): void {
    this.#clients.delete(c);
    c.stream.close();
    if (!(e instanceof ConnectionClosed) && !(e instanceof SysError)) {
      console.error(`denovm: control socket: ${errorText(e)}`);
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
    clearTimeout(this.#acceptPause);
    this.#acceptPause = undefined;
    this.#poller?.interrupt();
    await this.listening.catch(() => {});
    await this.#loop;
    await this.#poller?.close();
    this.#release();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}
