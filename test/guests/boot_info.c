/*
 * Reports what the VMM set up before the first instruction: entry state, zero page (boot protocol
 * header, command line, e820, initrd), long mode control registers, ACPI tables and MP table.
 * One line per fact on COM1, then DONE and ACPI power-off.
 */
#include "rt.h"

/* struct boot_params / setup_header offsets (Linux arch/x86/include/uapi/asm/bootparam.h,
 * Documentation/arch/x86/zero-page.rst and boot.rst). */
#define BP_EXT_RAMDISK_IMAGE 0x0c0
#define BP_EXT_RAMDISK_SIZE 0x0c4
#define BP_EXT_CMD_LINE_PTR 0x0c8
#define BP_E820_ENTRIES 0x1e8
#define BP_BOOT_FLAG 0x1fe
#define BP_HEADER 0x202
#define BP_TYPE_OF_LOADER 0x210
#define BP_RAMDISK_IMAGE 0x218
#define BP_RAMDISK_SIZE 0x21c
#define BP_CMD_LINE_PTR 0x228
#define BP_E820_TABLE 0x2d0
#define BP_E820_MAX 128       /* E820_MAX_ENTRIES_ZEROPAGE */
#define E820_ENTRY_SIZE 20    /* struct boot_e820_entry: u64 addr, u64 size, u32 type (packed) */
#define HDRS_MAGIC 0x53726448 /* "HdrS" */

/* Control register and EFER bits (Intel SDM vol. 3 section 2.5, vol. 4 IA32_EFER). */
#define EFER_LME (1u << 8)
#define EFER_LMA (1u << 10)
#define CR0_PE 1u
#define CR0_PG (1u << 31)
#define CR4_PAE (1u << 5)

/* FADT fields (ACPI 6.4 section 5.2.9, table 5.9). */
#define FADT_FLAGS 112
#define FADT_RESET_REG 116
#define FADT_RESET_VALUE 128
#define FADT_DSDT 40
#define FADT_X_DSDT 140
#define FADT_SLEEP_CONTROL_REG 244
#define FADT_SLEEP_STATUS_REG 256
#define FADT_MIN_LEN_SLEEP_REGS 268
#define FADT_HW_REDUCED_ACPI (1u << 20)
#define GAS_ADDRESS 4 /* Generic Address Structure: space, width, offset, access size, u64 address */

/* MADT (ACPI 6.4 section 5.2.12). */
#define MADT_ENTRIES 44
#define MADT_TYPE_LOCAL_APIC 0
#define MADT_LAPIC_FLAGS 4
#define MADT_LAPIC_ENABLED 1u

/* MP specification 1.4, chapter 4: floating pointer and configuration table. */
#define MPF_LEN 16
#define MPF_PHYSPTR 4
#define MPF_SEARCH_LEN 1024 /* the first KiB of the EBDA */
#define MPC_LENGTH 4
#define MPC_COUNT 34
#define MPC_ENTRIES 44
#define MPC_TYPE_PROCESSOR 0
#define MPC_PROCESSOR_LEN 20
#define MPC_OTHER_LEN 8 /* bus (1), I/O APIC (2), I/O interrupt (3), local interrupt (4) */
#define MPC_TYPE_LAST_BASE 4
#define MPC_CPU_FLAGS 3
#define MPC_CPU_ENABLED 1u

static const char *ok(int good) { return good ? "ok" : "bad"; }

static void report_entry(void) {
  struct desc_ptr gdtr = sgdt();
  printf("ENTRY rsp=0x%llx rflags=0x%llx cs=0x%llx ds=0x%llx ss=0x%llx rsi=0x%llx\n", entry_rsp, entry_rflags,
         entry_cs, entry_ds, entry_ss, boot_params);
  printf("GDT base=0x%llx limit=0x%x\n", gdtr.base, gdtr.limit);
  for (u32 i = 0; (i + 1) * 8 <= (u32)gdtr.limit + 1; i++) printf("GDTE %u 0x%llx\n", i, rd64(gdtr.base + i * 8));
}

static void report_zero_page(u64 zp) {
  printf("ZP boot_flag=0x%x header=%c%c%c%c loader=0x%x\n", rd16(zp + BP_BOOT_FLAG), rd8(zp + BP_HEADER),
         rd8(zp + BP_HEADER + 1), rd8(zp + BP_HEADER + 2), rd8(zp + BP_HEADER + 3), rd8(zp + BP_TYPE_OF_LOADER));

  u64 cmdline = rd32(zp + BP_CMD_LINE_PTR) | ((u64)rd32(zp + BP_EXT_CMD_LINE_PTR) << 32);
  puts("CMDLINE ");
  if (cmdline)
    for (u64 i = 0; i < CMDLINE_MAX_SIZE && rd8(cmdline + i); i++) putc((char)rd8(cmdline + i));
  printf("\n");

  u32 n = rd8(zp + BP_E820_ENTRIES);
  if (n > BP_E820_MAX) n = BP_E820_MAX;
  printf("E820 entries=%u\n", n);
  for (u32 i = 0; i < n; i++) {
    u64 e = zp + BP_E820_TABLE + i * E820_ENTRY_SIZE;
    printf("E820 0x%llx 0x%llx %u\n", rd64(e), rd64(e + 8), rd32(e + 16));
  }

  u64 addr = rd32(zp + BP_RAMDISK_IMAGE) | ((u64)rd32(zp + BP_EXT_RAMDISK_IMAGE) << 32);
  u64 size = rd32(zp + BP_RAMDISK_SIZE) | ((u64)rd32(zp + BP_EXT_RAMDISK_SIZE) << 32);
  if (!size) {
    printf("INITRD none\n");
  } else {
    u32 sum = 0;
    const volatile u8 *p = (const volatile u8 *)addr;
    for (u64 i = 0; i < size; i++) sum += p[i];
    printf("INITRD 0x%llx 0x%llx sum=0x%x\n", addr, size, sum);
  }
}

static void report_long_mode(void) {
  printf("LONGMODE efer=0x%llx cr0=0x%llx cr3=0x%llx cr4=0x%llx\n", rdmsr(MSR_EFER), READ_CR(0), READ_CR(3), READ_CR(4));
}

static u64 dsdt_of(u64 fadt) {
  u32 len = rd32(fadt + 4);
  u64 x = len >= FADT_X_DSDT + 8 ? rd64(fadt + FADT_X_DSDT) : 0;
  return x ? x : rd32(fadt + FADT_DSDT);
}

static int table_ok(u64 t, const char *sig) {
  return t && memcmp((const void *)t, sig, 4) == 0 && acpi_checksum_ok(t, rd32(t + 4));
}

static void report_acpi(void) {
  u64 rsdp = acpi_find_rsdp();
  u64 xsdt = rsdp ? rd64(rsdp + 24) : 0;
  u64 fadt = acpi_find_table("FACP");
  u64 madt = acpi_find_table("APIC");
  u64 dsdt = table_ok(fadt, "FACP") ? dsdt_of(fadt) : 0;
  u32 lapics = 0;
  if (table_ok(madt, "APIC")) {
    u32 len = rd32(madt + 4);
    for (u32 off = MADT_ENTRIES; off + 2 <= len;) {
      u8 type = rd8(madt + off), elen = rd8(madt + off + 1);
      if (elen < 2) break;
      if (type == MADT_TYPE_LOCAL_APIC && (rd32(madt + off + MADT_LAPIC_FLAGS) & MADT_LAPIC_ENABLED)) lapics++;
      off += elen;
    }
  }
  printf("ACPI rsdp=%s xsdt=%s fadt=%s madt_lapics=%u dsdt=%s\n", ok(rsdp == ACPI_RSDP_START), ok(table_ok(xsdt, "XSDT")),
         ok(table_ok(fadt, "FACP")), lapics, ok(table_ok(dsdt, "DSDT")));
  if (table_ok(fadt, "FACP")) {
    u32 len = rd32(fadt + 4);
    int regs = len >= FADT_MIN_LEN_SLEEP_REGS;
    printf("FADT hw_reduced=%u sleep_control=0x%llx sleep_status=0x%llx reset=0x%llx reset_value=0x%x\n",
           (rd32(fadt + FADT_FLAGS) & FADT_HW_REDUCED_ACPI) ? 1 : 0,
           regs ? rd64(fadt + FADT_SLEEP_CONTROL_REG + GAS_ADDRESS) : 0,
           regs ? rd64(fadt + FADT_SLEEP_STATUS_REG + GAS_ADDRESS) : 0, rd64(fadt + FADT_RESET_REG + GAS_ADDRESS),
           rd8(fadt + FADT_RESET_VALUE));
  }
}

static void report_mptable(void) {
  for (u64 mpf = MPTABLE_START; mpf < MPTABLE_START + MPF_SEARCH_LEN; mpf += MPF_LEN) {
    if (memcmp((const void *)mpf, "_MP_", 4) != 0 || !acpi_checksum_ok(mpf, MPF_LEN)) continue;
    u64 mpc = rd32(mpf + MPF_PHYSPTR);
    if (!mpc || memcmp((const void *)mpc, "PCMP", 4) != 0 || !acpi_checksum_ok(mpc, rd16(mpc + MPC_LENGTH))) {
      printf("MPTABLE bad config table\n");
      return;
    }
    /* Walk the entries by the table's length, as Linux's smp_read_mpc() does (not by the entry count). */
    u32 cpus = 0, entries = 0, known = 1;
    u64 e = mpc + MPC_ENTRIES, end = mpc + rd16(mpc + MPC_LENGTH);
    while (e < end) {
      u8 type = rd8(e);
      if (type == MPC_TYPE_PROCESSOR) {
        if (rd8(e + MPC_CPU_FLAGS) & MPC_CPU_ENABLED) cpus++;
        e += MPC_PROCESSOR_LEN;
      } else if (type <= MPC_TYPE_LAST_BASE) {
        e += MPC_OTHER_LEN;
      } else {
        known = 0;
        break;
      }
      entries++;
    }
    int good = known && e == end && entries == rd16(mpc + MPC_COUNT);
    if (!good)
      printf("MPTABLE_DETAIL length=%u count=%u walked=%u known_types=%u\n", rd16(mpc + MPC_LENGTH), rd16(mpc + MPC_COUNT),
             entries, known);
    printf("MPTABLE cpus=%u %s\n", cpus, ok(good));
    return;
  }
  printf("MPTABLE bad no floating pointer\n");
}

void guest_main(void) {
  report_entry();
  report_zero_page(boot_params);
  report_long_mode();
  report_acpi();
  report_mptable();
  printf("DONE\n");
}
