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
  eventfdWrite,
  POLLERR,
  POLLHUP,
  POLLIN,
  POLLNVAL,
  POLLOUT,
  pollSync,
  SysError,
} from "../../ffi/libc.ts";
import { ECONNREFUSED } from "../../ffi/socket.ts";
import { ConnectionClosed, UnixStream } from "../../core/unix_socket.ts";
import { type DeviceState, StateError } from "../../core/state.ts";
import type { GuestMemory } from "../../core/memory.ts";
import {
  type ActivateContext,
  readConfigSpace,
  VIRTIO_F_ACCESS_PLATFORM,
  VIRTIO_F_RING_PACKED,
  type VirtioDevice,
} from "../virtio/device.ts";
import { availRingBytes, descTableBytes, usedRingBytes, VIRTQ_MAX_SIZE } from "../virtio/queue.ts";
import {
  configPayload,
  encodeMessage,
  type MemRegion,
  memTablePayload,
  parseConfig,
  parseHeader,
  parseVringState,
  requestName,
  u64Payload,
  VHOST_MEMORY_BASELINE_NREGIONS,
  VHOST_USER_F_PROTOCOL_FEATURES,
  VHOST_USER_FLAG_NEED_REPLY,
  VHOST_USER_HEADER_SIZE,
  VHOST_USER_MAX_CONFIG_SIZE,
  VHOST_USER_MAX_VRING_INDEX,
  VHOST_USER_PROTOCOL_F_CONFIG,
  VHOST_USER_PROTOCOL_F_MQ,
  VHOST_USER_PROTOCOL_F_REPLY_ACK,
  VHOST_USER_PROTOCOL_F_RESET_DEVICE,
  VHOST_USER_VERSION,
  type VhostUserMessage,
  VhostUserProtocolError,
  VhostUserRequest as R,
  vringAddrPayload,
  vringStatePayload,
} from "./protocol.ts";
import { vhostUserDeviceTypeById } from "./device_types.ts";

/** Protocol features this front end uses (vhost-user.rst "Protocol features"). */
export const FRONT_END_PROTOCOL_FEATURES = VHOST_USER_PROTOCOL_F_MQ | VHOST_USER_PROTOCOL_F_REPLY_ACK |
  VHOST_USER_PROTOCOL_F_CONFIG | VHOST_USER_PROTOCOL_F_RESET_DEVICE;

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
/** SET_CONFIG's flags: a change the driver made (vhost-user.rst "VHOST_USER_SET_CONFIG": VHOST_SET_CONFIG_TYPE_FRONTEND). */
const VHOST_SET_CONFIG_TYPE_FRONTEND = 0;
/** SET_VRING_ENABLE's num: 1 enables the ring, 0 disables it (vhost-user.rst). */
const VRING_ENABLE = 1;
const VRING_DISABLE = 0;
/** A REPLY_ACK status of 0 is success (vhost-user.rst "REPLY_ACK"). */
const ACK_SUCCESS = 0n;
/** Bytes of a u64 payload. */
const U64_SIZE = 8;

/** The back end could not be reached at all. */
export class VhostUserConnectError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "VhostUserConnectError";
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
      if (e instanceof ConnectionClosed) {
        throw new VhostUserProtocolError(`${requestName(what)}: the back end closed the connection`);
      }
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

  /** Read the reply to `request`: a reply to it, of `size` bytes when given. Descriptors with it are closed. */
  #reply(sock: UnixStream, deadline: number, request: number, size?: number): VhostUserMessage {
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
      return { request: h.request, flags: h.flags, payload, fds: [] };
    } finally {
      // No reply this front end reads carries descriptors.
      fds.forEach(closeFd);
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

/** What the front end set up at DRIVER_OK: which rings run. */
interface Running {
  queues: number[];
}

/** A virtio device served by a vhost-user back end (see the top of this file). */
export class VhostUserFrontEndDevice implements VirtioDevice {
  readonly name: string;
  readonly deviceType: number;
  readonly servesQueuesOutOfProcess = true;
  readonly #opts: VhostUserFrontEndOptions;
  readonly #log: (line: string) => void;
  #client?: VhostUserClient;
  #features = 0n;
  #protocolFeatures = 0n;
  #queueSizes: number[] = [];
  #config: Uint8Array = new Uint8Array(0);
  #running?: Running;
  /** Why the device failed (the back end misbehaved or went away), once it has. */
  #failed?: string;
  /** Each ring's available index where the back end last stopped it (GET_VRING_BASE). */
  readonly #bases = new Map<number, number>();
  /** The kick fds of the running rings, to pass on a notify that reached the transport itself. */
  #notifyFds: readonly number[] = [];
  readonly #counters = { activations: 0, resets: 0, failures: 0 };

  constructor(opts: VhostUserFrontEndOptions) {
    this.#opts = opts;
    this.name = opts.name;
    this.deviceType = opts.deviceType;
    this.#log = opts.log;
    const size = opts.maxQueueSize ?? VIRTQ_MAX_SIZE;
    if (!Number.isInteger(size) || size < 1 || size > VIRTQ_MAX_SIZE) {
      throw new RangeError(`${opts.name}: max queue size ${size} is not in 1..${VIRTQ_MAX_SIZE}`);
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
      this.#negotiate(client);
    } catch (e) {
      client.close();
      throw new VhostUserProtocolError(`${this.name}: ${errorText(e)}`);
    }
    this.#client = client;
  }

  #negotiate(client: VhostUserClient): void {
    const o = this.#opts;
    client.request(R.SET_OWNER);
    const offered = client.callU64(R.GET_FEATURES);
    let proto = 0n;
    if (offered & VHOST_USER_F_PROTOCOL_FEATURES) {
      proto = client.callU64(R.GET_PROTOCOL_FEATURES) & FRONT_END_PROTOCOL_FEATURES;
      client.request(R.SET_PROTOCOL_FEATURES, u64Payload(proto));
      client.replyAck = (proto & VHOST_USER_PROTOCOL_F_REPLY_ACK) !== 0n;
    }
    this.#protocolFeatures = proto;
    this.#features = offered & ~VHOST_USER_F_PROTOCOL_FEATURES & ~FRONT_END_WITHHELD_FEATURES;

    const known = vhostUserDeviceTypeById(o.deviceType);
    let queues = o.queues ?? known?.queues ?? 1;
    if (proto & VHOST_USER_PROTOCOL_F_MQ) {
      const n = client.callU64(R.GET_QUEUE_NUM);
      if (n < 1n || n > BigInt(VHOST_USER_MAX_VRING_INDEX + 1)) {
        throw new VhostUserProtocolError(`GET_QUEUE_NUM: ${n} queues (1..${VHOST_USER_MAX_VRING_INDEX + 1} allowed)`);
      }
      if (o.queues !== undefined && o.queues > Number(n)) {
        throw new VhostUserProtocolError(`${o.queues} queues asked for; the back end has ${n}`);
      }
      queues = o.queues ?? Number(n);
    }
    if (queues < 1 || queues > FRONT_END_MAX_QUEUES) {
      throw new VhostUserProtocolError(`${queues} queues; this front end carries 1..${FRONT_END_MAX_QUEUES}`);
    }
    this.#queueSizes = new Array(queues).fill(powerOf2AtMost(o.maxQueueSize ?? VIRTQ_MAX_SIZE));
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

  /**
   * The device failed: the connection closed, and one log line unless `logged` (the caller's error is
   * logged by the transport). Returns the error to throw.
   */
  #fail(e: unknown, logged = false): Error {
    const reason = errorText(e);
    if (this.#failed === undefined) {
      this.#failed = reason;
      this.#counters.failures++;
      if (!logged) this.#log(`${this.name}: back end failed: ${reason}`);
    }
    this.#client?.close();
    this.#running = undefined;
    return new Error(`${this.name}: back end failed: ${reason}`);
  }

  #connectedClient(): VhostUserClient {
    const c = this.#client;
    if (this.#failed !== undefined || !c?.connected) {
      throw new Error(`${this.name}: back end ${this.#failed !== undefined ? "failed" : "not connected"}`);
    }
    return c;
  }

  readConfig(offset: number, data: Uint8Array): void {
    readConfigSpace(this.#config, offset, data);
  }

  /**
   * The driver wrote configuration space: the bytes go to the back end (SET_CONFIG), and the space is read
   * back (a device may answer a write by changing other fields, as virtio-input's select does).
   */
  writeConfig(offset: number, data: Uint8Array): void {
    if (!(this.#protocolFeatures & VHOST_USER_PROTOCOL_F_CONFIG) || this.#config.length === 0) return;
    if (offset < 0 || offset + data.length > this.#config.length) return;
    try {
      const client = this.#connectedClient();
      client.request(
        R.SET_CONFIG,
        configPayload({ offset, flags: VHOST_SET_CONFIG_TYPE_FRONTEND, data: data.slice() }),
      );
      this.#config = this.#readBackendConfig(client);
    } catch (e) {
      if (this.#failed === undefined) this.#fail(e);
    }
  }

  /**
   * DRIVER_OK: the negotiated features, the memory table and every enabled ring go to the back end. A
   * failure fails the device and throws: the transport logs it (one line) and sets DEVICE_NEEDS_RESET.
   */
  activate(ctx: ActivateContext): void {
    const { notifyFds, irqFd } = ctx;
    if (!notifyFds || irqFd === undefined) {
      throw new Error(`${this.name}: the transport gave no ioeventfds and irqfd for an out-of-process device`);
    }
    const client = this.#connectedClient();
    try {
      const proto = this.#protocolFeatures !== 0n ? VHOST_USER_F_PROTOCOL_FEATURES : 0n;
      client.request(R.SET_FEATURES, u64Payload(ctx.ackedFeatures | proto));
      this.#sendMemTable(client, ctx.mem);
      const started: number[] = [];
      ctx.queues.forEach((q, i) => {
        if (!q) return;
        if (notifyFds[i] === undefined) throw new Error(`queue ${i} has no ioeventfd`);
        const a = q.addrs;
        const host = (gpa: number, len: number) => ctx.mem.hostAddress(gpa, len);
        client.request(R.SET_VRING_NUM, vringStatePayload({ index: i, num: q.size }));
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
        client.request(R.SET_VRING_BASE, vringStatePayload({ index: i, num: q.nextAvail }));
        client.request(R.SET_VRING_CALL, u64Payload(BigInt(i)), [irqFd]);
        client.request(R.SET_VRING_KICK, u64Payload(BigInt(i)), [notifyFds[i]]);
        started.push(i);
      });
      if (proto) {
        for (const i of started) client.request(R.SET_VRING_ENABLE, vringStatePayload({ index: i, num: VRING_ENABLE }));
      }
      this.#running = { queues: started };
      this.#notifyFds = notifyFds;
      this.#counters.activations++;
    } catch (e) {
      throw this.#fail(e, true);
    }
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
    const fd = this.#notifyFds[index];
    if (this.#running?.queues.includes(index) && fd !== undefined) eventfdWrite(fd);
  }

  /**
   * The driver reset the device: each running ring is stopped (disabled, then GET_VRING_BASE) and, where
   * the back end offers it, the device reset (RESET_DEVICE). A failure is logged once and fails the device.
   */
  reset(): void {
    const running = this.#running;
    this.#running = undefined;
    this.#notifyFds = [];
    if (!running || this.#failed !== undefined) return;
    this.#counters.resets++;
    try {
      const client = this.#connectedClient();
      for (const i of running.queues) {
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
      this.#fail(e);
    }
  }

  /** Where the back end stopped ring `index` at the last reset, if it did. */
  ringBase(index: number): number | undefined {
    return this.#bases.get(index);
  }

  close(): void {
    this.#client?.close();
    this.#client = undefined;
    this.#running = undefined;
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
