// Shared pieces of the GPU benchmarks (bench/gpu_copies.ts, bench/gpu_map.ts): a GpuDevice driven through
// virtio-mmio registers by the test driver (test/support/virtio_driver.ts), no VM, with a test mapper
// standing in for the KVM memory slots the VMM installs in the host-visible window.

import { GpuDevice } from "../devices/virtio/gpu/device.ts";
import type { GpuBackend } from "../devices/virtio/gpu/backend.ts";
import * as P from "../devices/virtio/gpu/protocol.ts";
import { VirtioMmioTransport } from "../devices/virtio/mmio.ts";
import type { SharedMemoryMapper } from "../devices/virtio/device.ts";
import { GuardedGuestMemory, VirtioTestDriver } from "../test/support/virtio_driver.ts";
import {
  createHostBlob as createHostBlobCmd,
  ctxCreate,
  hostBufferStream,
  submit,
} from "../test/support/gpu_commands.ts";

export const MiB = 1024 * 1024;

/**
 * Stands in for the VMM's mapper (KVM memory slots in the window): records live mappings, refuses overlaps
 * and, when `maxSlots` is set, refuses past that many live mappings as KVM does when it runs out of slots.
 */
export class TestMapper implements SharedMemoryMapper {
  readonly live = new Map<number, { hostAddr: bigint; length: number }>();
  adds = 0;
  removes = 0;
  constructor(readonly maxSlots = Infinity) {}
  addMapping(_id: number, offset: number, hostAddr: bigint, length: number): void {
    if (this.live.size >= this.maxSlots) throw new Error(`no free memory slot (${this.maxSlots} in use)`);
    if (this.live.has(offset)) throw new Error(`offset 0x${offset.toString(16)} already mapped`);
    this.live.set(offset, { hostAddr, length });
    this.adds++;
  }
  removeMapping(_id: number, offset: number): void {
    if (!this.live.delete(offset)) throw new Error(`offset 0x${offset.toString(16)} not mapped`);
    this.removes++;
  }
  /** The host bytes of the mapping at `offset` (what the guest sees through the window there). */
  view(offset: number): Uint8Array {
    const m = this.live.get(offset);
    if (!m) throw new Error(`offset 0x${offset.toString(16)} not mapped`);
    return new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(Deno.UnsafePointer.create(m.hostAddr)!, m.length));
  }
}

/** A GpuDevice on virtio-mmio with the test driver; commands answered synchronously (no fences). */
export class GpuRig {
  readonly g: GuardedGuestMemory;
  readonly dev: GpuDevice;
  readonly drv: VirtioTestDriver;
  readonly mapper: TestMapper;
  readonly acked: bigint;
  readonly #base: number;

  /**
   * Guest RAM of `guestBytes` from 0: rings and command buffers below `arenaEnd`, the rest free for
   * resource backing (the caller places it).
   */
  constructor(opts: {
    backend: GpuBackend;
    guestBytes: number;
    arenaEnd: number;
    displays?: { width: number; height: number }[];
    mapper?: TestMapper;
  }) {
    this.g = new GuardedGuestMemory([{ start: 0, size: opts.guestBytes }]);
    this.dev = new GpuDevice({ backend: opts.backend, displays: opts.displays });
    this.mapper = opts.mapper ?? new TestMapper();
    this.dev.setSharedMemoryMapper(this.mapper);
    const t = new VirtioMmioTransport(this.dev, this.g.mem, { irq: { trigger: () => {} } });
    // Page-aligned arena start: the first page stays unused, as guest page 0 usually is.
    this.drv = new VirtioTestDriver(t, this.g.mem, { start: 0x1000, end: opts.arenaEnd });
    this.acked = this.drv.init();
    this.#base = this.drv.alloc.mark();
  }

  /** Send one control command, expect it answered now; returns the response type and bytes. */
  send(c: Uint8Array, respLen = 256): { type: number; bytes: Uint8Array } {
    const q = this.drv.queues[0];
    const sub = q.submit([c, respLen]);
    this.drv.kick(0);
    const used = q.used();
    this.drv.alloc.resetTo(this.#base);
    if (used.length !== 1 || used[0].id !== sub.head) {
      throw new Error(`${P.commandName(new DataView(c.buffer).getUint32(0, true))} was not answered at once`);
    }
    const bytes = this.g.mem.read(sub.buffers[1].addr, used[0].len);
    return { type: bytes.length >= 4 ? new DataView(bytes.buffer).getUint32(0, true) : 0, bytes };
  }

  /** Send and require response `expect` (RESP_OK_NODATA by default). */
  ok(c: Uint8Array, expect = P.RESP_OK_NODATA): Uint8Array {
    const r = this.send(c);
    if (r.type !== expect) {
      const name = P.commandName(new DataView(c.buffer).getUint32(0, true));
      throw new Error(`${name}: response 0x${r.type.toString(16)}, expected 0x${expect.toString(16)}`);
    }
    return r.bytes;
  }

  close(): void {
    const intact = this.g.canaryIntact();
    this.dev.close();
    this.g.close();
    if (!intact) throw new Error("the device touched memory outside the guest");
  }
}

/** Requires VIRGL and RESOURCE_BLOB both negotiated, then creates 3D context `ctxId` (CTX_CREATE). */
export function createVirglContext(rig: GpuRig, ctxId: number): void {
  if (!(rig.acked & P.VIRTIO_GPU_F_VIRGL) || !(rig.acked & P.VIRTIO_GPU_F_RESOURCE_BLOB)) {
    throw new Error("VIRGL and RESOURCE_BLOB not both negotiated");
  }
  rig.ok(ctxCreate(ctxId));
}

/**
 * Resource `id`: a HOST3D mappable buffer blob of `size` bytes in context `ctxId`, created the way Mesa's
 * virgl driver does (a PIPE_RESOURCE_CREATE with `blobId` in SUBMIT_3D, then RESOURCE_CREATE_BLOB).
 */
export function createHostBlob(rig: GpuRig, ctxId: number, id: number, blobId: number, size: number): void {
  rig.ok(submit(ctxId, hostBufferStream(blobId, size)));
  rig.ok(createHostBlobCmd(ctxId, id, blobId, size));
}
