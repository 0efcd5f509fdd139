#!/usr/bin/env bash
# A kernel and ALSA's tools for the sound test guest (test/qemu/sound_test.ts), fetched once and cached.
#
# The kernel: bookworm's Linux 6.1 (scripts/debian-kernel.sh) is built without the virtio sound driver
# (its config has "# CONFIG_SND_VIRTIO is not set"), so this takes bookworm-backports' newest amd64 image
# (6.12 has CONFIG_SND_VIRTIO=m), of which only the bzImage, the sound and virtio module folders and
# modules.builtin are unpacked; its modules ship xz-compressed and are decompressed (busybox's insmod takes
# plain .ko files).
# ALSA: bookworm's alsa-utils (aplay, arecord), the libasound2 they link, libasound2-data (alsa.conf,
# which libasound reads before it opens a device) and the libc6 they run on, so the guest's programs do
# not depend on the host's libraries.
#
# Result, in ${DENOVM_CACHE:-<repo>/.cache}/sound-guest/:
#   kernel/vmlinuz, kernel/version (the release, e.g. 6.12.95+deb12-amd64)
#   kernel/root/lib/modules/<release>/{kernel/sound,kernel/drivers/virtio,modules.builtin}
#   alsa/usr/bin/aplay, alsa/usr/bin/arecord, alsa/lib/x86_64-linux-gnu/, alsa/usr/lib/x86_64-linux-gnu/,
#   alsa/usr/share/alsa/
# The directory is printed on stdout as the last line; progress goes to stderr.
#
# How: scripts/lib/debpkgs.sh (apt-get with a private configuration whose sources list holds only
# bookworm and bookworm-backports main, its lists and archive cache under the folder): `update`,
# `download`, then `dpkg-deb -x` (ALSA) and `dpkg-deb --fsys-tarfile | tar` (the kernel's parts).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${DENOVM_CACHE:-$repo/.cache}"
out="$cache/sound-guest"
ALSA_PACKAGES=(alsa-utils libasound2 libasound2-data libc6)
# Bump when what is unpacked changes: a stale folder is rebuilt.
STAMP="v1 bookworm ${ALSA_PACKAGES[*]} bookworm-backports linux-image-*-amd64-unsigned"
# shellcheck source=lib/debmirror.sh
source "$repo/scripts/lib/debmirror.sh"
MIRROR="$(debian_mirror)"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

log() { echo "sound-guest: $*" >&2; }
die() {
  echo "sound-guest: error: $*" >&2
  exit 1
}

if [[ -s "$out/kernel/vmlinuz" && -x "$out/alsa/usr/bin/aplay" && "$(cat "$out/stamp" 2>/dev/null)" == "$STAMP" ]]; then
  echo "$out"
  exit 0
fi

for tool in apt-get apt-cache dpkg-deb tar xz; do
  command -v "$tool" >/dev/null || die "$tool not found (a Debian host with xz-utils is needed)"
done
[[ -f "$KEYRING" ]] || die "$KEYRING missing (apt-get install debian-archive-keyring)"

# shellcheck source=lib/debpkgs.sh
source "$repo/scripts/lib/debpkgs.sh"
log "apt-get update (bookworm and bookworm-backports from $MIRROR, private lists)"
debpkgs_update "$out" \
  "deb [signed-by=$KEYRING] $MIRROR bookworm main" \
  "deb [signed-by=$KEYRING] $MIRROR bookworm-backports main" || die "apt-get update failed"

# The newest backports image, e.g. linux-image-6.12.95+deb12-amd64-unsigned (the signed one is the same
# kernel wrapped for Secure Boot).
kpkg="$(apt-cache "${DEBPKGS_APT_OPTS[@]}" search --names-only '^linux-image-[0-9.]+\+deb12-amd64-unsigned$' |
  awk '{print $1}' | sort -V | tail -n 1)"
[[ -n "$kpkg" ]] || die "no linux-image-*+deb12-amd64-unsigned package in bookworm-backports"
release="${kpkg#linux-image-}"
release="${release%-unsigned}"
log "kernel $kpkg (release $release)"

debpkgs_download "$out" "${ALSA_PACKAGES[@]/%//bookworm}" "$kpkg/bookworm-backports" || die "apt-get download failed"
kdeb="$(ls "$out"/dl/linux-image-*.deb | head -n 1)"

# ALSA: every package but the kernel, unpacked whole.
rm -rf "$out/alsa.tmp" "$out/kernel.tmp"
mkdir -p "$out/alsa.tmp" "$out/kernel.tmp/root"
for deb in "$out"/dl/*.deb; do
  [[ "$deb" == "$kdeb" ]] && continue
  log "unpacking $(basename "$deb")"
  dpkg-deb -x "$deb" "$out/alsa.tmp" || die "dpkg-deb -x failed on $deb"
done
for f in usr/bin/aplay usr/bin/arecord usr/share/alsa/alsa.conf usr/lib/x86_64-linux-gnu/libasound.so.2 \
  lib/x86_64-linux-gnu/libc.so.6 lib/x86_64-linux-gnu/libm.so.6 lib/x86_64-linux-gnu/ld-linux-x86-64.so.2; do
  [[ -e "$out/alsa.tmp/$f" ]] || die "$f missing from the ALSA packages"
done

# The kernel: its bzImage, the sound and virtio modules, modules.builtin.
moddir="lib/modules/$release"
log "unpacking the bzImage and the sound and virtio modules of $(basename "$kdeb")"
dpkg-deb --fsys-tarfile "$kdeb" | tar -x -C "$out/kernel.tmp/root" --wildcards \
  "./boot/vmlinuz-$release" "./$moddir/kernel/sound/*" "./$moddir/kernel/drivers/virtio/*" \
  "./$moddir/modules.builtin" || die "unpacking $kdeb failed"
find "$out/kernel.tmp/root/$moddir" -name '*.ko.xz' -exec xz -d {} + || die "decompressing the modules failed"
[[ -f "$out/kernel.tmp/root/$moddir/kernel/sound/virtio/virtio_snd.ko" ]] || die "$kpkg has no virtio_snd module"
mv "$out/kernel.tmp/root/boot/vmlinuz-$release" "$out/kernel.tmp/vmlinuz"
echo "$release" >"$out/kernel.tmp/version"

rm -rf "$out/alsa" "$out/kernel" "$out"/dl/*.deb
mv "$out/alsa.tmp" "$out/alsa"
mv "$out/kernel.tmp" "$out/kernel"
echo "$STAMP" >"$out/stamp"
log "ready: kernel $release, ${ALSA_PACKAGES[*]}"
echo "$out"
