// Real vhost-user back ends that no one here wrote, under denovm's front end, driven by Debian's Linux 6.1
// (the default guest: the default initramfs and the guest agent):
//   - virtio-fs: `--shared-dir DIR:TAG:type=fs` starts the machine's virtiofsd (vmm/virtiofsd.ts) and
//     connects it through the vhost-user front end; the guest mounts the tag, reads what the host wrote,
//     writes a small file and 1 MiB of random bytes, syncs, and the host reads both back unchanged; when
//     the VM stops, virtiofsd is gone.
//
// These need a KVM that runs unmodified kernels: they skip on kvm_pvm and without /dev/kvm, and run in the
// nested KVM host (test/nested/nested_kvm_test.ts).

import assert from "node:assert/strict";
import { Vm } from "../../mod.ts";
import { debianKernel } from "../support/kernel.ts";
import { defaultInitramfs, fullLinuxUnavailable, which } from "../support/default_guest.ts";
import { parseSharedDirOption } from "../../vmm/cli/devices/shared_dir.ts";
import { VIRTIOFSD_PATH } from "../../vmm/virtiofsd.ts";

/** Hang protection only (the nested host runs guests at TCG speed); no assertion is about time. */
const BOOT_TIMEOUT_MS = 300_000;
const GUEST_TIMEOUT_MS = 120_000;
const MEM_MIB = 256;

const skipFs = fullLinuxUnavailable() ??
  (!which("setpriv") ? "setpriv is needed (util-linux)" : undefined) ??
  (Deno.uid() !== 0 ? "virtiofsd runs as root" : undefined) ??
  ((() => {
    try {
      Deno.statSync(VIRTIOFSD_PATH);
      return undefined;
    } catch {
      return `${VIRTIOFSD_PATH} is needed (qemu-system-common)`;
    }
  })());
if (skipFs) console.log(`skip: linux virtio-fs: ${skipFs}`);

/** Runs `cmd` with sh in the guest; its stdout, or an assertion error with its output. */
async function sh(vm: Vm, cmd: string): Promise<string> {
  const r = await vm.exec(["sh", "-c", cmd], { timeout: GUEST_TIMEOUT_MS });
  assert.equal(r.code, 0, `${cmd}: exit ${r.code}\n${r.stdout}${r.stderr}`);
  return r.stdout;
}

/** Process ids whose command line mentions `needle`. */
function processesWith(needle: string): number[] {
  const out: number[] = [];
  for (const e of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(e.name)) continue;
    try {
      if (Deno.readTextFileSync(`/proc/${e.name}/cmdline`).includes(needle)) out.push(Number(e.name));
    } catch {
      // gone meanwhile
    }
  }
  return out;
}

async function md5(path: string): Promise<string> {
  const out = await new Deno.Command("md5sum", { args: [path], stdout: "piped" }).output();
  return new TextDecoder().decode(out.stdout).split(" ")[0];
}

Deno.test({
  name: "linux: Debian 6.1 mounts a --shared-dir type=fs tag served by virtiofsd; synced writes reach the host",
  ignore: skipFs !== undefined,
  async fn() {
    const kernel = await debianKernel();
    const initrd = await defaultInitramfs();
    const dir = await Deno.makeTempDir({ prefix: "denovm-linux-virtiofs-" });
    try {
      const share = `${dir}/share`;
      Deno.mkdirSync(share);
      const hostText = `from the host ${crypto.randomUUID()}\n`;
      Deno.writeTextFileSync(`${share}/from-host.txt`, hostText);
      const vm = await Vm.boot({
        kernel: kernel.vmlinux,
        initrd,
        params: ["console=ttyS0"],
        memMiB: MEM_MIB,
        cpus: 1,
        agent: true,
        sharedDirs: [parseSharedDirOption(`${share}:hostshare:type=fs`)],
      });
      let stopped = false;
      try {
        await vm.console.waitFor(/^DENOVM-INIT-OK\s*$/m, { timeout: BOOT_TIMEOUT_MS });
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
