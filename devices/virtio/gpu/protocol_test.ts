// virtio-gpu wire format: the command decoder on hand-built structs (layouts of linux/virtio_gpu.h),
// property tests (random bytes only ever give ProtocolError), response encoders, EDID and formats.

import assert from "node:assert/strict";
import fc from "fast-check";
import * as P from "./protocol.ts";
import * as F from "./formats.ts";
import { EDID_BLOCK_SIZE, EDID_MAX_ACTIVE, intersect, makeEdid } from "./display.ts";
import { header as hdr } from "../../../test/support/gpu_commands.ts";

Deno.test("struct sizes match linux/virtio_gpu.h", () => {
  // sizeof() of each struct in the header (packed, little-endian).
  assert.equal(P.HDR_SIZE, 24);
  assert.equal(P.SIZEOF_RESOURCE_CREATE_2D, 40);
  assert.equal(P.SIZEOF_SET_SCANOUT, 48);
  assert.equal(P.SIZEOF_RESOURCE_FLUSH, 48);
  assert.equal(P.SIZEOF_TRANSFER_TO_HOST_2D, 56);
  assert.equal(P.SIZEOF_RESOURCE_ATTACH_BACKING, 32);
  assert.equal(P.SIZEOF_RESP_DISPLAY_INFO, 24 + 16 * 24);
  assert.equal(P.SIZEOF_TRANSFER_HOST_3D, 72);
  assert.equal(P.SIZEOF_RESOURCE_CREATE_3D, 72);
  assert.equal(P.SIZEOF_CTX_CREATE, 96);
  assert.equal(P.SIZEOF_RESOURCE_CREATE_BLOB, 56);
  assert.equal(P.SIZEOF_SET_SCANOUT_BLOB, 96);
  assert.equal(P.SIZEOF_RESOURCE_MAP_BLOB, 40);
  assert.equal(P.SIZEOF_RESP_MAP_INFO, 32);
  assert.equal(P.SIZEOF_UPDATE_CURSOR, 56);
  assert.equal(P.SIZEOF_RESP_EDID, 24 + 8 + 1024);
});

Deno.test("decoder: header fields and each command's fields", () => {
  const { b, v } = hdr(P.CMD_TRANSFER_TO_HOST_3D, P.SIZEOF_TRANSFER_HOST_3D, {
    flags: 3,
    fenceId: 0x1_0000_0002n,
    ctxId: 7,
    ringIdx: 5,
  });
  [1, 2, 3, 4, 5, 6].forEach((x, i) => v.setUint32(24 + 4 * i, x, true));
  v.setBigUint64(48, 4096n, true);
  [9, 1, 256, 8192].forEach((x, i) => v.setUint32(56 + 4 * i, x, true));
  const c = P.parseCommand(b);
  assert.deepEqual(c, {
    kind: "transfer_to_host_3d",
    hdr: { type: P.CMD_TRANSFER_TO_HOST_3D, flags: 3, fenceId: 0x1_0000_0002n, ctxId: 7, ringIdx: 5 },
    box: { x: 1, y: 2, z: 3, w: 4, h: 5, d: 6 },
    offset: 4096n,
    resourceId: 9,
    level: 1,
    stride: 256,
    layerStride: 8192,
  });
  const blob = hdr(P.CMD_RESOURCE_CREATE_BLOB, P.SIZEOF_RESOURCE_CREATE_BLOB + 2 * P.MEM_ENTRY_SIZE);
  [5, P.VIRTIO_GPU_BLOB_MEM_GUEST, P.VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE, 2].forEach((x, i) =>
    blob.v.setUint32(24 + 4 * i, x, true)
  );
  blob.v.setBigUint64(40, 77n, true);
  blob.v.setBigUint64(48, 8192n, true);
  blob.v.setBigUint64(56, 0x1000n, true);
  blob.v.setUint32(64, 4096, true);
  blob.v.setBigUint64(72, 0x3000n, true);
  blob.v.setUint32(80, 4096, true);
  const bc = P.parseCommand(blob.b);
  assert.equal(bc.kind, "resource_create_blob");
  if (bc.kind === "resource_create_blob") {
    assert.equal(bc.blobId, 77n);
    assert.equal(bc.size, 8192n);
    assert.deepEqual(bc.entries, [{ addr: 0x1000n, length: 4096 }, { addr: 0x3000n, length: 4096 }]);
  }
  const ctx = hdr(P.CMD_CTX_CREATE, P.SIZEOF_CTX_CREATE, { ctxId: 3 });
  ctx.v.setUint32(24, 4, true);
  ctx.v.setUint32(28, 0x104, true);
  ctx.b.set(new TextEncoder().encode("mesa"), 32);
  assert.deepEqual(P.parseCommand(ctx.b), {
    kind: "ctx_create",
    hdr: { type: P.CMD_CTX_CREATE, flags: 0, fenceId: 0n, ctxId: 3, ringIdx: 0 },
    contextInit: 0x104,
    name: "mesa",
  });
  const sb = hdr(P.CMD_SET_SCANOUT_BLOB, P.SIZEOF_SET_SCANOUT_BLOB);
  [0, 0, 10, 20, 1, 6, 10, 20, 2, 0, 64, 0, 0, 0, 128, 0, 0, 0].forEach((x, i) => sb.v.setUint32(24 + 4 * i, x, true));
  const s = P.parseCommand(sb.b);
  assert.equal(s.kind, "set_scanout_blob");
  if (s.kind === "set_scanout_blob") {
    assert.deepEqual([s.scanoutId, s.resourceId, s.width, s.height, s.format], [1, 6, 10, 20, 2]);
    assert.deepEqual(s.strides, [64, 0, 0, 0]);
    assert.deepEqual(s.offsets, [128, 0, 0, 0]);
  }
});

Deno.test("decoder: short, unknown and inconsistent commands are ProtocolErrors with the right code", () => {
  const code = (b: Uint8Array) => {
    try {
      P.parseCommand(b);
      return 0;
    } catch (e) {
      assert.ok(e instanceof P.ProtocolError);
      return e.response;
    }
  };
  assert.equal(code(new Uint8Array(23)), P.RESP_ERR_UNSPEC);
  assert.equal(code(hdr(0x9999, 64).b), P.RESP_ERR_UNSPEC);
  assert.equal(code(hdr(P.CMD_RESOURCE_FLUSH, P.SIZEOF_RESOURCE_FLUSH - 1).b), P.RESP_ERR_INVALID_PARAMETER);
  const att = hdr(P.CMD_RESOURCE_ATTACH_BACKING, P.SIZEOF_RESOURCE_ATTACH_BACKING + 16);
  att.v.setUint32(28, 2, true); // two entries, one present
  assert.equal(code(att.b), P.RESP_ERR_INVALID_PARAMETER);
  att.v.setUint32(28, P.MAX_MEM_ENTRIES + 1, true);
  assert.equal(code(att.b), P.RESP_ERR_INVALID_PARAMETER);
  const sub = hdr(P.CMD_SUBMIT_3D, P.SIZEOF_CMD_SUBMIT + 8);
  sub.v.setUint32(24, 12, true);
  assert.equal(code(sub.b), P.RESP_ERR_INVALID_PARAMETER);
  const ctx = hdr(P.CMD_CTX_CREATE, P.SIZEOF_CTX_CREATE);
  ctx.v.setUint32(24, 65, true);
  assert.equal(code(ctx.b), P.RESP_ERR_INVALID_PARAMETER);
});

Deno.test("property: random bytes never throw anything but ProtocolError", () => {
  const types = Object.keys(P.COMMAND_NAMES).map(Number);
  fc.assert(
    fc.property(fc.constantFrom(...types, 0, 0x1100, 0xffffffff), fc.uint8Array({ maxLength: 300 }), (type, rest) => {
      const b = new Uint8Array(Math.max(4, rest.length));
      b.set(rest.subarray(0, b.length));
      new DataView(b.buffer).setUint32(0, type, true);
      for (const bytes of [b, rest]) {
        try {
          const c = P.parseCommand(bytes);
          assert.equal(c.hdr.type, type);
        } catch (e) {
          if (!(e instanceof P.ProtocolError)) throw e;
          assert.ok(e.response >= P.RESP_ERR_UNSPEC && e.response <= P.RESP_ERR_INVALID_PARAMETER);
        }
      }
    }),
    { numRuns: 3000 },
  );
});

Deno.test("responses echo the fence fields; display info, capset info, map info layouts", () => {
  const cmd: P.CtrlHdr = {
    type: P.CMD_SUBMIT_3D,
    flags: P.VIRTIO_GPU_FLAG_FENCE | P.VIRTIO_GPU_FLAG_INFO_RING_IDX,
    fenceId: 42n,
    ctxId: 3,
    ringIdx: 2,
  };
  const r = new DataView(P.responseHeader(P.RESP_OK_NODATA, cmd).buffer);
  assert.deepEqual(
    [r.getUint32(0, true), r.getUint32(4, true), r.getBigUint64(8, true), r.getUint32(16, true), r.getUint8(20)],
    [P.RESP_OK_NODATA, 3, 42n, 3, 2],
  );
  const nf = new DataView(P.responseHeader(P.RESP_ERR_UNSPEC, { ...cmd, flags: 0 }).buffer);
  assert.equal(nf.getBigUint64(8, true), 0n, "no fence, nothing echoed");
  const m = new DataView(P.respMapInfo(cmd, P.VIRTIO_GPU_MAP_CACHE_WC).buffer);
  assert.equal(m.byteLength, P.SIZEOF_RESP_MAP_INFO);
  assert.equal(m.getUint32(P.HDR_SIZE, true), P.VIRTIO_GPU_MAP_CACHE_WC);
  const ci = new DataView(P.respCapsetInfo(cmd, 2, 2, 1376).buffer);
  assert.deepEqual([ci.getUint32(24, true), ci.getUint32(28, true), ci.getUint32(32, true)], [2, 2, 1376]);
});

Deno.test("EDID: header, checksum and preferred mode for several sizes", () => {
  for (const [w, h] of [[1280, 1024], [1920, 1080], [640, 480], [3840, 2160], [1, 1], [5000, 5000]]) {
    const e = makeEdid(w, h);
    assert.equal(e.length, EDID_BLOCK_SIZE);
    assert.deepEqual([...e.subarray(0, 8)], [0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
    assert.equal(e.reduce((s, b) => s + b, 0) % 256, 0, `checksum ${w}x${h}`);
    assert.deepEqual([e[18], e[19]], [1, 4], "EDID 1.4");
    const ha = e[56] | ((e[58] >> 4) << 8), va = e[59] | ((e[61] >> 4) << 8);
    assert.deepEqual([ha, va], [Math.min(w, EDID_MAX_ACTIVE), Math.min(h, EDID_MAX_ACTIVE)]);
    const clock = (e[54] | (e[55] << 8)) * 10_000;
    const hb = e[57] | ((e[58] & 0xf) << 8), vb = e[60] | ((e[61] & 0xf) << 8);
    const hz = clock / ((ha + hb) * (va + vb));
    const small = (w + 160) * (h + 100) * 60 < 0xffff * 10_000;
    assert.ok(small ? hz > 59 && hz < 61 : hz > 20 && hz <= 61, `refresh ${hz} for ${w}x${h}`);
    assert.equal(e[75], 0xfc, "product name descriptor");
  }
});

Deno.test("formats: every virtio_gpu_formats value converts to BGRA; rectangles intersect", () => {
  const px = Uint8Array.of(10, 20, 30, 40);
  const cases: [number, number[]][] = [
    [F.VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM, [10, 20, 30, 40]],
    [F.VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM, [10, 20, 30, 255]],
    [F.VIRTIO_GPU_FORMAT_A8R8G8B8_UNORM, [40, 30, 20, 10]],
    [F.VIRTIO_GPU_FORMAT_X8R8G8B8_UNORM, [40, 30, 20, 255]],
    [F.VIRTIO_GPU_FORMAT_R8G8B8A8_UNORM, [30, 20, 10, 40]],
    [F.VIRTIO_GPU_FORMAT_X8B8G8R8_UNORM, [20, 30, 40, 255]],
    [F.VIRTIO_GPU_FORMAT_A8B8G8R8_UNORM, [20, 30, 40, 10]],
    [F.VIRTIO_GPU_FORMAT_R8G8B8X8_UNORM, [30, 20, 10, 255]],
  ];
  for (const [f, want] of cases) {
    const out = new Uint8Array(4);
    F.toBgra(f, px, 0, out, 0, 1);
    assert.deepEqual([...out], want, `format ${f}`);
    assert.ok(F.isVirtioGpuFormat(f));
  }
  assert.ok(!F.isVirtioGpuFormat(5));
  assert.deepEqual(intersect({ x: 0, y: 0, width: 10, height: 10 }, { x: 5, y: 8, width: 10, height: 10 }), {
    x: 5,
    y: 8,
    width: 5,
    height: 2,
  });
  assert.equal(intersect({ x: 0, y: 0, width: 5, height: 5 }, { x: 5, y: 0, width: 5, height: 5 }), null);
});
