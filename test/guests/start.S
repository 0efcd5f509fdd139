/*
 * Entry point and interrupt stubs of denovm's test guests.
 *
 * Entered like a vmlinux at its 64-bit entry (Linux Documentation/arch/x86/boot.rst,
 * "64-bit Boot Protocol"): long mode, paging on, RSI = struct boot_params, interrupts off.
 */
#include "layout.h"

/* Size of the boot CPU's own stack (the VMM's BOOT_STACK_POINTER has little room below it). */
#define BSP_STACK_SIZE 16384

	.section .text.start, "ax"
	.globl _start
	.code64
_start:
	cli
	cld
	/* Record the entry state before touching it, for boot_info. */
	mov %rsp, entry_rsp(%rip)
	pushfq
	popq entry_rflags(%rip)
	mov %cs, %eax
	mov %rax, entry_cs(%rip)
	mov %ds, %eax
	mov %rax, entry_ds(%rip)
	mov %ss, %eax
	mov %rax, entry_ss(%rip)
	mov %rsi, boot_params(%rip)
	/* Zero .bss (boot_params and the entry_* words live in .data). */
	lea __bss_start(%rip), %rdi
	lea __bss_end(%rip), %rcx
	sub %rdi, %rcx
	shr $3, %rcx
	xor %eax, %eax
	rep stosq
	lea bsp_stack_top(%rip), %rsp
	xor %ebp, %ebp
	call rt_main
1:	cli
	hlt
	jmp 1b

/* Exceptions that push an error code (Intel SDM vol. 3, table 6-1): 8, 10-14, 17, 21, 29, 30. */
.macro ISR_STUB vec
	.p2align 4
isr_\vec:
	.if (\vec == 8) || (\vec >= 10 && \vec <= 14) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
	.else
	pushq $0
	.endif
	pushq $\vec
	jmp isr_common
.endm

	.text
isr_common:
	push %rax
	push %rbx
	push %rcx
	push %rdx
	push %rsi
	push %rdi
	push %rbp
	push %r8
	push %r9
	push %r10
	push %r11
	push %r12
	push %r13
	push %r14
	push %r15
	mov %rsp, %rdi
	/* Align the stack for the C call; the frame pointer is kept in rbx (callee-saved). */
	mov %rsp, %rbx
	and $-16, %rsp
	call irq_dispatch
	mov %rbx, %rsp
	pop %r15
	pop %r14
	pop %r13
	pop %r12
	pop %r11
	pop %r10
	pop %r9
	pop %r8
	pop %rbp
	pop %rdi
	pop %rsi
	pop %rdx
	pop %rcx
	pop %rbx
	pop %rax
	add $16, %rsp
	iretq

	.altmacro
.macro ISR_ALL from=0, to=255
	ISR_STUB \from
	.if \to-\from
	ISR_ALL %(\from+1), \to
	.endif
.endm
	/* Split to keep the assembler's macro recursion shallow. */
	ISR_ALL 0, 63
	ISR_ALL 64, 127
	ISR_ALL 128, 191
	ISR_ALL 192, 255

	/* Table of stub addresses, read by idt_init() in rt.c. */
.macro ISR_ADDR from=0, to=255
	.quad isr_\from
	.if \to-\from
	ISR_ADDR %(\from+1), \to
	.endif
.endm
	.section .rodata
	.p2align 3
	.globl isr_table
isr_table:
	ISR_ADDR 0, 63
	ISR_ADDR 64, 127
	ISR_ADDR 128, 191
	ISR_ADDR 192, 255

	.data
	.p2align 3
	.globl boot_params, entry_rsp, entry_rflags, entry_cs, entry_ds, entry_ss
boot_params:	.quad 0
entry_rsp:	.quad 0
entry_rflags:	.quad 0
entry_cs:	.quad 0
entry_ds:	.quad 0
entry_ss:	.quad 0

	.bss
	.p2align 4
bsp_stack:
	.skip BSP_STACK_SIZE
bsp_stack_top:

	.section .note.GNU-stack, "", @progbits
