/*
 * Tiny freestanding runtime shared by denovm's test guests.
 *
 * The guests are entered like a Linux vmlinux (64-bit boot protocol,
 * Documentation/arch/x86/boot.rst): long mode, identity-mapped low memory,
 * RSI = the zero page, interrupts off. Addresses come from layout.h, which
 * build.ts generates from vmm/arch/layout.ts.
 */
#ifndef GUEST_RT_H
#define GUEST_RT_H

#include "layout.h"

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;
typedef unsigned long usize;

/* Exit codes written to DEBUG_EXIT_PORT when something goes wrong inside the guest.
 * Chosen away from crosvm's codes (0, 32..36) so a test can tell them apart. */
#define GUEST_EXIT_EXCEPTION 65      /* a CPU exception reached the runtime's IDT */
#define GUEST_EXIT_POWEROFF_FAILED 66 /* ACPI S5 write returned: the VMM did not stop */
#define GUEST_EXIT_RESET_FAILED 67   /* i8042 reset write returned */
#define GUEST_EXIT_UNEXPECTED_IRQ 68 /* an interrupt vector nobody registered */
#define GUEST_EXIT_PANIC_FAILED 69   /* pvpanic write returned */
#define GUEST_EXIT_FAILURE 70        /* the guest found something wrong and says so on COM1 */

/* ---- Port I/O, MSRs, control registers, CPUID ---- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) {
  u8 v;
  __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
  return v;
}
static inline u64 rdmsr(u32 msr) {
  u32 lo, hi;
  __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
  return ((u64)hi << 32) | lo;
}
static inline void wrmsr(u32 msr, u64 v) {
  __asm__ volatile("wrmsr" ::"c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}
static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d) {
  __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}
#define READ_CR(n)                                          \
  ({                                                        \
    u64 _v;                                                 \
    __asm__ volatile("mov %%cr" #n ", %0" : "=r"(_v));      \
    _v;                                                     \
  })
static inline u64 rdtsc(void) {
  u32 lo, hi;
  __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
  return ((u64)hi << 32) | lo;
}
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }
static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

/* Operand of lgdt/lidt/sgdt/sidt: 16-bit limit, 64-bit base (Intel SDM vol. 3 section 3.5.1). */
struct desc_ptr {
  u16 limit;
  u64 base;
} __attribute__((packed));
static inline struct desc_ptr sgdt(void) {
  struct desc_ptr d;
  __asm__ volatile("sgdt %0" : "=m"(d));
  return d;
}
static inline struct desc_ptr sidt(void) {
  struct desc_ptr d;
  __asm__ volatile("sidt %0" : "=m"(d));
  return d;
}

/* IA32_EFER (Intel SDM vol. 4, MSR 0xC0000080) and IA32_APIC_BASE (MSR 0x1B). */
#define MSR_EFER 0xc0000080u
#define MSR_APIC_BASE 0x1bu
#define MSR_TSC_DEADLINE 0x6e0u /* IA32_TSC_DEADLINE */

/* Guest-physical memory: identity mapped, so a physical address is a pointer. */
static inline u8 rd8(u64 pa) { return *(volatile u8 *)pa; }
static inline u16 rd16(u64 pa) { return *(volatile u16 *)pa; }
static inline u32 rd32(u64 pa) { return *(volatile u32 *)pa; }
static inline u64 rd64(u64 pa) { return *(volatile u64 *)pa; }
static inline void wr32(u64 pa, u32 v) { *(volatile u32 *)pa = v; }

/* ---- Freestanding libc bits gcc may emit calls to ---- */
void *memset(void *d, int c, usize n);
void *memcpy(void *d, const void *s, usize n);
int memcmp(const void *a, const void *b, usize n);
usize strlen(const char *s);

/* ---- COM1 (8250 UART; registers per the 16550 data sheet) ---- */
void serial_init(void);
void putc(char c);
void puts(const char *s); /* no newline added */
int serial_getc(void);    /* blocks polling LSR data-ready */
int serial_poll(void);    /* the next received byte, or -1 when none is waiting (does not block) */
/*
 * Routes COM1's receive interrupt (IER "received data available", an edge on ISA IRQ 4's IOAPIC pin) to
 * this CPU on `vector`, with a handler that only wakes the CPU: a "sti; hlt" idle loop then sleeps until
 * a byte arrives and reads it with serial_poll. Uses irq_route_here (the PICs masked, this LAPIC on).
 */
void serial_rx_wakeup(u8 vector);
/* printf-lite: %s %c %d %u %x %p, with l/ll size modifiers; %% */
void printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---- Stopping the VM ---- */
void debug_exit(u8 code) __attribute__((noreturn));
void acpi_poweroff(void) __attribute__((noreturn));
void i8042_reset(void) __attribute__((noreturn));
void halt_forever(void) __attribute__((noreturn));

/* ---- Interrupts ---- */
/* Saved state pushed by the entry stubs in start.S (order matters). */
struct irq_frame {
  u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
  u64 vector, error;
  u64 rip, cs, rflags, rsp, ss;
};
typedef void (*irq_handler)(struct irq_frame *f);
void idt_init(void);                              /* every vector → the runtime's stubs */
void idt_load(void);                              /* load the runtime IDT on this CPU */
void irq_register(u8 vector, irq_handler handler); /* handler runs, then LAPIC EOI */

/* ---- Local APIC (xAPIC MMIO, Intel SDM vol. 3 chapter 11) and IOAPIC (82093AA) ---- */
void lapic_enable(void);
u32 lapic_id(void);
void lapic_eoi(void);
void lapic_send_ipi(u32 apic_id, u32 icr_low);
void ioapic_route(u32 pin, u8 vector, u32 dest_apic_id, int level, int active_low);
/*
 * This CPU's LAPIC timer in periodic mode on `vector`, counting down from `count` at the APIC bus clock / 16
 * (KVM's APIC bus runs at 1 GHz, so a count of 62500 is about 1 ms); a count of 0 stops it.
 */
void lapic_timer_periodic(u8 vector, u32 count);
/* This CPU's LAPIC timer in TSC-deadline mode on `vector`: one interrupt once the TSC reaches `deadline`. */
void lapic_timer_tsc_deadline(u8 vector, u64 deadline);

/* Masks every input of both 8259 PICs (OCW1), so only the IOAPIC delivers. */
void pic_mask_all(void);

/* Where an interrupt source arrives on the IOAPIC, and how it is signalled. */
struct irq_route {
  u32 pin;
  int level, active_low;
};
/*
 * The route of interrupt `source` (an ISA IRQ, or the SCI): the MADT's interrupt source override for
 * it (ACPI 6.4 section 5.2.12.5) if there is one, else the identity pin. `level` and `active_low` are
 * kept where there is no override or where it says "conforms to the bus" (0).
 */
struct irq_route acpi_irq_route(u32 source, int level, int active_low);
/*
 * Delivers `route` to this CPU only through the IOAPIC: masks both 8259 PICs, enables this CPU's
 * LAPIC, registers `handler` for `vector` and points the IOAPIC pin at it.
 */
void irq_route_here(struct irq_route route, u8 vector, irq_handler handler);

/* ---- 8254 PIT (Intel 82C54 data sheet) ---- */
#define ISA_IRQ_PIT 0                /* channel 0's output is ISA IRQ 0 */
void pit_start_periodic(u32 hz);    /* channel 0, mode 2 (rate generator) at about `hz` interrupts a second */

/* ---- ACPI tables (ACPI 6.4 chapter 5) ---- */
int acpi_checksum_ok(u64 pa, u32 len);
/* The RSDP found in 0xe0000..0xfffff, or 0. */
u64 acpi_find_rsdp(void);
/* The table with this signature listed in the XSDT, or 0. */
u64 acpi_find_table(const char sig[4]);

/* ---- Spinlock (xchg based) ---- */
typedef struct {
  volatile u32 v;
} spinlock;
void spin_lock(spinlock *l);
void spin_unlock(spinlock *l);

/* Zero page pointer from RSI at entry, and the entry state start.S recorded. */
extern u64 boot_params;
extern u64 entry_rsp, entry_rflags, entry_cs, entry_ds, entry_ss;

/* Each guest defines this. When it returns the runtime powers off. */
void guest_main(void);

#endif
