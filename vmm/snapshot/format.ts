// A snapshot on disk (SNAPSHOT.md): directory PATH holding `memory`, guest RAM as a raw sparse file
// (memory_file.ts), and `state`, a small header and the rest of the VM as one state record:
//
//   offset  size  field
//        0    16  magic "DENOVM-SNAPSHOT\n"
//       16     4  format version, u32 little-endian (1)
//       20     8  body length, u64 little-endian
//       28    32  SHA-256 of the body
//       60     -  body: encodeState({ type: "denovm-snapshot", version: 1, data }) (core/state.ts)
//
// data = { denovm, config, memory: { size, regions: [{ guestBase, size, fileOffset }], file }, vm, vcpus,
// devices: { legacy, virtio }, vmgenid }. `memory.file` names the memory file: `memory.<32 hex digits>`, a new
// name for each take (earlier versions wrote `memory`; both read). Only the state file is renamed into place, so
// the directory switches from one snapshot to the next in one step, a crash or a failed take leaves the earlier
// snapshot whole, and a clone still running from an earlier memory file (its private mapping holds the inode)
// is undisturbed when that file is removed.

import { createHash } from "node:crypto";
import { HostError } from "../../core/exit.ts";
import type { GuestMemory } from "../../core/memory.ts";
import { PAGE_SIZE } from "../../core/memory.ts";
import {
  decodeState,
  type DeviceState,
  encodeState,
  stateArray,
  StateError,
  stateInteger,
  stateRecord,
  stateString,
  type StateValue,
} from "../../core/state.ts";
import { fdInfo, fileKind, readFd } from "../../core/host_file.ts";
import {
  check,
  closeFd,
  EAGAIN,
  ENOENT,
  errno,
  libc,
  LOCK_EX,
  LOCK_NB,
  O_DIRECTORY,
  O_NONBLOCK,
  O_RDONLY,
  openFile,
  strerror,
  SysError,
} from "../../ffi/libc.ts";
import { MiB, ramRanges } from "../arch/layout.ts";
import { DENOVM_VERSION } from "../cli/help.ts";
import type { VmConfig } from "../config.ts";
import type { DevicesState, VirtioSlotState } from "../device_manager/manager.ts";
import type { LegacyDeviceState } from "../device_manager/legacy.ts";
import { configFromState, configToState } from "./config_state.ts";
import { memoryFileLayout, type MemoryFileRegion, writeMemoryFile } from "./memory_file.ts";

/** The state file's first 16 bytes. */
export const SNAPSHOT_MAGIC = "DENOVM-SNAPSHOT\n";
/** The state file's format version, the u32 after the magic: the one this denovm writes and reads. */
export const SNAPSHOT_FORMAT_VERSION = 1;
/** The state record's kind and layout version (the body). */
const SNAPSHOT_RECORD_TYPE = "denovm-snapshot";
const SNAPSHOT_RECORD_VERSION = 1;
/** The state file's name in a snapshot directory, and the memory files' (`memory.<32 hex digits>`) prefix. */
export const STATE_FILE = "state";
export const MEMORY_FILE = "memory";

/** Header layout: magic, version (u32 LE), body length (u64 LE), SHA-256 of the body. */
const MAGIC_SIZE = 16;
const VERSION_OFFSET = 16;
const LENGTH_OFFSET = 20;
const DIGEST_OFFSET = 28;
const DIGEST_SIZE = 32; // SHA-256 (FIPS 180-4)
const HEADER_SIZE = DIGEST_OFFSET + DIGEST_SIZE;
/**
 * The largest body read: the body is JSON decoded as one string, and V8 strings hold at most 2^29 - 24
 * characters (v8.h String::kMaxLength on 64-bit hosts).
 */
const MAX_BODY_SIZE = 2 ** 29 - 24;

/** The VM generation ID: 16 bytes as 32 lowercase hex digits. */
const VMGENID_PATTERN = /^[0-9a-f]{32}$/;

/** A snapshot that cannot be written or read: one line naming the file and the problem. Exit 1, as crosvm. */
export class SnapshotError extends HostError {
  constructor(message: string) {
    super(message);
    this.name = "SnapshotError";
  }
}

/** Where guest memory lies in the memory file. */
export interface MemoryLayout {
  /** Bytes of guest memory: the memory file's size. */
  size: number;
  /** The RAM regions in guest-address order, end to end in the file. */
  regions: MemoryFileRegion[];
  /** The memory file's name inside the snapshot directory. */
  file: string;
}

/** What writeSnapshot saves. */
export interface SnapshotParts {
  /** The configuration the VM was built from. */
  config: VmConfig;
  /** Guest RAM: its regions give the memory file's layout. */
  memory: GuestMemory;
  /** The in-kernel irqchip, PIT and clock ("kvm-vm"). */
  vm: DeviceState;
  /** Each vCPU ("kvm-vcpu"), in id order: one per config.cpus. */
  vcpus: DeviceState[];
  /** The device manager's state. */
  devices: DevicesState;
  /** The VM generation ID the guest saw, 32 hex digits. */
  vmgenid: string;
}

/** What readSnapshot returns: the saved parts, the memory file's layout and path. */
export interface Snapshot {
  /** The denovm version that wrote it. */
  denovm: string;
  config: VmConfig;
  memory: MemoryLayout;
  /** The memory file's path (the directory joined with memory.file). */
  memoryPath: string;
  vm: DeviceState;
  vcpus: DeviceState[];
  devices: DevicesState;
  vmgenid: string;
}

/** What writeSnapshot wrote. */
export interface SnapshotWritten {
  /** Bytes of guest memory (the memory file's size). */
  memorySize: number;
  /** Bytes of the memory file actually written (its non-zero pages). */
  memoryBytesWritten: number;
  /** Bytes of the state file. */
  stateSize: number;
}

/** What writeSnapshot takes beside the parts. */
export interface WriteSnapshotOptions {
  /**
   * Called once the new memory file and the state file's temporary are written and synced, just before the state
   * is renamed into place: the directory then holds what a crash at that moment would leave (tests copy it).
   */
  beforeStateRename?: () => void;
}

/**
 * Writes a snapshot of `parts` into directory `dir` (created if missing), replacing a snapshot already there
 * atomically. The memory file is written under a new name of its own (`memory.<random>`, never an existing file),
 * which the state records; the state is written to a temporary and renamed over `state`, the one step that
 * switches the directory from the earlier snapshot to the new one. A crash before that rename leaves the earlier
 * snapshot whole (its state names its own memory file); after it, the new one. Then the memory files no state
 * names any more, and temporaries that crashed takes left, are removed (a clone mapping one keeps its inode).
 * Takes into one directory are serialized by an flock on the directory; a second one at once is refused.
 * Throws SnapshotError (one line) when a part does not fit the format, the directory is locked, or the host
 * refuses a write; the new files are removed and an earlier snapshot in `dir` is left as it was.
 */
export function writeSnapshot(dir: string, parts: SnapshotParts, opts: WriteSnapshotOptions = {}): SnapshotWritten {
  const memoryName = `${MEMORY_FILE}.${crypto.randomUUID().replaceAll("-", "")}`;
  // Everything that can be refused without touching the disk is, first: the state file is built and read
  // back through the same checks readSnapshot makes.
  let layout: ReturnType<typeof memoryFileLayout>;
  let stateFile: Uint8Array;
  try {
    layout = memoryFileLayout(parts.memory);
    const data: { [key: string]: StateValue } = {
      denovm: DENOVM_VERSION,
      config: configToState(parts.config),
      memory: { size: layout.size, regions: layout.regions as unknown as StateValue[], file: memoryName },
      vm: parts.vm as unknown as StateValue,
      vcpus: parts.vcpus as unknown as StateValue[],
      devices: parts.devices as unknown as StateValue,
      vmgenid: parts.vmgenid,
    };
    const body = encodeState({ type: SNAPSHOT_RECORD_TYPE, version: SNAPSHOT_RECORD_VERSION, data });
    parseBody(body);
    stateFile = stateFileBytes(body);
  } catch (e) {
    throw new SnapshotError(`snapshot "${dir}": cannot save this VM: ${(e as Error).message}`);
  }

  let dirFd: number;
  try {
    Deno.mkdirSync(dir, { recursive: true });
    dirFd = openFile(dir, O_RDONLY | O_DIRECTORY);
  } catch (e) {
    throw new SnapshotError(`snapshot "${dir}": ${(e as Error).message}`);
  }
  try {
    if (libc().flock(dirFd, LOCK_EX | LOCK_NB) < 0) {
      const e = errno();
      throw new SnapshotError(
        e === EAGAIN
          ? `snapshot "${dir}": another snapshot is being written into this directory`
          : `snapshot "${dir}": cannot lock the directory: ${strerror(e)}`,
      );
    }
    const memoryPath = `${dir}/${memoryName}`;
    const stateTemp = `${dir}/.${STATE_FILE}.${Deno.pid}-${crypto.randomUUID()}${TEMP_SUFFIX}`;
    let renamed = false;
    try {
      // O_EXCL on a name never used before: no file a clone maps is ever written.
      const { bytesWritten } = writeMemoryFile(parts.memory, memoryPath);
      writeFileSynced(stateTemp, stateFile);
      opts.beforeStateRename?.();
      Deno.renameSync(stateTemp, `${dir}/${STATE_FILE}`);
      renamed = true;
      check(`fsync ${dir}`, libc().fsync(dirFd));
      removeUnnamedFiles(dir, memoryName);
      return { memorySize: layout.size, memoryBytesWritten: bytesWritten, stateSize: stateFile.length };
    } catch (e) {
      // Before the rename nothing the earlier snapshot uses was touched: remove what this take wrote.
      for (const path of renamed ? [] : [memoryPath, stateTemp]) {
        try {
          Deno.removeSync(path);
        } catch {
          // Never created.
        }
      }
      throw new SnapshotError(`snapshot "${dir}": ${(e as Error).message}`);
    }
  } finally {
    closeFd(dirFd); // releases the flock
  }
}

/** The suffix of the state file's temporaries. */
const TEMP_SUFFIX = ".tmp";
/** The memory files writeSnapshot writes (`memory.<32 hex digits>`) and the one earlier versions wrote (`memory`). */
const MEMORY_FILE_PATTERN = new RegExp(`^${MEMORY_FILE}(\\.[0-9a-f]{32})?$`);
/** Temporaries a take writes (`.state.<tag>.tmp`) or earlier versions wrote (`.memory.<tag>.tmp|.old`). */
const TEMP_FILE_PATTERN = /^\.(state|memory)\..+\.(tmp|old)$/;

/**
 * Removes from `dir` every memory file but `keep` (the one the state now names) and every temporary: called with
 * the directory locked, so no other take is writing them. Best effort: what cannot be removed stays, unnamed.
 */
function removeUnnamedFiles(dir: string, keep: string): void {
  let entries: Deno.DirEntry[];
  try {
    entries = [...Deno.readDirSync(dir)];
  } catch {
    return; // Left for the next take.
  }
  for (const entry of entries) {
    if (!entry.isFile || entry.name === keep) continue;
    if (!MEMORY_FILE_PATTERN.test(entry.name) && !TEMP_FILE_PATTERN.test(entry.name)) continue;
    try {
      Deno.removeSync(`${dir}/${entry.name}`);
    } catch {
      // Left for the next take.
    }
  }
}

/** The state file for `body`: the header, then the body. */
function stateFileBytes(body: Uint8Array): Uint8Array {
  const out = new Uint8Array(HEADER_SIZE + body.length);
  const view = new DataView(out.buffer);
  out.set(new TextEncoder().encode(SNAPSHOT_MAGIC), 0);
  view.setUint32(VERSION_OFFSET, SNAPSHOT_FORMAT_VERSION, true);
  view.setBigUint64(LENGTH_OFFSET, BigInt(body.length), true);
  out.set(sha256(body), DIGEST_OFFSET);
  out.set(body, HEADER_SIZE);
  return out;
}

function sha256(bytes: Uint8Array): Uint8Array {
  return new Uint8Array(createHash("sha256").update(bytes).digest());
}

/** Writes a new file (it must not exist) and syncs it to disk. */
function writeFileSynced(path: string, bytes: Uint8Array): void {
  using file = Deno.openSync(path, { write: true, createNew: true, mode: 0o600 });
  let done = 0;
  while (done < bytes.length) done += file.writeSync(bytes.subarray(done));
  file.syncSync();
}

/**
 * Reads the snapshot in directory `dir`, checking everything before anything is used: both files present, the
 * state file's magic, format version, length and checksum, every field of the record, a memory layout that is
 * the configuration's RAM, one vCPU state per vCPU, and a memory file of exactly the memory's size. Throws
 * SnapshotError (one line naming the file and the problem).
 */
export function readSnapshot(dir: string): Snapshot {
  const statePath = `${dir}/${STATE_FILE}`;
  const readState = (): Omit<Snapshot, "memoryPath"> => {
    const body = readStateBody(statePath);
    try {
      return parseBody(body);
    } catch (e) {
      throw new SnapshotError(`snapshot "${statePath}": ${(e as Error).message}`);
    }
  };
  let parsed = readState();
  let memoryPath = `${dir}/${parsed.memory.file}`;
  let info: Deno.FileInfo;
  for (let attempt = 0;; attempt++) {
    try {
      info = Deno.statSync(memoryPath);
      break;
    } catch (e) {
      if (e instanceof Deno.errors.NotFound && attempt === 0) {
        // A take into this directory may have replaced the state and removed the memory file it named between
        // the two reads: read the state again; a state naming another file is the newer snapshot.
        const again = readState();
        if (again.memory.file !== parsed.memory.file) {
          parsed = again;
          memoryPath = `${dir}/${parsed.memory.file}`;
          continue;
        }
      }
      const why = e instanceof Deno.errors.NotFound ? "missing" : (e as Error).message;
      throw new SnapshotError(`snapshot "${memoryPath}": ${why}`);
    }
  }
  if (!info.isFile) throw new SnapshotError(`snapshot "${memoryPath}": is ${fileKind(info)}, not a regular file`);
  if (info.size !== parsed.memory.size) {
    throw new SnapshotError(
      `snapshot "${memoryPath}": ${info.size} bytes; the snapshot's memory is ${parsed.memory.size} bytes`,
    );
  }
  return { ...parsed, memoryPath };
}

/** The body of the state file at `path`, its header checked. */
function readStateBody(path: string): Uint8Array {
  const fail = (why: string) => new SnapshotError(`snapshot "${path}": ${why}`);
  let fd: number;
  try {
    // O_NONBLOCK: a FIFO in the file's place cannot hold the open; its kind is refused below.
    fd = openFile(path, O_RDONLY | O_NONBLOCK);
  } catch (e) {
    throw fail(e instanceof SysError && e.errno === ENOENT ? "missing" : (e as Error).message);
  }
  try {
    const info = fdInfo(fd);
    if (!info.isFile) throw fail(`is ${fileKind(info)}, not a regular file`);
    if (info.size < HEADER_SIZE) throw fail(`${info.size} bytes, shorter than the ${HEADER_SIZE}-byte header`);
    const header = readFd(fd, HEADER_SIZE, path);
    if (header.length < HEADER_SIZE) throw fail("ended while being read");
    if (new TextDecoder().decode(header.subarray(0, MAGIC_SIZE)) !== SNAPSHOT_MAGIC) {
      throw fail("not a denovm snapshot state file (bad magic)");
    }
    const view = new DataView(header.buffer, header.byteOffset, header.byteLength);
    const version = view.getUint32(VERSION_OFFSET, true);
    if (version !== SNAPSHOT_FORMAT_VERSION) {
      throw fail(`snapshot format version ${version}; this denovm reads version ${SNAPSHOT_FORMAT_VERSION}`);
    }
    const length = view.getBigUint64(LENGTH_OFFSET, true);
    const present = info.size - HEADER_SIZE;
    if (length > BigInt(present)) throw fail(`the body is ${present} bytes, shorter than its length ${length}`);
    if (length < BigInt(present)) throw fail(`${BigInt(present) - length} bytes after the body's end`);
    if (present > MAX_BODY_SIZE) throw fail(`the body is ${present} bytes; at most ${MAX_BODY_SIZE} are read`);
    const whole = readFd(fd, info.size, path);
    if (whole.length < info.size) throw fail("ended while being read");
    const body = whole.subarray(HEADER_SIZE);
    const digest = header.subarray(DIGEST_OFFSET, DIGEST_OFFSET + DIGEST_SIZE);
    if (!sha256(body).every((b, i) => b === digest[i])) throw fail("checksum mismatch: the body is corrupt");
    return body;
  } catch (e) {
    if (e instanceof SnapshotError) throw e;
    throw fail((e as Error).message);
  } finally {
    closeFd(fd);
  }
}

/** The record in a state file's body, every field checked; throws StateError naming the first that does not fit. */
function parseBody(body: Uint8Array): Omit<Snapshot, "memoryPath"> {
  const record = decodeState(body);
  if (record.type !== SNAPSHOT_RECORD_TYPE) {
    throw new StateError(`a "${record.type}" record, not a snapshot`);
  }
  if (record.version !== SNAPSHOT_RECORD_VERSION) {
    throw new StateError(
      `snapshot record version ${record.version}; this denovm reads version ${SNAPSHOT_RECORD_VERSION}`,
    );
  }
  const d = stateRecord(record.data, "snapshot");
  const config = configFromState(d.config);
  const memory = parseMemory(d.memory, config);
  const vcpus = stateArray(d.vcpus, "vcpus").map((v, i) => deviceState(v, `vcpus[${i}]`));
  if (vcpus.length !== config.cpus) {
    throw new StateError(`${vcpus.length} vCPU states for the configuration's ${config.cpus} vCPUs`);
  }
  const vmgenid = stateString(d.vmgenid, "vmgenid");
  if (!VMGENID_PATTERN.test(vmgenid)) throw new StateError(`vmgenid: "${vmgenid}" is not 32 hex digits`);
  return {
    denovm: stateString(d.denovm, "denovm"),
    config,
    memory,
    vm: deviceState(d.vm, "vm"),
    vcpus,
    devices: parseDevices(d.devices),
    vmgenid,
  };
}

/** The memory record: regions end to end in the file, exactly the configuration's RAM ranges. */
function parseMemory(value: StateValue | undefined, config: VmConfig): MemoryLayout {
  const m = stateRecord(value, "memory");
  const size = stateInteger(m.size, "memory.size", PAGE_SIZE, Number.MAX_SAFE_INTEGER);
  const file = stateString(m.file, "memory.file");
  if (file.length === 0 || file.includes("/") || file === "." || file === "..") {
    throw new StateError(`memory.file: "${file}" is not a file name in the snapshot directory`);
  }
  const regions = stateArray(m.regions, "memory.regions").map((v, i): MemoryFileRegion => {
    const r = stateRecord(v, `memory.regions[${i}]`);
    const what = `memory.regions[${i}]`;
    return {
      guestBase: stateInteger(r.guestBase, `${what}.guestBase`, 0, Number.MAX_SAFE_INTEGER),
      size: stateInteger(r.size, `${what}.size`, PAGE_SIZE, Number.MAX_SAFE_INTEGER),
      fileOffset: stateInteger(r.fileOffset, `${what}.fileOffset`, 0, Number.MAX_SAFE_INTEGER),
    };
  });
  const ram = ramRanges(config.memMiB * MiB);
  const expected = ram.reduce<MemoryFileRegion[]>((out, r) => {
    const last = out.at(-1);
    out.push({ guestBase: r.start, size: r.size, fileOffset: last ? last.fileOffset + last.size : 0 });
    return out;
  }, []);
  const same = regions.length === expected.length &&
    regions.every((r, i) =>
      r.guestBase === expected[i].guestBase && r.size === expected[i].size && r.fileOffset === expected[i].fileOffset
    );
  if (!same) throw new StateError(`memory.regions are not the RAM of the configuration's ${config.memMiB} MiB`);
  if (size !== config.memMiB * MiB) {
    throw new StateError(`memory.size ${size} is not the configuration's ${config.memMiB} MiB`);
  }
  return { size, regions, file };
}

/** A saved device state record. */
function deviceState(value: StateValue | undefined, what: string): DeviceState {
  const r = stateRecord(value, what);
  return {
    type: stateString(r.type, `${what}.type`),
    version: stateInteger(r.version, `${what}.version`, 0, Number.MAX_SAFE_INTEGER),
    data: r.data === undefined ? null : r.data,
  };
}

function parseDevices(value: StateValue | undefined): DevicesState {
  const d = stateRecord(value, "devices");
  const legacy = stateArray(d.legacy, "devices.legacy").map((v, i): LegacyDeviceState => {
    const r = stateRecord(v, `devices.legacy[${i}]`);
    return {
      name: stateString(r.name, `devices.legacy[${i}].name`),
      state: deviceState(r.state, `devices.legacy[${i}].state`),
    };
  });
  const virtio = stateArray(d.virtio, "devices.virtio").map((v, i): VirtioSlotState => {
    const what = `devices.virtio[${i}]`;
    const r = stateRecord(v, what);
    return {
      name: stateString(r.name, `${what}.name`),
      transport: deviceState(r.transport, `${what}.transport`),
      device: deviceState(r.device, `${what}.device`),
    };
  });
  return { legacy, virtio };
}
