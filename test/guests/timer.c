/*
 * PIT channel 0 periodic interrupts through the IOAPIC: finds ISA IRQ 0's GSI in the MADT's
 * interrupt source overrides, routes that IOAPIC pin to TIMER_VECTOR on this CPU, counts
 * TIMER_TICKS interrupts, prints TIMER ticks=N and powers off.
 */
#include "rt.h"

#define TIMER_VECTOR 0x30
#define TIMER_TICKS 5
#define TIMER_HZ 100 /* PIT interrupts a second */

static volatile u32 ticks;

static void on_tick(struct irq_frame *f) {
  (void)f;
  /* Capped: a tick that lands between the loop's check and its cli must not change the report. */
  if (ticks < TIMER_TICKS) ticks++;
}

void guest_main(void) {
  /* ISA interrupts that "conform to the bus" are edge-triggered, active high. */
  struct irq_route r = acpi_irq_route(ISA_IRQ_PIT, 0, 0);
  irq_route_here(r, TIMER_VECTOR, on_tick);
  printf("TIMER pin=%u vector=0x%x\n", r.pin, TIMER_VECTOR);
  pit_start_periodic(TIMER_HZ);

  /* sti's one-instruction shadow makes "sti; hlt" race-free. */
  while (ticks < TIMER_TICKS) __asm__ volatile("sti; hlt; cli" ::: "memory");
  printf("TIMER ticks=%u\n", ticks);
}
