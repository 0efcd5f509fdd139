// Serial ports' host ends: an output file is checked on the opened file before it is truncated, and an
// output that fails is one log line, not an exception.

import assert from "node:assert/strict";
import { HostIo } from "./host_io.ts";
import type { SerialConfig } from "../config.ts";
import { fileIdentity } from "../../core/host_file.ts";
import { OutputIsInputError } from "../vm_files.ts";

function fileSerial(path: string): SerialConfig {
  return { type: "file", hardware: "serial", num: 2, path, console: false, earlycon: false, stdin: false };
}

Deno.test("host io: an output file that is one of the VM's inputs is refused on the opened file, untruncated", async () => {
  const path = await Deno.makeTempFile();
  const bytes = new Uint8Array(4096).map((_, i) => i & 0xff);
  await Deno.writeFile(path, bytes);
  // As if the path had come to name the disk after prepareBoot's check.
  const inputs = new Map([[fileIdentity(Deno.statSync(path))!, { name: "--block /d.img", path: "/d.img" }]]);
  const io = new HostIo([fileSerial(path)], { noStdin: true, inputs, log: () => {} });
  try {
    await assert.rejects(
      io.output(fileSerial(path)),
      (e: unknown) => e instanceof OutputIsInputError && /^--serial num=2 path=.* is --block \/d\.img/.test(e.message),
    );
    assert.deepEqual(await Deno.readFile(path), bytes);
  } finally {
    io.close();
    await Deno.remove(path);
  }
});

Deno.test("host io: an output file is emptied once it is checked, then written", async () => {
  const path = await Deno.makeTempFile();
  await Deno.writeTextFile(path, "old contents that must go\n");
  const io = new HostIo([fileSerial(path)], { noStdin: true, inputs: new Map(), log: () => {} });
  try {
    const out = await io.output(fileSerial(path));
    out(new TextEncoder().encode("new\n"));
    assert.equal(await Deno.readTextFile(path), "new\n");
  } finally {
    io.close();
    await Deno.remove(path);
  }
});

Deno.test("host io: a write that fails (/dev/full) is one log line; the port's later output is dropped", async () => {
  const lines: string[] = [];
  const io = new HostIo([fileSerial("/dev/full")], { noStdin: true, log: (l) => lines.push(l) });
  try {
    const out = await io.output(fileSerial("/dev/full"));
    for (let i = 0; i < 3; i++) out(new TextEncoder().encode(`line ${i}\n`));
    assert.equal(lines.length, 1, lines.join("\n"));
    assert.match(lines[0], /^--serial num=2: cannot write to \/dev\/full: .*; its further output is dropped$/);
  } finally {
    io.close();
  }
});
