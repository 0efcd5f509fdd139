// The sound device's host back ends (crosvm's `backend=` of --virtio-snd): where played samples go and
// where captured ones come from.
//   null: playback is dropped, capture is silence.
//   file: each output stream's samples go to `<playback_path>/stream-<id>.wav`, a WAV file whose header
//         says the format the guest set and whose sizes are kept current after every write, so the file is
//         complete whenever it is read. A stream's file starts afresh at each PCM_SET_PARAMS; prepares and
//         starts after it append. At most `playbackSize` data bytes are kept per file (0: as many as a WAV
//         file holds); more is dropped and counted. Capture streams read the WAV file `capturePath` from
//         its data chunk's start (again at each PCM_SET_PARAMS), silence after its end; without it they
//         capture silence as null's do.

import { SAMPLE_BYTES, VIRTIO_SND_PCM_FMT_U8 } from "./constants.ts";
import {
  type PcmFormat,
  readWavInfo,
  WAV_DATA_SIZE_OFFSET,
  WAV_HEADER_SIZE,
  WAV_MAX_DATA_BYTES,
  WAV_RIFF_SIZE_OFFSET,
  wavHeader,
  type WavInfo,
} from "./wav.ts";

/** Where one output stream's samples go. */
export interface PlaybackSink {
  /** Takes the next samples; returns how many bytes were kept (the rest was dropped). */
  write(bytes: Uint8Array): number;
  close(): void;
}

/** Where one input stream's samples come from. */
export interface CaptureSource {
  /** Fills `into` with the next samples (silence where there are none). */
  read(into: Uint8Array): void;
  /** Bytes of the stream read so far (a state field: a restored source goes on from it). */
  readonly position: number;
  close(): void;
}

export interface SoundBackend {
  readonly kind: "null" | "file";
  /** The one format capture streams offer, when the back end has one (a capture file's). */
  readonly captureFormat?: PcmFormat;
  /** A sink for stream `id` in format `f`: `fresh` starts it anew, otherwise it goes on from where it was. */
  openPlayback(id: number, f: PcmFormat, fresh: boolean): PlaybackSink;
  /** A source for stream `id` in format `f`, `position` bytes in. */
  openCapture(id: number, f: PcmFormat, position: number): CaptureSource;
  close(): void;
}

/** The byte of silence in format `format` (unsigned 8-bit's middle, zero for the signed and float ones). */
export function silenceByte(format: number): number {
  return format === VIRTIO_SND_PCM_FMT_U8 ? 0x80 : 0;
}

class SilenceSource implements CaptureSource {
  #position: number;
  constructor(readonly format: number, position: number) {
    this.#position = position;
  }
  get position(): number {
    return this.#position;
  }
  read(into: Uint8Array): void {
    into.fill(silenceByte(this.format));
    this.#position += into.length;
  }
  close(): void {}
}

/** Plays into nothing and captures silence. */
export class NullBackend implements SoundBackend {
  readonly kind = "null" as const;
  openPlayback(): PlaybackSink {
    return { write: (b) => b.length, close: () => {} };
  }
  openCapture(_id: number, f: PcmFormat, position: number): CaptureSource {
    return new SilenceSource(f.format, position);
  }
  close(): void {}
}

export interface FileBackendOptions {
  /** Directory of the output streams' files (crosvm's playback_path). */
  playbackPath: string;
  /** Most data bytes per output file; 0: as many as a WAV file holds (crosvm's playback_size). */
  playbackSize?: number;
  /** The WAV file capture streams read (denovm's capture_path); without it they capture silence. */
  capturePath?: string;
}

class WavSink implements PlaybackSink {
  #dataBytes: number;
  readonly #limit: number;
  readonly #sizes = new Uint8Array(4);
  constructor(readonly file: Deno.FsFile, dataBytes: number, limit: number) {
    this.#dataBytes = dataBytes;
    this.#limit = limit;
  }
  write(bytes: Uint8Array): number {
    const keep = Math.min(bytes.length, this.#limit - this.#dataBytes);
    if (keep <= 0) return 0;
    this.file.seekSync(WAV_HEADER_SIZE + this.#dataBytes, Deno.SeekMode.Start);
    writeAll(this.file, bytes.subarray(0, keep));
    this.#dataBytes += keep;
    this.#putSize(WAV_RIFF_SIZE_OFFSET, WAV_HEADER_SIZE - 8 + this.#dataBytes);
    this.#putSize(WAV_DATA_SIZE_OFFSET, this.#dataBytes);
    return keep;
  }
  #putSize(offset: number, v: number): void {
    new DataView(this.#sizes.buffer).setUint32(0, v, true);
    this.file.seekSync(offset, Deno.SeekMode.Start);
    writeAll(this.file, this.#sizes);
  }
  close(): void {
    try {
      this.file.close();
    } catch {
      // closed already
    }
  }
}

/** A file error in a few words: "no such file or directory", "permission denied", else Deno's message. */
function fileError(e: unknown): string {
  if (e instanceof Deno.errors.NotFound) return "no such file or directory";
  if (e instanceof Deno.errors.PermissionDenied) return "permission denied";
  return (e as Error).message;
}

function writeAll(file: Deno.FsFile, bytes: Uint8Array): void {
  for (let o = 0; o < bytes.length;) o += file.writeSync(bytes.subarray(o));
}

class WavSource implements CaptureSource {
  #position: number;
  constructor(readonly file: Deno.FsFile, readonly info: WavInfo, position: number) {
    this.#position = position;
  }
  get position(): number {
    return this.#position;
  }
  read(into: Uint8Array): void {
    const avail = Math.max(0, Math.min(into.length, this.info.dataBytes - this.#position));
    let got = 0;
    if (avail > 0) {
      this.file.seekSync(this.info.dataOffset + this.#position, Deno.SeekMode.Start);
      while (got < avail) {
        const n = this.file.readSync(into.subarray(got, avail));
        if (n === null || n === 0) break;
        got += n;
      }
    }
    into.fill(silenceByte(this.info.format), got);
    this.#position += into.length;
  }
  close(): void {
    try {
      this.file.close();
    } catch {
      // closed already
    }
  }
}

/** Plays into WAV files and captures from one (see the top of this file). */
export class FileBackend implements SoundBackend {
  readonly kind = "file" as const;
  readonly captureFormat?: WavInfo;
  readonly #opts: FileBackendOptions;
  readonly #limit: number;

  /** Checks the playback directory and the capture file; throws one-line Errors for the user's mistakes. */
  constructor(opts: FileBackendOptions) {
    this.#opts = opts;
    const size = opts.playbackSize ?? 0;
    if (!Number.isSafeInteger(size) || size < 0) throw new Error(`playback_size ${size} is not a byte count`);
    this.#limit = size === 0 ? WAV_MAX_DATA_BYTES : Math.min(size, WAV_MAX_DATA_BYTES);
    let st: Deno.FileInfo;
    try {
      st = Deno.statSync(opts.playbackPath);
    } catch (e) {
      throw new Error(`playback_path ${opts.playbackPath}: ${fileError(e)}`);
    }
    if (!st.isDirectory) throw new Error(`playback_path ${opts.playbackPath} is not a directory`);
    if (opts.capturePath !== undefined) {
      const file = this.#openCaptureFile();
      try {
        this.captureFormat = readWavInfo(file, file.statSync().size);
      } catch (e) {
        throw new Error(`capture_path ${opts.capturePath}: ${(e as Error).message}`);
      } finally {
        file.close();
      }
    }
  }

  #openCaptureFile(): Deno.FsFile {
    const path = this.#opts.capturePath!;
    let file: Deno.FsFile;
    try {
      file = Deno.openSync(path, { read: true });
    } catch (e) {
      throw new Error(`capture_path ${path}: ${fileError(e)}`);
    }
    if (!file.statSync().isFile) {
      file.close();
      throw new Error(`capture_path ${path} is not a regular file`);
    }
    return file;
  }

  /** The file output stream `id` plays into. */
  playbackFile(id: number): string {
    return `${this.#opts.playbackPath}/stream-${id}.wav`;
  }

  openPlayback(id: number, f: PcmFormat, fresh: boolean): PlaybackSink {
    const path = this.playbackFile(id);
    const file = Deno.openSync(path, { read: true, write: true, create: true });
    try {
      let dataBytes = 0;
      let keep = !fresh;
      if (keep) {
        // Going on (a restored device): only a file in this very format, its data kept.
        try {
          const info = readWavInfo(file, file.statSync().size);
          keep = info.format === f.format && info.channels === f.channels && info.rate === f.rate &&
            info.dataOffset === WAV_HEADER_SIZE;
          dataBytes = Math.min(info.dataBytes, this.#limit);
        } catch {
          keep = false;
        }
      }
      if (!keep) {
        file.truncateSync(0);
        dataBytes = 0;
      }
      file.seekSync(0, Deno.SeekMode.Start);
      writeAll(file, wavHeader(f, dataBytes));
      file.truncateSync(WAV_HEADER_SIZE + dataBytes);
      return new WavSink(file, dataBytes, this.#limit - (this.#limit % (SAMPLE_BYTES[f.format] * f.channels)));
    } catch (e) {
      file.close();
      throw e;
    }
  }

  openCapture(_id: number, f: PcmFormat, position: number): CaptureSource {
    if (this.#opts.capturePath === undefined) return new SilenceSource(f.format, position);
    const file = this.#openCaptureFile();
    try {
      const info = readWavInfo(file, file.statSync().size);
      return new WavSource(file, info, position);
    } catch (e) {
      file.close();
      throw e;
    }
  }

  close(): void {}
}

/** The back end `kind` (crosvm's `backend=`); `file` takes `opts` and throws one-line Errors for them. */
export function makeSoundBackend(kind: "null" | "file", opts: FileBackendOptions): SoundBackend {
  return kind === "file" ? new FileBackend(opts) : new NullBackend();
}
