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
        q->signals_owed |= (uint8_t)(1u << which);
        q->loop->rearm_pending = true;
    }
}

void queue_signals_flush(struct dp_queue *q)
{
    uint8_t owed = q->signals_owed;
    q->signals_owed = 0;
    if (owed & (1u << DP_SIGNAL_CALL))
        queue_signal(q, DP_SIGNAL_CALL);
    if (owed & (1u << DP_SIGNAL_ERR))
        queue_signal(q, DP_SIGNAL_ERR);
}

void queue_kick_arm(struct dp_queue *q)
{
    if (q->kick_armed || q->kick_failed || q->stopping)
        return;
    struct loop *l = q->loop;
    int ret;
    bool multishot = l->features & DP_URING_MULTISHOT_KICKS;
    if (multishot) {
        /* Armed once, it posts a CQE (IORING_CQE_F_MORE) per kick; each is
         * consumed with loop_drain_eventfd. */
        ret = loop_arm_poll(l, q->config.kick_fd, true, &q->kick_op);
    } else if (q->kick_poll) {
        /* Reading the eventfd through io_uring consumes the kick with no
         * extra syscall. On some kernels an O_NONBLOCK fd (some frontends
         * set it) answers -EAGAIN instead of waiting (6.18 waits), so for
         * those we poll first. */
        ret = loop_arm_poll(l, q->config.kick_fd, false, &q->kick_op);
    } else {
        ret = loop_arm_read(l, q->config.kick_fd, &q->kick_buf, &q->kick_op);
    }
    if (ret) {
        l->rearm_pending = true;
        return;
    }
    q->kick_armed = true;
    q->kick_multishot = multishot;
}

void queue_kick_cancel(struct dp_queue *q)
{
    if (!q->kick_armed || q->kick_cancelling)
        return;
    if (loop_cancel(q->loop, &q->kick_op)) {
        q->loop->rearm_pending = true; /* a stop waits for this cancel */
        return;
    }
    q->kick_cancelling = true;
}

bool queue_kick_end_poll(struct dp_queue *q)
{
    if (!q->kick_armed || !q->kick_multishot || q->kick_cancelling)
        return false;
    return loop_poll_remove(q->loop, &q->kick_op) == 0;
}

/* A kick: consumed before the pass pops, so no kick it counts comes after
 * what the pass sees. */
static void kick_seen(struct dp_queue *q, bool drain)
{
    if (drain)
        loop_drain_eventfd(q->loop, q->config.kick_fd, &q->kick_buf);
    q->kicked = true;
    STAT_ADD(q->stats.kicks, 1);
}

/* A multishot poll ended: by the kernel (no room in the CQ: res is still a
 * kick), or cancelled by someone else; a bad fd (other errors) fails the kick. */
static void kick_multishot_ended(struct dp_queue *q, int res)
{
    if (res < 0 && res != -ECANCELED && res != -EINTR) {
        q->kick_failed = true;
        return;
    }
    if (res > 0)
        kick_seen(q, true);
    STAT_ADD(q->io.thread_stats->kick_rearms, 1);
    queue_kick_arm(q);
}

static void kick_done(struct loop_op *op, int res, uint32_t flags)
{
    struct dp_queue *q = dp_container_of(op, struct dp_queue, kick_op);
    if (flags & IORING_CQE_F_MORE) {
        /* The multishot poll is still armed: a kick. */
        if (q->stopping || res <= 0)
            return;
        kick_seen(q, true);
        return;
    }
    bool multishot = q->kick_multishot;
    if (multishot) {
        q->kick_multishot = false;
        q->loop->multishots--;
    }
    q->kick_armed = false;
    q->kick_cancelling = false;
    if (q->stopping)
        return;
    if (multishot) {
        kick_multishot_ended(q, res);
        return;
    }
    if (res == -EAGAIN && !q->kick_poll) {
        q->kick_poll = true; /* an O_NONBLOCK fd: poll it from now on */
    } else if (res < 0 && res != -EINTR) {
        q->kick_failed = true; /* a bad fd; the queue is still served when polled */
        return;
    } else if (res >= 0) {
        kick_seen(q, q->kick_poll);
    }
    queue_kick_arm(q);
}

/* Set once, when the queue is made: the kick's completions come here. */
void queue_kick_init(struct dp_queue *q)
{
    q->kick_op.done = kick_done;
}
