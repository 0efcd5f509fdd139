// `deno task bench [name...]`: run bench/<name>.ts (every benchmark by default), each in its own
// process, and print each one's last stdout line (one JSON object per benchmark). Progress of the
// benchmarks goes to stderr. Exits 1 if a benchmark failed.

import { join } from "node:path";
import { BENCH_DIR } from "./_common.ts";

function benchNames(): string[] {
  const names: string[] = [];
  for (const e of Deno.readDirSync(BENCH_DIR)) {
    if (e.isFile && e.name.endsWith(".ts") && e.name !== "run.ts" && !e.name.startsWith("_")) {
      names.push(e.name.slice(0, -3));
    }
  }
  return names.sort();
}

const available = benchNames();
const wanted = Deno.args.length ? Deno.args.map((a) => a.replace(/\.ts$/, "").replace(/^bench\//, "")) : available;
let failed = 0;
for (const name of wanted) {
  if (!available.includes(name)) {
    console.log(JSON.stringify({ bench: name, error: `no bench/${name}.ts (have: ${available.join(", ")})` }));
    failed++;
    continue;
  }
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-all", join(BENCH_DIR, `${name}.ts`)],
    stdin: "null",
    stdout: "piped",
    stderr: "inherit",
  }).output();
  const lines = new TextDecoder().decode(out.stdout).trim().split("\n").filter((l) => l.trim() !== "");
  const last = lines.at(-1);
  if (!out.success || last === undefined) {
    console.log(JSON.stringify({ bench: name, error: `exit code ${out.code}`, last: last ?? null }));
    failed++;
  } else {
    console.log(last);
  }
}
if (failed) Deno.exit(1);
