// User-mode Linux as a test front end for vhost-user devices: a UML kernel boots as an ordinary
// process, connects to vhost-user sockets given as `virtio_uml.device=SOCKET:VIRTIO_ID`
// (Linux arch/um/drivers/virtio_uml.c) and drives them with the real Linux drivers. The initramfs
// is built at test time: busybox-static, the kernel modules a test names (with their modules.dep
// dependencies) and a generated /init that runs the test's shell commands and powers the machine off.
//
// Which UML: Debian's /usr/bin/linux.uml (bookworm: 6.1), except on hosts where it cannot run user
// processes (an XSAVE area larger than it handles, e.g. AMX: see UML_FP_REGS_FAILURE). There
// scripts/uml-sid.sh (run by scripts/setup.sh) unpacks Debian sid's UML under $DENOVM_CACHE/uml-sid,
// and that one is used whenever it is present. Without it such a host skips the UML tests, naming why.
//
// Facts this relies on (checked with UML 6.1 and 7.2): UML boots an initramfs to /init in about
// 1.5 s; `con=null con0=fd:0,fd:1` puts the console on stdout; `poweroff -f` ends the process with
// status 0; UML keeps its RAM in a file under TMPDIR. virtio_uml connects once at boot and does not
// reconnect: when the back end goes away the device is unregistered.

import {
  BUSYBOX,
  busyboxBaseEntries,
  busyboxInitScript,
  type ConsoleExit,
  ConsoleProcess,
  cpioNewc,
  exists,
  initCommandStatus,
  S_IFREG,
} from "./guest_process.ts";

export { BUSYBOX, cpioNewc };

const REPO_ROOT = new URL("../../", import.meta.url).pathname;

/** Debian's UML kernel (package user-mode-linux) and where its modules live. */
export const SYSTEM_UML_BINARY = "/usr/bin/linux.uml";
export const SYSTEM_UML_MODULES_ROOT = "/usr/lib/uml/modules";

function cacheRoot(): string {
  return Deno.env.get("DENOVM_CACHE") ?? `${REPO_ROOT}.cache`;
}

/** Where built initramfs archives (and the system UML's probe verdict) are cached. */
export function umlCacheDir(): string {
  return `${cacheRoot()}/uml`;
}

/**
 * The newer UML scripts/uml-sid.sh unpacks (Debian sid's user-mode-linux with its own loader and
 * libc), which it prepares only on hosts where the system's UML cannot run user processes.
 */
export function sidUmlDir(): string {
  return `${cacheRoot()}/uml-sid`;
}

/** A UML kernel binary and its module root. */
export interface UmlInstall {
  binary: string;
  modulesRoot: string;
  /** "sid" for the one under sidUmlDir(), "system" for Debian's installed package. */
  source: "sid" | "system";
}

/** The UML the tests run: the one scripts/uml-sid.sh prepared when it is there, else the system's. */
export function umlInstall(): UmlInstall {
  const root = `${sidUmlDir()}/root`;
  const binary = `${root}/usr/bin/linux.uml`;
  if (exists(`${sidUmlDir()}/version`) && exists(binary)) {
    return { binary, modulesRoot: `${root}/usr/lib/uml/modules`, source: "sid" };
  }
  return { binary: SYSTEM_UML_BINARY, modulesRoot: SYSTEM_UML_MODULES_ROOT, source: "system" };
}

/** The UML kernel's module directory version (e.g. "6.1.176"), or undefined. */
export function umlKernelVersion(): string | undefined {
  try {
    return [...Deno.readDirSync(umlInstall().modulesRoot)].filter((e) => e.isDirectory).map((e) => e.name).sort()
      .at(-1);
  } catch {
    return undefined;
  }
}

/**
 * What UML prints when the host kernel refuses its FPU register buffer: UML passes a buffer of a
 * size fixed at build time to ptrace(PTRACE_SETREGSET, NT_X86_XSTATE), and the host takes only its
 * whole user XSAVE area, which AMX tile data makes larger than UML 6.1 (and 6.12) allow for.
 */
export const UML_FP_REGS_FAILURE = "ptrace set fp regs failed";

/** Why UML tests cannot run here, or undefined when they can. */
export function umlUnavailableReason(): string | undefined {
  if (Deno.build.os !== "linux" || Deno.build.arch !== "x86_64") return "user-mode Linux needs x86_64 Linux";
  const uml = umlInstall();
  if (!exists(uml.binary)) return `${uml.binary} missing (apt-get install user-mode-linux)`;
  if (!exists(BUSYBOX)) return `${BUSYBOX} missing (apt-get install busybox-static)`;
  const version = umlKernelVersion();
  if (!version) return `no modules under ${uml.modulesRoot} (apt-get install user-mode-linux)`;
  if (uml.source === "system" && systemUmlHitsFpRegsLimit(uml.binary)) {
    return `user-mode Linux ${version} cannot run on this host: ${UML_FP_REGS_FAILURE} ` +
      "(XSAVE area larger than UML supports, e.g. AMX); scripts/uml-sid.sh prepares a newer UML that can";
  }
  return undefined;
}

let probeVerdict: boolean | undefined;

/**
 * Whether the system UML fails on this host with UML_FP_REGS_FAILURE: one boot of a busybox
 * initramfs per process, its verdict kept in umlCacheDir() under a key of the binary, the host
 * kernel release and the CPU flags. Only that failure counts: a boot that fails any other way is
 * reported as runnable, so the tests run and fail on it.
 */
function systemUmlHitsFpRegsLimit(binary: string): boolean {
  if (probeVerdict !== undefined) return probeVerdict;
  const st = Deno.statSync(binary);
  const flags = /^flags\s*:(.*)$/m.exec(readTextOr("/proc/cpuinfo", ""))?.[1]?.trim() ?? "";
  const key = fnv1a64(JSON.stringify([binary, st.size, st.mtime?.getTime(), Deno.osRelease(), flags]));
  const file = `${umlCacheDir()}/probe-${key}.txt`;
  const cached = readTextOr(file, "").trim();
  if (cached === "ok" || cached === "fp-regs") return probeVerdict = cached === "fp-regs";

  const tmpdir = Deno.makeTempDirSync({ prefix: "denovm-uml-probe-" });
  let verdict: "ok" | "fp-regs" | undefined;
  try {
    const initrd = `${tmpdir}/probe.cpio`;
    Deno.writeFileSync(
      initrd,
      cpioNewc([
        ...busyboxBaseEntries(["bin", "dev", "proc", "sys"]),
        { name: "init", mode: S_IFREG | 0o755, data: new TextEncoder().encode(initScript([], "true")) },
      ]),
    );
    // coreutils timeout signals its whole process group, so UML's child processes go with it.
    const out = new Deno.Command("timeout", {
      args: [
        "-s",
        "KILL",
        String(PROBE_GUARD_S),
        binary,
        "mem=64M",
        `initrd=${initrd}`,
        "con=null",
        "con0=fd:0,fd:1",
        "quiet",
      ],
      stdin: "null",
      env: { TMPDIR: tmpdir },
    }).outputSync();
    const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
    if (initCommandStatus(text, UML_MARK_END) === 0) verdict = "ok";
    else if (text.includes(UML_FP_REGS_FAILURE)) verdict = "fp-regs";
  } finally {
    Deno.removeSync(tmpdir, { recursive: true });
  }
  if (verdict) {
    try {
      Deno.mkdirSync(umlCacheDir(), { recursive: true });
      Deno.writeTextFileSync(file, `${verdict}\n`);
    } catch {
      // an unwritable cache only costs the next process another probe
    }
  }
  return probeVerdict = verdict === "fp-regs";
}

/** Hang guard of the probe boot, in seconds (a boot takes about 1.5 s). */
const PROBE_GUARD_S = 60;

function readTextOr(path: string, fallback: string): string {
  try {
    return Deno.readTextFileSync(path);
  } catch {
    return fallback;
  }
}

/** FNV-1a, 64-bit (a cache key, not a security hash): 16 hex digits. */
function fnv1a64(s: string): string {
  const FNV_OFFSET_BASIS = 0xcbf29ce484222325n;
  const FNV_PRIME = 0x100000001b3n;
  let h = FNV_OFFSET_BASIS;
  for (const b of new TextEncoder().encode(s)) h = BigInt.asUintN(64, (h ^ BigInt(b)) * FNV_PRIME);
  return h.toString(16).padStart(16, "0");
}

// ---- Modules ----

/** Module files (relative to the module dir) for `names`, dependencies first (from modules.dep). */
export function resolveModules(version: string, names: string[]): string[] {
  const dir = `${umlInstall().modulesRoot}/${version}`;
  const deps = new Map<string, string[]>();
  for (const line of Deno.readTextFileSync(`${dir}/modules.dep`).split("\n")) {
    const colon = line.indexOf(":");
    if (colon < 0) continue;
    deps.set(line.slice(0, colon), line.slice(colon + 1).trim().split(/\s+/).filter(Boolean));
  }
  const norm = (s: string) => s.replaceAll("-", "_");
  const byName = new Map<string, string>();
  for (const path of deps.keys()) byName.set(norm(path.split("/").pop()!.replace(/\.ko(\.\w+)?$/, "")), path);
  const order: string[] = [];
  const visit = (path: string) => {
    if (order.includes(path)) return;
    for (const d of deps.get(path) ?? []) visit(d);
    order.push(path);
  };
  for (const n of names) {
    const path = byName.get(norm(n));
    if (!path) throw new Error(`module ${n} not found in ${dir}/modules.dep (built in, or not packaged?)`);
    visit(path);
  }
  return order;
}

/** Base initramfs: busybox, directories, /dev/console and the modules (cached by content key). */
async function baseInitramfs(version: string, modules: string[]): Promise<Uint8Array> {
  const bb = Deno.statSync(BUSYBOX);
  const modulesRoot = umlInstall().modulesRoot;
  const key = await sha256Hex(JSON.stringify({ modulesRoot, version, modules, bb: [bb.size, bb.mtime?.getTime()] }));
  const cached = `${umlCacheDir()}/base-${key.slice(0, 16)}.cpio`;
  try {
    return Deno.readFileSync(cached);
  } catch {
    // build below
  }
  for (const m of modules) {
    if (/\.ko\.\w+$/.test(m)) throw new Error(`compressed module ${m}: not supported by this helper`);
  }
  const entries = busyboxBaseEntries(
    ["bin", "dev", "proc", "sys", "mnt", "tmp", "lib", "lib/modules"],
    modules.map((m) => `${modulesRoot}/${version}/${m}`),
  );
  const archive = cpioNewc(entries);
  Deno.mkdirSync(umlCacheDir(), { recursive: true });
  const tmp = `${cached}.${Deno.pid}.tmp`;
  Deno.writeFileSync(tmp, archive);
  Deno.renameSync(tmp, cached);
  return archive;
}

async function sha256Hex(s: string): Promise<string> {
  const d = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(s));
  return [...new Uint8Array(d)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/** Markers the generated /init prints. */
export const UML_MARK_START = "UML-INIT-START";
export const UML_MARK_END = "UML-INIT-END";

/**
 * A /init script: busybox applets, /proc, /sys, /dev, then the modules (dependencies first),
 * then `commands` (a shell fragment), then the end marker with the fragment's exit status,
 * then power off.
 */
export function initScript(moduleFiles: string[], commands: string): string {
  return busyboxInitScript(moduleFiles, commands, UML_MARK_START, UML_MARK_END);
}

export interface InitramfsOptions {
  /** Module names to load at boot (e.g. "virtio_blk"); dependencies are added. */
  modules: string[];
  /** Shell commands /init runs (busybox sh, `set -e`). */
  commands: string;
  /**
   * Extra regular files for this run (e.g. a static test program as "bin/vsock-echo"), added after
   * the base archive. Their directory must exist in the base (bin, lib, tmp, mnt...). Mode 0755 unless given.
   */
  files?: { path: string; data: Uint8Array; mode?: number }[];
}

/** Build an initramfs file for one run; returns its path (a temp file the caller may delete). */
export async function buildInitramfs(opts: InitramfsOptions): Promise<string> {
  const version = umlKernelVersion();
  if (!version) throw new Error(`no UML modules under ${umlInstall().modulesRoot}`);
  const mods = resolveModules(version, opts.modules);
  const base = await baseInitramfs(version, mods);
  // The kernel unpacks concatenated archives in order: the base, then this run's /init.
  const init = cpioNewc([
    { name: "init", mode: S_IFREG | 0o755, data: new TextEncoder().encode(initScript(mods, opts.commands)) },
    ...(opts.files ?? []).map((f) => ({
      name: f.path.replace(/^\/+/, ""),
      mode: S_IFREG | (f.mode ?? 0o755),
      data: f.data,
    })),
  ]);
  const path = await Deno.makeTempFile({ prefix: "denovm-uml-", suffix: ".cpio" });
  const out = new Uint8Array(base.length + init.length);
  out.set(base);
  out.set(init, base.length);
  await Deno.writeFile(path, out);
  return path;
}

// ---- Running UML ----

export interface UmlOptions {
  initramfs: string;
  /** vhost-user devices: the socket a back end listens on and the virtio device ID (2 = block). */
  vhostUser?: { socket: string; deviceId: number }[];
  /** Guest RAM in MiB (default 128). */
  memMiB?: number;
  /** Extra kernel command-line words. */
  cmdline?: string[];
  /** Kill the machine if it has not powered off after this long (a hang guard, default 120 s). */
  hangGuardMs?: number;
}

export interface UmlResult extends ConsoleExit {
  /** Exit status of the test commands, from the end marker, or undefined when /init did not get there. */
  commandStatus?: number;
}

/** A running UML machine. */
export class UmlMachine {
  readonly #proc: ConsoleProcess;
  readonly #done: Promise<UmlResult>;

  private constructor(child: Deno.ChildProcess, tmpdir: string, hangGuardMs: number) {
    this.#proc = new ConsoleProcess(child, {
      label: "UML",
      hangGuardMs,
      kill: killUml,
      afterExit: () => Deno.remove(tmpdir, { recursive: true }).catch(() => {}),
    });
    this.#done = this.#proc.done.then((r) => ({ ...r, commandStatus: initCommandStatus(r.output, UML_MARK_END) }));
  }

  /** Boot a machine. */
  static async start(opts: UmlOptions): Promise<UmlMachine> {
    const tmpdir = await Deno.makeTempDir({ prefix: "denovm-uml-tmp-" });
    const args = [
      `mem=${opts.memMiB ?? 128}M`,
      `initrd=${opts.initramfs}`,
      "con=null",
      "con0=fd:0,fd:1",
      "quiet",
      ...(opts.vhostUser ?? []).map((d) => `virtio_uml.device=${d.socket}:${d.deviceId}`),
      ...(opts.cmdline ?? []),
    ];
    const child = new Deno.Command(umlInstall().binary, {
      args,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
      // UML keeps guest RAM in a file it creates under TMPDIR.
      env: { TMPDIR: tmpdir },
    }).spawn();
    return new UmlMachine(child, tmpdir, opts.hangGuardMs ?? 120_000);
  }

  get output(): string {
    return this.#proc.output;
  }

  /** Resolves when the console output matches `re` (or rejects if the machine exits first). */
  waitFor(re: RegExp): Promise<void> {
    return this.#proc.waitFor(re);
  }

  /** Resolves with the result once the machine has exited. */
  wait(): Promise<UmlResult> {
    return this.#done;
  }

  /** Kill the machine (SIGKILL to its process group; see killUml). */
  kill(): void {
    this.#proc.kill();
  }
}

/**
 * SIGKILL a UML machine. UML runs guest processes as host child processes that outlive a killed
 * parent, and it leads its own process group: the whole group is killed.
 */
function killUml(child: Deno.ChildProcess): void {
  const pid = child.pid;
  try {
    // /proc/PID/stat: "pid (comm) state ppid pgrp ..." (proc(5)); comm may hold spaces.
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    const pgrp = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[2]);
    if (pgrp === pid) {
      Deno.kill(-pid, "SIGKILL");
      return;
    }
  } catch {
    // exited already, or no /proc: fall back to the process itself
  }
  try {
    child.kill("SIGKILL");
  } catch {
    // already exited
  }
}

/** Boot, wait for power-off, return the result. */
export async function runUml(opts: UmlOptions): Promise<UmlResult> {
  return await (await UmlMachine.start(opts)).wait();
}
