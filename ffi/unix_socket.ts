// Unix SOCK_SEQPACKET sockets through libc FFI: the pieces core/unix_socket.ts (stream sockets)
// does not export. Constants it already exports (AF_UNIX, SOCK_NONBLOCK, SOCK_CLOEXEC, UNIX_PATH_MAX) are
// reused from there, not redefined. Sending and receiving packets goes through its UnixStream class, whose
// recvmsg/sendmsg calls work the same on a SOCK_SEQPACKET descriptor (one call = one packet).

import { AF_UNIX, setNonBlocking, SOCK_CLOEXEC, SOCK_NONBLOCK, UNIX_PATH_MAX } from "./socket.ts";
import { check, closeFd, EAGAIN, EINTR, errno, libc, SysError } from "./libc.ts";

/** Connection-oriented, record-preserving socket type (linux/net.h enum sock_type: SOCK_SEQPACKET = 5). */
export const SOCK_SEQPACKET = 5;

// errno values from asm-generic/errno.h.
/** Nobody listens on the socket file (asm-generic/errno.h ECONNREFUSED). */
export const ECONNREFUSED = 111;
/** The address is already bound (asm-generic/errno.h EADDRINUSE). */
export const EADDRINUSE = 98;
/** Socket type mismatch, e.g. SEQPACKET connect to a STREAM listener (asm-generic/errno.h EPROTOTYPE). */
export const EPROTOTYPE = 91;
/** Broken pipe: the peer closed before we sent (asm-generic/errno.h EPIPE). */
export const EPIPE = 32;
/** Connection reset by peer (asm-generic/errno.h ECONNRESET). */
export const ECONNRESET = 104;

// struct sockaddr_un (linux/un.h): sa_family_t sun_family (u16), then char sun_path[UNIX_PATH_MAX].
const SOCKADDR_UN_FAMILY = 0;
const SOCKADDR_UN_PATH = 2;
const SOCKADDR_UN_SIZE = SOCKADDR_UN_PATH + UNIX_PATH_MAX;

/** Whether `path` fits in sun_path with its terminating NUL. */
export function fitsSunPath(path: string): boolean {
  const n = new TextEncoder().encode(path).length;
  return n > 0 && n < UNIX_PATH_MAX;
}

/** A struct sockaddr_un for a filesystem path; throws when the path does not fit sun_path. */
export function sockaddrUn(path: string): Uint8Array<ArrayBuffer> {
  const bytes = new TextEncoder().encode(path);
  if (bytes.length === 0 || bytes.length >= UNIX_PATH_MAX) {
    throw new Error(`unix socket path must be 1..${UNIX_PATH_MAX - 1} bytes: ${path}`);
  }
  const sa = new Uint8Array(SOCKADDR_UN_SIZE);
  new DataView(sa.buffer).setUint16(SOCKADDR_UN_FAMILY, AF_UNIX, true);
  sa.set(bytes, SOCKADDR_UN_PATH);
  return sa;
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
