/*
 * Deterministic self-test of the packed-ring walker (vring_packed.c): a
 * well-behaved packed driver (virtio 1.2 section 2.8, the driver side as
 * Linux's virtio_ring.c does it) and the device in one thread.
 *
 *   - rings of sizes 1, 2, 3, 5, 7, 8, 64, 255 and 256 (not only powers of
 *     two) wrap several times; chains direct and indirect; buffers completed
 *     out of order in batches; the driver checks every used descriptor (id,
 *     len, flags, position) and the bytes the device wrote, the device the
 *     bytes the driver wrote;
 *   - Driver Area notifications (ENABLE, DISABLE, DESC offsets across a
 *     wrap), kicks through the Device Area, the vhost-user base;
 *   - hostile buffers, each expecting its fault (and pop_status's answer).
 *
 * Built by fuzz/build.sh with ASan and UBSan, run by scripts/test.
 * Exits 0 when every check holds; prints the first failure and exits 1.
 */
#ifndef _GNU_SOURCE
#error "build with -D_GNU_SOURCE (fuzz/build.sh does)"
#endif

#include <endian.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "guest_mem.h"
#include "vring_packed.h"

#define CHECK(cond)                                                                       \
    do {                                                                                  \
        if (!(cond)) {                                                                    \
            fprintf(stderr, "vring_packed_selftest: %s:%d: check failed: %s\n", __FILE__, \
                    __LINE__, #cond);                                                     \
            abort();                                                                      \
        }                                                                                 \
    } while (0)

#define CHECK_EQ(a, b)                                                                         \
    do {                                                                                       \
        long long a_ = (long long)(a), b_ = (long long)(b);                                    \
        if (a_ != b_) {                                                                        \
            fprintf(stderr, "vring_packed_selftest: %s:%d: %s == %lld, expected %s == %lld\n", \
                    __FILE__, __LINE__, #a, a_, #b, b_);                                       \
            abort();                                                                           \
        }                                                                                      \
    } while (0)

/* Guest memory: two adjacent regions, so tables and buffers can span them. */
#define GPA0 0x100000ull
#define SIZE0 (4ull << 20)
#define GPA1 (GPA0 + SIZE0)
#define SIZE1 (1ull << 20)
#define RING_GPA GPA0                    /* descriptor ring (256 * 16 at most) */
#define DRV_EV_GPA (GPA0 + 0x1000)       /* Driver Area */
#define DEV_EV_GPA (GPA0 + 0x1004)       /* Device Area */
#define TABLE_GPA (GPA0 + 0x2000)        /* indirect tables: 0x100 bytes per id */
#define DATA_GPA (GPA0 + 0x20000)        /* buffers: 0x3000 bytes per id */
#define DATA_PER_ID 0x3000ull
#define MAXQ 256
#define MAXSEG 8

static uint8_t *host0, *host1;
static struct dp_mem *mem;

static void *gpa_host(uint64_t gpa)
{
    if (gpa >= GPA0 && gpa < GPA0 + SIZE0)
        return host0 + (gpa - GPA0);
    CHECK(gpa >= GPA1 && gpa < GPA1 + SIZE1);
    return host1 + (gpa - GPA1);
}

static void setup_memory(void)
{
    host0 = aligned_alloc(4096, SIZE0);
    host1 = aligned_alloc(4096, SIZE1);
    CHECK(host0 && host1);
    struct dp_mem_region r[2] = {
        {.guest_phys_addr = GPA0, .size = SIZE0, .user_addr = GPA0, .host_addr = host0},
        {.guest_phys_addr = GPA1, .size = SIZE1, .user_addr = GPA1, .host_addr = host1},
    };
    CHECK(dp_mem_create(r, 2, &mem) == 0);
}

static uint32_t rng = 0x2545f491;
static uint32_t rnd(uint32_t n)
{
    rng ^= rng << 13;
    rng ^= rng >> 17;
    rng ^= rng << 5;
    return rng % n;
}

/* ------------------------------------------------------------ the driver */

struct seg {
    uint64_t gpa;
    uint32_t len;
    bool write;
};

struct gbuf {
    struct seg seg[MAXSEG];
    unsigned nseg;
    uint16_t ndescs; /* ring descriptors it took */
    bool busy;
};

struct gdrv {
    struct vring_packed_desc *ring;
    struct vring_packed_event *drv_ev, *dev_ev;
    uint16_t size, avail, used;
    bool avail_wrap, used_wrap;
    uint32_t free_descs;
    unsigned used_laps;
    struct gbuf buf[MAXQ];
    uint16_t order[MAXQ]; /* ids in the order made available, for the device's check */
    unsigned order_head, order_count;
};

static void drv_init(struct gdrv *g, uint16_t size)
{
    memset(g, 0, sizeof(*g));
    g->ring = gpa_host(RING_GPA);
    g->drv_ev = gpa_host(DRV_EV_GPA);
    g->dev_ev = gpa_host(DEV_EV_GPA);
    memset(g->ring, 0, 16u * size); /* 2.8.13: the ring is zero-initialized */
    memset(g->drv_ev, 0, 8);
    g->size = size;
    g->avail_wrap = g->used_wrap = true;
    g->free_descs = size;
}

static uint16_t avail_flags(bool wrap)
{
    return wrap ? VRING_PACKED_DESC_F_AVAIL : VRING_PACKED_DESC_F_USED;
}

/* Writes one descriptor at the driver's avail position; the first one's
 * flags are returned instead, to be written last. */
static uint16_t drv_put(struct gdrv *g, uint64_t addr, uint32_t len, uint16_t id, uint16_t flags, bool first)
{
    struct vring_packed_desc *d = &g->ring[g->avail];
    d->addr = htole64(addr);
    d->len = htole32(len);
    d->id = htole16(id);
    flags |= avail_flags(g->avail_wrap);
    if (!first)
        __atomic_store_n(&d->flags, htole16(flags), __ATOMIC_RELEASE);
    if (++g->avail == g->size) {
        g->avail = 0;
        g->avail_wrap = !g->avail_wrap;
    }
    return flags;
}

/* Makes buffer id available, direct or through an indirect table; as
 * Linux's virtqueue_add_packed, the first descriptor's flags go last. */
static bool drv_add(struct gdrv *g, uint16_t id, bool indirect)
{
    struct gbuf *b = &g->buf[id];
    uint16_t need = indirect ? 1 : (uint16_t)b->nseg;
    if (b->busy || need > g->free_descs)
        return false;
    for (unsigned i = 0; i < b->nseg; i++) /* what the device must read */
        if (!b->seg[i].write)
            for (uint32_t k = 0; k < b->seg[i].len; k++)
                *(uint8_t *)gpa_host(b->seg[i].gpa + k) = (uint8_t)(id ^ 0x5a ^ k ^ i);
    uint16_t head = g->avail, first_flags;
    if (indirect) {
        uint64_t table = TABLE_GPA + 0x100ull * id;
        struct vring_packed_desc *t = gpa_host(table);
        for (unsigned i = 0; i < b->nseg; i++)
            t[i] = (struct vring_packed_desc){htole64(b->seg[i].gpa), htole32(b->seg[i].len), 0,
                                              htole16(b->seg[i].write ? VRING_DESC_F_WRITE : 0)};
        first_flags = drv_put(g, table, 16 * b->nseg, id, VRING_DESC_F_INDIRECT, true);
    } else {
        first_flags = 0;
        for (unsigned i = 0; i < b->nseg; i++) {
            uint16_t f = (uint16_t)((b->seg[i].write ? VRING_DESC_F_WRITE : 0) |
                                    (i + 1 < b->nseg ? VRING_DESC_F_NEXT : 0));
            uint16_t v = drv_put(g, b->seg[i].gpa, b->seg[i].len, i + 1 == b->nseg ? id : 0xdead, f, i == 0);
            if (i == 0)
                first_flags = v;
        }
    }
    __atomic_store_n(&g->ring[head].flags, htole16(first_flags), __ATOMIC_RELEASE);
    b->busy = true;
    b->ndescs = need;
    g->free_descs -= need;
    g->order[(g->order_head + g->order_count++) % MAXQ] = id;
    return true;
}

/* A random buffer for id: readable segments, writable ones, a status byte. */
static void drv_shape(struct gdrv *g, uint16_t id, unsigned nseg)
{
    struct gbuf *b = &g->buf[id];
    unsigned nout = rnd(nseg); /* at least the status byte is writable */
    b->nseg = nseg;
    for (unsigned i = 0; i < nseg; i++) {
        b->seg[i].gpa = DATA_GPA + DATA_PER_ID * id + 0x600ull * i + rnd(16);
        b->seg[i].len = i + 1 == nseg ? 1 : 1 + rnd(0x5f0);
        b->seg[i].write = i >= nout;
    }
}

static uint32_t buf_in_len(const struct gbuf *b)
{
    uint32_t n = 0;
    for (unsigned i = 0; i < b->nseg; i++)
        n += b->seg[i].write ? b->seg[i].len : 0;
    return n;
}

static uint32_t buf_len(const struct gbuf *b)
{
    uint32_t n = 0;
    for (unsigned i = 0; i < b->nseg; i++)
        n += b->seg[i].len;
    return n;
}

/* Reaps used buffers as Linux's virtqueue_get_buf_ctx_packed does; checks
 * each against what the device must have done. Returns how many. */
static unsigned drv_reap(struct gdrv *g)
{
    unsigned n = 0;
    for (;;) {
        struct vring_packed_desc *d = &g->ring[g->used];
        uint16_t flags = le16toh(__atomic_load_n(&d->flags, __ATOMIC_ACQUIRE));
        bool avail = flags & VRING_PACKED_DESC_F_AVAIL, used = flags & VRING_PACKED_DESC_F_USED;
        /* Both flags: a slot skipped by a used chain keeps the driver's
         * descriptor of a lap ago, whose USED bit alone matches. */
        if (avail != used || used != g->used_wrap)
            break;
        uint16_t id = le16toh(d->id);
        uint32_t len = le32toh(d->len);
        CHECK(id < g->size && g->buf[id].busy);
        struct gbuf *b = &g->buf[id];
        CHECK_EQ(len, buf_in_len(b));
        CHECK(flags & VRING_DESC_F_WRITE); /* len is meaningful: the status byte at least */
        uint32_t k = 0;
        for (unsigned i = 0; i < b->nseg; i++) {
            if (!b->seg[i].write)
                continue;
            for (uint32_t j = 0; j < b->seg[i].len; j++, k++) {
                uint8_t want = k + 1 == len ? 0 : (uint8_t)(id + k);
                CHECK_EQ(*(uint8_t *)gpa_host(b->seg[i].gpa + j), want);
            }
        }
        b->busy = false;
        g->free_descs += b->ndescs;
        g->used += b->ndescs;
        if (g->used >= g->size) {
            g->used -= g->size;
            g->used_wrap = !g->used_wrap;
            g->used_laps++;
        }
        n++;
    }
    return n;
}

/* ------------------------------------------------------------ the device */

struct popped {
    uint16_t id, ndescs;
    uint32_t in_len;
    struct iovec iov[2 * MAXSEG];
    uint32_t out_num, in_num;
};

static struct vring_desc scratch[VRING_INDIRECT_MAX];

static int dev_init(struct vring_packed *vr, uint16_t size, uint32_t base, bool event_idx, bool indirect,
                    uint32_t max_chain)
{
    return vring_packed_init(vr, size, gpa_host(RING_GPA), gpa_host(DRV_EV_GPA), gpa_host(DEV_EV_GPA),
                             base, event_idx, indirect, max_chain);
}

/* Does what a read does: fills the writable bytes, the status byte last. */
static void dev_fill_in(const struct popped *p)
{
    uint32_t k = 0;
    for (uint32_t i = p->out_num; i < p->out_num + p->in_num; i++) {
        uint8_t *b = p->iov[i].iov_base;
        for (size_t j = 0; j < p->iov[i].iov_len; j++, k++)
            b[j] = k + 1 == p->in_len ? 0 : (uint8_t)(p->id + k);
    }
    CHECK_EQ(k, p->in_len);
}

/* Checks the readable bytes against the driver's pattern, segment by segment. */
static void dev_check_readable(const struct gdrv *g, const struct popped *p)
{
    const struct gbuf *b = &g->buf[p->id];
    uint32_t iov = 0;
    size_t at = 0;
    for (unsigned i = 0; i < b->nseg && !b->seg[i].write; i++) {
        for (uint32_t k = 0; k < b->seg[i].len; k++) {
            while (at == p->iov[iov].iov_len) {
                iov++;
                at = 0;
            }
            CHECK(iov < p->out_num);
            CHECK_EQ(((uint8_t *)p->iov[iov].iov_base)[at], (uint8_t)(p->id ^ 0x5a ^ k ^ i));
            at++;
        }
    }
}

/* ------------------------------------------------------------ tests */

static unsigned total_buffers;

static void test_driver_roundtrip(uint16_t size, bool event_idx, bool indirect)
{
    struct gdrv g;
    struct vring_packed vr;
    static struct popped pop[MAXQ];
    unsigned npop = 0, done = 0;
    drv_init(&g, size);
    CHECK_EQ(dev_init(&vr, size, VRING_PACKED_BASE_FRESH, event_idx, indirect, MAXSEG + 2), 0);
    g.drv_ev->flags = htole16(VRING_PACKED_EVENT_ENABLE);

    while (g.used_laps < 4 || done < 8u * size) {
        /* The driver adds a few buffers (ids in use stay busy). */
        for (unsigned tries = rnd(4) + 1; tries; tries--) {
            uint16_t id = (uint16_t)rnd(size);
            if (g.buf[id].busy)
                continue;
            drv_shape(&g, id, 1 + rnd(MAXSEG));
            bool ind = indirect && (g.buf[id].nseg > g.free_descs || rnd(3) == 0);
            (void)drv_add(&g, id, ind);
        }
        /* The device pops all that is there, in order. */
        while (vring_packed_has_avail(&vr)) {
            struct popped *p = &pop[npop];
            struct vring_chain c = {.iov = p->iov, .iov_max = 2 * MAXSEG, .scratch = scratch};
            CHECK_EQ(vring_packed_pop(&vr, mem, &c, &p->id, &p->ndescs), 0);
            CHECK(g.order_count > 0);
            CHECK_EQ(p->id, g.order[g.order_head]);
            g.order_head = (g.order_head + 1) % MAXQ;
            g.order_count--;
            CHECK_EQ(p->ndescs, g.buf[p->id].ndescs);
            CHECK_EQ(c.in_len, buf_in_len(&g.buf[p->id]));
            CHECK_EQ(c.out_len + c.in_len, buf_len(&g.buf[p->id]));
            CHECK(c.status == gpa_host(g.buf[p->id].seg[g.buf[p->id].nseg - 1].gpa));
            p->in_len = (uint32_t)c.in_len;
            p->out_num = c.out_num;
            p->in_num = c.in_num;
            dev_check_readable(&g, p);
            npop++;
        }
        CHECK_EQ(vr.inflight, size - g.free_descs);
        /* Completes a random subset out of order, in one batch. */
        for (unsigned k = npop ? rnd(npop + 1) : 0; k; k--) {
            unsigned i = rnd(npop);
            dev_fill_in(&pop[i]);
            CHECK_EQ(vring_packed_push(&vr, pop[i].id, pop[i].in_len, pop[i].ndescs), 0);
            pop[i] = pop[--npop];
            done++;
        }
        if (rnd(4) == 0) { /* the batch is invisible until published */
            unsigned before = drv_reap(&g);
            CHECK_EQ(before, 0);
        }
        vring_packed_publish(&vr);
        (void)vring_packed_should_notify(&vr);
        drv_reap(&g);
        /* All made available is popped, all published is reaped. */
        CHECK_EQ(vring_packed_base(&vr), VRING_PACKED_BASE(g.avail, g.avail_wrap, g.used, g.used_wrap));
    }
    while (npop) { /* drain */
        dev_fill_in(&pop[npop - 1]);
        CHECK_EQ(vring_packed_push(&vr, pop[npop - 1].id, pop[npop - 1].in_len, pop[npop - 1].ndescs), 0);
        npop--;
    }
    vring_packed_publish(&vr);
    drv_reap(&g);
    CHECK_EQ(g.free_descs, size);
    CHECK_EQ(vr.inflight, 0);
    CHECK_EQ(vring_packed_base(&vr), VRING_PACKED_BASE(g.avail, g.avail_wrap, g.used, g.used_wrap));
    total_buffers += done;
}

/* Used notifications through the Driver Area (2.8.10). */
static void test_notify(void)
{
    struct gdrv g;
    struct vring_packed vr;
    uint16_t size = 5;
    drv_init(&g, size);
    CHECK_EQ(dev_init(&vr, size, VRING_PACKED_BASE_FRESH, true, false, 4), 0);
    /* Without a decision yet, EVENT_IDX notifies (as split does). */
    g.drv_ev->off_wrap = htole16(3 | VRING_PACKED_EVENT_WRAP);
    g.drv_ev->flags = htole16(VRING_PACKED_EVENT_DESC);
    CHECK(vring_packed_should_notify(&vr));
    /* One-descriptor buffers, one at a time: the event is position 3 of
     * the first lap, then position 1 of the second (wrap 0). */
    unsigned notified[16] = {0};
    for (unsigned n = 0; n < 12; n++) {
        if (n == 5)
            g.drv_ev->off_wrap = htole16(1); /* the second lap (wrap counter 0) */
        drv_shape(&g, 0, 1);
        CHECK(drv_add(&g, 0, false));
        struct popped p;
        struct vring_chain c = {.iov = p.iov, .iov_max = 2 * MAXSEG, .scratch = scratch};
        CHECK_EQ(vring_packed_pop(&vr, mem, &c, &p.id, &p.ndescs), 0);
        p.in_len = (uint32_t)c.in_len;
        p.out_num = c.out_num;
        p.in_num = c.in_num;
        dev_fill_in(&p);
        CHECK_EQ(vring_packed_push(&vr, p.id, p.in_len, p.ndescs), 0);
        vring_packed_publish(&vr);
        notified[n] = vring_packed_should_notify(&vr);
        CHECK_EQ(drv_reap(&g), 1);
    }
    for (unsigned n = 0; n < 12; n++) /* buffer 3 used position 3, buffer 6 position 5 + 1 */
        CHECK_EQ(notified[n], n == 3 || n == 6);
    /* Several at once: crossing the event inside a batch notifies once. */
    CHECK(!vring_packed_should_notify(&vr)); /* nothing used since the last decision */
    g.drv_ev->flags = htole16(VRING_PACKED_EVENT_DISABLE);
    CHECK(!vring_packed_should_notify(&vr));
    g.drv_ev->flags = htole16(VRING_PACKED_EVENT_ENABLE);
    CHECK(vring_packed_should_notify(&vr));
    g.drv_ev->flags = htole16(3); /* reserved: notify rather than hang the driver */
    CHECK(vring_packed_should_notify(&vr));
    g.drv_ev->flags = htole16(VRING_PACKED_EVENT_DESC);
    g.drv_ev->off_wrap = htole16(size); /* an offset outside the ring */
    CHECK(vring_packed_should_notify(&vr));
    /* Without EVENT_IDX: DESC is not valid and is not DISABLE. */
    CHECK_EQ(dev_init(&vr, size, vring_packed_base(&vr), false, false, 4), 0);
    CHECK(vring_packed_should_notify(&vr));
    g.drv_ev->flags = htole16(VRING_PACKED_EVENT_DISABLE);
    CHECK(!vring_packed_should_notify(&vr));
}

/* Kicks through the Device Area, with the re-check after enabling. */
static void test_kicks(void)
{
    struct gdrv g;
    struct vring_packed vr;
    drv_init(&g, 3);
    for (int event_idx = 0; event_idx < 2; event_idx++) {
        CHECK_EQ(dev_init(&vr, 3, VRING_PACKED_BASE(2, 0, 2, 0), event_idx, false, 4), 0);
        g.avail = g.used = 2;
        g.avail_wrap = g.used_wrap = false;
        CHECK(!vring_packed_enable_kicks(&vr));
        CHECK_EQ(le16toh(g.dev_ev->flags), event_idx ? VRING_PACKED_EVENT_DESC : VRING_PACKED_EVENT_ENABLE);
        if (event_idx) /* kick when slot 2 of the wrap-0 lap is made available */
            CHECK_EQ(le16toh(g.dev_ev->off_wrap), 2);
        drv_shape(&g, 1, 2);
        CHECK(drv_add(&g, 1, false)); /* slots 2 and 0: the chain wraps */
        CHECK(vring_packed_enable_kicks(&vr));
        vring_packed_disable_kicks(&vr);
        CHECK_EQ(le16toh(g.dev_ev->flags), VRING_PACKED_EVENT_DISABLE);
        struct popped p;
        struct vring_chain c = {.iov = p.iov, .iov_max = 2 * MAXSEG, .scratch = scratch};
        CHECK_EQ(vring_packed_pop(&vr, mem, &c, &p.id, &p.ndescs), 0);
        CHECK_EQ(p.id, 1);
        CHECK_EQ(p.ndescs, 2);
        CHECK_EQ(vring_packed_base(&vr), VRING_PACKED_BASE(1, 1, 2, 0));
        CHECK_EQ(vring_packed_push(&vr, 1, 1, 2), 0);
        vring_packed_publish(&vr);
        CHECK_EQ(vring_packed_base(&vr), VRING_PACKED_BASE(1, 1, 1, 1));
        memset(&g.buf, 0, sizeof(g.buf));
        g.free_descs = 3;
        g.order_count = 0;
    }
}

static void test_init(void)
{
    struct vring_packed vr;
    void *ring = gpa_host(RING_GPA), *ev = gpa_host(DRV_EV_GPA);
    CHECK_EQ(vring_packed_init(&vr, 0, ring, ev, ev, VRING_PACKED_BASE_FRESH, 0, 0, 4), -EINVAL);
    CHECK_EQ(vring_packed_init(&vr, 8, (uint8_t *)ring + 8, ev, ev, VRING_PACKED_BASE_FRESH, 0, 0, 4), -EINVAL);
    CHECK_EQ(vring_packed_init(&vr, 8, ring, (uint8_t *)ev + 2, ev, VRING_PACKED_BASE_FRESH, 0, 0, 4), -EINVAL);
    CHECK_EQ(vring_packed_init(&vr, 8, ring, ev, (uint8_t *)ev + 2, VRING_PACKED_BASE_FRESH, 0, 0, 4), -EINVAL);
    CHECK_EQ(vring_packed_init(&vr, 8, ring, ev, ev, VRING_PACKED_BASE(8, 1, 0, 1), 0, 0, 4), -EINVAL);
    CHECK_EQ(vring_packed_init(&vr, 8, ring, ev, ev, VRING_PACKED_BASE(0, 1, 8, 1), 0, 0, 4), -EINVAL);
    /* avail a lap and one ahead of used: more than a ring in flight */
    CHECK_EQ(vring_packed_init(&vr, 8, ring, ev, ev, VRING_PACKED_BASE(1, 0, 0, 1), 0, 0, 4), -EINVAL);
    CHECK_EQ(vring_packed_init(&vr, 8, ring, ev, ev, VRING_PACKED_BASE(0, 0, 0, 1), 0, 0, 4), 0);
    CHECK_EQ(vr.inflight, 8);
    CHECK_EQ(vring_packed_init(&vr, 8, ring, ev, ev, VRING_PACKED_BASE(2, 0, 5, 1), 0, 0, 4), 0);
    CHECK_EQ(vr.inflight, 5);
    CHECK_EQ(vring_packed_base(&vr), VRING_PACKED_BASE(2, 0, 5, 1));
    CHECK_EQ(vring_packed_push(&vr, 9, 0, 6), -EINVAL);
    CHECK_EQ(vring_packed_push(&vr, 9, 0, 0), -EINVAL);
    CHECK_EQ(vring_packed_push(&vr, 9, 0, 5), 0);
    CHECK_EQ(vring_packed_base(&vr), VRING_PACKED_BASE(2, 0, 2, 0));
    CHECK_EQ(vring_packed_init(&vr, 32768, ring, ev, ev, VRING_PACKED_BASE(32767, 1, 32767, 1), 0, 0, 4), 0);
    CHECK_EQ(vring_packed_base(&vr), 0xffffffffu);
    CHECK_EQ(VRING_PACKED_BASE_FRESH, 0x80008000u);
}

/* ------------------------------------------------------------ hostile buffers */

struct hostile {
    struct gdrv g;
    struct vring_packed vr;
    struct iovec iov[16];
    struct vring_chain c;
    uint16_t id, ndescs;
};

static void h_init(struct hostile *h, uint16_t size, bool indirect, uint32_t max_chain, uint32_t iov_max)
{
    drv_init(&h->g, size);
    CHECK_EQ(dev_init(&h->vr, size, VRING_PACKED_BASE_FRESH, false, indirect, max_chain), 0);
    h->c = (struct vring_chain){.iov = h->iov, .iov_max = iov_max, .scratch = scratch};
}

/* Raw descriptors at the driver's position, the first flags last. */
static void h_put(struct hostile *h, const struct vring_packed_desc *d, unsigned n)
{
    uint16_t head = h->g.avail, first = 0;
    for (unsigned i = 0; i < n; i++) {
        uint16_t f = drv_put(&h->g, le64toh(d[i].addr), le32toh(d[i].len), le16toh(d[i].id),
                             le16toh(d[i].flags), i == 0);
        if (i == 0)
            first = f;
    }
    __atomic_store_n(&h->g.ring[head].flags, htole16(first), __ATOMIC_RELEASE);
}

static void h_table(uint64_t gpa, const struct vring_packed_desc *d, unsigned n)
{
    for (unsigned i = 0; i < n; i++)
        for (unsigned b = 0; b < 16; b++)
            *(uint8_t *)gpa_host(gpa + 16 * i + b) = ((const uint8_t *)&d[i])[b];
}

#define D(a, l, i, f) {htole64(a), htole32(l), htole16(i), htole16(f)}
#define HDR (DATA_GPA)
#define STATUS (DATA_GPA + 0x1000)

/* Pops expecting fault want; then pop_status expecting status_want (0: it
 * pops the buffer and points at STATUS's byte). */
static void h_expect(struct hostile *h, int want, int status_want)
{
    uint32_t avail_before = vring_packed_base(&h->vr);
    CHECK_EQ(vring_packed_pop(&h->vr, mem, &h->c, &h->id, &h->ndescs), want);
    CHECK_EQ(vring_packed_base(&h->vr), avail_before); /* nothing popped */
    uint8_t *status = NULL;
    CHECK_EQ(vring_packed_pop_status(&h->vr, mem, &h->c, &status, &h->id, &h->ndescs), status_want);
    if (status_want == 0)
        CHECK(status == gpa_host(STATUS));
    else
        CHECK_EQ(vring_packed_base(&h->vr), avail_before);
}

static void test_hostile(void)
{
    struct hostile h;
    const uint16_t N = VRING_DESC_F_NEXT, W = VRING_DESC_F_WRITE, I = VRING_DESC_F_INDIRECT;
    uint64_t table = TABLE_GPA;

    /* Nothing available. */
    h_init(&h, 4, true, 64, 16);
    CHECK_EQ(vring_packed_pop(&h.vr, mem, &h.c, &h.id, &h.ndescs), -EAGAIN);

    /* A chain longer than the ring: every descriptor has NEXT. */
    h_init(&h, 4, true, 64, 16);
    struct vring_packed_desc loop[4] = {D(HDR, 16, 0, N), D(HDR, 16, 0, N), D(HDR, 16, 0, N), D(STATUS, 1, 0, N | W)};
    h_put(&h, loop, 4);
    h_expect(&h, -ELOOP, -ELOOP);
    CHECK(h.c.desc_reads <= 2 * 5);

    /* A chain running into a descriptor not made available. */
    h_init(&h, 4, true, 64, 16);
    struct vring_packed_desc run[2] = {D(HDR, 16, 0, N), D(STATUS, 1, 7, N | W)};
    h_put(&h, run, 2);
    h_expect(&h, -EBADMSG, -EBADMSG);

    /* A ring of size 1: one descriptor, no chaining possible. */
    h_init(&h, 1, true, 64, 16);
    struct vring_packed_desc one[1] = {D(STATUS, 1, 42, W)};
    for (int lap = 0; lap < 3; lap++) {
        h_put(&h, one, 1);
        CHECK_EQ(vring_packed_pop(&h.vr, mem, &h.c, &h.id, &h.ndescs), 0);
        CHECK_EQ(h.id, 42);
        CHECK_EQ(h.ndescs, 1);
        CHECK_EQ(vring_packed_pop(&h.vr, mem, &h.c, &h.id, &h.ndescs), -EAGAIN);
        CHECK_EQ(vring_packed_push(&h.vr, 42, 1, 1), 0);
        vring_packed_publish(&h.vr);
        uint16_t f = le16toh(h.g.ring[0].flags); /* the driver's view, by hand */
        CHECK_EQ(!!(f & VRING_PACKED_DESC_F_USED), h.g.used_wrap);
        CHECK_EQ(!!(f & VRING_PACKED_DESC_F_AVAIL), h.g.used_wrap);
        CHECK_EQ(le16toh(h.g.ring[0].id), 42);
        h.g.used_wrap = !h.g.used_wrap;
    }
    struct vring_packed_desc one_next[1] = {D(STATUS, 1, 42, W | N)};
    h_put(&h, one_next, 1);
    h_expect(&h, -ELOOP, -ELOOP);

    /* The driver reuses a slot still in flight: size 2, both popped. */
    h_init(&h, 2, true, 64, 16);
    struct vring_packed_desc single[1] = {D(STATUS, 1, 1, W)};
    h_put(&h, single, 1);
    h_put(&h, single, 1);
    CHECK_EQ(vring_packed_pop(&h.vr, mem, &h.c, &h.id, &h.ndescs), 0);
    CHECK_EQ(vring_packed_pop(&h.vr, mem, &h.c, &h.id, &h.ndescs), 0);
    h_put(&h, single, 1);
    h_expect(&h, -ELOOP, -ELOOP);

    /* NEXT on the last entry of an indirect table. */
    h_init(&h, 4, true, 64, 16);
    struct vring_packed_desc t_next[2] = {D(HDR, 16, 0, 0), D(STATUS, 1, 0, W | N)};
    h_table(table, t_next, 2);
    struct vring_packed_desc ind[1] = {D(table, 32, 3, I)};
    h_put(&h, ind, 1);
    h_expect(&h, -EBADMSG, -EBADMSG);
    /* ... but NEXT on the others is DPDK's habit, and fine. */
    struct vring_packed_desc t_dpdk[2] = {D(HDR, 16, 0, N), D(STATUS, 1, 0, W)};
    h_table(table, t_dpdk, 2);
    h_init(&h, 4, true, 64, 16);
    h_put(&h, ind, 1);
    CHECK_EQ(vring_packed_pop(&h.vr, mem, &h.c, &h.id, &h.ndescs), 0);
    CHECK_EQ(h.id, 3);
    CHECK_EQ(h.ndescs, 1);
    CHECK(h.c.status == gpa_host(STATUS));

    /* An indirect descriptor with NEXT. */
    h_init(&h, 4, true, 64, 16);
    struct vring_packed_desc ind_next[2] = {D(table, 32, 3, I | N), D(STATUS, 1, 3, W)};
    h_put(&h, ind_next, 2);
    h_expect(&h, -EBADMSG, -EBADMSG);

    /* An indirect descriptor after the first in a list. */
    h_init(&h, 4, true, 64, 16);
    struct vring_packed_desc ind_second[2] = {D(HDR, 16, 0, N), D(table, 32, 3, I)};
    h_put(&h, ind_second, 2);
    h_expect(&h, -EBADMSG, -EBADMSG);

    /* A zero-length table, one not of whole descriptors, one too large. */
    struct vring_packed_desc bad_len[3][1] = {{D(table, 0, 3, I)}, {D(table, 24, 3, I)},
                                              {D(table, 16 * (VRING_INDIRECT_MAX + 1), 3, I)}};
    int bad_len_want[3] = {-EBADMSG, -EBADMSG, -E2BIG};
    for (int k = 0; k < 3; k++) {
        h_init(&h, 4, true, 64, 16);
        h_put(&h, bad_len[k], 1);
        h_expect(&h, bad_len_want[k], bad_len_want[k]);
    }

    /* Indirect not negotiated; nested; outside guest memory. */
    h_init(&h, 4, false, 64, 16);
    h_table(table, t_dpdk, 2);
    h_put(&h, ind, 1);
    h_expect(&h, -EBADMSG, -EBADMSG);
    struct vring_packed_desc nested[1] = {D(table + 0x80, 32, 0, I)};
    h_table(table, nested, 1);
    h_table(table + 0x80, t_dpdk, 2);
    h_init(&h, 4, true, 64, 16);
    struct vring_packed_desc ind1[1] = {D(table, 16, 3, I)};
    h_put(&h, ind1, 1);
    h_expect(&h, -EBADMSG, -EBADMSG);
    h_init(&h, 4, true, 64, 16);
    struct vring_packed_desc ind_out[1] = {D(0x40000000, 32, 3, I)};
    h_put(&h, ind_out, 1);
    h_expect(&h, -ENXIO, -ENXIO);

    /* A misaligned table (read from a copy) and one across the two regions. */
    uint64_t odd[2] = {table + 4, GPA1 - 16};
    for (int k = 0; k < 2; k++) {
        h_table(odd[k], t_dpdk, 2);
        h_init(&h, 4, true, 64, 16);
        struct vring_packed_desc ind_odd[1] = {D(odd[k], 32, 5, I)};
        h_put(&h, ind_odd, 1);
        CHECK_EQ(vring_packed_pop(&h.vr, mem, &h.c, &h.id, &h.ndescs), 0);
        CHECK_EQ(h.id, 5);
        CHECK_EQ(h.c.out_len, 16);
        CHECK(h.c.status == gpa_host(STATUS));
    }

    /* More buffer descriptors than max_chain, direct and indirect. */
    h_init(&h, 8, true, 2, 16);
    struct vring_packed_desc three[3] = {D(HDR, 16, 0, N), D(HDR, 16, 0, N), D(STATUS, 1, 0, W)};
    h_put(&h, three, 3);
    h_expect(&h, -E2BIG, -E2BIG);
    h_table(table, three, 3);
    h_init(&h, 8, true, 2, 16);
    struct vring_packed_desc ind3[1] = {D(table, 48, 0, I)};
    h_put(&h, ind3, 1);
    h_expect(&h, -E2BIG, -E2BIG);

    /* Buffer faults: pop_status still answers (and pops) them. */
    struct vring_packed_desc overflow[2] = {D(0xffffffffffffff00ull, 0x200, 0, N), D(STATUS, 1, 9, W)};
    struct vring_packed_desc outside[2] = {D(0x40000000, 0x200, 0, N), D(STATUS, 1, 9, W)};
    struct vring_packed_desc rw_order[3] = {D(STATUS + 8, 4, 0, N | W), D(HDR, 16, 0, N), D(STATUS, 1, 9, W)};
    struct vring_packed_desc *faulty[3] = {overflow, outside, rw_order};
    int faulty_want[3] = {-EFAULT, -EFAULT, -EPROTO};
    unsigned faulty_n[3] = {2, 2, 3};
    for (int k = 0; k < 3; k++) {
        h_init(&h, 5, true, 64, 16);
        h_put(&h, faulty[k], faulty_n[k]);
        h_expect(&h, faulty_want[k], 0);
        CHECK_EQ(h.id, 9);
        CHECK_EQ(h.ndescs, faulty_n[k]);
        CHECK_EQ(h.vr.inflight, faulty_n[k]);
    }
    /* More iovecs than iov_max: a buffer across the region boundary is two. */
    h_init(&h, 5, true, 64, 2);
    struct vring_packed_desc split2[2] = {D(GPA1 - 8, 16, 0, N), D(STATUS, 1, 9, W)};
    h_put(&h, split2, 2);
    h_expect(&h, -ENOBUFS, 0);
    /* No status byte: readable last, or empty. */
    struct vring_packed_desc nostatus[2][2] = {{D(0x40000000, 16, 0, N), D(STATUS, 1, 9, 0)},
                                               {D(0x40000000, 16, 0, N), D(STATUS, 0, 9, W)}};
    for (int k = 0; k < 2; k++) {
        h_init(&h, 5, true, 64, 16);
        h_put(&h, nostatus[k], 2);
        h_expect(&h, -EFAULT, -ENOMSG);
    }
}

int main(void)
{
    setup_memory();
    test_init();
    static const uint16_t sizes[] = {1, 2, 3, 5, 7, 8, 64, 255, 256};
    for (unsigned i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++)
        for (int f = 0; f < 4; f++)
            test_driver_roundtrip(sizes[i], f & 1, f & 2);
    test_notify();
    test_kicks();
    test_hostile();
    printf("vring_packed_selftest: ok (%u buffers round-tripped over %zu ring sizes; notify, kicks, "
           "base, hostile buffers)\n",
           total_buffers, sizeof(sizes) / sizeof(sizes[0]));
    dp_mem_destroy(mem);
    free(host0);
    free(host1);
    return 0;
}
