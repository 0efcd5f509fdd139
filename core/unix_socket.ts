// Unix sockets through libc FFI: stream sockets with SCM_RIGHTS file-descriptor passing (UnixStream,
// UnixListener) and SOCK_SEQPACKET sockets (connectSeqpacket, listenSeqpacket, readPacket). Every socket is
// non-blocking; UnixStream's and UnixListener's waits happen in pollAsync (one of Deno's bounded pool of
// blocking threads, ffi/libc.ts), so the event loop keeps running while a peer is silent. They suit one
// connection at a time; a server with a connection per client waits on all of them in one poll on a
// PollThread (poll_thread.ts) and uses tryRecv/trySend. Constants and struct layouts come from ffi/socket.ts.
// UnixStream's recvmsg/sendmsg work the same on a SOCK_SEQPACKET descriptor (one call = one packet).

import {
  check,
  closeFd,
  EAGAIN,
  EINTR,
  errno,
  eventfd,
  eventfdRead,
  eventfdWrite,
  libc,
  pollAsync,
  POLLERR,
  POLLHUP,
  POLLIN,
  POLLOUT,
  SysError,
} from "../ffi/libc.ts";
import {
  AF_UNIX,
  CMSG_HDR_SIZE,
  CMSG_LEN_OFF,
  CMSG_LEVEL_OFF,
  CMSG_TYPE_OFF,
  cmsgAlign,
  cmsgLen,
  cmsgSpace,
  EADDRINUSE,
  ECONNREFUSED,
  FD_SIZE,
  IOVEC_BASE,
  IOVEC_LEN,
  IOVEC_SIZE,
  MAX_FDS_PER_MESSAGE,
  MSG_CMSG_CLOEXEC,
  MSG_CTRUNC,
  MSG_NOSIGNAL,
  MSGHDR_CONTROL,
  MSGHDR_CONTROLLEN,
  MSGHDR_FLAGS,
  MSGHDR_IOV,
  MSGHDR_IOVLEN,
  MSGHDR_NAME,
  MSGHDR_NAMELEN,
  MSGHDR_SIZE,
  ptrValue,
  SCM_RIGHTS,
  setNonBlocking,
  SHUT_RDWR,
  SOCK_CLOEXEC,
  SOCK_NONBLOCK,
  SOCK_SEQPACKET,
  SOCK_STREAM,
  sockaddrUn,
  SOL_SOCKET,
} from "../ffi/socket.ts";
import { UsageError } from "./exit.ts";

/** Re-exported for the users that import socket constants from here. */
export {
  AF_UNIX,
  fitsSunPath,
  setNonBlocking,
  SOCK_CLOEXEC,
  SOCK_NONBLOCK,
  SOCK_SEQPACKET,
  UNIX_PATH_MAX,
} from "../ffi/socket.ts";

/**
 * Something accepts connections on the socket file a listener was asked to take: another process owns
 * it. The user named a path in use, so this exits 35 (UsageError).
 */
export class SocketPathInUse extends UsageError {
  constructor(
    readonly path: string,
    message = `socket ${path} is in use: a running process accepts connections on it`,
  ) {
    super(message);
    this.name = "SocketPathInUse";
  }
}

/** Whether something answers on the socket file at `path`: true = live, false = stale (ECONNREFUSED). */
function socketAnswers(path: string): boolean {
  let fd: number;
  try {
    // Non-blocking: a live listener whose backlog is full answers EAGAIN instead of making us wait.
    fd = connectSeqpacket(path, { nonBlockingConnect: true });
  } catch (e) {
    // Nobody listens: a stale file. (The kernel answers ECONNREFUSED before it compares socket types.)
    if (e instanceof SysError && e.errno === ECONNREFUSED) return false;
    // A listener of another socket type (EPROTOTYPE), no permission (EACCES), ...: not ours to take.
    if (e instanceof SysError) return true;
    throw e;
  }
  closeFd(fd);
  return true;
}

/** Tries at taking a stale socket file that keeps being replaced under us before calling it in use. */
const STALE_REMOVE_TRIES = 3;

/**
 * Make `path` free for a new listening socket. Nothing there: nothing to do. A socket file nobody
 * answers on (left by a killed process) is removed, if it is still the same file after the probe. A
 * socket something answers on throws `inUse(path)` (SocketPathInUse by default) and is left alone; any
 * other kind of file throws "<what> PATH exists and is not a socket". Binding afterwards must not
 * replace a file either (bind(2) never does; link(2) neither), so a process that takes the path in
 * between wins and this one fails.
 */
export function freeSocketPath(
  path: string,
  opts: { inUse?: (path: string) => Error; what?: string } = {},
): void {
  const inUse = opts.inUse ?? ((p: string) => new SocketPathInUse(p));
  const label = opts.what ? `${opts.what} ${path}` : path;
  for (let i = 0; i < STALE_REMOVE_TRIES; i++) {
    let st: Deno.FileInfo;
    try {
      st = Deno.lstatSync(path);
    } catch (e) {
      if (e instanceof Deno.errors.NotFound) return;
      throw e;
    }
    if (!st.isSocket) throw new Error(`${label} exists and is not a socket`);
    if (socketAnswers(path)) throw inUse(path);
    try {
      if (Deno.lstatSync(path).ino !== st.ino) continue; // replaced since the probe: look again
      Deno.removeSync(path);
      return;
    } catch (e) {
      if (e instanceof Deno.errors.NotFound) return;
      throw e;
    }
  }
  throw inUse(path);
}

/** The peer closed the connection. */
export class ConnectionClosed extends Error {
  constructor() {
    super("connection closed by peer");
    this.name = "ConnectionClosed";
  }
}

/** The wait was interrupted by a Waker (shutdown requested). */
export class WaitCancelled extends Error {
  constructor() {
    super("wait cancelled");
    this.name = "WaitCancelled";
  }
}

/** An eventfd that interrupts every pending wait that includes it; used for shutdown. */
export class Waker {
  readonly fd: number = eventfd();
  #woken = false;
  get woken(): boolean {
    return this.#woken;
  }
  wake(): void {
    this.#woken = true;
    eventfdWrite(this.fd);
  }
  /** Clear a wake-up so the Waker can be used again. */
  clear(): void {
    this.#woken = false;
    eventfdRead(this.fd);
  }
  close(): void {
    closeFd(this.fd);
  }
}

/** A received chunk: the bytes and any descriptors that came with them (owned by the caller). */
export interface Received {
  data: Uint8Array<ArrayBuffer>;
  fds: number[];
}

/** A connected Unix stream socket. */
export class UnixStream {
  #fd: number;
  readonly #waker?: Waker;

  /** Wrap a connected non-blocking socket; `waker` (optional) cancels waits. */
  constructor(fd: number, waker?: Waker) {
    this.#fd = fd;
    this.#waker = waker;
  }

  get fd(): number {
    return this.#fd;
  }

  /** Connect to a listening socket at `path`. */
  static connect(path: string, waker?: Waker): UnixStream {
    const sa = sockaddrUn(path);
    const fd = check("socket", libc().socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    // Connect blocking (a Unix socket connect completes or fails at once), then switch to non-blocking.
    if (libc().connect(fd, sa, sa.length) < 0) {
      const e = errno();
      closeFd(fd);
      throw new SysError(`connect ${path}`, e);
    }
    setNonBlocking(fd);
    return new UnixStream(fd, waker);
  }

  /** Wait until the socket is readable (or hung up); throws WaitCancelled if the waker fires. */
  async waitReadable(): Promise<void> {
    await this.#wait(POLLIN);
  }

  async #wait(events: number): Promise<void> {
    for (;;) {
      if (this.#fd < 0) throw new ConnectionClosed();
      const fds = this.#waker ? [this.#fd, this.#waker.fd] : [this.#fd];
      const rev = await pollAsync(fds, events, -1);
      if (this.#waker?.woken) throw new WaitCancelled();
      if (rev[0] & (events | POLLHUP | POLLERR)) return;
    }
  }

  /**
   * One recvmsg of up to `max` bytes. Returns null when nothing is pending (EAGAIN);
   * throws ConnectionClosed at end of stream.
   */
  tryRecv(max: number): Received | null {
    const data = new Uint8Array(max);
    const control = new Uint8Array(cmsgSpace(MAX_FDS_PER_MESSAGE * FD_SIZE));
    const iov = new Uint8Array(IOVEC_SIZE);
    const iv = new DataView(iov.buffer);
    iv.setBigUint64(IOVEC_BASE, ptrValue(data), true);
    iv.setBigUint64(IOVEC_LEN, BigInt(max), true);
    const msg = new Uint8Array(MSGHDR_SIZE);
    const mv = new DataView(msg.buffer);
    mv.setBigUint64(MSGHDR_NAME, 0n, true);
    mv.setUint32(MSGHDR_NAMELEN, 0, true);
    mv.setBigUint64(MSGHDR_IOV, ptrValue(iov), true);
    mv.setBigUint64(MSGHDR_IOVLEN, 1n, true);
    mv.setBigUint64(MSGHDR_CONTROL, ptrValue(control), true);
    mv.setBigUint64(MSGHDR_CONTROLLEN, BigInt(control.length), true);
    let n: number;
    for (;;) {
      n = Number(libc().recvmsg(this.#fd, msg, MSG_CMSG_CLOEXEC));
      if (n >= 0) break;
      const e = errno();
      if (e === EINTR) continue;
      if (e === EAGAIN) return null;
      throw new SysError("recvmsg", e);
    }
    const fds = parseRights(control, Number(mv.getBigUint64(MSGHDR_CONTROLLEN, true)));
    if (mv.getInt32(MSGHDR_FLAGS, true) & MSG_CTRUNC) {
      fds.forEach(closeFd);
      throw new Error("recvmsg: too many file descriptors in one message (control data truncated)");
    }
    if (n === 0) {
      fds.forEach(closeFd);
      throw new ConnectionClosed();
    }
    return { data: data.subarray(0, n), fds };
  }

  /**
   * Receive exactly `length` bytes, waiting as needed. Descriptors that arrive with any
   * of those bytes are returned (the caller owns them).
   */
  async recvExact(length: number): Promise<Received> {
    const out = new Uint8Array(length);
    const fds: number[] = [];
    let got = 0;
    try {
      while (got < length) {
        const r = this.tryRecv(length - got);
        if (r === null) {
          await this.#wait(POLLIN);
          continue;
        }
        out.set(r.data, got);
        got += r.data.length;
        fds.push(...r.fds);
      }
    } catch (e) {
      fds.forEach(closeFd);
      throw e;
    }
    return { data: out, fds };
  }

  /** Send all of `data`; `fds` travel with the first byte (SCM_RIGHTS). */
  async send(data: Uint8Array, fds: number[] = []): Promise<void> {
    if (fds.length > MAX_FDS_PER_MESSAGE) throw new Error(`too many descriptors to send: ${fds.length}`);
    let off = 0;
    let pendingFds = fds;
    while (off < data.length) {
      const n = this.trySend(data.subarray(off), pendingFds);
      if (n === null) {
        await this.#wait(POLLOUT);
        continue;
      }
      off += n;
      pendingFds = [];
    }
  }

  /**
   * One sendmsg of `data` (with `fds` as SCM_RIGHTS), without waiting: returns the bytes sent (all of them
   * on a SOCK_SEQPACKET socket, where one call is one packet), or null when the socket has no room (EAGAIN).
   * Throws SysError (EPIPE, ECONNRESET, ...) when the peer is gone.
   */
  trySend(data: Uint8Array, fds: number[] = []): number | null {
    if (fds.length > MAX_FDS_PER_MESSAGE) throw new Error(`too many descriptors to send: ${fds.length}`);
    const chunk = data.slice();
    const iov = new Uint8Array(IOVEC_SIZE);
    const iv = new DataView(iov.buffer);
    iv.setBigUint64(IOVEC_BASE, ptrValue(chunk), true);
    iv.setBigUint64(IOVEC_LEN, BigInt(chunk.length), true);
    const msg = new Uint8Array(MSGHDR_SIZE);
    const mv = new DataView(msg.buffer);
    mv.setBigUint64(MSGHDR_IOV, ptrValue(iov), true);
    mv.setBigUint64(MSGHDR_IOVLEN, 1n, true);
    let control: Uint8Array | undefined;
    if (fds.length > 0) {
      control = new Uint8Array(cmsgSpace(fds.length * FD_SIZE));
      const cv = new DataView(control.buffer);
      cv.setBigUint64(CMSG_LEN_OFF, BigInt(cmsgLen(fds.length * FD_SIZE)), true);
      cv.setInt32(CMSG_LEVEL_OFF, SOL_SOCKET, true);
      cv.setInt32(CMSG_TYPE_OFF, SCM_RIGHTS, true);
      fds.forEach((fd, i) => cv.setInt32(CMSG_HDR_SIZE + i * FD_SIZE, fd, true));
      mv.setBigUint64(MSGHDR_CONTROL, ptrValue(control), true);
      mv.setBigUint64(MSGHDR_CONTROLLEN, BigInt(control.length), true);
    }
    for (;;) {
      const n = Number(libc().sendmsg(this.#fd, msg, MSG_NOSIGNAL));
      if (n >= 0) return n;
      const e = errno();
      if (e === EINTR) continue;
      if (e === EAGAIN) return null;
      throw new SysError("sendmsg", e);
    }
  }

  close(): void {
    if (this.#fd >= 0) {
      libc().shutdown(this.#fd, SHUT_RDWR);
      closeFd(this.#fd);
      this.#fd = -1;
    }
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/** File descriptors from the SCM_RIGHTS messages in a received control buffer. */
function parseRights(control: Uint8Array, controlLen: number): number[] {
  const cv = new DataView(control.buffer, control.byteOffset, control.byteLength);
  const fds: number[] = [];
  let off = 0;
  const end = Math.min(controlLen, control.length);
  while (off + CMSG_HDR_SIZE <= end) {
    const len = Number(cv.getBigUint64(off + CMSG_LEN_OFF, true));
    if (len < CMSG_HDR_SIZE || off + len > end) break;
    if (
      cv.getInt32(off + CMSG_LEVEL_OFF, true) === SOL_SOCKET && cv.getInt32(off + CMSG_TYPE_OFF, true) === SCM_RIGHTS
    ) {
      const count = Math.floor((len - CMSG_HDR_SIZE) / FD_SIZE);
      for (let i = 0; i < count; i++) fds.push(cv.getInt32(off + CMSG_HDR_SIZE + i * FD_SIZE, true));
    }
    off += cmsgAlign(len);
  }
  return fds;
}

/** A listening Unix stream socket bound to a filesystem path. */
export class UnixListener {
  #fd: number;
  readonly path: string;
  readonly #waker?: Waker;
  /** Inode of the socket file we created: close() removes only that file, not a successor's. */
  readonly #ino: number | null;

  private constructor(fd: number, path: string, waker?: Waker) {
    this.#fd = fd;
    this.path = path;
    this.#waker = waker;
    this.#ino = Deno.lstatSync(path).ino;
  }

  get fd(): number {
    return this.#fd;
  }

  /**
   * Bind and listen at `path`. A stale socket file there (left by a killed process) is replaced; a
   * socket another process listens on is never taken (SocketPathInUse, exit 35); any other kind of
   * file is an error (freeSocketPath).
   */
  static listen(path: string, waker?: Waker, backlog = 8): UnixListener {
    const sa = sockaddrUn(path);
    freeSocketPath(path);
    const fd = check("socket", libc().socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (libc().bind(fd, sa, sa.length) < 0) {
      const e = errno();
      closeFd(fd);
      // Another process bound the path since freeSocketPath: it is theirs.
      if (e === EADDRINUSE) throw new SocketPathInUse(path);
      throw new SysError(`bind ${path}`, e);
    }
    const listener = new UnixListener(fd, path, waker);
    if (libc().listen(fd, backlog) < 0) {
      const e = errno();
      listener.close(); // removes the file this call created
      throw new SysError(`listen ${path}`, e);
    }
    return listener;
  }

  /** Wait for and accept one connection; throws WaitCancelled if the waker fires first. */
  async accept(): Promise<UnixStream> {
    for (;;) {
      const fd = libc().accept4(this.#fd, null, null, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd >= 0) return new UnixStream(fd, this.#waker);
      const e = errno();
      if (e !== EAGAIN && e !== EINTR) throw new SysError("accept4", e);
      const fds = this.#waker ? [this.#fd, this.#waker.fd] : [this.#fd];
      await pollAsync(fds, POLLIN, -1);
      if (this.#waker?.woken) throw new WaitCancelled();
    }
  }

  /** Close the socket and remove its file (unless another listener has replaced it since). */
  close(): void {
    if (this.#fd < 0) return;
    closeFd(this.#fd);
    this.#fd = -1;
    try {
      if (Deno.lstatSync(this.path).ino === this.#ino) Deno.removeSync(this.path);
    } catch {
      // already gone
    }
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/** A connected pair of Unix stream sockets (socketpair(2)), non-blocking and close-on-exec: [ours, theirs]. */
export function streamPair(): [number, number] {
  const sv = new Int32Array(2);
  check(
    "socketpair",
    libc().socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, new Uint8Array(sv.buffer)),
  );
  return [sv[0], sv[1]];
}

/**
 * Connect a SOCK_SEQPACKET socket to `path`. Returns the non-blocking descriptor; throws SysError
 * ("connect PATH", errno) when nobody listens there (ECONNREFUSED), the file is missing (ENOENT), ...
 */
export function connectSeqpacket(path: string, opts: { nonBlockingConnect?: boolean } = {}): number {
  const sa = sockaddrUn(path);
  const flags = SOCK_CLOEXEC | (opts.nonBlockingConnect ? SOCK_NONBLOCK : 0);
  const fd = check("socket", libc().socket(AF_UNIX, SOCK_SEQPACKET | flags, 0));
  // A Unix-domain connect completes or fails at once, except when the listener's backlog is full: a
  // blocking connect then waits for room, a non-blocking one fails with EAGAIN. Afterwards the descriptor
  // is non-blocking either way, for poll-driven I/O.
  if (libc().connect(fd, sa, sa.length) < 0) {
    const e = errno();
    closeFd(fd);
    throw new SysError(`connect ${path}`, e);
  }
  if (!opts.nonBlockingConnect) setNonBlocking(fd);
  return fd;
}

/** A non-blocking SOCK_SEQPACKET socket bound to `path` and listening; throws SysError("bind PATH" / "listen"). */
export function listenSeqpacket(path: string, backlog: number): number {
  const sa = sockaddrUn(path);
  const fd = check("socket", libc().socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (libc().bind(fd, sa, sa.length) < 0) {
    const e = errno();
    closeFd(fd);
    throw new SysError(`bind ${path}`, e);
  }
  if (libc().listen(fd, backlog) < 0) {
    const e = errno();
    closeFd(fd);
    throw new SysError(`listen ${path}`, e);
  }
  return fd;
}

/**
 * Read one packet from a non-blocking SOCK_SEQPACKET descriptor into `buf` (read(2) takes one record).
 * Returns its length, 0 when the peer has hung up, null when nothing is pending (EAGAIN). A packet longer
 * than `buf` is cut to `buf.length` by the kernel: callers treat a full buffer as "too large".
 */
export function readPacket(fd: number, buf: Uint8Array<ArrayBuffer>): number | null {
  for (;;) {
    const n = Number(libc().read(fd, buf, BigInt(buf.length)));
    if (n >= 0) return n;
    const e = errno();
    if (e === EINTR) continue;
    if (e === EAGAIN) return null;
    throw new SysError("read", e);
  }
}
