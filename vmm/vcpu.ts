// The main-thread side of a vCPU: starts its Worker, answers its port and MMIO
// accesses from the buses, kicks it out of KVM_RUN, and reports how it ended.

import { kickThread } from "../ffi/libc.ts";
import { RUN_IMMEDIATE_EXIT } from "../ffi/kvm.ts";
import type { Bus } from "./bus.ts";
import { DOORBELL, IO_BLOCK_BYTES, KIND_PIO, serveRequest, type VcpuExitMessage } from "./vcpu_channel.ts";

export type VcpuEnd = Exclude<VcpuExitMessage, { kind: "ready" }>;

export interface VcpuOptions {
  id: number;
  vcpuFd: number;
  runSize: number;
  control: SharedArrayBuffer;
  pio: Bus;
  mmio: Bus;
  debugExit: boolean;
}

export class Vcpu {
  readonly id: number;
  readonly #worker: Worker;
  readonly #io = new SharedArrayBuffer(IO_BLOCK_BYTES);
  #tid = 0;
  #runAddr = 0n;
  #ended = false;
  readonly ready: Promise<void>;
  /** Resolves when the worker stops, with why. */
  readonly ended: Promise<VcpuEnd>;
  /** Exits served by the main thread, by kind. */
  readonly counters = { pio: 0, mmio: 0 };

  constructor(private readonly opts: VcpuOptions) {
    this.id = opts.id;
    this.#worker = new Worker(new URL("./vcpu_worker.ts", import.meta.url), { type: "module" });
    let readyResolve!: () => void;
    this.ready = new Promise((r) => readyResolve = r);
    this.ended = new Promise((resolve) => {
      this.#worker.onmessage = (e: MessageEvent<VcpuExitMessage | typeof DOORBELL>) => {
        const m = e.data;
        if (m === DOORBELL) return this.#serveIo();
        if (m.kind === "ready") {
          this.#tid = m.tid;
          this.#runAddr = m.runAddr;
          readyResolve();
          return;
        }
        this.#ended = true;
        resolve(m);
      };
      this.#worker.onerror = (e) => {
        e.preventDefault();
        this.#ended = true;
        resolve({ kind: "crash", detail: `vcpu ${this.id} worker: ${e.message}` });
      };
    });
    this.#worker.postMessage({
      id: opts.id,
      vcpuFd: opts.vcpuFd,
      runSize: opts.runSize,
      control: opts.control,
      io: this.#io,
      debugExit: opts.debugExit,
    });
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
    if (this.#ended || !this.#tid) return;
    const p = Deno.UnsafePointer.create(this.#runAddr);
    if (p) new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(p, RUN_IMMEDIATE_EXIT + 1))[RUN_IMMEDIATE_EXIT] = 1;
    kickThread(this.#tid);
  }

  get isEnded(): boolean {
    return this.#ended;
  }

  terminate(): void {
    this.#ended = true;
    this.#worker.terminate();
  }
}
