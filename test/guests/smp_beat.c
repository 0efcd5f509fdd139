/*
 * An SMP guest that stays alive: every CPU the MADT lists is started with INIT/SIPI (smp_start.c), and each
 * takes its own LAPIC timer interrupts ("beats", BEAT_HZ a second) and counts them. Between beats every CPU
 * halts. Each CPU idles with a marker of its own (BEAT_MARKER(apic id)) in r12 and on its own stack, and
 * the beat handler checks, from the interrupted registers, that the CPU it runs on was interrupted in its
 * own idle loop (r12 is its marker, RSP is on its stack): a vCPU that took another vCPU's registers, or
 * restarted, shows up as "bad" beats or a count that stops.
 *
 * Lines on COM1 (read by test/kvm/snapshot_test.ts):
 *   SMPBEAT cpus=<n> hz=<beats a second on each CPU>        once every CPU is up and has taken a beat
 *   BEAT cpu=<apic id> n=<beats> bad=<beats that found the wrong marker or stack> cr3=0x<cr3 at the last beat>
 *                                                           for every CPU, in MADT order, on a COM1 'b'
 *   BEATS cpus=<n>                                          after those
 *   BYE                                                     on 'q', then ACPI power-off (exit code 0)
 */
#include "smp_start.h"

#define BEAT_VECTOR 0x30
#define BEAT_HZ 10
/* The LAPIC timer's count for BEAT_HZ (rt.h lapic_timer_periodic: 1 GHz APIC bus / 16). */
#define APIC_TIMER_HZ 62500000u
#define BEAT_COUNT (APIC_TIMER_HZ / BEAT_HZ)
/* A CPU's marker: recognizable, and different on each CPU. */
#define BEAT_MARKER(id) (0x6265617400000000ull | (u64)(id))
/* How far the interrupted RSP may be from where the CPU's idle loop started: less than a stack apart. */
#define STACK_SLACK 512

static volatile u32 beats[SMP_MAX_CPUS];
static volatile u32 bad[SMP_MAX_CPUS];
static volatile u64 cr3s[SMP_MAX_CPUS];
/* RSP of each CPU's idle loop, by APIC id; 0 until the CPU is up. */
static volatile u64 home_rsp[SMP_MAX_CPUS];
/* APIC ids in the order the CPUs came up (the MADT's). */
static volatile u32 order[SMP_MAX_CPUS];
static volatile u32 ordered;

static void on_beat(struct irq_frame *f) {
  u32 id = lapic_id();
  if (id >= SMP_MAX_CPUS) return;
  u64 home = home_rsp[id];
  u64 dist = f->rsp > home ? f->rsp - home : home - f->rsp;
  if (f->r12 != BEAT_MARKER(id) || !home || dist > STACK_SLACK) bad[id]++;
  cr3s[id] = READ_CR(3);
  beats[id]++;
}

static u64 current_rsp(void) {
  u64 rsp;
  __asm__ volatile("mov %%rsp, %0" : "=r"(rsp));
  return rsp;
}

/* One halt with interrupts on and the marker in r12: every beat this CPU takes interrupts this. */
static inline void idle_once(u64 marker) {
  register u64 m __asm__("r12") = marker;
  /* sti's one-instruction shadow makes "sti; hlt" race-free. */
  __asm__ volatile("sti; hlt; cli" : "+r"(m)::"memory");
}

/* This CPU's set-up: LAPIC on, its stack and marker recorded, its timer started. Returns its APIC id. */
static u32 cpu_setup(u64 rsp) {
  lapic_enable();
  u32 id = lapic_id();
  if (id >= SMP_MAX_CPUS) {
    printf("SMPBEAT apic id %u too large\n", id);
    debug_exit(GUEST_EXIT_FAILURE);
  }
  home_rsp[id] = rsp;
  order[__atomic_fetch_add(&ordered, 1, __ATOMIC_ACQ_REL)] = id;
  lapic_timer_periodic(BEAT_VECTOR, BEAT_COUNT);
  return id;
}

static void ap_main(u32 index) {
  (void)index;
  u32 id = cpu_setup(current_rsp());
  smp_ap_started();
  for (;;) idle_once(BEAT_MARKER(id));
}

static int all_beating(u32 n) {
  for (u32 i = 0; i < n; i++)
    if (!beats[order[i]]) return 0;
  return 1;
}

static void report(u32 n) {
  for (u32 i = 0; i < n; i++) {
    u32 id = order[i];
    printf("BEAT cpu=%u n=%u bad=%u cr3=0x%llx\n", id, beats[id], bad[id], cr3s[id]);
  }
  printf("BEATS cpus=%u\n", n);
}

void guest_main(void) {
  pic_mask_all();
  irq_register(BEAT_VECTOR, on_beat);
  u32 id = cpu_setup(current_rsp());
  smp_ap_started();
  u32 listed = smp_start_aps(ap_main);
  if (!listed) {
    printf("SMPBEAT no MADT\n");
    debug_exit(GUEST_EXIT_FAILURE);
  }
  if (listed > SMP_MAX_CPUS) listed = SMP_MAX_CPUS;
  while (smp_cpus_up() < listed || !all_beating(listed)) idle_once(BEAT_MARKER(id));
  printf("SMPBEAT cpus=%u hz=%u\n", listed, BEAT_HZ);

  for (;;) {
    idle_once(BEAT_MARKER(id));
    for (int c; (c = serial_poll()) >= 0;) {
      if (c == 'b') report(listed);
      if (c == 'q') {
        printf("BYE\n");
        return; /* rt_main powers off */
      }
    }
  }
}
