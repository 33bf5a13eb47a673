/* virtio-blk requests (virtio 1.x section 5.2.6): header, status, sectors,
 * capacity, read-only. Knows chains of iovecs, not rings or io_uring. */
#ifndef DP_BLK_H
#define DP_BLK_H

#include "dp_internal.h"
#include "vring_split.h" /* struct vring_chain: what blk parses */

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_T_DISCARD 11
#define VIRTIO_BLK_T_WRITE_ZEROES 13
#define VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP 1u

/* One request moves at most this much (the used length is 32-bit); what we
 * announce (seg_max segments of size_max bytes) stays below it. */
#define BLK_MAX_REQ_BYTES (1ull << 30)
_Static_assert((uint64_t)DP_SEG_MAX * DP_SIZE_MAX <= BLK_MAX_REQ_BYTES, "announced limits fit a request");
_Static_assert((uint64_t)DP_SEG_MAX * DP_SIZE_MAX / 512 <= 0xffff, "SeaBIOS's blocks-per-request count is a u16");

/* blk_parse's answer when the request needs the backend. */
#define BLK_NEEDS_IO 0x100

/* Turns a walked chain (one with a status byte) into a request. Returns
 * BLK_NEEDS_IO with req ready for a backend, or a VIRTIO_BLK_S_* status to
 * complete with at once (then *err names the failure, or is DP_ERR_COUNT
 * for success). Sets req->status and req->op. */
int blk_parse(const struct dp_disk *disk, struct vring_chain *chain, struct blk_req *req,
              enum dp_err *err);

/* Whether a parsed request's range still lies inside the disk (a held
 * request retried after a shrink may not): true for requests without one. */
bool blk_req_in_range(const struct dp_disk *disk, const struct blk_req *req);

/* Copy between guest iovecs and a flat buffer; return bytes copied. */
size_t iov_to_buf(const struct iovec *iov, uint32_t cnt, size_t skip, void *buf, size_t len);
size_t iov_from_buf(const struct iovec *iov, uint32_t cnt, const void *buf, size_t len);
/* Drop the first n bytes of an iovec array in place; returns the new start. */
struct iovec *iov_advance(struct iovec *iov, uint32_t *cnt, size_t n);

#endif
