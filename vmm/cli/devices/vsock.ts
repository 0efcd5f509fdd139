// The vsock family: `run --vsock [cid=]CID[,uds-path=UDS]` (or the older `--cid`) and `denovm device
// vsock`. See common.ts for how the family modules are organised.
//
// crosvm's `device vsock` takes `--socket PATH` (or `--socket-path`) and
// `--cid N` and forwards to the host kernel's /dev/vhost-vsock (google/crosvm
// devices/src/virtio/vhost/user/device/vsock.rs). denovm serves vsock in userspace instead, with
// Firecracker's host side: `--uds-path UDS` names the Unix socket that host programs connect to
// (`CONNECT <port>\n`, answered `OK <hostport>\n`); guest connections to host port P go to the
// Unix listener `UDS_P`. crosvm's `--vhost-vsock-device` / `--device` (a host vhost-vsock node)
// has no meaning here and is refused.

import { MAX_GUEST_CID, MIN_GUEST_CID, VsockDevice } from "../../../devices/virtio/vsock.ts";
import type { VirtioDevice } from "../../../devices/virtio/device.ts";
import { EXIT_SUCCESS } from "../../../core/exit.ts";
import { type KvSchema, parseOption, parseUint, UsageError } from "../keyvalue.ts";
import { crosvmOnlyKeys } from "../help.ts";
import { parseOptions, SOCKET_OPTIONS, socketPathOption } from "./common.ts";

// ---- run ----

const VSOCK_SCHEMA: KvSchema = {
  option: "--vsock",
  positional: "cid",
  keys: { cid: "string", "uds-path": "string" },
  crosvmOnly: crosvmOnlyKeys("vsock"),
};

/** `run --vsock` and its older spelling `--cid` (`option`). */
export function parseVsockOption(text: string, option: string): { cid: number; udsPath?: string } {
  const o = parseOption({ ...VSOCK_SCHEMA, option }, text);
  if (o.cid === undefined) throw new UsageError(`${option}: cid is required`);
  const cid = parseUint(o.cid as string, `${option} cid`, MIN_GUEST_CID, MAX_GUEST_CID);
  return o["uds-path"] === undefined ? { cid } : { cid, udsPath: o["uds-path"] as string };
}

// ---- device vsock ----

export const VSOCK_USAGE = "usage: denovm device vsock --socket-path PATH --cid N --uds-path UDS\n" +
  "  Userspace virtio-vsock (denovm's form; crosvm's vsock back end uses the host's /dev/vhost-vsock).\n" +
  "  Host programs connect to the Unix socket UDS and write `CONNECT <port>\\n`; the answer is\n" +
  "  `OK <hostport>\\n`, then bytes flow. Guest connections to host port P reach the listener UDS_P.\n";

export interface VsockArgs {
  socketPath: string;
  cid: number;
  udsPath: string;
}

/** Parse `vsock` options; throws UsageError with a one-line reason. */
export function parseVsockArgs(args: string[]): VsockArgs {
  const values = parseOptions("vsock", args, {
    ...SOCKET_OPTIONS,
    cid: { type: "string" },
    "uds-path": { type: "string" },
    device: { type: "string" },
    "vhost-vsock-device": { type: "string" },
    help: { type: "boolean", short: "h" },
  });
  if (values.help) {
    console.log(VSOCK_USAGE);
    Deno.exit(EXIT_SUCCESS);
  }
  const socketPath = socketPathOption("vsock", values);
  if (values.device || values["vhost-vsock-device"]) {
    throw new UsageError("vsock: denovm's vsock is userspace; use --uds-path instead of a vhost-vsock device");
  }
  if (values.cid === undefined) throw new UsageError("vsock: --cid N is required");
  const cid = parseUint(values.cid, "vsock: --cid", MIN_GUEST_CID, MAX_GUEST_CID);
  if (!values["uds-path"]) throw new UsageError("vsock: --uds-path UDS is required (the host-side Unix socket)");
  return { socketPath, cid, udsPath: values["uds-path"] };
}

/** Build the device (common.ts); it listens on the UDS path at once. */
export function parseDeviceArgs(args: string[]): { socketPath: string; device: VirtioDevice } {
  const a = parseVsockArgs(args);
  return { socketPath: a.socketPath, device: new VsockDevice({ cid: a.cid, udsPath: a.udsPath }) };
}
