/* Faults in front of every backend: the injected ones (dp_disk_inject_fault)
 * and a flush error that must stick. */
#include "backend.h"

static int fault_injected(struct dp_disk *d, const struct blk_req *req)
{
    int32_t error = atomic_load_explicit(&d->fault_error, memory_order_relaxed);
    if (!error || !(atomic_load_explicit(&d->fault_ops, memory_order_relaxed) & (1u << req->op)))
        return 0;
    uint64_t start = atomic_load_explicit(&d->fault_start, memory_order_relaxed);
    uint64_t end = atomic_load_explicit(&d->fault_end, memory_order_relaxed);
    bool ranged = req->op != DP_OP_FLUSH;
    uint64_t first = req->offset / 512, last = (req->offset + req->len) / 512;
    if (ranged && (last <= start || (end && first >= end)))
        return 0;
    uint64_t n = atomic_fetch_add_explicit(&d->fault_seen, 1, memory_order_relaxed) + 1;
    uint64_t after = atomic_load_explicit(&d->fault_after, memory_order_relaxed);
    uint32_t every = atomic_load_explicit(&d->fault_every, memory_order_relaxed);
    if (n <= after || (every > 1 && (n - after) % every))
        return 0;
    return -error;
}

int backend_fault_check(struct dp_disk *d, const struct blk_req *req)
{
    int fault = fault_injected(d, req);
    /* After a failed flush of the page cache, no flush can succeed again:
     * what it failed to write is lost to the next one (backend_uring.c). */
    if (!fault && req->op == DP_OP_FLUSH)
        fault = atomic_load_explicit(&d->flush_error, memory_order_relaxed);
    return fault;
}
