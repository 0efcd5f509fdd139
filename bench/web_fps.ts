// Web display frame rate: a 1920x1080 scanout whose whole screen changes as fast as the display produces
// flushes (the producer yields to the event loop between flushes, as the GPU device does between guest
// commands), watched by headless Chromium (playwright-core, Debian's /usr/bin/chromium). The number is the
// frames the page drew and acknowledged per second: `fps` for desktop-like content (flat areas, sent
// deflated), `fpsIncompressible` for photo-like content (sent raw). The last line is
// `{"bench":"web-fps","fps":..,"width":1920,"height":1080,...}`.
//
// Usage: deno run --allow-all bench/web_fps.ts [--seconds N] [--max-fps N] [--gap-ms N]

import { chromium } from "playwright-core";
import type { Rect } from "../devices/virtio/gpu/backend.ts";
import { HeadlessDisplay } from "../devices/virtio/gpu/display.ts";
import { WebDisplay } from "../vmm/web_display/server.ts";
import { exists, progress, result } from "./_common.ts";

const BENCH = "web-fps";
const CHROMIUM = "/usr/bin/chromium";
const WIDTH = 1920, HEIGHT = 1080;
/** Distinct frames the producer cycles through (prepared up front so producing costs only the copy). */
const PATTERNS = 4;

function arg(name: string, dflt: number): number {
  const i = Deno.args.indexOf(name);
  const v = i >= 0 ? Number(Deno.args[i + 1]) : dflt;
  if (!(v > 0)) throw new Error(`${name} needs a positive number`);
  return v;
}

if (!exists(CHROMIUM)) {
  result(BENCH, { skipped: `no ${CHROMIUM} (apt-get install chromium)` });
  Deno.exit(0);
}

const seconds = arg("--seconds", 8);
/** Pause between flushes (0: as fast as the display produces them, yielding to the event loop). */
const gapMs = Deno.args.includes("--gap-ms") ? arg("--gap-ms", 0) : 0;
const maxFps = arg("--max-fps", 60);

/** Desktop-like frames: every pixel changes between frames (background colour, windows moved), flat areas. */
function desktopFrame(k: number): Uint8Array {
  const f = new Uint8Array(WIDTH * HEIGHT * 4);
  const u = new Uint32Array(f.buffer);
  u.fill(0xff000000 | ((40 + k * 20) << 16) | ((60 + k * 10) << 8) | (90 - k * 10));
  for (let w = 0; w < 6; w++) {
    const x0 = (w * 290 + k * 37) % (WIDTH - 600), y0 = (w * 150 + k * 23) % (HEIGHT - 400);
    for (let y = y0; y < y0 + 400; y++) {
      for (let x = x0; x < x0 + 600; x++) {
        // A title bar, then "text": short dark runs on a light background.
        const text = y > y0 + 30 && (y - y0) % 16 < 10 && ((x * 7 + y * 3 + w) % 23) < 9;
        u[y * WIDTH + x] = y < y0 + 30 ? 0xff8a5a2a + w * 8 : text ? 0xff202020 : 0xfff0f0f0;
      }
    }
  }
  return f;
}

/** Photo-like frames: neighbouring pixels differ (gradients and xor), so deflate cannot help. */
function noisyFrame(k: number): Uint8Array {
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

const full: Rect = { x: 0, y: 0, width: WIDTH, height: HEIGHT };
const display = new HeadlessDisplay([{ width: WIDTH, height: HEIGHT }]);
display.setScanout(0, { resourceId: 1, rect: full });
let frames = Array.from({ length: PATTERNS }, (_, k) => desktopFrame(k));
let produced = 0;
const flush = () => display.flush(0, full, () => frames[produced++ % PATTERNS]);
flush();

const wd = new WebDisplay({ display, maxFps });
const { url } = await wd.start();
const profile = await Deno.makeTempDir({ prefix: "denovm-chromium-" });
const ctx = await chromium.launchPersistentContext(profile, {
  executablePath: CHROMIUM,
  headless: true,
  viewport: { width: WIDTH + 540, height: HEIGHT + 60 },
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
try {
  const page = ctx.pages()[0] ?? await ctx.newPage();
  await page.goto(url);
  await page.waitForFunction(() => {
    const s = (globalThis as unknown as { __denovm?: { frames: number } }).__denovm;
    return !!s && s.frames >= 1;
  });
  const pageFrames = () =>
    page.evaluate(() => (globalThis as unknown as { __denovm: { frames: number } }).__denovm.frames);

  /** Whole-screen flushes for `secs`; frames the page drew and acked per second. */
  const phase = async (what: string, secs: number) => {
    progress(BENCH, `${what}: whole-screen updates at ${WIDTH}x${HEIGHT} for ${secs} s (cap ${maxFps} fps)`);
    const s0 = wd.stats(), f0 = await pageFrames(), p0 = produced;
    const t0 = performance.now();
    const end = t0 + secs * 1000;
    while (performance.now() < end) {
      flush();
      await new Promise((r) => setTimeout(r, gapMs));
    }
    const dt = (performance.now() - t0) / 1000;
    const s = wd.stats();
    const acked = s.acks - s0.acks;
    const bytesPerFrame = (s.bytesSent - s0.bytesSent) / Math.max(1, s.batchesSent - s0.batchesSent);
    progress(
      BENCH,
      `${what}: ${acked} frames acknowledged (${(await pageFrames()) - f0} drawn) in ${dt.toFixed(2)} s; ` +
        `${produced - p0} flushes produced; ${(bytesPerFrame / 1e6).toFixed(2)} MB per frame sent, ` +
        `${s.rectsDeflated - s0.rectsDeflated} of ${s.rectsSent - s0.rectsSent} rects deflated`,
    );
    return {
      fps: Math.round((acked / dt) * 10) / 10,
      seconds: Math.round(dt * 100) / 100,
      flushesPerSecond: Math.round(((produced - p0) / dt) * 10) / 10,
      kbPerFrame: Math.round(bytesPerFrame / 1000),
    };
  };

  const desktop = await phase("desktop-like content", seconds);
  frames = Array.from({ length: PATTERNS }, (_, k) => noisyFrame(k));
  const noisy = await phase("incompressible content", Math.max(2, seconds / 2));
  result(BENCH, {
    fps: desktop.fps,
    width: WIDTH,
    height: HEIGHT,
    seconds: desktop.seconds,
    flushesPerSecond: desktop.flushesPerSecond,
    kbPerFrame: desktop.kbPerFrame,
    fpsIncompressible: noisy.fps,
    kbPerFrameIncompressible: noisy.kbPerFrame,
    maxFps,
    gapMs,
  });
} finally {
  await ctx.close();
  await wd.close();
  await Deno.remove(profile, { recursive: true }).catch(() => {});
}
