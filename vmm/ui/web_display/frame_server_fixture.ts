// A web display fed by a framebuffer that changes entirely on every tick, run as a process of its own by
// clients_test.ts so that the test can read this server's memory (VmRSS) alone. No GPU: a HeadlessDisplay
// with one scanout whose pixels are all one colour, the tick counter (B = bits 0..7, G = 8..15, R = 16..23).
//
// Argument: JSON {width, height, server: extra WebDisplayOptions}. Prints one JSON line {url}, then every
// STATUS_INTERVAL_MS one with the display's stats and the current tick, {frame, clients, ...}.

import { HeadlessDisplay } from "../../../devices/virtio/gpu/display.ts";
import { WebDisplay } from "./server.ts";

/** How often the frame source flushes (about 60 Hz, the display's default cap). */
const TICK_MS = 16;
const STATUS_INTERVAL_MS = 200;

const o = JSON.parse(Deno.args[0] ?? "{}");
const width: number = o.width ?? 1024, height: number = o.height ?? 768;
const display = new HeadlessDisplay([{ width, height }]);
const full = { x: 0, y: 0, width, height };
display.setScanout(0, { resourceId: 1, rect: full });
const pixels = new Uint32Array(width * height);
const bytes = new Uint8Array(pixels.buffer);
let frame = 0;

const server = new WebDisplay({ display, stats: () => ({ frame }), ...o.server });
const { url } = await server.start();
console.log(JSON.stringify({ url }));

setInterval(() => {
  frame = (frame + 1) & 0xffffff;
  // B8G8R8A8 little-endian in one u32: B in the low byte.
  pixels.fill(frame);
  display.flush(0, full, () => bytes);
}, TICK_MS);
setInterval(() => console.log(JSON.stringify({ frame, ...server.stats() })), STATUS_INTERVAL_MS);
