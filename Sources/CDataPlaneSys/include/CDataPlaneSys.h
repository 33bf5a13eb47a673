/*
 * CDataPlaneSys: the few system calls the Swift control path needs that
 * Swift cannot import (CMSG_* macros, sockaddr_un, memfd, eventfd). Each
 * returns a non-negative value on success and a negative errno on failure.
 */
#ifndef CDATAPLANESYS_H
#define CDATAPLANESYS_H

#include <stdbool.h>
#include <stddef.h>
#include <signal.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A listening unix stream socket at path (non-blocking, close-on-exec).
 * -EADDRINUSE when something is already bound there. */
int dps_unix_listen(const char *path, int backlog);
/* dps_unix_listen, with the socket's path given an owner, group and mode
 * (each -1: left as bind made it) before listen(), so that no connection is
 * accepted under the umask's mode. Fails (path removed) if they cannot be set. */
int dps_unix_listen_as(const char *path, int backlog, int mode, int64_t uid, int64_t gid);
/* lchown/chmod of a path (each -1: left as it is). */
int dps_path_permissions(const char *path, int mode, int64_t uid, int64_t gid);
/* A non-blocking, close-on-exec signalfd for the signals in mask (block them first). */
int dps_signalfd(const sigset_t *mask);
/* What an inherited fd is: returns its address family (-ENOTSOCK if it is
 * not a socket), its SO_TYPE in *type, whether it listens, and for AF_UNIX
 * the address it is bound to in path ("" unbound, "@name" abstract). */
int dps_socket_describe(int fd, int *type, bool *listening, char *path, size_t path_len);
/* Sends one datagram to a unix socket address: "/path", or "@name" in the
 * abstract namespace (systemd's NOTIFY_SOCKET). -EAFNOSUPPORT for any other
 * form. Never blocks: a receiver whose queue is full gives -EAGAIN. */
int dps_notify(const char *address, const void *message, size_t len);
/* Takes over an inherited fd: close-on-exec and non-blocking. */
int dps_fd_claim(int fd);
/* A connected unix stream socket (blocking, close-on-exec). */
int dps_unix_connect(const char *path);
/* Whether a process listens on the unix socket at path: 1 if one does (even
 * with a full backlog), 0 if the socket is stale (ECONNREFUSED), -errno when
 * that cannot be told (-ENOENT: nothing there). Never blocks. */
int dps_unix_probe(const char *path);
/* accept4(non-blocking, close-on-exec). */
int dps_accept(int listen_fd);

/* The pid of a unix socket's peer (SO_PEERCRED), or -errno. */
int dps_peer_pid(int fd);

/* recvmsg with SCM_RIGHTS: up to max_fds descriptors land in fds (close-on-exec),
 * their count in *nfds. *fds_truncated is set when the sender passed more than
 * fit (those are closed by the kernel). Returns bytes read (0 at EOF). */
ssize_t dps_recv_fds(int sock, void *buf, size_t len, int *fds, int max_fds, int *nfds,
                     bool *fds_truncated);
/* sendmsg with nfds descriptors (0..8). Returns bytes sent. */
ssize_t dps_send_fds(int sock, const void *buf, size_t len, const int *fds, int nfds);

/* An anonymous memfd of the given size (close-on-exec), sealed against
 * growing and shrinking. */
int dps_memfd(const char *name, uint64_t size);
/* Checks that a notifier fd from a frontend (kick, call, err) is an eventfd
 * (-EINVAL if not: a regular file would read as an endless stream of kicks)
 * and, with nonblock, makes it non-blocking: the IOThread's writes to call
 * and err fds must never block on a counter the frontend filled. Without
 * /proc the kind cannot be checked and any open fd passes. */
int dps_notifier_check(int fd, bool nonblock);
/* An eventfd (close-on-exec; non-blocking on request). */
int dps_eventfd(uint32_t initval, bool nonblock);
/* Size of the file behind fd. */
int dps_fd_size(int fd, uint64_t *size);
/* The unit a mapping of fd must start on and span: its st_blksize when that
 * is a power of two from the page size to 1 GiB (hugetlbfs reports its huge
 * page size), else the page size. */
uint64_t dps_fd_map_alignment(int fd);
/* Set or clear O_NONBLOCK. */
int dps_set_nonblocking(int fd, bool on);
/* The CPUs below max_cpus the process may run on (its main thread's affinity
 * mask: taskset, a cgroup cpuset, systemd's AllowedCPUs=/CPUAffinity=), in
 * ascending order into cpus. Returns their count. */
int dps_allowed_cpus(int32_t *cpus, int max_cpus);
/* Names the calling thread (pthread_setname_np: at most 15 bytes are kept). */
int dps_thread_set_name(const char *name);

#ifdef __cplusplus
}
#endif

#endif
