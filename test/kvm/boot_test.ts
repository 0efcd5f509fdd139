// KVM integration tests: boot denovm's freestanding test guests (test/guests/) and check, from what
// they print on COM1 and from the VMM's exit code, that the VMM set up the machine as promised.
//
// The boot tests need /dev/kvm and skip without it. One test always runs: it builds every guest
// with the host gcc, checks each ELF, loads it with the VMM's kernel loader, and disassembles it to
// make sure no instruction the kvm_pvm emulator lacks slipped in.

import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { buildAllGuests, buildGuest, layoutHeader } from "../guests/build.ts";
import {
  ACPI_RESET_PORT,
  ACPI_RESET_VALUE,
  ACPI_SLEEP_CONTROL_PORT,
  BOOT_GDT_ENTRIES,
  BOOT_GDT_START,
  BOOT_STACK_POINTER,
  type E820Entry,
  e820Map,
  KERNEL_START,
  MiB,
  MMIO_HOLE_START,
  PML4_START,
  ramRanges,
  ZERO_PAGE_START,
} from "../../vmm/arch/layout.ts";
import { EXIT_GUEST_PANIC, EXIT_SUCCESS, EXIT_VM_CRASH, EXIT_VM_RESET } from "../../core/exit.ts";
import { loadKernel } from "../../vmm/arch/boot/kernel.ts";
import { OwnedGuestMemory } from "../../core/memory.ts";
import { type BootConfig, Vm } from "../../mod.ts";
import { RESET_STATE_NOTE } from "../../vmm/arch/cpu.ts";
import { hostKind } from "../../vmm/kvm/host.ts";
import { Kvm } from "../../vmm/kvm/vm.ts";
import { KVM_CAP_TSC_DEADLINE_TIMER } from "../../ffi/kvm.ts";
import { within as withinMs } from "../support/within.ts";

const kvmAvailable = existsSync("/dev/kvm");
if (!kvmAvailable) console.log("kvm_boot_test: guest boot tests skipped: no /dev/kvm");

type BootOptions = Omit<BootConfig, "kernel">;

/** Hang protection only (guest code is emulated at a few million instructions/s on some hosts). */
const GUEST_TIMEOUT_MS = 120_000;

const within = <T>(p: Promise<T>, what: () => string): Promise<T> => withinMs(p, what, GUEST_TIMEOUT_MS);

interface GuestRun {
  code: number;
  text: string;
  /** The kernel command line the VMM says it gave the guest. */
  cmdline: string;
}

/** Boots a guest (debug exit port on), lets `interact` drive it, and waits for the VM to stop by itself. */
async function runGuest(name: string, opts: BootOptions, interact?: (vm: Vm) => Promise<void>): Promise<GuestRun> {
  const kernel = await buildGuest(name);
  await using vm = await Vm.boot({ kernel, debugExit: true, ...opts });
  if (interact) await interact(vm);
  const code = await within(vm.exitCode, () => `guest ${name} did not stop; console so far:\n${vm.console.text}`);
  return { code, text: vm.console.text, cmdline: vm.cmdline };
}

function waitFor(vm: Vm, pattern: RegExp): Promise<RegExpMatchArray> {
  return vm.console.waitFor(pattern, { timeout: GUEST_TIMEOUT_MS });
}

/** The console's lines without the UART's carriage returns. */
function lines(text: string): string[] {
  return text.replace(/\r/g, "").split("\n");
}

/** The one line starting with `prefix + " "`, with that prefix removed. */
function line(text: string, prefix: string): string {
  const found = lines(text).filter((l) => l.startsWith(prefix + " "));
  assert.equal(found.length, 1, `expected one "${prefix}" line in:\n${text}`);
  return found[0].slice(prefix.length + 1);
}

/** key=value pairs of a line (numbers parsed from 0x hex or decimal). */
function fields(s: string): Record<string, string> {
  return Object.fromEntries(
    s.split(" ").filter((w) => w.includes("=")).map((w) => [w.slice(0, w.indexOf("=")), w.slice(w.indexOf("=") + 1)]),
  );
}

function num(s: string): number {
  const n = Number(s);
  assert.ok(Number.isSafeInteger(n), `not a number: ${s}`);
  return n;
}

// Bits the boot_info guest reports (Intel SDM vol. 3 section 2.5 and vol. 4, IA32_EFER).
const EFER_LME = 1 << 8;
const EFER_LMA = 1 << 10;
const CR0_PE = 1;
const CR0_PG = 2 ** 31;
const CR4_PAE = 1 << 5;
const RFLAGS_IF = 1 << 9;
/** GDT selectors of the VMM's flat GDT: null, code 0x08, data 0x10, TSS 0x18. */
const SELECTOR_CODE = 0x08;
const SELECTOR_DATA = 0x10;
const GDT_ENTRY_SIZE = 8;
// Segment descriptor bits (Intel SDM vol. 3 section 3.4.5): present, code/data (S), executable, writable, 64-bit (L).
const DESC_P = 1n << 47n;
const DESC_S = 1n << 44n;
const DESC_CODE = 1n << 43n;
const DESC_WRITABLE = 1n << 41n;
const DESC_L = 1n << 53n;
/** struct setup_header boot_flag and header magic (Linux Documentation/arch/x86/boot.rst). */
const BOOT_FLAG = 0xaa55;
/** type_of_loader 0xff: "undefined" loader (boot.rst); what crosvm and Firecracker write. */
const LOADER_UNDEFINED = 0xff;

/** Values the triple guest puts in RAX and RBX before faulting (test/guests/triple.c). */
const TRIPLE_MARK_RAX = "7269706c65aa0001";

function bit(v: number, mask: number): boolean {
  return Math.floor(v / mask) % 2 === 1;
}

/** 32-bit sum of the bytes, as the boot_info guest computes it. */
function byteSum(data: Uint8Array): number {
  let sum = 0;
  for (const b of data) sum = (sum + b) >>> 0;
  return sum;
}

Deno.test({
  name: "kvm: boot_info sees the zero page, command line, e820, initrd, long mode, ACPI and MP tables",
  ignore: !kvmAvailable,
  async fn() {
    const memMiB = 128;
    const cpus = 2;
    const params = ["console=ttyS0", "denovm.test=boot_info", "x=y,z"];
    // An initrd whose size is not a page multiple, with varied bytes.
    const initrd = new Uint8Array(70001).map((_, i) => (i * 131 + (i >> 8)) & 0xff);
    const initrdPath = await Deno.makeTempFile({ prefix: "denovm-initrd-" });
    try {
      await Deno.writeFile(initrdPath, initrd);
      const { code, text, cmdline } = await runGuest("boot_info", { initrd: initrdPath, params, memMiB, cpus });
      assert.equal(code, EXIT_SUCCESS, text);
      assert.ok(lines(text).includes("DONE"), text);

      const entry = fields(line(text, "ENTRY"));
      assert.equal(num(entry.rsp), BOOT_STACK_POINTER, "RSP at entry");
      assert.equal(bit(num(entry.rflags), RFLAGS_IF), false, "interrupts off at entry");
      assert.equal(num(entry.cs), SELECTOR_CODE);
      assert.equal(num(entry.ds), SELECTOR_DATA);
      assert.equal(num(entry.ss), SELECTOR_DATA);
      assert.equal(num(entry.rsi), ZERO_PAGE_START, "RSI = zero page");
      const gdt = fields(line(text, "GDT"));
      assert.equal(num(gdt.base), BOOT_GDT_START);
      assert.equal(num(gdt.limit), BOOT_GDT_ENTRIES * GDT_ENTRY_SIZE - 1);
      const descriptors = new Map(
        lines(text).filter((l) => l.startsWith("GDTE ")).map((l) => {
          const [, index, value] = l.split(" ");
          return [Number(index) * GDT_ENTRY_SIZE, BigInt(value)] as const;
        }),
      );
      assert.equal(descriptors.size, BOOT_GDT_ENTRIES, text);
      const codeDesc = descriptors.get(SELECTOR_CODE)!;
      const dataDesc = descriptors.get(SELECTOR_DATA)!;
      assert.ok(
        codeDesc & DESC_P && codeDesc & DESC_S && codeDesc & DESC_CODE && codeDesc & DESC_L,
        `code descriptor 0x${codeDesc.toString(16)}`,
      );
      assert.ok(
        dataDesc & DESC_P && dataDesc & DESC_S && !(dataDesc & DESC_CODE) && dataDesc & DESC_WRITABLE,
        `data descriptor 0x${dataDesc.toString(16)}`,
      );

      assert.equal(
        line(text, "ZP"),
        `boot_flag=0x${BOOT_FLAG.toString(16)} header=HdrS loader=0x${LOADER_UNDEFINED.toString(16)}`,
      );
      // The guest sees exactly the command line the VMM reports, which ends with our params
      // (crosvm-style generated part first: panic=-1, console=...).
      assert.equal(line(text, "CMDLINE"), cmdline);
      assert.ok(cmdline.endsWith(params.join(" ")), `command line ${JSON.stringify(cmdline)}`);

      const memBytes = memMiB * MiB;
      const e820: E820Entry[] = lines(text)
        .filter((l) => /^E820 0x/.test(l))
        .map((l) => {
          const [, addr, size, type] = l.split(" ");
          return { addr: num(addr), size: num(size), type: num(type) };
        });
      assert.deepEqual(e820, e820Map(memBytes));
      assert.ok(lines(text).includes(`E820 entries=${e820.length}`), text);

      const [addr, size, sum] = line(text, "INITRD").split(" ");
      assert.equal(num(size), initrd.length);
      assert.equal(num(sum.replace("sum=", "")), byteSum(initrd));
      assert.ok(
        num(addr) % 4096 === 0 && num(addr) + initrd.length <= ramRanges(memBytes)[0].size,
        `initrd at ${addr}`,
      );

      const lm = fields(line(text, "LONGMODE"));
      assert.ok(bit(num(lm.efer), EFER_LME) && bit(num(lm.efer), EFER_LMA), `EFER ${lm.efer}`);
      assert.ok(bit(num(lm.cr0), CR0_PE) && bit(num(lm.cr0), CR0_PG), `CR0 ${lm.cr0}`);
      assert.ok(bit(num(lm.cr4), CR4_PAE), `CR4 ${lm.cr4}`);
      assert.equal(num(lm.cr3), PML4_START);

      assert.equal(line(text, "ACPI"), `rsdp=ok xsdt=ok fadt=ok madt_lapics=${cpus} dsdt=ok`);
      const fadt = fields(line(text, "FADT"));
      assert.equal(fadt.hw_reduced, "1");
      assert.equal(num(fadt.sleep_control), ACPI_SLEEP_CONTROL_PORT);
      assert.equal(num(fadt.reset), ACPI_RESET_PORT);
      assert.equal(num(fadt.reset_value), ACPI_RESET_VALUE);
      assert.equal(line(text, "MPTABLE"), `cpus=${cpus} ok`);
    } finally {
      await Deno.remove(initrdPath);
    }
  },
});

Deno.test({
  name: "kvm: smp guest starts every vCPU with INIT/SIPI (4 CPUs)",
  ignore: !kvmAvailable,
  async fn() {
    const cpus = 4;
    const { code, text } = await runGuest("smp", { params: [], memMiB: 64, cpus });
    assert.equal(code, EXIT_SUCCESS, text);
    const ids = lines(text).flatMap((l) => l.match(/^CPU (\d+) up$/)?.slice(1) ?? []).map(Number);
    assert.equal(ids.length, cpus, text);
    assert.equal(new Set(ids).size, cpus, `APIC ids not distinct: ${ids}`);
    assert.equal(line(text, "SMP"), `all=${cpus}`);
  },
});

Deno.test({
  name: "kvm: timer guest counts PIT interrupts through IOAPIC pin 2, then takes a TSC-deadline interrupt",
  ignore: !kvmAvailable,
  async fn() {
    const { code, text } = await runGuest("timer", { params: [], memMiB: 64, cpus: 1 });
    assert.equal(code, EXIT_SUCCESS, text);
    const first = lines(text).find((l) => l.startsWith("TIMER pin="));
    assert.equal(first && num(fields(first).pin), 2, text);
    assert.ok(lines(text).includes("TIMER ticks=5"), text);
    // The LAPIC timer's TSC-deadline mode is announced exactly when KVM emulates it, and then works: the
    // deadline's interrupt arrives, once, not before the deadline.
    const kvm = new Kvm();
    const cap = kvm.checkExtension(KVM_CAP_TSC_DEADLINE_TIMER) > 0;
    kvm.close();
    assert.ok(
      lines(text).includes(cap ? "TSCDEADLINE cpuid=1 fired=1 early=0" : "TSCDEADLINE cpuid=0"),
      `KVM_CAP_TSC_DEADLINE_TIMER=${cap}:\n${text}`,
    );
  },
});

Deno.test({
  name: "kvm: echo guest reads COM1 input and echoes it back",
  ignore: !kvmAvailable,
  async fn() {
    const sent = "hello denovm";
    const { code, text } = await runGuest("echo", { params: [], memMiB: 64, cpus: 1 }, async (vm) => {
      await waitFor(vm, /ECHO ready/);
      await vm.console.send(sent);
      await waitFor(vm, new RegExp(sent));
      await vm.console.send("q");
      await waitFor(vm, /BYE/);
    });
    assert.equal(code, EXIT_SUCCESS, text);
    assert.match(text.replace(/\r/g, ""), new RegExp(`^ECHO ready\n${sent}\nBYE\n`));
  },
});

Deno.test({
  name: "kvm: poweroff guest's ACPI S5 write stops the VM with exit code 0",
  ignore: !kvmAvailable,
  async fn() {
    const { code, text } = await runGuest("poweroff", { params: [], memMiB: 64, cpus: 1 });
    assert.equal(code, EXIT_SUCCESS, text);
    assert.ok(lines(text).includes("POWEROFF"), text);
  },
});

Deno.test({
  name: "kvm: reset guest's i8042 0xFE gives exit code 32",
  ignore: !kvmAvailable,
  async fn() {
    const { code, text } = await runGuest("reset", { params: [], memMiB: 64, cpus: 1 });
    assert.equal(code, EXIT_VM_RESET, text);
    assert.ok(lines(text).includes("RESET"), text);
  },
});

Deno.test({
  name: "kvm: panic guest's pvpanic write gives exit code 34",
  ignore: !kvmAvailable,
  async fn() {
    const { code, text } = await runGuest("panic", { params: [], memMiB: 64, cpus: 1 });
    assert.equal(code, EXIT_GUEST_PANIC, text);
    assert.ok(lines(text).includes("PANIC"), text);
  },
});

Deno.test({
  name: "kvm: triple fault gives exit code 33",
  ignore: !kvmAvailable,
  async fn() {
    const { code, text } = await runGuest("triple", { params: [], memMiB: 64, cpus: 1 });
    assert.equal(code, EXIT_VM_CRASH, text);
    assert.match(text, /TRIPLE rax=0x/);
  },
});

Deno.test({
  name: "kvm: triple fault through the CLI: exit code 33 (--extended-status) and the registers on stderr",
  ignore: !kvmAvailable,
  async fn() {
    const kernel = await buildGuest("triple");
    const main = fileURLToPath(new URL("../../main.ts", import.meta.url));
    const out = await within(
      new Deno.Command(Deno.execPath(), {
        args: ["run", "--allow-all", main, "--extended-status", "run", "--mem", "64", "--cpus", "1", kernel],
        stdin: "null",
        stdout: "piped",
        stderr: "piped",
      }).output(),
      () => "denovm run (triple guest) did not exit",
    );
    const stdout = new TextDecoder().decode(out.stdout);
    const stderr = new TextDecoder().decode(out.stderr);
    assert.equal(out.code, EXIT_VM_CRASH, `stdout:\n${stdout}\nstderr:\n${stderr}`);
    assert.match(stdout, /TRIPLE rax=0x/);
    assert.match(stderr, /rip/i, stderr);
    // What runs the guest decides, not the CPU's vendor (vmm/kvm/host.ts): KVM on SVM (kvm_amd) resets
    // the vCPU on the shutdown intercept, so the dump is the reset state, said so; KVM on VMX
    // (kvm_intel: arch/x86/kvm/vmx/vmx.c handle_triple_fault only reports KVM_EXIT_SHUTDOWN) and
    // kvm_pvm (on AMD and Intel CPUs alike) keep the registers at the fault.
    const kind = hostKind();
    if (kind === "kvm_amd") {
      assert.ok(stderr.includes(RESET_STATE_NOTE), `no reset-state note under kvm_amd:\n${stderr}`);
      assert.match(stderr, /rip=0x0*fff0\b/, stderr);
    } else {
      assert.ok(kind === "kvm_intel" || kind === "kvm_pvm", `host kind ${kind} with a running guest`);
      assert.ok(stderr.toLowerCase().includes(TRIPLE_MARK_RAX), `RAX marker not in the register dump:\n${stderr}`);
      assert.ok(!stderr.includes(RESET_STATE_NOTE), stderr);
    }
  },
});

// ---- Always runs: the guests build, are sound ELF files the VMM loads, and avoid what kvm_pvm cannot emulate ----

const EM_X86_64 = 62; // Elf64_Ehdr e_machine (System V ABI)
const ET_EXEC = 2;
const PT_LOAD = 1;
const PF_X = 1;
/** Largest size a test guest may occupy: they must stay small (emulated guest code). */
const GUEST_MAX_SIZE = 1 * MiB;
/**
 * Instructions the kvm_pvm emulator lacks or that must stay out of guests (docs/testing.md):
 * cmpxchg16b, xsave/xrstor family, int3, and anything touching vector registers. "(bad)" means
 * data was disassembled as code.
 */
const FORBIDDEN = /\b(cmpxchg16b|xsave\w*|xrstor\w*|fxsave\w*|fxrstor\w*|int3)\b|%[xyz]mm\d+|\(bad\)/;

interface LoadSegment {
  offset: number;
  paddr: number;
  filesz: number;
  memsz: number;
  flags: number;
}

function parseElf(image: Uint8Array): { type: number; machine: number; entry: number; loads: LoadSegment[] } {
  const dv = new DataView(image.buffer, image.byteOffset, image.byteLength);
  assert.deepEqual([...image.subarray(0, 4)], [0x7f, 0x45, 0x4c, 0x46], "ELF magic");
  assert.equal(image[4], 2, "ELFCLASS64");
  assert.equal(image[5], 1, "ELFDATA2LSB");
  // Elf64_Ehdr: e_type 0x10, e_machine 0x12, e_entry 0x18, e_phoff 0x20, e_phentsize 0x36, e_phnum 0x38.
  const phoff = Number(dv.getBigUint64(0x20, true));
  const phentsize = dv.getUint16(0x36, true);
  const loads: LoadSegment[] = [];
  for (let i = 0; i < dv.getUint16(0x38, true); i++) {
    const p = phoff + i * phentsize;
    // Elf64_Phdr: p_type 0, p_flags 4, p_offset 8, p_paddr 0x18, p_filesz 0x20, p_memsz 0x28.
    if (dv.getUint32(p, true) !== PT_LOAD) continue;
    loads.push({
      flags: dv.getUint32(p + 4, true),
      offset: Number(dv.getBigUint64(p + 8, true)),
      paddr: Number(dv.getBigUint64(p + 0x18, true)),
      filesz: Number(dv.getBigUint64(p + 0x20, true)),
      memsz: Number(dv.getBigUint64(p + 0x28, true)),
    });
  }
  return {
    type: dv.getUint16(0x10, true),
    machine: dv.getUint16(0x12, true),
    entry: Number(dv.getBigUint64(0x18, true)),
    loads,
  };
}

Deno.test("test guests build, are x86_64 ELF files at KERNEL_START that the VMM loads, use no unemulated instructions", async () => {
  assert.match(layoutHeader(), new RegExp(`#define KERNEL_START LAYOUT_C\\(0x${KERNEL_START.toString(16)}\\)`));
  const guests = await buildAllGuests();
  assert.ok(Object.keys(guests).length >= 8);
  for (const [name, path] of Object.entries(guests)) {
    const image = await Deno.readFile(path);
    const elf = parseElf(image);
    assert.equal(elf.type, ET_EXEC, `${name}: ET_EXEC`);
    assert.equal(elf.machine, EM_X86_64, `${name}: EM_X86_64`);
    assert.ok(elf.loads.length > 0, `${name}: has PT_LOAD segments`);
    for (const s of elf.loads) {
      assert.ok(
        s.paddr >= KERNEL_START && s.paddr + s.memsz <= KERNEL_START + GUEST_MAX_SIZE,
        `${name}: segment at ${s.paddr}`,
      );
    }
    const text = elf.loads.find((s) => s.flags & PF_X && elf.entry >= s.paddr && elf.entry < s.paddr + s.filesz);
    assert.ok(text, `${name}: entry 0x${elf.entry.toString(16)} is inside an executable PT_LOAD segment`);
    assert.equal(elf.entry, KERNEL_START, `${name}: _start is first`);

    // The VMM's own loader puts it where the ELF says.
    using mem = OwnedGuestMemory.allocate(ramRanges(64 * MiB));
    const info = loadKernel(mem, image);
    assert.equal(info.kind, "elf");
    assert.equal(info.entry, elf.entry);
    assert.deepEqual(mem.read(text.paddr, text.filesz), image.slice(text.offset, text.offset + text.filesz));
    assert.ok(info.loadEnd <= MMIO_HOLE_START);

    const out = await new Deno.Command("objdump", { args: ["-d", "--no-show-raw-insn", path], stdout: "piped" })
      .output();
    assert.ok(out.success, `objdump -d ${path}`);
    const asm = new TextDecoder().decode(out.stdout);
    const bad = asm.split("\n").filter((l) => FORBIDDEN.test(l));
    assert.deepEqual(bad, [], `${name}: instructions the emulator lacks`);
    assert.match(asm, /<_start>:/);
  }
});
