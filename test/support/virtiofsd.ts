// Whether vmm/virtiofsd.ts can start Debian's virtiofsd here (for the tests that need one).

import { SETPRIV_PATH, VIRTIOFSD_PATH } from "../../vmm/virtiofsd.ts";
import { exists } from "./guest_process.ts";

/** Why virtiofsd cannot run here, or undefined when it can. */
export function virtiofsdUnavailable(): string | undefined {
  if (!exists(VIRTIOFSD_PATH)) return `${VIRTIOFSD_PATH} is needed (apt-get install qemu-system-common)`;
  if (!exists(SETPRIV_PATH)) return `${SETPRIV_PATH} is needed (apt-get install util-linux)`;
  if (Deno.uid() !== 0) return "virtiofsd runs as root";
  return undefined;
}
