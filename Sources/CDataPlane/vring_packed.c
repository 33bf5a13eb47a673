/* The packed virtqueue walker. Every flag, address, length and id comes
 * from the guest and is checked before use; the checks cite virtio 1.2
 * section 2.8. The ring index wraps at size (any value, not a power of
 * two) and the wrap counters tell laps apart; "positions" below number the
 * descriptors of two laps, [0, 2 * size), so that distances are plain. */
#include <errno.h>
#include <stddef.h>
#include <stdatomic.h>

#include "vring_packed.h"

/* Guest-shared fields are read once each, with relaxed atomics, so a guest
 * changing them under us cannot make a checked value differ from a used one. */
#define READ_ONCE(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define WRITE_ONCE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)

/* Ring and indirect descriptors are read through their byte offsets: an
 * indirect table may sit in chain->scratch, declared as split descriptors
 * (same size, same field widths at the same offsets). */
_Static_assert(offsetof(struct vring_packed_desc, len) == 8, "len at 8");
_Static_assert(offsetof(struct vring_packed_desc, id) == 12, "id at 12");
_Static_assert(offsetof(struct vring_packed_desc, flags) == 14, "flags at 14");
_Static_assert(sizeof(struct vring_desc) == sizeof(struct vring_packed_desc), "scratch holds tables");

static void desc_read(const void *table, uint32_t i, struct vring_packed_desc *d)
{
    const uint8_t *p = (const uint8_t *)table + (size_t)i * sizeof(*d);
    d->addr = le64toh(READ_ONCE((const uint64_t *)p));
    d->len = le32toh(READ_ONCE((const uint32_t *)(p + 8)));
    d->id = le16toh(READ_ONCE((const uint16_t *)(p + 12)));
    d->flags = le16toh(READ_ONCE((const uint16_t *)(p + 14)));
}

static bool flags_avail(uint16_t flags, bool wrap)
{
    bool avail = flags & VRING_PACKED_DESC_F_AVAIL, used = flags & VRING_PACKED_DESC_F_USED;
    return avail == wrap && used != wrap;
}

/* The position of index idx in the lap whose wrap counter is wrap (the
 * first lap has wrap 1, 2.8.1). */
static uint32_t ring_pos(const struct vring_packed *vr, uint32_t idx, bool wrap)
{
    return idx + (wrap ? 0 : vr->size);
}

int vring_packed_init(struct vring_packed *vr, uint16_t size, void *desc, void *driver_event,
                      void *device_event, uint32_t base, bool event_idx, bool indirect,
                      uint32_t max_chain)
{
    if (size == 0 || size > DP_QUEUE_MAX_SIZE || max_chain == 0)
        return -EINVAL;
    if (((uintptr_t)desc & 15) || ((uintptr_t)driver_event & 3) || ((uintptr_t)device_event & 3))
        return -EINVAL;
    *vr = (struct vring_packed){
        .desc = desc, .driver = driver_event, .device = device_event, .size = size,
        .event_idx = event_idx, .indirect = indirect, .max_chain = max_chain,
    };
    return vring_packed_set_base(vr, base);
}

int vring_packed_set_base(struct vring_packed *vr, uint32_t base)
{
    uint16_t avail = base & 0x7fff, used = (base >> 16) & 0x7fff;
    bool avail_wrap = base & (1u << 15), used_wrap = base & (1u << 31);
    if (avail >= vr->size || used >= vr->size)
        return -EINVAL;
    /* What lies between the used and the avail position was popped before
     * and is still in flight; more than a ring's worth cannot be. */
    uint32_t two = 2u * vr->size;
    uint32_t inflight = (ring_pos(vr, avail, avail_wrap) + two - ring_pos(vr, used, used_wrap)) % two;
    if (inflight > vr->size)
        return -EINVAL;
    vr->avail_idx = avail;
    vr->avail_wrap = avail_wrap;
    vr->used_idx = used;
    vr->used_wrap = used_wrap;
    vr->inflight = inflight;
    vr->batch_count = 0;
    vr->signalled_used = ring_pos(vr, used, used_wrap);
    vr->used_since_signal = 0;
    vr->signalled_used_valid = false;
    return 0;
}

uint32_t vring_packed_base(const struct vring_packed *vr)
{
    return VRING_PACKED_BASE(vr->avail_idx, vr->avail_wrap, vr->used_idx, vr->used_wrap);
}

/* Where a walk stands in a buffer: the ring, then maybe one indirect
 * table, and the bounds that keep a hostile buffer finite. */
struct pcursor {
    const struct vring_packed_desc *saved; /* a buffer popped before: copies of its ring
                                            * descriptors, read instead of the ring */
    const void *table;   /* the indirect table once entered */
    uint32_t table_size; /* its entries */
    uint32_t table_next; /* the next entry to read */
    uint32_t ring_next;  /* the next ring index to read, < size */
    bool ring_wrap;      /* the driver wrap counter expected there */
    uint32_t ring_left;  /* ring descriptors the buffer may still take */
    uint32_t budget;     /* buffer descriptors it may still have */
    uint16_t ndescs;     /* ring descriptors taken */
    uint16_t id;         /* from the last ring descriptor */
    bool in_indirect;
    bool done;
};

static void cursor_init(const struct vring_packed *vr, struct pcursor *c)
{
    *c = (struct pcursor){
        .ring_next = vr->avail_idx,
        .ring_wrap = vr->avail_wrap,
        /* 2.8.16: the driver only reuses descriptors it has seen used, so a
         * buffer never takes more than the ring minus what is in flight.
         * Past that it runs onto itself or onto our in-flight buffers. */
        .ring_left = vr->size - vr->inflight,
        .budget = vr->max_chain,
    };
}

/* A buffer popped before, walked again from the copies of its n ring
 * descriptors (private memory: each value was read once). Their AVAIL and
 * USED bits are a past lap's and are not checked; the list must end with
 * the last copy. */
static void cursor_init_saved(const struct vring_packed *vr, struct pcursor *c,
                              const struct vring_packed_desc *saved, uint16_t n)
{
    *c = (struct pcursor){.saved = saved, .ring_left = n, .budget = vr->max_chain};
}

/* Reads the buffer's next ring descriptor (and copies it to
 * chain->ring_copy when asked). */
static int cursor_read_ring(const struct vring_packed *vr, struct pcursor *c,
                            struct vring_chain *chain, struct vring_packed_desc *d)
{
    if (c->ring_left == 0)
        return c->saved ? -EBADMSG : -ELOOP; /* saved: NEXT on the last copy */
    c->ring_left--;
    chain->desc_reads++;
    if (c->saved) {
        *d = c->saved[c->ndescs++];
        return 0;
    }
    desc_read(vr->desc, c->ring_next, d);
    /* 2.8.6: every descriptor of a list carries correct AVAIL/USED flags;
     * one that does not is not part of what the driver made available. */
    if (!flags_avail(d->flags, c->ring_wrap))
        return -EBADMSG;
    /* A buffer of more than max_chain ring descriptors fails its walk. */
    if (chain->ring_copy && c->ndescs < vr->max_chain)
        chain->ring_copy[c->ndescs] = *d;
    c->ndescs++;
    if (++c->ring_next == vr->size) {
        c->ring_next = 0;
        c->ring_wrap = !c->ring_wrap;
    }
    return 0;
}

/* Continues the walk in the indirect table d points to. */
static int cursor_enter_indirect(const struct vring_packed *vr, const struct dp_mem *mem,
                                 struct pcursor *c, struct vring_desc *scratch,
                                 const struct vring_packed_desc *d)
{
    /* 2.8.7, 2.8.19: only if negotiated, never in a list linked by NEXT, a whole
     * number of descriptors. Its length is bounded by our own limit, not
     * by the queue size (Linux fills one with seg_max + 2 entries whatever
     * the ring's size). */
    if (!vr->indirect || c->ndescs != 1 || (d->flags & VRING_DESC_F_NEXT))
        return -EBADMSG;
    if (d->len == 0 || d->len % sizeof(struct vring_packed_desc))
        return -EBADMSG;
    uint32_t n = d->len / sizeof(struct vring_packed_desc);
    if (n > VRING_INDIRECT_MAX)
        return -E2BIG;
    const void *table = guest_mem_ptr(mem, d->addr, d->len);
    /* Read in place when it lies in one region and the 64-bit fields are
     * naturally aligned; else read a private copy (the rare path). */
    if (!table || ((uintptr_t)table & 7)) {
        if (guest_mem_copy_from(mem, d->addr, scratch, d->len) < 0)
            return -ENXIO;
        table = scratch;
    }
    c->table = table;
    c->table_size = n;
    c->table_next = 0;
    c->in_indirect = true;
    c->id = d->id; /* the table's entries have none (2.8.7) */
    return 0;
}

/* Reads the table's next entry. The table's length bounds the buffer:
 * 2.8.7 leaves NEXT reserved in entries (DPDK sets it on all but the last,
 * Linux on none), but on the last one it asks for more than there is, and
 * a nested table cannot be answered without guessing either. */
static int cursor_read_table(struct pcursor *c, struct vring_chain *chain,
                             struct vring_packed_desc *d)
{
    desc_read(c->table, c->table_next, d);
    chain->desc_reads++;
    bool last = ++c->table_next == c->table_size;
    if ((d->flags & VRING_DESC_F_INDIRECT) || (last && (d->flags & VRING_DESC_F_NEXT)))
        return -EBADMSG;
    c->done = last;
    return 0;
}

/* Reads the buffer's next buffer descriptor into d, entering an indirect
 * table on the way. Returns 1 with d filled, 0 past the last one, or a
 * shape fault. */
static int cursor_next(const struct vring_packed *vr, const struct dp_mem *mem, struct pcursor *c,
                       struct vring_chain *chain, struct vring_packed_desc *d)
{
    int ret;
    if (c->done)
        return 0;
    if (c->in_indirect) {
        ret = cursor_read_table(c, chain, d);
    } else {
        ret = cursor_read_ring(vr, c, chain, d);
        if (!ret && (d->flags & VRING_DESC_F_INDIRECT)) {
            ret = cursor_enter_indirect(vr, mem, c, chain->scratch, d);
            if (!ret)
                ret = cursor_read_table(c, chain, d);
        } else if (!ret && !(d->flags & VRING_DESC_F_NEXT)) {
            c->done = true;
            c->id = d->id; /* 2.8.6: the id is in the list's last descriptor */
        }
    }
    if (ret)
        return ret;
    if (c->budget == 0)
        return -E2BIG;
    c->budget--;
    return 1;
}

/* Takes the walked buffer off the ring. */
static void cursor_pop(struct vring_packed *vr, const struct pcursor *c, uint16_t *id,
                       uint16_t *ndescs)
{
    vr->avail_idx = (uint16_t)c->ring_next;
    vr->avail_wrap = c->ring_wrap;
    vr->inflight += c->ndescs;
    *id = c->id;
    *ndescs = c->ndescs;
}

/* Maps the buffer the cursor stands at into chain->iov. expect: the id
 * the caller knows the buffer by (read ahead, or kept with a saved copy),
 * or NULL; a buffer that carries another one (the guest rewrote it) is a
 * shape fault. A saved buffer must end with its last copy. */
static int walk_map(const struct vring_packed *vr, const struct dp_mem *mem, struct pcursor *c,
                    struct vring_chain *chain, const uint16_t *expect)
{
    struct vring_packed_desc d;
    int ret;
    while ((ret = cursor_next(vr, mem, c, chain, &d)) == 1) {
        ret = vring_chain_map(mem, d.addr, d.len, d.flags & VRING_DESC_F_WRITE, chain);
        if (ret)
            return ret;
    }
    if (ret)
        return ret;
    if ((expect && c->id != *expect) || (c->saved && c->ring_left))
        return -EBADMSG;
    return 0;
}

/* After a fault: follows the buffer's links only, to its status byte. */
static int walk_status(const struct vring_packed *vr, const struct dp_mem *mem, struct pcursor *c,
                       struct vring_chain *chain, const uint16_t *expect, uint8_t **status)
{
    struct vring_packed_desc d, last = {0};
    int ret;
    while ((ret = cursor_next(vr, mem, c, chain, &d)) == 1)
        last = d;
    if (ret < 0)
        return ret;
    if (c->saved && c->ring_left)
        return -EBADMSG;
    if (!(last.flags & VRING_DESC_F_WRITE) || last.len == 0 || last.addr + (last.len - 1) < last.addr)
        return -ENOMSG;
    if (expect && c->id != *expect)
        return -EBADMSG;
    *status = guest_mem_ptr(mem, last.addr + (last.len - 1), 1);
    return *status ? 0 : -ENOMSG;
}

/* expect: the id the caller read ahead (vring_packed_peek_id), or NULL. A
 * buffer whose id changed since (the guest rewrote it) is not popped. */
static int pop_buffer(struct vring_packed *vr, const struct dp_mem *mem, struct vring_chain *chain,
                      const uint16_t *expect, uint16_t *id, uint16_t *ndescs)
{
    struct pcursor c;
    vring_chain_reset(chain);
    /* Acquire: the rest of the buffer was written before its first flags. */
    if (!vring_packed_has_avail(vr))
        return -EAGAIN;
    cursor_init(vr, &c);
    int ret = walk_map(vr, mem, &c, chain, expect);
    if (ret)
        return ret;
    cursor_pop(vr, &c, id, ndescs);
    return 0;
}

int vring_packed_pop(struct vring_packed *vr, const struct dp_mem *mem, struct vring_chain *chain,
                     uint16_t *id, uint16_t *ndescs)
{
    return pop_buffer(vr, mem, chain, NULL, id, ndescs);
}

int vring_packed_pop_id(struct vring_packed *vr, const struct dp_mem *mem, struct vring_chain *chain,
                        uint16_t id, uint16_t *ndescs)
{
    uint16_t popped;
    return pop_buffer(vr, mem, chain, &id, &popped, ndescs);
}

static int pop_status_buffer(struct vring_packed *vr, const struct dp_mem *mem, struct vring_chain *chain,
                             const uint16_t *expect, uint8_t **status, uint16_t *id, uint16_t *ndescs)
{
    struct pcursor c;
    if (!vring_packed_has_avail(vr))
        return -EAGAIN;
    cursor_init(vr, &c);
    int ret = walk_status(vr, mem, &c, chain, expect, status);
    if (ret)
        return ret;
    cursor_pop(vr, &c, id, ndescs);
    return 0;
}

int vring_packed_pop_status(struct vring_packed *vr, const struct dp_mem *mem,
                            struct vring_chain *chain, uint8_t **status, uint16_t *id,
                            uint16_t *ndescs)
{
    return pop_status_buffer(vr, mem, chain, NULL, status, id, ndescs);
}

int vring_packed_pop_status_id(struct vring_packed *vr, const struct dp_mem *mem, struct vring_chain *chain,
                               uint8_t **status, uint16_t id, uint16_t *ndescs)
{
    uint16_t popped;
    return pop_status_buffer(vr, mem, chain, &id, status, &popped, ndescs);
}

int vring_packed_walk_saved(const struct vring_packed *vr, const struct dp_mem *mem, struct vring_chain *chain,
                            const struct vring_packed_desc *saved, uint16_t n, uint16_t id)
{
    struct pcursor c;
    vring_chain_reset(chain);
    chain->ring_descs = n;
    if (n == 0)
        return -EBADMSG;
    cursor_init_saved(vr, &c, saved, n);
    return walk_map(vr, mem, &c, chain, &id);
}

int vring_packed_status_saved(const struct vring_packed *vr, const struct dp_mem *mem, struct vring_chain *chain,
                              const struct vring_packed_desc *saved, uint16_t n, uint16_t id, uint8_t **status)
{
    struct pcursor c;
    chain->ring_descs = n;
    if (n == 0)
        return -EBADMSG;
    cursor_init_saved(vr, &c, saved, n);
    return walk_status(vr, mem, &c, chain, &id, status);
}

int vring_packed_peek_id(const struct vring_packed *vr, uint16_t *id)
{
    if (!vring_packed_has_avail(vr))
        return -EAGAIN;
    struct pcursor c;
    struct vring_packed_desc d;
    struct vring_chain count_only = {0};
    cursor_init(vr, &c);
    do {
        int ret = cursor_read_ring(vr, &c, &count_only, &d);
        if (ret)
            return ret;
    } while ((d.flags & VRING_DESC_F_NEXT) && !(d.flags & VRING_DESC_F_INDIRECT));
    *id = d.id;
    return 0;
}

int vring_packed_push(struct vring_packed *vr, uint16_t id, uint32_t len, uint16_t ndescs)
{
    if (ndescs == 0 || ndescs > vr->inflight)
        return -EINVAL;
    struct vring_packed_desc *d = &vr->desc[vr->used_idx];
    /* 2.8.1: a used descriptor has AVAIL and USED equal to the device's
     * wrap counter; 2.8.3, 2.8.4: WRITE says len is meaningful. */
    uint16_t flags = vr->used_wrap ? VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED : 0;
    if (len)
        flags |= VRING_DESC_F_WRITE;
    WRITE_ONCE(&d->id, htole16(id));
    WRITE_ONCE(&d->len, htole32(len));
    if (vr->batch_count++ == 0) {
        vr->batch_idx = vr->used_idx;
        vr->batch_flags = flags;
    } else {
        /* The driver polls its next used position only and reaches this
         * one after the batch's first: it is written whole now. Release:
         * id and len are visible before the flags that expose them. */
        __atomic_store_n(&d->flags, htole16(flags), __ATOMIC_RELEASE);
    }
    vr->inflight -= ndescs;
    if (vr->used_since_signal < UINT32_MAX - ndescs)
        vr->used_since_signal += ndescs;
    uint32_t next = (uint32_t)vr->used_idx + ndescs; /* ndescs <= inflight <= size */
    if (next >= vr->size) {
        next -= vr->size;
        vr->used_wrap = !vr->used_wrap;
    }
    vr->used_idx = (uint16_t)next;
    return 0;
}

void vring_packed_publish(struct vring_packed *vr)
{
    if (!vr->batch_count)
        return;
    /* Pairs with the driver's acquire (read barrier) after it sees the
     * flags at its next used position: the whole batch is visible then. */
    __atomic_store_n(&vr->desc[vr->batch_idx].flags, htole16(vr->batch_flags), __ATOMIC_RELEASE);
    vr->batch_count = 0;
}

/* 2.8.10 with EVENT_IDX: did the used positions [old, old + n) cross the
 * driver's event descriptor? */
static bool event_crossed(const struct vring_packed *vr, uint16_t off_wrap, uint32_t old, uint32_t n)
{
    uint32_t off = off_wrap & 0x7fff, two = 2u * vr->size;
    /* An offset outside the ring is the driver's bug: a spurious
     * notification costs little, a lost one hangs it. */
    if (off >= vr->size || n >= two)
        return true;
    uint32_t event = ring_pos(vr, off, off_wrap & VRING_PACKED_EVENT_WRAP);
    return (event + two - old) % two < n;
}

bool vring_packed_should_notify(struct vring_packed *vr)
{
    /* The used flags store must be visible before we read the guest's
     * suppression state, or we race with a driver re-enabling
     * notifications (store-load ordering: a full fence). */
    atomic_thread_fence(memory_order_seq_cst);
    /* Acquire: the driver writes off_wrap before flags. */
    uint16_t mode = le16toh(__atomic_load_n(&vr->driver->flags, __ATOMIC_ACQUIRE)) & 3;
    uint16_t off_wrap = le16toh(READ_ONCE(&vr->driver->off_wrap));
    if (!vr->event_idx)
        return mode != VRING_PACKED_EVENT_DISABLE;

    uint32_t old = vr->signalled_used, n = vr->used_since_signal;
    bool valid = vr->signalled_used_valid;
    vr->signalled_used = ring_pos(vr, vr->used_idx, vr->used_wrap);
    vr->used_since_signal = 0;
    vr->signalled_used_valid = true;
    if (mode == VRING_PACKED_EVENT_DISABLE)
        return false;
    /* ENABLE, and the reserved value 3 (a spurious notification is safe). */
    if (mode != VRING_PACKED_EVENT_DESC || !valid)
        return true;
    return event_crossed(vr, off_wrap, old, n);
}

static void device_event_write(struct vring_packed *vr, uint16_t off_wrap, uint16_t flags)
{
    WRITE_ONCE(&vr->device->off_wrap, htole16(off_wrap));
    /* Release: a driver reading flags, then off_wrap, sees this offset. */
    __atomic_store_n(&vr->device->flags, htole16(flags), __ATOMIC_RELEASE);
}

bool vring_packed_enable_kicks(struct vring_packed *vr)
{
    if (vr->event_idx) /* kick when our next avail position is made available */
        device_event_write(vr, (uint16_t)(vr->avail_idx | (vr->avail_wrap ? VRING_PACKED_EVENT_WRAP : 0)),
                           VRING_PACKED_EVENT_DESC);
    else
        device_event_write(vr, 0, VRING_PACKED_EVENT_ENABLE);
    /* Our store must be visible before we look at the ring again, or a
     * buffer made available meanwhile would wait for a kick that never
     * comes. */
    atomic_thread_fence(memory_order_seq_cst);
    return vring_packed_has_avail(vr);
}

void vring_packed_disable_kicks(struct vring_packed *vr)
{
    /* Also with EVENT_IDX: an offset left behind would still draw one kick
     * per lap of the ring. */
    __atomic_store_n(&vr->device->flags, htole16(VRING_PACKED_EVENT_DISABLE), __ATOMIC_RELAXED);
}
