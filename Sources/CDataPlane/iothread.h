/* The IOThread as the public calls see it: a control mailbox, NUMA-local
 * memory and settings its queues copy. The top of the core: it runs the
 * queues (queue.h) on its loop (loop.h); nothing below calls it. */
#ifndef DP_IOTHREAD_H
#define DP_IOTHREAD_H

#include "dp_internal.h"

/* Sends a control message and waits for the answer; -ESHUTDOWN once the
 * thread has exited (it detached every queue first). */
int iothread_call(struct dp_iothread *t, struct ctl_msg *msg);
/* Completions after which a queue's pass publishes and signals early. */
uint32_t iothread_notify_after(const struct dp_iothread *t);
/* The thread's counters (the queue layer and backends add to some). */
struct dp_thread_counters *iothread_counters(struct dp_iothread *t);
/* Zeroed memory on the thread's NUMA node (page aligned). */
void *iothread_alloc(const struct dp_iothread *t, size_t size, int *node);
void iothread_free(void *p, size_t size, int node);

#endif
