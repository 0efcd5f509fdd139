// Real vhost-user back ends that no one here wrote, under denovm's front end, driven by Debian's Linux 6.1
// (the default guest: the default initramfs and the guest agent):
//   - virtio-fs: `--shared-dir DIR:TAG:type=fs` starts the machine's virtiofsd (vmm/virtiofsd.ts) and
//     connects it through the vhost-user front end; the guest mounts the tag, reads what the host wrote,
//     writes a small file and 1 MiB of random bytes, syncs, and the host reads both back unchanged; when
//     the VM stops, virtiofsd is gone.
//   - vhost-user-blk: qemu-storage-daemon exports an ext4 image (`--vhost-user type=block,socket=...`); the
//     guest mounts it, reads what the host put there, writes and syncs a file, then keeps writing while
//     the daemon is killed with SIGKILL. The VMM goes on (the guest agent still answers), and after the VM
//     stops, the synced file is on the image unchanged (read on the host after e2fsck replays the journal).
//     Then the daemon is killed under a 16 MiB O_DIRECT write and restarted on the same socket: the front
//     end reconnects, the pending write completes without an error and reads back as written, the synced
//     file is unchanged and the guest's kernel logged no I/O error. The same with denovm's own back end
//     (`denovm device block`) in the daemon's place.
//
// These need a KVM that runs unmodified kernels: they skip on kvm_pvm and without /dev/kvm, and run in the
// nested KVM host (test/nested/nested_kvm_test.ts).

import assert from "node:assert/strict";
import { fullLinuxUnavailable, run, which } from "../support/default_guest.ts";
import { bootAgentGuest, guestSh as sh } from "../support/agent_guest.ts";
import { StorageDaemon, storageDaemonUnavailable } from "../support/storage_daemon.ts";
import { processesWith } from "../support/proc.ts";
import { DeviceProcess } from "../support/device_process.ts";
import { parseSharedDirOption } from "../../vmm/cli/devices/shared_dir.ts";
import { virtiofsdUnavailable } from "../support/virtiofsd.ts";

const MEM_MIB = 256;

const skipFs = fullLinuxUnavailable() ?? virtiofsdUnavailable();
if (skipFs) console.log(`skip: linux virtio-fs: ${skipFs}`);

const skipBlk = fullLinuxUnavailable() ?? storageDaemonUnavailable() ??
  (!which("mkfs.ext4") || !which("debugfs") || !which("e2fsck")
    ? "mkfs.ext4, e2fsck and debugfs are needed (e2fsprogs)"
    : undefined);
if (skipBlk) console.log(`skip: linux vhost-user-blk: ${skipBlk}`);

/** The md5sum of a host file. */
async function md5(path: string): Promise<string> {
  const out = await new Deno.Command("md5sum", { args: [path], stdout: "piped" }).output();
  return new TextDecoder().decode(out.stdout).split(" ")[0];
}

Deno.test({
  name: "linux: Debian 6.1 mounts a --shared-dir type=fs tag served by virtiofsd; synced writes reach the host",
  ignore: skipFs !== undefined,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "denovm-linux-virtiofs-" });
    try {
      const share = `${dir}/share`;
      Deno.mkdirSync(share);
      const hostText = `from the host ${crypto.randomUUID()}\n`;
      Deno.writeTextFileSync(`${share}/from-host.txt`, hostText);
      const vm = await bootAgentGuest({
        memMiB: MEM_MIB,
        sharedDirs: [parseSharedDirOption(`${share}:hostshare:type=fs`)],
      });
      let stopped = false;
      try {
        assert.doesNotMatch(vm.console.text, /^denovm-init: modules failed:/m);
        // The virtio-fs device (id 26) is bound to its driver.
        assert.match(vm.console.text, /virtio devices:.*=0x001a:virtiofs/);
        const socket = processesWith(`source=${share}`);
        assert.ok(socket.length >= 1, "virtiofsd runs while the VM does");
        assert.equal(
          await sh(vm, "mkdir -p /mnt && mount -t virtiofs hostshare /mnt && cat /mnt/from-host.txt"),
          hostText,
        );
        const guestMd5 = await sh(
          vm,
          "echo written by the guest > /mnt/from-guest.txt && " +
            "dd if=/dev/urandom of=/mnt/big.bin bs=64k count=16 2>/dev/null && sync && md5sum /mnt/big.bin",
        );
        assert.equal(Deno.readTextFileSync(`${share}/from-guest.txt`), "written by the guest\n");
        assert.equal(Deno.statSync(`${share}/big.bin`).size, 1 << 20);
        assert.equal(guestMd5.split(" ")[0], await md5(`${share}/big.bin`));
        // The host writes, the guest reads (cache=auto: a new file is looked up afresh).
        Deno.writeTextFileSync(`${share}/later.txt`, "later\n");
        assert.equal(await sh(vm, "cat /mnt/later.txt"), "later\n");
        await vm.stop();
        stopped = true;
      } finally {
        if (!stopped) await vm.stop().catch(() => {});
      }
      // virtiofsd ends with the VM.
      for (let i = 0; i < 100 && processesWith(`source=${share}`).length > 0; i++) {
        await new Promise((r) => setTimeout(r, 50));
      }
      assert.deepEqual(processesWith(`source=${share}`), [], "virtiofsd is gone after the VM stopped");
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

/** The image's file `name` after e2fsck has replayed the journal (on a copy), read with debugfs. */
async function fileOnImage(dir: string, image: string, name: string): Promise<Uint8Array> {
  const copy = `${dir}/check.img`;
  await run("cp", ["--sparse=always", image, copy]);
  // e2fsck exits 1 when it fixed something (the journal replay counts); run() wants 0, so allow it here.
  await new Deno.Command("e2fsck", { args: ["-fy", copy], stdout: "null", stderr: "null" }).output();
  const out = `${dir}/${name}.out`;
  await run("debugfs", ["-R", `dump /${name} ${out}`, copy]);
  return Deno.readFileSync(out);
}

Deno.test({
  name: "linux: ext4 on qemu-storage-daemon's vhost-user-blk; its synced file survives kill -9 of the daemon mid-write",
  ignore: skipBlk !== undefined,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "denovm-linux-vublk-" });
    let qsd: StorageDaemon | undefined;
    try {
      const image = `${dir}/disk.img`;
      await Deno.mkdir(`${dir}/content`);
      await Deno.writeTextFile(`${dir}/content/hello.txt`, "hello from the host\n");
      await run("mkfs.ext4", ["-q", "-F", "-d", `${dir}/content`, image, "64M"]);
      const socket = `${dir}/blk.sock`;
      qsd = StorageDaemon.start(image, socket);
      await qsd.ready();
      let guestMd5 = "";
      const vm = await bootAgentGuest({ memMiB: MEM_MIB, vhostUser: [{ type: "block", deviceId: 2, socket }] });
      let stopped = false;
      try {
        assert.match(vm.console.text, /virtio devices:.*=0x0002:virtio_blk/);
        assert.equal(
          await sh(vm, "mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && cat /mnt/hello.txt"),
          "hello from the host\n",
        );
        guestMd5 = (await sh(
          vm,
          "dd if=/dev/urandom of=/mnt/synced.bin bs=64k count=16 2>/dev/null && sync && md5sum /mnt/synced.bin",
        )).split(" ")[0];
        // Writes go on while the daemon dies: a file after file, each synced.
        await sh(
          vm,
          "(i=0; while true; do dd if=/dev/urandom of=/mnt/p$i bs=64k count=4 2>/dev/null; sync; i=$((i+1)); done) " +
            "</dev/null >/dev/null 2>&1 &",
        );
        await sh(vm, "while [ ! -e /mnt/p2 ]; do sleep 0.1; done");
        await qsd.kill();
        qsd = undefined;
        // The VMM and the guest go on: the agent answers (from memory, not the disk).
        assert.equal(await sh(vm, "echo alive"), "alive\n");
        await vm.stop();
        stopped = true;
      } finally {
        if (!stopped) await vm.stop().catch(() => {});
      }
      const synced = await fileOnImage(dir, image, "synced.bin");
      assert.equal(synced.length, 1 << 20);
      assert.equal(await md5(`${dir}/synced.bin.out`), guestMd5, "the synced file on the image is the guest's");
    } finally {
      await qsd?.kill();
      await Deno.remove(dir, { recursive: true });
    }
  },
});

/** A back end serving an image on a socket, killed with SIGKILL. */
interface KillableBackEnd {
  kill(): Promise<unknown>;
}

/**
 * The back end started by `start` is killed under a 16 MiB O_DIRECT write and started again on the same
 * socket: the front end reconnects, the pending write completes without an error and reads back as written,
 * the synced file is unchanged, and the guest's kernel logged no I/O error.
 */
async function reconnectUnderWrite(start: (image: string, socket: string) => Promise<KillableBackEnd>) {
  const dir = await Deno.makeTempDir({ prefix: "denovm-linux-vublk-" });
  let backEnd: KillableBackEnd | undefined;
  try {
    const image = `${dir}/disk.img`;
    await run("mkfs.ext4", ["-q", "-F", image, "64M"]);
    const socket = `${dir}/blk.sock`;
    backEnd = await start(image, socket);
    await using vm = await bootAgentGuest({ memMiB: MEM_MIB, vhostUser: [{ type: "block", deviceId: 2, socket }] });
    await sh(vm, "mkdir -p /mnt && mount -t ext4 /dev/vda /mnt");
    const before = await sh(
      vm,
      "dd if=/dev/urandom of=/mnt/synced.bin bs=64k count=16 2>/dev/null && sync && md5sum /mnt/synced.bin",
    );
    // A write in flight: 16 MiB with O_DIRECT, then its checksum; the back end dies under it.
    await sh(
      vm,
      "(dd if=/dev/urandom of=/tmp/src.bin bs=1M count=16 2>/dev/null && " +
        "dd if=/tmp/src.bin of=/mnt/pending.bin bs=64k oflag=direct 2>/tmp/dd.err; echo $? > /tmp/dd.status) " +
        "</dev/null >/dev/null 2>&1 &",
    );
    await sh(vm, "while [ ! -s /mnt/pending.bin ]; do sleep 0.05; done");
    await backEnd.kill();
    backEnd = await start(image, socket);
    // The pending write completes without an error, and what it wrote is what it read.
    await sh(vm, "while [ ! -e /tmp/dd.status ]; do sleep 0.2; done");
    assert.equal(await sh(vm, "cat /tmp/dd.status"), "0\n", await sh(vm, "cat /tmp/dd.err"));
    const [a, b] = (await sh(vm, "md5sum /tmp/src.bin /mnt/pending.bin")).trim().split("\n").map((l) =>
      l.split(" ")[0]
    );
    assert.equal(a, b);
    assert.equal(await sh(vm, "md5sum /mnt/synced.bin"), before);
    assert.doesNotMatch(await sh(vm, "dmesg"), /I\/O error/);
  } finally {
    await backEnd?.kill();
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test({
  name:
    "linux: qemu-storage-daemon killed mid-write and restarted on the same socket gets the device back; pending writes complete",
  ignore: skipBlk !== undefined,
  fn: () =>
    reconnectUnderWrite(async (image, socket) => {
      const qsd = StorageDaemon.start(image, socket);
      await qsd.ready();
      return qsd;
    }),
});

Deno.test({
  name:
    "linux: `denovm device block` killed mid-write and restarted on the same socket: the same, with denovm's back end",
  ignore: skipBlk !== undefined,
  fn: () =>
    reconnectUnderWrite(async (image, socket) => {
      const p = await DeviceProcess.block(socket, image);
      return {
        kill: async () => {
          p.kill("SIGKILL");
          await p.exited;
        },
      };
    }),
});
