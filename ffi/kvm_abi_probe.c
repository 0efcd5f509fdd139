/* Prints the numbers ffi/kvm.ts must match, from the host's Linux headers. */
#include <stddef.h>
#include <stdio.h>
#include <linux/kvm.h>

#define P(name, val) printf("%s %llu\n", name, (unsigned long long)(val))
#define C(x) P(#x, x)
#define OFF(type, field) printf("%s.%s %zu\n", #type, #field, offsetof(struct type, field))

int main(void) {
  C(KVM_API_VERSION); C(KVM_GET_API_VERSION); C(KVM_CREATE_VM); C(KVM_CHECK_EXTENSION);
  C(KVM_GET_VCPU_MMAP_SIZE); C(KVM_GET_SUPPORTED_CPUID); C(KVM_CREATE_VCPU);
  C(KVM_SET_USER_MEMORY_REGION); C(KVM_SET_TSS_ADDR); C(KVM_SET_IDENTITY_MAP_ADDR);
  C(KVM_CREATE_IRQCHIP); C(KVM_IRQ_LINE); C(KVM_SET_GSI_ROUTING); C(KVM_IRQFD); C(KVM_CREATE_PIT2);
  C(KVM_IOEVENTFD); C(KVM_RUN); C(KVM_GET_REGS); C(KVM_SET_REGS); C(KVM_GET_SREGS); C(KVM_SET_SREGS);
  C(KVM_SET_MSRS); C(KVM_GET_FPU); C(KVM_SET_FPU); C(KVM_GET_LAPIC); C(KVM_SET_LAPIC); C(KVM_SET_CPUID2);
  C(KVM_GET_MP_STATE); C(KVM_SET_MP_STATE); C(KVM_SET_GUEST_DEBUG);
  C(KVM_GET_MSR_INDEX_LIST); C(KVM_GET_MSRS); C(KVM_GET_IRQCHIP); C(KVM_SET_IRQCHIP); C(KVM_GET_CLOCK);
  C(KVM_SET_CLOCK); C(KVM_GET_PIT2); C(KVM_SET_PIT2); C(KVM_GET_VCPU_EVENTS); C(KVM_SET_VCPU_EVENTS);
  C(KVM_GET_DEBUGREGS); C(KVM_SET_DEBUGREGS); C(KVM_GET_XSAVE); C(KVM_SET_XSAVE); C(KVM_GET_XCRS);
  C(KVM_SET_XCRS); C(KVM_GET_XSAVE2);
  C(KVM_CAP_MP_STATE); C(KVM_CAP_PIT_STATE2); C(KVM_CAP_ADJUST_CLOCK); C(KVM_CAP_VCPU_EVENTS);
  C(KVM_CAP_DEBUGREGS); C(KVM_CAP_XSAVE); C(KVM_CAP_XCRS); C(KVM_CAP_XSAVE2);
  C(KVM_IOAPIC_NUM_PINS); C(KVM_MAX_XCRS); C(KVM_CLOCK_TSC_STABLE); C(KVM_CLOCK_REALTIME); C(KVM_CLOCK_HOST_TSC);
  C(KVM_VCPUEVENT_VALID_NMI_PENDING); C(KVM_VCPUEVENT_VALID_SIPI_VECTOR); C(KVM_VCPUEVENT_VALID_SHADOW);
  C(KVM_VCPUEVENT_VALID_SMM);
  C(KVM_CAP_IRQCHIP); C(KVM_CAP_USER_MEMORY); C(KVM_CAP_SET_TSS_ADDR); C(KVM_CAP_NR_VCPUS);
  C(KVM_CAP_NR_MEMSLOTS); C(KVM_CAP_IRQFD); C(KVM_CAP_PIT2); C(KVM_CAP_IOEVENTFD); C(KVM_CAP_MAX_VCPUS);
  C(KVM_CAP_READONLY_MEM); C(KVM_CAP_IMMEDIATE_EXIT); C(KVM_CAP_SET_GUEST_DEBUG);
  C(KVM_GUESTDBG_ENABLE); C(KVM_GUESTDBG_SINGLESTEP); C(KVM_GUESTDBG_USE_SW_BP); C(KVM_GUESTDBG_USE_HW_BP);
  C(KVM_PIT_SPEAKER_DUMMY); C(KVM_MEM_READONLY); C(KVM_IRQFD_FLAG_DEASSIGN); C(KVM_IRQFD_FLAG_RESAMPLE);
  C(KVM_IOEVENTFD_FLAG_DATAMATCH); C(KVM_IOEVENTFD_FLAG_PIO); C(KVM_IOEVENTFD_FLAG_DEASSIGN);
  C(KVM_IRQ_ROUTING_IRQCHIP); C(KVM_IRQCHIP_PIC_MASTER); C(KVM_IRQCHIP_PIC_SLAVE); C(KVM_IRQCHIP_IOAPIC);
  C(KVM_MP_STATE_RUNNABLE); C(KVM_MP_STATE_UNINITIALIZED); C(KVM_MP_STATE_INIT_RECEIVED);
  C(KVM_MP_STATE_HALTED); C(KVM_MP_STATE_SIPI_RECEIVED);
  C(KVM_EXIT_UNKNOWN); C(KVM_EXIT_EXCEPTION); C(KVM_EXIT_IO); C(KVM_EXIT_HYPERCALL); C(KVM_EXIT_DEBUG);
  C(KVM_EXIT_HLT); C(KVM_EXIT_MMIO); C(KVM_EXIT_IRQ_WINDOW_OPEN); C(KVM_EXIT_SHUTDOWN); C(KVM_EXIT_FAIL_ENTRY);
  C(KVM_EXIT_INTR); C(KVM_EXIT_INTERNAL_ERROR); C(KVM_EXIT_SYSTEM_EVENT); C(KVM_EXIT_IO_IN); C(KVM_EXIT_IO_OUT);
  C(KVM_SYSTEM_EVENT_SHUTDOWN); C(KVM_SYSTEM_EVENT_RESET); C(KVM_SYSTEM_EVENT_CRASH);
  P("sizeof.kvm_userspace_memory_region", sizeof(struct kvm_userspace_memory_region));
  P("sizeof.kvm_pit_config", sizeof(struct kvm_pit_config));
  P("sizeof.kvm_irqfd", sizeof(struct kvm_irqfd));
  P("sizeof.kvm_ioeventfd", sizeof(struct kvm_ioeventfd));
  P("sizeof.kvm_irq_level", sizeof(struct kvm_irq_level));
  P("sizeof.kvm_regs", sizeof(struct kvm_regs));
  P("sizeof.kvm_sregs", sizeof(struct kvm_sregs));
  P("sizeof.kvm_fpu", sizeof(struct kvm_fpu));
  P("sizeof.kvm_lapic_state", sizeof(struct kvm_lapic_state));
  P("sizeof.kvm_mp_state", sizeof(struct kvm_mp_state));
  P("sizeof.kvm_msrs", sizeof(struct kvm_msrs));
  P("sizeof.kvm_msr_entry", sizeof(struct kvm_msr_entry));
  P("sizeof.kvm_cpuid2", sizeof(struct kvm_cpuid2));
  P("sizeof.kvm_cpuid_entry2", sizeof(struct kvm_cpuid_entry2));
  P("sizeof.kvm_irq_routing", sizeof(struct kvm_irq_routing));
  P("sizeof.kvm_irq_routing_entry", sizeof(struct kvm_irq_routing_entry));
  P("sizeof.kvm_segment", sizeof(struct kvm_segment));
  P("sizeof.kvm_guest_debug", sizeof(struct kvm_guest_debug));
  P("sizeof.kvm_debug_exit_arch", sizeof(struct kvm_debug_exit_arch));
  P("sizeof.kvm_msr_list", sizeof(struct kvm_msr_list));
  P("sizeof.kvm_xsave", sizeof(struct kvm_xsave));
  P("sizeof.kvm_xcrs", sizeof(struct kvm_xcrs));
  P("sizeof.kvm_xcr", sizeof(struct kvm_xcr));
  P("sizeof.kvm_vcpu_events", sizeof(struct kvm_vcpu_events));
  P("sizeof.kvm_debugregs", sizeof(struct kvm_debugregs));
  P("sizeof.kvm_irqchip", sizeof(struct kvm_irqchip));
  P("sizeof.kvm_pic_state", sizeof(struct kvm_pic_state));
  P("sizeof.kvm_ioapic_state", sizeof(struct kvm_ioapic_state));
  P("sizeof.kvm_pit_state2", sizeof(struct kvm_pit_state2));
  P("sizeof.kvm_pit_channel_state", sizeof(struct kvm_pit_channel_state));
  P("sizeof.kvm_clock_data", sizeof(struct kvm_clock_data));
  OFF(kvm_run, request_interrupt_window); OFF(kvm_run, immediate_exit); OFF(kvm_run, exit_reason);
  OFF(kvm_run, if_flag); OFF(kvm_run, io.direction); OFF(kvm_run, io.size); OFF(kvm_run, io.port);
  OFF(kvm_run, io.count); OFF(kvm_run, io.data_offset); OFF(kvm_run, mmio.phys_addr); OFF(kvm_run, mmio.data);
  OFF(kvm_run, mmio.len); OFF(kvm_run, mmio.is_write); OFF(kvm_run, fail_entry.hardware_entry_failure_reason);
  OFF(kvm_run, internal.suberror); OFF(kvm_run, internal.ndata); OFF(kvm_run, internal.data);
  OFF(kvm_run, system_event.type); OFF(kvm_run, debug.arch.exception); OFF(kvm_run, debug.arch.pc);
  OFF(kvm_run, debug.arch.dr6); OFF(kvm_run, debug.arch.dr7);
  OFF(kvm_guest_debug, control); OFF(kvm_guest_debug, arch.debugreg);
  P("count.kvm_guest_debug_arch.debugreg", sizeof(((struct kvm_guest_debug_arch *)0)->debugreg) / sizeof(__u64));
  OFF(kvm_segment, base); OFF(kvm_segment, limit); OFF(kvm_segment, selector); OFF(kvm_segment, type);
  OFF(kvm_segment, present); OFF(kvm_segment, dpl); OFF(kvm_segment, db); OFF(kvm_segment, s); OFF(kvm_segment, l);
  OFF(kvm_segment, g); OFF(kvm_segment, avl); OFF(kvm_segment, unusable);
  OFF(kvm_sregs, cs); OFF(kvm_sregs, ds); OFF(kvm_sregs, es); OFF(kvm_sregs, fs); OFF(kvm_sregs, gs);
  OFF(kvm_sregs, ss); OFF(kvm_sregs, tr); OFF(kvm_sregs, ldt); OFF(kvm_sregs, gdt); OFF(kvm_sregs, idt);
  OFF(kvm_sregs, cr0); OFF(kvm_sregs, cr2); OFF(kvm_sregs, cr3); OFF(kvm_sregs, cr4); OFF(kvm_sregs, cr8);
  OFF(kvm_sregs, efer); OFF(kvm_sregs, apic_base);
  OFF(kvm_dtable, base); OFF(kvm_dtable, limit);
  OFF(kvm_fpu, fcw); OFF(kvm_fpu, mxcsr);
  OFF(kvm_regs, rip); OFF(kvm_regs, rflags); OFF(kvm_regs, rsi); OFF(kvm_regs, r15);
  OFF(kvm_cpuid_entry2, function); OFF(kvm_cpuid_entry2, index); OFF(kvm_cpuid_entry2, flags);
  OFF(kvm_cpuid_entry2, eax); OFF(kvm_cpuid_entry2, ebx); OFF(kvm_cpuid_entry2, ecx); OFF(kvm_cpuid_entry2, edx);
  OFF(kvm_ioeventfd, datamatch); OFF(kvm_ioeventfd, addr); OFF(kvm_ioeventfd, len); OFF(kvm_ioeventfd, fd);
  OFF(kvm_ioeventfd, flags);
  OFF(kvm_irqfd, fd); OFF(kvm_irqfd, gsi); OFF(kvm_irqfd, flags); OFF(kvm_irqfd, resamplefd);
  OFF(kvm_irq_routing_entry, gsi); OFF(kvm_irq_routing_entry, type); OFF(kvm_irq_routing_entry, u.irqchip.irqchip);
  OFF(kvm_irq_routing_entry, u.irqchip.pin);
  OFF(kvm_userspace_memory_region, slot); OFF(kvm_userspace_memory_region, flags);
  OFF(kvm_userspace_memory_region, guest_phys_addr); OFF(kvm_userspace_memory_region, memory_size);
  OFF(kvm_userspace_memory_region, userspace_addr);
  OFF(kvm_msr_entry, index); OFF(kvm_msr_entry, data);
  OFF(kvm_msr_list, indices);
  OFF(kvm_irqchip, chip_id); OFF(kvm_irqchip, chip); OFF(kvm_ioapic_state, redirtbl);
  OFF(kvm_pit_state2, channels); OFF(kvm_pit_state2, flags);
  OFF(kvm_pit_channel_state, count); OFF(kvm_pit_channel_state, rw_mode); OFF(kvm_pit_channel_state, mode);
  OFF(kvm_pit_channel_state, gate); OFF(kvm_pit_channel_state, count_load_time);
  OFF(kvm_clock_data, clock); OFF(kvm_clock_data, flags); OFF(kvm_clock_data, realtime);
  OFF(kvm_clock_data, host_tsc);
  OFF(kvm_vcpu_events, nmi.pending); OFF(kvm_vcpu_events, nmi.masked); OFF(kvm_vcpu_events, sipi_vector); OFF(kvm_vcpu_events, flags);
  OFF(kvm_xcrs, nr_xcrs); OFF(kvm_xcrs, xcrs);
  return 0;
}
