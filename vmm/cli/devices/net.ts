// The net family: `run --net key=value,...` (crosvm NetParameters: tap-name, tap-fd, or host-ip +
// netmask + mac) and `denovm device net ...`, the virtio-net device model (devices/virtio/net.ts) on a tap
// as a vhost-user back end. See common.ts for how the family modules are organised.
//
// `device net` takes crosvm's spellings (google/crosvm
// devices/src/virtio/vhost/user/device/net/sys/linux.rs, `Options`):
//   --tap-name SOCKET_PATH,TAP_NAME       open (or create) the named tap
//   --tap-fd SOCKET_PATH,TAP_FD           use an inherited tap fd
//   --device SOCKET_PATH,IP,NETMASK,MAC   create a new tap with that host address, netmask and MAC
// and denovm's own form, with the socket given like every other device type:
//   --socket-path PATH (or --socket PATH) with --tap-name NAME | --tap-fd FD
// plus `--mac MAC` (the guest's MAC, offered with VIRTIO_NET_F_MAC) and `--no-offloads`.
// crosvm accepts several devices in one process; denovm serves exactly one.

import { parseArgs } from "node:util";
import { type KvSchema, parseOption, parseUint, UsageError } from "../keyvalue.ts";
import { crosvmOnlyKeys } from "../help.ts";
import type { NetConfig } from "../../config.ts";
import type { VirtioDevice } from "../../../devices/virtio/device.ts";
import { NetDevice } from "../../../devices/virtio/net.ts";
import { configureInterface, parseIpv4, parseMac } from "../../../ffi/tun.ts";
import { givenSocketPath, SOCKET_OPTIONS } from "./common.ts";

// ---- run ----

const NET_SCHEMA: KvSchema = {
  option: "--net",
  keys: {
    "tap-name": "string",
    "tap-fd": "uint",
    "host-ip": "string",
    netmask: "string",
    mac: "string",
    "vq-pairs": "string",
  },
  crosvmOnly: crosvmOnlyKeys("net"),
};

const IPV4 = /^(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}$/;

function isMac(text: string): boolean {
  try {
    parseMac(text);
    return true;
  } catch {
    return false;
  }
}

/** `run --net`. */
export function parseNetOption(text: string): NetConfig {
  const o = parseOption(NET_SCHEMA, text);
  const n: NetConfig = {};
  if (o["tap-name"] !== undefined) n.tapName = o["tap-name"] as string;
  if (o["tap-fd"] !== undefined) n.tapFd = o["tap-fd"] as number;
  for (const [key, field] of [["host-ip", "hostIp"], ["netmask", "netmask"]] as const) {
    if (o[key] === undefined) continue;
    const ip = o[key] as string;
    if (!IPV4.test(ip)) throw new UsageError(`--net ${key}: "${ip}" is not an IPv4 address`);
    n[field] = ip;
  }
  if (o.mac !== undefined) {
    if (!isMac(o.mac as string)) throw new UsageError(`--net mac: "${o.mac}" is not a MAC address`);
    n.mac = (o.mac as string).toLowerCase();
  }
  if (o["vq-pairs"] !== undefined) n.vqPairs = parseUint(o["vq-pairs"] as string, "--net vq-pairs", 1);
  // crosvm NetParametersMode: exactly one of tap-name, tap-fd, or host-ip + netmask + mac.
  const modes = [n.tapName !== undefined, n.tapFd !== undefined, n.hostIp !== undefined || n.netmask !== undefined]
    .filter(Boolean).length;
  if (modes !== 1) throw new UsageError("--net: give exactly one of tap-name, tap-fd, or host-ip + netmask + mac");
  if ((n.hostIp !== undefined || n.netmask !== undefined) && (!n.hostIp || !n.netmask || !n.mac)) {
    throw new UsageError("--net: host-ip, netmask and mac must be given together");
  }
  return n;
}

// ---- device net ----

const USAGE = "usage: denovm device net --socket-path PATH (--tap-name NAME | --tap-fd FD) [--mac MAC] " +
  "| --tap-name PATH,NAME | --tap-fd PATH,FD | --device PATH,IP,NETMASK,MAC";

/** What `device net` was asked to serve. */
export interface NetArgs {
  socketPath: string;
  tap:
    | { kind: "name"; name: string }
    | { kind: "fd"; fd: number }
    | { kind: "new"; hostIp: string; netmask: string; hostMac: string };
  /** Guest MAC. */
  mac?: string;
  offloads: boolean;
}

function usage(msg: string): never {
  throw new UsageError(`net: ${msg}; ${USAGE}`);
}

/** Split crosvm's "SOCKET_PATH,REST" at the first comma. */
function splitSocket(flag: string, v: string): [string, string] {
  const i = v.indexOf(",");
  if (i <= 0 || i === v.length - 1) usage(`--${flag} wants SOCKET_PATH,VALUE without --socket-path`);
  return [v.slice(0, i), v.slice(i + 1)];
}

function parseFd(s: string): number {
  if (!/^\d+$/.test(s)) usage(`tap fd "${s}" is not a number`);
  return Number(s);
}

/** Parse `device net` options (no side effects); throws UsageError with a one-line reason. */
export function parseNetArgs(args: string[]): NetArgs {
  let values;
  try {
    ({ values } = parseArgs({
      args,
      options: {
        ...SOCKET_OPTIONS,
        "tap-name": { type: "string", multiple: true },
        "tap-fd": { type: "string", multiple: true },
        device: { type: "string", multiple: true },
        mac: { type: "string" },
        "no-offloads": { type: "boolean" },
      },
      strict: true,
      allowPositionals: false,
    }));
  } catch (e) {
    throw new UsageError(`net: ${(e as Error).message.split("\n")[0]}`);
  }
  const given = givenSocketPath("net", values, usage);
  const names = values["tap-name"] ?? [];
  const fds = values["tap-fd"] ?? [];
  const devices = values.device ?? [];
  const count = names.length + fds.length + devices.length;
  if (count === 0) usage("no tap given");
  if (count > 1) usage("one device per process (give one --tap-name, --tap-fd or --device)");
  let socketPath: string;
  let tap: NetArgs["tap"];
  if (names.length) {
    let name = names[0];
    if (given) socketPath = given;
    else [socketPath, name] = splitSocket("tap-name", name);
    tap = { kind: "name", name };
  } else if (fds.length) {
    let fd = fds[0];
    if (given) socketPath = given;
    else [socketPath, fd] = splitSocket("tap-fd", fd);
    tap = { kind: "fd", fd: parseFd(fd) };
  } else {
    const parts = devices[0].split(",");
    if (given ? parts.length !== 3 : parts.length !== 4) {
      usage(`--device wants ${given ? "" : "SOCKET_PATH,"}IP,NETMASK,MAC`);
    }
    if (!given) socketPath = parts.shift()!;
    else socketPath = given;
    const [hostIp, netmask, hostMac] = parts;
    try {
      parseIpv4(hostIp);
      parseIpv4(netmask);
      parseMac(hostMac);
    } catch (e) {
      usage((e as Error).message);
    }
    tap = { kind: "new", hostIp, netmask, hostMac };
  }
  if (!socketPath) usage("empty socket path");
  if (values.mac !== undefined) {
    try {
      if (parseMac(values.mac)[0] & 0x01) usage(`--mac ${values.mac} is a multicast address`);
    } catch (e) {
      if (e instanceof UsageError) throw e;
      usage((e as Error).message);
    }
  }
  return { socketPath, tap, mac: values.mac, offloads: !values["no-offloads"] };
}

/** Open the tap and build the device (common.ts). Host failures are plain errors (exit 1). */
export function parseDeviceArgs(args: string[]): { socketPath: string; device: VirtioDevice } {
  const a = parseNetArgs(args);
  const common = { mac: a.mac, offloads: a.offloads };
  let device: NetDevice;
  switch (a.tap.kind) {
    case "name":
      device = new NetDevice({ tapName: a.tap.name, ...common });
      break;
    case "fd":
      device = new NetDevice({ tapFd: a.tap.fd, ...common });
      break;
    case "new": {
      device = new NetDevice({ tapName: "", ...common });
      try {
        configureInterface(device.tapName, { ip: a.tap.hostIp, netmask: a.tap.netmask, mac: a.tap.hostMac });
      } catch (e) {
        device.close();
        throw e;
      }
      break;
    }
  }
  console.error(`denovm device net: tap ${device.tapName}`);
  return { socketPath: a.socketPath, device };
}
