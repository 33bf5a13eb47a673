/* The split virtqueue walker (virtio 1.x section 2.7). It knows descriptor
 * chains, the avail and used rings and EVENT_IDX; it does not know what a
 * request means. A packed-ring walker can sit beside it with the same
 * vring_chain output. */
#ifndef DP_VRING_SPLIT_H
#define DP_VRING_SPLIT_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>

#include "guest_mem.h"
#include "vring_chain.h"

#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VRING_USED_F_NO_NOTIFY 1

struct vring_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[]; /* then le16 used_event */
};

struct vring_used_elem {
    uint32_t id;
    uint32_t len;
};

struct vring_used {
    uint16_t flags;
    uint16_t idx;
    struct vring_used_elem ring[]; /* then le16 avail_event */
};

struct vring_split {
    struct vring_desc *desc;
    struct vring_avail *avail;
    struct vring_used *used;
    uint16_t size;           /* power of two; 32768 at most */
    uint16_t last_avail_idx; /* next avail entry to pop */
    uint16_t shadow_avail_idx; /* avail->idx as last read */
    uint16_t used_idx;       /* next used entry to fill */
    uint16_t signalled_used; /* used_idx when we last decided whether to notify */
    bool signalled_used_valid;
    bool event_idx;
    bool indirect;
    uint32_t max_chain;      /* buffer descriptors a chain may have: seg_max + 2 */
};

/* Bytes the rings of a queue of this size occupy (spec 2.7: desc, avail, used). */
#define VRING_DESC_BYTES(n) ((uint64_t)(n) * 16)
#define VRING_AVAIL_BYTES(n) (6 + 2 * (uint64_t)(n))
#define VRING_USED_BYTES(n) (6 + 8 * (uint64_t)(n))

/* Point the walker at translated rings; checks alignment (desc 16, avail 2, used 4).
 * used_idx resumes from the ring. Chains longer than max_chain buffer
 * descriptors are refused (the device announces seg_max = max_chain - 2). */
int vring_split_init(struct vring_split *vr, uint16_t size, void *desc, void *avail, void *used,
                     uint16_t last_avail_idx, bool event_idx, bool indirect, uint32_t max_chain);

/* Number of new entries in the avail ring. -ERANGE when the guest moved its
 * index more than the queue size ahead (the ring is corrupt). Acquire: entries
 * and descriptors the guest wrote before publishing avail->idx become visible. */
int vring_split_avail_count(struct vring_split *vr);

/* Takes the next head from the avail ring; -EINVAL when it is not < size. */
int vring_split_pop_head(struct vring_split *vr, uint16_t *head);
/* Starts loading the next avail entry's descriptor while this one is walked. */
void vring_split_prefetch_next(const struct vring_split *vr);

/* Walks the chain starting at head into chain->iov, stopping at the first
 * fault. Returns 0 or a fault. Faults of the chain's shape (the request
 * cannot be answered without guessing): -ELOOP (a table revisited: more
 * descriptors than it holds), -E2BIG (more than max_chain buffer
 * descriptors, or an indirect table over VRING_INDIRECT_MAX entries),
 * -EBADMSG (next outside its table; an indirect table nested, chained,
 * empty, not whole descriptors, or not negotiated), -ENXIO (an indirect
 * table outside guest memory). Faults of one buffer (vring_split_status
 * still finds the status byte): -EFAULT (an address outside guest memory or
 * wrapping), -ENOBUFS (more iovecs than chain->iov_max), -EPROTO (readable
 * after writable). */
int vring_split_walk(const struct vring_split *vr, const struct dp_mem *mem, uint16_t head,
                     struct vring_chain *chain);

/* After a fault: follows the chain's links only (no buffer is mapped) to its
 * last descriptor and returns its last byte in *status when it is writable,
 * non-empty and in guest memory. Same bounds and shape faults as the walk;
 * -ENOMSG when the chain has no status byte. Adds its reads to
 * chain->desc_reads. */
int vring_split_status(const struct vring_split *vr, const struct dp_mem *mem, uint16_t head,
                       struct vring_chain *chain, uint8_t **status);

/* Fills the next used element; invisible to the guest until publish. */
void vring_split_push(struct vring_split *vr, uint16_t head, uint32_t len);

/* Release: used elements are visible before the index that covers them. */
void vring_split_publish(struct vring_split *vr);

/* After publish: does the guest want an interrupt for what was pushed since
 * the last call? Honours EVENT_IDX (used_event) or VRING_AVAIL_F_NO_INTERRUPT. */
bool vring_split_should_notify(struct vring_split *vr);

/* Ask the guest to kick on its next request, then look again: returns true
 * when requests arrived meanwhile (the caller must not sleep then). */
bool vring_split_enable_kicks(struct vring_split *vr);
/* We are polling: the guest need not kick. */
void vring_split_disable_kicks(struct vring_split *vr);

/* Cheap check for new avail entries (one acquire load). */
static inline bool vring_split_has_avail(const struct vring_split *vr)
{
    return __atomic_load_n(&vr->avail->idx, __ATOMIC_ACQUIRE) != vr->last_avail_idx;
}

#endif
