// The vCPU ↔ main-thread channel, driven by a Worker that performs accesses
// exactly as the KVM loop does: every write arrives intact, every read is answered.

import assert from "node:assert/strict";
import { DOORBELL, IO_BLOCK_BYTES, KIND_MMIO, KIND_PIO, serveRequest } from "./vcpu_channel.ts";

Deno.test("vcpu channel: 5000 writes and reads cross between a Worker and the main thread intact", async () => {
  const io = new SharedArrayBuffer(IO_BLOCK_BYTES);
  const seenWrites: { addr: number; value: number }[] = [];
  let last = 0;
  let served = 0;
  const handle = (r: Parameters<Parameters<typeof serveRequest>[1]>[0]) => {
    if (r.kind === KIND_MMIO && r.isWrite) {
      last = new DataView(r.data.buffer, r.data.byteOffset, r.data.length).getUint32(0, true);
      seenWrites.push({ addr: r.addr, value: last });
    } else if (r.kind === KIND_PIO && !r.isWrite) {
      assert.equal(r.addr, 0x3f8);
      new DataView(r.data.buffer, r.data.byteOffset, r.data.length).setUint32(0, last * 3, true);
    } else {
      throw new Error(`unexpected access ${JSON.stringify(r)}`);
    }
  };
  const count = 5000;
  const worker = new Worker(new URL("../../test/support/channel_worker.ts", import.meta.url), { type: "module" });
  const results = await new Promise<number[]>((resolve) => {
    worker.onmessage = (e) => {
      if (e.data === DOORBELL) {
        if (serveRequest(io, handle)) served++;
      } else resolve(e.data);
    };
    worker.postMessage({ io, count });
  });
  assert.equal(served, 2 * count);
  assert.equal(seenWrites.length, count);
  seenWrites.forEach((w, i) => {
    assert.equal(w.value, i);
    assert.equal(w.addr, 0x1_0000_0000 + 0x1000 + (i % 16) * 4);
  });
  assert.deepEqual(results, Array.from({ length: count }, (_, i) => i * 3));
});
