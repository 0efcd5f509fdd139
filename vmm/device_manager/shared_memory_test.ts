// Shared-memory windows: where the device manager places them, and the mapper that turns a device's
// mappings into memory slots of the VM.

import assert from "node:assert/strict";
import { ConfigError } from "../../core/exit.ts";
import { GiB, GUEST_PHYS_LIMIT, MiB, sharedMemoryAreaStart } from "../arch/layout.ts";
import { FakeVm } from "../../test/support/fake_vm.ts";
import { SharedMemoryArea, sharedMemoryMapper, SHM_WINDOW_ALIGN } from "./shared_memory.ts";

Deno.test("shared-memory windows: aligned, one after another, across devices; refused past the limit", () => {
  const start = sharedMemoryAreaStart(256 * MiB);
  assert.equal(start, 64 * GiB, "the first 64 GiB boundary above RAM");
  const area = new SharedMemoryArea(start + 4096, GUEST_PHYS_LIMIT);
  const gpu = area.place("gpu", [{ id: 1, size: 3 * GiB / 2 }, { id: 2, size: 4096 }]);
  assert.deepEqual(gpu.get(1), { base: start + SHM_WINDOW_ALIGN, size: 3 * GiB / 2 }, "rounded up to the alignment");
  assert.deepEqual(gpu.get(2), { base: start + 3 * SHM_WINDOW_ALIGN, size: 4096 }, "after the first, aligned");
  // The next device's windows follow the last window.
  const other = area.place("other", [{ id: 0, size: GiB }]);
  assert.deepEqual(other.get(0), { base: start + 4 * SHM_WINDOW_ALIGN, size: GiB });
  assert.equal(area.place("none", []).size, 0);
  // A window that would end past the limit is a configuration error, and takes no room.
  const small = new SharedMemoryArea(0, 3 * GiB);
  small.place("a", [{ id: 0, size: GiB }]);
  assert.throws(
    () => small.place("b", [{ id: 0, size: 2 * GiB + 1 }]),
    (e) => e instanceof ConfigError && /b's window/.test(e.message),
  );
  assert.deepEqual(
    small.place("c", [{ id: 0, size: 2 * GiB }]).get(0),
    { base: GiB, size: 2 * GiB },
    "exactly up to the limit",
  );
});

Deno.test("shared-memory mapper: each mapping is a slot at window base + offset; outside, twice or unknown is refused", () => {
  const vm = new FakeVm();
  const windows = new Map([[1, { base: 64 * GiB, size: 16 * MiB }]]);
  const mapper = sharedMemoryMapper("gpu", windows, vm);
  mapper.addMapping(1, 2 * MiB, 0x7000_0000n, 4096, true);
  mapper.addMapping(1, 0, 0x7100_0000n, MiB, false);
  assert.deepEqual([...vm.slots.values()], [
    { guestAddr: 64 * GiB + 2 * MiB, size: 4096, hostAddr: 0x7000_0000n, readonly: false },
    { guestAddr: 64 * GiB, size: MiB, hostAddr: 0x7100_0000n, readonly: true },
  ]);
  assert.throws(() => mapper.addMapping(1, 2 * MiB, 0x7200_0000n, 4096, true), /already mapped/);
  assert.throws(() => mapper.addMapping(1, 16 * MiB - 4096, 0x7200_0000n, 8192, true), /outside/);
  assert.throws(() => mapper.addMapping(1, -4096, 0x7200_0000n, 4096, true), /outside/);
  assert.throws(() => mapper.addMapping(1, 0, 0x7200_0000n, 0, true), /outside/);
  assert.throws(() => mapper.addMapping(2, 0, 0x7200_0000n, 4096, true), /outside shared-memory region 2/);
  assert.equal(vm.slots.size, 2, "nothing installed by the refused mappings");
  mapper.removeMapping(1, 2 * MiB);
  assert.deepEqual([...vm.slots.values()].map((s) => s.guestAddr), [64 * GiB]);
  assert.throws(() => mapper.removeMapping(1, 2 * MiB), /not mapped/);
  // The offset is free again.
  mapper.addMapping(1, 2 * MiB, 0x7300_0000n, 4096, true);
  assert.equal(vm.slots.size, 2);
});
