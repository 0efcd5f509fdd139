// What the fuzzing campaign's parts share: the result and option shapes (the in-process device models in
// devices.ts, the vhost-user back ends in vhost_user.ts), a small seeded PRNG and the process's RSS.

/** What one device's fuzzing run counted. */
export interface FuzzResult {
  /** Requests (notify batches, or port/register accesses for legacy devices) completed. */
  requests: number;
  /** Exceptions that escaped the device model or its transport. */
  crashes: number;
  /** Requests that neither completed nor were refused within the bound. */
  hangs: number;
  /** Writes outside guest memory (canary pages) or outside the buffers the guest granted. */
  oob: number;
  /** RSS at the end less RSS after the warm-up, in MiB. */
  rss_growth_mb: number;
  /**
   * RSS at the end less RSS half-way, in MiB: a leak keeps growing here, while caches, JIT code and
   * allocator arenas filled during the first half do not.
   */
  rss_second_half_mb?: number;
}

export interface FuzzOptions {
  /** Requests to drive into each device. */
  requestsPerDevice: number;
  /** Seed of the PRNG: the same seed replays the same requests. */
  seed: number;
  /** Device names to fuzz (default: all). */
  devices?: string[];
  /** Progress and failure lines (each failure names the seed and the request's index). */
  log?: (line: string) => void;
}

/** A result with nothing counted yet. */
export function emptyResult(): FuzzResult {
  return { requests: 0, crashes: 0, hangs: 0, oob: 0, rss_growth_mb: 0 };
}

/**
 * The process's resident set size in MiB, after a full garbage collection where the process allows one
 * (`--v8-flags=--expose-gc`): then what grows is what is still referenced, not garbage not yet collected.
 */
export function rssMb(): number {
  (globalThis as { gc?: () => void }).gc?.();
  return Deno.memoryUsage().rss / (1024 * 1024);
}

/** A 32-bit hash of a string (FNV-1a), to derive a per-device seed from the run's seed. */
export function hashName(s: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) {
    h ^= s.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  return h >>> 0;
}

/** xoshiro128** (Blackman and Vigna): fast, seedable, good enough for choosing test inputs. */
export class Prng {
  #a: number;
  #b: number;
  #c: number;
  #d: number;

  constructor(seed: number) {
    // splitmix32 expands the seed into the four words of state.
    let s = seed >>> 0;
    const next = () => {
      s = (s + 0x9e3779b9) >>> 0;
      let z = s;
      z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
      z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
      return (z ^ (z >>> 16)) >>> 0;
    };
    this.#a = next();
    this.#b = next();
    this.#c = next();
    this.#d = next() || 1;
  }

  /** A uniform 32-bit unsigned integer. */
  u32(): number {
    const r = Math.imul(rotl(Math.imul(this.#b, 5), 7), 9) >>> 0;
    const t = this.#b << 9;
    this.#c ^= this.#a;
    this.#d ^= this.#b;
    this.#b ^= this.#c;
    this.#a ^= this.#d;
    this.#c ^= t;
    this.#d = rotl(this.#d, 11);
    return r;
  }

  /** A uniform integer in [0, n) for n up to 2^32. */
  below(n: number): number {
    return Math.floor((this.u32() / 0x1_0000_0000) * n);
  }

  /** True with probability 1/n. */
  oneIn(n: number): boolean {
    return this.below(n) === 0;
  }

  /** An element of `a`. */
  pick<T>(a: readonly T[]): T {
    return a[this.below(a.length)];
  }

  /** A length in [0, max], biased to small values (log-uniform) with the edges often. */
  length(max: number): number {
    const r = this.below(16);
    if (r === 0) return 0;
    if (r === 1) return max;
    const bits = this.below(Math.ceil(Math.log2(max + 1)) + 1);
    return Math.min(max, this.below(2 ** bits + 1));
  }

  /** A 32-bit value biased to the interesting ones: 0, 1, all-ones, powers of two, near the edges. */
  interesting32(): number {
    switch (this.below(8)) {
      case 0:
        return 0;
      case 1:
        return 0xffff_ffff;
      case 2:
        return (2 ** this.below(32)) >>> 0;
      case 3:
        return ((2 ** this.below(32)) - 1) >>> 0;
      case 4:
        return this.below(16);
      default:
        return this.u32();
    }
  }
}

function rotl(x: number, k: number): number {
  return ((x << k) | (x >>> (32 - k))) >>> 0;
}
