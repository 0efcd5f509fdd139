/*
 * Starts every enabled local APIC listed in the MADT with INIT/SIPI (smp_start.c), one at a time. Each
 * CPU prints "CPU <apic id> up" under a spinlock; the BSP waits for all, prints "SMP all=N" and powers off.
 */
#include "smp_start.h"

static spinlock print_lock;

static void announce(void) {
  spin_lock(&print_lock);
  printf("CPU %u up\n", lapic_id());
  spin_unlock(&print_lock);
  smp_ap_started();
}

static void ap_main(u32 index) {
  (void)index;
  lapic_enable();
  announce();
}

void guest_main(void) {
  lapic_enable();
  if (!acpi_find_table("APIC")) {
    printf("SMP no MADT\n");
    debug_exit(GUEST_EXIT_FAILURE);
  }
  announce();
  u32 listed = smp_start_aps(ap_main);
  while (smp_cpus_up() < listed) cpu_relax();
  spin_lock(&print_lock);
  printf("SMP all=%u\n", smp_cpus_up());
  spin_unlock(&print_lock);
}
