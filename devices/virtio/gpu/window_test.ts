// The host-visible window on its own: offsets checked against the window and the live mappings, and the
// backend's mapping undone whenever installing it fails (a larger mapping than the blob that overlaps, a
// mapper that refuses), so a failed RESOURCE_MAP_BLOB leaves nothing mapped.

import assert from "node:assert/strict";
import { HOST_PAGE_SIZE, HostVisibleWindow } from "./window.ts";
import type { GpuBackend, MappedBlob } from "./backend.ts";
import * as P from "./protocol.ts";
import type { SharedMemoryMapper } from "../device.ts";

const PAGE = HOST_PAGE_SIZE;

/** The two backend calls the window makes, recorded; `sizes` gives a resource's mapping size. */
function fakeBackend(sizes: Record<number, number>) {
  const calls: string[] = [];
  const backend = {
    mapResource(id: number): MappedBlob {
      calls.push(`map ${id}`);
      return { hostAddr: 0x7f00_0000_0000n + BigInt(id) * 0x10_0000n, size: sizes[id], mapInfo: 3 };
    },
    unmapResource(id: number): void {
      calls.push(`unmap ${id}`);
    },
  } as unknown as GpuBackend;
  return { backend, calls };
}

function fakeMapper() {
  const live = new Map<number, number>();
  const m = {
    live,
    refuse: false,
    addMapping(id: number, offset: number, _host: bigint, length: number): void {
      assert.equal(id, P.VIRTIO_GPU_SHM_ID_HOST_VISIBLE);
      if (m.refuse) throw new Error("no free memory slot");
      live.set(offset, length);
    },
    removeMapping(_id: number, offset: number): void {
      live.delete(offset);
    },
  };
  return m as SharedMemoryMapper & typeof m;
}

function protocolError(status: number, re: RegExp) {
  return (e: unknown) => e instanceof P.ProtocolError && e.response === status && re.test(e.message);
}

Deno.test("host-visible window: a size that is no positive multiple of a page is refused; no mapper, no mapping", () => {
  for (const size of [0, -PAGE, PAGE + 1, 1.5 * PAGE, Number.MAX_SAFE_INTEGER + 1]) {
    assert.throws(() => new HostVisibleWindow(size), /not a positive multiple of 4096/, `${size}`);
  }
  const w = new HostVisibleWindow(4 * PAGE);
  assert.equal(w.hasMapper, false);
  const { backend, calls } = fakeBackend({ 1: PAGE });
  assert.throws(() => w.map(backend, 1, PAGE, 0n), /without a mapper/);
  assert.deepEqual(calls, [], "the backend was not asked");
});

Deno.test("host-visible window: failures after the backend mapped the blob undo that mapping", () => {
  const w = new HostVisibleWindow(8 * PAGE);
  const mapper = fakeMapper();
  w.setMapper(mapper);
  // Resource 2's blob is one page, but the backend's mapping of it is three (a driver's alignment).
  const { backend, calls } = fakeBackend({ 1: PAGE, 2: 3 * PAGE, 3: 100 });
  assert.deepEqual(w.map(backend, 1, PAGE, BigInt(4 * PAGE)), { offset: 4 * PAGE, size: PAGE, mapInfo: 3 });

  // At 2 pages the blob fits, but the backend's three pages would reach resource 1 at page 4.
  assert.throws(
    () => w.map(backend, 2, PAGE, BigInt(2 * PAGE)),
    protocolError(P.RESP_ERR_INVALID_PARAMETER, /map at 0x2000 \+ 12288 overlaps resource 1 at 0x4000/),
  );
  // Near the end the backend's three pages run past the window.
  assert.throws(
    () => w.map(backend, 2, PAGE, BigInt(7 * PAGE)),
    protocolError(P.RESP_ERR_INVALID_PARAMETER, /runs past the 32768-byte window/),
  );
  assert.deepEqual(calls.splice(0), ["map 1", "map 2", "unmap 2", "map 2", "unmap 2"]);

  // The mapper refusing (no free KVM slot) is the host's shortage: OUT_OF_MEMORY, and the backend unmaps.
  mapper.refuse = true;
  assert.throws(
    () => w.map(backend, 3, 100, 0n),
    protocolError(
      P.RESP_ERR_OUT_OF_MEMORY,
      /mapping resource 3 \(0x7f0000300000, 100 bytes\) failed: no free memory slot/,
    ),
  );
  assert.deepEqual(calls.splice(0), ["map 3", "unmap 3"]);
  assert.deepEqual([...mapper.live], [[4 * PAGE, PAGE]], "only resource 1 is installed");

  // The failed attempts left the window free where they tried: resource 3 (100 bytes: one page) fits at 0.
  mapper.refuse = false;
  assert.deepEqual(w.map(backend, 3, 100, 0n), { offset: 0, size: PAGE, mapInfo: 3 });
  w.unmap(backend, 1, { offset: 4 * PAGE, size: PAGE });
  assert.deepEqual(calls.splice(0), ["map 3", "unmap 1"]);
  assert.deepEqual([...mapper.live], [[0, PAGE]]);
  // Resource 2's three pages now fit where resource 1 was.
  assert.equal(w.map(backend, 2, PAGE, BigInt(2 * PAGE)).size, 3 * PAGE);
});

Deno.test("host-visible window: host memory that does not start on a page is refused before the mapper; the backend unmaps", () => {
  const w = new HostVisibleWindow(8 * PAGE);
  const mapper = fakeMapper();
  w.setMapper(mapper);
  const calls: string[] = [];
  const backend = {
    mapResource(id: number): MappedBlob {
      calls.push(`map ${id}`);
      return { hostAddr: 0x7f00_0000_0040n, size: PAGE, mapInfo: 3 };
    },
    unmapResource(id: number): void {
      calls.push(`unmap ${id}`);
    },
  } as unknown as GpuBackend;
  assert.throws(
    () => w.map(backend, 5, PAGE, 0n),
    protocolError(
      P.RESP_ERR_OUT_OF_MEMORY,
      /resource 5 \(0x7f0000000040, 4096 bytes\) failed: .*does not start on a page/,
    ),
  );
  assert.deepEqual(calls, ["map 5", "unmap 5"]);
  assert.deepEqual([...mapper.live], [], "nothing installed");
});
