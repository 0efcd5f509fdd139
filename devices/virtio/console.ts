// virtio-console (virtio 1.2 spec, section 5.3; Linux include/uapi/linux/virtio_console.h).
// Port 0 is the console (hvc0 in a Linux guest): its output goes to a callback, its input comes
// from sendInput(). With VIRTIO_CONSOLE_F_MULTIPORT the device also offers named ports (Linux
// /dev/vportNpM, the name in /sys/class/virtio-ports/*/name), opened with openPort(name) and
// announced through the control queues. Input waits in a bounded buffer while the guest has no
// receive buffers (or, for multiport ports, has not opened the port); output is delivered as it
// arrives. Guest input is hostile: a bad control message or chain costs one log line.

import {
  type ActivateContext,
  featuresField,
  queuesQuiescent,
  readConfigSpace,
  stateCounters,
  stateInteger,
  VIRTIO_COMMON_FEATURES,
  VIRTIO_ID_CONSOLE,
  type VirtioDevice,
} from "./device.ts";
import { ChainError, type Virtqueue } from "./queue.ts";
import { RateLimitedLog } from "../../core/log.ts";
import {
  type DeviceState,
  stateArray,
  stateBoolean,
  stateBytes,
  stateData,
  StateError,
  type Stateful,
  stateRecord,
  stateString,
  type StateValue,
} from "../../core/state.ts";
import { concatBytes } from "../../core/bytes.ts";

// ---- Feature bits (virtio_console.h) ----
/** VIRTIO_CONSOLE_F_SIZE: cols/rows in config are valid. */
export const VIRTIO_CONSOLE_F_SIZE = 1n << 0n;
/** VIRTIO_CONSOLE_F_MULTIPORT: max_nr_ports is valid and the control queues exist. */
export const VIRTIO_CONSOLE_F_MULTIPORT = 1n << 1n;
/** VIRTIO_CONSOLE_F_EMERG_WRITE: a write to emerg_wr outputs one character on port 0. */
export const VIRTIO_CONSOLE_F_EMERG_WRITE = 1n << 2n;

// ---- struct virtio_console_config (virtio_console.h): le16 cols, le16 rows, le32 max_nr_ports, le32 emerg_wr ----
export const CONSOLE_CFG_COLS = 0;
export const CONSOLE_CFG_ROWS = 2;
export const CONSOLE_CFG_MAX_NR_PORTS = 4;
export const CONSOLE_CFG_EMERG_WR = 8;
export const CONSOLE_CONFIG_SIZE = 12;

// ---- struct virtio_console_control (virtio_console.h): le32 id, le16 event, le16 value ----
export const CONSOLE_CTRL_SIZE = 8;
const CTRL_ID = 0;
const CTRL_EVENT = 4;
const CTRL_VALUE = 6;
/** Control events (virtio_console.h VIRTIO_CONSOLE_*). */
export const VIRTIO_CONSOLE_DEVICE_READY = 0;
export const VIRTIO_CONSOLE_PORT_ADD = 1;
export const VIRTIO_CONSOLE_PORT_REMOVE = 2;
export const VIRTIO_CONSOLE_PORT_READY = 3;
export const VIRTIO_CONSOLE_CONSOLE_PORT = 4;
export const VIRTIO_CONSOLE_RESIZE = 5;
export const VIRTIO_CONSOLE_PORT_OPEN = 6;
export const VIRTIO_CONSOLE_PORT_NAME = 7;

// ---- Queue numbering (spec 5.3.2): port 0 rx/tx are 0/1, control rx/tx are 2/3, port N rx/tx are 2N+2/2N+3 ----
export const CONSOLE_CONTROL_RXQ = 2;
export const CONSOLE_CONTROL_TXQ = 3;
/** Receive queue (device to driver) of port `id`. */
export function portRxQueue(id: number): number {
  return id === 0 ? 0 : 2 * id + 2;
}
/** Transmit queue (driver to device) of port `id`. */
export function portTxQueue(id: number): number {
  return id === 0 ? 1 : 2 * id + 3;
}

/** Queue size of every queue (crosvm's console uses 256). */
export const CONSOLE_QUEUE_SIZE = 256;
/** Input held per port while the guest cannot take it; beyond this new input is dropped and counted. */
export const DEFAULT_INPUT_LIMIT = 1 << 20;
/** A control message from the driver longer than this is malformed (the largest the device accepts is 8 bytes). */
const MAX_CONTROL_IN = 4096;
/** Largest port name (PORT_NAME payload) accepted from openPort. */
const MAX_PORT_NAME = 255;

export interface ConsoleOptions {
  /** Bytes the guest wrote to port 0 (the console). */
  output: (bytes: Uint8Array) => void;
  /** Offer VIRTIO_CONSOLE_F_SIZE with this size. */
  size?: { cols: number; rows: number };
  /** Named ports opened at construction (ids 1, 2, ...). */
  ports?: string[];
  /**
   * Ports the device offers, port 0 included. Default: 1 + ports.length. Give more to openPort()
   * names later (hot-added with PORT_ADD).
   */
  maxPorts?: number;
  /** Bytes of input buffered per port (default 1 MiB). */
  inputLimit?: number;
  /**
   * Offer VIRTIO_CONSOLE_F_MULTIPORT (default true, even for port 0 alone). With it the driver says
   * when it has opened a port (PORT_OPEN), so input typed before the guest is ready is kept until
   * then. Without it there is no such signal, and Linux's add_port fills the receive queue before it
   * marks the console connected: input sent in that window is discarded by the guest.
   */
  multiport?: boolean;
}

/** A named port, host side. */
export interface ConsolePort {
  readonly id: number;
  readonly name: string;
  /** Whether the guest has the port open (the driver sent PORT_OPEN 1). */
  readonly guestConnected: boolean;
  /** Send bytes to the guest (buffered, bounded, until the guest opens the port and gives buffers). */
  write(bytes: Uint8Array): void;
  /** Receive what the guest writes to the port. */
  onData(cb: (bytes: Uint8Array) => void): void;
}

class Port implements ConsolePort {
  guestConnected = false;
  /** The driver has seen PORT_ADD for this port (multiport). */
  added = false;
  pending: Uint8Array[] = [];
  pendingBytes = 0;
  listeners: ((bytes: Uint8Array) => void)[] = [];
  constructor(readonly dev: ConsoleDevice, readonly id: number, readonly name: string) {}
  write(bytes: Uint8Array): void {
    this.dev.portWrite(this, bytes);
  }
  onData(cb: (bytes: Uint8Array) => void): void {
    this.listeners.push(cb);
  }
}

const STAT_NAMES = [
  "bytesOut",
  "bytesIn",
  "inputDropped",
  "controlIn",
  "controlOut",
  "malformed",
] as const;
type StatName = typeof STAT_NAMES[number];

/** The kind and layout version of a virtio-console device's saved state. */
export const CONSOLE_STATE_TYPE = "virtio-console";
export const CONSOLE_STATE_VERSION = 1;

export class ConsoleDevice implements VirtioDevice, Stateful {
  readonly deviceType = VIRTIO_ID_CONSOLE;
  readonly name = "console";
  readonly queueMaxSizes: readonly number[];
  readonly features: bigint;
  readonly maxPorts: number;
  readonly #output: (bytes: Uint8Array) => void;
  readonly #inputLimit: number;
  readonly #ports: Port[] = [];
  #size: { cols: number; rows: number };
  #queues: (Virtqueue | undefined)[] = [];
  #interrupt: ActivateContext["interrupt"] | undefined;
  #multiport = false;
  /** The driver sent DEVICE_READY: ports may be announced. */
  #driverReady = false;
  #controlOut: Uint8Array[] = [];
  readonly #log = new RateLimitedLog("virtio-console");
  readonly #stats: Record<StatName, number> = Object.fromEntries(STAT_NAMES.map((n) => [n, 0])) as Record<
    StatName,
    number
  >;

  constructor(opts: ConsoleOptions) {
    this.#output = opts.output;
    this.#inputLimit = opts.inputLimit ?? DEFAULT_INPUT_LIMIT;
    const names = opts.ports ?? [];
    this.maxPorts = opts.maxPorts ?? 1 + names.length;
    if (!Number.isInteger(this.maxPorts) || this.maxPorts < 1 + names.length || this.maxPorts > 0x7fff) {
      throw new Error(`console: maxPorts ${this.maxPorts} must be an integer in ${1 + names.length}..32767`);
    }
    const multiport = opts.multiport ?? true;
    if (!multiport && this.maxPorts > 1) throw new Error("console: named ports need multiport");
    this.#size = opts.size ?? { cols: 0, rows: 0 };
    let f = VIRTIO_COMMON_FEATURES | VIRTIO_CONSOLE_F_EMERG_WRITE;
    if (opts.size) f |= VIRTIO_CONSOLE_F_SIZE;
    if (multiport) f |= VIRTIO_CONSOLE_F_MULTIPORT;
    this.features = f;
    const nq = multiport ? 2 * (this.maxPorts + 1) : 2;
    this.queueMaxSizes = Array.from({ length: nq }, () => CONSOLE_QUEUE_SIZE);
    this.#ports.push(new Port(this, 0, ""));
    for (const n of names) this.openPort(n);
  }

  /** Send bytes to the console (port 0). */
  sendInput(bytes: Uint8Array): void {
    this.portWrite(this.#ports[0], bytes);
  }

  /** The named port `name`, created (and hot-added if the driver is up) when new. */
  openPort(name: string): ConsolePort {
    const existing = this.#ports.find((p) => p.id !== 0 && p.name === name);
    if (existing) return existing;
    const nameBytes = new TextEncoder().encode(name);
    if (nameBytes.length === 0 || nameBytes.length > MAX_PORT_NAME || nameBytes.includes(0)) {
      throw new Error(`console: port name "${name}" must be 1..${MAX_PORT_NAME} bytes without NUL`);
    }
    if (this.#ports.length >= this.maxPorts || !(this.features & VIRTIO_CONSOLE_F_MULTIPORT)) {
      throw new Error(`console: no free port for "${name}" (maxPorts ${this.maxPorts})`);
    }
    const port = new Port(this, this.#ports.length, name);
    this.#ports.push(port);
    if (this.#multiport && this.#driverReady) this.#announce(port);
    return port;
  }

  /** Change the console size (config change; with MULTIPORT also a RESIZE message for port 0). */
  resize(cols: number, rows: number): void {
    this.#size = { cols: cols & 0xffff, rows: rows & 0xffff };
    if (!(this.features & VIRTIO_CONSOLE_F_SIZE)) return;
    if (this.#multiport && this.#driverReady) {
      const b = new Uint8Array(4); // struct { u16 rows; u16 cols; } after the header (Linux virtio_console.c)
      const v = new DataView(b.buffer);
      v.setUint16(0, this.#size.rows, true);
      v.setUint16(2, this.#size.cols, true);
      this.#sendControl(0, VIRTIO_CONSOLE_RESIZE, 0, b);
    } else {
      this.#interrupt?.signalConfigChange();
    }
  }

  // ---- VirtioDevice ----

  readConfig(offset: number, data: Uint8Array): void {
    const b = new Uint8Array(CONSOLE_CONFIG_SIZE);
    const v = new DataView(b.buffer);
    v.setUint16(CONSOLE_CFG_COLS, this.#size.cols, true);
    v.setUint16(CONSOLE_CFG_ROWS, this.#size.rows, true);
    v.setUint32(CONSOLE_CFG_MAX_NR_PORTS, this.maxPorts, true);
    readConfigSpace(b, offset, data);
  }

  writeConfig(offset: number, data: Uint8Array): void {
    // emerg_wr is the only writable field: one character for port 0 (spec 5.3.4).
    if (offset === CONSOLE_CFG_EMERG_WR && data.length >= 1 && data.length <= 4) {
      this.#stats.bytesOut++;
      this.#emit(this.#ports[0], Uint8Array.of(data[0]));
      return;
    }
    this.#log.log(`driver wrote ${data.length} bytes of read-only config at ${offset}; ignored`);
  }

  activate(ctx: ActivateContext): void {
    this.#queues = ctx.queues;
    this.#interrupt = ctx.interrupt;
    this.#multiport = (ctx.ackedFeatures & VIRTIO_CONSOLE_F_MULTIPORT) !== 0n;
    if (!ctx.restored) {
      this.#driverReady = false;
      this.#controlOut = [];
      for (const p of this.#ports) {
        p.added = false;
        // Without MULTIPORT port 0 exists and is open from the start (spec 5.3.6.1).
        p.guestConnected = !this.#multiport && p.id === 0;
      }
    }
    this.#flushAll();
  }

  reset(): void {
    this.#queues = [];
    this.#interrupt = undefined;
    this.#multiport = false;
    this.#driverReady = false;
    this.#controlOut = [];
    for (const p of this.#ports) {
      p.added = false;
      p.guestConnected = false;
    }
  }

  close(): void {
    this.reset();
  }

  stats(): Record<string, number> {
    return { ...this.#stats, ports: this.#ports.length };
  }

  queueNotify(index: number): void {
    if (!this.#queues[index]) return;
    if (index === CONSOLE_CONTROL_TXQ && this.#multiport) {
      this.#controlTx();
    } else if (index === CONSOLE_CONTROL_RXQ && this.#multiport) {
      this.#flushControl();
    } else {
      const id = index < 2 ? 0 : (index - 2) >> 1;
      const port = this.#ports[id];
      const isRx = index % 2 === 0;
      if (!port) {
        // A queue of a port that does not exist (yet): consume transmits so the guest is not stuck.
        if (!isRx) this.#drainUnknown(index);
        return;
      }
      if (isRx) this.#flushPort(port);
      else this.#transmit(port, index);
    }
  }

  // ---- Data path ----

  /** Queue input for a port (bounded), then move what the guest can take. */
  portWrite(port: Port, bytes: Uint8Array): void {
    if (bytes.length === 0) return;
    const room = this.#inputLimit - port.pendingBytes;
    if (room < bytes.length) {
      const dropped = bytes.length - Math.max(room, 0);
      this.#stats.inputDropped += dropped;
      this.#log.log(`port ${port.id}: input buffer full (${this.#inputLimit} bytes); dropped ${dropped} bytes`);
      bytes = bytes.subarray(0, Math.max(room, 0));
      if (bytes.length === 0) return;
    }
    port.pending.push(bytes.slice());
    port.pendingBytes += bytes.length;
    this.#flushPort(port);
  }

  #flushAll(): void {
    for (const p of this.#ports) this.#flushPort(p);
    this.#flushControl();
  }

  /** Move a port's pending input into its receive queue. */
  #flushPort(port: Port): void {
    if (!port.guestConnected || port.pendingBytes === 0) return;
    const qi = portRxQueue(port.id);
    const q = this.#queues[qi];
    if (!q) return;
    let used = false;
    while (port.pendingBytes > 0) {
      const chain = q.pop();
      if (!chain) break;
      const w = chain.writer();
      try {
        while (w.remaining > 0 && port.pending.length > 0) {
          const head = port.pending[0];
          const n = Math.min(head.length, w.remaining);
          w.write(head.subarray(0, n));
          port.pendingBytes -= n;
          this.#stats.bytesIn += n;
          if (n === head.length) port.pending.shift();
          else port.pending[0] = head.subarray(n);
        }
      } catch (e) {
        if (!(e instanceof ChainError)) throw e;
        this.#stats.malformed++;
        this.#log.log(`port ${port.id}: receive buffer at head ${chain.head}: ${e.message}`);
      }
      if (w.bytesWritten === 0 && chain.writableLength === 0) {
        this.#stats.malformed++;
        this.#log.log(`port ${port.id}: receive buffer at head ${chain.head} has no writable bytes`);
      }
      q.addUsed(chain.head, w.bytesWritten);
      used = true;
    }
    if (used && q.needsInterrupt()) this.#interrupt?.signalUsedQueue(qi);
  }

  /** Take the guest's output on a port. */
  #transmit(port: Port, qi: number): void {
    const q = this.#queues[qi]!;
    let used = false;
    for (;;) {
      const chain = q.pop();
      if (!chain) break;
      if (chain.readableLength > 0) {
        const data = chain.reader().read(chain.readableLength);
        this.#stats.bytesOut += data.length;
        this.#emit(port, data);
      }
      q.addUsed(chain.head, 0);
      used = true;
    }
    if (used && q.needsInterrupt()) this.#interrupt?.signalUsedQueue(qi);
  }

  #drainUnknown(qi: number): void {
    const q = this.#queues[qi]!;
    let n = 0;
    while (q.pop()) n++;
    if (n === 0) return;
    this.#stats.malformed += n;
    this.#log.log(`queue ${qi}: ${n} buffers for a port that does not exist; dropped`);
  }

  #emit(port: Port, data: Uint8Array): void {
    if (port.id === 0) {
      this.#output(data);
      return;
    }
    for (const cb of port.listeners) cb(data);
  }

  // ---- Control queues (multiport) ----

  #sendControl(id: number, event: number, value: number, extra?: Uint8Array): void {
    const b = new Uint8Array(CONSOLE_CTRL_SIZE + (extra?.length ?? 0));
    const v = new DataView(b.buffer);
    v.setUint32(CTRL_ID, id, true);
    v.setUint16(CTRL_EVENT, event, true);
    v.setUint16(CTRL_VALUE, value, true);
    if (extra) b.set(extra, CONSOLE_CTRL_SIZE);
    this.#controlOut.push(b);
    this.#flushControl();
  }

  /** One control message per receive buffer (Linux reads each buffer as one message). */
  #flushControl(): void {
    const q = this.#queues[CONSOLE_CONTROL_RXQ];
    if (!q || !this.#multiport) return;
    let used = false;
    while (this.#controlOut.length > 0) {
      const chain = q.pop();
      if (!chain) break;
      const msg = this.#controlOut[0];
      const w = chain.writer();
      if (w.remaining < msg.length) {
        this.#stats.malformed++;
        this.#log.log(`control receive buffer of ${w.remaining} bytes is too small for ${msg.length}; skipped`);
        q.addUsed(chain.head, 0);
        used = true;
        continue;
      }
      w.write(msg);
      this.#controlOut.shift();
      this.#stats.controlOut++;
      q.addUsed(chain.head, msg.length);
      used = true;
    }
    if (used && q.needsInterrupt()) this.#interrupt?.signalUsedQueue(CONSOLE_CONTROL_RXQ);
  }

  #controlTx(): void {
    const q = this.#queues[CONSOLE_CONTROL_TXQ]!;
    let used = false;
    for (;;) {
      const chain = q.pop();
      if (!chain) break;
      const len = chain.readableLength;
      if (len < CONSOLE_CTRL_SIZE || len > MAX_CONTROL_IN) {
        this.#stats.malformed++;
        this.#log.log(`control message of ${len} bytes at head ${chain.head}; ignored`);
      } else {
        const v = new DataView(chain.reader().read(CONSOLE_CTRL_SIZE).buffer);
        this.#stats.controlIn++;
        this.#control(v.getUint32(CTRL_ID, true), v.getUint16(CTRL_EVENT, true), v.getUint16(CTRL_VALUE, true));
      }
      q.addUsed(chain.head, 0);
      used = true;
    }
    if (used && q.needsInterrupt()) this.#interrupt?.signalUsedQueue(CONSOLE_CONTROL_TXQ);
  }

  /** A control message from the driver (Linux virtio_console.c __send_control_msg senders). */
  #control(id: number, event: number, value: number): void {
    if (event === VIRTIO_CONSOLE_DEVICE_READY) {
      if (value !== 1) {
        this.#log.log(`driver reported DEVICE_READY failure (${value})`);
        return;
      }
      this.#driverReady = true;
      for (const p of this.#ports) this.#announce(p);
      return;
    }
    const port = this.#ports[id];
    if (!port || !port.added) {
      this.#stats.malformed++;
      this.#log.log(`control event ${event} for unknown port ${id}; ignored`);
      return;
    }
    switch (event) {
      case VIRTIO_CONSOLE_PORT_READY:
        if (value !== 1) {
          this.#log.log(`driver could not add port ${id} (${port.name || "console"})`);
          return;
        }
        if (port.id === 0) this.#sendControl(0, VIRTIO_CONSOLE_CONSOLE_PORT, 1);
        else this.#sendControl(port.id, VIRTIO_CONSOLE_PORT_NAME, 0, new TextEncoder().encode(port.name));
        // The host side is always connected (ports are served by this process).
        this.#sendControl(port.id, VIRTIO_CONSOLE_PORT_OPEN, 1);
        return;
      case VIRTIO_CONSOLE_PORT_OPEN:
        port.guestConnected = value === 1;
        this.#flushPort(port);
        return;
      default:
        this.#stats.malformed++;
        this.#log.log(`unexpected control event ${event} (value ${value}) for port ${id}; ignored`);
    }
  }

  #announce(port: Port): void {
    if (port.added) return;
    port.added = true;
    this.#sendControl(port.id, VIRTIO_CONSOLE_PORT_ADD, 0);
  }

  // ---- Device state (core/state.ts) ----

  /** False while a buffer is taken from a queue and not yet returned. */
  quiescent(): boolean {
    return queuesQuiescent(this.#queues);
  }

  /**
   * The console size, each port (name, whether the driver added and opened it, input waiting for the
   * guest), the control messages not yet delivered and the counters. Host listeners are not state.
   */
  saveState(): DeviceState {
    return {
      type: CONSOLE_STATE_TYPE,
      version: CONSOLE_STATE_VERSION,
      data: {
        features: featuresField(this.features),
        maxPorts: this.maxPorts,
        cols: this.#size.cols,
        rows: this.#size.rows,
        driverReady: this.#driverReady,
        ports: this.#ports.map((p) => ({
          name: p.name,
          added: p.added,
          guestConnected: p.guestConnected,
          pending: concatBytes(p.pending),
        })),
        controlOut: this.#controlOut.map((m) => m.slice()),
        stats: { ...this.#stats },
      },
    };
  }

  /**
   * Take a saved state into a device not yet activated. Ports opened after construction are created
   * again by name; host code finds them with openPort(name).
   */
  restoreState(state: DeviceState): void {
    const d = stateRecord(stateData(state, CONSOLE_STATE_TYPE, CONSOLE_STATE_VERSION), "virtio-console state");
    const what = "virtio-console";
    if (this.#queues.length > 0) throw new StateError(`${what}: restore into a device a driver has activated`);
    const features = stateString(d.features, `${what} features`);
    if (features !== featuresField(this.features)) {
      throw new StateError(`${what}: saved features ${features}, this device offers ${featuresField(this.features)}`);
    }
    const maxPorts = stateInteger(d.maxPorts, `${what} maxPorts`, 1, 0x7fff);
    if (maxPorts !== this.maxPorts) {
      throw new StateError(`${what}: saved ${maxPorts} ports, this device has ${this.maxPorts}`);
    }
    const cols = stateInteger(d.cols, `${what} cols`, 0, 0xffff);
    const rows = stateInteger(d.rows, `${what} rows`, 0, 0xffff);
    const driverReady = stateBoolean(d.driverReady, `${what} driverReady`);
    const saved = stateArray(d.ports, `${what} ports`).map((v, id) => {
      const p = stateRecord(v, `${what} port ${id}`);
      const pending = stateBytes(p.pending, `${what} port ${id} pending`);
      if (pending.length > this.#inputLimit) {
        throw new StateError(
          `${what} port ${id}: ${pending.length} bytes of input, beyond the ${this.#inputLimit}-byte limit`,
        );
      }
      return {
        name: stateString(p.name, `${what} port ${id} name`),
        added: stateBoolean(p.added, `${what} port ${id} added`),
        guestConnected: stateBoolean(p.guestConnected, `${what} port ${id} guestConnected`),
        pending,
      };
    });
    if (saved.length < 1 || saved.length > this.maxPorts || saved[0].name !== "") {
      throw new StateError(`${what}: ${saved.length} ports saved (port 0 the console, at most ${this.maxPorts})`);
    }
    if (saved.length < this.#ports.length) {
      throw new StateError(`${what}: ${saved.length} ports saved, this device was built with ${this.#ports.length}`);
    }
    saved.forEach((p, id) => {
      if (id < this.#ports.length && this.#ports[id].name !== p.name) {
        throw new StateError(`${what}: saved port ${id} is "${p.name}", this device's is "${this.#ports[id].name}"`);
      }
      if (id > 0 && saved.findIndex((q) => q.name === p.name) !== id) {
        throw new StateError(`${what}: port name "${p.name}" saved twice`);
      }
    });
    const controlOut = stateArray(d.controlOut, `${what} controlOut`).map((v: StateValue) => {
      const m = stateBytes(v, `${what} control message`);
      if (m.length < CONSOLE_CTRL_SIZE || m.length > CONSOLE_CTRL_SIZE + MAX_PORT_NAME) {
        throw new StateError(`${what}: a control message of ${m.length} bytes`);
      }
      return m.slice();
    });
    const stats = stateCounters(d.stats, STAT_NAMES, what);
    for (const p of saved.slice(this.#ports.length)) {
      const nameBytes = new TextEncoder().encode(p.name);
      if (nameBytes.length === 0 || nameBytes.length > MAX_PORT_NAME || nameBytes.includes(0)) {
        throw new StateError(`${what}: port name "${p.name}" must be 1..${MAX_PORT_NAME} bytes without NUL`);
      }
    }
    // Every field checked: take them (new ports are created without announcing them).
    for (const p of saved.slice(this.#ports.length)) this.#ports.push(new Port(this, this.#ports.length, p.name));
    saved.forEach((p, id) => {
      const port = this.#ports[id];
      port.added = p.added;
      port.guestConnected = p.guestConnected;
      port.pending = p.pending.length > 0 ? [p.pending.slice()] : [];
      port.pendingBytes = p.pending.length;
    });
    this.#size = { cols, rows };
    this.#driverReady = driverReady;
    this.#controlOut = controlOut;
    Object.assign(this.#stats, stats);
  }
}
