/* Backends: turn a parsed request into I/O. They know requests, not rings. */
#ifndef DP_BACKEND_H
#define DP_BACKEND_H

#include <liburing.h>

#include "dp_internal.h"

/* Null backend: completes at once (returns 0); reads return zeroes when asked to. */
int backend_null_execute(const struct dp_disk *disk, struct blk_req *req);

/* io_uring backend. Prepares req's next SQE on its IOThread's ring; -EBUSY
 * when there is no SQE or no room for its completion, -EAGAIN when it must
 * wait for bounce-buffer budget, -ENOMEM when a bounce buffer cannot be had. */
int backend_uring_prep(struct dp_iothread *t, struct blk_req *req);
/* Handles a CQE for req. Returns 0 when the request is done, a negative
 * errno when it failed, or BACKEND_AGAIN when it must be submitted again
 * (short I/O, -EAGAIN, the write-zeroes fallback). */
#define BACKEND_AGAIN 1
int backend_uring_complete(struct blk_req *req, int res);
/* Releases what prep took (a bounce buffer); called once per request. */
void backend_uring_release(struct blk_req *req);

#endif
