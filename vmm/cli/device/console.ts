// `denovm device console`: crosvm's vhost-user console options (google/crosvm
// devices/src/virtio/vhost/user/device/console.rs `Options`): `--socket PATH` (here also
// `--socket-path`), `--output-file OUTFILE` (guest output appended to a file instead of stdout),
// `--input-file INFILE` (guest input read from a file instead of stdin), `--syslog` (crosvm logs the
// output to syslog; denovm writes it to stderr and reads no stdin, as crosvm does in that mode).

import { ConsoleDevice } from "../../../devices/virtio/console.ts";
import type { VirtioDevice } from "../../../devices/virtio/device.ts";
import { UsageError } from "../keyvalue.ts";
import { parseOptions, SOCKET_OPTIONS, socketPathOption } from "./common.ts";

export const CONSOLE_USAGE = "usage: denovm device console --socket-path PATH [--output-file OUTFILE] " +
  "[--input-file INFILE] [--syslog]\n" +
  "  Port 0 of a virtio console (hvc0). Guest output goes to stdout (or OUTFILE, appended; or stderr\n" +
  "  with --syslog); guest input comes from stdin, raw when it is a terminal (or from INFILE).\n";

export interface ConsoleArgs {
  socketPath: string;
  outputFile?: string;
  inputFile?: string;
  syslog: boolean;
}

/** Parse `console` options; throws UsageError with a one-line reason. */
export function parseConsoleArgs(args: string[]): ConsoleArgs {
  const values = parseOptions("console", args, {
    ...SOCKET_OPTIONS,
    "output-file": { type: "string" },
    "input-file": { type: "string" },
    syslog: { type: "boolean" },
    help: { type: "boolean", short: "h" },
  });
  if (values.help) {
    console.log(CONSOLE_USAGE);
    Deno.exit(0);
  }
  const socketPath = socketPathOption("console", values);
  if (values.syslog && values["output-file"]) {
    throw new UsageError("console: --output-file and --syslog cannot be used together");
  }
  return {
    socketPath,
    outputFile: values["output-file"],
    inputFile: values["input-file"],
    syslog: values.syslog ?? false,
  };
}

/** Write all of `data` to a sync writer. */
function writeAll(w: { writeSync(p: Uint8Array): number }, data: Uint8Array): void {
  let o = 0;
  while (o < data.length) o += w.writeSync(data.subarray(o));
}

/** Build the device and start feeding it input (see args/README.md). */
export function parseDeviceArgs(args: string[]): { socketPath: string; device: VirtioDevice } {
  const a = parseConsoleArgs(args);
  let out: { writeSync(p: Uint8Array): number } = Deno.stdout;
  if (a.outputFile) out = Deno.openSync(a.outputFile, { create: true, append: true });
  else if (a.syslog) out = Deno.stderr;
  const device = new ConsoleDevice({ output: (b) => writeAll(out, b) });
  if (a.inputFile) {
    device.sendInput(Deno.readFileSync(a.inputFile));
  } else if (!a.syslog) {
    pumpStdin(device);
  }
  return { socketPath: a.socketPath, device };
}

/** Feed stdin to the console until EOF; a terminal is put in raw mode so keys go through one by one. */
function pumpStdin(device: ConsoleDevice): void {
  const stdin = Deno.stdin;
  if (stdin.isTerminal()) {
    stdin.setRaw(true);
    globalThis.addEventListener("unload", () => stdin.setRaw(false));
  }
  (async () => {
    const buf = new Uint8Array(4096);
    for (;;) {
      const n = await stdin.read(buf);
      if (n === null) return;
      device.sendInput(buf.subarray(0, n));
    }
  })().catch((e) => console.error(`denovm device console: stdin: ${(e as Error).message}`));
}
