// `run --pmem` (crosvm's PmemOption keys), the deprecated --pmem-device/--rw-pmem-device, the root= a root
// pmem adds to the kernel command line, and what the real `denovm` process says about bad pmem input.

import assert from "node:assert/strict";
import { kernelCommandLine, type VmConfig } from "../../config.ts";
import { parseRunArgs } from "../run.ts";
import { UsageError } from "../keyvalue.ts";
import { EXIT_INVALID_ARGS } from "../../../core/exit.ts";
import { assertOneLineRefusal, runDenovm, stderrLines } from "../../../test/support/cli.ts";
import { debianKernel } from "../../../test/support/kernel.ts";
import { hostKind } from "../../kvm/host.ts";

/** crosvm's exit code for a failure that is no bad argument (src/sys/linux/main.rs error_to_exit_code). */
const EXIT_FAILURE = 1;

function run(...args: string[]): { config: VmConfig; warnings: string[] } {
  const r = parseRunArgs([...args, "bzImage"], { checkFiles: false });
  return { config: r.config, warnings: r.warnings };
}

function refused(args: string[], pattern: RegExp): void {
  assert.throws(() => parseRunArgs([...args, "bzImage"], { checkFiles: false }), (e: unknown) => {
    assert.ok(e instanceof UsageError, `expected UsageError, got ${e}`);
    assert.match(e.message, pattern);
    assert.ok(!e.message.includes("\n"), "one line");
    return true;
  });
}

Deno.test("run --pmem: path, ro, root; in order; none leaves the config without pmems", () => {
  assert.equal(run().config.pmems, undefined);
  assert.deepEqual(
    run("--pmem", "a.img", "--pmem", "path=b.img,ro", "--pmem", "ro=false,root=true,path=c.img").config.pmems,
    [
      { path: "a.img", ro: false, root: false },
      { path: "b.img", ro: true, root: false },
      { path: "c.img", ro: false, root: true },
    ],
  );
  refused(["--pmem", "ro=true"], /--pmem: path is required/);
  refused(["--pmem", "a.img,size=3"], /--pmem.*size/);
});

Deno.test("run --pmem: crosvm's experimental vma-size and swap-interval-ms are refused by name", () => {
  refused(["--pmem", "a.img,vma-size=1048576"], /--pmem vma-size: a crosvm key denovm does not support/);
  refused(["--pmem", "a.img,swap-interval-ms=100"], /--pmem swap-interval-ms: a crosvm key denovm does not support/);
});

Deno.test("run --pmem root=true: root=/dev/pmemN ro|rw after the user's pieces; only one root in all", () => {
  assert.equal(
    kernelCommandLine(run("--pmem", "a.img", "--pmem", "b.img,root,ro", "-p", "quiet").config),
    "panic=-1 console=ttyS0 quiet root=/dev/pmem1 ro",
  );
  assert.equal(
    kernelCommandLine(run("--pmem", "a.img,root").config),
    "panic=-1 console=ttyS0 root=/dev/pmem0 rw",
  );
  refused(["--pmem", "a.img,root", "--pmem", "b.img,root"], /only one root disk/);
  refused(["--root", "r.img", "--pmem", "b.img,root"], /only one root disk/);
});

Deno.test("run --pmem-device/--rw-pmem-device: deprecated, read-only/writable, after every --pmem (crosvm)", () => {
  const r = run("--rw-pmem-device", "w.img", "--pmem-device", "r.img", "--pmem", "p.img", "--pmem-device", "s.img");
  assert.deepEqual(r.config.pmems, [
    { path: "p.img", ro: false, root: false },
    { path: "r.img", ro: true, root: false },
    { path: "s.img", ro: true, root: false },
    { path: "w.img", ro: false, root: false },
  ]);
  assert.deepEqual(r.warnings.filter((w) => /deprecated/.test(w)), [
    "--rw-pmem-device is deprecated; use --pmem",
    "--pmem-device is deprecated; use --pmem",
  ]);
  // crosvm reads them as disk options and keeps the path: a disk key is no error, and ro= changes nothing.
  assert.deepEqual(run("--rw-pmem-device", "path=x.img,ro=true").config.pmems, [
    { path: "x.img", ro: false, root: false },
  ]);
});

Deno.test("denovm run --pmem: a refused key exits 35 with one line", async () => {
  const r = await runDenovm(["run", "--pmem", "/x.img,vma-size=4096", "bzImage"]);
  assertOneLineRefusal(r, EXIT_INVALID_ARGS, /--pmem vma-size: a crosvm key denovm does not support/, "vma-size");
});

const noKvm = hostKind() === "none" ? "no /dev/kvm" : undefined;

Deno.test({
  name: "denovm run --pmem: a missing file exits 1 (crosvm's failure), an empty one 35, one line each",
  ignore: noKvm !== undefined,
  async fn() {
    const k = await debianKernel();
    const dir = await Deno.makeTempDir({ prefix: "denovm-pmem-cli-" });
    try {
      const missing = await runDenovm(["run", "--pmem", `${dir}/none.img`, k.vmlinux]);
      assertOneLineRefusal(missing, EXIT_FAILURE, /pmem ".*none\.img": cannot open it: .*No such file/, "missing");
      await Deno.writeFile(`${dir}/empty.img`, new Uint8Array());
      const empty = await runDenovm(["run", "--pmem", `${dir}/empty.img`, k.vmlinux]);
      assertOneLineRefusal(empty, EXIT_INVALID_ARGS, /pmem ".*empty\.img": the file is empty/, "empty");
      const dirAsFile = await runDenovm(["run", "--pmem", dir, k.vmlinux]);
      assertOneLineRefusal(dirAsFile, EXIT_INVALID_ARGS, /is a directory, not a regular file/, "directory");
      assert.equal(stderrLines(dirAsFile).length, 1);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
