// denovm: a crosvm-compatible VMM. `denovm [--extended-status] [--log-level L] <command> ...`; see
// `denovm --help`. Every invalid command line ends with one `denovm: <what is wrong>` line on stderr and
// crosvm's invalid-arguments exit code (35); see core/exit.ts for all exit codes. As crosvm's main does
// (google/crosvm src/main.rs crosvm_main), a VM that ends exits 0 however it ended unless the global
// `--extended-status` is given; errors keep their own code (35 or 1) either way.

import { controlHelp, isControlCommand, parseControlArgs } from "./vmm/cli/control.ts";
import { EXIT_HOST_ERROR, EXIT_INVALID_ARGS, EXIT_SUCCESS, vmEndExitCode } from "./core/exit.ts";
import { DENOVM_VERSION, mainHelp, runHelp } from "./vmm/cli/help.ts";
import { UsageError } from "./vmm/cli/keyvalue.ts";
import { parseRunArgs } from "./vmm/cli/run.ts";

const encoder = new TextEncoder();

function writeStdout(text: string): void {
  Deno.stdout.writeSync(encoder.encode(text));
}

/** One `denovm: ...` line on stderr (newlines in the message are folded so it stays one line). */
function printError(message: string): void {
  Deno.stderr.writeSync(encoder.encode(`denovm: ${message.replace(/\s*\n\s*/g, "; ")}\n`));
}

const LOG_LEVELS = ["off", "error", "warn", "info", "debug", "trace"];

/** crosvm-style log filter: LEVEL or MODULE=LEVEL items separated by commas. */
function checkLogLevel(spec: string): void {
  for (const item of spec.split(",")) {
    const level = item.includes("=") ? item.slice(item.indexOf("=") + 1) : item;
    const module = item.includes("=") ? item.slice(0, item.indexOf("=")) : "x";
    if (!LOG_LEVELS.includes(level) || module === "") {
      throw new UsageError(`--log-level: "${item}" is not LEVEL or MODULE=LEVEL (levels: ${LOG_LEVELS.join(", ")})`);
    }
  }
}

function isVerbose(logLevel: string | undefined): boolean {
  return logLevel !== undefined && /(^|,|=)(debug|trace)(,|$)/.test(logLevel);
}

/** The exit code an error thrown by a command maps to, after printing it as one line. */
function reportError(e: unknown, logLevel: string | undefined): number {
  if (e instanceof UsageError || (e instanceof Error && e.name === "UsageError")) {
    printError(e.message);
    return EXIT_INVALID_ARGS;
  }
  const err = e instanceof Error ? e : new Error(String(e));
  const code = (err as { exitCode?: unknown }).exitCode;
  printError(err.message || err.name);
  if (isVerbose(logLevel) && err.stack) Deno.stderr.writeSync(encoder.encode(err.stack + "\n"));
  return typeof code === "number" && Number.isInteger(code) && code >= 0 && code <= 255 ? code : EXIT_HOST_ERROR;
}

async function versionText(): Promise<string> {
  try {
    const json = JSON.parse(await Deno.readTextFile(new URL("./deno.json", import.meta.url)));
    if (typeof json.version === "string") return json.version;
  } catch {
    // No readable deno.json next to main.ts: use the built-in version.
  }
  return DENOVM_VERSION;
}

/** Loads a module that another part of denovm provides; a missing module is a host error (exit 1). */
async function load<T>(what: string, importer: () => Promise<T>): Promise<T | undefined> {
  try {
    return await importer();
  } catch (e) {
    printError(`${what} is not available: ${e instanceof Error ? e.message.split("\n")[0] : String(e)}`);
    return undefined;
  }
}

/** Runs denovm with `args` (Deno.args); resolves to the process exit code. */
export async function main(args: readonly string[]): Promise<number> {
  let logLevel: string | undefined;
  let extendedStatus = false;
  let i = 0;
  try {
    for (; i < args.length && args[i].startsWith("-"); i++) {
      const a = args[i];
      // crosvm splits `--flag=value` at the first "=" (src/main.rs prepare_argh_args).
      const eq = a.indexOf("=");
      const name = eq >= 0 ? a.slice(0, eq) : a;
      const value = () => {
        const v = eq >= 0 ? a.slice(eq + 1) : args[++i];
        if (v === undefined) throw new UsageError(`${name} needs a value`);
        return v;
      };
      if (name === "-h" || name === "--help") {
        writeStdout(mainHelp());
        return EXIT_SUCCESS;
      } else if (name === "--log-level") {
        const v = value();
        checkLogLevel(v);
        logLevel = v;
      } else if (a === "--extended-status") {
        extendedStatus = true;
      } else if (a === "--no-syslog") {
        // crosvm's switch to keep logs off syslog; denovm logs only to stderr.
      } else if (name === "--syslog-tag") {
        // crosvm's syslog tag; denovm logs only to stderr, so there is nothing to tag.
        value();
      } else {
        throw new UsageError(`unknown option ${a} (see denovm --help)`);
      }
    }
    const command = args[i];
    const rest = args.slice(i + 1);
    if (command === undefined) throw new UsageError("missing command (see denovm --help)");

    if (command === "run") {
      const parsed = parseRunArgs(rest);
      if (parsed.help) {
        writeStdout(runHelp());
        return EXIT_SUCCESS;
      }
      for (const w of parsed.warnings) printError(`warning: ${w}`);
      if (logLevel !== undefined) parsed.config.logLevel = logLevel;
      if (parsed.printConfig) {
        // The checks a boot makes before it opens KVM, so what prints is what would boot.
        const check = await load("the configuration check (vmm/validate.ts)", () => import("./vmm/validate.ts"));
        if (!check) return EXIT_HOST_ERROR;
        await check.validateVmConfig(parsed.config);
        writeStdout(JSON.stringify(parsed.config, null, 2) + "\n");
        return EXIT_SUCCESS;
      }
      const vmm = await load("the VMM (vmm/cli/run_vm.ts)", () => import("./vmm/cli/run_vm.ts"));
      if (!vmm) return EXIT_HOST_ERROR;
      return vmEndExitCode(await vmm.runVm(parsed.config, parsed), extendedStatus);
    }
    if (command === "device") {
      if (rest.length === 0) throw new UsageError("device: missing device TYPE");
      const m = await load(
        "vhost-user devices (vmm/cli/device.ts)",
        () => import("./vmm/cli/device.ts"),
      );
      if (!m) return EXIT_HOST_ERROR;
      return await m.runDeviceCommand(rest);
    }
    if (command === "version") {
      if (rest.length > 0) throw new UsageError("version takes no arguments");
      writeStdout(`denovm ${await versionText()}\n`);
      return EXIT_SUCCESS;
    }
    if (command === "help") {
      writeStdout(rest[0] === "run" ? runHelp() : mainHelp());
      return EXIT_SUCCESS;
    }
    if (isControlCommand(command)) {
      const argv = [command, ...rest];
      const parsed = parseControlArgs(argv);
      if (parsed.help) {
        writeStdout(controlHelp(parsed.cmd, parsed.sub));
        return EXIT_SUCCESS;
      }
      const m = await load("the control client (vmm/control/client.ts)", () => import("./vmm/control/client.ts"));
      if (!m) return EXIT_HOST_ERROR;
      const code = await m.sendControlCommand(argv);
      return typeof code === "number" ? code : EXIT_SUCCESS;
    }
    throw new UsageError(`unknown command "${command}" (see denovm --help)`);
  } catch (e) {
    return reportError(e, logLevel);
  }
}

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
