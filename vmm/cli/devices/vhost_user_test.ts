// `run --vhost-user`: crosvm's types and keys, denovm's generic form, refusals in one line (exit 35), and
// the devices createVirtioDevices builds from them (connected at once, or within the connect timeout).

import assert from "node:assert/strict";
import { parseVhostUserOption } from "./vhost_user.ts";
import { VHOST_USER_DEVICE_TYPES } from "../../../devices/vhost_user/device_types.ts";
import { VIRTIO_ID_BLOCK } from "../../../devices/virtio/device.ts";
import { VhostUserFrontEndDevice } from "../../../devices/vhost_user/front_end.ts";
import { ConfigError, EXIT_INVALID_ARGS, UsageError } from "../../../core/exit.ts";
import { parseRunArgs } from "../run.ts";
import { defaultVmConfig } from "../../config.ts";
import { createVirtioDevices } from "../../device_manager/virtio_devices.ts";
import { startBackEnd } from "../../../test/support/vhost_user_back_end_worker.ts";
import { withTempDir } from "../../../test/support/temp_dir.ts";
import { assertOneLineRefusal, denovm } from "../../../test/support/cli.ts";

Deno.test("--vhost-user: crosvm's types with their device IDs, max-queue-size, the positional type", () => {
  assert.deepEqual(parseVhostUserOption("block,socket=/run/blk.sock"), {
    type: "block",
    deviceId: VIRTIO_ID_BLOCK,
    socket: "/run/blk.sock",
  });
  assert.deepEqual(parseVhostUserOption("type=fs,socket=/s,max-queue-size=1024"), {
    type: "fs",
    deviceId: 26,
    socket: "/s",
    maxQueueSize: 1024,
  });
  for (const t of VHOST_USER_DEVICE_TYPES) {
    if (t.refused) {
      assert.throws(() => parseVhostUserOption(`type=${t.name},socket=/s`), (e: Error) => {
        assert.ok(e instanceof UsageError);
        assert.match(e.message, new RegExp(`type=${t.name} is not supported by denovm: `));
        return true;
      });
    } else {
      assert.equal(parseVhostUserOption(`type=${t.name},socket=/s`).deviceId, t.id);
    }
  }
});

Deno.test("--vhost-user: the generic form for any device ID, with queues and config size", () => {
  assert.deepEqual(parseVhostUserOption("type=generic,device-id=41,queues=2,config-size=8,socket=/gpio.sock"), {
    type: "generic",
    deviceId: 41,
    socket: "/gpio.sock",
    queues: 2,
    configSize: 8,
  });
});

Deno.test("--vhost-user: bad input is one line each", () => {
  const cases: [string, RegExp][] = [
    ["socket=/s", /type is required/],
    ["type=block", /socket=PATH is required/],
    ["type=floppy,socket=/s", /unknown type "floppy" \(one of net, block, .*generic\)/],
    ["type=generic,socket=/s", /device-id=N is required/],
    ["type=generic,device-id=0,socket=/s", /device-id: 0 is out of range/],
    ["type=block,device-id=3,socket=/s", /device-id is for type=generic; type=block is device 2/],
    ["type=block,socket=/s,max-queue-size=100", /max-queue-size: 100 is not a power of two/],
    ["type=block,socket=/s,max-queue-size=65536", /max-queue-size: 65536 is out of range/],
    ["type=block,socket=/s,queues=0", /queues: 0 is out of range/],
    ["type=block,socket=/s,config-size=257", /config-size: 257 is out of range/],
    ["type=block,socket=/s,colour=red", /colour/],
  ];
  for (const [text, pattern] of cases) {
    assert.throws(() => parseVhostUserOption(text), (e: Error) => {
      assert.ok(e instanceof UsageError, text);
      assert.match(e.message, pattern, text);
      assert.ok(!e.message.includes("\n"), text);
      return true;
    });
  }
});

Deno.test("run --vhost-user: repeatable, in order, with the connect timeout; pci-address accepted with a warning", () => {
  const r = parseRunArgs([
    "--vhost-user",
    "block,socket=/a",
    "--vhost-user",
    "type=generic,device-id=36,socket=/b,pci-address=00:01.0",
    "--vhost-user-connect-timeout-ms",
    "250",
    "/k",
  ], { checkFiles: false });
  assert.deepEqual(r.config.vhostUser?.map((v) => [v.type, v.deviceId, v.socket]), [
    ["block", 2, "/a"],
    ["generic", 36, "/b"],
  ]);
  assert.equal(r.config.vhostUserConnectTimeoutMs, 250);
  assert.equal(r.warnings.length, 1);
  assert.match(r.warnings[0], /pci-address/);
  assert.throws(
    () => parseRunArgs(["--vhost-user-connect-timeout-ms", "soon", "/k"], { checkFiles: false }),
    /--vhost-user-connect-timeout-ms: "soon" is not a valid number/,
  );
});

Deno.test("denovm run --vhost-user type=gpu: refused in one line, exit 35", async () => {
  const r = await denovm("run", "--vhost-user", "type=gpu,socket=/nonexistent.sock", "/dev/null");
  assertOneLineRefusal(r, EXIT_INVALID_ARGS, /type=gpu is not supported by denovm/, "type=gpu");
});

Deno.test("vhost-user devices from a config: connected when built; a missing socket is one line (exit 35)", async () => {
  await withTempDir("denovm-vu-cli-", async (dir) => {
    const disk = `${dir}/disk.img`;
    Deno.writeFileSync(disk, new Uint8Array(1024 * 512));
    const config = {
      ...defaultVmConfig("/k"),
      rng: false,
      balloon: false,
      vhostUser: [{ type: "block", deviceId: VIRTIO_ID_BLOCK, socket: `${dir}/blk.sock` }],
    };
    const missing = createVirtioDevices(config, {
      serialOutput: () => Promise.resolve(() => {}),
      defaultVsockPath: "",
    });
    await assert.rejects(missing, (e: Error) => {
      assert.ok(e instanceof ConfigError);
      assert.match(e.message, /^--vhost-user block,socket=.*blk\.sock: cannot connect to the back end at .*: /);
      return true;
    });

    // With a connect timeout, a back end that starts listening a little later is waited for.
    const timed = { ...config, vhostUserConnectTimeoutMs: 20_000 };
    const building = createVirtioDevices(timed, {
      serialOutput: () => Promise.resolve(() => {}),
      defaultVsockPath: "",
    });
    const backEnd = await startBackEnd({ kind: "block", socket: `${dir}/blk.sock`, path: disk });
    try {
      const { devices } = await building;
      assert.equal(devices.length, 1);
      const dev = devices[0];
      assert.ok(dev instanceof VhostUserFrontEndDevice);
      assert.equal(dev.name, "vhost-user-block");
      assert.equal(dev.deviceType, VIRTIO_ID_BLOCK);
      dev.close();
    } finally {
      await backEnd.close();
    }
  });
});
