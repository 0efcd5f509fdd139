/* Echoes COM1 input back byte by byte (polling LSR data-ready); on 'q' prints BYE and powers off. */
#include "rt.h"

void guest_main(void) {
  printf("ECHO ready\n");
  for (;;) {
    int c = serial_getc();
    if (c == 'q') break;
    putc((char)c);
  }
  printf("\nBYE\n");
}
