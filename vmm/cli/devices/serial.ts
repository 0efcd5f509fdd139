// The serial family: `run --serial type=TYPE[,key=value...]` (crosvm devices/src/serial_device.rs
// SerialParameters: 8250 UARTs, virtio-console ports, debugcon) and `denovm device console`, port 0 of a
// virtio console as a vhost-user back end. See common.ts for how the family modules are organised.
//
// `device console` takes crosvm's vhost-user console options (google/crosvm
// devices/src/virtio/vhost/user/device/console.rs `Options`): `--socket PATH` (here also
// `--socket-path`), `--output-file OUTFILE` (guest output appended to a file instead of stdout),
// `--input-file INFILE` (guest input read from a file instead of stdin), `--syslog` (crosvm logs the
// output to syslog; denovm writes it to stderr and reads no stdin, as crosvm does in that mode).

import { ConsoleDevice } from "../../../devices/virtio/console.ts";
import type { VirtioDevice } from "../../../devices/virtio/device.ts";
import { EXIT_SUCCESS } from "../../../core/exit.ts";
import { type KvSchema, parseOption, parseUint, UsageError } from "../keyvalue.ts";
import { crosvmOnlyKeys } from "../help.ts";
import {
  defaultSerial,
  SERIAL_HARDWARE,
  SERIAL_TYPES,
  type SerialConfig,
  type SerialHardware,
  type SerialType,
} from "../../config.ts";
import { SERIAL_PORTS } from "../../arch/layout.ts";
import { parseOptions, SOCKET_OPTIONS, socketPathOption } from "./common.ts";

// ---- run ----

/** Port numbers are 1..4: COM1..COM4, and as many virtio-console ports (crosvm config.rs validate_serial_parameters). */
const MAX_SERIAL_NUM = SERIAL_PORTS.length;

const SERIAL_SCHEMA: KvSchema = {
  option: "--serial",
  positional: "type",
  keys: {
    type: { enum: SERIAL_TYPES },
    hardware: { enum: SERIAL_HARDWARE },
    num: "string",
    path: "string",
    input: "string",
    console: "bool",
    earlycon: "bool",
    stdin: "bool",
    name: "string",
    // A unix-stream port's socket carries its input too: what crosvm does with input-unix-stream=true is
    // what denovm always does, so the key is accepted whatever its value.
    "input-unix-stream": "bool",
  },
  aliases: { out_timestamp: "out-timestamp" },
  crosvmOnly: crosvmOnlyKeys("serial"),
};

/** `run --serial`. */
export function parseSerialOption(text: string): SerialConfig {
  const o = parseOption(SERIAL_SCHEMA, text);
  const s: SerialConfig = {
    type: (o.type as SerialType | undefined) ?? "sink",
    hardware: (o.hardware as SerialHardware | undefined) ?? "serial",
    num: o.num === undefined ? 1 : parseUint(o.num as string, "--serial num", 1, MAX_SERIAL_NUM),
    console: (o.console as boolean | undefined) ?? false,
    earlycon: (o.earlycon as boolean | undefined) ?? false,
    stdin: (o.stdin as boolean | undefined) ?? false,
  };
  if (o.path !== undefined) s.path = o.path as string;
  if (o.input !== undefined) s.input = o.input as string;
  if (o.name !== undefined) s.name = o.name as string;
  if (o["input-unix-stream"] === true && s.type !== "unix-stream") {
    throw new UsageError("--serial: input-unix-stream needs type=unix-stream");
  }
  if (s.stdin && s.input !== undefined) throw new UsageError("--serial: stdin and input cannot both be given");
  if ((s.type === "file" || s.type === "unix" || s.type === "unix-stream") && s.path === undefined) {
    throw new UsageError(`--serial: type=${s.type} needs path=`);
  }
  if (s.earlycon && s.hardware !== "serial") {
    throw new UsageError(`--serial: earlycon is not supported for hardware=${s.hardware}`);
  }
  return s;
}

/**
 * crosvm's cross-port checks (cmdline.rs, the serial loop of TryFrom<RunCommand> for Config): each
 * hardware+num once, one earlycon, one port on stdin. Several ports may be consoles: each gets its
 * `console=` on the kernel command line, and Linux makes the last one /dev/console.
 */
export function validateSerials(serials: SerialConfig[]): void {
  const keys = new Set<string>();
  for (const s of serials) {
    const key = `${s.hardware}:${s.num}`;
    if (keys.has(key)) throw new UsageError(`--serial: hardware=${s.hardware} num=${s.num} given twice`);
    keys.add(key);
  }
  const count = (pred: (s: SerialConfig) => boolean) => serials.filter(pred).length;
  if (count((s) => s.earlycon) > 1) throw new UsageError("--serial: more than one earlycon");
  if (count((s) => s.stdin) > 1) throw new UsageError("--serial: more than one port reads stdin");
}

/**
 * crosvm arch/src/serial.rs set_default_serial_parameters: with no console port, COM1 (if not configured)
 * becomes a stdout + stdin console, put first.
 */
export function addDefaultSerial(serials: SerialConfig[]): void {
  if (!serials.some((s) => s.console) && !serials.some((s) => s.hardware === "serial" && s.num === 1)) {
    const stdinTaken = serials.some((s) => s.stdin);
    serials.unshift({ ...defaultSerial(), stdin: !stdinTaken });
  }
}

// ---- device console ----

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
    Deno.exit(EXIT_SUCCESS);
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

/** Build the device and start feeding it input (common.ts). */
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
