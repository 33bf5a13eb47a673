/* Lock-free snapshots of the counters. */
#include <sched.h>
#include <string.h>

#include "dp_internal.h"
#include "stats.h"

void stats_queue_snapshot(const struct dp_queue_counters *c, struct dp_queue_stats *out)
{
    memset(out, 0, sizeof(*out));
    for (int i = 0; i < DP_OP_COUNT; i++)
        out->ops[i] = STAT_LOAD(c->ops[i]);
    for (int i = 0; i < DP_ERR_COUNT; i++)
        out->errors[i] = STAT_LOAD(c->errors[i]);
    for (int i = 0; i < DP_BATCH_BUCKETS; i++)
        out->batch_hist[i] = STAT_LOAD(c->batch_hist[i]);
    for (int i = 0; i < DP_LATENCY_BUCKETS; i++)
        out->latency_hist[i] = STAT_LOAD(c->latency_hist[i]);
    out->bytes_read = STAT_LOAD(c->bytes_read);
    out->bytes_written = STAT_LOAD(c->bytes_written);
    out->in_flight = STAT_LOAD(c->in_flight);
    out->batches = STAT_LOAD(c->batches);
    out->polls = STAT_LOAD(c->polls);
    out->kicks = STAT_LOAD(c->kicks);
    out->notifies = STAT_LOAD(c->notifies);
    out->notifies_suppressed = STAT_LOAD(c->notifies_suppressed);
    out->bounces = STAT_LOAD(c->bounces);
    out->bounce_bytes_peak = STAT_LOAD(c->bounce_bytes_peak);
    out->longest_chain = STAT_LOAD(c->longest_chain);
    out->error_stopped = STAT_LOAD(c->error_stopped);
    out->error_stop_reason = STAT_LOAD(c->error_stop_reason);
    out->error_held = STAT_LOAD(c->error_held);
    out->errors_ignored = STAT_LOAD(c->errors_ignored);
    out->broken = STAT_LOAD(c->broken);
    out->broken_reason = STAT_LOAD(c->broken_reason);
    out->last_avail_idx = STAT_LOAD(c->last_avail_idx);
    out->used_idx = STAT_LOAD(c->used_idx);
    out->recovered = STAT_LOAD(c->recovered);
    out->throttled = STAT_LOAD(c->throttled);
    out->throttled_ns = STAT_LOAD(c->throttled_ns);
}

void stats_thread_snapshot(const struct dp_thread_counters *c, struct dp_iothread_stats *out)
{
    memset(out, 0, sizeof(*out));
    out->iterations = STAT_LOAD(c->iterations);
    out->waits = STAT_LOAD(c->waits);
    out->poll_hits = STAT_LOAD(c->poll_hits);
    out->poll_misses = STAT_LOAD(c->poll_misses);
    out->poll_ns = STAT_LOAD(c->poll_ns);
    out->submits = STAT_LOAD(c->submits);
    out->queues = STAT_LOAD(c->queues);
    out->failed = STAT_LOAD(c->failed);
    out->cq_overflows = STAT_LOAD(c->cq_overflows);
    out->uring_features = STAT_LOAD(c->uring_features);
    out->registered_files = STAT_LOAD(c->registered_files);
    out->registered_buffers = STAT_LOAD(c->registered_buffers);
    out->buffer_register_error = STAT_LOAD(c->buffer_register_error);
    out->buffer_register_failures = STAT_LOAD(c->buffer_register_failures);
    out->fixed_file_ios = STAT_LOAD(c->fixed_file_ios);
    out->fixed_buffer_ios = STAT_LOAD(c->fixed_buffer_ios);
    out->single_rw_ios = STAT_LOAD(c->single_rw_ios);
    out->kick_rearms = STAT_LOAD(c->kick_rearms);

    /* The time accounting, consistent (a sequence lock, see stats.h). */
    uint64_t total[DP_PHASES], since;
    uint32_t phase, seq;
    for (;;) {
        seq = atomic_load_explicit(&c->time.seq, memory_order_acquire);
        phase = STAT_LOAD(c->time.phase);
        since = STAT_LOAD(c->time.since_ns);
        for (int i = 0; i < DP_PHASES; i++)
            total[i] = STAT_LOAD(c->time.total_ns[i]);
        atomic_thread_fence(memory_order_acquire);
        if (!(seq & 1) && STAT_LOAD(c->time.seq) == seq)
            break;
        sched_yield(); /* the IOThread is between two stores (or preempted there) */
    }
    uint64_t now = now_ns();
    if (since && phase < DP_PHASES && now > since)
        total[phase] += now - since;
    out->busy_time_ns = total[DP_PHASE_BUSY];
    out->poll_time_ns = total[DP_PHASE_POLL];
    out->sleep_time_ns = total[DP_PHASE_SLEEP];
}
