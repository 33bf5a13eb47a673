/*
 * The packed ring's model for the vring_blk fuzz target (fuzz/vring_blk_fuzz.c
 * documents the input's common header; features bit 6 selects this model):
 * a device loop re-enacted over vring_packed.c (pop, pop_status after a
 * fault, completion in any order, batches published, notifications, kicks).
 *
 *   header, after the common part
 *     size             queue size = 1 + v % FZ_MAX_QUEUE (any value, 1..64)
 *     gpa desc, gpa driver area, gpa device area   (case skipped when
 *                      dp_mem_translate_gpa or vring_packed_init refuses it)
 *     u16 avail        next avail index v % size, bit 15 its wrap counter
 *     u16 used         next used index v % size, bit 15 its wrap counter
 *   operations: enum fz_op below
 *
 *   desc  gpa addr, u32 len, u16 id, u16 flags (raw)
 *   elem  gpa addr, u32 len, u16 id, u8 f: f bit0 WRITE, bit1 INDIRECT,
 *         bit2 flips NEXT from what a well-formed list has, bit3 flips the
 *         AVAIL bit, bit4 flips the USED bit
 *
 * Checks besides the common ones: a fault pops nothing; the avail position
 * moves by the ring descriptors popped and the in-flight count follows pops
 * and pushes; every used descriptor is written at the model's used position
 * with the pushed id and len, its flags (AVAIL = USED = the wrap counter)
 * written at push for all but a batch's first and at publish for the first;
 * should_notify agrees with a model of 2.8.10 counted in 64-bit positions;
 * enable_kicks agrees with the ring and writes the Device Area; the
 * vhost-user base agrees with the model.
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
#include "vring_packed.h"

#define FZ_MAX_QUEUE 64
#define FZ_MAX_ADD 8    /* elements one OP_ADD writes */

enum fz_op {
    FZ_OP_DESC,         /* u16 index % size, desc: the guest rewrites a ring descriptor */
    FZ_OP_TABLE,        /* gpa, u8 n (1 + v % 64), desc * n: descriptors anywhere (indirect tables) */
    FZ_OP_ADD,          /* u8 n (1 + v % 8), elem * n: the driver makes a list available */
    FZ_OP_DRIVER_POS,   /* u16: the driver's next avail index (v % size) and wrap (bit 15) */
    FZ_OP_POKE,         /* gpa, u8 n (v % 65), bytes * n: any guest memory (headers, data) */
    FZ_OP_POP,          /* u8 max (1 + v % 64): pop up to max buffers */
    FZ_OP_COMPLETE,     /* u8 sel: the backend finishes held request sel % held (bit 7: with EIO) */
    FZ_OP_PUBLISH,      /* publish the batch, then should_notify */
    FZ_OP_NOTIFY,       /* should_notify alone */
    FZ_OP_KICKS,        /* u8: even enables kicks, odd disables them */
    FZ_OP_DRIVER_EVENT, /* u16 off_wrap, u16 flags: the guest's Driver Area */
    FZ_OP_REWALK,       /* u8 sel, u8 k, desc: held request sel % held walked again from its saved
                           ring descriptors (as after a restart from the inflight region);
                           k bit 7: copy k % ndescs replaced by desc first */
    FZ_OP_COUNT
};

/* ------------------------------------------------------------ the model */

struct fz_slot {
    struct blk_req req;
    struct iovec *iov; /* iov_max entries, malloc'ed to exactly that */
    uint16_t id;
    uint16_t ndescs;
    /* The ring descriptors as the pop read them (chain.ring_copy), what the
     * walk found, and the guest writes done by then: a walk again from the
     * copies must find the same while the guest has written nothing. */
    struct vring_packed_desc *copy; /* min(max_chain, size + 1) entries, malloc'ed to exactly that */
    uint64_t out_len, in_len;
    uint32_t niov;
    uint64_t guest_writes;
    bool copy_rewritten;
};

struct fz {
    struct fz_mem m; /* guest memory, the disk, the walker's limits */
    struct vring_packed vr;
    uint16_t size;
    bool event_idx;
    struct fz_slot slots[FZ_MAX_QUEUE];
    uint16_t free_slots[FZ_MAX_QUEUE];
    unsigned free_count;
    uint16_t held[FZ_MAX_QUEUE]; /* slots whose request waits for the backend */
    unsigned held_count;
    bool broken;
    /* The driver's next avail index and wrap counter (OP_ADD writes there). */
    uint16_t drv_idx;
    bool drv_wrap;
    /* The model of the device's side, in positions counted from 0 at init. */
    uint64_t avail_pos, used_pos; /* + the init positions below */
    uint32_t avail_pos0, used_pos0;
    uint32_t inflight;
    uint64_t signalled; /* used_pos when should_notify last decided */
    bool signalled_valid;
    uint32_t batch_count;
    uint16_t batch_idx, batch_flags;
    uint64_t guest_writes; /* OP_TABLE, OP_POKE, OP_DESC, OP_ADD so far */
    struct iovec rewalk_iov[DP_REQ_MAX_IOV];
};

static struct vring_packed_desc fz_desc(struct fz *f, struct fz_input *in)
{
    struct vring_packed_desc d;
    d.addr = htole64(fz_gpa(&f->m, in));
    d.len = htole32(fz_u32(in));
    d.id = htole16(fz_u16(in));
    d.flags = htole16(fz_u16(in));
    return d;
}

/* A position of the model (64-bit, from init) as index and wrap counter. */
static uint16_t fz_idx(const struct fz *f, uint32_t pos0, uint64_t pos)
{
    return (uint16_t)((pos0 + pos) % f->size);
}

static bool fz_wrap(const struct fz *f, uint32_t pos0, uint64_t pos)
{
    return ((pos0 + pos) / f->size) % 2 == 0; /* the first lap has wrap 1 */
}

static uint32_t fz_base(const struct fz *f)
{
    return VRING_PACKED_BASE(fz_idx(f, f->avail_pos0, f->avail_pos), fz_wrap(f, f->avail_pos0, f->avail_pos),
                             fz_idx(f, f->used_pos0, f->used_pos), fz_wrap(f, f->used_pos0, f->used_pos));
}

static uint16_t fz_desc_flags(const struct fz *f, uint16_t idx)
{
    return le16toh(__atomic_load_n(&f->vr.desc[idx].flags, __ATOMIC_RELAXED));
}

/* ------------------------------------------------------------ setup */

/* Area placement as a queue would map them, then vring_packed_init. */
static bool fz_setup_rings(struct fz *f, struct fz_input *in, bool event_idx, bool indirect)
{
    uint64_t desc_gpa = fz_gpa(&f->m, in);
    uint64_t driver_gpa = fz_gpa(&f->m, in);
    uint64_t device_gpa = fz_gpa(&f->m, in);
    uint16_t avail = fz_u16(in), used = fz_u16(in);
    void *desc, *driver, *device;
    if (dp_mem_translate_gpa(f->m.mem, desc_gpa, VRING_PACKED_DESC_BYTES(f->size), &desc) ||
        dp_mem_translate_gpa(f->m.mem, driver_gpa, VRING_PACKED_EVENT_BYTES, &driver) ||
        dp_mem_translate_gpa(f->m.mem, device_gpa, VRING_PACKED_EVENT_BYTES, &device))
        return false;
    FZ_CHECK(fz_host_region(&f->m, desc, VRING_PACKED_DESC_BYTES(f->size)));
    FZ_CHECK(fz_host_region(&f->m, driver, 4) && fz_host_region(&f->m, device, 4));
    uint16_t ai = (avail & 0x7fff) % f->size, ui = (used & 0x7fff) % f->size;
    bool aw = avail >> 15, uw = used >> 15;
    uint32_t base = VRING_PACKED_BASE(ai, aw, ui, uw);
    f->event_idx = event_idx;
    if (vring_packed_init(&f->vr, f->size, desc, driver, device, base, event_idx, indirect, f->m.max_chain))
        return false;
    FZ_CHECK(vring_packed_base(&f->vr) == base);
    f->avail_pos0 = ai + (aw ? 0 : f->size);
    f->used_pos0 = ui + (uw ? 0 : f->size);
    f->inflight = f->vr.inflight; /* a previous life's buffers: never pushed here */
    FZ_CHECK(f->inflight == (f->avail_pos0 + 2u * f->size - f->used_pos0) % (2u * f->size));
    f->drv_idx = ai;
    f->drv_wrap = aw;
    return true;
}

static bool fz_setup_slots(struct fz *f)
{
    /* What the queue promises the walker (max_chain entries), and no more
     * than a walk can fill (it stops one past the ring). */
    uint32_t copies = f->m.max_chain < f->size + 1u ? f->m.max_chain : f->size + 1u;
    for (unsigned i = 0; i < f->size; i++) {
        f->slots[i].iov = malloc(f->m.iov_max * sizeof(struct iovec));
        f->slots[i].copy = malloc(copies * sizeof(struct vring_packed_desc));
        if (!f->slots[i].iov || !f->slots[i].copy)
            return false;
        f->free_slots[i] = (uint16_t)(f->size - 1 - i);
    }
    f->free_count = f->size;
    return true;
}

static void fz_teardown(struct fz *f)
{
    for (unsigned i = 0; i < FZ_MAX_QUEUE; i++) {
        free(f->slots[i].iov);
        free(f->slots[i].copy);
    }
    fz_teardown_mem(&f->m);
}

/* ------------------------------------------------------------ checks */

/* The walker's output (fz_check_chain in fuzz_common.c), and its work
 * bounded: at most the ring's descriptors, or one ring descriptor and a
 * table's entries up to one past the chain limit; none read only when a
 * ring's worth is in flight already. */
static void fz_check_walk(const struct fz *f, int ret, const struct vring_chain *c)
{
    fz_check_chain(&f->m, ret, c);
    FZ_CHECK(c->desc_reads <= f->size + f->m.max_chain + 1);
    FZ_CHECK(c->desc_reads >= 1 || (ret == -ELOOP && f->vr.inflight == f->size));
}

/* ------------------------------------------------------------ the device */

/* Pushes a used element and checks what it wrote against the model. */
static void fz_push(struct fz *f, uint16_t id, uint32_t len, uint16_t ndescs)
{
    uint16_t idx = fz_idx(f, f->used_pos0, f->used_pos);
    bool wrap = fz_wrap(f, f->used_pos0, f->used_pos);
    uint16_t flags_before = fz_desc_flags(f, idx);
    FZ_CHECK(f->vr.used_idx == idx && f->vr.used_wrap == wrap);
    FZ_CHECK(vring_packed_push(&f->vr, id, len, ndescs) == 0);
    const struct vring_packed_desc *d = &f->vr.desc[idx];
    FZ_CHECK(le16toh(d->id) == id && le32toh(d->len) == len);
    uint16_t flags = (wrap ? VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED : 0) |
                     (len ? VRING_DESC_F_WRITE : 0);
    if (f->batch_count++ == 0) { /* the batch's first: flags held back */
        FZ_CHECK(fz_desc_flags(f, idx) == flags_before);
        f->batch_idx = idx;
        f->batch_flags = flags;
    } else {
        FZ_CHECK(fz_desc_flags(f, idx) == flags);
    }
    f->used_pos += ndescs;
    FZ_CHECK(f->inflight >= ndescs);
    f->inflight -= ndescs;
    FZ_CHECK(f->vr.inflight == f->inflight);
    FZ_CHECK(vring_packed_base(&f->vr) == fz_base(f));
}

static void fz_complete(struct fz *f, uint16_t slot, uint8_t status)
{
    struct fz_slot *s = &f->slots[slot];
    /* Never a buffer without its status written: the guest would read a
     * stale byte (0 is OK) as the answer. */
    FZ_CHECK(s->req.status && fz_host_region(&f->m, s->req.status, 1));
    __atomic_store_n(s->req.status, status, __ATOMIC_RELAXED);
    uint32_t used_len = (status == VIRTIO_BLK_S_OK ? s->req.data_in_len : 0) + 1;
    f->guest_writes++; /* the status byte and read data may overlap another buffer's table */
    fz_push(f, s->id, used_len, s->ndescs);
    f->free_slots[f->free_count++] = slot;
}

/* A fault: pop_status answers the buffer with IOERR, or the ring breaks. */
static void fz_fault(struct fz *f, uint16_t slot, struct vring_chain *chain)
{
    struct fz_slot *s = &f->slots[slot];
    uint32_t reads = chain->desc_reads, base = vring_packed_base(&f->vr);
    uint8_t *status = NULL;
    int found = vring_packed_pop_status(&f->vr, f->m.mem, chain, &status, &s->id, &s->ndescs);
    FZ_TRACE("  status search %d\n", found);
    FZ_CHECK(chain->desc_reads - reads <= f->size + f->m.max_chain + 1);
    FZ_CHECK(chain->desc_reads > reads || (found == -ELOOP && f->vr.inflight == f->size));
    if (found < 0) { /* cannot be answered: the queue breaks the ring */
        FZ_CHECK(found != -EAGAIN && vring_packed_base(&f->vr) == base);
        f->free_slots[f->free_count++] = slot;
        f->broken = true;
        return;
    }
    FZ_CHECK(found == 0 && status && fz_host_region(&f->m, status, 1));
    FZ_CHECK(s->ndescs >= 1 && s->ndescs <= f->size);
    f->avail_pos += s->ndescs;
    f->inflight += s->ndescs;
    FZ_CHECK(vring_packed_base(&f->vr) == fz_base(f) && f->vr.inflight == f->inflight);
    s->req.status = status;
    s->req.op = DP_OP_OTHER;
    fz_complete(f, slot, VIRTIO_BLK_S_IOERR);
}

/* Pops one buffer, parses it, completes it at once or holds it for the
 * backend. Returns false when there was nothing to pop. */
static bool fz_start(struct fz *f)
{
    FZ_CHECK(f->free_count > 0);
    uint16_t slot = f->free_slots[--f->free_count];
    struct fz_slot *s = &f->slots[slot];
    memset(&s->req, 0, sizeof(s->req));
    struct vring_chain chain = {.iov = s->iov, .iov_max = f->m.iov_max, .scratch = f->m.indirect_scratch,
                                .ring_copy = s->copy};
    uint32_t base = vring_packed_base(&f->vr);
    int ret = vring_packed_pop(&f->vr, f->m.mem, &chain, &s->id, &s->ndescs);
    if (ret == -EAGAIN) {
        FZ_CHECK(!vring_packed_has_avail(&f->vr) && vring_packed_base(&f->vr) == base);
        f->free_slots[f->free_count++] = slot;
        return false;
    }
    FZ_TRACE("pop %d: id %u ndescs %u out %u/%llu in %u/%llu reads %u%s\n", ret, s->id, s->ndescs,
             chain.out_num, (unsigned long long)chain.out_len, chain.in_num,
             (unsigned long long)chain.in_len, chain.desc_reads, chain.status ? " status" : "");
    fz_check_walk(f, ret, &chain);
    if (ret < 0) {
        FZ_CHECK(vring_packed_base(&f->vr) == base); /* a fault pops nothing */
        fz_fault(f, slot, &chain);
        return true;
    }
    FZ_CHECK(s->ndescs >= 1 && s->ndescs <= f->size);
    f->avail_pos += s->ndescs;
    f->inflight += s->ndescs;
    FZ_CHECK(vring_packed_base(&f->vr) == fz_base(f) && f->vr.inflight == f->inflight);
    if (!chain.status) { /* no status byte: as queue_reject_chain, the ring breaks */
        FZ_TRACE("  no status byte, ring broken\n");
        f->free_slots[f->free_count++] = slot;
        f->broken = true;
        return true;
    }
    s->req.head = s->id;
    s->out_len = chain.out_len;
    s->in_len = chain.in_len;
    s->niov = chain.out_num + chain.in_num;
    s->guest_writes = f->guest_writes;
    s->copy_rewritten = false;
    memcpy(f->m.scratch, chain.iov, (chain.out_num + chain.in_num) * sizeof(struct iovec));
    enum dp_err err = DP_ERR_COUNT + 1; /* blk_parse must set it */
    int status = blk_parse(&f->m.disk, &chain, &s->req, &err);
    FZ_TRACE("  blk op %u status %#x err %d len %llu offset %llu\n", s->req.op, status, (int)err,
             (unsigned long long)s->req.len, (unsigned long long)s->req.offset);
    fz_check_parse(&f->m, &chain, &s->req, status, err);
    if (status == BLK_NEEDS_IO)
        f->held[f->held_count++] = slot;
    else
        fz_complete(f, slot, (uint8_t)status);
    return true;
}

static void fz_pop_batch(struct fz *f, unsigned max)
{
    for (unsigned i = 0; i < max && !f->broken && f->free_count; i++)
        if (!fz_start(f))
            break;
}

static void fz_complete_held(struct fz *f, unsigned which, bool fail)
{
    uint16_t slot = f->held[which];
    f->held[which] = f->held[--f->held_count];
    uint8_t status = fz_backend_run(&f->slots[slot].req, fail);
    fz_complete(f, slot, status);
}

/* 2.8.10, counted in 64-bit positions: did the used positions since the
 * last decision cross the driver's event descriptor? */
static bool fz_model_notify(struct fz *f)
{
    uint16_t mode = le16toh(f->vr.driver->flags) & 3, off_wrap = le16toh(f->vr.driver->off_wrap);
    if (!f->event_idx)
        return mode != VRING_PACKED_EVENT_DISABLE;
    uint64_t old = f->signalled, new = f->used_pos;
    bool valid = f->signalled_valid;
    f->signalled = new;
    f->signalled_valid = true;
    if (mode == VRING_PACKED_EVENT_DISABLE)
        return false;
    if (mode != VRING_PACKED_EVENT_DESC || !valid)
        return true;
    uint16_t off = off_wrap & 0x7fff;
    if (off >= f->size)
        return true;
    for (uint64_t p = old; p < new; p++)
        if (fz_idx(f, f->used_pos0, p) == off &&
            fz_wrap(f, f->used_pos0, p) == !!(off_wrap & VRING_PACKED_EVENT_WRAP))
            return true;
    return false;
}

static void fz_notify(struct fz *f)
{
    bool want = fz_model_notify(f);
    FZ_CHECK(vring_packed_should_notify(&f->vr) == want);
}

static void fz_publish(struct fz *f)
{
    vring_packed_publish(&f->vr);
    if (f->batch_count)
        FZ_CHECK(fz_desc_flags(f, f->batch_idx) == f->batch_flags);
    f->batch_count = 0;
    fz_notify(f);
}

static void fz_kicks(struct fz *f, bool enable)
{
    if (!enable) {
        vring_packed_disable_kicks(&f->vr);
        FZ_CHECK(le16toh(f->vr.device->flags) == VRING_PACKED_EVENT_DISABLE);
        return;
    }
    bool more = vring_packed_enable_kicks(&f->vr);
    uint16_t idx = fz_idx(f, f->avail_pos0, f->avail_pos);
    bool wrap = fz_wrap(f, f->avail_pos0, f->avail_pos);
    uint16_t flags = fz_desc_flags(f, idx);
    bool a = flags & VRING_PACKED_DESC_F_AVAIL, u = flags & VRING_PACKED_DESC_F_USED;
    FZ_CHECK(more == (a == wrap && u != wrap));
    if (f->event_idx) {
        FZ_CHECK(le16toh(f->vr.device->flags) == VRING_PACKED_EVENT_DESC);
        FZ_CHECK(le16toh(f->vr.device->off_wrap) == (idx | (wrap ? VRING_PACKED_EVENT_WRAP : 0)));
    } else {
        FZ_CHECK(le16toh(f->vr.device->flags) == VRING_PACKED_EVENT_ENABLE);
    }
}

/* The driver writes a list at its avail position, the first flags last. */
static void fz_add(struct fz *f, struct fz_input *in)
{
    unsigned n = 1 + fz_u8(in) % FZ_MAX_ADD;
    uint16_t head = f->drv_idx, head_flags = 0;
    for (unsigned i = 0; i < n; i++) {
        uint64_t addr = fz_gpa(&f->m, in);
        uint32_t len = fz_u32(in);
        uint16_t id = fz_u16(in);
        uint8_t e = fz_u8(in);
        uint16_t flags = (e & 1 ? VRING_DESC_F_WRITE : 0) | (e & 2 ? VRING_DESC_F_INDIRECT : 0);
        if ((i + 1 < n) != !!(e & 4))
            flags |= VRING_DESC_F_NEXT;
        if (f->drv_wrap != !!(e & 8))
            flags |= VRING_PACKED_DESC_F_AVAIL;
        if (f->drv_wrap == !!(e & 16))
            flags |= VRING_PACKED_DESC_F_USED;
        struct vring_packed_desc *d = &f->vr.desc[f->drv_idx];
        d->addr = htole64(addr);
        d->len = htole32(len);
        d->id = htole16(id);
        if (i == 0)
            head_flags = flags;
        else
            __atomic_store_n(&d->flags, htole16(flags), __ATOMIC_RELEASE);
        if (++f->drv_idx == f->size) {
            f->drv_idx = 0;
            f->drv_wrap = !f->drv_wrap;
        }
    }
    __atomic_store_n(&f->vr.desc[head].flags, htole16(head_flags), __ATOMIC_RELEASE);
}

/* A held request walked again from its saved ring descriptors, as a
 * restarted backend does from the inflight region (whose copies the
 * frontend could have rewritten: so may the input). Nothing is popped; with
 * the copies intact and no guest write since the pop, the walk finds what
 * the pop found. */
static void fz_rewalk(struct fz *f, struct fz_input *in)
{
    uint8_t sel = fz_u8(in), k = fz_u8(in);
    struct vring_packed_desc d = fz_desc(f, in);
    if (!f->held_count)
        return;
    struct fz_slot *s = &f->slots[f->held[sel % f->held_count]];
    if (k & 0x80) {
        s->copy[(k & 0x7f) % s->ndescs] = d;
        s->copy_rewritten = true;
    }
    bool intact = !s->copy_rewritten;
    uint32_t base = vring_packed_base(&f->vr), inflight = f->vr.inflight;
    struct vring_chain chain = {.iov = f->rewalk_iov, .iov_max = f->m.iov_max, .scratch = f->m.indirect_scratch};
    int ret = vring_packed_walk_saved(&f->vr, f->m.mem, &chain, s->copy, s->ndescs, s->id);
    FZ_TRACE("rewalk id %u ndescs %u%s: %d out %u/%llu in %u/%llu\n", s->id, s->ndescs, intact ? "" : " (copy rewritten)",
             ret, chain.out_num, (unsigned long long)chain.out_len, chain.in_num, (unsigned long long)chain.in_len);
    fz_check_chain(&f->m, ret, &chain);
    FZ_CHECK(chain.desc_reads <= s->ndescs + f->m.max_chain + 1u);
    FZ_CHECK(chain.ring_descs == s->ndescs);
    if (intact && s->guest_writes == f->guest_writes) {
        FZ_CHECK(ret == 0 && chain.status);
        FZ_CHECK(chain.out_len == s->out_len && chain.in_len == s->in_len &&
                 chain.out_num + chain.in_num == s->niov);
    }
    if (ret < 0) {
        uint8_t *status = NULL;
        int found = vring_packed_status_saved(&f->vr, f->m.mem, &chain, s->copy, s->ndescs, s->id, &status);
        FZ_TRACE("  status search %d\n", found);
        if (found == 0)
            FZ_CHECK(status && fz_host_region(&f->m, status, 1));
    }
    FZ_CHECK(vring_packed_base(&f->vr) == base && f->vr.inflight == inflight); /* nothing popped */
}

static void fz_run_op(struct fz *f, struct fz_input *in)
{
    switch (fz_u8(in) % FZ_OP_COUNT) {
    case FZ_OP_DESC: {
        uint16_t i = fz_u16(in) % f->size;
        struct vring_packed_desc d = fz_desc(f, in);
        memcpy(&f->vr.desc[i], &d, sizeof(d));
        break;
    }
    case FZ_OP_TABLE: {
        f->guest_writes++;
        uint64_t gpa = fz_gpa(&f->m, in);
        unsigned n = 1 + fz_u8(in) % FZ_MAX_TABLE;
        for (unsigned i = 0; i < n; i++) {
            struct vring_packed_desc d = fz_desc(f, in);
            fz_guest_write(&f->m, gpa + 16 * (uint64_t)i, &d, sizeof(d));
        }
        break;
    }
    case FZ_OP_ADD:
        fz_add(f, in);
        break;
    case FZ_OP_DRIVER_POS: {
        uint16_t v = fz_u16(in);
        f->drv_idx = (v & 0x7fff) % f->size;
        f->drv_wrap = v >> 15;
        break;
    }
    case FZ_OP_POKE: {
        f->guest_writes++;
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
        fz_notify(f);
        break;
    case FZ_OP_KICKS:
        fz_kicks(f, !(fz_u8(in) & 1));
        break;
    case FZ_OP_REWALK:
        fz_rewalk(f, in);
        break;
    case FZ_OP_DRIVER_EVENT:
        f->vr.driver->off_wrap = htole16(fz_u16(in));
        f->vr.driver->flags = htole16(fz_u16(in));
        break;
    }
}

void fz_packed_run(struct fz_input *in, uint8_t features)
{
    static struct fz f; /* large (scratch iovecs and table); reset on every run */
    memset(&f, 0, sizeof(f));

    f.size = (uint16_t)(1 + fz_u8(in) % FZ_MAX_QUEUE);
    if (!fz_setup(&f.m, in, features))
        goto out;
    if (!fz_setup_rings(&f, in, features & FZ_F_EVENT_IDX, features & FZ_F_INDIRECT)) {
        FZ_TRACE("skipped: areas outside memory, misaligned, or a bad base\n");
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
    FZ_TRACE("done: base %#x inflight %u%s\n", vring_packed_base(&f.vr), f.vr.inflight,
             f.broken ? ", ring broken" : "");
out:
    fz_teardown(&f);
}
