// A vhost-user back end: serves one VirtioDevice to a front end (QEMU, crosvm,
// user-mode Linux...) over a Unix socket. The front end shares its guest RAM as
// file descriptors (SET_MEM_TABLE), describes each ring (SET_VRING_*), kicks the
// device through eventfds and receives interrupts on call fds. Semantics follow
// QEMU docs/interop/vhost-user.rst ("Starting and stopping rings", "Front-end
// message types").
//
// Data path: kick eventfd readable -> device.queueNotify(i) -> Virtqueue in the
// shared memory -> device.signalUsedQueue(i) -> write to ring i's call fd.

import {
  closeFd,
  eventfdRead,
  eventfdWrite,
  libc,
  MAP_SHARED,
  mmap,
  munmap,
  pollAsync,
  POLLERR,
  POLLHUP,
  POLLIN,
  pollSync,
  PROT_READ,
  PROT_WRITE,
} from "../../ffi/libc.ts";
import { GuestMemory, GuestMemoryError, type RegionDescriptor } from "../../core/memory.ts";
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
  /** Started: a kick fd (or NOFD) arrived and GET_VRING_BASE has not stopped it. */
  started: boolean;
  /** Enabled by SET_VRING_ENABLE (or implicitly when protocol features were not negotiated). */
  enabled: boolean;
  queue?: Virtqueue;
}

function newVring(): Vring {
  return { num: 0, base: 0, kickFd: -1, callFd: -1, errFd: -1, started: false, enabled: false };
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
  readonly #rings: Vring[];
  #ackedFeatures = 0n;
  #protocolNegotiated = false;
  #protocolFeatures = 0n;
  #mem?: GuestMemory;
  #maps: { ptr: Deno.PointerObject; length: number }[] = [];
  #active = false;
  #callErrorLogged = false;
  /** Back-end request channel (SET_BACKEND_REQ_FD): a socket or, from user-mode Linux, a pipe. */
  #backendReqFd = -1;
  /** Counters, for tests and stats. */
  readonly counters = { messages: 0, kicks: 0, interrupts: 0, activations: 0 };

  constructor(device: VirtioDevice, sock: UnixStream, log: (line: string) => void) {
    this.#device = device;
    this.#sock = sock;
    this.#log = log;
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
      kickRings.forEach((r, i) => {
        if (rev[i + 2] & (POLLIN | POLLERR | POLLHUP)) this.#kicked(r);
      });
      if (rev[0] & (POLLIN | POLLHUP | POLLERR)) {
        let msg: VhostUserMessage;
        try {
          msg = await readMessage(this.#sock);
        } catch (e) {
          if (e instanceof ConnectionClosed) return;
          throw e;
        }
        await this.#handle(msg);
      }
    }
  }

  /** Release everything this session holds: device state, fds, memory mappings. */
  teardown(): void {
    this.#deactivate();
    requestHandler(this.#device)?.vhostUserDisconnected?.();
    for (const r of this.#rings) this.#closeRingFds(r);
    closeFd(this.#backendReqFd);
    this.#backendReqFd = -1;
    this.#unmapMemory();
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

  #kicked(r: Vring): void {
    eventfdRead(r.kickFd);
    this.counters.kicks++;
    if (!r.enabled) return;
    const index = this.#rings.indexOf(r);
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
      reply = this.#dispatch(msg);
    } catch (e) {
      fds.splice(0).forEach(closeFd);
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
        if (s.num < 1 || s.num > VIRTQ_MAX_SIZE || (s.num & (s.num - 1)) !== 0) {
          throw new VhostUserProtocolError(`SET_VRING_NUM: queue size ${s.num} is not a power of 2 <= 32768`);
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
    const fd = noFd ? -1 : msg.fds.shift()!;
    switch (msg.request) {
      case R.SET_VRING_KICK:
        closeFd(r.kickFd);
        r.kickFd = fd;
        if (noFd) this.#log(`queue ${index}: no kick fd (polling mode) is not supported; the ring will not be served`);
        r.started = true;
        // Without protocol features a ring is enabled as soon as it starts (vhost-user.rst).
        if (!this.#protocolNegotiated) r.enabled = true;
        this.#activate(false);
        break;
      case R.SET_VRING_CALL:
        closeFd(r.callFd);
        r.callFd = fd;
        // A call fd may be a pipe (user-mode Linux): never block writing to it.
        if (fd >= 0) setNonBlocking(fd);
        break;
      default:
        closeFd(r.errFd);
        r.errFd = fd;
    }
  }

  #setMemTable(msg: VhostUserMessage): void {
    const regions = parseMemTable(msg);
    if (msg.fds.length !== regions.length) {
      throw new VhostUserProtocolError(`SET_MEM_TABLE: ${regions.length} regions but ${msg.fds.length} descriptors`);
    }
    const fds = msg.fds.splice(0);
    const maps: { ptr: Deno.PointerObject; length: number }[] = [];
    const descs: RegionDescriptor[] = [];
    const safe = (v: bigint, what: string): number => {
      if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new VhostUserProtocolError(`SET_MEM_TABLE: ${what} too large`);
      return Number(v);
    };
    try {
      regions.forEach((reg, i) => {
        const size = safe(reg.memorySize, "region size");
        const guestBase = safe(reg.guestPhysAddr, "guest address");
        const offset = safe(reg.mmapOffset, "mmap offset");
        if (size === 0) throw new VhostUserProtocolError("SET_MEM_TABLE: empty region");
        const pageOff = offset % PAGE_SIZE;
        const length = size + pageOff;
        const ptr = mmap(length, PROT_READ | PROT_WRITE, MAP_SHARED, fds[i], offset - pageOff);
        maps.push({ ptr, length });
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
      if (wasActive) this.#activate(false);
    } catch (e) {
      for (const m of maps) munmap(m.ptr, m.length);
      if (e instanceof VhostUserProtocolError) throw e;
      throw new RequestFailed((e as Error).message);
    } finally {
      // The mappings keep the memory; the descriptors are no longer needed.
      fds.forEach(closeFd);
    }
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
    for (const m of this.#maps.splice(0)) munmap(m.ptr, m.length);
  }
}

/** Serves `device` on a Unix socket, one front end at a time, until close(). */
export class VhostUserBackend {
  readonly device: VirtioDevice;
  readonly socketPath: string;
  readonly #log: (line: string) => void;
  readonly #waker = new Waker();
  readonly #blockingPoll: boolean;
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
        const session = new Session(this.device, sock, this.#log);
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
