#!/usr/bin/env bash
# Prepare a Debian 12 (bookworm) host for denovm, idempotently. Run as root (or with sudo).
#
#   1. Debian packages the VMM, its tests and benchmarks use (apt-get, default bookworm sources).
#   2. Deno 2.9.6 from npm, installed globally (never into the checkout: a package.json or
#      node_modules/ in the project root switches Deno to Node-style resolution).
#   3. /usr/local/bin/denovm: runs `deno run --allow-all <checkout>/main.ts "$@"`.
#   4. npm dependencies of deno.json prefetched into Deno's cache.
#   5. The vhost-user back ends' SIGBUS guard (ffi/native/sigbus_guard.c) built with gcc into
#      ${DENOVM_CACHE:-<repo>/.cache}/native (ffi/sigbus_guard.ts builds it at first use otherwise).
#   6. Debian's 6.1 kernel (scripts/debian-kernel.sh) and the default initramfs
#      (scripts/initramfs.sh) under ${DENOVM_CACHE:-<repo>/.cache}.
#   7. Where bookworm's user-mode Linux cannot run (an XSAVE area larger than it handles, e.g.
#      AMX), a newer one from Debian sid under the cache (scripts/uml-sid.sh --if-needed).
#
# Environment: DENOVM_CACHE (cache folder), DENOVM_SKIP_CHROMIUM=1 (leave out chromium,
# which only the web tests need), DENOVM_BIN (where the denovm command goes).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export DENOVM_CACHE="${DENOVM_CACHE:-$repo/.cache}"
DENO_VERSION="2.9.6"
denovm_bin="${DENOVM_BIN:-/usr/local/bin/denovm}"

say() { echo "setup: $*"; }
die() {
  echo "setup: error: $*" >&2
  exit 1
}

sudo=()
if [[ $EUID -ne 0 ]]; then
  command -v sudo >/dev/null || die "run as root (apt-get and npm -g need it)"
  sudo=(sudo -n)
fi
export DEBIAN_FRONTEND=noninteractive

# ---- 1. Debian packages ----
packages=(
  # build the test guests, the C benchmark, and read kernel modules
  gcc binutils make libc6-dev
  # guests and front ends: user-mode Linux, QEMU (TCG reference and vhost-user front end);
  # patchelf points a newer UML at its private libc (scripts/uml-sid.sh)
  user-mode-linux qemu-system-x86 qemu-utils patchelf
  # initramfs, disk images, ACPI table compiler/disassembler
  busybox-static cpio gzip xz-utils zstd e2fsprogs acpica-tools debootstrap
  # networking (tap devices), process tools
  iproute2 procps util-linux
  # virtio-gpu: virglrenderer and Mesa (EGL, software GL drivers)
  libvirglrenderer1 libgl1-mesa-dri libegl-mesa0 libegl1 libgbm1 mesa-vulkan-drivers
  # the GDB stub's test (test/kvm/gdb_test.ts) drives Debian's gdb
  gdb
  ca-certificates
)
[[ "${DENOVM_SKIP_CHROMIUM:-}" == 1 ]] || packages+=(chromium)
# nodejs/npm only when absent: a nodejs from another source already brings its own npm.
command -v node >/dev/null || packages+=(nodejs)
command -v npm >/dev/null || packages+=(npm)

missing=()
for p in "${packages[@]}"; do
  status="$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)"
  [[ "$status" == "install ok installed" ]] || missing+=("$p")
done
if ((${#missing[@]})); then
  mkdir -p "$DENOVM_CACHE"
  apt_log="$DENOVM_CACHE/setup-apt.log"
  say "installing Debian packages: ${missing[*]} (log: $apt_log)"
  if ! { "${sudo[@]}" apt-get update -q && "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"; } \
    </dev/null >"$apt_log" 2>&1; then
    tail -n 20 "$apt_log" >&2
    die "apt-get failed installing: ${missing[*]}"
  fi
  say "installed Debian packages: ${missing[*]}"
else
  say "Debian packages: all ${#packages[@]} present"
fi

# ---- 2. Deno from npm, globally ----
have_deno_version() { command -v deno >/dev/null && [[ "$(deno --version 2>/dev/null | head -n 1)" == "deno $DENO_VERSION "* ]]; }
if have_deno_version; then
  say "deno $DENO_VERSION: present at $(command -v deno)"
else
  # Run npm from a neutral folder so nothing lands in the checkout.
  (cd / && "${sudo[@]}" npm install -g --no-fund --no-audit "deno@$DENO_VERSION" </dev/null) ||
    die "npm install -g deno@$DENO_VERSION failed"
  hash -r
  have_deno_version || die "deno $DENO_VERSION is not on PATH after npm install -g (PATH=$PATH)"
  say "installed deno $DENO_VERSION at $(command -v deno)"
fi
deno_path="$(command -v deno)"

# ---- 3. The denovm command ----
wrapper="#!/bin/sh
# denovm: run the VMM from the checkout at $repo (written by scripts/setup.sh).
exec \"$deno_path\" run --allow-all \"$repo/main.ts\" \"\$@\"
"
if [[ -f "$denovm_bin" && "$(cat "$denovm_bin")" == "${wrapper%$'\n'}" ]]; then
  say "denovm command: present at $denovm_bin"
else
  printf '%s' "$wrapper" | "${sudo[@]}" tee "$denovm_bin" >/dev/null
  "${sudo[@]}" chmod 755 "$denovm_bin"
  say "wrote $denovm_bin"
fi

# ---- 4. npm dependencies into Deno's cache (no node_modules in the checkout) ----
(cd "$repo" && deno install --quiet </dev/null) || die "deno install (prefetching npm dependencies) failed"
[[ ! -e "$repo/node_modules" && ! -e "$repo/package.json" ]] ||
  say "warning: $repo has a node_modules/ or package.json; Deno will resolve Node-style"
say "Deno dependencies cached"

# ---- 5. The SIGBUS guard's shared library ----
guard="$(cd "$repo" && deno run --allow-all ffi/sigbus_guard.ts </dev/null)" || die "building ffi/native/sigbus_guard.c failed"
say "SIGBUS guard: $guard"

# ---- 6. Guest kernel and initramfs ----
kdir="$(bash "$repo/scripts/debian-kernel.sh" </dev/null | tail -n 1)" || die "scripts/debian-kernel.sh failed"
say "kernel $(cat "$kdir/version"): $kdir"
initrd="$(bash "$repo/scripts/initramfs.sh" </dev/null 2>/dev/null | tail -n 1)" || die "scripts/initramfs.sh failed"
say "initramfs: $initrd"

# ---- 7. A user-mode Linux that runs on this host ----
uml_dir="$(bash "$repo/scripts/uml-sid.sh" --if-needed </dev/null | tail -n 1)" || die "scripts/uml-sid.sh failed"
if [[ -n "$uml_dir" ]]; then
  say "user-mode Linux $(cat "$uml_dir/version") from sid: $uml_dir (bookworm's cannot run on this host)"
else
  say "user-mode Linux: the system's /usr/bin/linux.uml"
fi

# shellcheck source=lib/hostkind.sh
source "$repo/scripts/lib/hostkind.sh"
case "$(host_kind "$repo")" in
  none) say "/dev/kvm: missing (tests that need it will be skipped)" ;;
  kvm_pvm) say "/dev/kvm: kvm_pvm (guest kernels cannot run unmodified; Linux boots in the nested KVM host)" ;;
  *) say "/dev/kvm: $(host_kind "$repo")" ;;
esac
