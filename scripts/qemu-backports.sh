#!/usr/bin/env bash
# QEMU 10 from Debian bookworm-backports, unpacked into its own folder (never installed), for the
# vhost-user-gpu tests and the kmscube benchmark. bookworm's own QEMU 7.2 has no usable
# vhost-user-gpu on the microvm machine with a virgl guest; 10.0 has.
#
# Result, in ${DENOVM_CACHE:-<repo>/.cache}/qemu10/:
#   root/                                   the packages' contents (dpkg-deb -x)
#   root/usr/bin/qemu-system-x86_64         the binary
#   root/usr/lib/x86_64-linux-gnu/qemu/     its modules: run it with QEMU_MODULE_DIR set to this
#   root/usr/share/qemu/                    its firmware (qboot.rom): pass -L with this
# The directory is printed on stdout as the last line; progress goes to stderr.
#
# How: scripts/lib/debpkgs.sh (apt-get with a private configuration whose sources list holds only
# bookworm-backports, its lists and archive cache under the folder) runs `update` and `download` and
# unpacks the packages; the host's apt sources, its package database and its libraries are left
# alone. The backports build links against bookworm's libraries, so no newer host library is needed
# (checked at the end with ldd).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${DENOVM_CACHE:-$repo/.cache}"
out="$cache/qemu10"
root="$out/root"
bin="$root/usr/bin/qemu-system-x86_64"
moddir="$root/usr/lib/x86_64-linux-gnu/qemu"

# qemu-system-x86: the binary; -common: the modules hw-display-virtio-gpu (vhost-user-gpu) and
# more; -data: firmware (qboot.rom); -modules-opengl: ui-opengl, ui-egl-headless, virtio-gpu-gl.
PACKAGES=(qemu-system-x86 qemu-system-common qemu-system-data qemu-system-modules-opengl)
SUITE=bookworm-backports
# shellcheck source=lib/debmirror.sh
source "$repo/scripts/lib/debmirror.sh"
# The machine's own Debian mirror (its apt sources), deb.debian.org when it has none.
MIRROR="$(debian_mirror)"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

log() { echo "qemu-backports: $*" >&2; }
die() {
  echo "qemu-backports: error: $*" >&2
  exit 1
}

if [[ -x "$bin" && -f "$moddir/ui-egl-headless.so" && -f "$moddir/hw-display-virtio-gpu.so" &&
  -f "$root/usr/share/qemu/qboot.rom" && -f "$out/version" ]]; then
  echo "$out"
  exit 0
fi

command -v apt-get >/dev/null || die "apt-get not found (a Debian host is needed)"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found"
[[ -f "$KEYRING" ]] || die "$KEYRING missing (apt-get install debian-archive-keyring)"

# shellcheck source=lib/debpkgs.sh
source "$repo/scripts/lib/debpkgs.sh"
log "apt-get update ($SUITE only from $MIRROR, private lists)"
debpkgs_update "$out" "deb [signed-by=$KEYRING] $MIRROR $SUITE main" || die "apt-get update of $SUITE failed"
debpkgs_download "$out" "${PACKAGES[@]/%//$SUITE}" || die "apt-get download failed"
debpkgs_unpack "$out" "$root" || die "unpacking the packages failed"

[[ -x "$bin" ]] || die "no $bin in the packages"
# Host libraries: every library the binary and the modules we use need must resolve.
for f in "$bin" "$moddir/ui-egl-headless.so" "$moddir/ui-opengl.so" "$moddir/hw-display-virtio-gpu.so" \
  "$moddir/hw-display-virtio-gpu-gl.so"; do
  [[ -f "$f" ]] || die "$f missing from the packages"
  missing="$(ldd "$f" 2>/dev/null | awk '/not found/ {print $1}' | tr '\n' ' ')"
  [[ -z "$missing" ]] || die "$(basename "$f") needs libraries this host lacks: $missing"
done
QEMU_MODULE_DIR="$moddir" "$bin" --version | head -n 1 >"$out/version"
log "$(cat "$out/version")"
echo "$out"
