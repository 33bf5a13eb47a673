/*
 * The guest's side of virtio packed rings (virtio 1.2, 2.8), as Linux's
 * virtio_ring.c drives them: buffer ids apart from ring slots, slots used in
 * order, a chain's head made available last, used descriptors found by their
 * AVAIL/USED bits matching the used wrap counter, and event suppression
 * through the driver and device areas.
 */
#ifndef _GNU_SOURCE
#error "CGuestDriver needs _GNU_SOURCE; set it in the target's cSettings"
#endif

#include "driver_internal.h"

#include <errno.h>
#include <stdlib.h>

static _Atomic uint16_t *flags_of(struct gd_pdesc *desc)
{
    return (_Atomic uint16_t *)&desc->flags;
}

/* AVAIL/USED bits that make a descriptor available under wrap counter w. */
static uint16_t avail_bits(bool wrap)
{
    return wrap ? GD_PDESC_F_AVAIL : GD_PDESC_F_USED;
}

static uint16_t off_wrap(uint16_t idx, bool wrap)
{
    return (uint16_t)(idx | (wrap ? 0x8000u : 0));
}

int gd_packed_queue_init(struct gd_driver *d, struct gd_queue *q)
{
    q->pdesc = (struct gd_pdesc *)(d->guest + q->desc_gpa);
    uint8_t *drv = d->guest + q->avail_gpa, *dev = d->guest + q->used_gpa;
    q->drv_off_wrap = (_Atomic uint16_t *)drv;
    q->drv_flags = (_Atomic uint16_t *)(drv + 2);
    q->dev_off_wrap = (_Atomic uint16_t *)dev;
    q->dev_flags = (_Atomic uint16_t *)(dev + 2);
    q->avail_wrap = q->used_wrap = q->pub_wrap = true; /* 2.8.1: both start at 1 */
    q->pend_slot = malloc(q->size * sizeof(*q->pend_slot));
    q->pend_flags = malloc(q->size * sizeof(*q->pend_flags));
    q->raw_ndesc = calloc(q->size, sizeof(*q->raw_ndesc));
    return q->pend_slot && q->pend_flags && q->raw_ndesc ? 0 : -ENOMEM;
}

void gd_packed_queue_free(struct gd_queue *q)
{
    free(q->pend_slot);
    free(q->pend_flags);
    free(q->raw_ndesc);
}

/* Takes the next ring slot: its index, and the AVAIL/USED bits for it. */
static uint16_t slot_take(struct gd_queue *q, uint16_t *bits)
{
    uint16_t slot = q->next_avail;
    *bits = avail_bits(q->avail_wrap);
    if (++q->next_avail == q->size) {
        q->next_avail = 0;
        q->avail_wrap = !q->avail_wrap;
    }
    return slot;
}

/* Fills the chain's slots; the head's flags are held back until publish. */
static void chain_write(struct gd_queue *q, uint16_t id, const struct gd_pdesc *chain, uint32_t n)
{
    for (uint32_t k = 0; k < n; k++) {
        uint16_t bits, slot = slot_take(q, &bits);
        uint16_t flags = (uint16_t)(chain[k].flags | bits | (k + 1 < n ? GD_DESC_F_NEXT : 0));
        struct gd_pdesc *e = &q->pdesc[slot];
        e->addr = chain[k].addr;
        e->len = chain[k].len;
        e->id = id;
        if (k == 0) {
            q->pend_slot[q->npend] = slot;
            q->pend_flags[q->npend++] = flags;
        } else {
            atomic_store_explicit(flags_of(e), flags, memory_order_relaxed);
        }
    }
}

int gd_packed_request_add(struct gd_driver *d, struct gd_queue *q, const struct gd_req *req, uint16_t *id_out)
{
    (void)d;
    uint32_t n = req->nsegs + 2, need = req->indirect ? 1 : n;
    if (q->num_free < need || q->in_flight == q->size)
        return -ENOSPC;
    uint16_t id = q->free_head;
    q->free_head = q->free_next[id];

    uint64_t hdr_gpa = gd_slot_fill(q, id, req);
    uint16_t dflags = gd_data_flags(req);
    /* The chain in packed layout: in the ring, or as the indirect table
     * (2.8.19: only WRITE counts there; ids and NEXT are ignored). */
    struct gd_pdesc *t = (struct gd_pdesc *)(q->ind + (size_t)id * q->size);
    t[0] = (struct gd_pdesc){ hdr_gpa, GD_HDR_LEN, 0, 0 };
    for (uint32_t i = 0; i < req->nsegs; i++)
        t[i + 1] = (struct gd_pdesc){ req->segs[i].gpa, req->segs[i].len, 0, dflags };
    t[n - 1] = (struct gd_pdesc){ hdr_gpa + GD_STATUS_OFF, 1, 0, GD_DESC_F_WRITE };
    if (req->indirect) {
        struct gd_pdesc ind = { q->ind_gpa + 16ull * q->size * id, 16 * n, 0, GD_DESC_F_INDIRECT };
        chain_write(q, id, &ind, 1);
    } else {
        chain_write(q, id, t, n);
    }
    q->num_free -= need;
    q->heads[id] = (struct gd_head){ .last = 0, .ndesc = (uint16_t)need, .busy = true };
    q->in_flight++;
    if (id_out)
        *id_out = id;
    return 0;
}

void gd_packed_publish(struct gd_queue *q)
{
    /* Release per head: its chain's other slots, the indirect table and the
     * request header are visible before the device can see it available. */
    for (uint32_t i = 0; i < q->npend; i++)
        atomic_store_explicit(flags_of(&q->pdesc[q->pend_slot[i]]), q->pend_flags[i], memory_order_release);
    q->kick_added = (uint16_t)(q->kick_added + (uint16_t)(q->next_avail - q->avail_pub +
                                                          (q->avail_wrap != q->pub_wrap ? q->size : 0)));
    q->npend = 0;
    q->avail_pub = q->next_avail;
    q->pub_wrap = q->avail_wrap;
}

/* As Linux's virtqueue_kick_prepare_packed: the device's event suppression
 * decides; with EVENT_IDX, DESC mode names the slot (and wrap) it wants a
 * kick at. */
int gd_packed_kick_needed(const struct gd_driver *d, struct gd_queue *q)
{
    uint16_t added = q->kick_added;
    q->kick_added = 0;
    if (!added)
        return 0;
    atomic_thread_fence(memory_order_seq_cst); /* publish before reading the device's area */
    uint16_t flags = atomic_load_explicit(q->dev_flags, memory_order_relaxed);
    uint16_t ow = atomic_load_explicit(q->dev_off_wrap, memory_order_relaxed);
    if (flags != GD_EVENT_DESC || !d->event_idx)
        return flags != GD_EVENT_DISABLE;
    uint16_t new_idx = q->avail_pub, old = (uint16_t)(new_idx - added);
    uint16_t event = ow & 0x7fff;
    if ((bool)(ow >> 15) != q->pub_wrap)
        event = (uint16_t)(event - q->size);
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

bool gd_packed_used_pending(const struct gd_queue *q)
{
    uint16_t f = atomic_load_explicit(flags_of(&q->pdesc[q->last_used]), memory_order_acquire);
    bool avail = f & GD_PDESC_F_AVAIL, used = f & GD_PDESC_F_USED;
    return avail == used && used == q->used_wrap;
}

static void driver_event_write(struct gd_driver *d, struct gd_queue *q, bool on)
{
    if (on && d->event_idx) {
        atomic_store_explicit(q->drv_off_wrap, off_wrap(q->last_used, q->used_wrap), memory_order_relaxed);
        atomic_store_explicit(q->drv_flags, GD_EVENT_DESC, memory_order_relaxed);
    } else {
        atomic_store_explicit(q->drv_flags, on ? GD_EVENT_ENABLE : GD_EVENT_DISABLE, memory_order_relaxed);
    }
}

int gd_packed_used_pop(struct gd_driver *d, struct gd_queue *q, uint32_t *id, uint32_t *len)
{
    /* Acquire on the flags: id, len and the data they cover are read after. */
    if (!gd_packed_used_pending(q))
        return 0;
    const struct gd_pdesc *e = &q->pdesc[q->last_used];
    uint16_t bid = e->id;
    uint32_t blen = e->len;
    /* The buffer's slots are skipped whole: as many as we gave the id, or
     * as a raw buffer written from here held; an id we never made available
     * (a broken device) counts one slot, so the driver still moves on. */
    uint16_t ndesc = 1;
    if (bid < q->size && q->heads[bid].busy)
        ndesc = q->heads[bid].ndesc;
    else if (q->raw_ndesc[q->last_used])
        ndesc = q->raw_ndesc[q->last_used];
    q->raw_ndesc[q->last_used] = 0;
    uint32_t next = (uint32_t)q->last_used + ndesc;
    if (next >= q->size) {
        next -= q->size;
        q->used_wrap = !q->used_wrap;
    }
    q->last_used = (uint16_t)next;
    if (id)
        *id = bid;
    if (len)
        *len = blen;
    if (q->calls == GD_CALLS_ON && d->event_idx) {
        /* Ask for a call at the next used descriptor (as the split driver
         * moves used_event); the fence orders it before the next look. */
        atomic_store_explicit(q->drv_off_wrap, off_wrap(q->last_used, q->used_wrap), memory_order_relaxed);
        atomic_thread_fence(memory_order_seq_cst);
    }
    return 1;
}

void gd_packed_set_calls(struct gd_driver *d, struct gd_queue *q, bool on)
{
    q->calls = on ? GD_CALLS_ON : GD_CALLS_OFF;
    driver_event_write(d, q, on);
}
