/*
 * CVhostFrontend: the front-end (QEMU's) side of vhost-user-blk.
 *
 * A connection to a back-end's unix socket, raw message calls for tests that
 * play a hostile front-end, and the handshake QEMU does to hand a guest's
 * memory, rings and eventfds to the back-end. The guest is CGuestDriver: its
 * memfd becomes the shared memory, its rings and eventfds the vrings, and its
 * benchmark loop then drives the back-end as it drives the in-process device.
 *
 * Wire format: QEMU docs/interop/vhost-user.rst ("Message Specification").
 * Messages are native-endian; this target assumes a little-endian host, like
 * CGuestDriver.
 *
 * Functions return 0 (or a count) on success and a negative errno on failure;
 * none sets errno. A peer that closed the connection is always -ENOTCONN,
 * whether it showed as EOF, EPIPE or ECONNRESET. vuf_last_error() says what
 * failed in words. A connection is used from one thread at a time.
 *
 * The back-end may set O_NONBLOCK on the eventfds it receives (QEMU's
 * qemu-storage-daemon does), which also changes the driver's file
 * descriptions: nothing here or in CGuestDriver reads them without poll().
 */
#ifndef CVHOSTFRONTEND_H
#define CVHOSTFRONTEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <CGuestDriver.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------- wire constants */

/* Front-end requests (vhost-user.rst "Front-end message types"). */
#define VUF_GET_FEATURES 1
#define VUF_SET_FEATURES 2
#define VUF_SET_OWNER 3
#define VUF_RESET_OWNER 4
#define VUF_SET_MEM_TABLE 5
#define VUF_SET_LOG_BASE 6
#define VUF_SET_LOG_FD 7
#define VUF_SET_VRING_NUM 8
#define VUF_SET_VRING_ADDR 9
#define VUF_SET_VRING_BASE 10
#define VUF_GET_VRING_BASE 11
#define VUF_SET_VRING_KICK 12
#define VUF_SET_VRING_CALL 13
#define VUF_SET_VRING_ERR 14
#define VUF_GET_PROTOCOL_FEATURES 15
#define VUF_SET_PROTOCOL_FEATURES 16
#define VUF_GET_QUEUE_NUM 17
#define VUF_SET_VRING_ENABLE 18
#define VUF_GET_CONFIG 24
#define VUF_SET_CONFIG 25
#define VUF_GET_INFLIGHT_FD 31
#define VUF_SET_INFLIGHT_FD 32
#define VUF_RESET_DEVICE 34
#define VUF_GET_MAX_MEM_SLOTS 36
#define VUF_ADD_MEM_REG 37
#define VUF_REM_MEM_REG 38
#define VUF_SET_STATUS 39
#define VUF_GET_STATUS 40
#define VUF_SET_BACKEND_REQ_FD 21 /* the spec's former SET_SLAVE_REQ_FD */

/* Back-end requests on the backend-request channel. */
#define VUF_BACKEND_CONFIG_CHANGE_MSG 2

/* Header flags. */
#define VUF_FLAG_VERSION 0x1u    /* the only version; bits 0-1 */
#define VUF_FLAG_REPLY 0x4u      /* set on every back-end reply */
#define VUF_FLAG_NEED_REPLY 0x8u /* REPLY_ACK: ask for a u64 ack */

#define VUF_HEADER_SIZE 12
#define VUF_VRING_NOFD 0x100ull  /* SET_VRING_KICK/CALL/ERR: no fd attached */
#define VUF_MAX_FDS 8            /* fds one message may carry (what vuf_recv hands back at most) */
#define VUF_MAX_SEND_FDS 64      /* vuf_send may carry more, to test a back-end's limit */

/* Virtio feature bits (virtio 1.x 5.2.3, 6; vhost-user.rst). */
#define VUF_F_BLK_SIZE_MAX 1
#define VUF_F_BLK_SEG_MAX 2
#define VUF_F_BLK_RO 5
#define VUF_F_BLK_BLK_SIZE 6
#define VUF_F_BLK_FLUSH 9
#define VUF_F_BLK_CONFIG_WCE 11
#define VUF_F_BLK_TOPOLOGY 10
#define VUF_F_BLK_MQ 12
#define VUF_F_BLK_DISCARD 13
#define VUF_F_BLK_WRITE_ZEROES 14
#define VUF_F_RING_INDIRECT_DESC 28
#define VUF_F_RING_EVENT_IDX 29
#define VUF_F_PROTOCOL_FEATURES 30
#define VUF_F_VERSION_1 32
#define VUF_F_RING_PACKED 34
#define VUF_F_LOG_ALL 26

/* Protocol feature bits (vhost-user.rst "Protocol features"). */
#define VUF_PF_MQ 0
#define VUF_PF_LOG_SHMFD 1
#define VUF_PF_REPLY_ACK 3
#define VUF_PF_BACKEND_REQ 5 /* the spec's former SLAVE_REQ */
#define VUF_PF_CONFIG 9
#define VUF_PF_INFLIGHT_SHMFD 12
#define VUF_PF_RESET_DEVICE 13
#define VUF_PF_CONFIGURE_MEM_SLOTS 15
#define VUF_PF_STATUS 16

/* ---------------------------------------------------------------- connection */

struct vuf_conn;

/* Connects to a back-end listening at socket_path. */
int vuf_connect(const char *socket_path, struct vuf_conn **out);
/* Closes the socket and frees the connection, and whatever vuf_setup kept
 * (the inflight region). The driver is the caller's. NULL is fine. */
void vuf_close(struct vuf_conn *c);
/* The socket, for tests that want to shutdown() or poll it themselves. */
int vuf_fd(const struct vuf_conn *c);
/* What the last failed call on c was about ("" if none failed). */
const char *vuf_last_error(const struct vuf_conn *c);

/* ---------------------------------------------------------------- raw messages */

/* Sends a header {request, flags, size} and size bytes of payload, with nfds
 * (0..VUF_MAX_SEND_FDS) descriptors attached to the first byte. Nothing is
 * checked or added: flags is sent as given (include VUF_FLAG_VERSION). */
int vuf_send(struct vuf_conn *c, uint32_t request, uint32_t flags, const void *payload, uint32_t size,
             const int *fds, int nfds);
/* Sends len arbitrary bytes (a truncated header, two messages at once, ...),
 * with fds attached to the first byte. */
int vuf_send_raw(struct vuf_conn *c, const void *bytes, size_t len, const int *fds, int nfds);
/* Receives one message within timeout_ms (< 0: no limit). fds, if not NULL,
 * must have room for VUF_MAX_FDS; *nfds gets the count (received fds are the
 * caller's; with fds NULL they are closed). Up to max payload bytes land in
 * payload and *size gets the size the header announced; a larger payload is
 * read and dropped, and the call returns -EMSGSIZE (payloads over 64 KiB are
 * not drained: -EPROTO, and the stream is lost). -ENOTCONN when the peer
 * closed, -ETIMEDOUT when nothing (or only part of a message) came in time. */
int vuf_recv(struct vuf_conn *c, uint32_t *request, uint32_t *flags, void *payload, uint32_t max,
             uint32_t *size, int *fds, int *nfds, int timeout_ms);
/* 1 if the peer has closed the connection (or does within timeout_ms), else 0.
 * Unread data does not count as closed and is left in place. */
int vuf_is_closed(struct vuf_conn *c, int timeout_ms);

/* ---------------------------------------------------------------- handshake */

/* The virtio-blk config space up to write_zeroes_may_unmap (virtio 1.x
 * 5.2.4), as GET_CONFIG returns it: its first VUF_BLK_CONFIG_SIZE bytes are
 * the wire layout (sizeof adds 4 bytes of tail padding). */
struct vuf_blk_config {
    uint64_t capacity; /* 512-byte sectors */
    uint32_t size_max;
    uint32_t seg_max;
    uint16_t cylinders;
    uint8_t heads;
    uint8_t sectors;
    uint32_t blk_size;
    uint8_t physical_block_exp;
    uint8_t alignment_offset;
    uint16_t min_io_size;
    uint32_t opt_io_size;
    uint8_t writeback;
    uint8_t unused0;
    uint16_t num_queues;
    uint32_t max_discard_sectors;
    uint32_t max_discard_seg;
    uint32_t discard_sector_alignment;
    uint32_t max_write_zeroes_sectors;
    uint32_t max_write_zeroes_seg;
    uint8_t write_zeroes_may_unmap;
    uint8_t unused1[3];
};

#define VUF_BLK_CONFIG_SIZE 60

struct vuf_options {
    uint32_t num_queues;  /* queues to set up, 0..N-1; 0 = all of the driver's */
    bool inflight;        /* negotiate INFLIGHT_SHMFD (if offered), GET_ then SET_INFLIGHT_FD */
    bool add_mem_reg;     /* ADD_MEM_REG when CONFIGURE_MEM_SLOTS is offered; else SET_MEM_TABLE */
    bool two_regions;     /* describe memory as two regions split at gd_region_boundary */
    bool features_early;  /* SET_FEATURES right after GET_FEATURES; else where QEMU sends it */
    bool no_reply_ack;    /* don't negotiate REPLY_ACK */
    int32_t timeout_ms;   /* per reply; 0 = 10 s */
    /* Reconnect as QEMU does after a back-end restart: skip GET_INFLIGHT_FD and
     * hand back this region (from vuf_inflight_dup on the old connection). */
    bool reuse_inflight;
    int32_t inflight_fd;
    uint64_t inflight_size;
    /* Start as QEMU starts a device while a migration runs (a reconnect
     * during one): LOG_ALL in SET_FEATURES (when offered), then, after the
     * rings are set up and before they are enabled, SET_LOG_BASE with a
     * zeroed log of this many bytes (vuf_dirty_log_dup reads it). 0: no log. */
    uint64_t dirty_log_bytes;
    /* Negotiate BACKEND_REQ (when offered) and hand the back-end a channel
     * (SET_BACKEND_REQ_FD, where QEMU sends it: before SET_OWNER);
     * vuf_recv_backend reads what comes on it. */
    bool backend_req;
    /* Negotiate VIRTIO_BLK_F_CONFIG_WCE (when offered): the writeback byte
     * may be written (vuf_set_config). */
    bool config_wce;
};

struct vuf_info {
    uint64_t features_offered, features;  /* GET_FEATURES, and what SET_FEATURES acked */
    uint64_t protocol_offered, protocol;  /* same for protocol features (0 without PROTOCOL_FEATURES) */
    uint64_t queue_num;                   /* GET_QUEUE_NUM; 0 when MQ is not a protocol feature */
    uint64_t max_mem_slots;               /* GET_MAX_MEM_SLOTS; 0 when not sent */
    bool has_config;                      /* CONFIG negotiated and GET_CONFIG answered */
    struct vuf_blk_config config;
    uint64_t inflight_size;               /* bytes of the inflight region; 0 without */
};

/* The whole handshake, in QEMU's order (hw/block/vhost-user-blk.c, hw/virtio/vhost.c):
 *   GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
 *   GET_MAX_MEM_SLOTS, SET_OWNER, GET_CONFIG, [SET_FEATURES, GET_INFLIGHT_FD,
 *   SET_INFLIGHT_FD (vhost_dev_prepare_inflight)], SET_FEATURES, SET_MEM_TABLE or ADD_MEM_REG, per queue SET_VRING_NUM,
 *   SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_CALL, then
 *   SET_VRING_ENABLE 1 on each queue (not sent without PROTOCOL_FEATURES).
 * SET_VRING_BASE is the ring's used index: 0 on a fresh driver, and after
 * vuf_stop_queue or a reconnect the place QEMU restarts a ring from, so the
 * same driver can be set up again on this or a new connection.
 * Features: offered ∩ {VERSION_1, PROTOCOL_FEATURES, INDIRECT_DESC, EVENT_IDX
 * (only if the driver uses it), RING_PACKED (only, and then required, for
 * a packed driver), blk SEG_MAX, BLK_SIZE, FLUSH, TOPOLOGY, MQ,
 * DISCARD, WRITE_ZEROES, RO}; protocol: offered ∩ {MQ, LOG_SHMFD, REPLY_ACK, CONFIG,
 * CONFIGURE_MEM_SLOTS, INFLIGHT_SHMFD if asked}. With REPLY_ACK every message
 * that has no reply of its own asks for an ack, and a non-zero ack is -EIO.
 * Memory is the driver's whole memfd at GPA 0, with the driver's own mapping
 * as the user address; ring addresses are user addresses in it.
 * -ENOTSUP when the back-end lacks what the driver needs (VERSION_1,
 * EVENT_IDX if the driver uses it, enough queues); -EPROTO on a malformed
 * reply. info may be NULL. The driver must outlive its use by the back-end. */
int vuf_setup(struct vuf_conn *c, struct gd_driver *d, const struct vuf_options *opts, struct vuf_info *info);

/* GET_VRING_BASE: stops queue q (the back-end drains it first) and reports
 * where it stopped: a split ring's avail index, or a packed ring's 32-bit
 * value (gd_vring_base's encoding). The back-end closes its copies of the
 * queue's eventfds. */
int vuf_stop_queue(struct vuf_conn *c, uint32_t q, uint32_t *base);

/* Starts dirty logging as QEMU does when a migration starts: SET_LOG_BASE
 * with a zeroed memfd of log_bytes (one bit per 4 KiB page of guest memory;
 * needs LOG_SHMFD, which vuf_setup negotiates when offered), then
 * SET_FEATURES with `features` (vuf_info.features) plus VHOST_F_LOG_ALL.
 * The log lives until vuf_close. */
int vuf_start_dirty_log(struct vuf_conn *c, uint64_t features, uint64_t log_bytes);

/* A duplicate of the dirty log's memfd (the caller's to close) and its
 * size, or -ENOENT when no log was set. */
int vuf_dirty_log_dup(const struct vuf_conn *c, uint64_t *size);

/* A duplicate of the inflight region's fd (the caller's to close) and its
 * size, or -ENOENT when there is none. */
int vuf_inflight_dup(const struct vuf_conn *c, uint64_t *size);

/* GET_CONFIG of the whole config space (what QEMU asks after a
 * CONFIG_CHANGE_MSG). */
int vuf_get_config(struct vuf_conn *c, struct vuf_blk_config *config);

/* SET_CONFIG of size bytes at offset (QEMU's vhost_user_blk_set_config
 * sends the writeback byte: offset 32, size 1, flags 0). With REPLY_ACK a
 * refusal is -EIO; the connection stays. */
int vuf_set_config(struct vuf_conn *c, uint32_t offset, const void *data, uint32_t size, uint32_t flags);

/* One message the back-end sent on the backend-request channel within
 * timeout_ms: its request and flags (a payload is read and dropped). A
 * message that asks for a reply (NEED_REPLY) gets a u64 0, as QEMU's
 * backend_read answers. -ENOENT without a channel, -ETIMEDOUT, -ENOTCONN. */
int vuf_recv_backend(struct vuf_conn *c, uint32_t *request, uint32_t *flags, int timeout_ms);

/* Name of a front-end request ("GET_FEATURES"), or "?" for an unknown one. */
const char *vuf_request_name(uint32_t request);

/* ---------------------------------------------------------------- tool arguments */

/* "4k", "64K", "1m", "1g", "4096", with an optional "b" or "ib" -> bytes;
 * 0 for junk, a sign or an overflow. */
uint64_t vuf_parse_size(const char *s);

/* An integer (decimal, 0x hex or 0 octal) in [0, max]: 0, or -EINVAL. */
int vuf_parse_uint(const char *s, uint64_t max, uint64_t *out);

/* A number in [0, max]: 0, or -EINVAL. */
int vuf_parse_double(const char *s, double max, double *out);

#ifdef __cplusplus
}
#endif

#endif /* CVHOSTFRONTEND_H */
