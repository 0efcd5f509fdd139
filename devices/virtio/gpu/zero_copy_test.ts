// virtio-gpu's zero-copy blob path end to end without KVM: the real transport (VirtioMmioTransport),
// device (GpuDevice) and renderer (VirglBackend on Debian's libvirglrenderer1, EGL surfaceless), driven
// through real split queues in guest memory by the test driver, with a shared-memory mapper that behaves
// like the VMM's (vmm/device_manager/shared_memory.ts over vmm/kvm/vm.ts addSlot/removeSlot): each mapping becomes a
// numbered "memory slot" at window base + offset, slot numbers are reused, overlapping or out-of-window
// slots are refused, and only a finite number exist. The guest's stores through the window are made the
// way KVM makes them: the guest-physical address is looked up in the slots and the bytes land at the
// slot's host address (the blob's own memory). test/kvm/gpu_test.ts runs the same sequence from a guest
// under KVM. Skips with the reason when virglrenderer cannot initialise here.

import assert from "node:assert/strict";
import type { SharedMemoryMapper } from "../device.ts";
import { guestLog } from "../../../core/log.ts";
import {
  VIRTIO_MMIO_SHM_BASE_HIGH,
  VIRTIO_MMIO_SHM_BASE_LOW,
  VIRTIO_MMIO_SHM_LEN_HIGH,
  VIRTIO_MMIO_SHM_LEN_LOW,
  VIRTIO_MMIO_SHM_SEL,
  VirtioMmioTransport,
} from "../mmio.ts";
import { GpuDevice } from "./device.ts";
import { VirglBackend } from "./backend_virgl.ts";
import * as P from "./protocol.ts";
import { PIPE_BIND_VERTEX_BUFFER, PIPE_BUFFER, VirglStream } from "./virgl_stream.ts";
import { VIRGL_FORMAT_R8_UNORM } from "./formats.ts";
import { GiB, MiB } from "../../../core/units.ts";
import { GuardedGuestMemory, VirtioTestDriver } from "../../../test/support/virtio_driver.ts";
import {
  attach,
  cmd,
  createHostBlob,
  ctxAttach,
  ctxCreate,
  hostBufferStream,
  mapBlob,
  submit,
  unmapBlob,
} from "../../../test/support/gpu_commands.ts";

const PAGE = 4096;
/** Guest RAM of the test (one region at 0) and the driver's ring/buffer arena inside it. */
const MEM_SIZE = 32 * MiB;
const ARENA = { start: 0x1000, end: 8 * MiB };
/** Where the read-back pages live (above the arena). */
const DATA = 8 * MiB;
/** The host-visible window (shared-memory region 1): its size (crosvm pci-bar-size) and guest address. */
const WINDOW_SIZE = 64 * MiB;
/** Where the VMM's device manager places the first window for this RAM size: the shared-memory area above RAM starts at 64 GiB. */
const WINDOW_BASE = 64 * GiB;
/** Same size as the KVM guest's blob (test/guests/gpu_blob.c BLOB_SIZE). */
const BLOB_SIZE = 64 * 1024;
/** Slots the test mapper has: far fewer than the map/unmap cycles, so only reuse lets them all succeed. */
const MAX_SLOTS = 8;
const MAP_CYCLES = 1000;
/** SHMLen / SHMBase of an absent region (virtio 1.2 section 4.2.2): all ones. */
const SHM_ABSENT_WORD = 0xffff_ffff;
/** Response buffer for ordinary commands (the largest, OK_MAP_INFO, is 32 bytes). */
const RESP_LEN = 256;

let skipReason = "";
try {
  new VirglBackend().close();
} catch (e) {
  skipReason = `virglrenderer cannot initialise here: ${(e as Error).message}`;
  console.log(`gpu_zero_copy_test: skipping: ${skipReason}`);
}
const ignore = skipReason !== "";

/** One installed mapping, as a KVM memory slot: guest-physical range → host memory. */
interface Slot {
  gpa: number;
  size: number;
  hostAddr: bigint;
  writable: boolean;
}

/**
 * A SharedMemoryMapper that does what the VMM's does with KVM: each mapping is a numbered slot at
 * window base + offset (numbers reused after removal, a finite supply), and guest accesses to the
 * window go through the slots to host memory, or fail like a KVM_EXIT_MMIO where no slot is.
 */
class SlotMapper implements SharedMemoryMapper {
  readonly slots = new Map<number, Slot>();
  readonly #byKey = new Map<string, number>();
  readonly #free: number[] = [];
  #next = 0;
  /** Highest slot number ever handed out + 1. */
  get slotNumbersUsed(): number {
    return this.#next;
  }
  adds = 0;
  removes = 0;

  constructor(readonly windows: Map<number, { base: number; size: number }>, readonly maxSlots: number) {}

  addMapping(id: number, offset: number, hostAddr: bigint, length: number, writable: boolean): void {
    const w = this.windows.get(id);
    if (!w || offset < 0 || length <= 0 || offset + length > w.size) {
      throw new Error(`mapping ${offset}+${length} is outside shared-memory region ${id}`);
    }
    const key = `${id}:${offset}`;
    if (this.#byKey.has(key)) throw new Error(`region ${id} offset ${offset} is already mapped`);
    const gpa = w.base + offset;
    for (const s of this.slots.values()) {
      // KVM_SET_USER_MEMORY_REGION refuses a slot overlapping another (EEXIST).
      if (gpa < s.gpa + s.size && s.gpa < gpa + length) throw new Error(`slot at 0x${gpa.toString(16)} overlaps`);
    }
    const slot = this.#free.pop() ?? this.#next++;
    if (slot >= this.maxSlots) throw new Error(`memory slots exhausted (${this.maxSlots})`);
    this.slots.set(slot, { gpa, size: length, hostAddr, writable });
    this.#byKey.set(key, slot);
    this.adds++;
  }

  removeMapping(id: number, offset: number): void {
    const key = `${id}:${offset}`;
    const slot = this.#byKey.get(key);
    if (slot === undefined) throw new Error(`region ${id} offset ${offset} is not mapped`);
    this.slots.delete(slot);
    this.#byKey.delete(key);
    this.#free.push(slot);
    this.removes++;
  }

  /** The slot holding guest-physical [gpa, gpa+len), or undefined (the access would exit to the VMM as MMIO). */
  slotAt(gpa: number, len: number): Slot | undefined {
    for (const s of this.slots.values()) if (gpa >= s.gpa && gpa + len <= s.gpa + s.size) return s;
    return undefined;
  }

  /** The host bytes behind guest-physical [gpa, gpa+len): what the guest's loads and stores reach. */
  #view(gpa: number, len: number, write: boolean): Uint8Array {
    const s = this.slotAt(gpa, len);
    if (!s) throw new Error(`no memory slot at 0x${gpa.toString(16)}+${len}: KVM_EXIT_MMIO`);
    if (write && !s.writable) throw new Error(`slot at 0x${s.gpa.toString(16)} is read-only`);
    const ptr = Deno.UnsafePointer.create(s.hostAddr + BigInt(gpa - s.gpa));
    if (!ptr) throw new Error("null host address");
    return new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(ptr, len));
  }

  /** A guest store through the window. */
  guestWrite(gpa: number, data: Uint8Array): void {
    this.#view(gpa, data.length, true).set(data);
  }

  /** A guest load through the window. */
  guestRead(gpa: number, len: number): Uint8Array {
    return this.#view(gpa, len, false).slice();
  }
}

/** The guest's pattern (test/guests/gpu_blob.c pattern_byte), with a seed for later rounds. */
function pattern(len: number, seed = 0): Uint8Array {
  return Uint8Array.from({ length: len }, (_, i) => (i * 131 + (i >> 8) * 7 + 0x5a + seed) & 0xff);
}

/** Byte arrays equal; on a mismatch, names the first differing offset (a deepEqual diff of 64 KiB is huge). */
function assertBytes(got: Uint8Array, want: Uint8Array, what: string): void {
  assert.equal(got.length, want.length, `${what}: length`);
  const i = got.findIndex((b, k) => b !== want[k]);
  assert.equal(
    i,
    -1,
    `${what}: first difference at byte ${i}: 0x${got[i]?.toString(16)} != 0x${want[i]?.toString(16)}`,
  );
}

// Commands of the sequence in context CTX (field order from linux/virtio_gpu.h).
const CTX = 1;
const IN_CTX = { ctxId: CTX };
/** TRANSFER_*_HOST_3D of a whole buffer: box, offset, resource_id, level, stride, layer_stride. */
const transfer3d = (type: number, res: number, size: number) =>
  cmd(type, [0, 0, 0, size, 1, 1, 0n, res, 0, 0, 0], IN_CTX);
const copyStream = (dst: number, src: number, size: number) =>
  new VirglStream().resourceCopyRegion(dst, 0, 0, 0, 0, src, 0, { x: 0, y: 0, z: 0, w: size, h: 1, d: 1 }).bytes();

/** Everything a test needs: guest memory, device, transport, driver, mapper; closed by close(). */
function setUp() {
  const g = new GuardedGuestMemory([{ start: 0, size: MEM_SIZE }]);
  const dev = new GpuDevice({
    backend: new VirglBackend(),
    displays: [{ width: 64, height: 48 }],
    hostVisibleWindowSize: WINDOW_SIZE,
  });
  const windows = new Map<number, { base: number; size: number }>();
  for (const r of dev.sharedMemoryRegions()) windows.set(r.id, { base: WINDOW_BASE, size: r.size });
  const mapper = new SlotMapper(windows, MAX_SLOTS);
  dev.setSharedMemoryMapper(mapper);
  let interrupts = 0;
  const t = new VirtioMmioTransport(dev, g.mem, {
    irq: { trigger: () => interrupts++ },
    shmBase: (id) => windows.get(id)?.base,
  });
  const drv = new VirtioTestDriver(t, g.mem, ARENA);
  const errors: string[] = [];
  const savedSink = guestLog.sink;
  dev.guestErrorLine = (l) => errors.push(l);
  guestLog.sink = () => {}; // the lines are counted through guestErrorLine; keep the test output quiet

  const acked = drv.init({
    features: (1n << 32n) | P.VIRTIO_GPU_F_VIRGL | P.VIRTIO_GPU_F_RESOURCE_BLOB | P.VIRTIO_GPU_F_CONTEXT_INIT,
  });
  const q = drv.queues[0];
  const base = drv.alloc.mark();

  /** Post one command, kick, and return its response (the device answers unfenced commands at once). */
  const send = (c: Uint8Array, expect = P.RESP_OK_NODATA, respLen = RESP_LEN): DataView => {
    const sub = q.submit([c, respLen]);
    drv.kick(0);
    const used = q.used();
    const name = P.commandName(new DataView(c.buffer).getUint32(0, true));
    assert.equal(used.length, 1, `${name} answered`);
    assert.equal(used[0].id, sub.head);
    const resp = new DataView(g.mem.read(sub.buffers[1].addr, used[0].len).buffer);
    drv.alloc.resetTo(base);
    const type = resp.getUint32(P.HDR_TYPE, true);
    assert.equal(type, expect, `${name}: response 0x${type.toString(16)}, expected 0x${expect.toString(16)}`);
    return resp;
  };

  /** A bad command: the expected ERR_* response and exactly one guest-error line. */
  const refuse = (c: Uint8Array, expect: number, what: string, pattern?: RegExp) => {
    const before = errors.length;
    send(c, expect);
    assert.equal(errors.length, before + 1, `${what}: one log line (${errors.slice(before).join(" | ")})`);
    if (pattern) assert.match(errors[before], pattern, what);
  };

  // What the Linux driver does at probe (virtio_gpu_get_capsets): GET_CAPSET_INFO for each index, then
  // GET_CAPSET. virglrenderer 0.10.4 infers the GL buffer caching type while filling the VIRGL2 caps;
  // before that, OK_MAP_INFO carries map_info 0 (VIRTIO_GPU_MAP_CACHE_NONE).
  const numCapsets = new DataView(drv.readConfig(P.GPU_CFG_NUM_CAPSETS, 4).buffer).getUint32(0, true);
  const capsets = new Map<number, { maxVersion: number; maxSize: number }>();
  for (let i = 0; i < numCapsets; i++) {
    const r = send(cmd(P.CMD_GET_CAPSET_INFO, [i, 0]), P.RESP_OK_CAPSET_INFO);
    capsets.set(r.getUint32(P.HDR_SIZE, true), {
      maxVersion: r.getUint32(P.HDR_SIZE + 4, true),
      maxSize: r.getUint32(P.HDR_SIZE + 8, true),
    });
  }
  const v2 = capsets.get(P.VIRTIO_GPU_CAPSET_VIRGL2);
  assert.ok(v2, `capset VIRGL2 offered (${[...capsets.keys()]})`);
  const caps = send(
    cmd(P.CMD_GET_CAPSET, [P.VIRTIO_GPU_CAPSET_VIRGL2, v2.maxVersion]),
    P.RESP_OK_CAPSET,
    P.HDR_SIZE + v2.maxSize,
  );
  assert.equal(caps.byteLength, P.HDR_SIZE + v2.maxSize);

  return {
    g,
    dev,
    drv,
    mapper,
    acked,
    send,
    refuse,
    errors,
    get interrupts() {
      return interrupts;
    },
    close() {
      guestLog.sink = savedSink;
      dev.close();
      g.close();
    },
  };
}

type Env = ReturnType<typeof setUp>;

/** Guest pages for `size` bytes at DATA: three entries of uneven lengths, handed over out of order. */
function backingEntries(size: number): { addr: number; len: number }[] {
  const a = PAGE * 3, b = PAGE * 5;
  // Backing bytes [0,a) [a,a+b) [a+b,size), placed apart and in reverse address order.
  return [
    { addr: DATA + 4 * size, len: a },
    { addr: DATA, len: b },
    { addr: DATA + 2 * size, len: size - a - b },
  ];
}

function readBacking(env: Env, entries: { addr: number; len: number }[]): Uint8Array {
  const out = new Uint8Array(entries.reduce((n, e) => n + e.len, 0));
  let off = 0;
  for (const e of entries) {
    out.set(env.g.mem.read(e.addr, e.len), off);
    off += e.len;
  }
  return out;
}

/** CTX_CREATE (virgl2), the blob's buffer, the HOST3D blob, attached; a guest-backed copy target. */
function createBlobAndTarget(env: Env, blob: number, blobId: number, dst: number) {
  env.send(submit(CTX, hostBufferStream(blobId, BLOB_SIZE)));
  env.send(createHostBlob(CTX, blob, blobId, BLOB_SIZE));
  env.send(ctxAttach(CTX, blob));
  env.send(
    cmd(P.CMD_RESOURCE_CREATE_3D, [
      dst,
      PIPE_BUFFER,
      VIRGL_FORMAT_R8_UNORM,
      PIPE_BIND_VERTEX_BUFFER,
      BLOB_SIZE,
      1,
      1,
      1,
      0,
      0,
      0,
      0,
    ]),
  );
  const entries = backingEntries(BLOB_SIZE);
  env.send(
    attach(dst, entries),
  );
  env.send(ctxAttach(CTX, dst));
  return entries;
}

/** Copy blob → dst on the host GPU, read dst back into its guest pages, return them. */
function copyAndReadBack(env: Env, blob: number, dst: number, entries: { addr: number; len: number }[]) {
  for (const e of entries) env.g.mem.fill(e.addr, e.len, 0);
  env.send(submit(CTX, copyStream(dst, blob, BLOB_SIZE)));
  env.send(transfer3d(P.CMD_TRANSFER_FROM_HOST_3D, dst, BLOB_SIZE));
  return readBacking(env, entries);
}

const COPY_KINDS = [
  "transferToHostBytes",
  "transferFromHostBytes",
  "streamToHostBytes",
  "streamFromHostBytes",
  "copyTransferToHostBytes",
  "copyTransferFromHostBytes",
  "inlineWriteBytes",
  "bytesCopied",
] as const;

Deno.test({
  name: "zero copy: HOST3D blob mapped in the SHM window, written through a slot, copied by the GPU, read back",
  ignore,
  fn() {
    const env = setUp();
    try {
      const wanted = P.VIRTIO_GPU_F_VIRGL | P.VIRTIO_GPU_F_RESOURCE_BLOB | P.VIRTIO_GPU_F_CONTEXT_INIT;
      assert.equal(env.acked & wanted, wanted, "VIRGL, RESOURCE_BLOB and CONTEXT_INIT negotiated");
      // The window as the guest finds it: SHMSel = 1, then SHMLen and SHMBase; region 0 is absent.
      env.drv.writeReg(VIRTIO_MMIO_SHM_SEL, P.VIRTIO_GPU_SHM_ID_HOST_VISIBLE);
      const len = env.drv.readReg(VIRTIO_MMIO_SHM_LEN_LOW) + env.drv.readReg(VIRTIO_MMIO_SHM_LEN_HIGH) * 2 ** 32;
      const shmBase = env.drv.readReg(VIRTIO_MMIO_SHM_BASE_LOW) + env.drv.readReg(VIRTIO_MMIO_SHM_BASE_HIGH) * 2 ** 32;
      assert.equal(len, WINDOW_SIZE);
      assert.equal(shmBase, WINDOW_BASE);
      assert.ok(shmBase >= 64 * GiB && shmBase >= MEM_SIZE, "the window lies above RAM");
      env.drv.writeReg(VIRTIO_MMIO_SHM_SEL, 0);
      assert.equal(env.drv.readReg(VIRTIO_MMIO_SHM_LEN_LOW), SHM_ABSENT_WORD);
      assert.equal(env.drv.readReg(VIRTIO_MMIO_SHM_BASE_HIGH), SHM_ABSENT_WORD);

      const blob = 1, dst = 2, blobId = 7;
      env.send(ctxCreate(CTX, P.VIRTIO_GPU_CAPSET_VIRGL2, {}, "zero_copy"));
      const entries = createBlobAndTarget(env, blob, blobId, dst);
      assert.equal(env.mapper.slots.size, 0, "nothing mapped before RESOURCE_MAP_BLOB");

      const mi = env.send(mapBlob(blob, 0, IN_CTX), P.RESP_OK_MAP_INFO);
      assert.equal(mi.getUint32(P.HDR_SIZE, true) & P.VIRTIO_GPU_MAP_CACHE_MASK, P.VIRTIO_GPU_MAP_CACHE_CACHED);
      assert.equal(env.mapper.slots.size, 1);
      const slot = env.mapper.slotAt(shmBase, BLOB_SIZE)!;
      assert.ok(slot, "a slot covers window offset 0 for the blob's size");
      assert.equal(slot.gpa, shmBase);
      assert.equal(slot.size, BLOB_SIZE, "the slot is the blob's page-rounded size");
      assert.equal(slot.hostAddr % BigInt(PAGE), 0n, "page-aligned host memory");
      assert.ok(slot.writable);
      const host = env.g.mem.hostAddress(0, MEM_SIZE);
      assert.ok(
        slot.hostAddr + BigInt(BLOB_SIZE) <= host || slot.hostAddr >= host + BigInt(MEM_SIZE),
        "the slot is the renderer's memory, not guest RAM",
      );

      // The guest's stores through the window: straight into the blob's memory.
      const pat = pattern(BLOB_SIZE);
      env.mapper.guestWrite(shmBase, pat);
      assertBytes(env.mapper.guestRead(shmBase, BLOB_SIZE), pat, "read through the window");
      assert.throws(() => env.mapper.guestWrite(shmBase + BLOB_SIZE, new Uint8Array(1)), /KVM_EXIT_MMIO/);

      const got = copyAndReadBack(env, blob, dst, entries);
      assertBytes(got, pat, "the pattern written through the window came back through the GPU");

      const s = env.dev.gpuStats();
      for (const k of COPY_KINDS) assert.equal(s.resources[String(blob)][k], 0, `blob ${k}`);
      assert.equal(s.resources[String(blob)].blobMaps, 1);
      assert.equal(s.resources[String(blob)].blobMappedBytes, BLOB_SIZE);
      assert.equal(s.resources[String(dst)].transferFromHostBytes, BLOB_SIZE, "exactly the read-back bytes");
      assert.equal(s.resources[String(dst)].bytesCopied, BLOB_SIZE);
      assert.equal(s.contexts[String(CTX)].bytesCopied, BLOB_SIZE);
      assert.equal(s.totals.bytesCopied, BLOB_SIZE, "the read-back is the only copy of the run");
      assert.equal(s.totals.blobMappedBytes, BLOB_SIZE);
      assert.deepEqual(s.mapped, { count: 1, bytes: BLOB_SIZE });
      const flat = env.dev.stats();
      assert.equal(flat.blobMaps, 1);
      assert.equal(flat.blobMappedBytes, BLOB_SIZE);
      assert.equal(flat.mappedNow, 1);
      assert.equal(flat.guestErrors, 0);

      env.send(unmapBlob(blob, IN_CTX));
      assert.equal(env.mapper.slots.size, 0, "UNMAP_BLOB removed the slot");
      assert.equal(env.mapper.removes, 1);
      assert.throws(() => env.mapper.guestRead(shmBase, 4), /KVM_EXIT_MMIO/, "the window is empty again");
      assert.deepEqual(env.dev.gpuStats().mapped, { count: 0, bytes: 0 });
      assert.ok(env.interrupts > 0, "used-buffer interrupts raised");
      assert.deepEqual(env.errors, []);
      assert.ok(env.g.canaryIntact(), "no access outside guest memory");
    } finally {
      env.close();
    }
  },
});

Deno.test({
  name: "zero copy: bad maps, double map, overlap, unmap of unmapped, transfers on a mapped blob are refused",
  ignore,
  fn() {
    const env = setUp();
    try {
      const blob = 1, dst = 2, other = 3;
      env.send(ctxCreate(CTX, P.VIRTIO_GPU_CAPSET_VIRGL2, {}, "zero_copy"));
      createBlobAndTarget(env, blob, 11, dst);
      env.send(submit(CTX, hostBufferStream(12, BLOB_SIZE)));
      env.send(createHostBlob(CTX, other, 12, BLOB_SIZE));
      env.send(ctxAttach(CTX, other));
      const E = P.RESP_ERR_INVALID_PARAMETER;

      // Offsets outside the window, or with the blob running past its end, or not page aligned.
      env.refuse(mapBlob(blob, WINDOW_SIZE, IN_CTX), E, "offset = window size", /outside the window/);
      env.refuse(mapBlob(blob, 2n ** 63n, IN_CTX), E, "offset 2^63", /outside the window/);
      env.refuse(mapBlob(blob, WINDOW_SIZE - PAGE, IN_CTX), E, "blob past the end", /runs past/);
      env.refuse(mapBlob(blob, PAGE / 2, IN_CTX), E, "unaligned offset", /outside the window/);
      assert.equal(env.mapper.adds, 0, "no slot was installed for a refused map");
      // Not a mappable blob; unknown resource.
      env.refuse(mapBlob(dst, 0, IN_CTX), E, "map of a 3D buffer", /not a mappable blob/);
      env.refuse(mapBlob(999, 0, IN_CTX), P.RESP_ERR_INVALID_RESOURCE_ID, "map of an unknown resource");

      env.send(mapBlob(blob, 0, IN_CTX), P.RESP_OK_MAP_INFO);
      env.refuse(mapBlob(blob, MiB, IN_CTX), E, "double map", /already mapped/);
      env.refuse(mapBlob(other, PAGE, IN_CTX), E, "overlapping another mapping", /overlaps/);
      assert.equal(env.mapper.slots.size, 1);
      env.send(mapBlob(other, MiB, IN_CTX), P.RESP_OK_MAP_INFO);
      assert.equal(env.mapper.slots.size, 2, "a second blob at its own offset");
      // Two windows onto two different blobs.
      env.mapper.guestWrite(WINDOW_BASE, pattern(16, 1));
      env.mapper.guestWrite(WINDOW_BASE + MiB, pattern(16, 2));
      assertBytes(env.mapper.guestRead(WINDOW_BASE, 16), pattern(16, 1), "first blob's window");
      assert.notEqual(env.mapper.slotAt(WINDOW_BASE, 1)!.hostAddr, env.mapper.slotAt(WINDOW_BASE + MiB, 1)!.hostAddr);

      // Transfers on a mapped blob (virglrenderer would leave a sticky GL error): refused, nothing counted.
      const copiedBefore = env.dev.gpuStats().totals.bytesCopied;
      env.refuse(transfer3d(P.CMD_TRANSFER_TO_HOST_3D, blob, BLOB_SIZE), E, "TO_HOST on mapped", /mapped blob/);
      env.refuse(transfer3d(P.CMD_TRANSFER_FROM_HOST_3D, blob, BLOB_SIZE), E, "FROM_HOST on mapped", /mapped blob/);
      assert.equal(env.dev.gpuStats().totals.bytesCopied, copiedBefore);

      env.send(unmapBlob(blob, IN_CTX));
      assert.equal(env.mapper.slotAt(WINDOW_BASE, 1), undefined, "slot removed on unmap");
      env.refuse(unmapBlob(blob, IN_CTX), E, "unmap of unmapped", /not mapped/);
      env.refuse(unmapBlob(dst, IN_CTX), E, "unmap of a never-mapped buffer", /not mapped/);
      env.refuse(unmapBlob(999, IN_CTX), P.RESP_ERR_INVALID_RESOURCE_ID, "unmap of an unknown resource");
      // The freed range maps again; destroying a mapped blob unmaps it.
      env.send(mapBlob(blob, 0, IN_CTX), P.RESP_OK_MAP_INFO);
      env.send(cmd(P.CMD_RESOURCE_UNREF, [other, 0]));
      assert.equal(env.mapper.slotAt(WINDOW_BASE + MiB, 1), undefined, "RESOURCE_UNREF removed the blob's slot");
      env.send(unmapBlob(blob, IN_CTX));
      assert.equal(env.mapper.slots.size, 0);
      assert.deepEqual(env.dev.gpuStats().mapped, { count: 0, bytes: 0 });
      assert.ok(env.g.canaryIntact());
    } finally {
      env.close();
    }
  },
});

Deno.test({
  name: `zero copy: ${MAP_CYCLES} map/unmap cycles on ${MAX_SLOTS} slots (numbers reused), the blob still copies`,
  ignore,
  fn() {
    const env = setUp();
    try {
      const blob = 1, dst = 2;
      env.send(ctxCreate(CTX, P.VIRTIO_GPU_CAPSET_VIRGL2, {}, "zero_copy"));
      const entries = createBlobAndTarget(env, blob, 21, dst);
      const marker = new Uint8Array(4);
      for (let i = 0; i < MAP_CYCLES; i++) {
        const offset = (i % 16) * MiB;
        env.send(mapBlob(blob, offset, IN_CTX), P.RESP_OK_MAP_INFO);
        assert.equal(env.mapper.slots.size, 1);
        // Each cycle's store lands in the same host memory, wherever the window puts it.
        new DataView(marker.buffer).setUint32(0, i, true);
        env.mapper.guestWrite(WINDOW_BASE + offset + 4 * (i % 64), marker);
        env.send(unmapBlob(blob, IN_CTX));
        assert.equal(env.mapper.slots.size, 0);
      }
      assert.equal(env.mapper.adds, MAP_CYCLES);
      assert.equal(env.mapper.removes, MAP_CYCLES);
      assert.equal(env.mapper.slotNumbersUsed, 1, "one slot number served every cycle");
      const s = env.dev.gpuStats();
      assert.equal(s.resources[String(blob)].blobMaps, MAP_CYCLES);
      assert.equal(s.totals.blobMappedBytes, MAP_CYCLES * BLOB_SIZE);
      assert.deepEqual(s.mapped, { count: 0, bytes: 0 });
      assert.equal(s.totals.bytesCopied, 0);

      // The last 64 cycles' markers are all there (written through 16 different window offsets).
      env.send(mapBlob(blob, 5 * MiB, IN_CTX), P.RESP_OK_MAP_INFO);
      const head = env.mapper.guestRead(WINDOW_BASE + 5 * MiB, 4 * 64);
      for (let i = MAP_CYCLES - 64; i < MAP_CYCLES; i++) {
        assert.equal(new DataView(head.buffer).getUint32(4 * (i % 64), true), i, `marker of cycle ${i}`);
      }
      // A full pattern after all that, through the GPU and back.
      const pat = pattern(BLOB_SIZE, 99);
      env.mapper.guestWrite(WINDOW_BASE + 5 * MiB, pat);
      assertBytes(copyAndReadBack(env, blob, dst, entries), pat, "read-back after the cycles");
      const after = env.dev.gpuStats();
      assert.equal(after.resources[String(blob)].bytesCopied, 0);
      assert.equal(after.totals.bytesCopied, BLOB_SIZE);
      env.send(unmapBlob(blob, IN_CTX));
      assert.deepEqual(env.errors, []);
      assert.ok(env.g.canaryIntact());
    } finally {
      env.close();
    }
  },
});
