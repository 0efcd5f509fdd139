// The vhost-user back end with rings that become ready one at a time: a front end may kick ring 0 before it
// enables ring 1 (vhost-user.rst "Starting and stopping rings": each ring starts on its own), and ring 1
// must be served once it is enabled. Found by the vhost-user fuzzer (bench/fuzz/vhost_user.ts).

import assert from "node:assert/strict";
import {
  check,
  closeFd,
  cstr,
  eventfd,
  eventfdRead,
  eventfdWrite,
  libc,
  MAP_SHARED,
  MFD_CLOEXEC,
  mmap,
  munmap,
  pollAsync,
  POLLIN,
  PROT_READ,
  PROT_WRITE,
} from "../../ffi/libc.ts";
import { GuestMemory } from "../../core/memory.ts";
import { UnixStream } from "../../core/unix_socket.ts";
import type { ActivateContext, VirtioDevice } from "../virtio/device.ts";
import { VIRTIO_F_VERSION_1 } from "../virtio/device.ts";
import { VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE } from "../virtio/queue.ts";
import { VhostUserBackend } from "./backend.ts";
import {
  encodeMessage,
  memTablePayload,
  readMessage,
  u64Payload,
  VHOST_USER_F_PROTOCOL_FEATURES,
  VHOST_USER_FLAG_NEED_REPLY,
  VHOST_USER_PROTOCOL_F_REPLY_ACK,
  VHOST_USER_VERSION,
  VhostUserRequest as R,
  vringAddrPayload,
  vringStatePayload,
} from "./protocol.ts";

/** How long a correct back end may take to answer (it takes milliseconds); a broken one fails the test. */
const HANG_GUARD_MS = 10_000;
const QSIZE = 8;
const MEM_SIZE = 0x10000;
/** Each ring's areas: descriptors at +0, available ring at +0x100, used ring at +0x200, buffers at +0x400. */
const RING_STRIDE = 0x1000;
const USER_BASE = 0x7f00_0000_0000n;

/** Two queues; each answers a chain with its readable bytes upper-cased into the writable part. */
class UpperDevice implements VirtioDevice {
  readonly deviceType = 4;
  readonly name = "upper";
  readonly queueMaxSizes = [QSIZE, QSIZE];
  readonly features = VIRTIO_F_VERSION_1;
  ctx?: ActivateContext;
  readConfig(_offset: number, data: Uint8Array): void {
    data.fill(0);
  }
  writeConfig(): void {}
  activate(ctx: ActivateContext): void {
    this.ctx = ctx;
  }
  reset(): void {
    this.ctx = undefined;
  }
  queueNotify(index: number): void {
    const q = this.ctx?.queues[index];
    if (!q) return;
    for (let c = q.pop(); c; c = q.pop()) {
      const text = new TextDecoder().decode(c.reader().read(c.readableLength));
      const w = c.writer();
      w.write(new TextEncoder().encode(text.toUpperCase()));
      q.addUsed(c.head, w.bytesWritten);
    }
    this.ctx!.interrupt.signalUsedQueue(index);
  }
}

async function send(sock: UnixStream, request: number, payload?: Uint8Array, fds: number[] = []): Promise<bigint> {
  await sock.send(encodeMessage(request, VHOST_USER_VERSION | VHOST_USER_FLAG_NEED_REPLY, payload), fds);
  const reply = await readMessage(sock, true);
  assert.equal(reply.request, request);
  return new DataView(reply.payload.buffer).getBigUint64(0, true);
}

Deno.test("vhost-user back end: a ring enabled after the device started on another ring's kick is served", async () => {
  const dir = await Deno.makeTempDir({ prefix: "denovm-vu-rings-" });
  const path = `${dir}/s`;
  const device = new UpperDevice();
  const backend = new VhostUserBackend(device, path, { log: () => {} });
  const served = backend.serve();
  await backend.listening;
  const fd = check("memfd_create", libc().memfd_create(cstr("denovm-test-guest"), MFD_CLOEXEC));
  check("ftruncate", libc().ftruncate(fd, BigInt(MEM_SIZE)));
  const ptr = mmap(MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const mem = new GuestMemory([{ guestBase: 0, size: MEM_SIZE, hostAddr: BigInt(Deno.UnsafePointer.value(ptr)) }]);
  const kicks = [eventfd(), eventfd()];
  const calls = [eventfd(), eventfd()];
  const sock = UnixStream.connect(path);
  try {
    assert.equal(await send(sock, R.SET_FEATURES, u64Payload(VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES)), 0n);
    assert.equal(await send(sock, R.SET_PROTOCOL_FEATURES, u64Payload(VHOST_USER_PROTOCOL_F_REPLY_ACK)), 0n);
    const table = memTablePayload([{
      guestPhysAddr: 0n,
      memorySize: BigInt(MEM_SIZE),
      userspaceAddr: USER_BASE,
      mmapOffset: 0n,
    }]);
    assert.equal(await send(sock, R.SET_MEM_TABLE, table, [fd]), 0n);
    for (const index of [0, 1]) {
      const base = index * RING_STRIDE;
      assert.equal(await send(sock, R.SET_VRING_NUM, vringStatePayload({ index, num: QSIZE })), 0n);
      const addr = {
        index,
        flags: 0,
        desc: USER_BASE + BigInt(base),
        avail: USER_BASE + BigInt(base + 0x100),
        used: USER_BASE + BigInt(base + 0x200),
        log: 0n,
      };
      assert.equal(await send(sock, R.SET_VRING_ADDR, vringAddrPayload(addr)), 0n);
      assert.equal(await send(sock, R.SET_VRING_BASE, vringStatePayload({ index, num: 0 })), 0n);
      assert.equal(await send(sock, R.SET_VRING_CALL, u64Payload(BigInt(index)), [calls[index]]), 0n);
      assert.equal(await send(sock, R.SET_VRING_KICK, u64Payload(BigInt(index)), [kicks[index]]), 0n);
    }
    // Ring 0 only is enabled and kicked: the device starts with that ring.
    assert.equal(await send(sock, R.SET_VRING_ENABLE, vringStatePayload({ index: 0, num: 1 })), 0n);
    eventfdWrite(kicks[0]);
    // A reply after the kick: the back end handled the kick first (it looks at kicks before messages).
    assert.equal(await send(sock, R.SET_OWNER), 0n);
    assert.ok(device.ctx, "the device started on ring 0's kick");

    // Now ring 1: enabled, one chain "hello" + 16 writable bytes, kicked.
    assert.equal(await send(sock, R.SET_VRING_ENABLE, vringStatePayload({ index: 1, num: 1 })), 0n);
    const r1 = RING_STRIDE;
    mem.write(r1 + 0x400, new TextEncoder().encode("hello"));
    mem.setU64(r1, r1 + 0x400);
    mem.setU32(r1 + 8, 5);
    mem.setU16(r1 + 12, VIRTQ_DESC_F_NEXT);
    mem.setU16(r1 + 14, 1);
    mem.setU64(r1 + 16, r1 + 0x500);
    mem.setU32(r1 + 16 + 8, 16);
    mem.setU16(r1 + 16 + 12, VIRTQ_DESC_F_WRITE);
    mem.setU16(r1 + 0x100 + 4, 0); // avail ring[0] = head 0
    mem.setU16(r1 + 0x100 + 2, 1); // avail idx
    eventfdWrite(kicks[1]);
    // Wait for the used buffer (interrupts may also come for nothing: this device signals after every kick).
    const end = Date.now() + HANG_GUARD_MS;
    while (mem.getU16(r1 + 0x200 + 2) === 0 && Date.now() < end) {
      await pollAsync([calls[1]], POLLIN, 100);
      eventfdRead(calls[1]);
    }
    assert.equal(mem.getU16(r1 + 0x200 + 2), 1, "ring 1's used index");
    assert.equal(mem.getU32(r1 + 0x200 + 4 + 4), 5, "used length");
    assert.equal(new TextDecoder().decode(mem.read(r1 + 0x500, 5)), "HELLO");
  } finally {
    sock.close();
    backend.close();
    await served;
    [...kicks, ...calls, fd].forEach(closeFd);
    munmap(ptr, MEM_SIZE);
    await Deno.remove(dir, { recursive: true });
  }
});
