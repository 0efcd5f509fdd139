// The default initramfs and denovm's virtiofsd (vmm/virtiofsd.ts) make a working pair: Debian's 6.1 kernel
// with the default initramfs boots under QEMU 10's own vhost-user-fs front end (TCG; the reference machine
// of test/support/virtiofs_qemu.ts), /init has loaded fuse and virtiofs, the guest mounts the tag, reads
// what the host wrote, writes a small file and 1 MiB of random bytes, syncs, and the host reads both back
// unchanged; after the guest powers off, virtiofsd is gone.
//
// No /dev/kvm is needed: QEMU runs the guest with TCG.

import assert from "node:assert/strict";
import { startVirtiofsQemu, virtiofsQemuUnavailable } from "../support/virtiofs_qemu.ts";
import { parseSharedDirOption } from "../../vmm/cli/devices/shared_dir.ts";
import { processesWith } from "../support/proc.ts";

const { reason, qemu } = await virtiofsQemuUnavailable();
if (reason) console.log(`skip: virtio-fs under QEMU: ${reason}`);

Deno.test({
  name: "virtio-fs: the default initramfs mounts denovm's virtiofsd under QEMU's vhost-user-fs; writes reach the host",
  ignore: reason !== undefined,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "denovm-virtiofs-qemu-" });
    try {
      const share = `${dir}/share`;
      Deno.mkdirSync(share);
      Deno.mkdirSync(`${dir}/run`, { mode: 0o700 });
      const hostText = `from the host ${crypto.randomUUID()}\n`;
      Deno.writeTextFileSync(`${share}/from-host.txt`, hostText);
      const cfg = parseSharedDirOption(`${share}:hostshare:type=fs`);
      const m = await startVirtiofsQemu({ qemu: qemu!, share: cfg, runtimeDir: `${dir}/run`, log: () => {} });
      try {
        assert.doesNotMatch(m.qemu.output, /^denovm-init: modules failed:/m);
        assert.match(m.qemu.output, /modules loaded:.* fuse virtiofs/);
        const mount = await m.client.exec(
          "mkdir -p /mnt && mount -t virtiofs hostshare /mnt && cat /mnt/from-host.txt",
        );
        assert.equal(mount.code, 0, mount.stderr);
        assert.equal(mount.stdout, hostText);
        const w = await m.client.exec(
          "echo written by the guest > /mnt/from-guest.txt && " +
            "dd if=/dev/urandom of=/mnt/big.bin bs=64k count=16 2>/dev/null && sync && md5sum /mnt/big.bin",
        );
        assert.equal(w.code, 0, w.stderr);
        assert.equal(Deno.readTextFileSync(`${share}/from-guest.txt`), "written by the guest\n");
        const big = Deno.readFileSync(`${share}/big.bin`);
        assert.equal(big.length, 1 << 20);
        const md5 = new TextDecoder().decode(
          new Deno.Command("md5sum", { args: [`${share}/big.bin`], stdout: "piped" }).outputSync().stdout,
        ).split(" ")[0];
        assert.equal(w.stdout.split(" ")[0], md5, "the guest's and the host's checksums of big.bin");
        const ls = await m.client.exec("ls /mnt | sort");
        assert.equal(ls.stdout, "big.bin\nfrom-guest.txt\nfrom-host.txt\n");
      } finally {
        await m.close();
      }
      const exit = await m.qemu.done;
      assert.equal(exit.killed, false, `QEMU exited by itself after poweroff:\n${exit.output}`);
      assert.deepEqual(processesWith(m.virtiofsd.socketPath), []);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
