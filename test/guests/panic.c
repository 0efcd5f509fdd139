/* Reports a guest panic through the pvpanic port (expect crosvm exit 34). */
#include "rt.h"

/* pvpanic event bits (QEMU docs/specs/pvpanic.rst): bit 0 = guest panicked. */
#define PVPANIC_PANICKED 0x1

void guest_main(void) {
  printf("PANIC\n");
  outb(PVPANIC_PORT, PVPANIC_PANICKED);
  printf("PANIC FAILED\n");
  debug_exit(GUEST_EXIT_PANIC_FAILED);
}
