// virtio-mmio version 2 register model, with a fake device that records what the transport does.

import assert from "node:assert/strict";
import {
  type ActivateContext,
  type SharedMemoryRegion,
  VIRTIO_COMMON_FEATURES,
  VIRTIO_F_EVENT_IDX,
  VIRTIO_F_VERSION_1,
  type VirtioDevice,
} from "./device.ts";
import {
  VIRTIO_F_RING_RESET,
  VIRTIO_MMIO_CONFIG,
  VIRTIO_MMIO_CONFIG_GENERATION,
  VIRTIO_MMIO_DEVICE_FEATURES,
  VIRTIO_MMIO_DEVICE_FEATURES_SEL,
  VIRTIO_MMIO_DEVICE_ID,
  VIRTIO_MMIO_DRIVER_FEATURES,
  VIRTIO_MMIO_INT_CONFIG,
  VIRTIO_MMIO_INT_VRING,
  VIRTIO_MMIO_INTERRUPT_ACK,
  VIRTIO_MMIO_INTERRUPT_STATUS,
  VIRTIO_MMIO_MAGIC,
  VIRTIO_MMIO_MAGIC_VALUE,
  VIRTIO_MMIO_QUEUE_DESC_LOW,
  VIRTIO_MMIO_QUEUE_NOTIFY,
  VIRTIO_MMIO_QUEUE_NUM,
  VIRTIO_MMIO_QUEUE_NUM_MAX,
  VIRTIO_MMIO_QUEUE_READY,
  VIRTIO_MMIO_QUEUE_RESET,
  VIRTIO_MMIO_QUEUE_SEL,
  VIRTIO_MMIO_SHM_BASE_HIGH,
  VIRTIO_MMIO_SHM_BASE_LOW,
  VIRTIO_MMIO_SHM_LEN_HIGH,
  VIRTIO_MMIO_SHM_LEN_LOW,
  VIRTIO_MMIO_SHM_SEL,
  VIRTIO_MMIO_STATUS,
  VIRTIO_MMIO_VENDOR_ID,
  VIRTIO_MMIO_VERSION,
  VIRTIO_STATUS_ACKNOWLEDGE,
  VIRTIO_STATUS_DEVICE_NEEDS_RESET,
  VIRTIO_STATUS_DRIVER,
  VIRTIO_STATUS_DRIVER_OK,
  VIRTIO_STATUS_FAILED,
  VIRTIO_STATUS_FEATURES_OK,
  virtioInterruptRegisters,
  VirtioMmioTransport,
} from "./mmio.ts";
import { guestLog } from "../../core/log.ts";
import { decodeState, type DeviceState, encodeState, StateError, type StateValue } from "../../core/state.ts";
import { GuardedGuestMemory, VirtioTestDriver } from "../../test/support/virtio_driver.ts";

const DEVICE_FEATURE_BIT_3 = 1n << 3n;
const FAKE_ID = 42;

class FakeDevice implements VirtioDevice {
  readonly deviceType = FAKE_ID;
  readonly name = "fake";
  readonly queueMaxSizes = [64, 16];
  features = VIRTIO_COMMON_FEATURES | DEVICE_FEATURE_BIT_3;
  config = Uint8Array.from({ length: 12 }, (_, i) => i + 1);
  ctx: ActivateContext | undefined;
  notified: number[] = [];
  resets = 0;
  failActivate = false;
  regions: SharedMemoryRegion[] = [];
  readConfig(offset: number, data: Uint8Array): void {
    data.fill(0);
    data.set(this.config.subarray(offset, offset + data.length));
  }
  writeConfig(offset: number, data: Uint8Array): void {
    this.config.set(data.subarray(0, Math.max(0, this.config.length - offset)), offset);
  }
  activate(ctx: ActivateContext): void {
    if (this.failActivate) throw new Error("backend gone");
    this.ctx = ctx;
  }
  queueNotify(index: number): void {
    this.notified.push(index);
  }
  reset(): void {
    this.resets++;
    this.ctx = undefined;
  }
  sharedMemoryRegions(): SharedMemoryRegion[] {
    return this.regions;
  }
}

function setup(
  shmBase?: (id: number) => number | undefined,
  interruptCell?: { cells: Int32Array; index: number },
) {
  const g = new GuardedGuestMemory([{ start: 0, size: 1024 * 1024 }]);
  const dev = new FakeDevice();
  const irqs = { n: 0 };
  const t = new VirtioMmioTransport(dev, g.mem, { irq: { trigger: () => irqs.n++ }, shmBase, interruptCell });
  const drv = new VirtioTestDriver(t, g.mem, { start: 0x1000, end: 1024 * 1024 });
  const lines: string[] = [];
  const old = guestLog.sink;
  guestLog.sink = (l) => lines.push(l);
  return {
    g,
    dev,
    t,
    drv,
    irqs,
    lines,
    [Symbol.dispose]() {
      guestLog.sink = old;
      assert.ok(g.canaryIntact());
      g.close();
    },
  };
}

Deno.test("identification registers", () => {
  using s = setup();
  assert.equal(s.drv.readReg(VIRTIO_MMIO_MAGIC_VALUE), VIRTIO_MMIO_MAGIC);
  assert.equal(s.drv.readReg(VIRTIO_MMIO_VERSION), 2);
  assert.equal(s.drv.readReg(VIRTIO_MMIO_DEVICE_ID), FAKE_ID);
  assert.notEqual(s.drv.readReg(VIRTIO_MMIO_VENDOR_ID), 0);
  assert.equal(s.lines.length, 0);
});

Deno.test("device features through DeviceFeaturesSel", () => {
  using s = setup();
  s.drv.writeReg(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
  assert.equal(s.drv.readReg(VIRTIO_MMIO_DEVICE_FEATURES), Number(s.dev.features & 0xffff_ffffn));
  s.drv.writeReg(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
  assert.equal(s.drv.readReg(VIRTIO_MMIO_DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
  s.drv.writeReg(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
  assert.equal(s.drv.readReg(VIRTIO_MMIO_DEVICE_FEATURES), 0);
  assert.equal(s.drv.deviceFeatures(), s.dev.features);
});

Deno.test("FEATURES_OK only for a subset of the offer that includes VERSION_1", () => {
  using s = setup();
  const base = VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER;
  const tryFeatures = (f: bigint) => {
    s.drv.writeReg(VIRTIO_MMIO_STATUS, 0);
    s.drv.writeReg(VIRTIO_MMIO_STATUS, base);
    s.drv.writeDriverFeatures(f);
    s.drv.writeReg(VIRTIO_MMIO_STATUS, base | VIRTIO_STATUS_FEATURES_OK);
    return (s.drv.readReg(VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_FEATURES_OK) !== 0;
  };
  assert.equal(tryFeatures(DEVICE_FEATURE_BIT_3), false, "no VERSION_1");
  assert.equal(tryFeatures(VIRTIO_F_VERSION_1 | (1n << 7n)), false, "bit 7 not offered");
  assert.equal(tryFeatures(VIRTIO_F_VERSION_1 | DEVICE_FEATURE_BIT_3), true);
  assert.equal(s.t.ackedFeatures, VIRTIO_F_VERSION_1 | DEVICE_FEATURE_BIT_3);
  // Changing features after FEATURES_OK is ignored.
  s.drv.writeReg(VIRTIO_MMIO_DRIVER_FEATURES, 0);
  assert.equal(s.t.ackedFeatures, VIRTIO_F_VERSION_1 | DEVICE_FEATURE_BIT_3);
  assert.ok(s.lines.length >= 3);
});

Deno.test("queue set-up, validation and DRIVER_OK activation with the enabled queues", () => {
  using s = setup();
  s.drv.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX);
  s.drv.writeReg(VIRTIO_MMIO_QUEUE_SEL, 0);
  assert.equal(s.drv.readReg(VIRTIO_MMIO_QUEUE_NUM_MAX), 64);
  s.drv.writeReg(VIRTIO_MMIO_QUEUE_SEL, 1);
  assert.equal(s.drv.readReg(VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
  s.drv.writeReg(VIRTIO_MMIO_QUEUE_SEL, 2);
  assert.equal(s.drv.readReg(VIRTIO_MMIO_QUEUE_NUM_MAX), 0, "no queue 2");
  // Queue 1 with bad settings stays disabled.
  s.drv.writeReg(VIRTIO_MMIO_QUEUE_SEL, 1);
  for (const [reg, v] of [[VIRTIO_MMIO_QUEUE_NUM, 32], [VIRTIO_MMIO_QUEUE_NUM, 12]]) {
    s.drv.writeReg(reg, v);
    s.drv.writeReg(VIRTIO_MMIO_QUEUE_READY, 1);
    assert.equal(s.drv.readReg(VIRTIO_MMIO_QUEUE_READY), 0, `QueueNum ${v}`);
  }
  s.drv.writeReg(VIRTIO_MMIO_QUEUE_NUM, 16);
  s.drv.writeReg(VIRTIO_MMIO_QUEUE_DESC_LOW, 0x2008); // not 16-aligned
  s.drv.writeReg(VIRTIO_MMIO_QUEUE_READY, 1);
  assert.equal(s.drv.readReg(VIRTIO_MMIO_QUEUE_READY), 0, "misaligned descriptor table");
  s.drv.writeReg(VIRTIO_MMIO_QUEUE_DESC_LOW, 0x2000_0000); // outside guest memory
  s.drv.writeReg(VIRTIO_MMIO_QUEUE_READY, 1);
  assert.equal(s.drv.readReg(VIRTIO_MMIO_QUEUE_READY), 0, "outside guest memory");
  const linesBefore = s.lines.length;
  assert.ok(linesBefore >= 4);
  // Queue 0 set up properly; its registers are then frozen.
  const q0 = s.drv.setupQueue(0, 32);
  assert.equal(s.drv.readReg(VIRTIO_MMIO_QUEUE_READY), 1);
  s.drv.writeReg(VIRTIO_MMIO_QUEUE_NUM, 8);
  assert.equal(s.lines.length, linesBefore + 1, "write while ready is logged and ignored");
  // Notifications before DRIVER_OK do not reach the device yet. A kick of a ready queue (Linux's
  // balloon kicks its stats queue in probe) is kept, once, for activation; others are logged.
  const linesBeforeKicks = s.lines.length;
  s.drv.kick(0);
  s.drv.kick(0);
  s.drv.kick(1);
  assert.deepEqual(s.dev.notified, []);
  assert.equal(s.lines.length, linesBeforeKicks + 1, "only the kick of the unready queue 1 is logged");
  assert.match(s.lines.at(-1)!, /queue 1 before the queue is ready/);
  s.drv.driverOk();
  assert.deepEqual(s.dev.notified, [0], "the early kick of queue 0 is delivered at DRIVER_OK");
  assert.equal(s.drv.readReg(VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_DRIVER_OK, VIRTIO_STATUS_DRIVER_OK);
  const ctx = s.dev.ctx!;
  assert.ok(ctx);
  assert.equal(ctx.queues.length, 2);
  assert.equal(ctx.queues[1], undefined, "queue 1 was never enabled");
  const vq = ctx.queues[0]!;
  assert.equal(vq.size, 32);
  assert.deepEqual(vq.addrs, q0.addrs);
  assert.equal(vq.eventIdx, true);
  assert.equal(ctx.ackedFeatures, VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX);
  // Notify reaches the device for an enabled queue only.
  s.drv.kick(0);
  s.drv.kick(1);
  s.drv.kick(7);
  s.t.notify(0);
  assert.deepEqual(s.dev.notified, [0, 0, 0]);
});

Deno.test("DRIVER_OK without FEATURES_OK and status bits cleared without reset are ignored", () => {
  using s = setup();
  s.drv.writeReg(VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
  s.drv.writeReg(VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_DRIVER_OK);
  assert.equal(s.drv.readReg(VIRTIO_MMIO_STATUS), VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
  assert.equal(s.dev.ctx, undefined);
  s.drv.writeReg(VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE);
  assert.equal(s.drv.readReg(VIRTIO_MMIO_STATUS), VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
  assert.equal(s.lines.length, 2);
});

Deno.test("writing status 0 resets the device and every register", () => {
  using s = setup();
  s.drv.init({ queueSize: 16 });
  s.dev.ctx!.interrupt.signalUsedQueue(0);
  assert.equal(s.t.interruptStatus, VIRTIO_MMIO_INT_VRING);
  const resetsBefore = s.dev.resets;
  s.drv.writeReg(VIRTIO_MMIO_STATUS, 0);
  assert.equal(s.dev.resets, resetsBefore + 1);
  assert.equal(s.drv.readReg(VIRTIO_MMIO_STATUS), 0);
  assert.equal(s.t.interruptStatus, 0);
  assert.equal(s.t.ackedFeatures, 0n);
  assert.equal(s.t.queues, null);
  for (const q of [0, 1]) {
    s.drv.writeReg(VIRTIO_MMIO_QUEUE_SEL, q);
    assert.equal(s.drv.readReg(VIRTIO_MMIO_QUEUE_READY), 0);
  }
  s.drv.kick(0);
  assert.deepEqual(s.dev.notified, []);
  // And it can be brought up again.
  s.drv.init();
  assert.ok(s.dev.ctx);
});

Deno.test("interrupt status, acknowledge and config generation", () => {
  using s = setup();
  s.drv.init();
  const irq = s.dev.ctx!.interrupt;
  const gen0 = s.drv.readReg(VIRTIO_MMIO_CONFIG_GENERATION);
  irq.signalUsedQueue(0);
  assert.equal(s.irqs.n, 1);
  irq.signalConfigChange();
  assert.equal(s.irqs.n, 2);
  assert.equal(s.drv.readReg(VIRTIO_MMIO_CONFIG_GENERATION), gen0 + 1);
  assert.equal(s.drv.readReg(VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
  s.drv.writeReg(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
  assert.equal(s.drv.readReg(VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
  s.drv.writeReg(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_CONFIG);
  assert.equal(s.t.interruptStatus, 0);
  s.t.configChanged();
  assert.equal(s.drv.readReg(VIRTIO_MMIO_CONFIG_GENERATION), gen0 + 2);
});

Deno.test("config space: any width, reads and writes reach the device", () => {
  using s = setup();
  const b1 = new Uint8Array(1);
  s.t.read(VIRTIO_MMIO_CONFIG + 2, b1);
  assert.equal(b1[0], 3);
  const b8 = new Uint8Array(8);
  s.t.read(VIRTIO_MMIO_CONFIG + 4, b8);
  assert.deepEqual([...b8], [5, 6, 7, 8, 9, 10, 11, 12]);
  s.t.write(VIRTIO_MMIO_CONFIG + 1, Uint8Array.of(0x77, 0x66));
  assert.deepEqual([...s.dev.config.subarray(0, 4)], [1, 0x77, 0x66, 4]);
  const past = new Uint8Array(4).fill(9);
  s.t.read(VIRTIO_MMIO_CONFIG + 100, past);
  assert.deepEqual([...past], [0, 0, 0, 0]);
});

Deno.test("bad register accesses read zero, are logged and never throw", () => {
  using s = setup();
  const b2 = new Uint8Array(2).fill(9);
  s.t.read(VIRTIO_MMIO_MAGIC_VALUE, b2);
  assert.deepEqual([...b2], [0, 0]);
  const b4 = new Uint8Array(4).fill(9);
  s.t.read(VIRTIO_MMIO_MAGIC_VALUE + 1, b4);
  assert.deepEqual([...b4], [0, 0, 0, 0]);
  assert.equal(s.drv.readReg(VIRTIO_MMIO_QUEUE_NOTIFY), 0, "write-only register");
  assert.equal(s.drv.readReg(0x0e0), 0, "unknown register");
  s.drv.writeReg(VIRTIO_MMIO_MAGIC_VALUE, 1);
  s.t.write(VIRTIO_MMIO_STATUS, Uint8Array.of(1));
  assert.equal(s.drv.readReg(VIRTIO_MMIO_STATUS), 0, "a byte-wide status write is refused");
  assert.equal(s.lines.length, 6);
  assert.equal(s.t.counters.guestErrors, 6);
});

Deno.test("shared-memory registers: all ones without a region, base and length with one", () => {
  const bases = new Map([[1, 0x1_8000_0000]]);
  using s = setup((id) => bases.get(id));
  const shm = () => [SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH].map((r) => s.drv.readReg(r));
  const SHM_LEN_LOW = VIRTIO_MMIO_SHM_LEN_LOW, SHM_LEN_HIGH = VIRTIO_MMIO_SHM_LEN_HIGH;
  const SHM_BASE_LOW = VIRTIO_MMIO_SHM_BASE_LOW, SHM_BASE_HIGH = VIRTIO_MMIO_SHM_BASE_HIGH;
  const ones = [0xffff_ffff, 0xffff_ffff, 0xffff_ffff, 0xffff_ffff];
  assert.deepEqual(shm(), ones, "device without regions");
  s.dev.regions = [{ id: 1, size: 0x2_0000_0000 }, { id: 2, size: 0x1000 }];
  s.drv.writeReg(VIRTIO_MMIO_SHM_SEL, 1);
  assert.deepEqual(shm(), [0, 2, 0x8000_0000, 1]);
  s.drv.writeReg(VIRTIO_MMIO_SHM_SEL, 2);
  assert.deepEqual(shm(), ones, "region 2 was not placed by the VMM");
  s.drv.writeReg(VIRTIO_MMIO_SHM_SEL, 0);
  assert.deepEqual(shm(), ones, "no region 0");
});

Deno.test("QueueReset: ignored without RING_RESET, resets the selected queue with it", () => {
  using s = setup();
  s.drv.init();
  s.drv.writeReg(VIRTIO_MMIO_QUEUE_SEL, 0);
  s.drv.writeReg(VIRTIO_MMIO_QUEUE_RESET, 1);
  assert.equal(s.drv.readReg(VIRTIO_MMIO_QUEUE_READY), 1, "not negotiated: ignored");
  assert.equal(s.lines.length, 1);
  s.dev.features |= VIRTIO_F_RING_RESET;
  s.drv.init();
  s.drv.writeReg(VIRTIO_MMIO_QUEUE_SEL, 1);
  s.drv.writeReg(VIRTIO_MMIO_QUEUE_RESET, 1);
  assert.equal(s.drv.readReg(VIRTIO_MMIO_QUEUE_RESET), 1);
  assert.equal(s.drv.readReg(VIRTIO_MMIO_QUEUE_READY), 0);
  assert.equal(s.drv.readReg(VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
  s.drv.kick(1);
  assert.deepEqual(s.dev.notified, []);
});

Deno.test("a device that fails to activate sets DEVICE_NEEDS_RESET and raises a config interrupt", () => {
  using s = setup();
  s.dev.failActivate = true;
  s.drv.init();
  const st = s.drv.readReg(VIRTIO_MMIO_STATUS);
  assert.equal(st & VIRTIO_STATUS_DEVICE_NEEDS_RESET, VIRTIO_STATUS_DEVICE_NEEDS_RESET);
  assert.equal(s.t.interruptStatus & VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_CONFIG);
  assert.equal(s.irqs.n, 1);
  s.drv.kick(0);
  assert.deepEqual(s.dev.notified, []);
  // The driver gives up: FAILED is accepted even without repeating the device's NEEDS_RESET bit.
  s.drv.writeReg(VIRTIO_MMIO_STATUS, (st & ~VIRTIO_STATUS_DEVICE_NEEDS_RESET) | VIRTIO_STATUS_FAILED);
  assert.equal(s.drv.readReg(VIRTIO_MMIO_STATUS), st | VIRTIO_STATUS_FAILED);
});

Deno.test("InterruptStatus and InterruptACK as a vCPU answers them: from the shared cell, without the transport", () => {
  // Transport 1 of two at BASES[1], on the VMM's grid of 4 KiB windows; the vCPU side is virtioInterruptRegisters.
  const BASES = [0xd000_0000, 0xd000_1000];
  const WINDOW = 0x1000;
  const cells = new SharedArrayBuffer(BASES.length * 4);
  using s = setup(undefined, { cells: new Int32Array(cells), index: 1 });
  const run = new DataView(new ArrayBuffer(8));
  const vcpu = virtioInterruptRegisters({ cells, bases: BASES, windowSize: WINDOW }, run)!;
  const vcpuRead = (addr: number) => {
    run.setUint32(0, 0xdead, true);
    assert.ok(vcpu(addr, 4, false, 0), `0x${addr.toString(16)} served by the vCPU`);
    return run.getUint32(0, true);
  };
  s.drv.init({ queueSize: 16 });
  const irqsBefore = s.irqs.n;
  s.dev.ctx!.interrupt.signalUsedQueue(0);
  s.dev.ctx!.interrupt.signalConfigChange();
  assert.equal(s.irqs.n, irqsBefore + 2);
  const both = VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG;
  assert.equal(vcpuRead(BASES[1] + VIRTIO_MMIO_INTERRUPT_STATUS), both, "the vCPU sees what the transport raised");
  assert.equal(vcpuRead(BASES[0] + VIRTIO_MMIO_INTERRUPT_STATUS), 0, "the other transport's cell");
  // ACK of the ring bit by the vCPU; the transport (main thread) sees only the config bit left.
  run.setUint32(0, VIRTIO_MMIO_INT_VRING, true);
  assert.ok(vcpu(BASES[1] + VIRTIO_MMIO_INTERRUPT_ACK, 4, true, 0));
  assert.equal(s.t.interruptStatus, VIRTIO_MMIO_INT_CONFIG);
  assert.equal(s.drv.readReg(VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
  // ACK through the transport; the vCPU reads 0.
  s.drv.writeReg(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_CONFIG);
  assert.equal(vcpuRead(BASES[1] + VIRTIO_MMIO_INTERRUPT_STATUS), 0);
  // Everything else goes to the main thread: other registers, other sizes, writes of the status,
  // reads of the ACK, addresses outside the transports.
  assert.equal(vcpu(BASES[1] + VIRTIO_MMIO_STATUS, 4, false, 0), false);
  assert.equal(vcpu(BASES[1] + VIRTIO_MMIO_INTERRUPT_STATUS, 2, false, 0), false);
  assert.equal(vcpu(BASES[1] + VIRTIO_MMIO_INTERRUPT_STATUS, 4, true, 0), false);
  assert.equal(vcpu(BASES[1] + VIRTIO_MMIO_INTERRUPT_ACK, 4, false, 0), false);
  assert.equal(vcpu(0xd000_2000 + VIRTIO_MMIO_INTERRUPT_STATUS, 4, false, 0), false);
  // A reset clears the shared cell too.
  s.dev.ctx!.interrupt.signalUsedQueue(0);
  s.drv.writeReg(VIRTIO_MMIO_STATUS, 0);
  assert.equal(vcpuRead(BASES[1] + VIRTIO_MMIO_INTERRUPT_STATUS), 0);
  assert.equal(
    virtioInterruptRegisters({ cells, bases: [], windowSize: WINDOW }, run),
    undefined,
    "no transports: no fast path",
  );
  // A window between two transports that has none, and the address just below the first: the main thread's.
  const gapped = virtioInterruptRegisters({ cells, bases: [0xd000_0000, 0xd000_2000], windowSize: WINDOW }, run)!;
  assert.equal(gapped(0xd000_1000 + VIRTIO_MMIO_INTERRUPT_STATUS, 4, false, 0), false);
  assert.equal(gapped(0xd000_2000 + VIRTIO_MMIO_INTERRUPT_STATUS, 4, false, 0), true);
  assert.equal(gapped(0xd000_0000 - 4, 4, false, 0), false);
  assert.throws(
    () => virtioInterruptRegisters({ cells, bases: [0xd000_0000, 0xd000_0800], windowSize: WINDOW }, run),
    RangeError,
  );
});

// ---- Saved state ----

/** Registers a driver can read back, per queue and globally. */
function visibleRegisters(drv: VirtioTestDriver, queues: number): number[] {
  const out = [VIRTIO_MMIO_STATUS, VIRTIO_MMIO_INTERRUPT_STATUS, VIRTIO_MMIO_CONFIG_GENERATION].map((r) =>
    drv.readReg(r)
  );
  const sel = drv.readReg(VIRTIO_MMIO_DEVICE_FEATURES);
  for (let i = 0; i < queues; i++) {
    drv.writeReg(VIRTIO_MMIO_QUEUE_SEL, i);
    out.push(drv.readReg(VIRTIO_MMIO_QUEUE_READY), drv.readReg(VIRTIO_MMIO_QUEUE_RESET));
  }
  return [...out, sel];
}

Deno.test("state: a running transport restores into a fresh one; the device continues on the same rings", () => {
  using s = setup();
  s.drv.init({ features: ~DEVICE_FEATURE_BIT_3 });
  const q0 = s.drv.queues[0];
  for (let i = 0; i < 3; i++) {
    const sub = q0.submit([Uint8Array.of(i), 8]);
    const c = s.dev.ctx!.queues[0]!.pop()!;
    assert.equal(c.head, sub.head);
    s.dev.ctx!.queues[0]!.addUsed(c.head, 5);
    s.dev.ctx!.interrupt.signalUsedQueue(0);
  }
  q0.used();
  s.t.configChanged();
  s.drv.writeReg(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
  s.drv.writeReg(VIRTIO_MMIO_SHM_SEL, 3);
  const saved = s.t.saveState();
  const before = visibleRegisters(s.drv, 2);

  const dev2 = new FakeDevice();
  const t2 = new VirtioMmioTransport(dev2, s.g.mem, { irq: { trigger: () => {} } });
  t2.restoreState(decodeState(encodeState(saved)));
  const drv2 = s.drv.attach(t2);
  assert.deepEqual(visibleRegisters(drv2, 2), before);
  assert.deepEqual(t2.saveState(), saved, "the whole register file came back");
  assert.ok(dev2.ctx?.restored, "the device was activated as restored");
  assert.equal(dev2.ctx.ackedFeatures, s.t.ackedFeatures);
  assert.equal(dev2.ctx.ackedFeatures & DEVICE_FEATURE_BIT_3, 0n);
  // The next request is taken from where the first transport stopped and completes at used index 3.
  const sub = q0.submit([Uint8Array.of(9), 8]);
  drv2.kick(0);
  assert.deepEqual(dev2.notified, [0]);
  const rq = dev2.ctx.queues[0]!;
  const c = rq.pop()!;
  assert.equal(c.head, sub.head);
  rq.addUsed(c.head, 7);
  assert.deepEqual(q0.used(), [{ id: sub.head, len: 7 }]);
  assert.equal(q0.usedIdx(), 4);
  assert.equal(drv2.ackInterrupt(), VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
  assert.ok(t2.quiescent());
});

Deno.test("state: a transport saved before DRIVER_OK keeps the early kick and activates later", () => {
  using s = setup();
  s.drv.negotiate();
  s.drv.setupQueue(0);
  s.drv.kick(0); // before DRIVER_OK: held for activation
  const saved = decodeState(encodeState(s.t.saveState()));
  const dev2 = new FakeDevice();
  const t2 = new VirtioMmioTransport(dev2, s.g.mem, { irq: { trigger: () => {} } });
  t2.restoreState(saved);
  assert.equal(dev2.ctx, undefined, "not activated yet");
  const drv2 = s.drv.attach(t2);
  drv2.setupQueue(1);
  drv2.driverOk();
  const ctx = dev2.ctx as ActivateContext | undefined;
  assert.ok(ctx);
  assert.ok(!ctx.restored);
  assert.deepEqual(dev2.notified, [0]);
});

Deno.test("state: a wrong type, version, device or malformed field is refused with StateError", () => {
  using s = setup();
  s.drv.init();
  const good = s.t.saveState();
  const data = good.data as Record<string, StateValue>;
  const queues = data.queues as Record<string, StateValue>[];
  const fresh = () => new VirtioMmioTransport(new FakeDevice(), s.g.mem, { irq: { trigger: () => {} } });
  const bad: [string, DeviceState][] = [
    ["type", { ...good, type: "virtqueue" }],
    ["version", { ...good, version: 0 }],
    ["deviceType", { ...good, data: { ...data, deviceType: 2 } }],
    ["queue count", { ...good, data: { ...data, queues: queues.slice(0, 1) } }],
    ["features not offered", { ...good, data: { ...data, ackedFeatures: "0x100000000ffffffff" } }],
    ["features text", { ...good, data: { ...data, driverFeatures: "12" } }],
    ["status", { ...good, data: { ...data, status: 0x100 } }],
    ["interrupt bits", { ...good, data: { ...data, interruptStatus: 4 } }],
    ["queue size", { ...good, data: { ...data, queues: [{ ...queues[0], num: 128 }, queues[1]] } }],
    ["queue outside memory", { ...good, data: { ...data, queues: [{ ...queues[0], used: 2 ** 40 }, queues[1]] } }],
    ["ring of a disabled queue", { ...good, data: { ...data, queues: [queues[0], { ...queues[1], ready: false }] } }],
    ["ring index", {
      ...good,
      data: {
        ...data,
        queues: [{ ...queues[0], ring: { ...(queues[0].ring as Record<string, StateValue>), data: null } }, queues[1]],
      },
    }],
    ["early notify", { ...good, data: { ...data, earlyNotifies: [7] } }],
    ["selector", { ...good, data: { ...data, queueSel: -1 } }],
  ];
  for (const [what, st] of bad) assert.throws(() => fresh().restoreState(st), StateError, what);
  // A transport a driver already set up is not a restore target.
  assert.throws(() => s.t.restoreState(good), StateError);
  fresh().restoreState(good);
});
