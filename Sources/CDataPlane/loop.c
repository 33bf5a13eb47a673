/* The loop: one io_uring, SQEs handed out only while their CQE has room,
 * completions dispatched to the dp_op that asked for them. */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "guest_mem.h"
#include "loop.h"

/* From the kernel's UAPI, for liburing headers that predate them. */
#ifndef IORING_SETUP_DEFER_TASKRUN
#define IORING_SETUP_DEFER_TASKRUN (1U << 13)
#endif
#ifndef IORING_POLL_ADD_MULTI
#define IORING_POLL_ADD_MULTI (1U << 0)
#endif

static const uint64_t notify_value = 1;

static uint64_t op_data(struct loop_op *op)
{
    return (uint64_t)(uintptr_t)op;
}

/* ------------------------------------------------------------ submissions */

static void loop_fail(struct loop *l, int err)
{
    if (l->failed)
        return;
    l->failed = err;
    STAT_SET(l->stats->failed, err);
    if (l->on_fail)
        l->on_fail->done(l->on_fail, err, 0);
}

int loop_enter(struct loop *l, unsigned wait_nr)
{
    int ret;
    do {
        ret = wait_nr ? io_uring_submit_and_wait(&l->ring, wait_nr) : io_uring_submit(&l->ring);
    } while (ret == -EINTR);
    STAT_ADD(l->stats->submits, 1);
    /* Errors the kernel may clear on its own (no memory for a request, a CQ
     * it is still flushing) leave the SQEs queued for the next call; others
     * fail the loop, loudly: a silent error here would be a hang. */
    if (ret >= 0 || ret == -EAGAIN || ret == -EBUSY || ret == -ETIME)
        return 0;
    loop_fail(l, ret);
    return ret;
}

/* An SQE whose CQE has room, keeping `reserve` CQEs free for others; the SQ
 * is submitted when full. NULL when there is no room (the caller owes it). */
static struct io_uring_sqe *get_sqe_reserving(struct loop *l, uint32_t reserve)
{
    if (l->cqe_pending + reserve >= l->cq_entries)
        return NULL;
    struct io_uring_sqe *sqe = io_uring_get_sqe(&l->ring);
    if (!sqe) {
        loop_enter(l, 0);
        sqe = io_uring_get_sqe(&l->ring);
    }
    if (sqe)
        l->cqe_pending++;
    return sqe;
}

struct io_uring_sqe *loop_get_sqe(struct loop *l)
{
    return get_sqe_reserving(l, 0);
}

/* Requests leave room for what the owner reserves for its users (each
 * queue's kick read, its cancel and drain, a call and an err signal, and
 * control), so that those are never starved by I/O. A multishot poll is
 * counted once, for its last CQE, but posts one per readiness: the kernel
 * posts those only where the CQ has room (without room it ends the poll,
 * with that last CQE, and it is armed again), and it coalesces wakeups
 * until the thread runs its task work, so each armed poll keeps
 * DP_KICK_CQE_RESERVE more free for what may come before the next reap. */
struct io_uring_sqe *loop_get_req_sqe(struct loop *l)
{
    return get_sqe_reserving(l, l->req_reserve + DP_KICK_CQE_RESERVE * l->multishots);
}

int loop_signal(struct loop *l, int fd)
{
    struct io_uring_sqe *sqe = loop_get_sqe(l);
    if (!sqe)
        return -EBUSY;
    io_uring_prep_write(sqe, fd, &notify_value, sizeof(notify_value), 0);
    if (l->signal_nowait)
        sqe->rw_flags = RWF_NOWAIT;
    /* Not IOSQE_CQE_SKIP_SUCCESS: every SQE must post its CQE to be counted. */
    io_uring_sqe_set_data64(sqe, 0);
    return 0;
}

int loop_arm_read(struct loop *l, int fd, uint64_t *buf, struct loop_op *op)
{
    struct io_uring_sqe *sqe = loop_get_sqe(l);
    if (!sqe)
        return -EBUSY;
    io_uring_prep_read(sqe, fd, buf, sizeof(*buf), 0);
    io_uring_sqe_set_data64(sqe, op_data(op));
    return 0;
}

int loop_arm_timeout(struct loop *l, struct __kernel_timespec *ts, struct loop_op *op)
{
    struct io_uring_sqe *sqe = loop_get_sqe(l);
    if (!sqe)
        return -EBUSY;
    io_uring_prep_timeout(sqe, ts, 0, 0);
    io_uring_sqe_set_data64(sqe, op_data(op));
    return 0;
}

int loop_arm_poll(struct loop *l, int fd, bool multishot, struct loop_op *op)
{
    struct io_uring_sqe *sqe = loop_get_sqe(l);
    if (!sqe)
        return -EBUSY;
    if (multishot) {
        io_uring_prep_poll_multishot(sqe, fd, POLLIN);
        l->multishots++;
    } else {
        io_uring_prep_poll_add(sqe, fd, POLLIN);
    }
    io_uring_sqe_set_data64(sqe, op_data(op));
    return 0;
}

int loop_cancel(struct loop *l, struct loop_op *op)
{
    struct io_uring_sqe *sqe = loop_get_sqe(l);
    if (!sqe)
        return -EBUSY;
    io_uring_prep_cancel64(sqe, op_data(op), 0);
    io_uring_sqe_set_data64(sqe, 0);
    return 0;
}

int loop_poll_remove(struct loop *l, struct loop_op *op)
{
    struct io_uring_sqe *sqe = loop_get_sqe(l);
    if (!sqe)
        return -EBUSY;
    io_uring_prep_poll_remove(sqe, op_data(op));
    io_uring_sqe_set_data64(sqe, 0);
    return 0;
}

/* Not with a plain read: the other end shares the fd's O_NONBLOCK and may
 * clear it, then read the counter first, and read() would wait. RWF_NOWAIT
 * where the kernel has it; else an io_uring read, which waits (if it must)
 * in the ring, into a buffer of the loop's that outlives the fd's owner.
 * Without an SQE the counter stays, and the next poll fires at once. */
void loop_drain_eventfd(struct loop *l, int fd, uint64_t *buf)
{
    if (l->read_nowait) {
        struct iovec iov = {.iov_base = buf, .iov_len = sizeof(*buf)};
        ssize_t r = preadv2(fd, &iov, 1, -1, RWF_NOWAIT);
        (void)r;
        return;
    }
    struct io_uring_sqe *sqe = loop_get_sqe(l);
    if (!sqe)
        return;
    io_uring_prep_read(sqe, fd, &l->drain_buf, sizeof(l->drain_buf), 0);
    io_uring_sqe_set_data64(sqe, 0);
}

/* ------------------------------------------------------------ completions */

unsigned loop_reap(struct loop *l)
{
    struct io_uring_cqe *cqe;
    unsigned head, n = 0, more = 0;
    /* Cannot happen while every CQE has room (get_sqe_reserving); counted so
     * that a test, or an operator, would see it. */
    if (IO_URING_READ_ONCE(*l->ring.sq.kflags) & IORING_SQ_CQ_OVERFLOW)
        STAT_ADD(l->stats->cq_overflows, 1);
    io_uring_for_each_cqe(&l->ring, head, cqe) {
        struct loop_op *op = (struct loop_op *)(uintptr_t)io_uring_cqe_get_data64(cqe);
        if (op)
            op->done(op, cqe->res, cqe->flags);
        /* A multishot CQE that says more will follow was never counted. */
        if (cqe->flags & IORING_CQE_F_MORE)
            more++;
        n++;
    }
    io_uring_cq_advance(&l->ring, n);
    l->cqe_pending -= n - more;
    return n;
}

/* COOP_TASKRUN and DEFER_TASKRUN: finished work waits for this thread to
 * enter the kernel (with DEFER_TASKRUN, asking for completions: nothing
 * else posts them, not even a timer tick). The kernel flags that it waits
 * (IORING_SQ_TASKRUN); this enters for it. io_uring_submit does the same
 * when it enters. */
void loop_run_task_work(struct loop *l)
{
    if (IO_URING_READ_ONCE(*l->ring.sq.kflags) & IORING_SQ_TASKRUN)
        io_uring_get_events(&l->ring);
}

bool loop_completions_ready(struct loop *l)
{
    if (io_uring_cq_ready(&l->ring))
        return true;
    loop_run_task_work(l);
    return io_uring_cq_ready(&l->ring) > 0;
}

/* ------------------------------------------------------------ registered files and buffers */

int loop_file_get(struct loop *l, const void *key, int fd)
{
    int free_slot = -1;
    for (int i = 0; i < DP_THREAD_FILE_SLOTS; i++) {
        if (l->files[i].key == key) {
            l->files[i].refs++;
            return i;
        }
        if (!l->files[i].key && free_slot < 0)
            free_slot = i;
    }
    if (free_slot < 0 || io_uring_register_files_update(&l->ring, (unsigned)free_slot, &fd, 1) != 1)
        return -1;
    l->files[free_slot].key = key;
    l->files[free_slot].refs = 1;
    STAT_ADD(l->stats->registered_files, 1);
    return free_slot;
}

/* With the last user, the slot is emptied (the kernel drops its reference
 * to the file once no request uses it). */
void loop_file_put(struct loop *l, int slot)
{
    if (slot < 0 || --l->files[slot].refs)
        return;
    const int none = -1;
    io_uring_register_files_update(&l->ring, (unsigned)slot, &none, 1);
    l->files[slot].key = NULL;
    STAT_SET(l->stats->registered_files, STAT_LOAD(l->stats->registered_files) - 1);
}

static bool buffer_slot_used(const struct loop *l, uint32_t i)
{
    return l->buffer_slots[i / 64] & (1ull << (i % 64));
}

static void buffer_slots_mark(struct loop *l, uint32_t first, uint32_t n, bool used)
{
    for (uint32_t i = first; i < first + n; i++) {
        if (used)
            l->buffer_slots[i / 64] |= 1ull << (i % 64);
        else
            l->buffer_slots[i / 64] &= ~(1ull << (i % 64));
    }
}

/* Empties registered buffers: the kernel unpins their pages once no
 * request uses them. */
static void buffer_slots_clear(struct loop *l, uint32_t first, uint32_t n)
{
    const struct iovec none = {0};
    const __u64 tag = 0;
    for (uint32_t i = first; i < first + n; i++)
        io_uring_register_buffers_update_tag(&l->ring, i, &none, &tag, 1);
}

/* Slots for every region of mem, a piece of at most 1 << DP_BUFFER_PIECE_SHIFT
 * bytes per slot (the kernel's limit), in one run of free slots; returns
 * the first, and n, or -ENOSPC when the table is full. */
static int buffer_find_run(struct loop *l, struct buffer_reg *b, uint32_t *count)
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
        run = buffer_slot_used(l, i) ? 0 : run + 1;
        first = i + 1 - run;
    }
    if (!n || run < n)
        return -ENOSPC;
    *count = n;
    return (int)first;
}

/* Registers every region of b's memory table: all of it or none. -ENOSPC
 * when the table is full; else the kernel's error (-ENOMEM past
 * RLIMIT_MEMLOCK without CAP_IPC_LOCK, -EFAULT for memory that cannot be
 * pinned, such as a shared mapping of a file on a disk filesystem). */
static int buffer_register(struct loop *l, struct buffer_reg *b)
{
    const struct dp_mem *mem = b->mem;
    uint32_t n = 0;
    int found = buffer_find_run(l, b, &n);
    if (found < 0)
        return found;
    uint32_t first = (uint32_t)found;
    const uint64_t piece = 1ull << DP_BUFFER_PIECE_SHIFT;
    uint32_t done = 0;
    int ret = 0;
    for (uint32_t i = 0; i < mem->count && !ret; i++) {
        const struct dp_mem_region *r = &mem->regions[i];
        for (uint64_t off = 0; off < r->size && !ret; off += piece) {
            struct iovec iov = {.iov_base = (uint8_t *)r->host_addr + off,
                                .iov_len = r->size - off < piece ? r->size - off : piece};
            const __u64 tag = 0;
            int got = io_uring_register_buffers_update_tag(&l->ring, first + done, &iov, &tag, 1);
            if (got == 1)
                done++;
            else
                ret = got < 0 ? got : -EIO;
            if (off + piece < off)
                break; /* a region ending at 2^64 */
        }
    }
    if (ret) {
        buffer_slots_clear(l, first, done);
        return ret;
    }
    buffer_slots_mark(l, first, n, true);
    b->first_slot = (int32_t)first;
    b->nslots = n;
    STAT_ADD(l->stats->registered_buffers, n);
    return 0;
}

/* A table that failed to register stays failed for the users that share
 * it: they do not pin it again. */
struct buffer_reg *loop_buffers_get(struct loop *l, const struct dp_mem *mem)
{
    for (uint32_t i = 0; i < l->nbuffer_regs; i++) {
        if (l->buffer_regs[i]->mem == mem) {
            l->buffer_regs[i]->refs++;
            return l->buffer_regs[i];
        }
    }
    /* One table per user at most: there is always an entry free. */
    struct buffer_reg *b = calloc(1, sizeof(*b));
    int ret = b ? 0 : -ENOMEM;
    if (b) {
        b->mem = mem;
        b->refs = 1;
        b->first_slot = -1;
        ret = buffer_register(l, b);
        l->buffer_regs[l->nbuffer_regs++] = b;
    }
    if (ret) {
        STAT_ADD(l->stats->buffer_register_failures, 1);
        STAT_SET(l->stats->buffer_register_error, ret);
    }
    return b;
}

void loop_buffers_put(struct loop *l, struct buffer_reg *b)
{
    if (!b || --b->refs)
        return;
    if (b->first_slot >= 0) {
        buffer_slots_clear(l, (uint32_t)b->first_slot, b->nslots);
        buffer_slots_mark(l, (uint32_t)b->first_slot, b->nslots, false);
        STAT_SET(l->stats->registered_buffers, STAT_LOAD(l->stats->registered_buffers) - b->nslots);
    }
    for (uint32_t i = 0; i < l->nbuffer_regs; i++) {
        if (l->buffer_regs[i] == b) {
            l->buffer_regs[i] = l->buffer_regs[--l->nbuffer_regs];
            break;
        }
    }
    free(b);
}

/* ------------------------------------------------------------ setup */

/* Eventfds take RWF_NOWAIT from Linux 5.12 on; before, it is refused
 * (-EOPNOTSUPP) and would lose every signal and kick. Probed once, on a
 * private eventfd, with the (still empty) ring; without it we rely on the
 * fds' O_NONBLOCK alone. */
static void probe_nowait(struct loop *l)
{
    int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (fd < 0)
        return;
    uint64_t value = 0;
    struct iovec iov = {.iov_base = &value, .iov_len = sizeof(value)};
    l->read_nowait = write(fd, &notify_value, sizeof(notify_value)) == sizeof(notify_value) &&
                     preadv2(fd, &iov, 1, -1, RWF_NOWAIT) == sizeof(value);
    struct io_uring_sqe *sqe = io_uring_get_sqe(&l->ring);
    struct io_uring_cqe *cqe;
    if (sqe) {
        io_uring_prep_write(sqe, fd, &notify_value, sizeof(notify_value), 0);
        sqe->rw_flags = RWF_NOWAIT;
        io_uring_sqe_set_data64(sqe, 0);
        if (io_uring_submit_and_wait(&l->ring, 1) >= 0 && io_uring_peek_cqe(&l->ring, &cqe) == 0) {
            l->signal_nowait = cqe->res == sizeof(notify_value);
            io_uring_cqe_seen(&l->ring, cqe);
        }
    }
    close(fd);
}

static void probe_op_done(struct loop_op *op, int res, uint32_t cqe_flags)
{
    (void)op, (void)res, (void)cqe_flags; /* a probe's CQE the probe never saw */
}

/* A private eventfd, polled multishot: two CQEs with IORING_CQE_F_MORE
 * (Linux 5.13; before, the flag is refused). Every CQE is reaped here, the
 * poll removed first. Needs RWF_NOWAIT reads of eventfds (kick drains) and
 * IORING_FEAT_EXT_ARG (5.11), for a wait that cannot hang. */
static bool probe_multishot(struct loop *l)
{
    if (!l->read_nowait || !(l->ring_features & IORING_FEAT_EXT_ARG))
        return false;
    int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (fd < 0)
        return false;
    static struct loop_op probe_op = {probe_op_done}; /* ignored if it ever reached loop_reap */
    const uint64_t probe = op_data(&probe_op);
    struct io_uring_sqe *sqe = io_uring_get_sqe(&l->ring);
    if (!sqe) {
        close(fd);
        return false;
    }
    io_uring_prep_poll_multishot(sqe, fd, POLLIN);
    io_uring_sqe_set_data64(sqe, probe);
    unsigned kicks = 0, owed = 1; /* the poll's last CQE, then the remove's */
    bool armed = true, removing = false;
    io_uring_submit(&l->ring);
    ssize_t w = write(fd, &notify_value, sizeof(notify_value)); /* the first kick */
    (void)w;
    while (owed) {
        struct io_uring_cqe *cqe;
        struct __kernel_timespec ts = {.tv_sec = 1};
        if (io_uring_wait_cqe_timeout(&l->ring, &cqe, &ts))
            break;
        bool more = cqe->flags & IORING_CQE_F_MORE;
        if (cqe->user_data == probe && more && (cqe->res & POLLIN))
            kicks++;
        if (cqe->user_data == probe && !more)
            armed = false;
        if (!more)
            owed--;
        io_uring_cqe_seen(&l->ring, cqe);
        uint64_t drained;
        struct iovec iov = {.iov_base = &drained, .iov_len = sizeof(drained)};
        if (kicks == 1 && armed && preadv2(fd, &iov, 1, -1, RWF_NOWAIT) == sizeof(drained)) {
            w = write(fd, &notify_value, sizeof(notify_value)); /* the second kick */
        } else if (armed && !removing && (sqe = io_uring_get_sqe(&l->ring))) {
            io_uring_prep_poll_remove(sqe, probe);
            io_uring_sqe_set_data64(sqe, 0);
            removing = true;
            owed++;
        }
        io_uring_submit(&l->ring);
    }
    /* Never seen (a broken kernel): owed CQEs loop_reap ignores. */
    l->cqe_pending += owed;
    close(fd);
    return kicks >= 2;
}

/* What the ring may use besides its setup flags, each probed here with the
 * ring still empty: a failed probe means the old way. */
static void probe_features(struct loop *l)
{
    uint32_t wanted = ~l->disabled_features;
    struct io_uring_probe *probe = io_uring_get_probe_ring(&l->ring);
    if ((wanted & DP_URING_SINGLE_RW) && probe && io_uring_opcode_supported(probe, IORING_OP_READ) &&
        io_uring_opcode_supported(probe, IORING_OP_WRITE))
        l->features |= DP_URING_SINGLE_RW;
    if (probe)
        io_uring_free_probe(probe);
    if (wanted & DP_URING_REGISTERED_FILES) {
        /* Sparse tables are Linux 5.19; before, a table of -1 is the same. */
        int ret = io_uring_register_files_sparse(&l->ring, DP_THREAD_FILE_SLOTS);
        if (ret) {
            int none[DP_THREAD_FILE_SLOTS];
            for (int i = 0; i < DP_THREAD_FILE_SLOTS; i++)
                none[i] = -1;
            ret = io_uring_register_files(&l->ring, none, DP_THREAD_FILE_SLOTS);
        }
        if (!ret)
            l->features |= DP_URING_REGISTERED_FILES;
    }
    /* Empty slots cost the kernel a pointer each; a memory table is pinned
     * only when a queue that asks for it attaches. */
    if ((wanted & DP_URING_FIXED_BUFFERS) && io_uring_register_buffers_sparse(&l->ring, DP_THREAD_BUFFER_SLOTS) == 0)
        l->features |= DP_URING_FIXED_BUFFERS;
    if ((wanted & DP_URING_MULTISHOT_KICKS) && probe_multishot(l))
        l->features |= DP_URING_MULTISHOT_KICKS;
}

/* The ring, with DEFER_TASKRUN where the kernel has it (6.1; before, setup
 * refuses the flag with -EINVAL): completions are then posted only when
 * this thread enters the kernel asking for them, never by interrupting it,
 * so the owner asks wherever it looks at the CQ without sleeping
 * (loop_completions_ready, its rearm path); the sleeping enter always
 * asks. Then COOP_TASKRUN (5.19) alone, then a plain ring. */
static int ring_init(struct loop *l)
{
    /* Requests in flight are capped by the CQ (loop_get_req_sqe); a large
     * one keeps that cap out of the way of deep queues. */
    uint32_t cq_entries = l->entries * 4 > DP_THREAD_MIN_CQ ? l->entries * 4 : DP_THREAD_MIN_CQ;
    const unsigned coop = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG;
    const unsigned tries[] = {coop | IORING_SETUP_DEFER_TASKRUN, coop, 0};
    int ret = -EINVAL;
    for (unsigned i = (l->disabled_features & DP_URING_DEFER_TASKRUN) ? 1 : 0; i < 3 && ret == -EINVAL; i++) {
        struct io_uring_params p;
        memset(&p, 0, sizeof(p));
        p.flags = IORING_SETUP_CQSIZE | tries[i];
        p.cq_entries = cq_entries;
        ret = io_uring_queue_init_params(l->entries, &l->ring, &p);
        if (!ret) {
            l->cq_entries = p.cq_entries;
            l->ring_features = p.features;
            if (tries[i] & IORING_SETUP_DEFER_TASKRUN)
                l->features |= DP_URING_DEFER_TASKRUN;
        }
    }
    return ret;
}

int loop_init(struct loop *l, uint32_t entries, uint32_t disabled_features, struct dp_thread_counters *stats)
{
    l->entries = entries;
    l->disabled_features = disabled_features;
    l->stats = stats;
    int ret = ring_init(l);
    if (ret)
        return ret;
    l->ready = true;
    io_uring_register_ring_fd(&l->ring); /* saves an fget per enter; optional */
    probe_nowait(l);
    probe_features(l);
    STAT_SET(stats->uring_features, l->features);
    return 0;
}

void loop_exit(struct loop *l)
{
    if (l->ready)
        io_uring_queue_exit(&l->ring);
    l->ready = false;
    for (uint32_t i = 0; i < l->nbuffer_regs; i++)
        free(l->buffer_regs[i]); /* users the owner never let go (a failed stop) */
    l->nbuffer_regs = 0;
}
