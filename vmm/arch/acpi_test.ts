// ACPI tables checked by ACPICA's own tools (iasl -d disassembles, acpiexec runs the AML),
// and the MP table checked field by field.

import assert from "node:assert/strict";
import { OwnedGuestMemory } from "../../core/memory.ts";
import {
  ACPI_RESET_PORT,
  ACPI_RSDP_START,
  ACPI_SLEEP_CONTROL_PORT,
  ACPI_SLEEP_STATUS_PORT,
  ACPI_TABLES_END,
  ACPI_TABLES_START,
  APIC_START,
  E820_RAM,
  E820_RESERVED,
  e820Map,
  GiB,
  IOAPIC_PINS,
  IOAPIC_START,
  IRQ_ACPI_SCI,
  IRQ_ACPI_SLEEP_BUTTON,
  IRQ_ACPI_VMGENID,
  MiB,
  MPTABLE_START,
  ramRanges,
  SERIAL_PORTS,
  VIRTIO_IRQS,
  VIRTIO_MMIO_SIZE,
  VIRTIO_MMIO_START,
  VMGENID_PAGE_SIZE,
  VMGENID_PAGE_START,
} from "./layout.ts";
import { type AcpiOptions, dsdtAml, virtioMmioCmdlineArgs, writeAcpiTables } from "./acpi.ts";
import { MPTABLE_MAX_CPUS, mpTableSize, writeMpTable } from "./mptable.ts";
import * as aml from "./aml.ts";

const haveIasl = (() => {
  try {
    return new Deno.Command("iasl", { args: ["-v"], stdout: "null", stderr: "null" }).outputSync().success;
  } catch {
    return false;
  }
})();
if (!haveIasl) {
  console.log("acpi_test: iasl/acpiexec not installed (apt-get install acpica-tools); skipping those tests");
}

function virtio(n: number) {
  return Array.from({ length: n }, (_, i) => ({
    base: VIRTIO_MMIO_START + i * VIRTIO_MMIO_SIZE,
    size: VIRTIO_MMIO_SIZE,
    irq: VIRTIO_IRQS[i % VIRTIO_IRQS.length],
  }));
}

const OPTS: AcpiOptions = { cpus: 4, virtioMmio: virtio(3), serial: SERIAL_PORTS.slice(0, 2) };

function sum8(bytes: Uint8Array): number {
  return bytes.reduce((s, b) => (s + b) & 0xff, 0);
}

function ascii(bytes: Uint8Array): string {
  return new TextDecoder().decode(bytes);
}

/** Follow RSDP → XSDT → FADT → DSDT in guest memory, checking signatures and checksums on the way. */
function walkTables(mem: OwnedGuestMemory): Map<string, Uint8Array> {
  const tables = new Map<string, Uint8Array>();
  const rsdp = mem.read(ACPI_RSDP_START, 36);
  assert.equal(ascii(rsdp.subarray(0, 8)), "RSD PTR ");
  assert.equal(rsdp[15], 2, "RSDP revision 2");
  assert.equal(sum8(rsdp.subarray(0, 20)), 0, "RSDP checksum");
  assert.equal(sum8(rsdp), 0, "RSDP extended checksum");
  assert.equal(ascii(rsdp.subarray(9, 15)), "DENOVM");
  const dv = new DataView(rsdp.buffer);
  assert.equal(dv.getUint32(20, true), 36, "RSDP length");
  tables.set("RSDP", rsdp);

  const table = (addr: number) => {
    assert.ok(addr >= ACPI_TABLES_START && addr < ACPI_TABLES_END, `table at 0x${addr.toString(16)} in the ACPI area`);
    const len = mem.getU32(addr + 4);
    assert.ok(addr + len <= ACPI_TABLES_END);
    const t = mem.read(addr, len);
    const sig = ascii(t.subarray(0, 4));
    assert.equal(sum8(t), 0, `${sig} checksum`);
    assert.equal(ascii(t.subarray(10, 16)), "DENOVM", `${sig} OEM id`);
    tables.set(sig, t);
    return t;
  };
  const xsdt = table(Number(dv.getBigUint64(24, true)));
  const rsdt = table(dv.getUint32(16, true));
  assert.equal(ascii(xsdt.subarray(0, 4)), "XSDT");
  assert.equal(ascii(rsdt.subarray(0, 4)), "RSDT");
  const xdv = new DataView(xsdt.buffer);
  const rdv = new DataView(rsdt.buffer);
  const n = (xsdt.length - 36) / 8;
  assert.equal((rsdt.length - 36) / 4, n, "RSDT and XSDT list the same tables");
  for (let i = 0; i < n; i++) {
    const addr = Number(xdv.getBigUint64(36 + 8 * i, true));
    assert.equal(rdv.getUint32(36 + 4 * i, true), addr);
    table(addr);
  }
  const fadt = tables.get("FACP");
  assert.ok(fadt, "XSDT points at the FADT");
  assert.ok(tables.get("APIC"), "XSDT points at the MADT");
  const fdv = new DataView(fadt.buffer);
  const xDsdt = Number(fdv.getBigUint64(140, true));
  assert.equal(fdv.getUint32(40, true), xDsdt, "DSDT and X_DSDT agree");
  assert.equal(ascii(table(xDsdt).subarray(0, 4)), "DSDT");
  return tables;
}

async function run(cmd: string, args: string[], cwd: string): Promise<string> {
  const out = await new Deno.Command(cmd, { args, cwd, stdout: "piped", stderr: "piped" }).output();
  const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  assert.ok(out.success, `${cmd} ${args.join(" ")} failed:\n${text}`);
  return text;
}

/** Disassemble each table with iasl -d; returns signature → .dsl text. */
async function disassemble(tables: Map<string, Uint8Array>, dir: string): Promise<Map<string, string>> {
  const dsl = new Map<string, string>();
  for (const [sig, bytes] of tables) {
    if (sig === "RSDP") continue; // iasl's data-table disassembler does not take a bare RSDP; checked above
    const file = `${sig.toLowerCase()}.dat`;
    await Deno.writeFile(`${dir}/${file}`, bytes);
    const log = await run("iasl", ["-d", file], dir);
    assert.doesNotMatch(log, /checksum|error/i, `iasl on ${sig}:\n${log}`);
    const text = await Deno.readTextFile(`${dir}/${sig.toLowerCase()}.dsl`);
    assert.doesNotMatch(text, /Incorrect checksum/i, `${sig} disassembly`);
    dsl.set(sig, text);
  }
  return dsl;
}

function count(text: string, re: RegExp): number {
  return [...text.matchAll(new RegExp(re.source, re.flags.includes("g") ? re.flags : re.flags + "g"))].length;
}

Deno.test({
  name: "ACPI: 4 CPUs, 3 virtio-mmio devices, 2 serial ports — iasl disassembles every table cleanly",
  ignore: !haveIasl,
  async fn() {
    using mem = OwnedGuestMemory.allocate(ramRanges(16 * MiB));
    const placed = writeAcpiTables(mem, OPTS);
    assert.equal(placed.rsdp.addr, ACPI_RSDP_START);
    const tables = walkTables(mem);
    assert.deepEqual([...tables.keys()].sort(), ["APIC", "DSDT", "FACP", "RSDP", "RSDT", "XSDT"]);
    const dir = await Deno.makeTempDir({ prefix: "denovm-acpi-" });
    try {
      const dsl = await disassemble(tables, dir);

      const dsdt = dsl.get("DSDT")!;
      assert.equal(count(dsdt, /Name \(_HID, "LNRO0005"\)/), 3);
      OPTS.virtioMmio.forEach((d, i) => {
        const name = `VR0${i}`;
        const block = dsdt.slice(dsdt.indexOf(`Device (${name})`), dsdt.indexOf(`Device (${name})`) + 900);
        assert.match(block, new RegExp(`0x${d.base.toString(16).toUpperCase().padStart(8, "0")},\\s+// Address Base`));
        assert.match(block, /0x00001000,\s+\/\/ Address Length/);
        assert.match(block, /Interrupt \(ResourceConsumer, Edge, ActiveHigh, Exclusive/);
        assert.match(block, new RegExp(`0x${d.irq.toString(16).toUpperCase().padStart(8, "0")},`));
        assert.match(block, i === 0 ? /_UID, Zero/ : i === 1 ? /_UID, One/ : /_UID, 0x02/);
      });
      assert.equal(count(dsdt, /EisaId \("PNP0501"\)/), 2);
      assert.match(dsdt, /Device \(COM1\)[\s\S]*?0x03F8,\s+\/\/ Range Minimum[\s\S]*?IRQNoFlags \(\)\s+\{4\}/);
      assert.match(dsdt, /Device \(COM2\)[\s\S]*?0x02F8,\s+\/\/ Range Minimum[\s\S]*?IRQNoFlags \(\)\s+\{3\}/);
      assert.match(dsdt, /Name \(_HID, "ACPI0013"/);
      assert.match(dsdt, /Device \(PWRB\)\s+\{\s+Name \(_HID, EisaId \("PNP0C0C"\)/);
      assert.match(dsdt, /Method \(_EVT, 1, Serialized\)[\s\S]*?Notify \(\\_SB\.PWRB, 0x80\)/);
      assert.match(dsdt, /Interrupt \(ResourceConsumer, Level, ActiveHigh, Exclusive, ,, \)\s+\{\s+0x00000009,/);
      // The sleep button: a PNP0C0E device, the GED's second interrupt (edge, active high) and its _EVT branch.
      assert.match(dsdt, /Device \(SLPB\)\s+\{\s+Name \(_HID, EisaId \("PNP0C0E"\)/);
      assert.match(
        dsdt,
        new RegExp(
          `Interrupt \\(ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, \\)\\s+\\{\\s+0x${
            IRQ_ACPI_SLEEP_BUTTON.toString(16).toUpperCase().padStart(8, "0")
          },`,
        ),
      );
      assert.match(dsdt, /Method \(_EVT, 1, Serialized\)[\s\S]*?Notify \(\\_SB\.SLPB, 0x80\)/);
      // The VM generation ID: the ids Linux's vmgenid driver matches, ADDR = the page's address (low, high), the
      // GED's third interrupt (edge, active high) and its _EVT branch notifying the device with 0x80.
      const vgen = dsdt.slice(dsdt.indexOf("Device (VGEN)"), dsdt.indexOf("Device (GED)"));
      assert.match(vgen, /Name \(_HID, "VMGENCTR"\)/);
      assert.match(vgen, /Name \(_CID, "VM_GEN_COUNTER"\)/);
      assert.match(vgen, /Name \(_DDN, "VM_Gen_Counter"\)/);
      assert.match(
        vgen,
        new RegExp(
          `Name \\(ADDR, Package \\(0x02\\)\\s+\\{\\s+0x${
            VMGENID_PAGE_START.toString(16).toUpperCase().padStart(8, "0")
          },\\s+Zero\\s+\\}`,
        ),
      );
      assert.match(
        dsdt,
        new RegExp(
          `Interrupt \\(ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, \\)\\s+\\{\\s+0x${
            IRQ_ACPI_VMGENID.toString(16).toUpperCase().padStart(8, "0")
          },`,
        ),
      );
      assert.match(dsdt, /Method \(_EVT, 1, Serialized\)[\s\S]*?Notify \(\\_SB\.VGEN, 0x80\)/);
      assert.match(dsdt, /Name \(\\_S5, Package \(0x02\)[^{]*\{\s+0x05,\s+Zero\s+\}/);

      const fadt = dsl.get("FACP")!;
      assert.match(fadt, /Revision : 06/);
      assert.match(fadt, /Hardware Reduced \(V5\) : 1/);
      assert.match(fadt, /Reset Register Supported \(V2\) : 1/);
      assert.match(fadt, /Control Method Power Button \(V1\) : 1/);
      assert.match(fadt, new RegExp(`SCI Interrupt : ${IRQ_ACPI_SCI.toString(16).padStart(4, "0")}`));
      const gas = (label: string, port: number) =>
        new RegExp(
          `${label} : \\[Generic Address Structure\\][^\\[]*\\[[^\\]]*\\]\\s+Space ID : 01 \\[SystemIO\\]` +
            `[\\s\\S]*?Bit Width : 08[\\s\\S]*?Address : ${port.toString(16).toUpperCase().padStart(16, "0")}`,
        );
      assert.match(fadt, gas("Reset Register", ACPI_RESET_PORT));
      assert.match(fadt, /Value to cause reset : 01/);
      assert.match(fadt, gas("Sleep Control Register", ACPI_SLEEP_CONTROL_PORT));
      assert.match(fadt, gas("Sleep Status Register", ACPI_SLEEP_STATUS_PORT));
      assert.match(fadt, new RegExp(`DSDT Address : ${placed.dsdt.addr.toString(16).toUpperCase().padStart(16, "0")}`));

      const madt = dsl.get("APIC")!;
      assert.equal(count(madt, /Subtable Type : 00 \[Processor Local APIC\]/), 4);
      for (let cpu = 0; cpu < 4; cpu++) assert.match(madt, new RegExp(`Local Apic ID : 0${cpu}`));
      assert.equal(count(madt, /Processor Enabled : 1/), 4);
      assert.match(madt, new RegExp(`Local Apic Address : ${APIC_START.toString(16).toUpperCase()}`));
      assert.match(
        madt,
        new RegExp(
          `I/O Apic ID : 04[\\s\\S]*?Address : ${
            IOAPIC_START.toString(16).toUpperCase()
          }\\s+\\S+ \\S+ +\\d+\\]\\s+Interrupt : 00000000`,
        ),
      );
      assert.match(madt, /Source : 00\s+\S+ \S+ +\d+\]\s+Interrupt : 00000002/);
      assert.match(madt, /Source : 09\s+\S+ \S+ +\d+\]\s+Interrupt : 00000009[\s\S]*?Polarity : 1\s+Trigger Mode : 3/);
      assert.match(madt, /Local APIC NMI[\s\S]*?Processor ID : FF[\s\S]*?Interrupt Input LINT : 01/);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name:
    "ACPI: acpiexec runs the DSDT — _EVT notifies the power button, the sleep button or VGEN; ADDR, _S5, _CRS evaluate",
  ignore: !haveIasl,
  async fn() {
    using mem = OwnedGuestMemory.allocate(ramRanges(16 * MiB));
    writeAcpiTables(mem, OPTS);
    const tables = walkTables(mem);
    const dir = await Deno.makeTempDir({ prefix: "denovm-acpiexec-" });
    try {
      for (const sig of ["DSDT", "FACP", "APIC"]) await Deno.writeFile(`${dir}/${sig}.dat`, tables.get(sig)!);
      const exec = (cmds: string) => run("acpiexec", ["-b", cmds, "DSDT.dat", "FACP.dat", "APIC.dat"], dir);
      const pressed = await exec(`evaluate \\_SB.GED._EVT ${IRQ_ACPI_SCI}`);
      assert.match(pressed, /Device Notify on \[PWRB\] .* Value 0x80/);
      assert.doesNotMatch(pressed, /Device Notify on \[SLPB\]/);
      const slept = await exec(`evaluate \\_SB.GED._EVT ${IRQ_ACPI_SLEEP_BUTTON}`);
      assert.match(slept, /Device Notify on \[SLPB\] .* Value 0x80/);
      assert.doesNotMatch(slept, /Device Notify on \[PWRB\]/);
      assert.doesNotMatch(pressed + slept, /Device Notify on \[VGEN\]/);
      const changed = await exec(`evaluate \\_SB.GED._EVT ${IRQ_ACPI_VMGENID}`);
      assert.match(changed, /Device Notify on \[VGEN\] .* Value 0x80/);
      assert.doesNotMatch(changed, /Device Notify on \[(PWRB|SLPB)\]/);
      const other = await exec(`evaluate \\_SB.GED._EVT ${IRQ_ACPI_SCI + 1}`);
      assert.doesNotMatch(other, /Device Notify/);
      // What Linux's vmgenid driver evaluates: ADDR, a package of two integers (low and high 32 bits of the
      // ID's address), and the ids its table lists.
      const addr = await exec("evaluate \\_SB.VGEN.ADDR");
      assert.match(
        addr,
        new RegExp(
          `\\[Package\\] Contains 2 Elements:\\s+\\[Integer\\] = 0*${
            VMGENID_PAGE_START.toString(16).toUpperCase()
          }\\s+\\[Integer\\] = 0+\\s`,
        ),
      );
      const ids = await exec("evaluate \\_SB.VGEN._HID; evaluate \\_SB.VGEN._CID");
      assert.match(ids, /\[String\] Length 08 = "VMGENCTR"/);
      assert.match(ids, /\[String\] Length 0E = "VM_GEN_COUNTER"/);
      assert.doesNotMatch(changed + addr + ids, /AE_|Exception/);
      const s5 = await exec("evaluate \\_S5");
      assert.match(s5, /\[Package\] Contains 2 Elements:\s+\[Integer\] = 0+5\s+\[Integer\] = 0+\s/);
      const crs = await exec("evaluate \\_SB.VR02._CRS");
      // Memory32Fixed(0xd0002000, 0x1000) then Interrupt(7), End Tag: matches the AML encoder's bytes.
      assert.match(crs, /86 09 00 01 00 20 00 D0 00 10 00 00 89 06 00 03/);
      assert.doesNotMatch(s5 + crs + pressed, /AE_|Exception/);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "ACPI: a DSDT with 100 virtio devices (multi-byte PkgLength) and 32 CPUs still disassembles cleanly",
  ignore: !haveIasl,
  async fn() {
    using mem = OwnedGuestMemory.allocate(ramRanges(16 * MiB));
    writeAcpiTables(mem, { cpus: 32, virtioMmio: virtio(100), serial: SERIAL_PORTS.slice() });
    const tables = walkTables(mem);
    assert.ok(tables.get("DSDT")!.length > 4096, "big enough to need a 3-byte PkgLength for \\_SB");
    const dir = await Deno.makeTempDir({ prefix: "denovm-acpi-big-" });
    try {
      const dsl = await disassemble(tables, dir);
      const dsdt = dsl.get("DSDT")!;
      assert.equal(count(dsdt, /"LNRO0005"/), 100);
      assert.match(dsdt, /Device \(VR63\)[\s\S]*?0xD0063000,\s+\/\/ Address Base/);
      assert.equal(count(dsdt, /EisaId \("PNP0501"\)/), 4);
      assert.equal(count(dsl.get("APIC")!, /Processor Local APIC/), 32);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test("AML encoder: PkgLength, integers, names, EISA ids", () => {
  assert.deepEqual(aml.pkgLength(0), [1]);
  assert.deepEqual(aml.pkgLength(62), [63]);
  assert.deepEqual(aml.pkgLength(63), [0x41, 0x04]); // total 65 = 0x41: nibble 1, then 0x04
  assert.deepEqual(aml.pkgLength(4093), [0x4f, 0xff]); // total 4095, the largest two-byte length
  assert.deepEqual(aml.pkgLength(4094), [0x81, 0x00, 0x01]); // total 4097 = 0x1001
  assert.deepEqual(aml.integer(0), [aml.ZERO_OP]);
  assert.deepEqual(aml.integer(1), [aml.ONE_OP]);
  assert.deepEqual(aml.integer(0x80), [aml.BYTE_PREFIX, 0x80]);
  assert.deepEqual(aml.integer(0x1234), [aml.WORD_PREFIX, 0x34, 0x12]);
  assert.deepEqual(aml.integer(0xd0000000), [aml.DWORD_PREFIX, 0, 0, 0, 0xd0]);
  assert.deepEqual(aml.integer(2 ** 40), [aml.QWORD_PREFIX, 0, 0, 0, 0, 0, 1, 0, 0]);
  assert.deepEqual(
    aml.nameString("\\_SB.PWRB"),
    [0x5c, 0x2e, ..."_SB_PWRB"].map((c) => typeof c === "number" ? c : c.charCodeAt(0)),
  );
  assert.deepEqual(aml.nameString("A.B.C")[0], aml.MULTI_NAME_PREFIX);
  assert.deepEqual(aml.eisaId("PNP0501"), [aml.DWORD_PREFIX, 0x41, 0xd0, 0x05, 0x01]);
  assert.deepEqual(aml.eisaId("PNP0C0C"), [aml.DWORD_PREFIX, 0x41, 0xd0, 0x0c, 0x0c]);
  assert.throws(() => aml.nameString("toolong"), RangeError);
  assert.ok(dsdtAml(OPTS).length > 0);
});

Deno.test("ACPI: limits are errors, not overruns", () => {
  using mem = OwnedGuestMemory.allocate(ramRanges(16 * MiB));
  assert.throws(() => writeAcpiTables(mem, { ...OPTS, cpus: 0 }), RangeError);
  assert.throws(() => writeAcpiTables(mem, { ...OPTS, cpus: 255 }), RangeError);
  assert.throws(() => writeAcpiTables(mem, { ...OPTS, serial: Array(10).fill(SERIAL_PORTS[0]) }), RangeError);
  // A lone COM2 is still COM2 in the namespace.
  assert.match(new TextDecoder().decode(dsdtAml({ ...OPTS, serial: [SERIAL_PORTS[1]] })), /COM2/);
  assert.doesNotMatch(new TextDecoder().decode(dsdtAml({ ...OPTS, serial: [SERIAL_PORTS[1]] })), /COM1/);
  writeAcpiTables(mem, { cpus: 254, virtioMmio: virtio(256), serial: SERIAL_PORTS.slice() });
  walkTables(mem);
});

Deno.test("virtioMmioCmdlineArgs: Linux's virtio_mmio.device=<size>@<base>:<irq>", () => {
  assert.deepEqual(virtioMmioCmdlineArgs(virtio(2)), [
    "virtio_mmio.device=4K@0xd0000000:5",
    "virtio_mmio.device=4K@0xd0001000:6",
  ]);
  assert.deepEqual(virtioMmioCmdlineArgs([{ base: 0xd0100000, size: 2 * MiB, irq: 12 }]), [
    "virtio_mmio.device=2M@0xd0100000:12",
  ]);
});

// ---- The VM generation ID's page and interrupt ----

Deno.test("VM generation ID: its page is e820-reserved at every memory size, clear of the ACPI and MP tables", () => {
  assert.equal(VMGENID_PAGE_START % VMGENID_PAGE_SIZE, 0, "page aligned");
  const end = VMGENID_PAGE_START + VMGENID_PAGE_SIZE;
  for (const memBytes of [16 * MiB, 256 * MiB, 3 * GiB, 8 * GiB]) {
    const map = e820Map(memBytes);
    const covering = map.filter((e) => e.addr <= VMGENID_PAGE_START && end <= e.addr + e.size);
    assert.deepEqual(covering.map((e) => e.type), [E820_RESERVED], `one reserved entry holds the page (${memBytes})`);
    const ram = map.filter((e) => e.type === E820_RAM && e.addr < end && VMGENID_PAGE_START < e.addr + e.size);
    assert.deepEqual(ram, [], "no RAM entry overlaps the page");
    assert.ok(ramRanges(memBytes)[0].size >= end, "guest memory backs the page");
  }
  assert.ok(end <= ACPI_RSDP_START, "below the RSDP and the ACPI tables");
  assert.ok(MPTABLE_START + mpTableSize(MPTABLE_MAX_CPUS) <= VMGENID_PAGE_START, "above the largest MP table");
});

Deno.test("VM generation ID: its GED interrupt is an IOAPIC pin no other device or event uses", () => {
  assert.ok(IRQ_ACPI_VMGENID < IOAPIC_PINS);
  const others = [IRQ_ACPI_SCI, IRQ_ACPI_SLEEP_BUTTON, ...SERIAL_PORTS.map((p) => p.irq), ...VIRTIO_IRQS];
  assert.ok(!others.includes(IRQ_ACPI_VMGENID), `GSI ${IRQ_ACPI_VMGENID} is taken`);
});

Deno.test({
  name: 'ACPI: ACPICA hands a _CID string to the OS upper-cased, so QEMU\'s "VM_Gen_Counter" and ours are the same id',
  ignore: !haveIasl,
  async fn() {
    // Linux matches ids with a case-sensitive strcmp; this is why its table's "VM_GEN_COUNTER" matches QEMU's
    // and Firecracker's mixed-case _CID, and why denovm's upper-case one needs no such repair.
    const mixed = dsdtAml(OPTS);
    const at = new TextDecoder("latin1").decode(new Uint8Array(mixed)).indexOf("VM_GEN_COUNTER");
    assert.ok(at > 0);
    mixed.set(new TextEncoder().encode("VM_Gen_Counter"), at);
    const table = new Uint8Array(36 + mixed.length);
    table.set(new TextEncoder().encode("DSDT"), 0);
    new DataView(table.buffer).setUint32(4, table.length, true);
    table[8] = 2;
    table.set(mixed, 36);
    table[9] = (0x100 - sum8(table)) & 0xff;
    const dir = await Deno.makeTempDir({ prefix: "denovm-acpi-cid-" });
    try {
      await Deno.writeFile(`${dir}/DSDT.dat`, table);
      const out = await run("acpiexec", ["-b", "evaluate \\_SB.VGEN._CID", "DSDT.dat"], dir);
      assert.match(out, /\[String\] Length 0E = "VM_GEN_COUNTER"/);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

// ---- MP table (Intel MultiProcessor Specification 1.4) ----

function checkMpTable(mem: OwnedGuestMemory, cpus: number) {
  const mpf = mem.read(MPTABLE_START, 16);
  assert.equal(ascii(mpf.subarray(0, 4)), "_MP_");
  assert.equal(sum8(mpf), 0, "floating pointer checksum");
  assert.equal(mpf[8], 1, "floating pointer length: one paragraph");
  assert.equal(mpf[9], 4, "spec revision 1.4");
  assert.equal(mpf[11], 0, "feature byte 1 = 0: a configuration table is present");
  const cfgAddr = new DataView(mpf.buffer).getUint32(4, true);
  const len = mem.getU16(cfgAddr + 4);
  const cfg = mem.read(cfgAddr, len);
  const dv = new DataView(cfg.buffer);
  assert.equal(ascii(cfg.subarray(0, 4)), "PCMP");
  assert.equal(sum8(cfg), 0, "configuration table checksum");
  assert.equal(cfg[6], 4);
  assert.equal(ascii(cfg.subarray(8, 16)), "DENOVM  ");
  assert.equal(dv.getUint32(36, true), APIC_START);
  assert.equal(cfgAddr - MPTABLE_START + len, mpTableSize(cpus));

  const entries = dv.getUint16(34, true);
  const seen = {
    cpu: [] as { id: number; flags: number }[],
    bus: [] as string[],
    ioapic: [] as number[][],
    io: [] as number[][],
    local: [] as number[][],
  };
  let at = 44;
  for (let i = 0; i < entries; i++) {
    const type = cfg[at];
    if (type === 0) {
      seen.cpu.push({ id: cfg[at + 1], flags: cfg[at + 3] });
      at += 20;
      continue;
    }
    const e = [...cfg.subarray(at, at + 8)];
    if (type === 1) seen.bus.push(ascii(cfg.subarray(at + 2, at + 8)));
    else if (type === 2) seen.ioapic.push(e);
    else if (type === 3) seen.io.push(e);
    else if (type === 4) seen.local.push(e);
    else assert.fail(`unknown MP entry type ${type}`);
    at += 8;
  }
  assert.equal(at, len, "entries fill the base table exactly");
  assert.deepEqual(seen.cpu.map((c) => c.id), Array.from({ length: cpus }, (_, i) => i));
  assert.deepEqual(
    seen.cpu.map((c) => c.flags),
    Array.from({ length: cpus }, (_, i) => i === 0 ? 3 : 1),
    "EN on all, BP on CPU 0",
  );
  assert.deepEqual(seen.bus, ["ISA   "]);
  assert.equal(seen.ioapic.length, 1);
  assert.equal(seen.ioapic[0][1], cpus, "IOAPIC id = cpus");
  assert.equal(seen.ioapic[0][3] & 1, 1, "IOAPIC enabled");
  assert.equal(new DataView(new Uint8Array(seen.ioapic[0]).buffer).getUint32(4, true), IOAPIC_START);
  // ISA IRQs 0..15 except the cascade (2); IRQ 0 on pin 2, the rest identity; SCI level/high.
  const byIrq = new Map(seen.io.map((e) => [e[5], e]));
  assert.deepEqual([...byIrq.keys()].sort((a, b) => a - b), [0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]);
  for (const [irq, e] of byIrq) {
    assert.equal(e[1], 0, "INT");
    assert.equal(e[6], cpus, "destination IOAPIC");
    assert.equal(e[7], irq === 0 ? 2 : irq);
    assert.equal(e[2], irq === IRQ_ACPI_SCI ? 0x0d : 0, "flags");
  }
  assert.deepEqual(
    seen.local.map((e) => [e[1], e[6], e[7]]),
    [[3, 0xff, 0], [1, 0xff, 1]],
    "ExtINT on LINT0, NMI on LINT1",
  );
}

Deno.test("MP table: floating pointer and configuration table for 4 CPUs, checksums right", () => {
  using mem = OwnedGuestMemory.allocate(ramRanges(16 * MiB));
  writeMpTable(mem, 4);
  checkMpTable(mem, 4);
});

Deno.test("MP table: 1 and the maximum CPUs fit below the ACPI area; more is an error", () => {
  using mem = OwnedGuestMemory.allocate(ramRanges(16 * MiB));
  writeMpTable(mem, 1);
  checkMpTable(mem, 1);
  writeMpTable(mem, MPTABLE_MAX_CPUS);
  checkMpTable(mem, MPTABLE_MAX_CPUS);
  assert.ok(MPTABLE_START + mpTableSize(MPTABLE_MAX_CPUS) <= ACPI_RSDP_START);
  assert.throws(() => writeMpTable(mem, MPTABLE_MAX_CPUS + 1), RangeError);
  assert.throws(() => writeMpTable(mem, 0), RangeError);
});
