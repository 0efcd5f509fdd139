// Two isolates of one process and virglrenderer, whose state is per process. Run as a program (`deno run
// -A virgl_isolates.ts live|dead`), this module starts itself as a Worker that initialises a renderer, then
// tries one on the main isolate, and prints one line per step:
//   live: LIVE-OWNER: refused|initialised ...  while the Worker holds its renderer
//         REINIT-OK                            after the Worker closed it
//   dead: DEAD-OWNER: refused|initialised ...  after the Worker ended without closing it (the main isolate
//                                              has not opened the library before: the Worker's handle was
//                                              the only one)
// or SKIP with the reason when virglrenderer cannot initialise. A renderer that initialises over another
// isolate's may never return from its close: the caller bounds this program with a timeout.

import { VirglBackend } from "../../devices/virtio/gpu/backend_virgl.ts";

/** The Workers' name: each holds a renderer until told to close it. */
const OWNER = "virgl-owner";
/** Time for a terminated Worker's isolate to shut down (and close its library handles). */
const ISOLATE_END_MS = 1000;

type Message = { ready: true } | { unavailable: string } | { closed: true };

/** A renderer on this isolate: what happened, in one line. */
function tryRenderer(): string {
  try {
    const second = new VirglBackend();
    second.close();
    return "initialised over the other isolate's renderer";
  } catch (e) {
    return `refused: ${(e as Error).message}`;
  }
}

if ((globalThis as { name?: string }).name === OWNER) {
  // deno-lint-ignore no-explicit-any
  const self = globalThis as any;
  let backend: VirglBackend | undefined;
  try {
    backend = new VirglBackend();
    self.postMessage({ ready: true } satisfies Message);
  } catch (e) {
    self.postMessage({ unavailable: (e as Error).message } satisfies Message);
  }
  self.onmessage = () => {
    backend?.close();
    self.postMessage({ closed: true } satisfies Message);
  };
} else if (import.meta.main) {
  const mode = Deno.args[0];
  if (mode !== "live" && mode !== "dead") throw new Error("usage: virgl_isolates.ts live|dead");
  const worker = new Worker(import.meta.url, { type: "module", name: OWNER });
  const messages: Message[] = [];
  let wake: (() => void) | undefined;
  worker.onmessage = (e: MessageEvent<Message>) => {
    messages.push(e.data);
    wake?.();
  };
  const next = async (): Promise<Message> => {
    while (messages.length === 0) await new Promise<void>((r) => wake = r);
    return messages.shift()!;
  };
  const first = await next();
  if ("unavailable" in first) {
    console.log(`SKIP virglrenderer unavailable: ${first.unavailable}`);
    worker.terminate();
  } else if (mode === "live") {
    console.log(`LIVE-OWNER: ${tryRenderer()}`);
    worker.postMessage("close");
    await next();
    worker.terminate();
    new VirglBackend().close();
    console.log("REINIT-OK");
  } else {
    worker.terminate();
    await new Promise((r) => setTimeout(r, ISOLATE_END_MS));
    console.log(`DEAD-OWNER: ${tryRenderer()}`);
  }
}
