// The main-thread side of a vCPU: starts its Worker, answers its port and MMIO
// accesses from the buses, kicks it out of KVM_RUN, and reports how it ended.

import { kickThread } from "../ffi/libc.ts";
import { RUN_IMMEDIATE_EXIT } from "../ffi/kvm.ts";
import type { Bus } from "./bus.ts";
import {
  IO_ADDR_HI,
  IO_ADDR_LO,
  IO_BLOCK_BYTES,
  IO_DATA_BYTE_OFFSET,
  IO_IS_WRITE,
  IO_KIND,
  IO_SIZE,
  IO_STATE,
  KIND_PIO,
  STATE_REQUEST,
  STATE_RESPONSE,
  type VcpuExitMessage,
} from "./vcpu_channel.ts";

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
      this.#worker.onmessage = (e: MessageEvent<VcpuExitMessage>) => {
        const m = e.data;
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
    this.#serveIo();
    this.#worker.postMessage({
      id: opts.id,
      vcpuFd: opts.vcpuFd,
      runSize: opts.runSize,
      control: opts.control,
      io: this.#io,
      debugExit: opts.debugExit,
    });
  }

  /** Answer the worker's accesses until it ends. */
  async #serveIo(): Promise<void> {
    const io = new Int32Array(this.#io);
    const bytes = new Uint8Array(this.#io);
    while (!this.#ended) {
      const s = Atomics.load(io, IO_STATE);
      if (s === STATE_REQUEST) {
        const size = io[IO_SIZE];
        const addr = (io[IO_ADDR_HI] >>> 0) * 2 ** 32 + (io[IO_ADDR_LO] >>> 0);
        const data = bytes.subarray(IO_DATA_BYTE_OFFSET, IO_DATA_BYTE_OFFSET + size);
        const pio = io[IO_KIND] === KIND_PIO;
        const bus = pio ? this.opts.pio : this.opts.mmio;
        if (pio) this.counters.pio++;
        else this.counters.mmio++;
        try {
          if (io[IO_IS_WRITE]) bus.write(addr, data);
          else bus.read(addr, data);
        } catch (e) {
          console.error(
            `denovm: device error at ${pio ? "port" : "mmio"} 0x${addr.toString(16)}: ${(e as Error).message}`,
          );
        }
        Atomics.store(io, IO_STATE, STATE_RESPONSE);
        Atomics.notify(io, IO_STATE);
        continue;
      }
      const w = Atomics.waitAsync(io, IO_STATE, s, 250);
      if (w.async) await w.value;
    }
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
