/* The loop: one io_uring and the accounting that keeps its CQ from
 * overflowing. It knows SQEs, CQEs, eventfds and registered files and
 * buffers; it knows nothing of queues, requests or disks. Whoever submits
 * embeds a struct loop_op and gets the CQE back through it. */
#ifndef DP_LOOP_H
#define DP_LOOP_H

#include <liburing.h>

#include "dp_internal.h"

/* struct loop_op (dp_internal.h), a completion's owner: the loop calls
 * done() with the CQE's res and flags. Embedded in requests, kicks and the
 * control mailbox; user_data is its address (0: nothing to do, as for
 * signals, cancels and drains). */

/* A guest memory table registered in the loop's buffer table (the io_uring
 * backend looks buffers up in it). Region i's piece k is buffer
 * first_slot + piece_base[i] + k. Shared by the users of the table;
 * registered with the first, unregistered with the last. */
struct buffer_reg {
    const struct dp_mem *mem;
    uint32_t refs;
    int32_t first_slot;         /* -1: registering failed (plain I/O then) */
    uint32_t nslots;
    uint16_t piece_base[DP_MEM_MAX_REGIONS];
};

struct loop {
    struct io_uring ring;
    bool ready;
    bool signal_nowait;      /* io_uring eventfd writes take RWF_NOWAIT (probed) */
    bool read_nowait;        /* preadv2 on an eventfd takes RWF_NOWAIT (probed) */
    /* An arm, cancel or signal found no SQE or CQ room: the owner must arm
     * again before it sleeps. */
    bool rearm_pending;
    uint64_t drain_buf;      /* without read_nowait, polled eventfds are drained by io_uring reads into this */
    uint32_t entries;
    /* Every SQE we submit posts exactly one CQE; at most cq_entries may be
     * owed at once, so the CQ never overflows (an overflowed CQ loses
     * completions when the kernel cannot buffer them: requests that hang). */
    uint32_t cq_entries;
    uint32_t cqe_pending;    /* SQEs taken whose CQE has not been reaped */
    uint32_t multishots;     /* multishot polls armed: each may post more CQEs */
    uint32_t req_reserve;    /* CQEs requests leave free for others (set by the owner) */
    uint32_t features;       /* DP_URING_* in use (probed, not disabled) */
    uint32_t disabled_features;
    uint32_t ring_features;  /* IORING_FEAT_* of the ring */
    int failed;              /* the io_uring failed us (-errno) */
    struct loop_op *on_fail;   /* told once, with res = the error */
    uint64_t now;            /* the owner's clock for this pass: completions are stamped with it */
    struct dp_thread_counters *stats;

    /* Registered fds, by slot (DP_URING_REGISTERED_FILES), keyed by their owner. */
    struct {
        const void *key;
        uint32_t refs;
    } files[DP_THREAD_FILE_SLOTS];
    /* Registered memory tables (DP_URING_FIXED_BUFFERS), and which slots of
     * the buffer table they hold. */
    struct buffer_reg *buffer_regs[DP_THREAD_MAX_QUEUES];
    uint32_t nbuffer_regs;
    uint64_t buffer_slots[DP_THREAD_BUFFER_SLOTS / 64];
};

/* Sets the ring up (DEFER_TASKRUN where the kernel has it) and probes what
 * it may use. 0 or -errno. */
int loop_init(struct loop *l, uint32_t entries, uint32_t disabled_features, struct dp_thread_counters *stats);
void loop_exit(struct loop *l);

/* Submits what is queued and, with wait_nr, waits for completions. Errors
 * the kernel may clear on its own leave the SQEs queued; others fail the
 * loop (on_fail). */
int loop_enter(struct loop *l, unsigned wait_nr);
/* For kicks, signals, control and cancels: they may use the whole CQ. */
struct io_uring_sqe *loop_get_sqe(struct loop *l);
/* For requests: leaves req_reserve CQEs free for the others. */
struct io_uring_sqe *loop_get_req_sqe(struct loop *l);
/* Reaps every CQE ready, each handed to its dp_op. Returns how many. */
unsigned loop_reap(struct loop *l);
/* COOP/DEFER_TASKRUN: runs the task work the kernel says waits. */
void loop_run_task_work(struct loop *l);
bool loop_completions_ready(struct loop *l);
/* Enters only to have completions posted (DEFER_TASKRUN). */
static inline void loop_get_events(struct loop *l)
{
    io_uring_get_events(&l->ring);
}
static inline bool loop_sq_ready(struct loop *l)
{
    return io_uring_sq_ready(&l->ring) != 0;
}

/* Writes 1 to an eventfd (a call or err signal); -EBUSY without an SQE. */
int loop_signal(struct loop *l, int fd);
/* Arms a read of an eventfd's counter into buf, or a poll (multishot: one
 * CQE with IORING_CQE_F_MORE per readiness); -EBUSY without an SQE. */
int loop_arm_read(struct loop *l, int fd, uint64_t *buf, struct loop_op *op);
int loop_arm_poll(struct loop *l, int fd, bool multishot, struct loop_op *op);
/* A relative timeout: one CQE (-ETIME) after *ts, which must stay put
 * until the next enter submits it. -EBUSY without an SQE. */
int loop_arm_timeout(struct loop *l, struct __kernel_timespec *ts, struct loop_op *op);
/* Cancels what op armed; ends a poll. -EBUSY without an SQE. */
int loop_cancel(struct loop *l, struct loop_op *op);
int loop_poll_remove(struct loop *l, struct loop_op *op);
/* A polled eventfd is readable: consume its counter without waiting (see loop.c). */
void loop_drain_eventfd(struct loop *l, int fd, uint64_t *buf);

/* The slot of fd in the registered file table, shared by the users with
 * the same key; -1 when it cannot be (use the plain fd then). */
int loop_file_get(struct loop *l, const void *key, int fd);
void loop_file_put(struct loop *l, int slot);
/* mem's registration, registered with its first user (it may have failed:
 * first_slot < 0); NULL only without memory. */
struct buffer_reg *loop_buffers_get(struct loop *l, const struct dp_mem *mem);
void loop_buffers_put(struct loop *l, struct buffer_reg *b);

#endif
