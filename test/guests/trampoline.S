/*
 * AP start-up trampoline of the smp guest. smp.c copies tramp_start..tramp_end to
 * AP_TRAMPOLINE_START and fills the parameter block; a SIPI with vector AP_TRAMPOLINE_START >> 12
 * starts an AP here in real mode at CS = AP_TRAMPOLINE_START >> 4, IP = 0 (Intel SDM vol. 3
 * section 9.4.4). Path: real mode → 32-bit protected mode (own GDT) → PAE + EFER.LME + paging
 * with the BSP's CR3 → 64-bit code → the BSP's GDT and IDT → ap_entry64 on its own stack.
 * The section is not marked executable: it never runs where it is linked.
 */
#include "layout.h"
#include "long_mode.h"

/* Offsets inside the copied page, and absolute addresses once copied. */
#define OFF(sym) ((sym) - tramp_start)
#define ABS(sym) (AP_TRAMPOLINE_START + OFF(sym))

/* Selectors of the trampoline GDT below. code64 and data match the VMM's GDT (0x08, 0x10). */
#define SEL_CODE64 0x08
#define SEL_DATA 0x10
#define SEL_CODE32 0x18

	.section .tramp, "a"
	.globl tramp_start, tramp_end, tramp_cr3, tramp_stack, tramp_entry, tramp_gdtr64, tramp_idtr64
	.code16
tramp_start:
	cli
	cld
	mov %cs, %ax
	mov %ax, %ds
	lgdtl OFF(tramp_gdtr32)
	mov %cr0, %eax
	or $CR0_PE, %eax
	mov %eax, %cr0
	ljmpl $SEL_CODE32, $ABS(tramp32)

	.code32
tramp32:
	mov $SEL_DATA, %ax
	mov %ax, %ds
	mov %ax, %es
	mov %ax, %ss
	ENTER_LONG_MODE ABS(tramp_cr3)
	ljmp $SEL_CODE64, $ABS(tramp64)

	.code64
tramp64:
	lgdt ABS(tramp_gdtr64)
	lidt ABS(tramp_idtr64)
	mov $SEL_DATA, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	mov ABS(tramp_stack), %rsp
	mov ABS(tramp_entry), %rax
	xor %ebp, %ebp
	call *%rax
1:	cli
	hlt
	jmp 1b

	.p2align 3
tramp_gdt:
	.quad 0                    /* null */
	.quad GDT_CODE64           /* SEL_CODE64 */
	.quad GDT_DATA             /* SEL_DATA */
	.quad GDT_CODE32           /* SEL_CODE32 */
tramp_gdt_end:
tramp_gdtr32:
	.word tramp_gdt_end - tramp_gdt - 1
	.long ABS(tramp_gdt)

	/* Parameter block, filled by the BSP before each SIPI. */
	.p2align 3
tramp_cr3:	.quad 0
tramp_stack:	.quad 0
tramp_entry:	.quad 0
tramp_gdtr64:	.word 0
		.quad 0
	.p2align 3
tramp_idtr64:	.word 0
		.quad 0
tramp_end:

	.section .note.GNU-stack, "", @progbits
