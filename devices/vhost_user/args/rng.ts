// `denovm device rng --socket-path PATH`: the virtio-rng device model (devices/virtio/rng.ts) as a
// vhost-user back end (crosvm spells the socket `--socket-path`, older versions `--socket`). The
// device has no options: its bytes come from the host's CSPRNG.

import { parseArgs } from "node:util";
import { UsageError } from "../../../vmm/cli/keyvalue.ts";
import type { VirtioDevice } from "../../virtio/device.ts";
import { RngDevice } from "../../virtio/rng.ts";

/** Parse the `--socket-path`/`--socket` pair that every device type takes. */
export function socketPathOption(type: string, values: { "socket-path"?: string; socket?: string }): string {
  const socketPath = values["socket-path"] ?? values.socket;
  if (!socketPath) throw new UsageError(`${type}: --socket-path PATH is required`);
  if (values["socket-path"] && values.socket && values["socket-path"] !== values.socket) {
    throw new UsageError(`${type}: give either --socket-path or --socket, not both`);
  }
  return socketPath;
}

/** node:util parseArgs with its errors turned into one-line UsageErrors. */
export function parseOptions(
  type: string,
  args: string[],
  options: Record<string, { type: "string" | "boolean" }>,
): Record<string, string | boolean | undefined> {
  try {
    const { values } = parseArgs({ args, options, strict: true, allowPositionals: false });
    return values as Record<string, string | boolean | undefined>;
  } catch (e) {
    throw new UsageError(`${type}: ${(e as Error).message.split("\n")[0]}`);
  }
}

export function parseDeviceArgs(args: string[]): { socketPath: string; device: VirtioDevice } {
  const values = parseOptions("rng", args, {
    "socket-path": { type: "string" },
    socket: { type: "string" },
  });
  const socketPath = socketPathOption("rng", values as { "socket-path"?: string; socket?: string });
  return { socketPath, device: new RngDevice() };
}
