// The vhost-user fuzzer at CI size: a few thousand requests against each `denovm device` back end with a
// fixed seed (no crash, hang or out-of-bounds write allowed), and the harness shown able to fail: a toy
// back end broken on purpose (toy_backend.ts) that writes past a buffer, dies, or spins.

import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { type DeviceProfile, fuzzVhostUserDetailed, VHOST_USER_FUZZ_TYPES } from "./vhost_user.ts";
import { TOY_QUEUE_SIZE } from "./toy_backend.ts";

/** Requests per back end type in CI. */
const CI_REQUESTS = 5000;
const SEED = 20261207;
const TOY = fileURLToPath(new URL("./toy_backend.ts", import.meta.url));

function toyProfile(mode: string): DeviceProfile {
  return {
    command: (s) => [Deno.execPath(), "run", "--allow-all", TOY, "--socket-path", s, "--mode", mode],
    queues: [{
      role: "request",
      max: TOY_QUEUE_SIZE,
      chain: ({ rng, pool }) => ({ segs: [{ r: pool.bytes(rng.range(0, 32)) }, { w: rng.range(1, 300) }] }),
    }],
  };
}

for (const type of VHOST_USER_FUZZ_TYPES) {
  Deno.test(`vhost-user fuzz: denovm device ${type} survives ${CI_REQUESTS} hostile requests`, async () => {
    const lines: string[] = [];
    const r = (await fuzzVhostUserDetailed({
      requestsPerDevice: CI_REQUESTS,
      seed: SEED,
      devices: [type],
      log: (l) => lines.push(l),
    }))[type];
    console.log(`${type}: ${JSON.stringify(r)}`);
    if (r.skipped) {
      console.log(`skipped ${type}: ${r.skipped}`);
      return;
    }
    assert.ok(r.requests >= CI_REQUESTS, `${r.requests} requests`);
    assert.equal(r.crashes, 0, lines.join("\n"));
    assert.equal(r.hangs, 0, lines.join("\n"));
    assert.equal(r.oob, 0, lines.join("\n"));
  });
}

Deno.test("vhost-user fuzz: a correct toy back end comes out clean", async () => {
  const lines: string[] = [];
  const r = (await fuzzVhostUserDetailed({
    requestsPerDevice: CI_REQUESTS,
    seed: SEED,
    devices: ["toy"],
    profiles: { toy: toyProfile("ok") },
    log: (l) => lines.push(l),
  })).toy;
  assert.deepEqual([r.crashes, r.hangs, r.oob], [0, 0, 0], lines.join("\n"));
});

Deno.test("vhost-user fuzz: a toy back end that writes past a buffer is caught", async () => {
  const lines: string[] = [];
  const r = (await fuzzVhostUserDetailed({
    requestsPerDevice: CI_REQUESTS,
    seed: SEED,
    devices: ["toy"],
    profiles: { toy: toyProfile("oob") },
    log: (l) => lines.push(l),
  })).toy;
  assert.ok(r.oob > 0, `no oob counted:\n${lines.join("\n")}`);
  assert.ok(lines.some((l) => /OOB WRITE .*\(0x42\)/.test(l)), lines.join("\n"));
  assert.deepEqual([r.crashes, r.hangs], [0, 0]);
});

Deno.test("vhost-user fuzz: a toy back end that dies is counted as a crash and restarted", async () => {
  const lines: string[] = [];
  const r = (await fuzzVhostUserDetailed({
    requestsPerDevice: CI_REQUESTS,
    seed: SEED,
    devices: ["toy"],
    profiles: { toy: toyProfile("crash") },
    log: (l) => lines.push(l),
  })).toy;
  assert.ok(r.crashes > 0, lines.join("\n"));
  assert.ok(r.requests >= CI_REQUESTS, "fuzzing went on after the restarts");
  assert.ok(lines.some((l) => l.includes(`seed ${SEED}, request `)), "the crash is logged with seed and request index");
});

Deno.test("vhost-user fuzz: a toy back end that stops answering is counted as a hang", async () => {
  const lines: string[] = [];
  const r = (await fuzzVhostUserDetailed({
    requestsPerDevice: 1500,
    seed: SEED,
    devices: ["toy"],
    profiles: { toy: toyProfile("hang") },
    hangMs: 1000,
    log: (l) => lines.push(l),
  })).toy;
  assert.ok(r.hangs > 0, lines.join("\n"));
  assert.equal(r.crashes, 0, lines.join("\n"));
});
