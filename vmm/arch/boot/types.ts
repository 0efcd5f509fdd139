// What a kernel loader reports about the kernel it put into guest memory.

export interface KernelInfo {
  kind: "bzimage" | "elf";
  /** Guest-physical 64-bit entry point (RIP at start, RSI = zero page). */
  entry: number;
  /** First guest-physical byte the kernel occupies. */
  loadStart: number;
  /**
   * First guest-physical byte past the kernel, including the memory it claims while booting
   * (a bzImage's init_size, an ELF segment's p_memsz); the initrd goes above this.
   */
  loadEnd: number;
  /** bzImage only: the setup header bytes 0x1f1..end of header, to copy into boot_params. */
  setupHeader?: Uint8Array;
  /** Highest address the initrd may occupy (its last byte). */
  initrdAddrMax: number;
  /** ELF only: the PVH 32-bit entry point (XEN_ELFNOTE_PHYS32_ENTRY), when the kernel has one. */
  pvhEntry?: number;
  /** bzImage only: boot protocol version (0x020f is 2.15). */
  protocolVersion?: number;
}
