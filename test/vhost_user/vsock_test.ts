// virtio-vsock over vhost-user, driven by Linux's real vmw_vsock_virtio_transport in user-mode Linux
// (test/support/uml.ts). busybox has no vsock tools, so a tiny static C program (built here with the
// host's gcc) listens and connects on AF_VSOCK inside the guest. Both directions are checked:
// the host connects through the Unix socket with `CONNECT <port>\n`, and the guest connects to
// CID 2 whose port P is the test's Unix listener `${uds}_P`. Also `denovm device vsock` options.

import assert from "node:assert/strict";
import { VsockDevice } from "../../devices/virtio/vsock.ts";
import { VhostUserBackend } from "../../devices/vhost_user/backend.ts";
import { parseVsockArgs } from "../../vmm/cli/devices/vsock.ts";
import { buildInitramfs, UmlMachine, umlUnavailableReason } from "../support/uml.ts";

/** The virtio device ID of vsock (virtio 1.2 section 5). */
const VIRTIO_ID_VSOCK = 19;
const GUEST_CID = 3;
const GUEST_LISTEN_PORT = 1234;
const HOST_PORT = 5000;

/** The guest program: `listen PORT` echoes one line back prefixed "echo:"; `connect CID PORT MSG` prints the reply. */
const VSOCK_PROGRAM = String.raw`
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <linux/vm_sockets.h>

static int readline_fd(int fd, char *buf, int max) {
  int n = 0;
  while (n < max - 1) {
    int r = read(fd, buf + n, 1);
    if (r <= 0) break;
    if (buf[n++] == '\n') break;
  }
  buf[n] = 0;
  return n;
}

static void die(const char *what) { perror(what); exit(1); }

int main(int argc, char **argv) {
  char line[256], out[300];
  struct sockaddr_vm a;
  memset(&a, 0, sizeof a);
  a.svm_family = AF_VSOCK;
  int s = socket(AF_VSOCK, SOCK_STREAM, 0);
  if (s < 0) die("socket");
  if (argc == 3 && !strcmp(argv[1], "listen")) {
    a.svm_cid = VMADDR_CID_ANY;
    a.svm_port = atoi(argv[2]);
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    if (listen(s, 1) < 0) die("listen");
    printf("VSOCK-LISTENING %s\n", argv[2]);
    fflush(stdout);
    int c = accept(s, 0, 0);
    if (c < 0) die("accept");
    readline_fd(c, line, sizeof line);
    printf("GUEST-GOT=%s", line);
    snprintf(out, sizeof out, "echo:%s", line);
    if (write(c, out, strlen(out)) < 0) die("write");
    readline_fd(c, line, sizeof line); /* wait for the host to close */
    close(c);
    return 0;
  }
  if (argc == 5 && !strcmp(argv[1], "connect")) {
    a.svm_cid = atoi(argv[2]);
    a.svm_port = atoi(argv[3]);
    if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
    snprintf(out, sizeof out, "%s\n", argv[4]);
    if (write(s, out, strlen(out)) < 0) die("write");
    readline_fd(s, line, sizeof line);
    printf("REPLY=%s", line);
    close(s);
    return 0;
  }
  fprintf(stderr, "usage: vsockt listen PORT | connect CID PORT MSG\n");
  return 2;
}
`;

const umlReason = umlUnavailableReason() ??
  (new Deno.Command("sh", { args: ["-c", "command -v gcc"] }).outputSync().success
    ? undefined
    : "gcc missing (apt-get install gcc libc6-dev)");
if (umlReason) console.log(`skipping user-mode Linux vsock test: ${umlReason}`);

/** Build the guest program statically (the initramfs has no libc). */
async function buildProgram(dir: string): Promise<Uint8Array> {
  await Deno.writeTextFile(`${dir}/vsockt.c`, VSOCK_PROGRAM);
  const out = await new Deno.Command("gcc", {
    args: ["-static", "-Os", "-Wall", "-o", `${dir}/vsockt`, `${dir}/vsockt.c`],
    stderr: "piped",
  }).output();
  assert.ok(out.success, `gcc: ${new TextDecoder().decode(out.stderr)}`);
  return await Deno.readFile(`${dir}/vsockt`);
}

Deno.test("denovm device vsock: --socket-path/--socket, --cid, --uds-path", () => {
  assert.deepEqual(parseVsockArgs(["--socket-path", "/s", "--cid", "3", "--uds-path", "/u"]), {
    socketPath: "/s",
    cid: 3,
    udsPath: "/u",
  });
  assert.deepEqual(parseVsockArgs(["--socket=/s", "--cid=0x10", "--uds-path=/u"]).cid, 16);
  assert.throws(() => parseVsockArgs(["--socket", "/s", "--uds-path", "/u"]), { name: "UsageError", message: /--cid/ });
  assert.throws(() => parseVsockArgs(["--socket", "/s", "--cid", "2", "--uds-path", "/u"]), /out of range/);
  assert.throws(() => parseVsockArgs(["--socket", "/s", "--cid", "3"]), /--uds-path/);
  assert.throws(
    () => parseVsockArgs(["--socket", "/s", "--cid", "3", "--uds-path", "/u", "--device", "/dev/vhost-vsock"]),
    /userspace/,
  );
});

Deno.test({
  name: "UML vmw_vsock_virtio_transport over vhost-user: host->guest via CONNECT and guest->host via uds_PORT",
  ignore: umlReason !== undefined,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "denovm-vsock-uml-" });
    const socket = `${dir}/vu.sock`;
    const uds = `${dir}/v.sock`;
    const enc = new TextEncoder();
    const dec = new TextDecoder();
    const program = await buildProgram(dir);
    const device = new VsockDevice({ cid: GUEST_CID, udsPath: uds });
    const logs: string[] = [];
    const backend = new VhostUserBackend(device, socket, { log: (l) => logs.push(l) });
    const served = backend.serve();
    await backend.listening;

    // Guest -> host: the test's listener for host port 5000 answers one line.
    const hostListener = Deno.listen({ transport: "unix", path: `${uds}_${HOST_PORT}` });
    let hostGot = "";
    const hostSide = (async () => {
      const c = await hostListener.accept();
      const buf = new Uint8Array(256);
      while (!hostGot.includes("\n")) {
        const n = await c.read(buf);
        if (n === null) break;
        hostGot += dec.decode(buf.subarray(0, n));
      }
      await c.write(enc.encode("host-reply\n"));
      c.close();
    })();

    let initramfs: string | undefined;
    try {
      initramfs = await buildInitramfs({
        modules: ["vmw_vsock_virtio_transport"],
        files: [{ path: "bin/vsockt", data: program }],
        commands: `/bin/vsockt listen ${GUEST_LISTEN_PORT} &
wait $!
/bin/vsockt connect 2 ${HOST_PORT} guest-hello`,
      });
      const uml = await UmlMachine.start({ initramfs, vhostUser: [{ socket, deviceId: VIRTIO_ID_VSOCK }] });
      await uml.waitFor(/VSOCK-LISTENING/);

      // Host -> guest: CONNECT through the Unix socket, then one line each way.
      const c = await Deno.connect({ transport: "unix", path: uds });
      await c.write(enc.encode(`CONNECT ${GUEST_LISTEN_PORT}\n`));
      let reply = "";
      const buf = new Uint8Array(256);
      const readLine = async () => {
        const start = reply.length;
        while (!reply.slice(start).includes("\n")) {
          const n = await c.read(buf);
          if (n === null) break;
          reply += dec.decode(buf.subarray(0, n));
        }
      };
      await readLine();
      assert.match(reply, /^OK \d+\n$/);
      await c.write(enc.encode("host-hello\n"));
      await readLine();
      c.close();

      const r = await uml.wait();
      await hostSide;
      assert.equal(r.commandStatus, 0, r.output);
      assert.match(reply, /^OK \d+\necho:host-hello\n$/);
      assert.ok(r.output.includes("GUEST-GOT=host-hello"), r.output);
      assert.equal(hostGot, "guest-hello\n");
      assert.ok(r.output.includes("REPLY=host-reply"), r.output);
      const s = device.stats();
      assert.equal(s.hostConnections, 1);
      assert.equal(s.guestConnections, 1);
      assert.equal(s.malformed, 0, logs.join("\n"));
    } finally {
      hostListener.close();
      backend.close();
      await served;
      device.close();
      if (initramfs) await Deno.remove(initramfs).catch(() => {});
      await Deno.remove(dir, { recursive: true });
    }
  },
});
