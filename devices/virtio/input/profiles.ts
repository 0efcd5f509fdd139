// What an input device describes to the guest through its configuration space, for the kinds crosvm has
// beyond denovm's keyboard, mouse and touch screens: switches, rotary, trackpad, multi-touch trackpad
// (the device descriptions of crosvm's devices/src/virtio/input/defaults.rs: names with a per-kind index,
// device ids all zero, the event bits, the axis ranges and the properties), and the custom kind, which a
// JSON file describes (crosvm's InputConfigFile in devices/src/virtio/input/mod.rs):
//
//   { "name": "...", "serial_name": "...",                    both optional
//     "properties": { "INPUT_PROP_DIRECT": 1, ... },          optional: label -> property bit
//     "events": [ { "event_type": "EV_KEY", "event_type_code": 1,
//                   "supported_events": { "BTN_TOUCH": 330, ... } }, ... ],      label -> code
//     "axis_info": [ { "axis": "ABS_X", "axis_code": 0, "min": 0, "max": 720,
//                      "fuzz": 0, "flat": 0 }, ... ] }        optional; fuzz and flat default to 0
//
// The labels are names for people: only the numbers reach the guest. Fields the format does not know
// are ignored, as crosvm's parser ignores them.

import {
  ABS_MT_POSITION_X,
  ABS_MT_POSITION_Y,
  ABS_MT_PRESSURE,
  ABS_MT_SLOT,
  ABS_MT_TOOL_TYPE,
  ABS_MT_TOUCH_MAJOR,
  ABS_MT_TOUCH_MINOR,
  ABS_MT_TRACKING_ID,
  ABS_PRESSURE,
  ABS_X,
  ABS_Y,
  BTN_LEFT,
  BTN_RIGHT,
  BTN_TOOL_DOUBLETAP,
  BTN_TOOL_FINGER,
  BTN_TOOL_QUADTAP,
  BTN_TOOL_TRIPLETAP,
  BTN_TOUCH,
  EV_ABS,
  EV_KEY,
  EV_REL,
  EV_SW,
  INPUT_PROP_BUTTONPAD,
  INPUT_PROP_POINTER,
  REL_WHEEL,
  SW_CAMERA_LENS_COVER,
  SW_DOCK,
  SW_FRONT_PROXIMITY,
  SW_HEADPHONE_INSERT,
  SW_JACK_PHYSICAL_INSERT,
  SW_KEYPAD_SLIDE,
  SW_LID,
  SW_LINEIN_INSERT,
  SW_LINEOUT_INSERT,
  SW_MACHINE_COVER,
  SW_MICROPHONE_INSERT,
  SW_MUTE_DEVICE,
  SW_PEN_INSERTED,
  SW_RFKILL_ALL,
  SW_ROTATE_LOCK,
  SW_TABLET_MODE,
  SW_VIDEOOUT_INSERT,
} from "./codes.ts";

/** struct virtio_input_absinfo's values. */
export interface AbsInfo {
  min: number;
  max: number;
  fuzz: number;
  flat: number;
  res: number;
}

/** struct virtio_input_devids's values. */
export interface DeviceIds {
  bustype: number;
  vendor: number;
  product: number;
  version: number;
}

/** Everything the configuration space answers for one device. */
export interface InputProfile {
  name: string;
  serial: string;
  ids: DeviceIds;
  /** INPUT_PROP_* bits. */
  props: number[];
  /** Event type -> the codes of that type the device sends. */
  events: Map<number, number[]>;
  /** ABS_* axis -> its range. */
  abs: Map<number, AbsInfo>;
}

/** A bitmap in the configuration space's 128-byte union holds bits 0..1023. */
export const INPUT_BITMAP_BITS = 128 * 8;
/** select/subsel are single bytes: an event type or axis above 255 cannot be asked for. */
export const INPUT_SUBSEL_MAX = 0xff;
/** ABS_MT_SLOT's maximum on crosvm's multi-touch trackpad (defaults.rs). */
export const TRACKPAD_MT_SLOT_MAX = 10;
/** ABS_MT_TRACKING_ID's maximum on crosvm's multi-touch trackpad (defaults.rs). */
export const TRACKPAD_MT_TRACKING_ID_MAX = 65536;
/** ABS_PRESSURE and ABS_MT_PRESSURE's maximum on crosvm's multi-touch trackpad. */
export const TRACKPAD_PRESSURE_MAX = 255;
/** ABS_MT_TOUCH_MAJOR/MINOR's maximum on crosvm's multi-touch trackpad. */
export const TRACKPAD_TOUCH_AXIS_MAX = 4095;
/** ABS_MT_TOOL_TYPE's maximum (MT_TOOL_PALM, linux/input.h) on crosvm's multi-touch trackpad. */
export const TRACKPAD_TOOL_TYPE_MAX = 2;

/** The input kinds whose description follows crosvm's, with the custom kind. */
export const PROFILE_KINDS = ["switches", "rotary", "trackpad", "multi-touch-trackpad", "custom"] as const;
export type ProfileKind = typeof PROFILE_KINDS[number];

/** crosvm's device ids for its socket-fed input devices: all zero. */
const NO_IDS: DeviceIds = { bustype: 0, vendor: 0, product: 0, version: 0 };

const abs = (min: number, max: number, fuzz = 0, flat = 0): AbsInfo => ({ min, max, fuzz, flat, res: 0 });

/** crosvm's switches device: every switch Linux defines up to SW_MACHINE_COVER. */
export function switchesProfile(index: number): InputProfile {
  return {
    name: `Crosvm Virtio Switches ${index}`,
    serial: `virtio-switches-${index}`,
    ids: NO_IDS,
    props: [],
    events: new Map([[EV_SW, [
      SW_LID,
      SW_TABLET_MODE,
      SW_HEADPHONE_INSERT,
      SW_RFKILL_ALL,
      SW_MICROPHONE_INSERT,
      SW_DOCK,
      SW_LINEOUT_INSERT,
      SW_JACK_PHYSICAL_INSERT,
      SW_VIDEOOUT_INSERT,
      SW_CAMERA_LENS_COVER,
      SW_KEYPAD_SLIDE,
      SW_FRONT_PROXIMITY,
      SW_ROTATE_LOCK,
      SW_LINEIN_INSERT,
      SW_MUTE_DEVICE,
      SW_PEN_INSERTED,
      SW_MACHINE_COVER,
    ]]]),
    abs: new Map(),
  };
}

/** crosvm's rotary device: a wheel (REL_WHEEL) and nothing else. */
export function rotaryProfile(index: number): InputProfile {
  return {
    name: `Crosvm Virtio Rotary ${index}`,
    serial: `virtio-rotary-${index}`,
    ids: NO_IDS,
    props: [],
    events: new Map([[EV_REL, [REL_WHEEL]]]),
    abs: new Map(),
  };
}

/** crosvm's trackpad: one finger, two buttons, X and Y from 0 to width and height. */
export function trackpadProfile(index: number, width: number, height: number, name?: string): InputProfile {
  return {
    name: name ?? `Crosvm Virtio Trackpad ${index}`,
    serial: `virtio-trackpad-${index}`,
    ids: NO_IDS,
    props: [],
    events: new Map([
      [EV_KEY, [BTN_TOOL_FINGER, BTN_TOUCH, BTN_LEFT, BTN_RIGHT]],
      [EV_ABS, [ABS_X, ABS_Y]],
    ]),
    abs: new Map([[ABS_X, abs(0, width)], [ABS_Y, abs(0, height)]]),
  };
}

/** crosvm's multi-touch trackpad: a button pad with slots, pressure, contact size and tool type. */
export function multiTouchTrackpadProfile(index: number, width: number, height: number, name?: string): InputProfile {
  return {
    name: name ?? `Crosvm Virtio Multi-touch Trackpad ${index}`,
    serial: `virtio-multi-touch-trackpad-${index}`,
    ids: NO_IDS,
    props: [INPUT_PROP_POINTER, INPUT_PROP_BUTTONPAD],
    events: new Map([
      [EV_KEY, [BTN_TOUCH, BTN_TOOL_FINGER, BTN_TOOL_DOUBLETAP, BTN_TOOL_TRIPLETAP, BTN_TOOL_QUADTAP, BTN_LEFT]],
      [EV_ABS, [
        ABS_MT_SLOT,
        ABS_MT_TRACKING_ID,
        ABS_MT_POSITION_X,
        ABS_MT_POSITION_Y,
        ABS_MT_TOOL_TYPE,
        ABS_MT_PRESSURE,
        ABS_X,
        ABS_Y,
        ABS_PRESSURE,
        ABS_MT_TOUCH_MAJOR,
        ABS_MT_TOUCH_MINOR,
      ]],
    ]),
    abs: new Map([
      [ABS_MT_SLOT, abs(0, TRACKPAD_MT_SLOT_MAX)],
      [ABS_MT_TRACKING_ID, abs(0, TRACKPAD_MT_TRACKING_ID_MAX)],
      [ABS_MT_PRESSURE, abs(0, TRACKPAD_PRESSURE_MAX)],
      [ABS_PRESSURE, abs(0, TRACKPAD_PRESSURE_MAX)],
      [ABS_MT_TOUCH_MAJOR, abs(0, TRACKPAD_TOUCH_AXIS_MAX)],
      [ABS_MT_TOUCH_MINOR, abs(0, TRACKPAD_TOUCH_AXIS_MAX)],
      [ABS_X, abs(0, width)],
      [ABS_Y, abs(0, height)],
      [ABS_MT_POSITION_X, abs(0, width)],
      [ABS_MT_TOOL_TYPE, abs(0, TRACKPAD_TOOL_TYPE_MAX)],
      [ABS_MT_POSITION_Y, abs(0, height)],
    ]),
  };
}

// ---- The custom kind's JSON file ----

/** A custom device's configuration file could not be used; the message is one line naming the problem. */
export class InputConfigFileError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "InputConfigFileError";
  }
}

/** One entry of "events". */
export interface CustomEventConfig {
  eventType: string;
  eventTypeCode: number;
  supportedEvents: Record<string, number>;
}

/** One entry of "axis_info". */
export interface CustomAxisConfig {
  axis: string;
  axisCode: number;
  min: number;
  max: number;
  fuzz: number;
  flat: number;
}

/** A parsed configuration file, as written (labels kept, so it can be written back). */
export interface CustomInputConfig {
  name?: string;
  serialName?: string;
  properties: Record<string, number>;
  events: CustomEventConfig[];
  axisInfo: CustomAxisConfig[];
}

/** crosvm's names when the file gives none. */
export const CUSTOM_DEFAULT_NAME = "Crosvm Virtio Custom";
export const CUSTOM_DEFAULT_SERIAL = "virtio-custom";
const U16_MAX = 0xffff;
const U32_MAX = 0xffff_ffff;

function fail(msg: string): never {
  throw new InputConfigFileError(msg);
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function integer(v: unknown, what: string, max: number): number {
  if (typeof v !== "number" || !Number.isInteger(v) || v < 0 || v > max) {
    fail(`${what} is ${JSON.stringify(v) ?? "missing"}, not an integer 0..${max}`);
  }
  return v;
}

function text(v: unknown, what: string): string {
  if (typeof v !== "string") fail(`${what} is ${JSON.stringify(v) ?? "missing"}, not a string`);
  return v;
}

/** A label -> bit map whose bits fit the configuration space's bitmap. */
function bitMap(v: unknown, what: string): Record<string, number> {
  if (!isObject(v)) fail(`${what} is not an object of name: number pairs`);
  const out: Record<string, number> = {};
  for (const [label, bit] of Object.entries(v)) {
    out[label] = integer(bit, `${what} "${label}"`, U16_MAX);
    if (bit as number >= INPUT_BITMAP_BITS) fail(`${what} "${label}" is ${bit}: bits stop at ${INPUT_BITMAP_BITS - 1}`);
  }
  return out;
}

/** Parse a custom device's configuration file (the text of the JSON file). */
export function parseCustomInputConfig(source: string): CustomInputConfig {
  let json: unknown;
  try {
    json = JSON.parse(source);
  } catch (e) {
    fail(`not JSON: ${(e as Error).message.split("\n")[0]}`);
  }
  if (!isObject(json)) fail("the top level is not a JSON object");
  const config: CustomInputConfig = { properties: {}, events: [], axisInfo: [] };
  if (json.name !== undefined && json.name !== null) config.name = text(json.name, '"name"');
  if (json.serial_name !== undefined && json.serial_name !== null) {
    config.serialName = text(json.serial_name, '"serial_name"');
  }
  if (json.properties !== undefined) config.properties = bitMap(json.properties, '"properties"');
  if (!Array.isArray(json.events)) fail('"events" is missing or not an array');
  const seen = new Set<number>();
  json.events.forEach((e, i) => {
    const at = `"events"[${i}]`;
    if (!isObject(e)) fail(`${at} is not an object`);
    const eventType = text(e.event_type, `${at}.event_type`);
    const eventTypeCode = integer(e.event_type_code, `${at}.event_type_code`, U16_MAX);
    if (eventTypeCode > INPUT_SUBSEL_MAX) {
      fail(`${at}.event_type_code ${eventTypeCode} is above ${INPUT_SUBSEL_MAX}: no guest can ask for it`);
    }
    if (seen.has(eventTypeCode)) fail(`event type ${eventType} (${eventTypeCode}) is defined twice`);
    seen.add(eventTypeCode);
    const supportedEvents = bitMap(e.supported_events, `${at}.supported_events`);
    config.events.push({ eventType, eventTypeCode, supportedEvents });
  });
  if (json.axis_info !== undefined) {
    if (!Array.isArray(json.axis_info)) fail('"axis_info" is not an array');
    json.axis_info.forEach((a, i) => {
      const at = `"axis_info"[${i}]`;
      if (!isObject(a)) fail(`${at} is not an object`);
      const axisCode = integer(a.axis_code, `${at}.axis_code`, U16_MAX);
      if (axisCode > INPUT_SUBSEL_MAX) {
        fail(`${at}.axis_code ${axisCode} is above ${INPUT_SUBSEL_MAX}: no guest can ask for it`);
      }
      config.axisInfo.push({
        axis: text(a.axis, `${at}.axis`),
        axisCode,
        min: integer(a.min, `${at}.min`, U32_MAX),
        max: integer(a.max, `${at}.max`, U32_MAX),
        fuzz: a.fuzz === undefined ? 0 : integer(a.fuzz, `${at}.fuzz`, U32_MAX),
        flat: a.flat === undefined ? 0 : integer(a.flat, `${at}.flat`, U32_MAX),
      });
    });
  }
  return config;
}

/** The configuration file's text for `config` (parseCustomInputConfig gives `config` back). */
export function formatCustomInputConfig(config: CustomInputConfig): string {
  const out: Record<string, unknown> = {};
  if (config.name !== undefined) out.name = config.name;
  if (config.serialName !== undefined) out.serial_name = config.serialName;
  out.properties = config.properties;
  out.events = config.events.map((e) => ({
    event_type: e.eventType,
    event_type_code: e.eventTypeCode,
    supported_events: e.supportedEvents,
  }));
  out.axis_info = config.axisInfo.map((a) => ({
    axis: a.axis,
    axis_code: a.axisCode,
    min: a.min,
    max: a.max,
    fuzz: a.fuzz,
    flat: a.flat,
  }));
  return JSON.stringify(out, null, 2) + "\n";
}

/**
 * The device a configuration file describes, as crosvm builds it: the name and serial get the custom
 * device's index (" 0", "-0"), an axis listed twice keeps its last range.
 */
export function customProfile(config: CustomInputConfig, index: number): InputProfile {
  return {
    name: `${config.name ?? CUSTOM_DEFAULT_NAME} ${index}`,
    serial: `${config.serialName ?? CUSTOM_DEFAULT_SERIAL}-${index}`,
    ids: NO_IDS,
    props: Object.values(config.properties),
    events: new Map(config.events.map((e) => [e.eventTypeCode, Object.values(e.supportedEvents)])),
    abs: new Map(config.axisInfo.map((a) => [a.axisCode, abs(a.min, a.max, a.fuzz, a.flat)])),
  };
}
