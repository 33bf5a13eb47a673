/* The ring interface: what a queue asks of its virtqueue, whatever the
 * layout. Split rings (vring_split.c) are the first layout; a packed one
 * (vring_packed.c) slots in as another case of each switch, with the same
 * struct vring_chain output. A switch on the layout, inlined, rather than
 * function pointers: the hot path pays one predictable branch, no
 * indirect call. Knows descriptor chains, not what a request means. */
#ifndef DP_VRING_H
#define DP_VRING_H

#include "CDataPlane.h"
#include "vring_split.h"

enum vring_layout {
    VRING_LAYOUT_SPLIT = 0,
};

struct vring {
    union {
        struct vring_split split;
    };
    uint8_t layout; /* enum vring_layout */
};

/* Maps the rings cfg places in mem and starts the walker there (last_avail_idx
 * from cfg, the used index from the ring). 0 or -errno (-EFAULT: outside
 * guest memory, -EINVAL: misaligned or a bad size). */
int vring_init(struct vring *vr, const struct dp_queue_config *cfg, const struct dp_mem *mem, uint32_t max_chain);
/* The same rings in a new memory table (nothing in flight); indices kept. */
int vring_set_mem(struct vring *vr, const struct dp_queue_config *cfg, const struct dp_mem *mem);

/* One switch per call; every layout answers the same contract (vring_split.h). */
#define VRING_DISPATCH(vr, split_call) \
    do {                               \
        switch ((vr)->layout) {        \
        case VRING_LAYOUT_SPLIT:       \
        default:                       \
            split_call;                \
        }                              \
    } while (0)

static inline uint16_t vring_size(const struct vring *vr)
{
    VRING_DISPATCH(vr, return vr->split.size);
}

/* GET_VRING_BASE: where the next pop starts. */
static inline uint16_t vring_last_avail_idx(const struct vring *vr)
{
    VRING_DISPATCH(vr, return vr->split.last_avail_idx);
}

static inline uint16_t vring_used_idx(const struct vring *vr)
{
    VRING_DISPATCH(vr, return vr->split.used_idx);
}

static inline bool vring_has_avail(const struct vring *vr)
{
    VRING_DISPATCH(vr, return vring_split_has_avail(&vr->split));
}

/* Entries available to pop; -ERANGE when the guest corrupted the ring. */
static inline int vring_avail_count(struct vring *vr)
{
    VRING_DISPATCH(vr, return vring_split_avail_count(&vr->split));
}

/* Takes the next chain's head (its buffer id); -EINVAL when out of range. */
static inline int vring_pop_head(struct vring *vr, uint16_t *head)
{
    VRING_DISPATCH(vr, return vring_split_pop_head(&vr->split, head));
}

static inline void vring_prefetch_next(const struct vring *vr)
{
    VRING_DISPATCH(vr, vring_split_prefetch_next(&vr->split); return);
}

/* Maps the chain at head into chain->iov (faults: vring_split.h). */
static inline int vring_walk(const struct vring *vr, const struct dp_mem *mem, uint16_t head,
                             struct vring_chain *chain)
{
    VRING_DISPATCH(vr, return vring_split_walk(&vr->split, mem, head, chain));
}

/* After a fault: the chain's status byte, if it has one. */
static inline int vring_status(const struct vring *vr, const struct dp_mem *mem, uint16_t head,
                               struct vring_chain *chain, uint8_t **status)
{
    VRING_DISPATCH(vr, return vring_split_status(&vr->split, mem, head, chain, status));
}

/* Fills the next used element; invisible to the guest until publish. */
static inline void vring_push(struct vring *vr, uint16_t head, uint32_t len)
{
    VRING_DISPATCH(vr, vring_split_push(&vr->split, head, len); return);
}

/* Release: used elements are visible before the index that covers them. */
static inline void vring_publish(struct vring *vr)
{
    VRING_DISPATCH(vr, vring_split_publish(&vr->split); return);
}

/* After publish: does the guest want an interrupt? */
static inline bool vring_should_notify(struct vring *vr)
{
    VRING_DISPATCH(vr, return vring_split_should_notify(&vr->split));
}

/* Ask for kicks, then look again: true when requests arrived meanwhile. */
static inline bool vring_enable_kicks(struct vring *vr)
{
    VRING_DISPATCH(vr, return vring_split_enable_kicks(&vr->split));
}

static inline void vring_disable_kicks(struct vring *vr)
{
    VRING_DISPATCH(vr, vring_split_disable_kicks(&vr->split); return);
}

#endif
