/*
 * The exit round-trip benchmark guest: LOOPS one-byte `out` writes to BENCH_PORT, each one a VM
 * exit the VMM must handle, then a write of 0 to DEBUG_EXIT_PORT (exit code 0). If nothing serves
 * the debug exit port, it resets through the i8042 instead, so the VM ends either way.
 *
 * Entered like a vmlinux at its 64-bit entry (Linux Documentation/arch/x86/boot.rst, "64-bit Boot
 * Protocol"). Only plain integer instructions, so it runs under an emulating KVM too. Built by
 * bench/exit_roundtrip.ts with -DLOOPS=<n> -DBENCH_PORT=<port>; layout.h comes from vmm/arch/layout.ts.
 */
#include "layout.h"

/* i8042 command 0xfe: pulse output port bit 0, the CPU reset line (8042 controller command set). */
#define I8042_CMD_RESET_CPU 0xfe

	.text
	.globl _start
	.code64
_start:
	cli
	mov $LOOPS, %ecx
	mov $BENCH_PORT, %edx
	xor %eax, %eax
	test %ecx, %ecx
	jz 2f
1:	out %al, %dx
	dec %ecx
	jnz 1b
2:	mov $DEBUG_EXIT_PORT, %edx
	xor %eax, %eax
	out %al, %dx
	mov $I8042_COMMAND_PORT, %edx
	mov $I8042_CMD_RESET_CPU, %eax
	out %al, %dx
3:	hlt
	jmp 3b
