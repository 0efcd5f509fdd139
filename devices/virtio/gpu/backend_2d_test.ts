// virtio-gpu driven through the virtio-mmio registers by the test driver: the 2D backend's pixels end to
// end (guest pattern -> TRANSFER_TO_HOST_2D -> SET_SCANOUT -> RESOURCE_FLUSH -> PNG), copy counters,
// every bad input, fence ordering with a fake backend, blob map/unmap through a fake SharedMemoryMapper,
// the trace file, and random commands.

import assert from "node:assert/strict";
import { FENCE_TID } from "./trace.ts";
import fc from "fast-check";
import { GpuDevice } from "./device.ts";
import { Backend2D, MAX_2D_HOST_BYTES } from "./backend_2d.ts";
import type {
  Backing,
  CapsetInfo,
  Create3D,
  CreateBlob,
  FenceHandler,
  FenceTimeline,
  GpuBackend,
  MappedBlob,
  Transfer,
} from "./backend.ts";
import { GpuBackendError } from "./backend.ts";
import * as P from "./protocol.ts";
import * as F from "./formats.ts";
import { decodePngRgba } from "./png.ts";
import { EDID_BLOCK_SIZE } from "./display.ts";
import { VIRGL_TRANSFER_FROM_HOST } from "./accounting.ts";
import { VIRGL_CCMD_RESOURCE_INLINE_WRITE, VIRGL_CCMD_TRANSFER3D } from "./virgl_stream.ts";
import { guestLog } from "../../../core/log.ts";
import type { SharedMemoryMapper } from "../device.ts";
import { GuardedGuestMemory } from "../../../test/support/virtio_driver.ts";
import {
  attach,
  cmd,
  create2d,
  createBlob,
  ctxCreate,
  flush,
  mapBlob,
  pattern,
  setScanout,
  submit,
  transfer2d,
  unmapBlob,
} from "../../../test/support/gpu_commands.ts";
import { captureVirtioLog, closeDeviceRig, mmioRig } from "../../../test/support/device_rig.ts";

const MiB = 1024 * 1024;
/** Rings and commands live below this; resource backing pages above it. */
const ARENA_END = 8 * MiB;
const DATA_BASE = 8 * MiB;
const GUEST_SIZE = 32 * MiB;

// ---- fakes ----

/** A backend with contexts, capsets, host blobs that map, and fences that retire only when told. */
class FakeBackend extends Backend2D {
  override readonly name = "fake";
  override readonly supportsVirgl = true;
  override readonly supportsHostBlobs = true;
  handler: FenceHandler | null = null;
  fences: { timeline: FenceTimeline; id: bigint }[] = [];
  submits: { ctx: number; bytes: Uint8Array }[] = [];
  blobs = new Map<number, number>();
  mapped = new Set<number>();
  retireAtOnce = false;

  override capsets(): CapsetInfo[] {
    return [{ id: P.VIRTIO_GPU_CAPSET_VIRGL, maxVersion: 1, maxSize: 8 }, {
      id: P.VIRTIO_GPU_CAPSET_VIRGL2,
      maxVersion: 2,
      maxSize: 16,
    }];
  }
  override getCapset(id: number, _v: number): Uint8Array {
    return new Uint8Array(id === 1 ? 8 : 16).fill(id);
  }
  threeD = new Set<number>();
  override createContext(): void {}
  override createResource3D(a: Create3D): void {
    this.threeD.add(a.resourceId);
  }
  override attachBacking(id: number, b: Backing): void {
    if (!this.threeD.has(id)) super.attachBacking(id, b);
  }
  override transferToHost(t: Transfer): void {
    if (!this.threeD.has(t.resourceId) && !this.blobs.has(t.resourceId)) super.transferToHost(t);
  }
  override transferFromHost(t: Transfer): void {
    if (!this.threeD.has(t.resourceId) && !this.blobs.has(t.resourceId)) super.transferFromHost(t);
  }
  override submit3D(ctx: number, bytes: Uint8Array): void {
    this.submits.push({ ctx, bytes: bytes.slice() });
  }
  override createBlob(a: CreateBlob): void {
    if (a.blobMem === P.VIRTIO_GPU_BLOB_MEM_GUEST) return super.createBlob(a);
    this.blobs.set(a.resourceId, a.size);
  }
  override destroyResource(id: number): void {
    this.blobs.delete(id);
    this.threeD.delete(id);
    super.destroyResource(id);
  }
  override mapResource(id: number): MappedBlob {
    const size = this.blobs.get(id);
    if (size === undefined) return super.mapResource(id);
    this.mapped.add(id);
    return { hostAddr: 0x7f00_0000_0000n + BigInt(id) * 0x100_0000n, size, mapInfo: P.VIRTIO_GPU_MAP_CACHE_CACHED };
  }
  override unmapResource(id: number): void {
    if (!this.mapped.delete(id)) throw new Error(`fake: ${id} not mapped`);
  }
  override setFenceHandler(h: FenceHandler): void {
    this.handler = h;
  }
  override createFence(timeline: FenceTimeline, id: bigint): void {
    if (this.retireAtOnce) this.handler!(timeline, id);
    else this.fences.push({ timeline, id });
  }
  retire(timeline: FenceTimeline, id: bigint): void {
    this.handler!(timeline, id);
  }
}

/** Records mappings and checks the device never overlaps or double-removes. */
class FakeMapper implements SharedMemoryMapper {
  live = new Map<number, { hostAddr: bigint; length: number }>();
  adds = 0;
  removes = 0;
  maxLive = 0;
  failNext = false;
  addMapping(id: number, offset: number, hostAddr: bigint, length: number): void {
    assert.equal(id, P.VIRTIO_GPU_SHM_ID_HOST_VISIBLE);
    if (this.failNext) {
      this.failNext = false;
      throw new Error("no free memory slot");
    }
    for (const [o, m] of this.live) assert.ok(offset >= o + m.length || o >= offset + length, "overlap reached mapper");
    this.live.set(offset, { hostAddr, length });
    this.adds++;
    this.maxLive = Math.max(this.maxLive, this.live.size);
  }
  removeMapping(id: number, offset: number): void {
    assert.equal(id, P.VIRTIO_GPU_SHM_ID_HOST_VISIBLE);
    assert.ok(this.live.delete(offset), `remove of unmapped offset ${offset}`);
    this.removes++;
  }
}

// ---- rig ----

interface Resp {
  type: number;
  len: number;
  bytes: Uint8Array;
  view: DataView;
}

function rig(opts: {
  backend?: GpuBackend;
  displays?: { width: number; height: number }[];
  hostVisibleWindowSize?: number;
  tracePath?: string;
  features?: bigint;
} = {}) {
  const g = new GuardedGuestMemory([{ start: 0, size: GUEST_SIZE }]);
  const backend = opts.backend ?? new Backend2D();
  const dev = new GpuDevice({
    backend,
    displays: opts.displays,
    hostVisibleWindowSize: opts.hostVisibleWindowSize,
    tracePath: opts.tracePath,
  });
  const mapper = new FakeMapper();
  dev.setSharedMemoryMapper(mapper);
  const { drv, irqs } = mmioRig(dev, g.mem, ARENA_END);
  const acked = drv.init({ features: opts.features });
  const log = captureVirtioLog();
  const lines = log.lines;
  const base = drv.alloc.mark();
  const readResp = (addr: number, len: number): Resp => {
    const bytes = g.mem.read(addr, len);
    const view = new DataView(bytes.buffer);
    return { type: len >= 4 ? view.getUint32(0, true) : 0, len, bytes, view };
  };
  return {
    g,
    dev,
    drv,
    mapper,
    acked,
    lines,
    irqs,
    /** Send one command on `queue`, expect it answered now, return the response. */
    send(c: Uint8Array, respLen = 4096, queue = 0): Resp {
      const q = drv.queues[queue];
      const sub = q.submit([c, respLen]);
      drv.kick(queue);
      const used = q.used();
      assert.equal(used.length, 1, "one used entry");
      assert.equal(used[0].id, sub.head);
      const r = readResp(sub.buffers[1].addr, used[0].len);
      drv.alloc.resetTo(base);
      return r;
    },
    /** Send without expecting an answer (fenced commands); returns a reader for later. */
    post(c: Uint8Array, respLen = 64) {
      const q = drv.queues[0];
      const sub = q.submit([c, respLen]);
      drv.kick(0);
      return { head: sub.head, read: (len: number) => readResp(sub.buffers[1].addr, len) };
    },
    ok(c: Uint8Array, expect = P.RESP_OK_NODATA): Resp {
      const before = lines.length;
      const r = this.send(c);
      assert.equal(r.type, expect, `response 0x${r.type.toString(16)}; log: ${lines.slice(before).join(" | ")}`);
      return r;
    },
    /** Expect an error response and exactly one guest error logged (the log itself is rate limited). */
    err(c: Uint8Array, code: number, re?: RegExp): void {
      const before = lines.length;
      const errs = dev.guestErrors;
      const seen: string[] = [];
      guestLog.sink = (l) => seen.push(l);
      dev.guestErrorLine = (l: string) => seen.push(l);
      const r = this.send(c);
      guestLog.sink = (l) => lines.push(l);
      dev.guestErrorLine = undefined;
      assert.equal(r.type, code, `want 0x${code.toString(16)} got 0x${r.type.toString(16)}`);
      assert.equal(dev.guestErrors, errs + 1, `one guest error, got: ${seen.join(" | ")}`);
      assert.ok(lines.length - before <= 1);
      if (re) assert.match(seen.join("\n"), re);
    },
    [Symbol.dispose]() {
      closeDeviceRig(log, g, dev);
    },
  };
}

/** Write `data` into guest pages at DATA_BASE and describe them as three uneven entries. */
function placeBacking(mem: GuardedGuestMemory["mem"], data: Uint8Array, base = DATA_BASE) {
  const cut1 = Math.min(1000, Math.floor(data.length / 3)),
    cut2 = Math.min(4096 + 52, Math.floor((2 * data.length) / 3));
  const parts = [
    { addr: base, len: cut1 },
    { addr: base + 0x10000, len: cut2 - cut1 },
    { addr: base + 0x30000, len: data.length - cut2 },
  ];
  let o = 0;
  for (const p of parts) {
    mem.write(p.addr, data.subarray(o, o + p.len));
    o += p.len;
  }
  return parts;
}

/** Expected RGBA of a guest pixel in `format` (what the PNG must hold; alpha always opaque). */
function expectRgba(format: number, px: Uint8Array, i: number): [number, number, number, number] {
  const bgra = new Uint8Array(4);
  F.toBgra(format, px, 4 * i, bgra, 0, 1);
  return [bgra[2], bgra[1], bgra[0], 0xff];
}

// ---- tests ----

Deno.test("features, config space and GET_DISPLAY_INFO", () => {
  using r = rig({ displays: [{ width: 1024, height: 768 }, { width: 640, height: 480 }] });
  assert.ok(r.acked & P.VIRTIO_GPU_F_EDID);
  assert.ok(r.acked & P.VIRTIO_GPU_F_RESOURCE_BLOB);
  assert.equal(r.acked & P.VIRTIO_GPU_F_VIRGL, 0n, "2d backend offers no VIRGL");
  const cfg = new DataView(r.drv.readConfig(0, P.GPU_CONFIG_SIZE).buffer);
  assert.equal(cfg.getUint32(P.GPU_CFG_NUM_SCANOUTS, true), 2);
  assert.equal(cfg.getUint32(P.GPU_CFG_NUM_CAPSETS, true), 0);
  assert.deepEqual(r.dev.sharedMemoryRegions(), [], "no host-visible window without host blobs");
  const d = r.ok(cmd(P.CMD_GET_DISPLAY_INFO), P.RESP_OK_DISPLAY_INFO);
  assert.equal(d.len, P.SIZEOF_RESP_DISPLAY_INFO);
  const one = (i: number, f: number) => d.view.getUint32(P.HDR_SIZE + i * P.DISPLAY_ONE_SIZE + f, true);
  assert.deepEqual([one(0, 8), one(0, 12), one(0, 16)], [1024, 768, 1]);
  assert.deepEqual([one(1, 8), one(1, 12), one(1, 16)], [640, 480, 1]);
  assert.equal(one(2, 16), 0, "third scanout disabled");
  const e = r.ok(cmd(P.CMD_GET_EDID, [1, 0]), P.RESP_OK_EDID);
  assert.equal(e.view.getUint32(P.HDR_SIZE, true), EDID_BLOCK_SIZE);
  const edid = e.bytes.subarray(P.HDR_SIZE + 8, P.HDR_SIZE + 8 + EDID_BLOCK_SIZE);
  assert.equal(edid.reduce((s, b) => s + b, 0) % 256, 0, "EDID checksum");
  // Preferred detailed timing: 640 x 480.
  assert.equal(edid[56] | ((edid[58] >> 4) << 8), 640);
  assert.equal(edid[59] | ((edid[61] >> 4) << 8), 480);
  r.err(cmd(P.CMD_GET_EDID, [2, 0]), P.RESP_ERR_INVALID_SCANOUT_ID);
});

for (
  const format of [
    F.VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM,
    F.VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM,
    F.VIRTIO_GPU_FORMAT_R8G8B8A8_UNORM,
    F.VIRTIO_GPU_FORMAT_X8R8G8B8_UNORM,
    F.VIRTIO_GPU_FORMAT_A8B8G8R8_UNORM,
  ]
) {
  Deno.test(`2D pipeline: pattern -> transfer -> scanout -> flush -> PNG pixels (format ${format})`, async () => {
    using r = rig();
    const W = 64, H = 32;
    const px = pattern(W, H, format);
    r.ok(create2d(7, format, W, H));
    r.ok(attach(7, placeBacking(r.g.mem, px)));
    r.ok(transfer2d(7, 0, 0, W, H, 0));
    r.ok(setScanout(0, 7, 0, 0, W, H));
    const updates: unknown[] = [];
    r.dev.display.onUpdate((s, rect) => updates.push({ s, rect }));
    r.ok(flush(7, 0, 0, W, H));
    assert.deepEqual(updates, [{ s: 0, rect: { x: 0, y: 0, width: W, height: H } }]);
    const img = await decodePngRgba(await r.dev.screenshot(0));
    assert.equal(img.width, W);
    assert.equal(img.height, H);
    for (let i = 0; i < W * H; i++) {
      assert.deepEqual([...img.rgba.subarray(4 * i, 4 * i + 4)], expectRgba(format, px, i), `pixel ${i}`);
    }
    const s = r.dev.gpuStats();
    assert.equal(s.resources["7"].transferToHostBytes, W * H * 4, "64x32 box at 4 Bpp = 8192 bytes");
    assert.equal(s.totals.transferToHostBytes, 8192);
    assert.equal(s.totals.bytesCopied, 8192);
    assert.equal(s.commands["TRANSFER_TO_HOST_2D"].count, 1);
  });
}

Deno.test("partial transfer with offset, flush of a sub-rectangle only, scanout of a sub-rectangle", async () => {
  using r = rig();
  const W = 40, H = 20, fmt = F.VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM;
  const first = pattern(W, H, 1);
  const parts = placeBacking(r.g.mem, first);
  r.ok(create2d(3, fmt, W, H));
  r.ok(attach(3, parts));
  r.ok(transfer2d(3, 0, 0, W, H, 0));
  // Scanout shows the rectangle (8,4) 24x12 of the resource.
  r.ok(setScanout(0, 3, 8, 4, 24, 12));
  r.ok(flush(3, 0, 0, W, H));
  // Now change the guest pixels everywhere but transfer only a 5x3 box at (10,6) (offset = its first byte).
  const second = pattern(W, H, 2);
  let o = 0;
  for (const p of parts) {
    r.g.mem.write(p.addr, second.subarray(o, o + p.len));
    o += p.len;
  }
  r.ok(transfer2d(3, 10, 6, 5, 3, (6 * W + 10) * 4));
  // Flush a rect that half overlaps the scanout (only the transferred box changed on the host).
  const updates: { x: number; y: number; width: number; height: number }[] = [];
  r.dev.display.onUpdate((_s, rect) => updates.push(rect));
  r.ok(flush(3, 0, 0, 16, 10));
  assert.deepEqual(updates, [{ x: 0, y: 0, width: 8, height: 6 }], "flushed part of the scanout, in its coordinates");
  const img = await decodePngRgba(await r.dev.screenshot());
  assert.equal(img.width, 24);
  for (let y = 0; y < 12; y++) {
    for (let x = 0; x < 24; x++) {
      const rx = x + 8, ry = y + 4;
      const inBox = rx >= 10 && rx < 15 && ry >= 6 && ry < 9;
      const src = inBox ? second : first;
      assert.deepEqual(
        [...img.rgba.subarray(4 * (y * 24 + x), 4 * (y * 24 + x) + 4)],
        expectRgba(fmt, src, ry * W + rx),
        `pixel ${x},${y}`,
      );
    }
  }
  assert.equal(r.dev.gpuStats().resources["3"].transferToHostBytes, W * H * 4 + 5 * 3 * 4);
});

Deno.test("2D resources together hold at most MAX_2D_HOST_BYTES; an unref gives the room back", () => {
  using r = rig();
  const fmt = F.VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM;
  // 4096 x 4096 x 4 = 64 MiB each: four fit in 256 MiB, a fifth does not.
  const side = 4096;
  const each = side * side * 4;
  const fit = Math.floor(MAX_2D_HOST_BYTES / each);
  for (let id = 1; id <= fit; id++) r.ok(create2d(id, fmt, side, side));
  r.err(create2d(fit + 1, fmt, side, side), P.RESP_ERR_OUT_OF_MEMORY, /hold \d+ of \d+ bytes/);
  r.err(create2d(fit + 1, fmt, 1, 1), P.RESP_ERR_OUT_OF_MEMORY);
  r.ok(cmd(P.CMD_RESOURCE_UNREF, [1, 0]));
  r.ok(create2d(fit + 1, fmt, side, side));
  r.err(create2d(fit + 2, fmt, side, side), P.RESP_ERR_OUT_OF_MEMORY);
});

Deno.test("bad inputs: the right error, one log line, no crash", () => {
  using r = rig();
  const fmt = F.VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM;
  r.ok(create2d(1, fmt, 16, 16));
  r.ok(attach(1, [{ addr: DATA_BASE, len: 16 * 16 * 4 }]));
  r.ok(create2d(2, fmt, 16, 16));
  const E = P;
  r.err(create2d(0, fmt, 4, 4), E.RESP_ERR_INVALID_RESOURCE_ID, /resource id 0/);
  r.err(create2d(1, fmt, 4, 4), E.RESP_ERR_INVALID_RESOURCE_ID, /exists/);
  r.err(create2d(9, 999, 4, 4), E.RESP_ERR_INVALID_PARAMETER, /unknown format/);
  r.err(create2d(9, fmt, 0, 4), E.RESP_ERR_INVALID_PARAMETER);
  r.err(create2d(9, fmt, 0xffff, 0xffff), E.RESP_ERR_OUT_OF_MEMORY);
  r.err(cmd(E.CMD_RESOURCE_UNREF, [55, 0]), E.RESP_ERR_INVALID_RESOURCE_ID, /no resource 55/);
  r.err(transfer2d(55, 0, 0, 1, 1, 0), E.RESP_ERR_INVALID_RESOURCE_ID);
  r.err(transfer2d(1, 8, 8, 9, 8, 0), E.RESP_ERR_INVALID_PARAMETER, /outside/);
  r.err(transfer2d(1, 0xffff_ffff, 0, 2, 1, 0), E.RESP_ERR_INVALID_PARAMETER, /outside/);
  r.err(transfer2d(1, 0, 0, 16, 16, 4), E.RESP_ERR_INVALID_PARAMETER, /backing bytes/);
  r.err(transfer2d(1, 0, 0, 16, 16, 0xffff_ffff_ffff_ff00n), E.RESP_ERR_INVALID_PARAMETER, /offset/);
  r.err(transfer2d(2, 0, 0, 4, 4, 0), E.RESP_ERR_UNSPEC, /no backing/);
  r.err(attach(2, [{ addr: GUEST_SIZE - 16, len: 32 }]), E.RESP_ERR_INVALID_PARAMETER, /outside guest RAM/);
  r.err(attach(2, [{ addr: 0xffff_ffff_ffff_0000n, len: 32 }]), E.RESP_ERR_INVALID_PARAMETER, /outside guest RAM/);
  r.err(attach(1, [{ addr: DATA_BASE, len: 64 }]), E.RESP_ERR_INVALID_PARAMETER, /already has backing/);
  r.err(attach(2, []), E.RESP_ERR_INVALID_PARAMETER, /no memory entries/);
  // nr_entries larger than the bytes present.
  r.err(cmd(E.CMD_RESOURCE_ATTACH_BACKING, [2, 3, BigInt(DATA_BASE), 16, 0]), E.RESP_ERR_INVALID_PARAMETER, /entries/);
  r.err(cmd(E.CMD_RESOURCE_DETACH_BACKING, [2, 0]), E.RESP_ERR_INVALID_PARAMETER, /no backing/);
  r.err(setScanout(1, 1, 0, 0, 16, 16), E.RESP_ERR_INVALID_SCANOUT_ID);
  r.err(setScanout(0, 77, 0, 0, 16, 16), E.RESP_ERR_INVALID_RESOURCE_ID);
  r.err(setScanout(0, 1, 4, 4, 16, 16), E.RESP_ERR_INVALID_PARAMETER, /outside/);
  r.ok(setScanout(0, 1, 0, 0, 16, 16));
  r.err(flush(1, 0, 0, 17, 16), E.RESP_ERR_INVALID_PARAMETER, /outside/);
  r.err(flush(99, 0, 0, 1, 1), E.RESP_ERR_INVALID_RESOURCE_ID);
  r.err(cmd(E.CMD_GET_CAPSET_INFO, [0, 0]), E.RESP_ERR_INVALID_PARAMETER, /capset index 0/);
  r.err(cmd(E.CMD_GET_CAPSET, [1, 0]), E.RESP_ERR_INVALID_PARAMETER);
  r.err(ctxCreate(1), E.RESP_ERR_UNSPEC, /VIRGL/);
  r.err(cmd(E.CMD_RESOURCE_MAP_BLOB, [1, 0, 0n]), E.RESP_ERR_UNSPEC, /window/);
  r.err(createBlob(5, 9, 0, 0n, 4096, [{ addr: DATA_BASE, len: 4096 }]), E.RESP_ERR_INVALID_PARAMETER, /blob_mem 9/);
  r.err(
    createBlob(5, E.VIRTIO_GPU_BLOB_MEM_GUEST, 0, 0n, 8192, [{ addr: DATA_BASE, len: 4096 }]),
    E.RESP_ERR_INVALID_PARAMETER,
  );
  r.err(createBlob(5, E.VIRTIO_GPU_BLOB_MEM_HOST3D, 1, 1n, 4096), E.RESP_ERR_INVALID_PARAMETER, /host blobs/);
  r.err(createBlob(5, E.VIRTIO_GPU_BLOB_MEM_GUEST, 0x80, 0n, 4096), E.RESP_ERR_INVALID_PARAMETER, /blob flags/);
  // Short commands, unknown types, commands shorter than their header.
  r.err(new Uint8Array(10), E.RESP_ERR_UNSPEC, /shorter than its header/);
  r.err(cmd(0x777), E.RESP_ERR_UNSPEC, /unknown command/);
  r.err(cmd(E.CMD_RESOURCE_CREATE_2D, [1, 2]), E.RESP_ERR_INVALID_PARAMETER, /needs 40/);
  r.err(cmd(E.CMD_MOVE_CURSOR, [0, 0, 0, 0, 0, 0, 0, 0]), E.RESP_ERR_UNSPEC, /control queue/);
  // Cursor commands on the cursor queue; a bad scanout there too.
  const cur = r.send(cmd(E.CMD_UPDATE_CURSOR, [0, 5, 6, 0, 1, 2, 3, 0]), 64, 1);
  assert.equal(cur.type, E.RESP_OK_NODATA);
  assert.deepEqual(r.dev.cursor, { scanoutId: 0, x: 5, y: 6, resourceId: 1, hotX: 2, hotY: 3 });
  assert.equal(r.send(cmd(E.CMD_MOVE_CURSOR, [3, 5, 6, 0, 0, 0, 0, 0]), 64, 1).type, E.RESP_ERR_INVALID_SCANOUT_ID);
  // A response buffer too small: no crash, the bytes that fit.
  const small = r.send(cmd(E.CMD_GET_DISPLAY_INFO), 8);
  assert.equal(small.len, 8);
  assert.equal(small.type, E.RESP_OK_DISPLAY_INFO);
  // Unref of the scanout's resource disables the scanout; id reusable afterwards.
  r.ok(cmd(E.CMD_RESOURCE_UNREF, [1, 0]));
  assert.equal(r.dev.display.source(0), null);
  r.ok(create2d(1, fmt, 8, 8));
});

Deno.test("GUEST blob on SET_SCANOUT_BLOB: pixels straight from guest pages, no bytes copied", async () => {
  using r = rig();
  const W = 32, H = 16, stride = W * 4 + 64, offset = 128;
  const size = offset + stride * H;
  const img = new Uint8Array(size);
  const px = pattern(W, H, 9);
  for (let y = 0; y < H; y++) img.set(px.subarray(y * W * 4, (y + 1) * W * 4), offset + y * stride);
  const parts = placeBacking(r.g.mem, img);
  r.ok(createBlob(4, P.VIRTIO_GPU_BLOB_MEM_GUEST, P.VIRTIO_GPU_BLOB_FLAG_USE_SHAREABLE, 0n, size, parts));
  const sb = (w: number, h: number, st: number, off: number, fmt = F.VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM) =>
    cmd(P.CMD_SET_SCANOUT_BLOB, [0, 0, W, H, 0, 4, w, h, fmt, 0, st, 0, 0, 0, off, 0, 0, 0]);
  r.err(sb(W, H, stride, offset + 128), P.RESP_ERR_INVALID_PARAMETER, /ends at/);
  r.err(sb(W, H, W * 2, offset), P.RESP_ERR_INVALID_PARAMETER, /stride/);
  r.err(sb(W, H, stride, offset, 5), P.RESP_ERR_INVALID_PARAMETER, /format/);
  r.err(setScanout(0, 4, 0, 0, W, H), P.RESP_ERR_INVALID_PARAMETER, /SET_SCANOUT_BLOB/);
  r.ok(sb(W, H, stride, offset));
  r.ok(flush(4, 0, 0, W, H));
  const shot = await decodePngRgba(await r.dev.screenshot());
  for (let i = 0; i < W * H; i++) {
    assert.deepEqual([...shot.rgba.subarray(4 * i, 4 * i + 4)], expectRgba(F.VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM, px, i));
  }
  const s = r.dev.gpuStats();
  assert.equal(s.totals.bytesCopied, 0);
  assert.equal(s.resources["4"].copiesAvoidedBytes, W * H * 4);
  // A 2D transfer on a GUEST blob is a no-op that copies nothing.
  r.ok(transfer2d(4, 0, 0, 1, 1, 0));
  assert.equal(r.dev.gpuStats().totals.bytesCopied, 0);
});

Deno.test("fences: responses held until retired, completed in order per (context, ring)", () => {
  const backend = new FakeBackend();
  using r = rig({ backend });
  assert.ok(r.acked & P.VIRTIO_GPU_F_VIRGL && r.acked & P.VIRTIO_GPU_F_CONTEXT_INIT);
  const cfg = new DataView(r.drv.readConfig(0, P.GPU_CONFIG_SIZE).buffer);
  assert.equal(cfg.getUint32(P.GPU_CFG_NUM_CAPSETS, true), 2);
  r.ok(ctxCreate(1, P.VIRTIO_GPU_CAPSET_VIRGL2));
  r.ok(ctxCreate(2, P.VIRTIO_GPU_CAPSET_VIRGL2));
  const F_ = P.VIRTIO_GPU_FLAG_FENCE | P.VIRTIO_GPU_FLAG_INFO_RING_IDX;
  const q = r.drv.queues[0];
  const a = r.post(submit(1, new Uint8Array(4), { flags: F_, fenceId: 1n, ringIdx: 0 }));
  const b = r.post(submit(1, new Uint8Array(4), { flags: F_, fenceId: 2n, ringIdx: 0 }));
  const c = r.post(submit(1, new Uint8Array(4), { flags: F_, fenceId: 3n, ringIdx: 0 }));
  const other = r.post(submit(2, new Uint8Array(4), { flags: F_, fenceId: 1n, ringIdx: 1 }));
  // A failing fenced command behind pending ones waits for them (bad ctx in hdr would be a different
  // timeline, so use an unknown resource in the same context and ring).
  const bad = r.post(cmd(P.CMD_CTX_ATTACH_RESOURCE, [999, 0], { flags: F_, fenceId: 4n, ctxId: 1, ringIdx: 0 }));
  assert.deepEqual(q.used(), [], "all held");
  assert.equal(backend.fences.length, 4, "four fences asked from the backend (not the failed command)");
  // Retire out of order: the other timeline first, then fence 2 of ctx 1 (which implies 1).
  backend.retire({ ctxId: 2, ringIdx: 1, perContext: true }, 1n);
  assert.deepEqual(q.used().map((u) => u.id), [other.head]);
  backend.retire({ ctxId: 1, ringIdx: 0, perContext: true }, 2n);
  assert.deepEqual(q.used().map((u) => u.id), [a.head, b.head], "1 then 2, in order");
  backend.retire({ ctxId: 1, ringIdx: 0, perContext: true }, 1n); // stale: nothing more
  assert.deepEqual(q.used(), []);
  backend.retire({ ctxId: 1, ringIdx: 0, perContext: true }, 3n);
  assert.deepEqual(q.used().map((u) => u.id), [c.head, bad.head], "3, then the failed command behind it");
  const ra = a.read(P.HDR_SIZE);
  assert.equal(ra.type, P.RESP_OK_NODATA);
  assert.equal(ra.view.getUint32(P.HDR_FLAGS, true), F_, "fence flags echoed");
  assert.equal(ra.view.getBigUint64(P.HDR_FENCE_ID, true), 1n);
  assert.equal(ra.view.getUint32(P.HDR_CTX_ID, true), 1);
  assert.equal(bad.read(P.HDR_SIZE).type, P.RESP_ERR_INVALID_RESOURCE_ID);
  assert.equal(other.read(P.HDR_SIZE).view.getUint8(P.HDR_RING_IDX), 1);
  // Global timeline (FENCE without INFO_RING_IDX).
  const g1 = r.post(cmd(P.CMD_GET_DISPLAY_INFO, [], { flags: P.VIRTIO_GPU_FLAG_FENCE, fenceId: 10n }), 512);
  assert.deepEqual(q.used(), []);
  backend.retire({ ctxId: 0, ringIdx: 0, perContext: false }, 10n);
  assert.deepEqual(q.used().map((u) => u.id), [g1.head]);
  assert.ok(r.irqs.n > 0);
  const st = r.dev.gpuStats().fences;
  assert.equal(st.pending, 0);
  // A bad ring index is refused at once.
  r.err(
    submit(1, new Uint8Array(4), { flags: F_, fenceId: 5n, ringIdx: 200 }),
    P.RESP_ERR_INVALID_PARAMETER,
    /ring_idx/,
  );
});

Deno.test("capsets and contexts through the fake backend", () => {
  const backend = new FakeBackend();
  using r = rig({ backend });
  const i1 = r.ok(cmd(P.CMD_GET_CAPSET_INFO, [1, 0]), P.RESP_OK_CAPSET_INFO);
  assert.deepEqual([0, 4, 8].map((o) => i1.view.getUint32(P.HDR_SIZE + o, true)), [2, 2, 16]);
  r.err(cmd(P.CMD_GET_CAPSET_INFO, [2, 0]), P.RESP_ERR_INVALID_PARAMETER, /capset index 2/);
  const cs = r.ok(cmd(P.CMD_GET_CAPSET, [2, 2]), P.RESP_OK_CAPSET);
  assert.equal(cs.len, P.HDR_SIZE + 16);
  assert.ok(cs.bytes.subarray(P.HDR_SIZE).every((b) => b === 2));
  r.err(cmd(P.CMD_GET_CAPSET, [2, 3]), P.RESP_ERR_INVALID_PARAMETER, /version 3/);
  r.err(ctxCreate(0), P.RESP_ERR_INVALID_CONTEXT_ID);
  r.err(ctxCreate(3, P.VIRTIO_GPU_CAPSET_VENUS), P.RESP_ERR_INVALID_PARAMETER, /capset 4/);
  r.ok(ctxCreate(3, P.VIRTIO_GPU_CAPSET_VIRGL));
  r.err(ctxCreate(3), P.RESP_ERR_INVALID_CONTEXT_ID, /in use/);
  r.err(submit(4, new Uint8Array(8)), P.RESP_ERR_INVALID_CONTEXT_ID);
  r.err(cmd(P.CMD_SUBMIT_3D, [100, 0], { ctxId: 3 }), P.RESP_ERR_INVALID_PARAMETER, /announced/);
  r.err(cmd(P.CMD_CTX_DETACH_RESOURCE, [1, 0], { ctxId: 3 }), P.RESP_ERR_INVALID_RESOURCE_ID);
  r.ok(cmd(P.CMD_CTX_DESTROY, [], { ctxId: 3 }));
  r.err(cmd(P.CMD_CTX_DESTROY, [], { ctxId: 3 }), P.RESP_ERR_INVALID_CONTEXT_ID);
});

Deno.test("copy counters per resource and per context: TRANSFER_*_3D and virgl streams in SUBMIT_3D", () => {
  const backend = new FakeBackend();
  using r = rig({ backend });
  r.ok(ctxCreate(1, P.VIRTIO_GPU_CAPSET_VIRGL2));
  // A 2D texture 64x32 B8G8R8A8 (target 2) and a 4096-byte buffer (target 0, R8).
  const c3d = (id: number, target: number, format: number, w: number, h: number) =>
    cmd(P.CMD_RESOURCE_CREATE_3D, [id, target, format, 0, w, h, 1, 1, 0, 0, 0, 0]);
  r.ok(c3d(10, F.PIPE_TEXTURE_2D, F.VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM, 64, 32));
  r.ok(c3d(11, F.PIPE_BUFFER, F.VIRGL_FORMAT_R8_UNORM, 4096, 1));
  r.ok(attach(10, [{ addr: DATA_BASE, len: 64 * 32 * 4 }]));
  r.ok(attach(11, [{ addr: DATA_BASE + MiB, len: 4096 }]));
  r.ok(cmd(P.CMD_CTX_ATTACH_RESOURCE, [10, 0], { ctxId: 1 }));
  r.ok(cmd(P.CMD_CTX_ATTACH_RESOURCE, [11, 0], { ctxId: 1 }));
  const t3d = (type: number, id: number, box: number[], stride = 0) =>
    cmd(type, [...box, 0n, id, 0, stride, 0], { ctxId: 1 });
  r.ok(t3d(P.CMD_TRANSFER_TO_HOST_3D, 10, [0, 0, 0, 64, 32, 1]));
  r.ok(t3d(P.CMD_TRANSFER_FROM_HOST_3D, 10, [0, 0, 0, 16, 8, 1], 256));
  r.ok(t3d(P.CMD_TRANSFER_TO_HOST_3D, 11, [0, 0, 0, 1000, 1, 1]));
  r.err(t3d(P.CMD_TRANSFER_TO_HOST_3D, 10, [0, 0, 0, 65, 32, 1]), P.RESP_ERR_INVALID_PARAMETER, /box outside/);
  r.err(t3d(P.CMD_TRANSFER_TO_HOST_3D, 11, [0, 0, 0, 4097, 1, 1]), P.RESP_ERR_INVALID_PARAMETER, /box outside/);
  r.err(t3d(P.CMD_TRANSFER_TO_HOST_3D, 10, [0, 0, 0, 64, 32, 1], 0xffff_ffff), P.RESP_ERR_INVALID_PARAMETER, /backing/);
  r.err(t3d(P.CMD_TRANSFER_TO_HOST_3D, 77, [0, 0, 0, 1, 1, 1]), P.RESP_ERR_INVALID_RESOURCE_ID);
  r.err(
    cmd(P.CMD_TRANSFER_TO_HOST_3D, [0, 0, 0, 1, 1, 1, 0n, 10, 0, 0, 0], { ctxId: 9 }),
    P.RESP_ERR_INVALID_CONTEXT_ID,
  );
  // A virgl stream: INLINE_WRITE of 100 bytes into the buffer, TRANSFER3D from host of 8x4 pixels of the texture.
  const iwWords = 25;
  const s: number[] = [
    (iwWords + 11) << 16 | VIRGL_CCMD_RESOURCE_INLINE_WRITE,
    11,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    100,
    1,
    1,
    ...new Array(iwWords).fill(0xabababab),
    13 << 16 | VIRGL_CCMD_TRANSFER3D,
    10,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    8,
    4,
    1,
    0,
    VIRGL_TRANSFER_FROM_HOST,
  ];
  const stream = new Uint8Array(new Uint32Array(s).buffer);
  r.ok(submit(1, stream));
  assert.deepEqual(backend.submits.at(-1)!.bytes, stream, "stream handed on unchanged");
  const st = r.dev.gpuStats();
  assert.equal(st.resources["10"].transferToHostBytes, 64 * 32 * 4);
  assert.equal(st.resources["10"].transferFromHostBytes, 16 * 8 * 4);
  assert.equal(st.resources["10"].streamFromHostBytes, 8 * 4 * 4);
  assert.equal(st.resources["11"].transferToHostBytes, 1000, "buffer: box width in bytes");
  assert.equal(st.resources["11"].inlineWriteBytes, 100);
  assert.equal(st.contexts["1"].bytesCopied, st.totals.bytesCopied);
  assert.equal(st.streams.submits, 1);
  assert.equal(st.streams.virglCommands, 2);
  assert.match(r.dev.summary(), /INLINE_WRITE 100 B/);
});

Deno.test("blob map/unmap through the SharedMemoryMapper: 5000 cycles, window bounds, overlap, double map", () => {
  const backend = new FakeBackend();
  const window = 64 * MiB;
  using r = rig({ backend, hostVisibleWindowSize: window });
  assert.deepEqual(r.dev.sharedMemoryRegions(), [{ id: P.VIRTIO_GPU_SHM_ID_HOST_VISIBLE, size: window }]);
  r.ok(ctxCreate(1, P.VIRTIO_GPU_CAPSET_VIRGL2));
  const MAP = P.VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE;
  const host3d = (id: number, size: number, flags = MAP) =>
    createBlob(id, P.VIRTIO_GPU_BLOB_MEM_HOST3D, flags, BigInt(id), size, [], 1);
  r.ok(host3d(20, 64 * 1024));
  r.ok(host3d(21, 5000)); // not a page multiple: mapped as 2 pages
  r.ok(host3d(22, 4096, 0)); // not mappable
  for (let i = 0; i < 5000; i++) {
    const m = r.ok(mapBlob(20, (i % 100) * 0x10000), P.RESP_OK_MAP_INFO);
    assert.equal(m.view.getUint32(P.HDR_SIZE, true), P.VIRTIO_GPU_MAP_CACHE_CACHED);
    r.ok(unmapBlob(20));
  }
  assert.equal(r.mapper.adds, 5000);
  assert.equal(r.mapper.removes, 5000);
  assert.equal(r.mapper.live.size, 0, "every slot freed on unmap");
  assert.equal(r.mapper.maxLive, 1);
  r.ok(mapBlob(20, 0), P.RESP_OK_MAP_INFO);
  assert.equal(r.mapper.live.get(0)!.length, 64 * 1024);
  r.err(mapBlob(20, 0x100000), P.RESP_ERR_INVALID_PARAMETER, /already mapped/);
  r.err(mapBlob(21, 0x8000), P.RESP_ERR_INVALID_PARAMETER, /overlaps resource 20/);
  r.err(mapBlob(21, window - 4096), P.RESP_ERR_INVALID_PARAMETER, /past the/);
  r.err(mapBlob(21, window), P.RESP_ERR_INVALID_PARAMETER, /outside the window/);
  r.err(mapBlob(21, 0x10000n + 12n), P.RESP_ERR_INVALID_PARAMETER, /outside the window/);
  r.err(mapBlob(21, 0xffff_ffff_ffff_f000n), P.RESP_ERR_INVALID_PARAMETER, /outside the window/);
  r.err(mapBlob(22, 0x100000), P.RESP_ERR_INVALID_PARAMETER, /not a mappable blob/);
  r.err(mapBlob(99, 0x100000), P.RESP_ERR_INVALID_RESOURCE_ID);
  r.ok(mapBlob(21, 0x10000), P.RESP_OK_MAP_INFO);
  assert.equal(r.mapper.live.get(0x10000)!.length, 8192, "rounded up to the page");
  r.err(unmapBlob(22), P.RESP_ERR_INVALID_PARAMETER, /not mapped/);
  r.err(
    cmd(P.CMD_TRANSFER_TO_HOST_3D, [0, 0, 0, 16, 1, 1, 0n, 20, 0, 0, 0], { ctxId: 1 }),
    P.RESP_ERR_INVALID_PARAMETER,
    /mapped blob/,
  );
  // The mapper failing (no free slot) is an OUT_OF_MEMORY answer and the backend mapping is undone.
  r.ok(host3d(23, 4096));
  r.mapper.failNext = true;
  r.err(mapBlob(23, 0x200000), P.RESP_ERR_OUT_OF_MEMORY, /no free memory slot/);
  assert.ok(!backend.mapped.has(23));
  const st = r.dev.gpuStats();
  assert.equal(st.mapped.count, 2);
  assert.equal(st.mapped.bytes, 64 * 1024 + 8192);
  assert.equal(st.resources["20"].blobMaps, 5001);
  assert.equal(st.totals.bytesCopied, 0, "mapping copies nothing");
  // Unref of a mapped blob removes its mapping.
  r.ok(cmd(P.CMD_RESOURCE_UNREF, [20, 0]));
  assert.ok(!r.mapper.live.has(0));
  // Reset drops the rest.
  r.drv.writeReg(0x070, 0);
  assert.equal(r.mapper.live.size, 0);
  assert.equal(backend.mapped.size, 0);
});

Deno.test("trace file: one complete event per command, Chrome trace-event JSON", () => {
  const path = Deno.makeTempFileSync({ suffix: ".json" });
  try {
    {
      using r = rig({ tracePath: path });
      r.ok(create2d(1, F.VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM, 64, 32));
      r.ok(attach(1, [{ addr: DATA_BASE, len: 64 * 32 * 4 }]));
      r.ok(transfer2d(1, 0, 0, 64, 32, 0));
      r.err(transfer2d(2, 0, 0, 1, 1, 0), P.RESP_ERR_INVALID_RESOURCE_ID);
    }
    const events = JSON.parse(Deno.readTextFileSync(path)) as {
      name: string;
      ph: string;
      ts: number;
      dur: number;
      args: Record<string, unknown>;
    }[];
    const x = events.filter((e) => e.ph === "X");
    assert.deepEqual(x.map((e) => e.name), [
      "RESOURCE_CREATE_2D",
      "RESOURCE_ATTACH_BACKING",
      "TRANSFER_TO_HOST_2D",
      "TRANSFER_TO_HOST_2D",
    ]);
    assert.deepEqual(x[2].args, { resource: 1, bytes: 8192, ctx: 0 });
    assert.equal(x[3].args.error, "0x1203");
    for (const e of x) assert.ok(e.ts >= 0 && e.dur >= 0);
  } finally {
    Deno.removeSync(path);
  }
});

Deno.test("trace file: a fenced command's wait for its fence is an event on the fence track", () => {
  const path = Deno.makeTempFileSync({ suffix: ".json" });
  try {
    {
      const backend = new FakeBackend();
      using r = rig({ backend, tracePath: path });
      r.ok(ctxCreate(1, P.VIRTIO_GPU_CAPSET_VIRGL2));
      const F_ = P.VIRTIO_GPU_FLAG_FENCE | P.VIRTIO_GPU_FLAG_INFO_RING_IDX;
      r.post(submit(1, new Uint8Array(4), { flags: F_, fenceId: 7n, ringIdx: 0 }));
      backend.retire({ ctxId: 1, ringIdx: 0, perContext: true }, 7n);
    }
    const events = JSON.parse(Deno.readTextFileSync(path)) as {
      name: string;
      ph: string;
      cat: string;
      tid: number;
      dur: number;
      args: Record<string, unknown>;
    }[];
    const fences = events.filter((e) => e.name === "FENCE");
    assert.equal(fences.length, 1);
    assert.equal(fences[0].tid, FENCE_TID);
    assert.equal(fences[0].cat, "fence");
    assert.deepEqual(fences[0].args, { resource: 0, bytes: 0, ctx: 1, fence: 7 });
    assert.ok(fences[0].dur >= 0);
  } finally {
    Deno.removeSync(path);
  }
});

Deno.test("property: random commands on both queues never throw and never touch memory outside the guest", () => {
  const backend = new FakeBackend();
  backend.retireAtOnce = true;
  using r = rig({ backend });
  r.ok(ctxCreate(1, P.VIRTIO_GPU_CAPSET_VIRGL2));
  r.ok(create2d(1, F.VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM, 16, 16));
  const types = Object.keys(P.COMMAND_NAMES).map(Number);
  fc.assert(
    fc.property(
      fc.constantFrom(...types),
      fc.integer({ min: 0, max: 3 }),
      fc.uint8Array({ minLength: 0, maxLength: 200 }),
      fc.boolean(),
      (type, flags, body, cursorQ) => {
        const c = cmd(type, [], { flags, fenceId: 1n, ctxId: body[0] & 1 }, body);
        // Keep guest addresses in entries inside a plausible range sometimes.
        const q = cursorQ ? 1 : 0;
        const sub = r.drv.queues[q].submit([c, 1100]);
        r.drv.kick(q);
        const used = r.drv.queues[q].used();
        assert.equal(used.length, 1);
        assert.equal(used[0].id, sub.head);
      },
    ),
    { numRuns: 400 },
  );
  assert.ok(r.g.canaryIntact());
});

Deno.test("TRANSFER_FROM_HOST_3D of a 2D resource writes its pixels back into the guest's backing, at offset and stride", () => {
  const backend = new FakeBackend();
  using r = rig({ backend });
  r.ok(ctxCreate(1, P.VIRTIO_GPU_CAPSET_VIRGL2));
  const w = 16, h = 8;
  const px = pattern(w, h, 7);
  r.g.mem.write(DATA_BASE, px);
  r.ok(create2d(5, F.VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM, w, h));
  r.ok(attach(5, [{ addr: DATA_BASE, len: px.length }]));
  r.ok(transfer2d(5, 0, 0, w, h, 0));
  r.g.mem.fill(DATA_BASE, px.length); // the guest's copy is gone; the host's stays
  // A 4x3 box at (2, 1), packed with the resource's row stride, the first row at its place in the backing.
  const stride = w * 4;
  const offset = 1 * stride + 2 * 4;
  r.ok(cmd(P.CMD_TRANSFER_FROM_HOST_3D, [2, 1, 0, 4, 3, 1, BigInt(offset), 5, 0, stride, 0], { ctxId: 1 }));
  const back = r.g.mem.read(DATA_BASE, px.length);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const i = (y * w + x) * 4;
      const inBox = x >= 2 && x < 6 && y >= 1 && y < 4;
      assert.deepEqual([...back.subarray(i, i + 4)], inBox ? [...px.subarray(i, i + 4)] : [0, 0, 0, 0], `(${x}, ${y})`);
    }
  }
  // Without backing the transfer fails with the resource named, as the 2D transfer does.
  r.ok(cmd(P.CMD_RESOURCE_DETACH_BACKING, [5, 0]));
  r.err(
    cmd(P.CMD_TRANSFER_FROM_HOST_3D, [0, 0, 0, 1, 1, 1, 0n, 5, 0, 0, 0], { ctxId: 1 }),
    P.RESP_ERR_UNSPEC,
    /resource 5 has no backing/,
  );
});

Deno.test("Backend2D on its own: what it has not (3D, capsets, contexts, host blobs, mappings) is refused with a status", () => {
  const g = new GuardedGuestMemory([{ start: 0, size: MiB }]);
  const b = new Backend2D();
  const refused = (f: () => unknown, status: number, re: RegExp) =>
    assert.throws(
      f,
      (e: Error) => e.name === "GpuBackendError" && (e as GpuBackendError).response === status && re.test(e.message),
    );
  try {
    assert.deepEqual(b.capsets(), []);
    refused(() => b.getCapset(1, 1), P.RESP_ERR_INVALID_PARAMETER, /no capset 1/);
    refused(() => b.createContext(3), P.RESP_ERR_UNSPEC, /no contexts \(ctx 3\)/);
    refused(() => b.submit3D(3, new Uint8Array(4)), P.RESP_ERR_UNSPEC, /cannot run 3D/);
    refused(() => b.mapResource(4), P.RESP_ERR_INVALID_PARAMETER, /cannot map resource 4/);
    refused(() => b.unmapResource(4), P.RESP_ERR_INVALID_PARAMETER, /resource 4 is not mapped/);
    refused(
      () => b.createResource3D({ resourceId: 9 } as Create3D),
      P.RESP_ERR_UNSPEC,
      /no 3D resources/,
    );
    refused(
      () => b.createResource2D({ resourceId: 1, format: 999, width: 4, height: 4 }),
      P.RESP_ERR_INVALID_PARAMETER,
      /format 999/,
    );
    const blob = { ctxId: 0, blobFlags: 0, blobId: 0n, size: 4096 };
    refused(
      () => b.createBlob({ resourceId: 2, blobMem: P.VIRTIO_GPU_BLOB_MEM_HOST3D, ...blob }),
      P.RESP_ERR_INVALID_PARAMETER,
      /only has GUEST blobs/,
    );
    refused(() => b.hostContents(77), P.RESP_ERR_INVALID_RESOURCE_ID, /no resource 77/);

    // A 2x2 resource and a GUEST blob over the same page.
    const backing: Backing = { mem: g.mem, entries: [{ guestAddr: 0x1000, len: 4096, hostAddr: 0n }], size: 4096 };
    b.createResource2D({ resourceId: 1, format: F.VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM, width: 2, height: 2 });
    b.createBlob({ resourceId: 2, blobMem: P.VIRTIO_GPU_BLOB_MEM_GUEST, backing, ...blob });
    const box = { x: 0, y: 0, z: 0, w: 2, h: 2, d: 1 };
    const t = { resourceId: 1, ctxId: 0, box, offset: 0, level: 0, stride: 0, layerStride: 0 };
    refused(() => b.transferFromHost(t), P.RESP_ERR_UNSPEC, /resource 1 has no backing/);
    refused(() => b.attachBacking(2, backing), P.RESP_ERR_INVALID_PARAMETER, /resource 2 is a blob/);
    b.attachBacking(1, backing);
    refused(() => b.transferFromHost({ ...t, box: { ...box, w: 3 } }), P.RESP_ERR_INVALID_PARAMETER, /box outside/);
    refused(() => b.transferToHost({ ...t, box: { ...box, h: 3 } }), P.RESP_ERR_INVALID_PARAMETER, /box outside/);
    // The backing reader refuses a range past its end (the device checks first; this is the last line).
    refused(() => b.transferToHost({ ...t, offset: 4096 - 8 }), P.RESP_ERR_INVALID_PARAMETER, /beyond 4096 bytes/);
    refused(
      () => b.readPixels(1, { x: 1, y: 1, width: 2, height: 1 }),
      P.RESP_ERR_INVALID_PARAMETER,
      /rect outside resource 1/,
    );
    refused(
      () => b.readPixels(2, { x: 0, y: 0, width: 1, height: 1 }),
      P.RESP_ERR_INVALID_PARAMETER,
      /without an image layout/,
    );
    refused(() => b.hostContents(2), P.RESP_ERR_INVALID_PARAMETER, /resource 2 is a blob/);
    refused(() => b.restoreHostContents(1, new Uint8Array(15)), P.RESP_ERR_INVALID_PARAMETER, /15 bytes do not fit/);
    refused(() => b.restoreHostContents(2, new Uint8Array(16)), P.RESP_ERR_INVALID_PARAMETER, /do not fit resource 2/);
    // A transfer from the host into a GUEST blob has nothing to copy; the guest's page is untouched.
    g.mem.write(0x1000, Uint8Array.of(1, 2, 3, 4));
    b.transferFromHost({ ...t, resourceId: 2 });
    assert.deepEqual([...g.mem.read(0x1000, 4)], [1, 2, 3, 4]);
    // Restored contents are what the host copy holds and what the next transfer from the host writes back.
    b.restoreHostContents(1, new Uint8Array(16).fill(0x5a));
    assert.deepEqual([...b.hostContents(1)], new Array(16).fill(0x5a));
    b.transferFromHost(t);
    assert.deepEqual([...g.mem.read(0x1000, 16)], new Array(16).fill(0x5a));
    assert.deepEqual([...g.mem.read(0x1000 + 16, 4)], [0, 0, 0, 0], "nothing past the box");
  } finally {
    b.close();
    assert.ok(g.canaryIntact());
    g.close();
  }
});
