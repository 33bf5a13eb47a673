/* Internal types shared by the data plane's files. Not part of the API. */
#ifndef DP_INTERNAL_H
#define DP_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#ifndef _GNU_SOURCE
#error "CDataPlane needs _GNU_SOURCE (set in Package.swift cSettings)"
#endif

#include "CDataPlane.h"
#include "stats.h"
#include "vring_split.h"

/* A request may carry at most this many iovecs (header and status
 * included): seg_max + 2 descriptors, each split in two where it crosses
 * into an adjacent region. More (a buffer spanning many regions) fails the
 * request. */
#define DP_REQ_MAX_IOV (2 * (DP_SEG_MAX + 2))
/* What one queue may take of a pass of its IOThread, so that a queue full
 * of long chains cannot hold up the other queues on the thread: at most
 * this many descriptors read (256 four-descriptor requests, or 7 of the
 * longest), and past DP_QUEUE_PASS_CLOCK_EVERY of them, at most
 * DP_QUEUE_PASS_NS of time (the clock is read once per that many
 * descriptors, so short chains never pay for it). */
#define DP_QUEUE_PASS_BUDGET 1024
#define DP_QUEUE_PASS_CLOCK_EVERY 64
#define DP_QUEUE_PASS_NS 2000
/* In-flight requests per queue at most (slots are preallocated). */
#define DP_QUEUE_MAX_SLOTS 256
/* Bounce buffers one queue may hold before its misaligned requests wait for
 * one to be freed: a guest pointing many large requests at misaligned memory
 * must not make us allocate gigabytes. One request is always admitted. Only
 * submitted requests hold budget (held ones give it back), so it frees up. */
#define DP_QUEUE_BOUNCE_BUDGET (16u << 20)
/* One bounce buffer spans at most this much of its request; a larger one
 * moves through it a window at a time (a 1 GiB request may point 256 times
 * at one misaligned 4 MiB buffer: it must not cost 1 GiB of ours). */
#define DP_BOUNCE_WINDOW (4u << 20)
#define DP_THREAD_MAX_QUEUES 256
/* The smallest completion queue of an IOThread: what it can have in flight
 * at once (less a little for kicks, signals and control). */
#define DP_THREAD_MIN_CQ 4096
/* Registered file table of an IOThread: one slot per disk it serves (a
 * queue has one disk, so never more than its queues). */
#define DP_THREAD_FILE_SLOTS DP_THREAD_MAX_QUEUES
/* Registered buffer table of an IOThread: a slot per piece of guest memory,
 * a region or DP_BUFFER_PIECE of it (the kernel's limit per buffer). 4096
 * pieces: 4 TiB of guest memory, in any mix of memory tables. */
#define DP_THREAD_BUFFER_SLOTS 4096
#define DP_BUFFER_PIECE_SHIFT 30
/* What one armed multishot kick poll may post between two reaps (the kernel
 * coalesces wakeups until the IOThread runs its task work, so one or two),
 * kept free in the CQ by requests. */
#define DP_KICK_CQE_RESERVE 4

#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2

struct dp_disk {
    int backend;
    int fd;
    bool is_block_device;
    uint64_t capacity_sectors;
    uint32_t logical_block_size;
    uint64_t block_mask;        /* logical_block_size - 1 (a power of two): alignment without a division */
    uint32_t mem_align;
    uint32_t seg_max;
    bool read_only;
    bool read_zeroes;
    uint8_t serial[DP_SERIAL_LEN];
    int read_policy;
    int write_policy;
    /* A flush of the page cache failed (no O_DIRECT): pages it could not
     * write are now marked clean, so a later flush would succeed without
     * them. Every FLUSH fails from then on (-errno here) until reopened. */
    _Atomic int32_t flush_error;
    /* Block devices: the kernel refused io_uring's discard command (before
     * Linux 6.12); discards go through fallocate instead. */
    _Atomic bool discard_cmd_unsupported;
    /* Fault injection: read on the hot path only while fault_error != 0. */
    _Atomic int32_t fault_error;
    _Atomic uint32_t fault_ops;
    _Atomic uint64_t fault_start;
    _Atomic uint64_t fault_end;
    _Atomic uint64_t fault_after;
    _Atomic uint32_t fault_every;
    _Atomic uint64_t fault_seen;
    /* Register guest memory for READ_FIXED/WRITE_FIXED (dp_disk_config). */
    bool fixed_buffers;
};

/* A guest memory table registered in an IOThread's buffer table (iothread.c
 * owns it; backend_uring.c looks buffers up in it). Region i's piece k is
 * buffer first_slot + piece_base[i] + k. Shared by the thread's queues that
 * use the table; registered with the first, unregistered with the last. */
struct buffer_reg {
    const struct dp_mem *mem;
    uint32_t refs;
    int32_t first_slot;         /* -1: registering failed (the queues use plain I/O) */
    uint32_t nslots;
    uint16_t piece_base[DP_MEM_MAX_REGIONS];
};

/* One virtio-blk request in flight; lives in its queue's slot pool. */
struct blk_req {
    struct dp_queue *queue;
    struct blk_req *next;       /* backlog link: waiting for an SQE or a retry */
    struct iovec *iov;          /* data iovecs still to transfer */
    uint32_t iov_cnt;
    uint16_t head;
    uint8_t op;                 /* enum dp_op */
    uint8_t zero_phase;         /* discard/write-zeroes fallback step (backend_uring.c) */
    uint8_t *status;            /* the guest's status byte, NULL when it has none */
    uint64_t offset;            /* bytes */
    uint64_t len;               /* bytes to transfer or to discard/zero */
    uint64_t done;              /* bytes transferred so far (short I/O) */
    uint32_t data_in_len;       /* bytes written to guest buffers on success */
    bool unmap;                 /* write zeroes may deallocate (VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) */
    void *bounce;               /* aligned copy for buffers O_DIRECT refuses */
    uint64_t bounce_size;       /* its bytes, counted in the queue's bounce_bytes */
    uint64_t bounce_off;        /* request offset of the window it holds; iov starts there */
    uint64_t start_ns;
};

struct ctl_msg;

struct dp_queue {
    /* --- owned by the IOThread while attached --- */
    struct vring_split vr;
    struct dp_iothread *thread;
    struct dp_disk *disk;
    struct dp_mem *mem;
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
    bool broken;
    bool dirty;                 /* used elements pushed but not yet published */
    uint32_t unpublished;       /* of those, completions since the last publish */
    uint32_t notify_after;      /* publish and signal early after this many in a pass; 0 = never */
    bool early_published;       /* this pass published its first group already */
    bool kicked;                /* a kick arrived since the last pop */
    bool budget_spent;          /* the last pop stopped at its pass budget, work left */
    bool kick_armed;            /* a read or poll on the kick fd is outstanding */
    bool kick_poll;             /* the kick fd is O_NONBLOCK: poll, then read() */
    bool kick_cancelling;
    bool kick_failed;
    bool kick_multishot;        /* the armed poll is multishot (IORING_POLL_ADD_MULTI) */
    bool single_rw;             /* one-segment reads and writes as READ/WRITE (probed) */
    uint8_t ring_fd_flags;      /* IOSQE_FIXED_FILE when ring_fd is a registered file */
    uint8_t signals_owed;       /* 1 << enum dp_signal: no SQE was free to send them */
    uint64_t kick_buf;
    struct ctl_msg *drain_waiter; /* stop/pause/set-mem waiting for in_flight == 0 */
    struct blk_req *held_head;  /* failed requests kept by the stop policy, in order */
    struct blk_req *held_tail;
    uint32_t held_count;
    bool error_stopped;
    struct inflight_region *inflight; /* vhost-user inflight tracking, or NULL */
    uint64_t inflight_counter;  /* pop order, for resubmission */
    uint64_t bounce_bytes;      /* bounce buffers in use (DP_QUEUE_BOUNCE_BUDGET) */
    struct blk_req *bounce_wait_head; /* requests waiting for bounce budget, in order */
    struct blk_req *bounce_wait_tail;
    uint16_t *resubmit;         /* heads to run again before popping (after a restart or a memory swap) */
    uint32_t resubmit_count;
    uint32_t resubmit_next;
    uint32_t resubmit_held;     /* the first of those not yet run: held requests a memory swap requeued */
    uint16_t *pushed;           /* heads pushed since the last publish (inflight clearing) */
    uint32_t pushed_count;
    uint32_t longest_chain;     /* most iovecs a request carried (statistics) */
    /* How its disk and memory are named on its IOThread's ring, set there on
     * attach and on a memory swap: the disk fd or its registered slot
     * (ring_fd_flags), and the registered memory table (NULL: none). */
    int32_t ring_fd;
    int32_t file_slot;          /* -1: not registered */
    struct buffer_reg *buffers;
    uint32_t buffer_hint;       /* the region the last fixed buffer was in */
    struct dp_thread_counters *thread_stats;
    struct dp_queue_config config;
    /* --- control side --- */
    size_t alloc_size;
    int numa_node;
    /* --- read by anyone --- */
    struct dp_queue_counters stats;
};

enum ctl_type {
    CTL_ADD_QUEUE,
    CTL_STOP_QUEUE,
    CTL_PAUSE_QUEUE,
    CTL_RESUME_QUEUE,
    CTL_SET_MEM,
    CTL_SET_NOTIFIERS,
    CTL_STOP_THREAD,
    CTL_END_KICK_POLLS, /* tests: end the multishot kick polls, as the kernel may */
};

struct ctl_msg {
    enum ctl_type type;
    struct dp_queue *queue;
    struct dp_mem *mem;
    int32_t call_fd; /* CTL_SET_NOTIFIERS */
    int32_t err_fd;
    int result;
    uint16_t last_avail_idx;
    bool done;
    struct ctl_msg *next;
};

/* user_data tags in the low bits of io_uring user_data (pointers are 8-aligned). */
enum {
    TAG_REQ = 0,
    TAG_KICK = 1,
    TAG_CTL = 2,
    TAG_IGNORE = 3, /* notify writes, cancels */
    TAG_MASK = 7,
};

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* queue.c: the per-queue work of one loop iteration. Pops what the queue's
 * share of a pass allows (q->budget_spent when work is left). */
unsigned queue_pop_batch(struct dp_queue *q, uint64_t now);
void queue_complete(struct dp_queue *q, struct blk_req *req, uint8_t status, uint64_t now);
/* A parsed request goes to its disk's backend (or to fault injection). */
void queue_submit_io(struct dp_queue *q, struct blk_req *req, uint64_t now);
/* The backend finished req with 0 or a negative errno: apply the error policy. */
void queue_io_done(struct dp_queue *q, struct blk_req *req, int res, uint64_t now);
/* Retry held requests (resume) or fail them (stop). */
void queue_retry_held(struct dp_queue *q, uint64_t now);
void queue_fail_held(struct dp_queue *q, uint64_t now);
/* Memory swap: held requests go back to be walked again on resume (false:
 * the ring is broken, and they must be failed instead). */
bool queue_requeue_held(struct dp_queue *q);
/* Stop without an inflight region: requeued and recovered requests not yet
 * run fail. With one, held and waiting requests stay marked in it for the
 * next owner of the ring instead, and their slots are given back. */
void queue_fail_requeued(struct dp_queue *q, uint64_t now);
void queue_release_held(struct dp_queue *q);
/* Not paused, stopped, broken or out of slots: kicks and pops make sense. */
bool queue_accepts_work(const struct dp_queue *q);
bool queue_can_pop(const struct dp_queue *q);
/* Publishes pushed used elements; true when it signalled the guest. */
bool queue_publish_and_notify(struct dp_queue *q);
void queue_break(struct dp_queue *q, int reason);
int queue_map_rings(const struct dp_queue_config *cfg, const struct dp_mem *mem, void **desc,
                    void **avail, void **used);

/* inflight.c: vhost-user inflight tracking (spec: "Inflight I/O tracking"). */
int inflight_recover(struct dp_queue *q);
void inflight_mark(struct dp_queue *q, uint16_t head);
void inflight_clear_published(struct dp_queue *q);

/* iothread.c: services the queue layer uses. */
struct io_uring_sqe;
/* An SQE for a request when the thread's CQ has room for its completion
 * (and for the kicks and signals of its queues); NULL otherwise. */
struct io_uring_sqe *iothread_get_req_sqe(struct dp_iothread *t);
void iothread_submit_req(struct dp_iothread *t, struct blk_req *req);
/* Signals the frontend through a queue's call or err eventfd. */
enum dp_signal { DP_SIGNAL_CALL, DP_SIGNAL_ERR };
void iothread_signal(struct dp_queue *q, enum dp_signal which);
/* Submits queued SQEs now (a signal mid-pass), rather than at the end of it. */
void iothread_flush(struct dp_iothread *t);
/* Completions after which a queue's pass publishes and signals early. */
uint32_t iothread_notify_after(const struct dp_iothread *t);
/* Sends a control message and waits for the answer; -ESHUTDOWN once the
 * thread has exited (it detached every queue first). */
int iothread_call(struct dp_iothread *t, struct ctl_msg *msg);
/* The thread's counters (the queue layer and backends add to some). */
struct dp_thread_counters *iothread_counters(struct dp_iothread *t);
/* Zeroed memory on the thread's NUMA node (page aligned). */
void *iothread_alloc(const struct dp_iothread *t, size_t size, int *node);
void iothread_free(void *p, size_t size, int node);

#endif
