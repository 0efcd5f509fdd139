#!/usr/bin/env bash
# A guest with real Mesa (its virgl Gallium driver) and GL clients, for the vhost-user-gpu test and
# the kmscube benchmark, built once and cached.
#
# Result, in ${DENOVM_CACHE:-<repo>/.cache}/mesa-guest/:
#   root.ext4                    Debian bookworm (debootstrap --variant=minbase) plus kmscube,
#                                mesa-utils (eglinfo), libgl1-mesa-dri, libegl1, libgles2, libgbm1,
#                                glmark2-es2-drm, vulkan-tools (vulkaninfo), mesa-vulkan-drivers,
#                                Mesa's Venus ICD (libvulkan_virtio.so and its virtio_icd.json, the
#                                only files taken from bookworm-backports' mesa-vulkan-drivers: see
#                                VENUS_FILES) and a static busybox; meant to be attached read-only
#                                on virtio-blk
#   initramfs-<kernel>.cpio      busybox, the Debian 6.1 kernel's virtio_mmio, virtio_blk, ext4 and
#                                virtio_gpu modules with their dependencies, and an /init that loads
#                                them, mounts /dev/vda read-only and switch_roots into /sbin/denovm-init
# The directory is printed on stdout as the last line; progress goes to stderr.
#
# In the guest, /sbin/denovm-init mounts proc, sys, devtmpfs and tmpfs (/tmp, /run), prints
# DENOVM-GUEST-START, runs the shell command in the kernel command-line variable denovm_cmd (the
# kernel hands unknown key=value words to init as environment; quote values with spaces:
# denovm_cmd="kmscube -c 60"), prints "DENOVM-GUEST-END status=N" and powers off.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${DENOVM_CACHE:-$repo/.cache}"
out="$cache/mesa-guest"
SUITE=bookworm
# shellcheck source=lib/debmirror.sh
source "$repo/scripts/lib/debmirror.sh"
# The machine's own Debian mirror (its apt sources), deb.debian.org when it has none.
MIRROR="$(debian_mirror)"
PACKAGES=(kmscube mesa-utils libgl1-mesa-dri libegl1 libgles2 libgbm1 glmark2-es2-drm vulkan-tools
  mesa-vulkan-drivers)
# bookworm's mesa-vulkan-drivers (22.3) has no Venus ICD; bookworm-backports' (25.0) has. Installing
# that package would move the whole Mesa stack (the GL driver the other clients use) to 25.0, so only
# the ICD's two files are taken from it; the ICD needs nothing newer than bookworm's libdrm and libc.
# It speaks Venus wire format 1 (virglrenderer 1.0 and later): against bookworm's virglrenderer 0.10.4,
# whose Venus capset says wire format 0, `vulkaninfo` finds no device ("Unsupported wire format version 0").
VENUS_PACKAGE=mesa-vulkan-drivers/$SUITE-backports
VENUS_FILES=(usr/lib/x86_64-linux-gnu/libvulkan_virtio.so usr/share/vulkan/icd.d/virtio_icd.json)
# crc32c_generic: ext4 asks the crypto API for crc32c when it mounts (no depends= names it).
MODULES=(virtio_mmio virtio_blk crc32c_generic ext4 virtio_gpu)
BUSYBOX=/bin/busybox
# Bump when the root's contents or its init change: a stale image is rebuilt.
ROOT_STAMP="v2 $SUITE ${PACKAGES[*]} $VENUS_PACKAGE: ${VENUS_FILES[*]}"
# /dev/console is character device 5:1 (Documentation/admin-guide/devices.txt).
CONSOLE_MAJOR=5
CONSOLE_MINOR=1

log() { echo "mesa-guest: $*" >&2; }
die() {
  echo "mesa-guest: error: $*" >&2
  exit 1
}

[[ "$(id -u)" == 0 ]] || die "debootstrap and the image build need root"
command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 not found (apt-get install e2fsprogs)"
command -v cpio >/dev/null || die "cpio not found (apt-get install cpio)"
[[ -x "$BUSYBOX" ]] || die "$BUSYBOX missing (apt-get install busybox-static)"
mkdir -p "$out"

# ---- The root file system ----
if [[ -s "$out/root.ext4" && "$(cat "$out/root.stamp" 2>/dev/null)" == "$ROOT_STAMP" ]]; then
  log "root.ext4 cached"
else
  command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"
  tree="$out/root.tmp"
  cleanup() {
    umount "$tree/proc" 2>/dev/null || true
    rm -rf "$tree"
  }
  trap cleanup EXIT
  cleanup
  log "debootstrap --variant=minbase $SUITE (about a minute)"
  debootstrap --variant=minbase "$SUITE" "$tree" "$MIRROR" >&2 || die "debootstrap $SUITE from $MIRROR failed"
  mount -t proc proc "$tree/proc"
  log "apt-get install ${PACKAGES[*]}"
  chroot "$tree" /usr/bin/env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    "${PACKAGES[@]}" >&2 || die "apt-get install in the guest root failed"
  echo "deb $MIRROR $SUITE-backports main" >"$tree/etc/apt/sources.list.d/backports.list"
  chroot "$tree" apt-get update >&2 || die "apt-get update ($SUITE-backports) in the guest root failed"
  log "the Venus ICD from $VENUS_PACKAGE"
  mkdir -p "$tree/tmp/venus"
  chroot "$tree" sh -c "cd /tmp/venus && apt-get download $VENUS_PACKAGE" >&2 || die "apt-get download $VENUS_PACKAGE failed"
  dpkg-deb -x "$tree"/tmp/venus/*.deb "$tree/tmp/venus/x" || die "dpkg-deb -x $VENUS_PACKAGE failed"
  for f in "${VENUS_FILES[@]}"; do cp "$tree/tmp/venus/x/$f" "$tree/$f" || die "$VENUS_PACKAGE has no $f"; done
  rm -rf "$tree/tmp/venus" "$tree/etc/apt/sources.list.d/backports.list"
  chroot "$tree" apt-get clean
  umount "$tree/proc"
  rm -rf "$tree"/var/lib/apt/lists/* "$tree"/var/cache/apt/*.bin
  cp "$BUSYBOX" "$tree/bin/busybox"
  cat >"$tree/sbin/denovm-init" <<'EOF'
#!/bin/busybox sh
# denovm's guest init (scripts/mesa-guest.sh): run $denovm_cmd, then power off.
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev 2>/dev/null
$B mount -t tmpfs tmp /tmp
$B mount -t tmpfs run /run
export PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/root XDG_RUNTIME_DIR=/run
echo DENOVM-GUEST-START
/bin/sh -c "${denovm_cmd:-echo no denovm_cmd given}"
echo "DENOVM-GUEST-END status=$?"
$B poweroff -f
EOF
  chmod 755 "$tree/sbin/denovm-init"
  # Size: the tree plus a quarter, at least 64 MiB more (mkfs.ext4 -d needs room for metadata).
  kib=$(du -sk "$tree" | awk '{print $1}')
  size_kib=$((kib + kib / 4 + 65536))
  rm -f "$out/root.ext4.tmp"
  log "mkfs.ext4 -d ($((size_kib / 1024)) MiB)"
  mkfs.ext4 -q -F -L denovm-mesa -d "$tree" "$out/root.ext4.tmp" "${size_kib}k" >&2 || die "mkfs.ext4 failed"
  mv "$out/root.ext4.tmp" "$out/root.ext4"
  echo "$ROOT_STAMP" >"$out/root.stamp"
  cleanup
  trap - EXIT
fi

# ---- The initramfs, for the Debian kernel ----
kdir="$(bash "$repo/scripts/debian-kernel.sh" | tail -n 1)"
kver="$(cat "$kdir/version")"
initrd="$out/initramfs-$kver.cpio"
if [[ -s "$initrd" ]]; then
  log "initramfs-$kver.cpio cached"
else
  moddir="$kdir/root/lib/modules/$kver"
  declare -A seen=()
  order=()
  # Depth first over each module's .modinfo depends= list: dependencies come first.
  add_module() {
    local name="${1//-/_}" path dep
    [[ -n "${seen[$name]:-}" ]] && return 0
    seen[$name]=1
    path="$(find "$moddir/kernel" -name "$name.ko" -o -name "${1//_/-}.ko" | head -n 1)"
    if [[ -z "$path" ]]; then
      grep -qE "/(${name}|${1//_/-})\.ko$" "$moddir/modules.builtin" && return 0
      die "module $name not found in $moddir"
    fi
    # The .modinfo section's NUL-separated "depends=a,b" string (what modinfo -F depends prints).
    for dep in $(tr '\0' '\n' <"$path" | sed -n 's/^depends=//p' | head -n 1 | tr ',' ' '); do add_module "$dep"; done
    order+=("$path")
  }
  for m in "${MODULES[@]}"; do add_module "$m"; done
  stage="$(mktemp -d)"
  mkdir -p "$stage"/{bin,dev,proc,sys,root,lib/modules}
  mknod -m 600 "$stage/dev/console" c "$CONSOLE_MAJOR" "$CONSOLE_MINOR"
  cp "$BUSYBOX" "$stage/bin/busybox"
  insmods=""
  for p in "${order[@]}"; do
    cp "$p" "$stage/lib/modules/"
    b="$(basename "$p")"
    # insmod, unlike modprobe, does not read /proc/cmdline: pass "module.param=value" words on.
    insmods+="insmod /lib/modules/$b \$(params ${b%.ko})"$'\n'
  done
  cat >"$stage/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# The kernel command line's NAME.param=value words for module NAME (dashes read as underscores).
params() {
  for w in \$(cat /proc/cmdline); do
    case "\$w" in "\$(echo \$1 | tr - _)".*=*) echo "\${w#*.}" ;; esac
  done
}
$insmods
# virtio-mmio devices probe asynchronously: wait for the disk.
i=0
while [ ! -b /dev/vda ] && [ \$i -lt 100 ]; do sleep 0.1; i=\$((i + 1)); done
mount -o ro -t ext4 /dev/vda /root || { echo "denovm initramfs: cannot mount /dev/vda"; poweroff -f; }
umount /proc /sys
umount /dev
exec switch_root /root /sbin/denovm-init
EOF
  chmod 755 "$stage/init"
  (cd "$stage" && find . | cpio -o -H newc --quiet) >"$initrd.tmp"
  rm -rf "$stage"
  mv "$initrd.tmp" "$initrd"
  log "initramfs-$kver.cpio: ${order[*]##*/}"
fi
echo "$out"
