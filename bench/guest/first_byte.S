/*
 * The start-up benchmark's test guest: writes one byte to COM1 at once, then halts. One ELF that
 * both VMMs boot: denovm enters it at its 64-bit entry (Linux Documentation/arch/x86/boot.rst,
 * "64-bit Boot Protocol"), QEMU at its PVH entry (32-bit protected mode, paging off), which the
 * Xen ELF note below names (xen/include/public/elfnote.h; QEMU's x86 -kernel loads an ELF that
 * has it the PVH way). Linked by first_byte.ld; layout.h comes from vmm/arch/layout.ts.
 */
#include "layout.h"

/* XEN_ELFNOTE_PHYS32_ENTRY (xen/include/public/elfnote.h): the 32-bit physical entry point. */
#define XEN_ELFNOTE_PHYS32_ENTRY 18
/* The byte both entries write to the UART's transmit register (offset 0 of its port range). */
#define FIRST_BYTE '!'

	.section .note.Xen, "a", @note
	.p2align 2
	.long 4				/* namesz: "Xen" and its NUL */
	.long 4				/* descsz: a 32-bit address */
	.long XEN_ELFNOTE_PHYS32_ENTRY
	.asciz "Xen"
	.long pvh_start

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
