// The control commands' command lines (`denovm stop SOCKET`, `denovm balloon SIZE SOCKET --wait`, ...), checked
// before anything connects, so a malformed command exits with the invalid-arguments code. The commands, their
// positional arguments and their switches follow crosvm (google/crosvm src/crosvm/cmdline.rs: StopCommand,
// SuspendCommand, BalloonCommand, GpuCommand, ...): the VM socket is always the last positional argument,
// switches and options may stand anywhere, `--name=value` is `--name value`, and `-h`/`--help` after a command
// prints that command's usage.

import { parseSize, parseUint, UsageError } from "./keyvalue.ts";

/** A switch (no arg) or an option (arg) of one control command. */
export interface ControlFlag {
  name: string;
  arg?: string;
  repeatable?: boolean;
  required?: boolean;
  /** A crosvm flag denovm knows but does not act on: giving it is refused with this reason, naming it. */
  refused?: string;
  help: string;
}

/** One control command line: its words (the first may be a subcommand word), its flags and what it does. */
export interface ControlShape {
  /** Lower-case words are literal subcommand words; upper-case ones are arguments. SOCKET comes last. */
  words: readonly string[];
  flags?: readonly ControlFlag[];
  help: string;
}

const SOCKET_HELP = "SOCKET is the VM's control socket (run -s)";

/** Command word → its forms. */
const COMMANDS: Record<string, readonly ControlShape[]> = {
  stop: [{ words: ["SOCKET"], help: "stop the VM" }],
  suspend: [{
    words: ["SOCKET"],
    flags: [{ name: "full", help: "also suspend the devices: they finish what they hold and take no new requests" }],
    help: "pause the vCPUs",
  }],
  resume: [{
    words: ["SOCKET"],
    flags: [{ name: "full", help: "resume the devices as well (after suspend --full)" }],
    help: "resume the vCPUs",
  }],
  powerbtn: [{ words: ["SOCKET"], help: "press the ACPI power button" }],
  sleepbtn: [{ words: ["SOCKET"], help: "press the ACPI sleep button" }],
  balloon: [{
    words: ["SIZE", "SOCKET"],
    flags: [{ name: "wait", help: "answer only once the guest's balloon holds SIZE" }],
    help: "set the balloon size to SIZE bytes",
  }],
  balloon_stats: [{ words: ["SOCKET"], help: "print balloon statistics" }],
  balloon_ws: [{
    words: ["SOCKET"],
    help: "print the balloon's working-set report (denovm's balloon has no working-set reporting: an error)",
  }],
  disk: [{ words: ["resize", "INDEX", "SIZE", "SOCKET"], help: "resize block device INDEX to SIZE bytes" }],
  gpu: [
    {
      words: ["add-displays", "SOCKET"],
      flags: [{
        name: "gpu-display",
        arg: "DISPLAY",
        repeatable: true,
        help: "a display as in run --gpu displays=[DISPLAY]: mode=windowed[W,H],hidden,refresh-rate=N,dpi=[X,Y]",
      }],
      help: "attach displays to the GPU (denovm's displays are fixed at start: an error)",
    },
    { words: ["list-displays", "SOCKET"], help: "list the GPU displays" },
    {
      words: ["remove-displays", "SOCKET"],
      flags: [{ name: "display-id", arg: "ID", repeatable: true, help: "a display to detach" }],
      help: "detach displays from the GPU (denovm's displays are fixed at start: an error)",
    },
    {
      words: ["set-mouse-mode", "SOCKET"],
      flags: [
        { name: "display-id", arg: "ID", required: true, help: "the display" },
        { name: "mouse-mode", arg: "MODE", required: true, help: "touchscreen (crosvm's only mode on Linux)" },
      ],
      help: "set a display's mouse mode (denovm opens no display window: accepted, changes nothing)",
    },
    { words: ["stats", "SOCKET"], help: "print GPU counters (denovm)" },
  ],
  screenshot: [{ words: ["PATH", "SOCKET"], help: "save display 0 to PATH as PNG (denovm)" }],
  // crosvm's SndCommand / MuteAllCommand (cmdline.rs): `snd mute-all MUTED VM_SOCKET`, MUTED true or false.
  snd: [{ words: ["mute-all", "MUTED", "SOCKET"], help: "mute (true) or unmute (false) every sound stream" }],
  // crosvm's SnapshotCommand / SnapshotTakeCommand (cmdline.rs): `snapshot take SNAPSHOT_PATH VM_SOCKET
  // [--compress-memory] [--encrypt]`.
  snapshot: [{
    words: ["take", "PATH", "SOCKET"],
    flags: [
      {
        name: "compress-memory",
        help: "(crosvm) compress guest memory; accepted: denovm writes memory sparse either way",
      },
      {
        name: "encrypt",
        refused: "denovm writes snapshots unencrypted",
        help: "(crosvm) encrypt the snapshot; refused: denovm writes snapshots unencrypted",
      },
    ],
    help: "write a snapshot of the VM to directory PATH (restore it with run --restore PATH); " +
      "a suspended VM stays suspended",
  }],
};

/** crosvm commands denovm knows but does not offer (they need hardware denovm does not model); each is refused with one line naming it. */
const UNSUPPORTED: Record<string, string> = {
  swap: "vmm-swap is not supported",
  usb: "there is no USB controller",
  battery: "there is no battery device",
  gpe: "the VM has hardware-reduced ACPI, without general-purpose events",
  make_rt: "real-time vCPUs are not supported",
  vfio: "there is no PCI bus for VFIO devices",
  "virtio-net": "network devices cannot be hot-plugged",
};

/** The control command words denovm knows. */
export const CONTROL_COMMAND_NAMES: readonly string[] = Object.keys(COMMANDS);

/** Every control command line, for `denovm --help`. */
export const CONTROL_COMMAND_LIST: readonly { usage: string; help: string }[] = Object.entries(COMMANDS).flatMap((
  [cmd, shapes],
) => shapes.map((s) => ({ usage: usageLine(cmd, s), help: s.help })));

export function isControlCommand(word: string): boolean {
  return Object.hasOwn(COMMANDS, word) || Object.hasOwn(UNSUPPORTED, word);
}

function isSubcommandWord(word: string): boolean {
  return word === word.toLowerCase();
}

function usageLine(cmd: string, s: ControlShape): string {
  const flags = (s.flags ?? []).map((f) => {
    const text = f.arg ? `--${f.name} ${f.arg}` : `--${f.name}`;
    return f.required ? text : `[${text}]${f.repeatable ? "..." : ""}`;
  });
  // As argh prints it: the positional arguments, then the flags.
  return [cmd, ...s.words, ...flags].join(" ");
}

/** `denovm CMD --help` (or `denovm gpu SUB --help` for one subcommand). */
export function controlHelp(cmd: string, sub?: string): string {
  const all = COMMANDS[cmd] ?? [];
  const shapes = sub !== undefined && all.some((s) => s.words[0] === sub) ? all.filter((s) => s.words[0] === sub) : all;
  const out: string[] = [];
  for (const s of shapes) {
    out.push(`Usage: denovm ${usageLine(cmd, s)}`, "", `  ${s.help}.`);
    for (const f of s.flags ?? []) {
      out.push(`  ${f.arg ? `--${f.name} ${f.arg}` : `--${f.name}`}`.padEnd(28) + f.help);
    }
    out.push(`  ${SOCKET_HELP}.`, "");
  }
  return out.join("\n");
}

/** A control command line, parsed. */
export interface ParsedControl {
  cmd: string;
  /** The subcommand word (disk, gpu), if the command has them. */
  sub?: string;
  /** Positional arguments by their upper-case name (SOCKET, SIZE, INDEX, PATH). */
  args: Record<string, string>;
  /** Switches (true) and options (their values, in order). */
  flags: Record<string, true | string[]>;
  /** `-h`/`--help` was given: print controlHelp(cmd, sub) and exit 0, nothing else is checked. */
  help: boolean;
}

/**
 * Parses `argv` (starting with the command word, e.g. ["balloon", "1G", "/run/vm.sock", "--wait"]): literal
 * subcommand words, numeric INDEX and SIZE, a non-empty SOCKET, known flags. Throws UsageError.
 */
export function parseControlArgs(argv: readonly string[]): ParsedControl {
  const [cmd, ...rest] = argv;
  if (Object.hasOwn(UNSUPPORTED, cmd)) {
    throw new UsageError(`${cmd}: a crosvm command that denovm does not support: ${UNSUPPORTED[cmd]}`);
  }
  const shapes = COMMANDS[cmd];
  if (!shapes) throw new UsageError(`unknown command "${cmd}"`);
  const help = rest.some((a) => a === "-h" || a === "--help");
  const hasSubs = shapes.some((s) => isSubcommandWord(s.words[0]));
  const first = rest.find((a) => !a.startsWith("-"));
  if (help) return { cmd, sub: hasSubs ? first : undefined, args: {}, flags: {}, help: true };

  const shape = hasSubs ? shapes.find((s) => s.words[0] === rest[0]) : shapes[0];
  if (!shape) {
    const subs = shapes.map((s) => s.words[0]).join(", ");
    const got = rest[0] === undefined ? "nothing" : `"${rest[0]}"`;
    const usage = shapes.length === 1 ? ` (usage: denovm ${usageLine(cmd, shapes[0])})` : "";
    throw new UsageError(`${cmd}: expected ${subs}, got ${got}${usage}`);
  }
  const sub = hasSubs ? shape.words[0] : undefined;
  const usage = `usage: denovm ${usageLine(cmd, shape)}`;
  const where = sub ? `${cmd} ${sub}` : cmd;
  const positionals: string[] = [];
  const flags: Record<string, true | string[]> = {};
  const known = new Map((shape.flags ?? []).map((f) => [f.name, f]));
  for (let i = hasSubs ? 1 : 0; i < rest.length; i++) {
    const a = rest[i];
    if (!a.startsWith("--") || a === "--") {
      if (a.startsWith("-") && a !== "-" && a !== "--") {
        throw new UsageError(`${where}: unknown option ${a} (${usage})`);
      }
      if (a !== "--") positionals.push(a);
      continue;
    }
    // crosvm splits --flag=value at the first "=".
    const eq = a.indexOf("=");
    const name = a.slice(2, eq < 0 ? undefined : eq);
    const f = known.get(name);
    if (!f) throw new UsageError(`${where}: unknown option --${name} (${usage})`);
    if (f.refused) throw new UsageError(`${where}: --${name}: a crosvm option denovm does not support: ${f.refused}`);
    if (!f.arg) {
      if (eq >= 0) throw new UsageError(`${where}: --${name} takes no value`);
      flags[name] = true;
      continue;
    }
    const value = eq >= 0 ? a.slice(eq + 1) : rest[++i];
    if (value === undefined) throw new UsageError(`${where}: --${name} needs ${f.arg}`);
    const prev = flags[name];
    if (Array.isArray(prev) && !f.repeatable) throw new UsageError(`${where}: --${name} given twice`);
    flags[name] = [...(Array.isArray(prev) ? prev : []), value];
  }
  for (const f of shape.flags ?? []) {
    if (f.required && flags[f.name] === undefined) throw new UsageError(`${where}: --${f.name} is required (${usage})`);
  }
  const argWords = hasSubs ? shape.words.slice(1) : shape.words;
  if (positionals.length !== argWords.length) throw new UsageError(usage);
  const args: Record<string, string> = {};
  argWords.forEach((word, i) => {
    const arg = positionals[i];
    if (word === "INDEX") parseUint(arg, `${cmd} INDEX`);
    else if (word === "SIZE") parseSize(arg, `${cmd} SIZE`);
    else if (word === "MUTED" && arg !== "true" && arg !== "false") {
      throw new UsageError(`${cmd}: MUTED is true or false, not "${arg}"`);
    } else if ((word === "SOCKET" || word === "PATH") && arg === "") throw new UsageError(`${cmd}: empty ${word}`);
    args[word] = arg;
  });
  return { cmd, sub, args, flags, help: false };
}

/** Checks a control command line; throws UsageError (see parseControlArgs). */
export function checkControlArgs(argv: readonly string[]): void {
  parseControlArgs(argv);
}
