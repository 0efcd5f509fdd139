// sigbus_guard: survive SIGBUS from shared memory that another process shrank.
//
// A vhost-user back end maps the front end's memory from file descriptors the front end owns. If the
// front end truncates such a file after the back end mapped it, touching a page past the new end raises
// SIGBUS (mmap(2)). This library keeps a table of registered mappings; its SIGBUS handler, when the
// faulting address lies inside one, maps an anonymous zero page over the faulting page (MAP_FIXED), so
// the access completes harmlessly when the handler returns, records the fault on the mapping, and
// wakes the owner through an eventfd. The owner checks the record after each batch of work and drops
// whoever shrank the file. libwayland-server protects wl_shm pools the same way.
//
// A fault anywhere else is not ours: the handler passes it to the action installed before it (Rust's
// standard library installs one that reports stack overflows), or restores the default action and
// returns, so the access faults again and the process dies of SIGBUS as it would have.
//
// Everything the handler touches is a fixed array of slots read and written with atomics; register and
// unregister never block, and the handler makes only async-signal-safe system calls (mmap, write,
// sigaction). A slot is published by its `state` word: FREE -> BUSY (being filled) -> LIVE -> FREE.

#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/** How many mappings can be registered at once (vhost-user allows 8 per table, a few tables per process). */
#define SIGBUS_GUARD_MAX_REGIONS 256

enum { SLOT_FREE = 0, SLOT_BUSY = 1, SLOT_LIVE = 2 };

struct slot {
  _Atomic int state;
  _Atomic uintptr_t start;
  _Atomic uintptr_t end;
  _Atomic int notify_fd;
  _Atomic uint32_t faults;
};

static struct slot slots[SIGBUS_GUARD_MAX_REGIONS];
static _Atomic uint64_t total_faults;
static _Atomic int installed; /* 0: no, 1: installing, 2: yes */
static struct sigaction previous;
static uintptr_t page_size = 4096; /* set from sysconf at install (sysconf is not async-signal-safe) */

static void chain(int sig, siginfo_t *info, void *ctx) {
  if (previous.sa_flags & SA_SIGINFO) {
    if (previous.sa_sigaction) {
      previous.sa_sigaction(sig, info, ctx);
      return;
    }
  } else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
    previous.sa_handler(sig);
    return;
  }
  // Default (or ignored, which the kernel does not honour for a fault): die of the fault on return.
  struct sigaction dfl;
  memset(&dfl, 0, sizeof dfl);
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  sigaction(sig, &dfl, NULL);
}

static void on_sigbus(int sig, siginfo_t *info, void *ctx) {
  int saved_errno = errno;
  uintptr_t addr = (uintptr_t)info->si_addr;
  for (int i = 0; i < SIGBUS_GUARD_MAX_REGIONS; i++) {
    struct slot *s = &slots[i];
    if (atomic_load(&s->state) != SLOT_LIVE) continue;
    if (addr < atomic_load(&s->start) || addr >= atomic_load(&s->end)) continue;
    uintptr_t base = addr & ~(page_size - 1);
    void *p = mmap((void *)base, (size_t)page_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    if (p == MAP_FAILED) break; // cannot repair: let the fault take its usual course
    atomic_fetch_add(&s->faults, 1);
    atomic_fetch_add(&total_faults, 1);
    int fd = atomic_load(&s->notify_fd);
    if (fd >= 0) {
      uint64_t one = 1;
      ssize_t n = write(fd, &one, sizeof one);
      (void)n; // an eventfd at its maximum is already readable
    }
    errno = saved_errno;
    return;
  }
  chain(sig, info, ctx);
  errno = saved_errno;
}

/** Install the SIGBUS handler once (later calls do nothing). Returns 0, or -errno. */
int sigbus_guard_install(void) {
  int expected = 0;
  if (!atomic_compare_exchange_strong(&installed, &expected, 1)) {
    while (atomic_load(&installed) == 1) {
    }
    return atomic_load(&installed) == 2 ? 0 : -EAGAIN;
  }
  long page = sysconf(_SC_PAGESIZE);
  if (page > 0) page_size = (uintptr_t)page;
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_sigbus;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  if (sigaction(SIGBUS, &sa, &previous) != 0) {
    int e = errno;
    atomic_store(&installed, 0);
    return -e;
  }
  atomic_store(&installed, 2);
  return 0;
}

/**
 * Register the mapping [addr, addr + len); faults in it are repaired and counted, and each writes 1 to
 * `notify_fd` (an eventfd; -1 for none). Returns the slot number, or -1 when every slot is taken.
 */
int sigbus_guard_register(void *addr, size_t len, int notify_fd) {
  for (int i = 0; i < SIGBUS_GUARD_MAX_REGIONS; i++) {
    struct slot *s = &slots[i];
    int expected = SLOT_FREE;
    if (!atomic_compare_exchange_strong(&s->state, &expected, SLOT_BUSY)) continue;
    atomic_store(&s->start, (uintptr_t)addr);
    atomic_store(&s->end, (uintptr_t)addr + len);
    atomic_store(&s->notify_fd, notify_fd);
    atomic_store(&s->faults, 0);
    atomic_store(&s->state, SLOT_LIVE);
    return i;
  }
  return -1;
}

/** Forget a slot (before its mapping is unmapped). */
void sigbus_guard_unregister(int slot) {
  if (slot < 0 || slot >= SIGBUS_GUARD_MAX_REGIONS) return;
  atomic_store(&slots[slot].state, SLOT_FREE);
}

/** How many faults the slot's mapping took since the last call (the count is reset). */
uint32_t sigbus_guard_take_faults(int slot) {
  if (slot < 0 || slot >= SIGBUS_GUARD_MAX_REGIONS) return 0;
  return atomic_exchange(&slots[slot].faults, 0);
}

/** Faults repaired in every mapping since the process started: a cheap "did anything happen" test. */
uint64_t sigbus_guard_total_faults(void) {
  return atomic_load(&total_faults);
}

/** The table's size, for the binding to check against. */
int sigbus_guard_max_regions(void) {
  return SIGBUS_GUARD_MAX_REGIONS;
}
