// The fuzzing campaign: every device model in process (bench/fuzz/devices.ts), a million hostile requests
// each by default. Prints one JSON line {"bench":"fuzz","seed":S,"devices":{"block":{...},...}}; progress,
// rates and each failure (with the seed and the request's index, to replay it) go to stderr.
//
//   deno run --allow-all --v8-flags=--expose-gc bench/fuzz.ts [--requests N] [--seed S] [--devices block,net,...]

import { fuzzDevices } from "./fuzz/devices.ts";
import { result } from "./_common.ts";

function arg(name: string): string | undefined {
  const i = Deno.args.indexOf(name);
  return i >= 0 ? Deno.args[i + 1] : undefined;
}

const seed = Number(arg("--seed") ?? Math.floor(Math.random() * 0x1_0000_0000));
const requestsPerDevice = Number(arg("--requests") ?? 1_000_000);
const devices = arg("--devices")?.split(",");
console.error(`fuzz: seed ${seed}, ${requestsPerDevice} requests per device`);
const res = await fuzzDevices({ requestsPerDevice, seed, devices, log: (l) => console.error(l) });
result("fuzz", { seed, devices: res });
