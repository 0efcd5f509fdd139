// The control commands' command lines (vmm/cli/control.ts): crosvm's switches and options, `--help` after every
// command and subcommand (in process and through main.ts), the requests each line turns into, and the crosvm
// commands denovm refuses by name.

import assert from "node:assert/strict";
import { CONTROL_COMMAND_LIST, CONTROL_COMMAND_NAMES, controlHelp, parseControlArgs } from "./control.ts";
import { requestForArgv } from "../control/client.ts";
import { mainHelp } from "./help.ts";
import { EXIT_INVALID_ARGS, EXIT_SUCCESS } from "../../core/exit.ts";
import { denovm } from "../../test/support/cli.ts";

Deno.test("control command lines: crosvm's switches and options become the requests crosvm sends", () => {
  const s = "/run/vm.sock";
  const cases: [string[], unknown][] = [
    [["suspend", s], { kind: "suspend", full: false }],
    [["suspend", s, "--full"], { kind: "suspend", full: true }],
    [["suspend", "--full", s], { kind: "suspend", full: true }],
    [["resume", s, "--full"], { kind: "resume", full: true }],
    [["resume", s], { kind: "resume", full: false }],
    [["sleepbtn", s], { kind: "sleepbtn" }],
    [["balloon", "1G", s], { kind: "balloonAdjust", bytes: 2 ** 30, wait: false }],
    [["balloon", "4096", s, "--wait"], { kind: "balloonAdjust", bytes: 4096, wait: true }],
    [["balloon_ws", s], { kind: "balloonWs" }],
    [
      [
        "gpu",
        "add-displays",
        "--gpu-display",
        "mode=windowed[800,600]",
        "--gpu-display=windowed[64,32],dpi=[96,96]",
        s,
      ],
      {
        kind: "gpuAddDisplays",
        displays: [
          { mode: { windowed: [800, 600] }, hidden: false, "refresh-rate": 60, dpi: [320, 320] },
          { mode: { windowed: [64, 32] }, hidden: false, "refresh-rate": 60, dpi: [96, 96] },
        ],
      },
    ],
    [["gpu", "remove-displays", "--display-id", "1", "--display-id=3", s], { kind: "gpuRemoveDisplays", ids: [1, 3] }],
    [["gpu", "set-mouse-mode", "--display-id", "0", "--mouse-mode", "touchscreen", s], {
      kind: "gpuSetMouseMode",
      id: 0,
      mode: "touchscreen",
    }],
    [["snd", "mute-all", "false", s], { kind: "sndMuteAll", muted: false }],
  ];
  for (const [argv, request] of cases) {
    assert.deepEqual(requestForArgv(argv), { request, socket: s }, argv.join(" "));
  }
});

Deno.test("control command lines: wrong flags, missing options and bad values are usage errors naming the command", () => {
  const s = "/s";
  const bad: [string[], RegExp][] = [
    [["stop", "--full", s], /stop: unknown option --full/],
    [["snd", "mute-all", "yes", s], /snd: MUTED is true or false, not "yes"/],
    [["snd", "unmute", s], /snd: expected mute-all, got "unmute"/],
    [["suspend", "--fast", s], /suspend: unknown option --fast/],
    [["suspend", "--full=yes", s], /--full takes no value/],
    [["balloon", "1G", s, "-w"], /balloon: unknown option -w/],
    [["balloon", s, "--wait"], /usage: denovm balloon SIZE SOCKET \[--wait\]/],
    [["gpu", "set-mouse-mode", "--display-id", "0", s], /--mouse-mode is required/],
    [["gpu", "set-mouse-mode", "--display-id", "0", "--display-id", "1", "--mouse-mode", "touchscreen", s], /twice/],
    [["gpu", "remove-displays", "--display-id", s], /usage: denovm gpu remove-displays SOCKET/],
    [["gpu", "remove-displays", "--display-id", "x", s], /--display-id: "x" is not a valid number/],
    [["gpu", "add-displays", "--gpu-display", "mode=windowed[1]", s], /windowed takes \[WIDTH,HEIGHT\]/],
    [["gpu", "add-displays", "--gpu-display", "colour=red", s], /unknown key "colour"/],
  ];
  for (const [argv, re] of bad) assert.throws(() => requestForArgv(argv), re, argv.join(" "));
  assert.throws(
    () => requestForArgv(["gpu", "set-mouse-mode", "--display-id", "0", "--mouse-mode", "relative", s]),
    /"relative" is not touchscreen/,
  );
});

Deno.test("control command lines: --help and -h after any command or subcommand ask for its help, wherever they stand", () => {
  for (const cmd of CONTROL_COMMAND_NAMES) {
    for (const argv of [[cmd, "--help"], [cmd, "-h"], [cmd, "/some/socket", "--help"]]) {
      const p = parseControlArgs(argv);
      assert.equal(p.help, true, argv.join(" "));
      const text = controlHelp(p.cmd, p.sub);
      assert.match(text, new RegExp(`^Usage: denovm ${cmd}\\b`), argv.join(" "));
      assert.match(text, /SOCKET is the VM's control socket/);
    }
  }
  // A subcommand's help is about that subcommand only; the command's help lists them all.
  const sub = parseControlArgs(["gpu", "set-mouse-mode", "--help"]);
  assert.equal(sub.sub, "set-mouse-mode");
  const subHelp = controlHelp("gpu", "set-mouse-mode");
  assert.match(subHelp, /--display-id ID --mouse-mode MODE/);
  assert.doesNotMatch(subHelp, /add-displays/);
  const all = controlHelp("gpu");
  for (const s of ["add-displays", "list-displays", "remove-displays", "set-mouse-mode", "stats"]) {
    assert.match(all, new RegExp(`denovm gpu ${s} SOCKET`));
  }
  assert.match(controlHelp("suspend"), /--full/);
  assert.match(controlHelp("balloon"), /Usage: denovm balloon SIZE SOCKET \[--wait\]/);
});

Deno.test("control command lines: the main help lists every control command line, snapshot take among them", () => {
  const help = mainHelp();
  for (const c of CONTROL_COMMAND_LIST) assert.ok(help.includes(c.usage), `${c.usage} in main help`);
  for (
    const u of [
      "suspend SOCKET [--full]",
      "balloon SIZE SOCKET [--wait]",
      "sleepbtn SOCKET",
      "balloon_ws SOCKET",
      "snapshot take PATH SOCKET [--compress-memory] [--encrypt]",
    ]
  ) {
    assert.ok(help.includes(u), `${u} in main help`);
  }
  assert.match(controlHelp("snapshot"), /^Usage: denovm snapshot take PATH SOCKET \[--compress-memory\] \[--encrypt\]/);
  assert.match(controlHelp("snapshot"), /--encrypt +.*refused/);
});

Deno.test("control command lines: crosvm commands denovm lacks are refused by name, not as unknown", () => {
  assert.throws(
    () => parseControlArgs(["swap", "enable", "/s"]),
    /^UsageError: swap: a crosvm command that denovm does not support: vmm-swap is not supported$/,
  );
  assert.throws(() => parseControlArgs(["usb", "list", "/s"]), /usb: a crosvm command that denovm does not support/);
});

Deno.test("control command lines: snapshot take as crosvm's SnapshotTakeCommand (positional PATH and SOCKET, two switches)", () => {
  const s = "/run/vm.sock";
  assert.deepEqual(requestForArgv(["snapshot", "take", "/snaps/a", s]), {
    request: { kind: "snapshot", path: "/snaps/a", compressMemory: false, encrypt: false },
    socket: s,
  });
  for (
    const argv of [["snapshot", "take", "/snaps/a", s, "--compress-memory"], [
      "snapshot",
      "take",
      "--compress-memory",
      "/snaps/a",
      s,
    ]]
  ) {
    assert.deepEqual(requestForArgv(argv).request, {
      kind: "snapshot",
      path: "/snaps/a",
      compressMemory: true,
      encrypt: false,
    }, argv.join(" "));
  }
  // A relative PATH is sent absolute: the VM may run in another directory.
  assert.equal(
    (requestForArgv(["snapshot", "take", "snaps/b", s]).request as { path: string }).path,
    `${Deno.cwd()}/snaps/b`,
  );
  const usage = /usage: denovm snapshot take PATH SOCKET \[--compress-memory\] \[--encrypt\]/;
  const bad: [string[], RegExp][] = [
    [["snapshot"], usage],
    [["snapshot", "take"], usage],
    [["snapshot", "take", "/snaps/a"], usage],
    [["snapshot", "take", "/snaps/a", s, "extra"], usage],
    [["snapshot", "give", "/snaps/a", s], /snapshot: expected take, got "give"/],
    [["snapshot", "take", "", s], /snapshot: empty PATH/],
    [["snapshot", "take", "/snaps/a", s, "--compress-memory=yes"], /--compress-memory takes no value/],
    [["snapshot", "take", "/snaps/a", s, "--zstd"], /snapshot take: unknown option --zstd/],
    [
      ["snapshot", "take", "/snaps/a", s, "--encrypt"],
      /^snapshot take: --encrypt: a crosvm option denovm does not support: denovm writes snapshots unencrypted$/,
    ],
  ];
  for (const [argv, re] of bad) {
    assert.throws(() => requestForArgv(argv), (e: unknown) => {
      assert.ok(e instanceof Error && e.name === "UsageError", `${argv.join(" ")}: ${e}`);
      assert.match(e.message, re, argv.join(" "));
      return true;
    });
  }
});

Deno.test("denovm process: `CMD --help` prints that command's usage and exits 0 without touching a socket", async () => {
  const dir = await Deno.makeTempDir();
  try {
    for (
      const argv of [["stop", "--help"], ["suspend", "-h"], ["gpu", "add-displays", "--help"], ["balloon", "--help"]]
    ) {
      const r = await denovm(...argv);
      assert.equal(r.code, EXIT_SUCCESS, `${argv.join(" ")}: ${r.stderr}`);
      assert.equal(r.stderr, "");
      assert.match(r.stdout, new RegExp(`^Usage: denovm ${argv[0]} `));
    }
    // The old behaviour was a connection attempt to a socket named "--help".
    const r = await denovm("stop", "--help");
    assert.doesNotMatch(r.stdout + r.stderr, /cannot reach/);
    const snapHelp = await denovm("snapshot", "take", "--help");
    assert.equal(snapHelp.code, EXIT_SUCCESS, snapHelp.stderr);
    assert.match(snapHelp.stdout, /^Usage: denovm snapshot take PATH SOCKET/);
    // A missing argument or crosvm's --encrypt: one line, exit 35, nothing sent.
    for (
      const [argv, re] of [
        [["snapshot"], /^denovm: snapshot: expected take, got nothing \(usage: denovm snapshot take PATH SOCKET/],
        [["snapshot", "take", `${dir}/snap`], /^denovm: usage: denovm snapshot take PATH SOCKET/],
        [["snapshot", "take", `${dir}/snap`, `${dir}/vm.sock`, "--encrypt"], /^denovm: snapshot take: --encrypt: /],
      ] as [string[], RegExp][]
    ) {
      const snap = await denovm(...argv);
      assert.equal(snap.code, EXIT_INVALID_ARGS, argv.join(" "));
      assert.equal(snap.stdout, "");
      assert.match(snap.stderr, re);
      assert.equal(snap.stderr.trim().split("\n").length, 1, snap.stderr);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
