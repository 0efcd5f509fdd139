// A KVM virtual machine: /dev/kvm, the VM fd, memory slots, the in-kernel
// irqchip and PIT, GSI routing, irqfd and ioeventfd, and the VM-wide state a
// snapshot saves (the PICs, the IOAPIC, the PIT and the KVM clock).

import {
  CLOCK_DATA_CLOCK,
  CLOCK_DATA_FLAGS,
  ioeventfdStruct,
  IRQCHIP_CHIP,
  IRQCHIP_CHIP_ID,
  IRQCHIP_CHIP_SIZE,
  irqfdStruct,
  irqLevelStruct,
  irqRoutingStruct,
  KVM_API_VERSION,
  KVM_CAP_IMMEDIATE_EXIT,
  KVM_CAP_IOEVENTFD,
  KVM_CAP_IRQCHIP,
  KVM_CAP_IRQFD,
  KVM_CAP_MAX_VCPUS,
  KVM_CAP_NR_MEMSLOTS,
  KVM_CAP_NR_VCPUS,
  KVM_CAP_PIT2,
  KVM_CAP_USER_MEMORY,
  KVM_CHECK_EXTENSION,
  KVM_CLOCK_DATA_SIZE,
  KVM_CPUID2_HEADER_SIZE,
  KVM_CPUID_ENTRY2_SIZE,
  KVM_CREATE_IRQCHIP,
  KVM_CREATE_PIT2,
  KVM_CREATE_VCPU,
  KVM_CREATE_VM,
  KVM_GET_API_VERSION,
  KVM_GET_CLOCK,
  KVM_GET_IRQCHIP,
  KVM_GET_PIT2,
  KVM_GET_SUPPORTED_CPUID,
  KVM_GET_VCPU_MMAP_SIZE,
  KVM_IOEVENTFD,
  KVM_IOEVENTFD_FLAG_DATAMATCH,
  KVM_IOEVENTFD_FLAG_PIO,
  KVM_IRQ_LINE,
  KVM_IRQCHIP_IOAPIC,
  KVM_IRQCHIP_PIC_MASTER,
  KVM_IRQCHIP_PIC_SLAVE,
  KVM_IRQCHIP_SIZE,
  KVM_IRQFD,
  KVM_MEM_READONLY,
  KVM_PIT_CONFIG_SIZE,
  KVM_PIT_SPEAKER_DUMMY,
  KVM_PIT_STATE2_SIZE,
  KVM_SET_CLOCK,
  KVM_SET_GSI_ROUTING,
  KVM_SET_IDENTITY_MAP_ADDR,
  KVM_SET_IRQCHIP,
  KVM_SET_PIT2,
  KVM_SET_TSS_ADDR,
  KVM_SET_USER_MEMORY_REGION,
  KvmError,
  kvmIoctl,
  kvmIoctlInt,
  memoryRegion,
} from "../../ffi/kvm.ts";
import { closeFd, E2BIG, EACCES, ENOENT, EPERM, O_RDWR, openFile, SysError } from "../../ffi/libc.ts";
import { IOAPIC_PINS, KVM_IDENTITY_MAP_START, KVM_TSS_START } from "../arch/layout.ts";
import type { GuestMemory } from "../../core/memory.ts";
import {
  type DeviceState,
  stateBytes,
  stateData,
  StateError,
  stateRecord,
  stateString,
  type StateValue,
} from "../../core/state.ts";

import { HostError } from "../../core/exit.ts";

export const KVM_DEVICE = "/dev/kvm";

/** The legacy PIC's IRQ 2 is its cascade: ISA IRQ 0 (the PIT) goes to IOAPIC pin 2 on a PC. */
const PIC_CASCADE_IRQ = 2;
/** ISA IRQs served by the two legacy PICs (0..7 master, 8..15 slave). */
const PIC_IRQS = 16;
const PIC_IRQS_PER_CHIP = 8;

export const VM_STATE_TYPE = "kvm-vm";
export const VM_STATE_VERSION = 1;
/** The in-kernel irqchips a VM state holds, by record field. */
const IRQCHIPS = [
  ["picMaster", KVM_IRQCHIP_PIC_MASTER],
  ["picSlave", KVM_IRQCHIP_PIC_SLAVE],
  ["ioapic", KVM_IRQCHIP_IOAPIC],
] as const;
/** The KVM clock in a record: "0x" and 1 to 16 lower-case hex digits (nanoseconds, a u64). */
const CLOCK_VALUE = /^0x[0-9a-f]{1,16}$/;

/** The /dev/kvm system fd and what it reports. */
export class Kvm {
  readonly fd: number;

  /** `path` defaults to $DENOVM_KVM_DEVICE, then /dev/kvm. */
  constructor(path = Deno.env.get("DENOVM_KVM_DEVICE") ?? KVM_DEVICE) {
    try {
      this.fd = openFile(path, O_RDWR);
    } catch (e) {
      if (e instanceof SysError && (e.errno === ENOENT)) {
        throw new HostError(`${path} does not exist: this host has no KVM (load kvm_intel or kvm_amd)`);
      }
      if (e instanceof SysError && (e.errno === EACCES || e.errno === EPERM)) {
        throw new HostError(`no permission to open ${path}: run as root or join the kvm group`);
      }
      throw new HostError(`cannot open ${path}: ${(e as Error).message}`);
    }
    try {
      this.#checkHost(path);
    } catch (e) {
      closeFd(this.fd); // the caller never gets this object, so nothing else would close it
      throw e;
    }
  }

  #checkHost(path: string): void {
    let version: number;
    try {
      version = kvmIoctlInt(this.fd, KVM_GET_API_VERSION);
    } catch (e) {
      throw new HostError(`${path} is not a KVM device: ${(e as Error).message}`);
    }
    if (version !== KVM_API_VERSION) {
      throw new HostError(`KVM API version ${version}, expected ${KVM_API_VERSION}`);
    }
    for (
      const [cap, name] of [
        [KVM_CAP_IRQCHIP, "in-kernel irqchip"],
        [KVM_CAP_USER_MEMORY, "user memory"],
        [KVM_CAP_IRQFD, "irqfd"],
        [KVM_CAP_IOEVENTFD, "ioeventfd"],
        [KVM_CAP_PIT2, "PIT2"],
        [KVM_CAP_IMMEDIATE_EXIT, "immediate_exit"],
      ] as const
    ) {
      if (!this.checkExtension(cap)) throw new HostError(`KVM lacks a capability denovm needs: ${name}`);
    }
  }

  checkExtension(cap: number): number {
    return kvmIoctlInt(this.fd, KVM_CHECK_EXTENSION, cap);
  }

  /** Most vCPUs one VM may have (KVM_CAP_MAX_VCPUS, falling back to NR_VCPUS as the API says). */
  get maxVcpus(): number {
    return this.checkExtension(KVM_CAP_MAX_VCPUS) || this.checkExtension(KVM_CAP_NR_VCPUS) || 4;
  }

  get vcpuMmapSize(): number {
    return kvmIoctlInt(this.fd, KVM_GET_VCPU_MMAP_SIZE);
  }

  /** KVM_GET_SUPPORTED_CPUID: the raw struct kvm_cpuid2, grown until it fits. */
  supportedCpuid(): Uint8Array<ArrayBuffer> {
    for (let n = 64;; n *= 2) {
      const buf = new Uint8Array(KVM_CPUID2_HEADER_SIZE + n * KVM_CPUID_ENTRY2_SIZE);
      new DataView(buf.buffer).setUint32(0, n, true); // nent
      try {
        kvmIoctl(this.fd, KVM_GET_SUPPORTED_CPUID, buf);
        return buf;
      } catch (e) {
        if (e instanceof KvmError && e.errno === E2BIG && n < 4096) continue;
        throw e;
      }
    }
  }

  close(): void {
    closeFd(this.fd);
  }
}

/** One memory slot as KVM sees it. */
interface Slot {
  guestAddr: number;
  size: number;
  hostAddr: bigint;
  readonly: boolean;
}

/** A VM: created with its irqchip and PIT, holding its memory slots. */
export class KvmVm {
  readonly fd: number;
  readonly #slots = new Map<number, Slot>();
  readonly #freeSlots: number[] = [];
  #nextSlot = 0;
  readonly maxSlots: number;

  constructor(readonly kvm: Kvm) {
    this.fd = kvmIoctlInt(kvm.fd, KVM_CREATE_VM, 0);
    try {
      this.maxSlots = kvm.checkExtension(KVM_CAP_NR_MEMSLOTS) || 32;
      // Intel VMX needs a real-mode TSS and identity map page; both live in the MMIO hole.
      kvmIoctlInt(this.fd, KVM_SET_TSS_ADDR, KVM_TSS_START);
      const idmap = new Uint8Array(8);
      new DataView(idmap.buffer).setBigUint64(0, BigInt(KVM_IDENTITY_MAP_START), true);
      kvmIoctl(this.fd, KVM_SET_IDENTITY_MAP_ADDR, idmap);
      kvmIoctlInt(this.fd, KVM_CREATE_IRQCHIP, 0);
      const pit = new Uint8Array(KVM_PIT_CONFIG_SIZE);
      new DataView(pit.buffer).setUint32(0, KVM_PIT_SPEAKER_DUMMY, true); // flags
      kvmIoctl(this.fd, KVM_CREATE_PIT2, pit);
      this.#setPcRouting();
    } catch (e) {
      closeFd(this.fd); // the caller never gets this object, so nothing else would close it
      throw e;
    }
  }

  /**
   * The usual PC interrupt routing: ISA IRQs 0..15 to both PICs and to the same IOAPIC
   * pin, except IRQ 0 (the PIT), which reaches IOAPIC pin 2; GSIs 16..23 to the IOAPIC.
   * KVM's default routes GSI 0 to pin 0, which is not what an MP table or MADT says.
   */
  #setPcRouting(): void {
    const entries: { gsi: number; chip: number; pin: number }[] = [];
    for (let gsi = 0; gsi < IOAPIC_PINS; gsi++) {
      if (gsi < PIC_IRQS) {
        const chip = gsi < PIC_IRQS_PER_CHIP ? KVM_IRQCHIP_PIC_MASTER : KVM_IRQCHIP_PIC_SLAVE;
        if (gsi !== PIC_CASCADE_IRQ) entries.push({ gsi, chip, pin: gsi % PIC_IRQS_PER_CHIP });
      }
      const pin = gsi === 0 ? PIC_CASCADE_IRQ : gsi;
      if (gsi !== PIC_CASCADE_IRQ) entries.push({ gsi, chip: KVM_IRQCHIP_IOAPIC, pin });
    }
    kvmIoctl(this.fd, KVM_SET_GSI_ROUTING, irqRoutingStruct(entries));
  }

  /** Add every region of guest RAM as a memory slot. */
  addGuestMemory(mem: GuestMemory): void {
    for (const d of mem.descriptors) this.addSlot(d.guestBase, d.size, d.hostAddr, false);
  }

  /** Install host memory at a guest address; returns the slot number. */
  addSlot(guestAddr: number, size: number, hostAddr: bigint, readonly: boolean): number {
    const slot = this.#freeSlots.pop() ?? this.#nextSlot++;
    if (slot >= this.maxSlots) throw new HostError(`KVM memory slots exhausted (${this.maxSlots})`);
    const flags = readonly ? KVM_MEM_READONLY : 0;
    kvmIoctl(this.fd, KVM_SET_USER_MEMORY_REGION, memoryRegion(slot, flags, guestAddr, size, hostAddr));
    this.#slots.set(slot, { guestAddr, size, hostAddr, readonly });
    return slot;
  }

  /** Remove a slot (size 0 deletes it) and make its number reusable. */
  removeSlot(slot: number): void {
    const s = this.#slots.get(slot);
    if (!s) return;
    kvmIoctl(this.fd, KVM_SET_USER_MEMORY_REGION, memoryRegion(slot, 0, s.guestAddr, 0, s.hostAddr));
    this.#slots.delete(slot);
    this.#freeSlots.push(slot);
  }

  createVcpu(id: number): number {
    return kvmIoctlInt(this.fd, KVM_CREATE_VCPU, id);
  }

  /** KVM_CHECK_EXTENSION on the VM fd: what this VM may use (KVM_CAP_XSAVE2's size counts its own permissions). */
  checkExtension(cap: number): number {
    return kvmIoctlInt(this.fd, KVM_CHECK_EXTENSION, cap);
  }

  /**
   * The VM-wide state ("kvm-vm", version 1): both PICs and the IOAPIC (KVM_GET_IRQCHIP: the 512-byte chip
   * union of each), the PIT (KVM_GET_PIT2) and the KVM clock (KVM_GET_CLOCK). The vCPUs must be paused.
   */
  saveState(): DeviceState {
    const data: { [key: string]: StateValue } = {};
    for (const [field, chip] of IRQCHIPS) {
      const buf = new Uint8Array(KVM_IRQCHIP_SIZE);
      new DataView(buf.buffer).setUint32(IRQCHIP_CHIP_ID, chip, true);
      kvmIoctl(this.fd, KVM_GET_IRQCHIP, buf);
      data[field] = buf.slice(IRQCHIP_CHIP);
    }
    data.pit = new Uint8Array(KVM_PIT_STATE2_SIZE);
    kvmIoctl(this.fd, KVM_GET_PIT2, data.pit);
    const clock = new Uint8Array(KVM_CLOCK_DATA_SIZE);
    kvmIoctl(this.fd, KVM_GET_CLOCK, clock);
    data.clock = `0x${new DataView(clock.buffer).getBigUint64(CLOCK_DATA_CLOCK, true).toString(16)}`;
    return { type: VM_STATE_TYPE, version: VM_STATE_VERSION, data };
  }

  /**
   * Put a "kvm-vm" record into this VM before any vCPU runs: the irqchips, the PIT, and the KVM clock, set to
   * the saved value (KVM_SET_CLOCK with no flags: the clock goes on from there; KVM_CLOCK_REALTIME would add
   * the wall time since the save, and kernels before 5.16 refuse any flag). `restoreVcpus` restores the vCPUs'
   * own state after the irqchips and the clock and before the PIT. The record is checked whole first; a bad
   * one, or state KVM refuses, is a StateError of one line.
   */
  restoreState(state: DeviceState, restoreVcpus: () => void = () => {}): void {
    const d = stateRecord(stateData(state, VM_STATE_TYPE, VM_STATE_VERSION), "kvm-vm state");
    const chips = IRQCHIPS.map(([field, chip]) => {
      const buf = new Uint8Array(KVM_IRQCHIP_SIZE);
      new DataView(buf.buffer).setUint32(IRQCHIP_CHIP_ID, chip, true);
      buf.set(stateBytes(d[field], `kvm-vm ${field}`, IRQCHIP_CHIP_SIZE), IRQCHIP_CHIP);
      return buf;
    });
    const pit = stateBytes(d.pit, "kvm-vm pit", KVM_PIT_STATE2_SIZE).slice();
    const clockText = stateString(d.clock, "kvm-vm clock");
    if (!CLOCK_VALUE.test(clockText)) throw new StateError(`kvm-vm clock: "${clockText}" is not a u64`);
    const clock = new Uint8Array(KVM_CLOCK_DATA_SIZE);
    const cv = new DataView(clock.buffer);
    cv.setBigUint64(CLOCK_DATA_CLOCK, BigInt(clockText), true);
    cv.setUint32(CLOCK_DATA_FLAGS, 0, true);
    const set = (req: number, arg: Uint8Array) => {
      try {
        kvmIoctl(this.fd, req, arg);
      } catch (e) {
        if (e instanceof KvmError) throw new StateError(`kvm-vm: KVM refused the saved state: ${e.message}`);
        throw e;
      }
    };
    for (const chip of chips) set(KVM_SET_IRQCHIP, chip);
    set(KVM_SET_CLOCK, clock);
    restoreVcpus();
    // The PIT last: it starts counting when loaded, and in KVM's reinject mode it injects its next interrupt
    // only after the guest acknowledged the previous one. An interrupt it raised before the vCPUs' local
    // APICs were restored would be overwritten by them, never acknowledged, and the PIT would stop for good.
    set(KVM_SET_PIT2, pit);
  }

  /** Raise or lower a GSI line (used for edge pulses of legacy devices). */
  setIrqLine(gsi: number, level: boolean): void {
    kvmIoctl(this.fd, KVM_IRQ_LINE, irqLevelStruct(gsi, level ? 1 : 0));
  }

  /** A short pulse on a GSI: an edge for edge-triggered ISA interrupts. */
  pulseIrq(gsi: number): void {
    this.setIrqLine(gsi, true);
    this.setIrqLine(gsi, false);
  }

  /** Writes to eventfd `fd` raise GSI `gsi` (KVM_IRQFD). */
  registerIrqfd(fd: number, gsi: number): void {
    kvmIoctl(this.fd, KVM_IRQFD, irqfdStruct(fd, gsi));
  }

  /** Guest writes of `len` bytes equal to `datamatch` at `addr` signal eventfd `fd` (KVM_IOEVENTFD). */
  registerIoeventfd(fd: number, addr: number, len: number, datamatch?: number, pio = false): void {
    let flags = pio ? KVM_IOEVENTFD_FLAG_PIO : 0;
    if (datamatch !== undefined) flags |= KVM_IOEVENTFD_FLAG_DATAMATCH;
    kvmIoctl(this.fd, KVM_IOEVENTFD, ioeventfdStruct(addr, len, fd, flags, BigInt(datamatch ?? 0)));
  }

  close(): void {
    closeFd(this.fd);
  }
}

/** What the builder, the device manager and Machine use of a VM (KvmVm, or a stand-in in tests). */
export type VmHandle = Pick<
  KvmVm,
  | "addGuestMemory"
  | "addSlot"
  | "removeSlot"
  | "pulseIrq"
  | "registerIrqfd"
  | "registerIoeventfd"
  | "createVcpu"
  | "saveState"
  | "restoreState"
  | "close"
>;
