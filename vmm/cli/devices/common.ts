// What the device-family modules of vmm/cli/devices/ share.
//
// Each family module (block.ts, net.ts, serial.ts, gpu.ts, input.ts, vsock.ts, balloon.ts, rng.ts) holds
// every command-line spelling of that family: its `denovm run` option (crosvm's key=value form, decoded
// into a VmConfig part with keyvalue.ts) and its `denovm device <type>` arguments (crosvm's vhost-user
// device flags), checked against the limits and defaults the device model exports (devices/virtio/...) or
// vmm/config.ts holds. run.ts and device.ts only dispatch to them.
//
// A `device <type>` parser is `parseDeviceArgs(args)`, `args` being the words after the type; it returns
// the socket path and the device. Bad arguments throw UsageError (exit 35, one line); any other error is a
// host fault (exit 1). This module has what those parsers share: node:util parseArgs with one-line
// UsageErrors, the socket they listen on, which crosvm spells `--socket-path` (older versions: `--socket`;
// google/crosvm devices/src/virtio/vhost/user/device/*), and the JSON-lines control socket some of the
// back ends offer.

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

/** A Unix socket server taking JSON lines; each line's handler result is sent back as one JSON line. */
export interface JsonLineServer {
  close(): void;
}

/** Listen on `path` (a stale socket file is replaced) and answer each JSON line with `handle`'s result. */
export function serveJsonLines(path: string, handle: (req: unknown) => unknown | Promise<unknown>): JsonLineServer {
  try {
    if (Deno.lstatSync(path).isSocket) Deno.removeSync(path);
  } catch {
    // absent
  }
  const listener = Deno.listen({ transport: "unix", path });
  const conns = new Set<Deno.Conn>();
  let closed = false;
  const serveConn = async (conn: Deno.Conn) => {
    const enc = new TextEncoder();
    const dec = new TextDecoder();
    let buf = "";
    try {
      for await (const chunk of conn.readable) {
        buf += dec.decode(chunk, { stream: true });
        for (let nl = buf.indexOf("\n"); nl >= 0; nl = buf.indexOf("\n")) {
          const line = buf.slice(0, nl).trim();
          buf = buf.slice(nl + 1);
          if (!line) continue;
          let reply: unknown;
          try {
            reply = await handle(JSON.parse(line));
          } catch (e) {
            reply = { ok: false, error: (e as Error).message };
          }
          await conn.write(enc.encode(JSON.stringify(reply) + "\n"));
        }
      }
    } catch {
      // the client went away
    } finally {
      conns.delete(conn);
      try {
        conn.close();
      } catch {
        // closed already
      }
    }
  };
  (async () => {
    try {
      for await (const conn of listener) {
        conns.add(conn);
        serveConn(conn);
      }
    } catch (e) {
      if (!closed) console.error(`event socket ${path}: ${(e as Error).message}`);
    }
  })();
  return {
    close() {
      if (closed) return;
      closed = true;
      listener.close();
      for (const c of conns) {
        try {
          c.close();
        } catch {
          // closed already
        }
      }
      try {
        Deno.removeSync(path);
      } catch {
        // gone
      }
    },
  };
}

/** Close `server` too when `device` is closed. */
export function closeWithDevice(device: { close(): void }, server: JsonLineServer): void {
  const close = device.close.bind(device);
  device.close = () => {
    server.close();
    close();
  };
}
