// The rate-limited guest-error log: the first lines of a burst in full, then one line per `every`
// occurrences carrying the running count, each log with its own count.

import assert from "node:assert/strict";
import { guestLog, RateLimitedLog } from "./log.ts";

/** Collect guest-log lines while `fn` runs, restoring the sink afterwards. */
function collect(fn: () => void): string[] {
  const lines: string[] = [];
  const saved = guestLog.sink;
  guestLog.sink = (line) => lines.push(line);
  try {
    fn();
  } finally {
    guestLog.sink = saved;
  }
  return lines;
}

Deno.test("rate-limited log: the burst is logged in full with the prefix, then every `every`-th line with a count", () => {
  const log = new RateLimitedLog("virtio-blk", 3, 10);
  const lines = collect(() => {
    for (let i = 1; i <= 35; i++) log.log(`bad descriptor ${i}`);
  });
  assert.deepEqual(lines, [
    "virtio-blk: bad descriptor 1",
    "virtio-blk: bad descriptor 2",
    "virtio-blk: bad descriptor 3",
    "virtio-blk: bad descriptor 10 (10 guest errors so far)",
    "virtio-blk: bad descriptor 20 (20 guest errors so far)",
    "virtio-blk: bad descriptor 30 (30 guest errors so far)",
  ]);
  assert.equal(log.count, 35, "every occurrence is counted, logged or not");
});

Deno.test("rate-limited log: defaults are 10 lines then one per 1000; each log counts on its own", () => {
  const a = new RateLimitedLog("a");
  const b = new RateLimitedLog("b");
  assert.equal(a.burst, 10);
  assert.equal(a.every, 1000);
  const lines = collect(() => {
    for (let i = 0; i < 2500; i++) a.log("x");
    b.log("y");
  });
  assert.equal(lines.filter((l) => l.startsWith("a: ")).length, 10 + 2);
  assert.ok(lines.includes("a: x (1000 guest errors so far)"));
  assert.ok(lines.includes("a: x (2000 guest errors so far)"));
  assert.deepEqual(lines.filter((l) => l.startsWith("b: ")), ["b: y"], "b's first error is not limited by a's");
  assert.equal(a.count, 2500);
  assert.equal(b.count, 1);
});

Deno.test("rate-limited log: a burst of 0 logs only the periodic lines", () => {
  const log = new RateLimitedLog("net", 0, 2);
  const lines = collect(() => {
    for (let i = 0; i < 5; i++) log.log("short frame");
  });
  assert.deepEqual(lines, ["net: short frame (2 guest errors so far)", "net: short frame (4 guest errors so far)"]);
});
