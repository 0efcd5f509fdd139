// virtio-rng, the entropy device (virtio 1.2 spec, section 5.4; Linux drivers/char/hw_random/virtio-rng.c).
// One request queue; the driver posts device-writable buffers and the device fills them with random
// bytes. No feature bits, no configuration space. Bytes come from crypto.getRandomValues (the host's
// CSPRNG), at most RNG_MAX_BYTES_PER_REQUEST per chain so a guest cannot make one request stall the VMM.

import {
  type ActivateContext,
  serveQueue,
  VIRTIO_COMMON_FEATURES,
  VIRTIO_ID_RNG,
  type VirtioDevice,
} from "./device.ts";
import { type Virtqueue } from "./queue.ts";
import { RateLimitedLog } from "../../core/log.ts";

/** One request queue ("requestq", section 5.4.2). */
export const RNG_QUEUE_SIZE = 256;
/** Most bytes written into one chain; the driver asks again for more (as crosvm caps its requests). */
export const RNG_MAX_BYTES_PER_REQUEST = 64 * 1024;
/** crypto.getRandomValues fills at most 65536 bytes per call (Web Crypto, QuotaExceededError). */
const GET_RANDOM_VALUES_MAX = 65536;

export class RngDevice implements VirtioDevice {
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
}
