// The SIGBUS guard (ffi/native/sigbus_guard.c, see the comment at its top): a native SIGBUS handler that
// repairs faults in registered shared mappings whose file shrank, records them, and passes every other
// SIGBUS on. A JavaScript callback can never run in signal context, so the handler is C, built into a
// shared library by scripts/setup.sh (`deno run -A ffi/sigbus_guard.ts`) or here at first use with gcc,
// and cached by a hash of the source and the flags under the first of ${DENOVM_CACHE:-<repo>/.cache}
// and ${XDG_CACHE_HOME:-~/.cache}/denovm that holds it or can take it, in native/.

import { createHash } from "node:crypto";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const SOURCE_URL = new URL("./native/sigbus_guard.c", import.meta.url);
/** A file: URL's path, or undefined (this module may have been loaded from elsewhere). */
function localPath(url: URL): string | undefined {
  return url.protocol === "file:" ? fileURLToPath(url) : undefined;
}
const GCC_FLAGS = ["-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror"];

const symbols = {
  sigbus_guard_install: { parameters: [], result: "i32" },
  // void *addr, size_t len, int notify_fd -> slot or -1
  sigbus_guard_register: { parameters: ["pointer", "usize", "i32"], result: "i32" },
  sigbus_guard_unregister: { parameters: ["i32"], result: "void" }, // int slot
  sigbus_guard_take_faults: { parameters: ["i32"], result: "u32" }, // int slot -> faults since the last call
  sigbus_guard_total_faults: { parameters: [], result: "u64" },
  sigbus_guard_max_regions: { parameters: [], result: "i32" },
} as const satisfies Deno.ForeignLibraryInterface;

/** The installed guard. */
export interface SigbusGuard {
  /** The shared library it was loaded from. */
  readonly path: string;
  /**
   * Guard the mapping [ptr, ptr + length): a SIGBUS there is repaired and counted, and writes 1 to the
   * eventfd `notifyFd` (-1: none). Returns the slot; throws when every slot is taken.
   */
  register(ptr: Deno.PointerValue, length: number, notifyFd: number): number;
  /** Stop guarding a slot's mapping; call before unmapping it. */
  unregister(slot: number): void;
  /** Faults the slot's mapping took since the last call (resets the count). */
  takeFaults(slot: number): number;
  /** Faults repaired in all mappings since the process started. */
  totalFaults(): bigint;
}

/** The guard, or why it is unavailable. */
export type SigbusGuardResult = { guard: SigbusGuard; reason?: undefined } | { guard?: undefined; reason: string };

/** The cache folders to look in, in order; the library is built into the first that takes it. */
export function sigbusGuardCacheDirs(): string[] {
  const env = (k: string) => Deno.env.get(k) || undefined;
  const home = env("HOME");
  const xdg = env("XDG_CACHE_HOME") ?? (home ? `${home}/.cache` : undefined);
  // The checkout this module is in holds setup.sh's default cache.
  const here = localPath(new URL(import.meta.url));
  const repoCache = here ? join(dirname(dirname(here)), ".cache") : undefined;
  const dirs = [env("DENOVM_CACHE") ?? repoCache].filter((d) => d !== undefined);
  if (xdg) dirs.push(`${xdg}/denovm`);
  return dirs.map((d) => `${d}/native`);
}

/** The library's file name: the source's and flags' hash in it, so a changed source is rebuilt. */
function libraryName(source: Uint8Array): string {
  const hash = createHash("sha256").update(source).update("\0").update(GCC_FLAGS.join(" ")).digest("hex");
  return `sigbus_guard-${hash.slice(0, 16)}.so`;
}

function exists(path: string): boolean {
  try {
    return Deno.statSync(path).isFile;
  } catch {
    return false;
  }
}

/** Build the library (or find it built); returns its path or throws with the reason. */
export function buildSigbusGuard(): string {
  const sourcePath = localPath(SOURCE_URL);
  if (!sourcePath) throw new Error(`its source ${SOURCE_URL.href} is not a local file`);
  let source: Uint8Array;
  try {
    source = Deno.readFileSync(sourcePath);
  } catch (e) {
    throw new Error(`its source ${sourcePath} cannot be read: ${(e as Error).message}`);
  }
  const name = libraryName(source);
  const dirs = sigbusGuardCacheDirs();
  for (const d of dirs) if (exists(`${d}/${name}`)) return `${d}/${name}`;
  let gccError = "";
  for (const d of dirs) {
    const out = `${d}/${name}`;
    const tmp = `${out}.${Deno.pid}.tmp`;
    try {
      Deno.mkdirSync(d, { recursive: true });
    } catch {
      continue; // not writable here: the next folder
    }
    let r: Deno.CommandOutput;
    try {
      r = new Deno.Command("gcc", { args: [...GCC_FLAGS, "-o", tmp, sourcePath], stderr: "piped" })
        .outputSync();
    } catch (e) {
      throw new Error(`gcc cannot run (apt-get install gcc libc6-dev): ${(e as Error).message}`);
    }
    if (!r.success) {
      const err = new TextDecoder().decode(r.stderr).trim().split("\n")[0] ?? "";
      if (exists(tmp)) Deno.removeSync(tmp);
      gccError = `gcc failed (exit ${r.code}): ${err}`;
      continue;
    }
    Deno.renameSync(tmp, out);
    return out;
  }
  throw new Error(gccError || `no cache folder is writable (${dirs.join(", ")})`);
}

let loaded: SigbusGuardResult | undefined;

/**
 * The process's SIGBUS guard, built and installed on the first call; later calls return the same
 * result (a guard, or the reason it is unavailable: no gcc, no writable cache, a failed sigaction).
 */
export function sigbusGuard(): SigbusGuardResult {
  if (loaded) return loaded;
  try {
    const path = buildSigbusGuard();
    const lib = Deno.dlopen(path, symbols).symbols;
    const rc = lib.sigbus_guard_install();
    if (rc < 0) throw new Error(`sigaction(SIGBUS) failed (errno ${-rc})`);
    const max = lib.sigbus_guard_max_regions();
    loaded = {
      guard: {
        path,
        register(ptr, length, notifyFd) {
          const slot = lib.sigbus_guard_register(ptr, BigInt(length), notifyFd);
          if (slot < 0) throw new Error(`the SIGBUS guard's ${max} regions are all in use`);
          return slot;
        },
        unregister: (slot) => lib.sigbus_guard_unregister(slot),
        takeFaults: (slot) => lib.sigbus_guard_take_faults(slot),
        totalFaults: () => BigInt(lib.sigbus_guard_total_faults()),
      },
    };
  } catch (e) {
    loaded = { reason: `the SIGBUS guard is unavailable: ${(e as Error).message}` };
  }
  return loaded;
}

// `deno run -A ffi/sigbus_guard.ts`: build the library into the cache and print its path (scripts/setup.sh).
if (import.meta.main) {
  try {
    console.log(buildSigbusGuard());
  } catch (e) {
    console.error(`sigbus_guard: ${(e as Error).message}`);
    Deno.exit(1);
  }
}
