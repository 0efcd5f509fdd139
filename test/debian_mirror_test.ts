// scripts/lib/debmirror.sh: the Debian mirror is taken from the machine's apt sources (one-line and
// deb822 files), for its own release only, with deb.debian.org when none is found.

import assert from "node:assert/strict";

const LIB = new URL("../scripts/lib/debmirror.sh", import.meta.url).pathname;
const OS_RELEASE = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nVERSION_CODENAME=bookworm\nID=debian\n';

/** debian_mirror over an /etc/apt made of `files` (path under it -> contents); its output line. */
async function mirror(files: Record<string, string>, env: Record<string, string> = {}): Promise<string> {
  const dir = await Deno.makeTempDir({ prefix: "debmirror-" });
  try {
    await Deno.mkdir(`${dir}/apt/sources.list.d`, { recursive: true });
    for (const [path, text] of Object.entries(files)) await Deno.writeTextFile(`${dir}/apt/${path}`, text);
    await Deno.writeTextFile(`${dir}/os-release`, OS_RELEASE);
    const r = await new Deno.Command("bash", {
      args: [
        "-c",
        `set -euo pipefail; source "$1"; debian_mirror "$2" "$3"`,
        "bash",
        LIB,
        `${dir}/apt`,
        `${dir}/os-release`,
      ],
      env: { DENOVM_DEBIAN_MIRROR: "", ...env },
      stdout: "piped",
      stderr: "piped",
    }).output();
    assert.equal(r.code, 0, new TextDecoder().decode(r.stderr));
    return new TextDecoder().decode(r.stdout).trim();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("debian mirror: a one-line sources.list entry for the release, options and comments skipped", async () => {
  assert.equal(
    await mirror({
      "sources.list": [
        "# deb http://commented.example/debian bookworm main",
        "deb-src http://src.example/debian bookworm main",
        "deb http://security.example/debian-security bookworm-security main",
        "deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.local/debian/ bookworm main",
        "deb http://later.example/debian bookworm main",
      ].join("\n"),
    }),
    "http://mirror.local/debian",
  );
});

Deno.test("debian mirror: a deb822 .sources stanza, disabled stanzas and other vendors' suites skipped", async () => {
  assert.equal(
    await mirror({
      "sources.list.d/other.list": "deb https://packages.example.com/apt cloud-sdk-bookworm main\n",
      "sources.list.d/debian.sources": [
        "Types: deb",
        "URIs: http://disabled.example/debian",
        "Suites: bookworm",
        "Enabled: no",
        "",
        "Types: deb",
        "# a comment inside the stanza",
        "URIs: http://security.example/debian-security",
        "Suites: bookworm-security",
        "",
        "Types: deb deb-src",
        "URIs: https://apt.example.org/debian http://second.example/debian",
        "Suites: bookworm bookworm-updates",
        "Components: main",
      ].join("\n"),
    }),
    "https://apt.example.org/debian",
  );
});

Deno.test("debian mirror: deb.debian.org without a matching entry; DENOVM_DEBIAN_MIRROR overrides", async () => {
  assert.equal(
    await mirror({
      "sources.list.d/node.sources": "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\n",
    }),
    "http://deb.debian.org/debian",
  );
  assert.equal(await mirror({}), "http://deb.debian.org/debian");
  assert.equal(
    await mirror({ "sources.list": "deb http://mirror.local/debian bookworm main\n" }, {
      DENOVM_DEBIAN_MIRROR: "http://override.example/debian/",
    }),
    "http://override.example/debian",
  );
});
