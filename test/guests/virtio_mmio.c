/* virtio-mmio driver support shared by the test guests (see virtio_mmio.h). */
#include "virtio_mmio.h"

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

/* ---- DSDT discovery ---- */

u64 vmmio_find_dsdt(void) {
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
static int parse_crs(const u8 *p, const u8 *end, struct vmmio_transport *t) {
  int have_mem = 0, have_irq = 0;
  while (p < end) {
    if (p[0] & RES_LARGE) {
      if (p + RES_LARGE_HEADER > end) return 0;
      u32 len = p[1] | (u32)p[2] << 8;
      const u8 *b = p + RES_LARGE_HEADER;
      if (b + len > end) return 0;
      if (p[0] == RES_MEMORY32_FIXED && len >= RES_MEMORY32_FIXED_LEN) {
        t->base = b[1] | (u32)b[2] << 8 | (u32)b[3] << 16 | (u32)b[4] << 24;
        t->size = b[5] | (u32)b[6] << 8 | (u32)b[7] << 16 | (u32)b[8] << 24;
        have_mem = 1;
      } else if (p[0] == RES_EXTENDED_IRQ && len >= RES_EXT_IRQ_MIN_LEN && b[1] >= 1) {
        t->edge = (b[0] & RES_EXT_IRQ_EDGE) != 0;
        t->active_low = (b[0] & RES_EXT_IRQ_ACTIVE_LOW) != 0;
        t->gsi = b[2] | (u32)b[3] << 8 | (u32)b[4] << 16 | (u32)b[5] << 24;
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
static int parse_device(const u8 *p, const u8 *end, struct vmmio_transport *t) {
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
      crs = parse_crs(data, data + size, t);
      p = bend;
      continue;
    }
    p++;
  }
  return hid && crs;
}

u32 vmmio_discover(u64 dsdt, struct vmmio_transport *out, u32 max) {
  const u8 *start = (const u8 *)(dsdt + SDT_HEADER_LEN);
  const u8 *end = (const u8 *)(dsdt + rd32(dsdt + SDT_LENGTH));
  u32 found = 0;
  for (const u8 *p = start; p + 2 < end && found < max; p++) {
    if (p[0] != AML_EXT_OP_PREFIX || p[1] != AML_DEVICE_OP) continue;
    u32 n, len = pkg_length(p + 2, end, &n);
    if (len < n || p + 2 + len > end) continue;
    const u8 *body = p + 2 + n, *dend = p + 2 + len;
    u32 nl = name_string_len(body, dend);
    if (!nl) continue;
    struct vmmio_transport t;
    memset(&t, 0, sizeof(t));
    if (parse_device(body + nl, dend, &t)) out[found++] = t;
  }
  return found;
}

/* ---- Transport and device initialization (virtio 1.2 section 3.1.1) ---- */

const char *vmmio_check_transport(u64 base) {
  if (rd32(base + VMMIO_MAGIC_VALUE) != VMMIO_MAGIC) return "bad magic";
  if (rd32(base + VMMIO_VERSION) != VMMIO_VERSION_MODERN) return "not virtio-mmio version 2";
  return 0;
}

void vmmio_set_status(u64 base, u32 bits) { wr32(base + VMMIO_STATUS, rd32(base + VMMIO_STATUS) | bits); }

const char *vmmio_negotiate(u64 base, u32 want_low, u32 *offered_low) {
  *offered_low = 0;
  wr32(base + VMMIO_STATUS, 0); /* reset */
  if (rd32(base + VMMIO_STATUS) != 0) return "reset did not clear status";
  vmmio_set_status(base, STATUS_ACKNOWLEDGE);
  vmmio_set_status(base, STATUS_DRIVER);
  wr32(base + VMMIO_DEVICE_FEATURES_SEL, FEATURE_WORD_HIGH);
  u32 high = rd32(base + VMMIO_DEVICE_FEATURES);
  wr32(base + VMMIO_DEVICE_FEATURES_SEL, 0);
  u32 low = rd32(base + VMMIO_DEVICE_FEATURES);
  *offered_low = low;
  if (!(high & F_VERSION_1_HIGH)) return "device does not offer VIRTIO_F_VERSION_1";
  if ((low & want_low) != want_low) return "device does not offer the features this guest needs";
  wr32(base + VMMIO_DRIVER_FEATURES_SEL, 0);
  wr32(base + VMMIO_DRIVER_FEATURES, want_low);
  wr32(base + VMMIO_DRIVER_FEATURES_SEL, FEATURE_WORD_HIGH);
  wr32(base + VMMIO_DRIVER_FEATURES, F_VERSION_1_HIGH);
  vmmio_set_status(base, STATUS_FEATURES_OK);
  if (!(rd32(base + VMMIO_STATUS) & STATUS_FEATURES_OK)) return "FEATURES_OK not accepted";
  return 0;
}

const char *vmmio_driver_ok(u64 base) {
  vmmio_set_status(base, STATUS_DRIVER_OK);
  if (rd32(base + VMMIO_STATUS) & STATUS_FAILED) return "device failed";
  return 0;
}

void vmmio_read_shm(u64 base, u32 id, u64 *shm_base, u64 *shm_len) {
  wr32(base + VMMIO_SHM_SEL, id);
  *shm_len = (u64)rd32(base + VMMIO_SHM_LEN_LOW) | (u64)rd32(base + VMMIO_SHM_LEN_HIGH) << 32;
  *shm_base = (u64)rd32(base + VMMIO_SHM_BASE_LOW) | (u64)rd32(base + VMMIO_SHM_BASE_HIGH) << 32;
}

/* ---- Queues ---- */

const char *vmmio_setup_queue(u64 base, u32 index, struct vmmio_queue *q, struct vq *ring, u32 min_size) {
  wr32(base + VMMIO_QUEUE_SEL, index);
  if (rd32(base + VMMIO_QUEUE_READY)) return "queue already ready after reset";
  u32 max = rd32(base + VMMIO_QUEUE_NUM_MAX);
  u32 size = QUEUE_SIZE;
  while (size > max) size /= 2;
  if (size < min_size) return "QueueNumMax too small";
  memset(ring, 0, sizeof(*ring));
  q->ring = ring;
  q->size = (u16)size;
  q->next_avail = 0;
  q->last_used = 0;
  u64 desc = (u64)ring->desc, avail = (u64)&ring->avail, used = (u64)&ring->used;
  wr32(base + VMMIO_QUEUE_NUM, size);
  wr32(base + VMMIO_QUEUE_DESC_LOW, (u32)desc);
  wr32(base + VMMIO_QUEUE_DESC_HIGH, (u32)(desc >> 32));
  wr32(base + VMMIO_QUEUE_AVAIL_LOW, (u32)avail);
  wr32(base + VMMIO_QUEUE_AVAIL_HIGH, (u32)(avail >> 32));
  wr32(base + VMMIO_QUEUE_USED_LOW, (u32)used);
  wr32(base + VMMIO_QUEUE_USED_HIGH, (u32)(used >> 32));
  wr32(base + VMMIO_QUEUE_READY, 1);
  if (rd32(base + VMMIO_QUEUE_READY) != 1) return "QueueReady did not stick";
  return 0;
}

void vmmio_queue_kick(u64 base, u32 index, struct vmmio_queue *q, u16 head) {
  q->ring->avail.ring[q->next_avail % q->size] = head;
  barrier();
  q->ring->avail.idx = ++q->next_avail;
  barrier();
  wr32(base + VMMIO_QUEUE_NOTIFY, index);
}

int vmmio_queue_has_used(const struct vmmio_queue *q) {
  return *(volatile u16 *)&q->ring->used.idx != q->last_used;
}

struct vring_used_elem vmmio_queue_take_used(struct vmmio_queue *q) {
  barrier();
  struct vring_used_elem e = q->ring->used.ring[q->last_used % q->size];
  q->last_used++;
  return e;
}
