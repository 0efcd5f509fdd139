// Shared guest RAM: what a VM with a vhost-user device pays for having its RAM in a memfd the back end can
// map (OwnedGuestMemory.allocateShared) instead of anonymous memory (OwnedGuestMemory.allocate), measured
// from the host side: the time to touch every page of freshly allocated RAM once (the page faults a guest
// pays as it first uses its memory), the time to write all of it again once faulted in, and how much of
// it the kernel mapped with 2 MiB pages (AnonHugePages for anonymous memory, ShmemPmdMapped for the memfd,
// from /proc/self/smaps_rollup). Shared memory gets huge pages only where
// /sys/kernel/mm/transparent_hugepage/shmem_enabled allows them; the line reports that setting. The guest
// side (KVM maps guest RAM with large pages only where the host does) is not timed here.
//
// Output: {"bench":"shared_ram","mib":N,"fault_ratio":..,"fill_ratio":..,"anon":{"fault_ms":..,"fill_ms":..,
//          "huge_mib":..},"shared":{...},"shmem_enabled":"..","repeats":N}
// (medians; each ratio is shared / anonymous time: above 1.0 the shared RAM is slower).

import { OwnedGuestMemory } from "../core/memory.ts";
import { MiB } from "../core/units.ts";
import { median, result } from "./_common.ts";

const SIZE_MIB = Number(Deno.env.get("SHARED_RAM_MIB") ?? 512);
const REPEATS = 5;
const PAGE = 4096;

/** The kB figure of `field` in /proc/self/smaps_rollup, in MiB. */
function rollupMiB(field: string): number {
  const text = Deno.readTextFileSync("/proc/self/smaps_rollup");
  const m = text.match(new RegExp(`^${field}:\\s+(\\d+) kB`, "m"));
  return m ? Number(m[1]) / 1024 : 0;
}

function shmemEnabled(): string {
  try {
    const t = Deno.readTextFileSync("/sys/kernel/mm/transparent_hugepage/shmem_enabled");
    return t.match(/\[(\w+)\]/)?.[1] ?? t.trim();
  } catch {
    return "unknown";
  }
}

function measure(shared: boolean): { fault_ms: number; fill_ms: number; huge_mib: number } {
  const size = SIZE_MIB * MiB;
  const ranges = [{ start: 0, size }];
  const faults: number[] = [];
  const fills: number[] = [];
  let huge = 0;
  for (let r = 0; r < REPEATS; r++) {
    const mem = shared ? OwnedGuestMemory.allocateShared(ranges) : OwnedGuestMemory.allocate(ranges);
    try {
      const bytes = mem.slice(0, size);
      let t = performance.now();
      for (let off = 0; off < size; off += PAGE) bytes[off] = 1;
      faults.push(performance.now() - t);
      huge = Math.max(huge, rollupMiB(shared ? "ShmemPmdMapped" : "AnonHugePages"));
      t = performance.now();
      bytes.fill(r + 2);
      fills.push(performance.now() - t);
    } finally {
      mem.close();
    }
  }
  const ms = (v: number) => Number(v.toFixed(1));
  return { fault_ms: ms(median(faults)), fill_ms: ms(median(fills)), huge_mib: Math.round(huge) };
}

const anon = measure(false);
const shared = measure(true);
result("shared_ram", {
  mib: SIZE_MIB,
  fault_ratio: Number((shared.fault_ms / anon.fault_ms).toFixed(2)),
  fill_ratio: Number((shared.fill_ms / anon.fill_ms).toFixed(2)),
  anon,
  shared,
  shmem_enabled: shmemEnabled(),
  repeats: REPEATS,
});
