/*
 * A virtio guest that stays up between rounds of I/O, so a test can snapshot it with devices set up and
 * check they still work in a clone. It finds the first virtio-blk and the first virtio-console transport
 * in the DSDT (virtio_mmio.c), sets both up (one split queue each, interrupts through the IOAPIC) and
 * keeps them set up. Round r: write sector r with pattern(r), read it back and compare, read sector r-1
 * and compare it with pattern(r-1) (from round 2 on: the disk still holds the previous round), then send
 * "virtio round r\n" on port 0 of the console. Completions are seen by the interrupt handler, as in
 * virtio.c. Idle, the guest halts until COM1 receives a byte.
 *
 * Byte i of pattern(r) (test/kvm/snapshot_test.ts computes the same): bytes 0..3 are r (le32), then
 *   (u8)(i * 13 + r * 29 + 0x3c)
 *
 * Lines on COM1:
 *   ROUND <r> blk=ok prev=<ok|none> console=ok        after each round (round 1 at start)
 *   READY                                             after round 1
 *   BYE                                               on 'q', then ACPI power-off (exit code 0)
 * A COM1 'g' runs the next round. On any failure: VIRTIO FAIL <reason>, debug exit GUEST_EXIT_FAILURE.
 */
#include "virtio_mmio.h"

/* Device ids (virtio 1.2 section 5). */
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_CONSOLE 3

/* virtio-blk (virtio 1.2 section 5.2; virtio_blk.h): config capacity (le64 sectors), request header
 * {type, reserved, sector}, request types and the status byte. */
#define BLK_CONFIG_CAPACITY 0
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_S_OK 0
#define SECTOR_SIZE 512
#define BLK_QUEUE 0
#define BLK_DESCRIPTORS 3 /* header, data, status */
struct blk_req_hdr {
  u32 type;
  u32 reserved;
  u64 sector;
};
/* virtio-console (virtio 1.2 section 5.3): queue 1 is port 0's transmitq. */
#define CONSOLE_TX_QUEUE 1

#define MAX_DEVICES 16
#define BLK_VECTOR 0x40
#define CONSOLE_VECTOR 0x41
#define WAKE_VECTOR 0x30
/* The LAPIC timer wakes hlt while a request is out, as a watchdog (rt.h lapic_timer_periodic). */
#define WATCHDOG_VECTOR 0x3f
#define WATCHDOG_COUNT 0x400000u /* about 67 ms */
#define WATCHDOG_TICKS 150u      /* about 10 s without a completion: give up */
/* Room for "virtio round " and a u32 in decimal and "\n". */
#define MESSAGE_MAX 32

struct vdev {
  struct vmmio_transport mmio;
  volatile u32 irqs; /* interrupts with a used-buffer notification */
  struct vmmio_queue q;
};

static struct vdev blk, con;
static struct vq blk_ring, con_ring;
static volatile u32 watchdog_ticks;

static struct blk_req_hdr blk_hdr;
static u8 blk_data[SECTOR_SIZE] __attribute__((aligned(SECTOR_SIZE)));
static volatile u8 blk_status;
static char message[MESSAGE_MAX];

static void fail(const char *what) {
  printf("VIRTIO FAIL %s\n", what);
  debug_exit(GUEST_EXIT_FAILURE);
}

static void on_irq(struct vdev *d) {
  u32 isr = rd32(d->mmio.base + VMMIO_INTERRUPT_STATUS);
  if (isr) wr32(d->mmio.base + VMMIO_INTERRUPT_ACK, isr);
  if (isr & VMMIO_INT_VRING) d->irqs++;
}
static void on_blk_irq(struct irq_frame *f) { (void)f, on_irq(&blk); }
static void on_console_irq(struct irq_frame *f) { (void)f, on_irq(&con); }
static void on_watchdog(struct irq_frame *f) { (void)f, watchdog_ticks++; }

/* Kicks the chain at descriptor 0 on queue `index` and halts until its completion interrupt arrived and
 * the used ring has it. */
static u32 submit_and_wait(struct vdev *d, u32 index) {
  u32 irqs_before = d->irqs;
  vmmio_queue_kick(d->mmio.base, index, &d->q, 0);
  u32 start = watchdog_ticks;
  lapic_timer_periodic(WATCHDOG_VECTOR, WATCHDOG_COUNT);
  while (!(d->irqs != irqs_before && vmmio_queue_has_used(&d->q))) {
    if (watchdog_ticks - start > WATCHDOG_TICKS) fail("no completion interrupt");
    __asm__ volatile("sti; hlt; cli" ::: "memory"); /* sti's shadow makes the pair race-free */
  }
  lapic_timer_periodic(WATCHDOG_VECTOR, 0);
  struct vring_used_elem e = vmmio_queue_take_used(&d->q);
  if (e.id != 0) fail("used ring returned another chain");
  return e.len;
}

static void start_device(struct vdev *d, struct vq *ring, u32 queue, u32 min_size, u8 vector,
                         irq_handler handler) {
  u32 offered;
  const char *err = vmmio_negotiate(d->mmio.base, 0, &offered);
  if (!err) err = vmmio_setup_queue(d->mmio.base, queue, &d->q, ring, min_size);
  if (!err) err = vmmio_driver_ok(d->mmio.base);
  if (err) fail(err);
  irq_register(vector, handler);
  ioapic_route(d->mmio.gsi, vector, lapic_id(), !d->mmio.edge, d->mmio.active_low);
}

static u64 blk_capacity(void) {
  u32 gen, lo, hi;
  do {
    gen = rd32(blk.mmio.base + VMMIO_CONFIG_GENERATION);
    lo = rd32(blk.mmio.base + VMMIO_CONFIG + BLK_CONFIG_CAPACITY);
    hi = rd32(blk.mmio.base + VMMIO_CONFIG + BLK_CONFIG_CAPACITY + 4);
  } while (gen != rd32(blk.mmio.base + VMMIO_CONFIG_GENERATION));
  return ((u64)hi << 32) | lo;
}

static void blk_rw(u32 type, u64 sector) {
  struct vq *q = blk.q.ring;
  blk_hdr = (struct blk_req_hdr){type, 0, sector};
  blk_status = 0xff;
  q->desc[0] = (struct vring_desc){(u64)&blk_hdr, sizeof(blk_hdr), VRING_DESC_F_NEXT, 1};
  q->desc[1] = (struct vring_desc){(u64)blk_data, SECTOR_SIZE,
                                   (u16)(VRING_DESC_F_NEXT | (type == BLK_T_IN ? VRING_DESC_F_WRITE : 0)), 2};
  q->desc[2] = (struct vring_desc){(u64)&blk_status, 1, VRING_DESC_F_WRITE, 0};
  submit_and_wait(&blk, BLK_QUEUE);
  if (blk_status != BLK_S_OK) fail(type == BLK_T_IN ? "block read status" : "block write status");
}

static u8 pattern_byte(u32 round, u32 i) {
  if (i < 4) return (u8)(round >> (8 * i));
  return (u8)(i * 13 + round * 29 + 0x3c);
}

static void read_and_check(u32 round, const char *what) {
  memset(blk_data, 0, SECTOR_SIZE);
  blk_rw(BLK_T_IN, round);
  for (u32 i = 0; i < SECTOR_SIZE; i++)
    if (blk_data[i] != pattern_byte(round, i)) {
      printf("VIRTIO sector %u byte %u is 0x%x\n", round, i, blk_data[i]);
      fail(what);
    }
}

static usize append_u32(char *p, u32 v) {
  char digits[10];
  usize n = 0, len = 0;
  do digits[n++] = (char)('0' + v % 10), v /= 10;
  while (v);
  while (n) p[len++] = digits[--n];
  return len;
}

static void round_trip(u32 round) {
  if (round >= blk_capacity()) fail("disk too small for another round");
  for (u32 i = 0; i < SECTOR_SIZE; i++) blk_data[i] = pattern_byte(round, i);
  blk_rw(BLK_T_OUT, round);
  read_and_check(round, "sector read back differs");
  if (round > 1) read_and_check(round - 1, "previous round's sector differs");

  static const char prefix[] = "virtio round ";
  usize len = sizeof(prefix) - 1;
  memcpy(message, prefix, len);
  len += append_u32(message + len, round);
  message[len++] = '\n';
  con.q.ring->desc[0] = (struct vring_desc){(u64)message, (u32)len, 0, 0};
  submit_and_wait(&con, CONSOLE_TX_QUEUE);
  printf("ROUND %u blk=ok prev=%s console=ok\n", round, round > 1 ? "ok" : "none");
}

void guest_main(void) {
  u64 dsdt = vmmio_find_dsdt();
  if (!dsdt) fail("no DSDT");
  struct vmmio_transport found[MAX_DEVICES];
  u32 n = vmmio_discover(dsdt, found, MAX_DEVICES);
  int have_blk = 0, have_con = 0;
  for (u32 i = 0; i < n; i++) {
    if (vmmio_check_transport(found[i].base)) continue;
    u32 id = rd32(found[i].base + VMMIO_DEVICE_ID);
    if (id == VIRTIO_ID_BLOCK && !have_blk) blk.mmio = found[i], have_blk = 1;
    if (id == VIRTIO_ID_CONSOLE && !have_con) con.mmio = found[i], have_con = 1;
  }
  if (!have_blk || !have_con) fail("needs a block and a console device");

  serial_rx_wakeup(WAKE_VECTOR);
  irq_register(WATCHDOG_VECTOR, on_watchdog);
  start_device(&blk, &blk_ring, BLK_QUEUE, BLK_DESCRIPTORS, BLK_VECTOR, on_blk_irq);
  start_device(&con, &con_ring, CONSOLE_TX_QUEUE, 1, CONSOLE_VECTOR, on_console_irq);

  u32 round = 1;
  round_trip(round);
  printf("READY\n");
  for (;;) {
    __asm__ volatile("sti; hlt; cli" ::: "memory");
    for (int c; (c = serial_poll()) >= 0;) {
      if (c == 'g') round_trip(++round);
      if (c == 'q') {
        printf("BYE\n");
        return; /* rt_main powers off */
      }
    }
  }
}
