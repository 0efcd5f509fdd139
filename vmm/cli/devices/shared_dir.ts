// The shared-directory family: `run --shared-dir PATH:TAG[:type=fs][:key=value...]`, crosvm's SharedDir
// syntax (google/crosvm src/crosvm/sys/linux/config.rs `impl FromStr for SharedDir`, and the fs device's
// options in devices/src/virtio/fs/config.rs `Config`). See common.ts for how the family modules are
// organised.
//
// The text is split at ":": the host directory, the tag, then `key=value` items in any order. `type` picks
// the device: `fs` (virtio-fs) or `p9` (9P, crosvm's default when no type is given). denovm has no 9P
// device: p9 is refused with a line saying to use type=fs. For type=fs the VMM starts the machine's
// virtiofsd (vmm/virtiofsd.ts) and connects it through the vhost-user front end, so each crosvm key is
// either mapped to a virtiofsd option (virtiofsdArgs there) or, when virtiofsd has nothing like it,
// refused with one line naming the key (exit 35). A key given at its crosvm default is accepted even
// when virtiofsd has no option for it, since it then asks for nothing.

import { SHARED_DIR_CACHE_POLICIES, type SharedDirCachePolicy, type SharedDirConfig } from "../../config.ts";
import { parseUint, UsageError } from "../keyvalue.ts";

/** Bytes of the virtio-fs config space's tag field (virtio 1.2 §5.11.4: `u8 tag[36]`). */
export const VIRTIO_FS_TAG_MAX = 36;

/** crosvm's default `timeout`, in seconds (fs/config.rs config_default_timeout). */
export const DEFAULT_SHARED_DIR_TIMEOUT_SECS = 5;

/**
 * denovm's default `security_ctx`: false, where crosvm's is true. virtiofsd's equivalent (`-o security_label`)
 * fails every file the guest creates with ERANGE when the guest has no LSM that labels files (Debian's
 * 6.1 kernel without SELinux, test/qemu/virtiofs_test.ts), so it is used only when asked for.
 */
export const DEFAULT_SECURITY_CTX = false;

const OPTION = "--shared-dir";

/** The `type` values crosvm accepts for each kind (config.rs `impl FromStr for SharedDirKind`). */
const FS_TYPES = ["fs", "FS"];
const P9_TYPES = ["9p", "9P", "p9", "P9"];

/** Outer keys crosvm reads before the type's own (config.rs UgidConfig): minijail's user namespace. */
const UGID_KEYS = ["uid", "gid", "uidmap", "gidmap"];

/**
 * crosvm fs keys that virtiofsd cannot honour, with the value that asks for nothing (accepted) and why
 * any other value is refused.
 */
const UNSUPPORTED_FS_KEYS: Record<string, { neutral?: string; why: string }> = {
  negative_timeout: { neutral: "0", why: "virtiofsd caches failed lookups for as long as `timeout`" },
  ascii_casefold: { neutral: "false", why: "virtiofsd has no case-insensitive lookups" },
  dax: { neutral: "false", why: "Debian's virtiofsd has no DAX window" },
  use_dax: { neutral: "false", why: "Debian's virtiofsd has no DAX window" },
  max_dynamic_perm: { neutral: "0", why: "virtiofsd has no dynamic permission paths (an ARCVM feature)" },
  max_dynamic_xattr: { neutral: "0", why: "virtiofsd has no dynamic xattr paths (an ARCVM feature)" },
  unmap_guest_memory_on_fork: { neutral: "false", why: "virtiofsd maps guest memory itself" },
  privileged_quota_uids: { why: "virtiofsd has no quota privileges (an ARCVM feature)" },
  ugid_map: { why: "virtiofsd has no run-time uid/gid mapping" },
};

/** Every fs key crosvm's Config knows, with its aliases (serde `alias`): the name each stands for. */
const FS_KEY_NAMES: Record<string, string> = {
  timeout: "timeout",
  cache: "cache_policy",
  cache_policy: "cache_policy",
  writeback: "writeback",
  "rewrite-security-xattrs": "rewrite_security_xattrs",
  rewrite_security_xattrs: "rewrite_security_xattrs",
  posix_acl: "posix_acl",
  security_ctx: "security_ctx",
  dax: "use_dax",
  use_dax: "use_dax",
  negative_timeout: "negative_timeout",
  ascii_casefold: "ascii_casefold",
  max_dynamic_perm: "max_dynamic_perm",
  max_dynamic_xattr: "max_dynamic_xattr",
  unmap_guest_memory_on_fork: "unmap_guest_memory_on_fork",
  privileged_quota_uids: "privileged_quota_uids",
  ugid_map: "ugid_map",
};

export interface ParseSharedDirOptions {
  /** Check that PATH is a directory (default true), as crosvm does while parsing. */
  checkPath?: boolean;
}

/** crosvm's booleans (serde_keyvalue): exactly `true` or `false`. */
function parseBool(value: string, where: string): boolean {
  if (value === "true") return true;
  if (value === "false") return false;
  throw new UsageError(`${where}: expected true or false, got "${value}"`);
}

/** A decimal count, as serde_keyvalue reads an unsigned integer. */
function parseCount(value: string, where: string): number {
  if (!/^[0-9]+$/.test(value)) throw new UsageError(`${where}: "${value}" is not a whole number`);
  return parseUint(value, where);
}

/** Parses one `--shared-dir` value. Bad or unsupported input throws UsageError (one line, exit 35). */
export function parseSharedDirOption(text: string, options: ParseSharedDirOptions = {}): SharedDirConfig {
  const parts = text.split(":");
  const path = parts[0];
  if (path === "") throw new UsageError(`${OPTION}: missing source path (PATH:TAG[:type=fs][:key=value...])`);
  if (parts.length < 2 || parts[1] === "") {
    throw new UsageError(`${OPTION} ${path}: missing tag (PATH:TAG[:type=fs][:key=value...])`);
  }
  const tag = parts[1];
  const where = `${OPTION} ${tag}`;
  const tagBytes = new TextEncoder().encode(tag).length;
  if (tagBytes > VIRTIO_FS_TAG_MAX) {
    throw new UsageError(`${where}: the tag is ${tagBytes} bytes; virtio-fs tags have at most ${VIRTIO_FS_TAG_MAX}`);
  }
  if (options.checkPath ?? true) {
    let info: Deno.FileInfo;
    try {
      info = Deno.statSync(path);
    } catch (e) {
      const reason = e instanceof Deno.errors.NotFound ? "no such directory" : (e as Error).message.split("\n")[0];
      throw new UsageError(`${where}: source path "${path}": ${reason}`);
    }
    if (!info.isDirectory) throw new UsageError(`${where}: source path "${path}" must be a directory`);
  }

  let kind: "fs" | "p9" = "p9";
  const fsOpts: [string, string][] = [];
  for (const item of parts.slice(2)) {
    const eq = item.indexOf("=");
    if (item === "") throw new UsageError(`${where}: options must not be empty`);
    if (eq < 0) throw new UsageError(`${where}: option "${item}" must be of the form key=value`);
    const key = item.slice(0, eq);
    const value = item.slice(eq + 1);
    if (key === "type") {
      if (FS_TYPES.includes(value)) kind = "fs";
      else if (P9_TYPES.includes(value)) kind = "p9";
      else throw new UsageError(`${where}: type must be fs or 9p, got "${value}"`);
    } else if (UGID_KEYS.includes(key)) {
      throw new UsageError(
        `${where}: ${key} is not supported: virtiofsd runs with the host's user and group ids, with no mapping`,
      );
    } else {
      fsOpts.push([key, value]);
    }
  }
  if (kind === "p9") {
    throw new UsageError(
      `${where}: type=p9 (crosvm's default) is not supported: denovm has no 9P device; add :type=fs to serve it ` +
        "with virtiofsd",
    );
  }

  const cfg: SharedDirConfig = {
    path,
    tag,
    cache: "auto",
    timeoutSecs: DEFAULT_SHARED_DIR_TIMEOUT_SECS,
    writeback: false,
    posixAcl: true,
    securityCtx: DEFAULT_SECURITY_CTX,
    rewriteSecurityXattrs: false,
  };
  const seen = new Set<string>();
  for (const [key, value] of fsOpts) {
    const name = FS_KEY_NAMES[key];
    const at = `${where} ${key}`;
    if (name === undefined) throw new UsageError(`${where}: unknown key "${key}"`);
    if (seen.has(name)) throw new UsageError(`${where}: ${key} given more than once`);
    seen.add(name);
    const unsupported = UNSUPPORTED_FS_KEYS[key];
    if (unsupported) {
      if (unsupported.neutral !== undefined && value === unsupported.neutral) continue;
      throw new UsageError(`${at}=${value} is not supported: ${unsupported.why}`);
    }
    switch (name) {
      case "timeout":
        cfg.timeoutSecs = parseCount(value, at);
        break;
      case "cache_policy":
        if (!(SHARED_DIR_CACHE_POLICIES as readonly string[]).includes(value)) {
          throw new UsageError(`${at}: must be one of ${SHARED_DIR_CACHE_POLICIES.join(", ")}, got "${value}"`);
        }
        cfg.cache = value as SharedDirCachePolicy;
        break;
      case "writeback":
        cfg.writeback = parseBool(value, at);
        break;
      case "rewrite_security_xattrs":
        cfg.rewriteSecurityXattrs = parseBool(value, at);
        break;
      case "posix_acl":
        cfg.posixAcl = parseBool(value, at);
        break;
      case "security_ctx":
        cfg.securityCtx = parseBool(value, at);
        break;
    }
  }
  return cfg;
}

/** Two shared directories with one tag would be two devices the guest cannot tell apart. */
export function validateSharedDirs(dirs: readonly SharedDirConfig[]): void {
  const tags = new Set<string>();
  for (const d of dirs) {
    if (tags.has(d.tag)) throw new UsageError(`${OPTION} ${d.tag}: the tag is given more than once`);
    tags.add(d.tag);
  }
}
