/* I/O limits: QEMU's leaky buckets (util/throttle.c), kept lock-free.
 *
 * QEMU keeps a level per bucket that leaks at avg units a second; a request
 * waits while the level is over the bucket's size (max * max-length, or
 * avg / 10 without max) and, once it starts, adds its cost. With
 * max-length > 1 a second bucket leaks at max, of size max / 10, so that a
 * burst runs at max at most. We keep the same buckets as the time at which
 * each would be empty (tat): level = (tat - now) * rate, so adding a cost
 * is one atomic read-modify-write of one word, and leaking costs nothing.
 * Requests are admitted exactly when QEMU would admit them (level <= size),
 * and the first one over its limit goes ahead too, as in QEMU. */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "throttle.h"

#define TICKS_PER_SEC (1e9 * (double)(1u << THROTTLE_TICK_SHIFT))
/* No cost is larger (about 208 days of ticks): tat + cost never wraps. */
#define COST_MAX (1ull << 60)

static inline uint64_t d2u(double d)
{
    uint64_t u;
    memcpy(&u, &d, sizeof(u));
    return u;
}

static inline double u2d(uint64_t u)
{
    double d;
    memcpy(&d, &u, sizeof(d));
    return d;
}

static inline uint64_t ticks_at(const struct dp_throttle *t, uint64_t now)
{
    return now > t->epoch_ns ? (now - t->epoch_ns) << THROTTLE_TICK_SHIFT : 0;
}

static inline uint64_t cost_ticks(double units, double unit_ticks)
{
    double c = units * unit_ticks + 0.5;
    return c >= (double)COST_MAX ? COST_MAX : (uint64_t)c;
}

/* Relaxed: a bucket's word is all its state; nothing else is published
 * through it, and the read-modify-write loses no other thread's cost. */
static void bucket_add(_Atomic uint64_t *tat, uint64_t now, uint64_t cost)
{
    uint64_t old = atomic_load_explicit(tat, memory_order_relaxed);
    uint64_t next;
    do
        next = (old > now ? old : now) + cost;
    while (!atomic_compare_exchange_weak_explicit(tat, &old, next, memory_order_relaxed, memory_order_relaxed));
}

static inline void bucket_over(const _Atomic uint64_t *tat, uint64_t now, uint64_t allowance, uint64_t *wait)
{
    uint64_t end = atomic_load_explicit(tat, memory_order_relaxed);
    if (end > now && end - now > allowance && end - now - allowance > *wait)
        *wait = end - now - allowance;
}

/* The buckets a request of each direction is checked and counted against
 * (QEMU's throttle_compute_wait_for and throttle_account). */
static const uint8_t dir_buckets[2][4] = {
    {DP_THROTTLE_BPS_TOTAL, DP_THROTTLE_IOPS_TOTAL, DP_THROTTLE_BPS_READ, DP_THROTTLE_IOPS_READ},
    {DP_THROTTLE_BPS_TOTAL, DP_THROTTLE_IOPS_TOTAL, DP_THROTTLE_BPS_WRITE, DP_THROTTLE_IOPS_WRITE},
};

uint64_t throttle_wait(struct dp_throttle *t, int dir, uint64_t now)
{
    uint64_t n = ticks_at(t, now), wait = 0;
    for (int i = 0; i < 4; i++) {
        unsigned b = dir_buckets[dir][i];
        const struct throttle_rate *r = &t->rate[b];
        if (!atomic_load_explicit(&r->unit_ticks, memory_order_relaxed))
            continue;
        bucket_over(&t->bucket[b].tat, n, atomic_load_explicit(&r->allowance, memory_order_relaxed), &wait);
        if (atomic_load_explicit(&r->burst_unit_ticks, memory_order_relaxed))
            bucket_over(&t->bucket[b].burst_tat, n, atomic_load_explicit(&r->burst_allowance, memory_order_relaxed),
                        &wait);
    }
    /* Rounded up: woken a tick early, it would wait again. */
    return wait ? (wait >> THROTTLE_TICK_SHIFT) + 1 : 0;
}

void throttle_account(struct dp_throttle *t, int dir, uint64_t len, uint64_t now)
{
    uint64_t n = ticks_at(t, now);
    uint64_t op_size = atomic_load_explicit(&t->op_size, memory_order_relaxed);
    /* iops-size: a request larger than op_size counts as len / op_size I/Os. */
    double ios = op_size && len > op_size ? (double)len / (double)op_size : 1.0;
    for (int i = 0; i < 4; i++) {
        unsigned b = dir_buckets[dir][i];
        const struct throttle_rate *r = &t->rate[b];
        double unit = u2d(atomic_load_explicit(&r->unit_ticks, memory_order_relaxed));
        if (unit == 0)
            continue;
        double units = b >= DP_THROTTLE_IOPS_TOTAL ? ios : (double)len;
        bucket_add(&t->bucket[b].tat, n, cost_ticks(units, unit));
        double burst = u2d(atomic_load_explicit(&r->burst_unit_ticks, memory_order_relaxed));
        if (burst != 0)
            bucket_add(&t->bucket[b].burst_tat, n, cost_ticks(units, burst));
    }
}

/* ------------------------------------------------------------ control side */

int dp_throttle_check(const struct dp_throttle_config *c, int *bad_bucket)
{
    int dummy;
    if (!bad_bucket)
        bad_bucket = &dummy;
    *bad_bucket = -1;
    if (!c)
        return -EINVAL;
    /* QEMU's throttle_is_valid, in its order. */
    for (int kind = 0; kind < 2; kind++) {
        const struct dp_throttle_limit *l = &c->limits[kind * 3];
        if ((l[0].avg && (l[1].avg || l[2].avg)) || (l[0].max && (l[1].max || l[2].max))) {
            *bad_bucket = kind * 3;
            return -EEXIST; /* total together with read or write */
        }
    }
    if (c->iops_size && !c->limits[DP_THROTTLE_IOPS_TOTAL].avg && !c->limits[DP_THROTTLE_IOPS_READ].avg &&
        !c->limits[DP_THROTTLE_IOPS_WRITE].avg)
        return -ENOENT; /* iops-size needs an iops limit */
    for (int b = 0; b < DP_THROTTLE_BUCKETS; b++) {
        const struct dp_throttle_limit *l = &c->limits[b];
        *bad_bucket = b;
        if (l->avg > DP_THROTTLE_VALUE_MAX || l->max > DP_THROTTLE_VALUE_MAX)
            return -ERANGE;
        uint64_t length = l->max_length ? l->max_length : 1;
        if (length > 1 && !l->max)
            return -EDOM; /* max-length without max */
        if (l->max && !l->avg)
            return -ENODATA; /* max without the limit itself */
        if (l->max && l->max < l->avg)
            return -EINVAL; /* max below the limit */
        if (l->max && length > DP_THROTTLE_VALUE_MAX / l->max)
            return -E2BIG; /* max * max-length too large */
    }
    *bad_bucket = -1;
    return 0;
}

int dp_throttle_create(struct dp_throttle **out)
{
    if (!out)
        return -EINVAL;
    struct dp_throttle *t = aligned_alloc(64, sizeof(*t));
    if (!t)
        return -ENOMEM;
    memset(t, 0, sizeof(*t));
    t->epoch_ns = now_ns();
    *out = t;
    return 0;
}

void dp_throttle_destroy(struct dp_throttle *t)
{
    free(t);
}

/* One limit's hot-path form (QEMU's throttle_compute_wait: the bucket holds
 * max * max-length with max, avg / 10 without; the burst bucket, with
 * max-length > 1, leaks at max and holds max / 10). */
static void rate_set(struct throttle_rate *r, const struct dp_throttle_limit *l)
{
    uint64_t unit = 0, allowance = 0, burst_unit = 0, burst_allowance = 0;
    if (l->avg) {
        double per = TICKS_PER_SEC / (double)l->avg;
        uint64_t length = l->max_length ? l->max_length : 1;
        double size = l->max ? (double)l->max * (double)length : (double)l->avg / 10;
        unit = d2u(per);
        allowance = cost_ticks(size, per);
        if (length > 1) {
            double burst_per = TICKS_PER_SEC / (double)l->max;
            burst_unit = d2u(burst_per);
            burst_allowance = cost_ticks((double)l->max / 10, burst_per);
        }
    }
    /* Off first, on last. Relaxed: another IOThread may see these words in
     * any order, so one request may be judged by a mix of this setting and
     * the last (a wait a little too long or short, once: harmless). */
    atomic_store_explicit(&r->unit_ticks, 0, memory_order_relaxed);
    atomic_store_explicit(&r->allowance, allowance, memory_order_relaxed);
    atomic_store_explicit(&r->burst_allowance, burst_allowance, memory_order_relaxed);
    atomic_store_explicit(&r->burst_unit_ticks, burst_unit, memory_order_relaxed);
    atomic_store_explicit(&r->unit_ticks, unit, memory_order_relaxed);
}

int dp_throttle_set(struct dp_throttle *t, const struct dp_throttle_config *config)
{
    if (!t)
        return -EINVAL;
    int ret = dp_throttle_check(config, NULL);
    if (ret)
        return ret;
    t->config = *config;
    atomic_store_explicit(&t->op_size, config->iops_size, memory_order_relaxed);
    for (int b = 0; b < DP_THROTTLE_BUCKETS; b++) {
        rate_set(&t->rate[b], &config->limits[b]);
        /* Empty, as QEMU's throttle_config leaves them. */
        atomic_store_explicit(&t->bucket[b].tat, 0, memory_order_relaxed);
        atomic_store_explicit(&t->bucket[b].burst_tat, 0, memory_order_relaxed);
    }
    /* No ordering among the words: each is valid alone (rate_set), and a
     * request judged by a mix of old and new is one request. A throttle
     * set before dp_disk_set_throttle publishes it is seen whole (that
     * store releases, the queue's load acquires). */
    return 0;
}

int dp_throttle_get(const struct dp_throttle *t, struct dp_throttle_config *out)
{
    if (!t || !out)
        return -EINVAL;
    *out = t->config;
    return 0;
}

bool dp_throttle_limits_any(const struct dp_throttle_config *c)
{
    for (int b = 0; b < DP_THROTTLE_BUCKETS; b++)
        if (c->limits[b].avg)
            return true;
    return false;
}
