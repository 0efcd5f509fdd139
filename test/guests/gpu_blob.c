/*
 * virtio-gpu zero copy, end to end: a HOST3D blob the host maps into the guest.
 *
 * Finds the virtio-gpu transport (device id 16) among the virtio-mmio devices of the DSDT (LNRO0005
 * _CRS), negotiates VERSION_1 + VIRGL + RESOURCE_BLOB + CONTEXT_INIT, reads shared-memory region 1
 * (the host-visible window) through SHMSel/SHMLen/SHMBase and maps its first bytes with 2 MiB pages
 * (the window lies above RAM, at 64 GiB or more, outside the boot identity map). Then, on the control
 * queue, with completion seen by polling the used ring (interrupts stay off):
 *   GET_CAPSET_INFO for each capset, GET_CAPSET VIRGL2 (what the Linux driver does at probe)
 *   CTX_CREATE (context_init = capset VIRGL2)
 *   SUBMIT_3D  VIRGL_CCMD_PIPE_RESOURCE_CREATE buffer, MAP_PERSISTENT|MAP_COHERENT, blob_id
 *   RESOURCE_CREATE_BLOB HOST3D MAPPABLE with that blob_id, CTX_ATTACH_RESOURCE
 *   RESOURCE_MAP_BLOB at window offset 0 -> OK_MAP_INFO
 *   the pattern written through the window (the host's memory: the VMM copies nothing)
 *   RESOURCE_CREATE_3D buffer + ATTACH_BACKING (pages in guest RAM) + CTX_ATTACH_RESOURCE
 *   SUBMIT_3D  VIRGL_CCMD_RESOURCE_COPY_REGION blob -> buffer
 *   TRANSFER_FROM_HOST_3D of the buffer into its backing, compared with the pattern
 *   RESOURCE_UNMAP_BLOB
 * and powers off. Lines on COM1 (parsed by test/kvm/gpu_test.ts):
 *   GPU dev base=0x<b> found=<virtio-mmio devices>
 *   GPU shm base=0x<window gpa> len=0x<window bytes>
 *   GPU capsets=<n> virgl2 version=<v> size=<bytes>
 *   GPU map_info=0x<VIRTIO_GPU_MAP_CACHE_*>
 *   GPU blob pattern=ok bytes=<n>
 *   GPU unmap ok
 *   GPU DONE
 * or GPU FAIL <reason> and debug exit GUEST_EXIT_FAILURE.
 *
 * The transport side (DSDT scan, device initialization, queue set-up) is virtio_mmio.c, shared with virtio.c.
 */
#include "virtio_mmio.h"

/* virtio-gpu's feature bits, all in word 0 (virtio 1.2 section 5.7.3; linux/virtio_gpu.h VIRTIO_GPU_F_*). */
#define GPU_F_VIRGL (1u << 0)
#define GPU_F_RESOURCE_BLOB (1u << 3)
#define GPU_F_CONTEXT_INIT (1u << 4)
#define GPU_FEATURES (GPU_F_VIRGL | GPU_F_RESOURCE_BLOB | GPU_F_CONTEXT_INIT)

/* Device id (virtio 1.2 section 5) and virtio-gpu's shared memory id (section 5.7.5). */
#define VIRTIO_ID_GPU 16
#define GPU_SHM_ID_HOST_VISIBLE 1
#define GPU_CONTROL_QUEUE 0

/* ---- virtio-gpu commands (virtio 1.2 section 5.7.6; Linux include/uapi/linux/virtio_gpu.h) ---- */
#define CMD_RESOURCE_ATTACH_BACKING 0x0106
#define CMD_GET_CAPSET_INFO 0x0108
#define CMD_GET_CAPSET 0x0109
#define CMD_RESOURCE_CREATE_BLOB 0x010c
#define CMD_CTX_CREATE 0x0200
#define CMD_CTX_ATTACH_RESOURCE 0x0202
#define CMD_RESOURCE_CREATE_3D 0x0204
#define CMD_TRANSFER_FROM_HOST_3D 0x0206
#define CMD_SUBMIT_3D 0x0207
#define CMD_RESOURCE_MAP_BLOB 0x0208
#define CMD_RESOURCE_UNMAP_BLOB 0x0209
#define RESP_OK_NODATA 0x1100
#define RESP_OK_CAPSET_INFO 0x1102
#define RESP_OK_CAPSET 0x1103
#define RESP_OK_MAP_INFO 0x1106
#define CAPSET_VIRGL2 2
#define BLOB_MEM_HOST3D 0x0002
#define BLOB_FLAG_USE_MAPPABLE 0x0001
#define MAP_CACHE_MASK 0x0f
#define CTX_DEBUG_NAME_SIZE 64
/* struct virtio_gpu_config: events_read, events_clear, num_scanouts, num_capsets (le32 each). */
#define GPU_CONFIG_NUM_CAPSETS 12

struct gpu_hdr {
  u32 type, flags;
  u64 fence_id;
  u32 ctx_id;
  u8 ring_idx, padding[3];
};
struct gpu_ctx_create {
  struct gpu_hdr hdr;
  u32 nlen, context_init;
  char debug_name[CTX_DEBUG_NAME_SIZE];
};
struct gpu_get_capset_info {
  struct gpu_hdr hdr;
  u32 capset_index, padding;
};
struct gpu_resp_capset_info {
  struct gpu_hdr hdr;
  u32 capset_id, capset_max_version, capset_max_size, padding;
};
struct gpu_get_capset {
  struct gpu_hdr hdr;
  u32 capset_id, capset_version;
};
struct gpu_cmd_submit {
  struct gpu_hdr hdr;
  u32 size, padding;
};
struct gpu_resource_create_blob {
  struct gpu_hdr hdr;
  u32 resource_id, blob_mem, blob_flags, nr_entries;
  u64 blob_id, size;
};
struct gpu_ctx_resource {
  struct gpu_hdr hdr;
  u32 resource_id, padding;
};
struct gpu_resource_map_blob {
  struct gpu_hdr hdr;
  u32 resource_id, padding;
  u64 offset;
};
struct gpu_resp_map_info {
  struct gpu_hdr hdr;
  u32 map_info, padding;
};
struct gpu_resource_unmap_blob {
  struct gpu_hdr hdr;
  u32 resource_id, padding;
};
struct gpu_resource_create_3d {
  struct gpu_hdr hdr;
  u32 resource_id, target, format, bind, width, height, depth, array_size, last_level, nr_samples, flags, padding;
};
struct gpu_mem_entry {
  u64 addr;
  u32 length, padding;
};
struct gpu_resource_attach_backing {
  struct gpu_hdr hdr;
  u32 resource_id, nr_entries;
  struct gpu_mem_entry entries[1];
};
struct gpu_box {
  u32 x, y, z, w, h, d;
};
struct gpu_transfer_host_3d {
  struct gpu_hdr hdr;
  struct gpu_box box;
  u64 offset;
  u32 resource_id, level, stride, layer_stride;
};
/* Sizes from linux/virtio_gpu.h (also protocol.ts SIZEOF_*). */
_Static_assert(sizeof(struct gpu_hdr) == 24, "ctrl_hdr");
_Static_assert(sizeof(struct gpu_ctx_create) == 96, "ctx_create");
_Static_assert(sizeof(struct gpu_resource_create_blob) == 56, "resource_create_blob");
_Static_assert(sizeof(struct gpu_resource_map_blob) == 40, "resource_map_blob");
_Static_assert(sizeof(struct gpu_resp_map_info) == 32, "resp_map_info");
_Static_assert(sizeof(struct gpu_resource_create_3d) == 72, "resource_create_3d");
_Static_assert(sizeof(struct gpu_transfer_host_3d) == 72, "transfer_host_3d");

/* ---- virgl command stream (virglrenderer src/virgl_protocol.h; Gallium p_defines.h) ---- */
#define VIRGL_CCMD_RESOURCE_COPY_REGION 17
#define VIRGL_CCMD_PIPE_RESOURCE_CREATE 48
#define VIRGL_CMD_RESOURCE_COPY_REGION_SIZE 13
#define VIRGL_PIPE_RES_CREATE_SIZE 11
#define VIRGL_CMD0(cmd, obj, len) ((u32)(cmd) | ((u32)(obj) << 8) | ((u32)(len) << 16))
#define PIPE_BUFFER 0
#define PIPE_BIND_VERTEX_BUFFER (1u << 4)
#define PIPE_RESOURCE_FLAG_MAP_PERSISTENT (1u << 1)
#define PIPE_RESOURCE_FLAG_MAP_COHERENT (1u << 2)
#define VIRGL_FORMAT_R8_UNORM 64

/* ---- This test's choices ---- */
#define CTX_ID 1
#define BLOB_RES_ID 1
#define COPY_RES_ID 2
#define BLOB_ID 7
#define BLOB_SIZE (64u * 1024u) /* test/kvm/gpu_test.ts BLOB_SIZE */
#define MAP_OFFSET 0
#define PAGE_SIZE 4096u
#define RESP_BUF_SIZE 4096 /* room for GET_CAPSET's VIRGL2 caps (1376 bytes with virglrenderer 0.10.4) */
#define POLL_LIMIT (1u << 28) /* pause iterations before giving up on a response (many seconds) */

/* ---- x86-64 4-level paging (Intel SDM vol. 3, section 4.5) ---- */
#define PTE_PRESENT (1ull << 0)
#define PTE_WRITE (1ull << 1)
#define PTE_PAGE_SIZE (1ull << 7) /* a 2 MiB page in a page-directory entry */
#define PTE_ADDR_MASK 0x000ffffffffff000ull
#define PT_ENTRIES 512
#define PML4_SHIFT 39
#define PDPT_SHIFT 30
#define PD_SHIFT 21
#define PT_INDEX_MASK 0x1ff
#define LARGE_PAGE_SIZE (2ull << 20)
#define PT_POOL_TABLES 4

#define MAX_DEVICES 16 /* virtio-mmio transports kept from the DSDT */

static struct vmmio_transport mmio[MAX_DEVICES];
static u32 nmmio;
static u64 gpu; /* the GPU transport's base */
static struct vq queue;
static struct vmmio_queue ctrlq;
static u8 cmd_buf[PAGE_SIZE] __attribute__((aligned(16)));
static u8 resp_buf[RESP_BUF_SIZE] __attribute__((aligned(4096)));
static u8 readback[BLOB_SIZE] __attribute__((aligned(4096)));
static u64 pt_pool[PT_POOL_TABLES][PT_ENTRIES] __attribute__((aligned(4096)));
static u32 pt_used;

static void fail(const char *what) {
  printf("GPU FAIL %s\n", what);
  debug_exit(GUEST_EXIT_FAILURE);
}

/* The pattern written through the window (test/kvm/gpu_test.ts computes the same). */
static u8 pattern_byte(u32 i) { return (u8)(i * 131u + (i >> 8) * 7u + 0x5a); }

/* ---- Device set-up (virtio 1.2 section 3.1.1) ---- */

static void check(const char *err) {
  if (err) fail(err);
}

static void negotiate(void) {
  u32 offered;
  const char *err = vmmio_negotiate(gpu, GPU_FEATURES, &offered);
  if (err && (offered & GPU_FEATURES) != GPU_FEATURES) printf("GPU features offered=0x%x\n", offered);
  check(err);
}

/* ---- Control queue: one command, one response, completion by polling the used ring ---- */

/* Send cmd_buf[0..len) and wait for the response; returns its type. */
static u32 send(u32 len, const char *name) {
  memset(resp_buf, 0, sizeof(resp_buf));
  queue.desc[0] = (struct vring_desc){(u64)cmd_buf, len, VRING_DESC_F_NEXT, 1};
  queue.desc[1] = (struct vring_desc){(u64)resp_buf, RESP_BUF_SIZE, VRING_DESC_F_WRITE, 0};
  vmmio_queue_kick(gpu, GPU_CONTROL_QUEUE, &ctrlq, 0);
  u32 spins = 0;
  while (!vmmio_queue_has_used(&ctrlq)) {
    if (++spins > POLL_LIMIT) {
      printf("GPU no response to %s\n", name);
      fail("no response");
    }
    cpu_relax();
  }
  struct vring_used_elem e = vmmio_queue_take_used(&ctrlq);
  if (e.id != 0) fail("used ring returned another chain");
  if (e.len < sizeof(struct gpu_hdr)) fail("short response");
  return ((struct gpu_hdr *)resp_buf)->type;
}

static void expect(u32 len, const char *name, u32 want) {
  u32 got = send(len, name);
  if (got != want) {
    printf("GPU %s answered 0x%x, wanted 0x%x\n", name, got, want);
    fail("unexpected response");
  }
}

/* Zero cmd_buf and fill the header. */
static void *cmd(u32 type, u32 ctx_id) {
  memset(cmd_buf, 0, sizeof(cmd_buf));
  struct gpu_hdr *h = (struct gpu_hdr *)cmd_buf;
  h->type = type;
  h->ctx_id = ctx_id;
  return cmd_buf;
}

/* SUBMIT_3D of `dwords` stream dwords at `stream`. */
static void submit_3d(const u32 *stream, u32 dwords, const char *name) {
  struct gpu_cmd_submit *c = cmd(CMD_SUBMIT_3D, CTX_ID);
  if (sizeof(*c) + dwords * 4 > sizeof(cmd_buf)) fail("stream too long");
  c->size = dwords * 4;
  memcpy(cmd_buf + sizeof(*c), stream, dwords * 4);
  expect(sizeof(*c) + dwords * 4, name, RESP_OK_NODATA);
}

static void ctx_attach(u32 res) {
  struct gpu_ctx_resource *c = cmd(CMD_CTX_ATTACH_RESOURCE, CTX_ID);
  c->resource_id = res;
  expect(sizeof(*c), "CTX_ATTACH_RESOURCE", RESP_OK_NODATA);
}

/* ---- Paging: map [base, base+len) identity with 2 MiB pages ---- */

static u64 *next_table(u64 *table, u32 index) {
  u64 e = table[index];
  if (e & PTE_PRESENT) {
    if (e & PTE_PAGE_SIZE) fail("a large page covers the window");
    return (u64 *)(e & PTE_ADDR_MASK);
  }
  if (pt_used == PT_POOL_TABLES) fail("page-table pool exhausted");
  u64 *t = pt_pool[pt_used++];
  memset(t, 0, sizeof(pt_pool[0]));
  table[index] = (u64)t | PTE_PRESENT | PTE_WRITE;
  return t;
}

/* Add identity 2 MiB pages for [base, base+len) under `pml4`, taking new tables from pt_pool. */
static void map_identity(u64 *pml4, u64 base, u64 len) {
  for (u64 a = base & ~(LARGE_PAGE_SIZE - 1); a < base + len; a += LARGE_PAGE_SIZE) {
    u64 *pdpt = next_table(pml4, (u32)(a >> PML4_SHIFT) & PT_INDEX_MASK);
    u64 *pd = next_table(pdpt, (u32)(a >> PDPT_SHIFT) & PT_INDEX_MASK);
    pd[(a >> PD_SHIFT) & PT_INDEX_MASK] = a | PTE_PRESENT | PTE_WRITE | PTE_PAGE_SIZE;
  }
}

/* Reloading CR3 flushes the TLB (no global pages here). */
static void flush_tlb(void) { __asm__ volatile("mov %%cr3, %%rax\n\tmov %%rax, %%cr3" ::: "rax", "memory"); }

void guest_main(void) {
  u64 dsdt = vmmio_find_dsdt();
  if (!dsdt) fail("no DSDT");
  nmmio = vmmio_discover(dsdt, mmio, MAX_DEVICES);
  for (u32 i = 0; i < nmmio && !gpu; i++) {
    u64 b = mmio[i].base;
    if (!vmmio_check_transport(b) && rd32(b + VMMIO_DEVICE_ID) == VIRTIO_ID_GPU) gpu = b;
  }
  if (!gpu) {
    printf("GPU found=%u\n", nmmio);
    fail("no virtio-gpu in the DSDT");
  }
  printf("GPU dev base=0x%llx found=%u\n", gpu, nmmio);

  negotiate();
  check(vmmio_setup_queue(gpu, GPU_CONTROL_QUEUE, &ctrlq, &queue, QUEUE_SIZE));
  check(vmmio_driver_ok(gpu));

  u64 shm_base, shm_len;
  vmmio_read_shm(gpu, GPU_SHM_ID_HOST_VISIBLE, &shm_base, &shm_len);
  if (shm_len == VMMIO_SHM_ABSENT || shm_base == VMMIO_SHM_ABSENT) fail("no host-visible shared memory region");
  printf("GPU shm base=0x%llx len=0x%llx\n", shm_base, shm_len);
  if (shm_len < MAP_OFFSET + BLOB_SIZE) fail("window smaller than the blob");
  map_identity((u64 *)(READ_CR(3) & PTE_ADDR_MASK), shm_base + MAP_OFFSET, BLOB_SIZE);
  flush_tlb();

  /* The capsets, as the Linux driver reads them at probe (virtio_gpu_get_capsets). Filling the VIRGL2
   * caps is also when virglrenderer 0.10.4 works out the GL buffer caching type OK_MAP_INFO reports. */
  u32 ncaps = rd32(gpu + VMMIO_CONFIG + GPU_CONFIG_NUM_CAPSETS);
  u32 v2_version = 0, v2_size = 0;
  for (u32 i = 0; i < ncaps; i++) {
    struct gpu_get_capset_info *ci = cmd(CMD_GET_CAPSET_INFO, 0);
    ci->capset_index = i;
    expect(sizeof(*ci), "GET_CAPSET_INFO", RESP_OK_CAPSET_INFO);
    struct gpu_resp_capset_info *r = (struct gpu_resp_capset_info *)resp_buf;
    if (r->capset_id == CAPSET_VIRGL2) v2_version = r->capset_max_version, v2_size = r->capset_max_size;
  }
  if (!v2_size || v2_size > RESP_BUF_SIZE - sizeof(struct gpu_hdr)) fail("no usable VIRGL2 capset");
  struct gpu_get_capset *gc = cmd(CMD_GET_CAPSET, 0);
  gc->capset_id = CAPSET_VIRGL2;
  gc->capset_version = v2_version;
  expect(sizeof(*gc), "GET_CAPSET", RESP_OK_CAPSET);
  printf("GPU capsets=%u virgl2 version=%u size=%u\n", ncaps, v2_version, v2_size);

  /* A virgl2 context (CONTEXT_INIT: the capset id in the low byte of context_init). */
  struct gpu_ctx_create *cc = cmd(CMD_CTX_CREATE, CTX_ID);
  static const char name[] = "gpu_blob";
  cc->nlen = sizeof(name) - 1;
  cc->context_init = CAPSET_VIRGL2;
  memcpy(cc->debug_name, name, sizeof(name) - 1);
  expect(sizeof(*cc), "CTX_CREATE", RESP_OK_NODATA);

  /* The buffer behind the blob, as Mesa's virgl driver creates it. */
  const u32 create[] = {
      VIRGL_CMD0(VIRGL_CCMD_PIPE_RESOURCE_CREATE, 0, VIRGL_PIPE_RES_CREATE_SIZE),
      PIPE_BUFFER, VIRGL_FORMAT_R8_UNORM, PIPE_BIND_VERTEX_BUFFER, BLOB_SIZE, 1, 1, 1, 0, 0,
      PIPE_RESOURCE_FLAG_MAP_PERSISTENT | PIPE_RESOURCE_FLAG_MAP_COHERENT, BLOB_ID,
  };
  submit_3d(create, sizeof(create) / 4, "SUBMIT_3D(PIPE_RESOURCE_CREATE)");

  struct gpu_resource_create_blob *cb = cmd(CMD_RESOURCE_CREATE_BLOB, CTX_ID);
  cb->resource_id = BLOB_RES_ID;
  cb->blob_mem = BLOB_MEM_HOST3D;
  cb->blob_flags = BLOB_FLAG_USE_MAPPABLE;
  cb->blob_id = BLOB_ID;
  cb->size = BLOB_SIZE;
  expect(sizeof(*cb), "RESOURCE_CREATE_BLOB", RESP_OK_NODATA);
  ctx_attach(BLOB_RES_ID);

  struct gpu_resource_map_blob *mb = cmd(CMD_RESOURCE_MAP_BLOB, CTX_ID);
  mb->resource_id = BLOB_RES_ID;
  mb->offset = MAP_OFFSET;
  expect(sizeof(*mb), "RESOURCE_MAP_BLOB", RESP_OK_MAP_INFO);
  printf("GPU map_info=0x%x\n", ((struct gpu_resp_map_info *)resp_buf)->map_info & MAP_CACHE_MASK);

  /* Stores through the window land in the host's buffer: no VMM copy. */
  volatile u8 *win = (volatile u8 *)(shm_base + MAP_OFFSET);
  for (u32 i = 0; i < BLOB_SIZE; i++) win[i] = pattern_byte(i);
  for (u32 i = 0; i < BLOB_SIZE; i++)
    if (win[i] != pattern_byte(i)) fail("the window does not keep what was written");

  /* A second buffer, backed by guest pages, that the host copies the blob into. */
  struct gpu_resource_create_3d *c3 = cmd(CMD_RESOURCE_CREATE_3D, 0);
  c3->resource_id = COPY_RES_ID;
  c3->target = PIPE_BUFFER;
  c3->format = VIRGL_FORMAT_R8_UNORM;
  c3->bind = PIPE_BIND_VERTEX_BUFFER;
  c3->width = BLOB_SIZE;
  c3->height = c3->depth = c3->array_size = 1;
  expect(sizeof(*c3), "RESOURCE_CREATE_3D", RESP_OK_NODATA);
  struct gpu_resource_attach_backing *ab = cmd(CMD_RESOURCE_ATTACH_BACKING, 0);
  ab->resource_id = COPY_RES_ID;
  ab->nr_entries = 1;
  ab->entries[0].addr = (u64)readback;
  ab->entries[0].length = BLOB_SIZE;
  expect(sizeof(*ab), "RESOURCE_ATTACH_BACKING", RESP_OK_NODATA);
  ctx_attach(COPY_RES_ID);

  const u32 copy[] = {
      VIRGL_CMD0(VIRGL_CCMD_RESOURCE_COPY_REGION, 0, VIRGL_CMD_RESOURCE_COPY_REGION_SIZE),
      COPY_RES_ID, 0, 0, 0, 0,  /* dst, level, x, y, z */
      BLOB_RES_ID, 0,           /* src, level */
      0, 0, 0, BLOB_SIZE, 1, 1, /* box */
  };
  submit_3d(copy, sizeof(copy) / 4, "SUBMIT_3D(RESOURCE_COPY_REGION)");

  memset(readback, 0, sizeof(readback));
  struct gpu_transfer_host_3d *t = cmd(CMD_TRANSFER_FROM_HOST_3D, CTX_ID);
  t->box = (struct gpu_box){0, 0, 0, BLOB_SIZE, 1, 1};
  t->resource_id = COPY_RES_ID;
  expect(sizeof(*t), "TRANSFER_FROM_HOST_3D", RESP_OK_NODATA);
  for (u32 i = 0; i < BLOB_SIZE; i++)
    if (readback[i] != pattern_byte(i)) {
      printf("GPU blob mismatch at %u: 0x%x != 0x%x\n", i, readback[i], pattern_byte(i));
      fail("read-back differs from the pattern");
    }
  printf("GPU blob pattern=ok bytes=%u\n", BLOB_SIZE);

  struct gpu_resource_unmap_blob *ub = cmd(CMD_RESOURCE_UNMAP_BLOB, CTX_ID);
  ub->resource_id = BLOB_RES_ID;
  expect(sizeof(*ub), "RESOURCE_UNMAP_BLOB", RESP_OK_NODATA);
  printf("GPU unmap ok\n");
  wr32(gpu + VMMIO_STATUS, 0); /* reset: the device stops using our queue */
  printf("GPU DONE\n");
}
