// qemu-storage-daemon (Debian's QEMU, package qemu-system-common) exporting a raw image as vhost-user-blk on
// a Unix socket: a back end no one here wrote, for the front end's tests and benchmarks. It listens again
// after its front end goes away, and a new one may be started on the same socket after it is killed.

const QSD = "qemu-storage-daemon";
/** Hang guard for the daemon's socket to appear (not a timing assertion). */
const SOCKET_GUARD_MS = 30_000;
const SOCKET_POLL_MS = 50;

/** qemu-storage-daemon's path on PATH, or undefined. */
export function storageDaemonPath(): string | undefined {
  for (const dir of (Deno.env.get("PATH") ?? "").split(":")) {
    try {
      if (Deno.statSync(`${dir}/${QSD}`).isFile) return `${dir}/${QSD}`;
    } catch {
      // not there
    }
  }
  return undefined;
}

/** Why qemu-storage-daemon cannot run here, or undefined when it can. */
export function storageDaemonUnavailable(): string | undefined {
  return storageDaemonPath() ? undefined : `${QSD} is needed on PATH (Debian package qemu-system-common)`;
}

/** A qemu-storage-daemon process exporting one image; its stderr kept for the error when it ends early. */
export class StorageDaemon {
  readonly #child: Deno.ChildProcess;
  readonly #done: Promise<string>;
  #ended = false;

  private constructor(child: Deno.ChildProcess, readonly socket: string) {
    this.#child = child;
    this.#done = child.output().then((o) => {
      this.#ended = true;
      return new TextDecoder().decode(o.stderr).trim();
    });
  }

  /** Export the raw image `image`, writable, as vhost-user-blk on `socket`. */
  static start(image: string, socket: string): StorageDaemon {
    const path = storageDaemonPath();
    if (!path) throw new Error(storageDaemonUnavailable());
    return new StorageDaemon(
      new Deno.Command(path, {
        args: [
          "--blockdev",
          `driver=file,node-name=file0,filename=${image}`,
          "--blockdev",
          "driver=raw,node-name=disk0,file=file0",
          "--export",
          `type=vhost-user-blk,id=exp0,node-name=disk0,writable=on,addr.type=unix,addr.path=${socket}`,
        ],
        stdin: "null",
        stdout: "null",
        stderr: "piped",
      }).spawn(),
      socket,
    );
  }

  /** Resolves once its socket exists; throws with the daemon's stderr if it ends first. */
  async ready(): Promise<void> {
    const socket = this.socket;
    const end = Date.now() + SOCKET_GUARD_MS;
    while (!(await Deno.stat(socket).then((s) => s.isSocket, () => false))) {
      if (this.#ended) throw new Error(`${QSD} ended: ${await this.#done}`);
      if (Date.now() > end) throw new Error(`${QSD}: ${socket} did not appear`);
      await new Promise((r) => setTimeout(r, SOCKET_POLL_MS));
    }
  }

  /** SIGKILL unless it has ended; resolves once it has. */
  async kill(): Promise<void> {
    if (!this.#ended) {
      try {
        this.#child.kill("SIGKILL");
      } catch {
        // it ended meanwhile
      }
    }
    await this.#done;
  }
}
