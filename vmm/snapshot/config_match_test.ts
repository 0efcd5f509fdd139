// A restore's configuration: each structural difference between the saved and the given configuration is a
// ConfigError naming it in the command line's words; host-side differences are taken from the given
// configuration or the overrides; everything else comes from the snapshot.

import assert from "node:assert/strict";
import { ConfigError, EXIT_INVALID_ARGS } from "../../core/exit.ts";
import { defaultVmConfig, gpuConfig, type VmConfig } from "../config.ts";
import { checkRestoreConfig, restoredConfig, type RestoreOverrides } from "./config_match.ts";

/** A saved configuration with one of every device. */
function saved(): VmConfig {
  return {
    ...defaultVmConfig("/boot/vmlinuz"),
    memMiB: 256,
    cpus: 1,
    serials: [
      { type: "file", hardware: "serial", num: 1, path: "/old/com1.log", console: true, earlycon: false, stdin: false },
      { type: "sink", hardware: "virtio-console", num: 1, console: false, earlycon: false, stdin: false },
    ],
    blocks: [
      { path: "/old/root.img", ro: true, root: true, sparse: true, blockSize: 512, direct: false },
      { path: "/old/data.img", ro: false, root: false, sparse: true, blockSize: 512, direct: false, lock: true },
    ],
    nets: [{ tapName: "tap-old", tapFd: 9, mac: "02:00:00:00:00:01" }],
    inputs: [{ kind: "keyboard", path: "/old/kbd.sock" }, { kind: "mouse" }],
    vsock: { cid: 3, udsPath: "/old/vsock" },
    gpu: gpuConfig({ displays: [{ mode: "web", width: 64, height: 48, port: 8000 }], tracePath: "/old/trace.json" }),
    socket: "/old/vm.sock",
    agent: true,
  };
}

type Edit = (c: VmConfig) => void;

const STRUCTURAL: [string, Edit, string][] = [
  ["memory", (c) => c.memMiB = 512, "--mem 512 given; the snapshot was taken with 256 MiB"],
  ["vCPUs", (c) => c.cpus = 2, "--cpus 2 given; the snapshot has 1 vCPU"],
  ["a block device fewer", (c) => c.blocks.pop(), "1 --block device given; the snapshot has 2"],
  ["a block device more", (c) => c.blocks.push({ ...c.blocks[1] }), "3 --block devices given; the snapshot has 2"],
  [
    "read-only",
    (c) => c.blocks[1].ro = true,
    "--block 2 (/old/data.img) is read-only; in the snapshot it is writable",
  ],
  ["writable", (c) => c.blocks[0].ro = false, "--block 1 (/old/root.img) is writable; in the snapshot it is read-only"],
  ["nets", (c) => c.nets = [], "0 --net devices given; the snapshot has 1"],
  ["no rng", (c) => c.rng = false, "--no-rng given; the snapshot has a virtio-rng device"],
  ["no balloon", (c) => c.balloon = false, "--no-balloon given; the snapshot has a virtio-balloon device"],
  ["inputs", (c) => c.inputs.pop(), "1 --input device given; the snapshot has 2"],
  ["input kind", (c) => c.inputs[1].kind = "multi-touch", "--input 2 is multi-touch; the snapshot's input 2 is mouse"],
  ["no vsock", (c) => delete c.vsock, "no --vsock given; the snapshot has a vsock device"],
  ["no gpu", (c) => delete c.gpu, "no --gpu given; the snapshot has a GPU"],
  [
    "gpu backend",
    (c) => c.gpu!.backend = "virglrenderer",
    "--gpu backend=virglrenderer given; the snapshot's GPU has backend=2d",
  ],
  ["gpu displays", (c) => c.gpu!.displays = [], "0 GPU displays given; the snapshot has 1"],
  ["serial missing", (c) => c.serials.shift(), "no --serial hardware=serial,num=1 given; the snapshot has that port"],
  [
    "serial extra",
    (c) => c.serials.push({ ...c.serials[0], num: 2 }),
    "--serial hardware=serial,num=2 given; the snapshot has no such port",
  ],
  [
    "serial hardware",
    (c) => c.serials[1].hardware = "serial",
    "no --serial hardware=virtio-console,num=1 given; the snapshot has that port",
  ],
  [
    "serial console",
    (c) => c.serials[0].console = false,
    "--serial hardware=serial,num=1 console=false given; the snapshot's port has console=true",
  ],
  ["agent", (c) => c.agent = false, "no --agent given; the snapshot has the agent port"],
  ["mmio cmdline", (c) => c.virtioMmioCmdline = true, "--virtio-mmio-cmdline given; the snapshot was taken without it"],
];

Deno.test("restore config: each structural difference is a ConfigError naming it", () => {
  for (const [what, edit, message] of STRUCTURAL) {
    const given = saved();
    edit(given);
    for (const run of [() => checkRestoreConfig(saved(), given), () => restoredConfig(saved(), given)]) {
      assert.throws(run, (e: Error) => {
        assert.ok(e instanceof ConfigError, what);
        assert.equal(e.exitCode, EXIT_INVALID_ARGS, what);
        assert.equal(e.message, message, what);
        return true;
      });
    }
  }
  // The reverse directions of the optional devices.
  const without: VmConfig = { ...saved(), rng: false, balloon: false, agent: false, vsock: undefined, gpu: undefined };
  const reverse: [Edit, string][] = [
    [(c) => c.rng = true, "a virtio-rng device given (no --no-rng); the snapshot was taken with --no-rng"],
    [
      (c) => c.balloon = true,
      "a virtio-balloon device given (no --no-balloon); the snapshot was taken with --no-balloon",
    ],
    [(c) => c.agent = true, "--agent given; the snapshot has no agent port"],
    [(c) => c.vsock = { cid: 5 }, "--vsock given; the snapshot has no vsock device"],
    [(c) => c.gpu = gpuConfig(), "--gpu given; the snapshot has no GPU"],
  ];
  for (const [edit, message] of reverse) {
    const given = structuredClone(without);
    edit(given);
    assert.throws(() => checkRestoreConfig(without, given), { name: "ConfigError", message });
  }
  // "3d" is the parser's alias of virglrenderer.
  const virgl = { ...saved(), gpu: gpuConfig({ ...saved().gpu, backend: "virglrenderer" }) };
  checkRestoreConfig(virgl, { ...virgl, gpu: { ...virgl.gpu!, backend: "3d" } });
});

Deno.test("restore config: host-side fields come from the given configuration, the rest from the snapshot", () => {
  const given = saved();
  given.kernel = "/elsewhere/vmlinuz"; // not used by a restore: the snapshot's stays
  given.params = ["single"];
  given.blocks[0].path = "/new/root.img";
  given.blocks[1] = { ...given.blocks[1], path: "/new/data.img", direct: true, lock: false, blockSize: 4096 };
  given.serials[0] = { ...given.serials[0], type: "unix", path: "/new/com1.sock", input: "/new/in" };
  given.serials.reverse(); // ports pair by hardware and num, not position
  given.nets[0] = { tapName: "tap-new", mac: "02:00:00:00:00:02" };
  given.inputs[0].path = "/new/kbd.sock";
  given.vsock = { cid: 7, udsPath: "/new/vsock" };
  given.gpu!.displays[0] = { ...given.gpu!.displays[0], port: 9000, mode: "windowed" };
  given.gpu!.tracePath = undefined;
  given.socket = "/new/vm.sock";
  given.gdb = 1234;
  const out = restoredConfig(saved(), given);
  const expected = saved();
  expected.blocks[0].path = "/new/root.img";
  expected.blocks[1] = { ...expected.blocks[1], path: "/new/data.img", direct: true, lock: false };
  expected.serials[0] = { ...expected.serials[0], type: "unix", path: "/new/com1.sock", input: "/new/in" };
  expected.nets[0] = { tapName: "tap-new", mac: "02:00:00:00:00:02" };
  expected.inputs[0].path = "/new/kbd.sock";
  expected.vsock = { cid: 7, udsPath: "/new/vsock" };
  expected.gpu!.displays[0].port = 9000;
  delete expected.gpu!.tracePath;
  expected.socket = "/new/vm.sock";
  expected.gdb = 1234;
  assert.deepEqual(out, expected);
  assert.equal("tracePath" in out.gpu!, false, "an absent field stays absent, not undefined");
});

Deno.test("restore config: without a given configuration the snapshot's is used, less its tap fd; overrides re-point host resources", () => {
  const plain = restoredConfig(saved());
  const expected = saved();
  delete expected.nets[0].tapFd;
  assert.deepEqual(plain, expected);

  const overrides: RestoreOverrides = {
    blocks: [{ path: "/clone/root.img" }],
    serials: [{ hardware: "serial", num: 1, type: "sink", path: undefined }],
    socket: "/clone/vm.sock",
    vsock: { cid: 9 },
    nets: [{ tapName: "tap-clone" }],
    gpu: { displays: [{ port: 0 }] },
  };
  const out = restoredConfig(saved(), undefined, overrides);
  assert.equal(out.blocks[0].path, "/clone/root.img");
  assert.equal(out.blocks[1].path, "/old/data.img");
  assert.deepEqual(out.serials[0], { ...saved().serials[0], type: "sink" }, "an undefined override leaves the field");
  assert.equal(out.socket, "/clone/vm.sock");
  assert.deepEqual(out.vsock, { cid: 9, udsPath: "/old/vsock" });
  assert.deepEqual(out.nets[0], { tapName: "tap-clone", mac: "02:00:00:00:00:01" });
  assert.equal(out.gpu!.displays[0].port, 0);
  assert.equal(out.memMiB, 256);

  // Structural overrides are checked like a given configuration.
  const refused: [RestoreOverrides, string][] = [
    [{ memMiB: 128 }, "--mem 128 given; the snapshot was taken with 256 MiB"],
    [{ blocks: [{}, {}, { path: "/x" }] }, "3 --block devices given; the snapshot has 2"],
    [{ blocks: [{ ro: false }] }, "--block 1 (/old/root.img) is writable; in the snapshot it is read-only"],
    [
      { serials: [{ hardware: "serial", num: 3, type: "sink" }] },
      "--serial hardware=serial,num=3 given; the snapshot has no such port",
    ],
    [{ gpu: { backend: "gfxstream" } }, "--gpu backend=gfxstream given; the snapshot's GPU has backend=2d"],
  ];
  for (const [o, message] of refused) {
    assert.throws(() => restoredConfig(saved(), undefined, o), { name: "ConfigError", message });
  }
  // A Partial<VmConfig> is an override.
  const partial: Partial<VmConfig> = { socket: "/p.sock" };
  assert.equal(restoredConfig(saved(), undefined, partial).socket, "/p.sock");
});
