// The fuzzing campaign: every device model in process (bench/fuzz/devices.ts) and every `denovm device`
// back end behind a hostile vhost-user front end (bench/fuzz/vhost_user.ts), a million requests each by
// default. Prints one JSON line
//   {"bench":"fuzz","seed":S,"devices":{"block":{...},...},"vhost_user":{"block":{...},...}}
// with requests, crashes, hangs, oob and RSS growth per device; progress, rates and each failure (with the
// seed and the request's index, to replay it) go to stderr.
//
//   deno run --allow-all --v8-flags=--expose-gc bench/fuzz.ts [--requests N] [--seed S] [--devices a,b]
//       [--only devices|vhost_user]

import { fuzzDevices } from "./fuzz/devices.ts";
import { fuzzVhostUser } from "./fuzz/vhost_user.ts";
import type { FuzzResult } from "./fuzz/common.ts";
import { result } from "./_common.ts";

function arg(name: string): string | undefined {
  const i = Deno.args.indexOf(name);
  return i >= 0 ? Deno.args[i + 1] : undefined;
}

const seed = Number(arg("--seed") ?? Math.floor(Math.random() * 0x1_0000_0000));
const requestsPerDevice = Number(arg("--requests") ?? 1_000_000);
const devices = arg("--devices")?.split(",");
const only = arg("--only");
const log = (l: string) => console.error(l);
console.error(`fuzz: seed ${seed}, ${requestsPerDevice} requests per device`);
const out: Record<string, unknown> = { seed, requests_per_device: requestsPerDevice };
let inProcess: Record<string, FuzzResult> = {};
let backEnds: Record<string, FuzzResult> = {};
if (only !== "vhost_user") inProcess = out.devices = await fuzzDevices({ requestsPerDevice, seed, devices, log });
if (only !== "devices") backEnds = out.vhost_user = await fuzzVhostUser({ requestsPerDevice, seed, devices, log });
const all = [...Object.values(inProcess), ...Object.values(backEnds)];
out.failures = all.reduce((n, r) => n + r.crashes + r.hangs + r.oob, 0);
result("fuzz", out);
