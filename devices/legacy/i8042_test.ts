// The i8042 as a guest uses it to reset the machine (self-test, command byte, pulse reset, output port), and
// its saved state: command byte, output buffer and a command awaiting its parameter survive a round trip.

import assert from "node:assert/strict";
import { I8042, I8042_STATE_TYPE, I8042_STATE_VERSION } from "./i8042.ts";
import { StateError } from "../../core/state.ts";
import { rd, roundTrip, withData, wr } from "../../test/support/port_io.ts";

/** The PC's keyboard controller ports (data 0x60, command/status 0x64). */
const PC_PORTS = { dataPort: 0x60, commandPort: 0x64 };
const kbc = (onReset: () => void): I8042 => new I8042({ ...PC_PORTS, onReset });

Deno.test("i8042: self-test answers 0x55, command byte round-trips, 0xFE resets", () => {
  let resets = 0;
  const k = kbc(() => resets++);
  assert.equal(k.portSpan, 5, "ports 0x60..0x64");
  wr(k, 4, 0xaa);
  assert.equal(rd(k, 4) & 1, 1, "output buffer full");
  assert.equal(rd(k, 0), 0x55);
  assert.equal(rd(k, 4) & 1, 0);
  wr(k, 4, 0x60);
  wr(k, 0, 0x47);
  wr(k, 4, 0x20);
  assert.equal(rd(k, 0), 0x47);
  assert.equal(resets, 0);
  wr(k, 4, 0xfe);
  assert.equal(resets, 1);
  wr(k, 4, 0xd1); // write output port with the reset line low
  wr(k, 0, 0xfe);
  assert.equal(resets, 2);
});

/** Offsets in the controller's port range (data 0x60, command/status 0x64) and the commands used. */
const DATA = 0, COMMAND = 4;
const CMD_READ_CTR = 0x20, CMD_WRITE_CTR = 0x60, CMD_SELF_TEST = 0xaa, CMD_WRITE_OUTPUT_PORT = 0xd1;
const STR_OBF = 0x01, SELF_TEST_OK = 0x55;

Deno.test("i8042 state: command byte and a full output buffer survive a round trip", () => {
  const k = kbc(() => {});
  wr(k, COMMAND, CMD_WRITE_CTR);
  wr(k, DATA, 0x65);
  wr(k, COMMAND, CMD_SELF_TEST); // leaves 0x55 in the output buffer
  const saved = k.saveState();
  assert.equal(saved.type, I8042_STATE_TYPE);
  assert.equal(saved.version, I8042_STATE_VERSION);
  const t = kbc(() => {});
  t.restoreState(roundTrip(saved));
  assert.deepEqual(t.saveState(), saved);
  assert.equal(rd(t, COMMAND) & STR_OBF, STR_OBF, "output buffer still full");
  assert.equal(rd(t, DATA), SELF_TEST_OK);
  assert.equal(rd(t, COMMAND) & STR_OBF, 0);
  wr(t, COMMAND, CMD_READ_CTR);
  assert.equal(rd(t, DATA), 0x65, "the command byte");
});

Deno.test("i8042 state: a command waiting for its parameter completes after the restore", () => {
  const k = kbc(() => {});
  wr(k, COMMAND, CMD_WRITE_OUTPUT_PORT);
  let resets = 0;
  const t = kbc(() => resets++);
  t.restoreState(roundTrip(k.saveState()));
  wr(t, DATA, 0xfe); // the output port with the reset line low
  assert.equal(resets, 1);
  const w = kbc(() => {});
  wr(w, COMMAND, CMD_WRITE_CTR);
  const u = kbc(() => {});
  u.restoreState(roundTrip(w.saveState()));
  wr(u, DATA, 0x47);
  wr(u, COMMAND, CMD_READ_CTR);
  assert.equal(rd(u, DATA), 0x47);
});

Deno.test("i8042 state: malformed records are refused and leave the controller as it was", () => {
  const k = kbc(() => {});
  wr(k, COMMAND, CMD_WRITE_CTR);
  wr(k, DATA, 0x11);
  const before = k.saveState();
  const good = kbc(() => {}).saveState();
  const bad: [string, ReturnType<I8042["saveState"]>][] = [
    ["another kind", { ...good, type: "cmos" }],
    ["another version", { ...good, version: I8042_STATE_VERSION + 1 }],
    ["command byte above a byte", withData(good, { commandByte: 0x100 })],
    ["missing command byte", withData(good, { commandByte: undefined })],
    ["output not a byte", withData(good, { output: -1 })],
    ["output missing (null means empty)", withData(good, { output: undefined })],
    ["a pending command that takes no parameter", withData(good, { pendingCommand: CMD_SELF_TEST })],
    ["pending command not a number", withData(good, { pendingCommand: "0x60" })],
  ];
  for (const [what, state] of bad) {
    assert.throws(() => k.restoreState(roundTrip(state)), StateError, what);
    assert.deepEqual(k.saveState(), before, `${what}: nothing changed`);
  }
  assert.equal(k.quiescent(), true);
});
