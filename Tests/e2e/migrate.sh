#!/usr/bin/env bash
# Live migration on one host: a source QEMU on one vhost-user socket, a
# destination QEMU (-incoming) on another, both backends serving the same
# image. The guest runs long-io (writes, reads back and verifies, with
# O_DIRECT readers keeping requests in flight); once it is under way the
# source migrates over TCP, the destination finishes the workload, and the
# host checks the image. A page the backend wrote into guest memory and did
# not mark in the dirty log reaches the destination stale: the guest's
# read-back check fails (init_on_alloc=0, so zeroed pages do not hide it).
#
#   Tests/e2e/migrate.sh --source SOCK --destination SOCK --image IMG --log-dir DIR
#                        [--workload W] [--seconds S] [--packed] [--after S]
#
#   --workload W long-io (default), cache-reads (pages only the device
#                writes, summed after the switch-over: catches pages the
#                backend did not mark) or pause-probe (timed 4 KiB reads:
#                the I/O pause the guest sees; bench/migration-downtime)
#   --after S    migrate S seconds after the first progress line (default 3)
#
# Exit status: 0 when the destination guest passed and the image verifies;
# 1 on a failed check; 2 on a setup error. DIR gets src.log, dst.log
# (serial consoles), qemu-src.err, qemu-dst.err and migrate.txt.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
die() { echo "migrate.sh: error: $*" >&2; exit 2; }
say() { echo "migrate.sh: [$(date +%T)] $*"; }

src= dst= image= logdir= seconds=30 packed= after=3 workload=long-io
while [[ $# -gt 0 ]]; do
    case $1 in
        --source) src=${2:?}; shift 2 ;;
        --destination) dst=${2:?}; shift 2 ;;
        --image) image=${2:?}; shift 2 ;;
        --log-dir) logdir=${2:?}; shift 2 ;;
        --seconds) seconds=${2:?}; shift 2 ;;
        --after) after=${2:?}; shift 2 ;;
        --workload) workload=${2:?}; shift 2 ;;
        --packed) packed=,packed=on; shift ;;
        *) die "unknown option $1" ;;
    esac
done
[[ -n $src && -n $dst && -n $image && -n $logdir ]] || die "--source, --destination, --image and --log-dir are required"
mkdir -p "$logdir"
paths=$("$here/prepare.sh" --quiet) || die "prepare.sh failed"
kernel=$(sed -n 's/^KERNEL=//p' <<<"$paths")
initrd=$(sed -n 's/^INITRD=//p' <<<"$paths")
for s in "$src" "$dst"; do
    for (( i = 0; i < 100; i++ )); do [[ -S $s ]] && break; sleep 0.1; done
    [[ -S $s ]] || die "no socket at $s"
done

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cmdline="console=ttyS0 panic=-1 init_on_alloc=0 workload=$workload seed=$(( (RANDOM << 16 | RANDOM) & 0x7fffffff )) queues=1 seconds=$seconds"
# RAM of 512M - 8K, not a multiple of 256K: QEMU 7.2's dirty-bitmap sync
# takes its 64-pages-at-a-time fast path only for RAM blocks whose size is a
# multiple of 64 pages, and that path clears the bits without resetting TCG's
# TLB write entries, so a vCPU's later stores through a cached TLB entry are
# never marked dirty and reach the destination stale (guest memory
# corruption: oopses, segfaults, wrong page-cache data after the switch-over).
# The slow path, page by page, resets the TLB entries (fixed upstream in
# QEMU 9.0, "system/physmem: Fix migration dirty bitmap coherency with TCG
# memory access"). -m is rounded up to 8K, so 8K less is the smallest step.
mem=524280K
common=(-machine q35,memory-backend=mem -accel tcg,thread=single
        -object memory-backend-memfd,id=mem,size=$mem,share=on -m $mem -smp 2
        -kernel "$kernel" -initrd "$initrd" -append "$cmdline"
        -display none -no-reboot -nodefaults)
qemu=qemu-system-x86_64
timeout_s=$(( seconds + 240 ))

timeout --kill-after=10 "$timeout_s" $qemu "${common[@]}" -chardev "socket,id=c0,path=$dst" \
    -device "vhost-user-blk-pci,chardev=c0,num-queues=1$packed" -serial "file:$logdir/dst.log" \
    -incoming "tcp:127.0.0.1:$port" -monitor "unix:$logdir/dst.mon,server,nowait" </dev/null >"$logdir/qemu-dst.err" 2>&1 &
qdst=$!
timeout --kill-after=10 "$timeout_s" $qemu "${common[@]}" -chardev "socket,id=c0,path=$src" \
    -device "vhost-user-blk-pci,chardev=c0,num-queues=1$packed" -serial "file:$logdir/src.log" \
    -monitor "unix:$logdir/src.mon,server,nowait" </dev/null >"$logdir/qemu-src.err" 2>&1 &
qsrc=$!
# SIGKILL, and to QEMU itself (the child of timeout): a test runner's
# children may have SIGTERM blocked, and a QEMU left running keeps the
# runner's output pipe open.
stop_qemus() {
    local t
    for t in $qsrc $qdst; do
        pkill -KILL -P "$t" 2>/dev/null || true
        kill -KILL "$t" 2>/dev/null || true
    done
}
trap stop_qemus EXIT

# One HMP command on a monitor socket; prints the answer.
monitor() {
    python3 - "$1" "$2" <<'PY'
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.settimeout(5)
def drain(wait):
    out, end = b"", time.time() + wait
    while time.time() < end:
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            break
        if not chunk:
            break
        out += chunk
        if out.endswith(b"(qemu) "):
            break
    return out.decode(errors="replace")
drain(5)
s.send((sys.argv[2] + "\n").encode())
print(drain(5))
PY
}

for (( i = 0; i < 1200; i++ )); do
    grep -q E2E-PROGRESS "$logdir/src.log" 2>/dev/null && break
    kill -0 $qsrc 2>/dev/null || die "the source QEMU ended before the guest's I/O started: $(tail -c 600 "$logdir/qemu-src.err")"
    sleep 0.2
done
grep -q E2E-PROGRESS "$logdir/src.log" || die "no guest I/O after 240 s"
sleep "$after"
say "migrating to 127.0.0.1:$port"
monitor "$logdir/src.mon" "migrate -d tcp:127.0.0.1:$port" >/dev/null
status=
for (( i = 0; i < 600; i++ )); do
    status=$(monitor "$logdir/src.mon" "info migrate" | tr -d '\r' | sed -n 's/^Migration status: //p')
    [[ $status == completed || $status == failed || $status == cancelled ]] && break
    sleep 0.5
done
monitor "$logdir/src.mon" "info migrate" | tr -d '\r' | grep -iE "status|total time|downtime|transferred ram|dirty sync" \
    >"$logdir/migrate.txt" || true
say "migration: ${status:-no answer}; $(grep -iE 'total time|downtime' "$logdir/migrate.txt" | tr '\n' ' ')"
[[ $status == completed ]] || { echo "migrate.sh: FAIL: migration $status"; exit 1; }
# The source is paused for good after a migration; it has nothing left to do.
monitor "$logdir/src.mon" quit >/dev/null 2>&1 || true

set +e
wait $qdst
dst_status=$?
set -e
if ! grep -q "E2E-RESULT: PASS" "$logdir/dst.log"; then
    echo "migrate.sh: FAIL: the destination guest did not pass (QEMU exit $dst_status):"
    tail -n 20 "$logdir/dst.log"
    exit 1
fi
grep "E2E-RESULT" "$logdir/dst.log"
"$here/pattern.sh" verify-log "$image" "$logdir/dst.log" || { echo "migrate.sh: FAIL: the image does not hold the guest's writes"; exit 1; }
say "PASS"
