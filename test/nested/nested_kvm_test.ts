// The KVM tests, run for real where this host cannot run them itself.
//
// Without /dev/kvm, or with kvm_pvm (which cannot run an unmodified Linux kernel), the tests that
// need KVM skip here. This file runs them anyway, in a nested host: Debian's kernel under QEMU's
// TCG with emulated AMD SVM, whose kvm_amd gives a hardware-style /dev/kvm
// (scripts/nested-kvm.sh). The nested host sees this checkout read-only at the same path; the
// inner `deno test` writes a JUnit report to a shared folder, and each inner test becomes a step
// here, failing with the inner failure's message. An inner test that skips is a failure too:
// /dev/kvm is there, so nothing may skip. Where this host's KVM is hardware-backed the KVM tests
// already ran directly and this file skips.

import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { XMLParser } from "fast-xml-parser";
import { nestedTestsOff } from "../support/nested.ts";
import { soundGuest } from "../support/sound_guest.ts";
import { mesaPrerequisites } from "../../bench/kmscube.ts";
import { hostKind } from "../../vmm/kvm/host.ts";

const repo = fileURLToPath(new URL("../..", import.meta.url));
const script = `${repo}scripts/nested-kvm.sh`;

/** The test files with tests that need /dev/kvm, and the names of those tests. */
const KVM_TEST_FILES = [
  "test/kvm/boot_test.ts",
  "test/kvm/virtio_test.ts",
  "test/kvm/control_test.ts",
  "test/kvm/gpu_test.ts",
  "test/nested/linux_boot_test.ts",
  "test/nested/linux_snapshot_test.ts",
  "test/nested/linux_pmem_test.ts",
  "test/nested/linux_vhost_user_test.ts",
  "test/kvm/many_vms_test.ts",
  "test/kvm/gdb_test.ts",
  "test/kvm/snapshot_test.ts",
  "test/kvm/snapshot_library_test.ts",
  "test/kvm/run_suspended_test.ts",
  "test/kvm/vhost_user_front_end_test.ts",
  "test/nested/linux_sound_test.ts",
  "test/nested/linux_gpu_test.ts",
];
const KVM_TEST_NAMES = /^(kvm|linux)[ :]/;
/** Runs of the nested host when it freezes (each later one runs only the files the frozen one had not finished). */
const NESTED_ATTEMPTS = 4;

/** Generous: the whole set takes about 6 minutes at TCG speed on a 2-core machine. */
const NESTED_TIMEOUT_MS = 40 * 60_000;
/** The longest single test takes about 3 minutes there; 8 without a line of output is a stall. */
const NO_PROGRESS_MS = 8 * 60_000;

function which(cmd: string): boolean {
  return (Deno.env.get("PATH") ?? "").split(":").some((d) => d && existsSync(`${d}/${cmd}`));
}

function skipReason(): string | undefined {
  const kind = hostKind();
  if (kind === "kvm_amd" || kind === "kvm_intel") {
    return "this host's KVM is hardware-backed: the KVM tests ran directly";
  }
  if (!which("qemu-system-x86_64")) return "qemu-system-x86_64 is not installed (scripts/setup.sh installs it)";
  return nestedTestsOff();
}
const skip = skipReason();
if (skip) console.log(`nested_kvm_test: skipped: ${skip}`);

interface InnerCase {
  name: string;
  file: string;
  failure?: string;
  skipped: boolean;
}

/** The test cases of a Deno JUnit report, without the entries for steps ("parent > step"). */
function parseJunit(xml: string): InnerCase[] {
  const parser = new XMLParser({
    ignoreAttributes: false,
    attributeNamePrefix: "",
    isArray: (name) => name === "testsuite" || name === "testcase",
  });
  const doc = parser.parse(xml);
  const cases: InnerCase[] = [];
  for (const suite of doc?.testsuites?.testsuite ?? []) {
    for (const c of suite.testcase ?? []) {
      const name = String(c.name);
      if (name.includes(" > ")) continue;
      const failure = c.failure === undefined
        ? undefined
        : typeof c.failure === "string"
        ? c.failure
        : `${c.failure.message ?? ""}\n${c.failure["#text"] ?? ""}`;
      cases.push({ name, file: String(c.classname ?? suite.name), failure, skipped: c.skipped !== undefined });
    }
  }
  return cases;
}

Deno.test("parseJunit reads Deno's JUnit report: passes, failures with their text, skips; steps left out", () => {
  const xml = `<?xml version="1.0" encoding="UTF-8"?>
<testsuites name="deno test" tests="4" failures="1" errors="0" time="0.015">
  <testsuite name="./a_test.ts" tests="4" disabled="1" errors="0" failures="1">
    <testcase name="kvm: one" classname="./a_test.ts" time="0.002" line="1" col="6"></testcase>
    <testcase name="kvm: two &amp; more" classname="./a_test.ts" time="0.002" line="2" col="6">
      <failure message="Uncaught Error: boom">Error: boom
    at file:///a_test.ts:2:43</failure>
    </testcase>
    <testcase name="kvm: three" classname="./a_test.ts" time="0.000" line="3" col="6"><skipped/></testcase>
    <testcase name="kvm: three &gt; inner" classname="./a_test.ts" time="0.000" line="3" col="9"></testcase>
  </testsuite>
</testsuites>`;
  const cases = parseJunit(xml);
  assert.deepEqual(cases.map((c) => [c.name, c.file, c.skipped, c.failure !== undefined]), [
    ["kvm: one", "./a_test.ts", false, false],
    ["kvm: two & more", "./a_test.ts", false, true],
    ["kvm: three", "./a_test.ts", true, false],
  ]);
  assert.match(cases[1].failure!, /Uncaught Error: boom[\s\S]*a_test\.ts:2:43/);
  assert.deepEqual(parseJunit(""), []);
});

Deno.test("finishedInLog takes the files a frozen run finished from its log, and leaves the one it was in", () => {
  const log = [
    "running 2 tests from ./test/kvm/boot_test.ts",
    "kvm: one ... ok (1s)",
    "kvm: two ...stderr: a line the test wrote",
    "kvm: two ... FAILED (2s)",
    "running 1 test from ./test/kvm/gpu_test.ts",
    "kvm: three ... ignored (0ms)",
    "not a kvm test ... ok (0ms)",
    "running 2 tests from ./test/kvm/many_vms_test.ts",
    "kvm: four ... ok (1s)",
    "kvm: five ...stderr: nested-kvm: no heartbeat from the nested host for 124 s",
  ].join("\n");
  const { cases } = finishedInLog(log);
  assert.deepEqual(cases.map((c) => [c.name, c.file, c.skipped, c.failure !== undefined]), [
    ["kvm: one", "./test/kvm/boot_test.ts", false, false],
    ["kvm: two", "./test/kvm/boot_test.ts", false, true],
    ["kvm: three", "./test/kvm/gpu_test.ts", true, false],
  ]);
  assert.deepEqual(finishedInLog("").cases, []);
});

Deno.test({
  name: "nested KVM: the KVM tests pass under kvm_amd in QEMU TCG's emulated SVM",
  ignore: skip !== undefined,
  sanitizeResources: false,
  async fn(t) {
    const out = await Deno.makeTempDir({ prefix: "denovm-nested-out-" });
    const cache = Deno.env.get("DENOVM_CACHE") ?? `${repo}.cache`;
    const logPath = `${cache}/nested/last-run.log`;
    try {
      await Deno.mkdir(`${cache}/nested`, { recursive: true });
      // The nested host has no network: what its tests fetch from Debian is fetched here first, into the
      // cache it sees (the sound guest's kernel and ALSA tools: test/nested/linux_sound_test.ts; the Mesa guest
      // and QEMU 10: test/nested/linux_gpu_test.ts).
      await soundGuest();
      const mesa = await mesaPrerequisites();
      if (typeof mesa === "string") console.log(`nested KVM: the Mesa guest is not available: ${mesa}`);
      const inner = (files: string[]) => [
        Deno.execPath(),
        "test",
        "--allow-all",
        "--no-check",
        `--filter=/${KVM_TEST_NAMES.source}/`,
        `--junit-path=${out}/junit.xml`,
        ...files,
      ];
      let run = await runNested(inner(KVM_TEST_FILES), out, cache, logPath);
      // Tests of files a frozen run finished, read from its log.
      let finished: InnerCase[] = [];
      for (let attempt = 1; run.frozen && attempt < NESTED_ATTEMPTS; attempt++) {
        // The nested host itself stopped, its own heartbeat too (QEMU's emulation, not a test: see
        // docs/testing.md). The files it finished keep their results; the rest run again in a new nested
        // host. The frozen run's whole log is kept beside the next one's: it shows which test was running.
        const frozenLog = `${logPath}.frozen${attempt}`;
        await Deno.copyFile(logPath, frozenLog);
        const done = finishedInLog(await Deno.readTextFile(logPath));
        finished = [...finished, ...done.cases];
        const doneFiles = new Set([...finished.map((c) => c.file)]);
        const rest = KVM_TEST_FILES.filter((f) => !doneFiles.has(`./${f}`));
        console.log(
          `nested KVM: the nested host froze (log: ${frozenLog}); running the ${rest.length} files it had not ` +
            `finished once more: ${rest.join(" ")}`,
        );
        console.log(run.tail());
        await Deno.remove(`${out}/junit.xml`).catch(() => {});
        run = await runNested(inner(rest), out, cache, logPath);
      }
      const { result, tail } = run;
      assert.ok(!run.frozen, `the nested host froze ${NESTED_ATTEMPTS} times (no heartbeat)\n${tail()}`);
      assert.ok(!run.stalled, `the nested run printed nothing for ${NO_PROGRESS_MS / 60_000} minutes\n${tail()}`);

      let xml = "";
      try {
        xml = await Deno.readTextFile(`${out}/junit.xml`);
      } catch {
        assert.fail(`the nested run wrote no JUnit report (exit ${result.code})\n${tail()}`);
      }
      // The report lists the tests the filter left out as skipped too: keep the selected ones.
      const cases = [...finished, ...parseJunit(xml).filter((c) => KVM_TEST_NAMES.test(c.name))];
      for (const file of KVM_TEST_FILES) {
        assert.ok(cases.some((c) => c.file.endsWith(file.slice("test/".length))), `no test of ${file} ran\n${tail()}`);
      }
      for (const c of cases) {
        await t.step(c.name, () => {
          if (c.skipped) throw new Error(`skipped in the nested host, which has /dev/kvm (${c.file})`);
          if (c.failure !== undefined) throw new Error(`${c.file}: ${c.failure}\n${tail()}`);
        });
      }
      assert.equal(result.code, 0, `the nested run failed without a failed test\n${tail()}`);
    } finally {
      await Deno.remove(out, { recursive: true }).catch(() => {});
    }
  },
});

/**
 * The tests of the files a run's log shows finished, with their outcome: Deno's reporter prints
 * "running N tests from ./FILE" before each file and "NAME ... ok|FAILED|ignored (TIME)" after each test
 * (stderr a test writes may come between the name and its outcome, the name printed again after it). A file
 * followed by another file's header finished; the last one did not. A failure's message is printed only at
 * the end of a run, so a failed test from a frozen run is reported by name.
 */
export function finishedInLog(log: string): { cases: InnerCase[] } {
  const sections = [...log.matchAll(/^running \d+ tests? from (\S+)$/gm)];
  const cases: InnerCase[] = [];
  for (let i = 0; i + 1 < sections.length; i++) {
    const file = sections[i][1];
    const body = log.slice(sections[i].index! + sections[i][0].length, sections[i + 1].index);
    for (const line of body.split("\n")) {
      const m = /^(.*) \.\.\. (ok|FAILED|ignored) \(/.exec(line);
      if (!m) continue;
      const name = m[1].slice(m[1].lastIndexOf("...") + 1).replace(/^\.*/, "").trim();
      if (!KVM_TEST_NAMES.test(name)) continue;
      cases.push({
        name,
        file,
        skipped: m[2] === "ignored",
        failure: m[2] === "FAILED" ? `failed in a run whose nested host then froze (its log says no more)` : undefined,
      });
    }
  }
  return { cases };
}

/** What nested-kvm.sh prints when the nested host's heartbeat stops: the whole nested host is stuck. */
const FROZEN_LINE = /nested-kvm: no heartbeat from the nested host/;
/** From that line to stopping the run: nested-kvm.sh prints the CPU's state then and 5 s later. */
const FROZEN_GRACE_MS = 15_000;

interface NestedRun {
  result: Deno.CommandStatus;
  /** No output for NO_PROGRESS_MS. */
  stalled: boolean;
  /** The run stalled and the nested host itself had stopped (its heartbeat too). */
  frozen: boolean;
  tail: () => string;
}

/**
 * One run of `inner` in the nested host, its output logged to `logPath` as it comes. A run with no output
 * for NO_PROGRESS_MS is stopped, and so is one whose nested host froze (nested-kvm.sh prints the nested
 * host's last heartbeat and CPU registers when the heartbeat is two minutes old: the run is stopped
 * FROZEN_GRACE_MS later; and again when it is stopped).
 */
async function runNested(inner: string[], out: string, cache: string, logPath: string): Promise<NestedRun> {
  const logFile = await Deno.open(logPath, { write: true, create: true, truncate: true });
  const watchdog = new AbortController();
  const child = new Deno.Command("bash", {
    args: [script, "--share", out, "--", ...inner],
    cwd: repo,
    env: { NO_COLOR: "1", DENOVM_CACHE: cache },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.any([AbortSignal.timeout(NESTED_TIMEOUT_MS), watchdog.signal]),
  }).spawn();
  let lastOutput = Date.now();
  let stalled = false;
  let heartbeatLost = false;
  let frozenStop: ReturnType<typeof setTimeout> | undefined;
  const timer = setInterval(() => {
    if (Date.now() - lastOutput > NO_PROGRESS_MS) {
      stalled = true;
      watchdog.abort();
    }
  }, 10_000);
  const lines: string[] = [];
  const pump = async (stream: ReadableStream<Uint8Array>, prefix: string) => {
    for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
      lastOutput = Date.now();
      await logFile.write(new TextEncoder().encode(prefix ? chunk.replace(/^/gm, prefix) : chunk));
      lines.push(...chunk.split("\n"));
      lines.splice(0, Math.max(0, lines.length - 40));
      if (FROZEN_LINE.test(chunk) && !heartbeatLost) {
        // The nested host stopped: nothing more will come. Stop it once nested-kvm.sh has printed its CPU
        // state (now and 5 s later) instead of waiting out NO_PROGRESS_MS.
        heartbeatLost = true;
        frozenStop = setTimeout(() => {
          stalled = true;
          watchdog.abort();
        }, FROZEN_GRACE_MS);
      }
    }
  };
  const [result] = await Promise.all([child.status, pump(child.stdout, ""), pump(child.stderr, "stderr: ")])
    .finally(() => {
      clearInterval(timer);
      clearTimeout(frozenStop);
      logFile.close();
    });
  return {
    result,
    stalled,
    frozen: stalled && heartbeatLost,
    tail: () => `nested run log: ${logPath}; its last lines:\n${lines.join("\n")}`,
  };
}
