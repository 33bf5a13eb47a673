/* Disks: what the blk layer and the backends need to know of an image. */
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "dp_internal.h"

int dp_open_image(const char *path, bool read_only, bool direct)
{
    int flags = (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC | (direct ? O_DIRECT : 0);
    int fd = open(path, flags);
    return fd < 0 ? -errno : fd;
}

/* A block size we can serve: a power of two from 512 to 64 KiB. */
static bool is_block_size(uint64_t size)
{
    return size >= 512 && size <= 65536 && (size & (size - 1)) == 0;
}

int dp_fd_probe(int fd, struct dp_fd_info *info)
{
    if (!info)
        return -EINVAL;
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -errno;
    uint64_t size = 0;
    uint32_t logical = 512, physical = 0, mem_align = 512;
    if (S_ISBLK(st.st_mode)) {
        if (ioctl(fd, BLKGETSIZE64, &size) < 0)
            return -errno;
        int sector = 0;
        if (ioctl(fd, BLKSSZGET, &sector) == 0 && sector >= 512)
            logical = mem_align = (uint32_t)sector;
        unsigned int pbs = 0;
        if (ioctl(fd, BLKPBSZGET, &pbs) == 0 && (pbs & (pbs - 1)) == 0)
            physical = pbs;
    } else if (S_ISREG(st.st_mode)) {
        size = (uint64_t)st.st_size;
#ifdef STATX_DIOALIGN
        /* A file on a filesystem over a 4K-sector device takes O_DIRECT only
         * at 4K offsets: the offset alignment, not the memory one, sets it. */
        struct statx sx;
        if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &sx) == 0 && (sx.stx_mask & STATX_DIOALIGN)) {
            uint32_t offset_align = sx.stx_dio_offset_align;
            if (offset_align > 512 && (offset_align & (offset_align - 1)) == 0)
                logical = offset_align;
            if (sx.stx_dio_mem_align)
                mem_align = sx.stx_dio_mem_align;
        }
#endif
        /* A write smaller than a filesystem block into a hole or an unwritten
         * extent makes the filesystem zero the rest of the block and
         * serialize the file's direct I/O: that block is the file's physical
         * block. Larger "blocks" (NFS reports its transfer size) are not. */
        struct statfs sf;
        if (fstatfs(fd, &sf) == 0 && is_block_size((uint64_t)sf.f_bsize))
            physical = (uint32_t)sf.f_bsize;
    } else {
        return -EINVAL;
    }
    memset(info, 0, sizeof(*info));
    info->size_bytes = size;
    info->logical_block_size = logical;
    info->physical_block_size = physical > logical ? physical : logical;
    info->dio_mem_align = mem_align;
    info->block_device = S_ISBLK(st.st_mode);
    return 0;
}

/* QEMU's lock bytes (block/file-posix.c RAW_LOCK_PERM_BASE/SHARED_BASE):
 * byte PERM_BASE + i is held by every open that has permission bit i, byte
 * SHARED_BASE + i by every open that does not share it. All are read locks,
 * so any number of opens can hold a byte; a conflict is found by asking
 * whether a write lock on it would be refused. */
#define LOCK_PERM_BASE 100
#define LOCK_SHARED_BASE 200
#define LOCK_PERM_COUNT 4 /* DP_PERM_ALL's bits */

static int ofd_lock(int fd, short type, off_t offset, off_t len)
{
    struct flock fl = {.l_type = type, .l_whence = SEEK_SET, .l_start = offset, .l_len = len};
    return fcntl(fd, F_OFD_SETLK, &fl) < 0 ? -errno : 0;
}

/* 1 when another open file description holds a lock on the byte, 0 when not. */
static int ofd_byte_taken(int fd, off_t offset)
{
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = offset, .l_len = 1};
    if (fcntl(fd, F_OFD_GETLK, &fl) < 0)
        return -errno;
    return fl.l_type != F_UNLCK;
}

/* dataplane's own byte, outside QEMU's ranges (dp_disk_claim_io). */
#define LOCK_IO_BYTE 300

static void image_unlock(int fd)
{
    ofd_lock(fd, F_UNLCK, LOCK_PERM_BASE, LOCK_PERM_COUNT);
    ofd_lock(fd, F_UNLCK, LOCK_SHARED_BASE, LOCK_PERM_COUNT);
}

int dp_image_lock(int fd, uint32_t perm, uint32_t shared, struct dp_lock_conflict *conflict)
{
    if ((perm | shared) & ~DP_PERM_ALL)
        return -EINVAL;
    uint32_t unshared = ~shared & DP_PERM_ALL;
    int ret = 0;
    /* Ours first, then theirs: two opens racing each see the other's bytes. */
    for (int i = 0; i < LOCK_PERM_COUNT && ret == 0; i++) {
        if (perm & (1u << i))
            ret = ofd_lock(fd, F_RDLCK, LOCK_PERM_BASE + i, 1);
        if (ret == 0 && (unshared & (1u << i)))
            ret = ofd_lock(fd, F_RDLCK, LOCK_SHARED_BASE + i, 1);
    }
    /* Someone who does not share what we need, then someone who has what
     * we do not share (QEMU's raw_check_lock_bytes order and messages). */
    for (int i = 0; i < LOCK_PERM_COUNT && ret == 0; i++) {
        if (!(perm & (1u << i)))
            continue;
        ret = ofd_byte_taken(fd, LOCK_SHARED_BASE + i);
        if (ret == 1 && conflict)
            *conflict = (struct dp_lock_conflict){.perm = 1u << i, .held_by_other = false};
    }
    for (int i = 0; i < LOCK_PERM_COUNT && ret == 0; i++) {
        if (!(unshared & (1u << i)))
            continue;
        ret = ofd_byte_taken(fd, LOCK_PERM_BASE + i);
        if (ret == 1 && conflict)
            *conflict = (struct dp_lock_conflict){.perm = 1u << i, .held_by_other = true};
    }
    if (ret == 0)
        return 0;
    image_unlock(fd);
    return ret == 1 ? -EAGAIN : ret;
}

/* I/O goes through an open file description of its own, apart from the one
 * that holds the image locks: the kernel keeps an io_uring's files (the
 * registered ones, those of requests in flight) until the ring is torn
 * down, which after a SIGKILL completes only after the process is gone.
 * The image locks must go with the process (the dpctl started in our place
 * takes them); the I/O claim must stay until the last request is done
 * (dp_disk_claim_io). Reopened through /proc with the same access and
 * caching flags; without /proc, a dup (one description for both) is all
 * there is. */
static int reopen_for_io(int fd)
{
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0)
        return -errno;
    char path[32];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    int io = open(path, (flags & (O_ACCMODE | O_DIRECT | O_DSYNC | O_SYNC | O_NOATIME)) | O_CLOEXEC);
    if (io < 0 && errno == ENOENT)
        io = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    return io < 0 ? -errno : io;
}

int dp_disk_create(const struct dp_disk_config *config, struct dp_disk **out)
{
    if (!config || !out)
        return -EINVAL;
    uint32_t lbs = config->logical_block_size;
    if (lbs < 512 || lbs > 65536 || (lbs & (lbs - 1)))
        return -EINVAL;
    if (config->mem_align & (config->mem_align - 1))
        return -EINVAL;
    /* Capacity in bytes must fit in a uint64 and be whole logical blocks. */
    if (config->capacity_sectors > UINT64_MAX / 512 ||
        (config->capacity_sectors * 512) % lbs)
        return -EINVAL;
    if (config->backend != DP_BACKEND_FILE && config->backend != DP_BACKEND_NULL)
        return -EINVAL;
    if (config->seg_max > DP_SEG_MAX)
        return -EINVAL;
    if (config->read_policy < DP_POLICY_REPORT || config->read_policy > DP_POLICY_STOP ||
        config->write_policy < DP_POLICY_REPORT || config->write_policy > DP_POLICY_STOP)
        return -EINVAL;

    struct dp_disk *disk = calloc(1, sizeof(*disk));
    if (!disk)
        return -ENOMEM;
    disk->backend = config->backend;
    disk->fd = disk->lock_fd = -1;
    if (config->backend == DP_BACKEND_FILE) {
        struct stat st;
        disk->lock_fd = fcntl(config->fd, F_DUPFD_CLOEXEC, 0);
        int ret = disk->lock_fd < 0 ? -errno : reopen_for_io(disk->lock_fd);
        if (ret >= 0)
            disk->fd = ret;
        if (ret >= 0 && fstat(disk->fd, &st) < 0)
            ret = -errno;
        if (ret < 0) {
            dp_disk_destroy(disk);
            return ret;
        }
        disk->is_block_device = S_ISBLK(st.st_mode);
    }
    disk->seg_max = config->seg_max ? config->seg_max : DP_SEG_MAX;
    atomic_init(&disk->capacity_sectors, config->capacity_sectors);
    atomic_init(&disk->write_through, false);
    disk->logical_block_size = lbs;
    disk->block_mask = lbs - 1;
    disk->mem_align = config->mem_align;
    disk->read_only = config->read_only;
    disk->read_zeroes = config->null_read_zeroes;
    memcpy(disk->serial, config->serial, DP_SERIAL_LEN);
    disk->read_policy = config->read_policy;
    disk->write_policy = config->write_policy;
    disk->fixed_buffers = config->fixed_buffers && config->backend == DP_BACKEND_FILE;
    *out = disk;
    return 0;
}

int dp_disk_set_fault(struct dp_disk *disk, const struct dp_fault_config *fault)
{
    if (!disk || !fault || fault->error < 0)
        return -EINVAL;
    /* Turn injection off while the fields change, then on with the new ones. */
    atomic_store_explicit(&disk->fault_error, 0, memory_order_relaxed);
    atomic_store_explicit(&disk->fault_ops, fault->ops, memory_order_relaxed);
    atomic_store_explicit(&disk->fault_start, fault->sector_start, memory_order_relaxed);
    atomic_store_explicit(&disk->fault_end, fault->sector_end, memory_order_relaxed);
    atomic_store_explicit(&disk->fault_after, fault->after, memory_order_relaxed);
    atomic_store_explicit(&disk->fault_every, fault->every, memory_order_relaxed);
    atomic_store_explicit(&disk->fault_seen, 0, memory_order_relaxed);
    atomic_store_explicit(&disk->fault_error, fault->error, memory_order_release);
    return 0;
}

int dp_disk_set_throttle(struct dp_disk *disk, struct dp_throttle *t)
{
    if (!disk)
        return -EINVAL;
    /* Release: a queue that acquires the pointer sees the buckets set. */
    atomic_store_explicit(&disk->throttle, t, memory_order_release);
    return 0;
}

uint64_t dp_disk_capacity(const struct dp_disk *disk)
{
    return disk ? atomic_load_explicit(&disk->capacity_sectors, memory_order_relaxed) : 0;
}

/* Why a relaxed store (and the IOThreads' relaxed loads) is enough: the
 * capacity guards no other memory, only the range check of requests parsed
 * after it. Every request is parsed on an IOThread between two looks at its
 * mailbox. Growing: a request that still sees the old value is refused as
 * it would have been a moment earlier; the caller extended the file before
 * the store, so one that sees the new value finds the file long enough.
 * Shrinking: the caller sends dp_queue_drain to each queue after this
 * store. The mailbox's mutex orders the store before the IOThread's next
 * pass, so every request parsed after the drain message is handled sees
 * the new capacity (coherence of one atomic), and every request parsed
 * before it is in flight then and completes before the drain returns.
 * Only after that does the caller shorten the file. */
int dp_disk_set_capacity(struct dp_disk *disk, uint64_t sectors)
{
    if (!disk || sectors == 0 || sectors > UINT64_MAX / 512 || (sectors * 512) & disk->block_mask)
        return -EINVAL;
    atomic_store_explicit(&disk->capacity_sectors, sectors, memory_order_relaxed);
    return 0;
}

int dp_disk_image_size(const struct dp_disk *disk, uint64_t *bytes)
{
    if (!disk || !bytes)
        return -EINVAL;
    if (disk->backend != DP_BACKEND_FILE) {
        *bytes = dp_disk_capacity(disk) * 512;
        return 0;
    }
    struct dp_fd_info info;
    int ret = dp_fd_probe(disk->fd, &info);
    if (ret == 0)
        *bytes = info.size_bytes;
    return ret;
}

int dp_disk_truncate(struct dp_disk *disk, uint64_t bytes)
{
    if (!disk || disk->backend != DP_BACKEND_FILE || disk->is_block_device || bytes > INT64_MAX)
        return -EINVAL;
    if (disk->read_only)
        return -EBADF;
    return ftruncate(disk->fd, (off_t)bytes) < 0 ? -errno : 0;
}

int dp_disk_set_write_cache(struct dp_disk *disk, bool writeback)
{
    if (!disk)
        return -EINVAL;
    /* Writes of a read-only disk never reach the backend; the null backend
     * keeps nothing. Only a file backend's kernel must take the flag: a
     * zero-length write moves nothing, and is checked for its flags as an
     * io_uring write is (kiocb_set_rw_flags). */
    if (!writeback && disk->backend == DP_BACKEND_FILE && !disk->read_only) {
        char byte;
        struct iovec iov = {.iov_base = &byte, .iov_len = 0};
        if (pwritev2(disk->fd, &iov, 1, 0, RWF_DSYNC) < 0)
            return errno == EINVAL ? -EOPNOTSUPP : -errno;
    }
    bool was_through = atomic_exchange_explicit(&disk->write_through, !writeback, memory_order_relaxed);
    /* A guest that turns write-through on sends no more flushes: what it
     * wrote in write-back mode is made durable now (writes still in flight
     * without RWF_DSYNC may complete after this; its next write-back FLUSH,
     * or none, is the guest's business). */
    if (!writeback && !was_through && disk->backend == DP_BACKEND_FILE && !disk->read_only &&
        fdatasync(disk->fd) < 0) {
        int err = -errno;
        atomic_store_explicit(&disk->write_through, false, memory_order_relaxed);
        return err;
    }
    return 0;
}

bool dp_disk_write_cache(const struct dp_disk *disk)
{
    return disk && !atomic_load_explicit(&disk->write_through, memory_order_relaxed);
}

int dp_disk_claim_io(struct dp_disk *disk, bool exclusive)
{
    if (!disk)
        return -EINVAL;
    if (disk->fd < 0)
        return 0;
    int ret = ofd_lock(disk->fd, exclusive ? F_WRLCK : F_RDLCK, LOCK_IO_BYTE, 1);
    return ret == -EACCES ? -EAGAIN : ret;
}

int dp_disk_flush_error(const struct dp_disk *disk)
{
    return disk ? atomic_load_explicit(&disk->flush_error, memory_order_relaxed) : -EINVAL;
}

void dp_disk_destroy(struct dp_disk *disk)
{
    if (!disk)
        return;
    if (disk->fd >= 0)
        close(disk->fd);
    if (disk->lock_fd >= 0)
        close(disk->lock_fd);
    free(disk);
}
