// The hardware-reduced ACPI registers the FADT points at: sleep control (S5 =
// power off), sleep status, and the reset register. ACPI 6.4 sections 4.8.3.7
// (sleep control/status registers) and 4.8.3.6 (reset register).

import type { BusDevice } from "../../core/bus.ts";
import { type DeviceState, stateData, type Stateful, stateRecord } from "../../core/state.ts";

/** SLP_TYPx: bits 2..4 of the sleep control register (ACPI 6.4 section 4.8.3.7). */
export const ACPI_SLP_TYP_SHIFT = 2;
export const ACPI_SLP_TYP_MASK = 0x7;
/** SLP_EN: bit 5 of the sleep control register. */
export const ACPI_SLP_EN = 1 << 5;

/** Where the registers are and the values the firmware tables declare for them. */
export interface AcpiPmRegisters {
  /** The sleep control register's port (FADT SLEEP_CONTROL_REG): the device is registered from here. */
  sleepControlPort: number;
  /** The reset register's port (FADT RESET_REG), above the sleep control register. */
  resetPort: number;
  /** The value whose write to the reset register resets (FADT RESET_VALUE). */
  resetValue: number;
  /** SLP_TYPx of S5 (soft off), as the DSDT's \_S5 package declares it. */
  s5SleepType: number;
}

/** The sleep control register is the first port. */
const CONTROL_OFFSET = 0;

/** The kind and layout version of the ACPI PM registers' saved state. */
export const ACPI_PM_STATE_TYPE = "acpi-pm";
export const ACPI_PM_STATE_VERSION = 1;

export class AcpiPm implements BusDevice, Stateful {
  /** How many ports to register on the bus: from the sleep control register to the reset register. */
  readonly portSpan: number;
  readonly #resetOffset: number;

  constructor(
    readonly registers: AcpiPmRegisters,
    readonly on: { powerOff: () => void; reset: () => void; log?: (line: string) => void },
  ) {
    if (registers.resetPort <= registers.sleepControlPort) {
      throw new RangeError("ACPI PM: the reset register must be above the sleep control register");
    }
    this.#resetOffset = registers.resetPort - registers.sleepControlPort;
    this.portSpan = this.#resetOffset + 1;
  }

  read(_offset: number, data: Uint8Array): void {
    data.fill(0);
  }

  write(offset: number, data: Uint8Array): void {
    const v = data[0];
    if (offset === CONTROL_OFFSET && (v & ACPI_SLP_EN)) {
      const type = (v >> ACPI_SLP_TYP_SHIFT) & ACPI_SLP_TYP_MASK;
      if (type === this.registers.s5SleepType) this.on.powerOff();
      else this.on.log?.(`guest asked for ACPI sleep type ${type}, which denovm does not offer; ignored`);
    } else if (offset === this.#resetOffset && v === this.registers.resetValue) {
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
