// The vhost-user wire format: message header, request codes, feature bits and
// payload layouts. Source of truth: QEMU docs/interop/vhost-user.rst ("Message
// types", "Protocol features", "Front-end message types"). All fields are
// little-endian (native x86_64).

import { closeFd } from "../../ffi/libc.ts";
import type { UnixStream } from "../../core/unix_socket.ts";

// Header (vhost-user.rst "Header"): u32 request; u32 flags; u32 size (payload bytes).
const HDR_REQUEST = 0;
const HDR_FLAGS = 4;
const HDR_SIZE_FIELD = 8;
/** Bytes in the message header. */
export const VHOST_USER_HEADER_SIZE = 12;

/** flags bits 0-1: protocol version, always 0x1 (vhost-user.rst "Header"). */
export const VHOST_USER_VERSION_MASK = 0x3;
export const VHOST_USER_VERSION = 0x1;
/** flags bit 2: this message is a reply. */
export const VHOST_USER_FLAG_REPLY = 0x4;
/** flags bit 3: the sender wants a reply (REPLY_ACK). */
export const VHOST_USER_FLAG_NEED_REPLY = 0x8;

/** Largest payload this back end accepts; the largest legitimate one (a config read) is 12 + 256. */
export const VHOST_USER_MAX_PAYLOAD = 4096;
/** Device configuration space bytes a GET_CONFIG/SET_CONFIG may carry (vhost-user.rst "Device config space"). */
export const VHOST_USER_MAX_CONFIG_SIZE = 256;
/** Regions in one SET_MEM_TABLE (vhost-user.rst "Memory regions description": VHOST_MEMORY_BASELINE_NREGIONS). */
export const VHOST_MEMORY_BASELINE_NREGIONS = 8;

/** Front-end requests (vhost-user.rst "Front-end message types"). */
export const VhostUserRequest = {
  GET_FEATURES: 1,
  SET_FEATURES: 2,
  SET_OWNER: 3,
  RESET_OWNER: 4,
  SET_MEM_TABLE: 5,
  SET_LOG_BASE: 6,
  SET_LOG_FD: 7,
  SET_VRING_NUM: 8,
  SET_VRING_ADDR: 9,
  SET_VRING_BASE: 10,
  GET_VRING_BASE: 11,
  SET_VRING_KICK: 12,
  SET_VRING_CALL: 13,
  SET_VRING_ERR: 14,
  GET_PROTOCOL_FEATURES: 15,
  SET_PROTOCOL_FEATURES: 16,
  GET_QUEUE_NUM: 17,
  SET_VRING_ENABLE: 18,
  SEND_RARP: 19,
  NET_SET_MTU: 20,
  SET_BACKEND_REQ_FD: 21,
  IOTLB_MSG: 22,
  SET_VRING_ENDIAN: 23,
  GET_CONFIG: 24,
  SET_CONFIG: 25,
  GET_INFLIGHT_FD: 31,
  SET_INFLIGHT_FD: 32,
  RESET_DEVICE: 34,
  VRING_KICK: 35,
  GET_MAX_MEM_SLOTS: 36,
  ADD_MEM_REG: 37,
  REM_MEM_REG: 38,
  SET_STATUS: 39,
  GET_STATUS: 40,
} as const;

/** Back-end requests on the channel from SET_BACKEND_REQ_FD (vhost-user.rst "Back-end message types"). */
export const VhostUserBackendRequest = {
  IOTLB_MSG: 1,
  CONFIG_CHANGE_MSG: 2,
  VRING_HOST_NOTIFIER_MSG: 3,
  VRING_CALL: 4,
  VRING_ERR: 5,
} as const;

/** Largest ring index a SET_VRING_KICK/CALL/ERR payload can name (bits 0-7, vhost-user.rst "Vring descriptor"). */
export const VHOST_USER_MAX_VRING_INDEX = 0xff;

/** Request code to name, for log lines. */
export function requestName(code: number): string {
  for (const [k, v] of Object.entries(VhostUserRequest)) if (v === code) return k;
  return `request ${code}`;
}

/** Virtio feature bit 30: the back end speaks the protocol-feature extension (vhost-user.rst "Feature bits"). */
export const VHOST_USER_F_PROTOCOL_FEATURES = 1n << 30n;

/** Protocol feature bits (vhost-user.rst "Protocol features"). */
export const VHOST_USER_PROTOCOL_F_MQ = 1n << 0n;
export const VHOST_USER_PROTOCOL_F_LOG_SHMFD = 1n << 1n;
export const VHOST_USER_PROTOCOL_F_REPLY_ACK = 1n << 3n;
export const VHOST_USER_PROTOCOL_F_BACKEND_REQ = 1n << 5n;
export const VHOST_USER_PROTOCOL_F_CONFIG = 1n << 9n;
export const VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD = 1n << 12n;
export const VHOST_USER_PROTOCOL_F_RESET_DEVICE = 1n << 13n;
export const VHOST_USER_PROTOCOL_F_INBAND_NOTIFICATIONS = 1n << 14n;
export const VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS = 1n << 15n;
export const VHOST_USER_PROTOCOL_F_STATUS = 1n << 16n;

/** Vring descriptor u64 payload (SET_VRING_KICK/CALL/ERR): bits 0-7 index, bit 8 "no fd" (vhost-user.rst). */
export const VHOST_USER_VRING_INDEX_MASK = 0xffn;
export const VHOST_USER_VRING_NOFD_MASK = 1n << 8n;

// A vring state description (vhost-user.rst): u32 index; u32 num.
const STATE_INDEX = 0;
const STATE_NUM = 4;
export const VRING_STATE_SIZE = 8;

// A vring address description (vhost-user.rst): u32 index; u32 flags; u64 descriptor; u64 used; u64 available; u64 log.
const ADDR_INDEX = 0;
const ADDR_FLAGS = 4;
const ADDR_DESC = 8;
const ADDR_USED = 16;
const ADDR_AVAIL = 24;
const ADDR_LOG = 32;
export const VRING_ADDR_SIZE = 40;

// Memory regions description (vhost-user.rst): u32 num regions; u32 padding; then regions of
// u64 guest address; u64 size; u64 user address; u64 mmap offset.
const MEM_NUM = 0;
const MEM_REGIONS = 8;
const REGION_GUEST = 0;
const REGION_SIZE = 8;
const REGION_USER = 16;
const REGION_MMAP_OFFSET = 24;
export const MEM_REGION_SIZE = 32;

// Device config space (vhost-user.rst): u32 offset; u32 size; u32 flags; u8 payload[size].
const CONFIG_OFFSET = 0;
const CONFIG_SIZE = 4;
const CONFIG_FLAGS = 8;
export const CONFIG_HEADER_SIZE = 12;

/** A protocol violation by the peer: the connection is dropped. */
export class VhostUserProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "VhostUserProtocolError";
  }
}

export interface VhostUserMessage {
  request: number;
  flags: number;
  payload: Uint8Array<ArrayBuffer>;
  /** Descriptors received with the message; the handler takes ownership. */
  fds: number[];
}

export interface VringState {
  index: number;
  num: number;
}

export interface VringAddr {
  index: number;
  flags: number;
  desc: bigint;
  used: bigint;
  avail: bigint;
  log: bigint;
}

export interface MemRegion {
  guestPhysAddr: bigint;
  memorySize: bigint;
  userspaceAddr: bigint;
  mmapOffset: bigint;
}

export interface ConfigPayload {
  offset: number;
  size: number;
  flags: number;
  data: Uint8Array<ArrayBuffer>;
}

function view(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}

function expectSize(msg: VhostUserMessage, size: number): DataView {
  if (msg.payload.length !== size) {
    throw new VhostUserProtocolError(
      `${requestName(msg.request)}: payload of ${msg.payload.length} bytes, expected ${size}`,
    );
  }
  return view(msg.payload);
}

/** Encode a message: header plus payload. */
export function encodeMessage(
  request: number,
  flags: number,
  payload: Uint8Array = new Uint8Array(),
): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(VHOST_USER_HEADER_SIZE + payload.length);
  const dv = view(out);
  dv.setUint32(HDR_REQUEST, request, true);
  dv.setUint32(HDR_FLAGS, flags, true);
  dv.setUint32(HDR_SIZE_FIELD, payload.length, true);
  out.set(payload, VHOST_USER_HEADER_SIZE);
  return out;
}

/** A message header: the request code, the flags and the payload size. */
export interface VhostUserHeader {
  request: number;
  flags: number;
  size: number;
}

/**
 * Decode and check a header: the version bits and the size limit; `expectReply` selects whether the
 * REPLY flag must be set (front end) or clear (back end). Throws VhostUserProtocolError.
 */
export function parseHeader(bytes: Uint8Array, expectReply: boolean): VhostUserHeader {
  if (bytes.length !== VHOST_USER_HEADER_SIZE) {
    throw new VhostUserProtocolError(`a header of ${bytes.length} bytes, expected ${VHOST_USER_HEADER_SIZE}`);
  }
  const dv = view(bytes);
  const request = dv.getUint32(HDR_REQUEST, true);
  const flags = dv.getUint32(HDR_FLAGS, true);
  const size = dv.getUint32(HDR_SIZE_FIELD, true);
  if ((flags & VHOST_USER_VERSION_MASK) !== VHOST_USER_VERSION) {
    throw new VhostUserProtocolError(`${requestName(request)}: unsupported version in flags 0x${flags.toString(16)}`);
  }
  if (Boolean(flags & VHOST_USER_FLAG_REPLY) !== expectReply) {
    throw new VhostUserProtocolError(`${requestName(request)}: unexpected reply flag in 0x${flags.toString(16)}`);
  }
  if (size > VHOST_USER_MAX_PAYLOAD) {
    throw new VhostUserProtocolError(`${requestName(request)}: payload of ${size} bytes is too large`);
  }
  return { request, flags, size };
}

/**
 * Read one message (header, then payload). Checks the header (parseHeader); `expectReply` selects
 * whether the REPLY flag must be set (front end) or clear (back end).
 */
export async function readMessage(sock: UnixStream, expectReply = false): Promise<VhostUserMessage> {
  const hdr = await sock.recvExact(VHOST_USER_HEADER_SIZE);
  const fds = hdr.fds;
  try {
    const { request, flags, size } = parseHeader(hdr.data, expectReply);
    let payload: Uint8Array<ArrayBuffer> = new Uint8Array(0);
    if (size > 0) {
      const body = await sock.recvExact(size);
      fds.push(...body.fds);
      payload = body.data;
    }
    return { request, flags, payload, fds };
  } catch (e) {
    fds.splice(0).forEach(closeFd);
    throw e;
  }
}

export function u64Payload(v: bigint): Uint8Array {
  const b = new Uint8Array(8);
  view(b).setBigUint64(0, v, true);
  return b;
}

export function parseU64(msg: VhostUserMessage): bigint {
  return expectSize(msg, 8).getBigUint64(0, true);
}

export function vringStatePayload(s: VringState): Uint8Array {
  const b = new Uint8Array(VRING_STATE_SIZE);
  const dv = view(b);
  dv.setUint32(STATE_INDEX, s.index, true);
  dv.setUint32(STATE_NUM, s.num, true);
  return b;
}

export function parseVringState(msg: VhostUserMessage): VringState {
  const dv = expectSize(msg, VRING_STATE_SIZE);
  return { index: dv.getUint32(STATE_INDEX, true), num: dv.getUint32(STATE_NUM, true) };
}

export function vringAddrPayload(a: VringAddr): Uint8Array {
  const b = new Uint8Array(VRING_ADDR_SIZE);
  const dv = view(b);
  dv.setUint32(ADDR_INDEX, a.index, true);
  dv.setUint32(ADDR_FLAGS, a.flags, true);
  dv.setBigUint64(ADDR_DESC, a.desc, true);
  dv.setBigUint64(ADDR_USED, a.used, true);
  dv.setBigUint64(ADDR_AVAIL, a.avail, true);
  dv.setBigUint64(ADDR_LOG, a.log, true);
  return b;
}

export function parseVringAddr(msg: VhostUserMessage): VringAddr {
  const dv = expectSize(msg, VRING_ADDR_SIZE);
  return {
    index: dv.getUint32(ADDR_INDEX, true),
    flags: dv.getUint32(ADDR_FLAGS, true),
    desc: dv.getBigUint64(ADDR_DESC, true),
    used: dv.getBigUint64(ADDR_USED, true),
    avail: dv.getBigUint64(ADDR_AVAIL, true),
    log: dv.getBigUint64(ADDR_LOG, true),
  };
}

export function memTablePayload(regions: MemRegion[]): Uint8Array {
  const b = new Uint8Array(MEM_REGIONS + regions.length * MEM_REGION_SIZE);
  const dv = view(b);
  dv.setUint32(MEM_NUM, regions.length, true);
  regions.forEach((r, i) => {
    const o = MEM_REGIONS + i * MEM_REGION_SIZE;
    dv.setBigUint64(o + REGION_GUEST, r.guestPhysAddr, true);
    dv.setBigUint64(o + REGION_SIZE, r.memorySize, true);
    dv.setBigUint64(o + REGION_USER, r.userspaceAddr, true);
    dv.setBigUint64(o + REGION_MMAP_OFFSET, r.mmapOffset, true);
  });
  return b;
}

/**
 * Regions of a SET_MEM_TABLE. Front ends send either exactly `num` regions or the whole
 * fixed array of VHOST_MEMORY_BASELINE_NREGIONS; both are accepted.
 */
export function parseMemTable(msg: VhostUserMessage): MemRegion[] {
  const p = msg.payload;
  if (p.length < MEM_REGIONS) throw new VhostUserProtocolError("SET_MEM_TABLE: payload too short");
  const dv = view(p);
  const num = dv.getUint32(MEM_NUM, true);
  if (num === 0 || num > VHOST_MEMORY_BASELINE_NREGIONS) {
    throw new VhostUserProtocolError(`SET_MEM_TABLE: ${num} regions (1..${VHOST_MEMORY_BASELINE_NREGIONS} allowed)`);
  }
  if (p.length < MEM_REGIONS + num * MEM_REGION_SIZE) {
    throw new VhostUserProtocolError(`SET_MEM_TABLE: payload of ${p.length} bytes cannot hold ${num} regions`);
  }
  const out: MemRegion[] = [];
  for (let i = 0; i < num; i++) {
    const o = MEM_REGIONS + i * MEM_REGION_SIZE;
    out.push({
      guestPhysAddr: dv.getBigUint64(o + REGION_GUEST, true),
      memorySize: dv.getBigUint64(o + REGION_SIZE, true),
      userspaceAddr: dv.getBigUint64(o + REGION_USER, true),
      mmapOffset: dv.getBigUint64(o + REGION_MMAP_OFFSET, true),
    });
  }
  return out;
}

export function configPayload(c: { offset: number; flags: number; data: Uint8Array }): Uint8Array {
  const b = new Uint8Array(CONFIG_HEADER_SIZE + c.data.length);
  const dv = view(b);
  dv.setUint32(CONFIG_OFFSET, c.offset, true);
  dv.setUint32(CONFIG_SIZE, c.data.length, true);
  dv.setUint32(CONFIG_FLAGS, c.flags, true);
  b.set(c.data, CONFIG_HEADER_SIZE);
  return b;
}

export function parseConfig(msg: VhostUserMessage): ConfigPayload {
  const p = msg.payload;
  if (p.length < CONFIG_HEADER_SIZE) throw new VhostUserProtocolError(`${requestName(msg.request)}: payload too short`);
  const dv = view(p);
  const offset = dv.getUint32(CONFIG_OFFSET, true);
  const size = dv.getUint32(CONFIG_SIZE, true);
  const flags = dv.getUint32(CONFIG_FLAGS, true);
  if (size > VHOST_USER_MAX_CONFIG_SIZE || p.length !== CONFIG_HEADER_SIZE + size) {
    throw new VhostUserProtocolError(
      `${requestName(msg.request)}: config size ${size} does not match payload of ${p.length} bytes`,
    );
  }
  return { offset, size, flags, data: p.slice(CONFIG_HEADER_SIZE) };
}
