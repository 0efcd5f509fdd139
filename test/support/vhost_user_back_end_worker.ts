// A vhost-user back end on a Worker, for tests of the front end (devices/vhost_user/front_end.ts), whose
// requests are synchronous and so cannot be answered by a back end on the same thread. Either denovm's own
// back end (devices/vhost_user/backend.ts) serving a block device on a file, or a scripted hostile one that
// answers the negotiation correctly except for the one misbehaviour it is asked for.
//
// From the test's side: `const b = await startBackEnd({ kind: "block", socket, path })`, then `b.close()`.

import {
  configPayload,
  encodeMessage,
  inflightPayload,
  parseConfig,
  parseInflight,
  parseVringState,
  readMessage,
  u64Payload,
  VHOST_USER_F_PROTOCOL_FEATURES,
  VHOST_USER_FLAG_NEED_REPLY,
  VHOST_USER_FLAG_REPLY,
  VHOST_USER_PROTOCOL_F_CONFIG,
  VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD,
  VHOST_USER_PROTOCOL_F_MQ,
  VHOST_USER_PROTOCOL_F_REPLY_ACK,
  VHOST_USER_VERSION,
  VhostUserRequest as R,
  vringStatePayload,
} from "../../devices/vhost_user/protocol.ts";
import { closeFd } from "../../ffi/libc.ts";
import { VIRTIO_F_VERSION_1 } from "../../devices/virtio/device.ts";

/** The Workers' name: how this module knows it runs as one. */
const WORKER_NAME = "denovm-test-vhost-user-back-end";
/** The Worker's global scope (this module is type-checked as a main-thread module). */
const scope = globalThis as unknown as {
  name?: string;
  postMessage(m: unknown): void;
  onmessage: ((e: MessageEvent) => void) | null;
};

/** The misbehaviours of the hostile back end. */
export type Hostility =
  /** GET_FEATURES answered with 4 bytes. */
  | "short-features"
  /** GET_PROTOCOL_FEATURES answered as if it were GET_FEATURES. */
  | "mismatched-reply"
  /** An unknown request code (999) in place of the GET_FEATURES reply. */
  | "unknown-reply"
  /** A header whose payload size is far over the limit. */
  | "huge-size"
  /** The connection closed right after SET_OWNER. */
  | "drop"
  /** GET_FEATURES never answered. */
  | "silent"
  /** GET_CONFIG answered with fewer bytes than asked. */
  | "config-size"
  /** GET_QUEUE_NUM answered with 2^40 queues. */
  | "queue-num"
  /** SET_MEM_TABLE (at DRIVER_OK) acknowledged with a failure status. */
  | "fail-mem-table"
  /** The connection closed at SET_MEM_TABLE (at DRIVER_OK). */
  | "drop-at-activate";

export type BackEndRequest =
  | { kind: "block"; socket: string; path: string }
  | { kind: "hostile"; socket: string; hostility: Hostility; configSize: number }
  | { kind: "recording"; socket: string };

/**
 * What the recording back end saw: each request of each session (connection), with SET_VRING_BASE's
 * number and the inode of the file an inflight request carried.
 */
export interface Recorded {
  session: number;
  request: number;
  num?: number;
  ino?: number;
}

/** Features the hostile back end offers: VERSION_1 and protocol features. */
const HOSTILE_FEATURES = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES;
const HOSTILE_PROTOCOL = VHOST_USER_PROTOCOL_F_MQ | VHOST_USER_PROTOCOL_F_REPLY_ACK | VHOST_USER_PROTOCOL_F_CONFIG;
const RECORDING_PROTOCOL = VHOST_USER_PROTOCOL_F_MQ | VHOST_USER_PROTOCOL_F_REPLY_ACK |
  VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD;
/** A request code no version of the protocol defines. */
const UNKNOWN_REQUEST = 999;
/** Queues the hostile back end's GET_QUEUE_NUM says it has. */
export const HOSTILE_QUEUES = 2n;

async function serveHostile(socket: string, hostility: Hostility): Promise<void> {
  const { UnixListener } = await import("../../core/unix_socket.ts");
  const listener = UnixListener.listen(socket);
  scope.postMessage({ listening: true });
  for (;;) {
    const sock = await listener.accept();
    const reply = (request: number, payload: Uint8Array) =>
      sock.send(encodeMessage(request, VHOST_USER_VERSION | VHOST_USER_FLAG_REPLY, payload));
    try {
      for (;;) {
        const msg = await readMessage(sock);
        msg.fds.forEach(closeFd);
        const ack = async (ok = true) => {
          if (msg.flags & VHOST_USER_FLAG_NEED_REPLY) await reply(msg.request, u64Payload(ok ? 0n : 1n));
        };
        switch (msg.request) {
          case R.SET_OWNER:
            if (hostility === "drop") throw new Error("drop");
            await ack();
            break;
          case R.GET_FEATURES:
            if (hostility === "silent") break;
            if (hostility === "short-features") await reply(R.GET_FEATURES, new Uint8Array(4));
            else if (hostility === "unknown-reply") await reply(UNKNOWN_REQUEST, u64Payload(HOSTILE_FEATURES));
            else if (hostility === "huge-size") {
              const hdr = encodeMessage(R.GET_FEATURES, VHOST_USER_VERSION | VHOST_USER_FLAG_REPLY);
              new DataView(hdr.buffer).setUint32(8, 1 << 30, true);
              await sock.send(hdr);
            } else await reply(R.GET_FEATURES, u64Payload(HOSTILE_FEATURES));
            break;
          case R.GET_PROTOCOL_FEATURES:
            await reply(
              hostility === "mismatched-reply" ? R.GET_FEATURES : R.GET_PROTOCOL_FEATURES,
              u64Payload(HOSTILE_PROTOCOL),
            );
            break;
          case R.GET_QUEUE_NUM:
            await reply(R.GET_QUEUE_NUM, u64Payload(hostility === "queue-num" ? 1n << 40n : HOSTILE_QUEUES));
            break;
          case R.GET_CONFIG: {
            const c = parseConfig(msg);
            const size = hostility === "config-size" ? Math.max(0, c.size - 4) : c.size;
            await reply(R.GET_CONFIG, configPayload({ offset: c.offset, flags: 0, data: new Uint8Array(size) }));
            break;
          }
          case R.GET_VRING_BASE:
            await reply(R.GET_VRING_BASE, vringStatePayload({ index: 0, num: 0 }));
            break;
          case R.SET_MEM_TABLE:
            if (hostility === "drop-at-activate") throw new Error("drop");
            await ack(hostility !== "fail-mem-table");
            break;
          default:
            await ack();
        }
      }
    } catch {
      // the front end went away, or this back end drops it
    } finally {
      sock.close();
    }
  }
}

/** Bytes of the inflight region the recording back end hands out. */
const INFLIGHT_REGION_SIZE = 4096;

/** The inode of what descriptor `fd` refers to. */
function inodeOf(fd: number): number {
  return Deno.statSync(`/proc/self/fd/${fd}`).ino ?? -1;
}

/**
 * A back end that offers INFLIGHT_SHMFD and one queue, answers every request, and reports each one
 * (Recorded) to the test; on the test's "die" it drops the current front end, as a back end that crashed.
 */
async function serveRecording(socket: string): Promise<void> {
  const { UnixListener } = await import("../../core/unix_socket.ts");
  const { check, cstr, libc, MFD_CLOEXEC } = await import("../../ffi/libc.ts");
  const listener = UnixListener.listen(socket);
  let current: { close(): void } | undefined;
  scope.onmessage = (e: MessageEvent) => {
    if (e.data?.die) current?.close();
  };
  scope.postMessage({ listening: true });
  for (let session = 0;; session++) {
    const sock = await listener.accept();
    current = sock;
    const reply = (request: number, payload: Uint8Array, fds: number[] = []) =>
      sock.send(encodeMessage(request, VHOST_USER_VERSION | VHOST_USER_FLAG_REPLY, payload), fds);
    try {
      for (;;) {
        const msg = await readMessage(sock);
        const rec: Recorded = { session, request: msg.request };
        switch (msg.request) {
          case R.GET_FEATURES:
            await reply(R.GET_FEATURES, u64Payload(HOSTILE_FEATURES));
            break;
          case R.GET_PROTOCOL_FEATURES:
            await reply(R.GET_PROTOCOL_FEATURES, u64Payload(RECORDING_PROTOCOL));
            break;
          case R.GET_QUEUE_NUM:
            await reply(R.GET_QUEUE_NUM, u64Payload(1n));
            break;
          case R.GET_INFLIGHT_FD: {
            const req = parseInflight(msg);
            const fd = check("memfd_create", libc().memfd_create(cstr("inflight"), MFD_CLOEXEC));
            check("ftruncate", libc().ftruncate(fd, BigInt(INFLIGHT_REGION_SIZE)));
            rec.ino = inodeOf(fd);
            await reply(
              R.GET_INFLIGHT_FD,
              inflightPayload({ ...req, mmapSize: BigInt(INFLIGHT_REGION_SIZE), mmapOffset: 0n }),
              [fd],
            );
            closeFd(fd);
            break;
          }
          case R.SET_INFLIGHT_FD:
            rec.ino = msg.fds.length === 1 ? inodeOf(msg.fds[0]) : -1;
            if (msg.flags & VHOST_USER_FLAG_NEED_REPLY) await reply(msg.request, u64Payload(0n));
            break;
          case R.SET_VRING_BASE:
            rec.num = parseVringState(msg).num;
            if (msg.flags & VHOST_USER_FLAG_NEED_REPLY) await reply(msg.request, u64Payload(0n));
            break;
          case R.GET_VRING_BASE:
            await reply(R.GET_VRING_BASE, vringStatePayload({ index: 0, num: 0 }));
            break;
          default:
            if (msg.flags & VHOST_USER_FLAG_NEED_REPLY) await reply(msg.request, u64Payload(0n));
        }
        msg.fds.forEach(closeFd);
        scope.postMessage({ record: rec });
      }
    } catch {
      // the front end went away, or the test killed this session
    } finally {
      sock.close();
    }
  }
}

async function serveBlock(socket: string, path: string): Promise<void> {
  const { VhostUserBackend } = await import("../../devices/vhost_user/backend.ts");
  const { BlockDevice } = await import("../../devices/virtio/block/device.ts");
  const device = new BlockDevice({ path, readOnly: false, sparse: true, blockSize: 512, direct: false, lock: false });
  const backend = new VhostUserBackend(device, socket, { log: (line) => scope.postMessage({ log: line }) });
  const served = backend.serve();
  await backend.listening;
  scope.postMessage({ listening: true });
  scope.onmessage = (e: MessageEvent) => {
    if (e.data?.close) backend.close();
    if (typeof e.data?.resize === "number") device.resize(e.data.resize);
  };
  await served;
  device.close();
  scope.postMessage({ closed: true });
}

/** A back end on a Worker; close() ends it. */
export interface BackEndWorker {
  /** Log lines the back end wrote. */
  lines: string[];
  /** What a recording back end saw. */
  records: Recorded[];
  /** A recording back end drops its current front end. */
  die(): void;
  /** A block back end's disk grows or shrinks to `bytes` (its device tells the front end). */
  resize(bytes: number): void;
  close(): Promise<void>;
}

/** Start a back end on a Worker and wait until it listens. */
export async function startBackEnd(req: BackEndRequest): Promise<BackEndWorker> {
  const worker = new Worker(import.meta.url, { type: "module", name: WORKER_NAME });
  const lines: string[] = [];
  const records: Recorded[] = [];
  const listening = Promise.withResolvers<void>();
  const closed = Promise.withResolvers<void>();
  worker.onmessage = (e: MessageEvent) => {
    if (e.data?.listening) listening.resolve();
    if (e.data?.log) lines.push(e.data.log);
    if (e.data?.closed) closed.resolve();
    if (e.data?.record) records.push(e.data.record);
  };
  worker.onerror = (e) => {
    e.preventDefault();
    listening.reject(new Error(`back-end worker: ${e.message}`));
  };
  worker.postMessage(req);
  await listening.promise;
  return {
    lines,
    records,
    die: () => worker.postMessage({ die: true }),
    resize: (bytes: number) => worker.postMessage({ resize: bytes }),
    async close() {
      if (req.kind === "block") {
        worker.postMessage({ close: true });
        await Promise.race([closed.promise, new Promise((r) => setTimeout(r, 2_000))]);
      }
      worker.terminate();
    },
  };
}

// The Worker's side.
if (scope.name === WORKER_NAME) {
  scope.onmessage = (e: MessageEvent<BackEndRequest>) => {
    const req = e.data;
    const run = req.kind === "block"
      ? serveBlock(req.socket, req.path)
      : req.kind === "recording"
      ? serveRecording(req.socket)
      : serveHostile(req.socket, req.hostility);
    run.catch((err) => scope.postMessage({ log: `back end: ${(err as Error).message}` }));
  };
}
