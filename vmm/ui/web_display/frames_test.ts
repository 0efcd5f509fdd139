// A page's frame stream as the display's consumer: frames flushed before any page connects are not read
// back; a page's batch reads back the flushed rectangles once, however many frames were flushed since its
// last batch, and the bytes it sends are counted per scanout in the display's copy counters.

import assert from "node:assert/strict";
import { HeadlessDisplay } from "../../../devices/virtio/gpu/display.ts";
import type { Rect } from "../../../devices/virtio/gpu/backend.ts";
import { RateLimitedLog } from "../../../core/log.ts";
import { FrameStream, zeroFrameCounters } from "./frames.ts";

const W = 96, H = 64;

const counters = zeroFrameCounters;

/** A resource whose pixels the test paints; reads are recorded. */
class Resource {
  readonly px = new Uint8Array(W * H * 4);
  readonly reads: Rect[] = [];
  readonly reader = (_id: number, r: Rect): Uint8Array => {
    this.reads.push({ ...r });
    const out = new Uint8Array(r.width * r.height * 4);
    for (let y = 0; y < r.height; y++) {
      const at = ((r.y + y) * W + r.x) * 4;
      out.set(this.px.subarray(at, at + r.width * 4), y * r.width * 4);
    }
    return out;
  };
  paint(r: Rect, v: number): void {
    for (let y = r.y; y < r.y + r.height; y++) this.px.fill(v, (y * W + r.x) * 4, (y * W + r.x + r.width) * 4);
  }
}

Deno.test("web display frames: read back only for a connected page, once per batch, only the damage; bytes counted", async () => {
  const res = new Resource();
  const display = new HeadlessDisplay([{ width: W, height: H }], { read: res.reader });
  const full = { x: 0, y: 0, width: W, height: H };
  display.setScanout(0, { resourceId: 1, rect: full });
  res.paint(full, 9);
  for (let i = 0; i < 40; i++) display.flush(0, full);
  assert.equal(res.reads.length, 0, "no page: no read-back");

  const sent: Uint8Array[] = [];
  let batchDone: (() => void) | undefined;
  const c = counters();
  const frames = new FrameStream({
    display,
    scanout: 0,
    ws: {
      open: true,
      bufferedAmount: 0,
      send(msg: Uint8Array) {
        sent.push(msg);
        batchDone?.();
      },
    },
    compression: "raw",
    minIntervalMs: 1,
    counters: c,
    log: new RateLimitedLog("frames test"),
  });
  const batch = () => new Promise<void>((resolve) => batchDone = resolve);
  try {
    let next = batch();
    frames.schedule();
    await next;
    assert.deepEqual(res.reads, [full], "the first batch reads the forty frames' damage once");
    let s = display.accounting.stats().scanouts["0"];
    assert.equal(s.readbackBy.web, W * H * 4);
    assert.equal(s.sentTo.web, c.bytesSent);
    assert.equal(display.accounting.stats().totals.displaySentBytes, c.bytesSent);

    // Many frames flushing one rectangle before the next batch: one read of that rectangle.
    frames.ack(0, 0);
    const r = { x: 10, y: 20, width: 12, height: 6 };
    res.paint(r, 200);
    for (let i = 0; i < 25; i++) frames.damage(display.flush(0, r).rect!);
    next = batch();
    await next;
    assert.deepEqual(res.reads, [full, r]);
    s = display.accounting.stats().scanouts["0"];
    assert.equal(s.readbackBytes, (W * H + r.width * r.height) * 4);
    assert.equal(s.readbacks, 2);
    assert.equal(s.flushes, 65);
    assert.equal(s.sentTo.web, c.bytesSent);
    assert.equal(c.batchesSent, 2);
  } finally {
    frames.stop();
  }
});
