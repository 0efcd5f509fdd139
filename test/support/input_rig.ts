// A virtio-input device on the virtio-mmio transport, driven by the test driver: the guest's event buffers
// posted and read back as events, and the configuration space's select/subsel answers.

import assert from "node:assert/strict";
import {
  INPUT_CFG_SELECT,
  INPUT_CFG_SIZE,
  INPUT_CFG_SUBSEL,
  INPUT_CFG_UNION,
  INPUT_CONFIG_SIZE,
  INPUT_EVENT_SIZE,
  InputDevice,
  type InputDeviceKind,
  type InputEvent,
  type InputOptions,
} from "../../devices/virtio/input/device.ts";
import { EV_KEY, EV_SYN, SYN_REPORT } from "../../devices/virtio/input/codes.ts";
import { VIRTIO_MMIO_CONFIG } from "../../devices/virtio/mmio.ts";
import { GuardedGuestMemory, type Submitted } from "./virtio_driver.ts";
import { captureVirtioLog, closeDeviceRig, mmioRig } from "./device_rig.ts";

const MiB = 1024 * 1024;

/**
 * An initialised driver on a `kind` input device over 4 MiB of guarded guest memory, with the virtio log
 * captured; disposing it restores the log, checks the canary and closes the device and the memory.
 */
export function inputRig(kind: InputDeviceKind, opts: Omit<InputOptions, "kind"> = {}) {
  const dev = new InputDevice({ kind, ...opts });
  const g = new GuardedGuestMemory([{ start: 0, size: 4 * MiB }]);
  const { t, drv, irqs } = mmioRig(dev, g.mem, 4 * MiB);
  drv.init();
  const log = captureVirtioLog();
  const posted: Submitted[] = [];
  return {
    dev,
    drv,
    g,
    irqs,
    lines: log.lines,
    /** Post up to `n` event buffers (one event each, as Linux does; no more than the ring has room for) and kick. */
    post(n: number, size = INPUT_EVENT_SIZE): number {
      const room = Math.max(0, dev.queueMaxSizes[0] - posted.length);
      const count = Math.min(n, room);
      for (let i = 0; i < count; i++) posted.push(drv.queues[0].submit([size]));
      drv.kick(0);
      return count;
    },
    /** Events the device delivered since the last call, in order. */
    events(): InputEvent[] {
      const out: InputEvent[] = [];
      for (const u of drv.queues[0].used()) {
        const i = posted.findIndex((p) => p.head === u.id);
        const sub = posted.splice(i, 1)[0];
        assert.equal(u.len, INPUT_EVENT_SIZE);
        const v = new DataView(g.mem.read(sub.buffers[0].addr, INPUT_EVENT_SIZE).buffer);
        out.push({ type: v.getUint16(0, true), code: v.getUint16(2, true), value: v.getInt32(4, true) });
      }
      return out;
    },
    /** Select/subsel, then the size and the union's answer. */
    cfg(select: number, subsel: number): Uint8Array {
      t.write(VIRTIO_MMIO_CONFIG + INPUT_CFG_SELECT, Uint8Array.of(select));
      t.write(VIRTIO_MMIO_CONFIG + INPUT_CFG_SUBSEL, Uint8Array.of(subsel));
      const all = drv.readConfig(0, INPUT_CONFIG_SIZE);
      return all.slice(INPUT_CFG_UNION, INPUT_CFG_UNION + all[INPUT_CFG_SIZE]);
    },
    [Symbol.dispose]() {
      closeDeviceRig(log, g, dev);
    },
  };
}

/** The EV_SYN/SYN_REPORT that ends a batch. */
export const syn: InputEvent = { type: EV_SYN, code: SYN_REPORT, value: 0 };
/** A key or button event (value 1 pressed, 0 released). */
export const key = (code: number, value: number): InputEvent => ({ type: EV_KEY, code, value });
