// A machine built on a FakeVm (fake_vm.ts) around the boot_info test guest, its disks, and a virtio driver that
// reaches the machine's devices as a guest does: through the MMIO bus, with KVM's ioeventfd semantics.

import assert from "node:assert/strict";
import type { VirtioMmioTransport } from "../../devices/virtio/mmio.ts";
import { MiB } from "../../vmm/arch/layout.ts";
import { buildMachine } from "../../vmm/builder.ts";
import { type BlockConfig, defaultVmConfig, type VmConfig } from "../../vmm/config.ts";
import type { Machine } from "../../vmm/machine.ts";
import { buildGuest } from "../guests/build.ts";
import { FakeVm } from "./fake_vm.ts";
import { VirtioTestDriver } from "./virtio_driver.ts";

/** Where drivers' rings and buffers start in guest RAM: above the test guest and its tables. */
const DRIVER_RAM_START = 32 * MiB;
/** Guest RAM each slot's driver gets from DRIVER_RAM_START on. */
const DRIVER_RAM_PER_SLOT = MiB;

/** buildMachine's and restoreMachine's options for a test: no stdin, no log lines. */
export const QUIET = { noStdin: true, log: () => {} };

/** A 64 MiB machine running the boot_info test guest, COM1 a sink console; `extra` changes or adds to it. */
export async function fakeMachineConfig(extra: Partial<VmConfig> = {}): Promise<VmConfig> {
  return {
    ...defaultVmConfig(await buildGuest("boot_info")),
    memMiB: 64,
    serials: [{ type: "sink", hardware: "serial", num: 1, console: true, earlycon: false, stdin: false }],
    ...extra,
  };
}

/** `config` built on a new FakeVm, quiet. */
export async function fakeMachine(config: VmConfig): Promise<{ machine: Machine; vm: FakeVm }> {
  const vm = new FakeVm();
  const machine = await buildMachine(config, { vm, ...QUIET });
  return { machine, vm };
}

/** A disk image of 1 MiB of zeros at `path`, as a --block device: writable unless `ro`, not the root. */
export async function diskImage(path: string, ro = false): Promise<BlockConfig> {
  await Deno.writeFile(path, new Uint8Array(MiB));
  return { path, ro, root: false, sparse: true, blockSize: 512, direct: false };
}

/** The slot of `machine`'s first virtio device of `type`. */
export function slotOf(machine: Machine, type: number): number {
  const slot = machine.devices.virtio.findIndex((v) => v.device.deviceType === type);
  assert.ok(slot >= 0, `a device of type ${type}`);
  return slot;
}

/** Slot `slot`'s registers as a guest reaches them: through `machine`'s MMIO bus, with `vm`'s ioeventfds. */
export function busTransport(machine: Machine, vm: FakeVm, slot: number): VirtioMmioTransport {
  const v = machine.devices.virtio[slot];
  return {
    device: v.device,
    read: (off: number, data: Uint8Array) => void machine.devices.mmio.read(v.base + off, data),
    write: (off: number, data: Uint8Array) => void vm.mmioWrite(machine.devices.mmio, v.base + off, data),
  } as unknown as VirtioMmioTransport;
}

/** A driver of slot `slot` through busTransport, its rings and buffers in the slot's own MiB of guest RAM. */
export function busDriver(machine: Machine, vm: FakeVm, slot: number): VirtioTestDriver {
  const start = DRIVER_RAM_START + slot * DRIVER_RAM_PER_SLOT;
  return new VirtioTestDriver(busTransport(machine, vm, slot), machine.memory, {
    start,
    end: start + DRIVER_RAM_PER_SLOT,
  });
}

export { blkHeader } from "./blk_request.ts";
