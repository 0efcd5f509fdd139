// Logging of guest errors: one line per error, rate limited, so a hostile or broken guest cannot
// flood the host's log. Devices and transports log through a RateLimitedLog; tests replace the sink.

/** Where guest-error lines go (stderr by default); tests replace `sink` to collect lines. */
export const guestLog = { sink: (line: string): void => console.warn(line) };

/** Logs the first `burst` lines, then one line every `every` occurrences with a count. */
export class RateLimitedLog {
  #count = 0;
  constructor(readonly prefix: string, readonly burst = 10, readonly every = 1000) {}
  get count(): number {
    return this.#count;
  }
  log(msg: string): void {
    this.#count++;
    if (this.#count <= this.burst) guestLog.sink(`${this.prefix}: ${msg}`);
    else if (this.#count % this.every === 0) {
      guestLog.sink(`${this.prefix}: ${msg} (${this.#count} guest errors so far)`);
    }
  }
}
