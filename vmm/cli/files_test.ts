// What `denovm run` and `denovm device block` do with the files named on their command lines, run as
// subprocesses of main.ts on the fake KVM (test/support/fake_kvm.ts), so a check that does not fire ends
// in a scripted guest instead of a real one:
//  - no output (a serial port's file, the GPU trace) may be one of the VM's inputs (kernel, initrd,
//    disks, a serial port's input file): refused (35) before anything is opened for writing;
//  - a kernel or initrd is a regular file, a disk a regular file or a block device, of a size that fits:
//    anything else (/dev/zero, a FIFO with no writer, a directory) is refused (35) before it is read;
//  - an ELF kernel whose segments collide with the device hole or with each other is refused (35);
//  - an output that fails (/dev/full) is one line, and stdout whose reader is gone (`| head -2`) ends
//    the run quietly.
// Each refusal is exactly one line on stderr, and every input file is byte for byte what it was.

import assert from "node:assert/strict";
import { buildFakeKvm, fakeKvmEnv } from "../../test/support/fake_kvm.ts";
import { craftElf } from "../../test/support/elf.ts";
import { assertOneLineRefusal, type CliResult, denovmArgs, runCommand, stderrLines } from "../../test/support/cli.ts";
import { GiB, MiB, MMIO_HOLE_START } from "../arch/layout.ts";

/** Hang protection only: each run here ends in well under a second when it works. */
const HANG_GUARD_MS = 60_000;
/** The disk image whose survival the tests check: 1 MiB of varied bytes. */
const DISK_BYTES = MiB;
/** Guest RAM of a run without --mem (vmm/config.ts DEFAULT_MEM_MIB). */
const DEFAULT_MEM_BYTES = 256 * MiB;

const shim = await buildFakeKvm();
const dir = await Deno.makeTempDir({ prefix: "denovm-files-" });
const kernel = `${dir}/kernel.elf`;
await Deno.writeFile(kernel, craftElf([{ paddr: 2 * MiB, memsz: 0x1000 }]));
const initrd = `${dir}/initrd.img`;
await Deno.writeFile(initrd, varied(64 * 1024, 7));
const disk = `${dir}/disk.img`;
await Deno.writeFile(disk, varied(DISK_BYTES, 3));
const inputs = [kernel, initrd, disk];

globalThis.addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));

/** `n` bytes that are not all alike (a truncated or rewritten copy cannot match by chance). */
function varied(n: number, seed: number): Uint8Array {
  const b = new Uint8Array(n);
  let x = seed;
  for (let i = 0; i < n; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    b[i] = x >>> 24;
  }
  return b;
}

async function sha256(path: string): Promise<string> {
  const d = await crypto.subtle.digest("SHA-256", await Deno.readFile(path));
  return Array.from(new Uint8Array(d), (b) => b.toString(16).padStart(2, "0")).join("");
}

async function hashes(paths: string[]): Promise<Record<string, string>> {
  return Object.fromEntries(await Promise.all(paths.map(async (p) => [p, await sha256(p)])));
}

/**
 * `cmd` as a subprocess on the fake KVM playing `script`; killed if it has not ended after HANG_GUARD_MS,
 * which fails the test.
 */
async function spawn(
  cmd: string,
  args: string[],
  script: string,
  env: Record<string, string> = {},
): Promise<CliResult> {
  const log = `${dir}/fake-kvm-${crypto.randomUUID()}.jsonl`;
  try {
    return await runCommand(cmd, args, { env: { ...fakeKvmEnv(shim, script, log), ...env }, timeoutMs: HANG_GUARD_MS });
  } finally {
    await Deno.remove(log).catch(() => {});
  }
}

/** `denovm ARGS` (main.ts) on the fake KVM; its guest powers off at once unless `script` says otherwise. */
function denovm(args: string[], script = "poweroff", env: Record<string, string> = {}): Promise<CliResult> {
  return spawn(Deno.execPath(), denovmArgs(args), script, env);
}

/** Exit code `code` and exactly one `denovm...` line on stderr, with no stack trace, matching `re`. */
function assertOneLine(r: CliResult, code: number, re: RegExp): void {
  assertOneLineRefusal(r, code, re, String(re));
  const [line] = stderrLines(r);
  assert.doesNotMatch(line, /Uncaught/);
  assert.match(line, /^denovm/);
}

async function mkfifo(path: string): Promise<void> {
  const r = await new Deno.Command("mkfifo", { args: [path] }).output();
  assert.ok(r.success, `mkfifo ${path}`);
}

// ---- 1. An output must not be an input ----

Deno.test("run: a serial port's file that is the disk, kernel or initrd is refused before it is opened", async () => {
  const before = await hashes(inputs);
  const base = ["run", "-i", initrd, "--block", disk];
  for (
    const [path, named] of [
      [disk, /--serial num=1 path=.*disk\.img is --block .*disk\.img/],
      [kernel, /--serial num=1 path=.*kernel\.elf is --kernel .*kernel\.elf/],
      [initrd, /--serial num=1 path=.*initrd\.img is --initrd .*initrd\.img/],
    ] as const
  ) {
    const r = await denovm([...base, "--serial", `type=file,path=${path}`, kernel]);
    assertOneLine(r, 35, named);
  }
  // The same file under another name: a hard link, a symbolic link.
  const hard = `${dir}/disk-hardlink.img`;
  const soft = `${dir}/disk-symlink.img`;
  await Deno.link(disk, hard);
  await Deno.symlink(disk, soft);
  try {
    for (const path of [hard, soft]) {
      assertOneLine(
        await denovm([...base, "--serial", `type=file,path=${path}`, kernel]),
        35,
        /--serial num=1 path=.* is --block .*disk\.img/,
      );
    }
    // A virtio-console port, and a serial port's own input file.
    assertOneLine(
      await denovm([...base, "--serial", `type=file,hardware=virtio-console,num=1,path=${disk}`, kernel]),
      35,
      /--serial hardware=virtio-console,num=1 path=.* is --block /,
    );
    const input = `${dir}/serial-input.txt`;
    await Deno.writeTextFile(input, "typed input\n");
    const inputHash = await sha256(input);
    assertOneLine(
      await denovm(["run", "--serial", `type=file,path=${input},input=${input}`, kernel]),
      35,
      /--serial num=1 path=.* is --serial num=1 input=/,
    );
    assert.equal(await sha256(input), inputHash);
  } finally {
    await Deno.remove(hard);
    await Deno.remove(soft);
  }
  assert.deepEqual(await hashes(inputs), before, "every input is unchanged");
});

Deno.test("run: the GPU's trace file that is the disk is refused before it is opened", async () => {
  const before = await hashes(inputs);
  assertOneLine(
    await denovm(["run", "--block", disk, "--gpu", `backend=2d,trace=${disk}`, kernel]),
    35,
    /--gpu trace=.*disk\.img is --block .*disk\.img/,
  );
  assert.deepEqual(await hashes(inputs), before);
});

Deno.test("run: a serial file that does not exist yet collides with nothing and gets the output", async () => {
  const before = await hashes(inputs);
  const out = `${dir}/new-console.log`;
  const r = await denovm(
    ["run", "-i", initrd, "--block", disk, "--serial", `type=file,path=${out}`, kernel],
    "lines",
    { DENOVM_FAKE_KVM_LOOP_COUNT: "3" },
  );
  assert.equal(r.code, 0, r.stderr);
  assert.equal(await Deno.readTextFile(out), "line 1\nline 2\nline 3\n");
  assert.deepEqual(await hashes(inputs), before);
  await Deno.remove(out);
});

// ---- 2. Inputs are regular files (disks: or block devices) of a size that fits ----

Deno.test("run: /dev/zero as kernel, initrd or disk is refused before it is read", async () => {
  const before = await hashes(inputs);
  assertOneLine(
    await denovm(["run", "/dev/zero"]),
    35,
    /kernel "?\/dev\/zero"?:? is a character device, not a regular file/,
  );
  assertOneLine(
    await denovm(["run", "-i", "/dev/zero", kernel]),
    35,
    /initrd "?\/dev\/zero"?:? is a character device, not a regular file/,
  );
  assertOneLine(
    await denovm(["run", "--block", "/dev/zero", kernel]),
    35,
    /"?\/dev\/zero"?:? is a character device, not a regular file or block device/,
  );
  assertOneLine(await denovm(["run", dir]), 35, /kernel .*: is a directory/);
  assert.deepEqual(await hashes(inputs), before);
});

Deno.test("run: a FIFO with no writer as kernel, initrd or disk is refused, not waited on", async () => {
  const fifo = `${dir}/fifo`;
  await mkfifo(fifo);
  try {
    assertOneLine(await denovm(["run", fifo]), 35, /kernel .*fifo"?:? is a FIFO, not a regular file/);
    assertOneLine(await denovm(["run", "-i", fifo, kernel]), 35, /initrd .*fifo"?:? is a FIFO, not a regular file/);
    assertOneLine(
      await denovm(["run", "--block", fifo, kernel]),
      35,
      /fifo"?:? is a FIFO, not a regular file or block device/,
    );
    assertOneLine(
      await denovm(["run", "--rwdisk", fifo, kernel]),
      35,
      /fifo"?:? is a FIFO, not a regular file or block device/,
    );
  } finally {
    await Deno.remove(fifo);
  }
});

Deno.test("run: a kernel file over 2 GiB or an initrd larger than guest RAM is refused before it is read, with the sizes", async () => {
  // Sparse files: their size is all the checks may look at.
  const big = `${dir}/big.img`;
  const size = DEFAULT_MEM_BYTES + MiB;
  await Deno.writeFile(big, new Uint8Array(0));
  await Deno.truncate(big, size);
  try {
    // A kernel file may exceed guest RAM (an unstripped vmlinux's debug sections are not loaded), up to 2 GiB.
    const huge = `${dir}/huge.img`;
    const hugeSize = 2 * 1024 * MiB + MiB;
    await Deno.writeFile(huge, new Uint8Array(0));
    await Deno.truncate(huge, hugeSize);
    try {
      assertOneLine(
        await denovm(["run", huge]),
        35,
        new RegExp(
          `--mem 256 MiB is too small for kernel .*huge\\.img: the file is ${hugeSize} bytes, more than guest RAM`,
        ),
      );
    } finally {
      await Deno.remove(huge);
    }
    assertOneLine(
      await denovm(["run", "-i", big, kernel]),
      35,
      new RegExp(`--mem 256 MiB is too small for initrd .*big\\.img: the file is ${size} bytes, at most \\d+ fit`),
    );
  } finally {
    await Deno.remove(big);
  }
});

// ---- 4. ELF kernels whose segments collide ----

Deno.test("run: an ELF segment in the device hole names the hole, even with RAM above it", async () => {
  const elf = `${dir}/hole.elf`;
  await Deno.writeFile(elf, craftElf([{ paddr: 2 * MiB }, { paddr: MMIO_HOLE_START + 0x1000, memsz: 0x1000 }]));
  try {
    const r = await denovm(["run", "--mem", String(8 * GiB / MiB), elf]);
    assertOneLine(r, 35, /ELF segment 1 \(0xc0001000\.\.0xc0002000\) lies in the 32-bit device hole/);
    assert.doesNotMatch(r.stderr, /too small/);
  } finally {
    await Deno.remove(elf);
  }
});

Deno.test("run: an ELF kernel with overlapping segments is refused", async () => {
  const elf = `${dir}/overlap.elf`;
  await Deno.writeFile(elf, craftElf([{ paddr: 2 * MiB, memsz: 0x2000 }, { paddr: 2 * MiB + 0x1000 }]));
  try {
    assertOneLine(await denovm(["run", elf]), 35, /ELF segments 0 \(0x200000\.\.0x202000\) and 1 .* overlap/);
  } finally {
    await Deno.remove(elf);
  }
});

// ---- 3. Outputs that fail ----

Deno.test("run: a serial file that cannot be written (/dev/full) is one line; the VM runs on", async () => {
  const r = await denovm(["run", "--serial", "type=file,path=/dev/full", kernel], "lines", {
    DENOVM_FAKE_KVM_LOOP_COUNT: "200",
  });
  assertOneLine(r, 0, /--serial num=1: cannot write to \/dev\/full: .*; its further output is dropped/);
});

Deno.test("run | head -2: stdout's reader goes away and the run ends quietly", async () => {
  // The guest prints far more lines than head takes; denovm's status comes out through PIPESTATUS.
  const r = await spawn(
    "bash",
    [
      "-c",
      '"$@" | head -2; exit "${PIPESTATUS[0]}"',
      "bash",
      Deno.execPath(),
      ...denovmArgs(["run", kernel]),
    ],
    "lines",
  );
  assert.equal(r.stdout, "line 1\nline 2\n");
  assert.doesNotMatch(r.stderr, /Uncaught|^\s+at /m);
  assert.equal(r.stderr, "", "nothing on stderr");
  assert.equal(r.code, 0);
});

// ---- 5. device block ----

Deno.test("device block: a FIFO or /dev/zero as the disk image is refused, not waited on or served", async () => {
  const fifo = `${dir}/block-fifo`;
  await mkfifo(fifo);
  try {
    for (const [file, kind] of [[fifo, "a FIFO"], ["/dev/zero", "a character device"]]) {
      for (const ro of ["", ":read-only"]) {
        const r = await denovm(["device", "block", "--socket-path", `${dir}/block.sock`, "--file", `${file}${ro}`]);
        assertOneLine(r, 35, new RegExp(`${kind}, not a regular file or block device`));
      }
    }
  } finally {
    await Deno.remove(fifo);
  }
});
