/* The ring interface: what a queue asks of its virtqueue, whatever the
 * layout. Split rings (vring_split.c) are the first layout; a packed one
 * (vring_packed.c) slots in as another case of each switch, with the same
 * struct vring_chain output. A switch on the layout, inlined, rather than
 * function pointers: the hot path pays one predictable branch, no
 * indirect call. Knows descriptor chains, not what a request means. */
#ifndef DP_VRING_H
#define DP_VRING_H

#include "CDataPlane.h"
#include <errno.h>

#include "vring_packed.h"
#include "vring_split.h"

enum vring_layout {
    VRING_LAYOUT_SPLIT = 0,
    VRING_LAYOUT_PACKED = 1,
};

struct vring {
    union {
        struct vring_split split;
        struct vring_packed packed;
    };
    uint8_t layout; /* enum vring_layout */
};

/* Maps the rings cfg places in mem and starts the walker there (split:
 * last_avail_idx from cfg, the used index from the ring; packed: cfg's
 * packed_base). 0 or -errno (-EFAULT: outside guest memory, -EINVAL:
 * misaligned or a bad size or base). */
int vring_init(struct vring *vr, const struct dp_queue_config *cfg, const struct dp_mem *mem, uint32_t max_chain);
/* The same rings in a new memory table (nothing in flight); indices kept. */
int vring_set_mem(struct vring *vr, const struct dp_queue_config *cfg, const struct dp_mem *mem);

/* One switch per call; every layout answers the same contract (vring_split.h,
 * vring_packed.h). A packed ring's "head" is its buffer id. */
#define VRING_DISPATCH(vr, split_call, packed_call) \
    do {                                            \
        switch ((vr)->layout) {                     \
        case VRING_LAYOUT_PACKED:                   \
            packed_call;                            \
        case VRING_LAYOUT_SPLIT:                    \
        default:                                    \
            split_call;                             \
        }                                           \
    } while (0)

static inline uint16_t vring_size(const struct vring *vr)
{
    VRING_DISPATCH(vr, return vr->split.size, return vr->packed.size);
}

/* Where the next pop starts (statistics; packed: without the wrap bit). */
static inline uint16_t vring_last_avail_idx(const struct vring *vr)
{
    VRING_DISPATCH(vr, return vr->split.last_avail_idx, return vr->packed.avail_idx);
}

/* GET_VRING_BASE: split, the next avail index; packed, vhost-user's 32-bit
 * value (both positions and wrap counters). */
static inline uint32_t vring_base(const struct vring *vr)
{
    VRING_DISPATCH(vr, return vr->split.last_avail_idx, return vring_packed_base(&vr->packed));
}

static inline uint16_t vring_used_idx(const struct vring *vr)
{
    VRING_DISPATCH(vr, return vr->split.used_idx, return vr->packed.used_idx);
}

static inline bool vring_has_avail(const struct vring *vr)
{
    VRING_DISPATCH(vr, return vring_split_has_avail(&vr->split), return vring_packed_has_avail(&vr->packed));
}

/* Entries available to pop; -ERANGE when the guest corrupted the ring. A
 * packed ring cannot count without walking: it answers at most what could
 * be, and vring_pop_head says -EAGAIN when nothing is left. */
static inline int vring_avail_count(struct vring *vr)
{
    VRING_DISPATCH(vr, return vring_split_avail_count(&vr->split),
                   return vring_packed_has_avail(&vr->packed) ? vr->packed.size : 0);
}

/* Takes the next chain's head (split: from the avail ring; -EINVAL when it is
 * not < size). Packed: the next buffer's id, read ahead of the walk that
 * pops it (ids must be < size, as Linux gives them: -EINVAL otherwise);
 * -EAGAIN when nothing is available. */
static inline int vring_pop_head(struct vring *vr, uint16_t *head)
{
    int ret;
    VRING_DISPATCH(vr, return vring_split_pop_head(&vr->split, head),
                   ret = vring_packed_peek_id(&vr->packed, head);
                   return ret ? ret : *head < vr->packed.size ? 0 : -EINVAL);
}

static inline void vring_prefetch_next(const struct vring *vr)
{
    VRING_DISPATCH(vr, vring_split_prefetch_next(&vr->split); return, return);
}

/* Maps the chain at head into chain->iov (faults: vring_split.h). Packed:
 * pops the buffer at the avail position, which must be the one
 * vring_pop_head named (-EBADMSG if the guest changed it meanwhile);
 * chain->ring_descs says how many ring descriptors it took. On a fault
 * nothing is popped: vring_status does that. */
static inline int vring_walk(struct vring *vr, const struct dp_mem *mem, uint16_t head,
                             struct vring_chain *chain)
{
    VRING_DISPATCH(vr, return vring_split_walk(&vr->split, mem, head, chain),
                   return vring_packed_pop_id(&vr->packed, mem, chain, head, &chain->ring_descs));
}

/* After a fault: the chain's status byte, if it has one (packed: and pops
 * the buffer, to be pushed back with chain->ring_descs). */
static inline int vring_status(struct vring *vr, const struct dp_mem *mem, uint16_t head,
                               struct vring_chain *chain, uint8_t **status)
{
    VRING_DISPATCH(vr, return vring_split_status(&vr->split, mem, head, chain, status),
                   return vring_packed_pop_status_id(&vr->packed, mem, chain, status, head, &chain->ring_descs));
}

/* Fills the next used element; invisible to the guest until publish.
 * ring_descs: what the walk said (packed), ignored by split rings. */
static inline void vring_push(struct vring *vr, uint16_t head, uint32_t len, uint16_t ring_descs)
{
    VRING_DISPATCH(vr, vring_split_push(&vr->split, head, len); return,
                   (void)vring_packed_push(&vr->packed, head, len, ring_descs); return);
}

/* Release: used elements are visible before the index that covers them. */
static inline void vring_publish(struct vring *vr)
{
    VRING_DISPATCH(vr, vring_split_publish(&vr->split); return, vring_packed_publish(&vr->packed); return);
}

/* After publish: does the guest want an interrupt? */
static inline bool vring_should_notify(struct vring *vr)
{
    VRING_DISPATCH(vr, return vring_split_should_notify(&vr->split),
                   return vring_packed_should_notify(&vr->packed));
}

/* The ring memory the device writes, for dirty logging: split, the used
 * ring (avail_event included); packed, the descriptor ring (used
 * descriptors) and the device event suppression area. Returns the count. */
static inline unsigned vring_device_areas(const struct vring *vr, struct iovec areas[2])
{
    if (vr->layout == VRING_LAYOUT_PACKED) {
        areas[0] = (struct iovec){vr->packed.desc, VRING_DESC_BYTES(vr->packed.size)};
        areas[1] = (struct iovec){vr->packed.device, sizeof(*vr->packed.device)};
        return 2;
    }
    areas[0] = (struct iovec){vr->split.used, VRING_USED_BYTES(vr->split.size)};
    return 1;
}

/* Ask for kicks, then look again: true when requests arrived meanwhile. */
static inline bool vring_enable_kicks(struct vring *vr)
{
    VRING_DISPATCH(vr, return vring_split_enable_kicks(&vr->split),
                   return vring_packed_enable_kicks(&vr->packed));
}

static inline void vring_disable_kicks(struct vring *vr)
{
    VRING_DISPATCH(vr, vring_split_disable_kicks(&vr->split); return,
                   vring_packed_disable_kicks(&vr->packed); return);
}

#endif
