/*
 * Packed virtqueues end to end in one process: CGuestDriver's packed driver
 * (a guest written from the spec's driver side) against CDataPlane's packed
 * walker (the device side), so that each checks the other. Requests of 0-4
 * data segments, direct and indirect, completed out of order and in batches
 * of random size, over many wraps of rings of several sizes, with and
 * without EVENT_IDX; notifications both ways checked at each step where
 * the answer is certain. Exits non-zero on the first mismatch.
 *
 *   cc -std=c11 -D_GNU_SOURCE ... (scripts/test builds and runs it)
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "CGuestDriver.h"
#include "guest_mem.h"
#include "vring_packed.h"

#define CHECK(cond)                                                                         \
    do {                                                                                    \
        if (!(cond)) {                                                                      \
            fprintf(stderr, "packed_ring_test: %s:%d: check failed: %s (size %u, event_idx %d, " \
                    "round %u)\n", __FILE__, __LINE__, #cond, cur_size, cur_event_idx, cur_round); \
            exit(1);                                                                        \
        }                                                                                   \
    } while (0)

#define MAX_SEGS 4
#define SEG_LEN 512
#define IOV_MAX_TEST 64

static unsigned cur_size, cur_round;
static int cur_event_idx;
static uint64_t rng = 0x9e3779b97f4a7c15ull;

static uint32_t rnd(uint32_t n)
{
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return (uint32_t)((rng * 2685821657736338717ull) >> 33) % n;
}

/* What the device popped and has not completed yet. */
struct popped {
    uint16_t id, ndescs;
    uint32_t in_len;
    uint8_t *status;
};

/* What the driver submitted, by id: to check what comes back. */
struct sent {
    bool busy;
    uint32_t nsegs;
    bool indirect;
};

struct rig {
    struct gd_driver *d;
    struct dp_mem *mem;
    struct vring_packed vr;
    struct iovec iov[IOV_MAX_TEST];
    struct vring_desc scratch[VRING_INDIRECT_MAX];
    struct vring_chain chain;
    uint64_t seg_gpa; /* MAX_SEGS segments per id */
    struct sent *sent;
    struct popped *popped;
    uint32_t npopped;
    uint64_t slots_popped; /* ring descriptors the device went past */
};

static void rig_init(struct rig *r, uint32_t size, bool event_idx)
{
    struct gd_config gc = { .mem_size = 32ull << 20, .num_queues = 1, .queue_size = size,
                            .event_idx = event_idx, .packed = true };
    CHECK(gd_create(&gc, &r->d) == 0);
    struct dp_mem_region regions[2];
    uint32_t n = gd_mem_regions(r->d, regions);
    CHECK(dp_mem_create(regions, n, &r->mem) == 0);
    struct dp_queue_config qc;
    gd_queue_config(r->d, 0, &qc);
    void *desc, *drv, *dev;
    CHECK(dp_mem_translate_gpa(r->mem, qc.desc_addr, VRING_PACKED_DESC_BYTES(size), &desc) == 0);
    CHECK(dp_mem_translate_gpa(r->mem, qc.avail_addr, VRING_PACKED_EVENT_BYTES, &drv) == 0);
    CHECK(dp_mem_translate_gpa(r->mem, qc.used_addr, VRING_PACKED_EVENT_BYTES, &dev) == 0);
    CHECK(gd_vring_base(r->d, 0) == VRING_PACKED_BASE_FRESH);
    CHECK(vring_packed_init(&r->vr, (uint16_t)size, desc, drv, dev, gd_vring_base(r->d, 0), event_idx, true,
                            MAX_SEGS + 2) == 0);
    r->seg_gpa = gd_alloc(r->d, (uint64_t)size * MAX_SEGS * SEG_LEN, 4096);
    CHECK(r->seg_gpa != 0);
    r->sent = calloc(size, sizeof(*r->sent));
    r->popped = calloc(size, sizeof(*r->popped));
    CHECK(r->sent && r->popped);
}

static void rig_free(struct rig *r)
{
    free(r->sent);
    free(r->popped);
    dp_mem_destroy(r->mem);
    gd_destroy(r->d);
}

/* The driver adds requests until the ring is full or it chose to stop. */
static uint32_t driver_submit(struct rig *r, uint32_t want)
{
    uint32_t added = 0;
    for (; added < want; added++) {
        struct gd_seg segs[MAX_SEGS];
        uint32_t nsegs = rnd(MAX_SEGS + 1);
        if (nsegs + 2 > cur_size)
            nsegs = cur_size - 2;
        bool indirect = rnd(2) || nsegs + 2 > cur_size;
        struct gd_req req = { .type = GD_BLK_T_IN, .sector = 0, .segs = segs, .nsegs = nsegs, .indirect = indirect };
        /* The id is not known before: segments are placed per id after. */
        for (uint32_t i = 0; i < nsegs; i++)
            segs[i] = (struct gd_seg){ r->seg_gpa, SEG_LEN };
        uint16_t id;
        int rc = gd_request_add(r->d, 0, &req, &id);
        if (rc == -ENOSPC)
            break;
        CHECK(rc == 0);
        CHECK(id < cur_size && !r->sent[id].busy);
        r->sent[id] = (struct sent){ .busy = true, .nsegs = nsegs, .indirect = indirect };
    }
    gd_avail_publish(r->d, 0);
    return added;
}

static void device_pop_all(struct rig *r)
{
    while (vring_packed_has_avail(&r->vr)) {
        r->chain = (struct vring_chain){ .iov = r->iov, .iov_max = IOV_MAX_TEST, .scratch = r->scratch };
        uint16_t id, ndescs;
        int rc = vring_packed_pop(&r->vr, r->mem, &r->chain, &id, &ndescs);
        CHECK(rc == 0);
        CHECK(id < cur_size && r->sent[id].busy);
        const struct sent *s = &r->sent[id];
        CHECK(ndescs == (s->indirect ? 1 : s->nsegs + 2));
        CHECK(r->chain.out_num == 1 && r->chain.out_len == 16);
        CHECK(r->chain.in_len == (uint64_t)s->nsegs * SEG_LEN + 1);
        CHECK(r->chain.status && *r->chain.status == 0xFF);
        r->slots_popped += ndescs;
        r->popped[r->npopped++] = (struct popped){ id, ndescs, (uint32_t)r->chain.in_len, r->chain.status };
    }
    CHECK(vring_packed_pop(&r->vr, r->mem, &r->chain, &(uint16_t){ 0 }, &(uint16_t){ 0 }) == -EAGAIN);
}

/* Completes a random subset in random order, publishing in random batches. */
static uint32_t device_complete_some(struct rig *r)
{
    uint32_t done = r->npopped ? 1 + rnd(r->npopped) : 0;
    for (uint32_t k = 0; k < done; k++) {
        uint32_t i = rnd(r->npopped);
        struct popped p = r->popped[i];
        r->popped[i] = r->popped[--r->npopped];
        *p.status = (uint8_t)(p.id & 0x7f); /* a per-id value the driver checks */
        CHECK(vring_packed_push(&r->vr, p.id, p.in_len, p.ndescs) == 0);
        if (rnd(3) == 0)
            vring_packed_publish(&r->vr);
    }
    vring_packed_publish(&r->vr);
    return done;
}

static uint32_t driver_reap(struct rig *r)
{
    uint32_t reaped = 0;
    uint16_t id;
    uint32_t len;
    uint8_t status;
    int rc;
    while ((rc = gd_complete(r->d, 0, &id, &len, &status)) == 1) {
        CHECK(r->sent[id].busy);
        CHECK(len == r->sent[id].nsegs * SEG_LEN + 1);
        CHECK(status == (id & 0x7f));
        r->sent[id].busy = false;
        reaped++;
    }
    CHECK(rc == 0);
    return reaped;
}

/* Kicks: enabled, a publish of new buffers kicks; disabled, it does not. */
static void check_kicks(struct rig *r)
{
    bool arrived = vring_packed_enable_kicks(&r->vr);
    CHECK(!arrived); /* everything available was popped */
    if (driver_submit(r, 1) == 1) {
        CHECK(gd_kick_if_needed(r->d, 0) == 1);
        device_pop_all(r);
    }
    vring_packed_disable_kicks(&r->vr);
    if (driver_submit(r, 1) == 1) {
        CHECK(gd_kick_if_needed(r->d, 0) == 0);
        device_pop_all(r);
    }
}

/* Calls: enabled, a publish of used buffers notifies; disabled, it does not. */
static void check_calls(struct rig *r)
{
    if (r->npopped == 0)
        return;
    CHECK(gd_enable_calls(r->d, 0) == 0); /* nothing left unreaped */
    (void)vring_packed_should_notify(&r->vr); /* forget earlier pushes */
    device_complete_some(r);
    CHECK(vring_packed_should_notify(&r->vr));
    driver_reap(r);
    gd_disable_calls(r->d, 0);
    if (r->npopped == 0)
        return;
    device_complete_some(r);
    CHECK(!vring_packed_should_notify(&r->vr));
    driver_reap(r);
}

static void run(uint32_t size, bool event_idx, uint32_t rounds)
{
    cur_size = size;
    cur_event_idx = event_idx;
    struct rig r = { 0 };
    rig_init(&r, size, event_idx);
    uint64_t total = 0;
    for (cur_round = 0; cur_round < rounds; cur_round++) {
        driver_submit(&r, 1 + rnd(size));
        device_pop_all(&r);
        if (rnd(8) == 0)
            check_kicks(&r);
        if (rnd(8) == 0)
            check_calls(&r);
        device_complete_some(&r);
        total += driver_reap(&r);
    }
    while (r.npopped) {
        device_complete_some(&r);
        total += driver_reap(&r);
    }
    CHECK(gd_in_flight(r.d, 0) == 0);
    CHECK(r.vr.inflight == 0);
    /* Restart where both stand, as a reconnect does. */
    uint32_t base = vring_packed_base(&r.vr);
    CHECK(base == gd_vring_base(r.d, 0));
    printf("size %5u event_idx %d: %8llu requests, the ring wrapped %llu times, base 0x%08x\n", size, event_idx,
           (unsigned long long)total, (unsigned long long)(r.slots_popped / size), base);
    rig_free(&r);
}

int main(void)
{
    static const uint32_t sizes[] = { 4, 8, 64, 256 };
    for (unsigned i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++)
        for (int e = 0; e < 2; e++)
            run(sizes[i], e, 20000);
    printf("packed_ring_test: ok\n");
    return 0;
}
