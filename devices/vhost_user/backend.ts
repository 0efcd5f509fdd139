// A vhost-user back end: serves one VirtioDevice to a front end (QEMU, crosvm,
// user-mode Linux...) over a Unix socket. The front end shares its guest RAM as
// file descriptors (SET_MEM_TABLE), describes each ring (SET_VRING_*), kicks the
// device through eventfds and receives interrupts on call fds. Semantics follow
// QEMU docs/interop/vhost-user.rst ("Starting and stopping rings", "Front-end
// message types").
//
// Data path: kick eventfd readable -> device.queueNotify(i) -> Virtqueue in the
// shared memory -> device.signalUsedQueue(i) -> write to ring i's call fd.
//
// The shared memory belongs to the front end, which may be hostile. A region is mapped only when
// its descriptor is a regular file that backs it wholly, sealed against shrinking where the file
// allows it; if the front end shrinks a file later, the SIGBUS guard (ffi/sigbus_guard.ts) turns the
// device's touch past its end into a zero page and a record, and the front end is dropped.

import {
  closeFd,
  EAGAIN,
  EINTR,
  errno,
  eventfd,
  eventfdRead,
  eventfdWrite,
  F_ADD_SEALS,
  F_GET_SEALS,
  F_SEAL_SHRINK,
  libc,
  MAP_SHARED,
  mmap,
  munmap,
  pollAsync,
  POLLERR,
  POLLHUP,
  POLLIN,
  POLLNVAL,
  pollSync,
  PROT_READ,
  PROT_WRITE,
  SysError,
} from "../../ffi/libc.ts";
import { type SigbusGuard, sigbusGuard } from "../../ffi/sigbus_guard.ts";
import { GuestMemory, GuestMemoryError, type RegionDescriptor } from "../../core/memory.ts";
import { guestLog } from "../../core/log.ts";
import { fdInfo, fileKind } from "../../core/host_file.ts";
import type { VirtioDevice, VirtioInterrupt } from "../virtio/device.ts";
import { VIRTIO_F_EVENT_IDX } from "../virtio/device.ts";
import { availRingBytes, descTableBytes, usedRingBytes, VIRTQ_MAX_SIZE, Virtqueue } from "../virtio/queue.ts";
import {
  configPayload,
  encodeMessage,
  parseConfig,
  parseMemTable,
  parseU64,
  parseVringAddr,
  parseVringState,
  readMessage,
  requestName,
  u64Payload,
  VHOST_USER_F_PROTOCOL_FEATURES,
  VHOST_USER_FLAG_NEED_REPLY,
  VHOST_USER_FLAG_REPLY,
  VHOST_USER_PROTOCOL_F_BACKEND_REQ,
  VHOST_USER_PROTOCOL_F_CONFIG,
  VHOST_USER_PROTOCOL_F_REPLY_ACK,
  VHOST_USER_PROTOCOL_F_RESET_DEVICE,
  VHOST_USER_VERSION,
  VHOST_USER_VRING_INDEX_MASK,
  VHOST_USER_VRING_NOFD_MASK,
  VhostUserBackendRequest,
  type VhostUserMessage,
  VhostUserProtocolError,
  VhostUserRequest as R,
  type VringAddr,
  vringStatePayload,
} from "./protocol.ts";
import {
  ConnectionClosed,
  setNonBlocking,
  UnixListener,
  type UnixStream,
  WaitCancelled,
  Waker,
} from "../../core/unix_socket.ts";

/**
 * Protocol features this back end offers (vhost-user.rst "Protocol features"). BACKEND_REQ gives
 * the back-end request channel (config-change notices); user-mode Linux 6.1 also needs it to set
 * up its ring interrupts at all (virtio_uml.c allocates its IRQ only when it is negotiated).
 */
export const BACKEND_PROTOCOL_FEATURES = VHOST_USER_PROTOCOL_F_REPLY_ACK | VHOST_USER_PROTOCOL_F_CONFIG |
  VHOST_USER_PROTOCOL_F_RESET_DEVICE | VHOST_USER_PROTOCOL_F_BACKEND_REQ;

/** mmap offsets must be multiples of the page size (x86_64 base pages: 4 KiB). */
const PAGE_SIZE = 4096;

/** A request that failed but leaves the connection usable (acknowledged with a non-zero status). */
class RequestFailed extends Error {}

/**
 * A memory table this back end will not map. Refused with a failure status when the front end asked
 * for a reply; otherwise the front end is dropped (it would go on as if its memory were shared).
 */
class MemoryTableRefused extends RequestFailed {}

/** A region's file shrank under its mapping and the SIGBUS guard repaired an access past its end. */
class MemoryShrank extends Error {}

/** One mapped region of the front end's memory table. */
interface Mapping {
  ptr: Deno.PointerObject;
  length: number;
  /** Its place in the table (named in log lines). */
  index: number;
  /** Its SIGBUS guard slot, or -1 when unguarded. */
  slot: number;
}

/** What /proc/self/fd/N links to for an eventfd (fs/eventfd.c creates it as the anonymous inode "[eventfd]"). */
const EVENTFD_LINK = "anon_inode:[eventfd]";
/**
 * What /proc/self/fd/N links to for a pipe (fs/pipe.c: "pipe:[inode]") and a socket (net/socket.c:
 * "socket:[inode]"): the call fds a front end other than an eventfd can signal through (user-mode
 * Linux hands one end of a socketpair).
 */
const CALL_LINK_PREFIXES = ["pipe:[", "socket:["];
/**
 * The line fs/eventfd.c (eventfd_show_fdinfo) prints in /proc/self/fdinfo/N for an eventfd made with
 * EFD_SEMAPHORE, on kernels that print the mode at all. A read of such an eventfd takes 1 from its
 * counter and leaves it readable, so one write of a large count would keep a ring "kicked" forever.
 */
const EVENTFD_SEMAPHORE_FDINFO = /^eventfd-semaphore:\s*1\s*$/m;
/** The same line on any eventfd: where it is shown, the mode is known and the kick loop need not guess it. */
const EVENTFD_MODE_FDINFO = /^eventfd-semaphore:/m;
/** An eventfd read returns its 8-byte counter (eventfd(2)). */
const EVENTFD_READ_BYTES = 8;
/**
 * Kick reads in a row that return exactly 1 with the fd still readable after the read. A plain
 * eventfd read empties the counter, so this happens only with a semaphore eventfd (on a kernel that
 * does not show the mode in fdinfo); a front end kicking again within that instant, this many times
 * running, does not happen.
 */
const SEMAPHORE_READS = 64;

/** What the back end learns about a descriptor from /proc; undefined where /proc cannot tell. */
export interface FdInspector {
  /** Where /proc/self/fd/N points ("anon_inode:[eventfd]", "pipe:[123]", "/dev/zero", ...). */
  link(fd: number): string | undefined;
  /** The text of /proc/self/fdinfo/N. */
  info(fd: number): string | undefined;
}

const PROC_FD_INSPECTOR: FdInspector = {
  link(fd) {
    try {
      return Deno.readLinkSync(`/proc/self/fd/${fd}`);
    } catch {
      return undefined;
    }
  },
  info(fd) {
    try {
      return Deno.readTextFileSync(`/proc/self/fdinfo/${fd}`);
    } catch {
      return undefined;
    }
  },
};

/** Requests a front end may send that this back end declines (answered with a failure status if asked). */
const DECLINED_REQUESTS: ReadonlySet<number> = new Set([
  R.SET_LOG_BASE,
  R.SET_LOG_FD,
  R.SEND_RARP,
  R.NET_SET_MTU,
  R.IOTLB_MSG,
  R.SET_VRING_ENDIAN,
  R.SET_INFLIGHT_FD,
  R.SET_STATUS,
]);

/** Requests that carry their own reply; REPLY_ACK adds no second one. */
const REQUESTS_WITH_REPLY: ReadonlySet<number> = new Set([
  R.GET_FEATURES,
  R.GET_PROTOCOL_FEATURES,
  R.GET_VRING_BASE,
  R.GET_CONFIG,
  R.GET_QUEUE_NUM,
]);

interface Vring {
  /** Queue size from SET_VRING_NUM (0 until set). */
  num: number;
  /** Front-end virtual addresses from SET_VRING_ADDR. */
  addr?: VringAddr;
  /** Next available index to process (SET_VRING_BASE). */
  base: number;
  kickFd: number;
  callFd: number;
  errFd: number;
  /** Kick reads in a row that looked like a semaphore eventfd's (see SEMAPHORE_READS). */
  semaphoreReads: number;
  /** The kick fd's fdinfo showed it is a plain eventfd: the kick loop skips its semaphore guess. */
  plainKick: boolean;
  /** Started: a kick fd (or NOFD) arrived and GET_VRING_BASE has not stopped it. */
  started: boolean;
  /** Enabled by SET_VRING_ENABLE (or implicitly when protocol features were not negotiated). */
  enabled: boolean;
  queue?: Virtqueue;
}

function newVring(): Vring {
  return {
    num: 0,
    base: 0,
    kickFd: -1,
    callFd: -1,
    errFd: -1,
    semaphoreReads: 0,
    plainKick: false,
    started: false,
    enabled: false,
  };
}

/**
 * A device that answers front-end requests this back end does not handle itself, such as
 * VHOST_USER_GPU_SET_SOCKET (vhost-user.rst, request 33: the vhost-user-gpu display socket).
 */
export interface VhostUserRequestHandler {
  /**
   * Handle `request` (payload and descriptors as received); take the descriptors it keeps out of
   * `fds` (the rest are closed). Return false when the request is not one the device knows.
   */
  vhostUserRequest(request: number, payload: Uint8Array, fds: number[]): boolean;
  /** The front end went away: drop what the requests above set up. */
  vhostUserDisconnected?(): void;
}

function requestHandler(dev: VirtioDevice): VhostUserRequestHandler | undefined {
  const h = dev as Partial<VhostUserRequestHandler>;
  return typeof h.vhostUserRequest === "function" ? h as VhostUserRequestHandler : undefined;
}

export interface VhostUserBackendOptions {
  /** Where log lines go (default: stderr with a "vhost-user <device>:" prefix). */
  log?: (line: string) => void;
  /**
   * Wait for kicks and messages with a blocking poll(2) on this thread instead of the asynchronous one:
   * a wake-up is then one system call, not a hop through Deno's blocking-call threads and back through
   * the event loop. Only for a process that does nothing else (`denovm device block`) and a device that
   * does its work synchronously: the event loop turns only between polls (every BLOCKING_POLL_MS at
   * least, and when a signal interrupts the poll).
   */
  blockingPoll?: boolean;
  /**
   * How ring fds are inspected (default: /proc/self/fd and /proc/self/fdinfo). Tests replace it to stand
   * for a host without /proc or a kernel whose fdinfo does not show an eventfd's semaphore mode.
   */
  fdInspector?: FdInspector;
}

/** How long a blocking poll waits before the event loop gets a turn (signals, timers), in ms. */
const BLOCKING_POLL_MS = 100;

/** One turn of the event loop. */
function yieldToEventLoop(): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, 0));
}

/** One front-end connection's state. */
class Session implements VirtioInterrupt {
  readonly #device: VirtioDevice;
  readonly #sock: UnixStream;
  readonly #log: (line: string) => void;
  readonly #inspect: FdInspector;
  readonly #rings: Vring[];
  #ackedFeatures = 0n;
  #protocolNegotiated = false;
  #protocolFeatures = 0n;
  #mem?: GuestMemory;
  #maps: Mapping[] = [];
  /** The SIGBUS guard guarding #maps, once a table was mapped with it. */
  #guard?: SigbusGuard;
  /** The guard's fault count when this session last looked. */
  #seenFaults = 0n;
  /** Written by the guard's handler on each fault in #maps, so a fault between batches wakes the loop. */
  #faultFd = -1;
  /** Set once a region shrank under the device: why the front end is dropped. */
  #shrank?: string;
  #active = false;
  #callErrorLogged = false;
  /** Back-end request channel (SET_BACKEND_REQ_FD): a socket or, from user-mode Linux, a pipe. */
  #backendReqFd = -1;
  /** Counters, for tests and stats. */
  readonly counters = { messages: 0, kicks: 0, interrupts: 0, activations: 0 };

  constructor(
    device: VirtioDevice,
    sock: UnixStream,
    log: (line: string) => void,
    inspect: FdInspector = PROC_FD_INSPECTOR,
  ) {
    this.#device = device;
    this.#sock = sock;
    this.#log = log;
    this.#inspect = inspect;
    this.#rings = device.queueMaxSizes.map(() => newVring());
  }

  get active(): boolean {
    return this.#active;
  }

  /** Serve until the front end disconnects (resolves) or a protocol error (throws). */
  async run(waker: Waker, blockingPoll = false): Promise<void> {
    let lastTurn = performance.now();
    for (;;) {
      const kickRings = this.#rings.filter((r) => r.started && r.kickFd >= 0);
      const fds = [this.#sock.fd, waker.fd, ...kickRings.map((r) => r.kickFd)];
      if (this.#faultFd >= 0) fds.push(this.#faultFd);
      let rev: number[];
      if (blockingPoll) {
        rev = pollSync(fds, POLLIN, BLOCKING_POLL_MS);
        const now = performance.now();
        if (rev.every((r) => r === 0) || now - lastTurn >= BLOCKING_POLL_MS) {
          await yieldToEventLoop();
          lastTurn = now;
        }
      } else rev = await pollAsync(fds, POLLIN, -1);
      if (waker.woken) throw new WaitCancelled();
      if (this.#faultFd >= 0 && rev[fds.length - 1] & POLLIN) eventfdRead(this.#faultFd);
      this.#batch(() =>
        kickRings.forEach((r, i) => {
          if (rev[i + 2] !== 0) this.#kicked(r, rev[i + 2]);
        })
      );
      this.#checkFaults();
      if (rev[0] & (POLLIN | POLLHUP | POLLERR)) {
        let msg: VhostUserMessage;
        try {
          msg = await readMessage(this.#sock);
        } catch (e) {
          if (e instanceof ConnectionClosed) return;
          throw e;
        }
        await this.#handle(msg);
        this.#checkFaults();
      }
    }
  }

  /**
   * Run one batch of device work (a kick's, a message's). The guest-error lines it logs are held back:
   * when the batch touched a page of a region whose file shrank, they describe the zeros the device
   * read there, and the one line that drops the front end says what happened instead.
   */
  #batch<T>(work: () => T): T {
    const outer = guestLog.sink;
    const held: string[] = [];
    guestLog.sink = (line) => held.push(line);
    try {
      return work();
    } finally {
      guestLog.sink = outer;
      this.#takeFaults();
      if (this.#shrank === undefined) held.forEach((line) => outer(line));
    }
  }

  /**
   * Look at the SIGBUS guard's record for this session's regions: when the front end shrank a region's
   * file and the device touched a page past its end (the guard mapped a zero page there and counted it),
   * remember it in #shrank.
   */
  #takeFaults(): void {
    const guard = this.#guard;
    if (!guard || this.#maps.length === 0 || this.#shrank !== undefined) return;
    const total = guard.totalFaults();
    if (total === this.#seenFaults) return;
    this.#seenFaults = total;
    for (const m of this.#maps) {
      if (m.slot < 0) continue;
      const n = guard.takeFaults(m.slot);
      if (n > 0) {
        this.#shrank = `the front end's memory region ${m.index} shrank under the back end ` +
          `(${n} page${n === 1 ? "" : "s"} past the end of its file touched)`;
        return;
      }
    }
  }

  /** After each batch of work: drop the front end (throw MemoryShrank) if a region shrank under the device. */
  #checkFaults(): void {
    this.#takeFaults();
    if (this.#shrank !== undefined) throw new MemoryShrank(this.#shrank);
  }

  /** Release everything this session holds: device state, fds, memory mappings. */
  teardown(): void {
    this.#deactivate();
    requestHandler(this.#device)?.vhostUserDisconnected?.();
    for (const r of this.#rings) this.#closeRingFds(r);
    closeFd(this.#backendReqFd);
    this.#backendReqFd = -1;
    this.#unmapMemory();
    closeFd(this.#faultFd);
    this.#faultFd = -1;
  }

  // ---- VirtioInterrupt, handed to the device at activation ----

  signalUsedQueue(index: number): void {
    const fd = this.#rings[index]?.callFd ?? -1;
    if (fd < 0) return;
    this.counters.interrupts++;
    try {
      eventfdWrite(fd);
    } catch (e) {
      if (!this.#callErrorLogged) this.#log(`call fd of queue ${index}: ${(e as Error).message}`);
      this.#callErrorLogged = true;
    }
  }

  signalConfigChange(): void {
    if (this.#backendReqFd < 0) {
      this.#log("device configuration changed; the front end gave no back-end request channel to tell it");
      return;
    }
    // No NEED_REPLY: a pipe channel (user-mode Linux) has no way back. write() works on pipes and sockets.
    const msg = encodeMessage(VhostUserBackendRequest.CONFIG_CHANGE_MSG, VHOST_USER_VERSION);
    const n = libc().write(this.#backendReqFd, msg, BigInt(msg.length));
    if (Number(n) !== msg.length) this.#log("could not send CONFIG_CHANGE_MSG on the back-end request channel");
  }

  // ---- Kicks ----

  /**
   * Ring `r`'s kick fd polled with `revents`. Anything but a plain eventfd read (an error or hang-up
   * event, a failed or short read, a zero count, a semaphore eventfd) would be reported again by every
   * poll: the front end is dropped (VhostUserProtocolError) instead of the loop spinning on it.
   */
  #kicked(r: Vring, revents: number): void {
    const index = this.#rings.indexOf(r);
    const bad = (what: string) => new VhostUserProtocolError(`queue ${index}: the kick fd ${what}`);
    if (revents & (POLLERR | POLLHUP | POLLNVAL)) {
      const names = [[POLLERR, "POLLERR"], [POLLHUP, "POLLHUP"], [POLLNVAL, "POLLNVAL"]] as const;
      throw bad(`reported ${names.filter(([bit]) => revents & bit).map(([, n]) => n).join("|")}`);
    }
    const buf = new BigUint64Array(1);
    const n = Number(libc().read(r.kickFd, new Uint8Array(buf.buffer), BigInt(EVENTFD_READ_BYTES)));
    if (n < 0) {
      const e = errno();
      // Another reader took the count first: nothing to serve, and the fd is no longer readable.
      if (e === EAGAIN || e === EINTR) return;
      throw bad(`cannot be read: ${new SysError("read", e).message}`);
    }
    if (n !== EVENTFD_READ_BYTES || buf[0] === 0n) throw bad(`read ${n} bytes of value ${buf[0]}: not an eventfd`);
    // Where fdinfo could not tell the mode, a count of 1 that leaves the fd readable is a semaphore's sign
    // (one extra poll per such kick; none where the mode is known).
    if (!r.plainKick && buf[0] === 1n && pollSync([r.kickFd], POLLIN, 0)[0] & POLLIN) {
      if (++r.semaphoreReads >= SEMAPHORE_READS) throw bad("is a semaphore eventfd (each read takes 1)");
    } else {
      r.semaphoreReads = 0;
    }
    this.counters.kicks++;
    if (!r.enabled) return;
    if (!this.#active || !r.queue) {
      this.#activate(true); // activation looks at every ready ring, this one included
      return;
    }
    this.#device.queueNotify(index);
  }

  // ---- Message handling ----

  async #handle(msg: VhostUserMessage): Promise<void> {
    this.counters.messages++;
    const fds = msg.fds;
    let reply: Uint8Array | undefined;
    let ok = true;
    try {
      reply = this.#batch(() => this.#dispatch(msg));
    } catch (e) {
      fds.splice(0).forEach(closeFd);
      // A failure caused by reading a repaired page is reported as what it is.
      this.#checkFaults();
      if (e instanceof MemoryTableRefused && !(msg.flags & VHOST_USER_FLAG_NEED_REPLY)) {
        throw new VhostUserProtocolError(`${requestName(msg.request)}: ${e.message}`);
      }
      if (e instanceof RequestFailed || e instanceof GuestMemoryError) {
        this.#log(`${requestName(msg.request)} failed: ${e.message}`);
        ok = false;
      } else {
        throw e;
      }
    }
    // Descriptors the handler did not take are closed.
    fds.forEach(closeFd);
    const replyFlags = VHOST_USER_VERSION | VHOST_USER_FLAG_REPLY;
    if (REQUESTS_WITH_REPLY.has(msg.request)) {
      if (!reply) throw new VhostUserProtocolError(`${requestName(msg.request)}: cannot answer`);
      await this.#sock.send(encodeMessage(msg.request, replyFlags, reply));
    } else if (msg.flags & VHOST_USER_FLAG_NEED_REPLY) {
      await this.#sock.send(encodeMessage(msg.request, replyFlags, u64Payload(ok ? 0n : 1n)));
    }
  }

  /** Handle one request; returns the reply payload for requests that have one. Takes fds it keeps. */
  #dispatch(msg: VhostUserMessage): Uint8Array | undefined {
    const dev = this.#device;
    switch (msg.request) {
      case R.GET_FEATURES:
        return u64Payload(dev.features | VHOST_USER_F_PROTOCOL_FEATURES);
      case R.SET_FEATURES: {
        const v = parseU64(msg);
        const offered = dev.features | VHOST_USER_F_PROTOCOL_FEATURES;
        if (v & ~offered) this.#log(`front end acked features it was not offered: 0x${(v & ~offered).toString(16)}`);
        this.#protocolNegotiated = (v & VHOST_USER_F_PROTOCOL_FEATURES) !== 0n;
        this.#ackedFeatures = v & dev.features;
        return;
      }
      case R.GET_PROTOCOL_FEATURES:
        return u64Payload(BACKEND_PROTOCOL_FEATURES);
      case R.SET_PROTOCOL_FEATURES:
        this.#protocolFeatures = parseU64(msg) & BACKEND_PROTOCOL_FEATURES;
        return;
      case R.SET_OWNER:
        return;
      case R.RESET_OWNER:
      case R.RESET_DEVICE:
        this.#resetRings();
        this.#ackedFeatures = 0n;
        return;
      case R.SET_MEM_TABLE:
        this.#setMemTable(msg);
        return;
      case R.SET_VRING_NUM: {
        const s = parseVringState(msg);
        const r = this.#ring(s.index);
        // Split rings: a power of 2 from 1 to 32768 (virtio 1.2 section 2.7). Over vhost-user the front end
        // chooses the size and no message tells it the device's own queueMaxSizes (those are what the MMIO
        // transport offers): crosvm's front end offers its guest 32768 by default, QEMU gives rng and input
        // 1024, user-mode Linux 256 to every ring. So the split-ring limit is the limit here, as in crosvm's
        // back end (set_vring_num checks Queue::MAX_SIZE).
        if (s.num < 1 || s.num > VIRTQ_MAX_SIZE || (s.num & (s.num - 1)) !== 0) {
          // A ring is not started with a size other than the one its driver asked for.
          r.num = 0;
          throw new RequestFailed(`queue ${s.index}: size ${s.num} is not a power of 2 from 1 to ${VIRTQ_MAX_SIZE}`);
        }
        r.num = s.num;
        return;
      }
      case R.SET_VRING_ADDR: {
        const a = parseVringAddr(msg);
        this.#ring(a.index).addr = a;
        return;
      }
      case R.SET_VRING_BASE: {
        const s = parseVringState(msg);
        // Split rings: the low 16 bits are the next available index (vhost-user.rst "Ring states").
        this.#ring(s.index).base = s.num & 0xffff;
        return;
      }
      case R.GET_VRING_BASE: {
        const s = parseVringState(msg);
        const r = this.#ring(s.index);
        // Stopping a ring stops the device: its queues are rebuilt when rings start again.
        this.#deactivate();
        r.started = false;
        closeFd(r.kickFd);
        r.kickFd = -1;
        return vringStatePayload({ index: s.index, num: r.base });
      }
      case R.SET_VRING_KICK:
      case R.SET_VRING_CALL:
      case R.SET_VRING_ERR:
        this.#setVringFd(msg);
        return;
      case R.SET_VRING_ENABLE: {
        const s = parseVringState(msg);
        const r = this.#ring(s.index);
        r.enabled = s.num !== 0;
        if (!r.enabled) this.#deactivate();
        else this.#activate(false);
        return;
      }
      case R.SET_BACKEND_REQ_FD: {
        if (msg.fds.length !== 1) throw new VhostUserProtocolError(`SET_BACKEND_REQ_FD with ${msg.fds.length} fds`);
        closeFd(this.#backendReqFd);
        this.#backendReqFd = msg.fds.shift()!;
        setNonBlocking(this.#backendReqFd);
        return;
      }
      case R.GET_QUEUE_NUM:
        return u64Payload(BigInt(dev.queueMaxSizes.length));
      case R.GET_CONFIG: {
        const c = parseConfig(msg);
        const data = new Uint8Array(c.size);
        dev.readConfig(c.offset, data);
        return configPayload({ offset: c.offset, flags: c.flags, data });
      }
      case R.SET_CONFIG: {
        const c = parseConfig(msg);
        dev.writeConfig(c.offset, c.data);
        return;
      }
      default:
        if (DECLINED_REQUESTS.has(msg.request)) throw new RequestFailed("not supported by this back end");
        if (requestHandler(dev)?.vhostUserRequest(msg.request, msg.payload, msg.fds)) return;
        throw new VhostUserProtocolError(`unknown request ${msg.request}`);
    }
  }

  #ring(index: number): Vring {
    const r = this.#rings[index];
    if (!Number.isInteger(index) || !r) {
      throw new VhostUserProtocolError(`queue index ${index} (device has ${this.#rings.length} queues)`);
    }
    return r;
  }

  #setVringFd(msg: VhostUserMessage): void {
    const v = parseU64(msg);
    const index = Number(v & VHOST_USER_VRING_INDEX_MASK);
    const noFd = (v & VHOST_USER_VRING_NOFD_MASK) !== 0n;
    const r = this.#ring(index);
    if (noFd ? msg.fds.length !== 0 : msg.fds.length !== 1) {
      throw new VhostUserProtocolError(
        `${requestName(msg.request)}: ${msg.fds.length} descriptors with NOFD=${noFd}`,
      );
    }
    const plainKick = !noFd && this.#checkVringFd(msg.request, index, msg.fds[0]);
    const fd = noFd ? -1 : msg.fds.shift()!;
    switch (msg.request) {
      case R.SET_VRING_KICK:
        closeFd(r.kickFd);
        r.kickFd = fd;
        r.semaphoreReads = 0;
        r.plainKick = plainKick;
        // Never block reading it, whatever the front end does with its own end.
        if (fd >= 0) setNonBlocking(fd);
        if (noFd) this.#log(`queue ${index}: no kick fd (polling mode) is not supported; the ring will not be served`);
        r.started = true;
        // Without protocol features a ring is enabled as soon as it starts (vhost-user.rst).
        if (!this.#protocolNegotiated) r.enabled = true;
        this.#activate(false);
        break;
      case R.SET_VRING_CALL:
        closeFd(r.callFd);
        r.callFd = fd;
        // A call fd may be a pipe or a socket (user-mode Linux): never block writing to it.
        if (fd >= 0) setNonBlocking(fd);
        break;
      default:
        closeFd(r.errFd);
        r.errFd = fd;
    }
  }

  /**
   * Refuse (RequestFailed, one log line) a kick fd that is not a plain eventfd and a call fd that is
   * not an eventfd, a pipe or a socket (a regular file would grow with every interrupt). The error fd
   * is neither read nor written here, so it is not checked. Without /proc the checks cannot be made:
   * the kick loop's own guards (#kicked) still drop a front end whose kick fd misbehaves. Returns true
   * for a kick fd whose fdinfo shows it is a plain eventfd.
   */
  #checkVringFd(request: number, index: number, fd: number): boolean {
    if (request !== R.SET_VRING_KICK && request !== R.SET_VRING_CALL) return false;
    const link = this.#inspect.link(fd);
    if (link === undefined) return false;
    const isEventfd = link === EVENTFD_LINK;
    if (request === R.SET_VRING_KICK) {
      if (!isEventfd) throw new RequestFailed(`queue ${index}: the kick fd is ${link}, not an eventfd`);
      const info = this.#inspect.info(fd) ?? "";
      if (EVENTFD_SEMAPHORE_FDINFO.test(info)) {
        throw new RequestFailed(`queue ${index}: the kick fd is a semaphore eventfd (EFD_SEMAPHORE)`);
      }
      return EVENTFD_MODE_FDINFO.test(info);
    } else if (!isEventfd && !CALL_LINK_PREFIXES.some((p) => link.startsWith(p))) {
      throw new RequestFailed(`queue ${index}: the call fd is ${link}, not an eventfd, a pipe or a socket`);
    }
    return false;
  }

  #setMemTable(msg: VhostUserMessage): void {
    const regions = parseMemTable(msg);
    if (msg.fds.length !== regions.length) {
      throw new VhostUserProtocolError(`SET_MEM_TABLE: ${regions.length} regions but ${msg.fds.length} descriptors`);
    }
    const fds = msg.fds.splice(0);
    const maps: Mapping[] = [];
    const descs: RegionDescriptor[] = [];
    const safe = (v: bigint, what: string): number => {
      if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new VhostUserProtocolError(`SET_MEM_TABLE: ${what} too large`);
      return Number(v);
    };
    const loaded = sigbusGuard();
    const guard = loaded.guard;
    try {
      regions.forEach((reg, i) => {
        const size = safe(reg.memorySize, "region size");
        const guestBase = safe(reg.guestPhysAddr, "guest address");
        const offset = safe(reg.mmapOffset, "mmap offset");
        if (size === 0) throw new VhostUserProtocolError("SET_MEM_TABLE: empty region");
        const sealed = this.#checkRegionFile(fds[i], i, size, offset);
        if (!guard && !sealed) {
          throw new MemoryTableRefused(
            `region ${i}: its file cannot be sealed against shrinking (F_SEAL_SHRINK), so the front end could ` +
              `truncate it under the back end, and ${loaded.reason}`,
          );
        }
        const pageOff = offset % PAGE_SIZE;
        const length = size + pageOff;
        const ptr = mmap(length, PROT_READ | PROT_WRITE, MAP_SHARED, fds[i], offset - pageOff);
        const m: Mapping = { ptr, length, index: i, slot: -1 };
        maps.push(m);
        if (guard) {
          if (this.#faultFd < 0) this.#faultFd = eventfd();
          m.slot = guard.register(ptr, length, this.#faultFd);
        }
        descs.push({
          guestBase,
          size,
          hostAddr: BigInt(Deno.UnsafePointer.value(ptr)) + BigInt(pageOff),
          userAddr: reg.userspaceAddr,
        });
      });
      const mem = new GuestMemory(descs);
      // Replace the old table: queues are rebuilt on the new mappings.
      const wasActive = this.#active;
      this.#deactivate();
      this.#unmapMemory();
      this.#mem = mem;
      this.#maps = maps;
      this.#guard = guard;
      if (guard) this.#seenFaults = guard.totalFaults();
      if (wasActive) this.#activate(false);
    } catch (e) {
      unmapAll(maps, guard);
      if (e instanceof VhostUserProtocolError || e instanceof RequestFailed) throw e;
      throw new RequestFailed((e as Error).message);
    } finally {
      // The mappings keep the memory; the descriptors are no longer needed.
      fds.forEach(closeFd);
    }
  }

  /**
   * Check that region `index`'s descriptor is a regular file (a memfd, a tmpfs or hugetlbfs file) that
   * backs [offset, offset + size) wholly: a mapping past a file's end raises SIGBUS when touched.
   * Seals the file against shrinking first where it allows that (a memfd made with MFD_ALLOW_SEALING and
   * not sealed with F_SEAL_SEAL); returns whether it is sealed so. Throws MemoryTableRefused.
   */
  #checkRegionFile(fd: number, index: number, size: number, offset: number): boolean {
    // Fails harmlessly (EPERM, EINVAL) where sealing is not allowed or not supported.
    libc().fcntl(fd, F_ADD_SEALS, BigInt(F_SEAL_SHRINK));
    const seals = libc().fcntl(fd, F_GET_SEALS, 0n);
    const sealed = seals >= 0 && (seals & F_SEAL_SHRINK) !== 0;
    let st: Deno.FileInfo;
    try {
      st = fdInfo(fd);
    } catch (e) {
      throw new MemoryTableRefused(`region ${index}: ${(e as Error).message}`);
    }
    if (!st.isFile) {
      throw new MemoryTableRefused(`region ${index}: its descriptor is ${fileKind(st)}, not a regular file or memfd`);
    }
    if (BigInt(offset) + BigInt(size) > BigInt(st.size)) {
      throw new MemoryTableRefused(
        `region ${index} (${size} bytes at file offset ${offset}) reaches past the end of its file ` +
          `(${st.size} bytes)`,
      );
    }
    return sealed;
  }

  /**
   * Activate the device when its rings are ready: every queue started and enabled, or (when
   * `partial`, i.e. the driver kicked a ready ring) the queues that are. Drivers may use fewer
   * queues than the device has. A device started without a ring that is ready now (a front end may
   * kick one ring before it enables another) is started again with it: the device only takes its
   * queues when it is activated, and the rings go on from where they were.
   */
  #activate(partial: boolean): void {
    if (!this.#mem) return;
    const ready = this.#rings.map((r) => r.started && r.enabled && r.num > 0 && r.addr !== undefined);
    if (this.#active) {
      if (!this.#rings.some((r, i) => ready[i] && !r.queue)) return;
      this.#deactivate();
      partial = true;
    }
    if (!ready.some((x) => x)) return;
    if (!partial && !ready.every((x) => x)) return;
    const mem = this.#mem;
    const eventIdx = (this.#ackedFeatures & VIRTIO_F_EVENT_IDX) !== 0n;
    const queues = this.#rings.map((r, i) => {
      if (!ready[i]) return undefined;
      const a = r.addr!;
      const q = new Virtqueue(mem, i, {
        size: r.num,
        descTable: mem.userToGuest(a.desc, descTableBytes(r.num)),
        availRing: mem.userToGuest(a.avail, availRingBytes(r.num)),
        usedRing: mem.userToGuest(a.used, usedRingBytes(r.num)),
      }, { eventIdx });
      q.nextAvail = r.base;
      if (!q.error) q.nextUsed = q.usedIdx();
      r.queue = q;
      return q;
    });
    this.#active = true;
    this.counters.activations++;
    this.#device.activate({ mem, queues, ackedFeatures: this.#ackedFeatures, interrupt: this });
    // A front end may kick before it enables a ring (QEMU does); such kicks were consumed without
    // being served, so look at every ring once now. A ring with nothing available costs one read.
    queues.forEach((q, i) => {
      if (q && !q.error) this.#device.queueNotify(i);
    });
  }

  /** Stop the device; rings remember where they were. */
  #deactivate(): void {
    if (!this.#active) return;
    this.#active = false;
    this.#device.reset();
    for (const r of this.#rings) {
      if (r.queue) r.base = r.queue.nextAvail;
      r.queue = undefined;
    }
  }

  #closeRingFds(r: Vring): void {
    closeFd(r.kickFd);
    closeFd(r.callFd);
    closeFd(r.errFd);
    r.kickFd = r.callFd = r.errFd = -1;
  }

  #resetRings(): void {
    this.#deactivate();
    this.#rings.forEach((r, i) => {
      this.#closeRingFds(r);
      this.#rings[i] = newVring();
    });
  }

  #unmapMemory(): void {
    this.#mem = undefined;
    unmapAll(this.#maps.splice(0), this.#guard);
  }
}

/** Unmap regions, each unguarded first (so the guard never repairs a page someone else mapped there). */
function unmapAll(maps: Mapping[], guard: SigbusGuard | undefined): void {
  for (const m of maps) {
    if (m.slot >= 0) guard?.unregister(m.slot);
    munmap(m.ptr, m.length);
  }
}

/** Serves `device` on a Unix socket, one front end at a time, until close(). */
export class VhostUserBackend {
  readonly device: VirtioDevice;
  readonly socketPath: string;
  readonly #log: (line: string) => void;
  readonly #waker = new Waker();
  readonly #blockingPoll: boolean;
  readonly #fdInspector?: FdInspector;
  #listener?: UnixListener;
  #session?: Session;
  #listening = Promise.withResolvers<void>();
  /** Front ends served so far (including the current one). */
  connections = 0;

  constructor(device: VirtioDevice, socketPath: string, opts: VhostUserBackendOptions = {}) {
    this.device = device;
    this.socketPath = socketPath;
    const prefix = `vhost-user ${device.name}:`;
    this.#log = opts.log ?? ((line) => console.error(`${prefix} ${line}`));
    this.#blockingPoll = opts.blockingPoll ?? false;
    this.#fdInspector = opts.fdInspector;
  }

  /** Resolves once the socket is listening (front ends may connect). */
  get listening(): Promise<void> {
    return this.#listening.promise;
  }

  /** The current session's counters, if a front end is connected. */
  get counters(): Session["counters"] | undefined {
    return this.#session?.counters;
  }

  /** Listen and serve front ends one after another until close(). */
  async serve(): Promise<void> {
    try {
      this.#listener = UnixListener.listen(this.socketPath, this.#waker);
    } catch (e) {
      this.#listening.reject(e);
      this.#listening.promise.catch(() => {});
      throw e;
    }
    this.#listening.resolve();
    try {
      while (!this.#waker.woken) {
        let sock: UnixStream;
        try {
          sock = await this.#listener.accept();
        } catch (e) {
          if (e instanceof WaitCancelled) break;
          throw e;
        }
        this.connections++;
        const session = new Session(this.device, sock, this.#log, this.#fdInspector);
        this.#session = session;
        try {
          await session.run(this.#waker, this.#blockingPoll);
          this.#log("front end disconnected; waiting for the next one");
        } catch (e) {
          if (e instanceof WaitCancelled) break;
          this.#log(`dropping the front end: ${(e as Error).message}`);
        } finally {
          session.teardown();
          sock.close();
          this.#session = undefined;
        }
      }
    } finally {
      this.#listener.close();
      this.#waker.close();
    }
  }

  /** Stop serving: the current front end is dropped, the socket file removed, serve() resolves. */
  close(): void {
    if (!this.#waker.woken) this.#waker.wake();
  }
}
