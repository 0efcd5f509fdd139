# shellcheck shell=bash
# The Debian mirror this machine's apt uses, sourced by the scripts that fetch Debian packages
# themselves (scripts/mesa-guest.sh, scripts/qemu-backports.sh, scripts/uml-sid.sh), so a machine with a
# local or different mirror fetches from it.
#
# debian_mirror [APT_DIR [OS_RELEASE]]
#   Prints one URL: $DENOVM_DEBIAN_MIRROR when set; else the URI of the first enabled `deb` entry in
#   APT_DIR (default /etc/apt: sources.list, sources.list.d/*.list, and the deb822 files
#   sources.list.d/*.sources) whose suite is the machine's own release, VERSION_CODENAME in OS_RELEASE
#   (default /etc/os-release), not its -security, -updates or -backports suites and not another
#   vendor's repository; else http://deb.debian.org/debian. A trailing / is dropped.

DEBMIRROR_FALLBACK=http://deb.debian.org/debian

debian_mirror() {
  local apt_dir="${1:-/etc/apt}" os_release="${2:-/etc/os-release}" codename="" uri=""
  if [[ -n "${DENOVM_DEBIAN_MIRROR:-}" ]]; then
    echo "${DENOVM_DEBIAN_MIRROR%/}"
    return 0
  fi
  [[ -r "$os_release" ]] && codename="$(sed -n 's/^VERSION_CODENAME=["]\{0,1\}\([^"]*\)["]\{0,1\}$/\1/p' "$os_release" | head -n 1)"
  if [[ -n "$codename" ]]; then
    uri="$(_debmirror_one_line "$codename" "$apt_dir"/sources.list "$apt_dir"/sources.list.d/*.list)"
    [[ -n "$uri" ]] || uri="$(_debmirror_deb822 "$codename" "$apt_dir"/sources.list.d/*.sources)"
  fi
  uri="${uri:-$DEBMIRROR_FALLBACK}"
  echo "${uri%/}"
}

# One-line style: "deb [options] URI SUITE COMPONENT...", options in brackets (they may hold spaces).
_debmirror_one_line() {
  local codename="$1" f
  shift
  for f in "$@"; do
    [[ -r "$f" ]] || continue
    sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" |
      awk -v c="$codename" '$1 == "deb" && $3 == c { print $2; exit }'
  done | head -n 1
}

# deb822 style: stanzas separated by blank lines; Types, URIs, Suites, Enabled fields (multi-valued
# fields are space-separated; field names are case-insensitive).
_debmirror_deb822() {
  local codename="$1" f
  shift
  for f in "$@"; do
    [[ -r "$f" ]] || continue
    awk -v c="$codename" '
      function flush() {
        if (types ~ /(^| )deb( |$)/ && enabled != "no" && (" " suites " ") ~ (" " c " ") && uris != "") {
          split(uris, u, " "); print u[1]; found = 1; exit
        }
        types = ""; uris = ""; suites = ""; enabled = ""
      }
      /^[ \t]*#/ { next }
      /^[ \t]*$/ { flush(); next }
      /^[A-Za-z-]+:/ {
        name = tolower(substr($0, 1, index($0, ":") - 1)); value = substr($0, index($0, ":") + 1)
        gsub(/^[ \t]+|[ \t]+$/, "", value); gsub(/[ \t]+/, " ", value)
        if (name == "types") types = value
        else if (name == "uris") uris = value
        else if (name == "suites") suites = value
        else if (name == "enabled") enabled = tolower(value)
      }
      END { if (!found) flush() }
    ' "$f"
  done | head -n 1
}
