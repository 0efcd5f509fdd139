# shellcheck shell=bash
# Debian packages downloaded and unpacked into a folder of the cache, never installed, sourced by
# scripts/qemu-backports.sh and scripts/uml-sid.sh. apt-get runs with a private configuration (its own
# sources list, lists and archive cache under the folder); the host's apt sources, its package database
# and its libraries are left alone. Progress goes to stderr through the caller's `log` function.
#
# debpkgs_update DIR LINE...
#   Writes the sources list DIR/apt/sources.list holding only the lines LINE... ("deb [...] MIRROR
#   SUITE main", MIRROR from debian_mirror in scripts/lib/debmirror.sh), sets the array
#   DEBPKGS_APT_OPTS (the options that make apt-get and apt-cache use it) and runs `apt-get update`.
# debpkgs_download DIR PKG...
#   Downloads PKG... (name/suite) into DIR/dl, replacing the packages an earlier run left there.
# debpkgs_unpack DIR ROOT
#   Replaces the folder ROOT with the contents of every package in DIR/dl (dpkg-deb -x).
# Each returns 1 when a step fails.

debpkgs_update() {
  local dir="$1"
  shift
  local apt_dir="$dir/apt"
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$dir/dl" || return 1
  printf '%s\n' "$@" >"$apt_dir/sources.list" || return 1
  DEBPKGS_APT_OPTS=(
    -o "Dir::Etc::sourcelist=$apt_dir/sources.list"
    -o "Dir::Etc::sourceparts=-"
    -o "Dir::State::Lists=$apt_dir/lists"
    -o "Dir::Cache=$apt_dir/cache"
    -o "APT::Get::List-Cleanup=0"
  )
  apt-get "${DEBPKGS_APT_OPTS[@]}" update >&2
}

debpkgs_download() {
  local dir="$1"
  shift
  rm -f "$dir"/dl/*.deb
  log "apt-get download $*"
  (cd "$dir/dl" && apt-get "${DEBPKGS_APT_OPTS[@]}" download "$@" >&2)
}

debpkgs_unpack() {
  local dir="$1" root="$2" deb
  rm -rf "$root.tmp"
  mkdir -p "$root.tmp" || return 1
  for deb in "$dir"/dl/*.deb; do
    log "unpacking $(basename "$deb")"
    dpkg-deb -x "$deb" "$root.tmp" || return 1
  done
  rm -rf "$root" && mv "$root.tmp" "$root"
}
