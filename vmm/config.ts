// The typed VM configuration: what `denovm run` resolves its command line (or --cfg file) into, and
// what the VMM builds a VM from. Field meanings and defaults follow crosvm's `run` options
// (google/crosvm src/crosvm/cmdline.rs RunCommand, devices/src/serial_device.rs SerialParameters,
// devices/src/virtio/block/mod.rs DiskOption, devices/src/virtio/gpu/parameters.rs GpuParameters).

import { SERIAL_PORTS } from "./arch/layout.ts";

/** Where a serial port's output goes (crosvm SerialType). */
export const SERIAL_TYPES = ["stdout", "sink", "file", "syslog", "unix", "unix-stream"] as const;
export type SerialType = typeof SERIAL_TYPES[number];
/** Which device model backs a serial port (crosvm SerialHardware). */
export const SERIAL_HARDWARE = ["serial", "virtio-console", "debugcon"] as const;
export type SerialHardware = typeof SERIAL_HARDWARE[number];

export interface SerialConfig {
  type: SerialType;
  hardware: SerialHardware;
  /** Port number, 1..4 (COM1..COM4 for hardware=serial, hvc0..hvc3 for virtio-console). */
  num: number;
  /** Output file or socket path (type=file, unix, unix-stream). */
  path?: string;
  /** File to read guest input from instead of stdin. */
  input?: string;
  /** This port is the guest's console (`console=` on the kernel command line). */
  console: boolean;
  /** This port is the early console (`earlycon=`); hardware=serial only. */
  earlycon: boolean;
  /** Host stdin feeds this port. */
  stdin: boolean;
  /** virtio-console port name. */
  name?: string;
}

export interface BlockConfig {
  path: string;
  ro: boolean;
  /** Adds `root=/dev/vdX ro|rw` to the kernel command line; at most one block may have it. */
  root: boolean;
  /** Discard (punch holes) is supported. crosvm default: true. */
  sparse: boolean;
  /** Reported logical block size in bytes. crosvm default: 512. */
  blockSize: number;
  /** virtio-blk serial (VIRTIO_BLK_T_GET_ID), at most 20 ASCII bytes. */
  id?: string;
  /** Open with O_DIRECT. */
  direct: boolean;
  /** Lock the image (exclusive when writable, shared when read-only). crosvm default: true. */
  lock?: boolean;
}

/** A virtio-pmem device (crosvm src/crosvm/config.rs PmemOption): a host file as the guest's /dev/pmemN. */
export interface PmemConfig {
  path: string;
  ro: boolean;
  /** Adds `root=/dev/pmemN ro|rw` to the kernel command line; at most one block or pmem may have it. */
  root: boolean;
}

export interface NetConfig {
  tapName?: string;
  tapFd?: number;
  hostIp?: string;
  netmask?: string;
  mac?: string;
  vqPairs?: number;
}

/** crosvm's `--input` kinds (src/crosvm/config.rs InputDeviceOption). */
export const INPUT_KINDS = [
  "keyboard",
  "mouse",
  "multi-touch",
  "single-touch",
  "evdev",
  "switches",
  "rotary",
  "trackpad",
  "multi-touch-trackpad",
  "custom",
] as const;
export type InputKind = typeof INPUT_KINDS[number];
/** The input kinds that are touch surfaces, with a width and height. */
export const TOUCH_INPUT_KINDS: readonly InputKind[] = [
  "multi-touch",
  "single-touch",
  "trackpad",
  "multi-touch-trackpad",
];

export interface InputConfig {
  kind: InputKind;
  /** Event source socket or device node (crosvm requires it; denovm can also feed input from its API). */
  path?: string;
  width?: number;
  height?: number;
  name?: string;
  /** The custom kind's JSON description (crosvm's config-path). */
  configPath?: string;
}

/** One virtual display of the GPU (crosvm DisplayParameters). */
export interface GpuDisplayConfig {
  /** "windowed", "borderless_full_screen", or denovm's "web" (served on 127.0.0.1:port). */
  mode: string;
  width: number;
  height: number;
  /** denovm extension: a port for a remote view of this display. */
  port?: number;
  hidden?: boolean;
  refreshRate?: number;
}

export type GpuBackend = "2d" | "virglrenderer" | "3d" | "gfxstream";

export interface GpuConfig {
  /** Rendering backend; the alias "3d" is resolved to "virglrenderer" by the parser. */
  backend: GpuBackend;
  /** Context types (capset names) the guest may create, e.g. virgl, virgl2, venus. */
  contextTypes: string[];
  displays: GpuDisplayConfig[];
  /** Deprecated crosvm keys, kept as given; they also produce a display when both are set. */
  width?: number;
  height?: number;
  /** Bytes of the host-visible window, virtio-gpu shared-memory region 1 (crosvm's `pci-bar-size`). Default 8 GiB. */
  hostVisibleWindowSize: number;
  fixedBlobMapping: boolean;
  /** denovm: write a Chrome trace-event JSON file of every GPU command (trace=PATH). */
  tracePath?: string;
  egl: boolean;
  gles: boolean;
  glx: boolean;
  surfaceless: boolean;
  vulkan: boolean;
  udmabuf: boolean;
}

/** crosvm's virtio-fs cache policies (devices/src/virtio/fs/config.rs CachePolicy). */
export const SHARED_DIR_CACHE_POLICIES = ["never", "auto", "always"] as const;
export type SharedDirCachePolicy = typeof SHARED_DIR_CACHE_POLICIES[number];

/**
 * One `--shared-dir PATH:TAG:type=fs[:key=value...]` (crosvm's SharedDir with its fs Config): a host
 * directory served to the guest as virtio-fs by a virtiofsd process the VMM starts (vmm/virtiofsd.ts).
 */
export interface SharedDirConfig {
  /** The host directory shared. */
  path: string;
  /** The tag the guest mounts (`mount -t virtiofs TAG DIR`). */
  tag: string;
  /** crosvm's `cache`: how freely the guest may cache file data. Default "auto". */
  cache: SharedDirCachePolicy;
  /** crosvm's `timeout`: seconds the guest keeps entries and attributes. Default 5. */
  timeoutSecs: number;
  /** crosvm's `writeback`: the guest may cache and coalesce writes. Default false. */
  writeback: boolean;
  /** crosvm's `posix_acl`: POSIX ACLs (and so xattrs) on the shared files. Default true. */
  posixAcl: boolean;
  /** crosvm's `security_ctx`: the guest sends the security context of files it creates. Default false (crosvm: true). */
  securityCtx: boolean;
  /** crosvm's `rewrite-security-xattrs`: the guest's security.* xattrs (but security.selinux) kept as user.virtiofs.security.*. */
  rewriteSecurityXattrs: boolean;
}

/** A device served by a vhost-user back end (`--vhost-user`, vmm/cli/devices/vhost_user.ts). */
export interface VhostUserConfig {
  /** crosvm's type name (devices/vhost_user/device_types.ts), or "generic". */
  type: string;
  /** The virtio device ID the guest sees. */
  deviceId: number;
  /** The back end's socket. */
  socket: string;
  /** Largest queue size offered to the driver (a power of two; default 32768, as crosvm). */
  maxQueueSize?: number;
  /** Queue count (default: the back end's, through MQ, else the type's). */
  queues?: number;
  /** Configuration-space bytes read from the back end (default: the type's; none for a generic device). */
  configSize?: number;
  /**
   * An input device's event socket (`denovm device input --event-socket PATH`): the library's vm.input
   * drives the device through it (vmm/library/input_remote.ts). Library only; no command-line key.
   */
  eventSocket?: string;
}

/** Host back ends of the sound device (crosvm's `backend=` values that denovm has). */
export const SOUND_BACKENDS = ["null", "file"] as const;
export type SoundBackendKind = (typeof SOUND_BACKENDS)[number];

/** A virtio-snd device: crosvm's `--virtio-snd` keys (devices/src/virtio/snd/parameters.rs), denovm's capture_path. */
export interface SoundConfig {
  backend: SoundBackendKind;
  /** Input streams take samples from the host (capture_path for the file back end); otherwise silence. */
  capture: boolean;
  numOutputDevices: number;
  numInputDevices: number;
  numOutputStreams: number;
  numInputStreams: number;
  /** file back end: directory of the output streams' WAV files (stream-<id>.wav). */
  playbackPath?: string;
  /** file back end: most data bytes per output file; 0: no limit but the WAV format's. */
  playbackSize: number;
  /** file back end: the WAV file input streams capture (with capture=true). */
  capturePath?: string;
  cardIndex: number;
}

export interface VmConfig {
  /** Kernel image path (bzImage or ELF vmlinux). */
  kernel: string;
  initrd?: string;
  /** User kernel command line pieces (`-p`), joined with spaces after the generated part. */
  params: string[];
  memMiB: number;
  cpus: number;
  serials: SerialConfig[];
  blocks: BlockConfig[];
  nets: NetConfig[];
  rng: boolean;
  balloon: boolean;
  inputs: InputConfig[];
  /** virtio-snd devices (`--virtio-snd`); absent: none. */
  sounds?: SoundConfig[];
  /** virtio-vsock: guest CID and the host Unix socket of the userspace vsock (Firecracker's design). */
  vsock?: { cid: number; udsPath?: string };
  gpu?: GpuConfig;
  /** `--shared-dir` directories served as virtio-fs, in order. */
  sharedDirs?: SharedDirConfig[];
  /** Devices served by vhost-user back ends, in command-line order; guest RAM is then shareable (a memfd). */
  vhostUser?: VhostUserConfig[];
  /** Keep trying to connect to a missing or silent vhost-user socket this long (ms; crosvm's default: no retry). */
  vhostUserConnectTimeoutMs?: number;
  /** Control socket path. */
  socket?: string;
  /** Serve the GDB remote protocol on 127.0.0.1:gdb (vmm/gdb/); the VM waits paused for the debugger. */
  gdb?: number;
  /**
   * Add a virtio-console device with the guest agent's named port (org.denovm.agent; agent/README.md),
   * for the library's vm.exec(). Off by default; `--agent` on the command line.
   */
  agent?: boolean;
  /** Add `virtio_mmio.device=` arguments for each virtio-mmio device to the kernel command line. */
  virtioMmioCmdline: boolean;
  /** virtio-pmem devices (`--pmem`), /dev/pmem0, /dev/pmem1, ... in order; absent means none. */
  pmems?: PmemConfig[];
  logLevel?: string;
}

/** The largest TCP port (ports are 16 bits, RFC 793), for --gdb. */
export const MAX_TCP_PORT = 0xffff;

/** crosvm's default guest memory in MiB (cmdline.rs, `--mem`: "default: 256"). */
export const DEFAULT_MEM_MIB = 256;
/** crosvm's default number of vCPUs (cmdline.rs, `--cpus num-cores`: "default: 1"). */
export const DEFAULT_CPUS = 1;
/** crosvm's default reported block size (devices/src/virtio/block/mod.rs block_option_block_size_default). */
export const DEFAULT_BLOCK_SIZE = 512;
/** crosvm's default `pci-bar-size`, the host-visible window: 1 << 33 = 8 GiB (gpu/parameters.rs GpuParameters::default). */
export const DEFAULT_GPU_HOST_VISIBLE_WINDOW_SIZE = 2 ** 33;
export { DEFAULT_DISPLAY_HEIGHT, DEFAULT_DISPLAY_WIDTH } from "../devices/virtio/gpu/defaults.ts";
/** crosvm's default display refresh rate in Hz (vm_control/src/gpu.rs DEFAULT_REFRESH_RATE). */
export const DEFAULT_REFRESH_RATE = 60;
/** crosvm's x86_64 base kernel command line (x86_64/src/lib.rs get_base_linux_cmdline). */
export const BASE_KERNEL_CMDLINE = "panic=-1";

/** crosvm's serial default: COM1 writes to stdout, reads stdin, and is the console (arch/src/serial.rs). */
export function defaultSerial(): SerialConfig {
  return { type: "stdout", hardware: "serial", num: 1, console: true, earlycon: false, stdin: true };
}

/** A config with every default filled in, for `kernel`. */
export function defaultVmConfig(kernel: string): VmConfig {
  return {
    kernel,
    params: [],
    memMiB: DEFAULT_MEM_MIB,
    cpus: DEFAULT_CPUS,
    serials: [defaultSerial()],
    blocks: [],
    nets: [],
    rng: true,
    balloon: true,
    inputs: [],
    virtioMmioCmdline: false,
  };
}

/** A GPU config with crosvm's defaults (gpu/parameters.rs GpuParameters::default) under `partial`. */
export function gpuConfig(partial: Partial<GpuConfig> = {}): GpuConfig {
  return {
    backend: "2d",
    contextTypes: [],
    displays: [],
    hostVisibleWindowSize: DEFAULT_GPU_HOST_VISIBLE_WINDOW_SIZE,
    fixedBlobMapping: false,
    egl: true,
    gles: true,
    glx: false,
    surfaceless: true,
    vulkan: false,
    udmabuf: false,
    ...partial,
  };
}

/** Linux's name for the virtio block device at `index` in probe order: vda..vdz, vdaa, vdab, ... */
export function diskName(index: number, prefix = "/dev/vd"): string {
  const ALPHABET_LEN = 26; // a..z
  let suffix = "";
  let i = index;
  for (;;) {
    suffix = String.fromCharCode("a".charCodeAt(0) + (i % ALPHABET_LEN)) + suffix;
    i = Math.floor(i / ALPHABET_LEN);
    if (i === 0) break;
    i -= 1;
  }
  return prefix + suffix;
}

/** crosvm's serial ports are a BTreeMap keyed by (SerialHardware, num): this is the enum's order. */
const HARDWARE_ORDER: Record<SerialHardware, number> = { "serial": 0, "virtio-console": 1, "debugcon": 2 };

/**
 * The kernel command line for `cfg`, built piece for piece as crosvm builds it (x86_64/src/lib.rs: the
 * base line, then arch/src/serial.rs get_serial_cmdline, then the config's `params` in order), each piece
 * joined with one space:
 *  1. the base, "panic=-1";
 *  2. `console=ttyS{num-1}` (8250) or `console=hvc{num-1}` (virtio-console) for every port marked console,
 *     in (hardware, num) order: serial ports first, then virtio-console ports; a debugcon port adds none.
 *     Linux makes the last one /dev/console;
 *  3. `earlycon=uart8250,io,0x<port>` for the earlycon port;
 *  4. each `-p` piece exactly as given (crosvm neither trims nor splits them);
 *  5. what the configuration adds after the user's pieces (crosvm pushes it onto `params` when the config
 *     is validated): `root=/dev/vdX ro|rw` for the root block, else `root=/dev/pmemN ro|rw` for the root pmem
 *     (crosvm looks at block devices first, then pmem ones);
 *  6. `deviceArgs`: denovm's own additions (the `virtio_mmio.device=` arguments), which crosvm has no
 *     counterpart of.
 */
export function kernelCommandLine(cfg: VmConfig, deviceArgs: readonly string[] = []): string {
  const parts: string[] = [BASE_KERNEL_CMDLINE];
  const serials = [...cfg.serials].sort((a, b) =>
    HARDWARE_ORDER[a.hardware] - HARDWARE_ORDER[b.hardware] || a.num - b.num
  );
  for (const s of serials) {
    if (!s.console) continue;
    if (s.hardware === "serial") parts.push(`console=ttyS${s.num - 1}`);
    else if (s.hardware === "virtio-console") parts.push(`console=hvc${s.num - 1}`);
  }
  const early = serials.find((s) => s.earlycon && s.hardware === "serial");
  const earlyPort = early ? SERIAL_PORTS[early.num - 1] : undefined;
  if (earlyPort) parts.push(`earlycon=uart8250,io,0x${earlyPort.base.toString(16)}`);
  parts.push(...cfg.params);
  const rootIndex = cfg.blocks.findIndex((b) => b.root);
  const pmemRoot = (cfg.pmems ?? []).findIndex((p) => p.root);
  if (rootIndex >= 0) parts.push(`root=${diskName(rootIndex)} ${cfg.blocks[rootIndex].ro ? "ro" : "rw"}`);
  else if (pmemRoot >= 0) parts.push(`root=/dev/pmem${pmemRoot} ${cfg.pmems![pmemRoot].ro ? "ro" : "rw"}`);
  parts.push(...deviceArgs);
  return parts.join(" ");
}
