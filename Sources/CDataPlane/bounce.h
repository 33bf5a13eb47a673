/* Bounce buffers: aligned copies of guest buffers O_DIRECT refuses, and the
 * budget that bounds them per queue. Knows requests, not rings or io_uring. */
#ifndef DP_BOUNCE_H
#define DP_BOUNCE_H

#include "dp_internal.h"

struct bounce_pool {
    uint64_t bytes;                 /* in use, against DP_QUEUE_BOUNCE_BUDGET */
    struct blk_req *wait_head;      /* requests waiting for budget, in order */
    struct blk_req *wait_tail;
    struct dp_queue_counters *stats; /* bounces, bounce_bytes_peak */
};

/* Gives req an aligned buffer for its next window (at most DP_BOUNCE_WINDOW
 * of it, from req->done), filled from the guest for writes. -EAGAIN when
 * over budget (or others wait first: queue it with bounce_wait_push),
 * -ENOMEM when none can be had. */
int bounce_take(struct bounce_pool *p, struct blk_req *req, uint32_t align);
/* Frees req's buffer and gives its budget back. */
void bounce_release(struct bounce_pool *p, struct blk_req *req);
/* Over budget: req waits on its pool, in order, until buffers are freed. */
void bounce_wait_push(struct bounce_pool *p, struct blk_req *req);

/* Where the buffer's current window ends, as a request offset. */
static inline uint64_t bounce_window_end(const struct blk_req *req)
{
    uint64_t end = req->bounce_off + req->bounce_size;
    return end < req->len ? end : req->len;
}

#endif
