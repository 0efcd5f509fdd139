// The KVM API: every ioctl number and struct layout denovm uses, once.
// Source: Linux include/uapi/linux/kvm.h and arch/x86/include/uapi/asm/kvm.h
// (Debian linux-libc-dev installs them as /usr/include/linux/kvm.h and
// /usr/include/x86_64-linux-gnu/asm/kvm.h). ffi/kvm_test.ts compiles a C
// program against those headers and checks every number here.

import { errno, libc, SysError } from "./libc.ts";

// ---- ioctl number encoding (include/uapi/asm-generic/ioctl.h) ----
const IOC_NRBITS = 8;
const IOC_TYPEBITS = 8;
const IOC_SIZEBITS = 14;
const IOC_NRSHIFT = 0;
const IOC_TYPESHIFT = IOC_NRSHIFT + IOC_NRBITS;
const IOC_SIZESHIFT = IOC_TYPESHIFT + IOC_TYPEBITS;
const IOC_DIRSHIFT = IOC_SIZESHIFT + IOC_SIZEBITS;
const IOC_NONE = 0;
const IOC_WRITE = 1;
const IOC_READ = 2;

function ioc(dir: number, type: number, nr: number, size: number): number {
  return ((dir << IOC_DIRSHIFT) >>> 0) + (size << IOC_SIZESHIFT) + (type << IOC_TYPESHIFT) + (nr << IOC_NRSHIFT);
}
const io = (nr: number) => ioc(IOC_NONE, KVMIO, nr, 0);
const iow = (nr: number, size: number) => ioc(IOC_WRITE, KVMIO, nr, size);
const ior = (nr: number, size: number) => ioc(IOC_READ, KVMIO, nr, size);
const iowr = (nr: number, size: number) => ioc(IOC_READ | IOC_WRITE, KVMIO, nr, size);

/** The KVM ioctl type byte (linux/kvm.h: #define KVMIO 0xAE). */
export const KVMIO = 0xae;
/** KVM_GET_API_VERSION must return this (linux/kvm.h). */
export const KVM_API_VERSION = 12;

// ---- struct sizes (linux/kvm.h, asm/kvm.h) ----
export const KVM_USERSPACE_MEMORY_REGION_SIZE = 32;
export const KVM_PIT_CONFIG_SIZE = 64;
export const KVM_IRQFD_SIZE = 32;
export const KVM_IOEVENTFD_SIZE = 64;
export const KVM_IRQ_LEVEL_SIZE = 8;
export const KVM_REGS_SIZE = 144;
export const KVM_SREGS_SIZE = 312;
export const KVM_FPU_SIZE = 416;
export const KVM_LAPIC_STATE_SIZE = 1024;
export const KVM_MP_STATE_SIZE = 4;
/** struct kvm_msrs header (nmsrs, pad) and one struct kvm_msr_entry. */
export const KVM_MSRS_HEADER_SIZE = 8;
export const KVM_MSR_ENTRY_SIZE = 16;
/** struct kvm_cpuid2 header (nent, padding) and one struct kvm_cpuid_entry2. */
export const KVM_CPUID2_HEADER_SIZE = 8;
export const KVM_CPUID_ENTRY2_SIZE = 40;
/** struct kvm_irq_routing header and one struct kvm_irq_routing_entry. */
export const KVM_IRQ_ROUTING_HEADER_SIZE = 8;
export const KVM_IRQ_ROUTING_ENTRY_SIZE = 48;
/** struct kvm_guest_debug: control u32, pad u32, struct kvm_guest_debug_arch (debugreg[8] u64). */
export const KVM_GUEST_DEBUG_SIZE = 72;
/** struct kvm_msr_list header (nmsrs u32); the u32 indices follow. */
export const KVM_MSR_LIST_HEADER_SIZE = 4;
/**
 * struct kvm_xsave: region[1024] u32. KVM_GET_XSAVE2 and KVM_SET_XSAVE move as many bytes as
 * KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) says (at least this many) when the VM may use larger areas.
 */
export const KVM_XSAVE_SIZE = 4096;
/** struct kvm_xcrs: nr_xcrs u32, flags u32, xcrs[KVM_MAX_XCRS] struct kvm_xcr, padding[16] u64. */
export const KVM_XCRS_SIZE = 392;
/** struct kvm_xcr: xcr u32, reserved u32, value u64. */
export const KVM_XCR_SIZE = 16;
export const KVM_MAX_XCRS = 16;
export const KVM_VCPU_EVENTS_SIZE = 64;
/** struct kvm_debugregs: db[4], dr6, dr7, flags, reserved[9] (all u64). */
export const KVM_DEBUGREGS_SIZE = 128;
/** struct kvm_irqchip: chip_id u32, pad u32, then a 512-byte union (kvm_pic_state or kvm_ioapic_state). */
export const KVM_IRQCHIP_SIZE = 520;
export const KVM_PIC_STATE_SIZE = 16;
export const KVM_IOAPIC_STATE_SIZE = 216;
/** struct kvm_pit_state2: channels[3] struct kvm_pit_channel_state, flags u32, reserved[9] u32. */
export const KVM_PIT_STATE2_SIZE = 112;
export const KVM_PIT_CHANNEL_STATE_SIZE = 24;
/** struct kvm_clock_data: clock u64, flags u32, pad0 u32, realtime u64, host_tsc u64, pad[4] u32. */
export const KVM_CLOCK_DATA_SIZE = 48;

// ---- ioctl requests ----
export const KVM_GET_API_VERSION = io(0x00);
export const KVM_CREATE_VM = io(0x01);
export const KVM_CHECK_EXTENSION = io(0x03);
export const KVM_GET_MSR_INDEX_LIST = iowr(0x02, KVM_MSR_LIST_HEADER_SIZE);
export const KVM_GET_VCPU_MMAP_SIZE = io(0x04);
export const KVM_GET_SUPPORTED_CPUID = iowr(0x05, KVM_CPUID2_HEADER_SIZE);
export const KVM_CREATE_VCPU = io(0x41);
export const KVM_SET_USER_MEMORY_REGION = iow(0x46, KVM_USERSPACE_MEMORY_REGION_SIZE);
export const KVM_SET_TSS_ADDR = io(0x47);
export const KVM_SET_IDENTITY_MAP_ADDR = iow(0x48, 8);
export const KVM_CREATE_IRQCHIP = io(0x60);
export const KVM_IRQ_LINE = iow(0x61, KVM_IRQ_LEVEL_SIZE);
export const KVM_GET_IRQCHIP = iowr(0x62, KVM_IRQCHIP_SIZE);
/** linux/kvm.h declares KVM_SET_IRQCHIP with _IOR although it reads the struct: the number follows the header. */
export const KVM_SET_IRQCHIP = ior(0x63, KVM_IRQCHIP_SIZE);
export const KVM_SET_GSI_ROUTING = iow(0x6a, KVM_IRQ_ROUTING_HEADER_SIZE);
export const KVM_IRQFD = iow(0x76, KVM_IRQFD_SIZE);
export const KVM_CREATE_PIT2 = iow(0x77, KVM_PIT_CONFIG_SIZE);
export const KVM_IOEVENTFD = iow(0x79, KVM_IOEVENTFD_SIZE);
export const KVM_SET_CLOCK = iow(0x7b, KVM_CLOCK_DATA_SIZE);
export const KVM_GET_CLOCK = ior(0x7c, KVM_CLOCK_DATA_SIZE);
export const KVM_RUN = io(0x80);
export const KVM_GET_REGS = ior(0x81, KVM_REGS_SIZE);
export const KVM_SET_REGS = iow(0x82, KVM_REGS_SIZE);
export const KVM_GET_SREGS = ior(0x83, KVM_SREGS_SIZE);
export const KVM_SET_SREGS = iow(0x84, KVM_SREGS_SIZE);
export const KVM_GET_MSRS = iowr(0x88, KVM_MSRS_HEADER_SIZE);
export const KVM_SET_MSRS = iow(0x89, KVM_MSRS_HEADER_SIZE);
export const KVM_GET_FPU = ior(0x8c, KVM_FPU_SIZE);
export const KVM_SET_FPU = iow(0x8d, KVM_FPU_SIZE);
export const KVM_GET_LAPIC = ior(0x8e, KVM_LAPIC_STATE_SIZE);
export const KVM_SET_LAPIC = iow(0x8f, KVM_LAPIC_STATE_SIZE);
export const KVM_SET_CPUID2 = iow(0x90, KVM_CPUID2_HEADER_SIZE);
export const KVM_GET_MP_STATE = ior(0x98, KVM_MP_STATE_SIZE);
export const KVM_SET_MP_STATE = iow(0x99, KVM_MP_STATE_SIZE);
export const KVM_SET_GUEST_DEBUG = iow(0x9b, KVM_GUEST_DEBUG_SIZE);
/** KVM_GET_PIT2 and KVM_GET_VCPU_EVENTS share nr 0x9f (SET: 0xa0); the struct sizes make the numbers differ. */
export const KVM_GET_PIT2 = ior(0x9f, KVM_PIT_STATE2_SIZE);
export const KVM_SET_PIT2 = iow(0xa0, KVM_PIT_STATE2_SIZE);
export const KVM_GET_VCPU_EVENTS = ior(0x9f, KVM_VCPU_EVENTS_SIZE);
export const KVM_SET_VCPU_EVENTS = iow(0xa0, KVM_VCPU_EVENTS_SIZE);
export const KVM_GET_DEBUGREGS = ior(0xa1, KVM_DEBUGREGS_SIZE);
export const KVM_SET_DEBUGREGS = iow(0xa2, KVM_DEBUGREGS_SIZE);
export const KVM_GET_XSAVE = ior(0xa4, KVM_XSAVE_SIZE);
export const KVM_SET_XSAVE = iow(0xa5, KVM_XSAVE_SIZE);
export const KVM_GET_XCRS = ior(0xa6, KVM_XCRS_SIZE);
export const KVM_SET_XCRS = iow(0xa7, KVM_XCRS_SIZE);
/** Writes KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) bytes; the number encodes struct kvm_xsave's fixed 4096. */
export const KVM_GET_XSAVE2 = ior(0xcf, KVM_XSAVE_SIZE);

/** Names of the requests, for error messages. */
export const IOCTL_NAMES: Record<number, string> = Object.fromEntries(
  Object.entries({
    KVM_GET_API_VERSION,
    KVM_CREATE_VM,
    KVM_CHECK_EXTENSION,
    KVM_GET_MSR_INDEX_LIST,
    KVM_GET_VCPU_MMAP_SIZE,
    KVM_GET_SUPPORTED_CPUID,
    KVM_CREATE_VCPU,
    KVM_SET_USER_MEMORY_REGION,
    KVM_SET_TSS_ADDR,
    KVM_SET_IDENTITY_MAP_ADDR,
    KVM_CREATE_IRQCHIP,
    KVM_IRQ_LINE,
    KVM_GET_IRQCHIP,
    KVM_SET_IRQCHIP,
    KVM_SET_GSI_ROUTING,
    KVM_IRQFD,
    KVM_CREATE_PIT2,
    KVM_IOEVENTFD,
    KVM_SET_CLOCK,
    KVM_GET_CLOCK,
    KVM_RUN,
    KVM_GET_REGS,
    KVM_SET_REGS,
    KVM_GET_SREGS,
    KVM_SET_SREGS,
    KVM_GET_MSRS,
    KVM_SET_MSRS,
    KVM_GET_FPU,
    KVM_SET_FPU,
    KVM_GET_LAPIC,
    KVM_SET_LAPIC,
    KVM_SET_CPUID2,
    KVM_GET_MP_STATE,
    KVM_SET_MP_STATE,
    KVM_SET_GUEST_DEBUG,
    KVM_GET_PIT2,
    KVM_SET_PIT2,
    KVM_GET_VCPU_EVENTS,
    KVM_SET_VCPU_EVENTS,
    KVM_GET_DEBUGREGS,
    KVM_SET_DEBUGREGS,
    KVM_GET_XSAVE,
    KVM_SET_XSAVE,
    KVM_GET_XCRS,
    KVM_SET_XCRS,
    KVM_GET_XSAVE2,
  }).map(([k, v]) => [v, k]),
);

// ---- capabilities (KVM_CHECK_EXTENSION arguments) ----
export const KVM_CAP_IRQCHIP = 0;
export const KVM_CAP_USER_MEMORY = 3;
export const KVM_CAP_SET_TSS_ADDR = 4;
export const KVM_CAP_NR_VCPUS = 9;
export const KVM_CAP_NR_MEMSLOTS = 10;
export const KVM_CAP_MP_STATE = 14;
export const KVM_CAP_IRQFD = 32;
export const KVM_CAP_SET_GUEST_DEBUG = 23;
export const KVM_CAP_PIT2 = 33;
export const KVM_CAP_PIT_STATE2 = 35;
export const KVM_CAP_IOEVENTFD = 36;
/** KVM_GET_CLOCK/KVM_SET_CLOCK; the answer is the KVM_CLOCK_* flags KVM_GET_CLOCK may report. */
export const KVM_CAP_ADJUST_CLOCK = 39;
export const KVM_CAP_VCPU_EVENTS = 41;
export const KVM_CAP_DEBUGREGS = 50;
export const KVM_CAP_XSAVE = 55;
export const KVM_CAP_XCRS = 56;
export const KVM_CAP_MAX_VCPUS = 66;
/** The in-kernel LAPIC's timer has TSC-deadline mode (MSR_IA32_TSC_DEADLINE): the VMM may announce it in CPUID. */
export const KVM_CAP_TSC_DEADLINE_TIMER = 72;
export const KVM_CAP_READONLY_MEM = 81;
export const KVM_CAP_IMMEDIATE_EXIT = 136;
/** KVM_GET_XSAVE2; the answer (on the VM fd) is the size of the XSAVE area in bytes, at least KVM_XSAVE_SIZE. */
export const KVM_CAP_XSAVE2 = 208;

// ---- flags ----
/** kvm_pit_config.flags: speaker port dummy (linux/kvm.h). */
export const KVM_PIT_SPEAKER_DUMMY = 1;
/** kvm_userspace_memory_region.flags. */
export const KVM_MEM_READONLY = 1 << 1;
/** kvm_irqfd.flags. */
export const KVM_IRQFD_FLAG_DEASSIGN = 1 << 0;
export const KVM_IRQFD_FLAG_RESAMPLE = 1 << 1;
/** kvm_ioeventfd.flags (1 << kvm_ioeventfd_flag_nr_*). */
export const KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0;
export const KVM_IOEVENTFD_FLAG_PIO = 1 << 1;
export const KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2;
/** kvm_irq_routing_entry.type. */
export const KVM_IRQ_ROUTING_IRQCHIP = 1;
/** In-kernel irqchip ids (asm/kvm.h). */
export const KVM_IRQCHIP_PIC_MASTER = 0;
export const KVM_IRQCHIP_PIC_SLAVE = 1;
export const KVM_IRQCHIP_IOAPIC = 2;
/** KVM_IOAPIC_NUM_PINS (asm/kvm.h): redirection entries in struct kvm_ioapic_state. */
export const KVM_IOAPIC_NUM_PINS = 24;
/** kvm_clock_data.flags (linux/kvm.h). */
export const KVM_CLOCK_TSC_STABLE = 2;
export const KVM_CLOCK_REALTIME = 1 << 2;
export const KVM_CLOCK_HOST_TSC = 1 << 3;
/** kvm_vcpu_events.flags: which fields KVM_SET_VCPU_EVENTS takes (asm/kvm.h). */
export const KVM_VCPUEVENT_VALID_NMI_PENDING = 0x00000001;
export const KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x00000002;
export const KVM_VCPUEVENT_VALID_SHADOW = 0x00000004;
export const KVM_VCPUEVENT_VALID_SMM = 0x00000008;
/** kvm_mp_state values. */
export const KVM_MP_STATE_RUNNABLE = 0;
export const KVM_MP_STATE_UNINITIALIZED = 1;
export const KVM_MP_STATE_INIT_RECEIVED = 2;
export const KVM_MP_STATE_HALTED = 3;
export const KVM_MP_STATE_SIPI_RECEIVED = 4;

/** kvm_guest_debug.control (linux/kvm.h; the hardware-breakpoint and injection bits from asm/kvm.h). */
export const KVM_GUESTDBG_ENABLE = 0x00000001;
export const KVM_GUESTDBG_SINGLESTEP = 0x00000002;
export const KVM_GUESTDBG_USE_SW_BP = 0x00010000;
export const KVM_GUESTDBG_USE_HW_BP = 0x00020000;
/** The x86 debug registers KVM takes in kvm_guest_debug_arch.debugreg: DR0-DR3 addresses, DR7 the control. */
export const GUEST_DEBUG_ADDRESS_REGISTERS = 4;
export const GUEST_DEBUG_DR7_INDEX = 7;

// ---- exits (kvm_run.exit_reason) ----
export const KVM_EXIT_UNKNOWN = 0;
export const KVM_EXIT_EXCEPTION = 1;
export const KVM_EXIT_IO = 2;
export const KVM_EXIT_HYPERCALL = 3;
export const KVM_EXIT_DEBUG = 4;
export const KVM_EXIT_HLT = 5;
export const KVM_EXIT_MMIO = 6;
export const KVM_EXIT_IRQ_WINDOW_OPEN = 7;
export const KVM_EXIT_SHUTDOWN = 8;
export const KVM_EXIT_FAIL_ENTRY = 9;
export const KVM_EXIT_INTR = 10;
export const KVM_EXIT_INTERNAL_ERROR = 17;
export const KVM_EXIT_SYSTEM_EVENT = 24;
/** kvm_run.io.direction. */
export const KVM_EXIT_IO_IN = 0;
export const KVM_EXIT_IO_OUT = 1;
/** kvm_run.system_event.type. */
export const KVM_SYSTEM_EVENT_SHUTDOWN = 1;
export const KVM_SYSTEM_EVENT_RESET = 2;
export const KVM_SYSTEM_EVENT_CRASH = 3;

// ---- struct kvm_run field offsets (linux/kvm.h) ----
export const RUN_REQUEST_INTERRUPT_WINDOW = 0;
export const RUN_IMMEDIATE_EXIT = 1;
export const RUN_EXIT_REASON = 8;
export const RUN_IF_FLAG = 13;
/** Start of the exit-specific union. */
export const RUN_UNION = 32;
export const RUN_IO_DIRECTION = RUN_UNION + 0;
export const RUN_IO_SIZE = RUN_UNION + 1;
export const RUN_IO_PORT = RUN_UNION + 2;
export const RUN_IO_COUNT = RUN_UNION + 4;
export const RUN_IO_DATA_OFFSET = RUN_UNION + 8;
export const RUN_MMIO_PHYS_ADDR = RUN_UNION + 0;
export const RUN_MMIO_DATA = RUN_UNION + 8;
/** mmio.data is __u8 data[8]. */
export const RUN_MMIO_DATA_BYTES = 8;
export const RUN_MMIO_LEN = RUN_UNION + 16;
export const RUN_MMIO_IS_WRITE = RUN_UNION + 20;
export const RUN_FAIL_ENTRY_REASON = RUN_UNION + 0;
export const RUN_INTERNAL_SUBERROR = RUN_UNION + 0;
export const RUN_INTERNAL_NDATA = RUN_UNION + 4;
export const RUN_INTERNAL_DATA = RUN_UNION + 8;
export const RUN_SYSTEM_EVENT_TYPE = RUN_UNION + 0;
/** kvm_run.debug.arch, struct kvm_debug_exit_arch: exception u32, pad u32, pc u64, dr6 u64, dr7 u64. */
export const RUN_DEBUG_EXCEPTION = RUN_UNION + 0;
export const RUN_DEBUG_PC = RUN_UNION + 8;
export const RUN_DEBUG_DR6 = RUN_UNION + 16;
export const RUN_DEBUG_DR7 = RUN_UNION + 24;

// ---- struct kvm_regs (asm/kvm.h): 18 __u64 in this order ----
export const REG_NAMES = [
  "rax",
  "rbx",
  "rcx",
  "rdx",
  "rsi",
  "rdi",
  "rsp",
  "rbp",
  "r8",
  "r9",
  "r10",
  "r11",
  "r12",
  "r13",
  "r14",
  "r15",
  "rip",
  "rflags",
] as const;
export type RegName = typeof REG_NAMES[number];
export const regOffset = (r: RegName) => REG_NAMES.indexOf(r) * 8;

// ---- struct kvm_sregs (asm/kvm.h) ----
/** struct kvm_segment: base u64, limit u32, selector u16, type, present, dpl, db, s, l, g, avl, unusable, padding u8. */
export const KVM_SEGMENT_SIZE = 24;
export const SEG_BASE = 0;
export const SEG_LIMIT = 8;
export const SEG_SELECTOR = 12;
export const SEG_TYPE = 14;
export const SEG_PRESENT = 15;
export const SEG_DPL = 16;
export const SEG_DB = 17;
export const SEG_S = 18;
export const SEG_L = 19;
export const SEG_G = 20;
export const SEG_AVL = 21;
export const SEG_UNUSABLE = 22;
/** Segments in kvm_sregs order: cs, ds, es, fs, gs, ss, tr, ldt. */
export const SREGS_SEGMENTS = ["cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"] as const;
export type SegmentName = typeof SREGS_SEGMENTS[number];
export const sregsSegmentOffset = (s: SegmentName) => SREGS_SEGMENTS.indexOf(s) * KVM_SEGMENT_SIZE;
/** struct kvm_dtable: base u64, limit u16, padding[3] u16. */
export const SREGS_GDT = 192;
export const SREGS_IDT = 208;
export const DTABLE_BASE = 0;
export const DTABLE_LIMIT = 8;
export const SREGS_CR0 = 224;
export const SREGS_CR2 = 232;
export const SREGS_CR3 = 240;
export const SREGS_CR4 = 248;
export const SREGS_CR8 = 256;
export const SREGS_EFER = 264;
export const SREGS_APIC_BASE = 272;

// ---- struct kvm_fpu (asm/kvm.h) ----
export const FPU_FCW = 128;
export const FPU_MXCSR = 408;

// ---- struct kvm_lapic_state: the APIC register page; LVT offsets from the Intel SDM vol. 3 table 11-1 ----
export const APIC_LVT_LINT0 = 0x350;
export const APIC_LVT_LINT1 = 0x360;

// ---- struct kvm_irqchip, kvm_ioapic_state (asm/kvm.h) ----
export const IRQCHIP_CHIP_ID = 0;
/** The chip union: kvm_pic_state or kvm_ioapic_state, padded to 512 bytes. */
export const IRQCHIP_CHIP = 8;
export const IRQCHIP_CHIP_SIZE = KVM_IRQCHIP_SIZE - IRQCHIP_CHIP;
/** kvm_ioapic_state.redirtbl: 24 u64 redirection entries (82093AA datasheet, 3.2.4: vector bits 7..0, mask bit 16). */
export const IOAPIC_REDIRTBL = 24;
export const IOAPIC_REDIRTBL_ENTRY_SIZE = 8;

// ---- struct kvm_pit_state2, kvm_pit_channel_state (asm/kvm.h) ----
export const PIT_STATE2_CHANNELS = 0;
export const PIT_STATE2_FLAGS = 72;
export const PIT_CHANNEL_COUNT = 0;
export const PIT_CHANNEL_RW_MODE = 12;
export const PIT_CHANNEL_MODE = 13;
export const PIT_CHANNEL_GATE = 15;
export const PIT_CHANNEL_COUNT_LOAD_TIME = 16;

// ---- struct kvm_clock_data (linux/kvm.h) ----
export const CLOCK_DATA_CLOCK = 0;
export const CLOCK_DATA_FLAGS = 8;
export const CLOCK_DATA_REALTIME = 16;
export const CLOCK_DATA_HOST_TSC = 24;

// ---- struct kvm_vcpu_events, kvm_xcrs, kvm_msr_list (asm/kvm.h) ----
export const VCPU_EVENTS_NMI_PENDING = 13;
export const VCPU_EVENTS_NMI_MASKED = 14;
export const VCPU_EVENTS_SIPI_VECTOR = 16;
export const VCPU_EVENTS_FLAGS = 20;
export const XCRS_NR_XCRS = 0;
export const XCRS_XCRS = 8;
export const MSR_LIST_INDICES = 4;

// ---- struct kvm_cpuid_entry2 field offsets ----
export const CPUID_FUNCTION = 0;
export const CPUID_INDEX = 4;
export const CPUID_FLAGS = 8;
export const CPUID_EAX = 12;
export const CPUID_EBX = 16;
export const CPUID_ECX = 20;
export const CPUID_EDX = 24;

/** A failed KVM ioctl: carries the request's name and errno text. */
export class KvmError extends SysError {
  constructor(readonly request: string, errnoValue: number) {
    super(request, errnoValue);
    this.name = "KvmError";
  }
}

function requestName(req: number): string {
  return IOCTL_NAMES[req] ?? `ioctl 0x${req.toString(16)}`;
}

/** ioctl with a struct argument; throws KvmError naming the request. Returns the ioctl's result. */
export function kvmIoctl(fd: number, req: number, arg: Uint8Array | null = null): number {
  const ptr = arg ? Deno.UnsafePointer.of(arg as Uint8Array<ArrayBuffer>) : null;
  const r = libc().ioctl(fd, BigInt(req), ptr);
  if (r < 0) throw new KvmError(requestName(req), errno());
  return r;
}

/** ioctl with an integer argument (KVM_CREATE_VCPU, KVM_CHECK_EXTENSION, KVM_SET_TSS_ADDR...). */
export function kvmIoctlInt(fd: number, req: number, arg: number | bigint = 0): number {
  const r = libc().ioctl_int(fd, BigInt(req), BigInt(arg));
  if (r < 0) throw new KvmError(requestName(req), errno());
  return r;
}

/** KVM_RUN as the BigInt the ioctl symbol takes, made once: this call runs on every exit. */
const KVM_RUN_REQUEST = BigInt(KVM_RUN);

/** KVM_RUN without throwing: returns 0 or the errno (EINTR after a kick, EAGAIN after INIT). */
export function kvmRun(vcpuFd: number): number {
  const r = libc().ioctl_int(vcpuFd, KVM_RUN_REQUEST, 0n);
  return r < 0 ? errno() : 0;
}

// ---- struct builders ----

/** struct kvm_userspace_memory_region. */
export function memoryRegion(slot: number, flags: number, guestAddr: number, size: number, hostAddr: bigint) {
  const b = new Uint8Array(KVM_USERSPACE_MEMORY_REGION_SIZE);
  const v = new DataView(b.buffer);
  v.setUint32(0, slot, true); // slot
  v.setUint32(4, flags, true); // flags
  v.setBigUint64(8, BigInt(guestAddr), true); // guest_phys_addr
  v.setBigUint64(16, BigInt(size), true); // memory_size
  v.setBigUint64(24, hostAddr, true); // userspace_addr
  return b;
}

/** struct kvm_irqfd. */
export function irqfdStruct(fd: number, gsi: number, flags = 0, resampleFd = 0) {
  const b = new Uint8Array(KVM_IRQFD_SIZE);
  const v = new DataView(b.buffer);
  v.setUint32(0, fd, true); // fd
  v.setUint32(4, gsi, true); // gsi
  v.setUint32(8, flags, true); // flags
  v.setUint32(12, resampleFd, true); // resamplefd
  return b;
}

/** struct kvm_ioeventfd. */
export function ioeventfdStruct(addr: number, len: number, fd: number, flags: number, datamatch = 0n) {
  const b = new Uint8Array(KVM_IOEVENTFD_SIZE);
  const v = new DataView(b.buffer);
  v.setBigUint64(0, datamatch, true); // datamatch
  v.setBigUint64(8, BigInt(addr), true); // addr
  v.setUint32(16, len, true); // len
  v.setInt32(20, fd, true); // fd
  v.setUint32(24, flags, true); // flags
  return b;
}

/** struct kvm_irq_level: irq u32, level u32. */
export function irqLevelStruct(irq: number, level: number) {
  const b = new Uint8Array(KVM_IRQ_LEVEL_SIZE);
  const v = new DataView(b.buffer);
  v.setUint32(0, irq, true);
  v.setUint32(4, level, true);
  return b;
}

/** struct kvm_msrs with entries. */
export function msrsStruct(entries: [number, bigint][]) {
  const b = new Uint8Array(KVM_MSRS_HEADER_SIZE + entries.length * KVM_MSR_ENTRY_SIZE);
  const v = new DataView(b.buffer);
  v.setUint32(0, entries.length, true); // nmsrs
  entries.forEach(([index, data], i) => {
    const o = KVM_MSRS_HEADER_SIZE + i * KVM_MSR_ENTRY_SIZE;
    v.setUint32(o, index, true); // index
    v.setBigUint64(o + 8, data, true); // data
  });
  return b;
}

/** Field offsets of struct kvm_guest_debug and its eight debug registers. */
export const GUEST_DEBUG_CONTROL = 0;
export const GUEST_DEBUG_DEBUGREG = 8;
export const GUEST_DEBUG_REGISTERS = 8;

/** struct kvm_guest_debug: the control bits and the debug registers DR0-DR7 (only DR0-DR3 and DR7 are used). */
export function guestDebugStruct(control: number, debugreg: readonly bigint[] = []) {
  const b = new Uint8Array(KVM_GUEST_DEBUG_SIZE);
  const v = new DataView(b.buffer);
  v.setUint32(GUEST_DEBUG_CONTROL, control, true);
  debugreg.slice(0, GUEST_DEBUG_REGISTERS).forEach((r, i) => v.setBigUint64(GUEST_DEBUG_DEBUGREG + 8 * i, r, true));
  return b;
}
/** struct kvm_irq_routing with irqchip entries {gsi, irqchip, pin}. */
export function irqRoutingStruct(entries: { gsi: number; chip: number; pin: number }[]) {
  const b = new Uint8Array(KVM_IRQ_ROUTING_HEADER_SIZE + entries.length * KVM_IRQ_ROUTING_ENTRY_SIZE);
  const v = new DataView(b.buffer);
  v.setUint32(0, entries.length, true); // nr
  entries.forEach((e, i) => {
    const o = KVM_IRQ_ROUTING_HEADER_SIZE + i * KVM_IRQ_ROUTING_ENTRY_SIZE;
    v.setUint32(o, e.gsi, true); // gsi
    v.setUint32(o + 4, KVM_IRQ_ROUTING_IRQCHIP, true); // type
    v.setUint32(o + 16, e.chip, true); // u.irqchip.irqchip
    v.setUint32(o + 20, e.pin, true); // u.irqchip.pin
  });
  return b;
}
