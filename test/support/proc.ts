// Processes on this host, as /proc (proc(5)) lists them.

/** The ids of the processes whose command line mentions `needle`. */
export function processesWith(needle: string): number[] {
  const out: number[] = [];
  for (const e of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(e.name)) continue;
    try {
      if (Deno.readTextFileSync(`/proc/${e.name}/cmdline`).includes(needle)) out.push(Number(e.name));
    } catch {
      // gone meanwhile
    }
  }
  return out;
}
