// The device state interface: every device model and transport can say whether it is quiescent and
// export and import its state as plain, versioned data. A snapshot saves these records beside guest
// memory and the vCPUs; a restore builds the same devices from the same configuration, then imports
// each record into its device before any vCPU runs.

/** Plain data: what JSON holds, plus byte arrays (register files, 2D resource contents, rings). */
export type StateValue =
  | null
  | boolean
  | number
  | string
  | Uint8Array
  | StateValue[]
  | { [key: string]: StateValue };

/** One device's saved state. */
export interface DeviceState {
  /** What saved it, e.g. "virtio-blk", "virtio-mmio", "8250": a record is imported only by its own kind. */
  readonly type: string;
  /** The layout version of `data`; a device reads only the versions it knows. */
  readonly version: number;
  readonly data: StateValue;
}

/** What devices and transports implement. */
export interface Stateful {
  /**
   * True when nothing is in flight: no request taken from a queue without its completion written back, no
   * host I/O pending. Only a quiescent device's state is complete.
   */
  quiescent(): boolean;
  /** The device's state; throws StateError when its host side cannot be saved (say why in one line). */
  saveState(): DeviceState;
  /**
   * Take a saved state into a device built from the same configuration and not yet started. Throws
   * StateError for another kind, an unknown version, or data that does not fit this device.
   */
  restoreState(state: DeviceState): void;
}

/** A state that cannot be saved or does not fit: one line naming the device and the reason. */
export class StateError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "StateError";
  }
}

/** The data of `state` after checking its kind and version; throws StateError naming the difference. */
export function stateData(state: DeviceState, type: string, version: number): StateValue {
  if (state.type !== type) throw new StateError(`a ${state.type} state cannot be restored into ${type}`);
  if (state.version !== version) {
    throw new StateError(`${type} state version ${state.version}; this denovm reads version ${version}`);
  }
  return state.data;
}

/** A field of a state record as an object; throws StateError when it is not one. */
export function stateRecord(value: StateValue | undefined, what: string): { [key: string]: StateValue } {
  if (value === null || typeof value !== "object" || Array.isArray(value) || value instanceof Uint8Array) {
    throw new StateError(`${what}: expected a record`);
  }
  return value;
}

/** A field of a state record as a finite number within [min, max]; throws StateError otherwise. */
export function stateNumber(value: StateValue | undefined, what: string, min = -Infinity, max = Infinity): number {
  if (typeof value !== "number" || !Number.isFinite(value) || value < min || value > max) {
    throw new StateError(`${what}: expected a number in [${min}, ${max}], got ${describe(value)}`);
  }
  return value;
}

/** A field of a state record as an integer within [min, max] (registers, indices, counters); throws StateError otherwise. */
export function stateInteger(value: StateValue | undefined, what: string, min: number, max: number): number {
  if (typeof value !== "number" || !Number.isInteger(value) || value < min || value > max) {
    throw new StateError(`${what}: expected an integer in [${min}, ${max}], got ${describe(value)}`);
  }
  return value;
}

/** A field of a state record as a boolean; throws StateError otherwise. */
export function stateBoolean(value: StateValue | undefined, what: string): boolean {
  if (typeof value !== "boolean") throw new StateError(`${what}: expected a boolean, got ${describe(value)}`);
  return value;
}

/** A field of a state record as a string; throws StateError otherwise. */
export function stateString(value: StateValue | undefined, what: string): string {
  if (typeof value !== "string") throw new StateError(`${what}: expected a string, got ${describe(value)}`);
  return value;
}

/** A field of a state record as bytes (of `length` when given); throws StateError otherwise. */
export function stateBytes(value: StateValue | undefined, what: string, length?: number): Uint8Array {
  if (!(value instanceof Uint8Array)) throw new StateError(`${what}: expected bytes, got ${describe(value)}`);
  if (length !== undefined && value.length !== length) {
    throw new StateError(`${what}: expected ${length} bytes, got ${value.length}`);
  }
  return value;
}

/** A field of a state record as an array; throws StateError otherwise. */
export function stateArray(value: StateValue | undefined, what: string): StateValue[] {
  if (!Array.isArray(value)) throw new StateError(`${what}: expected a list, got ${describe(value)}`);
  return value;
}

function describe(v: StateValue | undefined): string {
  if (v === undefined) return "nothing";
  if (v instanceof Uint8Array) return `${v.length} bytes`;
  if (Array.isArray(v)) return "a list";
  return v === null ? "null" : typeof v === "object" ? "a record" : JSON.stringify(v);
}

/** Marks byte arrays in the JSON form ({"$bytes": base64}); no state record has a key of that name. */
const BYTES_KEY = "$bytes";

/** A state as UTF-8 JSON, byte arrays as base64: what a snapshot file stores. */
export function encodeState(state: DeviceState): Uint8Array {
  const json = JSON.stringify(state, (_k, v) => v instanceof Uint8Array ? { [BYTES_KEY]: toBase64(v) } : v);
  return new TextEncoder().encode(json);
}

/** The inverse of encodeState; throws StateError on anything that is not a state record. */
export function decodeState(bytes: Uint8Array): DeviceState {
  let parsed: unknown;
  try {
    parsed = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes), (_k, v) => {
      if (v && typeof v === "object" && !Array.isArray(v) && typeof v[BYTES_KEY] === "string") {
        return fromBase64(v[BYTES_KEY]);
      }
      return v;
    });
  } catch (e) {
    throw new StateError(`not a device state record: ${(e as Error).message}`);
  }
  const s = parsed as Partial<DeviceState> | null;
  if (!s || typeof s !== "object" || typeof s.type !== "string" || typeof s.version !== "number" || !("data" in s)) {
    throw new StateError("not a device state record: type, version and data are required");
  }
  return s as DeviceState;
}

function toBase64(bytes: Uint8Array): string {
  let s = "";
  const CHUNK = 0x8000;
  for (let i = 0; i < bytes.length; i += CHUNK) s += String.fromCharCode(...bytes.subarray(i, i + CHUNK));
  return btoa(s);
}

function fromBase64(text: string): Uint8Array {
  const s = atob(text);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}
