/* System-call shims for the Swift control path. */
#include <errno.h>
#include <stddef.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "CDataPlaneSys.h"

#define DPS_MAX_FDS 16

static int unix_addr(const char *path, struct sockaddr_un *addr)
{
    memset(addr, 0, sizeof(*addr));
    addr->sun_family = AF_UNIX;
    size_t len = strlen(path);
    if (len == 0 || len >= sizeof(addr->sun_path))
        return -ENAMETOOLONG;
    memcpy(addr->sun_path, path, len);
    return 0;
}

int dps_unix_listen(const char *path, int backlog)
{
    return dps_unix_listen_as(path, backlog, -1, -1, -1);
}

int dps_unix_listen_as(const char *path, int backlog, int mode, int64_t uid, int64_t gid)
{
    struct sockaddr_un addr;
    int ret = unix_addr(path, &addr);
    if (ret)
        return ret;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        ret = -errno;
        close(fd);
        return ret;
    }
    /* Owner and mode are set on the path before listen(): until then a
     * connect is refused, so nobody gets in under the umask's mode. */
    ret = dps_path_permissions(path, mode, uid, gid);
    if (ret == 0 && listen(fd, backlog) < 0)
        ret = -errno;
    if (ret) {
        unlink(path);
        close(fd);
        return ret;
    }
    return fd;
}

int dps_path_permissions(const char *path, int mode, int64_t uid, int64_t gid)
{
    if (mode < 0 && uid < 0 && gid < 0)
        return 0;
    /* Through a handle on the socket itself, never by path: a symlink put
     * at the path (by anyone who can write its directory) must not make us
     * chmod or chown what it points to. */
    int fd = open(path, O_PATH | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    struct stat st;
    int ret = fstat(fd, &st) < 0 ? -errno : S_ISSOCK(st.st_mode) ? 0 : -ENOTSOCK;
    /* Owner before mode: a wider mode must not let the old group in first
     * (root, which may give a socket away, may change its mode after too). */
    if (ret == 0 && (uid >= 0 || gid >= 0) &&
        fchownat(fd, "", uid >= 0 ? (uid_t)uid : (uid_t)-1, gid >= 0 ? (gid_t)gid : (gid_t)-1, AT_EMPTY_PATH) < 0)
        ret = -errno;
    if (ret == 0 && mode >= 0) {
        char self[32];
        snprintf(self, sizeof(self), "/proc/self/fd/%d", fd);
        if (chmod(self, (mode_t)mode) < 0) /* the inode fd names, not a path lookup */
            ret = -errno;
    }
    close(fd);
    return ret;
}

int dps_socket_describe(int fd, int *type, bool *listening, char *path, size_t path_len)
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -errno;
    if (!S_ISSOCK(st.st_mode))
        return -ENOTSOCK;
    int value = 0;
    socklen_t len = sizeof(value);
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &value, &len) < 0)
        return -errno;
    *type = value;
    value = 0;
    len = sizeof(value);
    if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &value, &len) < 0)
        return -errno;
    *listening = value != 0;
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof(addr));
    len = sizeof(addr);
    if (getsockname(fd, (struct sockaddr *)&addr, &len) < 0)
        return -errno;
    if (path_len > 0)
        path[0] = 0;
    if (addr.sun_family != AF_UNIX)
        return addr.sun_family;
    size_t n = len > offsetof(struct sockaddr_un, sun_path) ? len - offsetof(struct sockaddr_un, sun_path) : 0;
    if (n > 0 && addr.sun_path[0] == 0) { /* abstract: shown as @name */
        if (path_len < n + 1)
            return -ENAMETOOLONG;
        path[0] = '@';
        memcpy(path + 1, addr.sun_path + 1, n - 1);
        path[n] = 0;
    } else if (n > 0) {
        size_t l = strnlen(addr.sun_path, n);
        if (path_len < l + 1)
            return -ENAMETOOLONG;
        memcpy(path, addr.sun_path, l);
        path[l] = 0;
    }
    return AF_UNIX;
}

int dps_notify(const char *address, const void *message, size_t len)
{
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof(addr));
    addr.sun_family = AF_UNIX;
    size_t n = strlen(address);
    if (n < 2 || n > sizeof(addr.sun_path) || (address[0] != '/' && address[0] != '@'))
        return -EAFNOSUPPORT;
    if (address[0] != '@' && n == sizeof(addr.sun_path))
        return -ENAMETOOLONG;
    memcpy(addr.sun_path, address, n);
    socklen_t addr_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n);
    if (address[0] == '@')
        addr.sun_path[0] = 0; /* the abstract namespace: no terminating NUL is part of the name */
    else
        addr_len += 1;
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -errno;
    ssize_t r = sendto(fd, message, len, MSG_NOSIGNAL, (struct sockaddr *)&addr, addr_len);
    int ret = r < 0 ? -errno : (size_t)r == len ? 0 : -EMSGSIZE;
    close(fd);
    return ret;
}

int dps_fd_claim(int fd)
{
    int flags = fcntl(fd, F_GETFD);
    if (flags < 0 || fcntl(fd, F_SETFD, flags | FD_CLOEXEC) < 0)
        return -errno;
    return dps_set_nonblocking(fd, true);
}

int dps_unix_connect(const char *path)
{
    struct sockaddr_un addr;
    int ret = unix_addr(path, &addr);
    if (ret)
        return ret;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        ret = -errno;
        close(fd);
        return ret;
    }
    return fd;
}

int dps_unix_probe(const char *path)
{
    struct sockaddr_un addr;
    int ret = unix_addr(path, &addr);
    if (ret)
        return ret;
    /* Non-blocking: a live server whose backlog is full must not hang us. */
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    ret = connect(fd, (struct sockaddr *)&addr, sizeof(addr)) == 0 ? 1 : -errno;
    close(fd);
    if (ret == -EAGAIN || ret == -EINPROGRESS)
        return 1; /* someone listens; its queue is just full */
    return ret == -ECONNREFUSED ? 0 : ret;
}

int dps_accept(int listen_fd)
{
    int fd = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

int dps_peer_pid(int fd)
{
    struct ucred cred;
    socklen_t len = sizeof(cred);
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0)
        return -errno;
    return cred.pid;
}

ssize_t dps_recv_fds(int sock, void *buf, size_t len, int *fds, int max_fds, int *nfds,
                     bool *fds_truncated)
{
    union {
        char buf[CMSG_SPACE(sizeof(int) * DPS_MAX_FDS)];
        struct cmsghdr align;
    } control;
    struct iovec iov = {.iov_base = buf, .iov_len = len};
    struct msghdr msg = {
        .msg_iov = &iov,
        .msg_iovlen = 1,
        .msg_control = control.buf,
        .msg_controllen = sizeof(control.buf),
    };
    *nfds = 0;
    *fds_truncated = false;
    ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (n < 0)
        return -errno;
    if (msg.msg_flags & MSG_CTRUNC)
        *fds_truncated = true;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        const unsigned char *data = CMSG_DATA(c);
        for (size_t i = 0; i < count; i++) {
            int fd;
            memcpy(&fd, data + i * sizeof(int), sizeof(int));
            if (*nfds < max_fds) {
                fds[(*nfds)++] = fd;
            } else {
                close(fd); /* more than the caller takes: never leak it */
                *fds_truncated = true;
            }
        }
    }
    return n;
}

ssize_t dps_send_fds(int sock, const void *buf, size_t len, const int *fds, int nfds)
{
    if (nfds < 0 || nfds > DPS_MAX_FDS)
        return -EINVAL;
    union {
        char buf[CMSG_SPACE(sizeof(int) * DPS_MAX_FDS)];
        struct cmsghdr align;
    } control;
    struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (nfds > 0) {
        memset(control.buf, 0, sizeof(control.buf));
        msg.msg_control = control.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
    }
    ssize_t n = sendmsg(sock, &msg, MSG_NOSIGNAL);
    return n < 0 ? -errno : n;
}

int dps_memfd(const char *name, uint64_t size)
{
    int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0)
        return -errno;
    /* Sealed at its size: whoever we hand it to (the frontend gets the
     * inflight region) cannot shrink it under our mapping (SIGBUS). */
    if (ftruncate(fd, (off_t)size) < 0 ||
        fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) {
        int ret = -errno;
        close(fd);
        return ret;
    }
    return fd;
}

int dps_notifier_check(int fd, bool nonblock)
{
    char path[32], target[32];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    ssize_t n = readlink(path, target, sizeof(target) - 1);
    if (n < 0) {
        int err = errno;
        if (fcntl(fd, F_GETFD) < 0)
            return -EBADF;
        /* Without /proc (some sandboxes) the kind of fd cannot be told:
         * take an open one on trust rather than refuse every frontend. */
        if (err == ENOENT && access("/proc/self/fd", F_OK) != 0)
            return nonblock ? dps_set_nonblocking(fd, true) : 0;
        return -err;
    }
    target[n] = 0;
    if (strcmp(target, "anon_inode:[eventfd]") != 0)
        return -EINVAL;
    return nonblock ? dps_set_nonblocking(fd, true) : 0;
}

int dps_eventfd(uint32_t initval, bool nonblock)
{
    int fd = eventfd(initval, EFD_CLOEXEC | (nonblock ? EFD_NONBLOCK : 0));
    return fd < 0 ? -errno : fd;
}

int dps_fd_size(int fd, uint64_t *size)
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -errno;
    *size = (uint64_t)st.st_size;
    return 0;
}

uint64_t dps_fd_map_alignment(int fd)
{
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    struct stat st;
    if (fstat(fd, &st) < 0 || st.st_blksize <= 0)
        return page;
    uint64_t block = (uint64_t)st.st_blksize;
    /* Huge pages are 2 MiB or 1 GiB; a stranger value gets the page size. */
    return block >= page && block <= (1u << 30) && !(block & (block - 1)) ? block : page;
}

int dps_set_nonblocking(int fd, bool on)
{
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0)
        return -errno;
    flags = on ? (flags | O_NONBLOCK) : (flags & ~O_NONBLOCK);
    return fcntl(fd, F_SETFL, flags) < 0 ? -errno : 0;
}

int dps_allowed_cpus(int32_t *cpus, int max_cpus)
{
    if (!cpus || max_cpus <= 0)
        return -EINVAL;
    /* Sized for max_cpus, not cpu_set_t's 1024: machines have more. */
    cpu_set_t *set = CPU_ALLOC((size_t)max_cpus);
    if (!set)
        return -ENOMEM;
    size_t size = CPU_ALLOC_SIZE((size_t)max_cpus);
    CPU_ZERO_S(size, set);
    /* The main thread's mask (its tid is the pid): the process's, whichever
     * thread asks. */
    if (sched_getaffinity(getpid(), size, set) < 0) {
        int ret = -errno;
        CPU_FREE(set);
        return ret;
    }
    int count = 0;
    for (int cpu = 0; cpu < max_cpus; cpu++)
        if (CPU_ISSET_S((size_t)cpu, size, set))
            cpus[count++] = cpu;
    CPU_FREE(set);
    return count;
}

int dps_signalfd(const sigset_t *mask)
{
    int fd = signalfd(-1, mask, SFD_CLOEXEC | SFD_NONBLOCK);
    return fd < 0 ? -errno : fd;
}

int dps_thread_set_name(const char *name)
{
    char short_name[16] = {0};
    strncpy(short_name, name, sizeof(short_name) - 1); /* the kernel keeps 15 bytes */
    return -pthread_setname_np(pthread_self(), short_name);
}
