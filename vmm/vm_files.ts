// The files a VM reads and the files it writes, each with the option that names it, and the rule between
// them: no output may be one of the inputs. An output that is an input (a serial log over the disk image,
// by its own path, a link, or /dev/stdout) would truncate or overwrite what the guest boots from, so it is
// refused before anything is opened for writing. Files are the same when their device and inode are; a
// path that does not exist yet is no file, and collides with nothing.

import { ConfigError } from "../core/exit.ts";
import { fileIdentity } from "../core/host_file.ts";
import type { SerialConfig, VmConfig } from "./config.ts";

/** A file of the VM and the option that names it, as a message shows it ("--block /d.img"). */
export interface NamedFile {
  name: string;
  path: string;
}

/** The standard streams a serial port writes to (type=stdout, type=syslog), by their /proc/self/fd names. */
const STDOUT_PATH = "/proc/self/fd/1";
const STDERR_PATH = "/proc/self/fd/2";

/** How a message names serial port `s`: `--serial num=2`, `--serial hardware=virtio-console,num=1`. */
export function serialName(s: SerialConfig): string {
  return `--serial ${s.hardware === "serial" ? "" : `hardware=${s.hardware},`}num=${s.num}`;
}

/** Every file the VM reads: kernel, initrd, disk images, serial ports' input files, custom input configs. */
export function vmInputs(config: VmConfig): NamedFile[] {
  const out: NamedFile[] = [{ name: `--kernel ${config.kernel}`, path: config.kernel }];
  if (config.initrd !== undefined) out.push({ name: `--initrd ${config.initrd}`, path: config.initrd });
  for (const b of config.blocks) {
    const flag = b.root ? (b.ro ? "--root" : "--rwroot") : "--block";
    out.push({ name: `${flag} ${b.path}`, path: b.path });
  }
  for (const p of config.pmems ?? []) out.push({ name: `--pmem ${p.path}`, path: p.path });
  for (const s of config.serials) {
    if (s.input !== undefined) out.push({ name: `${serialName(s)} input=${s.input}`, path: s.input });
  }
  for (const i of config.inputs) {
    if (i.configPath !== undefined) {
      out.push({ name: `--input ${i.kind} config-path=${i.configPath}`, path: i.configPath });
    }
  }
  return out;
}

/** Every file the VM writes: serial ports' files and streams, the GPU's trace. */
export function vmOutputs(config: VmConfig): NamedFile[] {
  const out: NamedFile[] = [];
  for (const s of config.serials) {
    if (s.type === "file" && s.path !== undefined) out.push({ name: `${serialName(s)} path=${s.path}`, path: s.path });
    if (s.type === "stdout") {
      out.push({ name: `${serialName(s)} type=stdout (this process's stdout)`, path: STDOUT_PATH });
    }
    if (s.type === "syslog") {
      out.push({ name: `${serialName(s)} type=syslog (this process's stderr)`, path: STDERR_PATH });
    }
  }
  if (config.gpu?.tracePath !== undefined) {
    out.push({ name: `--gpu trace=${config.gpu.tracePath}`, path: config.gpu.tracePath });
  }
  return out;
}

/** The file at `path` (symbolic links followed), or undefined when there is none to stat. */
function statOrUndefined(path: string): Deno.FileInfo | undefined {
  try {
    return Deno.statSync(path);
  } catch {
    return undefined;
  }
}

/**
 * The VM's inputs that an output could overwrite, regular files and block devices, by file identity
 * ("dev:ino" → the first input that names it). Missing files are left out, and so are terminals and other
 * streams: a serial port may well read a terminal that another writes to.
 */
export function inputIdentities(config: VmConfig): Map<string, NamedFile> {
  const ids = new Map<string, NamedFile>();
  for (const f of vmInputs(config)) {
    const info = statOrUndefined(f.path);
    if (!info || !(info.isFile || info.isBlockDevice)) continue;
    const id = fileIdentity(info);
    if (id !== undefined && !ids.has(id)) ids.set(id, f);
  }
  return ids;
}

/** An output that is one of the VM's inputs: exit 35, naming both options. */
export class OutputIsInputError extends ConfigError {
  constructor(output: string, input: NamedFile) {
    super(`${output} is ${input.name}: an output must not overwrite one of the VM's inputs`);
    this.name = "OutputIsInputError";
  }
}

/**
 * Throws OutputIsInputError when an output of `config` is the same file as one of its inputs. Returns the
 * inputs' identities, for the check an output makes again on the file it opened (checkOpenedOutput).
 */
export function checkOutputsAreNotInputs(config: VmConfig): Map<string, NamedFile> {
  const inputs = inputIdentities(config);
  for (const o of vmOutputs(config)) {
    const info = statOrUndefined(o.path);
    const id = info && fileIdentity(info);
    const input = id === undefined ? undefined : inputs.get(id);
    if (input) throw new OutputIsInputError(o.name, input);
  }
  return inputs;
}

/** The same check on an output file as opened (its fstat), which closes the race with a path replaced since. */
export function checkOpenedOutput(output: string, info: Deno.FileInfo, inputs: ReadonlyMap<string, NamedFile>): void {
  const id = fileIdentity(info);
  const input = id === undefined ? undefined : inputs.get(id);
  if (input) throw new OutputIsInputError(output, input);
}

/**
 * For an output named at run time (a screenshot asked for on the control socket): throws OutputIsInputError
 * when `path` is one of `config`'s inputs.
 */
export function checkOutputPath(output: string, path: string, config: VmConfig): void {
  const info = statOrUndefined(path);
  if (info) checkOpenedOutput(output, info, inputIdentities(config));
}
