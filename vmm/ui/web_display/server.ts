// The web display: an HTTP page and a WebSocket on loopback that show a VM's scanout live, forward
// keyboard, mouse and touch to virtio-input devices, and stream the virtio-gpu copy counters for the page's
// live plot. This module ties the parts together: http.ts (the token, the routes, the page), frames.ts
// (each page's frames: pacing, change detection in tiles.ts, encoding in encode.ts) and input_bridge.ts
// (page input to the input devices).

import type { Rect } from "../../../devices/virtio/gpu/backend.ts";
import type { HeadlessDisplay } from "../../../devices/virtio/gpu/display.ts";
import { RateLimitedLog } from "../../../core/log.ts";
import type { Compression } from "./encode.ts";
import { type FrameCounters, FrameStream } from "./frames.ts";
import { checkedToken, isLoopback, refusedResponse, Site } from "./http.ts";
import { InputBridge, type InputSinks, PageInput } from "./input_bridge.ts";
import { parseClientMessage } from "./protocol.ts";

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
}

/** The display's counters: the frame counters of every page (frames.ts), and the ones below. */
export interface WebDisplayStats extends FrameCounters {
  clients: number;
  inputMessages: number;
  /** Requests refused for a missing or wrong token or origin. */
  refused: number;
}

const DEFAULT_HOST = "127.0.0.1";
const DEFAULT_MAX_FPS = 60;
const DEFAULT_STATS_INTERVAL_MS = 500;

/** One connected page. */
class Client {
  readonly frames: FrameStream;
  readonly input: PageInput;
  constructor(readonly ws: WebSocket, readonly scanout: number, opts: ConstructorParameters<typeof FrameStream>[0]) {
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
  };
  readonly #input: InputBridge;
  #server: Deno.HttpServer<Deno.NetAddr> | undefined;
  #unsubscribe: (() => void) | undefined;
  #statsTimer: ReturnType<typeof setInterval> | undefined;
  #site: Site | undefined;

  constructor(opts: WebDisplayOptions) {
    this.token = checkedToken(opts.token);
    this.#opts = opts;
    const fps = opts.maxFps ?? DEFAULT_MAX_FPS;
    if (!(fps > 0)) throw new Error(`web display: maxFps ${fps} must be positive`);
    this.#minIntervalMs = 1000 / fps;
    this.#input = new InputBridge(opts.input ?? {}, this.#log);
  }

  /** The page's address with the token (valid after start()). */
  get url(): string {
    return this.#site?.url ?? "";
  }

  stats(): WebDisplayStats {
    return { clients: this.#clients.size, ...this.#counters };
  }

  start(): Promise<{ url: string }> {
    if (this.#server) return Promise.resolve({ url: this.url });
    const hostname = this.#opts.host ?? DEFAULT_HOST;
    return new Promise((resolve, reject) => {
      try {
        this.#server = Deno.serve({
          hostname,
          port: this.#opts.port ?? 0,
          onListen: (addr) => {
            this.#site = new Site(this.token, addr);
            this.#unsubscribe = this.#opts.display.onUpdate((id, rect) => this.#onUpdate(id, rect));
            resolve({ url: this.#site.url });
          },
          onError: (e) => {
            this.#log.log(`request failed: ${e}`);
            return new Response("internal error", { status: 500 });
          },
        }, (req, info) => this.#handle(req, info.remoteAddr.hostname));
      } catch (e) {
        reject(e);
      }
    });
  }

  async close(): Promise<void> {
    this.#unsubscribe?.();
    this.#unsubscribe = undefined;
    if (this.#statsTimer !== undefined) clearInterval(this.#statsTimer);
    this.#statsTimer = undefined;
    for (const c of [...this.#clients]) {
      this.#drop(c);
      try {
        c.ws.close();
      } catch { /* already closed */ }
    }
    const s = this.#server;
    this.#server = undefined;
    if (s) await s.shutdown();
  }

  #handle(req: Request, peer: string): Response {
    const r = this.#site?.route(req, this.#opts.display.count) ?? { kind: "refused" };
    if (r.kind === "refused") {
      this.#counters.refused++;
      return refusedResponse();
    }
    if (r.kind === "response") return r.response;
    const { socket, response } = Deno.upgradeWebSocket(req);
    this.#accept(socket, r.scanout, isLoopback(peer));
    return response;
  }

  // ---- WebSocket ----

  #accept(ws: WebSocket, scanout: number, loopback: boolean): void {
    const asked = this.#opts.encoding ?? "auto";
    const c = new Client(ws, scanout, {
      display: this.#opts.display,
      scanout,
      ws,
      compression: asked === "auto" ? (loopback ? "raw" : "png") : asked,
      minIntervalMs: this.#minIntervalMs,
      counters: this.#counters,
      log: this.#log,
    });
    ws.binaryType = "arraybuffer";
    ws.onopen = () => {
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
    };
    ws.onmessage = (ev) => {
      if (typeof ev.data !== "string") return;
      const m = parseClientMessage(ev.data);
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
    };
    ws.onclose = () => this.#drop(c);
    ws.onerror = () => this.#drop(c);
  }

  #statsInterval(): number {
    return this.#opts.statsIntervalMs ?? DEFAULT_STATS_INTERVAL_MS;
  }

  #drop(c: Client): void {
    if (!this.#clients.delete(c)) return;
    c.frames.stop();
    this.#input.releaseAll(c.input);
    if (this.#clients.size === 0 && this.#statsTimer !== undefined) {
      clearInterval(this.#statsTimer);
      this.#statsTimer = undefined;
    }
  }

  #sendText(c: Client, msg: object): void {
    if (c.ws.readyState !== WebSocket.OPEN) return;
    try {
      c.ws.send(JSON.stringify(msg));
    } catch (e) {
      this.#log.log(`send failed: ${e}`);
    }
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
    for (const c of clients) {
      if (c.ws.readyState === WebSocket.OPEN) c.ws.send(text);
    }
  }

  /** The guest flushed `rect` of `scanout`: every page showing it sends what changed. */
  #onUpdate(scanout: number, rect: Rect): void {
    for (const c of this.#clients) {
      if (c.scanout === scanout) c.frames.damage(rect);
    }
  }
}
