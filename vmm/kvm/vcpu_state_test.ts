// vCPU and VM state through the real KVM (vcpu_state.ts, KvmVm.saveState/restoreState): saved from one VM,
// restored into a fresh one and read back; a tiny guest stopped, restored into a copy of its memory, and
// continued; bad records refused with a StateError. Needs /dev/kvm; test/kvm/fake_kvm_test.ts runs the same
// checks (test/support/kvm_state.ts) on the fake KVM.

import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import {
  KVM_EXIT_IO,
  KVM_EXIT_IO_OUT,
  kvmRun,
  RUN_EXIT_REASON,
  RUN_IMMEDIATE_EXIT,
  RUN_IO_COUNT,
  RUN_IO_DATA_OFFSET,
  RUN_IO_DIRECTION,
  RUN_IO_PORT,
  RUN_IO_SIZE,
} from "../../ffi/kvm.ts";
import { closeFd, EINTR, MAP_SHARED, mmap, munmap, PROT_READ, PROT_WRITE } from "../../ffi/libc.ts";
import { OwnedGuestMemory } from "../../core/memory.ts";
import { setCpuid, writeBootTables } from "../arch/cpu.ts";
import { KERNEL_START, MiB, ramRanges } from "../arch/layout.ts";
import { restoreVcpuState, saveVcpuState, snapshotMsrs, vcpuStateCaps } from "./vcpu_state.ts";
import { Kvm, KvmVm } from "./vm.ts";
import {
  bootVcpu,
  checkBadRecords,
  checkVcpuRoundTrip,
  checkVmRoundTrip,
  Opened,
  throughFile,
} from "../../test/support/kvm_state.ts";

// Under the fake KVM's environment (DENOVM_LIBC) this process's KVM is not the host's.
const kvmAvailable = existsSync("/dev/kvm") && !Deno.env.get("DENOVM_LIBC");
if (!kvmAvailable) console.log("vcpu_state_test: skipped: no /dev/kvm (fake_kvm_test.ts runs the same checks)");

/** Guest RAM for the counter guest's VMs: the boot tables, and a page of code at KERNEL_START. */
const GUEST_MEM_BYTES = 32 * MiB;

/**
 * The counter guest, 64-bit code at KERNEL_START (inside the boot page tables' identity map):
 *   loop: inc dword [COUNTER]; mov eax, [COUNTER]; out COUNTER_PORT, eax; jmp loop
 * The counter lives in guest memory, so the restored guest counts on only if its memory came along too.
 */
const COUNTER = KERNEL_START + 0x100;
const COUNTER_PORT = 0x80;
function counterGuest(): Uint8Array {
  const addr = [0, 8, 16, 24].map((shift) => (COUNTER >>> shift) & 0xff);
  return new Uint8Array([
    ...[0xff, 0x04, 0x25, ...addr], // inc dword [disp32]
    ...[0x8b, 0x04, 0x25, ...addr], // mov eax, [disp32]
    ...[0xe7, COUNTER_PORT], // out imm8, eax
    ...[0xeb, 0xee], // jmp -18: back to the inc
  ]);
}

/** A vCPU's run page, to drive KVM_RUN from this thread. */
class Runner {
  readonly #run: NonNullable<Deno.PointerValue>;
  readonly #size: number;
  constructor(kvm: Kvm, readonly fd: number) {
    this.#size = kvm.vcpuMmapSize;
    this.#run = mmap(this.#size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  }
  #view(): DataView {
    return new DataView(Deno.UnsafePointerView.getArrayBuffer(this.#run, this.#size));
  }
  /** Run to the next exit, which must be the guest's 4-byte out to the counter port: the value written. */
  nextOut(): number {
    const err = kvmRun(this.fd);
    assert.equal(err, 0, `KVM_RUN errno ${err}`);
    const v = this.#view();
    assert.equal(v.getUint32(RUN_EXIT_REASON, true), KVM_EXIT_IO);
    assert.equal(v.getUint8(RUN_IO_DIRECTION), KVM_EXIT_IO_OUT);
    assert.equal(v.getUint16(RUN_IO_PORT, true), COUNTER_PORT);
    assert.equal(v.getUint8(RUN_IO_SIZE), 4);
    assert.equal(v.getUint32(RUN_IO_COUNT, true), 1);
    return v.getUint32(Number(v.getBigUint64(RUN_IO_DATA_OFFSET, true)), true);
  }
  /** Complete the pending exit's instruction without running on: KVM_RUN with immediate_exit, as a pause does. */
  settle(): void {
    const v = this.#view();
    v.setUint8(RUN_IMMEDIATE_EXIT, 1);
    assert.equal(kvmRun(this.fd), EINTR);
    v.setUint8(RUN_IMMEDIATE_EXIT, 0);
  }
  close(): void {
    munmap(this.#run, this.#size);
  }
}

/** A test, ignored without KVM, that runs `check` (test/support/kvm_state.ts) on this host's KVM. */
function kvmCheck(name: string, check: (kvm: Kvm) => void): void {
  Deno.test({
    name,
    ignore: !kvmAvailable,
    fn() {
      using o = new Opened();
      check(o.add(new Kvm(), (k) => k.close()));
    },
  });
}

kvmCheck(
  "kvm-vcpu: a booting vCPU saved, restored into a fresh VM and saved again gives the same record but the TSC",
  checkVcpuRoundTrip,
);

Deno.test({
  name: "kvm-vcpu: a guest stopped, restored into a fresh VM with a copy of its memory, counts on from where it was",
  ignore: !kvmAvailable,
  fn() {
    using o = new Opened();
    const kvm = o.add(new Kvm(), (k) => k.close());
    const msrs = snapshotMsrs(kvm);
    const mem1 = o.add(OwnedGuestMemory.allocate(ramRanges(GUEST_MEM_BYTES)), (m) => m.close());
    writeBootTables(mem1);
    mem1.write(KERNEL_START, counterGuest());
    const vm1 = o.add(new KvmVm(kvm), (v) => v.close());
    vm1.addGuestMemory(mem1);
    const caps = vcpuStateCaps(vm1);
    const a = bootVcpu(kvm, vm1);
    o.add(a.fd, closeFd);
    const run1 = o.add(new Runner(kvm, a.fd), (r) => r.close());
    const STOP_AT = 5;
    for (let i = 1; i <= STOP_AT; i++) assert.equal(run1.nextOut(), i);
    run1.settle();
    const vcpu = throughFile(saveVcpuState(a.fd, 0, msrs, caps));
    const vmState = throughFile(vm1.saveState());

    const mem2 = o.add(OwnedGuestMemory.allocate(ramRanges(GUEST_MEM_BYTES)), (m) => m.close());
    for (const d of mem1.descriptors) mem2.write(d.guestBase, mem1.read(d.guestBase, d.size));
    const vm2 = o.add(new KvmVm(kvm), (v) => v.close());
    vm2.addGuestMemory(mem2);
    vm2.restoreState(vmState);
    const b = o.add(vm2.createVcpu(0), closeFd);
    setCpuid(b, a.cpuid);
    restoreVcpuState(b, vcpu, caps);
    const run2 = o.add(new Runner(kvm, b), (r) => r.close());
    assert.equal(run2.nextOut(), STOP_AT + 1, "the restored guest's next write continues the count");
    assert.equal(run2.nextOut(), STOP_AT + 2);
    assert.equal(mem2.getU32(COUNTER), STOP_AT + 2);
    // The original runs on from the same point: the clone took a copy, not its memory.
    assert.equal(run1.nextOut(), STOP_AT + 1);
    assert.equal(mem1.getU32(COUNTER), STOP_AT + 1);
  },
});

kvmCheck(
  "kvm-vm: an IOAPIC entry, the PIT's channel 0 and the clock set in one VM are there in the VM restored from it",
  checkVmRoundTrip,
);

kvmCheck(
  "kvm-vcpu and kvm-vm: bad records are a StateError of one line each, and the vCPU keeps its state",
  checkBadRecords,
);
