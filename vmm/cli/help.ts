// The table of denovm's command-line flags: the `run` parser takes its list of known flags from here, and
// `--help` prints it. Flag names, keys and defaults follow crosvm's `run` (google/crosvm
// src/crosvm/cmdline.rs); the wording is denovm's own.

import { MAX_VCPUS } from "../arch/cpu.ts";
import type { CrosvmOnlyKey, KeyType } from "./keyvalue.ts";
import { CONTROL_COMMAND_LIST } from "./control.ts";

/** denovm's version, printed by `denovm version` when deno.json has no "version". */
export const DENOVM_VERSION = "0.1.0";

export interface FlagKey {
  /** e.g. "ro=BOOL" */
  form: string;
  help: string;
  /** A crosvm key denovm accepts with a warning or refuses by name (keyvalue.ts CrosvmOnlyKey). */
  crosvm?: { action: "ignore" | "refuse"; note: string; type?: KeyType };
}

/**
 * What a crosvm flag that denovm does not act on does here: "ignore" accepts it with one warning line
 * saying what it means here; "refuse" stops with one line naming it as known but unsupported (exit 35).
 */
export interface CrosvmOnlyFlag {
  action: "ignore" | "refuse";
  note: string;
}

export interface FlagDef {
  long: string;
  short?: string;
  /** Argument name for options; absent for switches. */
  arg?: string;
  repeatable?: boolean;
  help: string;
  keys?: FlagKey[];
  /** Set for crosvm flags denovm accepts without acting on them, or refuses by name. */
  crosvm?: CrosvmOnlyFlag;
  /** crosvm's deprecated spelling: the option to use instead (run warns once, as crosvm does). */
  deprecated?: string;
}

/** Notes shared by several rows of the table. */
const NO_PCI = "denovm's devices are virtio-mmio: there is no PCI address";
const SPLIT_QUEUES = "denovm's virtio devices use split virtqueues";
const ONE_LOOP = "denovm serves every device from one event loop";
const NO_FIRMWARE = "denovm loads the kernel directly, with no firmware that would boot from a disk";

/** crosvm DiskOption keys denovm accepts without acting on them (--block and its older forms). */
const CROSVM_BLOCK_KEYS: FlagKey[] = [
  {
    form: "bootindex=N",
    help: "(crosvm) BIOS boot order",
    crosvm: { action: "ignore", note: NO_FIRMWARE, type: "uint" },
  },
  {
    form: "packed-queue[=BOOL]",
    help: "(crosvm) packed virtqueue",
    crosvm: { action: "ignore", note: SPLIT_QUEUES, type: "bool" },
  },
  {
    form: "multiple-workers[=BOOL]",
    help: "(crosvm) one worker thread per queue",
    crosvm: { action: "ignore", note: ONE_LOOP, type: "bool" },
  },
  {
    form: "async-executor=epoll|uring",
    help: "(crosvm) the async executor behind the disk",
    crosvm: { action: "ignore", note: "denovm does disk I/O with pread/pwrite on its event loop", type: "string" },
  },
  {
    form: "dontcache[=BOOL]",
    help: "(crosvm) uncached reads and writes",
    crosvm: { action: "ignore", note: "use direct=true for I/O that bypasses the page cache", type: "bool" },
  },
  { form: "pci-address=ADDR", help: "(crosvm) PCI slot", crosvm: { action: "ignore", note: NO_PCI, type: "string" } },
];

export const RUN_FLAGS: readonly FlagDef[] = [
  {
    long: "params",
    short: "p",
    arg: "PARAMS",
    repeatable: true,
    help: "extra kernel command line text; may repeat, the pieces are joined with spaces",
  },
  { long: "initrd", short: "i", arg: "PATH", help: "initial ramdisk to load" },
  {
    long: "kernel",
    arg: "PATH",
    help: "kernel image (bzImage or ELF vmlinux); the same as the positional KERNEL argument",
  },
  {
    long: "mem",
    short: "m",
    arg: "[size=]MiB",
    help: "guest memory",
    keys: [{ form: "size=NUM", help: "guest memory in MiB (default: 256)" }],
  },
  {
    long: "cpus",
    short: "c",
    arg: "[num-cores=]N",
    help: "virtual CPUs",
    keys: [
      { form: "num-cores=NUM", help: `number of vCPUs, 1..${MAX_VCPUS} (default: 1)` },
      { form: "boot-cpu=N", help: "the vCPU that boots; denovm boots vCPU 0, so only 0 is accepted (default: 0)" },
      {
        form: "clusters=[[CPU,...],...]",
        help: "(crosvm) CPU clusters for the guest's scheduler",
        crosvm: { action: "ignore", note: "denovm describes every vCPU as one package with no clusters" },
      },
    ],
  },
  { long: "socket", short: "s", arg: "PATH", help: "control socket to create (for stop, balloon, gpu ...)" },
  {
    long: "gdb",
    arg: "PORT",
    help: "serve the GDB remote protocol on 127.0.0.1:PORT (vCPUs as threads); the VM waits paused for the debugger",
  },
  {
    long: "block",
    short: "b",
    arg: "[path=]PATH[,key=value...]",
    repeatable: true,
    help: "virtio block device; the first one is /dev/vda, the next /dev/vdb, ...",
    keys: [
      { form: "path=PATH", help: "disk image; the key may be left out when it comes first" },
      { form: "ro[=BOOL]", help: "read-only (default: false)" },
      { form: "root[=BOOL]", help: "add root=/dev/vdX ro|rw to the kernel command line; only one (default: false)" },
      { form: "sparse[=BOOL]", help: "support discard (default: true)" },
      { form: "block-size=BYTES", help: "reported block size, a multiple of 512 (default: 512)" },
      { form: "id=STRING", help: "device serial, up to 20 ASCII characters (default: none)" },
      { form: "direct[=BOOL]", help: "open with O_DIRECT, bypassing the host page cache (default: false)" },
      { form: "lock[=BOOL]", help: "lock the image so no other VM writes it at the same time (default: true)" },
      ...CROSVM_BLOCK_KEYS,
    ],
  },
  {
    long: "disk",
    short: "d",
    arg: "PATH[,key=value...]",
    repeatable: true,
    help: "(deprecated, use --block) read-only block device; same keys as --block",
  },
  { long: "rwdisk", arg: "PATH[,key=value...]", repeatable: true, help: "(deprecated) writable block device" },
  { long: "root", short: "r", arg: "PATH[,key=value...]", help: "(deprecated) read-only root block device" },
  { long: "rwroot", arg: "PATH[,key=value...]", help: "(deprecated) writable root block device" },
  {
    long: "pmem",
    arg: "[path=]PATH[,key=value...]",
    repeatable: true,
    help: "virtio-pmem device: a regular file mapped into the guest as /dev/pmem0, /dev/pmem1, ... (its size " +
      "rounded up to 2 MiB); the guest's flushes fsync it",
    keys: [
      { form: "path=PATH", help: "the file; the key may be left out when it comes first" },
      { form: "ro[=BOOL]", help: "read-only: mapped read-only, flushes refused (default: false)" },
      {
        form: "root[=BOOL]",
        help: "add root=/dev/pmemN ro|rw to the kernel command line; only one root block or pmem (default: false)",
      },
      {
        form: "vma-size=BYTES",
        help: "(crosvm, experimental) back the device with an anonymous memory area of this size",
        crosvm: { action: "refuse", note: "denovm's pmem devices are files", type: "uint" },
      },
      {
        form: "swap-interval-ms=NUM",
        help: "(crosvm, experimental) swap the vma-size area out every NUM ms",
        crosvm: { action: "refuse", note: "denovm's pmem devices are files (no vma-size area to swap)", type: "uint" },
      },
    ],
  },
  {
    long: "pmem-device",
    arg: "PATH",
    repeatable: true,
    help: "(deprecated, use --pmem PATH,ro=true) read-only virtio-pmem device",
    deprecated: "--pmem",
  },
  {
    long: "rw-pmem-device",
    arg: "PATH",
    repeatable: true,
    help: "(deprecated, use --pmem PATH) writable virtio-pmem device",
    deprecated: "--pmem",
  },
  {
    long: "serial",
    arg: "type=TYPE[,key=value...]",
    repeatable: true,
    help: "serial port; without any --serial, COM1 is stdout + stdin and the console",
    keys: [
      { form: "type=stdout|sink|file|syslog|unix|unix-stream", help: "where output goes (default: sink)" },
      { form: "hardware=serial|virtio-console|debugcon", help: "device model (default: serial, an 8250 UART)" },
      { form: "num=1..4", help: "port number: COM1..COM4 or hvc0..hvc3 (default: 1)" },
      { form: "path=PATH", help: "output file (type=file) or socket (type=unix, unix-stream)" },
      { form: "input=PATH", help: "file to read input from, instead of stdin" },
      { form: "console[=BOOL]", help: "the guest console (console=ttyS<num-1> or hvc<num-1>); only one" },
      { form: "earlycon[=BOOL]", help: "the early console (earlycon=uart8250,io,PORT); hardware=serial, only one" },
      { form: "stdin[=BOOL]", help: "host stdin feeds this port; only one" },
      { form: "name=NAME", help: "virtio-console port name" },
      {
        form: "input-unix-stream[=BOOL]",
        help: "type=unix-stream reads input from its socket too (denovm always does)",
      },
      {
        form: "out-timestamp[=BOOL]",
        help: "(crosvm) prefix each output line with a timestamp",
        crosvm: { action: "ignore", note: "denovm passes the guest's output through unchanged", type: "bool" },
      },
      {
        form: "pci-address=ADDR",
        help: "(crosvm) PCI slot",
        crosvm: { action: "ignore", note: NO_PCI, type: "string" },
      },
    ],
  },
  {
    long: "net",
    arg: "key=value[,key=value...]",
    repeatable: true,
    help: "virtio network device: give tap-name, or tap-fd, or host-ip + netmask + mac",
    keys: [
      { form: "tap-name=NAME", help: "an existing persistent TAP interface" },
      { form: "tap-fd=FD", help: "an open TAP file descriptor" },
      { form: "host-ip=IP", help: "IPv4 address of the host end of a new TAP interface" },
      { form: "netmask=MASK", help: "netmask of that interface" },
      { form: "mac=MAC", help: "guest MAC address, xx:xx:xx:xx:xx:xx" },
      { form: "vq-pairs=N", help: "number of rx/tx queue pairs (default: 1)" },
      {
        form: "vhost-net[=[device=PATH]]",
        help: "(crosvm) serve the queues in the host kernel's vhost-net",
        crosvm: { action: "ignore", note: "denovm serves virtio-net in userspace (the guest sees the same device)" },
      },
      {
        form: "packed-queue[=BOOL]",
        help: "(crosvm) packed virtqueue",
        crosvm: { action: "ignore", note: SPLIT_QUEUES, type: "bool" },
      },
      {
        form: "mrg_rxbuf[=BOOL]",
        help: "(crosvm) offer VIRTIO_NET_F_MRG_RXBUF",
        crosvm: {
          action: "ignore",
          note: "denovm's virtio-net does not offer mergeable receive buffers",
          type: "bool",
        },
      },
      {
        form: "pci-address=ADDR",
        help: "(crosvm) PCI slot",
        crosvm: { action: "ignore", note: NO_PCI, type: "string" },
      },
    ],
  },
  {
    long: "tap-name",
    arg: "NAME",
    repeatable: true,
    help: "virtio network device on the persistent TAP interface NAME",
    deprecated: "--net tap-name=NAME",
  },
  {
    long: "tap-fd",
    arg: "FD",
    repeatable: true,
    help: "virtio network device on the open TAP file descriptor FD",
    deprecated: "--net tap-fd=FD",
  },
  {
    long: "host-ip",
    arg: "IP",
    help: "with --netmask and --mac: a virtio network device on a new TAP interface (also spelled --host_ip)",
    deprecated: "--net host-ip=IP,netmask=MASK,mac=MAC",
  },
  { long: "netmask", arg: "MASK", help: "see --host-ip", deprecated: "--net host-ip=IP,netmask=MASK,mac=MAC" },
  { long: "mac", arg: "MAC", help: "see --host-ip", deprecated: "--net host-ip=IP,netmask=MASK,mac=MAC" },
  {
    long: "gpu",
    arg: "[backend=]BACKEND[,key=value...]",
    help: "virtio-gpu device",
    keys: [
      { form: "backend=2d|virglrenderer|3d|gfxstream", help: "renderer; 3d means virglrenderer (default: 2d)" },
      { form: "context-types=A:B:...", help: "context types the guest may use, e.g. virgl:virgl2:venus" },
      {
        form: "displays=[[DISPLAY],...]",
        help: "displays; DISPLAY keys: mode=windowed[W,H]|web[W,H]|borderless_full_screen, hidden, " +
          "refresh-rate=HZ, dpi=[X,Y], port=PORT (web: served on 127.0.0.1:PORT with a per-VM token; " +
          "default: one 1280x1024 display)",
      },
      { form: "width=W,height=H", help: "(deprecated, use displays) one display of W x H" },
      { form: "egl[=BOOL]", help: "render with EGL (default: true)" },
      { form: "gles[=BOOL]", help: "use GLES rather than desktop GL (default: true)" },
      { form: "glx[=BOOL]", help: "render with GLX (default: false)" },
      { form: "surfaceless[=BOOL]", help: "surfaceless EGL context (default: true)" },
      { form: "vulkan[=BOOL]", help: "enable Vulkan (default: false)" },
      { form: "udmabuf[=BOOL]", help: "create guest blobs with udmabuf (default: false)" },
      { form: "pci-bar-size=SIZE", help: "host-visible memory window in bytes, a power of two (default: 8G)" },
      { form: "fixed-blob-mapping[=BOOL]", help: "map blobs at fixed guest addresses (default: false)" },
      { form: "trace=PATH", help: "write every GPU command with its bytes copied as Chrome trace JSON (Perfetto)" },
      {
        form: "max-num-displays=N",
        help: "(crosvm) the most displays the guest may add",
        crosvm: { action: "ignore", note: "denovm's GPU has exactly the displays given", type: "uint" },
      },
      {
        form: "cache-path=PATH",
        help: "(crosvm) shader cache directory",
        crosvm: { action: "ignore", note: "denovm's renderers keep no shader cache", type: "string" },
      },
      {
        form: "cache-size=SIZE",
        help: "(crosvm) shader cache size",
        crosvm: { action: "ignore", note: "denovm's renderers keep no shader cache", type: "string" },
      },
      {
        form: "wsi=vk",
        help: "(crosvm) Vulkan window-system integration",
        crosvm: { action: "ignore", note: "denovm presents displays without a host window system", type: "string" },
      },
      {
        form: "pci-address=ADDR",
        help: "(crosvm) PCI slot",
        crosvm: { action: "ignore", note: NO_PCI, type: "string" },
      },
    ],
  },
  {
    long: "gpu-display",
    arg: "DISPLAY",
    repeatable: true,
    help: "one more display of the GPU (DISPLAY keys as in --gpu displays); adds a 2d GPU if there is none",
    deprecated: "--gpu displays=[[DISPLAY]]",
  },
  {
    long: "display-window-keyboard",
    help: "(crosvm) take keyboard input from the display window",
    crosvm: {
      action: "ignore",
      note: "denovm opens no display window; add --input keyboard (a web display, mode=web, forwards keys to it)",
    },
  },
  {
    long: "display-window-mouse",
    help: "(crosvm) take mouse input from the display window",
    crosvm: {
      action: "ignore",
      note: "denovm opens no display window; add --input mouse (a web display, mode=web, forwards the pointer to it)",
    },
  },
  {
    long: "input",
    arg: "TYPE[[key=value,...]]",
    repeatable: true,
    help: "virtio-input device",
    keys: [
      { form: "keyboard[path=PATH]", help: "keyboard" },
      { form: "mouse[path=PATH]", help: "relative pointer" },
      { form: "multi-touch[path=PATH,width=W,height=H,name=N]", help: "multi-touch screen" },
      { form: "single-touch[path=PATH,width=W,height=H,name=N]", help: "single-touch screen (tablet)" },
      { form: "trackpad[path=PATH,width=W,height=H,name=N]", help: "trackpad" },
      { form: "evdev[path=PATH]", help: "pass through a host evdev device" },
      { form: "switches[path=PATH]", help: "switches (lid, tablet mode)" },
      { form: "rotary[path=PATH]", help: "rotary encoder" },
      { form: "multi-touch-trackpad[path=PATH,width=W,height=H,name=N]", help: "multi-touch trackpad (button pad)" },
      { form: "custom[path=PATH,config-path=FILE]", help: "a device described by a JSON file (crosvm's format)" },
      { form: "path=PATH", help: "Unix socket of virtio_input_event records to connect to (8 bytes each)" },
    ],
  },
  {
    long: "virtio-snd",
    arg: "[key=value,...]",
    repeatable: true,
    help: "virtio-snd sound device (crosvm's keys)",
    keys: [
      { form: "capture=BOOL", help: "input streams take samples from the host (default false: silence)" },
      { form: "backend=null|file", help: "null drops playback; file writes WAV files (default null)" },
      { form: "num_output_devices=N", help: "output PCM devices (default 1)" },
      { form: "num_input_devices=N", help: "input PCM devices (default 1)" },
      { form: "num_output_streams=N", help: "output streams per device (default 1)" },
      { form: "num_input_streams=N", help: "input streams per device (default 1)" },
      { form: "playback_path=DIR", help: "file: output stream N plays into DIR/stream-N.wav" },
      { form: "playback_size=BYTES", help: "file: most data bytes per output file (default 0: no limit)" },
      { form: "card_index=N", help: "the card's number in logs" },
      { form: "capture_path=FILE", help: "(denovm) file with capture=true: the WAV file input streams capture" },
      {
        form: "client_type=TYPE",
        help: "(crosvm) CRAS client type",
        crosvm: { action: "ignore", note: "for crosvm's CRAS back end, which denovm does not have" },
      },
      {
        form: "socket_type=TYPE",
        help: "(crosvm) CRAS socket type",
        crosvm: { action: "ignore", note: "for crosvm's CRAS back end, which denovm does not have" },
      },
      {
        form: "output_device_config=[[effects=[..]],..]",
        help: "(crosvm) per-device CRAS settings",
        crosvm: { action: "ignore", note: "stream effects are for crosvm's CRAS back end" },
      },
      {
        form: "input_device_config=[[effects=[..]],..]",
        help: "(crosvm) per-device CRAS settings",
        crosvm: { action: "ignore", note: "stream effects are for crosvm's CRAS back end" },
      },
      {
        form: "unmap_guest_memory_on_fork=BOOL",
        help: "(crosvm) MADV_DONTFORK on guest memory",
        crosvm: { action: "ignore", note: "denovm forks no process that would see guest memory", type: "bool" },
      },
    ],
  },
  {
    long: "vsock",
    arg: "[cid=]CID",
    help: "virtio-vsock device",
    keys: [
      { form: "cid=CID", help: "guest context ID, 3 or more" },
      {
        form: "uds-path=PATH",
        help: "host Unix socket (denovm's userspace vsock): `CONNECT <port>` reaches the guest; guest connections " +
          "to port P reach PATH_P (default: <control socket or /tmp/denovm-PID>.vsock)",
      },
      {
        form: "device=PATH",
        help: "(crosvm) the host's vhost-vsock device node",
        crosvm: { action: "ignore", note: "denovm's vsock is userspace (see uds-path)", type: "string" },
      },
      {
        form: "pci-address=ADDR",
        help: "(crosvm) PCI slot",
        crosvm: { action: "ignore", note: NO_PCI, type: "string" },
      },
    ],
  },
  { long: "cid", arg: "CID", help: "(deprecated, use --vsock) guest vsock context ID" },
  {
    long: "shared-dir",
    arg: "PATH:TAG[:type=fs][:key=value...]",
    repeatable: true,
    help: "share a host directory as virtio-fs through the machine's virtiofsd (/usr/lib/qemu/virtiofsd), started " +
      "on a private socket and stopped with the VM; the guest mounts it with `mount -t virtiofs TAG DIR`. crosvm's " +
      "keys, separated by `:`; a key virtiofsd has no equivalent of is refused (uid, gid, uidmap, gidmap, " +
      "negative_timeout, ascii_casefold, dax, max_dynamic_perm, max_dynamic_xattr, unmap_guest_memory_on_fork, " +
      "privileged_quota_uids, ugid_map: accepted only at crosvm's default)",
    keys: [
      { form: "type=fs|p9", help: "fs (virtio-fs); p9, crosvm's default, is refused: denovm has no 9P device" },
      { form: "cache=never|auto|always", help: "how freely the guest caches file data (default auto)" },
      { form: "timeout=SECONDS", help: "how long the guest keeps entries and attributes (default 5)" },
      { form: "writeback=BOOL", help: "the guest may cache and coalesce writes (default false)" },
      { form: "posix_acl=BOOL", help: "POSIX ACLs, stored as xattrs (default true)" },
      {
        form: "security_ctx=BOOL",
        help: "the guest sends the security context of files it creates (default false; crosvm's is true, but " +
          "virtiofsd's security_label fails file creation in a guest without SELinux)",
      },
      {
        form: "rewrite-security-xattrs=BOOL",
        help: "keep the guest's security.* xattrs (but security.selinux) as user.virtiofs.security.* (default false)",
      },
    ],
  },
  {
    long: "vhost-user",
    arg: "[type=]TYPE,socket=PATH[,max-queue-size=N]",
    repeatable: true,
    help: "a device served by a vhost-user back end listening on PATH; guest RAM is then shared with it (a memfd)",
    keys: [
      {
        form: "type=TYPE",
        help: "crosvm's device types: net, block, console, rng, balloon, scsi, 9p, input, vsock, sound, fs, " +
          "mac80211-hwsim, scmi, tpm (gpu, iommu, pmem, video-*, wl, pvclock, media are refused); or generic",
      },
      { form: "socket=PATH", help: "the back end's Unix socket" },
      { form: "max-queue-size=N", help: "largest queue size offered to the guest, a power of two (default 32768)" },
      { form: "device-id=N", help: "(denovm, type=generic) the virtio device ID the guest sees" },
      {
        form: "queues=N",
        help: "(denovm) queue count (default: the back end's through MQ, else the type's; generic: 1)",
      },
      {
        form: "config-size=N",
        help: "(denovm) configuration-space bytes read from the back end, at most 256 (default: the type's; " +
          "generic: none)",
      },
      {
        form: "pci-address=ADDR",
        help: "(crosvm) PCI slot",
        crosvm: { action: "ignore", note: NO_PCI, type: "string" },
      },
    ],
  },
  {
    long: "vhost-user-connect-timeout-ms",
    arg: "MS",
    help: "keep trying this long while a --vhost-user socket is missing or has no listener (default: one try)",
  },
  ...["keyboard", "mouse", "switches", "rotary", "evdev"].map((kind): FlagDef => ({
    long: kind,
    arg: "PATH",
    repeatable: true,
    help: `${kind} input device reading events from PATH`,
    deprecated: `--input ${kind}[path=PATH]`,
  })),
  ...["multi-touch", "single-touch", "trackpad"].map((kind): FlagDef => ({
    long: kind,
    arg: "[path=]PATH[,width=W,height=H,name=N]",
    repeatable: true,
    help: `${kind} input device reading events from PATH`,
    deprecated: `--input ${kind}[path=PATH,...]`,
  })),
  {
    long: "disable-sandbox",
    help: "accepted for crosvm's command lines: denovm has no sandbox (every device runs in this one process)",
  },
  {
    long: "irqchip",
    arg: "kernel|split|userspace",
    help: "interrupt controller emulation; denovm uses KVM's in-kernel one, so only kernel is accepted",
  },
  {
    long: "split-irqchip",
    help: "(crosvm, deprecated) --irqchip split",
    crosvm: { action: "refuse", note: "denovm uses KVM's in-kernel irqchip (--irqchip kernel)" },
  },
  {
    long: "vhost-net",
    help: "(crosvm, deprecated) serve every --net device with the kernel's vhost-net",
    crosvm: { action: "ignore", note: "denovm's virtio-net moves packets itself, without /dev/vhost-net" },
  },
  {
    long: "net-vq-pairs",
    arg: "N",
    help: "(crosvm, deprecated) virtio-net queue pairs of every --net device; denovm's have one, so only 1",
  },
  {
    long: "name",
    arg: "NAME",
    help: "(crosvm) the VM's process name",
    crosvm: { action: "ignore", note: "denovm keeps the process name (it is a Deno process)" },
  },
  {
    long: "syslog-tag",
    arg: "TAG",
    help: "(crosvm, deprecated) syslog tag",
    crosvm: { action: "ignore", note: "denovm logs to stderr, not syslog" },
  },
  {
    long: "no-i8042",
    help: "(crosvm) leave out the i8042 keyboard controller",
    crosvm: { action: "ignore", note: "denovm keeps the i8042: the guest's reset goes through it" },
  },
  {
    long: "bios",
    arg: "PATH",
    help: "(crosvm) boot BIOS or firmware from PATH",
    crosvm: { action: "refuse", note: "denovm boots a Linux kernel directly, with no firmware" },
  },
  { long: "no-rng", help: "do not add a virtio-rng device" },
  { long: "no-balloon", help: "do not add a virtio-balloon device" },
  {
    long: "agent",
    help: "add a virtio-console port org.denovm.agent for the guest agent (agent/README.md; the library's vm.exec)",
  },
  {
    long: "virtio-mmio-cmdline",
    help: "describe each virtio-mmio device to the kernel with a virtio_mmio.device= argument",
  },
  {
    long: "cfg",
    arg: "FILE",
    repeatable: true,
    help: "JSON file of options: keys are long flag names, values are strings, numbers, booleans or " +
      "arrays; command-line flags come after it",
  },
  {
    long: "restore",
    arg: "PATH",
    help: "start from the snapshot in directory PATH (denovm snapshot take PATH SOCKET) instead of booting. " +
      "KERNEL may be left out (crosvm always needs the full command line): the snapshot's configuration is " +
      "used, and only host-side options may be given, which replace the snapshot's: --socket, --gdb, --serial, " +
      "--block (and its older forms), --net (and its older forms), --vsock/--cid. With KERNEL, the whole " +
      "command line is checked against the snapshot's configuration (exit 35 at the first difference) and its " +
      "host-side options are used; the kernel and initrd are not read. Not with --print-config",
  },
  {
    long: "suspended",
    help: "start with the vCPUs and devices suspended (after a --restore, or before the first instruction): " +
      "denovm resume --full SOCKET lets the VM run; not with --gdb",
  },
  {
    long: "suspended-vcpus",
    help: "start with the vCPUs suspended, the devices awake: denovm resume SOCKET lets them run; not with --gdb",
  },
  { long: "print-config", help: "print the resolved configuration as JSON and exit" },
  { long: "help", short: "h", help: "show this help" },
];

/** The control commands, sent to a running VM's control socket (the SOCKET argument comes last). */
export const CONTROL_COMMANDS: readonly { usage: string; help: string }[] = CONTROL_COMMAND_LIST;

/** The key a FlagKey's form names: "ro[=BOOL]" → "ro", "vhost-net[=[device=PATH]]" → "vhost-net". */
function keyName(form: string): string {
  return form.split(/[=[]/)[0];
}

/** The crosvm-only keys of run's `--<long>` option, for its key=value schema (keyvalue.ts KvSchema.crosvmOnly). */
export function crosvmOnlyKeys(long: string): Record<string, CrosvmOnlyKey> {
  const flag = RUN_FLAGS.find((f) => f.long === long);
  const out: Record<string, CrosvmOnlyKey> = {};
  for (const k of flag?.keys ?? []) if (k.crosvm) out[keyName(k.form)] = k.crosvm;
  return out;
}

/** The note --help prints after a crosvm flag or key that denovm does not act on. */
function crosvmNote(c: { action: "ignore" | "refuse"; note: string }): string {
  return c.action === "ignore" ? `accepted and ignored: ${c.note}` : `refused: ${c.note}`;
}

function flagUsage(f: FlagDef): string {
  const names = (f.short ? `-${f.short}, ` : "    ") + `--${f.long}`;
  return f.arg ? `${names} ${f.arg}` : names;
}

function wrap(text: string, indent: string, width = 100): string[] {
  const lines: string[] = [];
  let line = "";
  for (const word of text.split(" ")) {
    if (line !== "" && indent.length + line.length + 1 + word.length > width) {
      lines.push(indent + line);
      line = word;
    } else line = line === "" ? word : `${line} ${word}`;
  }
  if (line !== "") lines.push(indent + line);
  return lines;
}

/** `denovm run --help`. */
export function runHelp(): string {
  const out = [
    "Usage: denovm run [OPTIONS] KERNEL",
    "       denovm run --restore PATH [--suspended] [OPTIONS] [KERNEL]",
    "",
    "Start a VM from the kernel image KERNEL, or from a snapshot (--restore). Options that take key=value",
    "lists separate the pairs with commas; the first key may be left out, and a key alone means key=true.",
    "",
    "Options:",
  ];
  for (const f of RUN_FLAGS) {
    out.push(`  ${flagUsage(f)}${f.repeatable ? "  (may repeat)" : ""}`);
    let help = f.help;
    if (f.deprecated) help = `(deprecated, use ${f.deprecated}) ${help}`;
    if (f.crosvm) help = `${help}; ${crosvmNote(f.crosvm)}`;
    out.push(...wrap(help, "        "));
    for (const k of f.keys ?? []) {
      out.push(`        ${k.form}`);
      out.push(...wrap(k.crosvm ? `${k.help}; ${crosvmNote(k.crosvm)}` : k.help, "            "));
    }
  }
  return out.join("\n") + "\n";
}

/** `denovm --help`. */
export function mainHelp(): string {
  const out = [
    "Usage: denovm [--log-level LEVEL] COMMAND [ARGS]",
    "",
    "A crosvm-compatible virtual machine monitor.",
    "",
    "Global options:",
    "  --log-level LEVEL  off, error, warn, info (default), debug or trace; MODULE=LEVEL pairs may follow,",
    "                     separated by commas",
    "  --extended-status  exit with the reason the VM ended (32 reset, 33 crash, 34 guest panic,",
    "                     36 watchdog); without it a VM that ends exits 0, as crosvm does",
    "  --no-syslog, --syslog-tag TAG",
    "                     accepted for crosvm's command lines: denovm logs to stderr, not syslog",
    "  -h, --help         show this help",
    "",
    "Every --flag=value and -X=value is split at its first '=', as crosvm does.",
    "",
    "Commands:",
    "  run [OPTIONS] KERNEL       start a VM (see denovm run --help)",
    "  run --restore PATH [OPTIONS]",
    "                             start a VM from the snapshot in directory PATH",
    "  device TYPE [OPTIONS]      run a vhost-user device backend",
    "  version                    print the version",
  ];
  const width = Math.max(...CONTROL_COMMANDS.map((c) => c.usage.length)) + 2;
  for (const c of CONTROL_COMMANDS) out.push(`  ${c.usage.padEnd(width)}${c.help}`);
  out.push("", "Exit codes: 0 success (and any VM ending without --extended-status), 32 reset, 33 crash,");
  out.push("34 guest panic, 36 watchdog (with --extended-status), 35 invalid arguments, 1 host error.");
  return out.join("\n") + "\n";
}
