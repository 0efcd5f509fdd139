// Real Linux drivers (Debian's 6.1 kernel under QEMU TCG, -M microvm, virtio-mmio version 2) against
// `denovm device rng` and `denovm device input` back-end processes over vhost-user.
//
// - rng: Debian's QEMU 7.2 (`vhost-user-rng`). The guest's hw_random core picks virtio_rng and reads
//   bytes from /dev/hwrng that our back end produced.
// - input: QEMU 7.2's vhost-user-input refuses to run without KVM ("vhost initialization failed:
//   requires kvm", backends/vhost-user.c), so this test uses bookworm-backports' QEMU 10, unpacked
//   under .cache/qemu10 (scripts/qemu-backports.sh; nothing is installed on the host).
//   Keys typed through the back end's --event-socket arrive in the guest's /dev/input/event0 as
//   struct input_event records, which the guest prints with hexdump and the test decodes.

import assert from "node:assert/strict";
import {
  backportsQemu,
  buildQemuInitramfs,
  DeviceProcess,
  JsonLineClient,
  type QemuBuild,
  qemuHasDevice,
  QemuMachine,
  qemuUnavailableReason,
  systemQemu,
} from "../support/qemu.ts";
import {
  BTN_TOUCH,
  EV_ABS,
  EV_KEY,
  EV_SYN,
  KEY_1,
  KEY_H,
  KEY_I,
  KEY_LEFTSHIFT,
  SYN_REPORT,
} from "../../devices/virtio/input/codes.ts";
import { ABS_X, ABS_Y } from "../../devices/virtio/input/codes.ts";

const reason = qemuUnavailableReason();
if (reason) console.log(`skipping QEMU vhost-user tests: ${reason}`);

/** BUS_VIRTUAL (linux/input.h), as sysfs prints it (id/bustype, 4 hex digits). */
const SYSFS_BUS_VIRTUAL = "0006";
/** struct input_event on x86_64 (linux/input.h): struct timeval (2 x 8 bytes), u16 type, u16 code, s32 value. */
const INPUT_EVENT_BYTES = 24;
const EVENT_TYPE_OFFSET = 16;
const EVENT_CODE_OFFSET = 18;
const EVENT_VALUE_OFFSET = 20;

/** Wait for a device node, in the guest (the driver probes asynchronously to insmod). */
const waitFor = (path: string) =>
  `n=0; while [ ! -e ${path} ] && [ $n -lt 200 ]; do sleep 0.1; n=$((n+1)); done; test -e ${path}`;

function tempDir(): Promise<string> {
  return Deno.makeTempDir({ prefix: "denovm-qemu-vu-" });
}

/** Lines of `hexdump -v -e '24/1 "%02x" "\n"'` between two markers, decoded as input_event records. */
function decodeEvents(output: string, from: string, to: string): { type: number; code: number; value: number }[] {
  const body = output.slice(output.indexOf(from) + from.length, output.indexOf(to));
  return body.split("\n").map((l) => l.trim()).filter((l) => /^[0-9a-f]{48}$/.test(l)).map((hex) => {
    const b = new Uint8Array(INPUT_EVENT_BYTES);
    for (let i = 0; i < INPUT_EVENT_BYTES; i++) b[i] = parseInt(hex.slice(2 * i, 2 * i + 2), 16);
    const v = new DataView(b.buffer);
    return {
      type: v.getUint16(EVENT_TYPE_OFFSET, true),
      code: v.getUint16(EVENT_CODE_OFFSET, true),
      value: v.getInt32(EVENT_VALUE_OFFSET, true),
    };
  });
}

const syn = { type: EV_SYN, code: SYN_REPORT, value: 0 };
const key = (code: number, value: number) => ({ type: EV_KEY, code, value });

Deno.test({
  name: "QEMU TCG: the guest's virtio_rng reads /dev/hwrng from `denovm device rng`",
  ignore: reason !== undefined,
  async fn() {
    const dir = await tempDir();
    const socket = `${dir}/rng.sock`;
    const backend = await DeviceProcess.start("rng", ["--socket-path", socket]);
    const bytes = 4096;
    const initramfs = await buildQemuInitramfs({
      modules: ["virtio_mmio", "virtio_rng"],
      commands: `${waitFor("/dev/hwrng")}
echo "rng_current=$(cat /sys/class/misc/hw_random/rng_current)"
dd if=/dev/hwrng bs=${bytes} count=1 iflag=fullblock of=/tmp/rnd 2>/dev/null
echo "hwrng-bytes=$(wc -c </tmp/rnd)"
echo RNG-BEGIN
hexdump -v -e '32/1 "%02x" "\\n"' /tmp/rnd
echo RNG-END`,
    });
    try {
      const vm = await QemuMachine.start({
        qemu: systemQemu(),
        initramfs,
        vhostUser: [{ device: "vhost-user-rng", socket }],
      });
      const r = await vm.wait();
      assert.equal(r.commandStatus, 0, `guest commands failed:\n${r.output}\n${backend.stderr}`);
      assert.match(r.output, /rng_current=virtio_rng\.\d+/, "the hw_random core uses virtio_rng");
      const lines = r.output.slice(r.output.indexOf("RNG-BEGIN"), r.output.indexOf("RNG-END"))
        .split("\n").map((l) => l.trim()).filter((l) => /^[0-9a-f]{64}$/.test(l));
      const hex = lines.join("");
      assert.match(r.output, new RegExp(`hwrng-bytes=${bytes}\\b`), "the guest read every byte it asked for");
      assert.equal(hex.length / 2, bytes, `the hexdump holds every byte:\n${r.output}`);
      const data = Uint8Array.from({ length: bytes }, (_, i) => parseInt(hex.slice(2 * i, 2 * i + 2), 16));
      // Random-looking: (nearly) all byte values occur and no value dominates (expected count 16).
      const counts = new Array(256).fill(0);
      for (const b of data) counts[b]++;
      assert.ok(counts.filter((c) => c > 0).length > 240, "byte values are spread");
      assert.ok(Math.max(...counts) < 48, "no byte value dominates");
    } finally {
      const status = await backend.stop();
      assert.equal(status.code, 0, `the back end exits cleanly on SIGTERM: ${backend.stderr}`);
      await Deno.remove(initramfs).catch(() => {});
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});

/** The QEMU for the input test, or why there is none. */
async function inputQemu(): Promise<QemuBuild | string> {
  const sys = systemQemu();
  if (!sys.version.startsWith("7.")) return sys;
  try {
    const q = await backportsQemu();
    if (!qemuHasDevice(q, "vhost-user-input")) return `QEMU ${q.version} has no vhost-user-input`;
    return q;
  } catch (e) {
    return `QEMU ${sys.version}'s vhost-user-input needs KVM, and bookworm-backports' QEMU is not available: ${
      (e as Error).message
    }`;
  }
}

Deno.test({
  name: "QEMU TCG: keys typed and touches sent into `denovm device input` arrive in the guest's evdev nodes",
  ignore: reason !== undefined,
  async fn(t) {
    const qemu = await inputQemu();
    if (typeof qemu === "string") {
      console.log(`input over QEMU skipped: ${qemu}`);
      await t.step({ name: "skipped: " + qemu, ignore: true, fn: () => {} });
      return;
    }
    const dir = await tempDir();
    const kbd = await DeviceProcess.start("input", [
      "--socket-path",
      `${dir}/kbd.sock`,
      "--kind",
      "keyboard",
      "--event-socket",
      `${dir}/kbd.events`,
    ]);
    const touch = await DeviceProcess.start("input", [
      "--socket-path",
      `${dir}/touch.sock`,
      "--input",
      "single-touch[width=800,height=600,name=denovm test tablet]",
      "--event-socket",
      `${dir}/touch.events`,
    ]);
    // "Hi" then KEY_1: shift+h (3 + 3 events), i (2 + 2), 1 (2 + 2); a tap is 4 + 2 events.
    const keyEvents = 14;
    const touchEvents = 6;
    const initramfs = await buildQemuInitramfs({
      modules: ["virtio_mmio", "virtio_input", "evdev"],
      commands: `${waitFor("/dev/input/event0")}
${waitFor("/dev/input/event1")}
kbd=""; tab=""
for e in /sys/class/input/event*; do
  name="$(cat $e/device/name)"
  echo "device $(basename $e) name=$name bus=$(cat $e/device/id/bustype) ev=$(cat $e/device/capabilities/ev) abs=$(cat $e/device/capabilities/abs) prop=$(cat $e/device/properties)"
  case "$name" in
    "denovm virtio keyboard") kbd=/dev/input/$(basename $e) ;;
    "denovm test tablet") tab=/dev/input/$(basename $e) ;;
  esac
done
test -n "$kbd" && test -n "$tab"
dd if=$kbd bs=${INPUT_EVENT_BYTES} count=${keyEvents} of=/tmp/kbd 2>/dev/null &
k=$!
dd if=$tab bs=${INPUT_EVENT_BYTES} count=${touchEvents} of=/tmp/tab 2>/dev/null &
p=$!
sleep 0.5
echo READY-FOR-EVENTS
wait $k $p
echo KBD-BEGIN
hexdump -v -e '24/1 "%02x" "\\n"' /tmp/kbd
echo KBD-END
hexdump -v -e '24/1 "%02x" "\\n"' /tmp/tab
echo TAB-END`,
    });
    let kc: JsonLineClient | undefined;
    let tc: JsonLineClient | undefined;
    try {
      const vm = await QemuMachine.start({
        qemu,
        initramfs,
        vhostUser: [
          { device: "vhost-user-input", socket: `${dir}/kbd.sock` },
          { device: "vhost-user-input", socket: `${dir}/touch.sock` },
        ],
      });
      await vm.waitFor(/READY-FOR-EVENTS/);
      kc = await JsonLineClient.connect(`${dir}/kbd.events`);
      tc = await JsonLineClient.connect(`${dir}/touch.events`);
      assert.equal((await kc.call({ type: "Hi" })).ok, true);
      assert.equal((await kc.call({ key: KEY_1, down: true })).ok, true);
      assert.equal((await kc.call({ key: KEY_1, down: false })).ok, true);
      assert.equal((await tc.call({ tap: [123, 456] })).ok, true);
      const bad = await tc.call({ tap: [800, 0] });
      assert.equal(bad.ok, false, "a point outside the surface is refused");
      const r = await vm.wait();
      assert.equal(r.commandStatus, 0, `guest commands failed:\n${r.output}\n${kbd.stderr}\n${touch.stderr}`);
      assert.match(r.output, new RegExp(`name=denovm virtio keyboard bus=${SYSFS_BUS_VIRTUAL} ev=120003`));
      // single-touch: EV_SYN|EV_KEY|EV_ABS = 0xb, ABS_X|ABS_Y = 3, INPUT_PROP_DIRECT = 2.
      assert.match(r.output, new RegExp(`name=denovm test tablet bus=${SYSFS_BUS_VIRTUAL} ev=b abs=3 prop=2`));
      const keys = decodeEvents(r.output, "KBD-BEGIN", "KBD-END");
      assert.deepEqual(keys, [
        key(KEY_LEFTSHIFT, 1),
        key(KEY_H, 1),
        syn,
        key(KEY_H, 0),
        key(KEY_LEFTSHIFT, 0),
        syn,
        key(KEY_I, 1),
        syn,
        key(KEY_I, 0),
        syn,
        key(KEY_1, 1),
        syn,
        key(KEY_1, 0),
        syn,
      ]);
      const taps = decodeEvents(r.output, "KBD-END", "TAB-END");
      assert.deepEqual(taps, [
        { type: EV_ABS, code: ABS_X, value: 123 },
        { type: EV_ABS, code: ABS_Y, value: 456 },
        key(BTN_TOUCH, 1),
        syn,
        key(BTN_TOUCH, 0),
        syn,
      ]);
    } finally {
      kc?.close();
      tc?.close();
      for (const b of [kbd, touch]) {
        const status = await b.stop();
        assert.equal(status.code, 0, `the back end exits cleanly on SIGTERM: ${b.stderr}`);
      }
      await Deno.remove(initramfs).catch(() => {});
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});
