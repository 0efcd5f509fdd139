// KVM integration test of denovm's virtio-mmio path with the freestanding guest test/guests/virtio.c:
// the guest finds each transport in the DSDT (LNRO0005 _CRS), negotiates VIRTIO_F_VERSION_1, sets
// up a split queue, kicks it (KVM_IOEVENTFD in denovm) and waits for the interrupt (KVM_IRQFD),
// then reports on COM1. Block: a sector written, read back and compared, sector 0's checksum;
// rng: 64 bytes; console: one message on port 0's transmit queue.
//
// The boot tests need /dev/kvm and skip without it. One test always runs: it builds the guest with
// the host gcc and disassembles it to make sure no instruction the kvm_pvm emulator lacks slipped in.

import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { buildGuest, GUESTS_DIR, layoutHeader } from "../guests/build.ts";
import {
  MiB,
  ramRanges,
  SERIAL_PORTS,
  VIRTIO_IRQS,
  VIRTIO_MMIO_SIZE,
  VIRTIO_MMIO_START,
} from "../../vmm/arch/layout.ts";
import { writeAcpiTables } from "../../vmm/arch/acpi.ts";
import { OwnedGuestMemory } from "../../core/memory.ts";
import type { BlockConfig, SerialConfig } from "../../vmm/config.ts";
import { VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE, VIRTIO_ID_RNG } from "../../devices/virtio/device.ts";
import { EXIT_SUCCESS } from "../../core/exit.ts";
import { type BootConfig, Vm } from "../../mod.ts";
import { within as withinMs } from "../support/within.ts";

const kvmAvailable = existsSync("/dev/kvm");
if (!kvmAvailable) console.log("kvm_virtio_test: virtio guest boot tests skipped: no /dev/kvm");

/** Hang protection only; the guest itself gives up after about 10 s without a completion interrupt. */
const GUEST_TIMEOUT_MS = 120_000;
/** virtio-blk sectors are 512 bytes whatever the logical block size (virtio 1.2 section 5.2.6). */
const SECTOR_SIZE = 512;
/** The test image: 1 MiB. */
const IMAGE_SIZE = 1024 * 1024;
/** Sector the guest writes (test/guests/virtio.c BLK_TEST_SECTOR). */
const TEST_SECTOR = 1;
/** Bytes the guest asks the rng for, and the message it sends on the console (test/guests/virtio.c). */
const RNG_BYTES = 64;
const CONSOLE_MESSAGE = "hello from virtio console\n";
/**
 * Fewest non-zero bytes accepted among 64 random ones: the count is Binomial(64, 255/256), so fewer
 * than 56 happens with probability below 1e-14.
 */
const RNG_MIN_NONZERO = 56;
/** Requests the guest sends a writable block device: write, read back, read sector 0 (one interrupt each). */
const BLOCK_REQUESTS = 3;

/** What the guest's sector 1 holds after its write (virtio.c sector1_byte). */
function sector1Pattern(): Uint8Array {
  return Uint8Array.from({ length: SECTOR_SIZE }, (_, i) => (i * 13 + 0x3c) & 0xff);
}

/** A known sector 0 for the guest to read, distinct from the sector 1 pattern. */
function sector0Pattern(): Uint8Array {
  return Uint8Array.from({ length: SECTOR_SIZE }, (_, i) => (i * 7 + 3) & 0xff);
}

/** The virtio-mmio support the virtio guest is linked with (test/guests/build.ts GUESTS). */
const VIRTIO_MMIO_SRC = join(GUESTS_DIR, "virtio_mmio.c");

/** FNV-1a, 32 bits, as the guest computes it. */
function fnv1a(data: Uint8Array): number {
  let h = 2166136261;
  for (const b of data) h = Math.imul(h ^ b, 16777619) >>> 0;
  return h;
}

const within = <T>(p: Promise<T>, what: () => string): Promise<T> => withinMs(p, what, GUEST_TIMEOUT_MS);

async function runVirtioGuest(opts: Omit<BootConfig, "kernel">): Promise<{ code: number; text: string }> {
  const kernel = await buildGuest("virtio");
  await using vm = await Vm.boot({ kernel, debugExit: true, memMiB: 64, cpus: 1, ...opts });
  const code = await within(vm.exitCode, () => `virtio guest did not stop; console so far:\n${vm.console.text}`);
  return { code, text: vm.console.text };
}

/** The guest's "VIRTIO ..." lines, without the prefix and the UART's carriage returns. */
function virtioLines(text: string): string[] {
  return text.replace(/\r/g, "").split("\n").filter((l) => l.startsWith("VIRTIO ")).map((l) => l.slice(7));
}

/** key=value pairs of a line. */
function fields(s: string): Record<string, string> {
  return Object.fromEntries(
    s.split(" ").filter((w) => w.includes("=")).map((w) => [w.slice(0, w.indexOf("=")), w.slice(w.indexOf("=") + 1)]),
  );
}

/** The one line starting with `prefix + " "`, as fields. */
function one(lines: string[], prefix: string, text: string): Record<string, string> {
  const found = lines.filter((l) => l.startsWith(prefix + " "));
  assert.equal(found.length, 1, `expected one "VIRTIO ${prefix}" line in:\n${text}`);
  return fields(found[0]);
}

/** The guest's short name for the device types it drives. */
const DRIVEN: Record<number, string> = {
  [VIRTIO_ID_BLOCK]: "blk",
  [VIRTIO_ID_RNG]: "rng",
  [VIRTIO_ID_CONSOLE]: "console",
};

/**
 * Checks every device the guest found: its DSDT entry is virtio-mmio slot i (base, size, GSI from
 * vmm/arch/layout.ts, edge-triggered active-high interrupt); a type the guest drives took at least one
 * used-buffer interrupt and no spurious one; other types were skipped. Returns the VIRTIO lines and
 * the device ids in slot order.
 */
function checkDevices(text: string): { lines: string[]; types: number[] } {
  const lines = virtioLines(text);
  assert.ok(lines.includes("DONE"), text);
  const found = lines.filter((l) => l.startsWith("found=")).map((l) => Number(l.slice("found=".length)));
  assert.equal(found.length, 1, text);
  assert.ok(found[0] <= VIRTIO_IRQS.length, text);
  const types: number[] = [];
  let total = 0;
  for (let i = 0; i < found[0]; i++) {
    const dev = one(lines, `dev ${i}`, text);
    const type = Number(dev.id);
    types.push(type);
    assert.deepEqual(dev, {
      id: String(type),
      base: `0x${(VIRTIO_MMIO_START + i * VIRTIO_MMIO_SIZE).toString(16)}`,
      size: `0x${VIRTIO_MMIO_SIZE.toString(16)}`,
      gsi: String(VIRTIO_IRQS[i]),
      edge: "1",
      low: "0",
    }, text);
    const name = DRIVEN[type];
    if (!name) {
      assert.ok(lines.includes(`skip ${i} id=${type}`), text);
      continue;
    }
    const irq = one(lines, `irq ${i} ${name}`, text);
    assert.ok(Number(irq.irqs) > 0, `${name}: no interrupt through irqfd:\n${text}`);
    assert.equal(irq.spurious, "0", text);
    total += Number(irq.irqs);
  }
  assert.deepEqual(lines.filter((l) => l.startsWith("irqs=")), [`irqs=${total}`], text);
  return { lines, types };
}

Deno.test("virtio guest builds and uses no instruction the kvm_pvm emulator lacks", async () => {
  const path = await buildGuest("virtio");
  const out = await new Deno.Command("objdump", { args: ["-d", "--no-show-raw-insn", path], stdout: "piped" }).output();
  assert.ok(out.success, `objdump -d ${path}`);
  const asm = new TextDecoder().decode(out.stdout);
  // shared/reference/kvm-here.md: cmpxchg16b, xsave/xrstor family, int3 and vector registers stay out;
  // "(bad)" is data disassembled as code.
  const forbidden = /\b(cmpxchg16b|xsave\w*|xrstor\w*|fxsave\w*|fxrstor\w*|int3)\b|%[xyz]mm\d+|\(bad\)/;
  assert.deepEqual(asm.split("\n").filter((l) => forbidden.test(l)), []);
  for (const fn of ["_start", "guest_main", "on_virtio_irq"]) assert.match(asm, new RegExp(`<${fn}>:`));
});

/**
 * A host program around the guest's own DSDT scanner: test/guests/virtio.c is included as is and linked
 * with test/guests/virtio_mmio.c, the scanner they share (their port I/O and MMIO helpers are never
 * called), the runtime functions they link against are stubs, and main() runs virtio.c's discover() on
 * the DSDT bytes compiled in and prints one line per virtio-mmio device.
 */
function scannerHarness(dsdt: Uint8Array): string {
  return `#include "virtio.c"
extern long write(int fd, const void *buf, unsigned long n);
static const u8 dsdt_table[] __attribute__((aligned(8))) = {${[...dsdt].join(",")}};
static void say(const char *s) { write(1, s, strlen(s)); }
void printf(const char *fmt, ...) { say(fmt); }
void debug_exit(u8 code) { (void)code; say("debug_exit\\n"); __builtin_trap(); }
u64 acpi_find_table(const char sig[4]) { (void)sig; return 0; }
int acpi_checksum_ok(u64 pa, u32 len) { (void)pa, (void)len; return 1; }
void irq_register(u8 vector, irq_handler handler) { (void)vector, (void)handler; }
void ioapic_route(u32 pin, u8 vector, u32 dest, int level, int low) { (void)pin, (void)vector, (void)dest, (void)level, (void)low; }
void lapic_enable(void) {}
void pic_mask_all(void) {}
u32 lapic_id(void) { return 0; }
static void hex(u64 v) {
  char b[17];
  int i = 16;
  b[i] = 0;
  do b[--i] = "0123456789abcdef"[v & 15], v >>= 4; while (v);
  say(b + i);
}
int main(void) {
  discover((u64)dsdt_table);
  for (u32 i = 0; i < ndevs; i++) {
    const struct vmmio_transport *t = &devs[i].mmio;
    hex(t->base), say(" "), hex(t->size), say(" "), hex(t->gsi);
    say(t->edge ? " edge" : " level");
    say(t->active_low ? " low\\n" : " high\\n");
  }
  return 0;
}
`;
}

/** The DSDT denovm writes for `count` virtio-mmio slots and two serial ports, as the guest's scanner reads it. */
async function scanDsdt(dir: string, count: number): Promise<string[]> {
  const resources = VIRTIO_IRQS.slice(0, count).map((irq, i) => ({
    base: VIRTIO_MMIO_START + i * VIRTIO_MMIO_SIZE,
    size: VIRTIO_MMIO_SIZE,
    irq,
  }));
  using mem = OwnedGuestMemory.allocate(ramRanges(16 * MiB));
  const tables = writeAcpiTables(mem, { cpus: 1, virtioMmio: resources, serial: SERIAL_PORTS.slice(0, 2) });
  const src = join(dir, `scan${count}.c`);
  const exe = join(dir, `scan${count}`);
  await Deno.writeTextFile(src, scannerHarness(mem.read(tables.dsdt.addr, tables.dsdt.size)));
  const cc = await new Deno.Command("gcc", {
    args: ["-O1", "-fno-builtin", "-Wall", "-Werror", `-I${dir}`, `-I${GUESTS_DIR}`, "-o", exe, src, VIRTIO_MMIO_SRC],
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.ok(cc.success, new TextDecoder().decode(cc.stderr));
  const run = await new Deno.Command(exe, { stdout: "piped" }).output();
  const out = new TextDecoder().decode(run.stdout);
  assert.ok(run.success, `scanner harness exited ${run.code}: ${out}`);
  return out.split("\n").filter((l) => l);
}

Deno.test("virtio guest's DSDT scanner (compiled for the host) finds every transport in denovm's DSDT", async () => {
  const dir = await Deno.makeTempDir({ prefix: "denovm-virtio-scan-" });
  try {
    await Deno.writeTextFile(join(dir, "layout.h"), layoutHeader());
    // No slot, one, and all of them (then \_SB's PkgLength takes several bytes).
    for (const count of [0, 1, VIRTIO_IRQS.length]) {
      const expected = VIRTIO_IRQS.slice(0, count).map((irq, i) =>
        [(VIRTIO_MMIO_START + i * VIRTIO_MMIO_SIZE).toString(16), VIRTIO_MMIO_SIZE.toString(16), irq.toString(16)]
          .join(" ") + " edge high"
      );
      assert.deepEqual(await scanDsdt(dir, count), expected, `${count} slots`);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test({
  name:
    "kvm: virtio guest finds block (and default) devices in the DSDT, writes and reads sectors, takes irqfd interrupts",
  ignore: !kvmAvailable,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "denovm-virtio-" });
    try {
      const path = join(dir, "disk.img");
      const image = new Uint8Array(IMAGE_SIZE);
      image.set(sector0Pattern(), 0);
      await Deno.writeFile(path, image);
      const blocks: BlockConfig[] = [{ path, ro: false, root: false, sparse: true, blockSize: 512, direct: false }];
      const { code, text } = await runVirtioGuest({ blocks });
      assert.equal(code, EXIT_SUCCESS, text);
      const { lines, types } = checkDevices(text);
      // Block devices take the first slots; rng is on by default (crosvm's --no-rng turns it off).
      assert.equal(types[0], VIRTIO_ID_BLOCK, text);
      assert.equal(types.filter((t) => t === VIRTIO_ID_BLOCK).length, 1, text);
      assert.equal(types.filter((t) => t === VIRTIO_ID_RNG).length, 1, text);

      const blk = one(lines, "blk", text);
      assert.deepEqual(blk, {
        cap: String(IMAGE_SIZE / SECTOR_SIZE),
        rw: "ok",
        sum0: fnv1a(sector0Pattern()).toString(16),
      });
      assert.ok(Number(one(lines, "irq 0 blk", text).irqs) >= BLOCK_REQUESTS, text);
      const rng = one(lines, "rng", text);
      assert.equal(rng.bytes, String(RNG_BYTES), text);
      assert.ok(Number(rng.nonzero) >= RNG_MIN_NONZERO, text);

      const after = await Deno.readFile(path);
      assert.equal(after.length, IMAGE_SIZE);
      assert.deepEqual(after.subarray(TEST_SECTOR * SECTOR_SIZE, (TEST_SECTOR + 1) * SECTOR_SIZE), sector1Pattern());
      assert.deepEqual(after.subarray(0, SECTOR_SIZE), sector0Pattern(), "sector 0 untouched");
      assert.ok(after.subarray((TEST_SECTOR + 1) * SECTOR_SIZE).every((b) => b === 0), "nothing else written");
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

/** The library's COM1 (mod.ts librarySerial) plus a virtio-console port writing to `path`. */
function consoleSerials(path: string): SerialConfig[] {
  return [
    { type: "sink", hardware: "serial", num: 1, console: true, earlycon: false, stdin: false },
    { type: "file", hardware: "virtio-console", num: 1, path, console: false, earlycon: false, stdin: false },
  ];
}

Deno.test({
  name: "kvm: virtio guest writes to a virtio-console port through its transmit queue",
  ignore: !kvmAvailable,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "denovm-virtio-console-" });
    try {
      const out = join(dir, "console.out");
      const serials = consoleSerials(out);
      const { code, text } = await runVirtioGuest({ serials, rng: false });
      assert.equal(code, EXIT_SUCCESS, text);
      const { lines, types } = checkDevices(text);
      assert.equal(types.filter((t) => t === VIRTIO_ID_CONSOLE).length, 1, text);
      assert.ok(!types.includes(VIRTIO_ID_RNG), `rng: false leaves the rng out:\n${text}`);
      assert.deepEqual(one(lines, "console", text), { tx: "ok" });
      assert.equal(await Deno.readTextFile(out), CONSOLE_MESSAGE);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
