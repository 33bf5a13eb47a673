/* A queue's eventfds on its loop: the kick it waits on (a read, a poll, or
 * a multishot poll) and the call and err signals it sends. */
#include <errno.h>

#include "loop.h"
#include "queue.h"

/* The eventfd write rides along with the batch's io_uring_enter, with
 * RWF_NOWAIT: O_NONBLOCK (set when the fd arrived) is shared with the
 * frontend, which may clear it, and then a full counter would leave the
 * write waiting in an io-wq worker, one more per batch. With RWF_NOWAIT it
 * fails instead (a full counter already reads as signalled; a frontend
 * that made the fd blocking loses its own signals, nobody else's). Without
 * a free SQE the signal is owed, and sent before the thread sleeps. */
void queue_signal(struct dp_queue *q, enum dp_signal which)
{
    int fd = which == DP_SIGNAL_ERR ? q->config.err_fd : q->config.call_fd;
    if (fd < 0)
        return;
    if (loop_signal(q->loop, fd)) {
        q->kick.signals_owed |= (uint8_t)(1u << which);
        q->loop->rearm_pending = true;
    }
}

void queue_signals_flush(struct dp_queue *q)
{
    uint8_t owed = q->kick.signals_owed;
    q->kick.signals_owed = 0;
    if (owed & (1u << DP_SIGNAL_CALL))
        queue_signal(q, DP_SIGNAL_CALL);
    if (owed & (1u << DP_SIGNAL_ERR))
        queue_signal(q, DP_SIGNAL_ERR);
}

void queue_kick_arm(struct dp_queue *q)
{
    if (q->kick.armed || q->kick.failed || q->stopping)
        return;
    struct loop *l = q->loop;
    int ret;
    bool multishot = l->features & DP_URING_MULTISHOT_KICKS;
    if (multishot) {
        /* Armed once, it posts a CQE (IORING_CQE_F_MORE) per kick; each is
         * consumed with loop_drain_eventfd. */
        ret = loop_arm_poll(l, q->config.kick_fd, true, &q->kick.op);
    } else if (q->kick.poll) {
        /* Reading the eventfd through io_uring consumes the kick with no
         * extra syscall. On some kernels an O_NONBLOCK fd (some frontends
         * set it) answers -EAGAIN instead of waiting (6.18 waits), so for
         * those we poll first. */
        ret = loop_arm_poll(l, q->config.kick_fd, false, &q->kick.op);
    } else {
        ret = loop_arm_read(l, q->config.kick_fd, &q->kick.buf, &q->kick.op);
    }
    if (ret) {
        l->rearm_pending = true;
        return;
    }
    q->kick.armed = true;
    q->kick.multishot = multishot;
}

void queue_kick_cancel(struct dp_queue *q)
{
    if (!q->kick.armed || q->kick.cancelling)
        return;
    if (loop_cancel(q->loop, &q->kick.op)) {
        q->loop->rearm_pending = true; /* a stop waits for this cancel */
        return;
    }
    q->kick.cancelling = true;
}

bool queue_kick_end_poll(struct dp_queue *q)
{
    if (!q->kick.armed || !q->kick.multishot || q->kick.cancelling)
        return false;
    return loop_poll_remove(q->loop, &q->kick.op) == 0;
}

/* A kick: consumed before the pass pops, so no kick it counts comes after
 * what the pass sees. */
static void kick_seen(struct dp_queue *q, bool drain)
{
    if (drain)
        loop_drain_eventfd(q->loop, q->config.kick_fd, &q->kick.buf);
    q->kicked = true;
    STAT_ADD(q->stats.kicks, 1);
}

/* A multishot poll ended: by the kernel (no room in the CQ: res is still a
 * kick), or cancelled by someone else; a bad fd (other errors) fails the kick. */
static void kick_multishot_ended(struct dp_queue *q, int res)
{
    if (res < 0 && res != -ECANCELED && res != -EINTR) {
        q->kick.failed = true;
        return;
    }
    if (res > 0)
        kick_seen(q, true);
    STAT_ADD(q->io.thread_stats->kick_rearms, 1);
    queue_kick_arm(q);
}

static void kick_done(struct loop_op *op, int res, uint32_t flags)
{
    struct dp_queue *q = dp_container_of(op, struct dp_queue, kick.op);
    if (flags & IORING_CQE_F_MORE) {
        /* The multishot poll is still armed: a kick. */
        if (q->stopping || res <= 0)
            return;
        kick_seen(q, true);
        return;
    }
    bool multishot = q->kick.multishot;
    if (multishot) {
        q->kick.multishot = false;
        q->loop->multishots--;
    }
    q->kick.armed = false;
    q->kick.cancelling = false;
    if (q->stopping)
        return;
    if (multishot) {
        kick_multishot_ended(q, res);
        return;
    }
    if (res == -EAGAIN && !q->kick.poll) {
        q->kick.poll = true; /* an O_NONBLOCK fd: poll it from now on */
    } else if (res < 0 && res != -EINTR) {
        q->kick.failed = true; /* a bad fd; the queue is still served when polled */
        return;
    } else if (res >= 0) {
        kick_seen(q, q->kick.poll);
    }
    queue_kick_arm(q);
}

/* Set once, when the queue is made: the kick's completions come here. */
void queue_kick_init(struct dp_queue *q)
{
    q->kick.op.done = kick_done;
}
