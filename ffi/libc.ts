// libc through Deno FFI: every libc symbol denovm calls is declared here, once.
// Failed calls become a typed SysError carrying the call's name and errno text.

/** Resolve the C library: DENOVM_LIBC overrides, else glibc's soname. */
function libcPath(): string {
  return Deno.env.get("DENOVM_LIBC") ?? "libc.so.6";
}

const symbols = {
  open: { parameters: ["buffer", "i32", "u32"], result: "i32" }, // const char *path, int flags, mode_t mode
  close: { parameters: ["i32"], result: "i32" }, // int fd
  // ioctl(int fd, unsigned long request, void *arg): arg passed as a pointer or a plain integer.
  ioctl: { parameters: ["i32", "u64", "pointer"], result: "i32" },
  ioctl_int: { name: "ioctl", parameters: ["i32", "u64", "u64"], result: "i32" },
  mmap: {
    parameters: ["pointer", "usize", "i32", "i32", "i32", "i64"], // addr, length, prot, flags, fd, offset
    result: "pointer",
  },
  munmap: { parameters: ["pointer", "usize"], result: "i32" }, // void *addr, size_t length
  madvise: { parameters: ["pointer", "usize", "i32"], result: "i32" }, // addr, length, advice
  eventfd: { parameters: ["u32", "i32"], result: "i32" }, // unsigned int initval, int flags
  poll: { parameters: ["buffer", "u64", "i32"], result: "i32" }, // struct pollfd *fds, nfds_t nfds, int timeout
  poll_async: { name: "poll", parameters: ["buffer", "u64", "i32"], result: "i32", nonblocking: true },
  read: { parameters: ["i32", "buffer", "usize"], result: "isize" }, // int fd, void *buf, size_t count
  write: { parameters: ["i32", "buffer", "usize"], result: "isize" }, // int fd, const void *buf, size_t count
  pread: { name: "pread64", parameters: ["i32", "buffer", "usize", "i64"], result: "isize" }, // fd, buf, count, offset
  pwrite: { name: "pwrite64", parameters: ["i32", "buffer", "usize", "i64"], result: "isize" }, // fd, buf, count, offset
  pread_ptr: { name: "pread64", parameters: ["i32", "pointer", "usize", "i64"], result: "isize" },
  pwrite_ptr: { name: "pwrite64", parameters: ["i32", "pointer", "usize", "i64"], result: "isize" },
  fdatasync: { parameters: ["i32"], result: "i32" }, // int fd
  fsync: { parameters: ["i32"], result: "i32" }, // int fd
  fallocate: { name: "fallocate64", parameters: ["i32", "i32", "i64", "i64"], result: "i32" }, // fd, mode, offset, len
  ftruncate: { name: "ftruncate64", parameters: ["i32", "i64"], result: "i32" }, // fd, length
  memfd_create: { parameters: ["buffer", "u32"], result: "i32" }, // const char *name, unsigned int flags
  fcntl: { parameters: ["i32", "i32", "i64"], result: "i32" }, // int fd, int cmd, long arg
  socket: { parameters: ["i32", "i32", "i32"], result: "i32" }, // domain, type, protocol
  socketpair: { parameters: ["i32", "i32", "i32", "buffer"], result: "i32" }, // domain, type, protocol, int sv[2]
  bind: { parameters: ["i32", "buffer", "u32"], result: "i32" }, // fd, const struct sockaddr *, socklen_t
  listen: { parameters: ["i32", "i32"], result: "i32" }, // fd, backlog
  accept4: { parameters: ["i32", "pointer", "pointer", "i32"], result: "i32" }, // fd, addr, addrlen, flags
  connect: { parameters: ["i32", "buffer", "u32"], result: "i32" }, // fd, const struct sockaddr *, socklen_t
  // int memcmp(const void *a, const void *b, size_t n), the addresses as numbers (no pointer objects per call).
  memcmp: { parameters: ["usize", "usize", "usize"], result: "i32" },
  setsockopt: { parameters: ["i32", "i32", "i32", "buffer", "u32"], result: "i32" }, // fd, level, name, value, len
  getsockopt: { parameters: ["i32", "i32", "i32", "buffer", "buffer"], result: "i32" }, // fd, level, name, value, *len
  sendmsg: { parameters: ["i32", "buffer", "i32"], result: "isize" }, // fd, const struct msghdr *, flags
  recvmsg: { parameters: ["i32", "buffer", "i32"], result: "isize" }, // fd, struct msghdr *, flags
  shutdown: { parameters: ["i32", "i32"], result: "i32" }, // fd, how
  getpid: { parameters: [], result: "i32" },
  gettid: { parameters: [], result: "i32" },
  tgkill: { parameters: ["i32", "i32", "i32"], result: "i32" }, // tgid, tid, sig
  sigaction: { parameters: ["i32", "buffer", "pointer"], result: "i32" }, // signum, const struct sigaction *, old
  isatty: { parameters: ["i32"], result: "i32" }, // int fd
  tcgetattr: { parameters: ["i32", "buffer"], result: "i32" }, // fd, struct termios *
  tcsetattr: { parameters: ["i32", "i32", "buffer"], result: "i32" }, // fd, optional_actions, const struct termios *
  __errno_location: { parameters: [], result: "pointer" },
  strerror: { parameters: ["i32"], result: "pointer" }, // int errnum
  dlsym: { parameters: ["pointer", "buffer"], result: "pointer" }, // void *handle, const char *symbol
  dlopen: { parameters: ["buffer", "i32"], result: "pointer" }, // const char *filename, int flags
  flock: { parameters: ["i32", "i32"], result: "i32" }, // int fd, int operation
  pipe2: { parameters: ["buffer", "i32"], result: "i32" }, // int pipefd[2], int flags
  calloc: { parameters: ["usize", "usize"], result: "pointer" }, // size_t nmemb, size_t size
  free: { parameters: ["pointer"], result: "void" }, // void *ptr
  malloc_trim: { parameters: ["usize"], result: "i32" }, // size_t pad (glibc)
} as const satisfies Deno.ForeignLibraryInterface;

type LibcSymbols = Deno.DynamicLibrary<typeof symbols>["symbols"];
type LibcName = keyof typeof symbols;

let table: LibcSymbols | undefined;

/** Bind one symbol (its own dlopen handle; the library is loaded once and reference-counted). */
function bind<K extends LibcName>(name: K): LibcSymbols[K] {
  try {
    const one = { [name]: symbols[name] } as Pick<typeof symbols, K>;
    return Deno.dlopen(libcPath(), one).symbols[name] as LibcSymbols[K];
  } catch (e) {
    throw new Error(`cannot load ${name} from the C library ${libcPath()} (package libc6): ${(e as Error).message}`);
  }
}

/**
 * The libc symbol table. Each symbol is bound on its first call: Deno builds a call trampoline for
 * every symbol it binds, and a given command calls only some of them, so binding them all at start-up
 * would cost every command the time of all the trampolines. Until then the table holds a
 * stand-in that binds the symbol, puts it in its place and calls it; afterwards the property is the
 * foreign function itself, so hot paths (KVM_RUN on every exit) call it directly.
 */
export function libc(): LibcSymbols {
  if (!table) {
    const t = {} as Record<LibcName, unknown>;
    for (const name of Object.keys(symbols) as LibcName[]) {
      let bound: ((...args: unknown[]) => unknown) | undefined;
      t[name] = (...args: unknown[]) => {
        bound ??= bind(name) as unknown as (...args: unknown[]) => unknown;
        t[name] = bound;
        return bound(...args);
      };
    }
    table = t as LibcSymbols;
  }
  return table;
}

/**
 * memcmp(3) of `n` bytes at two host addresses given as numbers. Deno's FFI takes a number for a 64-bit
 * integer argument as well as a bigint (its types say bigint only); numbers spare an allocation per call,
 * which matters to callers comparing a frame row by row.
 */
export function memcmpAt(a: number, b: number, n: number): number {
  type NumberArgs = (a: number, b: number, n: number) => number;
  return (libc().memcmp as unknown as NumberArgs)(a, b, n);
}

// Values from Linux's asm-generic/fcntl.h, asm-generic/mman-common.h, asm-generic/errno-base.h.
/** open(2) flags (asm-generic/fcntl.h). */
export const O_RDONLY = 0o0;
export const O_WRONLY = 0o1;
export const O_RDWR = 0o2;
export const O_CREAT = 0o100;
export const O_EXCL = 0o200;
export const O_NONBLOCK = 0o4000;
export const O_DIRECT = 0o40000;
export const O_DIRECTORY = 0o200000;
export const O_CLOEXEC = 0o2000000;
/** mmap(2) protection and flags (asm-generic/mman-common.h, mman.h). */
export const PROT_NONE = 0;
export const PROT_READ = 1;
export const PROT_WRITE = 2;
/** dlopen flags (bits/dlfcn.h): resolve every symbol now; never unload the library. */
export const RTLD_NOW = 0x00002;
export const RTLD_NODELETE = 0x01000;
export const MAP_SHARED = 0x01;
export const MAP_PRIVATE = 0x02;
export const MAP_FIXED = 0x10;
export const MAP_ANONYMOUS = 0x20;
export const MAP_NORESERVE = 0x4000;
/** madvise(2) advice (asm-generic/mman-common.h). */
export const MADV_DONTNEED = 4;
export const MADV_REMOVE = 9;
export const MADV_HUGEPAGE = 14;
/** eventfd(2) flags (sys/eventfd.h). */
export const EFD_CLOEXEC = O_CLOEXEC;
export const EFD_NONBLOCK = O_NONBLOCK;
/** Each read takes 1 from the counter instead of all of it (sys/eventfd.h). */
export const EFD_SEMAPHORE = 1;
/** poll(2) events (asm-generic/poll.h). */
export const POLLIN = 0x1;
export const POLLOUT = 0x4;
export const POLLERR = 0x8;
export const POLLHUP = 0x10;
export const POLLNVAL = 0x20;
/** flock(2) operations (sys/file.h). */
export const LOCK_SH = 1;
export const LOCK_EX = 2;
export const LOCK_NB = 4;
/** fallocate(2) modes (linux/falloc.h). */
export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;
/** memfd_create(2) flags (linux/memfd.h). */
export const MFD_CLOEXEC = 0x1;
export const MFD_ALLOW_SEALING = 0x2;
/** fcntl(2) commands (asm-generic/fcntl.h). */
export const F_GETFL = 3;
export const F_SETFL = 4;
/** File seals (linux/fcntl.h: F_LINUX_SPECIFIC_BASE 1024 + 9 and + 10; the F_SEAL_* bits). */
export const F_ADD_SEALS = 1033;
export const F_GET_SEALS = 1034;
export const F_SEAL_SEAL = 0x1;
export const F_SEAL_SHRINK = 0x2;
export const F_SEAL_GROW = 0x4;
export const F_SEAL_WRITE = 0x8;
/** errno values (asm-generic/errno-base.h, errno.h). */
export const EINTR = 4;
export const EAGAIN = 11;
export const ENOMEM = 12;
export const EACCES = 13;
export const EEXIST = 17;
export const ENODEV = 19;
export const EINVAL = 22;
export const E2BIG = 7;
export const ENOENT = 2;
export const EPERM = 1;
export const EOPNOTSUPP = 95;

/** mmap's failure value, (void *)-1. */
export const MAP_FAILED = 0xffff_ffff_ffff_ffffn;

/** A failed system call: `call` names it (an ioctl carries its request name), `errno` is the C errno. */
export class SysError extends Error {
  constructor(readonly call: string, readonly errno: number) {
    super(`${call}: ${strerror(errno)} (errno ${errno})`);
    this.name = "SysError";
  }
}

/** errno of the calling thread, read right after a failed call. */
export function errno(): number {
  const p = libc().__errno_location();
  return new Deno.UnsafePointerView(p!).getInt32(0);
}

/** The C library's text for an errno value. */
export function strerror(e: number): string {
  const p = libc().strerror(e);
  return p ? Deno.UnsafePointerView.getCString(p) : `errno ${e}`;
}

/** Throws SysError when a call returned a negative number; returns the value otherwise. */
export function check<T extends number | bigint>(call: string, ret: T): T {
  if (ret < 0) throw new SysError(call, errno());
  return ret;
}

/** A NUL-terminated C string for FFI "buffer" parameters. */
export function cstr(s: string): Uint8Array<ArrayBuffer> {
  const b = new TextEncoder().encode(s);
  const out = new Uint8Array(b.length + 1);
  out.set(b);
  return out;
}

/** Open a file, returning its fd or throwing SysError("open PATH"). */
export function openFile(path: string, flags: number, mode = 0o644): number {
  return check(`open ${path}`, libc().open(cstr(path), flags | O_CLOEXEC, mode));
}

/** Close an fd, ignoring errors (closing is best effort at teardown). */
export function closeFd(fd: number): void {
  if (fd >= 0) libc().close(fd);
}

/** Map `length` bytes; throws SysError("mmap") on failure. */
export function mmap(
  length: number,
  prot: number,
  flags: number,
  fd = -1,
  offset = 0,
  addr: Deno.PointerValue = null,
): NonNullable<Deno.PointerValue> {
  const p = libc().mmap(addr, BigInt(length), prot, flags, fd, BigInt(offset));
  if (p === null || BigInt(Deno.UnsafePointer.value(p)) === MAP_FAILED) {
    throw new SysError("mmap", errno());
  }
  return p;
}

/** Anonymous private read-write memory, e.g. guest RAM. */
export function mmapAnon(length: number): NonNullable<Deno.PointerValue> {
  return mmap(length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE);
}

/**
 * Anonymous private read-write memory starting at a multiple of `align` (a power of two), with
 * transparent huge pages asked for (MADV_HUGEPAGE; refused quietly where THP is off). For guest RAM:
 * KVM maps a guest range with a large page only when host and guest addresses agree modulo the page
 * size (Documentation/virt/kvm/mmu.rst; QEMU aligns its RAM for the same reason), and mmap(2) alone
 * aligns to 4 KiB. Over-maps by `align`, then unmaps the unaligned head and the tail.
 */
export function mmapAnonAligned(length: number, align: number): NonNullable<Deno.PointerValue> {
  const raw = mmapAnon(length + align);
  const base = BigInt(Deno.UnsafePointer.value(raw));
  const a = BigInt(align);
  const aligned = (base + a - 1n) & ~(a - 1n);
  const head = Number(aligned - base);
  if (head > 0) munmap(raw, head);
  if (align - head > 0) munmap(Deno.UnsafePointer.create(aligned + BigInt(length)), align - head);
  const p = Deno.UnsafePointer.create(aligned)!;
  libc().madvise(p, BigInt(length), MADV_HUGEPAGE);
  return p;
}

export function munmap(ptr: Deno.PointerValue, length: number): void {
  check("munmap", libc().munmap(ptr, BigInt(length)));
}

/** A new eventfd (non-blocking, close-on-exec). */
export function eventfd(initval = 0, flags = EFD_CLOEXEC | EFD_NONBLOCK): number {
  return check("eventfd", libc().eventfd(initval, flags));
}

const u64buf = new BigUint64Array(1);
/** Add `value` to an eventfd's counter. */
export function eventfdWrite(fd: number, value = 1n): void {
  u64buf[0] = value;
  const r = libc().write(fd, new Uint8Array(u64buf.buffer), 8n);
  if (r < 0 && errno() !== EAGAIN) throw new SysError("eventfd write", errno());
}

/** Read and reset an eventfd's counter; 0n when nothing was pending (non-blocking fd). */
export function eventfdRead(fd: number): bigint {
  const b = new BigUint64Array(1);
  const r = libc().read(fd, new Uint8Array(b.buffer), 8n);
  if (r < 0) {
    if (errno() === EAGAIN) return 0n;
    throw new SysError("eventfd read", errno());
  }
  return b[0];
}

/** pollfd layout (asm-generic/poll.h): int fd; short events; short revents. */
export const POLLFD_SIZE = 8;
export const POLLFD_FD = 0;
export const POLLFD_EVENTS = 4;
export const POLLFD_REVENTS = 6;

/**
 * Wait on several fds; returns the revents of each. Runs on a helper thread (nonblocking FFI) so the event
 * loop keeps going while it waits. That thread comes from Deno's pool of blocking threads: 32 on Linux
 * (deno runtime/tokio_util.rs, max_blocking_threads), shared by every nonblocking FFI call and async file
 * operation of the isolate; a call beyond them waits until one is free. So a pending pollAsync is for a wait
 * whose number the configuration bounds (one per device), never one per connection a peer can open: those
 * waits belong in one poll on a thread of their own (core/poll_thread.ts).
 */
export async function pollAsync(fds: number[], events: number, timeoutMs: number): Promise<number[]> {
  const buf = new Uint8Array(fds.length * POLLFD_SIZE);
  const dv = new DataView(buf.buffer);
  fds.forEach((fd, i) => {
    dv.setInt32(i * POLLFD_SIZE + POLLFD_FD, fd, true);
    dv.setInt16(i * POLLFD_SIZE + POLLFD_EVENTS, events, true);
  });
  const r = await libc().poll_async(buf, BigInt(fds.length), timeoutMs);
  if (r < 0) {
    // errno is per thread and the call ran on another one: report what we can.
    return fds.map(() => 0);
  }
  return fds.map((_, i) => dv.getInt16(i * POLLFD_SIZE + POLLFD_REVENTS, true));
}

/** Synchronous poll; returns the revents of each fd. */
export function pollSync(fds: number[], events: number, timeoutMs: number): number[] {
  const buf = new Uint8Array(fds.length * POLLFD_SIZE);
  const dv = new DataView(buf.buffer);
  fds.forEach((fd, i) => {
    dv.setInt32(i * POLLFD_SIZE + POLLFD_FD, fd, true);
    dv.setInt16(i * POLLFD_SIZE + POLLFD_EVENTS, events, true);
  });
  const r = libc().poll(buf, BigInt(fds.length), timeoutMs);
  if (r < 0 && errno() !== EINTR) throw new SysError("poll", errno());
  return fds.map((_, i) => dv.getInt16(i * POLLFD_SIZE + POLLFD_REVENTS, true));
}

/** sigaction(2) flags and sizes for x86_64 glibc (bits/sigaction.h): handler, 128-byte mask, flags, restorer. */
const SIGACTION_SIZE = 152;
const SIGACTION_FLAGS_OFFSET = 136;
/** The signal that kicks a vCPU thread out of KVM_RUN (SIGRTMIN + 1; glibc reserves 32 and 33). */
export const SIG_VCPU_KICK = 35;

let kickHandlerInstalled = false;
/**
 * Install a do-nothing handler for SIG_VCPU_KICK without SA_RESTART, so a blocking
 * ioctl in the signalled thread returns EINTR. The handler is libc's getpid: a real,
 * async-signal-safe C function (a JS callback must never run in signal context).
 */
export function installKickHandler(): void {
  if (kickHandlerInstalled) return;
  const handler = libc().dlsym(null, cstr("getpid"));
  if (!handler) throw new Error("dlsym(getpid) failed");
  const sa = new Uint8Array(SIGACTION_SIZE);
  const v = new DataView(sa.buffer);
  v.setBigUint64(0, BigInt(Deno.UnsafePointer.value(handler)), true); // sa_handler
  v.setInt32(SIGACTION_FLAGS_OFFSET, 0, true); // sa_flags: no SA_RESTART
  check("sigaction", libc().sigaction(SIG_VCPU_KICK, sa, null));
  kickHandlerInstalled = true;
}

/** Send SIG_VCPU_KICK to one thread of this process. */
export function kickThread(tid: number): void {
  libc().tgkill(libc().getpid(), tid, SIG_VCPU_KICK);
}
