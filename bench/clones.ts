// Clones: the memory of 20 VMs restored from one 256 MiB snapshot, running at once, against 20 VMs
// cold-booted from the same guest. The guest (bench/guest/ticker.S) fills 200 MiB of its RAM with a
// non-zero pattern, then idles halting and writes "." every 100 ms; the snapshot is taken once it ticks,
// so its memory file holds those 200 MiB. Clones map that file copy-on-write (MAP_PRIVATE), so pages they
// only read are the page cache's, one copy for all of them; each cold VM holds its own 200 MiB.
//
// In one process with the library (the figure with the goal): a child process boots 20 VMs with
// Vm.boot, another restores 20 with Vm.restore (each child starts fresh, so neither inherits the other's
// heap or Workers), each waits until all of its VMs tick, then reads its own /proc/self/smaps_rollup.
// PSS counts a page shared by N mappings as 1/N in each, so the clones' shared pages count once; RSS
// counts them once per mapping. Page-cache pages of the memory file that no clone has touched are in
// no process's PSS: "snapshot_memory_mib" says how much the file holds.
//
// As separate processes (BENCH_CLONES_PROCESSES=0 skips it): `denovm run --restore DIR` x20 against
// `denovm run` x20, the sum of each process's PSS and RSS (each process also carries its own runtime).
//
// ratio = clones' PSS / cold PSS (goal <= 0.25). Runs where denovm runs (no QEMU involved): on a kvm_pvm
// host natively, in the nested KVM host where there is no /dev/kvm.
//
// Output: {"bench":"clones","ratio":..,"clones_pss_mib":..,"cold_pss_mib":..,"clones_rss_mib":..,
//          "cold_rss_mib":..,"baseline_pss_mib":..,"snapshot_memory_mib":..,"vms":20,"mem_mib":256,
//          "fill_mib":200,"processes":{"ratio":..,"clones_pss_mib":..,"cold_pss_mib":..,
//          "clones_rss_mib":..,"cold_rss_mib":..}} (a side that fails reports null and an entry in "errors")

import { join } from "node:path";
import type { Vm as LibVm } from "../mod.ts";
import {
  benchCacheDir,
  buildTickerGuest,
  denovmCliArgs,
  denovmTickerSnapshot,
  killChild,
  lastJsonLine,
  type Measured,
  measured,
  measuredErrors,
  measuredField,
  measuredRatio,
  progress,
  REPO_ROOT,
  result,
  skipWithoutKvm,
  smapsRollupKiB,
  spawnTimed,
  TICKER_TICK,
  within,
  writeLayoutHeader,
} from "./_common.ts";

const NAME = "clones";
const VMS = Number(Deno.env.get("BENCH_CLONES") ?? 20);
const MEM_MIB = 256;
const FILL_MIB = Number(Deno.env.get("BENCH_CLONES_FILL_MIB") ?? 200);
/** A tick every 100 ms: 20 idle VMs' output stays a trickle. */
const PERIOD_US = 100_000;
const PROCESSES = Deno.env.get("BENCH_CLONES_PROCESSES") !== "0";
/** Longest wait for every VM to tick (20 guests filling 200 MiB each share this machine's cores). */
const READY_TIMEOUT_MS = 900_000;
const KIB_PER_MIB = 1024;

/** What a child process measured of itself with its VMs running. */
interface SelfMemory {
  rss_kib: number;
  pss_kib: number;
  base_rss_kib: number;
  base_pss_kib: number;
}

// ---- children: "cold GUEST" and "clones SNAPSHOT_DIR" ----

if (Deno.args[0] === "cold" || Deno.args[0] === "clones") {
  const [mode, path] = Deno.args;
  const base = await smapsRollupKiB("self");
  const { Vm } = await import("../mod.ts");
  const vms: LibVm[] = [];
  try {
    for (let i = 0; i < VMS; i++) {
      vms.push(
        mode === "clones"
          ? await Vm.restore(path)
          : await Vm.boot({ kernel: path, params: [], memMiB: MEM_MIB, cpus: 1 }),
      );
    }
    await Promise.all(vms.map((vm) => vm.console.waitFor(TICKER_TICK, { timeout: READY_TIMEOUT_MS })));
    const now = await smapsRollupKiB("self");
    const out: SelfMemory = { rss_kib: now.rss, pss_kib: now.pss, base_rss_kib: base.rss, base_pss_kib: base.pss };
    console.log(JSON.stringify(out));
  } finally {
    await Promise.all(vms.map((vm) => vm.stop()));
  }
  Deno.exit(0);
}

/** Run this benchmark's child `mode` with `path`; its line, or an Error with its exit code. */
async function child(mode: "cold" | "clones", path: string): Promise<SelfMemory> {
  progress(NAME, `${mode}: ${VMS} VMs in one process`);
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-all", join(REPO_ROOT, "bench", "clones.ts"), mode, path],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const last = lastJsonLine(out.stdout);
  if (!out.success || !last) {
    const err = new TextDecoder().decode(out.stderr).trim().split("\n").filter((l) => l.trim()).slice(-3);
    throw new Error(`the ${mode} process ended with exit code ${out.code}: ${err.join(" | ")}`);
  }
  const m = JSON.parse(last) as SelfMemory;
  progress(NAME, `${mode}: PSS ${m.pss_kib} KiB, RSS ${m.rss_kib} KiB (before its VMs: PSS ${m.base_pss_kib} KiB)`);
  return m;
}

// ---- separate processes ----

/** Start `VMS` denovm processes with `args`, wait until each prints `ready`, sum their PSS and RSS. */
async function processes(
  label: string,
  args: (i: number) => string[],
  ready: RegExp,
): Promise<{ pss: number; rss: number }> {
  progress(NAME, `${label}: ${VMS} denovm processes`);
  const procs = Array.from({ length: VMS }, (_, i) => spawnTimed(Deno.execPath(), denovmCliArgs(args(i))));
  try {
    await within(Promise.all(procs.map((p) => p.waitFor(ready))), READY_TIMEOUT_MS, `${label}: every VM ready`);
    let pss = 0;
    let rss = 0;
    for (const p of procs) {
      const m = await smapsRollupKiB(p.child.pid);
      pss += m.pss;
      rss += m.rss;
    }
    progress(NAME, `${label}: PSS ${pss} KiB, RSS ${rss} KiB over ${VMS} processes`);
    return { pss, rss };
  } finally {
    await Promise.all(procs.map((p) => killChild(p.child)));
  }
}

// ---- main ----

await skipWithoutKvm(NAME, import.meta.url);

const guest = await buildTickerGuest(await writeLayoutHeader(benchCacheDir()), FILL_MIB, PERIOD_US);
const work = await Deno.makeTempDir({ prefix: "denovm-clones-bench-" });
const mib = (kib: number) => Math.round((kib / KIB_PER_MIB) * 10) / 10;
try {
  // The library's snapshot, taken here (this process is not measured).
  const libSnap = join(work, "library-snapshot");
  let snapshotMemoryMib: number | null = null;
  const taken = await measured(NAME, "library snapshot", async () => {
    const { Vm } = await import("../mod.ts");
    const source = await Vm.boot({ kernel: guest, params: [], memMiB: MEM_MIB, cpus: 1 });
    try {
      await source.console.waitFor(TICKER_TICK, { timeout: READY_TIMEOUT_MS });
      await source.snapshot(libSnap);
    } finally {
      await source.stop();
    }
    const { readSnapshot } = await import("../vmm/snapshot/format.ts");
    const st = await Deno.stat(readSnapshot(libSnap).memoryPath);
    snapshotMemoryMib = st.blocks === null ? null : mib((st.blocks * 512) / 1024);
    progress(NAME, `snapshot memory file: ${snapshotMemoryMib} MiB allocated of ${mib(st.size / 1024)} MiB`);
    return 0;
  });

  let clonesMem: SelfMemory | { error: string };
  if (typeof taken !== "number") clonesMem = taken;
  else {
    try {
      clonesMem = await child("clones", libSnap);
    } catch (e) {
      clonesMem = { error: (e as Error).message };
      progress(NAME, `clones: ${clonesMem.error}`);
    }
  }
  let coldMem: SelfMemory | { error: string };
  try {
    coldMem = await child("cold", guest);
  } catch (e) {
    coldMem = { error: (e as Error).message };
    progress(NAME, `cold: ${coldMem.error}`);
  }
  const pick = (m: SelfMemory | { error: string }, k: "pss_kib" | "rss_kib"): Measured =>
    "error" in m ? m : m[k] / KIB_PER_MIB;
  const clonesPss = pick(clonesMem, "pss_kib");
  const coldPss = pick(coldMem, "pss_kib");

  let procFields: Record<string, unknown> | null = null;
  let procErrors: Record<string, Measured> = {};
  if (PROCESSES) {
    const cliSnap = join(work, "cli-snapshot");
    let procClones: { pss: number; rss: number } | { error: string };
    try {
      await denovmTickerSnapshot(guest, MEM_MIB, cliSnap, work, READY_TIMEOUT_MS);
      // Each clone its own control socket: the snapshot's source served one, and two VMs cannot share it.
      procClones = await processes(
        "clones",
        (i) => ["run", "--restore", cliSnap, "-s", join(work, `clone${i}.sock`)],
        TICKER_TICK,
      );
    } catch (e) {
      procClones = { error: (e as Error).message.trim() };
      progress(NAME, `clones (processes): ${procClones.error}`);
    }
    let procCold: { pss: number; rss: number } | { error: string };
    try {
      procCold = await processes("cold", () => ["run", "--mem", String(MEM_MIB), guest], TICKER_TICK);
    } catch (e) {
      procCold = { error: (e as Error).message.trim() };
      progress(NAME, `cold (processes): ${procCold.error}`);
    }
    const p = (m: typeof procCold, k: "pss" | "rss"): Measured => "error" in m ? m : m[k] / KIB_PER_MIB;
    procFields = {
      ratio: measuredRatio(p(procClones, "pss"), p(procCold, "pss")),
      clones_pss_mib: measuredField(p(procClones, "pss")),
      cold_pss_mib: measuredField(p(procCold, "pss")),
      clones_rss_mib: measuredField(p(procClones, "rss")),
      cold_rss_mib: measuredField(p(procCold, "rss")),
    };
    procErrors = { processes_clones: p(procClones, "pss"), processes_cold: p(procCold, "pss") };
  }

  result(NAME, {
    ratio: measuredRatio(clonesPss, coldPss),
    clones_pss_mib: measuredField(clonesPss),
    cold_pss_mib: measuredField(coldPss),
    clones_rss_mib: measuredField(pick(clonesMem, "rss_kib")),
    cold_rss_mib: measuredField(pick(coldMem, "rss_kib")),
    baseline_pss_mib: "error" in coldMem ? null : mib(coldMem.base_pss_kib),
    snapshot_memory_mib: snapshotMemoryMib,
    vms: VMS,
    mem_mib: MEM_MIB,
    fill_mib: FILL_MIB,
    processes: procFields,
    ...measuredErrors({ snapshot: taken, clones: clonesPss, cold: coldPss, ...procErrors }),
  });
} finally {
  await Deno.remove(work, { recursive: true }).catch(() => {});
}
Deno.exit(0);
