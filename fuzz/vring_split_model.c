/*
 * The split ring's model for the vring_blk fuzz target (fuzz/vring_blk_fuzz.c
 * documents the input's common header): queue.c's pop/complete loop
 * re-enacted over vring_split.c.
 *
 *   header, after the common part
 *     size             queue size = 1 << (v % 6): 1..32
 *     gpa desc, gpa avail, gpa used    ring placement (case skipped when
 *                      dp_mem_translate_gpa or vring_split_init refuses it)
 *     u16 last_avail_idx
 *     u16 used_idx     the guest's used->idx before the device starts
 *   operations: enum fz_op below
 *
 *   desc  gpa addr, u32 len, u16 flags, u16 next
 *
 * Checks besides the common ones: the walk reads each descriptor once; a
 * head already in flight breaks the ring; the avail index is never more than
 * a ring ahead; the used ring holds what was pushed.
 */
#ifndef _GNU_SOURCE
#error "build with -D_GNU_SOURCE (fuzz/build.sh does)"
#endif

#include <endian.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>

#include "fuzz_common.h"
#include "vring_split.h"

#define FZ_MAX_QUEUE 32

enum fz_op {
    FZ_OP_DESC,        /* u8 index, desc: the guest rewrites a main-table descriptor */
    FZ_OP_TABLE,       /* gpa, u8 n (1 + v % 64), desc * n: descriptors anywhere (indirect tables) */
    FZ_OP_AVAIL,       /* u8 n (1 + v % 8), u16 head * n: the guest makes chains available */
    FZ_OP_AVAIL_IDX,   /* u16: the guest sets avail->idx to anything */
    FZ_OP_POKE,        /* gpa, u8 n (v % 65), bytes * n: any guest memory (headers, data) */
    FZ_OP_POP,         /* u8 max (1 + v % 32): one batch, as queue_pop_batch */
    FZ_OP_COMPLETE,    /* u8 sel: the backend finishes held request sel % held (bit 7: with EIO) */
    FZ_OP_PUBLISH,     /* publish pushed elements, then should_notify */
    FZ_OP_NOTIFY,      /* should_notify alone */
    FZ_OP_KICKS,       /* u8: even enables kicks, odd disables them */
    FZ_OP_USED_EVENT,  /* u16: the guest's used_event (EVENT_IDX) */
    FZ_OP_AVAIL_FLAGS, /* u16: the guest's avail->flags (NO_INTERRUPT) */
    FZ_OP_COUNT
};

/* ------------------------------------------------------------ the model */

struct fz_slot {
    struct blk_req req;
    struct iovec *iov; /* iov_max entries, malloc'ed to exactly that */
};

struct fz {
    struct fz_mem m; /* guest memory, the disk, the walker's limits */
    struct vring_split vr;
    uint16_t size;
    struct fz_slot slots[FZ_MAX_QUEUE];
    uint16_t free_slots[FZ_MAX_QUEUE];
    unsigned free_count;
    uint16_t held[FZ_MAX_QUEUE]; /* slots whose request waits for the backend */
    unsigned held_count;
    uint8_t head_slot[FZ_MAX_QUEUE]; /* slot + 1 while the head is in flight, else 0 */
    uint16_t pushed;                 /* used elements pushed since init */
    uint16_t used_idx_start;
    bool broken;
};

static struct vring_desc fz_desc(struct fz *f, struct fz_input *in)
{
    struct vring_desc d;
    d.addr = htole64(fz_gpa(&f->m, in));
    d.len = htole32(fz_u32(in));
    d.flags = htole16(fz_u16(in));
    d.next = htole16(fz_u16(in));
    return d;
}

/* ------------------------------------------------------------ setup */

/* Ring placement as vring_init does it (vring.c: split_map), then vring_split_init. */
static bool fz_setup_rings(struct fz *f, struct fz_input *in, bool event_idx, bool indirect)
{
    uint64_t desc_gpa = fz_gpa(&f->m, in);
    uint64_t avail_gpa = fz_gpa(&f->m, in);
    uint64_t used_gpa = fz_gpa(&f->m, in);
    uint16_t last_avail = fz_u16(in);
    uint16_t used_idx = fz_u16(in);
    void *desc, *avail, *used;
    if (dp_mem_translate_gpa(f->m.mem, desc_gpa, VRING_DESC_BYTES(f->size), &desc) ||
        dp_mem_translate_gpa(f->m.mem, avail_gpa, VRING_AVAIL_BYTES(f->size), &avail) ||
        dp_mem_translate_gpa(f->m.mem, used_gpa, VRING_USED_BYTES(f->size), &used))
        return false;
    FZ_CHECK(fz_host_region(&f->m, desc, VRING_DESC_BYTES(f->size)));
    FZ_CHECK(fz_host_region(&f->m, avail, VRING_AVAIL_BYTES(f->size)));
    FZ_CHECK(fz_host_region(&f->m, used, VRING_USED_BYTES(f->size)));
    if ((uintptr_t)used & 3)
        return false; /* vring_split_init refuses it; don't store through it first */
    ((struct vring_used *)used)->idx = htole16(used_idx);
    if (vring_split_init(&f->vr, f->size, desc, avail, used, last_avail, event_idx, indirect, f->m.max_chain))
        return false;
    FZ_CHECK(f->vr.used_idx == used_idx);
    f->used_idx_start = used_idx;
    return true;
}

static bool fz_setup_slots(struct fz *f)
{
    for (unsigned i = 0; i < f->size; i++) {
        f->slots[i].iov = malloc(f->m.iov_max * sizeof(struct iovec));
        if (!f->slots[i].iov)
            return false;
        f->free_slots[i] = (uint16_t)(f->size - 1 - i);
    }
    f->free_count = f->size;
    return true;
}

static void fz_teardown(struct fz *f)
{
    for (unsigned i = 0; i < FZ_MAX_QUEUE; i++)
        free(f->slots[i].iov);
    fz_teardown_mem(&f->m);
}

/* ------------------------------------------------------------ checks */

/* The walker's output (fz_check_chain in fuzz_common.c), and its work bounded:
 * the chain's descriptors, plus the one that points at an indirect table,
 * each read once. */
static void fz_check_walk(const struct fz *f, int ret, const struct vring_chain *c)
{
    fz_check_chain(&f->m, ret, c);
    FZ_CHECK(c->desc_reads >= 1 && c->desc_reads <= f->m.max_chain + f->size + 1);
}

/* ------------------------------------------------------------ the device */

static void fz_complete(struct fz *f, uint16_t slot, uint8_t status)
{
    struct blk_req *req = &f->slots[slot].req;
    /* Never a chain without its status written: the guest would read a stale
     * byte (0 is OK) as the answer. */
    FZ_CHECK(req->status && fz_host_region(&f->m, req->status, 1));
    __atomic_store_n(req->status, status, __ATOMIC_RELAXED);
    uint32_t used_len = (status == VIRTIO_BLK_S_OK ? req->data_in_len : 0) + 1;
    vring_split_push(&f->vr, req->head, used_len);
    f->pushed++;
    FZ_CHECK(f->vr.used_idx == (uint16_t)(f->used_idx_start + f->pushed));
    const struct vring_used_elem *e = &f->vr.used->ring[(uint16_t)(f->vr.used_idx - 1) & (f->size - 1)];
    FZ_CHECK(le32toh(e->id) == req->head && le32toh(e->len) == used_len);
    FZ_CHECK(f->head_slot[req->head] == slot + 1);
    f->head_slot[req->head] = 0;
    f->free_slots[f->free_count++] = slot;
}

/* queue_start: walk the chain, parse it, complete at once or hold it for the backend. */
static void fz_start(struct fz *f, uint16_t head)
{
    if (f->head_slot[head]) { /* the same head twice in flight: the guest broke the ring */
        FZ_TRACE("head %u: already in flight, ring broken\n", head);
        f->broken = true;
        return;
    }
    FZ_CHECK(f->free_count > 0);
    uint16_t slot = f->free_slots[--f->free_count];
    struct blk_req *req = &f->slots[slot].req;
    f->head_slot[head] = (uint8_t)(slot + 1);
    memset(req, 0, sizeof(*req));
    req->head = head;

    struct vring_chain chain = {.iov = f->slots[slot].iov, .iov_max = f->m.iov_max, .scratch = f->m.indirect_scratch};
    int ret = vring_split_walk(&f->vr, f->m.mem, head, &chain);
    FZ_TRACE("head %u: walk %d out %u/%llu in %u/%llu reads %u%s\n", head, ret, chain.out_num,
             (unsigned long long)chain.out_len, chain.in_num, (unsigned long long)chain.in_len,
             chain.desc_reads, chain.status ? " status" : "");
    fz_check_walk(f, ret, &chain);
    uint8_t *status_byte = ret == 0 ? chain.status : NULL;
    if (ret < 0) {
        uint32_t reads = chain.desc_reads;
        int found = vring_split_status(&f->vr, f->m.mem, head, &chain, &status_byte);
        FZ_TRACE("head %u: status search %d\n", head, found);
        FZ_CHECK(chain.desc_reads > reads && chain.desc_reads - reads <= f->m.max_chain + f->size + 1);
        if (found < 0)
            status_byte = NULL;
        else
            FZ_CHECK(status_byte && fz_host_region(&f->m, status_byte, 1));
    }
    if (!status_byte) { /* cannot be answered: queue_reject_chain breaks the ring */
        FZ_TRACE("head %u: no status byte, ring broken\n", head);
        f->head_slot[head] = 0;
        f->free_slots[f->free_count++] = slot;
        f->broken = true;
        return;
    }
    if (ret < 0) {
        req->status = status_byte;
        req->op = DP_OP_OTHER;
        fz_complete(f, slot, VIRTIO_BLK_S_IOERR);
        return;
    }
    memcpy(f->m.scratch, chain.iov, (chain.out_num + chain.in_num) * sizeof(struct iovec));

    enum dp_err err = DP_ERR_COUNT + 1; /* blk_parse must set it */
    int status = blk_parse(&f->m.disk, &chain, req, &err);
    FZ_TRACE("head %u: blk op %u status %#x err %d len %llu offset %llu\n", head, req->op, status,
             (int)err, (unsigned long long)req->len, (unsigned long long)req->offset);
    fz_check_parse(&f->m, &chain, req, status, err);
    if (status == BLK_NEEDS_IO) {
        f->held[f->held_count++] = slot;
        return;
    }
    fz_complete(f, slot, (uint8_t)status);
}

/* queue_pop_batch, without resubmission. */
static void fz_pop_batch(struct fz *f, unsigned max)
{
    if (f->broken || !f->free_count)
        return;
    uint16_t guest_idx = le16toh(f->vr.avail->idx);
    uint16_t last = f->vr.last_avail_idx;
    int avail = vring_split_avail_count(&f->vr);
    if (avail < 0) {
        FZ_TRACE("avail idx %u last %u: %d, ring broken\n", guest_idx, last, avail);
        FZ_CHECK(avail == -ERANGE && (uint16_t)(guest_idx - last) > f->size);
        f->broken = true;
        return;
    }
    FZ_CHECK((uint16_t)(guest_idx - last) == avail && avail <= f->size);
    unsigned n = (unsigned)avail;
    if (n > f->free_count)
        n = f->free_count;
    if (n > max)
        n = max;
    for (unsigned i = 0; i < n && !f->broken; i++) {
        uint16_t head = 0xffff;
        int ret = vring_split_pop_head(&f->vr, &head);
        if (ret) {
            FZ_TRACE("pop_head %d, ring broken\n", ret);
            FZ_CHECK(ret == -EINVAL && f->vr.last_avail_idx == (uint16_t)(last + i));
            f->broken = true;
            return;
        }
        FZ_CHECK(head < f->size && f->vr.last_avail_idx == (uint16_t)(last + i + 1));
        fz_start(f, head);
    }
}

static void fz_complete_held(struct fz *f, unsigned which, bool fail)
{
    uint16_t slot = f->held[which];
    f->held[which] = f->held[--f->held_count];
    uint8_t status = fz_backend_run(&f->slots[slot].req, fail);
    fz_complete(f, slot, status);
}

static void fz_publish(struct fz *f)
{
    vring_split_publish(&f->vr);
    FZ_CHECK(le16toh(f->vr.used->idx) == f->vr.used_idx);
    (void)vring_split_should_notify(&f->vr);
}

static void fz_run_op(struct fz *f, struct fz_input *in)
{
    uint16_t mask = f->size - 1;
    switch (fz_u8(in) % FZ_OP_COUNT) {
    case FZ_OP_DESC: {
        uint16_t i = fz_u8(in) & mask;
        struct vring_desc d = fz_desc(f, in);
        memcpy(&f->vr.desc[i], &d, sizeof(d));
        break;
    }
    case FZ_OP_TABLE: {
        uint64_t gpa = fz_gpa(&f->m, in);
        unsigned n = 1 + fz_u8(in) % FZ_MAX_TABLE;
        for (unsigned i = 0; i < n; i++) {
            struct vring_desc d = fz_desc(f, in);
            fz_guest_write(&f->m, gpa + 16 * (uint64_t)i, &d, sizeof(d));
        }
        break;
    }
    case FZ_OP_AVAIL: {
        unsigned n = 1 + fz_u8(in) % 8;
        uint16_t idx = le16toh(f->vr.avail->idx);
        for (unsigned i = 0; i < n; i++)
            f->vr.avail->ring[(uint16_t)(idx + i) & mask] = htole16(fz_u16(in));
        __atomic_store_n(&f->vr.avail->idx, htole16((uint16_t)(idx + n)), __ATOMIC_RELEASE);
        break;
    }
    case FZ_OP_AVAIL_IDX:
        f->vr.avail->idx = htole16(fz_u16(in));
        break;
    case FZ_OP_POKE: {
        uint64_t gpa = fz_gpa(&f->m, in);
        uint8_t buf[FZ_MAX_POKE];
        unsigned n = fz_u8(in) % (FZ_MAX_POKE + 1);
        fz_take(in, buf, n);
        fz_guest_write(&f->m, gpa, buf, n);
        break;
    }
    case FZ_OP_POP:
        fz_pop_batch(f, 1 + fz_u8(in) % FZ_MAX_QUEUE);
        break;
    case FZ_OP_COMPLETE: {
        uint8_t sel = fz_u8(in);
        if (f->held_count)
            fz_complete_held(f, (sel & 0x7f) % f->held_count, sel & 0x80);
        break;
    }
    case FZ_OP_PUBLISH:
        fz_publish(f);
        break;
    case FZ_OP_NOTIFY:
        (void)vring_split_should_notify(&f->vr);
        break;
    case FZ_OP_KICKS:
        if (fz_u8(in) & 1) {
            vring_split_disable_kicks(&f->vr);
        } else {
            bool more = vring_split_enable_kicks(&f->vr);
            FZ_CHECK(more == (le16toh(f->vr.avail->idx) != f->vr.last_avail_idx));
        }
        break;
    case FZ_OP_USED_EVENT:
        f->vr.avail->ring[f->size] = htole16(fz_u16(in));
        break;
    case FZ_OP_AVAIL_FLAGS:
        f->vr.avail->flags = htole16(fz_u16(in));
        break;
    }
}

void fz_split_run(struct fz_input *in, uint8_t features)
{
    static struct fz f; /* large (scratch iovecs); reset on every run */
    memset(&f, 0, sizeof(f));

    f.size = (uint16_t)(1u << (fz_u8(in) % 6));
    if (!fz_setup(&f.m, in, features))
        goto out;
    if (!fz_setup_rings(&f, in, features & FZ_F_EVENT_IDX, features & FZ_F_INDIRECT)) {
        FZ_TRACE("skipped: rings outside memory or misaligned\n");
        goto out;
    }
    if (!fz_setup_slots(&f))
        goto out;

    for (unsigned ops = 0; ops < FZ_MAX_OPS && !in->eof && in->left; ops++)
        fz_run_op(&f, in);

    /* Drain: the backend finishes everything, the guest sees it. */
    while (f.held_count)
        fz_complete_held(&f, 0, false);
    fz_publish(&f);
    FZ_CHECK(f.free_count == f.size);
    FZ_TRACE("done: popped to %u, used idx %u%s\n", f.vr.last_avail_idx, f.vr.used_idx,
             f.broken ? ", ring broken" : "");
out:
    fz_teardown(&f);
}
