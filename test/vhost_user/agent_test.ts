// The guest agent (agent/agent.c) and its host client (vmm/library/agent_client.ts).
// 1. The frame codec on its own.
// 2. The real agent binary as a host process speaking frames on its stdin/stdout (--stdio).
// 3. The same binary inside a real Linux (user-mode Linux), on the virtio-console named port
//    org.denovm.agent served by denovm's ConsoleDevice through vhost-user.

import assert from "node:assert/strict";
import fc from "fast-check";
import { createHash } from "node:crypto";
import {
  AGENT_PORT_NAME,
  AgentClient,
  AgentError,
  type AgentFrame,
  AgentTimeoutError,
  type AgentTransport,
  connTransport,
  encodeFrame,
  FrameDecoder,
  MAX_OUTPUT,
} from "../../vmm/library/agent_client.ts";
import { agentBuildUnavailableReason, buildAgent } from "../support/agent_build.ts";
import { ConsoleDevice, DEFAULT_INPUT_LIMIT } from "../../devices/virtio/console.ts";
import { VsockDevice } from "../../devices/virtio/vsock.ts";
import { VhostUserBackend } from "../../devices/vhost_user/backend.ts";
import { buildInitramfs, umlKernelVersion, UmlMachine, type UmlResult, umlUnavailableReason } from "../support/uml.ts";

/** Virtio device IDs of consoles and vsock (virtio 1.2 section 5). */
const VIRTIO_ID_CONSOLE = 3;
const VIRTIO_ID_VSOCK = 19;
const GUEST_CID = 3;
const AGENT_VSOCK_PORT = 1024;
/** Hang guard for the host's connection attempts while the guest boots (not an assertion). */
const VSOCK_CONNECT_GUARD_MS = 60_000;

const buildReason = agentBuildUnavailableReason();
if (buildReason) console.log(`skipping agent process tests: ${buildReason}`);
const umlReason = buildReason ?? umlUnavailableReason();
if (umlReason) console.log(`skipping the agent in user-mode Linux: ${umlReason}`);

const enc = new TextEncoder();

/** Resolves with errors[from..from+n) once the client has reported that many unsolicited errors. */
function waitErrors(errors: string[], from: number, n: number): Promise<string[]> {
  return new Promise((resolve) => {
    const check = () => (errors.length >= from + n ? resolve(errors.slice(from, from + n)) : setTimeout(check, 10));
    check();
  });
}

Deno.test("agent frames: encode/decode round trip, split delivery, junk skipped and reported", () => {
  const frames: AgentFrame[] = [];
  const junk: string[] = [];
  const d = new FrameDecoder((f) => frames.push(f), (w) => junk.push(w));
  const a = encodeFrame({ op: "exit", id: 1 }, enc.encode("out"));
  const b = encodeFrame({ op: "hello", version: 1 });
  const stream = new Uint8Array([...enc.encode("xx garbage "), ...a, ...b]);
  for (let i = 0; i < stream.length; i += 3) d.push(stream.subarray(i, i + 3));
  assert.equal(frames.length, 2);
  assert.deepEqual(frames[0].header, { op: "exit", id: 1 });
  assert.equal(new TextDecoder().decode(frames[0].payload), "out");
  assert.deepEqual(frames[1].header, { op: "hello", version: 1 });
  assert.ok(junk.length >= 1 && junk.every((j) => /skipped \d+ bytes/.test(j)), junk.join("; "));
  // Out-of-range lengths and a non-JSON header are reported, and the next frame still decodes.
  junk.length = 0;
  const bad = new Uint8Array(12);
  bad.set(enc.encode("dvma"));
  new DataView(bad.buffer).setUint32(4, 0xffffffff, true);
  const notJson = encodeFrame({ x: 1 });
  notJson[12] = "!".charCodeAt(0);
  d.push(new Uint8Array([...bad, ...notJson, ...a]));
  assert.equal(frames.length, 3);
  assert.ok(junk.some((j) => /out of range/.test(j)) && junk.some((j) => /not JSON/.test(j)), junk.join("; "));
});

Deno.test("AgentClient: ready() and exec() on a silent transport reject with what timed out", async () => {
  const sent: Uint8Array[] = [];
  const client = new AgentClient({ write: (b) => sent.push(b), onData: () => {} });
  await assert.rejects(client.ready({ timeout: 50 }), (e: Error) => {
    assert.ok(e instanceof AgentTimeoutError);
    assert.match(e.message, /^guest agent not ready after 50 ms/);
    return true;
  });
  await assert.rejects(client.exec(["true"], { timeout: 50 }), {
    name: "AgentTimeoutError",
    message: 'exec ["true"] timed out after 50 ms',
  });
  // The exec request, then the kill for it after the timeout.
  const headers: Record<string, unknown>[] = [];
  const d = new FrameDecoder((f) => headers.push(f.header), (j) => assert.fail(j));
  sent.forEach((b) => d.push(b));
  const tail = headers.filter((h) => h.op !== "ping");
  assert.deepEqual(tail, [{ id: 1, op: "exec", timeout_ms: 50, argv: ["true"] }, { op: "kill", id: 1 }]);
  assert.ok(headers.some((h) => h.op === "ping"));
  client.close();
  await assert.rejects(client.exec("true"), /closed/);
});

/** The agent's shared checks, run against any transport. `raw` writes bytes to the agent unframed. */
async function exerciseAgent(client: AgentClient, raw: (b: Uint8Array) => void, kernelVersion?: string) {
  const errors: string[] = [];
  client.onError((m) => errors.push(m));
  await client.ready({ timeout: 30_000 });
  assert.equal(client.hello?.version, 1);

  const u = await client.exec("uname -r");
  assert.equal(u.code, 0, u.stderr);
  if (kernelVersion) assert.ok(u.stdout.includes(kernelVersion), `uname -r: ${u.stdout} (want ${kernelVersion})`);
  assert.equal(u.stderr, "");

  const e = await client.exec("echo err >&2; exit 3");
  assert.deepEqual([e.code, e.stdout, e.stderr], [3, "", "err\n"]);

  const s = await client.exec(["cat"], { stdin: "line one\nline two\n" });
  assert.deepEqual([s.code, s.stdout], [0, "line one\nline two\n"]);
  const bin = new Uint8Array(256).map((_, i) => i);
  const sb = await client.execBytes("wc -c; true", { stdin: bin });
  assert.equal(new TextDecoder().decode(sb.stdout).trim(), "256");

  const missing = await client.exec(["/no/such/program"]);
  assert.equal(missing.code, 127);
  assert.match(missing.stderr, /no\/such\/program/);

  // Two at once: the slower one is asked first, each answer goes to its own request.
  const [slow, fast] = await Promise.all([
    client.exec("sleep 0.3; read x; echo slow-$x", { stdin: "1\n" }),
    client.exec("echo fast"),
  ]);
  assert.equal(slow.stdout, "slow-1\n");
  assert.equal(fast.stdout, "fast\n");
  const many = await Promise.all([...Array(8).keys()].map((i) => client.exec(`echo ${i}`)));
  assert.deepEqual(many.map((r) => r.stdout), [...Array(8).keys()].map((i) => `${i}\n`));

  // A timeout rejects with the command and the limit, and the agent keeps serving.
  await assert.rejects(client.exec("sleep 5", { timeout: 500 }), (err: Error) => {
    assert.ok(err instanceof AgentTimeoutError);
    assert.equal(err.message, 'exec "sleep 5" timed out after 500 ms');
    return true;
  });
  assert.equal((await client.exec("echo still-here")).stdout, "still-here\n");

  // Malformed input: bytes without a frame, a non-JSON header, out-of-range lengths.
  assert.deepEqual(errors, []);
  raw(enc.encode("this is not a frame\n"));
  const bogus = encodeFrame({ op: "ping" });
  bogus.set(enc.encode("{{{"), 12);
  raw(bogus);
  const [skipped, header] = await waitErrors(errors, 0, 2);
  assert.equal(skipped, "skipped 20 bytes that were not a frame (bad magic)");
  assert.match(header, /^malformed header: /);
  const huge = new Uint8Array(12);
  huge.set(enc.encode("dvma"));
  new DataView(huge.buffer).setUint32(4, 0x7fffffff, true);
  raw(huge);
  assert.match((await waitErrors(errors, 2, 1))[0], /header length 2147483647 .* out of range/);
  assert.equal((await client.exec("echo after-junk")).stdout, "after-junk\n");
  // The 8 length bytes after the rejected magic were skipped on the way to that exec's frame.
  assert.equal(errors[3], "skipped 8 bytes that were not a frame (bad magic)");
  // A bad request with an id is that request's error.
  await assert.rejects(
    client.exec([""]),
    (err: Error) => err instanceof AgentError && /exactly one of/.test(err.message),
  );
  assert.equal(errors.length, 4, errors.join("\n"));
}

/**
 * Run `touch /tmp/stop`, on which the test's /init kills the agent and powers the guest off. /init polls
 * for the file, so it can kill the agent after touch made the file but before the agent wrote the
 * reply: the reply is not required, the guest's end is (it proves the command ran). A reply that does
 * come says exit code 0. Fails when the command neither answered nor ended the guest within the exec
 * timeout (the request or its reply stuck on the way).
 */
async function stopGuest(client: AgentClient, uml: UmlMachine): Promise<UmlResult> {
  const stop = client.exec("touch /tmp/stop").then((r) => r, (e: Error) => e);
  const first = await Promise.race([uml.wait(), stop]);
  if (first instanceof Error) throw first;
  if ("stdout" in first) assert.equal(first.code, 0, first.stderr);
  const end = await uml.wait();
  client.close("the guest ended");
  const late = await stop;
  assert.ok(!(late instanceof Error) || late.message === "the guest ended", String(late));
  return end;
}

/** The last lines of a guest's console, to put next to a failure. */
function consoleTail(output: string, lines = 40): string {
  return output.split("\n").slice(-lines).join("\n");
}

/** The agent as a host process: frames on its stdin and stdout. */
function stdioAgent(
  path: string,
): { transport: AgentTransport; child: Deno.ChildProcess; done: Promise<void>; closeStdin: () => Promise<void> } {
  const child = new Deno.Command(path, { args: ["--stdio"], stdin: "piped", stdout: "piped", stderr: "inherit" })
    .spawn();
  const writer = child.stdin.getWriter();
  const listeners: ((b: Uint8Array) => void)[] = [];
  const done = (async () => {
    for await (const chunk of child.stdout) for (const l of listeners) l(chunk);
  })();
  return {
    child,
    done,
    closeStdin: () => writer.close().catch(() => {}),
    transport: {
      write: (b) => void writer.write(b).catch(() => {}),
      onData: (cb) => listeners.push(cb),
    },
  };
}

Deno.test({
  name: "agent as a host process (--stdio): exec, stdin, concurrency, timeout, malformed frames",
  ignore: buildReason !== undefined,
  async fn() {
    const path = await buildAgent();
    const a = stdioAgent(path);
    const client = new AgentClient(a.transport);
    try {
      await exerciseAgent(client, (b) => a.transport.write(b), Deno.osRelease());
      // Output beyond 16 MiB per stream is dropped and flagged.
      const big = await client.execBytes(`head -c ${MAX_OUTPUT + 1000} /dev/zero`, { timeout: 30_000 });
      assert.equal(big.stdout.length, MAX_OUTPUT);
      assert.equal(big.stdoutTruncated, true);
      assert.equal(big.stderrTruncated, false);
      // Killed by a signal: 128 + signal.
      const k = await client.exec("kill -9 $$");
      assert.deepEqual([k.code, k.signal], [137, 9]);
      // Aborting a request rejects it and kills the command; the agent keeps serving.
      const ac = new AbortController();
      const aborted = client.exec("sleep 30", { signal: ac.signal });
      ac.abort();
      await assert.rejects(aborted, /exec "sleep 30" aborted/);
      assert.equal((await client.exec("echo after-abort")).stdout, "after-abort\n");
      const cwd = await client.exec("pwd", { cwd: "/tmp" });
      assert.equal(cwd.stdout, "/tmp\n");
    } finally {
      client.close();
      await a.closeStdin();
      const st = await a.child.status;
      await a.done;
      assert.equal(st.code, 0, "the agent exits cleanly at EOF");
    }
  },
});

/** A frame around an arbitrary header text (encodeFrame only writes valid JSON). */
function rawFrame(header: Uint8Array): Uint8Array {
  const f = new Uint8Array(12 + header.length);
  f.set(enc.encode("dvma"));
  new DataView(f.buffer).setUint32(4, header.length, true);
  f.set(header, 12);
  return f;
}

/** Run the agent on `input` (then EOF); returns its exit status and the frames it wrote. */
async function runAgentOn(
  path: string,
  input: Uint8Array,
): Promise<{ status: Deno.CommandStatus; frames: AgentFrame[]; junk: string[] }> {
  const child = new Deno.Command(path, { args: ["--stdio"], stdin: "piped", stdout: "piped", stderr: "null" }).spawn();
  const frames: AgentFrame[] = [];
  const junk: string[] = [];
  const d = new FrameDecoder((f) => frames.push(f), (j) => junk.push(j));
  const reading = (async () => {
    for await (const c of child.stdout) d.push(c);
  })();
  const w = child.stdin.getWriter();
  await w.write(input).catch(() => {});
  await w.close().catch(() => {});
  const status = await child.status;
  await reading;
  return { status, frames, junk };
}

Deno.test({
  name: "agent survives hostile input: random bytes and mutated frames never crash it, its output stays framed",
  ignore: buildReason !== undefined,
  async fn() {
    const path = await buildAgent();
    // Harmless requests to mutate (no exec: a mutated command line could do anything).
    const seeds = [
      encodeFrame({ op: "ping", id: 7 }),
      encodeFrame({ op: "kill", id: 3 }),
      encodeFrame({ op: "nop", id: 1, argv: ["a", "b\u00e9"], timeout_ms: 5, x: [{ y: null }, true, -1.5e3] }),
      encodeFrame({ op: "ping" }, enc.encode("payload")),
      rawFrame(enc.encode('{"op":"ping","id":1e999}')),
      rawFrame(new Uint8Array([...enc.encode('{"op":"'), 0xff, 0xc0, 0x80, ...enc.encode('","id":2}')])),
    ];
    const input = fc.oneof(
      fc.uint8Array({ maxLength: 300 }),
      fc.tuple(
        fc.constantFrom(...seeds),
        fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { maxLength: 6 }),
      )
        .map(([seed, flips]) => {
          const b = seed.slice();
          for (const [i, v] of flips) b[i % b.length] = v;
          return b;
        }),
      fc.array(fc.constantFrom(...seeds, enc.encode("dvma"), enc.encode('{"id":')), { maxLength: 6 })
        .map((parts) => new Uint8Array(parts.flatMap((p) => [...p]))),
    );
    await fc.assert(
      fc.asyncProperty(input, async (bytes) => {
        const r = await runAgentOn(path, bytes);
        assert.equal(r.status.signal, null, "the agent was not killed by a signal");
        assert.equal(r.status.code, 0);
        assert.deepEqual(r.junk, [], "everything the agent wrote is a well-formed frame");
        assert.equal(r.frames[0]?.header.op, "hello");
        for (const f of r.frames) assert.ok(["hello", "error"].includes(String(f.header.op)), JSON.stringify(f.header));
      }),
      { numRuns: 150 },
    );
  },
});

Deno.test({
  name: "agent in user-mode Linux on the virtio-console port org.denovm.agent (ConsoleDevice over vhost-user)",
  ignore: umlReason !== undefined,
  async fn() {
    const agentPath = await buildAgent();
    const dir = await Deno.makeTempDir({ prefix: "denovm-agent-" });
    const socket = `${dir}/con.sock`;
    const device = new ConsoleDevice({ output: () => {}, ports: [AGENT_PORT_NAME] });
    const port = device.openPort(AGENT_PORT_NAME);
    const logs: string[] = [];
    const backend = new VhostUserBackend(device, socket, { log: (l) => logs.push(l) });
    const served = backend.serve();
    await backend.listening;
    let initramfs: string | undefined;
    let uml: UmlMachine | undefined;
    const client = new AgentClient(port, { maxWrite: DEFAULT_INPUT_LIMIT });
    try {
      // /init starts the agent on the named port (it finds /dev/vportNpM through
      // /sys/class/virtio-ports/*/name itself: no udev here), then waits for the host's "stop" file.
      initramfs = await buildInitramfs({
        modules: ["virtio_console"],
        files: [{ path: "bin/denovm-agent", data: await Deno.readFile(agentPath) }],
        commands: `/bin/denovm-agent --port ${AGENT_PORT_NAME} &
agent=$!
while [ ! -e /tmp/stop ]; do sleep 0.1; done
kill $agent`,
      });
      uml = await UmlMachine.start({ initramfs, vhostUser: [{ socket, deviceId: VIRTIO_ID_CONSOLE }] });
      await exerciseAgent(client, (b) => port.write(b), umlKernelVersion());
      // stdin of a few hundred KiB crosses the port; a request larger than the port's input buffer is refused.
      const blob = new Uint8Array(300 * 1024).map((_, i) => (i * 7) & 0xff);
      const sum = await client.exec("md5sum", { stdin: blob });
      assert.equal(sum.stdout.split(" ")[0], createHash("md5").update(blob).digest("hex"));
      await assert.rejects(
        client.exec("cat", { stdin: new Uint8Array(DEFAULT_INPUT_LIMIT) }),
        /exceeds what the transport/,
      );
      const r = await stopGuest(client, uml);
      assert.equal(r.commandStatus, 0, r.output);
      assert.match(r.output, /denovm-agent: serving on port org\.denovm\.agent/);
      assert.equal(device.stats().malformed, 0, logs.join("\n"));
    } catch (e) {
      // Where things stood, for a failure that only shows up now and then.
      uml?.kill();
      const end = await uml?.wait();
      console.error(`device stats ${JSON.stringify(device.stats())}, back end ${JSON.stringify(backend.counters)}`);
      if (logs.length) console.error(logs.join("\n"));
      if (end) console.error(`guest console (last lines):\n${consoleTail(end.output)}`);
      throw e;
    } finally {
      client.close();
      uml?.kill();
      await uml?.wait();
      backend.close();
      await served;
      if (initramfs) await Deno.remove(initramfs).catch(() => {});
      await Deno.remove(dir, { recursive: true });
    }
  },
});

/**
 * Connect to guest vsock port `port` through a vsock device's Unix socket (`CONNECT <port>\n`,
 * answered `OK <hostport>\n`), retrying while the guest is not listening yet.
 */
async function connectVsock(uds: string, port: number): Promise<ReturnType<typeof connTransport>> {
  const deadline = Date.now() + VSOCK_CONNECT_GUARD_MS;
  for (;;) {
    let conn: Deno.Conn | undefined;
    try {
      conn = await Deno.connect({ transport: "unix", path: uds });
      await conn.write(enc.encode(`CONNECT ${port}\n`));
      let got = new Uint8Array(0);
      const buf = new Uint8Array(4096);
      while (!got.includes(0x0a)) {
        const n = await conn.read(buf);
        if (n === null) break;
        got = new Uint8Array([...got, ...buf.subarray(0, n)]);
      }
      const nl = got.indexOf(0x0a);
      if (nl >= 0 && /^OK \d+$/.test(new TextDecoder().decode(got.subarray(0, nl)))) {
        return connTransport(conn, got.subarray(nl + 1));
      }
    } catch {
      // the device is not up yet
    }
    conn?.close();
    if (Date.now() > deadline) {
      throw new Error(`guest vsock port ${port}: no listener after ${VSOCK_CONNECT_GUARD_MS} ms`);
    }
    await new Promise((r) => setTimeout(r, 200));
  }
}

Deno.test({
  name: "agent in user-mode Linux with --vsock (vmw_vsock_virtio_transport, VsockDevice over vhost-user)",
  ignore: umlReason !== undefined,
  async fn() {
    const agentPath = await buildAgent();
    const dir = await Deno.makeTempDir({ prefix: "denovm-agent-vsock-" });
    const socket = `${dir}/vu.sock`;
    const uds = `${dir}/v.sock`;
    const device = new VsockDevice({ cid: GUEST_CID, udsPath: uds });
    const logs: string[] = [];
    const backend = new VhostUserBackend(device, socket, { log: (l) => logs.push(l) });
    const served = backend.serve();
    await backend.listening;
    let initramfs: string | undefined;
    let uml: UmlMachine | undefined;
    let transport: ReturnType<typeof connTransport> | undefined;
    let client: AgentClient | undefined;
    try {
      initramfs = await buildInitramfs({
        modules: ["vmw_vsock_virtio_transport"],
        files: [{ path: "bin/denovm-agent", data: await Deno.readFile(agentPath) }],
        commands: `/bin/denovm-agent --vsock ${AGENT_VSOCK_PORT} &
agent=$!
while [ ! -e /tmp/stop ]; do sleep 0.1; done
kill $agent`,
      });
      uml = await UmlMachine.start({ initramfs, vhostUser: [{ socket, deviceId: VIRTIO_ID_VSOCK }] });
      await uml.waitFor(/denovm-agent: listening on vsock port/);
      transport = await connectVsock(uds, AGENT_VSOCK_PORT);
      client = new AgentClient(transport);
      await exerciseAgent(client, (b) => transport!.write(b), umlKernelVersion());
      const r = await stopGuest(client, uml);
      assert.equal(r.commandStatus, 0, r.output);
      assert.equal(device.stats().malformed, 0, logs.join("\n"));
    } catch (e) {
      uml?.kill();
      const end = await uml?.wait();
      if (logs.length) console.error(logs.join("\n"));
      if (end) console.error(`guest console (last lines):\n${consoleTail(end.output)}`);
      throw e;
    } finally {
      client?.close();
      transport?.close();
      await transport?.closed;
      uml?.kill();
      await uml?.wait();
      backend.close();
      await served;
      device.close();
      if (initramfs) await Deno.remove(initramfs).catch(() => {});
      await Deno.remove(dir, { recursive: true });
    }
  },
});
