// The pmem family: `run --pmem [path=]PATH[,ro=BOOL][,root=BOOL]` (crosvm src/crosvm/config.rs PmemOption)
// and crosvm's deprecated `--pmem-device PATH` (read-only) and `--rw-pmem-device PATH` (writable), which crosvm
// parses as disk options and of which it keeps only the path (src/crosvm/cmdline.rs). PmemOption's
// experimental keys vma-size and swap-interval-ms (an anonymous memory area instead of a file, and its
// periodic swap-out) are refused by name. See common.ts for how the family modules are organised.

import type { PmemConfig } from "../../config.ts";
import { type KvSchema, parseOption, UsageError } from "../keyvalue.ts";
import { crosvmOnlyKeys } from "../help.ts";
import { parseBlockOption } from "./block.ts";

function pmemSchema(): KvSchema {
  return {
    option: "--pmem",
    positional: "path",
    keys: { path: "string", ro: "bool", root: "bool" },
    crosvmOnly: crosvmOnlyKeys("pmem"),
  };
}

/** `--pmem` options. */
export function parsePmemOption(text: string): PmemConfig {
  const o = parseOption(pmemSchema(), text);
  if (o.path === undefined || o.path === "") throw new UsageError("--pmem: path is required");
  return {
    path: o.path as string,
    ro: (o.ro as boolean | undefined) ?? false,
    root: (o.root as boolean | undefined) ?? false,
  };
}

/**
 * crosvm's deprecated `--pmem-device` (`ro`: true) or `--rw-pmem-device` (false): a disk option of which only
 * the path is used, as in crosvm.
 */
export function parseDeprecatedPmemOption(text: string, option: string, ro: boolean): PmemConfig {
  const disk = parseBlockOption(text, option);
  return { path: disk.path, ro, root: false };
}
