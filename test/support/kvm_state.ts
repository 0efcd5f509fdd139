// Checks of the KVM side of snapshots (vmm/kvm/vcpu_state.ts, KvmVm.saveState/restoreState) that run the same
// on the real /dev/kvm (vmm/kvm/vcpu_state_test.ts) and on the fake KVM (test/kvm/fake_kvm_test.ts): a vCPU
// set up for boot saved, restored into a fresh VM and saved again; the VM's irqchips, PIT and clock carried
// from one VM to another; bad records refused.

import assert from "node:assert/strict";
import {
  CLOCK_DATA_CLOCK,
  IOAPIC_REDIRTBL,
  IOAPIC_REDIRTBL_ENTRY_SIZE,
  IRQCHIP_CHIP,
  IRQCHIP_CHIP_ID,
  KVM_CLOCK_DATA_SIZE,
  KVM_DEBUGREGS_SIZE,
  KVM_GET_CLOCK,
  KVM_GET_IRQCHIP,
  KVM_GET_PIT2,
  KVM_GET_VCPU_EVENTS,
  KVM_IRQCHIP_IOAPIC,
  KVM_IRQCHIP_SIZE,
  KVM_PIT_STATE2_SIZE,
  KVM_SET_CLOCK,
  KVM_SET_IRQCHIP,
  KVM_SET_MSRS,
  KVM_SET_PIT2,
  KVM_SET_VCPU_EVENTS,
  KVM_VCPU_EVENTS_SIZE,
  KVM_VCPUEVENT_VALID_NMI_PENDING,
  kvmIoctl,
  msrsStruct,
  PIT_CHANNEL_COUNT,
  PIT_CHANNEL_MODE,
  PIT_CHANNEL_RW_MODE,
  PIT_STATE2_CHANNELS,
  VCPU_EVENTS_FLAGS,
  VCPU_EVENTS_NMI_MASKED,
  VCPU_EVENTS_NMI_PENDING,
} from "../../ffi/kvm.ts";
import { closeFd } from "../../ffi/libc.ts";
import { decodeState, type DeviceState, encodeState, StateError, type StateValue } from "../../core/state.ts";
import { setBootFpu, setBootMsrs, setBootRegisters, setCpuid, setLapicLints, vcpuCpuid } from "../../vmm/arch/cpu.ts";
import { KERNEL_START } from "../../vmm/arch/layout.ts";
import { emulatedGuestCode, kvmModule } from "../../vmm/kvm/host.ts";
import {
  restoreVcpuState,
  saveVcpuState,
  snapshotMsrs,
  type VcpuStateCaps,
  vcpuStateCaps,
} from "../../vmm/kvm/vcpu_state.ts";
import { type Kvm, KvmVm } from "../../vmm/kvm/vm.ts";

/** IA32_TSC (Intel SDM vol. 4, table 2-2): the guest's time-stamp counter, which runs on between two saves. */
export const MSR_IA32_TSC = 0x10;
/**
 * A TSC far from a fresh vCPU's (2^50 cycles, days of guest time), put on the saved vCPU so that a restore which
 * lost it shows. kvm_pvm ignores TSC writes (its guests read the host's TSC), so there the check is weaker.
 */
const GUEST_TSC = 1n << 50n;
/** The restored TSC may have run on by this test's own time: 60 s at 10 GHz is far more. */
const TSC_SLACK = 600_000_000_000n;
/** IA32_MTRR_DEF_TYPE, as vmm/arch/cpu.ts setBootMsrs sets it: MTRRs on (bit 11), default write-back (6). */
const MSR_MTRR_DEF_TYPE = 0x2ff;
const BOOT_MTRR_DEF_TYPE = (1n << 11n) | 6n;
/** kvm_debugregs.flags: after db[4], dr6 and dr7 (asm/kvm.h); KVM_SET_DEBUGREGS takes only 0. */
const DEBUGREGS_FLAGS = 48;

/** A vCPU set up as vmm/builder.ts createVcpus does for a one-vCPU boot; its CPUID, for a restore's vCPU. */
export function bootVcpu(kvm: Kvm, vm: KvmVm, entry = KERNEL_START): { fd: number; cpuid: Uint8Array } {
  const hide = emulatedGuestCode(kvmModule());
  const cpuid = vcpuCpuid(kvm.supportedCpuid(), { apicId: 0, cpuCount: 1, hideCx16: hide, hideXsave: hide });
  const fd = vm.createVcpu(0);
  setCpuid(fd, cpuid);
  setBootMsrs(fd);
  setBootFpu(fd);
  setLapicLints(fd);
  setBootRegisters(fd, entry);
  return { fd, cpuid };
}

/** A record as the snapshot file carries it: encoded to JSON and decoded again. */
export const throughFile = (s: DeviceState): DeviceState => decodeState(encodeState(s));

export type StateFields = { [key: string]: StateValue };
export const fields = (s: DeviceState): StateFields => s.data as StateFields;

/** The record's MSRs as a map, index to value. */
export const msrMap = (s: DeviceState): Map<number, bigint> =>
  new Map((fields(s).msrs as [number, string][]).map(([i, v]) => [i, BigInt(v)]));

/** The record without what runs on with time between two saves: IA32_TSC. */
export function timeless(s: DeviceState): DeviceState {
  const d = { ...fields(s) };
  d.msrs = (d.msrs as [number, string][]).filter(([i]) => i !== MSR_IA32_TSC);
  return { ...s, data: d };
}

/** Everything a check opened, closed in reverse when it ends. */
export class Opened {
  readonly #closers: (() => void)[] = [];
  add<T>(x: T, close: (x: T) => void): T {
    this.#closers.push(() => close(x));
    return x;
  }
  [Symbol.dispose](): void {
    for (const c of this.#closers.reverse()) c();
  }
}

/**
 * A booting vCPU saved, restored (through the file encoding) into a fresh VM's vCPU with the same CPUID, and
 * saved again: the two records are equal but for IA32_TSC, which went on from the saved value.
 */
export function checkVcpuRoundTrip(kvm: Kvm): { first: DeviceState; caps: VcpuStateCaps } {
  using o = new Opened();
  const msrs = snapshotMsrs(kvm);
  assert.ok(msrs.includes(MSR_IA32_TSC), "KVM_GET_MSR_INDEX_LIST includes IA32_TSC");
  const vm1 = o.add(new KvmVm(kvm), (v) => v.close());
  const caps = vcpuStateCaps(vm1);
  const a = bootVcpu(kvm, vm1);
  o.add(a.fd, closeFd);
  assert.equal(kvmIoctl(a.fd, KVM_SET_MSRS, msrsStruct([[MSR_IA32_TSC, GUEST_TSC]])), 1);
  // An NMI pending while NMIs are masked (inside an NMI handler): the vCPU events must come back whole.
  const events = new Uint8Array(KVM_VCPU_EVENTS_SIZE);
  kvmIoctl(a.fd, KVM_GET_VCPU_EVENTS, events);
  const ev = new DataView(events.buffer);
  ev.setUint8(VCPU_EVENTS_NMI_PENDING, 1);
  ev.setUint8(VCPU_EVENTS_NMI_MASKED, 1);
  ev.setUint32(VCPU_EVENTS_FLAGS, ev.getUint32(VCPU_EVENTS_FLAGS, true) | KVM_VCPUEVENT_VALID_NMI_PENDING, true);
  kvmIoctl(a.fd, KVM_SET_VCPU_EVENTS, events);
  const first = saveVcpuState(a.fd, 0, msrs, caps);
  const d = fields(first);
  for (const f of ["regs", "sregs", "fpu", "lapic", "debugregs", "vcpuEvents"]) {
    assert.ok(d[f] instanceof Uint8Array, f);
  }
  if (caps.xsaveSize) assert.equal((d.xsave as Uint8Array).length, caps.xsaveSize);
  if (caps.xcrs) assert.ok(d.xcrs instanceof Uint8Array, "xcrs");
  assert.ok(msrMap(first).has(MSR_IA32_TSC), "IA32_TSC is saved");
  assert.equal(msrMap(first).get(MSR_MTRR_DEF_TYPE), BOOT_MTRR_DEF_TYPE, "the boot MSRs are saved");
  const saved = d.vcpuEvents as Uint8Array;
  assert.deepEqual([saved[VCPU_EVENTS_NMI_PENDING], saved[VCPU_EVENTS_NMI_MASKED]], [1, 1], "the pending NMI is saved");

  const vm2 = o.add(new KvmVm(kvm), (v) => v.close());
  const b = o.add(vm2.createVcpu(0), closeFd);
  setCpuid(b, a.cpuid);
  restoreVcpuState(b, throughFile(first), caps);
  const second = saveVcpuState(b, 0, msrs, caps);
  assert.deepEqual(timeless(second), timeless(first));
  const [tsc1, tsc2] = [msrMap(first).get(MSR_IA32_TSC)!, msrMap(second).get(MSR_IA32_TSC)!];
  assert.ok(tsc2 >= tsc1 && tsc2 < tsc1 + TSC_SLACK, `the TSC ${tsc2} went on from the saved ${tsc1}`);
  return { first, caps };
}

function ioapic(vm: KvmVm): { chip: Uint8Array; view: DataView } {
  const chip = new Uint8Array(KVM_IRQCHIP_SIZE);
  const view = new DataView(chip.buffer);
  view.setUint32(IRQCHIP_CHIP_ID, KVM_IRQCHIP_IOAPIC, true);
  kvmIoctl(vm.fd, KVM_GET_IRQCHIP, chip);
  return { chip, view };
}
const redirectionEntry = (pin: number) => IRQCHIP_CHIP + IOAPIC_REDIRTBL + pin * IOAPIC_REDIRTBL_ENTRY_SIZE;

function pit(vm: KvmVm): { state: Uint8Array; view: DataView } {
  const state = new Uint8Array(KVM_PIT_STATE2_SIZE);
  kvmIoctl(vm.fd, KVM_GET_PIT2, state);
  return { state, view: new DataView(state.buffer) };
}

function pitChannel0(vm: KvmVm): { count: number; mode: number; rwMode: number } {
  const { view } = pit(vm);
  const c = PIT_STATE2_CHANNELS;
  return {
    count: view.getUint32(c + PIT_CHANNEL_COUNT, true),
    mode: view.getUint8(c + PIT_CHANNEL_MODE),
    rwMode: view.getUint8(c + PIT_CHANNEL_RW_MODE),
  };
}

function vmClock(vm: KvmVm): bigint {
  const clock = new Uint8Array(KVM_CLOCK_DATA_SIZE);
  kvmIoctl(vm.fd, KVM_GET_CLOCK, clock);
  return new DataView(clock.buffer).getBigUint64(CLOCK_DATA_CLOCK, true);
}

/** Guest time the VM-state check puts on the first VM's clock: 1000 s, far from a fresh VM's. */
const SAVED_CLOCK_NS = 1_000_000_000_000n;
/** The restored clock may have run on by this test's own time, which is far less than this. */
const CLOCK_SLACK_NS = 60_000_000_000n;

/**
 * An IOAPIC redirection entry, the PIT's channel 0 and the clock set in one VM are there, read back with
 * KVM_GET_*, in a fresh VM restored from its state; the clock goes on from the saved value.
 */
export function checkVmRoundTrip(kvm: Kvm): DeviceState {
  using o = new Opened();
  const vm1 = o.add(new KvmVm(kvm), (v) => v.close());
  // IOAPIC pin 5: vector 0x35, level-triggered (bit 15), unmasked, destination APIC 1 (bits 63..56);
  // 82093AA datasheet 3.2.4.
  const entry = 0x35n | (1n << 15n) | (1n << 56n);
  const chip = ioapic(vm1);
  chip.view.setBigUint64(redirectionEntry(5), entry, true);
  kvmIoctl(vm1.fd, KVM_SET_IRQCHIP, chip.chip);
  // PIT channel 0: mode 2 (rate generator), lobyte/hibyte access (3), count 0x1234 (Intel 8254 datasheet).
  const p = pit(vm1);
  p.view.setUint32(PIT_STATE2_CHANNELS + PIT_CHANNEL_COUNT, 0x1234, true);
  p.view.setUint8(PIT_STATE2_CHANNELS + PIT_CHANNEL_MODE, 2);
  p.view.setUint8(PIT_STATE2_CHANNELS + PIT_CHANNEL_RW_MODE, 3);
  kvmIoctl(vm1.fd, KVM_SET_PIT2, p.state);
  const clock = new Uint8Array(KVM_CLOCK_DATA_SIZE);
  new DataView(clock.buffer).setBigUint64(CLOCK_DATA_CLOCK, SAVED_CLOCK_NS, true);
  kvmIoctl(vm1.fd, KVM_SET_CLOCK, clock);
  const saved = throughFile(vm1.saveState());
  const savedClock = BigInt(fields(saved).clock as string);
  assert.ok(savedClock >= SAVED_CLOCK_NS, `saved clock ${savedClock}`);

  const vm2 = o.add(new KvmVm(kvm), (v) => v.close());
  assert.notEqual(ioapic(vm2).view.getBigUint64(redirectionEntry(5), true), entry);
  vm2.restoreState(saved);
  assert.equal(ioapic(vm2).view.getBigUint64(redirectionEntry(5), true), entry);
  assert.deepEqual(pitChannel0(vm2), { count: 0x1234, mode: 2, rwMode: 3 });
  const now = vmClock(vm2);
  assert.ok(now >= savedClock, `the clock ${now} went on from the saved ${savedClock}`);
  assert.ok(now < savedClock + CLOCK_SLACK_NS, `the clock ${now} is the saved ${savedClock} and a little`);
  // Saved again, the irqchips are as they were (the clock ran on; the PIT's count load time is host time).
  const again = fields(vm2.saveState());
  for (const f of ["picMaster", "picSlave", "ioapic"]) assert.deepEqual(again[f], fields(saved)[f], f);
  return saved;
}

/** A copy of `s` with its data changed by `edit`. */
export function edited(s: DeviceState, edit: (d: StateFields) => void): DeviceState {
  const d = structuredClone(fields(s));
  edit(d);
  return { ...s, data: d };
}

/** `f` throws a StateError of one line matching `message`. */
function assertStateError(f: () => void, message: RegExp, what: string): void {
  assert.throws(f, (e: Error) => {
    assert.ok(e instanceof StateError, `${what}: ${e.name}: ${e.message}`);
    assert.match(e.message, message, what);
    assert.ok(!e.message.includes("\n"), `${what}: one line`);
    return true;
  }, what);
}

/**
 * Bad "kvm-vcpu" and "kvm-vm" records (wrong type or version, a truncated struct, a missing field, values out
 * of range, state KVM refuses) are each a StateError of one line, and the vCPU keeps the state it had.
 */
export function checkBadRecords(kvm: Kvm): void {
  using o = new Opened();
  const msrs = snapshotMsrs(kvm);
  const vm = o.add(new KvmVm(kvm), (v) => v.close());
  const caps = vcpuStateCaps(vm);
  const { fd } = bootVcpu(kvm, vm);
  o.add(fd, closeFd);
  const good = saveVcpuState(fd, 0, msrs, caps);
  const slice = (d: StateFields, f: string, start: number, end?: number) => (d[f] as Uint8Array).slice(start, end);
  const bad: [string, DeviceState, RegExp][] = [
    ["wrong type", { ...good, type: "kvm-vm" }, /a kvm-vm state cannot be restored into kvm-vcpu/],
    ["wrong version", { ...good, version: 2 }, /kvm-vcpu state version 2; this denovm reads version 1/],
    ["not a record", { ...good, data: [1, 2] }, /kvm-vcpu state: expected a record/],
    ["truncated sregs", edited(good, (d) => d.sregs = slice(d, "sregs", 0, 100)), /sregs: expected 312 bytes, got 100/],
    ["truncated lapic", edited(good, (d) => d.lapic = slice(d, "lapic", 1)), /lapic: expected 1024 bytes, got 1023/],
    ["missing regs", edited(good, (d) => delete d.regs), /regs: expected bytes, got nothing/],
    ["missing vcpuEvents", edited(good, (d) => delete d.vcpuEvents), /vcpuEvents: expected bytes, got nothing/],
    ["missing msrs", edited(good, (d) => delete d.msrs), /msrs: expected a list, got nothing/],
    ["missing id", edited(good, (d) => delete d.id), /kvm-vcpu id: expected an integer/],
    ["a short xsave", edited(good, (d) => d.xsave = new Uint8Array(100)), /xsave: 100 bytes is not an XSAVE area/],
    [
      "an MSR value over 64 bits",
      edited(good, (d) => d.msrs = [[0x10, "0x10000000000000000"]]),
      /MSR 0x10: .* not a u64/,
    ],
    ["an MSR index out of range", edited(good, (d) => d.msrs = [[-1, "0x0"]]), /msrs\[0\] index/],
    ["an MSR entry not a pair", edited(good, (d) => d.msrs = [[0x10]]), /msrs\[0\]: expected \[index, value\]/],
    ["too many MSRs", edited(good, (d) => d.msrs = Array(5000).fill([0x10, "0x0"])), /5000 MSRs; KVM lists no more/],
    ["a negative mpState", edited(good, (d) => d.mpState = -1), /mpState: expected an integer/],
  ];
  for (const [what, record, message] of bad) assertStateError(() => restoreVcpuState(fd, record, caps), message, what);
  // Each record is checked whole before the first ioctl: nothing of the bad ones reached the vCPU.
  assert.deepEqual(timeless(saveVcpuState(fd, 0, msrs, caps)), timeless(good));

  // State KVM itself refuses: the StateError names the ioctl.
  const badDr = edited(good, (d) => {
    const dr = slice(d, "debugregs", 0, KVM_DEBUGREGS_SIZE);
    dr[DEBUGREGS_FLAGS] = 1;
    d.debugregs = dr;
  });
  assertStateError(() => restoreVcpuState(fd, badDr, caps), /KVM_SET_DEBUGREGS/, "debug register flags");
  // An MSR no KVM knows ("KVM" and 0xff: past KVM's own 0x4b564dxx MSRs): KVM_SET_MSRS sets none.
  const badMsr = edited(good, (d) => d.msrs = [[0x4b564dff, "0x1"]]);
  assertStateError(
    () => restoreVcpuState(fd, badMsr, caps),
    /KVM_SET_MSRS refused MSR 0x4b564dff = 0x1/,
    "unknown MSR",
  );

  const vmGood = vm.saveState();
  const vmBad: [string, DeviceState, RegExp][] = [
    ["vm: wrong type", { ...vmGood, type: "kvm-vcpu" }, /a kvm-vcpu state cannot be restored into kvm-vm/],
    ["vm: wrong version", { ...vmGood, version: 0 }, /kvm-vm state version 0; this denovm reads version 1/],
    [
      "vm: truncated ioapic",
      edited(vmGood, (d) => d.ioapic = slice(d, "ioapic", 0, 216)),
      /ioapic: expected 512 bytes, got 216/,
    ],
    ["vm: missing pit", edited(vmGood, (d) => delete d.pit), /pit: expected bytes, got nothing/],
    ["vm: a clock not a u64", edited(vmGood, (d) => d.clock = "12"), /clock: "12" is not a u64/],
  ];
  for (const [what, record, message] of vmBad) assertStateError(() => vm.restoreState(record), message, what);
}
