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

int vring_init(struct vring *vr, const struct dp_queue_config *cfg, const struct dp_mem *mem, uint32_t max_chain)
{
    void *desc, *avail, *used;
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
    int ret = split_map(cfg, mem, &desc, &avail, &used);
    if (ret)
        return ret;
    vr->split.desc = desc;
    vr->split.avail = avail;
    vr->split.used = used;
    return 0;
}
