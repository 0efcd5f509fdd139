// The event-socket request handler of `denovm device input`: each request applied to a virtio-input
// device whose guest has posted event buffers, and malformed or unknown requests refused.

import assert from "node:assert/strict";
import { handleInputRequest } from "./input.ts";
import { BTN_TOUCH, EV_KEY } from "../../../devices/virtio/input/codes.ts";
import { inputRig, key, syn } from "../../../test/support/input_rig.ts";

Deno.test("input: event-socket requests", () => {
  using r = inputRig("single-touch", { width: 50, height: 50 });
  r.post(16);
  assert.deepEqual(handleInputRequest(r.dev, { tap: [1, 2] }), { ok: true, pending: 0 });
  assert.equal(r.events().length, 6);
  assert.throws(() => handleInputRequest(r.dev, { tap: [1] }), /2 integers/);
  assert.throws(() => handleInputRequest(r.dev, { bogus: 1 }), /unknown request/);
  assert.throws(() => handleInputRequest(r.dev, { type: "x" }), /keyboard/);
  const res = handleInputRequest(r.dev, { events: [{ type: EV_KEY, code: BTN_TOUCH, value: 1 }] });
  assert.equal(res.ok, true);
  assert.deepEqual(r.events(), [key(BTN_TOUCH, 1), syn]);
});
