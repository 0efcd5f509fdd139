// virtio-balloon over vhost-user against the real Linux driver in user-mode Linux: the host sets a
// target through `denovm device balloon --control-socket`, the back end tells UML
// (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG), UML's virtio_balloon inflates (its MemFree drops and it
// writes `actual`), the back end releases the pages (madvise), then the host sets the target back
// to 0 and the balloon deflates. The guest reports statistics on the stats queue.

import assert from "node:assert/strict";
import { buildInitramfs, UmlMachine, umlUnavailableReason } from "../support/uml.ts";
import { DeviceProcess, JsonLineClient } from "../support/qemu.ts";
import { BALLOON_PAGE_SIZE } from "../../devices/virtio/balloon.ts";
import { VIRTIO_ID_BALLOON } from "../../devices/virtio/device.ts";

const reason = umlUnavailableReason();
if (reason) console.log(`skipping user-mode Linux balloon test: ${reason}`);

const MiB = 1024 * 1024;
const UML_MEM_MIB = 128;
const TARGET_BYTES = 32 * MiB;
/** How long the guest waits for each phase before giving up (its loops sleep 0.2 s). */
const GUEST_PHASE_TRIES = 300;

/** Poll `f` until it returns a value, at most `tries` times 100 ms apart. */
async function poll<T>(what: string, tries: number, f: () => Promise<T | undefined>): Promise<T> {
  for (let i = 0; i < tries; i++) {
    const v = await f();
    if (v !== undefined) return v;
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.fail(`gave up waiting for ${what}`);
}

Deno.test({
  name: "UML virtio_balloon over vhost-user: the host's target inflates the balloon, pages are released, " +
    "target 0 deflates it, and the guest's statistics arrive",
  ignore: reason !== undefined,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "denovm-balloon-" });
    const socket = `${dir}/balloon.sock`;
    const control = `${dir}/balloon.ctl`;
    const backend = await DeviceProcess.start("balloon", ["--socket-path", socket, "--control-socket", control]);
    const targetKiB = TARGET_BYTES / 1024;
    // The guest prints MemFree, then waits until the balloon took (most of) the target, then until
    // it gave it back. Balloon pages leave MemFree (with DEFLATE_ON_OOM they stay in MemTotal).
    const memfree = "$(sed -n 's/^MemFree: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo)";
    const initramfs = await buildInitramfs({
      modules: ["virtio_balloon"],
      commands:
        `n=0; while [ ! -e /sys/bus/virtio/drivers/virtio_balloon/virtio0 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
ls /sys/bus/virtio/drivers/virtio_balloon/
start=${memfree}
echo "BALLOON-READY memfree=$start"
n=0; while [ $((start - ${memfree})) -lt $((${targetKiB} * 9 / 10)) ] && [ $n -lt ${GUEST_PHASE_TRIES} ]; do sleep 0.2; n=$((n+1)); done
echo "BALLOON-INFLATED memfree=${memfree}"
n=0; while [ $((start - ${memfree})) -gt $((${targetKiB} / 4)) ] && [ $n -lt ${GUEST_PHASE_TRIES} ]; do sleep 0.2; n=$((n+1)); done
echo "BALLOON-DEFLATED memfree=${memfree}"
sleep 1`,
    });
    let client: JsonLineClient | undefined;
    try {
      const uml = await UmlMachine.start({
        initramfs,
        memMiB: UML_MEM_MIB,
        vhostUser: [{ socket, deviceId: VIRTIO_ID_BALLOON }],
      });
      await uml.waitFor(/BALLOON-READY memfree=\d+/);
      const start = Number(uml.output.match(/BALLOON-READY memfree=(\d+)/)![1]);
      client = await JsonLineClient.connect(control);
      const c = client;
      const set = await c.call({ target: TARGET_BYTES });
      assert.equal(set.ok, true);
      assert.equal(set.target_pages, TARGET_BYTES / BALLOON_PAGE_SIZE);

      // The driver reports what it holds in config `actual`.
      const inflated = await poll("actual to reach the target", 600, async () => {
        const q = await c.call({ query: true });
        return q.actual_pages === TARGET_BYTES / BALLOON_PAGE_SIZE ? q : undefined;
      });
      const s = inflated.stats as Record<string, number>;
      assert.ok(s.inflatedPages >= TARGET_BYTES / BALLOON_PAGE_SIZE, `inflated pages: ${JSON.stringify(s)}`);
      assert.equal(s.releasedBytes, s.inflatedPages * BALLOON_PAGE_SIZE, "every inflated page was released");
      assert.equal(s.badPfns, 0);
      assert.equal(s.madviseErrors, 0);
      await uml.waitFor(/BALLOON-INFLATED memfree=\d+/);
      const during = Number(uml.output.match(/BALLOON-INFLATED memfree=(\d+)/)![1]);
      assert.ok(start - during >= (TARGET_BYTES / 1024) * 0.9, `MemFree ${start} -> ${during} kB`);

      // Fresh statistics from the guest (the stats queue).
      const st = await c.call({ stats: true });
      assert.equal(st.ok, true);
      assert.equal(st.fresh, true, `the guest answered the stats request: ${JSON.stringify(st)}`);
      const guest = st.guest as Record<string, number>;
      assert.ok(guest["total-memory"] > 0 && guest["total-memory"] <= UML_MEM_MIB * MiB, JSON.stringify(guest));
      assert.ok(guest["free-memory"] > 0 && guest["free-memory"] < guest["total-memory"]);

      // Deflate.
      assert.equal((await c.call({ target: 0 })).target_pages, 0);
      const deflated = await poll("actual to drop to 0", 600, async () => {
        const q = await c.call({ query: true });
        return q.actual_pages === 0 ? q : undefined;
      });
      assert.ok((deflated.stats as Record<string, number>).deflatedPages >= TARGET_BYTES / BALLOON_PAGE_SIZE);
      await uml.waitFor(/BALLOON-DEFLATED memfree=\d+/);
      const after = Number(uml.output.match(/BALLOON-DEFLATED memfree=(\d+)/)![1]);
      assert.ok(start - after < TARGET_BYTES / 1024 / 4, `MemFree back: ${start} -> ${after} kB`);
      const r = await uml.wait();
      assert.equal(r.commandStatus, 0, `guest commands failed:\n${r.output}\n${backend.stderr}`);
    } finally {
      client?.close();
      const status = await backend.stop();
      assert.equal(status.code, 0, `the back end exits cleanly on SIGTERM: ${backend.stderr}`);
      await Deno.remove(initramfs).catch(() => {});
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});
