// Scaffolding the virtio device tests share: a device on the virtio-mmio transport over guest memory,
// driven by the test driver (test/support/virtio_driver.ts) with its interrupts counted, and the virtio
// log lines captured so a test can assert on them.

import assert from "node:assert/strict";
import { VirtioMmioTransport } from "../../devices/virtio/mmio.ts";
import type { VirtioDevice } from "../../devices/virtio/device.ts";
import { guestLog } from "../../core/log.ts";
import type { GuestMemory } from "../../core/memory.ts";
import {
  decodeState,
  type DeviceState,
  encodeState,
  StateError,
  type Stateful,
  type StateValue,
} from "../../core/state.ts";
import type { GuardedGuestMemory } from "./virtio_driver.ts";
import { VirtioTestDriver } from "./virtio_driver.ts";

/** Where the test driver's arena starts: the first page stays unused, as guest page 0 usually is. */
export const DRIVER_ARENA_START = 0x1000;

export interface MmioRig {
  t: VirtioMmioTransport;
  drv: VirtioTestDriver;
  /** Interrupts the transport raised. */
  irqs: { n: number };
}

/**
 * `dev` on a virtio-mmio transport over `mem` (interrupts counted in `irqs`), with a test driver whose
 * rings and buffers go from DRIVER_ARENA_START to `arenaEnd`. The driver is not initialised yet.
 */
export function mmioRig(dev: VirtioDevice, mem: GuestMemory, arenaEnd: number): MmioRig {
  const irqs = { n: 0 };
  const t = new VirtioMmioTransport(dev, mem, { irq: { trigger: () => irqs.n++ } });
  const drv = new VirtioTestDriver(t, mem, { start: DRIVER_ARENA_START, end: arenaEnd });
  return { t, drv, irqs };
}

/**
 * `dev` on a fresh transport over the same guest memory, driven by `from`'s driver (its rings and
 * buffers carry over, as a restored guest's would). Restore the device's and the transport's state next.
 */
export function reattachRig(from: MmioRig, dev: VirtioDevice, mem: GuestMemory): MmioRig {
  const irqs = { n: 0 };
  const t = new VirtioMmioTransport(dev, mem, { irq: { trigger: () => irqs.n++ } });
  return { t, drv: from.drv.attach(t), irqs };
}

/** A state as a snapshot file would carry it: encoded and decoded again. */
export function roundTrip(state: DeviceState): DeviceState {
  return decodeState(encodeState(state));
}

/**
 * Save `from`'s transport and its device `fromDev`, restore both into `dev` on a fresh transport over the same
 * memory (device first, then the transport, which activates it), through encodeState/decodeState.
 */
export function saveAndRestore(
  from: MmioRig,
  fromDev: Stateful,
  dev: VirtioDevice & Stateful,
  mem: GuestMemory,
): MmioRig {
  const devState = roundTrip(fromDev.saveState());
  const tState = roundTrip(from.t.saveState());
  const to = reattachRig(from, dev, mem);
  dev.restoreState(devState);
  to.t.restoreState(tState);
  return to;
}

/**
 * Every state in `bad`, and `good` with another type, the next version or data that is no record, is
 * refused with StateError by a fresh device from `make`; `good` itself is taken. Each device is closed.
 */
export function assertRefused(
  make: () => Stateful & { close?(): void },
  good: DeviceState,
  bad: [string, DeviceState][],
): void {
  const all: [string, DeviceState][] = [
    ["type", { ...good, type: "virtio-other" }],
    ["version", { ...good, version: good.version + 1 }],
    ["data", { ...good, data: [] }],
    ...bad,
  ];
  for (const [what, st] of all) {
    const d = make();
    try {
      assert.throws(() => d.restoreState(st), StateError, what);
    } finally {
      d.close?.();
    }
  }
  const d = make();
  d.restoreState(good);
  d.close?.();
}

/** `good` with the fields of `patch` put into its data record. */
export function withData(good: DeviceState, patch: Record<string, StateValue>): DeviceState {
  return { ...good, data: { ...(good.data as Record<string, StateValue>), ...patch } };
}

export interface CapturedLog {
  /** Lines logged since the capture began. */
  lines: string[];
  /** Give the log its previous sink back. */
  restore(): void;
}

/** Sends guestLog lines into `lines` (instead of its sink) until restore(). */
export function captureVirtioLog(): CapturedLog {
  const lines: string[] = [];
  const old = guestLog.sink;
  guestLog.sink = (l) => lines.push(l);
  return { lines, restore: () => guestLog.sink = old };
}

/**
 * The end of a device test: the canary around guest memory checked (the device touched nothing outside the
 * guest), then the device and the memory closed.
 */
export function closeGuardedDevice(g: GuardedGuestMemory, dev: { close?(): void }): void {
  assert.ok(g.canaryIntact(), "no access outside guest memory");
  dev.close?.();
  g.close();
}

/** closeGuardedDevice after giving the log its sink back. */
export function closeDeviceRig(log: CapturedLog, g: GuardedGuestMemory, dev: { close?(): void }): void {
  log.restore();
  closeGuardedDevice(g, dev);
}
