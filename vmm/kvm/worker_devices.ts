// Devices a vCPU Worker serves itself. The device manager describes each one (kind, address range,
// the state it shares with the main thread's side); a vCPU Worker builds one dispatch table from the
// list and answers those accesses on its own thread, without waiting for the main thread.

import { eventfdWrite } from "../../ffi/libc.ts";
import { Serial } from "../../devices/legacy/serial.ts";
import { type VirtioInterruptCells, virtioInterruptRegisters } from "../../devices/virtio/mmio.ts";

/** Port I/O addresses are 16 bits: the port table has one entry per port. */
const PORT_COUNT = 0x10000;

/** One device a vCPU Worker serves: plain data, sent to the Worker in its start message. */
export type WorkerDevice =
  /** A UART's registers over the state its main-thread Serial shares; its interrupt is an irqfd. */
  | { kind: "uart"; space: "pio"; base: number; size: number; state: SharedArrayBuffer; irqFd: number }
  /** The InterruptStatus and InterruptACK registers of every virtio-mmio transport in `cells`. */
  | { kind: "virtio-mmio-interrupts"; space: "mmio"; base: number; size: number; cells: VirtioInterruptCells };

/**
 * Serves one access if it can: `addr` is the port or guest-physical address, the access's `size`
 * bytes are at byte `at` of the vCPU's struct kvm_run. False hands the access to the main thread.
 * An MMIO device's function may see addresses outside its range and answers false for them.
 */
export type WorkerAccess = (addr: number, size: number, isWrite: boolean, at: number) => boolean;

/** What the Worker gives its devices. */
export interface WorkerDeviceContext {
  /** The vCPU's struct kvm_run, where each access's data is. */
  run: DataView;
  runBytes: Uint8Array;
  /** Ask the main thread to take what a device has for it (a UART's output). */
  wake: () => void;
}

/** The dispatch table a vCPU Worker answers its port and MMIO exits from. */
export interface WorkerDeviceTable {
  pio: WorkerAccess;
  mmio: WorkerAccess;
}

function serveUart(d: Extract<WorkerDevice, { kind: "uart" }>, ctx: WorkerDeviceContext): WorkerAccess {
  const serial = new Serial({ interrupt: () => eventfdWrite(d.irqFd), outputReady: ctx.wake, state: d.state });
  const { base } = d;
  const bytes = ctx.runBytes;
  return (port, size, isWrite, at) => {
    const data = bytes.subarray(at, at + size);
    if (isWrite) serial.write(port - base, data);
    else serial.read(port - base, data);
    return true;
  };
}

function serve(d: WorkerDevice, ctx: WorkerDeviceContext): WorkerAccess {
  switch (d.kind) {
    case "uart":
      return serveUart(d, ctx);
    case "virtio-mmio-interrupts":
      return virtioInterruptRegisters(d.cells, ctx.run) ?? (() => false);
  }
}

const nothing: WorkerAccess = () => false;

/**
 * Build a Worker's table: ports are looked up in a table with one entry per port; MMIO ranges are
 * few (usually one), so a single range is served by its device directly and several are scanned.
 */
export function workerDeviceTable(devices: readonly WorkerDevice[], ctx: WorkerDeviceContext): WorkerDeviceTable {
  const portHandlers: WorkerAccess[] = [];
  const portIndex = new Int16Array(PORT_COUNT).fill(-1);
  const mmio: { base: number; end: number; serve: WorkerAccess }[] = [];
  for (const d of devices) {
    const handler = serve(d, ctx);
    if (d.space === "pio") {
      if (d.base < 0 || d.base + d.size > PORT_COUNT) throw new RangeError(`${d.kind}: ports outside 0..0xffff`);
      const i = portHandlers.push(handler) - 1;
      for (let p = d.base; p < d.base + d.size; p++) {
        if (portIndex[p] >= 0) throw new RangeError(`${d.kind}: port 0x${p.toString(16)} is served twice`);
        portIndex[p] = i;
      }
    } else {
      mmio.push({ base: d.base, end: d.base + d.size, serve: handler });
    }
  }
  const pio: WorkerAccess = portHandlers.length === 0 ? nothing : (port, size, isWrite, at) => {
    const i = portIndex[port];
    return i >= 0 && portHandlers[i](port, size, isWrite, at);
  };
  let mmioAccess: WorkerAccess = nothing;
  if (mmio.length === 1) mmioAccess = mmio[0].serve;
  else if (mmio.length > 1) {
    mmioAccess = (addr, size, isWrite, at) => {
      for (const r of mmio) if (addr >= r.base && addr < r.end) return r.serve(addr, size, isWrite, at);
      return false;
    };
  }
  return { pio, mmio: mmioAccess };
}
