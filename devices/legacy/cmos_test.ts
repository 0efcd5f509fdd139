// The CMOS RTC as Linux reads it at boot (BCD time of the clock, 24-hour mode, no update in progress, RAM),
// and its saved state: index and RAM survive a round trip into a fresh CMOS; malformed records are refused.

import assert from "node:assert/strict";
import { Cmos, CMOS_STATE_TYPE, CMOS_STATE_VERSION } from "./cmos.ts";
import { StateError } from "../../core/state.ts";
import { rd, roundTrip, withData, wr } from "../../test/support/port_io.ts";

Deno.test("CMOS RTC: BCD time of the given clock, 24-hour mode, never update-in-progress", () => {
  const c = new Cmos(() => new Date(Date.UTC(2026, 10, 25, 21, 7, 59)));
  const reg = (i: number) => {
    wr(c, 0, i | 0x80); // NMI-disable bit is ignored in the index
    return rd(c, 1);
  };
  assert.equal(reg(0x00), 0x59);
  assert.equal(reg(0x02), 0x07);
  assert.equal(reg(0x04), 0x21);
  assert.equal(reg(0x07), 0x25);
  assert.equal(reg(0x08), 0x11);
  assert.equal(reg(0x09), 0x26);
  assert.equal(reg(0x32), 0x20);
  assert.equal(reg(0x0a) & 0x80, 0, "UIP clear");
  assert.equal(reg(0x0b) & 0x06, 0x02, "24h, BCD");
  assert.equal(reg(0x0d) & 0x80, 0x80, "valid RAM and time");
  wr(c, 0, 0x40);
  wr(c, 1, 0x5a);
  assert.equal(reg(0x40), 0x5a, "CMOS RAM");
});

/** MC146818 register indices (Linux include/linux/mc146818rtc.h) and the CMOS's 128 bytes. */
const RTC_SECONDS = 0x00, RTC_REG_B = 0x0b, CMOS_SIZE = 128;
const INDEX = 0, DATA = 1;
const clock = () => new Date(Date.UTC(2026, 10, 25, 21, 7, 59));

Deno.test("CMOS state: the selected index and the RAM survive a round trip; the clock stays the host's", () => {
  const c = new Cmos(clock);
  wr(c, INDEX, 0x40);
  wr(c, DATA, 0x5a);
  wr(c, INDEX, 0x7f);
  wr(c, DATA, 0xa5);
  wr(c, INDEX, RTC_REG_B);
  wr(c, DATA, 0x06); // binary mode, 24h
  wr(c, INDEX, 0x41); // left selected
  const saved = c.saveState();
  assert.equal(saved.type, CMOS_STATE_TYPE);
  assert.equal(saved.version, CMOS_STATE_VERSION);
  const t = new Cmos(() => new Date(Date.UTC(2027, 0, 1, 0, 0, 1)));
  t.restoreState(roundTrip(saved));
  assert.deepEqual(t.saveState(), saved);
  assert.equal(rd(t, INDEX), 0x41, "the guest's selected index");
  wr(t, DATA, 0x33); // the data port acts on the restored index
  const reg = (i: number) => {
    wr(t, INDEX, i);
    return rd(t, DATA);
  };
  assert.equal(reg(0x41), 0x33);
  assert.equal(reg(0x40), 0x5a);
  assert.equal(reg(0x7f), 0xa5);
  assert.equal(reg(RTC_REG_B), 0x06);
  assert.equal(reg(RTC_SECONDS), 0x01, "time comes from the new host clock, not the state");
});

Deno.test("CMOS state: malformed records are refused and leave the CMOS as it was", () => {
  const c = new Cmos(clock);
  wr(c, INDEX, 0x50);
  wr(c, DATA, 0x77);
  const before = c.saveState();
  const good = new Cmos(clock).saveState();
  const bad: [string, ReturnType<Cmos["saveState"]>][] = [
    ["another kind", { ...good, type: "i8042" }],
    ["another version", { ...good, version: CMOS_STATE_VERSION + 1 }],
    ["data not a record", { ...good, data: null }],
    ["index with the NMI bit", withData(good, { index: 0x80 })],
    ["fractional index", withData(good, { index: 1.5 })],
    ["RAM too short", withData(good, { ram: new Uint8Array(CMOS_SIZE - 1) })],
    ["RAM too long", withData(good, { ram: new Uint8Array(CMOS_SIZE + 1) })],
    ["RAM as a list", withData(good, { ram: new Array(CMOS_SIZE).fill(0) })],
  ];
  for (const [what, state] of bad) {
    assert.throws(() => c.restoreState(roundTrip(state)), StateError, what);
    assert.deepEqual(c.saveState(), before, `${what}: nothing changed`);
  }
  assert.equal(c.quiescent(), true);
});
