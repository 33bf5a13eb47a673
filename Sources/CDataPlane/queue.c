/* A virtqueue's hot path: pops chains, hands them to the blk layer and a
 * backend, pushes completions and notifies the guest in groups (the
 * notification policy: queue_complete). */
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"
#include "blk.h"
#include "loop.h"
#include "queue.h"

bool queue_accepts_work(const struct dp_queue *q)
{
    return q->attached && !q->paused && !q->error_stopped && !q->stopping && !q->broken && q->free_count &&
           !q->throttled;
}

bool queue_can_pop(const struct dp_queue *q)
{
    return queue_accepts_work(q) &&
           (q->resubmit_next < q->resubmit_count || vring_has_avail(&q->vr));
}

void queue_break(struct dp_queue *q, int reason)
{
    if (q->broken)
        return;
    q->broken = true;
    STAT_SET(q->stats.broken_reason, reason);
    STAT_SET(q->stats.broken, 1);
    queue_signal(q, DP_SIGNAL_ERR);
}

void queue_break_loop_failed(struct dp_queue *q, int err)
{
    if (q->broken)
        return;
    q->broken = true;
    /* The thread's own stats keep err; the queue says why it broke. */
    STAT_SET(q->stats.broken_reason, err == -EBADR ? -EBADR : -ECANCELED);
    STAT_SET(q->stats.broken, 1);
    /* Directly: the ring may not carry it. */
    if (q->config.err_fd >= 0) {
        uint64_t one = 1;
        ssize_t r = write(q->config.err_fd, &one, sizeof(one));
        (void)r;
    }
}

/* A request's copy of its writable iovecs (dirty logging only). */
static struct iovec *queue_log_iov(const struct dp_queue *q, const struct blk_req *req)
{
    return q->log_iov + (size_t)(req - q->reqs) * DP_REQ_MAX_IOV;
}

/* Every byte a request may have written to the guest: its writable
 * iovecs as walked, and the status byte (also for a chain that failed its
 * walk, which has no copy). Over-marks a failed read's pages: harmless. */
static void queue_log_request(struct dp_queue *q, const struct blk_req *req)
{
    dirty_log_iov(&q->log, q->io.mem, queue_log_iov(q, req), req->log_cnt);
    if (req->status)
        dirty_log_host(&q->log, q->io.mem, req->status, 1);
}

void queue_log_rings(struct dp_queue *q)
{
    struct iovec areas[2];
    unsigned n = vring_device_areas(&q->vr, areas);
    dirty_log_iov(&q->log, q->io.mem, areas, n);
}

void queue_complete(struct dp_queue *q, struct blk_req *req, uint8_t status, uint64_t now)
{
    /* pushed[] holds nslots heads. One pass can complete more than that
     * before its publish (reaped completions, then requests that finish at
     * once while popping, resubmitted ones first): publish early then, before
     * this request's used element, so no published head stays marked. */
    if (q->inflight && q->pushed_count == q->nslots)
        queue_publish_and_notify(q);
    uint32_t used_len = 0;
    if (req->status) {
        __atomic_store_n(req->status, status, __ATOMIC_RELAXED);
        used_len = (status == VIRTIO_BLK_S_OK ? req->data_in_len : 0) + 1;
    }
    backend_release(&q->io, req);
    if (dirty_log_on(&q->log))
        queue_log_request(q, req);
    vring_push(&q->vr, req->head, used_len, req->ring_descs);

    STAT_ADD(q->stats.ops[req->op], 1);
    if (status == VIRTIO_BLK_S_OK) {
        if (req->op == DP_OP_READ)
            STAT_ADD(q->stats.bytes_read, req->len);
        else if (req->op == DP_OP_WRITE)
            STAT_ADD(q->stats.bytes_written, req->len);
    }
    STAT_ADD(q->stats.latency_hist[stats_log2_bucket(now - req->start_ns, DP_LATENCY_BUCKETS)], 1);

    if (q->inflight)
        q->pushed[q->pushed_count++] = req->head;
    q->head_slot[req->head] = 0;
    q->free_slots[q->free_count++] = (uint16_t)(req - q->reqs);
    q->in_flight--;
    q->dirty = true;
    /* The notification policy. Used elements are published, and the guest
     * signalled if it asked (EVENT_IDX), at the end of each queue's share
     * of a pass; a share is bounded (DP_QUEUE_PASS_BUDGET descriptors, or
     * DP_QUEUE_PASS_NS once past a few), so completions reach a guest in
     * groups, never a whole deep queue at once. With notify_after, the
     * first notify_after completions of a pass go out at once as well: a
     * guest that sleeps until its interrupt starts waking while we finish
     * the rest, which it reaps in the same wake-up. Once per pass only:
     * repeated mid-pass groups cost the guest a wake-up and us a syscall
     * each, and measured slower (bench/RESULTS.md, "Notification policy"). */
    if (q->notify_after && !q->early_published && ++q->unpublished >= q->notify_after) {
        q->early_published = true;
        if (queue_publish_and_notify(q))
            loop_enter(q->loop, 0);
    }
}

/* A chain the guest cannot be answered on: no status byte to write, or a
 * shape that needs guessing. Completing it would leave the guest reading
 * whatever byte its status held (0 is VIRTIO_BLK_S_OK: a write it believes
 * done), so the ring is broken instead (DEVICE_NEEDS_RESET), as QEMU does. */
static bool queue_reject_chain(struct dp_queue *q, int reason)
{
    STAT_ADD(q->stats.errors[DP_ERR_BAD_REQUEST], 1);
    queue_break(q, reason);
    return false;
}

/* Takes a free slot for head and marks it in flight; NULL (nothing
 * taken) when the inflight region refuses the mark (inflight_mark). */
static struct blk_req *queue_take_slot(struct dp_queue *q, uint16_t head, uint16_t ring_descs, bool resubmit,
                                       uint64_t now, int *err)
{
    if (q->inflight && (*err = inflight_mark(q, head, ring_descs, resubmit)))
        return NULL;
    uint16_t slot = q->free_slots[--q->free_count];
    struct blk_req *req = &q->reqs[slot];
    q->head_slot[head] = (uint16_t)(slot + 1);
    q->in_flight++;
    req->head = head;
    req->ring_descs = ring_descs;
    req->log_cnt = 0;
    req->start_ns = now;
    return req;
}

/* Walks the chain at head into the iovecs of the slot it will take (taken
 * only once it can be answered). Returns 0 or the walk's fault; *status is
 * the byte to answer on, NULL when the chain has none. A packed buffer
 * popped before (resubmit) is walked from the copies of its ring
 * descriptors the inflight region kept: its ring slots may hold used
 * descriptors by now. */
static int queue_walk(struct dp_queue *q, uint16_t head, bool resubmit, struct vring_chain *chain, uint8_t **status)
{
    *chain = (struct vring_chain){
        .iov = q->iov_pool + (size_t)q->free_slots[q->free_count - 1] * DP_REQ_MAX_IOV,
        .iov_max = DP_REQ_MAX_IOV,
        .scratch = q->indirect_scratch,
        .ring_copy = q->ipk.ring_copy,
    };
    *status = NULL;
    int saved = 0;
    if (resubmit && q->vr.layout == VRING_LAYOUT_PACKED) {
        saved = inflight_saved(q, head);
        if (saved < 0)
            return saved;
        chain->ring_copy = NULL; /* the copies are the walk's input */
    }
    int ret = saved ? vring_packed_walk_saved(&q->vr.packed, q->io.mem, chain, q->ipk.ring_copy, (uint16_t)saved, head)
                    : vring_walk(&q->vr, q->io.mem, head, chain);
    if (ret == 0) {
        *status = chain->status;
        if (!*status)
            ret = -ENOMSG;
    } else {
        /* Stopped at the first fault: is there a status byte to answer on? */
        int found = saved ? vring_packed_status_saved(&q->vr.packed, q->io.mem, chain, q->ipk.ring_copy,
                                                      (uint16_t)saved, head, status)
                          : vring_status(&q->vr, q->io.mem, head, chain, status);
        if (found < 0)
            ret = found;
    }
    return ret;
}

/* ------------------------------------------------------------ I/O limits */

static void throttle_timer_done(struct loop_op *op, int res, uint32_t cqe_flags)
{
    (void)res, (void)cqe_flags;
    struct dp_queue *q = dp_container_of(op, struct dp_queue, throttle_timer);
    /* The pass that reaped this looks at the waiting request next
     * (queue_pop_batch): no work here. */
    q->throttle_timer_armed = false;
}

/* One timer a queue: for when its bucket allows the waiting request, but
 * no later than DP_THROTTLE_RECHECK_NS, so that a changed limit is seen. */
static void queue_throttle_arm(struct dp_queue *q, uint64_t wait)
{
    if (q->throttle_timer_armed)
        return;
    if (wait > DP_THROTTLE_RECHECK_NS)
        wait = DP_THROTTLE_RECHECK_NS;
    q->throttle_ts.tv_sec = 0;
    q->throttle_ts.tv_nsec = (long long)wait;
    q->throttle_timer.done = throttle_timer_done;
    if (loop_arm_timeout(q->loop, &q->throttle_ts, &q->throttle_timer)) {
        q->loop->rearm_pending = true; /* the next pass arms it */
        return;
    }
    q->throttle_timer_armed = true;
}

/* With I/O limits: true when req may start now (it is counted); else it
 * waits in q->throttled and the queue takes nothing more. */
static bool queue_throttle_admit(struct dp_queue *q, struct blk_req *req, uint64_t now)
{
    int dir = throttle_direction(req->op);
    if (dir < 0)
        return true;
    uint64_t wait = throttle_wait(q->throttle, dir, now);
    if (!wait) {
        throttle_account(q->throttle, dir, req->len, now);
        return true;
    }
    q->throttled = req;
    q->throttled_since = now;
    STAT_ADD(q->stats.throttled, 1);
    queue_throttle_arm(q, wait);
    return false;
}

/* The waiting request starts once its limit allows, or at once when the
 * limits went or the queue is to drain (a stop, pause or memory swap must
 * not wait for a bucket: QEMU lifts its limits during a drain too). True
 * when it started. */
static bool queue_throttle_release(struct dp_queue *q, uint64_t now)
{
    struct blk_req *req = q->throttled;
    if (q->throttle && !q->drain_waiter && !q->stopping && !q->paused) {
        int dir = throttle_direction(req->op);
        uint64_t wait = throttle_wait(q->throttle, dir, now);
        if (wait) {
            queue_throttle_arm(q, wait);
            return false;
        }
        throttle_account(q->throttle, dir, req->len, now);
    }
    q->throttled = NULL;
    STAT_ADD(q->stats.throttled_ns, now - q->throttled_since);
    queue_submit_io(q, req, now);
    return true;
}

/* A walked chain becomes a request: parsed, then answered at once or
 * handed to the backend (with fail_io, failed instead). */
static void queue_run(struct dp_queue *q, struct blk_req *req, struct vring_chain *chain, uint64_t now,
                      bool fail_io)
{
    uint32_t iovecs = chain->out_num + chain->in_num;
    if (dirty_log_on(&q->log)) {
        /* Before parsing, which trims the status byte off them. */
        memcpy(queue_log_iov(q, req), chain->iov + chain->out_num, chain->in_num * sizeof(struct iovec));
        req->log_cnt = (uint16_t)chain->in_num;
    }
    if (iovecs > q->longest_chain) {
        q->longest_chain = iovecs;
        STAT_SET(q->stats.longest_chain, iovecs);
    }
    enum dp_err err;
    int result = blk_parse(q->io.disk, chain, req, &err);
    if (err != DP_ERR_COUNT)
        STAT_ADD(q->stats.errors[err], 1);
    if (result != BLK_NEEDS_IO)
        queue_complete(q, req, (uint8_t)result, now);
    else if (fail_io)
        queue_complete(q, req, VIRTIO_BLK_S_IOERR, now);
    else if (!q->throttle || queue_throttle_admit(q, req, now))
        queue_submit_io(q, req, now);
}

bool queue_start(struct dp_queue *q, uint16_t head, uint64_t now, bool fail_io, bool resubmit, uint32_t *cost)
{
    /* The same head twice in flight would be pushed twice: the guest broke
     * the ring (also by reusing a packed id that waits to run again). */
    if (q->head_slot[head] || (!resubmit && inflight_holds(q, head))) {
        queue_break(q, -EBUSY);
        return false;
    }
    struct vring_chain chain;
    uint8_t *status;
    int ret = queue_walk(q, head, resubmit, &chain, &status);
    *cost += chain.desc_reads;
    if (!status)
        return queue_reject_chain(q, ret);

    int err = 0;
    struct blk_req *req = queue_take_slot(q, head, chain.ring_descs, resubmit, now, &err);
    if (!req) {
        queue_break(q, err);
        return false;
    }
    if (ret < 0) {
        /* One buffer of a well-formed chain is bad: that request fails. */
        req->status = status;
        req->op = DP_OP_OTHER;
        req->bounce = NULL;
        STAT_ADD(q->stats.errors[DP_ERR_BAD_REQUEST], 1);
        queue_complete(q, req, VIRTIO_BLK_S_IOERR, now);
        return true;
    }
    queue_run(q, req, &chain, now, fail_io);
    return true;
}

/* The backend's answer to a request it queued. */
void queue_backend_done(struct backend_ctx *c, struct blk_req *req, int res, uint64_t now)
{
    queue_io_done(dp_container_of(c, struct dp_queue, io), req, res, now);
}

void queue_submit_io(struct dp_queue *q, struct blk_req *req, uint64_t now)
{
    int ret = backend_submit(&q->io, req);
    if (ret != BACKEND_QUEUED)
        queue_io_done(q, req, ret, now);
}

/* The error policy stops the queue: req is kept, in order, and no new
 * requests are taken; resume retries it (queue_ctl.c). */
static void queue_hold(struct dp_queue *q, struct blk_req *req, int res)
{
    /* A held request gives its bounce budget back, or requests waiting for
     * budget would wait until resume; the retry starts its window over. */
    if (req->bounce) {
        req->done = req->bounce_off;
        backend_release(&q->io, req);
    }
    req->next = NULL;
    if (q->held_tail)
        q->held_tail->next = req;
    else
        q->held_head = req;
    q->held_tail = req;
    q->held_count++;
    STAT_SET(q->stats.error_held, q->held_count + q->resubmit_held);
    if (!q->error_stopped) {
        q->error_stopped = true;
        STAT_SET(q->stats.error_stop_reason, res);
        STAT_SET(q->stats.error_stopped, 1);
    }
}

void queue_io_done(struct dp_queue *q, struct blk_req *req, int res, uint64_t now)
{
    /* DISCARD is advisory (QEMU treats it so): one the file or device
     * cannot do is done, and never stops a queue. */
    if (res == -EOPNOTSUPP && req->op == DP_OP_DISCARD)
        res = 0;
    if (res >= 0) {
        queue_complete(q, req, VIRTIO_BLK_S_OK, now);
        return;
    }
    STAT_ADD(q->stats.errors[DP_ERR_IO], 1);
    int policy = req->op == DP_OP_READ ? q->io.disk->read_policy : q->io.disk->write_policy;
    if (policy == DP_POLICY_IGNORE) {
        STAT_ADD(q->stats.errors_ignored, 1);
        queue_complete(q, req, VIRTIO_BLK_S_OK, now);
        return;
    }
    if (policy == DP_POLICY_STOP || (policy == DP_POLICY_ENOSPC && res == -ENOSPC)) {
        queue_hold(q, req, res);
        return;
    }
    queue_complete(q, req, VIRTIO_BLK_S_IOERR, now);
}

/* Pops one head off the avail ring and starts it. */
static bool queue_pop_one(struct dp_queue *q, uint64_t now, uint32_t *cost)
{
    uint16_t head;
    int ret = vring_pop_head(&q->vr, &head);
    if (ret == -EAGAIN)
        return false; /* a packed ring with nothing more available */
    if (ret) {
        queue_break(q, ret);
        return false;
    }
    vring_prefetch_next(&q->vr);
    return queue_start(q, head, now, false, false, cost);
}

/* What the chains walked so far in this pass cost (descriptors read, and
 * time once they are many), against the queue's share of a pass. What is
 * left waits for the next pass, after the thread's other queues. */
struct pass_budget {
    uint32_t cost;
    uint32_t next_clock; /* cost at which the clock is read next */
    uint64_t start_ns;
    bool spent;
};

static bool pass_budget_left(struct pass_budget *b)
{
    if (b->cost >= b->next_clock) {
        b->next_clock = b->cost + DP_QUEUE_PASS_CLOCK_EVERY;
        b->spent |= now_ns() - b->start_ns >= DP_QUEUE_PASS_NS;
    }
    b->spent |= b->cost >= DP_QUEUE_PASS_BUDGET;
    return !b->spent;
}

unsigned queue_pop_batch(struct dp_queue *q, uint64_t now)
{
    q->budget_spent = false;
    /* Acquire: dp_disk_set_throttle published the buckets before it. */
    q->throttle = atomic_load_explicit(&q->io.disk->throttle, memory_order_acquire);
    /* The request that waited for its limit is work (the pass goes on),
     * but was popped and counted before. */
    unsigned released = 0;
    if (q->throttled) {
        if (!queue_throttle_release(q, now))
            return 0;
        released = 1;
    }
    if (!queue_can_pop(q))
        return released;
    unsigned popped = 0;
    /* One clock read per queue with work per pass: its own start (the
     * pass's may be long past, spent on completions and other queues). */
    struct pass_budget budget = {.next_clock = DP_QUEUE_PASS_CLOCK_EVERY, .start_ns = now_ns()};
    uint32_t *cost = &budget.cost;
    /* Requests in flight when the previous backend went away come first. */
    while (q->resubmit_next < q->resubmit_count && q->free_count && !q->error_stopped && !q->throttled &&
           pass_budget_left(&budget) && queue_start(q, queue_resubmit_take(q), now, false, true, cost))
        popped++;
    /* Heads still waiting to run again were popped before anything new. */
    if (q->resubmit_next >= q->resubmit_count && pass_budget_left(&budget)) {
        int avail = vring_avail_count(&q->vr);
        if (avail < 0) {
            queue_break(q, avail);
            return popped + released;
        }
        unsigned n = (unsigned)avail < q->free_count ? (unsigned)avail : q->free_count;
        /* Like QEMU's werror=stop, the requests of a batch already fetched go
         * on; an error-policy stop holds back the batches after it. */
        for (unsigned i = 0; i < n && !q->throttled && pass_budget_left(&budget) && queue_pop_one(q, now, cost); i++)
            popped++;
    }
    q->budget_spent = budget.spent && queue_can_pop(q);
    if (popped) {
        STAT_ADD(q->stats.batches, 1);
        STAT_ADD(q->stats.batch_hist[stats_log2_bucket(popped, DP_BATCH_BUCKETS)], 1);
        if (!q->kicked)
            STAT_ADD(q->stats.polls, popped);
        q->kicked = false;
        STAT_SET(q->stats.last_avail_idx, vring_last_avail_idx(&q->vr));
        STAT_SET(q->stats.in_flight, q->in_flight);
    }
    return popped + released;
}

bool queue_publish_and_notify(struct dp_queue *q)
{
    if (!q->dirty)
        return false;
    q->dirty = false;
    q->unpublished = 0;
    if (q->inflight)
        inflight_publish_begin(q);
    vring_publish(&q->vr);
    if (dirty_log_on(&q->log))
        queue_log_rings(q);
    if (q->inflight)
        inflight_clear_published(q);
    STAT_SET(q->stats.used_idx, vring_used_idx(&q->vr));
    STAT_SET(q->stats.in_flight, q->in_flight);
    if (q->config.call_fd >= 0 && vring_should_notify(&q->vr)) {
        queue_signal(q, DP_SIGNAL_CALL);
        STAT_ADD(q->stats.notifies, 1);
        return true;
    }
    STAT_ADD(q->stats.notifies_suppressed, 1);
    return false;
}

