/*
 * dp-soak: a data-integrity soak for a vhost-user-blk back-end (dpctl), with
 * back-end restarts while requests are in flight.
 *
 * It starts `dpctl start` on a fresh raw image, connects as QEMU would
 * (CVhostFrontend over CGuestDriver's rings, INFLIGHT_SHMFD on) and keeps
 * DEPTH requests in flight on every queue: random 4 KiB and 64 KiB reads and
 * writes (and a few flushes), never two in flight on the same 4 KiB block.
 * Every written block is self-describing (magic, block number, generation,
 * run seed, data derived from them, a 64-bit hash of the rest), and the
 * harness remembers the generation of the last completed write per block, so
 * a read has exactly one right answer: that write, or zeroes.
 *
 * At random moments (exponential, mean --kill-interval) dpctl is SIGKILLed
 * (or, --term-share of the time, SIGTERMed: a clean drain), a new one is
 * started on the same socket and image, and the same guest reconnects,
 * handing back the inflight region (vuf_inflight_dup, reuse_inflight) as QEMU
 * does. Requests in flight across a restart must then complete exactly once.
 * After the load it drains, reads every block back through the data plane,
 * stops the rings (each must stop where its used index is), stops dpctl and
 * checks the image file on the host.
 *
 * Failures counted: corruption (a read or the image differs from the last
 * completed write), lost (a request that never completed: no completion for
 * --stall seconds), duplicates (a completion for a head not in flight),
 * bad status, bad used length, back-end failures (a reconnect refused, dpctl
 * dying on its own, a ring that stops in the wrong place). Exit 0 only when
 * all are zero; 1 on any; 2 on a usage error.
 */
#ifndef _GNU_SOURCE
#error "dp-soak needs _GNU_SOURCE; set it in the target's cSettings"
#endif

#include <CVhostFrontend.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

#define SK_BLOCK 4096u                 /* the unit of ownership and of verification */
#define SK_WORDS (SK_BLOCK / 8)
#define SK_BIG 16u                     /* blocks in a big (64 KiB) request */
#define SK_BUF (SK_BIG * SK_BLOCK)     /* the largest request */
#define SK_MAX_QUEUES 16
#define SK_MAX_DEPTH 256
#define SK_MAX_SEGS 4
#define SK_POISON 0x5a                 /* read buffers are filled with it before submission */
#define SK_SHOW 20                     /* failures reported in detail; the rest are counted */
static const char sk_magic[8] = { 'D', 'P', 'S', 'O', 'A', 'K', '0', '1' };

/* ---------------------------------------------------------------- options */

struct sk_opts {
    double seconds, kill_mean, term_share, big_share, write_share, flush_share, stall;
    uint64_t size, seed;
    const char *dir, *dpctl;
    uint32_t queues, depth, queue_size;
    int32_t poll_us;    /* -1: dpctl's default */
    bool keep, verbose, event_idx, inject, packed;
};

static void usage(FILE *f)
{
    fprintf(f,
            "usage: dp-soak [--minutes M | --seconds S] [options]\n"
            "\n"
            "Drives dpctl over vhost-user with verified random reads and writes while\n"
            "killing and restarting it, then checks every block through the data plane\n"
            "and in the image file. Exit 0: no corruption, loss or duplicate.\n"
            "\n"
            "  --minutes M          load time in minutes (default 1)\n"
            "  --seconds S          load time in seconds\n"
            "  --size SIZE          image size, e.g. 64m, 1g (a multiple of 64k; default 64m)\n"
            "  --dir DIR            where the image, socket and dpctl log go (default /dev/shm)\n"
            "  --dpctl PATH         the dpctl to run (default: dpctl next to this program)\n"
            "  --queues N           queues (1..%d, default 2)\n"
            "  --depth N            requests in flight per queue (default 16)\n"
            "  --queue-size N       ring size, power of two (default 128)\n"
            "  --kill-interval S    mean time between restarts, exponential (default 5; 0 = none)\n"
            "  --term-share P       share of restarts by SIGTERM (clean drain) instead of SIGKILL (default 0.25)\n"
            "  --write-share P      share of writes among reads and writes (default 0.5)\n"
            "  --big-share P        share of 64 KiB requests (default 0.15)\n"
            "  --flush-share P      share of flushes (default 0.01)\n"
            "  --stall S            a request not completed after S seconds without progress is lost (default 10)\n"
            "  --poll-us N          passed to dpctl start (default: dpctl's)\n"
            "  --no-event-idx       don't use VIRTIO_RING_F_EVENT_IDX\n"
            "  --packed             packed virtqueues (VIRTIO_F_RING_PACKED; its inflight layout on restarts)\n"
            "  --seed N             random seed (default: from the clock; printed)\n"
            "  --keep               keep the image and logs even when the run passes\n"
            "  --inject-corruption  self-test: overwrite one block of the image behind dpctl's back\n"
            "                       half-way through; the run must then fail with corruptions\n"
            "  -v, --verbose        one line per restart\n",
            SK_MAX_QUEUES);
}

static _Noreturn void die_usage(const char *fmt, const char *arg)
{
    fprintf(stderr, "dp-soak: ");
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

static double parse_double(const char *opt, const char *s, double max)
{
    double v;
    if (vuf_parse_double(s, max, &v))
        die_usage("bad value for %s", opt);
    return v;
}

static void parse(int argc, char **argv, struct sk_opts *o)
{
    *o = (struct sk_opts){ .seconds = 60, .kill_mean = 5, .term_share = 0.25, .big_share = 0.15,
                           .write_share = 0.5, .flush_share = 0.01, .stall = 10, .size = 64u << 20,
                           .dir = "/dev/shm", .queues = 2, .depth = 16, .queue_size = 128, .poll_us = -1,
                           .event_idx = true };
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEEDV()                                                                                              \
    do {                                                                                                     \
        if (!v)                                                                                              \
            die_usage("%s needs a value", a);                                                                \
        i++;                                                                                                 \
    } while (0)
        if (!strcmp(a, "--minutes")) {
            NEEDV();
            o->seconds = 60 * parse_double(a, v, 7 * 24 * 60);
        } else if (!strcmp(a, "--seconds")) {
            NEEDV();
            o->seconds = parse_double(a, v, 7 * 24 * 3600);
        } else if (!strcmp(a, "--size")) {
            NEEDV();
            o->size = vuf_parse_size(v);
            if (!o->size || o->size % SK_BUF)
                die_usage("--size must be a multiple of 64k, not %s", v);
        } else if (!strcmp(a, "--dir")) {
            NEEDV();
            o->dir = v;
        } else if (!strcmp(a, "--dpctl")) {
            NEEDV();
            o->dpctl = v;
        } else if (!strcmp(a, "--queues")) {
            NEEDV();
            o->queues = (uint32_t)parse_uint(a, v, SK_MAX_QUEUES);
        } else if (!strcmp(a, "--depth")) {
            NEEDV();
            o->depth = (uint32_t)parse_uint(a, v, SK_MAX_DEPTH);
        } else if (!strcmp(a, "--queue-size")) {
            NEEDV();
            o->queue_size = (uint32_t)parse_uint(a, v, 32768);
        } else if (!strcmp(a, "--kill-interval")) {
            NEEDV();
            o->kill_mean = parse_double(a, v, 86400);
        } else if (!strcmp(a, "--term-share")) {
            NEEDV();
            o->term_share = parse_double(a, v, 1);
        } else if (!strcmp(a, "--write-share")) {
            NEEDV();
            o->write_share = parse_double(a, v, 1);
        } else if (!strcmp(a, "--big-share")) {
            NEEDV();
            o->big_share = parse_double(a, v, 1);
        } else if (!strcmp(a, "--flush-share")) {
            NEEDV();
            o->flush_share = parse_double(a, v, 1);
        } else if (!strcmp(a, "--stall")) {
            NEEDV();
            o->stall = parse_double(a, v, 3600);
        } else if (!strcmp(a, "--poll-us")) {
            NEEDV();
            o->poll_us = (int32_t)parse_uint(a, v, 1000000);
        } else if (!strcmp(a, "--seed")) {
            NEEDV();
            o->seed = parse_uint(a, v, UINT64_MAX);
        } else if (!strcmp(a, "--no-event-idx")) {
            o->event_idx = false;
        } else if (!strcmp(a, "--packed")) {
            o->packed = true;
        } else if (!strcmp(a, "--keep")) {
            o->keep = true;
        } else if (!strcmp(a, "--inject-corruption")) {
            o->inject = true;
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
    if (!o->queues || !o->depth)
        die_usage("%s", "--queues and --depth must be at least 1");
    if (o->queue_size < 4 || (o->queue_size & (o->queue_size - 1)))
        die_usage("%s", "--queue-size must be a power of two, at least 4");
    if (o->depth > o->queue_size)
        die_usage("%s", "--depth cannot exceed --queue-size (one head per request)");
    if (o->seconds <= 0)
        die_usage("%s", "the load time must be more than 0");
    if (o->stall < 1)
        die_usage("%s", "--stall must be at least 1 second");
    if (o->size / SK_BLOCK < (uint64_t)o->queues * o->depth * SK_BIG * 4)
        die_usage("%s", "--size is too small for queues x depth x 64 KiB requests (at least 4x that)");
}

/* ---------------------------------------------------------------- small helpers */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t mix64(uint64_t x) /* splitmix64's finaliser */
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static uint64_t rng_next(uint64_t *s) /* xorshift64* */
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545f4914f6cdd1dull;
}

static double rng_unit(uint64_t *s) { return (double)(rng_next(s) >> 11) / 9007199254740992.0; }

/* An exponential delay of the given mean: restarts at random moments (a
 * Poisson process). -ln(u) by hand, so as not to need libm: u = m * 2^e with
 * m in [1, 2), ln m = 2 atanh((m - 1) / (m + 1)). */
static uint64_t rng_exp_ns(uint64_t *s, double mean_s)
{
    double u = 1 - rng_unit(s); /* (0, 1] */
    int e = 0;
    while (u < 1) {
        u *= 2;
        e--;
    }
    double t = (u - 1) / (u + 1), t2 = t * t, sum = 0, term = t;
    for (int k = 1; k < 40; k += 2) {
        sum += term / k;
        term *= t2;
    }
    double ln_u = 2 * sum + e * 0.6931471805599453;
    return (uint64_t)(-ln_u * mean_s * 1e9);
}
static uint64_t rng_below(uint64_t *s, uint64_t n) { return rng_next(s) % n; }

/* ---------------------------------------------------------------- block contents */

/* A written block: words 0..3 magic, block number, generation, run seed;
 * 4..510 a stream derived from them; 511 a hash of words 0..510. */
static uint64_t block_hash(const uint64_t *w)
{
    uint64_t h = 0x6a09e667f3bcc908ull;
    for (uint32_t i = 0; i < SK_WORDS - 1; i++)
        h = (((h ^ w[i]) << 27) | ((h ^ w[i]) >> 37)) * 0x9e3779b97f4a7c15ull + i;
    return mix64(h);
}

static void block_fill(uint8_t *p, uint64_t block, uint64_t gen, uint64_t seed)
{
    uint64_t w[SK_WORDS];
    memcpy(&w[0], sk_magic, 8);
    w[1] = block;
    w[2] = gen;
    w[3] = seed;
    uint64_t x = mix64(block ^ mix64(gen ^ mix64(seed))) | 1;
    for (uint32_t i = 4; i < SK_WORDS - 1; i++)
        w[i] = rng_next(&x);
    w[SK_WORDS - 1] = block_hash(w);
    memcpy(p, w, SK_BLOCK);
}

static bool all_bytes(const uint8_t *p, size_t n, uint8_t v)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] != v)
            return false;
    return true;
}

/* What a block holds, in words, for a corruption report (want: the
 * generation expected, 0 for zeroes). */
static void block_describe(const uint8_t *got, uint64_t block, uint64_t want, uint64_t seed, char *out, size_t n)
{
    uint64_t w[SK_WORDS];
    memcpy(w, got, SK_BLOCK);
    if (all_bytes(got, SK_BLOCK, 0)) {
        snprintf(out, n, "zeroes");
    } else if (all_bytes(got, SK_BLOCK, SK_POISON)) {
        snprintf(out, n, "the read buffer untouched (poison)");
    } else if (!memcmp(&w[0], sk_magic, 8)) {
        bool sum = block_hash(w) == w[SK_WORDS - 1];
        const char *why = w[1] != block    ? " (misdirected: another block's data)"
                          : w[3] != seed   ? ""
                          : !sum           ? " (torn or damaged)"
                          : w[2] < want    ? " (stale: an older write)"
                          : w[2] > want    ? " (a write that had not completed)"
                                           : " (damaged)";
        snprintf(out, n, "block %" PRIu64 " generation %" PRIu64 "%s, checksum %s%s", w[1], w[2],
                 w[3] == seed ? "" : " of another run", sum ? "good" : "BAD", why);
    } else {
        size_t zero = 0;
        for (size_t i = 0; i < SK_BLOCK; i++)
            zero += got[i] == 0;
        snprintf(out, n, "no block header (%zu of 4096 bytes zero, first bytes %02x %02x %02x %02x)", zero, got[0],
                 got[1], got[2], got[3]);
    }
}

/* ---------------------------------------------------------------- the harness */

enum sk_phase { SK_LOAD, SK_READBACK };

struct sk_req {
    bool busy;
    uint8_t type;
    uint16_t head;
    uint64_t block;   /* first block */
    uint32_t nblocks; /* 0 for a flush */
    uint64_t gen;     /* a write's generation (every block of it) */
    uint32_t epoch;   /* the dpctl it was submitted to */
    bool outstanding; /* left in flight by a dpctl that was stopped */
    uint64_t t_submit;
    uint64_t gpa;
    uint8_t *buf;
};

struct sk_queue {
    struct sk_req req[SK_MAX_DEPTH];
    int16_t *by_head; /* head -> req index, -1 */
    uint32_t in_flight;
    uint16_t popped;  /* used elements taken, as the driver's last_used */
    int call_fd;
};

struct sk_counts {
    uint64_t submitted, completed, reads, writes, flushes;
    uint64_t blocks_read, blocks_written, bytes_read, bytes_written;
    uint64_t carried;          /* completed on a later dpctl than the one they were submitted to */
    uint64_t inflight_at_restart;
    uint64_t popped_at_restart; /* of those, popped by the stopped back-end (to be resubmitted) */
    uint64_t corruptions, lost, duplicates, bad_status, bad_len, backend_failures;
    uint64_t kills, terms;
    uint64_t readback_blocks, host_blocks, host_written, unknown_blocks;
    uint64_t timeouts_pending; /* waits that timed out with completions waiting: late or missed calls */
};

struct sk {
    struct sk_opts o;
    char work[PATH_MAX], image[PATH_MAX], sock[PATH_MAX], log_path[PATH_MAX], dpctl[PATH_MAX];
    int log_fd;
    pid_t pid;
    uint32_t epoch;
    struct gd_driver *d;
    struct vuf_conn *conn;
    struct vuf_info info;
    uint64_t rng, seed, nblocks, next_gen;
    uint64_t *gen;     /* last completed write per block; 0: never written */
    uint8_t *busy;     /* in a request in flight */
    uint8_t *unknown;  /* a write to it failed or was lost: contents not checked */
    uint64_t injected; /* --inject-corruption's block, never written again (UINT64_MAX: none) */
    struct sk_queue q[SK_MAX_QUEUES];
    uint64_t readback_next; /* next block to read back */
    enum sk_phase phase;
    uint64_t last_progress;
    bool failed_hard;  /* the run cannot go on (back-end gone, ring broken) */
    bool two_regions, add_mem_reg; /* how the current connection described memory */
    struct sk_counts n;
    uint64_t shown;
};

static volatile sig_atomic_t sk_interrupted;
static void on_sigint(int sig)
{
    (void)sig;
    sk_interrupted = 1;
}

static double secs_since(uint64_t t0) { return (double)(now_ns() - t0) / 1e9; }
static uint64_t sk_t0;

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "dp-soak: [%7.2f s] ", secs_since(sk_t0));
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
}

/* A failure worth a line: the first SK_SHOW are printed, all are counted by the caller. */
static void report(struct sk *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void report(struct sk *s, const char *fmt, ...)
{
    if (s->shown++ >= SK_SHOW) {
        if (s->shown == SK_SHOW + 1)
            say("FAIL: (further failures are counted, not shown)");
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "dp-soak: [%7.2f s] FAIL: ", secs_since(sk_t0));
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
}

/* ---------------------------------------------------------------- dpctl */

static int dpctl_start(struct sk *s)
{
    char nq[16], poll_us[16];
    snprintf(nq, sizeof(nq), "%u", s->o.queues);
    snprintf(poll_us, sizeof(poll_us), "%d", s->o.poll_us);
    char *argv[16];
    int argc = 0;
    argv[argc++] = s->dpctl;
    argv[argc++] = "start";
    argv[argc++] = "--disk";
    argv[argc++] = s->image;
    argv[argc++] = "--socket";
    argv[argc++] = s->sock;
    argv[argc++] = "--num-queues";
    argv[argc++] = nq;
    if (s->o.poll_us >= 0) {
        argv[argc++] = "--poll-us";
        argv[argc++] = poll_us;
    }
    argv[argc] = NULL;

    dprintf(s->log_fd, "==== dp-soak: dpctl #%u at %.3f s\n", s->epoch, secs_since(sk_t0));
    posix_spawn_file_actions_t fa;
    posix_spawnattr_t at;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, s->log_fd, STDOUT_FILENO);
    posix_spawn_file_actions_adddup2(&fa, s->log_fd, STDERR_FILENO);
    posix_spawnattr_init(&at);
    /* Its own process group: a ^C to the soak is ours to handle, not dpctl's. */
    posix_spawnattr_setflags(&at, POSIX_SPAWN_SETPGROUP);
    posix_spawnattr_setpgroup(&at, 0);
    int rc = posix_spawn(&s->pid, s->dpctl, &fa, &at, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&at);
    if (rc != 0) {
        s->pid = -1;
        say("starting %s: %s", s->dpctl, strerror(rc));
        return -rc;
    }
    return 0;
}

static void describe_status(int st, char *out, size_t n)
{
    if (WIFEXITED(st))
        snprintf(out, n, "exit status %d", WEXITSTATUS(st));
    else if (WIFSIGNALED(st))
        snprintf(out, n, "signal %d (%s)%s", WTERMSIG(st), strsignal(WTERMSIG(st)),
                 WCOREDUMP(st) ? ", core dumped" : "");
    else
        snprintf(out, n, "wait status 0x%x", st);
}

/* Waits up to timeout_ms for dpctl to exit: 1 and *status when it did, 0 if not. */
static int dpctl_wait(struct sk *s, int timeout_ms, int *status)
{
    uint64_t deadline = now_ns() + (uint64_t)timeout_ms * 1000000ull;
    for (;;) {
        pid_t r = waitpid(s->pid, status, WNOHANG);
        if (r == s->pid) {
            s->pid = -1;
            return 1;
        }
        if (r < 0 && errno != EINTR) {
            s->pid = -1;
            *status = 0;
            return 1;
        }
        if (now_ns() >= deadline)
            return 0;
        usleep(2000);
    }
}

/* SIGKILL and reap, for the way out. */
static void dpctl_reap(struct sk *s)
{
    if (s->pid <= 0)
        return;
    int st;
    kill(s->pid, SIGKILL);
    waitpid(s->pid, &st, 0);
    s->pid = -1;
}

static void log_tail(struct sk *s)
{
    FILE *f = fopen(s->log_path, "r");
    if (!f)
        return;
    char *lines[12] = { 0 };
    char buf[1024];
    unsigned k = 0;
    while (fgets(buf, sizeof(buf), f)) {
        free(lines[k % 12]);
        lines[k % 12] = strdup(buf);
        k++;
    }
    fclose(f);
    fprintf(stderr, "dp-soak: last lines of %s:\n", s->log_path);
    for (unsigned i = k > 12 ? k - 12 : 0; i < k; i++) {
        fprintf(stderr, "    %s", lines[i % 12]);
        free(lines[i % 12]);
    }
}

/* ---------------------------------------------------------------- connection */

/* Connects to the dpctl just started (retrying while it comes up) and does
 * the handshake; reuse_fd >= 0 hands back that inflight region. */
static int sk_connect(struct sk *s, int reuse_fd, uint64_t reuse_size)
{
    uint64_t deadline = now_ns() + 15000000000ull;
    struct vuf_conn *c = NULL;
    int rc;
    for (;;) {
        rc = vuf_connect(s->sock, &c);
        if (rc == 0)
            break;
        int st;
        if (s->pid > 0 && waitpid(s->pid, &st, WNOHANG) == s->pid) {
            char why[96];
            describe_status(st, why, sizeof(why));
            s->pid = -1;
            say("dpctl #%u exited while we waited to connect (%s)", s->epoch, why);
            return -ECHILD;
        }
        if (now_ns() >= deadline) {
            say("connecting to %s: %s (for 15 s)", s->sock, strerror(-rc));
            return rc;
        }
        usleep(5000);
    }
    /* Vary what QEMU may vary: one region or two, SET_MEM_TABLE or ADD_MEM_REG. */
    s->two_regions = rng_next(&s->rng) & 1;
    s->add_mem_reg = rng_next(&s->rng) & 1;
    struct vuf_options vo = {
        .num_queues = s->o.queues,
        .inflight = true,
        .two_regions = s->two_regions,
        .add_mem_reg = s->add_mem_reg,
        .reuse_inflight = reuse_fd >= 0,
        .inflight_fd = reuse_fd,
        .inflight_size = reuse_size,
    };
    struct vuf_info info;
    rc = vuf_setup(c, s->d, &vo, &info);
    if (rc < 0) {
        say("handshake with dpctl #%u: %s", s->epoch, vuf_last_error(c));
        vuf_close(c);
        return rc;
    }
    if (!(info.protocol & (1ull << VUF_PF_INFLIGHT_SHMFD)) || (reuse_fd < 0 && info.inflight_size == 0)) {
        say("dpctl #%u did not negotiate INFLIGHT_SHMFD (protocol features 0x%" PRIx64 "): nothing to restart with",
            s->epoch, info.protocol);
        vuf_close(c);
        return -ENOTSUP;
    }
    if (!info.has_config || info.config.capacity != s->o.size / 512) {
        say("dpctl #%u: capacity %" PRIu64 " sectors, the image has %" PRIu64, s->epoch, info.config.capacity,
            s->o.size / 512);
        vuf_close(c);
        return -EPROTO;
    }
    if (info.features & (1ull << VUF_F_BLK_RO)) {
        say("dpctl #%u serves the disk read-only", s->epoch);
        vuf_close(c);
        return -EROFS;
    }
    s->conn = c;
    s->info = info;
    return 0;
}

/* ---------------------------------------------------------------- requests */

static bool blocks_free(const struct sk *s, uint64_t b, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        if (s->busy[b + i])
            return false;
    return true;
}

/* Picks the next request into r (whose buffer is set): 1 if there is one,
 * 0 if not now (every pick hit a block in flight, or the read-back is done). */
static int choose(struct sk *s, enum sk_phase phase, struct sk_req *r)
{
    if (phase == SK_READBACK) {
        if (s->readback_next >= s->nblocks)
            return 0;
        r->type = GD_BLK_T_IN;
        r->block = s->readback_next;
        r->nblocks = (uint32_t)(s->nblocks - r->block < SK_BIG ? s->nblocks - r->block : SK_BIG);
        s->readback_next += r->nblocks;
        return 1;
    }
    double u = rng_unit(&s->rng);
    if (u < s->o.flush_share) {
        r->type = GD_BLK_T_FLUSH;
        r->block = 0;
        r->nblocks = 0;
        return 1;
    }
    r->type = rng_unit(&s->rng) < s->o.write_share ? GD_BLK_T_OUT : GD_BLK_T_IN;
    r->nblocks = rng_unit(&s->rng) < s->o.big_share ? SK_BIG : 1;
    for (int tries = 0; tries < 16; tries++) {
        r->block = rng_below(&s->rng, s->nblocks - r->nblocks + 1);
        /* A write over the injected block would hide it from the checks. */
        bool hides = r->type == GD_BLK_T_OUT && s->injected - r->block < r->nblocks;
        if (!hides && blocks_free(s, r->block, r->nblocks))
            return 1;
    }
    return 0;
}

/* Splits bytes into 1..SK_MAX_SEGS segments at random 512-byte boundaries. */
static uint32_t split(struct sk *s, uint64_t gpa, uint32_t bytes, struct gd_seg *segs)
{
    uint32_t sectors = bytes / 512;
    uint32_t want = 1 + (uint32_t)rng_below(&s->rng, SK_MAX_SEGS);
    if (want > sectors)
        want = sectors;
    uint32_t n = 0, done = 0;
    for (uint32_t i = 0; i < want; i++) {
        uint32_t left = sectors - done, rest = want - i - 1;
        uint32_t take = rest ? 1 + (uint32_t)rng_below(&s->rng, left - rest) : left;
        segs[n++] = (struct gd_seg){ gpa + (uint64_t)done * 512, take * 512 };
        done += take;
    }
    return n;
}

static int submit_one(struct sk *s, uint32_t qi, enum sk_phase phase)
{
    struct sk_queue *q = &s->q[qi];
    struct sk_req *r = NULL;
    for (uint32_t i = 0; i < s->o.depth; i++)
        if (!q->req[i].busy) {
            r = &q->req[i];
            break;
        }
    if (!r)
        return 0;
    if (!choose(s, phase, r))
        return 0;

    uint32_t bytes = r->nblocks * SK_BLOCK;
    if (r->type == GD_BLK_T_OUT) {
        r->gen = ++s->next_gen;
        for (uint32_t i = 0; i < r->nblocks; i++)
            block_fill(r->buf + (size_t)i * SK_BLOCK, r->block + i, r->gen, s->seed);
    } else if (r->type == GD_BLK_T_IN) {
        memset(r->buf, SK_POISON, bytes);
    }
    struct gd_seg segs[SK_MAX_SEGS];
    uint32_t nsegs = bytes ? split(s, r->gpa, bytes, segs) : 0;
    struct gd_req gr = { .type = r->type, .sector = r->block * (SK_BLOCK / 512), .segs = segs, .nsegs = nsegs,
                         .indirect = rng_next(&s->rng) & 1 };
    uint16_t head;
    int rc = gd_request_add(s->d, qi, &gr, &head);
    if (rc == -ENOSPC && !gr.indirect) {
        gr.indirect = true;
        rc = gd_request_add(s->d, qi, &gr, &head);
    }
    if (rc == -ENOSPC && q->in_flight > 0) {
        /* Direct chains took every descriptor: wait for completions. */
        if (phase == SK_READBACK)
            s->readback_next = r->block;
        return 0;
    }
    if (rc < 0) {
        say("queue %u: adding a request: %s (in flight %u)", qi, strerror(-rc), gd_in_flight(s->d, qi));
        s->failed_hard = true;
        return rc;
    }
    if (q->by_head[head] >= 0) {
        report(s, "queue %u: the driver handed out head %u, still ours in flight", qi, head);
        s->n.backend_failures++;
        s->failed_hard = true;
        return -EINVAL;
    }
    r->busy = true;
    r->outstanding = false;
    r->head = head;
    r->epoch = s->epoch;
    r->t_submit = now_ns();
    q->by_head[head] = (int16_t)(r - q->req);
    q->in_flight++;
    for (uint32_t i = 0; i < r->nblocks; i++)
        s->busy[r->block + i] = 1;
    s->n.submitted++;
    return 1;
}

/* Keeps the queue at depth, publishes and kicks (if the device wants it). */
static void top_up(struct sk *s, uint32_t qi, enum sk_phase phase)
{
    int added = 0;
    while (s->q[qi].in_flight < s->o.depth && !s->failed_hard) {
        int rc = submit_one(s, qi, phase);
        if (rc <= 0)
            break;
        added++;
    }
    if (added) {
        gd_avail_publish(s->d, qi);
        gd_kick_if_needed(s->d, qi);
    }
}

static void verify_block(struct sk *s, const char *where, uint64_t b, const uint8_t *got)
{
    if (s->unknown[b])
        return;
    uint8_t want[SK_BLOCK];
    if (s->gen[b])
        block_fill(want, b, s->gen[b], s->seed);
    else
        memset(want, 0, SK_BLOCK);
    if (!memcmp(want, got, SK_BLOCK))
        return;
    s->n.corruptions++;
    char desc[192];
    block_describe(got, b, s->gen[b], s->seed, desc, sizeof(desc));
    size_t off = 0;
    while (off < SK_BLOCK && want[off] == got[off])
        off++;
    if (s->gen[b])
        report(s, "%s: block %" PRIu64 ": expected generation %" PRIu64 ", got %s (first difference at byte %zu)",
               where, b, s->gen[b], desc, off);
    else
        report(s, "%s: block %" PRIu64 ": expected zeroes (never written), got %s (first difference at byte %zu)",
               where, b, desc, off);
}

static void complete_one(struct sk *s, uint32_t qi, struct sk_req *r, uint32_t len, uint8_t status)
{
    uint32_t bytes = r->nblocks * SK_BLOCK;
    uint32_t want_len = r->type == GD_BLK_T_IN && status == GD_BLK_S_OK ? bytes + 1 : 1;
    const char *what = r->type == GD_BLK_T_IN ? "read" : r->type == GD_BLK_T_OUT ? "write" : "flush";
    if (status != GD_BLK_S_OK) {
        s->n.bad_status++;
        report(s, "queue %u head %u: %s of blocks %" PRIu64 "+%u completed with status %u%s", qi, r->head, what,
               r->block, r->nblocks, status, status == 0xff ? " (the device never wrote it)" : "");
    } else if (len != want_len) {
        s->n.bad_len++;
        report(s, "queue %u head %u: %s of blocks %" PRIu64 "+%u: used length %u, want %u", qi, r->head, what,
               r->block, r->nblocks, len, want_len);
    }
    if (r->epoch != s->epoch)
        s->n.carried++;
    if (r->type == GD_BLK_T_OUT) {
        for (uint32_t i = 0; i < r->nblocks; i++) {
            if (status == GD_BLK_S_OK)
                s->gen[r->block + i] = r->gen;
            else
                s->unknown[r->block + i] = 1; /* old or new: can't say */
        }
        s->n.writes++;
        s->n.blocks_written += r->nblocks;
        s->n.bytes_written += bytes;
    } else if (r->type == GD_BLK_T_IN) {
        if (status == GD_BLK_S_OK) {
            char where[64];
            snprintf(where, sizeof(where), "read on queue %u", qi);
            for (uint32_t i = 0; i < r->nblocks; i++)
                verify_block(s, where, r->block + i, r->buf + (size_t)i * SK_BLOCK);
        }
        if (s->phase == SK_READBACK) {
            s->n.readback_blocks += r->nblocks;
        } else {
            s->n.reads++;
            s->n.blocks_read += r->nblocks;
            s->n.bytes_read += bytes;
        }
    } else {
        s->n.flushes++;
    }
    for (uint32_t i = 0; i < r->nblocks; i++)
        s->busy[r->block + i] = 0;
    r->busy = false;
    s->q[qi].by_head[r->head] = -1;
    s->q[qi].in_flight--;
    s->n.completed++;
}

/* Takes every completion the device has published on queue qi. */
static uint32_t reap(struct sk *s, uint32_t qi)
{
    uint32_t got = 0;
    for (;;) {
        uint16_t head = 0;
        uint32_t len = 0;
        uint8_t status = 0;
        int rc = gd_complete(s->d, qi, &head, &len, &status);
        if (rc == 0)
            break;
        got++;
        s->q[qi].popped++;
        if (rc == -EINVAL) {
            s->n.duplicates++;
            report(s, "queue %u: a completion for a head not in flight (completed twice?), the %u-th reaped", qi,
                   (unsigned)s->q[qi].popped);
            continue;
        }
        if (rc < 0) {
            say("queue %u: gd_complete: %s", qi, strerror(-rc));
            s->failed_hard = true;
            break;
        }
        int16_t k = s->q[qi].by_head[head];
        if (k < 0) { /* the driver thought it in flight and we did not: ours is wrong */
            s->n.duplicates++;
            report(s, "queue %u: completion for head %u, which the driver had in flight and we did not", qi, head);
            continue;
        }
        complete_one(s, qi, &s->q[qi].req[k], len, status);
    }
    if (got)
        s->last_progress = now_ns();
    return got;
}

static uint32_t in_flight(const struct sk *s)
{
    uint32_t n = 0;
    for (uint32_t qi = 0; qi < s->o.queues; qi++)
        n += s->q[qi].in_flight;
    return n;
}

/* Sleeps on the call eventfds until one fires or timeout_ms passes. Calls
 * are on only while we sleep, as a Linux guest turns them off while it
 * processes completions. */
static void wait_calls(struct sk *s, int timeout_ms)
{
    struct pollfd p[SK_MAX_QUEUES];
    bool pending = false;
    for (uint32_t qi = 0; qi < s->o.queues; qi++) {
        pending |= gd_enable_calls(s->d, qi) == 1; /* already there: don't sleep */
        p[qi] = (struct pollfd){ .fd = s->q[qi].call_fd, .events = POLLIN };
    }
    int n = pending ? 0 : poll(p, s->o.queues, timeout_ms);
    if (!pending && n == 0 && timeout_ms >= 100) {
        /* A completion published while we slept 100 ms or more should have
         * woken us. Counted, not failed: one can land just as poll gives up. */
        for (uint32_t qi = 0; qi < s->o.queues; qi++)
            if (gd_used_pending(s->d, qi)) {
                s->n.timeouts_pending++;
                break;
            }
    }
    for (uint32_t qi = 0; qi < s->o.queues; qi++) {
        gd_disable_calls(s->d, qi);
        uint64_t v;
        if (n > 0 && (p[qi].revents & POLLIN))
            (void)!read(s->q[qi].call_fd, &v, sizeof(v));
    }
}

/* Lost: no completion for --stall seconds with requests in flight. */
static bool stalled(struct sk *s)
{
    if (!in_flight(s) || now_ns() - s->last_progress < (uint64_t)(s->o.stall * 1e9))
        return false;
    for (uint32_t qi = 0; qi < s->o.queues; qi++) {
        for (uint32_t i = 0; i < s->o.depth; i++) {
            struct sk_req *r = &s->q[qi].req[i];
            if (!r->busy)
                continue;
            s->n.lost++;
            report(s, "queue %u head %u: %s of blocks %" PRIu64 "+%u, submitted to dpctl #%u %.1f s ago, never "
                      "completed (lost)", qi, r->head, r->type == GD_BLK_T_IN ? "read" : r->type == GD_BLK_T_OUT ?
                      "write" : "flush", r->block, r->nblocks, r->epoch, (double)(now_ns() - r->t_submit) / 1e9);
            for (uint32_t b = 0; b < r->nblocks; b++)
                if (r->type == GD_BLK_T_OUT)
                    s->unknown[r->block + b] = 1;
        }
    }
    say("no completion for %.0f s with %u requests in flight: giving up", s->o.stall, in_flight(s));
    s->failed_hard = true;
    return true;
}

/* dpctl died on its own? */
static bool dpctl_died(struct sk *s)
{
    int st;
    if (s->pid <= 0 || waitpid(s->pid, &st, WNOHANG) != s->pid)
        return false;
    char why[96];
    describe_status(st, why, sizeof(why));
    s->pid = -1;
    s->n.backend_failures++;
    report(s, "dpctl #%u exited on its own (%s)", s->epoch, why);
    s->failed_hard = true;
    return true;
}

/* ---------------------------------------------------------------- restarts */

/* Of our requests still in flight, how many the stopped back-end had popped:
 * marked in flight in the inflight region (vhost-user.rst "Inflight I/O
 * tracking"). Split rings: per queue a 16-byte header, then a 16-byte
 * DescStateSplit per head whose first byte is the inflight flag. Packed
 * rings: a 32-byte header, then 32-byte DescStatePacked entries; a buffer's
 * first entry has the inflight flag, its count (num) and its last entry
 * (last), whose copy of the ring descriptor holds the buffer id. These are
 * the ones the next back-end must resubmit. -1 if the region is not laid
 * out as expected. */
static int count_popped(struct sk *s, int fd, uint64_t size)
{
    uint64_t per_queue = size / s->o.queues;
    uint32_t entry = s->o.packed ? 32 : 16, header = s->o.packed ? 32 : 16;
    if (per_queue < header + (uint64_t)entry * s->o.queue_size)
        return -1;
    const uint8_t *m = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED)
        return -1;
    int n = 0;
    for (uint32_t qi = 0; qi < s->o.queues; qi++) {
        const uint8_t *r = m + qi * per_queue;
        uint16_t desc_num;
        memcpy(&desc_num, r + 10, 2);
        if (desc_num != s->o.queue_size)
            continue; /* never used by a back-end yet */
        for (uint32_t e = 0; e < s->o.queue_size; e++) {
            const uint8_t *d = r + header + (uint64_t)entry * e;
            if (d[0] != 1)
                continue;
            uint16_t head = (uint16_t)e;
            if (s->o.packed) {
                uint16_t num, last;
                memcpy(&last, d + 4, 2);
                memcpy(&num, d + 6, 2);
                if (num == 0 || last >= s->o.queue_size)
                    continue;
                memcpy(&head, r + header + (uint64_t)entry * last + 16, 2); /* the last copy's id */
                if (head >= s->o.queue_size)
                    continue;
            }
            if (s->q[qi].by_head[head] >= 0 && !s->q[qi].req[s->q[qi].by_head[head]].outstanding)
                n++;
        }
    }
    munmap((void *)m, size);
    return n;
}

static int restart(struct sk *s, bool term)
{
    uint64_t isize = 0;
    int ifd = vuf_inflight_dup(s->conn, &isize);
    if (ifd < 0) {
        say("vuf_inflight_dup: %s", strerror(-ifd));
        s->failed_hard = true;
        return ifd;
    }
    fcntl(ifd, F_SETFD, FD_CLOEXEC); /* not for dpctl to inherit */
    uint64_t t0 = now_ns();
    kill(s->pid, term ? SIGTERM : SIGKILL);
    int st = 0;
    if (!dpctl_wait(s, term ? 30000 : 10000, &st)) {
        s->n.backend_failures++;
        report(s, "dpctl #%u did not exit within %d s of %s", s->epoch, term ? 30 : 10, term ? "SIGTERM" : "SIGKILL");
        dpctl_reap(s);
    } else if (term ? !(WIFEXITED(st) && WEXITSTATUS(st) == 0) : !(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL)) {
        char why[96];
        describe_status(st, why, sizeof(why));
        s->n.backend_failures++;
        report(s, "dpctl #%u, sent %s, ended with %s", s->epoch, term ? "SIGTERM" : "SIGKILL", why);
    }
    double down = (double)(now_ns() - t0) / 1e9;
    /* What it published before it went is done; the rest is the next one's. */
    for (uint32_t qi = 0; qi < s->o.queues; qi++)
        reap(s, qi);
    uint32_t before = in_flight(s);
    int popped = count_popped(s, ifd, isize);
    if (popped > 0)
        s->n.popped_at_restart += (uint64_t)popped;
    for (uint32_t qi = 0; qi < s->o.queues; qi++)
        for (uint32_t i = 0; i < s->o.depth; i++)
            if (s->q[qi].req[i].busy && !s->q[qi].req[i].outstanding) {
                s->q[qi].req[i].outstanding = true;
                s->n.inflight_at_restart++;
            }
    vuf_close(s->conn);
    s->conn = NULL;
    if (term)
        s->n.terms++;
    else
        s->n.kills++;
    s->epoch++;
    int rc = dpctl_start(s);
    if (rc == 0)
        rc = sk_connect(s, ifd, isize);
    close(ifd);
    if (rc < 0) {
        s->n.backend_failures++;
        report(s, "reconnecting after %s: %s", term ? "SIGTERM" : "SIGKILL", strerror(-rc));
        s->failed_hard = true;
        return rc;
    }
    /* No kick: a guest whose requests are all published has nothing to kick
     * for; the new back-end must find them (resubmitted or still in the avail
     * ring) by itself, or the stall check reports them lost. */
    s->last_progress = now_ns();
    if (s->o.verbose)
        say("restart %" PRIu64 ": %s dpctl #%u left %u requests outstanding, %d of them popped (gone after "
            "%.0f ms); dpctl #%u connected %.0f ms after the signal (%s, %s region%s)",
            s->n.kills + s->n.terms, term ? "SIGTERM" : "SIGKILL", s->epoch - 1, before, popped, down * 1e3, s->epoch,
            (double)(now_ns() - t0) / 1e6, s->add_mem_reg ? "ADD_MEM_REG" : "SET_MEM_TABLE",
            s->two_regions ? "two" : "one", s->two_regions ? "s" : "");
    return 0;
}

/* ---------------------------------------------------------------- phases */

static void inject_corruption(struct sk *s)
{
    uint64_t b;
    do
        b = rng_below(&s->rng, s->nblocks);
    while (s->busy[b]);
    uint8_t junk[SK_BLOCK];
    memset(junk, 0xc3, sizeof(junk));
    int fd = open(s->image, O_WRONLY | O_CLOEXEC);
    if (fd < 0 || pwrite(fd, junk, sizeof(junk), (off_t)(b * SK_BLOCK)) != (ssize_t)sizeof(junk)) {
        say("--inject-corruption: writing the image: %s", strerror(errno));
    } else {
        say("--inject-corruption: overwrote block %" PRIu64 " in the image behind dpctl's back", b);
        s->injected = b;
        fdatasync(fd); /* for an O_DIRECT dpctl on a real file system */
    }
    if (fd >= 0)
        close(fd);
}

/* Runs the load (SK_LOAD) until end_ns, or the read-back until every block
 * was read; both leave nothing in flight unless something failed hard. */
static void run_phase(struct sk *s, enum sk_phase phase, uint64_t end_ns)
{
    double mean = s->o.kill_mean;
    uint64_t next_restart = phase == SK_LOAD && mean > 0 ? now_ns() + rng_exp_ns(&s->rng, mean) : UINT64_MAX;
    uint64_t next_report = now_ns() + 10000000000ull, next_child_check = 0;
    uint64_t inject_at = s->o.inject && phase == SK_LOAD ? now_ns() + (end_ns - now_ns()) / 2 : UINT64_MAX;
    uint64_t last_submitted = s->n.submitted;
    s->phase = phase;
    uint64_t t_last = now_ns();
    s->last_progress = now_ns();
    for (;;) {
        uint64_t now = now_ns();
        bool draining = phase == SK_LOAD ? (now >= end_ns || sk_interrupted) : s->readback_next >= s->nblocks;
        if (s->failed_hard)
            return;
        if (!draining)
            for (uint32_t qi = 0; qi < s->o.queues; qi++)
                top_up(s, qi, phase);
        /* Restart right after submitting, so that requests are at every stage:
         * still in the avail ring, popped and in the kernel, completed. */
        if (!draining && now_ns() >= next_restart) {
            uint64_t spin = now_ns() + (rng_below(&s->rng, 3) ? rng_below(&s->rng, 100000) : 0);
            while (now_ns() < spin)
                ;
            if (restart(s, rng_unit(&s->rng) < s->o.term_share) < 0)
                return;
            next_restart = now_ns() + rng_exp_ns(&s->rng, mean);
            continue;
        }
        uint32_t got = 0;
        for (uint32_t qi = 0; qi < s->o.queues; qi++)
            got += reap(s, qi);
        if (draining && !in_flight(s))
            return;
        now = now_ns();
        if (now >= inject_at) {
            inject_corruption(s);
            inject_at = UINT64_MAX;
        }
        if (now >= next_child_check) {
            if (dpctl_died(s))
                return;
            next_child_check = now + 100000000ull;
        }
        if (stalled(s))
            return;
        if (now >= next_report) {
            double dt = (double)(now - t_last) / 1e9;
            say("%" PRIu64 " requests (%.0f/s lately), %" PRIu64 " restarts, %" PRIu64 " failures so far",
                s->n.completed, (double)(s->n.submitted - last_submitted) / dt, s->n.kills + s->n.terms,
                s->n.corruptions + s->n.lost + s->n.duplicates + s->n.bad_status + s->n.bad_len +
                    s->n.backend_failures);
            last_submitted = s->n.submitted;
            t_last = now;
            next_report = now + 10000000000ull;
        }
        if (!got) {
            uint64_t until = next_restart < end_ns ? next_restart : end_ns;
            int ms = 200;
            if (!draining && until > now && (until - now) / 1000000 < (uint64_t)ms)
                ms = (int)((until - now) / 1000000);
            if (draining || next_restart > now)
                wait_calls(s, ms);
        }
    }
}

/* Each ring must stop exactly where its used index is: every request popped was completed. */
static void stop_rings(struct sk *s)
{
    for (uint32_t qi = 0; qi < s->o.queues; qi++) {
        uint32_t last = 0;
        int rc = vuf_stop_queue(s->conn, qi, &last);
        if (rc < 0) {
            s->n.backend_failures++;
            report(s, "stopping queue %u (GET_VRING_BASE): %s", qi, vuf_last_error(s->conn));
        } else if (last != gd_vring_base(s->d, qi)) {
            s->n.backend_failures++;
            report(s, "queue %u stopped at base 0x%x, the driver's used position is 0x%x", qi, last,
                   gd_vring_base(s->d, qi));
        }
    }
}

static void check_image(struct sk *s)
{
    int fd = open(s->image, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        s->n.backend_failures++;
        report(s, "opening the image %s: %s", s->image, strerror(errno));
        if (fd >= 0)
            close(fd);
        return;
    }
    if ((uint64_t)st.st_size != s->o.size) {
        s->n.backend_failures++;
        report(s, "the image is %lld bytes, it was made %" PRIu64, (long long)st.st_size, s->o.size);
    }
    static uint8_t buf[1u << 20];
    for (uint64_t off = 0; off < s->o.size; off += sizeof(buf)) {
        size_t want = s->o.size - off < sizeof(buf) ? (size_t)(s->o.size - off) : sizeof(buf);
        size_t have = 0;
        while (have < want) {
            ssize_t n = pread(fd, buf + have, want - have, (off_t)(off + have));
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0) {
                s->n.backend_failures++;
                report(s, "reading the image at %" PRIu64 ": %s", off + have, n < 0 ? strerror(errno) : "end of file");
                close(fd);
                return;
            }
            have += (size_t)n;
        }
        for (size_t i = 0; i < want / SK_BLOCK; i++) {
            uint64_t b = off / SK_BLOCK + i;
            verify_block(s, "image file", b, buf + i * SK_BLOCK);
            s->n.host_blocks++;
            s->n.host_written += s->gen[b] != 0;
        }
    }
    close(fd);
}

/* ---------------------------------------------------------------- setup */

static uint64_t round_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

static int setup(struct sk *s)
{
    const struct sk_opts *o = &s->o;
    if (o->dpctl) {
        snprintf(s->dpctl, sizeof(s->dpctl), "%s", o->dpctl);
    } else {
        char self[PATH_MAX];
        ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
        if (n < 0) {
            say("/proc/self/exe: %s", strerror(errno));
            return -errno;
        }
        self[n] = 0;
        char *slash = strrchr(self, '/');
        if (slash)
            *slash = 0;
        snprintf(s->dpctl, sizeof(s->dpctl), "%s/dpctl", self);
    }
    if (access(s->dpctl, X_OK) < 0) {
        say("no dpctl at %s (%s): build it (swift build -c release --product dpctl) or give --dpctl", s->dpctl,
            strerror(errno));
        return -ENOENT;
    }
    snprintf(s->work, sizeof(s->work), "%s/dp-soak.XXXXXX", o->dir);
    if (!mkdtemp(s->work)) {
        say("mkdtemp in %s: %s", o->dir, strerror(errno));
        return -errno;
    }
    snprintf(s->image, sizeof(s->image), "%s/disk.raw", s->work);
    snprintf(s->sock, sizeof(s->sock), "%s/vu.sock", s->work);
    snprintf(s->log_path, sizeof(s->log_path), "%s/dpctl.log", s->work);
    int fd = open(s->image, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0 || ftruncate(fd, (off_t)o->size) < 0) {
        say("creating %s: %s", s->image, strerror(errno));
        return -errno;
    }
    close(fd);
    s->log_fd = open(s->log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (s->log_fd < 0) {
        say("creating %s: %s", s->log_path, strerror(errno));
        return -errno;
    }

    s->nblocks = o->size / SK_BLOCK;
    s->gen = calloc(s->nblocks, sizeof(*s->gen));
    s->busy = calloc(s->nblocks, 1);
    s->unknown = calloc(s->nblocks, 1);
    if (!s->gen || !s->busy || !s->unknown)
        return -ENOMEM;
    s->injected = UINT64_MAX;

    /* Guest memory: rings and slots in the first half (CGuestDriver puts them
     * there), then the data buffers, placed across the middle so that with
     * two regions some are split between them. */
    uint64_t n = o->queue_size;
    uint64_t ring = 16 * n + 4096 + (6 + 2 * n + 64) + (6 + 8 * n + 64) + 64 * n + 64 + 16 * n * n + 64;
    uint64_t rings = 4096 + o->queues * ring;
    uint64_t data = (uint64_t)o->queues * o->depth * SK_BUF;
    struct gd_config gc = { .mem_size = round_up(2 * (rings + data) + (1u << 20), 2u << 20), .num_queues = o->queues,
                            .queue_size = o->queue_size, .event_idx = o->event_idx, .packed = o->packed };
    int rc = gd_create(&gc, &s->d);
    if (rc < 0) {
        say("guest driver (%" PRIu64 " bytes of memory): %s", gc.mem_size, strerror(-rc));
        return rc;
    }
    uint64_t base = gd_alloc_at(s->d, (gd_region_boundary(s->d) - data / 2 - SK_BLOCK / 2) & ~(uint64_t)511, data);
    if (!base) {
        say("guest memory: no room for %" PRIu64 " bytes of buffers", data);
        return -ENOMEM;
    }
    for (uint32_t qi = 0; qi < o->queues; qi++) {
        struct sk_queue *q = &s->q[qi];
        q->by_head = malloc(sizeof(int16_t) * o->queue_size);
        if (!q->by_head)
            return -ENOMEM;
        for (uint32_t h = 0; h < o->queue_size; h++)
            q->by_head[h] = -1;
        for (uint32_t i = 0; i < o->depth; i++) {
            struct sk_req *r = &q->req[i];
            r->gpa = base + ((uint64_t)qi * o->depth + i) * SK_BUF;
            r->buf = gd_ptr(s->d, r->gpa);
        }
        struct dp_queue_config qc;
        gd_queue_config(s->d, qi, &qc);
        q->call_fd = qc.call_fd;
        gd_disable_calls(s->d, qi);
    }
    return 0;
}

/* ---------------------------------------------------------------- main */

static uint64_t failures(const struct sk *s)
{
    return s->n.corruptions + s->n.lost + s->n.duplicates + s->n.bad_status + s->n.bad_len + s->n.backend_failures;
}

int main(int argc, char **argv)
{
    static struct sk s;
    parse(argc, argv, &s.o);
    sk_t0 = now_ns();
    s.pid = -1;
    s.log_fd = -1;
    s.seed = s.o.seed ? s.o.seed : mix64(now_ns() ^ ((uint64_t)getpid() << 32));
    s.rng = mix64(s.seed) | 1;
    signal(SIGINT, on_sigint);
    signal(SIGPIPE, SIG_IGN);

    if (setup(&s) < 0)
        return 1;
    char restarts[80] = "no restarts";
    if (s.o.kill_mean > 0)
        snprintf(restarts, sizeof(restarts), "restarts every %.1f s on average (%.0f%% SIGTERM)", s.o.kill_mean,
                 s.o.term_share * 100);
    say("seed %" PRIu64 "; %" PRIu64 " MiB image %s; %u queues x depth %u (%s ring %u%s); %s; load %.0f s", s.seed,
        s.o.size >> 20, s.image, s.o.queues, s.o.depth, s.o.packed ? "packed" : "split", s.o.queue_size,
        s.o.event_idx ? ", event_idx" : "", restarts,
        s.o.seconds);
    int rc = dpctl_start(&s);
    if (rc == 0)
        rc = sk_connect(&s, -1, 0);
    if (rc < 0) {
        say("the first dpctl did not come up; its log:");
        log_tail(&s);
        dpctl_reap(&s);
        return 1;
    }

    uint64_t t_load = now_ns();
    run_phase(&s, SK_LOAD, t_load + (uint64_t)(s.o.seconds * 1e9));
    double load_secs = secs_since(t_load);
    uint64_t load_requests = s.n.completed;

    uint64_t t_check = now_ns();
    if (!s.failed_hard) {
        say("load done: %" PRIu64 " requests; reading back %" PRIu64 " blocks through the data plane", s.n.completed,
            s.nblocks);
        run_phase(&s, SK_READBACK, UINT64_MAX);
    }
    if (!s.failed_hard)
        stop_rings(&s);
    /* Gave up with requests in flight: what their writes left is not known. */
    for (uint32_t qi = 0; qi < s.o.queues; qi++)
        for (uint32_t i = 0; i < s.o.depth; i++)
            if (s.q[qi].req[i].busy && s.q[qi].req[i].type == GD_BLK_T_OUT)
                for (uint32_t b = 0; b < s.q[qi].req[i].nblocks; b++)
                    s.unknown[s.q[qi].req[i].block + b] = 1;
    if (s.conn) {
        vuf_close(s.conn);
        s.conn = NULL;
    }
    if (s.pid > 0 && s.failed_hard) {
        dpctl_reap(&s); /* it may be stuck or stopped: no clean exit to wait for */
    } else if (s.pid > 0) {
        int st = 0;
        kill(s.pid, SIGTERM);
        if (!dpctl_wait(&s, 30000, &st)) {
            s.n.backend_failures++;
            report(&s, "the last dpctl did not exit within 30 s of SIGTERM");
            dpctl_reap(&s);
        } else if (!(WIFEXITED(st) && WEXITSTATUS(st) == 0)) {
            char why[96];
            describe_status(st, why, sizeof(why));
            s.n.backend_failures++;
            report(&s, "the last dpctl, sent SIGTERM, ended with %s", why);
        }
    }
    /* The image as the host sees it, with no dpctl running. */
    check_image(&s);
    for (uint64_t b = 0; b < s.nblocks; b++)
        s.n.unknown_blocks += s.unknown[b];
    double check_secs = secs_since(t_check);

    const struct sk_counts *n = &s.n;
    bool pass = failures(&s) == 0 && !s.failed_hard;
    printf("dp-soak %s  seed %" PRIu64 "\n", pass ? "PASS" : "FAIL", s.seed);
    printf("  runtime       %.1f s of load%s, %.1f s of final checks\n", load_secs,
           sk_interrupted ? " (interrupted)" : "", check_secs);
    printf("  restarts      %" PRIu64 " (%" PRIu64 " SIGKILL, %" PRIu64 " SIGTERM)\n", n->kills + n->terms, n->kills,
           n->terms);
    printf("  across them   %" PRIu64 " requests left outstanding by a stopped dpctl (%" PRIu64
           " popped by it: in its inflight region), %" PRIu64 " completed by a later one\n",
           n->inflight_at_restart, n->popped_at_restart, n->carried);
    printf("  requests      %" PRIu64 " (%" PRIu64 " reads, %" PRIu64 " writes, %" PRIu64 " flushes), %.0f/s\n",
           load_requests, n->reads, n->writes, n->flushes, load_secs > 0 ? (double)load_requests / load_secs : 0);
    printf("  blocks        %" PRIu64 " read and verified, %" PRIu64 " written (4 KiB); %.1f MiB read, %.1f MiB "
           "written\n",
           n->blocks_read, n->blocks_written, (double)n->bytes_read / 1048576, (double)n->bytes_written / 1048576);
    printf("  final check   %" PRIu64 " blocks read back through the data plane, %" PRIu64
           " in the image file (%" PRIu64 " written, %" PRIu64 " never written, %" PRIu64 " unknown)\n",
           n->readback_blocks, n->host_blocks, n->host_written, n->host_blocks - n->host_written, n->unknown_blocks);
    printf("  corruptions %" PRIu64 ", lost %" PRIu64 ", duplicates %" PRIu64 ", bad status %" PRIu64
           ", bad length %" PRIu64 ", back-end failures %" PRIu64 "\n",
           n->corruptions, n->lost, n->duplicates, n->bad_status, n->bad_len, n->backend_failures);
    printf("  (waits that timed out with completions waiting, i.e. late or missed calls: %" PRIu64 ")\n",
           n->timeouts_pending);
    if (pass && !s.o.keep) {
        unlink(s.image);
        unlink(s.log_path);
        unlink(s.sock);
        char ctl[PATH_MAX + 8];
        snprintf(ctl, sizeof(ctl), "%s.ctl", s.sock);
        unlink(ctl);
        rmdir(s.work);
    } else {
        if (!pass)
            log_tail(&s);
        printf("  kept          %s (image, dpctl.log)\n", s.work);
    }
    fflush(stdout);
    gd_destroy(s.d);
    return pass ? 0 : 1;
}
