// Linux's virtio sound driver under denovm itself: `--virtio-snd` with the file back end, the guest of
// test/support/sound_guest.ts (Debian's bookworm-backports kernel, whose config has the driver, with ALSA's
// aplay and arecord) plays a known WAV, which the host's WAV file must hold sample for sample, and records
// from a host WAV, whose samples the guest's recording must be; then the same through denovm's vhost-user front
// end to `denovm device snd` (denovm's own back end checked the way other projects' back ends are). Needs a KVM that runs unmodified kernels
// (the nested host when this machine has none: test/nested/nested_kvm_test.ts lists this file).

import assert from "node:assert/strict";
import { type BootConfig, Vm } from "../../mod.ts";
import { guestLog } from "../../core/log.ts";
import { parseSoundOption } from "../../vmm/cli/devices/sound.ts";
import { fullLinuxUnavailable, LINUX_CPUS } from "../support/default_guest.ts";
import {
  checkCapture,
  checkPlayback,
  prepareSoundDir,
  type SoundGuest,
  soundGuest,
  soundInitramfs,
} from "../support/sound_guest.ts";
import { within } from "../support/within.ts";
import { DeviceProcess } from "../support/device_process.ts";
import { VIRTIO_ID_SOUND } from "../../devices/virtio/device.ts";

/** The markers the guest's init prints around its commands. */
const MARK_START = "SOUND-INIT-START";
const MARK_END = "SOUND-INIT-END";

const unavailable = fullLinuxUnavailable();
if (unavailable) console.log(`skip: linux sound: ${unavailable}`);

/**
 * Boots the sound guest with `devices` (its files in `dir`), waits for its commands to end with status 0 and
 * for it to power off, then runs `check` with its console output while the VM is still there.
 */
async function runSoundGuest(
  guest: SoundGuest,
  dir: string,
  devices: Partial<BootConfig>,
  check: (output: string) => Promise<void>,
): Promise<void> {
  const initrd = `${dir}/initramfs.cpio`;
  Deno.writeFileSync(initrd, soundInitramfs(guest, MARK_START, MARK_END));
  await using vm = await Vm.boot({
    kernel: guest.kernel.vmlinuz,
    initrd,
    params: ["console=ttyS0"],
    memMiB: 256,
    cpus: LINUX_CPUS,
    rng: false,
    balloon: false,
    ...devices,
  });
  // Under nested_kvm_test.ts's 8 silent minutes: a guest that hangs fails here, with its console.
  await vm.console.waitFor(new RegExp(`${MARK_END} status=\\d+`), { timeout: 300_000 });
  const output = vm.console.text;
  assert.match(output, new RegExp(`${MARK_END} status=0`), `guest commands failed:\n${output}`);
  assert.equal(await within(vm.exitCode, () => "the guest did not power off", 60_000), 0);
  await check(output);
}

Deno.test({
  name: "linux: virtio_snd under denovm plays a WAV into --virtio-snd's file back end and records one from it",
  ignore: unavailable !== undefined,
  async fn(t) {
    const guest = await soundGuest();
    const dir = await Deno.makeTempDir({ prefix: "denovm-linux-snd-" });
    const lines: string[] = [];
    const sink = guestLog.sink;
    guestLog.sink = (l) => {
      lines.push(l);
      sink(l);
    };
    try {
      const sound = parseSoundOption(prepareSoundDir(dir));
      await runSoundGuest(guest, dir, { sounds: [sound] }, async (output) => {
        await t.step("aplay: the host's WAV holds the guest's samples exactly, then at most silence", () => {
          checkPlayback(dir);
        });
        await t.step("arecord: the guest's WAV holds the host file's first samples exactly", async () => {
          await checkCapture(output);
        });
        // The driver sent nothing the device refused (each refusal is a "virtio-snd: ..." line).
        assert.deepEqual(lines.filter((l) => l.startsWith("virtio-snd")), []);
      });
    } finally {
      guestLog.sink = sink;
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});

Deno.test({
  name: "linux: virtio_snd through denovm's vhost-user front end to `denovm device snd` plays and records the same",
  ignore: unavailable !== undefined,
  async fn() {
    const guest = await soundGuest();
    const dir = await Deno.makeTempDir({ prefix: "denovm-linux-snd-vu-" });
    const socket = `${dir}/snd.sock`;
    const backend = await DeviceProcess.start("snd", ["--socket-path", socket, "--config", prepareSoundDir(dir)]);
    try {
      const vhostUser = [{ type: "sound", deviceId: VIRTIO_ID_SOUND, socket }];
      await runSoundGuest(guest, dir, { vhostUser }, async (output) => {
        // The back end's file holds what aplay played; the guest's recording is the back end's capture file.
        checkPlayback(dir);
        await checkCapture(output);
        // The back end refused nothing the driver sent (each refusal is one "virtio-snd: ..." line).
        assert.deepEqual(backend.lines.filter((l) => l.includes("virtio-snd:")), [], backend.stderr);
      });
    } finally {
      await backend.stop();
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});
