#!/usr/bin/env bash
# Fetch Debian bookworm's Linux 6.1 amd64 kernel for denovm's tests, idempotently.
#
# Result, in ${DENOVM_CACHE:-<repo>/.cache}/debian-kernel/:
#   root/      the package contents (dpkg-deb -x)
#   vmlinuz    the bzImage
#   vmlinux    the uncompressed ELF kernel, pulled out of the bzImage
#   version    the kernel release string (e.g. 6.1.0-54-amd64)
# The directory is printed on stdout as the last line; progress goes to stderr.
#
# The bzImage layout used to find the compressed kernel is Linux's boot protocol
# (Documentation/arch/x86/boot.rst): setup_sects at 0x1f1, the "HdrS" magic at 0x202,
# the protocol version at 0x206, payload_offset at 0x248 and payload_length at 0x24c
# (protocol 2.08+); the payload starts payload_offset bytes into the protected-mode
# code, which begins at (setup_sects + 1) * 512 (setup_sects 0 means 4). The last 4
# bytes of the payload are the uncompressed size, little endian (arch/x86/boot/compressed
# appends it), which is checked against what the decompressor produced.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${DENOVM_CACHE:-$repo/.cache}"
out="$cache/debian-kernel"

log() { echo "debian-kernel: $*" >&2; }
die() {
  echo "debian-kernel: error: $*" >&2
  exit 1
}

# Little-endian unsigned integer of $3 bytes at offset $2 of file $1.
le_uint() {
  local bytes
  bytes=$(od -An -tu1 -j "$2" -N "$3" "$1" | tr -s ' \n' ' ')
  local v=0 shift=0 b
  for b in $bytes; do
    v=$((v | (b << shift)))
    shift=$((shift + 8))
  done
  echo "$v"
}

# Already done? Every artifact present and the ELF magic in place.
if [[ -s "$out/vmlinuz" && -s "$out/vmlinux" && -s "$out/version" && -d "$out/root" ]] &&
  [[ "$(od -An -tx1 -N 4 "$out/vmlinux" | tr -d ' \n')" == "7f454c46" ]]; then
  echo "$out"
  exit 0
fi

command -v apt-get >/dev/null || die "apt-get not found (a Debian host is needed)"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found"

# Pick the newest plain amd64 6.1 image: "linux-image-6.1.0-N-amd64" (signed) or "...-unsigned".
find_pkg() {
  apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64(-unsigned)?$' 2>/dev/null |
    awk '{print $1}' | sort -V | tail -n 1
}
pkg="$(find_pkg)"
if [[ -z "$pkg" ]]; then
  log "no linux-image-6.1 package known; running apt-get update"
  apt-get update >&2 || die "apt-get update failed"
  pkg="$(find_pkg)"
fi
[[ -n "$pkg" ]] || die "no linux-image-6.1.0-*-amd64 package in the apt lists (is bookworm configured?)"
release="${pkg#linux-image-}"
release="${release%-unsigned}"
log "using $pkg (kernel $release)"

mkdir -p "$out"
work="$(mktemp -d "$out/.work.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# apt-get download fetches as the unprivileged _apt user when it can write the target folder.
chmod 0777 "$work"

(cd "$work" && apt-get download "$pkg" >&2) || die "apt-get download $pkg failed"
deb="$(ls "$work"/*.deb 2>/dev/null | head -n 1)"
[[ -n "$deb" ]] || die "apt-get download left no .deb"
mkdir -p "$work/root"
dpkg-deb -x "$deb" "$work/root" || die "dpkg-deb -x failed on $deb"
vmlinuz="$work/root/boot/vmlinuz-$release"
[[ -s "$vmlinuz" ]] || die "package $pkg has no boot/vmlinuz-$release"

# ---- Pull the ELF vmlinux out of the bzImage ----
magic="$(od -An -c -j $((0x202)) -N 4 "$vmlinuz" | tr -d ' \n')"
[[ "$magic" == "HdrS" ]] || die "$vmlinuz is not a bzImage (no HdrS at 0x202)"
version=$(le_uint "$vmlinuz" $((0x206)) 2)
((version >= 0x208)) || die "boot protocol $(printf '%x' "$version") predates payload_offset (2.08)"
setup_sects=$(le_uint "$vmlinuz" $((0x1f1)) 1)
((setup_sects == 0)) && setup_sects=4
payload_offset=$(le_uint "$vmlinuz" $((0x248)) 4)
payload_length=$(le_uint "$vmlinuz" $((0x24c)) 4)
start=$(((setup_sects + 1) * 512 + payload_offset))
log "compressed payload: $payload_length bytes at offset $start"
dd if="$vmlinuz" of="$work/payload" bs=64K iflag=skip_bytes,count_bytes skip="$start" count="$payload_length" status=none
[[ $(stat -c %s "$work/payload") -eq $payload_length ]] || die "bzImage truncated: payload runs past the file"
expect_size=$(le_uint "$work/payload" $((payload_length - 4)) 4)

# Identify the compressor by its stream magic and decompress with the host tool. The
# decompressors may complain about the 4-byte size trailer; the result is checked below.
head4="$(od -An -tx1 -N 6 "$work/payload" | tr -d ' \n')"
case "$head4" in
  1f8b*) tool=(gzip -dc) ;;
  fd377a585a00) tool=(xz -dc --single-stream) ;;
  28b52ffd*) tool=(zstd -dcq) ;;
  425a68*) tool=(bzip2 -dc) ;;
  5d0000*) tool=(xz -dc --format=lzma) ;;
  02214c18*) tool=(lz4 -dc) ;;
  894c5a4f*) tool=(lzop -dc) ;;
  *) die "unknown compression (payload starts with $head4)" ;;
esac
command -v "${tool[0]}" >/dev/null || die "${tool[0]} is needed to decompress the kernel"
log "decompressing with ${tool[*]}"
"${tool[@]}" <"$work/payload" >"$work/vmlinux" 2>"$work/decompress.log" || true
got_size=$(stat -c %s "$work/vmlinux")
[[ "$(od -An -tx1 -N 4 "$work/vmlinux" | tr -d ' \n')" == "7f454c46" ]] ||
  die "decompressed payload is not ELF: $(head -c 300 "$work/decompress.log")"
[[ $got_size -eq $expect_size ]] || die "vmlinux is $got_size bytes, the bzImage says $expect_size"

# ---- Move into place ----
rm -rf "$out/root" "$out/vmlinuz" "$out/vmlinux" "$out/version"
cp "$vmlinuz" "$out/vmlinuz"
mv "$work/vmlinux" "$out/vmlinux"
mv "$work/root" "$out/root"
echo "$release" >"$out/version"
log "ready in $out"
echo "$out"
