/* Bounce buffers and their budget. The rare path (Linux guests align their
 * buffers), so it may allocate. */
#include <errno.h>
#include <stdlib.h>

#include "blk.h"
#include "bounce.h"

int bounce_take(struct bounce_pool *p, struct blk_req *req, uint32_t align)
{
    uint64_t rest = req->len - req->done;
    uint64_t size = rest < DP_BOUNCE_WINDOW ? rest : DP_BOUNCE_WINDOW;
    if (!size)
        size = align;
    /* Waiters go first, in order: smaller requests must not keep taking the
     * budget a large one waits for. One request is always admitted. */
    if ((p->wait_head && p->wait_head != req) ||
        (p->bytes && (p->bytes >= DP_QUEUE_BOUNCE_BUDGET || size > DP_QUEUE_BOUNCE_BUDGET - p->bytes)))
        return -EAGAIN;
    void *buf;
    if (posix_memalign(&buf, align, size))
        return -ENOMEM;
    req->bounce = buf;
    req->bounce_size = size;
    req->bounce_off = req->done;
    if (req->op == DP_OP_WRITE)
        iov_to_buf(req->iov, req->iov_cnt, 0, buf, bounce_window_end(req) - req->bounce_off);
    p->bytes += size;
    STAT_ADD(p->stats->bounces, 1);
    if (p->bytes > STAT_LOAD(p->stats->bounce_bytes_peak))
        STAT_SET(p->stats->bounce_bytes_peak, p->bytes);
    return 0;
}

void bounce_release(struct bounce_pool *p, struct blk_req *req)
{
    p->bytes -= req->bounce_size;
    req->bounce_size = 0;
    free(req->bounce);
    req->bounce = NULL;
}

/* Waits on its pool, not in the thread's backlog, where it would hold up
 * other queues and requests that already have their buffer (a short read
 * going round again). */
void bounce_wait_push(struct bounce_pool *p, struct blk_req *req)
{
    req->next = NULL;
    if (p->wait_tail)
        p->wait_tail->next = req;
    else
        p->wait_head = req;
    p->wait_tail = req;
}
