// The web display: an HTTP page and a WebSocket on loopback that show a VM's scanout live, forward
// keyboard, mouse and touch to virtio-input devices, and stream the virtio-gpu copy counters for the page's
// live plot. This module ties the parts together: http.ts (the token, the routes, the page), frames.ts
// (each page's frames: pacing, change detection in tiles.ts, encoding in encode.ts) and input_bridge.ts
// (page input to the input devices), served by node:http, whose upgrade hands the TCP connection to the
// `ws` package (websocket.ts), so that what waits to be sent to each page is bounded and a page that stops
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
import { type FrameCounters, FrameStream, SEND_BUFFER_LOW_BYTES, zeroFrameCounters } from "./frames.ts";
import {
  checkedToken,
  isLoopback,
  MAX_REQUEST_HEAD_BYTES,
  refusedResponse,
  requestFrom,
  responseBytes,
  sendResponse,
  Site,
  textResponse,
} from "./http.ts";
import { InputBridge, type InputSinks, PageInput } from "./input_bridge.ts";
import { parseClientMessage } from "./protocol.ts";
import { CLOSE_GOING_AWAY, type PageSocket, PageSocketServer } from "./websocket.ts";
import type { Buffer } from "node:buffer";
import http from "node:http";
import type { AddressInfo, Socket } from "node:net";
import type { Duplex } from "node:stream";
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
export const MAX_PENDING_CONNECTIONS = 64;
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
  constructor(readonly ws: PageSocket, readonly scanout: number, opts: ConstructorParameters<typeof FrameStream>[0]) {
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
    ...zeroFrameCounters(),
    inputMessages: 0,
    refused: 0,
    refusedBusy: 0,
    stalledClosed: 0,
  };
  readonly #input: InputBridge;
  readonly #sockets = new PageSocketServer({
    maxMessageBytes: MAX_CLIENT_MESSAGE_BYTES,
    lowWaterBytes: SEND_BUFFER_LOW_BYTES,
  });
  #server: http.Server | undefined;
  /** Connections still sending their request or taking the response, each with its deadline. */
  readonly #pending = new Map<Duplex, ReturnType<typeof setTimeout>>();
  #unsubscribe: (() => void) | undefined;
  #statsTimer: ReturnType<typeof setInterval> | undefined;
  #stallTimer: ReturnType<typeof setInterval> | undefined;
  #trimTimer: ReturnType<typeof setTimeout> | undefined;
  #site: Site | undefined;
  #starting: Promise<{ url: string }> | undefined;

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
    this.#starting ??= this.#listen().catch((e) => {
      this.#starting = undefined;
      throw e;
    });
    return this.#starting;
  }

  #listen(): Promise<{ url: string }> {
    const hostname = this.#opts.host ?? DEFAULT_HOST;
    const port = this.#opts.port ?? 0;
    const where = `${this.#opts.name ?? "web display"}: cannot listen on ${hostname}:${port}`;
    const server = http.createServer({ maxHeaderSize: MAX_REQUEST_HEAD_BYTES });
    server.on("connection", (socket: Socket) => this.#onConnection(socket));
    server.on("request", (req, res) => void this.#onRequest(req, res));
    server.on("upgrade", (req, socket, head) => void this.#onUpgrade(req, socket, head));
    server.on("clientError", (e, socket) => void this.#onClientError(e, socket));
    return new Promise((resolve, reject) => {
      const failed = (e: unknown) => {
        server.close();
        reject(listenError(where, e));
      };
      server.once("error", failed);
      try {
        server.listen({ port, host: hostname }, () => {
          server.off("error", failed);
          server.on("error", (e) => this.#log.log(`server error: ${firstLine(e)}`));
          const addr = server.address() as AddressInfo;
          this.#server = server;
          this.#site = new Site(this.token, { transport: "tcp", hostname: addr.address, port: addr.port });
          this.#unsubscribe = this.#opts.display.onUpdate((id, rect) => this.#onUpdate(id, rect));
          resolve({ url: this.#site.url });
        });
      } catch (e) {
        failed(e); // a port number out of range
      }
    });
  }

  async close(): Promise<void> {
    await this.#starting?.catch(() => {});
    this.#starting = undefined;
    this.#unsubscribe?.();
    this.#unsubscribe = undefined;
    this.#stopTimers();
    const server = this.#server;
    this.#server = undefined;
    // Stop listening; the callback runs once every connection, the pages' too, has ended.
    const serverClosed = server ? new Promise<void>((r) => server.close(() => r())) : Promise.resolve();
    for (const socket of [...this.#pending.keys()]) socket.destroy();
    const closing = [...this.#clients].map((c) => {
      c.ws.close(CLOSE_GOING_AWAY);
      return c.ws.closed;
    });
    await Promise.all(closing);
    await serverClosed;
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

  /** A new connection: pending until it has become a page or has ended, for at most REQUEST_TIMEOUT_MS. */
  #onConnection(socket: Socket): void {
    if (this.#pending.size >= MAX_PENDING_CONNECTIONS || !this.#server) {
      socket.destroy();
      return;
    }
    this.#pending.set(socket, setTimeout(() => socket.destroy(), REQUEST_TIMEOUT_MS));
    socket.once("close", () => this.#settled(socket));
  }

  /** `socket` is no longer pending: it ended, or it is a page's. */
  #settled(socket: Duplex): void {
    clearTimeout(this.#pending.get(socket));
    this.#pending.delete(socket);
  }

  /** A request that is not an upgrade: the page, or why not. The connection ends after the response. */
  async #onRequest(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    try {
      const site = this.#site;
      if (!site || !this.#server) {
        res.destroy();
        return;
      }
      const request = requestFrom(req, site.origin);
      if (typeof request === "number") {
        await sendResponse(res, textResponse(request, "bad request\n"));
        return;
      }
      const r = site.route(request, this.#opts.display.count);
      if (r.kind === "refused") {
        this.#counters.refused++;
        await sendResponse(res, refusedResponse());
      } else if (r.kind === "socket") {
        // An Upgrade header without `Connection: upgrade`.
        await sendResponse(res, textResponse(400, "WebSocket handshake expected\n"));
      } else {
        await sendResponse(res, r.response, request.method === "HEAD");
      }
    } catch (e) {
      this.#log.log(`request failed: ${firstLine(e)}`);
      res.destroy();
    }
  }

  /** An upgrade request: the page's WebSocket when the token, origin, scanout and client cap allow it. */
  async #onUpgrade(req: http.IncomingMessage, socket: Duplex, head: Buffer): Promise<void> {
    try {
      const site = this.#site;
      if (!site || !this.#server) {
        socket.destroy();
        return;
      }
      const request = requestFrom(req, site.origin);
      let refusal: Response;
      if (typeof request === "number") {
        refusal = textResponse(request, "bad request\n");
      } else {
        const r = site.route(request, this.#opts.display.count);
        if (r.kind === "refused") {
          this.#counters.refused++;
          refusal = refusedResponse();
        } else if (r.kind === "response") {
          refusal = r.response;
        } else if (this.#clients.size >= this.#maxClients) {
          this.#counters.refusedBusy++;
          const n = this.#clients.size;
          refusal = textResponse(
            503,
            `web display: too many clients (${n} connected, the limit is ${this.#maxClients})\n`,
          );
        } else {
          const loopback = isLoopback((socket as Socket).remoteAddress ?? "");
          // ws checks the handshake (RFC 6455 section 4.2.1) and answers a malformed one with 400.
          this.#sockets.handleUpgrade(req, socket, head, (ws) => {
            this.#settled(socket);
            this.#accept(ws, r.scanout, loopback);
          });
          return;
        }
      }
      endWith(socket, await responseBytes(refusal));
    } catch (e) {
      this.#log.log(`request failed: ${firstLine(e)}`);
      socket.destroy();
    }
  }

  /** A request node:http could not parse (431 for a head over MAX_REQUEST_HEAD_BYTES), or a socket error. */
  async #onClientError(e: Error & { code?: string }, socket: Duplex): Promise<void> {
    if (!e.code?.startsWith("HPE_") || !socket.writable) {
      socket.destroy();
      return;
    }
    const status = e.code === "HPE_HEADER_OVERFLOW" ? 431 : 400;
    endWith(
      socket,
      await responseBytes(textResponse(status, status === 431 ? "request head too large\n" : "bad request\n")),
    );
  }

  // ---- WebSocket ----

  #accept(ws: PageSocket, scanout: number, loopback: boolean): void {
    const asked = this.#opts.encoding ?? "auto";
    // The handlers run only after this returns (the socket's events come from the event loop), when `c` exists.
    ws.start({
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
    if (this.#server) this.#scheduleTrim();
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

/** Write `bytes` (a whole response) and end the connection once the kernel has taken them. */
function endWith(socket: Duplex, bytes: Uint8Array): void {
  if (socket.destroyed) return;
  socket.end(bytes, () => socket.destroy());
}

/** The error for a server that could not listen: a UsageError where the user's address or port is at fault. */
function listenError(where: string, e: unknown): Error {
  const code = (e as { code?: unknown }).code;
  switch (code) {
    case "EADDRINUSE":
      return new UsageError(`${where}: the address is already in use`);
    case "EADDRNOTAVAIL":
    case "EINVAL":
      return new UsageError(`${where}: not an address of this machine`);
    case "ENOTFOUND":
      return new UsageError(`${where}: no such host`);
    case "EACCES":
    case "EPERM":
      return new UsageError(`${where}: permission denied`);
    case "ERR_SOCKET_BAD_PORT":
      return new UsageError(`${where}: not a port number`);
  }
  return new HostError(`${where}: ${firstLine(e)}`);
}

function firstLine(e: unknown): string {
  return (e instanceof Error ? e.message : String(e)).split("\n")[0];
}
