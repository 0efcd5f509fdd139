// `denovm run [OPTIONS] KERNEL`: argv (and --cfg JSON files) → a validated VmConfig.
// Option names, keys, defaults and checks follow crosvm's `run` (google/crosvm src/crosvm/cmdline.rs
// RunCommand and its TryFrom<RunCommand> for Config; src/crosvm/config.rs; src/crosvm/gpu_config.rs).

import {
  type BlockConfig,
  DEFAULT_BLOCK_SIZE,
  DEFAULT_CPUS,
  DEFAULT_DISPLAY_HEIGHT,
  DEFAULT_DISPLAY_WIDTH,
  DEFAULT_GPU_HOST_VISIBLE_WINDOW_SIZE,
  DEFAULT_MEM_MIB,
  defaultSerial,
  type GpuBackend,
  type GpuConfig,
  type GpuDisplayConfig,
  type InputConfig,
  type InputKind,
  type NetConfig,
  type SerialConfig,
  type SerialHardware,
  type SerialType,
  type VmConfig,
} from "../config.ts";
import { type FlagDef, RUN_FLAGS } from "./help.ts";
import {
  asScalarList,
  asUint,
  decodeKeyValues,
  type KvEntry,
  type KvSchema,
  type KvValue,
  parseKeyValues,
  parseOption,
  parseUint,
  UsageError,
} from "./keyvalue.ts";

export { UsageError } from "./keyvalue.ts";

/**
 * The most guest memory accepted, in MiB (128 TiB): guest RAM, moved up past the 32-bit device hole, stays
 * inside the 48-bit guest-physical address space of x86_64 4-level paging.
 */
export const MAX_MEM_MIB = 2 ** 27;
/** The highest vCPU count accepted; crosvm and the x86 MP table / xAPIC IDs stop at 255. */
export const MAX_CPUS = 255;
/** Serial port numbers are 1..4 (crosvm config.rs validate_serial_parameters: COM1..COM4). */
export const MAX_SERIAL_NUM = 4;
/** virtio-blk serial length (Linux include/uapi/linux/virtio_blk.h VIRTIO_BLK_ID_BYTES). */
export const VIRTIO_BLK_ID_BYTES = 20;
/** Sector size every block size must be a multiple of (virtio spec 5.2.6: requests are in 512-byte sectors). */
export const SECTOR_SIZE = 512;
/** Lowest guest vsock CID: 0 hypervisor, 1 loopback, 2 host are reserved (Linux include/uapi/linux/vm_sockets.h). */
export const MIN_GUEST_CID = 3;
/** VMADDR_CID_ANY (0xffffffff) cannot be a guest CID (vm_sockets.h). */
export const MAX_GUEST_CID = 0xffff_fffe;
/** Most displays one virtio-gpu device has (virtio spec 5.7.4, VIRTIO_GPU_MAX_SCANOUTS). */
export const VIRTIO_GPU_MAX_SCANOUTS = 16;
/** Capset names the guest can ask for, as crosvm/rutabaga spell them (linux virtio_gpu.h VIRTIO_GPU_CAPSET_*). */
export const GPU_CONTEXT_TYPES: readonly string[] = [
  "virgl",
  "virgl2",
  "gfxstream-vulkan",
  "venus",
  "cross-domain",
  "drm",
  "gfxstream-gles",
  "gfxstream-composer",
  "magma",
];

export interface RunCommand {
  config: VmConfig;
  /** `--print-config` was given. */
  printConfig: boolean;
  /** `-h`/`--help` was given: nothing else was parsed; `config` is not meaningful. */
  help: boolean;
}

export interface ParseRunOptions {
  /** Check that kernel, initrd and block images exist and are readable (default true). */
  checkFiles?: boolean;
}

// ---- Key=value schemas ----

const MEM_SCHEMA: KvSchema = { option: "--mem", positional: "size", keys: { size: "string" } };
const CPUS_SCHEMA: KvSchema = { option: "--cpus", positional: "num-cores", keys: { "num-cores": "string" } };
const VSOCK_SCHEMA: KvSchema = {
  option: "--vsock",
  positional: "cid",
  keys: { cid: "string", "uds-path": "string" },
};

function blockSchema(option: string): KvSchema {
  return {
    option,
    positional: "path",
    keys: {
      path: "string",
      ro: "bool",
      root: "bool",
      sparse: "bool",
      "block-size": "uint",
      id: "string",
      direct: "bool",
      lock: "bool",
    },
    // crosvm devices/src/virtio/block/mod.rs DiskOption serde aliases.
    aliases: { block_size: "block-size", o_direct: "direct" },
  };
}

const SERIAL_TYPES: readonly SerialType[] = ["stdout", "sink", "file", "syslog", "unix", "unix-stream"];
const SERIAL_HARDWARE: readonly SerialHardware[] = ["serial", "virtio-console", "debugcon"];
const SERIAL_SCHEMA: KvSchema = {
  option: "--serial",
  positional: "type",
  keys: {
    type: { enum: SERIAL_TYPES },
    hardware: { enum: SERIAL_HARDWARE },
    num: "string",
    path: "string",
    input: "string",
    console: "bool",
    earlycon: "bool",
    stdin: "bool",
    name: "string",
  },
};

const NET_SCHEMA: KvSchema = {
  option: "--net",
  keys: {
    "tap-name": "string",
    "tap-fd": "uint",
    "host-ip": "string",
    netmask: "string",
    mac: "string",
    "vq-pairs": "string",
  },
};

const GPU_BACKENDS: readonly string[] = ["2d", "2D", "virglrenderer", "3d", "3D", "gfxstream"];

function decodeDisplayMode(v: KvValue, where: string): { mode: string; width?: number; height?: number } {
  // denovm adds mode=web[W,H]: the display served as a web page (see vmm/web_display/).
  if (v.kind === "scalar") {
    if (v.text === "windowed" || v.text === "borderless_full_screen" || v.text === "web") return { mode: v.text };
    throw new UsageError(`${where}: "${v.text}" is not windowed[W,H], web[W,H] or borderless_full_screen`);
  }
  if (v.kind === "variant" && (v.name === "windowed" || v.name === "web")) {
    const dims = asScalarList({ kind: "list", items: v.items }, where);
    if (dims.length !== 2) throw new UsageError(`${where}: ${v.name} takes [WIDTH,HEIGHT]`);
    return { mode: v.name, width: parseUint(dims[0], where, 1), height: parseUint(dims[1], where, 1) };
  }
  throw new UsageError(`${where}: expected windowed[W,H], web[W,H] or borderless_full_screen`);
}

const DISPLAY_SCHEMA: KvSchema = {
  option: "--gpu displays",
  positional: "mode",
  keys: {
    mode: { decode: decodeDisplayMode },
    hidden: "bool",
    "refresh-rate": "uint",
    dpi: { decode: (v, where) => asScalarList(v, where).map((s) => parseUint(s, where)) },
    "horizontal-dpi": "uint",
    "vertical-dpi": "uint",
    port: { decode: (v, where) => asUint(v, where, 1, 65535) },
  },
};

function decodeDisplay(items: KvEntry[]): GpuDisplayConfig {
  const d = decodeKeyValues(DISPLAY_SCHEMA, items);
  const mode = (d.mode as ReturnType<typeof decodeDisplayMode> | undefined) ?? { mode: "windowed" };
  const dpi = d.dpi as number[] | undefined;
  if (dpi !== undefined && dpi.length !== 2) throw new UsageError(`--gpu displays dpi: takes [X,Y]`);
  const out: GpuDisplayConfig = {
    mode: mode.mode,
    width: mode.width ?? DEFAULT_DISPLAY_WIDTH,
    height: mode.height ?? DEFAULT_DISPLAY_HEIGHT,
  };
  if (d.port !== undefined) out.port = d.port as number;
  if (d.hidden !== undefined) out.hidden = d.hidden as boolean;
  if (d["refresh-rate"] !== undefined) out.refreshRate = d["refresh-rate"] as number;
  return out;
}

function decodeDisplays(v: KvValue, where: string): GpuDisplayConfig[] {
  if (v.kind !== "list") throw new UsageError(`${where}: expected [[DISPLAY],...]`);
  // displays=[[mode=windowed[W,H]],[...]] is crosvm's form; also take a single display without the inner [].
  if (v.items.length > 0 && v.items.every((e) => e.key === undefined && e.value.kind === "list")) {
    return v.items.map((e) => decodeDisplay((e.value as { items: KvEntry[] }).items));
  }
  return v.items.length === 0 ? [] : [decodeDisplay(v.items)];
}

const GPU_SCHEMA: KvSchema = {
  option: "--gpu",
  positional: "backend",
  keys: {
    backend: { enum: GPU_BACKENDS },
    "context-types": "string",
    displays: { decode: decodeDisplays },
    width: "uint",
    height: "uint",
    egl: "bool",
    gles: "bool",
    glx: "bool",
    surfaceless: "bool",
    vulkan: "bool",
    udmabuf: "bool",
    "pci-bar-size": "size",
    "fixed-blob-mapping": "bool",
    trace: "string",
  },
};

const INPUT_KINDS: readonly InputKind[] = [
  "keyboard",
  "mouse",
  "multi-touch",
  "single-touch",
  "evdev",
  "switches",
  "rotary",
  "trackpad",
];
const TOUCH_KINDS: readonly InputKind[] = ["multi-touch", "single-touch", "trackpad"];

// ---- Per-option decoders ----

function parseMem(text: string): number {
  const o = parseOption(MEM_SCHEMA, text);
  if (o.size === undefined) return DEFAULT_MEM_MIB;
  return parseUint(o.size as string, "--mem size", 1, MAX_MEM_MIB);
}

function parseCpus(text: string): number {
  const o = parseOption(CPUS_SCHEMA, text);
  if (o["num-cores"] === undefined) return DEFAULT_CPUS;
  return parseUint(o["num-cores"] as string, "--cpus num-cores", 1, MAX_CPUS);
}

function parseVsock(text: string, option: string): { cid: number; udsPath?: string } {
  const o = parseOption({ ...VSOCK_SCHEMA, option }, text);
  if (o.cid === undefined) throw new UsageError(`${option}: cid is required`);
  const cid = parseUint(o.cid as string, `${option} cid`, MIN_GUEST_CID, MAX_GUEST_CID);
  return o["uds-path"] === undefined ? { cid } : { cid, udsPath: o["uds-path"] as string };
}

/** Block options; `force` is what --disk/--rwdisk/--root/--rwroot impose over the given keys (as crosvm does). */
function parseBlock(text: string, option: string, force: Partial<BlockConfig> = {}): BlockConfig {
  const o = parseOption(blockSchema(option), text);
  if (o.path === undefined || o.path === "") throw new UsageError(`${option}: path is required`);
  const b: BlockConfig = {
    path: o.path as string,
    ro: (o.ro as boolean | undefined) ?? false,
    root: (o.root as boolean | undefined) ?? false,
    sparse: (o.sparse as boolean | undefined) ?? true,
    blockSize: (o["block-size"] as number | undefined) ?? DEFAULT_BLOCK_SIZE,
    direct: (o.direct as boolean | undefined) ?? false,
    ...(o.lock === undefined ? {} : { lock: o.lock as boolean }),
    ...force,
  };
  if (b.blockSize === 0 || b.blockSize % SECTOR_SIZE !== 0) {
    throw new UsageError(`${option} block-size: ${b.blockSize} is not a multiple of ${SECTOR_SIZE}`);
  }
  if (o.id !== undefined) {
    const id = o.id as string;
    // deno-lint-ignore no-control-regex
    if (id.length > VIRTIO_BLK_ID_BYTES || !/^[\x00-\x7f]*$/.test(id)) {
      throw new UsageError(`${option} id: "${id}" is not at most ${VIRTIO_BLK_ID_BYTES} ASCII characters`);
    }
    b.id = id;
  }
  return b;
}

function parseSerial(text: string): SerialConfig {
  const o = parseOption(SERIAL_SCHEMA, text);
  const s: SerialConfig = {
    type: (o.type as SerialType | undefined) ?? "sink",
    hardware: (o.hardware as SerialHardware | undefined) ?? "serial",
    num: o.num === undefined ? 1 : parseUint(o.num as string, "--serial num", 1, MAX_SERIAL_NUM),
    console: (o.console as boolean | undefined) ?? false,
    earlycon: (o.earlycon as boolean | undefined) ?? false,
    stdin: (o.stdin as boolean | undefined) ?? false,
  };
  if (o.path !== undefined) s.path = o.path as string;
  if (o.input !== undefined) s.input = o.input as string;
  if (o.name !== undefined) s.name = o.name as string;
  if (s.stdin && s.input !== undefined) throw new UsageError("--serial: stdin and input cannot both be given");
  if ((s.type === "file" || s.type === "unix" || s.type === "unix-stream") && s.path === undefined) {
    throw new UsageError(`--serial: type=${s.type} needs path=`);
  }
  if (s.earlycon && s.hardware !== "serial") {
    throw new UsageError(`--serial: earlycon is not supported for hardware=${s.hardware}`);
  }
  return s;
}

const IPV4 = /^(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}$/;
const MAC = /^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/i;

function parseNet(text: string): NetConfig {
  const o = parseOption(NET_SCHEMA, text);
  const n: NetConfig = {};
  if (o["tap-name"] !== undefined) n.tapName = o["tap-name"] as string;
  if (o["tap-fd"] !== undefined) n.tapFd = o["tap-fd"] as number;
  for (const [key, field] of [["host-ip", "hostIp"], ["netmask", "netmask"]] as const) {
    if (o[key] === undefined) continue;
    const ip = o[key] as string;
    if (!IPV4.test(ip)) throw new UsageError(`--net ${key}: "${ip}" is not an IPv4 address`);
    n[field] = ip;
  }
  if (o.mac !== undefined) {
    if (!MAC.test(o.mac as string)) throw new UsageError(`--net mac: "${o.mac}" is not a MAC address`);
    n.mac = (o.mac as string).toLowerCase();
  }
  if (o["vq-pairs"] !== undefined) n.vqPairs = parseUint(o["vq-pairs"] as string, "--net vq-pairs", 1);
  // crosvm NetParametersMode: exactly one of tap-name, tap-fd, or host-ip + netmask + mac.
  const modes = [n.tapName !== undefined, n.tapFd !== undefined, n.hostIp !== undefined || n.netmask !== undefined]
    .filter(Boolean).length;
  if (modes !== 1) throw new UsageError("--net: give exactly one of tap-name, tap-fd, or host-ip + netmask + mac");
  if ((n.hostIp !== undefined || n.netmask !== undefined) && (!n.hostIp || !n.netmask || !n.mac)) {
    throw new UsageError("--net: host-ip, netmask and mac must be given together");
  }
  return n;
}

function parseGpu(text: string): GpuConfig {
  const o = parseOption(GPU_SCHEMA, text);
  const backendText = ((o.backend as string | undefined) ?? "2d").toLowerCase();
  // crosvm devices/src/virtio/gpu/mod.rs GpuMode: "3d" is an alias of "virglrenderer".
  const backend: GpuBackend = backendText === "3d" ? "virglrenderer" : backendText as GpuBackend;
  const contextTypes = o["context-types"] === undefined
    ? []
    : (o["context-types"] as string).split(":").filter((s) => s !== "");
  for (const c of contextTypes) {
    if (!GPU_CONTEXT_TYPES.includes(c)) {
      throw new UsageError(`--gpu context-types: unknown context type "${c}" (known: ${GPU_CONTEXT_TYPES.join(", ")})`);
    }
  }
  const g: GpuConfig = {
    ...(o.trace === undefined ? {} : { tracePath: o.trace as string }),
    backend,
    contextTypes,
    displays: (o.displays as GpuDisplayConfig[] | undefined) ?? [],
    hostVisibleWindowSize: (o["pci-bar-size"] as number | undefined) ?? DEFAULT_GPU_HOST_VISIBLE_WINDOW_SIZE,
    fixedBlobMapping: (o["fixed-blob-mapping"] as boolean | undefined) ?? false,
    // Defaults from crosvm gpu/parameters.rs GpuParameters::default.
    egl: (o.egl as boolean | undefined) ?? true,
    gles: (o.gles as boolean | undefined) ?? true,
    glx: (o.glx as boolean | undefined) ?? false,
    surfaceless: (o.surfaceless as boolean | undefined) ?? true,
    vulkan: (o.vulkan as boolean | undefined) ?? false,
    udmabuf: (o.udmabuf as boolean | undefined) ?? false,
  };
  // crosvm src/crosvm/gpu_config.rs: width and height (deprecated) make one windowed display, both or neither.
  const width = o.width as number | undefined;
  const height = o.height as number | undefined;
  if ((width === undefined) !== (height === undefined)) {
    throw new UsageError("--gpu: width and height must be given together");
  }
  if (width !== undefined && height !== undefined) {
    if (width === 0 || height === 0) throw new UsageError("--gpu: width and height must be at least 1");
    g.width = width;
    g.height = height;
    g.displays.push({ mode: "windowed", width, height });
  }
  if (g.displays.length === 0) {
    g.displays.push({ mode: "windowed", width: DEFAULT_DISPLAY_WIDTH, height: DEFAULT_DISPLAY_HEIGHT });
  }
  if (g.displays.length > VIRTIO_GPU_MAX_SCANOUTS) {
    throw new UsageError(`--gpu displays: at most ${VIRTIO_GPU_MAX_SCANOUTS} displays`);
  }
  if (!isPowerOfTwo(g.hostVisibleWindowSize)) {
    throw new UsageError(`--gpu pci-bar-size: ${g.hostVisibleWindowSize} is not a power of two`);
  }
  return g;
}

function isPowerOfTwo(n: number): boolean {
  return n > 0 && Number.isInteger(Math.log2(n)) && 2 ** Math.log2(n) === n;
}

const TOUCH_SCHEMA_KEYS = { path: "string", width: "uint", height: "uint", name: "string" } as const;

function parseInput(text: string): InputConfig {
  const entries = parseKeyValues(text, "--input");
  if (entries.length !== 1 || entries[0].key !== undefined) {
    throw new UsageError(`--input: expected TYPE or TYPE[key=value,...], got "${text}"`);
  }
  const v = entries[0].value;
  const kindText = v.kind === "scalar" ? v.text : v.kind === "variant" ? v.name : "";
  if (!(INPUT_KINDS as readonly string[]).includes(kindText)) {
    throw new UsageError(`--input: unknown input type "${kindText}" (known: ${INPUT_KINDS.join(", ")})`);
  }
  const kind = kindText as InputKind;
  const input: InputConfig = { kind };
  if (v.kind !== "variant") return input;
  const touch = TOUCH_KINDS.includes(kind);
  const o = decodeKeyValues({
    option: `--input ${kind}`,
    positional: "path",
    keys: touch ? TOUCH_SCHEMA_KEYS : { path: "string" },
  }, v.items);
  if (o.path !== undefined) input.path = o.path as string;
  if (o.width !== undefined) input.width = o.width as number;
  if (o.height !== undefined) input.height = o.height as number;
  if (o.name !== undefined) input.name = o.name as string;
  if (input.width === 0 || input.height === 0) throw new UsageError(`--input ${kind}: width and height must be >= 1`);
  return input;
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
      const eq = arg.indexOf("=");
      const name = eq >= 0 ? arg.slice(2, eq) : arg.slice(2);
      if (eq >= 0) inline = arg.slice(eq + 1);
      shown = `--${name}`;
      flag = BY_LONG.get(name);
    } else if (arg.startsWith("-") && arg.length > 1) {
      shown = arg.slice(0, 2);
      flag = BY_SHORT.get(arg[1]);
      if (arg.length > 2) inline = arg.slice(2);
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

function checkReadableFile(path: string, what: string): void {
  let info: Deno.FileInfo;
  try {
    info = Deno.statSync(path);
  } catch (e) {
    throw new UsageError(`${what} "${path}": ${e instanceof Deno.errors.NotFound ? "no such file" : errorText(e)}`);
  }
  if (info.isDirectory) throw new UsageError(`${what} "${path}": is a directory`);
  try {
    Deno.openSync(path, { read: true }).close();
  } catch (e) {
    throw new UsageError(`${what} "${path}": cannot be read: ${errorText(e)}`);
  }
}

// ---- The parser ----

/** Parses `run`'s arguments (after the word "run"). Throws UsageError for any invalid input. */
export function parseRunArgs(argv: readonly string[], options: ParseRunOptions = {}): RunCommand {
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
  for (const o of all) {
    const f = o.flag;
    if (!f.repeatable) {
      const prev = seen.get(f.long);
      if (prev === o.source) throw new UsageError(`option --${f.long} given more than once`);
      seen.set(f.long, o.source);
    }
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
      case "block":
        cfg.blocks.push(parseBlock(v, "--block"));
        break;
      case "disk":
        cfg.blocks.push(parseBlock(v, "--disk", { ro: true, root: false }));
        break;
      case "rwdisk":
        cfg.blocks.push(parseBlock(v, "--rwdisk", { ro: false, root: false }));
        break;
      case "root":
        cfg.blocks.push(parseBlock(v, "--root", { ro: true, root: true }));
        break;
      case "rwroot":
        cfg.blocks.push(parseBlock(v, "--rwroot", { ro: false, root: true }));
        break;
      case "serial":
        cfg.serials.push(parseSerial(v));
        break;
      case "net":
        cfg.nets.push(parseNet(v));
        break;
      case "gpu":
        cfg.gpu = parseGpu(v);
        break;
      case "input":
        cfg.inputs.push(parseInput(v));
        break;
      case "vsock":
        cfg.vsock = parseVsock(v, "--vsock");
        break;
      case "cid":
        cfg.vsock = parseVsock(v, "--cid");
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
      default:
        throw new UsageError(`option --${f.long} is not handled`);
    }
  }
  if (seen.has("vsock") && seen.has("cid")) throw new UsageError("give --vsock or --cid, not both");

  // The kernel: exactly one positional argument, or --kernel.
  if (positionals.length > 1) {
    throw new UsageError(`expected one KERNEL argument, got ${positionals.length}: ${positionals.join(" ")}`);
  }
  if (positionals.length === 1 && kernelFlag !== undefined && seen.get("kernel") === "command line") {
    throw new UsageError("give the kernel either as --kernel or as the KERNEL argument, not both");
  }
  const kernel = positionals[0] ?? kernelFlag;
  if (kernel === undefined || kernel === "") throw new UsageError("missing KERNEL argument (see denovm run --help)");
  cfg.kernel = kernel;

  validateSerials(cfg.serials);
  if (cfg.blocks.filter((b) => b.root).length > 1) throw new UsageError("only one root disk can be given");
  // crosvm arch/src/serial.rs set_default_serial_parameters: with no console port, COM1 (if not
  // configured) becomes a stdout + stdin console.
  if (!cfg.serials.some((s) => s.console) && !cfg.serials.some((s) => s.hardware === "serial" && s.num === 1)) {
    const stdinTaken = cfg.serials.some((s) => s.stdin);
    cfg.serials.unshift({ ...defaultSerial(), stdin: !stdinTaken });
  }

  if (options.checkFiles ?? true) {
    checkReadableFile(cfg.kernel, "kernel");
    if (cfg.initrd !== undefined) checkReadableFile(cfg.initrd, "initrd");
    for (const b of cfg.blocks) checkReadableFile(b.path, "block");
  }
  return { config: cfg, printConfig, help: false };
}

/** crosvm's cross-port checks (cmdline.rs, the serial loop of TryFrom<RunCommand> for Config). */
function validateSerials(serials: SerialConfig[]): void {
  const keys = new Set<string>();
  for (const s of serials) {
    const key = `${s.hardware}:${s.num}`;
    if (keys.has(key)) throw new UsageError(`--serial: hardware=${s.hardware} num=${s.num} given twice`);
    keys.add(key);
  }
  const count = (pred: (s: SerialConfig) => boolean) => serials.filter(pred).length;
  if (count((s) => s.console) > 1) throw new UsageError("--serial: more than one console");
  if (count((s) => s.earlycon) > 1) throw new UsageError("--serial: more than one earlycon");
  if (count((s) => s.stdin) > 1) throw new UsageError("--serial: more than one port reads stdin");
}
