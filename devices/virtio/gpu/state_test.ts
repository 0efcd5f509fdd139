// virtio-gpu saved state, driven through virtio-mmio by the test driver: a device with 2D resources, a
// GUEST blob, scanouts, a cursor and retired fences is saved, encoded, decoded and restored into a fresh
// device (whose guest memory holds the same pages, as a snapshot's would); the restored screen has the
// same pixels and the next commands go on from there. Also: quiescent() while a fence is pending, the
// refusal with virglrenderer contexts, and malformed records.

import assert from "node:assert/strict";
import { GpuDevice } from "./device.ts";
import { Backend2D } from "./backend_2d.ts";
import type { FenceHandler, FenceTimeline, GpuBackend } from "./backend.ts";
import * as P from "./protocol.ts";
import * as F from "./formats.ts";
import { decodePngRgba } from "./png.ts";
import { GPU_3D_NOT_SAVABLE } from "./executor.ts";
import { GPU_STATE_TYPE, GPU_STATE_VERSION } from "./state.ts";
import { PIPE_BIND_SAMPLER_VIEW } from "./virgl_stream.ts";
import {
  VIRTIO_MMIO_STATUS,
  VIRTIO_STATUS_ACKNOWLEDGE,
  VIRTIO_STATUS_DRIVER,
  VIRTIO_STATUS_FEATURES_OK,
} from "../mmio.ts";
import { guestLog } from "../../../core/log.ts";
import { decodeState, type DeviceState, encodeState, StateError, type StateValue } from "../../../core/state.ts";
import { GuardedGuestMemory } from "../../../test/support/virtio_driver.ts";
import {
  attach,
  cmd,
  create2d,
  createBlob,
  ctxCreate,
  flush,
  pattern,
  setScanout,
  setScanoutBlob,
  transfer2d,
} from "../../../test/support/gpu_commands.ts";
import { closeGuardedDevice, mmioRig } from "../../../test/support/device_rig.ts";

const MiB = 1024 * 1024;
/** Rings and commands live below this; resource backing pages above it. */
const ARENA_END = 8 * MiB;
const DATA_BASE = 8 * MiB;
const GUEST_SIZE = 16 * MiB;
const DISPLAYS = [{ width: 48, height: 32 }, { width: 32, height: 16 }];
const FENCE = P.VIRTIO_GPU_FLAG_FENCE;
const GLOBAL: FenceTimeline = { ctxId: 0, ringIdx: 0, perContext: false };

/** A 2D backend whose fences retire only when the test says so. */
class SlowFenceBackend extends Backend2D {
  #handler: FenceHandler | null = null;
  readonly fences: bigint[] = [];
  override setFenceHandler(h: FenceHandler): void {
    this.#handler = h;
  }
  override createFence(_t: FenceTimeline, id: bigint): void {
    this.fences.push(id);
  }
  retire(t: FenceTimeline, id: bigint): void {
    this.#handler!(t, id);
  }
}

interface Resp {
  type: number;
  view: DataView;
}

/**
 * A GPU on virtio-mmio over guarded guest memory. With `restore`, the state is taken before the driver
 * starts the device, and the driver then starts it without a reset (as a restored transport does).
 */
function side(opts: { backend?: GpuBackend; restore?: DeviceState; pagesFrom?: GuardedGuestMemory } = {}) {
  const g = new GuardedGuestMemory([{ start: 0, size: GUEST_SIZE }]);
  if (opts.pagesFrom) g.mem.write(DATA_BASE, opts.pagesFrom.mem.read(DATA_BASE, GUEST_SIZE - DATA_BASE));
  const dev = new GpuDevice({ backend: opts.backend ?? new Backend2D(), displays: DISPLAYS });
  if (opts.restore) dev.restoreState(opts.restore);
  const { drv } = mmioRig(dev, g.mem, ARENA_END);
  if (opts.restore) {
    // negotiate() without its status-0 write, which would reset the device.
    drv.writeReg(VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE);
    drv.writeReg(VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
    drv.writeDriverFeatures(drv.deviceFeatures());
    drv.writeReg(VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK);
    for (let i = 0; i < dev.queueMaxSizes.length; i++) drv.setupQueue(i);
    drv.driverOk();
  } else {
    drv.init();
  }
  const base = drv.alloc.mark();
  const read = (addr: number, len: number): Resp => {
    const bytes = g.mem.read(addr, len);
    return { type: new DataView(bytes.buffer).getUint32(0, true), view: new DataView(bytes.buffer) };
  };
  return {
    g,
    dev,
    drv,
    /** Send one command on `queue` and expect it answered now with `expect`. */
    ok(c: Uint8Array, expect = P.RESP_OK_NODATA, queue = 0): Resp {
      const q = drv.queues[queue];
      const sub = q.submit([c, 256]);
      drv.kick(queue);
      const used = q.used();
      assert.equal(used.length, 1, "answered at once");
      const r = read(sub.buffers[1].addr, used[0].len);
      drv.alloc.resetTo(base);
      assert.equal(r.type, expect, `response 0x${r.type.toString(16)}, want 0x${expect.toString(16)}`);
      return r;
    },
    /** Send a command that may be held; returns its head and a reader for the response. */
    post(c: Uint8Array) {
      const sub = drv.queues[0].submit([c, 256]);
      drv.kick(0);
      return { head: sub.head, read: () => read(sub.buffers[1].addr, P.HDR_SIZE) };
    },
    [Symbol.dispose]() {
      closeGuardedDevice(g, dev);
    },
  };
}

/** Places `data` at `addr` as two uneven backing entries 64 KiB apart. */
function place(mem: GuardedGuestMemory["mem"], data: Uint8Array, addr: number) {
  const cut = Math.floor(data.length / 3);
  mem.write(addr, data.subarray(0, cut));
  mem.write(addr + 0x10000, data.subarray(cut));
  return [{ addr, len: cut }, { addr: addr + 0x10000, len: data.length - cut }];
}

const updateCursor = (scanout: number, x: number, y: number, id: number, hx: number, hy: number) =>
  cmd(P.CMD_UPDATE_CURSOR, [scanout, x, y, 0, id, hx, hy, 0]);
const fenced = (c: Uint8Array, fenceId: bigint): Uint8Array => {
  const out = c.slice();
  const v = new DataView(out.buffer);
  v.setUint32(P.HDR_FLAGS, FENCE, true);
  v.setBigUint64(P.HDR_FENCE_ID, fenceId, true);
  return out;
};

const W = 48, H = 32, BW = 32, BH = 16;
const FMT = F.VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM;

/** Scanout 0: 2D resource 7 (transferred, flushed); scanout 1: GUEST blob 8; resource 9 unbacked; cursor. */
function populate(a: ReturnType<typeof side>) {
  a.ok(create2d(7, FMT, W, H));
  a.ok(attach(7, place(a.g.mem, pattern(W, H, 1), DATA_BASE)));
  a.ok(transfer2d(7, 0, 0, W, H, 0));
  a.ok(setScanout(0, 7, 0, 0, W, H));
  a.ok(fenced(flush(7, 0, 0, W, H), 5n));
  const blobPx = pattern(BW, BH, 2);
  a.ok(createBlob(8, P.VIRTIO_GPU_BLOB_MEM_GUEST, 0, 3n, blobPx.length, place(a.g.mem, blobPx, DATA_BASE + MiB)));
  a.ok(setScanoutBlob(1, 8, BW, BH, F.VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM, BW * 4));
  a.ok(flush(8, 0, 0, BW, BH));
  a.ok(create2d(9, F.VIRTIO_GPU_FORMAT_R8G8B8A8_UNORM, 16, 16));
  a.ok(updateCursor(1, 10, 4, 9, 2, 3), P.RESP_OK_NODATA, 1);
  a.dev.displayChanged();
}

async function pixels(dev: GpuDevice, id: number): Promise<Uint8Array> {
  return (await decodePngRgba(await dev.screenshot(id))).rgba;
}

Deno.test("state: 2D resources, GUEST blob, scanouts, cursor and fences round-trip into a fresh device", async () => {
  using a = side();
  populate(a);
  assert.ok(a.dev.quiescent());
  const saved = a.dev.saveState();
  assert.equal(saved.type, GPU_STATE_TYPE);
  assert.equal(saved.version, GPU_STATE_VERSION);
  const bytes = encodeState(saved);

  using b = side({ restore: decodeState(bytes), pagesFrom: a.g });
  // The screen is the same before the guest sends anything.
  for (const id of [0, 1]) assert.deepEqual(await pixels(b.dev, id), await pixels(a.dev, id), `scanout ${id}`);
  assert.deepEqual(b.dev.cursor, { scanoutId: 1, x: 10, y: 4, resourceId: 9, hotX: 2, hotY: 3 });
  const cfg = new DataView(b.drv.readConfig(0, P.GPU_CONFIG_SIZE).buffer);
  assert.equal(cfg.getUint32(P.GPU_CFG_EVENTS_READ, true), P.VIRTIO_GPU_EVENT_DISPLAY, "events_read kept");
  // Saving the restored device gives the same record: nothing was dropped on the way.
  assert.deepEqual(encodeState(b.dev.saveState()), bytes);

  // The resource ids are known: 7 exists, 9 can be unreferenced, 8 is still a blob.
  b.ok(create2d(7, FMT, 4, 4), P.RESP_ERR_INVALID_RESOURCE_ID);
  b.ok(setScanout(0, 8, 0, 0, BW, BH), P.RESP_ERR_INVALID_PARAMETER);
  // Resource 7's backing was re-attached: new guest pixels transferred and flushed show on scanout 0.
  const next = pattern(W, H, 3);
  place(b.g.mem, next, DATA_BASE);
  b.ok(transfer2d(7, 0, 0, W, H, 0));
  // Fence ids go on from 5 on the global timeline; the response echoes the new one.
  const r = b.ok(fenced(flush(7, 0, 0, W, H), 6n));
  assert.equal(r.view.getBigUint64(P.HDR_FENCE_ID, true), 6n);
  const shown = await pixels(b.dev, 0);
  for (let i = 0; i < W * H; i++) {
    const want = [next[4 * i + 2], next[4 * i + 1], next[4 * i], 0xff];
    assert.deepEqual([...shown.subarray(4 * i, 4 * i + 4)], want, `pixel ${i}`);
  }
  // The GUEST blob reads the restored guest pages.
  const blobNext = pattern(BW, BH, 4);
  place(b.g.mem, blobNext, DATA_BASE + MiB);
  b.ok(flush(8, 0, 0, BW, BH));
  const blobShown = await pixels(b.dev, 1);
  assert.deepEqual([...blobShown.subarray(0, 3)], [blobNext[2], blobNext[1], blobNext[0]]);
  b.ok(cmd(P.CMD_RESOURCE_UNREF, [9, 0]));
  assert.equal(b.dev.cursor?.resourceId, 0, "unref of the cursor's resource clears it");
  assert.equal(b.dev.guestErrors, 2, "only the two refused commands were guest errors");
});

Deno.test("state: restore into a device the driver already started attaches the backing at once", async () => {
  using a = side();
  populate(a);
  const saved = decodeState(encodeState(a.dev.saveState()));
  using b = side({ pagesFrom: a.g });
  b.dev.restoreState(saved);
  for (const id of [0, 1]) assert.deepEqual(await pixels(b.dev, id), await pixels(a.dev, id), `scanout ${id}`);
  b.ok(transfer2d(7, 0, 0, W, H, 0));
  b.ok(flush(8, 0, 0, BW, BH));
  assert.throws(() => b.dev.restoreState(saved), StateError, "a device with resources takes no state");
});

Deno.test("state: quiescent() is false while a fenced command waits; saveState refuses then", () => {
  const backend = new SlowFenceBackend();
  using a = side({ backend });
  a.ok(create2d(1, FMT, 8, 8));
  const held = a.post(fenced(cmd(P.CMD_GET_DISPLAY_INFO), 11n));
  assert.deepEqual(a.drv.queues[0].used(), [], "held for its fence");
  assert.equal(a.dev.quiescent(), false);
  assert.throws(() => a.dev.saveState(), (e) => e instanceof StateError && /fenced/.test(e.message));
  backend.retire(GLOBAL, 11n);
  assert.deepEqual(a.drv.queues[0].used().map((u) => u.id), [held.head]);
  assert.equal(held.read().type, P.RESP_OK_DISPLAY_INFO);
  assert.ok(a.dev.quiescent());
  const saved = decodeState(encodeState(a.dev.saveState()));

  // Restored, the timeline knows fence 11 retired: a fence at or below it waits for nothing, a later one
  // waits for the backend.
  const backend2 = new SlowFenceBackend();
  using b = side({ backend: backend2, restore: saved, pagesFrom: a.g });
  b.ok(fenced(cmd(P.CMD_GET_DISPLAY_INFO), 11n), P.RESP_OK_DISPLAY_INFO);
  const later = b.post(fenced(cmd(P.CMD_GET_DISPLAY_INFO), 12n));
  assert.deepEqual(b.drv.queues[0].used(), []);
  assert.deepEqual(backend2.fences, [11n, 12n]);
  backend2.retire(GLOBAL, 12n);
  assert.deepEqual(b.drv.queues[0].used().map((u) => u.id), [later.head]);
});

Deno.test("state: a restored backing outside guest memory is one log line at activation, not a crash", () => {
  using a = side();
  a.ok(create2d(7, FMT, 4, 4));
  a.ok(attach(7, [{ addr: DATA_BASE, len: 64 }]));
  const data = structuredClone(a.dev.saveState().data) as Record<string, StateValue>;
  const r = (data.resources as Record<string, StateValue>[])[0];
  r.backing = [{ guestAddr: GUEST_SIZE - 16, len: 64 }];
  const lines: string[] = [];
  const old = guestLog.sink;
  guestLog.sink = (l) => lines.push(l);
  try {
    using b = side({ restore: { type: GPU_STATE_TYPE, version: GPU_STATE_VERSION, data } });
    assert.equal(b.dev.guestErrors, 1);
    assert.match(lines.join("\n"), /restored resource 7: backing not attached/);
    b.ok(transfer2d(7, 0, 0, 4, 4, 0), P.RESP_ERR_UNSPEC);
  } finally {
    guestLog.sink = old;
  }
});

// ---- virglrenderer: 3D state cannot be saved ----

let virgl: (() => GpuBackend) | undefined;
try {
  const { VirglBackend } = await import("./backend_virgl.ts");
  new VirglBackend().close();
  virgl = () => new VirglBackend();
} catch (e) {
  console.log(`state_test: virgl cases skipped: virglrenderer unavailable: ${(e as Error).message}`);
}

Deno.test({
  name: "state: with a virglrenderer context or 3D resource alive, saveState throws one clear line",
  ignore: virgl === undefined,
  fn() {
    using a = side({ backend: virgl!() });
    a.ok(ctxCreate(1));
    assert.throws(() => a.dev.saveState(), (e) => e instanceof StateError && e.message === GPU_3D_NOT_SAVABLE);
    assert.equal(GPU_3D_NOT_SAVABLE, "virtio-gpu: 3D contexts (virglrenderer) cannot be saved");
    a.ok(cmd(P.CMD_CTX_DESTROY, [], { ctxId: 1 }));
    a.ok(
      cmd(P.CMD_RESOURCE_CREATE_3D, [
        20,
        F.PIPE_TEXTURE_2D,
        F.VIRGL_FORMAT_R8_UNORM,
        PIPE_BIND_SAMPLER_VIEW,
        8,
        8,
        1,
        1,
        0,
        0,
        0,
        0,
      ]),
    );
    assert.throws(() => a.dev.saveState(), (e) => e instanceof StateError && e.message === GPU_3D_NOT_SAVABLE);
    a.ok(cmd(P.CMD_RESOURCE_UNREF, [20, 0]));
    // Nothing of the renderer's left: the state saves.
    assert.equal(a.dev.saveState().type, GPU_STATE_TYPE);
  },
});

// ---- malformed records ----

Deno.test("state: wrong kind, version, configuration or malformed fields are refused with StateError", () => {
  using a = side();
  populate(a);
  const good = a.dev.saveState();
  const fresh = () => new GpuDevice({ backend: new Backend2D(), displays: DISPLAYS });
  const refuse = (state: DeviceState, re: RegExp, dev = fresh()) => {
    try {
      assert.throws(() => dev.restoreState(state), (e) => e instanceof StateError && re.test(e.message), `${re}`);
    } finally {
      dev.close();
    }
  };
  /** The good record with one change made by `edit` on a deep copy of its data. */
  const bad = (edit: (d: Record<string, StateValue>) => void): DeviceState => {
    const data = decodeState(encodeState(good)).data as Record<string, StateValue>;
    edit(data);
    return { type: good.type, version: good.version, data };
  };
  const res = (d: Record<string, StateValue>, i: number) => (d.resources as Record<string, StateValue>[])[i];
  const scan = (d: Record<string, StateValue>, i: number) => (d.scanouts as Record<string, StateValue>[])[i];
  const src = (d: Record<string, StateValue>, i: number) => scan(d, i).source as Record<string, StateValue>;

  refuse({ ...good, type: "virtio-blk" }, /virtio-blk state cannot be restored into virtio-gpu/);
  refuse({ ...good, version: 2 }, /version 2/);
  const other = new GpuDevice({ backend: new Backend2D(), displays: [{ width: 48, height: 32 }] });
  refuse(good, /scanouts 48x32, 32x16, this device has 48x32/, other);
  refuse(bad((d) => d.config = null), /config: expected a record/);
  // A refused record leaves nothing behind: the good one still restores into the same device.
  const once = fresh();
  assert.throws(() => once.restoreState(bad((d) => res(d, 2).id = 7)), StateError);
  once.restoreState(good);
  assert.equal(once.cursor?.resourceId, 9);
  once.close();
  refuse(bad((d) => (d.config as Record<string, StateValue>).eventsRead = -1), /eventsRead/);
  refuse(bad((d) => res(d, 0).id = 0), /id/);
  refuse(bad((d) => res(d, 0).id = 1.5), /not an integer/);
  refuse(bad((d) => res(d, 2).id = 7), /resource 7 saved twice/);
  refuse(bad((d) => res(d, 0).kind = "3d"), /unknown kind "3d"/);
  refuse(bad((d) => res(d, 0).format = 999), /unknown format 999/);
  refuse(bad((d) => res(d, 0).width = 0), /width/);
  refuse(bad((d) => res(d, 0).width = 65536), /too large|contents/);
  refuse(bad((d) => res(d, 0).contents = new Uint8Array(10)), /contents: expected 6144 bytes, got 10/);
  refuse(bad((d) => res(d, 0).contents = "pixels"), /contents: expected bytes/);
  refuse(bad((d) => res(d, 0).backing = []), /backing: 0 entries/);
  refuse(bad((d) => res(d, 0).backing = [{ guestAddr: -4096, len: 16 }]), /guestAddr/);
  refuse(bad((d) => res(d, 0).backing = [{ guestAddr: 0, len: 0 }]), /len/);
  refuse(bad((d) => res(d, 1).blobFlags = 0x80), /unknown blob flags/);
  refuse(bad((d) => res(d, 1).size = 1 << 30), /on \d+ bytes of pages/);
  refuse(bad((d) => res(d, 1).blobId = "-1"), /blobId/);
  refuse(bad((d) => res(d, 1).blobId = (1n << 64n).toString()), /blobId/);
  refuse(bad((d) => d.scanouts = (d.scanouts as StateValue[]).slice(0, 1)), /1 scanouts saved/);
  refuse(bad((d) => src(d, 0).resourceId = 99), /scanout 0 shows resource 99, which was not saved/);
  refuse(bad((d) => (src(d, 0).rect as Record<string, StateValue>).x = 1), /rect outside resource 7/);
  refuse(bad((d) => (scan(d, 0).framebuffer as Record<string, StateValue>).width = 47), /framebuffer/);
  refuse(bad((d) => src(d, 0).layout = src(d, 1).layout), /blob layout on 2D resource 7/);
  refuse(bad((d) => (src(d, 1).layout as Record<string, StateValue>).stride = 4), /stride/);
  refuse(bad((d) => (src(d, 1).layout as Record<string, StateValue>).offset = 4096), /ends at/);
  refuse(bad((d) => (d.cursor as Record<string, StateValue>).resourceId = 55), /cursor shows resource 55/);
  refuse(bad((d) => (d.cursor as Record<string, StateValue>).scanoutId = 2), /cursor scanoutId/);
  refuse(bad((d) => (d.fences as Record<string, StateValue>[])[0].fenceId = 5), /fenceId: expected a string/);
  refuse(bad((d) => (d.fences as Record<string, StateValue>[])[0].fenceId = "0x5"), /not a u64/);
  refuse(bad((d) => (d.fences as StateValue[]).push((d.fences as StateValue[])[0])), /saved twice/);
  refuse(bad((d) => (d.fences as Record<string, StateValue>[])[0].ringIdx = 3), /ringIdx/);
  assert.throws(() => decodeState(new TextEncoder().encode("{not json")), StateError);
});
