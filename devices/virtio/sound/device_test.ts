// virtio-snd driven through the virtio-mmio registers by the test driver, on a manual clock (so the
// pacing is asserted by the clock's time, not by waiting).

import assert from "node:assert/strict";
import fc from "fast-check";
import { SND_DATA_QUEUE_SIZE, type SoundClock, SoundDevice, type SoundOptions } from "./device.ts";
import { FileBackend } from "./backend.ts";
import { readWavInfo, WAV_HEADER_SIZE, wavHeader } from "./wav.ts";
import {
  PCM_RATES,
  SND_PCM_INFO_SIZE,
  SUPPORTED_FORMATS,
  SUPPORTED_RATES,
  VIRTIO_SND_CHMAP_FL,
  VIRTIO_SND_CHMAP_FR,
  VIRTIO_SND_D_INPUT,
  VIRTIO_SND_D_OUTPUT,
  VIRTIO_SND_EVT_JACK_DISCONNECTED,
  VIRTIO_SND_PCM_FMT_S16,
  VIRTIO_SND_PCM_FMT_U8,
  VIRTIO_SND_R_CHMAP_INFO,
  VIRTIO_SND_R_JACK_INFO,
  VIRTIO_SND_R_JACK_REMAP,
  VIRTIO_SND_R_PCM_INFO,
  VIRTIO_SND_R_PCM_PREPARE,
  VIRTIO_SND_R_PCM_RELEASE,
  VIRTIO_SND_R_PCM_SET_PARAMS,
  VIRTIO_SND_R_PCM_START,
  VIRTIO_SND_R_PCM_STOP,
  VIRTIO_SND_S_BAD_MSG,
  VIRTIO_SND_S_NOT_SUPP,
  VIRTIO_SND_S_OK,
  VIRTIO_SND_VQ_CONTROL,
  VIRTIO_SND_VQ_EVENT,
  VIRTIO_SND_VQ_RX,
  VIRTIO_SND_VQ_TX,
} from "./constants.ts";
import { VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_STATUS } from "../mmio.ts";
import { VIRTIO_ID_SOUND } from "../device.ts";
import { GuardedGuestMemory, type Segment } from "../../../test/support/virtio_driver.ts";
import {
  assertRefused,
  captureVirtioLog,
  closeDeviceRig,
  mmioRig,
  saveAndRestore,
  withData,
} from "../../../test/support/device_rig.ts";

const MiB = 1024 * 1024;
/** Index of 48000 Hz in the rate enum, of 8000 Hz. */
const RATE_48000 = PCM_RATES.indexOf(48000);
const RATE_8000 = PCM_RATES.indexOf(8000);

/** A temporary directory, removed with what is in it at the end of the scope. */
function tempDir(): { path: string; [Symbol.dispose](): void } {
  const path = Deno.makeTempDirSync({ prefix: "denovm-snd-" });
  return { path, [Symbol.dispose]: () => Deno.removeSync(path, { recursive: true }) };
}

/** Timers that fire only when the test advances the time. */
class ManualClock implements SoundClock {
  t = 0;
  #next = 1;
  readonly timers = new Map<number, { at: number; fn: () => void }>();
  now(): number {
    return this.t;
  }
  setTimer(fn: () => void, ms: number): unknown {
    const id = this.#next++;
    this.timers.set(id, { at: this.t + ms, fn });
    return id;
  }
  clearTimer(id: unknown): void {
    this.timers.delete(id as number);
  }
  /** Moves the time on by `ms`, firing every timer due on the way, in order. */
  advance(ms: number): void {
    const end = this.t + ms;
    for (;;) {
      let first: [number, { at: number; fn: () => void }] | undefined;
      for (const e of this.timers) if (e[1].at <= end && (!first || e[1].at < first[1].at)) first = e;
      if (!first) break;
      this.timers.delete(first[0]);
      this.t = Math.max(this.t, first[1].at);
      first[1].fn();
    }
    this.t = end;
  }
}

function u32s(...v: number[]): Uint8Array {
  const b = new Uint8Array(v.length * 4);
  v.forEach((x, i) => new DataView(b.buffer).setUint32(i * 4, x, true));
  return b;
}

function setParams(
  stream: number,
  p: { buffer: number; period: number; channels: number; format: number; rate: number; features?: number },
): Uint8Array {
  const b = new Uint8Array(24);
  const v = new DataView(b.buffer);
  v.setUint32(0, VIRTIO_SND_R_PCM_SET_PARAMS, true);
  v.setUint32(4, stream, true);
  v.setUint32(8, p.buffer, true);
  v.setUint32(12, p.period, true);
  v.setUint32(16, p.features ?? 0, true);
  b[20] = p.channels;
  b[21] = p.format;
  b[22] = p.rate;
  return b;
}

function rig(opts: SoundOptions = {}) {
  const clock = new ManualClock();
  const dev = new SoundDevice({ clock, ...opts });
  const g = new GuardedGuestMemory([{ start: 0, size: 8 * MiB }]);
  const { drv, irqs } = mmioRig(dev, g.mem, 8 * MiB);
  drv.init();
  const log = captureVirtioLog();
  const r = {
    dev,
    drv,
    g,
    irqs,
    clock,
    lines: log.lines,
    /** One control request; returns the status and the answer's bytes after it. */
    control(req: Uint8Array, answer = 0): { status: number; body: Uint8Array; len: number } {
      const q = drv.queues[VIRTIO_SND_VQ_CONTROL];
      const mark = drv.alloc.mark();
      const sub = q.submit([req, 4 + answer]);
      drv.kick(VIRTIO_SND_VQ_CONTROL);
      const used = q.used();
      assert.equal(used.length, 1);
      const out = sub.buffers[1];
      const bytes = g.mem.read(out.addr, out.len);
      drv.alloc.resetTo(mark);
      return {
        status: new DataView(bytes.buffer, bytes.byteOffset).getUint32(0, true),
        body: bytes.slice(4),
        len: used[0].len,
      };
    },
    ok(req: Uint8Array): void {
      assert.equal(r.control(req).status, VIRTIO_SND_S_OK);
    },
    pcm(code: number, stream: number): number {
      return r.control(u32s(code, stream)).status;
    },
    /** A tx message: header, samples, room for the status. */
    tx(stream: number, samples: Uint8Array): { head: number; statusAddr: number } {
      const q = drv.queues[VIRTIO_SND_VQ_TX];
      const sub = q.submit([u32s(stream), samples, 8]);
      drv.kick(VIRTIO_SND_VQ_TX);
      return { head: sub.head, statusAddr: sub.buffers[2].addr };
    },
    /** An rx message: header, room for `bytes` samples and the status. */
    rx(stream: number, bytes: number): { head: number; dataAddr: number; statusAddr: number } {
      const q = drv.queues[VIRTIO_SND_VQ_RX];
      const segs: Segment[] = [u32s(stream), bytes, 8];
      const sub = q.submit(segs);
      drv.kick(VIRTIO_SND_VQ_RX);
      return { head: sub.head, dataAddr: sub.buffers[1].addr, statusAddr: sub.buffers[2].addr };
    },
    status(addr: number): number {
      return g.mem.getU32(addr);
    },
    [Symbol.dispose]() {
      closeDeviceRig(log, g, dev);
    },
  };
  return r;
}

Deno.test("snd: device id, config space as crosvm lays it out (streams, chmaps, jacks)", () => {
  using r = rig({ numOutputDevices: 2, numInputDevices: 1, numOutputStreams: 2 });
  assert.equal(r.drv.readReg(VIRTIO_MMIO_DEVICE_ID), VIRTIO_ID_SOUND);
  const cfg = new DataView(r.drv.readConfig(0, 12).buffer);
  assert.equal(cfg.getUint32(0, true), 0, "jacks");
  assert.equal(cfg.getUint32(4, true), 5, "streams: 2 devices × 2 outputs + 1 input");
  assert.equal(cfg.getUint32(8, true), 2 * 3 + 1, "chmaps: 3 per output device, 1 per input device");
});

Deno.test("snd: PCM_INFO, CHMAP_INFO and JACK_INFO answer what the device offers", () => {
  using r = rig({ jacks: 2 });
  const pcm = r.control(u32s(VIRTIO_SND_R_PCM_INFO, 0, 2, SND_PCM_INFO_SIZE), 2 * SND_PCM_INFO_SIZE);
  assert.equal(pcm.status, VIRTIO_SND_S_OK);
  assert.equal(pcm.len, 4 + 2 * SND_PCM_INFO_SIZE);
  const v = new DataView(pcm.body.buffer);
  assert.equal(v.getBigUint64(8, true), SUPPORTED_FORMATS);
  assert.equal(v.getBigUint64(16, true), SUPPORTED_RATES);
  assert.deepEqual([pcm.body[24], pcm.body[25], pcm.body[26]], [VIRTIO_SND_D_OUTPUT, 1, 6]);
  assert.deepEqual([pcm.body[32 + 24], pcm.body[32 + 25], pcm.body[32 + 26]], [VIRTIO_SND_D_INPUT, 1, 2]);
  const chmap = r.control(u32s(VIRTIO_SND_R_CHMAP_INFO, 0, 1, 24), 24);
  assert.equal(chmap.status, VIRTIO_SND_S_OK);
  assert.deepEqual([...chmap.body.subarray(4, 8)], [VIRTIO_SND_D_OUTPUT, 2, VIRTIO_SND_CHMAP_FL, VIRTIO_SND_CHMAP_FR]);
  const jack = r.control(u32s(VIRTIO_SND_R_JACK_INFO, 1, 1, 24), 24);
  assert.equal(jack.status, VIRTIO_SND_S_OK);
  assert.equal(jack.body[16], 1, "connected");
  // Larger items are padded; a start past the end, too many, too small items or no room: BAD_MSG.
  assert.equal(r.control(u32s(VIRTIO_SND_R_PCM_INFO, 1, 1, 40), 40).status, VIRTIO_SND_S_OK);
  assert.equal(r.control(u32s(VIRTIO_SND_R_PCM_INFO, 2, 1, 32), 32).status, VIRTIO_SND_S_BAD_MSG);
  assert.equal(r.control(u32s(VIRTIO_SND_R_PCM_INFO, 0, 0xffffffff, 32), 32).status, VIRTIO_SND_S_BAD_MSG);
  assert.equal(r.control(u32s(VIRTIO_SND_R_PCM_INFO, 0, 1, 16), 32).status, VIRTIO_SND_S_BAD_MSG);
  assert.equal(r.control(u32s(VIRTIO_SND_R_PCM_INFO, 0, 2, 0xffffffff), 64).status, VIRTIO_SND_S_BAD_MSG);
  assert.equal(r.control(u32s(VIRTIO_SND_R_PCM_INFO, 0, 2, 32), 40).status, VIRTIO_SND_S_BAD_MSG);
  assert.equal(r.control(u32s(VIRTIO_SND_R_JACK_REMAP, 0, 0, 0)).status, VIRTIO_SND_S_NOT_SUPP);
  assert.equal(r.control(u32s(VIRTIO_SND_R_JACK_REMAP, 5, 0, 0)).status, VIRTIO_SND_S_BAD_MSG);
});

Deno.test("snd: playback is paced at the stream's rate, period by period, into the file back end's WAV", () => {
  using dir = tempDir();
  using r = rig({ backend: new FileBackend({ playbackPath: dir.path }) });
  // S16 stereo at 48 kHz: 192000 bytes a second; a 1920-byte period is 10 ms.
  r.ok(setParams(0, { buffer: 4 * 1920, period: 1920, channels: 2, format: VIRTIO_SND_PCM_FMT_S16, rate: RATE_48000 }));
  r.ok(u32s(VIRTIO_SND_R_PCM_PREPARE, 0));
  const periods = [0, 1, 2].map((i) => Uint8Array.from({ length: 1920 }, (_, j) => (i * 7 + j) & 0xff));
  const msgs = periods.map((p) => r.tx(0, p));
  const q = r.drv.queues[VIRTIO_SND_VQ_TX];
  assert.deepEqual(q.used(), [], "nothing is played before START");
  r.ok(u32s(VIRTIO_SND_R_PCM_START, 0));
  assert.deepEqual(q.used(), []);
  r.clock.advance(9);
  assert.deepEqual(q.used(), [], "the first period is not over after 9 ms");
  r.clock.advance(1);
  assert.deepEqual(q.used(), [{ id: msgs[0].head, len: 8 }]);
  assert.equal(r.status(msgs[0].statusAddr), VIRTIO_SND_S_OK);
  r.clock.advance(20);
  assert.deepEqual(q.used().map((u) => u.id), [msgs[1].head, msgs[2].head]);
  // Out of messages: the clock picks up at the next one.
  r.clock.advance(100);
  const late = r.tx(0, new Uint8Array(1920).fill(9));
  assert.deepEqual(q.used(), []);
  r.clock.advance(10);
  assert.deepEqual(q.used().map((u) => u.id), [late.head]);
  r.ok(u32s(VIRTIO_SND_R_PCM_STOP, 0));
  r.ok(u32s(VIRTIO_SND_R_PCM_RELEASE, 0));
  const file = Deno.readFileSync(`${dir.path}/stream-0.wav`);
  assert.deepEqual(
    file.subarray(0, WAV_HEADER_SIZE),
    wavHeader({ format: VIRTIO_SND_PCM_FMT_S16, channels: 2, rate: 48000 }, 4 * 1920),
  );
  assert.deepEqual(
    file.subarray(WAV_HEADER_SIZE),
    new Uint8Array([...periods.flatMap((p) => [...p]), ...new Uint8Array(1920).fill(9)]),
  );
  const s = r.dev.stats();
  assert.equal(s["stream0.bytes"], 4 * 1920);
  assert.equal(s["stream0.messages"], 4);
  assert.equal(s.txBytes, 4 * 1920);
  assert.equal(s["stream1.bytes"], 0);
});

Deno.test("snd: messages held at STOP wait; RELEASE completes them without playing them", () => {
  using dir = tempDir();
  using r = rig({ backend: new FileBackend({ playbackPath: dir.path }) });
  r.ok(setParams(0, { buffer: 800, period: 80, channels: 1, format: VIRTIO_SND_PCM_FMT_U8, rate: RATE_8000 }));
  r.ok(u32s(VIRTIO_SND_R_PCM_PREPARE, 0));
  const a = r.tx(0, new Uint8Array(80).fill(1));
  const b = r.tx(0, new Uint8Array(80).fill(2));
  r.ok(u32s(VIRTIO_SND_R_PCM_START, 0));
  r.clock.advance(10); // 80 bytes at 8000 bytes a second
  const q = r.drv.queues[VIRTIO_SND_VQ_TX];
  assert.deepEqual(q.used().map((u) => u.id), [a.head]);
  r.ok(u32s(VIRTIO_SND_R_PCM_STOP, 0));
  r.clock.advance(1000);
  assert.deepEqual(q.used(), [], "a stopped stream plays nothing");
  assert.equal(r.dev.quiescent(), false, "a held message is in flight");
  r.ok(u32s(VIRTIO_SND_R_PCM_RELEASE, 0));
  assert.deepEqual(q.used(), [{ id: b.head, len: 8 }]);
  assert.equal(r.status(b.statusAddr), VIRTIO_SND_S_OK);
  assert.equal(r.dev.quiescent(), true);
  assert.deepEqual(Deno.readFileSync(`${dir.path}/stream-0.wav`).subarray(WAV_HEADER_SIZE), new Uint8Array(80).fill(1));
  // A new SET_PARAMS starts the file afresh; PREPARE and START after it go on in it.
  r.ok(setParams(0, { buffer: 800, period: 80, channels: 1, format: VIRTIO_SND_PCM_FMT_U8, rate: RATE_8000 }));
  r.ok(u32s(VIRTIO_SND_R_PCM_PREPARE, 0));
  r.tx(0, new Uint8Array(80).fill(3));
  r.ok(u32s(VIRTIO_SND_R_PCM_START, 0));
  r.clock.advance(10);
  assert.equal(q.used().length, 1);
  assert.deepEqual(Deno.readFileSync(`${dir.path}/stream-0.wav`).subarray(WAV_HEADER_SIZE), new Uint8Array(80).fill(3));
});

Deno.test("snd: capture reads the file back end's WAV at the stream's rate, then silence", () => {
  using dir = tempDir();
  const samples = Uint8Array.from({ length: 300 }, (_, i) => (i * 3) & 0xff);
  const wav = `${dir.path}/in.wav`;
  Deno.writeFileSync(
    wav,
    new Uint8Array([...wavHeader({ format: VIRTIO_SND_PCM_FMT_S16, channels: 1, rate: 8000 }, 300), ...samples]),
  );
  using r = rig({ backend: new FileBackend({ playbackPath: dir.path, capturePath: wav }) });
  // The input stream offers exactly the file's format.
  const info = r.control(u32s(VIRTIO_SND_R_PCM_INFO, 1, 1, SND_PCM_INFO_SIZE), SND_PCM_INFO_SIZE);
  const v = new DataView(info.body.buffer);
  assert.equal(v.getBigUint64(8, true), 1n << BigInt(VIRTIO_SND_PCM_FMT_S16));
  assert.equal(v.getBigUint64(16, true), 1n << BigInt(RATE_8000));
  assert.deepEqual([info.body[25], info.body[26]], [1, 1]);
  assert.equal(
    r.control(setParams(1, { buffer: 800, period: 200, channels: 2, format: VIRTIO_SND_PCM_FMT_S16, rate: RATE_8000 }))
      .status,
    VIRTIO_SND_S_NOT_SUPP,
  );
  r.ok(setParams(1, { buffer: 800, period: 200, channels: 1, format: VIRTIO_SND_PCM_FMT_S16, rate: RATE_8000 }));
  r.ok(u32s(VIRTIO_SND_R_PCM_PREPARE, 1));
  const a = r.rx(1, 200);
  const b = r.rx(1, 200);
  r.ok(u32s(VIRTIO_SND_R_PCM_START, 1));
  const q = r.drv.queues[VIRTIO_SND_VQ_RX];
  r.clock.advance(12); // 200 bytes at 16000 bytes a second: 12.5 ms
  assert.deepEqual(q.used(), []);
  r.clock.advance(1);
  assert.deepEqual(q.used(), [{ id: a.head, len: 208 }]);
  assert.deepEqual(r.g.mem.read(a.dataAddr, 200), samples.subarray(0, 200));
  assert.equal(r.status(a.statusAddr), VIRTIO_SND_S_OK);
  r.clock.advance(13);
  assert.deepEqual(q.used(), [{ id: b.head, len: 208 }]);
  assert.deepEqual(r.g.mem.read(b.dataAddr, 200), new Uint8Array([...samples.subarray(200), ...new Uint8Array(100)]));
  assert.equal(r.dev.stats().rxBytes, 400);
  assert.equal(r.dev.stats()["stream1.bytes"], 400);
});

Deno.test("snd: state transitions outside the spec's are refused with BAD_MSG", () => {
  using r = rig();
  const p = { buffer: 800, period: 80, channels: 1, format: VIRTIO_SND_PCM_FMT_U8, rate: RATE_8000 };
  assert.equal(r.pcm(VIRTIO_SND_R_PCM_PREPARE, 0), VIRTIO_SND_S_BAD_MSG, "PREPARE before SET_PARAMS");
  assert.equal(r.pcm(VIRTIO_SND_R_PCM_START, 0), VIRTIO_SND_S_BAD_MSG);
  r.ok(setParams(0, p));
  assert.equal(r.pcm(VIRTIO_SND_R_PCM_START, 0), VIRTIO_SND_S_BAD_MSG, "START before PREPARE");
  assert.equal(r.pcm(VIRTIO_SND_R_PCM_RELEASE, 0), VIRTIO_SND_S_BAD_MSG);
  r.ok(u32s(VIRTIO_SND_R_PCM_PREPARE, 0));
  assert.equal(r.pcm(VIRTIO_SND_R_PCM_STOP, 0), VIRTIO_SND_S_BAD_MSG, "STOP before START");
  r.ok(u32s(VIRTIO_SND_R_PCM_START, 0));
  assert.equal(r.control(setParams(0, p)).status, VIRTIO_SND_S_BAD_MSG, "SET_PARAMS while running");
  assert.equal(r.pcm(VIRTIO_SND_R_PCM_RELEASE, 0), VIRTIO_SND_S_BAD_MSG, "RELEASE while running");
  r.ok(u32s(VIRTIO_SND_R_PCM_STOP, 0));
  r.ok(u32s(VIRTIO_SND_R_PCM_START, 0));
  r.ok(u32s(VIRTIO_SND_R_PCM_STOP, 0));
  r.ok(u32s(VIRTIO_SND_R_PCM_RELEASE, 0));
  r.ok(u32s(VIRTIO_SND_R_PCM_PREPARE, 0));
  r.ok(u32s(VIRTIO_SND_R_PCM_RELEASE, 0));
  r.ok(setParams(0, p));
});

Deno.test("snd: hostile control requests get an error status and one log line each", () => {
  using r = rig();
  const good = { buffer: 800, period: 80, channels: 1, format: VIRTIO_SND_PCM_FMT_U8, rate: RATE_8000 };
  const cases: [string, Uint8Array, number][] = [
    ["unknown code", u32s(0x7777, 0), VIRTIO_SND_S_NOT_SUPP],
    ["short request", new Uint8Array(2), VIRTIO_SND_S_BAD_MSG],
    ["SET_PARAMS cut short", setParams(0, good).subarray(0, 20), VIRTIO_SND_S_BAD_MSG],
    ["stream out of range", u32s(VIRTIO_SND_R_PCM_PREPARE, 2), VIRTIO_SND_S_BAD_MSG],
    ["stream 2^32-1", setParams(0xffffffff, good), VIRTIO_SND_S_BAD_MSG],
    ["rate index 200", setParams(0, { ...good, rate: 200 }), VIRTIO_SND_S_NOT_SUPP],
    ["rate index 14", setParams(0, { ...good, rate: 14 }), VIRTIO_SND_S_NOT_SUPP],
    ["format 255", setParams(0, { ...good, format: 255 }), VIRTIO_SND_S_NOT_SUPP],
    ["ADPCM", setParams(0, { ...good, format: 0 }), VIRTIO_SND_S_NOT_SUPP],
    ["0 channels", setParams(0, { ...good, channels: 0 }), VIRTIO_SND_S_NOT_SUPP],
    ["255 channels", setParams(0, { ...good, channels: 255 }), VIRTIO_SND_S_NOT_SUPP],
    ["features", setParams(0, { ...good, features: 1 }), VIRTIO_SND_S_NOT_SUPP],
    ["period 0", setParams(0, { ...good, period: 0 }), VIRTIO_SND_S_BAD_MSG],
    ["period above buffer", setParams(0, { ...good, period: 1600 }), VIRTIO_SND_S_BAD_MSG],
    ["4 GiB buffer", setParams(0, { ...good, buffer: 0xffffffff, period: 0xffffffff }), VIRTIO_SND_S_BAD_MSG],
    [
      "period not of frames",
      setParams(0, { ...good, format: VIRTIO_SND_PCM_FMT_S16, period: 81, buffer: 810 }),
      VIRTIO_SND_S_BAD_MSG,
    ],
    ["buffer not of periods", setParams(0, { ...good, buffer: 810 }), VIRTIO_SND_S_BAD_MSG],
  ];
  for (const [what, req, status] of cases) {
    const before = r.lines.length;
    assert.equal(r.control(req).status, status, what);
    // One line each, up to the rate limit's burst of ten.
    assert.equal(r.lines.length, Math.min(before + 1, 10), `${what}: one log line`);
  }
  // No room for a status: used length 0, and the device goes on.
  const q = r.drv.queues[VIRTIO_SND_VQ_CONTROL];
  q.submit([u32s(VIRTIO_SND_R_PCM_INFO, 0, 1, 32)]);
  r.drv.kick(VIRTIO_SND_VQ_CONTROL);
  assert.deepEqual(q.used().map((u) => u.len), [0]);
  r.ok(setParams(0, good));
  assert.equal(r.dev.stats().badRequests, cases.length + 1);
});

Deno.test("snd: hostile I/O messages complete at once with BAD_MSG", () => {
  using r = rig();
  r.ok(setParams(0, { buffer: 800, period: 80, channels: 1, format: VIRTIO_SND_PCM_FMT_U8, rate: RATE_8000 }));
  const tx = r.drv.queues[VIRTIO_SND_VQ_TX];
  const rx = r.drv.queues[VIRTIO_SND_VQ_RX];
  const early = r.tx(0, new Uint8Array(80));
  assert.equal(r.status(early.statusAddr), VIRTIO_SND_S_BAD_MSG, "before PREPARE");
  r.ok(u32s(VIRTIO_SND_R_PCM_PREPARE, 0));
  const wrongQueue = r.tx(1, new Uint8Array(80));
  assert.equal(r.status(wrongQueue.statusAddr), VIRTIO_SND_S_BAD_MSG, "an input stream on tx");
  const noStream = r.tx(99, new Uint8Array(80));
  assert.equal(r.status(noStream.statusAddr), VIRTIO_SND_S_BAD_MSG);
  const onRx = r.rx(0, 80);
  assert.equal(r.status(onRx.statusAddr), VIRTIO_SND_S_BAD_MSG, "an output stream on rx");
  tx.submit([new Uint8Array(2), 8]); // no room for the header
  tx.submit([u32s(0), new Uint8Array(80), 4]); // no room for the status
  r.drv.kick(VIRTIO_SND_VQ_TX);
  assert.deepEqual(tx.used().map((u) => u.len), [8, 8, 8, 8, 0]);
  assert.deepEqual(rx.used().map((u) => u.len), [8]);
  assert.equal(r.dev.stats().badMessages, 6);
  assert.equal(r.dev.quiescent(), true);
});

Deno.test("snd property: random control requests get a status, never a crash or a write past the chain", () => {
  using r = rig({ jacks: 1 });
  const codes = [1, 2, 0x100, 0x101, 0x102, 0x103, 0x104, 0x105, 0x200, 0x7777];
  fc.assert(
    fc.property(
      fc.constantFrom(...codes),
      fc.uint8Array({ minLength: 0, maxLength: 40 }),
      fc.integer({ min: 0, max: 300 }),
      (code, rest, room) => {
        const req = new Uint8Array(4 + rest.length);
        new DataView(req.buffer).setUint32(0, code, true);
        req.set(rest, 4);
        const res = r.control(req, room);
        assert.ok(
          [VIRTIO_SND_S_OK, VIRTIO_SND_S_BAD_MSG, VIRTIO_SND_S_NOT_SUPP].includes(res.status),
          `status 0x${res.status.toString(16)}`,
        );
        assert.ok(res.len <= 4 + room);
      },
    ),
    { numRuns: 300 },
  );
  // Whatever state the streams are in, the held messages are bounded by the queue.
  assert.ok(r.dev.queueMaxSizes[VIRTIO_SND_VQ_TX] === SND_DATA_QUEUE_SIZE);
});

Deno.test("snd: an info query of 0 items with an absurd item size gets an empty answer, nothing allocated for it", () => {
  using r = rig();
  const before = Deno.memoryUsage().external;
  const res = r.control(u32s(VIRTIO_SND_R_PCM_INFO, 0, 0, 0xffffffff), 32);
  assert.ok(Deno.memoryUsage().external - before < MiB, "no buffer of the item size was made");
  assert.equal(res.status, VIRTIO_SND_S_OK);
  assert.equal(res.len, 4);
  // An item size larger than any answer could hold: refused before anything is made of it.
  assert.equal(r.control(u32s(VIRTIO_SND_R_CHMAP_INFO, 0, 1, 0x7fffffff), 32).status, VIRTIO_SND_S_BAD_MSG);
});

Deno.test("snd: an I/O message larger than its stream's buffer is refused at once", () => {
  using r = rig();
  r.ok(setParams(0, { buffer: 160, period: 80, channels: 1, format: VIRTIO_SND_PCM_FMT_U8, rate: RATE_8000 }));
  r.ok(u32s(VIRTIO_SND_R_PCM_PREPARE, 0));
  const big = r.tx(0, new Uint8Array(161));
  assert.equal(r.status(big.statusAddr), VIRTIO_SND_S_BAD_MSG);
  assert.deepEqual(r.drv.queues[VIRTIO_SND_VQ_TX].used().map((u) => u.id), [big.head]);
  const fits = r.tx(0, new Uint8Array(160));
  assert.deepEqual(r.drv.queues[VIRTIO_SND_VQ_TX].used(), [], "a message of the whole buffer is held");
  assert.equal(r.dev.quiescent(), false);
  r.ok(u32s(VIRTIO_SND_R_PCM_RELEASE, 0));
  assert.deepEqual(r.drv.queues[VIRTIO_SND_VQ_TX].used().map((u) => u.id), [fits.head]);
});

Deno.test("snd: SET_PARAMS of a prepared stream completes the messages it held (they were for the old parameters)", () => {
  using r = rig();
  const p = { buffer: 800, period: 80, channels: 1, format: VIRTIO_SND_PCM_FMT_U8, rate: RATE_8000 };
  r.ok(setParams(0, p));
  r.ok(u32s(VIRTIO_SND_R_PCM_PREPARE, 0));
  const held = r.tx(0, new Uint8Array(80));
  r.ok(setParams(0, { ...p, period: 40, buffer: 400 }));
  assert.deepEqual(r.drv.queues[VIRTIO_SND_VQ_TX].used(), [{ id: held.head, len: 8 }]);
  assert.equal(r.status(held.statusAddr), VIRTIO_SND_S_OK);
  assert.ok(r.dev.quiescent());
});

Deno.test("snd property: random control requests and I/O messages, with time passing, never crash or leak", () => {
  using dir = tempDir();
  using r = rig({ backend: new FileBackend({ playbackPath: dir.path }), numInputStreams: 2 });
  const txq = r.drv.queues[VIRTIO_SND_VQ_TX];
  const rxq = r.drv.queues[VIRTIO_SND_VQ_RX];
  const mark = r.drv.alloc.mark();
  const op = fc.oneof(
    fc.record({
      kind: fc.constant("params" as const),
      stream: fc.integer({ min: 0, max: 3 }),
      period: fc.constantFrom(0, 2, 80, 160, 0xffffffff),
      periods: fc.integer({ min: 1, max: 4 }),
      channels: fc.integer({ min: 0, max: 3 }),
      format: fc.constantFrom(VIRTIO_SND_PCM_FMT_U8, VIRTIO_SND_PCM_FMT_S16, 0, 200),
      rate: fc.constantFrom(RATE_8000, RATE_48000, 13, 99),
    }),
    fc.record({
      kind: fc.constant("pcm" as const),
      code: fc.constantFrom(
        VIRTIO_SND_R_PCM_PREPARE,
        VIRTIO_SND_R_PCM_START,
        VIRTIO_SND_R_PCM_STOP,
        VIRTIO_SND_R_PCM_RELEASE,
      ),
      stream: fc.integer({ min: 0, max: 3 }),
    }),
    fc.record({
      kind: fc.constantFrom("tx" as const, "rx" as const),
      stream: fc.integer({ min: 0, max: 3 }),
      bytes: fc.integer({ min: 0, max: 400 }),
    }),
    fc.record({ kind: fc.constant("time" as const), ms: fc.integer({ min: 0, max: 200 }) }),
  );
  fc.assert(
    fc.property(fc.array(op, { maxLength: 40 }), (ops) => {
      for (const o of ops) {
        if (o.kind === "params") {
          const period = o.period;
          const buffer = period === 0xffffffff ? period : period * o.periods;
          const st = r.control(
            setParams(o.stream, { buffer, period, channels: o.channels, format: o.format, rate: o.rate }),
          ).status;
          assert.ok([VIRTIO_SND_S_OK, VIRTIO_SND_S_BAD_MSG, VIRTIO_SND_S_NOT_SUPP].includes(st));
        } else if (o.kind === "pcm") {
          assert.ok([VIRTIO_SND_S_OK, VIRTIO_SND_S_BAD_MSG].includes(r.pcm(o.code, o.stream)));
        } else if (o.kind === "tx") {
          if (txq.availIdx - txq.usedIdx() < 64) r.tx(o.stream, new Uint8Array(o.bytes));
        } else if (o.kind === "rx") {
          if (rxq.availIdx - rxq.usedIdx() < 64) r.rx(o.stream, o.bytes);
        } else if ("ms" in o) r.clock.advance(o.ms);
      }
      // Whatever happened, releasing every stream returns every message, and the device is quiescent.
      for (let s = 0; s < 3; s++) {
        r.pcm(VIRTIO_SND_R_PCM_STOP, s);
        r.pcm(VIRTIO_SND_R_PCM_RELEASE, s);
      }
      // A stream never prepared holds nothing; one left in params or idle state refused its messages.
      txq.used();
      rxq.used();
      assert.equal(txq.usedIdx(), txq.availIdx, "every tx message came back");
      assert.equal(rxq.usedIdx(), rxq.availIdx, "every rx message came back");
      assert.ok(r.dev.quiescent());
      assert.equal(r.clock.timers.size, 0, "no timer left behind");
      r.drv.alloc.resetTo(mark);
    }),
    { numRuns: 150 },
  );
});

Deno.test("snd: muted streams play and record silence at their rate", () => {
  using dir = tempDir();
  const wav = `${dir.path}/in.wav`;
  Deno.writeFileSync(
    wav,
    new Uint8Array([
      ...wavHeader({ format: VIRTIO_SND_PCM_FMT_U8, channels: 1, rate: 8000 }, 160),
      ...new Uint8Array(160).fill(7),
    ]),
  );
  using r = rig({ backend: new FileBackend({ playbackPath: dir.path, capturePath: wav }) });
  const p = { buffer: 800, period: 80, channels: 1, format: VIRTIO_SND_PCM_FMT_U8, rate: RATE_8000 };
  r.ok(setParams(0, p));
  r.ok(setParams(1, p));
  r.ok(u32s(VIRTIO_SND_R_PCM_PREPARE, 0));
  r.ok(u32s(VIRTIO_SND_R_PCM_PREPARE, 1));
  r.dev.setMuted(true);
  r.tx(0, new Uint8Array(80).fill(5));
  const a = r.rx(1, 80);
  r.ok(u32s(VIRTIO_SND_R_PCM_START, 0));
  r.ok(u32s(VIRTIO_SND_R_PCM_START, 1));
  r.clock.advance(10);
  assert.deepEqual(r.g.mem.read(a.dataAddr, 80), new Uint8Array(80).fill(0x80), "U8 silence recorded");
  r.dev.setMuted(false);
  r.tx(0, new Uint8Array(80).fill(5));
  const b = r.rx(1, 80);
  r.clock.advance(10);
  assert.deepEqual(r.g.mem.read(b.dataAddr, 80), new Uint8Array(80).fill(7), "the file again, from where the clock is");
  const played = Deno.readFileSync(`${dir.path}/stream-0.wav`).subarray(WAV_HEADER_SIZE);
  assert.deepEqual(played, new Uint8Array([...new Uint8Array(80).fill(0x80), ...new Uint8Array(80).fill(5)]));
  assert.equal(r.dev.stats()["stream0.bytes"], 160, "muted bytes are moved all the same");
});

Deno.test("snd: jack events go into the event queue's buffers", () => {
  using r = rig({ jacks: 1 });
  r.dev.setJackConnected(0, false);
  const q = r.drv.queues[VIRTIO_SND_VQ_EVENT];
  const sub = q.submit([8]);
  r.drv.kick(VIRTIO_SND_VQ_EVENT);
  assert.deepEqual(q.used(), [{ id: sub.head, len: 8 }]);
  assert.equal(r.g.mem.getU32(sub.buffers[0].addr), VIRTIO_SND_EVT_JACK_DISCONNECTED);
  assert.equal(r.g.mem.getU32(sub.buffers[0].addr + 4), 0);
  const jack = r.control(u32s(VIRTIO_SND_R_JACK_INFO, 0, 1, 24), 24);
  assert.equal(jack.body[16], 0, "disconnected");
  assert.throws(() => r.dev.setJackConnected(1, true), RangeError);
});

Deno.test("snd: state round trip keeps the streams' parameters; a capture goes on where it was", () => {
  using dir = tempDir();
  const wav = `${dir.path}/in.wav`;
  const samples = Uint8Array.from({ length: 400 }, (_, i) => i & 0xff);
  Deno.writeFileSync(
    wav,
    new Uint8Array([...wavHeader({ format: VIRTIO_SND_PCM_FMT_U8, channels: 1, rate: 8000 }, 400), ...samples]),
  );
  const opts = () => ({ backend: new FileBackend({ playbackPath: dir.path, capturePath: wav }) });
  using r = rig(opts());
  r.ok(setParams(1, { buffer: 400, period: 100, channels: 1, format: VIRTIO_SND_PCM_FMT_U8, rate: RATE_8000 }));
  r.ok(u32s(VIRTIO_SND_R_PCM_PREPARE, 1));
  r.rx(1, 100);
  r.ok(u32s(VIRTIO_SND_R_PCM_START, 1));
  r.clock.advance(13);
  assert.equal(r.drv.queues[VIRTIO_SND_VQ_RX].used().length, 1);
  assert.ok(r.dev.quiescent());
  const clock = new ManualClock();
  const dev2 = new SoundDevice({ clock, ...opts() });
  const to = saveAndRestore({ t: r.drv.transport, drv: r.drv, irqs: r.irqs }, r.dev, dev2, r.g.mem);
  try {
    const m = r.g.mem;
    const q = to.drv.queues[VIRTIO_SND_VQ_RX];
    const sub = q.submit([u32s(1), 100, 8]);
    to.drv.kick(VIRTIO_SND_VQ_RX);
    clock.advance(13);
    assert.deepEqual(q.used().map((u) => u.len), [108]);
    assert.deepEqual(m.read(sub.buffers[1].addr, 100), samples.subarray(100, 200));
    assert.equal(dev2.stats()["stream1.bytes"], 200);
  } finally {
    dev2.close();
  }
});

Deno.test("snd: a restored stream whose back end cannot open runs on without it, with one log line", () => {
  using dir = tempDir();
  using r = rig({ backend: new FileBackend({ playbackPath: dir.path }) });
  r.ok(setParams(0, { buffer: 800, period: 80, channels: 1, format: VIRTIO_SND_PCM_FMT_U8, rate: RATE_8000 }));
  r.ok(u32s(VIRTIO_SND_R_PCM_PREPARE, 0));
  const backend = new FileBackend({ playbackPath: dir.path });
  // The playback file cannot be opened again: a directory stands where it was.
  Deno.removeSync(`${dir.path}/stream-0.wav`);
  Deno.mkdirSync(`${dir.path}/stream-0.wav`);
  const clock = new ManualClock();
  const dev2 = new SoundDevice({ clock, backend });
  try {
    const before = r.lines.length;
    const to = saveAndRestore({ t: r.drv.transport, drv: r.drv, irqs: r.irqs }, r.dev, dev2, r.g.mem);
    assert.equal(r.lines.length, before + 1, r.lines.join("\n"));
    const q = to.drv.queues[VIRTIO_SND_VQ_TX];
    q.submit([u32s(0), new Uint8Array(80), 8]);
    to.drv.kick(VIRTIO_SND_VQ_TX);
    to.drv.writeReg(VIRTIO_MMIO_STATUS, 0);
  } finally {
    dev2.close();
  }
});

Deno.test("snd: a state that does not fit is refused; a stream holding messages cannot be saved", () => {
  using r = rig();
  r.ok(setParams(0, { buffer: 800, period: 80, channels: 1, format: VIRTIO_SND_PCM_FMT_U8, rate: RATE_8000 }));
  const good = r.dev.saveState();
  const streams = (good.data as { streams: Record<string, unknown>[] }).streams;
  const badStream = (patch: Record<string, unknown>) =>
    withData(good, { streams: [{ ...streams[0], ...patch } as never, streams[1] as never] });
  assertRefused(() => new SoundDevice(), good, [
    ["streams", withData(good, { streams: [] })],
    ["state", badStream({ state: "dancing" })],
    ["channels", badStream({ params: { ...(streams[0].params as object), channels: 9 } })],
    ["rate", badStream({ params: { ...(streams[0].params as object), rateIndex: 40 } })],
    ["idle with params", badStream({ state: "idle" })],
    ["capture position", badStream({ capturePos: -1 })],
    ["config", withData(good, { config: new Uint8Array(12) })],
  ]);
  r.ok(u32s(VIRTIO_SND_R_PCM_PREPARE, 0));
  r.tx(0, new Uint8Array(80));
  assert.equal(r.dev.quiescent(), false);
  assert.throws(() => r.dev.saveState(), /holds I\/O messages/);
  r.ok(u32s(VIRTIO_SND_R_PCM_RELEASE, 0));
});

Deno.test("snd: playback_size caps the WAV file; the rest is dropped and counted", () => {
  using dir = tempDir();
  using r = rig({ backend: new FileBackend({ playbackPath: dir.path, playbackSize: 100 }) });
  r.ok(setParams(0, { buffer: 800, period: 80, channels: 1, format: VIRTIO_SND_PCM_FMT_U8, rate: RATE_8000 }));
  r.ok(u32s(VIRTIO_SND_R_PCM_PREPARE, 0));
  r.tx(0, new Uint8Array(80).fill(1));
  r.tx(0, new Uint8Array(80).fill(2));
  r.ok(u32s(VIRTIO_SND_R_PCM_START, 0));
  r.clock.advance(20);
  const file = Deno.openSync(`${dir.path}/stream-0.wav`);
  const info = readWavInfo(file, file.statSync().size);
  file.close();
  assert.equal(info.dataBytes, 100);
  assert.equal(r.dev.stats().droppedBytes, 60);
  assert.equal(r.dev.stats().txBytes, 160);
});

Deno.test("snd: the file back end refuses a missing directory and a capture file that is no WAV", () => {
  using dir = tempDir();
  assert.throws(() => new FileBackend({ playbackPath: `${dir.path}/none` }), /playback_path/);
  Deno.writeFileSync(`${dir.path}/x.wav`, new TextEncoder().encode("not a wav at all, sorry"));
  assert.throws(
    () => new FileBackend({ playbackPath: dir.path, capturePath: `${dir.path}/x.wav` }),
    /capture_path.*RIFF/,
  );
  assert.throws(() => new SoundDevice({ numOutputDevices: 65 }), RangeError);
});

Deno.test("snd: reset drops held messages and timers", () => {
  using r = rig();
  r.ok(setParams(0, { buffer: 800, period: 80, channels: 1, format: VIRTIO_SND_PCM_FMT_U8, rate: RATE_8000 }));
  r.ok(u32s(VIRTIO_SND_R_PCM_PREPARE, 0));
  r.tx(0, new Uint8Array(80));
  r.ok(u32s(VIRTIO_SND_R_PCM_START, 0));
  assert.equal(r.clock.timers.size, 1);
  r.drv.writeReg(VIRTIO_MMIO_STATUS, 0); // reset
  assert.equal(r.clock.timers.size, 0);
  assert.ok(r.dev.quiescent());
});
