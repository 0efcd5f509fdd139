#!/usr/bin/env bash
# Line coverage of the device models (devices/, and devices/vhost_user/ on its own) under `deno test --coverage`.
#
#   scripts/coverage.sh                       the whole suite (as `deno task test` runs it)
#   scripts/coverage.sh devices/ test/vhost_user/   only these test files or directories
#   scripts/coverage.sh --report-only         the figures of the last run's profiles again
#
# Prints one JSON line, e.g. {"coverage":"lines","devices":0.93,"vhost_user":0.91,...}, then a table of every file under
# devices/ sorted by uncovered lines (most first). The figures count the lines V8 reports as executable (lcov's DA
# records): a line is covered when it ran at least once.
#
# Child processes count too: `deno test --coverage=DIR` sets DENO_COVERAGE_DIR=DIR in its own environment, so every
# `deno run main.ts ...` a test spawns (the `denovm device` back ends, `denovm run`) inherits it and writes its profile
# into DIR when it exits normally or through Deno.exit (the back ends end so on SIGTERM). A process killed with SIGKILL
# writes nothing.
#
# The raw profiles and lcov.info stay in $COVERAGE_DIR (default <repo>/.cache/coverage). The exit status is the test
# run's: the figures are printed either way.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${COVERAGE_DIR:-$repo/.cache/coverage}"
cd "$repo" || exit 1

status=0
if [ "${1:-}" = "--report-only" ]; then
  shift
else
  rm -rf "$dir"
  mkdir -p "$dir"
  deno test --allow-all --no-check=remote --coverage="$dir" --coverage-raw-data-only "$@" >&2
  status=$?
fi

# Only devices/ of this tree; its test files are not the code being measured.
repo_re="$(printf '%s' "$repo" | sed 's/[][\.*^$+?(){}|]/\\&/g')"
if ! deno coverage "$dir" --lcov --output="$dir/lcov.info" \
  --include="^file://$repo_re/devices/" --exclude='_test\.ts$' >&2; then
  echo "coverage: deno coverage failed" >&2
  exit 1
fi

# lcov: SF:<file> starts a file, DA:<line>,<count> is one executable line.
rows="$dir/files.tsv"
awk -v root="$repo/" '
  /^SF:/ { file = substr($0, 4); sub("^file://", "", file); sub("^" root, "", file); next }
  /^DA:/ { split(substr($0, 4), f, ","); found[file]++; if (f[2] > 0) hit[file]++; next }
  END { for (file in found) printf "%d\t%d\t%d\t%s\n", found[file] - hit[file], found[file], hit[file] + 0, file }
' "$dir/lcov.info" | sort -t$'\t' -k1,1nr -k4,4 >"$rows"

awk -F'\t' '
  function ratio(h, f) { return f ? h / f : 0 }
  {
    all_f += $2; all_h += $3
    if ($4 ~ /^devices\/vhost_user\//) { vu_f += $2; vu_h += $3 }
    if ($4 ~ /^devices\/virtio\//) { vi_f += $2; vi_h += $3 }
    if ($4 ~ /^devices\/legacy\//) { lg_f += $2; lg_h += $3 }
  }
  END {
    printf "{\"coverage\":\"lines\",\"devices\":%.4f,\"vhost_user\":%.4f,\"virtio\":%.4f,\"legacy\":%.4f,", \
      ratio(all_h, all_f), ratio(vu_h, vu_f), ratio(vi_h, vi_f), ratio(lg_h, lg_f)
    printf "\"lines\":%d,\"covered\":%d,\"files\":%d}\n", all_f, all_h, NR
  }
' "$rows"

printf '%9s %6s %7s  %s\n' uncovered lines covered file
awk -F'\t' '{ printf "%9d %6d %6.1f%%  %s\n", $1, $2, ($2 ? 100 * $3 / $2 : 0), $4 }' "$rows"
exit "$status"
