/* Guest memory: the region table and address translation. Knows nothing of rings. */
#ifndef DP_GUEST_MEM_H
#define DP_GUEST_MEM_H

#include <stdint.h>
#include <sys/uio.h>

#include "CDataPlane.h"

struct dp_mem {
    uint32_t count;
    struct dp_mem_region regions[]; /* sorted by guest_phys_addr */
};

/* Map the guest range [gpa, gpa + len) to host iovecs, splitting it where it
 * crosses from one region into a guest-physically adjacent one. Appends at
 * most max iovecs. Returns the number appended, -EFAULT when a byte lies
 * outside guest memory or the range wraps, -ENOBUFS when max is too small. */
int guest_mem_map(const struct dp_mem *mem, uint64_t gpa, uint64_t len, struct iovec *iov,
                  unsigned max);

/* Host pointer for [gpa, gpa + len) when it lies inside one region, else NULL. */
void *guest_mem_ptr(const struct dp_mem *mem, uint64_t gpa, uint64_t len);

/* The guest-physical address of [host, host + len), which must lie inside
 * one region's mapping (an iovec guest_mem_map made, a ring area): 0, or
 * -EFAULT. A scan of the regions: only dirty logging asks. */
int guest_mem_gpa_of(const struct dp_mem *mem, const void *host, uint64_t len, uint64_t *gpa);

/* Copies [gpa, gpa + len) out of guest memory, across adjacent regions.
 * 0, or -EFAULT when a byte lies outside guest memory or the range wraps. */
int guest_mem_copy_from(const struct dp_mem *mem, uint64_t gpa, void *buf, uint64_t len);

#endif
