/* Disks: what the blk layer and the backends need to know of an image. */
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "dp_internal.h"

int dp_open_image(const char *path, bool read_only, bool direct)
{
    int flags = (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC | (direct ? O_DIRECT : 0);
    int fd = open(path, flags);
    return fd < 0 ? -errno : fd;
}

int dp_fd_probe(int fd, uint64_t *size_bytes, uint32_t *logical_block_size, uint32_t *dio_align)
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -errno;
    uint64_t size = 0;
    uint32_t lbs = 512, align = 512;
    if (S_ISBLK(st.st_mode)) {
        if (ioctl(fd, BLKGETSIZE64, &size) < 0)
            return -errno;
        int ssz = 0;
        if (ioctl(fd, BLKSSZGET, &ssz) == 0 && ssz >= 512)
            lbs = align = (uint32_t)ssz;
    } else if (S_ISREG(st.st_mode)) {
        size = (uint64_t)st.st_size;
#ifdef STATX_DIOALIGN
        struct statx sx;
        if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &sx) == 0 &&
            (sx.stx_mask & STATX_DIOALIGN) && sx.stx_dio_mem_align)
            align = sx.stx_dio_mem_align;
#endif
    } else {
        return -EINVAL;
    }
    if (size_bytes)
        *size_bytes = size;
    if (logical_block_size)
        *logical_block_size = lbs;
    if (dio_align)
        *dio_align = align;
    return 0;
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
    disk->fd = -1;
    if (config->backend == DP_BACKEND_FILE) {
        struct stat st;
        disk->fd = fcntl(config->fd, F_DUPFD_CLOEXEC, 0);
        if (disk->fd < 0 || fstat(disk->fd, &st) < 0) {
            int err = -errno;
            if (disk->fd >= 0)
                close(disk->fd);
            free(disk);
            return err;
        }
        disk->is_block_device = S_ISBLK(st.st_mode);
    }
    disk->seg_max = config->seg_max ? config->seg_max : DP_SEG_MAX;
    disk->capacity_sectors = config->capacity_sectors;
    disk->logical_block_size = lbs;
    disk->mem_align = config->mem_align;
    disk->read_only = config->read_only;
    disk->read_zeroes = config->null_read_zeroes;
    memcpy(disk->serial, config->serial, DP_SERIAL_LEN);
    disk->read_policy = config->read_policy;
    disk->write_policy = config->write_policy;
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
    free(disk);
}
