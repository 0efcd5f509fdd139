// `denovm device <type> ...`: run one device model as a vhost-user back end, as
// crosvm's `device` subcommand does (google/crosvm
// devices/src/virtio/vhost/user/device/block/sys/linux.rs: `block --file PATH[:read-only]
// --socket-path PATH`, with the older `--socket` spelling).

import { parseArgs } from "node:util";
import { BlockDevice } from "../../devices/virtio/block/device.ts";
import type { VirtioDevice } from "../../devices/virtio/device.ts";
import { VhostUserBackend } from "../../devices/vhost_user/backend.ts";
import { SOCKET_OPTIONS, socketPathOption } from "./device/common.ts";
import { UsageError } from "./keyvalue.ts";

/** crosvm exit codes (src/main.rs CommandStatus). */
export const EXIT_SUCCESS = 0;
export const EXIT_INVALID_ARGUMENTS = 35;
/** Any other failure (cannot open the image, cannot bind the socket). */
export const EXIT_FAILURE = 1;

/** Device types crosvm's `device` command knows, besides block; each is served by device/<type>.ts when present. */
const DEVICE_TYPES = ["net", "console", "vsock", "rng", "balloon", "input", "gpu", "fs", "snd", "wl"];

const USAGE = "usage: denovm device block --socket-path PATH --file IMAGE[:read-only]";

interface BlockArgs {
  socketPath: string;
  file: string;
  readOnly: boolean;
}

/** Parse `block` options; throws UsageError with a one-line reason. */
export function parseBlockArgs(args: string[]): BlockArgs {
  let values;
  try {
    ({ values } = parseArgs({
      args,
      options: {
        ...SOCKET_OPTIONS,
        file: { type: "string" },
      },
      strict: true,
      allowPositionals: false,
    }));
  } catch (e) {
    throw new UsageError((e as Error).message.split("\n")[0]);
  }
  const socketPath = socketPathOption("block", values);
  if (!values.file) throw new UsageError("block: --file IMAGE[:read-only] is required");
  // PATH followed by ':'-separated options; the only option is read-only.
  const [file, ...opts] = values.file.split(":");
  if (!file) throw new UsageError("block: --file needs a path");
  for (const o of opts) {
    if (o !== "read-only") throw new UsageError(`block: unknown --file option "${o}" (only "read-only")`);
  }
  return { socketPath, file, readOnly: opts.includes("read-only") };
}

/** Run `device ...` (argv after the word "device"); resolves with the process exit code. */
export async function runDeviceCommand(argv: string[]): Promise<number> {
  const [type, ...rest] = argv;
  let device: VirtioDevice;
  let socketPath: string;
  try {
    if (type === "block") {
      const a = parseBlockArgs(rest);
      socketPath = a.socketPath;
      try {
        device = new BlockDevice({ path: a.file, readOnly: a.readOnly, sparse: false, blockSize: 512, direct: false });
      } catch (e) {
        console.error(`denovm device block: cannot open ${a.file}: ${(e as Error).message}`);
        return EXIT_FAILURE;
      }
    } else if (type !== undefined && DEVICE_TYPES.includes(type)) {
      // Each other device type lives in device/<type>.ts, exporting parseDeviceArgs (see device/README.md).
      const url = new URL(`./device/${type}.ts`, import.meta.url);
      try {
        Deno.statSync(url);
      } catch {
        console.error(`denovm device ${type}: not yet available in denovm`);
        return EXIT_INVALID_ARGUMENTS;
      }
      const mod: { parseDeviceArgs: (args: string[]) => { socketPath: string; device: VirtioDevice } } = await import(
        url.href
      );
      try {
        ({ socketPath, device } = mod.parseDeviceArgs(rest));
      } catch (e) {
        if ((e as Error).name === "UsageError") throw new UsageError((e as Error).message);
        console.error(`denovm device ${type}: ${(e as Error).message}`);
        return EXIT_FAILURE;
      }
    } else {
      throw new UsageError(type === undefined ? "missing device type" : `unknown device type "${type}"`);
    }
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    const usage = type === "block"
      ? `; ${USAGE}`
      : type && DEVICE_TYPES.includes(type)
      ? ""
      : `; types: block, ${DEVICE_TYPES.join(", ")}`;
    console.error(`denovm device: ${e.message}${usage}`);
    return EXIT_INVALID_ARGUMENTS;
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
    console.error(`denovm device ${type}: ${(e as Error).message}`);
    return EXIT_FAILURE;
  } finally {
    for (const s of signals) Deno.removeSignalListener(s, stop);
    device.close?.();
  }
}
