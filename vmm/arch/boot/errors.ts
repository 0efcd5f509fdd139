// Errors of the kernel and initrd loaders.

/** The file is not a kernel denovm can boot: not bzImage or ELF64, truncated, wrong architecture, too old. */
export class KernelFormatError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "KernelFormatError";
  }
}

/** The kernel or initrd does not fit guest RAM. */
export class GuestTooSmallError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "GuestTooSmallError";
  }
}

/** "0x1234" for messages. */
export function hex(n: number): string {
  return `0x${n.toString(16)}`;
}
