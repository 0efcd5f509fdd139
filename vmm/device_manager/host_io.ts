// Where guest console ports meet the host: output sinks (stdout, file, sink,
// syslog, unix socket) and input sources (stdin in raw mode, an input file, a
// unix socket), shared by 8250 ports and virtio-console ports.

import type { SerialConfig } from "../config.ts";
import { ConfigError, HostError } from "../../core/exit.ts";
import { checkOpenedOutput, type NamedFile, serialName } from "../vm_files.ts";

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
  /**
   * The VM's input files by identity (vmm/validate.ts prepareBoot): an output file, once opened, is checked
   * against them again before it is truncated, in case its path now names one of them.
   */
  inputs?: ReadonlyMap<string, NamedFile>;
  /**
   * Called once when stdout's reader has gone (a write failed with EPIPE, as in `denovm run | head`):
   * `run` stops the VM. Output to stdout is dropped from then on, without a message.
   */
  onStdoutClosed?: () => void;
  /** One-line messages: an output that failed (defaults to stderr). */
  log?: (line: string) => void;
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

  /** The function that takes `s`'s output bytes. A write that fails is one log line, not an exception. */
  async output(s: SerialConfig): Promise<(bytes: Uint8Array) => void> {
    const where = serialName(s);
    let sink: (b: Uint8Array) => void = () => {};
    switch (s.type) {
      case "stdout":
        sink = (b) => this.#toStdout(b);
        break;
      case "syslog":
        // stderr is where failures would be reported: one that fails drops the output silently.
        sink = (b) => {
          try {
            writeAll(Deno.stderr, b);
          } catch {
            // stderr gone
          }
        };
        break;
      case "file": {
        if (!s.path) throw new SerialConfigError(`${where}: type=file needs path=`);
        const f = await this.#openOutput(where, s.path);
        sink = this.#failOnce(where, s.path, (b) => writeAll(f, b));
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

  /**
   * Opens an output file without truncating it, checks on the opened file that it is none of the VM's
   * inputs (the path may have changed since prepareBoot looked), and only then empties a regular file.
   */
  async #openOutput(where: string, path: string): Promise<Deno.FsFile> {
    let f: Deno.FsFile;
    try {
      f = await Deno.open(path, { write: true, create: true });
    } catch (e) {
      throw new SerialHostError(`${where}: cannot open ${path}: ${(e as Error).message}`);
    }
    try {
      const info = f.statSync();
      if (this.opts.inputs) checkOpenedOutput(`${where} path=${path}`, info, this.opts.inputs);
      if (info.isFile) f.truncateSync(0);
    } catch (e) {
      f.close();
      if (e instanceof ConfigError) throw e;
      throw new SerialHostError(`${where}: cannot open ${path}: ${(e as Error).message}`);
    }
    this.#closers.push(() => f.close());
    return f;
  }

  /** `write`, until it first fails: then one log line, and the port's later output is dropped. */
  #failOnce(where: string, path: string, write: (b: Uint8Array) => void): (b: Uint8Array) => void {
    let failed = false;
    return (b) => {
      if (failed) return;
      try {
        write(b);
      } catch (e) {
        failed = true;
        const why = (e instanceof Error ? e.message : String(e)).split("\n")[0];
        this.#log(`${where}: cannot write to ${path}: ${why}; its further output is dropped`);
      }
    };
  }

  #stdoutGone = false;

  /**
   * Console output to stdout. When stdout's reader has gone (EPIPE) the run ends quietly, as a command-line
   * tool's does; any other failure is one log line. Either way stdout gets nothing more.
   */
  #toStdout(b: Uint8Array): void {
    if (this.#stdoutGone) return;
    try {
      writeAll(Deno.stdout, b);
    } catch (e) {
      this.#stdoutGone = true;
      if (e instanceof Deno.errors.BrokenPipe) {
        this.opts.onStdoutClosed?.();
        return;
      }
      const why = (e instanceof Error ? e.message : String(e)).split("\n")[0];
      this.#log(`cannot write the console to stdout: ${why}; its further output is dropped`);
    }
  }

  #log(line: string): void {
    if (this.opts.log) this.opts.log(line);
    else {
      try {
        console.error(`denovm: ${line}`);
      } catch {
        // stderr gone
      }
    }
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
        throw new SerialHostError(`${serialName(s)}: cannot read input ${s.input}: ${(e as Error).message}`);
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

/** Writes all of `b` (a write may take part of it). */
function writeAll(w: { writeSync(p: Uint8Array): number }, b: Uint8Array): void {
  for (let off = 0; off < b.length;) {
    const n = w.writeSync(b.subarray(off));
    if (n <= 0) throw new Error(`write returned ${n}`);
    off += n;
  }
}
