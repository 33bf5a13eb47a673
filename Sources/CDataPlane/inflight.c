/* vhost-user inflight tracking for split rings. The frontend keeps the
 * region (a memfd we created) across backend restarts and reconnects; in it
 * we mark each head popped and clear it once its used element is published,
 * so a new backend knows exactly which requests were in flight. Layout as
 * docs/interop/vhost-user.rst describes (QueueRegionSplit / DescStateSplit). */
#include <endian.h>
#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "queue.h"

struct inflight_desc {
    uint8_t inflight;
    uint8_t padding[5];
    uint16_t next;
    uint64_t counter;
};

struct inflight_region {
    uint64_t features;
    uint16_t version;
    uint16_t desc_num;
    uint16_t last_batch_head;
    uint16_t used_idx;
    struct inflight_desc desc[];
};

_Static_assert(sizeof(struct inflight_desc) == 16, "DescStateSplit is 16 bytes");
_Static_assert(sizeof(struct inflight_region) == 16, "QueueRegionSplit header is 16 bytes");

#define INFLIGHT_VERSION 1

uint64_t dp_inflight_queue_size(uint32_t queue_size)
{
    uint64_t bytes = sizeof(struct inflight_region) + (uint64_t)queue_size * sizeof(struct inflight_desc);
    return (bytes + 63) & ~(uint64_t)63;
}

/* The region outlives us: a backend killed between two stores leaves them in
 * the region in program order (x86 keeps store order; the release stores
 * keep the compiler from reordering). */
void inflight_mark(struct dp_queue *q, uint16_t head)
{
    struct inflight_desc *d = &q->inflight->desc[head];
    d->counter = ++q->inflight_counter;
    __atomic_store_n(&d->inflight, 1, __ATOMIC_RELEASE); /* after its counter */
}

/* After publish: the guest can see these completions, so a restarted
 * backend must not run them again. */
void inflight_clear_published(struct dp_queue *q)
{
    /* The used index was published before any flag clears: a backend that
     * finds a flag clear after we die must find its used element published
     * too, or the request would be neither run again nor seen done. Pairs
     * with nothing of ours: the next reader is another process. */
    atomic_thread_fence(memory_order_release);
    for (uint32_t i = 0; i < q->pushed_count; i++)
        __atomic_store_n(&q->inflight->desc[q->pushed[i]].inflight, 0, __ATOMIC_RELAXED);
    q->pushed_count = 0;
    /* After the clears: a used_idx ahead of a still-set flag would have the
     * next backend run a published request again. */
    __atomic_store_n(&q->inflight->used_idx, q->vr.split.used_idx, __ATOMIC_RELEASE);
}

struct resubmit_entry {
    uint64_t counter;
    uint16_t head;
};

static int counter_order(const void *a, const void *b)
{
    uint64_t x = ((const struct resubmit_entry *)a)->counter, y = ((const struct resubmit_entry *)b)->counter;
    return (x > y) - (x < y);
}

int inflight_recover(struct dp_queue *q)
{
    struct inflight_region *r = q->inflight;
    uint16_t size = q->vr.split.size;
    q->resubmit_count = q->resubmit_next = q->resubmit_held = 0;
    q->inflight_counter = 0;

    if (r->version != INFLIGHT_VERSION || r->desc_num != size) {
        /* A fresh region (zeroed memfd) or one for another ring size. */
        memset(r->desc, 0, (size_t)size * sizeof(r->desc[0]));
        r->desc_num = size;
        r->used_idx = q->vr.split.used_idx;
        r->version = INFLIGHT_VERSION;
        return 0;
    }
    /* We may have died between publishing a batch and clearing its heads:
     * whatever the used ring holds past the region's used_idx is done. */
    uint16_t pending = (uint16_t)(q->vr.split.used_idx - r->used_idx);
    if (pending > size)
        return -EINVAL; /* inconsistent with the ring: refuse rather than guess */
    for (uint16_t i = 0; i < pending; i++) {
        /* One load: the guest shares the used ring and may change the id
         * between a check and a use. */
        uint32_t id = le32toh(__atomic_load_n(&q->vr.split.used->ring[(uint16_t)(r->used_idx + i) & (size - 1)].id,
                                              __ATOMIC_RELAXED));
        if (id < size)
            __atomic_store_n(&r->desc[id].inflight, 0, __ATOMIC_RELAXED);
    }
    r->used_idx = q->vr.split.used_idx;

    /* Sorted on a private copy of the counters: the frontend can rewrite the
     * shared region while we sort, and qsort needs a consistent order. */
    struct resubmit_entry *order = malloc((size_t)size * sizeof(*order));
    if (!order)
        return -ENOMEM;
    uint32_t n = 0;
    for (uint32_t head = 0; head < size; head++) {
        if (__atomic_load_n(&r->desc[head].inflight, __ATOMIC_RELAXED) != 1)
            continue;
        order[n].counter = __atomic_load_n(&r->desc[head].counter, __ATOMIC_RELAXED);
        order[n].head = (uint16_t)head;
        if (order[n].counter > q->inflight_counter)
            q->inflight_counter = order[n].counter;
        n++;
    }
    qsort(order, n, sizeof(*order), counter_order);
    for (uint32_t i = 0; i < n; i++)
        q->resubmit[i] = order[i].head;
    q->resubmit_count = n;
    free(order);
    /* Everything popped before is either used or about to be resubmitted. */
    q->vr.split.last_avail_idx = (uint16_t)(q->vr.split.used_idx + q->resubmit_count);
    q->vr.split.shadow_avail_idx = q->vr.split.last_avail_idx;
    return 0;
}
