/*
 * CGuestDriver: the guest's side of virtio split rings, in-process.
 *
 * It owns a memfd of guest memory, lays out rings and per-head request slots
 * in it, and drives virtio-blk requests the way a Linux guest would. Tests use
 * the raw ring calls to play a hostile guest; the benchmark loop is here, in
 * C, so the guest side costs as little as possible.
 *
 * Guest memory: one memfd of mem_size bytes. The driver sees it as one
 * contiguous mapping (gd_ptr). The device sees two regions, GPA
 * [0, mem_size/2) and [mem_size/2, mem_size), mapped apart from each other in
 * host memory with PROT_NONE guard pages around them (region 1 is mapped
 * below region 0), so a buffer that straddles the boundary must be split and
 * an overrun faults. GPA page 0 is never allocated: GPA 0 means failure.
 *
 * Functions return 0 (or a count) on success and a negative errno on failure;
 * none sets errno. A driver is used from one thread at a time; only the device
 * runs concurrently with it. Rings are written natively (little-endian hosts).
 */
#ifndef CGUESTDRIVER_H
#define CGUESTDRIVER_H

#include <stdbool.h>
#include <stdint.h>

#include <CDataPlane.h>

#ifdef __cplusplus
extern "C" {
#endif

/* virtio 1.x split ring flags (2.7.5, 2.7.6, 2.7.8). */
#define GD_DESC_F_NEXT 1
#define GD_DESC_F_WRITE 2
#define GD_DESC_F_INDIRECT 4
#define GD_AVAIL_F_NO_INTERRUPT 1
#define GD_USED_F_NO_NOTIFY 1

/* virtio-blk request types and status values (5.2.6). */
#define GD_BLK_T_IN 0
#define GD_BLK_T_OUT 1
#define GD_BLK_T_FLUSH 4
#define GD_BLK_T_GET_ID 8
#define GD_BLK_T_DISCARD 11
#define GD_BLK_T_WRITE_ZEROES 13
#define GD_BLK_S_OK 0
#define GD_BLK_S_IOERR 1
#define GD_BLK_S_UNSUPP 2
#define GD_BLK_WZ_F_UNMAP 1

/* One DISCARD / WRITE_ZEROES segment, as laid out in guest memory. */
struct gd_blk_range {
    uint64_t sector;
    uint32_t num_sectors;
    uint32_t flags;
};

/* ---------------------------------------------------------------- driver */

struct gd_driver;

struct gd_config {
    uint64_t mem_size;   /* bytes; a multiple of twice the page size */
    uint32_t num_queues;
    uint32_t queue_size; /* power of two, 1..32768 */
    bool event_idx;      /* VIRTIO_RING_F_EVENT_IDX */
    bool packed;         /* VIRTIO_F_RING_PACKED (2.8): desc_addr is the descriptor
                            ring, avail_addr the driver and used_addr the device
                            event suppression area; the split-only raw calls
                            below have no meaning on such a queue */
};

/* Creates the memfd and both views, and per queue: rings, a kick eventfd, a
 * call eventfd (non-blocking), and one slot per head (16-byte header, status
 * byte, indirect table of queue_size descriptors), all in region 0.
 * -ENOMEM when they do not fit in mem_size/2 (slots take queue_size^2 * 16
 * bytes per queue). Call notifications start enabled. */
int gd_create(const struct gd_config *cfg, struct gd_driver **out);
void gd_destroy(struct gd_driver *d);

/* The device's view: fills out[0..1] and returns 2. user_addr is a fake
 * address, 0x7f0000000000 + guest_phys_addr, for user-address ring tests. */
uint32_t gd_mem_regions(const struct gd_driver *d, struct dp_mem_region *out);
/* Ring GPAs, size, event_idx, indirect = true, last_avail_idx = 0, kick and
 * call fds (owned by the driver), err_fd = -1. Zeroed for a bad queue. */
void gd_queue_config(const struct gd_driver *d, uint32_t q, struct dp_queue_config *out);
int gd_memfd(const struct gd_driver *d);
uint64_t gd_region_boundary(const struct gd_driver *d); /* mem_size / 2 */
uint64_t gd_mem_size(const struct gd_driver *d);

/* ---------------------------------------------------------------- guest memory */

/* Bump allocator over GPA. align is a power of two (0 = 1). 0 when exhausted. */
uint64_t gd_alloc(struct gd_driver *d, uint64_t size, uint64_t align);
/* Claims [gpa, gpa + size) if it lies at or above everything allocated so far
 * (the allocator skips ahead to it); returns gpa, or 0. */
uint64_t gd_alloc_at(struct gd_driver *d, uint64_t gpa, uint64_t size);
/* Where the allocator stands, and a rewind to such a mark (never below what
 * gd_create allocated), so tests and the benchmark can reuse memory. */
uint64_t gd_alloc_mark(const struct gd_driver *d);
void gd_alloc_reset(struct gd_driver *d, uint64_t mark);
/* The driver's pointer to a GPA; NULL when out of range. */
void *gd_ptr(struct gd_driver *d, uint64_t gpa);

/* Where each head's request slot lives (header, status byte, indirect table). */
uint64_t gd_slot_header_gpa(const struct gd_driver *d, uint32_t q, uint16_t head);
uint64_t gd_slot_status_gpa(const struct gd_driver *d, uint32_t q, uint16_t head);
uint64_t gd_slot_indirect_gpa(const struct gd_driver *d, uint32_t q, uint16_t head);

/* ---------------------------------------------------------------- raw ring access */

/* No validation on purpose (hostile tests), except that writes stay inside
 * the ring: a bad queue is ignored, a desc idx >= size is ignored. */
void gd_write_desc(struct gd_driver *d, uint32_t q, uint16_t idx, uint64_t addr, uint32_t len,
                   uint16_t flags, uint16_t next);
uint64_t gd_desc_table_gpa(const struct gd_driver *d, uint32_t q);
/* ring[shadow % size] = head; shadow++. Not visible until published. */
void gd_avail_add(struct gd_driver *d, uint32_t q, uint16_t head);
/* Release-store avail->idx = shadow (pairs with the device's acquire load). */
void gd_avail_publish(struct gd_driver *d, uint32_t q);
/* Raw release-store of avail->idx; the shadow follows. */
void gd_set_avail_idx(struct gd_driver *d, uint32_t q, uint16_t idx);
void gd_set_avail_flags(struct gd_driver *d, uint32_t q, uint16_t flags);
/* Raw store of used_event. The driver stops moving used_event on its own
 * until the next gd_enable_calls / gd_disable_calls. */
void gd_set_used_event(struct gd_driver *d, uint32_t q, uint16_t v);
uint16_t gd_avail_event(const struct gd_driver *d, uint32_t q);
uint16_t gd_used_flags(const struct gd_driver *d, uint32_t q);
uint16_t gd_used_idx(const struct gd_driver *d, uint32_t q); /* acquire load */

/* The ring layout the driver was created with. */
bool gd_is_packed(const struct gd_driver *d);
/* What SET_VRING_BASE carries for queue q to restart the device where the
 * driver stands: split, the used index; packed (vhost-user's encoding), the
 * driver's next used slot with its wrap counter in bit 15, for both the
 * avail (bits 0-15) and the used (bits 16-31) side. */
uint32_t gd_vring_base(const struct gd_driver *d, uint32_t q);
/* A used element waits that gd_used_pop has not taken (either layout). */
bool gd_used_pending(const struct gd_driver *d, uint32_t q);

/* Packed rings, raw (hostile tests). The driver's cursor is the next ring
 * slot to fill; a descriptor is available when its flags carry avail_bits
 * (AVAIL = the avail wrap counter, USED = its inverse). */
#define GD_PDESC_F_AVAIL (1u << 7)
#define GD_PDESC_F_USED (1u << 15)
/* Writes a descriptor, its flags last with release; no validation. */
void gd_packed_write_desc(struct gd_driver *d, uint32_t q, uint16_t slot, uint64_t addr, uint32_t len,
                          uint16_t id, uint16_t flags);
/* The cursor's slot, and the AVAIL/USED bits that make a descriptor there available. */
uint16_t gd_packed_next_slot(const struct gd_driver *d, uint32_t q, uint16_t *avail_bits);
/* Moves the cursor past n slots written raw as one buffer (the wrap counter
 * follows) and counts them as published for gd_kick_if_needed; gd_used_pop
 * skips those n slots when that buffer's used descriptor comes back in order. */
void gd_packed_skip(struct gd_driver *d, uint32_t q, uint16_t n);
/* The device's event suppression area: flags << 16 | off_wrap. */
uint32_t gd_packed_device_event(const struct gd_driver *d, uint32_t q);

/* A fresh non-blocking eventfd (for tests that need an extra one, e.g. an
 * error fd); Swift cannot see eventfd(2) itself. */
int gd_eventfd(void);

/* Writes 1 to the kick eventfd, unconditionally. */
int gd_kick(struct gd_driver *d, uint32_t q);
/* Kicks unless the device suppressed it (avail_event with EVENT_IDX, else
 * VRING_USED_F_NO_NOTIFY) for what was published since the last decision.
 * Returns 1 if kicked, 0 if not. */
int gd_kick_if_needed(struct gd_driver *d, uint32_t q);

/* Pops one used element (1) or finds none (0). Frees no descriptors. */
int gd_used_pop(struct gd_driver *d, uint32_t q, uint32_t *id, uint32_t *len);

/* Call notifications, as Linux's virtqueue_enable_cb / disable_cb. Enabling
 * sets used_event to the last seen used idx (EVENT_IDX) or clears
 * NO_INTERRUPT, and returns 1 if used elements are already pending (check
 * again before sleeping), else 0. While enabled with EVENT_IDX every pop moves
 * used_event along. Disabling keeps used_event far behind (EVENT_IDX) or sets
 * NO_INTERRUPT. */
int gd_enable_calls(struct gd_driver *d, uint32_t q);
void gd_disable_calls(struct gd_driver *d, uint32_t q);
/* poll()s the call fd, then read()s it: 1 signalled, 0 timed out (timeout_ms
 * < 0 waits forever). */
int gd_wait_call(struct gd_driver *d, uint32_t q, int timeout_ms);

/* ---------------------------------------------------------------- requests */

struct gd_seg {
    uint64_t gpa;
    uint32_t len;
};

struct gd_req {
    uint32_t type;
    uint64_t sector;
    const struct gd_seg *segs; /* device-writable for IN and GET_ID, readable otherwise */
    uint32_t nsegs;
    bool indirect;             /* the whole chain in the head slot's indirect table */
};

/* Writes the header (status byte = 0xFF) and the chain header, segs...,
 * status from the free descriptor list, and adds the head to the avail ring
 * without publishing it. -ENOSPC when too few descriptors are free, -EINVAL
 * when the chain could never fit (nsegs + 2 > queue size). */
int gd_request_add(struct gd_driver *d, uint32_t q, const struct gd_req *req, uint16_t *head);
/* gd_request_add, then gd_avail_publish. Does not kick. */
int gd_submit(struct gd_driver *d, uint32_t q, const struct gd_req *req, uint16_t *head);
/* Pops one used element, frees its descriptors and reports its status byte:
 * 1 popped, 0 none, -EINVAL if the used id is not a head in flight (the
 * element is consumed all the same). */
int gd_complete(struct gd_driver *d, uint32_t q, uint16_t *head, uint32_t *len, uint8_t *status);
uint32_t gd_in_flight(const struct gd_driver *d, uint32_t q);

/* ---------------------------------------------------------------- benchmark */

#define GD_HIST_BUCKETS 1024 /* log-linear: 16 sub-buckets per power of two of ns */

struct gd_bench_params {
    uint32_t first_queue, num_queues, depth;
    uint32_t type;             /* GD_BLK_T_IN or GD_BLK_T_OUT */
    uint32_t block_size;       /* bytes, a multiple of 512 */
    bool random;               /* random block-aligned offsets; else sequential, wrapping */
    uint64_t capacity_sectors; /* offsets stay within [0, capacity) */
    uint64_t seed;             /* xorshift64* seed (0 picks a fixed one) */
    uint64_t duration_ns;      /* stop submitting after this, then drain */
    uint64_t warmup_ns;        /* completions before this are not counted */
    bool busy_poll;            /* spin on used rings; else a guest: sleep on the call fds */
    uint64_t spin_ns;          /* guest model: spin this long for completions before
                                  sleeping (a hybrid; 0 sleeps at once) */
    bool indirect;             /* every chain in an indirect table, as Linux does when
                                  VIRTIO_RING_F_INDIRECT_DESC is on; else only when
                                  direct chains would not fit the ring */
    int32_t cpu;               /* pin the calling thread here for the run; -1 = don't */
    uint32_t segments;         /* data descriptors per request, splitting block_size
                                  evenly (0 = 1); segments + 2 <= queue size */
};

struct gd_bench_result {
    uint64_t ops, bytes, errors, elapsed_ns, kicks, waits;
    /* The guest model: wake-ups (after a sleep or a spin that found
     * completions), the device's signals (call eventfd writes: the sum of the
     * counters read) and the completions reaped, all over the whole run. */
    uint64_t wakeups, signals, reaped;
    uint64_t per_queue_ops[16];
    uint64_t hist[GD_HIST_BUCKETS];
};

/* Keeps depth requests in flight on each queue from the calling thread until
 * duration_ns, then drains. Unless busy_poll it behaves like a Linux guest's
 * virtio-blk driver: it sleeps on the call eventfds until the device signals,
 * then reaps every used element of each queue that signalled (disable calls,
 * reap, re-enable and re-check, as virtblk_done), resubmits, publishes and
 * kicks at most once per queue (when the device asks for it), and sleeps
 * again at once. Queues must be idle. Chains are direct when (segments + 2) *
 * depth fits the queue, else indirect. ops, bytes, hist and elapsed_ns
 * (warmup end to last completion) count completions after warmup; errors
 * (status != 0) count all. Data buffers come from the allocator and are
 * given back at the end. -ETIMEDOUT if the device completes nothing for 10 s. */
int gd_bench_run(struct gd_driver *d, const struct gd_bench_params *p, struct gd_bench_result *r);

/* Queues of one driver, for gd_bench_run_many. */
struct gd_bench_target {
    struct gd_driver *d;
    uint32_t first_queue, num_queues;
};

/* gd_bench_run over the queues of several drivers from the one calling
 * thread, as a guest with several disks: one loop, one sleep on all their
 * call fds, each signalled queue handled on its own. p->first_queue and
 * p->num_queues are not used; each driver appears at most once, and every
 * queue has the same size. per_queue_ops counts the first 16 queues in
 * target order; each driver's buffers come from its own allocator. */
int gd_bench_run_many(const struct gd_bench_target *t, uint32_t nt, const struct gd_bench_params *p,
                      struct gd_bench_result *r);
/* Pins the calling thread to one CPU, or with cpu < 0 lets it run anywhere
 * (tests that measure latency keep their client off the IOThread's CPU). */
int gd_pin_thread(int32_t cpu);

/* The histogram bucket of a latency, and the latency (bucket midpoint, ns) at
 * percentile pct (0..100); 0 for an empty histogram. */
uint32_t gd_hist_bucket(uint64_t ns);
uint64_t gd_hist_percentile(const uint64_t *hist, double pct);

#ifdef __cplusplus
}
#endif

#endif /* CGUESTDRIVER_H */
