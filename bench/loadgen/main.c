/*
 * dp-loadgen: a vhost-user-blk front-end that drives any back-end (ours,
 * qemu-storage-daemon, SPDK) the same way: CGuestDriver's rings and memfd,
 * handed over with QEMU's handshake (CVhostFrontend), then its benchmark loop
 * gd_bench_run_many. No guest kernel, so what it measures is the back-end plus
 * one tight C loop on the front-end's CPU. Several --socket options make it a
 * guest with several disks: one driver (guest memory, rings) and one
 * connection per disk, all driven by the one loop.
 */
#ifndef _GNU_SOURCE
#error "dp-loadgen needs _GNU_SOURCE; set it in the target's cSettings"
#endif

#include <CVhostFrontend.h>

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define LG_MAX_QUEUES 16   /* gd_bench_result keeps per-queue counts for 16 */
#define LG_MAX_SOCKETS 256 /* disks of one run */
#define LG_MAX_SOCKETS_TEXT "256"

struct lg_opts {
    const char *sockets[LG_MAX_SOCKETS];
    uint32_t nsockets;
    uint32_t queues, depth, queue_size, block_size;
    uint32_t type;
    bool random, poll, json, event_idx, verbose, direct, packed, dirty_log;
    double seconds, warmup, spin_us;
    int32_t cpu;
    uint64_t seed, size_limit;
    struct vuf_options vuf;
};

static void usage(FILE *f)
{
    fprintf(f,
            "usage: dp-loadgen --socket PATH [--socket PATH ...] [options]\n"
            "\n"
            "Connects to a vhost-user-blk back-end as QEMU would, keeps DEPTH requests in\n"
            "flight per queue from one thread, and reports IOPS, MB/s and latency.\n"
            "With several --socket options it is a guest with several disks: each disk\n"
            "has its own guest memory, rings and connection, and the one thread drives\n"
            "the queues of all of them; the figures are the sum over the disks.\n"
            "\n"
            "By default it behaves like a Linux guest's virtio-blk driver: it sleeps on the\n"
            "call eventfds until the back-end signals, reaps every completion (re-checking\n"
            "after re-enabling calls), resubmits, and kicks once per queue when asked to.\n"
            "\n"
            "  --socket PATH        the back-end's unix socket (required; repeat it for more\n"
            "                       disks, up to %d)\n"
            "  --queues N           queues to drive per disk (1..%d, default 1)\n"
            "  --depth N            requests in flight per queue (default 32)\n"
            "  --rw MODE            randread | randwrite | read | write (default randread)\n"
            "  --bs SIZE            block size, e.g. 4k, 64k, 1m (a multiple of 512; default 4k)\n"
            "  --seconds S          measured time after warm-up (default 10)\n"
            "  --warmup S           time whose completions are not counted (default 1)\n"
            "  --poll               a polling guest: spin on the used rings, never sleep\n"
            "  --spin-us N          a hybrid guest: spin N us for completions before sleeping\n"
            "  --cpu N              pin the load thread to CPU N\n"
            "  --seed N             random offsets seed (default fixed)\n"
            "  --json               print one JSON object instead of text\n"
            "  --queue-size N       virtqueue size (power of two, default 256)\n"
            "  --size BYTES         use only the first BYTES of the disk (e.g. 1g)\n"
            "  --no-event-idx       don't use VIRTIO_RING_F_EVENT_IDX\n"
            "  --packed             packed virtqueues (VIRTIO_F_RING_PACKED; the back-end must offer it)\n"
            "  --direct             direct chains where they fit the ring (Linux puts every\n"
            "                       request in an indirect table when the back-end offers them)\n"
            "  --inflight           negotiate INFLIGHT_SHMFD (GET_/SET_INFLIGHT_FD)\n"
            "  --dirty-log          turn dirty logging on after the handshake, as QEMU does when a\n"
            "                       migration starts (SET_LOG_BASE, then LOG_ALL): the back-end\n"
            "                       marks every page it writes for the whole run\n"
            "  --add-mem-reg        ADD_MEM_REG instead of SET_MEM_TABLE (if offered)\n"
            "  --two-regions        describe guest memory as two regions\n"
            "  --features-early     SET_FEATURES right after GET_FEATURES\n"
            "  --no-reply-ack       don't negotiate REPLY_ACK\n"
            "  -v, --verbose        print what was negotiated (stderr)\n",
            LG_MAX_SOCKETS, LG_MAX_QUEUES);
}

static _Noreturn void die_usage(const char *fmt, const char *arg)
{
    fprintf(stderr, "dp-loadgen: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\n");
    usage(stderr);
    exit(2);
}

static uint64_t parse_uint(const char *opt, const char *s, uint64_t max)
{
    uint64_t v;
    if (vuf_parse_uint(s, max, &v))
        die_usage("bad value for %s", opt);
    return v;
}

static double parse_seconds(const char *opt, const char *s)
{
    double v;
    if (vuf_parse_double(s, 86400, &v))
        die_usage("bad value for %s", opt);
    return v;
}

static void parse(int argc, char **argv, struct lg_opts *o)
{
    *o = (struct lg_opts){ .queues = 1, .depth = 32, .queue_size = 256, .block_size = 4096, .type = GD_BLK_T_IN,
                           .random = true, .seconds = 10, .warmup = 1, .cpu = -1, .event_idx = true };
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEEDV()                                                                                              \
    do {                                                                                                     \
        if (!v)                                                                                              \
            die_usage("%s needs a value", a);                                                                \
        i++;                                                                                                 \
    } while (0)
        if (!strcmp(a, "--socket")) {
            NEEDV();
            if (o->nsockets == LG_MAX_SOCKETS)
                die_usage("at most %s --socket options", LG_MAX_SOCKETS_TEXT);
            o->sockets[o->nsockets++] = v;
        } else if (!strcmp(a, "--queues")) {
            NEEDV();
            o->queues = (uint32_t)parse_uint(a, v, LG_MAX_QUEUES);
        } else if (!strcmp(a, "--depth")) {
            NEEDV();
            o->depth = (uint32_t)parse_uint(a, v, DP_QUEUE_MAX_SIZE);
        } else if (!strcmp(a, "--queue-size")) {
            NEEDV();
            o->queue_size = (uint32_t)parse_uint(a, v, DP_QUEUE_MAX_SIZE);
        } else if (!strcmp(a, "--rw")) {
            NEEDV();
            if (!strcmp(v, "randread") || !strcmp(v, "read"))
                o->type = GD_BLK_T_IN;
            else if (!strcmp(v, "randwrite") || !strcmp(v, "write"))
                o->type = GD_BLK_T_OUT;
            else
                die_usage("--rw is randread, randwrite, read or write, not %s", v);
            o->random = !strncmp(v, "rand", 4);
        } else if (!strcmp(a, "--bs")) {
            NEEDV();
            uint64_t bs = vuf_parse_size(v);
            if (!bs || bs % 512 || bs > (64u << 20))
                die_usage("--bs must be a multiple of 512 up to 64m, not %s", v);
            o->block_size = (uint32_t)bs;
        } else if (!strcmp(a, "--size")) {
            NEEDV();
            o->size_limit = vuf_parse_size(v);
            if (!o->size_limit)
                die_usage("bad value for --size: %s", v);
        } else if (!strcmp(a, "--seconds")) {
            NEEDV();
            o->seconds = parse_seconds(a, v);
        } else if (!strcmp(a, "--warmup")) {
            NEEDV();
            o->warmup = parse_seconds(a, v);
        } else if (!strcmp(a, "--cpu")) {
            NEEDV();
            o->cpu = (int32_t)parse_uint(a, v, 4095);
        } else if (!strcmp(a, "--seed")) {
            NEEDV();
            o->seed = parse_uint(a, v, UINT64_MAX);
        } else if (!strcmp(a, "--poll")) {
            o->poll = true;
        } else if (!strcmp(a, "--spin-us")) {
            NEEDV();
            o->spin_us = parse_seconds(a, v);
        } else if (!strcmp(a, "--direct")) {
            o->direct = true;
        } else if (!strcmp(a, "--json")) {
            o->json = true;
        } else if (!strcmp(a, "--no-event-idx")) {
            o->event_idx = false;
        } else if (!strcmp(a, "--packed")) {
            o->packed = true;
        } else if (!strcmp(a, "--dirty-log")) {
            o->dirty_log = true;
        } else if (!strcmp(a, "--inflight")) {
            o->vuf.inflight = true;
        } else if (!strcmp(a, "--add-mem-reg")) {
            o->vuf.add_mem_reg = true;
        } else if (!strcmp(a, "--two-regions")) {
            o->vuf.two_regions = true;
        } else if (!strcmp(a, "--features-early")) {
            o->vuf.features_early = true;
        } else if (!strcmp(a, "--no-reply-ack")) {
            o->vuf.no_reply_ack = true;
        } else if (!strcmp(a, "-v") || !strcmp(a, "--verbose")) {
            o->verbose = true;
        } else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            exit(0);
        } else {
            die_usage("unknown option %s", a);
        }
#undef NEEDV
    }
    if (!o->nsockets)
        die_usage("%s", "--socket is required");
    if (!o->queues || !o->depth)
        die_usage("%s", "--queues and --depth must be at least 1");
    if (!o->queue_size || (o->queue_size & (o->queue_size - 1)))
        die_usage("%s", "--queue-size must be a power of two");
    if (o->depth > o->queue_size)
        die_usage("%s", "--depth cannot exceed --queue-size (one head per request)");
    if (o->seconds <= 0)
        die_usage("%s", "--seconds must be more than 0");
    if (o->poll && o->spin_us > 0)
        die_usage("%s", "--poll and --spin-us are different clients: pick one");
    o->vuf.num_queues = o->queues;
}

static uint64_t round_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

/* Guest memory for the rings and slots CGuestDriver lays out in its first
 * half, then the data buffers gd_bench_run allocates (anywhere). */
static uint64_t memory_size(const struct lg_opts *o)
{
    uint64_t n = o->queue_size;
    uint64_t ring = 16 * n + 4096 + (6 + 2 * n + 64) + (6 + 8 * n + 64) + 64 * n + 64 + 16 * n * n + 64;
    uint64_t rings = 4096 + o->queues * ring;
    uint64_t data = (uint64_t)o->queues * o->depth * round_up(o->block_size, 4096);
    return round_up(2 * (rings + data) + (1u << 20), 2u << 20);
}

static double pct_us(const uint64_t *hist, double p) { return (double)gd_hist_percentile(hist, p) / 1000.0; }

static double wall_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           (double)ru.ru_stime.tv_usec / 1e6;
}

static const char *rw_name(const struct lg_opts *o)
{
    return o->type == GD_BLK_T_IN ? (o->random ? "randread" : "read") : (o->random ? "randwrite" : "write");
}

/* One disk of the run: its guest driver and its connection. */
struct lg_disk {
    const char *socket;
    struct gd_driver *d;
    struct vuf_conn *c;
    struct vuf_info info;
};

/* Creates the disk's driver and does QEMU's handshake on its socket. */
static int lg_connect(const struct lg_opts *o, struct lg_disk *k)
{
    struct gd_config gc = { .mem_size = memory_size(o), .num_queues = o->queues, .queue_size = o->queue_size,
                            .event_idx = o->event_idx, .packed = o->packed };
    int rc = gd_create(&gc, &k->d);
    if (rc < 0) {
        fprintf(stderr, "dp-loadgen: guest driver (%" PRIu64 " bytes of memory): %s\n", gc.mem_size, strerror(-rc));
        return rc;
    }
    rc = vuf_connect(k->socket, &k->c);
    if (rc < 0) {
        fprintf(stderr, "dp-loadgen: connecting to %s: %s\n", k->socket, strerror(-rc));
        return rc;
    }
    rc = vuf_setup(k->c, k->d, &o->vuf, &k->info);
    if (rc < 0) {
        fprintf(stderr, "dp-loadgen: handshake with %s: %s\n", k->socket, vuf_last_error(k->c));
        return rc;
    }
    const struct vuf_info *info = &k->info;
    if (o->dirty_log) {
        /* One bit per 4 KiB page of the guest's memory, in whole u64s. */
        uint64_t pages = (gd_mem_size(k->d) + 4095) / 4096;
        rc = vuf_start_dirty_log(k->c, info->features, (pages + 63) / 64 * 8);
        if (rc < 0) {
            fprintf(stderr, "dp-loadgen: dirty log on %s: %s\n", k->socket, vuf_last_error(k->c));
            return rc;
        }
    }
    if (o->verbose)
        fprintf(stderr,
                "dp-loadgen: %s: features 0x%" PRIx64 " of 0x%" PRIx64 ", protocol 0x%" PRIx64 " of 0x%" PRIx64
                ", queues %" PRIu64 ", mem slots %" PRIu64 ", inflight %" PRIu64 " bytes\n"
                "dp-loadgen: config: capacity %" PRIu64 " sectors, blk_size %u, seg_max %u, num_queues %u, "
                "writeback %u\n",
                k->socket, info->features, info->features_offered, info->protocol, info->protocol_offered,
                info->queue_num, info->max_mem_slots, info->inflight_size, info->config.capacity,
                info->config.blk_size, info->config.seg_max, info->config.num_queues, info->config.writeback);
    if (!info->has_config) {
        fprintf(stderr, "dp-loadgen: %s did not negotiate CONFIG: no capacity to stay within\n", k->socket);
        return -ENOTSUP;
    }
    if (o->type == GD_BLK_T_OUT && (info->features & (1ull << VUF_F_BLK_RO))) {
        fprintf(stderr, "dp-loadgen: %s is read-only (VIRTIO_BLK_F_RO)\n", k->socket);
        return -EROFS;
    }
    return 0;
}

/* Stops every ring of the disk: each must have popped exactly what we
 * published. Returns 0, or 1 when a ring did not stop cleanly. */
static int lg_stop(const struct lg_opts *o, struct lg_disk *k)
{
    int bad = 0;
    for (uint32_t q = 0; q < o->queues; q++) {
        uint32_t last;
        int rc = vuf_stop_queue(k->c, q, &last);
        if (rc < 0) {
            fprintf(stderr, "dp-loadgen: %s: stopping queue %u: %s\n", k->socket, q, vuf_last_error(k->c));
            bad = 1;
        } else if (last != gd_vring_base(k->d, q)) {
            fprintf(stderr, "dp-loadgen: %s: queue %u stopped at base 0x%x, the driver's used position is 0x%x\n",
                    k->socket, q, last, gd_vring_base(k->d, q));
            bad = 1;
        }
    }
    return bad;
}

static void json_string(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            printf("\\%c", *s);
        else if ((unsigned char)*s < 0x20)
            printf("\\u%04x", (unsigned char)*s);
        else
            putchar(*s);
    }
    putchar('"');
}

int main(int argc, char **argv)
{
    static struct lg_opts o; /* the socket list is 2 KiB */
    parse(argc, argv, &o);

    struct lg_disk *disks = calloc(o.nsockets, sizeof(*disks));
    struct gd_bench_target *targets = calloc(o.nsockets, sizeof(*targets));
    if (!disks || !targets) {
        fprintf(stderr, "dp-loadgen: out of memory\n");
        return 1;
    }
    /* What gd_bench_run_many will do: indirect tables as Linux uses them (when
     * every disk offers them), and always when direct chains would not fit
     * the ring. The disks share one offset range: the smallest capacity. */
    bool needs_indirect = 3ull * o.depth > o.queue_size;
    bool all_indirect = true;
    uint64_t capacity = UINT64_MAX;
    for (uint32_t i = 0; i < o.nsockets; i++) {
        struct lg_disk *k = &disks[i];
        k->socket = o.sockets[i];
        if (lg_connect(&o, k) < 0)
            return 1;
        bool has_indirect = (k->info.features & (1ull << VUF_F_RING_INDIRECT_DESC)) != 0;
        if (needs_indirect && !has_indirect) {
            fprintf(stderr, "dp-loadgen: depth %u needs indirect descriptors (3 x depth > queue size %u) and %s "
                            "does not offer them; raise --queue-size\n", o.depth, o.queue_size, k->socket);
            return 1;
        }
        all_indirect = all_indirect && has_indirect;
        if (k->info.config.capacity < capacity)
            capacity = k->info.config.capacity;
        targets[i] = (struct gd_bench_target){ .d = k->d, .first_queue = 0, .num_queues = o.queues };
    }
    bool indirect = needs_indirect || (!o.direct && all_indirect);
    if (o.size_limit && o.size_limit / 512 < capacity)
        capacity = o.size_limit / 512;

    struct gd_bench_params p = {
        .depth = o.depth, .type = o.type, .block_size = o.block_size,
        .random = o.random, .capacity_sectors = capacity, .seed = o.seed,
        .duration_ns = (uint64_t)((o.warmup + o.seconds) * 1e9), .warmup_ns = (uint64_t)(o.warmup * 1e9),
        .busy_poll = o.poll, .spin_ns = (uint64_t)(o.spin_us * 1000), .indirect = indirect, .cpu = o.cpu,
    };
    static struct gd_bench_result r; /* 8 KiB of histogram: not on the stack */
    double cpu0 = cpu_seconds(), wall0 = wall_seconds();
    int rc = gd_bench_run_many(targets, o.nsockets, &p, &r);
    double wall = wall_seconds() - wall0, cpu = cpu_seconds() - cpu0;
    if (rc < 0) {
        fprintf(stderr, "dp-loadgen: benchmark: %s%s\n", strerror(-rc),
                rc == -ETIMEDOUT ? " (the back-end completed nothing for 10 s)" : "");
        for (uint32_t i = 0; i < o.nsockets; i++)
            if (vuf_is_closed(disks[i].c, 0) == 1)
                fprintf(stderr, "dp-loadgen: %s has closed the connection\n", disks[i].socket);
        return 1;
    }

    int bad_stop = 0;
    for (uint32_t i = 0; i < o.nsockets; i++) {
        bad_stop |= lg_stop(&o, &disks[i]);
        vuf_close(disks[i].c);
        gd_destroy(disks[i].d);
    }
    const struct vuf_info info = disks[0].info; /* features: the first disk's */
    free(disks);
    free(targets);

    uint32_t nq = o.nsockets * o.queues, shown = nq < 16 ? nq : 16;
    double secs = (double)r.elapsed_ns / 1e9;
    double iops = secs > 0 ? (double)r.ops / secs : 0;
    double mbps = secs > 0 ? (double)r.bytes / secs / 1e6 : 0;
    /* The load thread's CPU over the whole run (warm-up included), as a share
     * of the wall clock, and that share of the measured time per request. */
    double cpu_util = wall > 0 ? cpu / wall : 0;
    double cpu_per_op_us = r.ops ? cpu_util * secs / (double)r.ops * 1e6 : 0;
    /* Over the whole run, warm-up and drain included (what the device did). */
    double per_signal = r.signals ? (double)r.reaped / (double)r.signals : 0;
    double signals_per_op = r.reaped ? (double)r.signals / (double)r.reaped : 0;
    double per_wakeup = r.wakeups ? (double)r.reaped / (double)r.wakeups : 0;
    char client[48];
    if (o.poll)
        snprintf(client, sizeof(client), "poll");
    else if (o.spin_us > 0)
        snprintf(client, sizeof(client), "spin %.0fus", o.spin_us);
    else
        snprintf(client, sizeof(client), "guest");
    if (o.json) {
        printf("{\"socket\":");
        json_string(o.sockets[0]);
        printf(",\"disks\":%u,\"rw\":\"%s\",\"bs\":%u,\"queues\":%u,\"depth\":%u,\"queue_size\":%u,"
               "\"client\":\"%s\",\"poll\":%s,\"packed\":%s,\"event_idx\":%s,\"indirect\":%s,\"seconds\":%.3f,\"ops\":%" PRIu64
               ",\"errors\":%" PRIu64 ",\"iops\":%.0f,\"mbps\":%.1f,"
               "\"lat_us\":{\"p50\":%.2f,\"p99\":%.2f,\"p99.9\":%.2f},\"per_queue_iops\":[",
               o.nsockets, rw_name(&o), o.block_size, o.queues, o.depth, o.queue_size, client,
               o.poll ? "true" : "false", o.packed ? "true" : "false", o.event_idx ? "true" : "false", indirect ? "true" : "false", secs, r.ops,
               r.errors, iops, mbps, pct_us(r.hist, 50), pct_us(r.hist, 99), pct_us(r.hist, 99.9));
        for (uint32_t q = 0; q < shown; q++)
            printf("%s%.0f", q ? "," : "", secs > 0 ? (double)r.per_queue_ops[q] / secs : 0);
        printf("],\"kicks\":%" PRIu64 ",\"waits\":%" PRIu64 ",\"wakeups\":%" PRIu64 ",\"signals\":%" PRIu64
               ",\"completions_per_signal\":%.2f,\"signals_per_op\":%.4f,\"completions_per_wakeup\":%.2f,"
               "\"client_cpu\":%.3f,\"client_cpu_us_per_op\":%.3f,"
               "\"capacity_sectors\":%" PRIu64 ",\"features\":\"0x%" PRIx64 "\",\"protocol_features\":\"0x%" PRIx64
               "\",\"clean_stop\":%s}\n",
               r.kicks, r.waits, r.wakeups, r.signals, per_signal, signals_per_op, per_wakeup, cpu_util,
               cpu_per_op_us, capacity, info.features, info.protocol, bad_stop ? "false" : "true");
    } else {
        if (o.nsockets == 1)
            printf("%s: ", o.sockets[0]);
        else
            printf("%u disks (%s ... %s): ", o.nsockets, o.sockets[0], o.sockets[o.nsockets - 1]);
        printf("%s %u bytes, %u queue(s) x depth %u, queue size %u, %s client%s%s%s\n", rw_name(&o), o.block_size,
               o.queues, o.depth, o.queue_size, client, o.packed ? ", packed" : "", o.event_idx ? ", event_idx" : "",
               indirect ? ", indirect" : "");
        printf("  %.0f IOPS  %.1f MB/s  latency p50 %.1f us  p99 %.1f us  p99.9 %.1f us\n", iops, mbps,
               pct_us(r.hist, 50), pct_us(r.hist, 99), pct_us(r.hist, 99.9));
        printf("  per queue IOPS%s:", shown < nq ? " (the first 16)" : "");
        for (uint32_t q = 0; q < shown; q++)
            printf(" q%u %.0f", q, secs > 0 ? (double)r.per_queue_ops[q] / secs : 0);
        printf("\n  %" PRIu64 " ops in %.2f s, %" PRIu64 " errors, %" PRIu64 " kicks, %" PRIu64
               " waits, client CPU %.0f%% (%.2f us/op)\n",
               r.ops, secs, r.errors, r.kicks, r.waits, cpu_util * 100, cpu_per_op_us);
        if (!o.poll)
            printf("  %" PRIu64 " signals from the back-end: %.1f completions per signal, %.3f signals per I/O, "
                   "%.1f completions per wake-up\n",
                   r.signals, per_signal, signals_per_op, per_wakeup);
    }
    return r.errors || bad_stop ? 1 : 0;
}
