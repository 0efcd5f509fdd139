// Legacy devices as a guest driver sees them: register sequences taken from what
// Linux's drivers do (8250 autoconfig and THRE handling, CMOS reads, i8042 reset,
// ACPI sleep/reset registers, pvpanic), and the port bus that routes them.

import assert from "node:assert/strict";
import { ACPI_SLP_EN, ACPI_SLP_TYP_SHIFT, AcpiPm } from "./acpi_pm.ts";
import { Cmos } from "./cmos.ts";
import { I8042 } from "./i8042.ts";
import { PvPanic } from "./pvpanic.ts";
import { Serial } from "./serial.ts";
import { Bus } from "../../core/bus.ts";
import {
  ACPI_RESET_PORT,
  ACPI_RESET_VALUE,
  ACPI_SLEEP_CONTROL_PORT,
  ACPI_SLEEP_TYPE_S5,
  I8042_COMMAND_PORT,
  I8042_DATA_PORT,
} from "../../vmm/arch/layout.ts";

const rd = (d: { read(o: number, b: Uint8Array): void }, off: number) => {
  const b = new Uint8Array(1);
  d.read(off, b);
  return b[0];
};
const wr = (d: { write(o: number, b: Uint8Array): void }, off: number, v: number) => d.write(off, Uint8Array.of(v));

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

Deno.test("8250 shared by a vCPU thread: a vCPU terminated inside the UART's lock does not block the final drain", async () => {
  const out: number[] = [];
  const host = new Serial({ interrupt: () => {}, output: (b) => out.push(...b) });
  const worker = new Worker(new URL("../../test/support/uart_writer_worker.ts", import.meta.url), { type: "module" });
  try {
    await new Promise<void>((resolve, reject) => {
      worker.onmessage = (e) => e.data === "holding" && resolve();
      worker.onerror = (e) => reject(new Error(e.message));
      worker.postMessage({ state: host.state, bytes: Uint8Array.of(0x58), hold: new SharedArrayBuffer(4) });
    });
  } finally {
    worker.terminate();
  }
  // What Machine does after terminating a vCPU that did not stop: without this the drain would wait forever.
  host.releaseLockOfEndedVcpus();
  host.drainOutput();
  assert.deepEqual(out, [0x58]);
});

Deno.test("CMOS RTC: BCD time of the given clock, 24-hour mode, never update-in-progress", () => {
  const c = new Cmos(() => new Date(Date.UTC(2026, 10, 25, 21, 7, 59)));
  const reg = (i: number) => {
    wr(c, 0, i | 0x80); // NMI-disable bit is ignored in the index
    return rd(c, 1);
  };
  assert.equal(reg(0x00), 0x59);
  assert.equal(reg(0x02), 0x07);
  assert.equal(reg(0x04), 0x21);
  assert.equal(reg(0x07), 0x25);
  assert.equal(reg(0x08), 0x11);
  assert.equal(reg(0x09), 0x26);
  assert.equal(reg(0x32), 0x20);
  assert.equal(reg(0x0a) & 0x80, 0, "UIP clear");
  assert.equal(reg(0x0b) & 0x06, 0x02, "24h, BCD");
  assert.equal(reg(0x0d) & 0x80, 0x80, "valid RAM and time");
  wr(c, 0, 0x40);
  wr(c, 1, 0x5a);
  assert.equal(reg(0x40), 0x5a, "CMOS RAM");
});

Deno.test("i8042: self-test answers 0x55, command byte round-trips, 0xFE resets", () => {
  let resets = 0;
  const k = new I8042({ dataPort: I8042_DATA_PORT, commandPort: I8042_COMMAND_PORT, onReset: () => resets++ });
  assert.equal(k.portSpan, 5, "ports 0x60..0x64");
  wr(k, 4, 0xaa);
  assert.equal(rd(k, 4) & 1, 1, "output buffer full");
  assert.equal(rd(k, 0), 0x55);
  assert.equal(rd(k, 4) & 1, 0);
  wr(k, 4, 0x60);
  wr(k, 0, 0x47);
  wr(k, 4, 0x20);
  assert.equal(rd(k, 0), 0x47);
  assert.equal(resets, 0);
  wr(k, 4, 0xfe);
  assert.equal(resets, 1);
  wr(k, 4, 0xd1); // write output port with the reset line low
  wr(k, 0, 0xfe);
  assert.equal(resets, 2);
});

Deno.test("ACPI PM: S5 with SLP_EN powers off, other sleep types do not, the reset register resets", () => {
  const events: string[] = [];
  const pm = new AcpiPm(
    {
      sleepControlPort: ACPI_SLEEP_CONTROL_PORT,
      resetPort: ACPI_RESET_PORT,
      resetValue: ACPI_RESET_VALUE,
      s5SleepType: ACPI_SLEEP_TYPE_S5,
    },
    { powerOff: () => events.push("off"), reset: () => events.push("reset"), log: () => {} },
  );
  assert.equal(pm.portSpan, ACPI_RESET_PORT - ACPI_SLEEP_CONTROL_PORT + 1);
  wr(pm, 0, ACPI_SLEEP_TYPE_S5 << ACPI_SLP_TYP_SHIFT); // no SLP_EN: nothing
  wr(pm, 0, (3 << ACPI_SLP_TYP_SHIFT) | ACPI_SLP_EN); // S3: not offered
  assert.deepEqual(events, []);
  wr(pm, 0, (ACPI_SLEEP_TYPE_S5 << ACPI_SLP_TYP_SHIFT) | ACPI_SLP_EN);
  assert.deepEqual(events, ["off"]);
  wr(pm, ACPI_RESET_PORT - ACPI_SLEEP_CONTROL_PORT, 0x7); // wrong value
  wr(pm, ACPI_RESET_PORT - ACPI_SLEEP_CONTROL_PORT, ACPI_RESET_VALUE);
  assert.deepEqual(events, ["off", "reset"]);
});

Deno.test("pvpanic: advertises its events, a PANICKED write reports the panic", () => {
  let panics = 0;
  const p = new PvPanic(() => panics++, () => {});
  assert.equal(rd(p, 0), 0x3);
  wr(p, 0, 0x2);
  assert.equal(panics, 0);
  wr(p, 0, 0x1);
  assert.equal(panics, 1);
});

Deno.test("port bus: routes by range, refuses overlaps, answers all-ones where nothing lives", () => {
  const bus = new Bus("test");
  const seen: [number, number][] = [];
  bus.add(0x3f8, 8, { read: (o, d) => d.fill(o), write: (o, d) => seen.push([o, d[0]]) }, "COM1");
  bus.add(0x70, 2, { read: (_o, d) => d.fill(9), write: () => {} }, "cmos");
  assert.throws(() => bus.add(0x3fc, 8, { read: () => {}, write: () => {} }, "clash"), /overlaps COM1/);
  const b = new Uint8Array(1);
  assert.equal(bus.read(0x3fd, b), true);
  assert.equal(b[0], 5);
  bus.write(0x3f8, Uint8Array.of(0x41));
  assert.deepEqual(seen, [[0, 0x41]]);
  assert.equal(bus.read(0x71, b), true);
  assert.equal(b[0], 9);
  assert.equal(bus.read(0x400, b), false);
  assert.equal(b[0], 0xff);
  assert.equal(bus.unhandled, 1);
});
