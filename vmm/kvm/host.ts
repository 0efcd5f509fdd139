// What runs the guest on this host: which KVM module serves /dev/kvm, or none.
//
// The kinds behave differently where a VMM can see it:
// - kvm_pvm: KVM without hardware virtualization (the host is itself a VM); guest kernel-mode code is
//   emulated, slowly, by an emulator that lacks some instructions (docs/testing.md). It cannot run an
//   unmodified Linux kernel in useful time; the nested KVM host (scripts/nested-kvm.sh) can.
// - kvm_amd (SVM): on a triple fault KVM re-initializes the vCPU before userspace sees the exit
//   (arch/x86/kvm/svm/svm.c, shutdown_interception: the VMCB is undefined after a SHUTDOWN
//   intercept), so the registers read afterwards are the reset state, not the state at the fault.
// - kvm_intel (VMX): a triple fault only sets KVM_EXIT_SHUTDOWN (arch/x86/kvm/vmx/vmx.c,
//   handle_triple_fault); the vCPU keeps its registers. kvm_pvm behaves the same way.
//
// Everything is read through the C library of ffi/libc.ts, so the fake KVM (test/support/fake_kvm.c,
// loaded as that library) can report itself as any kind: it answers the opens of the KVM device and of
// /sys/module/<module> (DENOVM_FAKE_KVM_MODULE). Nothing is cached: a test process may switch kinds.

import { KVM_GET_API_VERSION, kvmIoctlInt } from "../../ffi/kvm.ts";
import { closeFd, O_RDONLY, O_RDWR, openFile } from "../../ffi/libc.ts";
import { KVM_DEVICE } from "./vm.ts";

/** The KVM modules that can serve /dev/kvm on x86_64, in the order they are looked for. */
export const KVM_MODULES = ["kvm_pvm", "kvm_amd", "kvm_intel"] as const;
export type KvmModule = typeof KVM_MODULES[number];
/** What runs the guest: a KVM module, or "none" when /dev/kvm does not open. */
export type HostKind = KvmModule | "none";

/** Where loaded (and built-in, parameterized) modules appear (Documentation/ABI/stable/sysfs-module). */
const SYS_MODULE = "/sys/module";
/** /proc/cpuinfo's flags for hardware virtualization: AMD SVM, Intel VMX. */
const CPU_FLAG_SVM = "svm";
const CPU_FLAG_VMX = "vmx";

/** The KVM device denovm opens: $DENOVM_KVM_DEVICE, else /dev/kvm. */
export function kvmDevicePath(): string {
  return Deno.env.get("DENOVM_KVM_DEVICE") ?? KVM_DEVICE;
}

function opens(path: string, flags: number): boolean {
  try {
    closeFd(openFile(path, flags));
    return true;
  } catch {
    return false;
  }
}

/** True when `path` opens read-write and answers KVM_GET_API_VERSION: a KVM device this process may use. */
function kvmOpens(path: string): boolean {
  let fd: number;
  try {
    fd = openFile(path, O_RDWR);
  } catch {
    return false;
  }
  try {
    kvmIoctlInt(fd, KVM_GET_API_VERSION);
    return true;
  } catch {
    return false;
  } finally {
    closeFd(fd);
  }
}

/**
 * The module serving /dev/kvm, for a caller that has it open already (the builder, a vCPU Worker).
 * Without any of the three under /sys/module (a kernel whose KVM is built in without parameters), the
 * CPU's own flags decide: SVM means kvm_amd, VMX kvm_intel, neither a software KVM like kvm_pvm.
 */
export function kvmModule(): KvmModule {
  for (const m of KVM_MODULES) if (opens(`${SYS_MODULE}/${m}`, O_RDONLY)) return m;
  let flags: string[] = [];
  try {
    flags = /^flags\s*:(.*)$/m.exec(Deno.readTextFileSync("/proc/cpuinfo"))?.[1].trim().split(/\s+/) ?? [];
  } catch {
    // no /proc: no flags
  }
  if (flags.includes(CPU_FLAG_SVM)) return "kvm_amd";
  if (flags.includes(CPU_FLAG_VMX)) return "kvm_intel";
  return "kvm_pvm";
}

/** What runs the guest on this host: "none" when the KVM device does not open as one, else its module. */
export function hostKind(): HostKind {
  return kvmOpens(kvmDevicePath()) ? kvmModule() : "none";
}

/** True where KVM resets a vCPU on a triple fault before userspace can read its registers (SVM). */
export function shutdownResetsVcpu(kind: HostKind = kvmModule()): boolean {
  return kind === "kvm_amd";
}

/** True where guest kernel code is emulated, not run, so CPUID must hide what the emulator lacks. */
export function emulatedGuestCode(kind: HostKind): boolean {
  return kind === "kvm_pvm";
}

/**
 * Why this host cannot run an unmodified Linux kernel in useful time, with the way out, or undefined
 * where it can. One line.
 */
export function emulatedKernelReason(kind: HostKind): string | undefined {
  if (kind !== "kvm_pvm") return undefined;
  return "this host's KVM is kvm_pvm (no hardware virtualization): it emulates a Linux kernel's code, " +
    "which takes minutes and stops on instructions its emulator lacks; " +
    "run it in the nested KVM host instead (scripts/nested-kvm.sh -- COMMAND)";
}
