// What the library's vm.gpu.stats(), `denovm gpu stats` (the control handler) and vm.screenshot() reach: the
// GPU's counters with the display path's copies per scanout, and a screenshot as the consumer that reads
// the flushed frame back.

import assert from "node:assert/strict";
import { GpuDevice } from "../../devices/virtio/gpu/device.ts";
import { Backend2D } from "../../devices/virtio/gpu/backend_2d.ts";
import type { GpuStats } from "../../devices/virtio/gpu/accounting.ts";
import { VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM } from "../../devices/virtio/gpu/formats.ts";
import type { Machine } from "../machine.ts";
import { gpuStats, gpuSummary, screenshot } from "./gpu_front.ts";

Deno.test("gpu front: stats carry the display copies per scanout; a screenshot is what reads the frame back", async () => {
  const W = 32, H = 16;
  const backend = new Backend2D();
  const dev = new GpuDevice({ backend, displays: [{ width: W, height: H }] });
  try {
    // The one thing gpu_front.ts looks at: the machine's virtio devices.
    const m = { devices: { virtio: [{ device: dev }] } } as unknown as Machine;
    backend.createResource2D({ resourceId: 3, format: VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM, width: W, height: H });
    backend.restoreHostContents(3, new Uint8Array(W * H * 4).fill(0x80));
    const full = { x: 0, y: 0, width: W, height: H };
    dev.display.setScanout(0, { resourceId: 3, rect: full });
    for (let i = 0; i < 4; i++) dev.display.flush(0, full);
    let s = gpuStats(m) as GpuStats;
    assert.equal(s.scanouts["0"].flushes, 4);
    assert.equal(s.scanouts["0"].readbackBytes, 0);
    assert.equal(s.totals.scanoutReadbackBytes, 0);
    const png = await screenshot(m);
    s = gpuStats(m) as GpuStats;
    assert.equal(s.scanouts["0"].readbackBy.screenshot, W * H * 4);
    assert.equal(s.scanouts["0"].sentTo.screenshot, png.length);
    assert.equal(s.totals.scanoutReadbackBytes, W * H * 4);
    assert.equal(s.totals.displaySentBytes, png.length);
    assert.deepEqual(JSON.parse(JSON.stringify(s)), s, "JSON-able, as the control socket sends it");
    assert.match(gpuSummary(m) ?? "", /scanout 0: 4 flushes/);
  } finally {
    dev.close();
  }
});
