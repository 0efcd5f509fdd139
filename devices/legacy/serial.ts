// 8250/16550A UART as Linux's 8250 driver sees it. Register numbers and bits from
// Linux include/uapi/linux/serial_reg.h.

import type { BusDevice } from "../../vmm/bus.ts";

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

export interface SerialOptions {
  /** Raise the UART's interrupt (an edge). */
  interrupt: () => void;
  /** Bytes the guest transmitted. */
  output: (bytes: Uint8Array) => void;
}

export class Serial implements BusDevice {
  #ier = 0;
  #lcr = 0x3; // 8N1
  #mcr = UART_MCR_OUT2;
  #scr = 0;
  #dll = DEFAULT_BAUD_DIVISOR;
  #dlm = 0;
  #fifo = false;
  #thrEmptyPending = false;
  readonly #input: number[] = [];
  /** Bytes transmitted and received, for stats. */
  txBytes = 0;
  rxBytes = 0;
  droppedInput = 0;

  constructor(readonly opts: SerialOptions) {}

  /** Bytes from the host for the guest to read. */
  enqueueInput(bytes: Uint8Array): void {
    const wasEmpty = this.#input.length === 0;
    for (const b of bytes) {
      if (this.#input.length >= INPUT_BUFFER_LIMIT) {
        this.droppedInput++;
        continue;
      }
      this.#input.push(b);
    }
    if (wasEmpty && this.#input.length > 0 && (this.#ier & UART_IER_RDI)) this.opts.interrupt();
  }

  get pendingInput(): number {
    return this.#input.length;
  }

  #loop(): boolean {
    return (this.#mcr & UART_MCR_LOOP) !== 0;
  }

  read(offset: number, data: Uint8Array): void {
    data.fill(0);
    const dlab = (this.#lcr & UART_LCR_DLAB) !== 0;
    switch (offset) {
      case UART_RX:
        if (dlab) data[0] = this.#dll;
        else {
          const b = this.#input.shift();
          data[0] = b ?? 0;
          if (b !== undefined) this.rxBytes++;
        }
        break;
      case UART_IER:
        data[0] = dlab ? this.#dlm : this.#ier;
        break;
      case UART_IIR: {
        let iir = UART_IIR_NO_INT;
        if ((this.#ier & UART_IER_RDI) && this.#input.length > 0) iir = UART_IIR_RDI;
        else if ((this.#ier & UART_IER_THRI) && this.#thrEmptyPending) {
          iir = UART_IIR_THRI;
          this.#thrEmptyPending = false; // reading IIR clears a THRE interrupt
        }
        data[0] = iir | (this.#fifo ? UART_IIR_FIFO_ENABLED : 0);
        break;
      }
      case UART_LCR:
        data[0] = this.#lcr;
        break;
      case UART_MCR:
        data[0] = this.#mcr;
        break;
      case UART_LSR:
        data[0] = UART_LSR_THRE | UART_LSR_TEMT | (this.#input.length > 0 ? UART_LSR_DR : 0);
        break;
      case UART_MSR:
        if (this.#loop()) {
          const m = this.#mcr;
          data[0] = (m & UART_MCR_RTS ? UART_MSR_CTS : 0) | (m & UART_MCR_DTR ? UART_MSR_DSR : 0) |
            (m & UART_MCR_OUT1 ? UART_MSR_RI : 0) | (m & UART_MCR_OUT2 ? UART_MSR_DCD : 0);
        } else data[0] = MSR_CONNECTED;
        break;
      case UART_SCR:
        data[0] = this.#scr;
        break;
    }
  }

  write(offset: number, data: Uint8Array): void {
    const v = data[0];
    const dlab = (this.#lcr & UART_LCR_DLAB) !== 0;
    switch (offset) {
      case UART_TX:
        if (dlab) {
          this.#dll = v;
          break;
        }
        if (this.#loop()) this.enqueueInput(data.subarray(0, 1));
        else {
          this.txBytes++;
          this.opts.output(data.slice(0, 1));
        }
        // The byte left at once: the holding register is empty again.
        this.#thrEmptyPending = true;
        if (this.#ier & UART_IER_THRI) this.opts.interrupt();
        break;
      case UART_IER: {
        if (dlab) {
          this.#dlm = v;
          break;
        }
        const enabledThri = (v & UART_IER_THRI) && !(this.#ier & UART_IER_THRI);
        this.#ier = v & UART_IER_MASK;
        if (enabledThri) this.#thrEmptyPending = true;
        if (
          enabledThri || ((this.#ier & UART_IER_RDI) && this.#input.length > 0)
        ) this.opts.interrupt();
        break;
      }
      case UART_FCR:
        this.#fifo = (v & UART_FCR_ENABLE_FIFO) !== 0;
        if (v & UART_FCR_CLEAR_RCVR) this.#input.length = 0;
        break;
      case UART_LCR:
        this.#lcr = v;
        break;
      case UART_MCR:
        this.#mcr = v;
        break;
      case UART_SCR:
        this.#scr = v;
        break;
        // LSR and MSR are read-only.
    }
  }
}

/** Kept for completeness of the register map (RLSI/MSI interrupts are never raised: lines never change). */
export const UNUSED_INTERRUPT_SOURCES = UART_IER_RLSI | UART_IER_MSI;
