#!/usr/bin/env bash
# Boot the default guest: Debian's Linux 6.1 with the default initramfs, console on the
# terminal (`denovm run --initrd default.cpio.gz -p console=ttyS0 vmlinux`).
#
# Where the host's KVM cannot run an unmodified kernel in useful time (kvm_pvm: the host is itself a
# VM and its KVM emulates guest kernel code) or there is no KVM at all, say so in one line and boot
# the default guest in a nested KVM host (scripts/nested-kvm.sh: kvm_amd on QEMU TCG's emulated SVM;
# slow but real, about a minute and a half to the shell). With DENOVM_NESTED=off, or without QEMU,
# say so in one line and, on kvm_pvm, boot the built-in test guest boot_info instead (it prints what
# the VMM handed it: command line, e820 map, initrd); without KVM, exit 1.
#
# Extra arguments are passed to `denovm run` before the kernel path.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export DENOVM_CACHE="${DENOVM_CACHE:-$repo/.cache}"

if command -v denovm >/dev/null; then
  denovm=(denovm)
else
  denovm=(deno run --allow-all "$repo/main.ts")
fi

# shellcheck source=lib/hostkind.sh
source "$repo/scripts/lib/hostkind.sh"
kind="$(host_kind "$repo")"

nested_ok() {
  [[ "${DENOVM_NESTED:-}" != off ]] && command -v qemu-system-x86_64 >/dev/null
}

if [[ "$kind" == none ]]; then
  # No KVM at all: run the same boot inside a nested host whose kvm_amd runs on QEMU TCG's
  # emulated SVM (scripts/nested-kvm.sh), unless DENOVM_NESTED=off or QEMU is missing.
  if nested_ok; then
    echo "boot-default: this host has no /dev/kvm; booting the default guest in a nested KVM host under QEMU TCG (scripts/nested-kvm.sh): slow, a minute or two to the shell" >&2
    exec bash "$repo/scripts/nested-kvm.sh" -- bash "$repo/scripts/boot-default.sh" "$@"
  fi
  echo "boot-default: this host has no /dev/kvm, so no VM can run here (a KVM-capable Linux host is needed, or qemu-system-x86 for a nested one)" >&2
  exit 1
fi

if [[ "$kind" == kvm_pvm ]] && nested_ok; then
  # kvm_pvm emulates the kernel's code (minutes, then an instruction its emulator lacks); the nested
  # host's kvm_amd runs it for real, so Linux reaches its shell there in about a minute and a half.
  echo "boot-default: this host's KVM is kvm_pvm (no hardware virtualization), which cannot run an unmodified Linux kernel; booting the default guest in a nested KVM host under QEMU TCG (scripts/nested-kvm.sh): slow, a minute or two to the shell" >&2
  exec bash "$repo/scripts/nested-kvm.sh" -- bash "$repo/scripts/boot-default.sh" "$@"
fi

kdir="$(bash "$repo/scripts/debian-kernel.sh" 2>/dev/null | tail -n 1)"
initrd="$DENOVM_CACHE/initramfs/default.cpio.gz"
[[ -s "$initrd" ]] || initrd="$(bash "$repo/scripts/initramfs.sh" 2>/dev/null | tail -n 1)"

if [[ "$kind" == kvm_pvm ]]; then
  if [[ "${DENOVM_NESTED:-}" == off ]]; then
    why="DENOVM_NESTED=off"
  else
    why="qemu-system-x86_64 is not installed for a nested host"
  fi
  echo "boot-default: this host's KVM is kvm_pvm (no hardware virtualization), which cannot run an unmodified Linux kernel, and $why; booting the built-in test guest boot_info instead" >&2
  # test/guests/build.ts builds the freestanding test guests with gcc into the cache.
  guest="$(cd "$repo" && deno eval --quiet '
    const { buildGuest } = await import("./test/guests/build.ts");
    const built = await buildGuest("boot_info");
    console.log(typeof built === "string" ? built : built.path);
  ' </dev/null | tail -n 1)"
  [[ -s "$guest" ]] || {
    echo "boot-default: could not build the boot_info test guest" >&2
    exit 1
  }
  exec "${denovm[@]}" run --initrd "$initrd" -p "denovm.default=boot_info" "$@" "$guest"
fi

exec "${denovm[@]}" run --initrd "$initrd" "$@" "$kdir/vmlinux"
