/* Dirty page logging for live migration (vhost-user VHOST_F_LOG_ALL): one
 * bit per 4 KiB page of guest-physical memory in a bitmap the frontend
 * shares and clears as it copies pages. Every byte the device writes into
 * guest memory is marked after it is written (a mark before could be
 * cleared, and its page copied, before the data lands) and before the used
 * index that hands it to the guest is published. Knows guest memory, not
 * rings or requests. */
#ifndef DP_DIRTY_LOG_H
#define DP_DIRTY_LOG_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>

#include "guest_mem.h"

#define DIRTY_LOG_PAGE_SHIFT 12

struct dirty_log {
    uint8_t *bitmap; /* NULL: logging is off */
    uint64_t size;   /* bytes: it covers size * 8 pages */
};

static inline bool dirty_log_on(const struct dirty_log *log)
{
    return log->bitmap != NULL;
}

/* Marks the pages of [gpa, gpa + len); pages past the bitmap are not ours
 * to mark (the frontend sizes it to its memory). */
void dirty_log_gpa(const struct dirty_log *log, uint64_t gpa, uint64_t len);
/* Marks the guest pages behind [host, host + len): a range guest memory
 * maps (ring areas, a buffer's iovec), found by its host address. */
void dirty_log_host(const struct dirty_log *log, const struct dp_mem *mem, const void *host, uint64_t len);
void dirty_log_iov(const struct dirty_log *log, const struct dp_mem *mem, const struct iovec *iov, uint32_t cnt);

#endif
