// virtio-vsock (virtio 1.2 spec, section 5.10; Linux include/uapi/linux/virtio_vsock.h) in userspace,
// with the host side Firecracker uses: a Unix socket at `udsPath`.
//  - Host to guest: a host program connects to udsPath, writes `CONNECT <port>\n`; the device sends
//    the guest a REQUEST from host CID 2 and a fresh host port; when the guest answers RESPONSE the
//    host program reads `OK <hostport>\n` and bytes flow both ways. A refused connection is closed.
//  - Guest to host: a guest REQUEST to host port P connects to the Unix listener `${udsPath}_${P}`;
//    RESPONSE when it accepts, RST when nobody listens.
// Stream sockets only (no SEQPACKET). Credit flow follows section 5.10.6.3: every packet carries
// buf_alloc and fwd_cnt; the device reads from a host socket only as much as the guest has room for
// and refuses (RST) a guest that sends beyond the room it was given. The host closing its end sends
// SHUTDOWN with both flags (Unix streams here have no half-close signal the device can observe
// separately from close). Hostile packets get an RST and one log line, never an exception.

import {
  type ActivateContext,
  featuresField,
  queuesQuiescent,
  stateCounters,
  stateInteger,
  VIRTIO_COMMON_FEATURES,
  VIRTIO_ID_VSOCK,
  type VirtioDevice,
} from "./device.ts";
import { ChainError, type DescriptorChain, type Virtqueue } from "./queue.ts";
import { RateLimitedLog } from "../../core/log.ts";
import { type DeviceState, stateData, StateError, type Stateful, stateRecord, stateString } from "../../core/state.ts";

// ---- struct virtio_vsock_hdr (virtio_vsock.h, packed, little-endian) ----
export const VSOCK_HDR_SIZE = 44;
export const HDR_SRC_CID = 0; // le64
export const HDR_DST_CID = 8; // le64
export const HDR_SRC_PORT = 16; // le32
export const HDR_DST_PORT = 20; // le32
export const HDR_LEN = 24; // le32
export const HDR_TYPE = 28; // le16
export const HDR_OP = 30; // le16
export const HDR_FLAGS = 32; // le32
export const HDR_BUF_ALLOC = 36; // le32
export const HDR_FWD_CNT = 40; // le32

/** enum virtio_vsock_type (virtio_vsock.h). */
export const VIRTIO_VSOCK_TYPE_STREAM = 1;
/** enum virtio_vsock_op (virtio_vsock.h). */
export const VIRTIO_VSOCK_OP_INVALID = 0;
export const VIRTIO_VSOCK_OP_REQUEST = 1;
export const VIRTIO_VSOCK_OP_RESPONSE = 2;
export const VIRTIO_VSOCK_OP_RST = 3;
export const VIRTIO_VSOCK_OP_SHUTDOWN = 4;
export const VIRTIO_VSOCK_OP_RW = 5;
export const VIRTIO_VSOCK_OP_CREDIT_UPDATE = 6;
export const VIRTIO_VSOCK_OP_CREDIT_REQUEST = 7;
/** enum virtio_vsock_shutdown (virtio_vsock.h): the sender will receive / send no more. */
export const VIRTIO_VSOCK_SHUTDOWN_RCV = 1;
export const VIRTIO_VSOCK_SHUTDOWN_SEND = 2;

/** struct virtio_vsock_event: le32 id; VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (virtio_vsock.h). */
export const VSOCK_EVENT_SIZE = 4;
export const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET = 0;

/** struct virtio_vsock_config: le64 guest_cid. */
export const VSOCK_CFG_GUEST_CID = 0;
export const VSOCK_CONFIG_SIZE = 8;

/** Well-known CIDs (linux/vm_sockets.h): the host is 2; 0, 1, 2 and U32_MAX (VMADDR_CID_ANY) are reserved. */
export const VMADDR_CID_HOST = 2;
export const MIN_GUEST_CID = 3;
export const MAX_GUEST_CID = 0xffff_fffe;

/** Queues (spec 5.10.2): rx (device to driver), tx, event. */
export const VSOCK_RXQ = 0;
export const VSOCK_TXQ = 1;
export const VSOCK_EVQ = 2;
export const VSOCK_QUEUE_SIZE = 256;

/** Bytes of guest data the device buffers per connection (buf_alloc; Firecracker's connection buffer size). */
export const VSOCK_BUF_ALLOC = 256 * 1024;
/** Send a CREDIT_UPDATE once this much was forwarded to the host since the guest last heard fwd_cnt. */
const CREDIT_UPDATE_THRESHOLD = 64 * 1024;
/** Largest host read in one go (a packet is split further to fit the guest's receive buffers). */
const MAX_READ = 64 * 1024;
/** Control packets (RST, RESPONSE, credit) waiting for guest receive buffers; beyond this they are dropped. */
const MAX_PENDING_CONTROL = 4096;
/** A `CONNECT <port>\n` line is short; a longer first line is refused. */
const MAX_CONNECT_LINE = 64;
/** Host ports handed to host-initiated connections start here (above the usual service ports). */
const FIRST_HOST_PORT = 1 << 30;

export interface VsockHeader {
  srcCid: bigint;
  dstCid: bigint;
  srcPort: number;
  dstPort: number;
  len: number;
  type: number;
  op: number;
  flags: number;
  bufAlloc: number;
  fwdCnt: number;
}

export function encodeHeader(h: VsockHeader): Uint8Array<ArrayBuffer> {
  const b = new Uint8Array(VSOCK_HDR_SIZE);
  const v = new DataView(b.buffer);
  v.setBigUint64(HDR_SRC_CID, h.srcCid, true);
  v.setBigUint64(HDR_DST_CID, h.dstCid, true);
  v.setUint32(HDR_SRC_PORT, h.srcPort, true);
  v.setUint32(HDR_DST_PORT, h.dstPort, true);
  v.setUint32(HDR_LEN, h.len, true);
  v.setUint16(HDR_TYPE, h.type, true);
  v.setUint16(HDR_OP, h.op, true);
  v.setUint32(HDR_FLAGS, h.flags, true);
  v.setUint32(HDR_BUF_ALLOC, h.bufAlloc, true);
  v.setUint32(HDR_FWD_CNT, h.fwdCnt, true);
  return b;
}

export function decodeHeader(b: Uint8Array): VsockHeader {
  const v = new DataView(b.buffer, b.byteOffset, VSOCK_HDR_SIZE);
  return {
    srcCid: v.getBigUint64(HDR_SRC_CID, true),
    dstCid: v.getBigUint64(HDR_DST_CID, true),
    srcPort: v.getUint32(HDR_SRC_PORT, true),
    dstPort: v.getUint32(HDR_DST_PORT, true),
    len: v.getUint32(HDR_LEN, true),
    type: v.getUint16(HDR_TYPE, true),
    op: v.getUint16(HDR_OP, true),
    flags: v.getUint32(HDR_FLAGS, true),
    bufAlloc: v.getUint32(HDR_BUF_ALLOC, true),
    fwdCnt: v.getUint32(HDR_FWD_CNT, true),
  };
}

const U32 = 0x1_0000_0000;
/** a - b in wrapping 32-bit arithmetic (counters are free-running le32). */
function wrapSub(a: number, b: number): number {
  return (a - b + U32) % U32;
}

export interface VsockOptions {
  /** The guest's context id (3 .. 2^32-2). */
  cid: number;
  /** Host Unix socket path (host-initiated connections); guest connections go to `${udsPath}_${port}`. */
  udsPath: string;
}

type ConnState = "host-connecting" | "guest-connecting" | "established";

class Conn {
  state: ConnState;
  closed = false;
  /** Guest's receive room: buf_alloc and fwd_cnt from its last packet. */
  peerBufAlloc = 0;
  peerFwdCnt = 0;
  /** Payload bytes sent to the guest (counted when read from the host). */
  txCnt = 0;
  /** Payload bytes received from the guest, and forwarded to the host socket. */
  rxCnt = 0;
  fwdCnt = 0;
  /** fwd_cnt last told to the guest. */
  lastFwdCntSent = 0;
  /** Bytes for the host socket; `guest` bytes count toward fwd_cnt once written (the OK line does not). */
  writeQueue: { data: Uint8Array; guest: boolean }[] = [];
  writing = false;
  /** Close the host socket once the write queue drains. */
  closeAfterWrites = false;
  creditWaiter?: () => void;
  constructor(
    readonly hostPort: number,
    readonly guestPort: number,
    state: ConnState,
    public unix: Deno.UnixConn | undefined,
    /** Bytes the host sent after its CONNECT line, to forward once established. */
    public leftover?: Uint8Array,
  ) {
    this.state = state;
  }
  key(): string {
    return `${this.hostPort}:${this.guestPort}`;
  }
  peerFree(): number {
    return this.peerBufAlloc - wrapSub(this.txCnt, this.peerFwdCnt);
  }
}

interface RxPacket {
  hdr: VsockHeader;
  data?: Uint8Array;
  conn?: Conn;
}

const STAT_NAMES = [
  "connections",
  "hostConnections",
  "guestConnections",
  "bytesToGuest",
  "bytesFromGuest",
  "rstSent",
  "malformed",
  "controlDropped",
  "creditUpdates",
] as const;
type StatName = typeof STAT_NAMES[number];

/** The kind and layout version of a virtio-vsock device's saved state. */
export const VSOCK_STATE_TYPE = "virtio-vsock";
export const VSOCK_STATE_VERSION = 1;

export class VsockDevice implements VirtioDevice, Stateful {
  readonly deviceType = VIRTIO_ID_VSOCK;
  readonly name = "vsock";
  readonly queueMaxSizes: readonly number[] = [VSOCK_QUEUE_SIZE, VSOCK_QUEUE_SIZE, VSOCK_QUEUE_SIZE];
  readonly features = VIRTIO_COMMON_FEATURES;
  readonly cid: number;
  readonly udsPath: string;
  readonly #listener: Deno.UnixListener;
  readonly #conns = new Map<string, Conn>();
  #rxPending: RxPacket[] = [];
  #controlPending = 0;
  #queues: (Virtqueue | undefined)[] = [];
  #interrupt: ActivateContext["interrupt"] | undefined;
  #active = false;
  #nextHostPort = FIRST_HOST_PORT;
  #closed = false;
  /** A transport reset is owed to the driver (after a restore) and waits for an event buffer. */
  #resetPending = false;
  readonly #log = new RateLimitedLog("virtio-vsock");
  readonly #stats: Record<StatName, number> = Object.fromEntries(STAT_NAMES.map((n) => [n, 0])) as Record<
    StatName,
    number
  >;

  constructor(opts: VsockOptions) {
    if (!Number.isInteger(opts.cid) || opts.cid < MIN_GUEST_CID || opts.cid > MAX_GUEST_CID) {
      throw new Error(`vsock: cid ${opts.cid} must be an integer in ${MIN_GUEST_CID}..${MAX_GUEST_CID}`);
    }
    this.cid = opts.cid;
    this.udsPath = opts.udsPath;
    try {
      if (Deno.lstatSync(opts.udsPath).isSocket) Deno.removeSync(opts.udsPath);
    } catch {
      // no stale socket
    }
    this.#listener = Deno.listen({ transport: "unix", path: opts.udsPath });
    this.#acceptLoop();
  }

  // ---- VirtioDevice ----

  readConfig(offset: number, data: Uint8Array): void {
    const b = new Uint8Array(VSOCK_CONFIG_SIZE);
    new DataView(b.buffer).setBigUint64(VSOCK_CFG_GUEST_CID, BigInt(this.cid), true);
    data.fill(0);
    if (offset < 0 || offset >= b.length) return;
    data.set(b.subarray(offset, offset + data.length));
  }

  writeConfig(offset: number, data: Uint8Array): void {
    this.#log.log(`driver wrote ${data.length} bytes of read-only config at ${offset}; ignored`);
  }

  activate(ctx: ActivateContext): void {
    this.#queues = ctx.queues;
    this.#interrupt = ctx.interrupt;
    this.#active = true;
    if (this.#resetPending) this.#resetPending = !this.transportReset();
  }

  reset(): void {
    this.#active = false;
    this.#queues = [];
    this.#interrupt = undefined;
    for (const c of [...this.#conns.values()]) this.#drop(c);
    this.#rxPending = [];
    this.#controlPending = 0;
    this.#resetPending = false;
  }

  /** Stop listening, remove the socket file, close every connection. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.reset();
    try {
      this.#listener.close();
    } catch {
      // already closed
    }
    try {
      Deno.removeSync(this.udsPath);
    } catch {
      // gone already
    }
  }

  stats(): Record<string, number> {
    return { ...this.#stats, open: this.#conns.size };
  }

  /**
   * Tell the driver its connections are gone (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event
   * queue), as a VMM does after restoring a snapshot. Returns whether the event was delivered.
   */
  transportReset(): boolean {
    for (const c of [...this.#conns.values()]) this.#drop(c);
    const q = this.#queues[VSOCK_EVQ];
    const chain = q?.pop();
    if (!q || !chain) return false;
    const w = chain.writer();
    let len = 0;
    try {
      w.writeU32(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET);
      len = VSOCK_EVENT_SIZE;
    } catch (e) {
      if (!(e instanceof ChainError)) throw e;
      this.#log.log(`event buffer at head ${chain.head}: ${e.message}`);
    }
    q.addUsed(chain.head, len);
    if (q.needsInterrupt()) this.#interrupt?.signalUsedQueue(VSOCK_EVQ);
    return len > 0;
  }

  queueNotify(index: number): void {
    if (!this.#active || !this.#queues[index]) return;
    if (index === VSOCK_TXQ) this.#processTx();
    else if (index === VSOCK_RXQ) this.#flushRx();
    // The event queue only holds buffers for transportReset(); one may be owed since a restore.
    else if (index === VSOCK_EVQ && this.#resetPending) this.#resetPending = !this.transportReset();
  }

  // ---- Guest to device ----

  #processTx(): void {
    const q = this.#queues[VSOCK_TXQ]!;
    let used = false;
    for (;;) {
      const chain = q.pop();
      if (!chain) break;
      try {
        this.#packet(chain);
      } catch (e) {
        if (!(e instanceof ChainError)) throw e;
        this.#stats.malformed++;
        this.#log.log(`tx chain at head ${chain.head}: ${e.message}`);
      }
      q.addUsed(chain.head, 0);
      used = true;
    }
    if (used && q.needsInterrupt()) this.#interrupt?.signalUsedQueue(VSOCK_TXQ);
    this.#flushRx();
  }

  /** Handle one packet from the guest. */
  #packet(chain: DescriptorChain): void {
    if (chain.readableLength < VSOCK_HDR_SIZE) {
      this.#stats.malformed++;
      this.#log.log(`tx packet of ${chain.readableLength} bytes has no header; dropped`);
      return;
    }
    const r = chain.reader();
    const h = decodeHeader(r.read(VSOCK_HDR_SIZE));
    const bad = (why: string) => {
      this.#stats.malformed++;
      this.#log.log(`${why}; RST`);
      if (h.op !== VIRTIO_VSOCK_OP_RST) this.#sendRst(h.dstPort, h.srcPort);
      const c = this.#conns.get(`${h.dstPort}:${h.srcPort}`);
      if (c) this.#drop(c);
    };
    if (h.type !== VIRTIO_VSOCK_TYPE_STREAM) return bad(`packet of type ${h.type} (only stream)`);
    if (h.srcCid !== BigInt(this.cid)) return bad(`packet from cid ${h.srcCid}, not the guest's ${this.cid}`);
    if (h.dstCid !== BigInt(VMADDR_CID_HOST)) return bad(`packet to cid ${h.dstCid}; only the host (2) is here`);
    if (h.op !== VIRTIO_VSOCK_OP_RW && h.len !== 0) return bad(`op ${h.op} with a ${h.len}-byte payload`);
    if (h.len > r.remaining) return bad(`RW of ${h.len} bytes with ${r.remaining} bytes in the chain`);

    const conn = this.#conns.get(`${h.dstPort}:${h.srcPort}`);
    if (h.op === VIRTIO_VSOCK_OP_REQUEST) {
      if (conn) return bad(`REQUEST for existing connection ${h.dstPort}:${h.srcPort}`);
      this.#guestConnect(h);
      return;
    }
    if (!conn) {
      // RST answers everything for a connection that does not exist, except an RST (spec 5.10.6.6).
      if (h.op !== VIRTIO_VSOCK_OP_RST) this.#sendRst(h.dstPort, h.srcPort);
      return;
    }
    conn.peerBufAlloc = h.bufAlloc;
    conn.peerFwdCnt = h.fwdCnt;
    switch (h.op) {
      case VIRTIO_VSOCK_OP_RESPONSE:
        if (conn.state !== "host-connecting") return bad(`RESPONSE on ${conn.state} connection ${conn.key()}`);
        conn.state = "established";
        this.#hostWrite(conn, new TextEncoder().encode(`OK ${conn.hostPort}\n`), false);
        if (conn.leftover?.length) this.#toGuest(conn, conn.leftover);
        conn.leftover = undefined;
        this.#readLoop(conn);
        break;
      case VIRTIO_VSOCK_OP_RW: {
        if (conn.state !== "established") return bad(`RW on ${conn.state} connection ${conn.key()}`);
        if (h.len === 0) break;
        const inFlight = wrapSub(conn.rxCnt, conn.fwdCnt) + h.len;
        if (inFlight > VSOCK_BUF_ALLOC) {
          return bad(`guest sent ${inFlight} bytes unforwarded on ${conn.key()}, beyond buf_alloc ${VSOCK_BUF_ALLOC}`);
        }
        const data = r.read(h.len);
        conn.rxCnt = (conn.rxCnt + h.len) % U32;
        this.#stats.bytesFromGuest += h.len;
        this.#hostWrite(conn, data, true);
        break;
      }
      case VIRTIO_VSOCK_OP_CREDIT_UPDATE:
        break;
      case VIRTIO_VSOCK_OP_CREDIT_REQUEST:
        this.#sendControl(conn, VIRTIO_VSOCK_OP_CREDIT_UPDATE);
        break;
      case VIRTIO_VSOCK_OP_SHUTDOWN: {
        const both = VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND;
        if ((h.flags & both) === both) {
          // The guest is closing: acknowledge with RST once its data reached the host.
          this.#sendRst(conn.hostPort, conn.guestPort);
          this.#conns.delete(conn.key());
          conn.closed = true;
          conn.creditWaiter?.();
          conn.closeAfterWrites = true;
          this.#pumpWrites(conn);
        } else if (h.flags & VIRTIO_VSOCK_SHUTDOWN_SEND) {
          conn.closeAfterWrites = true; // half-close: the host reads EOF after the data
          this.#pumpWrites(conn);
        }
        break;
      }
      case VIRTIO_VSOCK_OP_RST:
        this.#drop(conn);
        break;
      default:
        return bad(`unknown op ${h.op} on ${conn.key()}`);
    }
    // The guest's room may have grown.
    conn.creditWaiter?.();
  }

  /** A guest REQUEST: connect to the host listener for that port. */
  #guestConnect(h: VsockHeader): void {
    const conn = new Conn(h.dstPort, h.srcPort, "guest-connecting", undefined);
    conn.peerBufAlloc = h.bufAlloc;
    conn.peerFwdCnt = h.fwdCnt;
    this.#conns.set(conn.key(), conn);
    this.#stats.connections++;
    this.#stats.guestConnections++;
    const path = `${this.udsPath}_${h.dstPort}`;
    Deno.connect({ transport: "unix", path }).then(
      (unix) => {
        if (conn.closed) {
          unix.close();
          return;
        }
        conn.unix = unix;
        conn.state = "established";
        this.#sendControl(conn, VIRTIO_VSOCK_OP_RESPONSE);
        this.#flushRx();
        this.#readLoop(conn);
      },
      () => {
        if (conn.closed) return;
        this.#conns.delete(conn.key());
        conn.closed = true;
        this.#sendRst(conn.hostPort, conn.guestPort);
        this.#flushRx();
      },
    );
  }

  // ---- Host side ----

  async #acceptLoop(): Promise<void> {
    for (;;) {
      let unix: Deno.UnixConn;
      try {
        unix = await this.#listener.accept();
      } catch {
        return; // listener closed
      }
      this.#hostConnect(unix).catch((e) => this.#log.log(`host connection: ${(e as Error).message}`));
    }
  }

  /** A host program connected to udsPath: read `CONNECT <port>\n`, then ask the guest. */
  async #hostConnect(unix: Deno.UnixConn): Promise<void> {
    const buf = new Uint8Array(MAX_CONNECT_LINE);
    let have = 0;
    let nl = -1;
    while (nl < 0 && have < buf.length) {
      const n = await unix.read(buf.subarray(have)).catch(() => null);
      if (n === null) {
        unix.close();
        return;
      }
      have += n;
      nl = buf.subarray(0, have).indexOf(0x0a);
    }
    const line = new TextDecoder().decode(buf.subarray(0, Math.max(nl, 0)));
    const m = /^CONNECT (\d{1,10})$/.exec(line.replace(/\r$/, ""));
    const port = m ? Number(m[1]) : NaN;
    if (nl < 0 || !(port < U32) || !this.#active || this.#closed) {
      this.#log.log(
        !this.#active ? "host connection while the guest driver is not ready; closed" : `bad host request "${line}"`,
      );
      unix.close();
      return;
    }
    let hostPort = this.#nextHostPort;
    while ([...this.#conns.values()].some((c) => c.hostPort === hostPort)) hostPort = (hostPort + 1) % U32;
    this.#nextHostPort = (hostPort + 1) % U32 || FIRST_HOST_PORT;
    const conn = new Conn(hostPort, port, "host-connecting", unix, buf.slice(nl + 1, have));
    this.#conns.set(conn.key(), conn);
    this.#stats.connections++;
    this.#stats.hostConnections++;
    this.#sendControl(conn, VIRTIO_VSOCK_OP_REQUEST);
    this.#flushRx();
  }

  /** Read from the host socket as far as the guest has room, and queue RW packets. */
  async #readLoop(conn: Conn): Promise<void> {
    while (!conn.closed) {
      const free = conn.peerFree();
      if (free <= 0) {
        await new Promise<void>((resolve) => conn.creditWaiter = resolve);
        conn.creditWaiter = undefined;
        // Ask for credit only if the guest may not know we are waiting (spec 5.10.6.3).
        continue;
      }
      const buf = new Uint8Array(Math.min(free, MAX_READ));
      let n: number | null;
      try {
        n = await conn.unix!.read(buf);
      } catch {
        n = null;
      }
      if (conn.closed) return;
      if (n === null) {
        // The host closed: tell the guest neither direction carries more data.
        this.#sendControl(conn, VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND);
        this.#flushRx();
        return;
      }
      this.#toGuest(conn, buf.subarray(0, n));
    }
  }

  #toGuest(conn: Conn, data: Uint8Array): void {
    conn.txCnt = (conn.txCnt + data.length) % U32;
    this.#rxPending.push({ hdr: this.#header(conn, VIRTIO_VSOCK_OP_RW, data.length), data, conn });
    this.#flushRx();
  }

  /** Queue bytes for the host socket. */
  #hostWrite(conn: Conn, data: Uint8Array, guest: boolean): void {
    conn.writeQueue.push({ data, guest });
    this.#pumpWrites(conn);
  }

  async #pumpWrites(conn: Conn): Promise<void> {
    if (conn.writing) return;
    conn.writing = true;
    try {
      while (conn.writeQueue.length > 0 && conn.unix) {
        const head = conn.writeQueue[0];
        let n: number;
        try {
          n = await conn.unix.write(head.data);
        } catch (e) {
          if (!conn.closed) {
            this.#log.log(`host socket of ${conn.key()}: ${(e as Error).message}; RST`);
            this.#sendRst(conn.hostPort, conn.guestPort);
            this.#drop(conn);
            this.#flushRx();
          }
          return;
        }
        if (n === head.data.length) conn.writeQueue.shift();
        else head.data = head.data.subarray(n);
        if (!head.guest || conn.closed) continue;
        conn.fwdCnt = (conn.fwdCnt + n) % U32;
        if (wrapSub(conn.fwdCnt, conn.lastFwdCntSent) >= CREDIT_UPDATE_THRESHOLD) {
          this.#stats.creditUpdates++;
          this.#sendControl(conn, VIRTIO_VSOCK_OP_CREDIT_UPDATE);
          this.#flushRx();
        }
      }
      if (conn.closeAfterWrites && conn.unix) {
        if (conn.closed) this.#closeUnix(conn);
        else await conn.unix.closeWrite().catch(() => {});
      }
    } finally {
      conn.writing = false;
    }
  }

  /** Forget a connection and close its host socket. */
  #drop(conn: Conn): void {
    conn.closed = true;
    conn.writeQueue = [];
    this.#conns.delete(conn.key());
    conn.creditWaiter?.();
    this.#closeUnix(conn);
  }

  #closeUnix(conn: Conn): void {
    try {
      conn.unix?.close();
    } catch {
      // already closed
    }
    conn.unix = undefined;
  }

  // ---- Device to guest ----

  #header(conn: Conn, op: number, len = 0, flags = 0): VsockHeader {
    return {
      srcCid: BigInt(VMADDR_CID_HOST),
      dstCid: BigInt(this.cid),
      srcPort: conn.hostPort,
      dstPort: conn.guestPort,
      len,
      type: VIRTIO_VSOCK_TYPE_STREAM,
      op,
      flags,
      bufAlloc: VSOCK_BUF_ALLOC,
      fwdCnt: conn.fwdCnt,
    };
  }

  #sendControl(conn: Conn, op: number, flags = 0): void {
    this.#queueControl({ hdr: this.#header(conn, op, 0, flags), conn });
  }

  #sendRst(hostPort: number, guestPort: number): void {
    this.#stats.rstSent++;
    this.#queueControl({
      hdr: {
        srcCid: BigInt(VMADDR_CID_HOST),
        dstCid: BigInt(this.cid),
        srcPort: hostPort,
        dstPort: guestPort,
        len: 0,
        type: VIRTIO_VSOCK_TYPE_STREAM,
        op: VIRTIO_VSOCK_OP_RST,
        flags: 0,
        bufAlloc: 0,
        fwdCnt: 0,
      },
    });
  }

  #queueControl(p: RxPacket): void {
    if (this.#controlPending >= MAX_PENDING_CONTROL) {
      this.#stats.controlDropped++;
      this.#log.log(`${MAX_PENDING_CONTROL} control packets wait for receive buffers; op ${p.hdr.op} dropped`);
      return;
    }
    this.#controlPending++;
    this.#rxPending.push(p);
  }

  /** Move pending packets into the guest's receive buffers (a data packet may span several). */
  #flushRx(): void {
    const q = this.#queues[VSOCK_RXQ];
    if (!this.#active || !q) return;
    let used = false;
    while (this.#rxPending.length > 0) {
      const p = this.#rxPending[0];
      if (p.conn?.closed && p.hdr.op !== VIRTIO_VSOCK_OP_RST && p.hdr.op !== VIRTIO_VSOCK_OP_SHUTDOWN) {
        this.#rxPending.shift(); // its connection is gone
        if (!p.data) this.#controlPending--;
        continue;
      }
      const chain = q.pop();
      if (!chain) break;
      used = true;
      const w = chain.writer();
      if (w.remaining < VSOCK_HDR_SIZE) {
        this.#stats.malformed++;
        this.#log.log(`rx buffer at head ${chain.head} holds ${w.remaining} bytes, less than a header`);
        q.addUsed(chain.head, 0);
        continue;
      }
      const data = p.data;
      const n = data ? Math.min(data.length, w.remaining - VSOCK_HDR_SIZE) : 0;
      // fwd_cnt is as fresh as it can be when the packet leaves.
      const hdr = { ...p.hdr, len: n };
      if (p.conn && hdr.op !== VIRTIO_VSOCK_OP_RST) {
        hdr.fwdCnt = p.conn.fwdCnt;
        p.conn.lastFwdCntSent = p.conn.fwdCnt;
      }
      try {
        w.write(encodeHeader(hdr));
        if (data && n > 0) w.write(data.subarray(0, n));
      } catch (e) {
        if (!(e instanceof ChainError)) throw e;
        this.#log.log(`rx buffer at head ${chain.head}: ${e.message}`);
      }
      q.addUsed(chain.head, w.bytesWritten);
      if (data && n < data.length) {
        p.data = data.subarray(n);
      } else {
        this.#rxPending.shift();
        if (!data) this.#controlPending--;
      }
      if (data) this.#stats.bytesToGuest += n;
    }
    if (used && q.needsInterrupt()) this.#interrupt?.signalUsedQueue(VSOCK_RXQ);
  }

  // ---- Device state (core/state.ts) ----

  /** False while a packet is taken from a queue and not yet returned. */
  quiescent(): boolean {
    return queuesQuiescent(this.#queues);
  }

  /**
   * The guest's CID, the next host port and the counters. Connections are host sockets and cannot be
   * carried over: a restored device has none and tells the driver with a transport reset event.
   */
  saveState(): DeviceState {
    return {
      type: VSOCK_STATE_TYPE,
      version: VSOCK_STATE_VERSION,
      data: {
        features: featuresField(this.features),
        cid: this.cid,
        nextHostPort: this.#nextHostPort,
        stats: { ...this.#stats },
      },
    };
  }

  /**
   * Take a saved state into a device not yet activated. When the transport then activates it, the
   * driver gets VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (at once, or at its next event-queue kick when no
   * event buffer is posted): Linux's virtio_transport then resets every socket it had and reads the
   * guest CID again, as after a Firecracker snapshot restore (so a clone may serve a new CID).
   */
  restoreState(state: DeviceState): void {
    const d = stateRecord(stateData(state, VSOCK_STATE_TYPE, VSOCK_STATE_VERSION), "virtio-vsock state");
    const what = `virtio-vsock ${this.udsPath}`;
    if (this.#active) throw new StateError(`${what}: restore into a device a driver has activated`);
    const features = stateString(d.features, `${what} features`);
    if (features !== featuresField(this.features)) {
      throw new StateError(`${what}: saved features ${features}, this device offers ${featuresField(this.features)}`);
    }
    // A saved CID other than this device's is a clone given its own identity: the reset event below makes
    // the driver read the CID from the config again.
    stateInteger(d.cid, `${what} cid`, MIN_GUEST_CID, MAX_GUEST_CID);
    const nextHostPort = stateInteger(d.nextHostPort, `${what} nextHostPort`, 0, U32 - 1);
    const stats = stateCounters(d.stats, STAT_NAMES, what);
    this.#nextHostPort = nextHostPort;
    Object.assign(this.#stats, stats);
    this.#resetPending = true;
  }
}
