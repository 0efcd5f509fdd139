// The web display in a real browser: Playwright (playwright-core) drives Debian's headless Chromium
// against a WebDisplay fed by a HeadlessDisplay; input goes to real InputDevice objects (recording what
// they were asked to send) and a fake absolute pointer. Skipped when /usr/bin/chromium is missing.

import assert from "node:assert/strict";
import { type BrowserContext, chromium, type Page } from "playwright-core";
import type { Rect } from "../../devices/virtio/gpu/backend.ts";
import { HeadlessDisplay } from "../../devices/virtio/gpu/display.ts";
import { InputDevice, type InputEvent, type InputOptions } from "../../devices/virtio/input/device.ts";
import {
  ABS_MT_POSITION_X,
  ABS_MT_POSITION_Y,
  ABS_X,
  ABS_Y,
  BTN_LEFT,
  BTN_TOUCH,
  EV_ABS,
  EV_KEY,
  EV_REL,
  EV_SYN,
  KEY_A,
  KEY_B,
  REL_X,
  REL_Y,
} from "../../devices/virtio/input/codes.ts";
import { WebDisplay } from "../../vmm/ui/web_display/server.ts";
import type { InputSink } from "../../vmm/ui/web_display/input_bridge.ts";
import { TILE_SIZE } from "../../devices/virtio/gpu/tiles.ts";
import {
  ENCODING_DEFLATE_RGBA,
  ENCODING_PNG,
  ENCODING_RAW_RGBA,
  RECT_FLAG_FULL,
  RECT_FLAG_LAST,
  RECT_HEADER_SIZE,
} from "../../vmm/ui/web_display/protocol.ts";

const CHROMIUM = "/usr/bin/chromium";
const haveChromium = (() => {
  try {
    return Deno.statSync(CHROMIUM).isFile;
  } catch {
    return false;
  }
})();
if (!haveChromium) {
  console.log(`web_display_test: browser tests skipped: ${CHROMIUM} missing (apt-get install chromium)`);
}

const W = 320, H = 200;
/** The fake absolute pointer's axis range (a tablet: ABS_X/ABS_Y 0..32767). */
const TABLET_MAX = 32768;

/** Debian's chromium headless, as node.md says this machine needs it; a fresh empty profile each time. */
async function launch(): Promise<{ ctx: BrowserContext; page: Page; close: () => Promise<void> }> {
  const dir = await Deno.makeTempDir({ prefix: "denovm-chromium-" });
  const ctx = await chromium.launchPersistentContext(dir, {
    executablePath: CHROMIUM,
    headless: true,
    hasTouch: true,
    viewport: { width: 1280, height: 800 },
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  const page = ctx.pages()[0] ?? await ctx.newPage();
  return {
    ctx,
    page,
    close: async () => {
      await ctx.close();
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    },
  };
}

/** A resource the fake PixelReader reads: B8G8R8A8, alpha 0 (as XRGB scanouts), a known pattern. */
class FakeResource {
  readonly bgra = new Uint8Array(W * H * 4);
  constructor() {
    this.paint({ x: 0, y: 0, width: W, height: H }, (x, y) => [(x * 3) & 0xff, (y * 5) & 0xff, (x ^ y) & 0xff]);
  }
  /** Fill `r` with colour(x, y) = [r, g, b]. */
  paint(r: Rect, colour: (x: number, y: number) => [number, number, number]): void {
    for (let y = r.y; y < r.y + r.height; y++) {
      for (let x = r.x; x < r.x + r.width; x++) {
        const [red, g, b] = colour(x, y);
        this.bgra.set([b, g, red, 0], (y * W + x) * 4);
      }
    }
  }
  reader = (_res: number, r: Rect): Uint8Array => {
    const out = new Uint8Array(r.width * r.height * 4);
    for (let y = 0; y < r.height; y++) {
      out.set(this.bgra.subarray(((r.y + y) * W + r.x) * 4, ((r.y + y) * W + r.x + r.width) * 4), y * r.width * 4);
    }
    return out;
  };
  /** What the page must show: RGBA with opaque alpha. */
  expectedRgba(): Uint8Array {
    const out = new Uint8Array(W * H * 4);
    for (let i = 0; i < W * H * 4; i += 4) {
      out[i] = this.bgra[i + 2];
      out[i + 1] = this.bgra[i + 1];
      out[i + 2] = this.bgra[i];
      out[i + 3] = 0xff;
    }
    return out;
  }
}

/** A real InputDevice that also records each batch it is asked to send. */
class RecordingInput extends InputDevice {
  readonly batches: InputEvent[][] = [];
  constructor(opts: InputOptions) {
    super(opts);
  }
  override sendEvents(events: InputEvent[]): boolean {
    this.batches.push(events.map((e) => ({ ...e })).filter((e) => e.type !== EV_SYN));
    return super.sendEvents(events);
  }
}

/** A fake absolute pointer (a tablet; denovm's InputDevice has no such kind yet). */
class FakeTablet implements InputSink {
  readonly kind = "tablet";
  readonly width = TABLET_MAX;
  readonly height = TABLET_MAX;
  readonly batches: InputEvent[][] = [];
  sendEvents(events: InputEvent[]): boolean {
    this.batches.push(events.map((e) => ({ ...e })));
    return true;
  }
}

function keyEvents(batches: InputEvent[][]): [number, number][] {
  return batches.flat().filter((e) => e.type === EV_KEY).map((e) => [e.code, e.value]);
}

/** Wait for a condition (a guard against hanging, not a timing assertion). */
async function until(what: string, f: () => boolean | Promise<boolean>, timeoutMs = 30_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await f())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/**
 * Wait until the page's window.__denovm[field] (a number, or an array's length) reaches `min`. A function,
 * not a string: the page's Content-Security-Policy forbids eval, which string predicates need.
 */
async function waitState(page: Page, field: "frames" | "statsCount" | "history", min: number): Promise<void> {
  await page.waitForFunction(([f, m]) => {
    const s = (globalThis as unknown as { __denovm?: Record<string, unknown> }).__denovm;
    if (!s) return false;
    const v = s[f];
    return (Array.isArray(v) ? v.length : Number(v)) >= m;
  }, [field, min] as const);
}

async function canvasRgba(page: Page): Promise<Uint8Array> {
  const data = await page.evaluate(
    `Array.from(document.getElementById("screen").getContext("2d").getImageData(0, 0, ${W}, ${H}).data)`,
  ) as number[];
  return Uint8Array.from(data);
}

function assertSamePixels(got: Uint8Array, want: Uint8Array, what: string): void {
  assert.equal(got.length, want.length, `${what}: size`);
  for (let i = 0; i < want.length; i++) {
    if (got[i] !== want[i]) {
      const px = i >> 2;
      assert.fail(`${what}: pixel (${px % W}, ${Math.floor(px / W)}) byte ${i & 3} is ${got[i]}, want ${want[i]}`);
    }
  }
}

/** Client coordinates of framebuffer pixel (x, y)'s centre (the canvas may be scaled by CSS). */
async function clientPoint(page: Page, x: number, y: number): Promise<{ x: number; y: number }> {
  const box = await page.locator("#screen").boundingBox();
  assert.ok(box, "the screen canvas is visible");
  return { x: box.x + (x + 0.5) * box.width / W, y: box.y + (y + 0.5) * box.height / H };
}

function makeStats() {
  let n = 0;
  const counters = (k: number) => ({
    commands: k,
    transferToHostBytes: k * 1_000_000,
    transferFromHostBytes: 0,
    streamToHostBytes: k * 65_536,
    streamFromHostBytes: 0,
    copyTransferToHostBytes: 0,
    copyTransferFromHostBytes: 0,
    inlineWriteBytes: k * 4096,
    bytesCopied: k * (1_000_000 + 65_536 + 4096),
    scanoutReadbackBytes: k * 300_000,
    displaySentBytes: k * 120_000,
    blobMaps: 1,
    blobMappedBytes: 8 << 20,
    copiesAvoidedBytes: k * (8 << 20),
    estimated: 0,
  });
  return {
    calls: () => n,
    stats: () => {
      n++;
      return {
        backend: "fake",
        totals: counters(n),
        resources: { "7": { ...counters(n), live: true } },
        contexts: {},
        commands: {},
        streams: { submits: 0, virglCommands: 0, truncated: 0, streamBytes: 0 },
        scanouts: {
          "0": {
            flushes: n,
            damagedBytes: n * 600_000,
            readbacks: n,
            readbackBytes: n * 300_000,
            readbackBy: { screenshot: 0, snapshot: 0, web: n * 300_000, vhostUser: 0, lastFrame: 0 },
            readbackFromBlobBytes: 0,
            sentTo: { screenshot: 0, web: n * 120_000, vhostUser: 0 },
            screenshots: 0,
          },
        },
        mapped: { count: 1, bytes: 8 << 20 },
        fences: { created: 0, retired: 0, pending: 0 },
      };
    },
  };
}

Deno.test({
  name: "web display: Chromium sees the frame, only changed rectangles, input, token, counters",
  ignore: !haveChromium,
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async (t) => {
    const res = new FakeResource();
    const display = new HeadlessDisplay([{ width: W, height: H }]);
    display.setScanout(0, { resourceId: 1, rect: { x: 0, y: 0, width: W, height: H } });
    display.flush(0, { x: 0, y: 0, width: W, height: H }, res.reader);
    const keyboard = new RecordingInput({ kind: "keyboard" });
    const tablet = new FakeTablet();
    const touch = new RecordingInput({ kind: "multi-touch", width: W * 2, height: H * 2 });
    const fakeStats = makeStats();
    const wd = new WebDisplay({
      display,
      input: { keyboard, pointer: tablet, touch },
      stats: fakeStats.stats,
      statsIntervalMs: 100,
      // PNG for compressible rectangles even on loopback, where "auto" sends raw (tested below).
      encoding: "png",
    });
    const { url } = await wd.start();
    const origin = new URL(url).origin;
    assert.match(url, /^http:\/\/127\.0\.0\.1:\d+\/\?token=[0-9a-f]{32}$/);
    const browser = await launch();
    const page = browser.page;
    try {
      await t.step("the canvas shows the scanout's pixels", async () => {
        const resp = await page.goto(url);
        assert.equal(resp?.status(), 200);
        await waitState(page, "frames", 1);
        assertSamePixels(await canvasRgba(page), res.expectedRgba(), "first frame");
        const first = await page.evaluate("window.__denovm.rects") as { w: number; h: number; flags: number }[];
        assert.equal(first.length, 1);
        assert.equal(first[0].w, W);
        assert.equal(first[0].h, H);
        assert.equal(first[0].flags, RECT_FLAG_LAST | RECT_FLAG_FULL);
      });

      await t.step("an update sends only the changed rectangle", async () => {
        await until("the first frame's ack", () => wd.stats().acks >= 1);
        const before = wd.stats();
        const r = { x: 10, y: 20, width: 30, height: 12 };
        res.paint(r, (x, y) => [255 - x, 7, y]);
        const out = display.flush(0, r, res.reader);
        assert.deepEqual(out.rect, r);
        await waitState(page, "frames", 2);
        const after = wd.stats();
        assert.equal(after.batchesSent - before.batchesSent, 1);
        assert.equal(after.rectsSent - before.rectsSent, 1);
        assert.equal(after.bytesSent - before.bytesSent, RECT_HEADER_SIZE + r.width * r.height * 4);
        const rects = await page.evaluate("window.__denovm.rects") as Record<string, number>[];
        const last = rects.at(-1)!;
        assert.deepEqual([last.x, last.y, last.w, last.h, last.flags], [r.x, r.y, r.width, r.height, RECT_FLAG_LAST]);
        assert.equal(last.enc, ENCODING_RAW_RGBA);
        assert.equal(last.bytes, RECT_HEADER_SIZE + r.width * r.height * 4);
        assertSamePixels(await canvasRgba(page), res.expectedRgba(), "after the update");
      });

      await t.step("several flushes in one tick are coalesced", async () => {
        const before = wd.stats();
        const framesBefore = await page.evaluate("window.__denovm.frames") as number;
        // Overlapping flushes in the same turn of the event loop: one batch, their bounding box.
        for (let i = 0; i < 5; i++) {
          const r = { x: 100 + i * 4, y: 100, width: 8, height: 8 };
          res.paint(r, () => [i * 40, 200, 100]);
          display.flush(0, r, res.reader);
        }
        await waitState(page, "frames", framesBefore + 1);
        await until("the ack", () => wd.stats().acks >= before.acks + 1);
        const after = wd.stats();
        assert.equal(after.batchesSent - before.batchesSent, 1);
        assert.equal(after.rectsSent - before.rectsSent, 1);
        assert.equal(after.bytesSent - before.bytesSent, RECT_HEADER_SIZE + 24 * 8 * 4);
        assertSamePixels(await canvasRgba(page), res.expectedRgba(), "after coalesced updates");
      });

      await t.step("a whole-screen flush sends only the tiles that changed", async () => {
        await until("acks caught up", () => wd.stats().acks === wd.stats().batchesSent);
        // An unchanged whole-screen flush is compared and nothing is sent.
        const idle = wd.stats();
        display.flush(0, { x: 0, y: 0, width: W, height: H }, res.reader);
        await until("the flush compared", () => wd.stats().tilesCompared > idle.tilesCompared);
        assert.equal(wd.stats().batchesSent, idle.batchesSent);
        assert.equal(wd.stats().tilesChanged, idle.tilesChanged);
        // Five pixels changed inside tile (1, 1): that tile alone goes out.
        const before = wd.stats();
        const framesBefore = await page.evaluate("window.__denovm.frames") as number;
        res.paint({ x: 70, y: 70, width: 5, height: 1 }, () => [1, 2, 3]);
        display.flush(0, { x: 0, y: 0, width: W, height: H }, res.reader);
        await waitState(page, "frames", framesBefore + 1);
        const after = wd.stats();
        assert.equal(after.batchesSent - before.batchesSent, 1);
        assert.equal(after.rectsSent - before.rectsSent, 1);
        assert.equal(after.tilesChanged - before.tilesChanged, 1);
        const last = (await page.evaluate("window.__denovm.rects") as Record<string, number>[]).at(-1)!;
        assert.deepEqual([last.x, last.y, last.w, last.h], [TILE_SIZE, TILE_SIZE, TILE_SIZE, TILE_SIZE]);
        assert.ok(after.bytesSent - before.bytesSent <= RECT_HEADER_SIZE + TILE_SIZE * TILE_SIZE * 4);
        assertSamePixels(await canvasRgba(page), res.expectedRgba(), "after the tile update");
      });

      await t.step("a flat region is sent as PNG and decoded by the page", async () => {
        await until("acks caught up", () => wd.stats().acks === wd.stats().batchesSent);
        const before = wd.stats();
        const framesBefore = await page.evaluate("window.__denovm.frames") as number;
        const r = { x: 0, y: 120, width: W, height: 80 };
        res.paint(r, (x) => (x < 200 ? [30, 30, 40] : [200, 180, 20]));
        display.flush(0, r, res.reader);
        await waitState(page, "frames", framesBefore + 1);
        const after = wd.stats();
        assert.equal(after.rectsSent - before.rectsSent, 1);
        assert.equal(after.rectsDeflated - before.rectsDeflated, 1);
        const raw = r.width * r.height * 4;
        assert.equal(after.deflatedRawBytes - before.deflatedRawBytes, raw);
        assert.ok(after.bytesSent - before.bytesSent < raw / 20, `${after.bytesSent - before.bytesSent} bytes sent`);
        const rects = await page.evaluate("window.__denovm.rects") as Record<string, number>[];
        assert.equal(rects.at(-1)!.enc, ENCODING_PNG);
        assertSamePixels(await canvasRgba(page), res.expectedRgba(), "after the PNG update");
        assert.equal(await page.evaluate("window.__denovm.errors"), 0);
      });

      await t.step("a click and typing reach the input devices", async () => {
        const p = await clientPoint(page, 100, 50);
        await page.mouse.click(p.x, p.y);
        await page.keyboard.type("ab");
        const ax = Math.floor(100 * TABLET_MAX / W), ay = Math.floor(50 * TABLET_MAX / H);
        await until("BTN_LEFT up", () => keyEvents(tablet.batches).length >= 2);
        const clicks = tablet.batches.filter((b) => b.some((e) => e.type === EV_KEY));
        assert.deepEqual(clicks, [
          [{ type: EV_ABS, code: ABS_X, value: ax }, { type: EV_ABS, code: ABS_Y, value: ay }, {
            type: EV_KEY,
            code: BTN_LEFT,
            value: 1,
          }],
          [{ type: EV_ABS, code: ABS_X, value: ax }, { type: EV_ABS, code: ABS_Y, value: ay }, {
            type: EV_KEY,
            code: BTN_LEFT,
            value: 0,
          }],
        ]);
        await until("four key events", () => keyEvents(keyboard.batches).length >= 4);
        assert.deepEqual(keyEvents(keyboard.batches), [[KEY_A, 1], [KEY_A, 0], [KEY_B, 1], [KEY_B, 0]]);
        // The real device queued them for the guest (each batch with its SYN_REPORT).
        assert.equal(keyboard.stats().batchesQueued, 4);
        assert.equal(keyboard.pendingEvents, 8);
      });

      await t.step("a tap reaches the multi-touch device", async () => {
        const p = await clientPoint(page, 60, 40);
        await page.touchscreen.tap(p.x, p.y);
        await until("BTN_TOUCH up", () => keyEvents(touch.batches).length >= 2);
        const ev = touch.batches.flat();
        assert.deepEqual(keyEvents(touch.batches), [[BTN_TOUCH, 1], [BTN_TOUCH, 0]]);
        // Framebuffer (60, 40) on a surface twice the framebuffer's size.
        assert.ok(ev.some((e) => e.type === EV_ABS && e.code === ABS_MT_POSITION_X && e.value === 120));
        assert.ok(ev.some((e) => e.type === EV_ABS && e.code === ABS_MT_POSITION_Y && e.value === 80));
      });

      await t.step("the counters plot shows values from stats()", async () => {
        await waitState(page, "statsCount", 3);
        await waitState(page, "history", 2);
        const shown = await page.evaluate(`(() => {
          const s = window.__denovm.lastStats.totals;
          const li = (k) => document.querySelector('#legend [data-series="' + k + '"] .total').dataset.total;
          return { sent: s, virtio: li("virtio"), stream: li("stream"), inline: li("inline"), blob: li("blob"),
            readback: li("readback"), displaySent: li("sent"), rates: window.__denovm.rates };
        })()`) as {
          sent: Record<string, number>;
          virtio: string;
          stream: string;
          inline: string;
          blob: string;
          readback: string;
          displaySent: string;
          rates: Record<string, number>;
        };
        const k = shown.sent.transferToHostBytes / 1_000_000;
        assert.ok(
          Number.isInteger(k) && k >= 3 && k <= fakeStats.calls(),
          `stats() value ${k} of ${fakeStats.calls()}`,
        );
        assert.equal(shown.virtio, String(k * 1_000_000));
        assert.equal(shown.stream, String(k * 65_536));
        assert.equal(shown.inline, String(k * 4096));
        assert.equal(shown.blob, String(k * (8 << 20)));
        // The display path's own copies, beside the guest's.
        assert.equal(shown.readback, String(k * 300_000));
        assert.equal(shown.displaySent, String(k * 120_000));
        const perScanout = await page.evaluate(`document.getElementById("mapped").textContent`) as string;
        assert.match(perScanout, /scanout 0: \d+ flushes, read back [\d.]+ [KM]iB, sent [\d.]+ [KM]iB/);
        for (const key of ["virtio", "stream", "inline", "blob", "readback", "sent"]) {
          assert.ok(shown.rates[key] > 0, `${key} rate`);
        }
        // The virtio line (#f28e2b) is drawn on the plot.
        const orange = await page.evaluate(`(() => {
          const c = document.getElementById("plot"), d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
          let n = 0;
          for (let i = 0; i < d.length; i += 4) if (d[i] === 0xf2 && d[i + 1] === 0x8e && d[i + 2] === 0x2b) n++;
          return n;
        })()`) as number;
        assert.ok(orange > 0, "the virtio series is drawn");
        // Hover: per-resource numbers.
        const box = await page.locator("#plot").boundingBox();
        assert.ok(box);
        await page.mouse.move(box.x + box.width - 6, box.y + box.height / 2);
        const tip = await page.locator("#tip").textContent();
        assert.match(tip ?? "", /resource 7: virtio [0-9.]+ (B|KiB|MiB)\/s/);
      });

      await t.step("without the token: page and socket refused", async () => {
        for (const u of [`${origin}/`, `${origin}/?token=00000000000000000000000000000000`, `${origin}/ws`]) {
          const r = await fetch(u);
          assert.equal(r.status, 403, u);
          await r.body?.cancel();
        }
        const forged = await fetch(`${origin}/ws`, { headers: { cookie: `denovm_token_${new URL(url).port}=nope` } });
        assert.equal(forged.status, 403);
        await forged.body?.cancel();
        const wsOutcome = (u: string) =>
          new Promise<string>((resolve) => {
            const ws = new WebSocket(u);
            ws.onopen = () => {
              resolve("open");
              ws.close();
            };
            ws.onerror = () => resolve("refused");
          });
        const wsOrigin = origin.replace("http:", "ws:");
        assert.equal(await wsOutcome(`${wsOrigin}/ws`), "refused");
        assert.equal(await wsOutcome(`${wsOrigin}/ws?token=${"0".repeat(32)}`), "refused");
        assert.equal(await wsOutcome(`${wsOrigin}/ws?token=${wd.token}`), "open"); // the control
        // A fresh browser profile (no cookie) is refused too.
        const other = await launch();
        try {
          const resp = await other.page.goto(`${origin}/`);
          assert.equal(resp?.status(), 403);
        } finally {
          await other.close();
        }
        // The page's own cookie lets it in without the query parameter.
        const again = await page.goto(`${origin}/`);
        assert.equal(again?.status(), 200);
        await waitState(page, "frames", 1);
        assert.ok(wd.stats().refused >= 7);
      });
    } finally {
      await browser.close();
      await wd.close();
    }
  },
});

Deno.test({
  name: "web display: a relative mouse gets REL_X/REL_Y motion and BTN_LEFT",
  ignore: !haveChromium,
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async () => {
    const res = new FakeResource();
    const display = new HeadlessDisplay([{ width: W, height: H }]);
    display.setScanout(0, { resourceId: 1, rect: { x: 0, y: 0, width: W, height: H } });
    display.flush(0, { x: 0, y: 0, width: W, height: H }, res.reader);
    const mouse = new RecordingInput({ kind: "mouse" });
    const wd = new WebDisplay({ display, input: { pointer: mouse } });
    const { url } = await wd.start();
    const browser = await launch();
    try {
      const page = browser.page;
      await page.goto(url);
      await waitState(page, "frames", 1);
      // "auto" to a page on loopback: raw, never PNG or deflate.
      const rects = await page.evaluate("window.__denovm.rects") as Record<string, number>[];
      assert.ok(rects.length > 0 && rects.every((r) => r.enc === ENCODING_RAW_RGBA));
      assert.equal(wd.stats().rectsDeflated, 0);
      const a = await clientPoint(page, 10, 10), b = await clientPoint(page, 50, 30);
      await page.mouse.move(a.x, a.y);
      await page.mouse.move(b.x, b.y);
      await page.mouse.down();
      await page.mouse.up();
      await until("BTN_LEFT up", () => keyEvents(mouse.batches).length >= 2);
      assert.deepEqual(keyEvents(mouse.batches), [[BTN_LEFT, 1], [BTN_LEFT, 0]]);
      const rel = mouse.batches.flat().filter((e) => e.type === EV_REL);
      const sum = (code: number) => rel.filter((e) => e.code === code).reduce((n, e) => n + e.value, 0);
      assert.equal(sum(REL_X), 40);
      assert.equal(sum(REL_Y), 20);
    } finally {
      await browser.close();
      await wd.close();
    }
  },
});

Deno.test({
  name: "web display: encoding deflate is inflated by the page pixel-exact",
  ignore: !haveChromium,
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async () => {
    const res = new FakeResource();
    res.paint({ x: 0, y: 0, width: W, height: 100 }, (x) => (x < 150 ? [10, 20, 30] : [250, 240, 5]));
    const display = new HeadlessDisplay([{ width: W, height: H }]);
    display.setScanout(0, { resourceId: 1, rect: { x: 0, y: 0, width: W, height: H } });
    display.flush(0, { x: 0, y: 0, width: W, height: H }, res.reader);
    const wd = new WebDisplay({ display, encoding: "deflate" });
    const { url } = await wd.start();
    const browser = await launch();
    try {
      const page = browser.page;
      await page.goto(url);
      await waitState(page, "frames", 1);
      assertSamePixels(await canvasRgba(page), res.expectedRgba(), "first frame");
      const r = { x: 0, y: 0, width: W, height: 100 };
      res.paint(r, (x, y) => (y < 50 ? [x < 100 ? 90 : 91, 1, 2] : [3, 4, 5]));
      display.flush(0, r, res.reader);
      await waitState(page, "frames", 2);
      const rects = await page.evaluate("window.__denovm.rects") as Record<string, number>[];
      assert.ok(rects.length >= 2);
      assert.ok(rects.slice(1).every((x) => x.enc === ENCODING_DEFLATE_RGBA), JSON.stringify(rects));
      assert.ok(wd.stats().rectsDeflated >= 1);
      assertSamePixels(await canvasRgba(page), res.expectedRgba(), "after the deflated update");
      assert.equal(await page.evaluate("window.__denovm.errors"), 0);
    } finally {
      await browser.close();
      await wd.close();
    }
  },
});
