/* A virtqueue of a disk, on one IOThread's loop: its state, its hot path
 * (queue.c: pop, complete, publish and notify) and its kicks and signals
 * (queue_notify.c). Its control state machine is above it (queue_ctl.h). */
#ifndef DP_QUEUE_H
#define DP_QUEUE_H

#include <linux/time_types.h>

#include "backend.h"
#include "dirty_log.h"
#include "dp_internal.h"
#include "throttle.h"
#include "vring.h"

struct loop;

/* A queue's eventfds on its loop: the kick it waits on, the signals it owes. */
struct queue_kick {
    struct loop_op op;          /* the kick read or poll's completion */
    uint64_t buf;
    bool armed;                 /* a read or poll on the kick fd is outstanding */
    bool poll;                  /* the kick fd is O_NONBLOCK: poll, then read() */
    bool cancelling;
    bool failed;
    bool multishot;             /* the armed poll is multishot (IORING_POLL_ADD_MULTI) */
    uint8_t signals_owed;       /* 1 << enum dp_signal: no SQE was free to send them */
};

/* One packed buffer the inflight region holds: its DescStatePacked
 * entries, first (the head) to last, linked by inflight_packed.next. */
struct inflight_buf {
    uint16_t first;
    uint16_t last;
    uint16_t num;               /* ring descriptors; 0: the id holds no entries */
};

/* The packed inflight layout's private side (inflight.c). The region's
 * entry links and free list are kept here too and only written there, so
 * the hot path reads back nothing the frontend can rewrite. */
struct inflight_packed {
    uint16_t *next;             /* per entry: the next of its buffer, or of the free list */
    struct inflight_buf *bufs;  /* per buffer id */
    struct vring_packed_desc *ring_copy; /* DP_SEG_MAX + 2: a popped buffer's ring
                                          * descriptors, or a saved one's to walk again */
    uint32_t free_count;
    uint16_t free_head;
};

struct dp_queue {
    /* --- owned by the IOThread while attached --- */
    struct vring vr;
    struct loop *loop;          /* its IOThread's */
    struct dp_iothread *thread; /* for the public calls' messages only */
    struct blk_req *reqs;       /* DP_QUEUE slots */
    struct iovec *iov_pool;     /* slots * DP_REQ_MAX_IOV */
    struct vring_desc *indirect_scratch; /* VRING_INDIRECT_MAX: indirect tables read from a copy */
    uint16_t *free_slots;
    uint16_t *head_slot;        /* per head: slot + 1, or 0 when not in flight */
    uint32_t nslots;
    uint32_t free_count;
    uint32_t in_flight;
    bool attached;
    bool paused;
    bool stopping;
    bool stop_fails_held;       /* this stop leaves nothing in the inflight region (dp_queue_stop_failing_held) */
    bool broken;
    bool dirty;                 /* used elements pushed but not yet published */
    uint32_t unpublished;       /* of those, completions since the last publish */
    uint32_t notify_after;      /* publish and signal early after this many in a pass; 0 = never */
    bool early_published;       /* this pass published its first group already */
    bool kicked;                /* a kick arrived since the last pop */
    bool budget_spent;          /* the last pop stopped at its pass budget, work left */
    struct queue_kick kick;     /* its eventfds on the loop (queue_notify.c) */
    struct ctl_msg *drain_waiter; /* stop/pause/set-mem waiting for in_flight == 0 */
    struct blk_req *held_head;  /* failed requests kept by the stop policy, in order */
    struct blk_req *held_tail;
    uint32_t held_count;
    bool error_stopped;
    void *inflight;             /* vhost-user inflight region (inflight.c: its layout by the ring's), or NULL */
    uint64_t inflight_counter;  /* pop order, for resubmission */
    struct inflight_packed ipk; /* packed rings with an inflight region */
    uint16_t *resubmit;         /* heads to run again before popping (after a restart or a memory swap) */
    uint32_t resubmit_count;
    uint32_t resubmit_next;
    uint32_t resubmit_held;     /* the first of those not yet run: held requests a memory swap requeued */
    uint16_t *pushed;           /* heads pushed since the last publish (inflight clearing) */
    uint32_t pushed_count;
    uint32_t longest_chain;     /* most iovecs a request carried (statistics) */
    /* I/O limits: the disk's buckets as this pass read them (NULL: none),
     * and the request over its limit, popped and parsed, that waits with
     * nothing of the queue after it started; a timer wakes the loop. */
    struct dp_throttle *throttle;
    struct blk_req *throttled;
    uint64_t throttled_since;
    struct loop_op throttle_timer;
    struct __kernel_timespec throttle_ts; /* the armed timer's, until submitted */
    bool throttle_timer_armed;
    struct dirty_log log;       /* live migration: pages we write get marked; off when bitmap is NULL */
    struct iovec *log_iov;      /* with logging, slots * DP_REQ_MAX_IOV: each request's writable
                                 * iovecs as walked (the backend advances its own in place) */
    struct backend_ctx io;      /* its disk and memory, as its backend sees them */
    struct dp_queue_config config;
    /* --- control side --- */
    size_t alloc_size;
    int numa_node;
    /* --- read by anyone --- */
    struct dp_queue_counters stats;
};

/* ---- queue.c: the hot path */

/* The per-queue work of one loop pass. Pops what the queue's share of a
 * pass allows (q->budget_spent when work is left). */
unsigned queue_pop_batch(struct dp_queue *q, uint64_t now);
/* Dirty logging: marks the ring areas the device writes (used ring, event
 * suppression), after writing them. */
void queue_log_rings(struct dp_queue *q);
void queue_complete(struct dp_queue *q, struct blk_req *req, uint8_t status, uint64_t now);
/* Starts the chain at head (with fail_io, a request that needs I/O fails
 * instead; resubmit: head was popped before and comes off the resubmit
 * list). Adds the descriptors it read to *cost. False when the ring is
 * broken. */
bool queue_start(struct dp_queue *q, uint16_t head, uint64_t now, bool fail_io, bool resubmit, uint32_t *cost);
/* A parsed request goes to its disk's backend (through fault injection). */
void queue_submit_io(struct dp_queue *q, struct blk_req *req, uint64_t now);
/* The backend finished req with 0 or a negative errno: apply the error policy. */
void queue_io_done(struct dp_queue *q, struct blk_req *req, int res, uint64_t now);
/* backend_ctx.io_done: queue_io_done for the queue that holds c. */
void queue_backend_done(struct backend_ctx *c, struct blk_req *req, int res, uint64_t now);
/* Not paused, stopped, broken or out of slots: kicks and pops make sense. */
bool queue_accepts_work(const struct dp_queue *q);
bool queue_can_pop(const struct dp_queue *q);
/* Publishes pushed used elements; true when it signalled the guest. */
bool queue_publish_and_notify(struct dp_queue *q);
void queue_break(struct dp_queue *q, int reason);
/* The loop failed (err): the queue is broken, its err fd written directly. */
void queue_break_loop_failed(struct dp_queue *q, int err);

/* Takes the next head to run again off the resubmit list (before it
 * starts: failing again, it is counted as held once). */
static inline uint16_t queue_resubmit_take(struct dp_queue *q)
{
    if (q->resubmit_held)
        q->resubmit_held--;
    return q->resubmit[q->resubmit_next++];
}

/* Ask for kicks before sleeping (true: work came meanwhile), or stop asking. */
static inline bool queue_enable_kicks(struct dp_queue *q)
{
    if (!queue_accepts_work(q))
        return false;
    bool ready = vring_enable_kicks(&q->vr);
    if (dirty_log_on(&q->log))
        queue_log_rings(q);
    return ready;
}

static inline void queue_disable_kicks(struct dp_queue *q)
{
    vring_disable_kicks(&q->vr);
    if (dirty_log_on(&q->log))
        queue_log_rings(q);
}

/* ---- queue_notify.c: kicks in, signals out */

/* Signals the frontend through the call or err eventfd. */
enum dp_signal { DP_SIGNAL_CALL, DP_SIGNAL_ERR };
void queue_signal(struct dp_queue *q, enum dp_signal which);
/* Sends the signals no SQE was free for; they stay owed if there is still none. */
void queue_signals_flush(struct dp_queue *q);
/* Arms a read or poll of the kick fd (once); cancels it for a stop. */
void queue_kick_arm(struct dp_queue *q);
void queue_kick_cancel(struct dp_queue *q);
/* Points the kick's completion at the queue (once, when it is made). */
void queue_kick_init(struct dp_queue *q);
/* Ends an armed multishot kick poll (tests); true when one was asked to end. */
bool queue_kick_end_poll(struct dp_queue *q);

/* ---- inflight.c: vhost-user inflight tracking (spec: "Inflight I/O tracking"),
 * split (QueueRegionSplit) and packed (QueueRegionPacked) layouts. */

/* On start: a fresh region is laid out; a used one says which requests
 * were in flight (q->resubmit, in pop order) and, for a packed ring, where
 * the ring stands (its base moved there). -EBADMSG when the region does not
 * agree with the ring (refused rather than guessed), -ENOMEM. */
int inflight_recover(struct dp_queue *q);
/* Marks head popped; ndescs: its ring descriptors (packed), whose copies
 * the walk left in q->ipk.ring_copy. resubmit: popped before, its entries
 * kept (it gets a new place in the pop order). Packed: -ENOSPC when the
 * region has no room (the guest made more descriptors available than the
 * ring holds), -EBUSY when the id still holds entries. */
int inflight_mark(struct dp_queue *q, uint16_t head, uint16_t ndescs, bool resubmit);
/* Whether a head still holds a packed region's entries (in flight, held or
 * waiting for resubmission): popped again, the guest broke the ring. */
bool inflight_holds(const struct dp_queue *q, uint16_t head);
/* A packed buffer popped before: copies its ring descriptors from the
 * region into q->ipk.ring_copy; their count, or -EINVAL. */
int inflight_saved(struct dp_queue *q, uint16_t head);
/* Around vring_publish, with the heads pushed since the last one in
 * q->pushed: before (packed: their entries freed, the region's used
 * position), and after (their marks cleared, the region's used position
 * committed). */
void inflight_publish_begin(struct dp_queue *q);
void inflight_clear_published(struct dp_queue *q);

#endif
