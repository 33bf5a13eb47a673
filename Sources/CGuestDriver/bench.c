/*
 * The benchmark loop: one thread keeps `depth` requests in flight per queue
 * and records per-request latency. Uses only the public driver API. The
 * queues may belong to several drivers (a guest with several disks): every
 * queue carries its driver.
 */
#ifndef _GNU_SOURCE
#error "CGuestDriver needs _GNU_SOURCE (pthread_setaffinity_np); set it in the target's cSettings"
#endif

#include "CGuestDriver.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define GD_BENCH_STALL_NS 10000000000ull /* no completion for this long: give up */
#define GD_BENCH_POLL_MS 100             /* sleep slice, so stalls are noticed */

struct bench_queue {
    struct gd_driver *d;
    uint32_t qi;
    uint32_t nfree;
    uint32_t *free_slots;   /* slots (buffers) not in flight */
    uint32_t *slot_of_head; /* by head: the slot it carries */
    uint64_t *t_of_head;    /* by head: submit time */
    uint64_t *buf;          /* by slot: data buffer GPA */
    uint16_t seen_used;     /* used idx after the last reap (spinning watches it) */
    bool woken;             /* its call fd fired (or a spin saw it move): handle it */
};

struct bench {
    const struct gd_bench_params *p;
    struct gd_bench_result *r;
    struct bench_queue *q;
    uint32_t nq;
    bool indirect;
    uint32_t nsegs;
    struct gd_seg *segs;    /* one request's data segments */
    uint64_t rng, cursor, nblocks, warm_end, last_done;
};

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t xorshift64s(uint64_t *x)
{
    *x ^= *x >> 12;
    *x ^= *x << 25;
    *x ^= *x >> 27;
    return *x * 0x2545F4914F6CDD1Dull;
}

static uint64_t bench_next_sector(struct bench *b)
{
    uint64_t blk;
    if (b->p->random) {
        blk = xorshift64s(&b->rng) % b->nblocks;
    } else {
        blk = b->cursor;
        b->cursor = blk + 1 == b->nblocks ? 0 : blk + 1;
    }
    return blk * (b->p->block_size / 512);
}

/* Submits every free slot, publishing each, and kicks at most once. */
static int bench_fill(struct bench *b, struct bench_queue *bq, uint64_t now)
{
    if (!bq->nfree)
        return 0;
    while (bq->nfree) {
        uint32_t slot = bq->free_slots[bq->nfree - 1];
        uint32_t seg_len = b->p->block_size / b->nsegs;
        for (uint32_t i = 0; i < b->nsegs; i++)
            b->segs[i] = (struct gd_seg){ bq->buf[slot] + (uint64_t)i * seg_len, seg_len };
        struct gd_req req = { .type = b->p->type, .sector = bench_next_sector(b), .segs = b->segs,
                              .nsegs = b->nsegs, .indirect = b->indirect };
        uint16_t head;
        int rc = gd_request_add(bq->d, bq->qi, &req, &head);
        if (rc < 0)
            return rc; /* cannot happen: depth was checked against the ring */
        bq->nfree--;
        bq->slot_of_head[head] = slot;
        bq->t_of_head[head] = now;
        /* Each request is visible at once, as Linux's virtqueue_add does:
         * a polling device starts on it while the rest are added. */
        gd_avail_publish(bq->d, bq->qi);
    }
    int rc = gd_kick_if_needed(bq->d, bq->qi);
    if (rc < 0)
        return rc;
    b->r->kicks += (uint64_t)rc;
    return 0;
}

/* Pops everything the device has pushed; returns how many. Nothing is
 * resubmitted here, so a request cannot complete within its own batch. */
static int bench_reap(struct bench *b, struct bench_queue *bq, uint32_t qpos)
{
    struct gd_bench_result *r = b->r;
    uint64_t now = 0;
    int n = 0;
    for (;;) {
        uint16_t head;
        uint8_t status;
        int rc = gd_complete(bq->d, bq->qi, &head, NULL, &status);
        if (rc <= 0)
            break;
        if (!n++)
            now = mono_ns(); /* after the first pop: never earlier than the completion */
        if (status != GD_BLK_S_OK)
            r->errors++;
        if (now >= b->warm_end) {
            uint64_t lat = now - bq->t_of_head[head];
            r->ops++;
            r->bytes += b->p->block_size;
            r->hist[gd_hist_bucket(lat)]++;
            if (qpos < 16)
                r->per_queue_ops[qpos]++;
            b->last_done = now;
        }
        bq->free_slots[bq->nfree++] = bq->slot_of_head[head];
    }
    r->reaped += (uint64_t)n;
    return n;
}

/* The interrupt handler (Linux's virtblk_done): calls off, reap everything,
 * calls on again and reap once more if something landed in between. Calls
 * stay on afterwards: the next completion wakes the guest. */
static int bench_handle_calls(struct bench *b, struct bench_queue *bq, uint32_t qpos)
{
    int total = 0;
    do {
        gd_disable_calls(bq->d, bq->qi);
        total += bench_reap(b, bq, qpos);
    } while (gd_enable_calls(bq->d, bq->qi) > 0);
    return total;
}

/* Reads a call eventfd's counter: how many times the device signalled. */
static int bench_read_signals(struct bench *b, int fd)
{
    uint64_t v;
    if (read(fd, &v, sizeof(v)) == sizeof(v)) {
        b->r->signals += v;
        return 0;
    }
    return errno == EAGAIN ? 0 : -errno;
}

/* Completions arrived since the last reap: the split used index moved, or a
 * packed ring's next slot holds a used descriptor. */
static bool bench_used_moved(const struct bench_queue *bq)
{
    if (gd_is_packed(bq->d))
        return gd_used_pending(bq->d, bq->qi);
    return gd_used_idx(bq->d, bq->qi) != bq->seen_used;
}

static bool bench_any_used(struct bench *b)
{
    for (uint32_t i = 0; i < b->nq; i++)
        if (bench_used_moved(&b->q[i]))
            return true;
    return false;
}

/* Waits like a guest: spins for up to spin_ns watching the used rings (a
 * hybrid), then sleeps until a call eventfd fires. Returns 1 on a wake-up,
 * with `woken` set on the queues whose call fd fired (after a spin: whose
 * used idx moved), as each of a guest's interrupts runs its own queue's
 * handler; 0 on the stall-check timeout. */
static int bench_sleep(struct bench *b, struct pollfd *pfds)
{
    bool found = false;
    if (b->p->spin_ns) {
        uint64_t until = mono_ns() + b->p->spin_ns;
        while (!(found = bench_any_used(b)) && mono_ns() < until)
            __builtin_ia32_pause();
    }
    int n = 0;
    if (!found) {
        b->r->waits++;
        n = poll(pfds, b->nq, GD_BENCH_POLL_MS);
        if (n < 0)
            return errno == EINTR ? 0 : -errno;
        if (n == 0)
            return 0;
    }
    b->r->wakeups++;
    /* A spin that found work may also have been signalled: read the
     * counters either way, so no stale signal wakes the next sleep. */
    for (uint32_t i = 0; i < b->nq; i++) {
        struct bench_queue *bq = &b->q[i];
        bq->woken = found ? bench_used_moved(bq) : (pfds[i].revents & POLLIN) != 0;
        if (found || bq->woken) {
            int rc = bench_read_signals(b, pfds[i].fd);
            if (rc < 0)
                return rc;
        }
    }
    return 1;
}

static int bench_fill_all(struct bench *b, uint64_t stop, uint64_t *in_flight)
{
    uint64_t now = mono_ns();
    *in_flight = 0;
    for (uint32_t i = 0; i < b->nq; i++) {
        if (now < stop) {
            int rc = bench_fill(b, &b->q[i], now);
            if (rc < 0)
                return rc;
        }
        *in_flight += gd_in_flight(b->q[i].d, b->q[i].qi);
    }
    return 0;
}

/* A polling guest: reap, resubmit, never sleep. */
static int bench_loop_poll(struct bench *b, uint64_t stop)
{
    uint64_t last_progress = mono_ns();
    for (;;) {
        int popped = 0;
        for (uint32_t i = 0; i < b->nq; i++)
            popped += bench_reap(b, &b->q[i], i);
        uint64_t in_flight;
        int rc = bench_fill_all(b, stop, &in_flight);
        if (rc < 0)
            return rc;
        if (!in_flight)
            return 0; /* stopped and drained */
        uint64_t now = mono_ns();
        if (popped)
            last_progress = now;
        else if (now - last_progress > GD_BENCH_STALL_NS)
            return -ETIMEDOUT;
    }
}

/* An interrupt-driven guest: sleep, handle the calls, resubmit, kick. */
static int bench_loop_guest(struct bench *b, struct pollfd *pfds, uint64_t stop)
{
    uint64_t last_progress = mono_ns();
    for (;;) {
        int rc = bench_sleep(b, pfds);
        if (rc < 0)
            return rc;
        /* After a sleep that timed out, every queue: a lost signal shows
         * up as a stall only if nothing was pushed. */
        int popped = 0;
        for (uint32_t i = 0; i < b->nq; i++) {
            struct bench_queue *bq = &b->q[i];
            if (rc == 1 && !bq->woken)
                continue;
            popped += bench_handle_calls(b, bq, i);
            bq->seen_used = gd_used_idx(bq->d, bq->qi);
        }
        uint64_t in_flight;
        rc = bench_fill_all(b, stop, &in_flight);
        if (rc < 0)
            return rc;
        if (!in_flight)
            return 0;
        uint64_t now = mono_ns();
        if (popped)
            last_progress = now;
        else if (now - last_progress > GD_BENCH_STALL_NS)
            return -ETIMEDOUT;
    }
}

static int bench_loop(struct bench *b, struct pollfd *pfds)
{
    const struct gd_bench_params *p = b->p;
    uint64_t t0 = mono_ns();
    b->warm_end = t0 + p->warmup_ns;
    b->last_done = b->warm_end;
    /* The guest model's calls are on from the start, so a completion of the
     * first batch wakes it. */
    for (uint32_t i = 0; !p->busy_poll && i < b->nq; i++)
        gd_enable_calls(b->q[i].d, b->q[i].qi);
    uint64_t in_flight;
    int rc = bench_fill_all(b, t0 + p->duration_ns, &in_flight);
    if (rc < 0)
        return rc;
    return p->busy_poll ? bench_loop_poll(b, t0 + p->duration_ns) : bench_loop_guest(b, pfds, t0 + p->duration_ns);
}

static int bench_setup(struct bench *b, const struct gd_bench_target *t, uint32_t nt, struct pollfd *pfds)
{
    const struct gd_bench_params *p = b->p;
    struct dp_queue_config qc;
    gd_queue_config(t[0].d, t[0].first_queue, &qc);
    uint32_t size = qc.size;
    /* header, data, status per direct chain */
    b->indirect = p->indirect || (b->nsegs + 2ull) * p->depth > size;
    b->segs = calloc(b->nsegs, sizeof(*b->segs));
    if (!b->segs)
        return -ENOMEM;
    uint32_t i = 0;
    for (uint32_t ti = 0; ti < nt; ti++) {
        for (uint32_t k = 0; k < t[ti].num_queues; k++, i++) {
            struct bench_queue *bq = &b->q[i];
            bq->d = t[ti].d;
            bq->qi = t[ti].first_queue + k;
            gd_queue_config(bq->d, bq->qi, &qc);
            if (qc.size != size || gd_in_flight(bq->d, bq->qi))
                return qc.size != size ? -EINVAL : -EBUSY;
            pfds[i] = (struct pollfd){ .fd = qc.call_fd, .events = POLLIN };
            bq->free_slots = malloc(p->depth * sizeof(*bq->free_slots));
            bq->buf = malloc(p->depth * sizeof(*bq->buf));
            bq->slot_of_head = calloc(size, sizeof(*bq->slot_of_head));
            bq->t_of_head = calloc(size, sizeof(*bq->t_of_head));
            if (!bq->free_slots || !bq->buf || !bq->slot_of_head || !bq->t_of_head)
                return -ENOMEM;
            for (uint32_t s = 0; s < p->depth; s++) {
                bq->buf[s] = gd_alloc(bq->d, p->block_size, 4096);
                if (!bq->buf[s])
                    return -ENOMEM;
                bq->free_slots[bq->nfree++] = p->depth - 1 - s; /* slot 0 goes out first */
            }
            gd_disable_calls(bq->d, bq->qi); /* busy-poll never wants them; the guest model enables them */
        }
    }
    return 0;
}

int gd_bench_run(struct gd_driver *d, const struct gd_bench_params *p, struct gd_bench_result *r)
{
    if (!p)
        return -EINVAL;
    struct gd_bench_target t = { .d = d, .first_queue = p->first_queue, .num_queues = p->num_queues };
    return gd_bench_run_many(&t, 1, p, r);
}

int gd_bench_run_many(const struct gd_bench_target *t, uint32_t nt, const struct gd_bench_params *p,
                      struct gd_bench_result *r)
{
    uint32_t nsegs = p && p->segments ? p->segments : 1;
    if (!t || !nt || !p || !r || !p->depth || (p->type != GD_BLK_T_IN && p->type != GD_BLK_T_OUT) ||
        !p->block_size || p->block_size % 512 || p->block_size % nsegs ||
        p->capacity_sectors < p->block_size / 512)
        return -EINVAL;
    uint64_t nq = 0;
    for (uint32_t ti = 0; ti < nt; ti++) {
        if (!t[ti].d || !t[ti].num_queues || t[ti].first_queue > UINT32_MAX - t[ti].num_queues)
            return -EINVAL;
        struct dp_queue_config qc;
        gd_queue_config(t[ti].d, t[ti].first_queue + t[ti].num_queues - 1, &qc);
        /* The last queue exists, one head per request, a chain fits the ring. */
        if (!qc.size || p->depth > qc.size || nsegs + 2ull > qc.size)
            return -EINVAL;
        nq += t[ti].num_queues;
    }
    if (nq > UINT32_MAX)
        return -EINVAL;
    memset(r, 0, sizeof(*r));

    cpu_set_t old_set;
    bool pinned = false;
    if (p->cpu >= 0) {
        if (p->cpu >= CPU_SETSIZE)
            return -EINVAL;
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(p->cpu, &set);
        int err = pthread_getaffinity_np(pthread_self(), sizeof(old_set), &old_set);
        if (!err)
            err = pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
        if (err)
            return -err;
        pinned = true;
    }

    struct bench b = {
        .p = p, .r = r, .nq = (uint32_t)nq,
        .rng = p->seed ? p->seed : 0x9E3779B97F4A7C15ull,
        .nblocks = p->capacity_sectors / (p->block_size / 512),
        .nsegs = nsegs,
    };
    uint64_t *marks = calloc(nt, sizeof(*marks));
    for (uint32_t ti = 0; marks && ti < nt; ti++)
        marks[ti] = gd_alloc_mark(t[ti].d);
    struct pollfd *pfds = calloc(b.nq, sizeof(*pfds));
    b.q = calloc(b.nq, sizeof(*b.q));
    int rc = marks && pfds && b.q ? bench_setup(&b, t, nt, pfds) : -ENOMEM;
    if (rc == 0)
        rc = bench_loop(&b, pfds);
    if (rc == 0)
        r->elapsed_ns = b.last_done - b.warm_end;

    for (uint32_t i = 0; b.q && i < b.nq; i++) {
        struct bench_queue *bq = &b.q[i];
        free(bq->free_slots);
        free(bq->buf);
        free(bq->slot_of_head);
        free(bq->t_of_head);
    }
    /* Calls back to the driver's default, and each driver's buffers given
     * back, unless requests are still in flight after an error. */
    for (uint32_t ti = 0; ti < nt; ti++) {
        uint64_t in_flight = 0;
        for (uint32_t k = 0; k < t[ti].num_queues; k++) {
            gd_enable_calls(t[ti].d, t[ti].first_queue + k);
            in_flight += gd_in_flight(t[ti].d, t[ti].first_queue + k);
        }
        if (marks && !in_flight)
            gd_alloc_reset(t[ti].d, marks[ti]);
    }
    free(marks);
    free(b.q);
    free(b.segs);
    free(pfds);
    if (pinned)
        pthread_setaffinity_np(pthread_self(), sizeof(old_set), &old_set);
    return rc;
}

int gd_pin_thread(int32_t cpu)
{
    if (cpu >= CPU_SETSIZE)
        return -EINVAL;
    cpu_set_t set;
    CPU_ZERO(&set);
    if (cpu >= 0) {
        CPU_SET(cpu, &set);
    } else {
        for (int i = 0; i < CPU_SETSIZE; i++)
            CPU_SET(i, &set);
    }
    return -pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

uint32_t gd_hist_bucket(uint64_t ns)
{
    if (ns < 16)
        return (uint32_t)ns;
    uint32_t e = 63 - (uint32_t)__builtin_clzll(ns); /* >= 4 */
    return (e - 3) * 16 + (uint32_t)((ns >> (e - 4)) & 15);
}

uint64_t gd_hist_percentile(const uint64_t *hist, double pct)
{
    uint64_t total = 0;
    for (uint32_t i = 0; i < GD_HIST_BUCKETS; i++)
        total += hist[i];
    if (!total)
        return 0;
    pct = pct < 0 ? 0 : pct > 100 ? 100 : pct;
    double exact = pct / 100.0 * (double)total;
    uint64_t want = (uint64_t)exact;
    if ((double)want < exact || want == 0)
        want++; /* the smallest count covering pct of the samples */
    uint64_t seen = 0;
    uint32_t i = 0;
    for (; i < GD_HIST_BUCKETS - 1; i++) {
        seen += hist[i];
        if (seen >= want)
            break;
    }
    if (i < 16)
        return i;
    if (i > gd_hist_bucket(UINT64_MAX))
        i = gd_hist_bucket(UINT64_MAX); /* no latency lands above it */
    uint32_t e = i / 16 + 3, sub = i % 16;
    uint64_t lo = (16ull + sub) << (e - 4), width = 1ull << (e - 4);
    return lo + width / 2;
}
