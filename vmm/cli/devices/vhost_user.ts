// The vhost-user front-end family: `run --vhost-user [type=]TYPE,socket=PATH[,max-queue-size=N]` (crosvm's
// VhostUserFrontendOption, google/crosvm src/crosvm/config.rs; its types are devices/src/virtio/mod.rs
// DeviceType's names, listed in devices/vhost_user/device_types.ts) and `--vhost-user-connect-timeout-ms`.
// denovm adds a generic form for any virtio device ID, so a back end denovm has no model for works with
// no device code here: `type=generic,device-id=N[,queues=N][,config-size=N]`. The keys `queues` and
// `config-size` also apply to a named type (they override its defaults). See common.ts for how the family
// modules are organised.

import { VIRTQ_MAX_SIZE } from "../../../devices/virtio/queue.ts";
import { VHOST_USER_DEVICE_TYPES, vhostUserDeviceType } from "../../../devices/vhost_user/device_types.ts";
import { FRONT_END_MAX_QUEUES } from "../../../devices/vhost_user/front_end.ts";
import { VHOST_USER_MAX_CONFIG_SIZE } from "../../../devices/vhost_user/protocol.ts";
import type { VhostUserConfig } from "../../config.ts";
import { crosvmOnlyKeys } from "../help.ts";
import { type KvSchema, parseOption, parseUint, UsageError } from "../keyvalue.ts";

/** The type name of denovm's generic form. */
export const GENERIC_TYPE = "generic";
/** Virtio device IDs are 32-bit (the virtio-mmio DeviceID register, virtio 1.2 section 4.2.2); 0 is reserved. */
const MAX_DEVICE_ID = 0xffff_ffff;
/** The longest connect timeout accepted (ms): one hour. */
export const MAX_CONNECT_TIMEOUT_MS = 3_600_000;

const VHOST_USER_SCHEMA: KvSchema = {
  option: "--vhost-user",
  positional: "type",
  keys: {
    type: "string",
    socket: "string",
    "max-queue-size": "string",
    "device-id": "string",
    queues: "string",
    "config-size": "string",
  },
  crosvmOnly: crosvmOnlyKeys("vhost-user"),
};

/** `run --vhost-user TEXT`. Throws UsageError (exit 35) with one line. */
export function parseVhostUserOption(text: string): VhostUserConfig {
  const o = parseOption(VHOST_USER_SCHEMA, text);
  const type = o.type as string | undefined;
  if (type === undefined) throw new UsageError("--vhost-user: type is required (e.g. type=block or type=generic)");
  const socket = o.socket as string | undefined;
  if (!socket) throw new UsageError("--vhost-user: socket=PATH is required");
  let deviceId: number;
  if (type === GENERIC_TYPE) {
    if (o["device-id"] === undefined) throw new UsageError("--vhost-user type=generic: device-id=N is required");
    deviceId = parseUint(o["device-id"] as string, "--vhost-user device-id", 1, MAX_DEVICE_ID);
  } else {
    const known = vhostUserDeviceType(type);
    if (!known) {
      const names = [...VHOST_USER_DEVICE_TYPES.map((t) => t.name), GENERIC_TYPE].join(", ");
      throw new UsageError(`--vhost-user: unknown type "${type}" (one of ${names})`);
    }
    if (known.refused) throw new UsageError(`--vhost-user type=${type} is not supported by denovm: ${known.refused}`);
    if (o["device-id"] !== undefined) {
      throw new UsageError(`--vhost-user: device-id is for type=generic; type=${type} is device ${known.id}`);
    }
    deviceId = known.id;
  }
  const out: VhostUserConfig = { type, deviceId, socket };
  if (o["max-queue-size"] !== undefined) {
    const n = parseUint(o["max-queue-size"] as string, "--vhost-user max-queue-size", 1, VIRTQ_MAX_SIZE);
    if ((n & (n - 1)) !== 0) throw new UsageError(`--vhost-user max-queue-size: ${n} is not a power of two`);
    out.maxQueueSize = n;
  }
  if (o.queues !== undefined) {
    out.queues = parseUint(o.queues as string, "--vhost-user queues", 1, FRONT_END_MAX_QUEUES);
  }
  if (o["config-size"] !== undefined) {
    out.configSize = parseUint(o["config-size"] as string, "--vhost-user config-size", 0, VHOST_USER_MAX_CONFIG_SIZE);
  }
  return out;
}

/** `run --vhost-user-connect-timeout-ms N`. */
export function parseVhostUserConnectTimeout(text: string): number {
  return parseUint(text, "--vhost-user-connect-timeout-ms", 0, MAX_CONNECT_TIMEOUT_MS);
}
