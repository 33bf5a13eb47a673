/*
 * Inside CVhostFrontend: the connection and the helpers its two halves share.
 * Not part of the API.
 */
#ifndef VUF_INTERNAL_H
#define VUF_INTERNAL_H

#ifndef _GNU_SOURCE
#error "CVhostFrontend needs _GNU_SOURCE (MSG_CMSG_CLOEXEC, POLLRDHUP); set it in the target's cSettings"
#endif
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "vhost-user messages are native-endian and the rings little-endian; this front-end assumes both agree"
#endif

#include "CVhostFrontend.h"

#define VUF_ERR_LEN 256
#define VUF_DEFAULT_TIMEOUT_MS 10000
#define VUF_DRAIN_MAX 65536 /* larger unread payloads are not drained */

struct vuf_conn {
    int fd;
    bool reply_ack;  /* REPLY_ACK negotiated: no-reply messages ask for an ack */
    bool packed;     /* VIRTIO_F_RING_PACKED negotiated: ring bases are 32-bit */
    int timeout_ms;  /* for replies during vuf_setup and vuf_stop_queue */
    int inflight_fd; /* the inflight region's memfd, -1 without */
    uint64_t inflight_size;
    int log_fd;      /* the dirty log's memfd (vuf_start_dirty_log), -1 without */
    uint64_t log_size;
    int backend_fd;  /* our end of the backend-request channel, -1 without */
    char err[VUF_ERR_LEN];
};

/* Records what failed (printf-style) and returns rc, so callers can write
 * `return _vuf_fail(c, rc, ...)`. Don't use directly outside this target. */
int _vuf_fail(struct vuf_conn *c, int rc, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Puts "prefix: " before the message already recorded and returns rc. */
int _vuf_wrap(struct vuf_conn *c, int rc, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#endif /* VUF_INTERNAL_H */
