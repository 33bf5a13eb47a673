/*
 * CDataPlane: the virtio-blk data plane's hot path.
 *
 * The one public header: opaque handles, plain structs, fixed-width types.
 * liburing.h and numa.h stay inside the .c files (liburing <= 2.7 defines
 * _GNU_SOURCE in its header, which clashes with Swift's Glibc module).
 *
 * Every function returns 0 (or a count) on success and a negative errno on
 * failure; none sets errno.
 *
 * Threads: a dp_iothread owns its queues. All dp_queue_* calls below are made
 * from the control side; they reach the IOThread as messages handled between
 * batches and wait for its answer. Calls on one queue must not overlap (the
 * Swift Virtqueue serializes them): a stop, pause or memory swap drains, and
 * a second call meanwhile gets -EBUSY, or, for a resume, ends the pause the
 * drain relies on. dp_*_get_stats may be called from any thread at any time.
 */
#ifndef CDATAPLANE_H
#define CDATAPLANE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------- guest memory */

/* One region of guest memory as the frontend describes it: guest-physical
 * address, size, the frontend's own virtual address (vhost-user ring
 * addresses are given in it), and where we have it mapped. */
struct dp_mem_region {
    uint64_t guest_phys_addr;
    uint64_t size;
    uint64_t user_addr;
    void *host_addr;
};

#define DP_MEM_MAX_REGIONS 64

/* An immutable table of regions. Regions must not overlap in guest-physical
 * or in user address space, must have non-zero size and must not wrap. */
struct dp_mem;

int dp_mem_create(const struct dp_mem_region *regions, uint32_t count, struct dp_mem **out);
void dp_mem_destroy(struct dp_mem *mem);

/* Translate a guest range to a host pointer when it lies inside one region.
 * Returns -EFAULT otherwise (also on overflow). For the control path. */
int dp_mem_translate_gpa(const struct dp_mem *mem, uint64_t gpa, uint64_t len, void **host);
int dp_mem_translate_uva(const struct dp_mem *mem, uint64_t uva, uint64_t len, void **host);

/* ---------------------------------------------------------------- disks */

enum dp_backend_kind {
    DP_BACKEND_FILE = 0, /* io_uring on a raw file or block device */
    DP_BACKEND_NULL = 1, /* completes without I/O; reads zero-fill if null_read_zeroes */
};

#define DP_SERIAL_LEN 20 /* VIRTIO_BLK_ID_BYTES */

/* What one request may carry, announced in the virtio-blk config space: at
 * most seg_max data segments (DP_SEG_MAX, or fewer per disk) of at most
 * DP_SIZE_MAX bytes each (size_max). A chain of more than seg_max + 2
 * descriptors (header and status besides the data) breaks the queue. With
 * indirect descriptors a chain is not bounded by its ring: Linux puts
 * seg_max + 2 = 130 descriptors in one table on QEMU's 128-entry rings. */
#define DP_SEG_MAX 128
/* SeaBIOS divides size_max * seg_max by the block size into a u16 count of
 * blocks per request: 0 (from 4 MiB * 128 / 512) made it loop forever on
 * empty reads. 128 KiB keeps it at 32768 and requests at 16 MiB. */
#define DP_SIZE_MAX (128u << 10)

/* What a failed read or write does (QEMU's rerror/werror). */
enum dp_error_policy {
    DP_POLICY_REPORT = 0, /* complete with VIRTIO_BLK_S_IOERR */
    DP_POLICY_IGNORE = 1, /* complete as if it had worked */
    DP_POLICY_ENOSPC = 2, /* stop on ENOSPC, report anything else */
    DP_POLICY_STOP = 3,   /* stop the queue, keep the request; dp_queue_resume retries it */
};

struct dp_disk_config {
    int32_t backend;             /* enum dp_backend_kind */
    int32_t fd;                  /* file backend: an open fd (dup'ed; caller keeps its own) */
    uint64_t capacity_sectors;   /* in 512-byte sectors */
    uint32_t logical_block_size; /* 512 or a larger power of two */
    uint32_t mem_align;          /* buffer alignment O_DIRECT needs; 0 = no direct I/O */
    bool read_only;
    bool null_read_zeroes;       /* null backend: fill read buffers with zeroes */
    uint8_t serial[DP_SERIAL_LEN];
    int32_t read_policy;         /* enum dp_error_policy for reads */
    int32_t write_policy;        /* ... for writes, flushes, discards, write zeroes */
    uint32_t seg_max;            /* segments per request announced, 1..DP_SEG_MAX; 0 = DP_SEG_MAX */
    /* File backend: register the guest memory of this disk's queues with
     * their IOThread's io_uring, for READ_FIXED/WRITE_FIXED. That pins (and
     * so allocates) all of it for as long as a queue uses it: see
     * DP_URING_FIXED_BUFFERS. Where registering fails, plain I/O is used. */
    bool fixed_buffers;
};

/* Fault injection, for tests and for rehearsing failures: matching requests
 * fail with `error` instead of reaching the backend. */
struct dp_fault_config {
    int32_t error;          /* positive errno (EIO, ENOSPC, ...); 0 turns injection off */
    uint32_t ops;           /* bit (1 << enum dp_op) per request type affected */
    uint64_t sector_start;  /* requests touching [sector_start, sector_end) */
    uint64_t sector_end;    /* 0 = to the end of the disk */
    uint64_t after;         /* let this many matching requests through first */
    uint32_t every;         /* then fail one in `every` (0 or 1: all) */
};

/* Shared by the queues of many IOThreads; immutable once created but for
 * what the dp_disk_set_* calls change. */
struct dp_disk;

int dp_disk_create(const struct dp_disk_config *config, struct dp_disk **out);
void dp_disk_destroy(struct dp_disk *disk);
/* 0, or the negative errno of a failed flush of the page cache (no O_DIRECT):
 * from then on every FLUSH fails, until the disk is opened again (any thread). */
int dp_disk_flush_error(const struct dp_disk *disk);
/* Changes fault injection while the disk is served (any thread). */
int dp_disk_set_fault(struct dp_disk *disk, const struct dp_fault_config *fault);
/* The capacity requests are checked against now, in 512-byte sectors. */
uint64_t dp_disk_capacity(const struct dp_disk *disk);
/* Changes the capacity while the disk is served (any thread): a request
 * parsed after this returns is checked against the new one. Lowering it
 * does not wait for requests already past the new end: call dp_queue_drain
 * on every queue of the disk before the storage behind goes. -EINVAL for
 * 0 or a size not in whole logical blocks. */
int dp_disk_set_capacity(struct dp_disk *disk, uint64_t sectors);
/* The image's size now: a file's length, a block device's size (read
 * again: after losetup -c, lvextend), or the null backend's capacity. */
int dp_disk_image_size(const struct dp_disk *disk, uint64_t *bytes);
/* Sets a regular file's length (ftruncate on the I/O description): -EINVAL
 * for a block device or the null backend, -EBADF when opened read-only. */
int dp_disk_truncate(struct dp_disk *disk, uint64_t bytes);
/* Write-back (the default) or write-through: with write-through every
 * write carries RWF_DSYNC, so it is durable on the storage (data and what
 * reaching it needs) before the guest is told it completed. Turning it on
 * first checks that the kernel takes RWF_DSYNC on this image (a zero-length
 * pwritev2): -EOPNOTSUPP when not; then makes what was written before
 * durable (fdatasync: a write-through guest sends no flushes; its error
 * leaves the disk in write-back). Any thread; writes submitted after it
 * returns carry the new mode. */
int dp_disk_set_write_cache(struct dp_disk *disk, bool writeback);
bool dp_disk_write_cache(const struct dp_disk *disk);
/* Claims the image for I/O: an OFD lock on byte 300 (beside QEMU's bytes)
 * of the file description our I/O goes through: exclusive with `exclusive`,
 * else shared (a read-only disk; writers that share the image on purpose,
 * who then do not wait for each other's dead requests). An io_uring keeps
 * that description, and so the lock, until every request of a dead process
 * has completed, which may be long after the process is gone: its writes
 * still land, its reads still fill guest memory. -EAGAIN while such a ring (or a live disk that
 * conflicts; the image locks refuse those first) holds it: a disk that
 * started its I/O then could see old writes land after its own, and the
 * guest find old reads in memory it reused. 0 for the null backend. */
int dp_disk_claim_io(struct dp_disk *disk, bool exclusive);

/* I/O limits, with QEMU's semantics (throttling.* of a -drive or
 * blockdev, util/throttle.c): a leaky bucket per limit, bytes and I/Os a
 * second for total, reads and writes. Reads count as reads; writes and
 * write-zeroes as writes; flush, discard and get-id are not limited. A
 * request that would overfill a bucket waits, in order (nothing of its
 * queue starts before it); the first one over goes ahead, as in QEMU. */
enum dp_throttle_bucket {
    DP_THROTTLE_BPS_TOTAL,
    DP_THROTTLE_BPS_READ,
    DP_THROTTLE_BPS_WRITE,
    DP_THROTTLE_IOPS_TOTAL,
    DP_THROTTLE_IOPS_READ,
    DP_THROTTLE_IOPS_WRITE,
    DP_THROTTLE_BUCKETS
};

/* QEMU's THROTTLE_VALUE_MAX: no rate or burst may be larger. */
#define DP_THROTTLE_VALUE_MAX 1000000000000000ull

struct dp_throttle_limit {
    uint64_t avg;        /* units a second; 0: no limit */
    uint64_t max;        /* burst rate (-max); 0: bursts of avg / 10 units */
    uint64_t max_length; /* seconds a burst at max may last (-max-length); 0 or 1: one */
};

struct dp_throttle_config {
    struct dp_throttle_limit limits[DP_THROTTLE_BUCKETS];
    uint64_t iops_size;  /* a request larger than this counts as size / iops_size I/Os; 0: one */
};

/* A set of buckets: one disk's, or a throttle group's that several disks
 * (on any IOThreads) share. */
struct dp_throttle;

int dp_throttle_create(struct dp_throttle **out);
/* Only once no disk points at it and no queue of such a disk runs. */
void dp_throttle_destroy(struct dp_throttle *t);
/* 0, or QEMU's refusals: -EEXIST total with read or write of the same kind
 * (avg or max), -ENOENT iops_size without an iops limit, -ERANGE a value
 * over DP_THROTTLE_VALUE_MAX, -EDOM max_length > 1 without max, -ENODATA
 * max without avg, -EINVAL max < avg, -E2BIG max * max_length over the
 * maximum. *bad_bucket (may be NULL) names the bucket, or -1. */
int dp_throttle_check(const struct dp_throttle_config *config, int *bad_bucket);
/* Checks and applies limits (any thread; one setter at a time): the
 * buckets start empty, as in QEMU. Requests waiting see the change within
 * DP_THROTTLE_RECHECK_NS. */
int dp_throttle_set(struct dp_throttle *t, const struct dp_throttle_config *config);
int dp_throttle_get(const struct dp_throttle *t, struct dp_throttle_config *out);
/* Whether a configuration limits anything (some avg set). */
bool dp_throttle_limits_any(const struct dp_throttle_config *config);
/* A waiting queue looks again at least this often (a limit changed). */
#define DP_THROTTLE_RECHECK_NS 20000000ull
/* The buckets the disk's requests obey from now on (NULL: none), on every
 * queue from its next pass (any thread). t must stay until the disk is
 * destroyed, or until every queue of the disk has stopped. */
int dp_disk_set_throttle(struct dp_disk *disk, struct dp_throttle *t);

/* Opens an image for the file backend: O_CLOEXEC, read-only or read-write,
 * with O_DIRECT when direct is set. Returns the fd or a negative errno. */
int dp_open_image(const char *path, bool read_only, bool direct);

/* What an image needs and offers, as dp_fd_probe finds it. Block sizes are
 * powers of two, 512 at least; physical_block_size >= logical_block_size. */
struct dp_fd_info {
    uint64_t size_bytes;
    /* The smallest unit of offset and length O_DIRECT takes: a block
     * device's logical sector size (BLKSSZGET), a regular file's direct-I/O
     * offset alignment (statx STATX_DIOALIGN); 512 when unknown. */
    uint32_t logical_block_size;
    /* The unit below which a write costs a read-modify-write: a block
     * device's physical block size (BLKPBSZGET), a regular file's filesystem
     * block size (fstatfs f_bsize, when a power of two up to 64 KiB);
     * logical_block_size when unknown. */
    uint32_t physical_block_size;
    /* The buffer alignment O_DIRECT needs (512 when unknown). */
    uint32_t dio_mem_align;
    bool block_device;
};

/* Fills info for a regular file or block device; -EINVAL for anything else. */
int dp_fd_probe(int fd, struct dp_fd_info *info);

/* Image locking, compatible with QEMU's (block/file-posix.c, locking=on):
 * open file description (OFD) read locks on one byte per permission, byte
 * 100 + i for each permission bit i held and byte 200 + i for each bit not
 * shared with others. The bits are QEMU 7.2's BLK_PERM_* bits. */
enum dp_image_perm {
    DP_PERM_CONSISTENT_READ = 1u << 0,
    DP_PERM_WRITE = 1u << 1,
    DP_PERM_WRITE_UNCHANGED = 1u << 2,
    DP_PERM_RESIZE = 1u << 3,
    DP_PERM_ALL = 0xfu,
};

/* Why dp_image_lock refused: one permission, and whose side it is on. */
struct dp_lock_conflict {
    uint32_t perm;       /* the one DP_PERM_* bit */
    bool held_by_other;  /* true: another open holds perm, which we do not share;
                          * false: we need perm, and another open does not share it */
};

/* Locks fd's image for perm (DP_PERM_* bits), sharing `shared` with others:
 * takes our bytes first, then checks the others' (as QEMU does, so of two
 * racing openers at least one sees the other). -EAGAIN on a conflict, with
 * *conflict filled (may be NULL); other errors are the filesystem's (no
 * byte-range locks: -ENOLCK, -EOPNOTSUPP, ...). On failure nothing stays
 * locked. The locks belong to fd's open file description: they last until
 * every fd sharing it (dup'ed ones too) is closed. */
int dp_image_lock(int fd, uint32_t perm, uint32_t shared, struct dp_lock_conflict *conflict);

/* ---------------------------------------------------------------- statistics */

enum dp_op {
    DP_OP_READ = 0,
    DP_OP_WRITE,
    DP_OP_FLUSH,
    DP_OP_GET_ID,
    DP_OP_DISCARD,
    DP_OP_WRITE_ZEROES,
    DP_OP_OTHER, /* unsupported request types */
    DP_OP_COUNT
};

enum dp_err {
    DP_ERR_IO = 0,      /* the backend failed (EIO, ENOSPC, ...) */
    DP_ERR_BAD_REQUEST, /* malformed header, length, layout or descriptor chain */
    DP_ERR_RANGE,       /* sectors past capacity or overflowing */
    DP_ERR_READ_ONLY,   /* a write to a read-only disk */
    DP_ERR_UNSUPP,      /* unsupported type or flags */
    DP_ERR_COUNT
};

#define DP_LATENCY_BUCKETS 40 /* bucket i counts latencies in [2^i, 2^(i+1)) ns */
#define DP_BATCH_BUCKETS 16   /* bucket i counts batches of [2^i, 2^(i+1)) requests */

struct dp_queue_stats {
    uint64_t ops[DP_OP_COUNT];
    uint64_t bytes_read;
    uint64_t bytes_written;
    uint64_t errors[DP_ERR_COUNT];
    uint64_t in_flight;
    uint64_t batches;         /* loop iterations that popped at least one request */
    uint64_t batch_hist[DP_BATCH_BUCKETS];
    uint64_t polls;           /* requests found by busy-polling, no kick needed */
    uint64_t kicks;           /* kick eventfd wake-ups */
    uint64_t notifies;        /* call eventfd writes */
    uint64_t notifies_suppressed; /* batches that needed no call (EVENT_IDX, NO_INTERRUPT) */
    uint64_t bounces;         /* requests that went through a bounce buffer */
    uint64_t bounce_bytes_peak; /* most bounce-buffer memory held at once */
    uint32_t longest_chain;   /* most iovecs one request carried (header and status included) */
    uint64_t latency_hist[DP_LATENCY_BUCKETS];
    uint32_t error_stopped;   /* 1 while stopped by the error policy, requests held */
    int32_t error_stop_reason; /* the negative errno that stopped it */
    uint64_t error_held;      /* requests held for retry */
    uint64_t errors_ignored;  /* failures completed as success (ignore policy) */
    uint32_t broken;          /* 1 once the ring is corrupt (DEVICE_NEEDS_RESET) */
    int32_t broken_reason;    /* negative errno naming the corruption */
    uint16_t last_avail_idx;
    uint16_t used_idx;
    uint64_t recovered;       /* requests the inflight region gave back at a start, run again */
    uint64_t throttled;       /* requests that waited for an I/O limit */
    uint64_t throttled_ns;    /* their time waiting, summed */
};

/* io_uring features an IOThread uses where its kernel has them; each is
 * probed when the thread sets its ring up, and falls back to what works
 * without it. */
enum dp_uring_feature {
    /* IORING_SETUP_DEFER_TASKRUN (Linux 6.1): completions are posted only
     * when the thread asks for them, never by interrupting it. */
    DP_URING_DEFER_TASKRUN = 1u << 0,
    /* Disk fds in a registered file table (IOSQE_FIXED_FILE): no file
     * lookup per request. */
    DP_URING_REGISTERED_FILES = 1u << 1,
    /* A registered buffer table: the guest memory of disks that ask for it
     * (dp_disk_config.fixed_buffers) is registered, and one-segment reads
     * and writes into it are READ_FIXED/WRITE_FIXED (no page pinning per
     * request). Registering pins the memory: the kernel keeps those pages
     * for us, so a frontend that discards guest RAM (a balloon, free page
     * reporting, virtio-mem) and maps new pages there would leave our I/O
     * going to the old ones. */
    DP_URING_FIXED_BUFFERS = 1u << 2,
    /* One-segment reads and writes as IORING_OP_READ/WRITE, not READV/WRITEV. */
    DP_URING_SINGLE_RW = 1u << 3,
    /* One multishot poll per kick fd (IORING_POLL_ADD_MULTI, Linux 5.13)
     * instead of a read armed again after every kick. */
    DP_URING_MULTISHOT_KICKS = 1u << 4,
    DP_URING_ALL = 0x1fu,
};

struct dp_iothread_stats {
    uint64_t iterations;  /* loop iterations */
    uint64_t waits;       /* times the thread slept in io_uring_enter */
    uint64_t poll_hits;   /* busy-poll windows that found work */
    uint64_t poll_misses; /* busy-poll windows that ran out */
    uint64_t poll_ns;     /* the current adaptive busy-poll window */
    uint64_t submits;     /* io_uring_enter calls */
    uint64_t cpu_ns;      /* the thread's CPU time */
    uint32_t queues;      /* queues attached */
    int32_t failed;       /* a negative errno once its io_uring failed it (its queues are broken) */
    uint64_t cq_overflows; /* passes that found its completion queue overflowed (never, by design) */
    uint32_t uring_features;     /* DP_URING_* its io_uring uses */
    uint32_t registered_files;   /* disk fds in its registered file table now */
    uint32_t registered_buffers; /* guest memory registered now: pieces of regions (1 GiB at most each) */
    int32_t buffer_register_error; /* the last failure to register a memory table (-errno), or 0 */
    uint64_t buffer_register_failures; /* memory tables that could not be registered (their I/O is plain) */
    uint64_t fixed_file_ios;     /* disk SQEs that named a registered file */
    uint64_t fixed_buffer_ios;   /* reads and writes into registered memory (READ_FIXED/WRITE_FIXED) */
    uint64_t single_rw_ios;      /* other one-segment reads and writes, as READ/WRITE */
    uint64_t kick_rearms;        /* multishot kick polls armed again after the kernel ended one */
    /* Where the thread's wall-clock time went since its loop started, in
     * nanoseconds: sleeping in io_uring_enter, spinning in the busy-poll
     * window, and the rest (passes over the queues, submitting, reaping).
     * The stretch under way counts up to the moment of the snapshot, so the
     * three add up to the time the loop has run. (A snapshot taken while
     * the thread changes phase may see the phase it left a little longer
     * than the next one does: nanoseconds.) */
    uint64_t busy_time_ns;
    uint64_t poll_time_ns;
    uint64_t sleep_time_ns;
};

/* ---------------------------------------------------------------- IOThreads */

#define DP_MAX_CPUS 1024

struct dp_iothread_config {
    const int32_t *cpus;     /* CPUs to pin to; NULL/0 = leave affinity alone */
    uint32_t cpu_count;
    uint64_t poll_max_ns;    /* upper bound of the adaptive busy-poll window; 0 = never poll */
    uint32_t ring_entries;   /* io_uring SQ size; 0 = 256 */
    uint32_t notify_after;   /* a queue's pass publishes and signals once early, after this many
                                completions (0 = only at the end of the pass; see queue.c) */
    char name[16];           /* thread name (pthread_setname_np) */
    /* DP_URING_* features never to use, even where the kernel has them: to
     * measure what each brings, and to test what runs without them. */
    uint32_t disabled_features;
};

struct dp_iothread;

/* Starts the thread, pins it, sets up its io_uring on the cpuset's NUMA node.
 * Returns after the thread is ready, or with the error it hit. */
int dp_iothread_create(const struct dp_iothread_config *config, struct dp_iothread **out);
/* Stops every queue (each drains its in-flight requests) and joins the thread. */
int dp_iothread_stop(struct dp_iothread *thread);
/* Stops the thread if needed, then frees it. Queues still attached are freed. */
void dp_iothread_destroy(struct dp_iothread *thread);
int dp_iothread_get_stats(const struct dp_iothread *thread, struct dp_iothread_stats *out);
/* The NUMA node the thread's memory comes from (-1 when unknown). */
int dp_iothread_numa_node(const struct dp_iothread *thread);
/* For tests: ends every multishot kick poll on the thread, as the kernel
 * does when it has no room left for their completions; the thread must arm
 * each one again. Returns how many it ended. */
int dp_iothread_end_kick_polls(struct dp_iothread *thread);

/* ---------------------------------------------------------------- virtqueues */

#define DP_QUEUE_MAX_SIZE 32768

struct dp_queue_config {
    uint32_t size;           /* power of two, 1..32768 */
    uint64_t desc_addr;      /* ring addresses: guest-physical, or user if addrs_are_user */
    uint64_t avail_addr;
    uint64_t used_addr;
    bool addrs_are_user;
    bool event_idx;          /* VIRTIO_RING_F_EVENT_IDX negotiated */
    bool indirect;           /* VIRTIO_RING_F_INDIRECT_DESC negotiated */
    uint16_t last_avail_idx; /* split: where to resume popping (vhost-user SET_VRING_BASE) */
    /* VIRTIO_F_RING_PACKED (virtio 1.2, 2.8): desc_addr is the descriptor
     * ring, avail_addr the driver and used_addr the device event suppression
     * area; packed_base is SET_VRING_BASE's 32-bit value (bits 0-14 the next
     * descriptor to pop, 15 its wrap counter, 16-30 the next used position,
     * 31 its wrap counter; 0x80008000 on a fresh ring). Buffer ids must be
     * below size. */
    bool packed;
    uint32_t packed_base;
    int32_t kick_fd;         /* eventfd the driver writes; -1 = rely on polling */
    int32_t call_fd;         /* eventfd we write on completions; -1 = none */
    int32_t err_fd;          /* eventfd we write when the ring breaks; -1 = none */
                             /* (both are made O_NONBLOCK: we never wait to signal) */
    /* vhost-user inflight tracking (INFLIGHT_SHMFD): this queue's part of the
     * shared region, dp_inflight_queue_size(size, packed) bytes, or NULL.
     * When the region holds requests from a previous backend or connection,
     * they are resubmitted first, in the order they were popped, and popping
     * resumes after them (split: last_avail_idx is then taken from the
     * region and the used ring; packed: the whole base, which QEMU cannot
     * know after a backend died, is taken from the region). A region that
     * disagrees with the ring is refused (-EBADMSG). */
    void *inflight;
    /* Dirty page logging for live migration (vhost-user VHOST_F_LOG_ALL):
     * the frontend's bitmap, one bit per 4 KiB guest-physical page (bit
     * page % 8 of byte page / 8), log_size bytes, or NULL. Every byte the
     * queue writes into guest memory (read data, status bytes, GET_ID
     * strings, the used ring or packed used descriptors, event suppression
     * fields) gets its page marked after the write and before the used
     * index that hands it over is published. Off, it costs one branch per
     * request and per publish. */
    void *log_bitmap;
    uint64_t log_size;
};

/* Bytes one queue's inflight region takes: QueueRegionSplit, or with packed
 * QueueRegionPacked (vhost-user.rst "Inflight I/O tracking"), 64-aligned.
 * The backend sizes the region (GET_INFLIGHT_FD), so every queue of a
 * device gets the same layout: the one its negotiated features give. */
uint64_t dp_inflight_queue_size(uint32_t queue_size, bool packed);

struct dp_queue;

/* Creates a queue over a disk and guest memory and attaches it to a thread.
 * Ring addresses are checked against memory (-EFAULT) and the queue's state is
 * allocated on the thread's NUMA node. The used index resumes from the ring. */
int dp_queue_create(struct dp_iothread *thread, const struct dp_queue_config *config,
                    struct dp_disk *disk, struct dp_mem *mem, struct dp_queue **out);
/* Stops popping, waits for every in-flight request to complete and be pushed,
 * detaches the queue and reports where popping stopped. */
int dp_queue_stop(struct dp_queue *queue, uint16_t *last_avail_idx);
/* dp_queue_stop, answering GET_VRING_BASE for either layout: split, the next
 * avail index; packed, the 32-bit value packed_base describes. */
int dp_queue_stop_base(struct dp_queue *queue, uint32_t *base);
/* dp_queue_stop_base for a stop after which nobody takes the inflight region
 * over (a migrating guest's source: its destination brings a region of its
 * own): requests the error policy holds, and heads waiting to run again,
 * complete with VIRTIO_BLK_S_IOERR before it returns instead of staying
 * marked there, where they would never run. */
int dp_queue_stop_failing_held(struct dp_queue *queue, uint32_t *base);
/* Frees a queue (stopping it first if still attached). */
void dp_queue_destroy(struct dp_queue *queue);
/* Stop popping new requests (in-flight ones complete) / start again. Resume
 * also retries requests held by the stop error policy, in their order
 * (failing those a shrink left past the disk's end). */
int dp_queue_pause(struct dp_queue *queue);
int dp_queue_resume(struct dp_queue *queue);
/* Returns once every request the queue had taken when it was called has
 * completed (those the error policy holds excepted); the queue goes on
 * taking requests afterwards, a paused one stays paused. -ENOENT once the
 * queue is stopped (nothing of it is in flight), -EBUSY while a stop or a
 * memory swap drains it (call again). A shrink's barrier (dp_disk_set_capacity). */
int dp_queue_drain(struct dp_queue *queue);
/* Swap the guest memory table; ring addresses are translated again. The old
 * table is no longer used by the queue when this returns. */
int dp_queue_set_mem(struct dp_queue *queue, struct dp_mem *mem);
/* Swap the call and err eventfds of a running queue (vhost-user SET_VRING_CALL
 * or SET_VRING_ERR; QEMU sends them when the guest masks a vector). Nothing is
 * drained: requests in flight or held by the error policy stay. The queue no
 * longer uses the old fds when this returns; the new call fd is signalled
 * once, so no completion signalled to the old one goes unseen. */
int dp_queue_set_notifiers(struct dp_queue *queue, int32_t call_fd, int32_t err_fd);
int dp_queue_get_stats(const struct dp_queue *queue, struct dp_queue_stats *out);

/* A short description of a ring corruption reason (a negative errno from
 * dp_queue_stats.broken_reason). */
const char *dp_ring_error_string(int reason);

#ifdef __cplusplus
}
#endif

#endif /* CDATAPLANE_H */
