/*
 * A guest for the GDB stub's test (test/kvm/gdb_test.ts): a global counter that a function bumps in
 * an endless loop, so a debugger can break on the function, read the variable, step and continue.
 * It prints one line and then never exits on its own: the test stops the VM.
 */
#include "rt.h"

/* Spins between bumps: a few hundred instructions, so an interrupt lands in the loop most of the time. */
#define SPIN 100

volatile u64 gdb_counter;

__attribute__((noinline)) void gdb_bump(void) { gdb_counter++; }

void guest_main(void) {
  printf("GDB TARGET\n");
  for (;;) {
    gdb_bump();
    for (volatile int i = 0; i < SPIN; i++) {
    }
  }
}
