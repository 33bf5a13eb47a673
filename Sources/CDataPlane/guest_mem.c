/* Guest memory: the region table and overflow-safe translation. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "guest_mem.h"

/* True when [a, a + alen) and [b, b + blen) overlap; both ranges are known not
 * to wrap. Compared by last bytes: a range may end exactly at 2^64. */
static int ranges_overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return a <= b + (blen - 1) && b <= a + (alen - 1);
}

static int region_compare(const void *x, const void *y)
{
    const struct dp_mem_region *a = x, *b = y;
    return (a->guest_phys_addr > b->guest_phys_addr) - (a->guest_phys_addr < b->guest_phys_addr);
}

int dp_mem_create(const struct dp_mem_region *regions, uint32_t count, struct dp_mem **out)
{
    if (!out || (count && !regions) || count > DP_MEM_MAX_REGIONS)
        return -EINVAL;
    for (uint32_t i = 0; i < count; i++) {
        const struct dp_mem_region *r = &regions[i];
        if (r->size == 0 || !r->host_addr)
            return -EINVAL;
        /* Rings and descriptors aligned in guest memory must be aligned in
         * ours too: regions map guest addresses congruently (mod 16). */
        if ((r->guest_phys_addr ^ (uintptr_t)r->host_addr) & 15)
            return -EINVAL;
        /* The last byte must be addressable in every space: no wrap-around. */
        if (r->guest_phys_addr + (r->size - 1) < r->guest_phys_addr ||
            r->user_addr + (r->size - 1) < r->user_addr ||
            (uintptr_t)r->host_addr + (r->size - 1) < (uintptr_t)r->host_addr)
            return -EOVERFLOW;
        for (uint32_t j = 0; j < i; j++) {
            const struct dp_mem_region *o = &regions[j];
            if (ranges_overlap(r->guest_phys_addr, r->size, o->guest_phys_addr, o->size) ||
                ranges_overlap(r->user_addr, r->size, o->user_addr, o->size))
                return -EEXIST;
        }
    }
    struct dp_mem *mem = malloc(sizeof(*mem) + count * sizeof(mem->regions[0]));
    if (!mem)
        return -ENOMEM;
    mem->count = count;
    if (count)
        memcpy(mem->regions, regions, count * sizeof(regions[0]));
    qsort(mem->regions, count, sizeof(mem->regions[0]), region_compare);
    *out = mem;
    return 0;
}

void dp_mem_destroy(struct dp_mem *mem)
{
    free(mem);
}

static _Thread_local uint32_t last_hit; /* per IOThread: the region it found last */

/* The region holding gpa, or NULL. Regions are sorted by guest address and
 * do not overlap: the last one starting at or below gpa is the only
 * candidate (a binary search: a frontend may hand us 64 regions, and every
 * descriptor a guest sends costs one lookup). */
static const struct dp_mem_region *region_find(const struct dp_mem *mem, uint64_t gpa)
{
    /* Descriptors, headers and buffers of a guest mostly lie in one region
     * (its RAM below or above 4 GiB): try the last one found first (below
     * its start, the unsigned difference is too large, as in the search). An
     * index only, checked against this table, so a hint from another
     * memory table can cost a search but never pick a wrong region. */
    uint32_t hint = last_hit;
    if (hint < mem->count && gpa - mem->regions[hint].guest_phys_addr < mem->regions[hint].size)
        return &mem->regions[hint];
    uint32_t lo = 0, hi = mem->count;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (mem->regions[mid].guest_phys_addr <= gpa)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0)
        return NULL;
    const struct dp_mem_region *r = &mem->regions[lo - 1];
    if (gpa - r->guest_phys_addr >= r->size)
        return NULL;
    last_hit = lo - 1;
    return r;
}

int guest_mem_map(const struct dp_mem *mem, uint64_t gpa, uint64_t len, struct iovec *iov,
                  unsigned max)
{
    unsigned n = 0;
    if (len && gpa + (len - 1) < gpa)
        return -EFAULT;
    while (len) {
        const struct dp_mem_region *r = region_find(mem, gpa);
        if (!r)
            return -EFAULT;
        if (n == max)
            return -ENOBUFS;
        uint64_t offset = gpa - r->guest_phys_addr;
        uint64_t chunk = r->size - offset;
        if (chunk > len)
            chunk = len;
        iov[n].iov_base = (uint8_t *)r->host_addr + offset;
        iov[n].iov_len = chunk;
        n++;
        gpa += chunk;
        len -= chunk;
    }
    return (int)n;
}

void *guest_mem_ptr(const struct dp_mem *mem, uint64_t gpa, uint64_t len)
{
    const struct dp_mem_region *r = region_find(mem, gpa);
    if (!r || len > r->size - (gpa - r->guest_phys_addr))
        return NULL;
    return (uint8_t *)r->host_addr + (gpa - r->guest_phys_addr);
}

int guest_mem_gpa_of(const struct dp_mem *mem, const void *host, uint64_t len, uint64_t *gpa)
{
    uintptr_t h = (uintptr_t)host;
    for (uint32_t i = 0; i < mem->count; i++) {
        const struct dp_mem_region *r = &mem->regions[i];
        uintptr_t base = (uintptr_t)r->host_addr;
        if (h - base < r->size && len <= r->size - (h - base)) {
            *gpa = r->guest_phys_addr + (h - base);
            return 0;
        }
    }
    return -EFAULT;
}

int guest_mem_copy_from(const struct dp_mem *mem, uint64_t gpa, void *buf, uint64_t len)
{
    if (len && gpa + (len - 1) < gpa)
        return -EFAULT;
    uint8_t *out = buf;
    while (len) {
        const struct dp_mem_region *r = region_find(mem, gpa);
        if (!r)
            return -EFAULT;
        uint64_t offset = gpa - r->guest_phys_addr;
        uint64_t chunk = r->size - offset < len ? r->size - offset : len;
        memcpy(out, (const uint8_t *)r->host_addr + offset, chunk);
        out += chunk;
        gpa += chunk;
        len -= chunk;
    }
    return 0;
}

int dp_mem_translate_gpa(const struct dp_mem *mem, uint64_t gpa, uint64_t len, void **host)
{
    void *p = mem && host ? guest_mem_ptr(mem, gpa, len) : NULL;
    if (!p)
        return -EFAULT;
    *host = p;
    return 0;
}

int dp_mem_translate_uva(const struct dp_mem *mem, uint64_t uva, uint64_t len, void **host)
{
    if (!mem || !host)
        return -EFAULT;
    for (uint32_t i = 0; i < mem->count; i++) {
        const struct dp_mem_region *r = &mem->regions[i];
        if (uva >= r->user_addr && uva - r->user_addr < r->size &&
            len <= r->size - (uva - r->user_addr)) {
            *host = (uint8_t *)r->host_addr + (uva - r->user_addr);
            return 0;
        }
    }
    return -EFAULT;
}
