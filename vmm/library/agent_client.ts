// Host side of the denovm guest agent (agent/agent.c; protocol in agent/README.md): framed
// requests over any byte transport (a virtio-console named port, a vsock connection, a pipe),
// concurrent requests matched by id, host-side timeouts that also kill the command in the guest.

/** Protocol version this client speaks (README.md, "hello"). */
export const AGENT_PROTOCOL_VERSION = 1;
/** The virtio-console port name the agent opens by default. */
export const AGENT_PORT_NAME = "org.denovm.agent";
/** Every frame starts with "dvma" (README.md, "Frames"). */
export const FRAME_MAGIC = new Uint8Array([0x64, 0x76, 0x6d, 0x61]);
/** magic (4) + header length (u32 LE) + payload length (u32 LE). */
export const FRAME_PREFIX = 12;
const OFF_HEADER_LEN = 4;
const OFF_PAYLOAD_LEN = 8;
/** Largest header either side sends or accepts. */
export const MAX_HEADER = 64 * 1024;
/** Largest payload the agent sends: stdout and stderr, each at most 16 MiB. */
export const MAX_OUTPUT = 16 * 1024 * 1024;
export const MAX_RESPONSE_PAYLOAD = 2 * MAX_OUTPUT;
/** Largest stdin the agent accepts in one request. */
export const MAX_STDIN = 16 * 1024 * 1024;

const DEFAULT_EXEC_TIMEOUT_MS = 60_000;
const DEFAULT_READY_TIMEOUT_MS = 30_000;
/** ready() repeats its ping this often (the first may be sent before the guest opened the port). */
const PING_INTERVAL_MS = 250;

/** A byte stream to the agent. */
export interface AgentTransport {
  write(bytes: Uint8Array): void;
  onData(cb: (bytes: Uint8Array) => void): void;
}

export interface ExecOptions {
  /** Milliseconds before the request is rejected and the command killed in the guest (default 60 s). */
  timeout?: number;
  /** Bytes for the command's stdin (closed after them; empty stdin when absent). */
  stdin?: string | Uint8Array;
  /** Working directory in the guest. */
  cwd?: string;
  /** Abort the request (the command is killed in the guest). */
  signal?: AbortSignal;
}

export interface ExecResult {
  /** Exit status; 128 + signal number when the command was killed by a signal. */
  code: number;
  stdout: string;
  stderr: string;
  /** The terminating signal, when there was one. */
  signal?: number;
  /** Output beyond 16 MiB per stream was dropped in the guest. */
  stdoutTruncated: boolean;
  stderrTruncated: boolean;
}

/** The same result with the raw output bytes. */
export interface ExecBytesResult extends Omit<ExecResult, "stdout" | "stderr"> {
  stdout: Uint8Array;
  stderr: Uint8Array;
}

/** An exec or ready() that did not finish in time. */
export class AgentTimeoutError extends Error {
  override name = "AgentTimeoutError";
  constructor(readonly command: string, readonly timeoutMs: number, message: string) {
    super(message);
  }
}

/** The agent answered a request with an error frame. */
export class AgentError extends Error {
  override name = "AgentError";
}

/** A decoded frame. */
export interface AgentFrame {
  header: Record<string, unknown>;
  payload: Uint8Array;
}

/** Encode one frame: magic, lengths, JSON header, payload. */
export function encodeFrame(header: Record<string, unknown>, payload: Uint8Array = new Uint8Array(0)): Uint8Array {
  const h = new TextEncoder().encode(JSON.stringify(header));
  if (h.length > MAX_HEADER) throw new RangeError(`agent frame header of ${h.length} bytes exceeds ${MAX_HEADER}`);
  const out = new Uint8Array(FRAME_PREFIX + h.length + payload.length);
  const v = new DataView(out.buffer);
  out.set(FRAME_MAGIC, 0);
  v.setUint32(OFF_HEADER_LEN, h.length, true);
  v.setUint32(OFF_PAYLOAD_LEN, payload.length, true);
  out.set(h, FRAME_PREFIX);
  out.set(payload, FRAME_PREFIX + h.length);
  return out;
}

/**
 * Incremental frame decoder. Bytes that are not a frame are skipped up to the next magic and
 * reported through `onJunk` (one call per skipped run), never thrown.
 */
export class FrameDecoder {
  /** Received bytes not parsed yet, joined only once `#need` bytes are there (a large frame is copied once). */
  #chunks: Uint8Array[] = [];
  #len = 0;
  #need = 1;
  constructor(
    private readonly onFrame: (f: AgentFrame) => void,
    private readonly onJunk: (why: string) => void,
  ) {}

  push(bytes: Uint8Array): void {
    if (bytes.length === 0) return;
    this.#chunks.push(bytes.slice());
    this.#len += bytes.length;
    if (this.#len < this.#need) return;
    let b = this.#chunks.length === 1 ? this.#chunks[0] : new Uint8Array(this.#len);
    if (this.#chunks.length > 1) {
      let o = 0;
      for (const c of this.#chunks) {
        b.set(c, o);
        o += c.length;
      }
    }
    this.#need = FRAME_PREFIX;
    for (;;) {
      const skip = findMagic(b);
      if (skip > 0) {
        this.onJunk(`skipped ${skip} bytes before a frame magic`);
        b = b.subarray(skip);
      }
      if (b.length < FRAME_PREFIX) break;
      const v = new DataView(b.buffer, b.byteOffset, b.length);
      const hlen = v.getUint32(OFF_HEADER_LEN, true);
      const plen = v.getUint32(OFF_PAYLOAD_LEN, true);
      if (hlen === 0 || hlen > MAX_HEADER || plen > MAX_RESPONSE_PAYLOAD) {
        this.onJunk(`frame lengths out of range (header ${hlen}, payload ${plen})`);
        b = b.subarray(FRAME_MAGIC.length);
        continue;
      }
      const total = FRAME_PREFIX + hlen + plen;
      if (b.length < total) {
        this.#need = total;
        break;
      }
      let header: unknown;
      try {
        header = JSON.parse(
          new TextDecoder("utf-8", { fatal: true }).decode(b.subarray(FRAME_PREFIX, FRAME_PREFIX + hlen)),
        );
      } catch (e) {
        header = undefined;
        this.onJunk(`frame header is not JSON: ${(e as Error).message}`);
      }
      const payload = b.slice(FRAME_PREFIX + hlen, total);
      b = b.subarray(total);
      if (header && typeof header === "object" && !Array.isArray(header)) {
        this.onFrame({ header: header as Record<string, unknown>, payload });
      } else if (header !== undefined) {
        this.onJunk("frame header is not a JSON object");
      }
    }
    this.#chunks = b.length ? [b.slice()] : [];
    this.#len = b.length;
  }
}

/** Offset of the first possible frame start: a whole magic, or a magic prefix at the very end. */
function findMagic(b: Uint8Array): number {
  outer: for (let i = 0; i < b.length; i++) {
    for (let k = 0; k < FRAME_MAGIC.length && i + k < b.length; k++) {
      if (b[i + k] !== FRAME_MAGIC[k]) continue outer;
    }
    return i;
  }
  return b.length;
}

interface Pending {
  what: string;
  resolve: (f: AgentFrame) => void;
  reject: (e: Error) => void;
}

/** How a command is named in errors: the shell string or the argv, quoted. */
function describe(cmd: string | string[]): string {
  return JSON.stringify(cmd);
}

export interface AgentClientOptions {
  /**
   * Largest frame the transport takes in one write without dropping bytes (a ConsoleDevice port
   * buffers at most its inputLimit, 1 MiB by default). An exec whose frame would be larger is
   * refused with an error instead of corrupting the stream. Default: no limit.
   */
  maxWrite?: number;
}

/** Talks to one denovm-agent over `transport`. */
export class AgentClient {
  readonly #transport: AgentTransport;
  readonly #maxWrite: number;
  readonly #pending = new Map<number, Pending>();
  readonly #errorListeners: ((message: string) => void)[] = [];
  readonly #helloWaiters = new Set<() => void>();
  #nextId = 1;
  #hello: Record<string, unknown> | undefined;
  #closed: Error | undefined;

  constructor(transport: AgentTransport, opts: AgentClientOptions = {}) {
    this.#transport = transport;
    this.#maxWrite = opts.maxWrite ?? Infinity;
    const decoder = new FrameDecoder((f) => this.#frame(f), (why) => this.#emitError(`from the agent: ${why}`));
    transport.onData((b) => decoder.push(b));
  }

  /** The agent's last hello header (version, pid), once one arrived. */
  get hello(): Record<string, unknown> | undefined {
    return this.#hello;
  }

  /**
   * Error frames that answer no pending request (e.g. the agent's reply to a malformed frame),
   * and undecodable bytes from the agent.
   */
  onError(cb: (message: string) => void): void {
    this.#errorListeners.push(cb);
  }

  /** Resolves once the agent has said hello (it does at start and on each ping). */
  ready(opts: { timeout?: number; signal?: AbortSignal } = {}): Promise<void> {
    const timeout = opts.timeout ?? DEFAULT_READY_TIMEOUT_MS;
    if (this.#closed) return Promise.reject(this.#closed);
    if (this.#hello) return Promise.resolve();
    return new Promise<void>((resolve, reject) => {
      const done = (err?: Error) => {
        clearInterval(interval);
        clearTimeout(timer);
        this.#helloWaiters.delete(onHello);
        opts.signal?.removeEventListener("abort", onAbort);
        if (err) reject(err);
        else resolve();
      };
      const onHello = () => done();
      const onAbort = () => done(new Error("waiting for the guest agent was aborted"));
      const ping = () => this.#send({ op: "ping" });
      this.#helloWaiters.add(onHello);
      const interval = setInterval(ping, PING_INTERVAL_MS);
      const timer = setTimeout(
        () =>
          done(
            new AgentTimeoutError(
              "ready",
              timeout,
              `guest agent not ready after ${timeout} ms: no hello on the port (is denovm-agent running in the guest?)`,
            ),
          ),
        timeout,
      );
      opts.signal?.addEventListener("abort", onAbort);
      ping();
    });
  }

  /** Run a command in the guest: a string goes to /bin/sh -c, an array is an argv (PATH searched). */
  async exec(cmd: string | string[], opts: ExecOptions = {}): Promise<ExecResult> {
    const r = await this.execBytes(cmd, opts);
    const dec = new TextDecoder();
    return { ...r, stdout: dec.decode(r.stdout), stderr: dec.decode(r.stderr) };
  }

  /** exec() with the output as bytes. */
  async execBytes(cmd: string | string[], opts: ExecOptions = {}): Promise<ExecBytesResult> {
    const timeout = opts.timeout ?? DEFAULT_EXEC_TIMEOUT_MS;
    const stdin = typeof opts.stdin === "string" ? new TextEncoder().encode(opts.stdin) : opts.stdin;
    if (stdin && stdin.length > MAX_STDIN) {
      throw new RangeError(`exec ${describe(cmd)}: stdin of ${stdin.length} bytes exceeds ${MAX_STDIN}`);
    }
    if (Array.isArray(cmd) && cmd.length === 0) throw new TypeError("exec: empty argv");
    const id = this.#nextId++;
    const header: Record<string, unknown> = { id, op: "exec", timeout_ms: timeout };
    if (typeof cmd === "string") header.sh = cmd;
    else header.argv = cmd;
    if (opts.cwd !== undefined) header.cwd = opts.cwd;
    const size = encodeFrame(header).length + (stdin?.length ?? 0);
    if (size > this.#maxWrite) {
      throw new RangeError(
        `exec ${describe(cmd)}: request of ${size} bytes exceeds what the transport takes at once (${this.#maxWrite})`,
      );
    }
    const frame = await this.#request(id, header, stdin, timeout, describe(cmd), opts.signal);
    const h = frame.header;
    if (h.op !== "exit") throw new AgentError(`exec ${describe(cmd)}: unexpected reply op ${JSON.stringify(h.op)}`);
    // The agent's own timer (it got timeout_ms too) may fire before ours when the host is busy.
    if (h.timed_out === true) {
      throw new AgentTimeoutError(describe(cmd), timeout, `exec ${describe(cmd)} timed out after ${timeout} ms`);
    }
    const outLen = Number(h.stdout_len ?? 0);
    const errLen = Number(h.stderr_len ?? 0);
    if (!Number.isInteger(outLen) || !Number.isInteger(errLen) || outLen + errLen !== frame.payload.length) {
      throw new AgentError(
        `exec ${describe(cmd)}: reply lengths ${outLen}+${errLen} do not match its payload of ${frame.payload.length}`,
      );
    }
    return {
      code: Number(h.code),
      stdout: frame.payload.subarray(0, outLen),
      stderr: frame.payload.subarray(outLen, outLen + errLen),
      ...(typeof h.signal === "number" ? { signal: h.signal } : {}),
      stdoutTruncated: h.stdout_truncated === true,
      stderrTruncated: h.stderr_truncated === true,
    };
  }

  /** Reject everything pending; later calls fail. */
  close(reason = "agent client closed"): void {
    this.#closed ??= new Error(reason);
    for (const [id, p] of this.#pending) {
      this.#pending.delete(id);
      p.reject(this.#closed);
    }
  }

  #request(
    id: number,
    header: Record<string, unknown>,
    payload: Uint8Array | undefined,
    timeout: number,
    what: string,
    signal?: AbortSignal,
  ): Promise<AgentFrame> {
    if (this.#closed) return Promise.reject(this.#closed);
    if (signal?.aborted) return Promise.reject(new Error(`exec ${what} aborted`));
    return new Promise<AgentFrame>((resolve, reject) => {
      const finish = () => {
        clearTimeout(timer);
        signal?.removeEventListener("abort", onAbort);
        this.#pending.delete(id);
      };
      const giveUp = (err: Error) => {
        finish();
        // The command may still be running in the guest: stop it there too.
        this.#send({ op: "kill", id });
        reject(err);
      };
      const onAbort = () => giveUp(new Error(`exec ${what} aborted`));
      const timer = setTimeout(
        () => giveUp(new AgentTimeoutError(what, timeout, `exec ${what} timed out after ${timeout} ms`)),
        timeout,
      );
      signal?.addEventListener("abort", onAbort);
      this.#pending.set(id, {
        what,
        resolve: (f) => {
          finish();
          resolve(f);
        },
        reject: (e) => {
          finish();
          reject(e);
        },
      });
      this.#send(header, payload);
    });
  }

  #send(header: Record<string, unknown>, payload?: Uint8Array): void {
    this.#transport.write(encodeFrame(header, payload));
  }

  #frame(f: AgentFrame): void {
    const h = f.header;
    if (h.op === "hello") {
      this.#hello = h;
      for (const w of [...this.#helloWaiters]) w();
      return;
    }
    const id = typeof h.id === "number" ? h.id : undefined;
    const p = id === undefined ? undefined : this.#pending.get(id);
    if (h.op === "error") {
      const message = typeof h.message === "string" ? h.message : JSON.stringify(h);
      if (p) p.reject(new AgentError(`exec ${p.what}: guest agent: ${message}`));
      else this.#emitError(message);
      return;
    }
    // A reply for a request that already timed out is expected (the kill's exit): dropped.
    if (p) p.resolve(f);
  }

  #emitError(message: string): void {
    for (const cb of this.#errorListeners) cb(message);
  }
}

/**
 * An AgentTransport over a stream connection (a Unix socket to a vsock device's uds_path after its
 * `CONNECT <port>` handshake, a TCP socket, ...). Writes are queued in order; `initial` holds bytes
 * already read past a handshake. `closed` resolves when the peer closes or close() is called.
 */
export function connTransport(
  conn: Deno.Conn,
  initial?: Uint8Array,
): AgentTransport & { close(): void; closed: Promise<void> } {
  const listeners: ((b: Uint8Array) => void)[] = [];
  const early: Uint8Array[] = initial?.length ? [initial.slice()] : [];
  let queue = Promise.resolve();
  let open = true;
  const closed = (async () => {
    const buf = new Uint8Array(64 * 1024);
    try {
      for (;;) {
        const n = await conn.read(buf);
        if (n === null) break;
        const chunk = buf.slice(0, n);
        if (listeners.length === 0) early.push(chunk);
        for (const l of listeners) l(chunk);
      }
    } catch {
      // closed locally or reset: the reader ends
    }
  })();
  return {
    write(bytes: Uint8Array) {
      const copy = bytes.slice();
      queue = queue.then(async () => {
        for (let o = 0; open && o < copy.length;) o += await conn.write(copy.subarray(o));
      }).catch(() => {});
    },
    onData(cb: (bytes: Uint8Array) => void) {
      listeners.push(cb);
      for (const c of early.splice(0)) cb(c);
    },
    close() {
      if (!open) return;
      open = false;
      try {
        conn.close();
      } catch {
        // already closed
      }
    },
    closed,
  };
}
