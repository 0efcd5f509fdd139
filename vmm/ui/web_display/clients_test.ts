// The web display under many clients: slow ones (a socket that completes the WebSocket handshake and then
// never reads) must not grow the server's memory, must not starve a page that keeps up, and are closed
// when their send buffer cannot drain; clients beyond the cap are refused; a port in use is a usage error.
// The memory test runs the server as a process of its own (frame_server_fixture.ts) and reads its VmRSS.

import assert from "node:assert/strict";
import { HeadlessDisplay } from "../../../devices/virtio/gpu/display.ts";
import { EXIT_INVALID_ARGS, exitCodeFor } from "../../../core/exit.ts";
import { MAX_PENDING_CONNECTIONS, WebDisplay, type WebDisplayOptions } from "./server.ts";
import { MAX_REQUEST_HEAD_BYTES } from "./http.ts";
import { RECT_FLAG_LAST, RECT_FLAGS, RECT_HEADER_SIZE, RECT_SEQ, RECT_X, RECT_Y } from "./protocol.ts";

const FIXTURE = new URL("./frame_server_fixture.ts", import.meta.url).pathname;
/** Slow clients opened against the server process, and how many connect at once. */
const SLOW_CLIENTS = 500;
const CONNECT_GROUP = 25;
/** The fixture's framebuffer: every frame changes all of it, so each batch is this size raw. */
const FB_WIDTH = 1024, FB_HEIGHT = 768;
/** What the slow clients may add to the server's VmRSS (KiB) while they are connected. */
const SLOW_GROWTH_BOUND_KIB = 256 * 1024;
/** What may remain of that once they are gone (KiB above the figure before they came). */
const RETURN_BOUND_KIB = 64 * 1024;
/** A guard against waiting forever for something that should happen (not a measurement). */
const GUARD_MS = 60_000;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const enc = new TextEncoder(), dec = new TextDecoder();

async function rssKiB(pid: number): Promise<number> {
  const status = await Deno.readTextFile(`/proc/${pid}/status`);
  return Number(status.match(/^VmRSS:\s+(\d+) kB/m)?.[1] ?? NaN);
}

async function until(what: string, cond: () => boolean | Promise<boolean>): Promise<void> {
  const deadline = Date.now() + GUARD_MS;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`gave up waiting: ${what}`);
    await sleep(50);
  }
}

/**
 * A raw TCP client that sends a WebSocket upgrade request and reads just the response head (and whatever
 * came with it): after this it never reads again unless told to.
 */
async function rawUpgrade(
  port: number,
  token: string,
): Promise<{ conn: Deno.TcpConn; status: number; text: string }> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  const key = btoa(String.fromCharCode(...crypto.getRandomValues(new Uint8Array(16))));
  await conn.write(enc.encode(
    `GET /ws?scanout=0&token=${token} HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nUpgrade: websocket\r\n` +
      `Connection: Upgrade\r\nSec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n\r\n`,
  ));
  const buf = new Uint8Array(4096);
  let text = "";
  while (!text.includes("\r\n\r\n")) {
    const n = await conn.read(buf);
    if (n === null) break;
    text += dec.decode(buf.subarray(0, n));
  }
  const status = Number(/^HTTP\/1\.1 (\d{3})/.exec(text)?.[1] ?? 0);
  return { conn, status, text };
}

function closeQuietly(conn: Deno.Conn | undefined): void {
  try {
    conn?.close();
  } catch { /* already closed */ }
}

/** Read a connection to its end (the server closed it); false if it is still open after GUARD_MS. */
async function readsToEnd(conn: Deno.TcpConn): Promise<boolean> {
  const buf = new Uint8Array(1 << 20);
  const deadline = Date.now() + GUARD_MS;
  while (Date.now() < deadline) {
    const n = await Promise.race([conn.read(buf).catch(() => null), sleep(1000).then(() => 0)]);
    if (n === null) return true;
  }
  return false;
}

/** A page that keeps up: acks every batch and remembers the newest frame number it was shown. */
class GoodClient {
  readonly ws: WebSocket;
  frame = -1;
  batches = 0;
  constructor(url: string) {
    const u = new URL(url);
    u.protocol = "ws:";
    u.pathname = "/ws";
    this.ws = new WebSocket(u);
    this.ws.binaryType = "arraybuffer";
    this.ws.onmessage = (ev) => {
      if (typeof ev.data === "string") return;
      const msg = new Uint8Array(ev.data);
      const v = new DataView(ev.data);
      if (v.getUint16(RECT_X, true) === 0 && v.getUint16(RECT_Y, true) === 0) {
        // Raw RGBA: the fixture's colour is the frame number (R bits 16..23, G 8..15, B 0..7).
        const p = RECT_HEADER_SIZE;
        this.frame = (msg[p] << 16) | (msg[p + 1] << 8) | msg[p + 2];
      }
      if (msg[RECT_FLAGS] & RECT_FLAG_LAST) {
        this.batches++;
        this.ws.send(JSON.stringify({ t: "ack", seq: v.getUint32(RECT_SEQ, true), decodeMs: 0, drawMs: 0 }));
      }
    };
  }
  opened(): Promise<void> {
    return new Promise((resolve, reject) => {
      this.ws.onopen = () => resolve();
      this.ws.onerror = () => reject(new Error("the good client's socket failed"));
    });
  }
  close(): Promise<void> {
    if (this.ws.readyState === WebSocket.CLOSED) return Promise.resolve();
    const closed = new Promise<void>((r) => this.ws.addEventListener("close", () => r()));
    this.ws.close();
    return closed;
  }
}

interface Status {
  frame: number;
  clients: number;
}

/** The fixture process: its URL, its pid and its newest status line. */
async function startFixture(server: Record<string, unknown>) {
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--allow-all",
      FIXTURE,
      JSON.stringify({ width: FB_WIDTH, height: FB_HEIGHT, server }),
    ],
    stdout: "piped",
    stderr: "inherit",
    stdin: "null",
  }).spawn();
  const s = { status: { frame: 0, clients: 0 } as Status };
  let gotUrl: (url: string) => void = () => {};
  const urlLine = new Promise<string>((r) => gotUrl = r);
  const pump = (async () => {
    let pending = "";
    for await (const chunk of child.stdout.pipeThrough(new TextDecoderStream())) {
      pending += chunk;
      let nl;
      while ((nl = pending.indexOf("\n")) >= 0) {
        const line = JSON.parse(pending.slice(0, nl));
        pending = pending.slice(nl + 1);
        if (typeof line.url === "string") gotUrl(line.url);
        else s.status = line;
      }
    }
    gotUrl("");
  })();
  const url = await urlLine;
  assert.ok(url, "the fixture printed its URL");
  return {
    child,
    url,
    port: Number(new URL(url).port),
    token: new URL(url).searchParams.get("token")!,
    get status(): Status {
      return s.status;
    },
    async stop() {
      try {
        child.kill("SIGKILL");
      } catch { /* already gone */ }
      await child.status;
      await pump.catch(() => {});
    },
  };
}

Deno.test({
  name: "web display: 500 slow clients keep the server's memory bounded, a page that keeps up gets current frames",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const f = await startFixture({});
    const good = new GoodClient(f.url);
    const slow: Deno.TcpConn[] = [];
    try {
      await good.opened();
      await until("the good client's first frames", () => good.batches >= 3);
      const before = await rssKiB(f.child.pid);
      let peak = before;
      const statuses = new Map<number, number>();
      for (let i = 0; i < SLOW_CLIENTS; i += CONNECT_GROUP) {
        const group = await Promise.all(
          Array.from({ length: Math.min(CONNECT_GROUP, SLOW_CLIENTS - i) }, () => rawUpgrade(f.port, f.token)),
        );
        for (const g of group) {
          slow.push(g.conn);
          statuses.set(g.status, (statuses.get(g.status) ?? 0) + 1);
        }
        // Let frames flow to them before measuring.
        await sleep(100);
        peak = Math.max(peak, await rssKiB(f.child.pid));
        assert.ok(
          peak - before < SLOW_GROWTH_BOUND_KIB,
          `server VmRSS ${before} KiB -> ${peak} KiB after ${slow.length} slow clients ` +
            `(bound +${SLOW_GROWTH_BOUND_KIB} KiB)`,
        );
      }
      // Frames keep flowing: the good client is shown a frame at least as new as the server's now.
      const now = f.status.frame;
      await until(`the good client shown frame ${now}`, () => good.frame >= now);
      for (let i = 0; i < 20; i++) {
        await sleep(100);
        peak = Math.max(peak, await rssKiB(f.child.pid));
      }
      assert.ok(peak - before < SLOW_GROWTH_BOUND_KIB, `server VmRSS ${before} KiB -> ${peak} KiB`);
      // The slow clients go; what they cost comes back.
      for (const c of slow.splice(0)) closeQuietly(c);
      await until("the server to see the slow clients gone", () => f.status.clients === 1);
      let after = await rssKiB(f.child.pid);
      const deadline = Date.now() + GUARD_MS;
      while (after - before >= RETURN_BOUND_KIB && Date.now() < deadline) {
        await sleep(250);
        after = await rssKiB(f.child.pid);
      }
      console.log(
        `web display VmRSS: ${before} KiB with one page, peak ${peak} KiB with ${SLOW_CLIENTS} slow clients ` +
          `(responses ${JSON.stringify(Object.fromEntries(statuses))}), ${after} KiB after they went`,
      );
      assert.ok(after - before < RETURN_BOUND_KIB, `server VmRSS ${after} KiB after, ${before} KiB before`);
      const seen = good.frame;
      await until("the good client still shown new frames", () => good.frame > seen);
    } finally {
      for (const c of slow) closeQuietly(c);
      await good.close();
      await f.stop();
    }
  },
});

/** An in-process display with a full-screen change every tick, for the tests below. */
function frameSource(width: number, height: number) {
  const display = new HeadlessDisplay([{ width, height }]);
  const full = { x: 0, y: 0, width, height };
  display.setScanout(0, { resourceId: 1, rect: full });
  const px = new Uint32Array(width * height);
  let frame = 0;
  const timer = setInterval(() => {
    px.fill(++frame);
    display.flush(0, full, () => new Uint8Array(px.buffer));
  }, 16);
  return { display, stop: () => clearInterval(timer) };
}

Deno.test("web display: a client whose send buffer cannot drain is closed", async () => {
  const src = frameSource(FB_WIDTH, FB_HEIGHT);
  const server = new WebDisplay({ display: src.display, stallTimeoutMs: 500 } as WebDisplayOptions);
  const { url } = await server.start();
  const u = new URL(url);
  const c = await rawUpgrade(Number(u.port), u.searchParams.get("token")!);
  try {
    assert.equal(c.status, 101);
    await until("the client counted", () => server.stats().clients === 1);
    await until("the stalled client closed", () => server.stats().clients === 0);
    assert.ok(await readsToEnd(c.conn), "the server ended the stalled client's connection");
  } finally {
    closeQuietly(c.conn);
    src.stop();
    await server.close();
  }
});

Deno.test("web display: clients beyond the cap are refused with a reason; a place frees when one goes", async () => {
  const src = frameSource(64, 48);
  const server = new WebDisplay({ display: src.display, maxClients: 2 } as WebDisplayOptions);
  const { url } = await server.start();
  const u = new URL(url);
  const port = Number(u.port), token = u.searchParams.get("token")!;
  const a = await rawUpgrade(port, token), b = await rawUpgrade(port, token);
  let c: Awaited<ReturnType<typeof rawUpgrade>> | undefined;
  let d: Awaited<ReturnType<typeof rawUpgrade>> | undefined;
  try {
    assert.deepEqual([a.status, b.status], [101, 101]);
    c = await rawUpgrade(port, token);
    assert.equal(c.status, 503);
    assert.match(c.text, /too many clients/);
    assert.match(c.text, /\b2\b/);
    assert.ok(await readsToEnd(c.conn), "the refused connection is closed");
    closeQuietly(a.conn);
    await until("the first client gone", () => server.stats().clients === 1);
    d = await rawUpgrade(port, token);
    assert.equal(d.status, 101);
  } finally {
    for (const x of [a, b, c, d]) closeQuietly(x?.conn);
    src.stop();
    await server.close();
  }
});

Deno.test("web display: a port in use is one line naming the display and the address, exit code 35", async () => {
  const src = frameSource(64, 48);
  const taken = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  try {
    const port = taken.addr.port;
    const server = new WebDisplay({ display: src.display, port, name: "--gpu displays[1]" } as WebDisplayOptions);
    const err = await server.start().then(() => null, (e) => e);
    assert.ok(err instanceof Error, "start() failed");
    assert.equal(exitCodeFor(err), EXIT_INVALID_ARGS);
    assert.ok(!err.message.includes("\n"), err.message);
    assert.ok(err.message.includes(`127.0.0.1:${port}`), err.message);
    assert.ok(err.message.includes("--gpu displays[1]"), err.message);
    assert.match(err.message, /in use/);
    await server.close();
  } finally {
    taken.close();
    src.stop();
  }
});

/** Send `request` on a new connection and read its status line (0 when the connection ended without one). */
async function statusOf(port: number, request: string): Promise<{ conn: Deno.TcpConn; status: number }> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  await conn.write(enc.encode(request));
  const buf = new Uint8Array(4096);
  let text = "";
  while (!text.includes("\r\n")) {
    const n = await conn.read(buf).catch(() => null);
    if (n === null) break;
    text += dec.decode(buf.subarray(0, n));
  }
  return { conn, status: Number(/^HTTP\/1\.1 (\d{3})/.exec(text)?.[1] ?? 0) };
}

Deno.test("web display: an upgrade without the token, or from another origin, is refused before it becomes a WebSocket", async () => {
  const src = frameSource(64, 48);
  const server = new WebDisplay({ display: src.display } as WebDisplayOptions);
  const { url } = await server.start();
  const u = new URL(url);
  const port = Number(u.port), token = u.searchParams.get("token")!;
  const upgrade = (query: string, origin: string) =>
    `GET /ws?scanout=0${query} HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nOrigin: ${origin}\r\nUpgrade: websocket\r\n` +
    `Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n`;
  const opened: Deno.TcpConn[] = [];
  try {
    for (
      const [query, origin] of [
        ["", u.origin],
        [`&token=${"0".repeat(32)}`, u.origin],
        [`&token=${token}`, "http://elsewhere.example"],
        [`&token=${token}`, `http://localhost:${port}`],
      ]
    ) {
      const r = await statusOf(port, upgrade(query, origin));
      opened.push(r.conn);
      assert.equal(r.status, 403, `${query} from ${origin}`);
      assert.ok(await readsToEnd(r.conn), "the refused connection is closed");
    }
    assert.equal(server.stats().clients, 0);
    assert.equal(server.stats().refused, 4);
    const ok = await statusOf(port, upgrade(`&token=${token}`, u.origin));
    opened.push(ok.conn);
    assert.equal(ok.status, 101);
  } finally {
    for (const c of opened) closeQuietly(c);
    src.stop();
    await server.close();
  }
});

Deno.test("web display: connections that do not finish their request are limited and closed; a head too large gets 431", async () => {
  const src = frameSource(64, 48);
  const server = new WebDisplay({ display: src.display } as WebDisplayOptions);
  const { url } = await server.start();
  const u = new URL(url);
  const port = Number(u.port);
  const idle: Deno.TcpConn[] = [];
  try {
    const big = await statusOf(
      port,
      `GET ${u.pathname}${u.search} HTTP/1.1\r\nHost: ${u.host}\r\n` +
        `X-Pad: ${"a".repeat(MAX_REQUEST_HEAD_BYTES)}\r\n\r\n`,
    );
    assert.equal(big.status, 431);
    assert.ok(await readsToEnd(big.conn), "the connection is closed after the 431");
    closeQuietly(big.conn);
    // MAX_PENDING_CONNECTIONS that send half a request and stop; the next one is closed at once.
    for (let i = 0; i < MAX_PENDING_CONNECTIONS; i++) {
      const c = await Deno.connect({ hostname: "127.0.0.1", port });
      idle.push(c);
      await c.write(enc.encode(`GET / HTTP/1.1\r\nHost: ${u.host}\r\n`));
    }
    const extra = await Deno.connect({ hostname: "127.0.0.1", port });
    idle.push(extra);
    assert.ok(await readsToEnd(extra), "a connection beyond the limit is closed");
    const first = await Promise.race([idle[0].read(new Uint8Array(1)), sleep(100).then(() => "open" as const)]);
    assert.equal(first, "open", "the pending connections are still open");
    // Each is closed when its time to send the request is up; then a request is served again.
    const ended = await Promise.all(idle.slice(0, MAX_PENDING_CONNECTIONS).map(readsToEnd));
    assert.ok(ended.every((e) => e), "every unfinished request's connection is closed");
    const page = await statusOf(port, `GET ${u.pathname}${u.search} HTTP/1.1\r\nHost: ${u.host}\r\n\r\n`);
    idle.push(page.conn);
    assert.equal(page.status, 200);
  } finally {
    for (const c of idle) closeQuietly(c);
    src.stop();
    await server.close();
  }
});
