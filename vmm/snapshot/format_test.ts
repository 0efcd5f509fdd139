// The snapshot directory: what writeSnapshot writes reads back identical; every corruption of the state or
// memory file is one line naming the file and the problem (exit 1); a snapshot written over another replaces
// it atomically while a clone's mapping of the old memory keeps the old bytes; a failed write leaves the
// earlier snapshot and no temporary file.

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

const state = (type: string, data: StateValue): DeviceState => ({ type, version: 1, data });

function parts(mem: OwnedGuestMemory, salt: number): SnapshotParts {
  return {
    config: config(),
    memory: mem,
    vm: state("kvm-vm", { pic: Uint8Array.of(1, 2, salt), clock: 12345 }),
    vcpus: [state("kvm-vcpu", { id: 0, regs: new Uint8Array(144).fill(salt) }), state("kvm-vcpu", { id: 1 })],
    devices: {
      legacy: [{ name: "COM1", state: state("8250", { lcr: 3 }) }, { name: "i8042", state: state("i8042", null) }],
      virtio: [{ name: "block", transport: state("virtio-mmio", { status: 15 }), device: state("virtio-blk", {}) }],
    },
    vmgenid: "0123456789abcdef0123456789abcdef",
  };
}

/** The error readSnapshot throws: a SnapshotError of one line, exit 1, matching `message`. */
function refused(dir: string, message: RegExp, what: string): void {
  assert.throws(() => readSnapshot(dir), (e: Error) => {
    assert.ok(e instanceof SnapshotError, `${what}: a SnapshotError, got ${e}`);
    assert.equal(e.exitCode, EXIT_HOST_ERROR);
    assert.doesNotMatch(e.message, /\n/, `${what}: one line`);
    assert.match(e.message, message, what);
    assert.match(e.message, /^snapshot "[^"]*\/(state|memory)": /, `${what}: names the file`);
    return true;
  });
}

Deno.test("snapshot format: a written snapshot reads back identical, with its memory layout and file", () => {
  const dir = Deno.makeTempDirSync();
  try {
    using mem = memory(7);
    const p = parts(mem, 7);
    const written = writeSnapshot(`${dir}/snap`, p);
    assert.equal(written.memorySize, MEM_MIB * MiB);
    assert.equal(written.memoryBytesWritten, 8 * PAGE_SIZE);
    assert.deepEqual(Deno.readDirSync(`${dir}/snap`).map((e) => e.name).toArray().sort(), ["memory", "state"]);
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
      file: "memory",
    });
    assert.equal(s.memoryPath, `${dir}/snap/memory`);
    using back = OwnedGuestMemory.mapFile(
      s.memoryPath,
      ramRanges(MEM_MIB * MiB),
      s.memory.regions.map((r) => r.fileOffset),
    );
    assert.deepEqual(back.read(0, MEM_MIB * MiB), mem.read(0, MEM_MIB * MiB));
    // Absent optional fields stay absent.
    assert.equal("initrd" in s.config, false);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("snapshot format: each corruption of the state or memory file is refused in one line naming it", () => {
  const dir = Deno.makeTempDirSync();
  try {
    using mem = memory(1);
    writeSnapshot(dir, parts(mem, 1));
    const statePath = `${dir}/state`;
    const good = Deno.readFileSync(statePath);
    const withState = (bytes: Uint8Array, message: RegExp, what: string) => {
      Deno.writeFileSync(statePath, bytes);
      refused(dir, message, what);
      Deno.writeFileSync(statePath, good);
    };
    /** A state file whose body is `data` re-encoded, with a correct length and checksum. */
    const rewritten = (edit: (data: { [key: string]: StateValue }) => void) => {
      const record = decodeState(good.subarray(HEADER_SIZE));
      edit(record.data as { [key: string]: StateValue });
      const body = encodeState(record);
      const out = new Uint8Array(HEADER_SIZE + body.length);
      out.set(good.subarray(0, 20));
      new DataView(out.buffer).setBigUint64(20, BigInt(body.length), true);
      out.set(createHash("sha256").update(body).digest(), 28);
      out.set(body, HEADER_SIZE);
      return out;
    };
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
    Deno.truncateSync(`${dir}/memory`, MEM_MIB * MiB - PAGE_SIZE);
    refused(dir, /memory": 16773120 bytes; the snapshot's memory is 16777216 bytes$/, "memory one page short");
    Deno.removeSync(`${dir}/memory`);
    refused(dir, /memory": missing$/, "memory missing");
    Deno.removeSync(statePath);
    refused(dir, /state": missing$/, "state missing");
    refused(`${dir}/nowhere`, /nowhere\/state": missing$/, "no directory");
    // A FIFO in the state file's place is refused, not waited on.
    if (new Deno.Command("mkfifo", { args: [statePath] }).outputSync().success) {
      refused(dir, /state": is a FIFO, not a regular file$/, "FIFO");
    }
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("snapshot format: a snapshot written over another replaces it atomically; a clone's mapping keeps the old bytes", () => {
  const dir = Deno.makeTempDirSync();
  try {
    using first = memory(0x10);
    writeSnapshot(dir, parts(first, 0x10));
    const old = readSnapshot(dir);
    const oldInode = Deno.statSync(old.memoryPath).ino;
    using clone = OwnedGuestMemory.mapFile(old.memoryPath, ramRanges(MEM_MIB * MiB), [0]);
    const at = 3 * PAGE_SIZE;
    assert.equal(clone.getU8(at), 0x10);

    using second = memory(0x20);
    writeSnapshot(dir, parts(second, 0x20));
    const now = readSnapshot(dir);
    assert.notEqual(Deno.statSync(now.memoryPath).ino, oldInode, "a new file, not the old one rewritten");
    assert.deepEqual(now.vm.data, { pic: Uint8Array.of(1, 2, 0x20), clock: 12345 });
    using fresh = OwnedGuestMemory.mapFile(now.memoryPath, ramRanges(MEM_MIB * MiB), [0]);
    assert.equal(fresh.getU8(at), 0x20);
    assert.deepEqual(clone.read(0, MEM_MIB * MiB), first.read(0, MEM_MIB * MiB), "the clone still sees the old memory");
    assert.deepEqual(Deno.readDirSync(dir).map((e) => e.name).toArray().sort(), ["memory", "state"], "no temporaries");
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("snapshot format: a failed write leaves the earlier snapshot as it was and no temporary file", () => {
  const dir = Deno.makeTempDirSync();
  try {
    using mem = memory(5);
    writeSnapshot(dir, parts(mem, 5));
    const state = Deno.readFileSync(`${dir}/state`);
    const inode = Deno.statSync(`${dir}/memory`).ino;
    const unchanged = (what: string) => {
      assert.deepEqual(Deno.readDirSync(dir).map((e) => e.name).toArray().sort(), ["memory", "state"], what);
      assert.deepEqual(Deno.readFileSync(`${dir}/state`), state, what);
      assert.equal(Deno.statSync(`${dir}/memory`).ino, inode, what);
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

    // The state file's rename fails after the memory file's: the earlier memory file is put back.
    const blocked = Deno.makeTempDirSync();
    try {
      writeSnapshot(blocked, parts(mem, 5));
      const blockedInode = Deno.statSync(`${blocked}/memory`).ino;
      Deno.removeSync(`${blocked}/state`);
      Deno.mkdirSync(`${blocked}/state/inside`, { recursive: true });
      assert.throws(() => writeSnapshot(blocked, parts(other, 6)), (e: Error) => {
        assert.ok(e instanceof SnapshotError);
        assert.doesNotMatch(e.message, /\n/);
        return true;
      });
      assert.equal(Deno.statSync(`${blocked}/memory`).ino, blockedInode, "the earlier memory file is back");
      assert.deepEqual(Deno.readDirSync(blocked).map((e) => e.name).toArray().sort(), ["memory", "state"]);
    } finally {
      Deno.removeSync(blocked, { recursive: true });
    }
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});
