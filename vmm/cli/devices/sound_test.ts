// The sound family's command line: `run --virtio-snd` with crosvm's keys, and `denovm device snd`.

import assert from "node:assert/strict";
import { defaultSoundConfig, parseDeviceArgs, parseSoundOption } from "./sound.ts";
import { parseRunArgs } from "../run.ts";
import { collectWarnings, UsageError } from "../keyvalue.ts";
import { ConfigError, EXIT_INVALID_ARGS } from "../../../core/exit.ts";
import { defaultVmConfig } from "../../config.ts";
import { createVirtioDevices } from "../../device_manager/virtio_devices.ts";
import { SoundDevice } from "../../../devices/virtio/sound/device.ts";
import { DeviceProcess } from "../../../test/support/device_process.ts";

Deno.test("snd cli: crosvm's keys and defaults", () => {
  assert.deepEqual(parseSoundOption(""), defaultSoundConfig());
  assert.deepEqual(
    parseSoundOption(
      "capture=true,backend=file,num_output_devices=2,num_input_devices=0,num_output_streams=3," +
        "num_input_streams=2,playback_path=/tmp/snd,playback_size=4096,card_index=1,capture_path=/tmp/in.wav",
    ),
    {
      backend: "file",
      capture: true,
      numOutputDevices: 2,
      numInputDevices: 0,
      numOutputStreams: 3,
      numInputStreams: 2,
      playbackPath: "/tmp/snd",
      playbackSize: 4096,
      capturePath: "/tmp/in.wav",
      cardIndex: 1,
    },
  );
  // A bare key is true (serde_keyvalue).
  assert.equal(parseSoundOption("capture").capture, true);
});

Deno.test("snd cli: bad keys and values are one-line usage errors", () => {
  const bad: [string, RegExp][] = [
    ["capture=none", /capture/],
    ["backend=cras", /crosvm back end denovm does not have/],
    ["backend=alsa", /not one of null, file/],
    ["backend=file", /needs playback_path/],
    ["backend=file,playback_path=/tmp,capture_path=/x.wav", /capture_path needs capture=true/],
    ["num_output_devices=65", /above 64/],
    ["num_output_devices=8,num_output_streams=8,num_input_devices=1", /at most 64/],
    ["volume=3", /unknown key "volume"/],
    ["capture=true,capture=false", /given twice/],
  ];
  for (const [text, re] of bad) {
    assert.throws(() => parseSoundOption(text), (e: Error) => e instanceof UsageError && re.test(e.message), text);
  }
});

Deno.test("snd cli: crosvm's CRAS keys are accepted with one warning each", () => {
  const { value, warnings } = collectWarnings(() =>
    parseSoundOption("client_type=crosvm,socket_type=unified,unmap_guest_memory_on_fork=true")
  );
  assert.deepEqual(value, defaultSoundConfig());
  assert.equal(warnings.length, 3);
  const { warnings: w2 } = collectWarnings(() => parseSoundOption("playback_path=/tmp"));
  assert.deepEqual(w2, ["--virtio-snd playback_path: only the file back end uses it; ignored"]);
});

Deno.test("snd cli: run --virtio-snd adds a sound device to the VM", async () => {
  const cmd = parseRunArgs(["--virtio-snd", "num_input_devices=0", "--virtio-snd", "capture=true", "/vmlinuz"], {
    checkFiles: false,
  });
  assert.equal(cmd.config.sounds?.length, 2);
  const { devices } = await createVirtioDevices(
    { ...defaultVmConfig("/k"), rng: false, balloon: false, sounds: cmd.config.sounds },
    { serialOutput: () => Promise.resolve(() => {}), defaultVsockPath: "/nonexistent" },
  );
  try {
    assert.deepEqual(devices.map((d) => d.name), ["snd", "snd"]);
    assert.equal((devices[0] as SoundDevice).streamCount, 1);
    assert.equal((devices[1] as SoundDevice).streamCount, 2);
  } finally {
    for (const d of devices) d.close?.();
  }
  // A playback directory that is not there: the user's error (exit 35), one line.
  await assert.rejects(
    () =>
      createVirtioDevices(
        {
          ...defaultVmConfig("/k"),
          sounds: [{ ...defaultSoundConfig(), backend: "file", playbackPath: "/nonexistent/x" }],
        },
        { serialOutput: () => Promise.resolve(() => {}), defaultVsockPath: "/nonexistent" },
      ),
    (e: Error) => e instanceof ConfigError && /playback_path \/nonexistent\/x/.test(e.message),
  );
});

Deno.test("snd cli: device snd takes crosvm's --socket-path and --config", () => {
  const dir = Deno.makeTempDirSync();
  try {
    const { socketPath, device } = parseDeviceArgs([
      "--socket-path",
      `${dir}/s`,
      "--config",
      `backend=file,playback_path=${dir},num_input_devices=0`,
    ]);
    assert.equal(socketPath, `${dir}/s`);
    assert.equal((device as SoundDevice).streamCount, 1);
    device.close?.();
    assert.throws(() => parseDeviceArgs(["--config", "capture=true"]), /--socket-path PATH is required/);
    assert.throws(() => parseDeviceArgs(["--socket-path", "s", "--fd", "3"]), /--fd/);
    assert.throws(
      () => parseDeviceArgs(["--socket-path", "s", "--config", `backend=file,playback_path=${dir}/none`]),
      ConfigError,
    );
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("snd cli: denovm device snd listens, and refuses a bad config with exit 35 and one line", async () => {
  const dir = Deno.makeTempDirSync();
  try {
    const bad = DeviceProcess.spawn("snd", ["--socket-path", `${dir}/s`, "--config", "backend=cras"]);
    const st = await bad.exited;
    assert.equal(st.code, EXIT_INVALID_ARGS);
    assert.equal(bad.lines.length, 1, bad.stderr);
    const p = await DeviceProcess.start("snd", [
      "--socket-path",
      `${dir}/s`,
      "--config",
      `backend=file,playback_path=${dir}`,
    ]);
    assert.equal((await p.stop()).success, true);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});
