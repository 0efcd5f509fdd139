// Snapshots of the default guest (Debian's Linux 6.1 with denovm's default initramfs and the guest
// agent), proven with the real kernel: one boot, one snapshot, then
//   - a restored clone answers vm.exec; the file it wrote in /tmp (tmpfs: guest memory) and the one on
//     its ext4 disk are there, the disk read again through the restored virtio-blk after dropping the
//     page cache; its clocks go on from the snapshot (uptime not behind it and increasing, the wall
//     clock between the snapshot's and now); its VM generation ID is new: Linux's vmgenid driver,
//     still bound, saw a different ID (it reseeds its RNG only then: "crng reseeded due to virtual
//     machine fork", drivers/virt/vmgenid.c vmgenid_notify and drivers/char/random.c
//     add_vmfork_randomness), and the host reads the clone's ID back (a snapshot of the clone);
//   - ten clones of that one snapshot run at once; each answers vm.exec, each reseeded its RNG for the
//     fork (the line above, once), and their first bytes of /dev/urandom are pairwise different. The
//     line is the proof of the vmgenid path: a read of /dev/urandom is ChaCha20 from the per-CPU key in
//     guest memory (crng_make_state), the same in every clone, until the base key is reseeded, and the
//     notify reseeds it at once. Different bytes alone prove less: Linux 6.1 also reseeds on its own
//     once the seed is old (crng_has_old_seed: uptime/2 seconds during the first two minutes, then a
//     minute), mixing RDSEED/RDRAND and the cycle counter (extract_entropy), which differ per clone.
//
// These need a KVM that runs unmodified kernels: they skip on kvm_pvm and without /dev/kvm, and run
// in the nested KVM host (test/nested/nested_kvm_test.ts). One boot serves the whole file.

import assert from "node:assert/strict";
import { Vm, VmTemplate } from "../../mod.ts";
import type { BlockConfig } from "../../vmm/config.ts";
import { readSnapshot } from "../../vmm/snapshot/format.ts";
import { MiB } from "../../vmm/arch/layout.ts";
import { debianKernel } from "../support/kernel.ts";
import { defaultInitramfs, fullLinuxUnavailable, run, which } from "../support/default_guest.ts";
import { within } from "../support/within.ts";
import { guestSh as sh } from "../support/agent_guest.ts";

/** Guest memory: small, so the snapshot's memory file and ten clones stay small in the nested host. */
const MEM_MIB = 128;
/** Clones of the one snapshot that run at once. */
const CLONES = 10;
/** Hang protection only (the nested host runs guests at TCG speed); no assertion is about time. */
const BOOT_TIMEOUT_MS = 300_000;
const GUEST_TIMEOUT_MS = 120_000;
/** How far the restored guest's wall clock may be ahead of the host's (its RTC started from the host's). */
const WALL_CLOCK_MARGIN_S = 60;
/** What Linux prints when its vmgenid driver sees a new ID (drivers/char/random.c add_vmfork_randomness). */
const VMFORK_LINE = "crng reseeded due to virtual machine fork";
/** The ACPI ID of denovm's VM generation ID device (vmm/arch/acpi.ts \_SB.VGEN _HID), as sysfs names it. */
const VMGENID_SYSFS_DEVICE = /^VMGENCTR:\d+$/m;

const skip = fullLinuxUnavailable() ??
  (!which("mkfs.ext4") || !which("debugfs")
    ? "mkfs.ext4 and debugfs are needed (Debian package e2fsprogs)"
    : undefined);
if (skip) console.log(`skip: linux snapshots: ${skip}`);

function disk(path: string): BlockConfig {
  return { path, ro: false, root: false, sparse: true, blockSize: 512, direct: false };
}

/** Seconds since boot (/proc/uptime: CLOCK_BOOTTIME). */
function uptime(text: string): number {
  const n = Number(text.trim().split(/\s+/)[0]);
  assert.ok(Number.isFinite(n), `an uptime: ${JSON.stringify(text)}`);
  return n;
}

/** Elapsed milliseconds since `t0`, for the figures the file prints. */
const since = (t0: number) => `${Math.round(performance.now() - t0)} ms`;

/** The one booted guest's snapshot, and what the guest said just before it. */
interface Prepared {
  dir: string;
  /** The snapshot, in `dir`. */
  template: VmTemplate;
  /** The ext4 image the original used (its state at the snapshot, until a clone writes to it). */
  image: string;
  /** A copy of `image` made before any clone ran: each of the ten clones gets a copy of it. */
  pristine: string;
  /** What the guest wrote in /tmp and on the disk. */
  tmpText: string;
  diskText: string;
  /** The guest's `date +%s` and uptime right before the snapshot. */
  wallBefore: number;
  uptimeBefore: number;
  /** The VM generation ID in the snapshot (32 hex digits). */
  vmgenid: string;
}

let preparing: Promise<Prepared> | undefined;
/** Boots the default guest once, has it write its files, snapshots it and stops it (a VmTemplate). */
function prepared(): Promise<Prepared> {
  preparing ??= prepare();
  return preparing;
}

async function prepare(): Promise<Prepared> {
  const kernel = await debianKernel();
  const initrd = await defaultInitramfs();
  const dir = await Deno.makeTempDir({ prefix: "denovm-linux-snapshot-" });
  const image = `${dir}/disk.img`;
  await Deno.mkdir(`${dir}/content`);
  await Deno.writeTextFile(`${dir}/content/hello.txt`, "hello from the host\n");
  await run("mkfs.ext4", ["-q", "-F", "-d", `${dir}/content`, image, "16M"]);
  const nonce = crypto.randomUUID();
  const tmpText = `tmpfs ${nonce}`;
  const diskText = `disk ${nonce}`;

  let wall = "", up = "";
  const t0 = performance.now();
  let t1 = t0;
  // The template VM is snapshotted with its vCPUs suspended and then stopped: the disk image stays as the
  // snapshot has it.
  const template = await VmTemplate.boot({
    kernel: kernel.vmlinux,
    initrd,
    params: ["console=ttyS0"],
    memMiB: MEM_MIB,
    cpus: 1,
    agent: true,
    blocks: [disk(image)],
  }, {
    until: /^DENOVM-INIT-OK\s*$/m,
    timeout: BOOT_TIMEOUT_MS,
    snapshotDir: `${dir}/snap`,
    prepare: async (vm) => {
      await sh(vm, "true");
      console.log(`linux snapshot: boot to DENOVM-INIT-OK and the agent's first answer: ${since(t0)}`);
      await sh(vm, `echo '${tmpText}' > /tmp/snap.txt`);
      await sh(vm, `mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && echo '${diskText}' > /mnt/snap.txt && sync`);
      // The driver is bound before the snapshot, and has not seen a fork.
      assert.match(await sh(vm, "ls /sys/bus/acpi/drivers/vmgenid"), VMGENID_SYSFS_DEVICE);
      assert.equal((await sh(vm, `dmesg | grep -c '${VMFORK_LINE}' || true`)).trim(), "0");
      [wall, up] = (await sh(vm, "date +%s; cat /proc/uptime")).trim().split("\n");
      t1 = performance.now();
    },
  });
  console.log(`linux snapshot: vm.snapshot of ${MEM_MIB} MiB and stop: ${since(t1)}`);
  const pristine = `${dir}/pristine.img`;
  await run("cp", ["--sparse=always", image, pristine]);
  const snap = readSnapshot(template.path);
  const memoryOnDisk = (await Deno.stat(snap.memoryPath)).blocks! * 512;
  console.log(
    `linux snapshot: memory file ${snap.memory.size / MiB} MiB, ${Math.round(memoryOnDisk / MiB)} MiB allocated`,
  );
  return {
    dir,
    template,
    image,
    pristine,
    tmpText,
    diskText,
    wallBefore: Number(wall),
    uptimeBefore: uptime(up),
    vmgenid: snap.vmgenid,
  };
}

globalThis.addEventListener("unload", () => {
  // The temporary folder of the one boot (snapshot, images), when it was made.
  preparing?.then((p) => Deno.removeSync(p.dir, { recursive: true })).catch(() => {});
});

/** Waits until the restored guest says its vmgenid driver reseeded the RNG (the notify reached it). */
async function reseeded(vm: Vm, what: string): Promise<void> {
  await vm.step(
    `${what}: vmgenid reseed`,
    () => vm.console.waitFor(new RegExp(VMFORK_LINE), { timeout: GUEST_TIMEOUT_MS }),
  );
}

Deno.test({
  name:
    "linux: a restored Debian 6.1 guest answers exec, keeps its tmpfs and ext4 files, its clocks go on, and its vmgenid driver sees a new ID",
  ignore: skip !== undefined,
  async fn() {
    const p = await prepared();
    let t0 = performance.now();
    // The original has stopped: the clone may use its image.
    await using clone = await within(
      p.template.clone({ blocks: [disk(p.image)] }),
      () => "the clone's restore did not settle",
      GUEST_TIMEOUT_MS,
    );
    const restored = since(t0);
    assert.equal((await sh(clone, "cat /tmp/snap.txt")).trim(), p.tmpText);
    console.log(`linux snapshot: restore ${restored}; to the first exec's answer ${since(t0)}`);

    // The clocks: uptime goes on from the snapshot's and increases; the wall clock is not behind the
    // snapshot's nor ahead of the host's.
    const [wall, up1, up2] = (await sh(clone, "date +%s; cat /proc/uptime; sleep 1; cat /proc/uptime")).trim().split(
      "\n",
    );
    const hostNow = Math.floor(Date.now() / 1000);
    assert.ok(uptime(up1) >= p.uptimeBefore, `uptime ${up1} after the restore, ${p.uptimeBefore} at the snapshot`);
    assert.ok(uptime(up2) > uptime(up1), `uptime ${up1}, then a second later ${up2}`);
    assert.ok(Number(wall) >= p.wallBefore, `wall clock ${wall} after the restore, ${p.wallBefore} at the snapshot`);
    assert.ok(
      Number(wall) <= hostNow + WALL_CLOCK_MARGIN_S,
      `wall clock ${wall} after the restore; the host's is ${hostNow}`,
    );

    // The disk: the file is there, also when read again from the disk (page cache dropped), and a new one
    // written by the clone reaches the image.
    assert.equal((await sh(clone, "cat /mnt/snap.txt")).trim(), p.diskText);
    assert.equal(
      (await sh(clone, "sync && echo 3 > /proc/sys/vm/drop_caches && cat /mnt/snap.txt /mnt/hello.txt")).trim(),
      `${p.diskText}\nhello from the host`,
    );
    await sh(clone, "echo 'written by the clone' > /mnt/clone.txt && sync");

    // The VM generation ID: the driver is still bound and saw a different ID (it reseeds only then), once.
    await reseeded(clone, "the clone");
    assert.match(await sh(clone, "ls /sys/bus/acpi/drivers/vmgenid"), VMGENID_SYSFS_DEVICE);
    assert.equal((await sh(clone, `dmesg | grep -c '${VMFORK_LINE}'`)).trim(), "1");
    // Host side: the clone's ID, read back through a snapshot of the clone, is not the snapshot's.
    await sh(clone, "umount /mnt");
    t0 = performance.now();
    await within(
      clone.snapshot(`${p.dir}/clone-snap`, { resume: false }),
      () => "the clone's snapshot did not settle",
      GUEST_TIMEOUT_MS,
    );
    console.log(`linux snapshot: a snapshot of the restored clone: ${since(t0)}`);
    const cloneId = readSnapshot(`${p.dir}/clone-snap`).vmgenid;
    assert.match(cloneId, /^[0-9a-f]{32}$/);
    assert.notEqual(cloneId, p.vmgenid, "the clone's VM generation ID is a new one");
    await Deno.remove(`${p.dir}/clone-snap`, { recursive: true });
    assert.equal(await clone.stop(), 0);

    assert.equal(await run("debugfs", ["-R", "cat /clone.txt", p.image]), "written by the clone\n");
    assert.equal(await run("debugfs", ["-R", "cat /snap.txt", p.image]), `${p.diskText}\n`);
  },
});

Deno.test({
  name: `linux: ${CLONES} clones of one Debian 6.1 snapshot run at once, each answers exec with its own random bytes`,
  ignore: skip !== undefined,
  async fn() {
    const p = await prepared();
    const clones: Vm[] = [];
    try {
      const t0 = performance.now();
      for (let i = 0; i < CLONES; i++) {
        // Each its own copy of the disk as the snapshot has it (the guest has it mounted).
        const image = `${p.dir}/clone${i}.img`;
        await run("cp", ["--sparse=always", p.pristine, image]);
        clones.push(
          await within(
            p.template.clone({ blocks: [disk(image)] }),
            () => `the restore of clone ${i} did not settle`,
            GUEST_TIMEOUT_MS,
          ),
        );
      }
      console.log(`linux snapshot: ${CLONES} clones restored (disk copies included): ${since(t0)}`);
      // All running: each answers, each reseeded its RNG, then each reads /dev/urandom.
      const bytes = await Promise.all(clones.map(async (vm, i) => {
        assert.equal((await sh(vm, "cat /tmp/snap.txt")).trim(), p.tmpText, `clone ${i}`);
        await reseeded(vm, `clone ${i}`);
        const [forks, ...random] =
          (await sh(vm, `dmesg | grep -c '${VMFORK_LINE}'; head -c 32 /dev/urandom | od -An -tx1`))
            .trim().split("\n");
        assert.equal(forks, "1", `clone ${i}: one reseed for the fork`);
        return random.join("").replace(/\s+/g, "");
      }));
      console.log(`linux snapshot: ${CLONES} clones answered with their random bytes: ${since(t0)}`);
      for (const [i, b] of bytes.entries()) assert.match(b, /^[0-9a-f]{64}$/, `clone ${i}: 32 bytes in hex`);
      for (let i = 0; i < CLONES; i++) {
        for (let j = i + 1; j < CLONES; j++) {
          assert.notEqual(bytes[i], bytes[j], `clones ${i} and ${j} read the same bytes from /dev/urandom`);
        }
      }
      const codes = await Promise.all(clones.map((vm) => vm.stop()));
      assert.deepEqual(codes, new Array(CLONES).fill(0));
    } finally {
      await Promise.all(clones.map((vm) => vm.stop().catch(() => {})));
    }
  },
});
