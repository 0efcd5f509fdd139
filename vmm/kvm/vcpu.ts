// The main-thread side of a vCPU: starts its Worker (one from worker_pool.ts), answers its port and MMIO
// accesses from the buses, kicks it out of KVM_RUN, reports how it ended, and gives the Worker back to
// the pool when the vCPU ended normally.

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
  WORKER_WAITING,
} from "./vcpu_channel.ts";
import { releaseVcpuWorker, takeVcpuWorker } from "./worker_pool.ts";

export type VcpuEnd = Exclude<VcpuExitMessage, { kind: "ready" }>;

export interface VcpuOptions {
  /** The Worker to run on (takeVcpuWorker() by default; the builder takes the boot vCPU's early). */
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
  /** The Worker went back to the pool: it is no longer this vCPU's to terminate. */
  #released = false;
  readonly ready: Promise<void>;
  /** Resolves when the worker stops, with why. */
  readonly ended: Promise<VcpuEnd>;
  /** Exits served by the main thread, by kind. */
  readonly counters = { pio: 0, mmio: 0 };

  constructor(private readonly opts: VcpuOptions) {
    this.id = opts.id;
    this.#run = mmap(opts.runSize, PROT_READ | PROT_WRITE, MAP_SHARED, opts.vcpuFd, 0);
    this.#worker = opts.worker ?? takeVcpuWorker();
    let readyResolve!: () => void;
    this.ready = new Promise((r) => readyResolve = r);
    this.ended = new Promise((resolve) => {
      type Message =
        | VcpuExitMessage
        | VcpuDebugMessage
        | typeof DOORBELL
        | typeof DEVICE_WAKE
        | typeof WORKER_WAITING;
      this.#worker.onmessage = (e: MessageEvent<Message>) => {
        const m = e.data;
        if (m === DOORBELL) return this.#serveIo();
        if (m === DEVICE_WAKE) return opts.deviceWake?.();
        // The pool's question, answered after this Worker was taken: nothing for the vCPU.
        if (m === WORKER_WAITING) return;
        if (m.kind === "debug") return opts.onDebug?.(m);
        if (m.kind === "ready") {
          this.#tid = m.tid;
          readyResolve();
          return;
        }
        this.#end();
        // A normal end leaves the Worker waiting for its next start: the pool keeps it. After a crash
        // (a triple fault, a KVM error, an exception in the loop) nothing is known about it: it goes.
        if (m.kind === "crash") this.#worker.terminate();
        else this.#release();
        resolve(m);
      };
      this.#worker.onerror = (e) => {
        e.preventDefault();
        this.#end();
        this.#worker.terminate();
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

  /** Give the Worker back to the pool (its vCPU ended normally); this Vcpu hears nothing from it again. */
  #release(): void {
    this.#released = true;
    this.#worker.onmessage = null;
    this.#worker.onerror = null;
    releaseVcpuWorker(this.#worker);
  }

  get isEnded(): boolean {
    return this.#ended;
  }

  /** End the vCPU's Worker now (it did not leave KVM_RUN in time): it is never reused. */
  terminate(): void {
    this.#end();
    if (!this.#released) this.#worker.terminate();
  }
}
