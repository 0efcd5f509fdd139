// The 8250 UART as Linux's 8250 driver sees it (autoconfig probes, THRE handling, input and loopback),
// shared between the host side and vCPU Workers, and its saved state: a round trip through the snapshot
// encoding into a fresh UART that the guest goes on using, and refusal of malformed records.

import assert from "node:assert/strict";
import { Serial, SERIAL_STATE_TYPE, SERIAL_STATE_VERSION } from "./serial.ts";
import { StateError } from "../../core/state.ts";
import { rd, roundTrip, withData, wr } from "../../test/support/port_io.ts";

function uart() {
  const out: number[] = [];
  let irqs = 0;
  const s = new Serial({ interrupt: () => irqs++, output: (b) => out.push(...b) });
  return { s, out, irqs: () => irqs };
}

Deno.test("8250: Linux's autoconfig probes (scratch, loopback MSR, 16550A FIFO) see a 16550A", () => {
  const { s } = uart();
  // Scratch register holds what is written (serial8250 "simple" probe).
  wr(s, 7, 0xa5);
  assert.equal(rd(s, 7), 0xa5);
  // Loopback test: MCR = LOOP | OUT2 | RTS must show DCD | CTS in MSR's high nibble.
  wr(s, 4, 0x10 | 0x08 | 0x02);
  assert.equal(rd(s, 6) & 0xf0, 0x90);
  wr(s, 4, 0x08);
  // With FIFOs enabled, IIR's top bits read 0b11 (16550A).
  wr(s, 2, 0x01);
  assert.equal(rd(s, 2) & 0xc0, 0xc0);
  // Divisor latch is separate from IER/data when DLAB is set.
  wr(s, 3, 0x80);
  wr(s, 0, 0x01);
  wr(s, 1, 0x00);
  assert.equal(rd(s, 0), 0x01);
  wr(s, 3, 0x03);
  assert.equal(rd(s, 3), 0x03);
  assert.equal(rd(s, 1), 0);
});

Deno.test("8250: transmitted bytes reach the sink; THRE interrupt is raised and cleared by reading IIR", () => {
  const { s, out, irqs } = uart();
  for (const c of new TextEncoder().encode("hi\n")) wr(s, 0, c);
  assert.equal(new TextDecoder().decode(Uint8Array.from(out)), "hi\n");
  assert.equal(irqs(), 0, "no interrupt while IER is 0");
  assert.equal(rd(s, 5) & 0x60, 0x60, "THRE and TEMT");
  wr(s, 1, 0x02); // enable THRI: the holding register is empty, so an interrupt is due at once
  assert.equal(irqs(), 1);
  assert.equal(rd(s, 2) & 0x0f, 0x02, "IIR says THRI");
  assert.equal(rd(s, 2) & 0x0f, 0x01, "reading IIR cleared it");
  wr(s, 0, 0x41);
  assert.equal(irqs(), 2);
});

Deno.test("8250: input is readable through RBR with LSR.DR, raises RDI, and loopback echoes", () => {
  const { s, irqs } = uart();
  wr(s, 1, 0x01); // RDI
  s.enqueueInput(new TextEncoder().encode("ab"));
  assert.equal(irqs(), 1);
  assert.equal(rd(s, 2) & 0x0f, 0x04, "IIR says RDI");
  assert.equal(rd(s, 5) & 0x01, 1);
  assert.equal(rd(s, 0), 0x61);
  assert.equal(rd(s, 0), 0x62);
  assert.equal(rd(s, 5) & 0x01, 0, "DR clear once drained");
  assert.equal(rd(s, 2) & 0x01, 1, "no interrupt pending");
  wr(s, 4, 0x10); // loopback: a transmitted byte comes back as input, not to the sink
  wr(s, 0, 0x7a);
  assert.equal(rd(s, 0), 0x7a);
  assert.equal(s.txBytes, 0);
});

Deno.test("8250 shared by a vCPU thread: its output reaches the host side in order, input reaches it", () => {
  const out: number[] = [];
  let ready = 0;
  const host = new Serial({ interrupt: () => {}, output: (b) => out.push(...b) });
  let vcpuIrqs = 0;
  const vcpu = new Serial({ interrupt: () => vcpuIrqs++, outputReady: () => ready++, state: host.state });
  for (const c of new TextEncoder().encode("boot\n")) wr(vcpu, 0, c);
  assert.equal(ready, 1, "one wake-up when the ring went from empty to not empty");
  assert.deepEqual(out, [], "nothing delivered until the host side drains");
  host.drainOutput();
  assert.equal(new TextDecoder().decode(Uint8Array.from(out)), "boot\n");
  assert.equal(host.txBytes, 5);
  wr(vcpu, 0, 0x21);
  assert.equal(ready, 2);
  // Registers are one state: what the vCPU side programs, the host side sees, and the reverse.
  wr(vcpu, 1, 0x01); // RDI
  assert.equal(rd(host, 1), 0x01);
  host.enqueueInput(Uint8Array.of(0x71));
  assert.equal(rd(vcpu, 5) & 0x01, 1, "LSR.DR on the vCPU side");
  assert.equal(rd(vcpu, 0), 0x71);
  assert.equal(host.pendingInput, 0);
  assert.throws(() => vcpu.drainOutput(), /vCPU side/);
  assert.throws(() => new Serial({ interrupt: () => {}, state: new SharedArrayBuffer(8) }), RangeError);
  assert.equal(vcpuIrqs, 0);
});

Deno.test("8250 shared by a vCPU thread: a writer finding the output ring full waits for room, nothing lost", async () => {
  const out: number[] = [];
  const host = new Serial({ interrupt: () => {}, output: (b) => out.push(...b) });
  // Four times the ring, from another thread, drained only when that thread says so.
  const bytes = Uint8Array.from({ length: 4 * (1 << 14) }, (_, i) => (i * 7) & 0xff);
  const worker = new Worker(new URL("../../test/support/uart_writer_worker.ts", import.meta.url), { type: "module" });
  try {
    await new Promise<void>((resolve, reject) => {
      worker.onmessage = (e) => {
        host.drainOutput();
        if (String(e.data).startsWith("done")) resolve();
      };
      worker.onerror = (e) => reject(new Error(e.message));
      worker.postMessage({ state: host.state, bytes });
    });
  } finally {
    worker.terminate();
  }
  assert.equal(out.length, bytes.length);
  assert.ok(out.every((b, i) => b === bytes[i]), "every byte, in order");
  assert.equal(host.txBytes, bytes.length);
});

Deno.test("8250 shared by a vCPU thread: a writer waiting on a full ring is let go when the host side closes", async () => {
  const host = new Serial({ interrupt: () => {}, output: () => {} });
  const bytes = new Uint8Array(2 * (1 << 14)).fill(0x41);
  const worker = new Worker(new URL("../../test/support/uart_writer_worker.ts", import.meta.url), { type: "module" });
  try {
    const done = await new Promise<string>((resolve, reject) => {
      let closed = false;
      worker.onmessage = (e) => {
        // Never drained: the first wake-up says the ring filled or has output; close instead of draining.
        if (!closed) {
          closed = true;
          host.closeHost();
        }
        if (String(e.data).startsWith("done")) resolve(String(e.data));
      };
      worker.onerror = (e) => reject(new Error(e.message));
      worker.postMessage({ state: host.state, bytes });
    });
    // The writer finished; what it queued before the close stayed queued, the rest was dropped.
    assert.ok(Number(done.split(" ")[1]) <= 1 << 14, done);
  } finally {
    worker.terminate();
  }
});

/**
 * A vCPU-side Worker that writes 0x58 and stops inside the UART's lock (its output wake-up does not return
 * until `wake()`). terminate() cannot interrupt a thread blocked in Atomics.wait, so a test wakes it once it
 * is done: the thread then sees its termination and ends, leaving no thread behind for later tests.
 */
async function vcpuHoldingTheLock(host: Serial): Promise<{ worker: Worker; wake: () => void }> {
  const worker = new Worker(new URL("../../test/support/uart_writer_worker.ts", import.meta.url), { type: "module" });
  const hold = new Int32Array(new SharedArrayBuffer(4));
  const wake = () => {
    Atomics.store(hold, 0, 1);
    Atomics.notify(hold, 0);
  };
  try {
    await new Promise<void>((resolve, reject) => {
      worker.onmessage = (e) => e.data === "holding" && resolve();
      worker.onerror = (e) => reject(new Error(e.message));
      worker.postMessage({ state: host.state, bytes: Uint8Array.of(0x58), hold: hold.buffer });
    });
  } catch (e) {
    worker.terminate();
    wake();
    throw e;
  }
  return { worker, wake };
}

Deno.test("8250 shared by a vCPU thread: a vCPU terminated inside the UART's lock does not block the final drain", async () => {
  const out: number[] = [];
  const host = new Serial({ interrupt: () => {}, output: (b) => out.push(...b) });
  const vcpu = await vcpuHoldingTheLock(host);
  vcpu.worker.terminate();
  try {
    // What Machine does after terminating a vCPU that did not stop: without this the drain would wait forever.
    host.releaseLockOfEndedVcpus();
    host.drainOutput();
    assert.deepEqual(out, [0x58]);
  } finally {
    vcpu.wake();
  }
});

// 8250 register offsets and bits (Linux include/uapi/linux/serial_reg.h).
const RBR = 0, DLL = 0, IER = 1, DLM = 1, IIR = 2, FCR = 2, LCR = 3, MCR = 4, LSR = 5, SCR = 7;
const IER_RDI = 0x01, IER_THRI = 0x02;
const IIR_NO_INT = 0x01, IIR_THRI = 0x02, IIR_RDI = 0x04, IIR_ID_MASK = 0x0f, IIR_FIFO = 0xc0;
const LCR_DLAB = 0x80, LCR_8N1 = 0x03, MCR_OUT2 = 0x08, MCR_DTR = 0x01, LSR_DR = 0x01;

/** A UART as a booted guest leaves it: 115200 baud, FIFOs on, RDI enabled, a scratch value, input half read. */
function programmed() {
  const { s, out, irqs } = uart();
  wr(s, LCR, LCR_DLAB | LCR_8N1);
  wr(s, DLL, 0x01);
  wr(s, DLM, 0x00);
  wr(s, LCR, LCR_8N1);
  wr(s, FCR, 0x01);
  wr(s, MCR, MCR_OUT2 | MCR_DTR);
  wr(s, SCR, 0x5c);
  wr(s, IER, IER_RDI);
  for (const c of new TextEncoder().encode("ok\n")) wr(s, 0, c);
  s.enqueueInput(new TextEncoder().encode("login"));
  assert.equal(rd(s, RBR), 0x6c, "the guest read the first input byte");
  return { s, out, irqs };
}

Deno.test("8250 state: registers, pending input and counters survive a round trip into a fresh UART", () => {
  const { s } = programmed();
  const saved = s.saveState();
  assert.equal(saved.type, SERIAL_STATE_TYPE);
  assert.equal(saved.version, SERIAL_STATE_VERSION);
  const { s: t, out, irqs } = uart();
  t.restoreState(roundTrip(saved));
  assert.deepEqual(t.saveState(), saved, "the restored UART saves the same state");
  // What the guest reads next is what it would have read from the old UART.
  assert.equal(rd(t, LCR), LCR_8N1);
  assert.equal(rd(t, MCR), MCR_OUT2 | MCR_DTR);
  assert.equal(rd(t, SCR), 0x5c);
  assert.equal(rd(t, IER), IER_RDI);
  assert.equal(rd(t, IIR), IIR_RDI | IIR_FIFO, "input pending, FIFOs on");
  assert.equal(rd(t, LSR) & LSR_DR, LSR_DR);
  wr(t, LCR, LCR_DLAB | LCR_8N1);
  assert.deepEqual([rd(t, DLL), rd(t, DLM)], [0x01, 0x00], "the divisor latch");
  wr(t, LCR, LCR_8N1);
  const rest = [0, 1, 2, 3].map(() => rd(t, RBR));
  assert.equal(new TextDecoder().decode(Uint8Array.from(rest)), "ogin");
  assert.equal(rd(t, LSR) & LSR_DR, 0);
  assert.equal(rd(t, IIR) & IIR_ID_MASK, IIR_NO_INT);
  assert.equal(t.rxBytes, 5);
  assert.equal(t.txBytes, 3);
  assert.equal(t.pendingInput, 0);
  // New input raises RDI as before; output goes to the new host side.
  t.enqueueInput(Uint8Array.of(0x0a));
  assert.equal(irqs(), 1);
  wr(t, 0, 0x21);
  assert.deepEqual(out, [0x21]);
  assert.equal(t.txBytes, 4);
  assert.equal(irqs(), 1, "THRI is off: the transmit raised nothing");
});

Deno.test("8250 state: a pending THRE interrupt and output not yet taken by the host side are kept", () => {
  const host = new Serial({ interrupt: () => {}, output: () => {} });
  const vcpu = new Serial({ interrupt: () => {}, outputReady: () => {}, state: host.state });
  wr(vcpu, IER, IER_THRI); // enabling THRI with an empty holding register makes a THRE interrupt pending
  for (const c of new TextEncoder().encode("panic")) wr(vcpu, 0, c);
  assert.equal(host.quiescent(), false, "output the host side has not taken");
  const saved = roundTrip(host.saveState());
  const out: number[] = [];
  const restored = new Serial({ interrupt: () => {}, output: (b) => out.push(...b) });
  restored.restoreState(saved);
  assert.equal(restored.quiescent(), false);
  assert.equal(rd(restored, IIR) & IIR_ID_MASK, IIR_THRI, "the THRE interrupt is still pending");
  assert.equal(rd(restored, IIR) & IIR_ID_MASK, IIR_NO_INT, "and reading IIR cleared it");
  restored.drainOutput();
  assert.equal(new TextDecoder().decode(Uint8Array.from(out)), "panic");
  assert.equal(restored.quiescent(), true);
  // A vCPU Worker's instance over the restored state sees the restored registers.
  const vcpu2 = new Serial({ interrupt: () => {}, outputReady: () => {}, state: restored.state });
  assert.equal(rd(vcpu2, IER), IER_THRI);
});

Deno.test("8250 state: quiescent is false while an access holds the UART's lock", async () => {
  const host = new Serial({ interrupt: () => {}, output: () => {} });
  assert.equal(host.quiescent(), true);
  const vcpu = await vcpuHoldingTheLock(host);
  try {
    assert.equal(host.quiescent(), false);
  } finally {
    vcpu.worker.terminate();
  }
  try {
    host.releaseLockOfEndedVcpus();
    host.drainOutput();
    assert.equal(host.quiescent(), true);
  } finally {
    vcpu.wake();
  }
});

Deno.test("8250 state: malformed records are refused and leave the UART as it was", () => {
  const { s } = programmed();
  const good = s.saveState();
  const bad: [string, ReturnType<Serial["saveState"]>][] = [
    ["another kind", { ...good, type: "cmos" }],
    ["another version", { ...good, version: SERIAL_STATE_VERSION + 1 }],
    ["data not a record", { ...good, data: [1, 2] }],
    ["IER with reserved bits", withData(good, { ier: 0x10 })],
    ["LCR above a byte", withData(good, { lcr: 0x100 })],
    ["fractional divisor", withData(good, { dll: 1.5 })],
    ["negative scratch", withData(good, { scr: -1 })],
    ["missing MCR", withData(good, { mcr: undefined })],
    ["fifo not a boolean", withData(good, { fifo: 1 })],
    ["input not bytes", withData(good, { input: "login" })],
    ["input beyond the buffer", withData(good, { input: new Uint8Array((1 << 16) + 1) })],
    ["output beyond the ring", withData(good, { output: new Uint8Array((1 << 14) + 1) })],
    ["counter beyond an Int32", withData(good, { txBytes: 2 ** 31 })],
  ];
  const { s: t } = uart();
  wr(t, SCR, 0x11);
  const before = t.saveState();
  for (const [what, state] of bad) {
    assert.throws(() => t.restoreState(roundTrip(state)), StateError, what);
    assert.deepEqual(t.saveState(), before, `${what}: nothing changed`);
  }
  t.restoreState(good);
  assert.equal(rd(t, SCR), 0x5c);
});
