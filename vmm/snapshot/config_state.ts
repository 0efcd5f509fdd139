// A VmConfig as a snapshot's state record holds it, and back. A VmConfig is plain JSON, so saving is a copy
// without the absent optional fields; reading checks every field's type against the VmConfig schema below,
// since a state file is input like any other: a field of the wrong type, an unknown field or an unknown enum
// value is a StateError naming it. Ranges that depend on the host (memory, vCPUs, paths) are the restore's
// checks, as they are a boot's.

import { StateError, type StateValue } from "../../core/state.ts";
import { SERIAL_PORTS } from "../arch/layout.ts";
import { MAX_VCPUS } from "../arch/cpu.ts";
import {
  INPUT_KINDS,
  SERIAL_HARDWARE,
  SERIAL_TYPES,
  SHARED_DIR_CACHE_POLICIES,
  SOUND_BACKENDS,
  type VmConfig,
} from "../config.ts";

/** The largest value a 16-bit field (TCP port) holds. */
const U16_MAX = 0xffff;
/** The largest value a 32-bit field (vsock CID, file descriptor, display size) holds. */
const U32_MAX = 0xffff_ffff;

/** What one field holds. */
type Schema =
  | { kind: "string" }
  | { kind: "boolean" }
  | { kind: "number" }
  | { kind: "integer"; min: number; max: number }
  | { kind: "enum"; values: readonly string[] }
  | { kind: "list"; of: Schema }
  | { kind: "record"; fields: Record<string, Schema>; optional: readonly string[] };

const str: Schema = { kind: "string" };
const bool: Schema = { kind: "boolean" };
const num: Schema = { kind: "number" };
const int = (min: number, max: number): Schema => ({ kind: "integer", min, max });
const oneOf = (values: readonly string[]): Schema => ({ kind: "enum", values });
const list = (of: Schema): Schema => ({ kind: "list", of });
const record = (fields: Record<string, Schema>, optional: readonly string[] = []): Schema => ({
  kind: "record",
  fields,
  optional,
});

/** Every VmConfig field (vmm/config.ts) with its type; `optional` lists the fields that may be absent. */
const VM_CONFIG_SCHEMA: Schema = record({
  kernel: str,
  initrd: str,
  params: list(str),
  memMiB: int(1, Number.MAX_SAFE_INTEGER),
  cpus: int(1, MAX_VCPUS),
  serials: list(record({
    type: oneOf(SERIAL_TYPES),
    hardware: oneOf(SERIAL_HARDWARE),
    num: int(1, SERIAL_PORTS.length),
    path: str,
    input: str,
    console: bool,
    earlycon: bool,
    stdin: bool,
    name: str,
  }, ["path", "input", "name"])),
  blocks: list(record({
    path: str,
    ro: bool,
    root: bool,
    sparse: bool,
    blockSize: int(1, U32_MAX),
    id: str,
    direct: bool,
    lock: bool,
  }, ["id", "lock"])),
  nets: list(record({
    tapName: str,
    tapFd: int(0, U32_MAX),
    hostIp: str,
    netmask: str,
    mac: str,
    vqPairs: int(1, U16_MAX),
  }, ["tapName", "tapFd", "hostIp", "netmask", "mac", "vqPairs"])),
  rng: bool,
  balloon: bool,
  inputs: list(record({
    kind: oneOf(INPUT_KINDS),
    path: str,
    width: int(0, U32_MAX),
    height: int(0, U32_MAX),
    name: str,
    configPath: str,
  }, ["path", "width", "height", "name", "configPath"])),
  sounds: list(record({
    backend: oneOf(SOUND_BACKENDS),
    capture: bool,
    numOutputDevices: int(0, U32_MAX),
    numInputDevices: int(0, U32_MAX),
    numOutputStreams: int(0, U32_MAX),
    numInputStreams: int(0, U32_MAX),
    playbackPath: str,
    playbackSize: int(0, Number.MAX_SAFE_INTEGER),
    capturePath: str,
    cardIndex: int(0, U32_MAX),
  }, ["playbackPath", "capturePath"])),
  vsock: record({ cid: int(0, U32_MAX), udsPath: str }, ["udsPath"]),
  gpu: record({
    backend: oneOf(["2d", "virglrenderer", "3d", "gfxstream"]),
    contextTypes: list(str),
    displays: list(record({
      mode: str,
      width: int(0, U32_MAX),
      height: int(0, U32_MAX),
      port: int(0, U16_MAX),
      hidden: bool,
      refreshRate: num,
    }, ["port", "hidden", "refreshRate"])),
    width: int(0, U32_MAX),
    height: int(0, U32_MAX),
    hostVisibleWindowSize: int(0, Number.MAX_SAFE_INTEGER),
    fixedBlobMapping: bool,
    tracePath: str,
    egl: bool,
    gles: bool,
    glx: bool,
    surfaceless: bool,
    vulkan: bool,
    udmabuf: bool,
  }, ["width", "height", "tracePath"]),
  vhostUser: list(record({
    type: str,
    deviceId: int(0, U32_MAX),
    socket: str,
    maxQueueSize: int(1, U16_MAX + 1),
    queues: int(1, U16_MAX),
    configSize: int(0, U16_MAX),
    eventSocket: str,
  }, ["maxQueueSize", "queues", "configSize", "eventSocket"])),
  vhostUserConnectTimeoutMs: int(0, Number.MAX_SAFE_INTEGER),
  sharedDirs: list(record({
    path: str,
    tag: str,
    cache: oneOf(SHARED_DIR_CACHE_POLICIES),
    timeoutSecs: int(0, Number.MAX_SAFE_INTEGER),
    writeback: bool,
    posixAcl: bool,
    securityCtx: bool,
    rewriteSecurityXattrs: bool,
  })),
  socket: str,
  gdb: int(0, U16_MAX),
  agent: bool,
  virtioMmioCmdline: bool,
  logLevel: str,
  pmems: list(record({ path: str, ro: bool, root: bool })),
}, [
  "initrd",
  "sounds",
  "vsock",
  "gpu",
  "vhostUser",
  "vhostUserConnectTimeoutMs",
  "sharedDirs",
  "socket",
  "gdb",
  "agent",
  "logLevel",
  "pmems",
]);

/** `value` checked against `schema`, as a fresh copy; StateError naming the first field that does not fit. */
function decode(schema: Schema, value: StateValue | undefined, what: string): unknown {
  const wrong = (expected: string) => new StateError(`${what}: expected ${expected}, got ${describe(value)}`);
  switch (schema.kind) {
    case "string":
      if (typeof value !== "string") throw wrong("a string");
      return value;
    case "boolean":
      if (typeof value !== "boolean") throw wrong("a boolean");
      return value;
    case "number":
      if (typeof value !== "number" || !Number.isFinite(value)) throw wrong("a number");
      return value;
    case "integer":
      if (typeof value !== "number" || !Number.isInteger(value) || value < schema.min || value > schema.max) {
        throw wrong(`an integer in [${schema.min}, ${schema.max}]`);
      }
      return value;
    case "enum":
      if (typeof value !== "string" || !schema.values.includes(value)) {
        throw wrong(`one of ${schema.values.join(", ")}`);
      }
      return value;
    case "list":
      if (!Array.isArray(value)) throw wrong("a list");
      return value.map((v, i) => decode(schema.of, v, `${what}[${i}]`));
    case "record": {
      if (value === null || typeof value !== "object" || Array.isArray(value) || value instanceof Uint8Array) {
        throw wrong("a record");
      }
      const out: Record<string, unknown> = {};
      for (const key of Object.keys(value)) {
        if (!Object.hasOwn(schema.fields, key)) throw new StateError(`${what}: unknown field "${key}"`);
      }
      for (const [key, field] of Object.entries(schema.fields)) {
        if (!Object.hasOwn(value, key)) {
          if (schema.optional.includes(key)) continue;
          throw new StateError(`${what}.${key}: missing`);
        }
        out[key] = decode(field, value[key], `${what}.${key}`);
      }
      return out;
    }
  }
}

function describe(v: StateValue | undefined): string {
  if (v === undefined) return "nothing";
  if (v instanceof Uint8Array) return `${v.length} bytes`;
  if (Array.isArray(v)) return "a list";
  return v === null ? "null" : typeof v === "object" ? "a record" : JSON.stringify(v);
}

/** `config` as a state value: the same fields, absent optional ones left out. Throws StateError if it does not fit. */
export function configToState(config: VmConfig): StateValue {
  const plain = JSON.parse(JSON.stringify(config)) as StateValue;
  decode(VM_CONFIG_SCHEMA, plain, "config");
  return plain;
}

/** A saved configuration back as a VmConfig; StateError naming the first field that does not fit. */
export function configFromState(value: StateValue | undefined): VmConfig {
  return decode(VM_CONFIG_SCHEMA, value, "config") as VmConfig;
}
