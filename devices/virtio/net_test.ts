// virtio-net on a real tap, driven through the virtio-mmio registers by the test driver.
//
// The tap lives in a network namespace the test creates (test/support/netns.ts: this file re-runs itself
// inside it). Inside, the device creates tap "dvnet0", the test gives it 10.0.2.1/24 and plays a guest at
// 10.0.2.2 that ARPs and pings the host stack through the device. Nothing leaves the namespace.

import assert from "node:assert/strict";
import fc from "fast-check";
import dgram from "node:dgram";
import {
  NET_CFG_MAC,
  NET_CFG_MAX_VQ_PAIRS,
  NET_CFG_STATUS,
  NET_CONFIG_SIZE,
  NET_HDR_CSUM_OFFSET,
  NET_HDR_CSUM_START,
  NET_HDR_FLAGS,
  NET_HDR_GSO_TYPE,
  NET_HDR_NUM_BUFFERS,
  NET_MAX_FRAME,
  NET_OFFLOAD_FEATURES,
  NET_RX_QUEUE,
  NET_TX_QUEUE,
  NetDevice,
  VIRTIO_NET_F_CSUM,
  VIRTIO_NET_F_GUEST_CSUM,
  VIRTIO_NET_F_HOST_TSO4,
  VIRTIO_NET_F_MAC,
  VIRTIO_NET_F_STATUS,
  VIRTIO_NET_HDR_F_NEEDS_CSUM,
  VIRTIO_NET_HDR_GSO_TCPV4,
  VIRTIO_NET_HDR_SIZE,
  VIRTIO_NET_S_LINK_UP,
} from "./net.ts";
import { VIRTIO_COMMON_FEATURES, VIRTIO_ID_NET } from "./device.ts";
import { VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE } from "./queue.ts";
import { configureInterface, interfaceMtu } from "../../ffi/tun.ts";
import { GuardedGuestMemory, VirtioTestDriver } from "../../test/support/virtio_driver.ts";
import { captureVirtioLog, mmioRig, reattachRig, roundTrip } from "../../test/support/device_rig.ts";
import { StateError, type StateValue } from "../../core/state.ts";
import { insideNetns, testInNetns } from "../../test/support/netns.ts";
import { concatBytes } from "../../core/bytes.ts";

const MiB = 1024 * 1024;
/** A hang guard for waits on the device (a broken device fails the test instead of hanging it). */
const HANG_GUARD_MS = 20_000;

// ---- Frames (IEEE 802.3, RFC 826 ARP, RFC 791 IPv4, RFC 792 ICMP) ----
const ETHERTYPE_IPV4 = 0x0800;
const ETHERTYPE_ARP = 0x0806;
const ARP_REQUEST = 1;
const ARP_REPLY = 2;
const IPPROTO_ICMP = 1;
const ICMP_ECHO_REPLY = 0;
const ICMP_ECHO_REQUEST = 8;
const ETH_HLEN = 14;
const IPV4_HLEN = 20;
const BROADCAST = new Uint8Array(6).fill(0xff);

const HOST_IP = [10, 0, 2, 1];
const GUEST_IP = [10, 0, 2, 2];
const GUEST_MAC = "02:00:00:00:00:02";
const GUEST_MAC_BYTES = Uint8Array.from([2, 0, 0, 0, 0, 2]);
const TAP = "dvnet0";

const concat = (...parts: ArrayLike<number>[]): Uint8Array => concatBytes(parts);
function be16(v: number): number[] {
  return [(v >> 8) & 0xff, v & 0xff];
}
function inetChecksum(b: Uint8Array): number {
  let s = 0;
  for (let i = 0; i < b.length; i += 2) s += (b[i] << 8) | (b[i + 1] ?? 0);
  while (s > 0xffff) s = (s & 0xffff) + (s >>> 16);
  return ~s & 0xffff;
}
function ether(dst: ArrayLike<number>, type: number, payload: Uint8Array): Uint8Array {
  return concat(dst, GUEST_MAC_BYTES, be16(type), payload);
}
function arpRequest(): Uint8Array {
  // htype 1 (Ethernet), ptype IPv4, hlen 6, plen 4, op, sha, spa, tha, tpa.
  return ether(
    BROADCAST,
    ETHERTYPE_ARP,
    concat(
      be16(1),
      be16(ETHERTYPE_IPV4),
      [6, 4],
      be16(ARP_REQUEST),
      GUEST_MAC_BYTES,
      GUEST_IP,
      new Uint8Array(6),
      HOST_IP,
    ),
  );
}
function arpReply(toMac: Uint8Array): Uint8Array {
  return ether(
    toMac,
    ETHERTYPE_ARP,
    concat(be16(1), be16(ETHERTYPE_IPV4), [6, 4], be16(ARP_REPLY), GUEST_MAC_BYTES, GUEST_IP, toMac, HOST_IP),
  );
}
function icmpEcho(dstMac: Uint8Array, id: number, seq: number, data: Uint8Array): Uint8Array {
  const icmp = concat([ICMP_ECHO_REQUEST, 0, 0, 0], be16(id), be16(seq), data);
  icmp.set(be16(inetChecksum(icmp)), 2);
  const ip = concat(
    [0x45, 0],
    be16(IPV4_HLEN + icmp.length),
    be16(0x1234),
    be16(0x4000), // DF
    [64, IPPROTO_ICMP, 0, 0],
    GUEST_IP,
    HOST_IP,
  );
  ip.set(be16(inetChecksum(ip)), 10);
  return ether(dstMac, ETHERTYPE_IPV4, concat(ip, icmp));
}
function hdr(opts: { flags?: number; gso?: number; csumStart?: number; csumOffset?: number } = {}): Uint8Array {
  const h = new Uint8Array(VIRTIO_NET_HDR_SIZE);
  const v = new DataView(h.buffer);
  h[NET_HDR_FLAGS] = opts.flags ?? 0;
  h[NET_HDR_GSO_TYPE] = opts.gso ?? 0;
  v.setUint16(NET_HDR_CSUM_START, opts.csumStart ?? 0, true);
  v.setUint16(NET_HDR_CSUM_OFFSET, opts.csumOffset ?? 0, true);
  return h;
}

interface RxFrame {
  hdr: Uint8Array;
  frame: Uint8Array;
}

interface Rig {
  dev: NetDevice;
  drv: VirtioTestDriver;
  g: GuardedGuestMemory;
  acked: bigint;
  irqs: { n: number };
  lines: string[];
  rxPosted: Map<number, { addr: number; len: number }>;
  postRx(n: number, size?: number): void;
  send(frame: Uint8Array, h?: Uint8Array): { len: number };
  /** Received frames so far (taken from the used ring), oldest first. */
  received: RxFrame[];
  collect(): void;
  waitFrame(pred: (f: RxFrame) => boolean, what: string): Promise<RxFrame>;
  close(): Promise<void>;
}

function rig(opts: { features?: bigint; offloads?: boolean; repost?: boolean } = {}): Rig {
  const log = captureVirtioLog();
  const dev = new NetDevice({ tapName: TAP, mac: GUEST_MAC, offloads: opts.offloads });
  configureInterface(TAP, { ip: HOST_IP.join("."), netmask: "255.255.255.0" });
  const g = new GuardedGuestMemory([{ start: 0, size: 32 * MiB }]);
  const { drv, irqs } = mmioRig(dev, g.mem, 32 * MiB);
  const acked = drv.init({ features: opts.features });
  const rxPosted = new Map<number, { addr: number; len: number }>();
  const received: RxFrame[] = [];
  const r: Rig = {
    dev,
    drv,
    g,
    acked,
    irqs,
    lines: log.lines,
    rxPosted,
    received,
    postRx(n, size = VIRTIO_NET_HDR_SIZE + 1518) {
      const q = drv.queues[NET_RX_QUEUE];
      for (let i = 0; i < n; i++) {
        const s = q.submit([size]);
        rxPosted.set(s.head, s.buffers[0]);
      }
      drv.kick(NET_RX_QUEUE);
    },
    send(frame, h = hdr()) {
      const q = drv.queues[NET_TX_QUEUE];
      const sub = q.submit([h, frame]);
      drv.kick(NET_TX_QUEUE);
      const used = q.used();
      assert.equal(used.length, 1);
      assert.equal(used[0].id, sub.head);
      return { len: used[0].len };
    },
    collect() {
      for (const u of drv.queues[NET_RX_QUEUE].used()) {
        const b = rxPosted.get(u.id);
        assert.ok(b, `used rx id ${u.id} was posted`);
        rxPosted.delete(u.id);
        assert.ok(u.len <= b.len);
        if (u.len === 0) continue;
        const bytes = g.mem.read(b.addr, u.len);
        received.push({ hdr: bytes.subarray(0, VIRTIO_NET_HDR_SIZE), frame: bytes.subarray(VIRTIO_NET_HDR_SIZE) });
        if (opts.repost ?? true) r.postRx(1);
      }
    },
    async waitFrame(pred, what) {
      const end = Date.now() + HANG_GUARD_MS;
      for (;;) {
        r.collect();
        const i = received.findIndex(pred);
        if (i >= 0) return received.splice(i, 1)[0];
        if (Date.now() > end) assert.fail(`gave up waiting for ${what}; stats ${JSON.stringify(dev.stats())}`);
        await new Promise((res) => setTimeout(res, 5));
      }
    },
    async close() {
      dev.close();
      await dev.done;
      log.restore();
      assert.ok(g.canaryIntact(), "no access outside guest memory");
      g.close();
    },
  };
  return r;
}

const isArpReply = (f: RxFrame) =>
  f.frame.length >= ETH_HLEN + 28 &&
  ((f.frame[12] << 8) | f.frame[13]) === ETHERTYPE_ARP &&
  ((f.frame[20] << 8) | f.frame[21]) === ARP_REPLY &&
  f.frame.subarray(28, 32).every((b, i) => b === HOST_IP[i]);
const isArpRequestForGuest = (f: RxFrame) =>
  ((f.frame[12] << 8) | f.frame[13]) === ETHERTYPE_ARP &&
  ((f.frame[20] << 8) | f.frame[21]) === ARP_REQUEST &&
  f.frame.subarray(38, 42).every((b, i) => b === GUEST_IP[i]);
const isEchoReply = (id: number, seq: number) => (f: RxFrame) => {
  const p = f.frame;
  if (p.length < ETH_HLEN + IPV4_HLEN + 8 || ((p[12] << 8) | p[13]) !== ETHERTYPE_IPV4) return false;
  const ihl = (p[ETH_HLEN] & 0xf) * 4;
  const icmp = ETH_HLEN + ihl;
  return p[ETH_HLEN + 9] === IPPROTO_ICMP && p[icmp] === ICMP_ECHO_REPLY &&
    ((p[icmp + 4] << 8) | p[icmp + 5]) === id && ((p[icmp + 6] << 8) | p[icmp + 7]) === seq;
};

const IPPROTO_UDP = 17;
/** struct udphdr (linux/udp.h): source, dest, len, check (be16 each). */
const UDP_DEST_OFFSET = 2;
const UDP_CHECK_OFFSET = 6;
const UDP_PORT = 9999;

/** Send a UDP datagram from the host stack to the guest and return the frame the device delivered. */
async function udpFromHost(r: Rig, tag: number): Promise<RxFrame> {
  const sock = dgram.createSocket("udp4");
  try {
    const payload = new Uint8Array(64).fill(tag);
    const isIt = (f: RxFrame) => {
      const p = f.frame;
      const udp = ETH_HLEN + IPV4_HLEN;
      return p.length >= udp + 8 + payload.length && ((p[12] << 8) | p[13]) === ETHERTYPE_IPV4 &&
        p[ETH_HLEN + 9] === IPPROTO_UDP && ((p[udp + UDP_DEST_OFFSET] << 8) | p[udp + UDP_DEST_OFFSET + 1]) ===
          UDP_PORT &&
        p[udp + 8] === tag;
    };
    await new Promise<void>((res, rej) =>
      sock.send(payload, UDP_PORT, GUEST_IP.join("."), (e: Error | null) => e ? rej(e) : res())
    );
    const end = Date.now() + HANG_GUARD_MS;
    for (;;) {
      r.collect();
      const ai = r.received.findIndex(isArpRequestForGuest);
      if (ai >= 0) r.send(arpReply(r.received.splice(ai, 1)[0].frame.slice(22, 28)));
      const i = r.received.findIndex(isIt);
      if (i >= 0) return r.received.splice(i, 1)[0];
      if (Date.now() > end) assert.fail(`no UDP datagram ${tag}; stats ${JSON.stringify(r.dev.stats())}`);
      await new Promise((res) => setTimeout(res, 5));
    }
  } finally {
    await new Promise<void>((res) => sock.close(() => res()));
  }
}

/** ARP for the host, then return its MAC (from the reply the host stack sent through the tap). */
async function resolveHost(r: Rig): Promise<Uint8Array> {
  const sent = r.send(arpRequest());
  assert.equal(sent.len, 0);
  const reply = await r.waitFrame(isArpReply, "the ARP reply from 10.0.2.1");
  assert.deepEqual([...reply.frame.subarray(0, 6)], [...GUEST_MAC_BYTES], "the reply is addressed to the guest");
  return reply.frame.slice(22, 28);
}

async function ping(r: Rig, hostMac: Uint8Array, id: number, seq: number, data: Uint8Array): Promise<RxFrame> {
  r.send(icmpEcho(hostMac, id, seq, data));
  const end = Date.now() + HANG_GUARD_MS;
  for (;;) {
    // The host may ARP for the guest first: answer it.
    r.collect();
    const ai = r.received.findIndex(isArpRequestForGuest);
    if (ai >= 0) {
      const req = r.received.splice(ai, 1)[0];
      r.send(arpReply(req.frame.slice(22, 28)));
    }
    const i = r.received.findIndex(isEchoReply(id, seq));
    if (i >= 0) return r.received.splice(i, 1)[0];
    if (Date.now() > end) assert.fail(`no echo reply ${id}/${seq}; stats ${JSON.stringify(r.dev.stats())}`);
    await new Promise((res) => setTimeout(res, 5));
  }
}

// ---- Outside the namespace: the namespace runner ----

if (!insideNetns) {
  await testInNetns({ what: "virtio-net tap tests", file: import.meta.url, innerTests: 7 });
}

// ---- Inside the namespace ----

if (insideNetns) {
  Deno.test("config space, features, queues", async () => {
    const r = rig();
    try {
      assert.equal(r.dev.deviceType, VIRTIO_ID_NET);
      assert.deepEqual(r.dev.queueMaxSizes.length, 2);
      assert.equal(
        r.dev.features,
        VIRTIO_COMMON_FEATURES | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | NET_OFFLOAD_FEATURES,
      );
      assert.deepEqual([...r.drv.readConfig(NET_CFG_MAC, 6)], [...GUEST_MAC_BYTES]);
      const st = new DataView(r.drv.readConfig(NET_CFG_STATUS, 2).buffer).getUint16(0, true);
      assert.equal(st, VIRTIO_NET_S_LINK_UP);
      const pairs = new DataView(r.drv.readConfig(NET_CFG_MAX_VQ_PAIRS, 2).buffer).getUint16(0, true);
      assert.equal(pairs, 1);
      assert.equal(r.dev.tapName, TAP);
      assert.equal(interfaceMtu(TAP), 1500);
    } finally {
      await r.close();
    }
  });

  Deno.test("ARP and ICMP echo through the tap: the host stack answers the guest", async () => {
    const r = rig();
    try {
      r.postRx(16);
      const hostMac = await resolveHost(r);
      for (let seq = 1; seq <= 5; seq++) {
        const data = Uint8Array.from({ length: 56 + seq * 100 }, (_, i) => (i * 7 + seq) & 0xff);
        const reply = await ping(r, hostMac, 0x4242, seq, data);
        assert.deepEqual([...reply.frame.subarray(0, 6)], [...GUEST_MAC_BYTES]);
        assert.deepEqual([...reply.frame.subarray(6, 12)], [...hostMac]);
        const payload = reply.frame.subarray(ETH_HLEN + IPV4_HLEN + 8);
        assert.deepEqual([...payload], [...data], "the echo carries our bytes back");
        assert.equal(new DataView(reply.hdr.buffer, reply.hdr.byteOffset).getUint16(NET_HDR_NUM_BUFFERS, true), 1);
      }
      const s = r.dev.stats();
      assert.ok(s.txPackets >= 6, JSON.stringify(s));
      assert.ok(s.rxPackets >= 6, JSON.stringify(s));
      assert.equal(s.txDrops, 0);
      assert.ok(r.irqs.n > 0, "the device interrupted the driver");
    } finally {
      await r.close();
    }
  });

  Deno.test("no receive buffer: the frame waits, one log line, and arrives after the next rx kick", async () => {
    const r = rig({ repost: false });
    try {
      r.postRx(4);
      const hostMac = await resolveHost(r);
      // Ping until the posted buffers are used up and the device reports a stall.
      let seq = 100;
      const end = Date.now() + HANG_GUARD_MS;
      while (r.dev.stats().rxStalls === 0) {
        if (Date.now() > end) assert.fail("the device never ran out of buffers");
        r.send(icmpEcho(hostMac, 7, seq++, new Uint8Array(8)));
        await new Promise((res) => setTimeout(res, 20));
        r.collect();
      }
      assert.equal(r.rxPosted.size, 0, "every posted buffer was used");
      // More frames while stalled: nothing can be delivered, and the stall is logged once.
      const rxBefore = r.dev.stats().rxPackets;
      for (let i = 0; i < 3; i++) r.send(icmpEcho(hostMac, 7, 300 + i, Uint8Array.of(1, 2, 3, i)));
      await new Promise((res) => setTimeout(res, 100));
      assert.equal(r.dev.stats().rxPackets, rxBefore, "nothing delivered without buffers");
      assert.equal(r.lines.filter((l) => l.includes("no receive buffers")).length, 1, "one log line for the stall");
      // Buffers and a kick: the held frame and the queued ones arrive.
      r.postRx(16);
      for (let i = 0; i < 3; i++) {
        const f = await r.waitFrame(isEchoReply(7, 300 + i), `echo reply ${300 + i} after the kick`);
        assert.deepEqual([...f.frame.subarray(ETH_HLEN + IPV4_HLEN + 8)], [1, 2, 3, i]);
      }
      assert.ok(r.dev.stats().rxPackets > rxBefore);
    } finally {
      await r.close();
    }
  });

  Deno.test("offloads: TUNSETOFFLOAD follows the acked GUEST_* bits; headers asking for unacked offloads are dropped", async () => {
    // Without offloads negotiated: a NEEDS_CSUM or TSO header is refused with one log line each.
    const mask = ~NET_OFFLOAD_FEATURES;
    const r = rig({ features: mask });
    try {
      assert.equal(r.acked & (VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_HOST_TSO4), 0n);
      r.postRx(8);
      const hostMac = await resolveHost(r);
      r.send(icmpEcho(hostMac, 1, 1, new Uint8Array(4)), hdr({ flags: VIRTIO_NET_HDR_F_NEEDS_CSUM, csumStart: 34 }));
      r.send(icmpEcho(hostMac, 1, 2, new Uint8Array(4)), hdr({ gso: VIRTIO_NET_HDR_GSO_TCPV4 }));
      r.send(icmpEcho(hostMac, 1, 3, new Uint8Array(4)), hdr({ flags: 0x80 }));
      assert.equal(r.dev.stats().txDrops, 3);
      assert.equal(r.lines.filter((l) => l.includes("dropped")).length, 3);
      // A plain frame still works.
      await ping(r, hostMac, 1, 4, new Uint8Array(4));
      // TUNSETOFFLOAD 0: the host stack checksums UDP itself, so the header asks for nothing.
      const udp = await udpFromHost(r, 1);
      assert.equal(udp.hdr[NET_HDR_FLAGS], 0);
    } finally {
      await r.close();
    }
    // With offloads: the same NEEDS_CSUM frame is accepted (the tap takes the partial checksum).
    const r2 = rig();
    try {
      assert.ok(r2.acked & VIRTIO_NET_F_CSUM);
      r2.postRx(8);
      const hostMac = await resolveHost(r2);
      const frame = icmpEcho(hostMac, 2, 1, new Uint8Array(16).fill(9));
      // Zero the ICMP checksum and ask for it to be completed (csum_start = ICMP header).
      const icmpAt = ETH_HLEN + IPV4_HLEN;
      frame[icmpAt + 2] = 0;
      frame[icmpAt + 3] = 0;
      r2.send(frame, hdr({ flags: VIRTIO_NET_HDR_F_NEEDS_CSUM, csumStart: icmpAt, csumOffset: 2 }));
      assert.equal(r2.dev.stats().txDrops, 0);
      const end = Date.now() + HANG_GUARD_MS;
      let reply: RxFrame | undefined;
      while (!reply) {
        r2.collect();
        const i = r2.received.findIndex(isEchoReply(2, 1));
        if (i >= 0) reply = r2.received[i];
        if (Date.now() > end) assert.fail("no reply to the NEEDS_CSUM echo");
        await new Promise((res) => setTimeout(res, 5));
      }
      assert.deepEqual([...reply.frame.subarray(icmpAt + 8)], new Array(16).fill(9));
      // TUNSETOFFLOAD TUN_F_CSUM (GUEST_CSUM acked): the host leaves the UDP checksum to the guest.
      const udp = await udpFromHost(r2, 2);
      assert.equal(udp.hdr[NET_HDR_FLAGS], VIRTIO_NET_HDR_F_NEEDS_CSUM);
      const hv = new DataView(udp.hdr.buffer, udp.hdr.byteOffset);
      assert.equal(hv.getUint16(NET_HDR_CSUM_START, true), ETH_HLEN + IPV4_HLEN, "checksum starts at the UDP header");
      assert.equal(hv.getUint16(NET_HDR_CSUM_OFFSET, true), UDP_CHECK_OFFSET);
    } finally {
      await r2.close();
    }
  });

  Deno.test("hostile tx chains (property): never throw, never touch memory outside the guest, counted as drops", async () => {
    const r = rig();
    try {
      const q = r.drv.queues[NET_TX_QUEUE];
      const base = r.drv.alloc.alloc(64 * 1024, 16);
      const memSize = 32 * MiB;
      const addr = fc.oneof(
        fc.integer({ min: 0, max: memSize - 1 }),
        fc.integer({ min: memSize - 64, max: memSize + 64 }),
        fc.constantFrom(0, base, 2 ** 40, 2 ** 53, Number.MAX_SAFE_INTEGER),
      );
      const desc = fc.record({
        addr,
        len: fc.oneof(
          fc.integer({ min: 0, max: 4096 }),
          fc.constantFrom(0, 11, 12, 13, NET_MAX_FRAME + 13, 0xffff_ffff),
        ),
        flags: fc.integer({ min: 0, max: VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_INDIRECT }),
        next: fc.integer({ min: 0, max: q.size + 2 }),
      });
      const before = r.dev.stats();
      await fc.assert(
        fc.asyncProperty(
          fc.array(desc, { minLength: 1, maxLength: 8 }),
          fc.array(fc.integer({ min: 0, max: 7 }), { minLength: 1, maxLength: 4 }),
          fc.uint8Array({ minLength: 0, maxLength: 256 }),
          async (descs, heads, bytes) => {
            // Random bytes (headers and frames) at the start of the scratch area.
            r.g.mem.write(base, bytes);
            descs.forEach((d, i) => q.writeDesc(i, d));
            for (const h of heads) q.publish(h);
            r.drv.kick(NET_TX_QUEUE);
            q.used(); // drain, as the driver would
            assert.ok(r.g.canaryIntact());
            await Promise.resolve();
          },
        ),
        { numRuns: 300 },
      );
      const after = r.dev.stats();
      assert.ok(after.txDrops > before.txDrops, "hostile chains were dropped");
      // The device still works after all that: well-formed frames go out and come back.
      r.postRx(8);
      const hostMac = await resolveHost(r);
      await ping(r, hostMac, 9, 9, new Uint8Array(32).fill(5));
    } finally {
      await r.close();
    }
  });

  Deno.test("hostile rx chains: readable, tiny or out-of-range receive buffers drop frames without a crash", async () => {
    const r = rig();
    try {
      const q = r.drv.queues[NET_RX_QUEUE];
      // A readable rx buffer, a too-small one, and one pointing outside guest memory.
      const a = r.drv.alloc.alloc(2048);
      q.writeDesc(0, { addr: a, len: 2048, flags: 0, next: 0 });
      q.writeDesc(1, { addr: a, len: 20, flags: VIRTQ_DESC_F_WRITE, next: 0 });
      q.writeDesc(2, { addr: 64 * MiB, len: 2048, flags: VIRTQ_DESC_F_WRITE, next: 0 });
      for (const h of [0, 1, 2]) q.publish(h);
      r.drv.kick(NET_RX_QUEUE);
      // Make the host send frames: ARP requests (answered to the broadcast-asking guest).
      for (let i = 0; i < 5; i++) r.send(arpRequest());
      const end = Date.now() + HANG_GUARD_MS;
      while (r.dev.stats().rxDrops < 2) {
        if (Date.now() > end) assert.fail(`frames were not dropped: ${JSON.stringify(r.dev.stats())}`);
        await new Promise((res) => setTimeout(res, 5));
      }
      assert.ok(r.g.canaryIntact());
      // The used ring got the two well-formed-but-unusable chains back with length 0.
      const used = q.usedIdx();
      assert.ok(used >= 2);
    } finally {
      await r.close();
    }
  });

  Deno.test("state: a fresh device on the same tap keeps the MAC, delivers a held frame and continues the rings", async () => {
    const r = rig({ repost: false });
    let dev2: NetDevice | undefined;
    try {
      r.postRx(4);
      const hostMac = await resolveHost(r);
      r.postRx(2);
      assert.ok(r.dev.quiescent());
      const cfg = r.drv.readConfig(0, NET_CONFIG_SIZE);
      const rxq = r.drv.queues[NET_RX_QUEUE];
      const rxUsed = rxq.usedIdx();
      const saved = roundTrip(r.dev.saveState());
      const tState = roundTrip(r.drv.transport.saveState());
      // A frame the device had read from the tap and not yet delivered (a stall), as the state holds it.
      const held = concat(
        new Uint8Array(VIRTIO_NET_HDR_SIZE),
        GUEST_MAC_BYTES,
        hostMac,
        [0x88, 0xb5],
        new Uint8Array(46).fill(7),
      );
      const withFrame = { ...saved, data: { ...(saved.data as Record<string, StateValue>), pendingFrame: held } };
      r.dev.close();
      await r.dev.done;
      dev2 = new NetDevice({ tapName: TAP }); // a random MAC until the state says otherwise
      configureInterface(TAP, { ip: HOST_IP.join("."), netmask: "255.255.255.0" });
      for (
        const [what, patch] of [
          ["frame", { pendingFrame: new Uint8Array(5) }],
          ["multicast MAC", { config: Uint8Array.from([1, 0, 0, 0, 0, 2, 1, 0, 1, 0]) }],
          ["config", { config: new Uint8Array(NET_CONFIG_SIZE) }],
          ["features", { features: "0x1" }],
          ["stats", { stats: null }],
        ] as [string, Record<string, StateValue>][]
      ) {
        const st = { ...saved, data: { ...(saved.data as Record<string, StateValue>), ...patch } };
        assert.throws(() => dev2!.restoreState(st), StateError, what);
      }
      assert.throws(() => dev2!.restoreState({ ...saved, version: 2 }), StateError);
      const to = reattachRig({ t: r.drv.transport, drv: r.drv, irqs: r.irqs }, dev2, r.g.mem);
      dev2.restoreState(withFrame);
      to.t.restoreState(tState);
      assert.deepEqual(to.drv.readConfig(0, NET_CONFIG_SIZE), cfg, "the same MAC and status");
      assert.deepEqual(dev2.mac, GUEST_MAC_BYTES);
      // The held frame went into the next receive buffer at activation.
      r.collect();
      assert.equal(rxq.usedIdx(), (rxUsed + 1) & 0xffff);
      const f = r.received.at(-1)!;
      assert.deepEqual(f.frame, held.subarray(VIRTIO_NET_HDR_SIZE));
      // Transmit and receive go on through the restored device.
      r.postRx(4);
      to.drv.kick(NET_RX_QUEUE);
      const txq = r.drv.queues[NET_TX_QUEUE];
      const send = (frame: Uint8Array) => {
        const sub = txq.submit([hdr(), frame]);
        to.drv.kick(NET_TX_QUEUE);
        assert.deepEqual(txq.used(), [{ id: sub.head, len: 0 }]);
      };
      // The tap is a new interface (the old one went with the first device's fd): a new host MAC.
      send(arpRequest());
      const newHostMac = (await r.waitFrame(isArpReply, "the ARP reply through the restored device")).frame.slice(
        22,
        28,
      );
      send(icmpEcho(newHostMac, 9, 1, Uint8Array.of(5, 6)));
      let echo: RxFrame | undefined;
      const end = Date.now() + HANG_GUARD_MS;
      while (!echo) {
        r.collect();
        const ai = r.received.findIndex(isArpRequestForGuest);
        if (ai >= 0) send(arpReply(r.received.splice(ai, 1)[0].frame.slice(22, 28)));
        const i = r.received.findIndex(isEchoReply(9, 1));
        if (i >= 0) echo = r.received.splice(i, 1)[0];
        else if (Date.now() > end) assert.fail(`no echo reply; stats ${JSON.stringify(dev2.stats())}`);
        else await new Promise((res) => setTimeout(res, 5));
      }
      assert.deepEqual([...echo.frame.subarray(ETH_HLEN + IPV4_HLEN + 8)], [5, 6]);
      assert.ok(dev2.stats().rxPackets >= 2 && dev2.stats().txPackets >= 2, "counters continue");
      assert.ok(dev2.quiescent());
      assert.throws(() => dev2!.restoreState(saved), StateError, "the device is active");
    } finally {
      dev2?.close();
      await dev2?.done;
      await r.close();
    }
  });
}
