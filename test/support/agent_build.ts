// Builds the guest agent (agent/agent.c) as a static binary with the host's gcc, cached by
// the hash of the source and the compiler command under ${DENOVM_CACHE:-<repo>/.cache}/agent/.

const REPO_ROOT = new URL("../../", import.meta.url).pathname;
export const AGENT_SOURCE = `${REPO_ROOT}agent/agent.c`;
const GCC_ARGS = ["-static", "-O2", "-Wall", "-Wextra"];

export function agentCacheDir(): string {
  return `${Deno.env.get("DENOVM_CACHE") ?? `${REPO_ROOT}.cache`}/agent`;
}

/** Why the agent cannot be built here, or undefined. */
export function agentBuildUnavailableReason(): string | undefined {
  const gcc = new Deno.Command("sh", { args: ["-c", "command -v gcc"], stdout: "null", stderr: "null" }).outputSync();
  return gcc.success ? undefined : "gcc missing (apt-get install gcc libc6-dev)";
}

async function sha256Hex(data: Uint8Array<ArrayBuffer>): Promise<string> {
  const d = await crypto.subtle.digest("SHA-256", data);
  return [...new Uint8Array(d)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * Path of the built agent, ${cache}/agent/denovm-agent (a symlink-free copy), rebuilt when
 * agent.c or the flags change; the hash of the last build is kept beside it.
 */
export async function buildAgent(): Promise<string> {
  const src = await Deno.readFile(AGENT_SOURCE);
  const key = await sha256Hex(
    new TextEncoder().encode(JSON.stringify(GCC_ARGS) + "\0" + new TextDecoder().decode(src)),
  );
  const dir = agentCacheDir();
  const out = `${dir}/denovm-agent`;
  const stamp = `${out}.sha256`;
  try {
    if ((await Deno.readTextFile(stamp)).trim() === key) {
      await Deno.stat(out);
      return out;
    }
  } catch {
    // build below
  }
  await Deno.mkdir(dir, { recursive: true });
  const tmp = `${out}.${Deno.pid}.tmp`;
  const r = await new Deno.Command("gcc", { args: [...GCC_ARGS, "-o", tmp, AGENT_SOURCE], stderr: "piped" }).output();
  if (!r.success) throw new Error(`building ${AGENT_SOURCE} failed:\n${new TextDecoder().decode(r.stderr)}`);
  await Deno.rename(tmp, out);
  await Deno.writeTextFile(stamp, key + "\n");
  return out;
}
