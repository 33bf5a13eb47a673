/* Internal types shared by the data plane's files. Not part of the API. */
#ifndef DP_INTERNAL_H
#define DP_INTERNAL_H

#include <pthread.h>
#include <stddef.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#ifndef _GNU_SOURCE
#error "CDataPlane needs _GNU_SOURCE (set in Package.swift cSettings)"
#endif

#include "CDataPlane.h"
#include "stats.h"

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
    int fd;      /* I/O: an open file description without the image locks */
    int lock_fd; /* the description the image locks are on (see disk.c) */
    bool is_block_device;
    /* Changed while served (dp_disk_set_capacity): each request's range
     * check loads it once, relaxed; why that is enough is argued there. */
    _Atomic uint64_t capacity_sectors;
    /* Write-through: writes carry RWF_DSYNC (dp_disk_set_write_cache). */
    _Atomic bool write_through;
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
    /* I/O limits (throttle.h), or NULL: read by each queue once a pass
     * (acquire, against dp_disk_set_throttle's release). */
    _Atomic(struct dp_throttle *) throttle;
    /* Register guest memory for READ_FIXED/WRITE_FIXED (dp_disk_config). */
    bool fixed_buffers;
};

/* A completion's owner (loop.h): the loop calls done() with its CQE.
 * (Not "dp_op": the public enum dp_op has that tag.) */
struct loop_op {
    void (*done)(struct loop_op *op, int res, uint32_t cqe_flags);
};

struct backend_ctx;

/* One virtio-blk request in flight; lives in its queue's slot pool. */
struct blk_req {
    struct loop_op cqe_op;      /* its io_uring completion (backend_uring.c) */
    struct backend_ctx *ctx;    /* its queue's side the backend sees */
    struct blk_req *next;       /* backlog link: waiting for an SQE or a retry */
    struct iovec *iov;          /* data iovecs still to transfer */
    uint32_t iov_cnt;
    uint16_t head;
    uint16_t ring_descs;        /* packed rings: ring descriptors its buffer took */
    uint16_t log_cnt;           /* dirty logging: its writable iovecs, as walked (queue.c) */
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

enum ctl_type {
    CTL_ADD_QUEUE,
    CTL_STOP_QUEUE,
    CTL_PAUSE_QUEUE,
    CTL_RESUME_QUEUE,
    CTL_SET_MEM,
    CTL_SET_NOTIFIERS,
    CTL_STOP_THREAD,
    CTL_END_KICK_POLLS, /* tests: end the multishot kick polls, as the kernel may */
    CTL_DRAIN_QUEUE,    /* wait until what is in flight now has completed (dp_queue_drain) */
};

struct ctl_msg {
    enum ctl_type type;
    struct dp_queue *queue;
    struct dp_mem *mem;
    int32_t call_fd; /* CTL_SET_NOTIFIERS */
    int32_t err_fd;
    int result;
    uint32_t ring_base;         /* CTL_STOP_QUEUE's answer: vring_base */
    bool fail_held;             /* CTL_STOP_QUEUE: fail held requests even with an inflight region */
    bool done;
    struct ctl_msg *next;
};

/* The struct that holds member at ptr. */
#define dp_container_of(ptr, type, member) ((type *)(void *)((char *)(ptr) - offsetof(type, member)))

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

#endif
