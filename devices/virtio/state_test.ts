// Device state of virtio-rng, -input, -console and -balloon: each device is driven as a guest would,
// saved with its transport, encoded and decoded, restored into a fresh device on a fresh transport over
// the same guest memory, and the guest's next request is served where the first device stopped.
// (virtio-blk, -net and -vsock have theirs beside their other tests; the queue's and the transport's
// are in queue_test.ts and mmio_test.ts.)

import assert from "node:assert/strict";
import { RngDevice } from "./rng.ts";
import { INPUT_EVENT_SIZE, InputDevice } from "./input/device.ts";
import { CONSOLE_CONFIG_SIZE, ConsoleDevice, portRxQueue, portTxQueue } from "./console.ts";
import {
  BALLOON_CONFIG_SIZE,
  BALLOON_STAT_SIZE,
  BALLOON_STATS_QUEUE,
  BalloonDevice,
  VIRTIO_BALLOON_S_MEMFREE,
} from "./balloon.ts";
import type { VirtioDevice } from "./device.ts";
import { type DeviceState, StateError, type Stateful, type StateValue } from "../../core/state.ts";
import { EV_KEY, EV_LED, EV_SYN, KEY_A, LED_CAPSL } from "./input/codes.ts";
import { GuardedGuestMemory } from "../../test/support/virtio_driver.ts";
import {
  assertRefused,
  captureVirtioLog,
  closeDeviceRig,
  mmioRig,
  saveAndRestore,
  withData,
} from "../../test/support/device_rig.ts";

const MiB = 1024 * 1024;
const GUEST_SIZE = 8 * MiB;

type Dev = VirtioDevice & Stateful;

/** `dev` on a transport over fresh guarded memory, initialised by the test driver. */
function start<D extends Dev>(dev: D) {
  const g = new GuardedGuestMemory([{ start: 0, size: GUEST_SIZE }]);
  const rig = mmioRig(dev, g.mem, GUEST_SIZE);
  rig.drv.init();
  const log = captureVirtioLog();
  return {
    g,
    dev,
    rig,
    [Symbol.dispose]() {
      closeDeviceRig(log, g, dev);
    },
  };
}

/** A restored device cannot take a state again: a driver has activated it. */
function assertActiveRefuses(dev: Dev, state: DeviceState): void {
  assert.throws(() => dev.restoreState(state), StateError);
}

Deno.test("rng state: the next request after a restore completes at the next used index", () => {
  using s = start(new RngDevice());
  const q = s.rig.drv.queues[0];
  for (let i = 0; i < 3; i++) {
    q.submit([32]);
    s.rig.drv.kick(0);
  }
  assert.equal(q.used().length, 3);
  const dev2 = new RngDevice();
  const to = saveAndRestore(s.rig, s.dev, dev2, s.g.mem);
  const sub = to.drv.queues[0].submit([64]);
  to.drv.kick(0);
  assert.deepEqual(q.used(), [{ id: sub.head, len: 64 }]);
  assert.equal(q.usedIdx(), 4);
  assert.equal(dev2.stats().requests, 4);
  assert.equal(dev2.stats().bytes, 3 * 32 + 64);
  assert.ok(dev2.quiescent());
  assertActiveRefuses(dev2, s.dev.saveState());
  const good = s.dev.saveState();
  assertRefused(() => new RngDevice(), good, [
    ["features", withData(good, { features: "0x0" })],
    ["stats", withData(good, { stats: { requests: 1 } })],
  ]);
  dev2.close();
});

Deno.test("input state: pending events, LEDs, config selection and touch contacts carry over", () => {
  using s = start(new InputDevice({ kind: "keyboard" }));
  const drv = s.rig.drv;
  // Two events delivered, the rest of the batch waits for buffers.
  const evq = drv.queues[0];
  for (let i = 0; i < 2; i++) evq.submit([INPUT_EVENT_SIZE]);
  drv.kick(0);
  assert.ok(s.dev.sendKey(KEY_A, true)); // EV_KEY + SYN
  assert.ok(s.dev.sendKey(KEY_A, false));
  assert.equal(evq.used().length, 2);
  assert.equal(s.dev.pendingEvents, 2);
  // The guest set CAPS LOCK and selected a config field.
  const led = new Uint8Array(INPUT_EVENT_SIZE);
  new DataView(led.buffer).setUint16(0, EV_LED, true);
  new DataView(led.buffer).setUint16(2, LED_CAPSL, true);
  new DataView(led.buffer).setInt32(4, 1, true);
  drv.queues[1].submit([led]);
  drv.kick(1);
  s.rig.t.write(0x100, Uint8Array.of(0x11)); // select EV_BITS
  s.rig.t.write(0x101, Uint8Array.of(EV_KEY));
  const cfg = drv.readConfig(0, 136);
  const dev2 = new InputDevice({ kind: "keyboard" });
  const to = saveAndRestore(s.rig, s.dev, dev2, s.g.mem);
  assert.deepEqual(to.drv.readConfig(0, 136), cfg);
  assert.equal(dev2.leds.get(LED_CAPSL), 1);
  assert.equal(dev2.pendingEvents, 2);
  const subs = [evq.submit([INPUT_EVENT_SIZE]), evq.submit([INPUT_EVENT_SIZE])];
  to.drv.kick(0);
  assert.deepEqual(evq.used(), subs.map((x) => ({ id: x.head, len: INPUT_EVENT_SIZE })));
  assert.equal(evq.usedIdx(), 4);
  const ev = (i: number) => new DataView(s.g.mem.read(subs[i].buffers[0].addr, INPUT_EVENT_SIZE).buffer);
  assert.deepEqual([ev(0).getUint16(0, true), ev(0).getUint16(2, true), ev(0).getInt32(4, true)], [EV_KEY, KEY_A, 0]);
  assert.equal(ev(1).getUint16(0, true), EV_SYN);
  assert.ok(dev2.quiescent());
  assertActiveRefuses(dev2, s.dev.saveState());
  dev2.close();
  const good = s.dev.saveState();
  assertRefused(() => new InputDevice({ kind: "keyboard" }), good, [
    ["another kind", withData(good, { identity: ["mouse", "m", "s", "1", "1"] })],
    ["pending not triples", withData(good, { pending: [1, 2] })],
    ["pending type", withData(good, { pending: [0x10000, 0, 0] })],
    ["leds", withData(good, { leds: [LED_CAPSL] })],
    ["slots", withData(good, { slots: [0] })],
    ["select", withData(good, { select: 256 })],
  ]);
  // Another configuration is refused too.
  assert.throws(() => new InputDevice({ kind: "mouse" }).restoreState(good), StateError);
  // A multi-touch contact stays down: the restored device moves it (no new tracking id).
  using t = start(new InputDevice({ kind: "multi-touch" }));
  t.dev.touchDown(2, 10, 10);
  const mt = new InputDevice({ kind: "multi-touch" });
  mt.restoreState(t.dev.saveState());
  mt.touchMove(2, 20, 20); // throws when slot 2 has no contact
  mt.close();
});

Deno.test("console state: ports, pending input, queued control messages and the size carry over", () => {
  const out: Uint8Array[] = [];
  const make = () =>
    new ConsoleDevice({ output: (b) => out.push(b.slice()), ports: ["agent"], size: { cols: 80, rows: 25 } });
  using s = start(make());
  const drv = s.rig.drv;
  // No control-receive buffers: PORT_ADD messages wait; the guest has not opened port 0.
  const ctrlTx = drv.queues[3];
  const ready = new Uint8Array(8);
  new DataView(ready.buffer).setUint16(4, 0, true); // DEVICE_READY
  new DataView(ready.buffer).setUint16(6, 1, true);
  ctrlTx.submit([ready]);
  drv.kick(3);
  s.dev.sendInput(new TextEncoder().encode("hello"));
  s.dev.resize(100, 40);
  const cfg = drv.readConfig(0, CONSOLE_CONFIG_SIZE);
  const dev2 = make();
  const to = saveAndRestore(s.rig, s.dev, dev2, s.g.mem);
  assert.deepEqual(to.drv.readConfig(0, CONSOLE_CONFIG_SIZE), cfg);
  // The held control messages reach the guest once it posts buffers: PORT_ADD for ports 0 and 1, RESIZE.
  const ctrlRx = drv.queues[2];
  const subs = Array.from({ length: 4 }, () => ctrlRx.submit([64]));
  to.drv.kick(2);
  const used = ctrlRx.used();
  assert.equal(used.length, 3);
  assert.deepEqual(used.map((u) => u.id), subs.slice(0, 3).map((x) => x.head));
  const events = used.map((_u, i) => new DataView(s.g.mem.read(subs[i].buffers[0].addr, 8).buffer).getUint16(4, true));
  assert.deepEqual(events, [1, 1, 5]);
  // The guest opens port 0 (PORT_OPEN 1): the input saved before the restore arrives.
  const open = new Uint8Array(8);
  new DataView(open.buffer).setUint16(4, 6, true);
  new DataView(open.buffer).setUint16(6, 1, true);
  const rx = drv.queues[portRxQueue(0)];
  const rxSub = rx.submit([16]);
  ctrlTx.submit([open]);
  to.drv.kick(3);
  assert.deepEqual(rx.used(), [{ id: rxSub.head, len: 5 }]);
  assert.equal(new TextDecoder().decode(s.g.mem.read(rxSub.buffers[0].addr, 5)), "hello");
  // Output continues on port 0.
  drv.queues[portTxQueue(0)].submit([Uint8Array.of(0x41)]);
  to.drv.kick(portTxQueue(0));
  assert.deepEqual(out.at(-1), Uint8Array.of(0x41));
  assert.ok(dev2.quiescent());
  assertActiveRefuses(dev2, s.dev.saveState());
  dev2.close();
  const good = s.dev.saveState();
  const ports = (good.data as Record<string, StateValue>).ports as Record<string, StateValue>[];
  assertRefused(make, good, [
    ["maxPorts", withData(good, { maxPorts: 5 })],
    ["renamed port", withData(good, { ports: [ports[0], { ...ports[1], name: "other" }] })],
    ["no console port", withData(good, { ports: [] })],
    ["too much input", withData(good, { ports: [{ ...ports[0], pending: new Uint8Array(2 * MiB) }, ports[1]] })],
    ["control message", withData(good, { controlOut: [new Uint8Array(3)] })],
    ["cols", withData(good, { cols: 70000 })],
  ]);
  // A port opened after construction is created again by name.
  const extra = new ConsoleDevice({ output: () => {}, maxPorts: 3 });
  extra.openPort("late");
  const again = new ConsoleDevice({ output: () => {}, maxPorts: 3 });
  again.restoreState(extra.saveState());
  assert.equal(again.openPort("late").id, 1);
});

Deno.test("balloon state: target, actual, guest statistics and the held stats buffer carry over", async () => {
  using s = start(new BalloonDevice({ targetBytes: 64 * MiB }));
  const drv = s.rig.drv;
  const statsQ = drv.queues[BALLOON_STATS_QUEUE];
  const statsBuf = (free: bigint) => {
    const b = new Uint8Array(BALLOON_STAT_SIZE);
    new DataView(b.buffer).setUint16(0, VIRTIO_BALLOON_S_MEMFREE, true);
    new DataView(b.buffer).setBigUint64(2, free, true);
    return b;
  };
  const held = statsQ.submit([statsBuf(1234n)]);
  drv.kick(BALLOON_STATS_QUEUE);
  s.rig.t.write(0x100 + 4, Uint8Array.of(7, 0, 0, 0)); // actual = 7 pages
  assert.ok(s.dev.quiescent(), "the held stats buffer is not a request in flight");
  const cfg = drv.readConfig(0, BALLOON_CONFIG_SIZE);
  const dev2 = new BalloonDevice();
  const to = saveAndRestore(s.rig, s.dev, dev2, s.g.mem);
  assert.deepEqual(to.drv.readConfig(0, BALLOON_CONFIG_SIZE), cfg);
  assert.equal(dev2.targetPages, 64 * MiB / 4096);
  assert.equal(dev2.actualPages, 7);
  assert.equal(dev2.guestStats()?.values.get(VIRTIO_BALLOON_S_MEMFREE), 1234n);
  assert.ok(dev2.quiescent());
  // The restored device gives the held buffer back when the host asks, and reads the next one.
  const fresh = dev2.requestStats();
  assert.deepEqual(statsQ.used(), [{ id: held.head, len: 0 }]);
  assert.equal(statsQ.usedIdx(), 1);
  statsQ.submit([statsBuf(999n)]);
  to.drv.kick(BALLOON_STATS_QUEUE);
  assert.equal(await fresh, true);
  assert.equal(dev2.guestStats()?.values.get(VIRTIO_BALLOON_S_MEMFREE), 999n);
  assertActiveRefuses(dev2, s.dev.saveState());
  dev2.close();
  const good = s.dev.saveState();
  assertRefused(() => new BalloonDevice(), good, [
    ["features", withData(good, { features: "0x100000000" })],
    ["config size", withData(good, { config: new Uint8Array(4) })],
    ["stats head", withData(good, { statsHead: 0x10000 })],
    ["guest stat value", withData(good, { guestStats: { at: 0, values: [[4, "-1"]] } })],
    ["guest stats", withData(good, { guestStats: 5 })],
  ]);
  // Without a stats queue there is no held buffer to restore.
  assert.throws(() => new BalloonDevice({ statsQueue: false }).restoreState(good), StateError);
});
