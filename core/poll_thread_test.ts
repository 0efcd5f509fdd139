// PollThread (core/poll_thread.ts): poll(2) on a thread of its own, interrupted and closed while it waits.

import assert from "node:assert/strict";
import { closeFd, eventfd, eventfdRead, eventfdWrite, POLLIN, POLLOUT } from "../ffi/libc.ts";
import { PollThread } from "./poll_thread.ts";

function threadCount(): number {
  return [...Deno.readDirSync("/proc/self/task")].length;
}

Deno.test("PollThread: a descriptor that becomes ready while the poll waits is reported, the others are not", async () => {
  const t = new PollThread();
  const [a, b] = [eventfd(), eventfd()];
  try {
    const p = t.poll([{ fd: a, events: POLLIN }, { fd: b, events: POLLIN }]);
    await new Promise((r) => setTimeout(r, 10));
    eventfdWrite(b);
    assert.deepEqual(await p, [0, POLLIN]);
    assert.equal(eventfdRead(b), 1n);
    // An eventfd is always writable: POLLOUT is reported at once.
    assert.deepEqual(await t.poll([{ fd: a, events: POLLOUT }]), [POLLOUT]);
  } finally {
    await t.close();
    closeFd(a);
    closeFd(b);
  }
});

Deno.test("PollThread: interrupt() ends a pending poll; one poll at a time; close() ends a pending poll first", async () => {
  const t = new PollThread();
  const a = eventfd();
  try {
    const p = t.poll([{ fd: a, events: POLLIN }]);
    await assert.rejects(t.poll([{ fd: a, events: POLLIN }]), /one poll at a time/);
    t.interrupt();
    assert.deepEqual(await p, [0]);
    // An interrupt with no poll pending ends the next one.
    t.interrupt();
    assert.deepEqual(await t.poll([{ fd: a, events: POLLIN }]), [0]);
    const pending = t.poll([{ fd: a, events: POLLIN }]);
    await t.close();
    assert.deepEqual(await pending, [0]);
    await assert.rejects(t.poll([{ fd: a, events: POLLIN }]), /closed/);
    await t.close(); // idempotent
  } finally {
    closeFd(a);
  }
});

Deno.test("PollThread: 500 descriptors in one poll take no more threads than one", async () => {
  const t = new PollThread();
  const fds = Array.from({ length: 500 }, () => eventfd());
  try {
    const one = t.poll([{ fd: fds[0], events: POLLIN }]);
    await new Promise((r) => setTimeout(r, 10));
    const withOne = threadCount();
    t.interrupt();
    await one;
    const all = t.poll(fds.map((fd) => ({ fd, events: POLLIN })));
    await new Promise((r) => setTimeout(r, 10));
    assert.ok(threadCount() <= withOne, `threads: ${withOne} waiting on one descriptor, ${threadCount()} on 500`);
    eventfdWrite(fds[499]);
    const rev = await all;
    assert.equal(rev[499], POLLIN);
    assert.equal(rev.filter((r) => r !== 0).length, 1);
  } finally {
    await t.close();
    fds.forEach(closeFd);
  }
});
