# shellcheck shell=bash
# What runs guests on this host, for the scripts: sourced by scripts/boot-default.sh and scripts/setup.sh.
#
# host_kind REPO
#   Prints kvm_pvm, kvm_amd, kvm_intel or none, as denovm itself decides it (vmm/kvm/host.ts: the
#   module under /sys/module, and whether the KVM device opens). It runs denovm's own check, so the
#   environment that points denovm at another KVM (DENOVM_KVM_DEVICE, the tests' fake KVM through
#   DENOVM_LIBC) is honoured here too. Without Deno it looks at /dev/kvm and /sys/module itself.

host_kind() {
  local repo="$1"
  if command -v deno >/dev/null; then
    (cd "$repo" && deno eval --quiet \
      'const { hostKind } = await import("./vmm/kvm/host.ts"); console.log(hostKind());' </dev/null)
    return
  fi
  local dev="${DENOVM_KVM_DEVICE:-/dev/kvm}" m
  if [[ ! -r "$dev" || ! -w "$dev" ]]; then
    echo none
    return
  fi
  for m in kvm_pvm kvm_amd kvm_intel; do
    if [[ -d "/sys/module/$m" ]]; then
      echo "$m"
      return
    fi
  done
  echo kvm_pvm
}
