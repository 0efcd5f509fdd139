// The event-socket request handler of `denovm device input`: each request applied to a virtio-input
// device whose guest has posted event buffers, and malformed or unknown requests refused.

import assert from "node:assert/strict";
import { handleInputRequest, parseInputOption } from "./input.ts";
import { BTN_TOUCH, EV_KEY, KEY_A } from "../../../devices/virtio/input/codes.ts";
import { INPUT_EVENT_SIZE, InputDevice } from "../../../devices/virtio/input/device.ts";
import { defaultVmConfig, type InputConfig } from "../../config.ts";
import { createVirtioDevices } from "../../device_manager/virtio_devices.ts";
import { UnixListener } from "../../../core/unix_socket.ts";
import { ConfigError, HostError } from "../../../core/exit.ts";
import { inputRig, key, syn } from "../../../test/support/input_rig.ts";

Deno.test("input: event-socket requests", () => {
  using r = inputRig("single-touch", { width: 50, height: 50 });
  r.post(16);
  assert.deepEqual(handleInputRequest(r.dev, { tap: [1, 2] }), { ok: true, pending: 0 });
  assert.equal(r.events().length, 6);
  assert.throws(() => handleInputRequest(r.dev, { tap: [1] }), /2 integers/);
  assert.throws(() => handleInputRequest(r.dev, { bogus: 1 }), /unknown request/);
  assert.throws(() => handleInputRequest(r.dev, { type: "x" }), /keyboard/);
  const res = handleInputRequest(r.dev, { events: [{ type: EV_KEY, code: BTN_TOUCH, value: 1 }] });
  assert.equal(res.ok, true);
  assert.deepEqual(r.events(), [key(BTN_TOUCH, 1), syn]);
});

Deno.test("input: the describe request says what the library drives the device as", () => {
  const dev = new InputDevice({ kind: "multi-touch", width: 800, height: 600 });
  assert.deepEqual(handleInputRequest(dev, { describe: true }), {
    ok: true,
    kind: "multi-touch",
    name: dev.deviceName,
    serial: dev.serial,
    width: 800,
    height: 600,
  });
  dev.close();
});

Deno.test("input: run --input forms of crosvm's other kinds", () => {
  assert.deepEqual(parseInputOption("switches[path=/tmp/sw]"), { kind: "switches", path: "/tmp/sw" });
  assert.deepEqual(parseInputOption("rotary[/tmp/r]"), { kind: "rotary", path: "/tmp/r" });
  assert.deepEqual(parseInputOption("multi-touch-trackpad[path=/tmp/t,width=10,height=20,name=pad]"), {
    kind: "multi-touch-trackpad",
    path: "/tmp/t",
    width: 10,
    height: 20,
    name: "pad",
  });
  assert.deepEqual(parseInputOption("custom[path=/tmp/c,config-path=/tmp/c.json]"), {
    kind: "custom",
    path: "/tmp/c",
    configPath: "/tmp/c.json",
  });
  assert.throws(() => parseInputOption("custom[path=/tmp/c]"), /config-path=FILE is required/);
  assert.throws(() => parseInputOption("custom"), /config-path=FILE is required/);
  assert.throws(() => parseInputOption("switches[width=3]"), /unknown key "width"/);
  assert.throws(() => parseInputOption("rotary[config-path=/x]"), /unknown key "config-path"/);
});

/** createVirtioDevices for `inputs` alone. */
function build(inputs: InputConfig[]) {
  const config = defaultVmConfig("k");
  config.inputs = inputs;
  return createVirtioDevices(config, { serialOutput: () => Promise.resolve(() => {}), defaultVsockPath: "" });
}

Deno.test("input: the VMM builds every kind, connects path= sockets and reads custom files", async () => {
  const dir = Deno.makeTempDirSync();
  try {
    const listener = UnixListener.listen(`${dir}/in.sock`);
    Deno.writeTextFileSync(
      `${dir}/c.json`,
      JSON.stringify({ events: [{ event_type: "EV_KEY", event_type_code: EV_KEY, supported_events: { A: KEY_A } }] }),
    );
    const made = await build([
      { kind: "switches" },
      { kind: "switches" },
      { kind: "rotary" },
      { kind: "trackpad" },
      { kind: "multi-touch-trackpad" },
      { kind: "custom", configPath: `${dir}/c.json`, path: listener.path },
    ]);
    const devs = made.devices.filter((d) => d instanceof InputDevice);
    assert.deepEqual(devs.map((d) => d.deviceName), [
      "Crosvm Virtio Switches 0",
      "Crosvm Virtio Switches 1",
      "Crosvm Virtio Rotary 0",
      "Crosvm Virtio Trackpad 0",
      "Crosvm Virtio Multi-touch Trackpad 0",
      "Crosvm Virtio Custom 0",
    ]);
    // The custom device connected: what the program writes waits for the guest.
    const peer = await listener.accept();
    const rec = new Uint8Array(INPUT_EVENT_SIZE);
    new DataView(rec.buffer).setUint16(0, EV_KEY, true);
    new DataView(rec.buffer).setUint16(2, KEY_A, true);
    await peer.send(rec);
    const deadline = Date.now() + 5000;
    while (devs[5].pendingEvents === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
    assert.equal(devs[5].pendingEvents, 1);
    for (const d of made.devices) d.close?.();
    peer.close();
    listener.close();
    // Nobody listening: a host fault naming the option (exit 1); a bad file: the user's error (exit 35).
    await assert.rejects(() => build([{ kind: "rotary", path: `${dir}/none.sock` }]), (e: Error) => {
      assert.ok(e instanceof HostError);
      assert.match(e.message, /^--input rotary\[path=.*none\.sock\]: connect/);
      return true;
    });
    Deno.writeTextFileSync(`${dir}/bad.json`, "{}");
    await assert.rejects(() => build([{ kind: "custom", configPath: `${dir}/bad.json` }]), (e: Error) => {
      assert.ok(e instanceof ConfigError);
      assert.match(e.message, /--input custom\[config-path=.*bad\.json\]: "events" is missing/);
      return true;
    });
    await assert.rejects(() => build([{ kind: "evdev", path: "/dev/input/event0" }]), /not available/);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});
