// Linux's virtio sound driver against `denovm device snd`, through QEMU 10's vhost-user-snd front end
// (TCG, -M microvm, virtio-mmio version 2): the guest plays a known WAV with aplay, which the file back
// end writes on the host, and records with arecord from a host WAV; both compared sample for sample. The
// guest (a kernel with the driver, ALSA's tools) and the checks are test/support/sound_guest.ts's. QEMU 10
// is bookworm-backports' (scripts/qemu-backports.sh): Debian's 7.2 has no vhost-user-snd.

import assert from "node:assert/strict";
import {
  backportsQemu,
  DeviceProcess,
  QEMU_MARK_END,
  QEMU_MARK_START,
  qemuHasDevice,
  QemuMachine,
  qemuUnavailableReason,
} from "../support/qemu.ts";
import { checkCapture, checkPlayback, prepareSoundDir, soundGuest, soundInitramfs } from "../support/sound_guest.ts";

const reason = qemuUnavailableReason();
if (reason) console.log(`skipping the QEMU sound test: ${reason}`);

Deno.test({
  name: "QEMU TCG: Linux's virtio_snd plays a WAV into `denovm device snd`'s file back end and records one from it",
  ignore: reason !== undefined,
  async fn(t) {
    const qemu = await backportsQemu();
    if (!qemuHasDevice(qemu, "vhost-user-snd")) {
      console.log(`skipping: QEMU ${qemu.version} has no vhost-user-snd device`);
      return;
    }
    const guest = await soundGuest();
    const dir = await Deno.makeTempDir({ prefix: "denovm-qemu-snd-" });
    const socket = `${dir}/snd.sock`;
    const backend = await DeviceProcess.start("snd", ["--socket-path", socket, "--config", prepareSoundDir(dir)]);
    const initramfs = `${dir}/initramfs.cpio`;
    Deno.writeFileSync(initramfs, soundInitramfs(guest, QEMU_MARK_START, QEMU_MARK_END));
    try {
      const vm = await QemuMachine.start({
        qemu,
        kernel: guest.kernel,
        initramfs,
        vhostUser: [{ device: "vhost-user-snd", socket }],
        hangGuardMs: 300_000,
      });
      const r = await vm.wait();
      assert.equal(r.commandStatus, 0, `guest commands failed:\n${r.output}\nback end:\n${backend.stderr}`);
      await t.step("aplay: the host's WAV holds the guest's samples exactly, then at most silence", () => {
        checkPlayback(dir);
      });
      await t.step("arecord: the guest's WAV holds the host file's first samples exactly", async () => {
        await checkCapture(r.output);
      });
    } finally {
      const status = await backend.stop();
      assert.equal(status.code, 0, `the back end exits cleanly on SIGTERM: ${backend.stderr}`);
      // The driver sent nothing the device refused (each refusal is a "virtio-snd: ..." line).
      assert.deepEqual(backend.lines.filter((l) => l.startsWith("virtio-snd")), [], backend.stderr);
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});
