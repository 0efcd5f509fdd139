// The device state interface's plumbing: encodeState/decodeState keep every plain value and nested byte
// array exactly (also random trees, by property), decodeState refuses anything that is not a state record,
// and the checked field readers refuse each kind of wrong field with a StateError naming it.

import assert from "node:assert/strict";
import fc from "fast-check";
import {
  decodeState,
  type DeviceState,
  encodeState,
  stateArray,
  stateBoolean,
  stateBytes,
  stateData,
  StateError,
  stateInteger,
  stateNumber,
  stateRecord,
  stateString,
  type StateValue,
} from "./state.ts";

const enc = new TextEncoder();

Deno.test("state: a record with nested bytes survives encode and decode exactly", () => {
  const big = Uint8Array.from({ length: 100_000 }, (_, i) => (i * 31) & 0xff);
  const state: DeviceState = {
    type: "virtio-blk",
    version: 3,
    data: {
      features: 0x1_0000_0006,
      name: "disk \u00e9\u{1f600}",
      ready: true,
      none: null,
      empty: new Uint8Array(0),
      queues: [
        { size: 256, avail: 12, ring: Uint8Array.of(0, 1, 2, 0xff) },
        { size: 128, avail: -1, ring: new Uint8Array(0), nested: [[Uint8Array.of(7)], []] },
      ],
      big,
    },
  };
  const bytes = encodeState(state);
  const back = decodeState(bytes);
  assert.deepEqual(back, state);
  const data = stateRecord(back.data, "data");
  assert.ok(data.big instanceof Uint8Array, "bytes come back as bytes, not as a list or a string");
  assert.equal((data.big as Uint8Array).length, big.length);
  assert.ok(stateArray(data.queues, "queues").every((q) => stateRecord(q, "q").ring instanceof Uint8Array));
  // The encoding is plain UTF-8 JSON.
  assert.equal(JSON.parse(new TextDecoder().decode(bytes)).type, "virtio-blk");
});

Deno.test("state: decodeState refuses bytes that are not a state record", () => {
  const bad: [Uint8Array, string][] = [
    [enc.encode(""), "empty"],
    [enc.encode("{"), "cut JSON"],
    [Uint8Array.of(0x7b, 0xff, 0x7d), "not UTF-8"],
    [enc.encode("null"), "null"],
    [enc.encode("[1,2]"), "a list"],
    [enc.encode('"8250"'), "a string"],
    [enc.encode('{"type":"8250","version":1}'), "no data"],
    [enc.encode('{"version":1,"data":{}}'), "no type"],
    [enc.encode('{"type":"8250","data":{}}'), "no version"],
    [enc.encode('{"type":1,"version":1,"data":{}}'), "type not a string"],
    [enc.encode('{"type":"8250","version":"1","data":{}}'), "version not a number"],
    [enc.encode('{"type":"8250","version":1,"data":{"rx":{"$bytes":"***"}}}'), "bad base64"],
  ];
  for (const [bytes, what] of bad) assert.throws(() => decodeState(bytes), StateError, what);
  // A null data is a record (a device with nothing to save may write one).
  assert.deepEqual(decodeState(enc.encode('{"type":"x","version":1,"data":null}')), {
    type: "x",
    version: 1,
    data: null,
  });
});

Deno.test("state: stateData checks kind and version and names both", () => {
  const s: DeviceState = { type: "cmos", version: 1, data: { index: 3 } };
  assert.deepEqual(stateData(s, "cmos", 1), { index: 3 });
  assert.throws(() => stateData(s, "i8042", 1), (e: Error) => e instanceof StateError && /cmos.*i8042/.test(e.message));
  assert.throws(
    () => stateData({ ...s, version: 2 }, "cmos", 1),
    (e: Error) => e instanceof StateError && /version 2.*version 1/.test(e.message),
  );
});

Deno.test("state: field readers accept their kind and refuse every other one with the field's name", () => {
  const samples: [string, StateValue | undefined][] = [
    ["undefined", undefined],
    ["null", null],
    ["boolean", true],
    ["number", 5],
    ["string", "s"],
    ["bytes", Uint8Array.of(1)],
    ["list", [1]],
    ["record", { a: 1 }],
  ];
  const readers: [string, (v: StateValue | undefined) => unknown][] = [
    ["record", (v) => stateRecord(v, "field.x")],
    ["number", (v) => stateNumber(v, "field.x")],
    ["number", (v) => stateInteger(v, "field.x", 0, 10)],
    ["boolean", (v) => stateBoolean(v, "field.x")],
    ["string", (v) => stateString(v, "field.x")],
    ["bytes", (v) => stateBytes(v, "field.x")],
    ["list", (v) => stateArray(v, "field.x")],
  ];
  for (const [kind, read] of readers) {
    for (const [sampleKind, value] of samples) {
      if (sampleKind === kind) assert.equal(read(value), value, `${kind} reader takes a ${sampleKind}`);
      else {
        assert.throws(
          () => read(value),
          (e: Error) => e instanceof StateError && e.message.startsWith("field.x: "),
          `${kind} reader refuses a ${sampleKind}`,
        );
      }
    }
  }
});

Deno.test("state: numbers are checked against their range and must be finite; bytes against their length", () => {
  assert.equal(stateNumber(0, "n", 0, 255), 0);
  assert.equal(stateNumber(255, "n", 0, 255), 255);
  assert.throws(() => stateNumber(256, "n", 0, 255), /n: expected a number in \[0, 255\], got 256/);
  assert.throws(() => stateNumber(-1, "n", 0, 255), StateError);
  assert.throws(() => stateNumber(NaN, "n"), StateError);
  assert.throws(() => stateNumber(Infinity, "n"), StateError);
  assert.throws(() => stateNumber(-Infinity, "n"), StateError);
  assert.equal(stateInteger(0x7f, "index", 0, 0x7f), 0x7f);
  assert.equal(stateInteger(-3, "delta", -5, 5), -3);
  assert.throws(() => stateInteger(1.5, "index", 0, 0x7f), /index: expected an integer in \[0, 127\], got 1.5/);
  assert.throws(() => stateInteger(0x80, "index", 0, 0x7f), StateError);
  assert.throws(() => stateInteger(NaN, "index", 0, 0x7f), StateError);
  assert.throws(() => stateInteger("1", "index", 0, 0x7f), StateError);
  assert.deepEqual(stateBytes(new Uint8Array(128), "ram", 128).length, 128);
  assert.throws(() => stateBytes(new Uint8Array(127), "ram", 128), /ram: expected 128 bytes, got 127/);
});

// Random plain values: JSON's (finite numbers, no -0, which JSON cannot tell from 0) plus byte arrays.
const keyArb = fc.string({ maxLength: 8 }).filter((k) => k !== "$bytes" && k !== "__proto__");
const { value: valueArb } = fc.letrec<{ value: StateValue }>((tie) => ({
  value: fc.oneof(
    { depthSize: "small", withCrossShrink: true },
    fc.constant(null),
    fc.boolean(),
    fc.double({ noNaN: true, noDefaultInfinity: true }).map((d) => (Object.is(d, -0) ? 0 : d)),
    fc.integer(),
    fc.string(),
    fc.uint8Array({ maxLength: 64 }),
    fc.array(tie("value"), { maxLength: 4 }),
    fc.dictionary(keyArb, tie("value"), { maxKeys: 4 }),
  ),
}));

Deno.test("state (property): every plain value round-trips through encodeState and decodeState", () => {
  fc.assert(
    fc.property(fc.string(), fc.integer({ min: 0, max: 1000 }), valueArb, (type, version, data) => {
      const state: DeviceState = { type, version, data };
      assert.deepEqual(decodeState(encodeState(state)), state);
    }),
    { numRuns: 500 },
  );
});
