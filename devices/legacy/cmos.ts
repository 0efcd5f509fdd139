// CMOS RTC (MC146818) at ports 0x70/0x71 with the host's time, so Linux reads the
// wall clock at boot instead of waiting on a dead RTC. Register indices from
// Linux include/linux/mc146818rtc.h.

import type { BusDevice } from "../../core/bus.ts";
import { type DeviceState, stateBytes, stateData, type Stateful, stateInteger, stateRecord } from "../../core/state.ts";

const RTC_SECONDS = 0x00;
const RTC_MINUTES = 0x02;
const RTC_HOURS = 0x04;
const RTC_DAY_OF_WEEK = 0x06;
const RTC_DAY_OF_MONTH = 0x07;
const RTC_MONTH = 0x08;
const RTC_YEAR = 0x09;
const RTC_REG_A = 0x0a;
const RTC_REG_B = 0x0b;
const RTC_REG_C = 0x0c;
const RTC_REG_D = 0x0d;
/** Century byte as ACPI's FADT CENTURY field and Linux use it. */
const RTC_CENTURY = 0x32;
/** Register A: 32.768 kHz time base, 1024 Hz rate; UIP (bit 7) never set. */
const RTC_REG_A_VALUE = 0x26;
/** Register B: 24-hour mode (bit 1), BCD (bit 2 DM clear). */
const RTC_24H = 0x02;
/** Register D: valid RAM and time (VRT, bit 7). */
const RTC_VRT = 0x80;
/** The index register's bit 7 disables NMI; the index is the low 7 bits. */
const CMOS_INDEX_MASK = 0x7f;
const CMOS_SIZE = 128;

const bcd = (n: number) => ((Math.floor(n / 10) % 10) << 4) | (n % 10);

/** Two ports: index at offset 0, data at offset 1. */
export const CMOS_PORT_SPAN = 2;

/** The kind and layout version of the CMOS's saved state. */
export const CMOS_STATE_TYPE = "cmos";
export const CMOS_STATE_VERSION = 1;

export class Cmos implements BusDevice, Stateful {
  #index = 0;
  readonly #ram = new Uint8Array(CMOS_SIZE);

  constructor(readonly now: () => Date = () => new Date()) {
    this.#ram[RTC_REG_B] = RTC_24H;
  }

  read(offset: number, data: Uint8Array): void {
    data.fill(0);
    if (offset === 0) {
      data[0] = this.#index;
      return;
    }
    const t = this.now();
    switch (this.#index) {
      case RTC_SECONDS:
        data[0] = bcd(t.getUTCSeconds());
        break;
      case RTC_MINUTES:
        data[0] = bcd(t.getUTCMinutes());
        break;
      case RTC_HOURS:
        data[0] = bcd(t.getUTCHours());
        break;
      case RTC_DAY_OF_WEEK:
        data[0] = bcd(t.getUTCDay() + 1);
        break;
      case RTC_DAY_OF_MONTH:
        data[0] = bcd(t.getUTCDate());
        break;
      case RTC_MONTH:
        data[0] = bcd(t.getUTCMonth() + 1);
        break;
      case RTC_YEAR:
        data[0] = bcd(t.getUTCFullYear() % 100);
        break;
      case RTC_CENTURY:
        data[0] = bcd(Math.floor(t.getUTCFullYear() / 100));
        break;
      case RTC_REG_A:
        data[0] = RTC_REG_A_VALUE;
        break;
      case RTC_REG_C:
        data[0] = 0;
        break;
      case RTC_REG_D:
        data[0] = RTC_VRT;
        break;
      default:
        data[0] = this.#ram[this.#index];
    }
  }

  write(offset: number, data: Uint8Array): void {
    if (offset === 0) this.#index = data[0] & CMOS_INDEX_MASK;
    else if (this.#index === RTC_REG_B) this.#ram[RTC_REG_B] = data[0];
    else if (this.#index > RTC_REG_D) this.#ram[this.#index] = data[0]; // plain CMOS RAM; the clock is the host's
  }

  /** Every access completes at once. */
  quiescent(): boolean {
    return true;
  }

  /** The selected index and the RAM (register B and the bytes the guest stored); the clock is the host's. */
  saveState(): DeviceState {
    return { type: CMOS_STATE_TYPE, version: CMOS_STATE_VERSION, data: { index: this.#index, ram: this.#ram.slice() } };
  }

  restoreState(state: DeviceState): void {
    const d = stateRecord(stateData(state, CMOS_STATE_TYPE, CMOS_STATE_VERSION), CMOS_STATE_TYPE);
    const index = stateInteger(d.index, `${CMOS_STATE_TYPE} index`, 0, CMOS_INDEX_MASK);
    const ram = stateBytes(d.ram, `${CMOS_STATE_TYPE} ram`, CMOS_SIZE);
    this.#index = index;
    this.#ram.set(ram);
  }
}
