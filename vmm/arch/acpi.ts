// ACPI tables for a hardware-reduced x86_64 guest: RSDP, RSDT, XSDT, FADT, MADT and a DSDT
// whose AML describes the serial ports, the virtio-mmio transports, a power button, a sleep button,
// the VM generation ID and a Generic Event Device. Layouts: ACPI Specification 6.4 (section numbers cited per table).

import type { GuestMemory } from "../../core/memory.ts";
import {
  ACPI_RESET_PORT,
  ACPI_RESET_VALUE,
  ACPI_RSDP_START,
  ACPI_SLEEP_CONTROL_PORT,
  ACPI_SLEEP_STATUS_PORT,
  ACPI_SLEEP_TYPE_S5,
  ACPI_TABLES_END,
  ACPI_TABLES_START,
  APIC_START,
  IOAPIC_START,
  IRQ_ACPI_SCI,
  IRQ_ACPI_SLEEP_BUTTON,
  IRQ_ACPI_VMGENID,
  SERIAL_PORTS,
  VMGENID_PAGE_START,
} from "./layout.ts";
import * as aml from "./aml.ts";

export interface VirtioMmioResource {
  base: number;
  size: number;
  irq: number;
}

export interface SerialResource {
  base: number;
  irq: number;
}

export interface AcpiOptions {
  cpus: number;
  virtioMmio: VirtioMmioResource[];
  serial: SerialResource[];
}

/** Where each table landed in guest memory. */
export interface AcpiTables {
  rsdp: { addr: number; size: number };
  rsdt: { addr: number; size: number };
  xsdt: { addr: number; size: number };
  fadt: { addr: number; size: number };
  madt: { addr: number; size: number };
  dsdt: { addr: number; size: number };
}

// ---- Identification ----
/** OEMID (6 bytes) of every table and of the RSDP. */
export const ACPI_OEM_ID = "DENOVM";
/** OEM Table ID is "DENO" + the table signature (8 bytes). */
const OEM_TABLE_ID_PREFIX = "DENO";
const OEM_REVISION = 1;
/** Creator ID (4 bytes) and revision: the tool that made the tables. */
const CREATOR_ID = "DNVM";
const CREATOR_REVISION = 1;

// ---- System Description Table Header (5.2.6, Table 5.4) ----
const SDT_HEADER_SIZE = 36;
const SDT_LENGTH = 4; // u32
const SDT_REVISION = 8; // u8
const SDT_CHECKSUM = 9; // u8: whole table sums to 0
const SDT_OEM_ID = 10; // 6 bytes
const SDT_OEM_TABLE_ID = 16; // 8 bytes
const SDT_OEM_REVISION = 24; // u32
const SDT_CREATOR_ID = 28; // 4 bytes
const SDT_CREATOR_REVISION = 32; // u32

// ---- RSDP (5.2.5.3, Table 5.3) ----
const RSDP_SIGNATURE = "RSD PTR ";
const RSDP_CHECKSUM = 8; // u8: first 20 bytes sum to 0
const RSDP_OEM_ID = 9; // 6 bytes
const RSDP_REVISION = 15; // u8: 2 for ACPI 2.0+
const RSDP_RSDT_ADDRESS = 16; // u32
const RSDP_V1_SIZE = 20;
const RSDP_LENGTH = 20; // u32
const RSDP_XSDT_ADDRESS = 24; // u64
const RSDP_EXTENDED_CHECKSUM = 32; // u8: all 36 bytes sum to 0
const RSDP_SIZE = 36;
const RSDP_REVISION_2 = 2;

// ---- RSDT (5.2.7) and XSDT (5.2.8): header then 32- or 64-bit table addresses ----
const RSDT_REVISION = 1;
const XSDT_REVISION = 1;

// ---- FADT (5.2.9, Table 5.9), revision 6 ----
const FADT_REVISION = 6;
/** FADT Minor Version for ACPI 6.4 (Table 5.9, offset 131). */
const FADT_MINOR_VERSION = 4;
const FADT_SIZE = 276;
const FADT_DSDT = 40; // u32
const FADT_SCI_INT = 46; // u16
const FADT_IAPC_BOOT_ARCH = 109; // u16
const FADT_FLAGS = 112; // u32
const FADT_RESET_REG = 116; // GAS
const FADT_RESET_VALUE = 128; // u8
const FADT_MINOR_VERSION_OFFSET = 131; // u8
const FADT_X_DSDT = 140; // u64
const FADT_SLEEP_CONTROL_REG = 244; // GAS
const FADT_SLEEP_STATUS_REG = 256; // GAS
/** Fixed feature flags (Table 5.10). */
const FADT_F_PWR_BUTTON = 1 << 4; // power button is a control method device (or absent)
const FADT_F_SLP_BUTTON = 1 << 5; // sleep button is a control method device (or absent)
const FADT_F_RESET_REG_SUP = 1 << 10;
const FADT_F_HW_REDUCED_ACPI = 1 << 20;
/** IA-PC boot architecture flags (5.2.9.3, Table 5.11). */
const IAPC_8042 = 1 << 1; // the i8042 keyboard controller exists
const IAPC_VGA_NOT_PRESENT = 1 << 2;

// ---- Generic Address Structure (5.2.3.2, Table 5.1) ----
const GAS_SPACE_ID = 0; // u8
const GAS_BIT_WIDTH = 1; // u8
const GAS_BIT_OFFSET = 2; // u8
const GAS_ACCESS_SIZE = 3; // u8
const GAS_ADDRESS = 4; // u64
const GAS_SPACE_SYSTEM_IO = 1;
const GAS_ACCESS_BYTE = 1;

// ---- MADT (5.2.12, Table 5.19), revision 5 in ACPI 6.4 ----
const MADT_REVISION = 5;
const MADT_LAPIC_ADDRESS = 36; // u32
const MADT_FLAGS = 40; // u32
const MADT_PCAT_COMPAT = 1 << 0; // a dual 8259 is present (KVM's irqchip has one)
const MADT_ENTRIES = 44;
/** Interrupt controller structure types (Table 5.21) and their lengths. */
const MADT_LOCAL_APIC = 0; // 5.2.12.2: type, len, ACPI processor UID, APIC id, flags u32
const MADT_LOCAL_APIC_LEN = 8;
const MADT_LAPIC_ENABLED = 1 << 0;
const MADT_IO_APIC = 1; // 5.2.12.3: type, len, id, reserved, address u32, GSI base u32
const MADT_IO_APIC_LEN = 12;
const MADT_INT_SRC_OVERRIDE = 2; // 5.2.12.5: type, len, bus, source, GSI u32, flags u16
const MADT_INT_SRC_OVERRIDE_LEN = 10;
const MADT_LOCAL_APIC_NMI = 4; // 5.2.12.7: type, len, ACPI processor UID, flags u16, LINT#
const MADT_LOCAL_APIC_NMI_LEN = 6;
/** MPS INTI flags (Table 5.26): polarity bits 0..1, trigger mode bits 2..3. */
const MPS_INTI_POLARITY_HIGH = 1;
const MPS_INTI_TRIGGER_EDGE = 1 << 2;
const MPS_INTI_TRIGGER_LEVEL = 3 << 2;
const MPS_INTI_CONFORMS = 0;
const ISA_BUS = 0;
/** ACPI processor UID 0xff: all processors (5.2.12.7). */
const ALL_PROCESSORS = 0xff;
const LINT1 = 1;
/** ISA IRQ 0 (the PIT) is wired to IOAPIC pin 2, the PC convention (MP table agrees). */
const ISA_TIMER_IRQ = 0;
const ISA_TIMER_GSI = 2;
const IOAPIC_GSI_BASE = 0;

// ---- DSDT (5.2.11.1) ----
/** Revision 2: AML integers are 64-bit. */
const DSDT_REVISION = 2;
/** Device notification for a power button press (5.6.6, Table 5.166: 0x80 = status change / pressed). */
const NOTIFY_POWER_BUTTON_PRESSED = 0x80;
/** Device notification for a sleep button press (4.8.3.2, Table 5.166: 0x80 on a sleep button device). */
const NOTIFY_SLEEP_BUTTON_PRESSED = 0x80;
/** 8250 UART register block length. */
const SERIAL_IO_LENGTH = 8;
/** HIDs: 16550-compatible UART, power button, Generic Event Device (5.6.9), virtio-mmio (Linux's LNRO0005). */
const HID_SERIAL = "PNP0501";
const HID_POWER_BUTTON = "PNP0C0C";
/** The control-method sleep button (4.8.3.2.2). */
const HID_SLEEP_BUTTON = "PNP0C0E";
const HID_GED = "ACPI0013";
const HID_VIRTIO_MMIO = "LNRO0005";
/**
 * The VM generation ID device's ids: Linux's vmgenid driver (drivers/virt/vmgenid.c, 6.1) matches "VMGENCTR" or
 * "VM_GEN_COUNTER" against the device's _HID and _CID with a case-sensitive strcmp (drivers/acpi/bus.c
 * __acpi_match_device). Microsoft's specification, QEMU and Firecracker write _CID "VM_Gen_Counter"; Linux matches
 * that only because ACPICA upper-cases string _HID/_CID results (nsrepair2.c acpi_ns_repair_HID), so the DSDT
 * gives the upper-case forms Linux lists and relies on no repair. _DDN, the display name, keeps the
 * specification's spelling.
 */
const HID_VMGENID = "VMGENCTR";
const CID_VMGENID = "VM_GEN_COUNTER";
const DDN_VMGENID = "VM_Gen_Counter";
/** Generation ID changed: the notification Linux's driver and Microsoft's specification expect (0x80). */
const NOTIFY_VMGENID_CHANGED = 0x80;
/** The name of the generation ID's address package, evaluated by Linux's driver (and named so by the specification). */
const VMGENID_ADDR_NAME = "ADDR";
/** ADDR splits the 64-bit address into two 32-bit integers, low then high. */
const U32_SPAN = 2 ** 32;

/** Tables are placed on 16-byte boundaries. */
const TABLE_ALIGN = 16;

function ascii(buf: Uint8Array, at: number, s: string, width: number, pad = 0x20): void {
  for (let i = 0; i < width; i++) buf[at + i] = i < s.length ? s.charCodeAt(i) : pad;
}

function checksum(bytes: Uint8Array): number {
  let sum = 0;
  for (const b of bytes) sum = (sum + b) & 0xff;
  return (0x100 - sum) & 0xff;
}

/** A table with its standard header filled in and checksummed; `body` follows the 36-byte header. */
function sdt(signature: string, revision: number, body: Uint8Array): Uint8Array {
  const t = new Uint8Array(SDT_HEADER_SIZE + body.length);
  const dv = new DataView(t.buffer);
  ascii(t, 0, signature, 4);
  dv.setUint32(SDT_LENGTH, t.length, true);
  t[SDT_REVISION] = revision;
  ascii(t, SDT_OEM_ID, ACPI_OEM_ID, 6);
  ascii(t, SDT_OEM_TABLE_ID, OEM_TABLE_ID_PREFIX + signature, 8);
  dv.setUint32(SDT_OEM_REVISION, OEM_REVISION, true);
  ascii(t, SDT_CREATOR_ID, CREATOR_ID, 4);
  dv.setUint32(SDT_CREATOR_REVISION, CREATOR_REVISION, true);
  t.set(body, SDT_HEADER_SIZE);
  t[SDT_CHECKSUM] = checksum(t);
  return t;
}

function setGas(dv: DataView, at: number, port: number): void {
  dv.setUint8(at + GAS_SPACE_ID, GAS_SPACE_SYSTEM_IO);
  dv.setUint8(at + GAS_BIT_WIDTH, 8);
  dv.setUint8(at + GAS_BIT_OFFSET, 0);
  dv.setUint8(at + GAS_ACCESS_SIZE, GAS_ACCESS_BYTE);
  dv.setBigUint64(at + GAS_ADDRESS, BigInt(port), true);
}

function fadt(dsdtAddr: number): Uint8Array {
  // Build the full table, then pass the part after the header to sdt().
  const t = new Uint8Array(FADT_SIZE);
  const dv = new DataView(t.buffer);
  dv.setUint32(FADT_DSDT, dsdtAddr, true);
  dv.setUint16(FADT_SCI_INT, IRQ_ACPI_SCI, true);
  dv.setUint16(FADT_IAPC_BOOT_ARCH, IAPC_8042 | IAPC_VGA_NOT_PRESENT, true);
  dv.setUint32(FADT_FLAGS, FADT_F_HW_REDUCED_ACPI | FADT_F_RESET_REG_SUP | FADT_F_PWR_BUTTON | FADT_F_SLP_BUTTON, true);
  setGas(dv, FADT_RESET_REG, ACPI_RESET_PORT);
  t[FADT_RESET_VALUE] = ACPI_RESET_VALUE;
  t[FADT_MINOR_VERSION_OFFSET] = FADT_MINOR_VERSION;
  dv.setBigUint64(FADT_X_DSDT, BigInt(dsdtAddr), true);
  setGas(dv, FADT_SLEEP_CONTROL_REG, ACPI_SLEEP_CONTROL_PORT);
  setGas(dv, FADT_SLEEP_STATUS_REG, ACPI_SLEEP_STATUS_PORT);
  return sdt("FACP", FADT_REVISION, t.subarray(SDT_HEADER_SIZE));
}

/**
 * Most CPUs the MADT describes: its Processor Local APIC entries carry 8-bit APIC IDs (ACPI 6.4 section
 * 5.2.12.2), 0xff is the broadcast ID, and the I/O APIC's ID follows the last CPU's.
 */
export const ACPI_MAX_CPUS = 254;

function madt(cpus: number): Uint8Array {
  if (!Number.isInteger(cpus) || cpus < 1 || cpus > ACPI_MAX_CPUS) {
    throw new RangeError(`ACPI: ${cpus} CPUs; 1..${ACPI_MAX_CPUS} supported`);
  }
  const entries: number[] = [];
  const u16 = (v: number) => [v & 0xff, v >> 8];
  const u32 = (v: number) => [v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, v >>> 24];
  for (let cpu = 0; cpu < cpus; cpu++) {
    entries.push(MADT_LOCAL_APIC, MADT_LOCAL_APIC_LEN, cpu, cpu, ...u32(MADT_LAPIC_ENABLED));
  }
  entries.push(MADT_IO_APIC, MADT_IO_APIC_LEN, cpus, 0, ...u32(IOAPIC_START), ...u32(IOAPIC_GSI_BASE));
  entries.push(
    MADT_INT_SRC_OVERRIDE,
    MADT_INT_SRC_OVERRIDE_LEN,
    ISA_BUS,
    ISA_TIMER_IRQ,
    ...u32(ISA_TIMER_GSI),
    ...u16(MPS_INTI_CONFORMS),
  );
  entries.push(
    MADT_INT_SRC_OVERRIDE,
    MADT_INT_SRC_OVERRIDE_LEN,
    ISA_BUS,
    IRQ_ACPI_SCI,
    ...u32(IRQ_ACPI_SCI),
    ...u16(MPS_INTI_TRIGGER_LEVEL | MPS_INTI_POLARITY_HIGH),
  );
  entries.push(
    MADT_LOCAL_APIC_NMI,
    MADT_LOCAL_APIC_NMI_LEN,
    ALL_PROCESSORS,
    ...u16(MPS_INTI_TRIGGER_EDGE | MPS_INTI_POLARITY_HIGH),
    LINT1,
  );
  const body = new Uint8Array(MADT_ENTRIES - SDT_HEADER_SIZE + entries.length);
  const dv = new DataView(body.buffer);
  dv.setUint32(MADT_LAPIC_ADDRESS - SDT_HEADER_SIZE, APIC_START, true);
  dv.setUint32(MADT_FLAGS - SDT_HEADER_SIZE, MADT_PCAT_COMPAT, true);
  body.set(entries, MADT_ENTRIES - SDT_HEADER_SIZE);
  return sdt("APIC", MADT_REVISION, body);
}

/** Two-character upper-case hex suffix for device names (VR00, VR01, ...). */
function hex2(n: number): string {
  return n.toString(16).toUpperCase().padStart(2, "0");
}

/** The DSDT's AML: \_S5 and the \_SB devices. */
export function dsdtAml(opts: AcpiOptions): Uint8Array {
  if (opts.serial.length > 9) throw new RangeError("ACPI: at most 9 serial ports (COM1..COM9)");
  if (opts.virtioMmio.length > 0x100) throw new RangeError("ACPI: at most 256 virtio-mmio devices");
  const devices: aml.Aml[] = [];
  const used = new Set<number>();
  opts.serial.forEach((s, i) => {
    // COMn follows the PC port (0x3f8 is COM1, 0x2f8 COM2, ...), so names and _UIDs match ttyS numbers.
    const pc = SERIAL_PORTS.findIndex((p) => p.base === s.base);
    const n = pc >= 0 && !used.has(pc + 1) ? pc + 1 : i + 1;
    if (used.has(n)) throw new RangeError(`ACPI: two serial ports would both be COM${n}`);
    used.add(n);
    devices.push(aml.device(`COM${n}`, [
      aml.name("_HID", aml.eisaId(HID_SERIAL)),
      aml.name("_UID", aml.integer(n)),
      aml.name("_CRS", aml.resourceTemplate([aml.ioPort(s.base, s.base, 1, SERIAL_IO_LENGTH), aml.irqNoFlags(s.irq)])),
    ]));
  });
  opts.virtioMmio.forEach((d, i) => {
    devices.push(aml.device(`VR${hex2(i)}`, [
      aml.name("_HID", aml.string(HID_VIRTIO_MMIO)),
      aml.name("_UID", aml.integer(i)),
      aml.name(
        "_CRS",
        aml.resourceTemplate([aml.memory32Fixed(d.base, d.size), aml.interrupt(d.irq, { edge: true })]),
      ),
    ]));
  });
  devices.push(aml.device("PWRB", [
    aml.name("_HID", aml.eisaId(HID_POWER_BUTTON)),
    aml.name("_UID", aml.integer(0)),
  ]));
  devices.push(aml.device("SLPB", [
    aml.name("_HID", aml.eisaId(HID_SLEEP_BUTTON)),
    aml.name("_UID", aml.integer(0)),
  ]));
  // The VM generation ID (vmm/arch/vmgenid.ts): ADDR is the guest-physical address of its 16 bytes.
  devices.push(aml.device("VGEN", [
    aml.name("_HID", aml.string(HID_VMGENID)),
    aml.name("_CID", aml.string(CID_VMGENID)),
    aml.name("_DDN", aml.string(DDN_VMGENID)),
    aml.name(
      VMGENID_ADDR_NAME,
      aml.pkg([aml.integer(VMGENID_PAGE_START % U32_SPAN), aml.integer(Math.floor(VMGENID_PAGE_START / U32_SPAN))]),
    ),
  ]));
  // The Generic Event Device (5.6.9): one interrupt per event. The VMM raises IRQ_ACPI_SCI (level, active
  // high, matching the MADT override) for the power button, IRQ_ACPI_SLEEP_BUTTON (an ISA IRQ with its
  // defaults: edge, active high) for the sleep button and IRQ_ACPI_VMGENID (edge, active high) after it
  // writes a new generation ID; _EVT, called with the interrupt's number, notifies the device.
  devices.push(aml.device("GED_", [
    aml.name("_HID", aml.string(HID_GED)),
    aml.name("_UID", aml.integer(0)),
    aml.name(
      "_CRS",
      aml.resourceTemplate([
        aml.interrupt(IRQ_ACPI_SCI, { edge: false }),
        aml.interrupt(IRQ_ACPI_SLEEP_BUTTON, { edge: true }),
        aml.interrupt(IRQ_ACPI_VMGENID, { edge: true }),
      ]),
    ),
    aml.method("_EVT", 1, true, [
      aml.ifThen(aml.lEqual(aml.arg(0), aml.integer(IRQ_ACPI_SCI)), [
        aml.notify("\\_SB_.PWRB", NOTIFY_POWER_BUTTON_PRESSED),
      ]),
      aml.ifThen(aml.lEqual(aml.arg(0), aml.integer(IRQ_ACPI_SLEEP_BUTTON)), [
        aml.notify("\\_SB_.SLPB", NOTIFY_SLEEP_BUTTON_PRESSED),
      ]),
      aml.ifThen(aml.lEqual(aml.arg(0), aml.integer(IRQ_ACPI_VMGENID)), [
        aml.notify("\\_SB_.VGEN", NOTIFY_VMGENID_CHANGED),
      ]),
    ]),
  ]));
  const code = [
    aml.name("\\_S5_", aml.pkg([aml.integer(ACPI_SLEEP_TYPE_S5), aml.integer(0)])),
    aml.scope("\\_SB_", devices),
  ].flat();
  return new Uint8Array(code);
}

/** The kernel command line arguments that announce virtio-mmio transports without ACPI. */
export function virtioMmioCmdlineArgs(devices: VirtioMmioResource[]): string[] {
  return devices.map((d) => `virtio_mmio.device=${sizeSuffix(d.size)}@0x${d.base.toString(16)}:${d.irq}`);
}

/** Linux memparse() syntax: 4K, 1M, or plain bytes. */
function sizeSuffix(n: number): string {
  for (const [unit, suffix] of [[1 << 30, "G"], [1 << 20, "M"], [1 << 10, "K"]] as const) {
    if (n % unit === 0) return `${n / unit}${suffix}`;
  }
  return `${n}`;
}

/** Write RSDP at ACPI_RSDP_START and the other tables from ACPI_TABLES_START. */
export function writeAcpiTables(mem: GuestMemory, opts: AcpiOptions): AcpiTables {
  const dsdt = sdt("DSDT", DSDT_REVISION, dsdtAml(opts));
  const madtBytes = madt(opts.cpus);
  const align = (n: number) => Math.ceil(n / TABLE_ALIGN) * TABLE_ALIGN;

  let at = ACPI_TABLES_START;
  const place = (size: number) => {
    const addr = at;
    at = align(at + size);
    return { addr, size };
  };
  const dsdtAt = place(dsdt.length);
  const fadtBytes = fadt(dsdtAt.addr);
  const fadtAt = place(fadtBytes.length);
  const madtAt = place(madtBytes.length);
  const pointed = [fadtAt.addr, madtAt.addr];

  const rsdtBody = new Uint8Array(4 * pointed.length);
  const xsdtBody = new Uint8Array(8 * pointed.length);
  pointed.forEach((a, i) => {
    new DataView(rsdtBody.buffer).setUint32(4 * i, a, true);
    new DataView(xsdtBody.buffer).setBigUint64(8 * i, BigInt(a), true);
  });
  const rsdt = sdt("RSDT", RSDT_REVISION, rsdtBody);
  const xsdt = sdt("XSDT", XSDT_REVISION, xsdtBody);
  const rsdtAt = place(rsdt.length);
  const xsdtAt = place(xsdt.length);
  if (at > ACPI_TABLES_END) {
    throw new RangeError(
      `ACPI tables need ${at - ACPI_TABLES_START} bytes; ${ACPI_TABLES_END - ACPI_TABLES_START} are available`,
    );
  }

  const rsdp = new Uint8Array(RSDP_SIZE);
  const rdv = new DataView(rsdp.buffer);
  ascii(rsdp, 0, RSDP_SIGNATURE, 8);
  ascii(rsdp, RSDP_OEM_ID, ACPI_OEM_ID, 6);
  rsdp[RSDP_REVISION] = RSDP_REVISION_2;
  rdv.setUint32(RSDP_RSDT_ADDRESS, rsdtAt.addr, true);
  rdv.setUint32(RSDP_LENGTH, RSDP_SIZE, true);
  rdv.setBigUint64(RSDP_XSDT_ADDRESS, BigInt(xsdtAt.addr), true);
  rsdp[RSDP_CHECKSUM] = checksum(rsdp.subarray(0, RSDP_V1_SIZE));
  rsdp[RSDP_EXTENDED_CHECKSUM] = checksum(rsdp);

  mem.fill(ACPI_TABLES_START, at - ACPI_TABLES_START);
  mem.write(dsdtAt.addr, dsdt);
  mem.write(fadtAt.addr, fadtBytes);
  mem.write(madtAt.addr, madtBytes);
  mem.write(rsdtAt.addr, rsdt);
  mem.write(xsdtAt.addr, xsdt);
  mem.write(ACPI_RSDP_START, rsdp);
  return {
    rsdp: { addr: ACPI_RSDP_START, size: RSDP_SIZE },
    rsdt: rsdtAt,
    xsdt: xsdtAt,
    fadt: fadtAt,
    madt: madtAt,
    dsdt: dsdtAt,
  };
}
