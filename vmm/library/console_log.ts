// The guest console as the library sees it: everything the console port printed,
// and waiting for text to appear with a timeout that explains itself.

/** Lines of context shown when a wait fails. */
const CONTEXT_LINES = 15;

export class ConsoleTimeoutError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ConsoleTimeoutError";
  }
}

interface Waiter {
  pattern: RegExp;
  from: number;
  resolve: (m: RegExpExecArray) => void;
}

export class ConsoleLog {
  #text = "";
  readonly #decoder = new TextDecoder();
  readonly #waiters = new Set<Waiter>();
  #closedReason: string | undefined;
  readonly #closeListeners = new Set<(reason: string) => void>();
  /** Where the next waitFor starts looking, unless told otherwise (moves past each match). */
  #cursor = 0;

  constructor(readonly send: (text: string) => void = () => {}) {}

  /** Everything the guest printed on its console so far. */
  get text(): string {
    return this.#text;
  }

  /** The last `n` lines, for error messages. */
  tail(n = CONTEXT_LINES): string {
    return this.#text.split("\n").slice(-n).join("\n");
  }

  /** Feed bytes the console port transmitted. */
  push(bytes: Uint8Array): void {
    this.#text += this.#decoder.decode(bytes, { stream: true });
    for (const w of [...this.#waiters]) this.#check(w);
  }

  #check(w: Waiter): void {
    const re = new RegExp(w.pattern.source, w.pattern.flags.replace("g", ""));
    const m = re.exec(this.#text.slice(w.from));
    if (!m) return;
    m.index += w.from;
    this.#cursor = m.index + m[0].length;
    this.#waiters.delete(w);
    w.resolve(m);
  }

  /** The VM ended: pending waits fail with `reason`. */
  close(reason: string): void {
    this.#closedReason = reason;
    for (const l of this.#closeListeners) l(reason);
  }

  /**
   * Wait until `pattern` appears in console output after the previous match (or after
   * `from`, a character offset; 0 searches everything). Rejects with a message naming
   * the pattern and showing the last console lines on timeout, abort, or VM exit.
   */
  waitFor(
    pattern: RegExp | string,
    opts: { timeout?: number; signal?: AbortSignal; from?: number } = {},
  ): Promise<RegExpExecArray> {
    const re = typeof pattern === "string" ? new RegExp(pattern.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")) : pattern;
    const timeout = opts.timeout ?? 30_000;
    return new Promise((resolve, reject) => {
      const timer: { id?: ReturnType<typeof setTimeout> } = {};
      const fail = (why: string) => {
        cleanup();
        reject(
          new ConsoleTimeoutError(
            `waiting for ${re} on the console: ${why}\n--- last console lines ---\n${this.tail()}`,
          ),
        );
      };
      const onClose = (reason: string) => {
        // Output may still match: check once more before failing.
        this.#check(w);
        if (this.#waiters.has(w)) fail(`the VM ended (${reason})`);
      };
      const onAbort = () => fail("aborted");
      const cleanup = () => {
        clearTimeout(timer.id);
        this.#waiters.delete(w);
        this.#closeListeners.delete(onClose);
        opts.signal?.removeEventListener("abort", onAbort);
      };
      const w: Waiter = {
        pattern: re,
        from: opts.from ?? this.#cursor,
        resolve: (m) => {
          cleanup();
          resolve(m);
        },
      };
      this.#waiters.add(w);
      this.#check(w);
      if (!this.#waiters.has(w)) return;
      if (this.#closedReason !== undefined) return onClose(this.#closedReason);
      if (opts.signal?.aborted) return onAbort();
      this.#closeListeners.add(onClose);
      opts.signal?.addEventListener("abort", onAbort);
      timer.id = setTimeout(() => fail(`timed out after ${timeout} ms`), timeout);
    });
  }
}
