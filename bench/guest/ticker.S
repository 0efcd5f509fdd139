/*
 * The restore and clone benchmarks' test guest: writes START_BYTE to COM1 at once, fills FILL_MIB
 * MiB of RAM from FILL_START with a non-zero pattern (none with FILL_MIB=0), then writes TICK_BYTE
 * every PERIOD_US microseconds from the local APIC timer, halting in between. So a restored copy of
 * it prints again within one period: "the first output after restore" exists, and its memory (the
 * filled part) is what snapshot clones share.
 *
 * One ELF that both VMMs boot, as bench/guest/first_byte.S: denovm enters it at its 64-bit entry
 * (Linux Documentation/arch/x86/boot.rst, "64-bit Boot Protocol"), QEMU at its PVH entry (32-bit
 * protected mode, paging off), which the Xen ELF note of pvh_note.h names. Both
 * entries load this guest's own GDT and page tables (the low 4 GiB identity-mapped with 2 MiB pages,
 * the local APIC's page included), so the code after them is the same under both VMMs.
 *
 * Linked by ticker.ld; built by bench/_common.ts buildTickerGuest with -DFILL_MIB=<n>
 * -DPERIOD_US=<n>; layout.h comes from vmm/arch/layout.ts.
 */
#include "layout.h"
#include "pvh_note.h"
#include "../../test/guests/long_mode.h"

/* What the guest writes to the UART's transmit register (offset 0 of its port range). */
#define START_BYTE '!'
#define TICK_BYTE '.'

/* Where the fill starts: 32 MiB, above the image (loaded at KERNEL_START, 16 MiB) and its tables. */
#define FILL_START 0x2000000
/* The fill's 8-byte pattern: non-zero, so a snapshot's sparse memory file holds every filled page. */
#define FILL_PATTERN 0x5a5a5a5a5a5a5a5a
#define MIB 0x100000

/* xAPIC registers, offsets from APIC_START (Intel SDM vol. 3A, table 11-1). */
#define APIC_EOI 0xb0
#define APIC_SVR 0xf0
#define APIC_LVT_TIMER 0x320
#define APIC_TIMER_INITIAL_COUNT 0x380
#define APIC_TIMER_DIVIDE 0x3e0
/* Spurious-interrupt vector register bit 8: APIC software enable (SDM vol. 3A, 11.9). */
#define APIC_SVR_ENABLE 0x100
/* LVT timer mode bits 18:17 = 01b: periodic (SDM vol. 3A, 11.5.1, figure 11-8). */
#define APIC_TIMER_PERIODIC 0x20000
/* Divide configuration 1011b: divide by 1 (SDM vol. 3A, figure 11-10). */
#define APIC_TIMER_DIVIDE_BY_1 0xb
/*
 * Timer counts per microsecond at divide-by-1: KVM's local APIC counts at 1 GHz (its default APIC
 * bus cycle of 1 ns, arch/x86/kvm/lapic.h APIC_BUS_CYCLE_NS_DEFAULT), and so does QEMU's
 * (hw/intc/apic.c counts initial_count << count_shift nanoseconds).
 */
#define APIC_TIMER_COUNTS_PER_US 1000
/* The timer's vector (the first one above the exceptions) and the spurious vector. */
#define TIMER_VECTOR 0x20
#define SPURIOUS_VECTOR 0xff
/* Bytes per IDT gate in IA-32e mode and gates in the table (SDM vol. 3A, 6.14.1). */
#define IDT_GATE_SIZE 16
#define IDT_GATES 256
/* Type/attribute byte of a present DPL-0 64-bit interrupt gate (SDM vol. 3A, figure 6-8). */
#define IDT_INTERRUPT_GATE 0x8e

/* 8259A interrupt mask registers (OCW1), master and slave: all IRQs masked. */
#define PIC_MASTER_IMR 0x21
#define PIC_SLAVE_IMR 0xa1
#define PIC_MASK_ALL 0xff

/* Paging-structure entry bits (SDM vol. 3A, 4.5): present, writable, 2 MiB page. */
#define PTE_P 0x1
#define PTE_W 0x2
#define PTE_PS 0x80
#define PAGE_2M 0x200000
/* Page directories: four of 512 2 MiB pages map the low 4 GiB, APIC_START included. */
#define PAGE_DIRECTORIES 4
#define PD_ENTRIES 512

/* Selectors of the GDT below. */
#define CODE64_SELECTOR 0x08
#define DATA_SELECTOR 0x10

	PVH_NOTE pvh_start

	.text
	.globl _start
	.code64
_start:					/* denovm: 64-bit mode, the VMM's GDT and page tables */
	cli
	lgdt gdt_pointer
	mov $pml4, %eax
	mov %rax, %cr3
	push $CODE64_SELECTOR
	push $common
	lretq

	.code32
pvh_start:				/* QEMU: 32-bit protected mode, paging off */
	cli
	lgdt gdt_pointer
	ENTER_LONG_MODE $pml4
	ljmp $CODE64_SELECTOR, $common

	.code64
common:
	mov $DATA_SELECTOR, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	mov %eax, %fs
	mov %eax, %gs
	mov $stack_top, %esp

	mov $SERIAL_PORTS_0_BASE, %edx
	mov $START_BYTE, %eax
	out %al, %dx

	mov $PIC_MASK_ALL, %eax
	out %al, $PIC_MASTER_IMR
	out %al, $PIC_SLAVE_IMR

	mov $FILL_START, %edi
	mov $(FILL_MIB * MIB / 8), %ecx
	movabs $FILL_PATTERN, %rax
	cld
	rep stosq

	mov $tick, %eax
	mov $(idt + TIMER_VECTOR * IDT_GATE_SIZE), %edi
	call set_gate
	mov $spurious, %eax
	mov $(idt + SPURIOUS_VECTOR * IDT_GATE_SIZE), %edi
	call set_gate
	lidt idt_pointer

	mov $APIC_START, %ebx
	movl $(APIC_SVR_ENABLE | SPURIOUS_VECTOR), APIC_SVR(%rbx)
	movl $APIC_TIMER_DIVIDE_BY_1, APIC_TIMER_DIVIDE(%rbx)
	movl $(APIC_TIMER_PERIODIC | TIMER_VECTOR), APIC_LVT_TIMER(%rbx)
	movl $(PERIOD_US * APIC_TIMER_COUNTS_PER_US), APIC_TIMER_INITIAL_COUNT(%rbx)

idle:	sti				/* sti; hlt: no interrupt slips in between (SDM vol. 2B, STI) */
	hlt
	jmp idle

/* Write a 64-bit interrupt gate for the handler at %eax into the IDT slot at %edi. */
set_gate:
	mov %ax, (%rdi)			/* offset 15:0 */
	movw $CODE64_SELECTOR, 2(%rdi)
	movb $0, 4(%rdi)		/* IST 0 */
	movb $IDT_INTERRUPT_GATE, 5(%rdi)
	shr $16, %eax
	mov %ax, 6(%rdi)		/* offset 31:16 */
	movl $0, 8(%rdi)		/* offset 63:32: the image is below 4 GiB */
	movl $0, 12(%rdi)
	ret

tick:
	push %rax
	push %rdx
	mov $SERIAL_PORTS_0_BASE, %edx
	mov $TICK_BYTE, %eax
	out %al, %dx
	mov $APIC_START, %eax
	movl $0, APIC_EOI(%rax)
	pop %rdx
	pop %rax
	iretq

spurious:				/* no EOI for the spurious vector (SDM vol. 3A, 11.9) */
	iretq

	.data
	.p2align 3
gdt:
	.quad 0
	.quad GDT_CODE64		/* CODE64_SELECTOR */
	.quad GDT_DATA			/* DATA_SELECTOR */
gdt_end:
gdt_pointer:
	.word gdt_end - gdt - 1
	.quad gdt
idt_pointer:
	.word IDT_GATES * IDT_GATE_SIZE - 1
	.quad idt

	.p2align 12
pml4:
	.quad pdpt + (PTE_P | PTE_W)
	.fill 511, 8, 0
pdpt:
	.set pd_index, 0
	.rept PAGE_DIRECTORIES
	.quad pd + pd_index * 0x1000 + (PTE_P | PTE_W)
	.set pd_index, pd_index + 1
	.endr
	.fill 512 - PAGE_DIRECTORIES, 8, 0
pd:
	.set page, 0
	.rept PAGE_DIRECTORIES * PD_ENTRIES
	.quad page + (PTE_P | PTE_W | PTE_PS)
	.set page, page + PAGE_2M
	.endr
idt:
	.fill IDT_GATES * IDT_GATE_SIZE, 1, 0
stack:
	.fill 4096, 1, 0
stack_top:
