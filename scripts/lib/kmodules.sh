# shellcheck shell=bash
# Kernel modules for an initramfs, sourced by scripts/initramfs.sh and scripts/nested-kvm.sh.
#
# kmodules_stage MODDIR DEST NAME...
#   Copies modules NAME... of the kernel tree MODDIR (/lib/modules/<release>), with everything
#   they depend on (the depends= field of each module's .modinfo), uncompressed into DEST as
#   <name>.ko, and writes DEST/load.order: one name per line, dependencies first. Modules built
#   into the kernel (modules.builtin) are skipped. '-' and '_' are the same in names.
#   Prints one error line on stderr and returns 1 when a module is missing or unreadable.

kmodules_stage() {
  local moddir="$1" dest="$2"
  shift 2
  mkdir -p "$dest" || return 1
  local -A state=()
  local -a order=()
  local name
  for name in "$@"; do
    _kmodules_add "$name" || return 1
  done
  printf '%s\n' "${order[@]}" >"$dest/load.order"
}

# Path of module $1 under $moddir (any of .ko, .ko.xz, .ko.zst, .ko.gz).
_kmodules_file() {
  local pattern="${1//[-_]/[-_]}"
  find "$moddir/kernel" -regextype posix-extended -regex ".*/${pattern}\.ko(\.xz|\.zst|\.gz)?" -print -quit
}

# Uses kmodules_stage's locals (moddir, dest, state, order) through bash's dynamic scoping.
_kmodules_add() {
  local name="${1//-/_}"
  [[ -n "${state[$name]:-}" ]] && return 0
  state[$name]=visiting
  local src
  src="$(_kmodules_file "$name")"
  if [[ -z "$src" ]]; then
    if grep -Eq "/${name//_/[-_]}\.ko$" "$moddir/modules.builtin" 2>/dev/null; then
      state[$name]=builtin
      return 0
    fi
    echo "kmodules: module $name not found in $moddir" >&2
    return 1
  fi
  local ko="$dest/$name.ko"
  case "$src" in
    *.ko.xz) xz -dc "$src" >"$ko" ;;
    *.ko.zst) zstd -dcq "$src" >"$ko" ;;
    *.ko.gz) gzip -dc "$src" >"$ko" ;;
    *) cp "$src" "$ko" ;;
  esac || {
    echo "kmodules: cannot unpack $src" >&2
    return 1
  }
  # depends= of the .modinfo section: NUL-separated key=value strings.
  local deps dep
  objcopy -O binary --only-section=.modinfo "$ko" "$dest/.modinfo" || {
    echo "kmodules: cannot read the .modinfo of $src" >&2
    return 1
  }
  deps="$(tr '\0' '\n' <"$dest/.modinfo" | sed -n 's/^depends=//p' | head -n 1)"
  rm -f "$dest/.modinfo"
  local -a dep_list=()
  IFS=',' read -r -a dep_list <<<"$deps"
  for dep in "${dep_list[@]}"; do
    [[ -n "$dep" ]] || continue
    if [[ "${state[${dep//-/_}]:-}" == visiting ]]; then
      echo "kmodules: module dependency loop at $dep" >&2
      return 1
    fi
    _kmodules_add "$dep" || return 1
  done
  state[$name]=yes
  order+=("$name")
}
