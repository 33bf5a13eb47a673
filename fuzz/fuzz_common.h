/*
 * What the two ring models of the vring_blk fuzz target share: the input
 * decoder, guest memory (regions with exactly-sized host buffers, so ASan
 * sees any stray access), the disk, the checks of a walked chain and of
 * blk_parse's output, and the null backend. fuzz/vring_blk_fuzz.c documents
 * the input format; fuzz/vring_split_model.c and fuzz/vring_packed_model.c
 * re-enact a device loop on each ring layout.
 */
#ifndef DATAPLANE_FUZZ_COMMON_H
#define DATAPLANE_FUZZ_COMMON_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/uio.h>

#include "blk.h"
#include "dp_internal.h"
#include "guest_mem.h"
#include "vring_chain.h"

#ifndef FZ_MAX_REGIONS
#define FZ_MAX_REGIONS 3
#endif
#define FZ_MAX_OPS 512
#define FZ_MAX_TABLE 64 /* descriptors one OP_TABLE writes */
#define FZ_MAX_POKE 64  /* bytes one OP_POKE writes */

/* The header's first byte. */
#define FZ_F_EVENT_IDX 0x01
#define FZ_F_INDIRECT 0x02
#define FZ_F_READ_ONLY 0x04
#define FZ_F_PACKED 0x40
#define FZ_CHAIN_LIMIT(features) fz_chain_limits[((features) >> 3) & 7]
extern const uint32_t fz_chain_limits[8];

/* VRING_BLK_FUZZ_VERBOSE=1 in the environment traces each chain (for seeds
 * and reproducers; never while fuzzing). */
extern bool fz_verbose;

#define FZ_TRACE(...)                         \
    do {                                      \
        if (fz_verbose)                       \
            fprintf(stderr, __VA_ARGS__);     \
    } while (0)

#define FZ_CHECK(cond)                                                                   \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            fprintf(stderr, "vring_blk_fuzz: check failed: %s (%s:%d)\n", #cond, __FILE__, \
                    __LINE__);                                                           \
            abort();                                                                     \
        }                                                                                \
    } while (0)

/* Reads past the end yield zeroes and set eof. */
struct fz_input {
    const uint8_t *p;
    size_t left;
    bool eof;
};

void fz_take(struct fz_input *in, void *out, size_t n);
uint8_t fz_u8(struct fz_input *in);
uint16_t fz_u16(struct fz_input *in);
uint32_t fz_u32(struct fz_input *in);
uint64_t fz_u64(struct fz_input *in);

struct fz_region {
    uint64_t gpa;
    uint64_t size;
    uint8_t *host; /* malloc'ed to exactly size bytes */
};

/* Guest memory, the disk and the walker's limits and scratch space. */
struct fz_mem {
    struct fz_region regions[FZ_MAX_REGIONS];
    unsigned region_count;
    struct dp_mem *mem;
    struct dp_disk disk;
    uint32_t iov_max;
    uint32_t max_chain;
    struct iovec scratch[DP_REQ_MAX_IOV]; /* the chain's iovecs before blk_parse edits them */
    struct vring_desc indirect_scratch[VRING_INDIRECT_MAX];
};

/* The region whose host buffer holds [p, p + len), or NULL. */
const struct fz_region *fz_host_region(const struct fz_mem *m, const void *p, size_t len);
/* sel >= 0xc0: a raw u64; else a region (sel & 0x3f) % count plus an s32 offset. */
uint64_t fz_gpa(const struct fz_mem *m, struct fz_input *in);
/* The guest writes bytes; those outside every region are lost, as on real hardware. */
void fz_guest_write(struct fz_mem *m, uint64_t gpa, const void *buf, size_t len);

/* The header after the layout's queue size: regions, iov_max, disk. False
 * when the layout is refused (the input is skipped, as production refuses it). */
bool fz_setup(struct fz_mem *m, struct fz_input *in, uint8_t features);
void fz_teardown_mem(struct fz_mem *m);

/* The walker's output, whether it succeeded or not (the layouts add their
 * own bounds on descriptor reads). */
void fz_check_chain(const struct fz_mem *m, int ret, const struct vring_chain *c);
/* blk_parse's output against the chain it parsed (m->scratch holds the
 * chain's iovecs as the walker left them). */
void fz_check_parse(const struct fz_mem *m, const struct vring_chain *c, const struct blk_req *req, int status,
                    enum dp_err err);
/* The null backend, touching every byte: reads fill the buffers, writes read them. */
uint8_t fz_backend_run(struct blk_req *req, bool fail);

/* Each layout's run over the rest of the input (after the features byte). */
void fz_split_run(struct fz_input *in, uint8_t features);
void fz_packed_run(struct fz_input *in, uint8_t features);

#endif
