// virtio-input (virtio 1.2 spec, section 5.8; Linux include/uapi/linux/virtio_input.h and
// drivers/virtio/virtio_input.c). The device describes an evdev device through its configuration
// space (the driver writes select/subsel and reads size and the union) and sends
// struct virtio_input_event records on the event queue, one per driver buffer, each batch ending
// with EV_SYN/SYN_REPORT. The status queue carries events from the guest (keyboard LEDs); they are
// accepted and recorded, nothing more.
//
// The host injects events through the API (sendKey, type, move, click, moveTo, tap, touch*...), or a
// host event source forwards them as they come (forwardEvents: crosvm's `--input TYPE[path=SOCKET]`,
// socket_source.ts); status events from the guest go back to that source. Events wait in a bounded queue
// until the guest has posted event buffers.
//
// keyboard, mouse, single-touch and multi-touch describe themselves as denovm's devices; switches,
// rotary, trackpad, multi-touch-trackpad and custom as crosvm's (profiles.ts).

import {
  type ActivateContext,
  featuresField,
  queuesQuiescent,
  readConfigSpace,
  serveQueue,
  stateCounters,
  stateInteger,
  VIRTIO_COMMON_FEATURES,
  VIRTIO_ID_INPUT,
  type VirtioDevice,
} from "../device.ts";
import { type Virtqueue } from "../queue.ts";
import { RateLimitedLog } from "../../../core/log.ts";
import {
  type DeviceState,
  stateArray,
  stateData,
  StateError,
  type Stateful,
  stateRecord,
  stateString,
} from "../../../core/state.ts";
import {
  ABS_MT_POSITION_X,
  ABS_MT_POSITION_Y,
  ABS_MT_SLOT,
  ABS_MT_TRACKING_ID,
  ABS_X,
  ABS_Y,
  BTN_LEFT,
  BTN_MIDDLE,
  BTN_RIGHT,
  BTN_TOUCH,
  EV_ABS,
  EV_KEY,
  EV_LED,
  EV_REL,
  EV_REP,
  EV_SYN,
  INPUT_PROP_DIRECT,
  INPUT_PROP_POINTER,
  KEY_0,
  KEY_1,
  KEY_2,
  KEY_3,
  KEY_4,
  KEY_5,
  KEY_6,
  KEY_7,
  KEY_8,
  KEY_9,
  KEY_A,
  KEY_APOSTROPHE,
  KEY_B,
  KEY_BACKSLASH,
  KEY_C,
  KEY_COMMA,
  KEY_D,
  KEY_DOT,
  KEY_E,
  KEY_ENTER,
  KEY_EQUAL,
  KEY_ESC,
  KEY_F,
  KEY_G,
  KEY_GRAVE,
  KEY_H,
  KEY_I,
  KEY_J,
  KEY_K,
  KEY_L,
  KEY_LEFTBRACE,
  KEY_LEFTSHIFT,
  KEY_M,
  KEY_MINUS,
  KEY_N,
  KEY_O,
  KEY_P,
  KEY_Q,
  KEY_R,
  KEY_RIGHTBRACE,
  KEY_S,
  KEY_SEMICOLON,
  KEY_SLASH,
  KEY_SPACE,
  KEY_T,
  KEY_TAB,
  KEY_U,
  KEY_V,
  KEY_W,
  KEY_X,
  KEY_Y,
  KEY_Z,
  LED_CAPSL,
  LED_NUML,
  LED_SCROLLL,
  REL_WHEEL,
  REL_X,
  REL_Y,
  SYN_REPORT,
} from "./codes.ts";
import { MT_TRACKING_ID_MAX, MT_TRACKING_ID_NONE, MultiTouchSlots } from "./multitouch.ts";
import {
  type AbsInfo,
  type CustomInputConfig,
  customProfile,
  type DeviceIds,
  INPUT_BITMAP_BITS,
  type InputProfile,
  multiTouchTrackpadProfile,
  PROFILE_KINDS,
  type ProfileKind,
  rotaryProfile,
  switchesProfile,
  trackpadProfile,
} from "./profiles.ts";

// ---- virtio_input.h ----

/** enum virtio_input_config_select. */
export const VIRTIO_INPUT_CFG_UNSET = 0x00;
export const VIRTIO_INPUT_CFG_ID_NAME = 0x01;
export const VIRTIO_INPUT_CFG_ID_SERIAL = 0x02;
export const VIRTIO_INPUT_CFG_ID_DEVIDS = 0x03;
export const VIRTIO_INPUT_CFG_PROP_BITS = 0x10;
export const VIRTIO_INPUT_CFG_EV_BITS = 0x11;
export const VIRTIO_INPUT_CFG_ABS_INFO = 0x12;

/** struct virtio_input_config: u8 select, u8 subsel, u8 size, u8 reserved[5], then a 128-byte union. */
export const INPUT_CFG_SELECT = 0;
export const INPUT_CFG_SUBSEL = 1;
export const INPUT_CFG_SIZE = 2;
export const INPUT_CFG_UNION = 8;
export const INPUT_CFG_UNION_BYTES = 128;
export const INPUT_CONFIG_SIZE = INPUT_CFG_UNION + INPUT_CFG_UNION_BYTES;
/** struct virtio_input_absinfo: le32 min, max, fuzz, flat, res. */
export const INPUT_ABSINFO_MIN = 0;
export const INPUT_ABSINFO_MAX = 4;
export const INPUT_ABSINFO_FUZZ = 8;
export const INPUT_ABSINFO_FLAT = 12;
export const INPUT_ABSINFO_RES = 16;
export const INPUT_ABSINFO_SIZE = 20;
/** struct virtio_input_devids: le16 bustype, vendor, product, version. */
export const INPUT_DEVIDS_BUSTYPE = 0;
export const INPUT_DEVIDS_VENDOR = 2;
export const INPUT_DEVIDS_PRODUCT = 4;
export const INPUT_DEVIDS_VERSION = 6;
export const INPUT_DEVIDS_SIZE = 8;
/** struct virtio_input_event: le16 type, le16 code, le32 value. */
export const INPUT_EVENT_SIZE = 8;
export const INPUT_EVENT_TYPE = 0;
export const INPUT_EVENT_CODE = 2;
export const INPUT_EVENT_VALUE = 4;

/** BUS_VIRTUAL (linux/input.h): the bus type a virtual device reports. */
export const BUS_VIRTUAL = 0x06;

/** Queues (section 5.8.2): 0 eventq (device to driver), 1 statusq (driver to device). */
export const INPUT_EVENT_QUEUE = 0;
export const INPUT_STATUS_QUEUE = 1;
export const INPUT_QUEUE_SIZE = 64;
/** Events held for the guest before new batches are dropped. */
export const INPUT_MAX_PENDING_EVENTS = 4096;
/** Touch slots a multi-touch device offers (as crosvm: ABS_MT_SLOT 0..9). */
export const INPUT_MT_SLOTS = 10;
/** Touch surface size when none is given (crosvm's default touch screen size). */
export const INPUT_DEFAULT_WIDTH = 1280;
export const INPUT_DEFAULT_HEIGHT = 1024;
/** The largest width or height: an ABS_INFO range's max is a signed 32-bit value (struct virtio_input_absinfo). */
export const INPUT_MAX_DIMENSION = 0x7fff_ffff;
/** Product ids denovm reports per kind of its own (vendor 0: no vendor). */
const PRODUCT_IDS = { keyboard: 1, mouse: 2, "single-touch": 3, "multi-touch": 4 } as const;

export type InputDeviceKind = keyof typeof PRODUCT_IDS | ProfileKind;
export const INPUT_DEVICE_KINDS: readonly InputDeviceKind[] = [
  ...Object.keys(PRODUCT_IDS) as (keyof typeof PRODUCT_IDS)[],
  ...PROFILE_KINDS,
];

export interface InputOptions {
  kind: InputDeviceKind;
  /** Touch surface size (touch and trackpad kinds). */
  width?: number;
  height?: number;
  /** ID_NAME reported to the guest. */
  name?: string;
  /** ID_SERIAL reported to the guest. */
  serial?: string;
  /** The device's number among the devices of its kind (crosvm's names and serials end with it). */
  index?: number;
  /** The custom kind's description (profiles.ts parseCustomInputConfig). */
  custom?: CustomInputConfig;
}

/** Something feeding the device from the host (socket_source.ts); closed with the device. */
export interface InputEventSource {
  close(): void;
}

/** One evdev event. */
export interface InputEvent {
  type: number;
  code: number;
  value: number;
}

/** A US keyboard layout: character -> [key code, shift]. */
export const US_LAYOUT: ReadonlyMap<string, readonly [number, boolean]> = (() => {
  const m = new Map<string, readonly [number, boolean]>();
  const letters = [
    KEY_A,
    KEY_B,
    KEY_C,
    KEY_D,
    KEY_E,
    KEY_F,
    KEY_G,
    KEY_H,
    KEY_I,
    KEY_J,
    KEY_K,
    KEY_L,
    KEY_M,
    KEY_N,
    KEY_O,
    KEY_P,
    KEY_Q,
    KEY_R,
    KEY_S,
    KEY_T,
    KEY_U,
    KEY_V,
    KEY_W,
    KEY_X,
    KEY_Y,
    KEY_Z,
  ];
  letters.forEach((k, i) => {
    m.set(String.fromCharCode(0x61 + i), [k, false]);
    m.set(String.fromCharCode(0x41 + i), [k, true]);
  });
  const digits = [KEY_0, KEY_1, KEY_2, KEY_3, KEY_4, KEY_5, KEY_6, KEY_7, KEY_8, KEY_9];
  digits.forEach((k, i) => m.set(String(i), [k, false]));
  ")!@#$%^&*(".split("").forEach((c, i) => m.set(c, [digits[i], true]));
  const pairs: [string, string, number][] = [
    ["-", "_", KEY_MINUS],
    ["=", "+", KEY_EQUAL],
    ["[", "{", KEY_LEFTBRACE],
    ["]", "}", KEY_RIGHTBRACE],
    ["\\", "|", KEY_BACKSLASH],
    [";", ":", KEY_SEMICOLON],
    ["'", '"', KEY_APOSTROPHE],
    ["`", "~", KEY_GRAVE],
    [",", "<", KEY_COMMA],
    [".", ">", KEY_DOT],
    ["/", "?", KEY_SLASH],
  ];
  for (const [plain, shifted, k] of pairs) {
    m.set(plain, [k, false]);
    m.set(shifted, [k, true]);
  }
  m.set(" ", [KEY_SPACE, false]);
  m.set("\n", [KEY_ENTER, false]);
  m.set("\t", [KEY_TAB, false]);
  m.set("\x1b", [KEY_ESC, false]);
  return m;
})();

/** Highest key code a keyboard announces: the first 256 codes (KEY_RESERVED 0 excluded), as a PC keyboard. */
const KEYBOARD_LAST_KEY = 0xff;

/** A bitmap (little-endian bit order, as the kernel's bitmaps) with the given bits set, just long enough. */
function bitmap(bits: number[]): Uint8Array {
  const inRange = bits.filter((b) => b >= 0 && b < INPUT_BITMAP_BITS);
  const len = inRange.length === 0 ? 0 : Math.floor(Math.max(...inRange) / 8) + 1;
  const b = new Uint8Array(len);
  for (const bit of inRange) b[bit >> 3] |= 1 << (bit & 7);
  return b;
}

interface Capabilities {
  ids: DeviceIds;
  props: Uint8Array;
  /** Event type -> the bitmap of its codes, as the configuration space answers it. */
  events: Map<number, Uint8Array>;
  /** The EV_KEY codes the device announces. */
  keys: Set<number>;
  abs: Map<number, AbsInfo>;
}

const STAT_NAMES = ["eventsSent", "batchesQueued", "batchesDropped", "statusEvents", "malformed"] as const;
type StatName = typeof STAT_NAMES[number];

/** The identity fields a refused restore names (kind, name, serial, width, height; not the description). */
const IDENTITY_SHOWN = 5;

/** The kind and layout version of a virtio-input device's saved state. */
export const INPUT_STATE_TYPE = "virtio-input";
export const INPUT_STATE_VERSION = 1;

export class InputDevice implements VirtioDevice, Stateful {
  readonly deviceType = VIRTIO_ID_INPUT;
  readonly name = "input";
  readonly queueMaxSizes: readonly number[] = [INPUT_QUEUE_SIZE, INPUT_QUEUE_SIZE];
  readonly features = VIRTIO_COMMON_FEATURES;
  readonly kind: InputDeviceKind;
  readonly width: number;
  readonly height: number;
  readonly deviceName: string;
  readonly serial: string;
  readonly index: number;
  readonly #caps: Capabilities;
  /** A summary of the whole description, saved with the state so a restore finds the same device. */
  readonly #fingerprint: string;
  readonly #sources: InputEventSource[] = [];
  /** Where status events from the guest go besides `leds` (the host event source, as crosvm). */
  statusSink: ((e: InputEvent) => void) | undefined;
  /** Waiting for room in the pending queue (forwardEvents callers). */
  #roomWaiters: (() => void)[] = [];
  #select = VIRTIO_INPUT_CFG_UNSET;
  #subsel = 0;
  #eventq: Virtqueue | undefined;
  #statusq: Virtqueue | undefined;
  #interrupt: ActivateContext["interrupt"] | undefined;
  /** Events waiting for guest buffers, whole batches only. */
  readonly #pending: InputEvent[] = [];
  /** LED states the guest reported on the status queue (code -> value). */
  readonly leds = new Map<number, number>();
  /** Multi-touch: each slot's contact. */
  readonly #touch = new MultiTouchSlots(INPUT_MT_SLOTS);
  readonly #log = new RateLimitedLog("virtio-input");
  readonly #stats: Record<StatName, number> = Object.fromEntries(STAT_NAMES.map((n) => [n, 0])) as Record<
    StatName,
    number
  >;

  constructor(opts: InputOptions) {
    if (!INPUT_DEVICE_KINDS.includes(opts.kind)) throw new Error(`input: unknown kind "${opts.kind}"`);
    this.kind = opts.kind;
    this.width = opts.width ?? INPUT_DEFAULT_WIDTH;
    this.height = opts.height ?? INPUT_DEFAULT_HEIGHT;
    for (const [what, v] of [["width", this.width], ["height", this.height]] as const) {
      if (!Number.isInteger(v) || v < 1 || v > INPUT_MAX_DIMENSION) throw new Error(`input: ${what} ${v} out of range`);
    }
    this.index = opts.index ?? 0;
    if (!Number.isInteger(this.index) || this.index < 0) throw new Error(`input: index ${this.index} out of range`);
    if (this.kind === "custom" && !opts.custom) throw new Error("input: a custom device needs its configuration");
    const profile = this.#profile(opts);
    this.deviceName = opts.name ?? profile.name;
    this.serial = opts.serial ?? profile.serial;
    const events = new Map<number, Uint8Array>();
    for (const [type, codes] of profile.events) {
      // An event type without codes (a keyboard's EV_REP) answers one zero byte: the driver only checks
      // that the answer is not empty (virtio_input.c). A custom file's empty list answers nothing, as crosvm.
      events.set(type, codes.length === 0 && this.kind !== "custom" ? new Uint8Array(1) : bitmap(codes));
    }
    this.#caps = {
      ids: profile.ids,
      props: bitmap(profile.props),
      events,
      keys: new Set(profile.events.get(EV_KEY) ?? []),
      abs: profile.abs,
    };
    this.#fingerprint = JSON.stringify({
      ids: profile.ids,
      props: [...this.#caps.props],
      events: [...events].map(([t, b]) => [t, [...b]]),
      abs: [...profile.abs],
    });
  }

  /** What the device describes: denovm's own kinds here, crosvm's in profiles.ts. */
  #profile(opts: InputOptions): InputProfile {
    switch (this.kind) {
      case "switches":
        return switchesProfile(this.index);
      case "rotary":
        return rotaryProfile(this.index);
      case "trackpad":
        return trackpadProfile(this.index, this.width, this.height);
      case "multi-touch-trackpad":
        return multiTouchTrackpadProfile(this.index, this.width, this.height);
      case "custom":
        return customProfile(opts.custom!, this.index);
    }
    const events = new Map<number, number[]>();
    const abs = new Map<number, AbsInfo>();
    const props: number[] = [];
    const range = (max: number): AbsInfo => ({ min: 0, max, fuzz: 0, flat: 0, res: 0 });
    const xy = () => {
      abs.set(ABS_X, range(this.width - 1));
      abs.set(ABS_Y, range(this.height - 1));
    };
    switch (this.kind) {
      case "keyboard":
        events.set(EV_KEY, Array.from({ length: KEYBOARD_LAST_KEY }, (_, i) => i + 1));
        events.set(EV_REP, []);
        events.set(EV_LED, [LED_NUML, LED_CAPSL, LED_SCROLLL]);
        break;
      case "mouse":
        props.push(INPUT_PROP_POINTER);
        events.set(EV_KEY, [BTN_LEFT, BTN_RIGHT, BTN_MIDDLE]);
        events.set(EV_REL, [REL_X, REL_Y, REL_WHEEL]);
        break;
      case "single-touch":
        props.push(INPUT_PROP_DIRECT);
        events.set(EV_KEY, [BTN_TOUCH]);
        xy();
        break;
      case "multi-touch":
        props.push(INPUT_PROP_DIRECT);
        events.set(EV_KEY, [BTN_TOUCH]);
        xy();
        abs.set(ABS_MT_SLOT, range(INPUT_MT_SLOTS - 1));
        abs.set(ABS_MT_TRACKING_ID, range(MT_TRACKING_ID_MAX));
        abs.set(ABS_MT_POSITION_X, range(this.width - 1));
        abs.set(ABS_MT_POSITION_Y, range(this.height - 1));
        break;
    }
    if (abs.size > 0) events.set(EV_ABS, [...abs.keys()]);
    return {
      name: `denovm virtio ${this.kind}`,
      serial: `denovm-${this.kind}`,
      ids: { bustype: BUS_VIRTUAL, vendor: 0, product: PRODUCT_IDS[this.kind], version: 1 },
      props,
      events,
      abs,
    };
  }

  // ---- Configuration space ----

  /** The union's answer for the current select/subsel (its length is the `size` field). */
  #answer(): Uint8Array {
    const enc = new TextEncoder();
    switch (this.#select) {
      case VIRTIO_INPUT_CFG_ID_NAME:
        return this.#subsel === 0 ? enc.encode(this.deviceName).subarray(0, INPUT_CFG_UNION_BYTES) : new Uint8Array();
      case VIRTIO_INPUT_CFG_ID_SERIAL:
        return this.#subsel === 0 ? enc.encode(this.serial).subarray(0, INPUT_CFG_UNION_BYTES) : new Uint8Array();
      case VIRTIO_INPUT_CFG_ID_DEVIDS: {
        if (this.#subsel !== 0) return new Uint8Array();
        const b = new Uint8Array(INPUT_DEVIDS_SIZE);
        const v = new DataView(b.buffer);
        const ids = this.#caps.ids;
        v.setUint16(INPUT_DEVIDS_BUSTYPE, ids.bustype, true);
        v.setUint16(INPUT_DEVIDS_VENDOR, ids.vendor, true);
        v.setUint16(INPUT_DEVIDS_PRODUCT, ids.product, true);
        v.setUint16(INPUT_DEVIDS_VERSION, ids.version, true);
        return b;
      }
      case VIRTIO_INPUT_CFG_PROP_BITS:
        return this.#subsel === 0 ? this.#caps.props : new Uint8Array();
      case VIRTIO_INPUT_CFG_EV_BITS:
        // Subsel 0 (EV_SYN) answers the event types themselves, as EVIOCGBIT(0) does (crosvm too).
        if (this.#subsel === EV_SYN) return bitmap([...this.#caps.events.keys()]);
        return this.#caps.events.get(this.#subsel) ?? new Uint8Array();
      case VIRTIO_INPUT_CFG_ABS_INFO: {
        const a = this.#caps.abs.get(this.#subsel);
        if (!a) return new Uint8Array();
        const b = new Uint8Array(INPUT_ABSINFO_SIZE);
        const v = new DataView(b.buffer);
        v.setInt32(INPUT_ABSINFO_MIN, a.min, true);
        v.setInt32(INPUT_ABSINFO_MAX, a.max, true);
        v.setInt32(INPUT_ABSINFO_FUZZ, a.fuzz, true);
        v.setInt32(INPUT_ABSINFO_FLAT, a.flat, true);
        v.setInt32(INPUT_ABSINFO_RES, a.res, true);
        return b;
      }
      default:
        return new Uint8Array();
    }
  }

  readConfig(offset: number, data: Uint8Array): void {
    const cfg = new Uint8Array(INPUT_CONFIG_SIZE);
    cfg[INPUT_CFG_SELECT] = this.#select;
    cfg[INPUT_CFG_SUBSEL] = this.#subsel;
    const answer = this.#answer();
    cfg[INPUT_CFG_SIZE] = answer.length;
    cfg.set(answer, INPUT_CFG_UNION);
    readConfigSpace(cfg, offset, data);
  }

  writeConfig(offset: number, data: Uint8Array): void {
    // Only select and subsel are writable (section 5.8.4). Some front ends (QEMU's vhost-user-input)
    // write the whole structure back: the other bytes are ignored.
    let writable = false;
    for (let i = 0; i < data.length; i++) {
      const at = offset + i;
      if (at === INPUT_CFG_SELECT) this.#select = data[i];
      else if (at === INPUT_CFG_SUBSEL) this.#subsel = data[i];
      else continue;
      writable = true;
    }
    if (!writable) this.#log.log(`driver wrote ${data.length} read-only config bytes at ${offset}; ignored`);
  }

  // ---- Lifecycle ----

  activate(ctx: ActivateContext): void {
    this.#eventq = ctx.queues[INPUT_EVENT_QUEUE];
    this.#statusq = ctx.queues[INPUT_STATUS_QUEUE];
    this.#interrupt = ctx.interrupt;
    // Serve what was posted before activation (a vhost-user kick may come before the ring is enabled).
    this.#flush();
    this.#drainStatus();
  }

  /** Queues are dropped; events not yet delivered stay queued for the next activation. */
  reset(): void {
    this.#eventq = undefined;
    this.#statusq = undefined;
    this.#interrupt = undefined;
    this.#select = VIRTIO_INPUT_CFG_UNSET;
    this.#subsel = 0;
  }

  close(): void {
    for (const s of this.#sources.splice(0)) s.close();
    this.reset();
    this.#pending.length = 0;
    this.#wakeRoomWaiters();
  }

  /** Close `source` with the device. */
  attachSource(source: InputEventSource): void {
    this.#sources.push(source);
  }

  stats(): Record<string, number> {
    return { ...this.#stats, pendingEvents: this.#pending.length };
  }

  /** Events waiting for guest buffers. */
  get pendingEvents(): number {
    return this.#pending.length;
  }

  queueNotify(index: number): void {
    if (index === INPUT_EVENT_QUEUE) this.#flush();
    else if (index === INPUT_STATUS_QUEUE) this.#drainStatus();
  }

  /** Move pending events into guest buffers, one event per buffer. */
  #flush(): void {
    const q = this.#eventq;
    if (!q) return;
    let used = false;
    while (this.#pending.length > 0) {
      const chain = q.pop();
      if (!chain) break;
      used = true;
      if (chain.writableLength < INPUT_EVENT_SIZE) {
        this.#stats.malformed++;
        this.#log.log(`event buffer of ${chain.writableLength} writable bytes (needs ${INPUT_EVENT_SIZE}); returned`);
        q.addUsed(chain.head, 0);
        continue;
      }
      const e = this.#pending.shift()!;
      const b = new Uint8Array(INPUT_EVENT_SIZE);
      const v = new DataView(b.buffer);
      v.setUint16(INPUT_EVENT_TYPE, e.type, true);
      v.setUint16(INPUT_EVENT_CODE, e.code, true);
      v.setInt32(INPUT_EVENT_VALUE, e.value, true);
      const w = chain.writer();
      w.write(b);
      q.addUsed(chain.head, w.bytesWritten);
      this.#stats.eventsSent++;
    }
    if (used && q.needsInterrupt()) this.#interrupt?.signalUsedQueue(INPUT_EVENT_QUEUE);
    if (used && this.#pending.length < INPUT_MAX_PENDING_EVENTS) this.#wakeRoomWaiters();
  }

  #wakeRoomWaiters(): void {
    for (const w of this.#roomWaiters.splice(0)) w();
  }

  /** Status events from the guest (LEDs): record and return the buffers. */
  #drainStatus(): void {
    const q = this.#statusq;
    if (!q) return;
    serveQueue(q, INPUT_STATUS_QUEUE, this.#interrupt, (chain) => {
      const r = chain.reader();
      while (r.remaining >= INPUT_EVENT_SIZE) {
        const b = r.read(INPUT_EVENT_SIZE);
        const v = new DataView(b.buffer);
        const type = v.getUint16(INPUT_EVENT_TYPE, true);
        const code = v.getUint16(INPUT_EVENT_CODE, true);
        const value = v.getInt32(INPUT_EVENT_VALUE, true);
        this.#stats.statusEvents++;
        if (type === EV_LED) this.leds.set(code, value);
        this.statusSink?.({ type, code, value });
      }
      return 0;
    });
  }

  // ---- Injection API ----

  /**
   * Queue one batch of events (an EV_SYN/SYN_REPORT is appended when the batch does not end with
   * one) and deliver what the guest has buffers for. Returns false when the batch was dropped
   * because the queue of pending events is full.
   */
  sendEvents(events: InputEvent[]): boolean {
    for (const e of events) {
      for (const [what, v, max] of [["type", e.type, 0xffff], ["code", e.code, 0xffff]] as const) {
        if (!Number.isInteger(v) || v < 0 || v > max) throw new RangeError(`input event ${what} ${v} out of range`);
      }
      if (!Number.isInteger(e.value) || e.value < -(2 ** 31) || e.value > 0xffff_ffff) {
        throw new RangeError(`input event value ${e.value} out of range`);
      }
    }
    const batch = events.map((e) => ({ type: e.type, code: e.code, value: e.value | 0 }));
    const last = batch.at(-1);
    if (!last || last.type !== EV_SYN || last.code !== SYN_REPORT) batch.push(syn());
    if (this.#pending.length + batch.length > INPUT_MAX_PENDING_EVENTS) {
      this.#stats.batchesDropped++;
      this.#log.log(`${this.#pending.length} events wait for the guest; batch of ${batch.length} dropped`);
      return false;
    }
    this.#pending.push(...batch);
    this.#stats.batchesQueued++;
    this.#flush();
    return true;
  }

  /** Events the pending queue still takes. */
  get room(): number {
    return INPUT_MAX_PENDING_EVENTS - this.#pending.length;
  }

  /** Resolves once the pending queue has room (at once when it has, or when the device is closed). */
  whenRoom(): Promise<void> {
    if (this.room > 0) return Promise.resolve();
    return new Promise((resolve) => this.#roomWaiters.push(resolve));
  }

  /**
   * Queue events from a host event source exactly as they come (no EV_SYN added: the source batches,
   * as crosvm forwards its socket's events) and deliver what the guest has buffers for. Takes at most
   * `room` events and returns how many it took.
   */
  forwardEvents(events: readonly InputEvent[]): number {
    const n = Math.min(events.length, this.room);
    for (let i = 0; i < n; i++) {
      const e = events[i];
      this.#pending.push({ type: e.type & 0xffff, code: e.code & 0xffff, value: e.value | 0 });
    }
    if (n > 0) this.#flush();
    return n;
  }

  #requireKind(what: string, ...kinds: InputDeviceKind[]): void {
    if (!kinds.includes(this.kind)) {
      throw new Error(`input: ${what} needs a ${kinds.join(" or ")} device, not ${this.kind}`);
    }
  }

  #checkKey(code: number): void {
    if (!this.#caps.keys.has(code)) {
      throw new RangeError(`input: key code ${code} is not announced by this ${this.kind} device`);
    }
  }

  #checkPoint(x: number, y: number): void {
    if (!Number.isInteger(x) || !Number.isInteger(y) || x < 0 || y < 0 || x >= this.width || y >= this.height) {
      throw new RangeError(`input: point (${x}, ${y}) outside ${this.width}x${this.height}`);
    }
  }

  /** Press (down) or release a key or button (an EV_KEY code the device announces). */
  sendKey(code: number, down: boolean): boolean {
    this.#checkKey(code);
    return this.sendEvents([{ type: EV_KEY, code, value: down ? 1 : 0 }]);
  }

  /** Type `text` on a US layout: each character is a press and a release, with shift where needed. */
  type(text: string): boolean {
    this.#requireKind("type", "keyboard");
    const keys = [...text].map((c) => {
      const k = US_LAYOUT.get(c);
      if (!k) throw new RangeError(`input: no US-layout key for ${JSON.stringify(c)}`);
      return k;
    });
    let ok = true;
    for (const [code, shift] of keys) {
      const down: InputEvent[] = [];
      if (shift) down.push({ type: EV_KEY, code: KEY_LEFTSHIFT, value: 1 });
      down.push({ type: EV_KEY, code, value: 1 });
      const up: InputEvent[] = [{ type: EV_KEY, code, value: 0 }];
      if (shift) up.push({ type: EV_KEY, code: KEY_LEFTSHIFT, value: 0 });
      ok = this.sendEvents(down) && ok;
      ok = this.sendEvents(up) && ok;
    }
    return ok;
  }

  /** Relative pointer motion (mouse). */
  move(dx: number, dy: number): boolean {
    this.#requireKind("move", "mouse");
    const ev: InputEvent[] = [];
    if (dx) ev.push({ type: EV_REL, code: REL_X, value: dx });
    if (dy) ev.push({ type: EV_REL, code: REL_Y, value: dy });
    return this.sendEvents(ev);
  }

  /** Wheel clicks (mouse): positive up, negative down. */
  wheel(clicks: number): boolean {
    this.#requireKind("wheel", "mouse");
    return this.sendEvents([{ type: EV_REL, code: REL_WHEEL, value: clicks }]);
  }

  /** Press and release a mouse button (BTN_LEFT by default). */
  click(button: number = BTN_LEFT): boolean {
    this.#requireKind("click", "mouse");
    this.#checkKey(button);
    return this.sendEvents([{ type: EV_KEY, code: button, value: 1 }]) &&
      this.sendEvents([{ type: EV_KEY, code: button, value: 0 }]);
  }

  /** Absolute position (touch kinds; on a multi-touch device, slot 0's contact moves when it is down). */
  moveTo(x: number, y: number): boolean {
    this.#requireKind("moveTo", "single-touch", "multi-touch");
    this.#checkPoint(x, y);
    const ev: InputEvent[] = [];
    if (this.kind === "multi-touch" && this.#touch.isDown(0)) ev.push(...this.#touch.move(0, x, y));
    ev.push({ type: EV_ABS, code: ABS_X, value: x }, { type: EV_ABS, code: ABS_Y, value: y });
    return this.sendEvents(ev);
  }

  /** Touch at (x, y) and lift (touch kinds). */
  tap(x: number, y: number): boolean {
    this.#requireKind("tap", "single-touch", "multi-touch");
    this.#checkPoint(x, y);
    if (this.kind === "multi-touch") return this.touchDown(0, x, y) && this.touchUp(0);
    return this.sendEvents([
      { type: EV_ABS, code: ABS_X, value: x },
      { type: EV_ABS, code: ABS_Y, value: y },
      { type: EV_KEY, code: BTN_TOUCH, value: 1 },
    ]) && this.sendEvents([{ type: EV_KEY, code: BTN_TOUCH, value: 0 }]);
  }

  #checkSlot(slot: number): void {
    this.#requireKind("touch slots", "multi-touch");
    if (!Number.isInteger(slot) || slot < 0 || slot >= INPUT_MT_SLOTS) {
      throw new RangeError(`input: slot ${slot} outside 0..${INPUT_MT_SLOTS - 1}`);
    }
  }

  /** Put a contact down in `slot` (multi-touch, protocol B: Documentation/input/multi-touch-protocol.rst). */
  touchDown(slot: number, x: number, y: number): boolean {
    this.#checkSlot(slot);
    this.#checkPoint(x, y);
    return this.sendEvents(this.#touch.down(slot, x, y));
  }

  /** Move the contact in `slot` (it must be down). */
  touchMove(slot: number, x: number, y: number): boolean {
    this.#checkSlot(slot);
    this.#checkPoint(x, y);
    if (!this.#touch.isDown(slot)) throw new Error(`input: slot ${slot} has no contact`);
    return this.sendEvents(this.#touch.move(slot, x, y));
  }

  /** Lift the contact in `slot`. */
  touchUp(slot: number): boolean {
    this.#checkSlot(slot);
    if (!this.#touch.isDown(slot)) return true;
    return this.sendEvents(this.#touch.up(slot));
  }

  // ---- Device state (core/state.ts) ----

  /** False while a buffer is taken from a queue and not yet returned. */
  quiescent(): boolean {
    return queuesQuiescent([this.#eventq, this.#statusq]);
  }

  /**
   * What the device describes (kind, names, surface), the driver's config selection, the events
   * waiting for guest buffers (type, code, value triples), the LEDs, the touch contacts and the counters.
   */
  saveState(): DeviceState {
    return {
      type: INPUT_STATE_TYPE,
      version: INPUT_STATE_VERSION,
      data: {
        features: featuresField(this.features),
        identity: this.#identity(),
        select: this.#select,
        subsel: this.#subsel,
        pending: this.#pending.flatMap((e) => [e.type, e.code, e.value]),
        leds: [...this.leds].flat(),
        slots: [...this.#touch.trackingIds],
        nextTrackingId: this.#touch.nextTrackingId,
        stats: { ...this.#stats },
      },
    };
  }

  /** What a saved state must have been taken from: kind, names, surface and the whole description. */
  #identity(): string[] {
    return [this.kind, this.deviceName, this.serial, String(this.width), String(this.height), this.#fingerprint];
  }

  restoreState(state: DeviceState): void {
    const d = stateRecord(stateData(state, INPUT_STATE_TYPE, INPUT_STATE_VERSION), "virtio-input state");
    const what = `virtio-input ${this.kind}`;
    if (this.#eventq || this.#statusq) throw new StateError(`${what}: restore into a device a driver has activated`);
    const features = stateString(d.features, `${what} features`);
    const identity = stateArray(d.identity, `${what} identity`).map((v) => stateString(v, `${what} identity`));
    const mine = this.#identity();
    if (features !== featuresField(this.features) || identity.join("\0") !== mine.join("\0")) {
      const shown = (id: string[]) => id.slice(0, IDENTITY_SHOWN).join(", ");
      throw new StateError(`${what}: saved from another device (${shown(identity)}); this one is ${shown(mine)}`);
    }
    const select = stateInteger(d.select, `${what} select`, 0, 0xff);
    const subsel = stateInteger(d.subsel, `${what} subsel`, 0, 0xff);
    const flat = stateArray(d.pending, `${what} pending`);
    if (flat.length % 3 !== 0 || flat.length / 3 > INPUT_MAX_PENDING_EVENTS) {
      throw new StateError(
        `${what}: ${flat.length} pending numbers are not at most ${INPUT_MAX_PENDING_EVENTS} events`,
      );
    }
    const pending: InputEvent[] = [];
    for (let i = 0; i < flat.length; i += 3) {
      pending.push({
        type: stateInteger(flat[i], `${what} pending type`, 0, 0xffff),
        code: stateInteger(flat[i + 1], `${what} pending code`, 0, 0xffff),
        value: stateInteger(flat[i + 2], `${what} pending value`, -(2 ** 31), 2 ** 31 - 1),
      });
    }
    const ledList = stateArray(d.leds, `${what} leds`);
    if (ledList.length % 2 !== 0) throw new StateError(`${what}: leds are not code, value pairs`);
    const leds: [number, number][] = [];
    for (let i = 0; i < ledList.length; i += 2) {
      leds.push([
        stateInteger(ledList[i], `${what} led code`, 0, 0xffff),
        stateInteger(ledList[i + 1], `${what} led value`, -(2 ** 31), 2 ** 31 - 1),
      ]);
    }
    const slots = stateArray(d.slots, `${what} slots`).map((v) =>
      stateInteger(v, `${what} slot`, MT_TRACKING_ID_NONE, MT_TRACKING_ID_MAX)
    );
    if (slots.length !== INPUT_MT_SLOTS) throw new StateError(`${what}: ${slots.length} touch slots saved`);
    const nextTrackingId = stateInteger(d.nextTrackingId, `${what} nextTrackingId`, 0, MT_TRACKING_ID_MAX);
    const stats = stateCounters(d.stats, STAT_NAMES, what);
    this.#select = select;
    this.#subsel = subsel;
    this.#pending.splice(0, this.#pending.length, ...pending);
    this.leds.clear();
    for (const [code, value] of leds) this.leds.set(code, value);
    this.#touch.trackingIds.splice(0, INPUT_MT_SLOTS, ...slots);
    this.#touch.nextTrackingId = nextTrackingId;
    Object.assign(this.#stats, stats);
  }
}

function syn(): InputEvent {
  return { type: EV_SYN, code: SYN_REPORT, value: 0 };
}
