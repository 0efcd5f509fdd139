// The assembled machine without KVM: buildMachine builds guest memory, firmware
// tables, buses and every virtio device from a VmConfig on a FakeVm that plays KVM's
// part for ioeventfd and irqfd. A test driver then talks to the devices through the
// MMIO bus exactly as a guest would, so the VMM's own wiring (slots, GSIs, notify
// eventfds, irqfds, shared-memory windows, control socket, web display) is exercised.

import assert from "node:assert/strict";
import { BlockDevice } from "../devices/virtio/block/device.ts";
import { VIRTIO_ID_BLOCK, VIRTIO_ID_GPU } from "../devices/virtio/device.ts";
import { SECTOR_SIZE, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT } from "../devices/virtio/block/device.ts";
import { decodePngRgba } from "../devices/virtio/gpu/png.ts";
import { InputDevice } from "../devices/virtio/input/device.ts";
import { gpuConfig, type VmConfig } from "./config.ts";
import { controlCall } from "./control/client.ts";
import {
  ACPI_TABLES_END,
  ACPI_TABLES_START,
  IRQ_ACPI_VMGENID,
  MiB,
  VIRTIO_IRQS,
  VIRTIO_MMIO_SIZE,
  VIRTIO_MMIO_START,
} from "./arch/layout.ts";
import { generationIdHex, readGenerationId } from "./arch/vmgenid.ts";
import type { Machine } from "./machine.ts";
import { gpuStats, screenshot, screenshotTo, startWebDisplay } from "./library/gpu_front.ts";
import { OutputIsInputError } from "./vm_files.ts";
import type { FakeVm } from "../test/support/fake_vm.ts";
import { blkHeader, busDriver, fakeMachine, fakeMachineConfig, slotOf } from "../test/support/fake_machine.ts";

/** The test machine on a FakeVm, its control socket in `dir`. */
async function machineWith(extra: Partial<VmConfig>, dir: string): Promise<{ machine: Machine; vm: FakeVm }> {
  return await fakeMachine(await fakeMachineConfig({ socket: `${dir}/vm.sock`, ...extra }));
}

Deno.test("machine without KVM: devices in order on the MMIO bus, DSDT entries, irqfds and notify ioeventfds", async () => {
  const dir = await Deno.makeTempDir();
  const img = `${dir}/disk.img`;
  await Deno.writeFile(img, new Uint8Array(MiB));
  const { machine, vm } = await machineWith({
    blocks: [{ path: img, ro: false, root: true, sparse: true, blockSize: 512, direct: false }],
    inputs: [{ kind: "keyboard" }],
    agent: true,
    gpu: gpuConfig({ displays: [{ mode: "windowed", width: 64, height: 48 }], hostVisibleWindowSize: 2 ** 30 }),
  }, dir);
  try {
    const names = machine.devices.virtio.map((v) => v.device.name);
    assert.deepEqual(names, ["block", "console", "rng", "balloon", "input", "gpu"]);
    machine.devices.virtio.forEach((v, i) => {
      assert.equal(v.base, VIRTIO_MMIO_START + i * VIRTIO_MMIO_SIZE);
      assert.equal(v.irq, VIRTIO_IRQS[i]);
      assert.equal(vm.irqfds.get(v.irq), v.irqFd, "the device's interrupt is an irqfd on its GSI");
      const notifies = vm.ioeventfds.filter((e) => e.addr === v.base + 0x50);
      assert.deepEqual(notifies.map((e) => e.datamatch), v.device.queueMaxSizes.map((_, q) => q));
    });
    // The kernel command line names the root disk; the DSDT describes every transport.
    assert.match(machine.cmdline, /root=\/dev\/vda rw/);
    const acpi = new TextDecoder("latin1").decode(
      machine.memory.read(ACPI_TABLES_START, ACPI_TABLES_END - ACPI_TABLES_START),
    );
    assert.equal(acpi.split("LNRO0005").length - 1, machine.devices.virtio.length);
    // Guest RAM is one slot; a 2D GPU has no host-visible window, so nothing else is mapped.
    assert.equal(vm.slots.size, 1);
    assert.deepEqual(machine.devices.pio.list().map((r) => r.name).sort(), [
      "COM1",
      "acpi-pm",
      "cmos",
      "i8042",
      "pvpanic",
    ]);
  } finally {
    await machine.stop();
    await Deno.remove(dir, { recursive: true });
  }
  assert.equal(vm.closed, true);
});

Deno.test("machine without KVM: each build writes its own generation ID; changeGenerationId writes a new one, then pulses the GED's interrupt", async () => {
  const dir = await Deno.makeTempDir();
  const first = await machineWith({}, dir);
  const second = await machineWith({ socket: `${dir}/vm2.sock` }, dir);
  try {
    const booted = readGenerationId(first.machine.memory);
    assert.ok(booted.some((b) => b !== 0), "the builder wrote an ID");
    assert.notEqual(generationIdHex(readGenerationId(second.machine.memory)), generationIdHex(booted));
    assert.deepEqual(first.vm.pulses, []);
    // What the guest would read when the interrupt arrives.
    const atPulse: string[] = [];
    const pulse = first.vm.pulseIrq.bind(first.vm);
    first.vm.pulseIrq = (gsi) => {
      atPulse.push(generationIdHex(readGenerationId(first.machine.memory)));
      pulse(gsi);
    };
    const changed = first.machine.changeGenerationId();
    assert.deepEqual(readGenerationId(first.machine.memory), changed, "the new ID is in guest memory");
    assert.notEqual(generationIdHex(changed), generationIdHex(booted));
    assert.deepEqual(first.vm.pulses, [IRQ_ACPI_VMGENID], "then the GED's generation-ID interrupt");
    assert.deepEqual(atPulse, [generationIdHex(changed)], "the ID was written before the interrupt");
  } finally {
    await first.machine.stop();
    await second.machine.stop();
    await Deno.remove(dir, { recursive: true });
  }
  assert.throws(() => first.machine.changeGenerationId(), /the VM has ended/);
});

Deno.test("machine without KVM: a guest driver writes and reads the disk through the bus, kicks via ioeventfd, gets irqfd interrupts", async () => {
  const dir = await Deno.makeTempDir();
  const img = `${dir}/disk.img`;
  const original = new Uint8Array(MiB).map((_, i) => (i * 7) & 0xff);
  await Deno.writeFile(img, original);
  const { machine, vm } = await machineWith({
    blocks: [{ path: img, ro: false, root: false, sparse: true, blockSize: 512, direct: false }],
  }, dir);
  try {
    await machine.start(); // device side only: the notify loop
    const slot = slotOf(machine, VIRTIO_ID_BLOCK);
    assert.ok(machine.devices.virtio[slot].device instanceof BlockDevice);
    const drv = busDriver(machine, vm, slot);
    drv.init();
    const q = drv.queues[0];
    const pattern = new Uint8Array(2 * SECTOR_SIZE).map((_, i) => (0xa5 ^ i) & 0xff);
    q.submit([blkHeader(VIRTIO_BLK_T_OUT, 3), pattern, 1]);
    drv.kick(0);
    assert.ok((await vm.waitIrq(machine.devices.virtio[slot].irq)) > 0n, "completion interrupt through the irqfd");
    drv.ackInterrupt();
    const done = q.used();
    assert.equal(done.length, 1);
    q.setUsedEvent(q.usedIdx()); // as Linux's virtqueue_enable_cb does: interrupt me at the next used entry
    const sub = q.submit([blkHeader(VIRTIO_BLK_T_IN, 3), 2 * SECTOR_SIZE, 1]);
    drv.kick(0);
    assert.ok((await vm.waitIrq(machine.devices.virtio[slot].irq)) > 0n);
    assert.equal(q.used().length, 1);
    const [, data, status] = sub.buffers;
    assert.equal(machine.memory.getU8(status.addr), VIRTIO_BLK_S_OK);
    assert.deepEqual(machine.memory.read(data.addr, data.len), pattern);
    const file = await Deno.readFile(img);
    assert.deepEqual(file.subarray(3 * SECTOR_SIZE, 5 * SECTOR_SIZE), pattern);
    assert.deepEqual(file.subarray(0, 3 * SECTOR_SIZE), original.subarray(0, 3 * SECTOR_SIZE), "nothing else changed");
    assert.equal(machine.stats()["block.writes"], 1);
  } finally {
    await machine.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("machine without KVM: the control socket adjusts the balloon and stops the VM; the socket is removed", async () => {
  const dir = await Deno.makeTempDir();
  const { machine } = await machineWith({}, dir);
  await machine.startControlSocket();
  const sock = `${dir}/vm.sock`;
  assert.equal((await Deno.stat(sock)).mode! & 0o777, 0o600);
  await controlCall(sock, { kind: "balloonAdjust", bytes: 8 * MiB });
  const balloon = machine.devices.virtio.find((v) => v.device.name === "balloon")!.device as unknown as {
    targetPages: number;
  };
  assert.equal(balloon.targetPages, 8 * MiB / 4096);
  await assert.rejects(controlCall(sock, { kind: "diskResize", index: 0, bytes: 4096 }), /no disk 0 \(this VM has 0\)/);
  await controlCall(sock, { kind: "stop" });
  assert.equal(await machine.exitCode, 0);
  await new Promise((r) => setTimeout(r, 50));
  await assert.rejects(Deno.stat(sock), Deno.errors.NotFound);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("machine without KVM: a 2D GPU scanout shows in screenshot(), the web display needs its token, its keys reach the virtio keyboard", async () => {
  const dir = await Deno.makeTempDir();
  const { machine } = await machineWith({
    inputs: [{ kind: "keyboard" }],
    gpu: {
      backend: "2d",
      contextTypes: [],
      displays: [{ mode: "web", width: 32, height: 16, port: 0 }],
      hostVisibleWindowSize: 2 ** 30,
      fixedBlobMapping: false,
      egl: true,
      gles: true,
      glx: false,
      surfaceless: true,
      vulkan: false,
      udmabuf: false,
    },
  }, dir);
  try {
    const gpu = machine.devices.virtio.find((v) => v.device.deviceType === VIRTIO_ID_GPU)!;
    assert.ok(gpu);
    const png = await decodePngRgba(await screenshot(machine));
    assert.deepEqual([png.width, png.height], [32, 16]);
    assert.ok("totals" in (gpuStats(machine) as Record<string, unknown>));
    const url = await startWebDisplay(machine);
    assert.ok(url);
    const ok = await fetch(url!);
    assert.equal(ok.status, 200);
    await ok.body?.cancel();
    const bare = new URL(url!);
    bare.search = "";
    const refused = await fetch(bare, { headers: { cookie: "" } });
    assert.equal(refused.status, 403);
    await refused.body?.cancel();
    // A key typed in the page reaches this machine's virtio keyboard (no driver here: the events wait
    // in the device for the guest's buffers): press and release, each with its SYN_REPORT.
    const keyboard = machine.devices.virtio.map((v) => v.device).find((d) => d instanceof InputDevice) as InputDevice;
    assert.equal(keyboard.pendingEvents, 0);
    const wsUrl = new URL(url!);
    wsUrl.protocol = "ws:";
    wsUrl.pathname = "/ws";
    const ws = new WebSocket(wsUrl);
    try {
      await new Promise((resolve, reject) => {
        ws.onopen = resolve;
        ws.onerror = () => reject(new Error("web display socket refused"));
      });
      ws.send(JSON.stringify({ t: "key", code: "KeyA", down: true }));
      ws.send(JSON.stringify({ t: "key", code: "KeyA", down: false }));
      const deadline = Date.now() + 10_000;
      while (keyboard.pendingEvents < 4 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
      assert.equal(keyboard.pendingEvents, 4);
    } finally {
      ws.close();
    }
  } finally {
    await machine.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("machine without KVM: a screenshot over the VM's disk image is refused, and the disk is unchanged", async () => {
  const dir = await Deno.makeTempDir();
  const img = `${dir}/disk.img`;
  const bytes = new Uint8Array(MiB).map((_, i) => (i * 7 + 3) & 0xff);
  await Deno.writeFile(img, bytes);
  const { machine } = await machineWith({
    blocks: [{ path: img, ro: false, root: false, sparse: true, blockSize: 512, direct: false }],
    gpu: gpuConfig({ displays: [{ mode: "windowed", width: 32, height: 16 }], hostVisibleWindowSize: 2 ** 30 }),
  }, dir);
  try {
    await assert.rejects(
      screenshotTo(machine, img),
      (e: unknown) =>
        e instanceof OutputIsInputError && /^screenshot .*disk\.img is --block .*disk\.img/.test(e.message),
    );
    assert.deepEqual(await Deno.readFile(img), bytes);
    // Anywhere else it is written.
    await screenshotTo(machine, `${dir}/shot.png`);
    assert.ok((await Deno.stat(`${dir}/shot.png`)).size > 0);
  } finally {
    await machine.stop();
    await Deno.remove(dir, { recursive: true });
  }
});
