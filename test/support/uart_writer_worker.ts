/// <reference lib="deno.worker" />
// A vCPU's side of a shared UART, for devices/legacy/serial_test.ts: writes the bytes it is given to
// the transmit register as a guest's console driver does (THR, then an LSR poll), from its own
// thread, and says when it is done. Given `hold`, its first output wake-up (which the UART makes with
// its lock held) does not return: it says "holding" and waits on `hold` as a vCPU stopped there would, until
// the test, having terminated it, wakes it so that its thread can end.

import { Serial } from "../../devices/legacy/serial.ts";

/** 8250 registers (Linux include/uapi/linux/serial_reg.h). */
const UART_TX = 0;
const UART_LSR = 5;

self.onmessage = (e: MessageEvent<{ state: SharedArrayBuffer; bytes: Uint8Array; hold?: SharedArrayBuffer }>) => {
  const hold = e.data.hold;
  const serial = new Serial({
    interrupt: () => {},
    outputReady: () => {
      if (!hold) return self.postMessage("ready");
      self.postMessage("holding");
      Atomics.wait(new Int32Array(hold), 0, 0);
    },
    state: e.data.state,
  });
  const lsr = new Uint8Array(1);
  for (const b of e.data.bytes) {
    serial.write(UART_TX, Uint8Array.of(b));
    serial.read(UART_LSR, lsr);
  }
  self.postMessage(`done ${serial.txBytes}`);
};
