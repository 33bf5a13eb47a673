#!/usr/bin/env python3
"""Writes the seed corpus of the vring_blk fuzz target (fuzz/corpus/vring_blk/).

One file per case the unit tests cover (Tests/DataPlaneTests: RequestTests,
HostileGuestTests), encoded in the input format documented at the top of
fuzz/vring_blk_fuzz.c. Keep the two in step. Each file is named after its
case; re-running rewrites them (not the packed-* seeds, which
fuzz/make_packed_seeds.py writes, nor the vring_blk-* crash reproducers). Usage: fuzz/make_seeds.py [OUTDIR]
"""
import os
import struct
import sys

# Features (header byte 0).
EVENT_IDX, INDIRECT, READ_ONLY = 1, 2, 4
# Descriptor flags.
NEXT, WRITE, INDIR = 1, 2, 4
# virtio-blk request types.
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
# Operations, in enum fz_op order.
(OP_DESC, OP_TABLE, OP_AVAIL, OP_AVAIL_IDX, OP_POKE, OP_POP, OP_COMPLETE,
 OP_PUBLISH, OP_NOTIFY, OP_KICKS, OP_USED_EVENT, OP_AVAIL_FLAGS) = range(12)

u8 = lambda v: struct.pack("<B", v & 0xFF)
u16 = lambda v: struct.pack("<H", v & 0xFFFF)
u32 = lambda v: struct.pack("<I", v & 0xFFFFFFFF)
u64 = lambda v: struct.pack("<Q", v & 0xFFFFFFFFFFFFFFFF)


def R(region, off):
    """An address: a region (input order) plus a signed 32-bit offset."""
    return u8(region) + struct.pack("<i", off)


def RAW(addr):
    """An absolute guest-physical address."""
    return u8(0xC0) + u64(addr)


def desc(addr, length, flags=0, nxt=0):
    return addr + u32(length) + u16(flags) + u16(nxt)


def blk_hdr(rtype, sector=0):
    return u32(rtype) + u32(0) + u64(sector)


def discard_seg(sector, sectors, flags=0):
    return u64(sector) + u32(sectors) + u32(flags)


# Where the standard layout puts things, as offsets into region 0.
DESC, AVAIL, USED = 0x0, 0x400, 0x800
HDR, DATA, STATUS, TABLE = 0x1000, 0x2000, 0x8000, 0x9000


class Case:
    def __init__(self, features=EVENT_IDX | INDIRECT, size_log2=4, regions=None, iov_max=256,
                 capacity=2048, lbs_log2=0, rings=None, last_avail=0, used_idx=0):
        # A region: (place, size, param); place 0 = absolute gpa, 1 = adjacent.
        regions = regions or [(0, 0x10000, 0x100000)]
        rings = rings or (R(0, DESC), R(0, AVAIL), R(0, USED))
        h = u8(features) + u8(size_log2) + u8(len(regions) - 1)
        for place, size, param in regions:
            h += u8(place) + u16(size - 1) + u64(param)
        h += u16(iov_max - 1) + u64(capacity) + u8(lbs_log2)
        h += b"".join(rings) + u16(last_avail) + u16(used_idx)
        self.data = h

    def op(self, code, *args):
        self.data += u8(code) + b"".join(args)
        return self

    def desc(self, i, d):
        return self.op(OP_DESC, u8(i), d)

    def chain(self, first, descs):
        """Main-table descriptors first, first+1, ... linked with NEXT."""
        for k, (addr, length, flags) in enumerate(descs):
            last = k == len(descs) - 1
            self.desc(first + k, desc(addr, length, flags | (0 if last else NEXT), first + k + 1))
        return self

    def table(self, addr, descs):
        """An indirect table at addr; entries linked with NEXT unless given as 4-tuples."""
        body = b""
        for k, d in enumerate(descs):
            if len(d) == 4:
                body += desc(*d)
            else:
                a, length, flags = d
                last = k == len(descs) - 1
                body += desc(a, length, flags | (0 if last else NEXT), k + 1)
        return self.op(OP_TABLE, addr, u8(len(descs) - 1), body)

    def poke(self, addr, data):
        assert len(data) <= 64
        return self.op(OP_POKE, addr, u8(len(data)), data)

    def avail(self, *heads):
        assert 1 <= len(heads) <= 8
        return self.op(OP_AVAIL, u8(len(heads) - 1), b"".join(u16(h) for h in heads))

    def pop(self, n=32):
        return self.op(OP_POP, u8(n - 1))

    def complete(self, sel=0):
        return self.op(OP_COMPLETE, u8(sel))

    def publish(self):
        return self.op(OP_PUBLISH)

    def serve(self, *heads):
        """Make heads available, pop, let the backend finish them, publish."""
        self.avail(*heads).pop()
        for _ in heads:
            self.complete()
        return self.publish()


def rw(rtype, sector=0, data=((R(0, DATA), 4096),), status=R(0, STATUS), hdr_len=16, **kw):
    """A read or write: header, data segments, status byte, as chain 0."""
    c = Case(**kw).poke(R(0, HDR), blk_hdr(rtype, sector))
    dflag = WRITE if rtype == T_IN else 0
    descs = [(R(0, HDR), hdr_len, 0)] + [(a, n, dflag) for a, n in data]
    if status is not None:
        descs.append((status, 1, WRITE))
    return c.chain(0, descs).serve(0)


def cases():
    c = {}
    c["good_read"] = rw(T_IN)
    c["good_read_no_event_idx"] = rw(T_IN, features=INDIRECT)
    segs = ((R(0, DATA), 512), (R(0, DATA + 0x1000), 1024), (R(0, DATA + 0x3000), 512))
    c["good_write_3_segments"] = rw(T_OUT, sector=8, data=segs)
    c["good_read_3_segments"] = rw(T_IN, sector=8, data=segs)
    c["zero_length_read"] = rw(T_IN, data=())
    c["header_split_8_8"] = (Case().poke(R(0, HDR), blk_hdr(T_IN, 4))
                             .chain(0, [(R(0, HDR), 8, 0), (R(0, HDR + 8), 8, 0),
                                        (R(0, DATA), 512, WRITE), (R(0, STATUS), 1, WRITE)])
                             .serve(0))
    c["status_inside_data_desc"] = rw(T_IN, data=((R(0, DATA), 513),), status=None)

    # Indirect tables.
    ind = [(R(0, HDR), 16, 0), (R(0, DATA), 4096, WRITE), (R(0, STATUS), 1, WRITE)]
    c["indirect_read"] = (Case().poke(R(0, HDR), blk_hdr(T_IN, 16)).table(R(0, TABLE), ind)
                          .desc(0, desc(R(0, TABLE), 48, INDIR)).serve(0))
    c["indirect_not_negotiated"] = (Case(features=EVENT_IDX).poke(R(0, HDR), blk_hdr(T_IN))
                                    .table(R(0, TABLE), ind)
                                    .desc(0, desc(R(0, TABLE), 48, INDIR)).serve(0))
    c["indirect_nested"] = (Case().table(R(0, TABLE), [(R(0, TABLE + 0x100), 48, INDIR, 0)])
                            .table(R(0, TABLE + 0x100), ind)
                            .desc(0, desc(R(0, TABLE), 16, INDIR)).serve(0))
    c["indirect_len_not_multiple_of_16"] = (Case().table(R(0, TABLE), ind)
                                            .desc(0, desc(R(0, TABLE), 40, INDIR)).serve(0))
    c["indirect_with_next"] = (Case().table(R(0, TABLE), ind)
                               .desc(0, desc(R(0, TABLE), 48, INDIR | NEXT, 1)).serve(0))
    c["indirect_larger_than_queue"] = (Case(size_log2=1).table(R(0, TABLE), ind)
                                       .desc(0, desc(R(0, TABLE), 48, INDIR)).serve(0))
    c["indirect_loop"] = (Case().table(R(0, TABLE), [(R(0, HDR), 16, NEXT, 1), (R(0, DATA), 512, NEXT, 0)])
                          .desc(0, desc(R(0, TABLE), 32, INDIR)).serve(0))
    c["indirect_misaligned"] = (Case().table(R(0, TABLE + 8), ind)
                                .desc(0, desc(R(0, TABLE + 8), 48, INDIR)).serve(0))
    c["indirect_after_head_in_chain"] = (Case().poke(R(0, HDR), blk_hdr(T_OUT))
                                         .table(R(0, TABLE), [(R(0, DATA), 512, 0), (R(0, STATUS), 1, WRITE)])
                                         .desc(0, desc(R(0, HDR), 16, NEXT, 1))
                                         .desc(1, desc(R(0, TABLE), 32, INDIR)).serve(0))

    # Guest memory layouts.
    two = [(0, 0x10000, 0x100000), (1, 0x10000, 0)]
    cross = ((R(0, 0x10000 - 0x1000), 0x2000),)
    c["read_across_region_boundary"] = rw(T_IN, data=cross, regions=two)
    c["write_across_region_boundary"] = rw(T_OUT, data=cross, regions=two)
    three = [(0, 0x10000, 0x100000), (1, 0x800, 0), (1, 0x10000, 0)]
    c["write_across_three_regions"] = rw(T_OUT, data=((R(0, 0xFC00), 0x1000),), regions=three)
    gap = [(0, 0x10000, 0x100000), (2, 0x10000, 0x200)]
    c["buffer_across_gap"] = rw(T_IN, data=cross, regions=gap)
    c["address_outside_memory"] = rw(T_IN, data=((RAW(0x40000000), 512),))
    c["length_past_last_region"] = rw(T_IN, data=((R(0, 0xFE00), 1024),))
    c["length_wraps_address_space"] = rw(T_IN, data=((RAW(0xFFFFFFFFFFFFFE00), 1024),))
    top = [(0, 0x10000, 0x100000), (3, 0x1000, 0)]
    c["buffer_ends_at_top_of_address_space"] = rw(T_IN, data=((R(1, 0xE00), 512),), regions=top)
    c["rings_in_second_region"] = rw(T_IN, regions=two,
                                     rings=(R(1, DESC), R(1, AVAIL), R(1, USED)))
    c["desc_ring_at_region_end"] = rw(T_IN, regions=two,
                                      rings=(R(0, 0x10000 - 0x100), R(1, AVAIL), R(1, USED)))

    # Chain shape.
    c["descriptor_loop"] = (Case().desc(0, desc(R(0, HDR), 16, NEXT, 1))
                            .desc(1, desc(R(0, DATA), 512, NEXT, 0)).serve(0))
    c["next_outside_table"] = (Case().desc(0, desc(R(0, HDR), 16, NEXT, 200)).serve(0))
    c["readable_after_writable"] = (Case().poke(R(0, HDR), blk_hdr(T_IN))
                                    .chain(0, [(R(0, HDR), 16, 0), (R(0, DATA), 512, WRITE),
                                               (R(0, DATA + 512), 512, 0), (R(0, STATUS), 1, WRITE)])
                                    .serve(0))
    c["readable_after_empty_writable"] = (Case().poke(R(0, HDR), blk_hdr(T_OUT))
                                          .chain(0, [(R(0, HDR), 16, 0), (R(0, DATA), 0, WRITE),
                                                     (R(0, DATA + 512), 512, 0), (R(0, STATUS), 1, WRITE)])
                                          .serve(0))
    many = tuple((R(0, DATA + 0x200 * k), 512) for k in range(8))
    c["more_segments_than_iov_max"] = rw(T_OUT, data=many, iov_max=4)
    c["segments_exactly_iov_max"] = rw(T_OUT, data=many[:2], iov_max=4)

    # The avail ring.
    c["avail_index_too_far_ahead"] = rw(T_IN).op(OP_AVAIL_IDX, u16(40)).pop().publish()
    c["head_outside_table"] = Case().avail(17).pop().publish()
    c["head_already_in_flight"] = (rw(T_IN).avail(0, 0).pop().complete().complete().publish())
    c["index_wraps"] = (Case(last_avail=0xFFFF, used_idx=0xFFFE).op(OP_AVAIL_IDX, u16(0xFFFF))
                        .poke(R(0, HDR), blk_hdr(T_IN))
                        .chain(0, [(R(0, HDR), 16, 0), (R(0, DATA), 512, WRITE), (R(0, STATUS), 1, WRITE)])
                        .serve(0).serve(0).serve(0))

    # Status byte.
    c["status_device_readable"] = (Case().poke(R(0, HDR), blk_hdr(T_OUT))
                                   .chain(0, [(R(0, HDR), 16, 0), (R(0, DATA), 512, 0), (R(0, STATUS), 1, 0)])
                                   .serve(0))
    c["status_missing"] = (Case().poke(R(0, HDR), blk_hdr(T_FLUSH)).chain(0, [(R(0, HDR), 16, 0)])
                           .serve(0))
    c["status_empty"] = (Case().poke(R(0, HDR), blk_hdr(T_IN))
                         .chain(0, [(R(0, HDR), 16, 0), (R(0, DATA), 512, WRITE), (R(0, STATUS), 0, WRITE)])
                         .serve(0))
    c["header_shorter_than_16"] = rw(T_IN, hdr_len=12)

    # Sectors and lengths.
    for name, sector in (("max", 2**64 - 1), ("max_div_512_plus_1", 2**64 // 512 + 1),
                         ("2_pow_63", 2**63), ("capacity", 2048)):
        c["sector_overflow_" + name] = rw(T_IN, sector=sector)
    c["write_past_capacity"] = rw(T_OUT, sector=2047, data=((R(0, DATA), 1024),))
    c["length_not_multiple_of_512"] = rw(T_IN, data=((R(0, DATA), 700),))
    c["misaligned_for_4k_blocks"] = rw(T_IN, sector=1, lbs_log2=3, capacity=4096)
    c["huge_capacity_4k_blocks"] = rw(T_OUT, sector=2**54, lbs_log2=3, capacity=2**55 - 8)
    c["read_only_write"] = rw(T_OUT, features=EVENT_IDX | READ_ONLY)

    # Other request types.
    def typed(rtype, inlen=1, payload=b"", features=EVENT_IDX | INDIRECT):
        descs = [(R(0, HDR), 16 + len(payload), 0)]
        if inlen > 1:
            descs.append((R(0, DATA), inlen - 1, WRITE))
        descs.append((R(0, STATUS), 1, WRITE))
        return (Case(features=features).poke(R(0, HDR), blk_hdr(rtype) + payload)
                .chain(0, descs).serve(0))

    c["flush"] = typed(T_FLUSH)
    c["flush_read_only"] = typed(T_FLUSH, features=READ_ONLY)
    c["get_id"] = typed(T_GET_ID, inlen=21)
    c["get_id_short_buffer"] = typed(T_GET_ID, inlen=11)
    c["unsupported_type"] = typed(99)
    c["discard"] = typed(T_DISCARD, payload=discard_seg(8, 16))
    c["discard_with_flags"] = typed(T_DISCARD, payload=discard_seg(8, 16, 1))
    c["discard_two_segments"] = typed(T_DISCARD, payload=discard_seg(8, 16) * 2)
    c["discard_partial_segment"] = typed(T_DISCARD, payload=discard_seg(8, 16)[:10])
    c["discard_past_capacity"] = typed(T_DISCARD, payload=discard_seg(2040, 16))
    c["discard_read_only"] = typed(T_DISCARD, payload=discard_seg(8, 16), features=READ_ONLY)
    c["discard_segment_in_own_descriptor"] = (Case().poke(R(0, HDR), blk_hdr(T_DISCARD))
                                              .poke(R(0, DATA), discard_seg(8, 16))
                                              .chain(0, [(R(0, HDR), 16, 0), (R(0, DATA), 16, 0),
                                                         (R(0, STATUS), 1, WRITE)])
                                              .serve(0))
    c["write_header_and_data_in_one_descriptor"] = (Case().poke(R(0, HDR), blk_hdr(T_OUT, 2))
                                                    .chain(0, [(R(0, HDR), 16 + 1024, 0),
                                                               (R(0, STATUS), 1, WRITE)])
                                                    .serve(0))
    c["write_zeroes_unmap"] = typed(T_WRITE_ZEROES, payload=discard_seg(0, 8, 1))
    c["write_zeroes_reserved_flag"] = typed(T_WRITE_ZEROES, payload=discard_seg(0, 8, 2))

    # Batches, out-of-order completion, notification and kicks.
    b = Case(size_log2=3).poke(R(0, HDR), blk_hdr(T_IN, 0))
    for k in range(4):
        b.desc(2 * k, desc(R(0, HDR), 16, NEXT, 2 * k + 1))
        b.desc(2 * k + 1, desc(R(0, DATA + 0x400 * k), 513, WRITE))
    b.op(OP_USED_EVENT, u16(1)).avail(0, 2, 4, 6).pop(3).complete(2).complete(0x81).publish()
    b.op(OP_KICKS, u8(0)).pop().complete().complete().publish().op(OP_KICKS, u8(1))
    c["batch_out_of_order"] = b
    n = Case(features=INDIRECT).op(OP_AVAIL_FLAGS, u16(1)).op(OP_KICKS, u8(1))
    n.poke(R(0, HDR), blk_hdr(T_FLUSH)).chain(0, [(R(0, HDR), 16, 0), (R(0, STATUS), 1, WRITE)])
    c["no_interrupt_flag"] = n.serve(0).op(OP_NOTIFY).op(OP_KICKS, u8(0))
    g = rw(T_IN)
    g.desc(1, desc(R(0, DATA), 0xFFFFFFFF, WRITE | NEXT, 2)).serve(0)
    c["guest_rewrites_descriptor_between_pops"] = g
    return c


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "corpus", "vring_blk")
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):
        # packed-*: fuzz/make_packed_seeds.py's; vring_blk-*: fuzz/crashes/ reproducers.
        if not name.startswith(("packed-", "vring_blk-")):
            os.unlink(os.path.join(out, name))
    for name, case in sorted(cases().items()):
        with open(os.path.join(out, name), "wb") as f:
            f.write(case.data)
    print(f"wrote {len(cases())} seeds to {out}")


if __name__ == "__main__":
    main()
