// Control-socket round trip: request sent → reply received, in microseconds. The ControlServer runs in a
// Worker (its own event loop, like the VMM's main thread) with a handler that does nothing, so the number is
// the socket + JSON + dispatch cost. Two figures: on one kept-open connection (what the library does), and
// with a fresh connection per request (what each `denovm stop SOCKET`-style command does, minus process
// start-up). The last line is `{"bench":"control-rtt","median_us":...}` (the kept-open median).
//
// Usage: deno run --allow-all bench/control_rtt.ts [--iterations N]

import type { ControlHandler } from "../vmm/control/protocol.ts";

const WORKER_NAME = "denovm-control-rtt-server";

const noop = () => Promise.resolve();
const handler: ControlHandler = {
  stop: noop,
  suspend: noop,
  resume: noop,
  powerButton: noop,
  sleepButton: noop,
  balloonAdjust: noop,
  balloonStats: () => Promise.resolve({ stats: {}, balloon_actual: 0 }),
  balloonWorkingSet: () => Promise.resolve({}),
  diskResize: noop,
  gpuListDisplays: () => Promise.resolve({ displays: {} }),
  gpuAddDisplays: () => Promise.resolve("DisplaysUpdated"),
  gpuRemoveDisplays: () => Promise.resolve("DisplaysUpdated"),
  gpuSetMouseMode: () => Promise.resolve("DisplayMouseModeSet"),
  gpuStats: () => Promise.resolve({}),
  screenshot: noop,
  snapshot: noop,
  sndMuteAll: noop,
};

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

function percentile(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(p * s.length))];
}

const round = (x: number) => Math.round(x * 10) / 10;

async function serveInWorker(): Promise<void> {
  const { ControlServer } = await import("../vmm/control/server.ts");
  const scope = self as unknown as {
    onmessage: ((e: MessageEvent) => void) | null;
    postMessage(m: unknown): void;
    close(): void;
  };
  let server: InstanceType<typeof ControlServer> | undefined;
  scope.onmessage = async (e: MessageEvent) => {
    const msg = e.data as { cmd: string; path?: string };
    if (msg.cmd === "start") {
      server = new ControlServer(msg.path!, handler);
      try {
        await server.listening;
        scope.postMessage({ ok: true });
      } catch (err) {
        scope.postMessage({ ok: false, error: String(err) });
      }
    } else if (msg.cmd === "stop") {
      await server?.close();
      scope.postMessage({ ok: true });
      scope.close();
    }
  };
}

function ask(worker: Worker, msg: unknown): Promise<{ ok: boolean; error?: string }> {
  return new Promise((resolve) => {
    worker.onmessage = (e) => resolve(e.data);
    worker.postMessage(msg);
  });
}

async function main(): Promise<void> {
  const { ControlClient } = await import("../vmm/control/client.ts");
  const i = Deno.args.indexOf("--iterations");
  const iterations = i >= 0 ? Number(Deno.args[i + 1]) : 2000;
  if (!Number.isInteger(iterations) || iterations < 10) throw new Error("--iterations must be an integer >= 10");
  const warmup = Math.min(200, iterations >> 2);

  const dir = await Deno.makeTempDir({ prefix: "denovm-bench-" });
  const path = `${dir}/vm.sock`;
  const worker = new Worker(import.meta.url, { type: "module", name: WORKER_NAME });
  try {
    const started = await ask(worker, { cmd: "start", path });
    if (!started.ok) throw new Error(`control server did not start: ${started.error}`);

    const kept: number[] = [];
    {
      using client = ControlClient.connect(path);
      for (let n = 0; n < warmup + iterations; n++) {
        const t0 = performance.now();
        const reply = await client.request("SuspendVcpus");
        const dt = (performance.now() - t0) * 1000;
        if (reply !== "Ok") throw new Error(`unexpected reply ${JSON.stringify(reply)}`);
        if (n >= warmup) kept.push(dt);
      }
    }

    const fresh: number[] = [];
    const freshCount = Math.max(10, iterations >> 2);
    for (let n = 0; n < warmup + freshCount; n++) {
      const t0 = performance.now();
      using client = ControlClient.connect(path);
      const reply = await client.request("ResumeVcpus");
      const dt = (performance.now() - t0) * 1000;
      if (reply !== "Ok") throw new Error(`unexpected reply ${JSON.stringify(reply)}`);
      if (n >= warmup) fresh.push(dt);
    }

    console.log(
      `control-rtt: kept-open connection: median ${round(median(kept))} us, p90 ${round(percentile(kept, 0.9))} us ` +
        `(${kept.length} requests)`,
    );
    console.log(
      `control-rtt: connection per request: median ${round(median(fresh))} us, p90 ${
        round(percentile(fresh, 0.9))
      } us (${fresh.length} requests)`,
    );
    await ask(worker, { cmd: "stop" });
    console.log(JSON.stringify({
      bench: "control-rtt",
      median_us: round(median(kept)),
      p90_us: round(percentile(kept, 0.9)),
      connect_median_us: round(median(fresh)),
      samples: kept.length,
    }));
  } finally {
    worker.terminate();
    await Deno.remove(dir, { recursive: true });
  }
}

if ((globalThis as { name?: string }).name === WORKER_NAME) {
  await serveInWorker();
} else if (import.meta.main) {
  await main();
}
