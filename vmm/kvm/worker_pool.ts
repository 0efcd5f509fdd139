// The process's idle vCPU Workers. Creating a Worker costs the main thread tens of milliseconds (Deno builds a
// runtime for it) and the Worker tens more to load vcpu_worker.ts; a Worker whose vCPU ended normally waits
// for its next start message instead (vcpu_worker.ts), so the next vCPU of this process (a second VM, a
// restored clone) takes it ready.
//
// What goes back: a Worker whose vCPU reported a normal end (stopped, shutdown, reset, debug exit: its run
// mapping is already gone and it waits for a start), and a Worker that was taken but never given a vCPU.
// What never does: a Worker whose vCPU crashed (a triple fault, a KVM error, an exception in its loop), one
// whose error event fired, one terminated because it did not leave KVM_RUN in time. Vcpu decides
// (vmm/kvm/vcpu.ts); the pool terminates a Worker whose error event fires while it is idle.
//
// An idle Worker must not keep the process alive: a Deno Worker holds the event loop open while it exists,
// whatever its onmessage. The web Worker has no public unref, but Deno's runtime keys a reference count on
// Worker.prototype with a symbol that has no description (its node:worker_threads `unref()` calls it). The
// pool uses it when it is there (exactly one such method); without it the pool keeps no Worker idle (every
// release terminates), so a script that ends its VMs still exits. vmm/kvm/worker_pool_test.ts runs such a
// script as a subprocess and checks both that it exits and that Workers were reused.

import { WORKER_PING, WORKER_WAITING } from "./vcpu_channel.ts";

/**
 * How many Workers stay idle at most. Each idle Worker is a thread and a V8 isolate holding about 13 MiB of
 * resident memory with vcpu_worker.ts loaded, so 8 of them cost about 100 MiB. Eight covers what the pool is
 * for: a test rig restoring small clones (one or two vCPUs) several at a time, or one clone of up to 8 vCPUs,
 * without creating a Worker; a bigger burst creates the rest as before, and what ends beyond 8 is terminated.
 */
export const IDLE_VCPU_WORKERS_MAX = 8;

/** What the pool has done in this process, for tests and the curious. */
export interface VcpuWorkerPoolStats {
  /** Idle Workers now (each a thread waiting for a start message). */
  idle: number;
  /** Workers created (new Worker) since the process started. */
  created: number;
  /** Times takeVcpuWorker() handed out an idle Worker instead of creating one. */
  reused: number;
  /** Whether idle Workers can be kept at all (Deno's Worker reference hook was found). */
  enabled: boolean;
}

/** Deno's private Worker reference count: `worker[hook](false)` stops it holding the event loop open. */
const refHook: symbol | undefined = (() => {
  const proto = Worker.prototype as unknown as Record<symbol, unknown>;
  const found = Object.getOwnPropertySymbols(proto).filter((s) => !s.description && typeof proto[s] === "function");
  return found.length === 1 ? found[0] : undefined;
})();

/** Idle Workers, the most recently idle last (taken first: its thread and caches are the warmest). */
const idle: Worker[] = [];
/** Idle Workers that have said they wait for a start (WORKER_WAITING), as opposed to still loading. */
const waiting = new WeakSet<Worker>();
/** Workers whose reference count the pool has dropped. */
const unreferenced = new WeakSet<Worker>();
/** prewarmVcpuWorkers() waits per idle Worker still loading: resolved once it waits, is taken or is dropped. */
const settlers = new Map<Worker, (() => void)[]>();
let created = 0;
let reused = 0;

function spawn(): Worker {
  created++;
  return new Worker(new URL("./vcpu_worker.ts", import.meta.url), { type: "module" });
}

function setReferenced(worker: Worker, referenced: boolean): void {
  if (!refHook || unreferenced.has(worker) !== referenced) return;
  (worker as unknown as Record<symbol, (ref: boolean) => void>)[refHook](referenced);
  if (referenced) unreferenced.delete(worker);
  else unreferenced.add(worker);
}

function settle(worker: Worker): void {
  for (const resolve of settlers.get(worker) ?? []) resolve();
  settlers.delete(worker);
}

/** Resolves once `worker` waits for a start or leaves the idle list. */
function settled(worker: Worker): Promise<void> {
  if (waiting.has(worker) || !idle.includes(worker)) return Promise.resolve();
  return new Promise((resolve) => settlers.set(worker, [...settlers.get(worker) ?? [], resolve]));
}

/** Take `worker` out of the idle list; false if it was not there. */
function unlist(worker: Worker): boolean {
  const i = idle.indexOf(worker);
  if (i < 0) return false;
  idle.splice(i, 1);
  worker.onmessage = null;
  worker.onerror = null;
  settle(worker);
  return true;
}

/**
 * Put `worker` in the idle list and ask it to say when it waits for a start. It stays referenced (holding the
 * event loop open) until it answers: a Worker still loading, or still leaving a vCPU, finishes that first.
 */
function list(worker: Worker): void {
  worker.onmessage = (e: MessageEvent<unknown>) => {
    if (e.data !== WORKER_WAITING) return;
    waiting.add(worker);
    setReferenced(worker, false);
    settle(worker);
  };
  worker.onerror = (e) => {
    e.preventDefault();
    unlist(worker);
    worker.terminate();
  };
  idle.push(worker);
  worker.postMessage(WORKER_PING);
}

/**
 * A Worker for a vCPU: an idle one (one that already waits for a start first), else a new one, still loading.
 * Give it its vCPU with a VcpuStartMessage (Vcpu does); give it back with releaseVcpuWorker.
 */
export function takeVcpuWorker(): Worker {
  let i = idle.findLastIndex((w) => waiting.has(w));
  if (i < 0) i = idle.length - 1;
  if (i < 0) return spawn();
  const worker = idle[i];
  unlist(worker);
  waiting.delete(worker);
  setReferenced(worker, true);
  reused++;
  return worker;
}

/**
 * Give back a Worker whose vCPU ended normally (it reported its end and waits for the next start), or one
 * taken and never started. Kept idle while fewer than IDLE_VCPU_WORKERS_MAX are; terminated otherwise.
 * Never give back a Worker whose vCPU crashed, whose error event fired, or that was terminated.
 */
export function releaseVcpuWorker(worker: Worker): void {
  if (idle.includes(worker)) return;
  if (refHook && idle.length < IDLE_VCPU_WORKERS_MAX) list(worker);
  else worker.terminate();
}

/**
 * Fill the pool up to `count` idle Workers (at most IDLE_VCPU_WORKERS_MAX), ahead of a restore, so its vCPUs
 * take Workers that have loaded. Resolves when every idle Worker waits for a start (or has been taken).
 */
export async function prewarmVcpuWorkers(count: number): Promise<void> {
  if (!Number.isInteger(count) || count < 0) throw new RangeError(`prewarmVcpuWorkers: bad count ${count}`);
  const target = refHook ? Math.min(count, IDLE_VCPU_WORKERS_MAX) : 0;
  while (idle.length < target) {
    list(spawn());
    // Creating a Worker blocks this thread for a while: let the event loop run between them.
    await new Promise((r) => setTimeout(r, 0));
  }
  await Promise.all(idle.map(settled));
}

/** Terminate every idle Worker; returns how many. Their threads end shortly after. */
export function closeIdleVcpuWorkers(): number {
  const all = [...idle];
  for (const w of all) {
    unlist(w);
    w.terminate();
  }
  return all.length;
}

export function vcpuWorkerPoolStats(): VcpuWorkerPoolStats {
  return { idle: idle.length, created, reused, enabled: refHook !== undefined };
}
