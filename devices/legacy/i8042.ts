// Just enough of the i8042 keyboard controller for a guest to reset the machine
// (Linux reboot=k writes command 0xFE to port 0x64) and to find a controller that
// answers. Commands from the IBM PC/AT technical reference as Linux's
// drivers/input/serio/i8042.h names them.

import type { BusDevice } from "../../core/bus.ts";
import { type DeviceState, stateData, StateError, type Stateful, stateInteger, stateRecord } from "../../core/state.ts";

const I8042_CMD_CTL_RCTR = 0x20; // read the command byte
const I8042_CMD_CTL_WCTR = 0x60; // write the command byte
const I8042_CMD_AUX_DISABLE = 0xa7;
const I8042_CMD_AUX_ENABLE = 0xa8;
const I8042_CMD_CTL_TEST = 0xaa; // controller self-test → 0x55
const I8042_CMD_KBD_TEST = 0xab; // keyboard interface test → 0x00
const I8042_CMD_KBD_DISABLE = 0xad;
const I8042_CMD_KBD_ENABLE = 0xae;
const I8042_CMD_WRITE_OUTPUT_PORT = 0xd1;
const I8042_CMD_PULSE_RESET = 0xfe;
const I8042_SELF_TEST_OK = 0x55;
const I8042_STR_OBF = 0x01; // output buffer full
const I8042_STR_SYSFLAG = 0x04; // system flag: self-test passed
/** Output port bit 0 low resets the CPU. */
const OUTPUT_PORT_RESET_BIT = 0x01;
/** Keyboard answer to any command: 0xFE resend (no keyboard attached). */
const KBD_RESEND = 0xfe;
/** The commands whose parameter byte the controller waits for on the data port. */
const COMMANDS_WITH_PARAMETER = [I8042_CMD_CTL_WCTR, I8042_CMD_WRITE_OUTPUT_PORT];
const BYTE_MAX = 0xff;

/** The kind and layout version of the controller's saved state. */
export const I8042_STATE_TYPE = "i8042";
export const I8042_STATE_VERSION = 1;

export interface I8042Options {
  /** The data port (0x60 on a PC): the device is registered on the port bus from here. */
  dataPort: number;
  /** The command and status port (0x64 on a PC), above the data port. */
  commandPort: number;
  /** The guest pulsed the CPU reset line. */
  onReset: () => void;
}

export class I8042 implements BusDevice, Stateful {
  #ctr = 0;
  #out: number | undefined;
  #pending: number | undefined;
  readonly onReset: () => void;
  /** The command port's offset from the data port. */
  readonly #commandOffset: number;
  /** How many ports to register on the bus: from the data port to the command port. */
  readonly portSpan: number;

  constructor(opts: I8042Options) {
    if (opts.commandPort <= opts.dataPort) throw new RangeError("i8042: the command port must be above the data port");
    this.onReset = opts.onReset;
    this.#commandOffset = opts.commandPort - opts.dataPort;
    this.portSpan = this.#commandOffset + 1;
  }

  read(offset: number, data: Uint8Array): void {
    data.fill(0);
    if (offset === 0) {
      data[0] = this.#out ?? 0;
      this.#out = undefined;
    } else if (offset === this.#commandOffset) {
      data[0] = I8042_STR_SYSFLAG | (this.#out !== undefined ? I8042_STR_OBF : 0);
    }
  }

  write(offset: number, data: Uint8Array): void {
    const v = data[0];
    if (offset === this.#commandOffset) {
      switch (v) {
        case I8042_CMD_CTL_RCTR:
          this.#out = this.#ctr;
          break;
        case I8042_CMD_CTL_WCTR:
        case I8042_CMD_WRITE_OUTPUT_PORT:
          this.#pending = v;
          break;
        case I8042_CMD_CTL_TEST:
          this.#out = I8042_SELF_TEST_OK;
          break;
        case I8042_CMD_KBD_TEST:
          this.#out = 0;
          break;
        case I8042_CMD_PULSE_RESET:
          this.onReset();
          break;
        case I8042_CMD_AUX_DISABLE:
        case I8042_CMD_AUX_ENABLE:
        case I8042_CMD_KBD_DISABLE:
        case I8042_CMD_KBD_ENABLE:
          break;
      }
    } else if (offset === 0) {
      if (this.#pending === I8042_CMD_CTL_WCTR) this.#ctr = v;
      else if (this.#pending === I8042_CMD_WRITE_OUTPUT_PORT) {
        if (!(v & OUTPUT_PORT_RESET_BIT)) this.onReset();
      } else this.#out = KBD_RESEND;
      this.#pending = undefined;
    }
  }

  /** Every access completes at once. */
  quiescent(): boolean {
    return true;
  }

  /** The command byte, the output buffer (null when empty) and a command waiting for its parameter. */
  saveState(): DeviceState {
    return {
      type: I8042_STATE_TYPE,
      version: I8042_STATE_VERSION,
      data: { commandByte: this.#ctr, output: this.#out ?? null, pendingCommand: this.#pending ?? null },
    };
  }

  restoreState(state: DeviceState): void {
    const d = stateRecord(stateData(state, I8042_STATE_TYPE, I8042_STATE_VERSION), I8042_STATE_TYPE);
    const ctr = stateInteger(d.commandByte, `${I8042_STATE_TYPE} commandByte`, 0, BYTE_MAX);
    const out = d.output === null ? undefined : stateInteger(d.output, `${I8042_STATE_TYPE} output`, 0, BYTE_MAX);
    let pending: number | undefined;
    if (d.pendingCommand !== null) {
      pending = stateInteger(d.pendingCommand, `${I8042_STATE_TYPE} pendingCommand`, 0, BYTE_MAX);
      if (!COMMANDS_WITH_PARAMETER.includes(pending)) {
        throw new StateError(`${I8042_STATE_TYPE} pendingCommand: 0x${pending.toString(16)} takes no parameter`);
      }
    }
    this.#ctr = ctr;
    this.#out = out;
    this.#pending = pending;
  }
}
