/*
 * ACPI power button through the Generic Event Device, without an AML interpreter: the VMM's DSDT
 * has a GED (ACPI0013, ACPI 6.4 section 5.6.9) whose interrupt is the SCI the FADT names, and whose
 * _EVT notifies \_SB.PWRB. For this guest the interrupt itself is the event. It reads the SCI number
 * from the FADT, finds its IOAPIC pin, trigger and polarity in the MADT's interrupt source override,
 * routes that pin to PWRBTN_VECTOR, prints READY and halts. On the interrupt it prints POWERBTN and
 * powers off through the ACPI sleep control register (exit code 0).
 */
#include "rt.h"

#define PWRBTN_VECTOR 0x40

/* 8259 PIC data ports (OCW1 = interrupt mask): masked so only the IOAPIC delivers. */
#define PIC1_DATA_PORT 0x21
#define PIC2_DATA_PORT 0xa1
#define PIC_MASK_ALL 0xff

/* FADT SCI_INT: u16 at offset 46 (ACPI 6.4 section 5.2.9, table 5.9). */
#define FADT_SCI_INT 46
/* Without an FADT: the SCI denovm uses (vmm/layout.ts IRQ_ACPI_SCI). */
#define DEFAULT_SCI IRQ_ACPI_SCI

/* MADT interrupt source override (ACPI 6.4 section 5.2.12.5). */
#define SDT_LENGTH 4
#define MADT_ENTRIES 44
#define MADT_TYPE_ISO 2
#define ISO_SOURCE 3
#define ISO_GSI 4
#define ISO_FLAGS 8
#define ISO_POLARITY_MASK 0x3
#define ISO_POLARITY_LOW 0x3
#define ISO_TRIGGER_SHIFT 2
#define ISO_TRIGGER_MASK 0x3
#define ISO_TRIGGER_LEVEL 0x3

/*
 * Where the SCI arrives. Without an override the SCI is a shareable, level-triggered, active-low
 * interrupt on the identity pin (ACPI 6.4 section 5.2.12.5).
 */
static void sci_route(u32 sci, u32 *pin, int *level, int *active_low) {
  *pin = sci;
  *level = 1;
  *active_low = 1;
  u64 madt = acpi_find_table("APIC");
  if (!madt) return;
  u32 len = rd32(madt + SDT_LENGTH);
  for (u32 off = MADT_ENTRIES; off + 2 <= len;) {
    u8 type = rd8(madt + off), elen = rd8(madt + off + 1);
    if (elen < 2) break;
    if (type == MADT_TYPE_ISO && rd8(madt + off + ISO_SOURCE) == sci) {
      u16 flags = rd16(madt + off + ISO_FLAGS);
      u32 polarity = flags & ISO_POLARITY_MASK, trigger = (flags >> ISO_TRIGGER_SHIFT) & ISO_TRIGGER_MASK;
      *pin = rd32(madt + off + ISO_GSI);
      /* 0 = "conforms to the bus": keep the SCI defaults. */
      if (polarity) *active_low = polarity == ISO_POLARITY_LOW;
      if (trigger) *level = trigger == ISO_TRIGGER_LEVEL;
    }
    off += elen;
  }
}

static void on_power_button(struct irq_frame *f) {
  (void)f;
  printf("POWERBTN\n");
  acpi_poweroff();
}

void guest_main(void) {
  u64 fadt = acpi_find_table("FACP");
  u32 sci = fadt ? rd16(fadt + FADT_SCI_INT) : DEFAULT_SCI;
  u32 pin;
  int level, active_low;
  sci_route(sci, &pin, &level, &active_low);
  outb(PIC1_DATA_PORT, PIC_MASK_ALL);
  outb(PIC2_DATA_PORT, PIC_MASK_ALL);
  lapic_enable();
  irq_register(PWRBTN_VECTOR, on_power_button);
  ioapic_route(pin, PWRBTN_VECTOR, lapic_id(), level, active_low);
  printf("READY sci=%u pin=%u level=%d active_low=%d vector=0x%x\n", sci, pin, level, active_low, PWRBTN_VECTOR);
  for (;;) __asm__ volatile("sti; hlt; cli" ::: "memory");
}
