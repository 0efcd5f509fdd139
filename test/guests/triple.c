/*
 * Triple fault (expect crosvm exit 33): with a zero-limit IDT, ud2's #UD cannot be delivered,
 * that #GP cannot either, the #DF neither, so the CPU shuts down (Intel SDM vol. 3 section 6.15,
 * interrupt 8). Known values sit in registers so the VMM's register dump can be checked.
 */
#include "rt.h"

/* Register markers the test looks for in the VMM's crash report. */
#define TRIPLE_MARK_RAX 0x7269706c65aa0001ULL
#define TRIPLE_MARK_RBX 0x7269706c65aa0002ULL

void guest_main(void) {
  static const struct {
    u16 limit;
    u64 base;
  } __attribute__((packed)) empty_idt = {0, 0};
  printf("TRIPLE rax=0x%llx rbx=0x%llx\n", TRIPLE_MARK_RAX, TRIPLE_MARK_RBX);
  __asm__ volatile("lidt %0\n\t"
                   "ud2" ::"m"(empty_idt),
                   "a"(TRIPLE_MARK_RAX), "b"(TRIPLE_MARK_RBX));
  printf("TRIPLE FAILED\n");
  debug_exit(GUEST_EXIT_FAILURE);
}
