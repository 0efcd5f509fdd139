// The web display's HTTP side (http.ts): peer addresses, the token comparison.

import assert from "node:assert/strict";
import { isLoopback } from "./http.ts";

Deno.test("web display: isLoopback knows this machine's addresses from others", () => {
  for (const h of ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "::ffff:127.0.0.1"]) assert.ok(isLoopback(h), h);
  for (const h of ["10.0.0.1", "192.168.1.2", "::", "fe80::1", "128.0.0.1", "::ffff:10.0.0.1", "localhost"]) {
    assert.ok(!isLoopback(h), h);
  }
});
