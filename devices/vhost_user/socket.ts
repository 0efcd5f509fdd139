// Unix stream sockets with SCM_RIGHTS file-descriptor passing, through libc FFI.
// Every socket is non-blocking; waiting happens in pollAsync (a helper thread),
// so the event loop keeps running while a peer is silent.

import {
  check,
  closeFd,
  EAGAIN,
  EINTR,
  errno,
  eventfd,
  eventfdRead,
  eventfdWrite,
  F_GETFL,
  F_SETFL,
  libc,
  O_NONBLOCK,
  pollAsync,
  POLLERR,
  POLLHUP,
  POLLIN,
  POLLOUT,
  SysError,
} from "../../ffi/libc.ts";

// Socket constants (Linux include/linux/socket.h, asm-generic/socket.h, linux/net.h).
/** Address family for Unix sockets (linux/socket.h AF_UNIX). */
export const AF_UNIX = 1;
/** Byte stream socket type (linux/net.h SOCK_STREAM). */
export const SOCK_STREAM = 1;
/** socket()/accept4() flag: non-blocking (linux/net.h SOCK_NONBLOCK = O_NONBLOCK). */
export const SOCK_NONBLOCK = 0o4000;
/** socket()/accept4() flag: close-on-exec (linux/net.h SOCK_CLOEXEC = O_CLOEXEC). */
export const SOCK_CLOEXEC = 0o2000000;
/** Socket-level option level (asm-generic/socket.h SOL_SOCKET). */
export const SOL_SOCKET = 1;
/** Ancillary message type carrying file descriptors (linux/socket.h SCM_RIGHTS). */
export const SCM_RIGHTS = 1;
/** sendmsg flag: no SIGPIPE when the peer is gone (linux/socket.h MSG_NOSIGNAL). */
export const MSG_NOSIGNAL = 0x4000;
/** recvmsg result flag: control data was truncated (linux/socket.h MSG_CTRUNC). */
export const MSG_CTRUNC = 0x8;
/** recvmsg flag: received fds get close-on-exec (linux/socket.h MSG_CMSG_CLOEXEC). */
export const MSG_CMSG_CLOEXEC = 0x40000000;
/** shutdown() how: both directions (linux/net.h SHUT_RDWR). */
export const SHUT_RDWR = 2;

// struct sockaddr_un (linux/un.h): sa_family_t sun_family (u16); char sun_path[108].
const SOCKADDR_UN_FAMILY = 0;
const SOCKADDR_UN_PATH = 2;
/** UNIX_PATH_MAX (linux/un.h): sun_path bytes including the terminating NUL. */
export const UNIX_PATH_MAX = 108;
const SOCKADDR_UN_SIZE = SOCKADDR_UN_PATH + UNIX_PATH_MAX;

// struct iovec (bits/types/struct_iovec.h, x86_64): void *iov_base; size_t iov_len.
const IOVEC_BASE = 0;
const IOVEC_LEN = 8;
const IOVEC_SIZE = 16;

// struct msghdr (bits/socket.h, x86_64 glibc).
const MSGHDR_NAME = 0; // void *msg_name
const MSGHDR_NAMELEN = 8; // socklen_t msg_namelen
const MSGHDR_IOV = 16; // struct iovec *msg_iov
const MSGHDR_IOVLEN = 24; // size_t msg_iovlen
const MSGHDR_CONTROL = 32; // void *msg_control
const MSGHDR_CONTROLLEN = 40; // size_t msg_controllen
const MSGHDR_FLAGS = 48; // int msg_flags
const MSGHDR_SIZE = 56;

// struct cmsghdr (bits/socket.h, x86_64): size_t cmsg_len; int cmsg_level; int cmsg_type; data.
const CMSG_LEN_OFF = 0;
const CMSG_LEVEL_OFF = 8;
const CMSG_TYPE_OFF = 12;
const CMSG_HDR_SIZE = 16;
/** CMSG_ALIGN boundary: sizeof(size_t) on x86_64. */
const CMSG_ALIGNMENT = 8;
const FD_SIZE = 4;

/** Most descriptors accepted in one message (vhost-user sends at most 8, one per memory region). */
export const MAX_FDS_PER_MESSAGE = 16;

function cmsgAlign(n: number): number {
  return (n + CMSG_ALIGNMENT - 1) & ~(CMSG_ALIGNMENT - 1);
}
/** CMSG_SPACE(n): header plus aligned payload. */
function cmsgSpace(n: number): number {
  return CMSG_HDR_SIZE + cmsgAlign(n);
}
/** CMSG_LEN(n): header plus unpadded payload. */
function cmsgLen(n: number): number {
  return CMSG_HDR_SIZE + n;
}

function ptrValue(buf: Uint8Array): bigint {
  return BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(buf)));
}

function sockaddrUn(path: string): Uint8Array<ArrayBuffer> {
  const bytes = new TextEncoder().encode(path);
  if (bytes.length === 0 || bytes.length >= UNIX_PATH_MAX) {
    throw new Error(`unix socket path must be 1..${UNIX_PATH_MAX - 1} bytes: ${path}`);
  }
  const sa = new Uint8Array(SOCKADDR_UN_SIZE);
  new DataView(sa.buffer).setUint16(SOCKADDR_UN_FAMILY, AF_UNIX, true);
  sa.set(bytes, SOCKADDR_UN_PATH);
  return sa;
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
      const chunk = data.slice(off);
      const iov = new Uint8Array(IOVEC_SIZE);
      const iv = new DataView(iov.buffer);
      iv.setBigUint64(IOVEC_BASE, ptrValue(chunk), true);
      iv.setBigUint64(IOVEC_LEN, BigInt(chunk.length), true);
      const msg = new Uint8Array(MSGHDR_SIZE);
      const mv = new DataView(msg.buffer);
      mv.setBigUint64(MSGHDR_IOV, ptrValue(iov), true);
      mv.setBigUint64(MSGHDR_IOVLEN, 1n, true);
      let control: Uint8Array | undefined;
      if (pendingFds.length > 0) {
        control = new Uint8Array(cmsgSpace(pendingFds.length * FD_SIZE));
        const cv = new DataView(control.buffer);
        cv.setBigUint64(CMSG_LEN_OFF, BigInt(cmsgLen(pendingFds.length * FD_SIZE)), true);
        cv.setInt32(CMSG_LEVEL_OFF, SOL_SOCKET, true);
        cv.setInt32(CMSG_TYPE_OFF, SCM_RIGHTS, true);
        pendingFds.forEach((fd, i) => cv.setInt32(CMSG_HDR_SIZE + i * FD_SIZE, fd, true));
        mv.setBigUint64(MSGHDR_CONTROL, ptrValue(control), true);
        mv.setBigUint64(MSGHDR_CONTROLLEN, BigInt(control.length), true);
      }
      const n = Number(libc().sendmsg(this.#fd, msg, MSG_NOSIGNAL));
      if (n < 0) {
        const e = errno();
        if (e === EINTR) continue;
        if (e === EAGAIN) {
          await this.#wait(POLLOUT);
          continue;
        }
        throw new SysError("sendmsg", e);
      }
      off += n;
      pendingFds = [];
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

/** Put an fd in non-blocking mode. */
export function setNonBlocking(fd: number): void {
  const fl = check("fcntl F_GETFL", libc().fcntl(fd, F_GETFL, 0n));
  check("fcntl F_SETFL", libc().fcntl(fd, F_SETFL, BigInt(fl | O_NONBLOCK)));
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
   * Bind and listen at `path`. A stale socket file there (left by a killed process) is
   * replaced; any other kind of file is an error.
   */
  static listen(path: string, waker?: Waker, backlog = 8): UnixListener {
    const sa = sockaddrUn(path);
    try {
      const st = Deno.lstatSync(path);
      if (!st.isSocket) throw new Error(`${path} exists and is not a socket`);
      Deno.removeSync(path);
    } catch (e) {
      if (!(e instanceof Deno.errors.NotFound)) throw e;
    }
    const fd = check("socket", libc().socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (libc().bind(fd, sa, sa.length) < 0 || libc().listen(fd, backlog) < 0) {
      const e = errno();
      closeFd(fd);
      throw new SysError(`bind/listen ${path}`, e);
    }
    return new UnixListener(fd, path, waker);
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
