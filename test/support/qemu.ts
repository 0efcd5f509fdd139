// QEMU (TCG) as a test front end for vhost-user devices that user-mode Linux lacks (input, rng):
// Debian's qemu-system-x86_64 boots Debian's 6.1 kernel (test/support/kernel.ts) with
// `-M microvm,accel=tcg`, guest RAM in a shared memfd (vhost-user back ends map it), and QEMU's
// vhost-user front ends on the virtio-mmio bus (`vhost-user-input`, `vhost-user-rng`). The
// initramfs is built at test time: busybox-static, the named modules of the Debian kernel (with
// their dependencies from each module's .modinfo `depends=`) and a generated /init that runs the
// test's commands, prints an end marker and powers off.
//
// Also re-exported: `DeviceProcess`, a `denovm device TYPE ...` child process (main.ts) for tests.

import { type DebianKernel, debianKernel } from "./kernel.ts";
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

const REPO_ROOT = new URL("../../", import.meta.url).pathname;
export const QEMU_BINARY = "/usr/bin/qemu-system-x86_64";
/** Guest RAM (MiB) unless a test asks otherwise. */
export const QEMU_DEFAULT_MEM_MIB = 256;

/**
 * Kernel command line: serial console, reboot (QEMU exits: -no-reboot) on panic, and fixed timing
 * figures instead of calibration, which under TCG is slow and sometimes wrong (tsc_early_khz gives
 * the TSC frequency, lpj the delay-loop constant; Documentation/admin-guide/kernel-parameters.txt).
 */
export const QEMU_KERNEL_ARGS = ["console=ttyS0", "panic=-1", "quiet", "tsc_early_khz=2000000", "lpj=4000000"];

/** Markers the generated /init prints. */
export const QEMU_MARK_START = "QEMU-INIT-START";
export const QEMU_MARK_END = "QEMU-INIT-END";

/** Why QEMU tests cannot run here, or undefined when they can (the kernel is fetched on first use). */
export function qemuUnavailableReason(): string | undefined {
  if (Deno.build.os !== "linux" || Deno.build.arch !== "x86_64") return "the QEMU tests need x86_64 Linux";
  if (!exists(QEMU_BINARY)) return `${QEMU_BINARY} missing (apt-get install qemu-system-x86)`;
  if (!exists(BUSYBOX)) return `${BUSYBOX} missing (apt-get install busybox-static)`;
  if (!qemuHasDevice({ binary: QEMU_BINARY }, "vhost-user-rng")) {
    return "this QEMU has no vhost-user-rng device";
  }
  return undefined;
}

/** A QEMU build: its binary and, for an unpacked one, its firmware folder (-L) and environment. */
export interface QemuBuild {
  binary: string;
  firmwareDir?: string;
  env?: Record<string, string>;
  version: string;
}

function qemuVersion(binary: string, env?: Record<string, string>): string {
  const out = new Deno.Command(binary, { args: ["--version"], env, stdout: "piped", stderr: "piped" }).outputSync();
  return new TextDecoder().decode(out.stdout).match(/version (\S+)/)?.[1] ?? "unknown";
}

/**
 * Whether `build` has the QEMU device `name`: `-device NAME,help` lists its properties. (Plain
 * `-device help` would also load every module in the host's QEMU module folder, which a QEMU of
 * another version cannot load.)
 */
export function qemuHasDevice(build: { binary: string; env?: Record<string, string> }, name: string): boolean {
  const args = ["-device", `${name},help`];
  const out = new Deno.Command(build.binary, { args, env: build.env, stdout: "piped", stderr: "piped" }).outputSync();
  return new TextDecoder().decode(out.stdout).includes(`${name} options:`);
}

/** Debian's QEMU (7.2 on bookworm). */
export function systemQemu(): QemuBuild {
  return { binary: QEMU_BINARY, version: qemuVersion(QEMU_BINARY) };
}

/**
 * QEMU 7.2's vhost-user-input refuses to start without KVM (backends/vhost-user.c,
 * vhost_user_backend_dev_init: "vhost initialization failed: requires kvm"); newer QEMU builds it
 * on vhost-user-base, which works under TCG as vhost-user-rng does. This unpacks bookworm-backports'
 * QEMU (10.x) with scripts/qemu-backports.sh (a private apt configuration, `dpkg-deb -x`; the host's
 * apt state and libraries are untouched). The binary runs on bookworm's libraries; its modules are
 * found through QEMU_MODULE_DIR (`env`), not in the host's QEMU 7.2 module folder.
 */
export async function backportsQemu(): Promise<QemuBuild> {
  const script = `${REPO_ROOT}scripts/qemu-backports.sh`;
  const out = await new Deno.Command("bash", { args: [script], stdout: "piped", stderr: "piped" }).output();
  const lines = new TextDecoder().decode(out.stdout).trim().split("\n");
  if (!out.success) {
    const err = new TextDecoder().decode(out.stderr).trim().split("\n").slice(-3).join("; ");
    throw new Error(`fetching bookworm-backports QEMU failed: ${err}`);
  }
  const dir = lines[lines.length - 1];
  const root = `${dir}/root`;
  const binary = `${root}/usr/bin/qemu-system-x86_64`;
  const env = { QEMU_MODULE_DIR: `${root}/usr/lib/x86_64-linux-gnu/qemu` };
  const version = qemuVersion(binary, env);
  if (!/^([89]|[1-9]\d)\./.test(version)) throw new Error(`backports QEMU is ${version}, not 8 or later`);
  return { binary, firmwareDir: `${root}/usr/share/qemu`, env, version };
}

// ---- Modules of the Debian kernel ----

/** The `depends=` list of a module file's .modinfo section (NUL-separated key=value strings). */
function moduleDepends(ko: Uint8Array): string[] {
  const text = new TextDecoder("latin1").decode(ko);
  const m = text.match(/\0depends=([^\0]*)\0/);
  return m ? m[1].split(",").filter(Boolean) : [];
}

/** Module files for `names`, dependencies first; built-in modules are skipped. */
export function resolveDebianModules(k: DebianKernel, names: string[]): string[] {
  const moddir = `${k.root}/lib/modules/${k.version}`;
  const byName = new Map<string, string>();
  const walk = (dir: string) => {
    for (const e of Deno.readDirSync(dir)) {
      const p = `${dir}/${e.name}`;
      if (e.isDirectory) walk(p);
      else if (e.name.endsWith(".ko")) byName.set(e.name.slice(0, -3).replaceAll("-", "_"), p);
    }
  };
  walk(`${moddir}/kernel`);
  const builtin = new Set(
    Deno.readTextFileSync(`${moddir}/modules.builtin`).split("\n").map((l) =>
      l.split("/").pop()!.replace(/\.ko$/, "").replaceAll("-", "_")
    ),
  );
  const order: string[] = [];
  const visit = (name: string) => {
    const n = name.replaceAll("-", "_");
    const path = byName.get(n);
    if (!path) {
      if (builtin.has(n)) return;
      throw new Error(`module ${name} not found under ${moddir}/kernel (compressed modules are not supported)`);
    }
    if (order.includes(path)) return;
    for (const d of moduleDepends(Deno.readFileSync(path))) visit(d);
    order.push(path);
  };
  names.forEach(visit);
  return order;
}

export interface QemuInitramfsOptions {
  /** Module names to load (e.g. "virtio_input"); dependencies are added. */
  modules: string[];
  /** Shell commands /init runs (busybox sh, `set -e`). */
  commands: string;
}

/** Build an initramfs for one run; returns its path (a temp file the caller may delete). */
export async function buildQemuInitramfs(opts: QemuInitramfsOptions): Promise<string> {
  const k = await debianKernel();
  const mods = resolveDebianModules(k, opts.modules);
  const entries = busyboxBaseEntries(["bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"], mods);
  const init = busyboxInitScript(mods, opts.commands, QEMU_MARK_START, QEMU_MARK_END);
  entries.push({ name: "init", mode: S_IFREG | 0o755, data: new TextEncoder().encode(init) });
  const path = await Deno.makeTempFile({ prefix: "denovm-qemu-", suffix: ".cpio" });
  await Deno.writeFile(path, cpioNewc(entries));
  return path;
}

// ---- Running QEMU ----

export interface QemuOptions {
  /** Which QEMU (default: Debian's). */
  qemu?: QemuBuild;
  /** Which kernel (default: Debian's 6.1, debianKernel()). */
  kernel?: DebianKernel;
  initramfs: string;
  /** vhost-user devices: the QEMU device name (virtio-mmio variant, e.g. "vhost-user-input") and socket. */
  vhostUser?: { device: string; socket: string; props?: string }[];
  memMiB?: number;
  /** Extra kernel command-line words. */
  append?: string[];
  /** Kill QEMU if it has not exited after this long (a hang guard, default 180 s). */
  hangGuardMs?: number;
}

export interface QemuResult extends ConsoleExit {
  /** Exit status of the test commands, from the end marker, or undefined when /init did not get there. */
  commandStatus?: number;
}

/**
 * The microvm machine of the QEMU front ends (also bench/kmscube.ts): TCG, virtio-mmio only, no PCI,
 * `memMiB` of guest RAM in a shared memfd (vhost-user back ends map it), modern virtio-mmio only.
 */
export function microvmArgs(memMiB: number): string[] {
  return [
    // The PIT, PIC and RTC are asked for explicitly: without a PIT the kernel's TSC calibration under
    // TCG sometimes fails and the boot then stalls for minutes.
    "-M",
    "microvm,accel=tcg,pit=on,pic=on,rtc=on,memory-backend=mem",
    "-cpu",
    "max",
    "-m",
    `${memMiB}M`,
    // vhost-user back ends map guest RAM: it must be a shared file (memfd).
    "-object",
    `memory-backend-memfd,id=mem,size=${memMiB}M,share=on`,
    // Modern (version 2) virtio-mmio only.
    "-global",
    "virtio-mmio.force-legacy=false",
  ];
}

/** The QEMU command line for `opts` (exported so a test failure can show it). */
export function qemuArgs(k: DebianKernel, opts: QemuOptions): string[] {
  const mem = opts.memMiB ?? QEMU_DEFAULT_MEM_MIB;
  const args = [
    ...(opts.qemu?.firmwareDir ? ["-L", opts.qemu.firmwareDir] : []),
    // microvm's default firmware is qboot (bios-microvm.bin).
    ...microvmArgs(mem),
    "-nographic",
    "-nodefaults",
    "-no-reboot",
    "-serial",
    "stdio",
    "-kernel",
    k.vmlinuz,
    "-initrd",
    opts.initramfs,
    "-append",
    [...QEMU_KERNEL_ARGS, ...(opts.append ?? [])].join(" "),
  ];
  (opts.vhostUser ?? []).forEach((d, i) => {
    args.push("-chardev", `socket,id=vu${i},path=${d.socket}`);
    args.push("-device", `${d.device},chardev=vu${i}${d.props ? `,${d.props}` : ""}`);
  });
  return args;
}

/** A running QEMU machine with its serial console on stdout. */
export class QemuMachine {
  readonly args: string[];
  readonly #proc: ConsoleProcess;
  readonly #done: Promise<QemuResult>;

  private constructor(child: Deno.ChildProcess, args: string[], hangGuardMs: number) {
    this.args = args;
    this.#proc = new ConsoleProcess(child, { label: "QEMU", hangGuardMs });
    this.#done = this.#proc.done.then((r) => ({ ...r, commandStatus: initCommandStatus(r.output, QEMU_MARK_END) }));
  }

  static async start(opts: QemuOptions): Promise<QemuMachine> {
    const k = opts.kernel ?? await debianKernel();
    const args = qemuArgs(k, opts);
    const binary = opts.qemu?.binary ?? QEMU_BINARY;
    const env = opts.qemu?.env;
    const child = new Deno.Command(binary, { args, env, stdin: "null", stdout: "piped", stderr: "piped" }).spawn();
    return new QemuMachine(child, args, opts.hangGuardMs ?? 180_000);
  }

  get output(): string {
    return this.#proc.output;
  }

  /** Resolves when the console output matches `re` (rejects if QEMU exits first). */
  waitFor(re: RegExp): Promise<void> {
    return this.#proc.waitFor(re);
  }

  wait(): Promise<QemuResult> {
    return this.#done;
  }

  kill(): void {
    this.#proc.kill();
  }
}

// ---- `denovm device TYPE` back-end processes (test/support/device_process.ts) ----

export { DeviceProcess } from "./device_process.ts";

/** A client for a back end's JSON-line socket (input --event-socket, balloon --control-socket). */
export class JsonLineClient {
  readonly #conn: Deno.UnixConn;
  #buf = "";
  readonly #reader: ReadableStreamDefaultReader<Uint8Array>;

  private constructor(conn: Deno.UnixConn) {
    this.#conn = conn;
    this.#reader = conn.readable.getReader();
  }

  static async connect(path: string): Promise<JsonLineClient> {
    return new JsonLineClient(await Deno.connect({ transport: "unix", path }));
  }

  /** Send one request and return the parsed reply line. */
  async call(req: unknown): Promise<Record<string, unknown>> {
    await this.#conn.write(new TextEncoder().encode(JSON.stringify(req) + "\n"));
    const dec = new TextDecoder();
    for (;;) {
      const nl = this.#buf.indexOf("\n");
      if (nl >= 0) {
        const line = this.#buf.slice(0, nl);
        this.#buf = this.#buf.slice(nl + 1);
        return JSON.parse(line);
      }
      const { value, done } = await this.#reader.read();
      if (done) throw new Error("the back end closed its JSON-line socket");
      this.#buf += dec.decode(value, { stream: true });
    }
  }

  close(): void {
    try {
      this.#reader.releaseLock();
      this.#conn.close();
    } catch {
      // closed already
    }
  }
}

/**
 * Connect to QEMU's chardev socket (server=on: QEMU creates it while starting up). Retries while the
 * socket does not exist or does not accept yet; gives up if QEMU exits first.
 */
export async function connectToChardev(path: string, qemu: ConsoleProcess): Promise<Deno.UnixConn> {
  let exited = false;
  qemu.done.then(() => exited = true);
  for (;;) {
    try {
      return await Deno.connect({ transport: "unix", path });
    } catch (e) {
      if (!(e instanceof Deno.errors.NotFound || e instanceof Deno.errors.ConnectionRefused)) throw e;
    }
    if (exited) throw new Error(`QEMU exited before its chardev socket ${path} accepted:\n${qemu.output}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
