/*
 * A guest that lets a test see time pass: counts PIT channel 0 interrupts (delivered through the
 * IOAPIC pin the MADT's interrupt source override names for ISA IRQ 0, as in timer.c) and prints
 * "TICK n" (n = 1, 2, 3, ...) every TICKS_PER_LINE ticks, forever. Between ticks it polls COM1 for
 * input; a 'q' prints BYE and powers off through the ACPI sleep control register (exit code 0).
 */
#include "rt.h"

#define TICK_VECTOR 0x30
/*
 * Ten lines a second from 20 interrupts a second: the guest wakes no more often than it has to, so
 * that 20 tickers at once (test/kvm/many_vms_test.ts) cost the host little, even the nested KVM host
 * whose one emulated CPU runs them all.
 */
#define TICKS_PER_LINE 2
#define TIMER_HZ 20 /* PIT interrupts a second */

static volatile u32 ticks;

static void on_tick(struct irq_frame *f) {
  (void)f;
  ticks++;
}

void guest_main(void) {
  /* ISA interrupts that "conform to the bus" are edge-triggered, active high. */
  struct irq_route r = acpi_irq_route(ISA_IRQ_PIT, 0, 0);
  irq_route_here(r, TICK_VECTOR, on_tick);
  printf("TICKER pin=%u vector=0x%x hz=%u\n", r.pin, TICK_VECTOR, TIMER_HZ);
  pit_start_periodic(TIMER_HZ);

  u32 lines = 0;
  for (;;) {
    /* sti's one-instruction shadow makes "sti; hlt" race-free; the tick handler runs inside it. */
    __asm__ volatile("sti; hlt; cli" ::: "memory");
    for (int c; (c = serial_poll()) >= 0;) {
      if (c == 'q') {
        printf("BYE\n");
        return; /* rt_main powers off */
      }
    }
    /* Interrupts are off here, so `ticks` is stable; several lines at once if ticks piled up. */
    while ((lines + 1) * TICKS_PER_LINE <= ticks) printf("TICK %u\n", ++lines);
  }
}
