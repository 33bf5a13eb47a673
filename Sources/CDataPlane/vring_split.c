/* The split virtqueue walker. Every index, address and length comes from the
 * guest and is checked before use; the checks cite virtio 1.x section 2.7. */
#include <endian.h>
#include <errno.h>
#include <stdatomic.h>

#include "vring_split.h"

/* Guest-shared fields are read once each, with relaxed atomics, so a guest
 * changing them under us cannot make a checked value differ from a used one. */
#define READ_ONCE(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define WRITE_ONCE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)

static uint16_t *used_event_ptr(const struct vring_split *vr)
{
    return &vr->avail->ring[vr->size];
}

static uint16_t *avail_event_ptr(const struct vring_split *vr)
{
    return (uint16_t *)&vr->used->ring[vr->size];
}

int vring_split_init(struct vring_split *vr, uint16_t size, void *desc, void *avail, void *used,
                     uint16_t last_avail_idx, bool event_idx, bool indirect, uint32_t max_chain)
{
    if (size == 0 || (size & (size - 1)) || size > DP_QUEUE_MAX_SIZE || max_chain == 0)
        return -EINVAL;
    if (((uintptr_t)desc & 15) || ((uintptr_t)avail & 1) || ((uintptr_t)used & 3))
        return -EINVAL;
    vr->desc = desc;
    vr->avail = avail;
    vr->used = used;
    vr->size = size;
    vr->last_avail_idx = last_avail_idx;
    vr->shadow_avail_idx = last_avail_idx;
    vr->used_idx = le16toh(READ_ONCE(&vr->used->idx));
    vr->signalled_used = vr->used_idx;
    vr->signalled_used_valid = false;
    vr->event_idx = event_idx;
    vr->indirect = indirect;
    vr->max_chain = max_chain;
    return 0;
}

int vring_split_avail_count(struct vring_split *vr)
{
    /* Pairs with the driver's release (write barrier) before it bumps avail->idx. */
    uint16_t idx = le16toh(__atomic_load_n(&vr->avail->idx, __ATOMIC_ACQUIRE));
    uint16_t count = (uint16_t)(idx - vr->last_avail_idx);
    /* 2.7.13.3: the driver never has more than size entries outstanding. A
     * larger gap would make us pop stale entries again and again (a denial of
     * service), so the ring is corrupt. */
    if (count > vr->size)
        return -ERANGE;
    vr->shadow_avail_idx = idx;
    return count;
}

int vring_split_pop_head(struct vring_split *vr, uint16_t *head)
{
    uint16_t h = le16toh(READ_ONCE(&vr->avail->ring[vr->last_avail_idx & (vr->size - 1)]));
    if (h >= vr->size) /* 2.7.6: ring entries index the descriptor table */
        return -EINVAL;
    vr->last_avail_idx++;
    *head = h;
    return 0;
}

void vring_split_prefetch_next(const struct vring_split *vr)
{
    if (vr->last_avail_idx == vr->shadow_avail_idx)
        return;
    /* A hint only: the head is read (and checked) again when popped. */
    uint16_t h = le16toh(READ_ONCE(&vr->avail->ring[vr->last_avail_idx & (vr->size - 1)]));
    if (h < vr->size)
        __builtin_prefetch(&vr->desc[h]);
}

static void desc_read(const struct vring_desc *table, uint32_t i, struct vring_desc *d)
{
    d->addr = le64toh(READ_ONCE(&table[i].addr));
    d->len = le32toh(READ_ONCE(&table[i].len));
    d->flags = le16toh(READ_ONCE(&table[i].flags));
    d->next = le16toh(READ_ONCE(&table[i].next));
}

/* Where a walk stands in a chain: the table it reads (the ring's, or an
 * indirect one) and the bounds that keep a hostile chain finite. */
struct chain_cursor {
    const struct vring_desc *table;
    uint32_t table_size;
    uint32_t next;      /* index of the next descriptor to read */
    uint32_t ttl;       /* reads left in this table before it must have looped */
    uint32_t budget;    /* buffer descriptors the chain may still have */
    bool in_indirect;
    bool done;
};

static void cursor_init(const struct vring_split *vr, uint16_t head, struct chain_cursor *c)
{
    c->table = vr->desc;
    c->table_size = vr->size;
    c->next = head;
    /* 2.7.5.3.1: within one table a chain longer than the table revisits a
     * descriptor, i.e. loops. */
    c->ttl = vr->size;
    c->budget = vr->max_chain;
    c->in_indirect = false;
    c->done = false;
}

/* Continues the walk in the indirect table d points to. */
static int cursor_enter_indirect(const struct vring_split *vr, const struct dp_mem *mem,
                                 struct chain_cursor *c, struct vring_desc *scratch,
                                 const struct vring_desc *d)
{
    /* 2.7.5.3.1: only if negotiated, only one level, never with NEXT, a
     * whole number of descriptors. Its length is bounded by our own limit,
     * not by the queue size: Linux puts seg_max + 2 descriptors in one
     * whatever the ring's size, and QEMU and libvhost-user accept that. */
    if (!vr->indirect || c->in_indirect || (d->flags & VRING_DESC_F_NEXT))
        return -EBADMSG;
    if (d->len == 0 || d->len % sizeof(struct vring_desc))
        return -EBADMSG;
    uint32_t n = d->len / sizeof(struct vring_desc);
    if (n > VRING_INDIRECT_MAX)
        return -E2BIG;
    const struct vring_desc *table = guest_mem_ptr(mem, d->addr, d->len);
    /* Read in place when it lies in one region and the 64-bit fields are
     * naturally aligned (a guest allocator promises 8, not 16); else read
     * a private copy (the rare path: across two adjacent regions). */
    if (!table || ((uintptr_t)table & 7)) {
        if (guest_mem_copy_from(mem, d->addr, scratch, d->len) < 0)
            return -ENXIO;
        table = scratch;
    }
    c->table = table;
    c->table_size = n;
    c->ttl = n;
    c->next = 0;
    c->in_indirect = true;
    return 0;
}

/* Reads the chain's next buffer descriptor into d, entering an indirect
 * table on the way. Returns 1 with d filled, 0 past the last one, or a
 * shape fault. */
static int cursor_next(const struct vring_split *vr, const struct dp_mem *mem, struct chain_cursor *c,
                       struct vring_chain *chain, struct vring_desc *d)
{
    while (!c->done) {
        if (c->ttl == 0)
            return -ELOOP;
        c->ttl--;
        desc_read(c->table, c->next, d);
        chain->desc_reads++;
        if (d->flags & VRING_DESC_F_INDIRECT) {
            int ret = cursor_enter_indirect(vr, mem, c, chain->scratch, d);
            if (ret)
                return ret;
            continue;
        }
        if (c->budget == 0)
            return -E2BIG;
        c->budget--;
        if (!(d->flags & VRING_DESC_F_NEXT))
            c->done = true;
        else if (d->next >= c->table_size) /* 2.7.5: next indexes the same table */
            return -EBADMSG;
        else
            c->next = d->next;
        return 1;
    }
    return 0;
}

int vring_split_walk(const struct vring_split *vr, const struct dp_mem *mem, uint16_t head,
                     struct vring_chain *chain)
{
    struct chain_cursor c;
    struct vring_desc d;
    int ret;

    cursor_init(vr, head, &c);
    vring_chain_reset(chain);
    while ((ret = cursor_next(vr, mem, &c, chain, &d)) == 1) {
        ret = vring_chain_map(mem, d.addr, d.len, d.flags & VRING_DESC_F_WRITE, chain);
        if (ret)
            return ret;
    }
    return ret;
}

int vring_split_status(const struct vring_split *vr, const struct dp_mem *mem, uint16_t head,
                       struct vring_chain *chain, uint8_t **status)
{
    struct chain_cursor c;
    struct vring_desc d, last = {0};
    int ret;

    cursor_init(vr, head, &c);
    while ((ret = cursor_next(vr, mem, &c, chain, &d)) == 1)
        last = d;
    if (ret < 0)
        return ret;
    if (!(last.flags & VRING_DESC_F_WRITE) || last.len == 0 || last.addr + (last.len - 1) < last.addr)
        return -ENOMSG;
    *status = guest_mem_ptr(mem, last.addr + (last.len - 1), 1);
    return *status ? 0 : -ENOMSG;
}

void vring_split_push(struct vring_split *vr, uint16_t head, uint32_t len)
{
    struct vring_used_elem *e = &vr->used->ring[vr->used_idx & (vr->size - 1)];
    WRITE_ONCE(&e->id, htole32(head));
    WRITE_ONCE(&e->len, htole32(len));
    vr->used_idx++;
}

void vring_split_publish(struct vring_split *vr)
{
    /* Pairs with the driver's acquire (read barrier) after it reads used->idx. */
    __atomic_store_n(&vr->used->idx, htole16(vr->used_idx), __ATOMIC_RELEASE);
}

bool vring_split_should_notify(struct vring_split *vr)
{
    /* The used index store must be visible before we read the guest's
     * suppression state, or we race with a driver re-enabling interrupts
     * (store-load ordering: a full fence). */
    atomic_thread_fence(memory_order_seq_cst);
    if (!vr->event_idx)
        return !(le16toh(READ_ONCE(&vr->avail->flags)) & VRING_AVAIL_F_NO_INTERRUPT);

    uint16_t old = vr->signalled_used;
    uint16_t new = vr->used_idx;
    bool valid = vr->signalled_used_valid;
    vr->signalled_used = new;
    vr->signalled_used_valid = true;
    if (!valid)
        return true;
    uint16_t event = le16toh(READ_ONCE(used_event_ptr(vr)));
    /* 2.7.7.2 vring_need_event: did [old, new) cross used_event? */
    return (uint16_t)(new - event - 1) < (uint16_t)(new - old);
}

bool vring_split_enable_kicks(struct vring_split *vr)
{
    if (vr->event_idx)
        WRITE_ONCE(avail_event_ptr(vr), htole16(vr->shadow_avail_idx));
    else
        WRITE_ONCE(&vr->used->flags, htole16(0));
    /* Our store must be visible before we look at avail->idx again, or a
     * request published meanwhile would wait for a kick that never comes. */
    atomic_thread_fence(memory_order_seq_cst);
    return vring_split_has_avail(vr);
}

void vring_split_disable_kicks(struct vring_split *vr)
{
    /* With EVENT_IDX, leaving avail_event behind is enough: the guest only
     * kicks when it crosses it. */
    if (!vr->event_idx)
        WRITE_ONCE(&vr->used->flags, htole16(VRING_USED_F_NO_NOTIFY));
}
