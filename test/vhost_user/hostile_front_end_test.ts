// `denovm device` against hostile front ends and careless users, over its real socket: kick fds that are
// not plain eventfds (a pipe whose writer is gone, /dev/zero, a semaphore eventfd), ring sizes above the
// device's maximum, a second back end on a live socket path, and a disk image another process holds locked.

import assert from "node:assert/strict";
import {
  check,
  closeFd,
  cstr,
  EFD_CLOEXEC,
  EFD_NONBLOCK,
  EFD_SEMAPHORE,
  eventfd,
  eventfdRead,
  eventfdWrite,
  libc,
  LOCK_EX,
  LOCK_NB,
  MAP_SHARED,
  MFD_CLOEXEC,
  mmap,
  munmap,
  O_CLOEXEC,
  O_NONBLOCK,
  O_RDONLY,
  O_RDWR,
  openFile,
  PROT_READ,
  PROT_WRITE,
} from "../../ffi/libc.ts";
import { GuestMemory } from "../../core/memory.ts";
import { ConnectionClosed } from "../../core/unix_socket.ts";
import { EXIT_HOST_ERROR, EXIT_INVALID_ARGS } from "../../core/exit.ts";
import type { ActivateContext, VirtioDevice } from "../../devices/virtio/device.ts";
import { VIRTIO_F_VERSION_1 } from "../../devices/virtio/device.ts";
import { VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE } from "../../devices/virtio/queue.ts";
import {
  BLK_OUTHDR_SIZE,
  BLOCK_QUEUE_SIZE,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_T_IN,
} from "../../devices/virtio/block/device.ts";
import { BACKEND_PROTOCOL_FEATURES, type FdInspector, VhostUserBackend } from "../../devices/vhost_user/backend.ts";
import {
  memTablePayload,
  readMessage,
  u64Payload,
  VHOST_USER_F_PROTOCOL_FEATURES,
  VhostUserRequest as R,
  vringAddrPayload,
  vringStatePayload,
} from "../../devices/vhost_user/protocol.ts";
import { debianKernel } from "../support/kernel.ts";
import { within } from "../support/within.ts";
import {
  clockTicksPerSecond,
  cpuTicks,
  DeviceProcess,
  HANG_GUARD_MS,
  u64,
  until,
  VhostUserFrontEnd,
} from "../support/vhost_user_front_end.ts";

const MAIN = new URL("../../main.ts", import.meta.url).pathname;
/** How long the back end's CPU time is watched while a hostile front end stays connected. */
const WATCH_MS = 2000;

async function tempDir(): Promise<string> {
  return await Deno.makeTempDir({ prefix: "denovm-vu-hostile-" });
}

async function image(dir: string, name: string): Promise<string> {
  const path = `${dir}/${name}`;
  await Deno.writeFile(path, new Uint8Array(1 << 20));
  return path;
}

/** Feature and protocol negotiation as QEMU does it; returns the features acked. */
async function negotiate(fe: VhostUserFrontEnd): Promise<bigint> {
  const features = u64(await fe.call(R.GET_FEATURES));
  assert.equal(u64(await fe.call(R.GET_PROTOCOL_FEATURES)), BACKEND_PROTOCOL_FEATURES);
  await fe.send(R.SET_PROTOCOL_FEATURES, u64Payload(BACKEND_PROTOCOL_FEATURES));
  assert.equal(await fe.ack(R.SET_FEATURES, u64Payload(features)), 0n);
  return features;
}

/**
 * Sends `fd` as ring 0's kick fd (with NEED_REPLY). Returns the status, or "dropped" when the back end
 * hung up instead of answering.
 */
async function sendKick(fe: VhostUserFrontEnd, fd: number): Promise<bigint | "dropped"> {
  try {
    return await fe.ack(R.SET_VRING_KICK, u64Payload(0n), [fd]);
  } catch (e) {
    if (e instanceof ConnectionClosed) return "dropped";
    throw e;
  }
}

/** The two ends of a new pipe (O_CLOEXEC | O_NONBLOCK). */
function pipe(): [number, number] {
  const fds = new Int32Array(2);
  check("pipe2", libc().pipe2(new Uint8Array(fds.buffer), O_CLOEXEC | O_NONBLOCK));
  return [fds[0], fds[1]];
}

/** The hostile kick fds, each with what the back end's log line must call it. */
const BAD_KICKS: { name: string; make: () => number; named: RegExp }[] = [
  {
    name: "a pipe whose writer is closed",
    make: () => {
      const [r, w] = pipe();
      closeFd(w);
      return r;
    },
    named: /pipe/,
  },
  { name: "/dev/zero", make: () => openFile("/dev/zero", O_RDONLY), named: /\/dev\/zero/ },
  {
    name: "a semaphore eventfd holding 2^40",
    make: () => {
      const fd = eventfd(0, EFD_SEMAPHORE | EFD_CLOEXEC | EFD_NONBLOCK);
      eventfdWrite(fd, 1n << 40n);
      return fd;
    },
    named: /semaphore/,
  },
];

Deno.test(
  "denovm device block: a kick fd that is not a plain eventfd is refused with one line, the back end " +
    "does not spin while that front end stays, and it serves the next front end",
  async () => {
    const dir = await tempDir();
    const socket = `${dir}/blk.sock`;
    const backend = await DeviceProcess.block(socket, await image(dir, "disk.img"));
    const tick = clockTicksPerSecond();
    try {
      for (const bad of BAD_KICKS) {
        const fe = VhostUserFrontEnd.connect(socket);
        await negotiate(fe);
        assert.equal(await fe.ack(R.SET_VRING_NUM, vringStatePayload({ index: 0, num: BLOCK_QUEUE_SIZE })), 0n);
        const before = backend.lines.length;
        const fd = bad.make();
        const status = await sendKick(fe, fd);
        closeFd(fd);
        assert.notEqual(status, 0n, `${bad.name}: the kick fd was accepted`);

        // The front end stays connected (or was dropped); either way the back end must be idle.
        const cpu0 = cpuTicks(backend.pid)!;
        const wall0 = performance.now();
        await new Promise((r) => setTimeout(r, WATCH_MS));
        const cpu1 = cpuTicks(backend.pid)!;
        const wall = (performance.now() - wall0) / 1000;
        const cpu = (cpu1 - cpu0) / tick;
        assert.ok(cpu < wall / 2, `${bad.name}: the back end used ${cpu} s of CPU in ${wall} s: it spins`);

        const added = backend.lines.slice(before);
        assert.equal(added.length, 1, `${bad.name}: expected one line, got:\n${added.join("\n")}`);
        assert.match(added[0], /queue 0/);
        assert.match(added[0], bad.named);
        fe.close();

        // The next front end is served.
        const next = VhostUserFrontEnd.connect(socket);
        assert.equal(u64(await next.call(R.GET_PROTOCOL_FEATURES)), BACKEND_PROTOCOL_FEATURES);
        next.close();
      }
    } finally {
      backend.kill("SIGTERM");
      const st = await backend.exited;
      await Deno.remove(dir, { recursive: true });
      assert.equal(st.code, 0, backend.stderr);
    }
  },
);

/** A device with one ring that counts its notifications. */
class CountingDevice implements VirtioDevice {
  readonly deviceType = 2;
  readonly name = "counting";
  readonly queueMaxSizes = [8];
  readonly features = VIRTIO_F_VERSION_1;
  notifies = 0;
  readConfig(_offset: number, data: Uint8Array): void {
    data.fill(0);
  }
  writeConfig(): void {}
  activate(_ctx: ActivateContext): void {}
  queueNotify(): void {
    this.notifies++;
  }
  reset(): void {}
}

/** /proc as seen on a host without it: nothing can be told about a descriptor. */
const NO_PROC: FdInspector = { link: () => undefined, info: () => undefined };
/** /proc of a kernel whose fdinfo does not show an eventfd's semaphore mode. */
const OLD_FDINFO: FdInspector = {
  link: (fd) => Deno.readLinkSync(`/proc/self/fd/${fd}`),
  info: (fd) => Deno.readTextFileSync(`/proc/self/fdinfo/${fd}`).replace(/^eventfd-semaphore:.*\n/m, ""),
};

/** Where the kick fd cannot be checked up front, the kick loop finds it out and drops the front end. */
const RUNTIME_CASES: { proc: string; inspector: FdInspector; kick: number; named: RegExp }[] = [
  { proc: "no /proc", inspector: NO_PROC, kick: 0, named: /reported POLLHUP/ },
  { proc: "no /proc", inspector: NO_PROC, kick: 1, named: /not an eventfd/ },
  { proc: "no /proc", inspector: NO_PROC, kick: 2, named: /semaphore/ },
  { proc: "fdinfo without eventfd-semaphore", inspector: OLD_FDINFO, kick: 2, named: /semaphore/ },
];

Deno.test(
  "vhost-user back end: where /proc cannot tell a bad kick fd (no /proc, or fdinfo without the " +
    "semaphore mode), the kick loop drops the front end with one line instead of spinning",
  async () => {
    for (const c of RUNTIME_CASES) {
      const bad = BAD_KICKS[c.kick];
      const what = `${bad.name}, ${c.proc}`;
      const dir = await tempDir();
      const path = `${dir}/s.sock`;
      const logs: string[] = [];
      const device = new CountingDevice();
      const backend = new VhostUserBackend(device, path, { log: (l) => logs.push(l), fdInspector: c.inspector });
      const served = backend.serve();
      await backend.listening;
      try {
        const fe = VhostUserFrontEnd.connect(path);
        await negotiate(fe);
        const fd = bad.make();
        const status = await sendKick(fe, fd);
        closeFd(fd);
        assert.ok(status === 0n || status === "dropped", `${what}: ${status}`);
        await within(
          readMessage(fe.sock, true).then(() => assert.fail(`${what}: a message instead of a hang-up`), (e) => {
            if (!(e instanceof ConnectionClosed)) throw e;
          }),
          () => `${what}: the back end to drop the front end (log: ${logs.join(" | ")})`,
          HANG_GUARD_MS,
        );
        fe.close();
        await until(() => backend.counters === undefined, `${what}: the session to end`);
        const kickLines = logs.filter((l) => /kick/.test(l));
        assert.equal(kickLines.length, 1, `${what}:\n${logs.join("\n")}`);
        assert.match(kickLines[0], /^dropping the front end: queue 0: the kick fd /);
        assert.match(kickLines[0], c.named);
        assert.equal(device.notifies, 0, `${what}: the device was notified`);
        const next = VhostUserFrontEnd.connect(path);
        assert.equal(u64(await next.call(R.GET_PROTOCOL_FEATURES)), BACKEND_PROTOCOL_FEATURES);
        next.close();
      } finally {
        backend.close();
        await served;
        await Deno.remove(dir, { recursive: true });
      }
    }
  },
);

// Guest layout for the ring-size test: 1 MiB of guest memory at guest-physical 1 GiB in a memfd; the
// front end's "virtual" addresses are elsewhere. Room for a ring of 32768 (virtio 1.2 section 2.7: 16-byte
// descriptors, 2-byte avail and 8-byte used elements), then a block read: header, 512 data bytes, status.
const GUEST_BASE = 0x4000_0000;
const REGION_SIZE = 0x10_0000;
const USER_BASE = 0x7f00_0000_0000n;
/** The largest split ring (virtio 1.2 section 2.7), what crosvm's vhost-user front end offers by default. */
const SPLIT_RING_MAX = 32768;
const DESC = GUEST_BASE;
const AVAIL = GUEST_BASE + 0x8_0000;
const USED = GUEST_BASE + 0x9_1000;
const HDR = GUEST_BASE + 0xe_0000;
const DATA = GUEST_BASE + 0xe_1000;
const STATUS = GUEST_BASE + 0xe_2000;
const SECTOR = 512;
/** Split-ring offsets (virtio 1.2 section 2.7): avail idx at 2, ring at 4; used idx at 2. */
const AVAIL_IDX = 2;
const AVAIL_RING = 4;
const USED_IDX = 2;
/** A descriptor: u64 addr, u32 len, u16 flags, u16 next (virtio 1.2 section 2.7.5). */
const DESC_SIZE = 16;

function user(gpa: number): bigint {
  return USER_BASE + BigInt(gpa - GUEST_BASE);
}

function guestMemory(): { fd: number; mem: GuestMemory; unmap: () => void } {
  const fd = check("memfd_create", libc().memfd_create(cstr("denovm-test-guest"), MFD_CLOEXEC));
  check("ftruncate", libc().ftruncate(fd, BigInt(REGION_SIZE)));
  const ptr = mmap(REGION_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const mem = new GuestMemory([{
    guestBase: GUEST_BASE,
    size: REGION_SIZE,
    hostAddr: BigInt(Deno.UnsafePointer.value(ptr)),
  }]);
  return { fd, mem, unmap: () => munmap(ptr, REGION_SIZE) };
}

/** Publish a read of sector 0 as chain 0 (header, data, status) with avail idx 1. */
function publishRead(mem: GuestMemory): void {
  mem.setU32(HDR, VIRTIO_BLK_T_IN);
  mem.setU64(HDR + 8, 0n);
  mem.setU8(STATUS, 0xff);
  const chain: [number, number, number][] = [
    [HDR, BLK_OUTHDR_SIZE, VIRTQ_DESC_F_NEXT],
    [DATA, SECTOR, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT],
    [STATUS, 1, VIRTQ_DESC_F_WRITE],
  ];
  chain.forEach(([addr, len, flags], i) => {
    const d = DESC + i * DESC_SIZE;
    mem.setU64(d, BigInt(addr));
    mem.setU32(d + 8, len);
    mem.setU16(d + 12, flags);
    mem.setU16(d + 14, i + 1);
  });
  mem.setU16(AVAIL + AVAIL_RING, 0);
  mem.setU16(AVAIL + AVAIL_IDX, 1);
}

Deno.test(
  "denovm device block: SET_VRING_NUM 0, not a power of 2 or above 32768 gets a failure reply (the " +
    "connection stays) and the ring is not started; 32768, which crosvm's front end offers, works",
  async () => {
    const dir = await tempDir();
    const socket = `${dir}/blk.sock`;
    const disk = await image(dir, "disk.img");
    await Deno.writeFile(disk, new Uint8Array(SECTOR).fill(0x5a));
    const backend = await DeviceProcess.block(socket, disk);
    const shm = guestMemory();
    const kick = eventfd();
    const call = eventfd();
    try {
      const fe = VhostUserFrontEnd.connect(socket);
      await negotiate(fe);
      const table = memTablePayload([{
        guestPhysAddr: BigInt(GUEST_BASE),
        memorySize: BigInt(REGION_SIZE),
        userspaceAddr: USER_BASE,
        mmapOffset: 0n,
      }]);
      assert.equal(await fe.ack(R.SET_MEM_TABLE, table, [shm.fd]), 0n);
      const before = backend.lines.length;
      const refused = [SPLIT_RING_MAX * 2, 0, 100, 0xffff_ffff];
      for (const num of refused) {
        assert.equal(await fe.ack(R.SET_VRING_NUM, vringStatePayload({ index: 0, num })), 1n, `queue size ${num}`);
      }
      // stderr arrives through a pipe: wait for a line per refusal, then check there are no others.
      await until(() => backend.lines.length >= before + refused.length, "a line for each refused size");
      const added = backend.lines.slice(before);
      assert.equal(added.length, refused.length, added.join("\n"));
      refused.forEach((num, i) => assert.match(added[i], new RegExp(`queue 0: size ${num} `)));
      // The rest of the ring setup succeeds; the ring has no size, so it is not started.
      assert.equal(await fe.ack(R.SET_VRING_BASE, vringStatePayload({ index: 0, num: 0 })), 0n);
      const addr = { index: 0, flags: 0, desc: user(DESC), used: user(USED), avail: user(AVAIL), log: 0n };
      assert.equal(await fe.ack(R.SET_VRING_ADDR, vringAddrPayload(addr)), 0n);
      assert.equal(await fe.ack(R.SET_VRING_CALL, u64Payload(0n), [call]), 0n);
      assert.equal(await fe.ack(R.SET_VRING_KICK, u64Payload(0n), [kick]), 0n);
      assert.equal(await fe.ack(R.SET_VRING_ENABLE, vringStatePayload({ index: 0, num: 1 })), 0n);
      publishRead(shm.mem);
      eventfdWrite(kick);
      // A round trip: the back end handles a kick that was readable before the message it answers.
      await fe.call(R.GET_FEATURES);
      assert.equal(shm.mem.getU16(USED + USED_IDX), 0, "a ring without a valid size served a request");
      assert.equal(eventfdRead(call), 0n, "interrupt from a ring that must not run");

      // The largest split ring is accepted, and the same request is then served.
      assert.equal(await fe.ack(R.SET_VRING_NUM, vringStatePayload({ index: 0, num: SPLIT_RING_MAX })), 0n);
      eventfdWrite(kick);
      await until(() => shm.mem.getU16(USED + USED_IDX) === 1, "the read to complete");
      assert.equal(shm.mem.getU8(STATUS), VIRTIO_BLK_S_OK);
      assert.deepEqual([...shm.mem.read(DATA, 4)], [0x5a, 0x5a, 0x5a, 0x5a]);
      fe.close();
    } finally {
      backend.kill("SIGTERM");
      await backend.exited;
      shm.unmap();
      closeFd(shm.fd);
      closeFd(kick);
      closeFd(call);
      await Deno.remove(dir, { recursive: true });
    }
  },
);

Deno.test(
  "denovm device block: a live socket path is refused (35, one line) and left to its owner; a stale " +
    "socket file is taken over",
  async () => {
    const dir = await tempDir();
    const socket = `${dir}/blk.sock`;
    const first = await DeviceProcess.block(socket, await image(dir, "a.img"));
    let third: DeviceProcess | undefined;
    try {
      const ino = Deno.lstatSync(socket).ino;
      const second = DeviceProcess.spawn("block", ["--socket-path", socket, "--file", await image(dir, "b.img")]);
      let st: Deno.CommandStatus;
      try {
        st = await within(second.exited, () => `the second back end to exit (stderr: ${second.stderr})`, HANG_GUARD_MS);
      } finally {
        second.kill("SIGKILL");
      }
      assert.equal(st.code, EXIT_INVALID_ARGS, second.stderr);
      assert.equal(second.lines.length, 1, second.stderr);
      assert.match(second.lines[0], /^denovm device block: .*blk\.sock.* in use/);
      // The first still owns the path and answers on it.
      assert.equal(Deno.lstatSync(socket).ino, ino, "the socket file was replaced");
      const fe = VhostUserFrontEnd.connect(socket);
      assert.equal(u64(await fe.call(R.GET_PROTOCOL_FEATURES)), BACKEND_PROTOCOL_FEATURES);
      fe.close();

      // Killed, the first leaves a stale socket file: the next back end replaces it.
      first.kill("SIGKILL");
      await first.exited;
      assert.ok(Deno.lstatSync(socket).isSocket);
      third = await DeviceProcess.block(socket, await image(dir, "c.img"));
      const fe3 = VhostUserFrontEnd.connect(socket);
      assert.equal(
        u64(await fe3.call(R.GET_FEATURES)) & VHOST_USER_F_PROTOCOL_FEATURES,
        VHOST_USER_F_PROTOCOL_FEATURES,
      );
      fe3.close();
    } finally {
      first.kill("SIGKILL");
      await first.exited;
      if (third) {
        third.kill("SIGTERM");
        assert.equal((await third.exited).code, 0, third.stderr);
        assert.throws(() => Deno.lstatSync(socket), Deno.errors.NotFound, "the third removes its own socket");
      }
      await Deno.remove(dir, { recursive: true });
    }
  },
);

Deno.test(
  "a disk image another process holds locked: `denovm run` and `denovm device block` exit as crosvm " +
    "does (1, its error exit) with the same one line",
  async () => {
    const dir = await tempDir();
    const disk = await image(dir, "locked.img");
    const holder = openFile(disk, O_RDWR);
    check("flock", libc().flock(holder, LOCK_EX | LOCK_NB));
    try {
      const kernel = await debianKernel();
      const device = await new Deno.Command(Deno.execPath(), {
        args: ["run", "-A", MAIN, "device", "block", "--socket-path", `${dir}/s.sock`, "--file", disk],
        stdin: "null",
        stdout: "null",
        stderr: "piped",
      }).output();
      const run = await new Deno.Command(Deno.execPath(), {
        args: ["run", "-A", MAIN, "run", "--block", disk, kernel.vmlinuz],
        // The disk is opened before KVM: no KVM device is needed to reach it.
        env: { DENOVM_KVM_DEVICE: "/nonexistent/kvm" },
        stdin: "null",
        stdout: "null",
        stderr: "piped",
      }).output();
      const lines = (b: Uint8Array) => new TextDecoder().decode(b).trimEnd().split("\n");
      const deviceLines = lines(device.stderr);
      const runLines = lines(run.stderr);
      assert.equal(device.code, EXIT_HOST_ERROR, deviceLines.join("\n"));
      assert.equal(run.code, EXIT_HOST_ERROR, runLines.join("\n"));
      assert.equal(deviceLines.length, 1, deviceLines.join("\n"));
      assert.equal(runLines.length, 1, runLines.join("\n"));
      assert.match(deviceLines[0], /^denovm device block: /);
      assert.match(runLines[0], /^denovm: /);
      const body = (l: string) => l.replace(/^denovm( device block)?: /, "");
      assert.equal(body(runLines[0]), body(deviceLines[0]));
      assert.match(body(runLines[0]), /locked\.img is in use by another process/);
      assert.throws(() => Deno.lstatSync(`${dir}/s.sock`), Deno.errors.NotFound, "no socket left behind");
    } finally {
      closeFd(holder);
      await Deno.remove(dir, { recursive: true });
    }
  },
);
