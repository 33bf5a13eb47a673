/* vhost-user inflight tracking. The frontend keeps the region (a memfd we
 * created) across backend restarts and reconnects; in it we mark each
 * request popped and clear it once its used element is published, so a new
 * backend knows exactly which requests were in flight. Layouts as
 * docs/interop/vhost-user.rst describes them: QueueRegionSplit /
 * DescStateSplit for split rings, QueueRegionPacked / DescStatePacked for
 * packed ones.
 *
 * The region is shared with the frontend: whatever is read back from it
 * (only on start) is checked like guest memory. While a queue runs we only
 * write it; the packed layout's links are kept in private memory too
 * (struct inflight_packed). */
#include <endian.h>
#include <errno.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "queue.h"

#define READ_ONCE(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define WRITE_ONCE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)

#define INFLIGHT_VERSION 1
#define INFLIGHT_ALIGN 64

/* ------------------------------------------------------------ split layout */

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

/* ------------------------------------------------------------ packed layout */

struct inflight_desc_packed {
    uint8_t inflight;  /* head entries: the buffer is in flight */
    uint8_t padding;
    uint16_t next;     /* the next entry of its buffer, or of the free list */
    uint16_t last;     /* head entries: the buffer's last entry */
    uint16_t num;      /* head entries: the buffer's ring descriptors */
    uint64_t counter;  /* head entries: pop order */
    uint16_t id;       /* a copy of one ring descriptor */
    uint16_t flags;
    uint32_t len;
    uint64_t addr;
};

struct inflight_region_packed {
    uint64_t features;
    uint16_t version;
    uint16_t desc_num;
    uint16_t free_head;     /* the free list, as pops and frees change it */
    uint16_t old_free_head; /* ... as last committed */
    uint16_t used_idx;      /* the ring's used position, written before a publish */
    uint16_t old_used_idx;  /* ... committed after it: where a restart resumes */
    uint8_t used_wrap_counter;
    uint8_t old_used_wrap_counter;
    uint8_t padding[7];
    struct inflight_desc_packed desc[];
};

_Static_assert(sizeof(struct inflight_desc_packed) == 32, "DescStatePacked is 32 bytes");
_Static_assert(offsetof(struct inflight_desc_packed, counter) == 8, "DescStatePacked.counter at 8");
_Static_assert(offsetof(struct inflight_desc_packed, id) == 16, "DescStatePacked.id at 16");
_Static_assert(offsetof(struct inflight_desc_packed, addr) == 24, "DescStatePacked.addr at 24");
_Static_assert(offsetof(struct inflight_region_packed, desc) == 32, "QueueRegionPacked header is 32 bytes");

uint64_t dp_inflight_queue_size(uint32_t queue_size, bool packed)
{
    uint64_t bytes = packed ? sizeof(struct inflight_region_packed) +
                                  (uint64_t)queue_size * sizeof(struct inflight_desc_packed)
                            : sizeof(struct inflight_region) + (uint64_t)queue_size * sizeof(struct inflight_desc);
    return (bytes + INFLIGHT_ALIGN - 1) & ~(uint64_t)(INFLIGHT_ALIGN - 1);
}

static bool is_packed(const struct dp_queue *q)
{
    return q->vr.layout == VRING_LAYOUT_PACKED;
}

/* ------------------------------------------------------------ resubmission order */

struct resubmit_entry {
    uint64_t counter;
    uint16_t head;
};

static int counter_order(const void *a, const void *b)
{
    uint64_t x = ((const struct resubmit_entry *)a)->counter, y = ((const struct resubmit_entry *)b)->counter;
    return (x > y) - (x < y);
}

/* The heads found in flight go to q->resubmit in pop order. Sorted on a
 * private copy of the counters: the frontend can rewrite the shared region
 * while we sort, and qsort needs a consistent order. */
static void resubmit_in_order(struct dp_queue *q, struct resubmit_entry *order, uint32_t n)
{
    qsort(order, n, sizeof(*order), counter_order);
    for (uint32_t i = 0; i < n; i++) {
        q->resubmit[i] = order[i].head;
        if (order[i].counter > q->inflight_counter)
            q->inflight_counter = order[i].counter;
    }
    q->resubmit_count = n;
}

/* ------------------------------------------------------------ split */

/* The region outlives us: a backend killed between two stores leaves them in
 * the region in program order (x86 keeps store order; the release stores
 * keep the compiler from reordering). */
static void split_mark(struct dp_queue *q, uint16_t head)
{
    struct inflight_desc *d = &((struct inflight_region *)q->inflight)->desc[head];
    d->counter = ++q->inflight_counter;
    __atomic_store_n(&d->inflight, 1, __ATOMIC_RELEASE); /* after its counter */
}

/* After publish: the guest can see these completions, so a restarted
 * backend must not run them again. */
static void split_clear_published(struct dp_queue *q)
{
    struct inflight_region *r = q->inflight;
    /* The used index was published before any flag clears: a backend that
     * finds a flag clear after we die must find its used element published
     * too, or the request would be neither run again nor seen done. Pairs
     * with nothing of ours: the next reader is another process. */
    atomic_thread_fence(memory_order_release);
    for (uint32_t i = 0; i < q->pushed_count; i++)
        __atomic_store_n(&r->desc[q->pushed[i]].inflight, 0, __ATOMIC_RELAXED);
    q->pushed_count = 0;
    /* After the clears: a used_idx ahead of a still-set flag would have the
     * next backend run a published request again. */
    __atomic_store_n(&r->used_idx, q->vr.split.used_idx, __ATOMIC_RELEASE);
}

static int split_recover(struct dp_queue *q)
{
    struct inflight_region *r = q->inflight;
    uint16_t size = q->vr.split.size;

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
    uint16_t region_used = READ_ONCE(&r->used_idx);
    uint16_t pending = (uint16_t)(q->vr.split.used_idx - region_used);
    if (pending > size)
        return -EBADMSG; /* inconsistent with the ring: refuse rather than guess */
    for (uint16_t i = 0; i < pending; i++) {
        /* One load: the guest shares the used ring and may change the id
         * between a check and a use. */
        uint32_t id = le32toh(__atomic_load_n(&q->vr.split.used->ring[(uint16_t)(region_used + i) & (size - 1)].id,
                                              __ATOMIC_RELAXED));
        if (id < size)
            __atomic_store_n(&r->desc[id].inflight, 0, __ATOMIC_RELAXED);
    }
    r->used_idx = q->vr.split.used_idx;

    struct resubmit_entry *order = malloc((size_t)size * sizeof(*order));
    if (!order)
        return -ENOMEM;
    uint32_t n = 0;
    for (uint32_t head = 0; head < size; head++) {
        if (READ_ONCE(&r->desc[head].inflight) != 1)
            continue;
        order[n].counter = READ_ONCE(&r->desc[head].counter);
        order[n++].head = (uint16_t)head;
    }
    resubmit_in_order(q, order, n);
    free(order);
    /* Everything popped before is either used or about to be resubmitted. */
    q->vr.split.last_avail_idx = (uint16_t)(q->vr.split.used_idx + q->resubmit_count);
    q->vr.split.shadow_avail_idx = q->vr.split.last_avail_idx;
    return 0;
}

/* ------------------------------------------------------------ packed
 *
 * Entries are taken from a free list, one per ring descriptor of a popped
 * buffer, in list order; the head entry (the first) carries the buffer's
 * mark, count, last entry and pop order, every entry a copy of its ring
 * descriptor. Used buffers go back to the list's front. vhost-user.rst's
 * protocol, which this follows:
 *
 *   pop:     copies into the entries from free_head on, then the head's
 *            num, last and counter, then inflight = 1; then free_head and
 *            old_free_head past the buffer (old_* are always committed
 *            between pops: nothing is pushed and not published when one
 *            commits, and frees are linked only at publish).
 *   publish: the buffers' entries linked to the free list's front
 *            (free_head), used_idx / used_wrap_counter set to the ring's
 *            new used position; the ring's publish; the heads' inflight
 *            cleared; then old_free_head, old_used_wrap_counter and last
 *            old_used_idx, which commits the batch.
 *   start:   if used_* differ from old_*, the batch was published when
 *            the ring's descriptor at old_used_idx is no longer the
 *            driver's available one of that lap (the first used
 *            descriptor of a batch is written last): then commit it,
 *            else roll back to old_*. The entries on the free list from
 *            old_free_head are not in flight; the marked heads left are,
 *            and run again in counter order.
 *
 * The ring resumes where the region says, not where SET_VRING_BASE does:
 * QEMU keeps no packed ring position of its own and, after a backend died,
 * sends the one it had from the last GET_VRING_BASE. Used is old_used_idx;
 * avail is that plus the ring descriptors of the buffers in flight (a
 * packed ring's in-flight descriptors lie between the two). */

static struct inflight_region_packed *packed_region(const struct dp_queue *q)
{
    return q->inflight;
}

bool inflight_holds(const struct dp_queue *q, uint16_t head)
{
    return q->inflight && is_packed(q) && q->ipk.bufs[head].num;
}

static int packed_mark(struct dp_queue *q, uint16_t id, uint16_t ndescs, bool resubmit)
{
    struct inflight_region_packed *r = packed_region(q);
    struct inflight_packed *p = &q->ipk;
    struct inflight_buf *b = &p->bufs[id];
    if (resubmit) {
        /* Its entries were kept; one 8-byte store, old or new both valid. */
        WRITE_ONCE(&r->desc[b->first].counter, ++q->inflight_counter);
        return 0;
    }
    if (b->num)
        return -EBUSY;
    /* A well-behaved driver has at most size descriptors outstanding,
     * counting those we pushed and did not publish yet; their entries go
     * back at publish. */
    if (ndescs == 0 || ndescs > p->free_count)
        return -ENOSPC;
    uint16_t first = p->free_head, e = first;
    for (uint16_t i = 0;; i++) {
        const struct vring_packed_desc *d = &p->ring_copy[i];
        struct inflight_desc_packed *s = &r->desc[e];
        WRITE_ONCE(&s->addr, d->addr);
        WRITE_ONCE(&s->len, d->len);
        WRITE_ONCE(&s->id, d->id);
        WRITE_ONCE(&s->flags, d->flags);
        if (i)
            WRITE_ONCE(&s->inflight, 0); /* only heads are ever marked */
        if (i + 1 == ndescs)
            break;
        e = p->next[e];
    }
    struct inflight_desc_packed *h = &r->desc[first];
    WRITE_ONCE(&h->num, ndescs);
    WRITE_ONCE(&h->last, e);
    WRITE_ONCE(&h->counter, ++q->inflight_counter);
    /* After its copies and counter: a backend that dies here leaves the
     * head marked and still first on the free list, which the next start
     * clears (the buffer was not started, and is popped again). */
    __atomic_store_n(&h->inflight, 1, __ATOMIC_RELEASE);
    p->free_count -= ndescs;
    p->free_head = p->free_count ? p->next[e] : q->vr.packed.size;
    WRITE_ONCE(&r->free_head, p->free_head);
    /* After the mark: the buffer leaves the committed free list. */
    __atomic_store_n(&r->old_free_head, p->free_head, __ATOMIC_RELEASE);
    *b = (struct inflight_buf){.first = first, .last = e, .num = ndescs};
    return 0;
}

int inflight_saved(struct dp_queue *q, uint16_t head)
{
    const struct inflight_region_packed *r = packed_region(q);
    const struct inflight_buf *b = &q->ipk.bufs[head];
    if (!b->num)
        return -EINVAL;
    uint16_t e = b->first;
    /* The entries' indices and count are ours (checked on start); the
     * copies are the frontend's too, each field read once, then checked by
     * the walk like any descriptor. */
    for (uint16_t i = 0; i < b->num; i++) {
        const struct inflight_desc_packed *s = &r->desc[e];
        q->ipk.ring_copy[i] = (struct vring_packed_desc){
            .addr = READ_ONCE(&s->addr), .len = READ_ONCE(&s->len),
            .id = READ_ONCE(&s->id), .flags = READ_ONCE(&s->flags),
        };
        e = q->ipk.next[e];
    }
    return b->num;
}

static void packed_publish_begin(struct dp_queue *q)
{
    struct inflight_region_packed *r = packed_region(q);
    struct inflight_packed *p = &q->ipk;
    for (uint32_t i = 0; i < q->pushed_count; i++) {
        struct inflight_buf *b = &p->bufs[q->pushed[i]];
        p->next[b->last] = p->free_head;
        WRITE_ONCE(&r->desc[b->last].next, p->free_head);
        p->free_head = b->first;
        p->free_count += b->num;
        b->num = 0; /* first stays: the clear after publish needs it */
    }
    WRITE_ONCE(&r->free_head, p->free_head);
    WRITE_ONCE(&r->used_wrap_counter, q->vr.packed.used_wrap);
    /* Ordered before the publish by its release store. */
    WRITE_ONCE(&r->used_idx, q->vr.packed.used_idx);
}

static void packed_clear_published(struct dp_queue *q)
{
    struct inflight_region_packed *r = packed_region(q);
    /* The batch was published before any mark clears (as split). */
    atomic_thread_fence(memory_order_release);
    for (uint32_t i = 0; i < q->pushed_count; i++)
        WRITE_ONCE(&r->desc[q->ipk.bufs[q->pushed[i]].first].inflight, 0);
    q->pushed_count = 0;
    /* Release, after the clears: for a batch of a whole lap the wrap
     * counter alone tells the commit (the index is where it was). A death
     * between these stores is told by recovery from the indices. */
    __atomic_store_n(&r->old_free_head, q->ipk.free_head, __ATOMIC_RELEASE);
    __atomic_store_n(&r->old_used_wrap_counter, q->vr.packed.used_wrap, __ATOMIC_RELEASE);
    /* Last, after the clears: the commit. */
    __atomic_store_n(&r->old_used_idx, q->vr.packed.used_idx, __ATOMIC_RELEASE);
}

/* The region as a fresh ring's: every entry free, in index order. */
static void packed_lay_out(struct dp_queue *q)
{
    struct inflight_region_packed *r = packed_region(q);
    struct inflight_packed *p = &q->ipk;
    uint16_t size = q->vr.packed.size;
    memset(r->desc, 0, (size_t)size * sizeof(r->desc[0]));
    for (uint32_t e = 0; e < size; e++) {
        p->next[e] = (uint16_t)(e + 1);
        r->desc[e].next = (uint16_t)(e + 1);
    }
    memset(p->bufs, 0, (size_t)size * sizeof(p->bufs[0]));
    p->free_head = 0;
    p->free_count = size;
    r->free_head = r->old_free_head = 0;
    r->used_idx = r->old_used_idx = q->vr.packed.used_idx;
    r->used_wrap_counter = r->old_used_wrap_counter = q->vr.packed.used_wrap;
    r->desc_num = size;
    __atomic_store_n(&r->version, INFLIGHT_VERSION, __ATOMIC_RELEASE);
}

/* Clears used flags the ring may still hold past the used position: a
 * backend that died after pushing and before publishing left whole used
 * descriptors after the batch's first (only that one waits for the
 * publish). The driver reads them once the positions before are used
 * again, and would take them for completions of requests we are about to
 * run again. Those slots are the device's until then: each gets the
 * driver's available flags of its lap, which nobody reads as used. */
static void packed_unuse(struct vring_packed *vr, uint32_t count)
{
    uint16_t idx = vr->used_idx;
    bool wrap = vr->used_wrap;
    for (uint32_t i = 0; i < count; i++) {
        uint16_t flags = le16toh(READ_ONCE(&vr->desc[idx].flags));
        flags &= (uint16_t)~(VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED);
        flags |= wrap ? VRING_PACKED_DESC_F_AVAIL : VRING_PACKED_DESC_F_USED;
        WRITE_ONCE(&vr->desc[idx].flags, htole16(flags));
        if (++idx == vr->size) {
            idx = 0;
            wrap = !wrap;
        }
    }
}

enum entry_state { ENTRY_UNSEEN, ENTRY_LISTED, ENTRY_CLAIMED };

/* Follows the chain of one marked head through the region, claiming its
 * entries (private links and bufs filled). 0, or -EBADMSG when it leaves
 * the region, meets an entry already listed or claimed, or its id is out
 * of range or taken. */
static int packed_claim(struct dp_queue *q, uint8_t *state, uint16_t head, struct resubmit_entry *out,
                        uint32_t *total)
{
    const struct inflight_region_packed *r = packed_region(q);
    struct inflight_packed *p = &q->ipk;
    uint16_t size = q->vr.packed.size;
    uint16_t num = READ_ONCE(&r->desc[head].num);
    if (num == 0 || num > q->vr.packed.max_chain)
        return -EBADMSG;
    uint16_t e = head;
    for (uint16_t i = 0;; i++) {
        if (e >= size || state[e] != ENTRY_UNSEEN)
            return -EBADMSG;
        state[e] = ENTRY_CLAIMED;
        if (i + 1 == num)
            break;
        uint16_t next = READ_ONCE(&r->desc[e].next);
        p->next[e] = next;
        e = next;
    }
    uint16_t id = READ_ONCE(&r->desc[e].id); /* 2.8.6: the id is the last descriptor's */
    if (READ_ONCE(&r->desc[head].last) != e || id >= size || p->bufs[id].num)
        return -EBADMSG;
    p->bufs[id] = (struct inflight_buf){.first = head, .last = e, .num = num};
    *out = (struct resubmit_entry){.counter = READ_ONCE(&r->desc[head].counter), .head = id};
    *total += num;
    return 0;
}

/* Everything not claimed is free again: unmarked first, then the list
 * rebuilt in index order behind an empty committed list, so that a backend
 * dying at any step here leaves a region that recovers to the same
 * requests. */
static void packed_rebuild(struct dp_queue *q, const uint8_t *state, uint16_t used, bool wrap)
{
    struct inflight_region_packed *r = packed_region(q);
    struct inflight_packed *p = &q->ipk;
    uint16_t size = q->vr.packed.size;
    for (uint32_t e = 0; e < size; e++)
        if (state[e] != ENTRY_CLAIMED)
            WRITE_ONCE(&r->desc[e].inflight, 0);
    atomic_thread_fence(memory_order_release);
    WRITE_ONCE(&r->free_head, size);
    WRITE_ONCE(&r->used_idx, used);
    WRITE_ONCE(&r->used_wrap_counter, wrap);
    WRITE_ONCE(&r->old_free_head, size);
    WRITE_ONCE(&r->old_used_wrap_counter, wrap);
    __atomic_store_n(&r->old_used_idx, used, __ATOMIC_RELEASE);
    uint16_t head = size;
    uint32_t count = 0;
    for (uint32_t e = size; e-- > 0;) {
        if (state[e] == ENTRY_CLAIMED)
            continue;
        p->next[e] = head;
        WRITE_ONCE(&r->desc[e].next, head);
        head = (uint16_t)e;
        count++;
    }
    p->free_head = head;
    p->free_count = count;
    WRITE_ONCE(&r->free_head, head);
    __atomic_store_n(&r->old_free_head, head, __ATOMIC_RELEASE);
}

static int packed_recover(struct dp_queue *q)
{
    struct inflight_region_packed *r = packed_region(q);
    struct vring_packed *vr = &q->vr.packed;
    uint16_t size = vr->size;

    memset(q->ipk.bufs, 0, (size_t)size * sizeof(q->ipk.bufs[0]));
    if (READ_ONCE(&r->version) != INFLIGHT_VERSION || READ_ONCE(&r->desc_num) != size) {
        packed_lay_out(q); /* a fresh region (zeroed memfd) or one for another ring size */
        return 0;
    }
    uint16_t used = READ_ONCE(&r->used_idx), old_used = READ_ONCE(&r->old_used_idx);
    bool wrap = READ_ONCE(&r->used_wrap_counter), old_wrap = READ_ONCE(&r->old_used_wrap_counter);
    uint16_t free_head = READ_ONCE(&r->free_head), old_free = READ_ONCE(&r->old_free_head);
    if (used >= size || old_used >= size)
        return -EBADMSG;
    /* A batch moves the used position forward by 1..size descriptors, so
     * the old position's lap follows from the indices: the stored old wrap
     * counter may be the new one already (a death between its store and
     * the index's), and trusted it would put the ring a lap off. */
    if (used != old_used)
        old_wrap = old_used < used ? wrap : !wrap;
    if (used != old_used || wrap != old_wrap) {
        /* A batch was under way. Published when the descriptor at its first
         * position is no longer the driver's available one of that lap (it
         * is our used one, or the driver's of the next lap). */
        uint16_t flags = le16toh(__atomic_load_n(&vr->desc[old_used].flags, __ATOMIC_ACQUIRE));
        bool avail = flags & VRING_PACKED_DESC_F_AVAIL, used_bit = flags & VRING_PACKED_DESC_F_USED;
        if (avail != old_wrap || used_bit == old_wrap) {
            old_free = free_head;
            old_used = used;
            old_wrap = wrap;
        }
    }

    uint8_t *state = calloc(size, 1);
    struct resubmit_entry *order = malloc((size_t)size * sizeof(*order));
    int ret = state && order ? 0 : -ENOMEM;
    /* The committed free list: its entries are not in flight, whatever
     * their mark (a publish cleared them, or a pop died before taking them). */
    for (uint32_t e = old_free, steps = 0; !ret && e < size && state[e] == ENTRY_UNSEEN && steps < size; steps++) {
        state[e] = ENTRY_LISTED;
        e = READ_ONCE(&r->desc[e].next);
    }
    uint32_t n = 0, total = 0;
    for (uint32_t e = 0; !ret && e < size; e++) {
        if (state[e] == ENTRY_UNSEEN && READ_ONCE(&r->desc[e].inflight) == 1)
            ret = packed_claim(q, state, (uint16_t)e, &order[n++], &total);
    }
    /* A packed ring has at most size descriptors in flight. */
    if (!ret && total > size)
        ret = -EBADMSG;
    if (!ret) {
        uint32_t used_pos = old_used + (old_wrap ? 0 : size), avail_pos = (used_pos + total) % (2u * size);
        uint16_t avail = (uint16_t)(avail_pos % size);
        bool avail_wrap = avail_pos < size;
        ret = vring_packed_set_base(vr, VRING_PACKED_BASE(avail, avail_wrap, old_used, old_wrap));
    }
    if (!ret) {
        packed_unuse(vr, total);
        packed_rebuild(q, state, old_used, old_wrap);
        resubmit_in_order(q, order, n);
    } else {
        memset(q->ipk.bufs, 0, (size_t)size * sizeof(q->ipk.bufs[0]));
    }
    free(state);
    free(order);
    return ret;
}

/* ------------------------------------------------------------ either layout */

int inflight_recover(struct dp_queue *q)
{
    q->resubmit_count = q->resubmit_next = q->resubmit_held = 0;
    q->inflight_counter = 0;
    q->pushed_count = 0;
    return is_packed(q) ? packed_recover(q) : split_recover(q);
}

int inflight_mark(struct dp_queue *q, uint16_t head, uint16_t ndescs, bool resubmit)
{
    if (is_packed(q))
        return packed_mark(q, head, ndescs, resubmit);
    split_mark(q, head);
    return 0;
}

void inflight_publish_begin(struct dp_queue *q)
{
    if (is_packed(q))
        packed_publish_begin(q);
}

void inflight_clear_published(struct dp_queue *q)
{
    if (is_packed(q))
        packed_clear_published(q);
    else
        split_clear_published(q);
}
