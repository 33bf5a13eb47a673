/* The io_uring backend: O_DIRECT (or buffered) reads and writes straight into
 * guest memory, fdatasync for FLUSH, fallocate for DISCARD and WRITE_ZEROES. */
#include <errno.h>
#include <linux/falloc.h>
#include <stdlib.h>

#include "backend.h"
#include "blk.h"

/* O_DIRECT wants buffer addresses and lengths aligned; OR-ing them all
 * together tests every one in a single pass. */
static bool iov_aligned(const struct iovec *iov, uint32_t cnt, uint32_t align)
{
    uintptr_t bits = 0;
    for (uint32_t i = 0; i < cnt; i++)
        bits |= (uintptr_t)iov[i].iov_base | iov[i].iov_len;
    return (bits & (align - 1)) == 0;
}

/* Where the bounce buffer's current window ends, as a request offset. */
static uint64_t bounce_window_end(const struct blk_req *req)
{
    uint64_t end = req->bounce_off + req->bounce_size;
    return end < req->len ? end : req->len;
}

/* Guest buffers O_DIRECT would refuse go through an aligned copy, a window
 * of the request at a time, from where it stands (req->done). This is the
 * rare path (Linux guests align their buffers), so it may allocate. */
static int bounce_setup(struct blk_req *req, uint32_t align)
{
    struct dp_queue *q = req->queue;
    uint64_t rest = req->len - req->done;
    uint64_t size = rest < DP_BOUNCE_WINDOW ? rest : DP_BOUNCE_WINDOW;
    if (!size)
        size = align;
    /* Waiters go first, in order: smaller requests must not keep taking the
     * budget a large one waits for. */
    if ((q->bounce_wait_head && q->bounce_wait_head != req) ||
        (q->bounce_bytes && (q->bounce_bytes >= DP_QUEUE_BOUNCE_BUDGET ||
                             size > DP_QUEUE_BOUNCE_BUDGET - q->bounce_bytes)))
        return -EAGAIN; /* waits on its queue until a bounce buffer is freed */
    void *buf;
    if (posix_memalign(&buf, align, size))
        return -ENOMEM;
    req->bounce = buf;
    req->bounce_size = size;
    req->bounce_off = req->done;
    if (req->op == DP_OP_WRITE)
        iov_to_buf(req->iov, req->iov_cnt, 0, buf, bounce_window_end(req) - req->bounce_off);
    q->bounce_bytes += size;
    STAT_ADD(q->stats.bounces, 1);
    if (q->bounce_bytes > STAT_LOAD(q->stats.bounce_bytes_peak))
        STAT_SET(q->stats.bounce_bytes_peak, q->bounce_bytes);
    return 0;
}

int backend_uring_prep(struct io_uring *ring, struct blk_req *req)
{
    const struct dp_disk *disk = req->queue->disk;
    bool rw = req->op == DP_OP_READ || req->op == DP_OP_WRITE;

    /* Checked again after short I/O too: what is left may have lost its
     * alignment. */
    if (rw && !req->bounce && disk->mem_align && !iov_aligned(req->iov, req->iov_cnt, disk->mem_align)) {
        int ret = bounce_setup(req, disk->mem_align);
        if (ret)
            return ret;
    }
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    if (!sqe)
        return -EBUSY;

    uint64_t offset = req->offset + req->done;
    switch (req->op) {
    case DP_OP_READ:
    case DP_OP_WRITE: {
        bool write = req->op == DP_OP_WRITE;
        if (req->bounce) {
            void *buf = (uint8_t *)req->bounce + (req->done - req->bounce_off);
            unsigned len = (unsigned)(bounce_window_end(req) - req->done);
            if (write)
                io_uring_prep_write(sqe, disk->fd, buf, len, offset);
            else
                io_uring_prep_read(sqe, disk->fd, buf, len, offset);
        } else if (write) {
            io_uring_prep_writev(sqe, disk->fd, req->iov, req->iov_cnt, offset);
        } else {
            io_uring_prep_readv(sqe, disk->fd, req->iov, req->iov_cnt, offset);
        }
        break;
    }
    case DP_OP_FLUSH:
        io_uring_prep_fsync(sqe, disk->fd, IORING_FSYNC_DATASYNC);
        break;
    case DP_OP_DISCARD:
    case DP_OP_WRITE_ZEROES: {
        int mode = req->falloc_mode;
        if (req->zero_phase == 1)
            mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
        else if (req->zero_phase == 2)
            mode = FALLOC_FL_KEEP_SIZE; /* allocate the zeroed range again */
        io_uring_prep_fallocate(sqe, disk->fd, mode, req->offset, req->len);
        break;
    }
    default:
        /* blk_parse never hands other ops to a backend. */
        io_uring_prep_nop(sqe);
        break;
    }
    io_uring_sqe_set_data64(sqe, (uint64_t)(uintptr_t)req | TAG_REQ);
    return 0;
}

/* After a read or write through the bounce buffer: a short one goes on in
 * the same window; a whole window is copied out (reads) and the next one in
 * (writes). */
static int bounce_window_done(struct blk_req *req)
{
    uint64_t end = bounce_window_end(req);
    if (req->done < end)
        return BACKEND_AGAIN;
    size_t window = (size_t)(end - req->bounce_off);
    if (req->op == DP_OP_READ)
        iov_from_buf(req->iov, req->iov_cnt, req->bounce, window);
    if (req->done >= req->len)
        return 0;
    req->iov = iov_advance(req->iov, &req->iov_cnt, window);
    req->bounce_off = req->done;
    if (req->op == DP_OP_WRITE)
        iov_to_buf(req->iov, req->iov_cnt, 0, req->bounce, bounce_window_end(req) - req->bounce_off);
    return BACKEND_AGAIN;
}

int backend_uring_complete(struct blk_req *req, int res)
{
    if (res == -EAGAIN || res == -EINTR)
        return BACKEND_AGAIN;

    switch (req->op) {
    case DP_OP_READ:
    case DP_OP_WRITE:
        if (res < 0)
            return res;
        /* 0 bytes means EOF: the image shrank under us. Never loop on it. */
        if (res == 0)
            return -EIO;
        req->done += (uint64_t)res;
        if (req->bounce)
            return bounce_window_done(req);
        if (req->done < req->len) {
            req->iov = iov_advance(req->iov, &req->iov_cnt, (size_t)res);
            return BACKEND_AGAIN;
        }
        return 0;
    case DP_OP_WRITE_ZEROES:
        /* Filesystems without FALLOC_FL_ZERO_RANGE (tmpfs): punch the range,
         * then allocate it again, which reads back as zeroes. */
        if (req->zero_phase == 0 && (res == -EOPNOTSUPP || res == -EINVAL) &&
            (req->falloc_mode & FALLOC_FL_ZERO_RANGE)) {
            req->zero_phase = 1;
            return BACKEND_AGAIN;
        }
        if (res >= 0 && req->zero_phase == 1) {
            req->zero_phase = 2;
            return BACKEND_AGAIN;
        }
        return res < 0 ? res : 0;
    default:
        return res < 0 ? res : 0;
    }
}

void backend_uring_release(struct blk_req *req)
{
    req->queue->bounce_bytes -= req->bounce_size;
    req->bounce_size = 0;
    free(req->bounce);
    req->bounce = NULL;
}
