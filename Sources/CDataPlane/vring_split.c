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
                     uint16_t last_avail_idx, bool event_idx, bool indirect)
{
    if (size == 0 || (size & (size - 1)) || size > DP_QUEUE_MAX_SIZE)
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

static void desc_read(const struct vring_desc *table, uint32_t i, struct vring_desc *d)
{
    d->addr = le64toh(READ_ONCE(&table[i].addr));
    d->len = le32toh(READ_ONCE(&table[i].len));
    d->flags = le16toh(READ_ONCE(&table[i].flags));
    d->next = le16toh(READ_ONCE(&table[i].next));
}

/* Checks that [addr, addr + len) is guest memory without mapping it. */
static int range_check(const struct dp_mem *mem, uint64_t addr, uint64_t len)
{
    struct iovec scratch[8];
    while (len) {
        int n = guest_mem_map(mem, addr, len, scratch, 8);
        if (n >= 0)
            return 0;
        if (n != -ENOBUFS)
            return n;
        uint64_t mapped = 0;
        for (int i = 0; i < 8; i++)
            mapped += scratch[i].iov_len;
        addr += mapped;
        len -= mapped;
    }
    return 0;
}

int vring_split_walk(const struct vring_split *vr, const struct dp_mem *mem, uint16_t head,
                     struct vring_chain *chain)
{
    const struct vring_desc *table = vr->desc;
    uint32_t table_size = vr->size;
    uint32_t i = head;
    /* 2.7.5.3.1: a chain is at most queue-size descriptors long; anything longer
     * within one table must revisit a descriptor, i.e. loop. */
    uint32_t ttl = vr->size;
    bool in_indirect = false;
    bool seen_writable = false;

    chain->out_num = chain->in_num = 0;
    chain->out_len = chain->in_len = 0;
    chain->desc_count = 0;
    chain->truncated = false;
    chain->tail_byte = NULL;

    for (;;) {
        struct vring_desc d;
        if (ttl == 0)
            return -ELOOP;
        ttl--;
        desc_read(table, i, &d);
        chain->desc_count++;
        chain->tail_byte = NULL;

        if (d.flags & VRING_DESC_F_INDIRECT) {
            /* 2.7.5.3.1: only from the main table, never with NEXT, a whole
             * number of 16-byte descriptors, and only if negotiated. */
            if (!vr->indirect || in_indirect || (d.flags & VRING_DESC_F_NEXT))
                return -EINVAL;
            if (d.len == 0 || d.len % sizeof(struct vring_desc) || (d.addr & 15))
                return -EINVAL;
            if (d.len / sizeof(struct vring_desc) > vr->size)
                return -E2BIG;
            table = guest_mem_ptr(mem, d.addr, d.len);
            if (!table)
                return -EFAULT;
            /* The guest address is aligned; the host mapping must be too
             * (a frontend chooses how regions map). */
            if ((uintptr_t)table & 15)
                return -EINVAL;
            table_size = d.len / sizeof(struct vring_desc);
            ttl = table_size;
            in_indirect = true;
            i = 0;
            continue;
        }

        bool writable = d.flags & VRING_DESC_F_WRITE;
        /* 2.7.4.2: device-readable descriptors come before device-writable
         * ones (counted in descriptors: an empty writable one counts too). */
        if (!writable && seen_writable)
            return -EINVAL;
        seen_writable |= writable;
        if (d.len && d.addr + (d.len - 1) < d.addr)
            return -EFAULT;

        int n;
        uint32_t used = chain->out_num + chain->in_num;
        if (chain->truncated) {
            n = range_check(mem, d.addr, d.len);
        } else {
            n = guest_mem_map(mem, d.addr, d.len, chain->iov + used, chain->iov_max - used);
            if (n == -ENOBUFS) {
                chain->truncated = true;
                n = range_check(mem, d.addr, d.len);
            }
        }
        if (n < 0)
            return n;
        if (!chain->truncated) {
            if (writable)
                chain->in_num += (uint32_t)n;
            else
                chain->out_num += (uint32_t)n;
        }
        if (writable) {
            chain->in_len += d.len;
            if (d.len) {
                struct iovec last;
                if (guest_mem_map(mem, d.addr + d.len - 1, 1, &last, 1) == 1)
                    chain->tail_byte = last.iov_base;
            }
        } else {
            chain->out_len += d.len;
        }

        if (!(d.flags & VRING_DESC_F_NEXT))
            return 0;
        if (d.next >= table_size) /* 2.7.5: next indexes the same table */
            return -EINVAL;
        i = d.next;
    }
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
