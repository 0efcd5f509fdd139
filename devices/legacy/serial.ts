// 8250/16550A UART as Linux's 8250 driver sees it. Register numbers and bits from
// Linux include/uapi/linux/serial_reg.h.

import type { BusDevice } from "../../core/bus.ts";
import {
  type DeviceState,
  stateBoolean,
  stateBytes,
  stateData,
  StateError,
  type Stateful,
  stateInteger,
  stateRecord,
} from "../../core/state.ts";

// Register offsets (serial_reg.h).
const UART_RX = 0; // in, DLAB=0
const UART_TX = 0; // out, DLAB=0
const UART_IER = 1; // DLAB=0; with DLAB=1 offsets 0 and 1 are the divisor latch (DLL, DLM)
const UART_IIR = 2; // in
const UART_FCR = 2; // out
const UART_LCR = 3;
const UART_MCR = 4;
const UART_LSR = 5;
const UART_MSR = 6;
const UART_SCR = 7;
/** Eight registers per UART. */
export const UART_REGISTER_COUNT = 8;

const UART_IER_RDI = 0x01; // receive data available
const UART_IER_THRI = 0x02; // transmitter holding register empty
const UART_IER_RLSI = 0x04; // receiver line status
const UART_IER_MSI = 0x08; // modem status
const UART_IER_MASK = 0x0f;
const UART_IIR_NO_INT = 0x01;
const UART_IIR_THRI = 0x02;
const UART_IIR_RDI = 0x04;
const UART_IIR_FIFO_ENABLED = 0xc0;
const UART_FCR_ENABLE_FIFO = 0x01;
const UART_FCR_CLEAR_RCVR = 0x02;
const UART_LCR_DLAB = 0x80;
const UART_MCR_DTR = 0x01;
const UART_MCR_RTS = 0x02;
const UART_MCR_OUT1 = 0x04;
const UART_MCR_OUT2 = 0x08;
const UART_MCR_LOOP = 0x10;
const UART_LSR_DR = 0x01;
const UART_LSR_THRE = 0x20;
const UART_LSR_TEMT = 0x40;
const UART_MSR_CTS = 0x10;
const UART_MSR_DSR = 0x20;
const UART_MSR_RI = 0x40;
const UART_MSR_DCD = 0x80;
/** Modem lines a connected terminal shows: carrier, data set ready, clear to send. */
const MSR_CONNECTED = UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS;
/** Divisor latch at reset: 9600 baud from the 1.8432 MHz clock (Linux programs its own). */
const DEFAULT_BAUD_DIVISOR = 12;
/** Input bytes kept while the guest is not reading (older bytes are kept, newer dropped). */
const INPUT_BUFFER_LIMIT = 1 << 16;
/** Transmitted bytes not yet taken by the host side; a writer finding it full waits for room. */
const OUTPUT_BUFFER_SIZE = 1 << 14;

// The UART's state, in a SharedArrayBuffer so that the vCPU threads and the main thread serve the same
// UART: Int32 cells first, then the two byte rings. Ring positions count bytes ever queued (they wrap
// at 2^31, the ring index is position % size); head is the next byte to take, tail the next free.
const S_LOCK = 0;
const LOCK_FREE = 0;
const LOCK_HELD = 1;
const LOCK_CONTENDED = 2;
const S_IER = 1;
const S_LCR = 2;
const S_MCR = 3;
const S_SCR = 4;
const S_DLL = 5;
const S_DLM = 6;
const S_FIFO = 7;
const S_THRE_PENDING = 8;
const S_RX_HEAD = 9;
const S_RX_TAIL = 10;
const S_TX_HEAD = 11;
const S_TX_TAIL = 12;
const S_TX_BYTES = 13;
const S_RX_BYTES = 14;
const S_DROPPED = 15;
/** 1 while a vCPU side's wake-up (outputReady) is outstanding: one per drain, not one per byte. */
const S_OUTPUT_WAKE = 16;
/** 1 once the host side is gone (the VM is ending): output is dropped instead of waited on. */
const S_HOST_CLOSED = 17;
const S_CELLS = 18;
const RX_RING_START = S_CELLS * Int32Array.BYTES_PER_ELEMENT;
const TX_RING_START = RX_RING_START + INPUT_BUFFER_LIMIT;
const STATE_BYTES = TX_RING_START + OUTPUT_BUFFER_SIZE;
/** How long a writer facing a full output ring sleeps between looks (ms). */
const OUTPUT_FULL_WAIT_MS = 10;

/** The kind and layout version of a UART's saved state. */
export const SERIAL_STATE_TYPE = "8250";
export const SERIAL_STATE_VERSION = 1;
/** Registers hold one byte; the counters are Int32 cells. */
const BYTE_MAX = 0xff;
const INT32_MIN = -(2 ** 31);
const INT32_MAX = 2 ** 31 - 1;

export interface SerialOptions {
  /** Raise the UART's interrupt (an edge). Called from whichever thread served the access. */
  interrupt: () => void;
  /**
   * Host side: bytes the guest transmitted, delivered as they are written. The host side also takes
   * what vCPU-side instances queued, in drainOutput().
   */
  output?: (bytes: Uint8Array) => void;
  /**
   * vCPU side (no `output`): there is output and no wake-up is outstanding since the last drain, or
   * the ring is full; the host side must call drainOutput() soon. A full ring makes the writing vCPU
   * wait for room.
   */
  outputReady?: () => void;
  /** The state to share: another instance's `state` (default: a new UART in its reset state). */
  state?: SharedArrayBuffer;
}

/**
 * One UART. Its registers and both byte rings live in `state`, a SharedArrayBuffer: a vCPU Worker
 * builds its own Serial over the same state and serves the guest's accesses itself (the guest's
 * console writes and status polls then never wait for the main thread), while the main thread adds
 * input and takes the output. Every access holds a lock in the state for a few instructions.
 */
export class Serial implements BusDevice, Stateful {
  readonly state: SharedArrayBuffer;
  readonly #s: Int32Array;
  readonly #rx: Uint8Array;
  readonly #tx: Uint8Array;

  constructor(readonly opts: SerialOptions) {
    if (opts.state && opts.state.byteLength !== STATE_BYTES) throw new RangeError("Serial: foreign state buffer");
    this.state = opts.state ?? new SharedArrayBuffer(STATE_BYTES);
    this.#s = new Int32Array(this.state, 0, S_CELLS);
    this.#rx = new Uint8Array(this.state, RX_RING_START, INPUT_BUFFER_LIMIT);
    this.#tx = new Uint8Array(this.state, TX_RING_START, OUTPUT_BUFFER_SIZE);
    if (!opts.state) {
      this.#s[S_LCR] = 0x3; // 8N1
      this.#s[S_MCR] = UART_MCR_OUT2;
      this.#s[S_DLL] = DEFAULT_BAUD_DIVISOR;
    }
  }

  // The lock word: LOCK_FREE, LOCK_HELD, or LOCK_CONTENDED (held, and someone may be waiting); only
  // an unlock of a contended lock wakes a waiter, so the usual uncontended access makes no wake call.
  #lock(): void {
    if (Atomics.compareExchange(this.#s, S_LOCK, LOCK_FREE, LOCK_HELD) === LOCK_FREE) return;
    while (Atomics.exchange(this.#s, S_LOCK, LOCK_CONTENDED) !== LOCK_FREE) {
      Atomics.wait(this.#s, S_LOCK, LOCK_CONTENDED);
    }
  }
  #unlock(): void {
    if (Atomics.exchange(this.#s, S_LOCK, LOCK_FREE) === LOCK_CONTENDED) Atomics.notify(this.#s, S_LOCK, 1);
  }

  #inputLength(): number {
    return (this.#s[S_RX_TAIL] - this.#s[S_RX_HEAD]) | 0;
  }
  /** Queue one input byte (lock held); false when the buffer is full. */
  #pushInput(b: number): boolean {
    if (this.#inputLength() >= INPUT_BUFFER_LIMIT) {
      this.#s[S_DROPPED]++;
      return false;
    }
    const tail = this.#s[S_RX_TAIL];
    this.#rx[(tail >>> 0) % INPUT_BUFFER_LIMIT] = b;
    this.#s[S_RX_TAIL] = (tail + 1) | 0;
    return true;
  }

  /** Bytes transmitted and received, and input bytes dropped because the buffer was full. */
  get txBytes(): number {
    return Atomics.load(this.#s, S_TX_BYTES);
  }
  get rxBytes(): number {
    return Atomics.load(this.#s, S_RX_BYTES);
  }
  get droppedInput(): number {
    return Atomics.load(this.#s, S_DROPPED);
  }

  /** Bytes from the host for the guest to read. */
  enqueueInput(bytes: Uint8Array): void {
    this.#lock();
    let raise = false;
    try {
      const wasEmpty = this.#inputLength() === 0;
      for (const b of bytes) this.#pushInput(b);
      raise = wasEmpty && this.#inputLength() > 0 && (this.#s[S_IER] & UART_IER_RDI) !== 0;
    } finally {
      this.#unlock();
    }
    if (raise) this.opts.interrupt();
  }

  get pendingInput(): number {
    return (Atomics.load(this.#s, S_RX_TAIL) - Atomics.load(this.#s, S_RX_HEAD)) | 0;
  }

  /** Host side: hand every queued output byte to `output`. */
  drainOutput(): void {
    const output = this.opts.output;
    if (!output) throw new Error("Serial.drainOutput: this instance has no output (it is a vCPU side)");
    this.#lock();
    let bytes: Uint8Array;
    try {
      Atomics.store(this.#s, S_OUTPUT_WAKE, 0);
      const head = this.#s[S_TX_HEAD];
      const n = (this.#s[S_TX_TAIL] - head) | 0;
      bytes = new Uint8Array(n);
      for (let i = 0; i < n; i++) bytes[i] = this.#tx[((head + i) >>> 0) % OUTPUT_BUFFER_SIZE];
      this.#s[S_TX_HEAD] = (head + n) | 0;
    } finally {
      this.#unlock();
    }
    Atomics.notify(this.#s, S_TX_HEAD);
    if (bytes.length) output(bytes);
  }

  /**
   * Host side: the VM is ending and nothing will drain the output any more; a vCPU waiting for room
   * in a full ring stops waiting, and later output is dropped.
   */
  closeHost(): void {
    Atomics.store(this.#s, S_HOST_CLOSED, 1);
    Atomics.notify(this.#s, S_TX_HEAD);
  }

  /**
   * Host side: every vCPU side is gone, some by Worker.terminate() (a vCPU that did not stop in
   * time), which may have ended one inside its few locked instructions. Nobody else can hold the
   * lock now: free it, so the final drainOutput() cannot wait for a dead thread.
   */
  releaseLockOfEndedVcpus(): void {
    Atomics.store(this.#s, S_LOCK, LOCK_FREE);
  }

  /** Queue one transmitted byte for the host side, waiting for room if the ring is full. */
  #transmit(b: number): void {
    for (;;) {
      if (Atomics.load(this.#s, S_HOST_CLOSED)) return;
      const head = this.#s[S_TX_HEAD];
      const tail = this.#s[S_TX_TAIL];
      if (((tail - head) | 0) < OUTPUT_BUFFER_SIZE) {
        this.#tx[(tail >>> 0) % OUTPUT_BUFFER_SIZE] = b;
        this.#s[S_TX_TAIL] = (tail + 1) | 0;
        this.#s[S_TX_BYTES]++;
        if (this.opts.output) {
          this.#unlock();
          try {
            this.drainOutput();
          } finally {
            this.#lock();
          }
        } else if (Atomics.exchange(this.#s, S_OUTPUT_WAKE, 1) === 0) this.opts.outputReady?.();
        return;
      }
      // Full: the host side has not taken the output yet (a slow console). Wait, as a real UART's
      // holding register stays busy; the guest's vCPU waits with it.
      this.#unlock();
      try {
        this.opts.outputReady?.();
        Atomics.wait(this.#s, S_TX_HEAD, head, OUTPUT_FULL_WAIT_MS);
      } finally {
        this.#lock();
      }
    }
  }

  #loop(): boolean {
    return (this.#s[S_MCR] & UART_MCR_LOOP) !== 0;
  }

  read(offset: number, data: Uint8Array): void {
    data.fill(0);
    this.#lock();
    try {
      data[0] = this.#read(offset);
    } finally {
      this.#unlock();
    }
  }

  #read(offset: number): number {
    const s = this.#s;
    const dlab = (s[S_LCR] & UART_LCR_DLAB) !== 0;
    switch (offset) {
      case UART_RX: {
        if (dlab) return s[S_DLL];
        if (this.#inputLength() === 0) return 0;
        const head = s[S_RX_HEAD];
        s[S_RX_HEAD] = (head + 1) | 0;
        s[S_RX_BYTES]++;
        return this.#rx[(head >>> 0) % INPUT_BUFFER_LIMIT];
      }
      case UART_IER:
        return dlab ? s[S_DLM] : s[S_IER];
      case UART_IIR: {
        let iir = UART_IIR_NO_INT;
        if ((s[S_IER] & UART_IER_RDI) && this.#inputLength() > 0) iir = UART_IIR_RDI;
        else if ((s[S_IER] & UART_IER_THRI) && s[S_THRE_PENDING]) {
          iir = UART_IIR_THRI;
          s[S_THRE_PENDING] = 0; // reading IIR clears a THRE interrupt
        }
        return iir | (s[S_FIFO] ? UART_IIR_FIFO_ENABLED : 0);
      }
      case UART_LCR:
        return s[S_LCR];
      case UART_MCR:
        return s[S_MCR];
      case UART_LSR:
        return UART_LSR_THRE | UART_LSR_TEMT | (this.#inputLength() > 0 ? UART_LSR_DR : 0);
      case UART_MSR: {
        if (!this.#loop()) return MSR_CONNECTED;
        const m = s[S_MCR];
        return (m & UART_MCR_RTS ? UART_MSR_CTS : 0) | (m & UART_MCR_DTR ? UART_MSR_DSR : 0) |
          (m & UART_MCR_OUT1 ? UART_MSR_RI : 0) | (m & UART_MCR_OUT2 ? UART_MSR_DCD : 0);
      }
      case UART_SCR:
        return s[S_SCR];
    }
    return 0;
  }

  write(offset: number, data: Uint8Array): void {
    this.#lock();
    let raise = false;
    try {
      raise = this.#write(offset, data[0]);
    } finally {
      this.#unlock();
    }
    if (raise) this.opts.interrupt();
  }

  /** One register write (lock held); true when it raises the interrupt. */
  #write(offset: number, v: number): boolean {
    const s = this.#s;
    const dlab = (s[S_LCR] & UART_LCR_DLAB) !== 0;
    switch (offset) {
      case UART_TX: {
        if (dlab) {
          s[S_DLL] = v;
          return false;
        }
        let received = false;
        if (this.#loop()) {
          const wasEmpty = this.#inputLength() === 0;
          received = this.#pushInput(v) && wasEmpty && (s[S_IER] & UART_IER_RDI) !== 0;
        } else this.#transmit(v);
        // The byte left at once: the holding register is empty again.
        s[S_THRE_PENDING] = 1;
        return received || (s[S_IER] & UART_IER_THRI) !== 0;
      }
      case UART_IER: {
        if (dlab) {
          s[S_DLM] = v;
          return false;
        }
        const enabledThri = (v & UART_IER_THRI) && !(s[S_IER] & UART_IER_THRI);
        s[S_IER] = v & UART_IER_MASK;
        if (enabledThri) s[S_THRE_PENDING] = 1;
        return !!enabledThri || ((s[S_IER] & UART_IER_RDI) !== 0 && this.#inputLength() > 0);
      }
      case UART_FCR:
        s[S_FIFO] = v & UART_FCR_ENABLE_FIFO;
        if (v & UART_FCR_CLEAR_RCVR) s[S_RX_HEAD] = s[S_RX_TAIL];
        return false;
      case UART_LCR:
        s[S_LCR] = v;
        return false;
      case UART_MCR:
        s[S_MCR] = v;
        return false;
      case UART_SCR:
        s[S_SCR] = v;
        return false;
        // LSR and MSR are read-only.
    }
    return false;
  }

  /** Nothing in progress: no access holds the lock, and the host side has taken every transmitted byte. */
  quiescent(): boolean {
    return Atomics.load(this.#s, S_LOCK) === LOCK_FREE &&
      Atomics.load(this.#s, S_TX_TAIL) === Atomics.load(this.#s, S_TX_HEAD);
  }

  /**
   * The registers, the input the guest has not read and the output the host side has not taken, and the
   * counters. The state is shared with the vCPU Workers' instances: call this while no vCPU runs.
   */
  saveState(): DeviceState {
    this.#lock();
    try {
      const s = this.#s;
      const ring = (buf: Uint8Array, size: number, head: number, tail: number) => {
        const out = new Uint8Array((tail - head) | 0);
        for (let i = 0; i < out.length; i++) out[i] = buf[((head + i) >>> 0) % size];
        return out;
      };
      return {
        type: SERIAL_STATE_TYPE,
        version: SERIAL_STATE_VERSION,
        data: {
          ier: s[S_IER],
          lcr: s[S_LCR],
          mcr: s[S_MCR],
          scr: s[S_SCR],
          dll: s[S_DLL],
          dlm: s[S_DLM],
          fifo: s[S_FIFO] !== 0,
          threPending: s[S_THRE_PENDING] !== 0,
          input: ring(this.#rx, INPUT_BUFFER_LIMIT, s[S_RX_HEAD], s[S_RX_TAIL]),
          output: ring(this.#tx, OUTPUT_BUFFER_SIZE, s[S_TX_HEAD], s[S_TX_TAIL]),
          txBytes: s[S_TX_BYTES],
          rxBytes: s[S_RX_BYTES],
          droppedInput: s[S_DROPPED],
        },
      };
    } finally {
      this.#unlock();
    }
  }

  /**
   * Take a saved UART state (every field checked first; nothing changes when one is refused). Call it while no
   * vCPU runs: the vCPU Workers' instances share this state. The interrupt line is not raised: its level
   * is the interrupt controller's state, restored with it.
   */
  restoreState(state: DeviceState): void {
    const d = stateRecord(stateData(state, SERIAL_STATE_TYPE, SERIAL_STATE_VERSION), SERIAL_STATE_TYPE);
    const reg = (key: string, max = BYTE_MAX) => stateInteger(d[key], `${SERIAL_STATE_TYPE} ${key}`, 0, max);
    const counter = (key: string) => stateInteger(d[key], `${SERIAL_STATE_TYPE} ${key}`, INT32_MIN, INT32_MAX);
    const ier = reg("ier", UART_IER_MASK);
    const lcr = reg("lcr"), mcr = reg("mcr"), scr = reg("scr"), dll = reg("dll"), dlm = reg("dlm");
    const fifo = stateBoolean(d.fifo, `${SERIAL_STATE_TYPE} fifo`);
    const threPending = stateBoolean(d.threPending, `${SERIAL_STATE_TYPE} threPending`);
    const input = stateBytes(d.input, `${SERIAL_STATE_TYPE} input`);
    const output = stateBytes(d.output, `${SERIAL_STATE_TYPE} output`);
    if (input.length > INPUT_BUFFER_LIMIT) {
      throw new StateError(`${SERIAL_STATE_TYPE} input: ${input.length} bytes, the buffer holds ${INPUT_BUFFER_LIMIT}`);
    }
    if (output.length > OUTPUT_BUFFER_SIZE) {
      throw new StateError(`${SERIAL_STATE_TYPE} output: ${output.length} bytes, the ring holds ${OUTPUT_BUFFER_SIZE}`);
    }
    const txBytes = counter("txBytes"), rxBytes = counter("rxBytes"), dropped = counter("droppedInput");
    this.#lock();
    try {
      const s = this.#s;
      s[S_IER] = ier;
      s[S_LCR] = lcr;
      s[S_MCR] = mcr;
      s[S_SCR] = scr;
      s[S_DLL] = dll;
      s[S_DLM] = dlm;
      s[S_FIFO] = fifo ? UART_FCR_ENABLE_FIFO : 0;
      s[S_THRE_PENDING] = threPending ? 1 : 0;
      this.#rx.set(input, 0);
      s[S_RX_HEAD] = 0;
      s[S_RX_TAIL] = input.length;
      this.#tx.set(output, 0);
      s[S_TX_HEAD] = 0;
      s[S_TX_TAIL] = output.length;
      s[S_TX_BYTES] = txBytes;
      s[S_RX_BYTES] = rxBytes;
      s[S_DROPPED] = dropped;
      s[S_OUTPUT_WAKE] = 0;
    } finally {
      this.#unlock();
    }
  }
}

/** Kept for completeness of the register map (RLSI/MSI interrupts are never raised: lines never change). */
export const UNUSED_INTERRUPT_SOURCES = UART_IER_RLSI | UART_IER_MSI;
