// Files the user names (kernel, initrd, disk images, serial input): opened so that their kind cannot hold
// or flood the process. The open adds O_NONBLOCK, so a FIFO with no writer cannot hold it, and what was
// opened is checked on the fd itself (fstat through /proc/self/fd), so a file swapped after a path check
// is still seen for what it is. A kind that is not allowed is the user's error (exit 35), named in one line.

import { ConfigError } from "./exit.ts";
import { closeFd, EINTR, errno, F_GETFL, F_SETFL, libc, O_NONBLOCK, openFile, SysError } from "../ffi/libc.ts";

/** What a file is, as a message names it: "a regular file", "a FIFO", "a character device", ... */
export function fileKind(info: Deno.FileInfo): string {
  if (info.isFile) return "a regular file";
  if (info.isDirectory) return "a directory";
  if (info.isFifo) return "a FIFO";
  if (info.isSocket) return "a socket";
  if (info.isCharDevice) return "a character device";
  if (info.isBlockDevice) return "a block device";
  if (info.isSymlink) return "a symbolic link";
  return "a file of unknown kind";
}

/** A file's identity, its device and inode ("dev:ino"); undefined where the platform gives neither. */
export function fileIdentity(info: Deno.FileInfo): string | undefined {
  return info.ino === null ? undefined : `${info.dev}:${info.ino}`;
}

/** fstat: what `fd` has open (/proc/self/fd/N names the open file itself, whatever its path is now). */
export function fdInfo(fd: number): Deno.FileInfo {
  return Deno.statSync(`/proc/self/fd/${fd}`);
}

/** The kinds a user's file may be. */
export type AllowedKinds = "regular" | "regular-or-block";

/** A user's file of a kind its role does not take (a FIFO as a kernel, /dev/zero as a disk): exit 35. */
export class FileKindError extends ConfigError {
  constructor(what: string, path: string, info: Deno.FileInfo, allowed: AllowedKinds) {
    const wanted = allowed === "regular" ? "a regular file" : "a regular file or block device";
    super(`${what} "${path}": is ${fileKind(info)}, not ${wanted}`);
    this.name = "FileKindError";
  }
}

/** Throws FileKindError unless `info` is of an allowed kind. */
export function checkFileKind(what: string, path: string, info: Deno.FileInfo, allowed: AllowedKinds): void {
  if (info.isFile || (allowed === "regular-or-block" && info.isBlockDevice)) return;
  throw new FileKindError(what, path, info, allowed);
}

/**
 * Opens `path` with `flags` without blocking on its kind, checks the opened file's kind, and returns the fd
 * (O_NONBLOCK cleared again: it means nothing to a regular file or a block device) and its fstat. Throws
 * SysError when the open fails, FileKindError (closing the fd) when the kind is not allowed.
 */
export function openUserFile(
  path: string,
  flags: number,
  what: string,
  allowed: AllowedKinds,
): { fd: number; info: Deno.FileInfo } {
  const fd = openFile(path, flags | O_NONBLOCK);
  try {
    const info = fdInfo(fd);
    checkFileKind(what, path, info, allowed);
    const lc = libc();
    const fl = lc.fcntl(fd, F_GETFL, 0n);
    if (fl < 0 || lc.fcntl(fd, F_SETFL, BigInt(fl & ~O_NONBLOCK)) < 0) throw new SysError(`fcntl ${path}`, errno());
    return { fd, info };
  } catch (e) {
    closeFd(fd);
    throw e;
  }
}

/**
 * The first `size` bytes of the file open at `fd` (fewer if it ends sooner): the caller bounds `size`
 * (from the fd's fstat), so a file that grows while it is read cannot grow the buffer.
 */
export function readFd(fd: number, size: number, path: string): Uint8Array {
  const buf = new Uint8Array(size);
  const lc = libc();
  let done = 0;
  while (done < size) {
    const n = Number(lc.pread(fd, buf.subarray(done), BigInt(size - done), BigInt(done)));
    if (n < 0) {
      if (errno() === EINTR) continue;
      throw new SysError(`read ${path}`, errno());
    }
    if (n === 0) break;
    done += n;
  }
  return done === size ? buf : buf.slice(0, done);
}
