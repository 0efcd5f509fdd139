// `denovm run`: build the VM from a VmConfig, run it, and resolve to crosvm's exit code.

import type { VmConfig } from "./config.ts";
import { Machine } from "./machine.ts";

export async function runVm(config: VmConfig): Promise<number> {
  const machine = await Machine.create(config);
  const onSignal = () => void machine.stop();
  Deno.addSignalListener("SIGTERM", onSignal);
  Deno.addSignalListener("SIGINT", onSignal);
  try {
    await machine.startControlSocket();
    const url = await machine.startWebDisplay();
    if (url) console.error(`denovm: web display at ${url}`);
    await machine.start();
    const code = await machine.exitCode;
    const summary = machine.gpuSummary();
    if (summary) console.error(summary);
    return code;
  } finally {
    Deno.removeSignalListener("SIGTERM", onSignal);
    Deno.removeSignalListener("SIGINT", onSignal);
    machine.close();
  }
}
