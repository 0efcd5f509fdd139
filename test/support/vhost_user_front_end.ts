// Test helpers for the vhost-user back end: a minimal front end that speaks the protocol over a real
// socket (devices/vhost_user/protocol.ts encodes the messages), and a `denovm device <type>` process
// (main.ts) with its stderr collected and its CPU time readable from /proc.

import assert from "node:assert/strict";
import {
  encodeMessage,
  readMessage,
  VHOST_USER_FLAG_NEED_REPLY,
  VHOST_USER_VERSION,
  type VhostUserMessage,
} from "../../devices/vhost_user/protocol.ts";
import { UnixStream } from "../../core/unix_socket.ts";

const MAIN = new URL("../../main.ts", import.meta.url).pathname;
/** A hang guard for waits on the back end (a broken back end fails the test instead of hanging it). */
export const HANG_GUARD_MS = 20_000;

/** The u64 payload of a reply. */
export function u64(msg: VhostUserMessage): bigint {
  return new DataView(msg.payload.buffer).getBigUint64(0, true);
}

/** Wait until `cond` holds, polling the event loop; fails after the hang guard. */
export async function until(cond: () => boolean, what: string): Promise<void> {
  const end = Date.now() + HANG_GUARD_MS;
  while (!cond()) {
    if (Date.now() > end) assert.fail(`gave up waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** A minimal vhost-user front end: sends requests, reads replies. */
export class FrontEnd {
  constructor(readonly sock: UnixStream) {}

  static connect(path: string): FrontEnd {
    return new FrontEnd(UnixStream.connect(path));
  }

  async send(request: number, payload?: Uint8Array, fds: number[] = [], flags = VHOST_USER_VERSION): Promise<void> {
    await this.sock.send(encodeMessage(request, flags, payload), fds);
  }

  /** A request that has its own reply. */
  async call(request: number, payload?: Uint8Array): Promise<VhostUserMessage> {
    await this.send(request, payload);
    const reply = await readMessage(this.sock, true);
    assert.equal(reply.request, request);
    return reply;
  }

  /** A request sent with NEED_REPLY: returns the u64 status (0 = success). */
  async ack(request: number, payload?: Uint8Array, fds: number[] = []): Promise<bigint> {
    await this.send(request, payload, fds, VHOST_USER_VERSION | VHOST_USER_FLAG_NEED_REPLY);
    const reply = await readMessage(this.sock, true);
    assert.equal(reply.request, request);
    return u64(reply);
  }

  close(): void {
    this.sock.close();
  }
}

/** proc(5) /proc/<pid>/stat: utime and stime are fields 14 and 15, counted in clock ticks. */
const STAT_UTIME_FIELD = 14;
const STAT_STIME_FIELD = 15;

/** CPU time (user + system, all threads) a process has used, in clock ticks; undefined once it is gone. */
export function cpuTicks(pid: number): number | undefined {
  let stat: string;
  try {
    stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
  } catch {
    return undefined;
  }
  // Field 2 (comm) is in parentheses and may hold spaces: count fields after its closing parenthesis.
  const rest = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  const field = (n: number) => Number(rest[n - 3]);
  return field(STAT_UTIME_FIELD) + field(STAT_STIME_FIELD);
}

/** Clock ticks per second (sysconf(_SC_CLK_TCK)), as `getconf CLK_TCK` reports it. */
export function clockTicksPerSecond(): number {
  const out = new Deno.Command("getconf", { args: ["CLK_TCK"], stdout: "piped" }).outputSync();
  const n = Number(new TextDecoder().decode(out.stdout).trim());
  return Number.isInteger(n) && n > 0 ? n : 100;
}

/** A `denovm device <type> ...` process (main.ts), with its stderr collected. */
export class DeviceProcess {
  readonly #child: Deno.ChildProcess;
  stderr = "";
  readonly exited: Promise<Deno.CommandStatus>;
  #done = false;

  private constructor(child: Deno.ChildProcess) {
    this.#child = child;
    const dec = new TextDecoder();
    const pump = (async () => {
      for await (const c of child.stderr) this.stderr += dec.decode(c, { stream: true });
    })();
    this.exited = Promise.all([child.status, pump]).then(([s]) => {
      this.#done = true;
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

  /** Start `denovm device <args...>`; the caller waits for it (ready() or exited). */
  static spawn(args: string[]): DeviceProcess {
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", MAIN, "device", ...args],
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    return new DeviceProcess(child);
  }

  /** Start `denovm device <args...>` and wait for its listening line. */
  static async start(args: string[]): Promise<DeviceProcess> {
    const p = DeviceProcess.spawn(args);
    await until(() => p.stderr.includes("listening on") || p.#done, `denovm device ${args[0]} to listen`);
    assert.ok(!p.#done, `the back end exited early: ${p.stderr}`);
    return p;
  }

  /** A `denovm device block` on `socket` serving `file`. */
  static block(socket: string, file: string): Promise<DeviceProcess> {
    return DeviceProcess.start(["block", "--socket-path", socket, "--file", file]);
  }

  kill(signal: Deno.Signal): void {
    try {
      this.#child.kill(signal);
    } catch {
      // already gone
    }
  }
}
