// A page's WebSocket: the `ws` package's server end (RFC 6455: handshake, framing, masking, UTF-8 and size
// checks on what the peer sends), on the TCP socket that node:http hands over at the upgrade, with what the
// display needs around it. ws.terminate() destroys that socket, which ends the connection even while a write
// waits on a peer that does not read (a close frame would wait behind it).
//
// bufferedAmount is what ws and the socket hold that the kernel has not taken. The owner sends only while
// it is at most lowWaterBytes and asks backedUpMs() how long it has been above that. ws answers pings; a
// peer that leaves more than its maxPendingAutoPongs (60) pongs unsent is terminated.

// @types/ws depends on any @types/node; this pins the one it gets to deno.json's, whose web globals agree
// with Deno's (newer ones redeclare Event and break the type-check of code that uses Deno's).
/// <reference types="@types/node" />
import type { Buffer } from "node:buffer";
import type { IncomingMessage } from "node:http";
import type { Duplex } from "node:stream";
// @ts-types="@types/ws"
import { type WebSocket, WebSocketServer } from "ws";

// RFC 6455 section 7.4.1, close codes.
export const CLOSE_NORMAL = 1000;
export const CLOSE_GOING_AWAY = 1001;

/**
 * How long a closing connection waits for the closing handshake (the peer's close frame) before ws ends the
 * TCP connection: after close(), and after ws has closed it for a protocol error (1002, 1007, 1009).
 */
const CLOSE_GRACE_MS = 1000;

const utf8 = new TextDecoder();

/**
 * Give `view`'s memory back now rather than at the next full garbage collection: its ArrayBuffer is detached
 * (transferred to an empty one). Only for buffers nothing else will read. A page's shadow frame and sent
 * batches live long enough to reach the old generation, which V8 collects only when its own heap grows.
 */
export function releaseBuffer(view: ArrayBufferView): void {
  const b = view.buffer;
  if (b instanceof ArrayBuffer && !b.detached) {
    try {
      b.transfer(0);
    } catch { /* not detachable (e.g. a Wasm memory): left to the collector */ }
  }
}

export interface PageSocketOptions {
  /** Bytes the peer may send in one message (all its fragments); a larger one closes with 1009. */
  maxMessageBytes: number;
  /** bufferedAmount above this counts as backed up (backedUpMs). */
  lowWaterBytes: number;
}

export interface PageSocketHandlers {
  onMessage: (text: string) => void;
  /** Called once, when the connection has ended for whatever reason. */
  onClose: () => void;
  /** What was waiting to be sent has all been taken by the kernel. */
  onDrain: () => void;
}

/** Completes WebSocket handshakes (ws.WebSocketServer in noServer mode) into PageSockets. */
export class PageSocketServer {
  readonly #wss: WebSocketServer;
  readonly #o: PageSocketOptions;

  constructor(opts: PageSocketOptions) {
    this.#o = opts;
    // Not a literal: closeTimeout (ws 8.22 and later) is missing from @types/ws.
    const options = {
      noServer: true,
      clientTracking: false,
      perMessageDeflate: false,
      maxPayload: opts.maxMessageBytes,
      closeTimeout: CLOSE_GRACE_MS,
    };
    this.#wss = new WebSocketServer(options);
  }

  /**
   * Answer an upgrade request on `socket` (node:http's 'upgrade' event; `head`: the bytes read past the
   * request). ws answers a malformed handshake with 400 and closes the connection; otherwise `connected`
   * runs at once with the page's socket, which handles none of the peer's messages before its start().
   */
  handleUpgrade(req: IncomingMessage, socket: Duplex, head: Buffer, connected: (ws: PageSocket) => void): void {
    this.#wss.handleUpgrade(req, socket, head, (ws) => {
      connected(new PageSocket(ws, socket, this.#o.lowWaterBytes));
    });
  }
}

export class PageSocket {
  readonly #ws: WebSocket;
  readonly #socket: Duplex;
  readonly #lowWaterBytes: number;
  /** When a send last took bufferedAmount above lowWaterBytes, while it stays there. */
  #backedUpSince: number | undefined;
  readonly closed: Promise<void>;
  #resolveClosed: () => void = () => {};

  constructor(ws: WebSocket, socket: Duplex, lowWaterBytes: number) {
    this.#ws = ws;
    this.#socket = socket;
    this.#lowWaterBytes = lowWaterBytes;
    this.closed = new Promise((r) => this.#resolveClosed = r);
  }

  /** Start handling the peer's messages and the connection's end (call it before anything is sent). */
  start(h: PageSocketHandlers): void {
    const ws = this.#ws;
    // A peer that breaks the protocol: ws closes the connection (1002, 1007, 1009) and reports it here.
    ws.on("error", () => {});
    ws.on("message", (data, isBinary) => {
      // The page sends only text (JSON); binary messages are ignored. ws has checked the UTF-8.
      if (!isBinary && ws.readyState === ws.OPEN) h.onMessage(utf8.decode(data as Uint8Array));
    });
    ws.on("close", () => {
      this.#backedUpSince = undefined;
      this.#resolveClosed();
      h.onClose();
    });
    this.#socket.on("drain", () => {
      if (this.bufferedAmount > this.#lowWaterBytes) return;
      this.#backedUpSince = undefined;
      h.onDrain();
    });
  }

  get open(): boolean {
    return this.#ws.readyState === this.#ws.OPEN;
  }

  /** Bytes queued and not yet taken by the kernel. */
  get bufferedAmount(): number {
    return this.#ws.bufferedAmount;
  }

  /** How long bufferedAmount has stayed above lowWaterBytes (0 when it is not above). */
  backedUpMs(now = performance.now()): number {
    if (this.bufferedAmount <= this.#lowWaterBytes) this.#backedUpSince = undefined;
    return this.#backedUpSince === undefined ? 0 : now - this.#backedUpSince;
  }

  /**
   * Send a text (string) or binary message; nothing happens once the connection is closing. The socket owns a
   * binary message's buffer from here on: it is released once written, or once the connection has ended.
   */
  send(data: string | Uint8Array): void {
    if (!this.open) return;
    if (this.bufferedAmount <= this.#lowWaterBytes) this.#backedUpSince = undefined;
    if (typeof data === "string") {
      this.#ws.send(data);
    } else {
      this.#ws.send(data, { binary: true }, () => releaseBuffer(data));
    }
    if (this.#backedUpSince === undefined && this.bufferedAmount > this.#lowWaterBytes) {
      this.#backedUpSince = performance.now();
    }
  }

  /** Start the closing handshake; the TCP connection ends when it completes, at the latest after a grace. */
  close(code = CLOSE_NORMAL): void {
    this.#ws.close(code);
  }

  /** End the TCP connection now: what waits to be sent is dropped, the peer sees the connection end. */
  abort(): void {
    this.#ws.terminate();
  }
}
