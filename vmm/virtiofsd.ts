// The virtiofsd process behind a `--shared-dir ...:type=fs`: the machine's virtiofsd (Debian's
// qemu-system-common ships QEMU's C virtiofsd as /usr/lib/qemu/virtiofsd) started on a socket in the VM's
// private runtime directory, with crosvm's fs options (vmm/cli/devices/shared_dir.ts) mapped to its own.
//
// Life cycle: `startVirtiofsd` spawns it and returns once its socket listens (read from /proc/net/unix,
// so that no probe uses up the one connection virtiofsd serves); `stop()` ends it (SIGTERM, then SIGKILL)
// and removes the socket. It must never outlive denovm, even when denovm is killed: it runs under
// util-linux's `setpriv --pdeathsig SIGKILL`, which sets the parent-death signal and then executes
// virtiofsd (the signal survives execve), so the kernel kills it when the thread that spawned it ends.
// Deno spawns a child on the calling JavaScript thread, so it is spawned from the main thread, which
// lives as long as the process. virtiofsd's own sandbox child (its pid namespace) sets a parent-death
// signal on itself too.
//
// Its stderr is read all the time (a full pipe would stop it) and passed on, one line each prefixed
// with the tag, up to MAX_FORWARDED_LINES lines; the last lines are kept for the error when it exits
// before its socket listens.

import type { SharedDirConfig } from "./config.ts";
import { HostError } from "../core/exit.ts";
import { VirtioFsFrontEnd } from "../devices/vhost_user/fs.ts";

/** Debian's virtiofsd (package qemu-system-common). */
export const VIRTIOFSD_PATH = "/usr/lib/qemu/virtiofsd";
/** util-linux's setpriv, which sets the parent-death signal before executing a program. */
export const SETPRIV_PATH = "/usr/bin/setpriv";

/** How long virtiofsd may take to listen on its socket. */
export const VIRTIOFSD_START_TIMEOUT_MS = 10_000;
/** How long stop() waits after SIGTERM before SIGKILL. */
export const VIRTIOFSD_STOP_GRACE_MS = 2_000;
/** How many of virtiofsd's stderr lines are passed on; later ones are counted, not shown. */
export const MAX_FORWARDED_LINES = 100;
/** How many of its last stderr lines are kept for the error when it fails to start. */
const KEPT_LINES = 8;
/** How often the start-up wait looks at /proc/net/unix. */
const POLL_MS = 20;

/** /proc/net/unix's Flags column for a listening socket: the kernel's __SO_ACCEPTCON (include/linux/net.h). */
const SO_ACCEPTCON = 0x10000;

/** crosvm's cache policy names → virtiofsd's `-o cache=` values. */
const CACHE_OPTION: Record<SharedDirConfig["cache"], string> = { never: "none", auto: "auto", always: "always" };

/**
 * virtiofsd's xattr map for crosvm's `rewrite-security-xattrs=true`: the guest's security.* attributes,
 * security.selinux excepted, are stored on the host as user.virtiofs.security.*; the host's own
 * security.* (but security.selinux) stay hidden, and the guest cannot name user.virtiofs.* directly.
 * virtiofsd's xattr-mapping syntax: `:type:scope:key:prepend:` rules, the first that matches applies.
 */
const SECURITY_XATTR_MAP = ":ok:all:security.selinux:security.selinux:" +
  ":prefix:all:security.:user.virtiofs.security.:" +
  ":bad:server::security.:" +
  ":bad:client:user.virtiofs.::" +
  ":ok:all:::";

/** virtiofsd's arguments for `cfg`, listening on `socketPath`. */
export function virtiofsdArgs(cfg: SharedDirConfig, socketPath: string): string[] {
  const args = [
    `--socket-path=${socketPath}`,
    "-o",
    `source=${cfg.path}`,
    "-o",
    `cache=${CACHE_OPTION[cfg.cache]}`,
    "-o",
    `timeout=${cfg.timeoutSecs}`,
    "-o",
    cfg.writeback ? "writeback" : "no_writeback",
    // crosvm serves extended attributes; POSIX ACLs are stored in them.
    "-o",
    "xattr",
    "-o",
    cfg.posixAcl ? "posix_acl" : "no_posix_acl",
    "-o",
    cfg.securityCtx ? "security_label" : "no_security_label",
    "-o",
    "log_level=warn",
  ];
  if (cfg.rewriteSecurityXattrs) args.push("-o", `xattrmap=${SECURITY_XATTR_MAP}`);
  return args;
}

/** Whether /proc/net/unix lists a listening socket bound to `path`. */
export function unixSocketListening(path: string, procNetUnix = "/proc/net/unix"): boolean {
  let text: string;
  try {
    text = Deno.readTextFileSync(procNetUnix);
  } catch {
    return false;
  }
  for (const line of text.split("\n").slice(1)) {
    // Num RefCount Protocol Flags Type St Inode Path
    const cols = line.trim().split(/\s+/);
    if (cols.length < 8 || cols.slice(7).join(" ") !== path) continue;
    if ((Number.parseInt(cols[3], 16) & SO_ACCEPTCON) !== 0) return true;
  }
  return false;
}

export interface StartVirtiofsdOptions {
  /** The VM's private runtime directory (mode 0700): the socket is made there. */
  runtimeDir: string;
  /** The socket's file name in runtimeDir (default `virtiofsd-<tag>.sock` with the tag made file-safe). */
  socketName?: string;
  /** Where virtiofsd's stderr lines go (default: console.error). */
  log?: (line: string) => void;
  /** Another virtiofsd binary (tests). */
  binary?: string;
  startTimeoutMs?: number;
}

export interface VirtiofsdProcess {
  readonly tag: string;
  readonly socketPath: string;
  /** virtiofsd's process id (setpriv executes it, keeping the id). */
  readonly pid: number;
  /** Settles when the process ends. */
  readonly exited: Promise<Deno.CommandStatus>;
  /** End it (SIGTERM, then SIGKILL after a grace period) and remove its socket; idempotent. */
  stop(): Promise<void>;
}

function fileSafe(tag: string): string {
  return tag.replace(/[^A-Za-z0-9_.-]/g, "_");
}

/** Start virtiofsd for `cfg` and wait until its socket listens. Failures are HostError (exit 1), one line. */
export async function startVirtiofsd(cfg: SharedDirConfig, options: StartVirtiofsdOptions): Promise<VirtiofsdProcess> {
  const binary = options.binary ?? VIRTIOFSD_PATH;
  const log = options.log ?? ((line: string) => console.error(line));
  const socketPath = `${options.runtimeDir}/${options.socketName ?? `virtiofsd-${fileSafe(cfg.tag)}.sock`}`;
  for (const [path, what] of [[binary, "virtiofsd"], [SETPRIV_PATH, "setpriv"]]) {
    try {
      Deno.statSync(path);
    } catch {
      throw new HostError(
        `--shared-dir ${cfg.tag}: ${path} not found: type=fs needs ${what} ` +
          `(Debian: ${what === "setpriv" ? "util-linux" : "qemu-system-common"})`,
      );
    }
  }
  try {
    Deno.removeSync(socketPath);
  } catch {
    // absent
  }
  let child: Deno.ChildProcess;
  try {
    child = new Deno.Command(SETPRIV_PATH, {
      args: ["--pdeathsig", "SIGKILL", "--", binary, ...virtiofsdArgs(cfg, socketPath)],
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
  } catch (e) {
    throw new HostError(`--shared-dir ${cfg.tag}: cannot start virtiofsd: ${(e as Error).message.split("\n")[0]}`);
  }
  const last: string[] = [];
  let forwarded = 0;
  const readErr = (async () => {
    const dec = new TextDecoderStream();
    let buf = "";
    try {
      for await (const chunk of child.stderr.pipeThrough(dec)) {
        buf += chunk;
        for (let nl = buf.indexOf("\n"); nl >= 0; nl = buf.indexOf("\n")) {
          const line = buf.slice(0, nl).trimEnd();
          buf = buf.slice(nl + 1);
          if (line === "") continue;
          last.push(line);
          if (last.length > KEPT_LINES) last.shift();
          if (forwarded < MAX_FORWARDED_LINES) log(`virtiofsd ${cfg.tag}: ${line}`);
          else if (forwarded === MAX_FORWARDED_LINES) log(`virtiofsd ${cfg.tag}: further messages not shown`);
          forwarded++;
        }
        // A line that never ends is cut, so the buffer stays bounded.
        if (buf.length > 4096) buf = buf.slice(-4096);
      }
    } catch {
      // the pipe closed
    }
  })();
  let ended = false;
  const exited = child.status.then((s) => {
    ended = true;
    return s;
  });

  let stopped: Promise<void> | undefined;
  const stop = (): Promise<void> => {
    stopped ??= (async () => {
      if (!ended) {
        try {
          child.kill("SIGTERM");
        } catch {
          // ended meanwhile
        }
        let timer: ReturnType<typeof setTimeout> | undefined;
        const grace = new Promise<"timeout">((r) => timer = setTimeout(() => r("timeout"), VIRTIOFSD_STOP_GRACE_MS));
        const how = await Promise.race([exited, grace]);
        clearTimeout(timer);
        if (how === "timeout") {
          try {
            child.kill("SIGKILL");
          } catch {
            // ended meanwhile
          }
          await exited;
        }
      }
      await readErr;
      try {
        Deno.removeSync(socketPath);
      } catch {
        // gone
      }
    })();
    return stopped;
  };

  const deadline = Date.now() + (options.startTimeoutMs ?? VIRTIOFSD_START_TIMEOUT_MS);
  while (!unixSocketListening(socketPath)) {
    if (ended) {
      await readErr;
      const why = last.length > 0 ? last[last.length - 1] : `exit status ${(await exited).code}`;
      throw new HostError(`--shared-dir ${cfg.tag}: virtiofsd ended before its socket listened: ${why}`);
    }
    if (Date.now() > deadline) {
      await stop();
      throw new HostError(`--shared-dir ${cfg.tag}: virtiofsd did not listen on ${socketPath} in time`);
    }
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
  return { tag: cfg.tag, socketPath, pid: child.pid, exited, stop };
}

/**
 * The virtio-fs device for one `--shared-dir ...:type=fs`: a private runtime directory (mode 0700, under
 * $XDG_RUNTIME_DIR or the temporary directory), virtiofsd started on a socket there, and the vhost-user
 * front end connected to it. Closing the device stops virtiofsd and removes the directory. Failures are
 * HostError (exit 1), one line; nothing is left running.
 */
export async function createSharedDirDevice(
  cfg: SharedDirConfig,
  opts: { log?: (line: string) => void; binary?: string } = {},
): Promise<VirtioFsFrontEnd> {
  const log = opts.log ?? ((line: string) => console.error(line));
  const runtimeDir = Deno.makeTempDirSync({ dir: Deno.env.get("XDG_RUNTIME_DIR") || undefined, prefix: "denovm-" });
  const removeDir = () => {
    try {
      Deno.removeSync(runtimeDir, { recursive: true });
    } catch {
      // gone
    }
  };
  let v: VirtiofsdProcess;
  let stopping = false;
  // Once the VMM closes the device, what virtiofsd says about the connection ending is not news.
  const virtiofsdLog = (line: string) => {
    if (!stopping) log(line);
  };
  try {
    v = await startVirtiofsd(cfg, { runtimeDir, log: virtiofsdLog, binary: opts.binary });
  } catch (e) {
    removeDir();
    throw e;
  }
  const stop = () => v.stop().finally(removeDir);
  // virtiofsd serves one connection; when it ends on its own, the device has lost its back end.
  v.exited.then((s) => {
    if (!stopping) log(`--shared-dir ${cfg.tag}: virtiofsd ended (exit status ${s.code})`);
  });
  const device = new VirtioFsFrontEnd({
    name: `fs-${cfg.tag}`,
    socket: v.socketPath,
    tag: cfg.tag,
    log,
    onClose: () => {
      stopping = true;
      stop();
    },
  });
  try {
    await device.connect();
  } catch (e) {
    stopping = true;
    await stop();
    throw new HostError(`--shared-dir ${cfg.tag}: ${(e as Error).message.split("\n")[0]}`);
  }
  return device;
}
