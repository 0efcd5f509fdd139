// One-byte port accesses for legacy device tests, as a guest's inb/outb make them, and a state round trip
// through the snapshot encoding.

import { decodeState, type DeviceState, encodeState } from "../../core/state.ts";

/** An inb at `offset` in the device's port range. */
export function rd(d: { read(offset: number, data: Uint8Array): void }, offset: number): number {
  const b = new Uint8Array(1);
  d.read(offset, b);
  return b[0];
}

/** An outb of `value` at `offset` in the device's port range. */
export function wr(d: { write(offset: number, data: Uint8Array): void }, offset: number, value: number): void {
  d.write(offset, Uint8Array.of(value));
}

/** A state after encodeState and decodeState, to prove it is plain data. */
export function roundTrip(state: DeviceState): DeviceState {
  return decodeState(encodeState(state));
}

/** The same state with `data` fields replaced, for malformed-record tests. */
export function withData(state: DeviceState, fields: Record<string, unknown>): DeviceState {
  return { ...state, data: { ...(state.data as Record<string, never>), ...fields } as DeviceState["data"] };
}
