/*
 * PIT channel 0 periodic interrupts through the IOAPIC: finds ISA IRQ 0's GSI in the MADT's
 * interrupt source overrides, routes that IOAPIC pin to TIMER_VECTOR on this CPU, counts
 * TIMER_TICKS interrupts, prints TIMER ticks=N. Then the LAPIC timer's TSC-deadline mode, as Linux
 * uses it when CPUID.1:ECX[24] announces it: prints TSCDEADLINE cpuid=0|1, and with the bit set arms
 * one deadline, waits for its interrupt and prints fired=N early=0|1 (early: it arrived before the
 * deadline). Powers off.
 */
#include "rt.h"

#define TIMER_VECTOR 0x30
#define TIMER_TICKS 5
#define TIMER_HZ 100 /* PIT interrupts a second */
#define DEADLINE_VECTOR 0x31
/* CPUID leaf 1 ECX bit 24: the LAPIC timer has TSC-deadline mode (Intel SDM vol. 2A, CPUID). */
#define CPUID_1_ECX_TSC_DEADLINE (1u << 24)
/* TSC cycles from arming to the deadline: a millisecond or less at any TSC rate KVM offers. */
#define DEADLINE_CYCLES 1000000ull

static volatile u32 ticks;

static volatile u32 deadline_fired;
static volatile u64 fired_at;

static void on_deadline(struct irq_frame *f) {
  (void)f;
  if (!deadline_fired) fired_at = rdtsc();
  deadline_fired++;
}

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

  u32 a, b, c, d;
  cpuid(1, 0, &a, &b, &c, &d);
  if (!(c & CPUID_1_ECX_TSC_DEADLINE)) {
    printf("TSCDEADLINE cpuid=0\n");
    return;
  }
  irq_register(DEADLINE_VECTOR, on_deadline);
  u64 deadline = rdtsc() + DEADLINE_CYCLES;
  lapic_timer_tsc_deadline(DEADLINE_VECTOR, deadline);
  /* The PIT keeps ticking, so every hlt ends within a tick whether or not the deadline fires. */
  for (u32 waits = 0; !deadline_fired && waits < TIMER_HZ; waits++) __asm__ volatile("sti; hlt; cli" ::: "memory");
  printf("TSCDEADLINE cpuid=1 fired=%u early=%u\n", deadline_fired, deadline_fired && fired_at < deadline);
}
