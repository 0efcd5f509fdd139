// What a running VM does for each control-socket request (vmm/control/protocol.ts).

import { BalloonDevice } from "../../devices/virtio/balloon.ts";
import { BlockDevice } from "../../devices/virtio/block/device.ts";
import * as balloon from "../../devices/virtio/balloon.ts";
import type { BalloonStatName, BalloonStatsReply, ControlHandler, DisplayListReply } from "./protocol.ts";
import type { Machine } from "../machine.ts";
import { gpuStats, screenshotTo } from "../library/gpu_front.ts";

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

export function machineControlHandler(m: Machine): ControlHandler {
  return {
    stop: async () => void await m.stop(),
    suspend: () => m.pause(),
    resume: () => Promise.resolve(m.resume()),
    powerButton: () => Promise.resolve(m.powerButton()),
    balloonAdjust: (bytes) => Promise.resolve(balloonOf(m).setTarget(bytes)),
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
    gpuListDisplays: (): Promise<DisplayListReply> => {
      const gpu = m.config.gpu;
      if (!gpu) return Promise.reject(new Error("not available: this VM has no GPU (--gpu)"));
      const displays: DisplayListReply["displays"] = {};
      gpu.displays.forEach((d, i) => {
        displays[String(i)] = {
          mode: { windowed: [d.width, d.height] },
          hidden: false,
          refresh_rate: 60,
          dpi: [320, 320],
        };
      });
      return Promise.resolve({ displays });
    },
    gpuStats: () => Promise.resolve(gpuStats(m)),
    screenshot: (path) => screenshotTo(m, path),
  };
}
