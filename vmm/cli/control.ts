// Shape checks for the control commands (`denovm stop SOCKET`, `denovm balloon SIZE SOCKET`, ...), done
// before anything connects, so a malformed command exits with the invalid-arguments code. The commands and
// their argument order follow crosvm (google/crosvm src/crosvm/cmdline.rs: StopCommand, BalloonCommand,
// DiskCommand, GpuCommand, ...): the VM socket path always comes last.

import { parseSize, parseUint, UsageError } from "./keyvalue.ts";

/** Command word → the words that must follow it (the last one is always SOCKET). */
const SHAPES: Record<string, readonly string[][]> = {
  stop: [["SOCKET"]],
  suspend: [["SOCKET"]],
  resume: [["SOCKET"]],
  powerbtn: [["SOCKET"]],
  balloon: [["SIZE", "SOCKET"]],
  balloon_stats: [["SOCKET"]],
  disk: [["resize", "INDEX", "SIZE", "SOCKET"]],
  gpu: [["list-displays", "SOCKET"], ["stats", "SOCKET"]],
  screenshot: [["PATH", "SOCKET"]],
  snapshot: [["take", "PATH", "SOCKET"]],
};

/** The control command words denovm knows. */
export const CONTROL_COMMAND_NAMES: readonly string[] = Object.keys(SHAPES);

export function isControlCommand(word: string): boolean {
  return Object.hasOwn(SHAPES, word);
}

/**
 * Checks `argv` (starting with the command word, e.g. ["balloon", "1G", "/run/vm.sock"]) against the
 * command's shape: literal subcommand words, numeric INDEX and SIZE, a non-empty SOCKET. Throws UsageError.
 */
export function checkControlArgs(argv: readonly string[]): void {
  const [cmd, ...rest] = argv;
  const shapes = SHAPES[cmd];
  if (!shapes) throw new UsageError(`unknown command "${cmd}"`);
  const matching = shapes.filter((shape) => isSubcommandWord(shape[0]) ? rest[0] === shape[0] : true);
  if (matching.length === 0) {
    const subs = shapes.map((s) => s[0]).join(", ");
    throw new UsageError(`${cmd}: expected ${subs}, got ${rest[0] === undefined ? "nothing" : `"${rest[0]}"`}`);
  }
  const shape = matching[0];
  const usage = `${cmd} ${shape.join(" ")}`;
  if (rest.length !== shape.length) throw new UsageError(`usage: denovm ${usage}`);
  shape.forEach((word, i) => {
    const arg = rest[i];
    if (word === "INDEX") parseUint(arg, `${cmd} INDEX`);
    else if (word === "SIZE") parseSize(arg, `${cmd} SIZE`);
    else if ((word === "SOCKET" || word === "PATH") && arg === "") throw new UsageError(`${cmd}: empty ${word}`);
  });
}

function isSubcommandWord(word: string): boolean {
  return word === word.toLowerCase();
}
