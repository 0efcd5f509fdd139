// The virtio-mmio slots' counters: every device's counters appear, also when two devices share a name.

import assert from "node:assert/strict";
import { Bus } from "../../core/bus.ts";
import { OwnedGuestMemory } from "../../core/memory.ts";
import { VIRTIO_ID_BLOCK, type VirtioDevice } from "../../devices/virtio/device.ts";
import { FakeVm } from "../../test/support/fake_vm.ts";
import { GiB, MiB } from "../arch/layout.ts";
import { VirtioMmioDevices, virtioMmioResources } from "./mmio.ts";
import { SharedMemoryArea } from "./shared_memory.ts";

function counting(name: string, writes: number): VirtioDevice {
  return {
    deviceType: VIRTIO_ID_BLOCK,
    name,
    queueMaxSizes: [8],
    features: 0n,
    readConfig: (_o, d) => d.fill(0),
    writeConfig: () => {},
    activate: () => {},
    queueNotify: () => {},
    reset: () => {},
    stats: () => ({ writes }),
  };
}

Deno.test("virtio-mmio stats: devices of one name are told apart (block, block1, ...), none hides another", () => {
  using mem = OwnedGuestMemory.allocate([{ start: 0, size: MiB }]);
  const devices = new VirtioMmioDevices(
    new Bus("mmio"),
    new FakeVm(),
    mem,
    new SharedMemoryArea(4 * GiB, 8 * GiB),
    () => {},
  );
  const list = [counting("block", 1), counting("rng", 5), counting("block", 2), counting("block", 3)];
  devices.add(list, virtioMmioResources(list.length));
  try {
    assert.deepEqual(devices.stats(), { "block.writes": 1, "rng.writes": 5, "block1.writes": 2, "block2.writes": 3 });
  } finally {
    devices.close();
  }
});
