// The vhost-user front end: a virtio device whose rings another process serves (a vhost-user back end:
// virtiofsd, qemu-storage-daemon, rust-vmm's vhost-device-*, `denovm device ...`). The guest sees a
// virtio-mmio device; this module speaks the protocol (QEMU docs/interop/vhost-user.rst) to the back end:
// at connect the features, protocol features, queue count and configuration space; at DRIVER_OK the
// negotiated features, the guest RAM as file descriptors and each ring with the transport's own
// QueueNotify ioeventfd as its kick fd and the transport's irqfd as its call fd, so requests and
// interrupts go between the guest and the back end through KVM alone.
//
// Requests are synchronous: one at a time, each reply waited for with a bound (a back end that does not
// answer fails the device, it does not hang the VMM). They happen at connect, at the driver's set-up and
// reset and on configuration accesses; the data path never comes here. The back end is not trusted:
// every reply is checked (its request code, flags, size and contents), and a bad one is one log line and
// a failed device (the driver sees DEVICE_NEEDS_RESET), never an exception out of the VMM.

import {
  closeFd,
  EAGAIN,
  EINTR,
  ENOENT,
  eventfd,
  eventfdRead,
  eventfdWrite,
  pollAsync,
  POLLERR,
  POLLHUP,
  POLLIN,
  POLLNVAL,
  POLLOUT,
  pollSync,
  SysError,
} from "../../ffi/libc.ts";
import { ECONNREFUSED, ECONNRESET, EPIPE } from "../../ffi/socket.ts";
import { ConnectionClosed, streamPair, UnixStream, WaitCancelled, Waker } from "../../core/unix_socket.ts";
import { type DeviceState, StateError } from "../../core/state.ts";
import type { GuestMemory } from "../../core/memory.ts";
import {
  type ActivateContext,
  readConfigSpace,
  VIRTIO_F_ACCESS_PLATFORM,
  VIRTIO_F_RING_PACKED,
  type VirtioDevice,
} from "../virtio/device.ts";
import { availRingBytes, descTableBytes, usedRingBytes, VIRTQ_MAX_SIZE, type Virtqueue } from "../virtio/queue.ts";
import {
  configPayload,
  encodeMessage,
  type Inflight,
  INFLIGHT_SIZE,
  inflightPayload,
  type MemRegion,
  memTablePayload,
  parseConfig,
  parseHeader,
  parseInflight,
  parseVringState,
  readMessage,
  requestName,
  u64Payload,
  VHOST_MEMORY_BASELINE_NREGIONS,
  VHOST_USER_F_PROTOCOL_FEATURES,
  VHOST_USER_FLAG_NEED_REPLY,
  VHOST_USER_FLAG_REPLY,
  VHOST_USER_HEADER_SIZE,
  VHOST_USER_MAX_CONFIG_SIZE,
  VHOST_USER_MAX_VRING_INDEX,
  VHOST_USER_PROTOCOL_F_BACKEND_REQ,
  VHOST_USER_PROTOCOL_F_CONFIG,
  VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD,
  VHOST_USER_PROTOCOL_F_MQ,
  VHOST_USER_PROTOCOL_F_REPLY_ACK,
  VHOST_USER_PROTOCOL_F_RESET_DEVICE,
  VHOST_USER_VERSION,
  VhostUserBackendRequest,
  type VhostUserMessage,
  VhostUserProtocolError,
  VhostUserRequest as R,
  vringAddrPayload,
  vringStatePayload,
} from "./protocol.ts";
import { vhostUserDeviceTypeById } from "./device_types.ts";

/** Protocol features this front end uses (vhost-user.rst "Protocol features"). */
export const FRONT_END_PROTOCOL_FEATURES = VHOST_USER_PROTOCOL_F_MQ | VHOST_USER_PROTOCOL_F_REPLY_ACK |
  VHOST_USER_PROTOCOL_F_CONFIG | VHOST_USER_PROTOCOL_F_RESET_DEVICE | VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD |
  VHOST_USER_PROTOCOL_F_BACKEND_REQ;

/** VIRTIO_F_NOTIFICATION_DATA (virtio 1.2 section 6): notifications carry more than the queue index. */
const VIRTIO_F_NOTIFICATION_DATA = 1n << 38n;
/** VIRTIO_F_RING_RESET (virtio 1.2 section 6): per-queue reset through the transport. */
const VIRTIO_F_RING_RESET = 1n << 40n;
/**
 * Device features a back end may offer that this transport cannot carry to it, so they are not offered
 * to the guest: packed rings (the transport checks split-ring layouts), an IOMMU (none here), notification
 * data (the QueueNotify ioeventfd matches the bare queue index) and per-queue reset (the transport would
 * reset a ring the back end still serves).
 */
export const FRONT_END_WITHHELD_FEATURES = VIRTIO_F_RING_PACKED | VIRTIO_F_ACCESS_PLATFORM |
  VIRTIO_F_NOTIFICATION_DATA | VIRTIO_F_RING_RESET;

/**
 * Most queues one device carries: each costs a QueueNotify ioeventfd, and KVM allows at most 1000 devices
 * on an I/O bus per VM (NR_IOBUS_DEVS in include/linux/kvm_host.h).
 */
export const FRONT_END_MAX_QUEUES = 64;
/** How long a reply may take before the back end counts as gone (ms). */
export const DEFAULT_REPLY_TIMEOUT_MS = 5_000;
/** Between connection attempts while a connect timeout lasts (ms). */
const CONNECT_RETRY_MS = 20;
/** Between attempts at reaching a back end that went away (ms). */
const RECONNECT_RETRY_MS = 100;
/** Set-ups in a row a back end that came back may fail (its connection lost again) before the device fails. */
const MAX_SETUP_FAILURES = 3;
/** SET_CONFIG's flags: a change the driver made (vhost-user.rst "VHOST_USER_SET_CONFIG": VHOST_SET_CONFIG_TYPE_FRONTEND). */
const VHOST_SET_CONFIG_TYPE_FRONTEND = 0;
/** SET_VRING_ENABLE's num: 1 enables the ring, 0 disables it (vhost-user.rst). */
const VRING_ENABLE = 1;
const VRING_DISABLE = 0;
/** A REPLY_ACK status of 0 is success (vhost-user.rst "REPLY_ACK"). */
const ACK_SUCCESS = 0n;
/** The status this front end answers a back-end request it does not serve with (any non-zero is failure). */
const ACK_FAILURE = 1n;
/** Bytes of a u64 payload. */
const U64_SIZE = 8;

/** The back end could not be reached at all. */
export class VhostUserConnectError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "VhostUserConnectError";
  }
}

/** The connection to the back end is gone (it closed it, or died): the front end may connect again. */
export class VhostUserDisconnected extends VhostUserProtocolError {
  constructor(message: string) {
    super(message);
    this.name = "VhostUserDisconnected";
  }
}

/** A request the back end answered with a failure status (REPLY_ACK). */
export class VhostUserRequestFailed extends VhostUserProtocolError {
  constructor(message: string) {
    super(message);
    this.name = "VhostUserRequestFailed";
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

function errorText(e: unknown): string {
  if (e instanceof SysError) return e.message;
  return (e instanceof Error ? e.message : String(e)).split("\n")[0];
}

export interface VhostUserClientOptions {
  /** Keep trying while the socket is missing or has no listener, this long (ms; default: one try). */
  connectTimeoutMs?: number;
  /** How long each reply may take (ms; default DEFAULT_REPLY_TIMEOUT_MS). */
  replyTimeoutMs?: number;
}

/**
 * A front end's connection to a back end. One request at a time, synchronously: the request is sent and
 * its reply (or REPLY_ACK status) read before the call returns, each within the reply timeout. Any
 * failure (a reply that is malformed, late, for another request or of the wrong size; a closed
 * connection; a failure status) throws VhostUserProtocolError and closes the connection: nothing more is
 * sent on it.
 */
export class VhostUserClient {
  readonly path: string;
  readonly #replyTimeoutMs: number;
  #sock?: UnixStream;
  /** Set once REPLY_ACK is negotiated: requests without a reply of their own then get a status. */
  replyAck = false;
  /** Requests sent, for stats. */
  requests = 0;

  private constructor(path: string, sock: UnixStream, replyTimeoutMs: number) {
    this.path = path;
    this.#sock = sock;
    this.#replyTimeoutMs = replyTimeoutMs;
  }

  /**
   * Connect to the back end listening at `path`; while `connectTimeoutMs` lasts, a missing socket or one
   * with no listener is tried again. Throws VhostUserConnectError (one line).
   */
  static async connect(path: string, opts: VhostUserClientOptions = {}): Promise<VhostUserClient> {
    const deadline = Date.now() + (opts.connectTimeoutMs ?? 0);
    for (;;) {
      try {
        return new VhostUserClient(path, UnixStream.connect(path), opts.replyTimeoutMs ?? DEFAULT_REPLY_TIMEOUT_MS);
      } catch (e) {
        const retry = e instanceof SysError && (e.errno === ENOENT || e.errno === ECONNREFUSED);
        if (!retry || Date.now() >= deadline) {
          throw new VhostUserConnectError(`cannot connect to the back end at ${path}: ${errorText(e)}`);
        }
      }
      await sleep(CONNECT_RETRY_MS);
    }
  }

  /** Whether the connection is still usable. */
  get connected(): boolean {
    return this.#sock !== undefined;
  }

  /** The socket's descriptor (-1 once closed), for a wait on the back end hanging up. */
  get fd(): number {
    return this.#sock?.fd ?? -1;
  }

  close(): void {
    this.#sock?.close();
    this.#sock = undefined;
  }

  /** Run `f` on the connection; any failure closes it and is rethrown as VhostUserProtocolError. */
  #use<T>(what: number, f: (sock: UnixStream, deadline: number) => T): T {
    const sock = this.#sock;
    if (!sock) throw new VhostUserProtocolError(`${requestName(what)}: the back end is not connected`);
    try {
      return f(sock, Date.now() + this.#replyTimeoutMs);
    } catch (e) {
      this.close();
      if (e instanceof VhostUserProtocolError) throw e;
      const gone = e instanceof ConnectionClosed ||
        (e instanceof SysError && (e.errno === ECONNRESET || e.errno === EPIPE));
      if (gone) throw new VhostUserDisconnected(`${requestName(what)}: the back end closed the connection`);
      throw new VhostUserProtocolError(`${requestName(what)}: ${errorText(e)}`);
    }
  }

  /** Wait until `sock` is ready for `events` or the deadline passes (VhostUserProtocolError). */
  #wait(sock: UnixStream, events: number, deadline: number, what: number): void {
    for (;;) {
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new VhostUserProtocolError(`${requestName(what)}: no reply within ${this.#replyTimeoutMs} ms`);
      }
      const rev = pollSync([sock.fd], events, left)[0];
      if (rev & POLLNVAL) throw new ConnectionClosed();
      if (rev & (events | POLLHUP | POLLERR)) return;
    }
  }

  #send(sock: UnixStream, deadline: number, request: number, flags: number, payload?: Uint8Array, fds?: number[]) {
    const data = encodeMessage(request, flags, payload);
    let off = 0;
    let pending = fds ?? [];
    while (off < data.length) {
      let n: number | null;
      try {
        n = sock.trySend(data.subarray(off), pending);
      } catch (e) {
        if (e instanceof SysError && (e.errno === EAGAIN || e.errno === EINTR)) n = null;
        else throw new ConnectionClosed();
      }
      if (n === null) {
        this.#wait(sock, POLLOUT, deadline, request);
        continue;
      }
      off += n;
      pending = [];
    }
    this.requests++;
  }

  #recvExact(sock: UnixStream, length: number, deadline: number, what: number, fds: number[]): Uint8Array {
    const out = new Uint8Array(length);
    let got = 0;
    while (got < length) {
      const r = sock.tryRecv(length - got);
      if (r === null) {
        this.#wait(sock, POLLIN, deadline, what);
        continue;
      }
      fds.push(...r.fds);
      out.set(r.data, got);
      got += r.data.length;
    }
    return out;
  }

  /**
   * Read the reply to `request`: a reply to it, of `size` bytes when given. Descriptors that came with it
   * are closed, or with `keepFds` returned in the message (the caller owns them).
   */
  #reply(sock: UnixStream, deadline: number, request: number, size?: number, keepFds = false): VhostUserMessage {
    const fds: number[] = [];
    try {
      const h = parseHeader(this.#recvExact(sock, VHOST_USER_HEADER_SIZE, deadline, request, fds), true);
      if (h.request !== request) {
        throw new VhostUserProtocolError(`${requestName(request)}: the back end answered ${requestName(h.request)}`);
      }
      if (size !== undefined && h.size !== size) {
        throw new VhostUserProtocolError(`${requestName(request)}: a reply of ${h.size} bytes, expected ${size}`);
      }
      const payload = new Uint8Array(h.size);
      if (h.size > 0) payload.set(this.#recvExact(sock, h.size, deadline, request, fds));
      return { request: h.request, flags: h.flags, payload, fds: keepFds ? fds.splice(0) : [] };
    } finally {
      fds.forEach(closeFd);
    }
  }

  /** A request whose reply carries descriptors (GET_INFLIGHT_FD): the reply, with them (the caller owns them). */
  callWithFds(request: number, payload: Uint8Array, size: number): VhostUserMessage {
    return this.#use(request, (sock, deadline) => {
      this.#send(sock, deadline, request, VHOST_USER_VERSION, payload);
      return this.#reply(sock, deadline, request, size, true);
    });
  }

  /**
   * With no request outstanding, what the socket holds: "closed" (the back end hung up), "unsolicited" (it
   * sent a message nobody asked for: a protocol violation) or "idle". Does not wait.
   */
  checkIdle(): "idle" | "closed" | "unsolicited" {
    const sock = this.#sock;
    if (!sock) return "closed";
    try {
      const r = sock.tryRecv(VHOST_USER_HEADER_SIZE);
      if (r === null) return "idle";
      r.fds.forEach(closeFd);
      return "unsolicited";
    } catch {
      return "closed";
    }
  }

  /** A request that has a reply of its own (GET_*): the reply, `size` bytes when given. */
  call(request: number, payload?: Uint8Array, size?: number): VhostUserMessage {
    return this.#use(request, (sock, deadline) => {
      this.#send(sock, deadline, request, VHOST_USER_VERSION, payload);
      return this.#reply(sock, deadline, request, size);
    });
  }

  /** A request whose reply is a u64. */
  callU64(request: number, payload?: Uint8Array): bigint {
    const r = this.call(request, payload, U64_SIZE);
    return new DataView(r.payload.buffer).getBigUint64(0, true);
  }

  /**
   * A request with no reply of its own. With REPLY_ACK negotiated it asks for a status and throws
   * VhostUserRequestFailed when the status is not success; without, it is only sent.
   */
  request(request: number, payload?: Uint8Array, fds: number[] = []): void {
    this.#use(request, (sock, deadline) => {
      if (!this.replyAck) {
        this.#send(sock, deadline, request, VHOST_USER_VERSION, payload, fds);
        return;
      }
      this.#send(sock, deadline, request, VHOST_USER_VERSION | VHOST_USER_FLAG_NEED_REPLY, payload, fds);
      const r = this.#reply(sock, deadline, request, U64_SIZE);
      const status = new DataView(r.payload.buffer).getBigUint64(0, true);
      if (status !== ACK_SUCCESS) {
        throw new VhostUserRequestFailed(`${requestName(request)}: the back end failed it (status ${status})`);
      }
    });
  }
}

export interface VhostUserFrontEndOptions {
  /** Short name for logs and counters. */
  name: string;
  /** The back end's socket. */
  socket: string;
  /** Virtio device ID the guest sees. */
  deviceType: number;
  /**
   * Queues the device has. Default: what the back end says (GET_QUEUE_NUM) when it offers MQ, else the
   * type's own count (device_types.ts), else 1. Given with an MQ back end, it must not exceed what it says.
   */
  queues?: number;
  /** Largest queue size offered to the driver (rounded down to a power of 2; default 32768). */
  maxQueueSize?: number;
  /** Configuration-space bytes read from the back end (default: the type's, device_types.ts; at most 256). */
  configSize?: number;
  /**
   * The configuration space, when the VMM provides it instead of the back end (as QEMU's vhost-user-fs does
   * for virtiofsd, which has no config space of its own: the tag is the VMM's). The driver reads it; its
   * writes go nowhere. At most 256 bytes.
   */
  config?: Uint8Array;
  /** Keep trying to connect this long while the socket is missing or has no listener (ms). */
  connectTimeoutMs?: number;
  /** How long each reply may take (ms). */
  replyTimeoutMs?: number;
  /** Where the device's log lines go (one per failure). */
  log: (line: string) => void;
}

/** The largest power of 2 that is at most `n` (n >= 1). */
function powerOf2AtMost(n: number): number {
  return 2 ** Math.floor(Math.log2(n));
}

/** Where the device's connection is. */
type LinkState = "connected" | "reconnecting" | "failed" | "closed";

/**
 * A virtio device served by a vhost-user back end (see the top of this file).
 *
 * Reconnection: when the back end goes away (its socket hangs up, or a request finds it gone), the device
 * logs one line and connects again to the same socket, every RECONNECT_RETRY_MS, for as long as it takes.
 * Once connected it negotiates again and, if the driver had the device running, sends the whole set-up:
 * features, memory table, the inflight region it had (INFLIGHT_SHMFD), and each ring from the used index
 * in guest memory (the back end, with the inflight region, resubmits what it had taken and not completed),
 * with the same kick and call fds. The guest's kicks meanwhile count up in the ioeventfds; the new back end
 * sees them. A back end that comes back but fails the set-up MAX_SETUP_FAILURES times running, or that
 * misbehaves (a malformed reply, no reply in time), fails the device.
 */
export class VhostUserFrontEndDevice implements VirtioDevice {
  readonly name: string;
  readonly deviceType: number;
  readonly servesQueuesOutOfProcess = true;
  readonly #opts: VhostUserFrontEndOptions;
  readonly #log: (line: string) => void;
  #client?: VhostUserClient;
  #state: LinkState = "closed";
  #features = 0n;
  #protocolFeatures = 0n;
  #queueSizes: number[] = [];
  #config: Uint8Array = new Uint8Array(0);
  /** The driver's set-up while the device runs (from DRIVER_OK to reset). */
  #ctx?: ActivateContext;
  /** The rings sent to the back end. */
  #started: number[] = [];
  /** The inflight region the back end gave (INFLIGHT_SHMFD), kept for a reconnection; -1 when none. */
  #inflightFd = -1;
  #inflight?: Inflight;
  /** Why the device failed (the back end misbehaved), once it has. */
  #failed?: string;
  /** Each ring's available index where the back end last stopped it (GET_VRING_BASE). */
  readonly #bases = new Map<number, number>();
  /** Set-ups that failed in a row after reconnections. */
  #setupFailures = 0;
  /** Wakes the supervisor (state changed, or close()). */
  #nudgeFd = -1;
  #supervisor?: Promise<void>;
  /** This side of the back-end request channel (SET_BACKEND_REQ_FD), when negotiated, and its loop. */
  #backendChannel?: { sock: UnixStream; waker: Waker; served: Promise<void> };
  /** Ends when every closed channel's loop has. */
  #channelsDone: Promise<unknown> = Promise.resolve();
  /** Back-end requests not served here, each logged once. */
  readonly #unservedLogged = new Set<number>();
  readonly #counters = { activations: 0, resets: 0, failures: 0, reconnects: 0, configChanges: 0 };

  constructor(opts: VhostUserFrontEndOptions) {
    this.#opts = opts;
    this.name = opts.name;
    this.deviceType = opts.deviceType;
    this.#log = opts.log;
    const size = opts.maxQueueSize ?? VIRTQ_MAX_SIZE;
    if (!Number.isInteger(size) || size < 1 || size > VIRTQ_MAX_SIZE) {
      throw new RangeError(`${opts.name}: max queue size ${size} is not in 1..${VIRTQ_MAX_SIZE}`);
    }
    if (opts.config && opts.config.length > VHOST_USER_MAX_CONFIG_SIZE) {
      throw new RangeError(
        `${opts.name}: a config space of ${opts.config.length} bytes (at most ${VHOST_USER_MAX_CONFIG_SIZE})`,
      );
    }
    const cs = opts.configSize;
    if (cs !== undefined && (!Number.isInteger(cs) || cs < 0 || cs > VHOST_USER_MAX_CONFIG_SIZE)) {
      throw new RangeError(`${opts.name}: config size ${cs} is not in 0..${VHOST_USER_MAX_CONFIG_SIZE}`);
    }
  }

  get features(): bigint {
    return this.#features;
  }

  get queueMaxSizes(): readonly number[] {
    return this.#queueSizes;
  }

  /** Why the device failed, or undefined while it works. */
  get failed(): string | undefined {
    return this.#failed;
  }

  /** Whether the back end is connected now (false while the device reconnects). */
  get connected(): boolean {
    return this.#state === "connected";
  }

  /** The protocol features both sides use. */
  get protocolFeatures(): bigint {
    return this.#protocolFeatures;
  }

  /**
   * Connect and learn the device: features, protocol features, the queue count and the configuration
   * space. Call it once, before the device is put on a transport. Throws VhostUserConnectError or
   * VhostUserProtocolError (one line naming the device).
   */
  async connect(): Promise<void> {
    const o = this.#opts;
    const client = await VhostUserClient.connect(o.socket, {
      connectTimeoutMs: o.connectTimeoutMs,
      replyTimeoutMs: o.replyTimeoutMs,
    });
    try {
      this.#negotiate(client, true);
      this.#openBackendChannel(client);
    } catch (e) {
      client.close();
      this.#closeBackendChannel();
      throw new VhostUserProtocolError(`${this.name}: ${errorText(e)}`);
    }
    this.#client = client;
    this.#state = "connected";
    this.#nudgeFd = eventfd();
    this.#supervisor = this.#supervise();
  }

  /** Resolves once close() has stopped watching the back end. */
  async whenClosed(): Promise<void> {
    await this.#supervisor;
    await this.#channelsDone;
  }

  // ---- The back-end request channel: configuration changes ----

  /**
   * With BACKEND_REQ negotiated, give the back end one end of a socket pair for its own requests
   * (SET_BACKEND_REQ_FD) and serve the other: CONFIG_CHANGE_MSG reads the configuration space again and
   * tells the driver (the transport's CONFIG interrupt).
   */
  #openBackendChannel(client: VhostUserClient): void {
    this.#closeBackendChannel();
    if (!(this.#protocolFeatures & VHOST_USER_PROTOCOL_F_BACKEND_REQ)) return;
    const [ours, theirs] = streamPair();
    try {
      client.request(R.SET_BACKEND_REQ_FD, undefined, [theirs]);
    } catch (e) {
      closeFd(ours);
      throw e;
    } finally {
      closeFd(theirs);
    }
    const waker = new Waker();
    const sock = new UnixStream(ours, waker);
    const channel = { sock, waker, served: Promise.resolve() };
    channel.served = this.#serveBackendChannel(sock);
    this.#backendChannel = channel;
  }

  #closeBackendChannel(): void {
    const c = this.#backendChannel;
    if (!c) return;
    this.#backendChannel = undefined;
    c.waker.wake();
    const done = c.served.finally(() => {
      c.sock.close();
      c.waker.close();
    });
    this.#channelsDone = Promise.all([this.#channelsDone, done]);
  }

  async #serveBackendChannel(sock: UnixStream): Promise<void> {
    try {
      for (;;) {
        const msg = await readMessage(sock, false);
        msg.fds.forEach(closeFd);
        let ok = true;
        if (msg.request === VhostUserBackendRequest.CONFIG_CHANGE_MSG) this.#configChanged();
        else {
          ok = false;
          if (!this.#unservedLogged.has(msg.request)) {
            this.#unservedLogged.add(msg.request);
            this.#log(`${this.name}: the back end asked for back-end request ${msg.request}, which is not served`);
          }
        }
        if (msg.flags & VHOST_USER_FLAG_NEED_REPLY) {
          const status = u64Payload(ok ? ACK_SUCCESS : ACK_FAILURE);
          await sock.send(encodeMessage(msg.request, VHOST_USER_VERSION | VHOST_USER_FLAG_REPLY, status));
        }
      }
    } catch (e) {
      // The channel closes with the back end (its loss is seen on the main socket) or with close().
      if (e instanceof WaitCancelled || e instanceof ConnectionClosed) return;
      if (this.#backendChannel?.sock === sock) {
        this.#fail(new VhostUserProtocolError(`back-end channel: ${errorText(e)}`));
      }
    }
  }

  /** CONFIG_CHANGE_MSG: read the configuration space again; a running driver gets the CONFIG interrupt. */
  #configChanged(): void {
    const client = this.#connectedClient();
    if (!client || this.#opts.config || this.#config.length === 0) return;
    if (!(this.#protocolFeatures & VHOST_USER_PROTOCOL_F_CONFIG)) return;
    try {
      this.#config = this.#readBackendConfig(client);
    } catch (e) {
      this.#requestFailed(e);
      return;
    }
    this.#counters.configChanges++;
    this.#ctx?.interrupt.signalConfigChange();
  }

  /**
   * SET_OWNER, features, protocol features, the queue count, the configuration space. The first time it
   * learns them; after a reconnection it checks that the back end still offers what the device has.
   */
  #negotiate(client: VhostUserClient, first: boolean): void {
    const o = this.#opts;
    client.request(R.SET_OWNER);
    const offered = client.callU64(R.GET_FEATURES);
    let proto = 0n;
    if (offered & VHOST_USER_F_PROTOCOL_FEATURES) {
      proto = client.callU64(R.GET_PROTOCOL_FEATURES) & FRONT_END_PROTOCOL_FEATURES;
      client.request(R.SET_PROTOCOL_FEATURES, u64Payload(proto));
      client.replyAck = (proto & VHOST_USER_PROTOCOL_F_REPLY_ACK) !== 0n;
    }
    const features = offered & ~VHOST_USER_F_PROTOCOL_FEATURES & ~FRONT_END_WITHHELD_FEATURES;
    if (!first) {
      if (features !== this.#features || proto !== this.#protocolFeatures) {
        throw new VhostUserProtocolError(
          `the back end came back with features 0x${features.toString(16)} and protocol features ` +
            `0x${proto.toString(16)}, not 0x${this.#features.toString(16)} and 0x${
              this.#protocolFeatures.toString(16)
            }`,
        );
      }
    }
    this.#protocolFeatures = proto;
    this.#features = features;

    const known = vhostUserDeviceTypeById(o.deviceType);
    let queues = o.queues ?? known?.queues ?? 1;
    if (proto & VHOST_USER_PROTOCOL_F_MQ) {
      const n = client.callU64(R.GET_QUEUE_NUM);
      if (n < 1n || n > BigInt(VHOST_USER_MAX_VRING_INDEX + 1)) {
        throw new VhostUserProtocolError(`GET_QUEUE_NUM: ${n} queues (1..${VHOST_USER_MAX_VRING_INDEX + 1} allowed)`);
      }
      const wanted = first ? o.queues : this.#queueSizes.length;
      if (wanted !== undefined && wanted > Number(n)) {
        throw new VhostUserProtocolError(`${wanted} queues needed; the back end has ${n}`);
      }
      queues = wanted ?? Number(n);
    }
    if (!first) return;
    if (queues < 1 || queues > FRONT_END_MAX_QUEUES) {
      throw new VhostUserProtocolError(`${queues} queues; this front end carries 1..${FRONT_END_MAX_QUEUES}`);
    }
    this.#queueSizes = new Array(queues).fill(powerOf2AtMost(o.maxQueueSize ?? VIRTQ_MAX_SIZE));
    if (o.config) {
      this.#config = o.config.slice();
      return;
    }
    const configSize = o.configSize ?? known?.configSize ?? 0;
    this.#config = new Uint8Array(configSize);
    if (configSize > 0 && (proto & VHOST_USER_PROTOCOL_F_CONFIG)) this.#config = this.#readBackendConfig(client);
  }

  /** GET_CONFIG of the whole configuration space; the reply must be exactly what was asked. */
  #readBackendConfig(client: VhostUserClient): Uint8Array {
    const size = this.#config.length;
    const ask = configPayload({ offset: 0, flags: 0, data: new Uint8Array(size) });
    const reply = client.call(R.GET_CONFIG, ask);
    const c = parseConfig(reply);
    if (c.offset !== 0 || c.size !== size) {
      throw new VhostUserProtocolError(
        `GET_CONFIG: the back end answered ${c.size} bytes at offset ${c.offset}, asked for ${size} at 0`,
      );
    }
    return c.data;
  }

  // ---- Failure, disconnection, reconnection ----

  /**
   * The device failed for good: the connection closed, and one log line unless `logged` (the caller's
   * error is logged by the transport). Returns the error to throw.
   */
  #fail(e: unknown, logged = false): Error {
    const reason = errorText(e);
    if (this.#failed === undefined && this.#state !== "closed") {
      this.#failed = reason;
      this.#counters.failures++;
      if (!logged) this.#log(`${this.name}: back end failed: ${reason}`);
      this.#state = "failed";
    }
    this.#client?.close();
    this.#client = undefined;
    this.#closeBackendChannel();
    this.#nudge();
    return new Error(`${this.name}: back end failed: ${reason}`);
  }

  /** The back end went away: one log line, then the supervisor connects again. */
  #lost(reason: string): void {
    if (this.#state !== "connected") return;
    this.#state = "reconnecting";
    this.#client?.close();
    this.#client = undefined;
    this.#closeBackendChannel();
    this.#log(`${this.name}: the back end went away (${reason}); reconnecting to ${this.#opts.socket}`);
    this.#nudge();
  }

  /** A request failed with `e`: a lost connection is reconnected, anything else fails the device. */
  #requestFailed(e: unknown, logged = false): Error | undefined {
    if (e instanceof VhostUserDisconnected) {
      this.#lost(errorText(e));
      return undefined;
    }
    return this.#fail(e, logged);
  }

  #nudge(): void {
    if (this.#nudgeFd >= 0) eventfdWrite(this.#nudgeFd);
  }

  /** Watches the connection while connected; reconnects while reconnecting; ends when failed or closed. */
  async #supervise(): Promise<void> {
    const nudge = this.#nudgeFd;
    try {
      while (this.#state === "connected" || this.#state === "reconnecting") {
        const client = this.#client;
        if (this.#state === "connected" && client) {
          const rev = await pollAsync([client.fd, nudge], POLLIN, -1);
          if (rev[1] & POLLIN) eventfdRead(nudge);
          if (this.#state !== "connected" || this.#client !== client || !(rev[0] & (POLLIN | POLLHUP | POLLERR))) {
            continue;
          }
          const idle = client.checkIdle();
          if (idle === "closed") this.#lost("it closed the connection");
          else if (idle === "unsolicited") this.#fail(new VhostUserProtocolError("a message nobody asked for"));
        } else if (this.#state === "reconnecting") {
          if (!(await this.#reconnectOnce())) {
            const rev = await pollAsync([nudge], POLLIN, RECONNECT_RETRY_MS);
            if (rev[0] & POLLIN) eventfdRead(nudge);
          }
        }
      }
    } finally {
      closeFd(nudge);
      if (this.#nudgeFd === nudge) this.#nudgeFd = -1;
    }
  }

  /** One attempt at connecting again and restoring the set-up; true when the device is connected again. */
  async #reconnectOnce(): Promise<boolean> {
    let client: VhostUserClient;
    try {
      client = await VhostUserClient.connect(this.#opts.socket, { replyTimeoutMs: this.#opts.replyTimeoutMs });
    } catch {
      return false; // not back yet
    }
    if (this.#state !== "reconnecting") {
      client.close();
      return false;
    }
    try {
      this.#negotiate(client, false);
      this.#openBackendChannel(client);
      const ctx = this.#ctx;
      // The back end kept no ring state: each ring starts again where the driver has seen completions.
      if (ctx) this.#setUp(client, ctx, (q) => q.usedIdx(), true);
    } catch (e) {
      client.close();
      this.#closeBackendChannel();
      if (e instanceof VhostUserDisconnected && ++this.#setupFailures < MAX_SETUP_FAILURES) return false;
      this.#fail(e);
      return false;
    }
    this.#client = client;
    this.#state = "connected";
    this.#setupFailures = 0;
    this.#counters.reconnects++;
    this.#log(`${this.name}: reconnected to the back end`);
    return true;
  }

  #connectedClient(): VhostUserClient | undefined {
    return this.#state === "connected" ? this.#client : undefined;
  }

  // ---- VirtioDevice ----

  readConfig(offset: number, data: Uint8Array): void {
    readConfigSpace(this.#config, offset, data);
  }

  /**
   * The driver wrote configuration space: the bytes go to the back end (SET_CONFIG), and the space is read
   * back (a device may answer a write by changing other fields, as virtio-input's select does).
   */
  writeConfig(offset: number, data: Uint8Array): void {
    if (this.#opts.config || !(this.#protocolFeatures & VHOST_USER_PROTOCOL_F_CONFIG) || this.#config.length === 0) {
      return;
    }
    if (offset < 0 || offset + data.length > this.#config.length) return;
    const client = this.#connectedClient();
    if (!client) return;
    try {
      client.request(
        R.SET_CONFIG,
        configPayload({ offset, flags: VHOST_SET_CONFIG_TYPE_FRONTEND, data: data.slice() }),
      );
      this.#config = this.#readBackendConfig(client);
    } catch (e) {
      this.#requestFailed(e);
    }
  }

  /**
   * DRIVER_OK: the negotiated features, the memory table, the inflight region and every enabled ring go to
   * the back end. A failure fails the device and throws: the transport logs it (one line) and sets
   * DEVICE_NEEDS_RESET. While the back end is away the set-up waits for the reconnection.
   */
  activate(ctx: ActivateContext): void {
    if (!ctx.notifyFds || ctx.irqFd === undefined) {
      throw new Error(`${this.name}: the transport gave no ioeventfds and irqfd for an out-of-process device`);
    }
    if (this.#failed !== undefined || this.#state === "closed") throw new Error(`${this.name}: back end failed`);
    this.#ctx = ctx;
    this.#counters.activations++;
    const client = this.#connectedClient();
    if (!client) return;
    try {
      this.#setUp(client, ctx, (q) => q.nextAvail, false);
    } catch (e) {
      const err = this.#requestFailed(e, true);
      if (err) {
        this.#ctx = undefined;
        throw err;
      }
    }
  }

  /** Send the driver's set-up: features, memory table, inflight region, the rings from `base(queue)`. */
  #setUp(client: VhostUserClient, ctx: ActivateContext, base: (q: Virtqueue) => number, again: boolean): void {
    const notifyFds = ctx.notifyFds!;
    const irqFd = ctx.irqFd!;
    const proto = this.#protocolFeatures !== 0n ? VHOST_USER_F_PROTOCOL_FEATURES : 0n;
    client.request(R.SET_FEATURES, u64Payload(ctx.ackedFeatures | proto));
    this.#sendMemTable(client, ctx.mem);
    if (this.#protocolFeatures & VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) this.#setInflight(client, ctx, again);
    const started: number[] = [];
    ctx.queues.forEach((q, i) => {
      if (!q) return;
      if (notifyFds[i] === undefined) throw new Error(`queue ${i} has no ioeventfd`);
      const a = q.addrs;
      const host = (gpa: number, len: number) => ctx.mem.hostAddress(gpa, len);
      // QEMU's order (vhost_virtqueue_start): size, base, addresses, then the fds; libvhost-user checks
      // the base against the used index when the addresses arrive.
      client.request(R.SET_VRING_NUM, vringStatePayload({ index: i, num: q.size }));
      client.request(R.SET_VRING_BASE, vringStatePayload({ index: i, num: base(q) }));
      client.request(
        R.SET_VRING_ADDR,
        vringAddrPayload({
          index: i,
          flags: 0,
          desc: host(a.descTable, descTableBytes(q.size)),
          used: host(a.usedRing, usedRingBytes(q.size)),
          avail: host(a.availRing, availRingBytes(q.size)),
          log: 0n,
        }),
      );
      client.request(R.SET_VRING_CALL, u64Payload(BigInt(i)), [irqFd]);
      client.request(R.SET_VRING_KICK, u64Payload(BigInt(i)), [notifyFds[i]]);
      started.push(i);
    });
    if (proto) {
      for (const i of started) client.request(R.SET_VRING_ENABLE, vringStatePayload({ index: i, num: VRING_ENABLE }));
    }
    this.#started = started;
  }

  /**
   * INFLIGHT_SHMFD: at the driver's set-up the back end is asked for a region (GET_INFLIGHT_FD) where it
   * records the requests it has taken; after a reconnection the same region is handed back
   * (SET_INFLIGHT_FD) so that the new back end resubmits them.
   */
  #setInflight(client: VhostUserClient, ctx: ActivateContext, again: boolean): void {
    if (!again || this.#inflightFd < 0) {
      this.#dropInflight();
      const queueSize = Math.max(...ctx.queues.map((q) => q?.size ?? 0));
      const reply = client.callWithFds(
        R.GET_INFLIGHT_FD,
        inflightPayload({ mmapSize: 0n, mmapOffset: 0n, numQueues: this.#queueSizes.length, queueSize }),
        INFLIGHT_SIZE,
      );
      const fds = reply.fds;
      const info = parseInflight(reply);
      if (info.mmapSize === 0n) {
        fds.forEach(closeFd);
        return; // the back end keeps no inflight record
      }
      if (fds.length !== 1) {
        fds.forEach(closeFd);
        throw new VhostUserProtocolError(`GET_INFLIGHT_FD: ${fds.length} descriptors with the reply, expected 1`);
      }
      this.#inflightFd = fds[0];
      this.#inflight = { ...info, numQueues: this.#queueSizes.length, queueSize };
    }
    if (this.#inflightFd < 0 || !this.#inflight) return;
    client.request(R.SET_INFLIGHT_FD, inflightPayload(this.#inflight), [this.#inflightFd]);
  }

  #dropInflight(): void {
    closeFd(this.#inflightFd);
    this.#inflightFd = -1;
    this.#inflight = undefined;
  }

  /** SET_MEM_TABLE: every RAM region by its file descriptor; the front end's addresses are this process's. */
  #sendMemTable(client: VhostUserClient, mem: GuestMemory): void {
    const descs = mem.descriptors;
    if (descs.length > VHOST_MEMORY_BASELINE_NREGIONS) {
      throw new Error(`guest RAM has ${descs.length} regions; SET_MEM_TABLE carries ${VHOST_MEMORY_BASELINE_NREGIONS}`);
    }
    const regions: MemRegion[] = [];
    const fds: number[] = [];
    for (const d of descs) {
      if (d.fd === undefined || d.fileOffset === undefined) {
        throw new Error("guest RAM is not shareable (it was not allocated from a memfd)");
      }
      regions.push({
        guestPhysAddr: BigInt(d.guestBase),
        memorySize: BigInt(d.size),
        userspaceAddr: d.hostAddr,
        mmapOffset: BigInt(d.fileOffset),
      });
      fds.push(d.fd);
    }
    client.request(R.SET_MEM_TABLE, memTablePayload(regions), fds);
  }

  /** A notify that reached the transport rather than the ioeventfd: pass it on as a kick. */
  queueNotify(index: number): void {
    const fd = this.#ctx?.notifyFds?.[index];
    if (this.#ctx?.queues[index] && fd !== undefined) eventfdWrite(fd);
  }

  /**
   * The driver reset the device: each running ring is stopped (disabled, then GET_VRING_BASE) and, where
   * the back end offers it, the device reset (RESET_DEVICE). A failure is logged once and fails the device;
   * while the back end is away there is nothing to stop.
   */
  reset(): void {
    const ctx = this.#ctx;
    this.#ctx = undefined;
    const started = this.#started;
    this.#started = [];
    this.#dropInflight();
    const client = this.#connectedClient();
    if (!ctx || !client) return;
    this.#counters.resets++;
    try {
      for (const i of started) {
        if (this.#protocolFeatures !== 0n) {
          client.request(R.SET_VRING_ENABLE, vringStatePayload({ index: i, num: VRING_DISABLE }));
        }
        const s = parseVringState(client.call(R.GET_VRING_BASE, vringStatePayload({ index: i, num: 0 })));
        if (s.index !== i) {
          throw new VhostUserProtocolError(`GET_VRING_BASE: the reply names ring ${s.index}, not ${i}`);
        }
        this.#bases.set(i, s.num);
      }
      if (this.#protocolFeatures & VHOST_USER_PROTOCOL_F_RESET_DEVICE) client.request(R.RESET_DEVICE);
    } catch (e) {
      this.#requestFailed(e);
    }
  }

  /** Where the back end stopped ring `index` at the last reset, if it did. */
  ringBase(index: number): number | undefined {
    return this.#bases.get(index);
  }

  close(): void {
    this.#state = "closed";
    this.#closeBackendChannel();
    this.#client?.close();
    this.#client = undefined;
    this.#ctx = undefined;
    this.#dropInflight();
    this.#nudge();
  }

  stats(): Record<string, number> {
    return { ...this.#counters, requests: this.#client?.requests ?? 0 };
  }

  // ---- Device state: the rings' state lives in the back end, which this VMM cannot save ----

  quiescent(): boolean {
    return true;
  }

  saveState(): DeviceState {
    throw new StateError(
      `${this.name}: a vhost-user device's state is held by its back end; a VM with one cannot be snapshotted`,
    );
  }

  restoreState(_state: DeviceState): void {
    throw new StateError(`${this.name}: a vhost-user device cannot be restored from a snapshot`);
  }
}
