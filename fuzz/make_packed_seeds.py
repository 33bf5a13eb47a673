#!/usr/bin/env python3
"""Writes the packed-ring seeds of the vring_blk fuzz target (fuzz/corpus/vring_blk/packed-*).

One file per case of the packed-ring walker worth starting from: the
well-behaved shapes, the subtle ones (a chain wrapping the ring's end, a
misaligned indirect table, a ring of size 1, sizes that are not powers of
two, out-of-order batches, notification offsets across a wrap) and the
hostile ones of fuzz/vring_packed_selftest.c, encoded in the input format
documented at the top of fuzz/vring_blk_fuzz.c and fuzz/vring_packed_model.c
(features bit 6 set). Keep them in step. Re-running rewrites the packed-*
files; fuzz/make_seeds.py writes the split ones beside them. Usage: fuzz/make_packed_seeds.py [OUTDIR]
"""
import os
import struct
import sys

# Features (header byte 0); bits 3-5 pick the chain limit (1: max_chain 1, 2: 2, ...);
# bit 6 (PACKED, always set here) the packed layout.
EVENT_IDX, INDIRECT, READ_ONLY, PACKED = 1, 2, 4, 0x40
CHAIN_2 = 2 << 3
# Element flags of OP_ADD.
W, IND, FLIP_NEXT, FLIP_AVAIL, FLIP_USED = 1, 2, 4, 8, 16
# Raw descriptor flags.
NEXT, WRITE, INDIR, AVAIL, USED = 1, 2, 4, 1 << 7, 1 << 15
# Driver Area flags.
EV_ENABLE, EV_DISABLE, EV_DESC = 0, 1, 2
T_IN, T_OUT, T_FLUSH = 0, 1, 4
(OP_DESC, OP_TABLE, OP_ADD, OP_DRIVER_POS, OP_POKE, OP_POP, OP_COMPLETE, OP_PUBLISH,
 OP_NOTIFY, OP_KICKS, OP_DRIVER_EVENT, OP_REWALK) = range(12)

u8 = lambda v: struct.pack("<B", v & 0xFF)
u16 = lambda v: struct.pack("<H", v & 0xFFFF)
u32 = lambda v: struct.pack("<I", v & 0xFFFFFFFF)
u64 = lambda v: struct.pack("<Q", v & 0xFFFFFFFFFFFFFFFF)


def R(region, off):
    """An address: a region (input order) plus a signed 32-bit offset."""
    return u8(region) + struct.pack("<i", off)


def RAW(addr):
    return u8(0xC0) + u64(addr)


def raw_desc(addr, length, id_=0, flags=0):
    return addr + u32(length) + u16(id_) + u16(flags)


def blk_hdr(rtype, sector=0):
    return u32(rtype) + u32(0) + u64(sector)


# Offsets into region 0.
DESC, DRIVER, DEVICE = 0x0, 0x400, 0x404
HDR, DATA, STATUS, TABLE = 0x1000, 0x2000, 0x8000, 0x9000


def pos(idx, wrap):
    return idx | (0x8000 if wrap else 0)


class Case:
    def __init__(self, features=EVENT_IDX | INDIRECT, size=8, regions=None, iov_max=256,
                 capacity=2048, lbs_log2=0, areas=None, avail=pos(0, 1), used=pos(0, 1)):
        regions = regions or [(0, 0x10000, 0x100000)]
        areas = areas or (R(0, DESC), R(0, DRIVER), R(0, DEVICE))
        h = u8(features | PACKED) + u8(size - 1) + u8(len(regions) - 1)
        for place, rsize, param in regions:
            h += u8(place) + u16(rsize - 1) + u64(param)
        h += u16(iov_max - 1) + u64(capacity) + u8(lbs_log2)
        h += b"".join(areas) + u16(avail) + u16(used)
        self.data = h

    def op(self, code, *args):
        self.data += u8(code) + b"".join(args)
        return self

    def add(self, elems):
        """elems: (addr, len, id, f) with f the OP_ADD element flags."""
        assert 1 <= len(elems) <= 8
        body = b"".join(a + u32(n) + u16(i) + u8(f) for a, n, i, f in elems)
        return self.op(OP_ADD, u8(len(elems) - 1), body)

    def table(self, addr, descs):
        """Indirect table entries (addr, len, flags)."""
        body = b"".join(raw_desc(a, n, 0, f) for a, n, f in descs)
        return self.op(OP_TABLE, addr, u8(len(descs) - 1), body)

    def poke(self, addr, data):
        assert len(data) <= 64
        return self.op(OP_POKE, addr, u8(len(data)), data)

    def pop(self, n=64):
        return self.op(OP_POP, u8(n - 1))

    def complete(self, sel=0):
        return self.op(OP_COMPLETE, u8(sel))

    def publish(self):
        return self.op(OP_PUBLISH)

    def event(self, off_wrap, flags):
        return self.op(OP_DRIVER_EVENT, u16(off_wrap), u16(flags))

    def serve(self, elems, completions=1):
        self.add(elems).pop()
        for _ in range(completions):
            self.complete()
        return self.publish()


def read_elems(id_=0, data=((R(0, DATA), 4096),), hdr=R(0, HDR), status=R(0, STATUS)):
    return [(hdr, 16, id_, 0)] + [(a, n, id_, W) for a, n in data] + [(status, 1, id_, W)]


def write_elems(id_=0, data=((R(0, DATA), 512),)):
    return [(R(0, HDR), 16, id_, 0)] + [(a, n, id_, 0) for a, n in data] + [(R(0, STATUS), 1, id_, W)]


def indirect_read(c, table=R(0, TABLE), id_=0, table_off=TABLE):
    c.poke(R(0, HDR), blk_hdr(T_IN, 16))
    c.table(R(0, table_off), [(R(0, HDR), 16, 0), (R(0, DATA), 4096, WRITE), (R(0, STATUS), 1, WRITE)])
    return c.serve([(R(0, table_off), 48, id_, IND)])


def cases():
    c = {}
    c["good_read"] = Case().poke(R(0, HDR), blk_hdr(T_IN)).serve(read_elems())
    # A held read walked again from its saved ring descriptors (a restart from
    # the inflight region), intact, then with one copy rewritten.
    c["rewalk_from_saved_copies"] = (Case().poke(R(0, HDR), blk_hdr(T_IN)).add(read_elems()).pop()
                                     .op(OP_REWALK, u8(0), u8(0), raw_desc(R(0, DATA), 4096, 0, WRITE))
                                     .op(OP_REWALK, u8(0), u8(0x81), raw_desc(R(0, DATA), 4096, 0, WRITE | NEXT))
                                     .complete().publish())
    c["good_read_no_event_idx"] = Case(features=INDIRECT).poke(R(0, HDR), blk_hdr(T_IN)).serve(read_elems())
    segs = ((R(0, DATA), 512), (R(0, DATA + 0x1000), 1024), (R(0, DATA + 0x3000), 512))
    c["good_write_3_segments"] = Case().poke(R(0, HDR), blk_hdr(T_OUT, 8)).serve(write_elems(5, segs))
    c["indirect_read"] = indirect_read(Case())
    c["indirect_misaligned_table"] = indirect_read(Case(), table_off=TABLE + 4)
    c["indirect_table_8_aligned"] = indirect_read(Case(), table_off=TABLE + 8)
    two = [(0, 0x10000, 0x100000), (1, 0x10000, 0)]
    c["indirect_table_across_regions"] = indirect_read(Case(regions=two), table_off=0x10000 - 16)

    # A chain wrapping the ring's end: size 5, starting at index 3.
    w = Case(size=5, avail=pos(3, 1), used=pos(3, 1)).poke(R(0, HDR), blk_hdr(T_IN))
    for k in range(4):
        w.serve(read_elems(k))
    c["wrap_in_middle_of_chain"] = w
    w = Case(size=5, avail=pos(4, 0), used=pos(4, 0)).poke(R(0, HDR), blk_hdr(T_OUT))
    c["wrap_in_middle_of_chain_wrap0"] = w.serve(write_elems(1, segs)).serve(write_elems(2, segs))

    # A ring of size 1: only indirect requests fit; several laps.
    one = Case(size=1)
    for _ in range(3):
        indirect_read(one)
    c["ring_size_1"] = one
    one_direct = Case(size=1).poke(R(0, HDR), blk_hdr(T_IN)).serve(read_elems())
    c["ring_size_1_chain_too_long"] = one_direct

    # Sizes that are not powers of two, several laps, out of order.
    for size in (3, 7, 63):
        s = Case(size=size).poke(R(0, HDR), blk_hdr(T_IN))
        for lap in range(3):
            for k in range(max(1, size // 3)):
                s.add(read_elems(k, data=((R(0, DATA + 0x400 * k), 512),)))
            s.pop().complete(2).complete(1).complete(0).complete(0x80).publish()
        c[f"size_{size}_laps_out_of_order"] = s

    # Batches, out-of-order completion, notification offsets, kicks.
    b = Case(size=8).poke(R(0, HDR), blk_hdr(T_IN)).event(pos(3, 1), EV_DESC)
    for k in range(4):
        b.add(read_elems(k, data=((R(0, DATA + 0x400 * k), 513),)))
    b.pop(3).complete(2).complete(0x81).publish()
    b.op(OP_KICKS, u8(0)).pop().complete().complete().publish().op(OP_KICKS, u8(1))
    c["batch_out_of_order"] = b
    n = Case(size=5).poke(R(0, HDR), blk_hdr(T_FLUSH))
    flush = [(R(0, HDR), 16, 0, 0), (R(0, STATUS), 1, 0, W)]
    n.event(pos(1, 0), EV_DESC)
    for _ in range(6):
        n.serve(flush).op(OP_NOTIFY)
    n.event(0, EV_DISABLE).serve(flush).event(0, EV_ENABLE).serve(flush).event(0, 3).serve(flush)
    c["notify_desc_offset_across_wrap"] = n
    k = Case(size=4, features=INDIRECT).op(OP_KICKS, u8(0)).poke(R(0, HDR), blk_hdr(T_FLUSH))
    c["kicks_without_event_idx"] = k.add(flush).op(OP_KICKS, u8(0)).op(OP_KICKS, u8(1)).pop().complete().publish()
    c["base_with_buffers_in_flight"] = (Case(size=6, avail=pos(0, 0), used=pos(4, 1)).poke(R(0, HDR), blk_hdr(T_IN))
                                        .serve(read_elems()))

    # Hostile shapes.
    c["chain_longer_than_ring"] = Case(size=4).add([(R(0, HDR), 16, 0, 0)] * 3 + [(R(0, STATUS), 1, 0, W | FLIP_NEXT)]).pop().publish()
    c["chain_into_unavailable"] = Case(size=4).add([(R(0, HDR), 16, 0, 0), (R(0, STATUS), 1, 0, W | FLIP_AVAIL)]).pop().publish()
    c["chain_used_flag_set"] = Case(size=4).add([(R(0, HDR), 16, 0, 0), (R(0, STATUS), 1, 0, W | FLIP_USED)]).pop().publish()
    c["reuse_slot_in_flight"] = (Case(size=3).poke(R(0, HDR), blk_hdr(T_IN)).add(read_elems())
                                 .pop().op(OP_DRIVER_POS, u16(pos(0, 0))).add([(R(0, STATUS), 1, 1, W)]).pop().complete().publish())
    tbl = [(R(0, HDR), 16, 0), (R(0, DATA), 512, WRITE), (R(0, STATUS), 1, WRITE)]
    c["next_on_last_table_entry"] = (Case().poke(R(0, HDR), blk_hdr(T_IN)).table(R(0, TABLE), tbl[:2] + [(R(0, STATUS), 1, WRITE | NEXT)])
                                     .serve([(R(0, TABLE), 48, 0, IND)]))
    c["next_on_table_entries_dpdk"] = (Case().poke(R(0, HDR), blk_hdr(T_IN))
                                       .table(R(0, TABLE), [(R(0, HDR), 16, NEXT), (R(0, DATA), 512, WRITE | NEXT), (R(0, STATUS), 1, WRITE)])
                                       .serve([(R(0, TABLE), 48, 0, IND)]))
    c["indirect_with_next"] = Case().table(R(0, TABLE), tbl).serve([(R(0, TABLE), 48, 0, IND), (R(0, STATUS), 1, 0, W)])
    c["indirect_after_first"] = Case().table(R(0, TABLE), tbl).serve([(R(0, HDR), 16, 0, 0), (R(0, TABLE), 48, 0, IND)])
    c["indirect_zero_length"] = Case().serve([(R(0, TABLE), 0, 0, IND)])
    c["indirect_len_not_multiple_of_16"] = Case().table(R(0, TABLE), tbl).serve([(R(0, TABLE), 40, 0, IND)])
    c["indirect_nested"] = (Case().table(R(0, TABLE), [(R(0, TABLE + 0x100), 48, INDIR)]).table(R(0, TABLE + 0x100), tbl)
                            .serve([(R(0, TABLE), 16, 0, IND)]))
    c["indirect_not_negotiated"] = Case(features=EVENT_IDX).table(R(0, TABLE), tbl).serve([(R(0, TABLE), 48, 0, IND)])
    c["indirect_outside_memory"] = Case().serve([(RAW(0x40000000), 48, 0, IND)])
    c["address_overflow"] = Case().serve([(RAW(0xFFFFFFFFFFFFFF00), 0x200, 0, 0), (R(0, STATUS), 1, 0, W)])
    c["readable_after_writable"] = (Case().poke(R(0, HDR), blk_hdr(T_IN))
                                    .serve([(R(0, HDR), 16, 0, 0), (R(0, DATA), 512, 0, W), (R(0, DATA + 512), 512, 0, 0),
                                            (R(0, STATUS), 1, 0, W)]))
    many = tuple((R(0, DATA + 0x200 * k), 512) for k in range(6))
    c["more_segments_than_iov_max"] = Case(iov_max=4).poke(R(0, HDR), blk_hdr(T_OUT)).serve(write_elems(0, many))
    c["more_than_max_chain"] = Case(features=EVENT_IDX | INDIRECT | CHAIN_2).poke(R(0, HDR), blk_hdr(T_IN)).serve(read_elems())
    c["status_missing"] = Case().poke(R(0, HDR), blk_hdr(T_FLUSH)).serve([(R(0, HDR), 16, 0, 0)])
    c["indirect_table_too_large"] = Case().serve([(R(0, TABLE), 16 * 1025, 0, IND)])
    c["fault_without_status_byte"] = Case().serve([(RAW(0x40000000), 16, 0, 0), (R(0, STATUS), 1, 0, 0)])
    c["event_offset_outside_ring"] = (Case(size=5).poke(R(0, HDR), blk_hdr(T_FLUSH)).event(pos(7, 1), EV_DESC)
                                      .serve(flush).serve(flush))
    c["device_area_misaligned"] = Case(areas=(R(0, DESC), R(0, DRIVER), R(0, DEVICE + 2))).serve(flush)
    c["base_more_than_a_ring_in_flight"] = Case(size=4, avail=pos(1, 0), used=pos(0, 1)).serve(flush)
    c["raw_descriptor_rewrite"] = (Case().poke(R(0, HDR), blk_hdr(T_IN)).add(read_elems())
                                   .op(OP_DESC, u16(1), raw_desc(R(0, DATA), 0xFFFFFFFF, 0, WRITE | NEXT | AVAIL))
                                   .pop().complete().publish())
    return c


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "corpus", "vring_blk")
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):
        if name.startswith("packed-"):
            os.unlink(os.path.join(out, name))
    all_cases = cases()
    for name, case in sorted(all_cases.items()):
        with open(os.path.join(out, "packed-" + name), "wb") as f:
            f.write(case.data)
    print(f"wrote {len(all_cases)} seeds to {out}")


if __name__ == "__main__":
    main()
