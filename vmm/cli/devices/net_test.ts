// `denovm device net` arguments: crosvm's --tap-name/--tap-fd/--device spellings and denovm's
// --socket-path form parsed without a tap, and the device the parser builds on a real tap. The tap test
// runs inside a network namespace of its own (test/support/netns.ts: this file re-runs itself inside it).

import assert from "node:assert/strict";
import { parseDeviceArgs, parseNetArgs } from "./net.ts";
import { NET_OFFLOAD_FEATURES, type NetDevice, VIRTIO_NET_HDR_SIZE } from "../../../devices/virtio/net.ts";
import { openTap } from "../../../ffi/tun.ts";
import { insideNetns, testInNetns } from "../../../test/support/netns.ts";

// ---- Outside the namespace: argument parsing, and the namespace runner ----

if (!insideNetns) {
  Deno.test("denovm device net: crosvm's --tap-name/--tap-fd/--device forms and denovm's --socket-path form", () => {
    assert.deepEqual(parseNetArgs(["--socket-path", "/s", "--tap-name", "tap0", "--mac", "02:00:00:00:00:01"]), {
      socketPath: "/s",
      tap: { kind: "name", name: "tap0" },
      mac: "02:00:00:00:00:01",
      offloads: true,
    });
    assert.deepEqual(parseNetArgs(["--tap-name", "/run/s.sock,tap1"]).tap, { kind: "name", name: "tap1" });
    assert.equal(parseNetArgs(["--tap-name", "/run/s.sock,tap1"]).socketPath, "/run/s.sock");
    assert.deepEqual(parseNetArgs(["--tap-fd", "/s,7", "--no-offloads"]), {
      socketPath: "/s",
      tap: { kind: "fd", fd: 7 },
      mac: undefined,
      offloads: false,
    });
    assert.deepEqual(parseNetArgs(["--socket", "/s", "--tap-fd", "9"]).tap, { kind: "fd", fd: 9 });
    assert.deepEqual(parseNetArgs(["--device", "/s,10.0.2.1,255.255.255.0,12:34:56:78:9a:bc"]), {
      socketPath: "/s",
      tap: { kind: "new", hostIp: "10.0.2.1", netmask: "255.255.255.0", hostMac: "12:34:56:78:9a:bc" },
      mac: undefined,
      offloads: true,
    });
    for (
      const bad of [
        [],
        ["--tap-name", "tap0"], // no socket
        ["--socket-path", "/a", "--socket", "/b", "--tap-name", "t"],
        ["--tap-name", "/s,a", "--tap-fd", "/s,3"],
        ["--tap-fd", "/s,x"],
        ["--device", "/s,10.0.2.1,255.255.255.0"],
        ["--device", "/s,10.0.2.300,255.255.255.0,12:34:56:78:9a:bc"],
        ["--socket-path", "/s", "--tap-name", "t", "--mac", "01:00:00:00:00:01"], // multicast
        ["--socket-path", "/s", "--tap-name", "t", "--mac", "zz"],
        ["--socket-path", "/s", "--tap-name", "t", "--bogus"],
      ]
    ) {
      assert.throws(() => parseNetArgs(bad), (e: Error) => e.name === "UsageError", bad.join(" "));
    }
  });

  await testInNetns({ what: "denovm device net tap tests", file: import.meta.url, innerTests: 1 });
}

// ---- Inside the namespace ----

if (insideNetns) {
  Deno.test("denovm device net: crosvm's --device form creates a configured tap; --tap-fd adopts an open one", async () => {
    const a = parseDeviceArgs(["--device", "/tmp/unused.sock,10.0.5.1,255.255.255.0,02:11:22:33:44:55"]);
    const dev = a.device as NetDevice;
    try {
      assert.equal(a.socketPath, "/tmp/unused.sock");
      assert.match(dev.tapName, /^tap\d+$/);
      const show = await new Deno.Command("ip", { args: ["-o", "addr", "show", "dev", dev.tapName] }).output();
      assert.match(new TextDecoder().decode(show.stdout), /inet 10\.0\.5\.1\/24/);
      const link = await new Deno.Command("ip", { args: ["-o", "link", "show", "dev", dev.tapName] }).output();
      const l = new TextDecoder().decode(link.stdout);
      assert.match(l, /link\/ether 02:11:22:33:44:55/);
      assert.match(l, /<[^>]*\bUP\b/);
    } finally {
      dev.close();
      await dev.done;
    }
    const t = openTap("dvfd0", VIRTIO_NET_HDR_SIZE);
    const b = parseDeviceArgs(["--tap-fd", `/tmp/unused.sock,${t.fd}`, "--no-offloads"]);
    const dev2 = b.device as NetDevice;
    try {
      assert.equal(dev2.tapName, "dvfd0");
      assert.equal(dev2.features & NET_OFFLOAD_FEATURES, 0n);
    } finally {
      dev2.close(); // closes the adopted fd
      await dev2.done;
    }
  });
}
