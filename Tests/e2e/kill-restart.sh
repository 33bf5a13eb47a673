#!/usr/bin/env bash
# Backend crash test: run the long-io workload with reconnect=1, kill the
# backend mid-I/O, start it again on the same socket, and require the guest
# to finish and verify everything (and the host to verify the image).
#
#   Tests/e2e/kill-restart.sh --backend 'CMD' --socket SOCK --image IMG \
#       --log-dir DIR [options]
#
#   --backend 'CMD'   shell command that runs the backend in the foreground
#                     (run as `bash -c "exec CMD"`, so its pid is the backend's)
#   --socket SOCK     the socket CMD listens on;  --image IMG  the disk image
#   --log-dir DIR     boot log, backend logs (backend-<n>.log), run summary
#   --seconds S       long-io duration (default 40)
#   --kills N         how many times to kill and restart (default 1)
#   --first S         first kill S seconds after I/O starts (default 3)
#   --interval S      seconds between kills (default 8)
#   --down S          seconds the backend stays dead (default 1; QEMU retries
#                     every second)
#   --signal SIG      signal to kill with (default KILL)
#   --freeze S        SIGSTOP the backend S seconds before killing it, so
#                     the guest piles up requests the backend never finished
#   --rm-socket       delete the socket file before each restart (by default
#                     the stale file is left, as after a real crash)
#   --queues N        num-queues (default 2)
#   --boot-arg ARG    extra boot.sh argument (repeatable)
#
# Exit status: boot.sh's (0 = guest PASS and image verified), or 2 for setup
# errors (e.g. the backend did not come back).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
die() { echo "kill-restart.sh: error: $*" >&2; exit 2; }
say() { echo "kill-restart.sh: [$(date +%T)] $*"; }

backend= socket= image= logdir= seconds=40 kills=1 first=3 interval=8 down=1 sig=KILL freeze=0 rmsock=0 queues=2
boot_extra=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --backend) backend=${2:?}; shift 2 ;;
        --socket) socket=${2:?}; shift 2 ;;
        --image) image=${2:?}; shift 2 ;;
        --log-dir) logdir=${2:?}; shift 2 ;;
        --seconds) seconds=${2:?}; shift 2 ;;
        --kills) kills=${2:?}; shift 2 ;;
        --first) first=${2:?}; shift 2 ;;
        --interval) interval=${2:?}; shift 2 ;;
        --down) down=${2:?}; shift 2 ;;
        --signal) sig=${2:?}; shift 2 ;;
        --freeze) freeze=${2:?}; shift 2 ;;
        --rm-socket) rmsock=1; shift ;;
        --queues) queues=${2:?}; shift 2 ;;
        --boot-arg) boot_extra+=("${2:?}"); shift 2 ;;
        -h|--help) sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
[[ -n $backend && -n $socket && -n $image && -n $logdir ]] || die "--backend, --socket, --image and --log-dir are required"
mkdir -p "$logdir"

bpid= gen=0
start_backend() {
    gen=$((gen + 1))
    bash -c "exec $backend" </dev/null >"$logdir/backend-$gen.log" 2>&1 &
    bpid=$!
    say "backend #$gen started (pid $bpid)"
}
wait_socket() {
    local i
    if [[ $gen -gt 1 && $rmsock == 0 ]]; then
        # The stale socket file is still there, so its presence says nothing;
        # QEMU retries every second anyway. Just make sure the backend lives.
        sleep 0.5
        kill -0 "$bpid" 2>/dev/null || die "backend #$gen exited at once; see $logdir/backend-$gen.log"
        return 0
    fi
    for (( i = 0; i < 100; i++ )); do
        kill -0 "$bpid" 2>/dev/null || die "backend #$gen exited early; see $logdir/backend-$gen.log"
        [[ -S $socket ]] && return 0
        sleep 0.1
    done
    die "backend #$gen did not create $socket within 10s"
}
cleanup() {
    if [[ -n ${boot_pid:-} ]]; then kill "$boot_pid" 2>/dev/null || true; fi
    if [[ -n $bpid ]]; then kill -CONT "$bpid" 2>/dev/null || true; kill "$bpid" 2>/dev/null || true; wait "$bpid" 2>/dev/null || true; fi
}
trap cleanup EXIT

start_backend
wait_socket

boot_log=$logdir/boot.log
"$here/boot.sh" --socket "$socket" --workload long-io --seconds "$seconds" --queues "$queues" \
    --reconnect --log "$boot_log" --verify-image "$image" "${boot_extra[@]}" &
boot_pid=$!

# Wait for the guest to be doing I/O.
for (( i = 0; ; i++ )); do
    grep -aq 'E2E-PROGRESS\|long-io: ' "$boot_log" 2>/dev/null && break
    kill -0 "$boot_pid" 2>/dev/null || break
    (( i < 1800 )) || die "guest did not start long-io within 180s"
    sleep 0.1
done
say "guest I/O running"

sleep "$first"
for (( k = 1; k <= kills; k++ )); do
    kill -0 "$boot_pid" 2>/dev/null || { say "guest finished before kill $k"; break; }
    if [[ $freeze != 0 ]]; then
        kill -STOP "$bpid"
        say "backend #$gen frozen for ${freeze}s"
        sleep "$freeze"
    fi
    inflight=$(grep -a 'E2E-PROGRESS' "$boot_log" | tail -n 1 || true)
    kill -s "$sig" "$bpid"
    [[ $freeze == 0 ]] || kill -CONT "$bpid" 2>/dev/null || true
    wait "$bpid" 2>/dev/null || true
    say "backend #$gen killed with SIG$sig (last guest progress: ${inflight:-none})"
    [[ $rmsock == 0 ]] || rm -f "$socket"
    sleep "$down"
    start_backend
    wait_socket
    (( k == kills )) || sleep "$interval"
done

set +e
wait "$boot_pid"
status=$?
set -e
boot_pid=
say "boot.sh exit status $status after $gen backend start(s)"
grep -a 'qemu-system-x86_64:' "$boot_log" | sort | uniq -c | sed 's/^/    /' || true
exit "$status"
