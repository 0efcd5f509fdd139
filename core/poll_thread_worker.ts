/// <reference lib="deno.worker" />
// The thread of a PollThread (poll_thread.ts): each message is one pollfd array; the thread waits in poll(2)
// on it and sends it back with the revents filled in, the result and the errno.

import { EINTR, errno, libc, POLLFD_SIZE } from "../ffi/libc.ts";
import type { PollReply, PollRequest } from "./poll_thread.ts";

self.onmessage = (e: MessageEvent<PollRequest>) => {
  const { pollfds, timeoutMs } = e.data;
  let result: number;
  let err = 0;
  for (;;) {
    result = libc().poll(pollfds, BigInt(pollfds.length / POLLFD_SIZE), timeoutMs);
    // A signal (a vCPU kick is never sent to this thread, but others may be) restarts the wait.
    if (result >= 0 || (err = errno()) !== EINTR) break;
  }
  const reply: PollReply = { pollfds, result, errno: result < 0 ? err : 0 };
  self.postMessage(reply, [pollfds.buffer]);
};
