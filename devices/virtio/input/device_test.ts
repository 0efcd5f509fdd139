// virtio-input driven through the virtio-mmio registers by the test driver: configuration space
// (select/subsel answers), event layout and EV_SYN batches, queueing until the guest posts buffers,
// the bounded queue, the status queue, and a property test.

import assert from "node:assert/strict";
import fc from "fast-check";
import {
  INPUT_ABSINFO_MAX,
  INPUT_ABSINFO_MIN,
  INPUT_EVENT_SIZE,
  INPUT_MAX_PENDING_EVENTS,
  INPUT_MT_SLOTS,
  type InputEvent,
  VIRTIO_INPUT_CFG_ABS_INFO,
  VIRTIO_INPUT_CFG_EV_BITS,
  VIRTIO_INPUT_CFG_ID_DEVIDS,
  VIRTIO_INPUT_CFG_ID_NAME,
  VIRTIO_INPUT_CFG_PROP_BITS,
} from "./device.ts";
import {
  ABS_MT_POSITION_X,
  ABS_MT_POSITION_Y,
  ABS_MT_SLOT,
  ABS_MT_TRACKING_ID,
  ABS_X,
  ABS_Y,
  BTN_LEFT,
  BTN_TOUCH,
  EV_ABS,
  EV_KEY,
  EV_LED,
  EV_REL,
  EV_REP,
  EV_SYN,
  INPUT_PROP_DIRECT,
  KEY_1,
  KEY_A,
  KEY_LEFTSHIFT,
  LED_CAPSL,
  REL_X,
  REL_Y,
} from "./codes.ts";
import { VIRTIO_MMIO_DEVICE_ID } from "../mmio.ts";
import { VIRTIO_ID_INPUT } from "../device.ts";
import { inputRig, key, syn } from "../../../test/support/input_rig.ts";

const hasBit = (bm: Uint8Array, bit: number) => ((bm[bit >> 3] ?? 0) >> (bit & 7) & 1) === 1;

Deno.test("input: config space of a keyboard (name, ids, event types, keys, LEDs, repeat)", () => {
  using r = inputRig("keyboard");
  assert.equal(r.drv.readReg(VIRTIO_MMIO_DEVICE_ID), VIRTIO_ID_INPUT);
  assert.equal(new TextDecoder().decode(r.cfg(VIRTIO_INPUT_CFG_ID_NAME, 0)), "denovm virtio keyboard");
  const ids = new DataView(r.cfg(VIRTIO_INPUT_CFG_ID_DEVIDS, 0).buffer);
  assert.equal(ids.byteLength, 8);
  assert.equal(ids.getUint16(0, true), 0x06, "BUS_VIRTUAL");
  const keys = r.cfg(VIRTIO_INPUT_CFG_EV_BITS, EV_KEY);
  assert.ok(hasBit(keys, KEY_A) && hasBit(keys, KEY_LEFTSHIFT) && !hasBit(keys, 0));
  assert.ok(r.cfg(VIRTIO_INPUT_CFG_EV_BITS, EV_REP).length > 0, "EV_REP answers a non-empty bitmap");
  assert.ok(hasBit(r.cfg(VIRTIO_INPUT_CFG_EV_BITS, EV_LED), LED_CAPSL));
  assert.equal(r.cfg(VIRTIO_INPUT_CFG_EV_BITS, EV_REL).length, 0, "no relative axes");
  assert.equal(r.cfg(VIRTIO_INPUT_CFG_ABS_INFO, ABS_X).length, 0);
  assert.equal(r.cfg(0x7f, 0).length, 0, "unknown select: size 0");
  // select/subsel read back.
  const all = r.drv.readConfig(0, 2);
  assert.deepEqual([...all], [0x7f, 0]);
});

Deno.test("input: config space of touch devices (ABS_INFO ranges, INPUT_PROP_DIRECT, slots)", () => {
  using r = inputRig("multi-touch", { width: 800, height: 600 });
  assert.ok(hasBit(r.cfg(VIRTIO_INPUT_CFG_PROP_BITS, 0), INPUT_PROP_DIRECT));
  const abs = r.cfg(VIRTIO_INPUT_CFG_EV_BITS, EV_ABS);
  for (const a of [ABS_X, ABS_Y, ABS_MT_SLOT, ABS_MT_TRACKING_ID, ABS_MT_POSITION_X, ABS_MT_POSITION_Y]) {
    assert.ok(hasBit(abs, a), `abs ${a}`);
  }
  const info = (a: number) => {
    const v = new DataView(r.cfg(VIRTIO_INPUT_CFG_ABS_INFO, a).buffer);
    return [v.getInt32(INPUT_ABSINFO_MIN, true), v.getInt32(INPUT_ABSINFO_MAX, true)];
  };
  assert.deepEqual(info(ABS_MT_POSITION_X), [0, 799]);
  assert.deepEqual(info(ABS_Y), [0, 599]);
  assert.deepEqual(info(ABS_MT_SLOT), [0, INPUT_MT_SLOTS - 1]);
});

Deno.test("input: events wait for guest buffers, then arrive one per buffer in EV_SYN batches", () => {
  using r = inputRig("keyboard");
  r.dev.type("A1");
  assert.equal(r.dev.pendingEvents, 10);
  r.irqs.n = 0;
  r.post(4);
  assert.equal(r.irqs.n, 1);
  assert.deepEqual(r.events(), [key(KEY_LEFTSHIFT, 1), key(KEY_A, 1), syn, key(KEY_A, 0)]);
  r.post(16);
  assert.deepEqual(r.events(), [key(KEY_LEFTSHIFT, 0), syn, key(KEY_1, 1), syn, key(KEY_1, 0), syn]);
  // Buffers are now waiting: new events go out at once.
  r.dev.sendKey(KEY_A, true);
  assert.deepEqual(r.events(), [key(KEY_A, 1), syn]);
  assert.throws(() => r.dev.type("é"), RangeError);
  assert.throws(() => r.dev.move(1, 1), /mouse/);
});

Deno.test("input: mouse and multi-touch sequences", () => {
  {
    using r = inputRig("mouse");
    r.post(32);
    r.dev.move(5, -3);
    r.dev.click();
    assert.deepEqual(r.events(), [
      { type: EV_REL, code: REL_X, value: 5 },
      { type: EV_REL, code: REL_Y, value: -3 },
      syn,
      key(BTN_LEFT, 1),
      syn,
      key(BTN_LEFT, 0),
      syn,
    ]);
  }
  using r = inputRig("multi-touch", { width: 100, height: 100 });
  r.post(64);
  r.dev.touchDown(0, 10, 20);
  r.dev.touchDown(1, 30, 40);
  r.dev.touchUp(0);
  r.dev.touchUp(1);
  const ev = r.events();
  const abs = (code: number, value: number) => ({ type: EV_ABS, code, value });
  assert.deepEqual(ev.slice(0, 8), [
    abs(ABS_MT_SLOT, 0),
    abs(ABS_MT_TRACKING_ID, 0),
    abs(ABS_MT_POSITION_X, 10),
    abs(ABS_MT_POSITION_Y, 20),
    key(BTN_TOUCH, 1),
    abs(ABS_X, 10),
    abs(ABS_Y, 20),
    syn,
  ]);
  // The second contact gets tracking id 1 and no second BTN_TOUCH; lifting the last one releases it.
  assert.ok(ev.some((e) => e.code === ABS_MT_TRACKING_ID && e.value === 1));
  assert.equal(ev.filter((e) => e.type === EV_KEY && e.code === BTN_TOUCH).length, 2);
  assert.deepEqual(ev.slice(-4), [abs(ABS_MT_SLOT, 1), abs(ABS_MT_TRACKING_ID, -1), key(BTN_TOUCH, 0), syn]);
  assert.throws(() => r.dev.tap(100, 0), RangeError);
});

Deno.test("input: the pending queue is bounded (whole batches dropped), short buffers are returned", () => {
  using r = inputRig("keyboard");
  let accepted = 0;
  while (r.dev.sendKey(KEY_A, true)) accepted++;
  assert.equal(accepted, INPUT_MAX_PENDING_EVENTS / 2);
  assert.equal(r.dev.stats().batchesDropped, 1);
  assert.equal(r.lines.length, 1);
  const q = r.drv.queues[0];
  const short = q.submit([4]);
  r.drv.kick(0);
  assert.deepEqual(q.used(), [{ id: short.head, len: 0 }]);
  assert.equal(r.dev.stats().malformed, 1);
});

Deno.test("input: LED events on the status queue are recorded and the buffers returned", () => {
  using r = inputRig("keyboard");
  const ev = new Uint8Array(INPUT_EVENT_SIZE * 2);
  const v = new DataView(ev.buffer);
  v.setUint16(0, EV_LED, true);
  v.setUint16(2, LED_CAPSL, true);
  v.setInt32(4, 1, true);
  v.setUint16(8, EV_SYN, true);
  const q = r.drv.queues[1];
  const s = q.submit([ev]);
  r.drv.kick(1);
  assert.deepEqual(q.used(), [{ id: s.head, len: 0 }]);
  assert.equal(r.dev.leds.get(LED_CAPSL), 1);
});

Deno.test("input property: every event sent while the queue has room arrives once, in order", () => {
  fc.assert(
    fc.property(
      fc.array(
        fc.oneof(
          fc.record({ op: fc.constant("key" as const), code: fc.integer({ min: 1, max: 0xff }), down: fc.boolean() }),
          fc.record({ op: fc.constant("post" as const), n: fc.integer({ min: 0, max: 12 }) }),
        ),
        { maxLength: 40 },
      ),
      (ops) => {
        using r = inputRig("keyboard");
        const sent: InputEvent[] = [];
        const got: InputEvent[] = [];
        let buffers = 0;
        for (const o of ops) {
          if (o.op === "key") {
            assert.ok(r.dev.sendKey(o.code, o.down));
            sent.push(key(o.code, o.down ? 1 : 0), syn);
          } else {
            buffers += r.post(o.n);
          }
          got.push(...r.events());
        }
        assert.deepEqual(got, sent.slice(0, Math.min(buffers, sent.length)));
        assert.equal(r.dev.pendingEvents, sent.length - got.length);
      },
    ),
    { numRuns: 60 },
  );
});
