// The sound family: `run --virtio-snd KEYS` and `denovm device snd --socket-path PATH [--config KEYS]`, both
// with crosvm's SndParameters keys (google/crosvm devices/src/virtio/snd/parameters.rs; the `device snd`
// flags are crosvm's vhost_user_backend/snd Options): the virtio-snd device model (devices/virtio/sound/).
// See common.ts for how the family modules are organised.
//
// Keys (crosvm's spelling, with underscores):
//   capture=BOOL              input streams take samples from the host (default false: they capture silence)
//   backend=null|file         null: playback dropped, capture silent; file: WAV files (the default is null)
//   num_output_devices=N, num_input_devices=N, num_output_streams=N, num_input_streams=N   (default 1 each)
//   playback_path=DIR         file: each output stream plays into DIR/stream-<id>.wav
//   playback_size=BYTES       file: most data bytes per output file (0, the default: no limit but WAV's 4 GiB)
//   card_index=N              crosvm's card number (only named in logs)
//   capture_path=FILE         denovm: file with capture=true: the WAV file input streams capture
// crosvm's keys for its CRAS and AAudio back ends are accepted with one warning line (help.ts).

import { decodeKeyValues, parseKeyValues, UsageError, warn } from "../keyvalue.ts";
import { crosvmOnlyKeys } from "../help.ts";
import { SOUND_BACKENDS, type SoundBackendKind, type SoundConfig } from "../../config.ts";
import { ConfigError } from "../../../core/exit.ts";
import type { VirtioDevice } from "../../../devices/virtio/device.ts";
import { SND_MAX_STREAMS, SoundDevice } from "../../../devices/virtio/sound/device.ts";
import { makeSoundBackend } from "../../../devices/virtio/sound/backend.ts";
import { parseOptions, SOCKET_OPTIONS, socketPathOption } from "./common.ts";

/** crosvm's defaults (SndParameters::default). */
export function defaultSoundConfig(): SoundConfig {
  return {
    backend: "null",
    capture: false,
    numOutputDevices: 1,
    numInputDevices: 1,
    numOutputStreams: 1,
    numInputStreams: 1,
    playbackSize: 0,
    cardIndex: 0,
  };
}

/** The back ends crosvm has that denovm does not (sys/linux.rs, sys/windows.rs): refused by name. */
const CROSVM_ONLY_BACKENDS = ["cras", "aaudio", "vios", "winaudio"];

/** The keys of `--virtio-snd` / `device snd --config` (`option` names it in messages). */
export function parseSoundKeys(text: string, option: string): SoundConfig {
  const o = decodeKeyValues({
    option,
    keys: {
      capture: "bool",
      backend: "string",
      num_output_devices: "uint",
      num_input_devices: "uint",
      num_output_streams: "uint",
      num_input_streams: "uint",
      playback_path: "string",
      playback_size: "size",
      card_index: "uint",
      capture_path: "string",
    },
    crosvmOnly: crosvmOnlyKeys("virtio-snd"),
  }, text === "" ? [] : parseKeyValues(text, option));
  const cfg = defaultSoundConfig();
  if (o.backend !== undefined) {
    const b = o.backend as string;
    if (CROSVM_ONLY_BACKENDS.includes(b)) {
      throw new UsageError(`${option} backend=${b}: a crosvm back end denovm does not have (use null or file)`);
    }
    if (!(SOUND_BACKENDS as readonly string[]).includes(b)) {
      throw new UsageError(`${option} backend: "${b}" is not one of ${SOUND_BACKENDS.join(", ")}`);
    }
    cfg.backend = b as SoundBackendKind;
  }
  if (o.capture !== undefined) cfg.capture = o.capture as boolean;
  const count = (key: string, field: keyof SoundConfig) => {
    if (o[key] === undefined) return;
    const n = o[key] as number;
    if (n > SND_MAX_STREAMS) throw new UsageError(`${option} ${key}: ${n} is above ${SND_MAX_STREAMS}`);
    (cfg as unknown as Record<string, number>)[field] = n;
  };
  count("num_output_devices", "numOutputDevices");
  count("num_input_devices", "numInputDevices");
  count("num_output_streams", "numOutputStreams");
  count("num_input_streams", "numInputStreams");
  const streams = cfg.numOutputDevices * cfg.numOutputStreams + cfg.numInputDevices * cfg.numInputStreams;
  if (streams > SND_MAX_STREAMS) throw new UsageError(`${option}: ${streams} streams; at most ${SND_MAX_STREAMS}`);
  if (o.card_index !== undefined) cfg.cardIndex = o.card_index as number;
  if (o.playback_size !== undefined) cfg.playbackSize = o.playback_size as number;
  if (o.playback_path !== undefined) cfg.playbackPath = o.playback_path as string;
  if (o.capture_path !== undefined) cfg.capturePath = o.capture_path as string;
  if (cfg.backend === "file") {
    if (cfg.playbackPath === undefined) throw new UsageError(`${option}: backend=file needs playback_path=DIR`);
    if (cfg.capturePath !== undefined && !cfg.capture) {
      throw new UsageError(`${option}: capture_path needs capture=true`);
    }
  } else {
    for (const k of ["playback_path", "playback_size", "capture_path"]) {
      if (o[k] !== undefined) warn(`${option} ${k}: only the file back end uses it; ignored`);
    }
  }
  return cfg;
}

/** `run --virtio-snd KEYS`. */
export function parseSoundOption(text: string): SoundConfig {
  return parseSoundKeys(text, "--virtio-snd");
}

/** The device for `cfg`; a playback directory or capture file that does not do is a ConfigError (exit 35). */
export function createSoundDevice(cfg: SoundConfig): SoundDevice {
  try {
    return soundDeviceFor(cfg);
  } catch (e) {
    throw new ConfigError(`virtio-snd card ${cfg.cardIndex}: ${(e as Error).message}`);
  }
}

/** The device model and back end `cfg` describes (Errors with one line for what does not do). */
export function soundDeviceFor(cfg: SoundConfig): SoundDevice {
  const backend = makeSoundBackend(cfg.backend, {
    playbackPath: cfg.playbackPath ?? ".",
    playbackSize: cfg.playbackSize,
    capturePath: cfg.capture ? cfg.capturePath : undefined,
  });
  return new SoundDevice({
    backend,
    numOutputDevices: cfg.numOutputDevices,
    numInputDevices: cfg.numInputDevices,
    numOutputStreams: cfg.numOutputStreams,
    numInputStreams: cfg.numInputStreams,
  });
}

/** `denovm device snd --socket-path PATH [--config KEYS]` (crosvm's flags; `--socket` the older spelling). */
export const DEVICE_ARGS_USAGE = "usage: denovm device snd --socket-path PATH [--config KEY=VALUE,...]";

export function parseDeviceArgs(args: string[]): { socketPath: string; device: VirtioDevice } {
  const v = parseOptions("snd", args, { ...SOCKET_OPTIONS, config: { type: "string" }, fd: { type: "string" } });
  if (v.fd !== undefined) throw new UsageError("snd: --fd (a connected socket) is not supported; use --socket-path");
  const socketPath = socketPathOption("snd", v);
  const cfg = parseSoundKeys(v.config ?? "", "snd --config");
  return { socketPath, device: createSoundDevice(cfg) };
}
