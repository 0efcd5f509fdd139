// The host event source of crosvm's `--input TYPE[path=SOCKET]`: the VMM connects to a Unix stream socket
// that another program listens on (crosvm's IntoUnixStream for a path; a path /proc/self/fd/N names a
// socket descriptor the VMM already holds) and reads struct virtio_input_event records from it (8 bytes:
// le16 type, le16 code, le32 value; device.ts INPUT_EVENT_*). Each record goes to the guest as it is, in
// order; the program batches with its own EV_SYN records, as crosvm adds none. Status events the guest
// sends (LEDs) are written back to the socket as the same records, except EV_MSC (crosvm leaves those out
// so that a source echoing them does not loop).
//
// The socket is hostile input: a record may be split across reads (the rest waits for the next read), a
// record whose type is above EV_MAX is dropped, and the first such record is one log line (the rest are
// counted); the socket closing, an error reading it, or bytes of an unfinished record at its end are one
// log line each, and the device goes on without the source. When the guest is slow the source stops
// reading once the device's pending queue is full, so the writer is held back by the socket's buffer.

import {
  INPUT_EVENT_CODE,
  INPUT_EVENT_SIZE,
  INPUT_EVENT_TYPE,
  INPUT_EVENT_VALUE,
  type InputDevice,
  type InputEvent,
  type InputEventSource,
} from "./device.ts";
import { EV_MAX, EV_MSC } from "./codes.ts";
import { ConnectionClosed, setNonBlocking, UnixStream, WaitCancelled, Waker } from "../../../core/unix_socket.ts";
import { RateLimitedLog } from "../../../core/log.ts";
import { closeFd } from "../../../ffi/libc.ts";

/** Records read from the socket at most at a time (crosvm reads 16). */
export const SOCKET_READ_EVENTS = 16;
/** A path naming a descriptor the process holds, as crosvm accepts one. */
const PROC_SELF_FD = /^\/proc\/self\/fd\/(\d+)$/;

/** Counters of one source. */
export interface InputSourceStats {
  eventsForwarded: number;
  malformed: number;
  statusWritten: number;
}

export class InputSocketSource implements InputEventSource {
  readonly #stream: UnixStream;
  readonly #waker = new Waker();
  readonly #device: InputDevice;
  readonly #log: RateLimitedLog;
  /** Bytes of a record not complete yet. */
  #partial = new Uint8Array(0);
  #closed = false;
  /** Resolves when close() is called. */
  readonly #closing: Promise<void>;
  #signalClosing!: () => void;
  #writes: Promise<void> = Promise.resolve();
  readonly stats: InputSourceStats = { eventsForwarded: 0, malformed: 0, statusWritten: 0 };
  /** Settles when the source stops reading (socket closed, an error, or close()). */
  readonly done: Promise<void>;

  /**
   * Connect to the socket at `path` (or take the descriptor a /proc/self/fd/N path names) and feed
   * `device` from it; the source is closed with the device. Throws when the socket cannot be reached.
   */
  static connect(path: string, device: InputDevice): InputSocketSource {
    const m = path.match(PROC_SELF_FD);
    let fd: number | undefined;
    if (m) {
      fd = Number(m[1]);
      setNonBlocking(fd);
    }
    const source = new InputSocketSource(fd, path, device);
    device.attachSource(source);
    return source;
  }

  private constructor(fd: number | undefined, readonly path: string, device: InputDevice) {
    this.#device = device;
    this.#log = new RateLimitedLog(`virtio-input ${path}`);
    this.#stream = fd === undefined ? UnixStream.connect(path, this.#waker) : new UnixStream(fd, this.#waker);
    this.#closing = new Promise((resolve) => this.#signalClosing = resolve);
    device.statusSink = (e) => this.#writeStatus(e);
    this.done = this.#run();
  }

  async #run(): Promise<void> {
    try {
      for (;;) {
        if (this.#device.room === 0) {
          await Promise.race([this.#device.whenRoom(), this.#closing]);
          if (this.#closed) return;
          continue;
        }
        const want = Math.min(this.#device.room, SOCKET_READ_EVENTS) * INPUT_EVENT_SIZE - this.#partial.length;
        const got = this.#stream.tryRecv(want);
        if (got === null) {
          await this.#stream.waitReadable();
          continue;
        }
        // A descriptor has no meaning on this socket.
        got.fds.forEach(closeFd);
        this.#take(got.data);
      }
    } catch (e) {
      if (e instanceof WaitCancelled || this.#closed) return;
      const rest = this.#partial.length > 0 ? ` (${this.#partial.length} bytes of an unfinished event dropped)` : "";
      if (e instanceof ConnectionClosed) this.#log.log(`event source closed${rest}; no more host events`);
      else this.#log.log(`reading the event source failed: ${(e as Error).message}${rest}; no more host events`);
    } finally {
      // The descriptors are closed here, once nothing polls them any more.
      this.#closed = true;
      if (this.#device.statusSink !== undefined) this.#device.statusSink = undefined;
      this.#stream.close();
      this.#waker.close();
    }
  }

  /** Decode the whole records in what was read and forward them. */
  #take(data: Uint8Array): void {
    const bytes = new Uint8Array(this.#partial.length + data.length);
    bytes.set(this.#partial);
    bytes.set(data, this.#partial.length);
    const whole = bytes.length - bytes.length % INPUT_EVENT_SIZE;
    const v = new DataView(bytes.buffer);
    const events: InputEvent[] = [];
    for (let off = 0; off < whole; off += INPUT_EVENT_SIZE) {
      const e = {
        type: v.getUint16(off + INPUT_EVENT_TYPE, true),
        code: v.getUint16(off + INPUT_EVENT_CODE, true),
        value: v.getInt32(off + INPUT_EVENT_VALUE, true),
      };
      if (e.type > EV_MAX) {
        this.stats.malformed++;
        if (this.stats.malformed === 1) {
          this.#log.log(
            `event type ${e.type} (code ${e.code}) is not an input event type; dropped (further ones are counted)`,
          );
        }
        continue;
      }
      events.push(e);
    }
    this.#partial = bytes.slice(whole);
    // The read asked for no more than the device has room for.
    this.stats.eventsForwarded += this.#device.forwardEvents(events);
  }

  #writeStatus(e: InputEvent): void {
    if (this.#closed || e.type === EV_MSC) return;
    const b = new Uint8Array(INPUT_EVENT_SIZE);
    const v = new DataView(b.buffer);
    v.setUint16(INPUT_EVENT_TYPE, e.type, true);
    v.setUint16(INPUT_EVENT_CODE, e.code, true);
    v.setInt32(INPUT_EVENT_VALUE, e.value, true);
    this.#writes = this.#writes.then(async () => {
      if (this.#closed) return;
      try {
        await this.#stream.send(b);
        this.stats.statusWritten++;
      } catch (err) {
        if (!(err instanceof WaitCancelled)) this.#log.log(`writing a status event failed: ${(err as Error).message}`);
      }
    });
  }

  /** Stop reading; the socket is closed once the read loop has seen it (`done`). */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#waker.wake();
    this.#signalClosing();
  }
}
