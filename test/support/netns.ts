// Unit tests that need taps run inside a network namespace of their own, so that nothing they create
// reaches the host's network. A test file does it by re-running itself: run normally (outside), it
// registers one test that creates a namespace, runs the same file inside it (`ip netns exec NS deno test
// ...` with NETNS_ENV set), checks that every inner test ran and passed, and deletes the namespace.
// Inside, `insideNetns` is the namespace's name and the file registers its tap tests instead.
//
//   if (!insideNetns) { ...tests that need no tap...; await testInNetns({ ... }); }
//   if (insideNetns) { ...tap tests... }

import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";

/** Set (to the namespace's name) in the environment of a test file re-run inside its namespace. */
export const NETNS_ENV = "DENOVM_NET_TEST_NETNS";

/** The namespace this process's tests run in, when it is the inner run; undefined outside. */
export const insideNetns: string | undefined = Deno.env.get(NETNS_ENV);

/** A namespace name no other test (in this process or another) is using. */
function uniqueName(prefix: string): string {
  return `${prefix}-${Deno.pid}-${crypto.randomUUID().slice(0, 8)}`;
}

/** Why this host cannot give a test a network namespace, or undefined when it can. */
export async function netnsUnavailable(): Promise<string | undefined> {
  if (Deno.build.os !== "linux") return "network namespaces need Linux";
  try {
    const name = uniqueName("denovm-probe");
    const add = await new Deno.Command("ip", { args: ["netns", "add", name], stderr: "piped" }).output();
    if (!add.success) return `ip netns add failed: ${new TextDecoder().decode(add.stderr).trim()}`;
    await new Deno.Command("ip", { args: ["netns", "del", name] }).output();
    return undefined;
  } catch (e) {
    return `ip (iproute2) unavailable: ${(e as Error).message}`;
  }
}

export interface NetnsRun {
  /** What the inner tests are: the outer test is named "<what>, run inside a fresh network namespace". */
  what: string;
  /** The test file to run inside: the caller's `import.meta.url`. */
  file: string;
  /** How many tests the file registers inside the namespace; all must pass. */
  innerTests: number;
}

/**
 * Registers the outer test that runs `run.file` inside a fresh network namespace (see the top of this
 * file); it is ignored, with one line saying why, where namespaces cannot be created.
 */
export async function testInNetns(run: NetnsRun): Promise<void> {
  const reason = await netnsUnavailable();
  if (reason) console.log(`skipping ${run.what}: ${reason}`);
  Deno.test({
    name: `${run.what}, run inside a fresh network namespace`,
    ignore: reason !== undefined,
    async fn() {
      const ns = uniqueName("denovm-net");
      const add = await new Deno.Command("ip", { args: ["netns", "add", ns] }).output();
      assert.ok(add.success, "ip netns add");
      try {
        // No IPv6 on new interfaces: no router solicitations or MLD reports competing for rx buffers.
        const v6 = await new Deno.Command("ip", {
          args: ["netns", "exec", ns, "sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6"],
        }).output();
        if (!v6.success) console.log("could not disable IPv6 in the namespace; continuing");
        const out = await new Deno.Command("ip", {
          args: ["netns", "exec", ns, Deno.execPath(), "test", "--allow-all", fileURLToPath(run.file)],
          env: { [NETNS_ENV]: ns, NO_COLOR: "1" },
          stdout: "piped",
          stderr: "piped",
        }).output();
        const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
        console.log(text.split("\n").filter((l) => / \.\.\. |^ok |FAILED|passed|error/i.test(l)).join("\n"));
        assert.ok(out.success, `the tests inside the namespace failed:\n${text}`);
        assert.match(text, new RegExp(`ok \\| ${run.innerTests} passed`), "every inner test ran");
      } finally {
        await new Deno.Command("ip", { args: ["netns", "del", ns] }).output();
      }
    },
  });
}
