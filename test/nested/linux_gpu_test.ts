// Real Mesa under denovm's own KVM: the Mesa guest of scripts/mesa-guest.sh (Debian's 6.1 kernel, Mesa's
// virgl Gallium driver, kmscube) booted by the library's Vm with `--gpu backend=virglrenderer`, and the same
// guest under bookworm-backports' QEMU 10 with `-accel kvm` and its in-process virgl (virtio-gpu-gl-device
// on virtio-mmio, egl-headless), on the same KVM. On each, kmscube renders FRAMES frames through virgl, and
// glmark2 draws its build scene and checks the pixels it reads back through virgl against its reference
// ("Validation: Success"). Under denovm the screenshot after kmscube is kmscube's frame: grey corners, the
// cube's saturated colours in the middle (QEMU 10 answers its screendump for a GL scanout with "no surface"
// or a blank console, so its pixels are glmark2's check alone). Under denovm the copy counters show the guest's SUBMIT_3D
// streams and transfers, one flush per frame on scanout 0, no scanout read back while nobody looked, and
// one read-back for the screenshot. Where LLVM cannot generate code for the host's CPU (the nested host's:
// bench/kmscube.ts hostRenderingEnv) both sides render with Mesa's softpipe. Needs a KVM that runs unmodified kernels (the nested host when this
// machine has none: test/nested/nested_kvm_test.ts lists this file, and prepares the Mesa guest first).

import assert from "node:assert/strict";
import {
  GUEST_END,
  hostRenderingEnv,
  kmscubeRate,
  kmscubeRenderer,
  mesaPrerequisites,
  type MesaSetup,
} from "../../bench/kmscube.ts";
import { bootMesaVm, cubeFrameProblems, MESA_KVM_DISPLAY, qemuMesaGuest } from "../../bench/kmscube_kvm.ts";
import { fullLinuxUnavailable } from "../support/default_guest.ts";
import { within } from "../support/within.ts";
import { decodePngRgba } from "../../devices/virtio/gpu/png.ts";
import type { GpuStats } from "../../devices/virtio/gpu/accounting.ts";

const FRAMES = 20;
/** Under nested_kvm_test.ts's 8 silent minutes; kmscube on llvmpipe in the nested host is slow. */
const KMSCUBE_TIMEOUT_MS = 420_000;
/**
 * kmscube, then the guest waits for a line on its console (its last frame is still shown when we look), then
 * glmark2 draws its build scene off-screen, reads the pixels back through virgl and compares them with its
 * reference image ("Validation: Success").
 */
const COMMAND = `kmscube -c ${FRAMES}; s=$?; echo KMSCUBE-DONE status=$s; read -r line; ` +
  `glmark2-es2-drm --off-screen --validate -b build 2>&1; echo GLMARK2-DONE status=$?; exit $s`;
const DONE = /KMSCUBE-DONE status=(\d+)/;
const GLMARK2_VALID = /\[build\] <default>: Validation: Success/;

Deno.test("hostRenderingEnv: softpipe where LLVM takes the CPU for a 32-bit Athlon (QEMU TCG's -cpu max), nothing elsewhere", () => {
  const cpu = (vendor: string, family: number) => `processor\t: 0\nvendor_id\t: ${vendor}\ncpu family\t: ${family}\n`;
  assert.deepEqual(hostRenderingEnv(cpu("AuthenticAMD", 6)), { GALLIUM_DRIVER: "softpipe", DRAW_USE_LLVM: "false" });
  assert.deepEqual(hostRenderingEnv(cpu("AuthenticAMD", 25)), {});
  assert.deepEqual(hostRenderingEnv(cpu("GenuineIntel", 6)), {});
  assert.deepEqual(hostRenderingEnv(""), {});
});

Deno.test("cubeFrameProblems: a kmscube-like frame passes; a grey, a one-colour and a cube-less frame do not", () => {
  const w = 320, h = 240;
  const frame = (f: (x: number, y: number) => number[]) => f;
  const grey = frame(() => [0x80, 0x80, 0x80]);
  const cube = frame((x, y) =>
    Math.abs(x - w / 2) < 110 && Math.abs(y - h / 2) < 110
      ? (x < w / 2 ? [200, 30, 30] : [30, 30, 200])
      : [0x80, 0x80, 0x80]
  );
  const red = frame((x, y) =>
    Math.abs(x - w / 2) < 110 && Math.abs(y - h / 2) < 110 ? [200, 30, 30] : [0x80, 0x80, 0x80]
  );
  const black = frame(() => [0, 0, 0]);
  assert.deepEqual(cubeFrameProblems(w, h, cube), []);
  assert.ok(cubeFrameProblems(w, h, grey).some((p) => p.includes("non-background")));
  assert.ok(cubeFrameProblems(w, h, red).some((p) => p.includes("one dominant channel")));
  assert.ok(cubeFrameProblems(w, h, black).some((p) => p.includes("corner")));
});

const unavailable = fullLinuxUnavailable();
const setup: MesaSetup | string = unavailable ?? await mesaPrerequisites();
const skip = typeof setup === "string" ? setup : undefined;
if (skip) console.log(`skip: linux gpu: ${skip}`);

Deno.test({
  name:
    "linux: kmscube on Mesa's virgl under denovm --gpu backend=virglrenderer: its frame on screen, its copies counted",
  ignore: skip !== undefined,
  async fn() {
    const s = setup as MesaSetup;
    await using vm = await bootMesaVm(s, COMMAND);
    await vm.console.waitFor(DONE, { timeout: KMSCUBE_TIMEOUT_MS });
    const output = vm.console.text;
    assert.match(output, /KMSCUBE-DONE status=0/, output);
    const renderer = kmscubeRenderer(output);
    assert.ok(renderer?.includes("virgl"), `GL_RENDERER "${renderer}" is not virgl:\n${output}`);
    const rate = kmscubeRate(output);
    console.log(`denovm: renderer "${renderer}"; kmscube: ${rate?.frames} frames, ${rate?.fps} fps`);

    // Nobody has looked at the display yet: kmscube's frames were flushed (damage recorded), never read back.
    const before = vm.gpu.stats() as GpuStats;
    const sc0 = before.scanouts["0"];
    assert.ok(sc0, `scanout 0 has no counters: ${JSON.stringify(before.scanouts)}`);
    console.log(`scanout 0 before the screenshot: ${JSON.stringify(sc0)}`);
    assert.ok(sc0.flushes >= FRAMES, `${sc0.flushes} flushes for ${FRAMES} frames`);
    assert.ok(sc0.damagedBytes > 0);
    assert.deepEqual(
      [sc0.readbackBy.screenshot, sc0.readbackBy.web, sc0.readbackBy.vhostUser, sc0.readbackBy.snapshot],
      [0, 0, 0, 0],
      "read back with no consumer",
    );
    assert.equal(sc0.readbackBytes, sc0.readbackBy.lastFrame, "only a disabled scanout's last frame is read back");
    assert.deepEqual(sc0.sentTo, { screenshot: 0, web: 0, vhostUser: 0 });

    // The guest's side: one SUBMIT_3D stream per frame at least, each walked to its end; kmscube's vertex data
    // went up inside the streams.
    assert.equal(before.backend, "virglrenderer");
    assert.ok(before.commands.SUBMIT_3D.count >= FRAMES, `SUBMIT_3D count ${before.commands.SUBMIT_3D.count}`);
    assert.equal(before.commands.SUBMIT_3D.errors, 0);
    assert.ok(before.streams.submits >= FRAMES && before.streams.streamBytes >= before.streams.submits * 16);
    assert.equal(before.streams.truncated, 0);
    const t = before.totals;
    const inStream = t.streamToHostBytes + t.inlineWriteBytes + t.copyTransferToHostBytes;
    assert.ok(inStream > 0, `no in-stream transfer counted: ${JSON.stringify(t)}`);
    assert.ok(before.commands.RESOURCE_FLUSH.count >= FRAMES);
    assert.equal(before.commands.SET_SCANOUT_BLOB?.count ?? 0, 0, "Mesa's virgl scans out 3D resources");

    // The screenshot: kmscube's last frame.
    const shot = await decodePngRgba(await vm.screenshot());
    assert.deepEqual([shot.width, shot.height], [MESA_KVM_DISPLAY.width, MESA_KVM_DISPLAY.height]);
    const at = (
      x: number,
      y: number,
    ) => [...shot.rgba.subarray((y * shot.width + x) * 4, (y * shot.width + x) * 4 + 3)];
    assert.deepEqual(cubeFrameProblems(shot.width, shot.height, at), []);

    // Its read-back is counted as the screenshot's, at most one frame, and the PNG as sent to it.
    const after = (vm.gpu.stats() as GpuStats).scanouts["0"];
    console.log(`scanout 0 after the screenshot: ${JSON.stringify(after)}`);
    const frameBytes = shot.width * shot.height * 4;
    assert.ok(after.readbackBy.screenshot > 0 || sc0.readbackBy.lastFrame > 0, "the screenshot read nothing back");
    assert.ok(
      after.readbackBy.screenshot <= frameBytes,
      `${after.readbackBy.screenshot} bytes read for one screenshot`,
    );
    assert.equal(after.screenshots, 1);
    assert.ok(after.sentTo.screenshot > 0);
    assert.deepEqual([after.readbackBy.web, after.readbackBy.vhostUser], [0, 0]);

    vm.send("\n");
    assert.equal(await within(vm.exitCode, () => "the guest did not power off", KMSCUBE_TIMEOUT_MS), 0);
    assert.match(vm.console.text, GLMARK2_VALID, vm.console.text.slice(-3000));
    assert.match(vm.console.text, new RegExp(`${GUEST_END} status=0`));
  },
});

Deno.test({
  name:
    "linux: kmscube and glmark2 on Mesa's virgl under QEMU 10 -accel kvm with virtio-gpu-gl-device render; glmark2 finds its pixels right",
  ignore: skip !== undefined,
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const s = setup as MesaSetup;
    const guest = qemuMesaGuest(s, COMMAND, KMSCUBE_TIMEOUT_MS + 120_000);
    try {
      await guest.waitFor(DONE);
      assert.match(guest.output, /KMSCUBE-DONE status=0/, guest.output);
      const renderer = kmscubeRenderer(guest.output);
      assert.ok(renderer?.includes("virgl"), `GL_RENDERER "${renderer}" is not virgl:\n${guest.output}`);
      const rate = kmscubeRate(guest.output);
      console.log(`QEMU: renderer "${renderer}"; kmscube: ${rate?.frames} frames, ${rate?.fps} fps`);
      await guest.type("\n");
      const r = await guest.wait();
      assert.equal(r.killed, false, r.output);
      assert.match(r.output, GLMARK2_VALID, r.output.slice(-3000));
      assert.match(r.output, new RegExp(`${GUEST_END} status=0`));
    } finally {
      guest.kill();
    }
  },
});
