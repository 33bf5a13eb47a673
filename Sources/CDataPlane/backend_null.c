/* The null backend: measures the data plane alone. */
#include <string.h>

#include "backend.h"
#include "blk.h"

int backend_null_execute(const struct dp_disk *disk, struct blk_req *req)
{
    if (req->op == DP_OP_READ && disk->read_zeroes) {
        for (uint32_t i = 0; i < req->iov_cnt; i++)
            memset(req->iov[i].iov_base, 0, req->iov[i].iov_len);
    }
    req->done = req->len;
    return 0;
}
