/*
 * libFuzzer target: the ring walkers (vring_split.c, vring_packed.c) and
 * virtio-blk request parsing (blk.c) over guest memory (guest_mem.c), driven
 * the way a hostile guest drives them, on both ring layouts.
 *
 * Only those four files are linked in. The queue's pop/complete loop is
 * re-enacted per layout (fuzz/vring_split_model.c, fuzz/vring_packed_model.c:
 * slots, the "already in flight" check, faults and the status-byte search,
 * the broken state, completion in any order, batches published) without
 * io_uring, threads or eventfds; the null backend touches every byte of a
 * request's buffers, so AddressSanitizer sees any iovec that strays outside
 * guest memory.
 *
 * The input is decoded, not interpreted as raw memory (the structured style of
 * rust-vmm vm-virtio's fuzz/fuzz_targets/virtio_queue.rs): a memory layout and
 * a queue, then a sequence of guest writes and device operations. Reads past
 * the end of the input yield zeroes, so every input decodes to something.
 * All integers are little-endian. fuzz/make_seeds.py (split) and
 * fuzz/make_packed_seeds.py (packed) write inputs in this format; keep them
 * in step.
 *
 *   header
 *     u8  features     bit0 EVENT_IDX, bit1 INDIRECT_DESC, bit2 read-only disk,
 *                      bits 3-5 the chain limit (max_chain: seg_max + 2):
 *                      130, 1, 2, 3, 4, 16, 64, 1024; bit6 the packed layout
 *     u8  size         the queue size (the layout's model says how)
 *     u8  regions      count = 1 + v % 3
 *     region * count
 *       u8  place      0 gpa = param; 1 right after the previous region;
 *                      2 after the previous one with a gap of param % 4096;
 *                      3 ending param % 4096 bytes below 2^64
 *                      (1 and 2 for the first region: gpa = param % 2^32)
 *       u16 size       1 + v bytes
 *       u64 param
 *     u16 iov_max      iovecs a chain may fill: 1 + v % DP_REQ_MAX_IOV
 *     u64 capacity     sectors, made valid the way dp_disk_create checks
 *     u8  lbs_log2     logical block size = 512 << (v % 8)
 *     ...              the layout's ring placement and start positions
 *   operations, until the input runs out (at most FZ_MAX_OPS)
 *     u8  op % the layout's op count, then its arguments
 *
 *   gpa   u8 sel; sel >= 0xc0: u64 raw address; else region (sel & 0x3f) %
 *         count (in input order) plus an s32 offset, so most addresses land
 *         in or near memory without the fuzzer having to guess them.
 *
 * Checks on both layouts (abort() on violation, besides ASan/UBSan): every
 * iovec the walker returns lies inside one region's host buffer and is
 * non-empty, also when it stopped at a fault; counts stay within iov_max;
 * byte totals match out_len/in_len; the status byte lies in a region and is
 * the last byte of the last writable iovec; a fault either finds the status
 * byte (the request completes with IOERR written there) or breaks the ring,
 * never completes a chain without one; blk_parse's req->iov is a sub-range of
 * the chain's iovecs (readable ones for writes, writable ones minus the
 * status byte for reads) whose bytes add up to req->len; requests handed to
 * the backend are within capacity, block aligned and <= 1 GiB. Each model
 * adds the checks of its ring (see there).
 */
#ifndef _GNU_SOURCE
#error "build with -D_GNU_SOURCE (fuzz/build.sh does)"
#endif

#include <stdlib.h>

#include "fuzz_common.h"

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    const char *v = getenv("VRING_BLK_FUZZ_VERBOSE");
    fz_verbose = v && *v && *v != '0';
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fz_input in = {.p = data, .left = size};
    uint8_t features = fz_u8(&in);
    if (features & FZ_F_PACKED)
        fz_packed_run(&in, features);
    else
        fz_split_run(&in, features);
    return 0;
}
