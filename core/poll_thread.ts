// poll(2) on a thread of its own (a Worker), for a server that waits on many descriptors at once: its
// listening socket and every client. One PollThread is one thread whatever the number of descriptors, and
// it takes none from Deno's bounded pool of blocking threads (see pollAsync in ffi/libc.ts), so neither a
// crowd of clients nor anything else on that pool can hold up the other's waits.
//
// One poll at a time: poll(entries) sends the pollfd array to the thread, which waits in poll(2) and sends
// it back with the revents. interrupt() makes the pending poll (or the next one) return at once, so that
// the owner can wait again on a changed set: every poll also waits on the thread's own eventfd.

import {
  closeFd,
  eventfd,
  eventfdRead,
  eventfdWrite,
  POLLFD_EVENTS,
  POLLFD_FD,
  POLLFD_REVENTS,
  POLLFD_SIZE,
  POLLIN,
  SysError,
} from "../ffi/libc.ts";

/** One descriptor to wait on and the events wanted (POLLIN, POLLOUT). */
export interface PollEntry {
  fd: number;
  events: number;
}

/** What the thread is sent: a pollfd array (struct pollfd[], asm-generic/poll.h) and poll(2)'s timeout. */
export interface PollRequest {
  pollfds: Uint8Array<ArrayBuffer>;
  timeoutMs: number;
}

/** What the thread sends back: the array with revents set, poll(2)'s result and, when it failed, errno. */
export interface PollReply {
  pollfds: Uint8Array<ArrayBuffer>;
  result: number;
  errno: number;
}

/** The owner's wait for the thread's reply. */
interface Pending {
  resolve: (r: PollReply) => void;
  reject: (e: Error) => void;
}

/** A thread that waits in poll(2) for one owner. close() ends it. */
export class PollThread {
  readonly #worker: Worker;
  /** In every poll: written by interrupt() and close(). */
  readonly #wakeFd = eventfd();
  #pending: Pending | undefined;
  #inFlight: Promise<unknown> | undefined;
  #failed: Error | undefined;
  #closed = false;

  constructor(name = "denovm-poll") {
    this.#worker = new Worker(new URL("./poll_thread_worker.ts", import.meta.url), { type: "module", name });
    this.#worker.onmessage = (e: MessageEvent<PollReply>) => this.#settle((p) => p.resolve(e.data));
    this.#worker.onerror = (e: ErrorEvent) => {
      // The thread could not start (or threw): every poll from now on fails with this error.
      e.preventDefault();
      this.#failed = new Error(`poll thread: ${e.message}`);
      this.#settle((p) => p.reject(this.#failed!));
    };
  }

  #settle(f: (p: Pending) => void): void {
    const p = this.#pending;
    this.#pending = undefined;
    if (p) f(p);
  }

  /** Whether the thread could not start or died: every poll fails from now on. */
  get failed(): boolean {
    return this.#failed !== undefined;
  }

  /**
   * Wait until one of `entries` has an event (or `timeoutMs` passes, -1 = no limit) or interrupt() is called;
   * returns the revents of each entry (POLLHUP, POLLERR and POLLNVAL come unasked). Throws SysError("poll")
   * when poll(2) fails, an Error when the thread is closed or could not start, or when a poll is pending.
   */
  async poll(entries: readonly PollEntry[], timeoutMs = -1): Promise<number[]> {
    if (this.#failed) throw this.#failed;
    if (this.#closed) throw new Error("poll thread closed");
    if (this.#pending) throw new Error("poll thread: one poll at a time");
    const wake = entries.length;
    const pollfds = new Uint8Array((entries.length + 1) * POLLFD_SIZE);
    const dv = new DataView(pollfds.buffer);
    const put = (i: number, fd: number, events: number) => {
      dv.setInt32(i * POLLFD_SIZE + POLLFD_FD, fd, true);
      dv.setInt16(i * POLLFD_SIZE + POLLFD_EVENTS, events, true);
    };
    entries.forEach((e, i) => put(i, e.fd, e.events));
    put(wake, this.#wakeFd, POLLIN);
    const reply = new Promise<PollReply>((resolve, reject) => this.#pending = { resolve, reject });
    this.#inFlight = reply.catch(() => {});
    const request: PollRequest = { pollfds, timeoutMs };
    this.#worker.postMessage(request, [pollfds.buffer]);
    const r = await reply;
    if (r.result < 0) throw new SysError("poll", r.errno);
    const out = new DataView(r.pollfds.buffer);
    const revents = (i: number) => out.getInt16(i * POLLFD_SIZE + POLLFD_REVENTS, true);
    if (revents(wake) & POLLIN) eventfdRead(this.#wakeFd);
    return entries.map((_, i) => revents(i));
  }

  /** Make the pending poll return now (with whatever else is ready), or the next one if none is pending. */
  interrupt(): void {
    if (!this.#closed) eventfdWrite(this.#wakeFd);
  }

  /** End the thread: a pending poll returns first (its caller gets its result), then the eventfd is closed. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    eventfdWrite(this.#wakeFd);
    // The thread must be out of poll(2) before its eventfd goes: poll would not notice the close.
    if (this.#pending && !this.#failed) await this.#inFlight;
    this.#worker.terminate();
    closeFd(this.#wakeFd);
  }
}
