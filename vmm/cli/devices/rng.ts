// `denovm device rng --socket-path PATH`: the virtio-rng device model (devices/virtio/rng.ts) as a
// vhost-user back end (crosvm spells the socket `--socket-path`, older versions `--socket`). The
// device has no options: its bytes come from the host's CSPRNG. `run` has one unless `--no-rng` is given.
// See common.ts for how the family modules are organised.

import type { VirtioDevice } from "../../../devices/virtio/device.ts";
import { RngDevice } from "../../../devices/virtio/rng.ts";
import { parseOptions, SOCKET_OPTIONS, socketPathOption } from "./common.ts";

export function parseDeviceArgs(args: string[]): { socketPath: string; device: VirtioDevice } {
  const values = parseOptions("rng", args, SOCKET_OPTIONS);
  const socketPath = socketPathOption("rng", values);
  return { socketPath, device: new RngDevice() };
}
