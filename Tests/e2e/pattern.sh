#!/usr/bin/env bash
# Host side of the e2e data pattern (definition: guest/pattern.awk, run here by
# the host's awk, in the guest by busybox awk). Checks a disk image
# independently of the guest.
#
#   pattern.sh gen SEED OFFSET LENGTH            pattern bytes to stdout
#   pattern.sh verify-image IMAGE SEED O:L...    image holds the pattern in each
#                                                range (O<0: from the end; K/M/G)
#   pattern.sh verify-long-io IMAGE SEED O:L SLOT WRITES
#                                                image holds what the long-io
#                                                workload's last WRITES writes left
#   pattern.sh verify-log IMAGE LOG              reads the E2E-RESULT: PASS line
#                                                in a boot log and runs the check
#                                                that fits its workload
#   pattern.sh selftest                          host awk == busybox awk
#
# Exit status: 0 match, 1 mismatch (first differing byte reported), 2 usage.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
pat=$here/guest/pattern.awk
AWK=${AWK:-awk}

die() { echo "pattern.sh: error: $*" >&2; exit 2; }
[[ -r $pat ]] || die "missing $pat"

parse_size() { # 4M -> 4194304; -2M -> -2097152
    local v=$1 sign= n
    [[ $v == -* ]] && { sign=-; v=${v#-}; }
    case $v in
        *[kK]) n=$(( ${v%?} * 1024 )) ;;
        *[mM]) n=$(( ${v%?} * 1048576 )) ;;
        *[gG]) n=$(( ${v%?} * 1073741824 )) ;;
        *[!0-9]*|'') die "bad size '$1'" ;;
        *) n=$v ;;
    esac
    echo "$sign$n"
}

gen() { # seed off len
    [[ $1 =~ ^[0-9]+$ ]] || die "bad seed '$1'"
    "$AWK" -v seed="$1" -v off="$2" -v len="$3" -f "$pat"
}

image_size() { stat -L -c %s "$1"; }

# Compares IMAGE[off, off+len) with the pattern; reports the first difference.
check_range() { # image seed off len label
    local image=$1 seed=$2 off=$3 len=$4 label=$5 out at rec
    [[ $((off % 512)) == 0 && $((len % 512)) == 0 ]] || die "$label: offset/length must be multiples of 512"
    if out=$(cmp <(gen "$seed" "$off" "$len") \
                 <(dd if="$image" bs=1M iflag=skip_bytes,count_bytes skip="$off" count="$len" status=none) 2>&1); then
        return 0
    fi
    echo "MISMATCH $label: image $image range $off+$len (seed $seed): $out" >&2
    if [[ $out =~ (byte|char)\ ([0-9]+) ]]; then
        at=$(( off + BASH_REMATCH[2] - 1 ))
        rec=$(( at / 64 * 64 ))
        echo "  first difference at absolute byte $at; the 64-byte line at $rec:" >&2
        echo "    expected: $(gen "$seed" $(( at / 512 * 512 )) 512 | sed -n "$(( (at % 512) / 64 + 1 ))p")" >&2
        echo "    image:    $(dd if="$image" bs=64 iflag=skip_bytes skip="$rec" count=1 status=none | tr -c '[:print:]' '?')" >&2
    fi
    return 1
}

verify_image() { # image seed O:L...
    local image=$1 seed=$2 size r o l bad=0 n=0
    shift 2
    [[ -r $image ]] || die "cannot read image $image"
    [[ $# -gt 0 ]] || die "verify-image needs at least one O:L range"
    size=$(image_size "$image")
    for r in "$@"; do
        [[ $r == *:* ]] || die "bad range '$r' (want OFFSET:LENGTH)"
        o=$(parse_size "${r%%:*}"); l=$(parse_size "${r#*:}")
        [[ $o == -* ]] && o=$(( size + o ))
        (( o >= 0 && l > 0 && o + l <= size )) || die "range $r ($o+$l) outside the image ($size bytes)"
        if check_range "$image" "$seed" "$o" "$l" "range $r"; then n=$((n + 1)); else bad=1; fi
    done
    if [[ $bad == 0 ]]; then echo "pattern.sh: OK: $image holds seed $seed in $n range(s): $*"; fi
    return $bad
}

verify_long_io() { # image seed O:L slot writes
    local image=$1 seed=$2 r=$3 slot writes size o l nslots s last bad=0
    slot=$(parse_size "$4"); writes=$5
    [[ $writes =~ ^[0-9]+$ ]] || die "bad write count '$writes'"
    size=$(image_size "$image")
    o=$(parse_size "${r%%:*}"); l=$(parse_size "${r#*:}")
    [[ $o == -* ]] && o=$(( size + o ))
    (( slot > 0 && l % slot == 0 )) || die "slot $slot must divide region length $l"
    nslots=$(( l / slot ))
    for (( s = 0; s < nslots && s < writes; s++ )); do
        last=$(( s + ((writes - 1 - s) / nslots) * nslots ))
        check_range "$image" $(( seed + last )) $(( o + s * slot )) "$slot" "slot $s (write $last)" || bad=1
    done
    if [[ $bad == 0 ]]; then
        echo "pattern.sh: OK: $image holds the last of $writes long-io writes in each of $(( writes < nslots ? writes : nslots )) slot(s) of $o+$l"
    fi
    return $bad
}

verify_log() { # image log
    local image=$1 log=$2 line wl seed regions region slot writes
    [[ -r $log ]] || die "cannot read log $log"
    line=$(grep -a -o 'E2E-RESULT: PASS .*' "$log" | tail -n 1 | tr -d '\r') \
        || { echo "pattern.sh: no E2E-RESULT: PASS line in $log" >&2; return 1; }
    field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<" ${line#E2E-RESULT: PASS }"; }
    wl=$(field workload); seed=$(field seed)
    case $wl in
        write-verify|mq|dio-large|cache-reads|grow|write-cache)
            regions=$(field regions)
            [[ -n $seed && -n $regions ]] || die "result line lacks seed/regions: $line"
            # shellcheck disable=SC2046
            verify_image "$image" "$seed" $(tr ',' ' ' <<<"$regions")
            ;;
        long-io)
            region=$(field region); slot=$(field slot); writes=$(field writes)
            [[ -n $seed && -n $region && -n $slot && -n $writes ]] || die "result line lacks long-io fields: $line"
            verify_long_io "$image" "$seed" "$region" "$slot" "$writes"
            ;;
        *) echo "pattern.sh: workload '$wl' writes no pattern; nothing to check"; return 0 ;;
    esac
}

selftest() {
    local a b bb=${BUSYBOX:-/bin/busybox}
    [[ -x $bb ]] || die "$bb not found (busybox-static)"
    for args in "1 0 4194304" "4294967295 1099511627776 65536" "12345 17179869184 8192"; do
        set -- $args
        a=$(gen "$1" "$2" "$3" | md5sum)
        b=$("$bb" awk -v seed="$1" -v off="$2" -v len="$3" -f "$pat" | md5sum)
        [[ $a == "$b" ]] || { echo "pattern.sh: selftest FAILED for seed=$1 off=$2 len=$3: $AWK and busybox awk differ" >&2; return 1; }
        [[ $(gen "$1" "$2" "$3" | wc -c) == "$3" ]] || { echo "pattern.sh: selftest FAILED: wrong length" >&2; return 1; }
    done
    echo "pattern.sh: selftest OK ($AWK and busybox awk agree)"
}

cmd=${1:-}
[[ $# -gt 0 ]] && shift
case $cmd in
    gen) [[ $# == 3 ]] || die "usage: gen SEED OFFSET LENGTH"; gen "$1" "$(parse_size "$2")" "$(parse_size "$3")" ;;
    verify-image) [[ $# -ge 3 ]] || die "usage: verify-image IMAGE SEED O:L..."; verify_image "$@" ;;
    verify-long-io) [[ $# == 5 ]] || die "usage: verify-long-io IMAGE SEED O:L SLOT WRITES"; verify_long_io "$@" ;;
    verify-log) [[ $# == 2 ]] || die "usage: verify-log IMAGE LOG"; verify_log "$@" ;;
    selftest) selftest ;;
    -h|--help|'') sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; [[ -n $cmd ]] ;;
    *) die "unknown command '$cmd' (see --help)" ;;
esac
