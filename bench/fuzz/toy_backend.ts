// A vhost-user back end with a toy device, broken on purpose, for vhost_user_test.ts to show that the
// fuzzer sees what it claims to see. `deno run -A bench/fuzz/toy_backend.ts --socket-path S --mode MODE`:
//   ok     fills each chain's writable buffers and completes it (a correct device);
//   oob    also writes one byte just past the last writable buffer of every 50th chain;
//   crash  makes the process die (an uncaught error) at its 500th chain;
//   hang   spins forever at its 500th chain.
// It serves with VhostUserBackend (devices/vhost_user/backend.ts), as `denovm device` does.

import { parseArgs } from "node:util";
import { VhostUserBackend } from "../../devices/vhost_user/backend.ts";
import {
  type ActivateContext,
  VIRTIO_F_EVENT_IDX,
  VIRTIO_F_INDIRECT_DESC,
  VIRTIO_F_VERSION_1,
  type VirtioDevice,
} from "../../devices/virtio/device.ts";

/** The toy's one queue. */
export const TOY_QUEUE_SIZE = 64;
/** Chains served before the crash and hang modes break. */
const BREAK_AT = 500;
/** Every this many chains the oob mode writes past a buffer. */
const OOB_EVERY = 50;
/** virtio 1.2 section 5: device ID 4 (entropy source); the toy behaves like one. */
const TOY_DEVICE_ID = 4;

class ToyDevice implements VirtioDevice {
  readonly deviceType = TOY_DEVICE_ID;
  readonly name = "toy";
  readonly queueMaxSizes = [TOY_QUEUE_SIZE];
  readonly features = VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC;
  #ctx?: ActivateContext;
  #served = 0;

  constructor(readonly mode: string) {}

  readConfig(_offset: number, data: Uint8Array): void {
    data.fill(0);
  }
  writeConfig(): void {}
  activate(ctx: ActivateContext): void {
    this.#ctx = ctx;
  }
  reset(): void {
    this.#ctx = undefined;
  }
  queueNotify(index: number): void {
    const ctx = this.#ctx;
    const q = ctx?.queues[index];
    if (!ctx || !q) return;
    for (let chain = q.pop(); chain; chain = q.pop()) {
      this.#served++;
      if (this.#served === BREAK_AT && this.mode === "crash") {
        setTimeout(() => {
          throw new Error("toy device: crashing on purpose");
        });
      }
      if (this.#served >= BREAK_AT && this.mode === "hang") { for (;;) { /* spinning on purpose */ } }
      const w = chain.writer();
      w.write(new Uint8Array(chain.writableLength).fill(0x5a));
      const last = chain.writable.at(-1);
      if (this.mode === "oob" && last && this.#served % OOB_EVERY === 0 && ctx.mem.isValid(last.addr + last.len, 1)) {
        ctx.mem.write(last.addr + last.len, Uint8Array.of(0x42));
      }
      q.addUsed(chain.head, w.bytesWritten);
    }
    if (q.needsInterrupt()) ctx.interrupt.signalUsedQueue(index);
  }
}

if (import.meta.main) {
  const { values } = parseArgs({ options: { "socket-path": { type: "string" }, mode: { type: "string" } } });
  const backend = new VhostUserBackend(new ToyDevice(values.mode ?? "ok"), values["socket-path"]!, {
    log: () => {},
  });
  const served = backend.serve();
  await backend.listening;
  console.error(`toy: listening on ${values["socket-path"]}`);
  Deno.addSignalListener("SIGTERM", () => backend.close());
  await served;
}
