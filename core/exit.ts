// denovm's process exit codes. They are crosvm's, so scripts written for crosvm read them the same way.
// Source: google/crosvm src/main.rs, `enum CommandStatus` (the values 0 and 32..36). crosvm exits with 1
// when a command fails for a reason that is not one of those (src/sys/linux/main.rs `error_to_exit_code` returns 1);
// denovm uses 1 the same way for host faults such as a missing /dev/kvm.

/** crosvm CommandStatus::SuccessOrVmStop: the command succeeded, or the VM was stopped. */
export const EXIT_SUCCESS = 0;
/** Generic failure of the host side (no /dev/kvm, a device backend that failed to start, ...). */
export const EXIT_HOST_ERROR = 1;
/** crosvm CommandStatus::VmReset: the guest asked for a reset (a reboot, or `panic=-1` after a panic). */
export const EXIT_VM_RESET = 32;
/** crosvm CommandStatus::VmCrash: the VM crashed (e.g. a vCPU hit an unrecoverable exit). */
export const EXIT_VM_CRASH = 33;
/** crosvm CommandStatus::GuestPanic: the guest kernel reported a panic (pvpanic). */
export const EXIT_GUEST_PANIC = 34;
/** crosvm CommandStatus::InvalidArgs: the command line (or --cfg file) was invalid. */
export const EXIT_INVALID_ARGS = 35;
/** crosvm CommandStatus::WatchdogReset: the vCPU stall watchdog fired. */
export const EXIT_WATCHDOG_RESET = 36;

/** A short description of an exit code, as crosvm logs it when it exits (CommandStatus::message). */
export function exitCodeMessage(code: number): string {
  switch (code) {
    case EXIT_SUCCESS:
      return "exiting with success";
    case EXIT_HOST_ERROR:
      return "exiting with error";
    case EXIT_VM_RESET:
      return "exiting with reset";
    case EXIT_VM_CRASH:
      return "exiting with crash";
    case EXIT_GUEST_PANIC:
      return "exiting with guest panic";
    case EXIT_INVALID_ARGS:
      return "invalid argument";
    case EXIT_WATCHDOG_RESET:
      return "exiting with watchdog reset";
    default:
      return `exiting with code ${code}`;
  }
}

/** An error whose kind decides the process's exit code (crosvm's CommandStatus). */
export class ExitCodeError extends Error {
  constructor(readonly exitCode: number, message: string) {
    super(message);
  }
}

/** Something the user asked for cannot be done as asked (a flag, a file, a device setting): crosvm exits 35. */
export class UsageError extends ExitCodeError {
  constructor(message: string) {
    super(EXIT_INVALID_ARGS, message);
    this.name = "UsageError";
  }
}

/** A fault of the host (no /dev/kvm, no permission, KVM too old): crosvm exits 1 for these. */
export class HostError extends ExitCodeError {
  constructor(message: string) {
    super(EXIT_HOST_ERROR, message);
    this.name = "HostError";
  }
}

/** The VM-ending codes that crosvm reports only with --extended-status (src/main.rs crosvm_main). */
const EXTENDED_STATUSES: readonly number[] = [EXIT_VM_RESET, EXIT_VM_CRASH, EXIT_GUEST_PANIC, EXIT_WATCHDOG_RESET];

/**
 * The process exit code for a VM that ended with `code`: crosvm exits 0 for every VM ending (stopped, reset,
 * crashed, panicked, watchdog) unless `--extended-status` was given; other codes (1) pass through.
 */
export function vmEndExitCode(code: number, extendedStatus: boolean): number {
  return !extendedStatus && EXTENDED_STATUSES.includes(code) ? EXIT_SUCCESS : code;
}

/** The exit code for a thrown error: its own when it carries one, else the host-error code 1. */
export function exitCodeFor(e: unknown): number {
  const c = (e as { exitCode?: unknown })?.exitCode;
  return typeof c === "number" ? c : EXIT_HOST_ERROR;
}

/** A problem with what the user asked for, found while building the VM (a file, a device setting): exit 35. */
export class ConfigError extends UsageError {
  constructor(message: string) {
    super(message);
    this.name = "ConfigError";
  }
}
