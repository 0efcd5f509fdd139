// `denovm device net` driven by the real Linux virtio_net driver in user-mode Linux over
// vhost-user (test/support/uml.ts). Everything host-side runs in a network namespace the test
// creates: tap0 with 10.0.2.1/24, the back end (`ip netns exec NS deno run -A main.ts device net
// --socket-path S --tap-name tap0`) and a small Deno HTTP server on 10.0.2.1. UML itself needs no
// namespace: it talks to the back end over the Unix socket only. The guest configures eth0 as
// 10.0.2.2/24, pings the host, downloads a file and uploads one; the test compares bytes and
// digests on both sides. No traffic leaves the namespace.

import assert from "node:assert/strict";
import { buildInitramfs, UmlMachine, umlUnavailableReason } from "../support/uml.ts";
import { VIRTIO_ID_NET } from "../../devices/virtio/device.ts";

const REPO = new URL("../../", import.meta.url).pathname;
/** A hang guard for waits on host processes (a broken back end fails the test instead of hanging it). */
const HANG_GUARD_MS = 30_000;
const HTTP_PORT = 8080;
/** Size of the file the guest downloads: big enough for many full-size and (with TSO) GSO frames. */
const BLOB_SIZE = 3 * 1024 * 1024 + 12345;
/** The guest uploads `seq 1 UPLOAD_LINES`. */
const UPLOAD_LINES = 100_000;

const dec = new TextDecoder();

async function run(cmd: string, args: string[]): Promise<{ ok: boolean; out: string }> {
  try {
    const o = await new Deno.Command(cmd, { args, stdout: "piped", stderr: "piped" }).output();
    return { ok: o.success, out: dec.decode(o.stdout) + dec.decode(o.stderr) };
  } catch (e) {
    return { ok: false, out: (e as Error).message };
  }
}

const netnsReason = await (async () => {
  if (Deno.build.os !== "linux") return "network namespaces need Linux";
  const name = `denovm-probe-${Deno.pid}`;
  const add = await run("ip", ["netns", "add", name]);
  if (!add.ok) return `ip netns add failed (needs iproute2 and CAP_SYS_ADMIN): ${add.out.trim()}`;
  await run("ip", ["netns", "del", name]);
  return undefined;
})();
const reason = umlUnavailableReason() ?? netnsReason;
if (reason) console.log(`skipping UML virtio_net tests: ${reason}`);

function blob(): Uint8Array<ArrayBuffer> {
  const b = new Uint8Array(BLOB_SIZE);
  let x = 0x12345678;
  for (let i = 0; i < b.length; i++) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0; // an LCG: incompressible enough, reproducible
    b[i] = x >>> 24;
  }
  return b;
}

async function sha256Hex(data: Uint8Array<ArrayBuffer>): Promise<string> {
  const d = await crypto.subtle.digest("SHA-256", data);
  return [...new Uint8Array(d)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/** A process whose stderr/stdout we collect, started inside the namespace. */
class NsProcess {
  readonly child: Deno.ChildProcess;
  out = "";
  readonly exited: Promise<Deno.CommandStatus>;
  #done = false;

  constructor(ns: string, cmd: string[], env: Record<string, string> = {}) {
    this.child = new Deno.Command("ip", {
      args: ["netns", "exec", ns, ...cmd],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
      env: { NO_COLOR: "1", ...env },
    }).spawn();
    const pump = async (s: ReadableStream<Uint8Array>) => {
      const d = new TextDecoder();
      for await (const c of s) this.out += d.decode(c, { stream: true });
    };
    this.exited = Promise.all([this.child.status, pump(this.child.stdout), pump(this.child.stderr)]).then(([s]) => {
      this.#done = true;
      return s;
    });
  }

  async waitFor(re: RegExp, what: string): Promise<void> {
    const end = Date.now() + HANG_GUARD_MS;
    while (!re.test(this.out)) {
      if (this.#done) assert.fail(`${what}: the process exited:\n${this.out}`);
      if (Date.now() > end) assert.fail(`gave up waiting for ${what}:\n${this.out}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  async stop(): Promise<Deno.CommandStatus> {
    try {
      this.child.kill("SIGTERM");
    } catch {
      // already gone
    }
    return await this.exited;
  }
}

/** The host-side server: GET /blob sends the blob, POST /upload answers with the body's length and digest. */
const SERVER = `
const blob = new Uint8Array(await Deno.readFile(Deno.args[0]));
const hex = async (b) => [...new Uint8Array(await crypto.subtle.digest("SHA-256", b))]
  .map((x) => x.toString(16).padStart(2, "0")).join("");
Deno.serve({ hostname: "0.0.0.0", port: ${HTTP_PORT}, onListen: () => console.log("SERVER-READY") }, async (req) => {
  const url = new URL(req.url);
  if (req.method === "GET" && url.pathname === "/blob") return new Response(blob);
  if (req.method === "POST" && url.pathname === "/upload") {
    const body = new Uint8Array(await req.arrayBuffer());
    const digest = await hex(body);
    console.log("UPLOAD-RECEIVED " + body.length + " " + digest);
    return new Response("got " + body.length + " " + digest + "\\n");
  }
  return new Response("no", { status: 404 });
});
Deno.addSignalListener("SIGTERM", () => Deno.exit(0));
`;

/** One virtio-net device: its tap, addresses, MAC and how its back end is started. */
interface NetCase {
  label: string;
  tap: string;
  hostIp: string;
  guestIp: string;
  mac: string;
  /** `device net` arguments after the socket is known. */
  args: (socket: string) => string[];
  offloads: boolean;
}

const CASES: NetCase[] = [
  {
    // denovm's spelling, offloads on (CSUM/GUEST_CSUM/TSO).
    label: "A",
    tap: "tap0",
    hostIp: "10.0.2.1",
    guestIp: "10.0.2.2",
    mac: "52:54:00:12:34:56",
    args: (s) => ["--socket-path", s, "--tap-name", "tap0", "--mac", "52:54:00:12:34:56"],
    offloads: true,
  },
  {
    // crosvm's spelling (--tap-name SOCKET,NAME), offloads off.
    label: "B",
    tap: "tap1",
    hostIp: "10.0.3.1",
    guestIp: "10.0.3.2",
    mac: "52:54:00:12:34:57",
    args: (s) => [`--tap-name`, `${s},tap1`, "--mac", "52:54:00:12:34:57", "--no-offloads"],
    offloads: false,
  },
];

/** Feature bits (virtio_net.h) whose negotiation the guest reports in sysfs. */
const OFFLOAD_BITS = { CSUM: 0, GUEST_CSUM: 1, GUEST_TSO4: 7, HOST_TSO4: 11 };

/** Guest commands for one device: find its interface by MAC, configure it, ping, download, upload. */
function guestCommands(c: NetCase): string {
  const L = c.label;
  return `IF=""; n=0
while [ -z "$IF" ] && [ $n -lt 100 ]; do
  for i in /sys/class/net/*; do if [ "$(cat $i/address)" = "${c.mac}" ]; then IF=\${i##*/}; fi; done
  if [ -z "$IF" ]; then sleep 0.1; fi
  n=$((n+1))
done
test -n "$IF"
echo "${L} IF $IF"
echo "${L} FEATURES $(cat /sys/class/net/$IF/device/features)"
ip addr add ${c.guestIp}/24 dev $IF
ip link set $IF up
ping -c 3 -W 10 ${c.hostIp} | sed 's/^/${L} /'
wget -q -O /tmp/blob http://${c.hostIp}:${HTTP_PORT}/blob
echo "${L} BLOB $(wc -c < /tmp/blob) $(sha256sum /tmp/blob | cut -d' ' -f1)"
rm /tmp/blob
seq 1 ${UPLOAD_LINES} > /tmp/up
echo "${L} SENT $(wc -c < /tmp/up) $(sha256sum /tmp/up | cut -d' ' -f1)"
wget -q -O /tmp/resp --post-file=/tmp/up http://${c.hostIp}:${HTTP_PORT}/upload
echo "${L} REPLY $(cat /tmp/resp)"
echo "${L} STATS $(cat /sys/class/net/$IF/statistics/rx_bytes) $(cat /sys/class/net/$IF/statistics/tx_bytes)"
`;
}

Deno.test({
  name: "UML virtio_net over vhost-user, two devices (offloads on / off, denovm's and crosvm's spellings): " +
    "ping, a 3 MiB download and a 580 KB upload each, with a server inside the test's network namespace",
  ignore: reason !== undefined,
  async fn() {
    const ns = `denovm-vun-${Deno.pid}`;
    const dir = await Deno.makeTempDir({ prefix: "denovm-vun-" });
    const blobPath = `${dir}/blob`;
    const data = blob();
    await Deno.writeFile(blobPath, data);
    await Deno.writeTextFile(`${dir}/server.js`, SERVER);
    const added = await run("ip", ["netns", "add", ns]);
    assert.ok(added.ok, added.out);
    const procs: NsProcess[] = [];
    let initramfs: string | undefined;
    try {
      const setup = [["ip", "link", "set", "lo", "up"]];
      for (const c of CASES) {
        setup.push(
          ["ip", "tuntap", "add", "dev", c.tap, "mode", "tap"],
          ["ip", "addr", "add", `${c.hostIp}/24`, "dev", c.tap],
          ["ip", "link", "set", c.tap, "up"],
        );
      }
      for (const cmd of setup) {
        const r = await run("ip", ["netns", "exec", ns, ...cmd]);
        assert.ok(r.ok, `${cmd.join(" ")}: ${r.out}`);
      }
      const backends: NsProcess[] = [];
      for (const c of CASES) {
        const b = new NsProcess(ns, [
          Deno.execPath(),
          "run",
          "-A",
          `${REPO}main.ts`,
          "device",
          "net",
          ...c.args(`${dir}/${c.tap}.sock`),
        ]);
        procs.push(b);
        backends.push(b);
      }
      for (const b of backends) await b.waitFor(/listening on/, "the net back end to listen");
      const server = new NsProcess(ns, [Deno.execPath(), "run", "-A", `${dir}/server.js`, blobPath]);
      procs.push(server);
      await server.waitFor(/SERVER-READY/, "the HTTP server in the namespace");

      initramfs = await buildInitramfs({
        modules: ["virtio_net"],
        commands: `ip link set lo up\n${CASES.map(guestCommands).join("")}`,
      });
      const uml = await UmlMachine.start({
        initramfs,
        vhostUser: CASES.map((c) => ({ socket: `${dir}/${c.tap}.sock`, deviceId: VIRTIO_ID_NET })),
        memMiB: 256,
      });
      const res = await uml.wait();
      const out = res.output;
      const backendLogs = backends.map((b, i) => `--- back end ${CASES[i].label} ---\n${b.out}`).join("\n");
      assert.equal(res.commandStatus, 0, `guest commands failed:\n${out}\n${backendLogs}`);

      let expected = "";
      for (let i = 1; i <= UPLOAD_LINES; i++) expected += `${i}\n`;
      const upBytes = new TextEncoder().encode(expected);
      const upSha = await sha256Hex(upBytes);
      const blobSha = await sha256Hex(data);
      for (const c of CASES) {
        const L = c.label;
        // Negotiated offloads, as the guest's virtio core reports them (one '0'/'1' per bit, bit 0 first).
        const f = out.match(new RegExp(`${L} FEATURES ([01]+)`));
        assert.ok(f, out);
        for (const [name, bit] of Object.entries(OFFLOAD_BITS)) {
          assert.equal(f[1][bit], c.offloads ? "1" : "0", `${L}: ${name} negotiated = ${c.offloads}`);
        }
        // ping: three requests, three replies.
        assert.match(out, new RegExp(`${L} 3 packets transmitted, 3 packets received`));
        // Download: every byte arrived intact.
        const m = out.match(new RegExp(`${L} BLOB (\\d+) ([0-9a-f]{64})`));
        assert.ok(m, out);
        assert.equal(Number(m[1]), BLOB_SIZE);
        assert.equal(m[2], blobSha);
        // Upload: the server received exactly what the guest sent and what the test expects.
        assert.match(out, new RegExp(`${L} SENT ${upBytes.length} ${upSha}`));
        assert.match(out, new RegExp(`${L} REPLY got ${upBytes.length} ${upSha}`));
        const st = out.match(new RegExp(`${L} STATS (\\d+) (\\d+)`));
        assert.ok(st && Number(st[1]) >= BLOB_SIZE && Number(st[2]) >= upBytes.length, out);
      }
      assert.equal(server.out.split(`UPLOAD-RECEIVED ${upBytes.length} ${upSha}`).length - 1, CASES.length);
      // Each back end served its front end without protocol errors and ends cleanly on SIGTERM.
      for (const b of backends) {
        assert.doesNotMatch(b.out, /dropping the front end/);
        procs.splice(procs.indexOf(b), 1);
        const status = await b.stop();
        assert.equal(status.code, 0, b.out);
      }
    } finally {
      for (const p of procs.reverse()) await p.stop();
      await run("ip", ["netns", "del", ns]);
      if (initramfs) await Deno.remove(initramfs).catch(() => {});
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});
