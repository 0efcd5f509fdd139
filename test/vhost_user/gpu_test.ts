// `denovm device gpu` behind QEMU's vhost-user-gpu front end, end to end with a real Linux
// virtio_gpu driver and real Mesa: QEMU 10 (bookworm-backports, unpacked by scripts/qemu-backports.sh)
// boots Debian's 6.1 kernel under TCG with the Mesa guest of scripts/mesa-guest.sh on virtio-blk;
// the guest runs kmscube, whose GL renderer must be virgl, i.e. Mesa's virgl driver talking to our
// virglrenderer backend. Then:
// - our screenshot of the last frame (the device's framebuffer, read back from the scanout) shows
//   the cube: background grey in the corners, saturated cube colours in the middle;
// - QEMU's own screendump of its console is that very frame, pixel for pixel: the pixels crossed
//   the vhost-user-gpu display socket (SCANOUT + UPDATE messages);
// - the device's counters show kmscube's SUBMIT_3D streams (bytes, commands walked) and the
//   transfers encoded in them.
// Also, without QEMU: the display-socket message layouts and the argument parser.

import assert from "node:assert/strict";
import { join } from "node:path";
import {
  GUEST_END,
  hmp,
  kmscubeRate,
  kmscubeRenderer,
  MesaGuest,
  mesaPrerequisites,
  type MesaSetup,
  parsePpm,
} from "../../bench/kmscube.ts";
import { DeviceProcess, JsonLineClient } from "../support/qemu.ts";
import { cubeFrameProblems } from "../../bench/kmscube_kvm.ts";
import {
  encodeScanout,
  encodeUpdate,
  GPU_UPDATE_HEADER_SIZE,
  VHOST_USER_GPU_HDR_SIZE,
  VhostUserGpuRequest,
} from "../../devices/vhost_user/gpu_socket.ts";
import { parseGpuArgs } from "../../vmm/cli/devices/gpu.ts";
import { decodePngRgba } from "../../devices/virtio/gpu/png.ts";

Deno.test("vhost-user-gpu display socket: SCANOUT and UPDATE layouts (vhost-user-gpu.rst)", () => {
  const s = new DataView(encodeScanout(1, 640, 480).buffer);
  assert.deepEqual(
    [s.getUint32(0, true), s.getUint32(4, true), s.getUint32(8, true)],
    [VhostUserGpuRequest.SCANOUT, 0, 12],
  );
  assert.deepEqual([s.getUint32(12, true), s.getUint32(16, true), s.getUint32(20, true)], [1, 640, 480]);
  // A 4x3 B8G8R8A8 framebuffer whose pixel (x,y) is [x, y, 7, 255]; update the 2x2 rect at (1,1).
  const fb = new Uint8Array(4 * 3 * 4);
  for (let y = 0; y < 3; y++) for (let x = 0; x < 4; x++) fb.set([x, y, 7, 255], (y * 4 + x) * 4);
  const u = encodeUpdate(0, { x: 1, y: 1, width: 2, height: 2 }, fb, 4);
  const v = new DataView(u.buffer);
  assert.equal(v.getUint32(0, true), VhostUserGpuRequest.UPDATE);
  assert.equal(v.getUint32(8, true), GPU_UPDATE_HEADER_SIZE + 2 * 2 * 4);
  const p = VHOST_USER_GPU_HDR_SIZE;
  assert.deepEqual([1, 2, 3, 4, 5].map((i) => v.getUint32(p + 4 * (i - 1), true)), [0, 1, 1, 2, 2]);
  const px = [...u.subarray(p + GPU_UPDATE_HEADER_SIZE)];
  assert.deepEqual(px, [1, 1, 7, 255, 2, 1, 7, 255, 1, 2, 7, 255, 2, 2, 7, 255]);
});

Deno.test("denovm device gpu: arguments", () => {
  const a = parseGpuArgs(["--socket-path", "/tmp/s", "--context-types", "virgl2", "--width", "800", "--height", "600"]);
  assert.deepEqual(a, {
    socketPath: "/tmp/s",
    backend: "virglrenderer",
    contextTypes: ["virgl2"],
    width: 800,
    height: 600,
  });
  assert.equal(parseGpuArgs(["--socket", "/s", "--params", '{"mode":"2d"}']).backend, "2d");
  assert.equal(parseGpuArgs(["--socket-path", "/s", "--backend", "3d"]).backend, "virglrenderer");
  for (
    const bad of [
      [],
      ["--socket-path", "/s", "--backend", "gfx"],
      ["--socket-path", "/s", "--context-types", "vulkan"],
      ["--socket-path", "/s", "--width", "800"],
      ["--socket-path", "/s", "--width", "0", "--height", "1"],
      ["--socket-path", "/s", "--params", "{"],
      ["--socket-path", "/s", "--bogus"],
    ]
  ) {
    assert.throws(() => parseGpuArgs(bad), (e: Error) => e.name === "UsageError", bad.join(" "));
  }
});

// ---- end to end ----

const setup: MesaSetup | string = await mesaPrerequisites();
const skipReason = typeof setup === "string" ? setup : undefined;
if (skipReason) console.log(`vhost_user_gpu_test: skipping the QEMU + Mesa test: ${skipReason}`);

const FRAMES = 60;

interface Stats {
  gpu: {
    backend: string;
    totals: Record<string, number>;
    streams: { submits: number; virglCommands: number; truncated: number; streamBytes: number };
    commands: Record<string, { count: number; errors: number }>;
    scanouts: Record<string, {
      flushes: number;
      damagedBytes: number;
      readbackBytes: number;
      readbackBy: { vhostUser: number; screenshot: number };
      sentTo: { vhostUser: number };
    }>;
  };
  display: {
    scanouts: number;
    updates: number;
    updateBytes: number;
    sockets: number;
    idle: boolean;
    scanoutReadbackBytes: number;
  };
  framebuffer: { width: number; height: number };
}

Deno.test({
  name: "vhost-user-gpu: kmscube on real Mesa renders through denovm's virglrenderer backend under QEMU 10",
  ignore: skipReason !== undefined,
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async () => {
    const s = setup as MesaSetup;
    const dir = await Deno.makeTempDir({ prefix: "denovm-vugpu-" });
    const sock = join(dir, "gpu.sock"), control = join(dir, "control.sock"), monitor = join(dir, "mon.sock");
    const dev = await DeviceProcess.start("gpu", [
      "--socket-path",
      sock,
      "--control-socket",
      control,
      "--context-types",
      "virgl:virgl2",
    ]);
    let guest: MesaGuest | undefined;
    try {
      // The guest waits on its console after kmscube, so QEMU still shows the frame when we look.
      guest = new MesaGuest(s, {
        gpu: { vhostUserSocket: sock },
        monitor,
        command: `kmscube -c ${FRAMES}; s=$?; echo KMSCUBE-DONE status=$s; read -r line; exit $s`,
      });
      await guest.waitFor(/KMSCUBE-DONE status=\d+/);
      assert.match(guest.output, /KMSCUBE-DONE status=0/, guest.output);
      const renderer = kmscubeRenderer(guest.output);
      assert.ok(renderer?.includes("virgl"), `GL_RENDERER "${renderer}" is not virgl:\n${guest.output}`);
      const rate = kmscubeRate(guest.output);
      console.log(`renderer "${renderer}"; kmscube: ${rate?.frames} frames, ${rate?.fps} fps`);

      const client = await JsonLineClient.connect(control);
      const stats = async () => (await client.call({ stats: true })) as unknown as Stats;
      // Wait until the display socket has handed QEMU every update.
      for (let i = 0; i < 300 && !(await stats()).display.idle; i++) await new Promise((r) => setTimeout(r, 50));

      // Our screenshot: the last frame kmscube flushed.
      const png = join(dir, "denovm.png");
      assert.equal((await client.call({ screenshot: png })).ok, true);
      const ours = await decodePngRgba(await Deno.readFile(png));
      assert.deepEqual([ours.width, ours.height], [1280, 1024]);
      const at = (
        x: number,
        y: number,
      ) => [...ours.rgba.subarray((y * ours.width + x) * 4, (y * ours.width + x) * 4 + 3)];
      // Corners kmscube's grey; the middle the cube, in saturated vertex colours of two hues or more.
      assert.deepEqual(cubeFrameProblems(ours.width, ours.height, at), []);

      // QEMU's console shows the same frame: it came over the display socket. QEMU reads the socket
      // in its main loop, so a screendump may still precede the last UPDATE: look a few times.
      let same = false, differing = -1;
      for (let attempt = 0; attempt < 20 && !same; attempt++) {
        const ppm = join(dir, `qemu-${attempt}.ppm`);
        await hmp(monitor, `screendump ${ppm}`);
        const q = parsePpm(await Deno.readFile(ppm));
        assert.deepEqual([q.width, q.height], [ours.width, ours.height]);
        differing = 0;
        for (let i = 0; i < q.width * q.height; i++) {
          if (
            q.rgb[3 * i] !== ours.rgba[4 * i] || q.rgb[3 * i + 1] !== ours.rgba[4 * i + 1] ||
            q.rgb[3 * i + 2] !== ours.rgba[4 * i + 2]
          ) differing++;
        }
        same = differing === 0;
        if (!same) await new Promise((r) => setTimeout(r, 100));
      }
      assert.ok(same, `QEMU's screendump differs from our frame in ${differing} pixels`);

      const st = await stats();
      client.close();
      console.log(
        `SUBMIT_3D: ${st.gpu.streams.submits} streams, ${st.gpu.streams.streamBytes} bytes, ` +
          `${st.gpu.streams.virglCommands} virgl commands; in-stream to-host transfers ` +
          `${st.gpu.totals.streamToHostBytes} bytes; display: ${st.display.updates} updates, ` +
          `${st.display.updateBytes} bytes`,
      );
      assert.equal(st.gpu.backend, "virglrenderer");
      // One SUBMIT_3D per frame at least, every stream walked to its end.
      assert.ok(st.gpu.commands.SUBMIT_3D.count >= FRAMES, `SUBMIT_3D count ${st.gpu.commands.SUBMIT_3D.count}`);
      assert.equal(st.gpu.commands.SUBMIT_3D.errors, 0);
      assert.ok(st.gpu.streams.submits >= FRAMES);
      assert.ok(st.gpu.streams.streamBytes >= st.gpu.streams.submits * 4 * 4, "streams carry commands");
      assert.equal(st.gpu.streams.truncated, 0);
      // kmscube's vertex data goes up inside the stream (VIRGL_CCMD_TRANSFER3D to host or an inline
      // write), never as a virtio TRANSFER_*_3D command.
      const inStream = st.gpu.totals.streamToHostBytes + st.gpu.totals.inlineWriteBytes +
        st.gpu.totals.copyTransferToHostBytes;
      assert.ok(inStream > 0, `no in-stream transfer counted: ${JSON.stringify(st.gpu.totals)}`);
      assert.equal(
        st.gpu.totals.bytesCopied,
        inStream + st.gpu.totals.transferToHostBytes +
          st.gpu.totals.transferFromHostBytes + st.gpu.totals.streamFromHostBytes +
          st.gpu.totals.copyTransferFromHostBytes,
      );
      // Scanout flips: one SET_SCANOUT/RESOURCE_FLUSH per frame; the display socket sent updates.
      assert.ok(st.gpu.commands.RESOURCE_FLUSH.count >= FRAMES);
      assert.equal(st.display.sockets, 1);
      assert.ok(st.display.scanouts >= 1 && st.display.updates >= 1);
      // The scanout is read back only for a consumer (the front end, our screenshot), at its pace and only
      // what was flushed: never more than the flushes damaged; what the front end got was counted as sent.
      // Mesa's scanout buffers are virgl 3D resources shown with SET_SCANOUT: no blob scanout here.
      console.log(
        `scanout commands: SET_SCANOUT ${st.gpu.commands.SET_SCANOUT?.count ?? 0}, ` +
          `SET_SCANOUT_BLOB ${st.gpu.commands.SET_SCANOUT_BLOB?.count ?? 0}, RESOURCE_CREATE_BLOB ` +
          `${st.gpu.commands.RESOURCE_CREATE_BLOB?.count ?? 0}`,
      );
      assert.ok((st.gpu.commands.SET_SCANOUT?.count ?? 0) >= 1);
      assert.equal(st.gpu.commands.SET_SCANOUT_BLOB?.count ?? 0, 0);
      const sc = st.gpu.scanouts["0"];
      assert.ok(sc.flushes >= FRAMES);
      assert.equal(sc.damagedBytes, sc.flushes * ours.width * ours.height * 4, "kmscube flushes whole frames");
      assert.ok(sc.readbackBy.vhostUser > 0, "read back for the front end");
      assert.ok(sc.readbackBytes <= sc.damagedBytes, `${sc.readbackBytes} read back of ${sc.damagedBytes} damaged`);
      assert.equal(st.display.scanoutReadbackBytes, sc.readbackBytes);
      assert.ok(sc.sentTo.vhostUser > st.display.updateBytes, "UPDATE messages: pixels and their headers");

      await guest.type("\n");
      const r = await guest.wait();
      assert.equal(r.killed, false, r.output);
      assert.match(r.output, new RegExp(`${GUEST_END} status=0`));
    } finally {
      guest?.kill();
      const status = await dev.stop();
      assert.equal(status.code, 0, dev.stderr);
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});
