// A `denovm device TYPE ...` child process (main.ts) for tests and benchmarks: its stderr collected as it
// comes, its exit status, and a start that waits for the back end's "listening on" line.

const MAIN = new URL("../../main.ts", import.meta.url).pathname;

/** A `denovm device TYPE ...` process with its stderr collected. */
export class DeviceProcess {
  readonly #child: Deno.ChildProcess;
  stderr = "";
  readonly exited: Promise<Deno.CommandStatus>;
  #exitedNow = false;

  private constructor(child: Deno.ChildProcess) {
    this.#child = child;
    const dec = new TextDecoder();
    const pump = (async () => {
      for await (const c of child.stderr) this.stderr += dec.decode(c, { stream: true });
    })();
    this.exited = Promise.all([child.status, pump]).then(([s]) => {
      this.#exitedNow = true;
      return s;
    });
  }

  get pid(): number {
    return this.#child.pid;
  }

  /** stderr as lines (no trailing empty line). */
  get lines(): string[] {
    const t = this.stderr.trimEnd();
    return t === "" ? [] : t.split("\n");
  }

  /** Start `denovm device TYPE ARGS...`; the caller waits for it (exited, or its stderr). */
  static spawn(type: string, args: string[]): DeviceProcess {
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", MAIN, "device", type, ...args],
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    return new DeviceProcess(child);
  }

  /** Start `denovm device TYPE ARGS...` and wait (up to `timeoutMs`) for its "listening on" line. */
  static async start(type: string, args: string[], timeoutMs = 30_000): Promise<DeviceProcess> {
    const p = DeviceProcess.spawn(type, args);
    const end = Date.now() + timeoutMs;
    while (!p.stderr.includes("listening on") && !p.#exitedNow) {
      if (Date.now() > end) {
        p.kill("SIGKILL");
        throw new Error(`denovm device ${type} did not start listening: ${p.stderr}`);
      }
      await new Promise((r) => setTimeout(r, 10));
    }
    if (p.#exitedNow) throw new Error(`denovm device ${type} exited early: ${p.stderr}`);
    return p;
  }

  /** A `denovm device block` on `socket` serving `file`. */
  static block(socket: string, file: string): Promise<DeviceProcess> {
    return DeviceProcess.start("block", ["--socket-path", socket, "--file", file]);
  }

  kill(signal: Deno.Signal = "SIGTERM"): void {
    try {
      this.#child.kill(signal);
    } catch {
      // already gone
    }
  }

  /** SIGTERM and wait for the exit status. */
  async stop(): Promise<Deno.CommandStatus> {
    this.kill("SIGTERM");
    return await this.exited;
  }
}
