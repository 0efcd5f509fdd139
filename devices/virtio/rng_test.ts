// virtio-rng driven through the virtio-mmio registers by the test driver.

import assert from "node:assert/strict";
import fc from "fast-check";
import { RNG_MAX_BYTES_PER_REQUEST, RngDevice } from "./rng.ts";
import { VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_INT_VRING } from "./mmio.ts";
import { VIRTIO_F_VERSION_1, VIRTIO_ID_RNG } from "./device.ts";
import { GuardedGuestMemory, type Segment } from "../../test/support/virtio_driver.ts";
import { captureVirtioLog, closeDeviceRig, mmioRig } from "../../test/support/device_rig.ts";

const MiB = 1024 * 1024;
/** What the test driver fills writable buffers with before submitting them. */
const UNTOUCHED = 0xee;

function rig() {
  const dev = new RngDevice();
  const g = new GuardedGuestMemory([{ start: 0, size: 4 * MiB }]);
  const { drv, irqs } = mmioRig(dev, g.mem, 4 * MiB);
  drv.init();
  const log = captureVirtioLog();
  const mark = drv.alloc.mark();
  return {
    dev,
    drv,
    g,
    irqs,
    lines: log.lines,
    /** Submit one chain, kick, return the used length and the bytes of its writable buffers. */
    req(segs: Segment[]): { len: number; data: Uint8Array } {
      drv.alloc.resetTo(mark);
      const q = drv.queues[0];
      const sub = q.submit(segs);
      drv.kick(0);
      const used = q.used();
      assert.equal(used.length, 1);
      assert.equal(used[0].id, sub.head);
      const parts = sub.buffers.filter((b) => b.writable).map((b) => g.mem.read(b.addr, b.len));
      const data = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
      let o = 0;
      for (const p of parts) {
        data.set(p, o);
        o += p.length;
      }
      return { len: used[0].len, data };
    },
    [Symbol.dispose]() {
      closeDeviceRig(log, g, dev);
    },
  };
}

Deno.test("rng: device id, features, no config space", () => {
  using r = rig();
  assert.equal(r.drv.readReg(VIRTIO_MMIO_DEVICE_ID), VIRTIO_ID_RNG);
  assert.ok(r.drv.deviceFeatures() & VIRTIO_F_VERSION_1);
  assert.deepEqual([...r.drv.readConfig(0, 8)], new Array(8).fill(0));
});

Deno.test("rng: fills every writable byte of a chain with random bytes and interrupts", () => {
  using r = rig();
  r.irqs.n = 0;
  const a = r.req([100, 900, 3096]);
  assert.equal(a.len, 4096);
  assert.equal(r.irqs.n, 1);
  assert.equal(r.drv.ackInterrupt(), VIRTIO_MMIO_INT_VRING);
  // Random-looking: all 256 values occur in 32 KiB and no value is far above its mean of 128.
  const big = r.req([32 * 1024]);
  const counts = new Array(256).fill(0);
  for (const b of big.data) counts[b]++;
  assert.ok(counts.every((c) => c > 40), "every byte value occurs");
  assert.ok(Math.max(...counts) < 260, "no byte value dominates");
  const b = r.req([4096]);
  assert.notDeepEqual(a.data, b.data, "two requests get different bytes");
  assert.equal(r.dev.stats().bytes, 4096 * 2 + 32 * 1024);
});

Deno.test("rng: a request is capped at 64 KiB; the rest of the buffer is left alone", () => {
  using r = rig();
  const res = r.req([RNG_MAX_BYTES_PER_REQUEST + 1000]);
  assert.equal(res.len, RNG_MAX_BYTES_PER_REQUEST);
  assert.ok(res.data.subarray(RNG_MAX_BYTES_PER_REQUEST).every((x) => x === UNTOUCHED));
});

Deno.test("rng: a chain without writable buffers completes with length 0 and one log line", () => {
  using r = rig();
  const res = r.req([new Uint8Array(16)]);
  assert.equal(res.len, 0);
  assert.equal(r.lines.length, 1);
  assert.equal(r.dev.stats().emptyRequests, 1);
});

Deno.test("rng property: random chains get min(writable bytes, 64 KiB), never beyond", () => {
  using r = rig();
  fc.assert(
    fc.property(
      fc.array(fc.oneof(fc.integer({ min: 0, max: 40_000 }), fc.uint8Array({ maxLength: 64 })), {
        minLength: 1,
        maxLength: 6,
      }),
      (segs) => {
        // Readable buffers must come first (a writable then readable chain is malformed: length 0).
        const ordered = [...segs.filter((s) => typeof s !== "number"), ...segs.filter((s) => typeof s === "number")];
        const writable = ordered.reduce<number>((n, s) => n + (typeof s === "number" ? s : 0), 0);
        const res = r.req(ordered);
        assert.equal(res.len, Math.min(writable, RNG_MAX_BYTES_PER_REQUEST));
        assert.ok(res.data.subarray(res.len).every((x) => x === UNTOUCHED));
      },
    ),
    { numRuns: 100 },
  );
});
