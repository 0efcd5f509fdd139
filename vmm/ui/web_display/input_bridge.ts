// The web display's input: a page's key, pointer, wheel and touch messages (protocol.ts) become evdev
// events for the VM's virtio-input devices. Keys go to the keyboard; the pointer goes to a mouse as
// relative motion, to a tablet as ABS_X/ABS_Y, or to a touch device as a contact; touch contacts go to the
// touch device (multi-touch slots or single-touch BTN_TOUCH). Without a pointer the left button drives the
// touch screen, and without a touch screen the first contact drives the pointer. What a page holds down is
// released when it goes away, so the guest never sees a stuck key.

import type { InputEvent } from "../../../devices/virtio/input/device.ts";
import { INPUT_MT_SLOTS } from "../../../devices/virtio/input/device.ts";
import { firstFreeSlot, MultiTouchSlots } from "../../../devices/virtio/input/multitouch.ts";
import {
  ABS_X,
  ABS_Y,
  BTN_TOUCH,
  EV_ABS,
  EV_KEY,
  EV_REL,
  REL_WHEEL,
  REL_X,
  REL_Y,
} from "../../../devices/virtio/input/codes.ts";
import type { RateLimitedLog } from "../../../core/log.ts";
import { type ClientMessage, evdevButton, evdevKeyCode } from "./protocol.ts";

/** Wheel clicks taken from one message, each way. */
const MAX_WHEEL_CLICKS = 100;

/**
 * What the display needs of an input device: InputDevice (devices/virtio/input/device.ts) fits. `kind` decides
 * how pointer events are sent: "mouse" relative (REL_X/REL_Y), "single-touch"/"multi-touch" as touch
 * contacts, any other kind (a tablet) as ABS_X/ABS_Y plus BTN_* buttons. Absolute coordinates are
 * scaled from the framebuffer to the device's width x height.
 */
export interface InputSink {
  readonly kind: string;
  readonly width?: number;
  readonly height?: number;
  sendEvents(events: InputEvent[]): boolean;
  touchDown?(slot: number, x: number, y: number): boolean;
  touchMove?(slot: number, x: number, y: number): boolean;
  touchUp?(slot: number): boolean;
}

export interface InputSinks {
  keyboard?: InputSink;
  pointer?: InputSink;
  touch?: InputSink;
}

/** A page message for the input devices (every kind but the frame ack). */
export type InputMessage = Exclude<ClientMessage, { t: "ack" }>;

type Phase = "move" | "down" | "up";

/** What one page holds down, and where its mouse was. */
export class PageInput {
  /** Last mouse position (framebuffer pixels), for relative mice. */
  mouse: { x: number; y: number } | null = null;
  readonly keysDown = new Set<number>();
  readonly buttonsDown = new Set<number>();
  /** PointerEvent.pointerId -> touch slot. */
  readonly touches = new Map<number, number>();

  /** `frameSize` is the size of the framebuffer the page shows, the space its coordinates are in. */
  constructor(readonly frameSize: () => { width: number; height: number }) {}
}

export class InputBridge {
  readonly #sinks: InputSinks;
  readonly #log: RateLimitedLog;
  /** The contacts of touch sinks without their own slot handling (no touchDown/touchMove/touchUp). */
  readonly #mt = new MultiTouchSlots(INPUT_MT_SLOTS);

  constructor(sinks: InputSinks, log: RateLimitedLog) {
    this.#sinks = sinks;
    this.#log = log;
  }

  /** Forward one page message; a device that refuses the events costs one log line. */
  handle(p: PageInput, m: InputMessage): void {
    try {
      switch (m.t) {
        case "key":
          return this.#key(p, m.code, m.down);
        case "pointer":
          return this.#pointer(p, m.kind, m.x, m.y, m.button);
        case "wheel": {
          const ptr = this.#sinks.pointer;
          const clicks = Math.trunc(Math.max(-MAX_WHEEL_CLICKS, Math.min(MAX_WHEEL_CLICKS, m.clicks)));
          if (ptr?.kind === "mouse" && clicks !== 0) {
            ptr.sendEvents([{ type: EV_REL, code: REL_WHEEL, value: clicks }]);
          }
          return;
        }
        case "touch":
          return this.#touch(p, m.kind, m.id, m.x, m.y);
      }
    } catch (e) {
      this.#log.log(`input event refused: ${e instanceof Error ? e.message : e}`);
    }
  }

  /** A page went away: release what it held down, so the guest does not see a stuck key or button. */
  releaseAll(p: PageInput): void {
    const inp = this.#sinks;
    try {
      for (const k of p.keysDown) inp.keyboard?.sendEvents([{ type: EV_KEY, code: k, value: 0 }]);
      for (const b of p.buttonsDown) inp.pointer?.sendEvents([{ type: EV_KEY, code: b, value: 0 }]);
      const touchDev = inp.touch ?? (inp.pointer?.kind.endsWith("touch") ? inp.pointer : undefined);
      for (const id of [...p.touches.keys()]) {
        if (touchDev) this.#touchOn(touchDev, p, "up", id, p.mouse?.x ?? 0, p.mouse?.y ?? 0);
      }
    } catch (e) {
      this.#log.log(`releasing input failed: ${e}`);
    }
    p.keysDown.clear();
    p.buttonsDown.clear();
    p.touches.clear();
  }

  #key(p: PageInput, code: string, down: boolean): void {
    const kb = this.#sinks.keyboard;
    const key = evdevKeyCode(code);
    if (!kb || key === undefined) return;
    if (down) p.keysDown.add(key);
    else if (!p.keysDown.delete(key)) return; // a release of a key this page never pressed
    kb.sendEvents([{ type: EV_KEY, code: key, value: down ? 1 : 0 }]);
  }

  /** Framebuffer pixel -> the device's absolute axis (width x height), clamped. */
  #scale(p: PageInput, dev: InputSink, x: number, y: number): { x: number; y: number } {
    const size = p.frameSize();
    const fbw = Math.max(1, size.width), fbh = Math.max(1, size.height);
    const w = dev.width ?? fbw, h = dev.height ?? fbh;
    const sx = Math.floor((Math.max(0, Math.min(fbw - 1, x)) * w) / fbw);
    const sy = Math.floor((Math.max(0, Math.min(fbh - 1, y)) * h) / fbh);
    return { x: Math.min(w - 1, sx), y: Math.min(h - 1, sy) };
  }

  #pointer(p: PageInput, kind: Phase, x: number, y: number, button?: number): void {
    const inp = this.#sinks;
    const ptr = inp.pointer;
    if (!ptr) {
      // No mouse: the left button drives the touch screen (as crosvm's display window does).
      if (inp.touch && (kind === "move" || (button ?? 0) === 0)) this.#touch(p, kind, -1, x, y);
      return;
    }
    if (ptr.kind === "single-touch" || ptr.kind === "multi-touch") {
      if (kind === "move" || (button ?? 0) === 0) this.#touchOn(ptr, p, kind, -1, x, y);
      return;
    }
    const btn = evdevButton(button);
    if (ptr.kind === "mouse") {
      const ev: InputEvent[] = [];
      const last = p.mouse;
      p.mouse = { x, y };
      if (last) {
        const dx = Math.round(x - last.x), dy = Math.round(y - last.y);
        if (dx) ev.push({ type: EV_REL, code: REL_X, value: dx });
        if (dy) ev.push({ type: EV_REL, code: REL_Y, value: dy });
        if (dx || dy) ptr.sendEvents(ev);
      }
      if (kind !== "move" && btn !== undefined) this.#button(p, ptr, btn, kind === "down", []);
      return;
    }
    // An absolute pointer (tablet): position, then the button.
    const a = this.#scale(p, ptr, x, y);
    const ev: InputEvent[] = [{ type: EV_ABS, code: ABS_X, value: a.x }, { type: EV_ABS, code: ABS_Y, value: a.y }];
    if (kind === "move" || btn === undefined) ptr.sendEvents(ev);
    else this.#button(p, ptr, btn, kind === "down", ev);
  }

  #button(p: PageInput, dev: InputSink, btn: number, down: boolean, before: InputEvent[]): void {
    if (down) p.buttonsDown.add(btn);
    else if (!p.buttonsDown.delete(btn)) {
      if (before.length) dev.sendEvents(before);
      return;
    }
    dev.sendEvents([...before, { type: EV_KEY, code: btn, value: down ? 1 : 0 }]);
  }

  #touch(p: PageInput, kind: Phase, id: number, x: number, y: number): void {
    const inp = this.#sinks;
    if (inp.touch) return this.#touchOn(inp.touch, p, kind, id, x, y);
    // No touch screen: the first contact acts as the mouse's left button.
    if (inp.pointer && (p.touches.size === 0 || p.touches.has(id))) {
      if (kind === "down") p.touches.set(id, 0);
      if (kind === "up") p.touches.delete(id);
      this.#pointer(p, kind, x, y, 0);
    }
  }

  /** A contact (pointer id `id`) on a touch device: multi-touch slots, or single-touch BTN_TOUCH. */
  #touchOn(dev: InputSink, p: PageInput, kind: Phase, id: number, x: number, y: number): void {
    const a = this.#scale(p, dev, x, y);
    let slot = p.touches.get(id);
    if (dev.kind === "multi-touch") {
      if (kind === "down" && slot === undefined) {
        slot = firstFreeSlot(new Set(p.touches.values()), INPUT_MT_SLOTS);
        if (slot === undefined) return; // more fingers than slots
        p.touches.set(id, slot);
        if (dev.touchDown) dev.touchDown(slot, a.x, a.y);
        else dev.sendEvents(this.#mt.down(slot, a.x, a.y));
      } else if (slot !== undefined && kind === "move") {
        if (dev.touchMove) dev.touchMove(slot, a.x, a.y);
        else dev.sendEvents(this.#mt.move(slot, a.x, a.y));
      } else if (slot !== undefined && kind === "up") {
        p.touches.delete(id);
        if (dev.touchUp) dev.touchUp(slot);
        else {
          const ev = this.#mt.up(slot);
          if (ev.length) dev.sendEvents(ev);
        }
      }
      return;
    }
    // Single touch: only the first contact counts.
    const pos: InputEvent[] = [{ type: EV_ABS, code: ABS_X, value: a.x }, { type: EV_ABS, code: ABS_Y, value: a.y }];
    if (kind === "down" && p.touches.size === 0) {
      p.touches.set(id, 0);
      dev.sendEvents([...pos, { type: EV_KEY, code: BTN_TOUCH, value: 1 }]);
    } else if (slot !== undefined && kind === "move") dev.sendEvents(pos);
    else if (slot !== undefined && kind === "up") {
      p.touches.delete(id);
      dev.sendEvents([...pos, { type: EV_KEY, code: BTN_TOUCH, value: 0 }]);
    }
  }
}
