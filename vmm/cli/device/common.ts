// Option parsing every `denovm device <type>` parser shares: node:util parseArgs with one-line
// UsageErrors, and the socket the back end listens on, which crosvm spells `--socket-path` (older
// versions: `--socket`; google/crosvm devices/src/virtio/vhost/user/device/*).

import { parseArgs } from "node:util";
import { UsageError } from "../keyvalue.ts";

/** One option of parseOptions (a subset of node:util parseArgs' option config). */
export interface OptionSpec {
  type: "string" | "boolean";
  short?: string;
}

/** What parseOptions returns for `O`: strings for string options, booleans for boolean ones. */
export type OptionValues<O extends Record<string, OptionSpec>> = {
  [K in keyof O]?: O[K]["type"] extends "string" ? string : boolean;
};

/** The socket options of every device type: spread them into parseOptions' options. */
export const SOCKET_OPTIONS = {
  "socket-path": { type: "string" },
  socket: { type: "string" },
} as const satisfies Record<string, OptionSpec>;

/** node:util parseArgs (strict, no positionals) with its errors turned into one-line UsageErrors "<type>: ...". */
export function parseOptions<O extends Record<string, OptionSpec>>(
  type: string,
  args: string[],
  options: O,
): OptionValues<O> {
  try {
    const { values } = parseArgs({ args, options, strict: true, allowPositionals: false });
    return values as OptionValues<O>;
  } catch (e) {
    throw new UsageError(`${type}: ${(e as Error).message.split("\n")[0]}`);
  }
}

/**
 * The socket path given by `--socket-path` or `--socket`, or undefined when neither is; both with
 * different paths is an error, reported through `fail` (default: UsageError "<type>: <reason>").
 */
export function givenSocketPath(
  type: string,
  values: { "socket-path"?: string; socket?: string },
  fail: (reason: string) => never = (reason) => {
    throw new UsageError(`${type}: ${reason}`);
  },
): string | undefined {
  if (values["socket-path"] && values.socket && values["socket-path"] !== values.socket) {
    fail("give either --socket-path or --socket, not both");
  }
  return values["socket-path"] ?? values.socket;
}

/** The `--socket-path`/`--socket` pair that every device type takes: required, and not two different paths. */
export function socketPathOption(type: string, values: { "socket-path"?: string; socket?: string }): string {
  const socketPath = givenSocketPath(type, values);
  if (!socketPath) throw new UsageError(`${type}: --socket-path PATH is required`);
  return socketPath;
}
