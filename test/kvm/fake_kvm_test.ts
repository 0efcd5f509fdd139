// denovm's KVM-facing code run end to end on a fake /dev/kvm (test/support/fake_kvm.c), on any host.
//
// The fake is a shared object loaded as denovm's libc (DENOVM_LIBC): it answers the KVM ioctls,
// records what the VMM asked for in a JSON-lines log, and plays a scripted guest on vCPU 0. So the
// real code paths run: Kvm/KvmVm set-up (vmm/kvm/vm.ts), vCPU state (vmm/arch/cpu.ts), the vCPU Workers and their
// channel (vmm/kvm/vcpu.ts, vmm/kvm/vcpu_worker.ts), Machine start/stop/pause/resume and exit codes
// (vmm/machine.ts), the CLI (main.ts) and the library (mod.ts). What a real KVM would do with the
// state (run the guest) is what the tests with /dev/kvm check (test/kvm/boot_test.ts and others).

import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { buildFakeKvm, fakeKvmEnv, type FakeKvmEvent, readFakeKvmLog } from "../support/fake_kvm.ts";
import { buildGuest } from "../guests/build.ts";
import { type DebianKernel, debianKernel } from "../support/kernel.ts";
import { parseRunArgs } from "../../vmm/cli/run.ts";
import { kernelCommandLine } from "../../vmm/config.ts";
import { loadKernel } from "../../vmm/arch/boot/kernel.ts";
import { OwnedGuestMemory } from "../../core/memory.ts";
import * as KVM from "../../ffi/kvm.ts";
import { APIC_LVT_LINT0, APIC_LVT_LINT1, KVM_IOEVENTFD_FLAG_DATAMATCH, KVM_MEM_READONLY } from "../../ffi/kvm.ts";
import {
  e820Map,
  KVM_IDENTITY_MAP_START,
  KVM_TSS_START,
  MiB,
  PML4_START,
  ramRanges,
  SERIAL_PORTS,
  VIRTIO_IRQS,
  VIRTIO_MMIO_START,
  ZERO_PAGE_START,
} from "../../vmm/arch/layout.ts";
import { VIRTIO_MMIO_QUEUE_NOTIFY } from "../../devices/virtio/mmio.ts";
import {
  EXIT_GUEST_PANIC,
  EXIT_HOST_ERROR,
  EXIT_INVALID_ARGS,
  EXIT_SUCCESS,
  EXIT_VM_CRASH,
  EXIT_VM_RESET,
  HostError,
} from "../../core/exit.ts";
import { RESET_STATE_NOTE } from "../../vmm/arch/cpu.ts";
import { within as withinMs } from "../support/within.ts";
import { listenSeqpacket } from "../../core/unix_socket.ts";
import { closeFd } from "../../ffi/libc.ts";
import { Kvm, KvmVm } from "../../vmm/kvm/vm.ts";
import { saveVcpuState, snapshotMsrs, vcpuStateCaps } from "../../vmm/kvm/vcpu_state.ts";
import {
  bootVcpu,
  checkBadRecords,
  checkVcpuRoundTrip,
  checkVmRoundTrip,
  fields,
  MSR_IA32_TSC,
  Opened,
} from "../support/kvm_state.ts";

const MAIN_TS = fileURLToPath(new URL("../../main.ts", import.meta.url));
/** Hang protection only: every scenario here ends in well under a second of guest time. */
const HANG_GUARD_MS = 60_000;
/** Default guest RAM of the CLI and the library (vmm/config.ts DEFAULT_MEM_MIB). */
const DEFAULT_MEM_BYTES = 256 * MiB;

// Control register and EFER bits (Intel SDM vol. 3A, 2.5 and 2.2.1), as vmm/arch/cpu.ts sets them.
const X86_CR0_PE = 0x1;
const X86_CR0_PG = 0x80000000;
const X86_CR4_PAE = 0x20;
const EFER_LME = 0x100;
const EFER_LMA = 0x400;
/** Local APIC LVT delivery mode, bits 10..8 (Intel SDM vol. 3A, 11.5.1): ExtINT 7, NMI 4. */
const lvtMode = (v: number) => (v >> 8) & 0x7;
const APIC_MODE_EXTINT = 7;
const APIC_MODE_NMI = 4;
/** CPUID leaf 1 EBX bits 31..24: initial APIC id (Intel SDM vol. 2A). */
const leaf1ApicId = (ebx: number) => ebx >>> 24;
/** The boot MSRs vmm/arch/cpu.ts sets (Linux msr-index.h): SYSENTER_CS, LSTAR, MISC_ENABLE, MTRRdefType. */
const MSR_IA32_SYSENTER_CS = 0x174;
const MSR_LSTAR = 0xc0000082;
const MSR_IA32_MISC_ENABLE = 0x1a0;
const MSR_MTRR_DEF_TYPE = 0x2ff;
/** virtio device ids (virtio 1.2, 5): block. */
const VIRTIO_ID_BLOCK = 2;

const shim = await buildFakeKvm();
// This process's libc (ffi/libc.ts, opened on first use) is the fake from here on, for the library
// tests below; nothing in this file calls libc() before this line.
for (const [k, v] of Object.entries(fakeKvmEnv(shim, "halt", ""))) Deno.env.set(k, v);
const guest = await buildGuest("boot_info");
const entry = kernelEntry(await Deno.readFile(guest));

let debian: DebianKernel | undefined;
try {
  debian = await debianKernel();
} catch (e) {
  console.log(`fake_kvm_test: Debian kernel boot-protocol runs skipped: ${(e as Error).message}`);
}

/** The entry point denovm's loader finds in `image` (what RIP must be). */
function kernelEntry(image: Uint8Array): number {
  const mem = OwnedGuestMemory.allocate(ramRanges(DEFAULT_MEM_BYTES));
  try {
    return loadKernel(mem, image).entry;
  } finally {
    mem.close();
  }
}

async function tempLog(): Promise<string> {
  return await Deno.makeTempFile({ prefix: "fake-kvm-", suffix: ".jsonl" });
}

const of = (events: FakeKvmEvent[], ev: string) => events.filter((e) => e.ev === ev);

interface CliRun {
  code: number;
  stdout: string;
  stderr: string;
  events: FakeKvmEvent[];
}

/** `denovm run ARGS` as a subprocess on the fake KVM playing `script`. */
async function runCli(
  script: string,
  args: string[],
  env: Record<string, string> = {},
  globalArgs: string[] = [],
): Promise<CliRun> {
  const log = await tempLog();
  try {
    const cmd = new Deno.Command(Deno.execPath(), {
      args: ["run", "--allow-all", MAIN_TS, ...globalArgs, "run", ...args],
      env: { ...fakeKvmEnv(shim, script, log), ...env },
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    });
    const child = cmd.spawn();
    const timer = setTimeout(() => child.kill("SIGKILL"), HANG_GUARD_MS);
    const out = await child.output();
    clearTimeout(timer);
    const dec = new TextDecoder();
    return {
      code: out.code,
      stdout: dec.decode(out.stdout),
      stderr: dec.decode(out.stderr),
      events: await readFakeKvmLog(log),
    };
  } finally {
    await Deno.remove(log);
  }
}

/** Checks the boot state the fake recorded for vCPU 0 of a one-vCPU VM with `mem` bytes of RAM. */
function assertBootState(events: FakeKvmEvent[], rip: number, mem = DEFAULT_MEM_BYTES): void {
  assert.equal(of(events, "open").length, 1);
  assert.deepEqual(of(events, "tss_addr").map((e) => e.addr), [KVM_TSS_START]);
  assert.deepEqual(of(events, "identity_map_addr").map((e) => e.addr), [KVM_IDENTITY_MAP_START]);
  assert.equal(of(events, "create_irqchip").length, 1);
  assert.equal(of(events, "create_pit2").length, 1);
  assert.equal(of(events, "gsi_routing")[0].gsi0_ioapic_pin, 2, "the PIT (GSI 0) reaches IOAPIC pin 2");
  // One memory slot per RAM range, at its guest address, none read-only.
  const ram = of(events, "memslot").filter((e) => ((e.flags as number) & KVM_MEM_READONLY) === 0);
  assert.deepEqual(
    ram.map((e) => ({ start: e.guest, size: e.size })),
    ramRanges(mem),
  );
  // Host addresses agree with guest addresses modulo 2 MiB, so KVM can map the RAM with large pages.
  for (const e of ram) {
    assert.equal((e.host as number) % (2 * 1024 * 1024), (e.guest as number) % (2 * 1024 * 1024), JSON.stringify(e));
  }
  const regs = of(events, "set_regs");
  assert.deepEqual(regs.map((e) => e.vcpu), [0], "boot registers are set on vCPU 0 only");
  assert.equal(regs[0].rip, rip);
  assert.equal(regs[0].rsi, ZERO_PAGE_START);
  const sregs = of(events, "set_sregs");
  assert.deepEqual(sregs.map((e) => e.vcpu), [0]);
  const s = sregs[0] as Record<string, number>;
  assert.equal(s.cr3, PML4_START);
  assert.equal(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE | X86_CR0_PG);
  assert.equal(s.cr4 & X86_CR4_PAE, X86_CR4_PAE);
  assert.equal(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
  assert.equal(s.cs, 0x8);
  assert.equal(s.cs_l, 1);
  // Every fd the VMM got from KVM was closed at the end.
  assert.equal(of(events, "close_system").length, 1);
  assert.equal(of(events, "close_vm").length, 1);
  assert.equal(of(events, "close_vcpu").length, of(events, "create_vcpu").length);
}

// ---- (a) the CLI ----

Deno.test("fake KVM, CLI: boot protocol — the guest reads back exactly the command line and e820 map denovm wrote", async () => {
  const args = ["-p", "hello=1", guest];
  const r = await runCli("boot", args);
  assert.equal(r.code, EXIT_SUCCESS, r.stderr);
  const cmdline = kernelCommandLine(parseRunArgs(args).config);
  assert.equal(r.stdout, `${cmdline}\ne820=${e820Map(DEFAULT_MEM_BYTES).length}\n`);
  assert.equal(of(r.events, "boot_params")[0].cmdline, cmdline);
  assertBootState(r.events, entry);
  // The supported CPUID did not fit in 64 entries: the VMM grew the buffer after E2BIG.
  const cpuid = of(r.events, "supported_cpuid");
  assert.equal(cpuid[0].result, "E2BIG");
  assert.equal(cpuid.at(-1)!.result, undefined);
  assert.equal(of(r.events, "set_cpuid")[0].nent, cpuid.at(-1)!.nent);
  // COM1's interrupt is an irqfd (the vCPU worker serving the UART raises it); the default virtio
  // devices (rng, balloon) have an irqfd each and an ioeventfd per queue.
  const irqfds = of(r.events, "irqfd").map((e) => e.gsi);
  assert.equal(irqfds[0], SERIAL_PORTS[0].irq);
  assert.deepEqual(irqfds.slice(1), VIRTIO_IRQS.slice(0, irqfds.length - 1));
  assert.ok(irqfds.length >= 2);
  for (const e of of(r.events, "ioeventfd")) {
    assert.equal((e.addr as number) % 0x1000, VIRTIO_MMIO_QUEUE_NOTIFY);
    assert.equal((e.flags as number) & KVM_IOEVENTFD_FLAG_DATAMATCH, KVM_IOEVENTFD_FLAG_DATAMATCH);
  }
});

for (const [name, which] of [["vmlinuz (bzImage)", "vmlinuz"], ["vmlinux (ELF)", "vmlinux"]] as const) {
  Deno.test({
    name: `fake KVM, CLI: Debian's ${name} gets the boot protocol right (entry, zero page, command line)`,
    ignore: !debian,
    async fn() {
      const kernel = debian![which];
      const args = ["--mem", "512", "-p", "quiet", kernel];
      const r = await runCli("boot", args);
      assert.equal(r.code, EXIT_SUCCESS, r.stderr);
      assert.equal(
        r.stdout,
        `${kernelCommandLine(parseRunArgs(args).config)}\ne820=${e820Map(512 * MiB).length}\n`,
      );
      assertBootState(r.events, kernelEntry(await Deno.readFile(kernel)), 512 * MiB);
    },
  });
}

const CLI_EXITS: [script: string, code: number, stderr?: RegExp][] = [
  ["reset", EXIT_VM_RESET],
  ["panic", EXIT_GUEST_PANIC],
  ["poweroff", EXIT_SUCCESS],
  ["triple", EXIT_VM_CRASH, new RegExp(`triple fault[^]*rip=0x0*${entry.toString(16)} `)],
  ["internal", EXIT_VM_CRASH, /KVM internal error, suberror 1 \[0xfa4e 0x[0-9a-f]+\][^]*rip=0x/],
  ["sysevent-reset", EXIT_VM_RESET],
  ["sysevent-shutdown", EXIT_SUCCESS],
  ["sysevent-crash", EXIT_VM_CRASH, /system event crash[^]*cr3=0x0*9000/],
  ["fail-entry", EXIT_VM_CRASH, /VM entry failed, reason 0x80000021/],
  ["unknown-exit", EXIT_VM_CRASH, /unexpected exit reason 1\b/],
  ["run-error", EXIT_VM_CRASH, /KVM_RUN: Bad address/],
];

for (const [script, code, stderr] of CLI_EXITS) {
  Deno.test(`fake KVM, CLI: guest "${script}" → exit code ${code} with --extended-status`, async () => {
    // Two vCPUs: however vCPU 0 ends the VM, the AP (blocked in KVM_RUN) must be kicked out too.
    const r = await runCli(script, ["--cpus", "2", guest], {}, ["--extended-status"]);
    assert.equal(r.code, code, `stdout:\n${r.stdout}\nstderr:\n${r.stderr}`);
    if (stderr) assert.match(r.stderr, stderr);
    // However it ended, the VMM closed every KVM fd and unmapped every run page.
    assert.equal(of(r.events, "close_vm").length, 1);
    const closes = of(r.events, "close_vcpu");
    assert.deepEqual(closes.map((e) => [e.vcpu, e.still_mapped]), [[0, 0], [1, 0]]);
  });
}

Deno.test("fake KVM, CLI: a host end that cannot be opened exits 1 with one line naming the option", async () => {
  const missing = "/nonexistent-denovm-dir";
  const serial = await runCli("poweroff", ["--serial", `type=file,path=${missing}/com1.log`, guest]);
  assert.equal(serial.code, EXIT_HOST_ERROR, serial.stderr);
  const serialLines = serial.stderr.trim().split("\n");
  assert.equal(serialLines.length, 1, serial.stderr);
  assert.match(serialLines[0], /^denovm: --serial num=1: cannot open \/nonexistent-denovm-dir\/com1\.log/);
  const socket = await runCli("poweroff", ["-s", `${missing}/vm.sock`, guest]);
  assert.equal(socket.code, EXIT_HOST_ERROR, socket.stderr);
  const socketLines = socket.stderr.trim().split("\n");
  assert.equal(socketLines.length, 1, socket.stderr);
  assert.match(socketLines[0], /^denovm: --socket \/nonexistent-denovm-dir\/vm\.sock: cannot listen/);
});

Deno.test("fake KVM, CLI: -s on a socket another VM listens on exits 35 with one line and leaves it alone", async () => {
  const dir = await Deno.makeTempDir({ prefix: "denovm-live-sock-" });
  const path = `${dir}/vm.sock`;
  const live = listenSeqpacket(path, 8); // never accepts: connects still succeed into its backlog
  try {
    const ino = Deno.lstatSync(path).ino;
    const r = await runCli("poweroff", ["-s", path, guest]);
    assert.equal(r.code, EXIT_INVALID_ARGS, r.stderr);
    const lines = r.stderr.trim().split("\n");
    assert.equal(lines.length, 1, r.stderr);
    assert.equal(lines[0], `denovm: control socket ${path} is in use by a running VM`);
    assert.equal(Deno.lstatSync(path).ino, ino, "the live socket file was replaced or removed");
  } finally {
    closeFd(live);
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("fake KVM, CLI: without --extended-status every VM ending exits 0, as crosvm's does", async () => {
  for (const [script] of CLI_EXITS.filter(([, code]) => code !== EXIT_SUCCESS).slice(0, 3)) {
    const r = await runCli(script, [guest]);
    assert.equal(r.code, EXIT_SUCCESS, `${script}: stdout:\n${r.stdout}\nstderr:\n${r.stderr}`);
  }
  // The exit-code mapping leaves errors alone: a bad argument is 35 either way.
  assert.equal((await runCli("poweroff", ["--cpus", "0", guest])).code, EXIT_INVALID_ARGS);
});

Deno.test("fake KVM, CLI: a string I/O exit (rep outsb, count > 1) delivers every byte", async () => {
  const r = await runCli("string-io", [guest]);
  assert.equal(r.code, EXIT_SUCCESS, r.stderr);
  assert.equal(r.stdout, "rep outsb ok\n");
});

Deno.test("fake KVM, CLI: HLT and interrupt-window exits are re-entered, not fatal", async () => {
  const r = await runCli("hlt", [guest]);
  assert.equal(r.code, EXIT_SUCCESS, r.stderr);
  assert.equal(r.stdout, "re-entered 6 times\n");
});

Deno.test("fake KVM, CLI: a KVM without immediate_exit is a host error (exit 1) naming it", async () => {
  const KVM_CAP_IMMEDIATE_EXIT = 136; // linux/kvm.h
  const r = await runCli("poweroff", [guest], { DENOVM_FAKE_KVM_NO_CAP: String(KVM_CAP_IMMEDIATE_EXIT) });
  assert.equal(r.code, EXIT_HOST_ERROR);
  assert.match(r.stderr, /KVM lacks a capability denovm needs: immediate_exit/);
  assert.equal(of(r.events, "create_vm").length, 0);
  assert.equal(of(r.events, "close_system").length, 1, "the /dev/kvm fd was closed");
});

for (const request of ["KVM_CREATE_PIT2", "KVM_SET_GSI_ROUTING", "KVM_SET_CPUID2", "KVM_SET_LAPIC"] as const) {
  Deno.test(`fake KVM, CLI: a failing ${request} is a host error naming it, and every KVM fd is closed`, async () => {
    const r = await runCli("poweroff", ["--cpus", "2", guest], { DENOVM_FAKE_KVM_FAIL_IOCTL: String(KVM[request]) });
    assert.equal(r.code, EXIT_HOST_ERROR, r.stderr);
    assert.match(r.stderr, new RegExp(`${request}: Cannot allocate memory`));
    assert.equal(of(r.events, "failed_ioctl").length, 1);
    assert.equal(of(r.events, "close_system").length, 1, "the /dev/kvm fd was closed");
    assert.equal(of(r.events, "close_vm").length, of(r.events, "create_vm").length, "the VM fd was closed");
  });
}

Deno.test({
  name: "fake KVM, CLI: a failing KVM_SET_CPUID2 leaves no vCPU fd open",
  async fn() {
    const r = await runCli("poweroff", ["--cpus", "2", guest], {
      DENOVM_FAKE_KVM_FAIL_IOCTL: String(KVM.KVM_SET_CPUID2),
    });
    assert.equal(r.code, EXIT_HOST_ERROR, r.stderr);
    assert.equal(of(r.events, "close_vcpu").length, of(r.events, "create_vcpu").length, "every vCPU fd was closed");
  },
});

Deno.test("fake KVM, CLI: more vCPUs than KVM_CAP_MAX_VCPUS is an invalid-arguments exit", async () => {
  const r = await runCli("poweroff", ["--cpus", "9", guest]);
  assert.equal(r.code, EXIT_INVALID_ARGS);
  assert.match(r.stderr, /9 vCPUs requested; this host's KVM allows 8/);
});

Deno.test("fake KVM, CLI: an MSR KVM refuses is logged once and the others are still set", async () => {
  const r = await runCli("poweroff", ["--cpus", "2", guest], {
    DENOVM_FAKE_KVM_REFUSE_MSR: String(MSR_IA32_MISC_ENABLE),
  });
  assert.equal(r.code, EXIT_SUCCESS, r.stderr);
  assert.equal(r.stderr.match(/KVM refused boot MSRs 0x1a0; continuing without them/g)?.length, 1, r.stderr);
  for (const vcpu of [0, 1]) {
    const calls = of(r.events, "set_msrs").filter((e) => e.vcpu === vcpu);
    const set = calls.flatMap((e) => e.msrs as [number, number][]).map(([i]) => i);
    assert.ok(!set.includes(MSR_IA32_MISC_ENABLE));
    assert.ok(set.includes(MSR_MTRR_DEF_TYPE), "the MSR after the refused one was set on its own");
  }
});

// ---- (b)-(f) the library, in this process ----
// This process's libc is the fake (set at the top); mod.ts is loaded only now so that no module
// evaluation can open libc before that.
const { Vm, closeIdleVcpuWorkers, vcpuWorkerPoolStats } = await import("../../mod.ts");
type BootConfig = Parameters<typeof Vm.boot>[0];

/** Boot the library on the fake playing `script`; returns the VM and its log path. */
// ---- Each kind of host KVM (vmm/kvm/host.ts), played by the fake (DENOVM_FAKE_KVM_MODULE) ----

/** CPUID leaf 1 ECX bit 13: CMPXCHG16B (Intel SDM vol. 2A, table 3-10), which kvm_pvm's emulator lacks. */
const LEAF1_ECX_CX16 = 1 << 13;

for (const kind of ["kvm_pvm", "kvm_amd", "kvm_intel"] as const) {
  Deno.test(`fake KVM as ${kind}, CLI: a triple fault's register dump, and CPUID's CMPXCHG16B`, async () => {
    const r = await runCli("triple", [guest], { DENOVM_FAKE_KVM_MODULE: kind }, ["--extended-status"]);
    assert.equal(r.code, EXIT_VM_CRASH, r.stderr);
    if (kind === "kvm_amd") {
      // KVM on SVM resets the vCPU on the shutdown intercept (the fake does too): the dump says so.
      assert.match(r.stderr, /triple fault[^]*rip=0x0*fff0 /);
      assert.ok(r.stderr.includes(RESET_STATE_NOTE), r.stderr);
    } else {
      // VMX and kvm_pvm keep the registers at the fault: the real RIP, no note.
      assert.match(r.stderr, new RegExp(`triple fault[^]*rip=0x0*${entry.toString(16)} `));
      assert.ok(!r.stderr.includes(RESET_STATE_NOTE), r.stderr);
    }
    // Only where guest code is emulated (kvm_pvm) does CPUID hide what the emulator lacks.
    const ecx = of(r.events, "set_cpuid")[0].leaf1_ecx as number;
    assert.equal((ecx & LEAF1_ECX_CX16) !== 0, kind !== "kvm_pvm", `leaf 1 ECX 0x${ecx.toString(16)}`);
  });
}

/** The one warning line `denovm run` prints for a Linux kernel on a kvm_pvm host. */
const EMULATED_KERNEL_WARNING = /^denovm: warning: this host's KVM is kvm_pvm .*scripts\/nested-kvm\.sh.*$/m;

Deno.test({
  name:
    "fake KVM as kvm_pvm, CLI: a Linux kernel gets one warning line naming the reason and the nested host, and boots",
  ignore: !debian,
  async fn() {
    for (const kernel of [debian!.vmlinux, debian!.vmlinuz]) {
      const r = await runCli("boot", ["--mem", "512", kernel], { DENOVM_FAKE_KVM_MODULE: "kvm_pvm" });
      assert.equal(r.code, EXIT_SUCCESS, r.stderr);
      assert.equal(r.stderr.match(new RegExp(EMULATED_KERNEL_WARNING, "gm"))?.length, 1, r.stderr);
      assert.match(r.stdout, /^e820=/m, "it went on and booted");
    }
  },
});

Deno.test({
  name: "fake KVM, CLI: no such warning for a test guest on kvm_pvm, nor for Linux on kvm_amd or kvm_intel",
  ignore: !debian,
  async fn() {
    const runs = [
      await runCli("boot", [guest], { DENOVM_FAKE_KVM_MODULE: "kvm_pvm" }),
      await runCli("boot", ["--mem", "512", debian!.vmlinux], { DENOVM_FAKE_KVM_MODULE: "kvm_amd" }),
      await runCli("boot", ["--mem", "512", debian!.vmlinux], { DENOVM_FAKE_KVM_MODULE: "kvm_intel" }),
    ];
    for (const r of runs) {
      assert.equal(r.code, EXIT_SUCCESS, r.stderr);
      assert.doesNotMatch(r.stderr, /warning/, r.stderr);
    }
  },
});

async function bootFake(script: string, config: Omit<BootConfig, "kernel">) {
  const log = await tempLog();
  Deno.env.set("DENOVM_FAKE_KVM_SCRIPT", script);
  Deno.env.set("DENOVM_FAKE_KVM_LOG", log);
  const vm = await Vm.boot({ kernel: guest, ...config });
  return { vm, log };
}

const within = <T>(p: Promise<T>, what: () => string): Promise<T> => withinMs(p, what, HANG_GUARD_MS);

function threadExists(tid: number): boolean {
  return existsSync(`/proc/self/task/${tid}`);
}

/** This process's threads named like Deno's Worker threads ("worker-N"). */
function workerThreads(): string[] {
  return [...Deno.readDirSync("/proc/self/task")].filter((t) => {
    try {
      return Deno.readTextFileSync(`/proc/self/task/${t.name}/comm`).startsWith("worker-");
    } catch {
      return false; // the thread ended while we looked
    }
  }).map((t) => t.name);
}

/**
 * Stop the idle vCPU Workers (a Worker whose vCPU ended waits in the pool for the next vCPU of this process:
 * vmm/kvm/worker_pool.ts) and wait until every vCPU thread in `tids` is gone.
 */
async function closeIdleWorkers(tids: number[]): Promise<void> {
  closeIdleVcpuWorkers();
  await within(
    (async () => {
      while (tids.some(threadExists)) await new Promise((r) => setTimeout(r, 10));
    })(),
    () => `vCPU threads ${tids.filter(threadExists)} still exist`,
  );
}

Deno.test("fake KVM, library: two vCPUs — pause stops the guest, resume restarts it, stop ends every vCPU thread", async () => {
  // No idle Worker from before: this VM's Workers are the only ones it can use.
  await closeIdleWorkers([]);
  const workersBefore = workerThreads();
  const { vm, log } = await bootFake("spin", { cpus: 2 });
  const ticks = () => (vm.console.text.match(/T/g) ?? []).length;
  try {
    await vm.console.waitFor(/TT/, { timeout: HANG_GUARD_MS });
    await vm.pause();
    // Paused: no vCPU is inside KVM_RUN, so the guest's clock-driven output cannot grow.
    const atPause = ticks();
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(ticks(), atPause, "a paused guest printed");
    vm.resume();
    await vm.console.waitFor(new RegExp(`(T[^T]*){${atPause + 2}}`), { timeout: HANG_GUARD_MS });
    assert.equal(await vm.stop(), EXIT_SUCCESS);
  } finally {
    await vm.stop();
  }
  const events = await readFakeKvmLog(log);
  await Deno.remove(log);

  // Both vCPU threads left KVM_RUN (the AP was blocked in it until kicked) and wait, idle, in the pool; closing
  // the pool's idle Workers ends them.
  const tids = of(events, "run_thread").map((e) => e.tid as number);
  assert.equal(tids.length, 2);
  assert.equal(vcpuWorkerPoolStats().idle, 2, "both vCPUs' Workers went back to the pool");
  await closeIdleWorkers(tids);
  assert.deepEqual(workerThreads(), workersBefore);
  const closes = of(events, "close_vcpu");
  assert.equal(closes.length, 2);
  assert.equal(closes.find((e) => e.vcpu === 1)!.eagain, 1, "the AP's EAGAIN (after INIT) was retried");
  // A live mapping of a vCPU fd keeps a real KVM vCPU, and with it the whole VM (irqchip, PIT thread,
  // irqfds), alive after close: every run-page mapping must be gone when the fds are closed.
  assert.deepEqual(closes.map((e) => [e.vcpu, e.still_mapped]), [[0, 0], [1, 0]], "run pages still mapped at close");
  const ap = closes.find((e) => e.vcpu === 1)!;
  assert.ok(
    (ap.eintr_signal as number) + (ap.eintr_immediate as number) >= 2,
    "the AP was kicked out of KVM_RUN for pause and for stop",
  );

  // The AP's Worker is created only once the boot vCPU runs (Machine.start): when vCPU 0's Worker
  // mapped its run page, on its way into KVM_RUN, it was the only vCPU Worker of this process.
  const bspWorkerMap = of(events, "mmap_run").find((e) => e.vcpu === 0 && e.tid !== Deno.pid);
  assert.ok(bspWorkerMap, "vCPU 0's Worker mapped its run page");
  assert.equal((bspWorkerMap.workers as number) - workersBefore.length, 1, "Workers when the boot vCPU started");

  // What the VMM told KVM.
  assertBootState(events, entry);
  assert.deepEqual(of(events, "create_vcpu").map((e) => e.id), [0, 1]);
  const cpuid = of(events, "set_cpuid");
  assert.deepEqual(cpuid.map((e) => [e.vcpu, leaf1ApicId(e.leaf1_ebx as number), e.leafb_x2apic_id]), [
    [0, 0, 0],
    [1, 1, 1],
  ]);
  for (const vcpu of [0, 1]) {
    const msrs = of(events, "set_msrs").filter((e) => e.vcpu === vcpu).flatMap((e) => e.msrs as [number, number][]);
    const indices = msrs.map(([i]) => i);
    for (const m of [MSR_IA32_SYSENTER_CS, MSR_LSTAR, MSR_IA32_MISC_ENABLE, MSR_MTRR_DEF_TYPE]) {
      assert.ok(indices.includes(m), `vCPU ${vcpu} MSR 0x${m.toString(16)}`);
    }
    const lapic = of(events, "set_lapic").filter((e) => e.vcpu === vcpu);
    assert.equal(lapic.length, 1);
    assert.equal(
      lvtMode(lapic[0].lint0 as number),
      APIC_MODE_EXTINT,
      `vCPU ${vcpu} LINT0 (0x${APIC_LVT_LINT0.toString(16)})`,
    );
    assert.equal(
      lvtMode(lapic[0].lint1 as number),
      APIC_MODE_NMI,
      `vCPU ${vcpu} LINT1 (0x${APIC_LVT_LINT1.toString(16)})`,
    );
    assert.equal(lapic[0].id, vcpu);
    assert.equal(of(events, "set_fpu").filter((e) => e.vcpu === vcpu).length, 1);
    const maps = of(events, "mmap_run").filter((e) => e.vcpu === vcpu);
    assert.ok(maps.length >= 1);
    assert.equal(of(events, "munmap_run").filter((e) => e.vcpu === vcpu).length, maps.length);
  }
});

Deno.test("fake KVM, library: MMIO exits reach the virtio-mmio transport of a block device", async () => {
  const disk = await Deno.makeTempFile({ prefix: "fake-kvm-disk-" });
  await Deno.truncate(disk, 1 * MiB);
  const { vm, log } = await bootFake("mmio", {
    blocks: [{ path: disk, ro: false, root: false, sparse: true, blockSize: 512, direct: false }],
    rng: false,
    balloon: false,
  });
  try {
    const code = await within(vm.exitCode, () => `console: ${vm.console.text}`);
    assert.equal(code, EXIT_SUCCESS);
    // The status the guest wrote (ACKNOWLEDGE | DRIVER, virtio 1.2 2.1) read back through the transport.
    assert.match(vm.console.text, new RegExp(`MMIO ok device=${VIRTIO_ID_BLOCK} status=3\n`));
    assert.ok(vm.stats()["vcpu0.mmio_exits"] >= 5);
    const events = await readFakeKvmLog(log);
    const notify = of(events, "ioeventfd");
    assert.deepEqual(notify.map((e) => e.addr), [VIRTIO_MMIO_START + VIRTIO_MMIO_QUEUE_NOTIFY]);
  } finally {
    await vm.stop();
    await Deno.remove(disk);
    await Deno.remove(log);
  }
});

Deno.test("fake KVM, library: serial input typed with vm.console.send is read by the guest and echoed", async () => {
  const { vm, log } = await bootFake("echo", {});
  try {
    vm.console.send("hi there q");
    const code = await within(vm.exitCode, () => `console: ${vm.console.text}`);
    assert.equal(code, EXIT_SUCCESS);
    assert.match(vm.console.text, /hi there q\r?\necho done after 10 bytes/);
  } finally {
    await vm.stop();
    await Deno.remove(log);
  }
});

Deno.test("fake KVM, library: a million port-0x80 exits are served inside the vCPU worker", async () => {
  const { vm, log } = await bootFake("loop", {});
  try {
    const code = await within(vm.exitCode, () => `console: ${vm.console.text}`);
    assert.equal(code, EXIT_SUCCESS);
    assert.match(vm.console.text, /loop=1000000 in=1000 bad=0\n/);
    // Only the power-off crossed to the main thread: the worker served the report's UART writes too.
    assert.equal(vm.stats()["vcpu0.pio_exits"], 1);
  } finally {
    await vm.stop();
    await Deno.remove(log);
  }
});

Deno.test("fake KVM, library: the debug exit port ends the VM with the guest's code", async () => {
  const { vm, log } = await bootFake("debugexit", { debugExit: true });
  try {
    assert.equal(await within(vm.exitCode, () => "no debug exit"), 7);
  } finally {
    await vm.stop();
    await Deno.remove(log);
  }
});

Deno.test("fake KVM, library: stop while paused ends the VM with 0 and every vCPU thread", async () => {
  const { vm, log } = await bootFake("spin", { cpus: 2 });
  try {
    await vm.console.waitFor(/T/, { timeout: HANG_GUARD_MS });
    await vm.pause();
    assert.equal(await within(vm.stop(), () => "stop while paused did not end the VM"), EXIT_SUCCESS);
    const events = await readFakeKvmLog(log);
    const tids = of(events, "run_thread").map((e) => e.tid as number);
    // Each vCPU ended normally: its Worker went back to the pool, and closing the pool's idle ones ends them.
    assert.equal(vcpuWorkerPoolStats().idle, 2, "both vCPUs' Workers went back to the pool");
    await closeIdleWorkers(tids);
    assert.deepEqual(of(events, "close_vcpu").map((e) => [e.vcpu, e.still_mapped]), [[0, 0], [1, 0]]);
  } finally {
    await vm.stop();
    await Deno.remove(log);
  }
});

Deno.test("fake KVM, library: two VMs in one process pause and stop independently", async () => {
  const a = await bootFake("spin", {});
  const b = await bootFake("spin", { cpus: 2 });
  const ticks = (vm: typeof a.vm) => (vm.console.text.match(/T/g) ?? []).length;
  try {
    await a.vm.console.waitFor(/T/, { timeout: HANG_GUARD_MS });
    await a.vm.pause();
    const aPaused = ticks(a.vm);
    // B keeps running while A is paused.
    const bNow = ticks(b.vm);
    await b.vm.console.waitFor(new RegExp(`(T[^T]*){${bNow + 2}}`), { timeout: HANG_GUARD_MS });
    assert.equal(ticks(a.vm), aPaused, "pausing A paused nothing else: A itself stayed paused");
    assert.equal(await b.vm.stop(), EXIT_SUCCESS);
    // A is still there: resume it and see it run.
    a.vm.resume();
    await a.vm.console.waitFor(new RegExp(`(T[^T]*){${aPaused + 1}}`), { timeout: HANG_GUARD_MS });
    assert.equal(await a.vm.stop(), EXIT_SUCCESS);
  } finally {
    await a.vm.stop();
    await b.vm.stop();
    await Deno.remove(a.log);
    await Deno.remove(b.log);
  }
});

Deno.test({
  name: "fake KVM as kvm_pvm, library: Vm.boot rejects a Linux kernel at once unless allowEmulatedKernel is set",
  ignore: !debian,
  async fn() {
    Deno.env.set("DENOVM_FAKE_KVM_MODULE", "kvm_pvm");
    const log = await tempLog();
    Deno.env.set("DENOVM_FAKE_KVM_SCRIPT", "halt");
    Deno.env.set("DENOVM_FAKE_KVM_LOG", log);
    try {
      for (const kernel of [debian!.vmlinux, debian!.vmlinuz]) {
        await assert.rejects(
          Vm.boot({ kernel, memMiB: 512 }),
          (e: Error) =>
            e instanceof HostError && /kvm_pvm/.test(e.message) && /scripts\/nested-kvm\.sh/.test(e.message) &&
            /allowEmulatedKernel/.test(e.message),
        );
      }
      // Nothing ran: no vCPU was created, and every KVM fd was closed again.
      const events = await readFakeKvmLog(log);
      assert.equal(of(events, "create_vcpu").length, 0);
      assert.equal(of(events, "close_system").length, of(events, "open").length);
      assert.equal(of(events, "close_vm").length, of(events, "create_vm").length);
      // Opted in, it boots; a test guest needs no opt-in.
      await using linux = await Vm.boot({ kernel: debian!.vmlinux, memMiB: 512, allowEmulatedKernel: true });
      await using test = await Vm.boot({ kernel: guest });
      assert.equal(await linux.stop(), EXIT_SUCCESS);
      assert.equal(await test.stop(), EXIT_SUCCESS);
    } finally {
      Deno.env.delete("DENOVM_FAKE_KVM_MODULE");
      await Deno.remove(log);
    }
  },
});

Deno.test({
  name: "fake KVM as kvm_amd and kvm_intel, library: Vm.boot boots a Linux kernel without opting in",
  ignore: !debian,
  async fn() {
    for (const kind of ["kvm_amd", "kvm_intel"]) {
      Deno.env.set("DENOVM_FAKE_KVM_MODULE", kind);
      const { vm, log } = await bootFakeKernel(debian!.vmlinux);
      try {
        assert.equal(await vm.stop(), EXIT_SUCCESS);
      } finally {
        Deno.env.delete("DENOVM_FAKE_KVM_MODULE");
        await Deno.remove(log);
      }
    }
  },
});

async function bootFakeKernel(kernel: string) {
  const log = await tempLog();
  Deno.env.set("DENOVM_FAKE_KVM_SCRIPT", "halt");
  Deno.env.set("DENOVM_FAKE_KVM_LOG", log);
  return { vm: await Vm.boot({ kernel, memMiB: 512 }), log };
}

// ---- (c) snapshot state through the fake's KVM_GET_*/KVM_SET_* ----

/** IA32_PAT (Linux msr-index.h): one of the MSRs the fake lists after IA32_TSC. */
const MSR_IA32_PAT = 0x277;
/** An XSAVE area as large as a host whose VMs may use AMX has (KVM_CAP_XSAVE2's answer there). */
const AMX_XSAVE_SIZE = 11008;

Deno.test("fake KVM, in process: a vCPU and the VM saved and restored as on a real KVM, and bad records refused", async () => {
  const log = await tempLog();
  Deno.env.set("DENOVM_FAKE_KVM_LOG", log);
  const kvm = new Kvm();
  try {
    checkVcpuRoundTrip(kvm);
    checkVmRoundTrip(kvm);
    checkBadRecords(kvm);
    const events = await readFakeKvmLog(log);
    // The restore set the clock with no flags, and the pending NMI count marked valid.
    assert.ok(of(events, "set_clock").some((e) => e.flags === 0));
    const restored = of(events, "set_vcpu_events").filter((e) => e.nmi_pending === 1);
    assert.ok(
      restored.length > 0 && restored.every((e) => ((e.flags as number) & KVM.KVM_VCPUEVENT_VALID_NMI_PENDING) !== 0),
    );
  } finally {
    kvm.close();
    Deno.env.delete("DENOVM_FAKE_KVM_LOG");
    await Deno.remove(log);
  }
});

Deno.test("fake KVM, in process: an AMX-sized XSAVE area is saved whole through KVM_GET_XSAVE2 and restored", () => {
  Deno.env.set("DENOVM_FAKE_KVM_XSAVE_SIZE", String(AMX_XSAVE_SIZE));
  using o = new Opened();
  o.add("DENOVM_FAKE_KVM_XSAVE_SIZE", (k) => Deno.env.delete(k));
  const kvm = o.add(new Kvm(), (k) => k.close());
  const { first, caps } = checkVcpuRoundTrip(kvm);
  assert.deepEqual(caps, { xsaveSize: AMX_XSAVE_SIZE, xsave2: true, xcrs: true });
  assert.equal((fields(first).xsave as Uint8Array).length, AMX_XSAVE_SIZE);
});

Deno.test("fake KVM, in process: an MSR KVM cannot read is skipped, named in the record, and the rest saved", () => {
  Deno.env.set("DENOVM_FAKE_KVM_REFUSE_MSR", String(MSR_IA32_PAT));
  using o = new Opened();
  o.add("DENOVM_FAKE_KVM_REFUSE_MSR", (k) => Deno.env.delete(k));
  const kvm = o.add(new Kvm(), (k) => k.close());
  const vm = o.add(new KvmVm(kvm), (v) => v.close());
  const { fd } = bootVcpu(kvm, vm);
  o.add(fd, closeFd);
  const msrs = snapshotMsrs(kvm);
  const d = fields(saveVcpuState(fd, 0, msrs, vcpuStateCaps(vm)));
  assert.deepEqual(d.msrsSkipped, [MSR_IA32_PAT]);
  const saved = (d.msrs as [number, string][]).map(([i]) => i);
  assert.deepEqual(saved, msrs.filter((i) => i !== MSR_IA32_PAT), "every other MSR, in order");
  assert.ok(saved.includes(MSR_IA32_TSC));
});

// Last in this file: the environment set at the top is process-wide and `deno test` runs the other test
// files in this same process; their subprocesses must see the real host, not the fake KVM.
Deno.test("fake KVM: its environment is removed again for the test files that follow", () => {
  for (const k of Object.keys(fakeKvmEnv(shim, "halt", ""))) Deno.env.delete(k);
  for (const k of ["DENOVM_FAKE_KVM_SCRIPT", "DENOVM_FAKE_KVM_LOG", "DENOVM_FAKE_KVM_MODULE"]) Deno.env.delete(k);
  assert.equal(Deno.env.get("DENOVM_LIBC"), undefined);
  assert.equal(Deno.env.get("DENOVM_KVM_DEVICE"), undefined);
});
