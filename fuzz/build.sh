#!/usr/bin/env bash
# Builds the fuzz targets into fuzz/out/ with libFuzzer, ASan and UBSan.
# Usage: fuzz/build.sh   (CC overrides the compiler; it needs libFuzzer, which the
#                         Swift toolchain's clang has)
set -euo pipefail
cd "$(dirname "$0")/.."

CC=${CC:-clang}
OUT=fuzz/out
SRC=Sources/CDataPlane
mkdir -p "$OUT"

# lld when the toolchain has it: GNU gold warns about every ASan symbol.
LDFLAGS=()
if command -v ld.lld >/dev/null 2>&1; then
    LDFLAGS+=(-fuse-ld=lld)
fi

CFLAGS=(-std=gnu11 -g -O1 -D_GNU_SOURCE
        -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
        -Wall -Wextra -Wno-unused-parameter
        -I"$SRC" -I"$SRC/include")

# vring_blk: both ring walkers and virtio-blk parsing, nothing else of the
# core; the input's first byte picks the layout.
"$CC" "${CFLAGS[@]}" "${LDFLAGS[@]}" -o "$OUT/vring_blk" \
    fuzz/vring_blk_fuzz.c fuzz/fuzz_common.c fuzz/vring_split_model.c fuzz/vring_packed_model.c \
    "$SRC/guest_mem.c" "$SRC/vring_split.c" "$SRC/vring_packed.c" "$SRC/blk.c"
echo "built $OUT/vring_blk"

# The packed ring's deterministic self-test (a well-behaved driver and
# hostile buffers), with the same sanitizers; scripts/test runs it.
"$CC" "${CFLAGS[@]/-fsanitize=fuzzer,address,undefined/-fsanitize=address,undefined}" "${LDFLAGS[@]}" \
    -o "$OUT/vring_packed_selftest" fuzz/vring_packed_selftest.c "$SRC/guest_mem.c" "$SRC/vring_packed.c"
echo "built $OUT/vring_packed_selftest"

# C_ONLY=1: the C targets only (the Swift one below takes minutes).
[[ ${C_ONLY:-0} == 1 ]] && exit 0

# vhost_user: message handling and the device state machine (Swift), built by
# SwiftPM in its own scratch path (release: twice the exec/s of debug) with
# libFuzzer and ASan; the C core the IOThread runs is instrumented too
# (fuzzer-no-link), so ring walking feeds coverage back. DATAPLANE_FUZZ=1
# adds the target to the package.
DATAPLANE_FUZZ=1 swift build -c release --scratch-path .build-fuzz --product vhost-user-fuzz \
    -Xswiftc -sanitize=fuzzer,address -Xswiftc -parse-as-library -Xcc -fsanitize=address \
    -Xcc -fsanitize=fuzzer-no-link -Xswiftc -use-ld=lld 2>&1 | grep -vE "warning: Cannot export|^\[" >&2 || true
[[ -x .build-fuzz/release/vhost-user-fuzz ]] || { echo "build.sh: vhost-user-fuzz did not build" >&2; exit 1; }
cp .build-fuzz/release/vhost-user-fuzz "$OUT/vhost_user"
echo "built $OUT/vhost_user"
