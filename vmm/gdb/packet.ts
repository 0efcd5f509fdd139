// The GDB remote serial protocol's framing (GDB manual, "Remote Protocol", "Overview"): a packet is
// `$data#cc` with cc the modulo-256 sum of data's bytes in two hex digits; the receiver acknowledges
// with `+` (or `-` to ask again); a lone 0x03 byte outside a packet is an interrupt request. In data,
// `}` escapes `#`, `$`, `}` and `*` (the escaped byte XOR 0x20); `*` introduces run-length encoding,
// which only the stub's replies may use and this stub never sends.

/** Framing bytes (GDB manual, "Overview"). */
const PACKET_START = 0x24; // '$'
const PACKET_END = 0x23; // '#'
const ESCAPE = 0x7d; // '}'
const RUN_LENGTH = 0x2a; // '*'
const ESCAPE_XOR = 0x20;
const ACK = 0x2b; // '+'
const NACK = 0x2d; // '-'
/** Ctrl-C: the client asks the stub to stop the target (GDB manual, "Interrupts"). */
export const INTERRUPT = 0x03;
/** The longest packet this stub accepts (it tells the client so in qSupported's PacketSize). */
export const MAX_PACKET_SIZE = 0x4000;

/** What the reader found in the client's byte stream. */
export type Incoming =
  | { kind: "packet"; data: Uint8Array }
  | { kind: "interrupt" }
  | { kind: "ack" }
  | { kind: "nack" }
  /** A packet whose checksum did not match, or that was too long: answer `-`. */
  | { kind: "bad"; why: string };

const enum State {
  Idle,
  Data,
  Check1,
  Check2,
}

/** An incremental parser of the client's bytes: feed it what the socket gave, take the events. */
export class PacketReader {
  #state = State.Idle;
  #buf = new Uint8Array(MAX_PACKET_SIZE);
  #len = 0;
  #sum = 0;
  #overflow = false;
  #check = 0;

  /** Parse `bytes`; returns what was completed in them, in order. */
  feed(bytes: Uint8Array): Incoming[] {
    const out: Incoming[] = [];
    for (const b of bytes) {
      switch (this.#state) {
        case State.Idle:
          if (b === PACKET_START) {
            this.#state = State.Data;
            this.#len = 0;
            this.#sum = 0;
            this.#overflow = false;
          } else if (b === INTERRUPT) out.push({ kind: "interrupt" });
          else if (b === ACK) out.push({ kind: "ack" });
          else if (b === NACK) out.push({ kind: "nack" });
          // Anything else between packets is noise; the protocol says to ignore it.
          break;
        case State.Data:
          if (b === PACKET_END) {
            this.#state = State.Check1;
            break;
          }
          this.#sum = (this.#sum + b) & 0xff;
          if (this.#len < this.#buf.length) this.#buf[this.#len++] = b;
          else this.#overflow = true;
          break;
        case State.Check1: {
          const v = hexDigit(b);
          if (v < 0) {
            this.#state = State.Idle;
            out.push({ kind: "bad", why: "checksum is not hexadecimal" });
          } else {
            this.#check = v << 4;
            this.#state = State.Check2;
          }
          break;
        }
        case State.Check2: {
          this.#state = State.Idle;
          const v = hexDigit(b);
          if (v < 0) out.push({ kind: "bad", why: "checksum is not hexadecimal" });
          else if ((this.#check | v) !== this.#sum) out.push({ kind: "bad", why: "checksum mismatch" });
          else if (this.#overflow) out.push({ kind: "bad", why: `packet longer than ${MAX_PACKET_SIZE} bytes` });
          else out.push({ kind: "packet", data: this.#buf.slice(0, this.#len) });
          break;
        }
      }
    }
    return out;
  }
}

/** Frame `data` as `$data#cc`, escaping the bytes the protocol reserves. */
export function encodePacket(data: Uint8Array | string): Uint8Array {
  const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
  const out: number[] = [PACKET_START];
  let sum = 0;
  const put = (b: number) => {
    out.push(b);
    sum = (sum + b) & 0xff;
  };
  for (const b of bytes) {
    if (b === PACKET_START || b === PACKET_END || b === ESCAPE || b === RUN_LENGTH) {
      put(ESCAPE);
      put(b ^ ESCAPE_XOR);
    } else put(b);
  }
  out.push(PACKET_END, ...hexByte(sum));
  return new Uint8Array(out);
}

/** Undo `}` escapes in a binary packet's payload (X, vFile). */
export function unescapeBinary(data: Uint8Array): Uint8Array {
  const out: number[] = [];
  for (let i = 0; i < data.length; i++) {
    if (data[i] === ESCAPE && i + 1 < data.length) out.push(data[++i] ^ ESCAPE_XOR);
    else out.push(data[i]);
  }
  return new Uint8Array(out);
}

const HEX = "0123456789abcdef";

function hexByte(b: number): [number, number] {
  return [HEX.charCodeAt(b >> 4), HEX.charCodeAt(b & 15)];
}

/** The value of one hex digit's character code, or -1. */
export function hexDigit(c: number): number {
  if (c >= 0x30 && c <= 0x39) return c - 0x30;
  if (c >= 0x61 && c <= 0x66) return c - 0x61 + 10;
  if (c >= 0x41 && c <= 0x46) return c - 0x41 + 10;
  return -1;
}

/** Bytes as lower-case hex. */
export function toHex(bytes: Uint8Array): string {
  let s = "";
  for (const b of bytes) s += HEX[b >> 4] + HEX[b & 15];
  return s;
}

/** Hex text as bytes; undefined when it is not an even number of hex digits. */
export function fromHex(s: string): Uint8Array | undefined {
  if (s.length % 2 !== 0) return undefined;
  const out = new Uint8Array(s.length / 2);
  for (let i = 0; i < out.length; i++) {
    const hi = hexDigit(s.charCodeAt(2 * i));
    const lo = hexDigit(s.charCodeAt(2 * i + 1));
    if (hi < 0 || lo < 0) return undefined;
    out[i] = (hi << 4) | lo;
  }
  return out;
}

/** The largest number a packet may give (guest addresses are at most 64 bits). */
const MAX_HEX_NUMBER_DIGITS = 16;

/** A big-endian hex number (addresses, lengths, thread ids); undefined when it is not one. */
export function parseHexNumber(s: string): bigint | undefined {
  if (s.length === 0 || s.length > MAX_HEX_NUMBER_DIGITS || !/^[0-9a-fA-F]+$/.test(s)) return undefined;
  return BigInt("0x" + s);
}

/** A little-endian 64-bit value as 16 hex digits (the byte order of x86 registers in `g`). */
export function leHex64(v: bigint): string {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, BigInt.asUintN(64, v), true);
  return toHex(b);
}

/** A little-endian 32-bit value as 8 hex digits. */
export function leHex32(v: number): string {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, v >>> 0, true);
  return toHex(b);
}
