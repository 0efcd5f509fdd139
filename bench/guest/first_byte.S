/*
 * The start-up benchmark's test guest: writes one byte to COM1 at once, then halts. One ELF that
 * both VMMs boot: denovm enters it at its 64-bit entry (Linux Documentation/arch/x86/boot.rst,
 * "64-bit Boot Protocol"), QEMU at its PVH entry (32-bit protected mode, paging off), which the
 * Xen ELF note of pvh_note.h names. Linked by first_byte.ld; layout.h comes from vmm/arch/layout.ts.
 */
#include "layout.h"
#include "pvh_note.h"

/* The byte both entries write to the UART's transmit register (offset 0 of its port range). */
#define FIRST_BYTE '!'

	PVH_NOTE pvh_start

	.text
	.globl _start
	.code64
_start:
	mov $SERIAL_PORTS_0_BASE, %edx
	mov $FIRST_BYTE, %eax
	out %al, %dx
1:	cli
	hlt
	jmp 1b

	.code32
pvh_start:
	mov $SERIAL_PORTS_0_BASE, %edx
	mov $FIRST_BYTE, %eax
	out %al, %dx
2:	cli
	hlt
	jmp 2b
