/* The ring interface's setup: placing a queue's rings in guest memory. */
#include <errno.h>

#include "vring.h"

/* Translates the split ring's three parts and checks what is accessed
 * atomically is aligned (desc 16, avail 2, used 4): checked on every
 * memory table, since a new one may map the same addresses elsewhere. */
static int split_map(const struct dp_queue_config *cfg, const struct dp_mem *mem, void **desc, void **avail,
                     void **used)
{
    int (*translate)(const struct dp_mem *, uint64_t, uint64_t, void **) =
        cfg->addrs_are_user ? dp_mem_translate_uva : dp_mem_translate_gpa;
    int ret = translate(mem, cfg->desc_addr, VRING_DESC_BYTES(cfg->size), desc);
    if (!ret)
        ret = translate(mem, cfg->avail_addr, VRING_AVAIL_BYTES(cfg->size), avail);
    if (!ret)
        ret = translate(mem, cfg->used_addr, VRING_USED_BYTES(cfg->size), used);
    if (ret)
        return ret;
    if (((uintptr_t)*desc & 15) || ((uintptr_t)*avail & 1) || ((uintptr_t)*used & 3))
        return -EINVAL;
    return 0;
}

/* The packed ring's descriptor ring and its two event suppression areas;
 * vring_packed_init checks their alignment (16, 4, 4). */
static int packed_map(const struct dp_queue_config *cfg, const struct dp_mem *mem, void **desc, void **driver,
                      void **device)
{
    int (*translate)(const struct dp_mem *, uint64_t, uint64_t, void **) =
        cfg->addrs_are_user ? dp_mem_translate_uva : dp_mem_translate_gpa;
    int ret = translate(mem, cfg->desc_addr, VRING_PACKED_DESC_BYTES(cfg->size), desc);
    if (!ret)
        ret = translate(mem, cfg->avail_addr, VRING_PACKED_EVENT_BYTES, driver);
    if (!ret)
        ret = translate(mem, cfg->used_addr, VRING_PACKED_EVENT_BYTES, device);
    if (!ret && (((uintptr_t)*desc & 15) || ((uintptr_t)*driver & 3) || ((uintptr_t)*device & 3)))
        ret = -EINVAL;
    return ret;
}

int vring_init(struct vring *vr, const struct dp_queue_config *cfg, const struct dp_mem *mem, uint32_t max_chain)
{
    void *desc, *avail, *used;
    if (cfg->packed) {
        int ret = packed_map(cfg, mem, &desc, &avail, &used);
        if (ret)
            return ret;
        vr->layout = VRING_LAYOUT_PACKED;
        return vring_packed_init(&vr->packed, (uint16_t)cfg->size, desc, avail, used, cfg->packed_base,
                                 cfg->event_idx, cfg->indirect, max_chain);
    }
    int ret = split_map(cfg, mem, &desc, &avail, &used);
    if (ret)
        return ret;
    vr->layout = VRING_LAYOUT_SPLIT;
    return vring_split_init(&vr->split, (uint16_t)cfg->size, desc, avail, used, cfg->last_avail_idx,
                            cfg->event_idx, cfg->indirect, max_chain);
}

int vring_set_mem(struct vring *vr, const struct dp_queue_config *cfg, const struct dp_mem *mem)
{
    void *desc, *avail, *used;
    if (vr->layout == VRING_LAYOUT_PACKED) {
        int ret = packed_map(cfg, mem, &desc, &avail, &used);
        if (ret)
            return ret;
        vr->packed.desc = desc;
        vr->packed.driver = avail;
        vr->packed.device = used;
        return 0;
    }
    int ret = split_map(cfg, mem, &desc, &avail, &used);
    if (ret)
        return ret;
    vr->split.desc = desc;
    vr->split.avail = avail;
    vr->split.used = used;
    return 0;
}
