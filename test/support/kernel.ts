// Debian bookworm's Linux 6.1 kernel for tests, fetched once by scripts/debian-kernel.sh.

export interface DebianKernel {
  /** The bzImage. */
  vmlinuz: string;
  /** The uncompressed ELF kernel. */
  vmlinux: string;
  /** Directory with the package contents (boot/, lib/modules/...). */
  root: string;
  /** Kernel release, e.g. "6.1.0-56-amd64". */
  version: string;
}

const script = new URL("../../scripts/debian-kernel.sh", import.meta.url).pathname;
let pending: Promise<DebianKernel> | undefined;

async function fetchKernel(): Promise<DebianKernel> {
  const out = await new Deno.Command("bash", { args: [script], stdout: "piped", stderr: "piped" }).output();
  const stderr = new TextDecoder().decode(out.stderr).trim();
  if (!out.success) throw new Error(`scripts/debian-kernel.sh failed (exit ${out.code}): ${stderr.split("\n").pop()}`);
  const dir = new TextDecoder().decode(out.stdout).trim().split("\n").pop()!;
  const version = (await Deno.readTextFile(`${dir}/version`)).trim();
  return { vmlinuz: `${dir}/vmlinuz`, vmlinux: `${dir}/vmlinux`, root: `${dir}/root`, version };
}

/** Paths of Debian's kernel, fetching and extracting it on first use (cached across runs). */
export function debianKernel(): Promise<DebianKernel> {
  pending ??= fetchKernel().catch((e) => {
    pending = undefined;
    throw e;
  });
  return pending;
}
