// The web display's wire protocol (denovm's own; both ends are in this folder).
//
// Server -> page, binary: one changed rectangle of one scanout, a fixed little-endian header followed by
// the pixels. Server -> page, text: JSON ({t:"hello"}, {t:"stats"}). Page -> server, text: JSON
// ({t:"ack"}, {t:"key"}, {t:"pointer"}, {t:"wheel"}, {t:"touch"}).
//
// What goes out:
// - only tiles that changed: the server keeps, per page, a copy of the last frame it sent and compares each
//   flushed region with it in TILE_SIZE tiles (tiles.ts), since guests often flush far more than they redraw;
// - raw RGBA (alpha forced opaque), ready for putImageData: no decode cost in the page; what photo-like or
//   noisy content gets, since nothing cheap compresses it;
// - PNG of that RGBA (filter 0, zlib level 6), for rectangles a sample says will compress: decoded natively by
//   createImageBitmap, faster than DecompressionStream("deflate-raw") plus a copy in JavaScript;
// - deflate-raw of that RGBA (option encoding "deflate"), inflated by DecompressionStream.
// The page acks each batch with its decode/draw milliseconds.

import * as codes from "../../../devices/virtio/input/codes.ts";

/** Header of a binary rectangle message (all little-endian). */
export const RECT_MSG_TYPE = 0; // u8: RECT_MSG_KIND
export const RECT_ENCODING = 1; // u8: ENCODING_*
export const RECT_FLAGS = 2; // u8: RECT_FLAG_*
export const RECT_SCANOUT = 3; // u8
export const RECT_SEQ = 4; // u32: batch sequence number (the page acks it after drawing the batch's last rect)
export const RECT_X = 8; // u16
export const RECT_Y = 10; // u16
export const RECT_W = 12; // u16
export const RECT_H = 14; // u16
export const RECT_FB_WIDTH = 16; // u16: framebuffer size (the page resizes its canvas when it changes)
export const RECT_FB_HEIGHT = 18; // u16
export const RECT_HEADER_SIZE = 20;
export const RECT_MSG_KIND = 1;
/** Pixels are w*h*4 bytes R8G8B8A8, rows packed. */
export const ENCODING_RAW_RGBA = 0;
/** The same bytes compressed as raw deflate (RFC 1951, no zlib header): DecompressionStream("deflate-raw"). */
export const ENCODING_DEFLATE_RGBA = 1;
/**
 * A PNG file (ISO/IEC 15948) of the rectangle, 8-bit RGBA, filter type 0: the page decodes it natively with
 * createImageBitmap, faster than DecompressionStream inflating the same deflate stream.
 */
export const ENCODING_PNG = 2;
/** The last rectangle of a batch: the page acks `seq` once it has drawn it. */
export const RECT_FLAG_LAST = 1;
/** The batch redraws the whole framebuffer (first frame, or a mode change). */
export const RECT_FLAG_FULL = 2;

export interface RectHeader {
  encoding: number;
  flags: number;
  scanout: number;
  seq: number;
  x: number;
  y: number;
  w: number;
  h: number;
  fbWidth: number;
  fbHeight: number;
}

export function encodeRectHeader(h: RectHeader, into: Uint8Array): void {
  const v = new DataView(into.buffer, into.byteOffset, RECT_HEADER_SIZE);
  v.setUint8(RECT_MSG_TYPE, RECT_MSG_KIND);
  v.setUint8(RECT_ENCODING, h.encoding);
  v.setUint8(RECT_FLAGS, h.flags);
  v.setUint8(RECT_SCANOUT, h.scanout);
  v.setUint32(RECT_SEQ, h.seq, true);
  v.setUint16(RECT_X, h.x, true);
  v.setUint16(RECT_Y, h.y, true);
  v.setUint16(RECT_W, h.w, true);
  v.setUint16(RECT_H, h.h, true);
  v.setUint16(RECT_FB_WIDTH, h.fbWidth, true);
  v.setUint16(RECT_FB_HEIGHT, h.fbHeight, true);
}

export function decodeRectHeader(b: Uint8Array): RectHeader {
  if (b.byteLength < RECT_HEADER_SIZE) throw new RangeError(`rect message of ${b.byteLength} bytes`);
  const v = new DataView(b.buffer, b.byteOffset, RECT_HEADER_SIZE);
  if (v.getUint8(RECT_MSG_TYPE) !== RECT_MSG_KIND) throw new RangeError(`not a rect message`);
  return {
    encoding: v.getUint8(RECT_ENCODING),
    flags: v.getUint8(RECT_FLAGS),
    scanout: v.getUint8(RECT_SCANOUT),
    seq: v.getUint32(RECT_SEQ, true),
    x: v.getUint16(RECT_X, true),
    y: v.getUint16(RECT_Y, true),
    w: v.getUint16(RECT_W, true),
    h: v.getUint16(RECT_H, true),
    fbWidth: v.getUint16(RECT_FB_WIDTH, true),
    fbHeight: v.getUint16(RECT_FB_HEIGHT, true),
  };
}

/** The largest page timing an ack may report (ms); more is clamped. */
const ACK_MS_MAX = 3_600_000;

/** Page -> server messages. Coordinates are framebuffer pixels (the page undoes its CSS scaling). */
export type ClientMessage =
  /** decodeMs/drawMs: what decoding and drawing the batch took the page (for stats; optional). */
  | { t: "ack"; seq: number; decodeMs?: number; drawMs?: number }
  /** `code` is KeyboardEvent.code (a physical key, independent of the layout). */
  | { t: "key"; code: string; down: boolean }
  /** Mouse: button is MouseEvent.button (0 left, 1 middle, 2 right) for down/up. */
  | { t: "pointer"; kind: "move" | "down" | "up"; x: number; y: number; button?: number }
  /** Wheel clicks, positive = away from the user (evdev REL_WHEEL convention). */
  | { t: "wheel"; clicks: number }
  /** A touch contact (PointerEvent.pointerId identifies it). */
  | { t: "touch"; kind: "down" | "move" | "up"; id: number; x: number; y: number };

/** Parse and validate a page message (hostile input: anything malformed gives null). */
export function parseClientMessage(text: string): ClientMessage | null {
  let m: unknown;
  try {
    m = JSON.parse(text);
  } catch {
    return null;
  }
  if (typeof m !== "object" || m === null) return null;
  const o = m as Record<string, unknown>;
  const num = (v: unknown) => typeof v === "number" && Number.isFinite(v);
  switch (o.t) {
    case "ack": {
      if (!num(o.seq)) return null;
      // Page timings are only statistics: anything odd counts as 0, a huge value as an hour at most.
      const ms = (v: unknown) => (num(v) && (v as number) > 0 ? Math.min(v as number, ACK_MS_MAX) : 0);
      return { t: "ack", seq: o.seq as number, decodeMs: ms(o.decodeMs), drawMs: ms(o.drawMs) };
    }
    case "key":
      return typeof o.code === "string" && o.code.length <= 64 && typeof o.down === "boolean"
        ? { t: "key", code: o.code, down: o.down }
        : null;
    case "pointer":
      if (o.kind !== "move" && o.kind !== "down" && o.kind !== "up") return null;
      if (!num(o.x) || !num(o.y) || (o.button !== undefined && !num(o.button))) return null;
      return { t: "pointer", kind: o.kind, x: o.x as number, y: o.y as number, button: o.button as number | undefined };
    case "wheel":
      return num(o.clicks) ? { t: "wheel", clicks: o.clicks as number } : null;
    case "touch":
      if (o.kind !== "down" && o.kind !== "move" && o.kind !== "up") return null;
      if (!num(o.id) || !num(o.x) || !num(o.y)) return null;
      return { t: "touch", kind: o.kind, id: o.id as number, x: o.x as number, y: o.y as number };
    default:
      return null;
  }
}

// ---- KeyboardEvent.code (W3C UI Events KeyboardEvent code values) -> evdev KEY_* ----

const codeTable = codes as unknown as Record<string, number>;

/** Codes whose evdev name is not derived by a rule below. */
const NAMED: Record<string, number> = {
  Escape: codes.KEY_ESC,
  Minus: codes.KEY_MINUS,
  Equal: codes.KEY_EQUAL,
  Backspace: codes.KEY_BACKSPACE,
  Tab: codes.KEY_TAB,
  BracketLeft: codes.KEY_LEFTBRACE,
  BracketRight: codes.KEY_RIGHTBRACE,
  Enter: codes.KEY_ENTER,
  ControlLeft: codes.KEY_LEFTCTRL,
  ControlRight: codes.KEY_RIGHTCTRL,
  Semicolon: codes.KEY_SEMICOLON,
  Quote: codes.KEY_APOSTROPHE,
  Backquote: codes.KEY_GRAVE,
  ShiftLeft: codes.KEY_LEFTSHIFT,
  ShiftRight: codes.KEY_RIGHTSHIFT,
  Backslash: codes.KEY_BACKSLASH,
  IntlBackslash: codes.KEY_102ND,
  IntlRo: codes.KEY_RO,
  IntlYen: codes.KEY_YEN,
  Comma: codes.KEY_COMMA,
  Period: codes.KEY_DOT,
  Slash: codes.KEY_SLASH,
  AltLeft: codes.KEY_LEFTALT,
  AltRight: codes.KEY_RIGHTALT,
  Space: codes.KEY_SPACE,
  CapsLock: codes.KEY_CAPSLOCK,
  NumLock: codes.KEY_NUMLOCK,
  ScrollLock: codes.KEY_SCROLLLOCK,
  PrintScreen: codes.KEY_SYSRQ,
  Pause: codes.KEY_PAUSE,
  Insert: codes.KEY_INSERT,
  Delete: codes.KEY_DELETE,
  Home: codes.KEY_HOME,
  End: codes.KEY_END,
  PageUp: codes.KEY_PAGEUP,
  PageDown: codes.KEY_PAGEDOWN,
  ArrowUp: codes.KEY_UP,
  ArrowDown: codes.KEY_DOWN,
  ArrowLeft: codes.KEY_LEFT,
  ArrowRight: codes.KEY_RIGHT,
  MetaLeft: codes.KEY_LEFTMETA,
  MetaRight: codes.KEY_RIGHTMETA,
  ContextMenu: codes.KEY_COMPOSE,
  NumpadDivide: codes.KEY_KPSLASH,
  NumpadMultiply: codes.KEY_KPASTERISK,
  NumpadSubtract: codes.KEY_KPMINUS,
  NumpadAdd: codes.KEY_KPPLUS,
  NumpadEnter: codes.KEY_KPENTER,
  NumpadDecimal: codes.KEY_KPDOT,
  NumpadEqual: codes.KEY_KPEQUAL,
  NumpadComma: codes.KEY_KPCOMMA,
  AudioVolumeMute: codes.KEY_MUTE,
  AudioVolumeDown: codes.KEY_VOLUMEDOWN,
  AudioVolumeUp: codes.KEY_VOLUMEUP,
  Power: codes.KEY_POWER,
};

/** The evdev key code for a KeyboardEvent.code, or undefined for keys with no mapping. */
export function evdevKeyCode(code: string): number | undefined {
  if (Object.hasOwn(NAMED, code)) return NAMED[code];
  let name: string | undefined;
  let m: RegExpMatchArray | null;
  if ((m = code.match(/^Key([A-Z])$/))) name = `KEY_${m[1]}`;
  else if ((m = code.match(/^Digit([0-9])$/))) name = `KEY_${m[1]}`;
  else if ((m = code.match(/^Numpad([0-9])$/))) name = `KEY_KP${m[1]}`;
  else if ((m = code.match(/^F([1-9]|1[0-9]|2[0-4])$/))) name = `KEY_F${m[1]}`;
  if (name === undefined || !Object.hasOwn(codeTable, name)) return undefined;
  return codeTable[name];
}

/** MouseEvent.button -> evdev button. */
export function evdevButton(button: number | undefined): number | undefined {
  switch (button ?? 0) {
    case 0:
      return codes.BTN_LEFT;
    case 1:
      return codes.BTN_MIDDLE;
    case 2:
      return codes.BTN_RIGHT;
    case 3:
      return codes.BTN_SIDE;
    case 4:
      return codes.BTN_EXTRA;
    default:
      return undefined;
  }
}
