// `denovm run [OPTIONS] KERNEL` and `denovm run --restore PATH [OPTIONS] [KERNEL]`: argv (and --cfg JSON files)
// → a validated VmConfig (or, for a restore without KERNEL, the host-side options that override the snapshot's).
// Option names, keys, defaults and checks follow crosvm's `run` (google/crosvm src/crosvm/cmdline.rs
// RunCommand and its TryFrom<RunCommand> for Config; src/crosvm/config.rs). This module scans argv and
// --cfg files, parses the machine's own options (kernel, memory, vCPUs, sockets) and hands each device
// option to its family's module in devices/ (block, serial, net, gpu, input, vsock).

import {
  DEFAULT_CPUS,
  DEFAULT_MEM_MIB,
  gpuConfig,
  type GpuDisplayConfig,
  type InputConfig,
  MAX_TCP_PORT,
  type NetConfig,
  type PmemConfig,
  type VmConfig,
} from "../config.ts";
import { VIRTIO_GPU_MAX_SCANOUTS } from "../../devices/virtio/gpu/protocol.ts";
import { crosvmOnlyKeys, type FlagDef, RUN_FLAGS } from "./help.ts";
import { collectWarnings, type KvSchema, parseOption, parseUint, UsageError, warn } from "./keyvalue.ts";
import { MAX_VCPUS } from "../arch/cpu.ts";
import { parseBlockOption } from "./devices/block.ts";
import { parseGpuDisplayOption, parseGpuOption } from "./devices/gpu.ts";
import { parseInputOption } from "./devices/input.ts";
import { parseSoundOption } from "./devices/sound.ts";
import { parseNetOption } from "./devices/net.ts";
import { addDefaultSerial, parseSerialOption, validateSerials } from "./devices/serial.ts";
import { parseVsockOption } from "./devices/vsock.ts";
import { parseDeprecatedPmemOption, parsePmemOption } from "./devices/pmem.ts";
import { parseSharedDirOption, validateSharedDirs } from "./devices/shared_dir.ts";
import { parseVhostUserConnectTimeout, parseVhostUserOption } from "./devices/vhost_user.ts";
import { type AllowedKinds, checkFileKind, openUserFile } from "../../core/host_file.ts";
import { closeFd, O_RDONLY } from "../../ffi/libc.ts";

export { UsageError } from "./keyvalue.ts";

/**
 * The most guest memory accepted, in MiB (128 TiB): guest RAM, moved up past the 32-bit device hole, stays
 * inside the 48-bit guest-physical address space of x86_64 4-level paging.
 */
export const MAX_MEM_MIB = 2 ** 27;

/** `run --restore PATH`: start from a snapshot instead of booting (vmm/builder.ts restoreMachine). */
export interface RestoreRequest {
  /** The snapshot directory. */
  path: string;
  /**
   * Set when the command line has no KERNEL: the host-side options it gave (socket, gdb, serials, blocks, nets,
   * vsock), which replace the snapshot's; RunCommand.config is then not a whole configuration. Absent when
   * KERNEL was given: RunCommand.config is the whole configuration, to be checked against the snapshot's.
   */
  overrides?: Partial<VmConfig>;
}

/** crosvm `run --suspended` ("vm": vCPUs and devices) or `--suspended-vcpus` ("vcpus"). */
export type StartSuspended = "vm" | "vcpus";

export interface RunCommand {
  config: VmConfig;
  /** `--restore PATH` was given. */
  restore?: RestoreRequest;
  /** `--suspended` or `--suspended-vcpus` was given: start with them suspended. */
  suspended?: StartSuspended;
  /** `--print-config` was given. */
  printConfig: boolean;
  /** `-h`/`--help` was given: nothing else was parsed; `config` is not meaningful. */
  help: boolean;
  /** One line each: crosvm flags and keys accepted without effect here, deprecated spellings. */
  warnings: string[];
}

export interface ParseRunOptions {
  /** Check that kernel, initrd and block images exist and are readable (default true). */
  checkFiles?: boolean;
}

// ---- The machine's own options ----

const MEM_SCHEMA: KvSchema = { option: "--mem", positional: "size", keys: { size: "string" } };
const CPUS_SCHEMA: KvSchema = {
  option: "--cpus",
  positional: "num-cores",
  keys: { "num-cores": "string", "boot-cpu": "uint" },
  crosvmOnly: crosvmOnlyKeys("cpus"),
};

function parseMem(text: string): number {
  const o = parseOption(MEM_SCHEMA, text);
  if (o.size === undefined) return DEFAULT_MEM_MIB;
  return parseUint(o.size as string, "--mem size", 1, MAX_MEM_MIB);
}

function parseCpus(text: string): number {
  const o = parseOption(CPUS_SCHEMA, text);
  const cpus = o["num-cores"] === undefined
    ? DEFAULT_CPUS
    : parseUint(o["num-cores"] as string, "--cpus num-cores", 1, MAX_VCPUS);
  // crosvm's boot-cpu picks the vCPU that starts the guest; denovm's MP table and ACPI tables name vCPU 0.
  const bootCpu = o["boot-cpu"] as number | undefined;
  if (bootCpu !== undefined && bootCpu !== 0) {
    throw new UsageError(`--cpus boot-cpu: ${bootCpu} is not supported: denovm boots vCPU 0`);
  }
  return cpus;
}

// ---- argv scanning ----

interface Occurrence {
  flag: FlagDef;
  value?: string;
  /** Where it came from: the command line, or a --cfg file. */
  source: string;
}

const BY_LONG = new Map(RUN_FLAGS.map((f) => [f.long, f]));
const BY_SHORT = new Map(RUN_FLAGS.filter((f) => f.short).map((f) => [f.short as string, f]));

function scanArgv(argv: readonly string[]): { occurrences: Occurrence[]; positionals: string[] } {
  const occurrences: Occurrence[] = [];
  const positionals: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--") {
      positionals.push(...argv.slice(i + 1));
      break;
    }
    let flag: FlagDef | undefined;
    let inline: string | undefined;
    let shown: string;
    if (arg.startsWith("--")) {
      // crosvm's prepare_argh_args: `--flag=value` is split at the first "=", and `--host_ip` is `--host-ip`.
      const eq = arg.indexOf("=");
      let name = eq >= 0 ? arg.slice(2, eq) : arg.slice(2);
      if (eq >= 0) inline = arg.slice(eq + 1);
      if (name === "host_ip") {
        warn("--host_ip is deprecated; use --host-ip");
        name = "host-ip";
      }
      shown = `--${name}`;
      flag = BY_LONG.get(name);
    } else if (arg.startsWith("-") && arg.length > 1) {
      // `-X=value` is split at the first "=" as `--flag=value` is (crosvm: `-p=init=/bin/sh` gives
      // `init=/bin/sh`); `-Xvalue` is taken as `-X value`.
      shown = arg.slice(0, 2);
      flag = BY_SHORT.get(arg[1]);
      if (arg.length > 2) inline = arg[2] === "=" ? arg.slice(3) : arg.slice(2);
    } else {
      positionals.push(arg);
      continue;
    }
    if (!flag) throw new UsageError(`unknown option ${shown} for run (see denovm run --help)`);
    if (flag.arg === undefined) {
      if (inline !== undefined) throw new UsageError(`option ${shown} takes no value`);
      occurrences.push({ flag, source: "command line" });
      continue;
    }
    let value = inline;
    if (value === undefined) {
      if (i + 1 >= argv.length) throw new UsageError(`option ${shown} needs a value (${flag.arg})`);
      value = argv[++i];
    }
    occurrences.push({ flag, value, source: "command line" });
  }
  return { occurrences, positionals };
}

/**
 * A JSON value of a --cfg file turned back into command-line text. A top-level string is taken as written
 * (it is key=value text, like the command line's); strings inside objects and arrays are quoted when they
 * hold a separator, so {"path": "a,b.img"} stays one path.
 */
function cfgValueText(v: unknown, where: string, nested = false): string {
  if (typeof v === "string") {
    if (!nested || !/[,=[\]"\\]/.test(v)) return v;
    return `"${v.replace(/["\\]/g, (c) => `\\${c}`)}"`;
  }
  if (typeof v === "number" && Number.isFinite(v)) return String(v);
  if (typeof v === "boolean") return String(v);
  if (Array.isArray(v)) return `[${v.map((x) => cfgValueText(x, where, true)).join(",")}]`;
  if (v !== null && typeof v === "object") {
    return Object.entries(v).map(([k, x]) => `${k}=${cfgValueText(x, where, true)}`).join(",");
  }
  throw new UsageError(`${where}: unsupported value ${JSON.stringify(v)}`);
}

const NOT_IN_CFG = new Set(["cfg", "help", "print-config"]);

function readCfgFile(path: string): Occurrence[] {
  let text: string;
  try {
    text = Deno.readTextFileSync(path);
  } catch (e) {
    throw new UsageError(`--cfg ${path}: cannot read: ${errorText(e)}`);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new UsageError(`--cfg ${path}: not valid JSON: ${errorText(e)}`);
  }
  if (json === null || typeof json !== "object" || Array.isArray(json)) {
    throw new UsageError(`--cfg ${path}: expected a JSON object of options`);
  }
  const out: Occurrence[] = [];
  const source = `--cfg ${path}`;
  for (const [rawKey, value] of Object.entries(json)) {
    const key = rawKey.replaceAll("_", "-");
    const flag = BY_LONG.get(key);
    if (!flag || NOT_IN_CFG.has(key)) throw new UsageError(`${source}: unknown option "${rawKey}"`);
    const where = `${source}: "${rawKey}"`;
    if (flag.arg === undefined) {
      if (typeof value !== "boolean") throw new UsageError(`${where} must be true or false`);
      if (value) out.push({ flag, source });
      continue;
    }
    if (Array.isArray(value)) {
      if (!flag.repeatable) throw new UsageError(`${where} takes one value, not an array`);
      for (const v of value) out.push({ flag, value: cfgValueText(v, where), source });
    } else {
      out.push({ flag, value: cfgValueText(value, where), source });
    }
  }
  return out;
}

function errorText(e: unknown): string {
  return (e instanceof Error ? e.message : String(e)).split("\n")[0];
}

/**
 * `path` exists, is of a kind `what` may be (a kernel or initrd a regular file, a disk a regular file or a
 * block device) and can be opened for reading; the open cannot block (core/host_file.ts), so a FIFO with no
 * writer is refused, not waited on.
 */
function checkReadableFile(path: string, what: string, allowed: AllowedKinds): void {
  let info: Deno.FileInfo;
  try {
    info = Deno.statSync(path);
  } catch (e) {
    throw new UsageError(`${what} "${path}": ${e instanceof Deno.errors.NotFound ? "no such file" : errorText(e)}`);
  }
  checkFileKind(what, path, info, allowed);
  let fd: number;
  try {
    fd = openUserFile(path, O_RDONLY, what, allowed).fd;
  } catch (e) {
    if (e instanceof UsageError) throw e;
    throw new UsageError(`${what} "${path}": cannot be read: ${errorText(e)}`);
  }
  closeFd(fd);
}

// ---- The parser ----

/**
 * Parses `run`'s arguments (after the word "run"). Throws UsageError for any invalid input; what is accepted
 * without effect comes back in `warnings`, one line each.
 */
export function parseRunArgs(argv: readonly string[], options: ParseRunOptions = {}): RunCommand {
  const { value, warnings } = collectWarnings(() => parseRun(argv, options));
  return { ...value, warnings };
}

/** The value of an --irqchip (crosvm IrqChipKind). */
const IRQCHIP_KINDS = ["kernel", "split", "userspace"];

/** crosvm's order for the deprecated input flags' devices, after every --input (cmdline.rs TryFrom<RunCommand>). */
const DEPRECATED_INPUT_ORDER = [
  "single-touch",
  "multi-touch",
  "trackpad",
  "mouse",
  "keyboard",
  "switches",
  "rotary",
  "evdev",
] as const;

/**
 * The options a `run --restore PATH` without KERNEL may give: host-side resources that replace the snapshot's
 * (see RestoreRequest.overrides), the run's own switches, and options that change nothing in the VM. Every
 * other option describes the VM, which the snapshot already fixes.
 */
const RESTORE_OVERRIDE_FLAGS = new Set([
  "socket",
  "gdb",
  "serial",
  "block",
  "disk",
  "rwdisk",
  "root",
  "rwroot",
  "net",
  "tap-name",
  "tap-fd",
  "host-ip",
  "netmask",
  "mac",
  "net-vq-pairs",
  "vsock",
  "cid",
  "restore",
  "suspended",
  "suspended-vcpus",
  "cfg",
  "print-config",
  "disable-sandbox",
  "irqchip",
]);

/** The VmConfig field each override option sets. */
const OVERRIDE_FIELD: Record<string, keyof VmConfig> = {
  socket: "socket",
  gdb: "gdb",
  serial: "serials",
  block: "blocks",
  disk: "blocks",
  rwdisk: "blocks",
  root: "blocks",
  rwroot: "blocks",
  net: "nets",
  "tap-name": "nets",
  "tap-fd": "nets",
  "host-ip": "nets",
  netmask: "nets",
  mac: "nets",
  vsock: "vsock",
  cid: "vsock",
};

function parseRun(argv: readonly string[], options: ParseRunOptions): Omit<RunCommand, "warnings"> {
  const { occurrences: cli, positionals } = scanArgv(argv);
  const cfg: VmConfig = {
    kernel: "",
    params: [],
    memMiB: DEFAULT_MEM_MIB,
    cpus: DEFAULT_CPUS,
    serials: [],
    blocks: [],
    nets: [],
    rng: true,
    balloon: true,
    inputs: [],
    virtioMmioCmdline: false,
  };
  if (cli.some((o) => o.flag.long === "help")) return { config: cfg, printConfig: false, help: true };

  // --cfg files come first, then the command line; a single-valued option given on the command line
  // replaces the file's value, repeatable ones add to it.
  const all: Occurrence[] = [];
  for (const o of cli) if (o.flag.long === "cfg") all.push(...readCfgFile(o.value as string));
  all.push(...cli.filter((o) => o.flag.long !== "cfg"));

  const seen = new Map<string, string>();
  let kernelFlag: string | undefined;
  let printConfig = false;
  let restorePath: string | undefined;
  let suspendedVm = false;
  let suspendedVcpus = false;
  /** Every option given (command line and --cfg files), by long name. */
  const given = new Set<string>();
  // What crosvm's deprecated flags add, appended after the devices of the current options in crosvm's order.
  const tapNameNets: NetConfig[] = [];
  const tapFdNets: NetConfig[] = [];
  const rawNet: { hostIp?: string; netmask?: string; mac?: string } = {};
  const deprecatedInputs = new Map<string, InputConfig[]>();
  // crosvm's --pmem devices, then its deprecated --pmem-device ones, then --rw-pmem-device ones.
  const pmems: PmemConfig[] = [], roPmemDevices: PmemConfig[] = [], rwPmemDevices: PmemConfig[] = [];
  const gpuDisplays: GpuDisplayConfig[] = [];
  const warned = new Set<string>();
  for (const o of all) {
    const f = o.flag;
    if (f.deprecated && !warned.has(f.long)) {
      warned.add(f.long);
      warn(`--${f.long} is deprecated; use ${f.deprecated}`);
    }
    if (f.crosvm) {
      if (f.crosvm.action === "refuse") {
        throw new UsageError(`--${f.long}: a crosvm option denovm does not support: ${f.crosvm.note}`);
      }
      warn(`--${f.long}: ${f.crosvm.note}; ignored`);
    }
    if (!f.repeatable) {
      const prev = seen.get(f.long);
      if (prev === o.source) throw new UsageError(`option --${f.long} given more than once`);
      seen.set(f.long, o.source);
    }
    given.add(f.long);
    const v = o.value ?? "";
    switch (f.long) {
      case "params":
        cfg.params.push(v);
        break;
      case "initrd":
        cfg.initrd = v;
        break;
      case "kernel":
        kernelFlag = v;
        break;
      case "mem":
        cfg.memMiB = parseMem(v);
        break;
      case "cpus":
        cfg.cpus = parseCpus(v);
        break;
      case "socket":
        cfg.socket = v;
        break;
      case "gdb":
        cfg.gdb = parseUint(v, "--gdb", 1, MAX_TCP_PORT);
        break;
      case "block":
        cfg.blocks.push(parseBlockOption(v, "--block"));
        break;
      case "disk":
        cfg.blocks.push(parseBlockOption(v, "--disk", { ro: true, root: false }));
        break;
      case "rwdisk":
        cfg.blocks.push(parseBlockOption(v, "--rwdisk", { ro: false, root: false }));
        break;
      case "root":
        cfg.blocks.push(parseBlockOption(v, "--root", { ro: true, root: true }));
        break;
      case "rwroot":
        cfg.blocks.push(parseBlockOption(v, "--rwroot", { ro: false, root: true }));
        break;
      case "pmem":
        pmems.push(parsePmemOption(v));
        break;
      case "pmem-device":
        roPmemDevices.push(parseDeprecatedPmemOption(v, "--pmem-device", true));
        break;
      case "rw-pmem-device":
        rwPmemDevices.push(parseDeprecatedPmemOption(v, "--rw-pmem-device", false));
        break;
      case "serial":
        cfg.serials.push(parseSerialOption(v));
        break;
      case "net":
        cfg.nets.push(parseNetOption(v));
        break;
      case "gpu":
        cfg.gpu = parseGpuOption(v);
        break;
      case "input":
        cfg.inputs.push(parseInputOption(v));
        break;
      case "virtio-snd":
        cfg.sounds = [...(cfg.sounds ?? []), parseSoundOption(v)];
        break;
      case "vsock":
        cfg.vsock = parseVsockOption(v, "--vsock");
        break;
      case "cid":
        cfg.vsock = parseVsockOption(v, "--cid");
        break;
      case "shared-dir":
        (cfg.sharedDirs ??= []).push(parseSharedDirOption(v, { checkPath: options.checkFiles ?? true }));
        break;
      case "vhost-user":
        (cfg.vhostUser ??= []).push(parseVhostUserOption(v));
        break;
      case "vhost-user-connect-timeout-ms":
        cfg.vhostUserConnectTimeoutMs = parseVhostUserConnectTimeout(v);
        break;
      case "no-rng":
        cfg.rng = false;
        break;
      case "no-balloon":
        cfg.balloon = false;
        break;
      case "virtio-mmio-cmdline":
        cfg.virtioMmioCmdline = true;
        break;
      case "agent":
        cfg.agent = true;
        break;
      case "print-config":
        printConfig = true;
        break;
      case "restore":
        if (v === "") throw new UsageError("--restore: empty PATH");
        restorePath = v;
        break;
      case "suspended":
        suspendedVm = true;
        break;
      case "suspended-vcpus":
        suspendedVcpus = true;
        break;
      case "tap-name":
        tapNameNets.push(parseNetOption(`tap-name=${quoteValue(v)}`));
        break;
      case "tap-fd":
        tapFdNets.push(parseNetOption(`tap-fd=${quoteValue(v)}`));
        break;
      case "host-ip":
        rawNet.hostIp = v;
        break;
      case "netmask":
        rawNet.netmask = v;
        break;
      case "mac":
        rawNet.mac = v;
        break;
      case "keyboard":
      case "mouse":
      case "switches":
      case "rotary":
      case "evdev":
        // crosvm takes a plain path here, not key=value text.
        pushMap(deprecatedInputs, f.long, { kind: f.long, path: v });
        break;
      case "multi-touch":
      case "single-touch":
      case "trackpad":
        pushMap(deprecatedInputs, f.long, parseInputOption(`${f.long}[${v}]`));
        break;
      case "gpu-display":
        gpuDisplays.push(parseGpuDisplayOption(v));
        break;
      case "net-vq-pairs":
        if (parseUint(v, "--net-vq-pairs", 1) !== 1) {
          throw new UsageError(`--net-vq-pairs ${v}: denovm's virtio-net has one queue pair`);
        }
        break;
      case "split-irqchip":
      case "vhost-net":
        // crosvm-only flags: warned about (or refused) above, from the table in help.ts.
        break;
      case "irqchip":
        if (!IRQCHIP_KINDS.includes(v)) {
          throw new UsageError(`--irqchip: "${v}" is not one of ${IRQCHIP_KINDS.join(", ")}`);
        }
        if (v !== "kernel") {
          throw new UsageError(
            `--irqchip ${v}: a crosvm option denovm does not support: denovm uses KVM's in-kernel irqchip`,
          );
        }
        break;
      case "disable-sandbox":
        // denovm has no sandbox to disable.
        break;
      case "display-window-keyboard":
      case "display-window-mouse":
      case "name":
      case "syslog-tag":
      case "no-i8042":
      case "bios":
        // crosvm-only flags: warned about (or refused) above, from the table in help.ts.
        break;
      default:
        throw new UsageError(`option --${f.long} is not handled`);
    }
  }
  if (seen.has("vsock") && seen.has("cid")) throw new UsageError("give --vsock or --cid, not both");

  // crosvm's deprecated net flags: each --tap-name, then each --tap-fd, then one device from --host-ip,
  // --netmask and --mac, which come together.
  cfg.nets.push(...tapNameNets, ...tapFdNets);
  if (rawNet.hostIp !== undefined || rawNet.netmask !== undefined || rawNet.mac !== undefined) {
    for (const [key, value] of [["host-ip", rawNet.hostIp], ["netmask", rawNet.netmask], ["mac", rawNet.mac]]) {
      if (value === undefined) throw new UsageError(`--${key} missing: --host-ip, --netmask and --mac go together`);
    }
    cfg.nets.push(
      parseNetOption(
        `host-ip=${quoteValue(rawNet.hostIp!)},netmask=${quoteValue(rawNet.netmask!)},mac=${quoteValue(rawNet.mac!)}`,
      ),
    );
  }
  for (const kind of DEPRECATED_INPUT_ORDER) cfg.inputs.push(...(deprecatedInputs.get(kind) ?? []));
  if (pmems.length + roPmemDevices.length + rwPmemDevices.length > 0) {
    cfg.pmems = [...pmems, ...roPmemDevices, ...rwPmemDevices];
  }
  if (gpuDisplays.length > 0) {
    cfg.gpu ??= gpuConfig();
    cfg.gpu.displays.push(...gpuDisplays);
    if (cfg.gpu.displays.length > VIRTIO_GPU_MAX_SCANOUTS) {
      throw new UsageError(`--gpu-display: at most ${VIRTIO_GPU_MAX_SCANOUTS} displays in all`);
    }
  }

  // crosvm (cmdline.rs TryFrom<RunCommand>): the two suspended switches exclude each other and --gdb.
  if (suspendedVm && suspendedVcpus) throw new UsageError("give --suspended or --suspended-vcpus, not both");
  const suspended: StartSuspended | undefined = suspendedVm ? "vm" : suspendedVcpus ? "vcpus" : undefined;
  if (suspended && cfg.gdb !== undefined) {
    throw new UsageError(
      `--${suspendedVm ? "suspended" : "suspended-vcpus"}: suspended mode is not supported with --gdb`,
    );
  }
  if (restorePath !== undefined && printConfig) {
    throw new UsageError(
      "--print-config cannot be used with --restore: the configuration is the snapshot's, read when the VM starts",
    );
  }

  // The kernel: exactly one positional argument, or --kernel; with --restore, none.
  if (positionals.length > 1) {
    throw new UsageError(`expected one KERNEL argument, got ${positionals.length}: ${positionals.join(" ")}`);
  }
  if (positionals.length === 1 && kernelFlag !== undefined && seen.get("kernel") === "command line") {
    throw new UsageError("give the kernel either as --kernel or as the KERNEL argument, not both");
  }
  const kernel = positionals[0] ?? kernelFlag;
  if (kernel === "" || (kernel === undefined && restorePath === undefined)) {
    throw new UsageError("missing KERNEL argument (see denovm run --help)");
  }
  if (kernel === undefined) return restoreOverrides(cfg, restorePath as string, given, suspended, options);
  cfg.kernel = kernel;

  validateSerials(cfg.serials);
  if (cfg.sharedDirs) validateSharedDirs(cfg.sharedDirs);
  if (cfg.blocks.filter((b) => b.root).length + (cfg.pmems ?? []).filter((p) => p.root).length > 1) {
    throw new UsageError("only one root disk can be given");
  }
  // crosvm (arch/src/serial.rs set_default_serial_parameters): a vhost-user console takes the default
  // serial console's place.
  if (!cfg.vhostUser?.some((v) => v.type === "console")) addDefaultSerial(cfg.serials);

  if (options.checkFiles ?? true) {
    // A restore does not load the kernel or initrd: guest memory comes from the snapshot.
    if (restorePath === undefined) {
      checkReadableFile(cfg.kernel, "kernel", "regular");
      if (cfg.initrd !== undefined) checkReadableFile(cfg.initrd, "initrd", "regular");
    }
    for (const b of cfg.blocks) checkReadableFile(b.path, "block", "regular-or-block");
  }
  return {
    config: cfg,
    printConfig,
    help: false,
    ...(restorePath !== undefined && { restore: { path: restorePath } }),
    ...(suspended && { suspended }),
  };
}

/** `run --restore PATH` without KERNEL: only host-side options, which become the restore's overrides. */
function restoreOverrides(
  cfg: VmConfig,
  path: string,
  given: ReadonlySet<string>,
  suspended: StartSuspended | undefined,
  options: ParseRunOptions,
): Omit<RunCommand, "warnings"> {
  for (const long of given) {
    // crosvm's flags that denovm ignores or refuses were dealt with when they were read.
    if (RESTORE_OVERRIDE_FLAGS.has(long) || BY_LONG.get(long)?.crosvm) continue;
    throw new UsageError(
      `--${long} with --restore and no KERNEL: the snapshot's configuration fixes it; give the whole command ` +
        "line, KERNEL included, to have it checked against the snapshot",
    );
  }
  const overrides: Partial<VmConfig> = {};
  const set = overrides as Record<string, unknown>;
  for (const long of given) {
    const field = OVERRIDE_FIELD[long];
    if (field !== undefined) set[field] = cfg[field];
  }
  if (overrides.serials) validateSerials(overrides.serials);
  if (overrides.blocks) {
    if (overrides.blocks.filter((b) => b.root).length > 1) throw new UsageError("only one root disk can be given");
    if (options.checkFiles ?? true) {
      for (const b of overrides.blocks) checkReadableFile(b.path, "block", "regular-or-block");
    }
  }
  return {
    config: cfg,
    printConfig: false,
    help: false,
    restore: { path, overrides },
    ...(suspended && { suspended }),
  };
}

/** `text` as one key=value value: quoted when it holds a separator. */
function quoteValue(text: string): string {
  return /[,[\]"'\\]/.test(text) ? `"${text.replace(/["\\]/g, (c) => `\\${c}`)}"` : text;
}

function pushMap<K, V>(map: Map<K, V[]>, key: K, value: V): void {
  const list = map.get(key);
  if (list) list.push(value);
  else map.set(key, [value]);
}
