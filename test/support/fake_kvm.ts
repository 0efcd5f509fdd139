// Builds test/support/fake_kvm.c, the fake /dev/kvm, into a shared object that denovm loads as its
// libc (DENOVM_LIBC); see the comment at the top of fake_kvm.c for how it works and what it fakes.
// The object is cached under ${DENOVM_CACHE:-<repo>/.cache}/fake_kvm/ by a hash of the source, the
// compiler flags and the vmm/arch/layout.ts values it is compiled with.

import { createHash } from "node:crypto";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import {
  ACPI_SLEEP_CONTROL_PORT,
  ACPI_SLEEP_TYPE_S5,
  DEBUG_EXIT_PORT,
  I8042_COMMAND_PORT,
  PVPANIC_PORT,
  SERIAL_PORTS,
  VIRTIO_MMIO_START,
} from "../../vmm/arch/layout.ts";
import { ACPI_SLP_EN, ACPI_SLP_TYP_SHIFT } from "../../devices/legacy/acpi_pm.ts";

const SUPPORT_DIR = dirname(fileURLToPath(import.meta.url));
const SOURCE = join(SUPPORT_DIR, "fake_kvm.c");
const REPO_ROOT = join(SUPPORT_DIR, "..", "..");

/** The vmm/arch/layout.ts values the fake's scripted guests use, passed as -DLAYOUT_<NAME>=<value>. */
export const FAKE_KVM_LAYOUT: Readonly<Record<string, number>> = {
  SERIAL_COM1_BASE: SERIAL_PORTS[0].base,
  I8042_COMMAND_PORT,
  PVPANIC_PORT,
  DEBUG_EXIT_PORT,
  ACPI_SLEEP_CONTROL_PORT,
  ACPI_SLEEP_TYPE_S5,
  ACPI_SLP_TYP_SHIFT,
  ACPI_SLP_EN,
  VIRTIO_MMIO_START,
};

const GCC_FLAGS = ["-shared", "-fPIC", "-O2", "-g", "-Wall", "-Werror", "-pthread"];

function cacheDir(): string {
  return join(Deno.env.get("DENOVM_CACHE") ?? join(REPO_ROOT, ".cache"), "fake_kvm");
}

let pending: Promise<string> | undefined;

async function build(): Promise<string> {
  const source = await Deno.readTextFile(SOURCE);
  const defines = Object.entries(FAKE_KVM_LAYOUT).map(([k, v]) => `-DLAYOUT_${k}=0x${v.toString(16)}`);
  const args = [...GCC_FLAGS, ...defines];
  const hash = createHash("sha256").update(source).update("\0").update(args.join(" ")).digest("hex").slice(0, 16);
  const dir = cacheDir();
  const out = join(dir, `fake_kvm-${hash}.so`);
  try {
    await Deno.stat(out);
    return out;
  } catch {
    // not built yet
  }
  await Deno.mkdir(dir, { recursive: true });
  const tmp = `${out}.${Deno.pid}.tmp`;
  const r = await new Deno.Command("gcc", { args: [...args, "-o", tmp, SOURCE, "-ldl"], stderr: "piped" }).output();
  if (!r.success) {
    throw new Error(`building the fake KVM failed (gcc exit ${r.code}):\n${new TextDecoder().decode(r.stderr)}`);
  }
  await Deno.rename(tmp, out);
  return out;
}

/** Path of the fake-KVM shared object (built on first use, cached by source hash). */
export function buildFakeKvm(): Promise<string> {
  pending ??= build().catch((e) => {
    pending = undefined;
    throw e;
  });
  return pending;
}

/** One line of the fake's event log ($DENOVM_FAKE_KVM_LOG). */
export interface FakeKvmEvent {
  ev: string;
  [field: string]: unknown;
}

/** The events the fake logged to `path`, in order. */
export async function readFakeKvmLog(path: string): Promise<FakeKvmEvent[]> {
  const text = await Deno.readTextFile(path);
  return text.split("\n").filter((l) => l.trim() !== "").map((l) => JSON.parse(l) as FakeKvmEvent);
}

/**
 * The environment that makes denovm use the fake: its libc is the fake's object, its KVM device a
 * path that does not exist (so nothing but the fake can answer), the scripted guest and the log.
 */
export function fakeKvmEnv(shim: string, script: string, log: string): Record<string, string> {
  return {
    DENOVM_LIBC: shim,
    DENOVM_KVM_DEVICE: "/nonexistent/fake-kvm",
    DENOVM_FAKE_KVM_SCRIPT: script,
    DENOVM_FAKE_KVM_LOG: log,
  };
}
