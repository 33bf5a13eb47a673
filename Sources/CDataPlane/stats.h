/* Per-queue counters: written by the owning IOThread only, read by anyone.
 * Relaxed atomics, with a load and a store instead of a locked add since
 * there is one writer; the block sits on its own cache lines. */
#ifndef DP_STATS_H
#define DP_STATS_H

#include <stdatomic.h>
#include <stdint.h>

#include "CDataPlane.h"

struct dp_queue_counters {
    /* What every request or batch touches, on two cache lines: per request
     * ops and bytes (line 1) and a latency bucket; per pass the rest of
     * line 2. Then what errors and control touch. */
    _Alignas(64) _Atomic uint64_t ops[DP_OP_COUNT];
    _Atomic uint64_t bytes_read;
    _Alignas(64) _Atomic uint64_t bytes_written;
    _Atomic uint64_t in_flight;
    _Atomic uint64_t batches;
    _Atomic uint64_t polls;
    _Atomic uint64_t kicks;
    _Atomic uint64_t notifies;
    _Atomic uint64_t notifies_suppressed;
    _Atomic uint16_t last_avail_idx;
    _Atomic uint16_t used_idx;
    _Atomic uint32_t longest_chain;
    _Atomic uint64_t recovered;
    _Atomic uint64_t throttled;
    _Atomic uint64_t throttled_ns;
    _Alignas(64) _Atomic uint64_t errors[DP_ERR_COUNT];
    _Atomic uint64_t bounces;
    _Atomic uint64_t bounce_bytes_peak;
    _Atomic uint32_t error_stopped;
    _Atomic int32_t error_stop_reason;
    _Atomic uint64_t error_held;
    _Atomic uint64_t errors_ignored;
    _Atomic uint32_t broken;
    _Atomic int32_t broken_reason;
    _Alignas(64) _Atomic uint64_t batch_hist[DP_BATCH_BUCKETS];
    _Atomic uint64_t latency_hist[DP_LATENCY_BUCKETS];
};

/* Where an IOThread's wall-clock time goes: the phase it is in and since
 * when, and the time of the phases ended. The thread changes phase only
 * around its idle stretches (a poll window, a sleep), never per request or
 * per busy pass. One writer, so a sequence lock: seq is odd while the
 * thread updates the rest; a reader retries until it read an even seq that
 * did not move, then adds the phase under way. */
enum dp_thread_phase { DP_PHASE_BUSY, DP_PHASE_POLL, DP_PHASE_SLEEP, DP_PHASES };

struct dp_thread_time {
    _Alignas(64) _Atomic uint32_t seq;
    _Atomic uint32_t phase;    /* DP_PHASES: the loop is not running */
    _Atomic uint64_t since_ns; /* CLOCK_MONOTONIC; 0 before the loop starts */
    _Atomic uint64_t total_ns[DP_PHASES];
};

struct dp_thread_counters {
    _Alignas(64) _Atomic uint64_t iterations;
    _Atomic uint64_t waits;
    _Atomic uint64_t poll_hits;
    _Atomic uint64_t poll_misses;
    _Atomic uint64_t poll_ns;
    _Atomic uint64_t submits;
    _Atomic uint32_t queues;
    _Atomic int32_t failed;
    _Atomic uint64_t cq_overflows;
    _Atomic uint32_t uring_features;
    _Atomic uint32_t registered_files;
    _Atomic uint32_t registered_buffers;
    _Atomic int32_t buffer_register_error;
    _Atomic uint64_t buffer_register_failures;
    _Atomic uint64_t kick_rearms;
    /* Per request: on a line of their own, away from the loop's. */
    _Alignas(64) _Atomic uint64_t fixed_file_ios;
    _Atomic uint64_t fixed_buffer_ios;
    _Atomic uint64_t single_rw_ios;
    struct dp_thread_time time;
};

#define STAT_LOAD(field) atomic_load_explicit(&(field), memory_order_relaxed)
#define STAT_SET(field, v) atomic_store_explicit(&(field), (v), memory_order_relaxed)
#define STAT_ADD(field, n) STAT_SET(field, STAT_LOAD(field) + (n))

/* floor(log2(v)) clamped to [0, buckets - 1]; v == 0 goes to bucket 0. */
static inline unsigned stats_log2_bucket(uint64_t v, unsigned buckets)
{
    unsigned b = v ? 63u - (unsigned)__builtin_clzll(v) : 0u;
    return b < buckets ? b : buckets - 1;
}

/* The IOThread enters `phase` at `now` (its own thread only). */
static inline void stats_thread_phase(struct dp_thread_time *t, enum dp_thread_phase phase, uint64_t now)
{
    uint32_t seq = STAT_LOAD(t->seq);
    STAT_SET(t->seq, seq + 1);
    /* The odd seq before the data: pairs with the acquire fence in
     * stats_thread_snapshot, which then sees seq moved. */
    atomic_thread_fence(memory_order_release);
    uint32_t cur = STAT_LOAD(t->phase);
    uint64_t since = STAT_LOAD(t->since_ns);
    if (since && cur < DP_PHASES && now > since)
        STAT_ADD(t->total_ns[cur], now - since);
    STAT_SET(t->phase, (uint32_t)phase);
    STAT_SET(t->since_ns, now);
    /* The data before the even seq: pairs with the reader's acquire load. */
    atomic_store_explicit(&t->seq, seq + 2, memory_order_release);
}

void stats_queue_snapshot(const struct dp_queue_counters *c, struct dp_queue_stats *out);
void stats_thread_snapshot(const struct dp_thread_counters *c, struct dp_iothread_stats *out);

#endif
