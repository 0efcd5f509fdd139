#!/usr/bin/env bash
# A newer user-mode Linux (Debian sid's user-mode-linux) unpacked into its own folder (never
# installed), for hosts where bookworm's UML 6.1 (/usr/bin/linux.uml) cannot run user processes.
#
# Why: UML saves and restores its processes' FPU state with ptrace(PTRACE_GETREGSET/SETREGSET,
# NT_X86_XSTATE) through a buffer of a size fixed when UML was built. The host kernel takes a
# SETREGSET only with its whole user XSAVE area; on a host with AMX tile data that area is
# 11008 bytes, larger than UML 6.1's buffer (and trixie's UML 6.12's), so the first register
# restore fails with EFAULT: UML prints "ptrace set fp regs failed, errno = 14" and init dies.
# The UML in sid (7.x) sizes the buffer from the host and runs there.
#
# Usage: uml-sid.sh [--if-needed]
#   --if-needed  boot the system's UML once first; prepare the newer one only when that boot
#                fails with "ptrace set fp regs failed" (prints nothing on stdout otherwise).
#
# Result, in ${DENOVM_CACHE:-<repo>/.cache}/uml-sid/:
#   root/                               the packages' contents (dpkg-deb -x)
#   root/usr/bin/linux.uml              the UML kernel, its ELF interpreter and library path set
#                                       (patchelf) to the loader and libc under root/
#   root/usr/lib/uml/modules/VERSION/   its modules
#   version                             the UML kernel version (linux.uml --version)
# The directory is printed on stdout as the last line; progress goes to stderr.
# test/support/uml.ts uses this UML when the folder is there, and the system's otherwise.
#
# How: scripts/lib/debpkgs.sh (apt-get with a private configuration whose sources list holds only sid
# and trixie, its lists and archive cache under the folder, removed once the packages are unpacked)
# runs `update` and `download` and unpacks the packages; the host's apt sources, package database and
# libraries are left alone.
# sid's linux.uml is linked against a newer glibc than bookworm's, so the libc6 package (trixie's
# when new enough, else sid's) is unpacked beside it and the binary is pointed at that loader and
# library folder; nothing outside the folder uses them.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${DENOVM_CACHE:-$repo/.cache}"
out="$cache/uml-sid"
root="$out/root"
bin="$root/usr/bin/linux.uml"
libdir="$root/usr/lib/x86_64-linux-gnu"
SYSTEM_UML=/usr/bin/linux.uml
BUSYBOX=/usr/bin/busybox
# shellcheck source=lib/debmirror.sh
source "$repo/scripts/lib/debmirror.sh"
# The machine's own Debian mirror (its apt sources), deb.debian.org when it has none.
MIRROR="$(debian_mirror)"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
# Where the UML comes from, and where the libc comes from when its version is new enough.
UML_SUITE=sid
LIBC_SUITE=trixie
# The message UML prints when the host refuses its FPU register buffer.
FP_REGS_FAILURE="ptrace set fp regs failed"

log() { echo "uml-sid: $*" >&2; }
die() {
  echo "uml-sid: error: $*" >&2
  exit 1
}

if_needed=0
case "${1:-}" in
  "") ;;
  --if-needed) if_needed=1 ;;
  *) die "usage: $0 [--if-needed]" ;;
esac

prepared() {
  [[ -x "$bin" && -s "$out/version" && -d "$root/usr/lib/uml/modules/$(cat "$out/version")" ]] &&
    [[ "$("$bin" --version 2>/dev/null)" == "$(cat "$out/version")" ]]
}

if prepared; then
  echo "$out"
  exit 0
fi

# Boot the system's UML on a busybox initramfs whose /init prints a marker and powers off.
# Prints "ok", "fp-regs" (the failure above) or "other: ..." (anything else).
probe_system_uml() {
  local tmp status output
  tmp="$(mktemp -d)"
  mkdir -p "$tmp/root/bin"
  cp "$BUSYBOX" "$tmp/root/bin/busybox"
  printf '#!/bin/busybox sh\n/bin/busybox echo UML-PROBE-OK\n/bin/busybox poweroff -f\n' >"$tmp/root/init"
  chmod 755 "$tmp/root/init"
  (cd "$tmp/root" && find . | cpio -o -H newc --quiet >"$tmp/initrd.cpio")
  status=0
  output="$(TMPDIR="$tmp" timeout -s KILL 60 "$SYSTEM_UML" mem=64M "initrd=$tmp/initrd.cpio" \
    con=null con0=fd:0,fd:1 quiet </dev/null 2>&1)" || status=$?
  rm -rf "$tmp"
  if [[ "$output" == *UML-PROBE-OK* ]]; then
    echo ok
  elif [[ "$output" == *"$FP_REGS_FAILURE"* ]]; then
    echo fp-regs
  else
    echo "other: exit status $status: $(tail -n 3 <<<"$output" | tr '\n' ' ')"
  fi
}

if ((if_needed)); then
  if [[ ! -x "$SYSTEM_UML" || ! -x "$BUSYBOX" ]] || ! command -v cpio >/dev/null; then
    log "$SYSTEM_UML, $BUSYBOX or cpio missing: not probing, nothing prepared"
    exit 0
  fi
  verdict="$(probe_system_uml)"
  case "$verdict" in
    ok)
      log "$SYSTEM_UML runs here: the newer UML is not needed"
      exit 0
      ;;
    fp-regs) log "$SYSTEM_UML fails here ($FP_REGS_FAILURE): preparing UML from $UML_SUITE" ;;
    *)
      log "$SYSTEM_UML did not boot the probe ($verdict); not a known host limit, nothing prepared"
      exit 0
      ;;
  esac
fi

command -v apt-get >/dev/null || die "apt-get not found (a Debian host is needed)"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found"
command -v patchelf >/dev/null || die "patchelf not found (apt-get install patchelf)"
[[ -f "$KEYRING" ]] || die "$KEYRING missing (apt-get install debian-archive-keyring)"

# shellcheck source=lib/debpkgs.sh
source "$repo/scripts/lib/debpkgs.sh"
log "apt-get update ($UML_SUITE and $LIBC_SUITE only from $MIRROR, private lists)"
debpkgs_update "$out" "deb [signed-by=$KEYRING] $MIRROR $UML_SUITE main" \
  "deb [signed-by=$KEYRING] $MIRROR $LIBC_SUITE main" || die "apt-get update of $UML_SUITE/$LIBC_SUITE failed"

# The libc version the UML package asks for ("libc6 (>= 2.38)"), and a libc6 that satisfies it.
uml_depends="$(apt-cache "${DEBPKGS_APT_OPTS[@]}" show "user-mode-linux/$UML_SUITE" | awk -F': ' '/^Depends:/ {print $2; exit}')"
need_libc="$(sed -n 's/.*libc6 (>= \([^)]*\)).*/\1/p' <<<"$uml_depends")"
libc_suite="$LIBC_SUITE"
libc_version="$(apt-cache "${DEBPKGS_APT_OPTS[@]}" show "libc6/$LIBC_SUITE" | awk -F': ' '/^Version:/ {print $2; exit}')"
if [[ -n "$need_libc" ]] && ! dpkg --compare-versions "$libc_version" ge "$need_libc"; then
  log "$LIBC_SUITE's libc6 $libc_version is older than the $need_libc user-mode-linux needs: using $UML_SUITE's"
  libc_suite="$UML_SUITE"
fi

debpkgs_download "$out" "user-mode-linux/$UML_SUITE" "libc6/$libc_suite" || die "apt-get download failed"
debpkgs_unpack "$out" "$root" || die "unpacking the packages failed"
rm -rf "$out/dl" "$out/apt"

[[ -x "$bin" ]] || die "no $bin in the packages"
[[ -x "$libdir/ld-linux-x86-64.so.2" && -f "$libdir/libc.so.6" ]] || die "no loader or libc under $libdir"
# Absolute paths: the binary runs only from this folder (prepared() notices when it moved).
patchelf --set-interpreter "$libdir/ld-linux-x86-64.so.2" --set-rpath "$libdir" "$bin" ||
  die "patchelf failed on $bin"
version="$("$bin" --version 2>&1)" || die "$bin --version failed: $version"
[[ -d "$root/usr/lib/uml/modules/$version" ]] || die "no modules for $version under $root/usr/lib/uml/modules"
echo "$version" >"$out/version"
log "user-mode Linux $version ready (libc6 from $libc_suite)"
echo "$out"
