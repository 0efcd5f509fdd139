// The display path's copies, driven through the virtio-mmio registers like a guest driver: a scanout is read
// back only when a consumer asks (a screenshot, a snapshot, a live view), only the rectangles RESOURCE_FLUSH
// damaged, once per ask however many frames were flushed in between; the read-backs and the bytes handed to
// display clients sit in the copy counters per scanout beside the guest's transfers. Blob scanouts are read
// from the blob's memory, with no transfer.

import assert from "node:assert/strict";
import { GpuDevice } from "./device.ts";
import { Backend2D } from "./backend_2d.ts";
import type { BlobLayout, Rect } from "./backend.ts";
import * as P from "./protocol.ts";
import * as F from "./formats.ts";
import { decodePngRgba } from "./png.ts";
import { HeadlessDisplay, MAX_DAMAGE_RECTS } from "./display.ts";
import { GpuAccounting } from "./accounting.ts";
import { DISPLAY_TID_BASE } from "./trace.ts";
import { GuardedGuestMemory } from "../../../test/support/virtio_driver.ts";
import {
  attach,
  createBlob,
  flush,
  pattern,
  setScanout,
  setScanoutBlob,
  transfer2d,
  unref,
} from "../../../test/support/gpu_commands.ts";
import { create2d } from "../../../test/support/gpu_commands.ts";
import { captureVirtioLog, closeDeviceRig, mmioRig } from "../../../test/support/device_rig.ts";

const MiB = 1024 * 1024;
const ARENA_END = 8 * MiB;
const DATA_BASE = 8 * MiB;
const GUEST_SIZE = 32 * MiB;
const W = 64, H = 32;
const FMT = F.VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM;

/** The 2D backend, counting what the display asks of it. */
class CountingBackend extends Backend2D {
  reads: Rect[] = [];
  transfers = 0;
  override readPixels(id: number, rect: Rect, layout?: BlobLayout): Uint8Array {
    this.reads.push({ ...rect });
    return super.readPixels(id, rect, layout);
  }
  override transferToHost(...a: Parameters<Backend2D["transferToHost"]>): void {
    this.transfers++;
    super.transferToHost(...a);
  }
}

function rig(tracePath?: string) {
  const g = new GuardedGuestMemory([{ start: 0, size: GUEST_SIZE }]);
  const backend = new CountingBackend();
  const dev = new GpuDevice({ backend, displays: [{ width: W, height: H }, { width: W, height: H }], tracePath });
  const { drv } = mmioRig(dev, g.mem, ARENA_END);
  drv.init({});
  const log = captureVirtioLog();
  const base = drv.alloc.mark();
  return {
    g,
    dev,
    backend,
    ok(c: Uint8Array): void {
      const q = drv.queues[0];
      const sub = q.submit([c, 64]);
      drv.kick(0);
      const used = q.used();
      assert.equal(used.length, 1);
      const type = new DataView(g.mem.read(sub.buffers[1].addr, 4).buffer).getUint32(0, true);
      drv.alloc.resetTo(base);
      assert.equal(type, P.RESP_OK_NODATA, `response 0x${type.toString(16)}: ${log.lines.join(" | ")}`);
    },
    /** Write `px` into guest pages and return them as one backing entry. */
    place(px: Uint8Array, at = DATA_BASE): { addr: number; len: number }[] {
      g.mem.write(at, px);
      return [{ addr: at, len: px.length }];
    },
    [Symbol.dispose]() {
      closeDeviceRig(log, g, dev);
    },
  };
}

/** A 2D resource `id` on scanout 0 holding `px`, transferred but not flushed. */
function showResource(r: ReturnType<typeof rig>, id: number, px: Uint8Array): void {
  r.ok(create2d(id, FMT, W, H));
  r.ok(attach(id, r.place(px)));
  r.ok(transfer2d(id, 0, 0, W, H, 0));
  r.ok(setScanout(0, id, 0, 0, W, H));
}

function assertPixels(rgba: Uint8Array, px: Uint8Array, what: string): void {
  for (let i = 0; i < W * H; i++) {
    const want = [px[4 * i + 2], px[4 * i + 1], px[4 * i], 0xff];
    assert.deepEqual([...rgba.subarray(4 * i, 4 * i + 4)], want, `${what}: pixel ${i}`);
  }
}

Deno.test("display: frames flushed with no consumer cost no read-back at all", () => {
  using r = rig();
  showResource(r, 1, pattern(W, H, 1));
  const frames = 50;
  for (let i = 0; i < frames; i++) r.ok(flush(1, 0, 0, W, H));
  assert.equal(r.backend.reads.length, 0, "readPixels never called");
  const s = r.dev.gpuStats();
  assert.equal(s.totals.scanoutReadbackBytes, 0);
  assert.equal(s.totals.displaySentBytes, 0);
  assert.equal(s.scanouts["0"].readbackBytes, 0);
  assert.equal(s.scanouts["0"].readbacks, 0);
  assert.equal(s.scanouts["0"].flushes, frames);
  assert.equal(s.scanouts["0"].damagedBytes, frames * W * H * 4);
  assert.equal(r.dev.stats().scanoutReadbackBytes, 0);
});

Deno.test("display: a screenshot reads back only the damage flushed since the last read, once", async () => {
  using r = rig();
  const first = pattern(W, H, 1);
  showResource(r, 1, first);
  for (let i = 0; i < 10; i++) r.ok(flush(1, 0, 0, W, H));
  const shot = await decodePngRgba(await r.dev.screenshot(0));
  assertPixels(shot.rgba, first, "first screenshot");
  assert.deepEqual(r.backend.reads, [{ x: 0, y: 0, width: W, height: H }], "ten frames, one read of their union");
  let s = r.dev.gpuStats();
  assert.equal(s.scanouts["0"].readbackBytes, W * H * 4);
  assert.equal(s.scanouts["0"].readbackBy.screenshot, W * H * 4);
  assert.equal(s.totals.scanoutReadbackBytes, W * H * 4);
  assert.equal(s.resources["1"].scanoutReadbackBytes, W * H * 4);
  assert.equal(s.scanouts["0"].screenshots, 1);
  assert.ok(s.scanouts["0"].sentTo.screenshot > 0, "the PNG's bytes count as sent to the screenshot");
  assert.equal(s.totals.displaySentBytes, s.scanouts["0"].sentTo.screenshot);
  // The guest's transfer is a separate counter, untouched by the display's read-back.
  assert.equal(s.totals.transferToHostBytes, W * H * 4);
  assert.equal(s.totals.bytesCopied, W * H * 4);

  // Nothing flushed since: another screenshot reads nothing back.
  r.backend.reads = [];
  await r.dev.screenshot(0);
  assert.equal(r.backend.reads.length, 0);

  // New pixels everywhere, transferred, but only two small rectangles flushed (one of them three times).
  const second = pattern(W, H, 2);
  r.g.mem.write(DATA_BASE, second);
  r.ok(transfer2d(1, 0, 0, W, H, 0));
  const a = { x: 3, y: 4, width: 5, height: 3 }, b = { x: 40, y: 20, width: 4, height: 4 };
  for (let i = 0; i < 3; i++) r.ok(flush(1, a.x, a.y, a.width, a.height));
  r.ok(flush(1, b.x, b.y, b.width, b.height));
  const shot2 = await decodePngRgba(await r.dev.screenshot(0));
  assert.deepEqual(r.backend.reads, [a, b]);
  s = r.dev.gpuStats();
  assert.equal(s.scanouts["0"].readbackBytes, (W * H + a.width * a.height + b.width * b.height) * 4);
  // The damaged rectangles show the new pixels, the rest the old ones (the guest did not flush it).
  const inside = (x: number, y: number, q: Rect) => x >= q.x && x < q.x + q.width && y >= q.y && y < q.y + q.height;
  for (let y = 0; y < H; y++) {
    for (let x = 0; x < W; x++) {
      const i = y * W + x;
      const src = inside(x, y, a) || inside(x, y, b) ? second : first;
      assert.deepEqual(
        [...shot2.rgba.subarray(4 * i, 4 * i + 3)],
        [src[4 * i + 2], src[4 * i + 1], src[4 * i]],
        `pixel ${x},${y}`,
      );
    }
  }
  // Scanout 1 was never shown nor looked at.
  assert.equal(s.scanouts["1"]?.readbackBytes ?? 0, 0);
});

Deno.test("display: a live consumer reads at its own rate, only the damaged bytes", () => {
  using r = rig();
  showResource(r, 1, pattern(W, H, 3));
  // A consumer that looks once every 5 frames (e.g. a page at a fifth of the guest's frame rate).
  let pulls = 0;
  r.dev.display.onUpdate(() => {});
  const rect = { x: 8, y: 8, width: 16, height: 8 };
  for (let frame = 1; frame <= 20; frame++) {
    r.ok(flush(1, rect.x, rect.y, rect.width, rect.height));
    if (frame % 5 === 0) {
      r.dev.display.refresh(0, "web");
      pulls++;
    }
  }
  assert.equal(r.backend.reads.length, pulls, "one read-back per look, not per frame");
  const s = r.dev.gpuStats().scanouts["0"];
  assert.equal(s.readbackBy.web, pulls * rect.width * rect.height * 4);
  assert.equal(s.readbackBytes, s.readbackBy.web);
  assert.equal(s.readbacks, pulls);
  assert.equal(s.flushes, 20);
  r.dev.display.sent(0, "web", 1234);
  assert.equal(r.dev.gpuStats().scanouts["0"].sentTo.web, 1234);
  assert.equal(r.dev.gpuStats().totals.displaySentBytes, 1234);
});

Deno.test("display: the last frame of a scanout that goes away is kept, read once", async () => {
  using r = rig();
  const px = pattern(W, H, 4);
  showResource(r, 1, px);
  r.ok(flush(1, 0, 0, W, H));
  assert.equal(r.backend.reads.length, 0);
  r.ok(unref(1)); // disables the scanout: its flushed frame is read back before the resource goes
  assert.equal(r.backend.reads.length, 1);
  assert.equal(r.dev.gpuStats().scanouts["0"].readbackBy.lastFrame, W * H * 4);
  assertPixels((await decodePngRgba(await r.dev.screenshot(0))).rgba, px, "after unref");
  assert.equal(r.backend.reads.length, 1);
  // A scanout disabled with nothing pending reads nothing.
  showResource(r, 2, px);
  r.ok(setScanout(0, 0, 0, 0, W, H));
  assert.equal(r.backend.reads.length, 1);
});

Deno.test("display: a GUEST blob scanout is shown from the blob's pages, with no transfer", async () => {
  using r = rig();
  const stride = W * 4;
  const px = pattern(W, H, 5);
  const pages = r.place(px);
  r.ok(createBlob(7, P.VIRTIO_GPU_BLOB_MEM_GUEST, P.VIRTIO_GPU_BLOB_FLAG_USE_SHAREABLE, 0n, px.length, pages));
  r.ok(setScanoutBlob(0, 7, W, H, FMT, stride));
  for (let i = 0; i < 5; i++) r.ok(flush(7, 0, 0, W, H));
  assert.equal(r.backend.reads.length, 0, "no consumer, no read");
  // The guest draws straight into the blob: a later look sees it, with no transfer command at all.
  const next = pattern(W, H, 6);
  r.g.mem.write(DATA_BASE, next);
  r.ok(flush(7, 0, 0, W, H));
  assertPixels((await decodePngRgba(await r.dev.screenshot(0))).rgba, next, "blob screenshot");
  assert.equal(r.backend.transfers, 0);
  const s = r.dev.gpuStats();
  assert.equal(s.totals.bytesCopied, 0, "no guest transfer");
  assert.equal(s.scanouts["0"].readbackFromBlobBytes, W * H * 4);
  assert.equal(s.scanouts["0"].readbackBytes, W * H * 4);
  assert.equal(s.resources["7"].copiesAvoidedBytes, 6 * W * H * 4, "every flushed frame needed no transfer");
});

Deno.test("display: damage stays bounded, and a failed read-back is one log line, not an exception", () => {
  const acc = new GpuAccounting("test");
  const lines: string[] = [];
  let reads = 0;
  const display = new HeadlessDisplay([{ width: 1000, height: 1000 }], {
    accounting: acc,
    log: (l) => lines.push(l),
  });
  display.setScanout(0, { resourceId: 1, rect: { x: 0, y: 0, width: 1000, height: 1000 } });
  const reader = (_id: number, rect: Rect) => {
    reads++;
    return new Uint8Array(rect.width * rect.height * 4);
  };
  // Many disjoint 1x1 flushes: the pending damage is merged, never a list that grows with the frames.
  for (let i = 0; i < 10_000; i++) {
    display.flush(0, { x: (i * 7) % 997, y: (i * 13) % 991, width: 1, height: 1 }, reader);
  }
  assert.ok(display.damage(0).length <= MAX_DAMAGE_RECTS);
  display.refresh(0, "web");
  assert.ok(reads <= MAX_DAMAGE_RECTS);
  assert.equal(display.damage(0).length, 0);
  // A reader that throws: logged once, the damage dropped, the caller unharmed.
  display.flush(0, { x: 0, y: 0, width: 10, height: 10 }, () => {
    throw new Error("resource gone");
  });
  const fb = display.refresh(0, "web");
  assert.equal(fb.width, 1000);
  assert.equal(lines.length, 1);
  assert.match(lines[0], /resource gone/);
  assert.equal(display.damage(0).length, 0);
});

Deno.test("display: a snapshot looks at the screen: the saved framebuffer has the flushed frame", async () => {
  using r = rig();
  const px = pattern(W, H, 7);
  showResource(r, 1, px);
  r.ok(flush(1, 0, 0, W, H));
  const saved = r.dev.saveState();
  assert.equal(r.backend.reads.length, 1);
  assert.equal(r.dev.gpuStats().scanouts["0"].readbackBy.snapshot, W * H * 4);
  // Restored into a fresh device, the screen is there without any flush.
  using b = rig();
  b.dev.restoreState(saved);
  assertPixels((await decodePngRgba(await b.dev.screenshot(0))).rgba, px, "restored screen");
  assert.equal(b.backend.reads.length, 0, "the restored framebuffer needs no read-back");
});

Deno.test("display: the trace and the summary show the display path's copies", async () => {
  const dir = await Deno.makeTempDir({ prefix: "denovm-display-trace-" });
  const path = `${dir}/trace.json`;
  try {
    {
      using r = rig(path);
      showResource(r, 1, pattern(W, H, 8));
      r.ok(flush(1, 0, 0, W, H));
      const png = await r.dev.screenshot(0);
      const text = r.dev.summary();
      assert.match(text, /display: read back 8\.0 KiB, sent to display clients/);
      assert.match(text, /scanout 0: 1 flushes damaged 8\.0 KiB; read back 8\.0 KiB in 1 \(screenshot 8\.0 KiB/);
      assert.equal(r.dev.gpuStats().scanouts["0"].sentTo.screenshot, png.length);
    }
    const events = JSON.parse(await Deno.readTextFile(path)) as {
      name: string;
      cat?: string;
      tid?: number;
      args?: Record<string, number>;
    }[];
    const display = events.filter((e) => e.cat === "display");
    assert.deepEqual(display.map((e) => e.name), ["SCANOUT_READBACK (screenshot)", "DISPLAY_SEND (screenshot)"]);
    assert.deepEqual(display[0].args, { resource: 1, bytes: W * H * 4, ctx: 0, scanout: 0 });
    assert.equal(display[0].tid, DISPLAY_TID_BASE);
    assert.ok(events.some((e) => e.name === "RESOURCE_FLUSH" && e.cat === "virtio-gpu"));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
