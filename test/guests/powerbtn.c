/*
 * ACPI power button through the Generic Event Device, without an AML interpreter: the VMM's DSDT
 * has a GED (ACPI0013, ACPI 6.4 section 5.6.9) whose interrupt is the SCI the FADT names, and whose
 * _EVT notifies \_SB.PWRB. For this guest the interrupt itself is the event. It reads the SCI number
 * from the FADT, finds its IOAPIC pin, trigger and polarity in the MADT's interrupt source override,
 * routes that pin to PWRBTN_VECTOR, prints READY and halts. On the interrupt it prints POWERBTN and
 * powers off through the ACPI sleep control register (exit code 0). The GED's second interrupt, the sleep
 * button's (an ISA IRQ with its defaults: edge, active high, unless the MADT overrides it), is routed to
 * SLPBTN_VECTOR: each press prints "SLEEPBTN n" and the guest goes on running.
 */
#include "rt.h"

#define PWRBTN_VECTOR 0x40
#define SLPBTN_VECTOR 0x41

/* FADT SCI_INT: u16 at offset 46 (ACPI 6.4 section 5.2.9, table 5.9). */
#define FADT_SCI_INT 46
/* Without an FADT: the SCI denovm uses (vmm/arch/layout.ts IRQ_ACPI_SCI). */
#define DEFAULT_SCI IRQ_ACPI_SCI

static void on_power_button(struct irq_frame *f) {
  (void)f;
  printf("POWERBTN\n");
  acpi_poweroff();
}

static u32 sleep_presses;

static void on_sleep_button(struct irq_frame *f) {
  (void)f;
  printf("SLEEPBTN %u\n", ++sleep_presses);
}

void guest_main(void) {
  u64 fadt = acpi_find_table("FACP");
  u32 sci = fadt ? rd16(fadt + FADT_SCI_INT) : DEFAULT_SCI;
  /* Without an override the SCI is a shareable, level-triggered, active-low interrupt on the identity pin
   * (ACPI 6.4 section 5.2.12.5). */
  struct irq_route r = acpi_irq_route(sci, 1, 1);
  irq_route_here(r, PWRBTN_VECTOR, on_power_button);
  struct irq_route s = acpi_irq_route(IRQ_ACPI_SLEEP_BUTTON, 0, 0);
  irq_route_here(s, SLPBTN_VECTOR, on_sleep_button);
  printf("READY sci=%u pin=%u level=%d active_low=%d vector=0x%x slpbtn_pin=%u slpbtn_level=%d\n", sci, r.pin,
         r.level, r.active_low, PWRBTN_VECTOR, s.pin, s.level);
  for (;;) __asm__ volatile("sti; hlt; cli" ::: "memory");
}
