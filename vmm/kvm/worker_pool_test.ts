// The vCPU Worker pool (worker_pool.ts) with the real vCPU code on the fake KVM (test/support/fake_kvm.c): a
// second VM takes the first one's Worker (the same OS thread runs its vCPU, no Worker is created), a crashed
// vCPU's Worker is never reused, no more than IDLE_VCPU_WORKERS_MAX stay idle, and a script whose VMs ended
// exits although Workers wait idle.

import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { buildFakeKvm, fakeKvmEnv, type FakeKvmEvent, readFakeKvmLog } from "../../test/support/fake_kvm.ts";
import { buildGuest } from "../../test/guests/build.ts";
import { within as withinMs } from "../../test/support/within.ts";
import { EXIT_SUCCESS, EXIT_VM_CRASH } from "../../core/exit.ts";
import { closeIdleVcpuWorkers, IDLE_VCPU_WORKERS_MAX, prewarmVcpuWorkers, vcpuWorkerPoolStats } from "./worker_pool.ts";

/** Hang protection only: every scenario here ends in well under a second of guest time. */
const HANG_GUARD_MS = 60_000;
/** The debug exit code the fake's "debugexit" guest writes (test/support/fake_kvm.c). */
const FAKE_DEBUG_EXIT_CODE = 7;
/** The most vCPUs the fake KVM gives one VM (fake_kvm.c FAKE_MAX_VCPUS). */
const FAKE_MAX_VCPUS = 8;
/** Polls (10 ms apart) without a change after which the process's Worker threads count as settled. */
const SETTLED_POLLS = 20;
const MOD_TS = new URL("../../mod.ts", import.meta.url).href;

const shim = await buildFakeKvm();
// This process's libc (ffi/libc.ts, opened on first use) is the fake from here on; nothing in this file
// calls libc() before this line (mod.ts is imported below, after it).
for (const [k, v] of Object.entries(fakeKvmEnv(shim, "halt", ""))) Deno.env.set(k, v);
const guest = await buildGuest("boot_info");
const { Vm } = await import("../../mod.ts");
type Vm = Awaited<ReturnType<typeof Vm.boot>>;

const within = <T>(p: Promise<T>, what: () => string): Promise<T> => withinMs(p, what, HANG_GUARD_MS);
const of = (events: FakeKvmEvent[], ev: string) => events.filter((e) => e.ev === ev);

/** Boot the library on the fake playing `script`. */
async function bootFake(script: string, cpus = 1, debugExit = false): Promise<{ vm: Vm; log: string }> {
  const log = await Deno.makeTempFile({ prefix: "fake-kvm-pool-", suffix: ".jsonl" });
  Deno.env.set("DENOVM_FAKE_KVM_SCRIPT", script);
  Deno.env.set("DENOVM_FAKE_KVM_LOG", log);
  return { vm: await Vm.boot({ kernel: guest, cpus, debugExit }), log };
}

/** The OS thread that ran each vCPU of the VM that wrote `log` (the fake logs it on the first KVM_RUN). */
async function runThreads(log: string): Promise<Map<number, number>> {
  const events = await readFakeKvmLog(log);
  await Deno.remove(log);
  return new Map(of(events, "run_thread").map((e) => [e.vcpu as number, e.tid as number]));
}

/** How many vCPUs have entered KVM_RUN so far in the VM that writes `log`. */
function ranVcpus(log: string): number {
  return Deno.readTextFileSync(log).split("\n").filter((l) => l.includes('"ev":"run_thread"')).length;
}

/** This process's threads named like Deno's Worker threads ("worker-N"), by thread id. */
function workerThreads(): Set<string> {
  return new Set(
    [...Deno.readDirSync("/proc/self/task")].filter((t) => {
      try {
        return Deno.readTextFileSync(`/proc/self/task/${t.name}/comm`).startsWith("worker-");
      } catch {
        return false; // the thread ended while we looked
      }
    }).map((t) => t.name),
  );
}

async function eventually(check: () => boolean, what: () => string): Promise<void> {
  await within(
    (async () => {
      while (!check()) await new Promise((r) => setTimeout(r, 10));
    })(),
    what,
  );
}

/** Empty the pool and wait until its threads are gone: each test starts from no idle Worker. */
async function emptyPool(): Promise<Set<string>> {
  closeIdleVcpuWorkers();
  // The terminated Workers' threads end shortly after: wait until the set has not changed for a while.
  let last = "";
  let unchanged = 0;
  await eventually(() => {
    const now = [...workerThreads()].join(",");
    unchanged = now === last ? unchanged + 1 : 0;
    last = now;
    return unchanged >= SETTLED_POLLS;
  }, () => "Worker threads did not settle");
  assert.equal(vcpuWorkerPoolStats().idle, 0);
  return workerThreads();
}

Deno.test("worker pool: the hook that keeps idle Workers from holding the process is found in this Deno", () => {
  // Without it the pool keeps nothing idle (correct, but every test below would fail to see reuse): say so here.
  assert.equal(vcpuWorkerPoolStats().enabled, true, "Deno's Worker reference hook was not found");
});

Deno.test("worker pool: a second VM runs on the first one's Worker thread, and no Worker is created for it", async () => {
  const threadsBefore = await emptyPool();
  const a = await bootFake("poweroff");
  assert.equal(await within(a.vm.exitCode, () => "VM a did not power off"), EXIT_SUCCESS);
  const aThreads = await runThreads(a.log);
  const afterA = vcpuWorkerPoolStats();
  assert.equal(afterA.idle, 1, "VM a's Worker waits in the pool");
  const threadsIdle = workerThreads();
  assert.equal(threadsIdle.size, threadsBefore.size + 1, "one idle Worker thread");

  // A VM whose guest ends through the debug exit port, which its Worker serves itself only when this VM's
  // start message says so: the reused Worker runs with b's settings, not a's.
  const b = await bootFake("debugexit", 1, true);
  assert.equal(workerThreads().size, threadsIdle.size, "no Worker thread created for VM b");
  assert.equal(await within(b.vm.exitCode, () => "VM b did not exit"), FAKE_DEBUG_EXIT_CODE);
  const bThreads = await runThreads(b.log);
  const afterB = vcpuWorkerPoolStats();

  assert.ok(aThreads.get(0), "VM a's vCPU ran");
  assert.equal(bThreads.get(0), aThreads.get(0), "VM b's vCPU ran on VM a's Worker thread");
  assert.equal(afterB.created, afterA.created, "Workers created for VM b");
  assert.equal(afterB.reused, afterA.reused + 1);
  assert.equal(afterB.idle, 1, "and it went back again");
});

Deno.test("worker pool: a crashed vCPU's Worker is not reused: its thread ends and the next VM gets a new one", async () => {
  await emptyPool();
  const a = await bootFake("triple");
  assert.equal(await within(a.vm.exitCode, () => "the triple fault did not end the VM"), EXIT_VM_CRASH);
  const crashed = (await runThreads(a.log)).get(0)!;
  assert.ok(crashed);
  assert.equal(vcpuWorkerPoolStats().idle, 0, "the crashed vCPU's Worker is not in the pool");
  await eventually(() => !existsSync(`/proc/self/task/${crashed}`), () => `thread ${crashed} still exists`);

  const createdBefore = vcpuWorkerPoolStats().created;
  const b = await bootFake("halt");
  await eventually(() => ranVcpus(b.log) === 1, () => "VM b's vCPU did not enter KVM_RUN");
  assert.equal(await b.vm.stop(), EXIT_SUCCESS);
  const fresh = (await runThreads(b.log)).get(0);
  assert.ok(fresh && fresh !== crashed);
  assert.equal(vcpuWorkerPoolStats().created, createdBefore + 1, "a new Worker for the next VM");
});

Deno.test(`worker pool: at most ${IDLE_VCPU_WORKERS_MAX} Workers stay idle; prewarming stops there too`, async () => {
  const threadsBefore = await emptyPool();
  // More vCPUs than the bound, in two VMs (the fake allows FAKE_MAX_VCPUS per VM).
  const cpus = [FAKE_MAX_VCPUS, IDLE_VCPU_WORKERS_MAX + 3 - FAKE_MAX_VCPUS];
  const vms = [];
  for (const n of cpus) vms.push(await bootFake("halt", n));
  try {
    for (const [i, { log }] of vms.entries()) {
      await eventually(() => ranVcpus(log) === cpus[i], () => `VM ${i}: ${ranVcpus(log)} vCPUs entered KVM_RUN`);
    }
    for (const { vm } of vms) assert.equal(await vm.stop(), EXIT_SUCCESS);
    const ran = new Set<number>();
    for (const { log } of vms) for (const tid of (await runThreads(log)).values()) ran.add(tid);
    assert.equal(ran.size, IDLE_VCPU_WORKERS_MAX + 3, "every vCPU ran on a thread of its own");
    assert.equal(vcpuWorkerPoolStats().idle, IDLE_VCPU_WORKERS_MAX);
    await eventually(
      () => workerThreads().size === threadsBefore.size + IDLE_VCPU_WORKERS_MAX,
      () => `${workerThreads().size - threadsBefore.size} Worker threads, ${IDLE_VCPU_WORKERS_MAX} expected`,
    );
    const created = vcpuWorkerPoolStats().created;
    await prewarmVcpuWorkers(IDLE_VCPU_WORKERS_MAX + 5);
    assert.equal(vcpuWorkerPoolStats().idle, IDLE_VCPU_WORKERS_MAX);
    assert.equal(vcpuWorkerPoolStats().created, created, "prewarm created Workers beyond the bound");
    assert.equal(closeIdleVcpuWorkers(), IDLE_VCPU_WORKERS_MAX);
    await eventually(
      () => workerThreads().size === threadsBefore.size,
      () => `Worker threads left after closeIdleVcpuWorkers: ${workerThreads().size - threadsBefore.size}`,
    );
  } finally {
    for (const { vm } of vms) await vm.stop();
  }
});

Deno.test("worker pool: prewarmed Workers have loaded, and a VM's vCPUs take them instead of creating Workers", async () => {
  await emptyPool();
  await prewarmVcpuWorkers(2);
  const prewarmed = vcpuWorkerPoolStats();
  assert.equal(prewarmed.idle, 2);
  const { vm, log } = await bootFake("spin", 2);
  try {
    await vm.console.waitFor(/T/, { timeout: HANG_GUARD_MS });
    // Both vCPUs inside KVM_RUN (a stop before that would end a vCPU that never ran).
    await eventually(() => ranVcpus(log) === 2, () => `${ranVcpus(log)} vCPUs entered KVM_RUN`);
    assert.equal(vcpuWorkerPoolStats().created, prewarmed.created, "Workers created for a 2-vCPU VM");
    assert.equal(vcpuWorkerPoolStats().reused, prewarmed.reused + 2);
  } finally {
    assert.equal(await vm.stop(), EXIT_SUCCESS);
  }
  assert.equal((await runThreads(log)).size, 2, "both vCPUs ran");
  assert.equal(vcpuWorkerPoolStats().idle, 2);
  closeIdleVcpuWorkers();
});

/** A script that runs VMs on the fake and ends without closing the pool; it prints the pool's numbers. */
const EXIT_SCRIPT = `
import { prewarmVcpuWorkers, Vm, vcpuWorkerPoolStats } from ${JSON.stringify(MOD_TS)};
const kernel = Deno.args[0];
if (Deno.args[1] === "prewarm-only") {
  await prewarmVcpuWorkers(3);
} else {
  Deno.env.set("DENOVM_FAKE_KVM_SCRIPT", "poweroff");
  const a = await Vm.boot({ kernel });
  await a.exitCode;
  Deno.env.set("DENOVM_FAKE_KVM_SCRIPT", "halt");
  const b = await Vm.boot({ kernel, cpus: 2 });
  await b.stop();
}
console.log(JSON.stringify(vcpuWorkerPoolStats()));
`;

for (const mode of ["two VMs", "prewarm-only"]) {
  Deno.test(`worker pool: a script whose VMs ended exits by itself with Workers idle (${mode})`, async () => {
    const dir = await Deno.makeTempDir({ prefix: "denovm-pool-exit-" });
    const log = `${dir}/fake.jsonl`;
    try {
      const script = `${dir}/script.ts`;
      await Deno.writeTextFile(script, EXIT_SCRIPT);
      const child = new Deno.Command(Deno.execPath(), {
        args: ["run", "--allow-all", "--no-check", script, guest, mode],
        env: fakeKvmEnv(shim, "halt", log),
        stdin: "null",
        stdout: "piped",
        stderr: "piped",
      }).spawn();
      let killed = false;
      const timer = setTimeout(() => {
        killed = true;
        child.kill("SIGKILL");
      }, HANG_GUARD_MS);
      const out = await child.output();
      clearTimeout(timer);
      const stderr = new TextDecoder().decode(out.stderr);
      assert.ok(!killed, `the script did not exit within ${HANG_GUARD_MS} ms: stderr:\n${stderr}`);
      assert.equal(out.code, 0, stderr);
      const stats = JSON.parse(new TextDecoder().decode(out.stdout).trim());
      if (mode === "prewarm-only") {
        assert.deepEqual([stats.idle, stats.created], [3, 3], "three Workers waited idle when it ended");
      } else {
        // a's Worker ran b's boot vCPU; b's second vCPU got a new one; both went back.
        assert.deepEqual([stats.idle, stats.created, stats.reused], [2, 2, 1]);
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  });
}

// Last in this file: the environment set at the top is process-wide and `deno test` runs the other test
// files in this same process; their subprocesses must see the real host, not the fake KVM.
Deno.test("worker pool: the fake KVM's environment is removed again for the test files that follow", () => {
  closeIdleVcpuWorkers();
  for (const k of Object.keys(fakeKvmEnv(shim, "halt", ""))) Deno.env.delete(k);
  assert.equal(Deno.env.get("DENOVM_LIBC"), undefined);
});
