// pvpanic as Linux's driver uses it (the advertised events, a PANICKED write), and its (empty) saved state.

import assert from "node:assert/strict";
import { PvPanic, PVPANIC_STATE_TYPE, PVPANIC_STATE_VERSION } from "./pvpanic.ts";
import { StateError } from "../../core/state.ts";
import { rd, roundTrip, wr } from "../../test/support/port_io.ts";

Deno.test("pvpanic: advertises its events, a PANICKED write reports the panic", () => {
  let panics = 0;
  const p = new PvPanic(() => panics++, () => {});
  assert.equal(rd(p, 0), 0x3);
  wr(p, 0, 0x2);
  assert.equal(panics, 0);
  wr(p, 0, 0x1);
  assert.equal(panics, 1);
});

Deno.test("pvpanic state: an empty record round-trips and the device reports panics after it", () => {
  const saved = new PvPanic(() => {}).saveState();
  assert.deepEqual(saved, { type: PVPANIC_STATE_TYPE, version: PVPANIC_STATE_VERSION, data: {} });
  let panics = 0;
  const p = new PvPanic(() => panics++);
  p.restoreState(roundTrip(saved));
  assert.equal(p.quiescent(), true);
  assert.equal(rd(p, 0), 0x3);
  wr(p, 0, 0x1);
  assert.equal(panics, 1);
  for (
    const bad of [{ ...saved, type: "acpi-pm" }, { ...saved, version: 0 }, { ...saved, data: "x" }]
  ) {
    assert.throws(() => p.restoreState(bad), StateError);
  }
});
