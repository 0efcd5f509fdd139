// `denovm device <type>` back ends against a hostile front end's memory table, over the real socket
// (test/support/vhost_user_front_end.ts plays the front end). For every device type, one back-end
// process meets each hostile case in turn:
//   (a) a 1 MiB memfd sent as a 16 MiB region, the rings past the file's end (refused, REPLY_ACK);
//   (b) an mmap offset past the file's end, from a front end without REPLY_ACK (dropped);
//   (c) the memfd truncated under a running device, then kicks (the front end is dropped);
//   (d) rings inside the file but the region, and the descriptors' buffers, past its end (refused);
//   (e) the memfd truncated under the descriptors' buffers only, then kicks (dropped);
//   (f) /dev/zero instead of a file (refused).
// After each: the process is alive, logged exactly one line about it, and serves a well-formed front
// end (whose memfd it seals against shrinking; the rng's front end gets random bytes). On SIGTERM it
// exits 0 and removes its socket. A last test takes the SIGBUS guard away (no gcc, empty caches): only
// memory sealed against shrinking is accepted then.

import assert from "node:assert/strict";
import { join } from "node:path";
import {
  check,
  closeFd,
  EPERM,
  errno,
  eventfdRead,
  eventfdWrite,
  F_GET_SEALS,
  F_SEAL_SHRINK,
  libc,
  O_RDWR,
  openFile,
  pollAsync,
  POLLIN,
} from "../../ffi/libc.ts";
import { readMessage, VhostUserRequest as R } from "../../devices/vhost_user/protocol.ts";
import { ConnectionClosed } from "../../core/unix_socket.ts";
import { sigbusGuard } from "../../ffi/sigbus_guard.ts";
import {
  memTable,
  publishChain,
  publishEveryShape,
  type RingLayout,
  SharedMemory,
  startRings,
  usedState,
  VhostUserFrontEnd,
  writableBuffer,
} from "../support/vhost_user_front_end.ts";

const REPO = new URL("../../", import.meta.url).pathname;
/** A hang guard for waits on the back end (a broken back end fails the test instead of hanging it). */
const HANG_GUARD_MS = 30_000;
const MiB = 1024 * 1024;
/** The front end's memfd. */
const FILE_SIZE = 1 * MiB;
/** Rings at the start of the file, buffers in its second half. */
const IN_FILE: RingLayout = { ringBase: 0, bufBase: FILE_SIZE / 2 };
/** What (e) leaves of the file: the rings, not the buffers. */
const RINGS_ONLY = FILE_SIZE / 4;
/** The line a back end logs when a front end leaves; routine, not about the case. */
const DISCONNECTED = "front end disconnected; waiting for the next one";

const dec = new TextDecoder();

// Built here (and cached) if need be, so the back ends find it; without it, cases that shrink a file skip.
const guardReason = sigbusGuard().reason;
if (guardReason) console.log(`skipping the hostile cases that shrink a file: ${guardReason}`);

async function run(cmd: string, args: string[]): Promise<{ ok: boolean; out: string }> {
  try {
    const o = await new Deno.Command(cmd, { args, stdout: "piped", stderr: "piped" }).output();
    return { ok: o.success, out: dec.decode(o.stdout) + dec.decode(o.stderr) };
  } catch (e) {
    return { ok: false, out: (e as Error).message };
  }
}

/** A `denovm device TYPE` process (optionally under a command prefix such as `ip netns exec NS`). */
class Backend {
  readonly #child: Deno.ChildProcess;
  stderr = "";
  status?: Deno.CommandStatus;
  readonly exited: Promise<Deno.CommandStatus>;

  constructor(
    readonly type: string,
    readonly socket: string,
    args: string[],
    opts: { prefix?: string[]; env?: Record<string, string> } = {},
  ) {
    const argv = [...(opts.prefix ?? []), Deno.execPath(), "run", "-A", `${REPO}main.ts`, "device", type, ...args];
    const child = new Deno.Command(argv[0], {
      args: argv.slice(1),
      env: opts.env,
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    this.#child = child;
    const pump = (async () => {
      for await (const c of child.stderr) this.stderr += dec.decode(c, { stream: true });
    })();
    this.exited = Promise.all([child.status, pump]).then(([s]) => (this.status = s));
  }

  get lines(): string[] {
    return this.stderr.split("\n").filter((l) => l !== "");
  }

  /** Wait until stderr matches `re` (fails if the process exits or the hang guard runs out). */
  waitFor(re: RegExp, what: string): Promise<void> {
    return this.until(() => re.test(this.stderr), what);
  }

  /** Wait until `cond` holds (fails if the process exits or the hang guard runs out). */
  async until(cond: () => boolean, what: string): Promise<void> {
    const end = Date.now() + HANG_GUARD_MS;
    while (!cond()) {
      if (this.status) {
        assert.fail(`${this.type}: exited (${JSON.stringify(this.status)}) waiting for ${what}:\n${this.stderr}`);
      }
      if (Date.now() > end) assert.fail(`${this.type}: gave up waiting for ${what}:\n${this.stderr}`);
      await new Promise((r) => setTimeout(r, 10));
    }
  }

  async stop(): Promise<Deno.CommandStatus> {
    try {
      this.#child.kill("SIGTERM");
    } catch {
      // gone already
    }
    return await this.exited;
  }
}

/** Resolves when the back end closes the connection (the front end was dropped). */
async function assertDropped(fe: VhostUserFrontEnd): Promise<void> {
  const rev = await pollAsync([fe.sock.fd], POLLIN, HANG_GUARD_MS);
  assert.ok(rev[0] !== 0, "the back end neither answered nor closed the connection");
  await assert.rejects(readMessage(fe.sock, true), ConnectionClosed);
}

function seals(fd: number): number {
  return check("fcntl F_GET_SEALS", libc().fcntl(fd, F_GET_SEALS, 0n));
}

/**
 * A well-formed front end: memory (a memfd the back end seals against shrinking), every ring, a request
 * on the rng; the rings stopped again.
 */
async function wellFormed(b: Backend): Promise<void> {
  const fe = VhostUserFrontEnd.connect(b.socket);
  const shm = new SharedMemory(FILE_SIZE, { sealable: true });
  let fds: { kicks: number[]; calls: number[] } | undefined;
  try {
    const { queues } = await fe.negotiate({ replyAck: true });
    assert.equal(await fe.ack(R.SET_MEM_TABLE, memTable(FILE_SIZE), [shm.fd]), 0n, `${b.type}: SET_MEM_TABLE`);
    assert.ok(seals(shm.fd) & F_SEAL_SHRINK, `${b.type}: the back end sealed the memfd against shrinking`);
    assert.equal(libc().ftruncate(shm.fd, BigInt(FILE_SIZE / 2)), -1, "a sealed memfd cannot shrink");
    assert.equal(errno(), EPERM);
    fds = await startRings(fe, IN_FILE, queues);
    if (b.type === "rng") {
      publishChain(shm.mem, IN_FILE, 0, 1);
      eventfdWrite(fds.kicks[0]);
      const rev = await pollAsync([fds.calls[0]], POLLIN, HANG_GUARD_MS);
      assert.equal(rev[0] & POLLIN, POLLIN, "the rng signalled its call eventfd");
      eventfdRead(fds.calls[0]);
      const used = usedState(shm.mem, IN_FILE, 0);
      assert.equal(used.idx, 1);
      const w = writableBuffer(IN_FILE, 0);
      assert.equal(used.len, w.len, "the rng filled the writable buffer");
      assert.ok(shm.mem.read(w.addr, w.len).some((x) => x !== 0), "random bytes arrived");
    }
    for (let i = 0; i < queues; i++) await fe.getVringBase(i);
  } finally {
    fe.close();
    shm.close();
    for (const fd of [...fds?.kicks ?? [], ...fds?.calls ?? []]) closeFd(fd);
  }
}

interface HostileCase {
  name: string;
  /** The case needs the SIGBUS guard (a file shrinking under a mapping). */
  needsGuard?: boolean;
  /** What the back end's one line about it must say. */
  line: RegExp;
  /** Whether the back end drops the front end (else it refuses a request and the front end leaves). */
  drops: boolean;
  play(b: Backend): Promise<void>;
}

/** Front end with memory of FILE_SIZE, table accepted, every ring started (rings in the file's first pages). */
async function runningDevice(b: Backend) {
  const fe = VhostUserFrontEnd.connect(b.socket);
  const shm = new SharedMemory(FILE_SIZE);
  const { queues } = await fe.negotiate({ replyAck: true });
  assert.equal(await fe.ack(R.SET_MEM_TABLE, memTable(FILE_SIZE), [shm.fd]), 0n, "a table the file backs");
  const fds = await startRings(fe, IN_FILE, queues);
  const close = () => {
    fe.close();
    shm.close();
    for (const fd of [...fds.kicks, ...fds.calls]) closeFd(fd);
  };
  return { fe, shm, queues, fds, close };
}

const CASES: HostileCase[] = [
  {
    name: "(a) a 1 MiB memfd sent as a 16 MiB region, rings past its end",
    line: /region 0\b.*16777216 bytes.*1048576/,
    drops: false,
    async play(b) {
      const fe = VhostUserFrontEnd.connect(b.socket);
      const shm = new SharedMemory(FILE_SIZE);
      try {
        const { queues } = await fe.negotiate({ replyAck: true });
        assert.equal(await fe.ack(R.SET_MEM_TABLE, memTable(16 * MiB), [shm.fd]), 1n, "the table is refused");
        const fds = await startRings(fe, { ringBase: 8 * MiB, bufBase: 12 * MiB }, queues);
        for (const k of fds.kicks) eventfdWrite(k);
        // The connection still answers: the refusal was the table's, not the front end's.
        await fe.callU64(R.GET_FEATURES);
        for (const fd of [...fds.kicks, ...fds.calls]) closeFd(fd);
      } finally {
        fe.close();
        shm.close();
      }
    },
  },
  {
    name: "(b) an mmap offset past the file's end, no REPLY_ACK",
    line: /dropping the front end: .*region 0\b.*offset 2097152.*1048576/,
    drops: true,
    async play(b) {
      const fe = VhostUserFrontEnd.connect(b.socket);
      const shm = new SharedMemory(FILE_SIZE);
      try {
        await fe.negotiate({ replyAck: false });
        await fe.send(R.SET_MEM_TABLE, memTable(FILE_SIZE, 2 * MiB), [shm.fd]);
        await assertDropped(fe);
      } finally {
        fe.close();
        shm.close();
      }
    },
  },
  {
    name: "(c) the memfd truncated under a running device",
    needsGuard: true,
    line: /dropping the front end: .*memory region 0\b.*shrank/,
    drops: true,
    async play(b) {
      const d = await runningDevice(b);
      try {
        d.shm.truncate(0);
        for (const k of d.fds.kicks) eventfdWrite(k);
        await assertDropped(d.fe);
      } finally {
        d.close();
      }
    },
  },
  {
    name: "(d) rings inside the file, a descriptor's buffer past its end",
    line: /region 0\b.*2097152 bytes.*1048576/,
    drops: false,
    async play(b) {
      const fe = VhostUserFrontEnd.connect(b.socket);
      const shm = new SharedMemory(FILE_SIZE);
      try {
        const { queues } = await fe.negotiate({ replyAck: true });
        assert.equal(await fe.ack(R.SET_MEM_TABLE, memTable(2 * FILE_SIZE), [shm.fd]), 1n, "the table is refused");
        const layout = { ringBase: 0, bufBase: FILE_SIZE + FILE_SIZE / 2 };
        const fds = await startRings(fe, layout, queues);
        for (const k of fds.kicks) eventfdWrite(k);
        await fe.callU64(R.GET_FEATURES);
        for (const fd of [...fds.kicks, ...fds.calls]) closeFd(fd);
      } finally {
        fe.close();
        shm.close();
      }
    },
  },
  {
    name: "(e) the memfd truncated under the descriptors' buffers only",
    needsGuard: true,
    line: /dropping the front end: .*memory region 0\b.*shrank/,
    drops: true,
    async play(b) {
      const d = await runningDevice(b);
      try {
        for (let i = 0; i < d.queues; i++) publishEveryShape(d.shm.mem, IN_FILE, i, new Uint8Array(64).fill(0x5a));
        d.shm.truncate(RINGS_ONLY);
        for (const k of d.fds.kicks) eventfdWrite(k);
        await assertDropped(d.fe);
      } finally {
        d.close();
      }
    },
  },
  {
    name: "(f) /dev/zero instead of a file",
    line: /region 0\b.*not a regular file/,
    drops: false,
    async play(b) {
      const fe = VhostUserFrontEnd.connect(b.socket);
      const zero = openFile("/dev/zero", O_RDWR);
      try {
        await fe.negotiate({ replyAck: true });
        assert.equal(await fe.ack(R.SET_MEM_TABLE, memTable(FILE_SIZE), [zero]), 1n, "the table is refused");
      } finally {
        fe.close();
        closeFd(zero);
      }
    },
  },
];

/** The types and their arguments; net runs inside a network namespace with a tap of its own. */
interface DeviceType {
  type: string;
  args(dir: string): string[];
  /** Set up what the back end needs; returns the command prefix and a clean-up. */
  setup?(): Promise<{ prefix: string[]; cleanup: () => Promise<void> } | string>;
}

const TYPES: DeviceType[] = [
  {
    type: "block",
    args: (dir) => {
      Deno.writeFileSync(join(dir, "disk.img"), new Uint8Array(MiB));
      return ["--file", join(dir, "disk.img")];
    },
  },
  {
    type: "net",
    args: () => ["--tap-name", "tap0"],
    async setup() {
      const ns = `denovm-hostile-${Deno.pid}`;
      const add = await run("ip", ["netns", "add", ns]);
      if (!add.ok) return `ip netns add failed (needs iproute2 and CAP_SYS_ADMIN): ${add.out.trim()}`;
      const tap = await run("ip", ["-n", ns, "tuntap", "add", "dev", "tap0", "mode", "tap"]);
      if (!tap.ok) {
        await run("ip", ["netns", "del", ns]);
        return `cannot create a tap: ${tap.out.trim()}`;
      }
      // The tap stays down: no frames from the host's network stack arrive to be logged about.
      return { prefix: ["ip", "netns", "exec", ns], cleanup: async () => void (await run("ip", ["netns", "del", ns])) };
    },
  },
  { type: "console", args: () => [] },
  { type: "rng", args: () => [] },
  { type: "vsock", args: (dir) => ["--cid", "3", "--uds-path", join(dir, "vsock.uds")] },
  { type: "balloon", args: () => [] },
  { type: "input", args: () => ["--kind", "keyboard"] },
  { type: "gpu", args: () => ["--backend", "2d"] },
];

/** Lines a case produced, without the routine disconnect line. */
function caseLines(b: Backend, from: number): string[] {
  return b.lines.slice(from).filter((l) => !l.endsWith(DISCONNECTED));
}

for (const t of TYPES) {
  Deno.test({
    name: `denovm device ${t.type}: a hostile front end's memory table never kills the back end`,
    sanitizeResources: false,
    async fn(ctx) {
      const env = await t.setup?.();
      if (typeof env === "string") {
        console.log(`skipping denovm device ${t.type}: ${env}`);
        return;
      }
      const dir = await Deno.makeTempDir({ prefix: "denovm-hostile-" });
      const socket = join(dir, `${t.type}.sock`);
      const b = new Backend(t.type, socket, ["--socket-path", socket, ...t.args(dir)], { prefix: env?.prefix });
      try {
        await b.waitFor(/listening on/, "the listening line");
        for (const c of CASES) {
          const ignore = c.needsGuard === true && guardReason !== undefined;
          await ctx.step({
            name: c.name,
            ignore,
            fn: async () => {
              const from = b.lines.length;
              await c.play(b);
              await wellFormed(b);
              // Both front ends left: the disconnect line of the well-formed one comes last (a dropped front
              // end gets its one line instead of a disconnect line).
              const leaves = c.drops ? 1 : 2;
              await b.until(
                () => b.lines.slice(from).filter((l) => l.endsWith(DISCONNECTED)).length >= leaves,
                "the front ends to leave",
              );
              assert.equal(b.status, undefined, `${t.type} is alive`);
              const lines = caseLines(b, from);
              assert.equal(lines.length, 1, `${t.type}: exactly one line about the case:\n${lines.join("\n")}`);
              assert.match(lines[0], c.line);
            },
          });
        }
        const status = await b.stop();
        assert.equal(status.code, 0, `${t.type} exits 0 on SIGTERM:\n${b.stderr}`);
        assert.throws(() => Deno.lstatSync(socket), Deno.errors.NotFound, "the socket file is removed");
      } finally {
        if (!b.status) await b.stop();
        await env?.cleanup();
        await Deno.remove(dir, { recursive: true });
      }
    },
  });
}

Deno.test({
  name: "denovm device rng without the SIGBUS guard (no gcc, nothing cached): only memory sealed against " +
    "shrinking is accepted",
  sanitizeResources: false,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "denovm-hostile-" });
    const socket = join(dir, "rng.sock");
    const info = JSON.parse((await run(Deno.execPath(), ["info", "--json"])).out) as { denoDir: string };
    const b = new Backend("rng", socket, ["--socket-path", socket], {
      env: {
        PATH: join(dir, "no-such-bin"),
        DENOVM_CACHE: join(dir, "cache"),
        XDG_CACHE_HOME: join(dir, "xdg"),
        DENO_DIR: info.denoDir,
      },
    });
    try {
      await b.waitFor(/listening on/, "the listening line");
      // A memfd that does not allow sealing: refused, with the reason.
      const fe = VhostUserFrontEnd.connect(socket);
      const shm = new SharedMemory(FILE_SIZE);
      try {
        await fe.negotiate({ replyAck: true });
        assert.equal(
          await fe.ack(R.SET_MEM_TABLE, memTable(FILE_SIZE), [shm.fd]),
          1n,
          "an unsealable memfd is refused",
        );
      } finally {
        fe.close();
        shm.close();
      }
      await b.until(() => b.lines.some((l) => l.endsWith(DISCONNECTED)), "the front end to leave");
      const lines = caseLines(b, 1);
      assert.equal(lines.length, 1, lines.join("\n"));
      assert.match(lines[0], /region 0: .*F_SEAL_SHRINK.*SIGBUS guard is unavailable: gcc cannot run/);
      // A sealable one is sealed and served.
      await wellFormed(b);
      assert.equal((await b.stop()).code, 0, b.stderr);
      assert.throws(() => Deno.lstatSync(socket), Deno.errors.NotFound, "the socket file is removed");
    } finally {
      if (!b.status) await b.stop();
      await Deno.remove(dir, { recursive: true });
    }
  },
});
