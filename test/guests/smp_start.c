/* AP start-up with INIT/SIPI for the SMP test guests: see smp_start.h. */
#include "smp_start.h"

/* MADT processor local APIC entries (ACPI 6.4 section 5.2.12.2). */
#define MADT_ENTRIES 44
#define MADT_TYPE_LOCAL_APIC 0
#define MADT_LAPIC_APIC_ID 3
#define MADT_LAPIC_FLAGS 4
#define MADT_LAPIC_ENABLED 1u

/* ICR low values (Intel SDM vol. 3 section 11.6.1): delivery mode INIT (101b) / start-up (110b),
 * level assert. The start-up vector is the trampoline's page number. */
#define ICR_INIT_ASSERT 0x4500
#define ICR_STARTUP 0x4600
#define SIPI_VECTOR ((u32)(AP_TRAMPOLINE_START >> 12))

/* How long the BSP spins for an AP before sending the second SIPI the SDM asks for. */
#define SIPI_RETRY_SPINS 2000000

extern const u8 tramp_start[], tramp_end[], tramp_cr3[], tramp_stack[], tramp_entry[], tramp_gdtr64[],
    tramp_idtr64[];

u8 smp_ap_stacks[SMP_MAX_CPUS][SMP_AP_STACK_SIZE] __attribute__((aligned(16)));
static volatile u32 cpus_up;
/* The AP being started and its entry, read by ap_entry64 on the AP. */
static void (*volatile ap_main_fn)(u32 index);
static volatile u32 ap_index;

void smp_ap_started(void) { __atomic_fetch_add(&cpus_up, 1, __ATOMIC_RELEASE); }
u32 smp_cpus_up(void) { return __atomic_load_n(&cpus_up, __ATOMIC_ACQUIRE); }

/* Address in the copied trampoline page of a symbol inside the trampoline. */
static u64 tramp_addr(const u8 *sym) { return AP_TRAMPOLINE_START + (u64)(sym - tramp_start); }

/* Called by the trampoline on the AP's own stack, in long mode with the BSP's GDT and IDT. */
static void ap_entry64(void) {
  ap_main_fn(ap_index);
  halt_forever();
}

static void start_ap(u32 apic_id, u32 index) {
  struct desc_ptr gdtr = sgdt(), idtr = sidt();
  ap_index = index;
  *(volatile u64 *)tramp_addr(tramp_cr3) = READ_CR(3);
  *(volatile u64 *)tramp_addr(tramp_stack) = (u64)&smp_ap_stacks[index][SMP_AP_STACK_SIZE];
  *(volatile u64 *)tramp_addr(tramp_entry) = (u64)ap_entry64;
  memcpy((void *)tramp_addr(tramp_gdtr64), &gdtr, sizeof(gdtr));
  memcpy((void *)tramp_addr(tramp_idtr64), &idtr, sizeof(idtr));
  barrier();

  u32 before = smp_cpus_up();
  lapic_send_ipi(apic_id, ICR_INIT_ASSERT);
  lapic_send_ipi(apic_id, ICR_STARTUP | SIPI_VECTOR);
  for (u32 spins = 0; smp_cpus_up() == before; spins++) {
    if (spins == SIPI_RETRY_SPINS) lapic_send_ipi(apic_id, ICR_STARTUP | SIPI_VECTOR);
    cpu_relax();
  }
}

u32 smp_start_aps(void (*ap_main)(u32 index)) {
  lapic_enable();
  u32 bsp = lapic_id();
  u64 madt = acpi_find_table("APIC");
  if (!madt) return 0;
  memcpy((void *)AP_TRAMPOLINE_START, tramp_start, (usize)(tramp_end - tramp_start));
  ap_main_fn = ap_main;

  u32 listed = 0, len = rd32(madt + 4);
  for (u32 off = MADT_ENTRIES; off + 2 <= len;) {
    u8 type = rd8(madt + off), elen = rd8(madt + off + 1);
    if (elen < 2) break;
    if (type == MADT_TYPE_LOCAL_APIC && (rd32(madt + off + MADT_LAPIC_FLAGS) & MADT_LAPIC_ENABLED)) {
      u32 id = rd8(madt + off + MADT_LAPIC_APIC_ID);
      listed++;
      if (id != bsp && listed <= SMP_MAX_CPUS) start_ap(id, listed - 1);
    }
    off += elen;
  }
  return listed;
}
