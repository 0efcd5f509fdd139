// Which virtio device models a VmConfig asks for, in the order they get
// virtio-mmio slots: block devices first (so /dev/vdX letters follow the command
// line), then net, consoles, rng, balloon, input, sound, vsock, gpu, the vhost-user front ends, the
// shared directories (virtio-fs), pmem. The net, vsock, gpu, vhost-user, virtio-fs and pmem models (and
// the tap and virglrenderer bindings) are imported only when asked for, so a VM without them does not
// load them at start-up.

import { BalloonDevice } from "../../devices/virtio/balloon.ts";
import { BlockDevice } from "../../devices/virtio/block/device.ts";
import { ConsoleDevice, type ConsolePort } from "../../devices/virtio/console.ts";
import { AGENT_PORT_NAME } from "../library/agent_client.ts";
import type { VirtioDevice } from "../../devices/virtio/device.ts";
import { INPUT_DEVICE_KINDS, InputDevice, type InputDeviceKind } from "../../devices/virtio/input/device.ts";
import { parseCustomInputConfig } from "../../devices/virtio/input/profiles.ts";
import { InputSocketSource } from "../../devices/virtio/input/socket_source.ts";
import { RngDevice } from "../../devices/virtio/rng.ts";
import type { SerialConfig, VmConfig } from "../config.ts";
import { ConfigError, ExitCodeError, HostError } from "../../core/exit.ts";

/** A device model this version does not have; asked for explicitly, it is the user's error (exit 35). */
export class UnavailableDeviceError extends ConfigError {
  constructor(what: string) {
    super(`${what} is not available in this version of denovm`);
    this.name = "UnavailableDeviceError";
  }
}

/** A device that could not be created from what the user gave (a tap that does not exist...): exit 35. */
export class DeviceConfigError extends ConfigError {
  constructor(message: string) {
    super(message);
    this.name = "DeviceConfigError";
  }
}

export interface VirtioDeviceContext {
  /** Where a virtio-console port's output goes (the same sinks as serial ports). */
  serialOutput(s: SerialConfig): Promise<(bytes: Uint8Array) => void>;
  /** Default host socket for the userspace vsock when --vsock has no uds-path. */
  defaultVsockPath: string;
  /** Where devices' own log lines go (default: stderr with a "denovm: " prefix). */
  log?: (line: string) => void;
}

/** What createVirtioDevices built, with the console devices by serial number for input wiring. */
export interface CreatedDevices {
  devices: VirtioDevice[];
  consoles: { serial: SerialConfig; device: ConsoleDevice }[];
  /** The guest agent's port when config.agent is set. */
  agentPort?: ConsolePort;
}

async function make<T>(what: string, f: () => T | Promise<T>): Promise<T> {
  try {
    return await f();
  } catch (e) {
    // An error that carries its own exit code keeps it (a disk locked by another process: 1, as crosvm).
    if (e instanceof ExitCodeError) throw e;
    throw new DeviceConfigError(`${what}: ${(e as Error).message}`);
  }
}

/**
 * Throws UnavailableDeviceError for a device `config` asks for that this version does not have. It opens
 * nothing, so `run --print-config` refuses exactly what a boot refuses (vmm/validate.ts).
 */
export function checkVirtioDevices(config: VmConfig): void {
  for (const n of config.nets) {
    if (n.vqPairs !== undefined && n.vqPairs > 1) throw new UnavailableDeviceError("--net vq-pairs above 1");
  }
  for (const i of config.inputs) {
    if (!INPUT_DEVICE_KINDS.includes(i.kind as InputDeviceKind)) throw new UnavailableDeviceError(`--input ${i.kind}`);
  }
  if (config.gpu?.backend === "gfxstream") throw new UnavailableDeviceError("--gpu backend=gfxstream");
}

/** Build the device models for `config`. On failure every device made so far is closed. */
export async function createVirtioDevices(config: VmConfig, ctx: VirtioDeviceContext): Promise<CreatedDevices> {
  checkVirtioDevices(config);
  const devices: VirtioDevice[] = [];
  const consoles: CreatedDevices["consoles"] = [];
  let agentPort: ConsolePort | undefined;
  try {
    for (const b of config.blocks) {
      devices.push(
        await make(`--block ${b.path}`, () =>
          new BlockDevice({
            path: b.path,
            readOnly: b.ro,
            sparse: b.sparse,
            blockSize: b.blockSize,
            id: b.id,
            direct: b.direct,
            lock: b.lock,
          })),
      );
    }
    if (config.nets.length > 0) {
      const { NetDevice } = await import("../../devices/virtio/net.ts");
      for (const n of config.nets) {
        if (n.tapName === undefined && n.tapFd === undefined) {
          // crosvm's host-ip=,netmask= form: a new tap (named by the kernel) with that host address.
          if (!n.hostIp || !n.netmask) {
            throw new DeviceConfigError("--net needs tap-name=, tap-fd=, or host-ip= and netmask=");
          }
          const dev = await make("--net host-ip", () => new NetDevice({ tapName: "", mac: n.mac }));
          devices.push(dev);
          const { configureInterface } = await import("../../ffi/tun.ts");
          await make(
            `--net host-ip=${n.hostIp}`,
            () => configureInterface(dev.tapName, { ip: n.hostIp, netmask: n.netmask, up: true }),
          );
          continue;
        }
        devices.push(
          await make(
            `--net ${n.tapName ?? `tap-fd=${n.tapFd}`}`,
            () => new NetDevice({ tapName: n.tapName, tapFd: n.tapFd, mac: n.mac }),
          ),
        );
      }
    }
    for (const s of config.serials.filter((s) => s.hardware === "virtio-console").sort((a, b) => a.num - b.num)) {
      const output = await ctx.serialOutput(s);
      const device = new ConsoleDevice({ output });
      devices.push(device);
      consoles.push({ serial: s, device });
    }
    if (config.agent) {
      // Port 0 is unused (its output is dropped); the agent speaks on the named port.
      const device = new ConsoleDevice({ output: () => {}, ports: [AGENT_PORT_NAME] });
      devices.push(device);
      agentPort = device.openPort(AGENT_PORT_NAME);
    }
    if (config.rng) devices.push(new RngDevice());
    if (config.balloon) devices.push(new BalloonDevice());
    // Each kind counts its own devices from 0, as crosvm numbers their names.
    const inputIndex = new Map<string, number>();
    for (const i of config.inputs) {
      const index = inputIndex.get(i.kind) ?? 0;
      inputIndex.set(i.kind, index + 1);
      const custom = i.kind === "custom"
        ? await make(`--input custom[config-path=${i.configPath}]`, async () => {
          const text = await Deno.readTextFile(i.configPath!);
          return parseCustomInputConfig(text);
        })
        : undefined;
      const device = new InputDevice({
        kind: i.kind as InputDeviceKind,
        width: i.width,
        height: i.height,
        name: i.name,
        index,
        custom,
      });
      if (i.path !== undefined) {
        try {
          InputSocketSource.connect(i.path, device);
        } catch (e) {
          device.close();
          throw new HostError(`--input ${i.kind}[path=${i.path}]: ${(e as Error).message}`);
        }
      }
      devices.push(device);
    }
    for (const snd of config.sounds ?? []) {
      const { SoundDevice } = await import("../../devices/virtio/sound/device.ts");
      const { makeSoundBackend } = await import("../../devices/virtio/sound/backend.ts");
      const backend = await make(`--virtio-snd backend=${snd.backend}`, () =>
        makeSoundBackend(snd.backend, {
          playbackPath: snd.playbackPath ?? ".",
          playbackSize: snd.playbackSize,
          capturePath: snd.capture ? snd.capturePath : undefined,
        }));
      devices.push(
        new SoundDevice({
          backend,
          numOutputDevices: snd.numOutputDevices,
          numInputDevices: snd.numInputDevices,
          numOutputStreams: snd.numOutputStreams,
          numInputStreams: snd.numInputStreams,
        }),
      );
    }
    if (config.vsock) {
      const udsPath = config.vsock.udsPath ?? ctx.defaultVsockPath;
      const { VsockDevice } = await import("../../devices/virtio/vsock.ts");
      devices.push(await make(`--vsock ${udsPath}`, () => new VsockDevice({ cid: config.vsock!.cid, udsPath })));
    }
    if (config.gpu) {
      const g = config.gpu;
      const { GpuDevice } = await import("../../devices/virtio/gpu/device.ts");
      const backend = g.backend === "2d"
        ? new (await import("../../devices/virtio/gpu/backend_2d.ts")).Backend2D()
        : await make("--gpu backend=virglrenderer", async () => {
          const { VirglBackend } = await import("../../devices/virtio/gpu/backend_virgl.ts");
          return new VirglBackend({ contextTypes: g.contextTypes.length > 0 ? g.contextTypes : undefined });
        });
      let displays = g.displays.map((d) => ({ width: d.width, height: d.height }));
      if (displays.length === 0 && g.width && g.height) displays = [{ width: g.width, height: g.height }];
      devices.push(
        new GpuDevice({
          backend,
          displays: displays.length > 0 ? displays : undefined,
          hostVisibleWindowSize: g.hostVisibleWindowSize,
          tracePath: g.tracePath,
        }),
      );
    }
    if (config.vhostUser?.length) {
      const { VhostUserFrontEndDevice } = await import("../../devices/vhost_user/front_end.ts");
      const { VhostUserProtocolError } = await import("../../devices/vhost_user/protocol.ts");
      const log = ctx.log ?? ((line: string) => console.error(`denovm: ${line}`));
      const perType = new Map<string, number>();
      for (const v of config.vhostUser) {
        // Names are unique (stats, logs): the second device of a type gets "-1", and so on.
        const n = perType.get(v.type) ?? 0;
        perType.set(v.type, n + 1);
        const name = `vhost-user-${v.type}${n === 0 ? "" : `-${n}`}`;
        const device = new VhostUserFrontEndDevice({
          name,
          socket: v.socket,
          deviceType: v.deviceId,
          queues: v.queues,
          maxQueueSize: v.maxQueueSize,
          configSize: v.configSize,
          connectTimeoutMs: config.vhostUserConnectTimeoutMs,
          log,
        });
        devices.push(device);
        const what = `--vhost-user ${v.type},socket=${v.socket}`;
        await make(what, async () => {
          try {
            await device.connect();
          } catch (e) {
            // A socket that is not there is the user's to fix (exit 35); a back end that misbehaves is not.
            if (e instanceof VhostUserProtocolError) throw new HostError(`${what}: ${e.message}`);
            throw e;
          }
        });
      }
    }
    if (config.sharedDirs && config.sharedDirs.length > 0) {
      // Each type=fs directory: a virtiofsd process and the vhost-user front end to it (vmm/virtiofsd.ts).
      const { createSharedDirDevice } = await import("../virtiofsd.ts");
      for (const d of config.sharedDirs) {
        devices.push(await createSharedDirDevice(d, { log: ctx.log ?? ((line) => console.error(`denovm: ${line}`)) }));
      }
    }
    if (config.pmems && config.pmems.length > 0) {
      // Last, so a VM's other devices keep their slots; /dev/pmemN follows the order given.
      const { PmemDevice } = await import("../../devices/virtio/pmem.ts");
      for (const p of config.pmems) {
        devices.push(await make(`--pmem ${p.path}`, () => new PmemDevice({ path: p.path, readOnly: p.ro })));
      }
    }
  } catch (e) {
    for (const d of devices) d.close?.();
    throw e;
  }
  return { devices, consoles, agentPort };
}
