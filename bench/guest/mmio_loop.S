/*
 * The mmio-exit benchmark guest: checks that a virtio-mmio device answers at VIRTIO_MMIO_START
 * (MagicValue "virt", Version 2), then reads its InterruptStatus register LOOPS times (each read an
 * MMIO exit the VMM must serve, as Linux's vm_interrupt() does on every virtio interrupt), then
 * writes 0 to DEBUG_EXIT_PORT (exit code 0). Without the device it writes EXIT_NO_DEVICE instead.
 * If nothing serves the debug exit port, it resets through the i8042, so the VM ends either way.
 *
 * Entered like a vmlinux at its 64-bit entry (Linux Documentation/arch/x86/boot.rst, "64-bit Boot
 * Protocol") with the low 4 GiB identity-mapped. Only plain integer instructions. Built by
 * bench/mmio_exit.ts with -DLOOPS=<n> and bench/guest/exit_loop.ld; layout.h comes from vmm/arch/layout.ts.
 */
#include "layout.h"

/* virtio-mmio register offsets and values (virtio 1.2 section 4.2.2, "MMIO Device Register Layout"). */
#define VIRTIO_MMIO_MAGIC_VALUE 0x000
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_MAGIC 0x74726976
#define VIRTIO_MMIO_MODERN_VERSION 2
/* Debug exit code when no modern virtio-mmio device answers at VIRTIO_MMIO_START. */
#define EXIT_NO_DEVICE 3
/* i8042 command 0xfe: pulse output port bit 0, the CPU reset line (8042 controller command set). */
#define I8042_CMD_RESET_CPU 0xfe

	.text
	.globl _start
	.code64
_start:
	cli
	/* 32-bit move: zero-extends, where a 64-bit immediate move would sign-extend 0xd0000000. */
	mov $VIRTIO_MMIO_START, %ebx
	movl VIRTIO_MMIO_MAGIC_VALUE(%rbx), %eax
	cmp $VIRTIO_MMIO_MAGIC, %eax
	jne 4f
	movl VIRTIO_MMIO_VERSION(%rbx), %eax
	cmp $VIRTIO_MMIO_MODERN_VERSION, %eax
	jne 4f
	mov $LOOPS, %ecx
	test %ecx, %ecx
	jz 2f
1:	movl VIRTIO_MMIO_INTERRUPT_STATUS(%rbx), %eax
	dec %ecx
	jnz 1b
2:	xor %eax, %eax
3:	mov $DEBUG_EXIT_PORT, %edx
	out %al, %dx
	mov $I8042_COMMAND_PORT, %edx
	mov $I8042_CMD_RESET_CPU, %eax
	out %al, %dx
5:	hlt
	jmp 5b
4:	mov $EXIT_NO_DEVICE, %eax
	jmp 3b
