/* Backends: turn a parsed request into I/O. They know requests, disks and
 * guest memory, not rings or queue state: what they need of the queue a
 * request came from is its backend_ctx, and they answer through it. */
#ifndef DP_BACKEND_H
#define DP_BACKEND_H

#include "bounce.h"
#include "dp_internal.h"

struct loop;
struct buffer_reg;
struct backend_ctx;

/* submit's answer when the result comes later, through ctx->io_done. */
#define BACKEND_QUEUED 1

struct backend_ops {
    /* Starts req: BACKEND_QUEUED, or its result now (0 or -errno). */
    int (*submit)(struct backend_ctx *ctx, struct blk_req *req);
    /* Optional. The queue joins (leaves) an IOThread's loop: name the disk
     * and memory there (registered file and buffers). */
    void (*attach)(struct backend_ctx *ctx, struct loop *l);
    void (*detach)(struct backend_ctx *ctx, struct loop *l);
    /* Optional. A new memory table, nothing in flight: ctx->mem is already it. */
    void (*set_mem)(struct backend_ctx *ctx, struct loop *l, const struct dp_mem *old);
    /* Optional. Starts what waits for resources freed since (bounce budget). */
    void (*retry_waiting)(struct backend_ctx *ctx, uint64_t now);
    /* No cancel yet: a stop or pause drains what is in flight instead. */
};

extern const struct backend_ops backend_null_ops;
extern const struct backend_ops backend_uring_ops;

/* The io_uring backend's per-loop state: requests waiting for an SQE. */
struct uring_backend {
    struct loop *loop;
    struct blk_req *backlog_head;
    struct blk_req *backlog_tail;
};

/* One queue's side of its backend: set up by the queue, used by the backend. */
struct backend_ctx {
    const struct backend_ops *ops;
    struct dp_disk *disk;
    struct dp_mem *mem;
    /* The answer to a BACKEND_QUEUED request: 0 or -errno (never called
     * from inside submit). */
    void (*io_done)(struct backend_ctx *ctx, struct blk_req *req, int res, uint64_t now);
    struct uring_backend *uring;    /* its IOThread's, while attached */
    struct blk_req *reqs;           /* the queue's slots, and their iovecs */
    struct iovec *iov_pool;         /* (slots * DP_REQ_MAX_IOV): scratch for the zeroes fallback */
    /* How the disk and memory are named on the loop, set on attach and on
     * a memory swap: the disk fd or its registered slot (ring_fd_flags),
     * and the registered memory table (NULL: none). */
    int32_t ring_fd;
    int32_t file_slot;              /* -1: not registered */
    uint8_t ring_fd_flags;          /* IOSQE_FIXED_FILE when ring_fd is a registered file */
    bool single_rw;                 /* one-segment reads and writes as READ/WRITE (probed) */
    struct buffer_reg *buffers;
    uint32_t buffer_hint;           /* the region the last fixed buffer was in */
    struct bounce_pool bounce;
    struct dp_thread_counters *thread_stats;
};

/* Fault injection (dp_disk_inject_fault) and a sticky flush error, in
 * front of every backend: 0, or the negative errno req fails with. */
int backend_fault_check(struct dp_disk *disk, const struct blk_req *req);

/* Starts req on ctx's backend, through fault injection: checked inline
 * only as far as the common case (nothing injected, not a flush) needs. */
static inline int backend_submit(struct backend_ctx *ctx, struct blk_req *req)
{
    if (atomic_load_explicit(&ctx->disk->fault_error, memory_order_relaxed) || req->op == DP_OP_FLUSH) {
        int fault = backend_fault_check(ctx->disk, req);
        if (fault)
            return fault;
    }
    return ctx->ops->submit(ctx, req);
}

/* Gives back what a backend took for req (a bounce buffer) when it is
 * completed, held or requeued. */
static inline void backend_release(struct backend_ctx *ctx, struct blk_req *req)
{
    if (req->bounce)
        bounce_release(&ctx->bounce, req);
}

/* io_uring: submits what waits in the loop's backlog, in order. */
void backend_uring_flush(struct uring_backend *u, uint64_t now);

#endif
