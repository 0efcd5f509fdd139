// The shared-memory channel between a vCPU Worker and the main thread.
// Control block (one per VM, Int32Array): the command all vCPUs obey and how many are paused.
// I/O block (one per vCPU, Int32Array + bytes): one port or MMIO access in flight.

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
export const IO_BLOCK_BYTES = 32;
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
}

/** What a vCPU Worker reports. */
export type VcpuExitMessage =
  | { kind: "ready"; tid: number; runAddr: bigint }
  | { kind: "stopped" }
  | { kind: "shutdown" }
  | { kind: "reset" }
  | { kind: "crash"; detail: string }
  | { kind: "debug-exit"; code: number };
