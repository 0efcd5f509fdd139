// Web display frame rate at 1920x1080: a HeadlessDisplay whose whole screen is flushed at --flush-hz (60 by
// default, as a guest compositor does on vsync), served by WebDisplay and watched by Debian's headless
// Chromium. The number is the frames the page drew and acknowledged per second, in three phases:
// - `fps` (desktop): a static desktop (flat background, windows of "text") with one window moving across it:
//   every flush covers the whole screen but only the window's old and new places change;
// - `fpsPhoto`: photo-like content (gradients and xor patterns) changing on the whole screen every frame;
// - `fpsNoise`: the worst case, random pixels on the whole screen every frame.
// Plus bytes per frame sent, server milliseconds per frame (encode) and, when the page reports them in its
// acks, the page's decode and draw milliseconds per frame.
//
// The browser runs without DevTools by default (`chromium --headless URL`): Playwright's CDP session mirrors
// every WebSocket frame to its client (base64 in Network.webSocketFrameReceived), which alone cut the page's
// intake from ~57 MB/s to ~6 MB/s here. --playwright measures that way anyway, for comparison.
//
// The last line is `{"bench":"web-fps","fps":..,"width":1920,"height":1080,...}`.
//
// Usage: deno run --allow-all bench/web_fps.ts [--seconds N] [--max-fps N] [--flush-hz N] [--playwright]
//                                              [--encoding auto|png|deflate|raw]

import type { Rect } from "../devices/virtio/gpu/backend.ts";
import { HeadlessDisplay } from "../devices/virtio/gpu/display.ts";
import { WebDisplay, type WebDisplayOptions } from "../vmm/ui/web_display/server.ts";
import { exists, progress, result } from "./_common.ts";

const BENCH = "web-fps";
const CHROMIUM = "/usr/bin/chromium";
const WIDTH = 1920, HEIGHT = 1080;
/** Distinct full-screen frames the photo and noise phases cycle through (prepared up front). */
const PATTERNS = 4;
/** The moving window of the desktop phase, and how far it moves per frame. */
const WIN_W = 640, WIN_H = 400, WIN_STEP_X = 7, WIN_STEP_Y = 4;
/** How long to wait for the page's first frame before giving up. */
const FIRST_FRAME_TIMEOUT_MS = 60_000;

function arg(name: string, dflt: number): number {
  const i = Deno.args.indexOf(name);
  const v = i >= 0 ? Number(Deno.args[i + 1]) : dflt;
  if (!(v > 0)) throw new Error(`${name} needs a positive number`);
  return v;
}
function strArg(name: string, dflt: string): string {
  const i = Deno.args.indexOf(name);
  return i >= 0 ? Deno.args[i + 1] : dflt;
}

if (!exists(CHROMIUM)) {
  result(BENCH, { skipped: `no ${CHROMIUM} (apt-get install chromium)` });
  Deno.exit(0);
}

const seconds = arg("--seconds", 6);
const maxFps = arg("--max-fps", 60);
const flushHz = arg("--flush-hz", 60);
const usePlaywright = Deno.args.includes("--playwright");
const encoding = strArg("--encoding", "auto") as WebDisplayOptions["encoding"];

/** B8G8R8A8 little-endian pixel from r, g, b. */
const bgra = (r: number, g: number, b: number) => (0xff000000 | (r << 16) | (g << 8) | b) >>> 0;

/** Paint a window with a title bar and lines of "text" (short dark runs on light) at (x0, y0). */
function paintWindow(u: Uint32Array, x0: number, y0: number, w: number, h: number, seed: number): void {
  const title = bgra(0x2a + seed * 8, 0x5a, 0x8a);
  for (let y = y0; y < y0 + h; y++) {
    const row = y * WIDTH;
    for (let x = x0; x < x0 + w; x++) {
      const text = y > y0 + 30 && (y - y0) % 16 < 10 && ((x * 7 + y * 3 + seed) % 23) < 9;
      u[row + x] = y < y0 + 30 ? title : text ? bgra(0x20, 0x20, 0x20) : bgra(0xf0, 0xf0, 0xf0);
    }
  }
}

/** The static desktop: a flat background and six windows. */
function desktopBackground(): Uint32Array {
  const u = new Uint32Array(WIDTH * HEIGHT);
  u.fill(bgra(40, 60, 90));
  for (let w = 0; w < 6; w++) paintWindow(u, (w * 290) % (WIDTH - 600), (w * 150) % (HEIGHT - 400), 600, 400, w);
  return u;
}

/** Photo-like frames: neighbouring pixels differ (gradients and xor), so deflate cannot help. */
function photoFrame(k: number): Uint8Array {
  const f = new Uint8Array(WIDTH * HEIGHT * 4);
  for (let y = 0; y < HEIGHT; y++) {
    for (let x = 0; x < WIDTH; x++) {
      const i = (y * WIDTH + x) * 4;
      f[i] = (x + k * 64) & 0xff;
      f[i + 1] = (y + k * 32) & 0xff;
      f[i + 2] = ((x >> 2) ^ (y >> 2) ^ (k * 85)) & 0xff;
      f[i + 3] = 0xff;
    }
  }
  return f;
}

/** Random pixels: nothing compresses. */
function noiseFrame(): Uint8Array {
  const f = new Uint8Array(WIDTH * HEIGHT * 4);
  for (let o = 0; o < f.length; o += 65536) crypto.getRandomValues(f.subarray(o, Math.min(f.length, o + 65536)));
  return f;
}

const full: Rect = { x: 0, y: 0, width: WIDTH, height: HEIGHT };
const display = new HeadlessDisplay([{ width: WIDTH, height: HEIGHT }]);
display.setScanout(0, { resourceId: 1, rect: full });

// The desktop phase's screen: the background with the moving window painted over it.
const background = desktopBackground();
const screen = new Uint32Array(background);
const screenBytes = new Uint8Array(screen.buffer);
let win = { x: 0, y: 0 };
const dir = { x: WIN_STEP_X, y: WIN_STEP_Y };
function moveWindow(): void {
  for (let y = win.y; y < win.y + WIN_H; y++) {
    screen.set(background.subarray(y * WIDTH + win.x, y * WIDTH + win.x + WIN_W), y * WIDTH + win.x);
  }
  if (win.x + dir.x < 0 || win.x + dir.x + WIN_W > WIDTH) dir.x = -dir.x;
  if (win.y + dir.y < 0 || win.y + dir.y + WIN_H > HEIGHT) dir.y = -dir.y;
  win = { x: win.x + dir.x, y: win.y + dir.y };
  paintWindow(screen, win.x, win.y, WIN_W, WIN_H, 7);
}

let produce: () => Uint8Array = () => {
  moveWindow();
  return screenBytes;
};
let produced = 0;
const flush = () => {
  produced++;
  // The guest draws a frame at the flush rate; the display reads it back when a page is about to send.
  const frame = produce();
  display.flush(0, full, () => frame);
};
flush();

const wd = new WebDisplay({ display, maxFps, encoding });
const { url } = await wd.start();
const profile = await Deno.makeTempDir({ prefix: "denovm-chromium-" });
const chromiumArgs = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];
let closeBrowser: () => Promise<void>;
if (usePlaywright) {
  const { chromium } = await import("playwright-core");
  const ctx = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: WIDTH + 540, height: HEIGHT + 60 },
    args: chromiumArgs,
  });
  const page = ctx.pages()[0] ?? await ctx.newPage();
  await page.goto(url);
  closeBrowser = () => ctx.close();
} else {
  const child = new Deno.Command(CHROMIUM, {
    args: [
      "--headless",
      ...chromiumArgs,
      `--user-data-dir=${profile}`,
      `--window-size=${WIDTH + 540},${HEIGHT + 60}`,
      url,
    ],
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).spawn();
  closeBrowser = async () => {
    child.kill();
    await child.status;
  };
}

try {
  const t0 = performance.now();
  while (wd.stats().acks < 1) {
    if (performance.now() - t0 > FIRST_FRAME_TIMEOUT_MS) throw new Error("the page never acknowledged a frame");
    await new Promise((r) => setTimeout(r, 50));
  }

  /** Whole-screen flushes at flushHz for `secs` (skipping, not bunching, flushes that fall behind). */
  const phase = async (what: string, secs: number) => {
    progress(BENCH, `${what}: whole-screen flushes at ${WIDTH}x${HEIGHT}, ${flushHz} Hz, for ${secs} s`);
    // Let the previous phase's batches drain.
    const drainEnd = performance.now() + 3000;
    while (wd.stats().acks < wd.stats().batchesSent && performance.now() < drainEnd) {
      await new Promise((r) => setTimeout(r, 20));
    }
    const s0 = wd.stats() as unknown as Record<string, number>, p0 = produced;
    const t0 = performance.now();
    const end = t0 + secs * 1000, period = 1000 / flushHz;
    let next = t0;
    while (performance.now() < end) {
      flush();
      next += period;
      const now = performance.now();
      if (next < now) next = now;
      await new Promise((r) => setTimeout(r, next - now));
    }
    const dt = (performance.now() - t0) / 1000;
    const s = wd.stats() as unknown as Record<string, number>;
    const d = (k: string) => (s[k] ?? NaN) - (s0[k] ?? NaN);
    const acked = d("acks");
    const batches = Math.max(1, d("batchesSent"));
    const perFrame = (k: string) => Number.isFinite(d(k)) ? Math.round(d(k) / batches * 10) / 10 : null;
    const perAck = (k: string) => Number.isFinite(d(k)) ? Math.round(d(k) / Math.max(1, acked) * 10) / 10 : null;
    const out = {
      fps: Math.round((acked / dt) * 10) / 10,
      kbPerFrame: Math.round(d("bytesSent") / batches / 1000),
      flushesPerSecond: Math.round(((produced - p0) / dt) * 10) / 10,
      serverMsPerFrame: perFrame("encodeMs"),
      pageDecodeMsPerFrame: perAck("pageDecodeMs"),
      pageDrawMsPerFrame: perAck("pageDrawMs"),
    };
    progress(BENCH, `${what}: ${JSON.stringify(out)}`);
    return out;
  };

  const desktop = await phase("desktop (a window moving over a static desktop)", seconds);
  const photos = Array.from({ length: PATTERNS }, (_, k) => photoFrame(k));
  produce = () => photos[produced % PATTERNS];
  const photo = await phase("photo-like content on the whole screen", Math.max(2, seconds / 2));
  const noises = Array.from({ length: PATTERNS }, () => noiseFrame());
  produce = () => noises[produced % PATTERNS];
  const noise = await phase("random noise on the whole screen", Math.max(2, seconds / 2));
  result(BENCH, {
    fps: desktop.fps,
    width: WIDTH,
    height: HEIGHT,
    kbPerFrame: desktop.kbPerFrame,
    serverMsPerFrame: desktop.serverMsPerFrame,
    pageDecodeMsPerFrame: desktop.pageDecodeMsPerFrame,
    pageDrawMsPerFrame: desktop.pageDrawMsPerFrame,
    fpsPhoto: photo.fps,
    kbPerFramePhoto: photo.kbPerFrame,
    serverMsPerFramePhoto: photo.serverMsPerFrame,
    fpsNoise: noise.fps,
    kbPerFrameNoise: noise.kbPerFrame,
    serverMsPerFrameNoise: noise.serverMsPerFrame,
    flushHz,
    maxFps,
    encoding: encoding ?? "auto",
    browser: usePlaywright ? "playwright" : "chromium --headless",
  });
} finally {
  await closeBrowser();
  await wd.close();
  await Deno.remove(profile, { recursive: true }).catch(() => {});
}
