// The legacy PC devices on the port bus: the 8250 UARTs (served by the vCPU Workers too, over
// shared state), the i8042 (its reset line), the CMOS RTC, the ACPI PM registers and pvpanic.

import { closeFd, eventfd, eventfdWrite } from "../../ffi/libc.ts";
import type { Bus } from "../../core/bus.ts";
import { type DeviceState, StateError, type Stateful } from "../../core/state.ts";
import { AcpiPm } from "../../devices/legacy/acpi_pm.ts";
import { Cmos, CMOS_PORT_SPAN } from "../../devices/legacy/cmos.ts";
import { I8042 } from "../../devices/legacy/i8042.ts";
import { PvPanic } from "../../devices/legacy/pvpanic.ts";
import { Serial, UART_REGISTER_COUNT } from "../../devices/legacy/serial.ts";
import {
  ACPI_RESET_PORT,
  ACPI_RESET_VALUE,
  ACPI_SLEEP_CONTROL_PORT,
  ACPI_SLEEP_TYPE_S5,
  CMOS_INDEX_PORT,
  I8042_COMMAND_PORT,
  I8042_DATA_PORT,
  PVPANIC_PORT,
  SERIAL_PORTS,
} from "../arch/layout.ts";
import type { SerialConfig } from "../config.ts";
import type { VmHandle } from "../kvm/vm.ts";
import type { HostIo } from "./host_io.ts";
import type { WorkerDevice } from "../kvm/worker_devices.ts";

/** pvpanic is one port (QEMU docs/specs/pvpanic.rst). */
const PVPANIC_PORT_SPAN = 1;

/** What the guest can ask of the machine through a legacy device. */
export type GuestRequest = "power-off" | "reset" | "panic";

/** The guest asked to power off, reset or report a panic; `reason` says which device and how. */
export type GuestRequestHandler = (request: GuestRequest, reason: string) => void;

/** A legacy device's saved state, under the name it has on the port bus ("COM1", "i8042", "cmos", ...). */
export interface LegacyDeviceState {
  name: string;
  state: DeviceState;
}

/** A UART as the vCPU Workers serve it: its ports, its shared state, the irqfd of its interrupt. */
interface WorkerUart {
  base: number;
  state: SharedArrayBuffer;
  irqFd: number;
}

export class LegacyDevices {
  /** The UARTs by port number (COM1 at index 0); virtio-console ports are not here. */
  readonly serials: Serial[] = [];
  readonly #workerUarts: WorkerUart[] = [];
  readonly #irqFds: number[] = [];
  /** Every device with state, by its bus name, in the order add() put them on the bus. */
  readonly #stateful: { name: string; device: Stateful }[] = [];

  constructor(
    readonly bus: Bus,
    readonly vm: Pick<VmHandle, "registerIrqfd">,
    readonly hostIo: HostIo,
    readonly onGuestRequest: GuestRequestHandler,
    readonly log: (line: string) => void,
  ) {}

  /** Put the UARTs `serials` asks for and the fixed PC devices on the port bus. */
  async add(serials: readonly SerialConfig[]): Promise<void> {
    for (const s of serials) {
      if (s.hardware !== "serial") continue; // virtio-console ports come with the virtio devices
      const port = SERIAL_PORTS[s.num - 1];
      // The UART's interrupt is an irqfd, so that a vCPU thread serving the guest's accesses raises it
      // as the main thread does.
      const irqFd = eventfd();
      this.#irqFds.push(irqFd);
      this.vm.registerIrqfd(irqFd, port.irq);
      const serial = new Serial({ interrupt: () => eventfdWrite(irqFd), output: await this.hostIo.output(s) });
      this.#workerUarts.push({ base: port.base, state: serial.state, irqFd });
      this.serials[s.num - 1] = serial;
      this.bus.add(port.base, UART_REGISTER_COUNT, serial, `COM${s.num}`);
      this.#stateful.push({ name: `COM${s.num}`, device: serial });
      await this.hostIo.attachInput(s, (b) => serial.enqueueInput(b));
    }
    const request = this.onGuestRequest;
    const i8042 = new I8042({
      dataPort: I8042_DATA_PORT,
      commandPort: I8042_COMMAND_PORT,
      onReset: () => request("reset", "guest reset (i8042)"),
    });
    this.bus.add(I8042_DATA_PORT, i8042.portSpan, i8042, "i8042");
    const cmos = new Cmos();
    this.bus.add(CMOS_INDEX_PORT, CMOS_PORT_SPAN, cmos, "cmos");
    const acpiPm = new AcpiPm(
      {
        sleepControlPort: ACPI_SLEEP_CONTROL_PORT,
        resetPort: ACPI_RESET_PORT,
        resetValue: ACPI_RESET_VALUE,
        s5SleepType: ACPI_SLEEP_TYPE_S5,
      },
      {
        powerOff: () => request("power-off", "guest powered off (ACPI S5)"),
        reset: () => request("reset", "guest reset (ACPI reset register)"),
        log: this.log,
      },
    );
    this.bus.add(ACPI_SLEEP_CONTROL_PORT, acpiPm.portSpan, acpiPm, "acpi-pm");
    const pvpanic = new PvPanic(() => request("panic", "guest panicked (pvpanic)"), this.log);
    this.bus.add(PVPANIC_PORT, PVPANIC_PORT_SPAN, pvpanic, "pvpanic");
    this.#stateful.push(
      { name: "i8042", device: i8042 },
      { name: "cmos", device: cmos },
      { name: "acpi-pm", device: acpiPm },
      { name: "pvpanic", device: pvpanic },
    );
  }

  /** The names of the devices with state, in bus order: what saveState() lists. */
  get stateNames(): string[] {
    return this.#stateful.map((d) => d.name);
  }

  /** Every device's state under its bus name. Call it while no vCPU runs (the UARTs share state with them). */
  saveState(): LegacyDeviceState[] {
    return this.#stateful.map(({ name, device }) => ({ name, state: device.saveState() }));
  }

  /**
   * Take saved states, matched by name: every device of this VM must have one and every saved one must have
   * its device (StateError naming the first that does not). Call it before any vCPU runs.
   */
  restoreState(saved: readonly LegacyDeviceState[]): void {
    const byName = new Map<string, DeviceState>();
    for (const { name, state } of saved) {
      if (byName.has(name)) throw new StateError(`the snapshot has two states for ${name}`);
      byName.set(name, state);
    }
    for (const { name } of this.#stateful) {
      if (!byName.has(name)) throw new StateError(`${name}: this VM has the device, the snapshot has no state for it`);
    }
    const mine = new Set(this.stateNames);
    for (const name of byName.keys()) {
      if (!mine.has(name)) throw new StateError(`${name}: the snapshot has the device, this VM does not`);
    }
    for (const { name, device } of this.#stateful) {
      try {
        device.restoreState(byName.get(name)!);
      } catch (e) {
        throw new StateError(`${name}: ${(e as Error).message}`);
      }
    }
  }

  /** The UARTs as the vCPU Workers serve them. */
  workerDevices(): WorkerDevice[] {
    return this.#workerUarts.map((u) => ({
      kind: "uart",
      space: "pio",
      base: u.base,
      size: UART_REGISTER_COUNT,
      state: u.state,
      irqFd: u.irqFd,
    }));
  }

  /** Take what the vCPUs' UARTs transmitted to the consoles. */
  drainOutput(): void {
    for (const serial of this.serials) serial?.drainOutput();
  }

  /** Every vCPU is gone, some terminated: free the UART locks a terminated one may have held. */
  releaseLocksOfEndedVcpus(): void {
    for (const serial of this.serials) serial?.releaseLockOfEndedVcpus();
  }

  /** Send bytes to a UART's input (COM1 by default). */
  sendInput(bytes: Uint8Array, num = 1): void {
    const s = this.serials[num - 1];
    if (!s) throw new Error(`no serial port COM${num}`);
    s.enqueueInput(bytes);
  }

  /** Take the last output, let no vCPU wait for a console any more, and close the irqfds. */
  close(): void {
    this.drainOutput();
    for (const serial of this.serials) serial?.closeHost();
    this.#irqFds.forEach(closeFd);
  }
}
