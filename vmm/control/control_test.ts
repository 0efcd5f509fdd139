// Control socket: ControlServer (vmm/control/server.ts) with a recording fake handler, driven by the real client
// (vmm/control/client.ts) in-process and through `deno run main.ts <command> SOCKET` subprocesses, by raw
// packets carrying crosvm's exact JSON, and by an independent client (Python's socket module).

import assert from "node:assert/strict";
import { closeFd, EAGAIN, eventfdWrite, libc, POLLIN, pollSync, SysError } from "../../ffi/libc.ts";
import { connectSeqpacket, listenSeqpacket, readPacket } from "../../core/unix_socket.ts";
import {
  type BalloonStatsReply,
  type ControlHandler,
  type ControlRequest,
  decodeRequest,
  type DisplayListReply,
  type DisplayParametersJson,
  encodeRequest,
  type GpuControlReply,
  MAX_REQUEST_BYTES,
  type SnapshotRequestOptions,
} from "./protocol.ts";
import {
  ControlServer,
  ControlSocketInUse,
  controlSocketPath,
  MAX_CONTROL_CLIENTS,
  TOO_MANY_CLIENTS,
} from "./server.ts";
import { controlCall, ControlClient, controlRequest, errorOfReply, sendControlCommand } from "./client.ts";
import { buildMachine } from "../builder.ts";
import { machineControlHandler, NO_ENCRYPTION, type SnapshotTarget } from "./handler.ts";
import type { Machine, SnapshotOptions } from "../machine.ts";
import { defaultVmConfig } from "../config.ts";
import { MiB } from "../arch/layout.ts";
import { VIRTIO_ID_BLOCK } from "../../devices/virtio/device.ts";
import { SoundDevice } from "../../devices/virtio/sound/device.ts";
import { BalloonDevice } from "../../devices/virtio/balloon.ts";
import { buildGuest } from "../../test/guests/build.ts";
import { FakeVm } from "../../test/support/fake_vm.ts";
import { VirtioTestDriver } from "../../test/support/virtio_driver.ts";
import { within } from "../../test/support/within.ts";
import { runDenovm } from "../../test/support/cli.ts";

type Call = [string, ...unknown[]];

const STATS: BalloonStatsReply = {
  stats: { free_memory: 123 * 4096, total_memory: 256 << 20, swap_in: 0 },
  balloon_actual: 64 << 20,
};
const DISPLAYS: DisplayListReply = {
  displays: { "0": { mode: { windowed: [1280, 800] }, hidden: false, "refresh-rate": 60, dpi: [320, 320] } },
};
/** A working-set report as crosvm's BalloonWS carries it (the fake handler's answer). */
const WS = { ws: { ws: [{ age: 1, bytes: [4096, 0] }] }, balloon_actual: 0 };
const GPU_STATS = { transfer_to_host_bytes: 4096, inline_write_bytes: 12, blob_mapped_bytes: 0 };

/** Records every call; `absent` names methods that throw "not available"; `gate` holds suspend() open. */
class FakeHandler implements ControlHandler {
  calls: Call[] = [];
  absent = new Set<string>();
  gate: Promise<void> | undefined;
  inSuspend = 0;
  maxInSuspend = 0;
  onSuspendEnter: (() => void) | undefined;
  #record(name: string, ...args: unknown[]): void {
    this.calls.push([name, ...args]);
    if (this.absent.has(name)) throw new Error(`not available: no device for ${name}`);
  }
  stop(): Promise<void> {
    this.#record("stop");
    return Promise.resolve();
  }
  async suspend(full: boolean): Promise<void> {
    this.#record(full ? "suspendFull" : "suspend");
    this.inSuspend++;
    this.maxInSuspend = Math.max(this.maxInSuspend, this.inSuspend);
    this.onSuspendEnter?.();
    try {
      if (this.gate) await this.gate;
    } finally {
      this.inSuspend--;
    }
  }
  resume(full: boolean): Promise<void> {
    this.#record(full ? "resumeFull" : "resume");
    return Promise.resolve();
  }
  powerButton(): Promise<void> {
    this.#record("powerButton");
    return Promise.resolve();
  }
  sleepButton(): Promise<void> {
    this.#record("sleepButton");
    return Promise.resolve();
  }
  balloonAdjust(bytes: number, wait: boolean): Promise<void> {
    this.#record(wait ? "balloonAdjustWait" : "balloonAdjust", bytes);
    return Promise.resolve();
  }
  balloonWorkingSet(): Promise<unknown> {
    this.#record("balloonWorkingSet");
    return Promise.resolve(WS);
  }
  gpuAddDisplays(displays: DisplayParametersJson[]): Promise<GpuControlReply> {
    this.#record("gpuAddDisplays", displays);
    return Promise.resolve("DisplaysUpdated");
  }
  gpuRemoveDisplays(ids: number[]): Promise<GpuControlReply> {
    this.#record("gpuRemoveDisplays", ids);
    const missing = ids.find((id) => id >= 2);
    return Promise.resolve(missing === undefined ? "DisplaysUpdated" : { NoSuchDisplay: { display_id: missing } });
  }
  gpuSetMouseMode(id: number, mode: string): Promise<GpuControlReply> {
    this.#record("gpuSetMouseMode", id, mode);
    return Promise.resolve(id === 7 ? { ErrString: "boom" } : "DisplayMouseModeSet");
  }
  balloonStats(): Promise<BalloonStatsReply> {
    this.#record("balloonStats");
    return Promise.resolve(STATS);
  }
  diskResize(index: number, bytes: number): Promise<void> {
    this.#record("diskResize", index, bytes);
    return Promise.resolve();
  }
  gpuListDisplays(): Promise<DisplayListReply> {
    this.#record("gpuListDisplays");
    return Promise.resolve(DISPLAYS);
  }
  gpuStats(): Promise<object> {
    this.#record("gpuStats");
    return Promise.resolve(GPU_STATS);
  }
  screenshot(path: string): Promise<void> {
    this.#record("screenshot", path);
    return Promise.resolve();
  }
  snapshot(path: string, opts: SnapshotRequestOptions): Promise<void> {
    this.#record("snapshot", path, opts);
    return Promise.resolve();
  }
  sndMuteAll(muted: boolean): Promise<void> {
    this.#record("sndMuteAll", muted);
    return Promise.resolve();
  }
}

/** A temp dir with a socket path in it, a running server, and cleanup. */
async function withServer(
  fn: (ctx: { path: string; dir: string; handler: FakeHandler; server: ControlServer }) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "denovm-ctl-test-" });
  const path = `${dir}/vm.sock`;
  const handler = new FakeHandler();
  const server = new ControlServer(path, handler);
  try {
    await server.listening;
    await fn({ path, dir, handler, server });
  } finally {
    await server.close();
    await Deno.remove(dir, { recursive: true });
  }
}

/** Send one raw packet on a fresh connection and return the parsed reply. */
async function rawRequest(path: string, text: string | Uint8Array): Promise<unknown> {
  using c = ControlClient.connect(path);
  return await c.requestRaw(typeof text === "string" ? new TextEncoder().encode(text) : text);
}

/** Wait (bounded by a retry count, not asserted on time) until `cond` holds. */
async function until(cond: () => boolean, what: string): Promise<void> {
  for (let i = 0; i < 500 && !cond(); i++) await new Promise((r) => setTimeout(r, 10));
  assert.ok(cond(), `never happened: ${what}`);
}

Deno.test("control: every subcommand through the in-process client reaches the handler with its arguments", async () => {
  await withServer(async ({ path, dir, handler }) => {
    const cases: [string[], Call][] = [
      [["stop", path], ["stop"]],
      [["suspend", path], ["suspend"]],
      [["resume", path], ["resume"]],
      [["powerbtn", path], ["powerButton"]],
      [["balloon", "512M", path], ["balloonAdjust", 512 * 2 ** 20]],
      [["balloon", "1073741824", path], ["balloonAdjust", 1073741824]],
      [["balloon_stats", path], ["balloonStats"]],
      [["disk", "resize", "2", "8G", path], ["diskResize", 2, 8 * 2 ** 30]],
      [["gpu", "list-displays", path], ["gpuListDisplays"]],
      [["gpu", "stats", path], ["gpuStats"]],
      [["screenshot", `${dir}/shot.png`, path], ["screenshot", `${dir}/shot.png`]],
    ];
    for (const [argv, call] of cases) {
      handler.calls = [];
      const code = await sendControlCommand(argv);
      assert.equal(code, 0, argv.join(" "));
      // stop() runs right after the reply is sent.
      await until(() => handler.calls.length === 1, `${argv[0]} handler call`);
      assert.deepEqual(handler.calls, [call], argv.join(" "));
    }
  });
});

Deno.test("control: a relative screenshot path is sent as an absolute path", async () => {
  await withServer(async ({ path, handler }) => {
    assert.equal(await sendControlCommand(["screenshot", "out/shot.png", path]), 0);
    assert.deepEqual(handler.calls, [["screenshot", `${Deno.cwd()}/out/shot.png`]]);
  });
});

Deno.test("control: `deno run main.ts <command> SOCKET` subprocesses: exit codes, printed JSON, handler calls", async () => {
  await withServer(async ({ path, handler }) => {
    let r = await runDenovm(["suspend", path]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, "");
    r = await runDenovm(["balloon", "256M", path]);
    assert.equal(r.code, 0, r.stderr);
    r = await runDenovm(["disk", "resize", "0", "1048576", path]);
    assert.equal(r.code, 0, r.stderr);

    r = await runDenovm(["balloon_stats", path]);
    assert.equal(r.code, 0, r.stderr);
    const stats = JSON.parse(r.stdout);
    assert.equal(stats.BalloonStats.balloon_actual, 64 << 20);
    assert.equal(stats.BalloonStats.stats.free_memory, 123 * 4096);
    assert.equal(stats.BalloonStats.stats.major_faults, null, "stats the device lacks are null, as in crosvm");
    assert.ok(r.stdout.startsWith('{\n  "BalloonStats": {\n'), "pretty JSON like serde_json::to_string_pretty");

    r = await runDenovm(["gpu", "list-displays", path]);
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(JSON.parse(r.stdout), DISPLAYS);

    r = await runDenovm(["gpu", "stats", path]);
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(JSON.parse(r.stdout), GPU_STATS);

    r = await runDenovm(["stop", path]);
    assert.equal(r.code, 0, r.stderr);
    await until(() => handler.calls.some((c) => c[0] === "stop"), "stop call");

    assert.deepEqual(handler.calls, [
      ["suspend"],
      ["balloonAdjust", 256 << 20],
      ["diskResize", 0, 1048576],
      ["balloonStats"],
      ["gpuListDisplays"],
      ["gpuStats"],
      ["stop"],
    ]);

    handler.absent.add("powerButton");
    r = await runDenovm(["powerbtn", path]);
    assert.equal(r.code, 1);
    assert.equal(r.stdout, "");
    assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
    assert.match(r.stderr, /^denovm: powerbtn: not available: no device for powerButton\n$/);
  });
});

Deno.test("control: snapshot take through the socket: crosvm's request, nothing printed on success, one line and 1 on failure", async () => {
  await withServer(async ({ path, dir, handler }) => {
    // In process: a relative PATH reaches the VM absolute.
    assert.equal(await sendControlCommand(["snapshot", "take", "snaps/one", path, "--compress-memory"]), 0);
    assert.deepEqual(handler.calls, [["snapshot", `${Deno.cwd()}/snaps/one`, {
      compressMemory: true,
      encrypt: false,
    }]]);

    // The denovm process, run from another directory than the VM's.
    const cli = (args: string[]) => runDenovm(args, { cwd: dir });
    handler.calls = [];
    let r = await cli(["snapshot", "take", "snap", path]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, "");
    assert.equal(r.stderr, "");
    assert.deepEqual(handler.calls, [["snapshot", `${dir}/snap`, { compressMemory: false, encrypt: false }]]);

    handler.calls = [];
    handler.absent.add("snapshot");
    r = await cli(["snapshot", "take", "snap", path]);
    assert.equal(r.code, 1);
    assert.equal(r.stdout, "");
    assert.match(r.stderr, /^denovm: snapshot take: not available: no device for snapshot\n$/);
    assert.equal(handler.calls.length, 1, "the request reached the VM once");

    // --encrypt is refused before anything is sent.
    handler.calls = [];
    r = await cli(["snapshot", "take", "snap", path, "--encrypt"]);
    assert.equal(r.code, 35);
    assert.match(r.stderr, /^denovm: snapshot take: --encrypt: a crosvm option denovm does not support[^\n]*\n$/);
    assert.deepEqual(handler.calls, []);

    // No VM at the socket: one line, exit 1.
    r = await cli(["snapshot", "take", "snap", `${dir}/none.sock`]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /^denovm: snapshot take: cannot reach the VM at [^\n]*none\.sock[^\n]*\n$/);
  });
});

Deno.test("control: snd mute-all mutes every sound device of the VM; a VM without one says so", async () => {
  const a = new SoundDevice(), b = new SoundDevice();
  try {
    const m = { devices: { virtio: [{ device: a }, { device: new BalloonDevice() }, { device: b }] } };
    const h = machineControlHandler(m as unknown as Machine);
    await h.sndMuteAll(true);
    assert.deepEqual([a.muted, b.muted], [true, true]);
    await h.sndMuteAll(false);
    assert.deepEqual([a.muted, b.muted], [false, false]);
    const none = machineControlHandler({ devices: { virtio: [] } } as unknown as Machine);
    await assert.rejects(() => none.sndMuteAll(true), /no sound device \(--virtio-snd\)/);
  } finally {
    a.close();
    b.close();
  }
});

/** What machineControlHandler's snapshot touches of a Machine, recording the calls; `fail` makes it reject. */
class FakeSnapshotMachine implements SnapshotTarget {
  calls: [string, SnapshotOptions][] = [];
  fail: Error | undefined;
  snapshot(dir: string, opts: SnapshotOptions = {}): Promise<void> {
    this.calls.push([dir, opts]);
    return this.fail ? Promise.reject(this.fail) : Promise.resolve();
  }
}

/** A control server whose handler is machineControlHandler over a fake machine. */
async function withMachineServer(fn: (path: string, m: FakeSnapshotMachine) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "denovm-ctl-test-" });
  const m = new FakeSnapshotMachine();
  const server = new ControlServer(`${dir}/vm.sock`, machineControlHandler(m as unknown as Machine));
  try {
    await server.listening;
    await fn(`${dir}/vm.sock`, m);
  } finally {
    await server.close();
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("control: the VM's Snapshot handler asks the machine to put back the state it found (crosvm's guards)", async () => {
  await withMachineServer(async (path, m) => {
    const take = (compress: boolean, encrypt = false) =>
      rawRequest(
        path,
        JSON.stringify({ Snapshot: { Take: { snapshot_path: "/snaps/x", compress_memory: compress, encrypt } } }),
      );
    assert.equal(await take(false), "Ok");
    assert.equal(await take(true), "Ok");
    // resume: true is Machine.snapshot's "as found": a suspended VM stays suspended (test/kvm/snapshot_test.ts).
    assert.deepEqual(m.calls, [
      ["/snaps/x", { resume: true, compressMemory: false }],
      ["/snaps/x", { resume: true, compressMemory: true }],
    ]);

    // crosvm's encrypt: refused, nothing written.
    m.calls = [];
    assert.deepEqual(await take(false, true), { ErrString: NO_ENCRYPTION });
    assert.deepEqual(m.calls, []);

    // A failed snapshot is an error reply with its reason; the client exits 1 with one line.
    m.fail = new Error("snapshot /snaps/x: disk full");
    assert.deepEqual(await take(false), { ErrString: "snapshot /snaps/x: disk full" });
    const r = await runDenovm(["snapshot", "take", "/snaps/x", path]);
    assert.equal(r.code, 1);
    assert.equal(r.stdout, "");
    assert.equal(r.stderr, "denovm: snapshot take: snapshot /snaps/x: disk full\n");
  });
});

Deno.test("control: unreachable socket → exit 1 with one stderr line (subprocess); bad arguments → 35", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const r = await runDenovm(["stop", `${dir}/nothing.sock`]);
    assert.equal(r.code, 1);
    assert.equal(r.stdout, "");
    assert.match(r.stderr, /^denovm: stop: cannot reach the VM at .*nothing\.sock: connect .*No such file.*\n$/);
    const bad = await runDenovm(["balloon", "lots", `${dir}/nothing.sock`]);
    assert.equal(bad.code, 35);
    assert.equal(await sendControlCommand(["resume", `${dir}/nothing.sock`]), 1);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("control: crosvm's exact request JSON is understood and answered in crosvm's reply shapes", async () => {
  await withServer(async ({ path, handler }) => {
    const exact: [string, unknown, Call][] = [
      ['"SuspendVcpus"', "Ok", ["suspend"]],
      ['"ResumeVcpus"', "Ok", ["resume"]],
      ['"SuspendVm"', "Ok", ["suspendFull"]],
      ['"ResumeVm"', "Ok", ["resumeFull"]],
      ['"Sleepbtn"', "Ok", ["sleepButton"]],
      ['{"BalloonCommand":{"Adjust":{"num_bytes":4096,"wait_for_success":true}}}', "Ok", ["balloonAdjustWait", 4096]],
      ['{"BalloonCommand":"WorkingSet"}', { BalloonWS: WS }, ["balloonWorkingSet"]],
      ['{"GpuCommand":{"AddDisplays":{"displays":[{"mode":{"windowed":[640,480]}}]}}}', {
        GpuResponse: "DisplaysUpdated",
      }, ["gpuAddDisplays", [{ mode: { windowed: [640, 480] }, hidden: false, "refresh-rate": 60, dpi: [320, 320] }]]],
      [
        '{"GpuCommand":{"RemoveDisplays":{"display_ids":[1,5]}}}',
        { GpuResponse: { NoSuchDisplay: { display_id: 5 } } },
        [
          "gpuRemoveDisplays",
          [1, 5],
        ],
      ],
      ['{"GpuCommand":{"SetDisplayMouseMode":{"display_id":0,"mouse_mode":"touchscreen"}}}', {
        GpuResponse: "DisplayMouseModeSet",
      }, ["gpuSetMouseMode", 0, "touchscreen"]],
      ['"Powerbtn"', "Ok", ["powerButton"]],
      // crosvm's VmRequest::SndCommand(SndControlCommand::MuteAll(bool)).
      ['{"SndCommand":{"MuteAll":true}}', "Ok", ["sndMuteAll", true]],
      ['{"BalloonCommand":{"Adjust":{"num_bytes":1073741824,"wait_for_success":false}}}', "Ok", [
        "balloonAdjust",
        1073741824,
      ]],
      ['{"DiskCommand":{"disk_index":1,"command":{"Resize":{"new_size":4096}}}}', "Ok", ["diskResize", 1, 4096]],
      ['{"BalloonCommand":"Stats"}', {
        BalloonStats: {
          stats: {
            swap_in: 0,
            swap_out: null,
            major_faults: null,
            minor_faults: null,
            free_memory: 123 * 4096,
            total_memory: 256 << 20,
            available_memory: null,
            disk_caches: null,
            hugetlb_allocations: null,
            hugetlb_failures: null,
            shared_memory: null,
            unevictable_memory: null,
          },
          balloon_actual: 64 << 20,
        },
      }, ["balloonStats"]],
      ['{"GpuCommand":"ListDisplays"}', { GpuResponse: { DisplayList: DISPLAYS } }, ["gpuListDisplays"]],
      // serde also accepts a unit variant as {"Name":null}.
      ['{"Powerbtn":null}', "Ok", ["powerButton"]],
      ['"DenovmGpuStats"', { DenovmGpuStats: GPU_STATS }, ["gpuStats"]],
      ['{"DenovmScreenshot":{"path":"/tmp/x.png"}}', "Ok", ["screenshot", "/tmp/x.png"]],
      ['{"Snapshot":{"Take":{"snapshot_path":"/tmp/snap","compress_memory":true,"encrypt":false}}}', "Ok", [
        "snapshot",
        "/tmp/snap",
        { compressMemory: true, encrypt: false },
      ]],
      // A crosvm client sends the path as its user typed it; the handler gets it unchanged.
      ['{"Snapshot":{"Take":{"snapshot_path":"rel/snap","compress_memory":false,"encrypt":true}}}', "Ok", [
        "snapshot",
        "rel/snap",
        { compressMemory: false, encrypt: true },
      ]],
      ['"Exit"', "Ok", ["stop"]],
    ];
    for (const [json, reply, call] of exact) {
      handler.calls = [];
      assert.deepEqual(await rawRequest(path, json), reply, json);
      await until(() => handler.calls.length === 1, json);
      assert.deepEqual(handler.calls, [call], json);
    }
  });
});

Deno.test("control: the client sends byte-for-byte what serde_json produces for crosvm's VmRequest", () => {
  const wire = (v: unknown) => JSON.stringify(v);
  assert.equal(wire(encodeRequest({ kind: "stop" })), '"Exit"');
  assert.equal(wire(encodeRequest({ kind: "suspend", full: false })), '"SuspendVcpus"');
  assert.equal(wire(encodeRequest({ kind: "resume", full: false })), '"ResumeVcpus"');
  assert.equal(wire(encodeRequest({ kind: "suspend", full: true })), '"SuspendVm"');
  assert.equal(wire(encodeRequest({ kind: "resume", full: true })), '"ResumeVm"');
  assert.equal(wire(encodeRequest({ kind: "powerbtn" })), '"Powerbtn"');
  assert.equal(wire(encodeRequest({ kind: "sleepbtn" })), '"Sleepbtn"');
  assert.equal(
    wire(encodeRequest({ kind: "balloonAdjust", bytes: 1 << 30, wait: false })),
    '{"BalloonCommand":{"Adjust":{"num_bytes":1073741824,"wait_for_success":false}}}',
  );
  assert.equal(
    wire(encodeRequest({ kind: "balloonAdjust", bytes: 4096, wait: true })),
    '{"BalloonCommand":{"Adjust":{"num_bytes":4096,"wait_for_success":true}}}',
  );
  assert.equal(wire(encodeRequest({ kind: "balloonWs" })), '{"BalloonCommand":"WorkingSet"}');
  assert.equal(wire(encodeRequest({ kind: "balloonStats" })), '{"BalloonCommand":"Stats"}');
  assert.equal(
    wire(encodeRequest({ kind: "diskResize", index: 3, bytes: 512 })),
    '{"DiskCommand":{"disk_index":3,"command":{"Resize":{"new_size":512}}}}',
  );
  assert.equal(wire(encodeRequest({ kind: "gpuListDisplays" })), '{"GpuCommand":"ListDisplays"}');
  const display: DisplayParametersJson = {
    mode: { windowed: [800, 600] },
    hidden: true,
    "refresh-rate": 30,
    dpi: [96, 96],
  };
  assert.equal(
    wire(encodeRequest({ kind: "gpuAddDisplays", displays: [display] })),
    '{"GpuCommand":{"AddDisplays":{"displays":[{"mode":{"windowed":[800,600]},"hidden":true,"refresh-rate":30,' +
      '"dpi":[96,96]}]}}}',
  );
  assert.equal(
    wire(encodeRequest({ kind: "gpuRemoveDisplays", ids: [1, 2] })),
    '{"GpuCommand":{"RemoveDisplays":{"display_ids":[1,2]}}}',
  );
  assert.equal(
    wire(encodeRequest({ kind: "gpuSetMouseMode", id: 1, mode: "touchscreen" })),
    '{"GpuCommand":{"SetDisplayMouseMode":{"display_id":1,"mouse_mode":"touchscreen"}}}',
  );
  // crosvm's VmRequest::Snapshot(SnapshotCommand::Take { snapshot_path, compress_memory, encrypt }).
  assert.equal(
    wire(encodeRequest({ kind: "snapshot", path: "/snaps/a", compressMemory: false, encrypt: false })),
    '{"Snapshot":{"Take":{"snapshot_path":"/snaps/a","compress_memory":false,"encrypt":false}}}',
  );
  assert.equal(
    wire(encodeRequest({ kind: "snapshot", path: "/s", compressMemory: true, encrypt: false })),
    '{"Snapshot":{"Take":{"snapshot_path":"/s","compress_memory":true,"encrypt":false}}}',
  );
  // Round trip: every request decodes back to itself.
  for (
    const req of [
      { kind: "stop" },
      { kind: "suspend", full: true },
      { kind: "resume", full: false },
      { kind: "sleepbtn" },
      { kind: "balloonAdjust", bytes: 5, wait: false },
      { kind: "balloonAdjust", bytes: 5, wait: true },
      { kind: "balloonWs" },
      { kind: "gpuAddDisplays", displays: [display] },
      { kind: "gpuRemoveDisplays", ids: [0] },
      { kind: "gpuSetMouseMode", id: 3, mode: "touchscreen" },
      { kind: "diskResize", index: 0, bytes: 1 },
      { kind: "screenshot", path: "/a.png" },
      { kind: "gpuStats" },
      { kind: "snapshot", path: "/snaps/a b", compressMemory: true, encrypt: true },
      { kind: "sndMuteAll", muted: false },
    ] as ControlRequest[]
  ) {
    assert.deepEqual(decodeRequest(JSON.parse(JSON.stringify(encodeRequest(req)))), req);
  }
});

Deno.test("control: an independent SOCK_SEQPACKET client (Python) stops the VM with crosvm's JSON", async () => {
  const py = await new Deno.Command("python3", { args: ["-c", "0"] }).output().catch(() => undefined);
  if (!py?.success) {
    console.log("skipped: python3 not available");
    return;
  }
  await withServer(async ({ path, handler }) => {
    const script = `
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(sys.argv[1])
s.send(b'"Exit"')
sys.stdout.write(s.recv(65536).decode())
`;
    const out = await new Deno.Command("python3", { args: ["-c", script, path], stdout: "piped" }).output();
    assert.ok(out.success);
    assert.equal(new TextDecoder().decode(out.stdout), '"Ok"');
    await until(() => handler.calls.length === 1, "stop call");
    assert.deepEqual(handler.calls, [["stop"]]);
  });
});

Deno.test("control: 5 clients at once are served concurrently", async () => {
  await withServer(async ({ path, handler, server }) => {
    let release!: () => void;
    handler.gate = new Promise((r) => release = r);
    let entered = 0;
    const allIn = new Promise<void>((resolve) => {
      handler.onSuspendEnter = () => {
        if (++entered === 5) resolve();
      };
    });
    const clients = Array.from({ length: 5 }, () => ControlClient.connect(path));
    try {
      const replies = clients.map((c) => c.request("SuspendVcpus"));
      await allIn; // all 5 requests are inside the handler at the same time
      assert.equal(handler.maxInSuspend, 5);
      assert.equal(server.connections, 5);
      release();
      assert.deepEqual(await Promise.all(replies), ["Ok", "Ok", "Ok", "Ok", "Ok"]);
      // Each connection keeps working afterwards.
      assert.deepEqual(await Promise.all(clients.map((c) => c.request("Powerbtn"))), Array(5).fill("Ok"));
    } finally {
      clients.forEach((c) => c.close());
    }
    await until(() => server.connections === 0, "connections closed");
  });
});

Deno.test("control: malformed, unknown and oversized requests get error replies; the server keeps serving", async () => {
  await withServer(async ({ path, handler }) => {
    using c = ControlClient.connect(path);
    const bad: [string | Uint8Array, RegExp][] = [
      ["{not json", /^malformed request/],
      [new Uint8Array([0x22, 0xff, 0xfe, 0x22]), /^malformed request/], // not UTF-8
      ['"MakeRT"', /^unsupported request "MakeRT"/],
      ['"NoSuchThing"', /^unsupported request/],
      // serde requires every field of SnapshotCommand::Take.
      ['{"Snapshot":{"Take":{"snapshot_path":"/s"}}}', /^Snapshot Take: missing field "compress_memory"/],
      ['{"Snapshot":{"Take":{"compress_memory":false,"encrypt":false}}}', /missing field "snapshot_path"/],
      ['{"Snapshot":{"Take":{"snapshot_path":"/s","compress_memory":0,"encrypt":false}}}', /compress_memory/],
      ['{"Snapshot":{"Take":{"snapshot_path":"","compress_memory":false,"encrypt":false}}}', /snapshot_path/],
      ['{"Snapshot":{"Take":{"snapshot_path":7,"compress_memory":false,"encrypt":false}}}', /snapshot_path/],
      ['{"Snapshot":"Take"}', /Snapshot Take: expected an object/],
      ['{"Snapshot":{"Restore":{"snapshot_path":"/s"}}}', /^unsupported snapshot command "Restore"/],
      ['{"BalloonCommand":{"WorkingSetConfig":{"bins":[1]}}}', /^unsupported balloon command/],
      ['{"BalloonCommand":{"Adjust":{"num_bytes":1,"wait_for_success":1}}}', /wait_for_success/],
      ['{"GpuCommand":{"SetDisplayMouseMode":{"display_id":0,"mouse_mode":"relative"}}}', /mouse_mode/],
      ['{"GpuCommand":{"RemoveDisplays":{"display_ids":[4294967296]}}}', /32 bits/],
      ['{"GpuCommand":{"AddDisplays":{"displays":[{"mode":{"fullscreen":[1,1]}}]}}}', /windowed/],
      ['{"GpuCommand":{"AddDisplays":{"displays":[{"colour":1}]}}}', /unknown field "colour"/],
      ['{"BalloonCommand":{"Adjust":{"num_bytes":-1,"wait_for_success":false}}}', /num_bytes/],
      ['{"BalloonCommand":{"Adjust":{"num_bytes":18446744073709551615}}}', /num_bytes/],
      ['{"BalloonCommand":{"Adjust":{}}}', /missing field "num_bytes"/],
      ['{"DiskCommand":{"disk_index":"0","command":{"Resize":{"new_size":1}}}}', /disk_index/],
      ['{"Exit":1}', /Exit takes no data/],
      ['{"A":1,"B":2}', /one-key object/],
      ["[1,2]", /one-key object/],
      ["null", /one-key object/],
      ['{"DenovmScreenshot":{"path":""}}', /path/],
      ["x".repeat(MAX_REQUEST_BYTES + 1), /too large/],
      [new Uint8Array(200 * 1024).fill(0x20), /too large/],
    ];
    for (const [packet, re] of bad) {
      const reply = typeof packet === "string"
        ? await c.requestRaw(new TextEncoder().encode(packet))
        : await c.requestRaw(packet);
      const err = errorOfReply(reply);
      assert.ok(err !== undefined, `error reply for ${String(packet).slice(0, 40)}: ${JSON.stringify(reply)}`);
      assert.match(err, re);
      assert.deepEqual(Object.keys(reply as object), ["ErrString"]);
      assert.equal(await c.request("Powerbtn"), "Ok", "same connection still works");
    }
    // A request just at the limit is read whole (and then rejected only for its content).
    const atLimit = JSON.stringify("x".repeat(MAX_REQUEST_BYTES - 2));
    assert.match(errorOfReply(await c.requestRaw(new TextEncoder().encode(atLimit)))!, /unsupported request/);
    assert.equal(handler.calls.filter((x) => x[0] !== "powerButton").length, 0, "no bad request reached the VM");
    // Handler errors (device absent) become error replies too.
    handler.absent.add("balloonStats");
    assert.match(errorOfReply(await c.request({ BalloonCommand: "Stats" }))!, /^not available: /);
  });
});

Deno.test("control: a client that disconnects mid-request harms nothing", async () => {
  await withServer(async ({ path, handler, server }) => {
    let release!: () => void;
    handler.gate = new Promise((r) => release = r);
    const entered = new Promise<void>((r) => handler.onSuspendEnter = r);
    const fd = connectSeqpacket(path);
    const req = new TextEncoder().encode('"SuspendVcpus"');
    const { libc } = await import("../../ffi/libc.ts");
    assert.equal(Number(libc().write(fd, req, BigInt(req.length))), req.length);
    await entered;
    closeFd(fd); // gone before the reply
    release();
    await until(() => server.connections === 0, "the dead connection is dropped");
    // A connection that hangs up without sending anything, and one that sends an empty packet.
    closeFd(connectSeqpacket(path));
    const fd2 = connectSeqpacket(path);
    libc().write(fd2, new Uint8Array(0), 0n);
    closeFd(fd2);
    handler.gate = undefined;
    assert.equal(await controlRequest(path, "ResumeVcpus"), "Ok");
    assert.deepEqual(handler.calls, [["suspend"], ["resume"]]);
    await until(() => server.connections === 0, "all connections dropped");
  });
});

Deno.test("control: socket file is mode 0600 and removed on close; close is idempotent", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const path = `${dir}/vm.sock`;
    const server = new ControlServer(path, new FakeHandler());
    await server.listening;
    const st = Deno.lstatSync(path);
    assert.ok(st.isSocket);
    assert.equal(st.mode! & 0o777, 0o600);
    assert.deepEqual([...Deno.readDirSync(dir)].map((e) => e.name), ["vm.sock"], "no temporary files left");
    await Promise.all([server.close(), server.close()]);
    assert.throws(() => Deno.lstatSync(path), Deno.errors.NotFound);
    assert.throws(() => connectSeqpacket(path));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("control: a stale socket file (crashed run) is replaced", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const path = `${dir}/vm.sock`;
    closeFd(listenSeqpacket(path, 1)); // bound, then the "VM" died: the file stays, nobody listens
    assert.ok(Deno.lstatSync(path).isSocket);
    const staleIno = Deno.lstatSync(path).ino;
    const handler = new FakeHandler();
    const server = new ControlServer(path, handler);
    await server.listening;
    assert.notEqual(Deno.lstatSync(path).ino, staleIno);
    assert.equal(await controlRequest(path, "Powerbtn"), "Ok");
    assert.deepEqual(handler.calls, [["powerButton"]]);
    await server.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("control: a live socket is never stolen; a non-socket file is left alone", async () => {
  await withServer(async ({ path, dir, handler }) => {
    const ino = Deno.lstatSync(path).ino;
    const second = new ControlServer(path, new FakeHandler());
    await assert.rejects(second.listening, (e) => {
      assert.ok(e instanceof ControlSocketInUse);
      assert.equal(e.message, `control socket ${path} is in use by a running VM`);
      return true;
    });
    await second.close(); // closing a server that never listened must not remove the live file
    assert.equal(Deno.lstatSync(path).ino, ino);
    assert.equal(await controlRequest(path, "ResumeVcpus"), "Ok");
    assert.deepEqual(handler.calls, [["resume"]]);

    const file = `${dir}/plain`;
    Deno.writeTextFileSync(file, "keep me");
    const third = new ControlServer(file, new FakeHandler());
    await assert.rejects(third.listening, /exists and is not a socket/);
    await third.close();
    assert.equal(Deno.readTextFileSync(file), "keep me");
  });
});

Deno.test("control: closing the server while a handler runs does not hang; clients see the hang-up", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const path = `${dir}/vm.sock`;
    const handler = new FakeHandler();
    handler.gate = new Promise(() => {}); // never resolves
    const entered = new Promise<void>((r) => handler.onSuspendEnter = r);
    const server = new ControlServer(path, handler);
    await server.listening;
    using idle = ControlClient.connect(path);
    using busy = ControlClient.connect(path);
    const pending = busy.request("SuspendVcpus");
    await entered;
    await server.close();
    await assert.rejects(pending, /closed the connection without a reply/);
    await assert.rejects(idle.request("Powerbtn"), /closed the connection|Broken pipe|Connection reset/);
    assert.throws(() => Deno.lstatSync(path), Deno.errors.NotFound);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("control: errorOfReply understands crosvm's error shapes", () => {
  assert.equal(errorOfReply({ ErrString: "boom" }), "boom");
  assert.equal(errorOfReply({ Err: 22 }), "error (errno 22)");
  assert.equal(errorOfReply({ Err: "x" }), "x");
  assert.equal(errorOfReply("Ok"), undefined);
  assert.equal(errorOfReply({ BalloonStats: {} }), undefined);
});

Deno.test("control: the socket of a VM process killed with SIGKILL is replaced by the next run", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const path = `${dir}/vm.sock`;
    const controlUrl = new URL("./server.ts", import.meta.url).href;
    const code = `
      const { ControlServer } = await import(${JSON.stringify(controlUrl)});
      const s = new ControlServer(${JSON.stringify(path)}, { powerButton: () => Promise.resolve() });
      await s.listening;
      console.log("ready");
      await new Promise(() => {});
    `;
    const child = new Deno.Command(Deno.execPath(), { args: ["eval", code], stdout: "piped", stderr: "inherit" })
      .spawn();
    const reader = child.stdout.getReader();
    const first = await reader.read();
    assert.equal(new TextDecoder().decode(first.value).trim(), "ready");
    // While it lives, its socket is not taken, and it answers.
    const rival = new ControlServer(path, new FakeHandler());
    await assert.rejects(rival.listening, ControlSocketInUse);
    await rival.close();
    assert.equal(await controlRequest(path, "Powerbtn"), "Ok");
    child.kill("SIGKILL");
    await child.status;
    reader.releaseLock();
    await child.stdout.cancel();
    assert.ok(Deno.lstatSync(path).isSocket, "a killed process leaves its socket file behind");
    const handler = new FakeHandler();
    const server = new ControlServer(path, handler);
    await server.listening;
    assert.equal(await controlRequest(path, "ResumeVcpus"), "Ok");
    assert.deepEqual(handler.calls, [["resume"]]);
    await server.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("control: a live listener whose backlog is full is still recognised as live", async () => {
  const dir = await Deno.makeTempDir();
  const fds: number[] = [];
  let listener = -1;
  try {
    const path = `${dir}/vm.sock`;
    listener = listenSeqpacket(path, 0); // never accepts
    for (let i = 0; i < 1024; i++) {
      try {
        fds.push(connectSeqpacket(path, { nonBlockingConnect: true }));
      } catch {
        break; // backlog full (EAGAIN)
      }
    }
    assert.ok(fds.length < 1024, "the backlog filled up");
    const server = new ControlServer(path, new FakeHandler());
    await assert.rejects(server.listening, ControlSocketInUse);
    await server.close();
    assert.ok(Deno.lstatSync(path).isSocket);
  } finally {
    fds.forEach(closeFd);
    closeFd(listener);
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("control: `denovm` subprocesses for crosvm's newer commands: --full, --wait, sleepbtn, balloon_ws, gpu displays", async () => {
  await withServer(async ({ path, handler }) => {
    const ok = async (args: string[], stdout = "") => {
      const r = await runDenovm(args);
      assert.equal(r.code, 0, `${args.join(" ")}: ${r.stderr}`);
      assert.equal(r.stdout, stdout, args.join(" "));
    };
    await ok(["suspend", path, "--full"]);
    await ok(["resume", "--full", path]);
    await ok(["sleepbtn", path]);
    await ok(["snd", "mute-all", "true", path]);
    await ok(["balloon", "8M", path, "--wait"]);
    // balloon_ws prints crosvm's whole reply as pretty JSON (what a VM with working-set reporting answers).
    await ok(["balloon_ws", path], JSON.stringify({ BalloonWS: WS }, null, 2) + "\n");
    // The gpu commands print crosvm's text for the GpuControlResult.
    await ok(["gpu", "add-displays", "--gpu-display", "mode=windowed[640,480]", path], "displays updated\n");
    await ok(["gpu", "remove-displays", "--display-id", "1", path], "displays updated\n");
    await ok(
      ["gpu", "set-mouse-mode", "--display-id", "1", "--mouse-mode", "touchscreen", path],
      "display_mouse_mode_set\n",
    );
    assert.deepEqual(handler.calls, [
      ["suspendFull"],
      ["resumeFull"],
      ["sleepButton"],
      ["sndMuteAll", true],
      ["balloonAdjustWait", 8 << 20],
      ["balloonWorkingSet"],
      ["gpuAddDisplays", [{ mode: { windowed: [640, 480] }, hidden: false, "refresh-rate": 60, dpi: [320, 320] }]],
      ["gpuRemoveDisplays", [1]],
      ["gpuSetMouseMode", 1, "touchscreen"],
    ]);
    // A GPU result that is not a success is one stderr line and exit 1.
    let r = await runDenovm(["gpu", "remove-displays", "--display-id", "0", "--display-id", "5", path]);
    assert.equal(r.code, 1);
    assert.equal(r.stdout, "");
    assert.equal(r.stderr, "denovm: gpu remove-displays: no_such_display 5\n");
    r = await runDenovm(["gpu", "set-mouse-mode", "--display-id", "7", "--mouse-mode", "touchscreen", path]);
    assert.equal(r.code, 1);
    assert.equal(r.stderr, "denovm: gpu set-mouse-mode: err_string boom\n");
  });
});

Deno.test("control: controlSocketPath puts crosvm-<pid>.sock inside a directory and leaves other paths alone", async () => {
  const dir = await Deno.makeTempDir();
  try {
    assert.equal(controlSocketPath(dir, 42), `${dir}/crosvm-42.sock`);
    assert.equal(controlSocketPath(`${dir}/`, 42), `${dir}/crosvm-42.sock`);
    assert.equal(controlSocketPath(`${dir}/vm.sock`, 42), `${dir}/vm.sock`);
    assert.equal(controlSocketPath(`${dir}/no/such/dir/vm.sock`, 42), `${dir}/no/such/dir/vm.sock`);
    assert.equal(controlSocketPath(dir), `${dir}/crosvm-${Deno.pid}.sock`);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("control: the socket file is removed when the process ends by Deno.exit, an uncaught exception or a rejection", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const controlUrl = new URL("./server.ts", import.meta.url).href;
    for (
      const ending of [
        "Deno.exit(3)",
        "setTimeout(() => { throw new Error('boom'); }, 0)",
        "Promise.reject(new Error('rej'))",
      ]
    ) {
      const path = `${dir}/vm.sock`;
      const code = `
        const { ControlServer } = await import(${JSON.stringify(controlUrl)});
        const s = new ControlServer(${JSON.stringify(path)}, {});
        await s.listening;
        if (!Deno.lstatSync(${JSON.stringify(path)}).isSocket) throw new Error("no socket");
        ${ending}
      `;
      const out = await new Deno.Command(Deno.execPath(), { args: ["eval", code], stdout: "null", stderr: "piped" })
        .output();
      const stderr = new TextDecoder().decode(out.stderr);
      assert.notEqual(out.code, 0, `${ending}: the process failed as asked`);
      assert.doesNotMatch(stderr, /no socket/);
      assert.throws(() => Deno.lstatSync(path), Deno.errors.NotFound, `${ending}: socket file left`);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

// ---- Idle clients: they cost no thread and never hold up another client or the guest's devices ----

/** Hang guard for one request or device completion while idle clients sit on the socket. */
const IDLE_HANG_GUARD_MS = 20_000;
/** The threads of this process. */
function threadCount(): number {
  return [...Deno.readDirSync("/proc/self/task")].length;
}

/**
 * Connect idle clients (they never send) until `fds` holds `n`. The connects do not block: when the listen
 * backlog is full (EAGAIN) the next one waits for the server to accept, a bounded number of times.
 */
async function connectIdle(path: string, fds: number[], n: number): Promise<void> {
  for (let waits = 0; fds.length < n;) {
    try {
      fds.push(connectSeqpacket(path, { nonBlockingConnect: true }));
    } catch (e) {
      if (!(e instanceof SysError && e.errno === EAGAIN)) throw e;
      assert.ok(++waits < 2000, `the server stopped accepting after ${fds.length} idle clients`);
      await new Promise((r) => setTimeout(r, 10));
    }
  }
}

Deno.test("control: 40, then 200 idle clients: another client's balloon_stats is answered and no thread is added per client", async () => {
  await withServer(async ({ path, server }) => {
    const stats = () =>
      within(controlRequest(path, { BalloonCommand: "Stats" }), () => "balloon_stats", IDLE_HANG_GUARD_MS);
    assert.ok(isRecord(await stats()), "answered before the idle clients come");
    const before = threadCount();
    const idle: number[] = [];
    const threads: number[] = [];
    try {
      for (const n of [40, 200]) {
        await connectIdle(path, idle, n);
        await until(() => server.connections === n, `${n} idle clients accepted`);
        threads.push(threadCount());
        const reply = await stats();
        assert.equal(errorOfReply(reply), undefined, `with ${n} idle clients: ${JSON.stringify(reply)}`);
        assert.ok(isRecord(reply) && "BalloonStats" in reply, `with ${n} idle clients`);
      }
    } finally {
      idle.forEach(closeFd);
    }
    for (const t of threads) {
      assert.ok(t <= before, `threads: ${before} before the idle clients, ${threads} with 40, 200`);
    }
    await until(() => server.connections === 0, "the idle clients' connections dropped");
  });
});

Deno.test("control: beyond MAX_CONTROL_CLIENTS a client is told so and closed; the server keeps serving", async () => {
  await withServer(async ({ path, server, handler }) => {
    const idle: number[] = [];
    try {
      await connectIdle(path, idle, MAX_CONTROL_CLIENTS);
      await until(() => server.connections === MAX_CONTROL_CLIENTS, "every client up to the limit accepted");
      // One more: its request is answered with the refusal, by the in-process client and by the CLI.
      const reply = await within(
        controlRequest(path, "Powerbtn"),
        () => "the client beyond the limit",
        IDLE_HANG_GUARD_MS,
      );
      assert.equal(errorOfReply(reply), TOO_MANY_CLIENTS);
      const r = await runDenovm(["powerbtn", path]);
      assert.equal(r.code, 1, r.stderr);
      assert.equal(r.stderr, `denovm: powerbtn: ${TOO_MANY_CLIENTS}\n`);
      // A refused client that sends nothing gets the same reply, then the hang-up.
      const extra = connectSeqpacket(path);
      try {
        const buf = new Uint8Array(1024);
        await until(() => (pollSync([extra], POLLIN, 0)[0] & POLLIN) !== 0, "the refusal arrives");
        const n = readPacket(extra, buf)!;
        assert.equal(errorOfReply(JSON.parse(new TextDecoder().decode(buf.subarray(0, n)))), TOO_MANY_CLIENTS);
        assert.equal(readPacket(extra, buf), 0, "then the connection is closed");
      } finally {
        closeFd(extra);
      }
      assert.equal(server.connections, MAX_CONTROL_CLIENTS);
      assert.equal(handler.calls.length, 0, "no refused request reached the VM");
      // Once a client leaves, the next one is served.
      closeFd(idle.shift()!);
      await until(() => server.connections === MAX_CONTROL_CLIENTS - 1, "the client that left is dropped");
      const ok = await within(controlRequest(path, "Powerbtn"), () => "a client after one left", IDLE_HANG_GUARD_MS);
      assert.equal(ok, "Ok");
      assert.deepEqual(handler.calls, [["powerButton"]]);
    } finally {
      idle.forEach(closeFd);
    }
    await until(() => server.connections === 0, "every connection dropped");
  });
});

Deno.test("control: the client reads a reply the server sent before closing, whether its send or its read fails first", async () => {
  const dir = await Deno.makeTempDir({ prefix: "denovm-ctl-test-" });
  const path = `${dir}/vm.sock`;
  const listenFd = listenSeqpacket(path, 4);
  const refusal = new TextEncoder().encode(JSON.stringify({ ErrString: TOO_MANY_CLIENTS }));
  const serverSide = () => {
    const fd = libc().accept4(listenFd, null, null, 0);
    assert.ok(fd >= 0);
    return fd;
  };
  try {
    // The server answers and closes before the request is sent: the send fails with EPIPE.
    using early = ControlClient.connect(path);
    let fd = serverSide();
    assert.equal(Number(libc().write(fd, refusal, BigInt(refusal.length))), refusal.length);
    closeFd(fd);
    assert.equal(errorOfReply(await early.request("Powerbtn")), TOO_MANY_CLIENTS);
    // The request arrives, the server answers and closes with it unread: the read fails with ECONNRESET first.
    using late = ControlClient.connect(path);
    fd = serverSide();
    const reply = late.request("Powerbtn");
    await until(() => (pollSync([fd], POLLIN, 0)[0] & POLLIN) !== 0, "the request is sent");
    assert.equal(Number(libc().write(fd, refusal, BigInt(refusal.length))), refusal.length);
    closeFd(fd);
    assert.equal(errorOfReply(await reply), TOO_MANY_CLIENTS);
  } finally {
    closeFd(listenFd);
    await Deno.remove(dir, { recursive: true });
  }
});

function isRecord(v: unknown): v is Record<string, unknown> {
  return v !== null && typeof v === "object" && !Array.isArray(v);
}

/** virtio-blk request header (linux/virtio_blk.h struct virtio_blk_outhdr): type, reserved, sector. */
const VIRTIO_BLK_T_OUT = 1;
const VIRTIO_BLK_S_OK = 0;
const BLK_HDR_SIZE = 16;
const BLK_HDR_SECTOR = 8;
const SECTOR = 512;

function blkOutHeader(sector: number): Uint8Array {
  const h = new Uint8Array(BLK_HDR_SIZE);
  const v = new DataView(h.buffer);
  v.setUint32(0, VIRTIO_BLK_T_OUT, true);
  v.setBigUint64(BLK_HDR_SECTOR, BigInt(sector), true);
  return h;
}

Deno.test("control: with 40, then 200 idle clients on a VM's control socket, a guest's block write completes through the notify loop and the socket answers", async () => {
  const dir = await Deno.makeTempDir({ prefix: "denovm-ctl-test-" });
  const img = `${dir}/disk.img`;
  await Deno.writeFile(img, new Uint8Array(MiB));
  const vm = new FakeVm();
  const sock = `${dir}/vm.sock`;
  const machine = await buildMachine({
    ...defaultVmConfig(await buildGuest("boot_info")),
    memMiB: 64,
    serials: [{ type: "sink", hardware: "serial", num: 1, console: true, earlycon: false, stdin: false }],
    blocks: [{ path: img, ro: false, root: false, sparse: true, blockSize: 512, direct: false }],
    socket: sock,
  }, { vm, noStdin: true, log: () => {} });
  const idle: number[] = [];
  try {
    await machine.start(); // the device side: the notify loop
    await machine.startControlSocket();
    const slot = machine.devices.virtio.find((v) => v.device.deviceType === VIRTIO_ID_BLOCK)!;
    // The guest's driver sets the queue up through the transport's registers; its kicks go through the
    // queue's ioeventfd, as KVM signals it for a QueueNotify write.
    const drv = new VirtioTestDriver(slot.transport, machine.memory, { start: 32 * MiB, end: 33 * MiB });
    drv.init();
    const q = drv.queues[0];
    const control = () =>
      within(controlCall(sock, { kind: "balloonAdjust", bytes: 8 * MiB }), () => "balloon adjust", IDLE_HANG_GUARD_MS);
    await control();
    const before = threadCount();
    let sector = 0;
    for (const n of [40, 200]) {
      await connectIdle(sock, idle, n);
      await control(); // answered after every idle client before it was accepted
      assert.ok(threadCount() <= before, `threads: ${before} before the idle clients, ${threadCount()} with ${n}`);
      const pattern = new Uint8Array(SECTOR).fill(n & 0xff);
      const sub = q.submit([blkOutHeader(sector), pattern, 1]);
      eventfdWrite(slot.notifyFds[0]);
      assert.ok((await vm.waitIrq(slot.irq, IDLE_HANG_GUARD_MS)) > 0n, `block write completes with ${n} idle clients`);
      drv.ackInterrupt();
      assert.equal(q.used().length, 1);
      assert.equal(machine.memory.getU8(sub.buffers[2].addr), VIRTIO_BLK_S_OK);
      const file = Deno.readFileSync(img); // synchronous: an async read would wait on the same pool
      assert.deepEqual(file.subarray(sector * SECTOR, (sector + 1) * SECTOR), pattern);
      q.setUsedEvent(q.usedIdx());
      sector++;
    }
  } finally {
    idle.forEach(closeFd);
    await machine.stop();
    await Deno.remove(dir, { recursive: true });
  }
});
