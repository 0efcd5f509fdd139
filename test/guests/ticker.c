/*
 * A guest that lets a test see time pass: counts PIT channel 0 interrupts (delivered through the
 * IOAPIC pin the MADT's interrupt source override names for ISA IRQ 0, as in timer.c) and prints
 * "TICK n" (n = 1, 2, 3, ...) every TICKS_PER_LINE ticks, forever. Between ticks it polls COM1 for
 * input; a 'q' prints BYE and powers off through the ACPI sleep control register (exit code 0).
 */
#include "rt.h"

#define TICK_VECTOR 0x30
#define TICKS_PER_LINE 10

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

/* 16550 UART registers (PC16550D data sheet), offsets from COM1's base port. */
#define COM1_BASE SERIAL_PORTS_0_BASE
#define UART_RBR 0         /* receive buffer (read, DLAB=0) */
#define UART_LSR 5         /* line status */
#define UART_LSR_DR 0x01   /* data ready */

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
#define ISA_IRQ_PIT 0

static volatile u32 ticks;

static void on_tick(struct irq_frame *f) {
  (void)f;
  ticks++;
}

/* Where ISA IRQ `source` arrives: the MADT override if there is one, else the identity pin, edge, high. */
static void isa_irq_route(u32 source, u32 *pin, int *level, int *active_low) {
  *pin = source;
  *level = 0;
  *active_low = 0;
  u64 madt = acpi_find_table("APIC");
  if (!madt) return;
  u32 len = rd32(madt + SDT_LENGTH);
  for (u32 off = MADT_ENTRIES; off + 2 <= len;) {
    u8 type = rd8(madt + off), elen = rd8(madt + off + 1);
    if (elen < 2) break;
    if (type == MADT_TYPE_ISO && rd8(madt + off + ISO_SOURCE) == source) {
      u16 flags = rd16(madt + off + ISO_FLAGS);
      *pin = rd32(madt + off + ISO_GSI);
      *active_low = (flags & ISO_POLARITY_MASK) == ISO_POLARITY_LOW;
      *level = ((flags >> ISO_TRIGGER_SHIFT) & ISO_TRIGGER_MASK) == ISO_TRIGGER_LEVEL;
    }
    off += elen;
  }
}

void guest_main(void) {
  u32 pin;
  int level, active_low;
  isa_irq_route(ISA_IRQ_PIT, &pin, &level, &active_low);
  outb(PIC1_DATA_PORT, PIC_MASK_ALL);
  outb(PIC2_DATA_PORT, PIC_MASK_ALL);
  lapic_enable();
  irq_register(TICK_VECTOR, on_tick);
  ioapic_route(pin, TICK_VECTOR, lapic_id(), level, active_low);
  printf("TICKER pin=%u vector=0x%x hz=%u\n", pin, TICK_VECTOR, TIMER_HZ);

  u32 divisor = PIT_HZ / TIMER_HZ;
  outb(PIT_CMD_PORT, PIT_CMD_CH0_LOHI_MODE2);
  outb(PIT_CH0_PORT, (u8)divisor);
  outb(PIT_CH0_PORT, (u8)(divisor >> 8));

  u32 lines = 0;
  for (;;) {
    /* sti's one-instruction shadow makes "sti; hlt" race-free; the tick handler runs inside it. */
    __asm__ volatile("sti; hlt; cli" ::: "memory");
    while (inb(COM1_BASE + UART_LSR) & UART_LSR_DR) {
      if (inb(COM1_BASE + UART_RBR) == 'q') {
        printf("BYE\n");
        return; /* rt_main powers off */
      }
    }
    /* Interrupts are off here, so `ticks` is stable; several lines at once if ticks piled up. */
    while ((lines + 1) * TICKS_PER_LINE <= ticks) printf("TICK %u\n", ++lines);
  }
}
