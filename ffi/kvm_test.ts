// Checks every ioctl number, constant and struct layout in ffi/kvm.ts against the
// host's Linux headers, by compiling ffi/kvm_abi_probe.c with gcc. Runs without /dev/kvm.

import assert from "node:assert/strict";
import * as kvm from "./kvm.ts";

const here = new URL("./", import.meta.url).pathname;

async function headerValues(): Promise<Map<string, number>> {
  const exe = await Deno.makeTempFile({ prefix: "kvm_abi" });
  try {
    const cc = await new Deno.Command("gcc", { args: ["-o", exe, `${here}kvm_abi_probe.c`] }).output();
    assert.equal(cc.code, 0, new TextDecoder().decode(cc.stderr));
    const out = await new Deno.Command(exe).output();
    assert.equal(out.code, 0);
    const map = new Map<string, number>();
    for (const line of new TextDecoder().decode(out.stdout).trim().split("\n")) {
      const [k, v] = line.split(" ");
      map.set(k, Number(v));
    }
    return map;
  } finally {
    await Deno.remove(exe);
  }
}

Deno.test("ffi/kvm.ts matches <linux/kvm.h>: ioctl numbers, capabilities, exits, flags", async () => {
  const h = await headerValues();
  const ours = kvm as unknown as Record<string, unknown>;
  let checked = 0;
  for (const [name, value] of h) {
    if (name.includes(".")) continue;
    assert.ok(name in ours, `ffi/kvm.ts lacks ${name}`);
    assert.equal(ours[name], value, `${name}: ours ${ours[name]}, header ${value}`);
    checked++;
  }
  assert.ok(checked > 70, `only ${checked} constants checked`);
});

Deno.test("ffi/kvm.ts matches <linux/kvm.h>: struct sizes and field offsets", async () => {
  const h = await headerValues();
  const expect: [string, number][] = [
    ["sizeof.kvm_userspace_memory_region", kvm.KVM_USERSPACE_MEMORY_REGION_SIZE],
    ["sizeof.kvm_pit_config", kvm.KVM_PIT_CONFIG_SIZE],
    ["sizeof.kvm_irqfd", kvm.KVM_IRQFD_SIZE],
    ["sizeof.kvm_ioeventfd", kvm.KVM_IOEVENTFD_SIZE],
    ["sizeof.kvm_irq_level", kvm.KVM_IRQ_LEVEL_SIZE],
    ["sizeof.kvm_regs", kvm.KVM_REGS_SIZE],
    ["sizeof.kvm_sregs", kvm.KVM_SREGS_SIZE],
    ["sizeof.kvm_fpu", kvm.KVM_FPU_SIZE],
    ["sizeof.kvm_lapic_state", kvm.KVM_LAPIC_STATE_SIZE],
    ["sizeof.kvm_mp_state", kvm.KVM_MP_STATE_SIZE],
    ["sizeof.kvm_msrs", kvm.KVM_MSRS_HEADER_SIZE],
    ["sizeof.kvm_msr_entry", kvm.KVM_MSR_ENTRY_SIZE],
    ["sizeof.kvm_cpuid2", kvm.KVM_CPUID2_HEADER_SIZE],
    ["sizeof.kvm_cpuid_entry2", kvm.KVM_CPUID_ENTRY2_SIZE],
    ["sizeof.kvm_irq_routing", kvm.KVM_IRQ_ROUTING_HEADER_SIZE],
    ["sizeof.kvm_irq_routing_entry", kvm.KVM_IRQ_ROUTING_ENTRY_SIZE],
    ["sizeof.kvm_segment", kvm.KVM_SEGMENT_SIZE],
    ["sizeof.kvm_guest_debug", kvm.KVM_GUEST_DEBUG_SIZE],
    ["sizeof.kvm_debug_exit_arch", kvm.RUN_DEBUG_DR7 + 8 - kvm.RUN_DEBUG_EXCEPTION],
    ["sizeof.kvm_msr_list", kvm.KVM_MSR_LIST_HEADER_SIZE],
    ["sizeof.kvm_xsave", kvm.KVM_XSAVE_SIZE],
    ["sizeof.kvm_xcrs", kvm.KVM_XCRS_SIZE],
    ["sizeof.kvm_xcr", kvm.KVM_XCR_SIZE],
    ["sizeof.kvm_vcpu_events", kvm.KVM_VCPU_EVENTS_SIZE],
    ["sizeof.kvm_debugregs", kvm.KVM_DEBUGREGS_SIZE],
    ["sizeof.kvm_irqchip", kvm.KVM_IRQCHIP_SIZE],
    ["sizeof.kvm_pic_state", kvm.KVM_PIC_STATE_SIZE],
    ["sizeof.kvm_ioapic_state", kvm.KVM_IOAPIC_STATE_SIZE],
    ["sizeof.kvm_pit_state2", kvm.KVM_PIT_STATE2_SIZE],
    ["sizeof.kvm_pit_channel_state", kvm.KVM_PIT_CHANNEL_STATE_SIZE],
    ["sizeof.kvm_clock_data", kvm.KVM_CLOCK_DATA_SIZE],
    ["kvm_msr_list.indices", kvm.MSR_LIST_INDICES],
    ["kvm_irqchip.chip_id", kvm.IRQCHIP_CHIP_ID],
    ["kvm_irqchip.chip", kvm.IRQCHIP_CHIP],
    ["kvm_ioapic_state.redirtbl", kvm.IOAPIC_REDIRTBL],
    ["kvm_pit_state2.channels", kvm.PIT_STATE2_CHANNELS],
    ["kvm_pit_state2.flags", kvm.PIT_STATE2_FLAGS],
    ["kvm_pit_channel_state.count", kvm.PIT_CHANNEL_COUNT],
    ["kvm_pit_channel_state.rw_mode", kvm.PIT_CHANNEL_RW_MODE],
    ["kvm_pit_channel_state.mode", kvm.PIT_CHANNEL_MODE],
    ["kvm_pit_channel_state.gate", kvm.PIT_CHANNEL_GATE],
    ["kvm_pit_channel_state.count_load_time", kvm.PIT_CHANNEL_COUNT_LOAD_TIME],
    ["kvm_clock_data.clock", kvm.CLOCK_DATA_CLOCK],
    ["kvm_clock_data.flags", kvm.CLOCK_DATA_FLAGS],
    ["kvm_clock_data.realtime", kvm.CLOCK_DATA_REALTIME],
    ["kvm_clock_data.host_tsc", kvm.CLOCK_DATA_HOST_TSC],
    ["kvm_vcpu_events.nmi.pending", kvm.VCPU_EVENTS_NMI_PENDING],
    ["kvm_vcpu_events.nmi.masked", kvm.VCPU_EVENTS_NMI_MASKED],
    ["kvm_vcpu_events.sipi_vector", kvm.VCPU_EVENTS_SIPI_VECTOR],
    ["kvm_vcpu_events.flags", kvm.VCPU_EVENTS_FLAGS],
    ["kvm_xcrs.nr_xcrs", kvm.XCRS_NR_XCRS],
    ["kvm_xcrs.xcrs", kvm.XCRS_XCRS],
    ["kvm_guest_debug.control", kvm.GUEST_DEBUG_CONTROL],
    ["kvm_guest_debug.arch.debugreg", kvm.GUEST_DEBUG_DEBUGREG],
    ["count.kvm_guest_debug_arch.debugreg", kvm.GUEST_DEBUG_REGISTERS],
    ["kvm_run.debug.arch.exception", kvm.RUN_DEBUG_EXCEPTION],
    ["kvm_run.debug.arch.pc", kvm.RUN_DEBUG_PC],
    ["kvm_run.debug.arch.dr6", kvm.RUN_DEBUG_DR6],
    ["kvm_run.debug.arch.dr7", kvm.RUN_DEBUG_DR7],
    ["kvm_run.request_interrupt_window", kvm.RUN_REQUEST_INTERRUPT_WINDOW],
    ["kvm_run.immediate_exit", kvm.RUN_IMMEDIATE_EXIT],
    ["kvm_run.exit_reason", kvm.RUN_EXIT_REASON],
    ["kvm_run.if_flag", kvm.RUN_IF_FLAG],
    ["kvm_run.io.direction", kvm.RUN_IO_DIRECTION],
    ["kvm_run.io.size", kvm.RUN_IO_SIZE],
    ["kvm_run.io.port", kvm.RUN_IO_PORT],
    ["kvm_run.io.count", kvm.RUN_IO_COUNT],
    ["kvm_run.io.data_offset", kvm.RUN_IO_DATA_OFFSET],
    ["kvm_run.mmio.phys_addr", kvm.RUN_MMIO_PHYS_ADDR],
    ["kvm_run.mmio.data", kvm.RUN_MMIO_DATA],
    ["kvm_run.mmio.len", kvm.RUN_MMIO_LEN],
    ["kvm_run.mmio.is_write", kvm.RUN_MMIO_IS_WRITE],
    ["kvm_run.fail_entry.hardware_entry_failure_reason", kvm.RUN_FAIL_ENTRY_REASON],
    ["kvm_run.internal.suberror", kvm.RUN_INTERNAL_SUBERROR],
    ["kvm_run.internal.ndata", kvm.RUN_INTERNAL_NDATA],
    ["kvm_run.internal.data", kvm.RUN_INTERNAL_DATA],
    ["kvm_run.system_event.type", kvm.RUN_SYSTEM_EVENT_TYPE],
    ["kvm_segment.base", kvm.SEG_BASE],
    ["kvm_segment.limit", kvm.SEG_LIMIT],
    ["kvm_segment.selector", kvm.SEG_SELECTOR],
    ["kvm_segment.type", kvm.SEG_TYPE],
    ["kvm_segment.present", kvm.SEG_PRESENT],
    ["kvm_segment.dpl", kvm.SEG_DPL],
    ["kvm_segment.db", kvm.SEG_DB],
    ["kvm_segment.s", kvm.SEG_S],
    ["kvm_segment.l", kvm.SEG_L],
    ["kvm_segment.g", kvm.SEG_G],
    ["kvm_segment.avl", kvm.SEG_AVL],
    ["kvm_segment.unusable", kvm.SEG_UNUSABLE],
    ...kvm.SREGS_SEGMENTS.map((s) => [`kvm_sregs.${s}`, kvm.sregsSegmentOffset(s)] as [string, number]),
    ["kvm_sregs.gdt", kvm.SREGS_GDT],
    ["kvm_sregs.idt", kvm.SREGS_IDT],
    ["kvm_sregs.cr0", kvm.SREGS_CR0],
    ["kvm_sregs.cr2", kvm.SREGS_CR2],
    ["kvm_sregs.cr3", kvm.SREGS_CR3],
    ["kvm_sregs.cr4", kvm.SREGS_CR4],
    ["kvm_sregs.cr8", kvm.SREGS_CR8],
    ["kvm_sregs.efer", kvm.SREGS_EFER],
    ["kvm_sregs.apic_base", kvm.SREGS_APIC_BASE],
    ["kvm_dtable.base", kvm.DTABLE_BASE],
    ["kvm_dtable.limit", kvm.DTABLE_LIMIT],
    ["kvm_fpu.fcw", kvm.FPU_FCW],
    ["kvm_fpu.mxcsr", kvm.FPU_MXCSR],
    ["kvm_regs.rip", kvm.regOffset("rip")],
    ["kvm_regs.rflags", kvm.regOffset("rflags")],
    ["kvm_regs.rsi", kvm.regOffset("rsi")],
    ["kvm_regs.r15", kvm.regOffset("r15")],
    ["kvm_cpuid_entry2.function", kvm.CPUID_FUNCTION],
    ["kvm_cpuid_entry2.index", kvm.CPUID_INDEX],
    ["kvm_cpuid_entry2.flags", kvm.CPUID_FLAGS],
    ["kvm_cpuid_entry2.eax", kvm.CPUID_EAX],
    ["kvm_cpuid_entry2.ebx", kvm.CPUID_EBX],
    ["kvm_cpuid_entry2.ecx", kvm.CPUID_ECX],
    ["kvm_cpuid_entry2.edx", kvm.CPUID_EDX],
  ];
  for (const [name, value] of expect) {
    assert.ok(h.has(name), `header program lacks ${name}`);
    assert.equal(value, h.get(name), `${name}: ours ${value}, header ${h.get(name)}`);
  }
  // The struct builders put fields where the header says.
  const io = new DataView(kvm.ioeventfdStruct(0x1234, 4, 7, kvm.KVM_IOEVENTFD_FLAG_DATAMATCH, 3n).buffer);
  assert.equal(io.getBigUint64(h.get("kvm_ioeventfd.datamatch")!, true), 3n);
  assert.equal(io.getBigUint64(h.get("kvm_ioeventfd.addr")!, true), 0x1234n);
  assert.equal(io.getUint32(h.get("kvm_ioeventfd.len")!, true), 4);
  assert.equal(io.getInt32(h.get("kvm_ioeventfd.fd")!, true), 7);
  assert.equal(io.getUint32(h.get("kvm_ioeventfd.flags")!, true), kvm.KVM_IOEVENTFD_FLAG_DATAMATCH);
  const irq = new DataView(kvm.irqfdStruct(9, 5, 2, 11).buffer);
  assert.deepEqual(
    ["fd", "gsi", "flags", "resamplefd"].map((f) => irq.getUint32(h.get(`kvm_irqfd.${f}`)!, true)),
    [9, 5, 2, 11],
  );
  const mr = new DataView(kvm.memoryRegion(3, 2, 0x100000, 0x2000, 0xabcdefn).buffer);
  assert.equal(mr.getUint32(h.get("kvm_userspace_memory_region.slot")!, true), 3);
  assert.equal(mr.getUint32(h.get("kvm_userspace_memory_region.flags")!, true), 2);
  assert.equal(mr.getBigUint64(h.get("kvm_userspace_memory_region.guest_phys_addr")!, true), 0x100000n);
  assert.equal(mr.getBigUint64(h.get("kvm_userspace_memory_region.memory_size")!, true), 0x2000n);
  assert.equal(mr.getBigUint64(h.get("kvm_userspace_memory_region.userspace_addr")!, true), 0xabcdefn);
  const rt = new DataView(kvm.irqRoutingStruct([{ gsi: 2, chip: 2, pin: 2 }]).buffer);
  const base = kvm.KVM_IRQ_ROUTING_HEADER_SIZE;
  assert.equal(rt.getUint32(base + h.get("kvm_irq_routing_entry.gsi")!, true), 2);
  assert.equal(rt.getUint32(base + h.get("kvm_irq_routing_entry.type")!, true), kvm.KVM_IRQ_ROUTING_IRQCHIP);
  assert.equal(rt.getUint32(base + h.get("kvm_irq_routing_entry.u.irqchip.irqchip")!, true), 2);
  assert.equal(rt.getUint32(base + h.get("kvm_irq_routing_entry.u.irqchip.pin")!, true), 2);
  const gd = new DataView(
    kvm.guestDebugStruct(kvm.KVM_GUESTDBG_ENABLE, [0x1000n, 0n, 0n, 0n, 0n, 0n, 0n, 0x402n]).buffer,
  );
  assert.equal(gd.getUint32(h.get("kvm_guest_debug.control")!, true), kvm.KVM_GUESTDBG_ENABLE);
  assert.equal(gd.getBigUint64(h.get("kvm_guest_debug.arch.debugreg")!, true), 0x1000n);
  assert.equal(gd.getBigUint64(h.get("kvm_guest_debug.arch.debugreg")! + 8 * kvm.GUEST_DEBUG_DR7_INDEX, true), 0x402n);
  const ms = new DataView(kvm.msrsStruct([[0x10, 5n]]).buffer);
  assert.equal(ms.getUint32(kvm.KVM_MSRS_HEADER_SIZE + h.get("kvm_msr_entry.index")!, true), 0x10);
  assert.equal(ms.getBigUint64(kvm.KVM_MSRS_HEADER_SIZE + h.get("kvm_msr_entry.data")!, true), 5n);
});

Deno.test("ffi/kvm.ts: every ioctl request has a distinct number and a name for error messages", () => {
  const ours = kvm as unknown as Record<string, unknown>;
  const requests = Object.entries(ours).filter(([k, v]) =>
    /^KVM_(GET|SET|CREATE|CHECK|RUN|IRQ|IOEVENTFD)/.test(k) && typeof v === "number" && v >= kvm.KVMIO << 8
  );
  assert.ok(requests.length > 45, `only ${requests.length} requests found`);
  for (const [name, value] of requests) assert.equal(kvm.IOCTL_NAMES[value as number], name, name);
});
