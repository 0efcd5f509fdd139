// Tests of denovm's crosvm-compatible command line: the key=value syntax, each `run` option form, the
// kernel command line built from a config, and the real `denovm` process's output and exit codes.

import assert from "node:assert/strict";
import { defaultVmConfig, diskName, kernelCommandLine, type VmConfig } from "../config.ts";
import { checkControlArgs } from "./control.ts";
import { EXIT_INVALID_ARGS } from "../../core/exit.ts";
import { mainHelp, RUN_FLAGS, runHelp } from "./help.ts";
import { parseKeyValues, parseSize, UsageError } from "./keyvalue.ts";
import { parseRunArgs } from "./run.ts";
import { MAX_VCPUS } from "../arch/cpu.ts";
import { debianKernel } from "../../test/support/kernel.ts";
import { assertOneLineRefusal, type CliResult, denovm, stderrLines } from "../../test/support/cli.ts";

/** Parses `run` args with kernel "bzImage" appended, without touching the filesystem. */
function run(...args: string[]): VmConfig {
  return parseRunArgs([...args, "bzImage"], { checkFiles: false }).config;
}

function usageError(args: string[], pattern: RegExp): void {
  assert.throws(() => parseRunArgs(args, { checkFiles: false }), (e: unknown) => {
    assert.ok(e instanceof UsageError, `expected UsageError, got ${e}`);
    assert.match(e.message, pattern);
    assert.ok(!e.message.includes("\n"), "message is one line");
    return true;
  });
}

// ---- key=value syntax ----

Deno.test("keyvalue: keys, bare items, quotes, lists and variants", () => {
  assert.deepEqual(parseKeyValues('a.img,ro,id="x,y",n=[1,2],m=windowed[3,4]', "--t"), [
    { value: { kind: "scalar", text: "a.img", quoted: false } },
    { value: { kind: "scalar", text: "ro", quoted: false } },
    { key: "id", value: { kind: "scalar", text: "x,y", quoted: true } },
    {
      key: "n",
      value: {
        kind: "list",
        items: [
          { value: { kind: "scalar", text: "1", quoted: false } },
          { value: { kind: "scalar", text: "2", quoted: false } },
        ],
      },
    },
    {
      key: "m",
      value: {
        kind: "variant",
        name: "windowed",
        items: [
          { value: { kind: "scalar", text: "3", quoted: false } },
          { value: { kind: "scalar", text: "4", quoted: false } },
        ],
      },
    },
  ]);
  assert.throws(() => parseKeyValues("a=[1,2", "--t"), /--t: missing "\]"/);
  assert.throws(() => parseKeyValues("a=", "--t"), /--t: missing value/);
  assert.throws(() => parseKeyValues("a,,b", "--t"), /--t: empty item/);
  assert.throws(() => parseKeyValues('"abc', "--t"), /unterminated/);
});

Deno.test("keyvalue: sizes", () => {
  assert.equal(parseSize("4096", "x"), 4096);
  assert.equal(parseSize("0x1000", "x"), 4096);
  assert.equal(parseSize("8G", "x"), 8 * 2 ** 30);
  assert.equal(parseSize("512MiB", "x"), 512 * 2 ** 20);
  assert.throws(() => parseSize("12q", "x"), /not a valid number/);
});

// ---- run options ----

Deno.test("run: defaults match crosvm", () => {
  const c = run();
  assert.deepEqual(c, defaultVmConfig("bzImage"));
  assert.equal(c.memMiB, 256);
  assert.equal(c.cpus, 1);
  assert.deepEqual(c.serials, [
    { type: "stdout", hardware: "serial", num: 1, console: true, earlycon: false, stdin: true },
  ]);
  assert.equal(c.rng, true);
  assert.equal(c.balloon, true);
});

Deno.test("run: --mem and --cpus forms", () => {
  assert.equal(run("--mem", "4096").memMiB, 4096);
  assert.equal(run("--mem", "size=4096").memMiB, 4096);
  assert.equal(run("-m", "1024").memMiB, 1024);
  assert.equal(run("-m1024").memMiB, 1024);
  assert.equal(run("--mem=2048").memMiB, 2048);
  assert.equal(run("--cpus", "4").cpus, 4);
  assert.equal(run("-c", "num-cores=2").cpus, 2);
  // The MP table and the MADT describe at most 254 CPUs (APIC IDs are 8-bit, 0xff broadcasts, the I/O APIC
  // takes the next ID): the same limit for the parser, the builder and --help.
  assert.equal(MAX_VCPUS, 254);
  assert.equal(run("--cpus", "254").cpus, 254);
  usageError(["--mem", "0", "k"], /--mem size: 0 is out of range/);
  usageError(["--mem", String(2 ** 27 + 1), "k"], /--mem size: 134217729 is out of range/);
  usageError(["--mem", "lots", "k"], /--mem size: "lots" is not a valid number/);
  usageError(["--mem", "bytes=12", "k"], /--mem: unknown key "bytes"/);
  usageError(["--cpus", "0", "k"], /--cpus num-cores: 0 is out of range/);
  usageError(["--cpus", "255", "k"], /--cpus num-cores: 255 is out of range \(1\.\.254\)/);
  usageError(["--cpus", "256", "k"], /--cpus num-cores: 256 is out of range/);
  usageError(["--mem", "1", "--mem", "2", "k"], /--mem given more than once/);
});

Deno.test("run: --params repeat and join", () => {
  const c = run("-p", "init=/bin/sh", "--params", "quiet loglevel=3");
  assert.deepEqual(c.params, ["init=/bin/sh", "quiet loglevel=3"]);
});

Deno.test("run: --block forms and the deprecated disk flags", () => {
  assert.deepEqual(run("--block", "disk.img,ro").blocks, [
    { path: "disk.img", ro: true, root: false, sparse: true, blockSize: 512, direct: false },
  ]);
  assert.deepEqual(run("--block", "path=a.img,root,sparse=false").blocks, [
    { path: "a.img", ro: false, root: true, sparse: false, blockSize: 512, direct: false },
  ]);
  assert.deepEqual(run("-b", "b.img,block-size=4096,id=serial1,direct=true,ro=false").blocks, [
    { path: "b.img", ro: false, root: false, sparse: true, blockSize: 4096, direct: true, id: "serial1" },
  ]);
  // --disk/--rwdisk/--root/--rwroot force ro and root as crosvm does; order is command-line order.
  const c = run("--rwroot", "r.img", "--disk", "d.img,ro=false", "--rwdisk", "w.img", "--block", "b.img");
  assert.deepEqual(c.blocks.map((b) => [b.path, b.ro, b.root]), [
    ["r.img", false, true],
    ["d.img", true, false],
    ["w.img", false, false],
    ["b.img", false, false],
  ]);
  assert.deepEqual(run("--root", "r.img").blocks.map((b) => [b.ro, b.root]), [[true, true]]);
  usageError(["--block", "a.img,wat", "k"], /--block: unknown key "wat"/);
  usageError(["--block", "a.img,ro,ro=false", "k"], /--block: key "ro" given twice/);
  usageError(["--block", "a.img,ro=maybe", "k"], /--block ro: expected true or false/);
  usageError(["--block", "a.img,block-size=1000", "k"], /not a multiple of 512/);
  usageError(["--block", "a.img,id=abcdefghijklmnopqrstu", "k"], /at most 20 ASCII/);
  usageError(["--block", "ro=true", "k"], /--block: path is required/);
  usageError(["--block", "a.img,root", "--block", "b.img,root", "k"], /only one root disk/);
});

Deno.test("run: --serial forms and checks", () => {
  assert.deepEqual(run("--serial", "type=file,path=/tmp/x,num=2,console").serials, [
    { type: "file", hardware: "serial", num: 2, path: "/tmp/x", console: true, earlycon: false, stdin: false },
  ]);
  // No console among the given ports and COM1 free: COM1 becomes the default stdout console (crosvm).
  const c = run("--serial", "type=sink,num=2");
  assert.deepEqual(c.serials.map((s) => [s.type, s.num, s.console, s.stdin]), [
    ["stdout", 1, true, true],
    ["sink", 2, false, false],
  ]);
  const v = run("--serial", "stdout,hardware=virtio-console,console,stdin", "--serial", "syslog,earlycon");
  assert.deepEqual(v.serials.map((s) => [s.type, s.hardware, s.num, s.console, s.earlycon, s.stdin]), [
    ["stdout", "virtio-console", 1, true, false, true],
    ["syslog", "serial", 1, false, true, false],
  ]);
  usageError(["--serial", "type=stdout,num=5", "k"], /--serial num: 5 is out of range/);
  usageError(["--serial", "type=stdout,num=0", "k"], /--serial num: 0 is out of range/);
  usageError(["--serial", "type=tty", "k"], /--serial type: "tty" is not one of/);
  usageError(["--serial", "type=stdout", "--serial", "type=sink", "k"], /hardware=serial num=1 given twice/);
  // Several consoles are crosvm's too: each gets its console= (crosvm_compat_test.ts checks the line).
  assert.deepEqual(
    run("--serial", "stdout,console", "--serial", "sink,num=2,console").serials.map((s) => [s.num, s.console]),
    [[1, true], [2, true]],
  );
  usageError(["--serial", "type=file", "k"], /type=file needs path=/);
  usageError(["--serial", "stdout,stdin,input=/tmp/in", "k"], /stdin and input/);
  usageError(["--serial", "stdout,hardware=virtio-console,earlycon", "k"], /earlycon is not supported/);
  usageError(["--serial", "stdout,colour=red", "k"], /--serial: unknown key "colour"/);
});

Deno.test("run: --net forms and checks", () => {
  assert.deepEqual(run("--net", "tap-name=tap0,mac=AA:bb:cc:dd:ee:01,vq-pairs=2").nets, [
    { tapName: "tap0", mac: "aa:bb:cc:dd:ee:01", vqPairs: 2 },
  ]);
  assert.deepEqual(run("--net", "tap-fd=3").nets, [{ tapFd: 3 }]);
  assert.deepEqual(run("--net", "host-ip=192.168.10.1,netmask=255.255.255.0,mac=02:00:00:00:00:01").nets, [
    { hostIp: "192.168.10.1", netmask: "255.255.255.0", mac: "02:00:00:00:00:01" },
  ]);
  usageError(["--net", "tap-name=t,tap-fd=3", "k"], /exactly one of/);
  usageError(["--net", "host-ip=10.0.0.1", "k"], /must be given together/);
  usageError(["--net", "host-ip=10.0.0.300,netmask=255.0.0.0,mac=02:00:00:00:00:01", "k"], /not an IPv4/);
  usageError(["--net", "tap-name=t,mac=zz", "k"], /not a MAC address/);
  usageError(["--net", "vq-pairs=2", "k"], /exactly one of/);
});

Deno.test("run: --gpu forms", () => {
  const g = run("--gpu", "backend=virglrenderer,context-types=virgl:virgl2:venus,displays=[[mode=windowed[1280,720]]]")
    .gpu;
  assert.deepEqual(g, {
    backend: "virglrenderer",
    contextTypes: ["virgl", "virgl2", "venus"],
    displays: [{ mode: "windowed", width: 1280, height: 720 }],
    hostVisibleWindowSize: 8 * 2 ** 30,
    fixedBlobMapping: false,
    egl: true,
    gles: true,
    glx: false,
    surfaceless: true,
    vulkan: false,
    udmabuf: false,
  });
  const two = run(
    "--gpu",
    "3d,displays=[[mode=windowed[800,600],port=5900],[windowed[640,480],hidden]],vulkan,egl=false",
  )
    .gpu!;
  assert.equal(two.backend, "virglrenderer");
  assert.deepEqual(two.displays, [
    { mode: "windowed", width: 800, height: 600, port: 5900 },
    { mode: "windowed", width: 640, height: 480, hidden: true },
  ]);
  assert.equal(two.vulkan, true);
  assert.equal(two.egl, false);
  // Defaults: backend 2d and one 1280x1024 display (crosvm gpu_config.rs); width/height make a display.
  assert.deepEqual(run("--gpu", "2d").gpu!.displays, [{ mode: "windowed", width: 1280, height: 1024 }]);
  const old = run("--gpu", "width=1024,height=768,pci-bar-size=256M,udmabuf").gpu!;
  assert.deepEqual(old.displays, [{ mode: "windowed", width: 1024, height: 768 }]);
  assert.equal(old.width, 1024);
  assert.equal(old.hostVisibleWindowSize, 256 * 2 ** 20);
  assert.equal(old.udmabuf, true);
  usageError(["--gpu", "backend=metal", "k"], /--gpu backend: "metal" is not one of/);
  usageError(["--gpu", "context-types=virgl:dx12", "k"], /unknown context type "dx12"/);
  usageError(["--gpu", "width=100", "k"], /width and height must be given together/);
  usageError(["--gpu", "pci-bar-size=3000", "k"], /not a power of two/);
  usageError(["--gpu", "displays=[[mode=fullscreen]]", "k"], /--gpu displays mode/);
  usageError(["--gpu", "displays=[[mode=windowed[1,2,3]]]", "k"], /windowed takes \[WIDTH,HEIGHT\]/);
  usageError(["--gpu", "sparkle", "k"], /--gpu backend: "sparkle" is not one of/);
});

Deno.test("run: --input forms (crosvm TYPE[key=value,...])", () => {
  const c = run(
    "--input",
    "multi-touch[path=/tmp/t,width=800,height=600,name=screen]",
    "--input",
    "keyboard",
    "--input",
    "mouse[path=/tmp/m]",
    "--input",
    "single-touch[/tmp/s]",
  );
  assert.deepEqual(c.inputs, [
    { kind: "multi-touch", path: "/tmp/t", width: 800, height: 600, name: "screen" },
    { kind: "keyboard" },
    { kind: "mouse", path: "/tmp/m" },
    { kind: "single-touch", path: "/tmp/s" },
  ]);
  usageError(["--input", "joystick", "k"], /unknown input type "joystick"/);
  usageError(["--input", "keyboard[width=3]", "k"], /--input keyboard: unknown key "width"/);
  usageError(["--input", "keyboard,mouse", "k"], /expected TYPE or TYPE\[key=value/);
});

Deno.test("run: --vsock, switches, --socket, --initrd, --kernel", () => {
  const c = run("--vsock", "3", "--no-rng", "--no-balloon", "--virtio-mmio-cmdline", "-s", "/tmp/vm.sock", "-i", "rd");
  assert.deepEqual(c.vsock, { cid: 3 });
  assert.equal(c.rng, false);
  assert.equal(c.balloon, false);
  assert.equal(c.virtioMmioCmdline, true);
  assert.equal(c.socket, "/tmp/vm.sock");
  assert.equal(c.initrd, "rd");
  assert.deepEqual(run("--vsock", "cid=42").vsock, { cid: 42 });
  assert.equal(parseRunArgs(["--kernel", "vmlinux"], { checkFiles: false }).config.kernel, "vmlinux");
  usageError(["--vsock", "2", "k"], /--vsock cid: 2 is out of range/);
  usageError(["--no-rng=true", "k"], /--no-rng takes no value/);
  usageError(["--frobnicate", "k"], /unknown option --frobnicate/);
  usageError(["-Z", "k"], /unknown option -Z/);
  usageError([], /missing KERNEL/);
  usageError(["a", "b"], /expected one KERNEL argument, got 2/);
  usageError(["--mem"], /--mem needs a value/);
  assert.equal(parseRunArgs(["--help"], { checkFiles: false }).help, true);
});

Deno.test("run: --cfg JSON file, command line after it", () => {
  const dir = Deno.makeTempDirSync();
  try {
    const path = `${dir}/vm.json`;
    Deno.writeTextFileSync(
      path,
      JSON.stringify({
        kernel: "vmlinux",
        mem: 512,
        cpus: "num-cores=2",
        block: ["a.img,ro", { path: "b,1.img", root: true }],
        "no-rng": true,
        no_balloon: false,
        params: ["quiet"],
      }),
    );
    const c = parseRunArgs(["--cfg", path, "--mem", "1024", "-p", "debug"], { checkFiles: false }).config;
    assert.equal(c.kernel, "vmlinux");
    assert.equal(c.memMiB, 1024);
    assert.equal(c.cpus, 2);
    assert.deepEqual(c.blocks.map((b) => [b.path, b.ro, b.root]), [["a.img", true, false], ["b,1.img", false, true]]);
    assert.equal(c.rng, false);
    assert.equal(c.balloon, true);
    assert.deepEqual(c.params, ["quiet", "debug"]);

    Deno.writeTextFileSync(path, JSON.stringify({ memory: 5 }));
    usageError(["--cfg", path, "k"], /--cfg .*vm\.json: unknown option "memory"/);
    Deno.writeTextFileSync(path, JSON.stringify({ mem: [1, 2] }));
    usageError(["--cfg", path, "k"], /takes one value, not an array/);
    Deno.writeTextFileSync(path, "{ not json");
    usageError(["--cfg", path, "k"], /not valid JSON/);
    usageError(["--cfg", `${dir}/missing.json`, "k"], /cannot read/);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("run: --restore PATH and --suspended, as crosvm spells them", () => {
  const parse = (...args: string[]) => parseRunArgs(args, { checkFiles: false });
  // KERNEL may be left out: the snapshot's configuration is used, with nothing to override.
  let r = parse("--restore=/snaps/a");
  assert.deepEqual(r.restore, { path: "/snaps/a", overrides: {} });
  assert.equal(r.suspended, undefined);
  assert.equal(r.printConfig, false);
  r = parse("--restore", "/snaps/a", "--suspended");
  assert.deepEqual(r.restore, { path: "/snaps/a", overrides: {} });
  assert.equal(r.suspended, "vm");
  assert.equal(parse("--suspended-vcpus", "--restore", "/snaps/a").suspended, "vcpus");

  // Host-side options become the overrides, exactly as given (no default serial is added).
  r = parse(
    "--restore",
    "/snaps/a",
    "-s",
    "/run/vm.sock",
    "--serial",
    "type=file,path=/tmp/out",
    "--block",
    "/img/b.img,ro",
    "--vsock",
    "cid=5,uds-path=/run/v.sock",
    "--net",
    "tap-name=tap1",
    "--gdb",
    "1234",
  );
  assert.deepEqual(r.restore?.overrides, {
    socket: "/run/vm.sock",
    serials: run("--serial", "type=file,path=/tmp/out").serials,
    blocks: run("--block", "/img/b.img,ro").blocks,
    vsock: { cid: 5, udsPath: "/run/v.sock" },
    nets: [{ tapName: "tap1" }],
    gdb: 1234,
  });
  // crosvm's flags that change nothing are accepted there too.
  assert.deepEqual(parse("--restore", "/s", "--disable-sandbox", "--name", "vm1").restore?.overrides, {});

  // With KERNEL, the whole command line is the configuration the snapshot's is checked against.
  r = parse("--restore", "/snaps/a", "--mem", "512", "-s", "/run/vm.sock", "bzImage");
  assert.deepEqual(r.restore, { path: "/snaps/a" });
  assert.equal(r.config.kernel, "bzImage");
  assert.equal(r.config.memMiB, 512);
  assert.deepEqual(r.config.serials, defaultVmConfig("x").serials);

  // crosvm: --suspended without --restore boots with the vCPUs and devices suspended.
  r = parse("--suspended", "bzImage");
  assert.equal(r.suspended, "vm");
  assert.equal(r.restore, undefined);

  usageError(["--restore"], /option --restore needs a value \(PATH\)/);
  usageError(["--restore="], /--restore: empty PATH/);
  usageError(["--restore", "/s", "--restore", "/t"], /option --restore given more than once/);
  usageError(["--restore", "/s", "--mem", "512"], /^--mem with --restore and no KERNEL: .*KERNEL included/);
  usageError(["--restore", "/s", "-p", "quiet"], /^--params with --restore and no KERNEL/);
  usageError(["--restore", "/s", "--gpu", "2d"], /^--gpu with --restore and no KERNEL/);
  usageError(["--restore", "/s", "--print-config"], /--print-config cannot be used with --restore/);
  usageError(["--restore", "/s", "--print-config", "bzImage"], /--print-config cannot be used with --restore/);
  usageError(["--suspended"], /missing KERNEL/);
  usageError(["--suspended", "--suspended-vcpus", "k"], /give --suspended or --suspended-vcpus, not both/);
  usageError(["--suspended", "--gdb", "1234", "k"], /--suspended: suspended mode is not supported with --gdb/);
  usageError(["--restore", "/s", "--suspended-vcpus", "--gdb", "1"], /--suspended-vcpus: .* with --gdb/);
  usageError(["--restore", "/s", "--serial", "type=file"], /path/);
});

Deno.test("run --restore: the kernel and initrd are not read (a restore does not load them); disks are", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const r = parseRunArgs(["--restore", "/snaps/a", "--initrd", `${dir}/gone.img`, `${dir}/gone-kernel`]);
    assert.deepEqual(r.restore, { path: "/snaps/a" });
    assert.throws(
      () => parseRunArgs(["--restore", "/snaps/a", "--block", `${dir}/missing.img`]),
      /block ".*missing\.img": no such file/,
    );
    assert.throws(
      () => parseRunArgs(["--restore", "/snaps/a", "--block", `${dir}/missing.img`, `${dir}/k`]),
      /block ".*missing\.img": no such file/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("run: kernel, initrd and block files are checked", () => {
  const dir = Deno.makeTempDirSync();
  try {
    const kernel = `${dir}/bzImage`;
    Deno.writeTextFileSync(kernel, "kernel");
    assert.equal(parseRunArgs([kernel]).config.kernel, kernel);
    assert.throws(() => parseRunArgs([`${dir}/nope`]), /kernel ".*nope": no such file/);
    assert.throws(() => parseRunArgs([dir]), /kernel ".*": is a directory/);
    assert.throws(() => parseRunArgs(["-i", `${dir}/rd`, kernel]), /initrd ".*rd": no such file/);
    assert.throws(() => parseRunArgs(["--block", `${dir}/d.img`, kernel]), /block ".*d\.img": no such file/);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

// ---- kernel command line ----

Deno.test("kernelCommandLine: crosvm's base, console, earlycon, user params, root", () => {
  assert.equal(kernelCommandLine(run()), "panic=-1 console=ttyS0");
  const c = run(
    "--serial",
    "type=stdout,num=2,console,earlycon",
    "--block",
    "a.img",
    "--block",
    "b.img,root,ro",
    "-p",
    "init=/init",
    "-p",
    "quiet",
  );
  assert.equal(
    kernelCommandLine(c),
    "panic=-1 console=ttyS1 earlycon=uart8250,io,0x2f8 init=/init quiet root=/dev/vdb ro",
  );
  const v = run("--serial", "stdout,hardware=virtio-console,console", "--rwroot", "r.img");
  assert.equal(
    kernelCommandLine(v, ["virtio_mmio.device=4K@0xd0000000:5"]),
    "panic=-1 console=hvc0 root=/dev/vda rw virtio_mmio.device=4K@0xd0000000:5",
  );
  assert.equal(
    kernelCommandLine(run("--serial", "stdout,earlycon,console")),
    "panic=-1 console=ttyS0 earlycon=uart8250,io,0x3f8",
  );
});

Deno.test("diskName: vda..vdz, vdaa ...", () => {
  assert.equal(diskName(0), "/dev/vda");
  assert.equal(diskName(25), "/dev/vdz");
  assert.equal(diskName(26), "/dev/vdaa");
  assert.equal(diskName(27), "/dev/vdab");
  assert.equal(diskName(701), "/dev/vdzz");
  assert.equal(diskName(702), "/dev/vdaaa");
});

// ---- control commands and help ----

Deno.test("control commands: argument shapes", () => {
  checkControlArgs(["stop", "/tmp/s"]);
  checkControlArgs(["balloon", "1G", "/tmp/s"]);
  checkControlArgs(["disk", "resize", "0", "4096", "/tmp/s"]);
  checkControlArgs(["gpu", "list-displays", "/tmp/s"]);
  checkControlArgs(["gpu", "stats", "/tmp/s"]);
  checkControlArgs(["screenshot", "/tmp/a.png", "/tmp/s"]);
  assert.throws(() => checkControlArgs(["stop"]), /usage: denovm stop SOCKET/);
  assert.throws(() => checkControlArgs(["balloon", "big", "/tmp/s"]), /balloon SIZE: "big" is not a valid number/);
  assert.throws(() => checkControlArgs(["disk", "grow", "0", "1", "/s"]), /disk: expected resize/);
  assert.throws(
    () => checkControlArgs(["gpu", "remove", "/s"]),
    /gpu: expected add-displays, list-displays, remove-displays, set-mouse-mode, stats/,
  );
});

Deno.test("help lists every run flag and each key", () => {
  const help = runHelp();
  for (const f of RUN_FLAGS) {
    assert.ok(help.includes(`--${f.long}`), `--${f.long} in run help`);
    for (const k of f.keys ?? []) assert.ok(help.includes(k.form), `${k.form} in run help`);
  }
  for (const cmd of ["run", "device", "version", "stop SOCKET", "balloon SIZE SOCKET", "gpu list-displays SOCKET"]) {
    assert.ok(mainHelp().includes(cmd), `${cmd} in main help`);
  }
});

// ---- the real process ----

function assertOneErrorLine(r: CliResult, pattern: RegExp): void {
  assertOneLineRefusal(r, EXIT_INVALID_ARGS, pattern, String(pattern));
  assert.match(stderrLines(r)[0], /^denovm: /);
}

Deno.test("denovm process: bad input exits 35 with one stderr line", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const kernel = `${dir}/bzImage`;
    await Deno.writeTextFile(kernel, "not really a kernel");
    assertOneErrorLine(await denovm("run", "--frobnicate", kernel), /unknown option --frobnicate/);
    assertOneErrorLine(await denovm("run", "--block", "a.img,colour=blue", kernel), /--block: unknown key "colour"/);
    assertOneErrorLine(await denovm("run", `${dir}/missing`), /kernel ".*missing": no such file/);
    assertOneErrorLine(await denovm("run", "--mem", "lots", kernel), /--mem size: "lots" is not a valid number/);
    assertOneErrorLine(await denovm("run", "--mem", "0", kernel), /--mem size: 0 is out of range/);
    assertOneErrorLine(await denovm("run", "--cpus", "0", kernel), /--cpus num-cores: 0 is out of range/);
    assertOneErrorLine(await denovm("run"), /missing KERNEL/);
    assertOneErrorLine(await denovm("teleport"), /unknown command "teleport"/);
    assertOneErrorLine(await denovm("--log-level", "loud", "version"), /--log-level/);
    assertOneErrorLine(await denovm("balloon", "/tmp/s"), /usage: denovm balloon SIZE SOCKET/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("denovm process: run --restore: a bad command line exits 35, a snapshot that cannot be restored 1, one line each", async () => {
  const dir = await Deno.makeTempDir();
  try {
    assertOneErrorLine(await denovm("run", "--restore"), /option --restore needs a value/);
    assertOneErrorLine(await denovm("run", "--restore", `${dir}/snap`, "--print-config"), /--print-config cannot/);
    assertOneErrorLine(await denovm("run", "--restore", `${dir}/snap`, "-m", "512"), /-mem with --restore and no/);
    // The restore itself fails (no such snapshot): a host error, as crosvm's is.
    const r = await denovm("run", "--restore", `${dir}/no-such-snapshot`, "--suspended");
    assert.equal(r.code, 1, r.stderr);
    const lines = r.stderr.split("\n").filter((l) => l !== "");
    assert.equal(lines.length, 1, `exactly one stderr line, got: ${JSON.stringify(r.stderr)}`);
    assert.match(lines[0], /^denovm: /);
    assert.equal(r.stdout, "");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("denovm process: --print-config prints the resolved config", async () => {
  const dir = await Deno.makeTempDir();
  try {
    // --print-config checks the kernel as a boot does (vmm/validate.ts), so it needs a real one.
    const kernel = (await debianKernel()).vmlinuz;
    const r = await denovm(
      "--log-level",
      "debug",
      "run",
      "--print-config",
      "-m",
      "512",
      "--gpu",
      "virglrenderer,displays=[[mode=windowed[640,480]]]",
      kernel,
    );
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stderr, "");
    const cfg = JSON.parse(r.stdout) as VmConfig;
    assert.equal(cfg.kernel, kernel);
    assert.equal(cfg.memMiB, 512);
    assert.equal(cfg.logLevel, "debug");
    assert.equal(cfg.gpu?.backend, "virglrenderer");
    assert.deepEqual(cfg.gpu?.displays, [{ mode: "windowed", width: 640, height: 480 }]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("denovm process: help and version exit 0", async () => {
  const h = await denovm("--help");
  assert.equal(h.code, 0);
  assert.match(h.stdout, /Usage: denovm/);
  const rh = await denovm("run", "--help");
  assert.equal(rh.code, 0);
  assert.match(rh.stdout, /--gpu \[backend=\]BACKEND/);
  assert.match(rh.stdout, /denovm run --restore PATH \[--suspended\] \[OPTIONS\] \[KERNEL\]/);
  assert.match(rh.stdout, /--suspended\n.*\n.*denovm resume --full SOCKET lets the VM run/);
  const v = await denovm("version");
  assert.equal(v.code, 0);
  assert.match(v.stdout, /^denovm \d+\.\d+\.\d+/);
});
