// vCPU set-up before the first KVM_RUN: CPUID with APIC ids and topology, MSRs,
// FPU, local APIC LINT0/LINT1, and the 64-bit entry state (GDT, page tables,
// segment and control registers). Everything here runs on the main thread.

import {
  APIC_LVT_LINT0,
  APIC_LVT_LINT1,
  CPUID_EAX,
  CPUID_EBX,
  CPUID_ECX,
  CPUID_EDX,
  CPUID_FUNCTION,
  CPUID_INDEX,
  DTABLE_BASE,
  DTABLE_LIMIT,
  FPU_FCW,
  FPU_MXCSR,
  KVM_CPUID2_HEADER_SIZE,
  KVM_CPUID_ENTRY2_SIZE,
  KVM_FPU_SIZE,
  KVM_GET_LAPIC,
  KVM_GET_REGS,
  KVM_GET_SREGS,
  KVM_LAPIC_STATE_SIZE,
  KVM_REGS_SIZE,
  KVM_SET_CPUID2,
  KVM_SET_FPU,
  KVM_SET_LAPIC,
  KVM_SET_MSRS,
  KVM_SET_REGS,
  KVM_SET_SREGS,
  KVM_SREGS_SIZE,
  kvmIoctl,
  msrsStruct,
  REG_NAMES,
  regOffset,
  SEG_BASE,
  SEG_DB,
  SEG_DPL,
  SEG_G,
  SEG_L,
  SEG_LIMIT,
  SEG_PRESENT,
  SEG_S,
  SEG_SELECTOR,
  SEG_TYPE,
  type SegmentName,
  SREGS_CR0,
  SREGS_CR3,
  SREGS_CR4,
  SREGS_EFER,
  SREGS_GDT,
  SREGS_IDT,
  sregsSegmentOffset,
} from "../../ffi/kvm.ts";
import {
  BOOT_GDT_ENTRIES,
  BOOT_GDT_START,
  BOOT_IDT_START,
  BOOT_STACK_POINTER,
  IDENTITY_MAP_SIZE,
  MiB,
  PDE_START,
  PDPTE_START,
  PML4_START,
  ZERO_PAGE_START,
} from "./layout.ts";
import type { GuestMemory } from "../../core/memory.ts";
import { ACPI_MAX_CPUS } from "./acpi.ts";
import { MPTABLE_MAX_CPUS } from "./mptable.ts";

/** The most vCPUs a VM can have: as many as both the MP table and the ACPI MADT describe. */
export const MAX_VCPUS = Math.min(MPTABLE_MAX_CPUS, ACPI_MAX_CPUS);

// ---- CPUID (Intel SDM vol. 2A, CPUID instruction) ----
const CPUID_LEAF_FEATURES = 0x1;
const CPUID_LEAF_CACHE_PARAMS = 0x4;
const CPUID_LEAF_TOPOLOGY = 0xb;
const CPUID_LEAF_TOPOLOGY_V2 = 0x1f;
/** Leaf 1 EBX: initial APIC id in bits 31..24, logical processor count in 23..16, CLFLUSH size in 15..8. */
const LEAF1_EBX_APIC_ID_SHIFT = 24;
const LEAF1_EBX_COUNT_SHIFT = 16;
/** Leaf 1 ECX bit 31: running under a hypervisor; bit 13: CMPXCHG16B. EDX bit 28: HTT. */
const LEAF1_ECX_HYPERVISOR = 1 << 31;
const LEAF1_ECX_CX16 = 1 << 13;
/**
 * Leaf 1 ECX bit 24: the LAPIC timer has TSC-deadline mode. KVM_GET_SUPPORTED_CPUID of kernels before 6.x leaves it
 * clear (newer ones report it); the VMM sets it when KVM_CAP_TSC_DEADLINE_TIMER says the in-kernel LAPIC emulates it (crosvm x86_64/src/cpuid.rs).
 */
const LEAF1_ECX_TSC_DEADLINE = 1 << 24;
/** Leaf 1 ECX bit 26: XSAVE; bit 27: OSXSAVE (reflects CR4, left as KVM reports); bit 28: AVX. */
const LEAF1_ECX_XSAVE = 1 << 26;
const LEAF1_ECX_AVX = 1 << 28;
const LEAF1_EDX_HTT = 1 << 28;
/** Leaf 4 EAX: cores per package - 1 in 31..26, threads sharing this cache - 1 in 25..14, cache level in 7..5. */
const LEAF4_EAX_CORES_SHIFT = 26;
const LEAF4_EAX_SHARING_SHIFT = 14;
const LEAF4_EAX_SHARING_MASK = 0xfff;
const LEAF4_EAX_LEVEL_SHIFT = 5;
const LEAF4_EAX_LEVEL_MASK = 0x7;
/** Leaf 0xB/0x1F ECX: level type in 15..8 (1 SMT, 2 core), level number in 7..0. */
const TOPOLOGY_LEVEL_SMT = 1;
const TOPOLOGY_LEVEL_CORE = 2;
const TOPOLOGY_TYPE_SHIFT = 8;

export interface CpuidOptions {
  /** This vCPU's APIC id (= its index). */
  apicId: number;
  /** vCPUs in the VM: one package, one thread per core. */
  cpuCount: number;
  /** Hide CMPXCHG16B: the kvm_pvm instruction emulator lacks it (docs/testing.md). */
  hideCx16: boolean;
  /**
   * Hide XSAVE (and so AVX, which needs it): the kvm_pvm emulator lacks xsave/xrstor, which Linux
   * otherwise uses for every context switch (a kernel there needs `noxsave` otherwise).
   */
  hideXsave?: boolean;
  /** Announce the LAPIC timer's TSC-deadline mode (KVM_CAP_TSC_DEADLINE_TIMER). */
  tscDeadline?: boolean;
}

/** Adjust KVM's supported CPUID for one vCPU; returns a new struct kvm_cpuid2. */
export function vcpuCpuid(supported: Uint8Array, o: CpuidOptions): Uint8Array<ArrayBuffer> {
  const buf = supported.slice();
  const v = new DataView(buf.buffer);
  const n = v.getUint32(0, true);
  const coreBits = Math.ceil(Math.log2(Math.max(1, o.cpuCount)));
  for (let i = 0; i < n; i++) {
    const e = KVM_CPUID2_HEADER_SIZE + i * KVM_CPUID_ENTRY2_SIZE;
    const fn = v.getUint32(e + CPUID_FUNCTION, true);
    const index = v.getUint32(e + CPUID_INDEX, true);
    const get = (r: number) => v.getUint32(e + r, true);
    const set = (r: number, x: number) => v.setUint32(e + r, x >>> 0, true);
    switch (fn) {
      case CPUID_LEAF_FEATURES: {
        set(
          CPUID_EBX,
          (get(CPUID_EBX) & 0xffff) | (o.apicId << LEAF1_EBX_APIC_ID_SHIFT) | (o.cpuCount << LEAF1_EBX_COUNT_SHIFT),
        );
        let ecx = get(CPUID_ECX) | LEAF1_ECX_HYPERVISOR;
        if (o.hideCx16) ecx &= ~LEAF1_ECX_CX16;
        if (o.tscDeadline) ecx |= LEAF1_ECX_TSC_DEADLINE;
        if (o.hideXsave) ecx &= ~(LEAF1_ECX_XSAVE | LEAF1_ECX_AVX);
        set(CPUID_ECX, ecx);
        let edx = get(CPUID_EDX);
        edx = o.cpuCount > 1 ? edx | LEAF1_EDX_HTT : edx & ~LEAF1_EDX_HTT;
        set(CPUID_EDX, edx);
        break;
      }
      case CPUID_LEAF_CACHE_PARAMS: {
        const eax = get(CPUID_EAX);
        if ((eax & 0x1f) === 0) break; // no cache at this subleaf
        const level = (eax >> LEAF4_EAX_LEVEL_SHIFT) & LEAF4_EAX_LEVEL_MASK;
        const sharing = level >= 3 ? o.cpuCount - 1 : 0;
        const keep = eax & ((1 << LEAF4_EAX_SHARING_SHIFT) - 1);
        set(
          CPUID_EAX,
          keep | ((sharing & LEAF4_EAX_SHARING_MASK) << LEAF4_EAX_SHARING_SHIFT) |
            ((o.cpuCount - 1) << LEAF4_EAX_CORES_SHIFT),
        );
        break;
      }
      case CPUID_LEAF_TOPOLOGY:
      case CPUID_LEAF_TOPOLOGY_V2: {
        set(CPUID_EDX, o.apicId);
        if (index === 0) {
          set(CPUID_EAX, 0);
          set(CPUID_EBX, 1);
          set(CPUID_ECX, (TOPOLOGY_LEVEL_SMT << TOPOLOGY_TYPE_SHIFT) | index);
        } else if (index === 1) {
          set(CPUID_EAX, coreBits);
          set(CPUID_EBX, o.cpuCount);
          set(CPUID_ECX, (TOPOLOGY_LEVEL_CORE << TOPOLOGY_TYPE_SHIFT) | index);
        } else {
          set(CPUID_EAX, 0);
          set(CPUID_EBX, 0);
          set(CPUID_ECX, index);
        }
        break;
      }
    }
  }
  return buf;
}

/** Leaf-1 EBX APIC id read back from a kvm_cpuid2 (for tests and logs). */
export function cpuidEntry(buf: Uint8Array, fn: number, index = 0): [number, number, number, number] | undefined {
  const v = new DataView(buf.buffer, buf.byteOffset);
  const n = v.getUint32(0, true);
  for (let i = 0; i < n; i++) {
    const e = KVM_CPUID2_HEADER_SIZE + i * KVM_CPUID_ENTRY2_SIZE;
    if (v.getUint32(e + CPUID_FUNCTION, true) === fn && v.getUint32(e + CPUID_INDEX, true) === index) {
      return [CPUID_EAX, CPUID_EBX, CPUID_ECX, CPUID_EDX].map((r) => v.getUint32(e + r, true)) as [
        number,
        number,
        number,
        number,
      ];
    }
  }
  return undefined;
}

export function setCpuid(vcpuFd: number, cpuid: Uint8Array): void {
  kvmIoctl(vcpuFd, KVM_SET_CPUID2, cpuid);
}

// ---- MSRs (Linux arch/x86/include/asm/msr-index.h) ----
const MSR_IA32_TSC = 0x10;
const MSR_IA32_SYSENTER_CS = 0x174;
const MSR_IA32_SYSENTER_ESP = 0x175;
const MSR_IA32_SYSENTER_EIP = 0x176;
const MSR_IA32_MISC_ENABLE = 0x1a0;
const MSR_MTRR_DEF_TYPE = 0x2ff;
const MSR_STAR = 0xc0000081;
const MSR_LSTAR = 0xc0000082;
const MSR_CSTAR = 0xc0000083;
const MSR_SYSCALL_MASK = 0xc0000084;
const MSR_KERNEL_GS_BASE = 0xc0000102;
/** IA32_MISC_ENABLE bit 0: fast string operations. */
const MISC_ENABLE_FAST_STRING = 1n;
/** MTRRdefType: enable MTRRs (bit 11), default type write-back (6). */
const MTRR_ENABLE = 1n << 11n;
const MTRR_TYPE_WRBACK = 6n;

/** Set the boot MSRs; returns the indices KVM refused (the caller logs them once). */
export function setBootMsrs(vcpuFd: number): string[] {
  const entries: [number, bigint][] = [
    [MSR_IA32_SYSENTER_CS, 0n],
    [MSR_IA32_SYSENTER_ESP, 0n],
    [MSR_IA32_SYSENTER_EIP, 0n],
    [MSR_STAR, 0n],
    [MSR_CSTAR, 0n],
    [MSR_KERNEL_GS_BASE, 0n],
    [MSR_SYSCALL_MASK, 0n],
    [MSR_LSTAR, 0n],
    [MSR_IA32_TSC, 0n],
    [MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING],
    [MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRBACK],
  ];
  // KVM_SET_MSRS stops at the first MSR it refuses and returns how many it set: set the rest one by one
  // so that one MSR a host's KVM lacks (some lack MTRRs) costs only that MSR.
  const set = kvmIoctl(vcpuFd, KVM_SET_MSRS, msrsStruct(entries));
  const refused: string[] = [];
  for (const entry of entries.slice(set + 1)) {
    if (kvmIoctl(vcpuFd, KVM_SET_MSRS, msrsStruct([entry])) !== 1) refused.push(`0x${entry[0].toString(16)}`);
  }
  if (set < entries.length) refused.unshift(`0x${entries[set][0].toString(16)}`);
  return refused;
}

// ---- FPU (Intel SDM vol. 1, 8.1.5 and 10.2.3: power-up values) ----
const FPU_DEFAULT_FCW = 0x37f;
const FPU_DEFAULT_MXCSR = 0x1f80;

export function setBootFpu(vcpuFd: number): void {
  const fpu = new Uint8Array(KVM_FPU_SIZE);
  const v = new DataView(fpu.buffer);
  v.setUint16(FPU_FCW, FPU_DEFAULT_FCW, true);
  v.setUint32(FPU_MXCSR, FPU_DEFAULT_MXCSR, true);
  kvmIoctl(vcpuFd, KVM_SET_FPU, fpu);
}

// ---- Local APIC LVT (Intel SDM vol. 3A, 11.5.1): delivery mode in bits 10..8 ----
const APIC_DELIVERY_MODE_SHIFT = 8;
const APIC_DELIVERY_MODE_MASK = 0x7 << APIC_DELIVERY_MODE_SHIFT;
const APIC_MODE_NMI = 0x4;
const APIC_MODE_EXTINT = 0x7;

/** LINT0 delivers the PIC's ExtINT, LINT1 delivers NMI, as on a PC. */
export function setLapicLints(vcpuFd: number): void {
  const lapic = new Uint8Array(KVM_LAPIC_STATE_SIZE);
  kvmIoctl(vcpuFd, KVM_GET_LAPIC, lapic);
  const v = new DataView(lapic.buffer);
  const mode = (off: number, m: number) =>
    v.setUint32(off, (v.getUint32(off, true) & ~APIC_DELIVERY_MODE_MASK) | (m << APIC_DELIVERY_MODE_SHIFT), true);
  mode(APIC_LVT_LINT0, APIC_MODE_EXTINT);
  mode(APIC_LVT_LINT1, APIC_MODE_NMI);
  kvmIoctl(vcpuFd, KVM_SET_LAPIC, lapic);
}

// ---- 64-bit entry state ----

/** GDT entries (Intel SDM vol. 3A, 3.4.5): flags word as crosvm and Firecracker write it. */
const GDT_FLAGS_CODE64 = 0xa09b; // G, L, P, DPL0, S, type 0xb (execute/read, accessed)
const GDT_FLAGS_DATA = 0xc093; // G, D/B, P, DPL0, S, type 3 (read/write, accessed)
const GDT_FLAGS_TSS = 0x808b; // G, P, DPL0, type 0xb (busy 64-bit TSS)
/** Selectors of the boot GDT entries (index * 8). */
export const BOOT_CODE_SELECTOR = 0x08;
export const BOOT_DATA_SELECTOR = 0x10;
export const BOOT_TSS_SELECTOR = 0x18;
const GDT_ENTRY_SIZE = 8;

function gdtEntry(flags: number, base: number, limit: number): bigint {
  const b = BigInt(base), l = BigInt(limit), f = BigInt(flags);
  return ((b & 0xff000000n) << 32n) | ((f & 0x0000f0ffn) << 40n) | ((l & 0x000f0000n) << 32n) |
    ((b & 0x00ffffffn) << 16n) | (l & 0x0000ffffn);
}

/** Control register and EFER bits (Intel SDM vol. 3A, 2.5 and 2.2.1). */
const X86_CR0_PE = 0x1;
const X86_CR0_ET = 0x10;
const X86_CR0_PG = 0x80000000;
const X86_CR4_PAE = 0x20;
const EFER_LME = 0x100;
const EFER_LMA = 0x400;
/** Page table entry bits (Intel SDM vol. 3A, 4.5): present, writable, page size (2 MiB). */
const PTE_PRESENT = 0x1n;
const PTE_WRITABLE = 0x2n;
const PTE_PAGE_SIZE = 0x80n;
const ENTRIES_PER_TABLE = 512;
const PAGE_TABLE_SIZE = 4096;
const LARGE_PAGE_SIZE = 2 * MiB;
/** RFLAGS bit 1 is reserved and always set. */
const RFLAGS_RESERVED = 2n;

/** Write the boot GDT, an empty IDT and identity page tables (2 MiB pages) for the first 4 GiB. */
export function writeBootTables(mem: GuestMemory): void {
  const gdt = [0n, gdtEntry(GDT_FLAGS_CODE64, 0, 0xfffff), gdtEntry(GDT_FLAGS_DATA, 0, 0xfffff)];
  gdt.push(gdtEntry(GDT_FLAGS_TSS, 0, 0xfffff));
  if (gdt.length !== BOOT_GDT_ENTRIES) throw new Error("boot GDT size mismatch");
  gdt.forEach((e, i) => mem.setU64(BOOT_GDT_START + i * GDT_ENTRY_SIZE, e));
  mem.setU64(BOOT_IDT_START, 0n);

  const directories = IDENTITY_MAP_SIZE / (LARGE_PAGE_SIZE * ENTRIES_PER_TABLE);
  mem.fill(PML4_START, PAGE_TABLE_SIZE);
  mem.fill(PDPTE_START, PAGE_TABLE_SIZE);
  mem.setU64(PML4_START, BigInt(PDPTE_START) | PTE_PRESENT | PTE_WRITABLE);
  for (let d = 0; d < directories; d++) {
    const pd = PDE_START + d * PAGE_TABLE_SIZE;
    mem.setU64(PDPTE_START + d * 8, BigInt(pd) | PTE_PRESENT | PTE_WRITABLE);
    for (let i = 0; i < ENTRIES_PER_TABLE; i++) {
      const phys = BigInt(d * ENTRIES_PER_TABLE + i) * BigInt(LARGE_PAGE_SIZE);
      mem.setU64(pd + i * 8, phys | PTE_PRESENT | PTE_WRITABLE | PTE_PAGE_SIZE);
    }
  }
}

function setSegment(v: DataView, seg: SegmentName, selector: number, flags: number): void {
  const o = sregsSegmentOffset(seg);
  v.setBigUint64(o + SEG_BASE, 0n, true);
  v.setUint32(o + SEG_LIMIT, 0xffffffff, true);
  v.setUint16(o + SEG_SELECTOR, selector, true);
  v.setUint8(o + SEG_TYPE, flags & 0xf);
  v.setUint8(o + SEG_S, (flags >> 4) & 1);
  v.setUint8(o + SEG_DPL, (flags >> 5) & 3);
  v.setUint8(o + SEG_PRESENT, (flags >> 7) & 1);
  v.setUint8(o + SEG_L, (flags >> 13) & 1);
  v.setUint8(o + SEG_DB, (flags >> 14) & 1);
  v.setUint8(o + SEG_G, (flags >> 15) & 1);
}

/** The boot vCPU's registers for a 64-bit kernel entry at `entry` (Linux boot protocol, 64-bit). */
export function setBootRegisters(vcpuFd: number, entry: number): void {
  const sregs = new Uint8Array(KVM_SREGS_SIZE);
  kvmIoctl(vcpuFd, KVM_GET_SREGS, sregs);
  const s = new DataView(sregs.buffer);
  s.setBigUint64(SREGS_GDT + DTABLE_BASE, BigInt(BOOT_GDT_START), true);
  s.setUint16(SREGS_GDT + DTABLE_LIMIT, BOOT_GDT_ENTRIES * GDT_ENTRY_SIZE - 1, true);
  s.setBigUint64(SREGS_IDT + DTABLE_BASE, BigInt(BOOT_IDT_START), true);
  s.setUint16(SREGS_IDT + DTABLE_LIMIT, GDT_ENTRY_SIZE - 1, true);
  setSegment(s, "cs", BOOT_CODE_SELECTOR, GDT_FLAGS_CODE64);
  for (const seg of ["ds", "es", "fs", "gs", "ss"] as const) setSegment(s, seg, BOOT_DATA_SELECTOR, GDT_FLAGS_DATA);
  setSegment(s, "tr", BOOT_TSS_SELECTOR, GDT_FLAGS_TSS);
  s.setBigUint64(SREGS_CR3, BigInt(PML4_START), true);
  s.setBigUint64(SREGS_CR4, BigInt(X86_CR4_PAE), true);
  s.setBigUint64(SREGS_CR0, BigInt(X86_CR0_PE | X86_CR0_ET | X86_CR0_PG) & 0xffffffffn, true);
  s.setBigUint64(SREGS_EFER, BigInt(EFER_LME | EFER_LMA), true);
  kvmIoctl(vcpuFd, KVM_SET_SREGS, sregs);

  const regs = new Uint8Array(KVM_REGS_SIZE);
  const r = new DataView(regs.buffer);
  r.setBigUint64(regOffset("rflags"), RFLAGS_RESERVED, true);
  r.setBigUint64(regOffset("rip"), BigInt(entry), true);
  r.setBigUint64(regOffset("rsp"), BigInt(BOOT_STACK_POINTER), true);
  r.setBigUint64(regOffset("rbp"), BigInt(BOOT_STACK_POINTER), true);
  r.setBigUint64(regOffset("rsi"), BigInt(ZERO_PAGE_START), true);
  kvmIoctl(vcpuFd, KVM_SET_REGS, regs);
}

/** What a register dump needs to know about the host. */
export interface DumpOptions {
  /**
   * The dump follows a triple fault on a host whose KVM resets the vCPU before userspace reads it
   * (kvm_amd: vmm/kvm/host.ts shutdownResetsVcpu). Then a dump showing the reset state says so.
   */
  resetOnShutdown?: boolean;
}

/** A register dump for crash reports: general registers and the control registers. */
export function dumpRegisters(vcpuFd: number, opts: DumpOptions = {}): string {
  const regs = new Uint8Array(KVM_REGS_SIZE);
  const sregs = new Uint8Array(KVM_SREGS_SIZE);
  try {
    kvmIoctl(vcpuFd, KVM_GET_REGS, regs);
    kvmIoctl(vcpuFd, KVM_GET_SREGS, sregs);
  } catch (e) {
    return `registers unavailable: ${(e as Error).message}`;
  }
  const r = new DataView(regs.buffer);
  const s = new DataView(sregs.buffer);
  const hex = (x: bigint) => "0x" + x.toString(16).padStart(16, "0");
  const parts = REG_NAMES.map((n) => `${n}=${hex(r.getBigUint64(regOffset(n), true))}`);
  parts.push(
    `cr0=${hex(s.getBigUint64(SREGS_CR0, true))}`,
    `cr3=${hex(s.getBigUint64(SREGS_CR3, true))}`,
    `cr4=${hex(s.getBigUint64(SREGS_CR4, true))}`,
    `efer=${hex(s.getBigUint64(SREGS_EFER, true))}`,
    `cs=0x${s.getUint16(sregsSegmentOffset("cs") + SEG_SELECTOR, true).toString(16)}`,
  );
  const lines: string[] = [];
  for (let i = 0; i < parts.length; i += 4) lines.push(parts.slice(i, i + 4).join(" "));
  const rip = r.getBigUint64(regOffset("rip"), true);
  const cs = s.getUint16(sregsSegmentOffset("cs") + SEG_SELECTOR, true);
  if (showsLostState(rip, cs, opts)) lines.push(RESET_STATE_NOTE);
  return lines.join("\n");
}

/**
 * True when a dump with this RIP and CS selector shows the reset state in place of the state at the
 * fault: only where KVM resets the vCPU on a shutdown. Elsewhere (VMX, kvm_pvm) a guest that faults at
 * the reset vector shows real registers that happen to be the reset values.
 */
export function showsLostState(rip: bigint, cs: number, opts: DumpOptions): boolean {
  return opts.resetOnShutdown === true && rip === RESET_RIP && cs === RESET_CS_SELECTOR;
}

/**
 * RIP and CS selector of a vCPU after RESET or INIT (Intel SDM vol. 3A, table 10-1 "IA-32 and
 * Intel 64 Processor States Following Power-up, Reset, or INIT"; AMD APM vol. 2, 14.1.3).
 */
const RESET_RIP = 0xfff0n;
const RESET_CS_SELECTOR = 0xf000;

/**
 * Printed under a dump that shows the reset state. On AMD hosts KVM re-initializes a vCPU on a
 * shutdown intercept (arch/x86/kvm/svm/svm.c, shutdown_interception: the VMCB is undefined after
 * SHUTDOWN), so the registers at the fault are gone before userspace can read them.
 */
export const RESET_STATE_NOTE =
  "note: these are the vCPU's reset values; on AMD (SVM) hosts KVM re-initializes a vCPU after a shutdown, so the state at the fault is lost";
