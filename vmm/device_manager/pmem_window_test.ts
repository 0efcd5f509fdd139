// A machine with virtio-pmem devices, built on a FakeVm: each file becomes one KVM memory slot in the
// device-window area above RAM (read-only for a read-only file), its configuration space, read through the
// MMIO bus, carries that slot's address and size, and the slot's memory is the file itself.

import assert from "node:assert/strict";
import { VIRTIO_ID_PMEM } from "../../devices/virtio/device.ts";
import { PMEM_CONFIG_SIZE, PMEM_CONFIG_START } from "../../devices/virtio/pmem.ts";
import { VIRTIO_MMIO_CONFIG } from "../../devices/virtio/mmio.ts";
import { MiB, sharedMemoryAreaStart } from "../arch/layout.ts";
import { SHM_WINDOW_ALIGN } from "./shared_memory.ts";
import { fakeMachine, fakeMachineConfig } from "../../test/support/fake_machine.ts";
import { StateError } from "../../core/state.ts";

Deno.test("pmem windows: one slot per file above RAM, read-only for ro, its address and size in the config space", async () => {
  const dir = await Deno.makeTempDir({ prefix: "denovm-pmem-window-" });
  try {
    await Deno.writeTextFile(`${dir}/a.img`, "file a");
    await Deno.truncate(`${dir}/a.img`, 3 * MiB);
    await Deno.writeTextFile(`${dir}/b.img`, "file b");
    const config = await fakeMachineConfig({
      pmems: [{ path: `${dir}/a.img`, ro: false, root: false }, { path: `${dir}/b.img`, ro: true, root: false }],
    });
    const { machine, vm } = await fakeMachine(config);
    try {
      const areaStart = sharedMemoryAreaStart(config.memMiB * MiB);
      const pmems = machine.devices.virtio.filter((v) => v.device.deviceType === VIRTIO_ID_PMEM);
      assert.equal(pmems.length, 2);
      const expected = [
        { size: 4 * MiB, readonly: false, text: "file a" },
        { size: 2 * MiB, readonly: true, text: "file b" },
      ];
      pmems.forEach((v, i) => {
        const cfg = new Uint8Array(16);
        machine.devices.mmio.read(v.base + VIRTIO_MMIO_CONFIG, cfg);
        const view = new DataView(cfg.buffer);
        const start = Number(view.getBigUint64(PMEM_CONFIG_START, true));
        const size = Number(view.getBigUint64(PMEM_CONFIG_SIZE, true));
        assert.ok(start >= areaStart && start % SHM_WINDOW_ALIGN === 0, `window ${i} at ${start.toString(16)}`);
        assert.equal(size, expected[i].size);
        const slot = [...vm.slots.values()].find((s) => s.guestAddr === start);
        assert.ok(slot, `a KVM slot at the window ${i}`);
        assert.equal(slot.size, size);
        assert.equal(slot.readonly, expected[i].readonly);
        const mem = new Uint8Array(
          Deno.UnsafePointerView.getArrayBuffer(Deno.UnsafePointer.create(slot.hostAddr)!, slot.size),
        );
        assert.equal(new TextDecoder().decode(mem.subarray(0, 6)), expected[i].text);
      });
    } finally {
      await machine.stop();
    }
    // Closing the machine removed the slots.
    assert.ok([...vm.slots.values()].every((s) => s.guestAddr < sharedMemoryAreaStart(config.memMiB * MiB)));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("pmem windows: the devices' state restores into a machine of the same configuration, not into one whose file grew", async () => {
  const dir = await Deno.makeTempDir({ prefix: "denovm-pmem-window-" });
  try {
    await Deno.writeFile(`${dir}/a.img`, new Uint8Array(MiB));
    const config = await fakeMachineConfig({ pmems: [{ path: `${dir}/a.img`, ro: false, root: false }] });
    const { machine: m1 } = await fakeMachine(config);
    let saved;
    try {
      saved = m1.devices.saveState();
    } finally {
      await m1.stop();
    }
    const { machine: m2 } = await fakeMachine(config);
    try {
      m2.devices.restoreState(saved);
    } finally {
      await m2.stop();
    }
    // The file is now 3 MiB: a 4 MiB window, another configuration space.
    await Deno.truncate(`${dir}/a.img`, 3 * MiB);
    const { machine: m3 } = await fakeMachine(config);
    try {
      assert.throws(() => m3.devices.restoreState(saved), (e) => {
        assert.ok(e instanceof StateError, String(e));
        assert.match((e as Error).message, /pmem.*configuration space differs/);
        return true;
      });
    } finally {
      await m3.stop();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
