// The configuration a restore runs with. The VM's shape comes from the snapshot: memory, vCPUs and every
// device the guest has seen (its drivers are bound to them, their state is in the snapshot). What a restore
// may change is the host side of those devices: disk image paths, where serial ports write and read, the
// control socket, the vsock socket and CID, tap devices and MACs, the GPU's display ports and trace file.
// checkRestoreConfig refuses a given configuration whose shape differs, naming the first difference in the
// words of the command line (exit 35, as crosvm refuses bad arguments); restoredConfig builds the result.

import { ConfigError } from "../../core/exit.ts";
import type {
  BlockConfig,
  GpuConfig,
  GpuDisplayConfig,
  InputConfig,
  NetConfig,
  SerialConfig,
  SerialHardware,
  VmConfig,
} from "../config.ts";

/**
 * Host-side resources to re-point without a full configuration (the library's Vm.restore overrides).
 * List elements pair with the saved devices by index (serial ports by hardware and num); a structural field
 * given here must equal the saved one. A Partial<VmConfig> is one.
 */
export interface RestoreOverrides {
  kernel?: string;
  initrd?: string;
  params?: string[];
  memMiB?: number;
  cpus?: number;
  serials?: Partial<SerialConfig>[];
  blocks?: Partial<BlockConfig>[];
  nets?: NetConfig[];
  rng?: boolean;
  balloon?: boolean;
  inputs?: Partial<InputConfig>[];
  vsock?: { cid?: number; udsPath?: string };
  gpu?: Partial<Omit<GpuConfig, "displays">> & { displays?: Partial<GpuDisplayConfig>[] };
  socket?: string;
  gdb?: number;
  agent?: boolean;
  virtioMmioCmdline?: boolean;
  logLevel?: string;
}

const plural = (n: number, one: string, many = `${one}s`) => `${n} ${n === 1 ? one : many}`;

/** A serial port's identity: crosvm keys its serial ports by (hardware, num). */
const serialKey = (s: { hardware?: SerialHardware; num?: number }) =>
  `hardware=${s.hardware ?? "serial"},num=${s.num ?? 1}`;

/** The rendering backend with the parser's alias resolved ("3d" is virglrenderer). */
const backendName = (b: GpuConfig["backend"]) => b === "3d" ? "virglrenderer" : b;

/**
 * Throws ConfigError (exit 35) naming the first structural difference between the configuration a snapshot
 * was taken with (`saved`) and the one given for its restore: memory, vCPUs, each block device's count and
 * read-only flag, net devices, rng, balloon, input kinds in order, vsock, the GPU (backend, displays), serial
 * ports (hardware, num, console), the agent port, and --virtio-mmio-cmdline. Host-side fields may differ.
 */
export function checkRestoreConfig(saved: VmConfig, given: VmConfig): void {
  const fail = (message: string): never => {
    throw new ConfigError(message);
  };
  if (given.memMiB !== saved.memMiB) {
    fail(`--mem ${given.memMiB} given; the snapshot was taken with ${saved.memMiB} MiB`);
  }
  if (given.cpus !== saved.cpus) fail(`--cpus ${given.cpus} given; the snapshot has ${plural(saved.cpus, "vCPU")}`);

  if (given.blocks.length !== saved.blocks.length) {
    fail(`${plural(given.blocks.length, "--block device")} given; the snapshot has ${saved.blocks.length}`);
  }
  saved.blocks.forEach((s, i) => {
    const g = given.blocks[i];
    const rw = (ro: boolean) => ro ? "read-only" : "writable";
    if (g.ro !== s.ro) fail(`--block ${i + 1} (${g.path}) is ${rw(g.ro)}; in the snapshot it is ${rw(s.ro)}`);
  });

  const [givenPmems, savedPmems] = [given.pmems ?? [], saved.pmems ?? []];
  if (givenPmems.length !== savedPmems.length) {
    fail(`${plural(givenPmems.length, "--pmem device")} given; the snapshot has ${savedPmems.length}`);
  }
  savedPmems.forEach((s, i) => {
    const g = givenPmems[i];
    const rw = (ro: boolean) => ro ? "read-only" : "writable";
    if (g.ro !== s.ro) fail(`--pmem ${i + 1} (${g.path}) is ${rw(g.ro)}; in the snapshot it is ${rw(s.ro)}`);
  });

  if (given.nets.length !== saved.nets.length) {
    fail(`${plural(given.nets.length, "--net device")} given; the snapshot has ${saved.nets.length}`);
  }
  const optional = (flag: string, device: string, g: boolean, s: boolean) => {
    if (g === s) return;
    fail(
      g
        ? `a ${device} device given (no ${flag}); the snapshot was taken with ${flag}`
        : `${flag} given; the snapshot has a ${device} device`,
    );
  };
  optional("--no-rng", "virtio-rng", given.rng, saved.rng);
  optional("--no-balloon", "virtio-balloon", given.balloon, saved.balloon);

  if (given.inputs.length !== saved.inputs.length) {
    fail(`${plural(given.inputs.length, "--input device")} given; the snapshot has ${saved.inputs.length}`);
  }
  saved.inputs.forEach((s, i) => {
    const g = given.inputs[i];
    if (g.kind !== s.kind) fail(`--input ${i + 1} is ${g.kind}; the snapshot's input ${i + 1} is ${s.kind}`);
  });

  const [givenSnd, savedSnd] = [given.sounds ?? [], saved.sounds ?? []];
  if (givenSnd.length !== savedSnd.length) {
    fail(`${plural(givenSnd.length, "--virtio-snd device")} given; the snapshot has ${savedSnd.length}`);
  }

  if (!!given.vsock !== !!saved.vsock) {
    fail(
      given.vsock
        ? "--vsock given; the snapshot has no vsock device"
        : "no --vsock given; the snapshot has a vsock device",
    );
  }

  const [gg, sg] = [given.gpu, saved.gpu];
  if (!!gg !== !!sg) fail(gg ? "--gpu given; the snapshot has no GPU" : "no --gpu given; the snapshot has a GPU");
  if (gg && sg) {
    if (backendName(gg.backend) !== backendName(sg.backend)) {
      fail(`--gpu backend=${gg.backend} given; the snapshot's GPU has backend=${sg.backend}`);
    }
    if (gg.displays.length !== sg.displays.length) {
      fail(`${plural(gg.displays.length, "GPU display")} given; the snapshot has ${sg.displays.length}`);
    }
  }

  const givenSerials = new Map(given.serials.map((s) => [serialKey(s), s]));
  const savedSerials = new Map(saved.serials.map((s) => [serialKey(s), s]));
  for (const key of savedSerials.keys()) {
    if (!givenSerials.has(key)) fail(`no --serial ${key} given; the snapshot has that port`);
  }
  for (const [key, g] of givenSerials) {
    const s = savedSerials.get(key);
    if (!s) fail(`--serial ${key} given; the snapshot has no such port`);
    else if (g.console !== s.console) {
      fail(`--serial ${key} console=${g.console} given; the snapshot's port has console=${s.console}`);
    }
  }

  if (!!given.agent !== !!saved.agent) {
    fail(
      given.agent
        ? "--agent given; the snapshot has no agent port"
        : "no --agent given; the snapshot has the agent port",
    );
  }
  if (given.virtioMmioCmdline !== saved.virtioMmioCmdline) {
    fail(
      given.virtioMmioCmdline
        ? "--virtio-mmio-cmdline given; the snapshot was taken without it"
        : "no --virtio-mmio-cmdline given; the snapshot was taken with it",
    );
  }
}

/**
 * The configuration a restore builds: the saved one's structure, with its host-side resources taken from
 * `given` (a full configuration, checked with checkRestoreConfig) and then from `overrides` (checked the same
 * way once merged into the result). A saved tap fd is dropped (it named a descriptor of the process that took
 * the snapshot). Throws ConfigError naming the first structural difference.
 */
export function restoredConfig(saved: VmConfig, given?: VmConfig, overrides?: RestoreOverrides): VmConfig {
  let out = structuredClone(saved);
  for (const net of out.nets) delete net.tapFd;
  if (given) {
    checkRestoreConfig(saved, given);
    out = withHostSide(out, given);
  }
  if (overrides) {
    const merged = mergeOverrides(out, overrides);
    checkRestoreConfig(saved, merged);
    out = withHostSide(out, merged);
  }
  return out;
}

/** Sets `obj[key]` to `value`, or removes the key when the value is undefined (a config holds no undefined). */
function put<T extends object, K extends keyof T>(obj: T, key: K, value: T[K] | undefined): void {
  if (value === undefined) delete obj[key];
  else obj[key] = value;
}

/** `base` (structure kept) with the host-side fields of `from`, a configuration of the same structure. */
function withHostSide(base: VmConfig, from: VmConfig): VmConfig {
  const out = structuredClone(base);
  out.blocks.forEach((b, i) => {
    const f = from.blocks[i];
    b.path = f.path;
    b.direct = f.direct;
    put(b, "lock", f.lock);
  });
  const fromSerials = new Map(from.serials.map((s) => [serialKey(s), s]));
  for (const s of out.serials) {
    const f = fromSerials.get(serialKey(s))!;
    s.type = f.type;
    s.stdin = f.stdin;
    put(s, "path", f.path);
    put(s, "input", f.input);
  }
  out.nets.forEach((n, i) => {
    const f = from.nets[i];
    put(n, "tapName", f.tapName);
    put(n, "tapFd", f.tapFd);
    put(n, "hostIp", f.hostIp);
    put(n, "netmask", f.netmask);
    put(n, "mac", f.mac);
  });
  out.inputs.forEach((input, i) => put(input, "path", from.inputs[i].path));
  out.pmems?.forEach((p, i) => p.path = from.pmems?.[i]?.path ?? p.path);
  if (out.vsock && from.vsock) {
    out.vsock.cid = from.vsock.cid;
    put(out.vsock, "udsPath", from.vsock.udsPath);
  }
  if (out.gpu && from.gpu) {
    const fromGpu = from.gpu;
    out.gpu.displays.forEach((d, i) => put(d, "port", fromGpu.displays[i].port));
    put(out.gpu, "tracePath", fromGpu.tracePath);
  }
  put(out, "socket", from.socket);
  put(out, "gdb", from.gdb);
  put(out, "logLevel", from.logLevel);
  return out;
}

/** `base` with `o` laid over it: list elements by index (serial ports by hardware and num), extra ones appended. */
function mergeOverrides(base: VmConfig, o: RestoreOverrides): VmConfig {
  const out = structuredClone(base);
  const scalars = [
    "kernel",
    "initrd",
    "params",
    "memMiB",
    "cpus",
    "rng",
    "balloon",
    "socket",
    "gdb",
    "agent",
    "virtioMmioCmdline",
    "logLevel",
  ] as const;
  for (const key of scalars) {
    if (o[key] !== undefined) (out as unknown as Record<string, unknown>)[key] = structuredClone(o[key]);
  }
  const byIndex = <T>(list: T[], over: Partial<T>[] | undefined) => {
    over?.forEach((v, i) => list[i] = { ...list[i], ...definedFields(v) } as T);
  };
  byIndex(out.blocks, o.blocks);
  byIndex(out.nets, o.nets);
  byIndex(out.inputs, o.inputs);
  for (const s of o.serials ?? []) {
    const i = out.serials.findIndex((t) => serialKey(t) === serialKey(s));
    if (i >= 0) out.serials[i] = { ...out.serials[i], ...definedFields(s) };
    else out.serials.push({ hardware: "serial", num: 1, ...definedFields(s) } as SerialConfig);
  }
  if (o.vsock) out.vsock = { ...out.vsock, ...definedFields(o.vsock) } as VmConfig["vsock"];
  if (o.gpu) {
    const { displays, ...rest } = o.gpu;
    const gpu = { ...out.gpu, ...definedFields(rest) } as GpuConfig;
    gpu.displays = [...(out.gpu?.displays ?? [])];
    byIndex(gpu.displays, displays);
    out.gpu = gpu;
  }
  return out;
}

/** The fields of `v` whose value is not undefined. */
function definedFields<T extends object>(v: T): Partial<T> {
  return Object.fromEntries(Object.entries(v).filter(([, x]) => x !== undefined)) as Partial<T>;
}
