// The main-thread side of a vCPU: starts its Worker, answers its port and MMIO
// accesses from the buses, kicks it out of KVM_RUN, and reports how it ended.

import { kickThread, MAP_SHARED, mmap, munmap, PROT_READ, PROT_WRITE } from "../../ffi/libc.ts";
import { RUN_IMMEDIATE_EXIT } from "../../ffi/kvm.ts";
import type { Bus } from "../../core/bus.ts";
import type { WorkerDevice } from "./worker_devices.ts";
import {
  DEVICE_WAKE,
  DOORBELL,
  IO_BLOCK_BYTES,
  IO_TID,
  KIND_PIO,
  serveRequest,
  type VcpuDebugMessage,
  type VcpuExitMessage,
  type VcpuStartMessage,
} from "./vcpu_channel.ts";

export type VcpuEnd = Exclude<VcpuExitMessage, { kind: "ready" }>;

/** A vCPU Worker, loading; Vcpu gives it its vCPU (spawned early so it loads while the VM is built). */
export function spawnVcpuWorker(): Worker {
  return new Worker(new URL("./vcpu_worker.ts", import.meta.url), { type: "module" });
}

export interface VcpuOptions {
  /** The Worker to run on (from spawnVcpuWorker); a new one by default. */
  worker?: Worker;
  id: number;
  vcpuFd: number;
  runSize: number;
  control: SharedArrayBuffer;
  pio: Bus;
  mmio: Bus;
  debugExit: boolean;
  /** Devices the worker serves itself. */
  devices?: readonly WorkerDevice[];
  /** A device the worker serves has something for the main thread (a UART's output): take it. */
  deviceWake?: () => void;
  /** KVM_EXIT_DEBUG stopped this vCPU (it has paused the VM's command and parked). */
  onDebug?: (stop: VcpuDebugMessage) => void;
}

export class Vcpu {
  readonly id: number;
  readonly #worker: Worker;
  readonly #io = new SharedArrayBuffer(IO_BLOCK_BYTES);
  #tid = 0;
  /**
   * The main thread's own mapping of struct kvm_run, for kick()'s immediate_exit. The worker unmaps
   * its mapping before it reports its end, so kicking through it could touch unmapped memory; this
   * one is removed when the worker has ended (no kick after that), so no mapping outlives the vCPU.
   */
  #run: NonNullable<Deno.PointerValue> | undefined;
  #ended = false;
  readonly ready: Promise<void>;
  /** Resolves when the worker stops, with why. */
  readonly ended: Promise<VcpuEnd>;
  /** Exits served by the main thread, by kind. */
  readonly counters = { pio: 0, mmio: 0 };

  constructor(private readonly opts: VcpuOptions) {
    this.id = opts.id;
    this.#run = mmap(opts.runSize, PROT_READ | PROT_WRITE, MAP_SHARED, opts.vcpuFd, 0);
    this.#worker = opts.worker ?? spawnVcpuWorker();
    let readyResolve!: () => void;
    this.ready = new Promise((r) => readyResolve = r);
    this.ended = new Promise((resolve) => {
      type Message = VcpuExitMessage | VcpuDebugMessage | typeof DOORBELL | typeof DEVICE_WAKE;
      this.#worker.onmessage = (e: MessageEvent<Message>) => {
        const m = e.data;
        if (m === DOORBELL) return this.#serveIo();
        if (m === DEVICE_WAKE) return opts.deviceWake?.();
        if (m.kind === "debug") return opts.onDebug?.(m);
        if (m.kind === "ready") {
          this.#tid = m.tid;
          readyResolve();
          return;
        }
        this.#end();
        resolve(m);
      };
      this.#worker.onerror = (e) => {
        e.preventDefault();
        this.#end();
        resolve({ kind: "crash", detail: `vcpu ${this.id} worker: ${e.message}` });
      };
    });
    const start: VcpuStartMessage = {
      id: opts.id,
      vcpuFd: opts.vcpuFd,
      runSize: opts.runSize,
      control: opts.control,
      io: this.#io,
      debugExit: opts.debugExit,
      devices: opts.devices ?? [],
    };
    this.#worker.postMessage(start);
  }

  /** Answer the worker's pending access from the buses (its doorbell rang). */
  #serveIo(): void {
    serveRequest(this.#io, (r) => {
      const pio = r.kind === KIND_PIO;
      const bus = pio ? this.opts.pio : this.opts.mmio;
      if (pio) this.counters.pio++;
      else this.counters.mmio++;
      try {
        if (r.isWrite) bus.write(r.addr, r.data);
        else bus.read(r.addr, r.data);
      } catch (e) {
        console.error(
          `denovm: device error at ${pio ? "port" : "mmio"} 0x${r.addr.toString(16)}: ${(e as Error).message}`,
        );
      }
    });
  }

  /** Make KVM_RUN return now (or right away if the vCPU is about to enter it). */
  kick(): void {
    if (this.#ended || !this.#run) return;
    // immediate_exit first: a worker about to enter KVM_RUN returns at once and looks at the command.
    new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(this.#run, RUN_IMMEDIATE_EXIT + 1))[RUN_IMMEDIATE_EXIT] = 1;
    // The signal, for a worker already inside KVM_RUN; its thread id is in the I/O block before it enters
    // (the "ready" message may not have been read yet: a VM can end while its last vCPU is starting).
    const tid = this.#tid || Atomics.load(new Int32Array(this.#io), IO_TID);
    if (tid) kickThread(tid);
  }

  /** The worker is gone (or given up on): no more kicks, drop the main thread's run mapping. */
  #end(): void {
    this.#ended = true;
    if (this.#run) munmap(this.#run, this.opts.runSize);
    this.#run = undefined;
  }

  get isEnded(): boolean {
    return this.#ended;
  }

  terminate(): void {
    this.#end();
    this.#worker.terminate();
  }
}
