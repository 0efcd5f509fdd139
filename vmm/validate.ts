// What a boot refuses before it opens KVM, in one place: `denovm run --print-config` and buildMachine
// (vmm/builder.ts) both go through `prepareBoot`, so the configuration that prints is the one that boots.
// It checks that every device asked for exists in this version (device_manager/virtio_devices.ts
// checkVirtioDevices) and that no output file is one of the VM's inputs (vm_files.ts), reads the kernel and
// initrd (regular files of a size that fits, read through core/host_file.ts), loads them into guest memory
// of the configured size, and checks the kernel command line against what crosvm and the kernel accept. Everything here is the user's
// error (ConfigError, exit 35); nothing needs /dev/kvm.

import { ConfigError } from "../core/exit.ts";
import { OwnedGuestMemory } from "../core/memory.ts";
import {
  GuestTooSmallError,
  initrdRoom,
  KernelFormatError,
  type KernelInfo,
  loadInitrd,
  loadKernel,
  writeBootParams,
} from "./arch/boot/kernel.ts";
import { hex } from "./arch/boot/errors.ts";
import { closeFd, O_RDONLY } from "../ffi/libc.ts";
import { openUserFile, readFd } from "../core/host_file.ts";
import { checkOutputsAreNotInputs, type NamedFile } from "./vm_files.ts";
import { MAX_VCPUS } from "./arch/cpu.ts";
import { ACPI_RSDP_START, e820Map, MiB, ramRanges } from "./arch/layout.ts";
import { kernelCommandLine, type VmConfig } from "./config.ts";
import { checkVirtioDevices } from "./device_manager/virtio_devices.ts";

/** The guest memory with the kernel and initrd loaded, ready for the boot parameters. */
export interface PreparedBoot {
  memory: OwnedGuestMemory;
  kernel: KernelInfo;
  initrd?: ReturnType<typeof loadInitrd>;
  /** The kernel file's bytes (to tell a Linux kernel from a test guest). */
  kernelImage: Uint8Array;
  /** The VM's input files by identity, for the outputs to check the files they open against. */
  inputs: Map<string, NamedFile>;
}

/**
 * The bytes of the user's `what` file (kernel, initrd): a regular file, checked on the opened fd, that is
 * not empty and passes `refuse` (its size → a reason to refuse it, or undefined) before a byte is read.
 */
function readUserFile(what: string, path: string, refuse: (size: number) => string | undefined): Uint8Array {
  let opened: { fd: number; info: Deno.FileInfo };
  try {
    opened = openUserFile(path, O_RDONLY, what, "regular");
  } catch (e) {
    if (e instanceof ConfigError) throw e;
    throw new ConfigError(`cannot read ${what} ${path}: ${(e as Error).message}`);
  }
  const { fd, info } = opened;
  try {
    if (info.size === 0) throw new ConfigError(`${what} ${path} is an empty file`);
    const reason = refuse(info.size);
    if (reason !== undefined) throw new ConfigError(reason);
    let bytes: Uint8Array;
    try {
      bytes = readFd(fd, info.size, path);
    } catch (e) {
      throw new ConfigError(`cannot read ${what} ${path}: ${(e as Error).message}`);
    }
    if (bytes.length === 0) throw new ConfigError(`${what} ${path} is an empty file`);
    return bytes;
  } finally {
    closeFd(fd);
  }
}

/** The largest kernel file read when guest RAM is smaller: room for an unstripped vmlinux's debug sections. */
const KERNEL_FILE_MAX_BYTES = 2 * 1024 * MiB;

/** A kernel_cmdline piece crosvm accepts: printable ASCII only (kernel_cmdline/src/kernel_cmdline.rs valid_str). */
const PRINTABLE_ASCII = /^[\x20-\x7e]*$/;

/**
 * Checks `config` as a boot does and loads the guest's kernel and initrd; the caller owns `memory`. It
 * settles as a promise, a refusal as a rejection.
 */
export function prepareBoot(config: VmConfig): Promise<PreparedBoot> {
  return new Promise((resolve) => resolve(prepareBootNow(config)));
}

function prepareBootNow(config: VmConfig): PreparedBoot {
  if (!Number.isInteger(config.cpus) || config.cpus < 1 || config.cpus > MAX_VCPUS) {
    throw new ConfigError(`invalid vCPU count ${config.cpus}: 1..${MAX_VCPUS}`);
  }
  for (const p of config.params) {
    if (!PRINTABLE_ASCII.test(p)) throw new ConfigError(`-p ${JSON.stringify(p)}: only printable ASCII is accepted`);
  }
  checkVirtioDevices(config);
  const inputs = checkOutputsAreNotInputs(config);
  const memBytes = config.memMiB * MiB;
  // The file's size is known before a byte of it is read. An unstripped ELF vmlinux carries debug sections
  // that are never loaded, so the file may exceed guest RAM; what is loaded is checked by the loader.
  const kernelFileMax = Math.max(memBytes, KERNEL_FILE_MAX_BYTES);
  const kernelImage = readUserFile(
    "kernel",
    config.kernel,
    (size) =>
      size > kernelFileMax
        ? `--mem ${config.memMiB} MiB is too small for kernel ${config.kernel}: the file is ${size} bytes, ` +
          `more than guest RAM (${memBytes} bytes) and than any kernel file denovm reads (${KERNEL_FILE_MAX_BYTES})`
        : undefined,
  );
  // A vhost-user back end (--vhost-user, or the virtiofsd of a --shared-dir) maps guest RAM itself: then it
  // is a memfd it can be handed.
  const memory = (config.vhostUser?.length ?? 0) > 0 || (config.sharedDirs?.length ?? 0) > 0
    ? OwnedGuestMemory.allocateShared(ramRanges(memBytes))
    : OwnedGuestMemory.allocate(ramRanges(memBytes));
  try {
    let kernel: KernelInfo;
    try {
      kernel = loadKernel(memory, kernelImage);
    } catch (e) {
      if (e instanceof KernelFormatError) throw new ConfigError(`kernel ${config.kernel}: ${e.message}`);
      if (e instanceof GuestTooSmallError) {
        throw new ConfigError(`--mem ${config.memMiB} MiB is too small for kernel ${config.kernel}: ${e.message}`);
      }
      throw e;
    }
    let initrd;
    if (config.initrd) {
      const below4g = ramRanges(memBytes)[0].size;
      const room = initrdRoom(kernel, below4g);
      // Where the initrd can go is known once the kernel is in place: an initrd larger than that is not read.
      const initrdImage = readUserFile("initrd", config.initrd, (size) => {
        if (size <= room.bytes) return undefined;
        const where = `at most ${room.bytes} fit between the kernel's end ${hex(room.start)} and ${hex(room.end)}`;
        return room.byRam
          ? `--mem ${config.memMiB} MiB is too small for initrd ${config.initrd}: the file is ${size} bytes, ${where}`
          : `initrd ${config.initrd} is too large for kernel ${config.kernel}: the file is ${size} bytes, ${where} ` +
            "(the kernel's initrd_addr_max)";
      });
      try {
        initrd = loadInitrd(memory, initrdImage, kernel, below4g);
      } catch (e) {
        if (e instanceof GuestTooSmallError) {
          throw new ConfigError(`--mem ${config.memMiB} MiB is too small for initrd ${config.initrd}: ${e.message}`);
        }
        throw e;
      }
    }
    // The command line as far as the configuration decides it; the builder writes it again with the
    // virtio-mmio arguments once the devices have their slots.
    writeBootParamsChecked(memory, kernel, kernelCommandLine(config), initrd, memBytes);
    return { memory, kernel, initrd, kernelImage, inputs };
  } catch (e) {
    memory.close();
    throw e;
  }
}

/** writeBootParams, with its refusals (a command line too long for the kernel) as the user's error. */
export function writeBootParamsChecked(
  memory: OwnedGuestMemory,
  kernel: KernelInfo,
  cmdline: string,
  initrd: PreparedBoot["initrd"],
  memBytes: number,
): void {
  try {
    writeBootParams(memory, { kernel, cmdline, initrd, e820: e820Map(memBytes), acpiRsdp: ACPI_RSDP_START });
  } catch (e) {
    if (e instanceof RangeError) throw new ConfigError(e.message);
    throw e;
  }
}

/** `run --print-config`'s check: everything prepareBoot refuses, with nothing kept. */
export async function validateVmConfig(config: VmConfig): Promise<void> {
  (await prepareBoot(config)).memory.close();
}
