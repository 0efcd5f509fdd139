// `run --input KIND` and `run --vhost-user type=input,socket=S` against `denovm device input --kind KIND
// --event-socket E` give the guest the same virtio-input device, and the library drives both the same way.
// Both devices are built as `run` builds them (createVirtioDevices from the parsed options), each on a
// virtio-mmio transport driven by the test driver over guest memory (shared RAM for the front end, whose
// kicks and interrupts go through eventfds as under KVM). For every kind: the configuration space the
// driver reads for each select/subsel, the device ID, the features and the queue sizes are the same; the library's
// calls (type, key, move, click, tap) put byte-identical events in the guest's event queue; a LED the guest
// writes on the status queue reaches the device model both ways and the library reads it back. A vhost-user
// input back end without an event socket is one line when asked to type into it.

import assert from "node:assert/strict";
import {
  INPUT_CFG_SELECT,
  INPUT_CFG_SUBSEL,
  INPUT_CONFIG_SIZE,
  INPUT_EVENT_CODE,
  INPUT_EVENT_QUEUE,
  INPUT_EVENT_SIZE,
  INPUT_EVENT_TYPE,
  INPUT_EVENT_VALUE,
  INPUT_QUEUE_SIZE,
  INPUT_STATUS_QUEUE,
  InputDevice,
  type InputDeviceKind,
  VIRTIO_INPUT_CFG_ABS_INFO,
  VIRTIO_INPUT_CFG_EV_BITS,
  VIRTIO_INPUT_CFG_ID_DEVIDS,
  VIRTIO_INPUT_CFG_ID_NAME,
  VIRTIO_INPUT_CFG_ID_SERIAL,
  VIRTIO_INPUT_CFG_PROP_BITS,
  VIRTIO_INPUT_CFG_UNSET,
} from "../../devices/virtio/input/device.ts";
import { BTN_RIGHT, EV_LED, KEY_A, KEY_LEFTCTRL, LED_CAPSL, LED_NUML } from "../../devices/virtio/input/codes.ts";
import { VhostUserFrontEndDevice } from "../../devices/vhost_user/front_end.ts";
import type { VirtioDevice } from "../../devices/virtio/device.ts";
import {
  VIRTIO_MMIO_CONFIG,
  VIRTIO_MMIO_DEVICE_ID,
  VIRTIO_MMIO_QUEUE_NUM_MAX,
  VIRTIO_MMIO_QUEUE_SEL,
  VirtioMmioTransport,
} from "../../devices/virtio/mmio.ts";
import { OwnedGuestMemory } from "../../core/memory.ts";
import { closeFd, eventfd, eventfdWrite } from "../../ffi/libc.ts";
import { defaultVmConfig, type VmConfig } from "../../vmm/config.ts";
import { createVirtioDevices } from "../../vmm/device_manager/virtio_devices.ts";
import { parseInputOption } from "../../vmm/cli/devices/input.ts";
import { parseVhostUserOption } from "../../vmm/cli/devices/vhost_user.ts";
import { VmInput } from "../../vmm/library/vm.ts";
import { RemoteInput, RemoteInputs } from "../../vmm/library/input_remote.ts";
import { type DriverQueue, type Submitted, VirtioTestDriver } from "../support/virtio_driver.ts";
import { DeviceProcess } from "../support/device_process.ts";
import { until } from "../support/vhost_user_front_end.ts";
import { withTempDir } from "../support/temp_dir.ts";
import { DRIVER_ARENA_START } from "../support/device_rig.ts";
import { MiB } from "../../core/units.ts";

const RAM = 4 * MiB;
/** Every value a select or subsel byte can take is asked for these selects (virtio_input.h's, and one unknown). */
const SELECTS = [
  VIRTIO_INPUT_CFG_UNSET,
  VIRTIO_INPUT_CFG_ID_NAME,
  VIRTIO_INPUT_CFG_ID_SERIAL,
  VIRTIO_INPUT_CFG_ID_DEVIDS,
  VIRTIO_INPUT_CFG_PROP_BITS,
  VIRTIO_INPUT_CFG_EV_BITS,
  VIRTIO_INPUT_CFG_ABS_INFO,
  0x7f,
];
const SUBSELS = 256;

/** crosvm's example custom configuration (a multi-touch screen), as devices/virtio/input/profiles_test.ts has it. */
const CUSTOM_JSON = JSON.stringify({
  name: "Crosvm Virtio Multitouch Touchscreen 0",
  serial_name: "virtio-touchscreen-0",
  properties: { INPUT_PROP_DIRECT: 1 },
  events: [
    { event_type: "EV_KEY", event_type_code: 1, supported_events: { BTN_TOUCH: 330 } },
    {
      event_type: "EV_ABS",
      event_type_code: 3,
      supported_events: { ABS_MT_SLOT: 47, ABS_MT_POSITION_X: 53, ABS_X: 0, ABS_Y: 1 },
    },
  ],
  axis_info: [
    { axis: "ABS_MT_SLOT", axis_code: 47, min: 0, max: 10, fuzz: 0, flat: 0 },
    { axis: "ABS_X", axis_code: 0, min: 0, max: 720, fuzz: 2, flat: 3 },
  ],
});

/** One way of giving the guest the device: its transport, the test driver and the library's calls. */
interface Side {
  what: string;
  t: VirtioMmioTransport;
  drv: VirtioTestDriver;
  mem: OwnedGuestMemory;
  input: VmInput;
  posted: Submitted[];
  kick(queue: number): void;
}

function side(what: string, dev: VirtioDevice, mem: OwnedGuestMemory, input: VmInput, fds?: number[]): Side {
  const irqFd = fds ? eventfd() : undefined;
  const notifyFds = fds ? [eventfd(), eventfd()] : undefined;
  if (fds) fds.push(irqFd!, ...notifyFds!);
  const t = new VirtioMmioTransport(dev, mem, {
    irq: { trigger: () => irqFd !== undefined && eventfdWrite(irqFd) },
    notifyFds,
    irqFd,
  });
  const drv = new VirtioTestDriver(t, mem, { start: DRIVER_ARENA_START, end: RAM });
  drv.init({ queueSize: INPUT_QUEUE_SIZE });
  return {
    what,
    t,
    drv,
    mem,
    input,
    posted: [],
    // As KVM does with the QueueNotify ioeventfd (the in-process device hears the register write itself).
    kick: (q) => notifyFds ? eventfdWrite(notifyFds[q]) : drv.kick(q),
  };
}

/** The whole configuration space after the driver wrote select and subsel, as Linux's virtinput_cfg_select does. */
function configAt(s: Side, select: number, subsel: number): Uint8Array {
  s.t.write(VIRTIO_MMIO_CONFIG + INPUT_CFG_SELECT, Uint8Array.of(select));
  s.t.write(VIRTIO_MMIO_CONFIG + INPUT_CFG_SUBSEL, Uint8Array.of(subsel));
  return s.drv.readConfig(0, INPUT_CONFIG_SIZE);
}

/** Post event buffers (one event each, as Linux does) up to the ring's size, and kick. */
function postEventBuffers(s: Side): void {
  const q = s.drv.queues[INPUT_EVENT_QUEUE];
  while (s.posted.length < INPUT_QUEUE_SIZE) s.posted.push(q.submit([INPUT_EVENT_SIZE]));
  s.kick(INPUT_EVENT_QUEUE);
}

/** The used event buffers' bytes in used-ring order (each with its used length), since the last call. */
function takeEvents(s: Side): Uint8Array[] {
  const out: Uint8Array[] = [];
  for (const u of s.drv.queues[INPUT_EVENT_QUEUE].used()) {
    const i = s.posted.findIndex((p) => p.head === u.id);
    assert.ok(i >= 0, `${s.what}: used id ${u.id} was not posted`);
    const sub = s.posted.splice(i, 1)[0];
    const len = Uint8Array.of(u.len);
    out.push(new Uint8Array([...len, ...s.mem.read(sub.buffers[0].addr, INPUT_EVENT_SIZE)]));
  }
  return out;
}

/** What the guest's event queue received for one call, read after the back end has delivered as many events. */
async function eventsOf(a: Side, b: Side, call: (i: VmInput) => Promise<void>): Promise<[Uint8Array[], Uint8Array[]]> {
  postEventBuffers(a);
  postEventBuffers(b);
  await call(a.input);
  await call(b.input);
  const qa = a.drv.queues[INPUT_EVENT_QUEUE];
  const qb = b.drv.queues[INPUT_EVENT_QUEUE];
  const want = qa.usedIdx();
  await until(() => qb.usedIdx() === want, `${b.what}: ${want} used event buffers`);
  // One more request answered by the back end: nothing else was on its way.
  const d = b.input.devices()[0];
  if (d instanceof RemoteInput) await d.leds();
  assert.equal(qb.usedIdx(), want, `${b.what}: no more events`);
  return [takeEvents(a), takeEvents(b)];
}

function decode(events: Uint8Array[]): string {
  return events.map((e) => {
    const v = new DataView(e.buffer, 1);
    return `${v.getUint16(INPUT_EVENT_TYPE, true)}:${v.getUint16(INPUT_EVENT_CODE, true)}:${
      v.getInt32(INPUT_EVENT_VALUE, true)
    }`;
  }).join(" ");
}

/** The guest writes one status event (a LED) on the status queue. */
function writeLed(s: Side, code: number, value: number): DriverQueue {
  const e = new Uint8Array(INPUT_EVENT_SIZE);
  const v = new DataView(e.buffer);
  v.setUint16(INPUT_EVENT_TYPE, EV_LED, true);
  v.setUint16(INPUT_EVENT_CODE, code, true);
  v.setInt32(INPUT_EVENT_VALUE, value, true);
  const q = s.drv.queues[INPUT_STATUS_QUEUE];
  q.submit([e]);
  s.kick(INPUT_STATUS_QUEUE);
  return q;
}

interface Case {
  kind: InputDeviceKind;
  /** `run --input` text, and the back end's arguments beside --kind. */
  run: string;
  device: string[];
  /** Library calls the kind takes. */
  calls: [string, (i: VmInput) => Promise<void>][];
}

const CASES: Case[] = [
  {
    kind: "keyboard",
    run: "keyboard",
    device: [],
    calls: [
      ["type", (i) => i.type("Hi, you!\n~")],
      ["key", (i) => i.key(KEY_A)],
      ["keyState", async (i) => {
        await i.keyState(KEY_LEFTCTRL, true);
        await i.keyState(KEY_LEFTCTRL, false);
      }],
    ],
  },
  {
    kind: "mouse",
    run: "mouse",
    device: [],
    calls: [["move", (i) => i.move(3, -4)], ["click", (i) => i.click()], ["click right", (i) => i.click(BTN_RIGHT)]],
  },
  {
    kind: "multi-touch",
    run: "multi-touch[width=800,height=600]",
    device: ["--width", "800", "--height", "600"],
    calls: [["tap", (i) => i.tap(10, 20)], ["tap again", (i) => i.tap(799, 599)]],
  },
  { kind: "single-touch", run: "single-touch", device: [], calls: [["tap", (i) => i.tap(1279, 0)]] },
  { kind: "switches", run: "switches", device: [], calls: [] },
  { kind: "rotary", run: "rotary", device: [], calls: [] },
  { kind: "trackpad", run: "trackpad[width=300,height=200]", device: ["--width", "300", "--height", "200"], calls: [] },
  { kind: "multi-touch-trackpad", run: "multi-touch-trackpad", device: [], calls: [] },
  { kind: "custom", run: "custom[config-path=CUSTOM]", device: ["--config-path", "CUSTOM"], calls: [] },
];

for (const c of CASES) {
  Deno.test(`vhost-user input ${c.kind}: the guest sees the same device as --input, and the library drives both alike`, async () => {
    await withTempDir("denovm-vu-input-", async (dir) => {
      const custom = `${dir}/custom.json`;
      Deno.writeTextFileSync(custom, CUSTOM_JSON);
      const socket = `${dir}/input.sock`;
      const eventSocket = `${dir}/input.events`;
      const backEnd = await DeviceProcess.start("input", [
        "--socket-path",
        socket,
        "--kind",
        c.kind,
        "--event-socket",
        eventSocket,
        ...c.device.map((a) => a === "CUSTOM" ? custom : a),
      ]);
      const config: VmConfig = defaultVmConfig("k");
      config.inputs = [parseInputOption(c.run.replace("CUSTOM", custom))];
      // max-queue-size as the in-process model's (the front end's default is a vhost-user ring's largest).
      const vhostUser = parseVhostUserOption(`type=input,socket=${socket},max-queue-size=${INPUT_QUEUE_SIZE}`);
      config.vhostUser = [{ ...vhostUser, eventSocket }];
      const lines: string[] = [];
      const made = await createVirtioDevices(config, {
        serialOutput: () => Promise.resolve(() => {}),
        defaultVsockPath: "",
        log: (l) => lines.push(l),
      });
      const own = made.devices.find((d): d is InputDevice => d instanceof InputDevice)!;
      const front = made.devices.find((d): d is VhostUserFrontEndDevice => d instanceof VhostUserFrontEndDevice)!;
      const remote = await RemoteInputs.connect(config);
      const memA = OwnedGuestMemory.allocate([{ start: 0, size: RAM }]);
      const memB = OwnedGuestMemory.allocateShared([{ start: 0, size: RAM }]);
      const fds: number[] = [];
      try {
        assert.equal(remote.devices.length, 1);
        assert.equal(remote.devices[0].kind, c.kind, "the back end describes its kind");
        const a = side("--input", own, memA, new VmInput(() => [own]));
        const b = side("--vhost-user", front, memB, new VmInput(() => remote.devices), fds);

        // (1) The device the guest reads: ID, features, and the config space for every select/subsel.
        assert.equal(b.drv.readReg(VIRTIO_MMIO_DEVICE_ID), a.drv.readReg(VIRTIO_MMIO_DEVICE_ID));
        assert.equal(b.drv.deviceFeatures(), a.drv.deviceFeatures(), "device features");
        for (const q of [INPUT_EVENT_QUEUE, INPUT_STATUS_QUEUE]) {
          for (const s of [a, b]) s.drv.writeReg(VIRTIO_MMIO_QUEUE_SEL, q);
          assert.equal(
            b.drv.readReg(VIRTIO_MMIO_QUEUE_NUM_MAX),
            a.drv.readReg(VIRTIO_MMIO_QUEUE_NUM_MAX),
            `queue ${q}`,
          );
        }
        let answered = 0;
        for (const select of SELECTS) {
          for (let subsel = 0; subsel < SUBSELS; subsel++) {
            const want = configAt(a, select, subsel);
            const got = configAt(b, select, subsel);
            assert.deepEqual(got, want, `select 0x${select.toString(16)} subsel ${subsel}`);
            if (want[2] > 0) answered++;
          }
        }
        assert.ok(answered > 0, "some selects answer something");

        // (2) The library's calls: the same bytes in the guest's event queue.
        for (const [name, call] of c.calls) {
          const [want, got] = await eventsOf(a, b, call);
          assert.ok(want.length > 0, `${name}: events delivered`);
          assert.deepEqual(decode(got), decode(want), `${name}: events`);
          assert.deepEqual(got, want, `${name}: bytes`);
        }

        // (3) A LED the guest writes on the status queue reaches the device model both ways.
        if (c.kind === "keyboard") {
          writeLed(a, LED_CAPSL, 1);
          const qb = writeLed(b, LED_CAPSL, 1);
          writeLed(a, LED_NUML, 1);
          writeLed(b, LED_NUML, 1);
          writeLed(a, LED_NUML, 0);
          writeLed(b, LED_NUML, 0);
          await until(() => qb.usedIdx() === 3, "the back end's status queue");
          const want = await a.input.leds();
          assert.deepEqual(want, new Map([[LED_CAPSL, 1], [LED_NUML, 0]]));
          assert.deepEqual(await b.input.leds(), want);
        }
        assert.deepEqual(lines, [], "nothing logged");
        assert.equal(front.failed, undefined);
      } finally {
        await remote.close();
        for (const d of made.devices) d.close?.();
        await front.whenClosed();
        fds.forEach(closeFd);
        memA.close();
        memB.close();
        await backEnd.stop();
      }
    });
  });
}
