// A stand-in for the KVM VM (vmm/kvm/vm.ts KvmVm) that records what the VMM asked for and
// plays KVM's part for MMIO accesses: a write that matches a registered ioeventfd
// signals that eventfd instead of reaching the device (as KVM_IOEVENTFD does), and
// irqfds are the eventfds the test watches for interrupts. No vCPUs.

import { eventfdRead, eventfdWrite, POLLIN, pollSync } from "../../ffi/libc.ts";
import type { Bus } from "../../core/bus.ts";
import type { VmHandle } from "../../vmm/kvm/vm.ts";
import type { GuestMemory } from "../../core/memory.ts";
import { type DeviceState, stateData, StateError, stateRecord } from "../../core/state.ts";
import { VM_STATE_TYPE, VM_STATE_VERSION } from "../../vmm/kvm/vm.ts";

export class FakeVm implements VmHandle {
  readonly slots = new Map<number, { guestAddr: number; size: number; hostAddr: bigint; readonly: boolean }>();
  readonly irqfds = new Map<number, number>(); // gsi -> eventfd
  readonly ioeventfds: { fd: number; addr: number; len: number; datamatch?: number; pio: boolean }[] = [];
  readonly pulses: number[] = [];
  #nextSlot = 0;
  closed = false;

  addGuestMemory(mem: GuestMemory): void {
    for (const d of mem.descriptors) this.addSlot(d.guestBase, d.size, d.hostAddr, false);
  }
  addSlot(guestAddr: number, size: number, hostAddr: bigint, readonly: boolean): number {
    for (const s of this.slots.values()) {
      if (guestAddr < s.guestAddr + s.size && s.guestAddr < guestAddr + size) throw new Error("overlapping slots");
    }
    const n = this.#nextSlot++;
    this.slots.set(n, { guestAddr, size, hostAddr, readonly });
    return n;
  }
  removeSlot(slot: number): void {
    if (!this.slots.delete(slot)) throw new Error(`no slot ${slot}`);
  }
  pulseIrq(gsi: number): void {
    this.pulses.push(gsi);
  }
  registerIrqfd(fd: number, gsi: number): void {
    this.irqfds.set(gsi, fd);
  }
  registerIoeventfd(fd: number, addr: number, len: number, datamatch?: number, pio = false): void {
    this.ioeventfds.push({ fd, addr, len, datamatch, pio });
  }
  createVcpu(_id: number): number {
    throw new Error("FakeVm has no vCPUs");
  }
  /** A "kvm-vm" record with no data: a FakeVm has no irqchip, PIT or clock. */
  saveState(): DeviceState {
    return { type: VM_STATE_TYPE, version: VM_STATE_VERSION, data: {} };
  }
  /** Takes only what saveState gives: a "kvm-vm" record with empty data. */
  restoreState(state: DeviceState, restoreVcpus: () => void = () => {}): void {
    const d = stateRecord(stateData(state, VM_STATE_TYPE, VM_STATE_VERSION), "kvm-vm state");
    if (Object.keys(d).length > 0) throw new StateError("kvm-vm: a FakeVm restores only its own empty record");
    restoreVcpus();
  }
  close(): void {
    this.closed = true;
  }

  /** A guest MMIO write as KVM handles it: an ioeventfd match signals the eventfd, else the bus. */
  mmioWrite(bus: Bus, addr: number, data: Uint8Array): "ioeventfd" | "bus" {
    const value = data.length === 4 ? new DataView(data.buffer, data.byteOffset, 4).getUint32(0, true) : -1;
    const hit = this.ioeventfds.find((e) =>
      !e.pio && e.addr === addr && e.len === data.length && (e.datamatch === undefined || e.datamatch === value)
    );
    if (hit) {
      eventfdWrite(hit.fd);
      return "ioeventfd";
    }
    bus.write(addr, data);
    return "bus";
  }

  /** Wait (up to `ms`) for an interrupt on `gsi`'s irqfd; returns how many were signalled. */
  async waitIrq(gsi: number, ms = 5000): Promise<bigint> {
    const fd = this.irqfds.get(gsi);
    if (fd === undefined) throw new Error(`no irqfd on GSI ${gsi}`);
    const deadline = Date.now() + ms;
    while (Date.now() < deadline) {
      if (pollSync([fd], POLLIN, 0)[0] & POLLIN) return eventfdRead(fd);
      await new Promise((r) => setTimeout(r, 5));
    }
    return 0n;
  }
}
