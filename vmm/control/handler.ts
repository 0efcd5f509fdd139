// What a running VM does for each control-socket request (vmm/control/protocol.ts).

import { BalloonDevice } from "../../devices/virtio/balloon.ts";
import { SoundDevice } from "../../devices/virtio/sound/device.ts";
import { BlockDevice } from "../../devices/virtio/block/device.ts";
import * as balloon from "../../devices/virtio/balloon.ts";
import {
  type BalloonStatName,
  type BalloonStatsReply,
  type ControlHandler,
  DEFAULT_DPI,
  DEFAULT_REFRESH_RATE,
  type DisplayListReply,
  type GpuControlReply,
} from "./protocol.ts";
import type { Machine } from "../machine.ts";
import { gpuStats, screenshotTo } from "../library/gpu_front.ts";
import { VIRTIO_GPU_MAX_SCANOUTS } from "../../devices/virtio/gpu/protocol.ts";

/** crosvm's stat names (vm_control BalloonStats) for the virtio-balloon tags (linux/virtio_balloon.h). */
const STAT_TAGS: [number, BalloonStatName][] = [
  [balloon.VIRTIO_BALLOON_S_SWAP_IN, "swap_in"],
  [balloon.VIRTIO_BALLOON_S_SWAP_OUT, "swap_out"],
  [balloon.VIRTIO_BALLOON_S_MAJFLT, "major_faults"],
  [balloon.VIRTIO_BALLOON_S_MINFLT, "minor_faults"],
  [balloon.VIRTIO_BALLOON_S_MEMFREE, "free_memory"],
  [balloon.VIRTIO_BALLOON_S_MEMTOT, "total_memory"],
  [balloon.VIRTIO_BALLOON_S_AVAIL, "available_memory"],
  [balloon.VIRTIO_BALLOON_S_CACHES, "disk_caches"],
  [balloon.VIRTIO_BALLOON_S_HTLB_PGALLOC, "hugetlb_allocations"],
  [balloon.VIRTIO_BALLOON_S_HTLB_PGFAIL, "hugetlb_failures"],
];
/** The balloon's page size (virtio spec 5.5.6: PFNs are 4 KiB pages). */
const BALLOON_PAGE_SIZE = 4096;
/** How long balloon_stats waits for the guest to answer before returning the last numbers. */
const STATS_WAIT_MS = 2000;

function balloonOf(m: Machine): BalloonDevice {
  const d = m.devices.virtio.find((v) => v.device instanceof BalloonDevice)?.device as BalloonDevice | undefined;
  if (!d) throw new Error("not available: this VM has no balloon device (--no-balloon)");
  return d;
}

/**
 * The reply to balloon_ws. denovm's balloon does not offer VIRTIO_BALLOON_F_WS_REPORTING (crosvm offers it only
 * with --balloon-ws-reporting), so no guest can have negotiated it. crosvm, asked then, queues the request for
 * a working-set queue that does not exist and never replies; denovm says so instead of leaving the client waiting.
 */
const NO_WORKING_SET =
  "not available: the balloon does not offer working-set reporting (VIRTIO_BALLOON_F_WS_REPORTING), " +
  "so the guest cannot have negotiated it";

/** Scanouts are fixed when the VM is built; the GPU has no hot-plug of displays. */
const FIXED_DISPLAYS = "the GPU's displays are fixed when the VM starts (run --gpu displays=[...])";

function gpuDisplays(m: Machine) {
  const gpu = m.config.gpu;
  if (!gpu) throw new Error("not available: this VM has no GPU (--gpu)");
  return gpu.displays;
}

/** crosvm's answer to a display id the GPU does not have. */
function noSuchDisplay(m: Machine, ids: number[]): GpuControlReply | undefined {
  const count = gpuDisplays(m).length;
  const missing = ids.find((id) => id >= count);
  return missing === undefined ? undefined : { NoSuchDisplay: { display_id: missing } };
}

/** crosvm's --encrypt: denovm writes its snapshot files in the clear. */
export const NO_ENCRYPTION = "encrypted snapshots are not supported (snapshot take --encrypt): denovm writes " +
  "the snapshot unencrypted";

/** What the handler needs of a machine to snapshot it. */
export type SnapshotTarget = Pick<Machine, "snapshot">;

/**
 * crosvm `snapshot take` (vm_control/src/lib.rs do_snapshot): crosvm does not ask for a suspended VM; it suspends
 * the vCPUs and devices that run (VcpuSuspendGuard, DeviceSleepGuard), writes the snapshot and puts back the
 * state it found. So a running VM runs on afterwards and a suspended one (suspend, suspend --full, run
 * --suspended) stays suspended.
 */
export async function snapshotMachine(
  m: SnapshotTarget,
  path: string,
  compressMemory: boolean,
  encrypt: boolean,
): Promise<void> {
  if (encrypt) throw new Error(NO_ENCRYPTION);
  // Machine.snapshot with resume puts back exactly the state it found (vCPUs paused or not, devices asleep or not).
  await m.snapshot(path, { resume: true, compressMemory });
}

export function machineControlHandler(m: Machine): ControlHandler {
  return {
    stop: async () => void await m.stop(),
    suspend: (full) => full ? m.suspendDevices() : m.pause(),
    resume: (full) => {
      if (full) return Promise.resolve(m.resumeDevices());
      // crosvm refuses ResumeVcpus while the devices sleep: the vCPUs would run against stopped devices.
      if (m.devicesAsleep) {
        return Promise.reject(new Error("the devices are suspended (suspend --full): resume them with resume --full"));
      }
      return Promise.resolve(m.resume());
    },
    powerButton: () => Promise.resolve(m.powerButton()),
    sleepButton: () => Promise.resolve(m.sleepButton()),
    balloonAdjust: async (bytes, wait) => {
      const b = balloonOf(m);
      b.setTarget(bytes);
      if (wait) await b.targetReached();
    },
    balloonWorkingSet: () => {
      balloonOf(m);
      return Promise.reject(new Error(NO_WORKING_SET));
    },
    balloonStats: async (): Promise<BalloonStatsReply> => {
      const b = balloonOf(m);
      let timer: ReturnType<typeof setTimeout> | undefined;
      await Promise.race([b.requestStats(), new Promise((r) => timer = setTimeout(r, STATS_WAIT_MS))]);
      clearTimeout(timer);
      const values = b.guestStats()?.values;
      const stats: BalloonStatsReply["stats"] = {};
      for (const [tag, name] of STAT_TAGS) {
        const v = values?.get(tag);
        stats[name] = v === undefined ? null : Number(v);
      }
      return { stats, balloon_actual: b.actualPages * BALLOON_PAGE_SIZE };
    },
    diskResize: (index, bytes) => {
      const disks = m.devices.virtio.map((v) => v.device).filter((d): d is BlockDevice => d instanceof BlockDevice);
      const disk = disks[index];
      if (!disk) return Promise.reject(new Error(`no disk ${index} (this VM has ${disks.length})`));
      return Promise.resolve(disk.resize(bytes));
    },
    gpuListDisplays: async (): Promise<DisplayListReply> => {
      const displays: DisplayListReply["displays"] = {};
      gpuDisplays(m).forEach((d, i) => {
        displays[String(i)] = {
          mode: { windowed: [d.width, d.height] },
          hidden: d.hidden ?? false,
          "refresh-rate": d.refreshRate ?? DEFAULT_REFRESH_RATE,
          dpi: [DEFAULT_DPI, DEFAULT_DPI],
        };
      });
      return await Promise.resolve({ displays });
    },
    gpuAddDisplays: async (displays): Promise<GpuControlReply> => {
      const requested = gpuDisplays(m).length + displays.length;
      if (requested > VIRTIO_GPU_MAX_SCANOUTS) {
        return { TooManyDisplays: { allowed: VIRTIO_GPU_MAX_SCANOUTS, requested } };
      }
      return await Promise.resolve({ ErrString: `cannot add displays: ${FIXED_DISPLAYS}` });
    },
    gpuRemoveDisplays: async (ids): Promise<GpuControlReply> => {
      return await Promise.resolve(noSuchDisplay(m, ids) ?? { ErrString: `cannot remove displays: ${FIXED_DISPLAYS}` });
    },
    // crosvm's only Linux mouse mode, touchscreen, makes its display window send the pointer as multi-touch
    // events. denovm opens no display window (its web display forwards input as it always does), so the
    // mode is accepted for an existing display and changes nothing.
    gpuSetMouseMode: async (id): Promise<GpuControlReply> => {
      return await Promise.resolve(noSuchDisplay(m, [id]) ?? "DisplayMouseModeSet");
    },
    gpuStats: () => Promise.resolve(gpuStats(m)),
    screenshot: (path) => screenshotTo(m, path),
    snapshot: (path, { compressMemory, encrypt }) => snapshotMachine(m, path, compressMemory, encrypt),
    sndMuteAll: (muted) => {
      const sounds = m.devices.virtio.map((v) => v.device).filter((d): d is SoundDevice => d instanceof SoundDevice);
      if (sounds.length === 0) {
        return Promise.reject(new Error("not available: this VM has no sound device (--virtio-snd)"));
      }
      for (const d of sounds) d.setMuted(muted);
      return Promise.resolve();
    },
  };
}
