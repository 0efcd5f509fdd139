// The vhost-user half of the fuzzing campaign: a hostile front end, over a real Unix socket, against
// every `denovm device <type> --socket-path S` back end (vmm/cli/device.ts; devices/vhost_user/backend.ts).
//
// For each type the real back end process runs (`deno run -A main.ts device <type> ...`; net inside a
// network namespace of its own with its tap up). Rounds, chosen by a PRNG seeded from `seed` and the
// type's name (so a run is reproducible), each on a fresh connection that starts with a GET_FEATURES ping:
//
//  - data rounds: a random valid memory table (1-4 memfd-backed regions, odd guest bases, odd mmap
//    offsets), random features, rings of random sizes at random places and start indices; then batches
//    of descriptor chains a guest driver would issue for the device (vhost_user_devices.ts), a share of
//    them malformed (loops, next out of the table, buffers outside memory, huge or zero lengths,
//    readable after writable, bad indirect tables, heads out of range, the same head twice), each batch
//    kicked through the ring's eventfd. Mid-stream: the same table sent again, a ring stopped with
//    GET_VRING_BASE and restarted, rings enabled only after a kick on ring 0, config reads and writes,
//    a disconnect with chains in flight, an available index pushed too far;
//  - message rounds: random and mutated messages many per write (wrong sizes, flags, request codes,
//    fds where none belong, none where needed, invalid memory tables, rings inside and outside memory,
//    truncated payloads at the end of a connection), and kicks on whatever rings that set up;
//  - ring set-up rounds: rings misaligned, overlapping, straddling a region's end or outside memory, kicked;
//  - reconnect rounds: connections closed at once or half-way through a header.
//
// Every case is on by default, each behind an option that turns it off (to bisect a failure):
// memoryShrink (memory regions larger than their file, files truncated under the back end's mappings),
// hostileFds (kick fds that are not eventfds, ring sizes above the device's own queue maximum) and
// stolenKicks (the front end reads its own kick back before the back end can).
//
// What is counted (FuzzResult, bench/fuzz/common.ts): requests (chains kicked + messages the back end
// handled), crashes (the process exited), hangs (no answer to a message, or well-formed chains not
// completed, within `hangMs`), oob (the back end changed guest memory outside what the descriptors
// granted: every byte the front end did not grant keeps a known value and is compared after each
// batch), rss_growth_mb (VmRSS of the back end between rounds, at the end minus after a warm-up). After a
// crash or a hang the seed, request index and last action are logged and the back end restarted.

import { join } from "node:path";
import type { FuzzOptions, FuzzResult } from "./common.ts";
import {
  Arena,
  BytePool,
  Conn,
  hashString,
  Layout,
  type Piece,
  type Region,
  Rng,
  SharedFile,
} from "./vhost_user_parts.ts";
import { type ChainSpec, DEVICE_TYPES, type DeviceProfile, deviceProfile, type GenCtx } from "./vhost_user_devices.ts";
import {
  check,
  closeFd,
  cstr,
  EFD_CLOEXEC,
  eventfd,
  eventfdRead,
  eventfdWrite,
  libc,
  MFD_CLOEXEC,
  pollAsync,
  POLLIN,
} from "../../ffi/libc.ts";
import {
  configPayload,
  encodeMessage,
  type MemRegion,
  memTablePayload,
  u64Payload,
  VHOST_USER_F_PROTOCOL_FEATURES,
  VHOST_USER_FLAG_NEED_REPLY,
  VHOST_USER_FLAG_REPLY,
  VHOST_USER_HEADER_SIZE,
  VHOST_USER_MAX_PAYLOAD,
  VHOST_USER_PROTOCOL_F_BACKEND_REQ,
  VHOST_USER_PROTOCOL_F_CONFIG,
  VHOST_USER_PROTOCOL_F_REPLY_ACK,
  VHOST_USER_PROTOCOL_F_RESET_DEVICE,
  VHOST_USER_VERSION,
  VHOST_USER_VRING_NOFD_MASK,
  VhostUserRequest as R,
  vringAddrPayload,
  vringStatePayload,
} from "../../devices/vhost_user/protocol.ts";
import {
  availRingBytes,
  descTableBytes,
  usedRingBytes,
  VIRTQ_AVAIL_IDX,
  VIRTQ_AVAIL_RING,
  VIRTQ_DESC_ALIGN,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
  VIRTQ_DESC_SIZE,
  VIRTQ_USED_ALIGN,
  VIRTQ_USED_ELEM_SIZE,
  VIRTQ_USED_IDX,
  VIRTQ_USED_RING,
} from "../../devices/virtio/queue.ts";
import { VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1 } from "../../devices/virtio/device.ts";
import { VHOST_USER_GPU_SET_SOCKET } from "../../devices/vhost_user/gpu_socket.ts";

export { DEVICE_TYPES as VHOST_USER_FUZZ_TYPES };
export type { DeviceProfile } from "./vhost_user_devices.ts";

export interface VhostUserFuzzOptions extends FuzzOptions {
  /** Send memory regions larger than their memfd and truncate memfds after the back end mapped them (default on). */
  memoryShrink?: boolean;
  /** Send kick fds that are not eventfds, and SET_VRING_NUM above the device's queue maximum (default on). */
  hostileFds?: boolean;
  /**
   * Take kicks away: the front end reads its own (blocking) kick eventfd right after signalling it, racing
   * the back end's read (default on).
   */
  stolenKicks?: boolean;
  /** How long the back end may take to answer or complete well-formed chains before it counts as hung. */
  hangMs?: number;
  /** Append everything the back ends write on stderr to this file (for debugging a finding). */
  stderrFile?: string;
  /** Extra or replacement device profiles (tests use a toy back end). */
  profiles?: Record<string, DeviceProfile>;
}

/** A FuzzResult plus the rate and, for a type that cannot run here, why. */
export interface VhostUserFuzzResult extends FuzzResult {
  requests_per_s: number;
  seconds: number;
  skipped?: string;
}

const DEFAULT_HANG_MS = 15_000;
/** How long a back end may take to start listening (a cold Deno cache compiles main.ts's graph). */
const START_TIMEOUT_MS = 120_000;
/** A chain's buffers are placed with at least this many untouched bytes between them. */
const MIN_BUFFER_GAP = 1;
const MAX_BUFFER_GAP = 24;
/** Hold-queue chains get fixed slots of this many bytes. */
const HOLD_SLOT_BYTES = 2304;
const PAGE = 4096;
/** Share of chains (on request queues) that are malformed. */
const MALFORMED_SHARE = 0.12;
/** Requests before the RSS baseline is taken (after each start of the back end). */
const WARMUP_SHARE = 0.25;
const WARMUP_MIN = 1000;
const WARMUP_MAX = 250_000;

class Hang extends Error {}
class Crash extends Error {}

// ---- The back end process ----

class BackendProcess {
  readonly child: Deno.ChildProcess;
  pid: number;
  exited = false;
  status?: Deno.CommandStatus;
  stopping = false;
  tail = "";
  readonly drops = new Map<string, number>();
  readonly #listening = Promise.withResolvers<void>();

  constructor(cmd: string[], readonly stderrFile?: string) {
    this.child = new Deno.Command(cmd[0], {
      args: cmd.slice(1),
      stdin: "null",
      stdout: "null",
      stderr: "piped",
      env: { NO_COLOR: "1" },
    }).spawn();
    this.pid = this.child.pid;
    this.child.status.then((s) => {
      this.status = s;
      this.exited = true;
      this.#listening.reject(new Error(`exited (${describeStatus(s)}) before listening:\n${this.tail}`));
    });
    this.#listening.promise.catch(() => {});
    this.#pump(this.child.stderr);
  }

  async #pump(s: ReadableStream<Uint8Array>): Promise<void> {
    const d = new TextDecoder();
    let line = "";
    for await (const chunk of s) {
      const text = d.decode(chunk, { stream: true });
      if (this.stderrFile) Deno.writeTextFileSync(this.stderrFile, text, { append: true });
      this.tail = (this.tail + text).slice(-8192);
      line += text;
      let nl;
      while ((nl = line.indexOf("\n")) >= 0) {
        const l = line.slice(0, nl);
        line = line.slice(nl + 1);
        if (l.includes(": listening on ")) this.#listening.resolve();
        const m = l.match(/dropping the front end: (.*)$/);
        if (m) {
          const reason = m[1].replace(/0x[0-9a-f]+|\d+/g, "N");
          this.drops.set(reason, (this.drops.get(reason) ?? 0) + 1);
        }
      }
    }
  }

  async waitListening(): Promise<void> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    try {
      await Promise.race([
        this.#listening.promise,
        new Promise((_, rej) => {
          timer = setTimeout(
            () => rej(new Error(`not listening after ${START_TIMEOUT_MS} ms:\n${this.tail}`)),
            START_TIMEOUT_MS,
          );
        }),
      ]);
    } finally {
      clearTimeout(timer);
    }
    this.pid = resolvePid(this.pid);
  }

  /** VmRSS in KiB, or undefined when the process is gone. */
  rssKb(): number | undefined {
    try {
      const m = Deno.readTextFileSync(`/proc/${this.pid}/status`).match(/^VmRSS:\s+(\d+) kB/m);
      return m ? Number(m[1]) : undefined;
    } catch {
      return undefined;
    }
  }

  async stop(signal: Deno.Signal = "SIGTERM"): Promise<void> {
    this.stopping = true;
    if (!this.exited) {
      try {
        this.child.kill(signal);
      } catch {
        // gone
      }
    }
    const t = setTimeout(() => {
      try {
        this.child.kill("SIGKILL");
      } catch {
        // gone
      }
    }, 5000);
    await this.child.status;
    clearTimeout(t);
  }
}

function describeStatus(s: Deno.CommandStatus | undefined): string {
  if (!s) return "running";
  return s.signal ? `signal ${s.signal}` : `exit code ${s.code}`;
}

/** The Deno process behind `pid`: `ip netns exec` may run it as a child. */
function resolvePid(pid: number): number {
  for (let i = 0; i < 3; i++) {
    let comm = "";
    try {
      comm = Deno.readTextFileSync(`/proc/${pid}/comm`).trim();
    } catch {
      return pid;
    }
    if (comm !== "ip") return pid;
    try {
      const kids = Deno.readTextFileSync(`/proc/${pid}/task/${pid}/children`).trim().split(/\s+/).filter(Boolean);
      if (kids.length === 0) return pid;
      pid = Number(kids[0]);
    } catch {
      return pid;
    }
  }
  return pid;
}

// ---- The driver's side of one ring ----

interface Desc {
  addr: bigint;
  len: number;
  flags: number;
  next: number;
}

interface Chain {
  head: number;
  /** Descriptor-table entries it uses (returned to the free list when it completes). */
  descs: number[];
  /** Guest ranges the device may change because of it. */
  grants: [number, number][];
  /** Total writable bytes, when the chain is well-formed; -1 when malformed. */
  writable: number;
  slot?: number;
}

interface DriverQueue {
  index: number;
  size: number;
  role: "request" | "hold";
  hold: number;
  desc: number;
  avail: number;
  used: number;
  availIdx: number;
  lastUsed: number;
  kick: number;
  call: number;
  free: number[];
  outstanding: Map<number, Chain>;
  slots: Arena[];
  freeSlots: number[];
}

/** Everything one data round set up. */
interface Setup {
  layout: Layout;
  queues: DriverQueue[];
  eventIdx: boolean;
  arenas: Arena[];
  discardPfns: number[];
  discardArea?: [number, number];
  /** Rings enabled only after a kick on ring 0. */
  late: DriverQueue[];
}

// ---- One type's campaign ----

class TypeFuzzer {
  readonly rng: Rng;
  readonly pool: BytePool;
  readonly log: (line: string) => void;
  readonly hangMs: number;
  proc?: BackendProcess;
  features = 0n;
  queueCount = 0;
  requests = 0;
  crashes = 0;
  hangs = 0;
  oob = 0;
  rssGrowthKb = 0;
  #rssBase?: number;
  #warmupAt = 0;
  #round = 0;
  #actionText = "start";
  readonly #recent: string[] = [];
  get #action(): string {
    return this.#actionText;
  }
  set #action(a: string) {
    this.#actionText = a;
    this.#recent.push(`${this.requests}: ${a}`);
    if (this.#recent.length > 12) this.#recent.shift();
  }
  readonly #findings = new Map<string, number>();
  /** What the campaign did, for the summary line. */
  readonly stats = {
    data: 0,
    message: 0,
    rings: 0,
    reconnect: 0,
    late: 0,
    chains: 0,
    malformed: 0,
    filled: 0,
    messages: 0,
    drops: 0,
    restarts: 0,
  };
  readonly socketPath: string;

  constructor(
    readonly type: string,
    readonly profile: DeviceProfile,
    readonly opts: VhostUserFuzzOptions,
    readonly dir: string,
  ) {
    const seed = (opts.seed ^ hashString(type)) >>> 0;
    this.rng = new Rng(seed);
    this.pool = new BytePool(this.rng.fork());
    this.log = opts.log ?? (() => {});
    this.hangMs = opts.hangMs ?? DEFAULT_HANG_MS;
    this.socketPath = join(dir, `${type}.sock`);
  }

  get target(): number {
    return this.opts.requestsPerDevice;
  }

  /** Log one finding (an anomaly that is not a crash, hang or oob), the first few times. */
  finding(what: string): void {
    const key = what.replace(/0x[0-9a-f]+|\d+/g, "N");
    const n = (this.#findings.get(key) ?? 0) + 1;
    this.#findings.set(key, n);
    if (n <= 3) this.log(`${this.type}: finding (seed ${this.opts.seed}, request ${this.requests}): ${what}`);
  }

  async start(): Promise<void> {
    this.proc = new BackendProcess(this.profile.command(this.socketPath, this.dir), this.opts.stderrFile);
    await this.proc.waitListening();
    await this.profile.afterStart?.(this.dir);
    this.#rssBase = undefined;
    const w = Math.round(this.target * WARMUP_SHARE);
    this.#warmupAt = this.requests + Math.min(WARMUP_MAX, Math.max(WARMUP_MIN, w));
  }

  async restart(why: string): Promise<void> {
    const p = this.proc!;
    this.log(
      `${this.type}: ${why} at seed ${this.opts.seed}, request ${this.requests}, round ${this.#round}, ` +
        `last action ${this.#action}; back end ${describeStatus(p.status)}; ` +
        `recent actions (request index: action): ${this.#recent.join(" | ")}; its last lines:\n` +
        p.tail.split("\n").slice(-12).join("\n"),
    );
    await p.stop("SIGKILL");
    this.stats.restarts++;
    this.#noteRss(true);
    await this.start();
  }

  /** Throw Crash when the back end died, else Hang. */
  gone(what: string): never {
    if (this.proc!.exited) throw new Crash(what);
    throw new Hang(what);
  }

  /**
   * Between rounds (no memory table mapped): the baseline once the warm-up is over, then the growth since
   * (the last reading counts), and a reading per tenth of the campaign for the summary.
   */
  #noteRss(final: boolean): void {
    const rss = this.proc?.rssKb();
    if (rss === undefined) return;
    if (final || this.requests >= this.#nextRssSample) {
      this.rssSeries.push([this.requests, Math.round(rss / 1024)]);
      this.#nextRssSample = this.requests + this.target / 10;
    }
    if (this.#rssBase === undefined) {
      if (this.requests >= this.#warmupAt && !final) this.#rssBase = rss;
      return;
    }
    this.rssGrowthKb = rss - this.#rssBase;
  }

  /** [requests, VmRSS MiB] readings through the campaign. */
  readonly rssSeries: [number, number][] = [];
  #nextRssSample = 0;

  async run(): Promise<VhostUserFuzzResult> {
    const t0 = performance.now();
    await this.start();
    try {
      await this.#probe();
      let last = false;
      while (!last) {
        last = this.requests >= this.target;
        this.#round++;
        try {
          if (last) {
            // A last look at the process: alive and answering; its RSS.
            const c = await this.#connect();
            await this.#ping(c);
            c.close();
            this.#noteRss(true);
          } else await this.#oneRound();
        } catch (e) {
          if (!(e instanceof Crash) && !(e instanceof Hang)) throw e;
          // The process may have died a moment ago: its exit status arrives after its socket closed.
          await new Promise((r) => setTimeout(r, 200));
          if (e instanceof Crash || this.proc!.exited) {
            this.crashes++;
            await this.restart(`crash (${e.message})`);
          } else {
            this.hangs++;
            await this.restart(`hang (${e.message})`);
          }
        }
      }
    } finally {
      await this.proc?.stop();
    }
    for (const [reason, n] of this.proc?.drops ?? []) {
      if (/TypeError|RangeError|ReferenceError|undefined|null|is not a function|Maximum call stack/.test(reason)) {
        this.log(`${this.type}: finding: the back end dropped a front end ${n} times on an internal error: ${reason}`);
      }
    }
    const seconds = (performance.now() - t0) / 1000;
    const drops = [...(this.proc?.drops ?? [])].sort((a, b) => b[1] - a[1]).slice(0, 8);
    this.log(
      `${this.type}: rounds and counts ${JSON.stringify(this.stats)}; findings ${JSON.stringify([...this.#findings])}`,
    );
    this.log(`${this.type}: most frequent reasons the back end dropped the front end: ${JSON.stringify(drops)}`);
    this.log(`${this.type}: VmRSS between rounds (requests, MiB): ${JSON.stringify(this.rssSeries)}`);
    return {
      requests: this.requests,
      crashes: this.crashes,
      hangs: this.hangs,
      oob: this.oob,
      rss_growth_mb: Math.round((this.rssGrowthKb / 1024) * 10) / 10,
      requests_per_s: Math.round(this.requests / seconds),
      seconds: Math.round(seconds * 10) / 10,
    };
  }

  async #connect(): Promise<Conn> {
    for (let i = 0; i < 50; i++) {
      if (this.proc!.exited) throw new Crash("the back end exited");
      try {
        return new Conn(this.socketPath);
      } catch {
        await new Promise((r) => setTimeout(r, 20));
      }
    }
    this.gone("its socket refuses connections");
  }

  /** GET_FEATURES on `c`; throws Hang/Crash when it goes unanswered. */
  async #ping(c: Conn): Promise<void> {
    c.push(R.GET_FEATURES, VHOST_USER_VERSION);
    await this.#drainOk(c, "GET_FEATURES");
  }

  async #drainOk(c: Conn, what: string) {
    const handled = c.queued;
    await c.flush();
    const r = await c.drain(performance.now() + this.hangMs);
    if (r.kind === "timeout") this.gone(`no answer to ${what} within ${this.hangMs} ms`);
    if (r.kind === "closed") {
      if (this.proc!.exited) throw new Crash(`connection closed during ${what}`);
      return undefined;
    }
    this.requests += handled;
    this.stats.messages += handled;
    return r.replies;
  }

  async #probe(): Promise<void> {
    const c = await this.#connect();
    c.push(R.GET_FEATURES, VHOST_USER_VERSION);
    c.push(R.GET_QUEUE_NUM, VHOST_USER_VERSION);
    const replies = await this.#drainOk(c, "GET_FEATURES and GET_QUEUE_NUM");
    c.close();
    if (!replies) throw new Error(`${this.type}: the back end dropped the first connection:\n${this.proc!.tail}`);
    this.features = new DataView(replies[0].payload.buffer).getBigUint64(0, true);
    this.queueCount = Number(new DataView(replies[1].payload.buffer).getBigUint64(0, true));
    if (this.queueCount !== this.profile.queues.length) {
      this.finding(`GET_QUEUE_NUM says ${this.queueCount}, the profile knows ${this.profile.queues.length} queues`);
    }
  }

  async #oneRound(): Promise<void> {
    this.#action = "round start ping";
    const c = await this.#connect();
    try {
      await this.#ping(c);
      if (c.closed) {
        this.finding("the back end dropped a fresh connection's GET_FEATURES");
        return;
      }
      this.#noteRss(false);
      const k = this.rng.int(100);
      if (k < 55) {
        this.stats.data++;
        await this.#dataRound(c);
      } else if (k < 85) {
        this.stats.message++;
        await this.#messageRound(c);
      } else if (k < 93) {
        this.stats.rings++;
        await this.#ringSetupRound(c);
      } else {
        this.stats.reconnect++;
        await this.#reconnectRound();
      }
    } finally {
      c.close();
    }
  }

  // ---- Memory layouts ----

  #layout(mainSize: number): Layout {
    const rng = this.rng;
    const n = rng.chance(0.6) ? 1 : rng.range(2, 4);
    const sizes = Array.from(
      { length: n },
      (_, i) => (i === 0 ? mainSize : rng.range(PAGE, 256 * 1024)) + (rng.chance(0.3) ? rng.int(PAGE) : 0),
    );
    const files: SharedFile[] = [];
    const regions: Region[] = [];
    let guest = rng.pick([0, PAGE, 0x10_0000, 0x4000_0000, 0x1_0000_0000]) + (rng.chance(0.3) ? rng.int(64) : 0);
    const userBase = 0x7f00_0000_0000n + BigInt(rng.int(0x1000)) * 0x10_0000n;
    for (let i = 0; i < n;) {
      // One file per region, or two regions at different offsets of one file.
      const group = i + 1 < n && rng.chance(0.3) ? 2 : 1;
      let off = rng.pick([0, 0, PAGE * rng.int(4), rng.int(2 * PAGE)]);
      const offs: number[] = [];
      for (let k = 0; k < group; k++) {
        offs.push(off);
        off += sizes[i + k] + rng.int(2 * PAGE);
      }
      const file = new SharedFile(Math.ceil((off + rng.int(PAGE)) / PAGE) * PAGE);
      files.push(file);
      for (let k = 0; k < group; k++, i++) {
        regions.push({
          guestBase: guest,
          size: sizes[i],
          user: userBase + BigInt(i) * 0x1000_0000n + BigInt(rng.int(64)),
          file,
          fileOff: offs[k],
        });
        guest += sizes[i] + PAGE * rng.range(1, 16) + (rng.chance(0.3) ? rng.int(64) : 0);
      }
    }
    return new Layout(regions, files);
  }

  // ---- Data rounds ----

  #negotiate(): { features: bigint; protocol: boolean; proto: bigint } {
    const rng = this.rng;
    let f = this.features;
    for (let b = 0n; b < 64n; b++) {
      const bit = 1n << b;
      if (!(f & bit) || bit === VIRTIO_F_VERSION_1) continue;
      if (bit === VHOST_USER_F_PROTOCOL_FEATURES ? rng.chance(0.1) : rng.chance(0.4)) f &= ~bit;
    }
    const protocol = (f & VHOST_USER_F_PROTOCOL_FEATURES) !== 0n;
    let proto = VHOST_USER_PROTOCOL_F_REPLY_ACK | VHOST_USER_PROTOCOL_F_CONFIG;
    if (rng.chance(0.5)) proto |= VHOST_USER_PROTOCOL_F_RESET_DEVICE;
    if (rng.chance(0.2)) proto |= VHOST_USER_PROTOCOL_F_BACKEND_REQ;
    return { features: f, protocol, proto };
  }

  #setup(c: Conn, fds: number[]): Setup {
    const rng = this.rng;
    const profile = this.profile;
    const sizes = profile.queues.map((q) => rng.chance(0.7) ? q.max : 1 << rng.int(Math.log2(q.max) + 1));
    const ringBytes = sizes.reduce((n, s) => n + descTableBytes(s) + availRingBytes(s) + usedRingBytes(s) + 64, 0);
    const holdBytes = profile.queues.reduce((n, q) => n + (q.role === "hold" ? (q.hold ?? 8) * HOLD_SLOT_BYTES : 0), 0);
    const discard = (profile.discardPages ?? 0) * PAGE;
    const mainSize = ringBytes + holdBytes + discard + PAGE + rng.range(256 * 1024, 1024 * 1024);
    const layout = this.#layout(mainSize);
    const main = layout.regions.find((r) => r.size >= mainSize)!;
    const arenas = layout.regions.map((r) => new Arena(r.guestBase, r.guestBase + r.size));
    const mainArena = arenas[layout.regions.indexOf(main)];
    const { features, protocol, proto } = this.#negotiate();
    const eventIdx = (features & VIRTIO_F_EVENT_IDX) !== 0n;

    // Balloon pages first: page-aligned in guest and host memory where the layout allows.
    const discardPfns: number[] = [];
    let discardArea: [number, number] | undefined;
    if (discard > 0) {
      const g = mainArena.alloc(discard + PAGE, PAGE)!;
      discardArea = [g, discard + PAGE];
      for (let p = 0; p < (profile.discardPages ?? 0); p++) discardPfns.push(g / PAGE + p);
    }
    const queues: DriverQueue[] = profile.queues.map((qp, index) => {
      const size = sizes[index];
      // Rings in the main region or, when it fits, another one.
      const pickArena = () => rng.chance(0.7) ? mainArena : rng.pick(arenas);
      const place = (len: number, align: number): number =>
        pickArena().alloc(len, align) ?? mainArena.alloc(len, align)!;
      const desc = place(descTableBytes(size), VIRTQ_DESC_ALIGN);
      const avail = place(availRingBytes(size), 2);
      const used = place(usedRingBytes(size), VIRTQ_USED_ALIGN);
      layout.fill(desc, descTableBytes(size), 0);
      layout.fill(avail, availRingBytes(size), 0);
      layout.fill(used, usedRingBytes(size), 0);
      const start = rng.chance(0.5) ? 0 : rng.int(0x10000);
      layout.w16(avail + VIRTQ_AVAIL_IDX, start);
      layout.w16(used + VIRTQ_USED_IDX, start);
      const hold = qp.role === "hold" ? Math.min(qp.hold ?? 8, size) : 0;
      const slots: Arena[] = [];
      for (let s = 0; s < hold; s++) {
        const g = mainArena.alloc(HOLD_SLOT_BYTES, 8)!;
        slots.push(new Arena(g, g + HOLD_SLOT_BYTES));
      }
      return {
        index,
        size,
        role: qp.role,
        hold,
        desc,
        avail,
        used,
        availIdx: start,
        lastUsed: start,
        // With stolenKicks the kick eventfd is blocking, as the back end then sees it (the flag is shared).
        kick: this.opts.stolenKicks ? eventfd(0, EFD_CLOEXEC) : eventfd(),
        call: eventfd(),
        free: Array.from({ length: size }, (_, i) => size - 1 - i),
        outstanding: new Map(),
        slots,
        freeSlots: slots.map((_, i) => i),
      };
    });
    for (const q of queues) fds.push(q.kick, q.call);

    // The set-up messages, as one batch.
    const V = VHOST_USER_VERSION;
    const ack = () => (rng.chance(0.3) ? VHOST_USER_FLAG_NEED_REPLY : 0) | V;
    c.push(R.SET_OWNER, ack());
    c.push(R.SET_FEATURES, ack(), u64Payload(features));
    if (protocol) {
      c.push(R.GET_PROTOCOL_FEATURES, V);
      c.push(R.SET_PROTOCOL_FEATURES, ack(), u64Payload(proto));
    }
    const t = layout.table();
    c.push(R.SET_MEM_TABLE, ack(), memTablePayload(t.regions), t.fds);
    for (const q of queues) {
      c.push(R.SET_VRING_NUM, ack(), vringStatePayload({ index: q.index, num: q.size }));
      c.push(
        R.SET_VRING_ADDR,
        ack(),
        vringAddrPayload({
          index: q.index,
          flags: 0,
          desc: layout.user(q.desc),
          used: layout.user(q.used),
          avail: layout.user(q.avail),
          log: 0n,
        }),
      );
      c.push(R.SET_VRING_BASE, ack(), vringStatePayload({ index: q.index, num: q.availIdx }));
      c.push(R.SET_VRING_CALL, ack(), u64Payload(BigInt(q.index)), [q.call]);
      c.push(R.SET_VRING_KICK, ack(), u64Payload(BigInt(q.index)), [q.kick]);
    }
    // Sometimes only ring 0 is enabled now; the others after a kick on it (#dataRound).
    const late = protocol && queues.length > 1 && rng.chance(0.15) ? queues.slice(1) : [];
    if (protocol) {
      for (const q of queues) {
        if (!late.includes(q)) c.push(R.SET_VRING_ENABLE, ack(), vringStatePayload({ index: q.index, num: 1 }));
      }
    }
    // A barrier: kicks may only follow once every ring is set up.
    c.push(R.GET_FEATURES, V);
    return {
      layout,
      queues,
      eventIdx,
      arenas: arenas.map((a) => new Arena(a.start + (a.end - a.start - a.free), a.end)),
      discardPfns,
      discardArea,
      late,
    };
  }

  async #dataRound(c: Conn): Promise<void> {
    const fds: number[] = [];
    this.#action = "data round set-up";
    const s = this.#setup(c, fds);
    try {
      if (!(await this.#drainOk(c, "the set-up messages"))) {
        this.finding(`the back end dropped a well-formed set-up: ${[...this.proc!.drops.keys()].at(-1)}`);
        return;
      }
      if (s.late.length > 0) {
        // Ring 0 kicked (the device starts with it), then the other rings enabled: they must be served too.
        this.#action = "rings enabled after a kick on ring 0";
        this.stats.late++;
        this.#kick(s.queues[0]);
        for (const q of s.late) {
          c.push(R.SET_VRING_ENABLE, VHOST_USER_VERSION, vringStatePayload({ index: q.index, num: 1 }));
        }
        await this.#ping(c);
      }
      const batches = this.rng.range(4, 40);
      for (let b = 0; b < batches && this.requests < this.target; b++) {
        const k = this.rng.int(1000);
        if (k < 940) {
          const q = this.#pickQueue(s);
          if (q.role === "request") await this.#requestBatch(c, s, q);
          else await this.#holdBatch(c, s, q);
          if (c.closed) return;
          if (this.profile.poke && this.rng.chance(0.2)) await this.profile.poke(this.dir, this.rng);
        } else if (k < 955) {
          this.#action = "SET_MEM_TABLE again (same table) mid-stream";
          const t = s.layout.table();
          c.push(R.SET_MEM_TABLE, VHOST_USER_VERSION | VHOST_USER_FLAG_NEED_REPLY, memTablePayload(t.regions), t.fds);
          await this.#drainOk(c, this.#action);
        } else if (k < 970) {
          await this.#restartRing(c, this.rng.pick(s.queues), fds);
        } else if (k < 985) {
          this.#action = "config read and write";
          const off = this.rng.chance(0.8) ? this.rng.int(64) : this.rng.edgy(32);
          const data = new Uint8Array(this.rng.chance(0.8) ? this.rng.range(0, 64) : this.rng.range(65, 256));
          c.push(R.GET_CONFIG, VHOST_USER_VERSION, configPayload({ offset: off, flags: 0, data }));
          if (this.rng.chance(0.3)) {
            c.push(
              R.SET_CONFIG,
              VHOST_USER_VERSION | VHOST_USER_FLAG_NEED_REPLY,
              configPayload({
                offset: this.rng.int(64),
                flags: 0,
                data: this.pool.bytes(this.rng.range(0, 16)).slice(),
              }),
            );
          }
          await this.#drainOk(c, this.#action);
        } else if (k < 988 && this.opts.stolenKicks) {
          // Signal a kick and take it back at once: the back end, woken by poll, finds nothing to read.
          this.#action = "kick signalled and read back by the front end";
          const q = this.rng.pick(s.queues);
          eventfdWrite(q.kick);
          eventfdRead(q.kick);
          await this.#ping(c);
        } else if (k < 993) {
          // Disconnect with chains in flight: kick and close at once.
          this.#action = "disconnect with chains in flight";
          const q = this.#pickQueue(s);
          if (q.role === "request") this.#fillRequests(s, q);
          eventfdWrite(q.kick);
          return;
        } else if (k < 996 && this.opts.memoryShrink) {
          // The files shrink under the back end's mappings, then a batch is kicked; this front end no
          // longer reads its memory either, and the round ends.
          this.#action = "memory files truncated under live rings, then a kick";
          const q = this.#pickQueue(s);
          if (q.role === "request") this.#fillRequests(s, q);
          for (const f of s.layout.files) libc().ftruncate(f.fd, BigInt(this.rng.int(f.size)));
          eventfdWrite(q.kick);
          await this.#ping(c);
          return;
        } else {
          this.#action = "available index beyond the queue size";
          const q = this.rng.pick(s.queues);
          s.layout.w16(q.avail + VIRTQ_AVAIL_IDX, (q.availIdx + q.size + 1 + this.rng.int(1000)) & 0xffff);
          s.layout.snapshot();
          eventfdWrite(q.kick);
          await this.#ping(c);
          this.#checkOob(s, "after an available index beyond the queue size");
          return;
        }
      }
    } finally {
      c.close();
      for (const fd of fds) closeFd(fd);
      s.layout.close();
    }
  }

  #pickQueue(s: Setup): DriverQueue {
    const req = s.queues.filter((q) => q.role === "request");
    if (req.length > 0 && this.rng.chance(0.8)) return this.rng.pick(req);
    return this.rng.pick(s.queues);
  }

  #genCtx(s: Setup): GenCtx {
    const rng = this.rng;
    return {
      rng,
      pool: this.pool,
      discardPfns: s.discardPfns,
      inMemory: (g, len) => s.layout.pieces(g, len).pieces.length > 0,
      guestRange: (len) => {
        const r = rng.pick(s.layout.regions);
        const l = Math.min(len, r.size);
        return r.guestBase + rng.int(r.size - l + 1);
      },
    };
  }

  /** Buffer space for `len` bytes with a gap before it, from `arenas` (one chosen at random, then the others). */
  #alloc(arenas: Arena[], len: number): number | undefined {
    const gap = this.rng.range(MIN_BUFFER_GAP, MAX_BUFFER_GAP);
    const first = this.rng.int(arenas.length);
    for (let i = 0; i < arenas.length; i++) {
      const a = arenas[(first + i) % arenas.length];
      if (a.alloc(gap) === undefined) continue;
      const g = a.alloc(len, this.rng.chance(0.8) ? 8 : 1);
      if (g !== undefined) return g;
    }
    return undefined;
  }

  /**
   * Write one chain of `spec` into memory: buffers from `arenas`, descriptors from `takeDescs`. A share of
   * chains is malformed (`malformed`: the probability). Returns undefined when space ran out.
   */
  #buildChain(
    s: Setup,
    q: DriverQueue,
    spec: ChainSpec,
    arenas: Arena[],
    takeDescs: (n: number) => number[] | undefined,
    malformed: number,
  ): Chain | undefined {
    const rng = this.rng;
    const layout = s.layout;
    const descs: Desc[] = [];
    for (const seg of spec.segs) {
      const len = "r" in seg ? seg.r.length : seg.w;
      const g = this.#alloc(arenas, len);
      if (g === undefined) return undefined;
      if ("r" in seg) layout.write(g, seg.r);
      descs.push({ addr: BigInt(g), len, flags: "w" in seg ? VIRTQ_DESC_F_WRITE : 0, next: 0 });
    }
    if (descs.length === 0) descs.push({ addr: 0n, len: 0, flags: 0, next: 0 });
    const kind = rng.chance(malformed)
      ? rng.pick([
        "loop",
        "next",
        "addr",
        "len",
        "zero",
        "order",
        "flags",
        "ind-len",
        "ind-addr",
        "ind-next",
        "ind-nest",
        "head",
        "dup",
      ])
      : "none";
    const end = layout.regions.at(-1)!;
    const memEnd = end.guestBase + end.size;
    const d = rng.pick(descs);
    switch (kind) {
      case "addr":
        d.addr = rng.pick([BigInt(memEnd + rng.int(1 << 20)), 1n << 63n, (1n << 64n) - 1n, BigInt(memEnd - 1)]);
        if (d.len < 2) d.len = 2;
        break;
      case "len":
        d.len = rng.pick([0xffff_ffff, 0x8000_0000]);
        break;
      case "zero":
        d.len = 0;
        break;
      case "order":
        descs[0].flags |= VIRTQ_DESC_F_WRITE;
        descs.push({ addr: descs[0].addr, len: Math.max(1, descs[0].len), flags: 0, next: 0 });
        break;
      case "flags":
        d.flags ^= VIRTQ_DESC_F_WRITE;
        break;
    }
    const indirect = kind.startsWith("ind-") ||
      (q.role === "request" && kind !== "loop" && kind !== "next" && rng.chance(0.08));
    let ring: Desc[] = descs;
    if (indirect) {
      const t = this.#alloc(arenas, descs.length * VIRTQ_DESC_SIZE);
      if (t === undefined) return undefined;
      descs.forEach((x, i) => {
        if (i < descs.length - 1) {
          x.flags |= VIRTQ_DESC_F_NEXT;
          x.next = i + 1;
        }
      });
      if (kind === "ind-nest") descs[rng.int(descs.length)].flags |= VIRTQ_DESC_F_INDIRECT;
      descs.forEach((x, i) => this.#writeDesc(layout, t + i * VIRTQ_DESC_SIZE, x));
      const top: Desc = { addr: BigInt(t), len: descs.length * VIRTQ_DESC_SIZE, flags: VIRTQ_DESC_F_INDIRECT, next: 0 };
      if (kind === "ind-len") top.len = rng.pick([0, top.len + rng.range(1, 15), top.len - 1]);
      if (kind === "ind-addr") top.addr = BigInt(memEnd + rng.int(PAGE));
      if (kind === "ind-next") top.flags |= VIRTQ_DESC_F_NEXT;
      ring = [top];
    }
    const idx = takeDescs(ring.length);
    if (!idx) return undefined;
    if (!indirect) {
      ring.forEach((x, i) => {
        if (i < ring.length - 1) {
          x.flags |= VIRTQ_DESC_F_NEXT;
          x.next = idx[i + 1];
        }
      });
      const last = ring[ring.length - 1];
      if (kind === "loop") {
        last.flags |= VIRTQ_DESC_F_NEXT;
        last.next = idx[rng.int(idx.length)];
      } else if (kind === "next") {
        last.flags |= VIRTQ_DESC_F_NEXT;
        last.next = q.size + rng.int(0x10000 - q.size);
      }
    }
    ring.forEach((x, i) => this.#writeDesc(layout, q.desc + idx[i] * VIRTQ_DESC_SIZE, x));
    // What the device may write: every writable descriptor that lies in memory, whatever else is wrong.
    const grants: [number, number][] = [...(spec.grants ?? [])];
    let writable = 0;
    for (const x of descs) {
      if (!(x.flags & VIRTQ_DESC_F_WRITE) || x.len === 0 || x.addr > BigInt(Number.MAX_SAFE_INTEGER)) continue;
      writable += x.len;
      if (layout.pieces(Number(x.addr), x.len).whole) grants.push([Number(x.addr), x.len]);
    }
    let head = idx[0];
    if (kind === "head") head = q.size + rng.int(0x10000 - q.size);
    return { head, descs: idx, grants, writable: kind === "none" ? writable : -1 };
  }

  #writeDesc(layout: Layout, at: number, d: Desc): void {
    layout.w64(at, d.addr);
    layout.w32(at + 8, d.len);
    layout.w16(at + 12, d.flags);
    layout.w16(at + 14, d.next);
  }

  /** Put chains on a request queue and publish them; returns the chains (a head twice for "dup"). */
  #fillRequests(s: Setup, q: DriverQueue): Chain[] {
    const rng = this.rng;
    for (const a of s.arenas) a.reset();
    const n = rng.chance(0.7) ? q.size : rng.range(1, q.size);
    let nextDesc = 0;
    const take = (k: number) => {
      if (nextDesc + k > q.size) return undefined;
      const out = Array.from({ length: k }, (_, i) => nextDesc + i);
      nextDesc += k;
      return out;
    };
    const chains: Chain[] = [];
    const ctx = this.#genCtx(s);
    const qp = this.profile.queues[q.index];
    for (let i = 0; i < n && chains.length < q.size; i++) {
      const ch = this.#buildChain(s, q, qp.chain(ctx), s.arenas, take, MALFORMED_SHARE);
      if (!ch) break;
      chains.push(ch);
      if (ch.writable < 0 && rng.chance(0.08) && chains.length < q.size) chains.push(ch); // the same head twice
    }
    for (const ch of chains) {
      s.layout.w16(q.avail + VIRTQ_AVAIL_RING + 2 * (q.availIdx % q.size), ch.head);
      q.availIdx = (q.availIdx + 1) & 0xffff;
    }
    // used_event (after the ring): one interrupt when the whole batch is done.
    if (s.eventIdx) s.layout.w16(q.avail + VIRTQ_AVAIL_RING + 2 * q.size, (q.availIdx - 1) & 0xffff);
    s.layout.w16(q.avail + VIRTQ_AVAIL_IDX, q.availIdx);
    return chains;
  }

  async #requestBatch(c: Conn, s: Setup, q: DriverQueue): Promise<void> {
    this.#action = `request batch on queue ${q.index}`;
    const chains = this.#fillRequests(s, q);
    if (chains.length === 0) return;
    s.layout.snapshot();
    this.#kick(q);
    await this.#ping(c);
    if (c.closed) {
      this.finding(`the back end dropped the front end after a request batch on queue ${q.index}: ${this.#lastDrop()}`);
      return;
    }
    // Every chain completes (malformed ones with length 0); asynchronous devices may take a moment.
    const deadline = performance.now() + this.hangMs;
    while (s.layout.r16(q.used + VIRTQ_USED_IDX) !== q.availIdx) {
      if (performance.now() > deadline) {
        const got = (s.layout.r16(q.used + VIRTQ_USED_IDX) - q.lastUsed) & 0xffff;
        this.gone(
          `${got} of ${chains.length} chains completed on queue ${q.index} within ${this.hangMs} ms ` +
            `(queue size ${q.size}, avail idx ${q.availIdx}, heads ${chains.map((c) => c.head).join(",")})`,
        );
      }
      if (this.proc!.exited) throw new Crash("the back end exited during a batch");
      await pollAsync([q.call], POLLIN, 20);
      eventfdRead(q.call);
    }
    const byHead = new Map(chains.map((ch) => [ch.head, ch]));
    for (let u = q.lastUsed; u !== q.availIdx; u = (u + 1) & 0xffff) {
      const e = q.used + VIRTQ_USED_RING + VIRTQ_USED_ELEM_SIZE * (u % q.size);
      const id = s.layout.r32(e);
      const len = s.layout.r32(e + 4);
      const ch = byHead.get(id);
      if (len > 0) this.stats.filled++;
      if (ch && ch.writable < 0) this.stats.malformed++;
      if (!ch) this.finding(`queue ${q.index}: used id ${id} was never made available`);
      else if (ch.writable >= 0 && len > ch.writable) {
        this.finding(`queue ${q.index}: used length ${len} beyond the chain's ${ch.writable} writable bytes`);
      }
    }
    q.lastUsed = q.availIdx;
    this.requests += chains.length;
    this.stats.chains += chains.length;
    this.#checkOob(s, `request batch on queue ${q.index}`, chains);
  }

  /** Reap completed chains of a hold queue, then post new ones up to its limit. */
  async #holdBatch(c: Conn, s: Setup, q: DriverQueue): Promise<void> {
    this.#action = `buffers on queue ${q.index}`;
    this.#reap(s, q);
    const qp = this.profile.queues[q.index];
    const ctx = this.#genCtx(s);
    const want = this.rng.range(1, Math.max(1, q.hold - q.outstanding.size));
    let posted = 0;
    for (let i = 0; i < want && q.freeSlots.length > 0; i++) {
      const slot = q.freeSlots.pop()!;
      const arena = q.slots[slot];
      arena.reset();
      const take = (k: number) => (q.free.length >= k ? q.free.splice(q.free.length - k, k) : undefined);
      const ch = this.#buildChain(s, q, qp.chain(ctx), [arena], take, 0.04);
      if (!ch) {
        q.freeSlots.push(slot);
        continue;
      }
      ch.slot = slot;
      if (ch.head >= q.size) {
        // No out-of-range heads on hold queues: the device may never look at them, and the slot would be lost.
        q.free.push(...ch.descs);
        q.freeSlots.push(slot);
        continue;
      }
      q.outstanding.set(ch.head, ch);
      s.layout.w16(q.avail + VIRTQ_AVAIL_RING + 2 * (q.availIdx % q.size), ch.head);
      q.availIdx = (q.availIdx + 1) & 0xffff;
      posted++;
    }
    if (s.eventIdx) s.layout.w16(q.avail + VIRTQ_AVAIL_RING + 2 * q.size, q.lastUsed);
    s.layout.w16(q.avail + VIRTQ_AVAIL_IDX, q.availIdx);
    s.layout.snapshot();
    this.#kick(q);
    await this.#ping(c);
    if (c.closed) {
      this.finding(`the back end dropped the front end after buffers on queue ${q.index}: ${this.#lastDrop()}`);
      return;
    }
    this.requests += posted;
    this.stats.chains += posted;
    this.#checkOob(s, `buffers on queue ${q.index}`);
  }

  #reap(s: Setup, q: DriverQueue): void {
    const usedIdx = s.layout.r16(q.used + VIRTQ_USED_IDX);
    for (; q.lastUsed !== usedIdx; q.lastUsed = (q.lastUsed + 1) & 0xffff) {
      const e = q.used + VIRTQ_USED_RING + VIRTQ_USED_ELEM_SIZE * (q.lastUsed % q.size);
      const id = s.layout.r32(e);
      const len = s.layout.r32(e + 4);
      const ch = q.outstanding.get(id);
      if (!ch) {
        this.finding(`queue ${q.index}: used id ${id} is not a chain the device holds`);
        continue;
      }
      if (ch.writable >= 0 && len > ch.writable) {
        this.finding(`queue ${q.index}: used length ${len} beyond the chain's ${ch.writable} writable bytes`);
      }
      if (len > 0) this.stats.filled++;
      q.outstanding.delete(id);
      q.free.push(...ch.descs);
      if (ch.slot !== undefined) q.freeSlots.push(ch.slot);
    }
  }

  #kick(q: DriverQueue): void {
    eventfdWrite(q.kick);
  }

  /** GET_VRING_BASE on a ring, then SET_VRING_BASE and a new kick fd to start it again. */
  async #restartRing(c: Conn, q: DriverQueue, fds: number[]): Promise<void> {
    this.#action = `stop and restart ring ${q.index}`;
    c.push(R.GET_VRING_BASE, VHOST_USER_VERSION, vringStatePayload({ index: q.index, num: 0 }));
    const replies = await this.#drainOk(c, "GET_VRING_BASE");
    if (!replies) return;
    const base = new DataView(replies[0].payload.buffer).getUint32(4, true);
    if (q.role === "request" && base !== q.availIdx) {
      this.finding(`GET_VRING_BASE of request queue ${q.index} says ${base}, the driver made ${q.availIdx} available`);
    }
    q.kick = eventfd();
    fds.push(q.kick);
    c.push(R.SET_VRING_BASE, VHOST_USER_VERSION, vringStatePayload({ index: q.index, num: base }));
    c.push(R.SET_VRING_KICK, VHOST_USER_VERSION | VHOST_USER_FLAG_NEED_REPLY, u64Payload(BigInt(q.index)), [q.kick]);
    await this.#drainOk(c, "SET_VRING_KICK after GET_VRING_BASE");
  }

  /** Compare guest memory outside the grants with what the front end left there. */
  #checkOob(s: Setup, what: string, chains: Chain[] = []): void {
    const layout = s.layout;
    const granted: Piece[] = [];
    const grant = (g: number, len: number) => granted.push(...layout.pieces(g, len).pieces);
    for (const q of s.queues) {
      grant(q.used, usedRingBytes(q.size));
      for (const ch of q.outstanding.values()) for (const [g, l] of ch.grants) grant(g, l);
    }
    for (const ch of chains) for (const [g, l] of ch.grants) grant(g, l);
    if (s.discardArea) grant(...s.discardArea);
    for (const p of granted) p.file.accept(p.off, p.len);
    // The device may still be writing granted bytes (a receive queue fills whenever the host has data):
    // a difference inside a grant is such a write, taken and looked at again.
    const isGranted = (f: SharedFile, off: number) =>
      granted.some((p) => p.file === f && off >= p.off && off < p.off + p.len);
    let bad = false;
    for (const f of layout.files) {
      for (let pass = 0; pass < 100; pass++) {
        const diff = f.diff(8);
        if (diff.length === 0) break;
        const ungranted: { off: number; len: number }[] = [];
        for (const d of diff) {
          let first = -1;
          let last = -1;
          for (let o = d.off; o < d.off + d.len; o++) {
            if (f.bytes[o] === f.shadow[o] || isGranted(f, o)) continue;
            if (first < 0) first = o;
            last = o;
          }
          if (first >= 0) ungranted.push({ off: first, len: last - first + 1 });
          f.accept(d.off, d.len);
        }
        if (ungranted.length === 0) continue;
        bad = true;
        const where = ungranted.map((d) => {
          const g = layout.guestOf(f, d.off);
          return `${d.len} bytes at ${
            g === undefined
              ? `file offset 0x${d.off.toString(16)} (unmapped)`
              : `guest 0x${g.toString(16)}${this.#describe(s, g)}`
          }` +
            ` (0x${[...f.bytes.subarray(d.off, d.off + Math.min(d.len, 8))].map((b) => b.toString(16)).join(" ")})`;
        });
        this.log(
          `${this.type}: OOB WRITE after ${what} (seed ${this.opts.seed}, request ${this.requests}, round ${this.#round}): ` +
            where.join("; "),
        );
        f.snapshot();
        break;
      }
    }
    if (bad) this.oob++;
  }

  /** What the front end keeps at guest address g, for OOB reports. */
  #describe(s: Setup, g: number): string {
    const inside = (a: number, len: number) => g >= a && g < a + len;
    for (const q of s.queues) {
      if (inside(q.desc, descTableBytes(q.size))) return ` (queue ${q.index}'s descriptor table)`;
      if (inside(q.avail, availRingBytes(q.size))) return ` (queue ${q.index}'s available ring)`;
      if (inside(q.used, usedRingBytes(q.size))) return ` (queue ${q.index}'s used ring)`;
      for (const [k, slot] of q.slots.entries()) {
        if (!inside(slot.start, slot.end - slot.start)) continue;
        const held = [...q.outstanding.values()].some((c) => c.slot === k);
        return ` (buffer slot ${k} of queue ${q.index}, ${held ? "with a chain the device holds" : "free"})`;
      }
    }
    if (s.arenas.some((a) => inside(a.start, a.end - a.start))) return " (request buffer area)";
    return " (no driver structure)";
  }

  #lastDrop(): string {
    return [...this.proc!.drops.keys()].at(-1) ?? "no reason logged";
  }

  // ---- Message rounds ----

  /** An fd of some kind the front end owns (closed at the end of the round). */
  #someFd(fds: number[]): number {
    const kind = this.rng.int(3);
    let fd: number;
    if (kind === 0) fd = eventfd();
    else if (kind === 1) {
      fd = check("memfd_create", libc().memfd_create(cstr("denovm-fuzz-junk"), MFD_CLOEXEC));
      check("ftruncate", libc().ftruncate(fd, BigInt(this.rng.pick([0, 1, PAGE, 65536]))));
    } else fd = eventfd(0, EFD_CLOEXEC);
    fds.push(fd);
    return fd;
  }

  /** One random or mutated message; `tail` when it breaks the framing (nothing may follow it). */
  #fuzzMessage(
    c: Conn,
    fds: number[],
    layout: Layout | undefined,
  ): void {
    const rng = this.rng;
    const V = VHOST_USER_VERSION;
    const codes = Object.values(R) as number[];
    let request = rng.chance(0.9) ? rng.pick(codes) : rng.chance(0.5) ? rng.range(0, 50) : rng.edgy(32);
    if (this.type === "gpu" && rng.chance(0.02)) request = VHOST_USER_GPU_SET_SOCKET;
    let flags = V | (rng.chance(0.4) ? VHOST_USER_FLAG_NEED_REPLY : 0);
    if (rng.chance(0.03)) flags = rng.chance(0.5) ? rng.edgy(32) : V | VHOST_USER_FLAG_REPLY;
    const nq = this.queueCount;
    const ringIndex = () => (rng.chance(0.9) ? rng.int(nq) : rng.edgy(32));
    const maxSize = () => {
      const qmax = this.profile.queues[0]?.max ?? 256;
      const pow = 1 << rng.int(16);
      if (!this.opts.hostileFds && pow > qmax) return qmax;
      return rng.chance(0.9) ? pow : rng.edgy(32);
    };
    let payload: Uint8Array = new Uint8Array();
    let msgFds: number[] = [];
    switch (request) {
      case R.SET_FEATURES:
      case R.SET_PROTOCOL_FEATURES:
        payload = u64Payload(rng.chance(0.5) ? this.features & rng.u64() : rng.u64());
        break;
      case R.SET_VRING_NUM:
        payload = vringStatePayload({ index: ringIndex(), num: maxSize() });
        break;
      case R.SET_VRING_BASE:
      case R.GET_VRING_BASE:
      case R.SET_VRING_ENABLE:
        payload = vringStatePayload({ index: ringIndex(), num: rng.edgy(rng.chance(0.8) ? 16 : 32) });
        break;
      case R.SET_VRING_ADDR: {
        const guestish = () => {
          if (layout && rng.chance(0.7)) {
            const r = rng.pick(layout.regions);
            return r.user + BigInt(rng.int(r.size + 64));
          }
          return rng.u64();
        };
        payload = vringAddrPayload({
          index: ringIndex(),
          flags: rng.chance(0.9) ? 0 : rng.u32(),
          desc: guestish(),
          used: guestish(),
          avail: guestish(),
          log: rng.chance(0.9) ? 0n : rng.u64(),
        });
        break;
      }
      case R.SET_VRING_KICK:
      case R.SET_VRING_CALL:
      case R.SET_VRING_ERR: {
        const noFd = rng.chance(0.2);
        payload = u64Payload(BigInt(ringIndex() & 0xff) | (noFd ? VHOST_USER_VRING_NOFD_MASK : 0n));
        const kickOk = request !== R.SET_VRING_KICK || this.opts.hostileFds;
        const n = rng.chance(0.85) ? (noFd ? 0 : 1) : rng.int(3);
        for (let i = 0; i < n; i++) {
          msgFds.push(
            kickOk ? this.#someFd(fds) : (() => {
              const fd = eventfd();
              fds.push(fd);
              return fd;
            })(),
          );
        }
        break;
      }
      case R.SET_MEM_TABLE: {
        const t = this.#fuzzTable(fds, layout);
        payload = t.payload;
        msgFds = t.fds;
        break;
      }
      case R.GET_CONFIG:
      case R.SET_CONFIG:
        payload = configPayload({
          offset: rng.chance(0.8) ? rng.int(300) : rng.edgy(32),
          flags: rng.chance(0.9) ? 0 : rng.u32(),
          data: this.pool.bytes(rng.chance(0.9) ? rng.range(0, 64) : rng.range(0, 256)).slice(),
        });
        if (rng.chance(0.1)) new DataView(payload.buffer).setUint32(4, rng.edgy(32), true); // size field lies
        break;
      case R.SET_BACKEND_REQ_FD:
        if (rng.chance(0.9)) msgFds.push(this.#someFd(fds));
        break;
      case R.SET_LOG_BASE:
      case R.SET_LOG_FD:
        payload = rng.chance(0.5) ? new Uint8Array(16) : u64Payload(rng.u64());
        if (rng.chance(0.5)) msgFds.push(this.#someFd(fds));
        break;
      case VHOST_USER_GPU_SET_SOCKET:
        if (rng.chance(0.8)) msgFds.push(this.#someFd(fds));
        break;
      default:
        if (rng.chance(0.5)) payload = this.pool.bytes(rng.chance(0.8) ? 8 : rng.range(0, 300)).slice();
    }
    // Mutations that keep the framing: a payload of the wrong size, fds where none belong.
    if (rng.chance(0.05)) payload = payload.slice(0, rng.int(payload.length + 1));
    if (rng.chance(0.05)) {
      const p = new Uint8Array(payload.length + rng.range(1, 16));
      p.set(payload);
      payload = p;
    }
    const fdsMatter = request === R.SET_MEM_TABLE || (request === R.SET_VRING_KICK && !this.opts.hostileFds);
    if (rng.chance(0.05) && msgFds.length === 0 && !fdsMatter) {
      for (let i = rng.range(1, 3); i > 0; i--) msgFds.push(this.#someFd(fds));
    }
    c.push(request, flags, payload, msgFds);
  }

  /** A memory table for the message rounds: valid, or broken in one of the ways a front end can break it. */
  #fuzzTable(fds: number[], layout: Layout | undefined): { payload: Uint8Array; fds: number[] } {
    const rng = this.rng;
    const size = rng.pick([PAGE, 3 * PAGE, 64 * 1024, 1024 * 1024]);
    const files: number[] = [];
    const mk = (sz: number) => {
      const f = check("memfd_create", libc().memfd_create(cstr("denovm-fuzz-table"), MFD_CLOEXEC));
      check("ftruncate", libc().ftruncate(f, BigInt(sz)));
      fds.push(f);
      return f;
    };
    const n = rng.chance(0.8) ? rng.range(1, 4) : rng.pick([0, 9, rng.range(1, 8)]);
    const regions: MemRegion[] = [];
    let guest = rng.pick([0, PAGE, 0x1_0000_0000]);
    for (let i = 0; i < Math.min(n, 8); i++) {
      const fd = mk(size);
      files.push(fd);
      let len = rng.range(1, size);
      let off = rng.int(size - len + 1);
      if (rng.chance(0.1)) len = 0; // a zero-sized region
      if (this.opts.memoryShrink && rng.chance(0.2)) {
        len = size + rng.range(1, 4 * PAGE); // larger than its fd
        off = rng.int(PAGE);
      }
      const base = rng.chance(0.1) && regions.length > 0 ? Number(regions[0].guestPhysAddr) + rng.int(PAGE) : guest;
      regions.push({
        // Values beyond 2^53 (the top bit set): the back end must refuse them, not map beyond the file.
        guestPhysAddr: rng.chance(0.02) ? rng.u64() : BigInt(base),
        memorySize: rng.chance(0.02) ? rng.u64() | (1n << 63n) : BigInt(len),
        userspaceAddr: layout && rng.chance(0.3) ? layout.regions[0].user : 0x7f00_0000_0000n + BigInt(i) * 0x100_0000n,
        mmapOffset: rng.chance(0.02) ? rng.u64() | (1n << 63n) : BigInt(off),
      });
      guest += len + rng.int(2 * PAGE);
    }
    if (this.opts.memoryShrink && rng.chance(0.2)) {
      // Truncate a file after the back end maps it: set up here, the truncation follows the send.
      this.#shrinkLater.push(...files);
    }
    const payload = regions.length > 0 ? memTablePayload(regions) : new Uint8Array(8);
    new DataView(payload.buffer).setUint32(0, n, true);
    let sendFds = files;
    if (rng.chance(0.1)) sendFds = files.slice(0, rng.int(files.length + 1));
    else if (rng.chance(0.05)) sendFds = [...files, mk(PAGE)];
    return { payload, fds: sendFds };
  }

  #shrinkLater: number[] = [];

  async #messageRound(c: Conn): Promise<void> {
    const rng = this.rng;
    const fds: number[] = [];
    let s: Setup | undefined;
    this.#action = "message round";
    try {
      if (rng.chance(0.5)) {
        s = this.#setup(c, fds);
        // A prefix of the valid set-up, or all of it.
        if (!(await this.#drainOk(c, "the set-up messages"))) return;
      }
      const n = rng.range(4, 48);
      for (let i = 0; i < n; i++) this.#fuzzMessage(c, fds, s?.layout);
      // Truncated or framing-breaking tail: nothing can follow it on this connection.
      const tail = rng.chance(0.1);
      if (tail) {
        const kind = rng.int(3);
        const hdr = encodeMessage(rng.pick(Object.values(R) as number[]), VHOST_USER_VERSION, this.pool.bytes(64));
        const dv = new DataView(hdr.buffer);
        if (kind === 0) c.pushRaw(hdr.subarray(0, rng.range(1, VHOST_USER_HEADER_SIZE - 1)));
        else if (kind === 1) {
          dv.setUint32(8, rng.range(65, VHOST_USER_MAX_PAYLOAD), true);
          c.pushRaw(hdr);
        } else {
          dv.setUint32(8, rng.chance(0.5) ? VHOST_USER_MAX_PAYLOAD + 1 : rng.edgy(32), true);
          c.pushRaw(hdr);
        }
      } else c.push(R.GET_FEATURES, VHOST_USER_VERSION);
      const queued = c.queued;
      this.#action = "message round: fuzz messages";
      await c.flush();
      for (const fd of this.#shrinkLater.splice(0)) libc().ftruncate(fd, 0n);
      if (tail) {
        // Replies up to the tail, then the back end waits for bytes that never come or drops us.
        const r = await c.drain(performance.now() + 200);
        this.requests += r.replies.length + 1;
        c.close();
        if (this.proc!.exited) throw new Crash("the back end exited after a truncated message");
        return;
      }
      const r = await c.drain(performance.now() + this.hangMs);
      if (r.kind === "timeout") this.gone(`no answer to a batch of ${queued} fuzz messages within ${this.hangMs} ms`);
      if (r.kind === "closed") {
        if (this.proc!.exited) throw new Crash("the back end exited during fuzz messages");
        this.requests += r.replies.length + 1;
        this.stats.messages += r.replies.length + 1;
        this.stats.drops++;
        return;
      }
      this.requests += queued;
      this.stats.messages += queued;
      // Kicks on whatever the messages left set up, then a ping.
      if (s) {
        for (const q of s.queues) eventfdWrite(q.kick);
        await this.#ping(c);
      }
    } finally {
      c.close();
      for (const fd of fds) closeFd(fd);
      s?.layout.close();
    }
  }

  /** Rings in odd places (misaligned, overlapping, straddling a region's end, outside memory), then kicks. */
  async #ringSetupRound(c: Conn): Promise<void> {
    const rng = this.rng;
    const fds: number[] = [];
    this.#action = "ring set-up round";
    const layout = this.#layout(rng.range(PAGE, 512 * 1024));
    try {
      const { features, protocol, proto } = this.#negotiate();
      c.push(R.SET_FEATURES, VHOST_USER_VERSION, u64Payload(features));
      if (protocol) c.push(R.SET_PROTOCOL_FEATURES, VHOST_USER_VERSION, u64Payload(proto));
      const t = layout.table();
      c.push(R.SET_MEM_TABLE, VHOST_USER_VERSION, memTablePayload(t.regions), t.fds);
      const used: [bigint, number][] = [];
      for (let i = 0; i < this.queueCount; i++) {
        const max = this.profile.queues[i]?.max ?? 256;
        const size = this.opts.hostileFds && rng.chance(0.1) ? max * 2 : 1 << rng.int(Math.log2(max) + 1);
        const r = rng.pick(layout.regions);
        const addr = (len: number, align: number): bigint => {
          switch (rng.int(5)) {
            case 0:
              return r.user + BigInt(r.size - rng.int(len)); // straddles the end
            case 1:
              return r.user + BigInt(rng.int(r.size)); // anywhere, any alignment
            case 2:
              return rng.u64(); // not front-end memory
            default:
              return r.user + BigInt(Math.floor(rng.int(Math.max(1, r.size - len)) / align) * align);
          }
        };
        const usedAddr = addr(usedRingBytes(size), VIRTQ_USED_ALIGN);
        used.push([usedAddr, usedRingBytes(size)]);
        const kick = eventfd();
        const call = eventfd();
        fds.push(kick, call);
        c.push(R.SET_VRING_NUM, VHOST_USER_VERSION, vringStatePayload({ index: i, num: size }));
        c.push(
          R.SET_VRING_ADDR,
          VHOST_USER_VERSION,
          vringAddrPayload({
            index: i,
            flags: 0,
            desc: addr(descTableBytes(size), VIRTQ_DESC_ALIGN),
            used: usedAddr,
            avail: addr(availRingBytes(size), 2),
            log: 0n,
          }),
        );
        c.push(R.SET_VRING_BASE, VHOST_USER_VERSION, vringStatePayload({ index: i, num: rng.edgy(16) }));
        c.push(R.SET_VRING_CALL, VHOST_USER_VERSION, u64Payload(BigInt(i)), [call]);
        c.push(R.SET_VRING_KICK, VHOST_USER_VERSION, u64Payload(BigInt(i)), [kick]);
        if (protocol) c.push(R.SET_VRING_ENABLE, VHOST_USER_VERSION, vringStatePayload({ index: i, num: 1 }));
      }
      c.push(R.GET_FEATURES, VHOST_USER_VERSION);
      layout.snapshot();
      await this.#drainOk(c, "ring set-up");
      if (c.closed) return;
      // With memoryShrink: the files shrink under the back end's mappings before the kicks (this front
      // end no longer reads them either).
      const shrink = this.opts.memoryShrink === true && rng.chance(0.5);
      if (shrink) {
        this.#action = "memory files truncated after the back end mapped them";
        for (const f of layout.files) libc().ftruncate(f.fd, BigInt(rng.int(f.size)));
      }
      for (let i = 1; i < fds.length; i += 2) eventfdWrite(fds[i - 1]);
      await this.#ping(c);
      if (c.closed || shrink) return;
      // The device may only have written its used rings (the pattern everywhere else reads as garbage
      // descriptors with addresses outside memory).
      for (const [u, len] of used) {
        for (let off = 0; off < len; off++) {
          const g = layout.userToGuest(u + BigInt(off), 1);
          if (g !== undefined) { for (const p of layout.pieces(g, 1).pieces) p.file.accept(p.off, 1); }
        }
      }
      const s: Setup = { layout, queues: [], eventIdx: false, arenas: [], discardPfns: [], late: [] };
      this.#checkOob(s, "rings set up in odd places");
    } finally {
      c.close();
      for (const fd of fds) closeFd(fd);
      layout.close();
    }
  }

  async #reconnectRound(): Promise<void> {
    const rng = this.rng;
    for (let i = rng.range(1, 4); i > 0; i--) {
      this.#action = "reconnect round";
      const c = await this.#connect();
      if (rng.chance(0.5)) {
        const m = encodeMessage(
          rng.pick([R.GET_FEATURES, R.SET_OWNER, R.SET_FEATURES]),
          VHOST_USER_VERSION,
          u64Payload(0n),
        );
        c.pushRaw(m.subarray(0, rng.range(1, m.length - 1)));
        await c.flush();
      }
      c.close();
      this.requests++;
    }
  }
}

/** Fuzz each back end type; returns each type's counts (requests/s and any reason it was skipped added). */
export async function fuzzVhostUser(opts: FuzzOptions): Promise<Record<string, FuzzResult>> {
  return await fuzzVhostUserDetailed(opts);
}

export async function fuzzVhostUserDetailed(
  options: VhostUserFuzzOptions,
): Promise<Record<string, VhostUserFuzzResult>> {
  const opts = { memoryShrink: true, hostileFds: true, stolenKicks: true, ...options };
  const log = opts.log ?? (() => {});
  const types = opts.devices ?? [...DEVICE_TYPES];
  const out: Record<string, VhostUserFuzzResult> = {};
  for (const type of types) {
    const profile = opts.profiles?.[type] ?? deviceProfile(type, opts.seed);
    if (!profile) throw new Error(`vhost-user fuzz: unknown device type "${type}" (known: ${DEVICE_TYPES.join(", ")})`);
    const dir = await Deno.makeTempDir({ prefix: `denovm-fuzz-${type}-` });
    try {
      const why = await profile.prepare?.(dir);
      if (why) {
        log(`${type}: skipped: ${why}`);
        out[type] = {
          requests: 0,
          crashes: 0,
          hangs: 0,
          oob: 0,
          rss_growth_mb: 0,
          requests_per_s: 0,
          seconds: 0,
          skipped: why,
        };
        continue;
      }
      const f = new TypeFuzzer(type, profile, { ...opts, log }, dir);
      out[type] = await f.run();
      log(`${type}: ${JSON.stringify(out[type])}`);
    } finally {
      await profile.cleanup?.(dir);
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  }
  return out;
}

if (import.meta.main) {
  const arg = (name: string) => Deno.args.find((a) => a.startsWith(`--${name}=`))?.split("=")[1];
  const res = await fuzzVhostUserDetailed({
    requestsPerDevice: Number(arg("requests") ?? 1_000_000),
    seed: Number(arg("seed") ?? 1),
    devices: arg("devices")?.split(","),
    memoryShrink: !Deno.args.includes("--no-memory-shrink"),
    hostileFds: !Deno.args.includes("--no-hostile-fds"),
    stolenKicks: !Deno.args.includes("--no-stolen-kicks"),
    stderrFile: arg("stderr-file"),
    hangMs: arg("hang-ms") ? Number(arg("hang-ms")) : undefined,
    log: (l) => console.error(l),
  });
  console.log(JSON.stringify({ bench: "fuzz_vhost_user", results: res }));
}
