// crosvm's command line as its users type it: flags and keys crosvm has (implemented, accepted with a
// warning, or refused by name), `-X=value`, key=value edges, the kernel command line's order, exit statuses
// and one validation path for --print-config and a boot. Expected values follow google/crosvm
// (src/main.rs prepare_argh_args and crosvm_main, src/crosvm/cmdline.rs, x86_64/src/lib.rs, arch/src/serial.rs,
// serde_keyvalue).

import assert from "node:assert/strict";
import { kernelCommandLine, type VmConfig } from "../config.ts";
import { EXIT_GUEST_PANIC, EXIT_HOST_ERROR, EXIT_SUCCESS, EXIT_VM_RESET, vmEndExitCode } from "../../core/exit.ts";
import { crosvmOnlyKeys, RUN_FLAGS, runHelp } from "./help.ts";
import { parseKeyValues, UsageError } from "./keyvalue.ts";
import { parseRunArgs, type RunCommand } from "./run.ts";
import { validateVmConfig } from "../validate.ts";
import { runDenovm, stderrLines } from "../../test/support/cli.ts";

function parse(...args: string[]): RunCommand {
  return parseRunArgs([...args, "bzImage"], { checkFiles: false });
}
function run(...args: string[]): VmConfig {
  return parse(...args).config;
}
function refused(args: string[], pattern: RegExp): void {
  assert.throws(() => parseRunArgs([...args, "bzImage"], { checkFiles: false }), (e: unknown) => {
    assert.ok(e instanceof UsageError, `expected UsageError, got ${e}`);
    assert.match(e.message, pattern);
    assert.doesNotMatch(e.message, /unknown (option|key)/);
    return true;
  });
}

/** `denovm ARGS...` on a host without KVM, with its stderr's lines. */
async function denovm(args: string[]) {
  const r = await runDenovm(args, { env: { DENOVM_KVM_DEVICE: "/nonexistent/kvm" } });
  return { ...r, lines: stderrLines(r) };
}

// ---- -X=value, --flag=value, --host_ip ----

Deno.test("crosvm argv: -X=value and --flag=value split at the first '='", () => {
  assert.deepEqual(run("-p=init=/bin/sh").params, ["init=/bin/sh"]);
  assert.equal(run("-s=/run/vm.sock").socket, "/run/vm.sock");
  assert.equal(run("-m=512").memMiB, 512);
  assert.deepEqual(run("--params=console=hvc0 quiet").params, ["console=hvc0 quiet"]);
  // The attached form still works.
  assert.equal(run("-m512").memMiB, 512);
});

Deno.test("crosvm argv: --host_ip is --host-ip, with one deprecation line", () => {
  const r = parse("--host_ip", "10.0.0.1", "--netmask", "255.255.255.0", "--mac", "02:00:00:00:00:01");
  assert.deepEqual(r.config.nets, [{ hostIp: "10.0.0.1", netmask: "255.255.255.0", mac: "02:00:00:00:00:01" }]);
  assert.ok(r.warnings.some((w) => /--host_ip is deprecated; use --host-ip/.test(w)), r.warnings.join("\n"));
});

// ---- key=value edges ----

Deno.test("keyvalue: a value may contain '=', a bare key before path= is a flag, single quotes", () => {
  assert.equal(run("--block", "path=/img/a=b.img").blocks[0].path, "/img/a=b.img");
  assert.equal(run("--block", "/img/a=b.img,ro").blocks[0].path, "/img/a=b.img");
  assert.equal(run("--serial", "type=file,path=/tmp/log=1").serials[0].path, "/tmp/log=1");
  const b = run("--block", "ro,path=disk.img").blocks[0];
  assert.equal(b.path, "disk.img");
  assert.equal(b.ro, true);
  assert.equal(run("--block", "root,ro,path=d.img").blocks[0].root, true);
  assert.equal(run("--block", "'a,b.img',ro").blocks[0].path, "a,b.img");
  // A key alone that needs a value says so.
  refused(["--block", "id,path=d.img"], /--block: key "id" needs a value/);
  assert.throws(() => parseKeyValues("=x", "--t"), /--t: missing key/);
});

Deno.test("--serial: several ports may be consoles; each gets console=, serial ports first (crosvm)", () => {
  const c = run(
    "--serial",
    "type=stdout,hardware=virtio-console,num=1,console",
    "--serial",
    "type=sink,num=2,console",
    "--serial",
    "type=sink,num=1,console",
  );
  assert.equal(kernelCommandLine(c), "panic=-1 console=ttyS0 console=ttyS1 console=hvc0");
  refused(["--serial", "type=stdout,input-unix-stream"], /input-unix-stream needs type=unix-stream/);
  assert.equal(run("--serial", "type=unix-stream,path=/tmp/s,input-unix-stream").serials[0].type, "unix-stream");
});

// ---- the kernel command line ----

Deno.test("kernelCommandLine: crosvm's order for combinations of flags", () => {
  const cases: [string[], string][] = [
    [[], "panic=-1 console=ttyS0"],
    [["-p", "init=/bin/sh"], "panic=-1 console=ttyS0 init=/bin/sh"],
    // The root disk's root= comes after the user's pieces: crosvm pushes it onto params when it validates.
    [["--root", "r.img", "-p", "quiet"], "panic=-1 console=ttyS0 quiet root=/dev/vda ro"],
    [["--block", "a.img", "--rwroot", "r.img", "-p", "a", "-p", "b"], "panic=-1 console=ttyS0 a b root=/dev/vdb rw"],
    // Pieces are taken exactly as given (crosvm's insert_str neither trims nor skips).
    [["-p", " x  y "], "panic=-1 console=ttyS0  x  y "],
    [
      ["--serial", "type=stdout,num=1,earlycon", "--serial", "type=sink,hardware=virtio-console,console", "-p", "q"],
      "panic=-1 console=hvc0 earlycon=uart8250,io,0x3f8 q",
    ],
    // With no console port and COM1 taken without one, nothing adds console= (crosvm's default is not applied).
    [["--serial", "type=sink,num=1"], "panic=-1"],
    [["--serial", "type=sink,hardware=debugcon,console"], "panic=-1"],
  ];
  for (const [args, line] of cases) assert.equal(kernelCommandLine(run(...args)), line, args.join(" "));
  // denovm's own virtio_mmio.device= arguments come last.
  assert.equal(
    kernelCommandLine(run("--root", "r.img", "-p", "q"), ["virtio_mmio.device=4K@0xd0000000:5"]),
    "panic=-1 console=ttyS0 q root=/dev/vda ro virtio_mmio.device=4K@0xd0000000:5",
  );
});

// ---- crosvm's keys and flags ----

Deno.test("crosvm keys denovm does not act on: accepted with one warning each, never 'unknown key'", () => {
  const cases: [string, string, RegExp][] = [
    ["--block", "d.img,bootindex=1", /--block bootindex: .*firmware.*; ignored/],
    ["--block", "d.img,packed-queue", /--block packed-queue: .*split virtqueues; ignored/],
    ["--block", "d.img,multiple-workers=true", /--block multiple-workers: .*; ignored/],
    ["--block", "d.img,async-executor=uring", /--block async-executor: .*; ignored/],
    ["--block", "d.img,pci-address=00:02.0", /--block pci-address: .*virtio-mmio.*; ignored/],
    ["--net", "tap-name=t0,vhost-net", /--net vhost-net: .*userspace.*; ignored/],
    ["--net", "tap-name=t0,vhost-net=[device=/dev/vhost-net]", /--net vhost-net: /],
    ["--net", "tap-name=t0,packed-queue=true", /--net packed-queue: /],
    ["--net", "tap-name=t0,mrg_rxbuf", /--net mrg_rxbuf: .*mergeable/],
    ["--net", "tap-name=t0,pci-address=00:03.0", /--net pci-address: /],
    ["--vsock", "3,device=/dev/vhost-vsock", /--vsock device: .*userspace/],
    ["--gpu", "2d,max-num-displays=4", /--gpu max-num-displays: /],
    ["--gpu", "2d,cache-path=/tmp/c,cache-size=10M", /--gpu cache-path: /],
    ["--gpu", "2d,wsi=vk", /--gpu wsi: /],
    ["--cpus", "2,clusters=[[0,1]]", /--cpus clusters: /],
    ["--serial", "type=stdout,out-timestamp", /--serial out-timestamp: /],
  ];
  for (const [flag, value, warning] of cases) {
    const r = parse(flag, value);
    assert.ok(r.warnings.some((w) => warning.test(w)), `${flag} ${value}: ${r.warnings.join(" | ")}`);
  }
  // Values are still checked with crosvm's type.
  refused(["--block", "d.img,packed-queue=maybe"], /--block packed-queue: expected true or false/);
  // boot-cpu: denovm boots vCPU 0.
  assert.equal(run("--cpus", "num-cores=2,boot-cpu=0").cpus, 2);
  refused(["--cpus", "num-cores=2,boot-cpu=1"], /--cpus boot-cpu: 1 is not supported: denovm boots vCPU 0/);
});

Deno.test("crosvm's deprecated flags build what their --net, --input and --gpu forms build", () => {
  const r = parse("--tap-name", "tap0", "--net", "tap-fd=5", "--tap-fd", "3", "--tap-name", "tap1");
  // --net first, then each --tap-name, then each --tap-fd (crosvm's order).
  assert.deepEqual(r.config.nets, [{ tapFd: 5 }, { tapName: "tap0" }, { tapName: "tap1" }, { tapFd: 3 }]);
  assert.equal(r.warnings.filter((w) => /--tap-name is deprecated; use --net tap-name=NAME/.test(w)).length, 1);
  refused(["--host-ip", "10.0.0.1", "--netmask", "255.0.0.0"], /--mac missing/);

  const i = run(
    "--keyboard",
    "/tmp/kbd,with,commas",
    "--input",
    "mouse",
    "--multi-touch",
    "/tmp/mt,width=800,height=600",
    "--evdev",
    "/dev/input/event0",
    "--single-touch",
    "path=/tmp/st",
  );
  assert.deepEqual(i.inputs, [
    { kind: "mouse" },
    { kind: "single-touch", path: "/tmp/st" },
    { kind: "multi-touch", path: "/tmp/mt", width: 800, height: 600 },
    { kind: "keyboard", path: "/tmp/kbd,with,commas" },
    { kind: "evdev", path: "/dev/input/event0" },
  ]);

  const g = run("--gpu-display", "mode=windowed[800,600]").gpu!;
  assert.equal(g.backend, "2d");
  assert.deepEqual(g.displays.map((d) => [d.width, d.height]), [[800, 600]]);
  const g2 = run("--gpu", "2d", "--gpu-display", "mode=windowed[640,480]").gpu!;
  assert.deepEqual(g2.displays.map((d) => [d.width, d.height]), [[1280, 1024], [640, 480]]);
});

Deno.test("crosvm-only flags: accepted with one warning, or refused by name (exit 35), never unknown", () => {
  for (
    const [args, warning] of [
      [["--name", "vm1"], /--name: .*; ignored/],
      [["--syslog-tag", "t"], /--syslog-tag: .*stderr.*; ignored/],
      [["--no-i8042"], /--no-i8042: .*reset.*; ignored/],
      [["--display-window-keyboard"], /--display-window-keyboard: /],
      [["--display-window-mouse"], /--display-window-mouse: /],
      [["--vhost-net"], /--vhost-net: .*vhost-net; ignored/],
    ] as [string[], RegExp][]
  ) {
    const r = parse(...args);
    assert.equal(r.warnings.length, 1, r.warnings.join("\n"));
    assert.match(r.warnings[0], warning);
  }
  assert.deepEqual(parse("--disable-sandbox").warnings, []);
  assert.deepEqual(parse("--irqchip", "kernel").warnings, []);
  refused(["--irqchip", "split"], /--irqchip split: a crosvm option denovm does not support/);
  refused(["--irqchip", "nope"], /--irqchip: "nope" is not one of kernel, split, userspace/);
  refused(["--bios", "/fw.bin"], /--bios: a crosvm option denovm does not support: .*no firmware/);
  refused(["--split-irqchip"], /--split-irqchip: a crosvm option denovm does not support: .*in-kernel irqchip/);
  assert.deepEqual(parse("--net-vq-pairs", "1").warnings, []);
  refused(["--net-vq-pairs", "2"], /--net-vq-pairs 2: denovm's virtio-net has one queue pair/);
  refused(["--net-vq-pairs", "0"], /--net-vq-pairs: 0 is out of range/);
});

Deno.test("--help lists crosvm's flags and keys with what they do here", () => {
  const help = runHelp();
  for (const f of RUN_FLAGS) assert.match(help, new RegExp(`--${f.long}\\b`));
  assert.match(help, /--disable-sandbox\n.*no sandbox/);
  assert.match(help, /--bios PATH\n.*refused: /);
  assert.match(help, /bootindex=N\n.*accepted and ignored: /);
  assert.match(help, /--tap-name NAME {2}\(may repeat\)\n.*\(deprecated, use --net tap-name=NAME\)/);
  assert.deepEqual(Object.keys(crosvmOnlyKeys("net")).sort(), [
    "mrg_rxbuf",
    "packed-queue",
    "pci-address",
    "vhost-net",
  ]);
});

// ---- exit statuses ----

Deno.test("exit status: VM endings are 0 without --extended-status (crosvm), errors keep theirs", () => {
  assert.equal(vmEndExitCode(EXIT_VM_RESET, false), EXIT_SUCCESS);
  assert.equal(vmEndExitCode(EXIT_GUEST_PANIC, false), EXIT_SUCCESS);
  assert.equal(vmEndExitCode(33, false), EXIT_SUCCESS);
  assert.equal(vmEndExitCode(36, false), EXIT_SUCCESS);
  assert.equal(vmEndExitCode(EXIT_VM_RESET, true), EXIT_VM_RESET);
  assert.equal(vmEndExitCode(EXIT_GUEST_PANIC, true), EXIT_GUEST_PANIC);
  assert.equal(vmEndExitCode(EXIT_HOST_ERROR, false), EXIT_HOST_ERROR);
});

Deno.test("denovm: global --extended-status, --syslog-tag=T, --no-syslog are accepted; 35 either way", async () => {
  const r = await denovm(["--extended-status", "--syslog-tag=x", "--no-syslog", "run", "--bogus", "k"]);
  assert.equal(r.code, 35);
  assert.deepEqual(r.lines.length, 1);
  assert.match(r.lines[0], /unknown option --bogus/);
  const h = await denovm(["--help"]);
  assert.match(h.stdout, /--extended-status/);
});

// ---- one validation path ----

Deno.test("--print-config refuses what a boot refuses: gfxstream, an empty kernel, an input kind this version lacks", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const empty = `${dir}/empty`;
    await Deno.writeFile(empty, new Uint8Array());
    const r = await denovm(["run", "--print-config", empty]);
    assert.equal(r.code, 35, r.lines.join("\n"));
    assert.match(r.lines.at(-1)!, /kernel .*empty is an empty file/);
    const cfg = (extra: string[]) => parseRunArgs([...extra, empty]).config;
    await assert.rejects(validateVmConfig(cfg(["--gpu", "gfxstream"])), /--gpu backend=gfxstream is not available/);
    await assert.rejects(validateVmConfig(cfg(["--input", "evdev[path=/dev/input/event0]"])), /--input evdev/);
    await assert.rejects(validateVmConfig(cfg(["-p", "caf\u00e9"])), /only printable ASCII/);
    await assert.rejects(validateVmConfig(cfg([])), /empty file/);
    // The same refusals through the CLI, one line each with exit 35.
    const g = await denovm(["run", "--print-config", "--gpu", "gfxstream", empty]);
    assert.equal(g.code, 35);
    assert.equal(g.lines.length, 1);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

// ---- snapshots: --restore, --suspended, --suspended-vcpus (cmdline.rs RunCommand, parse_suspended_flags) ----

Deno.test("crosvm run: --suspended and --suspended-vcpus as crosvm's parse_suspended_flags; --restore as crosvm spells it", () => {
  // crosvm's own cases, on its test's /dev/null kernel.
  const kernel = (...args: string[]) => parseRunArgs([...args, "/dev/null"], { checkFiles: false });
  assert.equal(kernel("--suspended").suspended, "vm");
  assert.equal(kernel("--suspended-vcpus").suspended, "vcpus");
  assert.throws(() => kernel("--suspended", "--suspended-vcpus"), /not both/);
  // crosvm: "suspended mode not supported with GDB".
  assert.throws(() => kernel("--suspended", "--gdb", "1234"), /suspended mode is not supported with --gdb/);
  // crosvm builds the restored VM from the whole command line: the same line works here, checked against the
  // snapshot; denovm may also leave KERNEL out.
  assert.deepEqual(kernel("--restore", "/snaps/a", "--mem", "512").restore, { path: "/snaps/a" });
  assert.deepEqual(kernel("--restore=/snaps/a").restore, { path: "/snaps/a" });
  assert.deepEqual(parseRunArgs(["--restore", "/snaps/a"], { checkFiles: false }).restore, {
    path: "/snaps/a",
    overrides: {},
  });
  // A --cfg file may hold them, as crosvm's does.
  const dir = Deno.makeTempDirSync();
  try {
    Deno.writeTextFileSync(`${dir}/vm.json`, JSON.stringify({ restore: "/snaps/b", suspended: true, socket: "/s" }));
    const r = parseRunArgs(["--cfg", `${dir}/vm.json`], { checkFiles: false });
    assert.deepEqual(r.restore, { path: "/snaps/b", overrides: { socket: "/s" } });
    assert.equal(r.suspended, "vm");
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});
