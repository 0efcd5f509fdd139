// Socket helpers of ffi/socket.ts that need a real socket.

import assert from "node:assert/strict";
import { closeFd, libc } from "./libc.ts";
import { AF_UNIX, raiseSendBuffer, SOCK_CLOEXEC, SOCK_STREAM } from "./socket.ts";

function streamPair(): [number, number] {
  const sv = new Int32Array(2);
  assert.equal(libc().socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, new Uint8Array(sv.buffer)), 0);
  return [sv[0], sv[1]];
}

/** net.core.wmem_max: the most SO_SNDBUF gives a process without CAP_NET_ADMIN. */
function wmemMax(): number {
  return Number(Deno.readTextFileSync("/proc/sys/net/core/wmem_max").trim());
}

Deno.test("raiseSendBuffer: a send buffer of a whole frame (or wmem_max without the capability), never smaller", () => {
  const [a, b] = streamPair();
  try {
    const want = 8 << 20;
    const before = raiseSendBuffer(a, 1);
    const got = raiseSendBuffer(a, want);
    assert.ok(got >= before, `${got} >= ${before}`);
    // The kernel doubles what was asked (socket(7)); without CAP_NET_ADMIN it caps at wmem_max first.
    const root = Deno.uid() === 0;
    assert.ok(got >= (root ? want : Math.min(want, wmemMax())), `send buffer ${got}`);
    // Asking for less than it has never shrinks it.
    assert.equal(raiseSendBuffer(a, 4096), got);
    // A descriptor that is not a socket: no throw, -1.
    assert.equal(raiseSendBuffer(-1, want), -1);
  } finally {
    closeFd(a);
    closeFd(b);
  }
});
