/*
 * Application processor start-up shared by the SMP test guests (smp.c, smp_beat.c): every enabled local
 * APIC the MADT lists, other than the BSP's, is started with INIT/SIPI (Intel SDM vol. 3 section 9.4.4.1,
 * "Typical BSP Initialization Sequence"), one at a time, through the real-mode trampoline in trampoline.S.
 */
#ifndef GUEST_SMP_START_H
#define GUEST_SMP_START_H

#include "rt.h"

/* The most CPUs the guests start (and size their per-CPU arrays for). */
#define SMP_MAX_CPUS 64
#define SMP_AP_STACK_SIZE 4096

/* Each AP's stack: ap_stacks[index], index being its position in the MADT's list of enabled local APICs. */
extern u8 smp_ap_stacks[SMP_MAX_CPUS][SMP_AP_STACK_SIZE];

/*
 * Starts the APs. Each runs `ap_main(index)` in long mode on its own stack (smp_ap_stacks[index]) with the
 * BSP's CR3, GDT and IDT, and must call smp_ap_started() once; the BSP waits for that before it starts the
 * next. Returns how many enabled local APICs the MADT lists (the BSP included, at most SMP_MAX_CPUS
 * started), or 0 when there is no MADT.
 */
u32 smp_start_aps(void (*ap_main)(u32 index));
/* Counts this CPU as started (the BSP calls it for itself too, if it waits for smp_cpus_up()). */
void smp_ap_started(void);
/* How many CPUs have called smp_ap_started(). */
u32 smp_cpus_up(void);

#endif
