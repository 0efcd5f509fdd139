// The device fuzzer at CI size: every device model takes a few thousand requests from a fixed seed with
// no crash, hang or write outside what the guest granted; and the harness proves it can fail, by counting
// what deliberately broken toy devices do.

import assert from "node:assert/strict";
import {
  CanaryMemory,
  DEVICE_NAMES,
  fuzzDevices,
  fuzzVirtio,
  RAM_SIZE,
  type RequestBuilder,
  SENTINEL_START,
  type VirtioTarget,
} from "./devices.ts";
import {
  type ActivateContext,
  serveQueue,
  VIRTIO_COMMON_FEATURES,
  VIRTIO_ID_RNG,
  type VirtioDevice,
} from "../../devices/virtio/device.ts";
import type { Virtqueue } from "../../devices/virtio/queue.ts";
import type { Prng } from "./common.ts";

/** The CI run's seed: a failure names it and the request's index, and the same seed replays it. */
const SEED = 0x5eed;
const CI_REQUESTS = 3000;

Deno.test("device fuzzer: every device model takes a few thousand hostile requests without a crash, hang or oob", async () => {
  const lines: string[] = [];
  const res = await fuzzDevices({ requestsPerDevice: CI_REQUESTS, seed: SEED, log: (l) => lines.push(l) });
  const skipped = DEVICE_NAMES.filter((n) => !res[n]);
  // Only net may be missing, and only where no network namespace can be made (it logs why).
  assert.ok(skipped.every((n) => n === "net"), `not fuzzed: ${skipped}`);
  if (skipped.length) assert.ok(lines.some((l) => l.startsWith("fuzz net: skipped")), "net says why it was skipped");
  const failures = lines.filter((l) => / (crash|hang|oob) at seed /.test(l));
  for (const [name, r] of Object.entries(res)) {
    assert.equal(r.requests, CI_REQUESTS, `${name} requests`);
    assert.deepEqual({ crashes: r.crashes, hangs: r.hangs, oob: r.oob }, { crashes: 0, hangs: 0, oob: 0 }, name);
  }
  assert.deepEqual(failures, []);
});

// ---- Toy devices that break the rules, one way each ----

type Misdeed = "throws" | "writes past RAM" | "writes a readable buffer" | "writes the sentinel" | "never completes";

/** A request queue that answers every chain with nothing, except every `every`-th one, where it does `misdeed`. */
class ToyDevice implements VirtioDevice {
  readonly deviceType = VIRTIO_ID_RNG;
  readonly name = "toy";
  readonly queueMaxSizes: readonly number[] = [64];
  readonly features = VIRTIO_COMMON_FEATURES;
  #q: Virtqueue | undefined;
  #irq: ActivateContext["interrupt"] | undefined;
  #mem: ActivateContext["mem"] | undefined;
  #n = 0;

  constructor(readonly misdeed: Misdeed, readonly cm: CanaryMemory, readonly every: number) {}

  readConfig(_offset: number, data: Uint8Array): void {
    data.fill(0);
  }
  writeConfig(): void {}
  activate(ctx: ActivateContext): void {
    this.#q = ctx.queues[0];
    this.#irq = ctx.interrupt;
    this.#mem = ctx.mem;
  }
  reset(): void {
    this.#q = undefined;
  }
  queueNotify(index: number): void {
    const q = this.#q;
    if (index !== 0 || !q) return;
    if (this.misdeed === "never completes") {
      for (let c = q.pop(); c; c = q.pop()) if (++this.#n % this.every !== 0) q.addUsed(c.head, 0);
      return;
    }
    serveQueue(q, 0, this.#irq, (chain) => {
      if (++this.#n % this.every !== 0) return 0;
      switch (this.misdeed) {
        case "throws":
          throw new Error("toy device: broken on purpose");
        case "writes past RAM": // through a raw view of the host mapping, as a stray pointer would
          this.cm.all[this.cm.ramOffset + RAM_SIZE + 100] ^= 0xff;
          return 0;
        case "writes a readable buffer":
          if (chain.readable.length) {
            this.#mem!.setU8(chain.readable[0].addr, ~this.#mem!.getU8(chain.readable[0].addr));
          }
          return 0;
        default:
          this.#mem!.setU8(SENTINEL_START + 4096, 0);
          return 0;
      }
    });
  }
}

function toyTarget(misdeed: Misdeed, every: number): VirtioTarget {
  return {
    name: `toy (${misdeed})`,
    roles: ["request"],
    make: (cm) => new ToyDevice(misdeed, cm, every),
    request(_q: number, b: RequestBuilder, r: Prng) {
      b.readRandom(r, 16);
      b.write(16);
    },
  };
}

for (
  const [misdeed, counted] of [
    ["throws", "crashes"],
    ["writes past RAM", "oob"],
    ["writes a readable buffer", "oob"],
    ["writes the sentinel", "oob"],
    ["never completes", "hangs"],
  ] as const
) {
  Deno.test(`device fuzzer: a toy device that ${misdeed} is counted in ${counted}, and the run goes on`, async () => {
    const lines: string[] = [];
    const requests = 2000;
    const { result, failures } = await fuzzVirtio(toyTarget(misdeed, 97), requests, SEED, (l) => lines.push(l));
    assert.equal(result.requests, requests, "every request was driven");
    assert.ok(result[counted] >= 1, `${counted}: ${JSON.stringify(result)}`);
    for (const other of ["crashes", "hangs", "oob"] as const) {
      if (other !== counted) assert.equal(result[other], 0, `${other}: ${JSON.stringify(result)}`);
    }
    // Each failure names the seed and the request's index, so the same seed replays it.
    const f = failures[0];
    assert.ok(lines.some((l) => l.includes(`at seed ${SEED} request ${f.index}:`)), lines[0]);
  });
}

Deno.test("device fuzzer: the canary memory sees a write beside RAM and nothing else", () => {
  const cm = new CanaryMemory();
  try {
    assert.ok(cm.guardsIntact());
    cm.mem.setU8(RAM_SIZE - 1, 7); // guest memory: fine
    cm.mem.setU8(0, 7);
    assert.ok(cm.guardsIntact());
    assert.throws(() => cm.mem.setU8(RAM_SIZE, 7));
    cm.all[cm.ramOffset - 1] = 0;
    assert.ok(!cm.guardsIntact());
    cm.restore();
    assert.ok(cm.guardsIntact());
  } finally {
    cm.close();
  }
});
