// `denovm run --gdb PORT` driven by Debian's gdb in batch mode against the gdb_target test guest
// (test/guests/gdb_target.c, built with debug information): break on a symbol, read a variable,
// single-step, continue, hardware breakpoints, guest-physical memory, several vCPUs as threads, and
// Ctrl-C. Needs /dev/kvm (test/nested/nested_kvm_test.ts runs this file on a hardware-style KVM
// too) and gdb (scripts/setup.sh installs it).

import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { buildGuest } from "../guests/build.ts";

const MAIN = fileURLToPath(new URL("../../main.ts", import.meta.url));
const REPO_ROOT = fileURLToPath(new URL("../..", import.meta.url));
/** Hang protection only (guest code is emulated at a few million instructions/s on some hosts). */
const TIMEOUT_MS = 120_000;
/** How long the guest runs before the test interrupts it. */
const RUN_BEFORE_INTERRUPT_MS = 3000;

function which(cmd: string): boolean {
  return (Deno.env.get("PATH") ?? "").split(":").some((d) => d && existsSync(`${d}/${cmd}`));
}

function skipReason(): string | undefined {
  if (!existsSync("/dev/kvm")) return "no /dev/kvm";
  if (!which("gdb")) return "gdb is not installed (scripts/setup.sh installs it)";
  return undefined;
}
const skip = skipReason();
if (skip) console.log(`gdb_test: skipped: ${skip}`);

/** A free loopback port (the kernel's pick, released again: the VMM binds it a moment later). */
function freePort(): number {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  return port;
}

interface RunningVm {
  port: number;
  stderr: () => string;
  stop: () => Promise<number>;
}

/** Start `denovm run --gdb PORT [extra] gdb_target.elf`; resolves once the stub listens. */
async function startVm(elf: string, extra: string[] = []): Promise<RunningVm> {
  const port = freePort();
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-all", MAIN, "run", "--gdb", String(port), ...extra, elf],
    cwd: REPO_ROOT,
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  let text = "";
  let listening!: () => void;
  const ready = new Promise<void>((r) => listening = r);
  const reading = (async () => {
    for await (const chunk of child.stderr.pipeThrough(new TextDecoderStream())) {
      text += chunk;
      if (text.includes(`gdb stub on 127.0.0.1:${port}`)) listening();
    }
  })();
  const timer = setTimeout(() => listening(), TIMEOUT_MS);
  await ready;
  clearTimeout(timer);
  assert.match(text, /gdb stub on 127\.0\.0\.1:\d+; the VM is paused/, text);
  return {
    port,
    stderr: () => text,
    stop: async () => {
      try {
        child.kill("SIGTERM");
      } catch {
        // already gone
      }
      const status = await child.status;
      await reading;
      return status.code;
    },
  };
}

/**
 * What gdb prints once `target remote` has connected: the frame the VM is paused in
 * (`_start () at .../start.S:16`, or `0x... in ?? ()` without symbols for it).
 */
const CONNECTED_FRAME = /start\.S:\d+|^0x[0-9a-f]+ in /m;

/**
 * gdb -batch with `commands` (-ex each) on the guest's ELF; with `interruptAfterMs`, gdb gets SIGINT that long
 * after it has connected (a SIGINT during `target remote` would abort the connection instead, and a loaded
 * nested host can take seconds to get there).
 */
async function gdb(elf: string, port: number, commands: string[], interruptAfterMs?: number): Promise<string> {
  const args = ["-batch", "-nx", "-ex", "set confirm off", "-ex", `target remote 127.0.0.1:${port}`];
  for (const c of commands) args.push("-ex", c);
  args.push(elf);
  const child = new Deno.Command("gdb", { args, stdin: "null", stdout: "piped", stderr: "piped" }).spawn();
  let interrupt: ReturnType<typeof setTimeout> | undefined;
  const sigint = () => {
    try {
      child.kill("SIGINT");
    } catch {
      // ended already
    }
  };
  const hang = setTimeout(() => {
    try {
      child.kill("SIGKILL");
    } catch {
      // ended already
    }
  }, TIMEOUT_MS);
  const collect = async (stream: ReadableStream<Uint8Array>, watch: boolean) => {
    let text = "";
    for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
      text += chunk;
      if (watch && interruptAfterMs !== undefined && interrupt === undefined && CONNECTED_FRAME.test(text)) {
        interrupt = setTimeout(sigint, interruptAfterMs);
      }
    }
    return text;
  };
  const [stdout, stderr] = await Promise.all([collect(child.stdout, true), collect(child.stderr, false)]);
  await child.status;
  clearTimeout(interrupt);
  clearTimeout(hang);
  return stdout + stderr;
}

Deno.test({
  name: "kvm: gdb breaks on a symbol, reads a variable, steps and continues (software and hardware breakpoints)",
  ignore: skip !== undefined,
  async fn() {
    const elf = await buildGuest("gdb_target");
    const vm = await startVm(elf);
    try {
      const out = await gdb(elf, vm.port, [
        "info threads",
        "break gdb_bump",
        "continue",
        "print gdb_counter",
        "continue",
        "print gdb_counter",
        "stepi",
        "print (long)$pc - (long)&gdb_bump",
        "delete",
        "hbreak gdb_bump",
        "continue",
        "print gdb_counter",
        "maintenance packet Qqemu.PhyMemMode:1",
        "x/gx &gdb_counter",
        "maintenance packet Qqemu.PhyMemMode:0",
        "x/gx 0xffff800000000000",
        "detach",
      ]);
      console.log(`gdb's output:\n${out}\ndenovm's stderr:\n${vm.stderr()}`);
      // Attached at the guest's first instruction, the VM paused; one vCPU, one thread.
      assert.match(out, /_start \(\) at .*start\.S/, out);
      assert.match(out, /\* 1 +Thread 1 \(vCPU 0\)/, out);
      // The software breakpoint hits twice: before the first bump and after it.
      assert.match(out, /Breakpoint 1, gdb_bump \(\) at .*gdb_target\.c/, out);
      assert.match(out, /\$1 = 0\n[^]*\$2 = 1\n/, out);
      // One instruction further, still inside gdb_bump.
      const step = /\$3 = (\d+)\n/.exec(out);
      assert.ok(step && Number(step[1]) > 0 && Number(step[1]) < 16, `stepi: ${out}`);
      // The hardware breakpoint stops at the next bump: the counter went on by one.
      assert.match(out, /Hardware assisted breakpoint 2 at/, out);
      assert.match(out, /Breakpoint 2, gdb_bump \(\)[^]*\$4 = 2\n/, out);
      // Guest-physical reads see the same variable (the guest's low memory is identity-mapped).
      assert.match(out, /<gdb_counter>:\s+0x0000000000000002/, out);
      // An address the page tables do not map is an error reply, not a crash.
      assert.match(out, /Cannot access memory at address 0xffff800000000000/, out);
      assert.match(out, /detached/, out);
    } finally {
      const code = await vm.stop();
      assert.equal(code, 0, vm.stderr());
    }
    assert.doesNotMatch(vm.stderr(), /crash/i);
  },
});

Deno.test({
  name: "kvm: gdb interrupts a running guest with Ctrl-C and sees every vCPU as a thread",
  ignore: skip !== undefined,
  async fn() {
    const elf = await buildGuest("gdb_target");
    const vm = await startVm(elf, ["--cpus", "2"]);
    try {
      const out = await gdb(elf, vm.port, [
        "continue",
        "print gdb_counter > 1",
        "info threads",
        "kill",
      ], RUN_BEFORE_INTERRUPT_MS);
      console.log(`gdb's output:\n${out}\ndenovm's stderr:\n${vm.stderr()}`);
      assert.match(out, /received signal SIGINT, Interrupt\./, out);
      assert.match(out, /\$1 = 1\n/, out);
      assert.match(out, /Thread 1 \(vCPU 0\)/, out);
      assert.match(out, /Thread 2 \(vCPU 1\)/, out);
    } finally {
      const code = await vm.stop();
      assert.equal(code, 0, vm.stderr());
    }
  },
});
