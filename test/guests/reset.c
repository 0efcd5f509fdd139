/* Prints RESET and pulses the reset line through the i8042 (expect crosvm exit 32). */
#include "rt.h"

void guest_main(void) {
  printf("RESET\n");
  i8042_reset();
}
