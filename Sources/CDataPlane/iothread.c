/* The IOThread: one pinned thread, one loop (its io_uring), many queues.
 * It waits on kick eventfds, I/O completions and its control eventfd in one
 * place (the loop's enter), optionally busy-polls the avail rings first,
 * and takes control messages between passes. The top of the core: it calls
 * the queues and the loop, and nothing below calls it. */
#include <errno.h>
#include <numa.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include "backend.h"
#include "iothread.h"
#include "loop.h"
#include "queue_ctl.h"

#define POLL_GROW_START_NS 4000 /* as QEMU's aio poll: start at 4 us, then double */

struct dp_iothread {
    struct loop loop;
    struct uring_backend uring; /* the io_uring file backend's requests waiting for SQEs */
    pthread_t tid;
    clockid_t cpu_clock;
    bool exiting;
    int numa_node;
    int ctl_fd;
    bool ctl_armed;
    struct loop_op ctl_op;   /* the control eventfd read's completion */
    struct loop_op fail_op;  /* the loop failed */
    uint64_t ctl_buf;
    uint64_t poll_ns;
    uint64_t poll_max_ns;
    uint32_t notify_after;   /* copied into each queue it serves */
    struct dp_queue *queues[DP_THREAD_MAX_QUEUES];
    uint32_t nqueues;
    uint32_t first_queue;    /* where the next pass over the queues starts */
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
    uint32_t ring_entries;
    uint32_t disabled_features;

    struct dp_thread_counters stats;
};

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

/* ------------------------------------------------------------ queues on the thread */

/* Requests leave room for every queue's kick read, its cancel and drain,
 * a call and an err signal and its throttle timer, and for control, so
 * that those are never starved by I/O (loop_get_req_sqe). */
static void queues_changed(struct dp_iothread *t)
{
    t->loop.req_reserve = 8 + 6 * t->nqueues;
    STAT_SET(t->stats.queues, t->nqueues);
}

static int queue_index(struct dp_iothread *t, struct dp_queue *q)
{
    for (uint32_t i = 0; i < t->nqueues; i++)
        if (t->queues[i] == q)
            return (int)i;
    return -1;
}

static void queue_drop(struct dp_iothread *t, struct dp_queue *q)
{
    int i = queue_index(t, q);
    if (i >= 0) {
        t->queues[i] = t->queues[--t->nqueues];
        queues_changed(t);
    }
}

/* The io_uring failed in a way that may have lost completions (-EBADR: the
 * kernel dropped CQEs it could not buffer; the CQE accounting keeps that
 * from happening) or cannot go on. Requests may never complete: every
 * queue is broken and the reason is kept for the control side to log. A
 * drain still waits for what is in flight (the kernel may yet write into
 * those buffers), but never silently. */
static void loop_failed(struct loop_op *op, int err, uint32_t cqe_flags)
{
    (void)cqe_flags;
    struct dp_iothread *t = dp_container_of(op, struct dp_iothread, fail_op);
    for (uint32_t i = 0; i < t->nqueues; i++)
        queue_break_loop_failed(t->queues[i], err);
}

/* ------------------------------------------------------------ control messages */

static void ctl_arm(struct dp_iothread *t)
{
    if (t->ctl_armed)
        return;
    if (loop_arm_read(&t->loop, t->ctl_fd, &t->ctl_buf, &t->ctl_op)) {
        t->loop.rearm_pending = true;
        return;
    }
    t->ctl_armed = true;
}

static void ctl_reply(struct dp_iothread *t, struct ctl_msg *msg, int result)
{
    /* Anything queued that names the queue's fds must reach the kernel
     * before the control side may close them. */
    if (loop_sq_ready(&t->loop))
        loop_enter(&t->loop, 0);
    pthread_mutex_lock(&t->ctl_lock);
    msg->result = result;
    msg->done = true;
    pthread_cond_broadcast(&t->ctl_cond);
    pthread_mutex_unlock(&t->ctl_lock);
}

/* Finishes a stop, pause or memory swap once the queue has nothing in flight. */
static void check_drained(struct dp_iothread *t, struct dp_queue *q)
{
    bool detach;
    int result;
    struct ctl_msg *msg = queue_check_drained(q, &detach, &result);
    if (detach)
        queue_drop(t, q);
    if (msg)
        ctl_reply(t, msg, result);
}

/* Ends every armed multishot kick poll (tests: the kernel does so when its
 * CQ has no room); each queue arms its own again. */
static int end_kick_polls(struct dp_iothread *t)
{
    int n = 0;
    for (uint32_t i = 0; i < t->nqueues; i++)
        n += queue_kick_end_poll(t->queues[i]);
    return n;
}

static void ctl_add_queue(struct dp_iothread *t, struct ctl_msg *msg)
{
    if (t->nqueues == DP_THREAD_MAX_QUEUES) {
        ctl_reply(t, msg, -ENOSPC);
        return;
    }
    t->queues[t->nqueues++] = msg->queue;
    queues_changed(t);
    queue_attach(msg->queue, &t->loop, &t->uring);
    ctl_reply(t, msg, 0);
}

static void ctl_handle(struct dp_iothread *t, struct ctl_msg *msg)
{
    switch (msg->type) {
    case CTL_END_KICK_POLLS:
        ctl_reply(t, msg, end_kick_polls(t));
        return;
    case CTL_STOP_THREAD:
        t->stop_waiter = msg;
        for (uint32_t i = 0; i < t->nqueues; i++)
            t->queues[i]->stopping = true;
        return;
    case CTL_ADD_QUEUE:
        ctl_add_queue(t, msg);
        return;
    default: {
        int ret = queue_ctl(msg->queue, msg);
        if (ret == QUEUE_CTL_DRAIN)
            check_drained(t, msg->queue);
        else
            ctl_reply(t, msg, ret);
        return;
    }
    }
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

/* The control eventfd fired: take what is in the mailbox, arm again. */
static void ctl_done(struct loop_op *op, int res, uint32_t cqe_flags)
{
    (void)res, (void)cqe_flags;
    struct dp_iothread *t = dp_container_of(op, struct dp_iothread, ctl_op);
    t->ctl_armed = false;
    ctl_drain_mailbox(t);
    ctl_arm(t);
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

/* ------------------------------------------------------------ the loop */

static bool any_queue_ready(struct dp_iothread *t)
{
    for (uint32_t i = 0; i < t->nqueues; i++)
        if (queue_can_pop(t->queues[i]))
            return true;
    return false;
}

/* Spins for up to the poll window looking for new requests or completions. */
static bool poll_window(struct dp_iothread *t, uint64_t start)
{
    if (!t->poll_ns)
        return false;
    uint64_t deadline = start + t->poll_ns;
    uint64_t now = now_ns();
    stats_thread_phase(&t->stats.time, DP_PHASE_POLL, now);
    do {
        if (any_queue_ready(t) || loop_completions_ready(&t->loop)) {
            /* The last spin's clock: off by one spin at most, and a hit
             * (the hot case) reads no clock of its own. */
            stats_thread_phase(&t->stats.time, DP_PHASE_BUSY, now);
            STAT_ADD(t->stats.poll_hits, 1);
            return true;
        }
        __builtin_ia32_pause();
    } while ((now = now_ns()) < deadline);
    stats_thread_phase(&t->stats.time, DP_PHASE_BUSY, now);
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
        if (queue_enable_kicks(q))
            ready = true;
    }
    return ready;
}

static void disable_kicks(struct dp_iothread *t)
{
    for (uint32_t i = 0; i < t->nqueues; i++)
        queue_disable_kicks(t->queues[i]);
}

/* Arms what found no SQE or CQ room before, and sends owed signals. Every
 * pass: a queue waiting on a kick that is not armed would wait forever, and
 * an owed call is a guest waiting. */
static void iothread_rearm(struct dp_iothread *t)
{
    t->loop.rearm_pending = false;
    ctl_arm(t);
    for (uint32_t i = 0; i < t->nqueues; i++) {
        struct dp_queue *q = t->queues[i];
        if (q->stopping)
            queue_kick_cancel(q);
        else
            queue_kick_arm(q);
        queue_signals_flush(q);
    }
}

/* One pass over the queues: pop, submit, publish and notify, finish drains.
 * Returns the work done (requests popped and completions reaped). */
static unsigned iothread_pass(struct dp_iothread *t, uint64_t now)
{
    STAT_ADD(t->stats.iterations, 1);
    t->loop.now = now;
    unsigned work = loop_reap(&t->loop);

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
        if (q->io.bounce.wait_head && q->io.ops->retry_waiting)
            q->io.ops->retry_waiting(&q->io, now);
        work += queue_pop_batch(q, now);
        if (q->budget_spent)
            next_first = i + 1;
        /* What completed (reaped above, or at once while popping) is
         * published now, not after the other queues' pops: a queue's
         * guest does not wait for its neighbours' work. */
        queue_publish_and_notify(q);
    }
    t->first_queue = next_first;
    backend_uring_flush(&t->uring, now);
    /* Drains may detach queues: walk the array backwards. */
    for (uint32_t i = t->nqueues; i-- > 0;) {
        struct dp_queue *q = t->queues[i];
        queue_publish_and_notify(q);
        q->early_published = false;
        if (q->drain_waiter || q->stopping)
            check_drained(t, q);
    }
    if (t->loop.rearm_pending)
        iothread_rearm(t);
    return work;
}

static void iothread_loop(struct dp_iothread *t)
{
    stats_thread_phase(&t->stats.time, DP_PHASE_BUSY, now_ns());
    for (;;) {
        uint64_t now = now_ns();
        unsigned work = iothread_pass(t, now);
        if (t->stop_waiter && t->nqueues == 0) {
            stats_thread_phase(&t->stats.time, DP_PHASES, now_ns());
            ctl_reply(t, t->stop_waiter, 0);
            return;
        }
        if (work) {
            /* Busy with requests that need no SQE (the null backend, a
             * guest that wants no interrupts), it would otherwise never
             * enter: kicks, control messages and completions would wait. */
            if (loop_sq_ready(&t->loop))
                loop_enter(&t->loop, 0);
            else
                loop_run_task_work(&t->loop);
            continue;
        }
        if (poll_window(t, now))
            continue;
        if (enable_kicks(t)) {
            disable_kicks(t);
            continue;
        }
        if (t->loop.rearm_pending) {
            /* Unarmed, a kick or a control message would never wake us:
             * reap what frees room, then arm again. */
            loop_enter(&t->loop, 0);
            loop_get_events(&t->loop);
            continue;
        }
        uint64_t before = now_ns();
        STAT_ADD(t->stats.waits, 1);
        stats_thread_phase(&t->stats.time, DP_PHASE_SLEEP, before);
        loop_enter(&t->loop, 1);
        uint64_t after = now_ns();
        stats_thread_phase(&t->stats.time, DP_PHASE_BUSY, after);
        poll_adjust(t, after - before);
        disable_kicks(t);
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

static int iothread_setup(struct dp_iothread *t)
{
    int ret = iothread_pin(t);
    if (ret)
        return ret;
    t->ctl_op.done = ctl_done;
    t->fail_op.done = loop_failed;
    t->loop.on_fail = &t->fail_op;
    t->uring.loop = &t->loop;
    queues_changed(t);
    ret = loop_init(&t->loop, t->ring_entries, t->disabled_features, &t->stats);
    if (ret)
        return ret;
    ctl_arm(t);
    loop_enter(&t->loop, 0);
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
    t->disabled_features = config->disabled_features;
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
    loop_exit(&t->loop); /* and the buffers of queues never detached (a failed stop) */
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

int dp_iothread_end_kick_polls(struct dp_iothread *t)
{
    if (!t)
        return -EINVAL;
    struct ctl_msg msg = {.type = CTL_END_KICK_POLLS};
    return iothread_call(t, &msg);
}

struct dp_thread_counters *iothread_counters(struct dp_iothread *t)
{
    return &t->stats;
}

uint32_t iothread_notify_after(const struct dp_iothread *t)
{
    return t->notify_after;
}
