// gpu-map: RESOURCE_MAP_BLOB + RESOURCE_UNMAP_BLOB round trips per second through denovm's GpuDevice with
// the virglrenderer backend (a HOST3D mappable buffer blob), driven by the test virtio driver (no VM), and
// how many blobs can stay mapped at once: map distinct blobs at distinct window offsets until the device
// refuses one or CAP are mapped.
//
// The mapper is a test mapper (bench/_gpu.ts) standing in for the VMM's KVM memory slots, so the numbers
// are the device's and virglrenderer's share of the cost (virgl_renderer_resource_map/unmap, the window
// bookkeeping, the virtqueue round trip), not KVM_SET_USER_MEMORY_REGION's; the JSON says "mapper":"test".
//
// On a KVM host, "kvm_memslots" is what KVM_CAP_NR_MEMSLOTS reports: the ceiling for blobs mapped at once
// when each mapping is its own memory slot (null here without /dev/kvm).
//
// Output: {"bench":"gpu-map","map_unmap_per_s":..,"max_mapped":..,"cap":..,"mapper":"test",...}

import * as P from "../devices/virtio/gpu/protocol.ts";
import { VirglBackend } from "../devices/virtio/gpu/backend_virgl.ts";
import { createHostBlob as createBlob, createVirglContext, GpuRig, MiB } from "./_gpu.ts";
import { mapBlob, unmapBlob } from "../test/support/gpu_commands.ts";
import { hasKvm, median, progress, result } from "./_common.ts";
import { Kvm } from "../vmm/kvm/vm.ts";
import { KVM_CAP_NR_MEMSLOTS } from "../ffi/kvm.ts";

const NAME = "gpu-map";
const ROUND_TRIPS = Number(Deno.env.get("BENCH_MAP_ROUND_TRIPS") ?? 2000);
const REPEATS = 3;
const CAP = Number(Deno.env.get("BENCH_MAP_CAP") ?? 4096);
/** The blob mapped and unmapped in the round-trip loop. */
const LOOP_BLOB_BYTES = 64 * 1024;
/** Each of the blobs kept mapped at once: one host page. */
const HELD_BLOB_BYTES = 4096;
const CTX = 1;

let backend: VirglBackend;
try {
  backend = new VirglBackend();
} catch (e) {
  result(NAME, { skipped: `virglrenderer unavailable: ${(e as Error).message}` });
  Deno.exit(0);
}

const rig = new GpuRig({ backend, guestBytes: 8 * MiB, arenaEnd: 8 * MiB });
let nextBlobId = 1;

/** A HOST3D mappable buffer blob with the next blob id. */
function createHostBlob(id: number, size: number): void {
  createBlob(rig, CTX, id, nextBlobId++, size);
}

/** KVM_CAP_NR_MEMSLOTS on this host, or null without /dev/kvm. */
function kvmMemslots(): number | null {
  if (!hasKvm()) return null;
  try {
    return new Kvm().checkExtension(KVM_CAP_NR_MEMSLOTS);
  } catch {
    return null;
  }
}

try {
  createVirglContext(rig, CTX);

  // 1. Round trips on one blob, at a few offsets in turn (as a guest's allocator would place it).
  const loopId = 1;
  createHostBlob(loopId, LOOP_BLOB_BYTES);
  const offsetAt = (i: number) => (i % 16) * LOOP_BLOB_BYTES;
  const roundTrips = (n: number) => {
    for (let i = 0; i < n; i++) {
      rig.ok(mapBlob(loopId, offsetAt(i)), P.RESP_OK_MAP_INFO);
      rig.ok(unmapBlob(loopId));
    }
  };
  roundTrips(50); // warm up
  const rates: number[] = [];
  for (let r = 0; r < REPEATS; r++) {
    const t0 = performance.now();
    roundTrips(ROUND_TRIPS);
    rates.push(ROUND_TRIPS / ((performance.now() - t0) / 1000));
  }
  const rate = median(rates);
  if (rig.mapper.live.size !== 0) throw new Error("a mapping outlived its unmap");
  progress(NAME, `${rate.toFixed(0)} map+unmap round trips per second (median of ${REPEATS} x ${ROUND_TRIPS})`);

  // 2. Blobs held mapped at once: one page each, side by side in the window after the loop blob's area.
  const heldBase = 16 * LOOP_BLOB_BYTES;
  let held = 0;
  let stoppedBy = `cap of ${CAP}`;
  const t0 = performance.now();
  for (; held < CAP; held++) {
    const id = 1000 + held;
    createHostBlob(id, HELD_BLOB_BYTES);
    const r = rig.send(mapBlob(id, heldBase + held * HELD_BLOB_BYTES));
    if (r.type !== P.RESP_OK_MAP_INFO) {
      stoppedBy = `map ${held + 1} answered 0x${r.type.toString(16)}`;
      break;
    }
  }
  const heldMs = performance.now() - t0;
  const stats = rig.dev.gpuStats();
  if (stats.mapped.count !== held || rig.mapper.live.size !== held) {
    throw new Error(`${held} maps answered OK but the device counts ${stats.mapped.count} mapped`);
  }
  // Every held mapping is live memory: write a byte through each and read it back.
  for (const [off, m] of rig.mapper.live) {
    const v = rig.mapper.view(off);
    v[0] = off & 0xff;
    if (v[0] !== (off & 0xff) || m.length < HELD_BLOB_BYTES) throw new Error(`mapping at ${off} is not usable`);
  }
  progress(NAME, `${held} blobs mapped at once (${stoppedBy}); created and mapped in ${heldMs.toFixed(0)} ms`);
  for (let i = 0; i < held; i++) rig.ok(unmapBlob(1000 + i));
  if (rig.mapper.live.size !== 0) throw new Error("mappings left after unmapping every blob");

  result(NAME, {
    map_unmap_per_s: Math.round(rate),
    max_mapped: held,
    cap: CAP,
    stopped_by: stoppedBy,
    mapper: "test",
    kvm_memslots: kvmMemslots(),
    blob_bytes: LOOP_BLOB_BYTES,
    bytes_copied: stats.totals.bytesCopied,
  });
} finally {
  rig.close();
}
Deno.exit(0);
