// crosvm's input kinds beyond keyboard, mouse and touch screens, driven through the virtio-mmio registers
// by the test driver: each kind's configuration space (names, ids, event bits, axis ranges, properties),
// the custom kind's JSON file (parsed, served, written back and parsed again; malformed files refused with
// one line), and the saved state of the new kinds.

import assert from "node:assert/strict";
import {
  INPUT_ABSINFO_FLAT,
  INPUT_ABSINFO_FUZZ,
  INPUT_ABSINFO_MAX,
  INPUT_ABSINFO_MIN,
  InputDevice,
  VIRTIO_INPUT_CFG_ABS_INFO,
  VIRTIO_INPUT_CFG_EV_BITS,
  VIRTIO_INPUT_CFG_ID_DEVIDS,
  VIRTIO_INPUT_CFG_ID_NAME,
  VIRTIO_INPUT_CFG_ID_SERIAL,
  VIRTIO_INPUT_CFG_PROP_BITS,
} from "./device.ts";
import {
  ABS_MT_POSITION_X,
  ABS_MT_PRESSURE,
  ABS_MT_SLOT,
  ABS_MT_TOOL_TYPE,
  ABS_MT_TRACKING_ID,
  ABS_X,
  ABS_Y,
  BTN_LEFT,
  BTN_RIGHT,
  BTN_TOOL_FINGER,
  BTN_TOOL_QUADTAP,
  BTN_TOUCH,
  EV_ABS,
  EV_KEY,
  EV_LED,
  EV_REL,
  EV_REP,
  EV_SW,
  INPUT_PROP_BUTTONPAD,
  INPUT_PROP_DIRECT,
  INPUT_PROP_POINTER,
  KEY_A,
  REL_WHEEL,
  SW_LID,
  SW_MACHINE_COVER,
  SW_TABLET_MODE,
} from "./codes.ts";
import {
  formatCustomInputConfig,
  InputConfigFileError,
  parseCustomInputConfig,
  TRACKPAD_MT_SLOT_MAX,
  TRACKPAD_MT_TRACKING_ID_MAX,
} from "./profiles.ts";
import { inputRig, key } from "../../../test/support/input_rig.ts";
import { decodeState, encodeState, StateError } from "../../../core/state.ts";

const hasBit = (bm: Uint8Array, bit: number) => ((bm[bit >> 3] ?? 0) >> (bit & 7) & 1) === 1;
const bits = (bm: Uint8Array) => {
  const out: number[] = [];
  for (let i = 0; i < bm.length * 8; i++) if (hasBit(bm, i)) out.push(i);
  return out;
};
const text = (b: Uint8Array) => new TextDecoder().decode(b);
type Rig = ReturnType<typeof inputRig>;
const absInfo = (r: Rig, axis: number) => {
  const v = new DataView(r.cfg(VIRTIO_INPUT_CFG_ABS_INFO, axis).buffer);
  return [
    v.getInt32(INPUT_ABSINFO_MIN, true),
    v.getInt32(INPUT_ABSINFO_MAX, true),
    v.getInt32(INPUT_ABSINFO_FUZZ, true),
    v.getInt32(INPUT_ABSINFO_FLAT, true),
  ];
};

Deno.test("input profiles: switches and rotary answer crosvm's names, zero ids and event bits", () => {
  {
    using r = inputRig("switches", { index: 1 });
    assert.equal(text(r.cfg(VIRTIO_INPUT_CFG_ID_NAME, 0)), "Crosvm Virtio Switches 1");
    assert.equal(text(r.cfg(VIRTIO_INPUT_CFG_ID_SERIAL, 0)), "virtio-switches-1");
    assert.deepEqual([...r.cfg(VIRTIO_INPUT_CFG_ID_DEVIDS, 0)], [0, 0, 0, 0, 0, 0, 0, 0]);
    // SW_LID..SW_MACHINE_COVER: 17 bits (crosvm's own test of its switches bitmap).
    assert.deepEqual([...r.cfg(VIRTIO_INPUT_CFG_EV_BITS, EV_SW)], [0xff, 0xff, 0x01]);
    assert.ok(
      hasBit(r.cfg(VIRTIO_INPUT_CFG_EV_BITS, EV_SW), SW_MACHINE_COVER) &&
        hasBit(r.cfg(VIRTIO_INPUT_CFG_EV_BITS, EV_SW), SW_LID),
    );
    assert.deepEqual(bits(r.cfg(VIRTIO_INPUT_CFG_EV_BITS, 0)), [EV_SW], "subsel 0 lists the event types");
    assert.equal(r.cfg(VIRTIO_INPUT_CFG_EV_BITS, EV_KEY).length, 0);
    assert.equal(r.cfg(VIRTIO_INPUT_CFG_PROP_BITS, 0).length, 0);
    r.post(4);
    r.dev.sendEvents([{ type: EV_SW, code: SW_TABLET_MODE, value: 1 }]);
    assert.equal(r.events()[0].code, SW_TABLET_MODE);
  }
  using r = inputRig("rotary");
  assert.equal(text(r.cfg(VIRTIO_INPUT_CFG_ID_NAME, 0)), "Crosvm Virtio Rotary 0");
  assert.equal(text(r.cfg(VIRTIO_INPUT_CFG_ID_SERIAL, 0)), "virtio-rotary-0");
  assert.deepEqual(bits(r.cfg(VIRTIO_INPUT_CFG_EV_BITS, EV_REL)), [REL_WHEEL]);
  assert.deepEqual(bits(r.cfg(VIRTIO_INPUT_CFG_EV_BITS, 0)), [EV_REL]);
  assert.equal(r.cfg(VIRTIO_INPUT_CFG_ABS_INFO, ABS_X).length, 0);
});

Deno.test("input profiles: trackpad and multi-touch trackpad answer crosvm's ranges and properties", () => {
  {
    using r = inputRig("trackpad", { width: 800, height: 600 });
    assert.equal(text(r.cfg(VIRTIO_INPUT_CFG_ID_NAME, 0)), "Crosvm Virtio Trackpad 0");
    assert.equal(text(r.cfg(VIRTIO_INPUT_CFG_ID_SERIAL, 0)), "virtio-trackpad-0");
    assert.deepEqual(bits(r.cfg(VIRTIO_INPUT_CFG_EV_BITS, EV_KEY)), [BTN_LEFT, BTN_RIGHT, BTN_TOOL_FINGER, BTN_TOUCH]);
    assert.deepEqual(bits(r.cfg(VIRTIO_INPUT_CFG_EV_BITS, EV_ABS)), [ABS_X, ABS_Y]);
    // crosvm's trackpad axes run from 0 to the width and height themselves.
    assert.deepEqual(absInfo(r, ABS_X), [0, 800, 0, 0]);
    assert.deepEqual(absInfo(r, ABS_Y), [0, 600, 0, 0]);
    assert.equal(r.cfg(VIRTIO_INPUT_CFG_PROP_BITS, 0).length, 0);
    r.post(4);
    r.dev.sendKey(BTN_LEFT, true);
    assert.deepEqual(r.events()[0], key(BTN_LEFT, 1));
    assert.throws(() => r.dev.sendKey(KEY_A, true), RangeError);
  }
  {
    using r = inputRig("multi-touch-trackpad", { name: "pad" });
    assert.equal(text(r.cfg(VIRTIO_INPUT_CFG_ID_NAME, 0)), "pad");
    assert.equal(text(r.cfg(VIRTIO_INPUT_CFG_ID_SERIAL, 0)), "virtio-multi-touch-trackpad-0");
    assert.deepEqual(bits(r.cfg(VIRTIO_INPUT_CFG_PROP_BITS, 0)), [INPUT_PROP_POINTER, INPUT_PROP_BUTTONPAD]);
    const keys = bits(r.cfg(VIRTIO_INPUT_CFG_EV_BITS, EV_KEY));
    assert.equal(keys.length, 6);
    assert.ok(keys.includes(BTN_TOOL_QUADTAP) && keys.includes(BTN_LEFT) && keys.includes(BTN_TOUCH));
    assert.equal(bits(r.cfg(VIRTIO_INPUT_CFG_EV_BITS, EV_ABS)).length, 11);
    assert.deepEqual(absInfo(r, ABS_MT_SLOT), [0, TRACKPAD_MT_SLOT_MAX, 0, 0]);
    assert.deepEqual(absInfo(r, ABS_MT_TRACKING_ID), [0, TRACKPAD_MT_TRACKING_ID_MAX, 0, 0]);
    assert.deepEqual(absInfo(r, ABS_MT_POSITION_X), [0, 1280, 0, 0], "crosvm's default width");
    assert.deepEqual(absInfo(r, ABS_MT_PRESSURE), [0, 255, 0, 0]);
    assert.deepEqual(absInfo(r, ABS_MT_TOOL_TYPE), [0, 2, 0, 0]);
  }
});

/** crosvm's example custom configuration (a multi-touch screen of 720x1280), as a user writes one. */
const TOUCHSCREEN_JSON = JSON.stringify({
  name: "Crosvm Virtio Multitouch Touchscreen 0",
  serial_name: "virtio-touchscreen-0",
  properties: { INPUT_PROP_DIRECT: 1 },
  events: [
    { event_type: "EV_KEY", event_type_code: 1, supported_events: { BTN_TOUCH: 330 } },
    {
      event_type: "EV_ABS",
      event_type_code: 3,
      supported_events: {
        ABS_MT_SLOT: 47,
        ABS_MT_TRACKING_ID: 57,
        ABS_MT_POSITION_X: 53,
        ABS_MT_POSITION_Y: 54,
        ABS_X: 0,
        ABS_Y: 1,
      },
    },
  ],
  axis_info: [
    { axis: "ABS_MT_SLOT", axis_code: 47, min: 0, max: 10, fuzz: 0, flat: 0 },
    { axis: "ABS_X", axis_code: 0, min: 0, max: 720, fuzz: 2, flat: 3 },
    { axis: "ABS_Y", axis_code: 1, min: 0, max: 1280 },
  ],
  comment: "fields the format does not know are ignored",
});

Deno.test("input custom: a configuration file is served, written back and parsed to the same device", () => {
  const config = parseCustomInputConfig(TOUCHSCREEN_JSON);
  using r = inputRig("custom", { custom: config, index: 2 });
  assert.equal(text(r.cfg(VIRTIO_INPUT_CFG_ID_NAME, 0)), "Crosvm Virtio Multitouch Touchscreen 0 2");
  assert.equal(text(r.cfg(VIRTIO_INPUT_CFG_ID_SERIAL, 0)), "virtio-touchscreen-0-2");
  assert.deepEqual(bits(r.cfg(VIRTIO_INPUT_CFG_PROP_BITS, 0)), [INPUT_PROP_DIRECT]);
  assert.deepEqual(bits(r.cfg(VIRTIO_INPUT_CFG_EV_BITS, 0)), [EV_KEY, EV_ABS]);
  assert.deepEqual(bits(r.cfg(VIRTIO_INPUT_CFG_EV_BITS, EV_KEY)), [BTN_TOUCH]);
  assert.deepEqual(bits(r.cfg(VIRTIO_INPUT_CFG_EV_BITS, EV_ABS)), [0, 1, 47, 53, 54, 57]);
  assert.deepEqual(absInfo(r, ABS_X), [0, 720, 2, 3]);
  assert.deepEqual(absInfo(r, ABS_Y), [0, 1280, 0, 0], "fuzz and flat default to 0");
  assert.equal(r.cfg(VIRTIO_INPUT_CFG_ABS_INFO, ABS_MT_POSITION_X).length, 0, "an axis without info");
  // Written back, the file parses to the same configuration and the same configuration space.
  const again = parseCustomInputConfig(formatCustomInputConfig(config));
  assert.deepEqual(again, config);
  using r2 = inputRig("custom", { custom: again, index: 2 });
  for (const [sel, sub] of [[VIRTIO_INPUT_CFG_EV_BITS, EV_ABS], [VIRTIO_INPUT_CFG_ABS_INFO, ABS_X], [1, 0], [2, 0]]) {
    assert.deepEqual(r2.cfg(sel, sub), r.cfg(sel, sub));
  }
  // The default names, and a keyboard-like file with an empty event list (it answers nothing, as crosvm).
  const kb = parseCustomInputConfig(JSON.stringify({
    events: [
      { event_type: "EV_KEY", event_type_code: EV_KEY, supported_events: { KEY_A: KEY_A } },
      { event_type: "EV_REP", event_type_code: EV_REP, supported_events: { REP_DELAY: 0, REP_PERIOD: 1 } },
      { event_type: "EV_LED", event_type_code: EV_LED, supported_events: {} },
    ],
  }));
  using k = inputRig("custom", { custom: kb });
  assert.equal(text(k.cfg(VIRTIO_INPUT_CFG_ID_NAME, 0)), "Crosvm Virtio Custom 0");
  assert.equal(text(k.cfg(VIRTIO_INPUT_CFG_ID_SERIAL, 0)), "virtio-custom-0");
  assert.deepEqual([...k.cfg(VIRTIO_INPUT_CFG_EV_BITS, EV_REP)], [0x03]);
  assert.equal(k.cfg(VIRTIO_INPUT_CFG_EV_BITS, EV_LED).length, 0);
  k.post(2);
  k.dev.sendKey(KEY_A, true);
  assert.deepEqual(k.events()[0], key(KEY_A, 1));
});

Deno.test("input custom: malformed configuration files are refused with one line", () => {
  const ev = (o: Record<string, unknown>) => JSON.stringify({ events: [o] });
  const good = { event_type: "EV_KEY", event_type_code: 1, supported_events: { A: 30 } };
  const cases: [string, RegExp][] = [
    ["{", /not JSON/],
    ["[]", /top level is not a JSON object/],
    ["{}", /"events" is missing/],
    [JSON.stringify({ events: {} }), /"events" is missing or not an array/],
    [JSON.stringify({ name: 3, events: [] }), /"name" is 3, not a string/],
    [ev({ ...good, event_type_code: -1 }), /event_type_code is -1/],
    [ev({ ...good, event_type_code: 1.5 }), /event_type_code is 1.5/],
    [ev({ ...good, event_type_code: 300 }), /above 255/],
    [ev({ ...good, event_type: undefined }), /event_type is missing/],
    [ev({ ...good, supported_events: { A: 1024 } }), /bits stop at 1023/],
    [ev({ ...good, supported_events: [30] }), /not an object of name: number pairs/],
    [JSON.stringify({ events: [good, good] }), /defined twice/],
    [JSON.stringify({ events: [], properties: { P: "1" } }), /"properties" "P" is "1"/],
    [JSON.stringify({ events: [], axis_info: [{ axis: "X", axis_code: 0, min: 0 }] }), /max is missing/],
    [JSON.stringify({ events: [], axis_info: [{ axis: "X", axis_code: 0, min: -1, max: 1 }] }), /min is -1/],
    [JSON.stringify({ events: [], axis_info: [{ axis_code: 0, min: 0, max: 1 }] }), /axis is missing/],
    [JSON.stringify({ events: [], axis_info: [{ axis: "X", axis_code: 256, min: 0, max: 1 }] }), /above 255/],
    [JSON.stringify({ events: [], axis_info: {} }), /"axis_info" is not an array/],
  ];
  for (const [src, re] of cases) {
    assert.throws(() => parseCustomInputConfig(src), (e: Error) => {
      assert.ok(e instanceof InputConfigFileError, src);
      assert.match(e.message, re, src);
      assert.ok(!e.message.includes("\n"), `one line: ${e.message}`);
      return true;
    });
  }
  assert.throws(() => new InputDevice({ kind: "custom" }), /needs its configuration/);
});

Deno.test("input state: the new kinds save and restore, and another description is refused", () => {
  const config = parseCustomInputConfig(TOUCHSCREEN_JSON);
  for (
    const opts of [{ kind: "switches" }, { kind: "multi-touch-trackpad" }, { kind: "custom", custom: config }] as const
  ) {
    using r = inputRig(opts.kind, opts);
    r.dev.sendEvents([{ type: EV_KEY, code: BTN_TOUCH, value: 1 }]);
    const state = decodeState(encodeState(r.dev.saveState()));
    const dev2 = new InputDevice(opts);
    dev2.restoreState(state);
    assert.equal(dev2.pendingEvents, 2);
    dev2.close();
  }
  using r = inputRig("custom", { custom: config });
  const state = r.dev.saveState();
  const other = parseCustomInputConfig(TOUCHSCREEN_JSON.replace('"max":720', '"max":721'));
  assert.throws(() => new InputDevice({ kind: "custom", custom: other }).restoreState(state), StateError);
  assert.throws(() => new InputDevice({ kind: "trackpad" }).restoreState(state), StateError);
});
