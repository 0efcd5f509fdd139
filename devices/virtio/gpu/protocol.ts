// virtio-gpu wire format: numbers, struct layouts, a pure command decoder and response encoders.
// Source: Linux include/uapi/linux/virtio_gpu.h (Debian linux-libc-dev: /usr/include/linux/virtio_gpu.h)
// and the virtio 1.2 spec, section 5.7 "GPU Device". Every struct is little-endian and packed as there.
// The decoder never throws anything but ProtocolError, whatever the bytes.

import type { Box, Rect } from "./backend.ts";

// ---- Feature bits (virtio_gpu.h VIRTIO_GPU_F_*) ----
export const VIRTIO_GPU_F_VIRGL = 1n << 0n;
export const VIRTIO_GPU_F_EDID = 1n << 1n;
export const VIRTIO_GPU_F_RESOURCE_UUID = 1n << 2n;
export const VIRTIO_GPU_F_RESOURCE_BLOB = 1n << 3n;
export const VIRTIO_GPU_F_CONTEXT_INIT = 1n << 4n;

// ---- enum virtio_gpu_ctrl_type (virtio_gpu.h) ----
export const CMD_GET_DISPLAY_INFO = 0x0100;
export const CMD_RESOURCE_CREATE_2D = 0x0101;
export const CMD_RESOURCE_UNREF = 0x0102;
export const CMD_SET_SCANOUT = 0x0103;
export const CMD_RESOURCE_FLUSH = 0x0104;
export const CMD_TRANSFER_TO_HOST_2D = 0x0105;
export const CMD_RESOURCE_ATTACH_BACKING = 0x0106;
export const CMD_RESOURCE_DETACH_BACKING = 0x0107;
export const CMD_GET_CAPSET_INFO = 0x0108;
export const CMD_GET_CAPSET = 0x0109;
export const CMD_GET_EDID = 0x010a;
export const CMD_RESOURCE_ASSIGN_UUID = 0x010b;
export const CMD_RESOURCE_CREATE_BLOB = 0x010c;
export const CMD_SET_SCANOUT_BLOB = 0x010d;
export const CMD_CTX_CREATE = 0x0200;
export const CMD_CTX_DESTROY = 0x0201;
export const CMD_CTX_ATTACH_RESOURCE = 0x0202;
export const CMD_CTX_DETACH_RESOURCE = 0x0203;
export const CMD_RESOURCE_CREATE_3D = 0x0204;
export const CMD_TRANSFER_TO_HOST_3D = 0x0205;
export const CMD_TRANSFER_FROM_HOST_3D = 0x0206;
export const CMD_SUBMIT_3D = 0x0207;
export const CMD_RESOURCE_MAP_BLOB = 0x0208;
export const CMD_RESOURCE_UNMAP_BLOB = 0x0209;
export const CMD_UPDATE_CURSOR = 0x0300;
export const CMD_MOVE_CURSOR = 0x0301;

export const RESP_OK_NODATA = 0x1100;
export const RESP_OK_DISPLAY_INFO = 0x1101;
export const RESP_OK_CAPSET_INFO = 0x1102;
export const RESP_OK_CAPSET = 0x1103;
export const RESP_OK_EDID = 0x1104;
export const RESP_OK_RESOURCE_UUID = 0x1105;
export const RESP_OK_MAP_INFO = 0x1106;
export const RESP_ERR_UNSPEC = 0x1200;
export const RESP_ERR_OUT_OF_MEMORY = 0x1201;
export const RESP_ERR_INVALID_SCANOUT_ID = 0x1202;
export const RESP_ERR_INVALID_RESOURCE_ID = 0x1203;
export const RESP_ERR_INVALID_CONTEXT_ID = 0x1204;
export const RESP_ERR_INVALID_PARAMETER = 0x1205;

/** Names for logs, stats and trace events. */
export const COMMAND_NAMES: Readonly<Record<number, string>> = {
  [CMD_GET_DISPLAY_INFO]: "GET_DISPLAY_INFO",
  [CMD_RESOURCE_CREATE_2D]: "RESOURCE_CREATE_2D",
  [CMD_RESOURCE_UNREF]: "RESOURCE_UNREF",
  [CMD_SET_SCANOUT]: "SET_SCANOUT",
  [CMD_RESOURCE_FLUSH]: "RESOURCE_FLUSH",
  [CMD_TRANSFER_TO_HOST_2D]: "TRANSFER_TO_HOST_2D",
  [CMD_RESOURCE_ATTACH_BACKING]: "RESOURCE_ATTACH_BACKING",
  [CMD_RESOURCE_DETACH_BACKING]: "RESOURCE_DETACH_BACKING",
  [CMD_GET_CAPSET_INFO]: "GET_CAPSET_INFO",
  [CMD_GET_CAPSET]: "GET_CAPSET",
  [CMD_GET_EDID]: "GET_EDID",
  [CMD_RESOURCE_ASSIGN_UUID]: "RESOURCE_ASSIGN_UUID",
  [CMD_RESOURCE_CREATE_BLOB]: "RESOURCE_CREATE_BLOB",
  [CMD_SET_SCANOUT_BLOB]: "SET_SCANOUT_BLOB",
  [CMD_CTX_CREATE]: "CTX_CREATE",
  [CMD_CTX_DESTROY]: "CTX_DESTROY",
  [CMD_CTX_ATTACH_RESOURCE]: "CTX_ATTACH_RESOURCE",
  [CMD_CTX_DETACH_RESOURCE]: "CTX_DETACH_RESOURCE",
  [CMD_RESOURCE_CREATE_3D]: "RESOURCE_CREATE_3D",
  [CMD_TRANSFER_TO_HOST_3D]: "TRANSFER_TO_HOST_3D",
  [CMD_TRANSFER_FROM_HOST_3D]: "TRANSFER_FROM_HOST_3D",
  [CMD_SUBMIT_3D]: "SUBMIT_3D",
  [CMD_RESOURCE_MAP_BLOB]: "RESOURCE_MAP_BLOB",
  [CMD_RESOURCE_UNMAP_BLOB]: "RESOURCE_UNMAP_BLOB",
  [CMD_UPDATE_CURSOR]: "UPDATE_CURSOR",
  [CMD_MOVE_CURSOR]: "MOVE_CURSOR",
};

export function commandName(type: number): string {
  return COMMAND_NAMES[type] ?? `UNKNOWN_0x${(type >>> 0).toString(16)}`;
}

// ---- Header flags (virtio_gpu.h) ----
export const VIRTIO_GPU_FLAG_FENCE = 1 << 0;
export const VIRTIO_GPU_FLAG_INFO_RING_IDX = 1 << 1;

/** VIRTIO_GPU_MAX_SCANOUTS (virtio_gpu.h). */
export const VIRTIO_GPU_MAX_SCANOUTS = 16;
/** VIRTIO_GPU_CONTEXT_INIT_CAPSET_ID_MASK (virtio_gpu.h). */
export const VIRTIO_GPU_CONTEXT_INIT_CAPSET_ID_MASK = 0xff;
/** VIRTIO_GPU_EVENT_DISPLAY (virtio_gpu.h): events_read bit for a display change. */
export const VIRTIO_GPU_EVENT_DISPLAY = 1 << 0;
/** enum virtio_gpu_shm_id: the host-visible window. */
export const VIRTIO_GPU_SHM_ID_HOST_VISIBLE = 1;

// ---- Capset ids (virtio_gpu.h for 1 and 2; virtio spec 5.7.6.7 / crosvm for the rest) ----
export const VIRTIO_GPU_CAPSET_VIRGL = 1;
export const VIRTIO_GPU_CAPSET_VIRGL2 = 2;
export const VIRTIO_GPU_CAPSET_GFXSTREAM = 3;
export const VIRTIO_GPU_CAPSET_VENUS = 4;
export const VIRTIO_GPU_CAPSET_CROSS_DOMAIN = 5;
export const VIRTIO_GPU_CAPSET_DRM = 6;

// ---- Blobs (virtio_gpu.h, struct virtio_gpu_resource_create_blob) ----
export const VIRTIO_GPU_BLOB_MEM_GUEST = 0x0001;
export const VIRTIO_GPU_BLOB_MEM_HOST3D = 0x0002;
export const VIRTIO_GPU_BLOB_MEM_HOST3D_GUEST = 0x0003;
export const VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE = 0x0001;
export const VIRTIO_GPU_BLOB_FLAG_USE_SHAREABLE = 0x0002;
export const VIRTIO_GPU_BLOB_FLAG_USE_CROSS_DEVICE = 0x0004;
/** Every blob flag virtio_gpu.h defines. */
export const VIRTIO_GPU_BLOB_FLAGS_KNOWN = VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE | VIRTIO_GPU_BLOB_FLAG_USE_SHAREABLE |
  VIRTIO_GPU_BLOB_FLAG_USE_CROSS_DEVICE;
export const VIRTIO_GPU_MAP_CACHE_MASK = 0x0f;
export const VIRTIO_GPU_MAP_CACHE_NONE = 0x00;
export const VIRTIO_GPU_MAP_CACHE_CACHED = 0x01;
export const VIRTIO_GPU_MAP_CACHE_UNCACHED = 0x02;
export const VIRTIO_GPU_MAP_CACHE_WC = 0x03;

// ---- struct virtio_gpu_config (virtio_gpu.h): four le32 ----
export const GPU_CFG_EVENTS_READ = 0;
export const GPU_CFG_EVENTS_CLEAR = 4;
export const GPU_CFG_NUM_SCANOUTS = 8;
export const GPU_CFG_NUM_CAPSETS = 12;
export const GPU_CONFIG_SIZE = 16;

// ---- struct virtio_gpu_ctrl_hdr: le32 type, le32 flags, le64 fence_id, le32 ctx_id, u8 ring_idx, u8 pad[3] ----
export const HDR_TYPE = 0;
export const HDR_FLAGS = 4;
export const HDR_FENCE_ID = 8;
export const HDR_CTX_ID = 16;
export const HDR_RING_IDX = 20;
export const HDR_SIZE = 24;

// ---- Struct sizes, header included (virtio_gpu.h) ----
/** struct virtio_gpu_rect: four le32. */
export const RECT_SIZE = 16;
/** struct virtio_gpu_box: six le32. */
export const BOX_SIZE = 24;
/** struct virtio_gpu_mem_entry: le64 addr, le32 length, le32 padding. */
export const MEM_ENTRY_SIZE = 16;
/** struct virtio_gpu_cursor_pos: scanout_id, x, y, padding. */
export const CURSOR_POS_SIZE = 16;
export const SIZEOF_RESOURCE_CREATE_2D = HDR_SIZE + 16;
export const SIZEOF_RESOURCE_UNREF = HDR_SIZE + 8;
export const SIZEOF_SET_SCANOUT = HDR_SIZE + RECT_SIZE + 8;
export const SIZEOF_RESOURCE_FLUSH = HDR_SIZE + RECT_SIZE + 8;
export const SIZEOF_TRANSFER_TO_HOST_2D = HDR_SIZE + RECT_SIZE + 16;
export const SIZEOF_RESOURCE_ATTACH_BACKING = HDR_SIZE + 8;
export const SIZEOF_RESOURCE_DETACH_BACKING = HDR_SIZE + 8;
export const SIZEOF_GET_CAPSET_INFO = HDR_SIZE + 8;
export const SIZEOF_GET_CAPSET = HDR_SIZE + 8;
export const SIZEOF_GET_EDID = HDR_SIZE + 8;
export const SIZEOF_RESOURCE_ASSIGN_UUID = HDR_SIZE + 8;
export const SIZEOF_RESOURCE_CREATE_BLOB = HDR_SIZE + 32;
export const SIZEOF_SET_SCANOUT_BLOB = HDR_SIZE + RECT_SIZE + 24 + 32;
/** struct virtio_gpu_ctx_create: nlen, context_init, debug_name[64]. */
export const CTX_DEBUG_NAME_SIZE = 64;
export const SIZEOF_CTX_CREATE = HDR_SIZE + 8 + CTX_DEBUG_NAME_SIZE;
export const SIZEOF_CTX_DESTROY = HDR_SIZE;
export const SIZEOF_CTX_RESOURCE = HDR_SIZE + 8;
export const SIZEOF_RESOURCE_CREATE_3D = HDR_SIZE + 48;
export const SIZEOF_TRANSFER_HOST_3D = HDR_SIZE + BOX_SIZE + 8 + 16;
export const SIZEOF_CMD_SUBMIT = HDR_SIZE + 8;
export const SIZEOF_RESOURCE_MAP_BLOB = HDR_SIZE + 16;
export const SIZEOF_RESOURCE_UNMAP_BLOB = HDR_SIZE + 8;
export const SIZEOF_UPDATE_CURSOR = HDR_SIZE + CURSOR_POS_SIZE + 16;
export const SIZEOF_GET_DISPLAY_INFO = HDR_SIZE;
/** struct virtio_gpu_resp_display_info: hdr + 16 x (rect, enabled, flags). */
export const DISPLAY_ONE_SIZE = RECT_SIZE + 8;
export const SIZEOF_RESP_DISPLAY_INFO = HDR_SIZE + VIRTIO_GPU_MAX_SCANOUTS * DISPLAY_ONE_SIZE;
export const SIZEOF_RESP_CAPSET_INFO = HDR_SIZE + 16;
/** struct virtio_gpu_resp_edid: hdr, le32 size, le32 padding, u8 edid[1024]. */
export const EDID_BLOB_MAX = 1024;
export const SIZEOF_RESP_EDID = HDR_SIZE + 8 + EDID_BLOB_MAX;
export const SIZEOF_RESP_MAP_INFO = HDR_SIZE + 8;
export const SIZEOF_RESP_RESOURCE_UUID = HDR_SIZE + 16;
/** Planes in SET_SCANOUT_BLOB's strides[] and offsets[]. */
export const SCANOUT_BLOB_PLANES = 4;

/** Largest nr_entries accepted in ATTACH_BACKING / CREATE_BLOB (crosvm caps a command at the queue's bytes). */
export const MAX_MEM_ENTRIES = 16384;

// ---- RESOURCE_CREATE_3D ----

/**
 * The fields of struct virtio_gpu_resource_create_3d after resource_id, in wire order, each a le32 (then
 * le32 padding). virglrenderer's struct virgl_renderer_resource_create_args (after handle) and the
 * VIRGL_CCMD_PIPE_RESOURCE_CREATE payload (before blob_id) carry the same fields in the same order.
 */
export const CREATE_3D_FIELDS = [
  "target",
  "format",
  "bind",
  "width",
  "height",
  "depth",
  "arraySize",
  "lastLevel",
  "nrSamples",
  "flags",
] as const;
export type Create3DField = typeof CREATE_3D_FIELDS[number];
/** The create-3D fields by name. */
export type Create3DFields = { [K in Create3DField]: number };
/** Just the create-3D fields of `a` (an object that may carry more). */
export function pickCreate3DFields(a: Create3DFields): Create3DFields {
  const out = {} as Create3DFields;
  for (const f of CREATE_3D_FIELDS) out[f] = a[f];
  return out;
}

/** The fields a single-level, single-layer, single-sample resource leaves at their neutral values. */
export const CREATE_3D_DEFAULTS: Omit<Create3DFields, "target" | "format" | "bind" | "width"> = {
  height: 1,
  depth: 1,
  arraySize: 1,
  lastLevel: 0,
  nrSamples: 0,
  flags: 0,
};
/** Byte offset of the first create-3D field: after the header and resource_id. */
const CREATE_3D_FIELDS_OFFSET = HDR_SIZE + 4;

// ---- Decoded commands ----

export interface CtrlHdr {
  type: number;
  flags: number;
  fenceId: bigint;
  ctxId: number;
  ringIdx: number;
}

export type Command =
  | { kind: "get_display_info"; hdr: CtrlHdr }
  | { kind: "resource_create_2d"; hdr: CtrlHdr; resourceId: number; format: number; width: number; height: number }
  | { kind: "resource_unref"; hdr: CtrlHdr; resourceId: number }
  | { kind: "set_scanout"; hdr: CtrlHdr; rect: Rect; scanoutId: number; resourceId: number }
  | { kind: "resource_flush"; hdr: CtrlHdr; rect: Rect; resourceId: number }
  | { kind: "transfer_to_host_2d"; hdr: CtrlHdr; rect: Rect; offset: bigint; resourceId: number }
  | { kind: "attach_backing"; hdr: CtrlHdr; resourceId: number; entries: MemEntry[] }
  | { kind: "detach_backing"; hdr: CtrlHdr; resourceId: number }
  | { kind: "get_capset_info"; hdr: CtrlHdr; capsetIndex: number }
  | { kind: "get_capset"; hdr: CtrlHdr; capsetId: number; capsetVersion: number }
  | { kind: "get_edid"; hdr: CtrlHdr; scanout: number }
  | { kind: "assign_uuid"; hdr: CtrlHdr; resourceId: number }
  | {
    kind: "resource_create_blob";
    hdr: CtrlHdr;
    resourceId: number;
    blobMem: number;
    blobFlags: number;
    blobId: bigint;
    size: bigint;
    entries: MemEntry[];
  }
  | {
    kind: "set_scanout_blob";
    hdr: CtrlHdr;
    rect: Rect;
    scanoutId: number;
    resourceId: number;
    width: number;
    height: number;
    format: number;
    strides: number[];
    offsets: number[];
  }
  | { kind: "ctx_create"; hdr: CtrlHdr; contextInit: number; name: string }
  | { kind: "ctx_destroy"; hdr: CtrlHdr }
  | { kind: "ctx_attach_resource"; hdr: CtrlHdr; resourceId: number }
  | { kind: "ctx_detach_resource"; hdr: CtrlHdr; resourceId: number }
  | ({ kind: "resource_create_3d"; hdr: CtrlHdr; resourceId: number } & Create3DFields)
  | {
    kind: "transfer_to_host_3d" | "transfer_from_host_3d";
    hdr: CtrlHdr;
    box: Box;
    offset: bigint;
    resourceId: number;
    level: number;
    stride: number;
    layerStride: number;
  }
  | { kind: "submit_3d"; hdr: CtrlHdr; commands: Uint8Array }
  | { kind: "resource_map_blob"; hdr: CtrlHdr; resourceId: number; offset: bigint }
  | { kind: "resource_unmap_blob"; hdr: CtrlHdr; resourceId: number }
  | ({ kind: "update_cursor" | "move_cursor"; hdr: CtrlHdr } & CursorFields);

/**
 * The fields of UPDATE_CURSOR / MOVE_CURSOR (struct virtio_gpu_update_cursor: the position's scanout and
 * place, the cursor resource and its hot spot; MOVE_CURSOR uses only the position).
 */
export interface CursorFields {
  scanoutId: number;
  x: number;
  y: number;
  resourceId: number;
  hotX: number;
  hotY: number;
}

/** struct virtio_gpu_mem_entry, unchecked (the device validates it against guest memory). */
export interface MemEntry {
  addr: bigint;
  length: number;
}

/** A command the device answers with `response` (an ERR_* code). */
export class ProtocolError extends Error {
  constructor(readonly response: number, msg: string) {
    super(msg);
    this.name = "ProtocolError";
  }
}

/** Reads the header of a command (caller checked bytes.length >= HDR_SIZE). */
export function readHdr(v: DataView): CtrlHdr {
  return {
    type: v.getUint32(HDR_TYPE, true),
    flags: v.getUint32(HDR_FLAGS, true),
    fenceId: v.getBigUint64(HDR_FENCE_ID, true),
    ctxId: v.getUint32(HDR_CTX_ID, true),
    ringIdx: v.getUint8(HDR_RING_IDX),
  };
}

function rectAt(v: DataView, o: number): Rect {
  return {
    x: v.getUint32(o, true),
    y: v.getUint32(o + 4, true),
    width: v.getUint32(o + 8, true),
    height: v.getUint32(o + 12, true),
  };
}

function boxAt(v: DataView, o: number): Box {
  return {
    x: v.getUint32(o, true),
    y: v.getUint32(o + 4, true),
    z: v.getUint32(o + 8, true),
    w: v.getUint32(o + 12, true),
    h: v.getUint32(o + 16, true),
    d: v.getUint32(o + 20, true),
  };
}

function entriesAt(v: DataView, o: number, n: number, what: string): MemEntry[] {
  if (n > MAX_MEM_ENTRIES) throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `${what}: ${n} memory entries`);
  if (v.byteLength < o + n * MEM_ENTRY_SIZE) {
    throw new ProtocolError(
      RESP_ERR_INVALID_PARAMETER,
      `${what}: ${n} memory entries need ${o + n * MEM_ENTRY_SIZE} bytes, command has ${v.byteLength}`,
    );
  }
  const out: MemEntry[] = [];
  for (let i = 0; i < n; i++) {
    const e = o + i * MEM_ENTRY_SIZE;
    out.push({ addr: v.getBigUint64(e, true), length: v.getUint32(e + 8, true) });
  }
  return out;
}

/** The fixed size of each command type (header included). */
const FIXED_SIZE: Readonly<Record<number, number>> = {
  [CMD_GET_DISPLAY_INFO]: SIZEOF_GET_DISPLAY_INFO,
  [CMD_RESOURCE_CREATE_2D]: SIZEOF_RESOURCE_CREATE_2D,
  [CMD_RESOURCE_UNREF]: SIZEOF_RESOURCE_UNREF,
  [CMD_SET_SCANOUT]: SIZEOF_SET_SCANOUT,
  [CMD_RESOURCE_FLUSH]: SIZEOF_RESOURCE_FLUSH,
  [CMD_TRANSFER_TO_HOST_2D]: SIZEOF_TRANSFER_TO_HOST_2D,
  [CMD_RESOURCE_ATTACH_BACKING]: SIZEOF_RESOURCE_ATTACH_BACKING,
  [CMD_RESOURCE_DETACH_BACKING]: SIZEOF_RESOURCE_DETACH_BACKING,
  [CMD_GET_CAPSET_INFO]: SIZEOF_GET_CAPSET_INFO,
  [CMD_GET_CAPSET]: SIZEOF_GET_CAPSET,
  [CMD_GET_EDID]: SIZEOF_GET_EDID,
  [CMD_RESOURCE_ASSIGN_UUID]: SIZEOF_RESOURCE_ASSIGN_UUID,
  [CMD_RESOURCE_CREATE_BLOB]: SIZEOF_RESOURCE_CREATE_BLOB,
  [CMD_SET_SCANOUT_BLOB]: SIZEOF_SET_SCANOUT_BLOB,
  // Linux sends CTX_CREATE with the whole 64-byte name field; accept shorter commands up to nlen.
  [CMD_CTX_CREATE]: HDR_SIZE + 8,
  [CMD_CTX_DESTROY]: SIZEOF_CTX_DESTROY,
  [CMD_CTX_ATTACH_RESOURCE]: SIZEOF_CTX_RESOURCE,
  [CMD_CTX_DETACH_RESOURCE]: SIZEOF_CTX_RESOURCE,
  [CMD_RESOURCE_CREATE_3D]: SIZEOF_RESOURCE_CREATE_3D,
  [CMD_TRANSFER_TO_HOST_3D]: SIZEOF_TRANSFER_HOST_3D,
  [CMD_TRANSFER_FROM_HOST_3D]: SIZEOF_TRANSFER_HOST_3D,
  [CMD_SUBMIT_3D]: SIZEOF_CMD_SUBMIT,
  [CMD_RESOURCE_MAP_BLOB]: SIZEOF_RESOURCE_MAP_BLOB,
  [CMD_RESOURCE_UNMAP_BLOB]: SIZEOF_RESOURCE_UNMAP_BLOB,
  [CMD_UPDATE_CURSOR]: SIZEOF_UPDATE_CURSOR,
  [CMD_MOVE_CURSOR]: SIZEOF_UPDATE_CURSOR,
};

/**
 * Decode one command from the device-readable bytes of a chain. Throws only ProtocolError:
 * ERR_UNSPEC for an unknown type, ERR_INVALID_PARAMETER for a short or inconsistent command.
 */
export function parseCommand(bytes: Uint8Array): Command {
  if (bytes.length < HDR_SIZE) {
    throw new ProtocolError(RESP_ERR_UNSPEC, `command of ${bytes.length} bytes is shorter than its header`);
  }
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const hdr = readHdr(v);
  const need = FIXED_SIZE[hdr.type];
  if (need === undefined) throw new ProtocolError(RESP_ERR_UNSPEC, `unknown command type 0x${hdr.type.toString(16)}`);
  const name = commandName(hdr.type);
  if (bytes.length < need) {
    throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `${name}: ${bytes.length} bytes, needs ${need}`);
  }
  const u32 = (o: number) => v.getUint32(o, true);
  const H = HDR_SIZE;
  switch (hdr.type) {
    case CMD_GET_DISPLAY_INFO:
      return { kind: "get_display_info", hdr };
    case CMD_RESOURCE_CREATE_2D:
      return {
        kind: "resource_create_2d",
        hdr,
        resourceId: u32(H),
        format: u32(H + 4),
        width: u32(H + 8),
        height: u32(H + 12),
      };
    case CMD_RESOURCE_UNREF:
      return { kind: "resource_unref", hdr, resourceId: u32(H) };
    case CMD_SET_SCANOUT:
      return {
        kind: "set_scanout",
        hdr,
        rect: rectAt(v, H),
        scanoutId: u32(H + RECT_SIZE),
        resourceId: u32(H + RECT_SIZE + 4),
      };
    case CMD_RESOURCE_FLUSH:
      return { kind: "resource_flush", hdr, rect: rectAt(v, H), resourceId: u32(H + RECT_SIZE) };
    case CMD_TRANSFER_TO_HOST_2D:
      return {
        kind: "transfer_to_host_2d",
        hdr,
        rect: rectAt(v, H),
        offset: v.getBigUint64(H + RECT_SIZE, true),
        resourceId: u32(H + RECT_SIZE + 8),
      };
    case CMD_RESOURCE_ATTACH_BACKING: {
      const n = u32(H + 4);
      return { kind: "attach_backing", hdr, resourceId: u32(H), entries: entriesAt(v, need, n, name) };
    }
    case CMD_RESOURCE_DETACH_BACKING:
      return { kind: "detach_backing", hdr, resourceId: u32(H) };
    case CMD_GET_CAPSET_INFO:
      return { kind: "get_capset_info", hdr, capsetIndex: u32(H) };
    case CMD_GET_CAPSET:
      return { kind: "get_capset", hdr, capsetId: u32(H), capsetVersion: u32(H + 4) };
    case CMD_GET_EDID:
      return { kind: "get_edid", hdr, scanout: u32(H) };
    case CMD_RESOURCE_ASSIGN_UUID:
      return { kind: "assign_uuid", hdr, resourceId: u32(H) };
    case CMD_RESOURCE_CREATE_BLOB: {
      const blobFlags = u32(H + 8);
      if (blobFlags & ~VIRTIO_GPU_BLOB_FLAGS_KNOWN) {
        throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `${name}: unknown blob flags 0x${blobFlags.toString(16)}`);
      }
      return {
        kind: "resource_create_blob",
        hdr,
        resourceId: u32(H),
        blobMem: u32(H + 4),
        blobFlags,
        blobId: v.getBigUint64(H + 16, true),
        size: v.getBigUint64(H + 24, true),
        entries: entriesAt(v, need, u32(H + 12), name),
      };
    }
    case CMD_SET_SCANOUT_BLOB: {
      const o = H + RECT_SIZE;
      const strides: number[] = [];
      const offsets: number[] = [];
      for (let i = 0; i < SCANOUT_BLOB_PLANES; i++) {
        strides.push(u32(o + 24 + 4 * i));
        offsets.push(u32(o + 24 + 4 * SCANOUT_BLOB_PLANES + 4 * i));
      }
      return {
        kind: "set_scanout_blob",
        hdr,
        rect: rectAt(v, H),
        scanoutId: u32(o),
        resourceId: u32(o + 4),
        width: u32(o + 8),
        height: u32(o + 12),
        format: u32(o + 16),
        strides,
        offsets,
      };
    }
    case CMD_CTX_CREATE: {
      const nlen = u32(H);
      if (nlen > CTX_DEBUG_NAME_SIZE || bytes.length < need + nlen) {
        throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `${name}: debug name of ${nlen} bytes`);
      }
      const raw = bytes.subarray(need, need + nlen);
      const name0 = new TextDecoder("utf-8", { fatal: false }).decode(raw).replace(/[^\x20-\x7e]/g, "?");
      return { kind: "ctx_create", hdr, contextInit: u32(H + 4), name: name0 };
    }
    case CMD_CTX_DESTROY:
      return { kind: "ctx_destroy", hdr };
    case CMD_CTX_ATTACH_RESOURCE:
      return { kind: "ctx_attach_resource", hdr, resourceId: u32(H) };
    case CMD_CTX_DETACH_RESOURCE:
      return { kind: "ctx_detach_resource", hdr, resourceId: u32(H) };
    case CMD_RESOURCE_CREATE_3D: {
      const fields = {} as Create3DFields;
      CREATE_3D_FIELDS.forEach((f, i) => fields[f] = u32(CREATE_3D_FIELDS_OFFSET + 4 * i));
      return { kind: "resource_create_3d", hdr, resourceId: u32(H), ...fields };
    }
    case CMD_TRANSFER_TO_HOST_3D:
    case CMD_TRANSFER_FROM_HOST_3D: {
      const o = H + BOX_SIZE;
      return {
        kind: hdr.type === CMD_TRANSFER_TO_HOST_3D ? "transfer_to_host_3d" : "transfer_from_host_3d",
        hdr,
        box: boxAt(v, H),
        offset: v.getBigUint64(o, true),
        resourceId: u32(o + 8),
        level: u32(o + 12),
        stride: u32(o + 16),
        layerStride: u32(o + 20),
      };
    }
    case CMD_SUBMIT_3D: {
      const size = u32(H);
      if (bytes.length < need + size) {
        throw new ProtocolError(
          RESP_ERR_INVALID_PARAMETER,
          `${name}: ${size} bytes of commands announced, ${bytes.length - need} present`,
        );
      }
      return { kind: "submit_3d", hdr, commands: bytes.subarray(need, need + size) };
    }
    case CMD_RESOURCE_MAP_BLOB:
      return { kind: "resource_map_blob", hdr, resourceId: u32(H), offset: v.getBigUint64(H + 8, true) };
    case CMD_RESOURCE_UNMAP_BLOB:
      return { kind: "resource_unmap_blob", hdr, resourceId: u32(H) };
    case CMD_UPDATE_CURSOR:
    case CMD_MOVE_CURSOR: {
      const o = H + CURSOR_POS_SIZE;
      return {
        kind: hdr.type === CMD_UPDATE_CURSOR ? "update_cursor" : "move_cursor",
        hdr,
        scanoutId: u32(H),
        x: u32(H + 4),
        y: u32(H + 8),
        resourceId: u32(o),
        hotX: u32(o + 4),
        hotY: u32(o + 8),
      };
    }
  }
  throw new ProtocolError(RESP_ERR_UNSPEC, `unknown command type 0x${hdr.type.toString(16)}`);
}

// ---- Responses ----

/** A response header echoing the command's fence fields (virtio spec 5.7.6.8). */
export function responseHeader(type: number, cmd: CtrlHdr | undefined, size = HDR_SIZE): Uint8Array {
  const b = new Uint8Array(size);
  const v = new DataView(b.buffer);
  v.setUint32(HDR_TYPE, type, true);
  if (cmd && (cmd.flags & VIRTIO_GPU_FLAG_FENCE)) {
    v.setUint32(HDR_FLAGS, cmd.flags & (VIRTIO_GPU_FLAG_FENCE | VIRTIO_GPU_FLAG_INFO_RING_IDX), true);
    v.setBigUint64(HDR_FENCE_ID, cmd.fenceId, true);
    v.setUint32(HDR_CTX_ID, cmd.ctxId, true);
    if (cmd.flags & VIRTIO_GPU_FLAG_INFO_RING_IDX) v.setUint8(HDR_RING_IDX, cmd.ringIdx);
  }
  return b;
}

/** One scanout as GET_DISPLAY_INFO reports it. */
export interface DisplayMode {
  width: number;
  height: number;
  enabled: boolean;
}

export function respDisplayInfo(cmd: CtrlHdr, modes: DisplayMode[]): Uint8Array {
  const b = responseHeader(RESP_OK_DISPLAY_INFO, cmd, SIZEOF_RESP_DISPLAY_INFO);
  const v = new DataView(b.buffer);
  modes.slice(0, VIRTIO_GPU_MAX_SCANOUTS).forEach((m, i) => {
    const o = HDR_SIZE + i * DISPLAY_ONE_SIZE;
    v.setUint32(o + 8, m.width, true); // r.width (r.x = r.y = 0)
    v.setUint32(o + 12, m.height, true); // r.height
    v.setUint32(o + RECT_SIZE, m.enabled ? 1 : 0, true); // enabled
  });
  return b;
}

export function respCapsetInfo(cmd: CtrlHdr, id: number, maxVersion: number, maxSize: number): Uint8Array {
  const b = responseHeader(RESP_OK_CAPSET_INFO, cmd, SIZEOF_RESP_CAPSET_INFO);
  const v = new DataView(b.buffer);
  v.setUint32(HDR_SIZE, id, true);
  v.setUint32(HDR_SIZE + 4, maxVersion, true);
  v.setUint32(HDR_SIZE + 8, maxSize, true);
  return b;
}

export function respCapset(cmd: CtrlHdr, data: Uint8Array): Uint8Array {
  const b = responseHeader(RESP_OK_CAPSET, cmd, HDR_SIZE + data.length);
  b.set(data, HDR_SIZE);
  return b;
}

export function respEdid(cmd: CtrlHdr, edid: Uint8Array): Uint8Array {
  const b = responseHeader(RESP_OK_EDID, cmd, SIZEOF_RESP_EDID);
  new DataView(b.buffer).setUint32(HDR_SIZE, edid.length, true);
  b.set(edid.subarray(0, EDID_BLOB_MAX), HDR_SIZE + 8);
  return b;
}

export function respMapInfo(cmd: CtrlHdr, mapInfo: number): Uint8Array {
  const b = responseHeader(RESP_OK_MAP_INFO, cmd, SIZEOF_RESP_MAP_INFO);
  new DataView(b.buffer).setUint32(HDR_SIZE, mapInfo, true);
  return b;
}

export function respUuid(cmd: CtrlHdr, uuid: Uint8Array): Uint8Array {
  const b = responseHeader(RESP_OK_RESOURCE_UUID, cmd, SIZEOF_RESP_RESOURCE_UUID);
  b.set(uuid.subarray(0, 16), HDR_SIZE);
  return b;
}
