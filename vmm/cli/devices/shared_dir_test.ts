import assert from "node:assert/strict";
import { parseSharedDirOption, validateSharedDirs, VIRTIO_FS_TAG_MAX } from "./shared_dir.ts";
import { parseRunArgs } from "../run.ts";
import { EXIT_INVALID_ARGS } from "../../../core/exit.ts";
import { UsageError } from "../keyvalue.ts";
import { withTempDir } from "../../../test/support/temp_dir.ts";
import { assertOneLineRefusal, runDenovm } from "../../../test/support/cli.ts";

/** `f` throws one UsageError (exit 35) whose single line matches `re`. */
function refused(f: () => unknown, re: RegExp): void {
  assert.throws(f, (e: unknown) => {
    assert.ok(e instanceof UsageError, `not a UsageError: ${e}`);
    assert.equal(e.exitCode, EXIT_INVALID_ARGS);
    assert.ok(!e.message.includes("\n"), `more than one line: ${e.message}`);
    assert.match(e.message, re);
    return true;
  });
}

Deno.test("shared-dir: crosvm's defaults for type=fs (security_ctx: false here)", () => {
  const d = parseSharedDirOption("/:root:type=fs");
  assert.deepEqual(d, {
    path: "/",
    tag: "root",
    cache: "auto",
    timeoutSecs: 5,
    writeback: false,
    posixAcl: true,
    securityCtx: false,
    rewriteSecurityXattrs: false,
  });
  assert.equal(parseSharedDirOption("/:root:type=FS").tag, "root");
});

Deno.test("shared-dir: crosvm's own examples that virtiofsd can honour", () => {
  // crosvm's parse_shared_dir_vm_fio (config.rs tests): the rootfs line.
  const d = parseSharedDirOption(
    "/:root:type=fs:cache=always:timeout=5:writeback=false:dax=false:ascii_casefold=false",
  );
  assert.equal(d.cache, "always");
  assert.equal(d.timeoutSecs, 5);
  assert.equal(d.writeback, false);
  const n = parseSharedDirOption(
    "/:usr_local_bin:type=fs:cache=never:timeout=3600:rewrite-security-xattrs=true:writeback=true:posix_acl=false:security_ctx=false",
  );
  assert.equal(n.cache, "never");
  assert.equal(n.timeoutSecs, 3600);
  assert.equal(n.writeback, true);
  assert.equal(n.rewriteSecurityXattrs, true);
  assert.equal(n.posixAcl, false);
  assert.equal(n.securityCtx, false);
  // Keys may come in any order, type last; cache_policy is cache's own name; a neutral value is accepted.
  const o = parseSharedDirOption("/:t:cache_policy=auto:negative_timeout=0:max_dynamic_perm=0:type=fs");
  assert.equal(o.cache, "auto");
});

Deno.test("shared-dir: type=p9 and the default type are refused, saying to use type=fs", () => {
  for (const text of ["/:tag", "/:tag:type=p9", "/:tag:type=9P", "/:tag:cache=always"]) {
    refused(() => parseSharedDirOption(text), /type=p9 .*not supported.*type=fs/);
  }
});

Deno.test("shared-dir: keys virtiofsd cannot honour are refused, one line naming the key", () => {
  const cases: [string, RegExp][] = [
    ["negative_timeout=60", /negative_timeout=60 is not supported/],
    ["ascii_casefold=true", /ascii_casefold=true is not supported/],
    ["dax=true", /dax=true is not supported/],
    ["use_dax=true", /use_dax=true is not supported/],
    ["max_dynamic_perm=2", /max_dynamic_perm=2 is not supported/],
    ["max_dynamic_xattr=1", /max_dynamic_xattr=1 is not supported/],
    ["unmap_guest_memory_on_fork=true", /unmap_guest_memory_on_fork=true is not supported/],
    ["privileged_quota_uids=0", /privileged_quota_uids=0 is not supported/],
    ["ugid_map=1 1 1 1 0022 /a", /ugid_map=.* is not supported/],
    ["uid=1000", /uid is not supported/],
    ["gid=1000", /gid is not supported/],
    ["uidmap=0 1000 1", /uidmap is not supported/],
    ["gidmap=0 1000 1", /gidmap is not supported/],
  ];
  for (const [opt, re] of cases) refused(() => parseSharedDirOption(`/:tag:type=fs:${opt}`), re);
});

Deno.test("shared-dir: bad input is one line each", () => {
  const cases: [string, RegExp][] = [
    ["", /missing source path/],
    ["/", /missing tag/],
    ["/:", /missing tag/],
    ["/:tag:type=fs:bogus=1", /unknown key "bogus"/],
    ["/:tag:type=fs:writeback", /must be of the form key=value/],
    ["/:tag:type=fs:", /options must not be empty/],
    ["/:tag:type=ext4", /type must be fs or 9p/],
    // crosvm's cache policy is case-sensitive (config.rs parse_cache_policy).
    ["/:tag:type=fs:cache=Always", /cache: must be one of never, auto, always/],
    ["/:tag:type=fs:cache=foobar", /cache: must be one of/],
    ["/:tag:type=fs:timeout=-1", /timeout: "-1" is not a whole number/],
    ["/:tag:type=fs:timeout=0x10", /timeout: "0x10" is not a whole number/],
    ["/:tag:type=fs:writeback=yes", /writeback: expected true or false/],
    ["/:tag:type=fs:cache=auto:cache_policy=never", /given more than once/],
    [`/:${"x".repeat(VIRTIO_FS_TAG_MAX + 1)}:type=fs`, /at most 36/],
  ];
  for (const [text, re] of cases) refused(() => parseSharedDirOption(text), re);
  assert.equal(parseSharedDirOption(`/:${"x".repeat(VIRTIO_FS_TAG_MAX)}:type=fs`).tag.length, VIRTIO_FS_TAG_MAX);
});

Deno.test("shared-dir: the source must be a directory", async () => {
  await withTempDir("denovm-shared-dir-", (dir) => {
    const file = `${dir}/file`;
    Deno.writeTextFileSync(file, "x");
    refused(() => parseSharedDirOption(`${file}:tag:type=fs`), /must be a directory/);
    refused(() => parseSharedDirOption(`${dir}/absent:tag:type=fs`), /no such directory/);
    assert.equal(parseSharedDirOption(`${dir}/absent:tag:type=fs`, { checkPath: false }).path, `${dir}/absent`);
    assert.equal(parseSharedDirOption(`${dir}:tag:type=fs`).path, dir);
    return Promise.resolve();
  });
});

Deno.test("shared-dir: two directories with one tag are refused", () => {
  const a = parseSharedDirOption("/:same:type=fs");
  refused(() => validateSharedDirs([a, { ...a, path: "/tmp" }]), /the tag is given more than once/);
  validateSharedDirs([a, { ...a, tag: "other" }]);
});

Deno.test("shared-dir: run --shared-dir, repeatable, into VmConfig.sharedDirs", () => {
  const cmd = parseRunArgs(["--shared-dir", "/:a:type=fs", "--shared-dir=/tmp:b:type=fs:cache=never", "vmlinux"], {
    checkFiles: false,
  });
  assert.deepEqual(cmd.config.sharedDirs?.map((d) => [d.path, d.tag, d.cache]), [["/", "a", "auto"], [
    "/tmp",
    "b",
    "never",
  ]]);
  refused(
    () => parseRunArgs(["--shared-dir", "/:a:type=fs", "--shared-dir", "/tmp:a:type=fs", "vmlinux"], {}),
    /given more than once/,
  );
  refused(() => parseRunArgs(["--shared-dir", "/:a", "vmlinux"], { checkFiles: false }), /type=p9/);
});

Deno.test("shared-dir: denovm run refuses a key virtiofsd cannot honour, and type=p9, with one line and exit 35", async () => {
  await withTempDir("denovm-shared-dir-", async (dir) => {
    const kernel = `${dir}/vmlinux`;
    Deno.writeTextFileSync(kernel, "not a kernel");
    const dax = await runDenovm(["run", "--shared-dir", `${dir}:tag:type=fs:dax=true`, kernel]);
    assertOneLineRefusal(dax, EXIT_INVALID_ARGS, /--shared-dir tag dax=true is not supported/, "dax=true");
    const p9 = await runDenovm(["run", "--shared-dir", `${dir}:tag`, kernel]);
    assertOneLineRefusal(p9, EXIT_INVALID_ARGS, /type=p9 .*add :type=fs/, "type=p9");
  });
});
