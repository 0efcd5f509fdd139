// denovm's command line as a user meets it: main.ts in a process of its own under this Deno, its exit code and
// its output, and the checks every CLI test makes of them.

import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { EXIT_SUCCESS } from "../../core/exit.ts";
import { within } from "./within.ts";

/** The repository's root: the directory a denovm process runs in unless told otherwise. */
export const REPO_ROOT = fileURLToPath(new URL("../..", import.meta.url));
/** denovm's command-line entry. */
export const MAIN_TS = fileURLToPath(new URL("../../main.ts", import.meta.url));
/** How long one denovm process may take before it is killed and the test fails: a hang guard only. */
export const CLI_TIMEOUT_MS = 120_000;

/** What a denovm process ended with. */
export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

export interface CliOptions {
  /** The process's working directory (default REPO_ROOT). */
  cwd?: string;
  /** Variables added to this process's environment. */
  env?: Record<string, string>;
  /** The hang guard (default CLI_TIMEOUT_MS). */
  timeoutMs?: number;
}

/** The arguments for `Deno.execPath()` that run `denovm ARGS...`: main.ts with every permission. */
export function denovmArgs(args: string[]): string[] {
  return ["run", "--allow-all", MAIN_TS, ...args];
}

/**
 * `denovm ARGS...` to its end, stdin closed, stdout and stderr collected; killed (and the call rejects naming it)
 * if it has not ended after the hang guard.
 */
export function runDenovm(args: string[], options: CliOptions = {}): Promise<CliResult> {
  return runCommand(Deno.execPath(), denovmArgs(args), options, `denovm ${args.join(" ")}`);
}

/** `cmd ARGS...` (a pipeline around denovm, say) as runDenovm runs denovm; `what` names it in the hang guard's error. */
export async function runCommand(
  cmd: string,
  args: string[],
  options: CliOptions = {},
  what = `${cmd} ${args.join(" ")}`,
): Promise<CliResult> {
  const child = new Deno.Command(cmd, {
    args,
    cwd: options.cwd ?? REPO_ROOT,
    env: options.env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  try {
    const out = await within(
      child.output(),
      () => `${what} did not exit`,
      options.timeoutMs ?? CLI_TIMEOUT_MS,
    );
    const dec = new TextDecoder();
    return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
  } catch (e) {
    try {
      child.kill("SIGKILL");
    } catch {
      // already gone
    }
    throw e;
  }
}

/** `denovm ARGS...` with the defaults of runDenovm. */
export function denovm(...args: string[]): Promise<CliResult> {
  return runDenovm(args);
}

/** The lines of stderr, blank space around them trimmed (none when it wrote nothing). */
export function stderrLines(r: CliResult): string[] {
  const text = r.stderr.trim();
  return text === "" ? [] : text.split("\n");
}

/** The process succeeded; the message shows all it wrote when it did not. */
export function assertCliOk(r: CliResult, what: string): void {
  assert.equal(r.code, EXIT_SUCCESS, `${what}: exit ${r.code}\nstdout:\n${r.stdout}\nstderr:\n${r.stderr}`);
}

/** A refusal as users must see it: exit `code`, one line on stderr, matching `pattern`, no stack trace. */
export function assertOneLineRefusal(r: CliResult, code: number, pattern: RegExp, what: string): void {
  const lines = stderrLines(r);
  assert.equal(r.code, code, `${what}: exit ${r.code}\nstderr:\n${r.stderr}`);
  assert.equal(lines.length, 1, `${what}: one line on stderr, got:\n${r.stderr}`);
  assert.match(lines[0], pattern, what);
  assert.doesNotMatch(r.stderr, /^\s+at /m, `${what}: a stack trace`);
}
