// vCPU set-up that can be checked without KVM: CPUID as each vCPU sees it (APIC ids,
// topology) built from a supported-CPUID table, and the boot GDT and page tables as the
// CPU will walk them.

import assert from "node:assert/strict";
import { KVM_CPUID2_HEADER_SIZE, KVM_CPUID_ENTRY2_SIZE } from "../../ffi/kvm.ts";
import {
  BOOT_CODE_SELECTOR,
  BOOT_DATA_SELECTOR,
  cpuidEntry,
  showsLostState,
  vcpuCpuid,
  writeBootTables,
} from "./cpu.ts";
import { BOOT_GDT_START, GiB, MiB, PDPTE_START, PML4_START } from "./layout.ts";
import { OwnedGuestMemory } from "../../core/memory.ts";

/** A struct kvm_cpuid2 with the given (function, index, eax, ebx, ecx, edx) entries. */
function supported(entries: number[][]): Uint8Array {
  const b = new Uint8Array(KVM_CPUID2_HEADER_SIZE + entries.length * KVM_CPUID_ENTRY2_SIZE);
  const v = new DataView(b.buffer);
  v.setUint32(0, entries.length, true);
  entries.forEach((e, i) => {
    const o = KVM_CPUID2_HEADER_SIZE + i * KVM_CPUID_ENTRY2_SIZE;
    e.forEach((x, j) => v.setUint32(o + (j < 2 ? j * 4 : 12 + (j - 2) * 4), x >>> 0, true));
  });
  return b;
}

const HOST = supported([
  [0x1, 0, 0x000906ea, 0x00100800 | 0xff000000, (1 << 13) | (1 << 26) | (1 << 28) | 1, 0x0fabfbff],
  [0x4, 0, 0x1c004121, 0, 0, 0], // L1d
  [0x4, 1, 0x1c004122, 0, 0, 0], // L1i
  [0x4, 2, 0x1c004143, 0, 0, 0], // L2
  [0x4, 3, 0x1c03c163, 0, 0, 0], // L3
  [0x4, 4, 0, 0, 0, 0],
  [0xb, 0, 1, 2, 0x100, 7],
  [0xb, 1, 4, 16, 0x201, 7],
  [0xb, 2, 0, 0, 2, 7],
]);

Deno.test("CPUID: each vCPU sees its own APIC id and the VM's topology (leaves 1, 4, 0xB)", () => {
  for (const [apicId, count] of [[0, 1], [3, 4], [5, 6]]) {
    const c = vcpuCpuid(HOST, { apicId, cpuCount: count, hideCx16: false });
    const [, ebx1, ecx1, edx1] = cpuidEntry(c, 0x1)!;
    assert.equal(ebx1 >>> 24, apicId, "initial APIC id");
    assert.equal((ebx1 >>> 16) & 0xff, count, "logical processors");
    assert.equal(ebx1 & 0xffff, 0x0800, "CLFLUSH size and brand index kept");
    assert.equal(ecx1 >>> 31, 1, "hypervisor bit");
    assert.equal((ecx1 >> 13) & 1, 1, "CX16 kept when not asked to hide it");
    assert.equal((edx1 >> 28) & 1, count > 1 ? 1 : 0, "HTT iff more than one logical CPU");
    for (let sub = 0; sub < 4; sub++) {
      const [eax4] = cpuidEntry(c, 0x4, sub)!;
      assert.equal(eax4 >>> 26, count - 1, `leaf 4.${sub} cores per package`);
      const level = (eax4 >> 5) & 7;
      assert.equal((eax4 >> 14) & 0xfff, level >= 3 ? count - 1 : 0, `leaf 4.${sub} sharing`);
      assert.equal(eax4 & 0x3fff, [0x0121, 0x0122, 0x0143, 0x0163][sub], "cache type/level bits kept");
    }
    const smt = cpuidEntry(c, 0xb, 0)!;
    const core = cpuidEntry(c, 0xb, 1)!;
    const end = cpuidEntry(c, 0xb, 2)!;
    assert.deepEqual(smt, [0, 1, 0x100, apicId]);
    assert.deepEqual(core, [Math.ceil(Math.log2(count)), count, 0x201, apicId]);
    assert.deepEqual(end, [0, 0, 2, apicId]);
  }
  // The host table is not modified.
  assert.equal(cpuidEntry(HOST, 0x1)![1] >>> 24, 0xff);
});

Deno.test("CPUID: CMPXCHG16B and XSAVE/AVX are hidden on request (kvm_pvm's emulator lacks them)", () => {
  const host = vcpuCpuid(HOST, { apicId: 0, cpuCount: 1, hideCx16: false });
  const c = vcpuCpuid(HOST, { apicId: 0, cpuCount: 1, hideCx16: true, hideXsave: true });
  assert.equal((cpuidEntry(c, 0x1)![2] >> 13) & 1, 0);
  assert.equal((cpuidEntry(c, 0x1)![2] >> 26) & 1, 0, "XSAVE hidden");
  assert.equal((cpuidEntry(c, 0x1)![2] >> 28) & 1, 0, "AVX hidden");
  assert.equal((cpuidEntry(host, 0x1)![2] >> 26) & 1, 1, "XSAVE offered when not asked to hide it");
  const others = ~((1 << 13) | (1 << 26) | (1 << 28));
  assert.equal(cpuidEntry(c, 0x1)![2] & others, cpuidEntry(host, 0x1)![2] & others, "nothing else changed");
});

Deno.test("CPUID: the TSC-deadline timer bit is set only when asked (KVM_CAP_TSC_DEADLINE_TIMER), nothing else moves", () => {
  const without = vcpuCpuid(HOST, { apicId: 0, cpuCount: 1, hideCx16: false });
  const withIt = vcpuCpuid(HOST, { apicId: 0, cpuCount: 1, hideCx16: false, tscDeadline: true });
  const bit24 = 1 << 24;
  assert.equal(
    cpuidEntry(HOST, 0x1)![2] & bit24,
    0,
    "the fixture, like KVM_GET_SUPPORTED_CPUID before 6.x, leaves it clear",
  );
  assert.equal(cpuidEntry(without, 0x1)![2] & bit24, 0);
  assert.equal((cpuidEntry(withIt, 0x1)![2] & bit24) >>> 0, bit24);
  assert.equal(cpuidEntry(withIt, 0x1)![2] & ~bit24, cpuidEntry(without, 0x1)![2] & ~bit24);
  assert.equal([...withIt].filter((b, i) => b !== without[i]).length, 1, "one byte of the table differs");
});

Deno.test("boot tables: the GDT holds 64-bit code and flat data, the page tables identity-map 4 GiB in 2 MiB pages", () => {
  using mem = OwnedGuestMemory.allocate([{ start: 0, size: 16 * MiB }]);
  writeBootTables(mem);
  const code = mem.getU64(BOOT_GDT_START + BOOT_CODE_SELECTOR);
  const data = mem.getU64(BOOT_GDT_START + BOOT_DATA_SELECTOR);
  // Access byte (bits 40..47) and flags nibble (bits 52..55) per the Intel SDM vol. 3A 3.4.5.
  assert.equal(Number((code >> 40n) & 0xffn), 0x9b, "present, ring 0, code, execute/read, accessed");
  assert.equal(Number((code >> 52n) & 0xfn), 0xa, "G and L set, D clear");
  assert.equal(Number((data >> 40n) & 0xffn), 0x93);
  assert.equal(Number((data >> 52n) & 0xfn), 0xc, "G and D/B set");
  assert.equal(mem.getU64(BOOT_GDT_START), 0n, "null descriptor");
  // Walk the tables for a few addresses as the MMU would.
  const walk = (va: number): number => {
    const pml4e = mem.getU64(PML4_START + ((va / 2 ** 39) & 511) * 8);
    assert.equal(pml4e & 1n, 1n);
    const pdpte = mem.getU64(Number(pml4e & ~0xfffn) + (Math.floor(va / 2 ** 30) & 511) * 8);
    assert.equal(pdpte & 1n, 1n);
    const pde = mem.getU64(Number(pdpte & ~0xfffn) + (Math.floor(va / 2 ** 21) & 511) * 8);
    assert.equal(pde & 0x83n, 0x83n, "present, writable, 2 MiB page");
    return Number(pde & ~0x1fffffn) + (va % (2 * MiB));
  };
  for (const va of [0, 0x1234, 16 * MiB + 5, GiB + 7, 3 * GiB + 2 * MiB + 9, 4 * GiB - 1]) {
    assert.equal(walk(va), va);
  }
  assert.equal(mem.getU64(PDPTE_START + 4 * 8), 0n, "nothing above 4 GiB");
});

Deno.test("register dump: the reset-state note only where KVM resets the vCPU on a shutdown (SVM)", () => {
  // RIP 0xfff0 with CS selector 0xf000 is the reset state (Intel SDM vol. 3A, table 10-1).
  assert.equal(showsLostState(0xfff0n, 0xf000, { resetOnShutdown: true }), true);
  // VMX and kvm_pvm keep the registers at the fault: the same values are real there, no note.
  assert.equal(showsLostState(0xfff0n, 0xf000, { resetOnShutdown: false }), false);
  assert.equal(showsLostState(0xfff0n, 0xf000, {}), false);
  // Not the reset state: real registers on every host.
  assert.equal(showsLostState(0x1000000n, 0x8, { resetOnShutdown: true }), false);
  assert.equal(showsLostState(0xfff0n, 0x8, { resetOnShutdown: true }), false);
  assert.equal(showsLostState(0x1000n, 0xf000, { resetOnShutdown: true }), false);
});
