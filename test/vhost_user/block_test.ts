// vhost-user back end: the socket layer, the protocol driven by a TypeScript front end
// against a fake device, and the block device driven by the real Linux virtio_blk driver
// in user-mode Linux (test/support/uml.ts).

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
import type { ActivateContext, VirtioDevice } from "../../devices/virtio/device.ts";
import { VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1 } from "../../devices/virtio/device.ts";
import { VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE } from "../../devices/virtio/queue.ts";
import { BACKEND_PROTOCOL_FEATURES, VhostUserBackend } from "../../devices/vhost_user/backend.ts";
import { parseBlockArgs } from "../../vmm/cli/devices/block.ts";
import {
  configPayload,
  encodeMessage,
  memTablePayload,
  readMessage,
  u64Payload,
  VHOST_USER_F_PROTOCOL_FEATURES,
  VHOST_USER_VRING_NOFD_MASK,
  VhostUserRequest as R,
  vringAddrPayload,
  vringStatePayload,
} from "../../devices/vhost_user/protocol.ts";
import {
  ConnectionClosed,
  listenSeqpacket,
  SocketPathInUse,
  UnixListener,
  UnixStream,
} from "../../core/unix_socket.ts";
import { buildInitramfs, UmlMachine, umlUnavailableReason } from "../support/uml.ts";
import { DeviceProcess, HANG_GUARD_MS, u64, until, VhostUserFrontEnd } from "../support/vhost_user_front_end.ts";

const REPO = new URL("../../", import.meta.url).pathname;
async function tempSocketPath(name: string): Promise<{ dir: string; path: string }> {
  const dir = await Deno.makeTempDir({ prefix: "denovm-vu-" });
  return { dir, path: `${dir}/${name}` };
}

// ---- A fake device that answers a "ping" chain with "pong" ----

class PingDevice implements VirtioDevice {
  readonly deviceType = 2;
  readonly name = "ping";
  readonly queueMaxSizes = [8, 8];
  readonly features = VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | (1n << 5n);
  readonly config = Uint8Array.from({ length: 24 }, (_, i) => i + 1);
  readonly events: string[] = [];
  ctx?: ActivateContext;

  readConfig(offset: number, data: Uint8Array): void {
    data.fill(0);
    data.set(this.config.subarray(offset, offset + data.length));
  }
  writeConfig(offset: number, data: Uint8Array): void {
    this.events.push(`writeConfig ${offset} ${[...data].join(",")}`);
  }
  activate(ctx: ActivateContext): void {
    this.ctx = ctx;
    this.events.push(`activate ${ctx.queues.map((q) => (q ? "q" : "-")).join("")} ${ctx.ackedFeatures}`);
  }
  queueNotify(index: number): void {
    const q = this.ctx?.queues[index];
    if (!q) return;
    for (let chain = q.pop(); chain; chain = q.pop()) {
      const got = new TextDecoder().decode(chain.reader().read(chain.readableLength));
      const w = chain.writer();
      w.write(new TextEncoder().encode(got === "ping" ? "pong" : "????"));
      q.addUsed(chain.head, w.bytesWritten);
    }
    this.ctx!.interrupt.signalUsedQueue(index);
  }
  reset(): void {
    this.ctx = undefined;
    this.events.push("reset");
  }
}

// Guest layout for the protocol test: one region of 1 MiB at guest-physical 1 GiB, shared
// through a memfd at file offset 4 KiB; the front end's "virtual" address is elsewhere.
const GUEST_BASE = 0x4000_0000;
const REGION_SIZE = 0x10_0000;
const FILE_OFFSET = 0x1000;
const USER_BASE = 0x7f00_0000_0000n;
const DESC = GUEST_BASE;
const AVAIL = GUEST_BASE + 0x1000;
const USED = GUEST_BASE + 0x2000;
const BUF_IN = GUEST_BASE + 0x10000;
const BUF_OUT = GUEST_BASE + 0x11000;
const QSIZE = 8;

function user(gpa: number): bigint {
  return USER_BASE + BigInt(gpa - GUEST_BASE);
}

function sharedMemory(): { fd: number; mem: GuestMemory; unmap: () => void } {
  const fd = check("memfd_create", libc().memfd_create(cstr("denovm-test-guest"), MFD_CLOEXEC));
  check("ftruncate", libc().ftruncate(fd, BigInt(FILE_OFFSET + REGION_SIZE)));
  const ptr = mmap(FILE_OFFSET + REGION_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const host = BigInt(Deno.UnsafePointer.value(ptr)) + BigInt(FILE_OFFSET);
  const mem = new GuestMemory([{ guestBase: GUEST_BASE, size: REGION_SIZE, hostAddr: host }]);
  return { fd, mem, unmap: () => munmap(ptr, FILE_OFFSET + REGION_SIZE) };
}

/** A "ping" (readable) + 16-byte writable chain at head 0, published in the avail ring. */
function publishPing(mem: GuestMemory, availIdx: number): void {
  mem.write(BUF_IN, new TextEncoder().encode("ping"));
  mem.setU64(DESC, BUF_IN);
  mem.setU32(DESC + 8, 4);
  mem.setU16(DESC + 12, VIRTQ_DESC_F_NEXT);
  mem.setU16(DESC + 14, 1);
  mem.setU64(DESC + 16, BUF_OUT);
  mem.setU32(DESC + 16 + 8, 16);
  mem.setU16(DESC + 16 + 12, VIRTQ_DESC_F_WRITE);
  mem.setU16(AVAIL + 4 + 2 * ((availIdx - 1) % QSIZE), 0);
  mem.setU16(AVAIL + 2, availIdx);
}

Deno.test("unix socket: bytes and SCM_RIGHTS descriptors travel together", async () => {
  const { dir, path } = await tempSocketPath("s");
  const listener = UnixListener.listen(path);
  const accepted = listener.accept();
  const client = UnixStream.connect(path);
  const server = await accepted;
  const efd = eventfd();
  try {
    await client.send(new TextEncoder().encode("hello"), [efd]);
    const got = await server.recvExact(5);
    assert.equal(new TextDecoder().decode(got.data), "hello");
    assert.equal(got.fds.length, 1);
    assert.notEqual(got.fds[0], efd, "the received descriptor is a new number for the same eventfd");
    eventfdWrite(got.fds[0], 7n);
    assert.equal(eventfdRead(efd), 7n);
    closeFd(got.fds[0]);
    client.close();
    await assert.rejects(server.recvExact(1), ConnectionClosed);
  } finally {
    server.close();
    listener.close();
    closeFd(efd);
    await Deno.remove(dir, { recursive: true });
  }
  assert.throws(() => Deno.statSync(path), Deno.errors.NotFound, "closing the listener removes the socket file");
});

Deno.test("unix socket: a listener never takes a live path, and closing removes only its own socket file", async () => {
  const { dir, path } = await tempSocketPath("s");
  const first = UnixListener.listen(path);
  try {
    assert.throws(() => UnixListener.listen(path), SocketPathInUse);
    // Someone removes the file and listens there anew: the first listener's close leaves their file.
    Deno.removeSync(path);
    const second = UnixListener.listen(path);
    first.close();
    assert.ok(Deno.lstatSync(path).isSocket, "the first listener removed the second's socket file");
    second.close();
    assert.throws(() => Deno.lstatSync(path), Deno.errors.NotFound);
    Deno.writeTextFileSync(path, "keep me");
    assert.throws(() => UnixListener.listen(path), /exists and is not a socket/);
    assert.equal(Deno.readTextFileSync(path), "keep me");
  } finally {
    first.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("vhost-user protocol: a TypeScript front end maps memory, starts rings and gets a used buffer back", async () => {
  const { dir, path } = await tempSocketPath("ping.sock");
  // A socket file nobody listens on any more (as a killed process leaves it) is replaced.
  closeFd(listenSeqpacket(path, 1));
  const device = new PingDevice();
  const logs: string[] = [];
  const backend = new VhostUserBackend(device, path, { log: (l) => logs.push(l) });
  const served = backend.serve();
  await backend.listening;
  assert.ok(Deno.lstatSync(path).isSocket);
  const shm = sharedMemory();
  const kick = eventfd();
  const call = eventfd();
  try {
    const fe = VhostUserFrontEnd.connect(path);
    assert.equal(await fe.ack(R.SET_OWNER), 0n);
    const features = u64(await fe.call(R.GET_FEATURES));
    assert.equal(features, device.features | VHOST_USER_F_PROTOCOL_FEATURES);
    assert.equal(u64(await fe.call(R.GET_PROTOCOL_FEATURES)), BACKEND_PROTOCOL_FEATURES);
    await fe.send(R.SET_PROTOCOL_FEATURES, u64Payload(BACKEND_PROTOCOL_FEATURES));
    assert.equal(await fe.ack(R.SET_FEATURES, u64Payload(features)), 0n);
    assert.equal(u64(await fe.call(R.GET_QUEUE_NUM)), 2n);

    // Config space both ways.
    const cfg = await fe.call(R.GET_CONFIG, configPayload({ offset: 4, flags: 0, data: new Uint8Array(8) }));
    assert.deepEqual([...cfg.payload.subarray(12)], [5, 6, 7, 8, 9, 10, 11, 12]);
    assert.equal(await fe.ack(R.SET_CONFIG, configPayload({ offset: 2, flags: 0, data: Uint8Array.of(9, 9) })), 0n);
    assert.ok(device.events.includes("writeConfig 2 9,9"));

    // Memory and queue 0 only: the device has two queues; a kick on a ready ring activates it.
    const table = memTablePayload([{
      guestPhysAddr: BigInt(GUEST_BASE),
      memorySize: BigInt(REGION_SIZE),
      userspaceAddr: USER_BASE,
      mmapOffset: BigInt(FILE_OFFSET),
    }]);
    assert.equal(await fe.ack(R.SET_MEM_TABLE, table, [shm.fd]), 0n);
    assert.equal(await fe.ack(R.SET_VRING_NUM, vringStatePayload({ index: 0, num: QSIZE })), 0n);
    assert.equal(await fe.ack(R.SET_VRING_BASE, vringStatePayload({ index: 0, num: 0 })), 0n);
    const addr = { index: 0, flags: 0, desc: user(DESC), used: user(USED), avail: user(AVAIL), log: 0n };
    assert.equal(await fe.ack(R.SET_VRING_ADDR, vringAddrPayload(addr)), 0n);
    assert.equal(await fe.ack(R.SET_VRING_CALL, u64Payload(0n), [call]), 0n);
    assert.equal(await fe.ack(R.SET_VRING_KICK, u64Payload(0n), [kick]), 0n);
    assert.ok(!device.events.some((e) => e.startsWith("activate")), "not active before the ring is enabled");
    assert.equal(await fe.ack(R.SET_VRING_ENABLE, vringStatePayload({ index: 0, num: 1 })), 0n);
    assert.ok(!device.events.some((e) => e.startsWith("activate")), "queue 1 is not ready: wait for a kick");

    publishPing(shm.mem, 1);
    eventfdWrite(kick);
    const rev = await pollAsync([call], POLLIN, HANG_GUARD_MS);
    assert.equal(rev[0] & POLLIN, POLLIN, "the back end signalled the call eventfd");
    assert.equal(eventfdRead(call), 1n);
    assert.ok(device.events.includes(`activate q- ${device.features}`), device.events.join("; "));
    assert.equal(shm.mem.getU16(USED + 2), 1, "used idx");
    assert.equal(shm.mem.getU32(USED + 4), 0, "used id = head 0");
    assert.equal(shm.mem.getU32(USED + 8), 4, "used len = 4 bytes written");
    assert.equal(new TextDecoder().decode(shm.mem.read(BUF_OUT, 4)), "pong");
    // The device's queue sits at the guest-physical addresses behind the front end's virtual ones.
    assert.deepEqual(
      { ...device.ctx!.queues[0]!.addrs },
      { size: QSIZE, descTable: DESC, availRing: AVAIL, usedRing: USED },
    );

    // A declined request is answered with a failure status; the connection stays up.
    assert.equal(await fe.ack(R.SET_LOG_BASE, u64Payload(0n)), 1n);

    // Stopping the ring returns where it stopped and resets the device.
    const base = await fe.call(R.GET_VRING_BASE, vringStatePayload({ index: 0, num: 0 }));
    assert.equal(new DataView(base.payload.buffer).getUint32(4, true), 1);
    assert.equal(device.events.at(-1), "reset");

    // NOFD with a descriptor attached is malformed: the back end drops the connection.
    await fe.send(R.SET_VRING_CALL, u64Payload(VHOST_USER_VRING_NOFD_MASK), [call]);
    await assert.rejects(readMessage(fe.sock, true), ConnectionClosed);
    fe.close();
    assert.ok(logs.some((l) => l.includes("dropping the front end")), logs.join("\n"));

    // The back end serves the next front end.
    const fe2 = VhostUserFrontEnd.connect(path);
    assert.equal(u64(await fe2.call(R.GET_FEATURES)), features);
    // A header with the wrong version is malformed too.
    await fe2.sock.send(encodeMessage(R.GET_FEATURES, 0x2));
    await assert.rejects(readMessage(fe2.sock, true), ConnectionClosed);
    fe2.close();
    await until(() => backend.connections === 2 && backend.counters === undefined, "the second session to end");
  } finally {
    backend.close();
    await served;
    shm.unmap();
    closeFd(shm.fd);
    closeFd(kick);
    closeFd(call);
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("denovm device block: crosvm's options (--socket-path/--socket, --file PATH[:read-only])", () => {
  assert.deepEqual(parseBlockArgs(["--socket-path", "/s", "--file", "/d.img"]), {
    socketPath: "/s",
    file: "/d.img",
    readOnly: false,
  });
  assert.deepEqual(parseBlockArgs(["--socket=/s", "--file=/d.img:read-only"]), {
    socketPath: "/s",
    file: "/d.img",
    readOnly: true,
  });
  assert.throws(() => parseBlockArgs(["--file", "/d.img"]), /--socket-path/);
  assert.throws(() => parseBlockArgs(["--socket-path", "/s", "--file", "/d.img:bogus"]), /bogus/);
  assert.throws(() => parseBlockArgs(["--socket-path", "/s", "--file", "/d.img", "--what"]), /what/);
});

Deno.test("denovm device: bad arguments and unimplemented device types exit 35 with one line", async () => {
  for (const args of [["device", "block", "--file", "/nonexistent"], ["device", "gpu"], ["device", "frobnicate"]]) {
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", `${REPO}main.ts`, ...args],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const err = new TextDecoder().decode(out.stderr).trim();
    assert.equal(out.code, 35, `${args.join(" ")}: ${err}`);
    assert.equal(err.split("\n").length, 1, err);
  }
});

Deno.test("denovm device block: SIGTERM ends it with status 0 and removes its socket", async () => {
  const { dir, path: socket } = await tempSocketPath("term.sock");
  const image = `${dir}/disk.img`;
  await Deno.writeFile(image, new Uint8Array(1 << 20));
  try {
    const backend = await DeviceProcess.block(socket, image);
    assert.ok(Deno.lstatSync(socket).isSocket);
    // A front end connected at that moment is dropped, not waited for.
    const fe = VhostUserFrontEnd.connect(socket);
    assert.equal(u64(await fe.call(R.GET_PROTOCOL_FEATURES)), BACKEND_PROTOCOL_FEATURES);
    backend.kill("SIGTERM");
    const st = await backend.exited;
    fe.close();
    assert.equal(st.code, 0, backend.stderr);
    assert.throws(() => Deno.lstatSync(socket), Deno.errors.NotFound);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

// ---- Real Linux: user-mode Linux's virtio_uml front end with the virtio_blk driver ----

const umlReason = umlUnavailableReason() ??
  (new Deno.Command("sh", { args: ["-c", "command -v mkfs.ext4"] }).outputSync().success
    ? undefined
    : "mkfs.ext4 missing (apt-get install e2fsprogs)");
if (umlReason) console.log(`skipping user-mode Linux tests: ${umlReason}`);

/** The virtio device ID of block devices (virtio 1.2 section 5). */
const VIRTIO_ID_BLOCK = 2;

async function sha256Hex(data: Uint8Array<ArrayBuffer>): Promise<string> {
  const d = await crypto.subtle.digest("SHA-256", data);
  return [...new Uint8Array(d)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/** Content the guest writes with a shell loop, reproduced on the host to check it. */
function lineFile(prefix: string, lines: number): string {
  let s = "";
  for (let i = 0; i < lines; i++) s += `${prefix} line ${i} of denovm vhost-user block test\n`;
  return s;
}
const writeLines = (prefix: string, lines: number, file: string) =>
  `i=0; while [ $i -lt ${lines} ]; do echo "${prefix} line $i of denovm vhost-user block test"; i=$((i+1)); done > ${file}`;

/** Wait for /dev/vda (the virtio_blk probe is asynchronous to insmod). */
const WAIT_VDA = "n=0; while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done; test -b /dev/vda";

Deno.test({
  name: "UML virtio_blk over vhost-user: synced ext4 files survive kill -9 of the back end " +
    "(UML cannot reconnect, so a new back end and a new UML remount), and the back end serves the next UML",
  ignore: umlReason !== undefined,
  async fn() {
    const { dir, path: socket } = await tempSocketPath("blk.sock");
    const image = `${dir}/disk.img`;
    const mk = await new Deno.Command("mkfs.ext4", { args: ["-q", "-F", image, "64M"] }).output();
    assert.ok(mk.success, new TextDecoder().decode(mk.stderr));
    const files = { "a.txt": lineFile("alpha", 3000), "sub/b.txt": lineFile("beta", 20000) };
    const expected: Record<string, string> = {};
    for (const [n, c] of Object.entries(files)) expected[n] = await sha256Hex(new TextEncoder().encode(c));
    const initramfs: string[] = [];
    let backend = await DeviceProcess.block(socket, image);
    try {
      // 1. Write and sync, then stay up while the back end is killed with SIGKILL.
      initramfs.push(
        await buildInitramfs({
          modules: ["virtio_blk"],
          commands: `${WAIT_VDA}
mount -t ext4 /dev/vda /mnt
mkdir -p /mnt/sub
${writeLines("alpha", 3000, "/mnt/a.txt")}
${writeLines("beta", 20000, "/mnt/sub/b.txt")}
sync
echo SYNCED
sleep 600`,
        }),
      );
      const uml1 = await UmlMachine.start({
        initramfs: initramfs[0],
        vhostUser: [{ socket, deviceId: VIRTIO_ID_BLOCK }],
      });
      await uml1.waitFor(/SYNCED/);
      backend.kill("SIGKILL");
      const st = await backend.exited;
      assert.equal(st.signal, "SIGKILL");
      uml1.kill();
      await uml1.wait();

      // 2. A new back end on the same path (the stale socket file is replaced) and a new UML.
      backend = await DeviceProcess.block(socket, image);
      const verify = Object.keys(files).map((f) => `echo "SUM ${f} $(sha256sum /mnt/${f} | cut -d' ' -f1)"`).join(
        "\n",
      );
      initramfs.push(
        await buildInitramfs({
          modules: ["virtio_blk"],
          commands: `${WAIT_VDA}
mount -t ext4 /dev/vda /mnt
${verify}
echo second > /mnt/c.txt
umount /mnt
sync`,
        }),
      );
      const r2 = await (await UmlMachine.start({
        initramfs: initramfs[1],
        vhostUser: [{ socket, deviceId: VIRTIO_ID_BLOCK }],
      })).wait();
      assert.equal(r2.commandStatus, 0, r2.output);
      for (const [f, sum] of Object.entries(expected)) assert.ok(r2.output.includes(`SUM ${f} ${sum}`), r2.output);

      // 3. The same back end serves the next front end: a third UML sees all of it.
      initramfs.push(
        await buildInitramfs({
          modules: ["virtio_blk"],
          commands: `${WAIT_VDA}
mount -t ext4 -o ro /dev/vda /mnt
${verify}
echo "C=$(cat /mnt/c.txt)"
umount /mnt`,
        }),
      );
      const r3 = await (await UmlMachine.start({
        initramfs: initramfs[2],
        vhostUser: [{ socket, deviceId: VIRTIO_ID_BLOCK }],
      })).wait();
      assert.equal(r3.commandStatus, 0, r3.output);
      for (const [f, sum] of Object.entries(expected)) assert.ok(r3.output.includes(`SUM ${f} ${sum}`), r3.output);
      assert.ok(r3.output.includes("C=second"), r3.output);
      // Each UML disconnect was seen by the back end, which went back to listening.
      assert.equal(backend.stderr.match(/front end disconnected/g)?.length, 2, backend.stderr);
    } finally {
      backend.kill("SIGTERM");
      await backend.exited;
      for (const f of initramfs) await Deno.remove(f).catch(() => {});
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "UML virtio_blk over vhost-user: a :read-only image mounts ro, refuses a raw write, stays byte-identical",
  ignore: umlReason !== undefined,
  async fn() {
    const { dir, path: socket } = await tempSocketPath("ro.sock");
    const image = `${dir}/ro.img`;
    const content = `${dir}/content`;
    await Deno.mkdir(content);
    await Deno.writeTextFile(`${content}/hello.txt`, "read-only hello\n");
    const mk = await new Deno.Command("mkfs.ext4", { args: ["-q", "-F", "-d", content, image, "16M"] }).output();
    assert.ok(mk.success, new TextDecoder().decode(mk.stderr));
    const before = await sha256Hex(await Deno.readFile(image));
    const backend = await DeviceProcess.block(socket, `${image}:read-only`);
    let initramfs: string | undefined;
    try {
      initramfs = await buildInitramfs({
        modules: ["virtio_blk"],
        commands: `${WAIT_VDA}
echo "RO=$(cat /sys/block/vda/ro)"
mount -t ext4 -o ro,noload /dev/vda /mnt
echo "HELLO=$(cat /mnt/hello.txt)"
umount /mnt
if dd if=/dev/zero of=/dev/vda bs=4096 count=1 conv=fsync 2>/dev/null; then echo RAW-WRITE-OK; else echo RAW-WRITE-FAILED; fi`,
      });
      const r = await (await UmlMachine.start({ initramfs, vhostUser: [{ socket, deviceId: VIRTIO_ID_BLOCK }] }))
        .wait();
      assert.equal(r.commandStatus, 0, r.output);
      assert.ok(r.output.includes("RO=1"), r.output);
      assert.ok(r.output.includes("HELLO=read-only hello"), r.output);
      assert.ok(r.output.includes("RAW-WRITE-FAILED"), r.output);
      assert.ok(!r.output.includes("RAW-WRITE-OK"), r.output);
    } finally {
      backend.kill("SIGTERM");
      await backend.exited;
      if (initramfs) await Deno.remove(initramfs).catch(() => {});
    }
    assert.equal(await sha256Hex(await Deno.readFile(image)), before, "the image is byte-identical");
    await Deno.remove(dir, { recursive: true });
  },
});
