// What the test front ends that boot a Linux guest as a host process have in common (user-mode Linux in
// test/support/uml.ts, QEMU in test/support/qemu.ts, the Mesa guest in bench/kmscube.ts): the initramfs
// they boot (a newc cpio archive with busybox and a generated /init) and the running process whose
// console (stdout and stderr) a test reads and waits on, with a hang guard.

import { concatBytes } from "../../core/bytes.ts";

/** A statically linked busybox (package busybox-static). */
export const BUSYBOX = "/usr/bin/busybox";

export function exists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    return false;
  }
}

// ---- newc cpio writer (Linux Documentation/driver-api/early-userspace/buffer-format.rst) ----

/** newc magic: "070701" followed by 13 eight-digit hex fields. */
const CPIO_NEWC_MAGIC = "070701";
/** Header fields and name/data are padded to 4 bytes. */
const CPIO_ALIGN = 4;
const CPIO_TRAILER = "TRAILER!!!";
/** st_mode file types (linux/stat.h). */
export const S_IFDIR = 0o040000;
export const S_IFREG = 0o100000;
export const S_IFCHR = 0o020000;
/** /dev/console is character device 5:1 (Documentation/admin-guide/devices.txt). */
const CONSOLE_MAJOR = 5;
const CONSOLE_MINOR = 1;

export interface CpioEntry {
  name: string;
  mode: number;
  data?: Uint8Array;
  rdevMajor?: number;
  rdevMinor?: number;
}

function pad(n: number): number {
  return (CPIO_ALIGN - (n % CPIO_ALIGN)) % CPIO_ALIGN;
}

/** Encode entries as one newc archive (with trailer). */
export function cpioNewc(entries: CpioEntry[]): Uint8Array {
  const enc = new TextEncoder();
  const parts: Uint8Array[] = [];
  const hex = (v: number) => v.toString(16).padStart(8, "0");
  let ino = 1;
  const add = (e: CpioEntry) => {
    const name = enc.encode(e.name + "\0");
    const size = e.data?.length ?? 0;
    const fields = [
      ino++, // c_ino
      e.mode, // c_mode
      0, // c_uid
      0, // c_gid
      e.mode & S_IFDIR ? 2 : 1, // c_nlink
      0, // c_mtime
      size, // c_filesize
      0, // c_devmajor
      0, // c_devminor
      e.rdevMajor ?? 0, // c_rdevmajor
      e.rdevMinor ?? 0, // c_rdevminor
      name.length, // c_namesize
      0, // c_check
    ];
    const hdr = enc.encode(CPIO_NEWC_MAGIC + fields.map(hex).join(""));
    parts.push(hdr, name, new Uint8Array(pad(hdr.length + name.length)));
    if (e.data) parts.push(e.data, new Uint8Array(pad(size)));
  };
  entries.forEach(add);
  add({ name: CPIO_TRAILER, mode: 0 });
  return concatBytes(parts);
}

/**
 * The base of a busybox initramfs: the folders `dirs` (mode 0755), /dev/console and /bin/busybox, then
 * each module file (path on the host) as lib/modules/<its file name>.
 */
export function busyboxBaseEntries(dirs: string[], moduleFiles: string[] = []): CpioEntry[] {
  const entries: CpioEntry[] = dirs.map((d) => ({ name: d, mode: S_IFDIR | 0o755 }));
  entries.push({ name: "dev/console", mode: S_IFCHR | 0o600, rdevMajor: CONSOLE_MAJOR, rdevMinor: CONSOLE_MINOR });
  entries.push({ name: "bin/busybox", mode: S_IFREG | 0o755, data: Deno.readFileSync(BUSYBOX) });
  for (const m of moduleFiles) {
    entries.push({ name: `lib/modules/${m.split("/").pop()}`, mode: S_IFREG | 0o644, data: Deno.readFileSync(m) });
  }
  return entries;
}

/**
 * A busybox /init script: busybox applets, /proc, /sys, /dev, then the modules (dependencies first;
 * each loaded from /lib/modules/<file name>), then `markStart`, then `commands` (a shell fragment, in a
 * `set -e` subshell), then "`markEnd` status=N" with the fragment's exit status, then power off.
 */
export function busyboxInitScript(moduleFiles: string[], commands: string, markStart: string, markEnd: string): string {
  const insmods = moduleFiles.map((m) => `insmod /lib/modules/${m.split("/").pop()}`).join("\n");
  return `#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
${insmods}
echo ${markStart}
( set -e
${commands}
)
echo "${markEnd} status=$?"
poweroff -f
`;
}

/** The status N of the "`markEnd` status=N" line busyboxInitScript prints, or undefined. */
export function initCommandStatus(output: string, markEnd: string): number | undefined {
  const m = output.match(new RegExp(`${markEnd} status=(\\d+)`));
  return m ? Number(m[1]) : undefined;
}

// ---- A guest process and its console ----

export interface ConsoleExit {
  /** Process exit code. */
  code: number;
  /** Console output (stdout and stderr, as they came). */
  output: string;
  /** The process was killed (by kill() or the hang guard). */
  killed: boolean;
}

export interface ConsoleProcessOptions {
  /** Name in error messages ("QEMU", "UML"). */
  label: string;
  /** Kill the process if it has not exited after this long. */
  hangGuardMs: number;
  /** How to kill it (default: SIGKILL to the process). */
  kill?: (child: Deno.ChildProcess) => void;
  /** Runs after the process exited, before `done` resolves (e.g. removing its temp folder). */
  afterExit?: () => Promise<void>;
}

/**
 * A spawned process (stdout and stderr piped) whose output is its console: captured as text, with
 * waitFor, a hang guard and kill.
 */
export class ConsoleProcess {
  readonly child: Deno.ChildProcess;
  /** Resolves once the process has exited and its output is read to the end. */
  readonly done: Promise<ConsoleExit>;
  readonly #label: string;
  readonly #kill: (child: Deno.ChildProcess) => void;
  readonly #waiters: { re: RegExp; resolve: () => void }[] = [];
  #output = "";
  #killed = false;

  constructor(child: Deno.ChildProcess, opts: ConsoleProcessOptions) {
    this.child = child;
    this.#label = opts.label;
    this.#kill = opts.kill ?? killChild;
    const dec = new TextDecoder();
    const pump = async (stream: ReadableStream<Uint8Array>) => {
      for await (const chunk of stream) {
        this.#output += dec.decode(chunk, { stream: true });
        for (const w of [...this.#waiters]) {
          if (w.re.test(this.#output)) {
            this.#waiters.splice(this.#waiters.indexOf(w), 1);
            w.resolve();
          }
        }
      }
    };
    const guard = setTimeout(() => this.kill(), opts.hangGuardMs);
    this.done = (async () => {
      const [status] = await Promise.all([child.status, pump(child.stdout), pump(child.stderr)]);
      clearTimeout(guard);
      await opts.afterExit?.();
      return { code: status.code, output: this.#output, killed: this.#killed };
    })();
  }

  get output(): string {
    return this.#output;
  }

  /** Resolves when the console output matches `re` (rejects if the process exits first). */
  waitFor(re: RegExp): Promise<void> {
    if (re.test(this.#output)) return Promise.resolve();
    return new Promise((resolve, reject) => {
      this.#waiters.push({ re, resolve });
      this.done.then(() => {
        if (!re.test(this.#output)) reject(new Error(`${this.#label} exited before printing ${re}:\n${this.#output}`));
      });
    });
  }

  kill(): void {
    this.#killed = true;
    this.#kill(this.child);
  }
}

/** SIGKILL to the process, if it is still there. */
function killChild(child: Deno.ChildProcess): void {
  try {
    child.kill("SIGKILL");
  } catch {
    // already exited
  }
}
