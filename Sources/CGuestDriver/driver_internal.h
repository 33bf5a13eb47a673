/*
 * CGuestDriver's private state, shared by the split (driver.c) and packed
 * (packed.c) halves of the guest driver.
 */
#ifndef GD_DRIVER_INTERNAL_H
#define GD_DRIVER_INTERNAL_H

#include "CGuestDriver.h"

#include <stdatomic.h>
#include <stddef.h>

struct gd_vdesc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

/* Packed ring descriptor (2.8.13); also the layout of its indirect tables. */
struct gd_pdesc {
    uint64_t addr;
    uint32_t len;
    uint16_t id;
    uint16_t flags; /* accessed atomically: the descriptor's ownership */
};

/* Event suppression flags (2.8.14). */
#define GD_EVENT_ENABLE 0
#define GD_EVENT_DISABLE 1
#define GD_EVENT_DESC 2

struct gd_used_elem {
    uint32_t id;
    uint32_t len;
};

_Static_assert(sizeof(struct gd_vdesc) == 16, "virtq_desc is 16 bytes");
_Static_assert(sizeof(struct gd_pdesc) == 16, "pvirtq_desc is 16 bytes");
_Static_assert(sizeof(struct gd_used_elem) == 8, "virtq_used_elem is 8 bytes");
_Static_assert(sizeof(_Atomic uint16_t) == 2, "ring indices are accessed as atomic le16");

/* A cache line per head, so the device's status write does not bounce the
 * line holding a neighbour's header. */
#define GD_SLOT_STRIDE 64
#define GD_HDR_LEN 16
#define GD_STATUS_OFF 16
#define GD_UVA_BASE 0x7f0000000000ull

enum gd_calls { GD_CALLS_ON, GD_CALLS_OFF, GD_CALLS_MANUAL };

struct gd_head {
    uint16_t last;  /* last descriptor of the chain, to splice it back */
    uint16_t ndesc; /* ring descriptors it holds (1 when indirect) */
    bool busy;
};

struct gd_queue {
    uint32_t size;
    uint64_t desc_gpa, avail_gpa, used_gpa, slot_gpa, ind_gpa;
    struct gd_vdesc *desc;
    _Atomic uint16_t *avail_flags, *avail_idx, *used_event;
    uint16_t *avail_ring;
    _Atomic uint16_t *used_flags, *used_idx, *avail_event;
    const struct gd_used_elem *used_ring;
    uint8_t *slots;
    struct gd_vdesc *ind;
    uint16_t *free_next; /* driver-private links, so the device cannot corrupt them */
    struct gd_head *heads;
    uint16_t free_head;
    uint32_t num_free, in_flight;
    uint16_t avail_shadow, avail_pub, kick_old, last_used;
    uint16_t used_event_set; /* last value written in GD_CALLS_OFF */
    uint16_t avail_flags_shadow;
    enum gd_calls calls;
    int kick_fd, call_fd;

    /* Packed layout (2.8): the descriptor ring at desc_gpa, the driver's
     * event suppression area at avail_gpa (we write it), the device's at
     * used_gpa. Buffer ids come from free_next/free_head; ring slots are
     * used in order, num_free counts the free ones. last_used is the next
     * slot to look at for a used descriptor. */
    struct gd_pdesc *pdesc;
    _Atomic uint16_t *drv_off_wrap, *drv_flags, *dev_off_wrap, *dev_flags;
    uint16_t next_avail;      /* next ring slot to fill */
    bool avail_wrap, used_wrap;
    bool pub_wrap;            /* avail wrap counter at avail_pub */
    uint16_t kick_added;      /* ring slots published since the last kick decision */
    uint16_t *pend_slot, *pend_flags; /* heads added, flags held until published */
    uint32_t npend;
    /* Per starting slot, the length of a buffer written raw (gd_packed_skip):
     * its id is not ours to look up, and a used descriptor written there
     * skips that many slots (raw buffers are answered in order). */
    uint16_t *raw_ndesc;
};

struct gd_driver {
    uint64_t mem_size, half, brk, brk_floor;
    int memfd;
    bool event_idx;
    bool packed;
    uint8_t *guest;
    uint8_t *area; /* PROT_NONE reservation holding the device view */
    size_t area_len;
    uint8_t *dev[2];
    uint32_t num_queues;
    struct gd_queue queues[];
};

/* driver.c, for both layouts: writes head's request header (status byte
 * 0xFF) and returns its GPA; the WRITE flag the request's data buffers take. */
uint64_t gd_slot_fill(struct gd_queue *q, uint16_t head, const struct gd_req *req);
uint16_t gd_data_flags(const struct gd_req *req);

/* packed.c: the packed layout's side of the calls driver.c exports. */
int gd_packed_queue_init(struct gd_driver *d, struct gd_queue *q);
void gd_packed_queue_free(struct gd_queue *q);
int gd_packed_request_add(struct gd_driver *d, struct gd_queue *q, const struct gd_req *req, uint16_t *id_out);
void gd_packed_publish(struct gd_queue *q);
int gd_packed_kick_needed(const struct gd_driver *d, struct gd_queue *q);
int gd_packed_used_pop(struct gd_driver *d, struct gd_queue *q, uint32_t *id, uint32_t *len);
bool gd_packed_used_pending(const struct gd_queue *q);
void gd_packed_set_calls(struct gd_driver *d, struct gd_queue *q, bool on);

#endif
