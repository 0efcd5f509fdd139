// Which virtio device models a VmConfig asks for, in the order they get
// virtio-mmio slots (and so /dev/vdX letters for block devices).

import { BlockDevice } from "../devices/virtio/block.ts";
import type { VirtioDevice } from "../devices/virtio/device.ts";
import type { VmConfig } from "./config.ts";

/** A device model that exists in a later version; asked for explicitly, it is an error. */
export class UnavailableDeviceError extends Error {
  readonly exitCode = 35;
  constructor(what: string) {
    super(`${what} is not available in this version of denovm`);
    this.name = "UnavailableDeviceError";
  }
}

/** Build the device models for `config`. Block devices come first, in command-line order. */
export function createVirtioDevices(config: VmConfig): VirtioDevice[] {
  const devices: VirtioDevice[] = [];
  try {
    for (const b of config.blocks) {
      devices.push(
        new BlockDevice({
          path: b.path,
          readOnly: b.ro,
          sparse: b.sparse,
          blockSize: b.blockSize,
          id: b.id,
          direct: b.direct,
        }),
      );
    }
    if (config.nets.length > 0) throw new UnavailableDeviceError("--net");
    if (config.inputs.length > 0) throw new UnavailableDeviceError("--input");
    if (config.vsock) throw new UnavailableDeviceError("--vsock");
    if (config.gpu) throw new UnavailableDeviceError("--gpu");
    if (config.serials.some((s) => s.hardware === "virtio-console")) {
      throw new UnavailableDeviceError("--serial hardware=virtio-console");
    }
  } catch (e) {
    for (const d of devices) d.close?.();
    throw e;
  }
  return devices;
}
