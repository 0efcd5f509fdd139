// A VmConfig through a snapshot's state record: every field of a config with every optional field set comes
// back identical (the DeepRequired type makes a field added to VmConfig fail to type-check here until this
// test, and so the schema, has it); absent optional fields stay absent; a missing, unknown or mistyped field
// is a StateError naming it.

import assert from "node:assert/strict";
import { StateError, type StateValue } from "../../core/state.ts";
import { defaultVmConfig, type VmConfig } from "../config.ts";
import { configFromState, configToState } from "./config_state.ts";

type DeepRequired<T> = T extends (infer U)[] ? DeepRequired<U>[]
  : T extends object ? { [K in keyof T]-?: DeepRequired<T[K]> }
  : T;

const FULL: DeepRequired<VmConfig> = {
  kernel: "/boot/vmlinuz",
  initrd: "/boot/initrd",
  params: ["quiet", "init=/bin/sh"],
  memMiB: 512,
  cpus: 2,
  serials: [{
    type: "file",
    hardware: "serial",
    num: 2,
    path: "/tmp/out",
    input: "/tmp/in",
    console: true,
    earlycon: true,
    stdin: false,
    name: "port",
  }],
  blocks: [{
    path: "/img",
    ro: true,
    root: true,
    sparse: false,
    blockSize: 4096,
    id: "disk0",
    direct: true,
    lock: false,
  }],
  nets: [{
    tapName: "tap0",
    tapFd: 5,
    hostIp: "10.0.0.1",
    netmask: "255.255.255.0",
    mac: "02:00:00:00:00:01",
    vqPairs: 2,
  }],
  rng: false,
  balloon: false,
  inputs: [{ kind: "custom", path: "/sock", width: 10, height: 20, name: "pad", configPath: "/cfg.json" }],
  sounds: [{
    backend: "file",
    capture: true,
    numOutputDevices: 1,
    numInputDevices: 2,
    numOutputStreams: 1,
    numInputStreams: 1,
    playbackPath: "/tmp/snd",
    playbackSize: 4096,
    capturePath: "/tmp/in.wav",
    cardIndex: 0,
  }],
  vsock: { cid: 42, udsPath: "/tmp/v.sock" },
  gpu: {
    backend: "virglrenderer",
    contextTypes: ["virgl2"],
    displays: [{ mode: "web", width: 640, height: 480, port: 8080, hidden: true, refreshRate: 30 }],
    width: 640,
    height: 480,
    hostVisibleWindowSize: 2 ** 30,
    fixedBlobMapping: true,
    tracePath: "/tmp/trace.json",
    egl: true,
    gles: false,
    glx: true,
    surfaceless: false,
    vulkan: true,
    udmabuf: true,
  },
  vhostUser: [{
    type: "generic",
    deviceId: 41,
    socket: "/run/gpio.sock",
    maxQueueSize: 256,
    queues: 2,
    configSize: 8,
    eventSocket: "/run/gpio.events",
  }],
  vhostUserConnectTimeoutMs: 500,
  sharedDirs: [{
    path: "/srv",
    tag: "data",
    cache: "never",
    timeoutSecs: 60,
    writeback: true,
    posixAcl: false,
    securityCtx: false,
    rewriteSecurityXattrs: true,
  }],
  socket: "/run/vm.sock",
  gdb: 1234,
  agent: true,
  virtioMmioCmdline: true,
  logLevel: "debug",
  pmems: [{ path: "/pmem.img", ro: true, root: true }],
};

Deno.test("config state: every field comes back; absent optional fields stay absent", () => {
  assert.deepEqual(configFromState(configToState(FULL)), FULL);
  const minimal = defaultVmConfig("/k");
  const back = configFromState(configToState(minimal));
  assert.deepEqual(back, minimal);
  assert.equal("gpu" in back, false);
  // An optional field present as undefined is left out, as JSON leaves it.
  const withUndefined: VmConfig = { ...minimal, socket: undefined };
  assert.equal("socket" in (configToState(withUndefined) as object), false);
});

Deno.test("config state: a missing, unknown or mistyped field is refused naming it", () => {
  const base = configToState(FULL) as { [key: string]: StateValue };
  const cases: [string, (c: { [key: string]: StateValue }) => void, RegExp][] = [
    ["missing", (c) => delete c.memMiB, /^config.memMiB: missing$/],
    ["unknown", (c) => c.colour = "red", /^config: unknown field "colour"$/],
    ["mistyped", (c) => c.cpus = "2", /^config.cpus: expected an integer in \[1, \d+\], got "2"$/],
    ["no vCPUs", (c) => c.cpus = 0, /^config.cpus: expected an integer/],
    [
      "enum",
      (c) => (c.serials as { [key: string]: StateValue }[])[0].type = "telnet",
      /^config.serials\[0\].type: expected one of stdout, /,
    ],
    [
      "nested",
      (c) => (c.gpu as { [key: string]: StateValue }).displays = [{ mode: "web" }],
      /^config.gpu.displays\[0\].width: missing$/,
    ],
    ["bytes", (c) => c.kernel = new Uint8Array(3), /^config.kernel: expected a string, got 3 bytes$/],
    ["not a record", (c) => c.vsock = [], /^config.vsock: expected a record, got a list$/],
  ];
  for (const [what, edit, message] of cases) {
    const c = structuredClone(base);
    edit(c);
    assert.throws(() => configFromState(c), (e: Error) => {
      assert.ok(e instanceof StateError, what);
      assert.match(e.message, message, what);
      return true;
    });
  }
  assert.throws(() => configFromState(null), /config: expected a record, got null$/);
});
