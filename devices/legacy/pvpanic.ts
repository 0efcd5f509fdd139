// pvpanic: the guest writes here when it panics (QEMU docs/specs/pvpanic.rst;
// Linux drivers/misc/pvpanic). crosvm exits 34 on a guest panic.

import type { BusDevice } from "../../core/bus.ts";
import { type DeviceState, stateData, type Stateful, stateRecord } from "../../core/state.ts";

/** Event bits (pvpanic.rst; Linux include/uapi/misc/pvpanic.h). */
const PVPANIC_PANICKED = 1 << 0;
const PVPANIC_CRASH_LOADED = 1 << 1;

/** The kind and layout version of the pvpanic device's saved state. */
export const PVPANIC_STATE_TYPE = "pvpanic";
export const PVPANIC_STATE_VERSION = 1;

export class PvPanic implements BusDevice, Stateful {
  constructor(readonly onPanic: () => void, readonly log?: (line: string) => void) {}

  read(_offset: number, data: Uint8Array): void {
    data.fill(0);
    data[0] = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED; // the events this device understands
  }

  write(_offset: number, data: Uint8Array): void {
    if (data[0] & PVPANIC_PANICKED) this.onPanic();
    else if (data[0] & PVPANIC_CRASH_LOADED) this.log?.("guest reports a crash kernel loaded after a panic");
  }

  /** Every access completes at once. */
  quiescent(): boolean {
    return true;
  }

  /** An empty record: the device keeps nothing (a write reports its event at once). */
  saveState(): DeviceState {
    return { type: PVPANIC_STATE_TYPE, version: PVPANIC_STATE_VERSION, data: {} };
  }

  restoreState(state: DeviceState): void {
    stateRecord(stateData(state, PVPANIC_STATE_TYPE, PVPANIC_STATE_VERSION), PVPANIC_STATE_TYPE);
  }
}
