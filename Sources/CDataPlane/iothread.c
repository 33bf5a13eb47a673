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
#include "guest_mem.h"

#define POLL_GROW_START_NS 4000 /* as QEMU's aio poll: start at 4 us, then double */

/* From the kernel's UAPI, for liburing headers that predate them. */
#ifndef IORING_SETUP_DEFER_TASKRUN
#define IORING_SETUP_DEFER_TASKRUN (1U << 13)
#endif
#ifndef IORING_POLL_ADD_MULTI
#define IORING_POLL_ADD_MULTI (1U << 0)
#endif

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
    uint32_t kick_multishots; /* multishot kick polls armed: each may post more CQEs */
    uint32_t features;       /* DP_URING_* in use (probed, not disabled) */
    uint32_t disabled_features;
    uint32_t ring_features;  /* IORING_FEAT_* of the ring */
    int failed;              /* the io_uring failed us (-errno): every queue is broken */
    struct dp_queue *queues[DP_THREAD_MAX_QUEUES];
    uint32_t nqueues;
    uint32_t first_queue;    /* where the next pass over the queues starts */
    bool rearm_pending;      /* a kick or control read found no SQE: arm before sleeping */
    struct blk_req *backlog_head; /* requests waiting for an SQE or a retry */
    struct blk_req *backlog_tail;
    struct ctl_msg *stop_waiter;

    /* Registered disk fds, by slot (DP_URING_REGISTERED_FILES). */
    struct {
        struct dp_disk *disk;
        uint32_t refs;        /* queues on this thread using it */
    } files[DP_THREAD_FILE_SLOTS];
    /* Registered memory tables (DP_URING_FIXED_BUFFERS), and which slots of
     * the buffer table they hold. */
    struct buffer_reg *buffer_regs[DP_THREAD_MAX_QUEUES];
    uint32_t nbuffer_regs;
    uint64_t buffer_slots[DP_THREAD_BUFFER_SLOTS / 64];

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
 * starved by I/O. A multishot kick poll is counted once, for its last CQE,
 * but posts one per kick: the kernel posts those only where the CQ has room
 * (without room it ends the poll, with that last CQE, and we arm it again),
 * and it coalesces kicks until the thread runs its task work, so each armed
 * poll keeps DP_KICK_CQE_RESERVE more free for what may come before the next
 * reap. What has no room waits in the backlog, in order. */
struct io_uring_sqe *iothread_get_req_sqe(struct dp_iothread *t)
{
    return iothread_get_sqe_reserving(t, 8 + 5 * t->nqueues + DP_KICK_CQE_RESERVE * t->kick_multishots);
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
    if (t->features & DP_URING_MULTISHOT_KICKS) {
        /* Armed once, it posts a CQE (IORING_CQE_F_MORE) per kick; each is
         * consumed with kick_drain. */
        io_uring_prep_poll_multishot(sqe, q->config.kick_fd, POLLIN);
        io_uring_sqe_set_data64(sqe, (uint64_t)(uintptr_t)q | TAG_KICK);
        q->kick_armed = true;
        q->kick_multishot = true;
        t->kick_multishots++;
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

/* ------------------------------------------------------------ registered files and buffers */

/* The slot of a disk's fd in the registered file table, registered with the
 * first of the thread's queues on the disk; -1 when it cannot be (the queue
 * names the plain fd then). */
static int file_slot_get(struct dp_iothread *t, struct dp_disk *disk)
{
    int free_slot = -1;
    for (int i = 0; i < DP_THREAD_FILE_SLOTS; i++) {
        if (t->files[i].disk == disk) {
            t->files[i].refs++;
            return i;
        }
        if (!t->files[i].disk && free_slot < 0)
            free_slot = i;
    }
    if (free_slot < 0 || io_uring_register_files_update(&t->ring, (unsigned)free_slot, &disk->fd, 1) != 1)
        return -1;
    t->files[free_slot].disk = disk;
    t->files[free_slot].refs = 1;
    STAT_ADD(t->stats.registered_files, 1);
    return free_slot;
}

/* With the last queue on the disk, the slot is emptied (the kernel drops
 * its reference to the file once no request uses it). */
static void file_slot_put(struct dp_iothread *t, int slot)
{
    if (slot < 0 || --t->files[slot].refs)
        return;
    const int none = -1;
    io_uring_register_files_update(&t->ring, (unsigned)slot, &none, 1);
    t->files[slot].disk = NULL;
    STAT_SET(t->stats.registered_files, STAT_LOAD(t->stats.registered_files) - 1);
}

static bool buffer_slot_used(const struct dp_iothread *t, uint32_t i)
{
    return t->buffer_slots[i / 64] & (1ull << (i % 64));
}

static void buffer_slots_mark(struct dp_iothread *t, uint32_t first, uint32_t n, bool used)
{
    for (uint32_t i = first; i < first + n; i++) {
        if (used)
            t->buffer_slots[i / 64] |= 1ull << (i % 64);
        else
            t->buffer_slots[i / 64] &= ~(1ull << (i % 64));
    }
}

/* Empties registered buffers: the kernel unpins their pages once no
 * request uses them. */
static void buffer_slots_clear(struct dp_iothread *t, uint32_t first, uint32_t n)
{
    const struct iovec none = {0};
    const __u64 tag = 0;
    for (uint32_t i = first; i < first + n; i++)
        io_uring_register_buffers_update_tag(&t->ring, i, &none, &tag, 1);
}

/* Registers every region of b's memory table, a piece of at most
 * 1 << DP_BUFFER_PIECE_SHIFT bytes per slot (the kernel's limit), in one
 * run of free slots: all of it or none. -ENOSPC when the table is full;
 * else the kernel's error (-ENOMEM past RLIMIT_MEMLOCK without
 * CAP_IPC_LOCK, -EFAULT for memory that cannot be pinned, such as a shared
 * mapping of a file on a disk filesystem). */
static int buffer_register(struct dp_iothread *t, struct buffer_reg *b)
{
    const struct dp_mem *mem = b->mem;
    uint32_t n = 0;
    for (uint32_t i = 0; i < mem->count; i++) {
        b->piece_base[i] = (uint16_t)n;
        n += (uint32_t)((mem->regions[i].size - 1) >> DP_BUFFER_PIECE_SHIFT) + 1;
        if (n > DP_THREAD_BUFFER_SLOTS)
            return -ENOSPC;
    }
    uint32_t run = 0, first = 0;
    for (uint32_t i = 0; i < DP_THREAD_BUFFER_SLOTS && run < n; i++) {
        run = buffer_slot_used(t, i) ? 0 : run + 1;
        first = i + 1 - run;
    }
    if (!n || run < n)
        return -ENOSPC;
    const uint64_t piece = 1ull << DP_BUFFER_PIECE_SHIFT;
    uint32_t done = 0;
    int ret = 0;
    for (uint32_t i = 0; i < mem->count && !ret; i++) {
        const struct dp_mem_region *r = &mem->regions[i];
        for (uint64_t off = 0; off < r->size && !ret; off += piece) {
            struct iovec iov = {.iov_base = (uint8_t *)r->host_addr + off,
                                .iov_len = r->size - off < piece ? r->size - off : piece};
            const __u64 tag = 0;
            int got = io_uring_register_buffers_update_tag(&t->ring, first + done, &iov, &tag, 1);
            if (got == 1)
                done++;
            else
                ret = got < 0 ? got : -EIO;
            if (off + piece < off)
                break; /* a region ending at 2^64 */
        }
    }
    if (ret) {
        buffer_slots_clear(t, first, done);
        return ret;
    }
    buffer_slots_mark(t, first, n, true);
    b->first_slot = (int32_t)first;
    b->nslots = n;
    STAT_ADD(t->stats.registered_buffers, n);
    return 0;
}

/* Points a queue at mem's registration on this thread, registering mem with
 * the first queue that uses it; or at none (its disk does not ask for it,
 * or the ring has no buffer table). A table that failed to register stays
 * failed for the queues that share it: they do not pin it again. */
static void queue_buffers_attach(struct dp_iothread *t, struct dp_queue *q, const struct dp_mem *mem)
{
    q->buffers = NULL;
    q->buffer_hint = 0;
    if (!(t->features & DP_URING_FIXED_BUFFERS) || !q->disk->fixed_buffers)
        return;
    for (uint32_t i = 0; i < t->nbuffer_regs; i++) {
        if (t->buffer_regs[i]->mem == mem) {
            t->buffer_regs[i]->refs++;
            q->buffers = t->buffer_regs[i];
            return;
        }
    }
    /* One table per queue at most: there is always an entry free. */
    struct buffer_reg *b = calloc(1, sizeof(*b));
    int ret = b ? 0 : -ENOMEM;
    if (b) {
        b->mem = mem;
        b->refs = 1;
        b->first_slot = -1;
        ret = buffer_register(t, b);
        t->buffer_regs[t->nbuffer_regs++] = b;
        q->buffers = b;
    }
    if (ret) {
        STAT_ADD(t->stats.buffer_register_failures, 1);
        STAT_SET(t->stats.buffer_register_error, ret);
    }
}

static void buffer_reg_put(struct dp_iothread *t, struct buffer_reg *b)
{
    if (!b || --b->refs)
        return;
    if (b->first_slot >= 0) {
        buffer_slots_clear(t, (uint32_t)b->first_slot, b->nslots);
        buffer_slots_mark(t, (uint32_t)b->first_slot, b->nslots, false);
        STAT_SET(t->stats.registered_buffers, STAT_LOAD(t->stats.registered_buffers) - b->nslots);
    }
    for (uint32_t i = 0; i < t->nbuffer_regs; i++) {
        if (t->buffer_regs[i] == b) {
            t->buffer_regs[i] = t->buffer_regs[--t->nbuffer_regs];
            break;
        }
    }
    free(b);
}

/* Names the queue's disk and memory on this ring: its registered file and
 * buffers where the ring has them. */
static void queue_attach_ring(struct dp_iothread *t, struct dp_queue *q)
{
    q->single_rw = (t->features & DP_URING_SINGLE_RW) != 0;
    if (q->disk->backend != DP_BACKEND_FILE)
        return;
    if (t->features & DP_URING_REGISTERED_FILES) {
        int slot = file_slot_get(t, q->disk);
        if (slot >= 0) {
            q->file_slot = slot;
            q->ring_fd = slot;
            q->ring_fd_flags = IOSQE_FIXED_FILE;
        }
    }
    queue_buffers_attach(t, q, q->mem);
}

/* The queue leaves the thread with nothing in flight: what it had
 * registered goes with its last user. */
static void queue_detach_ring(struct dp_iothread *t, struct dp_queue *q)
{
    file_slot_put(t, q->file_slot);
    q->file_slot = -1;
    q->ring_fd = q->disk->fd;
    q->ring_fd_flags = 0;
    struct buffer_reg *b = q->buffers;
    q->buffers = NULL;
    buffer_reg_put(t, b);
}

static void queue_detach(struct dp_iothread *t, struct dp_queue *q)
{
    int i = queue_index(t, q);
    if (i >= 0) {
        t->queues[i] = t->queues[--t->nqueues];
        STAT_SET(t->stats.queues, t->nqueues);
    }
    queue_detach_ring(t, q);
    q->attached = false;
}

/* Re-points a queue's rings at a new memory table, and its fixed buffers
 * (nothing is in flight: the queue was drained). The new table is
 * registered before the old one is let go, so that a table the queue keeps
 * is not unpinned and pinned again. */
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
    if (q->disk->backend == DP_BACKEND_FILE) {
        struct buffer_reg *old = q->buffers;
        queue_buffers_attach(q->thread, q, mem);
        buffer_reg_put(q->thread, old);
    }
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

/* Ends every armed multishot kick poll (tests: the kernel does so when its
 * CQ has no room); complete_kick arms each again. */
static int end_kick_polls(struct dp_iothread *t)
{
    int n = 0;
    for (uint32_t i = 0; i < t->nqueues; i++) {
        struct dp_queue *q = t->queues[i];
        if (!q->kick_armed || !q->kick_multishot || q->kick_cancelling)
            continue;
        struct io_uring_sqe *sqe = iothread_get_sqe(t);
        if (!sqe)
            break;
        io_uring_prep_poll_remove(sqe, (uint64_t)(uintptr_t)q | TAG_KICK);
        io_uring_sqe_set_data64(sqe, TAG_IGNORE);
        n++;
    }
    return n;
}

static void ctl_handle(struct dp_iothread *t, struct ctl_msg *msg)
{
    struct dp_queue *q = msg->queue;
    if (msg->type == CTL_END_KICK_POLLS) {
        ctl_reply(t, msg, end_kick_polls(t));
        return;
    }
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
        queue_attach_ring(t, q);
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

static void complete_kick(struct dp_iothread *t, struct dp_queue *q, int res, uint32_t flags)
{
    if (flags & IORING_CQE_F_MORE) {
        /* The multishot poll is still armed: a kick. Consumed before the
         * pass pops, so no kick it counts comes after what the pass sees. */
        if (q->stopping || res <= 0)
            return;
        kick_drain(t, q);
        q->kicked = true;
        STAT_ADD(q->stats.kicks, 1);
        return;
    }
    bool multishot = q->kick_multishot;
    if (multishot) {
        q->kick_multishot = false;
        t->kick_multishots--;
    }
    q->kick_armed = false;
    q->kick_cancelling = false;
    if (q->stopping)
        return;
    if (multishot) {
        /* Ended: by the kernel (no room in the CQ: res is still a kick), or
         * cancelled by someone else; a bad fd (other errors) is as below. */
        if (res < 0 && res != -ECANCELED && res != -EINTR) {
            q->kick_failed = true;
            return;
        }
        if (res > 0) {
            kick_drain(t, q);
            q->kicked = true;
            STAT_ADD(q->stats.kicks, 1);
        }
        STAT_ADD(t->stats.kick_rearms, 1);
        kick_arm(t, q);
        return;
    }
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
    unsigned head, n = 0, more = 0;
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
            complete_kick(t, ptr, cqe->res, cqe->flags);
            break;
        case TAG_CTL:
            t->ctl_armed = false;
            ctl_drain_mailbox(t);
            ctl_arm(t);
            break;
        default:
            break;
        }
        /* A multishot CQE that says more will follow was never counted. */
        if (cqe->flags & IORING_CQE_F_MORE)
            more++;
        n++;
    }
    io_uring_cq_advance(&t->ring, n);
    t->cqe_pending -= n - more;
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

/* COOP_TASKRUN and DEFER_TASKRUN: finished work waits for this thread to
 * enter the kernel (with DEFER_TASKRUN, asking for completions: nothing
 * else posts them, not even a timer tick). The kernel flags that it waits
 * (IORING_SQ_TASKRUN); this enters for it. io_uring_submit does the same
 * when it enters. */
static void iothread_run_task_work(struct dp_iothread *t)
{
    if (IO_URING_READ_ONCE(*t->ring.sq.kflags) & IORING_SQ_TASKRUN)
        io_uring_get_events(&t->ring);
}

static bool completions_ready(struct dp_iothread *t)
{
    if (io_uring_cq_ready(&t->ring))
        return true;
    iothread_run_task_work(t);
    return io_uring_cq_ready(&t->ring) > 0;
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
            /* Busy with requests that need no SQE (the null backend, a
             * guest that wants no interrupts), it would otherwise never
             * enter: kicks, control messages and completions would wait. */
            if (io_uring_sq_ready(&t->ring))
                iothread_enter(t, 0);
            else
                iothread_run_task_work(t);
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

/* A private eventfd, polled multishot: two CQEs with IORING_CQE_F_MORE
 * (Linux 5.13; before, the flag is refused). Every CQE is reaped here, the
 * poll removed first. Needs RWF_NOWAIT reads of eventfds (kick_drain) and
 * IORING_FEAT_EXT_ARG (5.11), for a wait that cannot hang. */
static bool iothread_probe_multishot(struct dp_iothread *t)
{
    if (!t->kick_nowait || !(t->ring_features & IORING_FEAT_EXT_ARG))
        return false;
    int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (fd < 0)
        return false;
    const uint64_t probe = 8 | TAG_IGNORE; /* ignored if it ever reached the loop */
    struct io_uring_sqe *sqe = io_uring_get_sqe(&t->ring);
    if (!sqe) {
        close(fd);
        return false;
    }
    io_uring_prep_poll_multishot(sqe, fd, POLLIN);
    io_uring_sqe_set_data64(sqe, probe);
    unsigned kicks = 0, owed = 1; /* the poll's last CQE, then the remove's */
    bool armed = true, removing = false;
    io_uring_submit(&t->ring);
    ssize_t w = write(fd, &notify_value, sizeof(notify_value)); /* the first kick */
    (void)w;
    while (owed) {
        struct io_uring_cqe *cqe;
        struct __kernel_timespec ts = {.tv_sec = 1};
        if (io_uring_wait_cqe_timeout(&t->ring, &cqe, &ts))
            break;
        bool more = cqe->flags & IORING_CQE_F_MORE;
        if (cqe->user_data == probe && more && (cqe->res & POLLIN))
            kicks++;
        if (cqe->user_data == probe && !more)
            armed = false;
        if (!more)
            owed--;
        io_uring_cqe_seen(&t->ring, cqe);
        uint64_t drained;
        struct iovec iov = {.iov_base = &drained, .iov_len = sizeof(drained)};
        if (kicks == 1 && armed && preadv2(fd, &iov, 1, -1, RWF_NOWAIT) == sizeof(drained)) {
            w = write(fd, &notify_value, sizeof(notify_value)); /* the second kick */
        } else if (armed && !removing && (sqe = io_uring_get_sqe(&t->ring))) {
            io_uring_prep_poll_remove(sqe, probe);
            io_uring_sqe_set_data64(sqe, TAG_IGNORE);
            removing = true;
            owed++;
        }
        io_uring_submit(&t->ring);
    }
    /* Never seen (a broken kernel): owed CQEs the loop reaps as ignored. */
    t->cqe_pending += owed;
    close(fd);
    return kicks >= 2;
}

/* What the ring may use besides its setup flags, each probed here with the
 * ring still empty: a failed probe means the old way. */
static void iothread_probe_features(struct dp_iothread *t)
{
    uint32_t wanted = ~t->disabled_features;
    struct io_uring_probe *probe = io_uring_get_probe_ring(&t->ring);
    if ((wanted & DP_URING_SINGLE_RW) && probe && io_uring_opcode_supported(probe, IORING_OP_READ) &&
        io_uring_opcode_supported(probe, IORING_OP_WRITE))
        t->features |= DP_URING_SINGLE_RW;
    if (probe)
        io_uring_free_probe(probe);
    if (wanted & DP_URING_REGISTERED_FILES) {
        /* Sparse tables are Linux 5.19; before, a table of -1 is the same. */
        int ret = io_uring_register_files_sparse(&t->ring, DP_THREAD_FILE_SLOTS);
        if (ret) {
            int none[DP_THREAD_FILE_SLOTS];
            for (int i = 0; i < DP_THREAD_FILE_SLOTS; i++)
                none[i] = -1;
            ret = io_uring_register_files(&t->ring, none, DP_THREAD_FILE_SLOTS);
        }
        if (!ret)
            t->features |= DP_URING_REGISTERED_FILES;
    }
    /* Empty slots cost the kernel a pointer each; a memory table is pinned
     * only when a queue that asks for it attaches. */
    if ((wanted & DP_URING_FIXED_BUFFERS) && io_uring_register_buffers_sparse(&t->ring, DP_THREAD_BUFFER_SLOTS) == 0)
        t->features |= DP_URING_FIXED_BUFFERS;
    if ((wanted & DP_URING_MULTISHOT_KICKS) && iothread_probe_multishot(t))
        t->features |= DP_URING_MULTISHOT_KICKS;
}

/* The ring, with DEFER_TASKRUN where the kernel has it (6.1; before, setup
 * refuses the flag with -EINVAL): completions are then posted only when
 * this thread enters the kernel asking for them, never by interrupting it,
 * so the loop asks wherever it looks at the CQ without sleeping
 * (completions_ready, the rearm path); the sleeping enter always asks.
 * Then COOP_TASKRUN (5.19) alone, then a plain ring. */
static int iothread_ring_init(struct dp_iothread *t)
{
    /* Requests in flight are capped by the CQ (iothread_get_req_sqe); a
     * large one keeps that cap out of the way of deep queues. */
    uint32_t cq_entries = t->ring_entries * 4 > DP_THREAD_MIN_CQ ? t->ring_entries * 4 : DP_THREAD_MIN_CQ;
    const unsigned coop = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG;
    const unsigned tries[] = {coop | IORING_SETUP_DEFER_TASKRUN, coop, 0};
    int ret = -EINVAL;
    for (unsigned i = (t->disabled_features & DP_URING_DEFER_TASKRUN) ? 1 : 0; i < 3 && ret == -EINVAL; i++) {
        struct io_uring_params p;
        memset(&p, 0, sizeof(p));
        p.flags = IORING_SETUP_CQSIZE | tries[i];
        p.cq_entries = cq_entries;
        ret = io_uring_queue_init_params(t->ring_entries, &t->ring, &p);
        if (!ret) {
            t->cq_entries = p.cq_entries;
            t->ring_features = p.features;
            if (tries[i] & IORING_SETUP_DEFER_TASKRUN)
                t->features |= DP_URING_DEFER_TASKRUN;
        }
    }
    return ret;
}

static int iothread_setup(struct dp_iothread *t)
{
    int ret = iothread_pin(t);
    if (ret)
        return ret;
    ret = iothread_ring_init(t);
    if (ret)
        return ret;
    t->ring_ready = true;
    io_uring_register_ring_fd(&t->ring); /* saves an fget per enter; optional */
    iothread_probe_nowait(t);
    iothread_probe_features(t);
    STAT_SET(t->stats.uring_features, t->features);
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
    if (t->ring_ready)
        io_uring_queue_exit(&t->ring);
    for (uint32_t i = 0; i < t->nbuffer_regs; i++)
        free(t->buffer_regs[i]); /* queues the thread never detached (a failed stop) */
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
