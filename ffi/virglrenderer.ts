// virglrenderer through Deno FFI: the symbol table, struct layouts as named offsets, and one error type.
// Source: /usr/include/virgl/virglrenderer.h from Debian's libvirglrenderer-dev 0.10.4 (the library is
// libvirglrenderer1), and virglrenderer's src/virglrenderer.c for which calls return positive or
// negative errno values. Everything here is x86_64 Linux. All calls must come from the thread that called
// virgl_renderer_init (the GL context lives there).

import { cstr, libc, RTLD_NODELETE, RTLD_NOW } from "./libc.ts";

/** Resolve the library: DENOVM_VIRGLRENDERER overrides, else the soname of Debian's libvirglrenderer1. */
export function virglrendererPath(): string {
  return Deno.env.get("DENOVM_VIRGLRENDERER") ?? "libvirglrenderer.so.1";
}

// ---- virgl_renderer_init flags (virglrenderer.h VIRGL_RENDERER_*) ----
export const VIRGL_RENDERER_USE_EGL = 1 << 0;
export const VIRGL_RENDERER_THREAD_SYNC = 1 << 1;
export const VIRGL_RENDERER_USE_GLX = 1 << 2;
export const VIRGL_RENDERER_USE_SURFACELESS = 1 << 3;
export const VIRGL_RENDERER_USE_GLES = 1 << 4;
/** Do not set: GL buffers then get no mappable storage for HOST3D blobs (virglrenderer 0.10.4 with llvmpipe). */
export const VIRGL_RENDERER_USE_EXTERNAL_BLOB = 1 << 5;
export const VIRGL_RENDERER_VENUS = 1 << 6;
export const VIRGL_RENDERER_NO_VIRGL = 1 << 7;
/** Calls fence callbacks from the library's own thread: avoided here (deadlocks with Deno callbacks). */
export const VIRGL_RENDERER_ASYNC_FENCE_CB = 1 << 8;
export const VIRGL_RENDERER_RENDER_SERVER = 1 << 9;
export const VIRGL_RENDERER_DRM = 1 << 10;

// ---- Capsets passed to virgl_renderer_get_cap_set (virglrenderer.c enum VIRGL_RENDERER_CAPSET_*,
// the same numbers as virtio_gpu.h VIRTIO_GPU_CAPSET_*) ----
export const VIRGL_RENDERER_CAPSET_VIRGL = 1;
export const VIRGL_RENDERER_CAPSET_VIRGL2 = 2;
export const VIRGL_RENDERER_CAPSET_VENUS = 4;
export const VIRGL_RENDERER_CAPSET_DRM = 6;
/** VIRGL_RENDERER_CONTEXT_FLAG_CAPSET_ID_MASK (virglrenderer.h). */
export const VIRGL_RENDERER_CONTEXT_FLAG_CAPSET_ID_MASK = 0xff;

// ---- Blobs (virglrenderer.h VIRGL_RENDERER_BLOB_*, VIRGL_RENDERER_MAP_CACHE_*) ----
export const VIRGL_RENDERER_BLOB_MEM_GUEST = 0x0001;
export const VIRGL_RENDERER_BLOB_MEM_HOST3D = 0x0002;
export const VIRGL_RENDERER_BLOB_MEM_HOST3D_GUEST = 0x0003;
export const VIRGL_RENDERER_BLOB_FLAG_USE_MAPPABLE = 0x0001;
export const VIRGL_RENDERER_BLOB_FLAG_USE_SHAREABLE = 0x0002;
export const VIRGL_RENDERER_BLOB_FLAG_USE_CROSS_DEVICE = 0x0004;
export const VIRGL_RENDERER_MAP_CACHE_MASK = 0x0f;
export const VIRGL_RENDERER_MAP_CACHE_CACHED = 0x01;

// ---- Resource bind flags (virglrenderer.h VIRGL_RES_BIND_*) ----
export const VIRGL_RES_BIND_DEPTH_STENCIL = 1 << 0;
export const VIRGL_RES_BIND_RENDER_TARGET = 1 << 1;
export const VIRGL_RES_BIND_SAMPLER_VIEW = 1 << 3;
export const VIRGL_RES_BIND_VERTEX_BUFFER = 1 << 4;
export const VIRGL_RES_BIND_CONSTANT_BUFFER = 1 << 6;
export const VIRGL_RES_BIND_SCANOUT = 1 << 18;
export const VIRGL_RES_BIND_SHARED = 1 << 20;

// ---- struct virgl_renderer_callbacks (virglrenderer.h), 72 bytes with VIRGL_RENDERER_UNSTABLE_APIS ----
export const CALLBACKS_VERSION = 0; // int version
export const CALLBACKS_WRITE_FENCE = 8; // void (*write_fence)(void *cookie, uint32_t fence)
export const CALLBACKS_CREATE_GL_CONTEXT = 16; // unused with USE_EGL
export const CALLBACKS_DESTROY_GL_CONTEXT = 24; // unused with USE_EGL
export const CALLBACKS_MAKE_CURRENT = 32; // unused with USE_EGL
export const CALLBACKS_GET_DRM_FD = 40; // v2, unused with USE_SURFACELESS
/** v3: void (*write_context_fence)(void *cookie, uint32_t ctx_id, uint32_t ring_idx, uint64_t fence_id). */
export const CALLBACKS_WRITE_CONTEXT_FENCE = 48;
export const CALLBACKS_GET_SERVER_FD = 56; // v3, unused (no render server)
export const CALLBACKS_GET_EGL_DISPLAY = 64; // v4, unused
export const CALLBACKS_SIZE = 72;
/** Version 3: per-context fences (virgl_renderer_context_create_fence asserts version >= 3). */
export const CALLBACKS_VERSION_CONTEXT_FENCES = 3;

// ---- struct virgl_renderer_resource_create_args: eleven uint32_t ----
export const CREATE_ARGS_HANDLE = 0;
export const CREATE_ARGS_TARGET = 4;
export const CREATE_ARGS_FORMAT = 8;
export const CREATE_ARGS_BIND = 12;
export const CREATE_ARGS_WIDTH = 16;
export const CREATE_ARGS_HEIGHT = 20;
export const CREATE_ARGS_DEPTH = 24;
export const CREATE_ARGS_ARRAY_SIZE = 28;
export const CREATE_ARGS_LAST_LEVEL = 32;
export const CREATE_ARGS_NR_SAMPLES = 36;
export const CREATE_ARGS_FLAGS = 40;
export const CREATE_ARGS_SIZE = 44;

// ---- struct virgl_renderer_resource_create_blob_args ----
export const BLOB_ARGS_RES_HANDLE = 0; // uint32_t
export const BLOB_ARGS_CTX_ID = 4; // uint32_t
export const BLOB_ARGS_BLOB_MEM = 8; // uint32_t
export const BLOB_ARGS_BLOB_FLAGS = 12; // uint32_t
export const BLOB_ARGS_BLOB_ID = 16; // uint64_t
export const BLOB_ARGS_SIZE_FIELD = 24; // uint64_t size
export const BLOB_ARGS_IOVECS = 32; // const struct iovec *
export const BLOB_ARGS_NUM_IOVS = 40; // uint32_t
export const BLOB_ARGS_SIZE = 48;

// ---- struct virgl_renderer_resource_info (0.10.4: 36 bytes) ----
export const RES_INFO_HANDLE = 0;
export const RES_INFO_VIRGL_FORMAT = 4;
export const RES_INFO_WIDTH = 8;
export const RES_INFO_HEIGHT = 12;
export const RES_INFO_DEPTH = 16;
export const RES_INFO_FLAGS = 20;
export const RES_INFO_TEX_ID = 24;
export const RES_INFO_STRIDE = 28;
export const RES_INFO_DRM_FOURCC = 32;
export const RES_INFO_SIZE = 36;

// ---- struct iovec (sys/uio.h) ----
export const IOVEC_BASE = 0; // void *iov_base
export const IOVEC_LEN = 8; // size_t iov_len
export const IOVEC_SIZE = 16;

// ---- struct virgl_box (virgl_hw.h / pipe_box as virglrenderer reads it): six uint32_t ----
export const BOX_X = 0;
export const BOX_Y = 4;
export const BOX_Z = 8;
export const BOX_W = 12;
export const BOX_H = 16;
export const BOX_D = 20;
export const BOX_SIZE = 24;

const symbols = {
  virgl_renderer_init: {
    parameters: [
      "pointer", // void *cookie (must be non-NULL)
      "i32", // int flags (VIRGL_RENDERER_*)
      "pointer", // struct virgl_renderer_callbacks *cb (kept by the library)
    ],
    result: "i32",
  },
  virgl_renderer_cleanup: { parameters: ["pointer"], result: "void" }, // void *cookie
  virgl_renderer_poll: { parameters: [], result: "void" }, // runs write_fence callbacks on this thread
  virgl_renderer_get_poll_fd: { parameters: [], result: "i32" }, // THREAD_SYNC: an eventfd, else -1
  virgl_renderer_get_cap_set: {
    parameters: [
      "u32", // uint32_t set
      "buffer", // uint32_t *max_ver (out)
      "buffer", // uint32_t *max_size (out)
    ],
    result: "void",
  },
  virgl_renderer_fill_caps: {
    parameters: [
      "u32", // uint32_t set
      "u32", // uint32_t version
      "buffer", // void *caps (max_size bytes, out)
    ],
    result: "void",
  },
  virgl_renderer_context_create: {
    parameters: [
      "u32", // uint32_t handle
      "u32", // uint32_t nlen
      "buffer", // const char *name (nlen bytes, not NUL-terminated)
    ],
    result: "i32",
  },
  virgl_renderer_context_create_with_flags: {
    parameters: [
      "u32", // uint32_t ctx_id
      "u32", // uint32_t ctx_flags (capset id in the low 8 bits)
      "u32", // uint32_t nlen
      "buffer", // const char *name
    ],
    result: "i32",
  },
  virgl_renderer_context_destroy: { parameters: ["u32"], result: "void" }, // uint32_t handle
  virgl_renderer_ctx_attach_resource: { parameters: ["i32", "i32"], result: "void" }, // int ctx_id, int res_handle
  virgl_renderer_ctx_detach_resource: { parameters: ["i32", "i32"], result: "void" }, // int ctx_id, int res_handle
  virgl_renderer_resource_create: {
    parameters: [
      "buffer", // struct virgl_renderer_resource_create_args *args
      "pointer", // struct iovec *iov (NULL: attach later)
      "u32", // uint32_t num_iovs
    ],
    result: "i32",
  },
  virgl_renderer_resource_create_blob: {
    parameters: ["buffer"], // const struct virgl_renderer_resource_create_blob_args *args
    result: "i32",
  },
  virgl_renderer_resource_unref: { parameters: ["u32"], result: "void" }, // uint32_t res_handle
  virgl_renderer_resource_attach_iov: {
    parameters: [
      "i32", // int res_handle
      "pointer", // struct iovec *iov (kept by the library: must not move or die)
      "i32", // int num_iovs
    ],
    result: "i32",
  },
  virgl_renderer_resource_detach_iov: {
    parameters: [
      "i32", // int res_handle
      "pointer", // struct iovec **iov (out, may be NULL)
      "pointer", // int *num_iovs (out, may be NULL)
    ],
    result: "void",
  },
  virgl_renderer_transfer_write_iov: {
    parameters: [
      "u32", // uint32_t handle
      "u32", // uint32_t ctx_id
      "i32", // int level
      "u32", // uint32_t stride
      "u32", // uint32_t layer_stride
      "buffer", // struct virgl_box *box
      "u64", // uint64_t offset
      "pointer", // struct iovec *iovec (NULL: the attached backing)
      "u32", // unsigned int iovec_cnt
    ],
    result: "i32",
  },
  virgl_renderer_transfer_read_iov: {
    parameters: [
      "u32", // uint32_t handle
      "u32", // uint32_t ctx_id
      "u32", // uint32_t level
      "u32", // uint32_t stride
      "u32", // uint32_t layer_stride
      "buffer", // struct virgl_box *box
      "u64", // uint64_t offset
      "pointer", // struct iovec *iov (NULL: the attached backing)
      "i32", // int iovec_cnt
    ],
    result: "i32",
  },
  virgl_renderer_submit_cmd: {
    parameters: [
      "buffer", // void *buffer (the command stream)
      "i32", // int ctx_id
      "i32", // int ndw (length in dwords)
    ],
    result: "i32",
  },
  virgl_renderer_create_fence: {
    parameters: [
      "i32", // int client_fence_id (a uint32_t really)
      "u32", // uint32_t ctx_id (unused by the library)
    ],
    result: "i32",
  },
  virgl_renderer_context_create_fence: {
    parameters: [
      "u32", // uint32_t ctx_id
      "u32", // uint32_t flags (VIRGL_RENDERER_FENCE_FLAG_*)
      "u32", // uint32_t ring_idx
      "u64", // uint64_t fence_id
    ],
    result: "i32",
  },
  virgl_renderer_context_poll: { parameters: ["u32"], result: "void" }, // uint32_t ctx_id
  virgl_renderer_resource_map: {
    parameters: [
      "u32", // uint32_t res_handle
      "buffer", // void **map (out)
      "buffer", // uint64_t *out_size (out)
    ],
    result: "i32",
  },
  virgl_renderer_resource_unmap: { parameters: ["u32"], result: "i32" }, // uint32_t res_handle
  virgl_renderer_resource_get_map_info: {
    parameters: [
      "u32", // uint32_t res_handle
      "buffer", // uint32_t *map_info (out)
    ],
    result: "i32",
  },
  virgl_renderer_resource_get_info: {
    parameters: [
      "i32", // int res_handle
      "buffer", // struct virgl_renderer_resource_info *info (out)
    ],
    result: "i32",
  },
} as const satisfies Deno.ForeignLibraryInterface;

export type VirglSymbols = Deno.DynamicLibrary<typeof symbols>["symbols"];

/** The library could not be loaded. */
export class VirglLoadError extends Error {
  constructor(readonly path: string, cause: string) {
    super(
      `cannot load virglrenderer ${path} (Debian package libvirglrenderer1; DENOVM_VIRGLRENDERER overrides): ${cause}`,
    );
    this.name = "VirglLoadError";
  }
}

/** A virglrenderer call failed; `errno` is the negative errno (the library returns both signs). */
export class VirglError extends Error {
  constructor(readonly call: string, readonly errno: number) {
    super(`${call} failed: errno ${errno}`);
    this.name = "VirglError";
  }
}

/** Throw VirglError when a virglrenderer call returned non-zero. */
export function checkVirgl(call: string, ret: number): void {
  if (ret !== 0) throw new VirglError(call, -Math.abs(ret));
}

let lib: Deno.DynamicLibrary<typeof symbols> | undefined;

/**
 * The virglrenderer symbol table, opened on first use. Throws VirglLoadError.
 *
 * The library is pinned with RTLD_NODELETE: its state (one renderer per process) then lives as long as the
 * process, not as long as the isolate that opened it. Deno closes an isolate's handles when the isolate
 * ends (a Worker, a test module); unloading the library there would leave its threads behind and reset its
 * state, so a later renderer would initialise as if none existed and its cleanup would never return.
 */
export function virgl(): VirglSymbols {
  if (!lib) {
    const path = virglrendererPath();
    try {
      lib = Deno.dlopen(path, symbols);
    } catch (e) {
      throw new VirglLoadError(path, (e as Error).message);
    }
    if (libc().dlopen(cstr(path), RTLD_NOW | RTLD_NODELETE) === null) {
      throw new VirglLoadError(path, "dlopen with RTLD_NODELETE failed");
    }
  }
  return lib.symbols;
}

/** Memory from libc calloc that C may keep pointers into; never moved, freed only explicitly. */
export class CMemory {
  readonly ptr: Deno.PointerObject;
  readonly bytes: Uint8Array<ArrayBuffer>;
  readonly view: DataView<ArrayBuffer>;
  #freed = false;

  constructor(readonly size: number) {
    const p = libc().calloc(1n, BigInt(Math.max(size, 1)));
    if (!p) throw new Error(`calloc(${size}) failed`);
    this.ptr = p;
    const ab = Deno.UnsafePointerView.getArrayBuffer(p, Math.max(size, 1));
    this.bytes = new Uint8Array(ab);
    this.view = new DataView(ab);
  }

  get address(): bigint {
    return BigInt(Deno.UnsafePointer.value(this.ptr));
  }

  free(): void {
    if (this.#freed) return;
    this.#freed = true;
    libc().free(this.ptr);
  }
}

/** An iovec array in calloc'd memory: `entries` host address and length pairs. */
export function iovecArray(entries: { base: bigint; len: number }[]): CMemory {
  const m = new CMemory(entries.length * IOVEC_SIZE);
  entries.forEach((e, i) => {
    m.view.setBigUint64(i * IOVEC_SIZE + IOVEC_BASE, e.base, true);
    m.view.setBigUint64(i * IOVEC_SIZE + IOVEC_LEN, BigInt(e.len), true);
  });
  return m;
}

/** One struct iovec in a JS buffer, for calls that do not keep it (transfers). */
export function iovecOf(bytes: Uint8Array): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(IOVEC_SIZE);
  const v = new DataView(out.buffer);
  v.setBigUint64(IOVEC_BASE, BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(bytes))), true);
  v.setBigUint64(IOVEC_LEN, BigInt(bytes.byteLength), true);
  return out;
}

/** struct virgl_box bytes. */
export function virglBox(
  b: { x: number; y: number; z: number; w: number; h: number; d: number },
): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(BOX_SIZE);
  const v = new DataView(out.buffer);
  v.setUint32(BOX_X, b.x, true);
  v.setUint32(BOX_Y, b.y, true);
  v.setUint32(BOX_Z, b.z, true);
  v.setUint32(BOX_W, b.w, true);
  v.setUint32(BOX_H, b.h, true);
  v.setUint32(BOX_D, b.d, true);
  return out;
}

/** struct virgl_renderer_resource_create_args bytes. */
export function resourceCreateArgs(a: {
  handle: number;
  target: number;
  format: number;
  bind: number;
  width: number;
  height: number;
  depth: number;
  arraySize: number;
  lastLevel: number;
  nrSamples: number;
  flags: number;
}): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(CREATE_ARGS_SIZE);
  const v = new DataView(out.buffer);
  v.setUint32(CREATE_ARGS_HANDLE, a.handle, true);
  v.setUint32(CREATE_ARGS_TARGET, a.target, true);
  v.setUint32(CREATE_ARGS_FORMAT, a.format, true);
  v.setUint32(CREATE_ARGS_BIND, a.bind, true);
  v.setUint32(CREATE_ARGS_WIDTH, a.width, true);
  v.setUint32(CREATE_ARGS_HEIGHT, a.height, true);
  v.setUint32(CREATE_ARGS_DEPTH, a.depth, true);
  v.setUint32(CREATE_ARGS_ARRAY_SIZE, a.arraySize, true);
  v.setUint32(CREATE_ARGS_LAST_LEVEL, a.lastLevel, true);
  v.setUint32(CREATE_ARGS_NR_SAMPLES, a.nrSamples, true);
  v.setUint32(CREATE_ARGS_FLAGS, a.flags, true);
  return out;
}

/** struct virgl_renderer_resource_create_blob_args bytes (`iovecs` is kept by the library). */
export function blobCreateArgs(a: {
  resHandle: number;
  ctxId: number;
  blobMem: number;
  blobFlags: number;
  blobId: bigint;
  size: bigint;
  iovecs: CMemory | null;
  numIovs: number;
}): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(BLOB_ARGS_SIZE);
  const v = new DataView(out.buffer);
  v.setUint32(BLOB_ARGS_RES_HANDLE, a.resHandle, true);
  v.setUint32(BLOB_ARGS_CTX_ID, a.ctxId, true);
  v.setUint32(BLOB_ARGS_BLOB_MEM, a.blobMem, true);
  v.setUint32(BLOB_ARGS_BLOB_FLAGS, a.blobFlags, true);
  v.setBigUint64(BLOB_ARGS_BLOB_ID, a.blobId, true);
  v.setBigUint64(BLOB_ARGS_SIZE_FIELD, a.size, true);
  v.setBigUint64(BLOB_ARGS_IOVECS, a.iovecs ? a.iovecs.address : 0n, true);
  v.setUint32(BLOB_ARGS_NUM_IOVS, a.numIovs, true);
  return out;
}

/** What virgl_renderer_resource_get_info answers. */
export interface ResourceInfo {
  handle: number;
  virglFormat: number;
  width: number;
  height: number;
  depth: number;
  flags: number;
  texId: number;
  stride: number;
  drmFourcc: number;
}

export function readResourceInfo(b: Uint8Array): ResourceInfo {
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  return {
    handle: v.getUint32(RES_INFO_HANDLE, true),
    virglFormat: v.getUint32(RES_INFO_VIRGL_FORMAT, true),
    width: v.getUint32(RES_INFO_WIDTH, true),
    height: v.getUint32(RES_INFO_HEIGHT, true),
    depth: v.getUint32(RES_INFO_DEPTH, true),
    flags: v.getUint32(RES_INFO_FLAGS, true),
    texId: v.getUint32(RES_INFO_TEX_ID, true),
    stride: v.getUint32(RES_INFO_STRIDE, true),
    drmFourcc: v.getInt32(RES_INFO_DRM_FOURCC, true),
  };
}
