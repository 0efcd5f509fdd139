// virtio-fs: Debian's Linux 6.1 (the default initramfs, the guest agent) reads and writes through one
// virtiofsd (Debian's QEMU 7.2 C virtiofsd, started by vmm/virtiofsd.ts) under two front ends, in the same
// run and on the same KVM:
// - denovm: `--shared-dir DIR:bench:type=fs` (the library's Vm.boot with sharedDirs), its vhost-user front
//   end (devices/vhost_user/fs.ts);
// - QEMU: bookworm-backports' QEMU 10 with its own `vhost-user-fs-device` on microvm (test/support/
//   virtiofs_qemu.ts), accel=kvm.
// Each guest mounts the tag and runs, timed from the host around the agent's exec:
// - small files: SMALL_FILES files of SMALL_FILE_KIB KiB in SMALL_DIRS directories written, synced, then
//   read back after dropping the guest's caches;
// - one large file: LARGE_FILE_MIB MiB written with conv=fsync, then read back after dropping the caches.
// Each `*_ratio` is denovm's throughput over QEMU's (QEMU's time / denovm's), goal >= 1.0 each.
//
// Linux does not boot under kvm_pvm, so on such a host (and without /dev/kvm) both sides run in the nested
// KVM host (bench/_common.ts skipWithoutKvm): absolute times are TCG's, the ratios compare like with like.
//
// Output: {"bench":"fs","small_files_ratio":..,"large_file_ratio":..,"denovm_small_ms":..,"qemu_small_ms":..,
//          "denovm_large_ms":..,"qemu_large_ms":..,"small_files":N,"large_file_mib":N,"repeats":N}

import {
  kvmPvm,
  type Measured,
  measuredErrors,
  measuredField,
  measuredRatio,
  result,
  skipWithoutKvm,
  timedPhases,
} from "./_common.ts";
import { type AgentExecutor, bootAgentGuest, guestSh } from "../test/support/agent_guest.ts";
import { startVirtiofsQemu, virtiofsQemuUnavailable } from "../test/support/virtiofs_qemu.ts";
import { parseSharedDirOption } from "../vmm/cli/devices/shared_dir.ts";

const NAME = "fs";
const REPEATS = Number(Deno.env.get("BENCH_REPEATS") ?? 3);
const SMALL_DIRS = 8;
const SMALL_FILES = 256;
const SMALL_FILE_KIB = 4;
const LARGE_FILE_MIB = 32;
const MEM_MIB = 512;
const BOOT_TIMEOUT_MS = 300_000;
const EXEC_TIMEOUT_MS = 600_000;

/** What both guests run: each phase one shell command. */
const SMALL_WRITE = `set -e; cd /mnt; rm -rf small; mkdir small; d=0; while [ $d -lt ${SMALL_DIRS} ]; do ` +
  `mkdir small/$d; d=$((d+1)); done; i=0; while [ $i -lt ${SMALL_FILES} ]; do ` +
  `dd if=/dev/zero of=small/$((i % ${SMALL_DIRS}))/f$i bs=${SMALL_FILE_KIB}k count=1 2>/dev/null; i=$((i+1)); done; sync`;
const SMALL_READ = "set -e; echo 3 > /proc/sys/vm/drop_caches; cat /mnt/small/*/* > /dev/null";
const LARGE_WRITE = `set -e; dd if=/dev/zero of=/mnt/large.bin bs=1M count=${LARGE_FILE_MIB} conv=fsync 2>/dev/null`;
const LARGE_READ = "set -e; echo 3 > /proc/sys/vm/drop_caches; dd if=/mnt/large.bin of=/dev/null bs=1M 2>/dev/null";
const MOUNT = "mkdir -p /mnt && mount -t virtiofs bench /mnt";

/** The medians of the two phases over REPEATS runs in one booted guest, driven through its agent. */
async function phases(label: string, guest: AgentExecutor): Promise<{ small: number; large: number }> {
  const sh = (cmd: string) => guestSh(guest, cmd, EXEC_TIMEOUT_MS);
  await sh(MOUNT);
  return await timedPhases(NAME, label, REPEATS, {
    small: [SMALL_WRITE, SMALL_READ],
    large: [LARGE_WRITE, LARGE_READ],
  }, sh);
}

await skipWithoutKvm(NAME, import.meta.url, {
  notOnKvmPvm: "Debian's kernel does not boot under kvm_pvm",
  oneNestedCpu: true,
});

const { reason, qemu } = await virtiofsQemuUnavailable();
if (reason) {
  result(NAME, { skipped: reason });
  Deno.exit(0);
}
const work = await Deno.makeTempDir({ prefix: "denovm-fs-bench-" });
try {
  const share = `${work}/share`;
  await Deno.mkdir(share);
  await Deno.mkdir(`${work}/run`, { mode: 0o700 });
  const cfg = parseSharedDirOption(`${share}:bench:type=fs`);

  let denovmSmall: Measured = { error: "not run" };
  let denovmLarge: Measured = { error: "not run" };
  try {
    const vm = await bootAgentGuest({ memMiB: MEM_MIB, sharedDirs: [cfg] }, BOOT_TIMEOUT_MS);
    try {
      const p = await phases("denovm", vm);
      [denovmSmall, denovmLarge] = [p.small, p.large];
    } finally {
      await vm.stop();
    }
  } catch (e) {
    denovmSmall = denovmLarge = { error: (e as Error).message.split("\n")[0] };
  }

  let qemuSmall: Measured = { error: "not run" };
  let qemuLarge: Measured = { error: "not run" };
  try {
    const m = await startVirtiofsQemu({
      qemu: qemu!,
      share: cfg,
      runtimeDir: `${work}/run`,
      memMiB: MEM_MIB,
      accel: kvmPvm() ? "tcg" : "kvm",
      log: () => {},
    });
    try {
      const p = await phases("QEMU", m.client);
      [qemuSmall, qemuLarge] = [p.small, p.large];
    } finally {
      await m.close();
    }
  } catch (e) {
    qemuSmall = qemuLarge = { error: (e as Error).message.split("\n")[0] };
  }

  result(NAME, {
    // Throughput ratios: the same work, so denovm's throughput over QEMU's is QEMU's time over denovm's.
    small_files_ratio: measuredRatio(qemuSmall, denovmSmall),
    large_file_ratio: measuredRatio(qemuLarge, denovmLarge),
    denovm_small_ms: measuredField(denovmSmall),
    qemu_small_ms: measuredField(qemuSmall),
    denovm_large_ms: measuredField(denovmLarge),
    qemu_large_ms: measuredField(qemuLarge),
    small_files: SMALL_FILES,
    small_file_kib: SMALL_FILE_KIB,
    large_file_mib: LARGE_FILE_MIB,
    qemu_version: qemu!.version,
    repeats: REPEATS,
    ...measuredErrors({ denovmSmall, denovmLarge, qemuSmall, qemuLarge }),
  });
} finally {
  await Deno.remove(work, { recursive: true }).catch(() => {});
}
Deno.exit(0);
