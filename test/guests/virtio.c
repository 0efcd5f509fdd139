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
 * Lines (parsed by test/kvm/virtio_test.ts):
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
 *
 * The transport side (DSDT scan, device initialization, queue set-up) is virtio_mmio.c, shared with gpu_blob.c.
 */
#include "virtio_mmio.h"

/* Device ids (virtio 1.2 section 5). */
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_CONSOLE 3
#define VIRTIO_ID_RNG 4

#define MIN_QUEUE_SIZE 4 /* a block request takes 3 descriptors */

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
  struct vmmio_transport mmio; /* where the DSDT says it is */
  u32 id;
  int read_only; /* block: VIRTIO_BLK_F_RO offered (accepted or not, the device refuses writes) */
  const char *name;
  volatile u32 irqs;      /* interrupts with a used-buffer notification */
  volatile u32 spurious;  /* interrupts with InterruptStatus 0 */
  struct vmmio_queue q;
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
    printf("VIRTIO FAIL %s: dev id=%u base=0x%llx status=0x%x isr=0x%x irqs=%u used=%u\n", what, d->id,
           d->mmio.base, rd32(d->mmio.base + VMMIO_STATUS), rd32(d->mmio.base + VMMIO_INTERRUPT_STATUS), d->irqs,
           d->q.ring ? d->q.ring->used.idx : 0);
  else
    printf("VIRTIO FAIL %s\n", what);
  debug_exit(GUEST_EXIT_FAILURE);
}

/* ---- DSDT discovery ---- */

static void discover(u64 dsdt) {
  struct vmmio_transport found[MAX_DEVICES];
  ndevs = vmmio_discover(dsdt, found, MAX_DEVICES);
  for (u32 i = 0; i < ndevs; i++) devs[i].mmio = found[i];
}

/* ---- Interrupts ---- */

static void on_virtio_irq(struct irq_frame *f) {
  struct vdev *d = &devs[f->vector - VIRTIO_VECTOR_BASE];
  u32 isr = rd32(d->mmio.base + VMMIO_INTERRUPT_STATUS);
  if (isr) wr32(d->mmio.base + VMMIO_INTERRUPT_ACK, isr);
  if (isr & VMMIO_INT_VRING) d->irqs++;
  else if (!isr) d->spurious++;
}

static void on_watchdog(struct irq_frame *f) {
  (void)f;
  watchdog_ticks++;
}

/* ---- Device set-up (virtio 1.2 section 3.1.1, driver initialization) ---- */

/* Put the chain starting at descriptor `head` in the avail ring, kick queue `index` and sleep until
 * the interrupt handler has seen a used-buffer interrupt and the used ring has the chain. */
static u32 submit_and_wait(struct vdev *d, u32 index, u16 head) {
  u32 irqs_before = d->irqs;
  vmmio_queue_kick(d->mmio.base, index, &d->q, head);
  u32 start = watchdog_ticks;
  for (;;) {
    cli();
    /* Done once an interrupt arrived after the kick and the used ring moved: polling alone is not enough. */
    if (d->irqs != irqs_before && vmmio_queue_has_used(&d->q)) break;
    if (watchdog_ticks - start > WATCHDOG_TICKS) fail("no completion interrupt", d);
    __asm__ volatile("sti; hlt" ::: "memory"); /* sti's shadow makes the pair race-free */
  }
  sti();
  struct vring_used_elem e = vmmio_queue_take_used(&d->q);
  if (e.id != head) fail("used ring returned another chain", d);
  return e.len;
}

static void start_device(struct vdev *d, u32 dev_index, u32 queue) {
  u32 offered;
  const char *err = vmmio_negotiate(d->mmio.base, 0, &offered);
  if (err) fail(err, d);
  if (d->id == VIRTIO_ID_BLOCK) d->read_only = (offered & (1u << BLK_F_RO_BIT)) != 0;
  err = vmmio_setup_queue(d->mmio.base, queue, &d->q, &queues[dev_index], MIN_QUEUE_SIZE);
  if (err) fail(err, d);
  err = vmmio_driver_ok(d->mmio.base);
  if (err) fail(err, d);
  u8 vector = (u8)(VIRTIO_VECTOR_BASE + dev_index);
  irq_register(vector, on_virtio_irq);
  ioapic_route(d->mmio.gsi, vector, lapic_id(), !d->mmio.edge, d->mmio.active_low);
}

/* ---- Block ---- */

static u64 blk_capacity(struct vdev *d) {
  u32 gen, lo, hi;
  do {
    gen = rd32(d->mmio.base + VMMIO_CONFIG_GENERATION);
    lo = rd32(d->mmio.base + VMMIO_CONFIG + BLK_CONFIG_CAPACITY);
    hi = rd32(d->mmio.base + VMMIO_CONFIG + BLK_CONFIG_CAPACITY + 4);
  } while (gen != rd32(d->mmio.base + VMMIO_CONFIG_GENERATION));
  return ((u64)hi << 32) | lo;
}

static void blk_rw(struct vdev *d, u32 type, u64 sector) {
  struct vq *q = d->q.ring;
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

/* The pattern written to sector 1 (test/kvm/virtio_test.ts computes the same). */
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
  d->q.ring->desc[0] = (struct vring_desc){(u64)rng_buf, RNG_BYTES, VRING_DESC_F_WRITE, 0};
  u32 len = submit_and_wait(d, RNG_QUEUE, 0);
  if (len != RNG_BYTES) printf("VIRTIO rng short=%u\n", len);
  u32 nonzero = 0;
  for (u32 i = 0; i < RNG_BYTES; i++) nonzero += rng_buf[i] != 0;
  printf("VIRTIO rng bytes=%u nonzero=%u\n", len, nonzero);
}

static void drive_console(struct vdev *d) {
  d->q.ring->desc[0] = (struct vring_desc){(u64)console_msg, sizeof(console_msg) - 1, 0, 0};
  submit_and_wait(d, CONSOLE_TX_QUEUE, 0);
  printf("VIRTIO console tx=ok\n");
}

void guest_main(void) {
  u64 dsdt = vmmio_find_dsdt();
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
    const char *err = vmmio_check_transport(d->mmio.base);
    if (err) fail(err, d);
    d->id = rd32(d->mmio.base + VMMIO_DEVICE_ID);
    printf("VIRTIO dev %u id=%u base=0x%llx size=0x%x gsi=%u edge=%u low=%u\n", i, d->id, d->mmio.base, d->mmio.size,
           d->mmio.gsi, d->mmio.edge, d->mmio.active_low);
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
    wr32(d->mmio.base + VMMIO_STATUS, 0); /* reset: the device stops using our queue memory */
  }
  cli();
  wr32(APIC_START + LAPIC_TIMER_INITIAL, 0);
  printf("VIRTIO irqs=%u\n", total);
  printf("VIRTIO DONE\n");
}
