// A vCPU's KVM state as a snapshot record ("kvm-vcpu", version 1), and back into a fresh vCPU.
//
// Saved: the general and special registers, the FPU, the XSAVE area and XCRs where KVM has them, every MSR
// of KVM_GET_MSR_INDEX_LIST that KVM reads, the local APIC page, the MP state, the pending events and the
// debug registers. CPUID is not saved: the restore sets the same CPUID the boot does, before this record.
//
// The vCPU must be out of KVM_RUN, with any I/O exit completed: KVM finishes an exit's instruction only on
// the next KVM_RUN, so the vCPU must have re-entered KVM_RUN once with immediate_exit set (the vCPU Worker's
// pause does exactly that) before its registers are read.
//
// The TSC: IA32_TSC is in KVM's MSR list and is saved with the MSRs; written back by KVM_SET_MSRS (a
// host-initiated write), KVM sets the vCPU's TSC offset so the guest's TSC continues from the saved value.
// Firecracker does the same (IA32_TSC among the saved MSRs; it also saves the TSC frequency and sets it on
// a host whose frequency differs); QEMU writes its saved TSC back through KVM_SET_MSRS on a full-state
// write and restores kvmclock with KVM_SET_CLOCK on the VM (here: KvmVm.restoreState).

import {
  KVM_CAP_DEBUGREGS,
  KVM_CAP_VCPU_EVENTS,
  KVM_CAP_XCRS,
  KVM_CAP_XSAVE,
  KVM_CAP_XSAVE2,
  KVM_DEBUGREGS_SIZE,
  KVM_FPU_SIZE,
  KVM_GET_DEBUGREGS,
  KVM_GET_FPU,
  KVM_GET_LAPIC,
  KVM_GET_MP_STATE,
  KVM_GET_MSR_INDEX_LIST,
  KVM_GET_MSRS,
  KVM_GET_REGS,
  KVM_GET_SREGS,
  KVM_GET_VCPU_EVENTS,
  KVM_GET_XCRS,
  KVM_GET_XSAVE,
  KVM_GET_XSAVE2,
  KVM_LAPIC_STATE_SIZE,
  KVM_MP_STATE_SIZE,
  KVM_MSR_ENTRY_SIZE,
  KVM_MSR_LIST_HEADER_SIZE,
  KVM_MSRS_HEADER_SIZE,
  KVM_REGS_SIZE,
  KVM_SET_DEBUGREGS,
  KVM_SET_FPU,
  KVM_SET_LAPIC,
  KVM_SET_MP_STATE,
  KVM_SET_MSRS,
  KVM_SET_REGS,
  KVM_SET_SREGS,
  KVM_SET_VCPU_EVENTS,
  KVM_SET_XCRS,
  KVM_SET_XSAVE,
  KVM_SREGS_SIZE,
  KVM_VCPU_EVENTS_SIZE,
  KVM_VCPUEVENT_VALID_NMI_PENDING,
  KVM_VCPUEVENT_VALID_SIPI_VECTOR,
  KVM_XCRS_SIZE,
  KVM_XSAVE_SIZE,
  KvmError,
  kvmIoctl,
  MSR_LIST_INDICES,
  msrsStruct,
  VCPU_EVENTS_FLAGS,
} from "../../ffi/kvm.ts";
import { E2BIG } from "../../ffi/libc.ts";
import { HostError } from "../../core/exit.ts";
import {
  type DeviceState,
  stateArray,
  stateBytes,
  stateData,
  StateError,
  stateInteger,
  stateRecord,
  stateString,
  type StateValue,
} from "../../core/state.ts";

export const VCPU_STATE_TYPE = "kvm-vcpu";
export const VCPU_STATE_VERSION = 1;

/** MSRs per KVM_GET/SET_MSRS call: under KVM's MAX_IO_MSRS (256, Linux arch/x86/kvm/x86.c), which it refuses. */
const MSRS_PER_CALL = 128;
/** An MSR value in a record: "0x" and 1 to 16 lower-case hex digits (a u64). */
const MSR_VALUE = /^0x[0-9a-f]{1,16}$/;
const U32_MAX = 0xffffffff;
/** More MSRs than KVM_GET_MSR_INDEX_LIST could answer with (it lists a few hundred): not a list, nor a record. */
const MAX_MSR_INDICES = 4096;
/** The largest XSAVE area a record may carry (AMX's state is about 11 KiB; KVM caps the uabi size well below). */
const MAX_XSAVE_SIZE = 64 * 1024;

/**
 * The MTRRs (Intel SDM vol. 3A, 12.11: IA32_MTRR_PHYSBASE0..PHYSMASK7, the fixed-range MTRRs and
 * IA32_MTRR_DEF_TYPE, which vmm/arch/cpu.ts setBootMsrs sets). KVM serves them but KVM_GET_MSR_INDEX_LIST does
 * not list them; QEMU saves them by name too. KVM has 8 variable ranges (KVM_NR_VAR_MTRR).
 */
const MSR_MTRR_PHYS_BASE0 = 0x200;
const KVM_NR_VAR_MTRR = 8;
const MSR_MTRR_FIX64K_00000 = 0x250;
const MSR_MTRR_FIX16K_80000 = 0x258;
const MSR_MTRR_FIX16K_A0000 = 0x259;
const MSR_MTRR_FIX4K_C0000 = 0x268;
const MTRR_FIX4K_COUNT = 8;
const MSR_MTRR_DEF_TYPE = 0x2ff;
const MTRR_MSRS: readonly number[] = [
  ...Array.from({ length: 2 * KVM_NR_VAR_MTRR }, (_, i) => MSR_MTRR_PHYS_BASE0 + i),
  MSR_MTRR_FIX64K_00000,
  MSR_MTRR_FIX16K_80000,
  MSR_MTRR_FIX16K_A0000,
  ...Array.from({ length: MTRR_FIX4K_COUNT }, (_, i) => MSR_MTRR_FIX4K_C0000 + i),
  MSR_MTRR_DEF_TYPE,
];

/** What the host's KVM offers for vCPU state, found once per VM (vcpuStateCaps). */
export interface VcpuStateCaps {
  /**
   * Bytes of the XSAVE area: KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) where KVM has it (larger than 4096 when the
   * VM may use dynamically enabled state such as AMX), else 4096; 0 where KVM has no KVM_CAP_XSAVE.
   */
  readonly xsaveSize: number;
  /** KVM_GET_XSAVE2 exists (KVM_CAP_XSAVE2): the whole area, whatever its size. */
  readonly xsave2: boolean;
  /** KVM_GET/SET_XCRS exist (KVM_CAP_XCRS). */
  readonly xcrs: boolean;
}

/**
 * The vCPU state capabilities of `kvm`: pass the KvmVm (its KVM_CAP_XSAVE2 answer counts the state this VM
 * may use) or the Kvm. Throws HostError where KVM lacks the vCPU events or debug registers API (every x86 KVM
 * since Linux 2.6.35 has both).
 */
export function vcpuStateCaps(kvm: { checkExtension(cap: number): number }): VcpuStateCaps {
  for (const [cap, name] of [[KVM_CAP_VCPU_EVENTS, "vCPU events"], [KVM_CAP_DEBUGREGS, "debug registers"]] as const) {
    if (!kvm.checkExtension(cap)) throw new HostError(`KVM lacks a capability snapshots need: ${name}`);
  }
  const xsave = kvm.checkExtension(KVM_CAP_XSAVE) > 0;
  const xsave2Size = xsave ? kvm.checkExtension(KVM_CAP_XSAVE2) : 0;
  return {
    xsaveSize: xsave ? Math.max(KVM_XSAVE_SIZE, xsave2Size) : 0,
    xsave2: xsave2Size > 0,
    xcrs: kvm.checkExtension(KVM_CAP_XCRS) > 0,
  };
}

/**
 * The MSR indices a snapshot saves: KVM_GET_MSR_INDEX_LIST on the system fd (IA32_TSC among them), then the
 * MTRRs, which KVM does not list. One a vCPU cannot read is skipped when saved, and named in the record.
 */
export function snapshotMsrs(kvm: { readonly fd: number }): number[] {
  // Asked with room for none, KVM answers E2BIG with the count it needs in nmsrs.
  const head = new Uint8Array(KVM_MSR_LIST_HEADER_SIZE);
  let count = 0;
  try {
    kvmIoctl(kvm.fd, KVM_GET_MSR_INDEX_LIST, head);
  } catch (e) {
    if (!(e instanceof KvmError && e.errno === E2BIG)) throw e;
    count = new DataView(head.buffer).getUint32(0, true);
  }
  if (count > MAX_MSR_INDICES) throw new HostError(`KVM_GET_MSR_INDEX_LIST: ${count} MSRs`);
  const list = new Uint8Array(MSR_LIST_INDICES + 4 * count);
  const v = new DataView(list.buffer);
  v.setUint32(0, count, true);
  if (count > 0) kvmIoctl(kvm.fd, KVM_GET_MSR_INDEX_LIST, list);
  const n = Math.min(v.getUint32(0, true), count);
  const listed = Array.from({ length: n }, (_, i) => v.getUint32(MSR_LIST_INDICES + 4 * i, true));
  return [...new Set([...listed, ...MTRR_MSRS])];
}

function get(vcpuFd: number, request: number, size: number): Uint8Array {
  const buf = new Uint8Array(size);
  kvmIoctl(vcpuFd, request, buf);
  return buf;
}

/**
 * Read the MSRs in `indices`. KVM_GET_MSRS stops at the first MSR it cannot read and returns how many it
 * read: that MSR is skipped (and named in the record) and the reading goes on after it.
 */
function readMsrs(vcpuFd: number, indices: readonly number[]): { msrs: [number, bigint][]; skipped: number[] } {
  const msrs: [number, bigint][] = [];
  const skipped: number[] = [];
  let at = 0;
  while (at < indices.length) {
    const chunk = indices.slice(at, at + MSRS_PER_CALL);
    const buf = msrsStruct(chunk.map((i) => [i, 0n]));
    const read = Math.min(kvmIoctl(vcpuFd, KVM_GET_MSRS, buf), chunk.length);
    const v = new DataView(buf.buffer);
    for (let i = 0; i < read; i++) {
      const o = KVM_MSRS_HEADER_SIZE + i * KVM_MSR_ENTRY_SIZE;
      msrs.push([v.getUint32(o, true), v.getBigUint64(o + 8, true)]);
    }
    at += read;
    if (read < chunk.length) skipped.push(indices[at++]);
  }
  return { msrs, skipped };
}

/**
 * The state of vCPU `id` (fd `vcpuFd`): its MSRs in `msrIndices` (snapshotMsrs), its XSAVE area and XCRs as
 * `caps` (vcpuStateCaps) allows. Read in the order Firecracker uses: the MP state first (reading it lets KVM
 * take pending INIT/SIPI into the vCPU, which changes the rest), the vCPU events last.
 */
export function saveVcpuState(
  vcpuFd: number,
  id: number,
  msrIndices: readonly number[],
  caps: VcpuStateCaps,
): DeviceState {
  const mpState = new DataView(get(vcpuFd, KVM_GET_MP_STATE, KVM_MP_STATE_SIZE).buffer).getUint32(0, true);
  const regs = get(vcpuFd, KVM_GET_REGS, KVM_REGS_SIZE);
  const sregs = get(vcpuFd, KVM_GET_SREGS, KVM_SREGS_SIZE);
  const fpu = get(vcpuFd, KVM_GET_FPU, KVM_FPU_SIZE);
  const data: { [key: string]: StateValue } = { id, mpState, regs, sregs, fpu };
  if (caps.xsaveSize > 0) {
    data.xsave = caps.xsave2 ? get(vcpuFd, KVM_GET_XSAVE2, caps.xsaveSize) : get(vcpuFd, KVM_GET_XSAVE, KVM_XSAVE_SIZE);
  }
  if (caps.xcrs) data.xcrs = get(vcpuFd, KVM_GET_XCRS, KVM_XCRS_SIZE);
  data.debugregs = get(vcpuFd, KVM_GET_DEBUGREGS, KVM_DEBUGREGS_SIZE);
  data.lapic = get(vcpuFd, KVM_GET_LAPIC, KVM_LAPIC_STATE_SIZE);
  const { msrs, skipped } = readMsrs(vcpuFd, msrIndices);
  data.msrs = msrs.map(([index, value]) => [index, `0x${value.toString(16)}`]);
  data.msrsSkipped = skipped;
  data.vcpuEvents = get(vcpuFd, KVM_GET_VCPU_EVENTS, KVM_VCPU_EVENTS_SIZE);
  return { type: VCPU_STATE_TYPE, version: VCPU_STATE_VERSION, data };
}

/** A checked "kvm-vcpu" record, before anything reaches KVM. */
interface VcpuRecord {
  id: number;
  mpState: number;
  regs: Uint8Array;
  sregs: Uint8Array;
  fpu: Uint8Array;
  xsave?: Uint8Array;
  xcrs?: Uint8Array;
  debugregs: Uint8Array;
  lapic: Uint8Array;
  msrs: [number, bigint][];
  vcpuEvents: Uint8Array;
}

function parseVcpuState(state: DeviceState): VcpuRecord {
  const d = stateRecord(stateData(state, VCPU_STATE_TYPE, VCPU_STATE_VERSION), "kvm-vcpu state");
  const id = stateInteger(d.id, "kvm-vcpu id", 0, U32_MAX);
  const what = `kvm-vcpu ${id}`;
  const bytes = (field: string, length: number) => stateBytes(d[field], `${what} ${field}`, length);
  let xsave: Uint8Array | undefined;
  if (d.xsave !== undefined) {
    xsave = stateBytes(d.xsave, `${what} xsave`);
    if (xsave.length < KVM_XSAVE_SIZE || xsave.length > MAX_XSAVE_SIZE || xsave.length % 4 !== 0) {
      throw new StateError(`${what} xsave: ${xsave.length} bytes is not an XSAVE area`);
    }
  }
  const msrList = stateArray(d.msrs, `${what} msrs`);
  const skippedList = stateArray(d.msrsSkipped, `${what} msrsSkipped`);
  if (msrList.length + skippedList.length > MAX_MSR_INDICES) {
    throw new StateError(
      `${what}: ${msrList.length + skippedList.length} MSRs; KVM lists no more than ${MAX_MSR_INDICES}`,
    );
  }
  const msrs = msrList.map((entry, i): [number, bigint] => {
    const pair = stateArray(entry, `${what} msrs[${i}]`);
    if (pair.length !== 2) throw new StateError(`${what} msrs[${i}]: expected [index, value]`);
    const index = stateInteger(pair[0], `${what} msrs[${i}] index`, 0, U32_MAX);
    const value = stateString(pair[1], `${what} MSR 0x${index.toString(16)}`);
    if (!MSR_VALUE.test(value)) throw new StateError(`${what} MSR 0x${index.toString(16)}: "${value}" is not a u64`);
    return [index, BigInt(value)];
  });
  skippedList.forEach((x, i) => stateInteger(x, `${what} msrsSkipped[${i}]`, 0, U32_MAX));
  return {
    id,
    mpState: stateInteger(d.mpState, `${what} mpState`, 0, U32_MAX),
    regs: bytes("regs", KVM_REGS_SIZE),
    sregs: bytes("sregs", KVM_SREGS_SIZE),
    fpu: bytes("fpu", KVM_FPU_SIZE),
    xsave,
    xcrs: d.xcrs === undefined ? undefined : bytes("xcrs", KVM_XCRS_SIZE),
    debugregs: bytes("debugregs", KVM_DEBUGREGS_SIZE),
    lapic: bytes("lapic", KVM_LAPIC_STATE_SIZE),
    msrs,
    vcpuEvents: bytes("vcpuEvents", KVM_VCPU_EVENTS_SIZE),
  };
}

/**
 * Put a "kvm-vcpu" record into a fresh vCPU whose CPUID is already set. The record is checked whole before
 * the first ioctl; a bad record, or state KVM refuses, is a StateError of one line naming the field or the
 * ioctl. The order is Firecracker's: MP state, registers, special registers, XSAVE (or the FPU where the
 * record has no XSAVE area), XCRs, debug registers, local APIC, MSRs (after the APIC: the TSC-deadline MSR
 * arms the APIC timer), vCPU events last (a pending interrupt or exception goes into the final state).
 * `caps` gives the size KVM_SET_XSAVE reads on this host, when it is larger than the saved area.
 */
export function restoreVcpuState(vcpuFd: number, state: DeviceState, caps?: VcpuStateCaps): void {
  const r = parseVcpuState(state);
  const what = `kvm-vcpu ${r.id}`;
  const set = (request: number, buf: Uint8Array) => {
    try {
      return kvmIoctl(vcpuFd, request, buf);
    } catch (e) {
      if (e instanceof KvmError) throw new StateError(`${what}: KVM refused the saved state: ${e.message}`);
      throw e;
    }
  };
  const mp = new Uint8Array(KVM_MP_STATE_SIZE);
  new DataView(mp.buffer).setUint32(0, r.mpState, true);
  set(KVM_SET_MP_STATE, mp);
  // Copies: KVM gets buffers of its own, the record stays as it was.
  set(KVM_SET_REGS, r.regs.slice());
  set(KVM_SET_SREGS, r.sregs.slice());
  if (r.xsave) {
    // KVM_SET_XSAVE reads this VM's XSAVE size: a shorter saved area is padded with zeros (its header says
    // which components it holds).
    const area = new Uint8Array(Math.max(r.xsave.length, caps?.xsaveSize ?? 0));
    area.set(r.xsave);
    set(KVM_SET_XSAVE, area);
  } else {
    set(KVM_SET_FPU, r.fpu.slice());
  }
  if (r.xcrs) set(KVM_SET_XCRS, r.xcrs.slice());
  set(KVM_SET_DEBUGREGS, r.debugregs.slice());
  set(KVM_SET_LAPIC, r.lapic.slice());
  // KVM_SET_MSRS stops at the first MSR it refuses and returns how many it set.
  for (let at = 0; at < r.msrs.length; at += MSRS_PER_CALL) {
    const chunk = r.msrs.slice(at, at + MSRS_PER_CALL);
    const n = set(KVM_SET_MSRS, msrsStruct(chunk));
    if (n < chunk.length) {
      const [index, value] = chunk[n];
      throw new StateError(`${what}: KVM_SET_MSRS refused MSR 0x${index.toString(16)} = 0x${value.toString(16)}`);
    }
  }
  // The pending NMI count and the SIPI vector are taken only when flagged valid. Recent kernels' KVM_GET_VCPU_EVENTS
  // flags the NMI count, older ones neither (QEMU sets both flags itself): without them a pending NMI is dropped.
  const events = r.vcpuEvents.slice();
  const ev = new DataView(events.buffer);
  ev.setUint32(
    VCPU_EVENTS_FLAGS,
    ev.getUint32(VCPU_EVENTS_FLAGS, true) | KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR,
    true,
  );
  set(KVM_SET_VCPU_EVENTS, events);
}
