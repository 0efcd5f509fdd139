// Intel MultiProcessor Specification 1.4 tables (May 1997), written at MPTABLE_START:
// the MP floating pointer structure (section 4.1) followed by the MP configuration table
// (section 4.2) with its base entries (section 4.3). Linux uses them when ACPI is off (acpi=off).

import type { GuestMemory } from "../../core/memory.ts";
import { ACPI_RSDP_START, APIC_START, HIGH_MEMORY_START, IOAPIC_START, MPTABLE_START } from "./layout.ts";

// ---- MP floating pointer structure (MPS 1.4 section 4.1, Table 4-1) ----
/** "_MP_". */
const MPF_SIGNATURE = "_MP_";
const MPF_SIZE = 16;
const MPF_PHYSPTR = 4; // u32: address of the configuration table
const MPF_LENGTH = 8; // u8: length in 16-byte paragraphs (1)
const MPF_SPEC_REV = 9; // u8
const MPF_CHECKSUM = 10; // u8: all 16 bytes sum to 0
// Feature bytes 1..5 at 11..15: byte 1 = 0 means a configuration table is present;
// byte 2 bit 7 (IMCRP) = 0 means virtual wire mode, no IMCR. All zero here.

/** Specification revision 1.4 (Table 4-1, SPEC_REV). */
const MP_SPEC_REV_1_4 = 4;

// ---- MP configuration table header (section 4.2, Table 4-2) ----
const MPC_SIGNATURE = "PCMP";
const MPC_HEADER_SIZE = 44;
const MPC_LENGTH = 4; // u16: base table length including header
const MPC_SPEC_REV = 6; // u8
const MPC_CHECKSUM = 7; // u8: base table sums to 0
const MPC_OEM_ID = 8; // 8 bytes, space padded
const MPC_PRODUCT_ID = 16; // 12 bytes, space padded
const MPC_ENTRY_COUNT = 34; // u16
const MPC_LAPIC_ADDR = 36; // u32
// OEM table pointer/size (28, 32), extended table length/checksum (40, 42) stay 0.

const OEM_ID = "DENOVM";
const PRODUCT_ID = "DENOVM";

// ---- Base table entries (section 4.3) ----
/** Entry types (Table 4-3). */
const ENTRY_PROCESSOR = 0;
const ENTRY_BUS = 1;
const ENTRY_IOAPIC = 2;
const ENTRY_IO_INTERRUPT = 3;
const ENTRY_LOCAL_INTERRUPT = 4;
/** Entry lengths (Table 4-3). */
const PROCESSOR_ENTRY_SIZE = 20;
/** Processor entry fields (Table 4-4): type, LAPIC id, LAPIC version, CPU flags, signature u32, features u32. */
const PROC_APIC_ID = 1;
const PROC_APIC_VERSION = 2;
const PROC_CPU_FLAGS = 3;
const PROC_SIGNATURE = 4;
const PROC_FEATURES = 8;
const SMALL_ENTRY_SIZE = 8;

/** Processor entry CPU flags (Table 4-4): EN (usable) and BP (the bootstrap processor). */
const CPU_FLAG_EN = 1 << 0;
const CPU_FLAG_BP = 1 << 1;
/** Local APIC version: 0x14, an integrated APIC as KVM's in-kernel LAPIC reports in its version register. */
const LAPIC_VERSION = 0x14;
/** CPU signature (Table 4-5): family 6, model 0, stepping 0 — a generic P6-or-later CPU. */
const CPU_SIGNATURE = 6 << 8;
/** Feature flags (Table 4-6, CPUID.1:EDX): FPU (bit 0) and APIC (bit 9) present. */
const CPU_FEATURES = (1 << 0) | (1 << 9);

/** Bus type string for ISA (Table 4-8), 6 bytes space padded. */
const BUS_TYPE_ISA = "ISA   ";
const ISA_BUS_ID = 0;

/** I/O APIC version: KVM's in-kernel IOAPIC reports 0x11. I/O APIC flag EN (Table 4-9). */
const IOAPIC_VERSION = 0x11;
const IOAPIC_FLAG_EN = 1 << 0;

/** Interrupt types (Table 4-11). */
const INT_TYPE_INT = 0;
const INT_TYPE_NMI = 1;
const INT_TYPE_EXTINT = 3;
/** I/O interrupt entry flags (Table 4-10): PO bits 0..1, EL bits 2..3; 0 = conforms to the bus. */
const INT_FLAGS_CONFORMS = 0;
const INT_PO_ACTIVE_HIGH = 1;
const INT_EL_LEVEL = 3 << 2;
/** Destination local APIC id 0xff: all local APICs (Table 4-12). */
const ALL_LAPICS = 0xff;
/** LINTIN0 and LINTIN1 pins of the local APIC. */
const LINT0 = 0;
const LINT1 = 1;

/** The 16 ISA IRQs. ISA IRQ 0 (the PIT) arrives on IOAPIC pin 2, as in the MADT's override. */
const ISA_IRQS = 16;
const ISA_TIMER_IRQ = 0;
const ISA_TIMER_IOAPIC_PIN = 2;
/** ISA IRQ 2 is the 8259 cascade: no IOAPIC entry of its own (its pin carries the timer). */
const ISA_CASCADE_IRQ = 2;
/** ISA IRQ 9 carries the ACPI SCI: level triggered, active high (MADT override agrees). */
const ISA_SCI_IRQ = 9;

/** Highest number of CPUs: APIC ids are 8-bit, 0xff is broadcast, and the IOAPIC takes id = cpus. */
export const MPTABLE_MAX_CPUS = 254;

/** Bytes the MP floating pointer and configuration table take for `cpus` CPUs. */
export function mpTableSize(cpus: number): number {
  const entries = cpus * PROCESSOR_ENTRY_SIZE + SMALL_ENTRY_SIZE * (1 + 1 + isaIrqEntries().length + 2);
  return MPF_SIZE + MPC_HEADER_SIZE + entries;
}

function isaIrqEntries(): { irq: number; pin: number; flags: number }[] {
  const out = [];
  for (let irq = 0; irq < ISA_IRQS; irq++) {
    if (irq === ISA_CASCADE_IRQ) continue;
    const pin = irq === ISA_TIMER_IRQ ? ISA_TIMER_IOAPIC_PIN : irq;
    const flags = irq === ISA_SCI_IRQ ? INT_EL_LEVEL | INT_PO_ACTIVE_HIGH : INT_FLAGS_CONFORMS;
    out.push({ irq, pin, flags });
  }
  return out;
}

/** 8-bit checksum byte that makes `bytes` sum to 0. */
export function checksum8(bytes: Uint8Array): number {
  let sum = 0;
  for (const b of bytes) sum = (sum + b) & 0xff;
  return (0x100 - sum) & 0xff;
}

/** Where the MP table ends; it must stay below the ACPI area and the 1 MiB line. */
const MPTABLE_LIMIT = Math.min(ACPI_RSDP_START, HIGH_MEMORY_START);

/** Write the MP floating pointer and configuration table for `cpus` CPUs at MPTABLE_START. */
export function writeMpTable(mem: GuestMemory, cpus: number): void {
  if (!Number.isInteger(cpus) || cpus < 1 || cpus > MPTABLE_MAX_CPUS) {
    throw new RangeError(`MP table: ${cpus} CPUs; 1..${MPTABLE_MAX_CPUS} supported`);
  }
  const size = mpTableSize(cpus);
  if (MPTABLE_START + size > MPTABLE_LIMIT) {
    throw new RangeError(
      `MP table of ${size} bytes for ${cpus} CPUs does not fit below 0x${MPTABLE_LIMIT.toString(16)}`,
    );
  }

  const buf = new Uint8Array(size);
  const dv = new DataView(buf.buffer);
  const ascii = (at: number, s: string, width = s.length) => {
    for (let i = 0; i < width; i++) buf[at + i] = i < s.length ? s.charCodeAt(i) : 0x20;
  };

  // Configuration table, right after the floating pointer.
  const mpc = MPF_SIZE;
  let at = mpc + MPC_HEADER_SIZE;
  let count = 0;
  const small = (bytes: number[]) => {
    buf.set(bytes, at);
    at += SMALL_ENTRY_SIZE;
    count++;
  };
  for (let cpu = 0; cpu < cpus; cpu++) {
    buf[at] = ENTRY_PROCESSOR;
    buf[at + PROC_APIC_ID] = cpu;
    buf[at + PROC_APIC_VERSION] = LAPIC_VERSION;
    buf[at + PROC_CPU_FLAGS] = CPU_FLAG_EN | (cpu === 0 ? CPU_FLAG_BP : 0);
    dv.setUint32(at + PROC_SIGNATURE, CPU_SIGNATURE, true);
    dv.setUint32(at + PROC_FEATURES, CPU_FEATURES, true);
    at += PROCESSOR_ENTRY_SIZE;
    count++;
  }
  // The 8-byte entries are written field by field in the order of Tables 4-7 (bus), 4-9 (I/O APIC),
  // 4-10 (I/O interrupt: type, int type, flags u16, bus, bus IRQ, IOAPIC id, INTIN#) and 4-12
  // (local interrupt: type, int type, flags u16, bus, bus IRQ, LAPIC id, LINTIN#).
  const bus = [ENTRY_BUS, ISA_BUS_ID, ...BUS_TYPE_ISA.split("").map((c) => c.charCodeAt(0))];
  small(bus);
  const ioapicId = cpus;
  const ioapicAddr = [
    IOAPIC_START & 0xff,
    (IOAPIC_START >>> 8) & 0xff,
    (IOAPIC_START >>> 16) & 0xff,
    IOAPIC_START >>> 24,
  ];
  small([ENTRY_IOAPIC, ioapicId, IOAPIC_VERSION, IOAPIC_FLAG_EN, ...ioapicAddr]);
  for (const { irq, pin, flags } of isaIrqEntries()) {
    small([ENTRY_IO_INTERRUPT, INT_TYPE_INT, flags & 0xff, flags >> 8, ISA_BUS_ID, irq, ioapicId, pin]);
  }
  small([ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, ISA_BUS_ID, 0, ALL_LAPICS, LINT0]);
  small([ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, ISA_BUS_ID, 0, ALL_LAPICS, LINT1]);

  ascii(mpc, MPC_SIGNATURE);
  dv.setUint16(mpc + MPC_LENGTH, at - mpc, true);
  buf[mpc + MPC_SPEC_REV] = MP_SPEC_REV_1_4;
  ascii(mpc + MPC_OEM_ID, OEM_ID, 8);
  ascii(mpc + MPC_PRODUCT_ID, PRODUCT_ID, 12);
  dv.setUint16(mpc + MPC_ENTRY_COUNT, count, true);
  dv.setUint32(mpc + MPC_LAPIC_ADDR, APIC_START, true);
  buf[mpc + MPC_CHECKSUM] = checksum8(buf.subarray(mpc, at));

  ascii(0, MPF_SIGNATURE);
  dv.setUint32(MPF_PHYSPTR, MPTABLE_START + mpc, true);
  buf[MPF_LENGTH] = MPF_SIZE / 16;
  buf[MPF_SPEC_REV] = MP_SPEC_REV_1_4;
  buf[MPF_CHECKSUM] = checksum8(buf.subarray(0, MPF_SIZE));

  mem.write(MPTABLE_START, buf);
}
