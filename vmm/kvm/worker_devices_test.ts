// The table a vCPU Worker answers its own accesses from, built from the device manager's descriptors:
// a UART over the main thread's shared state and the virtio InterruptStatus/ACK registers, everything
// else handed to the main thread.

import assert from "node:assert/strict";
import { closeFd, eventfd, eventfdRead, POLLIN, pollSync } from "../../ffi/libc.ts";
import { Serial, UART_REGISTER_COUNT } from "../../devices/legacy/serial.ts";
import {
  VIRTIO_MMIO_INT_VRING,
  VIRTIO_MMIO_INTERRUPT_ACK,
  VIRTIO_MMIO_INTERRUPT_STATUS,
  VIRTIO_MMIO_STATUS,
} from "../../devices/virtio/mmio.ts";
import { type WorkerDevice, workerDeviceTable } from "./worker_devices.ts";

/** Linux serial_reg.h: the transmit register (offset 0), the interrupt enable register and its THRI bit. */
const UART_TX = 0;
const UART_IER = 1;
const UART_IER_THRI = 0x02;
const UART_LSR = 5;
const UART_LSR_THRE = 0x20;
const COM1 = 0x3f8;
const VIRTIO_BASE = 0xd000_0000;
const WINDOW = 0x1000;

Deno.test("worker device table: a UART and the virtio interrupt registers are served from shared state; the rest is not", () => {
  const out: number[] = [];
  const irqFd = eventfd();
  try {
    const host = new Serial({ interrupt: () => {}, output: (b) => out.push(...b) });
    const cells = new SharedArrayBuffer(2 * 4);
    const devices: WorkerDevice[] = [
      { kind: "uart", space: "pio", base: COM1, size: UART_REGISTER_COUNT, state: host.state, irqFd },
      {
        kind: "virtio-mmio-interrupts",
        space: "mmio",
        base: VIRTIO_BASE,
        size: 2 * WINDOW,
        cells: { cells, bases: [VIRTIO_BASE, VIRTIO_BASE + WINDOW], windowSize: WINDOW },
      },
    ];
    const runBytes = new Uint8Array(64);
    const run = new DataView(runBytes.buffer);
    let wakes = 0;
    const table = workerDeviceTable(devices, { run, runBytes, wake: () => wakes++ });

    // The UART: a transmitted byte reaches the host side's output once it drains; IER enables THRI and
    // the interrupt goes to the irqfd.
    runBytes[8] = UART_IER_THRI;
    assert.equal(table.pio(COM1 + UART_IER, 1, true, 8), true);
    assert.ok(pollSync([irqFd], POLLIN, 0)[0] & POLLIN, "the UART's interrupt through its irqfd");
    eventfdRead(irqFd);
    runBytes[8] = 0x41;
    assert.equal(table.pio(COM1 + UART_TX, 1, true, 8), true);
    assert.equal(wakes, 1, "the main thread is asked to take the output");
    host.drainOutput();
    assert.deepEqual(out, [0x41]);
    assert.equal(table.pio(COM1 + UART_LSR, 1, false, 16), true);
    assert.equal(runBytes[16] & UART_LSR_THRE, UART_LSR_THRE);
    assert.equal(table.pio(COM1 + UART_REGISTER_COUNT, 1, false, 16), false, "past the UART");
    assert.equal(table.pio(COM1 - 1, 1, false, 16), false);
    assert.equal(table.pio(0x80, 1, true, 16), false);

    // The virtio registers: InterruptStatus of transport 1 from its cell, ACK clears it; other registers
    // and addresses are the main thread's.
    Atomics.store(new Int32Array(cells), 1, VIRTIO_MMIO_INT_VRING);
    assert.equal(table.mmio(VIRTIO_BASE + WINDOW + VIRTIO_MMIO_INTERRUPT_STATUS, 4, false, 32), true);
    assert.equal(run.getUint32(32, true), VIRTIO_MMIO_INT_VRING);
    run.setUint32(32, VIRTIO_MMIO_INT_VRING, true);
    assert.equal(table.mmio(VIRTIO_BASE + WINDOW + VIRTIO_MMIO_INTERRUPT_ACK, 4, true, 32), true);
    assert.equal(Atomics.load(new Int32Array(cells), 1), 0);
    assert.equal(table.mmio(VIRTIO_BASE + VIRTIO_MMIO_STATUS, 4, false, 32), false);
    assert.equal(table.mmio(VIRTIO_BASE + 2 * WINDOW + VIRTIO_MMIO_INTERRUPT_STATUS, 4, false, 32), false);
  } finally {
    closeFd(irqFd);
  }
});

Deno.test("worker device table: no devices serve nothing; two devices on one port are refused", () => {
  const runBytes = new Uint8Array(64);
  const ctx = { run: new DataView(runBytes.buffer), runBytes, wake: () => {} };
  const empty = workerDeviceTable([], ctx);
  assert.equal(empty.pio(COM1, 1, false, 0), false);
  assert.equal(empty.mmio(VIRTIO_BASE, 4, false, 0), false);
  const state = new Serial({ interrupt: () => {}, output: () => {} }).state;
  const uart = (base: number): WorkerDevice => ({
    kind: "uart",
    space: "pio",
    base,
    size: UART_REGISTER_COUNT,
    state,
    irqFd: -1,
  });
  assert.throws(() => workerDeviceTable([uart(COM1), uart(COM1 + 4)], ctx), RangeError);
  assert.throws(() => workerDeviceTable([uart(0xfffc)], ctx), RangeError);
});
