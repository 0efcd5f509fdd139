// virtio-snd, the sound device (virtio 1.2 spec, section 5.14; Linux sound/virtio/, whose numbers are in
// include/uapi/linux/virtio_snd.h: see constants.ts). Four queues: control (jack, PCM and channel-map
// information, and each PCM stream's SET_PARAMS / PREPARE / START / STOP / RELEASE), event (jack
// connection events), tx (playback) and rx (capture).
//
// The streams, as crosvm lays them out for --virtio-snd: num_output_devices × num_output_streams output
// streams, then num_input_devices × num_input_streams input streams; a stream's hda_fn_nid is its device
// number. Channel maps as crosvm's: stereo for each output device, one per input device (mono or stereo),
// then 4- and 6-channel maps per output device.
//
// Pacing: an I/O message (tx: a virtio_snd_pcm_xfer header and samples, then a status; rx: the header,
// then room for samples and the status) is held until the stream's clock says a real device would have
// played or recorded its bytes: a running stream consumes rate × frame size bytes per second from the
// moment it started, message by message in the order they came. Playback samples are read out of the
// guest when their time comes (never buffered here), then given to the back end (backend.ts); capture
// samples are taken from the back end when their message is due. A stream that runs out of messages picks
// its clock up again at the next one. Messages held when a stream is released complete without samples,
// as the spec asks (5.14.6.6.5.1). Held messages are at most the queues' sizes.
//
// Guest input is hostile: a message too short for its header, an unknown request code, a stream id out of
// range, a format, rate, channel count or period the stream does not offer, or a request in the wrong
// stream state gets VIRTIO_SND_S_BAD_MSG or NOT_SUPP and one rate-limited log line.

import {
  type ActivateContext,
  checkSavedIdentity,
  featuresField,
  queuesQuiescent,
  readConfigSpace,
  serveQueue,
  stateCounters,
  stateInteger,
  VIRTIO_COMMON_FEATURES,
  VIRTIO_ID_SOUND,
  type VirtioDevice,
  type VirtioInterrupt,
} from "../device.ts";
import { ChainError, type DescriptorChain, type Virtqueue } from "../queue.ts";
import { RateLimitedLog } from "../../../core/log.ts";
import { GuestMemoryError } from "../../../core/memory.ts";
import {
  type DeviceState,
  stateArray,
  stateData,
  StateError,
  type Stateful,
  stateRecord,
  stateString,
  type StateValue,
} from "../../../core/state.ts";
import {
  PCM_RATES,
  SAMPLE_BYTES,
  SND_CHMAP_INFO_CHANNELS,
  SND_CHMAP_INFO_DIRECTION,
  SND_CHMAP_INFO_POSITIONS,
  SND_CHMAP_INFO_SIZE,
  SND_CONFIG_CHMAPS,
  SND_CONFIG_JACKS,
  SND_CONFIG_SIZE,
  SND_CONFIG_STREAMS,
  SND_EVENT_SIZE,
  SND_HDR_SIZE,
  SND_JACK_HDR_SIZE,
  SND_JACK_INFO_CONNECTED,
  SND_JACK_INFO_SIZE,
  SND_PCM_HDR_SIZE,
  SND_PCM_INFO_CHANNELS_MAX,
  SND_PCM_INFO_CHANNELS_MIN,
  SND_PCM_INFO_DIRECTION,
  SND_PCM_INFO_FEATURES,
  SND_PCM_INFO_FORMATS,
  SND_PCM_INFO_RATES,
  SND_PCM_INFO_SIZE,
  SND_PCM_SET_PARAMS_SIZE,
  SND_PCM_STATUS_SIZE,
  SND_PCM_XFER_SIZE,
  SND_QUERY_INFO_SIZE,
  SND_SET_PARAMS_BUFFER_BYTES,
  SND_SET_PARAMS_CHANNELS,
  SND_SET_PARAMS_FEATURES,
  SND_SET_PARAMS_FORMAT,
  SND_SET_PARAMS_PERIOD_BYTES,
  SND_SET_PARAMS_RATE,
  SUPPORTED_FORMATS,
  SUPPORTED_RATES,
  VIRTIO_SND_CHMAP_FC,
  VIRTIO_SND_CHMAP_FL,
  VIRTIO_SND_CHMAP_FR,
  VIRTIO_SND_CHMAP_LFE,
  VIRTIO_SND_CHMAP_MAX_SIZE,
  VIRTIO_SND_CHMAP_MONO,
  VIRTIO_SND_CHMAP_RL,
  VIRTIO_SND_CHMAP_RR,
  VIRTIO_SND_D_INPUT,
  VIRTIO_SND_D_OUTPUT,
  VIRTIO_SND_EVT_JACK_CONNECTED,
  VIRTIO_SND_EVT_JACK_DISCONNECTED,
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
  VIRTIO_SND_S_IO_ERR,
  VIRTIO_SND_S_NOT_SUPP,
  VIRTIO_SND_S_OK,
  VIRTIO_SND_VQ_CONTROL,
  VIRTIO_SND_VQ_EVENT,
  VIRTIO_SND_VQ_MAX,
  VIRTIO_SND_VQ_RX,
  VIRTIO_SND_VQ_TX,
} from "./constants.ts";
import { type CaptureSource, NullBackend, type PlaybackSink, silenceByte, type SoundBackend } from "./backend.ts";
import type { PcmFormat } from "./wav.ts";

/** Queue sizes: control and event small; tx and rx hold a stream's periods (Linux queues them all). */
export const SND_CONTROL_QUEUE_SIZE = 64;
export const SND_EVENT_QUEUE_SIZE = 64;
export const SND_DATA_QUEUE_SIZE = 1024;
/** Most streams, devices per direction, jacks (the config fields are le32; a VMM needs far fewer). */
export const SND_MAX_STREAMS = 64;
export const SND_MAX_JACKS = 64;
/** Output streams take 1 to 6 channels, input streams 1 or 2 (as crosvm's). */
export const SND_OUTPUT_CHANNELS_MAX = 6;
export const SND_INPUT_CHANNELS_MAX = 2;
/** Most bytes of one hardware buffer a stream takes (PCM_SET_PARAMS buffer_bytes). */
export const SND_MAX_BUFFER_BYTES = 64 * 1024 * 1024;
/** Samples move between the guest and a back end in pieces of at most this many bytes. */
const COPY_CHUNK = 64 * 1024;
/** Jack events waiting for an event buffer; older ones are dropped past this. */
const MAX_PENDING_EVENTS = 64;

/** The kind and layout version of a virtio-snd device's saved state. */
export const SOUND_STATE_TYPE = "virtio-snd";
export const SOUND_STATE_VERSION = 1;
const STAT_NAMES = [
  "controlRequests",
  "badRequests",
  "txBytes",
  "rxBytes",
  "droppedBytes",
  "ioMessages",
  "badMessages",
  "events",
  "droppedEvents",
] as const;

/** A clock and timers; tests give a manual one. Times in milliseconds. */
export interface SoundClock {
  now(): number;
  setTimer(fn: () => void, ms: number): unknown;
  clearTimer(id: unknown): void;
}

export const REAL_CLOCK: SoundClock = {
  now: () => performance.now(),
  setTimer: (fn, ms) => setTimeout(fn, ms) as unknown,
  clearTimer: (id) => clearTimeout(id as number),
};

export interface SoundOptions {
  numOutputDevices?: number;
  numInputDevices?: number;
  numOutputStreams?: number;
  numInputStreams?: number;
  /** Host back end; default null. */
  backend?: SoundBackend;
  /** Jacks the device reports (connected); default 0, as crosvm's. */
  jacks?: number;
  clock?: SoundClock;
}

/** What a stream offers (struct virtio_snd_pcm_info). */
interface StreamInfo {
  nid: number;
  direction: number;
  formats: bigint;
  rates: bigint;
  channelsMin: number;
  channelsMax: number;
}

interface StreamParams {
  bufferBytes: number;
  periodBytes: number;
  features: number;
  channels: number;
  format: number;
  rateIndex: number;
}

/** Stream states (5.14.6.6.1). */
type StreamState = "idle" | "params" | "prepared" | "running" | "stopped" | "released";
const STREAM_STATES: readonly StreamState[] = ["idle", "params", "prepared", "running", "stopped", "released"];

/** An I/O message held until its time: the chain, its queue and how many sample bytes it carries. */
interface Held {
  chain: DescriptorChain;
  bytes: number;
}

class Stream {
  state: StreamState = "idle";
  params?: StreamParams;
  held: Held[] = [];
  /** Clock time the current run of messages started at, and bytes consumed since. */
  base = 0;
  consumed = 0;
  timer?: unknown;
  sink?: PlaybackSink;
  source?: CaptureSource;
  /** The back end's file starts afresh at the next prepare (after each SET_PARAMS). */
  fresh = true;
  /** Capture bytes read since the last SET_PARAMS (restored sources go on from it). */
  capturePos = 0;
  bytes = 0;
  messages = 0;
  constructor(readonly id: number, readonly info: StreamInfo) {}

  format(): PcmFormat {
    const p = this.params!;
    return { format: p.format, channels: p.channels, rate: PCM_RATES[p.rateIndex] };
  }
  /** Bytes per second at the stream's parameters. */
  byteRate(): number {
    const p = this.params!;
    return PCM_RATES[p.rateIndex] * p.channels * SAMPLE_BYTES[p.format];
  }
}

interface ChmapInfo {
  nid: number;
  direction: number;
  positions: number[];
}

const STEREO = [VIRTIO_SND_CHMAP_FL, VIRTIO_SND_CHMAP_FR];
const QUAD = [...STEREO, VIRTIO_SND_CHMAP_RL, VIRTIO_SND_CHMAP_RR];
const SURROUND_51 = [...STEREO, VIRTIO_SND_CHMAP_FC, VIRTIO_SND_CHMAP_LFE, VIRTIO_SND_CHMAP_RL, VIRTIO_SND_CHMAP_RR];

/** A count option within [min, max]. */
function countOption(v: number | undefined, dflt: number, what: string, min: number, max: number): number {
  const n = v ?? dflt;
  if (!Number.isSafeInteger(n) || n < min || n > max) throw new RangeError(`${what} must be ${min} to ${max}`);
  return n;
}

/** A control request's failure: its status and the log line. */
class BadRequest extends Error {
  constructor(readonly status: number, msg: string) {
    super(msg);
  }
}

export class SoundDevice implements VirtioDevice, Stateful {
  readonly deviceType = VIRTIO_ID_SOUND;
  readonly name = "snd";
  readonly queueMaxSizes: readonly number[] = [
    SND_CONTROL_QUEUE_SIZE,
    SND_EVENT_QUEUE_SIZE,
    SND_DATA_QUEUE_SIZE,
    SND_DATA_QUEUE_SIZE,
  ];
  readonly features = VIRTIO_COMMON_FEATURES;
  readonly backend: SoundBackend;
  readonly #config = new Uint8Array(SND_CONFIG_SIZE);
  readonly #streams: Stream[] = [];
  readonly #chmaps: ChmapInfo[] = [];
  readonly #jacks: boolean[] = [];
  readonly #clock: SoundClock;
  readonly #log = new RateLimitedLog("virtio-snd");
  readonly #stats = Object.fromEntries(STAT_NAMES.map((n) => [n, 0])) as Record<(typeof STAT_NAMES)[number], number>;
  #queues: (Virtqueue | undefined)[] = [];
  #interrupt: VirtioInterrupt | undefined;
  #pendingEvents: { code: number; data: number }[] = [];
  #muted = false;

  constructor(opts: SoundOptions = {}) {
    const outDevs = countOption(opts.numOutputDevices, 1, "num_output_devices", 0, SND_MAX_STREAMS);
    const inDevs = countOption(opts.numInputDevices, 1, "num_input_devices", 0, SND_MAX_STREAMS);
    const outStreams = countOption(opts.numOutputStreams, 1, "num_output_streams", 0, SND_MAX_STREAMS);
    const inStreams = countOption(opts.numInputStreams, 1, "num_input_streams", 0, SND_MAX_STREAMS);
    if (outDevs * outStreams + inDevs * inStreams > SND_MAX_STREAMS) {
      throw new RangeError(`at most ${SND_MAX_STREAMS} streams in all`);
    }
    const jacks = countOption(opts.jacks, 0, "jacks", 0, SND_MAX_JACKS);
    this.backend = opts.backend ?? new NullBackend();
    this.#clock = opts.clock ?? REAL_CLOCK;
    const cap = this.backend.captureFormat;
    for (let d = 0; d < outDevs; d++) {
      for (let s = 0; s < outStreams; s++) {
        this.#streams.push(
          new Stream(this.#streams.length, {
            nid: d,
            direction: VIRTIO_SND_D_OUTPUT,
            formats: SUPPORTED_FORMATS,
            rates: SUPPORTED_RATES,
            channelsMin: 1,
            channelsMax: SND_OUTPUT_CHANNELS_MAX,
          }),
        );
      }
    }
    for (let d = 0; d < inDevs; d++) {
      for (let s = 0; s < inStreams; s++) {
        this.#streams.push(
          new Stream(this.#streams.length, {
            nid: d,
            direction: VIRTIO_SND_D_INPUT,
            // A capture file offers exactly its own format.
            formats: cap ? 1n << BigInt(cap.format) : SUPPORTED_FORMATS,
            rates: cap ? 1n << BigInt(PCM_RATES.indexOf(cap.rate)) : SUPPORTED_RATES,
            channelsMin: cap ? cap.channels : 1,
            channelsMax: cap ? cap.channels : SND_INPUT_CHANNELS_MAX,
          }),
        );
      }
    }
    for (let d = 0; d < outDevs; d++) this.#chmaps.push({ nid: d, direction: VIRTIO_SND_D_OUTPUT, positions: STEREO });
    const inChannels = Math.min(cap?.channels ?? SND_INPUT_CHANNELS_MAX, SND_INPUT_CHANNELS_MAX);
    for (let d = 0; d < inDevs; d++) {
      this.#chmaps.push({
        nid: d,
        direction: VIRTIO_SND_D_INPUT,
        positions: inChannels === 1 ? [VIRTIO_SND_CHMAP_MONO] : STEREO,
      });
    }
    for (const positions of [QUAD, SURROUND_51]) {
      for (let d = 0; d < outDevs; d++) this.#chmaps.push({ nid: d, direction: VIRTIO_SND_D_OUTPUT, positions });
    }
    for (let j = 0; j < jacks; j++) this.#jacks.push(true);
    const v = new DataView(this.#config.buffer);
    v.setUint32(SND_CONFIG_JACKS, this.#jacks.length, true);
    v.setUint32(SND_CONFIG_STREAMS, this.#streams.length, true);
    v.setUint32(SND_CONFIG_CHMAPS, this.#chmaps.length, true);
  }

  /** Number of PCM streams (outputs first). */
  get streamCount(): number {
    return this.#streams.length;
  }

  readConfig(offset: number, data: Uint8Array): void {
    readConfigSpace(this.#config, offset, data);
  }

  writeConfig(offset: number, data: Uint8Array): void {
    this.#log.log(`driver wrote ${data.length} bytes of config at ${offset}; the configuration is read-only`);
  }

  activate(ctx: ActivateContext): void {
    this.#queues = ctx.queues.slice(0, VIRTIO_SND_VQ_MAX);
    this.#interrupt = ctx.interrupt;
    if (ctx.restored) {
      // Host sides of restored streams: the back end goes on from where the saved stream was.
      for (const s of this.#streams) {
        if (s.state === "prepared" || s.state === "running" || s.state === "stopped") {
          try {
            this.#openHost(s);
          } catch {
            // #openHost logged why; the stream runs on without a host side (its samples are dropped).
          }
        }
        s.base = this.#clock.now();
        s.consumed = 0;
      }
    }
    for (let i = 0; i < VIRTIO_SND_VQ_MAX; i++) this.queueNotify(i);
  }

  reset(): void {
    for (const s of this.#streams) {
      this.#stopTimer(s);
      this.#closeHost(s);
      s.held = [];
      s.state = "idle";
      s.params = undefined;
      s.fresh = true;
      s.capturePos = 0;
    }
    this.#queues = [];
    this.#interrupt = undefined;
    this.#pendingEvents = [];
  }

  close(): void {
    this.reset();
    this.backend.close();
  }

  stats(): Record<string, number> {
    const out: Record<string, number> = { ...this.#stats };
    for (const s of this.#streams) {
      out[`stream${s.id}.bytes`] = s.bytes;
      out[`stream${s.id}.messages`] = s.messages;
    }
    return out;
  }

  queueNotify(index: number): void {
    const q = this.#queues[index];
    if (!q) return;
    switch (index) {
      case VIRTIO_SND_VQ_CONTROL:
        serveQueue(q, index, this.#interrupt, (chain) => this.#control(chain));
        break;
      case VIRTIO_SND_VQ_EVENT:
        this.#deliverEvents();
        break;
      case VIRTIO_SND_VQ_TX:
      case VIRTIO_SND_VQ_RX:
        this.#takeMessages(q, index);
        break;
    }
  }

  /**
   * Mute or unmute every stream (crosvm's `snd mute-all`): a muted stream goes on at its rate, but plays
   * silence into its back end and records silence for the guest.
   */
  setMuted(muted: boolean): void {
    this.#muted = muted;
  }

  get muted(): boolean {
    return this.#muted;
  }

  /** Tell the driver jack `id` was connected or disconnected (an event, when the driver gave a buffer). */
  setJackConnected(id: number, connected: boolean): void {
    if (!Number.isInteger(id) || id < 0 || id >= this.#jacks.length) throw new RangeError(`no jack ${id}`);
    this.#jacks[id] = connected;
    if (this.#pendingEvents.length >= MAX_PENDING_EVENTS) {
      this.#pendingEvents.shift();
      this.#stats.droppedEvents++;
    }
    this.#pendingEvents.push({
      code: connected ? VIRTIO_SND_EVT_JACK_CONNECTED : VIRTIO_SND_EVT_JACK_DISCONNECTED,
      data: id,
    });
    this.#deliverEvents();
  }

  #deliverEvents(): void {
    const q = this.#queues[VIRTIO_SND_VQ_EVENT];
    if (!q) return;
    let used = false;
    while (this.#pendingEvents.length > 0) {
      const chain = q.pop();
      if (!chain) break;
      const ev = this.#pendingEvents.shift()!;
      let len = 0;
      try {
        const w = chain.writer();
        if (chain.writableLength < SND_EVENT_SIZE) throw new ChainError(`${chain.writableLength} writable bytes`);
        w.writeU32(ev.code);
        w.writeU32(ev.data);
        len = w.bytesWritten;
        this.#stats.events++;
      } catch (e) {
        this.#stats.droppedEvents++;
        this.#log.log(`event buffer too small or bad: ${(e as Error).message}`);
      }
      q.addUsed(chain.head, len);
      used = true;
    }
    if (used && q.needsInterrupt()) this.#interrupt?.signalUsedQueue(VIRTIO_SND_VQ_EVENT);
  }

  // ---- Control queue ----

  /** One control request: its response (status, then any information) goes into the writable part. */
  #control(chain: DescriptorChain): number {
    this.#stats.controlRequests++;
    const w = chain.writer();
    if (chain.writableLength < SND_HDR_SIZE) {
      this.#stats.badRequests++;
      this.#log.log(`control request with ${chain.writableLength} writable bytes: no room for a status`);
      return 0;
    }
    let code = -1;
    try {
      if (chain.readableLength < SND_HDR_SIZE) {
        throw new BadRequest(VIRTIO_SND_S_BAD_MSG, `request of ${chain.readableLength} bytes`);
      }
      const req = chain.reader().read(Math.min(chain.readableLength, SND_PCM_SET_PARAMS_SIZE));
      const v = new DataView(req.buffer);
      code = v.getUint32(0, true);
      const need = (n: number) => {
        if (req.length < n) {
          throw new BadRequest(VIRTIO_SND_S_BAD_MSG, `request 0x${code.toString(16)}: ${req.length} bytes`);
        }
      };
      switch (code) {
        case VIRTIO_SND_R_JACK_INFO:
        case VIRTIO_SND_R_PCM_INFO:
        case VIRTIO_SND_R_CHMAP_INFO:
          need(SND_QUERY_INFO_SIZE);
          return this.#queryInfo(chain, code, v.getUint32(4, true), v.getUint32(8, true), v.getUint32(12, true));
        case VIRTIO_SND_R_JACK_REMAP: {
          need(SND_JACK_HDR_SIZE);
          const id = v.getUint32(4, true);
          if (id >= this.#jacks.length) throw new BadRequest(VIRTIO_SND_S_BAD_MSG, `JACK_REMAP of jack ${id}`);
          // No jack offers VIRTIO_SND_JACK_F_REMAP.
          throw new BadRequest(VIRTIO_SND_S_NOT_SUPP, `JACK_REMAP of jack ${id}, which cannot be remapped`);
        }
        case VIRTIO_SND_R_PCM_SET_PARAMS:
          need(SND_PCM_SET_PARAMS_SIZE);
          this.#setParams(this.#stream(v.getUint32(4, true), "SET_PARAMS"), v);
          break;
        case VIRTIO_SND_R_PCM_PREPARE:
          need(SND_PCM_HDR_SIZE);
          this.#prepare(this.#stream(v.getUint32(4, true), "PREPARE"));
          break;
        case VIRTIO_SND_R_PCM_START:
          need(SND_PCM_HDR_SIZE);
          this.#start(this.#stream(v.getUint32(4, true), "START"));
          break;
        case VIRTIO_SND_R_PCM_STOP:
          need(SND_PCM_HDR_SIZE);
          this.#stop(this.#stream(v.getUint32(4, true), "STOP"));
          break;
        case VIRTIO_SND_R_PCM_RELEASE:
          need(SND_PCM_HDR_SIZE);
          this.#release(this.#stream(v.getUint32(4, true), "RELEASE"));
          break;
        default:
          throw new BadRequest(VIRTIO_SND_S_NOT_SUPP, `unknown control request 0x${code.toString(16)}`);
      }
      w.writeU32(VIRTIO_SND_S_OK);
    } catch (e) {
      const status = e instanceof BadRequest ? e.status : VIRTIO_SND_S_IO_ERR;
      if (!(e instanceof BadRequest) && !(e instanceof ChainError) && !(e instanceof GuestMemoryError)) {
        this.#log.log(`control request 0x${code.toString(16)}: host error: ${(e as Error).message}`);
      } else {
        this.#log.log((e as Error).message);
      }
      this.#stats.badRequests++;
      const out = chain.writer();
      out.writeU32(status);
      return out.bytesWritten;
    }
    return w.bytesWritten;
  }

  #stream(id: number, what: string): Stream {
    const s = this.#streams[id];
    if (!s) throw new BadRequest(VIRTIO_SND_S_BAD_MSG, `${what} of stream ${id}; there are ${this.#streams.length}`);
    return s;
  }

  /** JACK_INFO, PCM_INFO, CHMAP_INFO: `count` items from `start`, each in `size` bytes after the status. */
  #queryInfo(chain: DescriptorChain, code: number, start: number, count: number, size: number): number {
    const [total, itemSize, what] = code === VIRTIO_SND_R_JACK_INFO
      ? [this.#jacks.length, SND_JACK_INFO_SIZE, "JACK_INFO"]
      : code === VIRTIO_SND_R_PCM_INFO
      ? [this.#streams.length, SND_PCM_INFO_SIZE, "PCM_INFO"]
      : [this.#chmaps.length, SND_CHMAP_INFO_SIZE, "CHMAP_INFO"];
    if (start > total || count > total - start) {
      throw new BadRequest(VIRTIO_SND_S_BAD_MSG, `${what} of ${count} items from ${start}; there are ${total}`);
    }
    if (size < itemSize) throw new BadRequest(VIRTIO_SND_S_BAD_MSG, `${what} with ${size}-byte items`);
    // count ≤ 64 items here, and size is checked against the room the driver gave before anything is made.
    if (SND_HDR_SIZE + count * size > chain.writableLength) {
      throw new BadRequest(VIRTIO_SND_S_BAD_MSG, `${what} answer of ${count} × ${size} bytes does not fit`);
    }
    const w = chain.writer();
    w.writeU32(VIRTIO_SND_S_OK);
    if (count === 0) return w.bytesWritten;
    // size ≤ the writable length here: the item is no larger than the driver's own buffer.
    const item = new Uint8Array(size);
    const v = new DataView(item.buffer);
    for (let i = start; i < start + count; i++) {
      item.fill(0);
      if (code === VIRTIO_SND_R_JACK_INFO) {
        // hda_fn_nid 0, no features, no HDA pin configuration or capabilities.
        item[SND_JACK_INFO_CONNECTED] = this.#jacks[i] ? 1 : 0;
      } else if (code === VIRTIO_SND_R_PCM_INFO) {
        const info = this.#streams[i].info;
        v.setUint32(0, info.nid, true);
        v.setUint32(SND_PCM_INFO_FEATURES, 0, true);
        v.setBigUint64(SND_PCM_INFO_FORMATS, info.formats, true);
        v.setBigUint64(SND_PCM_INFO_RATES, info.rates, true);
        item[SND_PCM_INFO_DIRECTION] = info.direction;
        item[SND_PCM_INFO_CHANNELS_MIN] = info.channelsMin;
        item[SND_PCM_INFO_CHANNELS_MAX] = info.channelsMax;
      } else {
        const m = this.#chmaps[i];
        v.setUint32(0, m.nid, true);
        item[SND_CHMAP_INFO_DIRECTION] = m.direction;
        item[SND_CHMAP_INFO_CHANNELS] = m.positions.length;
        item.set(m.positions.slice(0, VIRTIO_SND_CHMAP_MAX_SIZE), SND_CHMAP_INFO_POSITIONS);
      }
      w.write(item);
    }
    return w.bytesWritten;
  }

  #setParams(s: Stream, v: DataView): void {
    // SET_PARAMS is taken before PREPARE and after RELEASE (5.14.6.6.1).
    if (s.state !== "idle" && s.state !== "params" && s.state !== "prepared" && s.state !== "released") {
      throw new BadRequest(VIRTIO_SND_S_BAD_MSG, `SET_PARAMS of stream ${s.id} while ${s.state}`);
    }
    const p: StreamParams = {
      bufferBytes: v.getUint32(SND_SET_PARAMS_BUFFER_BYTES, true),
      periodBytes: v.getUint32(SND_SET_PARAMS_PERIOD_BYTES, true),
      features: v.getUint32(SND_SET_PARAMS_FEATURES, true),
      channels: v.getUint8(SND_SET_PARAMS_CHANNELS),
      format: v.getUint8(SND_SET_PARAMS_FORMAT),
      rateIndex: v.getUint8(SND_SET_PARAMS_RATE),
    };
    const bad = (why: string) => new BadRequest(VIRTIO_SND_S_NOT_SUPP, `SET_PARAMS of stream ${s.id}: ${why}`);
    if (p.features !== 0) throw bad(`features 0x${p.features.toString(16)} (none is offered)`);
    if (p.format >= 64 || !(s.info.formats & (1n << BigInt(p.format)))) throw bad(`format ${p.format}`);
    if (p.rateIndex >= 64 || !(s.info.rates & (1n << BigInt(p.rateIndex)))) throw bad(`rate index ${p.rateIndex}`);
    if (p.channels < s.info.channelsMin || p.channels > s.info.channelsMax) throw bad(`${p.channels} channels`);
    const frame = p.channels * SAMPLE_BYTES[p.format];
    if (
      p.periodBytes === 0 || p.bufferBytes === 0 || p.periodBytes > p.bufferBytes ||
      p.bufferBytes > SND_MAX_BUFFER_BYTES || p.periodBytes % frame !== 0 || p.bufferBytes % p.periodBytes !== 0
    ) {
      throw new BadRequest(
        VIRTIO_SND_S_BAD_MSG,
        `SET_PARAMS of stream ${s.id}: buffer ${p.bufferBytes} bytes, period ${p.periodBytes} bytes, frame ${frame}`,
      );
    }
    if (s.state === "prepared" || s.state === "released") this.#closeHost(s);
    // Messages a prepared stream held were for the old parameters: they complete without samples.
    this.#returnHeld(s);
    s.params = p;
    s.state = "params";
    s.fresh = true;
    s.capturePos = 0;
  }

  #prepare(s: Stream): void {
    if (s.state !== "params" && s.state !== "prepared" && s.state !== "released") {
      throw new BadRequest(VIRTIO_SND_S_BAD_MSG, `PREPARE of stream ${s.id} while ${s.state}`);
    }
    if (!s.sink && !s.source) this.#openHost(s);
    s.state = "prepared";
  }

  #openHost(s: Stream): void {
    const f = s.format();
    try {
      if (s.info.direction === VIRTIO_SND_D_OUTPUT) s.sink = this.backend.openPlayback(s.id, f, s.fresh);
      else s.source = this.backend.openCapture(s.id, f, s.capturePos);
      s.fresh = false;
    } catch (e) {
      this.#log.log(`stream ${s.id}: the ${this.backend.kind} back end failed: ${(e as Error).message}`);
      throw new BadRequest(VIRTIO_SND_S_IO_ERR, `stream ${s.id}: no host stream`);
    }
  }

  #closeHost(s: Stream): void {
    s.sink?.close();
    if (s.source) {
      s.capturePos = s.source.position;
      s.source.close();
    }
    s.sink = undefined;
    s.source = undefined;
  }

  #start(s: Stream): void {
    if (s.state !== "prepared" && s.state !== "stopped") {
      throw new BadRequest(VIRTIO_SND_S_BAD_MSG, `START of stream ${s.id} while ${s.state}`);
    }
    s.state = "running";
    s.base = this.#clock.now();
    s.consumed = 0;
    this.#pace(s);
  }

  #stop(s: Stream): void {
    if (s.state !== "running") throw new BadRequest(VIRTIO_SND_S_BAD_MSG, `STOP of stream ${s.id} while ${s.state}`);
    // What its clock made due is consumed first; later messages wait for START or RELEASE.
    this.#pace(s);
    this.#stopTimer(s);
    s.state = "stopped";
  }

  #release(s: Stream): void {
    if (s.state !== "prepared" && s.state !== "stopped") {
      throw new BadRequest(VIRTIO_SND_S_BAD_MSG, `RELEASE of stream ${s.id} while ${s.state}`);
    }
    this.#stopTimer(s);
    s.state = "released";
    // Every held message completes, without samples (5.14.6.6.5.1).
    this.#returnHeld(s);
  }

  /** Completes every message `s` holds, without samples. */
  #returnHeld(s: Stream): void {
    const held = s.held;
    s.held = [];
    const used = new Set<number>();
    for (const h of held) used.add(this.#complete(s, h, VIRTIO_SND_S_OK, false));
    this.#interruptQueues(used);
  }

  // ---- I/O messages ----

  /** Takes the new messages of tx or rx queue `index`: each is held by its stream, or refused at once. */
  #takeMessages(q: Virtqueue, index: number): void {
    const touched = new Set<Stream>();
    let refused = false;
    for (let chain = q.pop(); chain; chain = q.pop()) {
      this.#stats.ioMessages++;
      const status = this.#checkMessage(chain, index);
      if (typeof status === "number") {
        this.#stats.badMessages++;
        q.addUsed(chain.head, this.#writeStatus(chain, status));
        refused = true;
        continue;
      }
      const { stream: s, bytes } = status;
      if (s.held.length === 0 && s.state === "running") {
        // The clock picks up again at a message after it ran out of them.
        s.base = this.#clock.now();
        s.consumed = 0;
      }
      s.held.push({ chain, bytes });
      touched.add(s);
    }
    if (refused && q.needsInterrupt()) this.#interrupt?.signalUsedQueue(index);
    for (const s of touched) if (s.state === "running") this.#pace(s);
  }

  /** The stream and sample bytes of a message, or the status that refuses it. */
  #checkMessage(chain: DescriptorChain, index: number): number | { stream: Stream; bytes: number } {
    if (chain.writableLength < SND_PCM_STATUS_SIZE || chain.readableLength < SND_PCM_XFER_SIZE) {
      this.#log.log(`I/O message with ${chain.readableLength} readable, ${chain.writableLength} writable bytes`);
      return VIRTIO_SND_S_BAD_MSG;
    }
    let id: number;
    try {
      id = chain.reader().readU32();
    } catch (e) {
      this.#log.log(`I/O message: ${(e as Error).message}`);
      return VIRTIO_SND_S_BAD_MSG;
    }
    const s = this.#streams[id];
    const want = index === VIRTIO_SND_VQ_TX ? VIRTIO_SND_D_OUTPUT : VIRTIO_SND_D_INPUT;
    if (!s || s.info.direction !== want) {
      this.#log.log(`I/O message for stream ${id} on the ${index === VIRTIO_SND_VQ_TX ? "tx" : "rx"} queue`);
      return VIRTIO_SND_S_BAD_MSG;
    }
    if (s.state !== "prepared" && s.state !== "running" && s.state !== "stopped") {
      this.#log.log(`I/O message for stream ${id} while ${s.state}`);
      return VIRTIO_SND_S_BAD_MSG;
    }
    const bytes = index === VIRTIO_SND_VQ_TX
      ? chain.readableLength - SND_PCM_XFER_SIZE
      : chain.writableLength - SND_PCM_STATUS_SIZE;
    // A message is a period or a few (Linux sends one period each): never more than the whole buffer,
    // which bounds what one completion copies.
    if (bytes > s.params!.bufferBytes) {
      this.#log.log(`I/O message of ${bytes} bytes for stream ${id}, whose buffer is ${s.params!.bufferBytes}`);
      return VIRTIO_SND_S_BAD_MSG;
    }
    return { stream: s, bytes };
  }

  /** Writes a status (and latency 0) at the end of the chain's writable part; returns the used length. */
  #writeStatus(chain: DescriptorChain, status: number, dataBytes = 0): number {
    try {
      const w = chain.writer();
      w.skip(chain.writableLength - SND_PCM_STATUS_SIZE);
      w.writeU32(status);
      w.writeU32(0);
      return dataBytes + SND_PCM_STATUS_SIZE;
    } catch (e) {
      this.#log.log(`I/O message status: ${(e as Error).message}`);
      return 0;
    }
  }

  /** Completes every held message of running stream `s` whose time has come, then waits for the next. */
  #pace(s: Stream): void {
    this.#stopTimer(s);
    if (s.state !== "running") return;
    const rate = s.byteRate();
    const due = ((this.#clock.now() - s.base) * rate) / 1000;
    const used = new Set<number>();
    while (s.held.length > 0 && s.consumed + s.held[0].bytes <= due) {
      const h = s.held.shift()!;
      s.consumed += h.bytes;
      used.add(this.#complete(s, h, VIRTIO_SND_S_OK, true));
    }
    this.#interruptQueues(used);
    if (s.held.length > 0) {
      const at = s.base + ((s.consumed + s.held[0].bytes) * 1000) / rate;
      s.timer = this.#clock.setTimer(() => {
        s.timer = undefined;
        this.#pace(s);
      }, Math.max(1, Math.ceil(at - this.#clock.now())));
    }
  }

  /**
   * Completes held message `h` of `s`, moving its samples when `play` (tx: to the back end; rx: from it);
   * returns its queue's index.
   */
  #complete(s: Stream, h: Held, status: number, play: boolean): number {
    const index = s.info.direction === VIRTIO_SND_D_OUTPUT ? VIRTIO_SND_VQ_TX : VIRTIO_SND_VQ_RX;
    const q = this.#queues[index];
    let data = 0;
    if (play) {
      try {
        if (index === VIRTIO_SND_VQ_TX) this.#play(s, h);
        else data = this.#capture(s, h);
      } catch (e) {
        status = VIRTIO_SND_S_IO_ERR;
        data = 0;
        this.#log.log(`stream ${s.id}: ${(e as Error).message}`);
      }
    }
    s.messages++;
    q?.addUsed(h.chain.head, this.#writeStatus(h.chain, status, data));
    return index;
  }

  #play(s: Stream, h: Held): void {
    const r = h.chain.reader();
    r.skip(SND_PCM_XFER_SIZE);
    for (let left = h.bytes; left > 0;) {
      const piece = r.read(Math.min(left, COPY_CHUNK));
      if (this.#muted) piece.fill(silenceByte(s.params!.format));
      const kept = s.sink ? s.sink.write(piece) : piece.length;
      this.#stats.droppedBytes += piece.length - kept;
      left -= piece.length;
      s.bytes += piece.length;
      this.#stats.txBytes += piece.length;
    }
  }

  #capture(s: Stream, h: Held): number {
    const w = h.chain.writer();
    const buf = new Uint8Array(Math.min(h.bytes, COPY_CHUNK));
    for (let left = h.bytes; left > 0;) {
      const piece = buf.subarray(0, Math.min(left, COPY_CHUNK));
      s.source?.read(piece);
      if (this.#muted) piece.fill(silenceByte(s.params!.format));
      w.write(piece);
      left -= piece.length;
      s.bytes += piece.length;
      this.#stats.rxBytes += piece.length;
    }
    return h.bytes;
  }

  #interruptQueues(used: Set<number>): void {
    for (const i of used) {
      const q = this.#queues[i];
      if (q?.needsInterrupt()) this.#interrupt?.signalUsedQueue(i);
    }
  }

  #stopTimer(s: Stream): void {
    if (s.timer !== undefined) this.#clock.clearTimer(s.timer);
    s.timer = undefined;
  }

  // ---- Device state (core/state.ts) ----

  /** False while a stream holds I/O messages or a queue has a chain taken and not completed. */
  quiescent(): boolean {
    return this.#streams.every((s) => s.held.length === 0) && queuesQuiescent(this.#queues);
  }

  /** The streams' states and parameters, the jacks, the counters; the back ends' files are host resources. */
  saveState(): DeviceState {
    const held = this.#streams.find((s) => s.held.length > 0);
    if (held) throw new StateError(`virtio-snd: stream ${held.id} holds I/O messages (stop and release it first)`);
    return {
      type: SOUND_STATE_TYPE,
      version: SOUND_STATE_VERSION,
      data: {
        features: featuresField(this.features),
        config: this.#config.slice(),
        jacks: [...this.#jacks],
        streams: this.#streams.map((s): StateValue => ({
          state: s.state,
          params: s.params ? { ...s.params } : null,
          fresh: s.fresh,
          capturePos: s.source ? s.source.position : s.capturePos,
          bytes: s.bytes,
          messages: s.messages,
        })),
        stats: { ...this.#stats },
      },
    };
  }

  restoreState(state: DeviceState): void {
    const d = stateRecord(stateData(state, SOUND_STATE_TYPE, SOUND_STATE_VERSION), "virtio-snd state");
    if (this.#queues.length > 0) throw new StateError("virtio-snd: restore into a device a driver has activated");
    checkSavedIdentity("virtio-snd", d, this.features, this.#config);
    const jacks = stateArray(d.jacks, "virtio-snd jacks");
    const streams = stateArray(d.streams, "virtio-snd streams");
    if (jacks.length !== this.#jacks.length || streams.length !== this.#streams.length) {
      throw new StateError("virtio-snd: the saved jacks or streams are not this device's");
    }
    const stats = stateCounters(d.stats, STAT_NAMES, "virtio-snd");
    const restored = streams.map((v, i) => this.#restoreStream(this.#streams[i], stateRecord(v, `stream ${i}`)));
    jacks.forEach((j, i) => {
      if (typeof j !== "boolean") throw new StateError(`virtio-snd jack ${i}: not a boolean`);
    });
    // Everything checked: take it.
    jacks.forEach((j, i) => this.#jacks[i] = j as boolean);
    restored.forEach((apply) => apply());
    Object.assign(this.#stats, stats);
  }

  /** Checks one saved stream against `s`; returns what takes it. */
  #restoreStream(s: Stream, r: { [key: string]: StateValue }): () => void {
    const what = `virtio-snd stream ${s.id}`;
    const st = stateString(r.state, `${what} state`) as StreamState;
    if (!STREAM_STATES.includes(st)) throw new StateError(`${what}: unknown state "${st}"`);
    let params: StreamParams | undefined;
    if (r.params !== null) {
      const p = stateRecord(r.params, `${what} params`);
      params = {
        bufferBytes: stateInteger(p.bufferBytes, `${what} buffer`, 1, SND_MAX_BUFFER_BYTES),
        periodBytes: stateInteger(p.periodBytes, `${what} period`, 1, SND_MAX_BUFFER_BYTES),
        features: stateInteger(p.features, `${what} features`, 0, 0),
        channels: stateInteger(p.channels, `${what} channels`, s.info.channelsMin, s.info.channelsMax),
        format: stateInteger(p.format, `${what} format`, 0, 63),
        rateIndex: stateInteger(p.rateIndex, `${what} rate`, 0, 63),
      };
      if (!(s.info.formats & (1n << BigInt(params.format))) || !(s.info.rates & (1n << BigInt(params.rateIndex)))) {
        throw new StateError(`${what}: a format or rate this stream does not offer`);
      }
    }
    if ((st === "idle") !== (params === undefined)) {
      throw new StateError(`${what}: state ${st} with params ${!!params}`);
    }
    if (typeof r.fresh !== "boolean") throw new StateError(`${what} fresh: not a boolean`);
    const fresh = r.fresh;
    const capturePos = stateInteger(r.capturePos, `${what} capture position`, 0, Number.MAX_SAFE_INTEGER);
    const bytes = stateInteger(r.bytes, `${what} bytes`, 0, Number.MAX_SAFE_INTEGER);
    const messages = stateInteger(r.messages, `${what} messages`, 0, Number.MAX_SAFE_INTEGER);
    return () => {
      // A stream saved running goes on running (its messages come again from the restored queues).
      s.state = st;
      s.params = params;
      s.fresh = fresh;
      s.capturePos = capturePos;
      s.bytes = bytes;
      s.messages = messages;
    };
  }
}
