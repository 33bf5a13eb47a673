/* The IOThread: one pinned thread, one io_uring, many queues. It waits on
 * kick eventfds, I/O completions and its control eventfd in one place
 * (io_uring_enter), optionally busy-polls the avail rings first, and takes
 * control messages between batches. */
#include <errno.h>
#include <numa.h>
#include <poll.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include "backend.h"
#include "blk.h"
#include "dp_internal.h"

#define POLL_GROW_START_NS 4000 /* as QEMU's aio poll: start at 4 us, then double */

struct dp_iothread {
    struct io_uring ring;
    pthread_t tid;
    clockid_t cpu_clock;
    bool ring_ready;
    bool exiting;
    bool signal_nowait;      /* io_uring eventfd writes take RWF_NOWAIT (probed) */
    bool kick_nowait;        /* preadv2 on an eventfd takes RWF_NOWAIT (probed) */
    uint64_t kick_drain_buf; /* without it, polled kicks are drained by io_uring reads into this */
    int numa_node;
    int ctl_fd;
    bool ctl_armed;
    uint64_t ctl_buf;
    uint64_t poll_ns;
    uint64_t poll_max_ns;
    uint32_t notify_after;   /* copied into each queue it serves */
    uint32_t ring_entries;
    /* Every SQE we submit posts exactly one CQE; at most cq_entries may be
     * owed at once, so the CQ never overflows (an overflowed CQ loses
     * completions when the kernel cannot buffer them: requests that hang). */
    uint32_t cq_entries;
    uint32_t cqe_pending;    /* SQEs taken whose CQE has not been reaped */
    int failed;              /* the io_uring failed us (-errno): every queue is broken */
    struct dp_queue *queues[DP_THREAD_MAX_QUEUES];
    uint32_t nqueues;
    uint32_t first_queue;    /* where the next pass over the queues starts */
    bool rearm_pending;      /* a kick or control read found no SQE: arm before sleeping */
    struct blk_req *backlog_head; /* requests waiting for an SQE or a retry */
    struct blk_req *backlog_tail;
    struct ctl_msg *stop_waiter;

    /* Control mailbox: touched by the IOThread only when ctl_fd fired. */
    pthread_mutex_t ctl_lock;
    pthread_cond_t ctl_cond;
    struct ctl_msg *ctl_head;
    struct ctl_msg *ctl_tail;
    bool exited;
    int setup_result;
    bool setup_done;

    char name[16];
    int32_t cpus[DP_MAX_CPUS];
    uint32_t cpu_count;

    struct dp_thread_counters stats;
};

static const uint64_t notify_value = 1;

/* ------------------------------------------------------------ memory */

void *iothread_alloc(const struct dp_iothread *t, size_t size, int *node)
{
    *node = -1;
    if (t->numa_node >= 0 && numa_available() >= 0) {
        void *p = numa_alloc_onnode(size, t->numa_node);
        if (p) {
            memset(p, 0, size);
            *node = t->numa_node;
            return p;
        }
    }
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

void iothread_free(void *p, size_t size, int node)
{
    if (!p)
        return;
    if (node >= 0)
        numa_free(p, size);
    else
        munmap(p, size);
}

/* ------------------------------------------------------------ submissions */

static void backlog_push(struct dp_iothread *t, struct blk_req *req)
{
    req->next = NULL;
    if (t->backlog_tail)
        t->backlog_tail->next = req;
    else
        t->backlog_head = req;
    t->backlog_tail = req;
}

static void iothread_fail(struct dp_iothread *t, int err);

/* Submits what is queued and, with wait_nr, waits for completions. Errors
 * the kernel may clear on its own (no memory for a request, a CQ it is
 * still flushing) leave the SQEs queued for the next call; others fail the
 * thread, loudly: a silent error here would be a hang. */
static int iothread_enter(struct dp_iothread *t, unsigned wait_nr)
{
    int ret;
    do {
        ret = wait_nr ? io_uring_submit_and_wait(&t->ring, wait_nr) : io_uring_submit(&t->ring);
    } while (ret == -EINTR);
    STAT_ADD(t->stats.submits, 1);
    if (ret >= 0 || ret == -EAGAIN || ret == -EBUSY || ret == -ETIME)
        return 0;
    iothread_fail(t, ret);
    return ret;
}

/* An SQE whose CQE has room, keeping `reserve` CQEs free for others; the SQ
 * is submitted when full. NULL when there is no room (the caller owes it). */
static struct io_uring_sqe *iothread_get_sqe_reserving(struct dp_iothread *t, uint32_t reserve)
{
    if (t->cqe_pending + reserve >= t->cq_entries)
        return NULL;
    struct io_uring_sqe *sqe = io_uring_get_sqe(&t->ring);
    if (!sqe) {
        iothread_enter(t, 0);
        sqe = io_uring_get_sqe(&t->ring);
    }
    if (sqe)
        t->cqe_pending++;
    return sqe;
}

/* For kicks, signals, control and cancels: they may use the whole CQ. */
static struct io_uring_sqe *iothread_get_sqe(struct dp_iothread *t)
{
    return iothread_get_sqe_reserving(t, 0);
}

/* Requests leave room for every queue's kick read, its cancel and drain,
 * and a call and an err signal, and for control, so that those are never
 * starved by I/O. What has no room waits in the backlog, in order. */
struct io_uring_sqe *iothread_get_req_sqe(struct dp_iothread *t)
{
    return iothread_get_sqe_reserving(t, 8 + 5 * t->nqueues);
}

static void iothread_fail_req(struct blk_req *req, int err, uint64_t now)
{
    queue_io_done(req->queue, req, err, now);
}

/* Over its queue's bounce budget: waits on the queue, not in the thread's
 * backlog, where it would hold up other queues and requests that already
 * have their buffer (a short read going round again). */
static void bounce_wait_push(struct dp_queue *q, struct blk_req *req)
{
    req->next = NULL;
    if (q->bounce_wait_tail)
        q->bounce_wait_tail->next = req;
    else
        q->bounce_wait_head = req;
    q->bounce_wait_tail = req;
}

/* After completions gave budget back: start what waits for it, in order. */
static void bounce_wait_flush(struct dp_iothread *t, struct dp_queue *q, uint64_t now)
{
    while (q->bounce_wait_head) {
        struct blk_req *req = q->bounce_wait_head;
        int ret = backend_uring_prep(t, req);
        if (ret == -EAGAIN || ret == -EBUSY)
            return; /* -EBUSY: no SQE this pass; the buffer, if made, stays with it */
        q->bounce_wait_head = req->next;
        if (!q->bounce_wait_head)
            q->bounce_wait_tail = NULL;
        if (ret)
            iothread_fail_req(req, ret, now);
    }
}

void iothread_submit_req(struct dp_iothread *t, struct blk_req *req)
{
    /* Keep order: while older requests wait for SQEs, newer ones queue behind. */
    if (t->backlog_head) {
        backlog_push(t, req);
        return;
    }
    int ret = backend_uring_prep(t, req);
    if (ret == -EBUSY)
        backlog_push(t, req);
    else if (ret == -EAGAIN)
        bounce_wait_push(req->queue, req);
    else if (ret)
        iothread_fail_req(req, ret, now_ns());
}

static void backlog_flush(struct dp_iothread *t, uint64_t now)
{
    while (t->backlog_head) {
        struct blk_req *req = t->backlog_head;
        int ret = backend_uring_prep(t, req);
        if (ret == -EBUSY)
            return;
        t->backlog_head = req->next;
        if (!t->backlog_head)
            t->backlog_tail = NULL;
        if (ret == -EAGAIN)
            bounce_wait_push(req->queue, req);
        else if (ret)
            iothread_fail_req(req, ret, now);
    }
}

/* The eventfd write rides along with the batch's io_uring_enter, with
 * RWF_NOWAIT: O_NONBLOCK (set when the fd arrived) is shared with the
 * frontend, which may clear it, and then a full counter would leave the
 * write waiting in an io-wq worker, one more per batch. With RWF_NOWAIT it
 * fails instead (a full counter already reads as signalled; a frontend
 * that made the fd blocking loses its own signals, nobody else's). Without
 * a free SQE the signal is owed, and sent before the thread sleeps. */
void iothread_signal(struct dp_queue *q, enum dp_signal which)
{
    struct dp_iothread *t = q->thread;
    int fd = which == DP_SIGNAL_ERR ? q->config.err_fd : q->config.call_fd;
    if (fd < 0)
        return;
    struct io_uring_sqe *sqe = iothread_get_sqe(t);
    if (!sqe) {
        q->signals_owed |= (uint8_t)(1u << which);
        t->rearm_pending = true;
        return;
    }
    io_uring_prep_write(sqe, fd, &notify_value, sizeof(notify_value), 0);
    if (t->signal_nowait)
        sqe->rw_flags = RWF_NOWAIT;
    /* Not IOSQE_CQE_SKIP_SUCCESS: every SQE must post its CQE to be counted. */
    io_uring_sqe_set_data64(sqe, TAG_IGNORE);
}

uint32_t iothread_notify_after(const struct dp_iothread *t)
{
    return t->notify_after;
}

void iothread_flush(struct dp_iothread *t)
{
    iothread_enter(t, 0);
}

/* Sends the signals no SQE was free for; they stay owed if there is still none. */
static void signals_flush(struct dp_queue *q)
{
    uint8_t owed = q->signals_owed;
    q->signals_owed = 0;
    if (owed & (1u << DP_SIGNAL_CALL))
        iothread_signal(q, DP_SIGNAL_CALL);
    if (owed & (1u << DP_SIGNAL_ERR))
        iothread_signal(q, DP_SIGNAL_ERR);
}

static void kick_arm(struct dp_iothread *t, struct dp_queue *q)
{
    if (q->kick_armed || q->kick_failed || q->stopping)
        return;
    struct io_uring_sqe *sqe = iothread_get_sqe(t);
    if (!sqe) {
        t->rearm_pending = true;
        return;
    }
    /* Reading the eventfd through io_uring consumes the kick with no extra
     * syscall. On some kernels an O_NONBLOCK fd (some frontends set it)
     * answers -EAGAIN instead of waiting (6.18 waits), so for those we poll
     * first. */
    if (q->kick_poll)
        io_uring_prep_poll_add(sqe, q->config.kick_fd, POLLIN);
    else
        io_uring_prep_read(sqe, q->config.kick_fd, &q->kick_buf, sizeof(q->kick_buf), 0);
    io_uring_sqe_set_data64(sqe, (uint64_t)(uintptr_t)q | TAG_KICK);
    q->kick_armed = true;
}

static void kick_cancel(struct dp_iothread *t, struct dp_queue *q)
{
    if (!q->kick_armed || q->kick_cancelling)
        return;
    struct io_uring_sqe *sqe = iothread_get_sqe(t);
    if (!sqe) {
        t->rearm_pending = true; /* a stop waits for this cancel */
        return;
    }
    q->kick_cancelling = true;
    io_uring_prep_cancel64(sqe, (uint64_t)(uintptr_t)q | TAG_KICK, 0);
    io_uring_sqe_set_data64(sqe, TAG_IGNORE);
}

static void ctl_arm(struct dp_iothread *t)
{
    if (t->ctl_armed)
        return;
    struct io_uring_sqe *sqe = iothread_get_sqe(t);
    if (!sqe) {
        t->rearm_pending = true;
        return;
    }
    io_uring_prep_read(sqe, t->ctl_fd, &t->ctl_buf, sizeof(t->ctl_buf), 0);
    io_uring_sqe_set_data64(sqe, TAG_CTL);
    t->ctl_armed = true;
}

/* ------------------------------------------------------------ control messages */

static void ctl_reply(struct dp_iothread *t, struct ctl_msg *msg, int result)
{
    /* Anything queued that names the queue's fds must reach the kernel
     * before the control side may close them. */
    if (io_uring_sq_ready(&t->ring))
        iothread_enter(t, 0);
    pthread_mutex_lock(&t->ctl_lock);
    msg->result = result;
    msg->done = true;
    pthread_cond_broadcast(&t->ctl_cond);
    pthread_mutex_unlock(&t->ctl_lock);
}

static int queue_index(struct dp_iothread *t, struct dp_queue *q)
{
    for (uint32_t i = 0; i < t->nqueues; i++)
        if (t->queues[i] == q)
            return (int)i;
    return -1;
}

static void queue_detach(struct dp_iothread *t, struct dp_queue *q)
{
    int i = queue_index(t, q);
    if (i >= 0) {
        t->queues[i] = t->queues[--t->nqueues];
        STAT_SET(t->stats.queues, t->nqueues);
    }
    q->attached = false;
}

/* Re-points a queue's rings at a new memory table. */
static int queue_apply_mem(struct dp_queue *q, struct dp_mem *mem)
{
    void *desc, *avail, *used;
    int ret = queue_map_rings(&q->config, mem, &desc, &avail, &used);
    if (ret)
        return ret;
    q->vr.desc = desc;
    q->vr.avail = avail;
    q->vr.used = used;
    q->mem = mem;
    return 0;
}

/* Finishes a stop, pause or memory swap once the queue has nothing in flight. */
static void queue_check_drained(struct dp_iothread *t, struct dp_queue *q)
{
    struct ctl_msg *msg = q->drain_waiter;
    /* Held requests never complete on their own: a stop fails them, a
     * memory swap (their buffers would dangle) queues them to be walked
     * again on resume; a pause waits around them. */
    if (q->stopping && (q->held_count || q->resubmit_next < q->resubmit_count)) {
        if (q->inflight) {
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
    if (q->in_flight - q->held_count || q->dirty)
        return;
    if (q->stopping) {
        kick_cancel(t, q);
        if (q->kick_armed)
            return; /* wait for the cancelled read to come back */
        /* The last completions must be signalled before the queue goes. */
        signals_flush(q);
        if (q->signals_owed)
            return; /* still no SQE: the rearm pass and the next call retry */
        queue_detach(t, q);
        q->drain_waiter = NULL;
        if (msg) {
            msg->last_avail_idx = q->vr.last_avail_idx;
            ctl_reply(t, msg, 0);
        }
        return;
    }
    if (!msg)
        return;
    q->drain_waiter = NULL;
    if (msg->type == CTL_SET_MEM) {
        int ret = queue_apply_mem(q, msg->mem);
        q->paused = false;
        ctl_reply(t, msg, ret);
    } else {
        ctl_reply(t, msg, 0);
    }
}

static void ctl_handle(struct dp_iothread *t, struct ctl_msg *msg)
{
    struct dp_queue *q = msg->queue;
    if (msg->type == CTL_STOP_THREAD) {
        t->stop_waiter = msg;
        for (uint32_t i = 0; i < t->nqueues; i++)
            t->queues[i]->stopping = true;
        return;
    }
    if (msg->type == CTL_ADD_QUEUE) {
        if (t->nqueues == DP_THREAD_MAX_QUEUES) {
            ctl_reply(t, msg, -ENOSPC);
            return;
        }
        t->queues[t->nqueues++] = q;
        STAT_SET(t->stats.queues, t->nqueues);
        q->attached = true;
        kick_arm(t, q);
        ctl_reply(t, msg, 0);
        return;
    }
    if (!q->attached) {
        ctl_reply(t, msg, -ENOENT);
        return;
    }
    if (q->drain_waiter && msg->type != CTL_RESUME_QUEUE) {
        ctl_reply(t, msg, -EBUSY);
        return;
    }
    switch (msg->type) {
    case CTL_STOP_QUEUE:
        q->stopping = true;
        q->drain_waiter = msg;
        break;
    case CTL_PAUSE_QUEUE:
        q->paused = true;
        q->drain_waiter = msg;
        break;
    case CTL_SET_MEM:
        if (q->paused) {
            /* Nothing is in flight on a drained, paused queue: swap now. */
            if (q->held_count && q->in_flight == q->held_count && !queue_requeue_held(q)) {
                queue_fail_held(q, now_ns());
                queue_publish_and_notify(q);
            }
            ctl_reply(t, msg, q->in_flight ? -EBUSY : queue_apply_mem(q, msg->mem));
            return;
        }
        q->paused = true; /* drain first: in-flight requests point into the old table */
        q->drain_waiter = msg;
        break;
    case CTL_SET_NOTIFIERS:
        /* ctl_reply submits what was queued with the old call fd before the
         * control side may close it. A spurious signal is harmless; a missed
         * one hangs the guest. */
        q->config.call_fd = msg->call_fd;
        q->config.err_fd = msg->err_fd;
        iothread_signal(q, DP_SIGNAL_CALL);
        if (q->broken)
            iothread_signal(q, DP_SIGNAL_ERR);
        ctl_reply(t, msg, 0);
        return;
    case CTL_RESUME_QUEUE:
        q->paused = false;
        queue_retry_held(q, now_ns());
        ctl_reply(t, msg, 0);
        return;
    default:
        ctl_reply(t, msg, -EINVAL);
        return;
    }
    queue_check_drained(t, q);
}

static void ctl_drain_mailbox(struct dp_iothread *t)
{
    pthread_mutex_lock(&t->ctl_lock);
    struct ctl_msg *msg = t->ctl_head;
    t->ctl_head = t->ctl_tail = NULL;
    pthread_mutex_unlock(&t->ctl_lock);
    while (msg) {
        struct ctl_msg *next = msg->next;
        ctl_handle(t, msg);
        msg = next;
    }
}

int iothread_call(struct dp_iothread *t, struct ctl_msg *msg)
{
    msg->done = false;
    msg->next = NULL;
    pthread_mutex_lock(&t->ctl_lock);
    if (t->exited) {
        pthread_mutex_unlock(&t->ctl_lock);
        return -ESHUTDOWN;
    }
    if (t->ctl_tail)
        t->ctl_tail->next = msg;
    else
        t->ctl_head = msg;
    t->ctl_tail = msg;
    pthread_mutex_unlock(&t->ctl_lock);

    uint64_t one = 1;
    if (write(t->ctl_fd, &one, sizeof(one)) < 0)
        return -errno;

    pthread_mutex_lock(&t->ctl_lock);
    while (!msg->done && !t->exited)
        pthread_cond_wait(&t->ctl_cond, &t->ctl_lock);
    int ret = msg->done ? msg->result : -ESHUTDOWN;
    pthread_mutex_unlock(&t->ctl_lock);
    return ret;
}

/* ------------------------------------------------------------ completions */

static void complete_req(struct dp_iothread *t, struct blk_req *req, int res, uint64_t now)
{
    int ret = backend_uring_complete(req, res);
    if (ret == BACKEND_AGAIN) {
        iothread_submit_req(t, req);
        return;
    }
    queue_io_done(req->queue, req, ret, now);
}

/* A polled kick fd is readable: consume the counter. Not with a plain read:
 * the frontend shares the fd's O_NONBLOCK and may clear it, then read the
 * counter first, and read() would wait. RWF_NOWAIT where the kernel has it;
 * else an io_uring read, which waits (if it must) in the ring, into a
 * buffer of the thread's that outlives the queue. Without an SQE the
 * counter stays, and the next poll fires at once. */
static void kick_drain(struct dp_iothread *t, struct dp_queue *q)
{
    if (t->kick_nowait) {
        struct iovec iov = {.iov_base = &q->kick_buf, .iov_len = sizeof(q->kick_buf)};
        ssize_t r = preadv2(q->config.kick_fd, &iov, 1, -1, RWF_NOWAIT);
        (void)r;
        return;
    }
    struct io_uring_sqe *sqe = iothread_get_sqe(t);
    if (!sqe)
        return;
    io_uring_prep_read(sqe, q->config.kick_fd, &t->kick_drain_buf, sizeof(t->kick_drain_buf), 0);
    io_uring_sqe_set_data64(sqe, TAG_IGNORE);
}

static void complete_kick(struct dp_iothread *t, struct dp_queue *q, int res)
{
    q->kick_armed = false;
    q->kick_cancelling = false;
    if (q->stopping)
        return;
    if (res == -EAGAIN && !q->kick_poll) {
        q->kick_poll = true; /* an O_NONBLOCK fd: poll it from now on */
    } else if (res < 0 && res != -EINTR) {
        q->kick_failed = true; /* a bad fd; the queue is still served when polled */
        return;
    } else if (res >= 0) {
        if (q->kick_poll)
            kick_drain(t, q);
        q->kicked = true;
        STAT_ADD(q->stats.kicks, 1);
    }
    kick_arm(t, q);
}

static unsigned reap_completions(struct dp_iothread *t, uint64_t now)
{
    struct io_uring_cqe *cqe;
    unsigned head, n = 0;
    /* Cannot happen while every CQE has room (iothread_get_sqe); counted so
     * that a test, or an operator, would see it. */
    if (IO_URING_READ_ONCE(*t->ring.sq.kflags) & IORING_SQ_CQ_OVERFLOW)
        STAT_ADD(t->stats.cq_overflows, 1);
    io_uring_for_each_cqe(&t->ring, head, cqe) {
        uint64_t data = io_uring_cqe_get_data64(cqe);
        void *ptr = (void *)(uintptr_t)(data & ~(uint64_t)TAG_MASK);
        switch (data & TAG_MASK) {
        case TAG_REQ:
            complete_req(t, ptr, cqe->res, now);
            break;
        case TAG_KICK:
            complete_kick(t, ptr, cqe->res);
            break;
        case TAG_CTL:
            t->ctl_armed = false;
            ctl_drain_mailbox(t);
            ctl_arm(t);
            break;
        default:
            break;
        }
        n++;
    }
    io_uring_cq_advance(&t->ring, n);
    t->cqe_pending -= n;
    return n;
}

/* ------------------------------------------------------------ the loop */

static bool any_queue_ready(struct dp_iothread *t)
{
    for (uint32_t i = 0; i < t->nqueues; i++)
        if (queue_can_pop(t->queues[i]))
            return true;
    return false;
}

static bool completions_ready(struct dp_iothread *t)
{
    if (io_uring_cq_ready(&t->ring))
        return true;
    /* COOP_TASKRUN: finished work waits for us to enter the kernel. */
    if (IO_URING_READ_ONCE(*t->ring.sq.kflags) & IORING_SQ_TASKRUN) {
        io_uring_get_events(&t->ring);
        return io_uring_cq_ready(&t->ring) > 0;
    }
    return false;
}

/* Spins for up to the poll window looking for new requests or completions. */
static bool poll_window(struct dp_iothread *t, uint64_t start)
{
    if (!t->poll_ns)
        return false;
    uint64_t deadline = start + t->poll_ns;
    do {
        if (any_queue_ready(t) || completions_ready(t)) {
            STAT_ADD(t->stats.poll_hits, 1);
            return true;
        }
        __builtin_ia32_pause();
    } while (now_ns() < deadline);
    STAT_ADD(t->stats.poll_misses, 1);
    return false;
}

/* QEMU's rule (poll-max-ns): grow while sleeps are shorter than the maximum,
 * drop when sleeping longer than the maximum anyway. */
static void poll_adjust(struct dp_iothread *t, uint64_t block_ns)
{
    if (!t->poll_max_ns || block_ns <= t->poll_ns)
        return;
    if (block_ns > t->poll_max_ns) {
        t->poll_ns /= 2;
        if (t->poll_ns < POLL_GROW_START_NS)
            t->poll_ns = 0;
    } else if (t->poll_ns < t->poll_max_ns) {
        t->poll_ns = t->poll_ns ? t->poll_ns * 2 : POLL_GROW_START_NS;
        if (t->poll_ns > t->poll_max_ns)
            t->poll_ns = t->poll_max_ns;
    }
    STAT_SET(t->stats.poll_ns, t->poll_ns);
}

/* Ask every queue that could take work for a kick; true if work came meanwhile. */
static bool enable_kicks(struct dp_iothread *t)
{
    bool ready = false;
    for (uint32_t i = 0; i < t->nqueues; i++) {
        struct dp_queue *q = t->queues[i];
        if (queue_accepts_work(q) && vring_split_enable_kicks(&q->vr))
            ready = true;
    }
    return ready;
}

static void disable_kicks(struct dp_iothread *t)
{
    for (uint32_t i = 0; i < t->nqueues; i++)
        vring_split_disable_kicks(&t->queues[i]->vr);
}

/* Arms what found no SQE or CQ room before, and sends owed signals. Every
 * pass: a queue waiting on a kick that is not armed would wait forever, and
 * an owed call is a guest waiting. */
static void iothread_rearm(struct dp_iothread *t)
{
    t->rearm_pending = false;
    ctl_arm(t);
    for (uint32_t i = 0; i < t->nqueues; i++) {
        struct dp_queue *q = t->queues[i];
        if (q->stopping)
            kick_cancel(t, q);
        else
            kick_arm(t, q);
        signals_flush(q);
    }
}

/* One pass over the queues: pop, submit, publish and notify, finish drains.
 * Returns the work done (requests popped and completions reaped). */
static unsigned iothread_pass(struct dp_iothread *t, uint64_t now)
{
    STAT_ADD(t->stats.iterations, 1);
    unsigned work = reap_completions(t, now);

    /* Start each pass at the next queue: with a fixed order, two busy
     * queues on one thread got 0.5-0.8x of each other's IOPS. A queue that
     * spent its share of the pass goes last in the next one, so that the
     * others never wait behind two of its shares in a row. */
    uint32_t nq = t->nqueues;
    if (t->first_queue >= nq)
        t->first_queue = 0;
    uint32_t next_first = t->first_queue + 1;
    for (uint32_t k = 0, i = t->first_queue; k < nq; k++, i = i + 1 == nq ? 0 : i + 1) {
        struct dp_queue *q = t->queues[i];
        if (q->bounce_wait_head)
            bounce_wait_flush(t, q, now);
        work += queue_pop_batch(q, now);
        if (q->budget_spent)
            next_first = i + 1;
        /* What completed (reaped above, or at once while popping) is
         * published now, not after the other queues' pops: a queue's
         * guest does not wait for its neighbours' work. */
        queue_publish_and_notify(q);
    }
    t->first_queue = next_first;
    backlog_flush(t, now);
    /* Drains may detach queues: walk the array backwards. */
    for (uint32_t i = t->nqueues; i-- > 0;) {
        struct dp_queue *q = t->queues[i];
        queue_publish_and_notify(q);
        q->early_published = false;
        if (q->drain_waiter || q->stopping)
            queue_check_drained(t, q);
    }
    if (t->rearm_pending)
        iothread_rearm(t);
    return work;
}

static void iothread_loop(struct dp_iothread *t)
{
    for (;;) {
        uint64_t now = now_ns();
        unsigned work = iothread_pass(t, now);
        if (t->stop_waiter && t->nqueues == 0) {
            ctl_reply(t, t->stop_waiter, 0);
            return;
        }
        if (work) {
            if (io_uring_sq_ready(&t->ring))
                iothread_enter(t, 0);
            continue;
        }
        if (poll_window(t, now))
            continue;
        if (enable_kicks(t)) {
            disable_kicks(t);
            continue;
        }
        if (t->rearm_pending) {
            /* Unarmed, a kick or a control message would never wake us:
             * reap what frees room, then arm again. */
            iothread_enter(t, 0);
            io_uring_get_events(&t->ring);
            continue;
        }
        uint64_t before = now_ns();
        STAT_ADD(t->stats.waits, 1);
        iothread_enter(t, 1);
        poll_adjust(t, now_ns() - before);
        disable_kicks(t);
    }
}

/* The io_uring failed in a way that may have lost completions (-EBADR: the
 * kernel dropped CQEs it could not buffer; the CQE accounting above keeps
 * that from happening) or cannot go on. Requests may never complete: every
 * queue is broken (its err fd written directly: the ring may not carry it)
 * and the reason is kept for the control side to log. A drain still waits
 * for what is in flight (the kernel may yet write into those buffers), but
 * never silently. */
static void iothread_fail(struct dp_iothread *t, int err)
{
    if (t->failed)
        return;
    t->failed = err;
    STAT_SET(t->stats.failed, err);
    for (uint32_t i = 0; i < t->nqueues; i++) {
        struct dp_queue *q = t->queues[i];
        if (q->broken)
            continue;
        q->broken = true;
        /* The thread's own stats keep err; the queue says why it broke. */
        STAT_SET(q->stats.broken_reason, err == -EBADR ? -EBADR : -ECANCELED);
        STAT_SET(q->stats.broken, 1);
        if (q->config.err_fd >= 0) {
            uint64_t one = 1;
            ssize_t r = write(q->config.err_fd, &one, sizeof(one));
            (void)r;
        }
    }
}

/* ------------------------------------------------------------ setup */

static int iothread_pin(struct dp_iothread *t)
{
    if (!t->cpu_count)
        return 0;
    cpu_set_t set;
    CPU_ZERO(&set);
    for (uint32_t i = 0; i < t->cpu_count; i++)
        CPU_SET((size_t)t->cpus[i], &set);
    if (sched_setaffinity(0, sizeof(set), &set) < 0)
        return -errno;
    if (numa_available() >= 0) {
        int node = numa_node_of_cpu(t->cpus[0]);
        if (node >= 0) {
            t->numa_node = node;
            numa_set_preferred(node); /* the io_uring rings come from here */
        }
    }
    return 0;
}

/* Eventfds take RWF_NOWAIT from Linux 5.12 on; before, it is refused
 * (-EOPNOTSUPP) and would lose every signal and kick. Probed once, on a
 * private eventfd, with the thread's own (still empty) ring; without it we
 * rely on the fds' O_NONBLOCK alone. */
static void iothread_probe_nowait(struct dp_iothread *t)
{
    int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (fd < 0)
        return;
    uint64_t value = 0;
    struct iovec iov = {.iov_base = &value, .iov_len = sizeof(value)};
    t->kick_nowait = write(fd, &notify_value, sizeof(notify_value)) == sizeof(notify_value) &&
                     preadv2(fd, &iov, 1, -1, RWF_NOWAIT) == sizeof(value);
    struct io_uring_sqe *sqe = io_uring_get_sqe(&t->ring);
    struct io_uring_cqe *cqe;
    if (sqe) {
        io_uring_prep_write(sqe, fd, &notify_value, sizeof(notify_value), 0);
        sqe->rw_flags = RWF_NOWAIT;
        io_uring_sqe_set_data64(sqe, TAG_IGNORE);
        if (io_uring_submit_and_wait(&t->ring, 1) >= 0 && io_uring_peek_cqe(&t->ring, &cqe) == 0) {
            t->signal_nowait = cqe->res == sizeof(notify_value);
            io_uring_cqe_seen(&t->ring, cqe);
        }
    }
    close(fd);
}

static int iothread_setup(struct dp_iothread *t)
{
    int ret = iothread_pin(t);
    if (ret)
        return ret;
    struct io_uring_params p;
    memset(&p, 0, sizeof(p));
    p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN |
              IORING_SETUP_TASKRUN_FLAG;
    /* Requests in flight are capped by the CQ (iothread_get_req_sqe); a
     * large one keeps that cap out of the way of deep queues. */
    uint32_t cq_entries = t->ring_entries * 4 > DP_THREAD_MIN_CQ ? t->ring_entries * 4 : DP_THREAD_MIN_CQ;
    p.cq_entries = cq_entries;
    ret = io_uring_queue_init_params(t->ring_entries, &t->ring, &p);
    if (ret == -EINVAL) { /* older kernels: no SINGLE_ISSUER/COOP_TASKRUN */
        memset(&p, 0, sizeof(p));
        p.flags = IORING_SETUP_CQSIZE;
        p.cq_entries = cq_entries;
        ret = io_uring_queue_init_params(t->ring_entries, &t->ring, &p);
    }
    if (ret)
        return ret;
    t->ring_ready = true;
    t->cq_entries = p.cq_entries;
    io_uring_register_ring_fd(&t->ring); /* saves an fget per enter; optional */
    iothread_probe_nowait(t);
    ctl_arm(t);
    iothread_enter(t, 0);
    return 0;
}

static void *iothread_main(void *arg)
{
    struct dp_iothread *t = arg;
    pthread_setname_np(pthread_self(), t->name);
    int ret = iothread_setup(t);

    pthread_mutex_lock(&t->ctl_lock);
    t->setup_result = ret;
    t->setup_done = true;
    if (ret)
        t->exited = true;
    pthread_cond_broadcast(&t->ctl_cond);
    pthread_mutex_unlock(&t->ctl_lock);
    if (ret)
        return NULL;

    iothread_loop(t);

    pthread_mutex_lock(&t->ctl_lock);
    t->exited = true;
    /* Messages that raced with the stop get an answer too. */
    for (struct ctl_msg *m = t->ctl_head; m; m = m->next) {
        m->result = m->type == CTL_STOP_THREAD ? 0 : -ESHUTDOWN;
        m->done = true;
    }
    t->ctl_head = t->ctl_tail = NULL;
    pthread_cond_broadcast(&t->ctl_cond);
    pthread_mutex_unlock(&t->ctl_lock);
    return NULL;
}

int dp_iothread_create(const struct dp_iothread_config *config, struct dp_iothread **out)
{
    if (!config || !out || config->cpu_count > DP_MAX_CPUS || (config->cpu_count && !config->cpus))
        return -EINVAL;
    uint32_t entries = config->ring_entries ? config->ring_entries : 256;
    if (entries > 32768 || (entries & (entries - 1)))
        return -EINVAL;
    for (uint32_t i = 0; i < config->cpu_count; i++)
        if (config->cpus[i] < 0 || config->cpus[i] >= CPU_SETSIZE)
            return -EINVAL;

    struct dp_iothread *t = calloc(1, sizeof(*t));
    if (!t)
        return -ENOMEM;
    t->numa_node = -1;
    t->ring_entries = entries;
    t->poll_max_ns = config->poll_max_ns;
    t->notify_after = config->notify_after;
    t->cpu_count = config->cpu_count;
    if (config->cpu_count)
        memcpy(t->cpus, config->cpus, config->cpu_count * sizeof(int32_t));
    memcpy(t->name, config->name, sizeof(t->name));
    t->name[sizeof(t->name) - 1] = 0;
    if (!t->name[0])
        strcpy(t->name, "dp-iothread");
    pthread_mutex_init(&t->ctl_lock, NULL);
    pthread_cond_init(&t->ctl_cond, NULL);
    t->ctl_fd = eventfd(0, EFD_CLOEXEC);
    if (t->ctl_fd < 0) {
        int err = -errno;
        free(t);
        return err;
    }
    int ret = pthread_create(&t->tid, NULL, iothread_main, t);
    if (ret) {
        close(t->ctl_fd);
        free(t);
        return -ret;
    }
    pthread_mutex_lock(&t->ctl_lock);
    while (!t->setup_done)
        pthread_cond_wait(&t->ctl_cond, &t->ctl_lock);
    ret = t->setup_result;
    pthread_mutex_unlock(&t->ctl_lock);
    if (ret) {
        pthread_join(t->tid, NULL);
        close(t->ctl_fd);
        free(t);
        return ret;
    }
    pthread_getcpuclockid(t->tid, &t->cpu_clock);
    *out = t;
    return 0;
}

int dp_iothread_stop(struct dp_iothread *t)
{
    if (!t)
        return -EINVAL;
    struct ctl_msg msg = {.type = CTL_STOP_THREAD};
    int ret = iothread_call(t, &msg);
    if (ret == -ESHUTDOWN)
        ret = 0;
    if (ret)
        return ret; /* it never got the message: joining would wait forever */
    if (t->tid) {
        pthread_join(t->tid, NULL);
        t->tid = 0;
    }
    return ret;
}

void dp_iothread_destroy(struct dp_iothread *t)
{
    if (!t)
        return;
    dp_iothread_stop(t);
    if (t->ring_ready)
        io_uring_queue_exit(&t->ring);
    close(t->ctl_fd);
    pthread_mutex_destroy(&t->ctl_lock);
    pthread_cond_destroy(&t->ctl_cond);
    free(t);
}

int dp_iothread_get_stats(const struct dp_iothread *t, struct dp_iothread_stats *out)
{
    if (!t || !out)
        return -EINVAL;
    stats_thread_snapshot(&t->stats, out);
    struct timespec ts;
    if (t->tid && clock_gettime(t->cpu_clock, &ts) == 0)
        out->cpu_ns = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
    return 0;
}

int dp_iothread_numa_node(const struct dp_iothread *t)
{
    return t ? t->numa_node : -1;
}
