// Shared helpers of the benchmarks in bench/ (files starting with "_" are not benchmarks).
// Each benchmark prints progress on stderr and one JSON object as its last stdout line.

import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { layoutHeader } from "../test/guests/build.ts";
import { KERNEL_START } from "../vmm/arch/layout.ts";
import { hostKind } from "../vmm/kvm/host.ts";
import type { BootConfig } from "../mod.ts";
import { exists } from "../test/support/guest_process.ts";

export const REPO_ROOT: string = join(dirname(fileURLToPath(import.meta.url)), "..");
export const BENCH_DIR: string = join(REPO_ROOT, "bench");

/** ${DENOVM_CACHE:-<repo>/.cache}/bench: compiled benchmark guests and programs. */
export function benchCacheDir(): string {
  return join(Deno.env.get("DENOVM_CACHE") ?? join(REPO_ROOT, ".cache"), "bench");
}

export { exists };

// What runs guests here (vmm/kvm/host.ts), asked when needed: asking binds this process's C library,
// which a benchmark that loads the fake KVM (exit_overhead.ts) must do only after setting DENOVM_LIBC.
/** This host has a KVM device that opens. */
export function hasKvm(): boolean {
  return hostKind() !== "none";
}
/** The host's KVM is kvm_pvm: guest kernel code is emulated, so kernels boot slowly and may stop early. */
export function kvmPvm(): boolean {
  return hostKind() === "kvm_pvm";
}

/** Print the benchmark's result line (the last stdout line, which bench/run.ts reports). */
export function result(bench: string, fields: Record<string, unknown>): void {
  console.log(JSON.stringify({ bench, ...fields }));
}

/** What `host` says in results measured in the nested KVM host (scripts/nested-kvm.sh). */
export const NESTED_HOST = "nested: kvm_amd in QEMU TCG's emulated SVM";

/**
 * vCPUs of the nested host benchmarks run in: BENCH_NESTED_CPUS, else two where this machine has two
 * cores or more. A VMM's threads (its main loop, its vCPU threads, a JIT's compiler threads) run side
 * by side on any real host; with one vCPU the nested host would run them one after the other, which
 * penalises a multi-threaded VMM for something no real host does. The nested KVM tests keep one
 * (scripts/nested-kvm.sh says why).
 */
function nestedCpus(needs: KvmNeeds = {}): number {
  const asked = Number(Deno.env.get("BENCH_NESTED_CPUS"));
  if (Number.isInteger(asked) && asked > 0) return asked;
  return needs.oneNestedCpu ? 1 : Math.min(2, navigator.hardwareConcurrency);
}

/** What a benchmark needs of the host's KVM beyond /dev/kvm. */
export interface KvmNeeds {
  /**
   * Why the benchmark cannot measure on a kvm_pvm host (its reference, QEMU with KVM, prints nothing
   * there; a Linux kernel's guest code is emulated): on such a host both sides run in the nested KVM host.
   */
  notOnKvmPvm?: string;
  /**
   * Run the nested host with one vCPU (unless BENCH_NESTED_CPUS says otherwise): a Linux guest of a
   * nested host with two vCPUs triple-faults now and then (about one boot in three, seen at different
   * points of its boot and of its I/O; with one vCPU none in the same runs), a fault of QEMU's emulation.
   */
  oneNestedCpu?: boolean;
}

/**
 * When /dev/kvm is missing, or it is kvm_pvm and the benchmark says (`needs.notOnKvmPvm`) it cannot
 * measure there: run this benchmark (`script`, its import.meta.url) in the nested KVM host and print its
 * result with `"host"` and `"nested_reason"` saying so, then end the process. With DENOVM_NESTED=off or
 * without QEMU, a host without /dev/kvm prints the skip line (and ends), a kvm_pvm host runs the benchmark
 * here. Both sides of each ratio run in the same nested host, so the ratio compares like with like;
 * absolute times are TCG's.
 */
export async function skipWithoutKvm(bench: string, script: string, needs: KvmNeeds = {}): Promise<void> {
  const pvmReason = hasKvm() && kvmPvm() ? needs.notOnKvmPvm : undefined;
  if (hasKvm() && !pvmReason) return;
  const qemu = (Deno.env.get("PATH") ?? "").split(":").some((d) => d && exists(`${d}/qemu-system-x86_64`));
  if (Deno.env.get("DENOVM_NESTED") === "off" || !qemu) {
    if (pvmReason) {
      progress(bench, `kvm_pvm host: ${pvmReason}; the nested host is off or has no QEMU: measuring here`);
      return;
    }
    result(bench, { skipped: "no /dev/kvm" });
    Deno.exit(0);
  }
  const reason = pvmReason ? `kvm_pvm host: ${pvmReason}` : "no /dev/kvm";
  progress(bench, `${reason}: running in the nested KVM host (${NESTED_HOST}); slow`);
  const out = await new Deno.Command("bash", {
    args: [
      join(REPO_ROOT, "scripts/nested-kvm.sh"),
      ...["--cpus", String(nestedCpus(needs))],
      "--",
      Deno.execPath(),
      "run",
      "--allow-all",
      fileURLToPath(script),
    ],
    stdin: "null",
    stdout: "piped",
    stderr: "inherit",
  }).output();
  const lines = new TextDecoder().decode(out.stdout).split("\n");
  const last = lines.map((l) => l.trim()).filter((l) => l.startsWith("{")).at(-1);
  let inner: Record<string, unknown> | undefined;
  try {
    inner = last ? JSON.parse(last) : undefined;
  } catch {
    inner = undefined;
  }
  if (!out.success || !inner) {
    console.error(lines.slice(-30).join("\n"));
    result(bench, { error: `the nested run failed (exit ${out.code})` });
    Deno.exit(1);
  }
  console.log(JSON.stringify({ ...inner, host: NESTED_HOST, nested_reason: reason, nested_cpus: nestedCpus(needs) }));
  Deno.exit(0);
}

export function progress(bench: string, message: string): void {
  console.error(`${bench}: ${message}`);
}

export function median(values: number[]): number {
  const s = [...values].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
}

/**
 * Runs the phases `repeats` times, each phase's commands one after the other through `exec` and timed from
 * here around them; reports every phase's times in one progress line and returns each phase's median (ms).
 */
export async function timedPhases<K extends string>(
  bench: string,
  label: string,
  repeats: number,
  phases: Record<K, string[]>,
  exec: (cmd: string) => Promise<unknown>,
): Promise<Record<K, number>> {
  const names = Object.keys(phases) as K[];
  const times = new Map<K, number[]>(names.map((n) => [n, []]));
  for (let i = 0; i < repeats; i++) {
    for (const n of names) {
      const t0 = performance.now();
      for (const cmd of phases[n]) await exec(cmd);
      times.get(n)!.push(performance.now() - t0);
    }
  }
  const shown = names.map((n) => `${n} ${times.get(n)!.map((t) => t.toFixed(0)).join(", ")} ms`);
  progress(bench, `${label}: ${shown.join("; ")}`);
  return Object.fromEntries(names.map((n) => [n, median(times.get(n)!)])) as Record<K, number>;
}

/** Run a command to completion; throws with its output if it fails. */
export async function run(cmd: string, args: string[], env?: Record<string, string>): Promise<string> {
  const out = await new Deno.Command(cmd, { args, env, stdin: "null", stdout: "piped", stderr: "piped" }).output();
  const text = new TextDecoder().decode(out.stdout);
  if (!out.success) {
    throw new Error(`${cmd} ${args.join(" ")} failed (exit ${out.code}): ${new TextDecoder().decode(out.stderr)}`);
  }
  return text;
}

/** Write vmm/arch/layout.ts as a C header (test/guests/build.ts's generator) into `dir`; returns `dir`. */
export async function writeLayoutHeader(dir: string): Promise<string> {
  await Deno.mkdir(dir, { recursive: true });
  const path = join(dir, "layout.h");
  const text = layoutHeader();
  if (!exists(path) || (await Deno.readTextFile(path)) !== text) await Deno.writeTextFile(path, text);
  return dir;
}

export interface SpawnedOutput {
  child: Deno.ChildProcess;
  /** Milliseconds from spawn to the first byte on the watched stream (rejects if it ends first). */
  firstByteMs: Promise<number>;
  /** Resolves when the watched stream's accumulated text matches `re`. */
  waitFor(re: RegExp): Promise<void>;
  /** The watched stream's text so far. */
  text(): string;
}

export interface SpawnTimedOptions {
  /** The stream to time and accumulate (default stdout); the other one is discarded. */
  stream?: "stdout" | "stderr";
  /** Extra environment variables. */
  env?: Record<string, string>;
}

/** Spawn a process and time the first byte of its stdout (or stderr); the text is kept for waitFor. */
export function spawnTimed(cmd: string, args: string[], opts: SpawnTimedOptions = {}): SpawnedOutput {
  const watched = opts.stream ?? "stdout";
  const t0 = performance.now();
  const child = new Deno.Command(cmd, {
    args,
    env: opts.env,
    stdin: "null",
    stdout: watched === "stdout" ? "piped" : "null",
    stderr: watched === "stderr" ? "piped" : "null",
  }).spawn();
  let text = "";
  const waiters: { re: RegExp; resolve: () => void }[] = [];
  let firstResolve!: (ms: number) => void;
  let firstReject!: (e: Error) => void;
  const firstByteMs = new Promise<number>((res, rej) => {
    firstResolve = res;
    firstReject = rej;
  });
  firstByteMs.catch(() => {});
  (async () => {
    const decoder = new TextDecoder();
    let first = true;
    for await (const chunk of child[watched]) {
      if (first && chunk.length > 0) {
        first = false;
        firstResolve(performance.now() - t0);
      }
      text += decoder.decode(chunk, { stream: true });
      for (const w of [...waiters]) {
        if (w.re.test(text)) {
          waiters.splice(waiters.indexOf(w), 1);
          w.resolve();
        }
      }
    }
    if (first) firstReject(new Error(`${cmd} wrote nothing on ${watched}`));
  })();
  return {
    child,
    firstByteMs,
    waitFor: (re) => re.test(text) ? Promise.resolve() : new Promise((resolve) => waiters.push({ re, resolve })),
    text: () => text,
  };
}

/** Kill a child process started by this benchmark and reap it. */
export async function killChild(child: Deno.ChildProcess): Promise<void> {
  try {
    child.kill("SIGKILL");
  } catch {
    // already gone
  }
  await child.status;
}

/** The Debian kernel folder (scripts/debian-kernel.sh prints it last). */
export async function debianKernelDir(): Promise<string> {
  return (await run("bash", [join(REPO_ROOT, "scripts/debian-kernel.sh")])).trim().split("\n").pop()!;
}

/**
 * Builds one of the benchmarks' freestanding guests (bench/guest/<source>, linked by
 * bench/guest/<linkerScript> at KERNEL_START, with layout.h from `dir`) as `dir`/`name`; `defines`
 * become -DNAME=VALUE. Returns the ELF's path.
 */
export async function buildLoopGuest(
  dir: string,
  source: string,
  name: string,
  defines: Record<string, string | number>,
  linkerScript = "exit_loop.ld",
): Promise<string> {
  const out = join(dir, name);
  await run("gcc", [
    ...["-nostdlib", "-static", "-no-pie", "-fno-pic", `-I${dir}`],
    ...["-Wl,--build-id=none", "-Wl,-z,noexecstack", "-Wl,-z,max-page-size=4096"],
    `-Wl,--defsym=KERNEL_START=0x${KERNEL_START.toString(16)}`,
    ...["-T", join(BENCH_DIR, "guest", linkerScript)],
    ...Object.entries(defines).map(([k, v]) => `-D${k}=${v}`),
    "-o",
    out,
    join(BENCH_DIR, "guest", source),
  ]);
  return out;
}

/** Compiles bench/c/<name>.c (a C KVM loop, with layout.h from `dir`) to `dir`/<name>; returns its path. */
export async function buildBenchC(dir: string, name: string): Promise<string> {
  const out = join(dir, name);
  await run("gcc", ["-O2", "-Wall", "-Werror", `-I${dir}`, "-o", out, join(BENCH_DIR, "c", `${name}.c`)]);
  return out;
}

/** Milliseconds from Vm.boot to the VM's end for `kernel`, a guest that takes the debug exit by itself. */
export async function denovmRunMs(
  kernel: string,
  extra: Omit<BootConfig, "kernel"> = {},
): Promise<number> {
  const { Vm } = await import("../mod.ts");
  const t0 = performance.now();
  const vm = await Vm.boot({ kernel, params: [], memMiB: 64, cpus: 1, debugExit: true, ...extra });
  const code = await vm.exitCode;
  const ms = performance.now() - t0;
  if (code !== 0) throw new Error(`guest ${kernel} ended with exit code ${code}: ${vm.exitReason}`);
  return ms;
}

/**
 * Nanoseconds per loop iteration under denovm: after one warm-up run (module loading, worker
 * start-up), the median run time of `loopGuest` minus that of `emptyGuest` (the same guest with 0
 * iterations) over `repeats` runs each, divided by `loops`.
 */
export async function denovmNsPerLoop(
  emptyGuest: string,
  loopGuest: string,
  loops: number,
  repeats: number,
  extra: Omit<BootConfig, "kernel"> = {},
): Promise<number> {
  await denovmRunMs(emptyGuest, extra);
  const base: number[] = [];
  const full: number[] = [];
  for (let i = 0; i < repeats; i++) {
    base.push(await denovmRunMs(emptyGuest, extra));
    full.push(await denovmRunMs(loopGuest, extra));
  }
  return ((median(full) - median(base)) * 1e6) / loops;
}

/**
 * Builds bench/guest/ticker.S (linked by ticker.ld) as `dir`/ticker-<fillMiB>-<periodUs>.elf: it writes
 * "!" to COM1 at once, fills `fillMiB` MiB of RAM from 32 MiB with a non-zero pattern, then writes "."
 * every `periodUs` microseconds from the local APIC timer, halting in between. One ELF both VMMs boot
 * (denovm's 64-bit entry, QEMU's PVH entry). Returns its path.
 */
export function buildTickerGuest(dir: string, fillMiB: number, periodUs: number): Promise<string> {
  return buildLoopGuest(
    dir,
    "ticker.S",
    `ticker-${fillMiB}-${periodUs}.elf`,
    { FILL_MIB: fillMiB, PERIOD_US: periodUs },
    "ticker.ld",
  );
}

/** The ticker guest's first byte (at entry) and its byte per timer tick (bench/guest/ticker.S). */
export const TICKER_START_BYTE = "!";
export const TICKER_TICK_BYTE = ".";
/** The ticker guest's output once it ticks. */
export const TICKER_TICK = new RegExp(`\\${TICKER_TICK_BYTE}`);

/** Resident and proportional set size of a process (or "self"), in KiB (proc(5): /proc/<pid>/smaps_rollup). */
export async function smapsRollupKiB(pid: number | "self"): Promise<{ rss: number; pss: number }> {
  const text = await Deno.readTextFile(`/proc/${pid}/smaps_rollup`);
  const field = (name: string) => Number(text.match(new RegExp(`^${name}:\\s+(\\d+) kB`, "m"))?.[1] ?? NaN);
  return { rss: field("Rss"), pss: field("Pss") };
}

/** `promise`, or a rejection naming `what` after `ms` milliseconds. */
export async function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no ${what} within ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** A benchmark side's outcome: a number, or why it has none. */
export type Measured = number | { error: string };

/** `fn`'s number, or its failure as `{ error }` (logged with `label`): a side that fails reports null. */
export async function measured(bench: string, label: string, fn: () => Promise<number>): Promise<Measured> {
  try {
    return await fn();
  } catch (e) {
    const message = (e instanceof Error ? e.message : String(e)).trim();
    progress(bench, `${label}: ${message}`);
    return { error: message };
  }
}

/** A Measured as a result field: the number rounded to `digits` decimals, or null. */
export function measuredField(v: Measured, digits = 1): number | null {
  return typeof v === "number" ? Number(v.toFixed(digits)) : null;
}

/** The `errors` field of a result: each failed side's message by name (empty when none failed). */
export function measuredErrors(sides: Record<string, Measured>): Record<string, unknown> {
  const errors = Object.fromEntries(
    Object.entries(sides).filter(([, v]) => typeof v !== "number").map(([k, v]) => [k, (v as { error: string }).error]),
  );
  return Object.keys(errors).length ? { errors } : {};
}

/** a / b to three decimals, or null when either side failed. */
export function measuredRatio(a: Measured, b: Measured): number | null {
  return typeof a === "number" && typeof b === "number" ? Number((a / b).toFixed(3)) : null;
}

/** The arguments for `Deno.execPath()` that run `denovm ARGS...` (main.ts with every permission). */
export function denovmCliArgs(args: string[]): string[] {
  return ["run", "--allow-all", join(REPO_ROOT, "main.ts"), ...args];
}

/** `denovm snapshot take DIR SOCKET` (crosvm's syntax) of the VM serving `socket`; throws with denovm's own message. */
export async function denovmSnapshotTake(dir: string, socket: string): Promise<void> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: denovmCliArgs(["snapshot", "take", dir, socket]),
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).output();
  if (!out.success) {
    const why = new TextDecoder().decode(out.stderr).trim().split("\n").at(-1) ?? "";
    throw new Error(`denovm snapshot take: exit ${out.code}: ${why}`);
  }
}

/**
 * `guest` (the ticker) booted with `denovm run --mem MEMMIB -s SOCKET` (the socket in `work`), left to tick
 * (within `timeoutMs`), then `denovm snapshot take`n into `dir`; the VM's process is killed after.
 */
export async function denovmTickerSnapshot(
  guest: string,
  memMiB: number,
  dir: string,
  work: string,
  timeoutMs: number,
): Promise<void> {
  const sock = join(work, "denovm.sock");
  const p = spawnTimed(Deno.execPath(), denovmCliArgs(["run", "--mem", String(memMiB), "-s", sock, guest]));
  try {
    await within(p.waitFor(TICKER_TICK), timeoutMs, "tick from the snapshot's source VM");
    await denovmSnapshotTake(dir, sock);
  } finally {
    await killChild(p.child);
  }
}

/** The last line of a benchmark child's stdout that is a JSON object (its result), if any. */
export function lastJsonLine(stdout: Uint8Array): string | undefined {
  return new TextDecoder().decode(stdout).trim().split("\n").filter((l) => l.startsWith("{")).at(-1);
}
