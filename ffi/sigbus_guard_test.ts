// The SIGBUS guard: a registered mapping whose file shrinks faults harmlessly (zero page, fault counted,
// eventfd written); a fault anywhere else still kills the process with SIGBUS. The deadly cases run in
// a child process: this file re-run with GUARD_CHILD_ENV naming the case.

import assert from "node:assert/strict";
import {
  check,
  closeFd,
  cstr,
  eventfd,
  eventfdRead,
  libc,
  MAP_SHARED,
  MFD_CLOEXEC,
  mmap,
  munmap,
  PROT_READ,
  PROT_WRITE,
} from "./libc.ts";
import { buildSigbusGuard, sigbusGuard } from "./sigbus_guard.ts";

const PAGE = 4096;
const GUARD_CHILD_ENV = "DENOVM_SIGBUS_GUARD_TEST_CHILD";

function gccMissing(): string | undefined {
  const r = new Deno.Command("sh", { args: ["-c", "command -v gcc"], stdout: "null", stderr: "null" }).outputSync();
  return r.success ? undefined : "gcc missing (apt-get install gcc libc6-dev)";
}
const reason = gccMissing();
if (reason) console.log(`skipping SIGBUS guard tests: ${reason}`);

/** A memfd of `pages` pages mapped shared; `view` is a byte view of the mapping. */
function mappedMemfd(pages: number) {
  const fd = check("memfd_create", libc().memfd_create(cstr("sigbus-guard-test"), MFD_CLOEXEC));
  check("ftruncate", libc().ftruncate(fd, BigInt(pages * PAGE)));
  const ptr = mmap(pages * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const view = new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(ptr, pages * PAGE));
  return { fd, ptr, view, length: pages * PAGE };
}

/** The child's cases: each ends in a SIGBUS the guard must not swallow. */
function childCase(which: string): void {
  const m = mappedMemfd(2);
  if (which === "unregistered") {
    // Another mapping is registered; this one is not.
    const other = mappedMemfd(1);
    const g = sigbusGuard();
    if (!g.guard) throw new Error(g.reason);
    g.guard.register(other.ptr, other.length, -1);
  } else if (which === "unregistered-after-unregister") {
    const g = sigbusGuard();
    if (!g.guard) throw new Error(g.reason);
    g.guard.unregister(g.guard.register(m.ptr, m.length, -1));
  }
  check("ftruncate", libc().ftruncate(m.fd, 0n));
  m.view[PAGE] = 1; // past the end of the file: SIGBUS
  console.log("SURVIVED");
}

const child = Deno.env.get(GUARD_CHILD_ENV);
if (child) childCase(child);

Deno.test({
  name: "sigbus guard: a registered mapping whose memfd is truncated faults harmlessly and the fault is recorded",
  ignore: reason !== undefined,
  fn() {
    const g = sigbusGuard();
    assert.ok(g.guard, g.reason);
    const guard = g.guard;
    const m = mappedMemfd(4);
    const notify = eventfd();
    const slot = guard.register(m.ptr, m.length, notify);
    try {
      m.view.fill(7);
      assert.equal(guard.takeFaults(slot), 0, "no fault while the file backs the mapping");
      const before = guard.totalFaults();
      check("ftruncate", libc().ftruncate(m.fd, BigInt(PAGE))); // pages 1..3 lose their backing
      assert.equal(m.view[0], 7, "the page still inside the file keeps its bytes");
      assert.equal(m.view[PAGE + 5], 0, "a read past the end completes, reading a zero page");
      m.view[2 * PAGE] = 9; // a write past the end completes too (into a private page)
      m.view[2 * PAGE + 1] = 9; // the same page again: repaired already, no second fault
      assert.equal(m.view[2 * PAGE], 9);
      assert.equal(guard.takeFaults(slot), 2, "one fault for each page touched");
      assert.equal(guard.takeFaults(slot), 0, "taking the faults resets the count");
      assert.equal(guard.totalFaults() - before, 2n);
      assert.equal(eventfdRead(notify), 2n, "each fault wrote 1 to the notify eventfd");
      // The file itself did not grow back: the repaired pages are private to this process.
      assert.equal(Deno.statSync(`/proc/self/fd/${m.fd}`).size, PAGE);
    } finally {
      guard.unregister(slot);
      munmap(m.ptr, m.length);
      closeFd(m.fd);
      closeFd(notify);
    }
  },
});

Deno.test({
  name: "sigbus guard: slots are reused after unregister; the library is cached by its source's hash",
  ignore: reason !== undefined,
  fn() {
    const g = sigbusGuard();
    assert.ok(g.guard, g.reason);
    const m = mappedMemfd(1);
    try {
      const a = g.guard.register(m.ptr, m.length, -1);
      g.guard.unregister(a);
      const b = g.guard.register(m.ptr, m.length, -1);
      assert.equal(b, a, "the freed slot is taken again");
      g.guard.unregister(b);
    } finally {
      munmap(m.ptr, m.length);
      closeFd(m.fd);
    }
    assert.equal(buildSigbusGuard(), g.guard.path, "a second build finds the cached library");
    assert.match(g.guard.path, /\/native\/sigbus_guard-[0-9a-f]{16}\.so$/);
  },
});

for (const which of ["unregistered", "unregistered-after-unregister", "no-guard"]) {
  Deno.test({
    name: `sigbus guard: a fault outside the registered mappings still kills the process with SIGBUS (${which})`,
    ignore: reason !== undefined,
    async fn() {
      const out = await new Deno.Command(Deno.execPath(), {
        args: ["run", "-A", new URL(import.meta.url).pathname],
        env: { [GUARD_CHILD_ENV]: which },
        stdout: "piped",
        stderr: "piped",
      }).output();
      const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
      assert.ok(!text.includes("SURVIVED"), text);
      assert.equal(out.signal, "SIGBUS", `exit ${out.code} signal ${out.signal}: ${text}`);
    },
  });
}
