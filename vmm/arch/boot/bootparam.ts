// Offsets inside Linux's `struct boot_params` (the "zero page") and its embedded
// `struct setup_header`, as absolute offsets from the start of boot_params.
// Source: Linux arch/x86/include/uapi/asm/bootparam.h and Documentation/arch/x86/boot.rst
// ("THE REAL-MODE KERNEL HEADER" table gives the same offsets for the header in the bzImage file).

/** sizeof(struct boot_params): one 4 KiB page. */
export const BOOT_PARAMS_SIZE = 0x1000;

// ---- struct boot_params fields (bootparam.h) ----
/** __u64 acpi_rsdp_addr (boot protocol 2.14+). */
export const BP_ACPI_RSDP_ADDR = 0x070;
/** __u32 ext_ramdisk_image: bits 32..63 of ramdisk_image. */
export const BP_EXT_RAMDISK_IMAGE = 0x0c0;
/** __u32 ext_ramdisk_size: bits 32..63 of ramdisk_size. */
export const BP_EXT_RAMDISK_SIZE = 0x0c4;
/** __u32 ext_cmd_line_ptr: bits 32..63 of cmd_line_ptr. */
export const BP_EXT_CMD_LINE_PTR = 0x0c8;
/** __u8 e820_entries. */
export const BP_E820_ENTRIES = 0x1e8;
/** struct setup_header hdr starts here. */
export const BP_HDR = 0x1f1;
/** End of the room boot_params keeps for hdr: edd_mbr_sig_buffer follows at 0x290. */
export const BP_HDR_ROOM_END = 0x290;
/** struct boot_e820_entry e820_table[E820_MAX_ENTRIES_ZEROPAGE]. */
export const BP_E820_TABLE = 0x2d0;
/** E820_MAX_ENTRIES_ZEROPAGE. */
export const E820_MAX_ENTRIES_ZEROPAGE = 128;
/** sizeof(struct boot_e820_entry): __u64 addr, __u64 size, __u32 type (packed). */
export const E820_ENTRY_SIZE = 20;
export const E820_ENTRY_ADDR = 0;
export const E820_ENTRY_SIZE_FIELD = 8;
export const E820_ENTRY_TYPE = 16;

// ---- struct setup_header fields (absolute offsets; bootparam.h / boot.rst) ----
/** __u8 setup_sects: size of the real-mode setup in 512-byte sectors (0 means 4). */
export const HDR_SETUP_SECTS = 0x1f1;
/** __u32 syssize: size of the protected-mode code in 16-byte paragraphs. */
export const HDR_SYSSIZE = 0x1f4;
/** __u16 vid_mode. */
export const HDR_VID_MODE = 0x1fa;
/** __u16 boot_flag: 0xAA55. */
export const HDR_BOOT_FLAG = 0x1fe;
/** __u16 jump: a short jump; its displacement byte at 0x201 gives the header's end. */
export const HDR_JUMP = 0x200;
/** __u32 header: "HdrS". */
export const HDR_HEADER = 0x202;
/** __u16 version: boot protocol version, major in the high byte. */
export const HDR_VERSION = 0x206;
/** __u8 type_of_loader. */
export const HDR_TYPE_OF_LOADER = 0x210;
/** __u8 loadflags. */
export const HDR_LOADFLAGS = 0x211;
/** __u32 code32_start: where the protected-mode kernel was loaded. */
export const HDR_CODE32_START = 0x214;
/** __u32 ramdisk_image, __u32 ramdisk_size. */
export const HDR_RAMDISK_IMAGE = 0x218;
export const HDR_RAMDISK_SIZE = 0x21c;
/** __u16 heap_end_ptr. */
export const HDR_HEAP_END_PTR = 0x224;
/** __u32 cmd_line_ptr. */
export const HDR_CMD_LINE_PTR = 0x228;
/** __u32 initrd_addr_max (protocol 2.03+). */
export const HDR_INITRD_ADDR_MAX = 0x22c;
/** __u32 kernel_alignment (protocol 2.05+). */
export const HDR_KERNEL_ALIGNMENT = 0x230;
/** __u8 relocatable_kernel (protocol 2.05+). */
export const HDR_RELOCATABLE_KERNEL = 0x234;
/** __u16 xloadflags (protocol 2.12+). */
export const HDR_XLOADFLAGS = 0x236;
/** __u32 cmdline_size (protocol 2.06+): longest command line, without the NUL. */
export const HDR_CMDLINE_SIZE = 0x238;
/** __u64 pref_address (protocol 2.10+). */
export const HDR_PREF_ADDRESS = 0x258;
/** __u32 init_size (protocol 2.10+): memory the kernel needs from its load address while booting. */
export const HDR_INIT_SIZE = 0x260;
/** First byte after the 2.15 header (kernel_info_offset ends here). */
export const HDR_END_2_15 = 0x26c;

// ---- Values ----
/** boot_flag value. */
export const BOOT_FLAG_MAGIC = 0xaa55;
/** "HdrS" read as a little-endian u32. */
export const HDR_MAGIC = 0x53726448;
/** type_of_loader 0xff: "undefined" boot loader (boot.rst, type_of_loader). */
export const LOADER_TYPE_UNDEFINED = 0xff;
/** loadflags bit 0: protected-mode code loaded at 0x100000 or above. */
export const LOADFLAG_LOADED_HIGH = 1 << 0;
/** loadflags bit 7: heap_end_ptr is valid. */
export const LOADFLAG_CAN_USE_HEAP = 1 << 7;
/** xloadflags bit 0: the kernel has the 64-bit entry point at load address + 0x200. */
export const XLF_KERNEL_64 = 1 << 0;
/** Offset of the 64-bit entry point from the protected-mode load address (boot.rst, "64-bit BOOT PROTOCOL"). */
export const STARTUP_64_OFFSET = 0x200;
/** Protocol versions that introduced fields denovm reads. */
export const PROTOCOL_2_03 = 0x0203;
export const PROTOCOL_2_05 = 0x0205;
export const PROTOCOL_2_06 = 0x0206;
export const PROTOCOL_2_10 = 0x020a;
export const PROTOCOL_2_12 = 0x020c;
export const PROTOCOL_2_14 = 0x020e;
/** The protocol version denovm claims in a header it synthesizes for an ELF kernel. */
export const PROTOCOL_2_15 = 0x020f;
/** initrd_addr_max for kernels older than 2.03 (boot.rst). */
export const INITRD_ADDR_MAX_DEFAULT = 0x37ffffff;
/** initrd_addr_max reported by every x86_64 kernel since 2.03 (boot.rst). */
export const INITRD_ADDR_MAX_2_03 = 0x7fffffff;
/** Size of a real-mode setup sector. */
export const SECTOR_SIZE = 512;
/** setup_sects value 0 means this many (boot.rst). */
export const SETUP_SECTS_DEFAULT = 4;
/** syssize unit: 16-byte paragraphs. */
export const PARAGRAPH = 16;
