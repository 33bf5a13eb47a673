/* A virtqueue of a disk: pops chains, hands them to the blk layer and a
 * backend, pushes completions and notifies the guest in groups (the
 * notification policy: queue_complete). */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "blk.h"
#include "dp_internal.h"

bool queue_accepts_work(const struct dp_queue *q)
{
    return q->attached && !q->paused && !q->error_stopped && !q->stopping && !q->broken && q->free_count;
}

bool queue_can_pop(const struct dp_queue *q)
{
    return queue_accepts_work(q) &&
           (q->resubmit_next < q->resubmit_count || vring_split_has_avail(&q->vr));
}

void queue_break(struct dp_queue *q, int reason)
{
    if (q->broken)
        return;
    q->broken = true;
    STAT_SET(q->stats.broken_reason, reason);
    STAT_SET(q->stats.broken, 1);
    iothread_signal(q, DP_SIGNAL_ERR);
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
    if (req->bounce)
        backend_uring_release(req);
    vring_split_push(&q->vr, req->head, used_len);

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
            iothread_flush(q->thread);
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

/* Takes a free slot for head and marks it in flight. */
static struct blk_req *queue_take_slot(struct dp_queue *q, uint16_t head, uint64_t now)
{
    uint16_t slot = q->free_slots[--q->free_count];
    struct blk_req *req = &q->reqs[slot];
    q->head_slot[head] = (uint16_t)(slot + 1);
    q->in_flight++;
    if (q->inflight)
        inflight_mark(q, head);
    req->head = head;
    req->start_ns = now;
    return req;
}

/* Starts the chain at head (with fail_io, a request that needs I/O fails
 * instead). Adds the descriptors it read to *cost. Returns false when the
 * ring is broken. */
static bool queue_start(struct dp_queue *q, uint16_t head, uint64_t now, bool fail_io, uint32_t *cost)
{
    /* The same head twice in flight would be pushed twice: the guest broke the ring. */
    if (q->head_slot[head]) {
        queue_break(q, -EBUSY);
        return false;
    }
    /* Walked into the slot it will take; taken only once it can be answered. */
    struct vring_chain chain = {
        .iov = q->iov_pool + (size_t)q->free_slots[q->free_count - 1] * DP_REQ_MAX_IOV,
        .iov_max = DP_REQ_MAX_IOV,
        .scratch = q->indirect_scratch,
    };
    int ret = vring_split_walk(&q->vr, q->mem, head, &chain);
    uint8_t *status = NULL;
    if (ret == 0) {
        status = chain.status;
        if (!status)
            ret = -ENOMSG;
    } else {
        /* Stopped at the first fault: is there a status byte to answer on? */
        int found = vring_split_status(&q->vr, q->mem, head, &chain, &status);
        if (found < 0)
            ret = found;
    }
    *cost += chain.desc_reads;
    if (!status)
        return queue_reject_chain(q, ret);

    struct blk_req *req = queue_take_slot(q, head, now);
    if (ret < 0) {
        /* One buffer of a well-formed chain is bad: that request fails. */
        req->status = status;
        req->op = DP_OP_OTHER;
        req->bounce = NULL;
        STAT_ADD(q->stats.errors[DP_ERR_BAD_REQUEST], 1);
        queue_complete(q, req, VIRTIO_BLK_S_IOERR, now);
        return true;
    }
    uint32_t iovecs = chain.out_num + chain.in_num;
    if (iovecs > q->longest_chain) {
        q->longest_chain = iovecs;
        STAT_SET(q->stats.longest_chain, iovecs);
    }
    enum dp_err err;
    int result = blk_parse(q->disk, &chain, req, &err);
    if (err != DP_ERR_COUNT)
        STAT_ADD(q->stats.errors[err], 1);
    if (result != BLK_NEEDS_IO)
        queue_complete(q, req, (uint8_t)result, now);
    else if (fail_io)
        queue_complete(q, req, VIRTIO_BLK_S_IOERR, now);
    else
        queue_submit_io(q, req, now);
    return true;
}

/* Fault injection: 0, or the negative errno this request fails with. */
static int fault_check(struct dp_disk *d, const struct blk_req *req)
{
    int32_t error = atomic_load_explicit(&d->fault_error, memory_order_relaxed);
    if (!error || !(atomic_load_explicit(&d->fault_ops, memory_order_relaxed) & (1u << req->op)))
        return 0;
    uint64_t start = atomic_load_explicit(&d->fault_start, memory_order_relaxed);
    uint64_t end = atomic_load_explicit(&d->fault_end, memory_order_relaxed);
    bool ranged = req->op != DP_OP_FLUSH;
    uint64_t first = req->offset / 512, last = (req->offset + req->len) / 512;
    if (ranged && (last <= start || (end && first >= end)))
        return 0;
    uint64_t n = atomic_fetch_add_explicit(&d->fault_seen, 1, memory_order_relaxed) + 1;
    uint64_t after = atomic_load_explicit(&d->fault_after, memory_order_relaxed);
    uint32_t every = atomic_load_explicit(&d->fault_every, memory_order_relaxed);
    if (n <= after || (every > 1 && (n - after) % every))
        return 0;
    return -error;
}

void queue_submit_io(struct dp_queue *q, struct blk_req *req, uint64_t now)
{
    int fault = fault_check(q->disk, req);
    /* After a failed flush of the page cache, no flush can succeed again:
     * what it failed to write is lost to the next one (backend_uring.c). */
    if (!fault && req->op == DP_OP_FLUSH)
        fault = atomic_load_explicit(&q->disk->flush_error, memory_order_relaxed);
    if (fault)
        queue_io_done(q, req, fault, now);
    else if (q->disk->backend == DP_BACKEND_NULL)
        queue_io_done(q, req, backend_null_execute(q->disk, req), now);
    else
        iothread_submit_req(q->thread, req);
}

static void held_push(struct dp_queue *q, struct blk_req *req)
{
    /* A held request gives its bounce budget back, or requests waiting for
     * budget would wait until resume; the retry starts its window over. */
    if (req->bounce) {
        req->done = req->bounce_off;
        backend_uring_release(req);
    }
    req->next = NULL;
    if (q->held_tail)
        q->held_tail->next = req;
    else
        q->held_head = req;
    q->held_tail = req;
    q->held_count++;
    STAT_SET(q->stats.error_held, q->held_count + q->resubmit_held);
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
    int policy = req->op == DP_OP_READ ? q->disk->read_policy : q->disk->write_policy;
    if (policy == DP_POLICY_IGNORE) {
        STAT_ADD(q->stats.errors_ignored, 1);
        queue_complete(q, req, VIRTIO_BLK_S_OK, now);
        return;
    }
    if (policy == DP_POLICY_STOP || (policy == DP_POLICY_ENOSPC && res == -ENOSPC)) {
        /* Keep the request, stop taking new ones; resume retries it. */
        held_push(q, req);
        if (!q->error_stopped) {
            q->error_stopped = true;
            STAT_SET(q->stats.error_stop_reason, res);
            STAT_SET(q->stats.error_stopped, 1);
        }
        return;
    }
    queue_complete(q, req, VIRTIO_BLK_S_IOERR, now);
}

static struct blk_req *held_take_all(struct dp_queue *q)
{
    struct blk_req *list = q->held_head;
    q->held_head = q->held_tail = NULL;
    q->held_count = 0;
    q->error_stopped = false;
    STAT_SET(q->stats.error_held, 0);
    STAT_SET(q->stats.error_stopped, 0);
    return list;
}

void queue_retry_held(struct dp_queue *q, uint64_t now)
{
    /* Held requests are retried at once, ahead of requeued heads still
     * waiting: usually they were started from that list, ahead of the rest
     * (virtio orders no requests that were in flight together anyway). */
    struct blk_req *req = held_take_all(q);
    while (req) {
        struct blk_req *next = req->next;
        queue_submit_io(q, req, now); /* may be held again */
        req = next;
    }
}

void queue_fail_held(struct dp_queue *q, uint64_t now)
{
    struct blk_req *req = held_take_all(q);
    while (req) {
        struct blk_req *next = req->next;
        queue_complete(q, req, VIRTIO_BLK_S_IOERR, now);
        req = next;
    }
}

/* Gives the held requests' slots back and queues their heads to run again
 * when the queue resumes: their iovecs point into a memory table about to go,
 * and a hot-plugged DIMM must not turn requests the error policy keeps into
 * I/O errors. Order: held requests requeued before, then these (each in the
 * order they failed), then recovered heads not yet started (popped after
 * them all). The queue stays stopped, and the stats count them as held. */
bool queue_requeue_held(struct dp_queue *q)
{
    uint32_t n = q->held_count, pending = q->resubmit_count - q->resubmit_next;
    uint32_t before = q->resubmit_held;
    /* Distinct heads fit: n + pending <= size. More means the guest made a
     * head that waits for resubmission available again: it broke the ring. */
    if (n + pending > q->vr.size) {
        queue_break(q, -EBUSY);
        return false;
    }
    memmove(q->resubmit, q->resubmit + q->resubmit_next, pending * sizeof(q->resubmit[0]));
    memmove(q->resubmit + before + n, q->resubmit + before, (pending - before) * sizeof(q->resubmit[0]));
    uint32_t i = before;
    for (struct blk_req *req = q->held_head; req; req = req->next) {
        if (req->bounce)
            backend_uring_release(req);
        q->resubmit[i++] = req->head;
        q->head_slot[req->head] = 0;
        q->free_slots[q->free_count++] = (uint16_t)(req - q->reqs);
        q->in_flight--;
    }
    q->held_head = q->held_tail = NULL;
    q->held_count = 0;
    q->resubmit_next = 0;
    q->resubmit_count = n + pending;
    q->resubmit_held = before + n;
    STAT_SET(q->stats.in_flight, q->in_flight);
    STAT_SET(q->stats.error_held, q->resubmit_held);
    return true;
}

/* Takes the next head to run again off the resubmit list (before it
 * starts: failing again, it is counted as held once). */
static uint16_t resubmit_take(struct dp_queue *q)
{
    if (q->resubmit_held)
        q->resubmit_held--;
    return q->resubmit[q->resubmit_next++];
}

/* A stop while requeued or recovered heads wait to run, without an inflight
 * region: they fail as held requests do (used elements with IOERR). */
void queue_fail_requeued(struct dp_queue *q, uint64_t now)
{
    uint32_t cost = 0;
    while (q->resubmit_next < q->resubmit_count && q->free_count &&
           queue_start(q, resubmit_take(q), now, true, &cost))
        ;
}

/* A stop with an inflight region: requests held by the error policy, and
 * heads waiting to run again, stay marked in the region and are not
 * completed; whoever starts the ring next with it (this backend after a
 * pause, a restarted one, a reconnected frontend) runs them again, as a
 * SIGKILL would have left them. Their slots are given back. */
void queue_release_held(struct dp_queue *q)
{
    for (struct blk_req *req = q->held_head; req; req = req->next) {
        q->head_slot[req->head] = 0;
        q->free_slots[q->free_count++] = (uint16_t)(req - q->reqs);
        q->in_flight--;
    }
    q->held_head = q->held_tail = NULL;
    q->held_count = 0;
    q->error_stopped = false;
    q->resubmit_count = q->resubmit_next = q->resubmit_held = 0;
    STAT_SET(q->stats.in_flight, q->in_flight);
    STAT_SET(q->stats.error_held, 0);
    STAT_SET(q->stats.error_stopped, 0);
}

/* Pops one head off the avail ring and starts it. */
static bool queue_pop_one(struct dp_queue *q, uint64_t now, uint32_t *cost)
{
    uint16_t head;
    int ret = vring_split_pop_head(&q->vr, &head);
    if (ret) {
        queue_break(q, ret);
        return false;
    }
    vring_split_prefetch_next(&q->vr);
    return queue_start(q, head, now, false, cost);
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
    if (!queue_can_pop(q))
        return 0;
    unsigned popped = 0;
    /* One clock read per queue with work per pass: its own start (the
     * pass's may be long past, spent on completions and other queues). */
    struct pass_budget budget = {.next_clock = DP_QUEUE_PASS_CLOCK_EVERY, .start_ns = now_ns()};
    uint32_t *cost = &budget.cost;
    /* Requests in flight when the previous backend went away come first. */
    while (q->resubmit_next < q->resubmit_count && q->free_count && !q->error_stopped &&
           pass_budget_left(&budget) && queue_start(q, resubmit_take(q), now, false, cost))
        popped++;
    /* Heads still waiting to run again were popped before anything new. */
    if (q->resubmit_next >= q->resubmit_count && pass_budget_left(&budget)) {
        int avail = vring_split_avail_count(&q->vr);
        if (avail < 0) {
            queue_break(q, avail);
            return popped;
        }
        unsigned n = (unsigned)avail < q->free_count ? (unsigned)avail : q->free_count;
        /* Like QEMU's werror=stop, the requests of a batch already fetched go
         * on; an error-policy stop holds back the batches after it. */
        for (unsigned i = 0; i < n && pass_budget_left(&budget) && queue_pop_one(q, now, cost); i++)
            popped++;
    }
    q->budget_spent = budget.spent && queue_can_pop(q);
    if (popped) {
        STAT_ADD(q->stats.batches, 1);
        STAT_ADD(q->stats.batch_hist[stats_log2_bucket(popped, DP_BATCH_BUCKETS)], 1);
        if (!q->kicked)
            STAT_ADD(q->stats.polls, popped);
        q->kicked = false;
        STAT_SET(q->stats.last_avail_idx, q->vr.last_avail_idx);
        STAT_SET(q->stats.in_flight, q->in_flight);
    }
    return popped;
}

bool queue_publish_and_notify(struct dp_queue *q)
{
    if (!q->dirty)
        return false;
    q->dirty = false;
    q->unpublished = 0;
    vring_split_publish(&q->vr);
    if (q->inflight)
        inflight_clear_published(q);
    STAT_SET(q->stats.used_idx, q->vr.used_idx);
    STAT_SET(q->stats.in_flight, q->in_flight);
    if (q->config.call_fd >= 0 && vring_split_should_notify(&q->vr)) {
        iothread_signal(q, DP_SIGNAL_CALL);
        STAT_ADD(q->stats.notifies, 1);
        return true;
    }
    STAT_ADD(q->stats.notifies_suppressed, 1);
    return false;
}

int queue_map_rings(const struct dp_queue_config *cfg, const struct dp_mem *mem, void **desc,
                    void **avail, void **used)
{
    int (*translate)(const struct dp_mem *, uint64_t, uint64_t, void **) =
        cfg->addrs_are_user ? dp_mem_translate_uva : dp_mem_translate_gpa;
    int ret = translate(mem, cfg->desc_addr, VRING_DESC_BYTES(cfg->size), desc);
    if (!ret)
        ret = translate(mem, cfg->avail_addr, VRING_AVAIL_BYTES(cfg->size), avail);
    if (!ret)
        ret = translate(mem, cfg->used_addr, VRING_USED_BYTES(cfg->size), used);
    if (ret)
        return ret;
    /* Checked here, not only at start: a new memory table may map the same
     * ring addresses elsewhere, and ring fields are accessed atomically. */
    if (((uintptr_t)*desc & 15) || ((uintptr_t)*avail & 1) || ((uintptr_t)*used & 3))
        return -EINVAL;
    return 0;
}

/* ------------------------------------------------------------ control side */

/* Signals are written with RWF_NOWAIT, which a blocking eventfd always
 * refuses: call and err fds must be O_NONBLOCK. */
static int notifiers_set_nonblocking(int32_t call_fd, int32_t err_fd)
{
    int32_t fds[2] = {call_fd, err_fd};
    for (int i = 0; i < 2; i++) {
        if (fds[i] < 0)
            continue;
        int flags = fcntl(fds[i], F_GETFL);
        if (flags < 0 || (!(flags & O_NONBLOCK) && fcntl(fds[i], F_SETFL, flags | O_NONBLOCK) < 0))
            return -errno;
    }
    return 0;
}

static int queue_config_check(const struct dp_queue_config *cfg)
{
    if (cfg->size == 0 || cfg->size > DP_QUEUE_MAX_SIZE || (cfg->size & (cfg->size - 1)))
        return -EINVAL;
    if (cfg->kick_fd < 0)
        return -EBADF;
    return notifiers_set_nonblocking(cfg->call_fd, cfg->err_fd);
}

int dp_queue_create(struct dp_iothread *thread, const struct dp_queue_config *config,
                    struct dp_disk *disk, struct dp_mem *mem, struct dp_queue **out)
{
    if (!thread || !config || !disk || !mem || !out)
        return -EINVAL;
    int ret = queue_config_check(config);
    if (ret)
        return ret;
    void *desc, *avail, *used;
    ret = queue_map_rings(config, mem, &desc, &avail, &used);
    if (ret)
        return ret;

    uint32_t nslots = config->size < DP_QUEUE_MAX_SLOTS ? config->size : DP_QUEUE_MAX_SLOTS;
    size_t head_size = sizeof(struct dp_queue);
    size_t reqs_off = (head_size + 63) & ~(size_t)63;
    size_t iov_off = reqs_off + nslots * sizeof(struct blk_req);
    size_t free_off = iov_off + (size_t)nslots * DP_REQ_MAX_IOV * sizeof(struct iovec);
    size_t heads_off = free_off + nslots * sizeof(uint16_t);
    size_t pushed_off = heads_off + config->size * sizeof(uint16_t);
    size_t resubmit_off = pushed_off + nslots * sizeof(uint16_t);
    size_t scratch_off = (resubmit_off + config->size * sizeof(uint16_t) + 15) & ~(size_t)15;
    size_t total = scratch_off + VRING_INDIRECT_MAX * sizeof(struct vring_desc);

    int node;
    uint8_t *base = iothread_alloc(thread, total, &node);
    if (!base)
        return -ENOMEM;
    struct dp_queue *q = (struct dp_queue *)base;
    q->reqs = (struct blk_req *)(base + reqs_off);
    q->iov_pool = (struct iovec *)(base + iov_off);
    q->free_slots = (uint16_t *)(base + free_off);
    q->head_slot = (uint16_t *)(base + heads_off);
    q->pushed = (uint16_t *)(base + pushed_off);
    q->resubmit = (uint16_t *)(base + resubmit_off);
    q->indirect_scratch = (struct vring_desc *)(base + scratch_off);
    q->inflight = config->inflight;
    q->alloc_size = total;
    q->numa_node = node;
    q->nslots = nslots;
    q->thread = thread;
    q->notify_after = iothread_notify_after(thread);
    q->disk = disk;
    q->mem = mem;
    q->config = *config;
    /* Until its IOThread registers them (on attach): the plain fd, no buffers. */
    q->ring_fd = disk->fd;
    q->file_slot = -1;
    q->thread_stats = iothread_counters(thread);
    for (uint32_t i = 0; i < nslots; i++) {
        q->reqs[i].queue = q;
        q->free_slots[i] = (uint16_t)(nslots - 1 - i);
    }
    q->free_count = nslots;
    ret = vring_split_init(&q->vr, (uint16_t)config->size, desc, avail, used, config->last_avail_idx,
                           config->event_idx, config->indirect, disk->seg_max + 2);
    if (!ret && q->inflight)
        ret = inflight_recover(q);
    if (ret) {
        iothread_free(base, total, node);
        return ret;
    }
    STAT_SET(q->stats.last_avail_idx, q->vr.last_avail_idx);
    STAT_SET(q->stats.used_idx, q->vr.used_idx);

    struct ctl_msg msg = {.type = CTL_ADD_QUEUE, .queue = q};
    ret = iothread_call(thread, &msg);
    if (ret) {
        iothread_free(base, total, node);
        return ret;
    }
    *out = q;
    return 0;
}

int dp_queue_stop(struct dp_queue *queue, uint16_t *last_avail_idx)
{
    if (!queue)
        return -EINVAL;
    struct ctl_msg msg = {.type = CTL_STOP_QUEUE, .queue = queue};
    int ret = iothread_call(queue->thread, &msg);
    if (ret == -ESHUTDOWN || ret == -ENOENT) {
        /* Already detached: the thread exited or the queue was stopped before;
         * the thread no longer touches it, so its state is ours to read. */
        msg.last_avail_idx = queue->vr.last_avail_idx;
        ret = 0;
    }
    if (!ret && last_avail_idx)
        *last_avail_idx = msg.last_avail_idx;
    return ret;
}

void dp_queue_destroy(struct dp_queue *queue)
{
    if (!queue)
        return;
    dp_queue_stop(queue, NULL);
    iothread_free(queue, queue->alloc_size, queue->numa_node);
}

int dp_queue_pause(struct dp_queue *queue)
{
    struct ctl_msg msg = {.type = CTL_PAUSE_QUEUE, .queue = queue};
    return queue ? iothread_call(queue->thread, &msg) : -EINVAL;
}

int dp_queue_resume(struct dp_queue *queue)
{
    struct ctl_msg msg = {.type = CTL_RESUME_QUEUE, .queue = queue};
    return queue ? iothread_call(queue->thread, &msg) : -EINVAL;
}

int dp_queue_set_mem(struct dp_queue *queue, struct dp_mem *mem)
{
    if (!queue || !mem)
        return -EINVAL;
    struct ctl_msg msg = {.type = CTL_SET_MEM, .queue = queue, .mem = mem};
    return iothread_call(queue->thread, &msg);
}

int dp_queue_set_notifiers(struct dp_queue *queue, int32_t call_fd, int32_t err_fd)
{
    if (!queue)
        return -EINVAL;
    int ret = notifiers_set_nonblocking(call_fd, err_fd);
    if (ret)
        return ret;
    struct ctl_msg msg = {.type = CTL_SET_NOTIFIERS, .queue = queue, .call_fd = call_fd, .err_fd = err_fd};
    return iothread_call(queue->thread, &msg);
}

int dp_queue_get_stats(const struct dp_queue *queue, struct dp_queue_stats *out)
{
    if (!queue || !out)
        return -EINVAL;
    stats_queue_snapshot(&queue->stats, out);
    return 0;
}

const char *dp_ring_error_string(int reason)
{
    switch (reason) {
    case -ERANGE:
        return "avail index moved more than the queue size ahead";
    case -EINVAL:
        return "avail ring names a descriptor outside the table";
    case -EBUSY:
        return "avail ring names a descriptor chain that is already in flight";
    case -EFAULT:
        return "ring lies outside guest memory";
    case -ENOMSG:
        return "descriptor chain has no device-writable status byte at its end";
    case -ELOOP:
        return "descriptor chain loops";
    case -E2BIG:
        return "descriptor chain has more descriptors than seg_max + 2, or an indirect table over 1024";
    case -EBADMSG:
        return "descriptor chain malformed (next outside its table, or a bad indirect descriptor)";
    case -ENXIO:
        return "indirect descriptor table outside guest memory";
    case -EBADR:
        return "the IOThread lost I/O completions (io_uring CQ overflow)";
    case -ECANCELED:
        return "the IOThread's io_uring failed (see the IOThread's status)";
    case 0:
        return "not broken";
    default:
        return "ring corrupt";
    }
}
