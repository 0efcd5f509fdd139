// The web display's wire protocol (protocol.ts): key codes and the page's messages.

import assert from "node:assert/strict";
import { KEY_A, KEY_B } from "../../../devices/virtio/input/codes.ts";
import { evdevKeyCode, parseClientMessage } from "./protocol.ts";

Deno.test("web display: KeyboardEvent.code -> evdev key codes", () => {
  assert.equal(evdevKeyCode("KeyA"), KEY_A);
  assert.equal(evdevKeyCode("KeyB"), KEY_B);
  assert.equal(evdevKeyCode("Digit0"), 0x0b); // KEY_0
  assert.equal(evdevKeyCode("Enter"), 0x1c); // KEY_ENTER
  assert.equal(evdevKeyCode("F12"), 0x58); // KEY_F12
  assert.equal(evdevKeyCode("Numpad7"), 0x47); // KEY_KP7
  assert.equal(evdevKeyCode("ArrowUp"), 0x67); // KEY_UP
  assert.equal(evdevKeyCode("NoSuchKey"), undefined);
  assert.equal(evdevKeyCode("toString"), undefined);
});

Deno.test("web display: acks carry the page's timings, sanitized", () => {
  assert.deepEqual(parseClientMessage('{"t":"ack","seq":3,"decodeMs":1.5,"drawMs":2}'), {
    t: "ack",
    seq: 3,
    decodeMs: 1.5,
    drawMs: 2,
  });
  assert.deepEqual(parseClientMessage('{"t":"ack","seq":3}'), { t: "ack", seq: 3, decodeMs: 0, drawMs: 0 });
  assert.deepEqual(parseClientMessage('{"t":"ack","seq":4,"decodeMs":-5,"drawMs":"x"}'), {
    t: "ack",
    seq: 4,
    decodeMs: 0,
    drawMs: 0,
  });
  assert.equal(
    (parseClientMessage('{"t":"ack","seq":4,"decodeMs":1e300}') as { decodeMs: number }).decodeMs,
    3_600_000,
  );
  assert.equal(parseClientMessage('{"t":"ack"}'), null);
});
