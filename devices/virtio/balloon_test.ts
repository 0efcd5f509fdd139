// virtio-balloon driven through the virtio-mmio registers by the test driver: target and config
// change, inflate really releasing host pages (private anonymous memory: MADV_DONTNEED; a shared
// memfd as vhost-user uses: MADV_REMOVE, checked through the file's allocated blocks), deflate,
// hostile PFNs, the stats queue, and a property test with random PFN lists.

import assert from "node:assert/strict";
import fc from "fast-check";
import {
  BALLOON_CFG_ACTUAL,
  BALLOON_CFG_NUM_PAGES,
  BALLOON_PAGE_SIZE,
  BALLOON_STAT_SIZE,
  BalloonDevice,
  VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
  VIRTIO_BALLOON_F_STATS_VQ,
  VIRTIO_BALLOON_S_MEMFREE,
  VIRTIO_BALLOON_S_MEMTOT,
} from "./balloon.ts";
import { VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_CONFIG_GENERATION, VIRTIO_MMIO_INT_CONFIG } from "./mmio.ts";
import { VIRTIO_ID_BALLOON } from "./device.ts";
import { GuestMemory, OwnedGuestMemory } from "../../core/memory.ts";
import {
  check,
  closeFd,
  cstr,
  libc,
  MAP_SHARED,
  MFD_CLOEXEC,
  mmap,
  munmap,
  PROT_READ,
  PROT_WRITE,
} from "../../ffi/libc.ts";
import { GuardedGuestMemory } from "../../test/support/virtio_driver.ts";
import { captureVirtioLog, mmioRig } from "../../test/support/device_rig.ts";

const MiB = 1024 * 1024;
const GUEST_SIZE = 8 * MiB;
/** Pages from here on are the "guest's" pages the tests balloon; rings and buffers live below. */
const BALLOON_AREA = 4 * MiB;

function pfnList(pfns: number[]): Uint8Array {
  const b = new Uint8Array(4 * pfns.length);
  const v = new DataView(b.buffer);
  pfns.forEach((p, i) => v.setUint32(4 * i, p >>> 0, true));
  return b;
}

function statsBuffer(values: [number, bigint][]): Uint8Array {
  const b = new Uint8Array(BALLOON_STAT_SIZE * values.length);
  const v = new DataView(b.buffer);
  values.forEach(([tag, val], i) => {
    v.setUint16(i * BALLOON_STAT_SIZE, tag, true);
    v.setBigUint64(i * BALLOON_STAT_SIZE + 2, val, true);
  });
  return b;
}

function rig(mem?: GuestMemory) {
  const dev = new BalloonDevice();
  const g = mem ? undefined : new GuardedGuestMemory([{ start: 0, size: GUEST_SIZE }]);
  const m = mem ?? g!.mem;
  const { drv, irqs } = mmioRig(dev, m, BALLOON_AREA);
  drv.init();
  const log = captureVirtioLog();
  const mark = drv.alloc.mark();
  return {
    dev,
    drv,
    mem: m,
    irqs,
    lines: log.lines,
    /** Send PFNs on the inflate (0) or deflate (1) queue; returns the used entries. */
    send(queue: number, pfns: number[]) {
      drv.alloc.resetTo(mark);
      const q = drv.queues[queue];
      const sub = q.submit([pfnList(pfns)]);
      drv.kick(queue);
      const used = q.used();
      assert.deepEqual(used, [{ id: sub.head, len: 0 }]);
    },
    [Symbol.dispose]() {
      log.restore();
      if (g) {
        assert.ok(g.canaryIntact(), "no access outside guest memory");
        g.close();
      }
      dev.close();
    },
  };
}

function fillPages(mem: GuestMemory, pfns: number[], value: number) {
  for (const p of pfns) mem.fill(p * BALLOON_PAGE_SIZE, BALLOON_PAGE_SIZE, value);
}
function pageIs(mem: GuestMemory, pfn: number, value: number): boolean {
  return mem.slice(pfn * BALLOON_PAGE_SIZE, BALLOON_PAGE_SIZE).every((b) => b === value);
}

Deno.test("balloon: features, target in config, config-change interrupt, actual written by the driver", () => {
  using r = rig();
  assert.equal(r.drv.readReg(0x008), VIRTIO_ID_BALLOON);
  const f = r.drv.deviceFeatures();
  assert.ok(f & VIRTIO_BALLOON_F_STATS_VQ && f & VIRTIO_BALLOON_F_DEFLATE_ON_OOM);
  const gen = r.drv.readReg(VIRTIO_MMIO_CONFIG_GENERATION);
  r.irqs.n = 0;
  r.dev.setTarget(10 * MiB + 100);
  assert.equal(r.irqs.n, 1);
  assert.equal(r.drv.ackInterrupt() & VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_CONFIG);
  assert.notEqual(r.drv.readReg(VIRTIO_MMIO_CONFIG_GENERATION), gen);
  assert.equal(r.drv.readReg(VIRTIO_MMIO_CONFIG + BALLOON_CFG_NUM_PAGES), (10 * MiB) / BALLOON_PAGE_SIZE);
  r.dev.setTarget(10 * MiB); // same page count: no new interrupt
  assert.equal(r.irqs.n, 1);
  r.drv.writeReg(VIRTIO_MMIO_CONFIG + BALLOON_CFG_ACTUAL, 77);
  assert.equal(r.dev.actualPages, 77);
  assert.equal(r.drv.readReg(VIRTIO_MMIO_CONFIG + BALLOON_CFG_ACTUAL), 77);
  // num_pages is the host's: a driver write is ignored with a log line.
  r.drv.writeReg(VIRTIO_MMIO_CONFIG + BALLOON_CFG_NUM_PAGES, 5);
  assert.equal(r.dev.targetPages, (10 * MiB) / BALLOON_PAGE_SIZE);
  assert.equal(r.lines.length, 1);
});

Deno.test("balloon: inflated pages are released (private memory reads zeros), others untouched; deflate", () => {
  using r = rig();
  const base = BALLOON_AREA / BALLOON_PAGE_SIZE;
  const inflated = [base + 3, base + 4, base + 5, base + 9, base + 20];
  const kept = [base + 6, base + 10, base + 21];
  fillPages(r.mem, [...inflated, ...kept], 0x5a);
  r.send(0, inflated);
  for (const p of inflated) assert.ok(pageIs(r.mem, p, 0), `pfn ${p} reads zeros after inflate`);
  for (const p of kept) assert.ok(pageIs(r.mem, p, 0x5a), `pfn ${p} kept its data`);
  let s = r.dev.stats();
  assert.equal(s.inflatedPages, inflated.length);
  assert.equal(s.releasedBytes, inflated.length * BALLOON_PAGE_SIZE);
  r.send(1, inflated);
  s = r.dev.stats();
  assert.equal(s.deflatedPages, inflated.length);
  // Deflated pages are usable again.
  fillPages(r.mem, inflated, 0x33);
  assert.ok(pageIs(r.mem, inflated[0], 0x33));
});

Deno.test("balloon: on a shared memfd (vhost-user memory) inflate punches the pages out of the file", () => {
  const size = 8 * MiB;
  const fd = check("memfd_create", libc().memfd_create(cstr("denovm-balloon-test"), MFD_CLOEXEC));
  check("ftruncate", libc().ftruncate(fd, BigInt(size)));
  const ptr = mmap(size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const mem = new GuestMemory([{ guestBase: 0, size, hostAddr: BigInt(Deno.UnsafePointer.value(ptr)) }]);
  const blocks = () => Deno.statSync(`/proc/self/fd/${fd}`).blocks ?? 0;
  try {
    using r = rig(mem);
    const base = BALLOON_AREA / BALLOON_PAGE_SIZE;
    const pfns = Array.from({ length: 256 }, (_, i) => base + i); // 1 MiB
    fillPages(mem, pfns, 0x77);
    const before = blocks();
    r.send(0, pfns);
    const after = blocks();
    // st_blocks counts 512-byte units: 1 MiB less allocated.
    assert.ok(before - after >= MiB / 512, `memfd blocks ${before} -> ${after}`);
    assert.ok(pfns.every((p) => pageIs(mem, p, 0)));
    assert.equal(r.dev.stats().madviseErrors, 0);
  } finally {
    munmap(ptr, size);
    closeFd(fd);
  }
});

Deno.test("balloon: on memory restored from a snapshot (a private file mapping) inflate drops the copied pages", () => {
  // A restored VM's RAM is the snapshot's memory file mapped MAP_PRIVATE (OwnedGuestMemory.mapFile): Linux
  // refuses MADV_REMOVE there (EACCES); MADV_DONTNEED drops the VM's private copies, and the pages read the
  // file's bytes again.
  const size = 8 * MiB;
  const path = Deno.makeTempFileSync({ prefix: "denovm-balloon-snapshot-" });
  Deno.writeFileSync(path, new Uint8Array(size).fill(0x44));
  const mem = OwnedGuestMemory.mapFile(path, [{ start: 0, size }], [0]);
  try {
    using r = rig(mem);
    const base = BALLOON_AREA / BALLOON_PAGE_SIZE;
    const pfns = Array.from({ length: 256 }, (_, i) => base + i);
    fillPages(mem, pfns, 0x77); // the VM's own copies of these pages
    r.send(0, pfns);
    assert.equal(r.dev.stats().madviseErrors, 0);
    assert.ok(pfns.every((p) => pageIs(mem, p, 0x44)), "the pages read the snapshot's bytes again");
  } finally {
    mem.close();
    Deno.removeSync(path);
  }
});

Deno.test("balloon: hostile PFNs outside guest memory are logged and ignored", () => {
  using r = rig();
  const base = BALLOON_AREA / BALLOON_PAGE_SIZE;
  fillPages(r.mem, [base], 0x11);
  r.send(0, [GUEST_SIZE / BALLOON_PAGE_SIZE, 0xffff_ffff, base, 0x8000_0000]);
  const s = r.dev.stats();
  assert.equal(s.badPfns, 3);
  assert.equal(s.inflatedPages, 1);
  assert.ok(pageIs(r.mem, base, 0));
  assert.equal(r.lines.length, 3);
  // A buffer that is not whole le32s: the whole ones count, one more line.
  r.drv.alloc.resetTo(r.drv.alloc.mark());
  const q = r.drv.queues[0];
  q.submit([new Uint8Array([1, 2, 3])]);
  r.drv.kick(0);
  assert.equal(q.used().length, 1);
  assert.equal(r.lines.length, 4);
});

Deno.test("balloon: the stats queue holds the driver's buffer until the host asks for fresh numbers", async () => {
  using r = rig();
  assert.equal(await r.dev.requestStats(), false, "no buffer posted yet");
  const q = r.drv.queues[2];
  q.submit([statsBuffer([[VIRTIO_BALLOON_S_MEMFREE, 1000n], [VIRTIO_BALLOON_S_MEMTOT, 5000n]])]);
  r.drv.kick(2);
  assert.deepEqual(q.used(), [], "the device keeps the buffer");
  assert.equal(r.dev.guestStats()!.values.get(VIRTIO_BALLOON_S_MEMFREE), 1000n);
  assert.equal(r.dev.stats()["free-memory"], 1000);
  const fresh = r.dev.requestStats();
  assert.equal(q.used().length, 1, "the buffer went back to the driver");
  q.submit([statsBuffer([[VIRTIO_BALLOON_S_MEMFREE, 2000n], [VIRTIO_BALLOON_S_MEMTOT, 5000n]])]);
  r.drv.kick(2);
  assert.equal(await fresh, true);
  assert.equal(r.dev.stats()["free-memory"], 2000);
  assert.equal(r.dev.stats()["total-memory"], 5000);
});

Deno.test("balloon property: random PFN lists release exactly the valid pages and never touch memory outside", () => {
  using r = rig();
  const base = BALLOON_AREA / BALLOON_PAGE_SIZE;
  const pages = (GUEST_SIZE - BALLOON_AREA) / BALLOON_PAGE_SIZE;
  fc.assert(
    fc.property(
      fc.array(
        fc.oneof(
          fc.integer({ min: base, max: base + pages - 1 }),
          fc.integer({ min: GUEST_SIZE / BALLOON_PAGE_SIZE, max: 0xffff_ffff }),
        ),
        { maxLength: 64 },
      ),
      fc.boolean(),
      (pfns, inflate) => {
        const before = r.dev.stats();
        const valid = pfns.filter((p) => p < GUEST_SIZE / BALLOON_PAGE_SIZE);
        if (inflate) fillPages(r.mem, valid, 0x42);
        r.send(inflate ? 0 : 1, pfns);
        const after = r.dev.stats();
        assert.equal(after.badPfns - before.badPfns, pfns.length - valid.length);
        const key = inflate ? "inflatedPages" : "deflatedPages";
        assert.equal(after[key] - before[key], valid.length);
        if (inflate) assert.ok(valid.every((p) => pageIs(r.mem, p, 0)));
      },
    ),
    { numRuns: 100 },
  );
});

Deno.test("balloon: targetReached() resolves when the driver's actual reaches the target, rejects when it cannot", async () => {
  // No driver yet: nothing would ever answer, so the wait is refused at once.
  const idle = new BalloonDevice();
  idle.setTarget(MiB);
  await assert.rejects(idle.targetReached(), /balloon driver is not running/);
  // At the target already (0 = 0): resolves at once.
  await new BalloonDevice().targetReached();

  using r = rig();
  const pages = (4 * MiB) / BALLOON_PAGE_SIZE;
  r.dev.setTarget(4 * MiB);
  let settled: string | undefined;
  const waiting = r.dev.targetReached().then(() => settled = "ok", (e) => settled = (e as Error).message);
  r.drv.writeReg(VIRTIO_MMIO_CONFIG + BALLOON_CFG_ACTUAL, pages - 1);
  await Promise.resolve();
  assert.equal(settled, undefined, "not there yet");
  r.drv.writeReg(VIRTIO_MMIO_CONFIG + BALLOON_CFG_ACTUAL, pages);
  await waiting;
  assert.equal(settled, "ok");

  // A newer target replaces a pending wait (crosvm answers such a wait with an error too).
  r.dev.setTarget(8 * MiB);
  const replaced = r.dev.targetReached();
  r.dev.setTarget(2 * MiB);
  await assert.rejects(replaced, /newer balloon target/);
  // A driver reset ends the wait.
  const reset = r.dev.targetReached();
  r.dev.reset();
  await assert.rejects(reset, /reset the device/);
});
