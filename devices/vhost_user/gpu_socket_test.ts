// The vhost-user-gpu display socket as the consumer of the display: with no front end socket a flushed
// frame is not read back; once a front end gives its socket, the scanout is read back when an UPDATE is
// encoded, only the damaged rectangles, and what was read and sent is in the GPU's counters per scanout.

import assert from "node:assert/strict";
import { join } from "node:path";
import { UnixListener, UnixStream } from "../../core/unix_socket.ts";
import { Backend2D } from "../virtio/gpu/backend_2d.ts";
import { VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM } from "../virtio/gpu/formats.ts";
import {
  GPU_SCANOUT_PAYLOAD_SIZE,
  GPU_UPDATE_HEADER_SIZE,
  MIN_UPDATE_INTERVAL_MS,
  VHOST_USER_GPU_HDR_SIZE,
  VHOST_USER_GPU_SET_SOCKET,
  VhostUserGpuDevice,
  VhostUserGpuRequest,
} from "./gpu_socket.ts";

const W = 64, H = 32;

/** The next message the front end receives: request, payload. */
async function receive(front: UnixStream): Promise<{ request: number; payload: Uint8Array }> {
  const hdr = await front.recvExact(VHOST_USER_GPU_HDR_SIZE);
  const v = new DataView(hdr.data.buffer);
  const size = v.getUint32(8, true);
  const body = size > 0 ? (await front.recvExact(size)).data : new Uint8Array();
  return { request: v.getUint32(0, true), payload: body };
}

/** Close the device (its display socket included), the front end's end, the listener and the folder. */
async function closeRig(
  dev: VhostUserGpuDevice,
  front: UnixStream | undefined,
  listener: UnixListener,
  dir: string,
): Promise<void> {
  const sock = dev.displaySocket;
  dev.close();
  await sock?.done;
  front?.close();
  listener.close();
  await Deno.remove(dir, { recursive: true });
}

/** Receive until an UPDATE arrives; returns its rectangle and pixels. */
async function nextUpdate(front: UnixStream) {
  for (;;) {
    const m = await receive(front);
    if (m.request !== VhostUserGpuRequest.UPDATE) continue;
    const v = new DataView(m.payload.buffer, m.payload.byteOffset);
    return {
      rect: {
        x: v.getUint32(4, true),
        y: v.getUint32(8, true),
        width: v.getUint32(12, true),
        height: v.getUint32(16, true),
      },
      pixels: m.payload.subarray(GPU_UPDATE_HEADER_SIZE),
      messageBytes: VHOST_USER_GPU_HDR_SIZE + m.payload.length,
    };
  }
}

Deno.test("vhost-user-gpu display socket: no read-back without a front end; with one, only the damage, at its pace", async () => {
  const dir = await Deno.makeTempDir({ prefix: "denovm-gpusock-" });
  const listener = UnixListener.listen(join(dir, "display.sock"));
  const backend = new Backend2D();
  const lines: string[] = [];
  const dev = new VhostUserGpuDevice({ backend, displays: [{ width: W, height: H }], log: (l) => lines.push(l) });
  let front: UnixStream | undefined;
  try {
    // A resource on scanout 0 (filled as a restored 2D resource would be: no guest needed here).
    const px = new Uint8Array(W * H * 4);
    for (let i = 0; i < px.length; i++) px[i] = (i * 7 + 3) & 0xff;
    backend.createResource2D({ resourceId: 1, format: VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM, width: W, height: H });
    backend.restoreHostContents(1, px);
    const full = { x: 0, y: 0, width: W, height: H };
    dev.display.setScanout(0, { resourceId: 1, rect: full });
    for (let i = 0; i < 30; i++) dev.display.flush(0, full);
    assert.equal(dev.stats().scanoutReadbackBytes, 0, "no front end socket: nothing read back");
    assert.equal(dev.gpuStats().scanouts["0"].flushes, 30);

    // The front end gives its socket: the screen goes out once, read back once for the thirty frames.
    front = UnixStream.connect(join(dir, "display.sock"));
    const served = await listener.accept();
    assert.equal(dev.vhostUserRequest(VHOST_USER_GPU_SET_SOCKET, new Uint8Array(), [served.fd]), true);
    const first = await nextUpdate(front);
    assert.deepEqual(first.rect, full);
    assert.deepEqual(first.pixels, px, "the front end got the resource's pixels (B8G8R8A8 = x8r8g8b8 LE)");
    let s = dev.gpuStats().scanouts["0"];
    assert.equal(s.readbackBy.vhostUser, W * H * 4);
    assert.equal(s.readbacks, 1);
    assert.equal(s.sentTo.vhostUser, first.messageBytes);

    // Three flushes of one small rectangle before the socket gets to send: one UPDATE, one read of it.
    const r = { x: 5, y: 6, width: 7, height: 3 };
    px[(r.y * W + r.x) * 4] = 0x42;
    backend.restoreHostContents(1, px);
    for (let i = 0; i < 3; i++) dev.display.flush(0, r);
    const second = await nextUpdate(front);
    assert.deepEqual(second.rect, r);
    assert.equal(second.pixels[0], 0x42);
    s = dev.gpuStats().scanouts["0"];
    assert.equal(s.readbackBytes, (W * H + r.width * r.height) * 4, "only the damaged bytes read back");
    assert.equal(s.readbacks, 2);
    assert.equal(s.sentTo.vhostUser, first.messageBytes + second.messageBytes);
    const st = dev.stats();
    assert.equal(st.scanoutReadbackBytes, (W * H + r.width * r.height) * 4);
    assert.equal(st.displayUpdateBytes, (W * H + r.width * r.height) * 4);
    assert.equal(dev.gpuStats().totals.displaySentBytes, s.sentTo.vhostUser);
    assert.equal(GPU_SCANOUT_PAYLOAD_SIZE, 12);
    assert.deepEqual(lines, []);
  } finally {
    await closeRig(dev, front, listener, dir);
  }
});

/** Resolves once `cond()` holds (checked every few milliseconds; a bound keeps a broken test from hanging). */
async function until(cond: () => boolean, what: string): Promise<void> {
  for (let i = 0; i < 2000; i++) {
    if (cond()) return;
    await new Promise((r) => setTimeout(r, 5));
  }
  throw new Error(`never: ${what}`);
}

Deno.test("vhost-user-gpu display socket: only changed tiles cross, at most one update per refresh period, the last frame follows", async () => {
  const TW = 256, TH = 128;
  const dir = await Deno.makeTempDir({ prefix: "denovm-gpusock-" });
  const listener = UnixListener.listen(join(dir, "display.sock"));
  const backend = new Backend2D();
  const lines: string[] = [];
  let clock = 1000;
  const dev = new VhostUserGpuDevice({
    backend,
    displays: [{ width: TW, height: TH }],
    log: (l) => lines.push(l),
    now: () => clock,
  });
  let front: UnixStream | undefined;
  try {
    const px = new Uint8Array(TW * TH * 4).fill(0x80);
    backend.createResource2D({ resourceId: 1, format: VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM, width: TW, height: TH });
    backend.restoreHostContents(1, px);
    const full = { x: 0, y: 0, width: TW, height: TH };
    dev.display.setScanout(0, { resourceId: 1, rect: full });
    dev.display.flush(0, full);
    front = UnixStream.connect(join(dir, "display.sock"));
    const served = await listener.accept();
    dev.vhostUserRequest(VHOST_USER_GPU_SET_SOCKET, new Uint8Array(), [served.fd]);
    // A new front end gets the whole screen, changed or not.
    assert.deepEqual((await nextUpdate(front)).rect, full);
    const sock = dev.displaySocket!;

    // The whole screen flushed, nothing different: read back, compared, nothing sent.
    clock += MIN_UPDATE_INTERVAL_MS;
    dev.display.flush(0, full);
    await until(() => sock.counters.unchanged === 1 && sock.idle, "the unchanged flush was looked at");
    assert.equal(sock.counters.updates, 1);

    // One pixel changes in tile (1, 1) of a whole-screen flush: that tile alone crosses.
    clock += MIN_UPDATE_INTERVAL_MS;
    const at = (100 * TW + 70) * 4;
    px[at] = 0x11;
    backend.restoreHostContents(1, px);
    dev.display.flush(0, full);
    const tile = await nextUpdate(front);
    assert.deepEqual(tile.rect, { x: 64, y: 64, width: 64, height: 64 });
    assert.equal(tile.pixels[((100 - 64) * 64 + (70 - 64)) * 4], 0x11);

    // A frame right after: held back while the refresh period since the last update is not over...
    px[at] = 0x22;
    backend.restoreHostContents(1, px);
    dev.display.flush(0, full);
    await new Promise((r) => setTimeout(r, 3 * MIN_UPDATE_INTERVAL_MS));
    assert.equal(sock.counters.updates, 2, "no update inside one refresh period");
    assert.equal(sock.idle, false, "the frame waits");
    // ...then two more frames: once the period is over, the newest frame goes out, once.
    px[at] = 0x33;
    backend.restoreHostContents(1, px);
    dev.display.flush(0, full);
    px[at] = 0x44;
    backend.restoreHostContents(1, px);
    dev.display.flush(0, full);
    clock += MIN_UPDATE_INTERVAL_MS;
    const last = await nextUpdate(front);
    assert.deepEqual(last.rect, { x: 64, y: 64, width: 64, height: 64 });
    assert.equal(last.pixels[((100 - 64) * 64 + (70 - 64)) * 4], 0x44, "the last frame's pixel");
    await until(() => sock.idle, "the socket went idle");
    assert.equal(sock.counters.updates, 3);
    assert.equal(sock.counters.updateBytes, (TW * TH + 2 * 64 * 64) * 4);
    assert.deepEqual(lines, []);
  } finally {
    await closeRig(dev, front, listener, dir);
  }
});
