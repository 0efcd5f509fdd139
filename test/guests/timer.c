/*
 * PIT channel 0 periodic interrupts through the IOAPIC: finds ISA IRQ 0's GSI in the MADT's
 * interrupt source overrides, routes that IOAPIC pin to TIMER_VECTOR on this CPU, counts
 * TIMER_TICKS interrupts, prints TIMER ticks=N and powers off.
 */
#include "rt.h"

#define TIMER_VECTOR 0x30
#define TIMER_TICKS 5

/* 8254 PIT (Intel 82C54 data sheet): channel 0 data port, mode/command port. */
#define PIT_CH0_PORT 0x40
#define PIT_CMD_PORT 0x43
#define PIT_CMD_CH0_LOHI_MODE2 0x34 /* channel 0, lobyte/hibyte access, mode 2 (rate generator), binary */
#define PIT_HZ 1193182
#define TIMER_HZ 100

/* 8259 PIC data ports (OCW1 = interrupt mask): masked so only the IOAPIC delivers the PIT. */
#define PIC1_DATA_PORT 0x21
#define PIC2_DATA_PORT 0xa1
#define PIC_MASK_ALL 0xff

/* MADT interrupt source override (ACPI 6.4 section 5.2.12.5). */
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
#define ISA_IRQ_PIT 0

static volatile u32 ticks;

static void on_tick(struct irq_frame *f) {
  (void)f;
  /* Capped: a tick that lands between the loop's check and its cli must not change the report. */
  if (ticks < TIMER_TICKS) ticks++;
}

void guest_main(void) {
  u32 pin = ISA_IRQ_PIT, level = 0, active_low = 0;
  u64 madt = acpi_find_table("APIC");
  if (madt) {
    u32 len = rd32(madt + 4);
    for (u32 off = MADT_ENTRIES; off + 2 <= len;) {
      u8 type = rd8(madt + off), elen = rd8(madt + off + 1);
      if (elen < 2) break;
      if (type == MADT_TYPE_ISO && rd8(madt + off + ISO_SOURCE) == ISA_IRQ_PIT) {
        u16 flags = rd16(madt + off + ISO_FLAGS);
        pin = rd32(madt + off + ISO_GSI);
        active_low = (flags & ISO_POLARITY_MASK) == ISO_POLARITY_LOW;
        level = ((flags >> ISO_TRIGGER_SHIFT) & ISO_TRIGGER_MASK) == ISO_TRIGGER_LEVEL;
      }
      off += elen;
    }
  }
  outb(PIC1_DATA_PORT, PIC_MASK_ALL);
  outb(PIC2_DATA_PORT, PIC_MASK_ALL);
  lapic_enable();
  irq_register(TIMER_VECTOR, on_tick);
  ioapic_route(pin, TIMER_VECTOR, lapic_id(), level, active_low);
  printf("TIMER pin=%u vector=0x%x\n", pin, TIMER_VECTOR);

  u32 divisor = PIT_HZ / TIMER_HZ;
  outb(PIT_CMD_PORT, PIT_CMD_CH0_LOHI_MODE2);
  outb(PIT_CH0_PORT, (u8)divisor);
  outb(PIT_CH0_PORT, (u8)(divisor >> 8));

  /* sti's one-instruction shadow makes "sti; hlt" race-free. */
  while (ticks < TIMER_TICKS) __asm__ volatile("sti; hlt; cli" ::: "memory");
  printf("TIMER ticks=%u\n", ticks);
}
