/* The io_uring backend: O_DIRECT (or buffered) reads and writes straight into
 * guest memory, fdatasync for FLUSH, fallocate for DISCARD and WRITE_ZEROES. */
#include <errno.h>
#include <linux/falloc.h>
#include <stdlib.h>

#include "backend.h"
#include "blk.h"
#include "guest_mem.h"

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

/* ------------------------------------------------------------ discard, write zeroes */

/* io_uring's discard command for block devices (Linux 6.12; liburing 2.3
 * predates it): _IO(0x12, 0). */
#define BLOCK_URING_CMD_DISCARD 0x1200u

/* How a DISCARD or WRITE_ZEROES is carried out (req->zero_phase), each step
 * tried when the one before is not supported by the file or device. */
enum zeroes_step {
    STEP_START = 0,             /* chosen from the request and the disk */
    STEP_DISCARD_CMD,           /* block device: a real discard (BLKDISCARD) */
    STEP_PUNCH,                 /* fallocate(PUNCH_HOLE): discard, or zeroes with UNMAP */
    STEP_ZERO_RANGE,            /* fallocate(ZERO_RANGE) */
    STEP_ZERO_RANGE_AFTER_PUNCH, /* the same, once punching was refused */
    STEP_PUNCH_THEN_ALLOCATE,   /* no ZERO_RANGE (tmpfs): punch, ... */
    STEP_ALLOCATE,              /* ... then allocate the range again (reads zeroes) */
    STEP_WRITE,                 /* nothing else works (ext2, vfat): write zeroes */
};

/* The source of STEP_WRITE: aligned for any O_DIRECT. */
#define ZERO_CHUNK (64u << 10)
#define ZERO_IOVS 16u
static _Alignas(ZERO_CHUNK) const uint8_t zero_chunk[ZERO_CHUNK];
_Static_assert(ZERO_IOVS <= DP_REQ_MAX_IOV, "the zero iovecs fit a request's iovec slot");

static enum zeroes_step zeroes_first_step(const struct blk_req *req)
{
    const struct dp_disk *disk = req->queue->disk;
    if (req->op == DP_OP_DISCARD)
        return disk->is_block_device &&
               !atomic_load_explicit(&disk->discard_cmd_unsupported, memory_order_relaxed)
                   ? STEP_DISCARD_CMD
                   : STEP_PUNCH;
    return req->unmap ? STEP_PUNCH : STEP_ZERO_RANGE;
}

static void zeroes_prep(struct io_uring_sqe *sqe, struct blk_req *req)
{
    struct dp_queue *q = req->queue;
    int fd = q->ring_fd;
    if (req->zero_phase == STEP_START)
        req->zero_phase = (uint8_t)zeroes_first_step(req);
    switch (req->zero_phase) {
    case STEP_DISCARD_CMD:
        io_uring_prep_rw(IORING_OP_URING_CMD, sqe, fd, NULL, 0, 0);
        sqe->cmd_op = BLOCK_URING_CMD_DISCARD;
        sqe->addr = req->offset;
        sqe->addr3 = req->len;
        break;
    case STEP_PUNCH:
    case STEP_PUNCH_THEN_ALLOCATE:
        io_uring_prep_fallocate(sqe, fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, req->offset, req->len);
        break;
    case STEP_ZERO_RANGE:
    case STEP_ZERO_RANGE_AFTER_PUNCH:
        io_uring_prep_fallocate(sqe, fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, req->offset, req->len);
        break;
    case STEP_ALLOCATE:
        io_uring_prep_fallocate(sqe, fd, FALLOC_FL_KEEP_SIZE, req->offset, req->len);
        break;
    default: { /* STEP_WRITE: from where it stands (req->done), in the slot's iovecs */
        struct iovec *iov = q->iov_pool + (size_t)(req - q->reqs) * DP_REQ_MAX_IOV;
        uint64_t rest = req->len - req->done;
        unsigned n = 0;
        for (; n < ZERO_IOVS && rest; n++) {
            iov[n].iov_base = (void *)zero_chunk;
            iov[n].iov_len = rest < ZERO_CHUNK ? rest : ZERO_CHUNK;
            rest -= iov[n].iov_len;
        }
        io_uring_prep_writev(sqe, fd, iov, n, req->offset + req->done);
        break;
    }
    }
}

/* What the file or device does not do: try the next way. */
static bool zeroes_unsupported(int res)
{
    return res == -EOPNOTSUPP || res == -EINVAL || res == -ENOTTY;
}

static int zeroes_complete(struct blk_req *req, int res)
{
    struct dp_disk *disk = req->queue->disk;
    enum zeroes_step next;
    switch (req->zero_phase) {
    case STEP_DISCARD_CMD:
        if (!zeroes_unsupported(res))
            return res < 0 ? res : 0;
        atomic_store_explicit(&disk->discard_cmd_unsupported, true, memory_order_relaxed);
        next = STEP_PUNCH;
        break;
    case STEP_PUNCH:
        /* A discard the file cannot do is still done (queue_io_done). */
        if (req->op == DP_OP_DISCARD || !zeroes_unsupported(res))
            return res < 0 ? res : 0;
        next = STEP_ZERO_RANGE_AFTER_PUNCH;
        break;
    case STEP_ZERO_RANGE:
    case STEP_ZERO_RANGE_AFTER_PUNCH:
        if (!zeroes_unsupported(res))
            return res < 0 ? res : 0;
        next = req->zero_phase == STEP_ZERO_RANGE && !disk->is_block_device ? STEP_PUNCH_THEN_ALLOCATE
                                                                              : STEP_WRITE;
        break;
    case STEP_PUNCH_THEN_ALLOCATE:
        if (res < 0 && !zeroes_unsupported(res))
            return res;
        next = res < 0 ? STEP_WRITE : STEP_ALLOCATE;
        break;
    case STEP_ALLOCATE:
        /* The hole reads as zeroes already; allocating it is a courtesy. */
        return res < 0 && res != -EOPNOTSUPP ? res : 0;
    default: /* STEP_WRITE */
        if (res < 0)
            return res;
        if (res == 0)
            return -EIO; /* the image shrank under us: never loop */
        req->done += (uint64_t)res;
        return req->done < req->len ? BACKEND_AGAIN : 0;
    }
    req->zero_phase = (uint8_t)next;
    req->done = 0;
    return BACKEND_AGAIN;
}

/* ------------------------------------------------------------ prep and complete */

/* The registered buffer that holds [base, base + len), or -1: the queue's
 * memory table is registered on its IOThread (q->buffers), a piece of at
 * most 1 << DP_BUFFER_PIECE_SHIFT bytes per buffer, and the range lies in
 * one piece. Starts at the region the last one was found in. */
static int fixed_buffer(struct dp_queue *q, const void *base, size_t len)
{
    const struct buffer_reg *b = q->buffers;
    if (!b || b->first_slot < 0 || !len)
        return -1;
    const struct dp_mem *mem = q->mem;
    uint32_t n = mem->count, i = q->buffer_hint < n ? q->buffer_hint : 0;
    for (uint32_t k = 0; k < n; k++, i = i + 1 == n ? 0 : i + 1) {
        const struct dp_mem_region *r = &mem->regions[i];
        uint64_t off = (uint64_t)((uintptr_t)base - (uintptr_t)r->host_addr);
        if (off >= r->size)
            continue;
        if (len > r->size - off || off >> DP_BUFFER_PIECE_SHIFT != (off + len - 1) >> DP_BUFFER_PIECE_SHIFT)
            return -1;
        q->buffer_hint = i;
        return b->first_slot + b->piece_base[i] + (int)(off >> DP_BUFFER_PIECE_SHIFT);
    }
    return -1;
}

/* A read or write of the guest's buffers: into registered memory
 * (READ_FIXED/WRITE_FIXED: no pages pinned per request), else one segment
 * as READ/WRITE, else READV/WRITEV. */
static void rw_prep(struct io_uring_sqe *sqe, struct dp_queue *q, struct blk_req *req, uint64_t offset)
{
    bool write = req->op == DP_OP_WRITE;
    int fd = q->ring_fd;
    if (req->iov_cnt == 1 && req->iov[0].iov_len <= UINT32_MAX) {
        void *base = req->iov[0].iov_base;
        unsigned len = (unsigned)req->iov[0].iov_len;
        int index = fixed_buffer(q, base, len);
        if (index >= 0) {
            if (write)
                io_uring_prep_write_fixed(sqe, fd, base, len, offset, index);
            else
                io_uring_prep_read_fixed(sqe, fd, base, len, offset, index);
            STAT_ADD(q->thread_stats->fixed_buffer_ios, 1);
            return;
        }
        if (q->single_rw) {
            if (write)
                io_uring_prep_write(sqe, fd, base, len, offset);
            else
                io_uring_prep_read(sqe, fd, base, len, offset);
            STAT_ADD(q->thread_stats->single_rw_ios, 1);
            return;
        }
    }
    if (write)
        io_uring_prep_writev(sqe, fd, req->iov, req->iov_cnt, offset);
    else
        io_uring_prep_readv(sqe, fd, req->iov, req->iov_cnt, offset);
}

int backend_uring_prep(struct dp_iothread *t, struct blk_req *req)
{
    struct dp_queue *q = req->queue;
    const struct dp_disk *disk = q->disk;
    bool rw = req->op == DP_OP_READ || req->op == DP_OP_WRITE;

    /* Checked again after short I/O too: what is left may have lost its
     * alignment. */
    if (rw && !req->bounce && disk->mem_align && !iov_aligned(req->iov, req->iov_cnt, disk->mem_align)) {
        int ret = bounce_setup(req, disk->mem_align);
        if (ret)
            return ret;
    }
    struct io_uring_sqe *sqe = iothread_get_req_sqe(t);
    if (!sqe)
        return -EBUSY;

    uint64_t offset = req->offset + req->done;
    switch (req->op) {
    case DP_OP_READ:
    case DP_OP_WRITE:
        if (req->bounce) {
            /* Our own buffer, not registered: a plain READ/WRITE. */
            void *buf = (uint8_t *)req->bounce + (req->done - req->bounce_off);
            unsigned len = (unsigned)(bounce_window_end(req) - req->done);
            if (req->op == DP_OP_WRITE)
                io_uring_prep_write(sqe, q->ring_fd, buf, len, offset);
            else
                io_uring_prep_read(sqe, q->ring_fd, buf, len, offset);
        } else {
            rw_prep(sqe, q, req, offset);
        }
        break;
    case DP_OP_FLUSH:
        io_uring_prep_fsync(sqe, q->ring_fd, IORING_FSYNC_DATASYNC);
        break;
    case DP_OP_DISCARD:
    case DP_OP_WRITE_ZEROES:
        zeroes_prep(sqe, req);
        break;
    default:
        /* blk_parse never hands other ops to a backend. */
        io_uring_prep_nop(sqe);
        io_uring_sqe_set_data64(sqe, (uint64_t)(uintptr_t)req | TAG_REQ);
        return 0;
    }
    /* After the prep, which clears the flags: the disk's registered file. */
    if (q->ring_fd_flags) {
        sqe->flags |= q->ring_fd_flags;
        STAT_ADD(q->thread_stats->fixed_file_ios, 1);
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
    case DP_OP_DISCARD:
    case DP_OP_WRITE_ZEROES:
        return zeroes_complete(req, res);
    case DP_OP_FLUSH:
        /* Without O_DIRECT a failed fdatasync leaves the pages it could not
         * write marked clean: the next one would succeed without them. */
        if (res < 0 && !req->queue->disk->mem_align)
            atomic_store_explicit(&req->queue->disk->flush_error, res, memory_order_relaxed);
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
