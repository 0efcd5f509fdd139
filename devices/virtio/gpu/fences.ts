// Fence timelines (virtio 1.2 section 5.7.6.8). A command with VIRTIO_GPU_FLAG_FENCE is answered only
// once the backend has retired its fence. Fences belong to one global timeline, or, with
// VIRTIO_GPU_FLAG_INFO_RING_IDX (negotiated through VIRTIO_GPU_F_CONTEXT_INIT), to the timeline of
// (ctx_id, ring_idx). Within a timeline responses complete in the order the commands came; retiring
// fence N retires every fence <= N there. A fenced command that failed needs no fence of its own: it
// completes as soon as everything before it on its timeline has.

import type { Virtqueue } from "../queue.ts";
import type { GpuAccounting } from "./accounting.ts";
import type { FenceTimeline, GpuBackend } from "./backend.ts";
import {
  type CtrlHdr,
  ProtocolError,
  RESP_ERR_INVALID_PARAMETER,
  VIRTIO_GPU_F_CONTEXT_INIT,
  VIRTIO_GPU_FLAG_INFO_RING_IDX,
} from "./protocol.ts";

/** Rings per context a fence may name with INFO_RING_IDX (crosvm rutabaga: ring_idx < 64). */
export const MAX_RINGS = 64;

/** A response written into its chain but not yet put in the used ring. */
interface HeldResponse {
  fenceId: bigint;
  /** The command failed: it waits for nothing but the responses before it. */
  failed: boolean;
  queue: Virtqueue;
  head: number;
  len: number;
  ctxId: number;
  /** When the response began to wait (performance.now()). */
  heldAt: number;
}

/** The last fence retired on one timeline. */
export interface RetiredFence {
  timeline: FenceTimeline;
  fenceId: bigint;
}

/** What a held response waited for, and how long (for the trace). */
export interface HeldFor {
  fenceId: bigint;
  ctxId: number;
  /** Milliseconds from the command's answer to its fence's retirement. */
  ms: number;
  failed: boolean;
}

/** Puts a held response into its queue's used ring. */
export type CompleteResponse = (queue: Virtqueue, head: number, len: number, held: HeldFor) => void;

/** The timeline a command's fence belongs to. */
export function timelineOf(h: CtrlHdr): FenceTimeline {
  const perContext = (h.flags & VIRTIO_GPU_FLAG_INFO_RING_IDX) !== 0;
  return { ctxId: h.ctxId, ringIdx: perContext ? h.ringIdx : 0, perContext };
}

/** Throws ProtocolError when a command names a ring the driver may not use. */
export function checkRing(h: CtrlHdr, ackedFeatures: bigint): void {
  if (!(h.flags & VIRTIO_GPU_FLAG_INFO_RING_IDX)) return;
  if (!(ackedFeatures & VIRTIO_GPU_F_CONTEXT_INIT)) {
    throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, "INFO_RING_IDX without CONTEXT_INIT");
  }
  if (h.ringIdx >= MAX_RINGS) throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `ring_idx ${h.ringIdx}`);
}

function keyOf(t: FenceTimeline): string {
  return t.perContext ? `${t.ctxId}:${t.ringIdx}` : "global";
}

export class FenceTimelines {
  /** Held responses per timeline, in command order. */
  readonly #held = new Map<string, HeldResponse[]>();
  /** The highest fence retired per timeline. */
  readonly #retired = new Map<string, RetiredFence>();
  #pending = 0;
  readonly #backend: GpuBackend;
  readonly #accounting: GpuAccounting;
  readonly #complete: CompleteResponse;
  readonly #guestError: (msg: string) => void;

  constructor(
    backend: GpuBackend,
    accounting: GpuAccounting,
    complete: CompleteResponse,
    guestError: (msg: string) => void,
  ) {
    this.#backend = backend;
    this.#accounting = accounting;
    this.#complete = complete;
    this.#guestError = guestError;
  }

  /** Responses held for a fence. */
  get pending(): number {
    return this.#pending;
  }

  /**
   * A fenced command was answered into chain `head` of `queue` (`len` bytes): hold the response until its
   * fence retires (asking the backend for the fence unless the command failed).
   */
  hold(queue: Virtqueue, head: number, len: number, h: CtrlHdr, failed: boolean): void {
    const t = timelineOf(h);
    const key = keyOf(t);
    let list = this.#held.get(key);
    if (!list) this.#held.set(key, list = []);
    const held: HeldResponse = {
      fenceId: h.fenceId,
      failed,
      queue,
      head,
      len,
      ctxId: h.ctxId,
      heldAt: performance.now(),
    };
    list.push(held);
    this.#pending++;
    this.#accounting.fences.pending++;
    if (!failed) {
      this.#accounting.fences.created++;
      try {
        this.#backend.createFence(t, h.fenceId);
      } catch (e) {
        this.#guestError(
          `fence ${h.fenceId}: backend refused it (${e instanceof Error ? e.message : e}); answered now`,
        );
        held.failed = true;
      }
    }
    this.#drain(key);
  }

  /** The backend retired `fenceId` on `timeline` (and every fence before it there). */
  retire(timeline: FenceTimeline, fenceId: bigint): void {
    const key = keyOf(timeline);
    const prev = this.#retired.get(key);
    if (prev === undefined || fenceId > prev.fenceId) this.#retired.set(key, { timeline: { ...timeline }, fenceId });
    this.#accounting.fences.retired++;
    this.#drain(key);
  }

  /** The last fence retired on each timeline. */
  retired(): RetiredFence[] {
    return [...this.#retired.values()].map((r) => ({ timeline: { ...r.timeline }, fenceId: r.fenceId }));
  }

  /** Take saved retired fences (into timelines with nothing held). */
  restoreRetired(list: RetiredFence[]): void {
    this.#retired.clear();
    for (const r of list) this.#retired.set(keyOf(r.timeline), { timeline: { ...r.timeline }, fenceId: r.fenceId });
  }

  /** Device reset: drop every held response and what was retired. */
  clear(): void {
    this.#held.clear();
    this.#retired.clear();
    this.#pending = 0;
    this.#accounting.fences.pending = 0;
  }

  /** Complete held responses in order while the first one's fence has retired (or it failed). */
  #drain(key: string): void {
    const list = this.#held.get(key);
    if (!list) return;
    const retired = this.#retired.get(key)?.fenceId;
    while (list.length > 0) {
      const h = list[0];
      if (!h.failed && (retired === undefined || h.fenceId > retired)) break;
      list.shift();
      this.#pending--;
      this.#accounting.fences.pending--;
      this.#complete(h.queue, h.head, h.len, {
        fenceId: h.fenceId,
        ctxId: h.ctxId,
        ms: performance.now() - h.heldAt,
        failed: h.failed,
      });
    }
    if (list.length === 0) this.#held.delete(key);
  }
}
