/*
 * The connection: unix socket, raw messages with SCM_RIGHTS, errors.
 * libc's -1/errno becomes -errno here, at the syscall edge, and a peer that
 * went away becomes -ENOTCONN whichever way it showed.
 */
#include "vuf_internal.h"

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

int _vuf_fail(struct vuf_conn *c, int rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(c->err, sizeof(c->err), fmt, ap);
    va_end(ap);
    if (n >= 0 && (size_t)n < sizeof(c->err) - 4 && rc < 0)
        snprintf(c->err + n, sizeof(c->err) - (size_t)n, " (%s)", strerror(-rc));
    return rc;
}

int _vuf_wrap(struct vuf_conn *c, int rc, const char *fmt, ...)
{
    char inner[VUF_ERR_LEN];
    snprintf(inner, sizeof(inner), "%s", c->err);
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(c->err, sizeof(c->err), fmt, ap);
    va_end(ap);
    /* Append ": inner", truncated to fit (by hand: gcc flags the intended
     * truncation of a snprintf here). */
    size_t at = n < 0 ? 0 : (size_t)n < sizeof(c->err) ? (size_t)n : sizeof(c->err) - 1;
    size_t room = sizeof(c->err) - 1 - at, k = strlen(inner);
    if (room >= 2) {
        memcpy(c->err + at, ": ", 2);
        at += 2;
        room -= 2;
        memcpy(c->err + at, inner, k < room ? k : room);
        at += k < room ? k : room;
    }
    c->err[at] = 0;
    return rc;
}

/* EPIPE, ECONNRESET and EOF all mean the peer closed: one code for them. */
static int peer_errno(int err)
{
    return err == EPIPE || err == ECONNRESET ? -ENOTCONN : -err;
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Milliseconds left until deadline (-1: none), for poll(). */
static int left_ms(int64_t deadline)
{
    if (deadline < 0)
        return -1;
    int64_t left = deadline - now_ms();
    return left <= 0 ? 0 : left > 1000000000 ? 1000000000 : (int)left;
}

int vuf_connect(const char *socket_path, struct vuf_conn **out)
{
    if (!socket_path || !out)
        return -EINVAL;
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    size_t len = strlen(socket_path);
    if (len == 0)
        return -EINVAL;
    if (len >= sizeof(addr.sun_path))
        return -ENAMETOOLONG;
    memcpy(addr.sun_path, socket_path, len + 1);

    struct vuf_conn *c = calloc(1, sizeof(*c));
    if (!c)
        return -ENOMEM;
    c->inflight_fd = -1;
    c->log_fd = -1;
    c->backend_fd = -1;
    c->timeout_ms = VUF_DEFAULT_TIMEOUT_MS;
    c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        int rc = -errno;
        free(c);
        return rc;
    }
    int rc;
    do
        rc = connect(c->fd, (const struct sockaddr *)&addr, sizeof(addr));
    while (rc < 0 && errno == EINTR);
    if (rc < 0) {
        rc = -errno;
        close(c->fd);
        free(c);
        return rc;
    }
    *out = c;
    return 0;
}

void vuf_close(struct vuf_conn *c)
{
    if (!c)
        return;
    if (c->fd >= 0)
        close(c->fd);
    if (c->inflight_fd >= 0)
        close(c->inflight_fd);
    if (c->log_fd >= 0)
        close(c->log_fd);
    if (c->backend_fd >= 0)
        close(c->backend_fd);
    free(c);
}

int vuf_fd(const struct vuf_conn *c) { return c ? c->fd : -EINVAL; }

const char *vuf_last_error(const struct vuf_conn *c) { return c ? c->err : "no connection"; }

/* ---------------------------------------------------------------- sending */

/* sendmsg until every byte of iov is out, fds on the first chunk. MSG_NOSIGNAL:
 * a closed peer is -ENOTCONN, not SIGPIPE. */
static int send_iov(struct vuf_conn *c, struct iovec *iov, int iovcnt, const int *fds, int nfds)
{
    union {
        char buf[CMSG_SPACE(sizeof(int) * VUF_MAX_SEND_FDS)];
        struct cmsghdr align;
    } ctl;
    if (nfds < 0 || nfds > VUF_MAX_SEND_FDS || (nfds && !fds))
        return _vuf_fail(c, -EINVAL, "send: %d file descriptors (at most %d)", nfds, VUF_MAX_SEND_FDS);
    size_t total = 0;
    for (int i = 0; i < iovcnt; i++)
        total += iov[i].iov_len;
    if (total == 0 && nfds)
        return _vuf_fail(c, -EINVAL, "send: file descriptors need at least one byte to ride on");

    bool first = true;
    while (total) {
        struct msghdr msg = { .msg_iov = iov, .msg_iovlen = (size_t)iovcnt };
        if (first && nfds) {
            memset(&ctl, 0, sizeof(ctl));
            msg.msg_control = ctl.buf;
            msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
            struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
            cm->cmsg_level = SOL_SOCKET;
            cm->cmsg_type = SCM_RIGHTS;
            cm->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
            memcpy(CMSG_DATA(cm), fds, sizeof(int) * (size_t)nfds);
        }
        ssize_t n = sendmsg(c->fd, &msg, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            int rc = peer_errno(errno);
            return _vuf_fail(c, rc, rc == -ENOTCONN ? "send: the back-end closed the connection" : "send");
        }
        first = false;
        total -= (size_t)n;
        while (n > 0 && iovcnt > 0) { /* skip what went out */
            size_t k = (size_t)n < iov->iov_len ? (size_t)n : iov->iov_len;
            iov->iov_base = (char *)iov->iov_base + k;
            iov->iov_len -= k;
            n -= (ssize_t)k;
            if (iov->iov_len == 0) {
                iov++;
                iovcnt--;
            }
        }
    }
    return 0;
}

int vuf_send(struct vuf_conn *c, uint32_t request, uint32_t flags, const void *payload, uint32_t size,
             const int *fds, int nfds)
{
    if (!c || (size && !payload))
        return -EINVAL;
    uint32_t hdr[3] = { request, flags, size };
    struct iovec iov[2] = { { hdr, sizeof(hdr) }, { (void *)payload, size } };
    return send_iov(c, iov, size ? 2 : 1, fds, nfds);
}

int vuf_send_raw(struct vuf_conn *c, const void *bytes, size_t len, const int *fds, int nfds)
{
    if (!c || (len && !bytes))
        return -EINVAL;
    struct iovec iov = { (void *)bytes, len };
    return send_iov(c, &iov, 1, fds, nfds);
}

/* ---------------------------------------------------------------- receiving */

/* Reads exactly len bytes by the deadline, collecting SCM_RIGHTS fds into
 * fds[*nfds..VUF_MAX_FDS) (extra ones, or all when fds is NULL, are closed). */
static int recv_exact(struct vuf_conn *c, void *buf, size_t len, int *fds, int *nfds, int64_t deadline)
{
    union {
        char buf[CMSG_SPACE(sizeof(int) * VUF_MAX_SEND_FDS)];
        struct cmsghdr align;
    } ctl;
    size_t got = 0;
    while (got < len) {
        struct pollfd p = { .fd = c->fd, .events = POLLIN };
        int pr = poll(&p, 1, left_ms(deadline));
        if (pr < 0 && errno == EINTR)
            continue;
        if (pr < 0)
            return -errno;
        if (pr == 0)
            return -ETIMEDOUT;

        struct iovec iov = { (char *)buf + got, len - got };
        struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
                              .msg_controllen = sizeof(ctl.buf) };
        ssize_t n = recvmsg(c->fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            return peer_errno(errno);
        }
        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
            if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
                continue;
            size_t k = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (size_t i = 0; i < k; i++) {
                int fd;
                memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
                if (fds && nfds && *nfds < VUF_MAX_FDS)
                    fds[(*nfds)++] = fd;
                else
                    close(fd);
            }
        }
        if (n == 0)
            return -ENOTCONN;
        got += (size_t)n;
    }
    return 0;
}

int vuf_recv(struct vuf_conn *c, uint32_t *request, uint32_t *flags, void *payload, uint32_t max,
             uint32_t *size, int *fds, int *nfds, int timeout_ms)
{
    if (!c || (max && !payload))
        return -EINVAL;
    int64_t deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
    int count = 0;
    uint32_t hdr[3];
    int rc = recv_exact(c, hdr, sizeof(hdr), fds, &count, deadline);
    if (rc == 0) {
        if (request)
            *request = hdr[0];
        if (flags)
            *flags = hdr[1];
        if (size)
            *size = hdr[2];
        uint32_t want = hdr[2] < max ? hdr[2] : max;
        if (hdr[2] > max && hdr[2] - max > VUF_DRAIN_MAX) {
            rc = _vuf_fail(c, -EPROTO, "recv: %s reply announces a %u-byte payload", vuf_request_name(hdr[0]),
                           hdr[2]);
        } else {
            rc = recv_exact(c, payload, want, fds, &count, deadline);
            for (uint32_t left = hdr[2] - want; rc == 0 && left;) { /* drop what does not fit */
                char sink[4096];
                uint32_t k = left < sizeof(sink) ? left : (uint32_t)sizeof(sink);
                rc = recv_exact(c, sink, k, fds, &count, deadline);
                left -= k;
            }
            if (rc == 0 && hdr[2] > max)
                rc = _vuf_fail(c, -EMSGSIZE, "recv: %s payload of %u bytes (room for %u)",
                               vuf_request_name(hdr[0]), hdr[2], max);
        }
    }
    if (rc == -ENOTCONN)
        _vuf_fail(c, rc, "recv: the back-end closed the connection");
    else if (rc == -ETIMEDOUT)
        _vuf_fail(c, rc, "recv: no complete message within %d ms", timeout_ms);
    else if (rc < 0 && rc != -EPROTO && rc != -EMSGSIZE)
        _vuf_fail(c, rc, "recv");
    if (nfds)
        *nfds = count;
    else
        for (int i = 0; fds && i < count; i++)
            close(fds[i]);
    return rc;
}

int vuf_is_closed(struct vuf_conn *c, int timeout_ms)
{
    if (!c)
        return -EINVAL;
    int64_t deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
    for (;;) {
        /* POLLRDHUP only: pending data must not end the wait. POLLHUP and
         * POLLERR are reported whatever we ask for. */
        struct pollfd p = { .fd = c->fd, .events = POLLRDHUP };
        int n = poll(&p, 1, left_ms(deadline));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        return n > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) ? 1 : 0;
    }
}
