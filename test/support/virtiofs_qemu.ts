// The reference virtio-fs machine: Debian's 6.1 kernel with the default initramfs (scripts/initramfs.sh,
// which loads fuse and virtiofs) under bookworm-backports' QEMU 10 (TCG, microvm with ACPI), whose own
// vhost-user-fs front end (`vhost-user-fs-device` on virtio-mmio) connects to a virtiofsd that denovm's
// vmm/virtiofsd.ts started. Guest RAM is a shared memfd so that virtiofsd can map it. The guest is driven
// through the guest agent on a virtio-serial port (vmm/library/agent_client.ts), as
// test/qemu/default_guest_agent_test.ts does. Used by test/qemu/virtiofs_test.ts and, as the reference
// denovm is compared against, by bench/fs.ts.

import { AGENT_PORT_NAME, AgentClient, connTransport } from "../../vmm/library/agent_client.ts";
import { debianKernel } from "./kernel.ts";
import { backportsQemu, connectToChardev, QEMU_KERNEL_ARGS, type QemuBuild, qemuHasDevice } from "./qemu.ts";
import { BUSYBOX, ConsoleProcess, exists } from "./guest_process.ts";
import { defaultInitramfs, which } from "./default_guest.ts";
import { virtiofsdUnavailable } from "./virtiofsd.ts";
import { startVirtiofsd, type VirtiofsdProcess } from "../../vmm/virtiofsd.ts";
import type { SharedDirConfig } from "../../vmm/config.ts";

/** Guards against a hung guest or QEMU (not timing assertions). */
export const VIRTIOFS_QEMU_HANG_GUARD_MS = 600_000;
const READY_GUARD_MS = 300_000;

/** Why the QEMU virtio-fs machine cannot run here, or undefined. */
export async function virtiofsQemuUnavailable(): Promise<{ reason?: string; qemu?: QemuBuild }> {
  if (Deno.build.os !== "linux" || Deno.build.arch !== "x86_64") return { reason: "needs x86_64 Linux" };
  const noVirtiofsd = virtiofsdUnavailable();
  if (noVirtiofsd) return { reason: noVirtiofsd };
  if (!exists(BUSYBOX)) return { reason: `${BUSYBOX} missing (apt-get install busybox-static)` };
  for (const tool of ["cpio", "gcc", "objcopy"]) {
    if (!which(tool)) return { reason: `${tool} missing (needed by scripts/initramfs.sh)` };
  }
  let qemu: QemuBuild;
  try {
    await debianKernel();
    qemu = await backportsQemu();
  } catch (e) {
    return { reason: (e as Error).message.split("\n")[0] };
  }
  if (!qemuHasDevice(qemu, "vhost-user-fs-device")) {
    return { reason: `QEMU ${qemu.version} has no vhost-user-fs-device` };
  }
  return { qemu };
}

export interface VirtiofsQemuMachine {
  client: AgentClient;
  qemu: ConsoleProcess;
  virtiofsd: VirtiofsdProcess;
  /** Power the guest off (through the agent) and stop everything; idempotent. */
  close(): Promise<void>;
}

/**
 * Boot the machine with `share` served as virtio-fs; resolves once the guest agent answers. `runtimeDir`
 * holds the sockets (virtiofsd's and the agent's).
 */
export async function startVirtiofsQemu(opts: {
  qemu: QemuBuild;
  share: SharedDirConfig;
  runtimeDir: string;
  memMiB?: number;
  /** "tcg" (default) or "kvm" (bench/fs.ts in the nested KVM host, beside denovm on the same KVM). */
  accel?: "tcg" | "kvm";
  log?: (line: string) => void;
}): Promise<VirtiofsQemuMachine> {
  const k = await debianKernel();
  const initrd = await defaultInitramfs();
  const mem = opts.memMiB ?? 512;
  const virtiofsd = await startVirtiofsd(opts.share, { runtimeDir: opts.runtimeDir, log: opts.log });
  const agentSock = `${opts.runtimeDir}/agent.sock`;
  const args = [
    ...(opts.qemu.firmwareDir ? ["-L", opts.qemu.firmwareDir, "-L", "/usr/share/seabios"] : []),
    // microvm with ACPI: the Debian kernel finds the virtio-mmio transports in the DSDT. Guest RAM is a
    // shared memfd: virtiofsd maps it.
    ...["-M", "microvm,acpi=on,pit=on,pic=on,rtc=on,memory-backend=mem"],
    ...(opts.accel === "kvm" ? ["-accel", "kvm", "-cpu", "host"] : ["-accel", "tcg", "-cpu", "max"]),
    ...["-m", `${mem}M`, "-smp", "1", "-object", `memory-backend-memfd,id=mem,size=${mem}M,share=on`],
    ...["-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none", "-serial", "stdio"],
    "-no-reboot",
    ...["-global", "virtio-mmio.force-legacy=false"],
    ...["-kernel", k.vmlinuz, "-initrd", initrd, "-append", QEMU_KERNEL_ARGS.join(" ")],
    ...["-chardev", `socket,id=fs,path=${virtiofsd.socketPath}`],
    ...["-device", `vhost-user-fs-device,chardev=fs,tag=${opts.share.tag}`],
    ...["-device", "virtio-serial-device"],
    ...["-chardev", `socket,id=agent,path=${agentSock},server=on,wait=off`],
    ...["-device", `virtserialport,chardev=agent,name=${AGENT_PORT_NAME}`],
  ];
  const child = new Deno.Command(opts.qemu.binary, {
    args,
    env: opts.qemu.env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const qemu = new ConsoleProcess(child, { label: "QEMU", hangGuardMs: VIRTIOFS_QEMU_HANG_GUARD_MS });
  let transport: ReturnType<typeof connTransport> | undefined;
  let client: AgentClient | undefined;
  let closed: Promise<void> | undefined;
  const close = () =>
    closed ??= (async () => {
      if (client) {
        client.exec("poweroff -f").catch(() => {});
        const timer = setTimeout(() => qemu.kill(), 60_000);
        await qemu.done;
        clearTimeout(timer);
      }
      client?.close("QEMU exited");
      transport?.close();
      qemu.kill();
      await qemu.done;
      await virtiofsd.stop();
    })();
  try {
    transport = connTransport(await connectToChardev(agentSock, qemu));
    client = new AgentClient(transport);
    await Promise.race([
      client.ready({ timeout: READY_GUARD_MS }),
      qemu.done.then((r) => {
        throw new Error(`QEMU exited (code ${r.code}) before the agent said hello:\n${r.output}`);
      }),
    ]);
  } catch (e) {
    await close();
    throw e;
  }
  return { client, qemu, virtiofsd, close };
}
