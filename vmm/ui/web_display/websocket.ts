// The server end of one WebSocket (RFC 6455) on a TCP connection the web display owns. The display keeps
// the socket itself, rather than Deno's WebSocket, so that it can see and bound what waits to be sent and
// end a connection whose peer stops reading: closing the TCP connection interrupts a write that waits on
// the peer, where a WebSocket close frame would wait behind it.
//
// What is sent waits in a queue written in order; bufferedAmount is what of it the kernel has not taken.
// The owner sends only while that stays low and asks backedUpMs() how long it has not.

/** RFC 6455 section 1.3: the GUID appended to Sec-WebSocket-Key for Sec-WebSocket-Accept. */
const WS_ACCEPT_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/** RFC 6455 section 4.1: the key is 16 random bytes, base64. */
const WS_KEY_BYTES = 16;
/** RFC 6455 section 4.1: the only version this protocol defines. */
export const WS_VERSION = "13";

// RFC 6455 section 5.2, the frame header.
const FIN = 0x80;
const RSV_BITS = 0x70;
const OPCODE_MASK = 0x0f;
const MASK_BIT = 0x80;
const LEN7_MASK = 0x7f;
/** A 7-bit length of 126: a u16 length follows; 127: a u64 length follows. */
const LEN_U16 = 126;
const LEN_U64 = 127;
const MASKING_KEY_BYTES = 4;
/** RFC 6455 section 5.5: control frames carry at most 125 bytes and are not fragmented. */
const MAX_CONTROL_PAYLOAD = 125;

// RFC 6455 section 5.2 / 11.8, opcodes.
const OP_CONTINUATION = 0x0;
const OP_TEXT = 0x1;
const OP_BINARY = 0x2;
const OP_CLOSE = 0x8;
const OP_PING = 0x9;
const OP_PONG = 0xa;

// RFC 6455 section 7.4.1, close codes.
export const CLOSE_NORMAL = 1000;
export const CLOSE_GOING_AWAY = 1001;
const CLOSE_PROTOCOL_ERROR = 1002;
const CLOSE_INVALID_DATA = 1007;
const CLOSE_TOO_BIG = 1009;
/** Section 7.4.1: 1005 means "no code was given"; it is never sent. */
const CLOSE_NO_CODE = 1005;

/** How long a closing connection waits for its close frame to go out and the peer's to come back. */
const CLOSE_GRACE_MS = 1000;
const READ_CHUNK = 64 * 1024;

const enc = new TextEncoder();
const utf8 = new TextDecoder("utf-8", { fatal: true });

/**
 * Give `view`'s memory back now rather than at the next full garbage collection: its ArrayBuffer is detached
 * (transferred to an empty one). Only for buffers nothing else will read. A page's shadow frame and queued
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

/** Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 section 4.2.2), or null when the key is malformed. */
export async function acceptKey(key: string | null): Promise<string | null> {
  if (key === null) return null;
  let raw: string;
  try {
    raw = atob(key.trim());
  } catch {
    return null;
  }
  if (raw.length !== WS_KEY_BYTES) return null;
  const digest = await crypto.subtle.digest("SHA-1", enc.encode(key.trim() + WS_ACCEPT_GUID));
  return btoa(String.fromCharCode(...new Uint8Array(digest)));
}

/** An unmasked frame header (server to client, RFC 6455 section 5.1) for `length` payload bytes. */
function frameHeader(opcode: number, length: number): Uint8Array {
  if (length < LEN_U16) return Uint8Array.of(FIN | opcode, length);
  if (length <= 0xffff) return Uint8Array.of(FIN | opcode, LEN_U16, length >> 8, length & 0xff);
  const h = new Uint8Array(10);
  h[0] = FIN | opcode;
  h[1] = LEN_U64;
  new DataView(h.buffer).setBigUint64(2, BigInt(length));
  return h;
}

export interface WsConnectionOptions {
  /** Bytes the peer may send in one message (all its fragments); a larger one closes the connection. */
  maxMessageBytes: number;
  /** bufferedAmount above this counts as backed up (backedUpMs); dropping back to it calls onDrain. */
  lowWaterBytes: number;
  onMessage: (text: string) => void;
  /** Called once, when the connection has ended for whatever reason. */
  onClose: () => void;
  /** The send buffer went back to lowWaterBytes or below. */
  onDrain: () => void;
}

export class WsConnection {
  readonly #conn: Deno.Conn;
  readonly #o: WsConnectionOptions;
  readonly #queue: Uint8Array[] = [];
  #buffered = 0;
  #writing = false;
  #state: "open" | "closing" | "closed" = "open";
  /** Close the TCP connection as soon as the queue has been written (a close frame is in it). */
  #endAfterFlush = false;
  /** When bufferedAmount last went above lowWaterBytes, while it is. */
  #backedUpSince: number | undefined;
  #graceTimer: ReturnType<typeof setTimeout> | undefined;
  #fragments: Uint8Array[] = [];
  #fragmentOpcode = -1;
  #fragmentBytes = 0;
  readonly closed: Promise<void>;
  #resolveClosed: () => void = () => {};

  constructor(conn: Deno.Conn, opts: WsConnectionOptions) {
    this.#conn = conn;
    this.#o = opts;
    this.closed = new Promise((r) => this.#resolveClosed = r);
  }

  /** Start reading the peer's frames; `leftover`: bytes read past the HTTP request head, the first of them. */
  start(leftover: Uint8Array): void {
    void this.#readLoop(leftover);
  }

  get open(): boolean {
    return this.#state === "open";
  }

  /** Whether the TCP connection has ended (a method, so that checks after an await or a callback re-read it). */
  #ended(): boolean {
    return this.#state === "closed";
  }

  /** Bytes queued and not yet taken by the kernel. */
  get bufferedAmount(): number {
    return this.#buffered;
  }

  /** How long bufferedAmount has stayed above lowWaterBytes (0 when it is not above). */
  backedUpMs(now = performance.now()): number {
    return this.#backedUpSince === undefined ? 0 : now - this.#backedUpSince;
  }

  /**
   * Queue a text (string) or binary message; nothing happens once the connection is closing. The connection
   * owns a binary message's buffer from here on (it is released when the connection ends unsent).
   */
  send(data: string | Uint8Array): void {
    if (this.#state !== "open") return;
    const payload = typeof data === "string" ? enc.encode(data) : data;
    this.#enqueue(typeof data === "string" ? OP_TEXT : OP_BINARY, payload);
  }

  /** Start the closing handshake: a close frame, then the TCP connection ends (at the latest after a grace). */
  close(code = CLOSE_NORMAL, reason = ""): void {
    if (this.#state !== "open") return;
    this.#sendClose(code, reason);
  }

  /** End the TCP connection now: pending writes are dropped, the peer sees the connection end. */
  abort(): void {
    if (this.#state === "closed") return;
    this.#state = "closed";
    if (this.#graceTimer !== undefined) clearTimeout(this.#graceTimer);
    this.#graceTimer = undefined;
    // The head of the queue may be in a write still: the pump releases it when that write has ended.
    for (const chunk of this.#queue.slice(this.#writing ? 1 : 0)) releaseBuffer(chunk);
    this.#queue.length = this.#writing ? Math.min(1, this.#queue.length) : 0;
    this.#buffered = 0;
    this.#backedUpSince = undefined;
    this.#fragments = [];
    try {
      this.#conn.close();
    } catch { /* already closed */ }
    this.#resolveClosed();
    this.#o.onClose();
  }

  #sendClose(code: number, reason: string): void {
    const r = enc.encode(reason).subarray(0, MAX_CONTROL_PAYLOAD - 2);
    const payload = new Uint8Array(code === CLOSE_NO_CODE ? 0 : 2 + r.length);
    if (payload.length > 0) {
      new DataView(payload.buffer).setUint16(0, code);
      payload.set(r, 2);
    }
    this.#state = "closing";
    this.#endAfterFlush = true;
    this.#graceTimer = setTimeout(() => this.abort(), CLOSE_GRACE_MS);
    this.#enqueue(OP_CLOSE, payload);
  }

  #enqueue(opcode: number, payload: Uint8Array): void {
    const header = frameHeader(opcode, payload.length);
    // Small messages go as one write; large ones are not copied.
    if (payload.length <= READ_CHUNK) {
      const frame = new Uint8Array(header.length + payload.length);
      frame.set(header);
      frame.set(payload, header.length);
      this.#queue.push(frame);
    } else {
      this.#queue.push(header, payload);
    }
    this.#buffered += header.length + payload.length;
    if (this.#buffered > this.#o.lowWaterBytes && this.#backedUpSince === undefined) {
      this.#backedUpSince = performance.now();
    }
    if (!this.#writing) void this.#pump();
  }

  async #pump(): Promise<void> {
    this.#writing = true;
    try {
      while (this.#queue.length > 0 && !this.#ended()) {
        let chunk = this.#queue[0];
        while (chunk.length > 0 && !this.#ended()) {
          const n = await this.#conn.write(chunk);
          chunk = chunk.subarray(n);
          if (this.#ended()) break;
          this.#buffered -= n;
          if (this.#backedUpSince !== undefined && this.#buffered <= this.#o.lowWaterBytes) {
            this.#backedUpSince = undefined;
            this.#o.onDrain();
          }
        }
        releaseBuffer(this.#queue.shift()!);
      }
    } catch {
      this.#writing = false;
      this.abort();
      if (this.#queue.length > 0) releaseBuffer(this.#queue.shift()!);
      return;
    } finally {
      this.#writing = false;
    }
    if (this.#endAfterFlush) this.abort();
  }

  async #readLoop(leftover: Uint8Array): Promise<void> {
    let buf = leftover;
    const chunk = new Uint8Array(READ_CHUNK);
    while (this.#state !== "closed") {
      const used = this.#parse(buf);
      if (used < 0) return;
      buf = buf.subarray(used);
      let n: number | null;
      try {
        n = await this.#conn.read(chunk);
      } catch {
        n = null;
      }
      if (n === null) {
        this.abort();
        return;
      }
      const next = new Uint8Array(buf.length + n);
      next.set(buf);
      next.set(chunk.subarray(0, n), buf.length);
      buf = next;
    }
  }

  /** Handle every whole frame at the start of `b`; the bytes used, or -1 when the connection ended. */
  #parse(b: Uint8Array): number {
    let off = 0;
    while (this.#state !== "closed") {
      if (b.length - off < 2) return off;
      const b0 = b[off], b1 = b[off + 1];
      const opcode = b0 & OPCODE_MASK;
      const fin = (b0 & FIN) !== 0;
      // A client's frames are masked and use no extension (none was negotiated): section 5.1, 5.2.
      if ((b0 & RSV_BITS) !== 0 || (b1 & MASK_BIT) === 0) return this.#fail(CLOSE_PROTOCOL_ERROR, "bad frame");
      let len = b1 & LEN7_MASK;
      let p = off + 2;
      if (len === LEN_U16) {
        if (b.length - p < 2) return off;
        len = (b[p] << 8) | b[p + 1];
        p += 2;
      } else if (len === LEN_U64) {
        if (b.length - p < 8) return off;
        const big = new DataView(b.buffer, b.byteOffset + p, 8).getBigUint64(0);
        if (big > BigInt(this.#o.maxMessageBytes)) return this.#fail(CLOSE_TOO_BIG, "message too big");
        len = Number(big);
        p += 8;
      }
      const control = opcode >= OP_CLOSE;
      if (control && (!fin || len > MAX_CONTROL_PAYLOAD)) return this.#fail(CLOSE_PROTOCOL_ERROR, "bad control frame");
      if (!control && this.#fragmentBytes + len > this.#o.maxMessageBytes) {
        return this.#fail(CLOSE_TOO_BIG, "message too big");
      }
      if (b.length - p < MASKING_KEY_BYTES + len) return off;
      const mask = b.subarray(p, p + MASKING_KEY_BYTES);
      p += MASKING_KEY_BYTES;
      const payload = b.slice(p, p + len);
      for (let i = 0; i < payload.length; i++) payload[i] ^= mask[i & 3];
      off = p + len;
      if (!this.#frame(opcode, fin, payload)) return -1;
    }
    return -1;
  }

  /** One whole frame; false when the connection ended. */
  #frame(opcode: number, fin: boolean, payload: Uint8Array): boolean {
    switch (opcode) {
      case OP_PING:
        // Section 5.5.3 lets a pong answer only the latest ping: none while the peer is not reading.
        if (this.#state === "open" && this.#buffered <= this.#o.lowWaterBytes) this.#enqueue(OP_PONG, payload);
        return true;
      case OP_PONG:
        return true;
      case OP_CLOSE: {
        if (this.#state === "open") {
          const code = payload.length >= 2 ? new DataView(payload.buffer).getUint16(0) : CLOSE_NO_CODE;
          this.#sendClose(code, "");
          return true;
        }
        this.abort();
        return false;
      }
      case OP_TEXT:
      case OP_BINARY:
        if (this.#fragmentOpcode >= 0) return this.#fail(CLOSE_PROTOCOL_ERROR, "unfinished message") >= 0;
        if (fin) return this.#message(opcode, payload);
        this.#fragmentOpcode = opcode;
        this.#fragments = [payload];
        this.#fragmentBytes = payload.length;
        return true;
      case OP_CONTINUATION: {
        if (this.#fragmentOpcode < 0) return this.#fail(CLOSE_PROTOCOL_ERROR, "stray continuation") >= 0;
        this.#fragments.push(payload);
        this.#fragmentBytes += payload.length;
        if (!fin) return true;
        const whole = new Uint8Array(this.#fragmentBytes);
        let o = 0;
        for (const f of this.#fragments) {
          whole.set(f, o);
          o += f.length;
        }
        const op = this.#fragmentOpcode;
        this.#fragments = [];
        this.#fragmentOpcode = -1;
        this.#fragmentBytes = 0;
        return this.#message(op, whole);
      }
      default:
        return this.#fail(CLOSE_PROTOCOL_ERROR, "unknown opcode") >= 0;
    }
  }

  #message(opcode: number, payload: Uint8Array): boolean {
    // The page sends only text (JSON); binary messages are ignored.
    if (opcode !== OP_TEXT || this.#state !== "open") return true;
    let text: string;
    try {
      text = utf8.decode(payload);
    } catch {
      return this.#fail(CLOSE_INVALID_DATA, "invalid UTF-8") >= 0;
    }
    this.#o.onMessage(text);
    return !this.#ended();
  }

  /** The peer broke the protocol: close with `code` (section 7.1.7), read nothing more. Returns -1. */
  #fail(code: number, reason: string): number {
    if (this.#state === "open") {
      this.#sendClose(code, reason);
    } else {
      this.abort();
    }
    return -1;
  }
}
