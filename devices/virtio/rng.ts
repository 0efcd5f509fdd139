// virtio-rng, the entropy device (virtio 1.2 spec, section 5.4; Linux drivers/char/hw_random/virtio-rng.c).
// One request queue; the driver posts device-writable buffers and the device fills them with random
// bytes. No feature bits, no configuration space. Bytes come from crypto.getRandomValues (the host's
// CSPRNG), at most RNG_MAX_BYTES_PER_REQUEST per chain so a guest cannot make one request stall the VMM.

import {
  type ActivateContext,
  featuresField,
  serveQueue,
  stateCounters,
  VIRTIO_COMMON_FEATURES,
  VIRTIO_ID_RNG,
  type VirtioDevice,
} from "./device.ts";
import { type Virtqueue } from "./queue.ts";
import { RateLimitedLog } from "../../core/log.ts";
import { type DeviceState, stateData, StateError, type Stateful, stateRecord, stateString } from "../../core/state.ts";

/** One request queue ("requestq", section 5.4.2). */
export const RNG_QUEUE_SIZE = 256;
/** Most bytes written into one chain; the driver asks again for more (as crosvm caps its requests). */
export const RNG_MAX_BYTES_PER_REQUEST = 64 * 1024;
/** crypto.getRandomValues fills at most 65536 bytes per call (Web Crypto, QuotaExceededError). */
const GET_RANDOM_VALUES_MAX = 65536;

/** The kind and layout version of a virtio-rng device's saved state. */
export const RNG_STATE_TYPE = "virtio-rng";
export const RNG_STATE_VERSION = 1;
const STAT_NAMES = ["requests", "bytes", "emptyRequests", "errors"] as const;

export class RngDevice implements VirtioDevice, Stateful {
  readonly deviceType = VIRTIO_ID_RNG;
  readonly name = "rng";
  readonly queueMaxSizes: readonly number[] = [RNG_QUEUE_SIZE];
  readonly features = VIRTIO_COMMON_FEATURES;
  #queue: Virtqueue | undefined;
  #interrupt: ActivateContext["interrupt"] | undefined;
  readonly #log = new RateLimitedLog("virtio-rng");
  readonly #stats = { requests: 0, bytes: 0, emptyRequests: 0, errors: 0 };
  readonly #buf = new Uint8Array(GET_RANDOM_VALUES_MAX);

  readConfig(_offset: number, data: Uint8Array): void {
    data.fill(0); // no configuration space (section 5.4.4)
  }

  writeConfig(offset: number, data: Uint8Array): void {
    this.#log.log(`driver wrote ${data.length} bytes of config at ${offset}; the device has none`);
  }

  activate(ctx: ActivateContext): void {
    this.#queue = ctx.queues[0];
    this.#interrupt = ctx.interrupt;
    // Buffers posted before activation (a vhost-user kick that came before the ring was enabled).
    this.queueNotify(0);
  }

  reset(): void {
    this.#queue = undefined;
    this.#interrupt = undefined;
  }

  close(): void {
    this.reset();
  }

  stats(): Record<string, number> {
    return { ...this.#stats };
  }

  queueNotify(index: number): void {
    const q = this.#queue;
    if (index !== 0 || !q) return;
    serveQueue(q, 0, this.#interrupt, (chain) => {
      this.#stats.requests++;
      const w = chain.writer();
      let want = Math.min(chain.writableLength, RNG_MAX_BYTES_PER_REQUEST);
      if (chain.readableLength > 0) {
        this.#log.log(`request with ${chain.readableLength} device-readable bytes; they are ignored`);
      }
      if (want === 0) this.#stats.emptyRequests++;
      try {
        while (want > 0) {
          const n = Math.min(want, this.#buf.length);
          const bytes = this.#buf.subarray(0, n);
          crypto.getRandomValues(bytes);
          w.write(bytes);
          want -= n;
        }
      } catch (e) {
        // Buffers were validated when the chain was popped; a failure here is unexpected but not fatal.
        this.#stats.errors++;
        this.#log.log(`cannot fill request: ${(e as Error).message}`);
      }
      this.#stats.bytes += w.bytesWritten;
      return w.bytesWritten;
    });
  }

  // ---- Device state (core/state.ts) ----

  /** False while a request is taken from the queue and not yet filled. */
  quiescent(): boolean {
    return this.#queue?.quiescent() ?? true;
  }

  /** No configuration space and nothing held between requests: the feature offer and the counters. */
  saveState(): DeviceState {
    return {
      type: RNG_STATE_TYPE,
      version: RNG_STATE_VERSION,
      data: { features: featuresField(this.features), stats: { ...this.#stats } },
    };
  }

  restoreState(state: DeviceState): void {
    const d = stateRecord(stateData(state, RNG_STATE_TYPE, RNG_STATE_VERSION), "virtio-rng state");
    if (this.#queue) throw new StateError("virtio-rng: restore into a device a driver has activated");
    const features = stateString(d.features, "virtio-rng features");
    if (features !== featuresField(this.features)) {
      throw new StateError(
        `virtio-rng: saved features ${features}, this device offers ${featuresField(this.features)}`,
      );
    }
    Object.assign(this.#stats, stateCounters(d.stats, STAT_NAMES, "virtio-rng"));
  }
}
