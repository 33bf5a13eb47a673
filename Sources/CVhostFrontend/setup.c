/*
 * The handshake QEMU's vhost-user-blk does (hw/virtio/vhost-user.c,
 * hw/virtio/vhost.c, hw/block/vhost-user-blk.c), with CGuestDriver as the
 * guest: its memfd is the shared memory, its rings and eventfds the vrings.
 */
#include "vuf_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

/* Payloads, in the wire layout (vhost-user.rst "Message Specification"). */
struct vuf_state {
    uint32_t index, num;
};

struct vuf_addr {
    uint32_t index, flags;
    uint64_t desc, used, avail, log;
};

struct vuf_region {
    uint64_t gpa, size, uaddr, mmap_offset;
};

struct vuf_mem_table {
    uint32_t nregions, padding;
    struct vuf_region regions[2];
};

struct vuf_mem_reg {
    uint64_t padding;
    struct vuf_region region;
};

struct vuf_config_msg {
    uint32_t offset, size, flags;
    uint8_t data[VUF_BLK_CONFIG_SIZE];
};

/* QEMU's VhostUserInflight: 20 bytes of fields, padded to 24; libvhost-user
 * insists on sizeof() (24), so that is what goes on the wire. */
struct vuf_inflight {
    uint64_t mmap_size, mmap_offset;
    uint16_t num_queues, queue_size;
};

_Static_assert(sizeof(struct vuf_state) == 8, "vhost_vring_state is 8 bytes");
_Static_assert(sizeof(struct vuf_addr) == 40, "vhost_vring_addr is 40 bytes");
_Static_assert(sizeof(struct vuf_region) == 32, "VhostUserMemoryRegion is 32 bytes");
_Static_assert(sizeof(struct vuf_mem_reg) == 40, "VhostUserMemRegMsg is 40 bytes");
_Static_assert(sizeof(struct vuf_inflight) == 24, "VhostUserInflight is 24 bytes with its padding");
_Static_assert(offsetof(struct vuf_blk_config, num_queues) == 34 && offsetof(struct vuf_blk_config, unused1) + 3 ==
                   VUF_BLK_CONFIG_SIZE,
               "vuf_blk_config is virtio_blk_config's wire layout up to unused1 (sizeof adds tail padding)");
_Static_assert(sizeof(struct vuf_config_msg) == 12 + VUF_BLK_CONFIG_SIZE, "config header is 12 bytes");

const char *vuf_request_name(uint32_t request)
{
    switch (request) {
    case VUF_GET_FEATURES: return "GET_FEATURES";
    case VUF_SET_FEATURES: return "SET_FEATURES";
    case VUF_SET_OWNER: return "SET_OWNER";
    case VUF_RESET_OWNER: return "RESET_OWNER";
    case VUF_SET_MEM_TABLE: return "SET_MEM_TABLE";
    case VUF_SET_LOG_BASE: return "SET_LOG_BASE";
    case VUF_SET_LOG_FD: return "SET_LOG_FD";
    case VUF_SET_VRING_NUM: return "SET_VRING_NUM";
    case VUF_SET_VRING_ADDR: return "SET_VRING_ADDR";
    case VUF_SET_VRING_BASE: return "SET_VRING_BASE";
    case VUF_GET_VRING_BASE: return "GET_VRING_BASE";
    case VUF_SET_VRING_KICK: return "SET_VRING_KICK";
    case VUF_SET_VRING_CALL: return "SET_VRING_CALL";
    case VUF_SET_VRING_ERR: return "SET_VRING_ERR";
    case VUF_GET_PROTOCOL_FEATURES: return "GET_PROTOCOL_FEATURES";
    case VUF_SET_PROTOCOL_FEATURES: return "SET_PROTOCOL_FEATURES";
    case VUF_GET_QUEUE_NUM: return "GET_QUEUE_NUM";
    case VUF_SET_VRING_ENABLE: return "SET_VRING_ENABLE";
    case VUF_GET_CONFIG: return "GET_CONFIG";
    case VUF_SET_CONFIG: return "SET_CONFIG";
    case VUF_GET_INFLIGHT_FD: return "GET_INFLIGHT_FD";
    case VUF_SET_INFLIGHT_FD: return "SET_INFLIGHT_FD";
    case VUF_RESET_DEVICE: return "RESET_DEVICE";
    case VUF_GET_MAX_MEM_SLOTS: return "GET_MAX_MEM_SLOTS";
    case VUF_ADD_MEM_REG: return "ADD_MEM_REG";
    case VUF_REM_MEM_REG: return "REM_MEM_REG";
    case VUF_SET_STATUS: return "SET_STATUS";
    case VUF_GET_STATUS: return "GET_STATUS";
    case VUF_SET_BACKEND_REQ_FD: return "SET_BACKEND_REQ_FD";
    default: return "?";
    }
}

/* Receives the reply to req and checks its header: same request, REPLY set,
 * version 1, and exactly want bytes (want_fds descriptors at most go to
 * reply_fd; others are closed). */
static int get_reply(struct vuf_conn *c, uint32_t req, void *reply, uint32_t want, int *reply_fd)
{
    uint32_t rreq, rflags, rsize;
    int fds[VUF_MAX_FDS], nfds = 0;
    uint8_t buf[256];
    int rc = vuf_recv(c, &rreq, &rflags, buf, sizeof(buf), &rsize, fds, &nfds, c->timeout_ms);
    if (rc < 0)
        return _vuf_wrap(c, rc, "%s: waiting for the reply", vuf_request_name(req));
    if (reply_fd && nfds > 0)
        *reply_fd = fds[0];
    for (int i = reply_fd ? 1 : 0; i < nfds; i++)
        close(fds[i]);

    if (rreq != req)
        rc = _vuf_fail(c, -EPROTO, "%s: the reply is for request %u (%s)", vuf_request_name(req), rreq,
                       vuf_request_name(rreq));
    else if ((rflags & 3) != VUF_FLAG_VERSION || !(rflags & VUF_FLAG_REPLY))
        rc = _vuf_fail(c, -EPROTO, "%s: reply flags 0x%x (want version 1 and REPLY)", vuf_request_name(req), rflags);
    else if (req == VUF_GET_CONFIG && rsize == 0)
        rc = _vuf_fail(c, -EIO, "GET_CONFIG: the back-end answered with an empty payload (its way of failing)");
    else if (rsize != want)
        rc = _vuf_fail(c, -EPROTO, "%s: reply payload of %u bytes (want %u)", vuf_request_name(req), rsize, want);
    if (rc < 0) {
        if (reply_fd && nfds > 0) {
            close(*reply_fd);
            *reply_fd = -1;
        }
        return rc;
    }
    memcpy(reply, buf, want);
    return 0;
}

/* Sends a request and waits for its reply, or, for a request without one
 * when REPLY_ACK is on, for its ack (non-zero: -EIO). */
static int call(struct vuf_conn *c, uint32_t req, const void *payload, uint32_t size, const int *fds, int nfds,
                void *reply, uint32_t reply_size, int *reply_fd)
{
    bool ack = !reply && c->reply_ack;
    int rc = vuf_send(c, req, VUF_FLAG_VERSION | (ack ? VUF_FLAG_NEED_REPLY : 0), payload, size, fds, nfds);
    if (rc < 0)
        return _vuf_wrap(c, rc, "%s", vuf_request_name(req));
    if (reply)
        return get_reply(c, req, reply, reply_size, reply_fd);
    if (!ack)
        return 0;
    uint64_t v;
    rc = get_reply(c, req, &v, sizeof(v), NULL);
    if (rc < 0)
        return rc;
    if (v != 0)
        return _vuf_fail(c, -EIO, "%s: the back-end refused it (REPLY_ACK %llu)", vuf_request_name(req),
                         (unsigned long long)v);
    return 0;
}

static int call_u64(struct vuf_conn *c, uint32_t req, uint64_t v)
{
    return call(c, req, &v, sizeof(v), NULL, 0, NULL, 0, NULL);
}

static int get_u64(struct vuf_conn *c, uint32_t req, uint64_t *v)
{
    return call(c, req, NULL, 0, NULL, 0, v, sizeof(*v), NULL);
}

static int call_state(struct vuf_conn *c, uint32_t req, uint32_t index, uint32_t num)
{
    struct vuf_state s = { index, num };
    return call(c, req, &s, sizeof(s), NULL, 0, NULL, 0, NULL);
}

static bool has(uint64_t set, int bit) { return set & (1ull << bit); }

/* SET_LOG_BASE with a zeroed memfd of log_bytes, kept until vuf_close. */
static int set_log_base(struct vuf_conn *c, uint64_t log_bytes)
{
    if (!log_bytes || c->log_fd >= 0)
        return _vuf_fail(c, -EINVAL, "SET_LOG_BASE: %s", log_bytes ? "a dirty log is already set" : "an empty log");
    int fd = memfd_create("vuf-dirty-log", MFD_CLOEXEC);
    if (fd < 0)
        return _vuf_fail(c, -errno, "memfd for the dirty log: %s", strerror(errno));
    if (ftruncate(fd, (off_t)log_bytes) < 0) {
        int err = errno;
        close(fd);
        return _vuf_fail(c, -err, "sizing the dirty log to %llu bytes: %s", (unsigned long long)log_bytes, strerror(err));
    }
    c->log_fd = fd;
    c->log_size = log_bytes;
    /* QEMU's vhost_user_set_log_base: {size, offset}, the fd, and (with
     * LOG_SHMFD) a u64 reply it waits for. */
    uint64_t log[2] = { log_bytes, 0 }, reply;
    return call(c, VUF_SET_LOG_BASE, log, sizeof(log), &fd, 1, &reply, sizeof(reply), NULL);
}

/* ---------------------------------------------------------------- steps */

static int negotiate_features(struct vuf_conn *c, struct gd_driver *d, const struct vuf_options *o,
                              struct vuf_info *info)
{
    struct dp_queue_config qc;
    gd_queue_config(d, 0, &qc);
    uint64_t want = 1ull << VUF_F_VERSION_1 | 1ull << VUF_F_PROTOCOL_FEATURES | 1ull << VUF_F_RING_INDIRECT_DESC |
                    1ull << VUF_F_BLK_SEG_MAX | 1ull << VUF_F_BLK_BLK_SIZE | 1ull << VUF_F_BLK_FLUSH |
                    1ull << VUF_F_BLK_TOPOLOGY | 1ull << VUF_F_BLK_MQ | 1ull << VUF_F_BLK_DISCARD |
                    1ull << VUF_F_BLK_WRITE_ZEROES | 1ull << VUF_F_BLK_RO;
    if (qc.event_idx)
        want |= 1ull << VUF_F_RING_EVENT_IDX;
    if (o->config_wce)
        want |= 1ull << VUF_F_BLK_CONFIG_WCE;
    if (gd_is_packed(d))
        want |= 1ull << VUF_F_RING_PACKED;
    if (!has(info->features_offered, VUF_F_VERSION_1))
        return _vuf_fail(c, -ENOTSUP, "GET_FEATURES: the back-end does not offer VIRTIO_F_VERSION_1 (0x%llx)",
                         (unsigned long long)info->features_offered);
    if (qc.event_idx && !has(info->features_offered, VUF_F_RING_EVENT_IDX))
        return _vuf_fail(c, -ENOTSUP, "GET_FEATURES: the driver uses EVENT_IDX and the back-end does not offer it");
    if (gd_is_packed(d) && !has(info->features_offered, VUF_F_RING_PACKED))
        return _vuf_fail(c, -ENOTSUP, "GET_FEATURES: the driver uses packed rings and the back-end does not offer "
                                      "VIRTIO_F_RING_PACKED");
    info->features = info->features_offered & want;
    return 0;
}

static int negotiate_protocol(struct vuf_conn *c, const struct vuf_options *o, struct vuf_info *info)
{
    int rc = get_u64(c, VUF_GET_PROTOCOL_FEATURES, &info->protocol_offered);
    if (rc < 0)
        return rc;
    /* LOG_SHMFD, as QEMU: a test may start dirty logging (SET_LOG_BASE) itself. */
    uint64_t want = 1ull << VUF_PF_MQ | 1ull << VUF_PF_LOG_SHMFD | 1ull << VUF_PF_CONFIG | 1ull << VUF_PF_CONFIGURE_MEM_SLOTS;
    if (!o->no_reply_ack)
        want |= 1ull << VUF_PF_REPLY_ACK;
    if (o->inflight)
        want |= 1ull << VUF_PF_INFLIGHT_SHMFD;
    if (o->backend_req)
        want |= 1ull << VUF_PF_BACKEND_REQ;
    info->protocol = info->protocol_offered & want;
    /* As QEMU: SET_PROTOCOL_FEATURES itself asks for no ack; REPLY_ACK
     * applies from the next message on. */
    rc = call_u64(c, VUF_SET_PROTOCOL_FEATURES, info->protocol);
    if (rc < 0)
        return rc;
    c->reply_ack = has(info->protocol, VUF_PF_REPLY_ACK);
    return 0;
}

static int set_features(struct vuf_conn *c, struct vuf_info *info)
{
    return call_u64(c, VUF_SET_FEATURES, info->features);
}

static int get_config(struct vuf_conn *c, struct vuf_info *info)
{
    struct vuf_config_msg m = { .offset = 0, .size = VUF_BLK_CONFIG_SIZE, .flags = 0 };
    struct vuf_config_msg r;
    int rc = call(c, VUF_GET_CONFIG, &m, sizeof(m), NULL, 0, &r, sizeof(r), NULL);
    if (rc < 0)
        return rc;
    if (r.offset != 0 || r.size != VUF_BLK_CONFIG_SIZE)
        return _vuf_fail(c, -EPROTO, "GET_CONFIG: reply for offset %u size %u (asked 0, %u)", r.offset, r.size,
                         VUF_BLK_CONFIG_SIZE);
    memcpy(&info->config, r.data, VUF_BLK_CONFIG_SIZE);
    info->has_config = true;
    return 0;
}

/* QEMU's vhost_setup_backend_channel: a socketpair, one end to the back-end. */
static int setup_backend_channel(struct vuf_conn *c)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
        return _vuf_fail(c, -errno, "socketpair for the backend channel: %s", strerror(errno));
    int rc = call(c, VUF_SET_BACKEND_REQ_FD, NULL, 0, &sv[1], 1, NULL, 0, NULL);
    close(sv[1]);
    if (rc < 0) {
        close(sv[0]);
        return rc;
    }
    if (c->backend_fd >= 0)
        close(c->backend_fd);
    c->backend_fd = sv[0];
    return 0;
}

int vuf_get_config(struct vuf_conn *c, struct vuf_blk_config *config)
{
    struct vuf_info info;
    int rc = get_config(c, &info);
    if (rc == 0 && config)
        *config = info.config;
    return rc;
}

int vuf_set_config(struct vuf_conn *c, uint32_t offset, const void *data, uint32_t size, uint32_t flags)
{
    struct vuf_config_msg m = { .offset = offset, .size = size, .flags = flags };
    if (size > sizeof(m.data))
        return _vuf_fail(c, -EINVAL, "SET_CONFIG: %u bytes (at most %zu)", size, sizeof(m.data));
    if (size)
        memcpy(m.data, data, size);
    return call(c, VUF_SET_CONFIG, &m, 12 + size, NULL, 0, NULL, 0, NULL);
}

int vuf_recv_backend(struct vuf_conn *c, uint32_t *request, uint32_t *flags, int timeout_ms)
{
    if (c->backend_fd < 0)
        return _vuf_fail(c, -ENOENT, "no backend channel (BACKEND_REQ was not negotiated)");
    /* The backend channel is a vuf_conn of its own for vuf_recv. */
    struct vuf_conn ch = { .fd = c->backend_fd, .inflight_fd = -1, .log_fd = -1, .backend_fd = -1 };
    uint32_t req, fl, size;
    uint8_t payload[256];
    int rc = vuf_recv(&ch, &req, &fl, payload, sizeof(payload), &size, NULL, NULL, timeout_ms);
    if (rc < 0 && rc != -EMSGSIZE)
        return _vuf_fail(c, rc, "backend channel: %s", ch.err);
    if (fl & VUF_FLAG_NEED_REPLY) {
        uint64_t zero = 0;
        int src = vuf_send(&ch, req, VUF_FLAG_VERSION | VUF_FLAG_REPLY, &zero, sizeof(zero), NULL, 0);
        if (src < 0)
            return _vuf_fail(c, src, "backend channel reply: %s", ch.err);
    }
    if (request)
        *request = req;
    if (flags)
        *flags = fl;
    return 0;
}

static int setup_inflight(struct vuf_conn *c, struct gd_driver *d, uint32_t nq, const struct vuf_options *o,
                          struct vuf_info *info)
{
    struct dp_queue_config qc;
    gd_queue_config(d, 0, &qc);
    if (qc.size > UINT16_MAX)
        return _vuf_fail(c, -EINVAL, "GET_INFLIGHT_FD: queue size %u does not fit its 16-bit field", qc.size);
    struct vuf_inflight m = { .num_queues = (uint16_t)nq, .queue_size = (uint16_t)qc.size };
    struct vuf_inflight r;
    int fd = -1;
    if (o->reuse_inflight) {
        fd = fcntl(o->inflight_fd, F_DUPFD_CLOEXEC, 0);
        if (fd < 0)
            return _vuf_fail(c, -errno, "dup of the inflight fd");
        if (c->inflight_fd >= 0)
            close(c->inflight_fd);
        c->inflight_fd = fd;
        c->inflight_size = o->inflight_size;
        info->inflight_size = o->inflight_size;
        struct vuf_inflight s = { .mmap_size = o->inflight_size, .num_queues = (uint16_t)nq,
                                  .queue_size = (uint16_t)qc.size };
        return call(c, VUF_SET_INFLIGHT_FD, &s, sizeof(s), &fd, 1, NULL, 0, NULL);
    }
    int rc = call(c, VUF_GET_INFLIGHT_FD, &m, sizeof(m), NULL, 0, &r, sizeof(r), &fd);
    if (rc < 0)
        return rc;
    if (fd < 0)
        return _vuf_fail(c, -EPROTO, "GET_INFLIGHT_FD: the reply carries no file descriptor");
    if (r.mmap_size == 0) {
        close(fd);
        return _vuf_fail(c, -EIO, "GET_INFLIGHT_FD: the back-end returned an empty region (its way of failing)");
    }
    if (c->inflight_fd >= 0)
        close(c->inflight_fd);
    c->inflight_fd = fd;
    c->inflight_size = r.mmap_size;
    info->inflight_size = r.mmap_size;
    /* Hand the region back as QEMU does, with what the back-end said. */
    struct vuf_inflight s = { .mmap_size = r.mmap_size, .mmap_offset = r.mmap_offset,
                              .num_queues = (uint16_t)nq, .queue_size = (uint16_t)qc.size };
    return call(c, VUF_SET_INFLIGHT_FD, &s, sizeof(s), &fd, 1, NULL, 0, NULL);
}

static int set_memory(struct vuf_conn *c, struct gd_driver *d, const struct vuf_options *o, struct vuf_info *info)
{
    uint64_t size = gd_mem_size(d), half = gd_region_boundary(d);
    /* The driver's own view is one contiguous mapping of the memfd; GPA 0 is
     * its start (page 0 is never allocated, but it is mapped). */
    uint64_t base = (uint64_t)(uintptr_t)gd_ptr(d, 0);
    int memfd = gd_memfd(d);
    struct vuf_mem_table t = { .nregions = o->two_regions ? 2 : 1 };
    if (o->two_regions) {
        t.regions[0] = (struct vuf_region){ 0, half, base, 0 };
        t.regions[1] = (struct vuf_region){ half, size - half, base + half, half };
    } else {
        t.regions[0] = (struct vuf_region){ 0, size, base, 0 };
    }

    if (o->add_mem_reg && has(info->protocol, VUF_PF_CONFIGURE_MEM_SLOTS)) {
        if (info->max_mem_slots < t.nregions)
            return _vuf_fail(c, -ENOTSUP, "GET_MAX_MEM_SLOTS: %llu slots, %u regions needed",
                             (unsigned long long)info->max_mem_slots, t.nregions);
        for (uint32_t i = 0; i < t.nregions; i++) {
            struct vuf_mem_reg m = { .region = t.regions[i] };
            int rc = call(c, VUF_ADD_MEM_REG, &m, sizeof(m), &memfd, 1, NULL, 0, NULL);
            if (rc < 0)
                return rc;
        }
        return 0;
    }
    int fds[2] = { memfd, memfd };
    return call(c, VUF_SET_MEM_TABLE, &t, 8 + 32 * t.nregions, fds, (int)t.nregions, NULL, 0, NULL);
}

static int setup_queue(struct vuf_conn *c, struct gd_driver *d, uint32_t q)
{
    struct dp_queue_config qc;
    gd_queue_config(d, q, &qc);
    uint64_t base = (uint64_t)(uintptr_t)gd_ptr(d, 0);
    int rc = call_state(c, VUF_SET_VRING_NUM, q, qc.size);
    /* Where the device resumes: the used index, 0 on a fresh driver (QEMU
     * restarts a ring from there after a back-end went away); packed rings
     * add the wrap counters (gd_vring_base). */
    if (rc == 0)
        rc = call_state(c, VUF_SET_VRING_BASE, q, gd_vring_base(d, q));
    if (rc == 0) {
        struct vuf_addr a = { .index = q, .flags = 0, .desc = base + qc.desc_addr, .used = base + qc.used_addr,
                              .avail = base + qc.avail_addr, .log = 0 };
        rc = call(c, VUF_SET_VRING_ADDR, &a, sizeof(a), NULL, 0, NULL, 0, NULL);
    }
    if (rc == 0) {
        uint64_t v = q;
        int fd = qc.kick_fd;
        rc = call(c, VUF_SET_VRING_KICK, &v, sizeof(v), &fd, 1, NULL, 0, NULL);
    }
    if (rc == 0) {
        uint64_t v = q;
        int fd = qc.call_fd;
        rc = call(c, VUF_SET_VRING_CALL, &v, sizeof(v), &fd, 1, NULL, 0, NULL);
    }
    return rc < 0 ? _vuf_wrap(c, rc, "queue %u", q) : 0;
}

int vuf_setup(struct vuf_conn *c, struct gd_driver *d, const struct vuf_options *opts, struct vuf_info *info_out)
{
    if (!c || !d)
        return -EINVAL;
    static const struct vuf_options defaults;
    const struct vuf_options *o = opts ? opts : &defaults;
    struct vuf_info info = { 0 };
    c->err[0] = 0;
    c->reply_ack = false;
    c->timeout_ms = o->timeout_ms > 0 ? o->timeout_ms : VUF_DEFAULT_TIMEOUT_MS;

    struct dp_queue_config qc;
    uint32_t nq = o->num_queues;
    if (nq == 0)
        while (gd_queue_config(d, nq, &qc), qc.size)
            nq++;
    gd_queue_config(d, nq - 1, &qc);
    if (nq == 0 || !qc.size || nq > 256)
        return _vuf_fail(c, -EINVAL, "setup: %u queues, the driver has fewer (or vring indices run out)", nq);

    int rc = get_u64(c, VUF_GET_FEATURES, &info.features_offered);
    if (rc == 0)
        rc = negotiate_features(c, d, o, &info);
    c->packed = has(info.features, VUF_F_RING_PACKED);
    if (rc == 0 && o->features_early)
        rc = set_features(c, &info);
    bool protocol = has(info.features, VUF_F_PROTOCOL_FEATURES);
    if (rc == 0 && protocol)
        rc = negotiate_protocol(c, o, &info);
    if (rc == 0 && has(info.protocol, VUF_PF_MQ)) {
        rc = get_u64(c, VUF_GET_QUEUE_NUM, &info.queue_num);
        if (rc == 0 && info.queue_num < nq)
            rc = _vuf_fail(c, -ENOTSUP, "GET_QUEUE_NUM: the back-end has %llu queues, %u wanted",
                           (unsigned long long)info.queue_num, nq);
    }
    if (rc == 0 && nq > 1 && (!has(info.protocol, VUF_PF_MQ) || !has(info.features, VUF_F_BLK_MQ)))
        rc = _vuf_fail(c, -ENOTSUP, "setup: %u queues need VIRTIO_BLK_F_MQ and the MQ protocol feature", nq);
    if (rc == 0 && has(info.protocol, VUF_PF_CONFIGURE_MEM_SLOTS))
        rc = get_u64(c, VUF_GET_MAX_MEM_SLOTS, &info.max_mem_slots);
    if (rc == 0 && has(info.protocol, VUF_PF_BACKEND_REQ))
        rc = setup_backend_channel(c);
    if (rc == 0)
        rc = call(c, VUF_SET_OWNER, NULL, 0, NULL, 0, NULL, 0, NULL);
    if (rc == 0 && has(info.protocol, VUF_PF_CONFIG))
        rc = get_config(c, &info);
    /* QEMU's vhost_dev_prepare_inflight: the features go first, since the
     * back-end lays the inflight region out for the ring layout they name. */
    if (rc == 0 && has(info.protocol, VUF_PF_INFLIGHT_SHMFD) && !o->features_early)
        rc = set_features(c, &info);
    if (rc == 0 && has(info.protocol, VUF_PF_INFLIGHT_SHMFD))
        rc = setup_inflight(c, d, nq, o, &info);
    /* A device started while a migration runs (QEMU's vhost_dev_start with
     * log_enabled): LOG_ALL in SET_FEATURES, the log after the rings. */
    if (o->dirty_log_bytes && has(info.features_offered, VUF_F_LOG_ALL))
        info.features |= 1ull << VUF_F_LOG_ALL;
    if (rc == 0 && !o->features_early)
        rc = set_features(c, &info);
    if (rc == 0)
        rc = set_memory(c, d, o, &info);
    for (uint32_t q = 0; rc == 0 && q < nq; q++)
        rc = setup_queue(c, d, q);
    if (rc == 0 && o->dirty_log_bytes)
        rc = set_log_base(c, o->dirty_log_bytes);
    /* Without PROTOCOL_FEATURES rings start enabled (vhost-user.rst "Ring states"). */
    for (uint32_t q = 0; rc == 0 && protocol && q < nq; q++)
        rc = call_state(c, VUF_SET_VRING_ENABLE, q, 1);

    if (info_out)
        *info_out = info;
    return rc;
}

int vuf_stop_queue(struct vuf_conn *c, uint32_t q, uint32_t *base)
{
    if (!c)
        return -EINVAL;
    struct vuf_state s = { q, 0 }, r;
    int rc = call(c, VUF_GET_VRING_BASE, &s, sizeof(s), NULL, 0, &r, sizeof(r), NULL);
    if (rc < 0)
        return rc;
    if (r.index != q || (r.num > UINT16_MAX && !c->packed))
        return _vuf_fail(c, -EPROTO, "GET_VRING_BASE: reply {index %u, num %u} for queue %u", r.index, r.num, q);
    if (base)
        *base = r.num;
    return 0;
}

int vuf_start_dirty_log(struct vuf_conn *c, uint64_t features, uint64_t log_bytes)
{
    if (!c)
        return -EINVAL;
    int rc = set_log_base(c, log_bytes);
    if (rc == 0)
        rc = call_u64(c, VUF_SET_FEATURES, features | 1ull << VUF_F_LOG_ALL);
    return rc;
}

/* A duplicate of a region's memfd (-ENOENT without one) and its size. */
static int dup_region(int region_fd, uint64_t region_size, uint64_t *size)
{
    if (region_fd < 0)
        return -ENOENT;
    int fd = fcntl(region_fd, F_DUPFD_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    if (size)
        *size = region_size;
    return fd;
}

int vuf_dirty_log_dup(const struct vuf_conn *c, uint64_t *size)
{
    return dup_region(c->log_fd, c->log_size, size);
}

int vuf_inflight_dup(const struct vuf_conn *c, uint64_t *size)
{
    return dup_region(c->inflight_fd, c->inflight_size, size);
}
