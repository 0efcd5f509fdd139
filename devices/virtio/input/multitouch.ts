// Multi-touch type B (Linux Documentation/input/multi-touch-protocol.rst): each contact lives in a slot
// (ABS_MT_SLOT) and carries a tracking id (ABS_MT_TRACKING_ID) from the moment it goes down until it is
// lifted, which is reported as tracking id -1. BTN_TOUCH goes to 1 with the first contact and back to 0
// with the last, and ABS_X/ABS_Y follow the newest contact for single-touch readers.
//
// MultiTouchSlots keeps the slot table and produces the event sequence of each change; the caller sends
// the events (InputDevice in device.ts, and the web display's input bridge for sinks without their own
// slot handling).

import type { InputEvent } from "./device.ts";
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

/** ABS_MT_TRACKING_ID -1: the slot's contact is lifted (multi-touch-protocol.rst). */
export const MT_TRACKING_ID_NONE = -1;
/** Highest tracking id handed out; ids wrap to 0 after it (the ABS_MT_TRACKING_ID range a device announces). */
export const MT_TRACKING_ID_MAX = 0xffff;

/** The first slot of 0..slots-1 not in `used`, or undefined when all are taken. */
export function firstFreeSlot(used: ReadonlySet<number>, slots: number): number | undefined {
  for (let s = 0; s < slots; s++) if (!used.has(s)) return s;
  return undefined;
}

/** The contacts of a multi-touch surface, one per slot, and the events that report their changes. */
export class MultiTouchSlots {
  /** Tracking id of each slot's contact, MT_TRACKING_ID_NONE when the slot is free. */
  readonly trackingIds: number[];
  /** The tracking id the next new contact gets. */
  nextTrackingId = 0;

  constructor(readonly slots: number) {
    this.trackingIds = new Array<number>(slots).fill(MT_TRACKING_ID_NONE);
  }

  isDown(slot: number): boolean {
    return this.trackingIds[slot] !== MT_TRACKING_ID_NONE;
  }

  /** Contacts currently down. */
  get contacts(): number {
    return this.trackingIds.filter((id) => id !== MT_TRACKING_ID_NONE).length;
  }

  /**
   * A contact goes down in `slot` at (x, y) (a slot already down keeps its tracking id and moves): slot,
   * tracking id, position, BTN_TOUCH 1 if it is the first contact, then ABS_X/ABS_Y.
   */
  down(slot: number, x: number, y: number): InputEvent[] {
    const first = this.contacts === 0;
    if (!this.isDown(slot)) {
      this.trackingIds[slot] = this.nextTrackingId;
      this.nextTrackingId = (this.nextTrackingId + 1) & MT_TRACKING_ID_MAX;
    }
    const ev: InputEvent[] = [
      { type: EV_ABS, code: ABS_MT_SLOT, value: slot },
      { type: EV_ABS, code: ABS_MT_TRACKING_ID, value: this.trackingIds[slot] },
      { type: EV_ABS, code: ABS_MT_POSITION_X, value: x },
      { type: EV_ABS, code: ABS_MT_POSITION_Y, value: y },
    ];
    if (first) ev.push({ type: EV_KEY, code: BTN_TOUCH, value: 1 });
    ev.push({ type: EV_ABS, code: ABS_X, value: x }, { type: EV_ABS, code: ABS_Y, value: y });
    return ev;
  }

  /** The contact in `slot` moves to (x, y): slot and position. */
  move(slot: number, x: number, y: number): InputEvent[] {
    return [
      { type: EV_ABS, code: ABS_MT_SLOT, value: slot },
      { type: EV_ABS, code: ABS_MT_POSITION_X, value: x },
      { type: EV_ABS, code: ABS_MT_POSITION_Y, value: y },
    ];
  }

  /** The contact in `slot` is lifted: slot, tracking id -1, BTN_TOUCH 0 if it was the last; none if it was not down. */
  up(slot: number): InputEvent[] {
    if (!this.isDown(slot)) return [];
    this.trackingIds[slot] = MT_TRACKING_ID_NONE;
    const ev: InputEvent[] = [
      { type: EV_ABS, code: ABS_MT_SLOT, value: slot },
      { type: EV_ABS, code: ABS_MT_TRACKING_ID, value: MT_TRACKING_ID_NONE },
    ];
    if (this.contacts === 0) ev.push({ type: EV_KEY, code: BTN_TOUCH, value: 0 });
    return ev;
  }
}
