#!/usr/bin/env bash
# Runs one fuzz target on a copy of its seed corpus (the repository's corpus is
# never modified) and reports executions, exec/s and coverage.
#
#   fuzz/run.sh TARGET SECONDS         bounded by wall time (-max_total_time)
#   fuzz/run.sh TARGET --runs N        a long campaign bounded by executions
#
# Exits non-zero when the target crashes, times out or leaks; the reproducer
# goes to fuzz/crashes/TARGET-<kind>-<sha1>. Extra libFuzzer flags can be given
# in FUZZ_FLAGS (FUZZ_FLAGS=-fork=2 runs two workers; --runs then counts all
# of theirs); KEEP=1 keeps the working corpus (it is printed); RESUME=DIR goes
# on from such a corpus (two campaigns may share one: each reloads what the
# other adds); FUZZ_LOG=FILE logs elsewhere than fuzz/out/TARGET-campaign.log.
# The target is rebuilt first (fuzz/build.sh).
set -euo pipefail
# Braces: bash reads the whole script before running any of it, so editing
# this file during a long campaign cannot change the running one.
{
cd "$(dirname "$0")/.."

usage() { echo "usage: fuzz/run.sh TARGET SECONDS | fuzz/run.sh TARGET --runs N" >&2; exit 2; }
[[ $# -ge 2 ]] || usage
target=$1
campaign=
shift
case $1 in
--runs)
    [[ $# -eq 2 && $2 =~ ^[0-9]+$ ]] || usage
    limit=(-runs="$2")
    campaign=1
    # A long campaign: no allocation stacks in reports (unwinding on every
    # malloc costs ~10 % of exec/s); rerun a reproducer for the full report.
    export ASAN_OPTIONS=${ASAN_OPTIONS:-malloc_context_size=0}
    ;;
*) [[ $# -eq 1 && $1 =~ ^[0-9]+$ ]] || usage; limit=(-max_total_time="$1") ;;
esac

seeds=fuzz/corpus/$target
[[ -d $seeds ]] || { echo "run.sh: no corpus at $seeds" >&2; exit 2; }
# The C targets build in seconds; only vhost_user needs the Swift build.
if [[ $target == vhost_user ]]; then fuzz/build.sh >/dev/null; else C_ONLY=1 fuzz/build.sh >/dev/null; fi
bin=fuzz/out/$target
[[ -x $bin ]] || { echo "run.sh: fuzz/build.sh did not build $bin" >&2; exit 2; }

work=$(mktemp -d "${TMPDIR:-/tmp}/fuzz-$target.XXXXXX")
cleanup() { [[ ${KEEP:-0} == 1 ]] || rm -rf "$work"; }
trap cleanup EXIT
if [[ -n ${RESUME:-} ]]; then
    # Go on from an earlier campaign's corpus (KEEP=1 printed it): it keeps
    # growing in place, and the seeds are read alongside.
    [[ -d $RESUME ]] || { echo "run.sh: RESUME=$RESUME is not a directory" >&2; exit 2; }
    corpus=("$RESUME" "$seeds")
else
    cp -r "$seeds" "$work/corpus"
    corpus=("$work/corpus")
fi
# Run a copy: a rebuild during a long campaign must not swap the binary that
# -fork mode starts its jobs from.
cp "$bin" "$work/$target"
bin=$work/$target
mkdir -p fuzz/crashes
# A campaign logs apart, so that the test command's short runs, which write
# fuzz/out/TARGET.log, cannot clobber a campaign running beside them.
log=${FUZZ_LOG:-fuzz/out/$target${campaign:+-campaign}.log}

status=0
# shellcheck disable=SC2086
"$bin" "${limit[@]}" -print_final_stats=1 -max_len=4096 -timeout=10 \
    -artifact_prefix="fuzz/crashes/$target-" ${FUZZ_FLAGS:-} "${corpus[@]}" >"$log" 2>&1 || status=$?

stat() { sed -n "s/^stat::$1: *//p" "$log" | tail -1; }
last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
corp=$(sed -n 's/.* corp: \([^ ]*\).*/\1/p' <<<"$last")
echo "target:     $target"
if [[ $last =~ ^#([0-9]+):\ .*\ time:\ ([0-9]+)s ]]; then
    # -fork=N (FUZZ_FLAGS): the parent's last line sums its workers.
    echo "executions: ${BASH_REMATCH[1]} (fork mode: $(grep -oE -- '-fork=[0-9]+' <<<"${FUZZ_FLAGS:-}") workers)"
    echo "exec/s:     $(( BASH_REMATCH[1] / (BASH_REMATCH[2] > 0 ? BASH_REMATCH[2] : 1) )) (all workers)"
    echo "crashes:    $(sed -n 's/.*oom\/timeout\/crash: \([^ ]*\).*/\1/p' <<<"$last") (oom/timeout/crash)"
else
    echo "executions: $(stat number_of_executed_units)"
    echo "exec/s:     $(stat average_exec_per_sec)"
fi
if [[ -n $cov ]]; then
    size=""
    [[ $corp == */* ]] && size=" (${corp#*/})"
    echo "coverage:   cov $cov ft $ft, corpus ${corp%%/*} units$size"
else
    echo "coverage:   none reported (stopped before the corpus was loaded)"
fi
units=$(stat new_units_added) rss=$(stat peak_rss_mb)
[[ -n $units ]] && echo "new units:  $units"
[[ -n $rss ]] && echo "peak RSS:   $rss MB"
echo "log:        $log"
[[ ${KEEP:-0} == 1 || -n ${RESUME:-} ]] && echo "corpus:     ${corpus[0]}"

if [[ $status -ne 0 ]]; then
    echo "FAILED (exit $status):" >&2
    grep -E 'ERROR|check failed|SUMMARY|Test unit written' "$log" >&2 || tail -40 "$log" >&2
    exit 1
fi
exit
}
