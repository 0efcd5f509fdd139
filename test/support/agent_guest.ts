// Debian's Linux 6.1 with the default initramfs (scripts/initramfs.sh) and the guest agent under denovm's
// library Vm: booted until its init reports ready, and shell commands run through the agent (denovm's
// Vm.exec, or an AgentClient of another VMM's guest). Used by the nested Linux tests and by the benchmarks
// that drive such a guest.

import assert from "node:assert/strict";
import { type BootConfig, Vm } from "../../mod.ts";
import { debianKernel } from "./kernel.ts";
import { defaultInitramfs } from "./default_guest.ts";

/** What the default initramfs's init prints once the agent runs. */
export const AGENT_GUEST_READY = /^DENOVM-INIT-OK\s*$/m;
/** Hang guards (the nested host runs guests at TCG speed); no assertion is about time. */
export const AGENT_GUEST_BOOT_TIMEOUT_MS = 300_000;
export const AGENT_GUEST_SH_TIMEOUT_MS = 120_000;

/**
 * Debian's kernel with the default initramfs and the agent on one vCPU, `extra` giving its memory and devices;
 * resolves once the init reports ready (the VM stopped if it does not within `bootTimeoutMs`).
 */
export async function bootAgentGuest(
  extra: Partial<BootConfig> & { memMiB: number },
  bootTimeoutMs = AGENT_GUEST_BOOT_TIMEOUT_MS,
): Promise<Vm> {
  const kernel = await debianKernel();
  const vm = await Vm.boot({
    kernel: kernel.vmlinux,
    initrd: await defaultInitramfs(),
    params: ["console=ttyS0"],
    cpus: 1,
    agent: true,
    ...extra,
  });
  try {
    await vm.console.waitFor(AGENT_GUEST_READY, { timeout: bootTimeoutMs });
  } catch (e) {
    await vm.stop().catch(() => {});
    throw e;
  }
  return vm;
}

/** What runs a command through a guest agent: a Vm booted with the agent, or an AgentClient. */
export interface AgentExecutor {
  exec(cmd: string[], opts: { timeout: number }): Promise<{ code: number; stdout: string; stderr: string }>;
}

/** Runs `cmd` with sh in the guest; its stdout, or an assertion error with its exit code and output. */
export async function guestSh(
  guest: AgentExecutor,
  cmd: string,
  timeoutMs = AGENT_GUEST_SH_TIMEOUT_MS,
): Promise<string> {
  const r = await guest.exec(["sh", "-c", cmd], { timeout: timeoutMs });
  assert.equal(r.code, 0, `${cmd}: exit ${r.code}: ${r.stderr.trim()}\n${r.stdout}`);
  return r.stdout;
}
