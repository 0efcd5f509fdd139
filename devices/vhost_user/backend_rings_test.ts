// The vhost-user back end with rings that become ready one at a time: a front end may kick ring 0 before it
// enables ring 1 (vhost-user.rst "Starting and stopping rings": each ring starts on its own), and ring 1
// must be served once it is enabled. Found by the vhost-user fuzzer (bench/fuzz/vhost_user.ts).

import assert from "node:assert/strict";
import { closeFd, eventfdRead, eventfdWrite, pollAsync, POLLIN } from "../../ffi/libc.ts";
import type { ActivateContext, VirtioDevice } from "../virtio/device.ts";
import { VIRTIO_F_VERSION_1 } from "../virtio/device.ts";
import { VhostUserBackend } from "./backend.ts";
import { VhostUserRequest as R, vringStatePayload } from "./protocol.ts";
import {
  BUF_READABLE_LEN,
  HANG_GUARD_MS,
  memTable,
  publishChain,
  QSIZE,
  RING_STRIDE,
  type RingLayout,
  SharedMemory,
  startRings,
  usedState,
  VhostUserFrontEnd,
  writableBuffer,
} from "../../test/support/vhost_user_front_end.ts";

/** Two rings, then their buffers (test/support/vhost_user_front_end.ts lays them out). */
const QUEUES = 2;
const LAYOUT: RingLayout = { ringBase: 0, bufBase: QUEUES * RING_STRIDE };
const MEM_SIZE = 0x10000;

/** Two queues; each answers a chain with its readable bytes upper-cased into the writable part. */
class UpperDevice implements VirtioDevice {
  readonly deviceType = 4;
  readonly name = "upper";
  readonly queueMaxSizes = [QSIZE, QSIZE];
  readonly features = VIRTIO_F_VERSION_1;
  ctx?: ActivateContext;
  readConfig(_offset: number, data: Uint8Array): void {
    data.fill(0);
  }
  writeConfig(): void {}
  activate(ctx: ActivateContext): void {
    this.ctx = ctx;
  }
  reset(): void {
    this.ctx = undefined;
  }
  queueNotify(index: number): void {
    const q = this.ctx?.queues[index];
    if (!q) return;
    for (let c = q.pop(); c; c = q.pop()) {
      const text = new TextDecoder().decode(c.reader().read(c.readableLength));
      const w = c.writer();
      w.write(new TextEncoder().encode(text.toUpperCase()));
      q.addUsed(c.head, w.bytesWritten);
    }
    this.ctx!.interrupt.signalUsedQueue(index);
  }
}

Deno.test("vhost-user back end: a ring enabled after the device started on another ring's kick is served", async () => {
  const dir = await Deno.makeTempDir({ prefix: "denovm-vu-rings-" });
  const path = `${dir}/s`;
  const device = new UpperDevice();
  const backend = new VhostUserBackend(device, path, { log: () => {} });
  const served = backend.serve();
  await backend.listening;
  const shared = new SharedMemory(MEM_SIZE);
  const fe = VhostUserFrontEnd.connect(path);
  let rings: { kicks: number[]; calls: number[] } = { kicks: [], calls: [] };
  try {
    await fe.negotiate({ replyAck: true });
    await fe.request(R.SET_MEM_TABLE, memTable(MEM_SIZE), [shared.fd]);
    rings = await startRings(fe, LAYOUT, QUEUES, { enable: false });
    // Ring 0 only is enabled and kicked: the device starts with that ring.
    await fe.request(R.SET_VRING_ENABLE, vringStatePayload({ index: 0, num: 1 }));
    eventfdWrite(rings.kicks[0]);
    // A reply after the kick: the back end handled the kick first (it looks at kicks before messages).
    await fe.request(R.SET_OWNER);
    assert.ok(device.ctx, "the device started on ring 0's kick");

    // Now ring 1: enabled, one chain "hello" (in a readable buffer) + a writable buffer, kicked.
    await fe.request(R.SET_VRING_ENABLE, vringStatePayload({ index: 1, num: 1 }));
    const mem = shared.mem;
    const hello = new TextEncoder().encode("hello");
    publishChain(mem, LAYOUT, 1, 1, hello);
    eventfdWrite(rings.kicks[1]);
    // Wait for the used buffer (interrupts may also come for nothing: this device signals after every kick).
    const end = Date.now() + HANG_GUARD_MS;
    while (usedState(mem, LAYOUT, 1).idx === 0 && Date.now() < end) {
      await pollAsync([rings.calls[1]], POLLIN, 100);
      eventfdRead(rings.calls[1]);
    }
    const used = usedState(mem, LAYOUT, 1);
    assert.equal(used.idx, 1, "ring 1's used index");
    // The readable buffer is publishChain's, "hello" then zeros: all of it comes back upper-cased.
    assert.equal(used.len, BUF_READABLE_LEN, "used length: the whole readable buffer, upper-cased");
    const out = mem.read(writableBuffer(LAYOUT, 1).addr, used.len);
    assert.equal(new TextDecoder().decode(out.subarray(0, hello.length)), "HELLO");
    assert.ok(out.subarray(hello.length).every((b) => b === 0), "the rest of the readable buffer, as it was");
    assert.equal(usedState(mem, LAYOUT, 0).idx, 0, "nothing was published on ring 0");
  } finally {
    fe.close();
    backend.close();
    await served;
    [...rings.kicks, ...rings.calls].forEach(closeFd);
    shared.close();
    await Deno.remove(dir, { recursive: true });
  }
});
