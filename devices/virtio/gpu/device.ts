// virtio-gpu (virtio 1.2 spec, section 5.7; Linux include/uapi/linux/virtio_gpu.h), transport-blind: the
// VirtioDevice face and the queue plumbing. Each chain on the control or cursor queue is read, decoded
// (protocol.ts), checked for the queue it came on, run by the executor (executor.ts) and answered; a
// fenced command's answer waits in the fence timelines (fences.ts) until the backend retires its fence.
// Every command is counted (accounting.ts) and traced (trace.ts), and so is every copy the display path
// makes (display.ts: read-backs when a consumer looks, bytes handed to display clients). Blob mappings go to the host-visible
// window (window.ts), which reaches KVM only through the SharedMemoryMapper the transport gives.
//
// Guest input is hostile: a bad command gets an ERR_* response and one (rate limited) log line, never
// an exception out of queueNotify.

import {
  type ActivateContext,
  type SharedMemoryMapper,
  type SharedMemoryRegion,
  VIRTIO_COMMON_FEATURES,
  VIRTIO_ID_GPU,
  type VirtioDevice,
} from "../device.ts";
import type { DescriptorChain, Virtqueue } from "../queue.ts";
import { RateLimitedLog } from "../../../core/log.ts";
import { type DeviceState, StateError, type Stateful } from "../../../core/state.ts";
import { type GpuBackend, GpuBackendError } from "./backend.ts";
import {
  commandName,
  type CtrlHdr,
  GPU_CFG_EVENTS_CLEAR,
  GPU_CFG_EVENTS_READ,
  GPU_CFG_NUM_CAPSETS,
  GPU_CFG_NUM_SCANOUTS,
  GPU_CONFIG_SIZE,
  HDR_SIZE,
  parseCommand,
  ProtocolError,
  readHdr,
  RESP_ERR_INVALID_PARAMETER,
  RESP_ERR_UNSPEC,
  responseHeader,
  VIRTIO_GPU_EVENT_DISPLAY,
  VIRTIO_GPU_F_CONTEXT_INIT,
  VIRTIO_GPU_F_EDID,
  VIRTIO_GPU_F_RESOURCE_BLOB,
  VIRTIO_GPU_F_VIRGL,
  VIRTIO_GPU_FLAG_FENCE,
  VIRTIO_GPU_MAX_SCANOUTS,
  VIRTIO_GPU_SHM_ID_HOST_VISIBLE,
} from "./protocol.ts";
import { GpuAccounting, type GpuStats } from "./accounting.ts";
import { GpuTrace } from "./trace.ts";
import { type DisplayConfig, HeadlessDisplay } from "./display.ts";
import { type Cursor, GpuExecutor, type Outcome } from "./executor.ts";
import { checkRing, FenceTimelines } from "./fences.ts";
import { DEFAULT_HOST_VISIBLE_WINDOW_SIZE, HostVisibleWindow } from "./window.ts";
import { decodeGpuState, encodeGpuState } from "./state.ts";
import { DEFAULT_DISPLAY_HEIGHT, DEFAULT_DISPLAY_WIDTH } from "./defaults.ts";

export type { DisplayConfig } from "./display.ts";

export { DEFAULT_DISPLAY_HEIGHT, DEFAULT_DISPLAY_WIDTH };
/** Control queue and cursor queue sizes (crosvm: 256 and 16). */
export const GPU_QUEUE_SIZES: readonly number[] = [256, 16];
export const CONTROL_QUEUE = 0;
export const CURSOR_QUEUE = 1;
/** Largest command read from a chain (SUBMIT_3D streams are far smaller: Mesa flushes at 256 KiB). */
export const MAX_COMMAND_BYTES = 16 * 1024 * 1024;

export interface GpuDeviceOptions {
  backend: GpuBackend;
  /** One entry per scanout (crosvm `displays=[[mode=windowed[W,H]]]`); default one 1280x1024. */
  displays?: DisplayConfig[];
  /**
   * Bytes of the host-visible window, shared-memory region 1, where RESOURCE_MAP_BLOB places blobs
   * (crosvm's `pci-bar-size`: crosvm puts the window in a PCI BAR; here it is a virtio-mmio region).
   */
  hostVisibleWindowSize?: number;
  /** Write a Chrome trace-event JSON file of every command. */
  tracePath?: string;
}

export class GpuDevice implements VirtioDevice, Stateful {
  readonly deviceType = VIRTIO_ID_GPU;
  readonly name = "gpu";
  readonly queueMaxSizes: readonly number[] = GPU_QUEUE_SIZES;
  readonly features: bigint;
  readonly backend: GpuBackend;
  readonly display: HeadlessDisplay;
  readonly accounting: GpuAccounting;
  readonly #window: HostVisibleWindow;
  readonly #modes: DisplayConfig[];
  readonly #log = new RateLimitedLog("virtio-gpu");
  readonly #trace: GpuTrace | null;
  readonly #executor: GpuExecutor;
  readonly #fences: FenceTimelines;
  #queues: (Virtqueue | undefined)[] = [];
  #interrupt: ActivateContext["interrupt"] | undefined;
  #acked = 0n;
  #eventsRead = 0;
  #inNotify = false;
  /** Queues with used entries the driver has not been interrupted for. */
  readonly #pendingSignal = new Set<number>();

  constructor(opts: GpuDeviceOptions) {
    this.backend = opts.backend;
    const modes = opts.displays?.length
      ? opts.displays
      : [{ width: DEFAULT_DISPLAY_WIDTH, height: DEFAULT_DISPLAY_HEIGHT }];
    if (modes.length > VIRTIO_GPU_MAX_SCANOUTS) {
      throw new Error(`gpu: ${modes.length} displays, at most ${VIRTIO_GPU_MAX_SCANOUTS}`);
    }
    for (const m of modes) {
      if (!Number.isInteger(m.width) || !Number.isInteger(m.height) || m.width < 1 || m.height < 1) {
        throw new Error(`gpu: display size ${m.width}x${m.height} is not positive integers`);
      }
    }
    this.#modes = modes.map((m) => ({ ...m }));
    this.#window = new HostVisibleWindow(opts.hostVisibleWindowSize ?? DEFAULT_HOST_VISIBLE_WINDOW_SIZE);
    this.accounting = new GpuAccounting(this.backend.name);
    this.display = new HeadlessDisplay(this.#modes, {
      read: (id, rect, layout) => this.backend.readPixels(id, rect, layout),
      accounting: this.accounting,
      log: (line) => this.#log.log(`display: ${line}`),
    });
    this.#trace = opts.tracePath ? new GpuTrace(opts.tracePath) : null;
    const trace = this.#trace;
    if (trace) {
      // The display path's copies in the same trace as the commands, on a track of their own.
      this.accounting.onDisplayCopy = (e) =>
        trace.add({
          name: e.kind === "readback" ? `SCANOUT_READBACK (${e.who})` : `DISPLAY_SEND (${e.who})`,
          ts: trace.now() - e.us,
          dur: e.us,
          resource: e.resourceId,
          bytes: e.bytes,
          ctx: 0,
          scanout: e.scanout,
        });
    }
    let f = VIRTIO_COMMON_FEATURES | VIRTIO_GPU_F_EDID | VIRTIO_GPU_F_RESOURCE_BLOB;
    if (this.backend.supportsVirgl) f |= VIRTIO_GPU_F_VIRGL | VIRTIO_GPU_F_CONTEXT_INIT;
    this.features = f;
    const guestError = (msg: string) => this.#guestError(msg);
    this.#executor = new GpuExecutor({
      backend: this.backend,
      display: this.display,
      accounting: this.accounting,
      window: this.#window,
      modes: this.#modes,
      guestError,
    });
    this.#fences = new FenceTimelines(this.backend, this.accounting, (q, head, len, held) => {
      q.addUsed(head, len);
      this.#pendingSignal.add(this.#queues.indexOf(q));
      const us = held.ms * 1000;
      if (!held.failed) {
        trace?.add({
          name: "FENCE",
          ts: trace.now() - us,
          dur: us,
          resource: 0,
          bytes: 0,
          ctx: held.ctxId,
          fence: held.fenceId,
        });
      }
    }, guestError);
    this.backend.setFenceHandler((t, id) => {
      this.#fences.retire(t, id);
      if (!this.#inNotify) this.#signal();
    });
  }

  /** Bytes of the host-visible window (shared-memory region 1). */
  get hostVisibleWindowSize(): number {
    return this.#window.size;
  }

  // ---- VirtioDevice ----

  readConfig(offset: number, data: Uint8Array): void {
    const b = new Uint8Array(GPU_CONFIG_SIZE);
    const v = new DataView(b.buffer);
    v.setUint32(GPU_CFG_EVENTS_READ, this.#eventsRead, true);
    v.setUint32(GPU_CFG_EVENTS_CLEAR, 0, true);
    v.setUint32(GPU_CFG_NUM_SCANOUTS, this.#modes.length, true);
    v.setUint32(GPU_CFG_NUM_CAPSETS, this.backend.supportsVirgl ? this.backend.capsets().length : 0, true);
    data.fill(0);
    if (offset < 0 || offset >= b.length) return;
    data.set(b.subarray(offset, offset + data.length));
  }

  writeConfig(offset: number, data: Uint8Array): void {
    // Only events_clear is writable (virtio 1.2 section 5.7.4): it clears the bits written.
    if (offset === GPU_CFG_EVENTS_CLEAR && data.length === 4) {
      this.#eventsRead &= ~new DataView(data.buffer, data.byteOffset, 4).getUint32(0, true);
      return;
    }
    this.#guestError(`driver wrote ${data.length} bytes of config at ${offset}; ignored`);
  }

  activate(ctx: ActivateContext): void {
    this.#queues = ctx.queues;
    this.#interrupt = ctx.interrupt;
    this.#acked = ctx.ackedFeatures;
    this.#executor.activate(ctx.mem, ctx.ackedFeatures);
  }

  reset(): void {
    this.#dropAll();
    this.#executor.deactivate();
    this.#queues = [];
    this.#interrupt = undefined;
    this.#acked = 0n;
  }

  sharedMemoryRegions(): SharedMemoryRegion[] {
    return this.backend.supportsHostBlobs ? [{ id: VIRTIO_GPU_SHM_ID_HOST_VISIBLE, size: this.#window.size }] : [];
  }

  setSharedMemoryMapper(mapper: SharedMemoryMapper): void {
    this.#window.setMapper(mapper);
  }

  close(): void {
    this.#dropAll();
    this.#trace?.close();
    this.backend.close();
  }

  stats(): Record<string, number> {
    const t = this.accounting.totals;
    return {
      commands: t.commands,
      bytesCopied: t.bytesCopied,
      transferToHostBytes: t.transferToHostBytes,
      transferFromHostBytes: t.transferFromHostBytes,
      streamToHostBytes: t.streamToHostBytes,
      streamFromHostBytes: t.streamFromHostBytes,
      copyTransferToHostBytes: t.copyTransferToHostBytes,
      copyTransferFromHostBytes: t.copyTransferFromHostBytes,
      inlineWriteBytes: t.inlineWriteBytes,
      scanoutReadbackBytes: t.scanoutReadbackBytes,
      displaySentBytes: t.displaySentBytes,
      blobMaps: t.blobMaps,
      blobMappedBytes: t.blobMappedBytes,
      copiesAvoidedBytes: t.copiesAvoidedBytes,
      mappedNow: this.accounting.mapped.count,
      guestErrors: this.#log.count,
    };
  }

  // ---- Library API ----

  /** Live counters: totals, per resource, per context, per command type (JSON-able). */
  gpuStats(): GpuStats {
    return this.accounting.stats();
  }

  /** A human summary of the copy counters. */
  summary(): string {
    return this.accounting.summary();
  }

  /** A PNG of scanout `id`. */
  screenshot(id = 0): Promise<Uint8Array> {
    return this.display.screenshot(id);
  }

  /** The cursor as the guest last set it, or null. */
  get cursor(): Readonly<Cursor> | null {
    return this.#executor.cursor;
  }

  /** Sees every guest-error line, before rate limiting (tests, a debug CLI). */
  guestErrorLine: ((line: string) => void) | undefined;

  #guestError(msg: string): void {
    this.guestErrorLine?.(`virtio-gpu: ${msg}`);
    this.#log.log(msg);
  }

  /** Guest errors logged so far (rate-limited log's count). */
  get guestErrors(): number {
    return this.#log.count;
  }

  /** Raise a display-change event (e.g. after a resize): sets events_read and signals config change. */
  displayChanged(): void {
    this.#eventsRead |= VIRTIO_GPU_EVENT_DISPLAY;
    this.#interrupt?.signalConfigChange();
  }

  // ---- Saved state ----

  /** True when no fenced response is held and no command is being served. */
  quiescent(): boolean {
    return !this.#inNotify && this.#fences.pending === 0;
  }

  /**
   * The device's state (state.ts says what it holds). Throws StateError while fenced responses are held,
   * and when the renderer holds 3D state (contexts, 3D resources, host blobs, mappings).
   */
  saveState(): DeviceState {
    if (!this.quiescent()) {
      throw new StateError(`virtio-gpu: ${this.#fences.pending} fenced commands are waiting for their fences`);
    }
    return encodeGpuState({
      modes: this.#modes,
      eventsRead: this.#eventsRead,
      ...this.#executor.save(),
      fences: this.#fences.retired(),
    });
  }

  /**
   * Take a saved state into this device, which has no resources yet: the 2D resources, GUEST blobs,
   * scanouts, cursor and fence timelines. Backing pages are attached now if the device is active, else at
   * activation (the transport's restore activates it).
   */
  restoreState(state: DeviceState): void {
    const s = decodeGpuState(state, this.#modes);
    this.#executor.restore(s);
    this.#fences.restoreRetired(s.fences);
    this.#eventsRead = s.eventsRead;
  }

  // ---- Queues ----

  queueNotify(index: number): void {
    const q = this.#queues[index];
    if (!q || (index !== CONTROL_QUEUE && index !== CURSOR_QUEUE)) return;
    this.#inNotify = true;
    try {
      for (;;) {
        const chain = q.pop();
        if (!chain) break;
        this.#serve(q, index, chain);
      }
      this.backend.poll?.();
    } finally {
      this.#inNotify = false;
    }
    this.#pendingSignal.add(index);
    this.#signal();
  }

  #signal(): void {
    for (const i of this.#pendingSignal) {
      const q = this.#queues[i];
      if (q?.needsInterrupt()) this.#interrupt?.signalUsedQueue(i);
    }
    this.#pendingSignal.clear();
  }

  /** Serve one chain: decode, execute, answer now or hold until its fence retires. */
  #serve(q: Virtqueue, index: number, chain: DescriptorChain): void {
    const t0 = performance.now();
    let hdr: CtrlHdr | undefined;
    let out: Outcome;
    let name = "INVALID";
    let ok = true;
    let errName: string | undefined;
    try {
      if (chain.readableLength > MAX_COMMAND_BYTES) {
        throw new ProtocolError(RESP_ERR_INVALID_PARAMETER, `command of ${chain.readableLength} bytes`);
      }
      const bytes = chain.reader().read(chain.readableLength);
      if (bytes.length >= HDR_SIZE) {
        hdr = readHdr(new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength));
        name = commandName(hdr.type);
      }
      const cmd = parseCommand(bytes);
      const cursorCmd = cmd.kind === "update_cursor" || cmd.kind === "move_cursor";
      if (cursorCmd !== (index === CURSOR_QUEUE)) {
        throw new ProtocolError(
          RESP_ERR_UNSPEC,
          `${name} on the ${index === CURSOR_QUEUE ? "cursor" : "control"} queue`,
        );
      }
      checkRing(cmd.hdr, this.#acked);
      out = this.#executor.execute(cmd);
    } catch (e) {
      ok = false;
      const code = e instanceof ProtocolError || e instanceof GpuBackendError ? e.response : RESP_ERR_UNSPEC;
      if (!(e instanceof ProtocolError || e instanceof GpuBackendError)) {
        this.#guestError(`${name}: internal error: ${e instanceof Error ? e.stack ?? e.message : e}`);
      } else {
        this.#guestError(`${name}: ${e.message}`);
      }
      errName = `0x${code.toString(16)}`;
      out = { resp: responseHeader(code, hdr), resource: 0, bytes: 0 };
    }
    const len = this.#writeResponse(chain, out.resp, name);
    const us = (performance.now() - t0) * 1000;
    this.accounting.command(name, ok, out.bytes, us);
    // Per-id counters only for ids that exist: a hostile guest must not grow the tables at will.
    const ctxKnown = hdr && this.#executor.hasContext(hdr.ctxId) ? hdr.ctxId : 0;
    this.accounting.touch(this.#executor.hasResource(out.resource) ? out.resource : 0, ctxKnown);
    this.#trace?.add({
      name,
      ts: this.#trace.now() - us,
      dur: us,
      resource: out.resource,
      bytes: out.bytes,
      ctx: hdr?.ctxId ?? 0,
      error: errName,
    });
    if (hdr && (hdr.flags & VIRTIO_GPU_FLAG_FENCE)) this.#fences.hold(q, chain.head, len, hdr, !ok);
    else q.addUsed(chain.head, len);
  }

  #writeResponse(chain: DescriptorChain, resp: Uint8Array, name: string): number {
    const w = chain.writer();
    const n = Math.min(resp.length, w.remaining);
    if (n < resp.length && w.remaining > 0) {
      this.#guestError(`${name}: response of ${resp.length} bytes cut to the ${n} writable bytes`);
    }
    try {
      if (n > 0) w.write(resp.subarray(0, n));
    } catch (e) {
      this.#guestError(`${name}: response not written: ${e instanceof Error ? e.message : e}`);
      return 0;
    }
    return n;
  }

  /** Device reset or close: the executor drops everything, held responses are forgotten, events cleared. */
  #dropAll(): void {
    this.#executor.dropAll();
    this.#fences.clear();
    this.#eventsRead = 0;
  }
}
