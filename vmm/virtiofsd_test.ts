import assert from "node:assert/strict";
import { createSharedDirDevice, startVirtiofsd, unixSocketListening, virtiofsdArgs } from "./virtiofsd.ts";
import { parseSharedDirOption } from "./cli/devices/shared_dir.ts";
import { HostError } from "../core/exit.ts";
import { withTempDir } from "../test/support/temp_dir.ts";
import { until, VhostUserFrontEnd } from "../test/support/vhost_user_front_end.ts";
import { VhostUserRequest as R } from "../devices/vhost_user/protocol.ts";
import { VIRTIO_FS_CONFIG_SIZE, VIRTIO_FS_TAG_SIZE } from "../devices/vhost_user/fs.ts";
import { VIRTIO_F_VERSION_1, VIRTIO_ID_FS } from "../devices/virtio/device.ts";
import { VIRTIO_MMIO_STATUS, VIRTIO_STATUS_DEVICE_NEEDS_RESET } from "../devices/virtio/mmio.ts";
import { eventfdWrite, POLLIN, pollSync } from "../ffi/libc.ts";
import { FrontEndRig } from "../test/support/front_end_rig.ts";
import { processesWith } from "../test/support/proc.ts";
import { virtiofsdUnavailable } from "../test/support/virtiofsd.ts";

const unavailable = virtiofsdUnavailable();
const ignore = unavailable !== undefined;
if (ignore) console.log(`virtiofsd tests skipped: ${unavailable}`);

Deno.test("virtiofsd: crosvm's keys become virtiofsd's options", () => {
  const d = parseSharedDirOption("/srv:data:type=fs:cache=never:timeout=60:writeback=true:posix_acl=false", {
    checkPath: false,
  });
  assert.deepEqual(virtiofsdArgs(d, "/run/x/v.sock"), [
    "--socket-path=/run/x/v.sock",
    "-o",
    "source=/srv",
    "-o",
    "cache=none",
    "-o",
    "timeout=60",
    "-o",
    "writeback",
    "-o",
    "xattr",
    "-o",
    "no_posix_acl",
    "-o",
    "no_security_label",
    "-o",
    "log_level=warn",
  ]);
  const x = virtiofsdArgs(
    parseSharedDirOption("/srv:d:type=fs:rewrite-security-xattrs=true:security_ctx=true", { checkPath: false }),
    "/s",
  );
  assert.ok(x.includes("security_label"));
  assert.ok(x.includes("posix_acl"));
  assert.ok(x.some((a) => a.startsWith("xattrmap=:ok:all:security.selinux:")));
});

Deno.test("virtiofsd: unixSocketListening reads /proc/net/unix's listening flag", async () => {
  await withTempDir("denovm-vfsd-", (dir) => {
    const path = `${dir}/l.sock`;
    assert.equal(unixSocketListening(path), false);
    const l = Deno.listen({ transport: "unix", path });
    try {
      assert.equal(unixSocketListening(path), true);
    } finally {
      l.close();
    }
    assert.equal(unixSocketListening(path), false);
    return Promise.resolve();
  });
});

Deno.test({
  name: "virtiofsd: starts, its socket answers the vhost-user handshake, it is gone after stop",
  ignore,
  async fn() {
    await withTempDir("denovm-vfsd-", async (dir) => {
      Deno.mkdirSync(`${dir}/share`);
      Deno.mkdirSync(`${dir}/run`, { mode: 0o700 });
      const lines: string[] = [];
      const cfg = parseSharedDirOption(`${dir}/share:myfs:type=fs`);
      const v = await startVirtiofsd(cfg, { runtimeDir: `${dir}/run`, log: (l) => lines.push(l) });
      let front: VhostUserFrontEnd | undefined;
      try {
        assert.equal(v.socketPath, `${dir}/run/virtiofsd-myfs.sock`);
        assert.ok(unixSocketListening(v.socketPath));
        front = VhostUserFrontEnd.connect(v.socketPath);
        const features = await front.callU64(R.GET_FEATURES);
        assert.ok(features & VIRTIO_F_VERSION_1, `features ${features.toString(16)}`);
        const queues = await front.callU64(R.GET_QUEUE_NUM).catch(() => undefined);
        // QEMU's C virtiofsd offers MQ; when it answers, it has at least the hiprio and one request queue.
        if (queues !== undefined) assert.ok(queues >= 2n, `queues ${queues}`);
        assert.ok(processesWith(v.socketPath).includes(v.pid));
      } finally {
        front?.close();
        await v.stop();
      }
      assert.deepEqual(processesWith(v.socketPath), []);
      assert.throws(() => Deno.lstatSync(v.socketPath), Deno.errors.NotFound);
      await v.stop(); // idempotent
    });
  },
});

Deno.test({
  name: "virtiofsd: a source it cannot serve is one HostError line",
  ignore,
  async fn() {
    await withTempDir("denovm-vfsd-", async (dir) => {
      const cfg = parseSharedDirOption(`${dir}/absent:t:type=fs`, { checkPath: false });
      await assert.rejects(
        () => startVirtiofsd(cfg, { runtimeDir: dir, log: () => {} }),
        (e: unknown) => {
          assert.ok(e instanceof HostError, String(e));
          assert.ok(!e.message.includes("\n"));
          assert.match(e.message, /--shared-dir t: virtiofsd ended before its socket listened: /);
          return true;
        },
      );
      assert.deepEqual(processesWith(`${dir}/absent`), []);
    });
  },
});

Deno.test({
  name: "virtiofsd: gone when the denovm process that started it is killed, connected or not",
  ignore,
  async fn() {
    for (const connect of [false, true]) {
      await withTempDir("denovm-vfsd-", async (dir) => {
        Deno.mkdirSync(`${dir}/share`);
        const url = new URL("./virtiofsd.ts", import.meta.url).href;
        const shared = new URL("./cli/devices/shared_dir.ts", import.meta.url).href;
        const code = `
          import { startVirtiofsd } from ${JSON.stringify(url)};
          import { parseSharedDirOption } from ${JSON.stringify(shared)};
          const v = await startVirtiofsd(parseSharedDirOption(${JSON.stringify(`${dir}/share:k:type=fs`)}),
            { runtimeDir: ${JSON.stringify(dir)}, log: () => {} });
          console.log(JSON.stringify({ pid: v.pid, socket: v.socketPath }));
          setInterval(() => {}, 1000);
        `;
        const parent = new Deno.Command(Deno.execPath(), {
          args: ["eval", "--no-check", code],
          stdout: "piped",
          stderr: "inherit",
        }).spawn();
        const reader = parent.stdout.pipeThrough(new TextDecoderStream()).getReader();
        let text = "";
        while (!text.includes("\n")) {
          const { value, done } = await reader.read();
          if (done) break;
          text += value;
        }
        const { pid, socket } = JSON.parse(text) as { pid: number; socket: string };
        let front: VhostUserFrontEnd | undefined;
        try {
          assert.ok(processesWith(socket).includes(pid));
          if (connect) {
            // Connected, virtiofsd sets up its sandbox: a second process in its own pid namespace.
            front = VhostUserFrontEnd.connect(socket);
            await front.callU64(R.GET_FEATURES);
            await until(() => processesWith(socket).length >= 2, "virtiofsd's sandbox child");
          }
          parent.kill("SIGKILL");
          await parent.status;
          await until(() => processesWith(socket).length === 0, "virtiofsd to end with its parent");
        } finally {
          front?.close();
          reader.releaseLock();
          await parent.stdout.cancel().catch(() => {});
          for (const p of processesWith(socket)) Deno.kill(p, "SIGKILL");
        }
      });
    }
  },
});

// FUSE wire format (Linux include/uapi/linux/fuse.h).
/** FUSE_LOOKUP and FUSE_INIT opcodes. */
const FUSE_LOOKUP = 1;
const FUSE_INIT = 26;
/** struct fuse_in_header: len, opcode, unique (u64), nodeid (u64), uid, gid, pid, total_extlen (u16), padding. */
const FUSE_IN_HEADER_SIZE = 40;
/** struct fuse_out_header: len, error (i32), unique (u64). */
const FUSE_OUT_HEADER_SIZE = 16;
/**
 * struct fuse_init_in as a 7.31 client sends it: major, minor, max_readahead, flags (the fields after flags
 * come with FUSE_INIT_EXT, which this request does not set, and virtiofsd refuses bytes it did not expect).
 */
const FUSE_INIT_IN_SIZE = 16;
/** struct fuse_init_out (7.36): 64 bytes. */
const FUSE_INIT_OUT_SIZE = 64;
/** struct fuse_entry_out: nodeid, generation, entry/attr valid (u64 each), their nsec (u32 each), struct fuse_attr (88). */
const FUSE_ENTRY_OUT_SIZE = 128;
/** Offset of fuse_attr.size in fuse_entry_out: after the 40 bytes of ids and timeouts, attr.ino (u64). */
const ENTRY_OUT_ATTR_SIZE_OFFSET = 48;
/**
 * What the test client says it can do: every fuse_init_in flag but FUSE_INIT_EXT (1 << 30, which would
 * announce flags2 and the longer struct); virtiofsd refuses an INIT whose flags lack what it requires.
 */
const FUSE_INIT_FLAGS = 0xffff_ffff & ~(1 << 30);
/** The protocol version the request speaks. */
const FUSE_KERNEL_VERSION = 7;
const FUSE_KERNEL_MINOR_VERSION = 31;
/** The root directory's node id. */
const FUSE_ROOT_ID = 1n;

const QUEUE_SIZE = 16;
/** virtio 1.2 §5.11.2: queue 1 is the first request queue. */
const REQUEST_QUEUE = 1;

function fuseRequest(opcode: number, unique: bigint, nodeid: bigint, body: Uint8Array): Uint8Array {
  const b = new Uint8Array(FUSE_IN_HEADER_SIZE + body.length);
  const v = new DataView(b.buffer);
  v.setUint32(0, b.length, true);
  v.setUint32(4, opcode, true);
  v.setBigUint64(8, unique, true);
  v.setBigUint64(16, nodeid, true);
  b.set(body, FUSE_IN_HEADER_SIZE);
  return b;
}

Deno.test({
  name:
    "virtiofsd: the --shared-dir device answers FUSE_INIT and FUSE_LOOKUP put on its request queue; closing it stops virtiofsd",
  ignore,
  async fn() {
    await withTempDir("denovm-vu-fs-", async (dir) => {
      Deno.mkdirSync(`${dir}/share`);
      Deno.writeTextFileSync(`${dir}/share/hello.txt`, "hello from the host\n");
      const lines: string[] = [];
      const dev = await createSharedDirDevice(parseSharedDirOption(`${dir}/share:myfs:type=fs`), {
        log: (l) => lines.push(l),
      });
      const [pid] = processesWith(`source=${dir}/share`);
      assert.ok(pid !== undefined, "virtiofsd runs");
      const rig = new FrontEndRig(dev, { queues: REQUEST_QUEUE + 1 });
      const { mem, irqFd } = rig;
      try {
        assert.equal(dev.deviceType, VIRTIO_ID_FS);
        assert.ok(dev.features & VIRTIO_F_VERSION_1);
        assert.deepEqual(
          dev.queueMaxSizes,
          [1024, 1024],
          "the high-priority queue and one request queue, crosvm's size",
        );
        const drv = rig.driver(() => eventfdWrite(irqFd));
        const cfg = drv.readConfig(0, VIRTIO_FS_CONFIG_SIZE);
        assert.equal(new TextDecoder().decode(cfg.subarray(0, 4)), "myfs");
        assert.equal(cfg[4], 0);
        assert.equal(new DataView(cfg.buffer, cfg.byteOffset).getUint32(VIRTIO_FS_TAG_SIZE, true), 1);
        drv.init({ queueSize: QUEUE_SIZE });
        assert.equal(drv.readReg(VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_DEVICE_NEEDS_RESET, 0);
        const q = drv.queues[REQUEST_QUEUE];

        const initIn = new Uint8Array(FUSE_INIT_IN_SIZE);
        new DataView(initIn.buffer).setUint32(0, FUSE_KERNEL_VERSION, true);
        new DataView(initIn.buffer).setUint32(4, FUSE_KERNEL_MINOR_VERSION, true);
        new DataView(initIn.buffer).setUint32(12, FUSE_INIT_FLAGS, true);
        const init = q.submit([fuseRequest(FUSE_INIT, 1n, 0n, initIn), FUSE_OUT_HEADER_SIZE + FUSE_INIT_OUT_SIZE]);
        rig.notify(REQUEST_QUEUE);
        await until(() => q.usedIdx() === 1, "FUSE_INIT's reply");
        await until(() => (pollSync([irqFd], POLLIN, 0)[0] & POLLIN) !== 0, "the irqfd");
        const initOut = mem.read(init.buffers[1].addr, FUSE_OUT_HEADER_SIZE + FUSE_INIT_OUT_SIZE);
        const io = new DataView(initOut.buffer, initOut.byteOffset);
        assert.equal(io.getInt32(4, true), 0, "FUSE_INIT's error");
        assert.equal(io.getBigUint64(8, true), 1n, "FUSE_INIT's unique");
        assert.equal(io.getUint32(FUSE_OUT_HEADER_SIZE, true), FUSE_KERNEL_VERSION);

        const name = new TextEncoder().encode("hello.txt\0");
        const lookup = q.submit([
          fuseRequest(FUSE_LOOKUP, 2n, FUSE_ROOT_ID, name),
          FUSE_OUT_HEADER_SIZE + FUSE_ENTRY_OUT_SIZE,
        ]);
        rig.notify(REQUEST_QUEUE);
        await until(() => q.usedIdx() === 2, "FUSE_LOOKUP's reply");
        const entry = mem.read(lookup.buffers[1].addr, FUSE_OUT_HEADER_SIZE + FUSE_ENTRY_OUT_SIZE);
        const ev = new DataView(entry.buffer, entry.byteOffset);
        assert.equal(ev.getInt32(4, true), 0, "FUSE_LOOKUP's error");
        assert.equal(
          ev.getBigUint64(FUSE_OUT_HEADER_SIZE + ENTRY_OUT_ATTR_SIZE_OFFSET, true),
          BigInt("hello from the host\n".length),
        );
        assert.deepEqual(lines, [], "nothing logged");
      } finally {
        // Closing twice is harmless (rig.close() closes it again).
        dev.close();
        await rig.close();
      }
      await until(() => processesWith(`source=${dir}/share`).length === 0, "virtiofsd to end with the device");
      assert.deepEqual(lines, [], "nothing logged, not even virtiofsd's end");
    });
  },
});
