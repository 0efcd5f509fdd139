// Machine.snapshot and restoreMachine on a FakeVm (no vCPUs: the device side, guest memory and the files): the
// machine is put back as the snapshot found it (running, paused, devices asleep) or left suspended when asked;
// a refused snapshot (virglrenderer 3D contexts, a directory that cannot be written, a second one at once)
// rejects in one line, writes nothing and leaves the VM running and an earlier snapshot untouched; a restored
// virtio-blk device serves the next request where the saved one left off; restores that do not fit (another
// configuration, a corrupt state file, a writable disk a first restore holds) are refused without changing the
// snapshot's files.

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { EXIT_HOST_ERROR, EXIT_INVALID_ARGS, exitCodeFor } from "../../core/exit.ts";
import { ConfigError } from "../../core/exit.ts";
import type { GuestMemory } from "../../core/memory.ts";
import { VIRTIO_ID_BLOCK, VIRTIO_ID_GPU } from "../../devices/virtio/device.ts";
import { SECTOR_SIZE, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT } from "../../devices/virtio/block/device.ts";
import * as P from "../../devices/virtio/gpu/protocol.ts";
import { restoreMachine } from "../builder.ts";
import { gpuConfig, type VmConfig } from "../config.ts";
import type { Machine } from "../machine.ts";
import { FakeVm } from "../../test/support/fake_vm.ts";
import {
  blkHeader,
  busDriver,
  busTransport,
  diskImage,
  fakeMachine,
  fakeMachineConfig,
  QUIET,
  slotOf,
} from "../../test/support/fake_machine.ts";
import { cmd, ctxCreate } from "../../test/support/gpu_commands.ts";
import { VirtioTestDriver } from "../../test/support/virtio_driver.ts";
import { readSnapshot, SnapshotError } from "./format.ts";

/** The sector the tests write and read. */
const DATA_SECTOR = 3;
/** How long a test waits to see that a held notification is not served (it is served at once once awake). */
const HELD_WAIT_MS = 300;

const PATTERN = new Uint8Array(2 * SECTOR_SIZE).map((_, i) => (0x5a ^ (i * 3)) & 0xff);

/** The test machine, its control socket in `dir`. */
function config(dir: string, extra: Partial<VmConfig> = {}): Promise<VmConfig> {
  return fakeMachineConfig({ socket: `${dir}/vm.sock`, ...extra });
}

/**
 * The driver `drv` carried over to a machine restored from a snapshot of its machine: its rings and buffers
 * are at the same guest addresses in the restored memory, and its bookkeeping (next index, last used index,
 * free descriptors) is what it was when the snapshot was taken.
 */
function restoredDriver(drv: VirtioTestDriver, machine: Machine, vm: FakeVm, slot: number): VirtioTestDriver {
  const d = new VirtioTestDriver(busTransport(machine, vm, slot), machine.memory, drv.alloc);
  drv.queues.forEach((q, i) => {
    (q as unknown as { mem: GuestMemory }).mem = machine.memory;
    d.queues[i] = q;
  });
  return d;
}

/** Submits a block request on queue 0 and kicks; the chain's buffers (header, data, status). */
function submitBlock(drv: VirtioTestDriver, type: number, data: Uint8Array | number) {
  const q = drv.queues[0];
  q.setUsedEvent(q.usedIdx()); // as Linux's virtqueue_enable_cb: interrupt at the next used entry
  const sub = q.submit([blkHeader(type, DATA_SECTOR), data, 1]);
  drv.kick(0);
  return sub;
}

/** Waits for the request's interrupt; checks it completed with VIRTIO_BLK_S_OK; returns its data buffer's bytes. */
async function completes(
  machine: Machine,
  vm: FakeVm,
  drv: VirtioTestDriver,
  sub: ReturnType<typeof submitBlock>,
  what: string,
): Promise<Uint8Array> {
  const irq = machine.devices.virtio[slotOf(machine, VIRTIO_ID_BLOCK)].irq;
  assert.ok((await vm.waitIrq(irq)) > 0n, `${what}: the completion's interrupt`);
  drv.ackInterrupt();
  assert.equal(drv.queues[0].used().length, 1, `${what}: one used entry`);
  const [, data, status] = sub.buffers;
  assert.equal(machine.memory.getU8(status.addr), VIRTIO_BLK_S_OK, `${what}: status OK`);
  return machine.memory.read(data.addr, data.len);
}

/** A read of the data sector, which must complete with PATTERN. */
async function readBack(machine: Machine, vm: FakeVm, drv: VirtioTestDriver, what: string): Promise<void> {
  const sub = submitBlock(drv, VIRTIO_BLK_T_IN, PATTERN.length);
  assert.deepEqual(await completes(machine, vm, drv, sub, what), PATTERN, `${what}: the data`);
}

/** A read the devices hold (they sleep): no interrupt, nothing used, until `wake` is called; then it completes. */
async function heldUntil(
  machine: Machine,
  vm: FakeVm,
  drv: VirtioTestDriver,
  wake: () => void,
  what: string,
): Promise<void> {
  const q = drv.queues[0];
  const before = q.usedIdx();
  const sub = submitBlock(drv, VIRTIO_BLK_T_IN, PATTERN.length);
  const irq = machine.devices.virtio[slotOf(machine, VIRTIO_ID_BLOCK)].irq;
  assert.equal(await vm.waitIrq(irq, HELD_WAIT_MS), 0n, `${what}: the devices sleep: no completion`);
  assert.equal(q.usedIdx(), before, `${what}: nothing used while asleep`);
  wake();
  assert.deepEqual(await completes(machine, vm, drv, sub, `${what}, woken`), PATTERN);
}

/** A machine on a FakeVm with one writable disk, started, its driver set up, PATTERN written to the disk. */
async function blockRig(dir: string, extra: Partial<VmConfig> = {}) {
  const cfg = await config(dir, { blocks: [await diskImage(`${dir}/disk.img`)], ...extra });
  const { machine, vm } = await fakeMachine(cfg);
  await machine.start(); // the device side: the notify loop
  const slot = slotOf(machine, VIRTIO_ID_BLOCK);
  const drv = busDriver(machine, vm, slot);
  drv.init();
  await completes(machine, vm, drv, submitBlock(drv, VIRTIO_BLK_T_OUT, PATTERN), "the first write");
  return { config: cfg, vm, machine, slot, drv };
}

/** SHA-256 of every file in `dir`, by name. */
function hashes(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const e of Deno.readDirSync(dir)) {
    out[e.name] = e.isFile ? createHash("sha256").update(Deno.readFileSync(`${dir}/${e.name}`)).digest("hex") : "-";
  }
  return out;
}

/** The rejection `e` is one line (no stack, no second line) matching `message`. */
function oneLine(e: unknown, message: RegExp): true {
  assert.ok(e instanceof Error, `an Error, got ${e}`);
  assert.doesNotMatch(e.message, /\n/, "one line");
  assert.match(e.message, message);
  return true;
}

Deno.test("machine snapshot: a running machine runs on, a paused one stays paused, one whose devices sleep stays asleep", async () => {
  const dir = await Deno.makeTempDir();
  const { vm, machine, drv } = await blockRig(dir);
  try {
    await machine.snapshot(`${dir}/running`);
    assert.equal(machine.paused, false, "running: not paused");
    assert.equal(machine.devicesAsleep, false, "running: devices awake");
    await readBack(machine, vm, drv, "running: a request after the snapshot");
    assert.equal(readSnapshot(`${dir}/running`).config.memMiB, 64);

    await machine.pause();
    await machine.snapshot(`${dir}/paused`);
    assert.equal(machine.paused, true, "paused: still paused");
    assert.equal(machine.devicesAsleep, false, "paused: devices awake (only the vCPUs were paused)");
    await readBack(machine, vm, drv, "paused: a request after the snapshot");
    machine.resume();

    await machine.suspendDevices();
    await machine.snapshot(`${dir}/asleep`);
    assert.equal(machine.paused, true, "asleep: still paused");
    assert.equal(machine.devicesAsleep, true, "asleep: devices still asleep");
    await heldUntil(machine, vm, drv, () => machine.resumeDevices(), "asleep");
    assert.equal(machine.paused, false);
  } finally {
    await machine.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("machine snapshot: with resume: false the machine is left suspended, vCPUs paused and devices asleep", async () => {
  const dir = await Deno.makeTempDir();
  const { vm, machine, drv } = await blockRig(dir);
  try {
    await machine.snapshot(`${dir}/kept`, { resume: false });
    assert.equal(machine.paused, true, "paused");
    assert.equal(machine.devicesAsleep, true, "devices asleep");
    await heldUntil(machine, vm, drv, () => machine.resumeDevices(), "left suspended");
    assert.equal(machine.paused, false);
    assert.equal(machine.devicesAsleep, false);
  } finally {
    await machine.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

/** Whether virglrenderer can be loaded here (the reason when not). */
async function virglUnavailable(): Promise<string | undefined> {
  try {
    const { VirglBackend } = await import("../../devices/virtio/gpu/backend_virgl.ts");
    new VirglBackend().close();
    return undefined;
  } catch (e) {
    return (e as Error).message.split("\n")[0];
  }
}
const noVirgl = await virglUnavailable();
if (noVirgl) console.log(`machine_snapshot_test: the virglrenderer case is skipped: ${noVirgl}`);

Deno.test({
  name:
    "machine snapshot: a live virglrenderer 3D context refuses the snapshot in one line, writes nothing, and the VM runs on",
  ignore: noVirgl !== undefined,
  async fn() {
    const dir = await Deno.makeTempDir();
    const { machine, vm } = await fakeMachine(
      await config(dir, { gpu: gpuConfig({ backend: "virglrenderer", hostVisibleWindowSize: 2 ** 30 }) }),
    );
    try {
      await machine.start();
      const slot = slotOf(machine, VIRTIO_ID_GPU);
      const irq = machine.devices.virtio[slot].irq;
      const drv = busDriver(machine, vm, slot);
      drv.init();
      /** Sends `command` on the control queue; the response type. */
      const control = async (command: Uint8Array, what: string): Promise<number> => {
        const q = drv.queues[0];
        q.setUsedEvent(q.usedIdx());
        const sub = q.submit([command, P.HDR_SIZE]);
        drv.kick(0);
        assert.ok((await vm.waitIrq(irq)) > 0n, `${what}: answered`);
        drv.ackInterrupt();
        assert.equal(q.used().length, 1);
        return machine.memory.getU32(sub.buffers[1].addr + P.HDR_TYPE);
      };
      assert.equal(await control(ctxCreate(1), "CTX_CREATE"), P.RESP_OK_NODATA);

      const snap = `${dir}/snap`;
      await Deno.mkdir(snap);
      await assert.rejects(machine.snapshot(snap), (e) => oneLine(e, /3D contexts/));
      assert.deepEqual([...Deno.readDirSync(snap)], [], "nothing written, not even a temporary");
      assert.deepEqual([...Deno.readDirSync(dir)].map((e) => e.name).sort(), ["snap"], "nor beside it");
      assert.equal(machine.paused, false, "the VM runs on");
      assert.equal(machine.devicesAsleep, false, "its devices are awake");
      // The GPU serves the guest again: it destroys the context, and then the snapshot is taken.
      assert.equal(await control(cmd(P.CMD_CTX_DESTROY, [], { ctxId: 1 }), "CTX_DESTROY"), P.RESP_OK_NODATA);
      await machine.snapshot(snap);
      assert.equal(readSnapshot(snap).devices.virtio.some((v) => v.name === "gpu"), true);
    } finally {
      await machine.stop();
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test("machine snapshot: a directory that cannot be written refuses in one line, the VM runs on, an earlier snapshot is untouched", async () => {
  const dir = await Deno.makeTempDir();
  const { vm, machine, drv } = await blockRig(dir);
  try {
    await machine.snapshot(`${dir}/earlier`);
    const before = hashes(`${dir}/earlier`);
    await Deno.writeTextFile(`${dir}/file`, "a regular file\n");
    await assert.rejects(machine.snapshot(`${dir}/file/snap`), (e) => {
      assert.ok(e instanceof SnapshotError, `a SnapshotError, got ${e}`);
      assert.equal(exitCodeFor(e), EXIT_HOST_ERROR);
      return oneLine(e, /^snapshot ".*\/file\/snap": /);
    });
    assert.equal(machine.paused, false, "the VM runs on");
    assert.equal(machine.devicesAsleep, false);
    await readBack(machine, vm, drv, "after the refusal");
    assert.deepEqual(hashes(`${dir}/earlier`), before, "the earlier snapshot is untouched");
    assert.equal(await Deno.readTextFile(`${dir}/file`), "a regular file\n");
  } finally {
    await machine.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("machine snapshot: a second snapshot while one is being taken is refused in one line; the first completes and the VM runs on", async () => {
  const dir = await Deno.makeTempDir();
  const { vm, machine, drv } = await blockRig(dir);
  try {
    const first = machine.snapshot(`${dir}/first`);
    const second = machine.snapshot(`${dir}/second`);
    await assert.rejects(second, (e) => oneLine(e, /already being taken/));
    await first;
    assert.equal(readSnapshot(`${dir}/first`).config.memMiB, 64);
    await assert.rejects(Deno.stat(`${dir}/second`), Deno.errors.NotFound, "the refused one wrote nothing");
    assert.equal(machine.paused, false);
    assert.equal(machine.devicesAsleep, false);
    await readBack(machine, vm, drv, "after both");
    // And once the first is done, another is taken.
    await machine.snapshot(`${dir}/third`);
    assert.equal(machine.paused, false);
  } finally {
    await machine.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("machine snapshot: a resume asked for while the snapshot is being taken (control socket, debugger) is done after the state is saved", async () => {
  const dir = await Deno.makeTempDir();
  const { vm, machine, drv } = await blockRig(dir);
  try {
    // What the machine looked like when its state was saved.
    const seen: { paused: boolean; asleep: boolean }[] = [];
    const save = vm.saveState.bind(vm);
    vm.saveState = () => {
      seen.push({ paused: machine.paused, asleep: machine.devicesAsleep });
      return save();
    };
    const taking = machine.snapshot(`${dir}/a`);
    machine.resume(); // as the control socket's resume or a debugger's continue, arriving during the snapshot
    await taking;
    assert.deepEqual(seen, [{ paused: true, asleep: true }], "the state was saved with the VM suspended");
    assert.equal(machine.paused, false, "then the VM runs");

    await machine.suspendDevices();
    const again = machine.snapshot(`${dir}/b`);
    machine.resumeDevices();
    await again;
    assert.deepEqual(seen[1], { paused: true, asleep: true }, "saved suspended");
    assert.equal(machine.paused, false, "the resume asked for is done afterwards");
    assert.equal(machine.devicesAsleep, false, "devices too");
    await readBack(machine, vm, drv, "after the deferred resume");
  } finally {
    await machine.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("machine restore: a restored virtio-blk device serves the next request; a mismatched configuration or a corrupt state is refused and no file changes", async () => {
  const dir = await Deno.makeTempDir();
  const { config: cfg, vm, machine, slot, drv } = await blockRig(dir);
  const snap = `${dir}/snap`;
  let restored: Machine | undefined;
  try {
    // Two requests served before the snapshot: the used index is 2.
    await readBack(machine, vm, drv, "before the snapshot");
    assert.equal(drv.queues[0].usedIdx(), 2);
    await machine.snapshot(snap);
    await machine.stop(); // its disk lock is released
    const files = hashes(snap);

    const other = new FakeVm();
    for (
      const [given, field] of [
        [{ ...cfg, memMiB: 128 }, /--mem 128/],
        [{ ...cfg, blocks: [] }, /0 --block devices given; the snapshot has 1/],
      ] as [VmConfig, RegExp][]
    ) {
      await assert.rejects(restoreMachine(snap, { vm: other, ...QUIET, config: given }), (e) => {
        assert.ok(e instanceof ConfigError, `a ConfigError, got ${e}`);
        assert.equal(exitCodeFor(e), EXIT_INVALID_ARGS);
        return oneLine(e, field);
      });
    }
    const corrupt = `${dir}/corrupt`;
    await Deno.mkdir(corrupt);
    for (const name of Object.keys(files)) await Deno.copyFile(`${snap}/${name}`, `${corrupt}/${name}`);
    const state = await Deno.readFile(`${corrupt}/state`);
    state[state.length - 20] ^= 0x01; // in the body: the checksum no longer matches
    await Deno.writeFile(`${corrupt}/state`, state);
    const corruptFiles = hashes(corrupt);
    await assert.rejects(restoreMachine(corrupt, { vm: other, ...QUIET }), (e) => {
      assert.ok(e instanceof SnapshotError, `a SnapshotError, got ${e}`);
      assert.equal(exitCodeFor(e), EXIT_HOST_ERROR);
      return oneLine(e, /state": checksum mismatch/);
    });
    assert.deepEqual(hashes(corrupt), corruptFiles, "the corrupt snapshot's files are unchanged");
    assert.equal(other.closed, false, "the refusals came before the VM was used");

    const vm2 = new FakeVm();
    restored = await restoreMachine(snap, { vm: vm2, ...QUIET });
    await restored.start();
    const drv2 = restoredDriver(drv, restored, vm2, slot);
    assert.equal(drv2.queues[0].usedIdx(), 2, "the restored ring's used index");
    await readBack(restored, vm2, drv2, "the restored device's first request");
    assert.equal(drv2.queues[0].usedIdx(), 3, "the next used index");
    assert.deepEqual(hashes(snap), files, "the snapshot's files are unchanged");
  } finally {
    await restored?.stop();
    if (!machine.ended) await machine.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("machine restore: two restores of one snapshot with one writable disk: the second is refused in one line; with the disk read-only both run", async () => {
  const dir = await Deno.makeTempDir();
  const restored: Machine[] = [];
  try {
    const { machine, slot, drv } = await blockRig(dir);
    await machine.snapshot(`${dir}/rw`);
    await machine.stop();
    restored.push(await restoreMachine(`${dir}/rw`, { vm: new FakeVm(), ...QUIET }));
    await assert.rejects(restoreMachine(`${dir}/rw`, { vm: new FakeVm(), ...QUIET }), (e) => {
      assert.equal(exitCodeFor(e), EXIT_HOST_ERROR);
      return oneLine(e, /disk image .*disk\.img is in use/);
    });
    // The refused restore released what it took: once the first ends, the disk can be restored again.
    await restored.pop()!.stop();
    const vm2 = new FakeVm();
    restored.push(await restoreMachine(`${dir}/rw`, { vm: vm2, ...QUIET }));
    await restored[0].start();
    await readBack(restored[0], vm2, restoredDriver(drv, restored[0], vm2, slot), "the restore after the refusal");
    await restored.pop()!.stop();

    // A read-only disk takes a shared lock: two restores hold it together, and both serve a read.
    const ro = `${dir}/ro`;
    await Deno.mkdir(ro);
    const roConfig = await config(ro, { blocks: [await diskImage(`${ro}/disk.img`, true)] });
    const { machine: roMachine, vm: roVm } = await fakeMachine(roConfig);
    await roMachine.start();
    const roDrv = busDriver(roMachine, roVm, slot);
    roDrv.init();
    await roMachine.snapshot(`${ro}/snap`);
    await roMachine.stop();
    for (let i = 0; i < 2; i++) {
      const v = new FakeVm();
      const m = await restoreMachine(`${ro}/snap`, { vm: v, ...QUIET });
      restored.push(m);
      await m.start();
      assert.equal(m.devices.virtio[slot].device.name, "block");
      assert.equal(m.paused, false);
    }
  } finally {
    for (const m of restored) await m.stop();
    await Deno.remove(dir, { recursive: true });
  }
});
