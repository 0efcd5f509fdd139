// The cost of a disk served out of process: Debian's Linux 6.1 (the default initramfs, the guest agent)
// under denovm does the same I/O on the same raw image twice, in the same run:
// - out of process: qemu-storage-daemon (Debian's QEMU 7.2) exports the image as vhost-user-blk and denovm's
//   front end carries it (`--vhost-user type=block,socket=...`);
// - in process: denovm's own virtio-blk (`--block path=...`).
// Both sides use the host's page cache (the nested host's /tmp, a tmpfs overlay, has no O_DIRECT). The
// guest, timed from the host around the agent's exec, on /dev/vda with O_DIRECT (no guest page cache):
// - sequential: SEQ_MIB MiB written then read in 1 MiB requests;
// - small: SMALL_COUNT 4 KiB reads.
// Each `*_ratio` is the out-of-process throughput over the in-process one (in-process time / out-of-process
// time): 1.0 means going out of process costs nothing.
//
// Linux does not boot under kvm_pvm, so on such a host (and without /dev/kvm) both sides run in the nested
// KVM host (bench/_common.ts skipWithoutKvm): absolute times are TCG's, the ratios compare like with like.
//
// Output: {"bench":"vhost_user_blk","seq_ratio":..,"small_ratio":..,"vhost_user_seq_ms":..,"in_process_seq_ms":..,
//          "vhost_user_small_ms":..,"in_process_small_ms":..,"seq_mib":N,"small_count":N,"repeats":N}

import {
  type Measured,
  measuredErrors,
  measuredField,
  measuredRatio,
  median,
  progress,
  result,
  run,
  skipWithoutKvm,
} from "./_common.ts";
import { type BootConfig, Vm } from "../mod.ts";
import { debianKernel } from "../test/support/kernel.ts";
import { defaultInitramfs, which } from "../test/support/default_guest.ts";

const NAME = "vhost_user_blk";
const REPEATS = Number(Deno.env.get("BENCH_REPEATS") ?? 3);
const SEQ_MIB = 32;
const SMALL_COUNT = 1024;
const DISK_MIB = 64;
const MEM_MIB = 256;
const BOOT_TIMEOUT_MS = 300_000;
const EXEC_TIMEOUT_MS = 600_000;
const QSD = "/usr/bin/qemu-storage-daemon";

const SEQ = `set -e; dd if=/dev/zero of=/dev/vda bs=1M count=${SEQ_MIB} oflag=direct 2>/dev/null; ` +
  `dd if=/dev/vda of=/dev/null bs=1M count=${SEQ_MIB} iflag=direct 2>/dev/null`;
const SMALL = `set -e; dd if=/dev/vda of=/dev/null bs=4k count=${SMALL_COUNT} iflag=direct 2>/dev/null`;

/** Boot the guest with `disk` (a --block or a --vhost-user device), time both phases, stop it. */
async function measure(label: string, disk: Partial<BootConfig>): Promise<{ seq: number; small: number }> {
  const kernel = await debianKernel();
  const vm = await Vm.boot({
    kernel: kernel.vmlinux,
    initrd: await defaultInitramfs(),
    params: ["console=ttyS0"],
    memMiB: MEM_MIB,
    cpus: 1,
    agent: true,
    ...disk,
  });
  try {
    await vm.console.waitFor(/^DENOVM-INIT-OK\s*$/m, { timeout: BOOT_TIMEOUT_MS });
    const exec = async (cmd: string) => {
      const t0 = performance.now();
      const r = await vm.exec(["sh", "-c", cmd], { timeout: EXEC_TIMEOUT_MS });
      if (r.code !== 0) throw new Error(`${cmd}: exit ${r.code}: ${r.stderr.trim()}`);
      return performance.now() - t0;
    };
    const seq: number[] = [];
    const small: number[] = [];
    for (let i = 0; i < REPEATS; i++) {
      seq.push(await exec(SEQ));
      small.push(await exec(SMALL));
    }
    progress(
      NAME,
      `${label}: sequential ${seq.map((t) => t.toFixed(0)).join(", ")} ms; small ${
        small.map((t) => t.toFixed(0)).join(", ")
      } ms`,
    );
    return { seq: median(seq), small: median(small) };
  } finally {
    await vm.stop();
  }
}

await skipWithoutKvm(NAME, import.meta.url, { notOnKvmPvm: "Debian's kernel does not boot under kvm_pvm" });
if (!which("qemu-storage-daemon")) {
  result(NAME, { skipped: `${QSD} missing (Debian package qemu-system-common)` });
  Deno.exit(0);
}

const work = await Deno.makeTempDir({ prefix: "denovm-vublk-bench-" });
try {
  const image = `${work}/disk.img`;
  await run("truncate", ["-s", `${DISK_MIB}M`, image]);

  let vuSeq: Measured = { error: "not run" };
  let vuSmall: Measured = { error: "not run" };
  const socket = `${work}/blk.sock`;
  const qsd = new Deno.Command(QSD, {
    args: [
      "--blockdev",
      `driver=file,node-name=file0,filename=${image}`,
      "--blockdev",
      "driver=raw,node-name=disk0,file=file0",
      "--export",
      `type=vhost-user-blk,id=exp0,node-name=disk0,writable=on,addr.type=unix,addr.path=${socket}`,
    ],
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  let qsdEnded = false;
  const qsdDone = qsd.output().then((o) => {
    qsdEnded = true;
    return new TextDecoder().decode(o.stderr).trim();
  });
  try {
    while (!(await Deno.stat(socket).then((s) => s.isSocket, () => false))) {
      if (qsdEnded) throw new Error(`qemu-storage-daemon ended: ${await qsdDone}`);
      await new Promise((r) => setTimeout(r, 50));
    }
    const r = await measure("vhost-user (qemu-storage-daemon)", {
      vhostUser: [{ type: "block", deviceId: 2, socket }],
    });
    [vuSeq, vuSmall] = [r.seq, r.small];
  } catch (e) {
    vuSeq = vuSmall = { error: (e as Error).message.split("\n")[0] };
  } finally {
    if (!qsdEnded) qsd.kill("SIGKILL");
    await qsdDone;
  }

  let inSeq: Measured = { error: "not run" };
  let inSmall: Measured = { error: "not run" };
  try {
    const r = await measure("in process (--block)", {
      blocks: [{ path: image, ro: false, root: false, sparse: true, blockSize: 512, direct: false }],
    });
    [inSeq, inSmall] = [r.seq, r.small];
  } catch (e) {
    inSeq = inSmall = { error: (e as Error).message.split("\n")[0] };
  }

  result(NAME, {
    // The same work on both sides: out-of-process throughput over in-process is in-process time over out-of-process.
    seq_ratio: measuredRatio(inSeq, vuSeq),
    small_ratio: measuredRatio(inSmall, vuSmall),
    vhost_user_seq_ms: measuredField(vuSeq),
    in_process_seq_ms: measuredField(inSeq),
    vhost_user_small_ms: measuredField(vuSmall),
    in_process_small_ms: measuredField(inSmall),
    seq_mib: SEQ_MIB,
    small_count: SMALL_COUNT,
    repeats: REPEATS,
    ...measuredErrors({ vuSeq, vuSmall, inSeq, inSmall }),
  });
} finally {
  await Deno.remove(work, { recursive: true }).catch(() => {});
}
Deno.exit(0);
