// Copy accounting: the virgl stream walker on hand-built streams (layouts of virglrenderer
// src/virgl_protocol.h), the box-to-bytes rule, counters and summary, and random streams.

import assert from "node:assert/strict";
import fc from "fast-check";
import * as A from "./accounting.ts";
import * as F from "./formats.ts";

const hdr = (cmd: number, len: number, obj = 0) =>
  ((len << A.VIRGL_LEN_SHIFT) | (obj << A.VIRGL_OBJ_SHIFT) | cmd) >>> 0;
const bytesOf = (dw: number[]) => new Uint8Array(new Uint32Array(dw).buffer);

/** res, level, usage, stride, layer_stride, x, y, z, w, h, d (VIRGL_RESOURCE_IW_* 1..11). */
const iw = (res: number, box: [number, number, number, number, number, number], stride = 0) => [
  res,
  0,
  0,
  stride,
  0,
  ...box,
];

const shapes = new Map<number, A.ResourceShape>([
  [1, { target: F.PIPE_TEXTURE_2D, format: F.VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM }],
  [2, { target: F.PIPE_BUFFER, format: F.VIRGL_FORMAT_R8_UNORM }],
  [3, { target: F.PIPE_TEXTURE_2D, format: F.VIRGL_FORMAT_R32G32B32A32_FLOAT }],
]);
const shapeOf = (r: number) => shapes.get(r);

Deno.test("walker: INLINE_WRITE, TRANSFER3D both ways, COPY_TRANSFER3D both ways, PIPE_RESOURCE_CREATE", () => {
  const stream = bytesOf([
    // NOP and a SET_VIEWPORT-like command the walker skips.
    hdr(A.VIRGL_CCMD_NOP, 0),
    hdr(4, 7),
    ...new Array(7).fill(0x3f800000),
    // INLINE_WRITE 16x2 pixels of resource 1 (128 bytes = 32 dwords of data).
    hdr(A.VIRGL_CCMD_RESOURCE_INLINE_WRITE, 11 + 32),
    ...iw(1, [0, 0, 0, 16, 2, 1]),
    ...new Array(32).fill(0x11223344),
    // TRANSFER3D to host: 64x32 of resource 1; from host: 100 bytes of buffer 2.
    hdr(A.VIRGL_CCMD_TRANSFER3D, A.VIRGL_TRANSFER3D_SIZE),
    ...iw(1, [0, 0, 0, 64, 32, 1]),
    0,
    A.VIRGL_TRANSFER_TO_HOST,
    hdr(A.VIRGL_CCMD_TRANSFER3D, A.VIRGL_TRANSFER3D_SIZE),
    ...iw(2, [16, 0, 0, 100, 1, 1]),
    0,
    A.VIRGL_TRANSFER_FROM_HOST,
    // COPY_TRANSFER3D from staging 2 into resource 3 (4x4 RGBA32F = 256 bytes), and a read back.
    hdr(A.VIRGL_CCMD_COPY_TRANSFER3D, A.VIRGL_COPY_TRANSFER3D_SIZE),
    ...iw(3, [0, 0, 0, 4, 4, 1]),
    2,
    0,
    0,
    hdr(A.VIRGL_CCMD_COPY_TRANSFER3D, A.VIRGL_COPY_TRANSFER3D_SIZE),
    ...iw(1, [0, 0, 0, 8, 8, 1]),
    2,
    4096,
    A.VIRGL_COPY_TRANSFER3D_FLAGS_READ_FROM_HOST | 1,
    // PIPE_RESOURCE_CREATE (11 dwords, as Mesa 22 sends it): buffer, R8, bind, 65536 wide, blob_id 5.
    hdr(A.VIRGL_CCMD_PIPE_RESOURCE_CREATE, 11),
    F.PIPE_BUFFER,
    F.VIRGL_FORMAT_R8_UNORM,
    16,
    65536,
    1,
    1,
    1,
    0,
    0,
    6,
    5,
  ]);
  const copy = stream.slice();
  const w = A.walkVirglStream(stream, shapeOf);
  assert.deepEqual(stream, copy, "stream not modified");
  assert.equal(w.truncated, false);
  assert.equal(w.commands, 8);
  assert.deepEqual(w.copies, [
    { command: "INLINE_WRITE", kind: "inlineWriteBytes", resourceId: 1, bytes: 128, estimated: false },
    { command: "TRANSFER3D", kind: "streamToHostBytes", resourceId: 1, bytes: 64 * 32 * 4, estimated: false },
    { command: "TRANSFER3D", kind: "streamFromHostBytes", resourceId: 2, bytes: 100, estimated: false },
    {
      command: "COPY_TRANSFER3D",
      kind: "copyTransferToHostBytes",
      resourceId: 3,
      bytes: 256,
      estimated: false,
      srcResourceId: 2,
    },
    {
      command: "COPY_TRANSFER3D",
      kind: "copyTransferFromHostBytes",
      resourceId: 1,
      bytes: 256,
      estimated: false,
      srcResourceId: 2,
    },
  ]);
  assert.deepEqual(w.creates, [{
    blobId: 5,
    target: F.PIPE_BUFFER,
    format: F.VIRGL_FORMAT_R8_UNORM,
    width: 65536,
    height: 1,
  }]);
});

Deno.test("walker: unknown resources are estimated, truncated streams stop, short commands are skipped", () => {
  const w = A.walkVirglStream(
    bytesOf([
      hdr(A.VIRGL_CCMD_TRANSFER3D, 13),
      ...iw(99, [0, 0, 0, 10, 10, 1], 64),
      0,
      A.VIRGL_TRANSFER_TO_HOST,
      hdr(A.VIRGL_CCMD_TRANSFER3D, 2), // too short to be a transfer: skipped
      1,
      2,
      hdr(A.VIRGL_CCMD_RESOURCE_INLINE_WRITE, 11 + 3),
      ...iw(98, [0, 0, 0, 5, 1, 1]),
      1,
      2,
      3,
      hdr(A.VIRGL_CCMD_TRANSFER3D, 13), // runs past the end
      1,
    ]),
    shapeOf,
  );
  assert.equal(w.truncated, true);
  assert.equal(w.commands, 3);
  assert.deepEqual(w.copies.map((c) => [c.resourceId, c.bytes, c.estimated]), [[99, 640, true], [98, 12, false]]);
  // A trailing partial dword is ignored; an empty stream is fine.
  assert.equal(A.walkVirglStream(new Uint8Array(3), shapeOf).commands, 0);
  assert.equal(A.walkVirglStream(new Uint8Array(0), shapeOf).commands, 0);
});

Deno.test("boxBytes: formats, buffers, depth, unknown formats", () => {
  const box = (w: number, h: number, d: number) => ({ x: 0, y: 0, z: 0, w, h, d });
  assert.deepEqual(A.boxBytes(box(64, 32, 1), shapes.get(1)), { bytes: 8192, estimated: false });
  assert.deepEqual(A.boxBytes(box(64, 32, 2), shapes.get(3)), { bytes: 64 * 32 * 2 * 16, estimated: false });
  assert.deepEqual(A.boxBytes(box(1000, 1, 1), shapes.get(2)), { bytes: 1000, estimated: false });
  assert.deepEqual(A.boxBytes(box(10, 3, 1), { target: 2, format: 9999 }, 48), { bytes: 144, estimated: true });
  assert.deepEqual(A.boxBytes(box(10, 3, 1), undefined), { bytes: 30, estimated: true });
});

Deno.test("counters: per resource, per context, totals, commands, blobs and the summary", () => {
  const acc = new A.GpuAccounting("test");
  acc.copy("transferToHostBytes", 8192, 1, 0);
  acc.copy("streamToHostBytes", 100, 2, 3);
  acc.copy("inlineWriteBytes", 28, 2, 3, true);
  acc.mapBlob(4, 3, 65536);
  acc.avoided(4, 4096);
  acc.touch(1, 0);
  acc.command("TRANSFER_TO_HOST_2D", true, 8192, 12.5);
  acc.command("TRANSFER_TO_HOST_2D", false, 0, 1);
  acc.resourceGone(1);
  const s = acc.stats();
  assert.equal(s.totals.bytesCopied, 8192 + 128);
  assert.equal(s.resources["1"].transferToHostBytes, 8192);
  assert.equal(s.resources["1"].live, false);
  assert.equal(s.resources["2"].bytesCopied, 128);
  assert.equal(s.resources["2"].estimated, 1);
  assert.equal(s.contexts["3"].bytesCopied, 128);
  assert.equal(s.contexts["3"].blobMappedBytes, 65536);
  assert.equal(s.resources["4"].copiesAvoidedBytes, 4096);
  assert.deepEqual(s.mapped, { count: 1, bytes: 65536 });
  assert.deepEqual(s.commands["TRANSFER_TO_HOST_2D"], { count: 2, errors: 1, bytes: 8192, totalUs: 13.5 });
  assert.deepEqual(JSON.parse(JSON.stringify(s)), s, "JSON-able");
  const text = acc.summary();
  assert.match(text, /8\.1 KiB copied/);
  assert.match(text, /resource 1: 8\.0 KiB/);
  acc.unmapBlob(65536);
  assert.deepEqual(acc.stats().mapped, { count: 0, bytes: 0 });
});

Deno.test("property: random streams never throw and every copy lies within the stream's commands", () => {
  fc.assert(
    fc.property(fc.array(fc.integer({ min: 0, max: 0xffffffff }), { maxLength: 200 }), (dws) => {
      // Bias toward interesting commands by planting headers.
      const s = dws.map((d, i) => (i % 7 === 0 ? (d & 0xffff0000) | [9, 43, 45, 48][d % 4] : d) >>> 0);
      const w = A.walkVirglStream(bytesOf(s), shapeOf);
      assert.ok(w.commands <= s.length);
      for (const c of w.copies) assert.ok(Number.isFinite(c.bytes) && c.bytes >= 0);
    }),
    { numRuns: 2000 },
  );
});

Deno.test("counters of destroyed resources are capped (a guest cannot grow the tables at will)", () => {
  const acc = new A.GpuAccounting("test");
  for (let id = 1; id <= A.MAX_DEAD + 1000; id++) {
    acc.resourceCreated(id);
    acc.copy("transferToHostBytes", 4, id, 0);
    acc.resourceGone(id);
  }
  acc.resourceCreated(1); // a live resource is never dropped
  const s = acc.stats();
  assert.ok(Object.keys(s.resources).length <= A.MAX_DEAD + 1);
  assert.equal(s.resources["1"].live, true);
  assert.equal(s.totals.transferToHostBytes, 4 * (A.MAX_DEAD + 1000), "totals keep everything");
});
