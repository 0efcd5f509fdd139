// The sound test guest, shared by the virtio-snd Linux proofs (test/qemu/sound_test.ts under QEMU's
// vhost-user-snd front end, test/nested/linux_sound_test.ts under denovm itself): a kernel with the virtio
// sound driver and ALSA's aplay and arecord (scripts/sound-guest.sh), an initramfs holding them and a WAV
// to play, the commands the guest runs, and the checks of what came out.
//
// The kernel: Debian bookworm's 6.1 is built without the driver ("# CONFIG_SND_VIRTIO is not set" in its
// config), so the guest runs bookworm-backports' Debian kernel (6.12, CONFIG_SND_VIRTIO=m), with
// bookworm's alsa-utils, libasound2 and libc6.
//
// Both streams use the ALSA hw device with buffers longer than the sound, so a slow guest neither
// underruns nor overruns: aplay fills the whole buffer before the stream starts, and arecord's buffer holds
// all it records. aplay pads its last period with silence and the driver may let the device play one more
// period of the (zeroed) buffer before its STOP arrives: the host file must hold the WAV's samples exactly,
// then at most silence.

import assert from "node:assert/strict";
import { resolveDebianModules } from "./qemu.ts";
import { busyboxBaseEntries, busyboxInitScript, type CpioEntry, cpioNewc, S_IFREG } from "./guest_process.ts";
import type { DebianKernel } from "./kernel.ts";
import { readWavInfo, wavHeader } from "../../devices/virtio/sound/wav.ts";
import { VIRTIO_SND_PCM_FMT_S16 } from "../../devices/virtio/sound/constants.ts";

const REPO_ROOT = new URL("../../", import.meta.url).pathname;

/** What the guest plays: S16_LE stereo at 48 kHz, 0.5 s. */
export const PLAY = { format: VIRTIO_SND_PCM_FMT_S16, channels: 2, rate: 48000 };
const PLAY_FRAMES = 24000;
/** What the host offers for capture: S16_LE mono at 16 kHz, 1 s; the guest records the first 0.5 s. */
export const CAPTURE = { format: VIRTIO_SND_PCM_FMT_S16, channels: 1, rate: 16000 };
const CAPTURE_FRAMES = 16000;
const RECORD_FRAMES = 8000;
const BYTES_PER_S16 = 2;
const RECORD_BYTES = RECORD_FRAMES * CAPTURE.channels * BYTES_PER_S16;
/** The size of the WAV header arecord writes for PCM (RIFF, a 16-byte fmt chunk, the data header). */
const ARECORD_HEADER_BYTES = 44;
/** Where the guest's init prints the first recorded bytes. */
const CAPTURE_HEAD_MARK = "CAP-HEAD";

/** Samples no two of which repeat soon: a mismatch, a shift or a dropped period cannot pass unnoticed. */
function pattern(bytes: number, seed: number): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(bytes);
  let x = seed >>> 0;
  for (let i = 0; i < bytes; i++) {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0; // Numerical Recipes' LCG
    out[i] = x >>> 24;
  }
  return out;
}

/** What the guest plays (the samples of its /play.wav). */
export const PLAYED = pattern(PLAY_FRAMES * PLAY.channels * BYTES_PER_S16, 1);
/** What the host offers for capture (the samples of the capture file). */
export const OFFERED = pattern(CAPTURE_FRAMES * CAPTURE.channels * BYTES_PER_S16, 2);

/** A WAV file of `data` in format `f`. */
export function wavFile(f: typeof PLAY, data: Uint8Array): Uint8Array {
  const h = wavHeader(f, data.length);
  const out = new Uint8Array(h.length + data.length);
  out.set(h);
  out.set(data, h.length);
  return out;
}

/** The kernel and ALSA's tools, fetched once by scripts/sound-guest.sh. */
export interface SoundGuest {
  kernel: DebianKernel;
  /** The unpacked ALSA packages (usr/bin/aplay ...). */
  alsa: string;
}

/** scripts/sound-guest.sh's folder as a SoundGuest (it fetches on first use). */
export async function soundGuest(): Promise<SoundGuest> {
  const out = await new Deno.Command("bash", {
    args: [`${REPO_ROOT}scripts/sound-guest.sh`],
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (!out.success) {
    const err = new TextDecoder().decode(out.stderr).trim().split("\n").slice(-3).join("; ");
    throw new Error(`scripts/sound-guest.sh failed: ${err}`);
  }
  const dir = new TextDecoder().decode(out.stdout).trim().split("\n").pop()!;
  const version = Deno.readTextFileSync(`${dir}/kernel/version`).trim();
  return {
    // The bzImage only: no vmlinux is unpacked (QEMU and denovm both boot the bzImage).
    kernel: { vmlinuz: `${dir}/kernel/vmlinuz`, vmlinux: "", root: `${dir}/kernel/root`, version },
    alsa: `${dir}/alsa`,
  };
}

/** Every file under `dir` (symbolic links followed), as paths relative to it. */
function walk(dir: string, rel = ""): string[] {
  const out: string[] = [];
  for (const e of Deno.readDirSync(`${dir}/${rel}`)) {
    const p = rel ? `${rel}/${e.name}` : e.name;
    const st = Deno.statSync(`${dir}/${p}`);
    if (st.isDirectory) out.push(...walk(dir, p));
    else if (st.isFile) out.push(p);
  }
  return out;
}

/**
 * Linux's virtio_snd limits a stream's buffer to pcm_buffer_ms (a module parameter, 160 by default, which
 * at 16 kHz mono allows 0.25 s): loaded with more, arecord's buffer holds all it records.
 */
const PCM_BUFFER_MS = 2000;

/**
 * The shell commands of the guest's init: load virtio_snd (its dependencies are loaded before), play
 * /play.wav, record from the host, print what was recorded. aplay and arecord print their set-up (-v):
 * a failure's console shows the buffer and period sizes the driver gave.
 */
const GUEST_COMMANDS = `insmod /lib/modules/virtio_snd.ko pcm_buffer_ms=${PCM_BUFFER_MS}
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
n=0; while [ ! -e /dev/snd/pcmC0D0c ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n+1)); done
cat /proc/asound/cards
cat /proc/asound/pcm
aplay -v -D hw:0,0 -B 1000000 -F 50000 /play.wav
echo APLAY-DONE
arecord -v -D hw:0,0 -f S16_LE -c 1 -r ${CAPTURE.rate} -B 2000000 -F 50000 -s ${RECORD_FRAMES} -t wav /tmp/cap.wav
echo "cap-bytes=$(wc -c </tmp/cap.wav)"
echo "cap-sha=$(tail -c +$((${ARECORD_HEADER_BYTES} + 1)) /tmp/cap.wav | sha256sum)"
echo ${CAPTURE_HEAD_MARK}
tail -c +$((${ARECORD_HEADER_BYTES} + 1)) /tmp/cap.wav | head -c 32 | hexdump -v -e '32/1 "%02x" "\\n"'`;

/**
 * The initramfs (cpio newc): busybox, virtio_mmio and virtio_snd with their dependencies, ALSA's tools
 * with their libraries and configuration, /play.wav, and an init that runs GUEST_COMMANDS between
 * `markStart` and "`markEnd` status=N", then powers off.
 */
export function soundInitramfs(g: SoundGuest, markStart: string, markEnd: string): Uint8Array {
  const mods = resolveDebianModules(g.kernel, ["virtio_mmio", "virtio_snd"]);
  const files = new Map<string, Uint8Array>();
  const lib = "lib/x86_64-linux-gnu";
  for (const f of ["ld-linux-x86-64.so.2", "libc.so.6", "libm.so.6"]) {
    files.set(`${lib}/${f}`, Deno.readFileSync(`${g.alsa}/${lib}/${f}`));
  }
  // The ELF interpreter the programs name.
  files.set("lib64/ld-linux-x86-64.so.2", files.get(`${lib}/ld-linux-x86-64.so.2`)!);
  const asound = "usr/lib/x86_64-linux-gnu/libasound.so.2";
  files.set(asound, Deno.readFileSync(`${g.alsa}/${asound}`));
  // arecord is aplay by another name (it looks at argv[0]).
  const aplay = Deno.readFileSync(`${g.alsa}/usr/bin/aplay`);
  files.set("usr/bin/aplay", aplay);
  files.set("usr/bin/arecord", aplay);
  for (const f of walk(`${g.alsa}/usr/share/alsa`)) {
    files.set(`usr/share/alsa/${f}`, Deno.readFileSync(`${g.alsa}/usr/share/alsa/${f}`));
  }
  files.set("play.wav", wavFile(PLAY, PLAYED));
  const dirs = new Set(["bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"]);
  for (const name of files.keys()) {
    const parts = name.split("/");
    for (let i = 1; i < parts.length; i++) dirs.add(parts.slice(0, i).join("/"));
  }
  const entries: CpioEntry[] = busyboxBaseEntries([...dirs].sort(), mods);
  for (const [name, data] of files) entries.push({ name, mode: S_IFREG | 0o755, data });
  // virtio_snd itself (the last module) is loaded by GUEST_COMMANDS, with its parameter.
  const init = busyboxInitScript(mods.filter((m) => !m.endsWith("/virtio_snd.ko")), GUEST_COMMANDS, markStart, markEnd);
  entries.push({ name: "init", mode: S_IFREG | 0o755, data: new TextEncoder().encode(init) });
  return cpioNewc(entries);
}

/** The back end's configuration keys for a test folder `dir`: file back end, out/ and capture.wav (written here). */
export function prepareSoundDir(dir: string): string {
  Deno.writeFileSync(`${dir}/capture.wav`, wavFile(CAPTURE, OFFERED));
  Deno.mkdirSync(`${dir}/out`);
  return `backend=file,playback_path=${dir}/out,capture=true,capture_path=${dir}/capture.wav`;
}

/** aplay: the host's WAV (`dir`/out/stream-0.wav) holds the guest's samples exactly, then at most silence. */
export function checkPlayback(dir: string): void {
  const path = `${dir}/out/stream-0.wav`;
  const file = Deno.openSync(path);
  const info = readWavInfo(file, file.statSync().size);
  file.close();
  assert.deepEqual({ format: info.format, channels: info.channels, rate: info.rate }, PLAY);
  const host = Deno.readFileSync(path).subarray(info.dataOffset, info.dataOffset + info.dataBytes);
  assert.ok(host.length >= PLAYED.length, `the host got ${host.length} of ${PLAYED.length} bytes`);
  const first = host.subarray(0, PLAYED.length).findIndex((b, i) => b !== PLAYED[i]);
  assert.equal(first, -1, `first differing byte at ${first}`);
  const tail = host.subarray(PLAYED.length);
  assert.ok(tail.every((b) => b === 0), "what follows the samples is silence");
}

/** arecord: what the guest printed of its recording is the capture file's first samples exactly. */
export async function checkCapture(output: string): Promise<void> {
  assert.match(output, new RegExp(`cap-bytes=${ARECORD_HEADER_BYTES + RECORD_BYTES}\\b`));
  const expected = OFFERED.slice(0, RECORD_BYTES);
  const hex = (b: Uint8Array) => Array.from(b).map((x) => x.toString(16).padStart(2, "0")).join("");
  const sha = hex(new Uint8Array(await crypto.subtle.digest("SHA-256", expected)));
  const got = output.slice(output.indexOf(CAPTURE_HEAD_MARK)).split("\n")[1]?.trim();
  assert.equal(got, hex(expected.subarray(0, 32)), "the first 32 bytes recorded");
  assert.match(output, new RegExp(`cap-sha=${sha}\\b`), "every recorded byte");
}
