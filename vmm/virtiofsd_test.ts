import assert from "node:assert/strict";
import {
  SETPRIV_PATH,
  startVirtiofsd,
  unixSocketListening,
  VIRTIOFSD_PATH,
  virtiofsdArgs,
  type VirtiofsdProcess,
} from "./virtiofsd.ts";
import { parseSharedDirOption } from "./cli/devices/shared_dir.ts";
import { HostError } from "../core/exit.ts";
import { withTempDir } from "../test/support/temp_dir.ts";
import { until, VhostUserFrontEnd } from "../test/support/vhost_user_front_end.ts";
import { VhostUserRequest as R } from "../devices/vhost_user/protocol.ts";

/** virtio 1.2 §6: VIRTIO_F_VERSION_1, which every virtio-fs device offers. */
const VIRTIO_F_VERSION_1 = 1n << 32n;

const haveVirtiofsd = (() => {
  try {
    Deno.statSync(VIRTIOFSD_PATH);
    Deno.statSync(SETPRIV_PATH);
    return Deno.uid() === 0;
  } catch {
    return false;
  }
})();
const ignore = !haveVirtiofsd;
if (ignore) console.log(`virtiofsd tests skipped: need ${VIRTIOFSD_PATH} and ${SETPRIV_PATH}, run as root`);

/** The ids of the processes whose command line mentions `needle` (virtiofsd and its sandbox child). */
function processesWith(needle: string): number[] {
  const out: number[] = [];
  for (const e of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(e.name)) continue;
    try {
      const cmdline = Deno.readTextFileSync(`/proc/${e.name}/cmdline`);
      if (cmdline.includes(needle)) out.push(Number(e.name));
    } catch {
      // gone meanwhile
    }
  }
  return out;
}

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

export type { VirtiofsdProcess };
