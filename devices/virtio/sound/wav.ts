// WAV files for the sound device's file back end: the canonical 44-byte header written in front of a
// playback stream's samples, and the reading of a capture file's format and data chunk. The layout is
// Microsoft's RIFF WAVE format (the "fmt " chunk is a WAVEFORMATEX, mmreg.h); every multi-byte field is
// little-endian, as virtio-snd's samples are.

import {
  PCM_RATES,
  SAMPLE_BYTES,
  VIRTIO_SND_PCM_FMT_FLOAT,
  VIRTIO_SND_PCM_FMT_S16,
  VIRTIO_SND_PCM_FMT_S24_3,
  VIRTIO_SND_PCM_FMT_S32,
  VIRTIO_SND_PCM_FMT_U8,
} from "./constants.ts";

/** RIFF header: "RIFF", le32 size of what follows, "WAVE". */
const RIFF_ID = 0x46464952; // "RIFF" read as le32
const WAVE_ID = 0x45564157; // "WAVE"
const FMT_ID = 0x20746d66; // "fmt "
const DATA_ID = 0x61746164; // "data"
const RIFF_HEADER_SIZE = 12;
/** Every chunk: le32 id, le32 size, then size bytes padded to an even length. */
const CHUNK_HEADER_SIZE = 8;
/** WAVEFORMATEX without cbSize: wFormatTag, nChannels, nSamplesPerSec, nAvgBytesPerSec, nBlockAlign, wBitsPerSample. */
const FMT_PCM_SIZE = 16;
const FMT_TAG = 0;
const FMT_CHANNELS = 2;
const FMT_RATE = 4;
const FMT_BYTE_RATE = 8;
const FMT_BLOCK_ALIGN = 12;
const FMT_BITS = 14;
/** WAVEFORMATEXTENSIBLE: the SubFormat GUID's first two bytes are the format tag. */
const FMT_EXTENSIBLE_SUBFORMAT = 24;
const FMT_EXTENSIBLE_SIZE = 40;
/** Format tags (mmreg.h). */
const WAVE_FORMAT_PCM = 1;
const WAVE_FORMAT_IEEE_FLOAT = 3;
const WAVE_FORMAT_EXTENSIBLE = 0xfffe;

/** The canonical header: RIFF, a 16-byte fmt chunk, the data chunk's header. */
export const WAV_HEADER_SIZE = RIFF_HEADER_SIZE + CHUNK_HEADER_SIZE + FMT_PCM_SIZE + CHUNK_HEADER_SIZE;
/** Where the header's two size fields are: the RIFF size, the data chunk's size. */
export const WAV_RIFF_SIZE_OFFSET = 4;
export const WAV_DATA_SIZE_OFFSET = WAV_HEADER_SIZE - 4;
/** The most data bytes a WAV file can hold (its sizes are le32; the RIFF size counts the header too). */
export const WAV_MAX_DATA_BYTES = 0xffff_ffff - (WAV_HEADER_SIZE - CHUNK_HEADER_SIZE);
/** How far into a capture file its data chunk is looked for. */
const MAX_CHUNKS = 64;

/** A stream's sample layout, in virtio-snd terms. */
export interface PcmFormat {
  /** VIRTIO_SND_PCM_FMT_* (one of SAMPLE_BYTES's keys) */
  format: number;
  channels: number;
  /** Frames per second */
  rate: number;
}

/** The WAV format tag and bits per sample of a virtio-snd format. */
function wavTag(format: number): { tag: number; bits: number } {
  if (format === VIRTIO_SND_PCM_FMT_FLOAT) return { tag: WAVE_FORMAT_IEEE_FLOAT, bits: 32 };
  const bytes = SAMPLE_BYTES[format];
  if (bytes === undefined) throw new Error(`sample format ${format} has no WAV form here`);
  return { tag: WAVE_FORMAT_PCM, bits: bytes * 8 };
}

/** The 44-byte header for `dataBytes` bytes of samples in format `f`. */
export function wavHeader(f: PcmFormat, dataBytes: number): Uint8Array {
  const { tag, bits } = wavTag(f.format);
  const h = new Uint8Array(WAV_HEADER_SIZE);
  const v = new DataView(h.buffer);
  const block = f.channels * (bits / 8);
  v.setUint32(0, RIFF_ID, true);
  v.setUint32(WAV_RIFF_SIZE_OFFSET, WAV_HEADER_SIZE - CHUNK_HEADER_SIZE + dataBytes, true);
  v.setUint32(8, WAVE_ID, true);
  const fmt = RIFF_HEADER_SIZE;
  v.setUint32(fmt, FMT_ID, true);
  v.setUint32(fmt + 4, FMT_PCM_SIZE, true);
  const b = fmt + CHUNK_HEADER_SIZE;
  v.setUint16(b + FMT_TAG, tag, true);
  v.setUint16(b + FMT_CHANNELS, f.channels, true);
  v.setUint32(b + FMT_RATE, f.rate, true);
  v.setUint32(b + FMT_BYTE_RATE, f.rate * block, true);
  v.setUint16(b + FMT_BLOCK_ALIGN, block, true);
  v.setUint16(b + FMT_BITS, bits, true);
  const data = b + FMT_PCM_SIZE;
  v.setUint32(data, DATA_ID, true);
  v.setUint32(data + 4, dataBytes, true);
  return h;
}

/** A WAV file's format and where its samples are. */
export interface WavInfo extends PcmFormat {
  dataOffset: number;
  dataBytes: number;
}

/** Reads `n` bytes at `off` of `file` (fewer at its end). */
function readAt(file: Deno.FsFile, off: number, n: number): Uint8Array {
  const buf = new Uint8Array(n);
  file.seekSync(off, Deno.SeekMode.Start);
  let got = 0;
  while (got < n) {
    const r = file.readSync(buf.subarray(got));
    if (r === null || r === 0) break;
    got += r;
  }
  return buf.subarray(0, got);
}

/**
 * The format and data chunk of the WAV file open in `file` (of `size` bytes). Throws an Error with one
 * line for anything that is not a PCM or float WAV in a format virtio-snd carries (SAMPLE_BYTES) at one of
 * its rates (PCM_RATES).
 */
export function readWavInfo(file: Deno.FsFile, size: number): WavInfo {
  const riff = readAt(file, 0, RIFF_HEADER_SIZE);
  const rv = new DataView(riff.buffer, riff.byteOffset, riff.length);
  if (riff.length < RIFF_HEADER_SIZE || rv.getUint32(0, true) !== RIFF_ID || rv.getUint32(8, true) !== WAVE_ID) {
    throw new Error("not a RIFF WAVE file");
  }
  let off = RIFF_HEADER_SIZE;
  let fmt: PcmFormat | undefined;
  for (let i = 0; i < MAX_CHUNKS && off + CHUNK_HEADER_SIZE <= size; i++) {
    const ch = readAt(file, off, CHUNK_HEADER_SIZE);
    const cv = new DataView(ch.buffer);
    const id = cv.getUint32(0, true);
    const len = cv.getUint32(4, true);
    const body = off + CHUNK_HEADER_SIZE;
    if (id === FMT_ID) {
      if (len < FMT_PCM_SIZE || len > FMT_EXTENSIBLE_SIZE + 64) throw new Error(`fmt chunk of ${len} bytes`);
      const f = readAt(file, body, len);
      if (f.length < len) throw new Error("the fmt chunk is cut short");
      fmt = decodeFmt(new DataView(f.buffer), len);
    } else if (id === DATA_ID) {
      if (!fmt) throw new Error("the data chunk comes before the fmt chunk");
      // A writer that streamed may leave the size at 0 or too large: the data then runs to the file's end.
      const bytes = len === 0 || body + len > size ? size - body : len;
      return { ...fmt, dataOffset: body, dataBytes: bytes };
    }
    off = body + len + (len & 1);
  }
  throw new Error(fmt ? "no data chunk" : "no fmt chunk");
}

function decodeFmt(v: DataView, len: number): PcmFormat {
  let tag = v.getUint16(FMT_TAG, true);
  const channels = v.getUint16(FMT_CHANNELS, true);
  const rate = v.getUint32(FMT_RATE, true);
  const bits = v.getUint16(FMT_BITS, true);
  if (tag === WAVE_FORMAT_EXTENSIBLE) {
    if (len < FMT_EXTENSIBLE_SIZE) throw new Error("a WAVE_FORMAT_EXTENSIBLE fmt chunk shorter than 40 bytes");
    tag = v.getUint16(FMT_EXTENSIBLE_SUBFORMAT, true);
  }
  let format: number | undefined;
  if (tag === WAVE_FORMAT_IEEE_FLOAT && bits === 32) format = VIRTIO_SND_PCM_FMT_FLOAT;
  if (tag === WAVE_FORMAT_PCM) {
    format = ({
      8: VIRTIO_SND_PCM_FMT_U8,
      16: VIRTIO_SND_PCM_FMT_S16,
      24: VIRTIO_SND_PCM_FMT_S24_3,
      32: VIRTIO_SND_PCM_FMT_S32,
    } as Record<number, number>)[bits];
  }
  if (format === undefined) throw new Error(`format tag ${tag} with ${bits} bits per sample is not supported`);
  if (channels < 1 || channels > 255) throw new Error(`${channels} channels`);
  if (!PCM_RATES.includes(rate)) throw new Error(`rate ${rate} Hz is not one of virtio-snd's rates`);
  return { format, channels, rate };
}
