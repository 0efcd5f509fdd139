// The hardware-reduced ACPI registers the FADT points at: sleep control (S5 =
// power off), sleep status, and the reset register. ACPI 6.4 sections 4.8.3.7
// (sleep control/status registers) and 4.8.3.6 (reset register).

import type { BusDevice } from "../../core/bus.ts";
import { type DeviceState, stateData, type Stateful, stateRecord } from "../../core/state.ts";
import {
  ACPI_RESET_PORT,
  ACPI_RESET_VALUE,
  ACPI_SLEEP_CONTROL_PORT,
  ACPI_SLEEP_TYPE_S5,
  ACPI_SLP_EN,
  ACPI_SLP_TYP_MASK,
  ACPI_SLP_TYP_SHIFT,
} from "../../vmm/arch/layout.ts";

/** Ports from the sleep control register to the reset register. */
export const ACPI_PM_PORT_SPAN = ACPI_RESET_PORT - ACPI_SLEEP_CONTROL_PORT + 1;
const RESET_OFFSET = ACPI_RESET_PORT - ACPI_SLEEP_CONTROL_PORT;
const CONTROL_OFFSET = 0;

/** The kind and layout version of the ACPI PM registers' saved state. */
export const ACPI_PM_STATE_TYPE = "acpi-pm";
export const ACPI_PM_STATE_VERSION = 1;

export class AcpiPm implements BusDevice, Stateful {
  constructor(readonly on: { powerOff: () => void; reset: () => void; log?: (line: string) => void }) {}

  read(_offset: number, data: Uint8Array): void {
    data.fill(0);
  }

  write(offset: number, data: Uint8Array): void {
    const v = data[0];
    if (offset === CONTROL_OFFSET && (v & ACPI_SLP_EN)) {
      const type = (v >> ACPI_SLP_TYP_SHIFT) & ACPI_SLP_TYP_MASK;
      if (type === ACPI_SLEEP_TYPE_S5) this.on.powerOff();
      else this.on.log?.(`guest asked for ACPI sleep type ${type}, which denovm does not offer; ignored`);
    } else if (offset === RESET_OFFSET && v === ACPI_RESET_VALUE) {
      this.on.reset();
    }
  }

  /** Every access completes at once. */
  quiescent(): boolean {
    return true;
  }

  /**
   * An empty record: the registers keep nothing between accesses (the status register reads 0, a sleep or
   * reset request acts at once), so there is no enable or status bit to save.
   */
  saveState(): DeviceState {
    return { type: ACPI_PM_STATE_TYPE, version: ACPI_PM_STATE_VERSION, data: {} };
  }

  restoreState(state: DeviceState): void {
    stateRecord(stateData(state, ACPI_PM_STATE_TYPE, ACPI_PM_STATE_VERSION), ACPI_PM_STATE_TYPE);
  }
}
