// KVM integration tests of VM snapshots (SNAPSHOT.md): a guest booted, snapshotted with the library's
// `vm.snapshot(path)` or `denovm snapshot take PATH SOCKET`, and restored with `Vm.restore(path, overrides)` or
// `denovm run --restore PATH`, must go on exactly where it was. The guests (test/guests/) tell from inside:
//   ticker       PIT interrupts through the IOAPIC: "TICK n" lines (the in-kernel PIT and IOAPIC restored);
//   smp_beat     4 vCPUs started by INIT/SIPI, each counting its own LAPIC timer interrupts on its own stack
//                with its own marker register (every vCPU's registers and LAPIC restored, none restarted);
//   virtio_wait  virtio-blk and virtio-console set up once, a round of I/O on each COM1 'g' (the transports,
//                queues and interrupts restored);
//   mempattern   4 MiB filled from a seed, checksummed on 'c', refilled on 'w' (guest memory restored, clones
//                copy-on-write).
// Then crosvm's own check (a restored VM snapshotted again before it runs gives the same snapshot), and bad
// snapshots through the CLI (one line, exit 1; a configuration that does not match, exit 35; nothing written).
//
// The tests of the guests themselves run wherever /dev/kvm exists. The snapshot tests also need the snapshot
// code: `snapshotsImplemented` is probed once below (restoreMachine of an empty directory: "not implemented
// yet" means absent, any other refusal means present). One test always runs: the new guests idle in
// "sti; hlt" (test/kvm/boot_test.ts disassembles every guest for instructions the emulator lacks).

import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { buildGuest } from "../guests/build.ts";
import { PML4_START } from "../../vmm/arch/layout.ts";
import type { BlockConfig, SerialConfig } from "../../vmm/config.ts";
import { readSnapshot } from "../../vmm/snapshot/format.ts";
import { KVM_PIT_CHANNEL_STATE_SIZE, PIT_CHANNEL_COUNT_LOAD_TIME, PIT_STATE2_CHANNELS } from "../../ffi/kvm.ts";
import { EXIT_HOST_ERROR, EXIT_INVALID_ARGS, EXIT_SUCCESS } from "../../core/exit.ts";
import { type BootConfig, type RestoreConfig, Vm } from "../../mod.ts";
import { within as withinMs } from "../support/within.ts";
import { withTempDir } from "../support/temp_dir.ts";
import { assertCliOk, assertOneLineRefusal, denovm, denovmArgs, REPO_ROOT } from "../support/cli.ts";

const kvmAvailable = existsSync("/dev/kvm");
if (!kvmAvailable) console.log("kvm_snapshot_test: guest tests skipped: no /dev/kvm");

const snapshotIgnore = !kvmAvailable;

/** Hang protection only: no assertion depends on how fast anything is. */
const GUEST_TIMEOUT_MS = 120_000;
/** A socket file is served shortly after `denovm run` starts. */
const SOCKET_WAIT_MS = 60_000;

const within = <T>(p: Promise<T>, what: () => string): Promise<T> => withinMs(p, what, GUEST_TIMEOUT_MS);
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

// ---- The snapshot API, as SNAPSHOT.md names it ----

/** `await vm.snapshot(path, opts)`. */
function snapshot(vm: Vm, path: string, opts?: { resume?: boolean }): Promise<void> {
  return within(vm.snapshot(path, opts), () => `vm.snapshot(${path}) did not settle`);
}

/** `Vm.restore(path, overrides)`: a started VM whose console log starts empty. */
function restore(path: string, overrides: RestoreConfig = {}): Promise<Vm> {
  return within(
    Vm.restore(path, { debugExit: true, ...overrides }),
    () => `Vm.restore(${path}) did not settle`,
  );
}

/** The snapshot's saved parts (vmm/snapshot/format.ts). */
function readSnapshotData(dir: string): Record<string, unknown> {
  return readSnapshot(dir) as unknown as Record<string, unknown>;
}

// ---- Running guests ----

async function boot(guest: string, opts: Omit<BootConfig, "kernel"> = {}): Promise<Vm> {
  const kernel = await buildGuest(guest);
  return await Vm.boot({ kernel, debugExit: true, params: [], memMiB: 64, cpus: 1, ...opts });
}

/** Waits for `pattern` in output printed at or after console offset `from`. */
function waitFor(vm: Vm, pattern: RegExp, from: number): Promise<RegExpExecArray> {
  return vm.console.waitFor(pattern, { from, timeout: GUEST_TIMEOUT_MS });
}

/** Types `key` on COM1 and waits for `pattern` in what the guest prints after it. */
function command(vm: Vm, key: string, pattern: RegExp): Promise<RegExpExecArray> {
  const from = vm.console.text.length;
  vm.send(key);
  return waitFor(vm, pattern, from);
}

/** 'q': the guest prints BYE and powers off, exit code 0. */
async function quit(vm: Vm, what: string): Promise<void> {
  await command(vm, "q", /^BYE\r?\n/m);
  const code = await within(vm.exitCode, () => `${what} did not power off after 'q'`);
  assert.equal(code, EXIT_SUCCESS, `${what}: exit ${code} (${vm.exitReason})\n${vm.console.text}`);
}

/** The names of this file's temporary directories start so. */
const TEMP_PREFIX = "denovm-snap-test-";

// ---- ticker ----

const TICK_LINE = /^TICK (\d+)\r?\n/m;

/** The highest complete TICK line in `text` (0 if none). */
function lastTick(text: string): number {
  let n = 0;
  for (const m of text.matchAll(new RegExp(TICK_LINE.source, "gm"))) n = Math.max(n, Number(m[1]));
  return n;
}

// ---- smp_beat ----

interface Beat {
  cpu: number;
  n: number;
  bad: number;
  cr3: number;
}
const SMP_CPUS = 4;

/** Types 'b' and parses the report: one BEAT line per CPU, then BEATS cpus=N. */
async function beats(vm: Vm, cpus: number): Promise<Beat[]> {
  const from = vm.console.text.length;
  vm.send("b");
  const end = await waitFor(vm, /^BEATS cpus=(\d+)\r?\n/m, from);
  assert.equal(Number(end[1]), cpus, vm.console.text.slice(from));
  const report = vm.console.text.slice(from, end.index);
  const found = [...report.matchAll(/^BEAT cpu=(\d+) n=(\d+) bad=(\d+) cr3=0x([0-9a-f]+)\r?$/gm)].map((m) => ({
    cpu: Number(m[1]),
    n: Number(m[2]),
    bad: Number(m[3]),
    cr3: parseInt(m[4], 16),
  }));
  assert.equal(found.length, cpus, `one BEAT line per CPU in:\n${report}`);
  assert.equal(new Set(found.map((b) => b.cpu)).size, cpus, `distinct APIC ids in:\n${report}`);
  for (const b of found) {
    assert.equal(b.bad, 0, `CPU ${b.cpu} was interrupted off its own stack or marker:\n${report}`);
    assert.equal(b.cr3, PML4_START, `CPU ${b.cpu}'s CR3:\n${report}`);
  }
  return found;
}

/** Every CPU of `later` counted at least (`strictly`: more than) it did in `earlier`. */
function assertCounting(earlier: Beat[], later: Beat[], strictly: boolean, what: string): void {
  assert.deepEqual(later.map((b) => b.cpu), earlier.map((b) => b.cpu), `${what}: the same CPUs`);
  for (const [i, b] of later.entries()) {
    const before = earlier[i].n;
    assert.ok(
      strictly ? b.n > before : b.n >= before,
      `${what}: CPU ${b.cpu} at ${b.n} beats, ${strictly ? "not past" : "below"} ${before}`,
    );
  }
}

// ---- mempattern ----

const MEM_WORDS = (4 * 1024 * 1024) / 8; // mempattern.c MEM_MIB
const SEED_MUL = 0x9e3779b97f4a7c15n;
const WORD_MUL = 0xbf58476d1ce4e5b9n;
const FNV64_OFFSET = 0xcbf29ce484222325n;
const FNV64_PRIME = 0x100000001b3n;
const MASK64 = (1n << 64n) - 1n;

/** The checksum mempattern.c prints after filling with `seed`, as 16 hex digits. */
function expectedMemSum(seed: number): string {
  const base = (BigInt(seed) * SEED_MUL) & MASK64;
  let step = 0n, h = FNV64_OFFSET;
  for (let i = 0; i < MEM_WORDS; i++) {
    step = (step + WORD_MUL) & MASK64;
    h = ((h ^ base ^ step) * FNV64_PRIME) & MASK64;
  }
  return h.toString(16).padStart(16, "0");
}

const MEM_FILL = /^MEM fill seed=(\d+) mib=4 sum=([0-9a-f]{16})\r?\n/m;
const MEM_CHECK = /^MEM check seed=(\d+) sum=([0-9a-f]{16})\r?\n/m;

/** 'c': the checksum of what the guest's memory holds now. */
async function memCheck(vm: Vm): Promise<{ seed: number; sum: string }> {
  const m = await command(vm, "c", MEM_CHECK);
  return { seed: Number(m[1]), sum: m[2] };
}

// ---- virtio_wait ----

const SECTOR_SIZE = 512;
const DISK_SIZE = 64 * 1024;

/** Sector `round` as virtio_wait.c writes it in that round. */
function roundSector(round: number): Uint8Array {
  return Uint8Array.from(
    { length: SECTOR_SIZE },
    (_, i) => i < 4 ? (round >>> (8 * i)) & 0xff : (i * 13 + round * 29 + 0x3c) & 0xff,
  );
}

/** COM1 as the library's console, and a virtio-console port writing to `path`. */
function consoleSerials(path: string): SerialConfig[] {
  return [
    { type: "sink", hardware: "serial", num: 1, console: true, earlycon: false, stdin: false },
    { type: "file", hardware: "virtio-console", num: 1, path, console: false, earlycon: false, stdin: false },
  ];
}

function disk(path: string): BlockConfig {
  return { path, ro: false, root: false, sparse: true, blockSize: 512, direct: false };
}

const ROUND_LINE = (r: number) => new RegExp(`^ROUND ${r} blk=ok prev=(ok|none) console=ok\\r?\\n`, "m");

async function sectorOf(path: string, sector: number): Promise<Uint8Array> {
  const image = await Deno.readFile(path);
  return image.subarray(sector * SECTOR_SIZE, (sector + 1) * SECTOR_SIZE);
}

// ---- Snapshot files ----

/** SHA-256 of every file under `dir` (relative path → hex), or null when `dir` does not exist. */
async function hashTree(dir: string): Promise<Record<string, string> | null> {
  if (!existsSync(dir)) return null;
  const out: Record<string, string> = {};
  const walk = async (sub: string) => {
    for await (const e of Deno.readDir(join(dir, sub))) {
      const rel = join(sub, e.name);
      if (e.isDirectory) await walk(rel);
      else {
        const digest = await crypto.subtle.digest("SHA-256", await Deno.readFile(join(dir, rel)));
        out[rel] = [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
      }
    }
  };
  await walk("");
  return out;
}

async function copyDir(from: string, to: string): Promise<void> {
  await Deno.mkdir(to);
  for await (const e of Deno.readDir(from)) {
    assert.ok(e.isFile, `${from}/${e.name}: the snapshot holds files only`);
    await Deno.copyFile(join(from, e.name), join(to, e.name));
  }
}

/**
 * Hyper-V's clocks (Hyper-V TLFS), which KVM lists among the MSRs to save where it emulates Hyper-V (kvm_amd,
 * kvm_intel): the partition reference counter (HV_X64_MSR_TIME_REF_COUNT) and the vCPU's run time
 * (HV_X64_MSR_VP_RUNTIME), both in 100 ns units.
 */
const HV_TIME_REF_COUNT = 0x40000020;
const HV_VP_RUNTIME = 0x40000010;
/**
 * MSRs whose values are clocks (they move between two saves of the same state): IA32_TSC (0x10), IA32_TSC_ADJUST
 * (0x3b), IA32_TSC_DEADLINE (0x6e0), IA32_MPERF/APERF (0xe7, 0xe8) (Intel SDM vol. 4); kvm-clock's wall clock and
 * system time, old (0x11, 0x12) and new (0x4b564d00, 0x4b564d01) (Linux Documentation/virt/kvm/x86/msr.rst);
 * Hyper-V's reference counter and vCPU run time.
 */
const CLOCK_MSRS = new Set([
  0x10,
  0x3b,
  0x6e0,
  0xe7,
  0xe8,
  0x11,
  0x12,
  0x4b564d00,
  0x4b564d01,
  HV_TIME_REF_COUNT,
  HV_VP_RUNTIME,
]);
/** Fields that hold a clock or a time stamp (the KVM clock, a PIT channel's count_load_time, TSC fields). */
const CLOCK_FIELD = /clock|tsc|time/i;

/** An MSR record ([index, value] or {index, value|data}) or a key that names an MSR ("16", "0x10") whose value is a clock. */
function isClockMsr(key: string, value: unknown): boolean {
  // kvm-vcpu records hold MSRs as [index, "0x..."] pairs (vmm/kvm/vcpu_state.ts).
  if (Array.isArray(value) && value.length === 2 && typeof value[0] === "number") return CLOCK_MSRS.has(value[0]);
  if (value && typeof value === "object" && "index" in value) return CLOCK_MSRS.has(Number(value.index));
  return /^(0x[0-9a-f]+|\d+)$/i.test(key) && CLOCK_MSRS.has(Number(key));
}

/** Three PIT channels (linux/asm/kvm.h struct kvm_pit_state2). */
const PIT_CHANNELS = 3;
/** kvm_pit_channel_state.count_load_time is an s64 ktime. */
const PIT_LOAD_TIME_BYTES = 8;

/** struct kvm_pit_state2 with each channel's count_load_time (a host clock reading) zeroed. */
function withoutPitLoadTimes(pit: ArrayBufferView): Uint8Array {
  const out = new Uint8Array(pit.buffer.slice(pit.byteOffset, pit.byteOffset + pit.byteLength));
  for (let ch = 0; ch < PIT_CHANNELS; ch++) {
    const at = PIT_STATE2_CHANNELS + ch * KVM_PIT_CHANNEL_STATE_SIZE + PIT_CHANNEL_COUNT_LOAD_TIME;
    out.fill(0, at, at + PIT_LOAD_TIME_BYTES);
  }
  return out;
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !ArrayBuffer.isView(v) && !Array.isArray(v);
}

/**
 * The first difference between two decoded state values, as "path: a vs b", ignoring clock fields and clock
 * MSRs; undefined when equal.
 */
function firstDifference(a: unknown, b: unknown, path: string): string | undefined {
  if (path === "vm.data.pit" && ArrayBuffer.isView(a) && ArrayBuffer.isView(b)) {
    return firstDifference(withoutPitLoadTimes(a), withoutPitLoadTimes(b), `${path} (load times aside)`);
  }
  const show = (v: unknown) =>
    typeof v === "bigint" ? `${v}n` : ArrayBuffer.isView(v) ? `<${v.byteLength} bytes>` : JSON.stringify(v);
  if (ArrayBuffer.isView(a) && ArrayBuffer.isView(b)) {
    const x = new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
    const y = new Uint8Array(b.buffer, b.byteOffset, b.byteLength);
    if (x.length !== y.length) return `${path}: ${x.length} bytes vs ${y.length} bytes`;
    const i = x.findIndex((v, k) => v !== y[k]);
    return i < 0 ? undefined : `${path}[byte ${i}]: 0x${x[i].toString(16)} vs 0x${y[i].toString(16)}`;
  }
  if (Array.isArray(a) && Array.isArray(b)) {
    if (a.length !== b.length) return `${path}: ${a.length} entries vs ${b.length}`;
    for (let i = 0; i < a.length; i++) {
      if (isClockMsr(String(i), a[i])) continue;
      const msr = Array.isArray(a[i]) && typeof a[i][0] === "number" ? ` (MSR 0x${a[i][0].toString(16)})` : "";
      const d = firstDifference(a[i], b[i], `${path}[${i}]${msr}`);
      if (d) return d;
    }
    return undefined;
  }
  if (isPlainObject(a) && isPlainObject(b)) {
    const keys = [...new Set([...Object.keys(a), ...Object.keys(b)])].sort();
    for (const k of keys) {
      if (!(k in a) || !(k in b)) return `${path}.${k}: only in ${k in a ? "the first" : "the second"}`;
      if (CLOCK_FIELD.test(k) || isClockMsr(k, a[k])) continue;
      const d = firstDifference(a[k], b[k], `${path}.${k}`);
      if (d) return d;
    }
    return undefined;
  }
  return Object.is(a, b) ? undefined : `${path}: ${show(a)} vs ${show(b)}`;
}

function hexBytes(hex: string): Uint8Array {
  assert.match(hex, /^[0-9a-f]{32}$/i, `a VM generation ID: ${hex}`);
  return Uint8Array.from({ length: 16 }, (_, i) => parseInt(hex.slice(2 * i, 2 * i + 2), 16));
}

function indexOfBytes(hay: Uint8Array, needle: Uint8Array): number {
  outer: for (
    let i = hay.indexOf(needle[0]);
    i >= 0 && i <= hay.length - needle.length;
    i = hay.indexOf(needle[0], i + 1)
  ) {
    for (let k = 1; k < needle.length; k++) if (hay[i + k] !== needle[k]) continue outer;
    return i;
  }
  return -1;
}

interface MemoryRegion {
  guestBase: number;
  size: number;
  fileOffset: number;
}

/** The guest-physical address of memory-file offset `off`. */
function guestAddress(regions: MemoryRegion[], off: number): string {
  const r = regions.find((r) => off >= r.fileOffset && off < r.fileOffset + r.size);
  return r ? `0x${(r.guestBase + off - r.fileOffset).toString(16)}` : `file offset ${off} (in no region)`;
}

/**
 * crosvm's snapshot check: two snapshots of one guest state are the same. Memory files byte-equal (apart from
 * the VM generation ID, which each restore renews: at the first snapshot's ID's place the second holds its
 * own), the memory layout, devices and vCPUs equal apart from clocks. Fails naming the first difference.
 */
async function assertSameSnapshot(first: string, second: string): Promise<void> {
  const a = readSnapshotData(first);
  const b = readSnapshotData(second);
  for (const key of ["memory", "vm", "vcpus", "devices"]) {
    assert.ok(key in a && key in b, `both snapshots have "${key}"`);
    // Each snapshot writes its own memory file (format.ts): only the name may differ.
    const field = (v: unknown) => key === "memory" ? { ...v as object, file: undefined } : v;
    const d = firstDifference(field(a[key]), field(b[key]), key);
    assert.equal(d, undefined, `the snapshots differ at ${d}`);
  }
  const config = firstDifference({ ...a.config as object, socket: undefined }, {
    ...b.config as object,
    socket: undefined,
  }, "config");
  assert.equal(config, undefined, `the snapshots' configurations differ at ${config}`);

  const memA = await Deno.readFile(String(a.memoryPath));
  const memB = await Deno.readFile(String(b.memoryPath));
  assert.equal(memB.length, memA.length, "memory file sizes");
  const regions = (a.memory as { regions: MemoryRegion[] }).regions;
  const genA = hexBytes(String(a.vmgenid)), genB = hexBytes(String(b.vmgenid));
  const at = indexOfBytes(memA, genA);
  if (at >= 0) {
    assert.deepEqual(
      memB.subarray(at, at + genA.length),
      genB,
      `at ${guestAddress(regions, at)} the second snapshot's memory holds its own VM generation ID`,
    );
    memB.set(genA, at); // the one place allowed to differ
  }
  const diff = memA.findIndex((v, i) => v !== memB[i]);
  assert.equal(
    diff,
    -1,
    diff < 0 ? "" : `memory differs first at guest address ${guestAddress(regions, diff)}: ` +
      `0x${memA[diff].toString(16)} vs 0x${memB[diff].toString(16)}`,
  );
}

/** `denovm run ARGS` in the background, with its control socket `sock` served. */
async function runInBackground(sock: string, ...args: string[]): Promise<Deno.ChildProcess> {
  const child = new Deno.Command(Deno.execPath(), {
    args: denovmArgs(["run", "-s", sock, ...args]),
    cwd: REPO_ROOT,
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const deadline = Date.now() + SOCKET_WAIT_MS;
  while (!existsSync(sock)) {
    if (Date.now() > deadline) {
      child.kill("SIGKILL");
      const out = await child.output();
      assert.fail(`denovm run ${args.join(" ")}: no control socket; stderr:\n${new TextDecoder().decode(out.stderr)}`);
    }
    await sleep(20);
  }
  return child;
}

// ---- The guests on their own (no snapshot) ----

Deno.test({
  name: "kvm: snapshot guests: smp_beat's 4 CPUs each count their own LAPIC timer beats, on their own stack and marker",
  ignore: !kvmAvailable,
  async fn() {
    await using vm = await boot("smp_beat", { cpus: SMP_CPUS });
    await waitFor(vm, new RegExp(`^SMPBEAT cpus=${SMP_CPUS} hz=\\d+\\r?\\n`, "m"), 0);
    const first = await beats(vm, SMP_CPUS);
    for (const b of first) assert.ok(b.n > 0, `CPU ${b.cpu} took no beat yet`);
    await sleep(500);
    const second = await beats(vm, SMP_CPUS);
    assertCounting(first, second, true, "half a second later");
    await quit(vm, "smp_beat");
  },
});

Deno.test({
  name: "kvm: snapshot guests: mempattern prints the checksum the host computes, 'c' repeats it, 'w' refills",
  ignore: !kvmAvailable,
  async fn() {
    await using vm = await boot("mempattern");
    const fill = await waitFor(vm, MEM_FILL, 0);
    assert.deepEqual([fill[1], fill[2]], ["1", expectedMemSum(1)], vm.console.text);
    assert.deepEqual(await memCheck(vm), { seed: 1, sum: expectedMemSum(1) });
    const refill = await command(vm, "w", MEM_FILL);
    assert.deepEqual([refill[1], refill[2]], ["2", expectedMemSum(2)], vm.console.text);
    assert.notEqual(expectedMemSum(2), expectedMemSum(1));
    assert.deepEqual(await memCheck(vm), { seed: 2, sum: expectedMemSum(2) });
    await quit(vm, "mempattern");
  },
});

Deno.test({
  name: "kvm: snapshot guests: virtio_wait does a block and console round at start and another on each 'g'",
  ignore: !kvmAvailable,
  async fn() {
    await withTempDir(TEMP_PREFIX, async (dir) => {
      const image = join(dir, "disk.img");
      const out = join(dir, "console.out");
      await Deno.writeFile(image, new Uint8Array(DISK_SIZE));
      await using vm = await boot("virtio_wait", { blocks: [disk(image)], serials: consoleSerials(out), rng: false });
      assert.equal((await waitFor(vm, ROUND_LINE(1), 0))[1], "none");
      await waitFor(vm, /^READY\r?\n/m, 0);
      assert.equal((await command(vm, "g", ROUND_LINE(2)))[1], "ok", "round 2 read round 1's sector back");
      assert.equal((await command(vm, "g", ROUND_LINE(3)))[1], "ok");
      for (const r of [1, 2, 3]) assert.deepEqual(await sectorOf(image, r), roundSector(r), `sector ${r}`);
      assert.ok((await sectorOf(image, 4)).every((b) => b === 0), "sector 4 untouched");
      await quit(vm, "virtio_wait");
      assert.equal(await Deno.readTextFile(out), "virtio round 1\nvirtio round 2\nvirtio round 3\n");
    });
  },
});

/** Instructions that make a halting idle loop (the guests must not spin while they wait). */
const IDLE_LOOP = /\bsti\b\s*\n[^\n]*\bhlt\b/;

Deno.test('snapshot guests build and idle in "sti; hlt" (every CPU of smp_beat too)', async () => {
  for (
    const [name, fns] of Object.entries({
      smp_beat: ["guest_main", "ap_main"],
      mempattern: ["guest_main"],
      virtio_wait: ["guest_main"],
      ticker: ["guest_main"],
    })
  ) {
    const path = await buildGuest(name);
    const out = await new Deno.Command("objdump", { args: ["-d", "--no-show-raw-insn", path], stdout: "piped" })
      .output();
    assert.ok(out.success, `objdump -d ${path}`);
    const asm = new TextDecoder().decode(out.stdout);
    for (const fn of fns) {
      const body = asm.split(`<${fn}>:`)[1]?.split(/\n\n/)[0];
      assert.ok(body, `${name}: no ${fn}`);
      assert.match(body, IDLE_LOOP, `${name}: ${fn} idles in "sti; hlt"`);
    }
  }
});

// ---- Snapshots ----

/** A test named "kvm: snapshot: `name`", ignored without KVM, whose `body` gets a new temporary directory. */
function snapshotTest(name: string, body: (dir: string) => Promise<void>): void {
  Deno.test({ name: `kvm: snapshot: ${name}`, ignore: snapshotIgnore, fn: () => withTempDir(TEMP_PREFIX, body) });
}

/** A snapshot of the mempattern guest once it has filled its memory, in `snap`; the guest then quits. */
async function mempatternSnapshot(snap: string): Promise<void> {
  await using vm = await boot("mempattern");
  await waitFor(vm, MEM_FILL, 0);
  await snapshot(vm, snap);
  await quit(vm, "mempattern");
}

snapshotTest(
  "a ticker clone goes on from the snapshot's tick, takes timer interrupts; the original too",
  async (dir) => {
    const snap = join(dir, "snap");
    await using vm = await boot("ticker");
    await waitFor(vm, /^TICK 5\r?\n/m, 0);
    const before = lastTick(vm.console.text);
    await snapshot(vm, snap);
    const atSnapshot = lastTick(vm.console.text);

    await using clone = await restore(snap);
    const first = Number((await waitFor(clone, TICK_LINE, 0))[1]);
    assert.ok(
      first > before && first <= atSnapshot + 5,
      `the clone's first TICK is ${first}; the original was at ${before} before the snapshot, ${atSnapshot} after`,
    );
    assert.doesNotMatch(clone.console.text, /TICKER pin=/, "the clone did not boot again");
    await waitFor(clone, new RegExp(`^TICK ${first + 4}\\r?\\n`, "m"), 0);
    const original = vm.console.text.length;
    await waitFor(vm, new RegExp(`^TICK ${lastTick(vm.console.text) + 2}\\r?\\n`, "m"), original);
    await quit(clone, "ticker clone");
    await quit(vm, "ticker original");
  },
);

snapshotTest("an smp_beat clone's 4 vCPUs all go on counting from the snapshot, each on its own stack", async (dir) => {
  const snap = join(dir, "snap");
  await using vm = await boot("smp_beat", { cpus: SMP_CPUS });
  await waitFor(vm, new RegExp(`^SMPBEAT cpus=${SMP_CPUS} `, "m"), 0);
  const beforeSnapshot = await beats(vm, SMP_CPUS);
  for (const b of beforeSnapshot) assert.ok(b.n > 0, `CPU ${b.cpu} not counting yet`);
  await snapshot(vm, snap);

  await using clone = await restore(snap);
  const restored = await beats(clone, SMP_CPUS);
  assertCounting(beforeSnapshot, restored, false, "the clone's first report");
  assert.doesNotMatch(clone.console.text, /SMPBEAT/, "the clone did not boot again");
  await sleep(500);
  assertCounting(restored, await beats(clone, SMP_CPUS), true, "the clone half a second later");
  assertCounting(beforeSnapshot, await beats(vm, SMP_CPUS), true, "the original after the snapshot");
  await quit(clone, "smp_beat clone");
  await quit(vm, "smp_beat original");
});

snapshotTest(
  "a virtio_wait clone on its own disk copy does round 2: sector written and read, console message",
  async (dir) => {
    const snap = join(dir, "snap");
    const image = join(dir, "disk.img");
    const copy = join(dir, "clone.img");
    const out = join(dir, "console.out");
    const cloneOut = join(dir, "clone-console.out");
    await Deno.writeFile(image, new Uint8Array(DISK_SIZE));
    await using vm = await boot("virtio_wait", { blocks: [disk(image)], serials: consoleSerials(out), rng: false });
    await waitFor(vm, /^READY\r?\n/m, 0);
    await snapshot(vm, snap);
    await Deno.copyFile(image, copy);

    // The original still holds its image: a clone on the same one is refused.
    await assert.rejects(restore(snap), /in use/, "a second VM writing the original's image");

    await using clone = await restore(snap, { blocks: [disk(copy)], serials: consoleSerials(cloneOut) });
    assert.equal((await command(clone, "g", ROUND_LINE(2)))[1], "ok", "round 2 read round 1's sector back");
    assert.deepEqual(await sectorOf(copy, 2), roundSector(2), "the clone's disk holds round 2's sector");
    assert.deepEqual(await sectorOf(copy, 1), roundSector(1), "and round 1's");
    assert.equal(await Deno.readTextFile(cloneOut), "virtio round 2\n", "the clone's virtio-console output");
    assert.ok((await sectorOf(image, 2)).every((b) => b === 0), "the original's image has no round 2");
    assert.doesNotMatch(clone.console.text, /ROUND 1 /, "the clone did not boot again");

    // The original goes on with its own round 2.
    assert.equal((await command(vm, "g", ROUND_LINE(2)))[1], "ok");
    assert.deepEqual(await sectorOf(image, 2), roundSector(2));
    await quit(clone, "virtio_wait clone");
    await quit(vm, "virtio_wait original");
    assert.equal(await Deno.readTextFile(out), "virtio round 1\nvirtio round 2\n");
  },
);

snapshotTest("two mempattern clones see the snapshot's memory, and neither sees the other's writes", async (dir) => {
  const snap = join(dir, "snap");
  const sum1 = expectedMemSum(1);
  await using vm = await boot("mempattern");
  assert.equal((await waitFor(vm, MEM_FILL, 0))[2], sum1);
  await snapshot(vm, snap);

  // Both clones run at once, from the one memory file.
  await using a = await restore(snap);
  await using b = await restore(snap);
  assert.deepEqual(await memCheck(a), { seed: 1, sum: sum1 }, "clone a");
  assert.deepEqual(await memCheck(b), { seed: 1, sum: sum1 }, "clone b");
  const refill = await command(a, "w", MEM_FILL);
  assert.deepEqual([refill[1], refill[2]], ["2", expectedMemSum(2)], "clone a refilled");
  assert.deepEqual(await memCheck(a), { seed: 2, sum: expectedMemSum(2) }, "clone a after its write");
  assert.deepEqual(await memCheck(b), { seed: 1, sum: sum1 }, "clone b does not see clone a's write");
  assert.deepEqual(await memCheck(vm), { seed: 1, sum: sum1 }, "nor does the original");
  await quit(a, "clone a");
  await quit(b, "clone b");
  await quit(vm, "mempattern original");
});

snapshotTest(
  "restored suspended and snapshotted again (CLI), the two snapshots are the same but for clocks",
  async (dir) => {
    const first = join(dir, "first");
    const second = join(dir, "second");
    const sock = join(dir, "vm.sock");
    await mempatternSnapshot(first);
    const child = await runInBackground(sock, "--restore", first, "--suspended");
    try {
      assertCliOk(await denovm("snapshot", "take", second, sock), "denovm snapshot take");
      assertCliOk(await denovm("stop", sock), "denovm stop");
      const status = await within(child.status, () => "denovm run --restore did not stop");
      assert.equal(status.code, EXIT_SUCCESS);
    } finally {
      try {
        child.kill("SIGKILL");
      } catch {
        // already ended
      }
      await child.stderr.cancel().catch(() => {});
    }
    await assertSameSnapshot(first, second);
  },
);

snapshotTest(
  "`run --restore` of a truncated, corrupted or missing snapshot: exit 1, one line; --mem mismatch: exit 35; nothing written",
  async (dir) => {
    const snap = join(dir, "snap");
    const kernel = await buildGuest("mempattern");
    await mempatternSnapshot(snap);
    const truncated = join(dir, "truncated");
    await copyDir(snap, truncated);
    const state = await Deno.readFile(join(truncated, "state"));
    await Deno.truncate(join(truncated, "state"), Math.floor(state.length / 2));
    const corrupted = join(dir, "corrupted");
    await copyDir(snap, corrupted);
    state[Math.floor(state.length * 3 / 4)] ^= 0x5a; // in the body, past the header: the checksum fails
    await Deno.writeFile(join(corrupted, "state"), state);
    const shortMemory = join(dir, "short-memory");
    await copyDir(snap, shortMemory);
    const shortMemoryFile = String((await readSnapshotData(shortMemory)).memoryPath);
    const memSize = (await Deno.stat(shortMemoryFile)).size;
    await Deno.truncate(shortMemoryFile, Math.floor(memSize / 2));
    const missing = join(dir, "missing");

    const dirs = [snap, truncated, corrupted, shortMemory, missing];
    const before = await Promise.all(dirs.map(hashTree));
    // Each refusal names the file it could not use (SNAPSHOT.md: "one line naming the file and the problem").
    const cases: [string, string, string][] = [
      ["truncated state", truncated, join(truncated, "state")],
      ["corrupted state", corrupted, join(corrupted, "state")],
      ["memory file shorter than the snapshot says", shortMemory, shortMemoryFile],
      ["missing directory", missing, missing],
    ];
    for (const [what, path, named] of cases) {
      const r = await denovm("run", "--restore", path);
      assertOneLineRefusal(r, EXIT_HOST_ERROR, new RegExp(RegExp.escape(named)), what);
      assert.equal(r.stdout, "", `${what}: the guest never ran`);
    }
    const mem = await denovm("run", "--restore", snap, "--mem", "512", "--cpus", "1", kernel);
    assertOneLineRefusal(mem, EXIT_INVALID_ARGS, /--mem/, "--mem 512 against a 64 MiB snapshot");
    assert.equal(mem.stdout, "");
    assert.deepEqual(await Promise.all(dirs.map(hashTree)), before, "the snapshot directories are unchanged");
  },
);
