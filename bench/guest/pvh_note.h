/*
 * The Xen ELF note that gives a bench guest its PVH entry, for QEMU's x86 -kernel, which enters an ELF
 * that has it in 32-bit protected mode with paging off (xen/include/public/elfnote.h; Linux
 * Documentation/arch/x86/boot.rst for the 64-bit entry denovm uses). Included by the bench guests'
 * .S files.
 */

/* XEN_ELFNOTE_PHYS32_ENTRY (xen/include/public/elfnote.h): the 32-bit physical entry point. */
#define XEN_ELFNOTE_PHYS32_ENTRY 18

/* The note naming `entry` as the 32-bit physical entry point. */
.macro PVH_NOTE entry
	.pushsection .note.Xen, "a", @note
	.p2align 2
	.long 4				/* namesz: "Xen" and its NUL */
	.long 4				/* descsz: a 32-bit address */
	.long XEN_ELFNOTE_PHYS32_ENTRY
	.asciz "Xen"
	.long \entry
	.popsection
.endm
