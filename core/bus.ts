// Address buses: the port I/O space and the MMIO space, each a sorted set of
// non-overlapping ranges, each served by one device.

/** A device on a bus: `offset` is relative to the start of its range. */
export interface BusDevice {
  read(offset: number, data: Uint8Array): void;
  write(offset: number, data: Uint8Array): void;
}

interface Range {
  base: number;
  size: number;
  device: BusDevice;
  name: string;
}

export class Bus {
  readonly #ranges: Range[] = [];
  /** Accesses that hit no device (counted, and answered with all-ones on reads). */
  unhandled = 0;

  constructor(readonly name: string) {}

  add(base: number, size: number, device: BusDevice, name: string): void {
    for (const r of this.#ranges) {
      if (base < r.base + r.size && r.base < base + size) {
        throw new Error(`${this.name} bus: ${name} at 0x${base.toString(16)} overlaps ${r.name}`);
      }
    }
    this.#ranges.push({ base, size, device, name });
    this.#ranges.sort((a, b) => a.base - b.base);
  }

  #find(addr: number): Range | undefined {
    let lo = 0, hi = this.#ranges.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      const r = this.#ranges[mid];
      if (addr < r.base) hi = mid - 1;
      else if (addr >= r.base + r.size) lo = mid + 1;
      else return r;
    }
    return undefined;
  }

  /** Returns false when no device owns the address (reads then see all-ones). */
  read(addr: number, data: Uint8Array): boolean {
    const r = this.#find(addr);
    if (!r) {
      this.unhandled++;
      data.fill(0xff);
      return false;
    }
    r.device.read(addr - r.base, data);
    return true;
  }

  write(addr: number, data: Uint8Array): boolean {
    const r = this.#find(addr);
    if (!r) {
      this.unhandled++;
      return false;
    }
    r.device.write(addr - r.base, data);
    return true;
  }

  /** Names and ranges, for logs and tests. */
  list(): { name: string; base: number; size: number }[] {
    return this.#ranges.map(({ name, base, size }) => ({ name, base, size }));
  }
}
