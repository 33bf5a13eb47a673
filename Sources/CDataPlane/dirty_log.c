/* Dirty page logging (dirty_log.h). */
#include "dirty_log.h"

void dirty_log_gpa(const struct dirty_log *log, uint64_t gpa, uint64_t len)
{
    uint64_t pages = log->size * 8; /* size <= UINT64_MAX / 8: dp_queue_create checks */
    uint64_t first = gpa >> DIRTY_LOG_PAGE_SHIFT;
    if (!len || first >= pages)
        return;
    uint64_t end = gpa + len - 1;
    uint64_t last = end < gpa ? pages - 1 : end >> DIRTY_LOG_PAGE_SHIFT;
    if (last >= pages)
        last = pages - 1;
    /* Atomic OR: the frontend takes bits with an atomic exchange while we
     * set others in the same byte. Release: the data is visible to whoever
     * sees the bit. */
    for (uint64_t page = first; page <= last; page++)
        __atomic_fetch_or(&log->bitmap[page >> 3], (uint8_t)(1u << (page & 7)), __ATOMIC_RELEASE);
}

void dirty_log_host(const struct dirty_log *log, const struct dp_mem *mem, const void *host, uint64_t len)
{
    uint64_t gpa;
    if (len && guest_mem_gpa_of(mem, host, len, &gpa) == 0)
        dirty_log_gpa(log, gpa, len);
}

void dirty_log_iov(const struct dirty_log *log, const struct dp_mem *mem, const struct iovec *iov, uint32_t cnt)
{
    for (uint32_t i = 0; i < cnt; i++)
        dirty_log_host(log, mem, iov[i].iov_base, iov[i].iov_len);
}
