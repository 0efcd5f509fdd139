// Sockets through libc: constants and struct layouts (sockaddr_un, iovec, msghdr, cmsghdr) that the
// Unix-socket users of denovm (vhost-user, the control socket) share. Numbers from Linux's
// include/linux/socket.h, linux/net.h, linux/un.h and glibc's bits/socket.h (x86_64).

import { check, F_GETFL, F_SETFL, libc, O_NONBLOCK } from "./libc.ts";

// Socket constants (Linux include/linux/socket.h, asm-generic/socket.h, linux/net.h).
/** Address family for Unix sockets (linux/socket.h AF_UNIX). */
export const AF_UNIX = 1;
/** Byte stream socket type (linux/net.h SOCK_STREAM). */
export const SOCK_STREAM = 1;
/** Connection-oriented, record-preserving socket type (linux/net.h enum sock_type: SOCK_SEQPACKET = 5). */
export const SOCK_SEQPACKET = 5;
/** socket()/accept4() flag: non-blocking (linux/net.h SOCK_NONBLOCK = O_NONBLOCK). */
export const SOCK_NONBLOCK = 0o4000;
/** socket()/accept4() flag: close-on-exec (linux/net.h SOCK_CLOEXEC = O_CLOEXEC). */
export const SOCK_CLOEXEC = 0o2000000;
/** Socket-level option level (asm-generic/socket.h SOL_SOCKET). */
export const SOL_SOCKET = 1;
/** Socket option: the send buffer's size, capped at net.core.wmem_max (asm-generic/socket.h SO_SNDBUF). */
export const SO_SNDBUF = 7;
/** Socket option: SO_SNDBUF past wmem_max, for CAP_NET_ADMIN (asm-generic/socket.h SO_SNDBUFFORCE). */
export const SO_SNDBUFFORCE = 32;
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

// errno values of socket calls (asm-generic/errno.h).
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

// struct sockaddr_un (linux/un.h): sa_family_t sun_family (u16); char sun_path[108].
export const SOCKADDR_UN_FAMILY = 0;
export const SOCKADDR_UN_PATH = 2;
/** UNIX_PATH_MAX (linux/un.h): sun_path bytes including the terminating NUL. */
export const UNIX_PATH_MAX = 108;
export const SOCKADDR_UN_SIZE = SOCKADDR_UN_PATH + UNIX_PATH_MAX;

// struct iovec (bits/types/struct_iovec.h, x86_64): void *iov_base; size_t iov_len.
export const IOVEC_BASE = 0;
export const IOVEC_LEN = 8;
export const IOVEC_SIZE = 16;

// struct msghdr (bits/socket.h, x86_64 glibc).
export const MSGHDR_NAME = 0; // void *msg_name
export const MSGHDR_NAMELEN = 8; // socklen_t msg_namelen
export const MSGHDR_IOV = 16; // struct iovec *msg_iov
export const MSGHDR_IOVLEN = 24; // size_t msg_iovlen
export const MSGHDR_CONTROL = 32; // void *msg_control
export const MSGHDR_CONTROLLEN = 40; // size_t msg_controllen
export const MSGHDR_FLAGS = 48; // int msg_flags
export const MSGHDR_SIZE = 56;

// struct cmsghdr (bits/socket.h, x86_64): size_t cmsg_len; int cmsg_level; int cmsg_type; data.
export const CMSG_LEN_OFF = 0;
export const CMSG_LEVEL_OFF = 8;
export const CMSG_TYPE_OFF = 12;
export const CMSG_HDR_SIZE = 16;
/** CMSG_ALIGN boundary: sizeof(size_t) on x86_64. */
export const CMSG_ALIGNMENT = 8;
export const FD_SIZE = 4;

/** Most descriptors accepted in one message (vhost-user sends at most 8, one per memory region). */
export const MAX_FDS_PER_MESSAGE = 16;

export function cmsgAlign(n: number): number {
  return (n + CMSG_ALIGNMENT - 1) & ~(CMSG_ALIGNMENT - 1);
}
/** CMSG_SPACE(n): header plus aligned payload. */
export function cmsgSpace(n: number): number {
  return CMSG_HDR_SIZE + cmsgAlign(n);
}
/** CMSG_LEN(n): header plus unpadded payload. */
export function cmsgLen(n: number): number {
  return CMSG_HDR_SIZE + n;
}

export function ptrValue(buf: Uint8Array): bigint {
  return BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(buf)));
}

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

/** Put an fd in non-blocking mode. */
export function setNonBlocking(fd: number): void {
  const fl = check("fcntl F_GETFL", libc().fcntl(fd, F_GETFL, 0n));
  check("fcntl F_SETFL", libc().fcntl(fd, F_SETFL, BigInt(fl | O_NONBLOCK)));
}

/**
 * Ask for a send buffer of at least `bytes` on socket `fd` (SO_SNDBUFFORCE where the process may, else
 * SO_SNDBUF, which the kernel caps at net.core.wmem_max); returns the size the kernel then reports (it
 * doubles what was asked, for its bookkeeping: socket(7)). Never throws: the socket keeps working either way.
 */
export function raiseSendBuffer(fd: number, bytes: number): number {
  const v = new Int32Array([Math.min(bytes, 0x3fffffff)]);
  const asBytes = new Uint8Array(v.buffer);
  const current = () => {
    const out = new Int32Array(1);
    const len = new Uint32Array([4]);
    return libc().getsockopt(fd, SOL_SOCKET, SO_SNDBUF, new Uint8Array(out.buffer), new Uint8Array(len.buffer)) === 0
      ? out[0]
      : -1;
  };
  const before = current();
  if (before >= bytes || before < 0) return before;
  if (libc().setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, asBytes, 4) !== 0) {
    libc().setsockopt(fd, SOL_SOCKET, SO_SNDBUF, asBytes, 4);
  }
  return current();
}
