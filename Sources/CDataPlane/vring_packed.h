/* The packed virtqueue walker (virtio 1.2 section 2.8), beside the split one
 * and with the same vring_chain output and fault codes. It knows the
 * descriptor ring, its wrap counters, buffer ids and the two event
 * suppression areas; it does not know what a request means. */
#ifndef DP_VRING_PACKED_H
#define DP_VRING_PACKED_H

#include <endian.h>
#include <stdbool.h>
#include <stdint.h>

#include "guest_mem.h"
#include "vring_chain.h" /* struct vring_chain, VRING_DESC_F_*, VRING_INDIRECT_MAX */

/* 2.8.1: a descriptor is available when AVAIL matches the driver's wrap
 * counter and USED does not; used when both match the device's. */
#define VRING_PACKED_DESC_F_AVAIL (1u << 7)
#define VRING_PACKED_DESC_F_USED (1u << 15)

/* 2.8.10 desc_event_flags. */
#define VRING_PACKED_EVENT_ENABLE 0
#define VRING_PACKED_EVENT_DISABLE 1
#define VRING_PACKED_EVENT_DESC 2 /* only with VIRTIO_F_RING_EVENT_IDX */
#define VRING_PACKED_EVENT_WRAP (1u << 15) /* in desc_event_off_wrap */

struct vring_packed_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t id;
    uint16_t flags;
};
_Static_assert(sizeof(struct vring_packed_desc) == 16, "pvirtq_desc is 16 bytes");

struct vring_packed_event {
    uint16_t off_wrap; /* bits 0-14 descriptor offset, bit 15 wrap counter */
    uint16_t flags;    /* VRING_PACKED_EVENT_* in bits 0-1 */
};
_Static_assert(sizeof(struct vring_packed_event) == 4, "pvirtq_event_suppress is 4 bytes");

struct vring_packed {
    struct vring_packed_desc *desc;
    struct vring_packed_event *driver; /* Driver Area: the guest's wishes for used notifications */
    struct vring_packed_event *device; /* Device Area: ours, for available notifications (kicks) */
    uint16_t size;           /* 1..32768, any value */
    uint16_t avail_idx;      /* next descriptor to pop, < size */
    uint16_t used_idx;       /* next descriptor to write used, < size */
    bool avail_wrap;         /* Driver Ring Wrap Counter expected at avail_idx */
    bool used_wrap;          /* Device Ring Wrap Counter */
    bool event_idx;
    bool indirect;
    uint32_t max_chain;      /* buffer descriptors a chain may have: seg_max + 2 */
    uint32_t inflight;       /* ring descriptors popped and not yet pushed back */
    /* The batch of used descriptors pushed since the last publish: the
     * first one's flags are held back until publish. */
    uint32_t batch_count;
    uint16_t batch_idx;
    uint16_t batch_flags;
    /* Used notifications (EVENT_IDX): the used position when we last
     * decided whether to notify, and the descriptors used since. */
    uint32_t signalled_used; /* position in [0, 2 * size) */
    uint32_t used_since_signal;
    bool signalled_used_valid;
};

/* Bytes the descriptor ring of a queue of this size occupies; each event
 * suppression area is 4 (2.8.10.1). */
#define VRING_PACKED_DESC_BYTES(n) ((uint64_t)(n) * 16)
#define VRING_PACKED_EVENT_BYTES 4

/* The vhost-user GET/SET_VRING_BASE value of a packed ring ("Vring
 * descriptor indices for packed virtqueues"): bits 0-14 the next
 * descriptor to pop, bit 15 the driver wrap counter expected there, bits
 * 16-30 the next descriptor to write used, bit 31 the device wrap counter.
 * The spec calls the indices free-running, but 15 bits with a wrap bit
 * only make sense as ring indices (< size), which is what QEMU sends. A
 * fresh ring is 0x80008000 (both counters start at 1, 2.8.1). */
#define VRING_PACKED_BASE(avail, avail_wrap, used, used_wrap)                             \
    ((uint32_t)(avail) | ((uint32_t)!!(avail_wrap) << 15) | ((uint32_t)(used) << 16) |   \
     ((uint32_t)!!(used_wrap) << 31))
#define VRING_PACKED_BASE_FRESH VRING_PACKED_BASE(0, 1, 0, 1)

/* Point the walker at translated areas; checks alignment (desc 16, event
 * areas 4), size (1..32768) and base (both indices < size, at most size
 * descriptors between them: those are in flight and must be pushed back).
 * -EINVAL otherwise. Chains longer than max_chain buffer descriptors are
 * refused (the device announces seg_max = max_chain - 2). */
int vring_packed_init(struct vring_packed *vr, uint16_t size, void *desc, void *driver_event,
                      void *device_event, uint32_t base, bool event_idx, bool indirect,
                      uint32_t max_chain);

/* Moves the walker to another base (a ring resumed where the inflight
 * region says it stood, not where the frontend's base does): the same
 * checks as init, -EINVAL and nothing changed when it fails. Nothing may
 * be pushed and unpublished. */
int vring_packed_set_base(struct vring_packed *vr, uint32_t base);

/* The GET_VRING_BASE value (see VRING_PACKED_BASE). Used descriptors
 * pushed but not published count as written: publish first. */
uint32_t vring_packed_base(const struct vring_packed *vr);

/* Pops the buffer at the next avail position into chain->iov and returns
 * its id (from its last ring descriptor) and the ring descriptors it takes
 * (to be pushed back with it). -EAGAIN when the descriptor there is not
 * available. Acquire: what the driver wrote before flipping the first
 * descriptor's flags is visible. On a fault nothing is popped. With
 * chain->ring_copy set, the buffer's ring descriptors are copied there as
 * read (pop_status likewise). Faults of
 * the buffer's shape (the ring is broken): -ELOOP (more ring descriptors
 * than the ring has free: the chain runs onto itself or onto buffers in
 * flight), -E2BIG (more than max_chain buffer descriptors, or an indirect
 * table over VRING_INDIRECT_MAX entries), -EBADMSG (a chained ring
 * descriptor not available; an indirect descriptor chained, nested, not
 * negotiated, empty or not whole descriptors; NEXT on a table's last
 * entry), -ENXIO (an indirect table outside guest memory). Faults of one
 * buffer (vring_packed_pop_status still pops it): -EFAULT (an address
 * outside guest memory or wrapping), -ENOBUFS (more iovecs than
 * chain->iov_max), -EPROTO (readable after writable). */
int vring_packed_pop(struct vring_packed *vr, const struct dp_mem *mem, struct vring_chain *chain,
                     uint16_t *id, uint16_t *ndescs);

/* After a pop fault: follows the buffer's links only (no buffer is mapped)
 * and, when its last descriptor is writable, non-empty and in guest memory,
 * returns its last byte in *status and pops the buffer (id and ndescs as
 * pop). Same bounds and shape faults as pop; -ENOMSG when the buffer has
 * no status byte (nothing popped). Adds its reads to chain->desc_reads. */
int vring_packed_pop_status(struct vring_packed *vr, const struct dp_mem *mem,
                            struct vring_chain *chain, uint8_t **status, uint16_t *id,
                            uint16_t *ndescs);

/* The id of the buffer at the next avail position, read from its last ring
 * descriptor without mapping or popping anything, so the caller can check
 * it before the walk (pop) that follows. -EAGAIN when nothing is
 * available; -ELOOP / -EBADMSG as pop for a ring chain that runs on or is
 * not all available. The pop may still fault where this did not. */
int vring_packed_peek_id(const struct vring_packed *vr, uint16_t *id);

/* pop and pop_status for the buffer vring_packed_peek_id named: -EBADMSG,
 * and nothing popped, when the buffer there no longer carries that id (the
 * guest rewrote it between the two reads). */
int vring_packed_pop_id(struct vring_packed *vr, const struct dp_mem *mem, struct vring_chain *chain,
                        uint16_t id, uint16_t *ndescs);
int vring_packed_pop_status_id(struct vring_packed *vr, const struct dp_mem *mem, struct vring_chain *chain,
                               uint8_t **status, uint16_t id, uint16_t *ndescs);

/* A buffer popped before (by this or an earlier backend) walked again from
 * private copies of its n ring descriptors, as the vhost-user inflight
 * region kept them: its ring slots may hold used descriptors by now, but
 * an indirect table it points to is still the guest's (the buffer is not
 * used yet). Nothing is popped; chain->ring_descs = n. The faults of pop
 * and pop_status, and -EBADMSG also when the copies do not make one list
 * of exactly n (NEXT on the last, none on an earlier one, an indirect one
 * among several) or its id is not id. */
int vring_packed_walk_saved(const struct vring_packed *vr, const struct dp_mem *mem, struct vring_chain *chain,
                            const struct vring_packed_desc *saved, uint16_t n, uint16_t id);
int vring_packed_status_saved(const struct vring_packed *vr, const struct dp_mem *mem, struct vring_chain *chain,
                              const struct vring_packed_desc *saved, uint16_t n, uint16_t id, uint8_t **status);

/* Writes a used descriptor (id, len) at the used position and moves past
 * the ndescs ring descriptors its buffer took (2.8.6). Buffers may be
 * pushed in any order. The first of a batch stays invisible to the guest
 * until publish; the others are written whole (flags last) at once.
 * -EINVAL when ndescs is 0 or more than are in flight (a caller bug). */
int vring_packed_push(struct vring_packed *vr, uint16_t id, uint32_t len, uint16_t ndescs);

/* Release: flips the batch's first descriptor last, so the driver, which
 * polls its next used position only, sees the whole batch at once. */
void vring_packed_publish(struct vring_packed *vr);

/* After publish: does the guest want a used notification for what was
 * pushed since the last call? Honours the Driver Area: ENABLE, DISABLE,
 * and with EVENT_IDX the descriptor offset and wrap counter (2.8.10). */
bool vring_packed_should_notify(struct vring_packed *vr);

/* Ask the guest to kick on its next buffer (with EVENT_IDX: when it makes
 * our next avail position available), then look again: returns true when
 * a buffer arrived meanwhile (the caller must not sleep then). */
bool vring_packed_enable_kicks(struct vring_packed *vr);
/* We are polling: the guest need not kick. */
void vring_packed_disable_kicks(struct vring_packed *vr);

/* Is the descriptor at the next avail position available? One acquire
 * load, pairing with the driver's release (write barrier) before it flips
 * a buffer's first flags. */
static inline bool vring_packed_has_avail(const struct vring_packed *vr)
{
    uint16_t flags = le16toh(__atomic_load_n(&vr->desc[vr->avail_idx].flags, __ATOMIC_ACQUIRE));
    bool avail = flags & VRING_PACKED_DESC_F_AVAIL, used = flags & VRING_PACKED_DESC_F_USED;
    return avail == vr->avail_wrap && used != vr->avail_wrap;
}

#endif
