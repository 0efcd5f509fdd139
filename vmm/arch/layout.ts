// Every guest-physical address denovm uses on x86_64, in one place.
// Guest addresses are plain numbers: x86_64 guests have at most 48 physical
// address bits, well inside a double's 53-bit integer range.

import { GiB } from "../../core/units.ts";

/** The size units, for the users of the layout. */
export { GiB, KiB, MiB } from "../../core/units.ts";

// ---- Low memory: boot structures the VMM writes before the first instruction ----

/** Interrupt descriptor table placeholder for the boot CPU (empty, limit 0). */
export const BOOT_IDT_START = 0x520;
/** Global descriptor table of the boot CPU: null, code64, data, TSS (4 entries of 8 bytes). */
export const BOOT_GDT_START = 0x1500;
/** Number of GDT entries denovm writes at BOOT_GDT_START. */
export const BOOT_GDT_ENTRIES = 4;
/** Linux `struct boot_params` ("zero page"); RSI points here at 64-bit entry. */
export const ZERO_PAGE_START = 0x7000;
/** Initial stack pointer of the boot CPU (grows down, below the zero page's page tables). */
export const BOOT_STACK_POINTER = 0x8ff0;
/** Identity page tables: PML4, one PDPT, then four page directories of 2 MiB pages. */
export const PML4_START = 0x9000;
export const PDPTE_START = 0xa000;
export const PDE_START = 0xb000;
/** How much low memory the boot page tables identity-map (4 GiB in 2 MiB pages). */
export const IDENTITY_MAP_SIZE = 4 * GiB;
/** Kernel command line; Linux x86 accepts up to COMMAND_LINE_SIZE (2048) bytes by default. */
export const CMDLINE_START = 0x20000;
export const CMDLINE_MAX_SIZE = 0x10000;
/** Start of the Extended BIOS Data Area; memory from here to 1 MiB is reserved in e820. */
export const EBDA_START = 0x9fc00;
/** MP floating pointer and configuration table live at the start of the EBDA. */
export const MPTABLE_START = EBDA_START;
/**
 * The VM generation ID's page (vmm/arch/vmgenid.ts): the 16-byte ID at its start, the rest zero. It is the page
 * just below the ACPI area, inside the EBDA..1 MiB range e820Map reserves, so Linux never uses it as RAM; its
 * driver (drivers/virt/vmgenid.c) maps it with memremap, as Firecracker's ID in the reserved EBDA is mapped.
 */
export const VMGENID_PAGE_START = 0xdf000;
export const VMGENID_PAGE_SIZE = 0x1000;
/** The generation ID's length: 128 bits (Microsoft's "Virtual Machine Generation ID" specification). */
export const VMGENID_SIZE = 16;
/** ACPI tables live in the BIOS read-only area Linux scans for the RSDP (0xe0000..0xfffff). */
export const ACPI_RSDP_START = 0xe0000;
/** The other ACPI tables follow the RSDP in the same 128 KiB area. */
export const ACPI_TABLES_START = 0xe1000;
export const ACPI_TABLES_END = 0x100000;
/** First byte above the legacy area; RAM above it is usable by the kernel. */
export const HIGH_MEMORY_START = 0x100000;
/** Where kernels are loaded when they do not ask for an address (bzImage's pref_address default). */
export const KERNEL_START = 0x1000000;
/** Test guests' AP start-up trampoline page (real mode SIPI vector 0x10 = 0x10000). */
export const AP_TRAMPOLINE_START = 0x10000;

// ---- The 32-bit device hole ----

/** Guest RAM below 4 GiB stops here; the hole up to 4 GiB holds MMIO. */
export const MMIO_HOLE_START = 0xc000_0000;
export const MMIO_HOLE_END = 0x1_0000_0000;
/** virtio-mmio transports: one 4 KiB window each, from here up. */
export const VIRTIO_MMIO_START = 0xd000_0000;
export const VIRTIO_MMIO_SIZE = 0x1000;
/** pvpanic MMIO-less: I/O port 0x505 is QEMU's and crosvm's pvpanic port. */
export const PVPANIC_PORT = 0x505;
/** KVM's real-mode TSS (3 pages) and identity-map page, needed on Intel; kept in the hole. */
export const KVM_IDENTITY_MAP_START = 0xfeff_c000;
export const KVM_TSS_START = 0xfeffd000;
/** IOAPIC and local APIC MMIO (Intel SDM; the in-kernel irqchip serves them). */
export const IOAPIC_START = 0xfec0_0000;
export const APIC_START = 0xfee0_0000;

// ---- Interrupts ----

/** IOAPIC pins (GSIs) of the in-kernel irqchip: 24 of them. */
export const IOAPIC_PINS = 24;
/** Legacy ISA IRQs. */
export const IRQ_COM1 = 4;
export const IRQ_COM2 = 3;
export const IRQ_RTC = 8;
/** ACPI SCI (power button, sleep) for the hardware-reduced FADT. */
export const IRQ_ACPI_SCI = 9;
/**
 * The ACPI sleep button's interrupt: the Generic Event Device's second interrupt (vmm/arch/acpi.ts). ISA IRQ 13
 * (the PC's FPU error line, unused by a 64-bit guest) with its ISA defaults, edge-triggered and active high.
 */
export const IRQ_ACPI_SLEEP_BUTTON = 13;
/**
 * The VM generation ID's interrupt: the Generic Event Device's third interrupt (vmm/arch/acpi.ts), edge-triggered
 * and active high. It needs a pin of its own: Linux's GED driver requests each of its interrupts IRQF_ONESHOT, which
 * cannot share a line with the virtio-mmio or i8042 drivers' handlers, and the other ISA lines have owners (1 the
 * i8042 keyboard, 8 the CMOS RTC). The IOAPIC's last pin, taken from the end of the virtio-mmio list.
 */
export const IRQ_ACPI_VMGENID = 23;
/** GSIs free for virtio-mmio devices, in allocation order. */
export const VIRTIO_IRQS: readonly number[] = [5, 6, 7, 10, 11, 12, 14, 15, 16, 17, 18, 19, 20, 21, 22];

// ---- I/O ports ----

/** 8250 UART base ports for COM1..COM4 and their IRQs. */
export const SERIAL_PORTS: readonly { base: number; irq: number }[] = [
  { base: 0x3f8, irq: IRQ_COM1 },
  { base: 0x2f8, irq: IRQ_COM2 },
  { base: 0x3e8, irq: IRQ_COM1 },
  { base: 0x2e8, irq: IRQ_COM2 },
];
/** i8042 keyboard controller data and command ports. */
export const I8042_DATA_PORT = 0x60;
export const I8042_COMMAND_PORT = 0x64;
/** CMOS RTC index and data ports. */
export const CMOS_INDEX_PORT = 0x70;
export const CMOS_DATA_PORT = 0x71;
/** ACPI hardware-reduced registers (FADT): sleep control, sleep status, reset, PM1a event block. */
export const ACPI_PM1A_EVT_PORT = 0x600;
export const ACPI_PM1A_EVT_LEN = 4;
export const ACPI_SLEEP_CONTROL_PORT = 0x604;
export const ACPI_SLEEP_STATUS_PORT = 0x605;
export const ACPI_RESET_PORT = 0x606;
/** Value written to ACPI_RESET_PORT to reset (FADT RESET_VALUE). */
export const ACPI_RESET_VALUE = 0x1;
/** Test guests' debug exit port (QEMU's isa-debug-exit convention): write N → exit code N. */
export const DEBUG_EXIT_PORT = 0xf4;

// ---- Guest RAM ----

/** A range of guest-physical addresses. */
export interface GuestRange {
  start: number;
  size: number;
}

/** RAM ranges for `memBytes` of guest memory: below the hole, the rest above 4 GiB. */
export function ramRanges(memBytes: number): GuestRange[] {
  if (memBytes <= MMIO_HOLE_START) return [{ start: 0, size: memBytes }];
  return [
    { start: 0, size: MMIO_HOLE_START },
    { start: MMIO_HOLE_END, size: memBytes - MMIO_HOLE_START },
  ];
}

/** E820 entry types (Linux arch/x86/include/asm/e820/types.h). */
export const E820_RAM = 1;
export const E820_RESERVED = 2;

export interface E820Entry {
  addr: number;
  size: number;
  type: number;
}

/** The e820 map handed to the guest for `memBytes` of RAM. */
export function e820Map(memBytes: number): E820Entry[] {
  const out: E820Entry[] = [
    { addr: 0, size: EBDA_START, type: E820_RAM },
    { addr: EBDA_START, size: HIGH_MEMORY_START - EBDA_START, type: E820_RESERVED },
  ];
  for (const r of ramRanges(memBytes)) {
    const start = Math.max(r.start, HIGH_MEMORY_START);
    const end = r.start + r.size;
    if (end > start) out.push({ addr: start, size: end - start, type: E820_RAM });
  }
  return out;
}

/**
 * Start of the high area for device shared-memory windows (virtio-gpu's host-visible
 * region): the first 64 GiB boundary above RAM, so the guest never confuses it with RAM.
 */
export function sharedMemoryAreaStart(memBytes: number): number {
  const ramEnd = ramRanges(memBytes).reduce((m, r) => Math.max(m, r.start + r.size), 0);
  const align = 64 * GiB;
  return Math.ceil((ramEnd + 1) / align) * align;
}

/** The highest guest-physical address + 1 the VMM will place anything at (48-bit guests). */
export const GUEST_PHYS_LIMIT = 2 ** 48;

// ---- ACPI sleep types (ACPI 6.4 section 4.8.3.7, Sleep Control Register) ----

/** SLP_TYPx for S5 (soft off) as declared in the DSDT's \_S5 package. */
export const ACPI_SLEEP_TYPE_S5 = 5;
