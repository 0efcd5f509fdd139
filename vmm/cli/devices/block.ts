// The block family: `run --block/--disk/--rwdisk/--root/--rwroot [path=]PATH[,key=value...]` (crosvm
// devices/src/virtio/block/mod.rs DiskOption) and `denovm device block --socket-path PATH --file
// IMAGE[:read-only]` (crosvm devices/src/virtio/vhost/user/device/block/sys/linux.rs, with the older
// `--socket` spelling). See common.ts for how the family modules are organised.

import { parseArgs } from "node:util";
import { BlockDevice, SECTOR_SIZE, VIRTIO_BLK_ID_BYTES } from "../../../devices/virtio/block/device.ts";
import type { VirtioDevice } from "../../../devices/virtio/device.ts";
import { type BlockConfig, DEFAULT_BLOCK_SIZE } from "../../config.ts";
import { type KvSchema, parseOption, UsageError } from "../keyvalue.ts";
import { crosvmOnlyKeys } from "../help.ts";
import { ExitCodeError } from "../../../core/exit.ts";
import { SOCKET_OPTIONS, socketPathOption } from "./common.ts";

// ---- run ----

function blockSchema(option: string): KvSchema {
  return {
    option,
    positional: "path",
    keys: {
      path: "string",
      ro: "bool",
      root: "bool",
      sparse: "bool",
      "block-size": "uint",
      id: "string",
      direct: "bool",
      lock: "bool",
    },
    // crosvm devices/src/virtio/block/mod.rs DiskOption serde aliases.
    aliases: { block_size: "block-size", o_direct: "direct", async_executor: "async-executor" },
    crosvmOnly: crosvmOnlyKeys("block"),
  };
}

/** Block options; `force` is what --disk/--rwdisk/--root/--rwroot impose over the given keys (as crosvm does). */
export function parseBlockOption(text: string, option: string, force: Partial<BlockConfig> = {}): BlockConfig {
  const o = parseOption(blockSchema(option), text);
  if (o.path === undefined || o.path === "") throw new UsageError(`${option}: path is required`);
  const b: BlockConfig = {
    path: o.path as string,
    ro: (o.ro as boolean | undefined) ?? false,
    root: (o.root as boolean | undefined) ?? false,
    sparse: (o.sparse as boolean | undefined) ?? true,
    blockSize: (o["block-size"] as number | undefined) ?? DEFAULT_BLOCK_SIZE,
    direct: (o.direct as boolean | undefined) ?? false,
    ...(o.lock === undefined ? {} : { lock: o.lock as boolean }),
    ...force,
  };
  if (b.blockSize === 0 || b.blockSize % SECTOR_SIZE !== 0) {
    throw new UsageError(`${option} block-size: ${b.blockSize} is not a multiple of ${SECTOR_SIZE}`);
  }
  if (o.id !== undefined) {
    const id = o.id as string;
    // deno-lint-ignore no-control-regex
    if (id.length > VIRTIO_BLK_ID_BYTES || !/^[\x00-\x7f]*$/.test(id)) {
      throw new UsageError(`${option} id: "${id}" is not at most ${VIRTIO_BLK_ID_BYTES} ASCII characters`);
    }
    b.id = id;
  }
  return b;
}

// ---- device block ----

/** The usage line device.ts appends to `device block`'s argument errors. */
export const DEVICE_ARGS_USAGE = "usage: denovm device block --socket-path PATH --file IMAGE[:read-only]";

export interface BlockArgs {
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
      options: { ...SOCKET_OPTIONS, file: { type: "string" } },
      strict: true,
      allowPositionals: false,
    }));
  } catch (e) {
    // Unlike the other types' errors, node's message goes out without a "block: " prefix.
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

/** Open the image and build the device; a failure to open it is a host fault (exit 1). */
export function parseDeviceArgs(args: string[]): { socketPath: string; device: VirtioDevice } {
  const a = parseBlockArgs(args);
  let device: BlockDevice;
  try {
    device = new BlockDevice({
      path: a.file,
      readOnly: a.readOnly,
      sparse: false,
      blockSize: DEFAULT_BLOCK_SIZE,
      direct: false,
    });
  } catch (e) {
    // A file that is no disk (a FIFO, /dev/zero) is the user's error.
    if (e instanceof UsageError) throw new UsageError(`block: ${e.message}`);
    // An error that carries its own exit code is reported as `run` reports it (a locked disk: 1, as crosvm).
    if (e instanceof ExitCodeError) throw e;
    throw new Error(`cannot open ${a.file}: ${(e as Error).message}`);
  }
  return { socketPath: a.socketPath, device };
}
