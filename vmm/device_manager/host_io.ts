// Where guest console ports meet the host: output sinks (stdout, file, sink,
// syslog, unix socket) and input sources (stdin in raw mode, an input file, a
// unix socket), shared by 8250 ports and virtio-console ports.

import type { SerialConfig } from "../config.ts";
import { ConfigError, HostError } from "../../core/exit.ts";

/** A serial option that is incomplete (a type that needs path= without one): exit 35. */
export class SerialConfigError extends ConfigError {
  constructor(message: string) {
    super(message);
    this.name = "SerialConfigError";
  }
}

/**
 * A serial port's host end that cannot be opened (a file that is not writable, a socket nobody listens on,
 * an input file that cannot be read): a host fault, exit 1 as crosvm exits, with the option named.
 */
export class SerialHostError extends HostError {
  constructor(message: string) {
    super(message);
    this.name = "SerialHostError";
  }
}

export interface HostIoOptions {
  /** Also hand console output here (the library's capture). */
  onConsoleOutput?: (bytes: Uint8Array) => void;
  /** Never read this process's stdin (library use). */
  noStdin?: boolean;
}

export class HostIo {
  readonly #closers: (() => void)[] = [];
  #stdinRaw = false;
  #closed = false;
  #stdinTaken = false;

  constructor(readonly serials: SerialConfig[], readonly opts: HostIoOptions) {}

  /** True when `s` is the VM's console (or COM1 when no port claims it). */
  #isConsole(s: SerialConfig): boolean {
    return s.console || (s.num === 1 && s.hardware === "serial" && !this.serials.some((x) => x.console));
  }

  /** The function that takes `s`'s output bytes. */
  async output(s: SerialConfig): Promise<(bytes: Uint8Array) => void> {
    const where = `--serial num=${s.num}`;
    let sink: (b: Uint8Array) => void = () => {};
    switch (s.type) {
      case "stdout":
        sink = (b) => Deno.stdout.writeSync(b);
        break;
      case "syslog":
        sink = (b) => Deno.stderr.writeSync(b);
        break;
      case "file": {
        if (!s.path) throw new SerialConfigError(`${where}: type=file needs path=`);
        try {
          const f = await Deno.open(s.path, { write: true, create: true, truncate: true });
          this.#closers.push(() => f.close());
          sink = (b) => f.writeSync(b);
        } catch (e) {
          throw new SerialHostError(`${where}: cannot open ${s.path}: ${(e as Error).message}`);
        }
        break;
      }
      case "unix":
      case "unix-stream": {
        if (!s.path) throw new SerialConfigError(`${where}: type=${s.type} needs path=`);
        try {
          const conn = await Deno.connect({ transport: "unix", path: s.path });
          this.#closers.push(() => conn.close());
          const writer = conn.writable.getWriter();
          sink = (b) => void writer.write(b.slice()).catch(() => {});
          this.#unixInput.set(s, conn.readable);
        } catch (e) {
          throw new SerialHostError(`${where}: cannot connect to ${s.path}: ${(e as Error).message}`);
        }
        break;
      }
      case "sink":
        break;
    }
    const capture = this.#isConsole(s) ? this.opts.onConsoleOutput : undefined;
    return capture ? (b) => (sink(b), capture(b)) : sink;
  }

  readonly #unixInput = new Map<SerialConfig, ReadableStream<Uint8Array>>();

  /** Feed `s`'s input (input= file, its unix socket, or stdin) to `deliver`. */
  async attachInput(s: SerialConfig, deliver: (bytes: Uint8Array) => void): Promise<void> {
    const unix = this.#unixInput.get(s);
    if (unix) return this.#pump(unix, deliver);
    if (s.input) {
      try {
        const f = await Deno.open(s.input, { read: true });
        this.#closers.push(() => f.close());
        return this.#pump(f.readable, deliver);
      } catch (e) {
        throw new SerialHostError(`--serial num=${s.num}: cannot read input ${s.input}: ${(e as Error).message}`);
      }
    }
    if (s.stdin && !this.opts.noStdin && !this.#stdinTaken) {
      this.#stdinTaken = true;
      if (Deno.stdin.isTerminal()) {
        Deno.stdin.setRaw(true);
        this.#stdinRaw = true;
      }
      this.#readStdin(deliver);
    }
  }

  #pump(stream: ReadableStream<Uint8Array>, deliver: (bytes: Uint8Array) => void): void {
    (async () => {
      for await (const chunk of stream) {
        if (this.#closed) break;
        deliver(chunk);
      }
    })().catch(() => {});
  }

  async #readStdin(deliver: (bytes: Uint8Array) => void): Promise<void> {
    const buf = new Uint8Array(4096);
    try {
      while (!this.#closed) {
        const n = await Deno.stdin.read(buf);
        if (n === null) break;
        deliver(buf.slice(0, n));
      }
    } catch {
      // stdin closed or unreadable: the guest gets no more input.
    }
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#stdinRaw) {
      try {
        Deno.stdin.setRaw(false);
      } catch {
        // stdin already gone
      }
    }
    for (const c of this.#closers.splice(0)) {
      try {
        c();
      } catch {
        // already closed
      }
    }
  }
}
