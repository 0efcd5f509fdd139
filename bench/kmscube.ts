// kmscube benchmark: real Mesa (Debian's virgl Gallium driver) in a Debian guest under QEMU 10 TCG
// runs `kmscube -c N` twice in the same run: once with denovm's GPU device behind QEMU's
// vhost-user-gpu front end (`denovm device gpu`), once with QEMU's own in-process virgl
// (`-device virtio-gpu-gl-device`). Reports the frames per second of each (kmscube's own
// "Rendered N frames in T sec" line), their ratio, and the bytes denovm's counters saw copied per
// frame: the guest's transfers, and the display path's (the scanout read back for QEMU's front end and
// the bytes sent to it). Last line: {"bench":"kmscube","fps_ratio":..,"bytes_per_frame":..,...}.
// The two display paths do what each VMM does: denovm reads the scanout back for the front end at most
// once per refresh period of the display's mode (60 Hz) and sends the tiles that changed; QEMU's
// egl-headless reads every frame of its GL scanout back into its console surface.
//
// Also the harness the vhost-user-gpu test uses (exported): prerequisites (QEMU 10 from
// bookworm-backports, the Mesa guest, the Debian kernel; scripts/qemu-backports.sh and
// scripts/mesa-guest.sh fetch and build them once), the QEMU command line, a guest with its serial
// console on stdio and the HMP monitor on a socket.

import { join } from "node:path";
import { progress, REPO_ROOT, result } from "./_common.ts";
import { type ConsoleExit, ConsoleProcess } from "../test/support/guest_process.ts";
import { DeviceProcess, JsonLineClient, microvmArgs } from "../test/support/qemu.ts";

export const KMSCUBE_BENCH = "kmscube";
/** Markers scripts/mesa-guest.sh's /sbin/denovm-init prints. */
export const GUEST_START = "DENOVM-GUEST-START";
export const GUEST_END = "DENOVM-GUEST-END";
/** virglrenderer's library (Debian libvirglrenderer1), which `denovm device gpu` loads. */
export const VIRGLRENDERER_LIB = "/usr/lib/x86_64-linux-gnu/libvirglrenderer.so.1";
/** Guest RAM: Mesa and llvmpipe-backed virgl need more than the small test guests. */
export const MESA_GUEST_MEM_MIB = 512;
/**
 * Guest kernel words: serial console, exit on panic, fixed timing figures under TCG (as
 * test/support/qemu.ts), and no fbdev emulation: without fbcon nothing redraws the screen after a
 * client exits, so the last frame a client showed stays in the device's framebuffer.
 */
export const MESA_KERNEL_ARGS = [
  "console=ttyS0",
  "panic=-1",
  "quiet",
  "tsc_early_khz=2000000",
  "lpj=4000000",
  "drm_kms_helper.fbdev_emulation=0",
];
/** The TCG-only timing words of MESA_KERNEL_ARGS: under KVM the guest calibrates its clocks itself. */
const TCG_TIMING_ARGS = ["tsc_early_khz=2000000", "lpj=4000000"];
/** MESA_KERNEL_ARGS for a guest under KVM (denovm's or QEMU's). */
export const MESA_KVM_KERNEL_ARGS: string[] = MESA_KERNEL_ARGS.filter((a) => !TCG_TIMING_ARGS.includes(a));

export interface MesaSetup {
  qemu: string;
  /** QEMU_MODULE_DIR for the unpacked QEMU (its modules, not the host's QEMU 7.2 ones). */
  moduleDir: string;
  /** -L: firmware (qboot.rom). */
  dataDir: string;
  kernel: string;
  rootImage: string;
  initramfs: string;
}

async function script(name: string): Promise<{ dir?: string; error?: string }> {
  const out = await new Deno.Command("bash", {
    args: [join(REPO_ROOT, "scripts", name)],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const stderr = new TextDecoder().decode(out.stderr).trim();
  if (!out.success) return { error: `scripts/${name} failed: ${stderr.split("\n").pop()}` };
  return { dir: new TextDecoder().decode(out.stdout).trim().split("\n").pop() };
}

/** Everything the Mesa guest runs need, fetched/built on first use; a string is the reason it cannot run. */
export async function mesaPrerequisites(): Promise<MesaSetup | string> {
  if (Deno.build.os !== "linux" || Deno.build.arch !== "x86_64") return "needs x86_64 Linux";
  try {
    Deno.statSync(VIRGLRENDERER_LIB);
  } catch {
    return `${VIRGLRENDERER_LIB} missing (apt-get install libvirglrenderer1)`;
  }
  const q = await script("qemu-backports.sh");
  if (q.error) return q.error;
  const m = await script("mesa-guest.sh");
  if (m.error) return m.error;
  const k = await script("debian-kernel.sh");
  if (k.error) return k.error;
  const version = Deno.readTextFileSync(`${k.dir}/version`).trim();
  const root = `${q.dir}/root`;
  return {
    qemu: `${root}/usr/bin/qemu-system-x86_64`,
    moduleDir: `${root}/usr/lib/x86_64-linux-gnu/qemu`,
    dataDir: `${root}/usr/share/qemu`,
    kernel: `${k.dir}/vmlinuz`,
    rootImage: `${m.dir}/root.ext4`,
    initramfs: `${m.dir}/initramfs-${version}.cpio`,
  };
}

export interface MesaGuestOptions {
  /** The GPU: denovm's back end on a vhost-user socket, or QEMU's in-process virgl. */
  gpu: { vhostUserSocket: string } | { qemuVirgl: true };
  /** Shell command the guest runs (busybox sh is not there: this is Debian's /bin/sh). */
  command: string;
  /** HMP monitor socket path (screendump). */
  monitor?: string;
  /** Kill QEMU after this long (a hang guard; default 300 s). */
  hangGuardMs?: number;
  /** QEMU's accelerator: TCG (default) or KVM (the nested KVM host: bench/kmscube_kvm.ts). */
  accel?: "tcg" | "kvm";
  /** The display's size (virtio-gpu's xres, yres; QEMU's default 1280x800 when unset). */
  display?: { width: number; height: number };
  /**
   * QEMU's display (default QEMU_EGL_HEADLESS, which reads every frame back into its console surface;
   * QEMU_DBUS_HEADLESS keeps GL scanouts as textures for D-Bus clients, and none connect).
   */
  qemuDisplay?: string;
  /** More environment for QEMU (hostRenderingEnv()). */
  env?: Record<string, string>;
}

/** A GL-capable display without a GPU: QEMU's egl-headless on Mesa's software GBM. */
export const QEMU_EGL_HEADLESS = "egl-headless,rendernode=/dev/null";
/** QEMU's D-Bus display, peer to peer (no bus), with GL on Mesa's software GBM: no client unless one is added. */
export const QEMU_DBUS_HEADLESS = "dbus,p2p=yes,gl=on,rendernode=/dev/null";

/** The QEMU 10 command line for a Mesa guest. */
export function mesaQemuArgs(s: MesaSetup, o: MesaGuestOptions): string[] {
  const mem = MESA_GUEST_MEM_MIB;
  // Kernel command line: the guest command travels as denovm_cmd="..." (init's environment).
  if (o.command.includes('"')) throw new Error("the guest command cannot contain a double quote (kernel quoting)");
  const args = [
    "-L",
    s.dataDir,
    "-bios",
    "qboot.rom",
    ...microvmArgs(mem).map((a) => o.accel === "kvm" ? a.replace("accel=tcg", "accel=kvm") : a),
    "-nodefaults",
    "-no-reboot",
    "-serial",
    "stdio",
    "-display",
    o.qemuDisplay ?? QEMU_EGL_HEADLESS,
    "-drive",
    `file=${s.rootImage},if=none,id=root,format=raw,readonly=on`,
    "-device",
    "virtio-blk-device,drive=root",
    "-kernel",
    s.kernel,
    "-initrd",
    s.initramfs,
    "-append",
    [...(o.accel === "kvm" ? MESA_KVM_KERNEL_ARGS : MESA_KERNEL_ARGS), `denovm_cmd="${o.command}"`].join(" "),
  ];
  if ("vhostUserSocket" in o.gpu) {
    args.push("-chardev", `socket,id=gpu,path=${o.gpu.vhostUserSocket}`, "-device", "vhost-user-gpu,chardev=gpu");
  } else {
    const size = o.display ? `,xres=${o.display.width},yres=${o.display.height}` : "";
    args.push("-device", `virtio-gpu-gl-device${size}`);
  }
  if (o.monitor) args.push("-monitor", `unix:${o.monitor},server=on,wait=off`);
  return args;
}

/** AMD's vendor string in /proc/cpuinfo's vendor_id (CPUID leaf 0). */
const AMD_VENDOR = "AuthenticAMD";
/** CPU family 6 of an AMD CPU: the 32-bit Athlons to LLVM (llvm/lib/TargetParser/Host.cpp). */
const AMD_FAMILY_ATHLON = 6;

/**
 * The environment the host's GL (virglrenderer's, QEMU's egl-headless) needs here: empty, or Mesa's
 * softpipe with its draw module off LLVM when llvmpipe cannot run. QEMU TCG's `-cpu max` (the nested KVM
 * host's CPU) says AMD family 6 ("QEMU TCG CPU"), which LLVM takes for a 32-bit Athlon: llvmpipe's
 * first shader then aborts the process ("LLVM ERROR: 64-bit code requested on a subtarget that doesn't
 * support it!"). Both sides of a comparison get the same environment.
 */
export function hostRenderingEnv(cpuinfo = readCpuinfo()): Record<string, string> {
  const field = (name: string) => cpuinfo.match(new RegExp(`^${name}\\s*:\\s*(.*)$`, "m"))?.[1].trim();
  if (field("vendor_id") === AMD_VENDOR && Number(field("cpu family")) === AMD_FAMILY_ATHLON) {
    return { GALLIUM_DRIVER: "softpipe", DRAW_USE_LLVM: "false" };
  }
  return {};
}

function readCpuinfo(): string {
  try {
    return Deno.readTextFileSync("/proc/cpuinfo");
  } catch {
    return "";
  }
}

/** A Mesa guest under QEMU 10 with its console on stdio (stdin writable: the guest may `read`). */
export class MesaGuest {
  readonly args: string[];
  readonly #proc: ConsoleProcess;
  readonly #stdin: WritableStreamDefaultWriter<Uint8Array>;

  constructor(s: MesaSetup, o: MesaGuestOptions) {
    this.args = mesaQemuArgs(s, o);
    const child = new Deno.Command(s.qemu, {
      args: this.args,
      env: { QEMU_MODULE_DIR: s.moduleDir, GBM_ALWAYS_SOFTWARE: "1", ...o.env },
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.#stdin = child.stdin.getWriter();
    this.#proc = new ConsoleProcess(child, { label: "QEMU", hangGuardMs: o.hangGuardMs ?? 300_000 });
  }

  get output(): string {
    return this.#proc.output;
  }

  /** Resolves when the output matches `re`; rejects if QEMU exits first. */
  waitFor(re: RegExp): Promise<void> {
    return this.#proc.waitFor(re);
  }

  /** Type on the guest's serial console. */
  async type(text: string): Promise<void> {
    await this.#stdin.write(new TextEncoder().encode(text));
  }

  wait(): Promise<ConsoleExit> {
    return this.#proc.done.finally(() => this.#stdin.close().catch(() => {}));
  }

  kill(): void {
    this.#proc.kill();
  }
}

/** One HMP command on QEMU's monitor socket; resolves with its output (terminal escapes included). */
export async function hmp(monitorPath: string, command: string): Promise<string> {
  const conn = await Deno.connect({ transport: "unix", path: monitorPath });
  const dec = new TextDecoder();
  const reader = conn.readable.getReader();
  let text = "";
  const untilPrompt = async (count: number) => {
    while ((text.match(/\(qemu\) /g) ?? []).length < count) {
      const { value, done } = await reader.read();
      if (done) throw new Error(`QEMU monitor closed: ${text}`);
      text += dec.decode(value, { stream: true });
    }
  };
  try {
    await untilPrompt(1);
    await conn.write(new TextEncoder().encode(`${command}\n`));
    await untilPrompt(2);
    return text;
  } finally {
    reader.releaseLock();
    conn.close();
  }
}

/** A binary PPM (P6, maxval 255) as RGB bytes: QEMU's screendump format. */
export function parsePpm(data: Uint8Array): { width: number; height: number; rgb: Uint8Array } {
  // Header: "P6" whitespace width whitespace height whitespace maxval, one whitespace byte, pixels.
  const head = new TextDecoder("latin1").decode(data.subarray(0, 64));
  const m = head.match(/^P6\s+(\d+)\s+(\d+)\s+(\d+)\s/);
  if (!m || m[3] !== "255") throw new Error(`not an 8-bit binary PPM: ${JSON.stringify(head.slice(0, 20))}`);
  const width = Number(m[1]), height = Number(m[2]);
  const rgb = data.subarray(m[0].length, m[0].length + width * height * 3);
  if (rgb.length !== width * height * 3) throw new Error("PPM shorter than its header says");
  return { width, height, rgb };
}

/** kmscube's last "Rendered N frames in T sec (F fps)" line. */
export function kmscubeRate(output: string): { frames: number; seconds: number; fps: number } | undefined {
  const all = [...output.matchAll(/Rendered (\d+) frames in ([\d.]+) sec \(([\d.]+) fps\)/g)];
  const m = all.at(-1);
  return m ? { frames: Number(m[1]), seconds: Number(m[2]), fps: Number(m[3]) } : undefined;
}

/** The GL renderer kmscube printed (`renderer: "..."`). */
export function kmscubeRenderer(output: string): string | undefined {
  return output.match(/renderer: "([^"]*)"/)?.[1];
}

// ---- the benchmark ----

/** Frames per run: long enough for several of kmscube's two-second reports. */
const FRAMES = Number(Deno.env.get("KMSCUBE_FRAMES") ?? 600);

async function runGuest(s: MesaSetup, gpu: MesaGuestOptions["gpu"]): Promise<{ fps: number; frames: number }> {
  const g = new MesaGuest(s, { gpu, command: `kmscube -c ${FRAMES}` });
  const r = await g.wait();
  const rate = kmscubeRate(r.output);
  const renderer = kmscubeRenderer(r.output);
  if (!rate || !renderer?.includes("virgl")) {
    throw new Error(`kmscube did not report a virgl frame rate (exit ${r.code}):\n${r.output.slice(-3000)}`);
  }
  return rate;
}

async function main(): Promise<void> {
  const s = await mesaPrerequisites();
  if (typeof s === "string") {
    result(KMSCUBE_BENCH, { skipped: s });
    return;
  }
  const dir = await Deno.makeTempDir({ prefix: "denovm-kmscube-" });
  const sock = join(dir, "gpu.sock"), control = join(dir, "control.sock");
  const dev = await DeviceProcess.start("gpu", ["--socket-path", sock, "--control-socket", control]);
  let denovm, stats;
  try {
    progress(KMSCUBE_BENCH, `denovm device gpu behind vhost-user-gpu: kmscube -c ${FRAMES}`);
    denovm = await runGuest(s, { vhostUserSocket: sock });
    const c = await JsonLineClient.connect(control);
    stats = await c.call({ stats: true }) as {
      gpu: {
        totals: { bytesCopied: number; scanoutReadbackBytes: number; displaySentBytes: number };
        streams: { submits: number; streamBytes: number };
        commands: Record<string, { count: number }>;
      };
      display: { updates: number; unchanged: number; updateBytes: number; scanoutReadbackBytes: number };
    };
    c.close();
  } finally {
    await dev.stop();
  }
  progress(KMSCUBE_BENCH, `QEMU's in-process virgl (virtio-gpu-gl-device): kmscube -c ${FRAMES}`);
  const qemu = await runGuest(s, { qemuVirgl: true });
  await Deno.remove(dir, { recursive: true }).catch(() => {});
  const submits = Math.max(1, stats.gpu.streams.submits);
  result(KMSCUBE_BENCH, {
    fps_ratio: Number((denovm.fps / qemu.fps).toFixed(3)),
    bytes_per_frame: Math.round(stats.gpu.totals.bytesCopied / submits),
    denovm_fps: denovm.fps,
    qemu_virgl_fps: qemu.fps,
    frames: FRAMES,
    stream_bytes_per_frame: Math.round(stats.gpu.streams.streamBytes / submits),
    scanout_readback_bytes_per_frame: Math.round(stats.display.scanoutReadbackBytes / submits),
    display_update_bytes_per_frame: Math.round(stats.display.updateBytes / submits),
    // The display path's copies from the GPU's own counters: read back for the front end at its pace
    // (only flushed rectangles), and the bytes sent to it over the display socket.
    display_readback_bytes_per_frame: Math.round(stats.gpu.totals.scanoutReadbackBytes / submits),
    display_sent_bytes_per_frame: Math.round(stats.gpu.totals.displaySentBytes / submits),
    display_copy_bytes_per_frame: Math.round(
      (stats.gpu.totals.scanoutReadbackBytes + stats.gpu.totals.displaySentBytes) / submits,
    ),
    flushes: stats.gpu.commands.RESOURCE_FLUSH?.count ?? 0,
    // What QEMU's console was sent: UPDATE messages (changed tiles, at most one batch per scanout per
    // refresh period of the display's 60 Hz mode), and the looks that found nothing changed.
    display_updates: stats.display.updates,
    display_unchanged: stats.display.unchanged,
  });
}

if (import.meta.main) await main();
