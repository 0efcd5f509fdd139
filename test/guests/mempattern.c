/*
 * Fills MEM_SIZE bytes of RAM at MEM_BASE with 64-bit words derived from a seed and prints their checksum,
 * so a test can tell whether guest memory survived a snapshot and whether clones of one snapshot see each
 * other's writes. Idle, it halts until COM1 receives a byte (no timer runs, so nothing in the guest changes
 * while it waits). Needs MEM_BASE + MEM_SIZE bytes of RAM (40 MiB).
 *
 * Word i of the fill with seed s (test/kvm/snapshot_test.ts computes the same):
 *   word(s, i) = (s * SEED_MUL) ^ ((i + 1) * WORD_MUL)        (mod 2^64)
 * and the checksum is FNV-1a over the words (64-bit offset basis and prime, one word at a time).
 *
 * Lines on COM1:
 *   MEM fill seed=<s> mib=<MiB> sum=<16 hex digits>     at start (seed 1) and on each 'w' (the next seed)
 *   MEM check seed=<s> sum=<16 hex digits>              on 'c': the checksum of what memory holds now
 *   BYE                                                 on 'q', then ACPI power-off (exit code 0)
 */
#include "rt.h"

#define MEM_BASE 0x2000000ull /* 32 MiB: above the guest image at KERNEL_START */
#define MEM_MIB 4
#define MEM_SIZE ((u64)MEM_MIB << 20)
#define MEM_WORDS (MEM_SIZE / 8)
#define SEED_MUL 0x9e3779b97f4a7c15ull
#define WORD_MUL 0xbf58476d1ce4e5b9ull
/* FNV-1a, 64 bits (offset basis and prime from the FNV reference, draft-eastlake-fnv). */
#define FNV64_OFFSET 0xcbf29ce484222325ull
#define FNV64_PRIME 0x100000001b3ull
#define WAKE_VECTOR 0x30

static u64 *const mem = (u64 *)MEM_BASE;

static void fill(u64 seed) {
  u64 base = seed * SEED_MUL, step = 0;
  for (u64 i = 0; i < MEM_WORDS; i++) {
    step += WORD_MUL;
    mem[i] = base ^ step;
  }
}

static u64 checksum(void) {
  u64 h = FNV64_OFFSET;
  for (u64 i = 0; i < MEM_WORDS; i++) h = (h ^ mem[i]) * FNV64_PRIME;
  return h;
}

/* Sixteen hex digits, leading zeros kept. */
static void print_sum(u64 v) {
  for (int shift = 60; shift >= 0; shift -= 4) putc("0123456789abcdef"[(v >> shift) & 0xf]);
  putc('\r');
  putc('\n');
}

void guest_main(void) {
  u64 seed = 1;
  serial_rx_wakeup(WAKE_VECTOR);
  fill(seed);
  printf("MEM fill seed=%llu mib=%u sum=", seed, MEM_MIB);
  print_sum(checksum());
  for (;;) {
    /* sti's one-instruction shadow makes "sti; hlt" race-free; the receive interrupt wakes it. */
    __asm__ volatile("sti; hlt; cli" ::: "memory");
    for (int c; (c = serial_poll()) >= 0;) {
      if (c == 'c') {
        printf("MEM check seed=%llu sum=", seed);
        print_sum(checksum());
      } else if (c == 'w') {
        fill(++seed);
        printf("MEM fill seed=%llu mib=%u sum=", seed, MEM_MIB);
        print_sum(checksum());
      } else if (c == 'q') {
        printf("BYE\n");
        return; /* rt_main powers off */
      }
    }
  }
}
