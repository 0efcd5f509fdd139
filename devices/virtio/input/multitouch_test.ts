// The multi-touch slot table (multitouch.ts): tracking ids, BTN_TOUCH on the first and last contact, free slots.

import assert from "node:assert/strict";
import { firstFreeSlot, MT_TRACKING_ID_MAX, MT_TRACKING_ID_NONE, MultiTouchSlots } from "./multitouch.ts";
import {
  ABS_MT_POSITION_X,
  ABS_MT_POSITION_Y,
  ABS_MT_SLOT,
  ABS_MT_TRACKING_ID,
  ABS_X,
  ABS_Y,
  BTN_TOUCH,
  EV_ABS,
  EV_KEY,
} from "./codes.ts";

const abs = (code: number, value: number) => ({ type: EV_ABS, code, value });
const touch = (value: number) => ({ type: EV_KEY, code: BTN_TOUCH, value });

Deno.test("multitouch: BTN_TOUCH with the first contact down and the last one up; ids count up", () => {
  const mt = new MultiTouchSlots(4);
  assert.deepEqual(mt.down(2, 10, 20), [
    abs(ABS_MT_SLOT, 2),
    abs(ABS_MT_TRACKING_ID, 0),
    abs(ABS_MT_POSITION_X, 10),
    abs(ABS_MT_POSITION_Y, 20),
    touch(1),
    abs(ABS_X, 10),
    abs(ABS_Y, 20),
  ]);
  assert.deepEqual(mt.down(0, 1, 2), [
    abs(ABS_MT_SLOT, 0),
    abs(ABS_MT_TRACKING_ID, 1),
    abs(ABS_MT_POSITION_X, 1),
    abs(ABS_MT_POSITION_Y, 2),
    abs(ABS_X, 1),
    abs(ABS_Y, 2),
  ]);
  assert.equal(mt.contacts, 2);
  // A slot already down keeps its tracking id.
  assert.equal(mt.down(2, 11, 21)[1].value, 0);
  assert.deepEqual(mt.move(0, 5, 6), [abs(ABS_MT_SLOT, 0), abs(ABS_MT_POSITION_X, 5), abs(ABS_MT_POSITION_Y, 6)]);
  assert.deepEqual(mt.up(2), [abs(ABS_MT_SLOT, 2), abs(ABS_MT_TRACKING_ID, MT_TRACKING_ID_NONE)]);
  assert.deepEqual(mt.up(2), [], "a slot that is not down has nothing to lift");
  assert.deepEqual(mt.up(0), [abs(ABS_MT_SLOT, 0), abs(ABS_MT_TRACKING_ID, MT_TRACKING_ID_NONE), touch(0)]);
  assert.deepEqual(mt.trackingIds, [
    MT_TRACKING_ID_NONE,
    MT_TRACKING_ID_NONE,
    MT_TRACKING_ID_NONE,
    MT_TRACKING_ID_NONE,
  ]);
  assert.equal(mt.nextTrackingId, 2);
});

Deno.test("multitouch: tracking ids wrap after MT_TRACKING_ID_MAX", () => {
  const mt = new MultiTouchSlots(1);
  mt.nextTrackingId = MT_TRACKING_ID_MAX;
  assert.equal(mt.down(0, 0, 0)[1].value, MT_TRACKING_ID_MAX);
  assert.equal(mt.nextTrackingId, 0);
});

Deno.test("multitouch: firstFreeSlot", () => {
  assert.equal(firstFreeSlot(new Set(), 3), 0);
  assert.equal(firstFreeSlot(new Set([0, 2]), 3), 1);
  assert.equal(firstFreeSlot(new Set([0, 1, 2]), 3), undefined);
});
