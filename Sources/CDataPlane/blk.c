/* virtio-blk request parsing. The 16-byte header is copied out of guest
 * memory once; everything after works on the copy. */
#include <endian.h>
#include <errno.h>
#include <string.h>

#include "blk.h"

struct blk_outhdr {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
};

struct blk_discard_seg {
    uint64_t sector;
    uint32_t num_sectors;
    uint32_t flags;
};

_Static_assert(sizeof(struct blk_outhdr) == 16, "virtio_blk_outhdr is 16 bytes");
_Static_assert(sizeof(struct blk_discard_seg) == 16, "virtio_blk_discard_write_zeroes is 16 bytes");

size_t iov_to_buf(const struct iovec *iov, uint32_t cnt, size_t skip, void *buf, size_t len)
{
    size_t copied = 0;
    for (uint32_t i = 0; i < cnt && copied < len; i++) {
        if (skip >= iov[i].iov_len) {
            skip -= iov[i].iov_len;
            continue;
        }
        size_t n = iov[i].iov_len - skip;
        if (n > len - copied)
            n = len - copied;
        memcpy((uint8_t *)buf + copied, (uint8_t *)iov[i].iov_base + skip, n);
        copied += n;
        skip = 0;
    }
    return copied;
}

size_t iov_from_buf(const struct iovec *iov, uint32_t cnt, const void *buf, size_t len)
{
    size_t copied = 0;
    for (uint32_t i = 0; i < cnt && copied < len; i++) {
        size_t n = iov[i].iov_len;
        if (n > len - copied)
            n = len - copied;
        memcpy(iov[i].iov_base, (const uint8_t *)buf + copied, n);
        copied += n;
    }
    return copied;
}

struct iovec *iov_advance(struct iovec *iov, uint32_t *cnt, size_t n)
{
    while (*cnt && n >= iov->iov_len) {
        n -= iov->iov_len;
        iov++;
        (*cnt)--;
    }
    if (*cnt && n) {
        iov->iov_base = (uint8_t *)iov->iov_base + n;
        iov->iov_len -= n;
    }
    return iov;
}

/* Drops the last byte (the status) from the writable iovecs. */
static void iov_drop_tail_byte(struct iovec *iov, uint32_t *cnt)
{
    while (*cnt && iov[*cnt - 1].iov_len == 0)
        (*cnt)--;
    if (*cnt && --iov[*cnt - 1].iov_len == 0)
        (*cnt)--;
}

/* Sector range check without overflow: [sector, sector + bytes/512) inside
 * the disk. The capacity is loaded once: a resize between two loads must
 * not let one check pass on two different sizes (disk.c argues why relaxed
 * is enough). */
static bool blk_range_ok(const struct dp_disk *disk, uint64_t sector, uint64_t bytes)
{
    uint64_t sectors = bytes / 512;
    uint64_t capacity = atomic_load_explicit(&disk->capacity_sectors, memory_order_relaxed);
    return sector <= capacity && sectors <= capacity - sector;
}

bool blk_req_in_range(const struct dp_disk *disk, const struct blk_req *req)
{
    switch (req->op) {
    case DP_OP_READ:
    case DP_OP_WRITE:
    case DP_OP_DISCARD:
    case DP_OP_WRITE_ZEROES:
        /* offset and len are whole sectors here (blk_parse checked them). */
        return blk_range_ok(disk, req->offset / 512, req->len);
    default:
        return true;
    }
}

static int blk_fail(enum dp_err *err, enum dp_err kind, int status)
{
    *err = kind;
    return status;
}

static int blk_parse_discard(const struct dp_disk *disk, struct vring_chain *chain,
                             struct blk_req *req, enum dp_err *err)
{
    struct blk_discard_seg seg;
    uint64_t payload = chain->out_len - sizeof(struct blk_outhdr);
    /* We advertise max_discard_seg = max_write_zeroes_seg = 1. */
    if (payload != sizeof(seg)) {
        bool whole_segments = payload && payload % sizeof(seg) == 0;
        return whole_segments ? blk_fail(err, DP_ERR_UNSUPP, VIRTIO_BLK_S_UNSUPP)
                              : blk_fail(err, DP_ERR_BAD_REQUEST, VIRTIO_BLK_S_IOERR);
    }
    iov_to_buf(chain->iov, chain->out_num, sizeof(struct blk_outhdr), &seg, sizeof(seg));
    uint64_t sector = le64toh(seg.sector);
    uint64_t bytes = (uint64_t)le32toh(seg.num_sectors) * 512;
    uint32_t flags = le32toh(seg.flags);

    /* 5.2.6.2: unmap is only meaningful for write zeroes; other bits are reserved. */
    if (flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
        return blk_fail(err, DP_ERR_UNSUPP, VIRTIO_BLK_S_UNSUPP);
    if (req->op == DP_OP_DISCARD && flags)
        return blk_fail(err, DP_ERR_UNSUPP, VIRTIO_BLK_S_UNSUPP);
    if (disk->read_only)
        return blk_fail(err, DP_ERR_READ_ONLY, VIRTIO_BLK_S_IOERR);
    if (!blk_range_ok(disk, sector, bytes))
        return blk_fail(err, DP_ERR_RANGE, VIRTIO_BLK_S_IOERR);
    if (((sector * 512) | bytes) & disk->block_mask)
        return blk_fail(err, DP_ERR_BAD_REQUEST, VIRTIO_BLK_S_IOERR);

    req->offset = sector * 512;
    req->len = bytes;
    req->unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    *err = DP_ERR_COUNT;
    return bytes ? BLK_NEEDS_IO : VIRTIO_BLK_S_OK;
}

/* A read (VIRTIO_BLK_T_IN) or write (VIRTIO_BLK_T_OUT): the data iovecs
 * (the readable ones after the header, or the writable ones before the
 * status byte), checked against the disk's size and block size. */
static int blk_parse_rw(const struct dp_disk *disk, struct vring_chain *chain, struct blk_req *req,
                        uint64_t sector, enum dp_err *err)
{
    bool write = req->op == DP_OP_WRITE;
    if (write) {
        uint32_t cnt = chain->out_num;
        req->iov = iov_advance(chain->iov, &cnt, sizeof(struct blk_outhdr));
        req->iov_cnt = cnt;
        req->len = chain->out_len - sizeof(struct blk_outhdr);
    } else {
        uint32_t cnt = chain->in_num;
        iov_drop_tail_byte(chain->iov + chain->out_num, &cnt);
        req->iov = chain->iov + chain->out_num;
        req->iov_cnt = cnt;
        req->len = chain->in_len - 1;
    }
    /* One request moves at most 1 GiB: io_uring lengths are 32-bit. */
    if (req->len > BLK_MAX_REQ_BYTES)
        return blk_fail(err, DP_ERR_BAD_REQUEST, VIRTIO_BLK_S_IOERR);
    if (write && disk->read_only)
        return blk_fail(err, DP_ERR_READ_ONLY, VIRTIO_BLK_S_IOERR);
    /* Block sizes are powers of two of at least 512: masks, no divisions. */
    if ((req->len & (511 | disk->block_mask)) ||
        (sector <= UINT64_MAX / 512 && ((sector * 512) & disk->block_mask)))
        return blk_fail(err, DP_ERR_BAD_REQUEST, VIRTIO_BLK_S_IOERR);
    if (!blk_range_ok(disk, sector, req->len))
        return blk_fail(err, DP_ERR_RANGE, VIRTIO_BLK_S_IOERR);
    req->offset = sector * 512;
    if (!write)
        req->data_in_len = (uint32_t)req->len;
    *err = DP_ERR_COUNT;
    return req->len ? BLK_NEEDS_IO : VIRTIO_BLK_S_OK;
}

/* VIRTIO_BLK_T_GET_ID: the serial, answered at once. */
static int blk_get_id(const struct dp_disk *disk, struct vring_chain *chain, struct blk_req *req,
                      enum dp_err *err)
{
    uint32_t cnt = chain->in_num;
    iov_drop_tail_byte(chain->iov + chain->out_num, &cnt);
    if (chain->in_len - 1 < DP_SERIAL_LEN)
        return blk_fail(err, DP_ERR_BAD_REQUEST, VIRTIO_BLK_S_IOERR);
    iov_from_buf(chain->iov + chain->out_num, cnt, disk->serial, DP_SERIAL_LEN);
    req->data_in_len = DP_SERIAL_LEN;
    *err = DP_ERR_COUNT;
    return VIRTIO_BLK_S_OK;
}

/* Every field a request carries from one use of its slot to the next. */
static void blk_req_reset(struct blk_req *req, uint8_t *status)
{
    req->status = status;
    req->op = DP_OP_OTHER;
    req->data_in_len = 0;
    req->done = 0;
    req->len = 0;
    req->bounce = NULL;
    req->zero_phase = 0;
    req->unmap = false;
    req->iov = NULL;
    req->iov_cnt = 0;
}

int blk_parse(const struct dp_disk *disk, struct vring_chain *chain, struct blk_req *req,
              enum dp_err *err)
{
    struct blk_outhdr hdr;

    blk_req_reset(req, chain->status);
    /* The caller only parses chains that have their status byte. */
    if (chain->out_len < sizeof(hdr))
        return blk_fail(err, DP_ERR_BAD_REQUEST, VIRTIO_BLK_S_IOERR);
    iov_to_buf(chain->iov, chain->out_num, 0, &hdr, sizeof(hdr));
    uint32_t type = le32toh(hdr.type);

    switch (type) {
    case VIRTIO_BLK_T_IN:
    case VIRTIO_BLK_T_OUT:
        req->op = type == VIRTIO_BLK_T_OUT ? DP_OP_WRITE : DP_OP_READ;
        return blk_parse_rw(disk, chain, req, le64toh(hdr.sector), err);
    case VIRTIO_BLK_T_FLUSH:
        req->op = DP_OP_FLUSH;
        *err = DP_ERR_COUNT;
        /* Nothing of a read-only disk can be dirty. */
        return disk->read_only ? VIRTIO_BLK_S_OK : BLK_NEEDS_IO;
    case VIRTIO_BLK_T_GET_ID:
        req->op = DP_OP_GET_ID;
        return blk_get_id(disk, chain, req, err);
    case VIRTIO_BLK_T_DISCARD:
    case VIRTIO_BLK_T_WRITE_ZEROES:
        req->op = type == VIRTIO_BLK_T_DISCARD ? DP_OP_DISCARD : DP_OP_WRITE_ZEROES;
        return blk_parse_discard(disk, chain, req, err);
    default:
        return blk_fail(err, DP_ERR_UNSUPP, VIRTIO_BLK_S_UNSUPP);
    }
}
