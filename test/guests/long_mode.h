/*
 * Entering 64-bit mode from 32-bit protected mode, for the guests written in assembly: the
 * control-register and EFER bits, the GDT descriptors of a flat 64-bit code and data segment, and
 * the switch itself. Included by test/guests/trampoline.S and bench/guest/ticker.S.
 */

/* Control-register and EFER bits (Intel SDM vol. 3A, 2.5 and 2.2.1). */
#define CR0_PE 0x1
#define CR0_PG 0x80000000
#define CR4_PAE 0x20
#define MSR_EFER 0xc0000080
#define EFER_LME 0x100

/* Segment descriptors (Intel SDM vol. 3A, 3.4.5): present, DPL 0, base 0, limit 4 GiB. */
#define GDT_CODE64 0x00af9a000000ffff	/* execute/read, L=1: 64-bit code */
#define GDT_DATA 0x00cf92000000ffff	/* read/write */
#define GDT_CODE32 0x00cf9a000000ffff	/* execute/read, D=1: 32-bit code */

/*
 * From 32-bit protected mode: PAE on, CR3 from `cr3` (a mov source: `$table` or a memory operand),
 * EFER.LME on, then paging on. The CPU is then in compatibility mode until a far jump to a 64-bit code
 * segment. Clobbers eax, ecx and edx.
 */
.macro ENTER_LONG_MODE cr3
	mov %cr4, %eax
	or $CR4_PAE, %eax
	mov %eax, %cr4
	mov \cr3, %eax
	mov %eax, %cr3
	mov $MSR_EFER, %ecx
	rdmsr
	or $EFER_LME, %eax
	wrmsr
	mov %cr0, %eax
	or $(CR0_PG | CR0_PE), %eax
	mov %eax, %cr0
.endm
