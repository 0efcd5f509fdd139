// virtio-console over vhost-user, driven by Linux's real virtio_console driver in user-mode Linux
// (test/support/uml.ts): hvc0 (port 0) and a named MULTIPORT port both ways. Also the
// `denovm device console` options.

import assert from "node:assert/strict";
import { ConsoleDevice } from "../../devices/virtio/console.ts";
import { VhostUserBackend } from "../../devices/vhost_user/backend.ts";
import { parseConsoleArgs } from "../../vmm/cli/devices/serial.ts";
import { buildInitramfs, UmlMachine, umlUnavailableReason } from "../support/uml.ts";

/** The virtio device ID of consoles (virtio 1.2 section 5). */
const VIRTIO_ID_CONSOLE = 3;
const AGENT_PORT = "org.denovm.agent";

const umlReason = umlUnavailableReason();
if (umlReason) console.log(`skipping user-mode Linux console test: ${umlReason}`);

Deno.test("denovm device console: crosvm's options", () => {
  assert.deepEqual(parseConsoleArgs(["--socket-path", "/s"]), {
    socketPath: "/s",
    outputFile: undefined,
    inputFile: undefined,
    syslog: false,
  });
  assert.deepEqual(parseConsoleArgs(["--socket=/s", "--output-file", "/o", "--input-file=/i"]), {
    socketPath: "/s",
    outputFile: "/o",
    inputFile: "/i",
    syslog: false,
  });
  assert.throws(() => parseConsoleArgs([]), { name: "UsageError", message: /--socket-path/ });
  assert.throws(() => parseConsoleArgs(["--socket", "/s", "--syslog", "--output-file", "/o"]), /together/);
  assert.throws(() => parseConsoleArgs(["--socket", "/s", "--bogus"]), { name: "UsageError" });
});

Deno.test({
  name: "UML virtio_console over vhost-user: hvc0 and the named port org.denovm.agent carry bytes both ways",
  ignore: umlReason !== undefined,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "denovm-con-" });
    const socket = `${dir}/con.sock`;
    const dec = new TextDecoder();
    const enc = new TextEncoder();
    let hvcOut = "";
    let agentOut = "";
    const hvcSeen = Promise.withResolvers<void>();
    const agentSeen = Promise.withResolvers<void>();
    const device = new ConsoleDevice({
      output: (b) => {
        hvcOut += dec.decode(b);
        if (hvcOut.includes("GUEST-HVC-MARK")) hvcSeen.resolve();
      },
      ports: [AGENT_PORT],
    });
    const agent = device.openPort(AGENT_PORT);
    agent.onData((b) => {
      agentOut += dec.decode(b);
      if (agentOut.includes("GUEST-AGENT-MARK")) agentSeen.resolve();
    });
    // The host answers each guest marker with one line.
    hvcSeen.promise.then(() => device.sendInput(enc.encode("host-to-hvc\n")));
    agentSeen.promise.then(() => agent.write(enc.encode("host-to-agent\n")));
    const logs: string[] = [];
    const backend = new VhostUserBackend(device, socket, { log: (l) => logs.push(l) });
    const served = backend.serve();
    await backend.listening;
    let initramfs: string | undefined;
    try {
      initramfs = await buildInitramfs({
        modules: ["virtio_console"],
        commands: `n=0; while [ ! -e /dev/hvc0 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
n=0; while ! ls /sys/class/virtio-ports/*/name >/dev/null 2>&1 && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
for p in /sys/class/virtio-ports/*; do echo "PORT $(basename $p) name=$(cat $p/name 2>/dev/null)"; done
# The hvc driver makes its device nodes when it registers, before the port behind hvc0 is ready (an open
# then fails with ENODEV, in hvc_install, before it reaches the port): retry the open itself, keeping the fd.
n=0; until { command exec 3<>/dev/hvc0; } 2>/dev/null || [ $n -ge 100 ]; do sleep 0.1; n=$((n+1)); done
stty raw -echo <&3
echo GUEST-HVC-MARK >&3
read -r line <&3
echo "HVC-GOT=$line"
vport=""
for p in /sys/class/virtio-ports/*; do [ "$(cat $p/name 2>/dev/null)" = "${AGENT_PORT}" ] && vport=/dev/$(basename $p); done
echo "AGENT-DEV=$vport"
exec 4<>$vport
echo GUEST-AGENT-MARK >&4
read -r line2 <&4
echo "AGENT-GOT=$line2"`,
      });
      const uml = await UmlMachine.start({ initramfs, vhostUser: [{ socket, deviceId: VIRTIO_ID_CONSOLE }] });
      const r = await uml.wait();
      assert.equal(r.commandStatus, 0, r.output);
      assert.ok(hvcOut.includes("GUEST-HVC-MARK"), `host saw the guest's hvc0 line: ${hvcOut}`);
      assert.ok(r.output.includes("HVC-GOT=host-to-hvc"), r.output);
      assert.match(r.output, new RegExp(`PORT vport\\d+p1 name=${AGENT_PORT.replaceAll(".", "\\.")}`));
      assert.match(r.output, /AGENT-DEV=\/dev\/vport\d+p1/);
      assert.equal(agentOut, "GUEST-AGENT-MARK\n");
      assert.ok(r.output.includes("AGENT-GOT=host-to-agent"), r.output);
      const s = device.stats();
      assert.equal(s.malformed, 0, logs.join("\n"));
      assert.ok(s.controlIn >= 4, "DEVICE_READY, PORT_READY x2, PORT_OPEN from the driver");
    } finally {
      backend.close();
      await served;
      if (initramfs) await Deno.remove(initramfs).catch(() => {});
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "UML virtio_console: `denovm device console --output-file --input-file` as its own process",
  ignore: umlReason !== undefined,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "denovm-con-cli-" });
    const socket = `${dir}/con.sock`;
    const outFile = `${dir}/out.txt`;
    const inFile = `${dir}/in.txt`;
    await Deno.writeTextFile(inFile, "line-from-input-file\n");
    const child = new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        new URL("../../main.ts", import.meta.url).pathname,
        "device",
        "console",
        "--socket-path",
        socket,
        "--output-file",
        outFile,
        "--input-file",
        inFile,
      ],
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    let stderr = "";
    const dec = new TextDecoder();
    const pump = (async () => {
      for await (const c of child.stderr) stderr += dec.decode(c, { stream: true });
    })();
    let initramfs: string | undefined;
    try {
      while (!stderr.includes("listening on")) {
        const done = await Promise.race([pump.then(() => true), new Promise((r) => setTimeout(() => r(false), 50))]);
        if (done) throw new Error(`the console back end exited: ${stderr}`);
      }
      initramfs = await buildInitramfs({
        modules: ["virtio_console"],
        commands: `n=0; while [ ! -e /dev/hvc0 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
# The hvc driver makes its device nodes when it registers, before the port behind hvc0 is ready (an open
# then fails with ENODEV, in hvc_install, before it reaches the port): retry the open itself, keeping the fd.
n=0; until { command exec 3<>/dev/hvc0; } 2>/dev/null || [ $n -ge 100 ]; do sleep 0.1; n=$((n+1)); done
echo GUEST-TO-OUTPUT-FILE >&3
read -r line <&3
echo "HVC-GOT=$line"`,
      });
      const r = await (await UmlMachine.start({ initramfs, vhostUser: [{ socket, deviceId: VIRTIO_ID_CONSOLE }] }))
        .wait();
      assert.equal(r.commandStatus, 0, r.output);
      assert.ok(r.output.includes("HVC-GOT=line-from-input-file"), r.output);
      assert.ok((await Deno.readTextFile(outFile)).includes("GUEST-TO-OUTPUT-FILE"), "the guest's line is in the file");
    } finally {
      child.kill("SIGTERM");
      const st = await child.status;
      await pump;
      assert.equal(st.code, 0, stderr);
      if (initramfs) await Deno.remove(initramfs).catch(() => {});
      await Deno.remove(dir, { recursive: true });
    }
  },
});
