// kmscube under KVM, like for like: the Mesa guest of scripts/mesa-guest.sh (Debian's 6.1 kernel, Mesa's
// virgl Gallium driver, kmscube) runs `kmscube -c FRAMES` under denovm's own KVM with
// `--gpu backend=virglrenderer` (the library's Vm) and under bookworm-backports' QEMU 10 with `-accel kvm`
// and its in-process virgl (`-device virtio-gpu-gl-device` on microvm's virtio-mmio), in the same host,
// in two settings:
// - headless: nobody looks at the display on either side. denovm reads no scanout back at all; QEMU runs
//   its D-Bus display peer to peer with no client (`-display dbus,p2p=yes,gl=on`: virtio-gpu-gl needs a
//   GL display, and this one keeps GL scanouts as textures until a client asks);
// - one display consumer: denovm takes a screenshot every CONSUMER_INTERVAL_MS (vm.screenshot(): the
//   damage read back, PNG encoded); QEMU runs `-display egl-headless`, the usual headless virgl set-up,
//   which copies every frame of a GL scanout into its console surface (for a VNC or screendump reader).
//   QEMU has no cheaper reader of a GL scanout: its HMP screendump answers "no surface" for one, so a
//   periodic screendump would read nothing. QEMU's consumer thus copies at the frame rate, denovm's at
//   1 Hz: the rule each VMM follows (copy when someone looks, or every frame), not the same work.
// Where LLVM cannot generate code for the host's CPU (the nested host's: kmscube.ts hostRenderingEnv),
// both sides render with Mesa's softpipe.
// Both sides' files are read once first (the page cache), and the headless setting runs in rounds of
// alternating order (HEADLESS_ROUNDS), each side's fps the mean of its rounds.
// fps is kmscube's steady frame rate on the host's clock: kmscube reports its frame count every two seconds
// ("Rendered N frames in T sec"); the frames between its first and its last report over the host time
// between their arrival on the console. That leaves out what happens once per run (the GL context made,
// kmscube's shaders compiled by the guest's Mesa and the host's, the first frame, the guest's exit), which
// is reported beside it: whole_run_fps is the frame count over the host's time from kmscube's renderer line
// to the guest's end marker, and guest_clock_fps kmscube's own figures
// (the guest's clock; each VMM offers its own clock sources).
//
// Linux does not boot under kvm_pvm, so on such a host (and without /dev/kvm) the whole bench re-runs
// itself in ONE nested KVM host (bench/_common.ts skipWithoutKvm): absolute rates are TCG's (llvmpipe
// behind virglrenderer runs emulated there), the ratios compare like with like.
//
// Output: {"bench":"kmscube-kvm","fps_ratio":<headless denovm/QEMU>,"headless_fps_each":{..},"fps_ratio_consumer":..,
//          "denovm_fps":..,"qemu_fps":..,"denovm_fps_consumer":..,"qemu_fps_consumer":..,
//          "qemu_egl_headless_fps":..,"guest_clock_fps":{...},
//          "bytes_per_frame":{<denovm's copy counters per kind, headless run>},
//          "bytes_per_frame_consumer":{...},"frames":N}
//
// Then glmark2-es2-drm's build scene (--off-screen: GL through virgl, no scanout) headless on both sides:
// glmark2_ratio is QEMU's mean frame time over denovm's.
//
// Also the harness test/nested/linux_gpu_test.ts uses (exported): the Mesa guest under denovm, and the
// check of a kmscube frame's pixels.

import { progress, result, skipWithoutKvm } from "./_common.ts";
import {
  GUEST_END,
  hostRenderingEnv,
  kmscubeRate,
  kmscubeRenderer,
  MESA_GUEST_MEM_MIB,
  MESA_KVM_KERNEL_ARGS,
  MesaGuest,
  mesaPrerequisites,
  type MesaSetup,
  QEMU_DBUS_HEADLESS,
  QEMU_EGL_HEADLESS,
} from "./kmscube.ts";
import { Vm } from "../mod.ts";
import type { GpuStats } from "../devices/virtio/gpu/accounting.ts";

export const KMSCUBE_KVM_BENCH = "kmscube-kvm";

/**
 * The display on both sides: small, since the host renders in software (at TCG speed in the nested host);
 * kmscube draws at the connector's preferred mode, which is this.
 */
export const MESA_KVM_DISPLAY = { width: 640, height: 480 };

/**
 * The Mesa guest under denovm (the library's Vm): its kernel's virtio_mmio, virtio_blk and virtio_gpu come
 * from its initramfs, its root is the image on virtio-blk, read-only. The host's GL runs in this process:
 * hostRenderingEnv() is set in its environment while the VM boots (Mesa reads it when virglrenderer
 * creates its GL display) and put back as it was afterwards, so that later VMs of the same process (other
 * test files run in it) render as they would have.
 */
export async function bootMesaVm(
  s: MesaSetup,
  command: string,
  opts: { tracePath?: string; contextTypes?: string[] } = {},
): Promise<Vm> {
  if (command.includes('"')) throw new Error("the guest command cannot contain a double quote (kernel quoting)");
  const env = hostRenderingEnv();
  const before = Object.keys(env).map((k) => [k, Deno.env.get(k)] as const);
  for (const [k, v] of Object.entries(env)) Deno.env.set(k, v);
  try {
    return await bootWithHostEnv(s, command, opts);
  } finally {
    for (const [k, v] of before) v === undefined ? Deno.env.delete(k) : Deno.env.set(k, v);
  }
}

async function bootWithHostEnv(
  s: MesaSetup,
  command: string,
  opts: { tracePath?: string; contextTypes?: string[] },
): Promise<Vm> {
  return await Vm.boot({
    kernel: s.kernel,
    initrd: s.initramfs,
    params: [...MESA_KVM_KERNEL_ARGS, `denovm_cmd="${command}"`],
    memMiB: MESA_GUEST_MEM_MIB,
    cpus: 1,
    rng: false,
    balloon: false,
    blocks: [{ path: s.rootImage, ro: true, root: false, sparse: false, blockSize: 512, direct: false }],
    gpu: {
      backend: "virglrenderer",
      contextTypes: opts.contextTypes ?? ["virgl", "virgl2"],
      displays: [{ mode: "windowed", ...MESA_KVM_DISPLAY }],
      tracePath: opts.tracePath,
    },
  });
}

/**
 * The same Mesa guest under QEMU 10 with `-accel kvm` and its in-process virgl (`virtio-gpu-gl-device`) at
 * MESA_KVM_DISPLAY, QEMU's display `display` (default egl-headless), hostRenderingEnv() in QEMU's environment.
 */
export function qemuMesaGuest(s: MesaSetup, command: string, hangGuardMs: number, display?: string): MesaGuest {
  return new MesaGuest(s, {
    gpu: { qemuVirgl: true },
    qemuDisplay: display,
    accel: "kvm",
    display: MESA_KVM_DISPLAY,
    env: hostRenderingEnv(),
    command,
    hangGuardMs,
  });
}

/** kmscube's background: glClearColor(0.5, 0.5, 0.5, 1) (kmscube cube-smooth.c). */
const BACKGROUND = 0x80;
const BACKGROUND_TOLERANCE = 2;
/** Half the side of the square around the screen's centre that the cube covers in every frame. */
const MIDDLE_HALF = 100;
/** A channel spread above this is a saturated cube colour, not grey. */
const SATURATION = 60;

/**
 * What is wrong with a frame that should be kmscube's (its background grey in the corners, the cube's
 * saturated vertex colours, at least two hues, in the middle); `at(x, y)` is pixel (x, y) as [r, g, b].
 * Empty when the frame is kmscube's.
 */
export function cubeFrameProblems(width: number, height: number, at: (x: number, y: number) => number[]): string[] {
  const problems: string[] = [];
  const isBackground = (c: number[]) => c.every((v) => Math.abs(v - BACKGROUND) <= BACKGROUND_TOLERANCE);
  for (const [x, y] of [[5, 5], [width - 6, 5], [5, height - 6], [width - 6, height - 6]]) {
    if (!isBackground(at(x, y))) problems.push(`corner (${x},${y}) is ${at(x, y)}, not kmscube's grey`);
  }
  const cx = Math.floor(width / 2), cy = Math.floor(height / 2);
  let cube = 0, saturated = 0, total = 0;
  const hues = new Set<number>();
  for (let y = cy - MIDDLE_HALF; y < cy + MIDDLE_HALF; y += 4) {
    for (let x = cx - MIDDLE_HALF; x < cx + MIDDLE_HALF; x += 4) {
      const c = at(x, y);
      total++;
      if (!isBackground(c)) cube++;
      if (Math.max(...c) - Math.min(...c) > SATURATION) {
        saturated++;
        hues.add(c.indexOf(Math.max(...c)));
      }
    }
  }
  if (cube / total <= 0.95) problems.push(`only ${cube}/${total} non-background pixels in the middle`);
  if (saturated / total <= 0.5) problems.push(`only ${saturated}/${total} saturated cube pixels in the middle`);
  if (hues.size < 2) problems.push(`one dominant channel only in the middle: ${[...hues]}`);
  return problems;
}

// ---- the benchmark ----

/** Frames per run: several of kmscube's two-second progress reports at the nested host's few frames a second. */
const FRAMES = Number(Deno.env.get("KMSCUBE_FRAMES") ?? 60);
/** The display consumer's rate on both sides: one screenshot per interval. */
const CONSUMER_INTERVAL_MS = 1000;
/** glmark2's build scene, seconds per run. */
const GLMARK2_SECONDS = 10;
/** Hang guard of one guest run (TCG speed in the nested host). */
const RUN_TIMEOUT_MS = 900_000;
/**
 * Headless rounds: each runs both sides, the first denovm then QEMU, the next the other way round, and so
 * on; each side's fps is its mean over the rounds. The first VM of a run met cold caches (the nested
 * host's page cache over 9p, libraries paged in) and was slower than the same set-up later, so the order
 * alternates, after the files both guests read were read once (warmCaches).
 */
const HEADLESS_ROUNDS = Number(Deno.env.get("KMSCUBE_KVM_ROUNDS") ?? 3);
/** Bytes read at a time by warmCaches. */
const WARM_CHUNK = 4 << 20;

interface Run {
  /** kmscube's own figure: the guest's clock. */
  fps: number;
  /** Frames between kmscube's first and last progress reports over the host's time between them. */
  hostFps: number;
  /** kmscube's frames over the host's time from its renderer line to the guest's end marker. */
  wholeRunFps: number;
  frames: number;
  screenshots: number;
  stats?: GpuStats;
}

/** kmscube printed its GL renderer: its frames come next. */
const KMSCUBE_STARTED = /renderer: "/;

/**
 * From `started` on, calls `shot` every CONSUMER_INTERVAL_MS (one at a time) until `done` settles;
 * resolves with the number of shots that succeeded.
 */
async function consume(
  started: Promise<unknown>,
  done: Promise<unknown>,
  shot: () => Promise<unknown>,
): Promise<number> {
  let over = false;
  done.then(() => over = true, () => over = true);
  await Promise.race([started, done]);
  let n = 0;
  while (!over) {
    await new Promise((r) => setTimeout(r, CONSUMER_INTERVAL_MS));
    if (over) break;
    try {
      await shot();
      n++;
    } catch {
      // The guest may have stopped showing its scanout as it ends.
    }
  }
  return n;
}

/** kmscube's progress report ("Rendered N frames in T sec (F fps)"). */
const PROGRESS = /Rendered (\d+) frames in [\d.]+ sec/;

/** One progress report and the host time its line reached the console. */
interface Report {
  frames: number;
  at: number;
}

/**
 * Each of kmscube's progress reports with the host time it arrived, until `done` settles. `nth(k)` resolves
 * with the frame count of the k-th report (1-based) once its line is on the console: the console's own
 * matching resolves it as the text arrives, so the stamp does not depend on a timer of this process, which
 * also runs denovm's VM and whose timers can fire late while the VM renders.
 */
async function stampProgress(nth: (k: number) => Promise<number>, done: Promise<unknown>): Promise<Report[]> {
  const out: Report[] = [];
  const ended = done.then(() => null, () => null);
  for (let k = 1;; k++) {
    const frames = await Promise.race([nth(k).catch(() => null), ended]);
    if (frames === null) return out;
    out.push({ frames, at: performance.now() });
  }
}

/** A pattern that matches once the console holds `k` progress reports. */
function kthProgress(k: number): RegExp {
  return new RegExp(`(?:${PROGRESS.source}[\\s\\S]*?){${k}}`);
}

/**
 * Frames per second of the host's clock between the first and the last progress report. A report of 0 frames
 * (kmscube's first frame took over two seconds: it restarts its count after that frame) is left out.
 */
function steadyFps(side: string, all: Report[]): number {
  const reports = all.filter((r) => r.frames > 0);
  const first = reports[0], last = reports.at(-1);
  if (!first || !last || last.frames <= first.frames || last.at <= first.at) {
    throw new Error(`${side}: kmscube reported progress too rarely for a steady rate: ${JSON.stringify(reports)}`);
  }
  return (last.frames - first.frames) / ((last.at - first.at) / 1000);
}

async function runDenovm(s: MesaSetup, consumer: boolean): Promise<Run> {
  await using vm = await bootMesaVm(s, `kmscube -c ${FRAMES}`);
  const end = vm.console.waitFor(new RegExp(`${GUEST_END} status=\\d+`), { timeout: RUN_TIMEOUT_MS });
  // Progress reports one after another: each wait starts after the previous match. Until the VM ends, so
  // that the last report, which may arrive with the end marker, is not lost to it.
  const stamps = stampProgress(
    async () => Number((await vm.console.waitFor(PROGRESS, { timeout: RUN_TIMEOUT_MS }))[1]),
    vm.exitCode,
  );
  const started = vm.console.waitFor(KMSCUBE_STARTED, { timeout: RUN_TIMEOUT_MS }).catch(() => {});
  const t0 = started.then(() => performance.now());
  const screenshots = consumer ? consume(started, end, () => vm.screenshot()) : Promise.resolve(0);
  await end;
  const hostSeconds = (performance.now() - await t0) / 1000;
  const stats = vm.gpu.stats() as GpuStats;
  const output = vm.console.text;
  const rate = kmscubeRate(output);
  if (!rate || !kmscubeRenderer(output)?.includes("virgl")) {
    throw new Error(`denovm: kmscube did not report a virgl frame rate:\n${output.slice(-3000)}`);
  }
  await vm.exitCode;
  const reports = await stamps;
  return {
    ...rate,
    hostFps: steadyFps("denovm", reports),
    wholeRunFps: rate.frames / hostSeconds,
    screenshots: await screenshots,
    stats,
  };
}

async function runQemu(s: MesaSetup, display: string): Promise<Run> {
  const g = qemuMesaGuest(s, `kmscube -c ${FRAMES}`, RUN_TIMEOUT_MS, display);
  const done = g.wait();
  const stamps = stampProgress(async (k) => {
    await g.waitFor(kthProgress(k));
    const m = [...g.output.matchAll(new RegExp(PROGRESS.source, "g"))][k - 1];
    return Number(m[1]);
  }, done);
  const started = g.waitFor(KMSCUBE_STARTED).catch(() => {});
  const t0 = started.then(() => performance.now());
  const t1 = g.waitFor(new RegExp(`${GUEST_END} status=\\d+`)).then(() => performance.now(), () => NaN);
  const r = await done;
  const reports = await stamps;
  const rate = kmscubeRate(r.output);
  if (!rate || !kmscubeRenderer(r.output)?.includes("virgl")) {
    throw new Error(`QEMU: kmscube did not report a virgl frame rate (exit ${r.code}):\n${r.output.slice(-3000)}`);
  }
  return {
    ...rate,
    hostFps: steadyFps("QEMU", reports),
    wholeRunFps: rate.frames / ((await t1 - await t0) / 1000),
    screenshots: 0,
  };
}

/** glmark2's scene: its "[build] ...: FPS: N FrameTime: T ms" line gives the mean frame time. */
const GLMARK2 = `glmark2-es2-drm --off-screen -b build:duration=${GLMARK2_SECONDS}`;
const GLMARK2_FRAME_TIME = /FrameTime: ([\d.]+) ms/;

/** glmark2's mean frame time (ms) in the Mesa guest under denovm or QEMU (headless). */
async function glmark2FrameMs(s: MesaSetup, side: "denovm" | "qemu"): Promise<number> {
  let output: string;
  if (side === "denovm") {
    await using vm = await bootMesaVm(s, GLMARK2);
    await vm.console.waitFor(new RegExp(`${GUEST_END} status=\\d+`), { timeout: RUN_TIMEOUT_MS });
    output = vm.console.text;
    await vm.exitCode;
  } else {
    output = (await qemuMesaGuest(s, GLMARK2, RUN_TIMEOUT_MS, QEMU_DBUS_HEADLESS).wait()).output;
  }
  const m = output.match(GLMARK2_FRAME_TIME);
  if (!m || !/GL_RENDERER:\s+virgl/.test(output)) {
    throw new Error(`${side}: glmark2 did not report a virgl frame time:\n${output.slice(-3000)}`);
  }
  return Number(m[1]);
}

/** denovm's copy counters per frame, by kind (only kinds that copied anything). */
function perFrame(stats: GpuStats | undefined, frames: number): Record<string, number> {
  if (!stats) return {};
  const out: Record<string, number> = {};
  for (const [k, v] of Object.entries(stats.totals)) {
    if (typeof v === "number" && v > 0) out[k] = Math.round(v / frames);
  }
  const sc = Object.values(stats.scanouts);
  const sum = (f: (c: typeof sc[number]) => number) => sc.reduce((a, c) => a + f(c), 0);
  out.scanoutDamagedBytes = Math.round(sum((c) => c.damagedBytes) / frames);
  out.scanoutReadbackBytes = Math.round(sum((c) => c.readbackBytes) / frames);
  out.displaySentBytes = Math.round(sum((c) => Object.values(c.sentTo).reduce((a, b) => a + b, 0)) / frames);
  out.streamBytes = Math.round(stats.streams.streamBytes / frames);
  return out;
}

/** Reads each file once, so that neither side's first run pays for the host's page cache filling. */
async function warmCaches(paths: string[]): Promise<void> {
  const buf = new Uint8Array(WARM_CHUNK);
  for (const path of paths) {
    using f = await Deno.open(path);
    while ((await f.read(buf)) !== null) { /* discard */ }
  }
}

/** `runs` with their fps figures averaged. */
function meanRun(runs: Run[]): Run {
  const mean = (f: (r: Run) => number) => runs.reduce((a, r) => a + f(r), 0) / runs.length;
  return {
    ...runs[runs.length - 1],
    hostFps: mean((r) => r.hostFps),
    wholeRunFps: mean((r) => r.wholeRunFps),
    fps: mean((r) => r.fps),
  };
}

async function main(): Promise<void> {
  const s = await mesaPrerequisites();
  if (typeof s === "string") {
    result(KMSCUBE_KVM_BENCH, { skipped: s });
    return;
  }
  await skipWithoutKvm(KMSCUBE_KVM_BENCH, import.meta.url, {
    notOnKvmPvm: "Debian's kernel does not boot under kvm_pvm",
    oneNestedCpu: true,
  });
  progress(KMSCUBE_KVM_BENCH, "reading the kernel, initramfs and root image once (both sides' page cache)");
  await warmCaches([s.kernel, s.initramfs, s.rootImage]);
  const runs: Record<string, Run> = {};
  const headless: { denovm: Run[]; qemu: Run[] } = { denovm: [], qemu: [] };
  for (let round = 0; round < HEADLESS_ROUNDS; round++) {
    const order = round % 2 === 0 ? (["denovm", "qemu"] as const) : (["qemu", "denovm"] as const);
    for (const side of order) {
      if (side === "denovm") {
        progress(KMSCUBE_KVM_BENCH, `denovm --gpu backend=virglrenderer, headless: kmscube -c ${FRAMES}`);
        headless.denovm.push(await runDenovm(s, false));
      } else {
        progress(
          KMSCUBE_KVM_BENCH,
          `QEMU -accel kvm virtio-gpu-gl-device -display dbus (no client): kmscube -c ${FRAMES}`,
        );
        headless.qemu.push(await runQemu(s, QEMU_DBUS_HEADLESS));
      }
    }
  }
  runs.denovm = meanRun(headless.denovm);
  runs.qemu = meanRun(headless.qemu);
  progress(KMSCUBE_KVM_BENCH, `denovm, a screenshot every ${CONSUMER_INTERVAL_MS} ms: kmscube -c ${FRAMES}`);
  runs.denovm_consumer = await runDenovm(s, true);
  progress(KMSCUBE_KVM_BENCH, `QEMU -accel kvm virtio-gpu-gl-device -display egl-headless: kmscube -c ${FRAMES}`);
  runs.qemu_consumer = await runQemu(s, QEMU_EGL_HEADLESS);
  for (const [k, r] of Object.entries(runs)) progress(KMSCUBE_KVM_BENCH, `${k}: ${r.hostFps.toFixed(3)} fps`);
  progress(KMSCUBE_KVM_BENCH, `glmark2 (${GLMARK2}), headless, denovm then QEMU -display dbus`);
  const glmark: Record<string, number | string> = {};
  for (const side of ["denovm", "qemu"] as const) {
    glmark[side] = await glmark2FrameMs(s, side).catch((e) => `error: ${(e as Error).message.split("\n")[0]}`);
  }
  const ratio = (a: Run, b: Run) => Number((a.hostFps / b.hostFps).toFixed(3));
  const fps1 = (x: number) => Number(x.toFixed(3));
  const fps = (r: Run) => fps1(r.hostFps);
  result(KMSCUBE_KVM_BENCH, {
    fps_ratio: ratio(runs.denovm, runs.qemu),
    headless_rounds: HEADLESS_ROUNDS,
    headless_fps_each: { denovm: headless.denovm.map(fps), qemu: headless.qemu.map(fps) },
    fps_ratio_consumer: ratio(runs.denovm_consumer, runs.qemu_consumer),
    denovm_fps: fps(runs.denovm),
    qemu_fps: fps(runs.qemu),
    denovm_fps_consumer: fps(runs.denovm_consumer),
    qemu_fps_consumer: fps(runs.qemu_consumer),
    // The frame count over the host's time from kmscube's renderer line to the guest's end marker: the
    // steady rate plus what happens once per run (context, shader compilation, first frame, exit).
    whole_run_fps: {
      denovm: fps1(runs.denovm.wholeRunFps),
      qemu: fps1(runs.qemu.wholeRunFps),
      denovm_consumer: fps1(runs.denovm_consumer.wholeRunFps),
      qemu_consumer: fps1(runs.qemu_consumer.wholeRunFps),
    },
    whole_run_ratio: Number((runs.denovm.wholeRunFps / runs.qemu.wholeRunFps).toFixed(3)),
    // kmscube's own figures (each guest's clock), headless and with the consumer.
    guest_clock_fps: {
      denovm: runs.denovm.fps,
      qemu: runs.qemu.fps,
      denovm_consumer: runs.denovm_consumer.fps,
      qemu_consumer: runs.qemu_consumer.fps,
    },
    host_rendering: hostRenderingEnv().GALLIUM_DRIVER ?? "llvmpipe",
    // glmark2's build scene: QEMU's mean frame time over denovm's (a throughput ratio), and both.
    glmark2_ratio: typeof glmark.denovm === "number" && typeof glmark.qemu === "number"
      ? Number((glmark.qemu / glmark.denovm).toFixed(3))
      : null,
    glmark2_frame_ms: glmark,
    bytes_per_frame: perFrame(runs.denovm.stats, FRAMES),
    bytes_per_frame_consumer: perFrame(runs.denovm_consumer.stats, FRAMES),
    screenshots: runs.denovm_consumer.screenshots,
    consumer_interval_ms: CONSUMER_INTERVAL_MS,
    frames: FRAMES,
  });
}

if (import.meta.main) {
  await main();
  Deno.exit(0);
}
