// Whether the tests that boot a nested KVM host (scripts/nested-kvm.sh) run: yes, unless
// DENOVM_NESTED_TESTS=0 (they take about ten minutes of one core).

/** Why the nested-host tests are off, or undefined when they run. */
export function nestedTestsOff(): string | undefined {
  return Deno.env.get("DENOVM_NESTED_TESTS") === "0"
    ? "DENOVM_NESTED_TESTS=0 turns the nested KVM tests off"
    : undefined;
}
