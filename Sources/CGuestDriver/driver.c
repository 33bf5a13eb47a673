/*
 * The guest's side of virtio rings: memory, split rings (virtio 1.x, 2.7),
 * descriptor free list, requests and notifications; each call that both
 * layouts have hands a packed queue to packed.c.
 */
#ifndef _GNU_SOURCE
#error "CGuestDriver needs _GNU_SOURCE (memfd_create); set it in the target's cSettings"
#endif
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "virtio rings are little-endian and this driver writes them natively"
#endif

#include "driver_internal.h"

#include <errno.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static struct gd_queue *queue_get(const struct gd_driver *d, uint32_t q)
{
    return d && q < d->num_queues ? (struct gd_queue *)&d->queues[q] : NULL;
}

/* Device-side EVENT_IDX test (2.7.10): was event passed going old -> new? */
static bool vring_need_event(uint16_t event, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

/* ---------------------------------------------------------------- setup */

static int queue_init(struct gd_driver *d, struct gd_queue *q, uint32_t n)
{
    q->size = n;
    q->desc_gpa = gd_alloc(d, 16ull * n, 4096);
    q->avail_gpa = gd_alloc(d, 6 + 2ull * n, 64);
    q->used_gpa = gd_alloc(d, 6 + 8ull * n, 64);
    q->slot_gpa = gd_alloc(d, (uint64_t)GD_SLOT_STRIDE * n, 64);
    q->ind_gpa = gd_alloc(d, 16ull * n * n, 64);
    if (!q->desc_gpa || !q->avail_gpa || !q->used_gpa || !q->slot_gpa || !q->ind_gpa || d->brk > d->half)
        return -ENOMEM;

    uint8_t *avail = d->guest + q->avail_gpa, *used = d->guest + q->used_gpa;
    q->desc = (struct gd_vdesc *)(d->guest + q->desc_gpa);
    q->avail_flags = (_Atomic uint16_t *)avail;
    q->avail_idx = (_Atomic uint16_t *)(avail + 2);
    q->avail_ring = (uint16_t *)(avail + 4);
    q->used_event = (_Atomic uint16_t *)(avail + 4 + 2 * n);
    q->used_flags = (_Atomic uint16_t *)used;
    q->used_idx = (_Atomic uint16_t *)(used + 2);
    q->used_ring = (const struct gd_used_elem *)(used + 4);
    q->avail_event = (_Atomic uint16_t *)(used + 4 + 8 * n);
    q->slots = d->guest + q->slot_gpa;
    q->ind = (struct gd_vdesc *)(d->guest + q->ind_gpa);

    q->free_next = malloc(n * sizeof(*q->free_next));
    q->heads = calloc(n, sizeof(*q->heads));
    if (!q->free_next || !q->heads)
        return -ENOMEM;
    for (uint32_t i = 0; i < n; i++)
        q->free_next[i] = (uint16_t)(i + 1);
    q->num_free = n;
    q->calls = GD_CALLS_ON; /* used_event = 0, flags = 0: the memfd starts zeroed */

    if (d->packed) {
        int rc = gd_packed_queue_init(d, q);
        if (rc < 0)
            return rc;
    }

    q->kick_fd = eventfd(0, EFD_CLOEXEC);
    if (q->kick_fd < 0)
        return -errno;
    q->call_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (q->call_fd < 0)
        return -errno;
    return 0;
}

int gd_create(const struct gd_config *cfg, struct gd_driver **out)
{
    long page = sysconf(_SC_PAGESIZE);
    if (!cfg || !out || page <= 0 || cfg->num_queues == 0 || cfg->queue_size == 0 ||
        cfg->queue_size > DP_QUEUE_MAX_SIZE || (cfg->queue_size & (cfg->queue_size - 1)) ||
        cfg->mem_size == 0 || cfg->mem_size % (2 * (uint64_t)page) || cfg->mem_size > SIZE_MAX / 2)
        return -EINVAL;

    struct gd_driver *d = calloc(1, sizeof(*d) + cfg->num_queues * sizeof(struct gd_queue));
    if (!d)
        return -ENOMEM;
    d->mem_size = cfg->mem_size;
    d->half = cfg->mem_size / 2;
    d->event_idx = cfg->event_idx;
    d->packed = cfg->packed;
    d->num_queues = cfg->num_queues;
    d->memfd = -1;
    d->guest = MAP_FAILED;
    d->area = MAP_FAILED;
    for (uint32_t i = 0; i < d->num_queues; i++)
        d->queues[i].kick_fd = d->queues[i].call_fd = -1;

    int rc;
    d->memfd = memfd_create("gd-guest", MFD_CLOEXEC);
    if (d->memfd < 0 || ftruncate(d->memfd, (off_t)d->mem_size) < 0)
        goto fail_errno;
    d->guest = mmap(NULL, d->mem_size, PROT_READ | PROT_WRITE, MAP_SHARED, d->memfd, 0);
    if (d->guest == MAP_FAILED)
        goto fail_errno;

    /* Device view: [guard][region 1][gap][region 0][guard]. Not adjacent, and
     * out of GPA order, so nothing can get away with treating it as one. */
    d->area_len = d->mem_size + 3 * (size_t)page;
    d->area = mmap(NULL, d->area_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (d->area == MAP_FAILED)
        goto fail_errno;
    d->dev[1] = d->area + page;
    d->dev[0] = d->dev[1] + d->half + page;
    if (mmap(d->dev[1], d->half, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, d->memfd,
             (off_t)d->half) == MAP_FAILED ||
        mmap(d->dev[0], d->half, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, d->memfd, 0) == MAP_FAILED)
        goto fail_errno;

    d->brk = (uint64_t)page; /* GPA page 0 stays free: 0 means failure */
    for (uint32_t i = 0; i < d->num_queues; i++) {
        rc = queue_init(d, &d->queues[i], cfg->queue_size);
        if (rc < 0)
            goto fail;
    }
    d->brk_floor = d->brk;
    *out = d;
    return 0;

fail_errno:
    rc = -errno;
fail:
    gd_destroy(d);
    return rc;
}

void gd_destroy(struct gd_driver *d)
{
    if (!d)
        return;
    for (uint32_t i = 0; i < d->num_queues; i++) {
        struct gd_queue *q = &d->queues[i];
        if (q->kick_fd >= 0)
            close(q->kick_fd);
        if (q->call_fd >= 0)
            close(q->call_fd);
        free(q->free_next);
        free(q->heads);
        gd_packed_queue_free(q);
    }
    if (d->area != MAP_FAILED)
        munmap(d->area, d->area_len);
    if (d->guest != MAP_FAILED)
        munmap(d->guest, d->mem_size);
    if (d->memfd >= 0)
        close(d->memfd);
    free(d);
}

uint32_t gd_mem_regions(const struct gd_driver *d, struct dp_mem_region *out)
{
    for (uint32_t i = 0; i < 2; i++) {
        uint64_t gpa = i * d->half;
        out[i] = (struct dp_mem_region){
            .guest_phys_addr = gpa,
            .size = d->half,
            .user_addr = GD_UVA_BASE + gpa,
            .host_addr = d->dev[i],
        };
    }
    return 2;
}

void gd_queue_config(const struct gd_driver *d, uint32_t qi, struct dp_queue_config *out)
{
    const struct gd_queue *q = queue_get(d, qi);
    memset(out, 0, sizeof(*out));
    out->kick_fd = out->call_fd = out->err_fd = -1;
    if (!q)
        return;
    out->size = q->size;
    out->desc_addr = q->desc_gpa;
    out->avail_addr = q->avail_gpa;
    out->used_addr = q->used_gpa;
    out->addrs_are_user = false;
    out->event_idx = d->event_idx;
    out->indirect = true;
    out->last_avail_idx = 0;
    out->packed = d->packed;
    out->packed_base = d->packed ? gd_vring_base(d, qi) : 0;
    out->kick_fd = q->kick_fd;
    out->call_fd = q->call_fd;
}

int gd_memfd(const struct gd_driver *d) { return d->memfd; }
uint64_t gd_region_boundary(const struct gd_driver *d) { return d->half; }
uint64_t gd_mem_size(const struct gd_driver *d) { return d->mem_size; }

/* ---------------------------------------------------------------- guest memory */

uint64_t gd_alloc(struct gd_driver *d, uint64_t size, uint64_t align)
{
    if (!align)
        align = 1;
    if (!size || (align & (align - 1)) || align > d->mem_size)
        return 0;
    uint64_t at = (d->brk + align - 1) & ~(align - 1);
    if (at > d->mem_size || size > d->mem_size - at)
        return 0;
    d->brk = at + size;
    return at;
}

uint64_t gd_alloc_at(struct gd_driver *d, uint64_t gpa, uint64_t size)
{
    if (!size || gpa < d->brk || gpa > d->mem_size || size > d->mem_size - gpa)
        return 0;
    d->brk = gpa + size;
    return gpa;
}

uint64_t gd_alloc_mark(const struct gd_driver *d) { return d->brk; }

void gd_alloc_reset(struct gd_driver *d, uint64_t mark)
{
    d->brk = mark < d->brk_floor ? d->brk_floor : mark > d->mem_size ? d->mem_size : mark;
}

void *gd_ptr(struct gd_driver *d, uint64_t gpa)
{
    return gpa < d->mem_size ? d->guest + gpa : NULL;
}

uint64_t gd_slot_header_gpa(const struct gd_driver *d, uint32_t qi, uint16_t head)
{
    const struct gd_queue *q = queue_get(d, qi);
    return q && head < q->size ? q->slot_gpa + (uint64_t)head * GD_SLOT_STRIDE : 0;
}

uint64_t gd_slot_status_gpa(const struct gd_driver *d, uint32_t qi, uint16_t head)
{
    uint64_t hdr = gd_slot_header_gpa(d, qi, head);
    return hdr ? hdr + GD_STATUS_OFF : 0;
}

uint64_t gd_slot_indirect_gpa(const struct gd_driver *d, uint32_t qi, uint16_t head)
{
    const struct gd_queue *q = queue_get(d, qi);
    return q && head < q->size ? q->ind_gpa + 16ull * q->size * head : 0;
}

/* ---------------------------------------------------------------- raw ring access */

void gd_write_desc(struct gd_driver *d, uint32_t qi, uint16_t idx, uint64_t addr, uint32_t len,
                   uint16_t flags, uint16_t next)
{
    struct gd_queue *q = queue_get(d, qi);
    if (q && idx < q->size)
        q->desc[idx] = (struct gd_vdesc){ addr, len, flags, next };
}

uint64_t gd_desc_table_gpa(const struct gd_driver *d, uint32_t qi)
{
    const struct gd_queue *q = queue_get(d, qi);
    return q ? q->desc_gpa : 0;
}

void gd_avail_add(struct gd_driver *d, uint32_t qi, uint16_t head)
{
    struct gd_queue *q = queue_get(d, qi);
    if (!q)
        return;
    q->avail_ring[q->avail_shadow & (q->size - 1)] = head;
    q->avail_shadow++;
}

void gd_avail_publish(struct gd_driver *d, uint32_t qi)
{
    struct gd_queue *q = queue_get(d, qi);
    if (!q)
        return;
    if (d->packed) {
        gd_packed_publish(q);
        return;
    }
    /* Release: descriptors and ring entries before the index (pairs with the
     * device's acquire load of avail->idx). */
    atomic_store_explicit(q->avail_idx, q->avail_shadow, memory_order_release);
    q->avail_pub = q->avail_shadow;
}

void gd_set_avail_idx(struct gd_driver *d, uint32_t qi, uint16_t idx)
{
    struct gd_queue *q = queue_get(d, qi);
    if (!q)
        return;
    q->avail_shadow = idx;
    gd_avail_publish(d, qi);
}

void gd_set_avail_flags(struct gd_driver *d, uint32_t qi, uint16_t flags)
{
    struct gd_queue *q = queue_get(d, qi);
    if (!q)
        return;
    q->avail_flags_shadow = flags;
    atomic_store_explicit(q->avail_flags, flags, memory_order_relaxed);
}

void gd_set_used_event(struct gd_driver *d, uint32_t qi, uint16_t v)
{
    struct gd_queue *q = queue_get(d, qi);
    if (!q)
        return;
    q->calls = GD_CALLS_MANUAL;
    atomic_store_explicit(q->used_event, v, memory_order_relaxed);
    atomic_thread_fence(memory_order_seq_cst);
}

uint16_t gd_avail_event(const struct gd_driver *d, uint32_t qi)
{
    const struct gd_queue *q = queue_get(d, qi);
    return q ? atomic_load_explicit(q->avail_event, memory_order_relaxed) : 0;
}

uint16_t gd_used_flags(const struct gd_driver *d, uint32_t qi)
{
    const struct gd_queue *q = queue_get(d, qi);
    return q ? atomic_load_explicit(q->used_flags, memory_order_relaxed) : 0;
}

uint16_t gd_used_idx(const struct gd_driver *d, uint32_t qi)
{
    const struct gd_queue *q = queue_get(d, qi);
    return q ? atomic_load_explicit(q->used_idx, memory_order_acquire) : 0;
}

/* ---------------------------------------------------------------- notifications */

int gd_kick(struct gd_driver *d, uint32_t qi)
{
    struct gd_queue *q = queue_get(d, qi);
    if (!q)
        return -EINVAL;
    uint64_t one = 1;
    ssize_t n;
    do
        n = write(q->kick_fd, &one, sizeof(one));
    while (n < 0 && errno == EINTR);
    return n == sizeof(one) ? 0 : n < 0 ? -errno : -EIO;
}

int gd_kick_if_needed(struct gd_driver *d, uint32_t qi)
{
    struct gd_queue *q = queue_get(d, qi);
    if (!q)
        return -EINVAL;
    if (d->packed) {
        if (!gd_packed_kick_needed(d, q))
            return 0;
        int rc = gd_kick(d, qi);
        return rc < 0 ? rc : 1;
    }
    uint16_t old = q->kick_old, new_idx = q->avail_pub;
    q->kick_old = new_idx;
    if (old == new_idx)
        return 0;
    /* The published avail->idx must be visible before we read the device's
     * suppression state; pairs with the device's fence between writing
     * avail_event / NO_NOTIFY and re-reading avail->idx. */
    atomic_thread_fence(memory_order_seq_cst);
    bool need;
    if (d->event_idx)
        need = vring_need_event(atomic_load_explicit(q->avail_event, memory_order_relaxed), new_idx, old);
    else
        need = !(atomic_load_explicit(q->used_flags, memory_order_relaxed) & GD_USED_F_NO_NOTIFY);
    if (!need)
        return 0;
    int rc = gd_kick(d, qi);
    return rc < 0 ? rc : 1;
}

/* used_event for "no calls": behind last_used, so the device's used idx
 * (at most size <= 32768 ahead of last_used) cannot reach it again. */
static void used_event_park(struct gd_queue *q)
{
    q->used_event_set = (uint16_t)(q->last_used - 1);
    atomic_store_explicit(q->used_event, q->used_event_set, memory_order_relaxed);
}

int gd_used_pop(struct gd_driver *d, uint32_t qi, uint32_t *id, uint32_t *len)
{
    struct gd_queue *q = queue_get(d, qi);
    if (!q)
        return -EINVAL;
    if (d->packed)
        return gd_packed_used_pop(d, q, id, len);
    /* Acquire: the element (and the data and status it covers) is read after
     * the index; pairs with the device's release store of used->idx. */
    if (atomic_load_explicit(q->used_idx, memory_order_acquire) == q->last_used)
        return 0;
    struct gd_used_elem e = q->used_ring[q->last_used & (q->size - 1)];
    q->last_used++;
    if (id)
        *id = e.id;
    if (len)
        *len = e.len;
    if (!d->event_idx)
        return 1;
    if (q->calls == GD_CALLS_ON) {
        /* As Linux's virtqueue_get_buf: ask for a call on the next element.
         * The fence orders this store before our next read of used->idx,
         * else both sides could miss each other and we sleep forever. */
        atomic_store_explicit(q->used_event, q->last_used, memory_order_relaxed);
        atomic_thread_fence(memory_order_seq_cst);
    } else if (q->calls == GD_CALLS_OFF && (uint16_t)(q->last_used - q->used_event_set) > 0x4000) {
        used_event_park(q); /* rarely: keep used_event out of the device's reach */
    }
    return 1;
}

int gd_enable_calls(struct gd_driver *d, uint32_t qi)
{
    struct gd_queue *q = queue_get(d, qi);
    if (!q)
        return -EINVAL;
    if (d->packed) {
        gd_packed_set_calls(d, q, true);
        atomic_thread_fence(memory_order_seq_cst); /* as below */
        return gd_packed_used_pending(q);
    }
    q->calls = GD_CALLS_ON;
    if (d->event_idx) {
        atomic_store_explicit(q->used_event, q->last_used, memory_order_relaxed);
    } else {
        q->avail_flags_shadow &= (uint16_t)~GD_AVAIL_F_NO_INTERRUPT;
        atomic_store_explicit(q->avail_flags, q->avail_flags_shadow, memory_order_relaxed);
    }
    /* Pairs with the device's fence between publishing used->idx and reading
     * used_event / flags: one of us sees the other. */
    atomic_thread_fence(memory_order_seq_cst);
    return atomic_load_explicit(q->used_idx, memory_order_acquire) != q->last_used;
}

void gd_disable_calls(struct gd_driver *d, uint32_t qi)
{
    struct gd_queue *q = queue_get(d, qi);
    if (!q)
        return;
    if (d->packed) {
        gd_packed_set_calls(d, q, false);
        return;
    }
    q->calls = GD_CALLS_OFF;
    if (d->event_idx) {
        used_event_park(q);
    } else {
        q->avail_flags_shadow |= GD_AVAIL_F_NO_INTERRUPT;
        atomic_store_explicit(q->avail_flags, q->avail_flags_shadow, memory_order_relaxed);
    }
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

int gd_wait_call(struct gd_driver *d, uint32_t qi, int timeout_ms)
{
    struct gd_queue *q = queue_get(d, qi);
    if (!q)
        return -EINVAL;
    struct pollfd pfd = { .fd = q->call_fd, .events = POLLIN };
    uint64_t deadline = timeout_ms < 0 ? 0 : now_ms() + (uint64_t)timeout_ms;
    int left = timeout_ms;
    for (;;) {
        int n = poll(&pfd, 1, left);
        if (n > 0)
            break;
        if (n == 0)
            return 0;
        if (errno != EINTR)
            return -errno;
        if (timeout_ms >= 0) {
            uint64_t now = now_ms();
            left = now >= deadline ? 0 : (int)(deadline - now);
        }
    }
    /* Never a blocking read: the fd is non-blocking, and it was readable. A
     * concurrent reader may have taken the count (EAGAIN); still signalled. */
    uint64_t v;
    if (read(q->call_fd, &v, sizeof(v)) < 0 && errno != EAGAIN && errno != EINTR)
        return -errno;
    return 1;
}

/* ---------------------------------------------------------------- requests */

uint64_t gd_slot_fill(struct gd_queue *q, uint16_t head, const struct gd_req *req)
{
    uint8_t *slot = q->slots + (size_t)head * GD_SLOT_STRIDE;
    uint32_t type_reserved[2] = { req->type, 0 };
    memcpy(slot, type_reserved, 8);
    memcpy(slot + 8, &req->sector, 8);
    slot[GD_STATUS_OFF] = 0xFF; /* the device must overwrite it */
    return q->slot_gpa + (uint64_t)head * GD_SLOT_STRIDE;
}

uint16_t gd_data_flags(const struct gd_req *req)
{
    return req->type == GD_BLK_T_IN || req->type == GD_BLK_T_GET_ID ? GD_DESC_F_WRITE : 0;
}

int gd_request_add(struct gd_driver *d, uint32_t qi, const struct gd_req *req, uint16_t *head_out)
{
    struct gd_queue *q = queue_get(d, qi);
    if (!q || !req || (req->nsegs && !req->segs))
        return -EINVAL;
    if ((uint64_t)req->nsegs + 2 > q->size)
        return -EINVAL;
    if (d->packed) {
        int rc = gd_packed_request_add(d, q, req, head_out);
        return rc;
    }
    uint32_t n = req->nsegs + 2, need = req->indirect ? 1 : n;
    if (q->num_free < need)
        return -ENOSPC;

    uint16_t head = q->free_head;
    uint64_t hdr_gpa = gd_slot_fill(q, head, req);
    uint16_t dflags = gd_data_flags(req);
    uint16_t last = head;
    if (req->indirect) {
        struct gd_vdesc *t = q->ind + (size_t)head * q->size;
        t[0] = (struct gd_vdesc){ hdr_gpa, GD_HDR_LEN, GD_DESC_F_NEXT, 1 };
        for (uint32_t i = 0; i < req->nsegs; i++)
            t[i + 1] = (struct gd_vdesc){ req->segs[i].gpa, req->segs[i].len, dflags | GD_DESC_F_NEXT,
                                          (uint16_t)(i + 2) };
        t[n - 1] = (struct gd_vdesc){ hdr_gpa + GD_STATUS_OFF, 1, GD_DESC_F_WRITE, 0 };
        q->desc[head] = (struct gd_vdesc){ q->ind_gpa + 16ull * q->size * head, 16 * n, GD_DESC_F_INDIRECT, 0 };
    } else {
        uint16_t i = head;
        for (uint32_t k = 0; k < n; k++) {
            struct gd_vdesc *e = &q->desc[i];
            if (k == 0)
                *e = (struct gd_vdesc){ hdr_gpa, GD_HDR_LEN, 0, 0 };
            else if (k == n - 1)
                *e = (struct gd_vdesc){ hdr_gpa + GD_STATUS_OFF, 1, GD_DESC_F_WRITE, 0 };
            else
                *e = (struct gd_vdesc){ req->segs[k - 1].gpa, req->segs[k - 1].len, dflags, 0 };
            last = i;
            if (k + 1 < n) {
                e->flags |= GD_DESC_F_NEXT;
                e->next = q->free_next[i];
                i = q->free_next[i];
            }
        }
    }
    q->free_head = q->free_next[last]; /* stale when the list runs empty; unused then */
    q->num_free -= need;
    q->heads[head] = (struct gd_head){ .last = last, .ndesc = (uint16_t)need, .busy = true };
    q->in_flight++;
    gd_avail_add(d, qi, head);
    if (head_out)
        *head_out = head;
    return 0;
}

int gd_submit(struct gd_driver *d, uint32_t qi, const struct gd_req *req, uint16_t *head)
{
    int rc = gd_request_add(d, qi, req, head);
    if (rc == 0)
        gd_avail_publish(d, qi);
    return rc;
}

int gd_complete(struct gd_driver *d, uint32_t qi, uint16_t *head, uint32_t *len, uint8_t *status)
{
    struct gd_queue *q = queue_get(d, qi);
    uint32_t id, l;
    int rc = gd_used_pop(d, qi, &id, &l);
    if (rc <= 0)
        return rc;
    if (id >= q->size || !q->heads[id].busy)
        return -EINVAL;
    struct gd_head *h = &q->heads[id];
    h->busy = false;
    /* Split: splice the chain's descriptors back whole. Packed: the id goes
     * back (its ring slots were freed by moving past them). */
    q->free_next[d->packed ? id : h->last] = q->free_head;
    q->free_head = (uint16_t)id;
    q->num_free += h->ndesc;
    q->in_flight--;
    if (head)
        *head = (uint16_t)id;
    if (len)
        *len = l;
    if (status)
        *status = q->slots[(size_t)id * GD_SLOT_STRIDE + GD_STATUS_OFF];
    return 1;
}

uint32_t gd_in_flight(const struct gd_driver *d, uint32_t qi)
{
    const struct gd_queue *q = queue_get(d, qi);
    return q ? q->in_flight : 0;
}

bool gd_is_packed(const struct gd_driver *d) { return d->packed; }

uint32_t gd_vring_base(const struct gd_driver *d, uint32_t qi)
{
    const struct gd_queue *q = queue_get(d, qi);
    if (!q)
        return 0;
    if (!d->packed)
        return atomic_load_explicit(q->used_idx, memory_order_acquire);
    uint32_t at = q->last_used | (q->used_wrap ? 0x8000u : 0);
    return at | at << 16;
}

bool gd_used_pending(const struct gd_driver *d, uint32_t qi)
{
    const struct gd_queue *q = queue_get(d, qi);
    if (!q)
        return false;
    if (d->packed)
        return gd_packed_used_pending(q);
    return atomic_load_explicit(q->used_idx, memory_order_acquire) != q->last_used;
}

/* ---------------------------------------------------------------- raw packed ring access */

void gd_packed_write_desc(struct gd_driver *d, uint32_t qi, uint16_t slot, uint64_t addr, uint32_t len,
                          uint16_t id, uint16_t flags)
{
    struct gd_queue *q = queue_get(d, qi);
    if (!q || !d->packed || slot >= q->size)
        return;
    struct gd_pdesc *e = &q->pdesc[slot];
    e->addr = addr;
    e->len = len;
    e->id = id;
    /* Release: a descriptor made available by this store is whole. */
    atomic_store_explicit((_Atomic uint16_t *)&e->flags, flags, memory_order_release);
}

uint16_t gd_packed_next_slot(const struct gd_driver *d, uint32_t qi, uint16_t *avail_bits)
{
    const struct gd_queue *q = queue_get(d, qi);
    if (!q || !d->packed)
        return 0;
    if (avail_bits)
        *avail_bits = q->avail_wrap ? GD_PDESC_F_AVAIL : GD_PDESC_F_USED;
    return q->next_avail;
}

void gd_packed_skip(struct gd_driver *d, uint32_t qi, uint16_t n)
{
    struct gd_queue *q = queue_get(d, qi);
    if (!q || !d->packed)
        return;
    if (n)
        q->raw_ndesc[q->next_avail] = n;
    for (uint16_t i = 0; i < n; i++)
        if (++q->next_avail == q->size) {
            q->next_avail = 0;
            q->avail_wrap = !q->avail_wrap;
        }
    gd_packed_publish(q);
}

uint32_t gd_packed_device_event(const struct gd_driver *d, uint32_t qi)
{
    const struct gd_queue *q = queue_get(d, qi);
    if (!q || !d->packed)
        return 0;
    return (uint32_t)atomic_load_explicit(q->dev_flags, memory_order_relaxed) << 16 |
           atomic_load_explicit(q->dev_off_wrap, memory_order_relaxed);
}

int gd_eventfd(void)
{
    int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    return fd < 0 ? -errno : fd;
}
