// A fake /dev/kvm for hosts without KVM, so that denovm's KVM-facing code (vmm/kvm/vm.ts, vmm/arch/cpu.ts,
// vmm/kvm/vcpu.ts, vmm/kvm/vcpu_worker.ts, vmm/machine.ts) runs for real in tests.
//
// How it is used: denovm loads libc through ffi/libc.ts from $DENOVM_LIBC. This shared object links
// against libc and defines only open, close, ioctl, mmap and munmap; Deno.dlopen + dlsym look in this
// object first and then in its DT_NEEDED libc, so every other libc symbol is libc's own. Calls on
// anything that is not the fake KVM are forwarded to libc's functions (dlsym(RTLD_NEXT, ...)).
//
// What it fakes: the KVM system fd (open of $DENOVM_KVM_DEVICE, default /dev/kvm), VM fds and vCPU
// fds. Every fd is a real memfd, so close, poll and mmap behave; a vCPU's memfd holds its struct
// kvm_run (KVM_GET_VCPU_MMAP_SIZE bytes), so the VMM's mmap of the vCPU fd is a real shared mapping.
// KVM_RUN on vCPU 0 plays the scripted guest named by $DENOVM_FAKE_KVM_SCRIPT (see SCRIPTS below);
// other vCPUs block in KVM_RUN until kicked (immediate_exit, or a signal: -1/EINTR), like APs that
// wait for INIT/SIPI. What the VMM asked for is written to $DENOVM_FAKE_KVM_LOG, one JSON object per
// line, for the tests to check.
//
// Snapshot state: every KVM_GET_* of vCPU and VM state (registers, FPU, XSAVE area, XCRs, MSRs, local APIC, MP
// state, vCPU events, debug registers; the PICs and IOAPIC, the PIT, the KVM clock) returns what the matching
// KVM_SET_* stored, from reset values; the capabilities are a real host's (KVM_CAP_XSAVE2 answers 4096, or
// $DENOVM_FAKE_KVM_XSAVE_SIZE bytes, as a host whose VMs may use AMX does). KVM_GET_MSR_INDEX_LIST lists a
// few MSRs, IA32_TSC first; those and the MTRRs (which real KVM serves without listing them) are readable and
// writable, and KVM_GET_MSRS/KVM_SET_MSRS stop at any other (or at $DENOVM_FAKE_KVM_REFUSE_MSR) as KVM does.
// The clock runs on from the value KVM_SET_CLOCK set, in host monotonic time.
//
// Which KVM it is: with $DENOVM_FAKE_KVM_MODULE set to kvm_pvm, kvm_amd or kvm_intel, an open of
// /sys/module/<that module> succeeds and an open of the other two fails with ENOENT, so denovm's
// host-kind check (vmm/kvm/host.ts) sees that kind on any machine; unset, those opens reach the real
// /sys. As kvm_amd the fake also does what KVM on SVM does on a triple fault: it re-initializes the
// vCPU (reset-state registers) before KVM_RUN returns KVM_EXIT_SHUTDOWN.
//
// Guest-physical addresses and ports come from vmm/arch/layout.ts: test/support/fake_kvm.ts passes them
// as -D definitions (LAYOUT_*), so this file hard-codes none of them.

#define _GNU_SOURCE
#include <asm/bootparam.h>
#include <asm/processor-flags.h>
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <linux/serial_reg.h>
#include <linux/virtio_config.h>
#include <linux/virtio_mmio.h>
#include <misc/pvpanic.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef LAYOUT_SERIAL_COM1_BASE
#error "build with test/support/fake_kvm.ts: it passes vmm/arch/layout.ts values as LAYOUT_* definitions"
#endif

// ---- What the fake KVM reports ----
/** KVM_GET_API_VERSION (linux/kvm.h KVM_API_VERSION). */
#define FAKE_API_VERSION KVM_API_VERSION
/** KVM_CAP_MAX_VCPUS / KVM_CAP_NR_VCPUS answer. */
#define FAKE_MAX_VCPUS 8
/** KVM_CAP_NR_MEMSLOTS answer. */
#define FAKE_NR_MEMSLOTS 32
#define PAGE_SIZE 4096
/** struct kvm_run page, PIO data page (KVM_PIO_PAGE_OFFSET), coalesced MMIO page (asm/kvm.h). */
#define FAKE_VCPU_MMAP_PAGES (KVM_COALESCED_MMIO_PAGE_OFFSET + 1)
#define FAKE_VCPU_MMAP_SIZE (FAKE_VCPU_MMAP_PAGES * PAGE_SIZE)
#define MAX_VMS 16
#define MAX_FAKE_FDS 64
#define MAX_RUN_MAPS 8
/** Largest XSAVE area $DENOVM_FAKE_KVM_XSAVE_SIZE may ask for (AMX's state makes about 11 KiB). */
#define FAKE_XSAVE_MAX 16384
/** KVM_GET/SET_MSRS take fewer entries than this (Linux arch/x86/kvm/x86.c MAX_IO_MSRS). */
#define FAKE_MAX_IO_MSRS 256
/** kvm_clock_data.flags KVM_SET_CLOCK takes (Linux arch/x86/kvm/x86.c KVM_CLOCK_VALID_FLAGS). */
#define FAKE_CLOCK_VALID_FLAGS (KVM_CLOCK_TSC_STABLE | KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC)
/** kvm_vcpu_events.flags KVM_SET_VCPU_EVENTS takes (asm/kvm.h KVM_VCPUEVENT_VALID_*). */
#define FAKE_VCPUEVENT_VALID_FLAGS                                                                                   \
  (KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR | KVM_VCPUEVENT_VALID_SHADOW |                   \
   KVM_VCPUEVENT_VALID_SMM | KVM_VCPUEVENT_VALID_PAYLOAD | KVM_VCPUEVENT_VALID_TRIPLE_FAULT)

// ---- x86 facts (Intel SDM) not in the exported uapi headers ----
/** IA32_EFER bits (Intel SDM vol. 3A, 2.2.1): long mode enable and active. */
#define EFER_LME (1ull << 8)
#define EFER_LMA (1ull << 10)
/** Segment descriptor bits (Intel SDM vol. 3A, 3.4.5): present (47) and 64-bit code (53). */
#define DESC_PRESENT (1ull << 47)
#define DESC_LONG (1ull << 53)
/** Page table entry bits (Intel SDM vol. 3A, 4.5): present, page size; address bits 51..12. */
#define PTE_PRESENT 0x1ull
#define PTE_PAGE_SIZE 0x80ull
#define PTE_ADDR_MASK 0x000ffffffffff000ull
/** Local APIC register offsets (Intel SDM vol. 3A, table 11-1) and LVT bits (11.5.1). */
#define APIC_ID_REG 0x20
#define APIC_ID_SHIFT 24
#define APIC_LVT_LINT0_REG 0x350
#define APIC_LVT_LINT1_REG 0x360
#define APIC_LVT_MASKED (1u << 16)
#define APIC_MODE_EXTINT 0x7
#define APIC_DELIVERY_MODE_SHIFT 8
#define MSR_IA32_PAT 0x277
/** MSRs (Linux arch/x86/include/asm/msr-index.h) the fake lists in KVM_GET_MSR_INDEX_LIST, IA32_TSC first. */
static const uint32_t FAKE_LISTED_MSRS[] = {
    0x10,       /* IA32_TSC */
    0x174,      /* IA32_SYSENTER_CS */
    0x175,      /* IA32_SYSENTER_ESP */
    0x176,      /* IA32_SYSENTER_EIP */
    0x1a0,      /* IA32_MISC_ENABLE */
    MSR_IA32_PAT,
    0xc0000081, /* STAR */
    0xc0000082, /* LSTAR */
    0xc0000083, /* CSTAR */
    0xc0000084, /* SYSCALL_MASK */
    0xc0000102, /* KERNEL_GS_BASE */
};
#define FAKE_LISTED_COUNT (sizeof FAKE_LISTED_MSRS / sizeof FAKE_LISTED_MSRS[0])
/** The MTRRs (Intel SDM vol. 3A, 12.11): 8 variable ranges (base, mask), the fixed ranges, the default type. */
#define MSR_MTRR_PHYSBASE0 0x200
#define MTRR_VARIABLE_MSRS 16
#define MSR_MTRR_FIX64K_00000 0x250
#define MSR_MTRR_FIX16K_80000 0x258
#define MSR_MTRR_FIX16K_A0000 0x259
#define MSR_MTRR_FIX4K_C0000 0x268
#define MTRR_FIX4K_MSRS 8
#define MSR_MTRR_DEF_TYPE 0x2ff
#define FAKE_MTRR_COUNT (MTRR_VARIABLE_MSRS + 3 + MTRR_FIX4K_MSRS + 1)
#define FAKE_MSR_COUNT (FAKE_LISTED_COUNT + FAKE_MTRR_COUNT)
/** Reset values (Intel SDM vol. 3A, 9.1.1 and 17.2): DR6 0xffff0ff0, DR7 0x400; XCR0 x87 only. */
#define DR6_RESET 0xffff0ff0ull
#define DR7_RESET 0x400ull
#define XCR0_RESET 1ull
/** IA32_PAT's power-up value (Intel SDM vol. 3A, 12.12.4). */
#define PAT_RESET 0x0007040600070406ull
/** CPUID leaf 1 EBX bits 31..24: initial APIC id (Intel SDM vol. 2A, CPUID). */
#define LEAF1_EBX_APIC_ID_SHIFT 24
/** CPUID leaf 1 ECX bit 13: CMPXCHG16B; bit 31: hypervisor present. */
#define LEAF1_ECX_CX16 (1u << 13)
/** Linux boot protocol: setup_header.header is "HdrS" (Documentation/arch/x86/boot.rst). */
#define BOOT_HDR_MAGIC 0x53726448u
/** i8042 command 0xFE pulses the CPU reset line (Linux arch/x86/kernel/reboot.c, kb_wait + outb(0xfe, 0x64)). */
#define I8042_CMD_RESET 0xfe
/** virtio-mmio magic value "virt" and the modern transport version (virtio 1.2, 4.2.2). */
#define VIRTIO_MMIO_MAGIC 0x74726976u
#define VIRTIO_MMIO_MODERN_VERSION 2
/** ACPI sleep control register value for S5 (vmm/arch/layout.ts, ACPI 6.4 4.8.3.7). */
#define ACPI_S5_VALUE ((LAYOUT_ACPI_SLEEP_TYPE_S5 << LAYOUT_ACPI_SLP_TYP_SHIFT) | LAYOUT_ACPI_SLP_EN)
/** Port 0x80, the POST code port (vmm/kvm/vcpu_worker.ts POST_CODE_PORT): the worker answers it itself. */
#define POST_CODE_PORT 0x80
/** What an in from an idle ISA port reads (vmm/kvm/vcpu_worker.ts ISA_FLOATING_BUS). */
#define ISA_FLOATING_BUS 0xff

// ---- Scripted-guest timing ----
/** Longest single sleep inside KVM_RUN, so a kick whose signal raced the sleep is seen soon. */
#define BLOCK_SLICE_NS 2000000ll
/** "spin" emits one 'T' per this much wall time. */
#define SPIN_TICK_NS 50000000ll
/** "echo" polls the UART's LSR this often while no byte is ready. */
#define ECHO_POLL_NS 1000000ll
/**
 * "loop": iterations of out 0x80 (overridable by $DENOVM_FAKE_KVM_LOOP_COUNT); every Nth is an in. "exit-loop": outs
 * only. "lines": lines of text.
 */
#define LOOP_DEFAULT_COUNT 1000000ull
#define LOOP_IN_EVERY 1000ull

#define TEXT_MAX 8192

// ---- State ----
enum fd_kind { FD_SYSTEM = 1, FD_VM, FD_VCPU };
enum await_kind { AWAIT_NONE, AWAIT_IN, AWAIT_MMIO_READ };

struct vm;

struct vcpu {
  int used;
  int id;
  int fd;
  struct vm *vm;
  struct kvm_run *run; /* the fake's own mapping of the vCPU memfd */
  struct kvm_regs regs;
  struct kvm_sregs sregs;
  struct kvm_lapic_state lapic;
  struct kvm_mp_state mp;
  /* snapshot state: XSAVE area (xsave_size bytes used), XCRs, events, debug registers, MSRs by fake_msr_slot */
  uint8_t xsave[FAKE_XSAVE_MAX];
  struct kvm_xcrs xcrs;
  struct kvm_vcpu_events events;
  struct kvm_debugregs debugregs;
  uint64_t msrs[FAKE_MSR_COUNT];
  int tid_logged;
  uint64_t runs, eintr_immediate, eintr_signal, eagain;
  /* the VMM's mappings of this vCPU's fd: a live mapping keeps a real KVM vCPU (and its VM) alive */
  uintptr_t maps[MAX_RUN_MAPS];
  int nmaps;
  /* scripted guest */
  int phase;
  enum await_kind await;
  int await_size;
  uint64_t answer;
  char text[TEXT_MAX];
  size_t text_len, text_pos;
  uint64_t counter, aux1, aux2;
  int64_t last_tick_ns;
};

struct slot {
  int used;
  uint32_t flags;
  uint64_t guest, size, host;
};

struct vm {
  int used;
  int fd;
  char script[64];
  /* "loop", "exit-loop" and "mmio-loop" iterations, read from the environment when the VM is created */
  uint64_t loop_count;
  struct slot slots[FAKE_NR_MEMSLOTS];
  struct vcpu vcpus[FAKE_MAX_VCPUS];
  /* the in-kernel devices, once created, and their state */
  int irqchip, pit;
  struct kvm_pic_state pic[2];
  struct kvm_ioapic_state ioapic;
  struct kvm_pit_state2 pit_state;
  /* the KVM clock: clock_ns at host monotonic time clock_at_ns */
  uint64_t clock_ns;
  int64_t clock_at_ns;
};

struct fake_fd {
  int fd;
  enum fd_kind kind;
  struct vm *vm;
  struct vcpu *vcpu;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct vm vms[MAX_VMS];
static struct fake_fd fds[MAX_FAKE_FDS];
static int log_fd = -1;
/** $DENOVM_FAKE_KVM_FAIL_IOCTL (read when the KVM device is opened): this request fails with ENOMEM. */
static unsigned long fail_request;
static char log_path[4096];

static int (*real_open)(const char *, int, ...);
static int (*real_close)(int);
static int (*real_ioctl)(int, unsigned long, ...);
static void *(*real_mmap)(void *, size_t, int, int, int, off_t);
static int (*real_munmap)(void *, size_t);

static void resolve_real(void) {
  if (real_open) return;
  real_close = dlsym(RTLD_NEXT, "close");
  real_ioctl = dlsym(RTLD_NEXT, "ioctl");
  real_mmap = dlsym(RTLD_NEXT, "mmap");
  real_munmap = dlsym(RTLD_NEXT, "munmap");
  real_open = dlsym(RTLD_NEXT, "open");
}

// ---- The event log: one JSON object per line, appended to $DENOVM_FAKE_KVM_LOG ----

static void open_log_locked(void) {
  const char *p = getenv("DENOVM_FAKE_KVM_LOG");
  if (!p || !*p) {
    if (log_fd >= 0) real_close(log_fd);
    log_fd = -1;
    log_path[0] = 0;
    return;
  }
  if (log_fd >= 0 && strcmp(p, log_path) == 0) return;
  if (log_fd >= 0) real_close(log_fd);
  snprintf(log_path, sizeof log_path, "%s", p);
  log_fd = real_open(p, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
}

/** Append one event; `fmt` gives the fields after "ev". Keeps errno. */
static void log_event(const char *ev, const char *fmt, ...) {
  int saved = errno;
  if (log_fd >= 0) {
    char line[4096];
    int n = snprintf(line, sizeof line, "{\"ev\":\"%s\"", ev);
    if (fmt && *fmt) {
      line[n++] = ',';
      va_list ap;
      va_start(ap, fmt);
      n += vsnprintf(line + n, sizeof line - n - 2, fmt, ap);
      va_end(ap);
    }
    if (n > (int)sizeof line - 2) n = sizeof line - 2;
    line[n++] = '}';
    line[n++] = '\n';
    if (write(log_fd, line, n) < 0) {
      /* a test without a log: nothing to do */
    }
  }
  errno = saved;
}

/** A JSON string body for `s` (quotes, backslashes and control bytes escaped). */
static void json_escape(const char *s, size_t len, char *out, size_t cap) {
  size_t o = 0;
  for (size_t i = 0; i < len && o + 7 < cap; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c == '"' || c == '\\') {
      out[o++] = '\\';
      out[o++] = (char)c;
    } else if (c < 0x20 || c >= 0x7f) {
      o += snprintf(out + o, cap - o, "\\u%04x", c);
    } else {
      out[o++] = (char)c;
    }
  }
  out[o] = 0;
}

// ---- fd table ----

static struct fake_fd *find_fd(int fd) {
  for (int i = 0; i < MAX_FAKE_FDS; i++)
    if (fds[i].kind && fds[i].fd == fd) return &fds[i];
  return NULL;
}

static struct fake_fd *add_fd(int fd, enum fd_kind kind, struct vm *vm, struct vcpu *vcpu) {
  for (int i = 0; i < MAX_FAKE_FDS; i++) {
    if (!fds[i].kind) {
      fds[i] = (struct fake_fd){fd, kind, vm, vcpu};
      return &fds[i];
    }
  }
  return NULL;
}

static int new_memfd(const char *name, size_t size) {
  int fd = memfd_create(name, MFD_CLOEXEC);
  if (fd >= 0 && size && ftruncate(fd, (off_t)size) < 0) {
    real_close(fd);
    return -1;
  }
  return fd;
}

static int fail(int e) {
  errno = e;
  return -1;
}

static int env_int(const char *name, int dflt) {
  const char *v = getenv(name);
  return v && *v ? (int)strtol(v, NULL, 0) : dflt;
}

// ---- Guest memory through the recorded slots ----

/** Host pointer for [gpa, gpa+len) when one memory slot holds all of it; NULL otherwise. */
static void *gpa_to_host(struct vm *vm, uint64_t gpa, uint64_t len) {
  void *p = NULL;
  pthread_mutex_lock(&lock);
  for (int i = 0; i < FAKE_NR_MEMSLOTS; i++) {
    struct slot *s = &vm->slots[i];
    if (s->used && gpa >= s->guest && len <= s->size && gpa - s->guest <= s->size - len) {
      p = (void *)(uintptr_t)(s->host + (gpa - s->guest));
      break;
    }
  }
  pthread_mutex_unlock(&lock);
  return p;
}

static int read_u64(struct vm *vm, uint64_t gpa, uint64_t *out) {
  void *p = gpa_to_host(vm, gpa, 8);
  if (!p) return -1;
  memcpy(out, p, 8);
  return 0;
}

/** Walk the guest's 4-level page tables at `cr3` for virtual address `va`; -1 when not mapped. */
static int walk(struct vm *vm, uint64_t cr3, uint64_t va, uint64_t *pa) {
  uint64_t table = cr3 & PTE_ADDR_MASK;
  for (int level = 4; level >= 1; level--) {
    int shift = 12 + 9 * (level - 1);
    uint64_t e;
    if (read_u64(vm, table + ((va >> shift) & 0x1ff) * 8, &e) < 0) return -1;
    if (!(e & PTE_PRESENT)) return -1;
    if (level == 1 || ((level == 2 || level == 3) && (e & PTE_PAGE_SIZE))) {
      uint64_t page = 1ull << shift;
      *pa = (e & PTE_ADDR_MASK & ~(page - 1)) | (va & (page - 1));
      return 0;
    }
    table = e & PTE_ADDR_MASK;
  }
  return -1;
}

// ---- Exits ----

static void say(struct vcpu *v, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(v->text + v->text_len, TEXT_MAX - v->text_len, fmt, ap);
  va_end(ap);
  if (n > 0) v->text_len += (size_t)n;
  if (v->text_len >= TEXT_MAX) v->text_len = TEXT_MAX - 1;
}

static int exit_io(struct vcpu *v, int dir, uint16_t port, int size, uint32_t value) {
  struct kvm_run *run = v->run;
  run->exit_reason = KVM_EXIT_IO;
  run->io.direction = (uint8_t)dir;
  run->io.size = (uint8_t)size;
  run->io.port = port;
  run->io.count = 1;
  run->io.data_offset = KVM_PIO_PAGE_OFFSET * PAGE_SIZE;
  uint8_t *data = (uint8_t *)run + run->io.data_offset;
  if (dir == KVM_EXIT_IO_OUT) {
    memcpy(data, &value, (size_t)size);
  } else {
    memset(data, 0xa5, (size_t)size); /* a pattern the VMM must overwrite */
    v->await = AWAIT_IN;
    v->await_size = size;
  }
  return 0;
}

static int exit_out(struct vcpu *v, uint16_t port, int size, uint32_t value) {
  return exit_io(v, KVM_EXIT_IO_OUT, port, size, value);
}

static int exit_in(struct vcpu *v, uint16_t port, int size) {
  return exit_io(v, KVM_EXIT_IO_IN, port, size, 0);
}

static int exit_mmio(struct vcpu *v, uint64_t addr, int len, int is_write, uint64_t value) {
  struct kvm_run *run = v->run;
  run->exit_reason = KVM_EXIT_MMIO;
  run->mmio.phys_addr = addr;
  run->mmio.len = (uint32_t)len;
  run->mmio.is_write = (uint8_t)is_write;
  memset(run->mmio.data, is_write ? 0 : 0xa5, sizeof run->mmio.data);
  if (is_write) {
    memcpy(run->mmio.data, &value, (size_t)len);
  } else {
    v->await = AWAIT_MMIO_READ;
    v->await_size = len;
  }
  return 0;
}

static int exit_s5(struct vcpu *v) {
  return exit_out(v, LAYOUT_ACPI_SLEEP_CONTROL_PORT, 1, ACPI_S5_VALUE);
}

static int64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (int64_t)t.tv_sec * 1000000000ll + t.tv_nsec;
}

/** KVM_RUN's answer to a kick: -1/EINTR with exit reason KVM_EXIT_INTR. */
static int interrupted(struct vcpu *v, int by_signal) {
  v->run->exit_reason = KVM_EXIT_INTR;
  if (by_signal) v->eintr_signal++;
  else v->eintr_immediate++;
  return fail(EINTR);
}

/**
 * Sleep `ns` inside KVM_RUN as a running guest would: 0 when the time passed, -1/EINTR when the
 * VMM kicked (immediate_exit set, or a signal handler ran, which interrupts nanosleep).
 */
static int guest_sleep(struct vcpu *v, int64_t ns) {
  int64_t end = now_ns() + ns;
  for (;;) {
    if (__atomic_load_n(&v->run->immediate_exit, __ATOMIC_SEQ_CST)) return interrupted(v, 0);
    int64_t left = end - now_ns();
    if (left <= 0) return 0;
    if (left > BLOCK_SLICE_NS) left = BLOCK_SLICE_NS;
    struct timespec t = {0, (long)left};
    if (nanosleep(&t, NULL) < 0 && errno == EINTR) return interrupted(v, 1);
  }
}

/** A halted vCPU (an AP waiting for INIT/SIPI, or a guest that is done): block until kicked. */
static int block_until_kicked(struct vcpu *v) {
  for (;;) {
    if (guest_sleep(v, BLOCK_SLICE_NS) < 0) return -1;
  }
}

// ---- Scripted guests (vCPU 0) ----
// Each call of a script produces one exit (return 0), a KVM_RUN error (-1 with errno), or NEXT:
// "state changed, call again" (text queued with say() is sent first, one `out` to COM1 per exit).
#define NEXT 1

static int script_boot(struct vcpu *v) {
  struct vm *vm = v->vm;
  switch (v->phase) {
  case 0: {
    v->phase = 1;
    const char *why = NULL;
    char buf[256];
    uint64_t pa;
    struct kvm_sregs *s = &v->sregs;
    uint64_t want_cr0 = X86_CR0_PE | X86_CR0_PG;
    uint64_t gdt_code;
    if ((s->cr0 & want_cr0) != want_cr0) why = "CR0 lacks PE|PG";
    else if (!(s->cr4 & X86_CR4_PAE)) why = "CR4 lacks PAE";
    else if ((s->efer & (EFER_LME | EFER_LMA)) != (EFER_LME | EFER_LMA)) why = "EFER lacks LME|LMA";
    else if (s->cs.selector != 0x8 || !s->cs.l) why = "CS is not selector 0x8 with L=1";
    else if (read_u64(vm, s->gdt.base + s->cs.selector, &gdt_code) < 0) why = "GDT not in guest RAM";
    else if ((gdt_code & (DESC_PRESENT | DESC_LONG)) != (DESC_PRESENT | DESC_LONG))
      why = "GDT entry of CS is not present 64-bit code";
    else if (walk(vm, s->cr3, v->regs.rip, &pa) < 0 || pa != v->regs.rip) {
      snprintf(buf, sizeof buf, "RIP 0x%llx is not identity-mapped by CR3's tables", (unsigned long long)v->regs.rip);
      why = buf;
    } else if (!gpa_to_host(vm, v->regs.rip, 1)) why = "RIP is not in guest RAM";
    if (why) {
      say(v, "FAIL: %s\n", why);
      v->phase = 10;
      return NEXT;
    }
    struct boot_params *bp = gpa_to_host(vm, v->regs.rsi, sizeof(struct boot_params));
    if (!bp || bp->hdr.header != BOOT_HDR_MAGIC) {
      say(v, "FAIL: no boot_params with HdrS at RSI 0x%llx\n", (unsigned long long)v->regs.rsi);
      v->phase = 10;
      return NEXT;
    }
    uint64_t cmd = bp->hdr.cmd_line_ptr | ((uint64_t)bp->ext_cmd_line_ptr << 32);
    size_t n = 0;
    const char *c;
    while ((c = gpa_to_host(vm, cmd + n, 1)) && *c && n < TEXT_MAX / 2) n++;
    const char *line = gpa_to_host(vm, cmd, n ? n : 1);
    say(v, "%.*s\ne820=%u\n", (int)n, line ? line : "", bp->e820_entries);
    char esc[TEXT_MAX];
    json_escape(line ? line : "", line ? n : 0, esc, sizeof esc);
    log_event("boot_params", "\"cmdline_addr\":%llu,\"cmdline\":\"%s\",\"e820_entries\":%u",
              (unsigned long long)cmd, esc, bp->e820_entries);
    return NEXT;
  }
  case 1:
    v->phase = 2;
    return exit_s5(v);
  case 10: { /* a failed check: report it and stop as an emulation failure would */
    v->phase = 2;
    struct kvm_run *run = v->run;
    run->exit_reason = KVM_EXIT_INTERNAL_ERROR;
    run->internal.suberror = KVM_INTERNAL_ERROR_EMULATION;
    run->internal.ndata = 0;
    return 0;
  }
  default:
    return block_until_kicked(v);
  }
}

static int script_one_out(struct vcpu *v, uint16_t port, uint32_t value) {
  if (v->phase++ == 0) return exit_out(v, port, 1, value);
  return block_until_kicked(v);
}

/** $DENOVM_FAKE_KVM_MODULE names the module this fake reports itself as, or NULL. */
static const char *fake_module(void) {
  const char *m = getenv("DENOVM_FAKE_KVM_MODULE");
  return m && *m ? m : NULL;
}

/**
 * The vCPU state after RESET/INIT (Intel SDM vol. 3A, table 10-1; AMD APM vol. 2, 14.1.3): CS selector
 * 0xf000 with base 0xffff0000, RIP 0xfff0, RFLAGS bit 1, CR0 CD|NW|ET, paging and long mode off.
 */
#define RESET_RIP 0xfff0
#define RESET_CS_SELECTOR 0xf000
#define RESET_CS_BASE 0xffff0000ull
#define RESET_RFLAGS 0x2
#define RESET_CR0 0x60000010ull

static void reset_vcpu_state(struct vcpu *v) {
  memset(&v->regs, 0, sizeof v->regs);
  v->regs.rip = RESET_RIP;
  v->regs.rflags = RESET_RFLAGS;
  memset(&v->sregs, 0, sizeof v->sregs);
  v->sregs.cs.selector = RESET_CS_SELECTOR;
  v->sregs.cs.base = RESET_CS_BASE;
  v->sregs.cr0 = RESET_CR0;
}

static int script_triple(struct vcpu *v) {
  if (v->phase++ != 0) return block_until_kicked(v);
  /* KVM on SVM (arch/x86/kvm/svm/svm.c, shutdown_interception) resets the vCPU on the shutdown intercept. */
  const char *m = fake_module();
  if (m && !strcmp(m, "kvm_amd")) reset_vcpu_state(v);
  v->run->exit_reason = KVM_EXIT_SHUTDOWN;
  return 0;
}

static int script_internal(struct vcpu *v) {
  if (v->phase++ != 0) return block_until_kicked(v);
  struct kvm_run *run = v->run;
  run->exit_reason = KVM_EXIT_INTERNAL_ERROR;
  run->internal.suberror = KVM_INTERNAL_ERROR_EMULATION;
  run->internal.ndata = 2;
  run->internal.data[0] = 0xfa4e;
  run->internal.data[1] = v->regs.rip;
  return 0;
}

static int script_system_event(struct vcpu *v, uint32_t type) {
  if (v->phase++ != 0) return block_until_kicked(v);
  struct kvm_run *run = v->run;
  run->exit_reason = KVM_EXIT_SYSTEM_EVENT;
  run->system_event.type = type;
  run->system_event.ndata = 0;
  return 0;
}

static int script_mmio(struct vcpu *v) {
  uint64_t base = LAYOUT_VIRTIO_MMIO_START;
  switch (v->phase) {
  case 0:
    v->phase = 1;
    return exit_mmio(v, base + VIRTIO_MMIO_MAGIC_VALUE, 4, 0, 0);
  case 1:
    v->counter = v->answer; /* magic */
    v->phase = 2;
    return exit_mmio(v, base + VIRTIO_MMIO_VERSION, 4, 0, 0);
  case 2:
    v->aux1 = v->answer; /* version */
    v->phase = 3;
    return exit_mmio(v, base + VIRTIO_MMIO_DEVICE_ID, 4, 0, 0);
  case 3:
    v->aux2 = v->answer; /* device id */
    v->phase = 4;
    return exit_mmio(v, base + VIRTIO_MMIO_STATUS, 4, 1, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
  case 4:
    v->phase = 5;
    return exit_mmio(v, base + VIRTIO_MMIO_STATUS, 4, 0, 0);
  case 5:
    if (v->counter == VIRTIO_MMIO_MAGIC && v->aux1 == VIRTIO_MMIO_MODERN_VERSION)
      say(v, "MMIO ok device=%llu status=%llu\n", (unsigned long long)v->aux2, (unsigned long long)v->answer);
    else
      say(v, "MMIO bad magic=0x%llx version=%llu\n", (unsigned long long)v->counter, (unsigned long long)v->aux1);
    v->phase = 6;
    return NEXT;
  case 6:
    v->phase = 7;
    return exit_mmio(v, base + VIRTIO_MMIO_STATUS, 4, 1, 0); /* reset the device */
  case 7:
    v->phase = 8;
    return exit_s5(v);
  default:
    return block_until_kicked(v);
  }
}

static int script_echo(struct vcpu *v) {
  switch (v->phase) {
  case 0:
    v->phase = 1;
    return exit_in(v, LAYOUT_SERIAL_COM1_BASE + UART_LSR, 1);
  case 1:
    if (v->answer & UART_LSR_DR) {
      v->phase = 2;
      return exit_in(v, LAYOUT_SERIAL_COM1_BASE + UART_RX, 1);
    }
    v->phase = 0;
    if (guest_sleep(v, ECHO_POLL_NS) < 0) return -1;
    return NEXT;
  case 2: {
    uint8_t c = (uint8_t)v->answer;
    v->counter++;
    v->phase = c == 'q' ? 3 : 0;
    return exit_out(v, LAYOUT_SERIAL_COM1_BASE + UART_TX, 1, c);
  }
  case 3:
    say(v, "\necho done after %llu bytes\n", (unsigned long long)v->counter);
    v->phase = 4;
    return NEXT;
  case 4:
    v->phase = 5;
    return exit_s5(v);
  default:
    return block_until_kicked(v);
  }
}

static int script_loop(struct vcpu *v) {
  uint64_t total = v->vm->loop_count;
  switch (v->phase) {
  case 0:
    if (v->counter < total) {
      v->counter++;
      if (v->counter % LOOP_IN_EVERY == 0) {
        v->phase = 1;
        return exit_in(v, POST_CODE_PORT, 1);
      }
      return exit_out(v, POST_CODE_PORT, 1, (uint32_t)(v->counter & 0xff));
    }
    say(v, "loop=%llu in=%llu bad=%llu\n", (unsigned long long)v->counter, (unsigned long long)v->aux1,
        (unsigned long long)v->aux2);
    v->phase = 2;
    return NEXT;
  case 1:
    v->aux1++;
    if (v->answer != ISA_FLOATING_BUS) v->aux2++;
    v->phase = 0;
    return NEXT;
  case 2:
    v->phase = 3;
    return exit_s5(v);
  default:
    return block_until_kicked(v);
  }
}

/**
 * The exit-overhead benchmark's guest (bench/exit_overhead.ts): loop_count writes to the POST-code
 * port, nothing else, then the debug exit; both denovm and the C loop of bench/c/exit_roundtrip.c run it.
 */
static int script_exit_loop(struct vcpu *v) {
  if (v->phase == 0) {
    if (v->counter < v->vm->loop_count) {
      v->counter++;
      return exit_out(v, POST_CODE_PORT, 1, (uint32_t)(v->counter & 0xff));
    }
    v->phase = 1;
    return exit_out(v, LAYOUT_DEBUG_EXIT_PORT, 1, 0);
  }
  return block_until_kicked(v);
}

/**
 * The exit-overhead benchmark's MMIO guest: loop_count 4-byte reads of the InterruptStatus register of
 * the virtio-mmio device at LAYOUT_VIRTIO_MMIO_START, then the debug exit; denovm and the C loop of
 * bench/c/mmio_exit.c both run it.
 */
static int script_mmio_loop(struct vcpu *v) {
  if (v->phase == 0) {
    if (v->counter < v->vm->loop_count) {
      v->counter++;
      return exit_mmio(v, LAYOUT_VIRTIO_MMIO_START + VIRTIO_MMIO_INTERRUPT_STATUS, 4, 0, 0);
    }
    v->phase = 1;
    return exit_out(v, LAYOUT_DEBUG_EXIT_PORT, 1, 0);
  }
  return block_until_kicked(v);
}

static int script_spin(struct vcpu *v) {
  for (;;) {
    int64_t due = v->last_tick_ns + SPIN_TICK_NS - now_ns();
    if (v->last_tick_ns == 0 || due <= 0) {
      v->last_tick_ns = now_ns();
      v->counter++;
      return exit_out(v, LAYOUT_SERIAL_COM1_BASE + UART_TX, 1, 'T');
    }
    if (guest_sleep(v, due) < 0) return -1;
  }
}

/**
 * "lines": loop_count lines "line N" on COM1, then S5: a guest whose console output outlives its
 * reader (`denovm run ... | head -2`) or fills its file.
 */
static int script_lines(struct vcpu *v) {
  if (v->phase != 0) return block_until_kicked(v);
  if (v->counter < v->vm->loop_count) {
    /* vcpu_run calls a script only once the queued text is sent: start the buffer over */
    v->text_len = v->text_pos = 0;
    v->counter++;
    say(v, "line %llu\n", (unsigned long long)v->counter);
    return NEXT;
  }
  v->phase = 1;
  return exit_s5(v);
}

/** `rep outsb` to COM1: one KVM_EXIT_IO carrying the whole string (count > 1), then S5. */
static int script_string_io(struct vcpu *v) {
  static const char msg[] = "rep outsb ok\n";
  switch (v->phase) {
  case 0: {
    v->phase = 1;
    struct kvm_run *run = v->run;
    exit_out(v, LAYOUT_SERIAL_COM1_BASE + UART_TX, 1, 0);
    run->io.count = sizeof msg - 1;
    memcpy((uint8_t *)run + run->io.data_offset, msg, sizeof msg - 1);
    return 0;
  }
  case 1:
    v->phase = 2;
    return exit_s5(v);
  default:
    return block_until_kicked(v);
  }
}

/** Exits the VMM must simply re-enter on (HLT, interrupt window), a few of each, then S5. */
#define HLT_EXITS 6
static int script_hlt(struct vcpu *v) {
  if (v->phase < HLT_EXITS) {
    v->run->exit_reason = v->phase++ % 2 ? KVM_EXIT_IRQ_WINDOW_OPEN : KVM_EXIT_HLT;
    return 0;
  }
  switch (v->phase) {
  case HLT_EXITS:
    v->phase++;
    say(v, "re-entered %d times\n", HLT_EXITS);
    return NEXT;
  case HLT_EXITS + 1:
    v->phase++;
    return exit_s5(v);
  default:
    return block_until_kicked(v);
  }
}

static int script_fail_entry(struct vcpu *v) {
  if (v->phase++ != 0) return block_until_kicked(v);
  v->run->exit_reason = KVM_EXIT_FAIL_ENTRY;
  v->run->fail_entry.hardware_entry_failure_reason = 0x80000021; /* VMX: invalid guest state (SDM 26.8) */
  return 0;
}

static int script_unknown_exit(struct vcpu *v) {
  if (v->phase++ != 0) return block_until_kicked(v);
  v->run->exit_reason = KVM_EXIT_EXCEPTION; /* not one a VMM with an in-kernel irqchip ever sees */
  return 0;
}

/** KVM_RUN itself fails (as with a bad memory slot): -1/EFAULT. */
static int script_run_error(struct vcpu *v) {
  if (v->phase++ != 0) return block_until_kicked(v);
  return fail(EFAULT);
}

static int run_script(struct vcpu *v) {
  const char *s = v->vm->script;
  /* the timed ones first */
  if (!strcmp(s, "exit-loop")) return script_exit_loop(v);
  if (!strcmp(s, "mmio-loop")) return script_mmio_loop(v);
  if (!strcmp(s, "boot")) return script_boot(v);
  if (!strcmp(s, "reset")) return script_one_out(v, LAYOUT_I8042_COMMAND_PORT, I8042_CMD_RESET);
  if (!strcmp(s, "panic")) return script_one_out(v, LAYOUT_PVPANIC_PORT, PVPANIC_PANICKED);
  if (!strcmp(s, "debugexit")) return script_one_out(v, LAYOUT_DEBUG_EXIT_PORT, 7);
  if (!strcmp(s, "poweroff")) return script_one_out(v, LAYOUT_ACPI_SLEEP_CONTROL_PORT, ACPI_S5_VALUE);
  if (!strcmp(s, "triple")) return script_triple(v);
  if (!strcmp(s, "internal")) return script_internal(v);
  if (!strcmp(s, "sysevent-reset")) return script_system_event(v, KVM_SYSTEM_EVENT_RESET);
  if (!strcmp(s, "sysevent-shutdown")) return script_system_event(v, KVM_SYSTEM_EVENT_SHUTDOWN);
  if (!strcmp(s, "sysevent-crash")) return script_system_event(v, KVM_SYSTEM_EVENT_CRASH);
  if (!strcmp(s, "mmio")) return script_mmio(v);
  if (!strcmp(s, "echo")) return script_echo(v);
  if (!strcmp(s, "loop")) return script_loop(v);
  if (!strcmp(s, "spin")) return script_spin(v);
  if (!strcmp(s, "lines")) return script_lines(v);
  if (!strcmp(s, "string-io")) return script_string_io(v);
  if (!strcmp(s, "hlt")) return script_hlt(v);
  if (!strcmp(s, "fail-entry")) return script_fail_entry(v);
  if (!strcmp(s, "unknown-exit")) return script_unknown_exit(v);
  if (!strcmp(s, "run-error")) return script_run_error(v);
  /* no script (or "halt"): the guest idles until the VMM stops it */
  return block_until_kicked(v);
}

static int vcpu_run(struct vcpu *v) {
  struct kvm_run *run = v->run;
  v->runs++;
  if (!v->tid_logged) {
    v->tid_logged = 1;
    log_event("run_thread", "\"vcpu\":%d,\"tid\":%ld", v->id, (long)syscall(SYS_gettid));
  }
  /* The previous exit's answer (an in, an MMIO read) is in the run page now: take it first. */
  if (v->await != AWAIT_NONE) {
    uint64_t x = 0;
    const uint8_t *src = v->await == AWAIT_IN ? (uint8_t *)run + run->io.data_offset : run->mmio.data;
    memcpy(&x, src, (size_t)v->await_size);
    v->answer = x;
    v->await = AWAIT_NONE;
  }
  if (__atomic_load_n(&run->immediate_exit, __ATOMIC_SEQ_CST)) return interrupted(v, 0);
  if (v->id != 0) {
    /* An AP's first KVM_RUN after the guest's INIT returns -1/EAGAIN once (see kvm-here.md). */
    if (v->eagain == 0) {
      v->eagain++;
      return fail(EAGAIN);
    }
    return block_until_kicked(v);
  }
  for (;;) {
    if (v->text_pos < v->text_len) {
      return exit_out(v, LAYOUT_SERIAL_COM1_BASE + UART_TX, 1, (uint8_t)v->text[v->text_pos++]);
    }
    int r = run_script(v);
    if (r != NEXT) return r;
  }
}

// ---- ioctls ----

static void init_vcpu_state(struct vcpu *v) {
  memset(&v->regs, 0, sizeof v->regs);
  memset(&v->sregs, 0, sizeof v->sregs);
  memset(&v->lapic, 0, sizeof v->lapic);
  /* Reset state (Intel SDM vol. 3A, 9.1.1): CS.base 0xffff0000, IP 0xfff0, CR0 0x60000010. */
  v->regs.rip = 0xfff0;
  v->regs.rflags = 0x2;
  v->sregs.cs.selector = 0xf000;
  v->sregs.cs.base = 0xffff0000;
  v->sregs.cs.limit = 0xffff;
  v->sregs.cs.present = 1;
  v->sregs.cr0 = 0x60000010;
  /* KVM's LAPIC reset: every LVT masked, the BSP's LINT0 ExtINT (KVM_X86_QUIRK_LINT0_REENABLED). */
  uint32_t id = (uint32_t)v->id << APIC_ID_SHIFT;
  memcpy(v->lapic.regs + APIC_ID_REG, &id, 4);
  uint32_t lint0 = v->id == 0 ? APIC_MODE_EXTINT << APIC_DELIVERY_MODE_SHIFT : APIC_LVT_MASKED;
  uint32_t lint1 = APIC_LVT_MASKED;
  memcpy(v->lapic.regs + APIC_LVT_LINT0_REG, &lint0, 4);
  memcpy(v->lapic.regs + APIC_LVT_LINT1_REG, &lint1, 4);
  v->mp.mp_state = v->id == 0 ? KVM_MP_STATE_RUNNABLE : KVM_MP_STATE_UNINITIALIZED;
  memset(v->xsave, 0, sizeof v->xsave);
  memset(&v->xcrs, 0, sizeof v->xcrs);
  v->xcrs.nr_xcrs = 1;
  v->xcrs.xcrs[0].value = XCR0_RESET;
  memset(&v->events, 0, sizeof v->events);
  memset(&v->debugregs, 0, sizeof v->debugregs);
  v->debugregs.dr6 = DR6_RESET;
  v->debugregs.dr7 = DR7_RESET;
  memset(v->msrs, 0, sizeof v->msrs);
  for (size_t i = 0; i < FAKE_LISTED_COUNT; i++)
    if (FAKE_LISTED_MSRS[i] == MSR_IA32_PAT) v->msrs[i] = PAT_RESET;
}

/*
 * The x87 and SSE state lives once, in the XSAVE area's legacy region (FXSAVE layout, Intel SDM vol. 1, 10.5.1
 * table 10-2; XSAVE header at 512, vol. 1, 13.4.2), as in KVM: KVM_GET/SET_FPU read and write that region.
 */
#define FXSAVE_FCW 0
#define FXSAVE_FSW 2
#define FXSAVE_FTW 4
#define FXSAVE_FOP 6
#define FXSAVE_FIP 8
#define FXSAVE_FDP 16
#define FXSAVE_MXCSR 24
#define FXSAVE_ST0 32
#define FXSAVE_XMM0 160
#define FXSAVE_XMM_REGS 16
#define XSAVE_HEADER_XSTATE_BV 512
/** XSTATE_BV bits 0 and 1: x87 and SSE state present (Intel SDM vol. 1, 13.1). */
#define XFEATURE_MASK_FPSSE 3ull

static void fpu_from_xsave(const uint8_t *x, struct kvm_fpu *f) {
  memset(f, 0, sizeof *f);
  memcpy(&f->fcw, x + FXSAVE_FCW, 2);
  memcpy(&f->fsw, x + FXSAVE_FSW, 2);
  f->ftwx = x[FXSAVE_FTW];
  memcpy(&f->last_opcode, x + FXSAVE_FOP, 2);
  memcpy(&f->last_ip, x + FXSAVE_FIP, 8);
  memcpy(&f->last_dp, x + FXSAVE_FDP, 8);
  memcpy(&f->mxcsr, x + FXSAVE_MXCSR, 4);
  memcpy(f->fpr, x + FXSAVE_ST0, sizeof f->fpr);
  memcpy(f->xmm, x + FXSAVE_XMM0, sizeof f->xmm[0] * FXSAVE_XMM_REGS);
}

static void fpu_to_xsave(const struct kvm_fpu *f, uint8_t *x) {
  memcpy(x + FXSAVE_FCW, &f->fcw, 2);
  memcpy(x + FXSAVE_FSW, &f->fsw, 2);
  x[FXSAVE_FTW] = f->ftwx;
  memcpy(x + FXSAVE_FOP, &f->last_opcode, 2);
  memcpy(x + FXSAVE_FIP, &f->last_ip, 8);
  memcpy(x + FXSAVE_FDP, &f->last_dp, 8);
  memcpy(x + FXSAVE_MXCSR, &f->mxcsr, 4);
  memcpy(x + FXSAVE_ST0, f->fpr, sizeof f->fpr);
  memcpy(x + FXSAVE_XMM0, f->xmm, sizeof f->xmm[0] * FXSAVE_XMM_REGS);
  uint64_t bv;
  memcpy(&bv, x + XSAVE_HEADER_XSTATE_BV, 8);
  bv |= XFEATURE_MASK_FPSSE;
  memcpy(x + XSAVE_HEADER_XSTATE_BV, &bv, 8);
}

/** Where the fake keeps MSR `index` in struct vcpu's msrs, or -1 for an MSR it does not serve. */
static int fake_msr_slot(uint32_t index) {
  for (size_t i = 0; i < FAKE_LISTED_COUNT; i++)
    if (FAKE_LISTED_MSRS[i] == index) return (int)i;
  int m = (int)FAKE_LISTED_COUNT;
  if (index >= MSR_MTRR_PHYSBASE0 && index < MSR_MTRR_PHYSBASE0 + MTRR_VARIABLE_MSRS)
    return m + (int)(index - MSR_MTRR_PHYSBASE0);
  m += MTRR_VARIABLE_MSRS;
  if (index == MSR_MTRR_FIX64K_00000) return m;
  if (index == MSR_MTRR_FIX16K_80000) return m + 1;
  if (index == MSR_MTRR_FIX16K_A0000) return m + 2;
  m += 3;
  if (index >= MSR_MTRR_FIX4K_C0000 && index < MSR_MTRR_FIX4K_C0000 + MTRR_FIX4K_MSRS)
    return m + (int)(index - MSR_MTRR_FIX4K_C0000);
  m += MTRR_FIX4K_MSRS;
  if (index == MSR_MTRR_DEF_TYPE) return m;
  return -1;
}

/** The XSAVE area's size: KVM_CAP_XSAVE2's answer ($DENOVM_FAKE_KVM_XSAVE_SIZE, 4096 by default). */
static int fake_xsave_size(void) {
  int n = env_int("DENOVM_FAKE_KVM_XSAVE_SIZE", (int)sizeof(struct kvm_xsave));
  if (n < (int)sizeof(struct kvm_xsave)) n = (int)sizeof(struct kvm_xsave);
  if (n > FAKE_XSAVE_MAX) n = FAKE_XSAVE_MAX;
  return n & ~3;
}

static int64_t monotonic_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (int64_t)t.tv_sec * 1000000000ll + t.tv_nsec;
}

static uint64_t realtime_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_REALTIME, &t);
  return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

/** KVM_GET_MSR_INDEX_LIST: E2BIG with the count when the caller's list is too short, as KVM answers. */
static int msr_index_list(struct kvm_msr_list *l) {
  if (l->nmsrs < FAKE_LISTED_COUNT) {
    l->nmsrs = FAKE_LISTED_COUNT;
    return fail(E2BIG);
  }
  l->nmsrs = FAKE_LISTED_COUNT;
  memcpy(l->indices, FAKE_LISTED_MSRS, sizeof FAKE_LISTED_MSRS);
  return 0;
}

/** A plausible KVM_GET_SUPPORTED_CPUID: more than 64 entries (KVM reports many 0xD subleaves). */
static int supported_cpuid(struct kvm_cpuid2 *c) {
  struct kvm_cpuid_entry2 e[128];
  int n = 0;
  memset(e, 0, sizeof e);
#define LEAF(fn, idx, fl, a, b, cc, d) e[n++] = (struct kvm_cpuid_entry2){.function = fn, .index = idx, .flags = fl, .eax = a, .ebx = b, .ecx = cc, .edx = d}
  LEAF(0, 0, 0, 0x1f, 0x756e6547, 0x6c65746e, 0x49656e69); /* "GenuineIntel" */
  /* family 6; CLFLUSH line 8 qwords; ECX: SSE3, CX16, x2APIC, AVX off; EDX: FPU, TSC, MSR, APIC, ... */
  LEAF(1, 0, 0, 0x000806f8, 0x00000800, 0x0000a201 | LEAF1_ECX_CX16 | (1u << 21), 0x078bfbff);
  for (int i = 0; i < 5; i++) {
    /* cache type/level: L1d, L1i, L2, L3, none */
    static const uint32_t eax4[5] = {0x121, 0x122, 0x143, 0x163, 0};
    LEAF(4, i, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, eax4[i], 0x01c0003f, 0x3f, 0);
  }
  LEAF(7, 0, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 0, 0x009c27ab, 0, 0);
  for (int i = 0; i < 3; i++) LEAF(0xb, i, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 0, 0, (uint32_t)i, 0);
  for (int i = 0; i < 64; i++) LEAF(0xd, i, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, i == 0 ? 7 : 0, 0, 0, 0);
  for (int i = 0; i < 3; i++) LEAF(0x1f, i, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 0, 0, (uint32_t)i, 0);
  LEAF(0x80000000, 0, 0, 0x80000008, 0, 0, 0);
  LEAF(0x80000001, 0, 0, 0, 0, 0x121, 0x2c100800);
  LEAF(0x80000008, 0, 0, 0x3030, 0, 0, 0); /* 48 physical, 48 virtual address bits */
#undef LEAF
  if (c->nent < (uint32_t)n) {
    log_event("supported_cpuid", "\"nent\":%u,\"needed\":%d,\"result\":\"E2BIG\"", c->nent, n);
    c->nent = (uint32_t)n;
    return fail(E2BIG);
  }
  c->nent = (uint32_t)n;
  memcpy(c->entries, e, sizeof(e[0]) * (size_t)n);
  log_event("supported_cpuid", "\"nent\":%d", n);
  return 0;
}

static int cap_value(long cap) {
  if (cap == env_int("DENOVM_FAKE_KVM_NO_CAP", -1)) return 0;
  switch (cap) {
  case KVM_CAP_MAX_VCPUS:
  case KVM_CAP_NR_VCPUS:
    return FAKE_MAX_VCPUS;
  case KVM_CAP_NR_MEMSLOTS:
    return FAKE_NR_MEMSLOTS;
  case KVM_CAP_IRQCHIP:
  case KVM_CAP_USER_MEMORY:
  case KVM_CAP_SET_TSS_ADDR:
  case KVM_CAP_IRQFD:
  case KVM_CAP_PIT2:
  case KVM_CAP_IOEVENTFD:
  case KVM_CAP_READONLY_MEM:
  case KVM_CAP_IMMEDIATE_EXIT:
  case KVM_CAP_EXT_CPUID:
  case KVM_CAP_MP_STATE:
  case KVM_CAP_PIT_STATE2:
  case KVM_CAP_XSAVE:
  case KVM_CAP_XCRS:
  case KVM_CAP_VCPU_EVENTS:
  case KVM_CAP_DEBUGREGS:
    return 1;
  case KVM_CAP_ADJUST_CLOCK:
    return FAKE_CLOCK_VALID_FLAGS;
  case KVM_CAP_XSAVE2:
    return fake_xsave_size();
  default:
    return 0;
  }
}

static int system_ioctl(unsigned long req, unsigned long arg) {
  switch (req) {
  case KVM_GET_API_VERSION:
    return FAKE_API_VERSION;
  case KVM_CHECK_EXTENSION:
    return cap_value((long)arg);
  case KVM_GET_VCPU_MMAP_SIZE:
    return FAKE_VCPU_MMAP_SIZE;
  case KVM_GET_SUPPORTED_CPUID:
    return supported_cpuid((struct kvm_cpuid2 *)arg);
  case KVM_GET_MSR_INDEX_LIST:
    return msr_index_list((struct kvm_msr_list *)arg);
  case KVM_CREATE_VM: {
    pthread_mutex_lock(&lock);
    /* VMs are taken round-robin, so a closed VM's state is reused as late as possible. */
    static int next_vm;
    struct vm *vm = NULL;
    for (int i = 0; i < MAX_VMS && !vm; i++, next_vm = (next_vm + 1) % MAX_VMS)
      if (!vms[next_vm].used) vm = &vms[next_vm];
    if (!vm) {
      pthread_mutex_unlock(&lock);
      return fail(ENOMEM);
    }
    memset(vm, 0, sizeof *vm);
    int fd = new_memfd("fake-kvm-vm", 0);
    if (fd < 0) {
      pthread_mutex_unlock(&lock);
      return -1;
    }
    vm->used = 1;
    vm->fd = fd;
    const char *script = getenv("DENOVM_FAKE_KVM_SCRIPT");
    snprintf(vm->script, sizeof vm->script, "%s", script ? script : "halt");
    vm->loop_count = (uint64_t)env_int("DENOVM_FAKE_KVM_LOOP_COUNT", (int)LOOP_DEFAULT_COUNT);
    vm->clock_at_ns = monotonic_ns();
    add_fd(fd, FD_VM, vm, NULL);
    pthread_mutex_unlock(&lock);
    log_event("create_vm", "\"fd\":%d,\"script\":\"%s\"", fd, vm->script);
    return fd;
  }
  default:
    log_event("unknown_ioctl", "\"on\":\"system\",\"req\":%lu", req);
    return fail(EINVAL);
  }
}

static int vm_ioctl(struct vm *vm, unsigned long req, unsigned long arg) {
  switch (req) {
  case KVM_SET_TSS_ADDR:
    log_event("tss_addr", "\"addr\":%lu", arg);
    return 0;
  case KVM_SET_IDENTITY_MAP_ADDR:
    log_event("identity_map_addr", "\"addr\":%llu", (unsigned long long)*(uint64_t *)arg);
    return 0;
  case KVM_CREATE_IRQCHIP:
    log_event("create_irqchip", "");
    vm->irqchip = 1;
    return 0;
  case KVM_CREATE_PIT2:
    log_event("create_pit2", "\"flags\":%u", ((struct kvm_pit_config *)arg)->flags);
    vm->pit = 1;
    return 0;
  case KVM_GET_IRQCHIP:
  case KVM_SET_IRQCHIP: {
    struct kvm_irqchip *c = (struct kvm_irqchip *)arg;
    if (!vm->irqchip) return fail(ENXIO);
    void *state;
    size_t size;
    if (c->chip_id == KVM_IRQCHIP_PIC_MASTER || c->chip_id == KVM_IRQCHIP_PIC_SLAVE) {
      state = &vm->pic[c->chip_id];
      size = sizeof vm->pic[0];
    } else if (c->chip_id == KVM_IRQCHIP_IOAPIC) {
      state = &vm->ioapic;
      size = sizeof vm->ioapic;
    } else {
      return fail(EINVAL);
    }
    pthread_mutex_lock(&lock);
    if (req == KVM_GET_IRQCHIP) memcpy(&c->chip, state, size);
    else memcpy(state, &c->chip, size);
    pthread_mutex_unlock(&lock);
    if (req == KVM_SET_IRQCHIP) log_event("set_irqchip", "\"chip\":%u", c->chip_id);
    return 0;
  }
  case KVM_GET_PIT2:
  case KVM_SET_PIT2:
    if (!vm->pit) return fail(ENXIO);
    pthread_mutex_lock(&lock);
    if (req == KVM_GET_PIT2) memcpy((void *)arg, &vm->pit_state, sizeof vm->pit_state);
    else memcpy(&vm->pit_state, (void *)arg, sizeof vm->pit_state);
    pthread_mutex_unlock(&lock);
    if (req == KVM_SET_PIT2) log_event("set_pit2", "\"mode0\":%u,\"count0\":%u", vm->pit_state.channels[0].mode,
                                       vm->pit_state.channels[0].count);
    return 0;
  case KVM_GET_CLOCK: {
    struct kvm_clock_data *c = (struct kvm_clock_data *)arg;
    pthread_mutex_lock(&lock);
    uint64_t now = vm->clock_ns + (uint64_t)(monotonic_ns() - vm->clock_at_ns);
    pthread_mutex_unlock(&lock);
    memset(c, 0, sizeof *c);
    c->clock = now;
    c->flags = KVM_CLOCK_REALTIME;
    c->realtime = realtime_ns();
    return 0;
  }
  case KVM_SET_CLOCK: {
    struct kvm_clock_data *c = (struct kvm_clock_data *)arg;
    if (c->flags & ~FAKE_CLOCK_VALID_FLAGS) return fail(EINVAL);
    uint64_t clock = c->clock;
    if (c->flags & KVM_CLOCK_REALTIME) {
      uint64_t real = realtime_ns();
      if (real > c->realtime) clock += real - c->realtime;
    }
    pthread_mutex_lock(&lock);
    vm->clock_ns = clock;
    vm->clock_at_ns = monotonic_ns();
    pthread_mutex_unlock(&lock);
    log_event("set_clock", "\"clock\":%llu,\"flags\":%u", (unsigned long long)c->clock, c->flags);
    return 0;
  }
  case KVM_SET_GSI_ROUTING: {
    struct kvm_irq_routing *r = (struct kvm_irq_routing *)arg;
    /* GSI 0 (the PIT) on the IOAPIC: which pin? */
    int gsi0_ioapic_pin = -1;
    for (uint32_t i = 0; i < r->nr; i++) {
      struct kvm_irq_routing_entry *e = &r->entries[i];
      if (e->gsi == 0 && e->type == KVM_IRQ_ROUTING_IRQCHIP && e->u.irqchip.irqchip == KVM_IRQCHIP_IOAPIC)
        gsi0_ioapic_pin = (int)e->u.irqchip.pin;
    }
    log_event("gsi_routing", "\"nr\":%u,\"gsi0_ioapic_pin\":%d", r->nr, gsi0_ioapic_pin);
    return 0;
  }
  case KVM_SET_USER_MEMORY_REGION: {
    struct kvm_userspace_memory_region *m = (struct kvm_userspace_memory_region *)arg;
    if (m->slot >= FAKE_NR_MEMSLOTS) return fail(EINVAL);
    if (m->memory_size && (m->guest_phys_addr % PAGE_SIZE || m->memory_size % PAGE_SIZE ||
                           m->userspace_addr % PAGE_SIZE))
      return fail(EINVAL);
    pthread_mutex_lock(&lock);
    struct slot *s = &vm->slots[m->slot];
    if (m->memory_size == 0) {
      s->used = 0;
    } else {
      /* KVM refuses a slot overlapping another one (EEXIST). */
      for (int i = 0; i < FAKE_NR_MEMSLOTS; i++) {
        struct slot *o = &vm->slots[i];
        if (i != (int)m->slot && o->used && m->guest_phys_addr < o->guest + o->size &&
            o->guest < m->guest_phys_addr + m->memory_size) {
          pthread_mutex_unlock(&lock);
          log_event("memslot_overlap", "\"slot\":%u,\"other\":%d", m->slot, i);
          return fail(EEXIST);
        }
      }
      *s = (struct slot){1, m->flags, m->guest_phys_addr, m->memory_size, m->userspace_addr};
    }
    pthread_mutex_unlock(&lock);
    log_event("memslot", "\"slot\":%u,\"flags\":%u,\"guest\":%llu,\"size\":%llu,\"host\":%llu", m->slot, m->flags,
              (unsigned long long)m->guest_phys_addr, (unsigned long long)m->memory_size,
              (unsigned long long)m->userspace_addr);
    return 0;
  }
  case KVM_IRQFD: {
    struct kvm_irqfd *f = (struct kvm_irqfd *)arg;
    log_event("irqfd", "\"fd\":%u,\"gsi\":%u,\"flags\":%u", f->fd, f->gsi, f->flags);
    return 0;
  }
  case KVM_IOEVENTFD: {
    struct kvm_ioeventfd *f = (struct kvm_ioeventfd *)arg;
    log_event("ioeventfd", "\"addr\":%llu,\"len\":%u,\"fd\":%d,\"flags\":%u,\"datamatch\":%llu",
              (unsigned long long)f->addr, f->len, f->fd, f->flags, (unsigned long long)f->datamatch);
    return 0;
  }
  case KVM_IRQ_LINE: {
    struct kvm_irq_level *l = (struct kvm_irq_level *)arg;
    log_event("irq_line", "\"irq\":%u,\"level\":%u", l->irq, l->level);
    return 0;
  }
  case KVM_CREATE_VCPU: {
    long id = (long)arg;
    if (id < 0 || id >= FAKE_MAX_VCPUS) return fail(EINVAL);
    pthread_mutex_lock(&lock);
    struct vcpu *v = &vm->vcpus[id];
    if (v->used) {
      pthread_mutex_unlock(&lock);
      return fail(EEXIST);
    }
    int fd = new_memfd("fake-kvm-vcpu", FAKE_VCPU_MMAP_SIZE);
    if (fd < 0) {
      pthread_mutex_unlock(&lock);
      return -1;
    }
    void *run = real_mmap(NULL, FAKE_VCPU_MMAP_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (run == MAP_FAILED) {
      real_close(fd);
      pthread_mutex_unlock(&lock);
      return -1;
    }
    memset(v, 0, sizeof *v);
    v->used = 1;
    v->id = (int)id;
    v->fd = fd;
    v->vm = vm;
    v->run = run;
    init_vcpu_state(v);
    add_fd(fd, FD_VCPU, vm, v);
    pthread_mutex_unlock(&lock);
    log_event("create_vcpu", "\"id\":%ld,\"fd\":%d", id, fd);
    return fd;
  }
  default:
    log_event("unknown_ioctl", "\"on\":\"vm\",\"req\":%lu", req);
    return fail(EINVAL);
  }
}

static uint32_t lapic_reg(struct kvm_lapic_state *l, int off) {
  uint32_t x;
  memcpy(&x, l->regs + off, 4);
  return x;
}

static int vcpu_ioctl(struct vcpu *v, unsigned long req, unsigned long arg) {
  void *p = (void *)arg;
  switch (req) {
  case KVM_RUN:
    return vcpu_run(v);
  case KVM_GET_REGS:
    memcpy(p, &v->regs, sizeof v->regs);
    return 0;
  case KVM_SET_REGS:
    memcpy(&v->regs, p, sizeof v->regs);
    log_event("set_regs", "\"vcpu\":%d,\"rip\":%llu,\"rsi\":%llu,\"rsp\":%llu,\"rbp\":%llu,\"rflags\":%llu", v->id,
              v->regs.rip, v->regs.rsi, v->regs.rsp, v->regs.rbp, v->regs.rflags);
    return 0;
  case KVM_GET_SREGS:
    memcpy(p, &v->sregs, sizeof v->sregs);
    return 0;
  case KVM_SET_SREGS: {
    memcpy(&v->sregs, p, sizeof v->sregs);
    struct kvm_sregs *s = &v->sregs;
    log_event("set_sregs",
              "\"vcpu\":%d,\"cr0\":%llu,\"cr3\":%llu,\"cr4\":%llu,\"efer\":%llu,\"cs\":%u,\"cs_l\":%u,\"ds\":%u,"
              "\"tr\":%u,\"gdt_base\":%llu,\"gdt_limit\":%u,\"idt_base\":%llu",
              v->id, s->cr0, s->cr3, s->cr4, s->efer, s->cs.selector, s->cs.l, s->ds.selector, s->tr.selector,
              s->gdt.base, s->gdt.limit, s->idt.base);
    return 0;
  }
  case KVM_GET_FPU:
    fpu_from_xsave(v->xsave, p);
    return 0;
  case KVM_SET_FPU:
    fpu_to_xsave(p, v->xsave);
    log_event("set_fpu", "\"vcpu\":%d,\"fcw\":%u,\"mxcsr\":%u", v->id, ((struct kvm_fpu *)p)->fcw,
              ((struct kvm_fpu *)p)->mxcsr);
    return 0;
  case KVM_GET_LAPIC:
    memcpy(p, &v->lapic, sizeof v->lapic);
    return 0;
  case KVM_SET_LAPIC:
    memcpy(&v->lapic, p, sizeof v->lapic);
    log_event("set_lapic", "\"vcpu\":%d,\"id\":%u,\"lint0\":%u,\"lint1\":%u", v->id,
              lapic_reg(&v->lapic, APIC_ID_REG) >> APIC_ID_SHIFT, lapic_reg(&v->lapic, APIC_LVT_LINT0_REG),
              lapic_reg(&v->lapic, APIC_LVT_LINT1_REG));
    return 0;
  case KVM_GET_MP_STATE:
    memcpy(p, &v->mp, sizeof v->mp);
    return 0;
  case KVM_SET_MP_STATE:
    memcpy(&v->mp, p, sizeof v->mp);
    log_event("set_mp_state", "\"vcpu\":%d,\"state\":%u", v->id, v->mp.mp_state);
    return 0;
  case KVM_SET_CPUID2: {
    struct kvm_cpuid2 *c = p;
    uint32_t ebx1 = 0, ecx1 = 0, edx1 = 0, edxb = 0, eax4 = 0;
    for (uint32_t i = 0; i < c->nent; i++) {
      struct kvm_cpuid_entry2 *e = &c->entries[i];
      if (e->function == 1) ebx1 = e->ebx, ecx1 = e->ecx, edx1 = e->edx;
      if (e->function == 0xb && e->index == 0) edxb = e->edx;
      if (e->function == 4 && e->index == 3) eax4 = e->eax;
    }
    log_event("set_cpuid", "\"vcpu\":%d,\"nent\":%u,\"apic_id\":%u,\"leaf1_ebx\":%u,\"leaf1_ecx\":%u,"
              "\"leaf1_edx\":%u,\"leafb_x2apic_id\":%u,\"leaf4_l3_eax\":%u",
              v->id, c->nent, ebx1 >> LEAF1_EBX_APIC_ID_SHIFT, ebx1, ecx1, edx1, edxb, eax4);
    return 0;
  }
  case KVM_SET_MSRS: {
    struct kvm_msrs *m = p;
    if (m->nmsrs >= FAKE_MAX_IO_MSRS) return fail(E2BIG);
    int refuse = env_int("DENOVM_FAKE_KVM_REFUSE_MSR", -1);
    char list[2048];
    size_t o = 0;
    uint32_t set = 0;
    for (; set < m->nmsrs; set++) {
      int slot = fake_msr_slot(m->entries[set].index);
      /* KVM stops at the first MSR it refuses */
      if ((int)m->entries[set].index == refuse || slot < 0) break;
      v->msrs[slot] = m->entries[set].data;
      o += (size_t)snprintf(list + o, sizeof list - o, "%s[%u,%llu]", set ? "," : "", m->entries[set].index,
                            (unsigned long long)m->entries[set].data);
      if (o >= sizeof list) o = sizeof list - 1;
    }
    log_event("set_msrs", "\"vcpu\":%d,\"nmsrs\":%u,\"set\":%u,\"msrs\":[%s]", v->id, m->nmsrs, set, list);
    return (int)set;
  }
  case KVM_GET_MSRS: {
    struct kvm_msrs *m = p;
    if (m->nmsrs >= FAKE_MAX_IO_MSRS) return fail(E2BIG);
    int refuse = env_int("DENOVM_FAKE_KVM_REFUSE_MSR", -1);
    uint32_t got = 0;
    for (; got < m->nmsrs; got++) {
      int slot = fake_msr_slot(m->entries[got].index);
      if ((int)m->entries[got].index == refuse || slot < 0) break;
      m->entries[got].data = v->msrs[slot];
    }
    return (int)got;
  }
  case KVM_GET_XSAVE:
    /* KVM refuses the 4096-byte call when the area is larger: KVM_GET_XSAVE2 reads it whole */
    if (fake_xsave_size() > (int)sizeof(struct kvm_xsave)) return fail(EINVAL);
    memcpy(p, v->xsave, sizeof(struct kvm_xsave));
    return 0;
  case KVM_GET_XSAVE2:
    memcpy(p, v->xsave, (size_t)fake_xsave_size());
    return 0;
  case KVM_SET_XSAVE:
    memcpy(v->xsave, p, (size_t)fake_xsave_size());
    log_event("set_xsave", "\"vcpu\":%d,\"size\":%d", v->id, fake_xsave_size());
    return 0;
  case KVM_GET_XCRS:
    memcpy(p, &v->xcrs, sizeof v->xcrs);
    return 0;
  case KVM_SET_XCRS: {
    struct kvm_xcrs *x = p;
    if (x->nr_xcrs > KVM_MAX_XCRS || x->flags) return fail(EINVAL);
    memcpy(&v->xcrs, x, sizeof v->xcrs);
    return 0;
  }
  case KVM_GET_VCPU_EVENTS:
    memcpy(p, &v->events, sizeof v->events);
    ((struct kvm_vcpu_events *)p)->flags = KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SHADOW |
                                           KVM_VCPUEVENT_VALID_SMM;
    return 0;
  case KVM_SET_VCPU_EVENTS: {
    struct kvm_vcpu_events *e = p;
    if (e->flags & ~FAKE_VCPUEVENT_VALID_FLAGS) return fail(EINVAL);
    memcpy(&v->events, e, sizeof v->events);
    log_event("set_vcpu_events", "\"vcpu\":%d,\"flags\":%u,\"nmi_pending\":%u", v->id, e->flags, e->nmi.pending);
    return 0;
  }
  case KVM_GET_DEBUGREGS:
    memcpy(p, &v->debugregs, sizeof v->debugregs);
    return 0;
  case KVM_SET_DEBUGREGS: {
    struct kvm_debugregs *d = p;
    if (d->flags) return fail(EINVAL); /* as KVM: no flags are defined */
    memcpy(&v->debugregs, d, sizeof v->debugregs);
    return 0;
  }
  default:
    log_event("unknown_ioctl", "\"on\":\"vcpu\",\"req\":%lu", req);
    return fail(EINVAL);
  }
}

// ---- The libc entry points ----

static const char *kvm_device_path(void) {
  const char *p = getenv("DENOVM_KVM_DEVICE");
  return p && *p ? p : "/dev/kvm";
}

/** Where the host-kind check looks for the KVM modules (vmm/kvm/host.ts). */
#define SYS_MODULE_KVM_PREFIX "/sys/module/kvm_"
static const char *const KVM_MODULES[] = {"kvm_pvm", "kvm_amd", "kvm_intel"};

/**
 * An open of /sys/module/<a KVM module> while $DENOVM_FAKE_KVM_MODULE is set: 1 (and *fd) when the fake
 * answers it, 0 when the path is none of them.
 */
static int fake_module_open(const char *path, int flags, int *fd) {
  const char *m = fake_module();
  if (!m || strncmp(path, SYS_MODULE_KVM_PREFIX, strlen(SYS_MODULE_KVM_PREFIX)) != 0) return 0;
  const char *name = path + strlen("/sys/module/");
  for (size_t i = 0; i < sizeof KVM_MODULES / sizeof KVM_MODULES[0]; i++) {
    if (strcmp(name, KVM_MODULES[i]) != 0) continue;
    /* the module's directory: any real directory stands in for it */
    *fd = strcmp(name, m) == 0 ? real_open("/", (flags & O_CLOEXEC) | O_RDONLY | O_DIRECTORY) : fail(ENOENT);
    return 1;
  }
  return 0;
}

int open(const char *path, int flags, ...) {
  resolve_real();
  va_list ap;
  va_start(ap, flags);
  mode_t mode = va_arg(ap, mode_t);
  va_end(ap);
  int module_fd;
  if (fake_module_open(path, flags, &module_fd)) return module_fd;
  if (strcmp(path, kvm_device_path()) == 0) {
    pthread_mutex_lock(&lock);
    open_log_locked();
    const char *f = getenv("DENOVM_FAKE_KVM_FAIL_IOCTL");
    fail_request = f && *f ? strtoul(f, NULL, 0) : 0;
    int fd = new_memfd("fake-kvm", 0);
    if (fd >= 0) add_fd(fd, FD_SYSTEM, NULL, NULL);
    pthread_mutex_unlock(&lock);
    if (fd >= 0) log_event("open", "\"fd\":%d,\"pid\":%d", fd, getpid());
    return fd;
  }
  return real_open(path, flags, mode);
}

int close(int fd) {
  resolve_real();
  pthread_mutex_lock(&lock);
  struct fake_fd *f = find_fd(fd);
  if (f) {
    if (f->kind == FD_VCPU) {
      struct vcpu *v = f->vcpu;
      log_event("close_vcpu",
                "\"vcpu\":%d,\"runs\":%llu,\"eintr_immediate\":%llu,\"eintr_signal\":%llu,\"eagain\":%llu,"
                "\"still_mapped\":%d",
                v->id, (unsigned long long)v->runs, (unsigned long long)v->eintr_immediate,
                (unsigned long long)v->eintr_signal, (unsigned long long)v->eagain, v->nmaps);
      /* The run page stays mapped: a vCPU thread the VMM gave up on may still be inside KVM_RUN. */
      v->used = 0;
    } else if (f->kind == FD_VM) {
      log_event("close_vm", "");
      f->vm->used = 0;
    } else {
      log_event("close_system", "");
    }
    f->kind = 0;
  }
  pthread_mutex_unlock(&lock);
  return real_close(fd);
}

int ioctl(int fd, unsigned long req, ...) {
  resolve_real();
  va_list ap;
  va_start(ap, req);
  unsigned long arg = va_arg(ap, unsigned long);
  va_end(ap);
  pthread_mutex_lock(&lock);
  struct fake_fd *f = find_fd(fd);
  struct fake_fd copy = f ? *f : (struct fake_fd){0};
  pthread_mutex_unlock(&lock);
  if (!f) return real_ioctl(fd, req, arg);
  if (fail_request && req == fail_request) {
    log_event("failed_ioctl", "\"req\":%lu", req);
    return fail(ENOMEM);
  }
  switch (copy.kind) {
  case FD_SYSTEM:
    return system_ioctl(req, arg);
  case FD_VM:
    if (req == KVM_GET_API_VERSION || req == KVM_CHECK_EXTENSION) return system_ioctl(req, arg);
    return vm_ioctl(copy.vm, req, arg);
  case FD_VCPU:
    return vcpu_ioctl(copy.vcpu, req, arg);
  }
  return fail(EBADF);
}

/* Threads of this process that are Deno Workers (named "worker-N"), for the mmap_run event. */
static int worker_threads(void) {
  DIR *d = opendir("/proc/self/task");
  if (!d) return -1;
  int n = 0;
  struct dirent *e;
  while ((e = readdir(d))) {
    if (e->d_name[0] == '.') continue;
    char path[300], comm[32] = "";
    snprintf(path, sizeof path, "/proc/self/task/%s/comm", e->d_name);
    int fd = real_open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) continue; /* the thread ended meanwhile */
    ssize_t r = read(fd, comm, sizeof comm - 1);
    real_close(fd);
    if (r > 0 && !strncmp(comm, "worker-", 7)) n++;
  }
  closedir(d);
  return n;
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
  resolve_real();
  if (fd >= 0) {
    pthread_mutex_lock(&lock);
    struct fake_fd *f = find_fd(fd);
    int kind = f ? (int)f->kind : 0;
    struct vcpu *vc = f ? f->vcpu : NULL;
    int id = vc ? vc->id : -1;
    pthread_mutex_unlock(&lock);
    if (kind && kind != FD_VCPU) {
      errno = ENODEV;
      return MAP_FAILED;
    }
    if (kind == FD_VCPU) {
      if (len > FAKE_VCPU_MMAP_SIZE || off != 0) {
        errno = EINVAL;
        return MAP_FAILED;
      }
      void *p = real_mmap(addr, len, prot, flags, fd, off);
      if (p != MAP_FAILED) {
        pthread_mutex_lock(&lock);
        if (vc->nmaps < MAX_RUN_MAPS) vc->maps[vc->nmaps++] = (uintptr_t)p;
        pthread_mutex_unlock(&lock);
      }
      log_event("mmap_run", "\"vcpu\":%d,\"len\":%zu,\"shared\":%d,\"tid\":%ld,\"workers\":%d", id, len,
                (flags & MAP_SHARED) != 0, (long)syscall(SYS_gettid), worker_threads());
      return p;
    }
  }
  return real_mmap(addr, len, prot, flags, fd, off);
}

int munmap(void *addr, size_t len) {
  resolve_real();
  int vcpu = -1;
  pthread_mutex_lock(&lock);
  for (int i = 0; i < MAX_VMS && vcpu < 0; i++) {
    for (int j = 0; j < FAKE_MAX_VCPUS && vcpu < 0; j++) {
      struct vcpu *v = &vms[i].vcpus[j];
      for (int k = 0; k < v->nmaps; k++) {
        if (v->maps[k] == (uintptr_t)addr) {
          v->maps[k] = v->maps[--v->nmaps];
          vcpu = v->id;
          break;
        }
      }
    }
  }
  pthread_mutex_unlock(&lock);
  if (vcpu >= 0) log_event("munmap_run", "\"vcpu\":%d,\"tid\":%ld", vcpu, (long)syscall(SYS_gettid));
  return real_munmap(addr, len);
}
