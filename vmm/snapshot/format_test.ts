// The snapshot directory: what writeSnapshot writes reads back identical; every corruption of the state or
// memory file is one line naming the file and the problem (exit 1); a snapshot written over another replaces
// it atomically while a clone's mapping of the old memory keeps the old bytes; a crash before the state's
// rename leaves the earlier snapshot; a failed write leaves the earlier snapshot and no temporary file; a
// directory written by an earlier version (its memory file named `memory`) reads and is taken over.

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { EXIT_HOST_ERROR } from "../../core/exit.ts";
import { OwnedGuestMemory, PAGE_SIZE } from "../../core/memory.ts";
import { decodeState, type DeviceState, encodeState, type StateValue } from "../../core/state.ts";
import { MiB, ramRanges } from "../arch/layout.ts";
import { defaultVmConfig, gpuConfig, type VmConfig } from "../config.ts";
import { readSnapshot, SnapshotError, type SnapshotParts, writeSnapshot } from "./format.ts";

const MEM_MIB = 16;
const HEADER_SIZE = 60;

function config(): VmConfig {
  return {
    ...defaultVmConfig("/boot/vmlinuz"),
    memMiB: MEM_MIB,
    cpus: 2,
    blocks: [{ path: "/images/root.img", ro: true, root: true, sparse: true, blockSize: 512, direct: false }],
    inputs: [{ kind: "keyboard" }, { kind: "multi-touch", width: 800, height: 600 }],
    vsock: { cid: 3 },
    gpu: gpuConfig({ displays: [{ mode: "web", width: 64, height: 48, port: 0 }] }),
    socket: "/run/vm.sock",
    agent: true,
  };
}

/** Guest memory for `config()` with a pattern keyed by `salt` in a few pages. */
function memory(salt: number): OwnedGuestMemory {
  const mem = OwnedGuestMemory.allocate(ramRanges(MEM_MIB * MiB));
  for (let i = 0; i < 8; i++) mem.fill(i * 2 * MiB + 3 * PAGE_SIZE, 100, (salt + i) & 0xff);
  return mem;
}

/** The VM record of the snapshot whose parts are keyed by `salt`. */
const vmData = (salt: number): StateValue => ({ pic: Uint8Array.of(1, 2, salt), clock: 12345 });

const state = (type: string, data: StateValue): DeviceState => ({ type, version: 1, data });

function parts(mem: OwnedGuestMemory, salt: number): SnapshotParts {
  return {
    config: config(),
    memory: mem,
    vm: state("kvm-vm", vmData(salt)),
    vcpus: [state("kvm-vcpu", { id: 0, regs: new Uint8Array(144).fill(salt) }), state("kvm-vcpu", { id: 1 })],
    devices: {
      legacy: [{ name: "COM1", state: state("8250", { lcr: 3 }) }, { name: "i8042", state: state("i8042", null) }],
      virtio: [{ name: "block", transport: state("virtio-mmio", { status: 15 }), device: state("virtio-blk", {}) }],
    },
    vmgenid: "0123456789abcdef0123456789abcdef",
  };
}

/** Writes the snapshot keyed by `salt` into `dir`; returns its guest memory, for the caller to compare and dispose. */
function take(dir: string, salt: number): OwnedGuestMemory {
  const mem = memory(salt);
  writeSnapshot(dir, parts(mem, salt));
  return mem;
}

/** The memory file at `path` mapped as a clone maps it (copy-on-write, from offset 0). */
function mapMemory(path: string): OwnedGuestMemory {
  return OwnedGuestMemory.mapFile(path, ramRanges(MEM_MIB * MiB), [0]);
}

/** The names in `dir`, sorted. */
function names(dir: string): string[] {
  return Deno.readDirSync(dir).map((e) => e.name).toArray().sort();
}

/** A snapshot directory's files: the state and the one memory file it names (`memory.<32 hex digits>`). */
function assertOnlySnapshotFiles(dir: string, what: string): void {
  const file = readSnapshot(dir).memory.file;
  assert.match(file, /^memory\.[0-9a-f]{32}$/, what);
  assert.deepEqual(names(dir), [file, "state"], `${what}: no other file, no temporary`);
}

/** The state file `good` with its body's record edited by `edit`, re-encoded with a correct length and checksum. */
function rewriteState(good: Uint8Array, edit: (data: { [key: string]: StateValue }) => void): Uint8Array {
  const record = decodeState(good.subarray(HEADER_SIZE));
  edit(record.data as { [key: string]: StateValue });
  const body = encodeState(record);
  const out = new Uint8Array(HEADER_SIZE + body.length);
  out.set(good.subarray(0, 20));
  new DataView(out.buffer).setBigUint64(20, BigInt(body.length), true);
  out.set(createHash("sha256").update(body).digest(), 28);
  out.set(body, HEADER_SIZE);
  return out;
}

/** A test named "snapshot format: `name`" whose `body` gets a new temporary directory, removed after it. */
function snapshotTest(name: string, body: (dir: string) => void): void {
  Deno.test(`snapshot format: ${name}`, () => {
    const dir = Deno.makeTempDirSync();
    try {
      body(dir);
    } finally {
      Deno.removeSync(dir, { recursive: true });
    }
  });
}

/** The error readSnapshot throws: a SnapshotError of one line, exit 1, matching `message`. */
function refused(dir: string, message: RegExp, what: string): void {
  assert.throws(() => readSnapshot(dir), (e: Error) => {
    assert.ok(e instanceof SnapshotError, `${what}: a SnapshotError, got ${e}`);
    assert.equal(e.exitCode, EXIT_HOST_ERROR);
    assert.doesNotMatch(e.message, /\n/, `${what}: one line`);
    assert.match(e.message, message, what);
    assert.match(e.message, /^snapshot "[^"]*\/(state|memory(\.[0-9a-f]{32})?)": /, `${what}: names the file`);
    return true;
  });
}

snapshotTest("a written snapshot reads back identical, with its memory layout and file", (dir) => {
  using mem = memory(7);
  const p = parts(mem, 7);
  const written = writeSnapshot(`${dir}/snap`, p);
  assert.equal(written.memorySize, MEM_MIB * MiB);
  assert.equal(written.memoryBytesWritten, 8 * PAGE_SIZE);
  assertOnlySnapshotFiles(`${dir}/snap`, "first write");
  assert.equal(Deno.statSync(`${dir}/snap/state`).size, written.stateSize);
  const s = readSnapshot(`${dir}/snap`);
  assert.equal(s.denovm.length > 0, true);
  assert.deepEqual(s.config, p.config);
  assert.deepEqual(s.vm, p.vm);
  assert.deepEqual(s.vcpus, p.vcpus);
  assert.deepEqual(s.devices, p.devices);
  assert.equal(s.vmgenid, p.vmgenid);
  assert.deepEqual(s.memory, {
    size: MEM_MIB * MiB,
    regions: [{ guestBase: 0, size: MEM_MIB * MiB, fileOffset: 0 }],
    file: s.memory.file,
  });
  assert.equal(s.memoryPath, `${dir}/snap/${s.memory.file}`);
  using back = OwnedGuestMemory.mapFile(
    s.memoryPath,
    ramRanges(MEM_MIB * MiB),
    s.memory.regions.map((r) => r.fileOffset),
  );
  assert.deepEqual(back.read(0, MEM_MIB * MiB), mem.read(0, MEM_MIB * MiB));
  // Absent optional fields stay absent.
  assert.equal("initrd" in s.config, false);
});

snapshotTest("each corruption of the state or memory file is refused in one line naming it", (dir) => {
  take(dir, 1).close();
  const statePath = `${dir}/state`;
  const good = Deno.readFileSync(statePath);
  const withState = (bytes: Uint8Array, message: RegExp, what: string) => {
    Deno.writeFileSync(statePath, bytes);
    refused(dir, message, what);
    Deno.writeFileSync(statePath, good);
  };
  const rewritten = (edit: (data: { [key: string]: StateValue }) => void) => rewriteState(good, edit);
  withState(
    good.subarray(0, good.length - 10),
    /state": the body is \d+ bytes, shorter than its length \d+$/,
    "truncated",
  );
  withState(good.subarray(0, 30), /state": 30 bytes, shorter than the 60-byte header$/, "truncated header");
  withState(new Uint8Array(0), /state": 0 bytes, shorter than the 60-byte header$/, "empty");
  const flipped = good.slice();
  flipped[HEADER_SIZE + 40] ^= 0x01;
  withState(flipped, /state": checksum mismatch: the body is corrupt$/, "one flipped byte in the body");
  const badMagic = good.slice();
  badMagic[0] = "X".charCodeAt(0);
  withState(badMagic, /state": not a denovm snapshot state file \(bad magic\)$/, "wrong magic");
  const v2 = good.slice();
  new DataView(v2.buffer).setUint32(16, 2, true);
  withState(v2, /state": snapshot format version 2; this denovm reads version 1$/, "version 2");
  const trailing = new Uint8Array(good.length + 5);
  trailing.set(good);
  withState(trailing, /state": 5 bytes after the body's end$/, "bytes after the body");
  withState(
    rewritten((d) => d.vcpus = (d.vcpus as StateValue[]).slice(0, 1)),
    /1 vCPU states for the configuration's 2 vCPUs$/,
    "vCPUs",
  );
  withState(
    rewritten((d) => (d.config as { [key: string]: StateValue }).memMiB = 32),
    /memory.regions are not the RAM of the configuration's 32 MiB$/,
    "memory layout",
  );
  withState(
    rewritten((d) => (d.config as { [key: string]: StateValue }).color = "red"),
    /config: unknown field "color"$/,
    "config field",
  );
  withState(
    rewritten((d) => (d.config as { [key: string]: StateValue }).blocks = [{ path: 3 }]),
    /config.blocks\[0\].path: expected a string, got 3$/,
    "config type",
  );
  withState(
    rewritten((d) => (d.memory as { [key: string]: StateValue }).file = "../../etc/passwd"),
    /memory.file: "..\/..\/etc\/passwd" is not a file name/,
    "memory file name",
  );
  withState(rewritten((d) => d.vmgenid = "nope"), /vmgenid: "nope" is not 32 hex digits$/, "vmgenid");
  withState(rewritten((d) => delete d.devices), /devices: expected a record$/, "devices");
  assert.equal(readSnapshot(dir).vmgenid, "0123456789abcdef0123456789abcdef", "the good state reads again");
  // The memory file one page short, then missing; the state file missing.
  const memoryPath = readSnapshot(dir).memoryPath;
  Deno.truncateSync(memoryPath, MEM_MIB * MiB - PAGE_SIZE);
  refused(
    dir,
    /memory\.[0-9a-f]{32}": 16773120 bytes; the snapshot's memory is 16777216 bytes$/,
    "memory one page short",
  );
  Deno.removeSync(memoryPath);
  refused(dir, /memory\.[0-9a-f]{32}": missing$/, "memory missing");
  Deno.removeSync(statePath);
  refused(dir, /state": missing$/, "state missing");
  refused(`${dir}/nowhere`, /nowhere\/state": missing$/, "no directory");
  // A FIFO in the state file's place is refused, not waited on.
  if (new Deno.Command("mkfifo", { args: [statePath] }).outputSync().success) {
    refused(dir, /state": is a FIFO, not a regular file$/, "FIFO");
  }
});

snapshotTest("a snapshot written over another replaces it atomically; a clone's mapping keeps the old bytes", (dir) => {
  using first = take(dir, 0x10);
  const old = readSnapshot(dir);
  const oldInode = Deno.statSync(old.memoryPath).ino;
  using clone = mapMemory(old.memoryPath);
  const at = 3 * PAGE_SIZE;
  assert.equal(clone.getU8(at), 0x10);

  take(dir, 0x20).close();
  const now = readSnapshot(dir);
  assert.notEqual(Deno.statSync(now.memoryPath).ino, oldInode, "a new file, not the old one rewritten");
  assert.deepEqual(now.vm.data, vmData(0x20));
  using fresh = mapMemory(now.memoryPath);
  assert.equal(fresh.getU8(at), 0x20);
  assert.deepEqual(clone.read(0, MEM_MIB * MiB), first.read(0, MEM_MIB * MiB), "the clone still sees the old memory");
  assert.notEqual(now.memory.file, old.memory.file, "the new memory file has a name of its own");
  assertOnlySnapshotFiles(dir, "the earlier memory file is removed, no temporaries");
});

snapshotTest("a failed write leaves the earlier snapshot as it was and no temporary file", (dir) => {
  using mem = take(dir, 5);
  const state = Deno.readFileSync(`${dir}/state`);
  const memoryPath = readSnapshot(dir).memoryPath;
  const listing = names(dir);
  const inode = Deno.statSync(memoryPath).ino;
  const unchanged = (what: string) => {
    assert.deepEqual(names(dir), listing, what);
    assert.deepEqual(Deno.readFileSync(`${dir}/state`), state, what);
    assert.equal(Deno.statSync(memoryPath).ino, inode, what);
    assert.equal(readSnapshot(dir).vmgenid, "0123456789abcdef0123456789abcdef", what);
  };
  // A part the format refuses: nothing is written.
  using other = memory(6);
  const bad = { ...parts(other, 6), vmgenid: "xyz" };
  assert.throws(() => writeSnapshot(dir, bad), (e: Error) => {
    assert.ok(e instanceof SnapshotError);
    assert.match(e.message, /cannot save this VM: vmgenid: "xyz" is not 32 hex digits$/);
    return true;
  });
  unchanged("refused part");
  const wrongCpus = { ...parts(other, 6), vcpus: [] };
  assert.throws(() => writeSnapshot(dir, wrongCpus), /0 vCPU states for the configuration's 2 vCPUs$/);
  unchanged("missing vCPU states");

  // The state file's rename fails after the new memory file is written: the new memory file is removed, the
  // earlier one was never touched.
  const blocked = Deno.makeTempDirSync();
  try {
    writeSnapshot(blocked, parts(mem, 5));
    const earlier = readSnapshot(blocked).memory.file;
    const blockedInode = Deno.statSync(`${blocked}/${earlier}`).ino;
    Deno.removeSync(`${blocked}/state`);
    Deno.mkdirSync(`${blocked}/state/inside`, { recursive: true });
    assert.throws(() => writeSnapshot(blocked, parts(other, 6)), (e: Error) => {
      assert.ok(e instanceof SnapshotError);
      assert.doesNotMatch(e.message, /\n/);
      return true;
    });
    assert.equal(Deno.statSync(`${blocked}/${earlier}`).ino, blockedInode, "the earlier memory file is untouched");
    assert.deepEqual(names(blocked), [earlier, "state"], "the new memory file and the state's temporary are gone");
  } finally {
    Deno.removeSync(blocked, { recursive: true });
  }
});

/** Whether guest memory `a` and `b` hold the same bytes (a boolean: a diff of megabytes would not help). */
function sameMemory(a: OwnedGuestMemory, b: OwnedGuestMemory): boolean {
  const digest = (m: OwnedGuestMemory) => createHash("sha256").update(m.read(0, MEM_MIB * MiB)).digest("hex");
  return digest(a) === digest(b);
}

/** Copies every file of `from` into a new directory `to`: what is on disk at this moment. */
function copyFiles(from: string, to: string): void {
  Deno.mkdirSync(to);
  for (const e of Deno.readDirSync(from)) if (e.isFile) Deno.copyFileSync(`${from}/${e.name}`, `${to}/${e.name}`);
}

snapshotTest(
  "a crash after the new memory file is written, before the state is renamed, leaves the earlier snapshot whole; the next take removes what it left",
  (dir) => {
    const snap = `${dir}/snap`;
    const crashed = `${dir}/crashed`;
    using first = take(snap, 0x10);
    using second = memory(0x20);
    let seen = 0;
    writeSnapshot(snap, parts(second, 0x20), {
      beforeStateRename: () => {
        seen++;
        copyFiles(snap, crashed);
      },
    });
    assert.equal(seen, 1, "the crash window was reached");
    // What the crash left: the earlier state and its memory file, plus the new memory file and the state's
    // temporary, which no state names.
    assert.equal(names(crashed).length, 4, `the crash left ${names(crashed).join(", ")}`);
    const earlier = readSnapshot(crashed);
    assert.deepEqual(earlier.vm.data, vmData(0x10), "the earlier state");
    using mapped = mapMemory(earlier.memoryPath);
    assert.ok(sameMemory(mapped, first), "under it, its own memory");
    // The take that completed is the new snapshot.
    const now = readSnapshot(snap);
    assert.deepEqual(now.vm.data, vmData(0x20));
    using fresh = mapMemory(now.memoryPath);
    assert.ok(sameMemory(fresh, second), "the new memory");
    assertOnlySnapshotFiles(snap, "after the completed take");
    // The next take into the crashed directory removes what the crash left.
    take(crashed, 0x30).close();
    assertOnlySnapshotFiles(crashed, "after a take over the crash's leftovers");
    assert.deepEqual(readSnapshot(crashed).vm.data, vmData(0x30));
  },
);

snapshotTest(
  "a second take into a directory while one is being written is refused in one line; the first completes",
  (dir) => {
    using first = memory(1);
    using second = memory(2);
    let refusal: unknown;
    writeSnapshot(dir, parts(first, 1), {
      beforeStateRename: () => {
        try {
          writeSnapshot(dir, parts(second, 2));
        } catch (e) {
          refusal = e;
        }
      },
    });
    assert.ok(refusal instanceof SnapshotError, `refused: ${refusal}`);
    assert.match(refusal.message, /^snapshot "[^"]+": another snapshot is being written into this directory$/);
    assert.deepEqual(readSnapshot(dir).vm.data, vmData(1));
    assertOnlySnapshotFiles(dir, "the refused take left nothing");
  },
);

snapshotTest(
  "a directory whose memory file is named `memory` (earlier versions) reads; a take over it replaces it",
  (dir) => {
    using first = take(dir, 0x40);
    // The layout earlier versions wrote: `memory` and a state naming it.
    Deno.renameSync(readSnapshot(dir).memoryPath, `${dir}/memory`);
    Deno.writeFileSync(
      `${dir}/state`,
      rewriteState(Deno.readFileSync(`${dir}/state`), (d) => {
        (d.memory as { [key: string]: StateValue }).file = "memory";
      }),
    );
    const legacy = readSnapshot(dir);
    assert.equal(legacy.memoryPath, `${dir}/memory`);
    assert.deepEqual(legacy.vm.data, vmData(0x40));
    using clone = mapMemory(legacy.memoryPath);
    take(dir, 0x50).close();
    assertOnlySnapshotFiles(dir, "`memory` is removed once no state names it");
    assert.ok(sameMemory(clone, first), "a clone of it keeps its memory");
  },
);
