// What a boot refuses before it opens KVM, in one place: `denovm run --print-config` and buildMachine
// (vmm/builder.ts) both go through `prepareBoot`, so the configuration that prints is the one that boots.
// It reads the kernel and initrd, loads them into guest memory of the configured size, checks the kernel
// command line against what crosvm and the kernel accept, and checks that every device asked for exists in
// this version (device_manager/virtio_devices.ts checkVirtioDevices). Everything here is the user's
// error (ConfigError, exit 35); nothing needs /dev/kvm.

import { ConfigError } from "../core/exit.ts";
import { OwnedGuestMemory } from "../core/memory.ts";
import {
  GuestTooSmallError,
  KernelFormatError,
  type KernelInfo,
  loadInitrd,
  loadKernel,
  writeBootParams,
} from "./arch/boot/kernel.ts";
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
}

async function readUserFile(what: string, path: string): Promise<Uint8Array> {
  let bytes: Uint8Array;
  try {
    bytes = await Deno.readFile(path);
  } catch (e) {
    throw new ConfigError(`cannot read ${what} ${path}: ${(e as Error).message}`);
  }
  if (bytes.length === 0) throw new ConfigError(`${what} ${path} is an empty file`);
  return bytes;
}

/** A kernel_cmdline piece crosvm accepts: printable ASCII only (kernel_cmdline/src/kernel_cmdline.rs valid_str). */
const PRINTABLE_ASCII = /^[\x20-\x7e]*$/;

/** Checks `config` as a boot does and loads the guest's kernel and initrd; the caller owns `memory`. */
export async function prepareBoot(config: VmConfig): Promise<PreparedBoot> {
  if (!Number.isInteger(config.cpus) || config.cpus < 1 || config.cpus > MAX_VCPUS) {
    throw new ConfigError(`invalid vCPU count ${config.cpus}: 1..${MAX_VCPUS}`);
  }
  for (const p of config.params) {
    if (!PRINTABLE_ASCII.test(p)) throw new ConfigError(`-p ${JSON.stringify(p)}: only printable ASCII is accepted`);
  }
  checkVirtioDevices(config);
  const kernelImage = await readUserFile("kernel", config.kernel);
  const initrdImage = config.initrd ? await readUserFile("initrd", config.initrd) : undefined;
  const memBytes = config.memMiB * MiB;
  const memory = OwnedGuestMemory.allocate(ramRanges(memBytes));
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
    if (initrdImage) {
      try {
        const below4g = ramRanges(memBytes)[0].size;
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
    return { memory, kernel, initrd, kernelImage };
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
