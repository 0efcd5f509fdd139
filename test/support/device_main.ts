// Runs `denovm device ...` through devices/vhost_user/cli.ts directly, for tests that
// must not depend on main.ts: `deno run -A test/support/device_main.ts block --socket-path S --file IMG`.

import { runDeviceCommand } from "../../devices/vhost_user/cli.ts";

Deno.exit(await runDeviceCommand(Deno.args));
