/* What every ring layout's walker produces: a chain of host iovecs, and the
 * one step they share, mapping a buffer descriptor into it. Knows guest
 * memory, not rings' layouts or what a request means. */
#ifndef DP_VRING_CHAIN_H
#define DP_VRING_CHAIN_H

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>

#include "guest_mem.h"

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4

/* A split ring's descriptor; also the 16-byte entry a packed ring's indirect
 * table copy is read from (same size). */
struct vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};
_Static_assert(sizeof(struct vring_desc) == 16, "virtq_desc is 16 bytes");

/* The most entries an indirect table may have (QEMU's VIRTQUEUE_MAX_SIZE).
 * A chain is bounded by the walker's max_chain anyway; this bounds the copy
 * of a table that cannot be read in place. */
#define VRING_INDIRECT_MAX 1024

struct vring_packed_desc;

/* One popped chain, as host iovecs: device-readable ones first, then writable. */
struct vring_chain {
    struct iovec *iov;
    uint32_t iov_max;
    struct vring_desc *scratch; /* VRING_INDIRECT_MAX entries: where an indirect
                                 * table that is misaligned or spans regions is
                                 * copied to be read */
    uint32_t out_num;   /* device-readable iovecs */
    uint32_t in_num;    /* device-writable iovecs, after the readable ones */
    uint64_t out_len;   /* bytes */
    uint64_t in_len;
    bool in_any;        /* a device-writable descriptor was seen (even an empty one) */
    uint32_t desc_reads; /* descriptors read: what walking the chain cost */
    uint8_t *status;    /* last byte of the last descriptor when it is writable and non-empty */
    uint16_t ring_descs; /* packed rings: ring descriptors the buffer took (pushed back with it) */
    struct vring_packed_desc *ring_copy; /* packed rings, or NULL: the buffer's ring descriptors as
                                          * the walk read them (max_chain entries; for the
                                          * inflight region, which keeps them) */
};

static inline void vring_chain_reset(struct vring_chain *chain)
{
    chain->out_num = chain->in_num = 0;
    chain->out_len = chain->in_len = 0;
    chain->in_any = false;
    chain->status = NULL;
}

/* Appends the host iovecs of one buffer descriptor to the chain. Both
 * layouts require device-readable buffers before device-writable ones
 * (split 2.7.4.2, packed 2.8.17; an empty writable one counts too). */
static inline int vring_chain_map(const struct dp_mem *mem, uint64_t addr, uint32_t len, bool writable,
                                  struct vring_chain *chain)
{
    if (!writable && chain->in_any)
        return -EPROTO;
    uint32_t used = chain->out_num + chain->in_num;
    int n = guest_mem_map(mem, addr, len, chain->iov + used, chain->iov_max - used);
    if (n < 0)
        return n;
    chain->status = NULL;
    if (!writable) {
        chain->out_num += (uint32_t)n;
        chain->out_len += len;
        return 0;
    }
    chain->in_num += (uint32_t)n;
    chain->in_len += len;
    chain->in_any = true;
    if (n) {
        const struct iovec *last = &chain->iov[used + (uint32_t)n - 1];
        chain->status = (uint8_t *)last->iov_base + last->iov_len - 1;
    }
    return 0;
}

#endif
