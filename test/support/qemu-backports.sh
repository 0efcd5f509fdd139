#!/usr/bin/env bash
# Unpack bookworm-backports' QEMU (qemu-system-x86 + qemu-system-data) into DIR/root for tests,
# without touching the host: apt runs with a private configuration (sources, lists and cache all
# under DIR/apt) and the packages are extracted with dpkg-deb -x, never installed.
# Usage: qemu-backports.sh DIR      (DIR is created; DIR/root/usr/bin/qemu-system-x86_64 results)
set -euo pipefail

dir="${1:?usage: qemu-backports.sh DIR}"
case "$dir" in
  /*) ;;
  *) echo "qemu-backports: DIR must be an absolute path" >&2; exit 2 ;;
esac
[[ "$dir" != "/" ]] || { echo "qemu-backports: refusing DIR=/" >&2; exit 2; }

apt="$dir/apt"
mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$dir/dl"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main" \
  >"$apt/sources.list"
cat >"$apt/apt.conf" <<EOF
Dir::Etc::sourcelist "$apt/sources.list";
Dir::Etc::sourceparts "-";
Dir::State::Lists "$apt/lists";
Dir::Cache "$apt/cache";
EOF
# apt fetches as the unprivileged _apt user when it can write the target folders.
chmod -R 0777 "$apt" "$dir/dl"
export APT_CONFIG="$apt/apt.conf"
apt-get update -q >&2
(cd "$dir/dl" && rm -f -- ./*.deb && apt-get download qemu-system-x86 qemu-system-data >&2)
tmp="$dir/root.tmp"
rm -rf -- "$tmp"
mkdir "$tmp"
for deb in "$dir"/dl/*.deb; do dpkg-deb -x "$deb" "$tmp"; done
rm -rf -- "$dir/root"
mv "$tmp" "$dir/root"
"$dir/root/usr/bin/qemu-system-x86_64" --version | head -n 1 >&2
