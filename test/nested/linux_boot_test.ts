// The default guest: Debian's Linux 6.1 kernel with denovm's default initramfs.
//
// (a) Under denovm, the kernel's first lines show it parsed our command line and e820 table.
// (b) Under denovm, the kernel boots the initramfs to /init (DENOVM-INIT-OK) and powers off.
// (c) The initramfs itself is good: it holds /init, busybox and the virtio modules, and under
//     QEMU (TCG, microvm with ACPI) the same kernel and initramfs reach DENOVM-INIT-OK with every
//     module loaded and the virtio-mmio devices bound to their drivers.
//
// (a) and (b) need /dev/kvm; (b) also needs a KVM that runs unmodified kernels (not kvm_pvm,
// whose KVM emulates guest kernel code and stops on instructions it lacks).

import assert from "node:assert/strict";
import { E820_RAM, E820_RESERVED, e820Map, MiB } from "../../vmm/arch/layout.ts";
import { debianKernel } from "../support/kernel.ts";
import { nestedTestsOff } from "../support/nested.ts";
import { decodePng, type Image, pixel, Vm } from "../../mod.ts";
import { controlCall } from "../../vmm/control/client.ts";
import { hostKind } from "../../vmm/kvm/host.ts";
import { buildFakeKvm, fakeKvmEnv } from "../support/fake_kvm.ts";
import { defaultInitramfs, fullLinuxUnavailable, LINUX_CPUS, run, which } from "../support/default_guest.ts";
import { within } from "../support/within.ts";

const repo = new URL("../..", import.meta.url).pathname;
/** What runs guests here (vmm/kvm/host.ts): kvm_pvm emulates guest kernel code, "none" has no KVM. */
const kind = hostKind();
const hasKvm = kind !== "none";
const hasQemu = which("qemu-system-x86_64");
const hasCpio = which("cpio");
/** Why this host cannot boot an unmodified Linux kernel under denovm, or undefined. */
const linuxUnavailable = fullLinuxUnavailable();

function skipReason(reason: string | undefined, name: string): boolean {
  if (reason) console.log(`skip: ${name}: ${reason}`);
  return reason !== undefined;
}

function regexEscape(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

/** Linux's line for one e820 entry (arch/x86/kernel/e820.c e820_print_type: end is inclusive). */
function e820Line(addr: number, size: number, type: number): string {
  const hex = (n: number) => "0x" + n.toString(16).padStart(16, "0");
  const name = type === E820_RAM ? "usable" : type === E820_RESERVED ? "reserved" : `type ${type}`;
  return `BIOS-e820: [mem ${hex(addr)}-${hex(addr + size - 1)}] ${name}`;
}

Deno.test({
  name: "linux: Debian 6.1 vmlinux prints our command line and e820 map",
  ignore: skipReason(hasKvm ? undefined : "no /dev/kvm", "linux first lines"),
  async fn() {
    const kernel = await debianKernel();
    const memMiB = 256;
    // earlyprintk: the lines appear before the serial console driver starts. noxsave: kvm_pvm's
    // emulator lacks xrstor (harmless elsewhere).
    const params = ["console=ttyS0", "earlyprintk=ttyS0", "noxsave", "denovm.test=first-lines"];
    // On kvm_pvm this test means to run the kernel's first, emulated, steps: opt in.
    await using vm = await Vm.boot({ kernel: kernel.vmlinux, params, memMiB, cpus: 1, allowEmulatedKernel: true });
    const timeout = 180_000;
    // The command line the guest got: the VMM's part, then ours, and Linux prints exactly that.
    assert.ok(vm.cmdline.endsWith(params.join(" ")), `cmdline ${JSON.stringify(vm.cmdline)} ends with our params`);
    await vm.console.waitFor(new RegExp(`Command line: ${regexEscape(vm.cmdline)}\\r?$`, "m"), { timeout });
    for (const entry of e820Map(memMiB * MiB)) {
      const line = e820Line(entry.addr, entry.size, entry.type);
      await vm.console.waitFor(new RegExp(regexEscape(line)), { timeout });
    }
    await vm.stop();
  },
});

/** Why the device guest cannot run here (it needs e2fsprogs for its disk too), or undefined. */
const deviceGuestUnavailable = linuxUnavailable ??
  (!which("mkfs.ext4") || !which("debugfs")
    ? "mkfs.ext4 and debugfs are needed (Debian package e2fsprogs)"
    : undefined);

/** The device guest's display. */
const DEVICE_GUEST_WIDTH = 640;
const DEVICE_GUEST_HEIGHT = 480;

/** The default guest with the devices the device test drives, booted once (bootDeviceGuest). */
interface DeviceGuest {
  /** Its folder: the disks, the control socket's path, the snapshot. */
  dir: string;
  /** The snapshot taken at /init's marker. */
  snapshot: string;
  /** The control socket's path (the restored VM serves it too). */
  socket: string;
  /** The boot's console, to the power-off. */
  console: string;
  exitCode: number;
  exitReason: string;
}

let deviceGuestPending: Promise<DeviceGuest> | undefined;
/** The device guest, booted on first use (a rejection is every caller's). */
function deviceGuest(): Promise<DeviceGuest> {
  deviceGuestPending ??= bootDeviceGuest();
  return deviceGuestPending;
}

globalThis.addEventListener("unload", () => {
  deviceGuestPending?.then((g) => Deno.removeSync(g.dir, { recursive: true })).catch(() => {});
});

/**
 * Boots the default guest with an ext4 disk holding one file, a read-only disk, a keyboard, a GPU, the
 * control socket and the guest agent. At /init's marker it is snapshotted (and runs on); then /init's
 * console shell powers it off. The boot test checks that boot; the device test starts from the snapshot
 * instead of booting again.
 */
async function bootDeviceGuest(): Promise<DeviceGuest> {
  const kernel = await debianKernel();
  const initrd = await defaultInitramfs();
  const dir = await Deno.makeTempDir({ prefix: "denovm-linux-devices-" });
  await Deno.mkdir(`${dir}/content`);
  await Deno.writeTextFile(`${dir}/content/hello.txt`, "hello from the host\n");
  await run("mkfs.ext4", ["-q", "-F", "-d", `${dir}/content`, `${dir}/disk.img`, "16M"]);
  await Deno.writeFile(`${dir}/ro.img`, new Uint8Array(1 * MiB).fill(0x5a));
  const socket = `${dir}/control.sock`;
  await using vm = await Vm.boot({
    kernel: kernel.vmlinux,
    initrd,
    params: ["console=ttyS0"],
    memMiB: 256,
    cpus: LINUX_CPUS,
    agent: true,
    socket,
    blocks: [
      { path: `${dir}/disk.img`, ro: false, root: false, sparse: true, blockSize: 512, direct: false },
      { path: `${dir}/ro.img`, ro: true, root: false, sparse: true, blockSize: 512, direct: false },
    ],
    inputs: [{ kind: "keyboard" }],
    gpu: {
      backend: "2d",
      displays: [{ mode: "windowed", width: DEVICE_GUEST_WIDTH, height: DEVICE_GUEST_HEIGHT, refreshRate: 60 }],
    },
  });
  // Together under nested_kvm_test.ts's 8 silent minutes: a guest that hangs fails here, with its console.
  await vm.console.waitFor(/^denovm-init: modules loaded:.* virtio_mmio /m, { timeout: 180_000 });
  await vm.console.waitFor(/^DENOVM-INIT-OK\s*$/m, { timeout: 120_000 });
  await vm.snapshot(`${dir}/snapshot`);
  // /init's shell on the console powers the guest off (ACPI S5: exit code 0). Debian's 6.1 may print a
  // WARNING from virtio_gpu_queue_fenced_ctrl_buffer here: its virtio core breaks every device's queues at
  // shutdown while fbcon may still be drawing (Linux's fix: "virtgpu: don't reset on shutdown").
  vm.send("poweroff -f\n");
  const exitCode = await within(vm.exitCode, () => "the guest did not power off after `poweroff -f`", 120_000);
  return { dir, snapshot: `${dir}/snapshot`, socket, console: vm.console.text, exitCode, exitReason: vm.exitReason };
}

Deno.test({
  name: "linux: Debian 6.1 boots the default initramfs to /init and powers off",
  ignore: skipReason(deviceGuestUnavailable, "linux full boot"),
  async fn() {
    const g = await deviceGuest();
    const shown = `console:\n${g.console.split("\n").slice(-20).join("\n")}`;
    assert.match(g.console, /^denovm-init: modules loaded:.* virtio_mmio /m, shown);
    assert.match(g.console, /^DENOVM-INIT-OK/m, shown);
    assert.equal(g.exitCode, 0, `the guest powered off (exit code 0): ${g.exitReason}\n${shown}`);
  },
});

/** Input event codes (linux/input-event-codes.h). */
const EV_KEY = 0x01;
const KEY_A = 30;
/** struct input_event on x86_64: struct timeval (16 bytes), u16 type, u16 code, s32 value. */
const INPUT_EVENT_SIZE = 24;
const INPUT_EVENT_TYPE = 16;
const INPUT_EVENT_CODE = 18;
const INPUT_EVENT_VALUE = 20;

/** Bytes of `od -An -v -tx1` output. */
function odBytes(text: string): Uint8Array {
  return new Uint8Array(text.split(/\s+/).filter((w) => w).map((w) => parseInt(w, 16)));
}

Deno.test({
  name:
    "linux: Debian 6.1 under denovm drives disk, rng, balloon, keyboard, GPU framebuffer and the agent's console port",
  ignore: skipReason(deviceGuestUnavailable, "linux devices"),
  async fn() {
    // The booted guest, restored from its snapshot at /init's marker (its disks and socket as they were).
    const { dir, snapshot, socket } = await deviceGuest();
    const width = DEVICE_GUEST_WIDTH, height = DEVICE_GUEST_HEIGHT;
    await using vm = await Vm.restore(snapshot);
    const sh = async (cmd: string) => {
      const r = await vm.exec(["sh", "-c", cmd], { timeout: 60_000 });
      assert.equal(r.code, 0, `${cmd}: exit ${r.code}\n${r.stdout}${r.stderr}`);
      return r.stdout;
    };

    // Every device bound to its Linux driver; every vCPU up; the RTC has the host's date.
    const bound = await sh("for d in /sys/bus/virtio/devices/*; do basename $(readlink $d/driver); done");
    for (
      const driver of ["virtio_blk", "virtio_rng", "virtio_balloon", "virtio_input", "virtio_gpu", "virtio_console"]
    ) {
      assert.ok(bound.split("\n").includes(driver), `${driver} bound: ${bound}`);
    }
    assert.equal((await sh("nproc")).trim(), String(LINUX_CPUS));
    assert.equal((await sh("date -u +%Y")).trim(), String(new Date().getUTCFullYear()));

    // GPU: Linux's framebuffer (fbdev emulation over virtio-gpu) is our scanout. Paint rows
    // 200..299 white through /dev/fb0; the screenshot shows exactly that band.
    assert.equal((await sh("cat /sys/class/graphics/fb0/virtual_size")).trim(), `${width},${height}`);
    await sh(
      "echo 0 > /sys/class/graphics/fbcon/cursor_blink; echo 1 > /sys/class/graphics/fb0/blank; echo 0 > /sys/class/graphics/fb0/blank || true",
    );
    const stride = Number((await sh("cat /sys/class/graphics/fb0/stride")).trim());
    // One write of rows 0..299 (black, then the white band). Not dd with bs=stride: Linux 6.1's
    // fbdev damage for a write of exactly one whole line has zero width
    // (drm_fb_helper_memory_range_to_clip), so such writes never reach the scanout.
    type Totals = { transferToHostBytes: number; bytesCopied: number; copiesAvoidedBytes: number };
    const totals = () => (vm.gpu.stats() as { totals: Totals }).totals;
    const before = totals();
    await sh(
      `head -c ${200 * stride} /dev/zero >/tmp/band && tr '\\000' '\\377' </dev/zero | head -c ${
        100 * stride
      } >>/tmp/band && cat /tmp/band >/dev/fb0`,
    );
    const white = (img: Image, y: number) =>
      [0, width / 2, width - 1].every((x) => pixel(img, x, y).slice(0, 3).every((c) => c === 255));
    const img = await vm.step("linux framebuffer band", async () => {
      try {
        return await vm.waitForScreen((img) => white(img, 200) && white(img, 299), {
          timeout: 30_000,
          what: "the white band",
        });
      } catch (e) {
        throw new Error(`${(e as Error).message}\nGPU counters: ${JSON.stringify(vm.gpu.stats())}`);
      }
    });
    assert.equal(img.width, width);
    assert.equal(img.height, height);
    assert.ok(!white(img, 199) && !white(img, 300), "the band ends where Linux stopped writing");
    // Linux's virtio_gpu scans out a guest blob (RESOURCE_BLOB is offered): its transfers copy
    // nothing; the host reads the guest's pages, and the counters say so.
    const after = totals();
    assert.equal(after.bytesCopied - before.bytesCopied, 0, `no bytes copied: ${JSON.stringify(after)}`);
    assert.ok(
      after.copiesAvoidedBytes - before.copiesAvoidedBytes >= 100 * width * 4,
      `the band's bytes were served from guest memory: before ${JSON.stringify(before)}, after ${
        JSON.stringify(after)
      }`,
    );

    // Disk: read the host's file, write one, sync; the read-only disk is read-only to Linux.
    await sh("mkdir -p /mnt && mount -t ext4 /dev/vda /mnt");
    assert.equal(await sh("cat /mnt/hello.txt"), "hello from the host\n");
    await sh("echo 'written by Linux under denovm' > /mnt/guest.txt && sync && umount /mnt");
    assert.equal((await sh("cat /sys/block/vdb/ro")).trim(), "1");
    assert.ok(
      odBytes(await sh("dd if=/dev/vdb bs=512 count=1 2>/dev/null | od -An -v -tx1")).every((b) => b === 0x5a),
    );
    const roWrite = await vm.exec(["sh", "-c", "echo x | dd of=/dev/vdb conv=fsync 2>&1"], { timeout: 60_000 });
    assert.notEqual(roWrite.code, 0, `writing the read-only disk must fail: ${roWrite.stdout}`);

    // rng: the kernel's current hwrng is virtio's, and it gives bytes.
    assert.match(await sh("cat /sys/class/misc/hw_random/rng_current"), /^virtio_rng/);
    const random = odBytes(await sh("dd if=/dev/hwrng bs=64 count=1 2>/dev/null | od -An -v -tx1"));
    assert.equal(random.length, 64);
    assert.ok(random.some((b) => b !== 0));

    // Balloon: the driver gives 64 MiB of pages to the balloon and takes them back. With
    // DEFLATE_ON_OOM (offered, as crosvm does) Linux leaves MemTotal alone, so count pages in
    // its balloon_inflate/balloon_deflate events (/proc/vmstat, mm/balloon_compaction.c).
    const BALLOON_PAGES = (64 * MiB) / 4096;
    const vmstat = async () => {
      const text = await sh("cat /proc/vmstat");
      const of = (k: string) => Number(new RegExp(`^${k} (\\d+)$`, "m").exec(text)?.[1] ?? NaN);
      return { inflate: of("balloon_inflate"), deflate: of("balloon_deflate") };
    };
    const start = await vmstat();
    assert.ok(Number.isFinite(start.inflate), "/proc/vmstat has balloon_inflate");
    const until = async (what: string, ok: (v: { inflate: number; deflate: number }) => boolean) => {
      let last = start;
      for (let i = 0; i < 300; i++) {
        last = await vmstat();
        if (ok(last)) return;
        await new Promise((r) => setTimeout(r, 200));
      }
      throw new Error(
        `the balloon never ${what}: vmstat ${JSON.stringify(last)}, at the start ${JSON.stringify(start)}`,
      );
    };
    await controlCall(socket, { kind: "balloonAdjust", bytes: 64 * MiB });
    await until("inflated by 64 MiB", (v) => v.inflate - start.inflate >= BALLOON_PAGES);
    const stats = await controlCall(socket, { kind: "balloonStats" }) as {
      BalloonStats: { stats: { total_memory: number | null; free_memory: number | null }; balloon_actual: number };
    };
    assert.equal(stats.BalloonStats.balloon_actual, 64 * MiB, JSON.stringify(stats));
    const totalKiB = Number(/MemTotal:\s+(\d+)/.exec(await sh("cat /proc/meminfo"))![1]);
    assert.equal(
      stats.BalloonStats.stats.total_memory,
      totalKiB * 1024,
      `the guest's own MemTotal: ${JSON.stringify(stats)}`,
    );
    await controlCall(socket, { kind: "balloonAdjust", bytes: 0 });
    await until("deflated", (v) => v.deflate - start.deflate >= BALLOON_PAGES);

    // Keyboard: key presses injected through the library reach /dev/input/event0 as EV_KEY A
    // down and up. Keep pressing until the reader has them (it may open the device late).
    const reader = sh(`dd if=/dev/input/event0 bs=${INPUT_EVENT_SIZE} count=8 2>/dev/null | od -An -v -tx1`);
    let done = false;
    reader.finally(() => done = true).catch(() => {});
    while (!done) {
      vm.input.key(KEY_A);
      await new Promise((r) => setTimeout(r, 200));
    }
    const events = odBytes(await reader);
    assert.equal(events.length, 8 * INPUT_EVENT_SIZE);
    const seen = new Set<number>();
    for (let at = 0; at < events.length; at += INPUT_EVENT_SIZE) {
      const v = new DataView(events.buffer, at, INPUT_EVENT_SIZE);
      if (v.getUint16(INPUT_EVENT_TYPE, true) === EV_KEY && v.getUint16(INPUT_EVENT_CODE, true) === KEY_A) {
        seen.add(v.getInt32(INPUT_EVENT_VALUE, true));
      }
    }
    assert.ok(seen.has(1) && seen.has(0), `KEY_A pressed and released: values ${[...seen]}`);

    await vm.stop();
    // The file Linux wrote is on the image.
    assert.equal(
      await run("debugfs", ["-R", "cat /guest.txt", `${dir}/disk.img`]),
      "written by Linux under denovm\n",
    );
  },
});

Deno.test({
  name: "linux: the README's library example (examples/boot_type_screenshot.ts) runs to the end",
  ignore: skipReason(
    linuxUnavailable,
    "README example",
  ),
  async fn() {
    const kernel = await debianKernel();
    const initrd = await defaultInitramfs();
    const dir = await Deno.makeTempDir({ prefix: "denovm-example-" });
    try {
      const out = await new Deno.Command(Deno.execPath(), {
        args: [
          "run",
          "--allow-all",
          "--config",
          `${repo}deno.json`,
          `${repo}examples/boot_type_screenshot.ts`,
          kernel.vmlinux,
          initrd,
        ],
        cwd: dir,
        env: { DENOVM_ARTIFACTS: `${dir}/artifacts` },
        stdin: "null",
        stdout: "piped",
        stderr: "piped",
        signal: AbortSignal.timeout(15 * 60_000),
      }).output();
      const stdout = new TextDecoder().decode(out.stdout);
      const show = `stdout:\n${stdout}\nstderr:\n${new TextDecoder().decode(out.stderr)}`;
      assert.equal(out.code, 0, show);
      assert.match(stdout, new RegExp(`^uname -r: ${regexEscape(kernel.version)} \\(exit 0\\)$`, "m"), show);
      assert.match(stdout, /^screenshot 800x600: typed text at the top/m, show);
      assert.match(stdout, /^exit code 0$/m, show);
      const png = await Deno.readFile(`${dir}/screenshot.png`);
      const img = await decodePng(png);
      assert.deepEqual([img.width, img.height], [800, 600]);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

/** The module names /init loads, from the initramfs's load.order. */
const EXPECTED_MODULES = [
  "virtio_mmio",
  "virtio_blk",
  "virtio_net",
  "virtio_console",
  "virtio_rng",
  "virtio_balloon",
  "virtio_input",
  "vmw_vsock_virtio_transport",
  "virtio_gpu",
  "evdev",
  "ext4",
  "crc32c_generic",
  "virtio_pmem",
  "nd_pmem",
  "fuse",
  "virtiofs",
  // dependencies of the above, from their .modinfo depends=
  "virtio",
  "virtio_ring",
  "net_failover",
  "failover",
  "vsock",
  "vmw_vsock_virtio_transport_common",
  "drm",
  "drm_kms_helper",
  "drm_shmem_helper",
  "virtio_dma_buf",
  "jbd2",
  "mbcache",
  "libnvdimm",
  "nd_btt",
  "nd_virtio",
  "crc16",
];

Deno.test({
  name: "initramfs: holds /init, busybox and the virtio modules in dependency order",
  ignore: skipReason(hasCpio ? undefined : "cpio is not installed", "initramfs contents"),
  async fn() {
    const path = await defaultInitramfs();
    const kernel = await debianKernel();
    const gz = await Deno.readFile(path);
    assert.deepEqual([...gz.subarray(0, 2)], [0x1f, 0x8b], "gzip magic");
    const cpioBytes = new Uint8Array(
      await new Response(new Blob([gz]).stream().pipeThrough(new DecompressionStream("gzip"))).arrayBuffer(),
    );
    assert.equal(new TextDecoder().decode(cpioBytes.subarray(0, 6)), "070701", "cpio newc magic");
    const names = (await run("cpio", ["-t", "--quiet"], cpioBytes)).trim().split("\n");
    for (const f of ["init", "bin/busybox", "bin/sh", "dev", "proc", "sys"]) assert.ok(names.includes(f), f);
    const modDir = `lib/modules/${kernel.version}`;
    for (const m of EXPECTED_MODULES) assert.ok(names.includes(`${modDir}/${m}.ko`), `${m}.ko in the initramfs`);

    // load.order: every module after its dependencies (read back from the .ko files).
    const tmp = await Deno.makeTempDir({ prefix: "denovm-initramfs-test-" });
    try {
      await run("cpio", ["-i", "--quiet", "-D", tmp, "-d", "init", `${modDir}/*`], cpioBytes);
      const order = (await Deno.readTextFile(`${tmp}/${modDir}/load.order`)).trim().split("\n");
      assert.deepEqual([...order].sort(), [...EXPECTED_MODULES].sort());
      for (const [i, m] of order.entries()) {
        const ko = await Deno.readFile(`${tmp}/${modDir}/${m}.ko`);
        assert.deepEqual([...ko.subarray(0, 4)], [0x7f, 0x45, 0x4c, 0x46], `${m}.ko is ELF`);
        // The .modinfo strings are NUL-terminated key=value pairs; depends= lists the dependencies.
        const info = new TextDecoder("latin1").decode(ko).split("\0");
        const depends = info.find((s) => s.startsWith("depends="))?.slice("depends=".length) ?? "";
        for (const dep of depends.split(",").filter((d) => d)) {
          const at = order.indexOf(dep.replaceAll("-", "_"));
          assert.ok(at >= 0 && at < i, `${dep} is loaded before ${m}`);
        }
      }
      const init = await Deno.readTextFile(`${tmp}/init`);
      assert.match(init, /^#!\/bin\/busybox sh/);
      assert.match(init, /echo DENOVM-INIT-OK/);
      assert.match(init, /denovm\.poweroff/);
      assert.match(init, /setsid cttyhack sh/);
      assert.ok(((await Deno.stat(`${tmp}/init`)).mode! & 0o111) !== 0, "/init is executable");
    } finally {
      await Deno.remove(tmp, { recursive: true });
    }
  },
});

/** virtio device IDs (virtio 1.2 section 5, "Device Types"). */
const VIRTIO_ID_NET = 1;
const VIRTIO_ID_BLOCK = 2;
const VIRTIO_ID_CONSOLE = 3;
const VIRTIO_ID_RNG = 4;
const VIRTIO_ID_BALLOON = 5;
const VIRTIO_ID_INPUT = 18;

// microvm has no HPET or ACPI PM timer, so the kernel calibrates the TSC against the PIT, which
// fails under TCG on a busy host and then hangs; tsc_early_khz gives the frequency instead.
const QEMU_APPEND = "console=ttyS0 denovm.poweroff tsc_early_khz=2000000";

Deno.test({
  name: "initramfs: Debian 6.1 under QEMU TCG reaches DENOVM-INIT-OK with the virtio modules bound",
  ignore: skipReason(hasQemu ? undefined : "qemu-system-x86_64 is not installed", "initramfs under QEMU"),
  async fn() {
    const kernel = await debianKernel();
    const initrd = await defaultInitramfs();
    const disk = await Deno.makeTempFile({ prefix: "denovm-qemu-disk-" });
    try {
      await Deno.truncate(disk, 1 * MiB);
      // microvm with ACPI: the virtio-mmio transports are described in the DSDT, which is how the
      // Debian kernel (no CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES) finds them.
      const qemu = new Deno.Command("qemu-system-x86_64", {
        args: [
          ...["-M", "microvm,acpi=on", "-accel", "tcg", "-m", "256", "-smp", "1"],
          ...["-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none", "-serial", "stdio"],
          "-no-reboot",
          // Modern (version 2) virtio-mmio registers, as denovm has; virtio_input needs VIRTIO_F_VERSION_1.
          ...["-global", "virtio-mmio.force-legacy=false"],
          ...["-kernel", kernel.vmlinuz, "-initrd", initrd, "-append", QEMU_APPEND],
          ...["-drive", `file=${disk},if=none,id=disk0,format=raw`, "-device", "virtio-blk-device,drive=disk0"],
          ...["-netdev", "user,id=net0", "-device", "virtio-net-device,netdev=net0"],
          ...["-device", "virtio-serial-device", "-device", "virtio-rng-device"],
          ...["-device", "virtio-balloon-device", "-device", "virtio-keyboard-device"],
        ],
        stdin: "null",
        stdout: "piped",
        stderr: "piped",
      }).spawn();
      // A guard against a hung guest, not a timing assertion: TCG boots this in a few seconds.
      const guard = setTimeout(() => qemu.kill("SIGKILL"), 300_000);
      const out = await qemu.output();
      clearTimeout(guard);
      const console_ = new TextDecoder().decode(out.stdout);
      const tail = console_.split("\n").slice(-15).join("\n");
      assert.match(console_, /^DENOVM-INIT-OK\r?$/m, `no DENOVM-INIT-OK; console tail:\n${tail}`);
      assert.equal(
        out.code,
        0,
        `QEMU exit code (0: the guest powered off); stderr: ${new TextDecoder().decode(out.stderr)}`,
      );

      const loaded = console_.match(/^denovm-init: modules loaded:(.*?)\r?$/m)?.[1].trim().split(/\s+/) ?? [];
      assert.deepEqual([...loaded].sort(), [...EXPECTED_MODULES].sort(), "every module loaded");
      assert.doesNotMatch(console_, /^denovm-init: modules failed:/m);

      // Each device found through ACPI and bound to its driver: "virtioN=0x0002:virtio_blk".
      const devices = console_.match(/^denovm-init: virtio devices:(.*?)\r?$/m)?.[1].trim().split(/\s+/) ?? [];
      const bound = new Map<number, string>();
      for (const d of devices) {
        const m = d.match(/^virtio\d+=0x([0-9a-f]+):(\S+)$/);
        assert.ok(m, `device entry ${d}`);
        bound.set(parseInt(m[1], 16), m[2]);
      }
      assert.deepEqual(
        Object.fromEntries([...bound].sort(([a], [b]) => a - b)),
        {
          [VIRTIO_ID_NET]: "virtio_net",
          [VIRTIO_ID_BLOCK]: "virtio_blk",
          [VIRTIO_ID_CONSOLE]: "virtio_console",
          [VIRTIO_ID_RNG]: "virtio_rng",
          [VIRTIO_ID_BALLOON]: "virtio_balloon",
          [VIRTIO_ID_INPUT]: "virtio_input",
        },
      );
    } finally {
      await Deno.remove(disk);
    }
  },
});

/** scripts/boot-default.sh with `args`, its environment this process's plus `env`. */
async function bootDefault(args: string[], env: Record<string, string>, timeoutMs = 5 * 60_000) {
  const out = await new Deno.Command("bash", {
    args: [`${repo}scripts/boot-default.sh`, ...args],
    env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(timeoutMs),
  }).output();
  return {
    code: out.code,
    stdout: new TextDecoder().decode(out.stdout),
    stderr: new TextDecoder().decode(out.stderr),
  };
}

Deno.test("boot-default.sh: without KVM and with DENOVM_NESTED=off, one line saying so and exit code 1", async () => {
  // DENOVM_KVM_DEVICE names a device that does not exist: the script sees this host as having no KVM.
  const out = await bootDefault([], { DENOVM_NESTED: "off", DENOVM_KVM_DEVICE: "/nonexistent/kvm" });
  assert.equal(out.code, 1);
  assert.equal(out.stdout, "");
  const lines = out.stderr.trimEnd().split("\n");
  assert.equal(lines.length, 1, `one line: ${JSON.stringify(lines)}`);
  assert.match(lines[0], /no \/dev\/kvm/);
});

Deno.test("boot-default.sh: on kvm_pvm with DENOVM_NESTED=off, one line saying so, then the built-in test guest", async () => {
  // The fake KVM reporting itself as kvm_pvm (test/support/fake_kvm.c) makes any host look like one;
  // its "boot" script prints the command line and e820 count the guest was given, then powers off.
  const log = await Deno.makeTempFile({ prefix: "fake-kvm-", suffix: ".jsonl" });
  try {
    const env = { ...fakeKvmEnv(await buildFakeKvm(), "boot", log), DENOVM_FAKE_KVM_MODULE: "kvm_pvm" };
    const out = await bootDefault([], { ...env, DENOVM_NESTED: "off" });
    const show = `stdout:\n${out.stdout}\nstderr:\n${out.stderr}`;
    assert.equal(out.code, 0, show);
    const lines = out.stderr.trimEnd().split("\n");
    assert.equal(lines.length, 1, `one line: ${show}`);
    assert.match(
      lines[0],
      /^boot-default: this host's KVM is kvm_pvm .*DENOVM_NESTED=off; booting the built-in test guest boot_info/,
    );
    assert.match(out.stdout, /\bdenovm\.default=boot_info\b.*\ne820=\d+\n/, show);
  } finally {
    await Deno.remove(log);
  }
});

Deno.test({
  name:
    "boot-default.sh: without KVM or on kvm_pvm, says so in one line and boots the default guest in a nested KVM host",
  ignore: skipReason(
    kind === "kvm_amd" || kind === "kvm_intel"
      ? `this host's KVM is ${kind}: the script boots directly (the full boot test covers that)`
      : !hasQemu
      ? "qemu-system-x86_64 is not installed"
      : nestedTestsOff(),
    "boot-default nested",
  ),
  async fn() {
    // The README's first command on a host like this one: `denovm.poweroff` makes /init power off
    // after its marker, so the whole chain (nested host, denovm, Linux, /init) ends with exit 0.
    const out = await bootDefault(["-p", "denovm.poweroff"], {}, 20 * 60_000);
    const show = `stdout (tail):\n${out.stdout.split("\n").slice(-30).join("\n")}\nstderr:\n${out.stderr}`;
    const why = kind === "kvm_pvm" ? "this host's KVM is kvm_pvm [^\n]*" : "this host has no /dev/kvm; ";
    assert.match(
      out.stderr.split("\n")[0],
      new RegExp(`^boot-default: ${why}booting the default guest in a nested KVM host`),
      show,
    );
    assert.match(out.stdout, /^denovm-init: modules loaded:.* virtio_mmio /m, show);
    assert.match(out.stdout, /^DENOVM-INIT-OK\s*$/m, show);
    assert.equal(out.code, 0, `the guest powered off, denovm and the nested host exited 0\n${show}`);
  },
});
