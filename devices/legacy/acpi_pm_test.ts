// The hardware-reduced ACPI sleep control and reset registers as Linux's ACPI code writes them, and their
// (empty) saved state: it round-trips, the device behaves the same after it, other records are refused.

import assert from "node:assert/strict";
import { ACPI_PM_STATE_TYPE, ACPI_PM_STATE_VERSION, ACPI_SLP_EN, ACPI_SLP_TYP_SHIFT, AcpiPm } from "./acpi_pm.ts";
import { StateError } from "../../core/state.ts";
import { roundTrip, wr } from "../../test/support/port_io.ts";

// The registers as denovm's FADT places them: the S5 sleep type is the value its DSDT gives in the \_S5
// package; the reset register (FADT RESET_REG, value RESET_VALUE) sits two ports after the sleep control
// register, past the sleep status register.
const ACPI_SLEEP_CONTROL_PORT = 0x604;
const ACPI_SLEEP_TYPE_S5 = 5;
const ACPI_RESET_OFFSET = 2;
const ACPI_RESET_VALUE = 0x1;
const REGISTERS = {
  sleepControlPort: ACPI_SLEEP_CONTROL_PORT,
  resetPort: ACPI_SLEEP_CONTROL_PORT + ACPI_RESET_OFFSET,
  resetValue: ACPI_RESET_VALUE,
  s5SleepType: ACPI_SLEEP_TYPE_S5,
};

Deno.test("ACPI PM: S5 with SLP_EN powers off, other sleep types do not, the reset register resets", () => {
  const events: string[] = [];
  const pm = new AcpiPm(REGISTERS, {
    powerOff: () => events.push("off"),
    reset: () => events.push("reset"),
    log: () => {},
  });
  assert.equal(pm.portSpan, ACPI_RESET_OFFSET + 1);
  wr(pm, 0, ACPI_SLEEP_TYPE_S5 << ACPI_SLP_TYP_SHIFT); // no SLP_EN: nothing
  wr(pm, 0, (3 << ACPI_SLP_TYP_SHIFT) | ACPI_SLP_EN); // S3: not offered
  assert.deepEqual(events, []);
  wr(pm, 0, (ACPI_SLEEP_TYPE_S5 << ACPI_SLP_TYP_SHIFT) | ACPI_SLP_EN);
  assert.deepEqual(events, ["off"]);
  wr(pm, ACPI_RESET_OFFSET, 0x7); // wrong value
  wr(pm, ACPI_RESET_OFFSET, ACPI_RESET_VALUE);
  assert.deepEqual(events, ["off", "reset"]);
});

Deno.test("ACPI PM state: an empty record round-trips and the registers act the same after it", () => {
  const events: string[] = [];
  const saved = new AcpiPm(REGISTERS, { powerOff: () => {}, reset: () => {} }).saveState();
  assert.deepEqual(saved, { type: ACPI_PM_STATE_TYPE, version: ACPI_PM_STATE_VERSION, data: {} });
  const pm = new AcpiPm(REGISTERS, { powerOff: () => events.push("off"), reset: () => events.push("reset") });
  pm.restoreState(roundTrip(saved));
  assert.equal(pm.quiescent(), true);
  wr(pm, 0, (ACPI_SLEEP_TYPE_S5 << ACPI_SLP_TYP_SHIFT) | ACPI_SLP_EN);
  wr(pm, ACPI_RESET_OFFSET, ACPI_RESET_VALUE);
  assert.deepEqual(events, ["off", "reset"]);
  for (
    const bad of [
      { ...saved, type: "pvpanic" },
      { ...saved, version: ACPI_PM_STATE_VERSION + 1 },
      { ...saved, data: [] },
      { ...saved, data: null },
    ]
  ) {
    assert.throws(() => pm.restoreState(bad), StateError);
  }
});

Deno.test("ACPI PM: the registers read as zero (SLP_EN and the reset value are write-only); a bad layout is refused", () => {
  const events: string[] = [];
  const pm = new AcpiPm(REGISTERS, { powerOff: () => events.push("off"), reset: () => events.push("reset") });
  for (let offset = 0; offset < pm.portSpan; offset++) {
    const data = new Uint8Array(2).fill(0xff);
    pm.read(offset, data);
    assert.deepEqual([...data], [0, 0], `offset ${offset}`);
  }
  assert.deepEqual(events, [], "reading does nothing");
  // A sleep type other than S5 with no log sink is still ignored, not a crash.
  pm.write(0, Uint8Array.of(ACPI_SLP_EN | (3 << ACPI_SLP_TYP_SHIFT)));
  assert.deepEqual(events, []);
  assert.throws(
    () => new AcpiPm({ ...REGISTERS, resetPort: ACPI_SLEEP_CONTROL_PORT }, { powerOff() {}, reset() {} }),
    { name: "RangeError", message: /reset register must be above the sleep control register/ },
  );
});
