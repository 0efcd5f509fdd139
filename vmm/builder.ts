// Building a VM from a VmConfig: the user's files, guest memory, kernel and initrd, boot parameters,
// MP table and ACPI tables, the KVM VM and its vCPUs, and the devices (through the device manager).
// What it builds is a Machine, ready to start; on any error everything taken so far is released.

import { closeFd } from "../ffi/libc.ts";
import { KVM_CAP_TSC_DEADLINE_TIMER } from "../ffi/kvm.ts";
import { ConfigError, HostError } from "../core/exit.ts";
import type { VirtioDevice } from "../devices/virtio/device.ts";
import { virtioMmioCmdlineArgs, writeAcpiTables } from "./arch/acpi.ts";
import { isLinuxKernel } from "./arch/boot/kernel.ts";
import {
  setBootFpu,
  setBootMsrs,
  setBootRegisters,
  setCpuid,
  setLapicLints,
  vcpuCpuid,
  writeBootTables,
} from "./arch/cpu.ts";
import { MiB, SERIAL_PORTS, sharedMemoryAreaStart } from "./arch/layout.ts";
import { writeMpTable } from "./arch/mptable.ts";
import { newGenerationId, writeGenerationId } from "./arch/vmgenid.ts";
import { kernelCommandLine, type VmConfig } from "./config.ts";
import { HostIo } from "./device_manager/host_io.ts";
import type { GuestRequest } from "./device_manager/legacy.ts";
import { DeviceManager } from "./device_manager/manager.ts";
import { virtioMmioResources } from "./device_manager/mmio.ts";
import { createVirtioDevices } from "./device_manager/virtio_devices.ts";
import { releaseVcpuWorker, takeVcpuWorker } from "./kvm/worker_pool.ts";
import { Kvm, KvmVm, type VmHandle } from "./kvm/vm.ts";
import { emulatedGuestCode, emulatedKernelReason, type HostKind, kvmModule } from "./kvm/host.ts";
import { Machine } from "./machine.ts";
import { prepareBoot, writeBootParamsChecked } from "./validate.ts";
import { checkOutputsAreNotInputs, type NamedFile } from "./vm_files.ts";
import { checkVirtioDevices } from "./device_manager/virtio_devices.ts";
import type { VirtioMmioResource } from "./device_manager/mmio.ts";
import { OwnedGuestMemory } from "../core/memory.ts";
import { restoreVcpuState, vcpuStateCaps } from "./kvm/vcpu_state.ts";
import { readSnapshot, type Snapshot, SnapshotError } from "./snapshot/format.ts";
import { restoredConfig } from "./snapshot/config_match.ts";

export interface MachineOptions {
  /** Called with every byte a console serial port transmits (the library's console capture). */
  onConsoleOutput?: (bytes: Uint8Array) => void;
  /** Serve the test guests' debug exit port. */
  debugExit?: boolean;
  /** Do not read the process's stdin even when a serial port asks for it (library use). */
  noStdin?: boolean;
  /**
   * Build on this VM instead of opening /dev/kvm. Such a machine has devices, buses and guest memory
   * but no vCPUs: start() runs only its device side. Tests use it to drive the assembled devices as
   * a guest would.
   */
  vm?: VmHandle;
  /** One-line log messages (defaults to stderr). */
  log?: (line: string) => void;
  /** Called once when a console's stdout has lost its reader (EPIPE): `run` ends the VM (HostIoOptions). */
  onStdoutClosed?: () => void;
  /**
   * A Linux kernel on a host whose KVM emulates guest kernel code (kvm_pvm, vmm/kvm/host.ts): "warn"
   * logs one line saying so and boots it (the default: its first lines are still worth having),
   * "refuse" throws HostError with that line before any vCPU runs, "allow" boots it silently.
   */
  emulatedKernel?: "warn" | "refuse" | "allow";
}

/**
 * Create the VM's vCPUs with the CPUID the boot gives them; each is then set up by `setUp` (its boot state, or
 * its saved state on a restore).
 */
function createVcpus(
  kvm: Kvm,
  vm: VmHandle,
  cpus: number,
  fds: number[],
  setUp: (fd: number, id: number) => void,
): void {
  const supported = kvm.supportedCpuid();
  // kvm_pvm's instruction emulator lacks CMPXCHG16B and XSAVE/XRSTOR: do not offer them there.
  const hideCx16 = emulatedGuestCode(kvmModule());
  // Older kernels leave the TSC-deadline bit to the VMM; QEMU's and crosvm's guests have it.
  const tscDeadline = kvm.checkExtension(KVM_CAP_TSC_DEADLINE_TIMER) > 0;
  for (let id = 0; id < cpus; id++) {
    const fd = vm.createVcpu(id);
    fds.push(fd);
    setCpuid(fd, vcpuCpuid(supported, { apicId: id, cpuCount: cpus, hideCx16, hideXsave: hideCx16, tscDeadline }));
    setUp(fd, id);
  }
}

/** The boot state of vCPU `id`: MSRs, FPU, LAPIC LINTs, and the boot vCPU's registers at the kernel's entry. */
function bootVcpu(fd: number, id: number, entry: number, log: (line: string) => void): void {
  const refused = setBootMsrs(fd);
  if (refused.length > 0 && id === 0) log(`KVM refused boot MSRs ${refused.join(", ")}; continuing without them`);
  setBootFpu(fd);
  setLapicLints(fd);
  if (id === 0) setBootRegisters(fd, entry);
}

/** What MachineOptions.emulatedKernel asks for, when a Linux kernel meets a host that emulates its code. */
function checkEmulatedKernel(
  image: Uint8Array,
  kind: HostKind,
  policy: "warn" | "refuse" | "allow",
  log: (line: string) => void,
): void {
  const reason = emulatedKernelReason(kind);
  if (!reason || policy === "allow" || !isLinuxKernel(image)) return;
  if (policy === "refuse") {
    throw new HostError(
      `cannot boot a Linux kernel here: ${reason}; Vm.boot's allowEmulatedKernel: true boots it anyway`,
    );
  }
  log(`warning: ${reason}; booting it anyway`);
}

/** Build a VM ready to start. Throws ConfigError (exit 35) or HostError (exit 1). */
export async function buildMachine(config: VmConfig, opts: MachineOptions = {}): Promise<Machine> {
  // Everything that only needs the user's files is checked before KVM is opened (vmm/validate.ts, the
  // same checks as `run --print-config`), so bad input gets exit 35 on any host.
  const { memory, kernel, initrd, kernelImage, inputs } = await prepareBoot(config);
  return await assemble(config, opts, memory, inputs, {
    kind: "boot",
    writeFirmware: (cmdline, resources, serialPorts) => {
      const memBytes = config.memMiB * MiB;
      writeBootParamsChecked(memory, kernel, cmdline, initrd, memBytes);
      writeBootTables(memory);
      writeMpTable(memory, config.cpus);
      // Devices named on the command line are not also listed in the DSDT: Linux would probe them twice.
      const acpiVirtio = config.virtioMmioCmdline ? [] : resources;
      writeAcpiTables(memory, { cpus: config.cpus, virtioMmio: acpiVirtio, serial: serialPorts });
      writeGenerationId(memory, newGenerationId());
    },
    checkKernel: (kind, log) => checkEmulatedKernel(kernelImage, kind, opts.emulatedKernel ?? "warn", log),
    entry: kernel.entry,
  });
}

/** How assemble() fills the machine: a boot (firmware, kernel entry) or a restore (saved state). */
type Assembly =
  | {
    kind: "boot";
    writeFirmware: (
      cmdline: string,
      resources: VirtioMmioResource[],
      serialPorts: { base: number; irq: number }[],
    ) => void;
    checkKernel: (kind: HostKind, log: (line: string) => void) => void;
    entry: number;
  }
  | { kind: "restore"; snapshot: Snapshot };

/**
 * The VM around `memory`: the host ends of the consoles, the virtio devices, the KVM VM and its vCPUs, the
 * device manager; then the boot's firmware and entry, or the snapshot's saved state. On any error everything
 * taken so far (`memory` included) is released.
 */
async function assemble(
  config: VmConfig,
  opts: MachineOptions,
  memory: OwnedGuestMemory,
  inputs: Map<string, NamedFile>,
  how: Assembly,
): Promise<Machine> {
  const memBytes = config.memMiB * MiB;
  const log = opts.log ?? ((l) => console.error(`denovm: ${l}`));
  let kvm: Kvm | undefined;
  let vm: VmHandle | undefined;
  let virtio: VirtioDevice[] = [];
  let devices: DeviceManager | undefined;
  const vcpuFds: number[] = [];
  const hostIo = new HostIo(config.serials, {
    onConsoleOutput: opts.onConsoleOutput,
    noStdin: opts.noStdin,
    inputs,
    onStdoutClosed: opts.onStdoutClosed,
    log,
  });
  // The boot vCPU's Worker (a ready one from the pool, or a new one that loads on its own thread while this
  // one builds the VM); Machine.start() hands it its vCPU and takes the others' once the boot vCPU runs.
  const workers = opts.vm ? [] : [takeVcpuWorker()];
  try {
    const created = await createVirtioDevices(config, {
      serialOutput: (s) => hostIo.output(s),
      defaultVsockPath: `${config.socket ?? `/tmp/denovm-${Deno.pid}`}.vsock`,
      log,
    });
    virtio = created.devices;
    for (const c of created.consoles) await hostIo.attachInput(c.serial, (b) => c.device.sendInput(b));
    const resources = virtioMmioResources(virtio.length);
    const serialPorts = config.serials.filter((s) => s.hardware === "serial").map((s) => SERIAL_PORTS[s.num - 1]);
    const cmdline = kernelCommandLine(config, config.virtioMmioCmdline ? virtioMmioCmdlineArgs(resources) : []);
    if (how.kind === "boot") how.writeFirmware(cmdline, resources, serialPorts);

    if (opts.vm) {
      vm = opts.vm;
    } else {
      kvm = new Kvm();
      const max = kvm.maxVcpus;
      if (config.cpus > max) throw new ConfigError(`${config.cpus} vCPUs requested; this host's KVM allows ${max}`);
      if (how.kind === "boot") how.checkKernel(kvmModule(), log);
      vm = new KvmVm(kvm);
    }
    vm.addGuestMemory(memory);
    // The guest can make requests only once its vCPUs run, which is after the Machine exists.
    let onGuestRequest: (request: GuestRequest, reason: string) => void = () => {};
    devices = new DeviceManager({
      vm,
      memory,
      hostIo,
      sharedMemoryStart: sharedMemoryAreaStart(memBytes),
      onGuestRequest: (request, reason) => onGuestRequest(request, reason),
      log,
    });
    devices.agentPort = created.agentPort;
    await devices.addLegacy(config.serials);
    devices.addVirtio(virtio, resources);
    if (how.kind === "boot") {
      if (kvm) createVcpus(kvm, vm, config.cpus, vcpuFds, (fd, id) => bootVcpu(fd, id, how.entry, log));
    } else {
      const snap = how.snapshot;
      // The vCPUs exist (with their CPUID) before the in-kernel irqchip is restored, as Firecracker and QEMU
      // order it: restoring the IOAPIC delivers the interrupts its saved IRR holds, which with no vCPU to take
      // them would be lost. Each vCPU's state (its LAPIC among them) is restored between the irqchip and the
      // PIT (KvmVm.restoreState says why), then the devices, whose restored queues may interrupt the guest.
      if (kvm && snap.vcpus.length !== config.cpus) {
        throw new SnapshotError(`the snapshot holds ${snap.vcpus.length} vCPU states for ${config.cpus} vCPUs`);
      }
      if (kvm) createVcpus(kvm, vm, config.cpus, vcpuFds, () => {});
      const caps = kvm ? vcpuStateCaps(vm as KvmVm) : undefined;
      vm.restoreState(snap.vm, () => vcpuFds.forEach((fd, id) => restoreVcpuState(fd, snap.vcpus[id], caps)));
      devices.restoreState(snap.devices);
    }
    return new Machine(
      {
        config,
        kvm,
        vm,
        memory,
        cmdline,
        devices,
        vcpuFds,
        idleWorkers: workers,
        debugExit: opts.debugExit ?? false,
        log,
      },
      (handler) => onGuestRequest = handler,
    );
  } catch (e) {
    for (const w of workers) releaseVcpuWorker(w);
    // The device manager closes what it took over (devices on its buses, their fds, the host ends).
    const adopted = new Set<VirtioDevice>(devices?.virtio.map((v) => v.device) ?? []);
    for (const d of virtio) if (!adopted.has(d)) d.close?.();
    if (devices) devices.close();
    else hostIo.close();
    vcpuFds.forEach(closeFd);
    vm?.close();
    memory.close();
    kvm?.close();
    throw e;
  }
}

/** What a restore takes beside the snapshot directory. */
export interface RestoreOptions extends MachineOptions {
  /**
   * The configuration the user gave (a full command line): checked against the saved one (exit 35 naming the
   * first difference); its host-side resources (disk paths, serial outputs, socket, vsock path, taps) are used.
   */
  config?: VmConfig;
  /** Host-side resources to re-point without a full configuration (the library's overrides). */
  overrides?: Partial<VmConfig>;
}

/**
 * Build a VM from the snapshot in directory `dir` (vmm/snapshot/format.ts), ready to start: guest memory mapped
 * copy-on-write from the snapshot's memory file, the same devices with their saved state, the vCPUs and the
 * in-kernel irqchip, PIT and clock as they were, a new VM generation ID.
 */
export async function restoreMachine(dir: string, opts: RestoreOptions = {}): Promise<Machine> {
  const snapshot = readSnapshot(dir);
  const config = restoredConfig(snapshot.config, opts.config, opts.overrides);
  checkVirtioDevices(config);
  const inputs = checkOutputsAreNotInputs(config);
  const memory = OwnedGuestMemory.mapFile(
    snapshot.memoryPath,
    snapshot.memory.regions.map((r) => ({ start: r.guestBase, size: r.size })),
    snapshot.memory.regions.map((r) => r.fileOffset),
  );
  const machine = await assemble(config, opts, memory, inputs, { kind: "restore", snapshot });
  // A clone's own identity: a new generation ID, and the guest told (its interrupt waits in the restored
  // IOAPIC and local APIC until the vCPUs run).
  machine.changeGenerationId();
  return machine;
}
