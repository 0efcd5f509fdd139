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
  result,
  run,
  skipWithoutKvm,
  timedPhases,
} from "./_common.ts";
import type { BootConfig } from "../mod.ts";
import { bootAgentGuest, guestSh } from "../test/support/agent_guest.ts";
import { StorageDaemon, storageDaemonUnavailable } from "../test/support/storage_daemon.ts";

const NAME = "vhost_user_blk";
const REPEATS = Number(Deno.env.get("BENCH_REPEATS") ?? 3);
const SEQ_MIB = 32;
const SMALL_COUNT = 1024;
const DISK_MIB = 64;
const MEM_MIB = 256;
const BOOT_TIMEOUT_MS = 300_000;
const EXEC_TIMEOUT_MS = 600_000;

const SEQ = `set -e; dd if=/dev/zero of=/dev/vda bs=1M count=${SEQ_MIB} oflag=direct 2>/dev/null; ` +
  `dd if=/dev/vda of=/dev/null bs=1M count=${SEQ_MIB} iflag=direct 2>/dev/null`;
const SMALL = `set -e; dd if=/dev/vda of=/dev/null bs=4k count=${SMALL_COUNT} iflag=direct 2>/dev/null`;

/** Boot the guest with `disk` (a --block or a --vhost-user device), time both phases, stop it. */
async function measure(label: string, disk: Partial<BootConfig>): Promise<{ sequential: number; small: number }> {
  const vm = await bootAgentGuest({ memMiB: MEM_MIB, ...disk }, BOOT_TIMEOUT_MS);
  try {
    const sh = (cmd: string) => guestSh(vm, cmd, EXEC_TIMEOUT_MS);
    return await timedPhases(NAME, label, REPEATS, { sequential: [SEQ], small: [SMALL] }, sh);
  } finally {
    await vm.stop();
  }
}

await skipWithoutKvm(NAME, import.meta.url, {
  notOnKvmPvm: "Debian's kernel does not boot under kvm_pvm",
  oneNestedCpu: true,
});
const noQsd = storageDaemonUnavailable();
if (noQsd) {
  result(NAME, { skipped: noQsd });
  Deno.exit(0);
}

const work = await Deno.makeTempDir({ prefix: "denovm-vublk-bench-" });
try {
  const image = `${work}/disk.img`;
  await run("truncate", ["-s", `${DISK_MIB}M`, image]);

  let vuSeq: Measured = { error: "not run" };
  let vuSmall: Measured = { error: "not run" };
  const socket = `${work}/blk.sock`;
  const qsd = StorageDaemon.start(image, socket);
  try {
    await qsd.ready();
    const r = await measure("vhost-user (qemu-storage-daemon)", {
      vhostUser: [{ type: "block", deviceId: 2, socket }],
    });
    [vuSeq, vuSmall] = [r.sequential, r.small];
  } catch (e) {
    vuSeq = vuSmall = { error: (e as Error).message.split("\n")[0] };
  } finally {
    await qsd.kill();
  }

  let inSeq: Measured = { error: "not run" };
  let inSmall: Measured = { error: "not run" };
  try {
    const r = await measure("in process (--block)", {
      blocks: [{ path: image, ro: false, root: false, sparse: true, blockSize: 512, direct: false }],
    });
    [inSeq, inSmall] = [r.sequential, r.small];
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
