// KVM test of the vhost-user front end (devices/vhost_user/front_end.ts) with the freestanding guest
// test/guests/virtio.c: the guest finds a virtio-blk device that denovm has no model of here (the generic
// front end, `--vhost-user type=generic,device-id=2`), served by a `denovm device block` process. Its kicks
// reach that process straight from KVM (the QueueNotify ioeventfd is the ring's kick fd) and the process
// interrupts the guest through the irqfd (its call fd): the guest writes a sector, reads it back, reads
// sector 0, each completion seen by its interrupt handler; the host file then holds what the guest wrote.
// A snapshot of such a VM is refused (the rings' state is the back end's) and the VM runs on.
//
// Needs /dev/kvm; skips without it.

import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { buildGuest } from "../guests/build.ts";
import { VIRTIO_ID_BLOCK } from "../../devices/virtio/device.ts";
import { EXIT_SUCCESS } from "../../core/exit.ts";
import { StateError } from "../../core/state.ts";
import { type BootConfig, Vm } from "../../mod.ts";
import { within } from "../support/within.ts";
import { DeviceProcess } from "../support/device_process.ts";
import { StorageDaemon, storageDaemonUnavailable } from "../support/storage_daemon.ts";

const kvmAvailable = existsSync("/dev/kvm");
if (!kvmAvailable) console.log("vhost_user_front_end_test: KVM tests skipped: no /dev/kvm");

/** Hang protection only; the guest itself gives up after about 10 s without a completion interrupt. */
const GUEST_TIMEOUT_MS = 120_000;
/** virtio-blk sectors are 512 bytes (virtio 1.2 section 5.2.6). */
const SECTOR_SIZE = 512;
const IMAGE_SIZE = 1024 * 1024;
/** The sector the guest writes, and its pattern (test/guests/virtio.c BLK_TEST_SECTOR, sector1_byte). */
const TEST_SECTOR = 1;
function sector1Pattern(): Uint8Array {
  return Uint8Array.from({ length: SECTOR_SIZE }, (_, i) => (i * 13 + 0x3c) & 0xff);
}
/** A known sector 0 for the guest to read. */
function sector0Pattern(): Uint8Array {
  return Uint8Array.from({ length: SECTOR_SIZE }, (_, i) => (i * 7 + 3) & 0xff);
}
/** Requests the guest sends a writable block device: write, read back, read sector 0 (one interrupt each). */
const BLOCK_REQUESTS = 3;

/** FNV-1a, 32 bits, as the guest computes it. */
function fnv1a(data: Uint8Array): number {
  let h = 2166136261;
  for (const b of data) h = Math.imul(h ^ b, 16777619) >>> 0;
  return h;
}

/** The guest's "VIRTIO ..." lines, without the prefix and the UART's carriage returns. */
function virtioLines(text: string): string[] {
  return text.replace(/\r/g, "").split("\n").filter((l) => l.startsWith("VIRTIO ")).map((l) => l.slice(7));
}

/** A disk image of IMAGE_SIZE bytes at `dir`/disk.img, sector 0 the known pattern when `withSector0`. */
async function diskImage(dir: string, withSector0: boolean): Promise<string> {
  const path = join(dir, "disk.img");
  const image = new Uint8Array(IMAGE_SIZE);
  if (withSector0) image.set(sector0Pattern(), 0);
  await Deno.writeFile(path, image);
  return path;
}

/**
 * `body` with a `denovm device block` process serving a disk image (sector 0 the known pattern when
 * `withSector0`) in a temporary directory; the process is stopped and the directory removed after.
 */
async function withDeviceBlock(
  withSector0: boolean,
  body: (b: { dir: string; path: string; socket: string; backEnd: DeviceProcess }) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "denovm-vu-kvm-" });
  let backEnd: DeviceProcess | undefined;
  try {
    const path = await diskImage(dir, withSector0);
    const socket = join(dir, "blk.sock");
    backEnd = await DeviceProcess.start("block", ["--socket-path", socket, "--file", path]);
    await body({ dir, path, socket, backEnd });
  } finally {
    backEnd?.kill("SIGTERM");
    await backEnd?.exited;
    await Deno.remove(dir, { recursive: true });
  }
}

/** `kernel` on one vCPU and 64 MiB, no rng or balloon, `vhostUser` its only virtio devices. */
function bootConfig(kernel: string, vhostUser: BootConfig["vhostUser"]): BootConfig {
  return { kernel, debugExit: true, memMiB: 64, cpus: 1, rng: false, balloon: false, vhostUser };
}

/** The one line starting with `prefix + " "`, as key=value fields. */
function one(lines: string[], prefix: string, text: string): Record<string, string> {
  const found = lines.filter((l) => l.startsWith(prefix + " "));
  assert.equal(found.length, 1, `expected one "VIRTIO ${prefix}" line in:\n${text}`);
  return Object.fromEntries(
    found[0].split(" ").filter((w) => w.includes("=")).map((
      w,
    ) => [w.slice(0, w.indexOf("=")), w.slice(w.indexOf("=") + 1)]),
  );
}

/**
 * The virtio guest, run to its end with the block device at `path` (sector 0 the known pattern): it exited
 * successfully, its block line reports the capacity, the write read back and sector 0's checksum, every
 * completion came as an interrupt whose InterruptStatus said "used buffer" (no interrupt read as status 0),
 * and the host file holds what it wrote. Returns its "VIRTIO" lines and console text.
 */
async function assertBlockGuestRan(vm: Vm, path: string): Promise<{ lines: string[]; text: string }> {
  const code = await within(vm.exitCode, () => `the guest did not stop:\n${vm.console.text}`, GUEST_TIMEOUT_MS);
  const text = vm.console.text;
  assert.equal(code, EXIT_SUCCESS, text);
  const lines = virtioLines(text);
  assert.ok(lines.includes("DONE"), text);
  assert.deepEqual(one(lines, "blk", text), {
    cap: String(IMAGE_SIZE / SECTOR_SIZE),
    rw: "ok",
    sum0: fnv1a(sector0Pattern()).toString(16),
  });
  const irq = one(lines, "irq 0 blk", text);
  assert.ok(Number(irq.irqs) >= BLOCK_REQUESTS, text);
  assert.equal(irq.spurious, "0", text);
  const after = await Deno.readFile(path);
  assert.deepEqual(after.subarray(TEST_SECTOR * SECTOR_SIZE, (TEST_SECTOR + 1) * SECTOR_SIZE), sector1Pattern());
  return { lines, text };
}

Deno.test({
  name: "kvm: the generic vhost-user front end carries the virtio guest's block requests to `denovm device block`, " +
    "kicks by ioeventfd and interrupts by irqfd",
  ignore: !kvmAvailable,
  async fn() {
    await withDeviceBlock(true, async ({ path, socket, backEnd }) => {
      const kernel = await buildGuest("virtio");
      const stats: Record<string, number>[] = [];
      {
        await using vm = await Vm.boot(
          bootConfig(kernel, [{ type: "generic", deviceId: VIRTIO_ID_BLOCK, socket }]),
        );
        // Every completion came as an interrupt the back end raised through the irqfd.
        const { lines, text } = await assertBlockGuestRan(vm, path);
        assert.ok(lines.includes("found=1"), text);
        assert.equal(one(lines, "dev 0", text).id, String(VIRTIO_ID_BLOCK), text);
        stats.push(vm.stats());
      }
      // The front end set the rings up once and never failed.
      assert.equal(stats[0]["vhost-user-generic.activations"], 1, JSON.stringify(stats[0]));
      assert.equal(stats[0]["vhost-user-generic.failures"], 0, JSON.stringify(stats[0]));
      const after = await Deno.readFile(path);
      assert.deepEqual(after.subarray(0, SECTOR_SIZE), sector0Pattern(), "sector 0 untouched");
      assert.ok(after.subarray((TEST_SECTOR + 1) * SECTOR_SIZE).every((b) => b === 0), "nothing else written");
      // The back end served one front end and dropped nothing.
      assert.ok(!/dropping the front end/.test(backEnd.stderr), backEnd.stderr);
    });
  },
});

Deno.test({
  name: "kvm: a snapshot of a VM with a vhost-user device is refused in one line, and the VM runs on",
  ignore: !kvmAvailable,
  async fn() {
    await withDeviceBlock(false, async ({ dir, socket }) => {
      // The memory-pattern guest fills some RAM, then waits for a byte on COM1 ('q' powers it off).
      const kernel = await buildGuest("mempattern");
      await using vm = await Vm.boot(bootConfig(kernel, [{ type: "block", deviceId: VIRTIO_ID_BLOCK, socket }]));
      await vm.console.waitFor(/MEM fill seed=1/, { timeout: GUEST_TIMEOUT_MS });
      await assert.rejects(vm.snapshot(join(dir, "snap")), (e: Error) => {
        assert.ok(e instanceof StateError, `${e.name}: ${e.message}`);
        assert.match(e.message, /vhost-user-block: a vhost-user device's state is held by its back end/);
        assert.ok(!e.message.includes("\n"));
        return true;
      });
      assert.deepEqual([...Deno.readDirSync(join(dir, "snap"))], [], "nothing written");
      vm.console.send("q");
      const code = await within(vm.exitCode, () => `the guest did not stop:\n${vm.console.text}`, GUEST_TIMEOUT_MS);
      assert.equal(code, EXIT_SUCCESS, vm.console.text);
      assert.match(vm.console.text, /BYE/);
    });
  },
});

const noQsd = storageDaemonUnavailable();
if (kvmAvailable && noQsd) console.log(`vhost_user_front_end_test: the qemu-storage-daemon test skipped: ${noQsd}`);

Deno.test({
  name: "kvm: the virtio guest's block requests through the front end to qemu-storage-daemon's vhost-user-blk export",
  ignore: !kvmAvailable || noQsd !== undefined,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "denovm-vu-qsd-" });
    let daemon: StorageDaemon | undefined;
    try {
      const path = await diskImage(dir, true);
      const socket = join(dir, "blk.sock");
      daemon = StorageDaemon.start(path, socket);
      const kernel = await buildGuest("virtio");
      await using vm = await Vm.boot({
        ...bootConfig(kernel, [{ type: "block", deviceId: VIRTIO_ID_BLOCK, socket }]),
        vhostUserConnectTimeoutMs: 20_000,
      });
      await assertBlockGuestRan(vm, path);
    } finally {
      await daemon?.kill();
      await Deno.remove(dir, { recursive: true });
    }
  },
});
