/* I/O limits (QEMU's throttling.*): token buckets a disk's queues, on any
 * IOThreads, and a throttle group's disks share. Lock-free: each bucket is
 * one atomic word, the time at which it would be empty again (a leaky
 * bucket's level, kept as time: level = (tat - now) * rate). The queue
 * (queue.c) asks throttle_wait before a request starts and, when that is 0,
 * throttle_account; otherwise it keeps the request and waits that long. */
#ifndef DP_THROTTLE_H
#define DP_THROTTLE_H

#include "dp_internal.h"

/* Bucket time runs in ticks of 1/64 ns from the throttle's epoch (64-bit:
 * 9 years): a 4 KiB request at 100 GB/s costs 2621 ticks. Only a limit
 * past about 6e13 bytes/s, which no storage reaches, lets 512-byte
 * requests through at no cost (they round to 0 ticks). */
#define THROTTLE_TICK_SHIFT 6

/* A limit as the hot path reads it, computed when it is set. Each field is
 * an atomic word of its own: a request that reads some fields of the old
 * limit and some of the new is judged by a mix of two valid limits, once,
 * and no field is ever a divisor (no division on the hot path). */
struct throttle_rate {
    _Atomic uint64_t unit_ticks;       /* double's bits: ticks one unit costs at avg; 0: no limit */
    _Atomic uint64_t allowance;        /* ticks of level the bucket holds before requests wait */
    _Atomic uint64_t burst_unit_ticks; /* double's bits: at max, when max-length > 1; 0: none */
    _Atomic uint64_t burst_allowance;  /* the burst bucket's size (max / 10 units) in ticks */
};

struct throttle_bucket {
    _Atomic uint64_t tat;       /* ticks: when the avg bucket is empty again */
    _Atomic uint64_t burst_tat; /* the same for the burst bucket (max-length > 1) */
};

struct dp_throttle {
    uint64_t epoch_ns;
    _Atomic uint64_t op_size;   /* iops-size: a request counts as len / op_size I/Os when larger */
    struct throttle_rate rate[DP_THROTTLE_BUCKETS];
    /* Written by every IOThread serving a disk of this throttle: their own lines. */
    _Alignas(64) struct throttle_bucket bucket[DP_THROTTLE_BUCKETS];
    _Alignas(64) struct dp_throttle_config config; /* as set, for dp_throttle_get (control side only) */
};

/* Which way a request of op counts: 0 read, 1 write, -1 not limited
 * (flush, discard, get-id: as QEMU's block layer, which throttles only
 * reads and writes, write-zeroes among them). */
static inline int throttle_direction(uint8_t op)
{
    return op == DP_OP_READ ? 0 : op == DP_OP_WRITE || op == DP_OP_WRITE_ZEROES ? 1 : -1;
}

/* Nanoseconds until a request going direction dir may start; 0: now. */
uint64_t throttle_wait(struct dp_throttle *t, int dir, uint64_t now);
/* Counts a request of len bytes going dir against the buckets. */
void throttle_account(struct dp_throttle *t, int dir, uint64_t len, uint64_t now);

#endif
