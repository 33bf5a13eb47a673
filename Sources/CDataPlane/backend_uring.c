/* The io_uring backend: O_DIRECT (or buffered) reads and writes straight into
 * guest memory, fdatasync for FLUSH, fallocate for DISCARD and WRITE_ZEROES. */
#include <errno.h>
#include <linux/falloc.h>
#include <stdlib.h>
#include <sys/uio.h>

#include "backend.h"
#include "blk.h"
#include "guest_mem.h"
#include "loop.h"

/* Handles a CQE for req: 0 when the request is done, a negative errno when
 * it failed, or BACKEND_AGAIN when it must be submitted again (short I/O,
 * -EAGAIN, the write-zeroes fallback). */
#define BACKEND_AGAIN 1

/* O_DIRECT wants buffer addresses and lengths aligned; OR-ing them all
 * together tests every one in a single pass. */
static bool iov_aligned(const struct iovec *iov, uint32_t cnt, uint32_t align)
{
    uintptr_t bits = 0;
    for (uint32_t i = 0; i < cnt; i++)
        bits |= (uintptr_t)iov[i].iov_base | iov[i].iov_len;
    return (bits & (align - 1)) == 0;
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
    STEP_SYNC,                  /* write-through: fdatasync after a fallocate's zeroes */
};

/* The source of STEP_WRITE: aligned for any O_DIRECT. */
#define ZERO_CHUNK (64u << 10)
#define ZERO_IOVS 16u
static _Alignas(ZERO_CHUNK) const uint8_t zero_chunk[ZERO_CHUNK];
_Static_assert(ZERO_IOVS <= DP_REQ_MAX_IOV, "the zero iovecs fit a request's iovec slot");

static enum zeroes_step zeroes_first_step(const struct blk_req *req)
{
    const struct dp_disk *disk = req->ctx->disk;
    if (req->op == DP_OP_DISCARD)
        return disk->is_block_device &&
               !atomic_load_explicit(&disk->discard_cmd_unsupported, memory_order_relaxed)
                   ? STEP_DISCARD_CMD
                   : STEP_PUNCH;
    return req->unmap ? STEP_PUNCH : STEP_ZERO_RANGE;
}

static void zeroes_prep(struct io_uring_sqe *sqe, struct blk_req *req)
{
    struct backend_ctx *c = req->ctx;
    int fd = c->ring_fd;
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
    case STEP_SYNC:
        io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC);
        break;
    default: { /* STEP_WRITE: from where it stands (req->done), in the slot's iovecs */
        struct iovec *iov = c->iov_pool + (size_t)(req - c->reqs) * DP_REQ_MAX_IOV;
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

static int zeroes_step_complete(struct blk_req *req, int res)
{
    struct dp_disk *disk = req->ctx->disk;
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

/* Write-through: zeroes a fallocate made are durable only after a sync
 * (zeroes written by STEP_WRITE carry RWF_DSYNC like any write). Discards
 * promise no data, so they need none. */
static int zeroes_complete(struct blk_req *req, int res)
{
    if (req->zero_phase == STEP_SYNC)
        return res < 0 ? res : 0;
    int ret = zeroes_step_complete(req, res);
    if (ret == 0 && req->op == DP_OP_WRITE_ZEROES && req->zero_phase != STEP_WRITE &&
        atomic_load_explicit(&req->ctx->disk->write_through, memory_order_relaxed)) {
        req->zero_phase = STEP_SYNC;
        return BACKEND_AGAIN;
    }
    return ret;
}

/* ------------------------------------------------------------ prep and complete */

/* The registered buffer that holds [base, base + len), or -1: the queue's
 * memory table is registered on its loop (c->buffers), a piece of at most
 * 1 << DP_BUFFER_PIECE_SHIFT bytes per buffer, and the range lies in one
 * piece. Starts at the region the last one was found in. */
static int fixed_buffer(struct backend_ctx *c, const void *base, size_t len)
{
    const struct buffer_reg *b = c->buffers;
    if (!b || b->first_slot < 0 || !len)
        return -1;
    const struct dp_mem *mem = c->mem;
    uint32_t n = mem->count, i = c->buffer_hint < n ? c->buffer_hint : 0;
    for (uint32_t k = 0; k < n; k++, i = i + 1 == n ? 0 : i + 1) {
        const struct dp_mem_region *r = &mem->regions[i];
        uint64_t off = (uint64_t)((uintptr_t)base - (uintptr_t)r->host_addr);
        if (off >= r->size)
            continue;
        if (len > r->size - off || off >> DP_BUFFER_PIECE_SHIFT != (off + len - 1) >> DP_BUFFER_PIECE_SHIFT)
            return -1;
        c->buffer_hint = i;
        return b->first_slot + b->piece_base[i] + (int)(off >> DP_BUFFER_PIECE_SHIFT);
    }
    return -1;
}

/* A read or write of the guest's buffers: into registered memory
 * (READ_FIXED/WRITE_FIXED: no pages pinned per request), else one segment
 * as READ/WRITE, else READV/WRITEV. */
static void rw_prep(struct io_uring_sqe *sqe, struct backend_ctx *c, struct blk_req *req, uint64_t offset)
{
    bool write = req->op == DP_OP_WRITE;
    int fd = c->ring_fd;
    if (req->iov_cnt == 1 && req->iov[0].iov_len <= UINT32_MAX) {
        void *base = req->iov[0].iov_base;
        unsigned len = (unsigned)req->iov[0].iov_len;
        int index = fixed_buffer(c, base, len);
        if (index >= 0) {
            if (write)
                io_uring_prep_write_fixed(sqe, fd, base, len, offset, index);
            else
                io_uring_prep_read_fixed(sqe, fd, base, len, offset, index);
            STAT_ADD(c->thread_stats->fixed_buffer_ios, 1);
            return;
        }
        if (c->single_rw) {
            if (write)
                io_uring_prep_write(sqe, fd, base, len, offset);
            else
                io_uring_prep_read(sqe, fd, base, len, offset);
            STAT_ADD(c->thread_stats->single_rw_ios, 1);
            return;
        }
    }
    if (write)
        io_uring_prep_writev(sqe, fd, req->iov, req->iov_cnt, offset);
    else
        io_uring_prep_readv(sqe, fd, req->iov, req->iov_cnt, offset);
}

static void uring_req_done(struct loop_op *op, int res, uint32_t cqe_flags);

/* The SQE for req's next step: a read or write (through its bounce buffer,
 * when it has one), a flush, or a discard/write-zeroes step. */
static void uring_prep_sqe(struct io_uring_sqe *sqe, struct backend_ctx *c, struct blk_req *req)
{
    uint64_t offset = req->offset + req->done;
    switch (req->op) {
    case DP_OP_READ:
    case DP_OP_WRITE:
        if (req->bounce) {
            /* Our own buffer, not registered: a plain READ/WRITE. */
            void *buf = (uint8_t *)req->bounce + (req->done - req->bounce_off);
            unsigned len = (unsigned)(bounce_window_end(req) - req->done);
            if (req->op == DP_OP_WRITE)
                io_uring_prep_write(sqe, c->ring_fd, buf, len, offset);
            else
                io_uring_prep_read(sqe, c->ring_fd, buf, len, offset);
        } else {
            rw_prep(sqe, c, req, offset);
        }
        break;
    case DP_OP_FLUSH:
        io_uring_prep_fsync(sqe, c->ring_fd, IORING_FSYNC_DATASYNC);
        break;
    case DP_OP_DISCARD:
    case DP_OP_WRITE_ZEROES:
        zeroes_prep(sqe, req);
        break;
    default:
        /* blk_parse never hands other ops to a backend. */
        io_uring_prep_nop(sqe);
        return;
    }
    /* Write-through: the write is durable before its CQE (and so before the
     * guest hears of it). Set after the prep, which clears rw_flags; only
     * on writes (a fallocate's fields overlap rw_flags' neighbours). */
    if ((sqe->opcode == IORING_OP_WRITE || sqe->opcode == IORING_OP_WRITEV ||
         sqe->opcode == IORING_OP_WRITE_FIXED) &&
        atomic_load_explicit(&c->disk->write_through, memory_order_relaxed))
        sqe->rw_flags |= RWF_DSYNC;
    /* After the prep, which clears the flags: the disk's registered file. */
    if (c->ring_fd_flags) {
        sqe->flags |= c->ring_fd_flags;
        STAT_ADD(c->thread_stats->fixed_file_ios, 1);
    }
}

/* Prepares req's next SQE on its loop; -EBUSY when there is no SQE or no
 * room for its completion, -EAGAIN when it must wait for bounce-buffer
 * budget, -ENOMEM when a bounce buffer cannot be had. */
static int uring_prep(struct backend_ctx *c, struct blk_req *req)
{
    const struct dp_disk *disk = c->disk;
    bool rw = req->op == DP_OP_READ || req->op == DP_OP_WRITE;

    /* Checked again after short I/O too: what is left may have lost its
     * alignment. */
    if (rw && !req->bounce && disk->mem_align && !iov_aligned(req->iov, req->iov_cnt, disk->mem_align)) {
        int ret = bounce_take(&c->bounce, req, disk->mem_align);
        if (ret)
            return ret;
    }
    struct io_uring_sqe *sqe = loop_get_req_sqe(c->uring->loop);
    if (!sqe)
        return -EBUSY;
    uring_prep_sqe(sqe, c, req);
    req->cqe_op.done = uring_req_done;
    io_uring_sqe_set_data64(sqe, (uint64_t)(uintptr_t)&req->cqe_op);
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

static int uring_complete(struct blk_req *req, int res)
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
        if (res < 0 && !req->ctx->disk->mem_align)
            atomic_store_explicit(&req->ctx->disk->flush_error, res, memory_order_relaxed);
        return res < 0 ? res : 0;
    default:
        return res < 0 ? res : 0;
    }
}

/* ------------------------------------------------------------ waiting for SQEs or budget */

static void backlog_push(struct uring_backend *u, struct blk_req *req)
{
    req->next = NULL;
    if (u->backlog_tail)
        u->backlog_tail->next = req;
    else
        u->backlog_head = req;
    u->backlog_tail = req;
}

/* 0 when submitted or waiting (in the loop's backlog, or for budget on its
 * queue), else the error it fails with. */
static int uring_start(struct backend_ctx *c, struct blk_req *req)
{
    struct uring_backend *u = c->uring;
    /* Keep order: while older requests wait for SQEs, newer ones queue behind. */
    if (u->backlog_head) {
        backlog_push(u, req);
        return 0;
    }
    int ret = uring_prep(c, req);
    if (ret == -EBUSY)
        backlog_push(u, req);
    else if (ret == -EAGAIN)
        bounce_wait_push(&c->bounce, req);
    else if (ret)
        return ret;
    return 0;
}

static int uring_submit(struct backend_ctx *c, struct blk_req *req)
{
    int ret = uring_start(c, req);
    return ret ? ret : BACKEND_QUEUED;
}

static void uring_req_done(struct loop_op *op, int res, uint32_t cqe_flags)
{
    (void)cqe_flags;
    struct blk_req *req = dp_container_of(op, struct blk_req, cqe_op);
    struct backend_ctx *c = req->ctx;
    int ret = uring_complete(req, res);
    if (ret == BACKEND_AGAIN) {
        ret = uring_start(c, req);
        if (ret)
            c->io_done(c, req, ret, now_ns());
        return;
    }
    c->io_done(c, req, ret, c->uring->loop->now);
}

void backend_uring_flush(struct uring_backend *u, uint64_t now)
{
    while (u->backlog_head) {
        struct blk_req *req = u->backlog_head;
        int ret = uring_prep(req->ctx, req);
        if (ret == -EBUSY)
            return;
        u->backlog_head = req->next;
        if (!u->backlog_head)
            u->backlog_tail = NULL;
        if (ret == -EAGAIN)
            bounce_wait_push(&req->ctx->bounce, req);
        else if (ret)
            req->ctx->io_done(req->ctx, req, ret, now);
    }
}

/* After completions gave budget back: start what waits for it, in order. */
static void uring_retry_waiting(struct backend_ctx *c, uint64_t now)
{
    struct bounce_pool *p = &c->bounce;
    while (p->wait_head) {
        struct blk_req *req = p->wait_head;
        int ret = uring_prep(c, req);
        if (ret == -EAGAIN || ret == -EBUSY)
            return; /* -EBUSY: no SQE this pass; the buffer, if made, stays with it */
        p->wait_head = req->next;
        if (!p->wait_head)
            p->wait_tail = NULL;
        if (ret)
            c->io_done(c, req, ret, now);
    }
}

/* ------------------------------------------------------------ on a loop */

/* Names the disk and memory on the loop: its registered file and buffers
 * where the loop has them. */
static void uring_buffers_attach(struct backend_ctx *c, struct loop *l)
{
    c->buffers = NULL;
    c->buffer_hint = 0;
    if (!(l->features & DP_URING_FIXED_BUFFERS) || !c->disk->fixed_buffers)
        return;
    c->buffers = loop_buffers_get(l, c->mem);
}

static void uring_attach(struct backend_ctx *c, struct loop *l)
{
    c->single_rw = (l->features & DP_URING_SINGLE_RW) != 0;
    if (l->features & DP_URING_REGISTERED_FILES) {
        int slot = loop_file_get(l, c->disk, c->disk->fd);
        if (slot >= 0) {
            c->file_slot = slot;
            c->ring_fd = slot;
            c->ring_fd_flags = IOSQE_FIXED_FILE;
        }
    }
    uring_buffers_attach(c, l);
}

/* Nothing in flight: what it registered goes with its last user. */
static void uring_detach(struct backend_ctx *c, struct loop *l)
{
    loop_file_put(l, c->file_slot);
    c->file_slot = -1;
    c->ring_fd = c->disk->fd;
    c->ring_fd_flags = 0;
    struct buffer_reg *b = c->buffers;
    c->buffers = NULL;
    loop_buffers_put(l, b);
}

/* The new table is registered before the old one is let go, so that a
 * table the queue keeps is not unpinned and pinned again. */
static void uring_set_mem(struct backend_ctx *c, struct loop *l, const struct dp_mem *old)
{
    (void)old;
    struct buffer_reg *prev = c->buffers;
    uring_buffers_attach(c, l);
    loop_buffers_put(l, prev);
}

const struct backend_ops backend_uring_ops = {
    .submit = uring_submit,
    .attach = uring_attach,
    .detach = uring_detach,
    .set_mem = uring_set_mem,
    .retry_waiting = uring_retry_waiting,
};
