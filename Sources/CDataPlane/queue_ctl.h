/* A queue's control state machine (queue_ctl.c), run on its IOThread
 * between passes: attach, stop, pause, resume, memory and notifier swaps,
 * held and requeued requests, drains. Called by the IOThread only. */
#ifndef DP_QUEUE_CTL_H
#define DP_QUEUE_CTL_H

#include "queue.h"

/* The queue joins its IOThread's loop (attach) and is served from then on. */
void queue_attach(struct dp_queue *q, struct loop *l, struct uring_backend *u);
/* A queue message (stop, pause, resume, memory or notifier swap): its
 * answer, or QUEUE_CTL_DRAIN when it waits for the queue to drain (then
 * call queue_check_drained). */
#define QUEUE_CTL_DRAIN 1
int queue_ctl(struct dp_queue *q, struct ctl_msg *msg);
/* Moves a stop, pause or memory swap on once nothing is in flight. Returns
 * the message now answered (*result), or NULL; *detach when the queue
 * stopped and left the loop (the IOThread drops it). */
struct ctl_msg *queue_check_drained(struct dp_queue *q, bool *detach, int *result);

#endif
