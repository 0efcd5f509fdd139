/// <reference lib="deno.worker" />
// One vCPU: this Worker calls KVM_RUN in a loop on its own thread. Port and MMIO
// exits that a device on the main thread must answer are handed over through a
// SharedArrayBuffer (see vcpu_channel.ts); the worker blocks on Atomics.wait until
// the answer is there, exactly as the guest's instruction waits for it.

import {
  KVM_EXIT_DEBUG,
  KVM_EXIT_FAIL_ENTRY,
  KVM_EXIT_HLT,
  KVM_EXIT_INTERNAL_ERROR,
  KVM_EXIT_INTR,
  KVM_EXIT_IO,
  KVM_EXIT_IO_OUT,
  KVM_EXIT_IRQ_WINDOW_OPEN,
  KVM_EXIT_MMIO,
  KVM_EXIT_SHUTDOWN,
  KVM_EXIT_SYSTEM_EVENT,
  KVM_SYSTEM_EVENT_CRASH,
  KVM_SYSTEM_EVENT_RESET,
  KVM_SYSTEM_EVENT_SHUTDOWN,
  kvmRun,
  RUN_DEBUG_DR6,
  RUN_DEBUG_EXCEPTION,
  RUN_DEBUG_PC,
  RUN_EXIT_REASON,
  RUN_FAIL_ENTRY_REASON,
  RUN_IMMEDIATE_EXIT,
  RUN_INTERNAL_DATA,
  RUN_INTERNAL_NDATA,
  RUN_INTERNAL_SUBERROR,
  RUN_IO_COUNT,
  RUN_IO_DATA_OFFSET,
  RUN_IO_DIRECTION,
  RUN_IO_PORT,
  RUN_IO_SIZE,
  RUN_MMIO_DATA,
  RUN_MMIO_DATA_BYTES,
  RUN_MMIO_IS_WRITE,
  RUN_MMIO_LEN,
  RUN_MMIO_PHYS_ADDR,
  RUN_SYSTEM_EVENT_TYPE,
} from "../../ffi/kvm.ts";
import { EAGAIN, EINTR, libc, MAP_SHARED, mmap, munmap, PROT_READ, PROT_WRITE, strerror } from "../../ffi/libc.ts";
import { dumpRegisters } from "../arch/cpu.ts";
import { shutdownResetsVcpu } from "./host.ts";
import { workerDeviceTable } from "./worker_devices.ts";
import { DEBUG_EXIT_PORT } from "../arch/layout.ts";
import {
  CMD_PAUSE,
  CMD_RUN,
  CMD_STOP,
  CTL_COMMAND,
  CTL_PAUSED,
  DEVICE_WAKE,
  DOORBELL,
  exchange,
  IO_TID,
  KIND_MMIO,
  KIND_PIO,
  type VcpuDebugMessage,
  type VcpuExitMessage,
  type VcpuStartMessage,
  WORKER_PING,
  WORKER_WAITING,
} from "./vcpu_channel.ts";

/** Port 0x80 is the POST-code port; Linux writes it for I/O delays. Reads see an idle ISA bus. */
const POST_CODE_PORT = 0x80;
const ISA_FLOATING_BUS = 0xff;

/**
 * io.data_offset of struct kvm_run: a u64 offset of the data within the kvm_run mapping, which is a
 * few pages, so its low 32 bits are the whole value (read without a BigInt on every exit).
 */
function ioDataOffset(run: DataView): number {
  return run.getUint32(RUN_IO_DATA_OFFSET, true);
}

type VcpuEnd = Exclude<VcpuExitMessage, { kind: "ready" }>;

// One vCPU per start message. When it has ended the Worker waits for the next one: the worker pool
// (worker_pool.ts) gives a Worker whose vCPU ended normally to the next vCPU of this process.
self.onmessage = (e: MessageEvent<VcpuStartMessage | typeof WORKER_PING>) => {
  if (e.data === WORKER_PING) {
    self.postMessage(WORKER_WAITING);
    return;
  }
  const start = e.data;
  let end: VcpuEnd;
  try {
    end = runVcpu(start);
  } catch (err) {
    end = { kind: "crash", detail: `vcpu ${start.id}: ${(err as Error).message}` };
  }
  // Posted only after runVcpu() unmapped the run page: the main thread kicks through its own mapping, and
  // whoever gets this Worker next finds no mapping of this vCPU left in it.
  self.postMessage(end);
};

/**
 * Map the vCPU's struct kvm_run and call KVM_RUN until the VM ends; returns why. The mapping is
 * removed on the way out: a live mapping of a vCPU fd keeps KVM's vCPU, and with it the whole VM
 * (irqchip, PIT thread, irqfds), alive after the fds are closed.
 */
function runVcpu(start: VcpuStartMessage): VcpuEnd {
  const runPtr = mmap(start.runSize, PROT_READ | PROT_WRITE, MAP_SHARED, start.vcpuFd, 0);
  try {
    return runLoop(start, runPtr);
  } finally {
    munmap(runPtr, start.runSize);
  }
}

function runLoop(start: VcpuStartMessage, runPtr: NonNullable<Deno.PointerValue>): VcpuEnd {
  const { vcpuFd, id, runSize } = start;
  const ctl = new Int32Array(start.control);
  const io = new Int32Array(start.io);
  const ioBytes = new Uint8Array(start.io);
  const run = new DataView(Deno.UnsafePointerView.getArrayBuffer(runPtr, runSize));
  const runBytes = new Uint8Array(run.buffer);
  const tid = libc().gettid();
  Atomics.store(io, IO_TID, tid);
  self.postMessage({ kind: "ready", tid });

  const ring = () => self.postMessage(DOORBELL);
  // The devices this thread serves itself (a UART, the virtio InterruptStatus/ACK registers).
  const devices = workerDeviceTable(start.devices, { run, runBytes, wake: () => self.postMessage(DEVICE_WAKE) });
  const mmioData = runBytes.subarray(RUN_MMIO_DATA, RUN_MMIO_DATA + RUN_MMIO_DATA_BYTES);

  // The command (run, pause, stop) is read before the first KVM_RUN and after every kick, not on
  // every exit: the main thread stores a command before it kicks (Vcpu.kick: immediate_exit, then the
  // signal), so KVM_RUN returns EINTR after any command, whether the kick finds this thread inside
  // KVM_RUN or serving an exit.
  let lookAtCommand = true;
  for (;;) {
    if (lookAtCommand) {
      lookAtCommand = false;
      const cmd = Atomics.load(ctl, CTL_COMMAND);
      if (cmd === CMD_STOP) return { kind: "stopped" };
      if (cmd === CMD_PAUSE) {
        Atomics.add(ctl, CTL_PAUSED, 1);
        Atomics.notify(ctl, CTL_PAUSED);
        while (Atomics.load(ctl, CTL_COMMAND) === CMD_PAUSE) Atomics.wait(ctl, CTL_COMMAND, CMD_PAUSE);
        Atomics.sub(ctl, CTL_PAUSED, 1);
        Atomics.notify(ctl, CTL_PAUSED);
        lookAtCommand = true; // a stop may have come during the pause
        continue;
      }
    }
    const err = kvmRun(vcpuFd);
    if (err !== 0) {
      if (err === EINTR || err === EAGAIN) {
        // A kick (immediate_exit + signal), or the first KVM_RUN after an INIT: look at the command and go on.
        runBytes[RUN_IMMEDIATE_EXIT] = 0;
        lookAtCommand = true;
        continue;
      }
      return { kind: "crash", detail: `vcpu ${id}: KVM_RUN: ${strerror(err)}\n${dumpRegisters(vcpuFd)}` };
    }
    const reason = run.getUint32(RUN_EXIT_REASON, true);
    switch (reason) {
      case KVM_EXIT_IO: {
        const out = run.getUint8(RUN_IO_DIRECTION) === KVM_EXIT_IO_OUT;
        const size = run.getUint8(RUN_IO_SIZE);
        const port = run.getUint16(RUN_IO_PORT, true);
        const count = run.getUint32(RUN_IO_COUNT, true);
        const off = ioDataOffset(run);
        if (port === POST_CODE_PORT) {
          // The cheapest exit there is: no device, nothing to hand over.
          if (!out) runBytes.fill(ISA_FLOATING_BUS, off, off + count * size);
          break;
        }
        for (let i = 0; i < count; i++) {
          const at = off + i * size;
          if (devices.pio(port, size, out, at)) continue;
          if (port === DEBUG_EXIT_PORT && start.debugExit && out) return { kind: "debug-exit", code: runBytes[at] };
          exchange(io, ioBytes, ring, KIND_PIO, out, port, size, runBytes.subarray(at, at + size));
        }
        break;
      }
      case KVM_EXIT_MMIO: {
        const addr = run.getUint32(RUN_MMIO_PHYS_ADDR, true) + run.getUint32(RUN_MMIO_PHYS_ADDR + 4, true) * 2 ** 32;
        const len = run.getUint32(RUN_MMIO_LEN, true);
        const isWrite = run.getUint8(RUN_MMIO_IS_WRITE) !== 0;
        if (devices.mmio(addr, len, isWrite, RUN_MMIO_DATA)) break;
        exchange(io, ioBytes, ring, KIND_MMIO, isWrite, addr, Math.min(len, RUN_MMIO_DATA_BYTES), mmioData);
        break;
      }
      case KVM_EXIT_INTR:
      case KVM_EXIT_IRQ_WINDOW_OPEN:
      case KVM_EXIT_HLT:
        // With the in-kernel irqchip HLT is handled by KVM; an exit here only means "look again".
        break;
      case KVM_EXIT_DEBUG: {
        // A debugger's stop (KVM_SET_GUEST_DEBUG is on): the whole VM pauses here. The command goes from
        // run to pause (a stop or a pause already there stays), the main thread hears why and pauses
        // the other vCPUs; this one parks like any paused vCPU until the debugger lets it go.
        Atomics.compareExchange(ctl, CTL_COMMAND, CMD_RUN, CMD_PAUSE);
        const stop: VcpuDebugMessage = {
          kind: "debug",
          exception: run.getUint32(RUN_DEBUG_EXCEPTION, true),
          pc: run.getBigUint64(RUN_DEBUG_PC, true),
          dr6: run.getBigUint64(RUN_DEBUG_DR6, true),
        };
        self.postMessage(stop);
        lookAtCommand = true;
        break;
      }
      case KVM_EXIT_SHUTDOWN:
        return {
          kind: "crash",
          detail: `vcpu ${id}: triple fault (KVM_EXIT_SHUTDOWN)\n${
            dumpRegisters(vcpuFd, { resetOnShutdown: shutdownResetsVcpu() })
          }`,
        };
      case KVM_EXIT_SYSTEM_EVENT: {
        const type = run.getUint32(RUN_SYSTEM_EVENT_TYPE, true);
        if (type === KVM_SYSTEM_EVENT_SHUTDOWN) return { kind: "shutdown" };
        if (type === KVM_SYSTEM_EVENT_RESET) return { kind: "reset" };
        if (type === KVM_SYSTEM_EVENT_CRASH) {
          return { kind: "crash", detail: `vcpu ${id}: system event crash\n${dumpRegisters(vcpuFd)}` };
        }
        break;
      }
      case KVM_EXIT_INTERNAL_ERROR: {
        const sub = run.getUint32(RUN_INTERNAL_SUBERROR, true);
        const n = Math.min(run.getUint32(RUN_INTERNAL_NDATA, true), 16);
        const data = Array.from(
          { length: n },
          (_, i) => "0x" + run.getBigUint64(RUN_INTERNAL_DATA + 8 * i, true).toString(16),
        );
        return {
          kind: "crash",
          detail: `vcpu ${id}: KVM internal error, suberror ${sub} [${data.join(" ")}]\n${dumpRegisters(vcpuFd)}`,
        };
      }
      case KVM_EXIT_FAIL_ENTRY: {
        const why = run.getBigUint64(RUN_FAIL_ENTRY_REASON, true);
        return {
          kind: "crash",
          detail: `vcpu ${id}: VM entry failed, reason 0x${why.toString(16)}\n${dumpRegisters(vcpuFd)}`,
        };
      }
      default:
        return {
          kind: "crash",
          detail: `vcpu ${id}: unexpected exit reason ${reason}\n${dumpRegisters(vcpuFd)}`,
        };
    }
  }
}
