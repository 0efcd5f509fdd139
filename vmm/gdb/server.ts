// `denovm run --gdb PORT`: a GDB remote-protocol stub on 127.0.0.1:PORT for a Machine (crosvm's
// flag). The VM starts paused and waits for the debugger; one client at a time; when the client
// detaches or disconnects, the breakpoints go and the VM runs on.

import {
  guestDebugStruct,
  KVM_GET_REGS,
  KVM_GET_SREGS,
  KVM_REGS_SIZE,
  KVM_SET_GUEST_DEBUG,
  KVM_SET_REGS,
  KVM_SREGS_SIZE,
  kvmIoctl,
} from "../../ffi/kvm.ts";
import type { Machine } from "../machine.ts";
import { emulatedGuestCode, kvmModule } from "../kvm/host.ts";
import { type DebugTarget, GdbSession } from "./stub.ts";

/** Only the local host may debug the VM (crosvm binds its stub to loopback too). */
const GDB_HOST = "127.0.0.1";
const READ_CHUNK = 4096;

/** The Machine as the stub sees it. */
export function machineDebugTarget(machine: Machine): DebugTarget {
  return {
    vcpuCount: machine.vcpuCount,
    memory: machine.memory,
    pause: () => machine.pause(),
    resume: () => machine.resume(),
    getRegs(vcpu) {
      const b = new Uint8Array(KVM_REGS_SIZE);
      kvmIoctl(machine.vcpuFd(vcpu), KVM_GET_REGS, b);
      return b;
    },
    setRegs(vcpu, regs) {
      kvmIoctl(machine.vcpuFd(vcpu), KVM_SET_REGS, regs);
    },
    getSregs(vcpu) {
      const b = new Uint8Array(KVM_SREGS_SIZE);
      kvmIoctl(machine.vcpuFd(vcpu), KVM_GET_SREGS, b);
      return b;
    },
    setGuestDebug(vcpu, control, debugreg) {
      kvmIoctl(machine.vcpuFd(vcpu), KVM_SET_GUEST_DEBUG, guestDebugStruct(control, debugreg));
    },
    onStop(handler) {
      machine.onDebugStop(handler && ((vcpu, stop) => handler(vcpu, stop.exception, stop.dr6)));
    },
  };
}

/**
 * Pause the machine (call before start(): the guest runs its first instruction only when the
 * debugger lets it) and serve the stub on 127.0.0.1:`port` until the machine closes. Resolves once
 * listening, with the port (useful when `port` is 0).
 */
export async function startGdbServer(machine: Machine, port: number, log = console.error): Promise<number> {
  await machine.pause();
  const listener = Deno.listen({ hostname: GDB_HOST, port });
  const bound = (listener.addr as Deno.NetAddr).port;
  machine.onClose(() => listener.close());
  log(`denovm: gdb stub on ${GDB_HOST}:${bound}; the VM is paused until the debugger continues it`);
  const target = machineDebugTarget(machine);
  // kvm_pvm's instruction emulator cannot trap int3 (docs/testing.md): software breakpoints there are
  // debug registers only.
  const int3 = !emulatedGuestCode(kvmModule());
  (async () => {
    let busy = false;
    try {
      for await (const conn of listener) {
        if (busy || machine.closed) {
          conn.close();
          continue;
        }
        busy = true;
        serveClient(conn, target, int3, machine.exitCode).finally(() => busy = false);
      }
    } catch {
      // The listener was closed with the machine.
    }
  })();
  return bound;
}

async function serveClient(
  conn: Deno.Conn,
  target: DebugTarget,
  int3: boolean,
  vmExit: Promise<number>,
): Promise<void> {
  let open = true;
  const close = () => {
    if (!open) return;
    open = false;
    try {
      conn.close();
    } catch {
      // already closed
    }
  };
  // Replies go out in order, each written whole (a write may take only part of the bytes).
  let writing = Promise.resolve();
  const writeAll = async (bytes: Uint8Array) => {
    for (let off = 0; open && off < bytes.length;) off += await conn.write(bytes.subarray(off));
  };
  const session = new GdbSession(target, {
    int3,
    send: (bytes) => {
      writing = writing.then(() => writeAll(bytes)).catch(close);
    },
    close: () => void writing.then(close),
  });
  void vmExit.then((code) => session.vmEnded(code));
  await session.attach();
  const buf = new Uint8Array(READ_CHUNK);
  try {
    for (;;) {
      const n = await conn.read(buf);
      if (n === null) break;
      session.receive(buf.subarray(0, n));
    }
  } catch {
    // A reset connection ends the session like a close.
  } finally {
    await session.detach();
    close();
  }
}
