// The library's client of a `denovm device input` event socket against scripted servers: the describe
// exchange, replies in order, a dropped injection reported as the in-process device reports it, and a
// hostile or gone server (not JSON, a wrong kind, an endless line, silence, a closed socket): one line for
// the calls waiting and every later call, never a crash or an unhandled rejection. The library's lookup:
// a vhost-user input back end without an event socket is one line when asked to type into it.

import assert from "node:assert/strict";
import { REMOTE_INPUT_MAX_LINE, RemoteInput, RemoteInputs } from "./input_remote.ts";
import { VmInput } from "./vm.ts";
import { InputDevice } from "../../devices/virtio/input/device.ts";
import { VIRTIO_ID_BLOCK, VIRTIO_ID_INPUT } from "../../devices/virtio/device.ts";
import { ConfigError, HostError } from "../../core/exit.ts";
import { withTempDir } from "../../test/support/temp_dir.ts";

const KEYBOARD = JSON.stringify({ ok: true, kind: "keyboard", name: "k", serial: "s", width: 1, height: 1 });

/** A server on `path` that answers each request line with what `answer` returns (null: nothing; "close": hang up). */
function scripted(path: string, answer: (req: Record<string, unknown>, n: number) => string | null) {
  const listener = Deno.listen({ transport: "unix", path });
  const requests: Record<string, unknown>[] = [];
  const served = (async () => {
    const conn = await listener.accept();
    const enc = new TextEncoder();
    let buf = "";
    try {
      for await (const chunk of conn.readable) {
        buf += new TextDecoder().decode(chunk);
        for (let nl = buf.indexOf("\n"); nl >= 0; nl = buf.indexOf("\n")) {
          const req = JSON.parse(buf.slice(0, nl));
          buf = buf.slice(nl + 1);
          requests.push(req);
          const a = answer(req, requests.length - 1);
          if (a === "close") return;
          if (a !== null) await conn.write(enc.encode(a));
        }
      }
    } catch {
      // the client hung up
    } finally {
      try {
        conn.close();
      } catch {
        // closed already
      }
    }
  })();
  return {
    requests,
    async close() {
      listener.close();
      await served;
    },
  };
}

Deno.test("remote input: describes, injects in order, reports a dropped injection as the device does, reads LEDs", async () => {
  await withTempDir("denovm-remote-input-", async (dir) => {
    const path = `${dir}/events`;
    const server = scripted(path, (req, n) => {
      if ("describe" in req) return KEYBOARD + "\n";
      if ("stats" in req) return JSON.stringify({ ok: true, stats: {}, leds: { "1": 1 } }) + "\n";
      // The fourth injection finds the queue full.
      if (n === 4) return JSON.stringify({ ok: false, error: "event queue full; dropped", pending: 4096 }) + "\n";
      return JSON.stringify({ ok: true, pending: 0 }) + "\n";
    });
    const r = await RemoteInput.connect(path, "vhost-user input test");
    try {
      assert.equal(r.kind, "keyboard");
      const input = new VmInput(() => [r]);
      // Two calls in the same tick: both reach the back end, in order, each answered.
      const a = input.type("ab");
      const b = input.key(30);
      await Promise.all([a, b]);
      assert.deepEqual(server.requests.slice(1), [{ type: "ab" }, { key: 30, down: true }, { key: 30, down: false }]);
      // Dropped: false, as InputDevice.sendKey answers; the library's call resolves as it does in process.
      assert.equal(await r.sendKey(30, true), false);
      assert.equal(await r.sendKey(30, true), true);
      assert.deepEqual(await input.leds(), new Map([[1, 1]]));
      assert.throws(() => input.move(1, 1), /no mouse input device/);
    } finally {
      await r.close();
      await server.close();
    }
    // After close, calls fail with one line.
    await assert.rejects(r.type("x"), /vhost-user input test: closed/);
  });
});

Deno.test("remote input: hostile or gone event sockets are one line each, never a crash", async () => {
  await withTempDir("denovm-remote-input-", async (dir) => {
    let i = 0;
    const connect = async (answer: (req: Record<string, unknown>) => string | null) => {
      const path = `${dir}/events-${i++}`;
      const server = scripted(path, (req) => "describe" in req ? KEYBOARD + "\n" : answer(req));
      return { server, r: await RemoteInput.connect(path, "remote", { replyTimeoutMs: 200 }) };
    };

    // Not JSON, a wrong kind: the connect fails with HostError.
    for (
      const bad of ["nonsense\n", JSON.stringify({ ok: true, kind: "printer", name: "p", width: 1, height: 1 }) + "\n"]
    ) {
      const path = `${dir}/events-${i++}`;
      const server = scripted(path, () => bad);
      await assert.rejects(RemoteInput.connect(path, "remote"), (e) => {
        assert.ok(e instanceof HostError);
        assert.match(e.message, /^remote: the event socket .* did not describe an input device: /);
        assert.ok(!e.message.includes("\n"), "one line");
        return true;
      });
      await server.close();
    }
    // Nothing listening: ConfigError.
    await assert.rejects(RemoteInput.connect(`${dir}/nobody`, "remote"), ConfigError);

    const cases: [string, (req: Record<string, unknown>) => string | null, RegExp][] = [
      ["an endless line", () => "x".repeat(REMOTE_INPUT_MAX_LINE + 2), /a reply line over 65536 bytes/],
      ["silence", () => null, /no reply within 200 ms/],
      ["a hang-up", () => "close", /the event socket closed/],
      ["an array", () => "[1]\n", /a reply that is not a JSON object/],
      [
        "an error",
        () => JSON.stringify({ ok: false, error: "not a keyboard" }) + "\n",
        /Error: remote: not a keyboard$/,
      ],
    ];
    for (const [what, answer, want] of cases) {
      const { server, r } = await connect(answer);
      try {
        const input = new VmInput(() => [r]);
        // Not awaited: the failure must not surface as an unhandled rejection.
        input.type("unawaited");
        await assert.rejects(input.type("x"), want, what);
        if (what !== "an error") await assert.rejects(r.tap(1, 1), want, `${what}: later calls`);
      } finally {
        await r.close();
        await server.close();
      }
    }
  });
});

Deno.test("remote input: the VM's vhost-user input devices, with and without an event socket", async () => {
  const none = await RemoteInputs.connect({
    vhostUser: [{ type: "input", deviceId: VIRTIO_ID_INPUT, socket: "/run/vhost-device-input.sock" }],
  });
  assert.deepEqual(none.undrivable, ["/run/vhost-device-input.sock"]);
  const blind = new VmInput(() => none.devices, () => none.undrivable);
  assert.throws(
    () => blind.type("hello"),
    (e: Error) => {
      assert.equal(
        e.message,
        "no keyboard input device in this VM takes events from here: the vhost-user input back end on " +
          "/run/vhost-device-input.sock has no event socket (denovm device input --event-socket PATH, then " +
          "eventSocket: PATH)",
      );
      return true;
    },
  );
  // A keyboard of the VM's own is still driven.
  const own = new InputDevice({ kind: "keyboard" });
  const both = new VmInput(() => [own, ...none.devices], () => none.undrivable);
  await both.type("a");
  assert.equal(own.pendingEvents, 4, "press, syn, release, syn waiting for the guest");
  own.close?.();

  await assert.rejects(
    RemoteInputs.connect({
      vhostUser: [{ type: "block", deviceId: VIRTIO_ID_BLOCK, socket: "/b", eventSocket: "/e" }],
    }),
    (e) => e instanceof ConfigError && /eventSocket is for input devices/.test(e.message),
  );
  assert.equal(await RemoteInputs.connect({}), RemoteInputs.none);
});
