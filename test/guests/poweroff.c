/* Prints POWEROFF and powers off through the ACPI sleep control register (expect exit 0). */
#include "rt.h"

void guest_main(void) {
  printf("POWEROFF\n");
  acpi_poweroff();
}
