// The library's snapshot calls on KVM with the ticker guest (test/guests/ticker.c: "TICK n" ten times a
// second, n counting up from 1 in guest memory; 'q' on COM1 prints BYE and powers off): vm.snapshot,
// Vm.restore and VmTemplate. A restored VM must go on counting from where the snapshot was (a VM that booted
// afresh would print its TICKER banner and TICK 1), with a console log that starts empty, and clones of one
// template must run at once, each on its own.
//
// The tests need /dev/kvm.

import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { buildGuest } from "../guests/build.ts";
import { readSnapshot } from "../../vmm/snapshot/format.ts";
import { EXIT_SUCCESS, HostError } from "../../core/exit.ts";
import {
  type BootConfig,
  closeIdleVcpuWorkers,
  ConsoleTimeoutError,
  vcpuWorkerPoolStats,
  Vm,
  VmTemplate,
} from "../../mod.ts";
import { within as withinMs } from "../support/within.ts";
import { withTempDir } from "../support/temp_dir.ts";

/** Hang protection only: no assertion depends on how fast anything is. */
const GUEST_TIMEOUT_MS = 120_000;
/** Guest memory: the ticker guest needs almost none. */
const VM_MEM_MIB = 32;
/** How long a suspended VM is watched for output it must not produce (it cannot tick while suspended). */
const SUSPENDED_WATCH_MS = 500;
/** How long VmTemplate.boot waits for a marker that never comes. */
const MISSING_MARKER_WAIT_MS = 2000;
/** The ticker's first line after boot; a restored VM never prints it. */
const BANNER = /^TICKER /m;
const TICK_LINE = /^TICK (\d+)\r?$/gm;

const kvmAvailable = existsSync("/dev/kvm");
if (!kvmAvailable) console.log("kvm_snapshot_library_test: skipped: no /dev/kvm");

const within = <T>(p: Promise<T>, what: () => string): Promise<T> => withinMs(p, what, GUEST_TIMEOUT_MS);

async function tickerConfig(): Promise<BootConfig> {
  return { kernel: await buildGuest("ticker"), memMiB: VM_MEM_MIB, cpus: 1, params: [] };
}

/** The TICK numbers in `vm`'s console log so far, in order. */
function ticks(vm: Vm): number[] {
  return [...vm.console.text.matchAll(TICK_LINE)].map((m) => Number(m[1]));
}

/** Wait for TICK `n` or a later one (a VM that had ticks pile up prints several lines at once). */
async function waitForTick(vm: Vm, n: number): Promise<void> {
  await within(
    (async () => {
      while (!ticks(vm).some((t) => t >= n)) {
        if (vm.exitReason) throw new Error(`the VM ended: ${vm.exitReason}`);
        await new Promise((r) => setTimeout(r, 20));
      }
    })(),
    () => `no TICK ${n}; console:\n${vm.console.text}`,
  );
}

/** `vm` went on from a snapshot taken after TICK `atLeast`: no banner, no earlier tick, and it ticks on. */
async function assertContinues(vm: Vm, atLeast: number, what: string): Promise<number> {
  await vm.console.waitFor(/^TICK \d+\r?$/m, { timeout: GUEST_TIMEOUT_MS, from: 0 });
  const first = ticks(vm)[0];
  assert.ok(first > atLeast, `${what}: first line TICK ${first}, the snapshot was after TICK ${atLeast}`);
  assert.doesNotMatch(vm.console.text, BANNER, `${what} booted afresh`);
  await waitForTick(vm, first + 1);
  return first;
}

/** Type 'q': the ticker says BYE and powers off. */
async function quit(vm: Vm): Promise<void> {
  vm.send("q");
  await vm.console.waitFor(/^BYE\r?$/m, { timeout: GUEST_TIMEOUT_MS });
  assert.equal(await within(vm.exitCode, () => "the VM did not power off"), EXIT_SUCCESS);
}

/** A test named "kvm: library snapshot: `name`", ignored without KVM, whose `body` gets a new temporary directory. */
function tempDirTest(name: string, body: (dir: string) => Promise<void>): void {
  Deno.test({
    name: `kvm: library snapshot: ${name}`,
    ignore: !kvmAvailable,
    fn: () => withTempDir("denovm-snap-lib-", body),
  });
}

tempDirTest(
  "Vm.restore goes on from where vm.snapshot was, with an empty console, beside the original",
  async (dir) => {
    await using original = await Vm.boot(await tickerConfig());
    await waitForTick(original, 3);
    await original.snapshot(dir);
    const atSnapshot = Math.max(...ticks(original));
    // resume defaults to true: the original runs on.
    await waitForTick(original, atSnapshot + 2);
    assert.ok(existsSync(readSnapshot(dir).memoryPath), "the snapshot's files");

    await using restored = await Vm.restore(dir);
    await assertContinues(restored, 2, "the restored VM");
    // Each has its own console: 'q' to the restored VM ends it only.
    await quit(restored);
    const originalNow = Math.max(...ticks(original));
    await waitForTick(original, originalNow + 1);
    assert.doesNotMatch(original.console.text, /BYE/, "the original saw the restored VM's input");
    assert.equal(await original.stop(), EXIT_SUCCESS);
  },
);

tempDirTest("resume: false leaves the VM suspended until vm.resume(); paused: true restores it so", async (dir) => {
  await using vm = await Vm.boot(await tickerConfig());
  await waitForTick(vm, 2);
  await vm.snapshot(dir, { resume: false });
  const suspendedAt = vm.console.text.length;
  await new Promise((r) => setTimeout(r, SUSPENDED_WATCH_MS));
  assert.equal(vm.console.text.length, suspendedAt, "a suspended VM printed");
  vm.resume();
  await waitForTick(vm, Math.max(...ticks(vm)) + 1);
  assert.equal(await vm.stop(), EXIT_SUCCESS);

  await using restored = await Vm.restore(dir, { paused: true });
  await new Promise((r) => setTimeout(r, SUSPENDED_WATCH_MS));
  assert.equal(restored.console.text, "", "a VM restored paused printed");
  restored.resume();
  await assertContinues(restored, 1, "the VM restored paused");
  assert.equal(await restored.stop(), EXIT_SUCCESS);
});

Deno.test({
  name: "kvm: library snapshot: VmTemplate clones run at once, each from the template's point, each on its own",
  ignore: !kvmAvailable,
  async fn() {
    const template = await VmTemplate.boot(await tickerConfig(), { until: /^TICK 2\r?$/m, timeout: GUEST_TIMEOUT_MS });
    const clones: Vm[] = [];
    try {
      assert.ok(existsSync(`${template.path}/state`), "the template's snapshot");
      // The template VM has ended and its vCPU Worker waits in the pool: the first clone creates no Worker.
      const created = vcpuWorkerPoolStats().created;
      clones.push(await template.clone());
      assert.equal(vcpuWorkerPoolStats().created, created, "Workers created for the first clone");
      clones.push(...await Promise.all([template.clone(), template.clone()]));
      for (const [i, vm] of clones.entries()) await assertContinues(vm, 1, `clone ${i}`);

      await quit(clones[0]);
      // The template's snapshot directory goes; the clones still running keep their memory and run on.
      await template.close();
      assert.ok(!existsSync(template.path), "close() removes the snapshot directory it made");
      await assert.rejects(template.clone(), /closed/);
      for (const vm of clones.slice(1)) {
        await waitForTick(vm, Math.max(...ticks(vm)) + 2);
        assert.doesNotMatch(vm.console.text, /BYE/, "a clone saw another clone's input");
        assert.equal(await vm.stop(), EXIT_SUCCESS);
      }
    } finally {
      for (const vm of clones) await vm.stop();
      await template.close();
    }
  },
});

tempDirTest("a VmTemplate given a snapshotDir keeps it on close", async (dir) => {
  const snapshotDir = `${dir}/template`;
  const template = await VmTemplate.boot(await tickerConfig(), {
    until: /^TICK 1\r?$/m,
    timeout: GUEST_TIMEOUT_MS,
    snapshotDir,
  });
  assert.equal(template.path, snapshotDir);
  await template.close();
  assert.ok(existsSync(readSnapshot(snapshotDir).memoryPath), "the snapshot stays");
  await using vm = await Vm.restore(snapshotDir);
  await assertContinues(vm, 0, "a VM restored from the kept snapshot");
});

tempDirTest("Vm.restore of a directory without a snapshot rejects with one host-error line naming it", async (dir) => {
  await assert.rejects(
    Vm.restore(dir),
    (e: Error) => e instanceof HostError && e.message.includes(dir) && !e.message.includes("\n"),
  );
});

/** The temporary directories VmTemplate made and has not removed (it names them denovm-template-*). */
function templateDirs(): string[] {
  const tmp = Deno.env.get("TMPDIR") ?? "/tmp";
  return [...Deno.readDirSync(tmp)].map((e) => e.name).filter((n) => n.startsWith("denovm-template-")).sort();
}

Deno.test({
  name: "kvm: library snapshot: VmTemplate.boot whose marker never appears stops its VM and removes its directory",
  ignore: !kvmAvailable,
  async fn() {
    closeIdleVcpuWorkers();
    const before = templateDirs();
    await assert.rejects(
      VmTemplate.boot(await tickerConfig(), { until: /^NEVER PRINTED$/m, timeout: MISSING_MARKER_WAIT_MS }),
      (e: Error) => e instanceof ConsoleTimeoutError && /NEVER PRINTED/.test(e.message),
    );
    assert.deepEqual(templateDirs(), before, "a temporary snapshot directory was left");
    // The VM ended normally (stopped): its vCPU's Worker went back to the pool.
    assert.equal(vcpuWorkerPoolStats().idle, 1, "the template VM's vCPU did not end");
  },
});
