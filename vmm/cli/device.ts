// `denovm device <type> ...`: run one device model as a vhost-user back end, as crosvm's `device`
// subcommand does (google/crosvm devices/src/virtio/vhost/user/device/). Each type's arguments are parsed,
// and its device built, by its family's module in devices/ (common.ts there says how); this module picks
// the module, reports errors (one line; exit 35 for bad arguments, 1 for host faults) and serves the device.

import type { VirtioDevice } from "../../devices/virtio/device.ts";
import { VhostUserBackend } from "../../devices/vhost_user/backend.ts";
import { EXIT_INVALID_ARGS, EXIT_SUCCESS, exitCodeFor } from "../../core/exit.ts";
import { UsageError } from "./keyvalue.ts";

/** What a device family module offers the `device` subcommand. */
interface DeviceModule {
  parseDeviceArgs(args: string[]): { socketPath: string; device: VirtioDevice };
  /** A usage line appended to the type's argument errors. */
  DEVICE_ARGS_USAGE?: string;
}

/** The types denovm serves, each by its family's module (loaded when asked for). */
const DEVICE_MODULES: Record<string, () => Promise<DeviceModule>> = {
  block: () => import("./devices/block.ts"),
  net: () => import("./devices/net.ts"),
  console: () => import("./devices/serial.ts"),
  vsock: () => import("./devices/vsock.ts"),
  rng: () => import("./devices/rng.ts"),
  balloon: () => import("./devices/balloon.ts"),
  input: () => import("./devices/input.ts"),
  gpu: () => import("./devices/gpu.ts"),
  snd: () => import("./devices/sound.ts"),
};
/** Types crosvm's `device` command knows that denovm does not serve. */
const NOT_AVAILABLE = ["fs", "wl"];

/** Run `device ...` (argv after the word "device"); resolves with the process exit code. */
export async function runDeviceCommand(argv: string[]): Promise<number> {
  const [type, ...rest] = argv;
  let device: VirtioDevice;
  let socketPath: string;
  const load = type === undefined ? undefined : Object.hasOwn(DEVICE_MODULES, type) ? DEVICE_MODULES[type] : undefined;
  let usage = "";
  try {
    if (type !== undefined && NOT_AVAILABLE.includes(type)) {
      console.error(`denovm device ${type}: not yet available in denovm`);
      return EXIT_INVALID_ARGS;
    }
    if (!load) {
      usage = `; types: ${[...Object.keys(DEVICE_MODULES), ...NOT_AVAILABLE].join(", ")}`;
      throw new UsageError(type === undefined ? "missing device type" : `unknown device type "${type}"`);
    }
    const mod = await load();
    if (mod.DEVICE_ARGS_USAGE) usage = `; ${mod.DEVICE_ARGS_USAGE}`;
    try {
      ({ socketPath, device } = mod.parseDeviceArgs(rest));
    } catch (e) {
      if (e instanceof UsageError) throw e;
      // A fault opening what the arguments name: its own code (1 for a host fault such as a locked disk).
      console.error(`denovm device ${type}: ${(e as Error).message}`);
      return exitCodeFor(e);
    }
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    console.error(`denovm device: ${e.message}${usage}`);
    return EXIT_INVALID_ARGS;
  }

  // The block device does its work synchronously, and this process does nothing else: it waits with a
  // blocking poll (see VhostUserBackendOptions.blockingPoll).
  const backend = new VhostUserBackend(device, socketPath, { blockingPoll: type === "block" });
  const stop = () => backend.close();
  const signals: Deno.Signal[] = ["SIGTERM", "SIGINT"];
  for (const s of signals) Deno.addSignalListener(s, stop);
  const served = backend.serve();
  served.catch(() => {}); // reported below, once
  try {
    await backend.listening;
    console.error(`denovm device ${type}: listening on ${socketPath}`);
    await served;
    return EXIT_SUCCESS;
  } catch (e) {
    // A socket path another process listens on is the user's error (35); other failures are the host's (1).
    console.error(`denovm device ${type}: ${(e as Error).message}`);
    return exitCodeFor(e);
  } finally {
    for (const s of signals) Deno.removeSignalListener(s, stop);
    device.close?.();
  }
}
