/* Runtime of denovm's test guests: serial, printf-lite, IDT, LAPIC/IOAPIC, ACPI lookup, stop paths. */
#include "rt.h"

/* ---- libc bits ---- */
void *memset(void *d, int c, usize n) {
  u8 *p = d;
  while (n--) *p++ = (u8)c;
  return d;
}
void *memcpy(void *d, const void *s, usize n) {
  u8 *p = d;
  const u8 *q = s;
  while (n--) *p++ = *q++;
  return d;
}
int memcmp(const void *a, const void *b, usize n) {
  const u8 *p = a, *q = b;
  for (; n; n--, p++, q++)
    if (*p != *q) return *p - *q;
  return 0;
}
usize strlen(const char *s) {
  usize n = 0;
  while (s[n]) n++;
  return n;
}

/* ---- 8250/16550 UART registers (offsets from the base port; PC16550D data sheet) ---- */
#define COM1_BASE SERIAL_PORTS_0_BASE
#define UART_RBR 0 /* receive buffer (read, DLAB=0) */
#define UART_THR 0 /* transmit holding (write, DLAB=0) */
#define UART_IER 1 /* interrupt enable */
#define UART_LCR 3 /* line control */
#define UART_LSR 5 /* line status */
#define UART_IER_RDI 0x01 /* interrupt when received data is available */
#define UART_LCR_8N1 0x03
#define UART_LSR_DR 0x01   /* data ready */
#define UART_LSR_THRE 0x20 /* transmit holding register empty */

void serial_init(void) {
  outb(COM1_BASE + UART_IER, 0);
  outb(COM1_BASE + UART_LCR, UART_LCR_8N1);
}

void putc(char c) {
  while (!(inb(COM1_BASE + UART_LSR) & UART_LSR_THRE)) cpu_relax();
  outb(COM1_BASE + UART_THR, (u8)c);
}

void puts(const char *s) {
  while (*s) {
    if (*s == '\n') putc('\r');
    putc(*s++);
  }
}

int serial_getc(void) {
  while (!(inb(COM1_BASE + UART_LSR) & UART_LSR_DR)) cpu_relax();
  return inb(COM1_BASE + UART_RBR);
}

int serial_poll(void) {
  if (!(inb(COM1_BASE + UART_LSR) & UART_LSR_DR)) return -1;
  return inb(COM1_BASE + UART_RBR);
}

static void put_unsigned(u64 v, unsigned base) {
  char buf[24];
  int i = 0;
  do {
    unsigned d = (unsigned)(v % base);
    buf[i++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
    v /= base;
  } while (v);
  while (i) putc(buf[--i]);
}

void printf(const char *fmt, ...) {
  __builtin_va_list ap;
  __builtin_va_start(ap, fmt);
  for (; *fmt; fmt++) {
    if (*fmt != '%') {
      if (*fmt == '\n') putc('\r');
      putc(*fmt);
      continue;
    }
    fmt++;
    int longs = 0;
    while (*fmt == 'l') longs++, fmt++;
    switch (*fmt) {
      case 's': {
        const char *s = __builtin_va_arg(ap, const char *);
        puts(s ? s : "(null)");
        break;
      }
      case 'c':
        putc((char)__builtin_va_arg(ap, int));
        break;
      case 'd': {
        i64 v = longs ? __builtin_va_arg(ap, i64) : __builtin_va_arg(ap, int);
        if (v < 0) putc('-'), v = -v;
        put_unsigned((u64)v, 10);
        break;
      }
      case 'u':
        put_unsigned(longs ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, u32), 10);
        break;
      case 'x':
        put_unsigned(longs ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, u32), 16);
        break;
      case 'p':
        puts("0x");
        put_unsigned((u64)__builtin_va_arg(ap, void *), 16);
        break;
      case '%':
        putc('%');
        break;
      default:
        putc('%');
        if (!*fmt) goto out;
        putc(*fmt);
    }
  }
out:
  __builtin_va_end(ap);
}

/* ---- Stopping the VM ---- */
void halt_forever(void) {
  for (;;) __asm__ volatile("cli; hlt");
}

void debug_exit(u8 code) {
  outb(DEBUG_EXIT_PORT, code);
  halt_forever();
}

void acpi_poweroff(void) {
  /* Hardware-reduced ACPI sleep control register (ACPI 6.4 section 4.8.3.7): SLP_TYP=S5 | SLP_EN. */
  outb(ACPI_SLEEP_CONTROL_PORT, (u8)((ACPI_SLEEP_TYPE_S5 << ACPI_SLP_TYP_SHIFT) | ACPI_SLP_EN));
  printf("POWEROFF FAILED\n");
  debug_exit(GUEST_EXIT_POWEROFF_FAILED);
}

/* i8042 command 0xFE pulses the CPU reset line (IBM PC/AT keyboard controller). */
#define I8042_CMD_RESET 0xfe

void i8042_reset(void) {
  outb(I8042_COMMAND_PORT, I8042_CMD_RESET);
  printf("RESET FAILED\n");
  debug_exit(GUEST_EXIT_RESET_FAILED);
}

/* ---- Spinlock ---- */
void spin_lock(spinlock *l) {
  while (__atomic_exchange_n(&l->v, 1, __ATOMIC_ACQUIRE)) {
    while (l->v) cpu_relax();
  }
}
void spin_unlock(spinlock *l) { __atomic_store_n(&l->v, 0, __ATOMIC_RELEASE); }

/* ---- IDT (Intel SDM vol. 3 section 6.14.1, 64-bit interrupt gate) ---- */
#define IDT_VECTORS 256
#define GATE_INTERRUPT_PRESENT 0x8e /* P=1, DPL=0, type 0xE (64-bit interrupt gate) */
#define KERNEL_CS 0x08              /* the VMM's flat GDT: null, code 0x08, data 0x10, TSS 0x18 */
#define EXCEPTION_VECTORS 32
#define SPURIOUS_VECTOR 0xff

struct idt_gate {
  u16 off0, sel;
  u8 ist, type;
  u16 off1;
  u32 off2, zero;
} __attribute__((packed));

static struct idt_gate idt[IDT_VECTORS] __attribute__((aligned(16)));
static irq_handler handlers[IDT_VECTORS];
extern const u64 isr_table[IDT_VECTORS];

void idt_load(void) {
  struct desc_ptr d = {sizeof(idt) - 1, (u64)idt};
  __asm__ volatile("lidt %0" ::"m"(d));
}

void idt_init(void) {
  u16 cs;
  __asm__ volatile("mov %%cs, %0" : "=r"(cs));
  for (int i = 0; i < IDT_VECTORS; i++) {
    u64 a = isr_table[i];
    idt[i].off0 = (u16)a;
    idt[i].sel = cs;
    idt[i].ist = 0;
    idt[i].type = GATE_INTERRUPT_PRESENT;
    idt[i].off1 = (u16)(a >> 16);
    idt[i].off2 = (u32)(a >> 32);
    idt[i].zero = 0;
  }
  idt_load();
}

void irq_register(u8 vector, irq_handler handler) { handlers[vector] = handler; }

void irq_dispatch(struct irq_frame *f) {
  if (f->vector < EXCEPTION_VECTORS) {
    printf("EXCEPTION vector=%llu error=0x%llx rip=0x%llx cs=0x%llx rflags=0x%llx rsp=0x%llx cr2=0x%llx\n", f->vector,
           f->error, f->rip, f->cs, f->rflags, f->rsp, READ_CR(2));
    debug_exit(GUEST_EXIT_EXCEPTION);
  }
  if (f->vector == SPURIOUS_VECTOR) return; /* spurious: no EOI (SDM vol. 3 section 11.9) */
  irq_handler h = handlers[f->vector];
  if (!h) {
    printf("UNEXPECTED IRQ vector=%llu\n", f->vector);
    debug_exit(GUEST_EXIT_UNEXPECTED_IRQ);
  }
  h(f);
  lapic_eoi();
}

/* ---- Local APIC registers (Intel SDM vol. 3 table 11-1, offsets from APIC_START) ---- */
#define LAPIC_ID 0x20
#define LAPIC_EOI 0xb0
#define LAPIC_SVR 0xf0
#define LAPIC_ICR_LOW 0x300
#define LAPIC_ICR_HIGH 0x310
#define LAPIC_SVR_ENABLE 0x100
#define LAPIC_ICR_BUSY 0x1000 /* delivery status */
#define LAPIC_ID_SHIFT 24
#define APIC_BASE_ENABLE (1u << 11) /* IA32_APIC_BASE global enable */
/* LAPIC timer (Intel SDM vol. 3 section 11.5.4): LVT timer, initial count, divide configuration. */
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INITIAL 0x380
#define LAPIC_TIMER_DIVIDE 0x3e0
#define LAPIC_TIMER_PERIODIC (1u << 17)
#define LAPIC_TIMER_TSC_DEADLINE (2u << 17) /* LVT timer mode 10b (SDM vol. 3 section 11.5.4.1) */
#define LAPIC_TIMER_DIVIDE_BY_16 0x3

void lapic_enable(void) {
  u64 base = rdmsr(MSR_APIC_BASE);
  if (!(base & APIC_BASE_ENABLE)) wrmsr(MSR_APIC_BASE, base | APIC_BASE_ENABLE);
  wr32(APIC_START + LAPIC_SVR, LAPIC_SVR_ENABLE | SPURIOUS_VECTOR);
}
u32 lapic_id(void) { return rd32(APIC_START + LAPIC_ID) >> LAPIC_ID_SHIFT; }
void lapic_eoi(void) { wr32(APIC_START + LAPIC_EOI, 0); }
void lapic_send_ipi(u32 apic_id, u32 icr_low) {
  while (rd32(APIC_START + LAPIC_ICR_LOW) & LAPIC_ICR_BUSY) cpu_relax();
  wr32(APIC_START + LAPIC_ICR_HIGH, apic_id << LAPIC_ID_SHIFT);
  wr32(APIC_START + LAPIC_ICR_LOW, icr_low);
  while (rd32(APIC_START + LAPIC_ICR_LOW) & LAPIC_ICR_BUSY) cpu_relax();
}

void lapic_timer_periodic(u8 vector, u32 count) {
  wr32(APIC_START + LAPIC_TIMER_DIVIDE, LAPIC_TIMER_DIVIDE_BY_16);
  wr32(APIC_START + LAPIC_LVT_TIMER, LAPIC_TIMER_PERIODIC | vector);
  wr32(APIC_START + LAPIC_TIMER_INITIAL, count);
}

void lapic_timer_tsc_deadline(u8 vector, u64 deadline) {
  wr32(APIC_START + LAPIC_LVT_TIMER, LAPIC_TIMER_TSC_DEADLINE | vector);
  /* SDM vol. 3 section 11.5.4.1: a WRMSR to IA32_TSC_DEADLINE after the LVT write must be ordered after it. */
  __asm__ volatile("mfence" ::: "memory");
  wrmsr(MSR_TSC_DEADLINE, deadline);
}

/* ---- IOAPIC (82093AA data sheet: IOREGSEL at +0, IOWIN at +0x10, redirection table at 0x10 + 2*pin) ---- */
#define IOAPIC_REGSEL 0x00
#define IOAPIC_WIN 0x10
#define IOAPIC_REDTBL(pin) (0x10 + 2 * (pin))
#define IOAPIC_RED_ACTIVE_LOW (1u << 13)
#define IOAPIC_RED_LEVEL (1u << 15)
#define IOAPIC_DEST_SHIFT 24

static void ioapic_write(u32 reg, u32 v) {
  wr32(IOAPIC_START + IOAPIC_REGSEL, reg);
  wr32(IOAPIC_START + IOAPIC_WIN, v);
}

void ioapic_route(u32 pin, u8 vector, u32 dest_apic_id, int level, int active_low) {
  u32 low = vector; /* fixed delivery, physical destination, unmasked */
  if (level) low |= IOAPIC_RED_LEVEL;
  if (active_low) low |= IOAPIC_RED_ACTIVE_LOW;
  ioapic_write(IOAPIC_REDTBL(pin) + 1, dest_apic_id << IOAPIC_DEST_SHIFT);
  ioapic_write(IOAPIC_REDTBL(pin), low);
}

/* ---- 8259 PIC data ports (OCW1 = interrupt mask) and 8254 PIT ---- */
#define PIC1_DATA_PORT 0x21
#define PIC2_DATA_PORT 0xa1
#define PIC_MASK_ALL 0xff
#define PIT_CH0_PORT 0x40
#define PIT_CMD_PORT 0x43
#define PIT_CMD_CH0_LOHI_MODE2 0x34 /* channel 0, lobyte/hibyte access, mode 2 (rate generator), binary */
#define PIT_HZ 1193182              /* input clock */

void pic_mask_all(void) {
  outb(PIC1_DATA_PORT, PIC_MASK_ALL);
  outb(PIC2_DATA_PORT, PIC_MASK_ALL);
}

void irq_route_here(struct irq_route route, u8 vector, irq_handler handler) {
  pic_mask_all();
  lapic_enable();
  irq_register(vector, handler);
  ioapic_route(route.pin, vector, lapic_id(), route.level, route.active_low);
}

void pit_start_periodic(u32 hz) {
  u32 divisor = PIT_HZ / hz;
  outb(PIT_CMD_PORT, PIT_CMD_CH0_LOHI_MODE2);
  outb(PIT_CH0_PORT, (u8)divisor);
  outb(PIT_CH0_PORT, (u8)(divisor >> 8));
}

static void on_serial_rx(struct irq_frame *f) { (void)f; }

void serial_rx_wakeup(u8 vector) {
  /* ISA interrupts that "conform to the bus" are edge-triggered, active high. */
  irq_route_here(acpi_irq_route(SERIAL_PORTS_0_IRQ, 0, 0), vector, on_serial_rx);
  outb(COM1_BASE + UART_IER, UART_IER_RDI);
}

/* ---- ACPI (ACPI 6.4 section 5.2) ---- */
#define RSDP_SEARCH_END 0x100000 /* the BIOS read-only area ends at 1 MiB (ACPI 6.4 section 5.2.5.1) */
#define RSDP_ALIGN 16
#define RSDP_V1_LEN 20
#define RSDP_REVISION 15
#define RSDP_LENGTH 20
#define RSDP_XSDT 24
#define SDT_LENGTH 4
#define SDT_HEADER_LEN 36

int acpi_checksum_ok(u64 pa, u32 len) {
  u8 sum = 0;
  for (u32 i = 0; i < len; i++) sum += rd8(pa + i);
  return sum == 0;
}

u64 acpi_find_rsdp(void) {
  for (u64 pa = ACPI_RSDP_START; pa < RSDP_SEARCH_END; pa += RSDP_ALIGN) {
    if (memcmp((const void *)pa, "RSD PTR ", 8) != 0) continue;
    if (!acpi_checksum_ok(pa, RSDP_V1_LEN)) continue;
    if (rd8(pa + RSDP_REVISION) < 2 || !acpi_checksum_ok(pa, rd32(pa + RSDP_LENGTH))) continue;
    return pa;
  }
  return 0;
}

u64 acpi_find_table(const char sig[4]) {
  u64 rsdp = acpi_find_rsdp();
  if (!rsdp) return 0;
  u64 xsdt = rd64(rsdp + RSDP_XSDT);
  if (memcmp((const void *)xsdt, "XSDT", 4) != 0) return 0;
  u32 len = rd32(xsdt + SDT_LENGTH);
  for (u32 off = SDT_HEADER_LEN; off + 8 <= len; off += 8) {
    u64 t = rd64(xsdt + off);
    if (memcmp((const void *)t, sig, 4) == 0) return t;
  }
  return 0;
}

/* MADT interrupt source override (ACPI 6.4 section 5.2.12.5): offsets and MPS INTI flags. */
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

struct irq_route acpi_irq_route(u32 source, int level, int active_low) {
  struct irq_route r = {source, level, active_low};
  u64 madt = acpi_find_table("APIC");
  if (!madt) return r;
  u32 len = rd32(madt + SDT_LENGTH);
  for (u32 off = MADT_ENTRIES; off + 2 <= len;) {
    u8 type = rd8(madt + off), elen = rd8(madt + off + 1);
    if (elen < 2) break;
    if (type == MADT_TYPE_ISO && rd8(madt + off + ISO_SOURCE) == source) {
      u16 flags = rd16(madt + off + ISO_FLAGS);
      u32 polarity = flags & ISO_POLARITY_MASK, trigger = (flags >> ISO_TRIGGER_SHIFT) & ISO_TRIGGER_MASK;
      r.pin = rd32(madt + off + ISO_GSI);
      if (polarity) r.active_low = polarity == ISO_POLARITY_LOW;
      if (trigger) r.level = trigger == ISO_TRIGGER_LEVEL;
    }
    off += elen;
  }
  return r;
}

/* ---- Entry from start.S ---- */
void rt_main(void) {
  serial_init();
  idt_init();
  guest_main();
  acpi_poweroff();
}
