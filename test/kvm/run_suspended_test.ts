// `denovm run --suspended` and `--suspended-vcpus` (vmm/cli/run_vm.ts) with the ticker test guest, which prints
// "TICK n" ten times a second: as in crosvm, --suspended holds the vCPUs and devices (`resume` is refused,
// `resume --full` lets the VM run) and --suspended-vcpus only the vCPUs (`resume` lets them run). The VM and the
// control commands are separate `denovm` processes, as users run them. Needs /dev/kvm; ignored without it.

import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { buildGuest } from "../guests/build.ts";
import { within as withinMs } from "../support/within.ts";
import { denovm, denovmArgs } from "../support/cli.ts";
import { EXIT_HOST_ERROR, EXIT_SUCCESS } from "../../core/exit.ts";

const kvmAvailable = existsSync("/dev/kvm");
if (!kvmAvailable) console.log("run_suspended_test: run --suspended tests skipped: no /dev/kvm");

/** Hang protection only: no assertion depends on how fast anything is. */
const GUEST_TIMEOUT_MS = 120_000;
/** How long a suspended VM is watched for console output (the ticker prints every 100 ms of guest time). */
const SUSPENDED_WATCH_MS = 500;
const POLL_MS = 20;

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Waits (bounded) until `cond` holds. */
async function until(cond: () => boolean | Promise<boolean>, what: string): Promise<void> {
  const deadline = Date.now() + GUEST_TIMEOUT_MS;
  while (!(await cond())) {
    assert.ok(Date.now() < deadline, `never happened: ${what}`);
    await sleep(POLL_MS);
  }
}

function readText(path: string): string {
  try {
    return Deno.readTextFileSync(path);
  } catch {
    return "";
  }
}

/**
 * Starts `denovm run SWITCH -s SOCK` on the ticker guest with its console in a file, waits for the control
 * socket, checks nothing is printed while it is suspended, runs `check` (which resumes the VM), checks the guest
 * then ticks, and stops it.
 */
async function suspendedRun(
  startSwitch: string,
  check: (sock: string, out: string) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "denovm-run-suspended-test-" });
  const sock = `${dir}/vm.sock`;
  const out = `${dir}/console.txt`;
  const kernel = await buildGuest("ticker");
  const vm = new Deno.Command(Deno.execPath(), {
    args: denovmArgs(["run", startSwitch, "-s", sock, "--serial", `type=file,path=${out},console`, kernel]),
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  try {
    await until(() => existsSync(sock), "the control socket is served");
    await sleep(SUSPENDED_WATCH_MS);
    assert.equal(readText(out), "", "a suspended VM prints nothing");
    await check(sock, out);
    await until(() => /^TICK 2\r?\n/m.test(readText(out)), "the guest ticks after the resume");
    const stop = await denovm("stop", sock);
    assert.equal(stop.code, EXIT_SUCCESS, stop.stderr);
    const status = await withinMs(vm.output(), () => "the VM did not end after stop", GUEST_TIMEOUT_MS);
    assert.equal(status.code, EXIT_SUCCESS, new TextDecoder().decode(status.stderr));
  } finally {
    try {
      vm.kill("SIGKILL");
    } catch {
      // Already ended.
    }
    await vm.status;
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test({
  name: "kvm: run --suspended: vCPUs and devices held; resume is refused, resume --full lets the guest run (crosvm)",
  ignore: !kvmAvailable,
  async fn() {
    await suspendedRun("--suspended", async (sock, out) => {
      const r = await denovm("resume", sock);
      assert.equal(r.code, EXIT_HOST_ERROR);
      assert.match(r.stderr, /^denovm: resume: the devices are suspended \(suspend --full\): [^\n]*\n$/);
      await sleep(SUSPENDED_WATCH_MS);
      assert.equal(readText(out), "", "still suspended after the refused resume");
      const full = await denovm("resume", "--full", sock);
      assert.equal(full.code, EXIT_SUCCESS, full.stderr);
    });
  },
});

Deno.test({
  name: "kvm: run --suspended-vcpus: vCPUs held; resume lets the guest run (crosvm)",
  ignore: !kvmAvailable,
  async fn() {
    await suspendedRun("--suspended-vcpus", async (sock) => {
      const r = await denovm("resume", sock);
      assert.equal(r.code, EXIT_SUCCESS, r.stderr);
    });
  },
});
