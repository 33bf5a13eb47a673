/*
 * libFuzzer target: the split-ring walker (vring_split.c) and virtio-blk
 * request parsing (blk.c) over guest memory (guest_mem.c), driven the way a
 * hostile guest drives them.
 *
 * Only those three files are linked in. queue.c's pop/complete loop is
 * re-enacted here (slots, the "head already in flight" check, the broken
 * state) without io_uring, threads or eventfds; the null backend is emulated
 * by touching every byte of a request's buffers, so AddressSanitizer sees any
 * iovec that strays outside guest memory.
 *
 * The input is decoded, not interpreted as raw memory (the structured style of
 * rust-vmm vm-virtio's fuzz/fuzz_targets/virtio_queue.rs): a memory layout and
 * a queue, then a sequence of guest writes and device operations. Reads past
 * the end of the input yield zeroes, so every input decodes to something.
 * All integers are little-endian. fuzz/make_seeds.py writes inputs in this
 * format; keep the two in step.
 *
 *   header
 *     u8  features     bit0 EVENT_IDX, bit1 INDIRECT_DESC, bit2 read-only disk,
 *                      bits 3-5 the chain limit (max_chain: seg_max + 2):
 *                      130, 1, 2, 3, 4, 16, 64, 1024
 *     u8  size_log2    queue size = 1 << (v % 6): 1..32
 *     u8  regions      count = 1 + v % 3
 *     region * count
 *       u8  place      0 gpa = param; 1 right after the previous region;
 *                      2 after the previous one with a gap of param % 4096;
 *                      3 ending param % 4096 bytes below 2^64
 *                      (1 and 2 for the first region: gpa = param % 2^32)
 *       u16 size       1 + v bytes
 *       u64 param
 *     u16 iov_max      iovecs a chain may fill: 1 + v % DP_REQ_MAX_IOV
 *     u64 capacity     sectors, made valid the way dp_disk_create checks
 *     u8  lbs_log2     logical block size = 512 << (v % 8)
 *     gpa desc, gpa avail, gpa used    ring placement (case skipped when
 *                      dp_mem_translate_gpa or vring_split_init refuses it)
 *     u16 last_avail_idx
 *     u16 used_idx     the guest's used->idx before the device starts
 *   operations, until the input runs out (at most FZ_MAX_OPS)
 *     u8  op % FZ_OP_COUNT, then its arguments (see enum fz_op)
 *
 *   gpa   u8 sel; sel >= 0xc0: u64 raw address; else region (sel & 0x3f) %
 *         count (in input order) plus an s32 offset, so most addresses land
 *         in or near memory without the fuzzer having to guess them.
 *   desc  gpa addr, u32 len, u16 flags, u16 next
 *
 * Checks (abort() on violation, besides ASan/UBSan): every iovec the walker
 * returns lies inside one region's host buffer and is non-empty, also when it
 * stopped at a fault; counts stay within iov_max; byte totals match
 * out_len/in_len; the status byte lies in a region and is the last byte of
 * the last writable iovec; a fault either finds the status byte (the
 * request completes with IOERR written there) or breaks the ring, never
 * completes a chain without one; blk_parse's req->iov is a
 * sub-range of the chain's iovecs (readable ones for writes, writable ones
 * minus the status byte for reads) whose bytes add up to req->len; requests
 * handed to the backend are within capacity, block aligned and <= 1 GiB; the
 * used ring holds what was pushed.
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

#include "blk.h"
#include "dp_internal.h"
#include "guest_mem.h"
#include "vring_split.h"

#ifndef FZ_MAX_REGIONS
#define FZ_MAX_REGIONS 3
#endif
#define FZ_MAX_QUEUE 32
#define FZ_MAX_OPS 512
#define FZ_MAX_TABLE 64 /* descriptors one OP_TABLE writes */
#define FZ_MAX_POKE 64  /* bytes one OP_POKE writes */

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

/* ------------------------------------------------------------ input decoding */

struct fz_input {
    const uint8_t *p;
    size_t left;
    bool eof;
};

static void fz_take(struct fz_input *in, void *out, size_t n)
{
    size_t k = n < in->left ? n : in->left;
    memcpy(out, in->p, k);
    memset((uint8_t *)out + k, 0, n - k);
    in->p += k;
    in->left -= k;
    if (k < n)
        in->eof = true;
}

static uint8_t fz_u8(struct fz_input *in)
{
    uint8_t v;
    fz_take(in, &v, 1);
    return v;
}

static uint16_t fz_u16(struct fz_input *in)
{
    uint16_t v;
    fz_take(in, &v, 2);
    return le16toh(v);
}

static uint32_t fz_u32(struct fz_input *in)
{
    uint32_t v;
    fz_take(in, &v, 4);
    return le32toh(v);
}

static uint64_t fz_u64(struct fz_input *in)
{
    uint64_t v;
    fz_take(in, &v, 8);
    return le64toh(v);
}

/* ------------------------------------------------------------ the model */

struct fz_region {
    uint64_t gpa;
    uint64_t size;
    uint8_t *host; /* malloc'ed to exactly size bytes */
};

struct fz_slot {
    struct blk_req req;
    struct iovec *iov; /* iov_max entries, malloc'ed to exactly that */
};

struct fz {
    struct fz_region regions[FZ_MAX_REGIONS];
    unsigned region_count;
    struct dp_mem *mem;
    struct dp_disk disk;
    struct vring_split vr;
    uint16_t size;
    uint32_t iov_max;
    struct fz_slot slots[FZ_MAX_QUEUE];
    uint16_t free_slots[FZ_MAX_QUEUE];
    unsigned free_count;
    uint16_t held[FZ_MAX_QUEUE]; /* slots whose request waits for the backend */
    unsigned held_count;
    uint8_t head_slot[FZ_MAX_QUEUE]; /* slot + 1 while the head is in flight, else 0 */
    uint16_t pushed;                 /* used elements pushed since init */
    uint16_t used_idx_start;
    bool broken;
    struct iovec scratch[DP_REQ_MAX_IOV]; /* the chain's iovecs before blk_parse edits them */
    struct vring_desc indirect_scratch[VRING_INDIRECT_MAX];
    uint32_t max_chain;
};

/* VRING_BLK_FUZZ_VERBOSE=1 in the environment traces each chain (for seeds
 * and reproducers; never while fuzzing). */
static bool fz_verbose;

#define FZ_TRACE(...)                         \
    do {                                      \
        if (fz_verbose)                       \
            fprintf(stderr, __VA_ARGS__);     \
    } while (0)

#define FZ_CHECK(cond)                                                                   \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            fprintf(stderr, "vring_blk_fuzz: check failed: %s (%s:%d)\n", #cond, __FILE__, \
                    __LINE__);                                                           \
            abort();                                                                     \
        }                                                                                \
    } while (0)

/* The region whose host buffer holds [p, p + len), or NULL. */
static const struct fz_region *fz_host_region(const struct fz *f, const void *p, size_t len)
{
    uintptr_t a = (uintptr_t)p;
    for (unsigned i = 0; i < f->region_count; i++) {
        const struct fz_region *r = &f->regions[i];
        uintptr_t base = (uintptr_t)r->host;
        if (a >= base && a - base <= r->size && len <= r->size - (a - base))
            return r;
    }
    return NULL;
}

static uint64_t fz_gpa(struct fz *f, struct fz_input *in)
{
    uint8_t sel = fz_u8(in);
    if (sel >= 0xc0)
        return fz_u64(in);
    const struct fz_region *r = &f->regions[(sel & 0x3f) % f->region_count];
    int32_t off = (int32_t)fz_u32(in);
    return r->gpa + (uint64_t)(int64_t)off;
}

static struct vring_desc fz_desc(struct fz *f, struct fz_input *in)
{
    struct vring_desc d;
    d.addr = htole64(fz_gpa(f, in));
    d.len = htole32(fz_u32(in));
    d.flags = htole16(fz_u16(in));
    d.next = htole16(fz_u16(in));
    return d;
}

/* The guest writes bytes to its memory; bytes outside every region are lost,
 * as they would be on real hardware. */
static void fz_guest_write(struct fz *f, uint64_t gpa, const void *buf, size_t len)
{
    const uint8_t *src = buf;
    for (size_t i = 0; i < len; i++) {
        uint64_t a = gpa + i;
        for (unsigned k = 0; k < f->region_count; k++) {
            const struct fz_region *r = &f->regions[k];
            if (a >= r->gpa && a - r->gpa < r->size) {
                r->host[a - r->gpa] = src[i];
                break;
            }
        }
    }
}

/* ------------------------------------------------------------ setup */

static bool fz_setup_memory(struct fz *f, struct fz_input *in)
{
    struct dp_mem_region table[FZ_MAX_REGIONS];
    f->region_count = 1 + fz_u8(in) % FZ_MAX_REGIONS;
    for (unsigned i = 0; i < f->region_count; i++) {
        struct fz_region *r = &f->regions[i];
        uint8_t place = fz_u8(in) % 4;
        r->size = 1 + (uint64_t)fz_u16(in);
        uint64_t param = fz_u64(in);
        const struct fz_region *prev = i ? &f->regions[i - 1] : NULL;
        switch (place) {
        case 0:
            r->gpa = param;
            break;
        case 1:
            r->gpa = prev ? prev->gpa + prev->size : param & 0xffffffffu;
            break;
        case 2:
            r->gpa = prev ? prev->gpa + prev->size + param % 4096 : param & 0xffffffffu;
            break;
        default: /* the region's last byte at or just below 2^64 - 1 */
            r->gpa = 0 - r->size - param % 4096;
            break;
        }
        /* Host buffers are exactly size bytes so ASan flags any stray access.
         * posix_memalign (malloc's aligned sibling) makes ring alignment a
         * property of the input alone, not of the allocator. */
        void *p = NULL;
        if (posix_memalign(&p, 16, r->size))
            return false;
        r->host = p;
        memset(r->host, 0, r->size);
        table[i] = (struct dp_mem_region){
            .guest_phys_addr = r->gpa,
            .size = r->size,
            .user_addr = r->gpa,
            .host_addr = r->host,
        };
    }
    /* Overlapping or wrapping layouts are refused here, as in production. */
    return dp_mem_create(table, f->region_count, &f->mem) == 0;
}

static void fz_setup_disk(struct fz *f, struct fz_input *in, bool read_only)
{
    uint64_t capacity = fz_u64(in);
    uint32_t lbs = 512u << (fz_u8(in) % 8);
    /* What dp_disk_create accepts: bytes fit a uint64, whole logical blocks. */
    capacity %= UINT64_MAX / 512 + 1;
    capacity -= capacity % (lbs / 512);
    memset(&f->disk, 0, sizeof(f->disk));
    f->disk.backend = DP_BACKEND_NULL;
    f->disk.fd = -1;
    f->disk.capacity_sectors = capacity;
    f->disk.logical_block_size = lbs;
    f->disk.block_mask = lbs - 1;   /* as dp_disk_create sets it */
    f->disk.read_only = read_only;
    f->disk.read_zeroes = true;
    memcpy(f->disk.serial, "vring-blk-fuzz-seria", DP_SERIAL_LEN);
}

/* Ring placement as vring_init does it (vring.c: split_map), then vring_split_init. */
static bool fz_setup_rings(struct fz *f, struct fz_input *in, bool event_idx, bool indirect)
{
    uint64_t desc_gpa = fz_gpa(f, in);
    uint64_t avail_gpa = fz_gpa(f, in);
    uint64_t used_gpa = fz_gpa(f, in);
    uint16_t last_avail = fz_u16(in);
    uint16_t used_idx = fz_u16(in);
    void *desc, *avail, *used;
    if (dp_mem_translate_gpa(f->mem, desc_gpa, VRING_DESC_BYTES(f->size), &desc) ||
        dp_mem_translate_gpa(f->mem, avail_gpa, VRING_AVAIL_BYTES(f->size), &avail) ||
        dp_mem_translate_gpa(f->mem, used_gpa, VRING_USED_BYTES(f->size), &used))
        return false;
    FZ_CHECK(fz_host_region(f, desc, VRING_DESC_BYTES(f->size)));
    FZ_CHECK(fz_host_region(f, avail, VRING_AVAIL_BYTES(f->size)));
    FZ_CHECK(fz_host_region(f, used, VRING_USED_BYTES(f->size)));
    if ((uintptr_t)used & 3)
        return false; /* vring_split_init refuses it; don't store through it first */
    ((struct vring_used *)used)->idx = htole16(used_idx);
    if (vring_split_init(&f->vr, f->size, desc, avail, used, last_avail, event_idx, indirect, f->max_chain))
        return false;
    FZ_CHECK(f->vr.used_idx == used_idx);
    f->used_idx_start = used_idx;
    return true;
}

static bool fz_setup_slots(struct fz *f)
{
    for (unsigned i = 0; i < f->size; i++) {
        f->slots[i].iov = malloc(f->iov_max * sizeof(struct iovec));
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
    for (unsigned i = 0; i < f->region_count; i++)
        free(f->regions[i].host);
    dp_mem_destroy(f->mem);
}

/* ------------------------------------------------------------ checks */

/* The walker's output, whether it succeeded or not. */
static void fz_check_chain(const struct fz *f, int ret, const struct vring_chain *c)
{
    uint32_t n = c->out_num + c->in_num;
    FZ_CHECK(c->iov_max == f->iov_max);
    FZ_CHECK(n <= c->iov_max);
    uint64_t out = 0, in = 0;
    for (uint32_t i = 0; i < n; i++) {
        FZ_CHECK(c->iov[i].iov_len > 0);
        FZ_CHECK(fz_host_region(f, c->iov[i].iov_base, c->iov[i].iov_len));
        if (i < c->out_num)
            out += c->iov[i].iov_len;
        else
            in += c->iov[i].iov_len;
    }
    FZ_CHECK(out == c->out_len);
    FZ_CHECK(in == c->in_len);
    /* Bounded work: the chain's descriptors, plus the one that points at an
     * indirect table, each read once. */
    FZ_CHECK(c->desc_reads >= 1 && c->desc_reads <= f->max_chain + f->size + 1);
    if (c->status) {
        FZ_CHECK(c->in_num > 0 && fz_host_region(f, c->status, 1));
        FZ_CHECK(c->status == (uint8_t *)c->iov[n - 1].iov_base + c->iov[n - 1].iov_len - 1);
    }
    if (ret < 0)
        FZ_CHECK(ret == -ELOOP || ret == -E2BIG || ret == -EBADMSG || ret == -ENXIO || ret == -EFAULT ||
                 ret == -ENOBUFS || ret == -EPROTO);
    else
        FZ_CHECK(ret == 0);
}

/* req->iov[0..cnt) against the chain's original iovecs orig[lo..hi): the
 * array position lies inside, and each entry is a sub-range of the entry it
 * replaced (iov_advance and iov_drop_tail_byte only trim). */
static uint64_t fz_check_req_iov(const struct fz *f, const struct vring_chain *c,
                                 const struct blk_req *req, uint32_t lo, uint32_t hi)
{
    if (req->iov_cnt == 0)
        return 0;
    FZ_CHECK(req->iov >= c->iov + lo);
    FZ_CHECK(req->iov + req->iov_cnt <= c->iov + hi);
    uint32_t first = (uint32_t)(req->iov - c->iov);
    uint64_t sum = 0;
    for (uint32_t i = 0; i < req->iov_cnt; i++) {
        const struct iovec *v = &req->iov[i], *o = &f->scratch[first + i];
        uintptr_t b = (uintptr_t)v->iov_base, ob = (uintptr_t)o->iov_base;
        FZ_CHECK(v->iov_len > 0);
        FZ_CHECK(b >= ob && b - ob <= o->iov_len && v->iov_len <= o->iov_len - (b - ob));
        FZ_CHECK(fz_host_region(f, v->iov_base, v->iov_len));
        sum += v->iov_len;
    }
    return sum;
}

static void fz_check_parse(const struct fz *f, const struct vring_chain *c,
                           const struct blk_req *req, int status, enum dp_err err)
{
    const struct dp_disk *d = &f->disk;
    FZ_CHECK(status == VIRTIO_BLK_S_OK || status == VIRTIO_BLK_S_IOERR ||
             status == VIRTIO_BLK_S_UNSUPP || status == BLK_NEEDS_IO);
    bool ok = status == VIRTIO_BLK_S_OK || status == BLK_NEEDS_IO;
    FZ_CHECK(ok == (err == DP_ERR_COUNT));
    FZ_CHECK(err <= DP_ERR_COUNT);
    FZ_CHECK(req->op < DP_OP_COUNT);
    FZ_CHECK(req->status == c->status && req->status);
    if (ok)
        FZ_CHECK(c->out_len >= 16);

    uint32_t n = c->out_num + c->in_num;
    if (req->op == DP_OP_WRITE) {
        uint64_t sum = fz_check_req_iov(f, c, req, 0, c->out_num);
        FZ_CHECK(sum == req->len);
        FZ_CHECK(req->len == c->out_len - 16);
    } else if (req->op == DP_OP_READ) {
        uint64_t sum = fz_check_req_iov(f, c, req, c->out_num, n);
        FZ_CHECK(sum == req->len);
        /* Exactly the status byte (the chain's last, see fz_check_chain) is
         * kept from the backend. */
        FZ_CHECK(req->len == c->in_len - 1);
    } else {
        FZ_CHECK(req->iov_cnt == 0);
    }
    if (ok && req->status)
        FZ_CHECK(req->data_in_len <= c->in_len - 1);

    if (status != BLK_NEEDS_IO) {
        if (status == VIRTIO_BLK_S_OK && req->op == DP_OP_GET_ID)
            FZ_CHECK(req->data_in_len == DP_SERIAL_LEN);
        return;
    }
    uint64_t cap_bytes = d->capacity_sectors * 512;
    switch (req->op) {
    case DP_OP_READ:
    case DP_OP_WRITE:
        FZ_CHECK(req->len > 0 && req->len <= BLK_MAX_REQ_BYTES);
        FZ_CHECK(req->op == DP_OP_READ || !d->read_only);
        FZ_CHECK(req->data_in_len == (req->op == DP_OP_READ ? req->len : 0));
        break;
    case DP_OP_DISCARD:
    case DP_OP_WRITE_ZEROES:
        FZ_CHECK(req->len > 0 && !d->read_only);
        break;
    case DP_OP_FLUSH:
        FZ_CHECK(!d->read_only);
        return;
    default:
        FZ_CHECK(!"an op the backend cannot run");
    }
    FZ_CHECK(req->offset % d->logical_block_size == 0);
    FZ_CHECK(req->len % d->logical_block_size == 0);
    FZ_CHECK(req->offset <= cap_bytes && req->len <= cap_bytes - req->offset);
}

/* ------------------------------------------------------------ the device */

static void fz_complete(struct fz *f, uint16_t slot, uint8_t status)
{
    struct blk_req *req = &f->slots[slot].req;
    /* Never a chain without its status written: the guest would read a stale
     * byte (0 is OK) as the answer. */
    FZ_CHECK(req->status && fz_host_region(f, req->status, 1));
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

/* The null backend, touching every byte: reads fill the buffers, writes read them. */
static uint8_t fz_backend_run(struct blk_req *req, bool fail)
{
    uint64_t total = 0;
    volatile uint8_t sink = 0;
    for (uint32_t i = 0; i < req->iov_cnt; i++) {
        uint8_t *p = req->iov[i].iov_base;
        if (req->op == DP_OP_READ)
            memset(p, 0xa5, req->iov[i].iov_len);
        else
            for (size_t k = 0; k < req->iov[i].iov_len; k++)
                sink ^= p[k];
        total += req->iov[i].iov_len;
    }
    (void)sink;
    if (req->op == DP_OP_READ || req->op == DP_OP_WRITE)
        FZ_CHECK(total == req->len);
    req->done = req->len;
    return fail ? VIRTIO_BLK_S_IOERR : VIRTIO_BLK_S_OK;
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

    struct vring_chain chain = {.iov = f->slots[slot].iov, .iov_max = f->iov_max, .scratch = f->indirect_scratch};
    int ret = vring_split_walk(&f->vr, f->mem, head, &chain);
    FZ_TRACE("head %u: walk %d out %u/%llu in %u/%llu reads %u%s\n", head, ret, chain.out_num,
             (unsigned long long)chain.out_len, chain.in_num, (unsigned long long)chain.in_len,
             chain.desc_reads, chain.status ? " status" : "");
    fz_check_chain(f, ret, &chain);
    uint8_t *status_byte = ret == 0 ? chain.status : NULL;
    if (ret < 0) {
        uint32_t reads = chain.desc_reads;
        int found = vring_split_status(&f->vr, f->mem, head, &chain, &status_byte);
        FZ_TRACE("head %u: status search %d\n", head, found);
        FZ_CHECK(chain.desc_reads > reads && chain.desc_reads - reads <= f->max_chain + f->size + 1);
        if (found < 0)
            status_byte = NULL;
        else
            FZ_CHECK(status_byte && fz_host_region(f, status_byte, 1));
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
    memcpy(f->scratch, chain.iov, (chain.out_num + chain.in_num) * sizeof(struct iovec));

    enum dp_err err = DP_ERR_COUNT + 1; /* blk_parse must set it */
    int status = blk_parse(&f->disk, &chain, req, &err);
    FZ_TRACE("head %u: blk op %u status %#x err %d len %llu offset %llu\n", head, req->op, status,
             (int)err, (unsigned long long)req->len, (unsigned long long)req->offset);
    fz_check_parse(f, &chain, req, status, err);
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
        uint64_t gpa = fz_gpa(f, in);
        unsigned n = 1 + fz_u8(in) % FZ_MAX_TABLE;
        for (unsigned i = 0; i < n; i++) {
            struct vring_desc d = fz_desc(f, in);
            fz_guest_write(f, gpa + 16 * (uint64_t)i, &d, sizeof(d));
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
        uint64_t gpa = fz_gpa(f, in);
        uint8_t buf[FZ_MAX_POKE];
        unsigned n = fz_u8(in) % (FZ_MAX_POKE + 1);
        fz_take(in, buf, n);
        fz_guest_write(f, gpa, buf, n);
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

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    const char *v = getenv("VRING_BLK_FUZZ_VERBOSE");
    fz_verbose = v && *v && *v != '0';
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fz_input in = {.p = data, .left = size};
    static struct fz f; /* large (scratch iovecs); reset on every run */
    memset(&f, 0, sizeof(f));

    uint8_t features = fz_u8(&in);
    static const uint32_t chain_limits[8] = {DP_SEG_MAX + 2, 1, 2, 3, 4, 16, 64, 1024};
    f.max_chain = chain_limits[(features >> 3) & 7];
    f.size = (uint16_t)(1u << (fz_u8(&in) % 6));
    if (!fz_setup_memory(&f, &in)) {
        FZ_TRACE("skipped: memory layout refused\n");
        goto out;
    }
    f.iov_max = 1 + fz_u16(&in) % DP_REQ_MAX_IOV;
    fz_setup_disk(&f, &in, features & 4);
    if (!fz_setup_rings(&f, &in, features & 1, features & 2)) {
        FZ_TRACE("skipped: rings outside memory or misaligned\n");
        goto out;
    }
    if (!fz_setup_slots(&f))
        goto out;

    for (unsigned ops = 0; ops < FZ_MAX_OPS && !in.eof && in.left; ops++)
        fz_run_op(&f, &in);

    /* Drain: the backend finishes everything, the guest sees it. */
    while (f.held_count)
        fz_complete_held(&f, 0, false);
    fz_publish(&f);
    FZ_CHECK(f.free_count == f.size);
    FZ_TRACE("done: popped to %u, used idx %u%s\n", f.vr.last_avail_idx, f.vr.used_idx,
             f.broken ? ", ring broken" : "");
out:
    fz_teardown(&f);
    return 0;
}
