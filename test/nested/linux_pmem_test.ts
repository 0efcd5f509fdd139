// virtio-pmem proven with the real kernel: Debian's 6.1 under denovm, with the default initramfs
// (virtio_pmem and nd_pmem), gets two pmem devices:
//   - /dev/pmem0, a writable 64 MiB ext4 image holding a file the host wrote: the guest mounts it, reads
//     the file, writes one of its own and syncs (the sync's flush is virtio-pmem's FLUSH request, which
//     the device answers after an fsync). The host sees the guest's file in the image while the VM still
//     runs (the mapping is the file's page cache; the guest unmounted it first, so that ext4's journal is
//     checkpointed) and after it stopped;
//   - /dev/pmem1, a read-only image whose size is no multiple of 2 MiB (the window is rounded up, as
//     crosvm rounds it): the guest sees the rounded size, mounts it read-only and reads its file.
//
// These need a KVM that runs unmodified kernels: they skip on kvm_pvm and without /dev/kvm, and run in
// the nested KVM host (test/nested/nested_kvm_test.ts). One boot serves the file.

import assert from "node:assert/strict";
import { MiB } from "../../vmm/arch/layout.ts";
import { fullLinuxUnavailable, run, which } from "../support/default_guest.ts";
import { bootAgentGuest, guestSh } from "../support/agent_guest.ts";
import { within } from "../support/within.ts";

/** Hang protection only (the nested host runs guests at TCG speed); no assertion is about time. */
const GUEST_TIMEOUT_MS = 120_000;
/** The writable image's size, a multiple of 2 MiB: the guest's /dev/pmem0 is exactly this. */
const RW_IMAGE_BYTES = 64 * MiB;
/** The read-only image: 5 MiB and 4 KiB, which the device rounds up to 6 MiB. */
const RO_IMAGE_KIB = 5 * 1024 + 4;
const RO_WINDOW_BYTES = 6 * MiB;

const skip = fullLinuxUnavailable() ??
  (!which("mkfs.ext4") || !which("debugfs")
    ? "mkfs.ext4 and debugfs are needed (Debian package e2fsprogs)"
    : undefined);
if (skip) console.log(`skip: linux pmem: ${skip}`);

/** A file's text inside an ext4 image, read on the host with debugfs (no mount needed). */
async function imageFile(image: string, path: string): Promise<string> {
  return await run("debugfs", ["-R", `cat ${path}`, image]);
}

Deno.test({
  name: "linux: Debian 6.1 mounts ext4 on /dev/pmem0, reads the host's file; its synced file reaches the host's image",
  ignore: skip !== undefined,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "denovm-linux-pmem-" });
    try {
      const nonce = crypto.randomUUID();
      const hostText = `hello from the host ${nonce}\n`;
      const roText = `read-only ${nonce}\n`;
      const guestText = `written by the guest ${nonce}`;
      await Deno.mkdir(`${dir}/rw`);
      await Deno.mkdir(`${dir}/ro`);
      await Deno.writeTextFile(`${dir}/rw/hello.txt`, hostText);
      await Deno.writeTextFile(`${dir}/ro/ro.txt`, roText);
      const rwImage = `${dir}/rw.img`, roImage = `${dir}/ro.img`;
      await run("mkfs.ext4", ["-q", "-F", "-d", `${dir}/rw`, rwImage, `${RW_IMAGE_BYTES / 1024}K`]);
      await run("mkfs.ext4", ["-q", "-F", "-d", `${dir}/ro`, roImage, `${RO_IMAGE_KIB}K`]);
      assert.equal((await Deno.stat(roImage)).size, RO_IMAGE_KIB * 1024);

      await using vm = await bootAgentGuest({
        memMiB: 256,
        pmems: [{ path: rwImage, ro: false, root: false }, { path: roImage, ro: true, root: false }],
      });
      const sh = (cmd: string) => guestSh(vm, cmd);
      const shown = () => `console:\n${vm.console.text.split("\n").slice(-30).join("\n")}`;
      assert.match(vm.console.text, /^denovm-init: modules loaded:.* virtio_pmem .*nd_pmem/m, shown());
      assert.doesNotMatch(vm.console.text, /^denovm-init: modules failed:/m, shown());

      // Both devices bound to virtio_pmem; the block devices have the windows' sizes.
      const bound = await sh("for d in /sys/bus/virtio/devices/*; do basename $(readlink $d/driver); done");
      assert.equal(bound.split("\n").filter((d) => d === "virtio_pmem").length, 2, bound);
      assert.equal((await sh("blockdev --getsize64 /dev/pmem0")).trim(), String(RW_IMAGE_BYTES));
      assert.equal((await sh("blockdev --getsize64 /dev/pmem1")).trim(), String(RO_WINDOW_BYTES));

      // The writable one: the host's file, then the guest's, synced.
      await sh("mkdir -p /mnt/rw /mnt/ro && mount -t ext4 /dev/pmem0 /mnt/rw");
      assert.equal(await sh("cat /mnt/rw/hello.txt"), hostText);
      await sh(`printf '%s' '${guestText}' > /mnt/rw/guest.txt && sync`);
      // Unmounted, ext4 has checkpointed its journal: debugfs (which replays no journal) finds the file. It
      // is in the host's file while the VM runs: the guest's stores went to the shared mapping.
      await sh("umount /mnt/rw");
      assert.equal(await imageFile(rwImage, "/guest.txt"), guestText);
      assert.doesNotMatch(
        await sh("dmesg"),
        /failed to send command to virtio pmem|I\/O error.*pmem|pmem.*I\/O error/i,
        "no pmem errors in the guest",
      );

      // The read-only one: mounted read-only, its file read.
      await sh("mount -t ext4 -o ro /dev/pmem1 /mnt/ro");
      assert.equal(await sh("cat /mnt/ro/ro.txt"), roText);
      await sh("umount /mnt/ro");
      const dmesg = await sh("dmesg");
      console.log(
        `linux pmem: guest's pmem lines:\n${dmesg.split("\n").filter((l) => /pmem|nd_/i.test(l)).join("\n")}`,
      );
      assert.doesNotMatch(dmesg, /I\/O error|EXT4-fs error/i, "no I/O errors in the guest");

      vm.send("poweroff -f\n");
      await within(vm.exitCode, () => `the guest did not power off\n${shown()}`, GUEST_TIMEOUT_MS);

      // After the VM: the guest's file and the host's are both in the image; the read-only image is unchanged.
      assert.equal(await imageFile(rwImage, "/guest.txt"), guestText);
      assert.equal(await imageFile(rwImage, "/hello.txt"), hostText);
      assert.equal((await Deno.stat(rwImage)).size, RW_IMAGE_BYTES);
      assert.equal(await imageFile(roImage, "/ro.txt"), roText);
      await run("e2fsck", ["-f", "-n", rwImage]);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
