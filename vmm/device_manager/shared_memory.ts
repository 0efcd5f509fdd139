// Device shared-memory windows (virtio shared-memory regions, e.g. the GPU's host-visible window):
// where each goes in guest-physical space, and the mapper that turns a device's mappings inside its
// window into KVM memory slots, so that the device never calls KVM itself.

import type { SharedMemoryMapper, SharedMemoryRegion } from "../../devices/virtio/device.ts";
import { ConfigError } from "../../core/exit.ts";
import { GiB } from "../arch/layout.ts";
import type { VmHandle } from "../kvm/vm.ts";

/** Alignment of each window in guest-physical space. */
export const SHM_WINDOW_ALIGN = GiB;

/** A window: the guest-physical range a shared-memory region is mapped into. */
export interface SharedMemoryWindow {
  base: number;
  size: number;
}

/**
 * The guest-physical area the windows are placed in, from `start` (above RAM) up to `limit`: each
 * window aligned to SHM_WINDOW_ALIGN, one after another in the order they are asked for.
 */
export class SharedMemoryArea {
  #next: number;

  constructor(start: number, readonly limit: number) {
    this.#next = start;
  }

  /** Windows for `owner`'s regions, by region id. Throws ConfigError when they do not fit. */
  place(owner: string, regions: readonly SharedMemoryRegion[]): Map<number, SharedMemoryWindow> {
    const windows = new Map<number, SharedMemoryWindow>();
    let next = this.#next;
    for (const r of regions) {
      const base = Math.ceil(next / SHM_WINDOW_ALIGN) * SHM_WINDOW_ALIGN;
      if (base + r.size > this.limit) throw new ConfigError(`no guest address room for ${owner}'s window`);
      windows.set(r.id, { base, size: r.size });
      next = base + r.size;
    }
    this.#next = next;
    return windows;
  }
}

/**
 * A device's SharedMemoryMapper: each mapping (region id, offset in its window) becomes one KVM memory
 * slot at window base + offset. Mappings outside a window, or twice at one offset, are refused.
 */
export function sharedMemoryMapper(
  owner: string,
  windows: ReadonlyMap<number, SharedMemoryWindow>,
  vm: Pick<VmHandle, "addSlot" | "removeSlot">,
): SharedMemoryMapper {
  const slots = new Map<string, number>();
  return {
    addMapping: (id, offset, hostAddr, length, writable) => {
      const w = windows.get(id);
      if (!w || offset < 0 || length <= 0 || offset + length > w.size) {
        throw new Error(`${owner}: mapping ${offset}+${length} is outside shared-memory region ${id}`);
      }
      const key = `${id}:${offset}`;
      if (slots.has(key)) throw new Error(`${owner}: region ${id} offset ${offset} is already mapped`);
      slots.set(key, vm.addSlot(w.base + offset, length, hostAddr, !writable));
    },
    removeMapping: (id, offset) => {
      const key = `${id}:${offset}`;
      const slot = slots.get(key);
      if (slot === undefined) throw new Error(`${owner}: region ${id} offset ${offset} is not mapped`);
      vm.removeSlot(slot);
      slots.delete(key);
    },
  };
}
