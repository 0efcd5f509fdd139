// The GPU, the display and the input devices of a running VM as its fronts use them: the library
// Vm, `denovm run` (the web display, the GPU summary at exit) and the control socket (gpu stats,
// screenshot).

import { VIRTIO_ID_GPU } from "../../devices/virtio/device.ts";
import type { GpuDevice } from "../../devices/virtio/gpu/device.ts";
import { InputDevice } from "../../devices/virtio/input/device.ts";
import type { Machine } from "../machine.ts";
import { checkOutputPath } from "../vm_files.ts";

/**
 * The GPU device, if the VM has one. Found by its virtio device type: its module is loaded only
 * for VMs with a GPU (vmm/device_manager/virtio_devices.ts), so there is no class to test against here.
 */
export function gpuOf(m: Machine): GpuDevice | undefined {
  return m.devices.virtio.find((v) => v.device.deviceType === VIRTIO_ID_GPU)?.device as GpuDevice | undefined;
}

/** The VM's virtio-input devices (keyboard, mouse, touch), in slot order. */
export function inputDevicesOf(m: Machine): InputDevice[] {
  return m.devices.virtio.map((v) => v.device).filter((d): d is InputDevice => d instanceof InputDevice);
}

/** The GPU's copy counters. */
export function gpuStats(m: Machine): object {
  const gpu = gpuOf(m);
  if (!gpu) throw new Error("not available: this VM has no GPU (--gpu)");
  return gpu.gpuStats();
}

/** The GPU's copy summary (a few lines), or undefined without a GPU. */
export function gpuSummary(m: Machine): string | undefined {
  return gpuOf(m)?.summary();
}

/** PNG of scanout 0. */
export function screenshot(m: Machine): Promise<Uint8Array> {
  const gpu = gpuOf(m);
  if (!gpu) return Promise.reject(new Error("not available: this VM has no display (--gpu)"));
  return gpu.screenshot(0);
}

/** Write a PNG of scanout 0 to `path`, which must not be one of the VM's inputs (vmm/vm_files.ts). */
export async function screenshotTo(m: Machine, path: string): Promise<void> {
  const png = await screenshot(m);
  checkOutputPath(`screenshot ${path}`, path, m.config);
  await Deno.writeFile(path, png);
}

/**
 * Serve `--gpu displays=[[mode=web,port=N]]` as a web page on 127.0.0.1 (vmm/ui/web_display/) until
 * the machine closes; returns its URL, which carries the VM's access token, or undefined when no
 * display asks for it.
 */
export async function startWebDisplay(m: Machine): Promise<string | undefined> {
  const displays = m.config.gpu?.displays ?? [];
  const index = displays.findIndex((d) => d.mode === "web");
  if (index < 0) return undefined;
  const web = displays[index];
  const gpu = gpuOf(m);
  if (!gpu) return undefined;
  const inputs = inputDevicesOf(m);
  // Imported here, not with the VMM: most VMs have no web display (and its PNG path loads node:zlib).
  const { WebDisplay } = await import("../ui/web_display/server.ts");
  const server = new WebDisplay({
    display: gpu.display,
    input: {
      keyboard: inputs.find((d) => d.kind === "keyboard"),
      pointer: inputs.find((d) => d.kind === "mouse"),
      touch: inputs.find((d) => d.kind === "multi-touch" || d.kind === "single-touch"),
    },
    stats: () => gpu.gpuStats(),
    port: web.port ?? 0,
    name: `--gpu displays[${index}] (mode=web${web.port ? `,port=${web.port}` : ""})`,
  });
  const { url } = await server.start();
  if (m.closed) {
    // The VM ended while the display started.
    await server.close();
    return undefined;
  }
  m.onClose(() => void server.close());
  return url;
}
