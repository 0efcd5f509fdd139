// What the vhost-user fuzzer (vhost_user.ts) sends each `denovm device <type>` back end: how to start it
// and, per queue, the descriptor chains a guest driver would put there (well-formed requests with random
// fields, mutated ones), built from the device models' own layout constants.

import { join } from "node:path";
import { fileURLToPath } from "node:url";
import type { BytePool, Rng } from "./vhost_user_parts.ts";
import {
  BLK_DISCARD_SEG_SIZE,
  BLK_OUTHDR_SIZE,
  BLOCK_QUEUE_SIZE,
  VIRTIO_BLK_ID_BYTES,
  VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_T_WRITE_ZEROES,
} from "../../devices/virtio/block/device.ts";
import { NET_QUEUE_SIZE, VIRTIO_NET_HDR_SIZE } from "../../devices/virtio/net.ts";
import { CONSOLE_CTRL_SIZE, CONSOLE_QUEUE_SIZE } from "../../devices/virtio/console.ts";
import {
  HDR_BUF_ALLOC,
  HDR_DST_CID,
  HDR_DST_PORT,
  HDR_FLAGS,
  HDR_FWD_CNT,
  HDR_LEN,
  HDR_OP,
  HDR_SRC_CID,
  HDR_SRC_PORT,
  HDR_TYPE,
  VIRTIO_VSOCK_OP_CREDIT_REQUEST,
  VIRTIO_VSOCK_OP_CREDIT_UPDATE,
  VIRTIO_VSOCK_OP_REQUEST,
  VIRTIO_VSOCK_OP_RST,
  VIRTIO_VSOCK_OP_RW,
  VIRTIO_VSOCK_OP_SHUTDOWN,
  VIRTIO_VSOCK_TYPE_STREAM,
  VMADDR_CID_HOST,
  VSOCK_EVENT_SIZE,
  VSOCK_HDR_SIZE,
  VSOCK_QUEUE_SIZE,
} from "../../devices/virtio/vsock.ts";
import { RNG_QUEUE_SIZE } from "../../devices/virtio/rng.ts";
import { BALLOON_PAGE_SIZE, BALLOON_PFN_SIZE, BALLOON_QUEUE_SIZE } from "../../devices/virtio/balloon.ts";
import { INPUT_EVENT_SIZE, INPUT_QUEUE_SIZE } from "../../devices/virtio/input/device.ts";
import {
  CMD_GET_CAPSET,
  CMD_GET_CAPSET_INFO,
  CMD_GET_DISPLAY_INFO,
  CMD_GET_EDID,
  CMD_MOVE_CURSOR,
  CMD_RESOURCE_ASSIGN_UUID,
  CMD_RESOURCE_ATTACH_BACKING,
  CMD_RESOURCE_CREATE_2D,
  CMD_RESOURCE_CREATE_BLOB,
  CMD_RESOURCE_DETACH_BACKING,
  CMD_RESOURCE_FLUSH,
  CMD_RESOURCE_UNREF,
  CMD_SET_SCANOUT,
  CMD_TRANSFER_TO_HOST_2D,
  CMD_UPDATE_CURSOR,
  HDR_SIZE as GPU_HDR_SIZE,
  MEM_ENTRY_SIZE,
  SIZEOF_RESP_DISPLAY_INFO,
  SIZEOF_RESP_EDID,
  VIRTIO_GPU_FLAG_FENCE,
} from "../../devices/virtio/gpu/protocol.ts";
import { GPU_QUEUE_SIZES } from "../../devices/virtio/gpu/device.ts";
import { netnsUnavailable } from "../../test/support/netns.ts";

const REPO = fileURLToPath(new URL("../../", import.meta.url));
const MAIN_TS = join(REPO, "main.ts");

/** One segment of a chain: bytes the device reads, or a number of bytes it may write. */
export type Seg = { r: Uint8Array } | { w: number };

export interface ChainSpec {
  segs: Seg[];
  /** Guest ranges the request lets the device change besides its writable buffers (balloon pages). */
  grants?: [number, number][];
}

/** What a chain generator may ask of the fuzzer. */
export interface GenCtx {
  rng: Rng;
  pool: BytePool;
  /** Whether any of [g, g+len) is guest memory. */
  inMemory(g: number, len: number): boolean;
  /** A guest address with `len` bytes of guest memory after it (the device may only read there). */
  guestRange(len: number): number;
  /** Whole pages the device may discard (the balloon's inflate requests), as guest page numbers. */
  discardPfns: number[];
}

export interface QueueProfile {
  /** "request": the device completes every chain at once; "hold": it keeps writable buffers until it has data. */
  role: "request" | "hold";
  /** The device's queue size (its queueMaxSizes entry). */
  max: number;
  /** Most chains kept on a hold queue. */
  hold?: number;
  chain(ctx: GenCtx): ChainSpec;
}

/** How to run one back end type and drive its queues. */
export interface DeviceProfile {
  /** Set-up before the first start (files, a network namespace); returns why the type cannot run here. */
  prepare?(dir: string): Promise<string | undefined>;
  /** The back end's command line (argv[0] is the program). */
  command(socketPath: string, dir: string): string[];
  /** After the back end listens (a tap to bring up). */
  afterStart?(dir: string): Promise<void>;
  /** While fuzzing: stimulate the device from its host side (input events, host connections). */
  poke?(dir: string, rng: Rng): Promise<void>;
  cleanup?(dir: string): Promise<void>;
  queues: QueueProfile[];
  /** Pages kept for discard requests (balloon). */
  discardPages?: number;
}

function deno(args: string[]): string[] {
  return [Deno.execPath(), "run", "--allow-all", "--no-prompt", MAIN_TS, ...args];
}

function le(bytes: number): { buf: Uint8Array<ArrayBuffer>; dv: DataView } {
  const buf = new Uint8Array(bytes);
  return { buf, dv: new DataView(buf.buffer) };
}

/** Sometimes damage a request the way a buggy or hostile driver would: a byte flipped, cut short, grown. */
function mutate(rng: Rng, b: Uint8Array): Uint8Array {
  if (!rng.chance(0.1) || b.length === 0) return b;
  switch (rng.int(3)) {
    case 0: {
      const c = b.slice();
      c[rng.int(c.length)] ^= 1 << rng.int(8);
      return c;
    }
    case 1:
      return b.subarray(0, rng.int(b.length));
    default: {
      const c = new Uint8Array(b.length + rng.range(1, 32));
      c.set(b);
      return c;
    }
  }
}

// ---- block ----

const BLOCK_IMAGE_BYTES = 1 << 20;
const SECTOR = 512;

function blockProfile(): DeviceProfile {
  const sectors = BLOCK_IMAGE_BYTES / SECTOR;
  const sector = (rng: Rng): bigint =>
    rng.chance(0.9)
      ? BigInt(rng.int(sectors))
      : rng.pick([BigInt(sectors - 1), BigInt(sectors), BigInt(sectors + 1), (1n << 64n) - 1n, rng.u64()]);
  const dataLen = (rng: Rng): number => rng.chance(0.8) ? SECTOR * rng.range(1, 8) : rng.range(0, 4097);
  return {
    async prepare(dir) {
      const f = await Deno.open(join(dir, "disk.img"), { create: true, write: true, truncate: true });
      await f.truncate(BLOCK_IMAGE_BYTES);
      f.close();
      return undefined;
    },
    command: (s, dir) => deno(["device", "block", "--socket-path", s, "--file", join(dir, "disk.img")]),
    queues: [{
      role: "request",
      max: BLOCK_QUEUE_SIZE,
      chain({ rng, pool }) {
        const type = rng.pick([
          VIRTIO_BLK_T_IN,
          VIRTIO_BLK_T_IN,
          VIRTIO_BLK_T_IN,
          VIRTIO_BLK_T_OUT,
          VIRTIO_BLK_T_OUT,
          VIRTIO_BLK_T_OUT,
          VIRTIO_BLK_T_FLUSH,
          VIRTIO_BLK_T_GET_ID,
          VIRTIO_BLK_T_DISCARD,
          VIRTIO_BLK_T_WRITE_ZEROES,
          rng.edgy(32),
        ]);
        const h = le(BLK_OUTHDR_SIZE);
        h.dv.setUint32(0, type, true);
        h.dv.setUint32(4, rng.chance(0.9) ? 0 : rng.u32(), true);
        h.dv.setBigUint64(8, sector(rng), true);
        const segs: Seg[] = [];
        if (rng.chance(0.1)) segs.push({ r: h.buf.subarray(0, 8) }, { r: h.buf.subarray(8) });
        else segs.push({ r: mutate(rng, h.buf) });
        const nData = rng.range(1, 3);
        switch (type) {
          case VIRTIO_BLK_T_IN:
            for (let i = 0; i < nData; i++) segs.push({ w: dataLen(rng) });
            break;
          case VIRTIO_BLK_T_OUT:
            for (let i = 0; i < nData; i++) segs.push({ r: pool.bytes(dataLen(rng)) });
            break;
          case VIRTIO_BLK_T_GET_ID:
            segs.push({ w: rng.chance(0.8) ? VIRTIO_BLK_ID_BYTES : rng.range(0, 64) });
            break;
          case VIRTIO_BLK_T_DISCARD:
          case VIRTIO_BLK_T_WRITE_ZEROES: {
            const n = rng.chance(0.9) ? rng.range(1, 4) : rng.range(0, 300);
            const d = le(n * BLK_DISCARD_SEG_SIZE + (rng.chance(0.1) ? rng.range(1, 15) : 0));
            for (let i = 0; i < n; i++) {
              d.dv.setBigUint64(i * BLK_DISCARD_SEG_SIZE, sector(rng), true);
              d.dv.setUint32(i * BLK_DISCARD_SEG_SIZE + 8, rng.chance(0.8) ? rng.range(1, 64) : rng.edgy(32), true);
              d.dv.setUint32(i * BLK_DISCARD_SEG_SIZE + 12, rng.chance(0.8) ? rng.int(2) : rng.edgy(32), true);
            }
            segs.push({ r: d.buf });
            break;
          }
          case VIRTIO_BLK_T_FLUSH:
            break;
          default:
            if (rng.chance(0.5)) segs.push({ r: pool.bytes(dataLen(rng)) });
        }
        // The status byte, unless the driver forgot it or gave a bigger one.
        if (rng.chance(0.95)) segs.push({ w: rng.chance(0.95) ? 1 : rng.range(0, 16) });
        return { segs };
      },
    }],
  };
}

// ---- net ----

/** The tap the net back end creates inside its namespace, and the host side's address on it. */
const NET_TAP = "fz0";
const NET_HOST_IP = [10, 9, 0, 1];
const NET_GUEST_IP = [10, 9, 0, 2];
const ETH_P_ARP = 0x0806;
const ETH_P_IP = 0x0800;
const ETH_HLEN = 14;
const ARP_LEN = 28;

async function run(cmd: string[]): Promise<{ ok: boolean; out: string }> {
  try {
    const o = await new Deno.Command(cmd[0], { args: cmd.slice(1), stdout: "piped", stderr: "piped" }).output();
    const d = new TextDecoder();
    return { ok: o.success, out: d.decode(o.stdout) + d.decode(o.stderr) };
  } catch (e) {
    return { ok: false, out: (e as Error).message };
  }
}

function netProfile(): DeviceProfile {
  const ns = `denovm-fuzz-${Deno.pid}-${crypto.randomUUID().slice(0, 8)}`;
  const guestMac = [0x02, 0, 0, 0, 0, 0x02];
  const frame = (rng: Rng, pool: BytePool): Uint8Array => {
    const kind = rng.int(4);
    const payloadLen = kind === 0 ? ARP_LEN : rng.chance(0.9) ? rng.range(0, 1500) : rng.range(1501, 9000);
    const f = le(ETH_HLEN + payloadLen);
    f.buf.set(pool.bytes(f.buf.length));
    f.buf.set(rng.chance(0.5) ? [0xff, 0xff, 0xff, 0xff, 0xff, 0xff] : pool.bytes(6), 0);
    f.buf.set(guestMac, 6);
    f.dv.setUint16(12, kind === 0 ? ETH_P_ARP : kind === 1 ? ETH_P_IP : rng.edgy(16));
    if (kind === 0) {
      // An ARP request for the host side's address: the namespace's stack answers on the rx queue.
      const a = ETH_HLEN;
      f.dv.setUint16(a, 1);
      f.dv.setUint16(a + 2, ETH_P_IP);
      f.buf[a + 4] = 6;
      f.buf[a + 5] = 4;
      f.dv.setUint16(a + 6, 1);
      f.buf.set(guestMac, a + 8);
      f.buf.set(NET_GUEST_IP, a + 14);
      f.buf.fill(0, a + 18, a + 24);
      f.buf.set(NET_HOST_IP, a + 24);
    }
    return mutate(rng, f.buf);
  };
  return {
    async prepare() {
      const why = await netnsUnavailable();
      if (why) return why;
      const add = await run(["ip", "netns", "add", ns]);
      return add.ok ? undefined : `ip netns add: ${add.out.trim()}`;
    },
    command: (s) => ["ip", "netns", "exec", ns, ...deno(["device", "net", "--socket-path", s, "--tap-name", NET_TAP])],
    async afterStart() {
      await run(["ip", "netns", "exec", ns, "ip", "link", "set", NET_TAP, "up"]);
      await run(["ip", "netns", "exec", ns, "ip", "addr", "add", `${NET_HOST_IP.join(".")}/24`, "dev", NET_TAP]);
    },
    async cleanup() {
      await run(["ip", "netns", "del", ns]);
    },
    queues: [
      {
        role: "hold",
        max: NET_QUEUE_SIZE,
        hold: 32,
        chain({ rng }) {
          if (rng.chance(0.8)) return { segs: [{ w: VIRTIO_NET_HDR_SIZE + 1514 }] };
          if (rng.chance(0.5)) return { segs: [{ w: VIRTIO_NET_HDR_SIZE }, { w: 1514 }] };
          return { segs: [{ w: rng.range(0, 80) }] };
        },
      },
      {
        role: "request",
        max: NET_QUEUE_SIZE,
        chain({ rng, pool }) {
          const h = le(VIRTIO_NET_HDR_SIZE);
          if (rng.chance(0.2)) h.buf.set(pool.bytes(VIRTIO_NET_HDR_SIZE));
          const f = frame(rng, pool);
          if (rng.chance(0.1)) return { segs: [{ r: h.buf.subarray(0, rng.int(VIRTIO_NET_HDR_SIZE)) }] };
          if (rng.chance(0.2)) {
            const cut = rng.int(f.length + 1);
            return { segs: [{ r: h.buf }, { r: f.subarray(0, cut) }, { r: f.subarray(cut) }] };
          }
          const c = new Uint8Array(h.buf.length + f.length);
          c.set(h.buf);
          c.set(f, h.buf.length);
          return { segs: [{ r: c }] };
        },
      },
    ],
  };
}

// ---- console ----

function consoleProfile(): DeviceProfile {
  const rx: QueueProfile = {
    role: "hold",
    max: CONSOLE_QUEUE_SIZE,
    hold: 16,
    chain: ({ rng }) => ({ segs: [{ w: rng.chance(0.9) ? rng.range(1, 512) : 0 }] }),
  };
  return {
    async prepare(dir) {
      // Input waiting for the guest: the receive queues get data as soon as buffers arrive.
      await Deno.writeFile(join(dir, "console.in"), new Uint8Array(64 * 1024).map((_, i) => 32 + (i % 90)));
      return undefined;
    },
    command: (s, dir) =>
      deno([
        "device",
        "console",
        "--socket-path",
        s,
        "--output-file",
        "/dev/null",
        "--input-file",
        join(dir, "console.in"),
      ]),
    queues: [
      rx,
      {
        role: "request",
        max: CONSOLE_QUEUE_SIZE,
        chain: ({ rng, pool }) => ({ segs: [{ r: pool.bytes(rng.range(0, 600)) }] }),
      },
      { ...rx, hold: 8, chain: ({ rng }) => ({ segs: [{ w: rng.chance(0.9) ? CONSOLE_CTRL_SIZE + 32 : 0 }] }) },
      {
        role: "request",
        max: CONSOLE_QUEUE_SIZE,
        chain({ rng, pool }) {
          const c = le(CONSOLE_CTRL_SIZE);
          c.dv.setUint32(0, rng.chance(0.8) ? rng.int(2) : rng.edgy(32), true);
          c.dv.setUint16(4, rng.chance(0.9) ? rng.int(9) : rng.edgy(16), true);
          c.dv.setUint16(6, rng.chance(0.8) ? rng.int(2) : rng.edgy(16), true);
          const extra = rng.chance(0.2) ? pool.bytes(rng.range(1, 40)) : new Uint8Array();
          const b = new Uint8Array(c.buf.length + extra.length);
          b.set(c.buf);
          b.set(extra, c.buf.length);
          return { segs: [{ r: mutate(rng, b) }] };
        },
      },
    ],
  };
}

// ---- vsock ----

const VSOCK_GUEST_CID = 3;
/** Host ports with a listener (UDS_<port>) that accepts, reads and answers. */
const VSOCK_LISTEN_PORTS = [1234, 1235];

function vsockProfile(): DeviceProfile {
  const listeners: Deno.Listener[] = [];
  const vsockHdr = (rng: Rng, pool: BytePool): Uint8Array => {
    const payload = rng.chance(0.5) ? pool.bytes(rng.range(0, 300)) : new Uint8Array();
    const h = le(VSOCK_HDR_SIZE + payload.length);
    h.dv.setBigUint64(HDR_SRC_CID, rng.chance(0.95) ? BigInt(VSOCK_GUEST_CID) : rng.u64(), true);
    h.dv.setBigUint64(HDR_DST_CID, rng.chance(0.95) ? BigInt(VMADDR_CID_HOST) : rng.u64(), true);
    h.dv.setUint32(HDR_SRC_PORT, rng.chance(0.8) ? 5000 + rng.int(4) : rng.u32(), true);
    h.dv.setUint32(HDR_DST_PORT, rng.chance(0.8) ? rng.pick(VSOCK_LISTEN_PORTS) : rng.edgy(32), true);
    h.dv.setUint32(HDR_LEN, rng.chance(0.9) ? payload.length : rng.edgy(32), true);
    h.dv.setUint16(HDR_TYPE, rng.chance(0.95) ? VIRTIO_VSOCK_TYPE_STREAM : rng.edgy(16), true);
    h.dv.setUint16(
      HDR_OP,
      rng.pick([
        VIRTIO_VSOCK_OP_REQUEST,
        VIRTIO_VSOCK_OP_REQUEST,
        VIRTIO_VSOCK_OP_RW,
        VIRTIO_VSOCK_OP_RW,
        VIRTIO_VSOCK_OP_RW,
        VIRTIO_VSOCK_OP_SHUTDOWN,
        VIRTIO_VSOCK_OP_RST,
        VIRTIO_VSOCK_OP_CREDIT_UPDATE,
        VIRTIO_VSOCK_OP_CREDIT_REQUEST,
        rng.edgy(16),
      ]),
      true,
    );
    h.dv.setUint32(HDR_FLAGS, rng.chance(0.8) ? rng.int(4) : rng.edgy(32), true);
    h.dv.setUint32(HDR_BUF_ALLOC, rng.chance(0.8) ? 65536 : rng.edgy(32), true);
    h.dv.setUint32(HDR_FWD_CNT, rng.edgy(32), true);
    h.buf.set(payload, VSOCK_HDR_SIZE);
    return mutate(rng, h.buf);
  };
  return {
    prepare(dir) {
      // Host programs behind two ports: they read what comes and answer each chunk with a few bytes.
      for (const port of VSOCK_LISTEN_PORTS) {
        const l = Deno.listen({ transport: "unix", path: join(dir, `vsock.uds_${port}`) });
        listeners.push(l);
        (async () => {
          for await (const c of l) {
            (async () => {
              const buf = new Uint8Array(4096);
              try {
                for (;;) {
                  const n = await c.read(buf);
                  if (n === null) break;
                  await c.write(buf.subarray(0, Math.min(n, 64)));
                }
              } catch {
                // the device reset the connection
              } finally {
                try {
                  c.close();
                } catch {
                  // closed
                }
              }
            })();
          }
        })().catch(() => {});
      }
      return Promise.resolve(undefined);
    },
    command: (s, dir) =>
      deno([
        "device",
        "vsock",
        "--socket-path",
        s,
        "--cid",
        String(VSOCK_GUEST_CID),
        "--uds-path",
        join(dir, "vsock.uds"),
      ]),
    cleanup() {
      for (const l of listeners.splice(0)) l.close();
      return Promise.resolve();
    },
    queues: [
      {
        role: "hold",
        max: VSOCK_QUEUE_SIZE,
        hold: 64,
        chain: ({ rng }) => ({
          segs: rng.chance(0.8) ? [{ w: VSOCK_HDR_SIZE + 1024 }] : [{ w: VSOCK_HDR_SIZE }, { w: rng.range(0, 256) }],
        }),
      },
      {
        role: "request",
        max: VSOCK_QUEUE_SIZE,
        chain({ rng, pool }) {
          const p = vsockHdr(rng, pool);
          if (rng.chance(0.2) && p.length > VSOCK_HDR_SIZE) {
            return { segs: [{ r: p.subarray(0, VSOCK_HDR_SIZE) }, { r: p.subarray(VSOCK_HDR_SIZE) }] };
          }
          return { segs: [{ r: p }] };
        },
      },
      {
        role: "hold",
        max: VSOCK_QUEUE_SIZE,
        hold: 4,
        chain: ({ rng }) => ({ segs: [{ w: rng.chance(0.9) ? VSOCK_EVENT_SIZE : rng.range(0, 16) }] }),
      },
    ],
  };
}

// ---- rng ----

function rngProfile(): DeviceProfile {
  return {
    command: (s) => deno(["device", "rng", "--socket-path", s]),
    queues: [{
      role: "request",
      max: RNG_QUEUE_SIZE,
      chain({ rng, pool }) {
        const segs: Seg[] = [];
        if (rng.chance(0.05)) segs.push({ r: pool.bytes(rng.range(1, 16)) });
        const n = rng.range(1, 3);
        for (let i = 0; i < n; i++) segs.push({ w: rng.chance(0.9) ? rng.range(1, 1024) : rng.range(0, 8192) });
        return { segs };
      },
    }],
  };
}

// ---- balloon ----

const BALLOON_DISCARD_PAGES = 32;
const BALLOON_STAT_ENTRY = 10;

function balloonProfile(): DeviceProfile {
  const pfns = (rng: Rng, ctx: GenCtx, inflate: boolean): ChainSpec => {
    const n = rng.chance(0.9) ? rng.range(1, 16) : rng.range(0, 256);
    const b = le(n * BALLOON_PFN_SIZE + (rng.chance(0.05) ? rng.range(1, 3) : 0));
    const grants: [number, number][] = [];
    for (let i = 0; i < n; i++) {
      let pfn: number;
      if (ctx.discardPfns.length > 0 && rng.chance(0.8)) {
        pfn = rng.pick(ctx.discardPfns);
        grants.push([pfn * BALLOON_PAGE_SIZE, BALLOON_PAGE_SIZE]);
      } else if (!inflate && rng.chance(0.5)) {
        pfn = Math.floor(ctx.guestRange(1) / BALLOON_PAGE_SIZE); // deflate only: pages stay the guest's
      } else {
        do {
          pfn = rng.pick([0xffff_ffff, 0x8000_0000, 0x100_0000 + rng.int(0x1000), rng.u32() | 0x4000_0000]) >>> 0;
        } while (ctx.inMemory(pfn * BALLOON_PAGE_SIZE, BALLOON_PAGE_SIZE));
      }
      b.dv.setUint32(i * BALLOON_PFN_SIZE, pfn, true);
    }
    return { segs: [{ r: b.buf }], grants };
  };
  return {
    command: (s) => deno(["device", "balloon", "--socket-path", s]),
    discardPages: BALLOON_DISCARD_PAGES,
    queues: [
      { role: "request", max: BALLOON_QUEUE_SIZE, chain: (ctx) => pfns(ctx.rng, ctx, true) },
      { role: "request", max: BALLOON_QUEUE_SIZE, chain: (ctx) => pfns(ctx.rng, ctx, false) },
      {
        role: "hold",
        max: BALLOON_QUEUE_SIZE,
        hold: 2,
        chain({ rng, pool }) {
          const n = rng.chance(0.9) ? rng.range(1, 10) : rng.range(0, 100);
          return { segs: [{ r: pool.bytes(n * BALLOON_STAT_ENTRY + (rng.chance(0.1) ? rng.range(1, 9) : 0)) }] };
        },
      },
    ],
  };
}

// ---- input ----

const INPUT_KINDS = ["keyboard", "mouse", "multi-touch", "rotary"] as const;

function inputProfile(kindSeed: number): DeviceProfile {
  const kind = INPUT_KINDS[kindSeed % INPUT_KINDS.length];
  let events: Deno.UnixConn | undefined;
  return {
    command: (s, dir) =>
      deno(["device", "input", "--socket-path", s, "--kind", kind, "--event-socket", join(dir, "input.events")]),
    async poke(dir, rng) {
      // Host events for the event queue: a line of JSON on the event socket (answers are not read back).
      try {
        events ??= await Deno.connect({ transport: "unix", path: join(dir, "input.events") });
        const req = rng.pick([
          { type: "hello" },
          { key: rng.int(300), down: rng.chance(0.5) },
          { move: [rng.range(-50, 50), rng.range(-50, 50)] },
          { wheel: rng.range(-3, 3) },
          { click: true },
          { tap: [rng.int(2000), rng.int(2000)] },
        ]);
        await events.write(new TextEncoder().encode(JSON.stringify(req) + "\n"));
        const drain = new Uint8Array(65536);
        // Replies pile up unread otherwise; take what is there without waiting.
        const r = events.read(drain);
        await Promise.race([r, new Promise((res) => setTimeout(res, 0))]);
      } catch {
        events?.close();
        events = undefined;
      }
    },
    cleanup() {
      try {
        events?.close();
      } catch {
        // closed
      }
      events = undefined;
      return Promise.resolve();
    },
    queues: [
      {
        role: "hold",
        max: INPUT_QUEUE_SIZE,
        hold: 32,
        chain: ({ rng }) => ({ segs: [{ w: rng.chance(0.9) ? INPUT_EVENT_SIZE : rng.range(0, 24) }] }),
      },
      {
        role: "request",
        max: INPUT_QUEUE_SIZE,
        chain({ rng, pool }) {
          const e = le(INPUT_EVENT_SIZE);
          e.dv.setUint16(0, rng.chance(0.8) ? rng.pick([0x11, 0x14, 0x00, 0x01]) : rng.edgy(16), true); // EV_LED, EV_REP, EV_SYN, EV_KEY
          e.dv.setUint16(2, rng.chance(0.8) ? rng.int(16) : rng.edgy(16), true);
          e.dv.setUint32(4, rng.chance(0.8) ? rng.int(2) : rng.edgy(32), true);
          if (rng.chance(0.1)) return { segs: [{ r: pool.bytes(rng.range(0, 40)) }] };
          return { segs: [{ r: mutate(rng, e.buf) }] };
        },
      },
    ],
  };
}

// ---- gpu (2D backend) ----

const GPU_RESOURCE_IDS = 8;
/** B8G8R8A8_UNORM and friends (virtio 1.2 section 5.7.6.8 "enum virtio_gpu_formats"). */
const GPU_FORMATS = [1, 2, 3, 4, 67, 68, 121, 134];

function gpuProfile(): DeviceProfile {
  const ctrl = (ctx: GenCtx): ChainSpec => {
    const { rng, pool } = ctx;
    const cmd = rng.pick([
      CMD_GET_DISPLAY_INFO,
      CMD_RESOURCE_CREATE_2D,
      CMD_RESOURCE_CREATE_2D,
      CMD_RESOURCE_UNREF,
      CMD_SET_SCANOUT,
      CMD_RESOURCE_FLUSH,
      CMD_TRANSFER_TO_HOST_2D,
      CMD_TRANSFER_TO_HOST_2D,
      CMD_RESOURCE_ATTACH_BACKING,
      CMD_RESOURCE_ATTACH_BACKING,
      CMD_RESOURCE_DETACH_BACKING,
      CMD_GET_CAPSET_INFO,
      CMD_GET_CAPSET,
      CMD_GET_EDID,
      CMD_RESOURCE_ASSIGN_UUID,
      CMD_RESOURCE_CREATE_BLOB,
      rng.edgy(32),
    ]);
    const res = () => (rng.chance(0.9) ? rng.range(1, GPU_RESOURCE_IDS) : rng.edgy(32));
    const dim = () => (rng.chance(0.9) ? rng.range(1, 128) : rng.edgy(32));
    const coord = () => (rng.chance(0.9) ? rng.int(128) : rng.edgy(32));
    const body: number[] = []; // u32 fields after the header
    let extra: Uint8Array = new Uint8Array();
    let resp = GPU_HDR_SIZE;
    switch (cmd) {
      case CMD_GET_DISPLAY_INFO:
        resp = SIZEOF_RESP_DISPLAY_INFO;
        break;
      case CMD_RESOURCE_CREATE_2D:
        body.push(res(), rng.chance(0.9) ? rng.pick(GPU_FORMATS) : rng.edgy(32), dim(), dim());
        break;
      case CMD_RESOURCE_UNREF:
      case CMD_RESOURCE_DETACH_BACKING:
      case CMD_RESOURCE_ASSIGN_UUID:
        body.push(res(), 0);
        resp = cmd === CMD_RESOURCE_ASSIGN_UUID ? GPU_HDR_SIZE + 16 : GPU_HDR_SIZE;
        break;
      case CMD_SET_SCANOUT:
        body.push(coord(), coord(), dim(), dim(), rng.chance(0.9) ? 0 : rng.edgy(32), rng.chance(0.2) ? 0 : res());
        break;
      case CMD_RESOURCE_FLUSH:
        body.push(coord(), coord(), dim(), dim(), res(), 0);
        break;
      case CMD_TRANSFER_TO_HOST_2D:
        body.push(coord(), coord(), dim(), dim(), rng.chance(0.8) ? 0 : rng.u32(), 0, res(), 0);
        break;
      case CMD_RESOURCE_ATTACH_BACKING: {
        const n = rng.chance(0.9) ? rng.range(1, 4) : rng.edgy(8);
        body.push(res(), rng.chance(0.9) ? n : rng.edgy(32));
        const e = le(n * MEM_ENTRY_SIZE);
        for (let i = 0; i < n; i++) {
          const len = rng.chance(0.9) ? rng.range(1, 16384) : rng.edgy(32);
          const addr = rng.chance(0.9) ? BigInt(ctx.guestRange(Math.min(len, 16384))) : rng.u64();
          e.dv.setBigUint64(i * MEM_ENTRY_SIZE, addr, true);
          e.dv.setUint32(i * MEM_ENTRY_SIZE + 8, len, true);
        }
        extra = e.buf;
        break;
      }
      case CMD_GET_CAPSET_INFO:
        body.push(rng.chance(0.8) ? rng.int(3) : rng.edgy(32), 0);
        resp = GPU_HDR_SIZE + 16;
        break;
      case CMD_GET_CAPSET:
        body.push(rng.chance(0.8) ? rng.int(3) : rng.edgy(32), rng.int(3));
        resp = rng.range(GPU_HDR_SIZE, 1024);
        break;
      case CMD_GET_EDID:
        body.push(rng.chance(0.9) ? rng.int(2) : rng.edgy(32), 0);
        resp = SIZEOF_RESP_EDID;
        break;
      case CMD_RESOURCE_CREATE_BLOB:
        body.push(res(), rng.int(4), rng.int(8), 0, rng.u32(), rng.u32(), dim() * 64, 0);
        break;
      default:
        for (let i = rng.int(12); i > 0; i--) body.push(rng.u32());
    }
    const b = le(GPU_HDR_SIZE + body.length * 4 + extra.length);
    b.dv.setUint32(0, cmd, true);
    b.dv.setUint32(4, rng.chance(0.1) ? VIRTIO_GPU_FLAG_FENCE : rng.chance(0.05) ? rng.u32() : 0, true);
    b.dv.setBigUint64(8, BigInt(rng.int(1000)), true);
    body.forEach((v, i) => b.dv.setUint32(GPU_HDR_SIZE + i * 4, v >>> 0, true));
    b.buf.set(extra, GPU_HDR_SIZE + body.length * 4);
    const req = mutate(rng, b.buf);
    const segs: Seg[] = rng.chance(0.1) && req.length > GPU_HDR_SIZE
      ? [{ r: req.subarray(0, GPU_HDR_SIZE) }, { r: req.subarray(GPU_HDR_SIZE) }]
      : [{ r: req }];
    if (rng.chance(0.95)) segs.push({ w: rng.chance(0.9) ? resp : rng.range(0, 64) });
    if (rng.chance(0.02)) segs.push({ r: pool.bytes(8) }); // readable after writable
    return { segs };
  };
  const cursor = ({ rng }: GenCtx): ChainSpec => {
    const b = le(GPU_HDR_SIZE + 16 + 16);
    b.dv.setUint32(0, rng.chance(0.5) ? CMD_UPDATE_CURSOR : rng.chance(0.9) ? CMD_MOVE_CURSOR : rng.edgy(32), true);
    for (let o = GPU_HDR_SIZE; o < b.buf.length; o += 4) b.dv.setUint32(o, rng.chance(0.8) ? rng.int(64) : rng.u32());
    return { segs: [{ r: mutate(rng, b.buf) }, ...(rng.chance(0.3) ? [{ w: GPU_HDR_SIZE }] : [])] };
  };
  return {
    command: (s) => deno(["device", "gpu", "--socket-path", s, "--backend", "2d", "--width", "64", "--height", "48"]),
    queues: [
      { role: "request", max: GPU_QUEUE_SIZES[0], chain: ctrl },
      { role: "request", max: GPU_QUEUE_SIZES[1], chain: cursor },
    ],
  };
}

/** The `denovm device` types (vmm/cli/device.ts) this fuzzer drives. */
export const DEVICE_TYPES = ["block", "net", "console", "vsock", "rng", "balloon", "input", "gpu"] as const;

/** A fresh profile of `type` (profiles keep per-run state: a namespace's name, listeners). */
export function deviceProfile(type: string, seed: number): DeviceProfile | undefined {
  switch (type) {
    case "block":
      return blockProfile();
    case "net":
      return netProfile();
    case "console":
      return consoleProfile();
    case "vsock":
      return vsockProfile();
    case "rng":
      return rngProfile();
    case "balloon":
      return balloonProfile();
    case "input":
      return inputProfile(seed);
    case "gpu":
      return gpuProfile();
  }
  return undefined;
}
