/* What the two ring models of the vring_blk fuzz target share (fuzz_common.h). */
#ifndef _GNU_SOURCE
#error "build with -D_GNU_SOURCE (fuzz/build.sh does)"
#endif

#include <endian.h>
#include <errno.h>
#include <string.h>

#include "fuzz_common.h"

const uint32_t fz_chain_limits[8] = {DP_SEG_MAX + 2, 1, 2, 3, 4, 16, 64, 1024};
bool fz_verbose;

/* ------------------------------------------------------------ input decoding */

void fz_take(struct fz_input *in, void *out, size_t n)
{
    size_t k = n < in->left ? n : in->left;
    memcpy(out, in->p, k);
    memset((uint8_t *)out + k, 0, n - k);
    in->p += k;
    in->left -= k;
    if (k < n)
        in->eof = true;
}

uint8_t fz_u8(struct fz_input *in)
{
    uint8_t v;
    fz_take(in, &v, 1);
    return v;
}

uint16_t fz_u16(struct fz_input *in)
{
    uint16_t v;
    fz_take(in, &v, 2);
    return le16toh(v);
}

uint32_t fz_u32(struct fz_input *in)
{
    uint32_t v;
    fz_take(in, &v, 4);
    return le32toh(v);
}

uint64_t fz_u64(struct fz_input *in)
{
    uint64_t v;
    fz_take(in, &v, 8);
    return le64toh(v);
}

/* ------------------------------------------------------------ guest memory */

const struct fz_region *fz_host_region(const struct fz_mem *m, const void *p, size_t len)
{
    uintptr_t a = (uintptr_t)p;
    for (unsigned i = 0; i < m->region_count; i++) {
        const struct fz_region *r = &m->regions[i];
        uintptr_t base = (uintptr_t)r->host;
        if (a >= base && a - base <= r->size && len <= r->size - (a - base))
            return r;
    }
    return NULL;
}

uint64_t fz_gpa(const struct fz_mem *m, struct fz_input *in)
{
    uint8_t sel = fz_u8(in);
    if (sel >= 0xc0)
        return fz_u64(in);
    const struct fz_region *r = &m->regions[(sel & 0x3f) % m->region_count];
    int32_t off = (int32_t)fz_u32(in);
    return r->gpa + (uint64_t)(int64_t)off;
}

void fz_guest_write(struct fz_mem *m, uint64_t gpa, const void *buf, size_t len)
{
    const uint8_t *src = buf;
    for (size_t i = 0; i < len; i++) {
        uint64_t a = gpa + i;
        for (unsigned k = 0; k < m->region_count; k++) {
            const struct fz_region *r = &m->regions[k];
            if (a >= r->gpa && a - r->gpa < r->size) {
                r->host[a - r->gpa] = src[i];
                break;
            }
        }
    }
}

static bool fz_setup_memory(struct fz_mem *m, struct fz_input *in)
{
    struct dp_mem_region table[FZ_MAX_REGIONS];
    m->region_count = 1 + fz_u8(in) % FZ_MAX_REGIONS;
    for (unsigned i = 0; i < m->region_count; i++) {
        struct fz_region *r = &m->regions[i];
        uint8_t place = fz_u8(in) % 4;
        r->size = 1 + (uint64_t)fz_u16(in);
        uint64_t param = fz_u64(in);
        const struct fz_region *prev = i ? &m->regions[i - 1] : NULL;
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
    return dp_mem_create(table, m->region_count, &m->mem) == 0;
}

static void fz_setup_disk(struct fz_mem *m, struct fz_input *in, bool read_only)
{
    uint64_t capacity = fz_u64(in);
    uint32_t lbs = 512u << (fz_u8(in) % 8);
    /* What dp_disk_create accepts: bytes fit a uint64, whole logical blocks. */
    capacity %= UINT64_MAX / 512 + 1;
    capacity -= capacity % (lbs / 512);
    memset(&m->disk, 0, sizeof(m->disk));
    m->disk.backend = DP_BACKEND_NULL;
    m->disk.fd = -1;
    m->disk.capacity_sectors = capacity;
    m->disk.logical_block_size = lbs;
    m->disk.block_mask = lbs - 1;   /* as dp_disk_create sets it */
    m->disk.read_only = read_only;
    m->disk.read_zeroes = true;
    memcpy(m->disk.serial, "vring-blk-fuzz-seria", DP_SERIAL_LEN);
}

bool fz_setup(struct fz_mem *m, struct fz_input *in, uint8_t features)
{
    m->max_chain = FZ_CHAIN_LIMIT(features);
    if (!fz_setup_memory(m, in)) {
        FZ_TRACE("skipped: memory layout refused\n");
        return false;
    }
    m->iov_max = 1 + fz_u16(in) % DP_REQ_MAX_IOV;
    fz_setup_disk(m, in, features & FZ_F_READ_ONLY);
    return true;
}

void fz_teardown_mem(struct fz_mem *m)
{
    for (unsigned i = 0; i < m->region_count; i++)
        free(m->regions[i].host);
    dp_mem_destroy(m->mem);
}

/* ------------------------------------------------------------ checks */

void fz_check_chain(const struct fz_mem *m, int ret, const struct vring_chain *c)
{
    uint32_t n = c->out_num + c->in_num;
    FZ_CHECK(c->iov_max == m->iov_max);
    FZ_CHECK(n <= c->iov_max);
    uint64_t out = 0, in = 0;
    for (uint32_t i = 0; i < n; i++) {
        FZ_CHECK(c->iov[i].iov_len > 0);
        FZ_CHECK(fz_host_region(m, c->iov[i].iov_base, c->iov[i].iov_len));
        if (i < c->out_num)
            out += c->iov[i].iov_len;
        else
            in += c->iov[i].iov_len;
    }
    FZ_CHECK(out == c->out_len);
    FZ_CHECK(in == c->in_len);
    if (c->status) {
        FZ_CHECK(c->in_num > 0 && fz_host_region(m, c->status, 1));
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
static uint64_t fz_check_req_iov(const struct fz_mem *m, const struct vring_chain *c,
                                 const struct blk_req *req, uint32_t lo, uint32_t hi)
{
    if (req->iov_cnt == 0)
        return 0;
    FZ_CHECK(req->iov >= c->iov + lo);
    FZ_CHECK(req->iov + req->iov_cnt <= c->iov + hi);
    uint32_t first = (uint32_t)(req->iov - c->iov);
    uint64_t sum = 0;
    for (uint32_t i = 0; i < req->iov_cnt; i++) {
        const struct iovec *v = &req->iov[i], *o = &m->scratch[first + i];
        uintptr_t b = (uintptr_t)v->iov_base, ob = (uintptr_t)o->iov_base;
        FZ_CHECK(v->iov_len > 0);
        FZ_CHECK(b >= ob && b - ob <= o->iov_len && v->iov_len <= o->iov_len - (b - ob));
        FZ_CHECK(fz_host_region(m, v->iov_base, v->iov_len));
        sum += v->iov_len;
    }
    return sum;
}

void fz_check_parse(const struct fz_mem *m, const struct vring_chain *c,
                           const struct blk_req *req, int status, enum dp_err err)
{
    const struct dp_disk *d = &m->disk;
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
        uint64_t sum = fz_check_req_iov(m, c, req, 0, c->out_num);
        FZ_CHECK(sum == req->len);
        FZ_CHECK(req->len == c->out_len - 16);
    } else if (req->op == DP_OP_READ) {
        uint64_t sum = fz_check_req_iov(m, c, req, c->out_num, n);
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

uint8_t fz_backend_run(struct blk_req *req, bool fail)
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

