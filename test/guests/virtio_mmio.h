/*
 * Freestanding virtio-mmio driver support shared by the test guests virtio.c and gpu_blob.c:
 * finding the transports in the DSDT (LNRO0005 devices and their _CRS), the transport registers,
 * device initialization (reset, feature negotiation, DRIVER_OK) and one split virtqueue per call.
 *
 * Functions that can meet a misbehaving device return 0 on success or a short description of what
 * went wrong, which the guest prints in its own FAIL line; none of them prints or stops the VM.
 */
#ifndef GUEST_VIRTIO_MMIO_H
#define GUEST_VIRTIO_MMIO_H

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
#define VMMIO_SHM_SEL 0x0ac
#define VMMIO_SHM_LEN_LOW 0x0b0
#define VMMIO_SHM_LEN_HIGH 0x0b4
#define VMMIO_SHM_BASE_LOW 0x0b8
#define VMMIO_SHM_BASE_HIGH 0x0bc
#define VMMIO_CONFIG_GENERATION 0x0fc
#define VMMIO_CONFIG 0x100
#define VMMIO_MAGIC 0x74726976 /* "virt" */
#define VMMIO_VERSION_MODERN 2
#define VMMIO_INT_VRING 1u
/* An absent shared-memory region reads as all ones in SHMLen and SHMBase (virtio 1.2 section 4.2.2). */
#define VMMIO_SHM_ABSENT 0xffffffffffffffffull

/* Device status bits (virtio 1.2 section 2.1; virtio_config.h). */
#define STATUS_ACKNOWLEDGE 1u
#define STATUS_DRIVER 2u
#define STATUS_DRIVER_OK 4u
#define STATUS_FEATURES_OK 8u
#define STATUS_FAILED 128u

/* VIRTIO_F_VERSION_1 is feature bit 32 (virtio 1.2 section 6): bit 0 of feature word 1. */
#define FEATURE_WORD_HIGH 1
#define F_VERSION_1_HIGH 1u

/* Split virtqueue (virtio 1.2 section 2.7; virtio_ring.h), at most QUEUE_SIZE entries. */
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define QUEUE_SIZE 16
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

/* A queue as the driver tracks it. */
struct vmmio_queue {
  struct vq *ring;
  u16 size; /* entries in use: a power of 2, at most QUEUE_SIZE and QueueNumMax */
  u16 next_avail;
  u16 last_used;
};

/* A virtio-mmio transport as the DSDT describes it: Memory32Fixed and Extended Interrupt of _CRS. */
struct vmmio_transport {
  u64 base;
  u32 size, gsi;
  int edge, active_low;
};

/* ---- Discovery ---- */
/* The DSDT named by the FADT (X_DSDT, else DSDT) if its signature and checksum hold, or 0. */
u64 vmmio_find_dsdt(void);
/* Scans the DSDT's AML for LNRO0005 devices with a usable _CRS; fills at most `max`, returns how many. */
u32 vmmio_discover(u64 dsdt, struct vmmio_transport *out, u32 max);

/* ---- Transport ---- */
/* 0 if `base` holds the magic value and version 2 (modern), else what it holds instead. */
const char *vmmio_check_transport(u64 base);
void vmmio_set_status(u64 base, u32 bits);
/*
 * Driver initialization up to FEATURES_OK (virtio 1.2 section 3.1.1): reset, ACKNOWLEDGE, DRIVER,
 * then accept VIRTIO_F_VERSION_1 and `want_low` (feature bits 0..31, all required). The device's
 * feature word 0 is left in *offered_low (0 if it was not read).
 */
const char *vmmio_negotiate(u64 base, u32 want_low, u32 *offered_low);
/* Sets DRIVER_OK; fails if the device then reports FAILED. */
const char *vmmio_driver_ok(u64 base);
/* Shared-memory region `id`: its guest-physical base and length (VMMIO_SHM_ABSENT when absent). */
void vmmio_read_shm(u64 base, u32 id, u64 *shm_base, u64 *shm_len);

/* ---- Queues ---- */
/*
 * Sets up queue `index` on the zeroed page `ring`, as large as QUEUE_SIZE and QueueNumMax allow (a
 * power of 2, at least `min_size`), and makes it ready.
 */
const char *vmmio_setup_queue(u64 base, u32 index, struct vmmio_queue *q, struct vq *ring, u32 min_size);
/* Puts the chain starting at descriptor `head` in the avail ring and notifies queue `index`. */
void vmmio_queue_kick(u64 base, u32 index, struct vmmio_queue *q, u16 head);
/* Has the device put a chain in the used ring that vmmio_queue_take_used has not taken? */
int vmmio_queue_has_used(const struct vmmio_queue *q);
/* The next used-ring element (call only after vmmio_queue_has_used). */
struct vring_used_elem vmmio_queue_take_used(struct vmmio_queue *q);

#endif
