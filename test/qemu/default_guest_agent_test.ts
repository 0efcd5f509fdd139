// The default guest serves the guest agent: Debian's Linux 6.1 kernel with the default initramfs
// (scripts/initramfs.sh) boots under QEMU (TCG, microvm with ACPI) with a virtio-serial port named
// org.denovm.agent whose host side is a QEMU chardev Unix socket. /init sees the port in
// /sys/class/virtio-ports/*/name and starts `denovm-agent --port org.denovm.agent`; the test connects
// to the socket and drives the agent with vmm/library/agent_client.ts (AgentClient over connTransport):
// hello, uname -r, /proc/cmdline, exit codes, stdin, stderr, concurrent requests, and finally
// `poweroff -f` through the agent, after which QEMU exits by itself.
//
// No /dev/kvm is needed: QEMU runs the guest with TCG.

import assert from "node:assert/strict";
import { AGENT_PORT_NAME, AGENT_PROTOCOL_VERSION, AgentClient, connTransport } from "../../vmm/library/agent_client.ts";
import { type DebianKernel, debianKernel } from "../support/kernel.ts";
import { connectToChardev, QEMU_BINARY, QEMU_KERNEL_ARGS } from "../support/qemu.ts";
import { BUSYBOX, ConsoleProcess, exists } from "../support/guest_process.ts";
import { defaultInitramfs } from "../support/default_guest.ts";

/**
 * The agent's start message on the console (agent/README.md, "--port NAME"). Only the message: the
 * agent writes its "denovm-agent: " prefix, the message and the newline to unbuffered stderr
 * separately (agent.c logf_), so other console output (the shell's banner) can land in between.
 */
const AGENT_SERVING_MESSAGE = `serving on port ${AGENT_PORT_NAME}`;
/** /init's marker once it has started everything (scripts/initramfs.sh). */
const INIT_OK_LINE = /^DENOVM-INIT-OK\r?$/m;

/** Guards against a hung guest or QEMU (not timing assertions: TCG boots this in well under a minute). */
const HANG_GUARD_MS = 300_000;
const READY_GUARD_MS = 240_000;

function which(cmd: string): boolean {
  const path = Deno.env.get("PATH") ?? "/usr/bin:/bin";
  return path.split(":").some((dir) => exists(`${dir}/${cmd}`));
}

/** Why this test cannot run here (QEMU, the tools scripts/initramfs.sh needs, or the kernel), or undefined. */
async function unavailableReason(): Promise<{ reason?: string; kernel?: DebianKernel }> {
  if (Deno.build.os !== "linux" || Deno.build.arch !== "x86_64") return { reason: "needs x86_64 Linux" };
  if (!exists(QEMU_BINARY)) return { reason: `${QEMU_BINARY} missing (apt-get install qemu-system-x86)` };
  if (!exists(BUSYBOX)) return { reason: `${BUSYBOX} missing (apt-get install busybox-static)` };
  for (const tool of ["cpio", "gcc", "objcopy"]) {
    if (!which(tool)) return { reason: `${tool} missing (needed by scripts/initramfs.sh)` };
  }
  try {
    return { kernel: await debianKernel() };
  } catch (e) {
    return { reason: `Debian's 6.1 kernel is unavailable: ${(e as Error).message}` };
  }
}

const { reason, kernel } = await unavailableReason();
if (reason) console.log(`skip: default guest agent under QEMU: ${reason}`);

Deno.test({
  name: "default guest: Debian 6.1 + default initramfs under QEMU TCG serves denovm-agent on org.denovm.agent",
  ignore: reason !== undefined,
  async fn() {
    const k = kernel!;
    const initrd = await defaultInitramfs();
    const dir = await Deno.makeTempDir({ prefix: "denovm-agent-qemu-" });
    const sock = `${dir}/agent.sock`;
    // A word of our own on the kernel command line, read back through the agent.
    const marker = `denovm.test=agent-${crypto.randomUUID().slice(0, 8)}`;
    const args = [
      // microvm with ACPI: the Debian kernel finds the virtio-mmio transports in the DSDT.
      ...["-M", "microvm,acpi=on,pit=on,pic=on,rtc=on", "-accel", "tcg", "-cpu", "max", "-m", "256", "-smp", "1"],
      ...["-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none", "-serial", "stdio"],
      "-no-reboot",
      ...["-global", "virtio-mmio.force-legacy=false"],
      ...["-kernel", k.vmlinuz, "-initrd", initrd, "-append", [...QEMU_KERNEL_ARGS, marker].join(" ")],
      // The agent's port: a virtio-serial (multiport virtio-console) device on virtio-mmio, one named
      // port backed by a Unix socket QEMU listens on.
      ...["-device", "virtio-serial-device"],
      ...["-chardev", `socket,id=agent,path=${sock},server=on,wait=off`],
      ...["-device", `virtserialport,chardev=agent,name=${AGENT_PORT_NAME}`],
    ];
    const child = new Deno.Command(QEMU_BINARY, { args, stdin: "null", stdout: "piped", stderr: "piped" }).spawn();
    const qemu = new ConsoleProcess(child, { label: "QEMU", hangGuardMs: HANG_GUARD_MS });
    let transport: ReturnType<typeof connTransport> | undefined;
    let client: AgentClient | undefined;
    try {
      const conn = await connectToChardev(sock, qemu);
      transport = connTransport(conn);
      client = new AgentClient(transport);
      const agentErrors: string[] = [];
      client.onError((m) => agentErrors.push(m));

      // The agent answers a ping only once /init has started it on the port.
      await Promise.race([
        client.ready({ timeout: READY_GUARD_MS }),
        qemu.done.then((r) => {
          throw new Error(`QEMU exited (code ${r.code}) before the agent said hello:\n${r.output}`);
        }),
      ]);
      assert.equal(client.hello?.agent, "denovm-agent");
      assert.equal(client.hello?.version, AGENT_PROTOCOL_VERSION);
      // /init got to its end, and the agent's start message reached the serial console (the tty
      // may still be draining it when the hello arrives on the port; waitFor rejects if QEMU exits).
      await qemu.waitFor(INIT_OK_LINE);
      await qemu.waitFor(new RegExp(AGENT_SERVING_MESSAGE.replaceAll(".", "\\.")));
      assert.doesNotMatch(qemu.output, /^denovm-init: modules failed:/m);

      // It runs in this guest: the Debian kernel's release and the command line we passed.
      const uname = await client.exec("uname -r");
      assert.deepEqual({ code: uname.code, stdout: uname.stdout, stderr: uname.stderr }, {
        code: 0,
        stdout: `${k.version}\n`,
        stderr: "",
      });
      const cmdline = await client.exec("cat /proc/cmdline");
      assert.equal(cmdline.code, 0);
      const words = cmdline.stdout.trim().split(/\s+/);
      for (const w of [...QEMU_KERNEL_ARGS, marker]) assert.ok(words.includes(w), `${w} in ${cmdline.stdout}`);

      // The hello's pid is the agent process, serving the port /init found.
      const pid = client.hello?.pid;
      assert.ok(typeof pid === "number" && pid > 1, `hello pid ${pid}`);
      const comm = await client.exec(`cat /proc/${pid}/comm; cat /sys/class/virtio-ports/*/name`);
      assert.equal(comm.code, 0, comm.stderr);
      assert.equal(comm.stdout, `denovm-agent\n${AGENT_PORT_NAME}\n`);

      // Exit status, stderr, stdin (text and every byte value), argv without a shell.
      const seven = await client.exec("exit 7");
      assert.equal(seven.code, 7);
      const err = await client.exec("echo to-stderr >&2; echo to-stdout; exit 3");
      assert.deepEqual([err.code, err.stdout, err.stderr], [3, "to-stdout\n", "to-stderr\n"]);
      const text = "first line\nsecond line\n";
      const cat = await client.exec("cat", { stdin: text });
      assert.deepEqual([cat.code, cat.stdout], [0, text]);
      const bytes = new Uint8Array(64 * 1024).map((_, i) => (i * 7 + (i >> 8)) & 0xff);
      const echoed = await client.execBytes(["cat"], { stdin: bytes });
      assert.equal(echoed.code, 0);
      assert.deepEqual(echoed.stdout, bytes, "64 KiB of stdin came back unchanged");
      const wc = await client.exec(["wc", "-c"], { stdin: bytes });
      assert.equal(wc.stdout.trim(), String(bytes.length));
      const signalled = await client.exec("kill -9 $$");
      assert.deepEqual([signalled.code, signalled.signal], [128 + 9, 9]);

      // Two requests in flight at once, each reply matched to its request by id.
      const slow = client.exec("sleep 1; read line; echo got $line", { stdin: "it\n" });
      const quick = client.exec("echo quick");
      const [s, q] = await Promise.all([slow, quick]);
      assert.deepEqual([s.stdout, q.stdout], ["got it\n", "quick\n"]);
      assert.deepEqual(agentErrors, [], "no error frames that answer no request");

      // Power the guest off through the agent: no reply comes, QEMU exits (-no-reboot, ACPI poweroff).
      const off = client.exec("poweroff -f").then(() => "replied", (e: Error) => e.message);
      const exit = await qemu.done;
      assert.equal(exit.killed, false, `QEMU exited by itself:\n${exit.output}`);
      assert.equal(exit.code, 0, `QEMU exit code 0 (the guest powered off):\n${exit.output}`);
      client.close("QEMU exited");
      assert.equal(await off, "QEMU exited", "poweroff -f never returned in the guest");
    } finally {
      client?.close();
      transport?.close();
      qemu.kill();
      await qemu.done;
      await Deno.remove(dir, { recursive: true });
    }
  },
});
