// The transport-blind virtio device interface. A device model implements
// VirtioDevice; a transport (virtio-mmio in the VMM, or a vhost-user backend)
// translates registers or protocol messages into these calls.

import type { GuestMemory } from "../../core/memory.ts";
import type { DescriptorChain, Virtqueue } from "./queue.ts";
import { stateBytes, StateError, stateNumber, stateRecord, stateString, type StateValue } from "../../core/state.ts";

/** Device IDs (virtio 1.2 spec, section 5 "Device Types"). */
export const VIRTIO_ID_NET = 1;
export const VIRTIO_ID_BLOCK = 2;
export const VIRTIO_ID_CONSOLE = 3;
export const VIRTIO_ID_RNG = 4;
export const VIRTIO_ID_BALLOON = 5;
export const VIRTIO_ID_GPU = 16;
export const VIRTIO_ID_INPUT = 18;
export const VIRTIO_ID_VSOCK = 19;
export const VIRTIO_ID_PMEM = 27;
/** virtio-snd (virtio 1.2 spec, section 5.14). */
export const VIRTIO_ID_SOUND = 25;
/** virtio 1.2 §5.11: the file system device (virtio-fs). */
export const VIRTIO_ID_FS = 26;

/** Reserved feature bits (virtio 1.2 spec, section 6 "Reserved Feature Bits"). */
export const VIRTIO_F_INDIRECT_DESC = 1n << 28n;
export const VIRTIO_F_EVENT_IDX = 1n << 29n;
export const VIRTIO_F_VERSION_1 = 1n << 32n;
export const VIRTIO_F_ACCESS_PLATFORM = 1n << 33n;
export const VIRTIO_F_RING_PACKED = 1n << 34n;
/** Feature bits every denovm device offers on top of its own. */
export const VIRTIO_COMMON_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX;

/** How a device raises interrupts; the transport decides how (irqfd, vhost-user call fd). */
export interface VirtioInterrupt {
  /** The device put buffers in the used ring of queue `index`. */
  signalUsedQueue(index: number): void;
  /** The device changed its configuration space. */
  signalConfigChange(): void;
}

/** A shared-memory region a device offers (virtio 1.2 section 2.10), e.g. the GPU's host-visible window. */
export interface SharedMemoryRegion {
  id: number;
  size: number;
}

/** Installs host memory into a device's shared-memory region; owned by the VMM, not the device. */
export interface SharedMemoryMapper {
  /** Map `length` bytes at host address `hostAddr` at `offset` into region `id`. */
  addMapping(id: number, offset: number, hostAddr: bigint, length: number, writable: boolean): void;
  /** Remove the mapping that starts at `offset`. */
  removeMapping(id: number, offset: number): void;
}

/** What a device receives when the driver sets DRIVER_OK. */
export interface ActivateContext {
  mem: GuestMemory;
  /** Enabled queues, by index; a queue the driver did not enable is undefined. */
  queues: (Virtqueue | undefined)[];
  ackedFeatures: bigint;
  interrupt: VirtioInterrupt;
  /**
   * The queues continue from a saved state, and the device's own state was restored before
   * (Stateful.restoreState): carry on from it instead of starting afresh.
   */
  restored?: boolean;
  /**
   * The transport's per-queue QueueNotify ioeventfds (KVM signals queue i's when the guest writes i to
   * QueueNotify) and its irqfd (a write interrupts the guest), for a device that serves its queues out of
   * process (VirtioDevice.servesQueuesOutOfProcess): it hands them to the process that serves the rings.
   * The transport keeps owning them.
   */
  notifyFds?: readonly number[];
  irqFd?: number;
}

export interface VirtioDevice {
  /** Virtio device ID. */
  readonly deviceType: number;
  /** Short name for logs and counters ("block", "net"...). */
  readonly name: string;
  /** Maximum size of each queue; the length is the number of queues. */
  readonly queueMaxSizes: readonly number[];
  /** Feature bits offered (device-specific | VIRTIO_COMMON_FEATURES). */
  readonly features: bigint;
  /** Read device configuration space at `offset` into `data`. Out-of-range bytes read as 0. */
  readConfig(offset: number, data: Uint8Array): void;
  /** Driver writes to configuration space; ignored where the spec makes fields read-only. */
  writeConfig(offset: number, data: Uint8Array): void;
  /** DRIVER_OK: start serving queues. */
  activate(ctx: ActivateContext): void;
  /** The driver kicked queue `index`. */
  queueNotify(index: number): void;
  /** Device reset by the driver (status 0) or front end disconnect; drop all queue state. */
  reset(): void;
  /** Shared-memory regions, if the device has any. */
  sharedMemoryRegions?(): SharedMemoryRegion[];
  /** Given before activation when the device has shared-memory regions. */
  setSharedMemoryMapper?(mapper: SharedMemoryMapper): void;
  /**
   * The size of a guest-physical window the device needs that is no virtio shared-memory region (virtio-pmem's
   * memory, whose address its configuration space carries), if it needs one.
   */
  memoryWindowSize?(): number;
  /** Given before activation when the device needs a window: its base, and a mapper for it (region id 0). */
  setMemoryWindow?(base: number, mapper: SharedMemoryMapper): void;
  /** Release host resources (files, sockets) at VM exit. */
  close?(): void;
  /** Counters for stats (bytes, requests, errors). */
  stats?(): Record<string, number>;
  /**
   * The device's rings are served by another process (a vhost-user back end) that reads the kick
   * ioeventfds and writes the irqfd itself: the VMM's notify loop leaves its ioeventfds alone, and its
   * transport reports a used-buffer interrupt in InterruptStatus on every interrupt (it cannot see the
   * back end's irqfd writes).
   */
  readonly servesQueuesOutOfProcess?: boolean;
}

// ---- Helpers the device models share ----

/**
 * VirtioDevice.readConfig over a device's configuration space `cfg`: copies it from `offset` into
 * `data`; bytes outside it read as 0.
 */
export function readConfigSpace(cfg: Uint8Array, offset: number, data: Uint8Array): void {
  data.fill(0);
  if (offset < 0 || offset >= cfg.length) return;
  data.set(cfg.subarray(offset, offset + data.length));
}

/**
 * Serves every available chain of queue `index` (`q`) in order: `serve` handles one chain and returns
 * the number of bytes it wrote into it, which goes to the used ring with the chain. Then interrupts the
 * driver if it wants an interrupt for what was used (Virtqueue.needsInterrupt).
 */
export function serveQueue(
  q: Virtqueue,
  index: number,
  interrupt: VirtioInterrupt | undefined,
  serve: (chain: DescriptorChain) => number,
): void {
  for (let chain = q.pop(); chain; chain = q.pop()) q.addUsed(chain.head, serve(chain));
  if (q.needsInterrupt()) interrupt?.signalUsedQueue(index);
}

// ---- Device state helpers ----

/** True when no live queue has a chain taken and not completed. */
export function queuesQuiescent(queues: readonly (Virtqueue | undefined)[]): boolean {
  return queues.every((q) => q?.quiescent() ?? true);
}

/** Feature bits as a state field (state records have no 64-bit integers). */
export function featuresField(features: bigint): string {
  return `0x${features.toString(16)}`;
}

/**
 * Checks that the saved feature offer and configuration space are this device's own (a restore goes
 * into a device built from the same configuration); throws StateError naming the difference.
 */
export function checkSavedIdentity(
  what: string,
  d: { [key: string]: StateValue },
  features: bigint,
  config: Uint8Array,
): void {
  const saved = stateString(d.features, `${what} features`);
  if (saved !== featuresField(features)) {
    throw new StateError(`${what}: saved features ${saved}, this device offers ${featuresField(features)}`);
  }
  const cfg = stateBytes(d.config, `${what} config`);
  if (cfg.length !== config.length || cfg.some((b, i) => b !== config[i])) {
    throw new StateError(`${what}: the saved configuration space differs from this device's (another configuration?)`);
  }
}

/** A device's counters from a state field: each of `names` as a non-negative safe integer. */
export function stateCounters<N extends string>(
  value: StateValue | undefined,
  names: readonly N[],
  what: string,
): Record<N, number> {
  const r = stateRecord(value, `${what} counters`);
  const out = {} as Record<N, number>;
  for (const n of names) {
    const v = stateNumber(r[n], `${what} counter ${n}`, 0, Number.MAX_SAFE_INTEGER);
    if (!Number.isInteger(v)) throw new StateError(`${what} counter ${n}: ${v} is not an integer`);
    out[n] = v;
  }
  return out;
}

/** An integer field of a state record within [min, max]; throws StateError otherwise. */
export function stateInteger(value: StateValue | undefined, what: string, min: number, max: number): number {
  const v = stateNumber(value, what, min, max);
  if (!Number.isInteger(v)) throw new StateError(`${what}: ${v} is not an integer`);
  return v;
}
