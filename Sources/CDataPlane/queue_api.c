/* The public dp_queue_* calls: made on the control side, carried out on
 * the queue's IOThread by message (queue_ctl.c). */
#include <errno.h>
#include <fcntl.h>

#include "iothread.h"
#include "queue.h"

/* Signals are written with RWF_NOWAIT, which a blocking eventfd always
 * refuses: call and err fds must be O_NONBLOCK. */
static int notifiers_set_nonblocking(int32_t call_fd, int32_t err_fd)
{
    int32_t fds[2] = {call_fd, err_fd};
    for (int i = 0; i < 2; i++) {
        if (fds[i] < 0)
            continue;
        int flags = fcntl(fds[i], F_GETFL);
        if (flags < 0 || (!(flags & O_NONBLOCK) && fcntl(fds[i], F_SETFL, flags | O_NONBLOCK) < 0))
            return -errno;
    }
    return 0;
}

static int queue_config_check(const struct dp_queue_config *cfg)
{
    if (cfg->size == 0 || cfg->size > DP_QUEUE_MAX_SIZE || (cfg->size & (cfg->size - 1)))
        return -EINVAL;
    if (cfg->kick_fd < 0)
        return -EBADF;
    if (cfg->log_bitmap && (cfg->log_size == 0 || cfg->log_size > UINT64_MAX / 8))
        return -EINVAL;
    return notifiers_set_nonblocking(cfg->call_fd, cfg->err_fd);
}

/* The queue and its arrays in one allocation on the thread's NUMA node:
 * the head, then slots, their iovecs, the free list, head-to-slot map,
 * pushed and resubmit lists, the indirect-table scratch, and for a packed
 * ring with an inflight region its private side (inflight_packed). */
static struct dp_queue *queue_alloc(struct dp_iothread *thread, uint32_t size, uint32_t nslots, bool packed_inflight,
                                    bool logging)
{
    size_t head_size = sizeof(struct dp_queue);
    size_t reqs_off = (head_size + 63) & ~(size_t)63;
    size_t iov_off = reqs_off + nslots * sizeof(struct blk_req);
    size_t free_off = iov_off + (size_t)nslots * DP_REQ_MAX_IOV * sizeof(struct iovec);
    size_t heads_off = free_off + nslots * sizeof(uint16_t);
    size_t pushed_off = heads_off + size * sizeof(uint16_t);
    size_t resubmit_off = pushed_off + nslots * sizeof(uint16_t);
    size_t scratch_off = (resubmit_off + size * sizeof(uint16_t) + 15) & ~(size_t)15;
    size_t total = scratch_off + VRING_INDIRECT_MAX * sizeof(struct vring_desc);
    size_t copy_off = total, next_off = total, bufs_off = total;
    if (packed_inflight) {
        copy_off = total;
        next_off = copy_off + (DP_SEG_MAX + 2) * sizeof(struct vring_packed_desc);
        bufs_off = next_off + size * sizeof(uint16_t);
        total = bufs_off + size * sizeof(struct inflight_buf);
    }
    size_t log_off = (total + 15) & ~(size_t)15;
    if (logging)
        total = log_off + (size_t)nslots * DP_REQ_MAX_IOV * sizeof(struct iovec);

    int node;
    uint8_t *base = iothread_alloc(thread, total, &node);
    if (!base)
        return NULL;
    struct dp_queue *q = (struct dp_queue *)base;
    q->reqs = (struct blk_req *)(base + reqs_off);
    q->iov_pool = (struct iovec *)(base + iov_off);
    q->free_slots = (uint16_t *)(base + free_off);
    q->head_slot = (uint16_t *)(base + heads_off);
    q->pushed = (uint16_t *)(base + pushed_off);
    q->resubmit = (uint16_t *)(base + resubmit_off);
    q->indirect_scratch = (struct vring_desc *)(base + scratch_off);
    if (packed_inflight) {
        q->ipk.ring_copy = (struct vring_packed_desc *)(base + copy_off);
        q->ipk.next = (uint16_t *)(base + next_off);
        q->ipk.bufs = (struct inflight_buf *)(base + bufs_off);
    }
    if (logging)
        q->log_iov = (struct iovec *)(base + log_off);
    q->alloc_size = total;
    q->numa_node = node;
    q->nslots = nslots;
    return q;
}

/* The queue's side of its disk's backend; its slots point at it. */
static void queue_backend_init(struct dp_queue *q, struct dp_disk *disk, struct dp_mem *mem)
{
    q->io.ops = disk->backend == DP_BACKEND_NULL ? &backend_null_ops : &backend_uring_ops;
    q->io.disk = disk;
    q->io.mem = mem;
    q->io.io_done = queue_backend_done;
    q->io.reqs = q->reqs;
    q->io.iov_pool = q->iov_pool;
    /* Until its IOThread registers them (on attach): the plain fd, no buffers. */
    q->io.ring_fd = disk->fd;
    q->io.file_slot = -1;
    q->io.bounce.stats = &q->stats;
    q->io.thread_stats = iothread_counters(q->thread);
    for (uint32_t i = 0; i < q->nslots; i++) {
        q->reqs[i].ctx = &q->io;
        q->free_slots[i] = (uint16_t)(q->nslots - 1 - i);
    }
    q->free_count = q->nslots;
}

int dp_queue_create(struct dp_iothread *thread, const struct dp_queue_config *config,
                    struct dp_disk *disk, struct dp_mem *mem, struct dp_queue **out)
{
    if (!thread || !config || !disk || !mem || !out)
        return -EINVAL;
    int ret = queue_config_check(config);
    if (ret)
        return ret;
    struct vring vr;
    ret = vring_init(&vr, config, mem, disk->seg_max + 2);
    if (ret)
        return ret;

    uint32_t nslots = config->size < DP_QUEUE_MAX_SLOTS ? config->size : DP_QUEUE_MAX_SLOTS;
    struct dp_queue *q = queue_alloc(thread, config->size, nslots, config->packed && config->inflight,
                                     config->log_bitmap != NULL);
    if (!q)
        return -ENOMEM;
    q->log = (struct dirty_log){.bitmap = config->log_bitmap, .size = config->log_size};
    q->inflight = config->inflight;
    q->thread = thread;
    q->notify_after = iothread_notify_after(thread);
    q->config = *config;
    queue_kick_init(q);
    queue_backend_init(q, disk, mem);
    q->vr = vr;
    if (q->inflight)
        ret = inflight_recover(q);
    if (ret) {
        iothread_free(q, q->alloc_size, q->numa_node);
        return ret;
    }
    STAT_SET(q->stats.last_avail_idx, vring_last_avail_idx(&q->vr));
    STAT_SET(q->stats.used_idx, vring_used_idx(&q->vr));
    STAT_SET(q->stats.recovered, q->resubmit_count);

    struct ctl_msg msg = {.type = CTL_ADD_QUEUE, .queue = q};
    ret = iothread_call(thread, &msg);
    if (ret) {
        iothread_free(q, q->alloc_size, q->numa_node);
        return ret;
    }
    *out = q;
    return 0;
}

int dp_queue_stop(struct dp_queue *queue, uint16_t *last_avail_idx)
{
    uint32_t base;
    int ret = dp_queue_stop_base(queue, &base);
    if (!ret && last_avail_idx)
        *last_avail_idx = (uint16_t)base;
    return ret;
}

static int queue_stop(struct dp_queue *queue, bool fail_held, uint32_t *base)
{
    if (!queue)
        return -EINVAL;
    struct ctl_msg msg = {.type = CTL_STOP_QUEUE, .queue = queue, .fail_held = fail_held};
    int ret = iothread_call(queue->thread, &msg);
    if (ret == -ESHUTDOWN || ret == -ENOENT) {
        /* Already detached: the thread exited or the queue was stopped before;
         * the thread no longer touches it, so its state is ours to read. */
        msg.ring_base = vring_base(&queue->vr);
        ret = 0;
    }
    if (!ret && base)
        *base = msg.ring_base;
    return ret;
}

int dp_queue_stop_base(struct dp_queue *queue, uint32_t *base)
{
    return queue_stop(queue, false, base);
}

int dp_queue_stop_failing_held(struct dp_queue *queue, uint32_t *base)
{
    return queue_stop(queue, true, base);
}

void dp_queue_destroy(struct dp_queue *queue)
{
    if (!queue)
        return;
    dp_queue_stop(queue, NULL);
    iothread_free(queue, queue->alloc_size, queue->numa_node);
}

int dp_queue_pause(struct dp_queue *queue)
{
    struct ctl_msg msg = {.type = CTL_PAUSE_QUEUE, .queue = queue};
    return queue ? iothread_call(queue->thread, &msg) : -EINVAL;
}

int dp_queue_drain(struct dp_queue *queue)
{
    struct ctl_msg msg = {.type = CTL_DRAIN_QUEUE, .queue = queue};
    return queue ? iothread_call(queue->thread, &msg) : -EINVAL;
}

int dp_queue_resume(struct dp_queue *queue)
{
    struct ctl_msg msg = {.type = CTL_RESUME_QUEUE, .queue = queue};
    return queue ? iothread_call(queue->thread, &msg) : -EINVAL;
}

int dp_queue_set_mem(struct dp_queue *queue, struct dp_mem *mem)
{
    if (!queue || !mem)
        return -EINVAL;
    struct ctl_msg msg = {.type = CTL_SET_MEM, .queue = queue, .mem = mem};
    return iothread_call(queue->thread, &msg);
}

int dp_queue_set_notifiers(struct dp_queue *queue, int32_t call_fd, int32_t err_fd)
{
    if (!queue)
        return -EINVAL;
    int ret = notifiers_set_nonblocking(call_fd, err_fd);
    if (ret)
        return ret;
    struct ctl_msg msg = {.type = CTL_SET_NOTIFIERS, .queue = queue, .call_fd = call_fd, .err_fd = err_fd};
    return iothread_call(queue->thread, &msg);
}

int dp_queue_get_stats(const struct dp_queue *queue, struct dp_queue_stats *out)
{
    if (!queue || !out)
        return -EINVAL;
    stats_queue_snapshot(&queue->stats, out);
    return 0;
}

const char *dp_ring_error_string(int reason)
{
    switch (reason) {
    case -ERANGE:
        return "avail index moved more than the queue size ahead";
    case -EINVAL:
        return "avail ring names a descriptor outside the table (packed: a buffer id not below the queue size)";
    case -EBUSY:
        return "avail ring names a descriptor chain (packed: a buffer id) that is already in flight";
    case -ENOSPC:
        return "more descriptors made available than the ring holds (packed: descriptors reused before they were used)";
    case -EFAULT:
        return "ring lies outside guest memory";
    case -ENOMSG:
        return "descriptor chain has no device-writable status byte at its end";
    case -ELOOP:
        return "descriptor chain loops";
    case -E2BIG:
        return "descriptor chain has more descriptors than seg_max + 2, or an indirect table over 1024";
    case -EBADMSG:
        return "descriptor chain malformed (next outside its table, or a bad indirect descriptor)";
    case -ENXIO:
        return "indirect descriptor table outside guest memory";
    case -EBADR:
        return "the IOThread lost I/O completions (io_uring CQ overflow)";
    case -ECANCELED:
        return "the IOThread's io_uring failed (see the IOThread's status)";
    case 0:
        return "not broken";
    default:
        return "ring corrupt";
    }
}
