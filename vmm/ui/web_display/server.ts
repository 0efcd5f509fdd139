// The web display: an HTTP page and a WebSocket on loopback that show a VM's scanout live, forward
// keyboard, mouse and touch to virtio-input devices, and stream the virtio-gpu copy counters for the page's
// live plot. This module ties the parts together: http.ts (the token, the routes, the page), frames.ts
// (each page's frames: pacing, change detection in tiles.ts, encoding in encode.ts) and input_bridge.ts
// (page input to the input devices), on TCP connections it owns: HTTP/1.1 requests (http.ts) and
// WebSockets (websocket.ts), so that what waits to be sent to each page is bounded and a page that stops
// reading can be disconnected.
//
// Bounds: at most maxClients pages at once (one more is refused with 503 and the reason); at most
// MAX_PENDING_CONNECTIONS connections still sending their request, each for at most REQUEST_TIMEOUT_MS;
// a page's socket holds at most one batch beyond SEND_BUFFER_LOW_BYTES (frames.ts), and a page whose socket
// stays above that for stallTimeoutMs is disconnected (the page reconnects by itself when it can).

import type { Rect } from "../../../devices/virtio/gpu/backend.ts";
import type { HeadlessDisplay } from "../../../devices/virtio/gpu/display.ts";
import { RateLimitedLog } from "../../../core/log.ts";
import type { Compression } from "./encode.ts";
import { type FrameCounters, FrameStream, SEND_BUFFER_LOW_BYTES } from "./frames.ts";
import {
  checkedToken,
  isLoopback,
  parseRequestHead,
  readRequestHead,
  refusedResponse,
  Site,
  textResponse,
  writeResponse,
} from "./http.ts";
import { InputBridge, type InputSinks, PageInput } from "./input_bridge.ts";
import { parseClientMessage } from "./protocol.ts";
import { acceptKey, CLOSE_GOING_AWAY, WS_VERSION, WsConnection } from "./websocket.ts";
import { HostError, UsageError } from "../../../core/exit.ts";
import { libc } from "../../../ffi/libc.ts";

export interface WebDisplayOptions {
  display: HeadlessDisplay;
  input?: InputSinks;
  /** The copy counters (GpuDevice.gpuStats()), polled while a page is connected. */
  stats?: () => object;
  /** TCP port; 0 (default) picks a free one. */
  port?: number;
  /** Address to listen on; loopback unless told otherwise. */
  host?: string;
  /** The access token (16..128 of [0-9A-Za-z_-]); default 32 random hex digits. */
  token?: string;
  /** Frame-rate cap per page (default 60). */
  maxFps?: number;
  /** How often stats() is polled and sent (default 500 ms). */
  statsIntervalMs?: number;
  /**
   * "auto" (default): raw to a page on this machine (loopback), where bandwidth is plentiful and the page's
   * PNG decode would be the limit; to a page elsewhere, rectangles that sample as compressible go as PNG
   * (decoded natively by the page) and the rest raw; "png": that second choice everywhere; "deflate":
   * compressible ones as deflate-raw (inflated by DecompressionStream, slower in the page); "raw": never
   * compress.
   */
  encoding?: "auto" | Compression;
  /** Pages connected at once (default DEFAULT_MAX_CLIENTS); one more is refused with 503. */
  maxClients?: number;
  /** A page whose socket stays backed up (see frames.ts) this long is disconnected (default 10 s). */
  stallTimeoutMs?: number;
  /** What the display is called in errors (default "web display"), e.g. which --gpu display it is. */
  name?: string;
}

/** The display's counters: the frame counters of every page (frames.ts), and the ones below. */
export interface WebDisplayStats extends FrameCounters {
  clients: number;
  inputMessages: number;
  /** Requests refused for a missing or wrong token or origin. */
  refused: number;
  /** Pages refused because maxClients were connected. */
  refusedBusy: number;
  /** Pages disconnected because their socket stayed backed up for stallTimeoutMs. */
  stalledClosed: number;
}

const DEFAULT_HOST = "127.0.0.1";
const DEFAULT_MAX_FPS = 60;
const DEFAULT_STATS_INTERVAL_MS = 500;
const DEFAULT_MAX_CLIENTS = 16;
const DEFAULT_STALL_TIMEOUT_MS = 10_000;
/** Connections that have not finished their request yet; more are closed at once. */
const MAX_PENDING_CONNECTIONS = 64;
/** How long a connection has to send its request and take the response. */
const REQUEST_TIMEOUT_MS = 10_000;
/**
 * How long after a page goes the freed heap is handed back to the system, so that many pages going at
 * once cost one trim. glibc keeps freed blocks in its arenas (large ones too, once its mmap threshold has
 * adapted upwards); malloc_trim(3) returns their pages.
 */
const TRIM_DELAY_MS = 1000;
/** The page sends small JSON messages (acks, input): anything larger is not from the page. */
const MAX_CLIENT_MESSAGE_BYTES = 64 * 1024;

/** One connected page. */
class Client {
  readonly frames: FrameStream;
  readonly input: PageInput;
  constructor(readonly ws: WsConnection, readonly scanout: number, opts: ConstructorParameters<typeof FrameStream>[0]) {
    this.frames = new FrameStream(opts);
    this.input = new PageInput(() => ({ width: this.frames.sentWidth, height: this.frames.sentHeight }));
  }
}

export class WebDisplay {
  readonly token: string;
  readonly #opts: WebDisplayOptions;
  readonly #clients = new Set<Client>();
  readonly #log = new RateLimitedLog("web display");
  readonly #minIntervalMs: number;
  readonly #maxClients: number;
  readonly #stallTimeoutMs: number;
  readonly #counters: Omit<WebDisplayStats, "clients"> = {
    batchesSent: 0,
    rectsSent: 0,
    bytesSent: 0,
    rectsDeflated: 0,
    deflatedRawBytes: 0,
    tilesCompared: 0,
    tilesChanged: 0,
    encodeMs: 0,
    acks: 0,
    pageDecodeMs: 0,
    pageDrawMs: 0,
    inputMessages: 0,
    refused: 0,
    refusedBusy: 0,
    stalledClosed: 0,
  };
  readonly #input: InputBridge;
  #listener: Deno.Listener<Deno.TcpConn, Deno.NetAddr> | undefined;
  #accepting: Promise<void> | undefined;
  /** Connections still sending their request or taking the response, and those being upgraded. */
  readonly #pending = new Set<Deno.Conn>();
  #upgrading = 0;
  #unsubscribe: (() => void) | undefined;
  #statsTimer: ReturnType<typeof setInterval> | undefined;
  #stallTimer: ReturnType<typeof setInterval> | undefined;
  #trimTimer: ReturnType<typeof setTimeout> | undefined;
  #site: Site | undefined;

  constructor(opts: WebDisplayOptions) {
    this.token = checkedToken(opts.token);
    this.#opts = opts;
    const fps = opts.maxFps ?? DEFAULT_MAX_FPS;
    if (!(fps > 0)) throw new Error(`web display: maxFps ${fps} must be positive`);
    this.#minIntervalMs = 1000 / fps;
    this.#maxClients = opts.maxClients ?? DEFAULT_MAX_CLIENTS;
    if (!Number.isInteger(this.#maxClients) || this.#maxClients < 1) {
      throw new Error(`web display: maxClients ${this.#maxClients} must be a positive integer`);
    }
    this.#stallTimeoutMs = opts.stallTimeoutMs ?? DEFAULT_STALL_TIMEOUT_MS;
    if (!(this.#stallTimeoutMs > 0)) throw new Error(`web display: stallTimeoutMs must be positive`);
    this.#input = new InputBridge(opts.input ?? {}, this.#log);
  }

  /** The page's address with the token (valid after start()). */
  get url(): string {
    return this.#site?.url ?? "";
  }

  stats(): WebDisplayStats {
    return { clients: this.#clients.size, ...this.#counters };
  }

  /**
   * Listen and serve. A port that is taken, or an address this machine does not have, is the user's to fix:
   * a UsageError naming the display and the address.
   */
  start(): Promise<{ url: string }> {
    if (this.#listener) return Promise.resolve({ url: this.url });
    const hostname = this.#opts.host ?? DEFAULT_HOST;
    const port = this.#opts.port ?? 0;
    let listener: Deno.Listener<Deno.TcpConn, Deno.NetAddr>;
    try {
      listener = Deno.listen({ hostname, port, transport: "tcp" });
    } catch (e) {
      const where = `${this.#opts.name ?? "web display"}: cannot listen on ${hostname}:${port}`;
      if (e instanceof Deno.errors.AddrInUse) {
        return Promise.reject(new UsageError(`${where}: the address is already in use`));
      }
      if (e instanceof Deno.errors.AddrNotAvailable || e instanceof Deno.errors.PermissionDenied) {
        return Promise.reject(new UsageError(`${where}: ${firstLine(e)}`));
      }
      return Promise.reject(new HostError(`${where}: ${firstLine(e)}`));
    }
    this.#listener = listener;
    this.#site = new Site(this.token, listener.addr);
    this.#unsubscribe = this.#opts.display.onUpdate((id, rect) => this.#onUpdate(id, rect));
    this.#accepting = this.#acceptLoop(listener);
    return Promise.resolve({ url: this.#site.url });
  }

  async close(): Promise<void> {
    this.#unsubscribe?.();
    this.#unsubscribe = undefined;
    this.#stopTimers();
    const l = this.#listener;
    this.#listener = undefined;
    if (l) {
      try {
        l.close();
      } catch { /* already closed */ }
    }
    await this.#accepting;
    this.#accepting = undefined;
    for (const conn of this.#pending) closeQuietly(conn);
    const closing = [...this.#clients].map((c) => {
      c.ws.close(CLOSE_GOING_AWAY);
      return c.ws.closed;
    });
    await Promise.all(closing);
    if (this.#trimTimer !== undefined) clearTimeout(this.#trimTimer);
    this.#trimTimer = undefined;
  }

  #stopTimers(): void {
    if (this.#statsTimer !== undefined) clearInterval(this.#statsTimer);
    this.#statsTimer = undefined;
    if (this.#stallTimer !== undefined) clearInterval(this.#stallTimer);
    this.#stallTimer = undefined;
  }

  /** Hand the memory of pages that went back to the system, once they stop going (TRIM_DELAY_MS). */
  #scheduleTrim(): void {
    if (this.#trimTimer !== undefined) clearTimeout(this.#trimTimer);
    this.#trimTimer = setTimeout(() => {
      this.#trimTimer = undefined;
      trimHeap();
    }, TRIM_DELAY_MS);
  }

  // ---- HTTP ----

  async #acceptLoop(listener: Deno.Listener<Deno.TcpConn, Deno.NetAddr>): Promise<void> {
    for (;;) {
      let conn: Deno.TcpConn;
      try {
        conn = await listener.accept();
      } catch {
        return; // the listener was closed
      }
      if (this.#pending.size >= MAX_PENDING_CONNECTIONS || !this.#listener) {
        closeQuietly(conn);
        continue;
      }
      void this.#serveConnection(conn);
    }
  }

  /** One connection: its request, and either the response or the page's WebSocket. */
  async #serveConnection(conn: Deno.TcpConn): Promise<void> {
    this.#pending.add(conn);
    const timer = setTimeout(() => closeQuietly(conn), REQUEST_TIMEOUT_MS);
    let upgraded = false;
    try {
      const got = await readRequestHead(conn);
      if (got === null) return;
      const site = this.#site;
      if (!site) return;
      if (got === "too-large") {
        await writeResponse(conn, textResponse(431, "request head too large\n"));
        return;
      }
      const req = parseRequestHead(got.head, site.origin);
      if (typeof req === "number") {
        await writeResponse(conn, textResponse(req, "bad request\n"));
        return;
      }
      const r = site.route(req, this.#opts.display.count);
      if (r.kind === "refused") {
        this.#counters.refused++;
        await writeResponse(conn, refusedResponse());
        return;
      }
      if (r.kind === "response") {
        await writeResponse(conn, r.response, req.method === "HEAD");
        return;
      }
      const peer = conn.remoteAddr.hostname;
      upgraded = await this.#upgrade(conn, req, got.rest, r.scanout, isLoopback(peer));
    } catch (e) {
      if (!(e instanceof Deno.errors.BadResource || e instanceof Deno.errors.Interrupted)) {
        this.#log.log(`request failed: ${firstLine(e)}`);
      }
    } finally {
      clearTimeout(timer);
      this.#pending.delete(conn);
      if (!upgraded) closeQuietly(conn);
    }
  }

  /** Complete the WebSocket handshake (RFC 6455 section 4.2.2); true when the page is connected. */
  async #upgrade(conn: Deno.TcpConn, req: Request, rest: Uint8Array, scanout: number, loopback: boolean) {
    if (req.method !== "GET" || !/\bupgrade\b/i.test(req.headers.get("connection") ?? "")) {
      await writeResponse(conn, textResponse(400, "WebSocket handshake expected\n"));
      return false;
    }
    if (req.headers.get("sec-websocket-version")?.trim() !== WS_VERSION) {
      const headers = { "sec-websocket-version": WS_VERSION };
      await writeResponse(conn, textResponse(426, "WebSocket version 13 expected\n", headers));
      return false;
    }
    const accept = await acceptKey(req.headers.get("sec-websocket-key"));
    if (accept === null) {
      await writeResponse(conn, textResponse(400, "bad Sec-WebSocket-Key\n"));
      return false;
    }
    const connected = this.#clients.size + this.#upgrading;
    if (connected >= this.#maxClients) {
      this.#counters.refusedBusy++;
      const msg = `web display: too many clients (${connected} connected, the limit is ${this.#maxClients})\n`;
      await writeResponse(conn, textResponse(503, msg));
      return false;
    }
    this.#upgrading++;
    try {
      const head = "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n" +
        `sec-websocket-accept: ${accept}\r\n\r\n`;
      let out = new TextEncoder().encode(head);
      while (out.length > 0) out = out.subarray(await conn.write(out));
    } finally {
      this.#upgrading--;
    }
    if (!this.#listener) return false;
    this.#accept(conn, rest, scanout, loopback);
    return true;
  }

  // ---- WebSocket ----

  #accept(conn: Deno.TcpConn, rest: Uint8Array, scanout: number, loopback: boolean): void {
    const asked = this.#opts.encoding ?? "auto";
    // The callbacks run only once the connection has started (below), when `c` exists.
    const ws = new WsConnection(conn, {
      maxMessageBytes: MAX_CLIENT_MESSAGE_BYTES,
      lowWaterBytes: SEND_BUFFER_LOW_BYTES,
      onMessage: (text) => this.#onMessage(c, text),
      onClose: () => this.#drop(c),
      onDrain: () => c.frames.schedule(),
    });
    const c = new Client(ws, scanout, {
      display: this.#opts.display,
      scanout,
      ws,
      compression: asked === "auto" ? (loopback ? "raw" : "png") : asked,
      minIntervalMs: this.#minIntervalMs,
      counters: this.#counters,
      log: this.#log,
    });
    this.#clients.add(c);
    const fb = this.#opts.display.framebuffer(scanout);
    const inp = this.#opts.input ?? {};
    this.#sendText(c, {
      t: "hello",
      scanout,
      scanouts: this.#opts.display.count,
      width: fb.width,
      height: fb.height,
      input: {
        keyboard: inp.keyboard ? inp.keyboard.kind : null,
        pointer: inp.pointer ? inp.pointer.kind : null,
        touch: inp.touch ? inp.touch.kind : null,
      },
      statsIntervalMs: this.#opts.stats ? this.#statsInterval() : null,
    });
    c.frames.schedule();
    if (this.#opts.stats) {
      this.#sendStats([c]);
      this.#statsTimer ??= setInterval(() => this.#sendStats([...this.#clients]), this.#statsInterval());
    }
    this.#stallTimer ??= setInterval(() => this.#closeStalled(), Math.min(1000, this.#stallTimeoutMs / 2));
    ws.start(rest);
  }

  #onMessage(c: Client, text: string): void {
    const m = parseClientMessage(text);
    if (!m) {
      this.#log.log(`malformed message from the page ignored`);
      return;
    }
    if (m.t === "ack") {
      c.frames.ack(m.decodeMs ?? 0, m.drawMs ?? 0);
      return;
    }
    this.#counters.inputMessages++;
    this.#input.handle(c.input, m);
  }

  /** Disconnect the pages whose socket has stayed backed up for stallTimeoutMs. */
  #closeStalled(): void {
    const now = performance.now();
    for (const c of [...this.#clients]) {
      if (c.ws.backedUpMs(now) < this.#stallTimeoutMs) continue;
      this.#counters.stalledClosed++;
      this.#log.log(
        `a page has not taken its data for ${Math.round(this.#stallTimeoutMs / 1000)} s ` +
          `(${c.ws.bufferedAmount} bytes waiting): disconnected`,
      );
      c.ws.abort();
    }
  }

  #statsInterval(): number {
    return this.#opts.statsIntervalMs ?? DEFAULT_STATS_INTERVAL_MS;
  }

  #drop(c: Client): void {
    if (!this.#clients.delete(c)) return;
    c.frames.stop();
    this.#input.releaseAll(c.input);
    if (this.#clients.size === 0) this.#stopTimers();
    if (this.#listener) this.#scheduleTrim();
  }

  #sendText(c: Client, msg: object): void {
    if (c.ws.open) c.ws.send(JSON.stringify(msg));
  }

  #sendStats(clients: Client[]): void {
    const get = this.#opts.stats;
    if (!get || clients.length === 0) return;
    let stats: object;
    try {
      stats = get();
    } catch (e) {
      this.#log.log(`stats() failed: ${e}`);
      return;
    }
    const text = JSON.stringify({ t: "stats", time: performance.now(), stats });
    // A page that is behind skips a sample: the next one has the newest counters.
    for (const c of clients) {
      if (c.ws.open && c.ws.bufferedAmount <= SEND_BUFFER_LOW_BYTES) c.ws.send(text);
    }
  }

  /** The guest flushed `rect` of `scanout`: every page showing it sends what changed. */
  #onUpdate(scanout: number, rect: Rect): void {
    for (const c of this.#clients) {
      if (c.scanout === scanout) c.frames.damage(rect);
    }
  }
}

let canTrim = true;

/** malloc_trim(0): give free heap pages back to the kernel; skipped for good where it cannot be called. */
function trimHeap(): void {
  if (!canTrim) return;
  try {
    libc().malloc_trim(0n);
  } catch {
    canTrim = false; // no FFI permission, or a C library without malloc_trim
  }
}

function closeQuietly(conn: Deno.Conn): void {
  try {
    conn.close();
  } catch { /* already closed */ }
}

function firstLine(e: unknown): string {
  return (e instanceof Error ? e.message : String(e)).split("\n")[0];
}
