// KVM integration tests of the control socket (`-s/--socket`, vmm/control/server.ts) with denovm's freestanding
// test guests (test/guests/): the ticker guest prints "TICK n" ten times a second so a test sees time pass
// (and stop passing while the VM is suspended); the powerbtn guest powers off when the ACPI power button's
// interrupt (the GED's SCI, vmm/arch/acpi.ts) arrives. The control commands are run the way users run them:
// `denovm suspend|resume|stop|powerbtn|balloon|balloon_stats SOCKET` in another process (main.ts).
//
// Every VM test needs /dev/kvm and is ignored without it. One test always runs: it builds the two
// guests, checks their ELF files load with the VMM's loader, and disassembles them.

import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { buildGuest } from "../guests/build.ts";
import {
  IRQ_ACPI_SCI,
  IRQ_ACPI_SLEEP_BUTTON,
  KERNEL_START,
  MiB,
  MMIO_HOLE_START,
  ramRanges,
} from "../../vmm/arch/layout.ts";
import { BALLOON_STAT_NAMES, MAX_REQUEST_BYTES, REPLY_OK } from "../../vmm/control/protocol.ts";
import { ControlClient, errorOfReply } from "../../vmm/control/client.ts";
import { connectSeqpacket, UnixStream } from "../../core/unix_socket.ts";
import { loadKernel } from "../../vmm/arch/boot/kernel.ts";
import { OwnedGuestMemory } from "../../core/memory.ts";
import { EXIT_HOST_ERROR, EXIT_SUCCESS } from "../../core/exit.ts";
import { type BootConfig, Vm } from "../../mod.ts";
import { within as withinMs } from "../support/within.ts";
import { withTempDir } from "../support/temp_dir.ts";
import { assertCliOk, denovm, denovmArgs, REPO_ROOT } from "../support/cli.ts";

const kvmAvailable = existsSync("/dev/kvm");
if (!kvmAvailable) console.log("kvm_control_test: control socket tests with a guest skipped: no /dev/kvm");

/** Hang protection only: no assertion depends on how fast anything is. */
const GUEST_TIMEOUT_MS = 120_000;
/** How long a suspended VM is watched for console output (the ticker prints every 100 ms of guest time). */
const SUSPENDED_WATCH_MS = 500;
/** A socket file is removed by the control server's close(), which runs just after the exit code settles. */
const SOCKET_REMOVAL_TIMEOUT_MS = 5_000;
/** Permissions of the control socket file: only its owner may connect (0600). */
const SOCKET_MODE = 0o600;
/** A TICK line as the ticker guest prints it (the UART console turns "\n" into "\r\n"). */
const TICK_LINE = /^TICK (\d+)\r?\n/m;

const within = <T>(p: Promise<T>, what: () => string): Promise<T> => withinMs(p, what, GUEST_TIMEOUT_MS);

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

async function boot(guest: string, opts: Omit<BootConfig, "kernel">): Promise<Vm> {
  const kernel = await buildGuest(guest);
  return await Vm.boot({ kernel, debugExit: true, params: [], memMiB: 64, cpus: 1, ...opts });
}

/** Vm.boot serves config.socket: the file is there, a socket, mode 0600. */
async function assertSocketServed(path: string): Promise<void> {
  const st = await Deno.lstat(path);
  assert.ok(st.isSocket, `${path} is a socket`);
  assert.equal(st.mode! & 0o777, SOCKET_MODE, `${path} mode 0${(st.mode! & 0o777).toString(8)}`);
}

/** Waits (bounded) until the VM's control socket file is gone. */
async function assertSocketRemoved(path: string): Promise<void> {
  const deadline = Date.now() + SOCKET_REMOVAL_TIMEOUT_MS;
  while (existsSync(path)) {
    assert.ok(Date.now() < deadline, `control socket ${path} still exists after the VM ended`);
    await sleep(20);
  }
}

/** The highest TICK number in `text` (0 if none). */
function lastTick(text: string): number {
  let n = 0;
  for (const m of text.matchAll(new RegExp(TICK_LINE.source, "gm"))) n = Math.max(n, Number(m[1]));
  return n;
}

/** Waits for a complete TICK line printed after console offset `from`; returns its number. */
async function nextTick(vm: Vm, from: number): Promise<number> {
  const m = await vm.console.waitFor(TICK_LINE, { from, timeout: GUEST_TIMEOUT_MS });
  return Number(m[1]);
}

/** The names of this file's temporary directories start so. */
const TEMP_PREFIX = "denovm-ctl-test-";

Deno.test({
  name: "kvm control: suspend stops time, resume restarts it, bad requests get errors, `denovm stop` ends the VM",
  ignore: !kvmAvailable,
  async fn() {
    await withTempDir(TEMP_PREFIX, async (dir) => {
      const sock = `${dir}/vm.sock`;
      await using vm = await boot("ticker", { socket: sock });
      await assertSocketServed(sock);
      await vm.console.waitFor(/^TICK 3\r?\n/m, { timeout: GUEST_TIMEOUT_MS });

      // Suspend from another process: once its "Ok" arrived every vCPU is parked, so nothing more is printed.
      assertCliOk(await denovm("suspend", sock), "denovm suspend");
      const frozenAt = vm.console.text.length;
      const before = lastTick(vm.console.text);
      await sleep(SUSPENDED_WATCH_MS);
      assert.equal(
        vm.console.text.slice(frozenAt),
        "",
        `the guest printed while suspended (last TICK before: ${before})`,
      );

      assertCliOk(await denovm("resume", sock), "denovm resume");
      const after = await nextTick(vm, frozenAt);
      assert.ok(after > before, `TICK ${after} after resume, TICK ${before} before suspend`);

      // Malformed and oversized requests on one connection: each gets an error reply, the connection
      // stays usable, and the VM keeps running.
      {
        using client = ControlClient.connect(sock);
        const enc = (s: string) => new TextEncoder().encode(s);
        const cases: [string, Uint8Array | unknown, RegExp][] = [
          ["truncated JSON", enc('{"BalloonCommand":'), /malformed request/],
          ["not UTF-8", new Uint8Array([0xff, 0xfe, 0x22]), /malformed request/],
          ["oversized", new Uint8Array(MAX_REQUEST_BYTES + 4096).fill(0x20), /too large/],
          ["unknown request", "Frobnicate", /unsupported request "Frobnicate"/],
          ["two keys", { Exit: null, Powerbtn: null }, /one-key object/],
          ["negative size", { BalloonCommand: { Adjust: { num_bytes: -1, wait_for_success: false } } }, /num_bytes/],
          ["unit with data", { Exit: 1 }, /takes no data/],
        ];
        for (const [what, req, expected] of cases) {
          const reply = req instanceof Uint8Array ? await client.requestRaw(req) : await client.request(req);
          const err = errorOfReply(reply);
          assert.ok(err !== undefined, `${what}: expected an error reply, got ${JSON.stringify(reply)}`);
          assert.match(err, expected, what);
        }
        const stats = await client.request({ BalloonCommand: "Stats" });
        assert.ok(stats && typeof stats === "object" && "BalloonStats" in stats, JSON.stringify(stats));
      }
      // Several clients at once, and one that hangs up before its reply: the others are answered.
      {
        const quitter = new UnixStream(connectSeqpacket(sock));
        await quitter.send(new TextEncoder().encode(JSON.stringify({ BalloonCommand: "Stats" })));
        quitter.close();
        const clients = Array.from({ length: 5 }, () => ControlClient.connect(sock));
        try {
          const replies = await Promise.all(clients.map((c) => c.request({ BalloonCommand: "Stats" })));
          for (const r of replies) assert.ok(r && typeof r === "object" && "BalloonStats" in r, JSON.stringify(r));
        } finally {
          clients.forEach((c) => c.close());
        }
      }
      const mark = vm.console.text.length;
      const stillTicking = await nextTick(vm, mark);
      assert.ok(stillTicking > after, `still ticking after the bad requests (TICK ${stillTicking})`);

      // Stop from another process: exit code 0, and it was the host's stop, not the guest.
      assertCliOk(await denovm("stop", sock), "denovm stop");
      assert.equal(await within(vm.exitCode, () => "VM did not stop after `denovm stop`"), EXIT_SUCCESS);
      assert.match(vm.exitReason, /stopped by the host/);
      await assertSocketRemoved(sock);
      // Nobody answers there any more.
      const gone = await denovm("stop", sock);
      assert.equal(gone.code, EXIT_HOST_ERROR, gone.stderr);
      assert.match(gone.stderr, /cannot reach the VM/);
    });
  },
});

Deno.test({
  name: "kvm control: `denovm powerbtn` raises the GED's SCI, the guest sees it and powers off (exit 0)",
  ignore: !kvmAvailable,
  async fn() {
    await withTempDir(TEMP_PREFIX, async (dir) => {
      const sock = `${dir}/vm.sock`;
      await using vm = await boot("powerbtn", { socket: sock });
      await assertSocketServed(sock);
      const ready = await vm.console.waitFor(/^READY (.*)\r?\n/m, { timeout: GUEST_TIMEOUT_MS });
      // The guest found the SCI in the FADT and its pin, level trigger and active-high polarity in the MADT.
      assert.match(ready[1], new RegExp(`^sci=${IRQ_ACPI_SCI} pin=${IRQ_ACPI_SCI} level=1 active_low=0 `));
      assert.ok(!vm.console.text.includes("POWERBTN"), "no power button event before the press");

      assertCliOk(await denovm("powerbtn", sock), "denovm powerbtn");
      await vm.console.waitFor(/^POWERBTN\r?\n/m, { timeout: GUEST_TIMEOUT_MS });
      assert.equal(await within(vm.exitCode, () => "VM did not power off"), EXIT_SUCCESS, vm.console.text);
      assert.match(vm.exitReason, /ACPI S5/, "the guest powered itself off");
      await assertSocketRemoved(sock);
    });
  },
});

Deno.test({
  name: "kvm control: `denovm sleepbtn` raises the GED's second interrupt, the guest sees each press and runs on",
  ignore: !kvmAvailable,
  async fn() {
    await withTempDir(TEMP_PREFIX, async (dir) => {
      // -s DIR: the socket is crosvm-<pid>.sock inside the directory (this process's pid: the VM runs here).
      await using vm = await boot("powerbtn", { socket: dir });
      const sock = `${dir}/crosvm-${Deno.pid}.sock`;
      await assertSocketServed(sock);
      const ready = await vm.console.waitFor(/^READY (.*)\r?\n/m, { timeout: GUEST_TIMEOUT_MS });
      // No MADT override for the sleep button's ISA IRQ: its identity pin, edge-triggered.
      assert.match(ready[1], new RegExp(` slpbtn_pin=${IRQ_ACPI_SLEEP_BUTTON} slpbtn_level=0$`));
      assertCliOk(await denovm("sleepbtn", sock), "denovm sleepbtn");
      await vm.console.waitFor(/^SLEEPBTN 1\r?\n/m, { timeout: GUEST_TIMEOUT_MS });
      assertCliOk(await denovm("sleepbtn", sock), "denovm sleepbtn");
      await vm.console.waitFor(/^SLEEPBTN 2\r?\n/m, { timeout: GUEST_TIMEOUT_MS });
      assert.ok(!vm.console.text.includes("POWERBTN"), "the sleep button is not the power button");
      assertCliOk(await denovm("powerbtn", sock), "denovm powerbtn");
      assert.equal(await within(vm.exitCode, () => "VM did not power off"), EXIT_SUCCESS, vm.console.text);
      await assertSocketRemoved(sock);
    });
  },
});

Deno.test({
  name: "kvm control: `suspend --full` stops time and devices, plain resume is refused, `resume --full` restarts it",
  ignore: !kvmAvailable,
  async fn() {
    await withTempDir(TEMP_PREFIX, async (dir) => {
      const sock = `${dir}/vm.sock`;
      await using vm = await boot("ticker", { socket: sock, balloon: true });
      await vm.console.waitFor(/^TICK 2\r?\n/m, { timeout: GUEST_TIMEOUT_MS });
      assertCliOk(await denovm("suspend", sock, "--full"), "denovm suspend --full");
      const frozenAt = vm.console.text.length;
      await sleep(SUSPENDED_WATCH_MS);
      assert.equal(vm.console.text.slice(frozenAt), "", "the guest printed while fully suspended");
      // crosvm refuses to run the vCPUs against sleeping devices.
      const plain = await denovm("resume", sock);
      assert.equal(plain.code, EXIT_HOST_ERROR, plain.stderr);
      assert.match(plain.stderr, /devices are suspended.*resume --full/);
      assert.equal(vm.console.text.slice(frozenAt), "");
      assertCliOk(await denovm("resume", "--full", sock), "denovm resume --full");
      const after = await nextTick(vm, frozenAt);
      assert.ok(after > 2, `TICK ${after} after resume --full`);
      // The guest has no balloon driver: --wait cannot be answered, so it is refused at once instead of hanging.
      const wait = await denovm("balloon", "4096", sock, "--wait");
      assert.equal(wait.code, EXIT_HOST_ERROR, wait.stderr);
      assert.match(wait.stderr, /balloon driver is not running/);
      const ws = await denovm("balloon_ws", sock);
      assert.equal(ws.code, EXIT_HOST_ERROR, ws.stderr);
      assert.match(ws.stderr, /^denovm: balloon_ws: not available: .*VIRTIO_BALLOON_F_WS_REPORTING/);
      assertCliOk(await denovm("stop", sock), "denovm stop");
      assert.equal(await within(vm.exitCode, () => "VM did not stop"), EXIT_SUCCESS);
      await assertSocketRemoved(sock);
    });
  },
});

Deno.test({
  name: "kvm control: vm.powerButton() from the library does the same",
  ignore: !kvmAvailable,
  async fn() {
    await using vm = await boot("powerbtn", {});
    await vm.console.waitFor(/^READY /m, { timeout: GUEST_TIMEOUT_MS });
    vm.powerButton();
    await vm.console.waitFor(/^POWERBTN\r?\n/m, { timeout: GUEST_TIMEOUT_MS });
    assert.equal(await within(vm.exitCode, () => "VM did not power off"), EXIT_SUCCESS, vm.console.text);
    assert.match(vm.exitReason, /ACPI S5/);
  },
});

Deno.test({
  name: "kvm control: `denovm balloon` is accepted and `denovm balloon_stats` answers crosvm's JSON",
  ignore: !kvmAvailable,
  async fn() {
    // The freestanding guest has no balloon driver: the target is accepted and stored, but nothing
    // inflates, so balloon_actual stays 0 and the guest reports no statistics (every stat null). The
    // guest side (the driver inflating, memory given back, stats filled in) is proven with a real
    // Linux guest in the UML balloon test.
    await withTempDir(TEMP_PREFIX, async (dir) => {
      const sock = `${dir}/vm.sock`;
      await using vm = await boot("ticker", { socket: sock, balloon: true });
      await assertSocketServed(sock);
      await vm.console.waitFor(/^TICK 1\r?\n/m, { timeout: GUEST_TIMEOUT_MS });

      const set = await denovm("balloon", "4096", sock);
      assertCliOk(set, "denovm balloon 4096");
      assert.equal(set.stdout, "", "a command answered Ok prints nothing (as crosvm)");
      {
        using client = ControlClient.connect(sock);
        const reply = await client.request({
          BalloonCommand: { Adjust: { num_bytes: 8192, wait_for_success: false } },
        });
        assert.equal(reply, REPLY_OK);
      }

      const statsRun = await denovm("balloon_stats", sock);
      assertCliOk(statsRun, "denovm balloon_stats");
      const json = JSON.parse(statsRun.stdout);
      assert.deepEqual(Object.keys(json), ["BalloonStats"]);
      assert.deepEqual(Object.keys(json.BalloonStats).sort(), ["balloon_actual", "stats"]);
      assert.equal(json.BalloonStats.balloon_actual, 0);
      assert.deepEqual(Object.keys(json.BalloonStats.stats).sort(), [...BALLOON_STAT_NAMES].sort());
      for (const [k, v] of Object.entries(json.BalloonStats.stats)) assert.equal(v, null, `${k}: no driver, no stats`);

      // The VM kept running through it all.
      const tick = await nextTick(vm, vm.console.text.length);
      assert.ok(tick > 1);
      assertCliOk(await denovm("stop", sock), "denovm stop");
      assert.equal(await within(vm.exitCode, () => "VM did not stop"), EXIT_SUCCESS);
      await assertSocketRemoved(sock);
    });
  },
});

Deno.test({
  name: "kvm control: without a balloon device, balloon requests get an error reply and the VM keeps running",
  ignore: !kvmAvailable,
  async fn() {
    await withTempDir(TEMP_PREFIX, async (dir) => {
      const sock = `${dir}/vm.sock`;
      await using vm = await boot("ticker", { socket: sock, balloon: false });
      await vm.console.waitFor(/^TICK 1\r?\n/m, { timeout: GUEST_TIMEOUT_MS });
      for (const args of [["balloon", "4096"], ["balloon_stats"]]) {
        const r = await denovm(...args, sock);
        assert.equal(r.code, EXIT_HOST_ERROR, `${args[0]}: ${r.stdout}${r.stderr}`);
        assert.match(r.stderr, /no balloon device/);
      }
      await nextTick(vm, vm.console.text.length);
      assert.equal(await vm.stop(), EXIT_SUCCESS);
      await assertSocketRemoved(sock);
    });
  },
});

/** The `crosvm-<pid>.sock` files in `dir`. */
function crosvmSockets(dir: string): string[] {
  return [...Deno.readDirSync(dir)].map((e) => e.name).filter((n) => /^crosvm-\d+\.sock$/.test(n));
}

Deno.test({
  name: "kvm control: `denovm run -s DIR`: crosvm-<pid>.sock is served there and gone once the process ends, however",
  ignore: !kvmAvailable,
  async fn() {
    await withTempDir(TEMP_PREFIX, async (dir) => {
      // The guest ends the VM itself: a crash (triple fault), a reset, a panic. The exit code is not asserted
      // (it depends on --extended-status); the process has ended when output() resolves, and the file must be gone.
      for (const guest of ["triple", "reset", "panic"]) {
        const kernel = await buildGuest(guest);
        const out = await within(
          new Deno.Command(Deno.execPath(), {
            args: denovmArgs(["run", "--mem", "64", "--cpus", "1", "-s", dir, kernel]),
            cwd: REPO_ROOT,
            stdin: "null",
            stdout: "null",
            stderr: "piped",
          }).output(),
          () => `denovm run -s DIR (${guest}) did not exit`,
        );
        assert.notEqual(out.code, EXIT_HOST_ERROR, `${guest}: ${new TextDecoder().decode(out.stderr)}`);
        assert.deepEqual(crosvmSockets(dir), [], `${guest}: the socket is left after the VM ended`);
      }
      // SIGTERM to a running VM.
      const child = new Deno.Command(Deno.execPath(), {
        args: denovmArgs(["run", "--mem", "64", "--cpus", "1", "-s", dir, await buildGuest("ticker")]),
        cwd: REPO_ROOT,
        stdin: "null",
        stdout: "null",
        stderr: "null",
      }).spawn();
      const sock = `${dir}/crosvm-${child.pid}.sock`;
      const deadline = Date.now() + GUEST_TIMEOUT_MS;
      while (!existsSync(sock)) {
        assert.ok(Date.now() < deadline, `${sock} never appeared`);
        await sleep(20);
      }
      assertCliOk(await denovm("suspend", sock), "the socket in the directory answers");
      child.kill("SIGTERM");
      await within(child.status, () => "denovm run did not end on SIGTERM");
      assert.deepEqual(crosvmSockets(dir), [], "the socket is left after SIGTERM");
    });
  },
});

// ---- Always runs: the guests build, load with the VMM's loader, and use no unemulated instructions ----

/** Instructions that must stay out of the test guests (test/kvm/boot_test.ts). */
const FORBIDDEN = /\b(cmpxchg16b|xsave\w*|xrstor\w*|fxsave\w*|fxrstor\w*|int3)\b|%[xyz]mm\d+|\(bad\)/;
/** ELF identification and Elf64_Ehdr fields (System V ABI): e_type at 0x10, e_machine 0x12, e_entry 0x18. */
const ELF_MAGIC = [0x7f, 0x45, 0x4c, 0x46];
const EI_CLASS = 4;
const ELFCLASS64 = 2;
const E_TYPE = 0x10;
const E_MACHINE = 0x12;
const E_ENTRY = 0x18;
const ET_EXEC = 2;
const EM_X86_64 = 62;

Deno.test("control test guests (ticker, powerbtn) build, load at KERNEL_START, and disassemble cleanly", async () => {
  for (const name of ["ticker", "powerbtn"]) {
    const path = await buildGuest(name);
    const image = await Deno.readFile(path);
    const dv = new DataView(image.buffer, image.byteOffset, image.byteLength);
    assert.deepEqual([...image.subarray(0, 4)], ELF_MAGIC, `${name}: ELF magic`);
    assert.equal(image[EI_CLASS], ELFCLASS64, `${name}: ELFCLASS64`);
    assert.equal(dv.getUint16(E_TYPE, true), ET_EXEC, `${name}: ET_EXEC`);
    assert.equal(dv.getUint16(E_MACHINE, true), EM_X86_64, `${name}: EM_X86_64`);
    assert.equal(Number(dv.getBigUint64(E_ENTRY, true)), KERNEL_START, `${name}: _start at KERNEL_START`);

    using mem = OwnedGuestMemory.allocate(ramRanges(64 * MiB));
    const info = loadKernel(mem, image);
    assert.equal(info.kind, "elf");
    assert.equal(info.entry, KERNEL_START);
    assert.ok(info.loadEnd <= MMIO_HOLE_START);

    const out = await new Deno.Command("objdump", { args: ["-d", "--no-show-raw-insn", path], stdout: "piped" })
      .output();
    assert.ok(out.success, `objdump -d ${path}`);
    const asm = new TextDecoder().decode(out.stdout);
    assert.deepEqual(asm.split("\n").filter((l) => FORBIDDEN.test(l)), [], `${name}: instructions the emulator lacks`);
    assert.match(asm, /<_start>:/);
    assert.match(asm, /<guest_main>:/);
    // The guests really halt between interrupts (the ticker must not spin while idle).
    assert.match(asm, /<guest_main>:[\s\S]*?\bsti\b\s*\n[^\n]*\bhlt\b/, `${name}: "sti; hlt" idle loop`);
  }
});
