#!/usr/bin/env bash
# Run a command with a real /dev/kvm on a host that has none (or only kvm_pvm).
#
# QEMU's TCG emulates AMD's SVM with nested paging (`-cpu max`), so a Linux VM under TCG can
# load kvm_amd and offer a hardware-style KVM: unmodified guests, real VM exits, an in-kernel
# irqchip. This script boots Debian's 6.1 kernel that way with a small initramfs, mounts this
# host's root file system read-only through 9p with a tmpfs overlay on top (so the command
# sees the same files at the same paths, and its writes vanish at exit), and runs COMMAND there
# as root, in the current directory, with the current environment. Everything runs at TCG speed:
# slow, but every KVM code path is the real one.
#
# Usage: scripts/nested-kvm.sh [--mem MiB] [--cpus N] [--share DIR]... [--] COMMAND [ARG...]
#   --mem MiB    memory of the nested host (default 6144)
#   --cpus N     its vCPUs (default 1; see below)
#   --share DIR  mount DIR read-write at the same path (writes reach this host); repeatable
#
# The command's output (stdout and stderr together) arrives on this script's stdout; the
# script exits with the command's exit status, or 1 with one line on stderr when the nested
# host could not run it. Needs qemu-system-x86 and the kernel of scripts/debian-kernel.sh
# (scripts/setup.sh installs both). The nested host runs under bookworm-backports' QEMU 10
# (scripts/qemu-backports.sh unpacks it into the cache; nothing is installed): under QEMU 7.2's
# SVM emulation the nested host sometimes stopped scheduling anything for minutes while an L2 guest
# ran, and 10.0 also runs the nested suite faster. DENOVM_QEMU names another QEMU binary.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${DENOVM_CACHE:-$repo/.cache}"

die() {
  echo "nested-kvm: $*" >&2
  exit 1
}

mem=6144
# One vCPU by default: with two, a nested host sometimes stopped making progress (and once its
# kernel hit a stack guard page inside KVM_RUN), which looks like QEMU's multi-threaded TCG and
# its SVM emulation disagreeing; with one there are no cross-vCPU races in the emulator.
cpus=1
shares=()
while (($#)); do
  case "$1" in
    --mem) mem="${2:?--mem needs MiB}"; shift 2 ;;
    --cpus) cpus="${2:?--cpus needs a count}"; shift 2 ;;
    --share) shares+=("$(realpath "${2:?--share needs a folder}")"); shift 2 ;;
    --) shift; break ;;
    -*) die "unknown option $1 (usage: nested-kvm.sh [--mem MiB] [--cpus N] [--share DIR]... [--] COMMAND...)" ;;
    *) break ;;
  esac
done
(($#)) || die "no command given (usage: nested-kvm.sh [--mem MiB] [--cpus N] [--share DIR]... [--] COMMAND...)"
[[ "$mem" =~ ^[0-9]+$ && "$cpus" =~ ^[0-9]+$ ]] || die "--mem and --cpus take numbers"
for d in "${shares[@]}"; do [[ -d "$d" ]] || die "--share $d: not a folder"; done

qemu_firmware=()
if [[ -n "${DENOVM_QEMU:-}" ]]; then
  qemu="$DENOVM_QEMU"
elif q10="$(bash "$repo/scripts/qemu-backports.sh" 2>/dev/null | tail -n 1)" && [[ -x "$q10/root/usr/bin/qemu-system-x86_64" ]]; then
  qemu="$q10/root/usr/bin/qemu-system-x86_64"
  # Its own option ROMs first; the BIOS (package seabios, not unpacked) from the host's folder.
  qemu_firmware=(-L "$q10/root/usr/share/qemu" -L /usr/share/seabios)
  export QEMU_MODULE_DIR="$q10/root/usr/lib/x86_64-linux-gnu/qemu"
else
  qemu=qemu-system-x86_64
  echo "nested-kvm: bookworm-backports' QEMU is not available (scripts/qemu-backports.sh failed); using $qemu" >&2
fi
command -v "$qemu" >/dev/null || die "$qemu not found (Debian package qemu-system-x86)"
busybox="${DENOVM_BUSYBOX:-/bin/busybox}"
[[ -x "$busybox" ]] || die "$busybox not found (Debian package busybox-static)"

kdir="$(bash "$repo/scripts/debian-kernel.sh" 2>/dev/null | tail -n 1)"
[[ -s "$kdir/vmlinuz" ]] || die "no kernel: scripts/debian-kernel.sh failed"
release="$(cat "$kdir/version")"

# ---- The nested host's initramfs (cached; rebuilt when this script, busybox or the kernel change) ----

# kvm_amd for /dev/kvm; 9p over virtio-pci for this host's files; overlay for the writable layer.
NESTED_MODULES=(kvm_amd 9pnet_virtio 9p virtio_pci overlay)
out_dir="$cache/nested"
initrd="$out_dir/init.cpio.gz"
key="$(cat "${BASH_SOURCE[0]}" "$repo/scripts/lib/kmodules.sh" "$busybox" "$kdir/version" | sha256sum | cut -d' ' -f1)"
if [[ ! -s "$initrd" || "$(cat "$out_dir/stamp" 2>/dev/null)" != "$key" ]]; then
  work="$(mktemp -d "${TMPDIR:-/tmp}/denovm-nested.XXXXXX")"
  stage="$work/root"
  mkdir -p "$stage"/{bin,proc,sys,dev,host,upper,merged}
  # shellcheck source=lib/kmodules.sh
  source "$repo/scripts/lib/kmodules.sh"
  kmodules_stage "$kdir/root/lib/modules/$release" "$stage/modules" "${NESTED_MODULES[@]}" || die "cannot stage kernel modules"
  cp "$busybox" "$stage/bin/busybox"
  # /init: mount everything, run /run/denovm-nested/cmd.sh (from the job share) chrooted into
  # the overlay, record its status in the job share, power off.
  cat >"$stage/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
stty -F /dev/console -onlcr 2>/dev/null
fail() { echo "nested-kvm: $*" >/dev/console; poweroff -f; }
while read -r m; do insmod "/modules/$m.ko" || fail "insmod $m failed"; done </modules/load.order
[ -c /dev/kvm ] || fail "kvm_amd loaded but there is no /dev/kvm (QEMU without SVM?)"
# No halt polling: KVM spins up to halt_poll_ns in the kernel when a vCPU halts, hoping for an early
# wake-up. On this host's one emulated CPU that spinning is TCG work taken from everything else.
echo 0 >/sys/module/kvm/parameters/halt_poll_ns
# The loopback interface, for tests that use TCP on 127.0.0.1 (the GDB stub's).
ip link set lo up || fail "cannot bring up the loopback interface"
p9="trans=virtio,version=9p2000.L,msize=512000"
mount -t 9p -o "$p9,ro,cache=loose" host /host || fail "cannot mount the host's root"
mount -t tmpfs -o mode=0755 upper /upper
mkdir -p /upper/data /upper/work
mount -t overlay -o lowerdir=/host,upperdir=/upper/data,workdir=/upper/work overlay /merged || fail "overlay failed"
for d in proc sys dev; do mount --bind "/$d" "/merged/$d"; done
mkdir -p /merged/dev/pts /merged/dev/shm /merged/run/denovm-nested
mount -t devpts devpts /merged/dev/pts
mount -t tmpfs tmpfs /merged/dev/shm
mount -t 9p -o "$p9" job /merged/run/denovm-nested || fail "cannot mount the job folder"
# The nested host's module addresses, to name a kernel address its CPU state shows.
cat /proc/modules >/merged/run/denovm-nested/modules 2>/dev/null
# A heartbeat in the job folder every 20 s: the nested host's uptime and load, and each task's
# state and wait channel, so that a run that stops making progress shows where it waits.
# The first one is written at once, so a nested host that stops early is noticed too.
(
  while :; do
    {
      echo "uptime $(cut -d' ' -f1 /proc/uptime) s, load $(cut -d' ' -f1-3 /proc/loadavg)"
      for p in /proc/[0-9]*; do
        pcomm="$(cat "$p/comm" 2>/dev/null)"
        for t in "$p"/task/[0-9]*; do
          read -r _ comm state _ <"$t/stat" 2>/dev/null || continue
          case "$state$pcomm" in [SI]deno) ;; [SI]*) continue ;; esac
          echo "  ${t#/proc/} $pcomm $comm $state $(cat "$t/wchan" 2>/dev/null)"
        done
      done
    } >/merged/run/denovm-nested/heartbeat.new 2>/dev/null
    mv /merged/run/denovm-nested/heartbeat.new /merged/run/denovm-nested/heartbeat
    sleep 20
  done
) &
i=0
while read -r dir; do
  mount -t 9p -o "$p9" "share$i" "/merged$dir" || fail "cannot mount share $dir"
  i=$((i + 1))
done </merged/run/denovm-nested/shares
chroot /merged /bin/bash /run/denovm-nested/cmd.sh </dev/console >/dev/console 2>&1
echo "$?" >/merged/run/denovm-nested/status
sync
poweroff -f
EOF
  chmod +x "$stage/init"
  mkdir -p "$out_dir"
  (cd "$stage" && find . | cpio -o -H newc --quiet | gzip -1) >"$initrd.tmp"
  mv "$initrd.tmp" "$initrd"
  echo "$key" >"$out_dir/stamp"
  rm -rf "$work"
fi

# ---- The job: command, environment, working directory, shares ----

job="$(mktemp -d "${TMPDIR:-/tmp}/denovm-nested-job.XXXXXX")"
qemu_pid=""
watch_pid=""
# The nested host's CPU state from QEMU's monitor (a pair of FIFOs, $job/monitor.in and .out):
# where its one vCPU is when it stops making progress.
cpu_state() {
  [[ -p "$job/monitor.in" ]] || return 0
  echo "nested-kvm: the nested host's CPU ($1):" >&2
  {
    printf 'info registers\ninfo lapic\n' >"$job/monitor.in"
    sleep 1
    timeout 2 cat "$job/monitor.out" | tr -d '\r' | grep -E '^(RIP|RAX|RSP|CS |EFER|CR0|GS |LVT|Timer|ISR|IRR|APR|SPIV|ESR)' >&2
  } || true
}
cleanup() {
  if [[ -n "$watch_pid" ]]; then kill "$watch_pid" 2>/dev/null || true; fi
  if [[ -n "$qemu_pid" ]]; then
    # Interrupted while the nested host ran: say where it was.
    cpu_state "when interrupted"
    kill "$qemu_pid" 2>/dev/null
    if [[ -s "$job/heartbeat" ]]; then
      echo "nested-kvm: interrupted; the nested host's last heartbeat:" >&2
      cat "$job/heartbeat" >&2
    fi
  fi
  rm -rf "$job"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
{
  echo "# generated by scripts/nested-kvm.sh"
  # The caller's environment, minus what describes this host's terminal session.
  export -p | grep -Ev '^declare -x (OLDPWD|SHLVL|_|TERM_PROGRAM|SSH_[A-Z_]*)=' || true
  # Tests may adapt to the nested host (test/nested/linux_boot_test.ts runs Linux with one vCPU there).
  echo "export DENOVM_IN_NESTED_HOST=1"
  printf 'cd %q || exit 1\n' "$PWD"
  printf 'exec'
  printf ' %q' "$@"
  printf '\n'
} >"$job/cmd.sh"
printf '%s\n' "${shares[@]+"${shares[@]}"}" | sed '/^$/d' >"$job/shares"

p9opts="security_model=none,multidevs=remap"
# nohz=off highres=off: the nested host's tick runs periodic. QEMU's TCG now and then leaves its
# local APIC's timer interrupt pending (in IRR, nothing in service, priority allowing it) but never
# takes it while an L2 guest runs; with a one-shot tick nothing re-arms the timer, so when that L2
# guest spins waiting for its VMM (Linux's virtio_console waits so for control messages), the whole
# nested host stops for good. Any later interrupt makes QEMU look again: a periodic tick is one
# every 4 ms. The watchdog below also sends one (a key press) when the heartbeat is late.
mkfifo "$job/monitor.in" "$job/monitor.out"
args=(
  "${qemu_firmware[@]+"${qemu_firmware[@]}"}"
  -accel tcg,thread=multi -cpu max -smp "$cpus" -m "$mem"
  -chardev "pipe,id=mon,path=$job/monitor" -mon chardev=mon,mode=readline
  -nodefaults -no-user-config -display none -no-reboot
  -chardev stdio,id=con,signal=off -serial chardev:con
  -kernel "$kdir/vmlinuz" -initrd "$initrd"
  -append "console=ttyS0 quiet loglevel=1 panic=-1 nohz=off highres=off"
  -virtfs "local,path=/,mount_tag=host,readonly=on,$p9opts"
  -virtfs "local,path=$job,mount_tag=job,$p9opts"
)
i=0
for d in "${shares[@]+"${shares[@]}"}"; do
  args+=(-virtfs "local,path=$d,mount_tag=share$i,$p9opts")
  i=$((i + 1))
done

# A terminal on stdin reaches the command (through the nested host's console); else nothing does.
if [[ -t 0 ]]; then
  "$qemu" "${args[@]}" &
else
  "$qemu" "${args[@]}" </dev/null &
fi
qemu_pid=$!
# A heartbeat older than 2 minutes means the nested host stopped scheduling its own tasks: say so
# once, with its heartbeat and CPU state, while it is still in that state.
(
  # (sleep's descriptors go nowhere: the caller's pipes must close when QEMU ends.)
  started=$(date +%s)
  kicked=0
  while sleep 10 </dev/null >/dev/null 2>&1; do
    # Before the first heartbeat, the age counts from QEMU's start (the nested host boots in seconds).
    if [[ -s "$job/heartbeat" ]]; then
      age=$(($(date +%s) - $(stat -c %Y "$job/heartbeat")))
    else
      age=$(($(date +%s) - started))
    fi
    # A late heartbeat (it comes every 20 s): an interrupt through the monitor, once per late
    # heartbeat, wakes a nested host whose pending timer interrupt QEMU stopped looking at.
    if ((age > 45 && kicked != $(stat -c %Y "$job/heartbeat" 2>/dev/null || echo 0))); then
      kicked=$(stat -c %Y "$job/heartbeat" 2>/dev/null || echo 0)
      echo "nested-kvm: the nested host's heartbeat is ${age} s old; sending it an interrupt (a key press)" >&2
      printf 'sendkey shift\n' >"$job/monitor.in"
    fi
    if ((age > 120)); then
      echo "nested-kvm: no heartbeat from the nested host for ${age} s; the last one:" >&2
      cat "$job/heartbeat" >&2 2>/dev/null || echo "(none yet)" >&2
      cpu_state "now"
      sleep 5
      cpu_state "5 s later"
      echo "nested-kvm: the nested host's modules:" >&2
      cat "$job/modules" >&2 2>/dev/null || true
      break
    fi
  done
) &
watch_pid=$!
wait "$qemu_pid" || true
qemu_pid=""
[[ -s "$job/status" ]] || die "the nested host stopped before the command finished (see the lines above)"
exit "$(cat "$job/status")"
