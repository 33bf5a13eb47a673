#!/usr/bin/env bash
# Source coverage a corpus reaches: builds TARGET with clang's source-based
# coverage (no sanitizers), runs every input of CORPUS once, and prints
# llvm-cov's per-file report for the code the target exercises.
#
#   fuzz/coverage.sh TARGET [CORPUS]     (default CORPUS: fuzz/corpus/TARGET)
#
# A campaign's corpus is kept with KEEP=1 fuzz/run.sh ... (the path is printed).
set -euo pipefail
cd "$(dirname "$0")/.."
{
target=${1:-}
corpus=${2:-fuzz/corpus/$target}
[[ $target == vring_blk || $target == vhost_user ]] ||
    { echo "usage: fuzz/coverage.sh vring_blk|vhost_user [CORPUS]" >&2; exit 2; }
[[ -d $corpus ]] || { echo "coverage.sh: no corpus directory $corpus" >&2; exit 2; }
tools=$(dirname "$(readlink -f "$(command -v "${CC:-clang}")")")
profdata=$tools/llvm-profdata
llvmcov=$tools/llvm-cov
[[ -x $profdata && -x $llvmcov ]] || { profdata=llvm-profdata; llvmcov=llvm-cov; }

work=$(mktemp -d "${TMPDIR:-/tmp}/fuzzcov-$target.XXXXXX")
trap 'rm -rf "$work"' EXIT
src=Sources/CDataPlane
if [[ $target == vring_blk ]]; then
    files=("$src/guest_mem.c" "$src/vring_split.c" "$src/vring_packed.c" "$src/blk.c")
    bin=$work/$target
    "${CC:-clang}" -std=gnu11 -g -O1 -D_GNU_SOURCE -fsanitize=fuzzer -fprofile-instr-generate -fcoverage-mapping \
        -I"$src" -I"$src/include" -o "$bin" fuzz/vring_blk_fuzz.c fuzz/fuzz_common.c fuzz/vring_split_model.c \
        fuzz/vring_packed_model.c "${files[@]}"
else
    files=(Sources/DataPlane/VhostUser/*.swift "$src"/{queue,iothread,inflight,guest_mem,vring_split,blk,backend_null}.c)
    DATAPLANE_FUZZ=1 swift build --scratch-path .build-fuzzcov --product vhost-user-fuzz \
        -Xswiftc -sanitize=fuzzer -Xswiftc -parse-as-library -Xswiftc -use-ld=lld \
        -Xswiftc -profile-generate -Xswiftc -profile-coverage-mapping \
        -Xcc -fprofile-instr-generate -Xcc -fcoverage-mapping 2>&1 | grep -E "error:" >&2 || true
    bin=.build-fuzzcov/debug/vhost-user-fuzz
    [[ -x $bin ]] || { echo "coverage.sh: vhost-user-fuzz did not build" >&2; exit 1; }
fi
# -runs=0: load (run) every corpus input once, mutate nothing.
LLVM_PROFILE_FILE="$work/%p.profraw" "$bin" -runs=0 -max_len=4096 "$corpus" >"$work/run.log" 2>&1 ||
    { tail -20 "$work/run.log" >&2; exit 1; }
"$profdata" merge -sparse "$work"/*.profraw -o "$work/cov.profdata"
echo "target $target, corpus $corpus ($(find "$corpus" -type f | wc -l) inputs)"
"$llvmcov" report "$bin" -instr-profile="$work/cov.profdata" "${files[@]}" 2>/dev/null |
    sed "s|$PWD/||"
exit
}
