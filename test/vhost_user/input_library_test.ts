// The library's Vm with vhost-user input devices, on the fake KVM (test/support/fake_kvm.c) so that it runs
// on any host: Vm.boot connects to the event socket of `denovm device input --event-socket`, and vm.input
// types into it as into an --input keyboard; a vhost-user input back end with no event socket is one line
// when asked for events; the connection ends with the VM. (What the guest then reads is
// test/vhost_user/input_test.ts's part.)

import assert from "node:assert/strict";
import { buildFakeKvm, fakeKvmEnv } from "../support/fake_kvm.ts";
import { buildGuest } from "../guests/build.ts";
import { DeviceProcess } from "../support/device_process.ts";
import { JsonLineClient } from "../support/qemu.ts";
import { withTempDir } from "../support/temp_dir.ts";
import { Vm } from "../../mod.ts";
import { VIRTIO_ID_INPUT } from "../../devices/virtio/device.ts";
import { EXIT_SUCCESS } from "../../core/exit.ts";
import { KEY_A, LED_CAPSL } from "../../devices/virtio/input/codes.ts";

const shim = await buildFakeKvm();
const guest = await buildGuest("boot_info");

/** Events one typed lower-case character is: press, EV_SYN, release, EV_SYN. */
const EVENTS_PER_CHAR = 4;

Deno.test("vhost-user input, library: Vm.boot drives denovm device input through its event socket; one without is one line", async () => {
  await withTempDir("denovm-vu-input-lib-", async (dir) => {
    const socket = `${dir}/kbd.sock`;
    const eventSocket = `${dir}/kbd.events`;
    const blindSocket = `${dir}/mouse.sock`;
    // Started before this process's libc is the fake (below): the back ends use the real one.
    const keyboard = await DeviceProcess.start("input", [
      "--socket-path",
      socket,
      "--kind",
      "keyboard",
      "--event-socket",
      eventSocket,
    ]);
    const mouse = await DeviceProcess.start("input", ["--socket-path", blindSocket, "--kind", "mouse"]);
    const fake = fakeKvmEnv(shim, "halt", "");
    // This process's libc (ffi/libc.ts, opened on first use) is the fake from here on; nothing in this
    // file called it before.
    for (const [k, v] of Object.entries(fake)) Deno.env.set(k, v);
    let vm: Vm | undefined;
    const watcher = await JsonLineClient.connect(eventSocket);
    try {
      vm = await Vm.boot({
        kernel: guest,
        vhostUser: [
          { type: "input", deviceId: VIRTIO_ID_INPUT, socket, eventSocket },
          { type: "input", deviceId: VIRTIO_ID_INPUT, socket: blindSocket },
        ],
      });
      await vm.input.type("ab");
      await vm.input.key(KEY_A);
      // The guest has not set the device up: the back end holds the events for it.
      const stats = await watcher.call({ stats: true });
      assert.equal((stats.stats as Record<string, number>).pendingEvents, 3 * EVENTS_PER_CHAR);
      assert.deepEqual(await vm.input.leds(), new Map(), "no LED set by the guest");
      assert.equal((await vm.input.leds()).get(LED_CAPSL), undefined);
      assert.throws(
        () => vm!.input.move(1, 1),
        new RegExp(
          `^Error: no mouse input device in this VM takes events from here: the vhost-user input back end on ${blindSocket} has no event socket`,
        ),
      );
      assert.equal(await vm.stop(), EXIT_SUCCESS);
      await vm.exitCode;
      await assert.rejects(vm.input.type("x"), /closed/, "the event-socket connection ends with the VM");
    } finally {
      await vm?.stop();
      for (const k of Object.keys(fake)) Deno.env.delete(k);
      watcher.close();
      await keyboard.stop();
      await mouse.stop();
    }
    // The back end saw a front end come and go, and nothing else.
    const other = keyboard.lines.filter((l) => !/listening on|front end disconnected; waiting/.test(l));
    assert.deepEqual(other, [], keyboard.stderr);
  });
});
