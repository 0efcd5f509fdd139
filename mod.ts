// denovm as a library: boot a VM from the same config the CLI builds, watch and
// type on its console, pause, resume, stop, and read how it ended; snapshot it,
// restore it, clone fresh VMs from a template.
//
//   await using vm = await Vm.boot({ kernel: "bzImage", params: ["console=ttyS0"] });
//   await vm.console.waitFor(/login:/, { timeout: 60_000 });
//   vm.console.send("root\n");
//   console.log(await vm.stop());

export {
  type BootConfig,
  type LibraryOptions,
  type RestoreConfig,
  type RestoreOverrides,
  type TemplateOptions,
  Vm,
  VmInput,
  type VmInputDevice,
  type VmSnapshotOptions,
  VmTemplate,
} from "./vmm/library/vm.ts";
export { ConsoleTimeoutError } from "./vmm/library/console_log.ts";
export { RemoteInput } from "./vmm/library/input_remote.ts";
export {
  closeIdleVcpuWorkers,
  IDLE_VCPU_WORKERS_MAX,
  prewarmVcpuWorkers,
  type VcpuWorkerPoolStats,
  vcpuWorkerPoolStats,
} from "./vmm/kvm/worker_pool.ts";
export type { VmConfig } from "./vmm/config.ts";
export { defaultVmConfig, gpuConfig, kernelCommandLine } from "./vmm/config.ts";
export {
  ConfigError,
  EXIT_GUEST_PANIC,
  EXIT_HOST_ERROR,
  EXIT_INVALID_ARGS,
  EXIT_SUCCESS,
  EXIT_VM_CRASH,
  EXIT_VM_RESET,
  HostError,
} from "./core/exit.ts";
export { compareImages, decodePng, pixel } from "./vmm/library/screen.ts";
export type { CompareOptions, Image, Region } from "./vmm/library/screen.ts";
