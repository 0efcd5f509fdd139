/*
 * A small virtio-mmio driver: finds every virtio-mmio transport in the DSDT (LNRO0005 devices and
 * their _CRS), negotiates VIRTIO_F_VERSION_1 only, sets up one split queue, routes the device's
 * interrupt through the IOAPIC and drives it:
 *   block (id 2):   capacity from config, write sector 1 + read back + compare (unless read-only), read sector 0;
 *   console (id 3): one message on port 0's transmit queue;
 *   rng (id 4):     64 random bytes.
 * Completion is seen by the interrupt handler (InterruptStatus read, InterruptACK write), never by
 * polling the used ring. One line per fact on COM1, then VIRTIO DONE and ACPI power-off.
 *
 * Lines (parsed by test/kvm_virtio_test.ts):
 *   VIRTIO found=<n>
 *   VIRTIO dev <i> id=<id> base=0x<b> size=0x<s> gsi=<g> edge=<0|1> low=<0|1>
 *   VIRTIO blk cap=<sectors> rw=<ok|ro> sum0=<fnv1a-32 hex of sector 0>   (ro: no write tried)
 *   VIRTIO rng bytes=64 nonzero=<count>
 *   VIRTIO console tx=ok
 *   VIRTIO irq <i> <name> irqs=<used-buffer interrupts of that device> spurious=<interrupts with status 0>
 *   VIRTIO skip <i> id=<id>          (a device type this guest does not drive)
 *   VIRTIO irqs=<total>
 *   VIRTIO DONE
 * or VIRTIO FAIL <reason> and debug exit GUEST_EXIT_FAILURE.
 */
#include "rt.h"

/* ---- virtio-mmio registers (virtio 1.2 section 4.2.2; Linux include/uapi/linux/virtio_mmio.h) ---- */
#define VMMIO_MAGIC_VALUE 0x000
#define VMMIO_VERSION 0x004
#define VMMIO_DEVICE_ID 0x008
#define VMMIO_DEVICE_FEATURES 0x010
#define VMMIO_DEVICE_FEATURES_SEL 0x014
#define VMMIO_DRIVER_FEATURES 0x020
#define VMMIO_DRIVER_FEATURES_SEL 0x024
#define VMMIO_QUEUE_SEL 0x030
#define VMMIO_QUEUE_NUM_MAX 0x034
#define VMMIO_QUEUE_NUM 0x038
#define VMMIO_QUEUE_READY 0x044
#define VMMIO_QUEUE_NOTIFY 0x050
#define VMMIO_INTERRUPT_STATUS 0x060
#define VMMIO_INTERRUPT_ACK 0x064
#define VMMIO_STATUS 0x070
#define VMMIO_QUEUE_DESC_LOW 0x080
#define VMMIO_QUEUE_DESC_HIGH 0x084
#define VMMIO_QUEUE_AVAIL_LOW 0x090
#define VMMIO_QUEUE_AVAIL_HIGH 0x094
#define VMMIO_QUEUE_USED_LOW 0x0a0
#define VMMIO_QUEUE_USED_HIGH 0x0a4
#define VMMIO_CONFIG_GENERATION 0x0fc
#define VMMIO_CONFIG 0x100
#define VMMIO_MAGIC 0x74726976 /* "virt" */
#define VMMIO_VERSION_MODERN 2
#define VMMIO_INT_VRING 1u

/* Device status bits (virtio 1.2 section 2.1; virtio_config.h). */
#define STATUS_ACKNOWLEDGE 1u
#define STATUS_DRIVER 2u
#define STATUS_DRIVER_OK 4u
#define STATUS_FEATURES_OK 8u
#define STATUS_FAILED 128u

/* VIRTIO_F_VERSION_1 is feature bit 32 (virtio 1.2 section 6): bit 0 of feature word 1. */
#define FEATURE_WORD_HIGH 1
#define F_VERSION_1_HIGH 1u

/* Device ids (virtio 1.2 section 5). */
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_CONSOLE 3
#define VIRTIO_ID_RNG 4

/* Split virtqueue (virtio 1.2 section 2.7; virtio_ring.h). */
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define QUEUE_SIZE 16
#define MIN_QUEUE_SIZE 4 /* a block request takes 3 descriptors */
struct vring_desc {
  u64 addr;
  u32 len;
  u16 flags;
  u16 next;
};
struct vring_avail {
  u16 flags;
  u16 idx;
  u16 ring[QUEUE_SIZE];
  u16 used_event;
};
struct vring_used_elem {
  u32 id;
  u32 len;
};
struct vring_used {
  u16 flags;
  u16 idx;
  struct vring_used_elem ring[QUEUE_SIZE];
  u16 avail_event;
};
/* One page per queue: descriptors (16-byte aligned), avail ring (2), used ring (4). */
struct vq {
  struct vring_desc desc[QUEUE_SIZE];
  struct vring_avail avail;
  u8 pad[6];
  struct vring_used used;
} __attribute__((aligned(4096)));

/* virtio-blk (virtio 1.2 section 5.2; virtio_blk.h): config capacity (le64 sectors), feature RO,
 * request header {type, reserved, sector}, request types and the status byte. */
#define BLK_CONFIG_CAPACITY 0
#define BLK_F_RO_BIT 5
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_S_OK 0
#define SECTOR_SIZE 512
struct blk_req_hdr {
  u32 type;
  u32 reserved;
  u64 sector;
};
#define BLK_QUEUE 0
#define BLK_TEST_SECTOR 1

/* virtio-console (virtio 1.2 section 5.3): queue 1 is port 0's transmitq. rng (5.4): queue 0. */
#define CONSOLE_TX_QUEUE 1
#define RNG_QUEUE 0
#define RNG_BYTES 64

/* DSDT (ACPI 6.4 section 5.2.11.1) and the AML it holds (section 20.2). */
#define SDT_LENGTH 4
#define SDT_HEADER_LEN 36
#define FADT_DSDT 40
#define FADT_X_DSDT 140
#define AML_NAME_OP 0x08
#define AML_STRING_PREFIX 0x0d
#define AML_BUFFER_OP 0x11
#define AML_EXT_OP_PREFIX 0x5b
#define AML_DEVICE_OP 0x82
#define AML_ZERO_OP 0x00
#define AML_ONE_OP 0x01
#define AML_BYTE_PREFIX 0x0a
#define AML_WORD_PREFIX 0x0b
#define AML_DWORD_PREFIX 0x0c
#define AML_ROOT_CHAR 0x5c
#define AML_PARENT_PREFIX 0x5e
#define AML_DUAL_NAME_PREFIX 0x2e
#define AML_MULTI_NAME_PREFIX 0x2f
#define AML_NAME_SEG_LEN 4
/* Resource descriptors (ACPI 6.4 section 6.4): large items have bit 7 set and a 16-bit length. */
#define RES_LARGE 0x80
#define RES_LARGE_HEADER 3
#define RES_SMALL_LEN_MASK 0x07
#define RES_SMALL_NAME_SHIFT 3
#define RES_SMALL_NAME_MASK 0x0f
#define RES_SMALL_END_TAG 0x0f
#define RES_MEMORY32_FIXED 0x86 /* 6.4.3.4: info, base (le32), length (le32) */
#define RES_MEMORY32_FIXED_LEN 9
#define RES_EXTENDED_IRQ 0x89 /* 6.4.3.6: flags, count, count x le32 */
#define RES_EXT_IRQ_MIN_LEN 6
#define RES_EXT_IRQ_EDGE (1u << 1)
#define RES_EXT_IRQ_ACTIVE_LOW (1u << 2)
static const char HID_VIRTIO_MMIO[] = "LNRO0005"; /* Linux drivers/virtio/virtio_mmio.c ACPI match */

/* Interrupt vectors: one per device from VIRTIO_VECTOR_BASE; the LAPIC timer wakes hlt as a watchdog. */
#define MAX_DEVICES 16
#define VIRTIO_VECTOR_BASE 0x40
#define WATCHDOG_VECTOR 0x3f
/* Local APIC timer (Intel SDM vol. 3 section 11.5.4): LVT timer, initial count, divide configuration. */
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INITIAL 0x380
#define LAPIC_TIMER_DIVIDE 0x3e0
#define LAPIC_TIMER_PERIODIC (1u << 17)
#define LAPIC_TIMER_DIVIDE_BY_16 0x3
#define WATCHDOG_COUNT 0x400000u  /* about 67 ms at a 1 GHz APIC clock / 16 */
#define WATCHDOG_TICKS 150u       /* about 10 s of no completion: give up */

struct vdev {
  u64 base;
  u32 size, gsi;
  int edge, active_low;
  u32 id;
  int read_only; /* block: VIRTIO_BLK_F_RO offered (accepted or not, the device refuses writes) */
  const char *name;
  volatile u32 irqs;      /* interrupts with a used-buffer notification */
  volatile u32 spurious;  /* interrupts with InterruptStatus 0 */
  struct vq *q;
  u16 qsize; /* entries in use: a power of 2, at most QUEUE_SIZE and QueueNumMax */
  u16 last_used;
  u16 next_avail;
};

static struct vdev devs[MAX_DEVICES];
static u32 ndevs;
static struct vq queues[MAX_DEVICES] __attribute__((aligned(4096)));
static volatile u32 watchdog_ticks;

/* Request buffers (guest-physical = virtual, identity mapped). */
static struct blk_req_hdr blk_hdr;
static u8 blk_data[SECTOR_SIZE] __attribute__((aligned(SECTOR_SIZE)));
static volatile u8 blk_status;
static u8 rng_buf[RNG_BYTES];
static const char console_msg[] = "hello from virtio console\n";

static void fail(const char *what, const struct vdev *d) {
  if (d)
    printf("VIRTIO FAIL %s: dev id=%u base=0x%llx status=0x%x isr=0x%x irqs=%u used=%u\n", what, d->id, d->base,
           rd32(d->base + VMMIO_STATUS), rd32(d->base + VMMIO_INTERRUPT_STATUS), d->irqs,
           d->q ? d->q->used.idx : 0);
  else
    printf("VIRTIO FAIL %s\n", what);
  debug_exit(GUEST_EXIT_FAILURE);
}

/* ---- DSDT discovery ---- */

static u64 find_dsdt(void) {
  u64 fadt = acpi_find_table("FACP");
  if (!fadt) return 0;
  u32 len = rd32(fadt + SDT_LENGTH);
  u64 dsdt = len >= FADT_X_DSDT + 8 ? rd64(fadt + FADT_X_DSDT) : 0;
  if (!dsdt) dsdt = rd32(fadt + FADT_DSDT);
  if (!dsdt || memcmp((const void *)dsdt, "DSDT", 4) != 0 || !acpi_checksum_ok(dsdt, rd32(dsdt + SDT_LENGTH))) return 0;
  return dsdt;
}

/* PkgLength (ACPI 6.4 section 20.2.4) at p: its value (which counts its own bytes), and its size in *n. */
static u32 pkg_length(const u8 *p, const u8 *end, u32 *n) {
  if (p >= end) return 0;
  u32 extra = p[0] >> 6;
  if (p + 1 + extra > end) return 0;
  *n = 1 + extra;
  if (!extra) return p[0] & 0x3f;
  u32 v = p[0] & 0x0f;
  for (u32 i = 0; i < extra; i++) v |= (u32)p[1 + i] << (4 + 8 * i);
  return v;
}

/* Length of the NameString at p (20.2.2), or 0 if it is not one. */
static u32 name_string_len(const u8 *p, const u8 *end) {
  const u8 *q = p;
  if (q < end && *q == AML_ROOT_CHAR) q++;
  while (q < end && *q == AML_PARENT_PREFIX) q++;
  if (q >= end) return 0;
  u32 segs = 1;
  if (*q == AML_DUAL_NAME_PREFIX) segs = 2, q++;
  else if (*q == AML_MULTI_NAME_PREFIX) {
    if (q + 1 >= end) return 0;
    segs = q[1], q += 2;
  } else if (*q == AML_ZERO_OP) return (u32)(q + 1 - p);
  for (u32 s = 0; s < segs; s++, q += AML_NAME_SEG_LEN) {
    if (q + AML_NAME_SEG_LEN > end) return 0;
    u8 c = q[0];
    if (!((c >= 'A' && c <= 'Z') || c == '_')) return 0;
    for (u32 i = 1; i < AML_NAME_SEG_LEN; i++) {
      c = q[i];
      if (!((c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_')) return 0;
    }
  }
  return (u32)(q - p);
}

/* Integer data object at p (ZeroOp, OneOp, Byte/Word/DWord prefix); bytes used in *n, 0 if not one. */
static int aml_integer(const u8 *p, const u8 *end, u32 *v, u32 *n) {
  if (p >= end) return 0;
  u32 size;
  switch (p[0]) {
    case AML_ZERO_OP: *v = 0, *n = 1; return 1;
    case AML_ONE_OP: *v = 1, *n = 1; return 1;
    case AML_BYTE_PREFIX: size = 1; break;
    case AML_WORD_PREFIX: size = 2; break;
    case AML_DWORD_PREFIX: size = 4; break;
    default: return 0;
  }
  if (p + 1 + size > end) return 0;
  *v = 0;
  for (u32 i = 0; i < size; i++) *v |= (u32)p[1 + i] << (8 * i);
  *n = 1 + size;
  return 1;
}

/* Does [p, end) hold `Name(seg, ...)` starting at p? */
static int is_name_of(const u8 *p, const u8 *end, const char *seg) {
  return p + 1 + AML_NAME_SEG_LEN <= end && p[0] == AML_NAME_OP && memcmp(p + 1, seg, AML_NAME_SEG_LEN) == 0;
}

/* Walk a resource template's bytes for Memory32Fixed and Extended Interrupt. */
static int parse_crs(const u8 *p, const u8 *end, struct vdev *d) {
  int have_mem = 0, have_irq = 0;
  while (p < end) {
    if (p[0] & RES_LARGE) {
      if (p + RES_LARGE_HEADER > end) return 0;
      u32 len = p[1] | (u32)p[2] << 8;
      const u8 *b = p + RES_LARGE_HEADER;
      if (b + len > end) return 0;
      if (p[0] == RES_MEMORY32_FIXED && len >= RES_MEMORY32_FIXED_LEN) {
        d->base = b[1] | (u32)b[2] << 8 | (u32)b[3] << 16 | (u32)b[4] << 24;
        d->size = b[5] | (u32)b[6] << 8 | (u32)b[7] << 16 | (u32)b[8] << 24;
        have_mem = 1;
      } else if (p[0] == RES_EXTENDED_IRQ && len >= RES_EXT_IRQ_MIN_LEN && b[1] >= 1) {
        d->edge = (b[0] & RES_EXT_IRQ_EDGE) != 0;
        d->active_low = (b[0] & RES_EXT_IRQ_ACTIVE_LOW) != 0;
        d->gsi = b[2] | (u32)b[3] << 8 | (u32)b[4] << 16 | (u32)b[5] << 24;
        have_irq = 1;
      }
      p = b + len;
    } else {
      if (((p[0] >> RES_SMALL_NAME_SHIFT) & RES_SMALL_NAME_MASK) == RES_SMALL_END_TAG) break;
      p += 1 + (p[0] & RES_SMALL_LEN_MASK);
    }
  }
  return have_mem && have_irq;
}

/* The Device body [p, end): is it a LNRO0005 device with a usable _CRS? Nested devices are skipped. */
static int parse_device(const u8 *p, const u8 *end, struct vdev *d) {
  int hid = 0, crs = 0;
  u32 hid_len = sizeof(HID_VIRTIO_MMIO); /* with its NUL */
  while (p < end) {
    if (p + 1 < end && p[0] == AML_EXT_OP_PREFIX && p[1] == AML_DEVICE_OP) {
      u32 n, len = pkg_length(p + 2, end, &n);
      if (len < n || p + 2 + len > end) return 0;
      p += 2 + len;
      continue;
    }
    if (is_name_of(p, end, "_HID")) {
      const u8 *v = p + 1 + AML_NAME_SEG_LEN;
      if (v + 1 + hid_len <= end && v[0] == AML_STRING_PREFIX && memcmp(v + 1, HID_VIRTIO_MMIO, hid_len) == 0) hid = 1;
      p = v;
      continue;
    }
    if (is_name_of(p, end, "_CRS") && p + 1 + AML_NAME_SEG_LEN < end && p[1 + AML_NAME_SEG_LEN] == AML_BUFFER_OP) {
      const u8 *b = p + 2 + AML_NAME_SEG_LEN;
      u32 n, len = pkg_length(b, end, &n);
      const u8 *bend = b + len;
      u32 size, sn;
      if (len < n || bend > end || !aml_integer(b + n, bend, &size, &sn)) return 0;
      const u8 *data = b + n + sn;
      if (data + size > bend) return 0;
      crs = parse_crs(data, data + size, d);
      p = bend;
      continue;
    }
    p++;
  }
  return hid && crs;
}

/* Scan the DSDT's AML for Device() objects and keep the virtio-mmio ones. */
static void discover(u64 dsdt) {
  const u8 *start = (const u8 *)(dsdt + SDT_HEADER_LEN);
  const u8 *end = (const u8 *)(dsdt + rd32(dsdt + SDT_LENGTH));
  for (const u8 *p = start; p + 2 < end && ndevs < MAX_DEVICES; p++) {
    if (p[0] != AML_EXT_OP_PREFIX || p[1] != AML_DEVICE_OP) continue;
    u32 n, len = pkg_length(p + 2, end, &n);
    if (len < n || p + 2 + len > end) continue;
    const u8 *body = p + 2 + n, *dend = p + 2 + len;
    u32 nl = name_string_len(body, dend);
    if (!nl) continue;
    struct vdev d;
    memset(&d, 0, sizeof(d));
    if (parse_device(body + nl, dend, &d)) devs[ndevs++] = d;
  }
}

/* ---- Interrupts ---- */

static void on_virtio_irq(struct irq_frame *f) {
  struct vdev *d = &devs[f->vector - VIRTIO_VECTOR_BASE];
  u32 isr = rd32(d->base + VMMIO_INTERRUPT_STATUS);
  if (isr) wr32(d->base + VMMIO_INTERRUPT_ACK, isr);
  if (isr & VMMIO_INT_VRING) d->irqs++;
  else if (!isr) d->spurious++;
}

static void on_watchdog(struct irq_frame *f) {
  (void)f;
  watchdog_ticks++;
}

/* ---- Device set-up (virtio 1.2 section 3.1.1, driver initialization) ---- */

static void set_status(struct vdev *d, u32 bits) { wr32(d->base + VMMIO_STATUS, rd32(d->base + VMMIO_STATUS) | bits); }

static void negotiate(struct vdev *d) {
  wr32(d->base + VMMIO_STATUS, 0); /* reset */
  if (rd32(d->base + VMMIO_STATUS) != 0) fail("reset did not clear status", d);
  set_status(d, STATUS_ACKNOWLEDGE);
  set_status(d, STATUS_DRIVER);
  wr32(d->base + VMMIO_DEVICE_FEATURES_SEL, FEATURE_WORD_HIGH);
  u32 high = rd32(d->base + VMMIO_DEVICE_FEATURES);
  wr32(d->base + VMMIO_DEVICE_FEATURES_SEL, 0);
  u32 low = rd32(d->base + VMMIO_DEVICE_FEATURES);
  if (!(high & F_VERSION_1_HIGH)) fail("device does not offer VIRTIO_F_VERSION_1", d);
  if (d->id == VIRTIO_ID_BLOCK) d->read_only = (low & (1u << BLK_F_RO_BIT)) != 0;
  wr32(d->base + VMMIO_DRIVER_FEATURES_SEL, 0);
  wr32(d->base + VMMIO_DRIVER_FEATURES, 0);
  wr32(d->base + VMMIO_DRIVER_FEATURES_SEL, FEATURE_WORD_HIGH);
  wr32(d->base + VMMIO_DRIVER_FEATURES, F_VERSION_1_HIGH);
  set_status(d, STATUS_FEATURES_OK);
  if (!(rd32(d->base + VMMIO_STATUS) & STATUS_FEATURES_OK)) fail("FEATURES_OK not accepted", d);
}

static void setup_queue(struct vdev *d, u32 index) {
  wr32(d->base + VMMIO_QUEUE_SEL, index);
  if (rd32(d->base + VMMIO_QUEUE_READY)) fail("queue already ready after reset", d);
  u32 max = rd32(d->base + VMMIO_QUEUE_NUM_MAX);
  u32 size = QUEUE_SIZE;
  while (size > max) size /= 2;
  if (size < MIN_QUEUE_SIZE) fail("QueueNumMax too small", d);
  d->qsize = (u16)size;
  struct vq *q = d->q;
  memset(q, 0, sizeof(*q));
  u64 desc = (u64)q->desc, avail = (u64)&q->avail, used = (u64)&q->used;
  wr32(d->base + VMMIO_QUEUE_NUM, size);
  wr32(d->base + VMMIO_QUEUE_DESC_LOW, (u32)desc);
  wr32(d->base + VMMIO_QUEUE_DESC_HIGH, (u32)(desc >> 32));
  wr32(d->base + VMMIO_QUEUE_AVAIL_LOW, (u32)avail);
  wr32(d->base + VMMIO_QUEUE_AVAIL_HIGH, (u32)(avail >> 32));
  wr32(d->base + VMMIO_QUEUE_USED_LOW, (u32)used);
  wr32(d->base + VMMIO_QUEUE_USED_HIGH, (u32)(used >> 32));
  wr32(d->base + VMMIO_QUEUE_READY, 1);
  if (rd32(d->base + VMMIO_QUEUE_READY) != 1) fail("QueueReady did not stick", d);
  d->last_used = 0;
  d->next_avail = 0;
}

/* Put the chain starting at descriptor `head` in the avail ring, kick queue `index` and sleep until
 * the interrupt handler has seen a used-buffer interrupt and the used ring has the chain. */
static u32 submit_and_wait(struct vdev *d, u32 index, u16 head) {
  struct vq *q = d->q;
  u32 irqs_before = d->irqs;
  q->avail.ring[d->next_avail % d->qsize] = head;
  barrier();
  q->avail.idx = ++d->next_avail;
  barrier();
  wr32(d->base + VMMIO_QUEUE_NOTIFY, index);
  u32 start = watchdog_ticks;
  for (;;) {
    cli();
    /* Done once an interrupt arrived after the kick and the used ring moved: polling alone is not enough. */
    if (d->irqs != irqs_before && *(volatile u16 *)&q->used.idx != d->last_used) break;
    if (watchdog_ticks - start > WATCHDOG_TICKS) fail("no completion interrupt", d);
    __asm__ volatile("sti; hlt" ::: "memory"); /* sti's shadow makes the pair race-free */
  }
  sti();
  struct vring_used_elem e = q->used.ring[d->last_used % d->qsize];
  d->last_used++;
  if (e.id != head) fail("used ring returned another chain", d);
  return e.len;
}

static void start_device(struct vdev *d, u32 dev_index, u32 queue) {
  negotiate(d);
  d->q = &queues[dev_index];
  setup_queue(d, queue);
  set_status(d, STATUS_DRIVER_OK);
  if (rd32(d->base + VMMIO_STATUS) & STATUS_FAILED) fail("device failed", d);
  u8 vector = (u8)(VIRTIO_VECTOR_BASE + dev_index);
  irq_register(vector, on_virtio_irq);
  ioapic_route(d->gsi, vector, lapic_id(), !d->edge, d->active_low);
}

/* ---- Block ---- */

static u64 blk_capacity(struct vdev *d) {
  u32 gen, lo, hi;
  do {
    gen = rd32(d->base + VMMIO_CONFIG_GENERATION);
    lo = rd32(d->base + VMMIO_CONFIG + BLK_CONFIG_CAPACITY);
    hi = rd32(d->base + VMMIO_CONFIG + BLK_CONFIG_CAPACITY + 4);
  } while (gen != rd32(d->base + VMMIO_CONFIG_GENERATION));
  return ((u64)hi << 32) | lo;
}

static void blk_rw(struct vdev *d, u32 type, u64 sector) {
  struct vq *q = d->q;
  blk_hdr.type = type;
  blk_hdr.reserved = 0;
  blk_hdr.sector = sector;
  blk_status = 0xff;
  q->desc[0] = (struct vring_desc){(u64)&blk_hdr, sizeof(blk_hdr), VRING_DESC_F_NEXT, 1};
  q->desc[1] = (struct vring_desc){(u64)blk_data, SECTOR_SIZE,
                                   (u16)(VRING_DESC_F_NEXT | (type == BLK_T_IN ? VRING_DESC_F_WRITE : 0)), 2};
  q->desc[2] = (struct vring_desc){(u64)&blk_status, 1, VRING_DESC_F_WRITE, 0};
  u32 len = submit_and_wait(d, BLK_QUEUE, 0);
  if (blk_status != BLK_S_OK) fail(type == BLK_T_IN ? "block read status" : "block write status", d);
  if (len < 1) fail("block used length", d);
}

/* The pattern written to sector 1 (test/kvm_virtio_test.ts computes the same). */
static u8 sector1_byte(u32 i) { return (u8)(i * 13 + 0x3c); }

/* FNV-1a, 32 bits. */
static u32 fnv1a(const u8 *p, u32 n) {
  u32 h = 2166136261u;
  for (u32 i = 0; i < n; i++) h = (h ^ p[i]) * 16777619u;
  return h;
}

static void drive_block(struct vdev *d) {
  u64 cap = blk_capacity(d);
  if (cap <= BLK_TEST_SECTOR) fail("block device too small", d);
  if (!d->read_only) {
    for (u32 i = 0; i < SECTOR_SIZE; i++) blk_data[i] = sector1_byte(i);
    blk_rw(d, BLK_T_OUT, BLK_TEST_SECTOR);
    memset(blk_data, 0, SECTOR_SIZE);
    blk_rw(d, BLK_T_IN, BLK_TEST_SECTOR);
    for (u32 i = 0; i < SECTOR_SIZE; i++)
      if (blk_data[i] != sector1_byte(i)) {
        printf("VIRTIO blk mismatch at %u: 0x%x\n", i, blk_data[i]);
        fail("sector 1 read back differs", d);
      }
  }
  memset(blk_data, 0, SECTOR_SIZE);
  blk_rw(d, BLK_T_IN, 0);
  printf("VIRTIO blk cap=%llu rw=%s sum0=%x\n", cap, d->read_only ? "ro" : "ok", fnv1a(blk_data, SECTOR_SIZE));
}

/* ---- rng and console ---- */

static void drive_rng(struct vdev *d) {
  memset(rng_buf, 0, sizeof(rng_buf));
  d->q->desc[0] = (struct vring_desc){(u64)rng_buf, RNG_BYTES, VRING_DESC_F_WRITE, 0};
  u32 len = submit_and_wait(d, RNG_QUEUE, 0);
  if (len != RNG_BYTES) printf("VIRTIO rng short=%u\n", len);
  u32 nonzero = 0;
  for (u32 i = 0; i < RNG_BYTES; i++) nonzero += rng_buf[i] != 0;
  printf("VIRTIO rng bytes=%u nonzero=%u\n", len, nonzero);
}

static void drive_console(struct vdev *d) {
  d->q->desc[0] = (struct vring_desc){(u64)console_msg, sizeof(console_msg) - 1, 0, 0};
  submit_and_wait(d, CONSOLE_TX_QUEUE, 0);
  printf("VIRTIO console tx=ok\n");
}

void guest_main(void) {
  u64 dsdt = find_dsdt();
  if (!dsdt) fail("no DSDT", 0);
  discover(dsdt);
  printf("VIRTIO found=%u\n", ndevs);

  pic_mask_all();
  lapic_enable();
  irq_register(WATCHDOG_VECTOR, on_watchdog);
  wr32(APIC_START + LAPIC_TIMER_DIVIDE, LAPIC_TIMER_DIVIDE_BY_16);
  wr32(APIC_START + LAPIC_LVT_TIMER, LAPIC_TIMER_PERIODIC | WATCHDOG_VECTOR);
  wr32(APIC_START + LAPIC_TIMER_INITIAL, WATCHDOG_COUNT);
  sti();

  u32 total = 0;
  for (u32 i = 0; i < ndevs; i++) {
    struct vdev *d = &devs[i];
    if (rd32(d->base + VMMIO_MAGIC_VALUE) != VMMIO_MAGIC) fail("bad magic", d);
    if (rd32(d->base + VMMIO_VERSION) != VMMIO_VERSION_MODERN) fail("not virtio-mmio version 2", d);
    d->id = rd32(d->base + VMMIO_DEVICE_ID);
    printf("VIRTIO dev %u id=%u base=0x%llx size=0x%x gsi=%u edge=%u low=%u\n", i, d->id, d->base, d->size, d->gsi,
           d->edge, d->active_low);
    switch (d->id) {
      case VIRTIO_ID_BLOCK:
        d->name = "blk";
        start_device(d, i, BLK_QUEUE);
        drive_block(d);
        break;
      case VIRTIO_ID_RNG:
        d->name = "rng";
        start_device(d, i, RNG_QUEUE);
        drive_rng(d);
        break;
      case VIRTIO_ID_CONSOLE:
        d->name = "console";
        start_device(d, i, CONSOLE_TX_QUEUE);
        drive_console(d);
        break;
      default:
        /* id 0 is an empty transport (QEMU has those); other types are not driven here. */
        printf("VIRTIO skip %u id=%u\n", i, d->id);
        continue;
    }
    if (!d->irqs) fail("no interrupt", d);
    printf("VIRTIO irq %u %s irqs=%u spurious=%u\n", i, d->name, d->irqs, d->spurious);
    total += d->irqs;
    wr32(d->base + VMMIO_STATUS, 0); /* reset: the device stops using our queue memory */
  }
  cli();
  wr32(APIC_START + LAPIC_TIMER_INITIAL, 0);
  printf("VIRTIO irqs=%u\n", total);
  printf("VIRTIO DONE\n");
}
