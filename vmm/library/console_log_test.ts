// The library's console helper without a VM: waiting for console text (matches, timeouts that explain
// themselves, VM exit).

import assert from "node:assert/strict";
import { ConsoleLog, ConsoleTimeoutError } from "./console_log.ts";

const enc = new TextEncoder();

Deno.test("console: waitFor resolves on text that arrives later, split across chunks, and moves past each match", async () => {
  const log = new ConsoleLog();
  const p = log.waitFor(/login: ?$/m, { timeout: 1000 });
  log.push(enc.encode("Linux version 6.1\nlog"));
  log.push(enc.encode("in: "));
  const m = await p;
  assert.equal(m[0], "login: ");
  assert.equal(m.index, "Linux version 6.1\n".length);
  // The next wait starts after the previous match: an old "login:" does not satisfy it.
  const again = log.waitFor("login:", { timeout: 200 });
  await assert.rejects(again, ConsoleTimeoutError);
  log.push(enc.encode("\nlogin: "));
  assert.equal((await log.waitFor("login:", { timeout: 200, from: 0 })).index, m.index);
});

Deno.test("console: a timeout names the pattern and shows the last console lines", async () => {
  const log = new ConsoleLog();
  for (let i = 0; i < 30; i++) log.push(enc.encode(`line ${i}\n`));
  const err = await log.waitFor(/never/, { timeout: 50 }).catch((e) => e);
  assert.ok(err instanceof ConsoleTimeoutError);
  assert.match(err.message, /waiting for \/never\/ on the console: timed out after 50 ms/);
  assert.match(err.message, /line 29/);
  assert.doesNotMatch(err.message, /line 3\n/, "only the tail is shown");
});

Deno.test("console: a wait fails at once when the VM ends, and an abort signal stops it", async () => {
  const log = new ConsoleLog();
  const p = log.waitFor(/prompt/, { timeout: 10_000 });
  log.push(enc.encode("Kernel panic - not syncing\n"));
  log.close("exit code 34: guest panicked (pvpanic)");
  const err = await p.catch((e) => e);
  assert.match(err.message, /the VM ended \(exit code 34/);
  assert.match(err.message, /Kernel panic/);
  const ac = new AbortController();
  const q = new ConsoleLog().waitFor(/x/, { timeout: 10_000, signal: ac.signal });
  ac.abort();
  assert.match((await q.catch((e) => e)).message, /aborted/);
});

Deno.test("console: text that arrived before the VM ended still matches after it ended", async () => {
  const log = new ConsoleLog();
  log.push(enc.encode("DONE\n"));
  log.close("exit code 0");
  assert.equal((await log.waitFor(/DONE/, { timeout: 10 }))[0], "DONE");
});
