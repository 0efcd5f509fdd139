// The device manager's state: a machine built on a FakeVm serves a virtio-blk request, has a second one
// published but not kicked, and is saved; a second machine built from the same configuration takes a copy of
// its guest memory and the saved state, and the kick it then receives completes the request with the next used
// index. The UART's registers come along; a device list that differs is refused naming the device.

import assert from "node:assert/strict";
import { decodeState, type DeviceState, encodeState, StateError, type StateValue } from "../../core/state.ts";
import { VIRTIO_ID_BLOCK } from "../../devices/virtio/device.ts";
import { SECTOR_SIZE, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT } from "../../devices/virtio/block/device.ts";
import { VIRTQ_USED_ELEM_ID, VIRTQ_USED_IDX, VIRTQ_USED_RING } from "../../devices/virtio/queue.ts";
import { MiB, ramRanges, SERIAL_PORTS } from "../arch/layout.ts";
import type { Machine } from "../machine.ts";
import {
  blkHeader,
  busDriver,
  busTransport,
  diskImage,
  fakeMachine,
  fakeMachineConfig,
  slotOf,
} from "../../test/support/fake_machine.ts";
import { VirtioTestDriver } from "../../test/support/virtio_driver.ts";
import type { FakeVm } from "../../test/support/fake_vm.ts";
import type { DevicesState } from "./manager.ts";

/** 16550 register offsets (PC16550D datasheet, table 2): interrupt enable, line control, scratch. */
const UART_IER = 1;
const UART_LCR = 3;
const UART_SCR = 7;

function pioWrite(machine: Machine, port: number, value: number): void {
  machine.devices.pio.write(port, Uint8Array.of(value));
}
function pioRead(machine: Machine, port: number): number {
  const b = new Uint8Array(1);
  machine.devices.pio.read(port, b);
  return b[0];
}

/** Start `machine` and set up its virtio-blk device as a guest driver would; returns the driver. */
async function startBlockDriver(machine: Machine, vm: FakeVm, slot: number): Promise<VirtioTestDriver> {
  await machine.start();
  const driver = busDriver(machine, vm, slot);
  driver.init();
  return driver;
}

/** The saved state as a snapshot's state file carries it (JSON, bytes as base64) and reads it back. */
function throughStateFile(state: DevicesState): DevicesState {
  const record: DeviceState = { type: "devices", version: 1, data: state as unknown as StateValue };
  return decodeState(encodeState(record)).data as unknown as DevicesState;
}

Deno.test("device manager state: a restored machine completes the next virtio-blk request with the next used index; UART registers survive", async () => {
  const dir = await Deno.makeTempDir();
  const config = await fakeMachineConfig({ blocks: [await diskImage(`${dir}/disk.img`)] });
  const com1 = SERIAL_PORTS[0].base;
  const { machine: m1, vm: vm1 } = await fakeMachine(config);
  let saved: DevicesState;
  let ram: Uint8Array[];
  let driver: VirtioTestDriver;
  let pending: { head: number; buffers: { addr: number; len: number }[] };
  let usedRing: number;
  const slot = slotOf(m1, VIRTIO_ID_BLOCK);
  const pattern = new Uint8Array(2 * SECTOR_SIZE).map((_, i) => (i * 13 + 1) & 0xff);
  try {
    driver = await startBlockDriver(m1, vm1, slot);
    const q = driver.queues[0];
    usedRing = q.addrs.usedRing;
    q.submit([blkHeader(VIRTIO_BLK_T_OUT, 3), pattern, 1]);
    driver.kick(0);
    assert.ok((await vm1.waitIrq(m1.devices.virtio[slot].irq)) > 0n);
    driver.ackInterrupt();
    assert.equal(q.used().length, 1);
    q.setUsedEvent(q.usedIdx()); // as Linux's virtqueue_enable_cb does: interrupt me at the next used entry
    // The guest publishes its next request; the snapshot is taken before it kicks.
    pending = q.submit([blkHeader(VIRTIO_BLK_T_IN, 3), 2 * SECTOR_SIZE, 1]);
    pioWrite(m1, com1 + UART_LCR, 0x03); // 8 data bits, no parity, 1 stop bit
    pioWrite(m1, com1 + UART_IER, 0x05); // receive data and line status interrupts
    pioWrite(m1, com1 + UART_SCR, 0x5a);
    m1.devices.sleep();
    assert.deepEqual(m1.devices.busy(), []);
    saved = throughStateFile(m1.devices.saveState());
    assert.deepEqual(saved.legacy.map((d) => d.name), ["COM1", "i8042", "cmos", "acpi-pm", "pvpanic"]);
    assert.deepEqual(saved.virtio.map((d) => d.name), m1.devices.virtio.map((v) => v.device.name));
    ram = ramRanges(config.memMiB * MiB).map((r) => m1.memory.read(r.start, r.size));
  } finally {
    await m1.stop(); // the disk's lock goes with it
  }

  const { machine: m2, vm: vm2 } = await fakeMachine(config);
  try {
    // A state whose device list differs is refused naming the device, before anything is restored.
    const refused = (state: DevicesState, message: RegExp) =>
      assert.throws(() => m2.devices.restoreState(state), (e: Error) => {
        assert.ok(e instanceof StateError);
        assert.match(e.message, message);
        return true;
      });
    refused({ ...saved, legacy: saved.legacy.filter((d) => d.name !== "COM1") }, /^COM1: this VM has the device/);
    refused(
      { ...saved, legacy: [...saved.legacy, { name: "COM2", state: saved.legacy[0].state }] },
      /^COM2: the snapshot has the device, this VM does not$/,
    );
    refused(
      { ...saved, virtio: saved.virtio.slice(0, -1) },
      /^virtio device \d+ \(\w+\): this VM has it, the snapshot has no state/,
    );
    refused(
      { ...saved, virtio: [...saved.virtio].reverse() },
      /^virtio device 0: the snapshot has \w+, this VM has block$/,
    );

    ramRanges(config.memMiB * MiB).forEach((r, i) => m2.memory.write(r.start, ram[i]));
    m2.devices.restoreState(saved);
    await m2.start();
    assert.equal(pioRead(m2, com1 + UART_LCR), 0x03);
    assert.equal(pioRead(m2, com1 + UART_IER), 0x05);
    assert.equal(pioRead(m2, com1 + UART_SCR), 0x5a);
    // The guest's kick reaches the restored device, which continues where the first one stopped.
    driver.attach(busTransport(m2, vm2, slot)).kick(0);
    assert.ok((await vm2.waitIrq(m2.devices.virtio[slot].irq)) > 0n, "completion interrupt from the restored device");
    assert.equal(m2.memory.getU16(usedRing + VIRTQ_USED_IDX), 2, "the second used entry");
    assert.equal(m2.memory.getU32(usedRing + VIRTQ_USED_RING + 8 + VIRTQ_USED_ELEM_ID), pending.head);
    const [, data, status] = pending.buffers;
    assert.equal(m2.memory.getU8(status.addr), VIRTIO_BLK_S_OK);
    assert.deepEqual(m2.memory.read(data.addr, data.len), pattern);
  } finally {
    await m2.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("device manager state: a notification the devices had not served when the state was saved is served after restore", async () => {
  const dir = await Deno.makeTempDir();
  const config = await fakeMachineConfig({ blocks: [await diskImage(`${dir}/disk.img`)] });
  const { machine: m1, vm: vm1 } = await fakeMachine(config);
  const slot = slotOf(m1, VIRTIO_ID_BLOCK);
  let saved: DevicesState;
  let ram: Uint8Array[];
  let pending: { head: number; buffers: { addr: number; len: number }[] };
  let usedRing: number;
  try {
    const driver = await startBlockDriver(m1, vm1, slot);
    const q = driver.queues[0];
    usedRing = q.addrs.usedRing;
    // Asleep (as `suspend --full` and a snapshot leave the devices), the guest publishes a request and
    // kicks: the kick waits in the queue's ioeventfd, and the state is saved without it.
    m1.devices.sleep();
    pending = q.submit([blkHeader(VIRTIO_BLK_T_IN, 0), SECTOR_SIZE, 1]);
    driver.kick(0);
    assert.deepEqual(m1.devices.busy(), []);
    saved = throughStateFile(m1.devices.saveState());
    ram = ramRanges(config.memMiB * MiB).map((r) => m1.memory.read(r.start, r.size));
  } finally {
    await m1.stop();
  }
  const { machine: m2, vm: vm2 } = await fakeMachine(config);
  try {
    ramRanges(config.memMiB * MiB).forEach((r, i) => m2.memory.write(r.start, ram[i]));
    m2.devices.restoreState(saved);
    await m2.start();
    // No kick from the guest after the restore: the restored machine serves the request on its own.
    assert.ok((await vm2.waitIrq(m2.devices.virtio[slot].irq)) > 0n, "completion interrupt from the restored device");
    assert.equal(m2.memory.getU16(usedRing + VIRTQ_USED_IDX), 1);
    assert.equal(m2.memory.getU32(usedRing + VIRTQ_USED_RING + VIRTQ_USED_ELEM_ID), pending.head);
    assert.equal(m2.memory.getU8(pending.buffers[2].addr), VIRTIO_BLK_S_OK);
  } finally {
    await m2.stop();
    await Deno.remove(dir, { recursive: true });
  }
});
