// A trace of virtio-gpu commands in the Chrome trace-event format (JSON array form), which Perfetto and
// chrome://tracing open: one complete event ("ph":"X") per command with ts/dur in microseconds and
// args {resource, bytes, ctx}, and one per display-path copy (a scanout read back, bytes sent to a display
// client; category "display", one track per scanout, args {resource, bytes, scanout}), and one per fenced
// command's wait from its answer to its fence's retirement (category "fence", its own track, args {ctx,
// fence}). Events are buffered and appended to the file; close() ends the array (a trace cut short without
// "]" still loads: the array form allows it).

const FLUSH_EVENTS = 256;

export interface TraceEvent {
  /** Command type name (protocol.ts COMMAND_NAMES). */
  name: string;
  /** Start, microseconds since the trace began. */
  ts: number;
  /** Duration in microseconds. */
  dur: number;
  resource: number;
  bytes: number;
  ctx: number;
  /** Response type when it was an error. */
  error?: string;
  /** A display-path copy of this scanout (category "display", its own track), not a command. */
  scanout?: number;
  /** A fenced command's wait for this fence, from its answer to the fence's retirement (its own track). */
  fence?: bigint;
}

/** The track (tid) of the display path's copies: scanout n on DISPLAY_TID_BASE + n. */
export const DISPLAY_TID_BASE = 100;
/** The track of fence waits. */
export const FENCE_TID = 2;

export class GpuTrace {
  readonly path: string;
  #file: Deno.FsFile | null;
  #pending: string[] = [];
  #first = true;
  readonly #enc = new TextEncoder();
  readonly #origin = performance.now();
  /** Events written so far. */
  events = 0;

  constructor(path: string) {
    this.path = path;
    this.#file = Deno.openSync(path, { write: true, create: true, truncate: true });
    this.#write("[\n");
    this.#write(
      JSON.stringify({ name: "process_name", ph: "M", pid: 1, tid: 1, args: { name: "denovm virtio-gpu" } }),
    );
    this.#first = false;
  }

  /** Microseconds since the trace began (what `ts` is measured in). */
  now(): number {
    return (performance.now() - this.#origin) * 1000;
  }

  add(e: TraceEvent): void {
    if (!this.#file) return;
    const args: Record<string, number | string> = { resource: e.resource, bytes: e.bytes, ctx: e.ctx };
    if (e.error) args.error = e.error;
    const display = e.scanout !== undefined;
    if (display) args.scanout = e.scanout!;
    if (e.fence !== undefined) args.fence = Number(e.fence);
    const ev = {
      name: e.name,
      cat: display ? "display" : e.fence !== undefined ? "fence" : "virtio-gpu",
      ph: "X",
      ts: Math.round(e.ts * 1000) / 1000,
      dur: Math.round(e.dur * 1000) / 1000,
      pid: 1,
      tid: display ? DISPLAY_TID_BASE + e.scanout! : e.fence !== undefined ? FENCE_TID : 1,
      args,
    };
    this.#pending.push(JSON.stringify(ev));
    this.events++;
    if (this.#pending.length >= FLUSH_EVENTS) this.flush();
  }

  flush(): void {
    if (!this.#file || this.#pending.length === 0) return;
    const text = (this.#first ? "" : ",\n") + this.#pending.join(",\n");
    this.#pending = [];
    this.#write(text);
  }

  close(): void {
    if (!this.#file) return;
    this.flush();
    this.#write("\n]\n");
    this.#file.close();
    this.#file = null;
  }

  #write(s: string): void {
    const b = this.#enc.encode(s);
    let off = 0;
    while (off < b.length) off += this.#file!.writeSync(b.subarray(off));
  }
}
