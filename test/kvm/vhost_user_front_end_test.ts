// KVM test of the vhost-user front end (devices/vhost_user/front_end.ts) with the freestanding guest
// test/guests/virtio.c: the guest finds a virtio-blk device that denovm has no model of here (the generic
// front end, `--vhost-user type=generic,device-id=2`), served by a `denovm device block` process. Its kicks
// reach that process straight from KVM (the QueueNotify ioeventfd is the ring's kick fd) and the process
// interrupts the guest through the irqfd (its call fd): the guest writes a sector, reads it back, reads
// sector 0, each completion seen by its interrupt handler; the host file then holds what the guest wrote.
//
// Needs /dev/kvm; skips without it.

import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { buildGuest } from "../guests/build.ts";
import { VIRTIO_ID_BLOCK } from "../../devices/virtio/device.ts";
import { EXIT_SUCCESS } from "../../core/exit.ts";
import { Vm } from "../../mod.ts";
import { within } from "../support/within.ts";
import { DeviceProcess } from "../support/device_process.ts";

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

Deno.test({
  name: "kvm: the generic vhost-user front end carries the virtio guest's block requests to `denovm device block`, " +
    "kicks by ioeventfd and interrupts by irqfd",
  ignore: !kvmAvailable,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "denovm-vu-kvm-" });
    let backEnd: DeviceProcess | undefined;
    try {
      const path = join(dir, "disk.img");
      const image = new Uint8Array(IMAGE_SIZE);
      image.set(sector0Pattern(), 0);
      await Deno.writeFile(path, image);
      const socket = join(dir, "blk.sock");
      backEnd = await DeviceProcess.start("block", ["--socket-path", socket, "--file", path]);

      const kernel = await buildGuest("virtio");
      const stats: Record<string, number>[] = [];
      {
        await using vm = await Vm.boot({
          kernel,
          debugExit: true,
          memMiB: 64,
          cpus: 1,
          rng: false,
          balloon: false,
          vhostUser: [{ type: "generic", deviceId: VIRTIO_ID_BLOCK, socket }],
        });
        const code = await within(
          vm.exitCode,
          () => `virtio guest did not stop; console so far:\n${vm.console.text}`,
          GUEST_TIMEOUT_MS,
        );
        const text = vm.console.text;
        assert.equal(code, EXIT_SUCCESS, text);
        const lines = virtioLines(text);
        assert.ok(lines.includes("DONE"), text);
        assert.ok(lines.includes("found=1"), text);
        assert.equal(one(lines, "dev 0", text).id, String(VIRTIO_ID_BLOCK), text);
        assert.deepEqual(one(lines, "blk", text), {
          cap: String(IMAGE_SIZE / SECTOR_SIZE),
          rw: "ok",
          sum0: fnv1a(sector0Pattern()).toString(16),
        });
        // Every completion came as an interrupt the back end raised through the irqfd; InterruptStatus
        // said "used buffer" each time (no interrupt read as status 0).
        const irq = one(lines, "irq 0 blk", text);
        assert.ok(Number(irq.irqs) >= BLOCK_REQUESTS, text);
        assert.equal(irq.spurious, "0", text);
        stats.push(vm.stats());
      }
      // The front end set the rings up once and never failed.
      assert.equal(stats[0]["vhost-user-generic.activations"], 1, JSON.stringify(stats[0]));
      assert.equal(stats[0]["vhost-user-generic.failures"], 0, JSON.stringify(stats[0]));
      const after = await Deno.readFile(path);
      assert.deepEqual(after.subarray(TEST_SECTOR * SECTOR_SIZE, (TEST_SECTOR + 1) * SECTOR_SIZE), sector1Pattern());
      assert.deepEqual(after.subarray(0, SECTOR_SIZE), sector0Pattern(), "sector 0 untouched");
      assert.ok(after.subarray((TEST_SECTOR + 1) * SECTOR_SIZE).every((b) => b === 0), "nothing else written");
      // The back end served one front end and dropped nothing.
      assert.ok(!/dropping the front end/.test(backEnd.stderr), backEnd.stderr);
    } finally {
      backEnd?.kill("SIGTERM");
      await backEnd?.exited;
      await Deno.remove(dir, { recursive: true });
    }
  },
});
