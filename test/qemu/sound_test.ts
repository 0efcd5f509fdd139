// Linux's virtio sound driver against `denovm device snd`, through QEMU 10's vhost-user-snd front end
// (TCG, -M microvm, virtio-mmio version 2): the guest plays a known WAV with aplay, which the file back
// end writes on the host, and records with arecord from a host WAV; both compared sample for sample.
//
// The kernel: Debian bookworm's 6.1 is built without the driver ("# CONFIG_SND_VIRTIO is not set" in
// its config), so the guest runs bookworm-backports' Debian kernel (6.12, CONFIG_SND_VIRTIO=m), with
// bookworm's alsa-utils, libasound2 and libc6 in the initramfs: scripts/sound-guest.sh fetches and
// caches them. QEMU 10 is bookworm-backports' (scripts/qemu-backports.sh): Debian's 7.2 has no
// vhost-user-snd.
//
// Both streams use the ALSA hw device with buffers longer than the sound, so a guest slowed by TCG
// neither underruns nor overruns: aplay fills the whole buffer before the stream starts, and arecord's
// buffer holds all it records. aplay pads its last period with silence and the driver may let the
// device play one more period of the (zeroed) buffer before its STOP arrives: the host file must hold
// the WAV's samples exactly, then at most silence.

import assert from "node:assert/strict";
import {
  backportsQemu,
  DeviceProcess,
  QEMU_MARK_END,
  QEMU_MARK_START,
  qemuHasDevice,
  QemuMachine,
  qemuUnavailableReason,
  resolveDebianModules,
} from "../support/qemu.ts";
import { busyboxBaseEntries, busyboxInitScript, type CpioEntry, cpioNewc, S_IFREG } from "../support/guest_process.ts";
import type { DebianKernel } from "../support/kernel.ts";
import { readWavInfo, wavHeader } from "../../devices/virtio/sound/wav.ts";
import { VIRTIO_SND_PCM_FMT_S16 } from "../../devices/virtio/sound/constants.ts";

const REPO_ROOT = new URL("../../", import.meta.url).pathname;
const reason = qemuUnavailableReason();
if (reason) console.log(`skipping the QEMU sound test: ${reason}`);

/** What the guest plays: S16_LE stereo at 48 kHz, 0.5 s. */
const PLAY = { format: VIRTIO_SND_PCM_FMT_S16, channels: 2, rate: 48000 };
const PLAY_FRAMES = 24000;
/** What the host offers for capture: S16_LE mono at 16 kHz, 1 s; the guest records the first 0.5 s. */
const CAPTURE = { format: VIRTIO_SND_PCM_FMT_S16, channels: 1, rate: 16000 };
const CAPTURE_FRAMES = 16000;
const RECORD_FRAMES = 8000;
const BYTES_PER_S16 = 2;
/** The size of the WAV header arecord writes for PCM (RIFF, a 16-byte fmt chunk, the data header). */
const ARECORD_HEADER_BYTES = 44;

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

function wav(f: typeof PLAY, data: Uint8Array): Uint8Array {
  const h = wavHeader(f, data.length);
  const out = new Uint8Array(h.length + data.length);
  out.set(h);
  out.set(data, h.length);
  return out;
}

async function soundGuest(): Promise<string> {
  const out = await new Deno.Command("bash", {
    args: [`${REPO_ROOT}scripts/sound-guest.sh`],
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (!out.success) {
    const err = new TextDecoder().decode(out.stderr).trim().split("\n").slice(-3).join("; ");
    throw new Error(`scripts/sound-guest.sh failed: ${err}`);
  }
  return new TextDecoder().decode(out.stdout).trim().split("\n").pop()!;
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

/** The initramfs: busybox, the modules, ALSA's tools with their libraries and configuration, the WAV to play. */
function initramfs(k: DebianKernel, alsa: string, playWav: Uint8Array, commands: string): Uint8Array {
  const mods = resolveDebianModules(k, ["virtio_mmio", "virtio_snd"]);
  const files = new Map<string, Uint8Array>();
  const lib = "lib/x86_64-linux-gnu";
  for (const f of ["ld-linux-x86-64.so.2", "libc.so.6", "libm.so.6"]) {
    files.set(`${lib}/${f}`, Deno.readFileSync(`${alsa}/${lib}/${f}`));
  }
  // The ELF interpreter the programs name.
  files.set("lib64/ld-linux-x86-64.so.2", files.get(`${lib}/ld-linux-x86-64.so.2`)!);
  files.set(
    "usr/lib/x86_64-linux-gnu/libasound.so.2",
    Deno.readFileSync(`${alsa}/usr/lib/x86_64-linux-gnu/libasound.so.2`),
  );
  // aplay is arecord by another name (it looks at argv[0]).
  const aplay = Deno.readFileSync(`${alsa}/usr/bin/aplay`);
  files.set("usr/bin/aplay", aplay);
  files.set("usr/bin/arecord", aplay);
  for (const f of walk(`${alsa}/usr/share/alsa`)) {
    files.set(`usr/share/alsa/${f}`, Deno.readFileSync(`${alsa}/usr/share/alsa/${f}`));
  }
  files.set("play.wav", playWav);
  const dirs = new Set(["bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"]);
  for (const name of files.keys()) {
    const parts = name.split("/");
    for (let i = 1; i < parts.length; i++) dirs.add(parts.slice(0, i).join("/"));
  }
  const entries: CpioEntry[] = busyboxBaseEntries([...dirs].sort(), mods);
  for (const [name, data] of files) entries.push({ name, mode: S_IFREG | 0o755, data });
  const init = busyboxInitScript(mods, commands, QEMU_MARK_START, QEMU_MARK_END);
  entries.push({ name: "init", mode: S_IFREG | 0o755, data: new TextEncoder().encode(init) });
  return cpioNewc(entries);
}

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
    const version = Deno.readTextFileSync(`${guest}/kernel/version`).trim();
    const kernel: DebianKernel = {
      vmlinuz: `${guest}/kernel/vmlinuz`,
      vmlinux: "",
      root: `${guest}/kernel/root`,
      version,
    };
    const dir = await Deno.makeTempDir({ prefix: "denovm-qemu-snd-" });
    const played = pattern(PLAY_FRAMES * PLAY.channels * BYTES_PER_S16, 1);
    const offered = pattern(CAPTURE_FRAMES * CAPTURE.channels * BYTES_PER_S16, 2);
    Deno.writeFileSync(`${dir}/capture.wav`, wav(CAPTURE, offered));
    Deno.mkdirSync(`${dir}/out`);
    const socket = `${dir}/snd.sock`;
    const backend = await DeviceProcess.start("snd", [
      "--socket-path",
      socket,
      "--config",
      `backend=file,playback_path=${dir}/out,capture=true,capture_path=${dir}/capture.wav`,
    ]);
    const ramfs = `${dir}/initramfs.cpio`;
    const recordBytes = RECORD_FRAMES * CAPTURE.channels * BYTES_PER_S16;
    Deno.writeFileSync(
      ramfs,
      initramfs(
        kernel,
        `${guest}/alsa`,
        wav(PLAY, played),
        `export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
n=0; while [ ! -e /dev/snd/pcmC0D0c ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n+1)); done
cat /proc/asound/cards
cat /proc/asound/pcm
aplay -D hw:0,0 -B 1000000 -F 50000 /play.wav
echo APLAY-DONE
arecord -D hw:0,0 -f S16_LE -c 1 -r 16000 -B 2000000 -F 50000 -s ${RECORD_FRAMES} -t wav /tmp/cap.wav
echo "cap-bytes=$(wc -c </tmp/cap.wav)"
echo "cap-sha=$(tail -c +$((${ARECORD_HEADER_BYTES} + 1)) /tmp/cap.wav | sha256sum)"
echo CAP-HEAD
tail -c +$((${ARECORD_HEADER_BYTES} + 1)) /tmp/cap.wav | head -c 32 | hexdump -v -e '32/1 "%02x" "\\n"'`,
      ),
    );
    let output = "";
    try {
      const vm = await QemuMachine.start({
        qemu,
        kernel,
        initramfs: ramfs,
        vhostUser: [{ device: "vhost-user-snd", socket }],
        hangGuardMs: 300_000,
      });
      const r = await vm.wait();
      output = r.output;
      assert.equal(r.commandStatus, 0, `guest commands failed:\n${r.output}\nback end:\n${backend.stderr}`);

      await t.step("aplay: the host's WAV holds the guest's samples exactly, then at most silence", () => {
        const file = Deno.openSync(`${dir}/out/stream-0.wav`);
        const info = readWavInfo(file, file.statSync().size);
        file.close();
        assert.deepEqual({ format: info.format, channels: info.channels, rate: info.rate }, PLAY);
        const host = Deno.readFileSync(`${dir}/out/stream-0.wav`).subarray(
          info.dataOffset,
          info.dataOffset + info.dataBytes,
        );
        assert.ok(host.length >= played.length, `the host got ${host.length} of ${played.length} bytes`);
        const first = host.subarray(0, played.length).findIndex((b, i) => b !== played[i]);
        assert.equal(first, -1, `first differing byte at ${first}`);
        const tail = host.subarray(played.length);
        assert.ok(tail.every((b) => b === 0), "what follows the samples is silence");
        console.log(`host WAV: ${played.length} bytes as played, then ${tail.length} bytes of silence`);
      });

      await t.step("arecord: the guest's WAV holds the host file's first samples exactly", async () => {
        assert.match(output, new RegExp(`cap-bytes=${ARECORD_HEADER_BYTES + recordBytes}\\b`));
        const expected = offered.slice(0, recordBytes);
        const sha = Array.from(new Uint8Array(await crypto.subtle.digest("SHA-256", expected)))
          .map((b) => b.toString(16).padStart(2, "0")).join("");
        const head = Array.from(expected.subarray(0, 32)).map((b) => b.toString(16).padStart(2, "0")).join("");
        const got = output.slice(output.indexOf("CAP-HEAD")).split("\n")[1]?.trim();
        assert.equal(got, head, "the first 32 bytes recorded");
        assert.match(output, new RegExp(`cap-sha=${sha}\\b`), "every recorded byte");
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
