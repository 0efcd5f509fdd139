// virtio-pmem driven through the virtio-mmio registers by the test driver: the configuration space, the
// file's mapping (what the guest reads is the file, what it writes reaches the file), the window given to
// the mapper, flushes answered only after the file's sync, and bad requests answered with an error.

import assert from "node:assert/strict";
import {
  PMEM_CONFIG_BYTES,
  PMEM_CONFIG_SIZE,
  PMEM_CONFIG_START,
  PMEM_SIZE_ALIGN,
  PMEM_WINDOW_ID,
  PmemDevice,
  pmemWindowSize,
  VIRTIO_PMEM_REQ_TYPE_FLUSH,
  VIRTIO_PMEM_RESP_TYPE_EIO,
  VIRTIO_PMEM_RESP_TYPE_OK,
} from "./pmem.ts";
import { VIRTIO_MMIO_DEVICE_ID } from "./mmio.ts";
import { type SharedMemoryMapper, VIRTIO_F_VERSION_1, VIRTIO_ID_PMEM } from "./device.ts";
import { VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE } from "./queue.ts";
import { GuardedGuestMemory, type Segment } from "../../test/support/virtio_driver.ts";
import {
  assertRefused,
  captureVirtioLog,
  closeDeviceRig,
  mmioRig,
  saveAndRestore,
  withData,
} from "../../test/support/device_rig.ts";
import { ConfigError, ExitCodeError, HostError } from "../../core/exit.ts";
import { StateError } from "../../core/state.ts";

const MiB = 1024 * 1024;
/** Where the test places the window (any guest address above the test's RAM). */
const WINDOW_BASE = 64 * 1024 * MiB;

function u32(v: number): Uint8Array {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, v, true);
  return b;
}

/** A file of `size` bytes holding `text` at its start, in a fresh temp dir. */
function tempFile(size: number, text = ""): string {
  const dir = Deno.makeTempDirSync({ prefix: "denovm-pmem-" });
  const path = `${dir}/pmem.img`;
  const f = Deno.openSync(path, { create: true, write: true });
  f.truncateSync(size);
  f.writeSync(new TextEncoder().encode(text));
  f.close();
  return path;
}

/** A mapper that records what the device asks for. */
function recordingMapper() {
  const calls: { id: number; offset: number; hostAddr: bigint; length: number; writable: boolean }[] = [];
  const removed: number[] = [];
  const mapper: SharedMemoryMapper = {
    addMapping: (id, offset, hostAddr, length, writable) => calls.push({ id, offset, hostAddr, length, writable }),
    removeMapping: (id) => removed.push(id),
  };
  return { mapper, calls, removed };
}

/** A sync the test releases by hand, counting calls. */
function heldSync() {
  const waiting: { resolve: () => void; reject: (e: Error) => void }[] = [];
  return {
    calls: 0,
    waiting,
    sync(): Promise<void> {
      this.calls++;
      return new Promise<void>((resolve, reject) => waiting.push({ resolve, reject }));
    },
  };
}

/** Lets the device's promise callbacks run. */
const settle = () => new Promise((r) => setTimeout(r, 0));

function rig(opts: { readOnly?: boolean; size?: number; text?: string; sync?: () => Promise<void> } = {}) {
  const path = tempFile(opts.size ?? 3 * MiB + 100, opts.text ?? "hello from the host\n");
  const dev = new PmemDevice({ path, readOnly: opts.readOnly ?? false, sync: opts.sync });
  const m = recordingMapper();
  dev.setMemoryWindow(WINDOW_BASE, m.mapper);
  const g = new GuardedGuestMemory([{ start: 0, size: 4 * MiB }]);
  const { t, drv, irqs } = mmioRig(dev, g.mem, 4 * MiB);
  drv.init();
  const log = captureVirtioLog();
  const mark = drv.alloc.mark();
  return {
    path,
    dev,
    t,
    drv,
    g,
    irqs,
    m,
    lines: log.lines,
    /** Submit one chain and kick; its head and its writable buffers. */
    submit(segs: Segment[]) {
      const sub = drv.queues[0].submit(segs);
      drv.kick(0);
      return sub;
    },
    reset() {
      drv.alloc.resetTo(mark);
    },
    used() {
      return drv.queues[0].used();
    },
    /** The le32 status the device wrote into a submitted chain's first writable buffer. */
    status(sub: { buffers: { addr: number; len: number; writable: boolean }[] }): number {
      const w = sub.buffers.find((b) => b.writable)!;
      return g.mem.getU32(w.addr);
    },
    [Symbol.dispose]() {
      closeDeviceRig(log, g, dev);
      Deno.removeSync(path.slice(0, path.lastIndexOf("/")), { recursive: true });
    },
  };
}

Deno.test("pmem: device id, features, and the configuration space holds the window's start and size", () => {
  using r = rig({ size: 3 * MiB + 100 });
  assert.equal(r.drv.readReg(VIRTIO_MMIO_DEVICE_ID), VIRTIO_ID_PMEM);
  assert.ok(r.drv.deviceFeatures() & VIRTIO_F_VERSION_1);
  const cfg = r.drv.readConfig(0, PMEM_CONFIG_BYTES);
  const v = new DataView(cfg.buffer, cfg.byteOffset);
  assert.equal(v.getBigUint64(PMEM_CONFIG_START, true), BigInt(WINDOW_BASE));
  // 3 MiB + 100 bytes rounds up to 4 MiB (crosvm's 2 MiB alignment).
  assert.equal(v.getBigUint64(PMEM_CONFIG_SIZE, true), BigInt(4 * MiB));
  assert.equal(r.dev.size, 4 * MiB);
  assert.equal(r.dev.fileSize, 3 * MiB + 100);
  // Past the end reads as zeros; a driver's write changes nothing and logs one line.
  assert.deepEqual([...r.drv.readConfig(PMEM_CONFIG_BYTES, 4)], [0, 0, 0, 0]);
  r.t.write(0x100, new Uint8Array(8).fill(0xff));
  assert.deepEqual(r.drv.readConfig(0, PMEM_CONFIG_BYTES), cfg);
  assert.equal(r.lines.length, 1);
});

Deno.test("pmem: window sizes are the file's size rounded up to 2 MiB", () => {
  assert.equal(pmemWindowSize(1), PMEM_SIZE_ALIGN);
  assert.equal(pmemWindowSize(PMEM_SIZE_ALIGN), PMEM_SIZE_ALIGN);
  assert.equal(pmemWindowSize(PMEM_SIZE_ALIGN + 1), 2 * PMEM_SIZE_ALIGN);
});

Deno.test("pmem: the window is one writable mapping of the file; guest stores reach the file", () => {
  using r = rig({ size: MiB + 10, text: "hello from the host\n" });
  assert.equal(r.m.calls.length, 1);
  const c = r.m.calls[0];
  assert.deepEqual({ id: c.id, offset: c.offset, length: c.length, writable: c.writable }, {
    id: PMEM_WINDOW_ID,
    offset: 0,
    length: 2 * MiB,
    writable: true,
  });
  const view = new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(Deno.UnsafePointer.create(c.hostAddr)!, c.length));
  assert.equal(new TextDecoder().decode(view.subarray(0, 20)), "hello from the host\n");
  // What the guest stores in the window is the file's.
  view.set(new TextEncoder().encode("written by the guest"), 4096);
  const file = Deno.readFileSync(r.path);
  assert.equal(new TextDecoder().decode(file.subarray(4096, 4096 + 20)), "written by the guest");
  // The padding after the file reads as zeros and takes stores without reaching the file (no SIGBUS).
  assert.equal(view[c.length - 1], 0);
  view[c.length - 1] = 7;
  assert.equal(Deno.statSync(r.path).size, MiB + 10);
});

Deno.test("pmem: a read-only file is mapped read-only; a flush of it succeeds at once with no sync (as crosvm's)", async () => {
  const held = heldSync();
  using r = rig({ readOnly: true, sync: () => held.sync() });
  assert.equal(r.m.calls[0].writable, false);
  const sub = r.submit([u32(VIRTIO_PMEM_REQ_TYPE_FLUSH), 4]);
  await settle();
  assert.deepEqual(r.used(), [{ id: sub.head, len: 4 }]);
  assert.equal(r.status(sub), VIRTIO_PMEM_RESP_TYPE_OK);
  assert.equal(held.calls, 0, "nothing to sync on a read-only file");
  assert.equal(r.dev.stats().badRequests, 0);
  assert.equal(r.lines.length, 0);
});

Deno.test("pmem: a flush is answered only after the file's sync, off the notify path", async () => {
  const held = heldSync();
  using r = rig({ sync: () => held.sync() });
  r.irqs.n = 0;
  const sub = r.submit([u32(VIRTIO_PMEM_REQ_TYPE_FLUSH), 4]);
  // queueNotify returned with the sync still running: nothing used yet, the device is busy.
  assert.equal(held.calls, 1);
  assert.deepEqual(r.used(), []);
  assert.equal(r.dev.quiescent(), false);
  // A second flush while the first sync runs waits for a sync of its own.
  const second = r.submit([u32(VIRTIO_PMEM_REQ_TYPE_FLUSH), 4]);
  assert.equal(held.calls, 1);
  held.waiting.shift()!.resolve();
  await settle();
  assert.deepEqual(r.used(), [{ id: sub.head, len: 4 }]);
  assert.equal(r.status(sub), VIRTIO_PMEM_RESP_TYPE_OK);
  assert.equal(r.irqs.n, 1);
  assert.equal(held.calls, 2, "the second flush got a sync that began after it");
  held.waiting.shift()!.resolve();
  await settle();
  assert.deepEqual(r.used(), [{ id: second.head, len: 4 }]);
  assert.equal(r.status(second), VIRTIO_PMEM_RESP_TYPE_OK);
  assert.equal(r.dev.stats().flushes, 2);
  assert.equal(r.dev.quiescent(), true);
});

Deno.test("pmem: a failed sync answers the flush with an error and one log line", async () => {
  const held = heldSync();
  using r = rig({ sync: () => held.sync() });
  const sub = r.submit([u32(VIRTIO_PMEM_REQ_TYPE_FLUSH), 4]);
  held.waiting.shift()!.reject(new Error("Input/output error"));
  await settle();
  assert.deepEqual(r.used(), [{ id: sub.head, len: 4 }]);
  assert.equal(r.status(sub), VIRTIO_PMEM_RESP_TYPE_EIO);
  assert.equal(r.dev.stats().flushErrors, 1);
  assert.equal(r.lines.length, 1);
  assert.match(r.lines[0], /fsync .* failed: Input\/output error/);
});

Deno.test("pmem: the default flush fsyncs the file itself and answers OK", async () => {
  using r = rig({ size: MiB });
  const view = new Uint8Array(
    Deno.UnsafePointerView.getArrayBuffer(Deno.UnsafePointer.create(r.m.calls[0].hostAddr)!, MiB),
  );
  view.set(new TextEncoder().encode("flushed"), 0);
  const sub = r.submit([u32(VIRTIO_PMEM_REQ_TYPE_FLUSH), 4]);
  for (let i = 0; i < 100 && r.dev.stats().flushes === 0; i++) await new Promise((res) => setTimeout(res, 10));
  assert.deepEqual(r.used(), [{ id: sub.head, len: 4 }]);
  assert.equal(r.status(sub), VIRTIO_PMEM_RESP_TYPE_OK);
  assert.equal(new TextDecoder().decode(Deno.readFileSync(r.path).subarray(0, 7)), "flushed");
});

Deno.test("pmem: bad requests get an error status, never a sync", async () => {
  const held = heldSync();
  using r = rig({ sync: () => held.sync() });
  // Unknown type.
  const unknown = r.submit([u32(7), 4]);
  // Too short a request: two bytes of type.
  const short = r.submit([new Uint8Array(2), 4]);
  // No room for the status: completed with length 0.
  const noRoom = r.submit([u32(VIRTIO_PMEM_REQ_TYPE_FLUSH), 2]);
  // No response buffer at all.
  const noResp = r.submit([u32(VIRTIO_PMEM_REQ_TYPE_FLUSH)]);
  await settle();
  const used = r.used();
  assert.deepEqual(used, [
    { id: unknown.head, len: 4 },
    { id: short.head, len: 4 },
    { id: noRoom.head, len: 0 },
    { id: noResp.head, len: 0 },
  ]);
  assert.equal(r.status(unknown), VIRTIO_PMEM_RESP_TYPE_EIO);
  assert.equal(r.status(short), VIRTIO_PMEM_RESP_TYPE_EIO);
  assert.equal(held.calls, 0);
  assert.equal(r.dev.stats().badRequests, 4);
});

Deno.test("pmem: a descriptor outside guest memory completes with length 0, the device goes on", async () => {
  const held = heldSync();
  using r = rig({ sync: () => held.sync() });
  const q = r.drv.queues[0];
  // head -> a readable buffer far outside guest memory -> a writable one.
  q.writeDesc(0, { addr: 0x7fff_0000_0000n, len: 4, flags: VIRTQ_DESC_F_NEXT, next: 1 });
  q.writeDesc(1, { addr: 0x2000, len: 4, flags: VIRTQ_DESC_F_WRITE, next: 0 });
  q.publish(0);
  r.drv.kick(0);
  await settle();
  assert.deepEqual(q.used(), [{ id: 0, len: 0 }]);
  assert.equal(held.calls, 0);
  // A good flush afterwards is served.
  r.reset();
  const sub = r.submit([u32(VIRTIO_PMEM_REQ_TYPE_FLUSH), 4]);
  held.waiting.shift()!.resolve();
  await settle();
  assert.ok(r.used().some((u) => u.id === sub.head && u.len === 4));
});

Deno.test("pmem: a reset while a sync runs drops its flushes; the new queue is not touched", async () => {
  const held = heldSync();
  using r = rig({ sync: () => held.sync() });
  r.submit([u32(VIRTIO_PMEM_REQ_TYPE_FLUSH), 4]);
  const usedIdx = r.drv.queues[0].usedIdx();
  r.dev.reset();
  held.waiting.shift()!.resolve();
  await settle();
  assert.equal(r.drv.queues[0].usedIdx(), usedIdx);
  assert.equal(r.dev.quiescent(), true);
});

Deno.test("pmem: a missing file is a HostError (exit 1), an empty one or a directory a ConfigError (35)", () => {
  const dir = Deno.makeTempDirSync({ prefix: "denovm-pmem-" });
  try {
    assert.throws(() => new PmemDevice({ path: `${dir}/none.img`, readOnly: false }), (e) => {
      assert.ok(e instanceof HostError, String(e));
      assert.match((e as Error).message, /none\.img/);
      return true;
    });
    Deno.writeFileSync(`${dir}/empty.img`, new Uint8Array());
    assert.throws(() => new PmemDevice({ path: `${dir}/empty.img`, readOnly: false }), ConfigError);
    for (const readOnly of [true, false]) {
      assert.throws(() => new PmemDevice({ path: dir, readOnly }), (e) => {
        assert.ok(e instanceof ExitCodeError && e instanceof ConfigError, String(e));
        assert.match((e as Error).message, /is a directory, not a regular file/);
        return true;
      });
    }
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("pmem: state saves and restores the window, and refuses another window or damaged fields", () => {
  using r = rig();
  r.reset();
  const path2 = tempFile(3 * MiB + 100);
  const make = (base = WINDOW_BASE, path = path2) => {
    const d = new PmemDevice({ path, readOnly: false, sync: () => Promise.resolve() });
    d.setMemoryWindow(base, recordingMapper().mapper);
    return d;
  };
  const dev2 = make();
  try {
    const to = saveAndRestore({ t: r.t, drv: r.drv, irqs: r.irqs }, r.dev, dev2, r.g.mem);
    // The restored device serves the restored queue.
    const sub = to.drv.queues[0].submit([u32(7), 4]);
    to.drv.kick(0);
    assert.deepEqual(to.drv.queues[0].used(), [{ id: sub.head, len: 4 }]);
    assert.equal(r.status(sub), VIRTIO_PMEM_RESP_TYPE_EIO);
    const good = r.dev.saveState();
    assertRefused(() => make(), good, [
      ["stats", withData(good, { stats: { flushes: -1 } })],
      ["features", withData(good, { features: "0x0" })],
    ]);
    // Another window base: another configuration.
    const other = make(WINDOW_BASE * 2);
    try {
      assert.throws(() => other.restoreState(good), StateError);
    } finally {
      other.close();
    }
  } finally {
    dev2.close();
    Deno.removeSync(path2.slice(0, path2.lastIndexOf("/")), { recursive: true });
  }
});
