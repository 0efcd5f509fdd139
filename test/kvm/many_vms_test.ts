// A test rig's day: 20 small VMs (the ticker guest, test/guests/ticker.c) started at once in one process,
// each with its own control socket; each is driven (half are told to quit on their console, the rest are
// stopped through their control socket) and afterwards nothing is left behind: no socket file, no vCPU
// thread beyond the idle Workers the pool keeps (vmm/kvm/worker_pool.ts: at most IDLE_VCPU_WORKERS_MAX, gone
// once closed), no file descriptor, no child process.
//
// The VM test needs /dev/kvm and is ignored without it. One test always runs: it builds the guest and
// disassembles it.

import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { buildGuest } from "../guests/build.ts";
import { KERNEL_START, MiB, ramRanges } from "../../vmm/arch/layout.ts";
import { REPLY_OK } from "../../vmm/control/protocol.ts";
import { ControlClient } from "../../vmm/control/client.ts";
import { loadKernel } from "../../vmm/arch/boot/kernel.ts";
import { OwnedGuestMemory } from "../../core/memory.ts";
import { EXIT_SUCCESS } from "../../core/exit.ts";
import { type BootConfig, closeIdleVcpuWorkers, IDLE_VCPU_WORKERS_MAX, vcpuWorkerPoolStats, Vm } from "../../mod.ts";
import { within as withinMs } from "../support/within.ts";

const kvmAvailable = existsSync("/dev/kvm");
if (!kvmAvailable) console.log("kvm_many_vms_test: 20-VM test skipped: no /dev/kvm");

/** How many VMs the rig runs at once. */
const VM_COUNT = 20;
/** Guest memory per VM: the ticker guest needs almost none. */
const VM_MEM_MIB = 32;
/** Hang protection only: no assertion depends on how fast anything is. */
const GUEST_TIMEOUT_MS = 180_000;
/**
 * vCPU threads and sockets must be gone this soon after the last exit code settled. A Worker's thread
 * ends after it reported its end, asynchronously; in the nested KVM host (TCG, 20 VMs on one emulated
 * CPU) one took longer than a second. A leak never goes away, so a longer wait hides none.
 */
const SETTLE_MS = 10_000;
/**
 * Descriptors the runtime may open lazily and keep (e.g. a timer or epoll instance on first use by a
 * code path); anything per VM (KVM, vCPU, eventfd, memfd, socket: several per VM) would exceed it.
 */
const FD_SLACK = 4;
/** Deno names a Web Worker's OS thread "worker-N": each vCPU runs on one, and so does each control socket's poll. */
const WORKER_THREAD = /^worker-\d+$/;
/** Worker threads of a one-vCPU VM with a control socket: its vCPU and the control server's poll thread. */
const WORKERS_PER_VM = 2;
/**
 * vCPU Workers that wait in the pool once every VM has ended: each VM's vCPU ended normally and gave its
 * Worker back, and the pool keeps at most IDLE_VCPU_WORKERS_MAX (it terminates the rest).
 */
const POOLED_AFTER = Math.min(VM_COUNT, IDLE_VCPU_WORKERS_MAX);
/**
 * tokio's blocking pool threads (comm truncated to 15 characters): the runtime runs blocking and
 * nonblocking-FFI calls there and retires idle ones after its own keep-alive (10 s), so they are the
 * runtime's, not something a VM can leak.
 */
const RUNTIME_POOL_THREAD = "tokio-runtime-w";

const within = <T>(p: Promise<T>, what: () => string): Promise<T> => withinMs(p, what, GUEST_TIMEOUT_MS);

/** Polls `check` until it returns true or `ms` pass; then fails with `what()`. */
async function eventually(ms: number, check: () => boolean, what: () => string): Promise<void> {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() >= deadline) assert.fail(what());
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** comm of every thread of this process. */
function threadNames(): string[] {
  const names: string[] = [];
  for (const t of Deno.readDirSync("/proc/self/task")) {
    try {
      names.push(Deno.readTextFileSync(`/proc/self/task/${t.name}/comm`).trim());
    } catch {
      // the thread ended while we looked
    }
  }
  return names.sort();
}

function workerThreads(): number {
  return threadNames().filter((n) => WORKER_THREAD.test(n)).length;
}

/** Threads except the runtime's blocking pool. */
function ownThreads(): string[] {
  return threadNames().filter((n) => n !== RUNTIME_POOL_THREAD);
}

function fdCount(): number {
  return [...Deno.readDirSync("/proc/self/fd")].length;
}

/** Process ids whose parent is this process (from /proc/PID/stat: "pid (comm) state ppid ..."). */
function childPids(): number[] {
  const kids: number[] = [];
  for (const e of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(e.name)) continue;
    let stat: string;
    try {
      stat = Deno.readTextFileSync(`/proc/${e.name}/stat`);
    } catch {
      continue; // exited meanwhile
    }
    // comm may contain spaces and parentheses: the fields after it start after the last ")".
    const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
    if (ppid === Deno.pid) kids.push(Number(e.name));
  }
  return kids.sort((a, b) => a - b);
}

function bootConfig(kernel: string, socket: string): BootConfig {
  return { kernel, socket, debugExit: true, params: [], memMiB: VM_MEM_MIB, cpus: 1 };
}

Deno.test({
  name: `kvm many VMs: ${VM_COUNT} ticker VMs at once, each driven and stopped, nothing left behind`,
  ignore: !kvmAvailable,
  async fn() {
    const kernel = await buildGuest("ticker");
    const dir = await Deno.makeTempDir({ prefix: "denovm-many-" });
    try {
      // One VM first: process-wide things set up once on first use (the libc and KVM bindings, the vCPU
      // kick signal handler) are not per-VM leaks; the baseline is taken after them.
      {
        await using warm = await Vm.boot(bootConfig(kernel, `${dir}/warm.sock`));
        await warm.console.waitFor(/^TICK 1\r?\n/m, { timeout: GUEST_TIMEOUT_MS });
        assert.equal(await warm.stop(), EXIT_SUCCESS);
      }
      await eventually(SETTLE_MS * 5, () => [...Deno.readDirSync(dir)].length === 0, () => "warm-up socket left");
      // The warm-up VM's vCPU Worker waits in the pool: the baseline is taken with the pool empty.
      assert.equal(vcpuWorkerPoolStats().idle, 1, "the warm-up VM's Worker went back to the pool");
      closeIdleVcpuWorkers();
      await eventually(SETTLE_MS * 5, () => workerThreads() === 0, () => `warm-up Worker threads: ${threadNames()}`);
      const before = { threads: ownThreads(), workers: workerThreads(), fds: fdCount(), children: childPids() };

      const sockets = Array.from({ length: VM_COUNT }, (_, i) => `${dir}/vm${i}.sock`);
      const booted = await Promise.allSettled(sockets.map((s) => Vm.boot(bootConfig(kernel, s))));
      const vms = booted.flatMap((b) => b.status === "fulfilled" ? [b.value] : []);
      try {
        const failed = booted.flatMap((b, i) => b.status === "rejected" ? [`vm${i}: ${b.reason}`] : []);
        assert.deepEqual(failed, [], "every VM boots");
        assert.equal(workerThreads(), before.workers + VM_COUNT * WORKERS_PER_VM, "a vCPU and a poll thread per VM");
        for (const s of sockets) assert.ok(Deno.lstatSync(s).isSocket, `${s} is served`);

        // Every VM runs its own guest: each reaches its tenth TICK line.
        await within(
          Promise.all(vms.map((vm) => vm.console.waitFor(/^TICK 10\r?\n/m, { timeout: GUEST_TIMEOUT_MS }))),
          () => "the VMs did not all reach TICK 10",
        );

        // Drive each: even ones get 'q' on their console (the guest powers off), odd ones are stopped
        // through their own control socket.
        const replies = await within(
          Promise.all(vms.map(async (vm, i) => {
            if (i % 2 === 0) {
              vm.send("q");
              await vm.console.waitFor(/^BYE\r?\n/m, { timeout: GUEST_TIMEOUT_MS });
              return undefined;
            }
            using client = ControlClient.connect(sockets[i]);
            return await client.request("Exit");
          })),
          () => "driving the VMs",
        );
        replies.forEach((r, i) => {
          if (i % 2 === 1) assert.equal(r, REPLY_OK, `vm${i}: reply to "Exit"`);
        });

        const codes = await within(Promise.all(vms.map((vm) => vm.exitCode)), () => "the VMs did not all exit");
        assert.deepEqual(codes, new Array(VM_COUNT).fill(EXIT_SUCCESS), "every exit code is 0");
        vms.forEach((vm, i) => {
          if (i % 2 === 0) assert.match(vm.exitReason, /ACPI S5/, `vm${i} powered itself off`);
          else {
            assert.match(vm.exitReason, /stopped by the host/, `vm${i} was stopped`);
            // Input went only to the VM it was sent to.
            assert.ok(!vm.console.text.includes("BYE"), `vm${i} saw another VM's 'q'`);
          }
        });
      } finally {
        // A failed assertion above must not leave VMs running (stop() of an ended VM just returns its code).
        await Promise.all(vms.map((vm) => vm.stop()));
      }

      // Nothing left behind.
      await eventually(
        SETTLE_MS,
        () => [...Deno.readDirSync(dir)].length === 0,
        () => `files left in ${dir}: ${[...Deno.readDirSync(dir)].map((e) => e.name)}`,
      );
      // The pool keeps POOLED_AFTER of the 20 vCPU Workers waiting; the other vCPU Workers and every poll
      // thread end. Closing the pool's idle Workers ends the rest.
      assert.equal(vcpuWorkerPoolStats().idle, POOLED_AFTER, "idle vCPU Workers in the pool");
      await eventually(
        SETTLE_MS,
        () => workerThreads() === before.workers + POOLED_AFTER,
        () => `Worker threads: ${workerThreads() - before.workers} beyond the baseline, ${POOLED_AFTER} pooled`,
      );
      assert.equal(closeIdleVcpuWorkers(), POOLED_AFTER);
      await eventually(
        SETTLE_MS,
        () => workerThreads() === before.workers,
        () => `Worker threads left: ${workerThreads() - before.workers}`,
      );
      await eventually(
        SETTLE_MS,
        () => ownThreads().length === before.threads.length,
        () => `threads before: ${before.threads.join(",")}\nthreads now: ${ownThreads().join(",")}`,
      );
      await eventually(
        SETTLE_MS,
        () => fdCount() <= before.fds + FD_SLACK,
        () => `file descriptors: ${before.fds} before, ${fdCount()} now`,
      );
      assert.deepEqual(childPids(), before.children, "no child processes left");
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

// ---- Always runs: the ticker guest builds, loads, and uses no unemulated instructions ----

/** Instructions that must stay out of the test guests (test/kvm/boot_test.ts). */
const FORBIDDEN = /\b(cmpxchg16b|xsave\w*|xrstor\w*|fxsave\w*|fxrstor\w*|int3)\b|%[xyz]mm\d+|\(bad\)/;

Deno.test("many-VMs guest (ticker) builds, loads at KERNEL_START within 32 MiB, and disassembles cleanly", async () => {
  const path = await buildGuest("ticker");
  const image = await Deno.readFile(path);
  // The VMM's loader places it in a VM as small as the rig's.
  using mem = OwnedGuestMemory.allocate(ramRanges(VM_MEM_MIB * MiB));
  const info = loadKernel(mem, image);
  assert.equal(info.kind, "elf");
  assert.equal(info.entry, KERNEL_START);
  assert.ok(info.loadEnd <= VM_MEM_MIB * MiB, `loaded up to 0x${info.loadEnd.toString(16)}`);

  const out = await new Deno.Command("objdump", { args: ["-d", "--no-show-raw-insn", path], stdout: "piped" }).output();
  assert.ok(out.success, `objdump -d ${path}`);
  const asm = new TextDecoder().decode(out.stdout);
  assert.deepEqual(asm.split("\n").filter((l) => FORBIDDEN.test(l)), [], "instructions the emulator lacks");
  assert.match(asm, /<_start>:/);
  // Idle between ticks is "sti; hlt", not a busy loop: 20 of them must not eat the host.
  assert.match(asm, /<guest_main>:[\s\S]*?\bsti\b\s*\n[^\n]*\bhlt\b/, '"sti; hlt" idle loop');
});
