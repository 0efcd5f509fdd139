// The virglrenderer backend: Debian's libvirglrenderer1 (0.10.4) through Deno FFI, rendering with EGL
// surfaceless (llvmpipe when there is no GPU). One renderer per process, on the thread that creates the
// backend; every call below runs on that thread. Facts this file relies on, checked against 0.10.4 with
// Mesa's llvmpipe and no render node (devices/virtio/gpu/backend_virgl_test.ts exercises each):
// - init with USE_EGL | USE_SURFACELESS | THREAD_SYNC; fences retire through virgl_renderer_poll(),
//   which runs the write_fence / write_context_fence callbacks synchronously on this thread, after the
//   library's eventfd (virgl_renderer_get_poll_fd) became readable (waited for off-thread with a
//   nonblocking poll(2) while fences are outstanding); the fence handler runs after the poll returned;
//   poll() after a batch of commands that created fences first waits on this thread for them, a little
//   (FENCE_SETTLE_MS), since a fence whose work is done is reported one thread switch later;
// - the callbacks struct and every iovec array the library keeps live in calloc'd memory;
// - HOST3D blobs are GL buffers created by VIRGL_CCMD_PIPE_RESOURCE_CREATE with MAP_PERSISTENT|COHERENT;
// - a transfer on a mapped blob leaves a sticky GL error, so it is refused here;
// - virgl_renderer_get_fd_for_texture crashes here: pixels are read with transfer_read_iov.

import { EFD_CLOEXEC, EFD_NONBLOCK, EINVAL, ENOMEM, libc, munmap, POLLIN } from "../../../ffi/libc.ts";
import {
  blobCreateArgs,
  CALLBACKS_SIZE,
  CALLBACKS_VERSION,
  CALLBACKS_VERSION_CONTEXT_FENCES,
  CALLBACKS_WRITE_CONTEXT_FENCE,
  CALLBACKS_WRITE_FENCE,
  checkVirgl,
  CMemory,
  iovecArray,
  iovecOf,
  readResourceInfo,
  RES_INFO_SIZE,
  resourceCreateArgs,
  type ResourceInfo,
  virgl,
  VIRGL_RENDERER_CAPSET_VENUS,
  VIRGL_RENDERER_CAPSET_VIRGL,
  VIRGL_RENDERER_CAPSET_VIRGL2,
  VIRGL_RENDERER_MAP_CACHE_MASK,
  VIRGL_RENDERER_THREAD_SYNC,
  VIRGL_RENDERER_USE_EGL,
  VIRGL_RENDERER_USE_SURFACELESS,
  VIRGL_RENDERER_VENUS,
  VIRGL_RES_BIND_RENDER_TARGET,
  VIRGL_RES_BIND_SAMPLER_VIEW,
  virglBox,
  VirglError,
  type VirglSymbols,
} from "../../../ffi/virglrenderer.ts";
import {
  type Backing,
  type BlobLayout,
  type Box,
  type CapsetInfo,
  type Create2D,
  type Create3D,
  type CreateBlob,
  type FenceHandler,
  type FenceTimeline,
  type GpuBackend,
  GpuBackendError,
  type MappedBlob,
  type Rect,
  type Transfer,
} from "./backend.ts";
import { BackingReader } from "./backend_2d.ts";
import {
  isVirtioGpuFormat,
  PIPE_BUFFER,
  PIPE_TEXTURE_2D,
  toBgra,
  virglBytesPerPixel,
  VIRTIO_GPU_BYTES_PER_PIXEL,
  VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM,
  VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM,
} from "./formats.ts";
import { walkVirglCommands } from "./virgl_stream.ts";
import {
  type Create3DFields,
  CREATE_3D_DEFAULTS,
  pickCreate3DFields,
  RESP_ERR_INVALID_CONTEXT_ID,
  RESP_ERR_INVALID_PARAMETER,
  RESP_ERR_INVALID_RESOURCE_ID,
  RESP_ERR_OUT_OF_MEMORY,
  RESP_ERR_UNSPEC,
  VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE,
  VIRTIO_GPU_BLOB_MEM_GUEST,
  VIRTIO_GPU_BLOB_MEM_HOST3D,
  VIRTIO_GPU_BLOB_MEM_HOST3D_GUEST,
} from "./protocol.ts";

const BPP = VIRTIO_GPU_BYTES_PER_PIXEL;

/** The init flags used here: what works with llvmpipe and no render node. */
export const VIRGL_BACKEND_FLAGS = VIRGL_RENDERER_USE_EGL | VIRGL_RENDERER_USE_SURFACELESS |
  VIRGL_RENDERER_THREAD_SYNC;

/** Context types as crosvm's `--gpu context-types=virgl:virgl2:venus` names them, with their capset ids. */
export const CONTEXT_TYPE_CAPSETS: Readonly<Record<string, number>> = {
  virgl: VIRGL_RENDERER_CAPSET_VIRGL,
  virgl2: VIRGL_RENDERER_CAPSET_VIRGL2,
  venus: VIRGL_RENDERER_CAPSET_VENUS,
};

/** The bind flags of a RESOURCE_CREATE_2D resource in the virgl backend (what QEMU and crosvm use). */
const BIND_2D = VIRGL_RES_BIND_RENDER_TARGET | VIRGL_RES_BIND_SAMPLER_VIEW;

/** How long close() waits for outstanding fences before cleaning up anyway. */
const CLOSE_DRAIN_MS = 5000;
/** One poll(2) wait while draining in close(). */
const DRAIN_POLL_MS = 100;
/**
 * How long poll() after a batch of commands that created fences waits on this thread (poll(2) on the library's
 * eventfd) for the sync thread to report them, before leaving the rest to the off-thread waiter. A fence whose work
 * is done (softpipe draws inside submit_cmd; the flush in create_fence is done on return) is reported one thread
 * switch later: that poll(2) returned after 0.1-0.4 ms in the nested KVM host (one TCG vCPU). The off-thread path
 * takes two more threads (the blocking thread in poll(2), then the event loop) before the guest has its answer.
 * QEMU checks fences synchronously after each batch (it runs virglrenderer without THREAD_SYNC, polling again every
 * 10 ms); crosvm waits on the same eventfd in its GPU worker's own loop. Bounded, so a slow GPU costs the other
 * devices on this thread at most this long a batch.
 */
export const FENCE_SETTLE_MS = 1;
/** struct pollfd (poll.h): int fd, short events, short revents. */
const POLLFD_FD = 0;
const POLLFD_EVENTS = 4;
const POLLFD_REVENTS = 6;
const POLLFD_SIZE = 8;
/** eventfd(2) counter width. */
const EVENTFD_VALUE_SIZE = 8;

export interface VirglBackendOptions {
  /** crosvm's context-types (virgl, virgl2, venus); default virgl and virgl2. */
  contextTypes?: string[];
}

/** A resource: its create-3D fields (level 0 size; a buffer's width is its size in bytes) and host side. */
interface VirglResource extends Create3DFields {
  kind: "3d" | "blob";
  /** The iovec array the library holds for the backing (attach_iov or create_blob). */
  iov?: CMemory;
  /** Backing pages, for GUEST blob scanouts. */
  backing?: Backing;
  blobMem?: number;
  /** VIRTIO_GPU_BLOB_FLAG_* it was created with. */
  blobFlags?: number;
  /** Blob created in a Venus context (its map is an mmap of a memfd). */
  venus?: boolean;
  mapped?: MappedBlob;
}

interface GlobalFence {
  seq: number;
  timeline: FenceTimeline;
  fenceId: bigint;
}

/** Callbacks and their C struct: made once per process, never freed (the library keeps the pointer). */
interface ProcessCallbacks {
  struct: CMemory;
  writeFence: Deno.UnsafeCallback<{ readonly parameters: readonly ["pointer", "u32"]; readonly result: "void" }>;
  writeContextFence: Deno.UnsafeCallback<
    { readonly parameters: readonly ["pointer", "u32", "u32", "u64"]; readonly result: "void" }
  >;
}

let callbacks: ProcessCallbacks | undefined;
/** The backend that owns the renderer (one per process). */
let active: VirglBackend | null = null;

function processCallbacks(): ProcessCallbacks {
  if (callbacks) return callbacks;
  // Plain (not threadSafe) callbacks: with THREAD_SYNC and without ASYNC_FENCE_CB the library calls them
  // from virgl_renderer_poll() on the calling thread (virglrenderer.c ctx0_fence_retire, per_context_fence_retire).
  const writeFence = new Deno.UnsafeCallback(
    { parameters: ["pointer", "u32"], result: "void" } as const,
    (_cookie, fence) => active?.onWriteFence(fence),
  );
  const writeContextFence = new Deno.UnsafeCallback(
    { parameters: ["pointer", "u32", "u32", "u64"], result: "void" } as const,
    (_cookie, ctxId, ringIdx, fenceId) => active?.onWriteContextFence(ctxId, ringIdx, BigInt(fenceId)),
  );
  const struct = new CMemory(CALLBACKS_SIZE);
  struct.view.setInt32(CALLBACKS_VERSION, CALLBACKS_VERSION_CONTEXT_FENCES, true);
  struct.view.setBigUint64(CALLBACKS_WRITE_FENCE, BigInt(Deno.UnsafePointer.value(writeFence.pointer)), true);
  struct.view.setBigUint64(
    CALLBACKS_WRITE_CONTEXT_FENCE,
    BigInt(Deno.UnsafePointer.value(writeContextFence.pointer)),
    true,
  );
  callbacks = { struct, writeFence, writeContextFence };
  return callbacks;
}

/** The virtio-gpu response for a failed virglrenderer call. */
function responseFor(e: VirglError): number {
  if (e.errno === -EINVAL) return RESP_ERR_INVALID_PARAMETER;
  if (e.errno === -ENOMEM) return RESP_ERR_OUT_OF_MEMORY;
  return RESP_ERR_UNSPEC;
}

/** PIPE_TEXTURE_3D and PIPE_TEXTURE_1D_ARRAY (p_defines.h enum pipe_texture_target). */
const PIPE_TEXTURE_3D = 3;
const PIPE_TEXTURE_1D_ARRAY = 6;

/**
 * Refuse a transfer whose box lies outside the resource at its level, or whose bytes (when the format's
 * size is known) lie outside the backing, the checks vrend_renderer_transfer_iov makes (check_transfer_bounds,
 * check_iov_bounds).
 */
function checkTransfer(t: Transfer, r: VirglResource): void {
  const bad = (why: string) => {
    throw new GpuBackendError(RESP_ERR_INVALID_PARAMETER, `transfer on resource ${t.resourceId}: ${why}`);
  };
  const { x, y, z, w, h, d } = t.box;
  if (t.level > r.lastLevel) bad(`level ${t.level} > last level ${r.lastLevel}`);
  const lw = Math.max(1, r.width >>> t.level);
  const lh = r.target === PIPE_TEXTURE_1D_ARRAY ? r.arraySize : Math.max(1, r.height >>> t.level);
  const ld = r.target === PIPE_TEXTURE_3D ? Math.max(1, r.depth >>> t.level) : Math.max(1, r.arraySize);
  if (x + w > lw || y + h > lh || z + d > ld) bad(`box ${x},${y},${z} ${w}x${h}x${d} outside ${lw}x${lh}x${ld}`);
  const bpp = r.target === PIPE_BUFFER ? 1 : virglBytesPerPixel(r.format);
  if (bpp === undefined || w === 0 || h === 0 || d === 0 || !r.backing) return;
  const stride = t.stride || w * bpp;
  const layerStride = t.layerStride || stride * h;
  const end = t.offset + (d - 1) * layerStride + (h - 1) * stride + w * bpp;
  if (end > r.backing.size) bad(`needs ${end} bytes of backing, has ${r.backing.size}`);
}

export class VirglBackend implements GpuBackend {
  readonly name: string = "virglrenderer";
  /** transfer_read_iov calls made to read pixels back (scanouts that could not be read from memory). */
  readTransfers = 0;
  readonly supportsVirgl: boolean = true;
  readonly supportsHostBlobs: boolean = true;
  /** True when Venus was asked for and the renderer initialised with it. */
  readonly venus: boolean;
  /** The flags virgl_renderer_init accepted. */
  readonly flags: number;

  readonly #v: VirglSymbols;
  readonly #capsets: CapsetInfo[] = [];
  readonly #resources = new Map<number, VirglResource>();
  readonly #contexts = new Map<number, number>(); // ctx id -> capset id (0 = default virgl)
  /**
   * Contexts a command failed in. vrend marks such a context in error and then may silently ignore its
   * later commands (vrend_hw_switch_context skips the check for the current context): refuse them here.
   */
  readonly #inError = new Set<number>();
  #fenceHandler: FenceHandler | null = null;
  /** Global (ctx 0) fences in creation order; the library numbers them with 32-bit `seq`. */
  readonly #globalFences: GlobalFence[] = [];
  #nextSeq = 1;
  /** Fences the library retired during the current virgl_renderer_poll(), handed out after it returns. */
  readonly #retiredQueue: { timeline: FenceTimeline; fenceId: bigint }[] = [];
  /** Outstanding per-context fences, by "ctx/ring". */
  readonly #contextFences = new Map<string, number>();
  readonly #pollFd: number;
  readonly #wakeFd: number;
  /** Two struct pollfd: the library's eventfd, then our wake-up eventfd. */
  readonly #pollFds = new Uint8Array(2 * POLLFD_SIZE);
  #waiter: Promise<void> | null = null;
  /** A fence was created since the last poll(): the next one waits up to fenceSettleMs for it. */
  #fenceCreated = false;
  /** The bound of that wait (FENCE_SETTLE_MS; 0 leaves every fence to the off-thread waiter). */
  fenceSettleMs = FENCE_SETTLE_MS;
  #closed = false;

  /**
   * Initialise virglrenderer. Throws VirglLoadError when the library is missing and VirglError when
   * virgl_renderer_init fails (for example without EGL surfaceless support).
   */
  constructor(opts: VirglBackendOptions = {}) {
    if (active) throw new Error("virglrenderer is already initialised in this process (one renderer per process)");
    const types = opts.contextTypes ?? ["virgl", "virgl2"];
    for (const t of types) {
      if (CONTEXT_TYPE_CAPSETS[t] === undefined) throw new Error(`unknown virglrenderer context type '${t}'`);
    }
    this.#v = virgl();
    // `active` is per isolate, the library's state per process: another isolate (a Worker, or a test module
    // that ended without closing its renderer) may hold it. The library answers get_poll_fd only while a
    // THREAD_SYNC renderer is initialised. A second init over a live renderer succeeds in 0.10.4, and the
    // virgl_renderer_cleanup after it never returns (it waits to join the library's sync thread).
    if (this.#v.virgl_renderer_get_poll_fd() >= 0) {
      throw new Error(
        "virglrenderer is already initialised in this process by another isolate (one renderer per process)",
      );
    }
    const cb = processCallbacks();
    const wantVenus = types.includes("venus");
    let flags = VIRGL_BACKEND_FLAGS | (wantVenus ? VIRGL_RENDERER_VENUS : 0);
    let ret = this.#v.virgl_renderer_init(cb.struct.ptr, flags, cb.struct.ptr);
    if (ret !== 0 && wantVenus) {
      console.error(`virglrenderer: Venus did not initialise (${ret}); continuing without it`);
      flags = VIRGL_BACKEND_FLAGS;
      ret = this.#v.virgl_renderer_init(cb.struct.ptr, flags, cb.struct.ptr);
    }
    checkVirgl("virgl_renderer_init", ret);
    this.flags = flags;
    this.venus = (flags & VIRGL_RENDERER_VENUS) !== 0;
    active = this;

    this.#pollFd = this.#v.virgl_renderer_get_poll_fd();
    this.#wakeFd = libc().eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (this.#pollFd < 0 || this.#wakeFd < 0) {
      this.close();
      throw new Error("virglrenderer: no fence poll fd (THREAD_SYNC) or eventfd");
    }
    const pv = new DataView(this.#pollFds.buffer);
    pv.setInt32(POLLFD_FD, this.#pollFd, true);
    pv.setInt16(POLLFD_EVENTS, POLLIN, true);
    pv.setInt32(POLLFD_SIZE + POLLFD_FD, this.#wakeFd, true);
    pv.setInt16(POLLFD_SIZE + POLLFD_EVENTS, POLLIN, true);

    for (const t of types) {
      const id = CONTEXT_TYPE_CAPSETS[t];
      if (id === VIRGL_RENDERER_CAPSET_VENUS && !this.venus) continue;
      const maxVer = new Uint32Array(1), maxSize = new Uint32Array(1);
      this.#v.virgl_renderer_get_cap_set(id, maxVer, maxSize);
      if (maxSize[0] > 0) this.#capsets.push({ id, maxVersion: maxVer[0], maxSize: maxSize[0] });
    }
    // virglrenderer 0.10.4 works out the host-visible caching type (map_info) only while it fills
    // the VIRGL2 capset: fill it once now, so a guest that never asks for it still gets CACHED maps.
    const virgl2 = this.#capsets.find((c) => c.id === CONTEXT_TYPE_CAPSETS["virgl2"]);
    if (virgl2) this.#v.virgl_renderer_fill_caps(virgl2.id, virgl2.maxVersion, new Uint8Array(virgl2.maxSize));
  }

  // ---- capsets ----

  capsets(): CapsetInfo[] {
    return this.#capsets.map((c) => ({ ...c }));
  }

  getCapset(id: number, version: number): Uint8Array {
    const c = this.#capsets.find((x) => x.id === id);
    if (!c || version > c.maxVersion) {
      throw new GpuBackendError(RESP_ERR_INVALID_PARAMETER, `no capset ${id} version ${version}`);
    }
    const out = new Uint8Array(c.maxSize);
    this.#v.virgl_renderer_fill_caps(id, version, out);
    return out;
  }

  // ---- resources ----

  createResource2D(a: Create2D): void {
    if (!isVirtioGpuFormat(a.format)) {
      throw new GpuBackendError(RESP_ERR_INVALID_PARAMETER, `unknown 2D format ${a.format}`);
    }
    this.createResource3D({
      ...CREATE_3D_DEFAULTS,
      resourceId: a.resourceId,
      target: PIPE_TEXTURE_2D,
      format: a.format,
      bind: BIND_2D,
      width: a.width,
      height: a.height,
    });
  }

  createResource3D(a: Create3D): void {
    this.#requireFree(a.resourceId);
    const args = resourceCreateArgs({ handle: a.resourceId, ...a });
    this.#call("virgl_renderer_resource_create", () => this.#v.virgl_renderer_resource_create(args, null, 0));
    this.#resources.set(a.resourceId, { ...pickCreate3DFields(a), kind: "3d" });
  }

  createBlob(a: CreateBlob): void {
    this.#requireFree(a.resourceId);
    const guestPages = a.blobMem === VIRTIO_GPU_BLOB_MEM_GUEST || a.blobMem === VIRTIO_GPU_BLOB_MEM_HOST3D_GUEST;
    if (a.blobMem !== VIRTIO_GPU_BLOB_MEM_HOST3D && !guestPages) {
      throw new GpuBackendError(RESP_ERR_INVALID_PARAMETER, `blob_mem ${a.blobMem} not supported`);
    }
    if (guestPages && !a.backing) {
      throw new GpuBackendError(RESP_ERR_INVALID_PARAMETER, `blob_mem ${a.blobMem} without guest pages`);
    }
    const entries = guestPages && a.backing ? a.backing.entries : [];
    const iov = entries.length ? iovecArray(entries.map((e) => ({ base: e.hostAddr, len: e.len }))) : undefined;
    const args = blobCreateArgs({
      resHandle: a.resourceId,
      ctxId: a.ctxId,
      blobMem: a.blobMem,
      blobFlags: a.blobFlags,
      blobId: a.blobId,
      size: BigInt(a.size),
      iovecs: iov ?? null,
      numIovs: entries.length,
    });
    try {
      this.#call("virgl_renderer_resource_create_blob", () => this.#v.virgl_renderer_resource_create_blob(args));
    } catch (e) {
      iov?.free();
      throw e;
    }
    this.#resources.set(a.resourceId, {
      kind: "blob",
      ...CREATE_3D_DEFAULTS,
      target: PIPE_BUFFER,
      format: 0,
      bind: 0,
      width: a.size,
      iov,
      backing: guestPages ? a.backing : undefined,
      blobMem: a.blobMem,
      blobFlags: a.blobFlags,
      venus: this.#contexts.get(a.ctxId) === VIRGL_RENDERER_CAPSET_VENUS,
    });
  }

  destroyResource(id: number): void {
    const r = this.#get(id);
    if (r.mapped) this.unmapResource(id);
    this.#v.virgl_renderer_resource_unref(id);
    r.iov?.free();
    this.#resources.delete(id);
  }

  attachBacking(id: number, backing: Backing): void {
    const r = this.#get(id);
    if (r.kind !== "3d") throw new GpuBackendError(RESP_ERR_INVALID_PARAMETER, `resource ${id} is a blob`);
    if (r.iov) this.detachBacking(id);
    const iov = iovecArray(backing.entries.map((e) => ({ base: e.hostAddr, len: e.len })));
    try {
      this.#call(
        "virgl_renderer_resource_attach_iov",
        () => this.#v.virgl_renderer_resource_attach_iov(id, iov.ptr, backing.entries.length),
      );
    } catch (e) {
      iov.free();
      throw e;
    }
    r.iov = iov;
    r.backing = backing;
  }

  detachBacking(id: number): void {
    const r = this.#get(id);
    if (r.kind !== "3d" || !r.iov) return;
    this.#v.virgl_renderer_resource_detach_iov(id, null, null);
    r.iov.free();
    r.iov = undefined;
    r.backing = undefined;
  }

  transferToHost(t: Transfer): void {
    this.#transfer(t, true);
  }

  transferFromHost(t: Transfer): void {
    this.#transfer(t, false);
  }

  #transfer(t: Transfer, toHost: boolean): void {
    const r = this.#get(t.resourceId);
    if (r.mapped) {
      throw new GpuBackendError(RESP_ERR_INVALID_PARAMETER, `resource ${t.resourceId} is mapped: no transfers`);
    }
    if (!r.iov) throw new GpuBackendError(RESP_ERR_UNSPEC, `resource ${t.resourceId} has no backing`);
    // Checked here, not only by the library: a transfer it refuses puts the whole context in error.
    checkTransfer(t, r);
    const box = virglBox(t.box);
    const call = toHost ? "virgl_renderer_transfer_write_iov" : "virgl_renderer_transfer_read_iov";
    this.#call(call, () =>
      toHost
        ? this.#v.virgl_renderer_transfer_write_iov(
          t.resourceId,
          t.ctxId,
          t.level,
          t.stride,
          t.layerStride,
          box,
          BigInt(t.offset),
          null,
          0,
        )
        : this.#v.virgl_renderer_transfer_read_iov(
          t.resourceId,
          t.ctxId,
          t.level,
          t.stride,
          t.layerStride,
          box,
          BigInt(t.offset),
          null,
          0,
        ));
  }

  // ---- contexts ----

  createContext(ctxId: number, capsetId: number, name: string): void {
    if (this.#contexts.has(ctxId)) throw new GpuBackendError(RESP_ERR_INVALID_CONTEXT_ID, `context ${ctxId} exists`);
    if (capsetId !== 0 && !this.#capsets.some((c) => c.id === capsetId)) {
      throw new GpuBackendError(RESP_ERR_INVALID_PARAMETER, `context ${ctxId}: capset ${capsetId} not offered`);
    }
    const encoded = new TextEncoder().encode(name);
    const buf = new Uint8Array(encoded.length + 1); // NUL-terminated and never empty (a zero-length buffer is NULL)
    buf.set(encoded);
    this.#call(
      "virgl_renderer_context_create_with_flags",
      () =>
        capsetId === 0
          ? this.#v.virgl_renderer_context_create(ctxId, encoded.length, buf)
          : this.#v.virgl_renderer_context_create_with_flags(ctxId, capsetId, encoded.length, buf),
    );
    this.#contexts.set(ctxId, capsetId);
  }

  destroyContext(ctxId: number): void {
    if (!this.#contexts.delete(ctxId)) return;
    this.#inError.delete(ctxId);
    this.#v.virgl_renderer_context_destroy(ctxId);
    // virglrenderer drops the fences of a destroyed context without retiring them.
    for (const k of [...this.#contextFences.keys()]) if (k.startsWith(`${ctxId}/`)) this.#contextFences.delete(k);
  }

  attachResource(ctxId: number, resourceId: number): void {
    this.#ctx(ctxId);
    this.#get(resourceId);
    this.#v.virgl_renderer_ctx_attach_resource(ctxId, resourceId);
  }

  detachResource(ctxId: number, resourceId: number): void {
    this.#ctx(ctxId);
    this.#get(resourceId);
    this.#v.virgl_renderer_ctx_detach_resource(ctxId, resourceId);
  }

  submit3D(ctxId: number, commands: Uint8Array): void {
    this.#ctx(ctxId);
    if (commands.byteLength % 4 !== 0) {
      throw new GpuBackendError(RESP_ERR_INVALID_PARAMETER, `SUBMIT_3D of ${commands.byteLength} bytes (not dwords)`);
    }
    if (commands.byteLength === 0) return;
    // A stream whose last command runs past its end is accepted by vrend_decode_ctx_submit_cmd (it stops and
    // marks the context in error): refuse it here.
    if (walkVirglCommands(commands).truncated) {
      throw new GpuBackendError(RESP_ERR_INVALID_PARAMETER, `SUBMIT_3D on ctx ${ctxId}: a command runs past the end`);
    }
    if (this.#inError.has(ctxId)) {
      throw new GpuBackendError(RESP_ERR_INVALID_PARAMETER, `context ${ctxId} is in error after a failed command`);
    }
    // The library reads dwords: give it an aligned copy when the guest's bytes are not aligned.
    const buf = commands.byteOffset % 4 === 0 ? commands : commands.slice();
    try {
      this.#call("virgl_renderer_submit_cmd", () => this.#v.virgl_renderer_submit_cmd(buf, ctxId, buf.byteLength / 4));
    } catch (e) {
      this.#inError.add(ctxId);
      throw e;
    }
  }

  // ---- fences ----

  setFenceHandler(handler: FenceHandler): void {
    this.#fenceHandler = handler;
  }

  createFence(timeline: FenceTimeline, fenceId: bigint): void {
    if (timeline.perContext) {
      this.#ctx(timeline.ctxId);
      this.#call(
        "virgl_renderer_context_create_fence",
        () => this.#v.virgl_renderer_context_create_fence(timeline.ctxId, 0, timeline.ringIdx, fenceId),
      );
      const k = `${timeline.ctxId}/${timeline.ringIdx}`;
      this.#contextFences.set(k, (this.#contextFences.get(k) ?? 0) + 1);
    } else {
      const seq = this.#nextSeq;
      this.#nextSeq = (this.#nextSeq + 1) >>> 0 || 1;
      this.#call("virgl_renderer_create_fence", () => this.#v.virgl_renderer_create_fence(seq | 0, timeline.ctxId));
      this.#globalFences.push({ seq, timeline: { ...timeline }, fenceId });
    }
    this.#fenceCreated = true;
    // Armed once the current batch is served: poll() at its end may have retired the fence already, and a
    // waiter already in poll(2) would wake another thread for nothing.
    queueMicrotask(() => this.#armWaiter());
  }

  /** True when a command failed in the context and its later submits are refused. */
  contextInError(ctxId: number): boolean {
    return this.#inError.has(ctxId);
  }

  /** Fences created and not yet retired. */
  get pendingFences(): number {
    let n = this.#globalFences.length;
    for (const c of this.#contextFences.values()) n += c;
    return n;
  }

  poll(): void {
    if (this.#closed) return;
    if (this.#fenceCreated) {
      this.#fenceCreated = false;
      this.#settle();
    }
    this.#pollNow();
    // The library flushed its eventfd: a waiter blocked on it must not wait for fences that are gone.
    if (this.#waiter && this.pendingFences === 0) this.#kick();
  }

  /** Resolves once every fence created so far has retired (or the backend closed). */
  async drainFences(): Promise<void> {
    while (this.pendingFences > 0 && !this.#closed) {
      this.#armWaiter();
      await this.#waiter;
    }
  }

  /** write_fence callback: ctx0 fence `seq` and every earlier one are done. */
  onWriteFence(seq: number): void {
    const i = this.#globalFences.findIndex((f) => f.seq === seq);
    if (i < 0) return;
    for (const f of this.#globalFences.splice(0, i + 1)) this.#retire(f.timeline, f.fenceId);
  }

  /** write_context_fence callback. */
  onWriteContextFence(ctxId: number, ringIdx: number, fenceId: bigint): void {
    const k = `${ctxId}/${ringIdx}`;
    const n = this.#contextFences.get(k) ?? 0;
    if (n <= 1) this.#contextFences.delete(k);
    else this.#contextFences.set(k, n - 1);
    this.#retire({ ctxId, ringIdx, perContext: true }, fenceId);
  }

  /** Queue a retired fence; handlers run after virgl_renderer_poll() returned (never inside the library). */
  #retire(timeline: FenceTimeline, fenceId: bigint): void {
    this.#retiredQueue.push({ timeline, fenceId });
  }

  /** virgl_renderer_poll(), then the fence handler for each fence it retired, in order. */
  #pollNow(): void {
    this.#v.virgl_renderer_poll();
    for (const f of this.#retiredQueue.splice(0)) {
      try {
        this.#fenceHandler?.(f.timeline, f.fenceId);
      } catch (e) {
        console.error(`virglrenderer: fence handler failed for fence ${f.fenceId}: ${(e as Error).message}`);
      }
    }
  }

  /** Retire fences as the sync thread reports them, for at most fenceSettleMs (poll(2) on this thread). */
  #settle(): void {
    const deadline = performance.now() + this.fenceSettleMs;
    const libraryFd = this.#pollFds.subarray(0, POLLFD_SIZE);
    while (this.pendingFences > 0) {
      const left = Math.ceil(deadline - performance.now());
      // Nothing within the bound (or poll failed, EINTR included): the off-thread waiter has the rest.
      if (left <= 0 || libc().poll(libraryFd, 1n, left) <= 0) return;
      this.#pollNow();
    }
  }

  /** Wait (off-thread poll(2)) for the library's eventfd while fences are outstanding, then poll. */
  #armWaiter(): void {
    // Only with a fence outstanding: the loop below then awaits before its `finally` can run, so that
    // `finally` clears the #waiter assigned here (with none, it would run first and leave a settled
    // promise in #waiter, and no waiter would ever be armed again).
    if (this.#waiter || this.#closed || this.pendingFences === 0) return;
    this.#waiter = (async () => {
      try {
        while (!this.#closed && this.pendingFences > 0) {
          await libc().poll_async(this.#pollFds, 2n, -1);
          if (this.#closed) break;
          if (new DataView(this.#pollFds.buffer).getInt16(POLLFD_SIZE + POLLFD_REVENTS, true) & POLLIN) {
            libc().read(this.#wakeFd, new Uint8Array(EVENTFD_VALUE_SIZE), BigInt(EVENTFD_VALUE_SIZE));
          }
          this.#pollNow();
        }
      } finally {
        this.#waiter = null;
      }
    })();
  }

  /** Wake the waiter out of poll(2). */
  #kick(): void {
    const one = new Uint8Array(EVENTFD_VALUE_SIZE);
    new DataView(one.buffer).setBigUint64(0, 1n, true);
    libc().write(this.#wakeFd, one, BigInt(one.length));
  }

  // ---- blob mapping ----

  mapResource(id: number): MappedBlob {
    const r = this.#get(id);
    if (r.kind !== "blob") throw new GpuBackendError(RESP_ERR_INVALID_PARAMETER, `resource ${id} is not a blob`);
    if (r.mapped) throw new GpuBackendError(RESP_ERR_INVALID_PARAMETER, `resource ${id} is already mapped`);
    const ptr = new BigUint64Array(1), size = new BigUint64Array(1);
    this.#call("virgl_renderer_resource_map", () => this.#v.virgl_renderer_resource_map(id, ptr, size));
    const info = new Uint32Array(1);
    const ret = this.#v.virgl_renderer_resource_get_map_info(id, info);
    const mapped: MappedBlob = {
      hostAddr: ptr[0],
      size: Number(size[0]),
      mapInfo: ret === 0 ? info[0] & VIRGL_RENDERER_MAP_CACHE_MASK : 0,
    };
    r.mapped = mapped;
    return mapped;
  }

  unmapResource(id: number): void {
    const r = this.#get(id);
    if (!r.mapped) throw new GpuBackendError(RESP_ERR_INVALID_PARAMETER, `resource ${id} is not mapped`);
    const m = r.mapped;
    r.mapped = undefined;
    const ret = this.#v.virgl_renderer_resource_unmap(id);
    if (ret !== 0 && r.venus) {
      // 0.10.4 cannot unmap a Venus SHM blob (returns -EINVAL, fixed in 1.1.0); the map was its own mmap.
      munmap(Deno.UnsafePointer.create(m.hostAddr), m.size);
    } else {
      checkVirgl("virgl_renderer_resource_unmap", ret);
    }
  }

  // ---- scanout read-back ----

  readPixels(id: number, rect: Rect, layout?: BlobLayout): Uint8Array {
    const r = this.#get(id);
    const out = new Uint8Array(rect.width * rect.height * BPP);
    if (r.kind === "3d") {
      if (!isVirtioGpuFormat(r.format)) {
        throw new GpuBackendError(RESP_ERR_INVALID_PARAMETER, `resource ${id} format ${r.format} is not scanout-able`);
      }
      if (rect.x + rect.width > r.width || rect.y + rect.height > r.height) {
        throw new GpuBackendError(RESP_ERR_INVALID_PARAMETER, `rect outside resource ${id}`);
      }
      if (r.mapped) throw new GpuBackendError(RESP_ERR_INVALID_PARAMETER, `resource ${id} is mapped`);
      // Rows packed in both buffers: one conversion of every pixel; the B8G8R8 formats in place.
      const inPlace = r.format === VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM || r.format === VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM;
      const host = inPlace ? out : new Uint8Array(out.length);
      this.#readBox(id, { x: rect.x, y: rect.y, z: 0, w: rect.width, h: rect.height, d: 1 }, rect.width * BPP, host);
      toBgra(r.format, host, 0, out, 0, rect.width * rect.height);
      return out;
    }
    if (!layout || !isVirtioGpuFormat(layout.format)) {
      throw new GpuBackendError(RESP_ERR_INVALID_PARAMETER, `blob ${id} read without an image layout`);
    }
    const rowBytes = rect.width * BPP;
    const last = layout.offset + (rect.y + rect.height - 1) * layout.stride + (rect.x + rect.width) * BPP;
    if (rect.height > 0 && last > r.width) {
      throw new GpuBackendError(RESP_ERR_INVALID_PARAMETER, `layout outside blob ${id}`);
    }
    const row = new Uint8Array(rowBytes);
    const reader = r.backing ? new BackingReader(r.backing) : undefined;
    // A mappable host blob the guest has not mapped is mapped here for the read and unmapped after: its
    // pixels come from its memory, like a mapped one's, not through a transfer per row.
    const mapHere = !r.mapped && r.blobMem !== VIRTIO_GPU_BLOB_MEM_GUEST && !r.venus &&
      ((r.blobFlags ?? 0) & VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE) !== 0 && this.#mapForRead(id);
    try {
      const mappedBytes = r.mapped
        ? new Uint8Array(
          Deno.UnsafePointerView.getArrayBuffer(Deno.UnsafePointer.create(r.mapped.hostAddr)!, r.mapped.size),
        )
        : undefined;
      if (mappedBytes && last > mappedBytes.length) {
        throw new GpuBackendError(RESP_ERR_INVALID_PARAMETER, `layout outside the mapping of blob ${id}`);
      }
      for (let i = 0; i < rect.height; i++) {
        const off = layout.offset + (rect.y + i) * layout.stride + rect.x * BPP;
        if (mappedBytes) row.set(mappedBytes.subarray(off, off + rowBytes));
        else if (reader && r.blobMem === VIRTIO_GPU_BLOB_MEM_GUEST) reader.read(off, row, 0, rowBytes);
        else this.#readBox(id, { x: off, y: 0, z: 0, w: rowBytes, h: 1, d: 1 }, rowBytes, row);
        toBgra(layout.format, row, 0, out, i * rowBytes, rect.width);
      }
    } finally {
      if (mapHere) this.unmapResource(id);
    }
    return out;
  }

  /** Map blob `id` for a read-back; false (and the transfer path) when the renderer cannot map it. */
  #mapForRead(id: number): boolean {
    try {
      this.mapResource(id);
      return true;
    } catch {
      return false;
    }
  }

  /** transfer_read_iov of `box` (level 0, no context) into a host buffer, rows `stride` bytes apart. */
  #readBox(id: number, box: Box, stride: number, into: Uint8Array): void {
    this.readTransfers++;
    const iov = iovecOf(into);
    this.#call("virgl_renderer_transfer_read_iov", () =>
      this.#v.virgl_renderer_transfer_read_iov(
        id,
        0,
        0,
        stride,
        0,
        virglBox(box),
        0n,
        Deno.UnsafePointer.of(iov),
        1,
      ));
  }

  /** What virgl_renderer_resource_get_info says about a resource (format, size, GL texture). */
  resourceInfo(id: number): ResourceInfo {
    this.#get(id);
    const b = new Uint8Array(RES_INFO_SIZE);
    this.#call("virgl_renderer_resource_get_info", () => this.#v.virgl_renderer_resource_get_info(id, b));
    return readResourceInfo(b);
  }

  close(): void {
    if (this.#closed) return;
    // Drain fences: the library's sync thread signals its eventfd as GL fences complete.
    const deadline = performance.now() + CLOSE_DRAIN_MS;
    while (this.pendingFences > 0 && performance.now() < deadline && this.#pollFd >= 0) {
      libc().poll(this.#pollFds.subarray(0, POLLFD_SIZE), 1n, DRAIN_POLL_MS);
      this.#pollNow();
    }
    this.#closed = true;
    if (this.#wakeFd >= 0) this.#kick(); // wakes a waiter blocked in poll_async
    for (const [id, r] of this.#resources) {
      if (r.mapped) {
        try {
          this.unmapResource(id);
        } catch (e) {
          console.error(`virglrenderer: unmap of ${id} at close: ${(e as Error).message}`);
        }
      }
      this.#v.virgl_renderer_resource_unref(id);
    }
    for (const ctx of this.#contexts.keys()) this.#v.virgl_renderer_context_destroy(ctx);
    this.#v.virgl_renderer_cleanup(processCallbacks().struct.ptr);
    for (const r of this.#resources.values()) r.iov?.free();
    this.#resources.clear();
    this.#contexts.clear();
    this.#inError.clear();
    this.#globalFences.length = 0;
    this.#contextFences.clear();
    const wake = this.#wakeFd;
    if (wake >= 0) {
      // Close our eventfd once a waiter (if any) has returned from poll.
      if (this.#waiter) this.#waiter.finally(() => libc().close(wake));
      else libc().close(wake);
    }
    if (active === this) active = null;
  }

  [Symbol.dispose](): void {
    this.close();
  }

  // ---- helpers ----

  #get(id: number): VirglResource {
    const r = this.#resources.get(id);
    if (!r) throw new GpuBackendError(RESP_ERR_INVALID_RESOURCE_ID, `no resource ${id} in virglrenderer`);
    return r;
  }

  #requireFree(id: number): void {
    if (id === 0 || this.#resources.has(id)) {
      throw new GpuBackendError(RESP_ERR_INVALID_RESOURCE_ID, `resource id ${id} is taken or zero`);
    }
  }

  #ctx(ctxId: number): void {
    if (!this.#contexts.has(ctxId)) throw new GpuBackendError(RESP_ERR_INVALID_CONTEXT_ID, `no context ${ctxId}`);
  }

  /** Run a call returning 0 or an errno (either sign); failures become GpuBackendError. */
  #call(name: string, f: () => number, response?: number): void {
    if (this.#closed) throw new Error(`virglrenderer is closed (${name})`);
    try {
      checkVirgl(name, f());
    } catch (e) {
      if (e instanceof VirglError) throw new GpuBackendError(response ?? responseFor(e), e.message);
      throw e;
    }
  }
}
