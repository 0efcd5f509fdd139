// The shared-memory channel between a vCPU Worker and the main thread.
// Control block (one per VM, Int32Array): the command all vCPUs obey and how many are paused.
// I/O block (one per vCPU, Int32Array + bytes): one port or MMIO access in flight.

import type { WorkerDevice } from "./worker_devices.ts";

/** Control block slots. */
export const CTL_COMMAND = 0;
export const CTL_PAUSED = 1;
export const CTL_SLOTS = 2;
/** Commands. */
export const CMD_RUN = 0;
export const CMD_PAUSE = 1;
export const CMD_STOP = 2;

/** I/O block slots (Int32 indices). */
export const IO_STATE = 0;
export const IO_KIND = 1;
export const IO_IS_WRITE = 2;
export const IO_SIZE = 3;
export const IO_ADDR_LO = 4;
export const IO_ADDR_HI = 5;
/** Byte offset of the up-to-8 data bytes in the I/O block. */
export const IO_DATA_BYTE_OFFSET = 24;
/**
 * The worker's thread id (Int32 slot, after the data bytes), stored before it first enters KVM_RUN, so
 * that a kick finds the thread even before the main thread has read the worker's "ready" message.
 */
export const IO_TID = 8;
export const IO_BLOCK_BYTES = 40;
/** IO_STATE values: the worker posts a request, the main thread answers, the worker consumes. */
export const STATE_IDLE = 0;
export const STATE_REQUEST = 1;
export const STATE_RESPONSE = 2;
/** IO_KIND values. */
export const KIND_PIO = 1;
export const KIND_MMIO = 2;

/** What the main thread sends a vCPU Worker to start it. */
export interface VcpuStartMessage {
  id: number;
  vcpuFd: number;
  runSize: number;
  control: SharedArrayBuffer;
  io: SharedArrayBuffer;
  /** Serve the test guests' debug exit port in the worker. */
  debugExit: boolean;
  /** Devices the worker serves itself (see worker_devices.ts). */
  devices: readonly WorkerDevice[];
}

/**
 * What a vCPU Worker reports when KVM_EXIT_DEBUG stops it (a breakpoint, a debug-register hit, a single
 * step): struct kvm_debug_exit_arch's exception vector, guest pc and DR6. The worker has already put
 * the VM's command to CMD_PAUSE (if it was CMD_RUN) and parked; the main thread pauses the other vCPUs.
 */
export interface VcpuDebugMessage {
  kind: "debug";
  exception: number;
  pc: bigint;
  dr6: bigint;
}

/** What a vCPU Worker reports. */
export type VcpuExitMessage =
  | { kind: "ready"; tid: number }
  | { kind: "stopped" }
  | { kind: "shutdown" }
  | { kind: "reset" }
  | { kind: "crash"; detail: string }
  | { kind: "debug-exit"; code: number };

/**
 * The doorbell a worker posts (as a plain message) after writing a request: the
 * main thread's onmessage wakes its event loop reliably, which Atomics.waitAsync
 * does not do in Deno (the event loop can exit while a waitAsync is pending).
 */
export const DOORBELL = 0;
/** What a worker posts when a device it serves has something for the main thread (a UART's output). */
export const DEVICE_WAKE = 1;
/**
 * The worker pool (worker_pool.ts) asks an idle Worker to say when it waits for a start message: the Worker
 * answers WORKER_WAITING once it has loaded and any vCPU it ran has ended (messages are handled in order).
 */
export const WORKER_PING = 2;
/** A Worker's answer to WORKER_PING. */
export const WORKER_WAITING = 3;

/**
 * Worker side: hand one access to the main thread and block until it is answered.
 * `data` holds the bytes of a write, and receives the bytes of a read.
 */
export function exchange(
  io: Int32Array,
  ioBytes: Uint8Array,
  ring: () => void,
  kind: number,
  isWrite: boolean,
  addr: number,
  size: number,
  data: Uint8Array,
): void {
  io[IO_KIND] = kind;
  io[IO_IS_WRITE] = isWrite ? 1 : 0;
  io[IO_SIZE] = size;
  io[IO_ADDR_LO] = addr % 2 ** 32;
  io[IO_ADDR_HI] = Math.floor(addr / 2 ** 32);
  if (isWrite) ioBytes.set(data.subarray(0, size), IO_DATA_BYTE_OFFSET);
  Atomics.store(io, IO_STATE, STATE_REQUEST);
  ring();
  while (Atomics.load(io, IO_STATE) === STATE_REQUEST) Atomics.wait(io, IO_STATE, STATE_REQUEST);
  if (!isWrite) data.set(ioBytes.subarray(IO_DATA_BYTE_OFFSET, IO_DATA_BYTE_OFFSET + size));
  Atomics.store(io, IO_STATE, STATE_IDLE);
}

/** One access as the main thread sees it. */
export interface ChannelRequest {
  kind: number;
  isWrite: boolean;
  addr: number;
  /** The access's bytes: read them for a write, fill them for a read. */
  data: Uint8Array;
}

/**
 * Main-thread side, called when the doorbell rings: answer the pending access with
 * `handle` and wake the worker. Returns false when no request was pending.
 */
export function serveRequest(ioBuffer: SharedArrayBuffer, handle: (r: ChannelRequest) => void): boolean {
  const io = new Int32Array(ioBuffer);
  if (Atomics.load(io, IO_STATE) !== STATE_REQUEST) return false;
  const bytes = new Uint8Array(ioBuffer);
  const size = io[IO_SIZE];
  try {
    handle({
      kind: io[IO_KIND],
      isWrite: io[IO_IS_WRITE] !== 0,
      addr: (io[IO_ADDR_HI] >>> 0) * 2 ** 32 + (io[IO_ADDR_LO] >>> 0),
      data: bytes.subarray(IO_DATA_BYTE_OFFSET, IO_DATA_BYTE_OFFSET + size),
    });
  } finally {
    Atomics.store(io, IO_STATE, STATE_RESPONSE);
    Atomics.notify(io, IO_STATE);
  }
  return true;
}
