/* A queue's control state machine, run on its IOThread between passes:
 * attach, stop, pause, resume, memory and notifier swaps, and the requests
 * the error policy holds (retried, failed, requeued or released). */
#include <errno.h>
#include <string.h>

#include "backend.h"
#include "blk.h"
#include "loop.h"
#include "queue_ctl.h"

/* ------------------------------------------------------------ held requests */

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

/* Resume: held requests run again. */
static void queue_retry_held(struct dp_queue *q, uint64_t now)
{
    /* Held requests are retried at once, ahead of requeued heads still
     * waiting: usually they were started from that list, ahead of the rest
     * (virtio orders no requests that were in flight together anyway). */
    struct blk_req *req = held_take_all(q);
    while (req) {
        struct blk_req *next = req->next;
        /* Checked against the capacity when first parsed: a shrink since
         * then may have cut the disk short of it (the image file with it). */
        if (blk_req_in_range(q->io.disk, req))
            queue_submit_io(q, req, now); /* may be held again */
        else
            queue_complete(q, req, VIRTIO_BLK_S_IOERR, now);
        req = next;
    }
}

static void queue_fail_held(struct dp_queue *q, uint64_t now)
{
    struct blk_req *req = held_take_all(q);
    while (req) {
        struct blk_req *next = req->next;
        queue_complete(q, req, VIRTIO_BLK_S_IOERR, now);
        req = next;
    }
}

/* Gives a held request's slot back (it is no longer in flight). */
static void slot_give_back(struct dp_queue *q, struct blk_req *req)
{
    q->head_slot[req->head] = 0;
    q->free_slots[q->free_count++] = (uint16_t)(req - q->reqs);
    q->in_flight--;
}

/* Gives the held requests' slots back and queues their heads to run again
 * when the queue resumes: their iovecs point into a memory table about to go,
 * and a hot-plugged DIMM must not turn requests the error policy keeps into
 * I/O errors. Order: held requests requeued before, then these (each in the
 * order they failed), then recovered heads not yet started (popped after
 * them all). The queue stays stopped, and the stats count them as held.
 * False: the ring is broken, and they must be failed instead. */
static bool queue_requeue_held(struct dp_queue *q)
{
    /* Requeued heads are walked again from the descriptor table; a packed
     * ring's buffers are found only at the avail position, or in the
     * copies an inflight region keeps: without one, fail them. */
    if (q->vr.layout == VRING_LAYOUT_PACKED && !q->inflight)
        return false;
    uint32_t n = q->held_count, pending = q->resubmit_count - q->resubmit_next;
    uint32_t before = q->resubmit_held;
    /* Distinct heads fit: n + pending <= size. More means the guest made a
     * head that waits for resubmission available again: it broke the ring. */
    if (n + pending > vring_size(&q->vr)) {
        queue_break(q, -EBUSY);
        return false;
    }
    memmove(q->resubmit, q->resubmit + q->resubmit_next, pending * sizeof(q->resubmit[0]));
    memmove(q->resubmit + before + n, q->resubmit + before, (pending - before) * sizeof(q->resubmit[0]));
    uint32_t i = before;
    for (struct blk_req *req = q->held_head; req; req = req->next) {
        backend_release(&q->io, req);
        q->resubmit[i++] = req->head;
        slot_give_back(q, req);
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

/* A stop while requeued or recovered heads wait to run, without an inflight
 * region: they fail as held requests do (used elements with IOERR). */
static void queue_fail_requeued(struct dp_queue *q, uint64_t now)
{
    uint32_t cost = 0;
    while (q->resubmit_next < q->resubmit_count && q->free_count &&
           queue_start(q, queue_resubmit_take(q), now, true, true, &cost))
        ;
}

/* A stop with an inflight region: requests held by the error policy, and
 * heads waiting to run again, stay marked in the region and are not
 * completed; whoever starts the ring next with it (this backend after a
 * pause, a restarted one, a reconnected frontend) runs them again, as a
 * SIGKILL would have left them. Their slots are given back. */
static void queue_release_held(struct dp_queue *q)
{
    for (struct blk_req *req = q->held_head; req; req = req->next)
        slot_give_back(q, req);
    q->held_head = q->held_tail = NULL;
    q->held_count = 0;
    q->error_stopped = false;
    q->resubmit_count = q->resubmit_next = q->resubmit_held = 0;
    STAT_SET(q->stats.in_flight, q->in_flight);
    STAT_SET(q->stats.error_held, 0);
    STAT_SET(q->stats.error_stopped, 0);
}

/* ------------------------------------------------------------ rings and memory */

/* Re-points a queue's rings at a new memory table, and its backend
 * (nothing is in flight: the queue was drained). */
static int queue_apply_mem(struct dp_queue *q, struct dp_mem *mem)
{
    int ret = vring_set_mem(&q->vr, &q->config, mem);
    if (ret)
        return ret;
    const struct dp_mem *old = q->io.mem;
    q->io.mem = mem;
    if (q->io.ops->set_mem)
        q->io.ops->set_mem(&q->io, q->loop, old);
    return 0;
}

void queue_attach(struct dp_queue *q, struct loop *l, struct uring_backend *u)
{
    q->loop = l;
    q->io.uring = u;
    q->attached = true;
    if (q->io.ops->attach)
        q->io.ops->attach(&q->io, l);
    queue_kick_arm(q);
}

/* The queue leaves the loop with nothing in flight. */
static void queue_detach(struct dp_queue *q)
{
    if (q->io.ops->detach)
        q->io.ops->detach(&q->io, q->loop);
    q->attached = false;
}

/* ------------------------------------------------------------ drains */

/* Held requests never complete on their own: a stop fails them (or, with
 * an inflight region, leaves them to the next owner of the ring, unless
 * there is none: dp_queue_stop_failing_held), a memory
 * swap (their buffers would dangle) queues them to be walked again on
 * resume; a pause waits around them. */
static void drain_held(struct dp_queue *q, const struct ctl_msg *msg)
{
    if (q->stopping && (q->held_count || q->resubmit_next < q->resubmit_count)) {
        if (q->inflight && !q->stop_fails_held) {
            queue_release_held(q);
        } else {
            uint64_t now = now_ns();
            queue_fail_held(q, now);
            queue_fail_requeued(q, now);
            queue_publish_and_notify(q);
        }
    } else if (q->held_count && msg && msg->type == CTL_SET_MEM && !queue_requeue_held(q)) {
        queue_fail_held(q, now_ns());
        queue_publish_and_notify(q);
    }
}

/* A stop, drained: the kick's read or poll is cancelled and has come back,
 * and the last completions are signalled, before the queue goes. */
static bool stop_finished(struct dp_queue *q)
{
    queue_kick_cancel(q);
    if (q->kick.armed)
        return false; /* wait for the cancelled read to come back */
    queue_signals_flush(q);
    if (q->kick.signals_owed)
        return false; /* still no SQE: the rearm pass and the next call retry */
    queue_detach(q);
    return true;
}

struct ctl_msg *queue_check_drained(struct dp_queue *q, bool *detach, int *result)
{
    struct ctl_msg *msg = q->drain_waiter;
    *detach = false;
    drain_held(q, msg);
    /* An armed throttle timer (at most DP_THROTTLE_RECHECK_NS) points at
     * the queue: it comes back before the queue may go. */
    if (q->in_flight - q->held_count || q->dirty || q->throttle_timer_armed)
        return NULL;
    if (q->stopping) {
        if (!stop_finished(q))
            return NULL;
        *detach = true;
        q->drain_waiter = NULL;
        if (msg)
            msg->ring_base = vring_base(&q->vr);
        *result = 0;
        return msg;
    }
    if (!msg)
        return NULL;
    q->drain_waiter = NULL;
    *result = 0;
    if (msg->type == CTL_SET_MEM) {
        *result = queue_apply_mem(q, msg->mem);
        q->paused = false;
    }
    if (msg->type == CTL_DRAIN_QUEUE)
        q->paused = false;
    return msg;
}

/* ------------------------------------------------------------ messages */

/* A memory swap: a paused queue (drained) swaps now; else it pauses and
 * drains first, since in-flight requests point into the old table. */
static int ctl_set_mem(struct dp_queue *q, struct ctl_msg *msg)
{
    if (!q->paused) {
        q->paused = true;
        q->drain_waiter = msg;
        return QUEUE_CTL_DRAIN;
    }
    if (q->held_count && q->in_flight == q->held_count && !queue_requeue_held(q)) {
        queue_fail_held(q, now_ns());
        queue_publish_and_notify(q);
    }
    return q->in_flight ? -EBUSY : queue_apply_mem(q, msg->mem);
}

int queue_ctl(struct dp_queue *q, struct ctl_msg *msg)
{
    if (!q->attached)
        return -ENOENT;
    if (q->drain_waiter && msg->type != CTL_RESUME_QUEUE)
        return -EBUSY;
    switch (msg->type) {
    case CTL_STOP_QUEUE:
        q->stopping = true;
        q->stop_fails_held = msg->fail_held;
        q->drain_waiter = msg;
        return QUEUE_CTL_DRAIN;
    case CTL_PAUSE_QUEUE:
        q->paused = true;
        q->drain_waiter = msg;
        return QUEUE_CTL_DRAIN;
    case CTL_DRAIN_QUEUE:
        /* A paused queue has nothing in flight but what the error policy
         * holds; else it pauses until drained and takes requests again
         * (held ones stay held: unlike a resume, nothing is retried). */
        if (q->paused)
            return 0;
        q->paused = true;
        q->drain_waiter = msg;
        return QUEUE_CTL_DRAIN;
    case CTL_SET_MEM:
        return ctl_set_mem(q, msg);
    case CTL_SET_NOTIFIERS:
        /* The IOThread's answer submits what was queued with the old call
         * fd before the control side may close it. A spurious signal is
         * harmless; a missed one hangs the guest. */
        q->config.call_fd = msg->call_fd;
        q->config.err_fd = msg->err_fd;
        queue_signal(q, DP_SIGNAL_CALL);
        if (q->broken)
            queue_signal(q, DP_SIGNAL_ERR);
        return 0;
    case CTL_RESUME_QUEUE:
        q->paused = false;
        queue_retry_held(q, now_ns());
        return 0;
    default:
        return -EINVAL;
    }
}
