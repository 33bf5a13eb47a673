#!/usr/bin/env bash
# Boot the e2e guest against a vhost-user-blk backend listening on a unix
# socket, run one workload, and succeed only if the guest prints its PASS line.
#
#   Tests/e2e/boot.sh --socket SOCK --workload NAME --log FILE [options]
#
#   --socket SOCK        the backend's vhost-user socket (QEMU is the client)
#   --workload NAME      write-verify | mq | long-io | dio-large | smoke | grow |
#                        write-cache (these two wait for the host: see guest/init)
#   --log FILE           serial console + QEMU messages go here
#   --queues N           num-queues of the vhost-user-blk-pci device
#   --queue-size N       queue-size of the device (QEMU's default: 128)
#   --packed             packed=on on the device (VIRTIO_F_RING_PACKED; the
#                        guest's result line says ring=packed when negotiated)
#                        (default 1; 2 for mq); the guest checks it sees
#                        min(N, 2) blk-mq queues
#   --reconnect          add reconnect=1 to the chardev (survive backend restarts)
#   --seconds S          long-io duration (default 20)
#   --timeout T          kill QEMU after T seconds (default 120, or S+120)
#   --seed N             pattern seed (default: random, printed in the result)
#   --regions O:L,...    write-verify/mq byte ranges (O<0: from the disk end)
#   --region O:L         long-io range;   --slot BYTES  long-io write size
#   --verify-image IMG   after a PASS, check IMG on the host (pattern.sh verify-log)
#   --stall S            guest FAILs if I/O is in flight and nothing completes
#                        for S seconds (default 60; 0 = off)
#   --readers N          long-io background readers (default 1)
#   --exit-grace S       kill QEMU if it still runs S seconds after the guest's
#                        result line (default 20)
#   --wait-socket S      wait up to S seconds for SOCK to appear (default 10)
#   --kernel K --initrd I   use these instead of running prepare.sh
#   --append ARGS        extra kernel command line
#   --qemu-arg ARG       extra QEMU argument (repeatable), e.g. --qemu-arg -trace
#   --show               also stream the console to stdout
#
# Exit status: 0 PASS (and image verified if asked); 1 guest printed FAIL;
# 2 usage/setup error; 3 no result line (timeout, crash, QEMU error);
# 4 guest passed but the host image check failed; 5 guest passed but QEMU
# did not exit (hung in vhost-user during device stop).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
QEMU=${QEMU:-qemu-system-x86_64}

die() { echo "boot.sh: error: $*" >&2; exit 2; }
trap 'echo "boot.sh: error: unexpected failure at line $LINENO: $BASH_COMMAND" >&2' ERR

socket= workload= log= queues= queue_size= packed=0 reconnect=0 seconds=20 timeout_s= seed= regions= region= slot=
verify_image= wait_socket=10 stall= readers= exit_grace=20 kernel= initrd= append= show=0
qemu_extra=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --socket) socket=${2:?}; shift 2 ;;
        --workload) workload=${2:?}; shift 2 ;;
        --log) log=${2:?}; shift 2 ;;
        --queues) queues=${2:?}; shift 2 ;;
        --queue-size) queue_size=${2:?}; shift 2 ;;
        --packed) packed=1; shift ;;
        --reconnect) reconnect=1; shift ;;
        --seconds) seconds=${2:?}; shift 2 ;;
        --timeout) timeout_s=${2:?}; shift 2 ;;
        --seed) seed=${2:?}; shift 2 ;;
        --regions) regions=${2:?}; shift 2 ;;
        --region) region=${2:?}; shift 2 ;;
        --slot) slot=${2:?}; shift 2 ;;
        --verify-image) verify_image=${2:?}; shift 2 ;;
        --wait-socket) wait_socket=${2:?}; shift 2 ;;
        --stall) stall=${2:?}; shift 2 ;;
        --readers) readers=${2:?}; shift 2 ;;
        --exit-grace) exit_grace=${2:?}; shift 2 ;;
        --kernel) kernel=${2:?}; shift 2 ;;
        --initrd) initrd=${2:?}; shift 2 ;;
        --append) append=${2:?}; shift 2 ;;
        --qemu-arg) qemu_extra+=("${2:?}"); shift 2 ;;
        --show) show=1; shift ;;
        -h|--help) sed -n '2,41p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
[[ -n $socket ]] || die "--socket is required"
[[ -n $workload ]] || die "--workload is required"
[[ -n $log ]] || die "--log is required"
case $workload in write-verify|mq|long-io|dio-large|smoke|grow|write-cache) ;; *) die "unknown workload '$workload'" ;; esac
[[ $seconds =~ ^[0-9]+$ ]] || die "--seconds must be a number"
: "${queues:=$([[ $workload == mq ]] && echo 2 || echo 1)}"
[[ $queues =~ ^[1-9][0-9]*$ ]] || die "--queues must be a positive number"
[[ -z $queue_size || $queue_size =~ ^[1-9][0-9]*$ ]] || die "--queue-size must be a positive number"
if [[ -z $timeout_s ]]; then
    if [[ $workload == long-io ]]; then timeout_s=$((seconds + 120)); else timeout_s=120; fi
fi
[[ $timeout_s =~ ^[0-9]+$ ]] || die "--timeout must be a number of seconds"
: "${seed:=$(( (RANDOM << 16 | RANDOM) & 0x7fffffff ))}"
[[ $seed =~ ^[0-9]+$ ]] || die "--seed must be a number"
command -v "$QEMU" >/dev/null || die "$QEMU not found; install 'qemu-system-x86'"
command -v timeout >/dev/null || die "timeout not found (coreutils)"

if [[ -z $kernel || -z $initrd ]]; then
    paths=$("$here/prepare.sh" --quiet) || die "prepare.sh failed"
    kernel=$(sed -n 's/^KERNEL=//p' <<<"$paths")
    initrd=$(sed -n 's/^INITRD=//p' <<<"$paths")
fi
[[ -r $kernel ]] || die "kernel $kernel not readable"
[[ -r $initrd ]] || die "initrd $initrd not readable"

# QEMU connects as the client; without reconnect it fails at once if the
# backend is not listening yet, so give a backend that is starting a moment.
for (( i = 0; i < wait_socket * 10; i++ )); do
    [[ -S $socket ]] && break
    sleep 0.1
done
[[ -S $socket ]] || die "no unix socket at $socket after ${wait_socket}s (is the backend running?)"

smp=2
cmdline="console=ttyS0 panic=-1 workload=$workload seed=$seed queues=$(( queues < smp ? queues : smp ))"
[[ -n $regions ]] && cmdline+=" regions=$regions"
[[ -n $region ]] && cmdline+=" region=$region"
[[ -n $slot ]] && cmdline+=" slot=$slot"
[[ -n $stall ]] && cmdline+=" stall=$stall"
[[ -n $readers ]] && cmdline+=" readers=$readers"
[[ $workload == long-io ]] && cmdline+=" seconds=$seconds"
[[ -n $append ]] && cmdline+=" $append"

chardev="socket,id=c0,path=$socket"
[[ $reconnect == 1 ]] && chardev+=",reconnect=1"

# thread=single: one host thread runs both vCPUs in turn. With multi-threaded
# TCG (QEMU 7.2, guest 6.12) about one boot in 30 oopsed on an int3 while the
# kernel patched its own text (static keys: "Oops: int3" in sched_clock_cpu,
# or RIP one byte into a jmp), before virtio-blk was even probed.
packed_opt=
if [[ $packed == 1 ]]; then packed_opt=,packed=on; fi
qemu_cmd=(
    "$QEMU"
    -machine q35,memory-backend=mem -accel tcg,thread=single
    -object memory-backend-memfd,id=mem,size=512M,share=on
    -m 512M
    -kernel "$kernel" -initrd "$initrd"
    -append "$cmdline"
    -chardev "$chardev"
    -device "vhost-user-blk-pci,chardev=c0,num-queues=$queues${queue_size:+,queue-size=$queue_size}${packed_opt}"
    -smp $smp
    -serial stdio -display none -no-reboot -nodefaults
    "${qemu_extra[@]}"
)

mkdir -p "$(dirname "$log")"
{
    echo "boot.sh: $(date -Is) timeout=${timeout_s}s"
    echo "boot.sh: $(printf '%q ' "${qemu_cmd[@]}")"
} >"$log"

start=$(date +%s.%N)
# --foreground: timeout signals only QEMU. The subshell (stderr muted) keeps
# bash's "Killed" job notices out of the output when QEMU has to be killed.
( timeout --foreground --kill-after=10 "$timeout_s" "${qemu_cmd[@]}" </dev/null >>"$log" 2>&1; exit $? ) 2>/dev/null &
qpid=$!
qemu_pid() { # subshell -> timeout -> QEMU
    local t
    t=$(pgrep -P "$qpid" 2>/dev/null | head -n 1 || true)
    if [[ -n $t ]]; then pgrep -P "$t" 2>/dev/null | head -n 1 || true; fi
}
kill_qemu() {
    local p
    p=$(qemu_pid)
    [[ -n $p ]] || return 0
    kill -TERM "$p" 2>/dev/null || true
    sleep 2
    kill -KILL "$p" 2>/dev/null || true
}
trap 'kill_qemu' EXIT
trap 'kill_qemu; exit 130' INT TERM
tpid=
if [[ $show == 1 ]]; then
    tail -n +1 -f --pid="$qpid" "$log" &
    tpid=$!
fi
# Once the guest has printed its result QEMU should be gone within seconds.
# If it is not, QEMU is usually blocked in a vhost-user request during the
# device stop (e.g. GET_VRING_BASE) that the backend never answers.
hung=0 seen_at=
while kill -0 "$qpid" 2>/dev/null; do
    if [[ -z $seen_at ]] && grep -aq 'E2E-RESULT: ' "$log"; then seen_at=$SECONDS; fi
    if [[ -n $seen_at ]] && (( SECONDS - seen_at > exit_grace )); then
        hung=1
        echo "boot.sh: QEMU still running ${exit_grace}s after the guest's result line; killing it (backend not answering vhost-user messages during device stop?)" | tee -a "$log" >&2
        kill_qemu
        break
    fi
    sleep 0.5
done
qstatus=0
wait "$qpid" || qstatus=$?
trap - EXIT INT TERM
if [[ -n $tpid ]]; then wait "$tpid" 2>/dev/null || true; fi
elapsed=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')

result=$(grep -a -o 'E2E-RESULT: .*' "$log" | tail -n 1 | tr -d '\r' || true)
if [[ $hung == 1 ]]; then
    :
elif [[ $qstatus == 124 || $qstatus == 137 ]]; then
    echo "boot.sh: QEMU timed out after ${timeout_s}s" | tee -a "$log" >&2
    if ! grep -aq 'Linux version' "$log"; then
        echo "boot.sh: no kernel output at all: QEMU probably waited for the backend during the vhost-user handshake" | tee -a "$log" >&2
    fi
elif [[ $qstatus != 0 ]]; then
    echo "boot.sh: QEMU exited with status $qstatus" | tee -a "$log" >&2
fi

show_tail() {
    echo "---- last lines of $log ----" >&2
    tail -n 25 "$log" >&2
    echo "----" >&2
}

case $result in
    "E2E-RESULT: PASS "*)
        if [[ $hung == 1 ]]; then
            echo "boot.sh: FAIL in ${elapsed}s: the guest passed but QEMU did not exit: $result" >&2
            show_tail; exit 5
        fi
        echo "boot.sh: PASS in ${elapsed}s: $result"
        ;;
    "E2E-RESULT: FAIL "*)
        echo "boot.sh: FAIL in ${elapsed}s: $result" >&2
        show_tail; exit 1
        ;;
    *)
        echo "boot.sh: no E2E-RESULT line after ${elapsed}s (QEMU status $qstatus)" >&2
        show_tail; exit 3
        ;;
esac

if [[ -n $verify_image ]]; then
    "$here/pattern.sh" verify-log "$verify_image" "$log" || exit 4
fi
exit 0
