// blk-uml: a user-mode Linux guest doing O_DIRECT I/O on a file of its virtio disk (Linux's virtio_blk
// driver through virtio_uml), with denovm's vhost-user block back end (`deno run -A main.ts device block`)
// against qemu-storage-daemon's vhost-user-blk export, in the same run and the same guest: one UML
// machine gets both disks (vda, vdb), each a 256 MiB ext4 image holding the same 192 MiB data file
// and a name.txt saying which back end serves it.
//
// The guest program (bench/c/blk_io.c, static, in the initramfs) times itself: sequential 1 MiB reads,
// sequential 1 MiB writes, random 4 KiB reads and writes alternating, each for PATTERN_MS per disk,
// REPS rounds with the disk order alternating. Each ratio is the median over rounds of that round's
// denovm / qemu-storage-daemon ratio (the two disks measured back to back, so host load drifts cancel). Both back ends use the host page cache (denovm's
// `device block` opens without O_DIRECT; qemu-storage-daemon's file driver defaults to cache.direct=off).
//
// Output: {"bench":"blk-uml","seq_read_ratio":..,"seq_write_ratio":..,"rand4k_ratio":..,
//          "denovm_mib_s":{..},"qsd_mib_s":{..}}   (MiB/s: medians over rounds)   ratio = denovm throughput / qemu-storage-daemon's.

import { join } from "node:path";
import { buildInitramfs, UmlMachine, umlUnavailableReason } from "../test/support/uml.ts";
import { BENCH_DIR, benchCacheDir, exists, killChild, median, progress, REPO_ROOT, result, run } from "./_common.ts";

const NAME = "blk-uml";
const QSD = "/usr/bin/qemu-storage-daemon";
/** The virtio device ID of block devices (virtio 1.2 section 5). */
const VIRTIO_ID_BLOCK = 2;
const IMAGE_MIB = 256;
const DATA_MIB = 192;
const PATTERN_MS = Number(Deno.env.get("BENCH_PATTERN_MS") ?? 1000);
/** Rounds; each gives one ratio per pattern (the two disks measured back to back), the median is reported. */
const REPS = 4;
const PATTERNS = ["seqread", "seqwrite", "rand4k"] as const;
type Pattern = typeof PATTERNS[number];
const BACKENDS = ["denovm", "qsd"] as const;
type BackendName = typeof BACKENDS[number];
/** How long a back end may take to start listening. */
const START_GUARD_MS = 30_000;

function skip(reason: string): never {
  result(NAME, { skipped: reason });
  Deno.exit(0);
}

const umlReason = umlUnavailableReason();
if (umlReason) skip(umlReason);
if (!exists(QSD)) skip(`${QSD} missing (apt-get install qemu-system-x86)`);

async function sleep(ms: number): Promise<void> {
  await new Promise((r) => setTimeout(r, ms));
}

/** A back-end process; stderr is collected, `ready` resolves once its socket accepts. */
interface Backend {
  child: Deno.ChildProcess;
  stderr: () => string;
}

function spawnBackend(cmd: string, args: string[]): Backend {
  const child = new Deno.Command(cmd, { args, stdin: "null", stdout: "null", stderr: "piped" }).spawn();
  let text = "";
  (async () => {
    const dec = new TextDecoder();
    for await (const c of child.stderr) text += dec.decode(c, { stream: true });
  })();
  return { child, stderr: () => text };
}

/** Wait until `socket` exists as a Unix socket (both back ends create it when they listen). */
async function waitForSocket(b: Backend, socket: string, what: string): Promise<void> {
  let exited = false;
  b.child.status.then(() => exited = true);
  const end = Date.now() + START_GUARD_MS;
  while (!(exists(socket) && Deno.lstatSync(socket).isSocket)) {
    if (exited) throw new Error(`${what} exited before listening: ${b.stderr()}`);
    if (Date.now() > end) throw new Error(`${what} did not listen within ${START_GUARD_MS} ms: ${b.stderr()}`);
    await sleep(20);
  }
}

async function buildGuestProgram(): Promise<Uint8Array> {
  const dir = benchCacheDir();
  await Deno.mkdir(dir, { recursive: true });
  const out = join(dir, "blk_io");
  await run("gcc", ["-static", "-O2", "-Wall", "-Werror", "-o", out, join(BENCH_DIR, "c", "blk_io.c")]);
  return await Deno.readFile(out);
}

/** A 256 MiB ext4 image holding `data` (the shared data file) and name.txt = `name`. */
async function makeImage(dir: string, dataFile: string, name: string): Promise<string> {
  const content = join(dir, `content-${name}`);
  await Deno.mkdir(content);
  await Deno.link(dataFile, join(content, "data"));
  await Deno.writeTextFile(join(content, "name.txt"), `${name}\n`);
  const image = join(dir, `${name}.img`);
  // lazy_*_init=0: no ext4lazyinit thread writing to the disk while the guest measures.
  await run("mkfs.ext4", [
    ...["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", "-d", content],
    ...[image, `${IMAGE_MIB}M`],
  ]);
  return image;
}

function guestScript(): string {
  const rounds: string[] = [];
  for (let rep = 0; rep < REPS; rep++) {
    for (const p of PATTERNS) {
      const order = rep % 2 === 0 ? ["a", "b"] : ["b", "a"];
      for (const d of order) {
        rounds.push(
          `r=$(blk_io ${p} /mnt/${d}/data ${PATTERN_MS}); echo "$r backend=$(cat /mnt/${d}/name.txt) round=${rep}"`,
        );
      }
    }
  }
  return `n=0; while { [ ! -b /dev/vda ] || [ ! -b /dev/vdb ]; } && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
test -b /dev/vda && test -b /dev/vdb
mkdir -p /mnt/a /mnt/b
mount -t ext4 -o noatime /dev/vda /mnt/a
mount -t ext4 -o noatime /dev/vdb /mnt/b
${rounds.join("\n")}
umount /mnt/a
umount /mnt/b
echo BLK-DONE`;
}

const dir = await Deno.makeTempDir({ prefix: "denovm-bench-blk-" });
const backends: Backend[] = [];
let initramfs: string | undefined;
try {
  progress(NAME, `building the guest program and two ${IMAGE_MIB} MiB ext4 images`);
  const program = await buildGuestProgram();
  const dataFile = join(dir, "data");
  await run("dd", ["if=/dev/urandom", `of=${dataFile}`, "bs=1M", `count=${DATA_MIB}`, "status=none"]);
  const images = { denovm: await makeImage(dir, dataFile, "denovm"), qsd: await makeImage(dir, dataFile, "qsd") };
  const sockets = { denovm: join(dir, "denovm.sock"), qsd: join(dir, "qsd.sock") };

  const denovm = spawnBackend(Deno.execPath(), [
    ...["run", "-A", join(REPO_ROOT, "main.ts"), "device", "block"],
    ...["--socket-path", sockets.denovm, "--file", images.denovm],
  ]);
  backends.push(denovm);
  const qsd = spawnBackend(QSD, [
    ...["--blockdev", `driver=file,node-name=f,filename=${images.qsd}`],
    ...["--export", `type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=${sockets.qsd},writable=on`],
  ]);
  backends.push(qsd);
  await waitForSocket(denovm, sockets.denovm, "denovm device block");
  await waitForSocket(qsd, sockets.qsd, "qemu-storage-daemon");

  initramfs = await buildInitramfs({
    modules: ["virtio_blk"],
    commands: guestScript(),
    files: [{ path: "bin/blk_io", data: program }],
  });
  progress(NAME, `UML guest: ${PATTERNS.join(", ")} for ${PATTERN_MS} ms per disk, ${REPS} rounds`);
  const uml = await UmlMachine.start({
    initramfs,
    vhostUser: BACKENDS.map((b) => ({ socket: sockets[b], deviceId: VIRTIO_ID_BLOCK })),
    hangGuardMs: 120_000 + 4 * REPS * PATTERNS.length * PATTERN_MS,
  });
  const r = await uml.wait();
  if (r.commandStatus !== 0 || !r.output.includes("BLK-DONE")) {
    throw new Error(
      `the UML guest failed (status ${r.commandStatus}):\n${r.output}\n--- denovm:\n${denovm.stderr()}\n` +
        `--- qsd:\n${qsd.stderr()}`,
    );
  }

  // Per round and pattern: each back end's MiB/s.
  const runs = new Map<string, number>();
  const re = /BLKIO pattern=(\w+) ops=(\d+) bytes=(\d+) ns=(\d+) backend=(\w+) round=(\d+)/g;
  for (const m of r.output.matchAll(re)) {
    const ns = Number(m[4]);
    if (ns > 0) runs.set(`${m[5]}:${m[1]}:${m[6]}`, Number(m[3]) / (1 << 20) / (ns / 1e9));
  }
  const mibPerS = (b: BackendName, p: Pattern, rep: number): number => {
    const v = runs.get(`${b}:${p}:${rep}`);
    if (v === undefined) throw new Error(`no ${p} result for ${b} in round ${rep}:\n${r.output}`);
    return v;
  };
  const reps = [...Array(REPS).keys()];
  const table: Record<BackendName, Record<Pattern, number>> = { denovm: {} as never, qsd: {} as never };
  for (const b of BACKENDS) {
    for (const p of PATTERNS) table[b][p] = median(reps.map((rep) => mibPerS(b, p, rep)));
    progress(NAME, `${b} (median): ${PATTERNS.map((p) => `${p} ${table[b][p].toFixed(1)} MiB/s`).join(", ")}`);
  }
  /** The median over rounds of the round's denovm / qemu-storage-daemon ratio. */
  const ratio = (p: Pattern) =>
    Number(median(reps.map((rep) => mibPerS("denovm", p, rep) / mibPerS("qsd", p, rep))).toFixed(3));
  const round = (t: Record<Pattern, number>) =>
    Object.fromEntries(PATTERNS.map((p) => [p, Number(t[p].toFixed(1))])) as Record<Pattern, number>;
  result(NAME, {
    seq_read_ratio: ratio("seqread"),
    seq_write_ratio: ratio("seqwrite"),
    rand4k_ratio: ratio("rand4k"),
    denovm_mib_s: round(table.denovm),
    qsd_mib_s: round(table.qsd),
    pattern_ms: PATTERN_MS,
    rounds: REPS,
  });
} finally {
  for (const b of backends) await killChild(b.child);
  if (initramfs) await Deno.remove(initramfs).catch(() => {});
  await Deno.remove(dir, { recursive: true }).catch(() => {});
}
Deno.exit(0);
