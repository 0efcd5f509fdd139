// virtio-gpu zero copy end to end under KVM, with the freestanding guest test/guests/gpu_blob.c: the guest
// finds the virtio-gpu transport in the DSDT, negotiates VIRGL + RESOURCE_BLOB + CONTEXT_INIT, reads the
// host-visible window (shared-memory region 1) through SHMSel/SHMLen/SHMBase, maps it in its page tables,
// creates a virgl2 context and a HOST3D mappable buffer blob, maps the blob (the VMM installs the
// renderer's memory as a KVM memory slot at window base + offset), writes a pattern through the window,
// has the host copy the blob into a guest-backed buffer (RESOURCE_COPY_REGION in SUBMIT_3D), reads that
// back with TRANSFER_FROM_HOST_3D and compares. The counters must show 0 bytes copied for the blob and
// exactly the read-back bytes for the transfer.
//
// The boot test needs /dev/kvm (and virglrenderer) and skips without. Two tests always run: the guest
// builds and holds no instruction the kvm_pvm emulator lacks, and the guest's own DSDT scanner
// (virtio_mmio.c) and page-table code, compiled for the host around gpu_blob.c, find the transports in
// denovm's DSDT and map the window where the MMU will look. devices/virtio/gpu/zero_copy_test.ts runs the same command sequence here
// without KVM.

import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { buildGuest, GUESTS_DIR, layoutHeader } from "../guests/build.ts";
import { GiB, MiB, ramRanges, SERIAL_PORTS, sharedMemoryAreaStart, VIRTIO_IRQS } from "../../vmm/arch/layout.ts";
import { VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START } from "../../vmm/arch/layout.ts";
import { writeAcpiTables } from "../../vmm/arch/acpi.ts";
import { SHM_WINDOW_ALIGN } from "../../vmm/device_manager/shared_memory.ts";
import { OwnedGuestMemory } from "../../core/memory.ts";
import { DEFAULT_GPU_HOST_VISIBLE_WINDOW_SIZE, type GpuConfig } from "../../vmm/config.ts";
import { EXIT_SUCCESS } from "../../core/exit.ts";
import type { GpuStats } from "../../devices/virtio/gpu/accounting.ts";
import { VIRTIO_GPU_MAP_CACHE_CACHED } from "../../devices/virtio/gpu/protocol.ts";
import { Vm } from "../../mod.ts";
import { within as withinMs } from "../support/within.ts";

const kvmAvailable = existsSync("/dev/kvm");
let skipReason = kvmAvailable ? "" : "no /dev/kvm";
if (kvmAvailable) {
  try {
    const { VirglBackend } = await import("../../devices/virtio/gpu/backend_virgl.ts");
    new VirglBackend().close();
  } catch (e) {
    skipReason = `virglrenderer cannot initialise here: ${(e as Error).message}`;
  }
}
if (skipReason) console.log(`kvm_gpu_test: GPU blob guest boot test skipped: ${skipReason}`);

/** Hang protection only; the guest gives up on an unanswered command by itself. */
const GUEST_TIMEOUT_MS = 120_000;
const MEM_MIB = 64;
/** test/guests/gpu_blob.c BLOB_SIZE, BLOB_RES_ID, COPY_RES_ID, CTX_ID. */
const BLOB_SIZE = 64 * 1024;
const BLOB_RES = 1;
const COPY_RES = 2;
const CTX = 1;
/** Capset VIRGL2's max_version with virglrenderer 0.10.4 (reference/virglrenderer.md). */
const VIRGL2_MAX_VERSION = 2;

/** The GPU as `--gpu backend=virglrenderer` configures it (vmm/cli/run.ts defaults). */
function gpuConfig(): GpuConfig {
  return {
    backend: "virglrenderer",
    contextTypes: [],
    displays: [],
    hostVisibleWindowSize: DEFAULT_GPU_HOST_VISIBLE_WINDOW_SIZE,
    fixedBlobMapping: false,
    egl: true,
    gles: true,
    glx: false,
    surfaceless: true,
    vulkan: false,
    udmabuf: false,
  };
}

const within = <T>(p: Promise<T>, what: () => string): Promise<T> => withinMs(p, what, GUEST_TIMEOUT_MS);

/** The guest's "GPU ..." lines without the prefix and the UART's carriage returns. */
function gpuLines(text: string): string[] {
  return text.replace(/\r/g, "").split("\n").filter((l) => l.startsWith("GPU ")).map((l) => l.slice(4));
}

/** key=value pairs of the one line starting with `prefix + " "` or `prefix + "="` (then the prefix is a key too). */
function one(lines: string[], prefix: string, text: string): Record<string, string> {
  const found = lines.filter((l) => l.startsWith(prefix + " ") || l.startsWith(prefix + "="));
  assert.equal(found.length, 1, `expected one "GPU ${prefix}" line in:\n${text}`);
  return Object.fromEntries(
    found[0].split(" ").filter((w) => w.includes("=")).map((
      w,
    ) => [w.slice(0, w.indexOf("=")), w.slice(w.indexOf("=") + 1)]),
  );
}

Deno.test("gpu_blob guest builds and uses no instruction the kvm_pvm emulator lacks", async () => {
  const path = await buildGuest("gpu_blob");
  const out = await new Deno.Command("objdump", { args: ["-d", "--no-show-raw-insn", path], stdout: "piped" }).output();
  assert.ok(out.success, `objdump -d ${path}`);
  const asm = new TextDecoder().decode(out.stdout);
  // shared/reference/kvm-here.md: cmpxchg16b, xsave/xrstor family, int3 and vector registers stay out;
  // "(bad)" is data disassembled as code.
  const forbidden = /\b(cmpxchg16b|xsave\w*|xrstor\w*|fxsave\w*|fxrstor\w*|int3)\b|%[xyz]mm\d+|\(bad\)/;
  assert.deepEqual(asm.split("\n").filter((l) => forbidden.test(l)), []);
  for (const fn of ["_start", "guest_main"]) assert.match(asm, new RegExp(`<${fn}>:`));
});

/** Mappings the harness makes with the guest's map_identity, and the addresses it then walks. */
const MAP_CASES: { base: number; len: number; probes: number[] }[] = [
  // The window of a 64 MiB guest, 64 GiB up: one new page directory under the boot PDPT.
  { base: 64 * GiB, len: BLOB_SIZE, probes: [64 * GiB, 64 * GiB + BLOB_SIZE - 1, 64 * GiB + 2 * MiB] },
  // Across a 2 MiB boundary inside the same GiB: two large pages in the page directory made above.
  {
    base: 64 * GiB + 4 * MiB - 4096,
    len: 8192,
    probes: [64 * GiB + 4 * MiB - 4096, 64 * GiB + 4 * MiB + 4095, 64 * GiB + 6 * MiB],
  },
  // Across the 512 GiB boundary: a new page directory under the boot PDPT, then a new PDPT (second PML4
  // entry) and its page directory.
  {
    base: 512 * GiB - 2 * MiB,
    len: 4 * MiB,
    probes: [512 * GiB - 2 * MiB, 512 * GiB + 2 * MiB - 1, 512 * GiB + 2 * MiB],
  },
];
/** x86-64 2 MiB page (gpu_blob.c LARGE_PAGE_SIZE). */
const LARGE_PAGE = 2 * MiB;
/** Low addresses the boot tables map (the guest image at KERNEL_START): must stay identity. */
const LOW_PROBES = [0x1000, 0x100_0000, 0xbfff_ffff];

/** The virtio-mmio support gpu_blob.c is linked with (test/guests/build.ts GUESTS). */
const VIRTIO_MMIO_SRC = join(GUESTS_DIR, "virtio_mmio.c");

function harness(dsdt: Uint8Array): string {
  const u64 = (n: number) => `0x${n.toString(16)}ull`;
  const cases = MAP_CASES.map((c) =>
    `  map_identity(boot_pml4, ${u64(c.base)}, ${u64(c.len)});\n` +
    c.probes.map((p) => `  probe(${u64(p)});`).join("\n") + '\n  say("tables "), hex(pt_used), say("\\n");'
  ).join("\n");
  return `#include "gpu_blob.c"
extern long write(int fd, const void *buf, unsigned long n);
extern void _exit(int code) __attribute__((noreturn));
static const u8 dsdt_table[] __attribute__((aligned(8))) = {${[...dsdt].join(",")}};
static void say(const char *s) { write(1, s, strlen(s)); }
void printf(const char *fmt, ...) { say(fmt); }
void debug_exit(u8 code) { (void)code; say("debug_exit\\n"); _exit(1); }
u64 acpi_find_table(const char sig[4]) { (void)sig; return 0; }
int acpi_checksum_ok(u64 pa, u32 len) { (void)pa, (void)len; return 1; }
static void hex(u64 v) {
  char b[17];
  int i = 16;
  b[i] = 0;
  do b[--i] = "0123456789abcdef"[v & 15], v >>= 4; while (v);
  say(b + i);
}
/* Boot identity tables as the VMM builds them: one PDPT, four page directories of 2 MiB pages (4 GiB). */
static u64 boot_pml4[512] __attribute__((aligned(4096)));
static u64 boot_pdpt[512] __attribute__((aligned(4096)));
static u64 boot_pd[4][512] __attribute__((aligned(4096)));
/* What the MMU does with 4-level paging: the physical address of va, or ~0 for a not-present fault. */
static u64 walk(u64 va) {
  u64 e = boot_pml4[(va >> 39) & 511];
  if (!(e & 1)) return ~0ull;
  e = ((u64 *)(e & PTE_ADDR_MASK))[(va >> 30) & 511];
  if (!(e & 1)) return ~0ull;
  if (e & PTE_PAGE_SIZE) return ~0ull; /* 1 GiB pages are not supported here */
  e = ((u64 *)(e & PTE_ADDR_MASK))[(va >> 21) & 511];
  if (!(e & 1) || !(e & PTE_PAGE_SIZE) || !(e & PTE_WRITE)) return ~0ull;
  return (e & PTE_ADDR_MASK & ~(LARGE_PAGE_SIZE - 1)) | (va & (LARGE_PAGE_SIZE - 1));
}
static void probe(u64 va) { say("walk "), hex(va), say(" "), hex(walk(va)), say("\\n"); }
int main(void) {
  nmmio = vmmio_discover((u64)dsdt_table, mmio, MAX_DEVICES);
  for (u32 i = 0; i < nmmio; i++) say("dev "), hex(mmio[i].base), say("\\n");
  boot_pml4[0] = (u64)boot_pdpt | PTE_PRESENT | PTE_WRITE;
  for (u64 i = 0; i < 4; i++) {
    boot_pdpt[i] = (u64)boot_pd[i] | PTE_PRESENT | PTE_WRITE;
    for (u64 j = 0; j < 512; j++) boot_pd[i][j] = ((i * 512 + j) << 21) | PTE_PRESENT | PTE_WRITE | PTE_PAGE_SIZE;
  }
${cases}
${LOW_PROBES.map((p) => `  probe(${u64(p)});`).join("\n")}
  return 0;
}
`;
}

Deno.test("gpu_blob guest's DSDT scanner and page-table code (compiled for the host) find the transports and map the window", async () => {
  const dir = await Deno.makeTempDir({ prefix: "denovm-gpu-blob-" });
  try {
    await Deno.writeTextFile(join(dir, "layout.h"), layoutHeader());
    const count = 3;
    const resources = VIRTIO_IRQS.slice(0, count).map((irq, i) => ({
      base: VIRTIO_MMIO_START + i * VIRTIO_MMIO_SIZE,
      size: VIRTIO_MMIO_SIZE,
      irq,
    }));
    using mem = OwnedGuestMemory.allocate(ramRanges(16 * MiB));
    const tables = writeAcpiTables(mem, { cpus: 1, virtioMmio: resources, serial: SERIAL_PORTS.slice(0, 2) });
    const src = join(dir, "harness.c"), exe = join(dir, "harness");
    await Deno.writeTextFile(src, harness(mem.read(tables.dsdt.addr, tables.dsdt.size)));
    const cc = await new Deno.Command("gcc", {
      args: ["-O1", "-fno-builtin", "-Wall", "-Werror", `-I${dir}`, `-I${GUESTS_DIR}`, "-o", exe, src, VIRTIO_MMIO_SRC],
      stdout: "piped",
      stderr: "piped",
    }).output();
    assert.ok(cc.success, new TextDecoder().decode(cc.stderr));
    const run = await new Deno.Command(exe, { stdout: "piped" }).output();
    const out = new TextDecoder().decode(run.stdout);
    assert.ok(run.success, `harness exited ${run.code}: ${out}`);

    const hex = (n: number) => n.toString(16);
    const NOT_PRESENT = "ffffffffffffffff";
    const expected = resources.map((r) => `dev ${hex(r.base)}`);
    let tablesUsed = 0;
    const newTables = [1, 0, 3]; // a PD; none (same PD); a PDPT and two PDs
    MAP_CASES.forEach((c, i) => {
      for (const p of c.probes) {
        // map_identity maps whole 2 MiB pages: [base rounded down, base + len rounded up).
        const lo = Math.floor(c.base / LARGE_PAGE) * LARGE_PAGE;
        const hi = Math.ceil((c.base + c.len) / LARGE_PAGE) * LARGE_PAGE;
        const inside = p >= lo && p < hi;
        expected.push(`walk ${hex(p)} ${inside ? hex(p) : NOT_PRESENT}`);
      }
      tablesUsed += newTables[i];
      expected.push(`tables ${hex(tablesUsed)}`);
    });
    for (const p of LOW_PROBES) expected.push(`walk ${hex(p)} ${hex(p)}`);
    assert.deepEqual(out.split("\n").filter((l) => l), expected);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test({
  name: "kvm: guest maps a HOST3D blob through the SHM window, writes it, the GPU copies it, 0 blob bytes copied",
  ignore: skipReason !== "",
  async fn() {
    const kernel = await buildGuest("gpu_blob");
    const gpu = gpuConfig();
    await using vm = await Vm.boot({ kernel, debugExit: true, memMiB: MEM_MIB, cpus: 1, rng: false, gpu });
    const code = await within(vm.exitCode, () => `gpu_blob guest did not stop; console so far:\n${vm.console.text}`);
    const text = vm.console.text;
    assert.equal(code, EXIT_SUCCESS, text);
    const lines = gpuLines(text);
    assert.ok(lines.includes("DONE"), text);
    assert.ok(!lines.some((l) => l.startsWith("FAIL")), text);

    const shm = one(lines, "shm", text);
    const windowBase = Math.ceil(sharedMemoryAreaStart(MEM_MIB * MiB) / SHM_WINDOW_ALIGN) * SHM_WINDOW_ALIGN;
    assert.deepEqual(
      shm,
      { base: `0x${windowBase.toString(16)}`, len: `0x${gpu.hostVisibleWindowSize.toString(16)}` },
      text,
    );
    assert.ok(windowBase >= 64 * GiB, "the window lies at 64 GiB or above");
    const capsets = one(lines, "capsets", text);
    assert.ok(Number(capsets.capsets) >= 1, text);
    assert.equal(capsets.version, String(VIRGL2_MAX_VERSION), text);
    assert.deepEqual(
      lines.filter((l) => l.startsWith("map_info=")),
      [`map_info=0x${VIRTIO_GPU_MAP_CACHE_CACHED.toString(16)}`],
      text,
    );
    assert.deepEqual(one(lines, "blob", text), { pattern: "ok", bytes: String(BLOB_SIZE) }, text);
    assert.ok(lines.includes("unmap ok"), text);

    const stats = vm.gpu.stats() as GpuStats;
    const blob = stats.resources[String(BLOB_RES)];
    const copy = stats.resources[String(COPY_RES)];
    assert.ok(blob && copy, JSON.stringify(stats.resources));
    assert.equal(blob.bytesCopied, 0, "not one byte of the blob was copied");
    assert.equal(blob.transferToHostBytes + blob.transferFromHostBytes, 0);
    assert.equal(blob.blobMaps, 1);
    assert.equal(blob.blobMappedBytes, BLOB_SIZE);
    assert.equal(copy.transferFromHostBytes, BLOB_SIZE, "exactly the read-back bytes");
    assert.equal(copy.bytesCopied, BLOB_SIZE);
    assert.equal(stats.contexts[String(CTX)].bytesCopied, BLOB_SIZE);
    assert.equal(stats.totals.bytesCopied, BLOB_SIZE, "the read-back was the only copy");
    assert.deepEqual(stats.mapped, { count: 0, bytes: 0 }, "unmapped before power-off");
  },
});
