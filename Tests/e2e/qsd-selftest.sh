#!/usr/bin/env bash
# Proves the e2e harness against qemu-storage-daemon (QSD), which exports
# vhost-user-blk the way `dpctl start` is meant to. Runs every workload with
# a host-side image check, then the backend kill/restart test.
#
#   Tests/e2e/qsd-selftest.sh [--workdir DIR] [--quick] [--seconds S]
#
#   --workdir DIR   image, socket and logs (default: a new /tmp/dataplane-e2e.XXXX)
#   --quick         skip the kill/restart runs
#   --seconds S     long-io and kill/restart duration (default 20 / 40)
#
# Needs qemu-storage-daemon (Debian package qemu-system-common, pulled in by
# qemu-system-x86); see README.md for the full package list.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
die() { echo "qsd-selftest.sh: error: $*" >&2; exit 2; }

workdir= quick=0 seconds=20
while [[ $# -gt 0 ]]; do
    case $1 in
        --workdir) workdir=${2:?}; shift 2 ;;
        --quick) quick=1; shift ;;
        --seconds) seconds=${2:?}; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
done
command -v qemu-storage-daemon >/dev/null || die "qemu-storage-daemon not found"
[[ -n $workdir ]] || workdir=$(mktemp -d /tmp/dataplane-e2e.XXXXXX)
mkdir -p "$workdir"
img=$workdir/disk.raw
sock=$workdir/vhost.sock

qsd_cmd() { # [extra args...]: the QSD command line, export node disk0
    printf '%q ' qemu-storage-daemon \
        --blockdev "driver=file,node-name=file0,filename=$img,cache.direct=on" \
        --blockdev driver=raw,node-name=disk0,file=file0 \
        --export "type=vhost-user-blk,id=e0,node-name=disk0,addr.type=unix,addr.path=$sock,writable=on,num-queues=2"
}
qsd_throttled_cmd() { # same, but through a 2 MB/s throttle: QSD always holds popped, unfinished requests
    printf '%q ' qemu-storage-daemon \
        --object throttle-group,id=tg0,x-bps-total=2097152 \
        --blockdev "driver=file,node-name=file0,filename=$img,cache.direct=on" \
        --blockdev driver=raw,node-name=disk0,file=file0 \
        --blockdev driver=throttle,node-name=thr0,throttle-group=tg0,file=disk0 \
        --export "type=vhost-user-blk,id=e0,node-name=thr0,addr.type=unix,addr.path=$sock,writable=on,num-queues=2"
}

results=()
record() { results+=("$(printf '%-28s %-6s %7ss' "$1" "$2" "$3")"); }
timed() { # name cmd...
    local name=$1 t0 st=0 dt
    shift
    t0=$(date +%s.%N)
    "$@" || st=$?
    dt=$(awk -v s="$t0" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
    record "$name" "$([[ $st == 0 ]] && echo ok || echo "rc=$st")" "$dt"
    return 0
}

echo "== pattern: host awk vs busybox awk"
timed "pattern selftest" "$here/pattern.sh" selftest

echo "== prepare (kernel + initramfs)"
timed "prepare.sh" "$here/prepare.sh"
timed "prepare.sh (again)" "$here/prepare.sh" --quiet

rm -f "$img" "$sock"
truncate -s 64M "$img"
qsd_pid=
start_qsd() {
    bash -c "exec $(qsd_cmd)" >>"$workdir/qsd.log" 2>&1 &
    qsd_pid=$!
    for (( i = 0; i < 50; i++ )); do [[ -S $sock ]] && return 0; sleep 0.1; done
    die "QSD did not create $sock; see $workdir/qsd.log"
}
stop_qsd() { if [[ -n $qsd_pid ]]; then kill "$qsd_pid" 2>/dev/null || true; wait "$qsd_pid" 2>/dev/null || true; qsd_pid=; fi; }
trap stop_qsd EXIT
start_qsd

for w in smoke write-verify mq long-io; do
    echo "== boot: $w"
    args=(--socket "$sock" --workload "$w" --log "$workdir/$w.log" --verify-image "$img")
    [[ $w == long-io ]] && args+=(--seconds "$seconds")
    timed "boot $w" "$here/boot.sh" "${args[@]}"
done
stop_qsd

if [[ $quick == 0 ]]; then
    krs=$(( seconds * 2 ))
    echo "== kill/restart: SIGKILL QSD twice during long-io"
    rm -f "$sock"
    timed "kill-restart x2" "$here/kill-restart.sh" --backend "$(qsd_cmd)" --socket "$sock" --image "$img" \
        --log-dir "$workdir/kill-restart" --seconds "$krs" --kills 2 --interval 6
    echo "== kill/restart: throttled QSD (requests popped but unfinished when killed)"
    rm -f "$sock"
    timed "kill-restart throttled x2" "$here/kill-restart.sh" --backend "$(qsd_throttled_cmd)" --socket "$sock" \
        --image "$img" --log-dir "$workdir/kill-restart-throttled" --seconds "$krs" --kills 2 --interval 6 \
        --boot-arg --readers --boot-arg 2
    echo "== kill/restart: freeze QSD 3s, then SIGKILL"
    rm -f "$sock"
    timed "kill-restart freeze+kill" "$here/kill-restart.sh" --backend "$(qsd_cmd)" --socket "$sock" --image "$img" \
        --log-dir "$workdir/kill-restart-freeze" --seconds "$krs" --kills 1 --freeze 3
fi

echo
echo "== summary (logs in $workdir)"
printf '%s\n' "${results[@]}"
! printf '%s\n' "${results[@]}" | grep -q ' rc='
