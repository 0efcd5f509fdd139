// virtio-net (virtio 1.2 spec, section 5.1; Linux include/uapi/linux/virtio_net.h) on a host tap
// device opened with IFF_VNET_HDR, so the tap speaks the same 12-byte virtio_net_hdr_v1 the
// driver puts in front of each frame and neither side has to translate headers.
//
// Queues: 0 receive, 1 transmit (one pair; no control queue, no multiqueue).
// TX (queueNotify(1)): each chain's readable bytes (header + frame) go to the tap in one write().
// RX: an async loop polls the tap (pollAsync on a helper thread), reads frames without blocking
// and copies each into one receive chain (header + frame). With no receive buffer, the frame in
// hand is kept and the loop waits for the driver's next rx kick; meanwhile further frames queue
// in the tap (the kernel drops them when its queue is full).
//
// Offloads (correctness first): offered are CSUM / GUEST_CSUM (partial checksums) and
// HOST_TSO4/6 / GUEST_TSO4/6 (TCP segmentation). Frames the driver sends carry its header to the
// tap, which understands the same header (the kernel validates it). Frames the tap gives us only
// use the offloads the driver accepted: TUNSETOFFLOAD is set from the acked GUEST_* bits at
// activation (TUN_F_CSUM for GUEST_CSUM, TUN_F_TSO4/6 for GUEST_TSO4/6 on top of it) and cleared
// at reset. No MRG_RXBUF: a frame always fits one chain (Linux posts 64 KiB "big packet" chains
// when it accepts GUEST_TSO without MRG_RXBUF). `offloads: false` offers none of them.

import {
  type ActivateContext,
  checkSavedIdentity,
  featuresField,
  queuesQuiescent,
  readConfigSpace,
  serveQueue,
  stateCounters,
  VIRTIO_COMMON_FEATURES,
  VIRTIO_ID_NET,
  type VirtioDevice,
  type VirtioInterrupt,
} from "./device.ts";
import { ChainError, type DescriptorChain, type Virtqueue } from "./queue.ts";
import { RateLimitedLog } from "../../core/log.ts";
import { GuestMemoryError } from "../../core/memory.ts";
import { type DeviceState, stateBytes, stateData, StateError, type Stateful, stateRecord } from "../../core/state.ts";
import {
  closeFd,
  eventfd,
  eventfdRead,
  eventfdWrite,
  pollAsync,
  POLLERR,
  POLLHUP,
  POLLIN,
  POLLNVAL,
} from "../../ffi/libc.ts";
import {
  adoptTapFd,
  ETH_ALEN,
  openTap,
  parseMac,
  readNonBlocking,
  setTapOffload,
  type TapHandle,
  TapIoError,
  TUN_F_CSUM,
  TUN_F_TSO4,
  TUN_F_TSO6,
  writeFrame,
} from "../../ffi/tun.ts";

// ---- Feature bits (virtio_net.h) ----
export const VIRTIO_NET_F_CSUM = 1n << 0n;
export const VIRTIO_NET_F_GUEST_CSUM = 1n << 1n;
export const VIRTIO_NET_F_MAC = 1n << 5n;
export const VIRTIO_NET_F_GUEST_TSO4 = 1n << 7n;
export const VIRTIO_NET_F_GUEST_TSO6 = 1n << 8n;
export const VIRTIO_NET_F_GUEST_ECN = 1n << 9n;
export const VIRTIO_NET_F_HOST_TSO4 = 1n << 11n;
export const VIRTIO_NET_F_HOST_TSO6 = 1n << 12n;
export const VIRTIO_NET_F_HOST_ECN = 1n << 13n;
export const VIRTIO_NET_F_MRG_RXBUF = 1n << 15n;
export const VIRTIO_NET_F_STATUS = 1n << 16n;
export const VIRTIO_NET_F_CTRL_VQ = 1n << 17n;
export const VIRTIO_NET_F_MQ = 1n << 22n;
/** The offload features offered unless `offloads: false`. */
export const NET_OFFLOAD_FEATURES = VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_HOST_TSO4 |
  VIRTIO_NET_F_HOST_TSO6 | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6;

/** virtio_net_config.status bits (virtio_net.h VIRTIO_NET_S_*). */
export const VIRTIO_NET_S_LINK_UP = 1;

// ---- struct virtio_net_config (virtio_net.h, packed) ----
export const NET_CFG_MAC = 0; // u8 mac[6]
export const NET_CFG_STATUS = 6; // le16
export const NET_CFG_MAX_VQ_PAIRS = 8; // le16
/** Bytes of config served: mac, status, max_virtqueue_pairs (mtu and later fields need features not offered). */
export const NET_CONFIG_SIZE = 10;

// ---- struct virtio_net_hdr_v1 (virtio_net.h; virtio 1.2 section 5.1.6) ----
/** With VIRTIO_F_VERSION_1 the header always has num_buffers: 12 bytes. */
export const VIRTIO_NET_HDR_SIZE = 12;
export const NET_HDR_FLAGS = 0; // u8
export const NET_HDR_GSO_TYPE = 1; // u8
export const NET_HDR_HDR_LEN = 2; // le16
export const NET_HDR_GSO_SIZE = 4; // le16
export const NET_HDR_CSUM_START = 6; // le16
export const NET_HDR_CSUM_OFFSET = 8; // le16
export const NET_HDR_NUM_BUFFERS = 10; // le16
/** Header flags and GSO types (virtio_net.h). */
export const VIRTIO_NET_HDR_F_NEEDS_CSUM = 1;
export const VIRTIO_NET_HDR_F_DATA_VALID = 2;
export const VIRTIO_NET_HDR_GSO_NONE = 0;
export const VIRTIO_NET_HDR_GSO_TCPV4 = 1;
export const VIRTIO_NET_HDR_GSO_UDP = 3;
export const VIRTIO_NET_HDR_GSO_TCPV6 = 4;
export const VIRTIO_NET_HDR_GSO_ECN = 0x80;

export const NET_RX_QUEUE = 0;
export const NET_TX_QUEUE = 1;
/** 256 entries per queue, like crosvm and Firecracker. */
export const NET_QUEUE_SIZE = 256;

/**
 * Largest frame after the header: a 64 KiB GSO packet plus an Ethernet header and a VLAN tag
 * (Linux virtio_net.c sizes its big receive buffers for 65535 + ETH_HLEN + VLAN_HLEN).
 */
const ETH_HLEN = 14; // linux/if_ether.h
const VLAN_HLEN = 4; // linux/if_vlan.h
export const NET_MAX_FRAME = 65535 + ETH_HLEN + VLAN_HLEN;
/** Frames received per drain before the driver is interrupted and the event loop gets a turn. */
const RX_BATCH = 64;

const STAT_NAMES = ["txPackets", "txBytes", "txDrops", "rxPackets", "rxBytes", "rxDrops", "rxStalls"] as const;
type StatName = typeof STAT_NAMES[number];

export interface NetOptions {
  /** Open (or create) this tap interface. */
  tapName?: string;
  /** Or take over an open tap fd (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR); the device closes it. */
  tapFd?: number;
  /** Guest MAC "aa:bb:cc:dd:ee:ff"; a random locally administered one when absent. */
  mac?: string;
  /** Offer checksum and TSO offloads (default true). */
  offloads?: boolean;
}

/** A random unicast, locally administered MAC (IEEE 802: bit 0 of byte 0 = group, bit 1 = local). */
export function randomLocalMac(): Uint8Array {
  const m = crypto.getRandomValues(new Uint8Array(ETH_ALEN));
  m[0] = (m[0] & ~0x01 & 0xff) | 0x02;
  return m;
}

export function formatMac(m: Uint8Array): string {
  return [...m].map((b) => b.toString(16).padStart(2, "0")).join(":");
}

/** The kind and layout version of a virtio-net device's saved state. */
export const NET_STATE_TYPE = "virtio-net";
export const NET_STATE_VERSION = 1;

export class NetDevice implements VirtioDevice, Stateful {
  readonly deviceType = VIRTIO_ID_NET;
  readonly name = "net";
  readonly queueMaxSizes: readonly number[] = [NET_QUEUE_SIZE, NET_QUEUE_SIZE];
  readonly features: bigint;
  readonly mac: Uint8Array;
  /** The tap interface's name. */
  readonly tapName: string;
  readonly #tap: TapHandle;
  readonly #waker: number;
  #closed = false;
  #rx: Virtqueue | undefined;
  #tx: Virtqueue | undefined;
  #interrupt: VirtioInterrupt | undefined;
  #acked = 0n;
  /** Frame in hand (header + frame in #rxBuf) waiting for a receive buffer; 0 when none. */
  #pendingLen = 0;
  /** No receive buffer: wait for the driver's rx kick before reading the tap again. */
  #rxStalled = false;
  /** The tap reported an error/hang-up: stop polling it. */
  #tapDead = false;
  readonly #rxBuf = new Uint8Array(VIRTIO_NET_HDR_SIZE + NET_MAX_FRAME);
  #wake: PromiseWithResolvers<void> | undefined;
  readonly #done: Promise<void>;
  readonly #log: RateLimitedLog;
  readonly #stallLog: RateLimitedLog;
  readonly #stats: Record<StatName, number> = Object.fromEntries(STAT_NAMES.map((n) => [n, 0])) as Record<
    StatName,
    number
  >;

  constructor(opts: NetOptions) {
    if ((opts.tapName === undefined) === (opts.tapFd === undefined)) {
      throw new Error("net: give exactly one of tapName and tapFd");
    }
    this.mac = opts.mac !== undefined ? parseMac(opts.mac) : randomLocalMac();
    if (this.mac[0] & 0x01) throw new Error(`net: ${opts.mac} is a multicast MAC address`);
    this.#tap = opts.tapFd !== undefined
      ? adoptTapFd(opts.tapFd, VIRTIO_NET_HDR_SIZE)
      : openTap(opts.tapName!, VIRTIO_NET_HDR_SIZE);
    this.tapName = this.#tap.name;
    try {
      this.#waker = eventfd();
    } catch (e) {
      closeFd(this.#tap.fd);
      throw e;
    }
    this.features = VIRTIO_COMMON_FEATURES | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS |
      ((opts.offloads ?? true) ? NET_OFFLOAD_FEATURES : 0n);
    this.#log = new RateLimitedLog(`virtio-net ${this.tapName}`);
    this.#stallLog = new RateLimitedLog(`virtio-net ${this.tapName} rx`, 1, 1000);
    this.#done = this.#rxLoop();
  }

  /** Resolves once close() has stopped the receive loop and closed the tap. */
  get done(): Promise<void> {
    return this.#done;
  }

  #config(): Uint8Array {
    const b = new Uint8Array(NET_CONFIG_SIZE);
    const v = new DataView(b.buffer);
    b.set(this.mac, NET_CFG_MAC);
    v.setUint16(NET_CFG_STATUS, VIRTIO_NET_S_LINK_UP, true);
    v.setUint16(NET_CFG_MAX_VQ_PAIRS, 1, true);
    return b;
  }

  readConfig(offset: number, data: Uint8Array): void {
    readConfigSpace(this.#config(), offset, data);
  }

  writeConfig(offset: number, data: Uint8Array): void {
    // The MAC is read-only for VERSION_1 drivers (CTRL_MAC_ADDR is not offered); status is read-only.
    this.#log.log(`driver wrote ${data.length} bytes of read-only config at ${offset}; ignored`);
  }

  activate(ctx: ActivateContext): void {
    this.#rx = ctx.queues[NET_RX_QUEUE];
    this.#tx = ctx.queues[NET_TX_QUEUE];
    this.#interrupt = ctx.interrupt;
    this.#acked = ctx.ackedFeatures;
    this.#rxStalled = false;
    try {
      setTapOffload(this.#tap.fd, this.#tunOffloads());
    } catch (e) {
      this.#log.log(`cannot set tap offloads: ${(e as Error).message}`);
    }
    // A frame held over (from before a restore) goes to the guest first.
    if (this.#pendingLen > 0) this.#drainRx();
    this.#wakeLoop();
    // Frames the driver queued before DRIVER_OK.
    if (this.#tx) this.queueNotify(NET_TX_QUEUE);
  }

  /** TUN_F_* flags matching the receive offloads the driver accepted. */
  #tunOffloads(): number {
    const a = this.#acked;
    if (!(a & VIRTIO_NET_F_GUEST_CSUM)) return 0;
    let f = TUN_F_CSUM;
    if (a & VIRTIO_NET_F_GUEST_TSO4) f |= TUN_F_TSO4;
    if (a & VIRTIO_NET_F_GUEST_TSO6) f |= TUN_F_TSO6;
    return f;
  }

  reset(): void {
    this.#rx = undefined;
    this.#tx = undefined;
    this.#interrupt = undefined;
    this.#acked = 0n;
    this.#pendingLen = 0;
    this.#rxStalled = false;
    if (!this.#closed) {
      try {
        setTapOffload(this.#tap.fd, 0);
      } catch {
        // the tap is going away; nothing to undo
      }
    }
  }

  close(): void {
    if (this.#closed) return;
    this.reset();
    this.#closed = true;
    // The loop owns the fds: it closes them once its poll has returned.
    eventfdWrite(this.#waker);
    this.#wakeLoop();
  }

  stats(): Record<string, number> {
    return { ...this.#stats };
  }

  queueNotify(index: number): void {
    if (this.#closed) return;
    if (index === NET_TX_QUEUE) this.#serveTx();
    else if (index === NET_RX_QUEUE && this.#rx) {
      if (this.#rxStalled) {
        this.#rxStalled = false;
        this.#drainRx();
      }
      this.#wakeLoop();
    }
  }

  // ---- Transmit ----

  #serveTx(): void {
    const q = this.#tx;
    if (!q) return;
    // Every TX used entry is added here and followed by needsInterrupt, so with nothing used it is false.
    serveQueue(q, NET_TX_QUEUE, this.#interrupt, (chain) => {
      this.#transmit(chain);
      return 0;
    });
  }

  /** Send one chain's header + frame to the tap; a bad chain is dropped with one log line. */
  #transmit(chain: DescriptorChain): void {
    const drop = (why: string) => {
      this.#stats.txDrops++;
      this.#log.log(`tx chain at head ${chain.head}: ${why}; dropped`);
    };
    const len = chain.readableLength;
    if (chain.writableLength > 0) return drop("has device-writable buffers");
    if (len <= VIRTIO_NET_HDR_SIZE) return drop(`${len} bytes is no header and frame`);
    if (len > VIRTIO_NET_HDR_SIZE + NET_MAX_FRAME) return drop(`${len} bytes is larger than any frame`);
    let buf: Uint8Array<ArrayBuffer>;
    try {
      buf = chain.reader().read(len);
    } catch (e) {
      if (e instanceof ChainError || e instanceof GuestMemoryError) return drop(e.message);
      throw e;
    }
    const why = this.#checkTxHeader(buf);
    if (why) return drop(why);
    try {
      writeFrame(this.#tap.fd, buf);
    } catch (e) {
      if (e instanceof TapIoError) return drop(`${e.message} (${len} bytes)`);
      throw e;
    }
    this.#stats.txPackets++;
    this.#stats.txBytes += len - VIRTIO_NET_HDR_SIZE;
  }

  /** Why a transmit header asks for something not negotiated, or undefined when it is fine. */
  #checkTxHeader(buf: Uint8Array): string | undefined {
    const flags = buf[NET_HDR_FLAGS];
    const gso = buf[NET_HDR_GSO_TYPE];
    if (flags & ~VIRTIO_NET_HDR_F_NEEDS_CSUM) return `header flags 0x${flags.toString(16)}`;
    if ((flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) && !(this.#acked & VIRTIO_NET_F_CSUM)) {
      return "NEEDS_CSUM without VIRTIO_NET_F_CSUM";
    }
    switch (gso) {
      case VIRTIO_NET_HDR_GSO_NONE:
        return undefined;
      case VIRTIO_NET_HDR_GSO_TCPV4:
        return this.#acked & VIRTIO_NET_F_HOST_TSO4 ? undefined : "TSO4 frame without VIRTIO_NET_F_HOST_TSO4";
      case VIRTIO_NET_HDR_GSO_TCPV6:
        return this.#acked & VIRTIO_NET_F_HOST_TSO6 ? undefined : "TSO6 frame without VIRTIO_NET_F_HOST_TSO6";
      default:
        return `GSO type 0x${gso.toString(16)} not negotiated`;
    }
  }

  // ---- Receive ----

  #wakeLoop(): void {
    const w = this.#wake;
    this.#wake = undefined;
    w?.resolve();
  }

  #sleep(): Promise<void> {
    this.#wake ??= Promise.withResolvers<void>();
    return this.#wake.promise;
  }

  async #rxLoop(): Promise<void> {
    const tapFd = this.#tap.fd;
    try {
      while (!this.#closed) {
        if (!this.#rx || this.#rxStalled || this.#tapDead) {
          await this.#sleep();
          continue;
        }
        const rev = await pollAsync([tapFd, this.#waker], POLLIN, -1);
        if (this.#closed) break;
        if (rev[1] & POLLIN) eventfdRead(this.#waker);
        if (rev[0] & POLLIN) this.#drainRx();
        else if (rev[0] & (POLLERR | POLLHUP | POLLNVAL)) {
          this.#tapDead = true;
          this.#log.log(`tap reported poll events 0x${rev[0].toString(16)}; receive stopped`);
        }
      }
    } finally {
      closeFd(tapFd);
      closeFd(this.#waker);
    }
  }

  /** Move frames from the tap into receive chains until the tap is empty, buffers run out or a batch is done. */
  #drainRx(): void {
    const q = this.#rx;
    if (!q) return;
    let used = false;
    for (let n = 0; n < RX_BATCH; n++) {
      if (this.#pendingLen === 0) {
        let got: number;
        try {
          got = readNonBlocking(this.#tap.fd, this.#rxBuf);
        } catch (e) {
          if (!(e instanceof TapIoError)) throw e;
          this.#log.log(e.message);
          break;
        }
        if (got <= 0) break; // nothing ready (or EOF)
        if (got <= VIRTIO_NET_HDR_SIZE) {
          this.#stats.rxDrops++;
          continue;
        }
        this.#pendingLen = got;
      }
      let chain = q.pop();
      // Ask for a kick, then look once more: the driver may have added buffers meanwhile.
      if (!chain && q.enableNotification()) chain = q.pop();
      if (!chain) {
        this.#rxStalled = true;
        this.#stats.rxStalls++;
        this.#stallLog.log("no receive buffers; holding a frame until the driver adds some");
        break;
      }
      q.addUsed(chain.head, this.#receive(chain));
      used = true;
    }
    if (used && q.needsInterrupt()) this.#interrupt?.signalUsedQueue(NET_RX_QUEUE);
  }

  /** Copy the frame in hand into `chain`; returns the used length (0 when it was dropped). */
  #receive(chain: DescriptorChain): number {
    const len = this.#pendingLen;
    this.#pendingLen = 0;
    const drop = (why: string) => {
      this.#stats.rxDrops++;
      this.#log.log(`rx chain at head ${chain.head}: ${why}; frame of ${len} bytes dropped`);
      return 0;
    };
    if (chain.readableLength > 0) return drop("has device-readable buffers");
    if (chain.writableLength < len) return drop(`${chain.writableLength} bytes of buffer`);
    // The tap fills the 10-byte virtio_net_hdr and skips num_buffers: one buffer per frame (no MRG_RXBUF).
    new DataView(this.#rxBuf.buffer).setUint16(NET_HDR_NUM_BUFFERS, 1, true);
    try {
      chain.writer().write(this.#rxBuf.subarray(0, len));
    } catch (e) {
      if (e instanceof ChainError || e instanceof GuestMemoryError) return drop(e.message);
      throw e;
    }
    this.#stats.rxPackets++;
    this.#stats.rxBytes += len - VIRTIO_NET_HDR_SIZE;
    return len;
  }

  // ---- Device state (core/state.ts) ----

  /** False while a chain is taken from a queue and not yet returned. */
  quiescent(): boolean {
    return queuesQuiescent([this.#rx, this.#tx]);
  }

  /**
   * The configuration space (the MAC, random when none was configured), the feature offer, the
   * received frame waiting for a guest buffer and the counters. The tap is the host's and stays.
   */
  saveState(): DeviceState {
    return {
      type: NET_STATE_TYPE,
      version: NET_STATE_VERSION,
      data: {
        features: featuresField(this.features),
        config: this.#config(),
        pendingFrame: this.#rxBuf.slice(0, this.#pendingLen),
        stats: { ...this.#stats },
      },
    };
  }

  restoreState(state: DeviceState): void {
    const d = stateRecord(stateData(state, NET_STATE_TYPE, NET_STATE_VERSION), "virtio-net state");
    const what = `virtio-net ${this.tapName}`;
    if (this.#rx || this.#tx) throw new StateError(`${what}: restore into a device a driver has activated`);
    const cfg = stateBytes(d.config, `${what} config`, NET_CONFIG_SIZE);
    // The MAC is the guest's (a random one was drawn when none was configured); the rest must match.
    const mine = this.#config();
    mine.set(cfg.subarray(NET_CFG_MAC, NET_CFG_MAC + ETH_ALEN), NET_CFG_MAC);
    checkSavedIdentity(what, d, this.features, mine);
    if (cfg[NET_CFG_MAC] & 0x01) {
      throw new StateError(`${what}: saved MAC ${formatMac(cfg.subarray(0, ETH_ALEN))} is multicast`);
    }
    const frame = stateBytes(d.pendingFrame, `${what} pendingFrame`);
    if (frame.length !== 0 && (frame.length <= VIRTIO_NET_HDR_SIZE || frame.length > this.#rxBuf.length)) {
      throw new StateError(`${what}: a held frame of ${frame.length} bytes`);
    }
    const stats = stateCounters(d.stats, STAT_NAMES, what);
    this.mac.set(cfg.subarray(NET_CFG_MAC, NET_CFG_MAC + ETH_ALEN));
    this.#rxBuf.set(frame);
    this.#pendingLen = frame.length;
    Object.assign(this.#stats, stats);
  }
}
